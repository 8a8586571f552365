"""A CPU generation backend behind veRL 0.9's rollout-server client interface.

veRL's agent loops generate through an :class:`verl.workers.rollout.llm_server.LLMServerClient`:
``await client.generate(request_id, prompt_ids=..., sampling_params=..., image_data=...)`` returns a
:class:`verl.workers.rollout.replica.TokenOutput` (the response token ids, optional log-probs).
On a GPU machine the client forwards to vLLM or SGLang servers. Neither runs on CPU, so
:class:`HFGenerationClient` answers the same call with a Hugging Face model's own sampling
(``model.generate``) — e.g. the tiny random Qwen-VL of
:mod:`differad_rl.integrations.qwen_vl.tiny` — so veRL's real agent-loop code (prompt building,
multimodal inputs, reward loop, post-processing) can be exercised end to end on a laptop or in CI.

:func:`use_cpu_platform` does the same for veRL's training side: a veRL platform for the CPU
(:class:`CPUPlatform`; veRL 0.9.1 registers CUDA, NPU and ROCm only and otherwise falls back to CUDA)
and veRL's FSDP engine registered for it, so veRL's own ``ActorRolloutRefWorker`` builds its actor
and reference engines (``init_model``), computes log-probs and runs PPO updates on a gloo process
group in one CPU process.

It is a test/demo backend: one request at a time (a lock around the model), no batching, no
prefix cache. It pickles (model included), so veRL can hand it to its Ray agent-loop workers.
Sampling parameters map as vLLM reads them: ``temperature`` (0 = greedy), ``top_p``,
``top_k`` (``-1``/``0`` = off), ``repetition_penalty``, ``max_tokens`` (default: the rollout's
``response_length``), ``logprobs`` (return the sampled tokens' log-probabilities under the raw
model distribution, as vLLM's default does).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from verl.plugin.platform.platform_base import PlatformBase
from verl.workers.rollout.llm_server import LLMServerClient
from verl.workers.rollout.replica import TokenOutput

__all__ = ["CPUPlatform", "HFGenerationClient", "use_cpu_platform"]


class HFGenerationClient(LLMServerClient):
    """veRL's ``LLMServerClient.generate`` served by ``model.generate`` in this process.

    Args:
        config: veRL's whole trainer config (``actor_rollout_ref.rollout.response_length`` is the
            default number of new tokens).
        model: a Hugging Face (vision-)language model with ``generate``.
        processor: its processor; ``processor.image_processor`` turns ``image_data`` into
            ``pixel_values`` / ``image_grid_thw`` (Qwen-VL).
        global_steps: the weights version reported in ``extra_fields`` (veRL's staleness tags).
        seed: when given, every request is sampled from ``torch.Generator`` state
            ``seed + request number`` — reproducible for one request order.

    Attributes:
        requests: number of ``generate`` calls answered (tests count regenerations with it).
    """

    def __init__(
        self,
        config: Any,
        model: Any,
        processor: Any,
        *,
        global_steps: int = 0,
        seed: int | None = None,
    ) -> None:
        super().__init__(config, load_balancer_handle=None)
        self.model = model.eval()
        self.processor = processor
        self.global_steps = int(global_steps)
        self.seed = seed
        self.requests = 0
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="hf-generate")

    def __getstate__(self) -> dict[str, Any]:
        # picklable, so it can be handed to veRL's agent-loop workers (Ray actors) like the real client
        state = dict(self.__dict__)
        del state["_lock"], state["_executor"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="hf-generate")

    async def generate(  # type: ignore[override]
        self,
        request_id: str,
        *,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        image_data: list[Any] | None = None,
        video_data: list[Any] | None = None,
        audio_data: list[Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> TokenOutput:
        """Sample one response for ``prompt_ids`` (veRL's server-client signature).

        Raises:
            ValueError: video or audio input (not supported by this backend), or a prompt whose
                image placeholder count does not match ``image_data``.
        """
        if video_data or audio_data:
            raise ValueError("HFGenerationClient supports text and images only (got video/audio data)")
        call = functools.partial(self._generate, list(prompt_ids), dict(sampling_params), image_data)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    # ------------------------------------------------------------------------------------------

    def _vision_inputs(self, prompt: torch.Tensor, images: list[Any] | None) -> dict[str, torch.Tensor]:
        if not images:
            return {}
        feats = self.processor.image_processor(images=list(images), return_tensors="pt")
        grid = feats["image_grid_thw"]
        merge = int(getattr(self.processor.image_processor, "merge_size", 2))
        want = int((grid.prod(dim=-1) // (merge * merge)).sum())
        image_token = getattr(self.processor, "image_token_id", None)
        if image_token is not None:
            have = int((prompt == image_token).sum())
            if have != want:
                raise ValueError(
                    f"prompt holds {have} image placeholder tokens, the {len(images)} image(s) need {want}"
                )
        return {"pixel_values": feats["pixel_values"], "image_grid_thw": grid}

    def _generate(self, prompt_ids: list[int], params: dict[str, Any], images: list[Any] | None) -> TokenOutput:
        rollout = self.config.actor_rollout_ref.rollout
        prompt = torch.tensor([prompt_ids], dtype=torch.long)
        temperature = float(params.get("temperature", 1.0) or 0.0)
        top_k = int(params.get("top_k", -1) or -1)
        gen: dict[str, Any] = {
            "max_new_tokens": int(params.get("max_tokens") or rollout.response_length),
            "do_sample": temperature > 0,
            "repetition_penalty": float(params.get("repetition_penalty", 1.0)),
            "return_dict_in_generate": True,
            "output_logits": bool(params.get("logprobs")),
        }
        if temperature > 0:
            gen.update(temperature=temperature, top_p=float(params.get("top_p", 1.0)), top_k=top_k if top_k > 0 else 0)
        tok = getattr(self.processor, "tokenizer", self.processor)
        eos = self.model.generation_config.eos_token_id
        with self._lock, torch.inference_mode():
            self.requests += 1
            vision = self._vision_inputs(prompt, images)
            rng = torch.random.fork_rng(devices=[]) if self.seed is not None else contextlib.nullcontext()
            with rng:
                if self.seed is not None:
                    torch.manual_seed(self.seed + self.requests)
                out = self.model.generate(
                    input_ids=prompt,
                    attention_mask=torch.ones_like(prompt),
                    pad_token_id=tok.pad_token_id,
                    **vision,
                    **gen,
                )
        new = out.sequences[0, prompt.shape[1] :]
        eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        stop = next((i for i, t in enumerate(new.tolist()) if t in eos_ids), None)
        if stop is not None:
            new = new[: stop + 1]  # keep the eos, as vLLM does
        log_probs = None
        if params.get("logprobs"):
            logits = torch.stack(out.logits, dim=1)[0, : new.numel()].float()
            log_probs = torch.log_softmax(logits, dim=-1).gather(-1, new[:, None])[:, 0].tolist()
        return TokenOutput(
            token_ids=new.tolist(),
            log_probs=log_probs,
            stop_reason="completed",
            num_preempted=0,
            extra_fields={
                "global_steps": self.global_steps,
                "min_global_steps": self.global_steps,
                "max_global_steps": self.global_steps,
            },
        )



# ------------------------------------------------------------------------------------------------
# training side: veRL's workers and FSDP engine on the CPU


class _CPUDeviceModule:
    """``torch.cpu`` plus the ``torch.cuda``-style calls veRL makes on its device module (memory
    statistics read as 0, cache and seeding calls do nothing device-specific)."""

    _ZERO = ("memory_allocated", "memory_reserved", "max_memory_allocated", "max_memory_reserved")

    def __getattr__(self, name: str) -> Any:
        if hasattr(torch.cpu, name):
            return getattr(torch.cpu, name)
        if name in self._ZERO:
            return lambda *args, **kwargs: 0
        if name == "mem_get_info":
            return lambda *args, **kwargs: (0, 0)
        if name == "get_device_name":  # veRL's FLOPs counter looks the name up in its table: "CPU" is in it
            return lambda *args, **kwargs: "CPU"
        if name in ("empty_cache", "ipc_collect", "reset_peak_memory_stats", "set_device"):
            return lambda *args, **kwargs: None
        if name in ("manual_seed", "manual_seed_all"):
            return torch.manual_seed
        raise AttributeError(f"the CPU device module has no {name!r}")


class CPUPlatform(PlatformBase):
    """veRL's platform interface for a CPU-only process (device ``cpu``, collectives over gloo)."""

    _module = _CPUDeviceModule()

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> Any:
        return self._module

    def is_available(self) -> bool:
        return True

    def current_device(self) -> Any:  # FSDP1's device_id: the CPU device, not an index
        return torch.device("cpu")

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        pass

    def synchronize(self, device_index: int | None = None) -> None:
        pass

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def get_device_capability(self, device_index: int = 0) -> tuple[int | None, int | None]:
        return (None, None)

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"

    @contextlib.contextmanager
    def nvtx_range(self, msg: str) -> Any:
        yield

    def profiler_start(self) -> None:
        pass

    def profiler_stop(self) -> None:
        pass

    def ray_resource_name(self) -> str:
        return "CPU"

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None


def use_cpu_platform() -> None:
    """Make veRL run its workers and FSDP engine on the CPU in this process (idempotent).

    Sets :class:`CPUPlatform` as veRL's platform and registers veRL's ``FSDPEngineWithLMHead`` (the
    actor / reference engine) for the ``cpu`` device. The caller initialises a gloo process group
    (``torch.distributed.init_process_group("gloo", ...)``) before building workers; veRL's workers
    reuse an initialised group. FSDP2 (``strategy=fsdp2``) then runs as is; FSDP1 additionally
    refuses CPU parameters with ``sync_module_states=True`` (veRL's setting), a guard the tests lift.
    """
    from verl.plugin.platform import platform_manager
    from verl.workers.engine import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    if not isinstance(platform_manager._current_platform, CPUPlatform):
        platform_manager.set_platform(CPUPlatform())
    engines = EngineRegistry._engines["language_model"]
    if any("cpu" not in engines[backend] for backend in ("fsdp", "fsdp2")):
        EngineRegistry.register(model_type="language_model", backend=["fsdp", "fsdp2"], device="cpu")(
            FSDPEngineWithLMHead
        )
