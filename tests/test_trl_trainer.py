"""DifferADGRPOTrainer on the REAL TRL 1.16 GRPOTrainer and the tiny offline Qwen2.5-VL (no mocks of TRL).

Generation steps are called directly (``_generate_and_score_completions`` on a hand-built generation
batch, as ``_prepare_inputs`` does) so the tests see the exact batch TRL would train on.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("trl")

from transformers import set_seed  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from differad_rl.groups import degenerate_groups, difficulty_weights  # noqa: E402
from differad_rl.integrations.qwen_vl.tiny import tiny_model_for  # noqa: E402
from differad_rl.integrations.trl import compat  # noqa: E402
from differad_rl.integrations.trl.config import DifferADGRPOConfig  # noqa: E402
from differad_rl.integrations.trl.trainer import DifferADGRPOTrainer, splice_rows, trl_advantages  # noqa: E402

from tests.trl_mp_worker import (  # noqa: E402
    G,
    ScriptedReward,
    expand_groups,
    make_prompt_rows,
    make_trainer,
    run_scripted_step,
    text_format_reward,
    text_loc_reward,
)


@pytest.fixture(scope="module")
def model_path():
    return tiny_model_for("qwen2_5_vl")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class SpyTrainer(DifferADGRPOTrainer):
    """Records what every scoring call saw and every regenerated sub-batch (no TRL behaviour changed)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scored_completions: list[list] = []
        self.sub_outputs: list[dict] = []

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        self.scored_completions.append(list(completions))
        return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)

    def _generate_captured(self, sub_inputs, mode):
        result = super()._generate_captured(sub_inputs, mode)
        self.sub_outputs.append(result[0])
        return result


def _step(trainer, batch, seed=0):
    trainer.model.train()
    torch.manual_seed(seed)
    return trainer._generate_and_score_completions(batch)


def _last(trainer, name):
    return trainer._metrics["train"][f"differad/{name}"][-1]


TEXT_REWARDS = [text_loc_reward, text_format_reward]


# ------------------------------------------------------------------------------------------ compat
def test_version_guard_and_internals():
    assert compat.check_trl_version() .startswith("1.16")
    with pytest.raises(ImportError, match=r"1\.15\.2.*|.*1\.15\.2") as err:
        compat.check_trl_version("1.15.2")
    assert ">=1.16.0,<1.17" in str(err.value)
    with pytest.raises(ImportError, match="1.17.0"):
        compat.check_trl_version("1.17.0")
    compat.check_trl_internals()  # the real GRPOTrainer still has what we override
    for name, params in compat.OVERRIDDEN_TRL_METHODS.items():
        assert tuple(inspect.signature(getattr(GRPOTrainer, name)).parameters) == params
        assert name in DifferADGRPOTrainer.__dict__  # and we really override each listed method

    class Changed(GRPOTrainer):
        def _calculate_rewards(self, inputs, prompts, completions):  # a signature from "another release"
            return None

    with pytest.raises(ImportError, match="_calculate_rewards"):
        compat.check_trl_internals(Changed)
    with pytest.raises(compat.UnsupportedOutputError, match="pixel_attention_mask"):
        compat.check_output_keys({"prompt_ids": None, "pixel_attention_mask": None})


# ------------------------------------------------------------------------------------------ config
def test_config_defaults_are_off_and_validated(tmp_path):
    cfg = DifferADGRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    assert (cfg.difficulty_weighting, cfg.resample_rounds, cfg.localization_reward) == (False, 0, None)
    assert (cfg.difficulty_tau, cfg.difficulty_scope, cfg.degenerate_tol) == (0.3, "group", 1e-6)
    assert not cfg.differad_active
    bad = {
        "difficulty_tau": 1.5,
        "difficulty_scope": "device",
        "resample_rounds": -1,
        "degenerate_tol": -1.0,
        "localization_reward": "",
        "difficulty_weighting": "yes",
    }
    for field, value in bad.items():
        with pytest.raises(ValueError, match=field):
            DifferADGRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], **{field: value})
    with pytest.raises(ValueError, match="resample_rounds"):
        DifferADGRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], resample_rounds=1.5)
    paper = DifferADGRPOConfig.paper(str(tmp_path), bf16=False, use_cpu=True, report_to=[])
    assert (paper.num_generations, paper.beta, paper.epsilon, paper.epsilon_high) == (8, 0.04, 0.2, 0.28)
    assert paper.difficulty_weighting and paper.resample_rounds == 1 and paper.mask_truncated_completions
    assert {f.name for f in dataclasses.fields(DifferADGRPOConfig)} > {f.name for f in dataclasses.fields(GRPOConfig)}


def test_unknown_localization_reward_lists_known(model_path, tmp_path):
    rows = make_prompt_rows(["easy"] * 2)
    with pytest.raises(ValueError, match=r"nope.*text_loc_reward.*text_format_reward"):
        make_trainer(DifferADGRPOTrainer, model_path, TEXT_REWARDS, rows, 8, tmp_path,
                     difficulty_weighting=True, localization_reward="nope")
    with pytest.raises(ValueError, match=r"typo.*text_loc_reward"):  # checked even with both features off
        make_trainer(DifferADGRPOTrainer, model_path, TEXT_REWARDS, rows, 8, tmp_path, localization_reward="typo")
    with pytest.raises(ValueError, match="ambiguous"):
        make_trainer(DifferADGRPOTrainer, model_path, TEXT_REWARDS, rows, 8, tmp_path, resample_rounds=1)
    # one reward function: it is the localization reward; features off: no name needed
    make_trainer(DifferADGRPOTrainer, model_path, [text_loc_reward], rows, 8, tmp_path, difficulty_weighting=True)
    make_trainer(DifferADGRPOTrainer, model_path, TEXT_REWARDS, rows, 8, tmp_path)


# ----------------------------------------------------------------------------------- equivalence
def test_everything_off_equals_plain_grpo(model_path, tmp_path):
    rows = make_prompt_rows(["easy", "hard", "easy", "hard"])
    batch = expand_groups(rows)
    plain = make_trainer(GRPOTrainer, model_path, TEXT_REWARDS, rows, 16, tmp_path / "plain")
    ours = make_trainer(DifferADGRPOTrainer, model_path, TEXT_REWARDS, rows, 16, tmp_path / "ours")
    a, b = _step(plain, batch), _step(ours, batch)
    assert set(a) == set(b)
    for key in a:
        if isinstance(a[key], torch.Tensor):
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
        else:
            assert a[key] == b[key], key
    # and the losses of a full 2-step training run
    set_seed(0)
    plain.train()
    set_seed(0)
    ours.train()
    la = [h["loss"] for h in plain.state.log_history if "loss" in h]
    lb = [h["loss"] for h in ours.state.log_history if "loss" in h]
    assert len(la) == 2 and la == lb
    assert not any(k.startswith("differad/") for h in ours.state.log_history for k in h)


@pytest.mark.parametrize(
    "scale,aggregation",
    [("group", "sum_then_normalize"), ("batch", "sum_then_normalize"), ("none", "sum_then_normalize"),
     ("group", "normalize_then_sum")],
)
def test_trl_advantages_match_trl(model_path, tmp_path, scale, aggregation):
    rows = make_prompt_rows(["easy", "hard", "easy"])
    trainer = make_trainer(DifferADGRPOTrainer, model_path, TEXT_REWARDS, rows, 12, tmp_path,
                           scale_rewards=scale, multi_objective_aggregation=aggregation, reward_weights=[1.0, 0.5])
    out = _step(trainer, expand_groups(rows))
    adv, _ = trl_advantages(trainer._last_rewards_per_func, trainer.reward_weights, G, scale, aggregation)
    torch.testing.assert_close(out["advantages"], adv, rtol=0, atol=0)


@pytest.mark.parametrize("scope", ["group", "batch"])
def test_weights_times_trl_advantages(model_path, tmp_path, scope):
    rows = make_prompt_rows(["easy", "hard", "easy", "hard"])
    batch = expand_groups(rows)
    plain = make_trainer(GRPOTrainer, model_path, TEXT_REWARDS, rows, 16, tmp_path / "plain")
    ours = make_trainer(DifferADGRPOTrainer, model_path, TEXT_REWARDS, rows, 16, tmp_path / "ours",
                        difficulty_weighting=True, difficulty_scope=scope, localization_reward="text_loc_reward")
    a, b = _step(plain, batch), _step(ours, batch)
    torch.testing.assert_close(a["completion_ids"], b["completion_ids"], rtol=0, atol=0)
    loc = ours._last_rewards_per_func[:, 0]
    w = difficulty_weights(loc, G, tau=0.3, scope=scope)
    torch.testing.assert_close(b["advantages"], w * a["advantages"])
    assert torch.all(w >= 1.0) and torch.all(w <= 2.07)
    # hard groups (all 0: α = 0, β = 1) get the largest weight (e + √2) / 2
    if scope == "group":
        hard = torch.tensor([r["kind"] == "hard" for r in batch])
        torch.testing.assert_close(w[hard], torch.full_like(w[hard], (torch.e + 2**0.5) / 2))
    assert _last(ours, "weight_mean") == pytest.approx(w.mean().item())
    assert _last(ours, "weight_max") == pytest.approx(w.max().item())
    assert _last(ours, "degenerate_before") == pytest.approx(0.5)


# ------------------------------------------------------------------------------------ resampling
def test_resampling_regenerates_only_degenerate_groups(model_path, tmp_path):
    rows = make_prompt_rows(["easy", "hard", "easy", "hard"])
    batch = expand_groups(rows)
    hard = torch.tensor([r["kind"] == "hard" for r in batch])
    trainer = make_trainer(SpyTrainer, model_path, TEXT_REWARDS, rows, 16, tmp_path, resample_rounds=3,
                           localization_reward="text_loc_reward")
    out = _step(trainer, batch)
    # hard groups are always degenerate: exactly K rounds, 2 groups each round
    assert _last(trainer, "rounds_used") == 3
    assert _last(trainer, "groups_resampled") == 2
    assert _last(trainer, "regenerations") == 6
    assert _last(trainer, "degenerate_before") == pytest.approx(0.5)
    assert _last(trainer, "degenerate_after") == pytest.approx(0.5)
    assert len(trainer.scored_completions) == 4  # the batch + 3 rounds
    assert all(len(c) == int(hard.sum()) for c in trainer.scored_completions[1:])  # only their rows
    # final batch: easy rows from the first generation, hard rows from the last round, in order
    texts = trainer.processing_class.batch_decode(out["completion_ids"], skip_special_tokens=True)
    first = [c[0]["content"] for c in trainer.scored_completions[0]]
    last = iter(c[0]["content"] for c in trainer.scored_completions[-1])
    expected = [next(last) if h else f for f, h in zip(first, hard.tolist())]
    assert texts == expected
    # advantages recomputed with TRL's semantics from the spliced rewards; loss tokens recounted
    rpf = trainer._last_rewards_per_func
    adv, _ = trl_advantages(rpf, trainer.reward_weights, G, trainer.scale_rewards)
    torch.testing.assert_close(out["advantages"], adv)
    last_fmt = torch.tensor(text_format_reward(trainer.scored_completions[-1]))
    torch.testing.assert_close(rpf[hard, 1], last_fmt)
    assert int(out["num_items_in_batch"]) == int(out["completion_mask"].sum())
    assert out["pixel_values"].size(0) == int(out["image_grid_thw"].prod(-1).sum())
    assert out["num_images"] == [2] * len(batch)
    # the TRL reward metric of the step is the post-resampling one
    assert trainer._metrics["train"]["reward"][-1] == pytest.approx(
        (rpf * trainer.reward_weights).sum(1).mean().item(), rel=1e-6
    )


def test_resampling_statistics_with_recovering_groups(model_path, tmp_path):
    rows = make_prompt_rows(["always", "once", "easy", "easy"])
    trainer = make_trainer(DifferADGRPOTrainer, model_path, [ScriptedReward(True), ScriptedReward(False)], rows, 16,
                           tmp_path, resample_rounds=2, difficulty_weighting=True,
                           localization_reward="scripted_loc_reward")
    res = run_scripted_step(trainer, rows, rank=0, world=1)
    m = res["metrics"]
    assert (m["differad/rounds_used"], m["differad/groups_resampled"], m["differad/regenerations"]) == (2, 2, 3)
    assert (m["differad/degenerate_before"], m["differad/degenerate_after"]) == (0.5, 0.25)
    loc = torch.tensor(res["rewards_per_func"])[:, 0]
    assert degenerate_groups(loc, G).tolist() == [True, False, False, False]


class LoggingLocReward:
    """``text_loc_reward`` that also logs through TRL's ``log_metric`` / ``log_extra`` (values of the texts)."""

    __name__ = "logging_loc_reward"

    def __call__(self, completions, kind, log_metric=None, log_extra=None, **kwargs):
        chars = [len(c[0]["content"]) for c in completions]
        log_metric("logged/mean_chars", sum(chars) / len(chars))
        log_extra("chars", chars)
        return text_loc_reward(completions, kind)


def test_resampling_relogs_every_metric_from_the_final_batch(model_path, tmp_path):
    # after resampling, the step's logs are the final batch's, not the first generation's
    rows = make_prompt_rows(["easy", "hard", "easy", "hard"])
    batch = expand_groups(rows)
    trainer = make_trainer(SpyTrainer, model_path, [LoggingLocReward(), text_format_reward], rows, 16, tmp_path,
                           resample_rounds=2, localization_reward="logging_loc_reward", max_completion_length=6)
    missing = [a for a in compat.RELIED_TRL_ATTRIBUTES if not hasattr(trainer, a)]
    assert missing == []  # what the relogging reads off TRL's trainer is still there
    # a third of the vocabulary ends a completion, so lengths and clipping vary (a random model never says EOS)
    stop = sorted({*trainer.eos_token_ids, *range(100, 300)})
    trainer.eos_token_ids = stop
    trainer.generation_config.eos_token_id = stop
    trainer.generation_kwargs["eos_token_id"] = stop
    before = trainer.state.num_input_tokens_seen
    out = _step(trainer, batch)
    assert _last(trainer, "regenerations") == 4
    m = trainer._metrics["train"]
    texts = trainer.processing_class.batch_decode(out["completion_ids"], skip_special_tokens=True)
    chars = [len(t) for t in texts]
    first = [len(c[0]["content"]) for c in trainer.scored_completions[0]]
    assert chars != first  # the hard rows changed, so stale values would differ
    # the reward's own log_metric / log_extra: one value for the step, the final batch's
    assert m["logged/mean_chars"] == [pytest.approx(sum(chars) / len(chars))]
    assert list(trainer._logs["extra"]["chars"]) == chars
    assert [c[0]["content"] for c in trainer._logs["completion"]] == texts
    # completion lengths and clipped ratio from the final rows (TRL: ids up to and including EOS)
    lengths = out["completion_mask"].sum(1).float()
    eos = set(stop) | {trainer.processing_class.tokenizer.pad_token_id}
    last_tok = out["completion_ids"].gather(1, (lengths.long() - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    clipped = torch.tensor([t not in eos for t in last_tok.tolist()])
    assert clipped.any() and not clipped.all()  # both kinds present, so the ratio can be wrong
    assert m["completions/mean_length"][-1] == pytest.approx(lengths.mean().item())
    assert (m["completions/min_length"][-1], m["completions/max_length"][-1]) == (lengths.min(), lengths.max())
    assert m["completions/clipped_ratio"][-1] == pytest.approx(clipped.float().mean().item())
    assert m["completions/mean_terminated_length"][-1] == pytest.approx(lengths[~clipped].mean().item())
    # tokens: the final batch's prompt + completion tokens once (regenerated and replaced rows not counted)
    tokens = int(out["prompt_mask"].sum() + out["completion_mask"].sum())
    assert trainer.state.num_input_tokens_seen - before == tokens
    assert m["num_tokens"] == [trainer.state.num_input_tokens_seen]
    for name in ("completions/mean_length", "completions/clipped_ratio", "reward"):
        assert len(m[name]) == 1, name  # replaced, not appended


def test_no_degenerate_group_means_no_round(model_path, tmp_path):
    rows = make_prompt_rows(["easy", "easy", "easy"])
    batch = expand_groups(rows)
    plain = make_trainer(GRPOTrainer, model_path, TEXT_REWARDS, rows, 12, tmp_path / "plain")
    trainer = make_trainer(SpyTrainer, model_path, TEXT_REWARDS, rows, 12, tmp_path / "ours", resample_rounds=4,
                           localization_reward="text_loc_reward")
    a, b = _step(plain, batch), _step(trainer, batch)
    assert _last(trainer, "rounds_used") == 0 and _last(trainer, "regenerations") == 0
    assert _last(trainer, "degenerate_before") == 0.0 and trainer.sub_outputs == []
    torch.testing.assert_close(a["advantages"], b["advantages"], rtol=0, atol=0)


def test_spliced_rows_have_the_logps_of_their_sub_batch(model_path, tmp_path):
    # hard prompts are the short ones: the sub-batch has a narrower prompt width than the batch
    rows = make_prompt_rows(["hard", "easy", "easy", "hard"])
    batch = expand_groups(rows)
    hard = torch.tensor([r["kind"] == "hard" for r in batch])
    trainer = make_trainer(SpyTrainer, model_path, TEXT_REWARDS, rows, 16, tmp_path, resample_rounds=1,
                           localization_reward="text_loc_reward")
    out = _step(trainer, batch)
    sub = trainer.sub_outputs[-1]
    assert sub["prompt_ids"].size(1) < out["prompt_ids"].size(1)

    def logps(o):
        ids = torch.cat([o["prompt_ids"], o["completion_ids"]], 1)
        mask = torch.cat([o["prompt_mask"], o["completion_mask"]], 1)
        with torch.no_grad():
            lp, _, _ = trainer._get_per_token_logps_and_entropies(
                trainer.model, ids, mask, o["completion_ids"].size(1), pixel_values=o["pixel_values"],
                image_grid_thw=o["image_grid_thw"], num_images=o["num_images"],
                mm_token_type_ids=o.get("mm_token_type_ids"),
            )
        return lp * o["completion_mask"]

    trainer.model.eval()
    full, own = logps(out)[hard], logps(sub)[: int(hard.sum())]
    width = own.size(1)
    torch.testing.assert_close(full[:, :width], own, rtol=1e-4, atol=1e-5)
    assert torch.all(full[:, width:] == 0)
    assert (own != 0).any()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_resampling_splices_every_family(family, tmp_path):
    rows = make_prompt_rows(["hard", "easy", "easy"], size=64)
    batch = expand_groups(rows)
    trainer = make_trainer(SpyTrainer, tiny_model_for(family), TEXT_REWARDS, rows, 12, tmp_path, resample_rounds=1,
                           difficulty_weighting=True, localization_reward="text_loc_reward")
    out = _step(trainer, batch)
    assert _last(trainer, "rounds_used") == 1 and _last(trainer, "groups_resampled") == 1
    texts = trainer.processing_class.batch_decode(out["completion_ids"][:G], skip_special_tokens=True)
    assert texts == [c[0]["content"] for c in trainer.scored_completions[-1]]
    assert out["pixel_values"].size(0) == int(out["image_grid_thw"].prod(-1).sum())
    if "mm_token_type_ids" in out:
        width = out["prompt_ids"].size(1) + out["completion_ids"].size(1)
        assert out["mm_token_type_ids"].shape == (len(batch), width)
        # image tokens sit in the prompt part only, where the prompt ids are image pads
        assert not out["mm_token_type_ids"][:, out["prompt_ids"].size(1):].any()
        pad_id = trainer.processing_class.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        is_image = out["prompt_ids"] == pad_id
        assert torch.equal(out["mm_token_type_ids"][:, : out["prompt_ids"].size(1)] == 1, is_image)


def _padded(lengths, width, left, value, seed):
    gen = torch.Generator().manual_seed(seed)
    out = torch.full((len(lengths), width), value, dtype=torch.long)
    for i, n in enumerate(lengths):
        body = torch.randint(1, 100, (n,), generator=gen)
        if left:
            out[i, width - n:] = body
        else:
            out[i, :n] = body
    return out


def _unpad(row, mask):
    return row[mask.bool()].tolist()


@settings(max_examples=40, deadline=None)
@given(
    dst_p=st.lists(st.integers(1, 6), min_size=2, max_size=6),
    dst_c=st.data(),
    src_n=st.integers(1, 3),
    data=st.data(),
)
def test_splice_rows_property(dst_p, dst_c, src_n, data):
    """Every row of the spliced batch holds exactly the unpadded tokens, masks, log-probs and pixel rows
    of the row it came from, whatever the two batches' padded widths."""
    b = len(dst_p)
    src_n = min(src_n, b)
    c_lens = dst_c.draw(st.lists(st.integers(1, 6), min_size=b, max_size=b))
    s_p = data.draw(st.lists(st.integers(1, 8), min_size=src_n, max_size=src_n))
    s_c = data.draw(st.lists(st.integers(1, 8), min_size=src_n, max_size=src_n))
    rows = torch.tensor(sorted(data.draw(st.lists(st.integers(0, b - 1), min_size=src_n, max_size=src_n,
                                                  unique=True))))

    def batch(p_lens, c_lens, seed):
        pw, cw = max(p_lens), max(c_lens)
        n = len(p_lens)
        grids = torch.tensor([[1, 2, 2 + (seed + i) % 3] for i in range(2 * n)])
        return {
            "prompt_ids": _padded(p_lens, pw, True, 0, seed),
            "prompt_mask": _padded(p_lens, pw, True, 0, seed).ne(0).long(),
            "completion_ids": _padded(c_lens, cw, False, 0, seed + 1),
            "completion_mask": _padded(c_lens, cw, False, 0, seed + 1).ne(0).long(),
            "old_per_token_logps": _padded(c_lens, cw, False, 0, seed + 1).float() / -10,
            "mm_token_type_ids": torch.cat([_padded(p_lens, pw, True, 0, seed).remainder(2), torch.zeros(n, cw,
                                            dtype=torch.long)], 1),
            "advantages": torch.arange(n, dtype=torch.float32) + seed,
            "pixel_values": torch.randn(int(grids.prod(-1).sum()), 3),
            "image_grid_thw": grids,
            "num_images": [2] * n,
            "num_items_in_batch": torch.tensor(0),
        }

    dst, src = batch(dst_p, c_lens, 0), batch(s_p, s_c, 100)
    out = splice_rows(dst, src, rows, pad_token_id=0)
    origin = {r: (src, j) for j, r in enumerate(rows.tolist())}
    pv_out = torch.split(out["pixel_values"], [int(g.prod(-1).sum()) for g in out["image_grid_thw"].split(2)])
    for i in range(b):
        ref, j = origin.get(i, (dst, i))
        for key, mask in (("prompt_ids", "prompt_mask"), ("completion_ids", "completion_mask"),
                          ("old_per_token_logps", "completion_mask")):
            assert _unpad(out[key][i], out[mask][i]) == _unpad(ref[key][j], ref[mask][j])
        p_out, p_ref = out["prompt_ids"].size(1), ref["prompt_ids"].size(1)
        assert _unpad(out["mm_token_type_ids"][i, :p_out], out["prompt_mask"][i]) == _unpad(
            ref["mm_token_type_ids"][j, :p_ref], ref["prompt_mask"][j])
        assert out["advantages"][i] == ref["advantages"][j]
        pv_ref = torch.split(ref["pixel_values"], [int(g.prod(-1).sum()) for g in ref["image_grid_thw"].split(2)])
        assert torch.equal(pv_out[i], pv_ref[j])
    assert out["prompt_ids"].size(1) == max(max(dst_p), max(s_p))
    assert out["completion_ids"].size(1) == out["old_per_token_logps"].size(1) == max(max(c_lens), max(s_c))
    assert out["mm_token_type_ids"].size(1) == out["prompt_ids"].size(1) + out["completion_ids"].size(1)


def test_splice_rows_rejects_unknown_keys():
    dst = {"prompt_ids": torch.zeros(2, 3, dtype=torch.long), "surprise": torch.zeros(2)}
    with pytest.raises(compat.UnsupportedOutputError, match="surprise"):
        splice_rows(dst, dict(dst), torch.tensor([0]), pad_token_id=0)


@pytest.mark.parametrize("steps_per_generation,beta", [(1, 0.0), (2, 0.04)])
def test_train_with_weights_and_resampling_logs_metrics(model_path, tmp_path, steps_per_generation, beta):
    # steps_per_generation=2: one generation batch of 4 groups, shuffled and split over 2 optimiser steps;
    # with it TRL also computes old log-probs, and beta > 0 reference log-probs: both are spliced
    rows = make_prompt_rows(["easy", "hard", "easy", "hard"])
    trainer = make_trainer(DifferADGRPOTrainer, model_path, TEXT_REWARDS, rows, 8, tmp_path, resample_rounds=1,
                           difficulty_weighting=True, localization_reward="text_loc_reward",
                           steps_per_generation=steps_per_generation, beta=beta, mask_truncated_completions=beta > 0)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    generated = [h for h in logs if "reward" in h]  # like TRL's own reward metrics: steps that generated
    assert len(generated) == 2 // steps_per_generation
    for h in generated:
        for name in ("weight_mean", "weight_max", "degenerate_before", "degenerate_after", "groups_resampled",
                     "rounds_used", "regenerations"):
            assert f"differad/{name}" in h, name
        assert 1.0 <= h["differad/weight_mean"] <= h["differad/weight_max"] <= 2.07
        assert torch.isfinite(torch.tensor(h["loss"]))
    assert sum(h["differad/rounds_used"] for h in generated) >= 1  # the 2 hard prompts were resampled


# ------------------------------------------------------------------ start-up refusals
def _box_rows(n=2):
    rows = make_prompt_rows(["easy"] * n)
    return [{**r, "solution": [4.0, 4.0, 20.0, 20.0], "image_size": [56, 56]} for r in rows]


def _processor(model_path):
    from differad_rl.integrations.qwen_vl.tiny import load_tiny_qwen_vl

    return load_tiny_qwen_vl(model_path)[1]


def test_format_reward_is_never_the_localization_reward(model_path, tmp_path):
    """item 3: `--rewards format,iou` used to make the format reward the localization reward."""
    from differad_rl.integrations.trl import differad_rewards, localization_reward_name

    names = ["format", "iou"]
    funcs = differad_rewards(_processor(model_path), names=names)
    with pytest.raises(ValueError, match=r"localization_reward='format_reward' is the format reward.*box reward"):
        make_trainer(DifferADGRPOTrainer, model_path, funcs, _box_rows(), 8, tmp_path,
                     difficulty_weighting=True, localization_reward="format_reward")
    assert localization_reward_name(names) == "iou_reward"
    assert localization_reward_name(["format", "iou", "dclr"]) == "dclr_reward"
    with pytest.raises(ValueError, match="no box reward"):
        localization_reward_name(["format"])
    trainer = make_trainer(DifferADGRPOTrainer, model_path, funcs, _box_rows(), 8, tmp_path,
                           difficulty_weighting=True, localization_reward=localization_reward_name(names))
    assert trainer._loc_index == 1


def test_two_rewards_with_one_name_are_refused(model_path, tmp_path):
    """item 4: two DCLR variants named alike silently resolved to the first."""
    from differad_rl.integrations.trl import get_reward

    processor = _processor(model_path)
    paper = get_reward("dclr", processor)
    enclosing = get_reward("dclr", processor, center_norm="enclosing")
    with pytest.raises(ValueError, match=r"2 reward functions have this name.*distinct name"):
        make_trainer(DifferADGRPOTrainer, model_path, [paper, enclosing], _box_rows(), 8, tmp_path,
                     difficulty_weighting=True, localization_reward="dclr_reward")
    renamed = get_reward("dclr", processor, center_norm="enclosing", name="dclr_enclosing_reward")
    trainer = make_trainer(DifferADGRPOTrainer, model_path, [paper, renamed], _box_rows(), 8, tmp_path,
                           difficulty_weighting=True, localization_reward="dclr_enclosing_reward")
    assert trainer._loc_index == 1 and trainer.reward_func_names == ["dclr_reward", "dclr_enclosing_reward"]


def test_resampling_with_rollout_func_refused_before_trl_builds_anything(model_path, tmp_path):
    """Refused by the trainer before GRPOTrainer.__init__. (vLLM is supported:
    tests/test_trl_vllm.py; a vLLM server layout it cannot regenerate is refused there.)"""
    cfg = DifferADGRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], resample_rounds=1,
                             num_generations=G, per_device_train_batch_size=8)
    from datasets import Dataset

    from differad_rl.integrations.qwen_vl.tiny import load_tiny_qwen_vl

    model, processor = load_tiny_qwen_vl(model_path)
    with pytest.raises(ValueError, match=r"not supported together with rollout_func"):
        DifferADGRPOTrainer(model=model, processing_class=processor, reward_funcs=[text_loc_reward], args=cfg,
                            train_dataset=Dataset.from_list(make_prompt_rows(["easy"] * 2)),
                            rollout_func=lambda prompts, trainer: {})


def test_dataset_columns_checked_at_start_up(model_path, tmp_path):
    """item 7: a dataset without `solution` failed with a TypeError after the first generation."""
    from differad_rl.integrations.trl import differad_rewards

    funcs = differad_rewards(_processor(model_path))
    rows = [{k: v for k, v in r.items() if k != "solution"} for r in _box_rows()]
    with pytest.raises(ValueError, match=r"no 'solution' column, which reward 'dclr_reward' reads.*to_trl_dataset"):
        make_trainer(DifferADGRPOTrainer, model_path, funcs, rows, 8, tmp_path)
    rows = [{k: v for k, v in r.items() if k not in ("image_size", "images")} for r in _box_rows()]
    with pytest.raises(ValueError, match=r"neither an 'image_size' column nor an 'images'"):
        make_trainer(DifferADGRPOTrainer, model_path, funcs, rows, 8, tmp_path)


def test_image_paths_are_measured_and_cross_checked(tmp_path):
    """item 7: images given as paths (TRL accepts them) are measured, and cross-checked with image_size."""
    from PIL import Image

    from differad_rl.integrations.trl import target_image_sizes

    ref, tgt = tmp_path / "ref.png", tmp_path / "tgt.png"
    Image.new("RGB", (40, 30)).save(ref)
    Image.new("RGB", (64, 48)).save(tgt)
    images = [[str(ref), str(tgt)], [{"path": str(ref)}, f"file://{tgt}"], [ref, {"bytes": tgt.read_bytes()}]]
    assert target_image_sizes(3, images=images).tolist() == [[64, 48]] * 3
    with pytest.raises(ValueError, match=r"sample 0: image_size=\[60, 48\] but the target image is 64x48"):
        target_image_sizes(1, image_size=[[60, 48]], images=images[:1])
    with pytest.raises(ValueError, match=r"sample 0: no 'image_size' column, and the target \(last\) image is a int"):
        target_image_sizes(1, images=[[3]])
    with pytest.raises(ValueError, match=r"sample 0: no 'image_size' column and no 'images' / 'image' column"):
        target_image_sizes(1)
    with pytest.raises(ValueError, match="cannot open the target image"):
        target_image_sizes(1, images=[[str(tmp_path / "missing.png")]])


def test_a_right_padded_processor_is_made_left_padded(tmp_path):
    """The trainer never trains with a right-padded Qwen-VL processor."""
    from differad_rl.integrations.qwen_vl.tiny import load_tiny_processor, tiny_model_for
    from differad_rl.integrations.trl.trainer import _check_before_build

    proc = load_tiny_processor(tiny_model_for("qwen2_5_vl"))
    proc.tokenizer.padding_side = "right"
    with pytest.warns(UserWarning, match="pads on the right"):
        _check_before_build(processing_class=proc)
    assert proc.tokenizer.padding_side == "left"
