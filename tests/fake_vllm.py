"""A stand-in for vLLM's offline engine (tests only): TRL 1.16's REAL vLLM generation code runs against it.

vLLM cannot be installed on the CPU machines. :func:`install` puts a minimal ``vllm`` module into
``sys.modules`` and points ``trl.generation.vllm_generation`` at it (its ``is_vllm_available`` check and the
``LLM`` / ``SamplingParams`` names it imports when vLLM is present), so ``GRPOTrainer(use_vllm=True,
vllm_mode="colocate")`` builds TRL's own :class:`~trl.generation.vllm_generation.VLLMGeneration` and every
generation goes through its ``generate`` (prompt building, ``llm.generate``, ``extract_logprobs``, TP slicing),
then through ``_generate_and_score_completions``'s vLLM branch (sampling log-probs, importance-sampling ratio,
``sampling/...`` metrics).

:class:`FakeLLM` honours the part of ``vllm.LLM`` TRL uses: ``LLM(model=path, seed=..., ...)``,
``generate(prompts, sampling_params, use_tqdm)`` on ``{"prompt_token_ids", "multi_modal_data"}`` rows returning
``RequestOutput``-like objects (``.prompt_token_ids``, ``.outputs[i].token_ids``, ``.outputs[i].logprobs`` as
``{token_id: Logprob(logprob, rank)}`` per position), ``llm_engine...model_runner.model.load_weights`` (TRL's
weight sync), ``reset_prefix_cache``, ``sleep`` / ``wake_up``. :class:`FakeVLLMClient` stands in for TRL's client of a
vLLM server (``vllm_mode="server"``) with the same engine behind it. It really samples: the tiny Qwen-VL loaded from
``model`` (kept in sync with the trainer by TRL), HF ``generate`` with the sampling parameters, EOS kept as
vLLM keeps it, and the processed (temperature-scaled) log-prob of every sampled token. ``logprob_shift``
adds ``shift × call index`` to the reported log-probs, a sampler/trainer mismatch that makes the importance
ratios of each generate call distinct. Every call is recorded (:attr:`FakeLLM.calls`).
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
import types
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch


class SamplingParams:
    """``vllm.SamplingParams``: the keyword arguments TRL passes."""

    def __init__(self, n: int = 1, repetition_penalty: float = 1.0, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, min_p: float = 0.0, max_tokens: int = 16, logprobs: int | None = None,
                 **extra: Any) -> None:
        self.n, self.repetition_penalty, self.temperature = n, repetition_penalty, temperature
        self.top_p, self.top_k, self.min_p, self.max_tokens, self.logprobs = top_p, top_k, min_p, max_tokens, logprobs
        self.extra = extra


class StructuredOutputsParams:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    text: str = ""
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)


class _WeightLoader:
    """``model_runner.model``: TRL's colocate weight sync calls ``load_weights([(name, tensor)])``."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._params = dict(model.named_parameters())
        self.loaded = 0

    def load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        with torch.no_grad():
            for name, tensor in weights:
                self._params[name].copy_(tensor)
                self.loaded += 1


class FakeLLM:
    """``vllm.LLM`` for TRL's colocate mode, sampling from the tiny Qwen-VL at ``model`` (see module doc)."""

    instances: list[FakeLLM] = []
    logprob_shift: float = 0.0

    def __init__(self, model: str, seed: int = 0, **kwargs: Any) -> None:
        from differad_rl.integrations.qwen_vl.tiny import load_tiny_qwen_vl

        self.model, self.processor = load_tiny_qwen_vl(model)
        self.model.eval()
        self.seed, self.kwargs = seed, kwargs
        self.loader = _WeightLoader(self.model)
        self.llm_engine = SimpleNamespace(
            model_executor=SimpleNamespace(driver_worker=SimpleNamespace(model_runner=SimpleNamespace(
                model=self.loader))),
            model_config=SimpleNamespace(max_model_len=kwargs.get("max_model_len") or 4096),
        )
        tok = self.processor.tokenizer
        self.eos = sorted({tok.eos_token_id, *([self.model.generation_config.eos_token_id] if isinstance(
            self.model.generation_config.eos_token_id, int) else self.model.generation_config.eos_token_id or [])})
        self.pad = tok.pad_token_id
        #: one entry per generate call: per prompt row, its prompt ids, sampled ids and reported log-probs
        self.calls: list[list[dict[str, Any]]] = []
        FakeLLM.instances.append(self)

    def reset_prefix_cache(self) -> None:
        pass

    def sleep(self, level: int = 1) -> None:
        pass

    def wake_up(self, tags: list[str] | None = None) -> None:
        pass

    def generate(self, prompts: list[dict[str, Any]], sampling_params: SamplingParams | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        sp = sampling_params or SamplingParams()
        call = len(self.calls)
        shift = self.logprob_shift * call
        record, outputs = [], []
        with torch.random.fork_rng(devices=[]), torch.no_grad():  # the trainer's RNG is not vLLM's
            torch.manual_seed(10_000 * self.seed + 100 * call)
            for i, row in enumerate(prompts):
                ids = list(row["prompt_token_ids"])
                extra: dict[str, Any] = {}
                images = (row.get("multi_modal_data") or {}).get("image")
                if images is not None:
                    images = images if isinstance(images, list) else [images]
                    feats = self.processor.image_processor(images=images, return_tensors="pt")
                    extra = {"pixel_values": feats["pixel_values"], "image_grid_thw": feats["image_grid_thw"]}
                input_ids = torch.tensor([ids])
                gen = self.model.generate(
                    input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **extra,
                    do_sample=True, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k or None,
                    repetition_penalty=sp.repetition_penalty, max_new_tokens=sp.max_tokens,
                    eos_token_id=self.eos, pad_token_id=self.pad, output_scores=True, return_dict_in_generate=True,
                )
                sampled = gen.sequences[0, input_ids.size(1):].tolist()
                for t, tok in enumerate(sampled):  # up to and including the first EOS, as vLLM returns it
                    if tok in self.eos:
                        sampled = sampled[: t + 1]
                        break
                lps = [torch.log_softmax(gen.scores[t][0].float(), -1)[tok].item() + shift
                       for t, tok in enumerate(sampled)]
                logprobs = None if sp.logprobs is None else [{tok: Logprob(lp, rank=1)} for tok, lp in zip(sampled, lps)]
                outputs.append(RequestOutput(str(i), ids, [CompletionOutput(0, sampled, logprobs)]))
                record.append({"prompt_token_ids": ids, "token_ids": sampled, "logprobs": lps,
                               "num_images": 0 if images is None else len(images)})
        self.calls.append(record)
        return outputs


class FakeVLLMClient:
    """``trl.generation.vllm_client.VLLMClient`` for TRL's server mode (built on the main process only): a
    :class:`FakeLLM` on :attr:`model_path` plays the server. ``image_features`` returns the images themselves
    as the features (TRL re-places them on the prompt's image tokens), ``generate`` samples ``n`` completions
    per prompt, prompt-major, as the server returns them; the weight push loads into the engine."""

    model_path: str | None = None
    instances: list[FakeVLLMClient] = []

    def __init__(self, base_url: str = "", group_port: int = 0, connection_timeout: float = 0.0) -> None:
        self.llm = FakeLLM(str(self.model_path))
        FakeVLLMClient.instances.append(self)

    def init_communicator(self, device: Any = None) -> None:
        pass

    def get_server_info(self) -> dict[str, Any]:
        return {"model_config": {"logprobs_mode": "processed_logprobs"}}

    def update_named_params(self, metadata: list, params: Any) -> None:
        for name, tensor in params:
            self.llm.loader.load_weights([(name, tensor)])

    def reset_prefix_cache(self) -> None:
        pass

    def image_features(self, images: list[list | None]) -> list[dict | None]:
        return [None if not imgs else {"images": list(imgs), "mm_placeholders": {"image": [{}] * len(imgs)}}
                for imgs in images]

    def generate(self, prompts: list[list[int]], features: list[dict | None] | None = None, n: int = 1,
                 max_tokens: int = 16, logprobs: int | None = 0, structured_outputs_regex: str | None = None,
                 generation_kwargs: dict | None = None, **sampling: Any) -> dict[str, list]:
        rows = []
        for i, ids in enumerate(prompts):
            feats = features[i] if features is not None else None
            row = {"prompt_token_ids": ids}
            if feats is not None:
                row["multi_modal_data"] = {"image": feats["images"]}
            rows.extend([row] * n)
        outs = self.llm.generate(rows, SamplingParams(max_tokens=max_tokens, logprobs=logprobs, **sampling))
        completions = [o.outputs[0] for o in outs]
        return {
            "prompt_ids": [list(ids) for ids in prompts],
            "completion_ids": [list(c.token_ids) for c in completions],
            "logprobs": [[[lp.logprob for lp in pos.values()] for pos in c.logprobs] for c in completions],
            "logprob_token_ids": [[list(pos) for pos in c.logprobs] for c in completions],
        }


def install(monkeypatch: Any | None = None, logprob_shift: float = 0.0,
            server_model: str | None = None) -> type[FakeLLM]:
    """Make TRL's vLLM path use :class:`FakeLLM`; returns the class (its ``instances`` list the engines built).

    ``monkeypatch``: pytest's fixture (everything is undone after the test, also the ``RANK`` /
    ``WORLD_SIZE`` / ``MASTER_*`` variables TRL's colocate set-up writes); ``None`` patches for good
    (a worker process).
    """
    import trl.generation.vllm_generation as vg

    patch = monkeypatch
    if patch is None:
        patch = SimpleNamespace(setitem=lambda d, k, v: d.__setitem__(k, v),
                                setattr=lambda o, k, v, raising=True: setattr(o, k, v),
                                setenv=lambda *a, **k: None, delenv=lambda *a, **k: None)
    vllm = types.ModuleType("vllm")
    vllm.__version__ = "0.24.0"
    vllm.__spec__ = importlib.machinery.ModuleSpec("vllm", None)  # importlib.util.find_spec("vllm") finds it
    sampling = types.ModuleType("vllm.sampling_params")
    for name, obj in (("LLM", FakeLLM), ("SamplingParams", SamplingParams), ("RequestOutput", RequestOutput)):
        setattr(vllm, name, obj)
    sampling.SamplingParams, sampling.StructuredOutputsParams = SamplingParams, StructuredOutputsParams
    patch.setitem(sys.modules, "vllm", vllm)
    patch.setitem(sys.modules, "vllm.sampling_params", sampling)
    patch.setattr(vg, "is_vllm_available", lambda *args, **kwargs: True)
    for name, obj in (("LLM", FakeLLM), ("SamplingParams", SamplingParams), ("RequestOutput", RequestOutput),
                      ("StructuredOutputsParams", StructuredOutputsParams), ("VLLMClient", FakeVLLMClient)):
        patch.setattr(vg, name, obj, raising=False)
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        # setenv records the variable even when it is unset (delenv of an unset one records nothing), so
        # pytest restores or removes it after the test; later tests' subprocesses must not inherit WORLD_SIZE
        patch.setenv(var, os.environ.get(var, ""))
        patch.delenv(var)
    FakeLLM.instances, FakeVLLMClient.instances = [], []
    FakeLLM.logprob_shift = logprob_shift
    FakeVLLMClient.model_path = server_model
    return FakeLLM
