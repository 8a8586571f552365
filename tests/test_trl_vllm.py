"""Group resampling and group refill with ``use_vllm=True``: TRL 1.16's REAL vLLM generation path
(``VLLMGeneration.generate`` and the vLLM branch of ``_generate_and_score_completions``) on a fake engine that
honours ``vllm.LLM.generate`` and samples from the tiny Qwen2.5-VL (``tests/fake_vllm.py``; vLLM cannot be
installed here). The two-process lockstep check (colocate, tensor parallel 2 over gloo) is in
``test_trl_multiprocess.py``.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl")

from differad_rl.integrations.qwen_vl.tiny import tiny_model_for  # noqa: E402
from differad_rl.integrations.trl.config import DifferADGRPOConfig, check_vllm_regeneration  # noqa: E402
from differad_rl.integrations.trl.trainer import DifferADGRPOTrainer, splice_rows, trl_advantages  # noqa: E402

from tests import fake_vllm  # noqa: E402
from tests.trl_mp_worker import (  # noqa: E402
    G,
    expand_groups,
    make_prompt_rows,
    make_trainer,
    text_format_reward,
    text_loc_reward,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHIFT = 0.05  # the fake sampler's log-probs are off by SHIFT × call index per token (a vLLM/trainer mismatch)


@pytest.fixture(scope="module")
def model_path():
    return tiny_model_for("qwen2_5_vl")


@pytest.fixture
def fake_llm(monkeypatch, model_path):
    return fake_vllm.install(monkeypatch, logprob_shift=SHIFT, server_model=str(model_path))


class FirstOutputTrainer(DifferADGRPOTrainer):
    """Keeps the first generation's output of a step (before any regeneration) and every sub-batch output."""

    def _generate_captured(self, sub_inputs, mode):
        result = super()._generate_captured(sub_inputs, mode)
        self.sub_outputs.append(result[0])
        return result

    def _regenerate(self, batch, *args, **kwargs):
        if not hasattr(self, "first_output"):
            self.first_output = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in batch.output.items()}
        return super()._regenerate(batch, *args, **kwargs)


def _vllm_trainer(model_path, tmp_path, rows, vllm_mode="colocate", **config):
    trainer = make_trainer(FirstOutputTrainer, model_path, [text_loc_reward, text_format_reward], rows,
                           len(rows) * G, tmp_path, use_vllm=True, vllm_mode=vllm_mode,
                           localization_reward="text_loc_reward", **config)
    trainer.sub_outputs = []
    return trainer


def _step(trainer, batch):
    trainer.model.train()
    torch.manual_seed(0)
    return trainer._generate_and_score_completions(batch)


def _row(t, i, mask):
    return t[i][mask[i].bool()].tolist()


def _expected_ratio(out, mode, clip_max=3.0):
    """TRL's importance-sampling ratio, recomputed from the final batch's own log-probs."""
    diff = torch.nan_to_num((out["old_per_token_logps"] - out["sampling_per_token_logps"]) * out["completion_mask"])
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    return ratio.clamp(max=clip_max) if mode.endswith("truncate") else ratio.masked_fill(ratio > clip_max, 0.0)


@pytest.mark.parametrize("vllm_mode,is_mode", [("colocate", "sequence_mask"), ("colocate", "token_truncate"),
                                               ("server", "sequence_mask")])
def test_resampling_splices_trl_vllm_rows(model_path, tmp_path, fake_llm, vllm_mode, is_mode):
    rows = make_prompt_rows(["easy", "hard", "easy", "hard"])
    batch = expand_groups(rows)
    hard = [r["kind"] == "hard" for r in batch]
    trainer = _vllm_trainer(model_path, tmp_path, rows, vllm_mode, resample_rounds=2,
                            vllm_importance_sampling_mode=is_mode)
    out = _step(trainer, batch)
    (llm,) = fake_llm.instances  # colocate: the trainer's engine; server: the one behind the fake client
    assert len(fake_vllm.FakeVLLMClient.instances) == (vllm_mode == "server")
    # TRL synced the weights once for the step; round 0 sampled the batch, rounds 1-2 only the hard groups' rows
    # (server: G completions of each distinct prompt, prompt-major)
    assert llm.loader.loaded == len(list(trainer.model.parameters()))
    assert [len(c) for c in llm.calls] == [16, 8, 8]
    hard_prompts = [p["prompt_token_ids"] for p, h in zip(llm.calls[0], hard) if h]
    assert [p["prompt_token_ids"] for p in llm.calls[2]] == hard_prompts
    assert all(p["num_images"] == 2 for c in llm.calls for p in c)
    # every row carries the completion and sampling log-probs of the call that made it: hard rows the last
    # round's, easy rows the first generation's, untouched
    last = iter(llm.calls[2])
    source = [next(last) if h else first for first, h in zip(llm.calls[0], hard)]
    mask = out["completion_mask"]
    assert [_row(out["completion_ids"], i, mask) for i in range(16)] == [s["token_ids"] for s in source]
    for i, s in enumerate(source):
        torch.testing.assert_close(torch.tensor(_row(out["sampling_per_token_logps"], i, mask)),
                                   torch.tensor(s["logprobs"]), rtol=0, atol=1e-6)
    first = trainer.first_output
    easy = [i for i, h in enumerate(hard) if not h]
    for key in ("completion_ids", "old_per_token_logps", "sampling_per_token_logps", "importance_sampling_ratio"):
        width = first[key].size(1)
        torch.testing.assert_close(out[key][easy, :width], first[key][easy], rtol=0, atol=0)
    # importance-sampling ratios: TRL's formula on each row's own log-probs; a hard row's is the one the last
    # sub-batch computed (sampled 2·SHIFT off per token), an easy row's the first generation's (≈ 1)
    ratio = out["importance_sampling_ratio"]
    assert ratio.shape == ((16, 1) if is_mode.startswith("sequence") else mask.shape)
    torch.testing.assert_close(ratio * (mask if ratio.size(1) > 1 else 1),
                               _expected_ratio(out, is_mode) * (mask if ratio.size(1) > 1 else 1),
                               rtol=1e-5, atol=1e-6)
    sub = trainer.sub_outputs[-1]["importance_sampling_ratio"][:8]
    torch.testing.assert_close(ratio[[i for i, h in enumerate(hard) if h], : sub.size(1)], sub, rtol=0, atol=0)
    lengths = mask.sum(1).tolist()
    for i, h in enumerate(hard):
        expect = math.exp(-2 * SHIFT * (lengths[i] if is_mode.startswith("sequence") else 1)) if h else 1.0
        got = ratio[i, 0].item()
        assert got == pytest.approx(expect, rel=5e-3), (i, h)
    # TRL's vLLM metrics of the step are the final batch's (one value each, replaced)
    m = trainer._metrics["train"]
    flat = ratio.flatten() if is_mode.startswith("sequence") else ratio[mask.bool()]
    delta = (out["old_per_token_logps"] - out["sampling_per_token_logps"]).abs()[mask.bool()]
    for name, value in (("importance_sampling_ratio/mean", flat.mean()), ("importance_sampling_ratio/min", flat.min()),
                        ("importance_sampling_ratio/max", flat.max()),
                        ("sampling_logp_difference/mean", delta.mean()), ("sampling_logp_difference/max", delta.max())):
        assert m[f"sampling/{name}"] == [pytest.approx(value.item(), rel=1e-5)], name
    assert m["sampling/importance_sampling_ratio/min"][0] < 0.95  # the hard rows' ratios, not round 0's ≈ 1
    # rewards, advantages and the loss-token count are the final batch's
    rpf = trainer._last_rewards_per_func
    torch.testing.assert_close(rpf[:, 1], torch.tensor(text_format_reward(
        [[{"content": trainer.processing_class.decode(s["token_ids"], skip_special_tokens=True)}] for s in source])))
    adv, _ = trl_advantages(rpf, trainer.reward_weights, G, trainer.scale_rewards)
    torch.testing.assert_close(out["advantages"], adv)
    assert int(out["num_items_in_batch"]) == int(mask.sum())
    assert trainer._metrics["train"]["differad/regenerations"][-1] == 4


def test_refill_draws_new_prompts_through_trl_vllm(model_path, tmp_path, fake_llm):
    rows = make_prompt_rows(["easy", "hard", "easy", "easy"])
    batch = expand_groups(rows)
    trainer = _vllm_trainer(model_path, tmp_path, rows, group_filter="dapo", group_filter_refill_rounds=1,
                            vllm_importance_sampling_mode="token_truncate")
    out = _step(trainer, batch)
    (llm,) = fake_llm.instances
    assert [len(c) for c in llm.calls] == [16, 4]  # one refill round for the one filtered (hard) group
    assert trainer._metrics["train"]["differad/refills"][-1] == 1
    refilled = slice(4, 8)
    mask = out["completion_mask"]
    pmask = out["prompt_mask"]
    assert [_row(out["prompt_ids"], i, pmask) for i in range(4, 8)] == [p["prompt_token_ids"] for p in llm.calls[1]]
    assert [_row(out["completion_ids"], i, mask) for i in range(4, 8)] == [p["token_ids"] for p in llm.calls[1]]
    for i, p in zip(range(4, 8), llm.calls[1]):
        torch.testing.assert_close(torch.tensor(_row(out["sampling_per_token_logps"], i, mask)),
                                   torch.tensor(p["logprobs"]), rtol=0, atol=1e-6)
    torch.testing.assert_close(out["importance_sampling_ratio"][refilled][mask[refilled].bool()],
                               torch.full((int(mask[refilled].sum()),), math.exp(-SHIFT)), rtol=5e-3, atol=0)


def test_resampling_without_is_correction(model_path, tmp_path, fake_llm):
    """vllm_importance_sampling_correction=False: TRL's batch has sampling log-probs but no ratio (and no
    old log-probs); the spliced rows still carry their own sampling log-probs, no sampling metric appears."""
    rows = make_prompt_rows(["hard", "easy"])
    batch = expand_groups(rows)
    trainer = _vllm_trainer(model_path, tmp_path, rows, resample_rounds=1, vllm_importance_sampling_correction=False)
    out = _step(trainer, batch)
    (llm,) = fake_llm.instances
    assert [len(c) for c in llm.calls] == [8, 4]
    assert "importance_sampling_ratio" not in out and "old_per_token_logps" not in out
    mask = out["completion_mask"]
    for i, p in enumerate(llm.calls[1] + llm.calls[0][4:]):
        assert _row(out["completion_ids"], i, mask) == p["token_ids"]
        torch.testing.assert_close(torch.tensor(_row(out["sampling_per_token_logps"], i, mask)),
                                   torch.tensor(p["logprobs"]), rtol=0, atol=1e-6)
    assert not any(k.startswith("sampling/") for k in trainer._metrics["train"])


@pytest.mark.parametrize("steps_per_generation", [1, 2])
def test_train_with_vllm_resampling_and_weights(model_path, tmp_path, fake_llm, steps_per_generation):
    """trainer.train() end to end through TRL's vLLM path: the spliced batch (with its per-sequence IS
    ratios) is shuffled, split and trained on; TRL re-syncs the engine's weights when the step changes."""
    rows = make_prompt_rows(["hard", "easy", "hard", "hard"])  # any 2 of these groups hold a hard one
    trainer = make_trainer(DifferADGRPOTrainer, model_path, [text_loc_reward, text_format_reward], rows, 8, tmp_path,
                           use_vllm=True, vllm_mode="colocate", resample_rounds=1, difficulty_weighting=True,
                           localization_reward="text_loc_reward", steps_per_generation=steps_per_generation,
                           beta=0.04)
    trainer.train()
    (llm,) = fake_llm.instances
    generations = 2 // steps_per_generation
    n_params = len(list(trainer.model.parameters()))
    assert llm.loader.loaded == generations * n_params  # one sync per generation batch, at a new step
    logs = [h for h in trainer.state.log_history if "loss" in h]
    generated = [h for h in logs if "reward" in h]
    assert len(logs) == 2 and len(generated) == generations
    for h in generated:
        assert h["differad/regenerations"] >= 1  # the hard groups went through the engine again
        assert 0.0 < h["sampling/importance_sampling_ratio/min"] <= h["sampling/importance_sampling_ratio/max"]
        assert torch.isfinite(torch.tensor(h["loss"]))
    calls = [len(c) for c in llm.calls]
    assert calls[0] == 8 * steps_per_generation and len(calls) == generations * 2  # a batch, then one round


def _splice_batch(c_width, n, ratio_width, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, c_width + 1, (n,), generator=g)
    mask = (torch.arange(c_width) < lengths.unsqueeze(1)).long()
    return {
        "prompt_ids": torch.randint(1, 9, (n, 3), generator=g),
        "prompt_mask": torch.ones(n, 3, dtype=torch.long),
        "completion_ids": torch.randint(1, 9, (n, c_width), generator=g) * mask,
        "completion_mask": mask,
        "sampling_per_token_logps": -torch.rand(n, c_width, generator=g) * mask,
        "importance_sampling_ratio": torch.rand(n, ratio_width, generator=g) + 0.5,
        "advantages": torch.randn(n, generator=g),
        "num_items_in_batch": torch.tensor(0),
    }


@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("c_dst,c_src", [(5, 3), (3, 6), (1, 1), (1, 4)])
def test_splice_rows_carries_vllm_keys(per_token, c_dst, c_src):
    dst = _splice_batch(c_dst, 4, c_dst if per_token else 1, 0)
    src = _splice_batch(c_src, 2, c_src if per_token else 1, 1)
    out = splice_rows(dst, src, torch.tensor([1, 3]), pad_token_id=0)
    width = max(c_dst, c_src)
    assert out["sampling_per_token_logps"].shape == (4, width)
    assert out["importance_sampling_ratio"].shape == (4, width if per_token else 1)
    for i, (ref, j) in enumerate([(dst, 0), (src, 0), (dst, 2), (src, 1)]):
        m = out["completion_mask"][i].bool()
        assert out["sampling_per_token_logps"][i][m].tolist() == ref["sampling_per_token_logps"][j][ref[
            "completion_mask"][j].bool()].tolist()
        r_out, r_ref = out["importance_sampling_ratio"][i], ref["importance_sampling_ratio"][j]
        assert r_out[: r_ref.numel()].tolist() == r_ref.tolist()
        assert (r_out[r_ref.numel():] == 1).all()  # padded token positions: exp(0), as TRL pads them


def test_vllm_server_layout_checked_at_start_up(model_path, tmp_path):
    """A vLLM server samples G completions per block of G gathered rows: generation batches per process that
    neither hold whole groups nor divide G could pair a regenerated row with another prompt's completions.
    (With one process TRL itself requires whole groups, so the refusal is reached with several.)"""
    def cfg(mode, per_device, steps=1, **rounds):
        values = {"use_vllm": True, "vllm_mode": mode, "num_generations": 4, "per_device_train_batch_size": per_device,
                  "steps_per_generation": steps, "resample_rounds": 0, "group_filter_refill_rounds": 0}
        return SimpleNamespace(**{**values, **rounds})

    with pytest.raises(ValueError, match=r"resample_rounds=1 with vllm_mode='server'.*= 6.*num_generations=4"):
        check_vllm_regeneration(cfg("server", 6, resample_rounds=1))
    with pytest.raises(ValueError, match=r"group_filter_refill_rounds=2 with vllm_mode='server'.*= 6"):
        check_vllm_regeneration(cfg("server", 3, steps=2, group_filter_refill_rounds=2))
    for mode, per_device, rounds in (("server", 8, 1), ("server", 2, 1), ("colocate", 6, 1), ("server", 6, 0)):
        check_vllm_regeneration(cfg(mode, per_device, resample_rounds=rounds))  # whole groups, a divisor, ...
    DifferADGRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], use_vllm=True, vllm_mode="server",
                       num_generations=4, per_device_train_batch_size=8, resample_rounds=1)  # accepted
    config = DifferADGRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], num_generations=4,
                                per_device_train_batch_size=8, resample_rounds=1)
    config.use_vllm, config.vllm_mode, config.per_device_train_batch_size = True, "server", 6
    from datasets import Dataset

    from differad_rl.integrations.qwen_vl.tiny import load_tiny_qwen_vl

    model, processor = load_tiny_qwen_vl(model_path)
    with pytest.raises(ValueError, match=r"vllm_mode='server'"):  # before TRL would wait for a server
        DifferADGRPOTrainer(model=model, processing_class=processor, reward_funcs=[text_loc_reward], args=config,
                            train_dataset=Dataset.from_list(make_prompt_rows(["easy"] * 2)))


def test_train_grpo_use_vllm_option(model_path, tmp_path, monkeypatch, fake_llm):
    """examples/trl/train_grpo.py --use-vllm / --vllm-mode: set in the config, refused at start-up where vLLM
    cannot run (CPU / tiny model) or where its own image processor would use another pixel budget."""
    from pathlib import Path

    from differad_rl.integrations.qwen_vl.loading import load_processor, set_pixel_budget
    from differad_rl.integrations.qwen_vl.tiny import load_tiny_qwen_vl

    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent / "examples" / "trl"))
    import train_grpo

    args = train_grpo.parse_args(["--paper", "--model", "Qwen/Qwen2.5-VL-3B-Instruct", "--use-vllm",
                                  "--vllm-mode", "server"])
    cfg = train_grpo.build_config(args, tmp_path, tiny=False, reward_names=["dclr", "format"])
    assert (cfg.use_vllm, cfg.vllm_mode, cfg.resample_rounds) == (True, "server", 1)
    plain = train_grpo.build_config(train_grpo.parse_args(["--paper"]), tmp_path, tiny=False,
                                    reward_names=["dclr", "format"])
    assert plain.use_vllm is False
    model, processor = load_tiny_qwen_vl(model_path)
    with pytest.raises(SystemExit, match="needs a GPU"):
        train_grpo.check_vllm_option(args, True, model, processor)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    processor = load_processor(model_path)
    train_grpo.check_vllm_option(args, False, model, processor)  # the folder's own budget: accepted
    set_pixel_budget(processor, None, 2 * 56 * 56)
    with pytest.raises(SystemExit, match=r"vLLM reads the image processor of .*--max-pixels"):
        train_grpo.check_vllm_option(args, False, model, processor)
