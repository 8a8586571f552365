"""The peers' strategies in DifferADGRPOTrainer, on the REAL TRL 1.16 GRPOTrainer and the tiny Qwen2.5-VL."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")

from trl import GRPOTrainer  # noqa: E402

from differad_rl.group_filters import no_correct_groups, out_of_band_groups, zero_variance_groups  # noqa: E402
from differad_rl.group_weights import mean_reward_weight, wrong_share_weights  # noqa: E402
from differad_rl.integrations.qwen_vl.tiny import load_tiny_qwen_vl, tiny_model_for  # noqa: E402
from differad_rl.integrations.trl import differad_rewards  # noqa: E402
from differad_rl.integrations.trl.config import DifferADGRPOConfig  # noqa: E402
from differad_rl.integrations.trl.rewards import PEER_REWARD_FACTORIES, reward_names  # noqa: E402
from differad_rl.integrations.trl.trainer import DifferADGRPOTrainer  # noqa: E402

from tests.trl_mp_worker import G, expand_groups, make_prompt_rows, make_trainer, text_format_reward  # noqa: E402

_VALUES = {"hard": [0.0] * G, "wrong": [0.1, 0.2, 0.0, 0.1], "flat": [0.8] * G, "easy": [0.2, 0.9, 0.6, 1.0]}


class KindReward:
    """Localization stand-in by prompt kind and position in the group (groups are contiguous in every
    scoring call, regenerated sub-batches included); records the kinds it scored on every call."""

    __name__ = "kind_loc_reward"

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, completions, kind, **kwargs):
        self.calls.append(list(kind))
        return [_VALUES[k][i % G] for i, k in enumerate(kind)]


@pytest.fixture(scope="module")
def model_path():
    return tiny_model_for("qwen2_5_vl")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _step(trainer, batch, seed=0):
    trainer.model.train()
    torch.manual_seed(seed)
    return trainer._generate_and_score_completions(batch)


def _last(trainer, name):
    return trainer._metrics["train"][f"differad/{name}"][-1]


def test_config_fields_default_off_and_validate(tmp_path):
    cfg = DifferADGRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    assert (cfg.advantage_weighting, cfg.degeneracy_rule, cfg.group_filter) == (None, "differad", None)
    assert (cfg.correct_threshold, cfg.univg_form, cfg.univg_power) == (0.0, "power", 1.0)
    assert (cfg.group_filter_low, cfg.group_filter_high) == (0.01, 0.99)
    on = DifferADGRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], advantage_weighting="differad")
    assert on.difficulty_weighting is True
    bad = {
        "advantage_weighting": "dapo",
        "univg_form": "sqrt",
        "degeneracy_rule": "dapo",
        "group_filter": "emit",
        "correct_threshold": float("nan"),
        "group_filter_low": 0.99,
    }
    for name, value in bad.items():
        with pytest.raises(ValueError, match=name):
            DifferADGRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], **{name: value})
    with pytest.raises(ValueError, match="two weightings"):
        DifferADGRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], advantage_weighting="emit",
                           difficulty_weighting=True)


@pytest.mark.parametrize("weighting", ["emit", "univg"])
def test_peer_weights_times_trl_advantages(model_path, tmp_path, weighting):
    rows = make_prompt_rows(["hard", "wrong", "flat", "easy"])
    batch = expand_groups(rows)
    rewards = [KindReward(), text_format_reward]
    plain = make_trainer(GRPOTrainer, model_path, rewards, rows, 16, tmp_path / "plain")
    ours = make_trainer(DifferADGRPOTrainer, model_path, [KindReward(), text_format_reward], rows, 16,
                        tmp_path / "ours", advantage_weighting=weighting, correct_threshold=0.5, univg_form="exp",
                        localization_reward="kind_loc_reward")
    a, b = _step(plain, batch), _step(ours, batch)
    loc = ours._last_rewards_per_func[:, 0]
    if weighting == "emit":
        w = wrong_share_weights(loc, G, 0.5)
        assert w.view(-1, G)[:, 0].tolist() == [1.0, 1.0, 1.0, 1.25]  # all wrong → 1; easy: 1 of 4 wrong
    else:
        w = mean_reward_weight(loc, "exp").expand(loc.numel())
        assert float(w[0]) == pytest.approx(torch.exp(1 - loc.mean()).item())
    torch.testing.assert_close(b["advantages"], w * a["advantages"])
    assert _last(ours, "weight_max") == pytest.approx(w.max().item())


@pytest.mark.parametrize("rule, expected", [("differad", ["hard", "flat"]), ("emit", ["hard", "wrong"])])
def test_degeneracy_rule_picks_the_groups_resampling_regenerates(model_path, tmp_path, rule, expected):
    rows = make_prompt_rows(["hard", "wrong", "flat", "easy"])
    reward = KindReward()
    trainer = make_trainer(DifferADGRPOTrainer, model_path, [reward, text_format_reward], rows, 16, tmp_path,
                           resample_rounds=2, degeneracy_rule=rule, correct_threshold=0.5,
                           localization_reward="kind_loc_reward")
    _step(trainer, expand_groups(rows))
    assert len(reward.calls) == 3  # the batch + K = 2 rounds (the kinds' rewards never change)
    assert sorted(set(reward.calls[1])) == sorted(expected) and len(reward.calls[1]) == 2 * G
    assert (_last(trainer, "rounds_used"), _last(trainer, "groups_resampled")) == (2, 2)
    if rule == "emit":
        loc = trainer._last_rewards_per_func[:, 0]
        assert no_correct_groups(loc, G, 0.5).tolist() == [True, True, False, False]


@pytest.mark.parametrize("name, dropped", [("dapo", ["hard", "flat"]), ("easyr1", ["hard"])])
def test_group_filter_drops_groups_from_the_loss(model_path, tmp_path, name, dropped):
    rows = make_prompt_rows(["hard", "wrong", "flat", "easy"])
    batch = expand_groups(rows)
    trainer = make_trainer(DifferADGRPOTrainer, model_path, [KindReward(), text_format_reward], rows, 16, tmp_path,
                           group_filter=name, localization_reward="kind_loc_reward")
    out = _step(trainer, batch)
    gone = torch.tensor([r["kind"] in dropped for r in batch])
    assert torch.all(out["advantages"][gone] == 0) and torch.all(out["completion_mask"][gone] == 0)
    assert bool(out["completion_mask"][~gone].any())
    assert int(out["num_items_in_batch"]) == int(out["completion_mask"].sum())
    assert _last(trainer, "filtered") == pytest.approx(len(dropped) / 4)


@pytest.mark.parametrize("name, rule", [("dapo", zero_variance_groups), ("easyr1", out_of_band_groups)])
def test_group_filter_refill_replaces_filtered_groups_with_new_prompts(model_path, tmp_path, name, rule):
    # the batch's 4 prompts, then 12 more in the training set; each prompt's text names its row
    rows = make_prompt_rows(["hard", "wrong", "flat", "easy"] + ["easy", "wrong", "hard", "flat"] * 3)
    for i, row in enumerate(rows):
        row["prompt"] = [{"role": "user", "content": f"Find the difference in item {i}."}]
    reward = KindReward()
    trainer = make_trainer(DifferADGRPOTrainer, model_path, [reward, text_format_reward], rows, 16, tmp_path,
                           group_filter=name, group_filter_refill_rounds=3, localization_reward="kind_loc_reward")
    batch = expand_groups(rows[:4])
    out = _step(trainer, batch)
    loc = lambda kinds: torch.tensor([_VALUES[k][i % G] for i, k in enumerate(kinds)])  # noqa: E731
    first = rule(loc(reward.calls[0]), G)
    assert first.any()
    # each round regenerates exactly the groups the rule still selects, as whole groups of one new prompt
    selected = int(first.sum())
    for call in reward.calls[1:]:
        assert len(call) == selected * G
        assert all(len(set(call[j * G:(j + 1) * G])) == 1 for j in range(selected))
        selected = int(rule(loc(call), G).sum())
    assert _last(trainer, "refill_rounds_used") == len(reward.calls) - 1 <= 3
    assert _last(trainer, "refills") == sum(len(c) for c in reward.calls[1:]) / G
    # the final batch: kept groups untouched, refilled groups hold their new prompt's text and rewards
    texts = trainer.processing_class.batch_decode(out["prompt_ids"], skip_special_tokens=True)
    items = [int(t.rsplit("item ", 1)[1].split(".")[0]) for t in texts]
    kinds = [rows[i]["kind"] for i in items]
    for j in range(4):
        group = items[j * G:(j + 1) * G]
        assert len(set(group)) == 1
        if not bool(first[j]):
            assert group[0] == j  # kept
    refilled = [j for j in range(4) if bool(first[j])]
    assert any(items[j * G] != j for j in refilled) or len(reward.calls) == 1
    final = rule(loc(kinds), G)
    torch.testing.assert_close(trainer._last_rewards_per_func[:, 0], loc(kinds))
    # groups still filtered after the rounds are dropped from the loss, as without refill
    gone = final.repeat_interleave(G)
    assert torch.all(out["advantages"][gone] == 0) and torch.all(out["completion_mask"][gone] == 0)
    assert _last(trainer, "filtered") == pytest.approx(final.float().mean().item())
    logged = [[c["text"] for c in p[0]["content"] if c["type"] == "text"] for p in trainer._logs["prompt"]]
    assert logged == [[rows[i]["prompt"][0]["content"]] for i in items]  # the completions table's prompts


def test_group_filter_refill_is_validated(tmp_path):
    with pytest.raises(ValueError, match="group_filter_refill_rounds=2.*group_filter=None"):
        DifferADGRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], group_filter_refill_rounds=2)
    with pytest.raises(ValueError, match="group_filter_refill_rounds must be an int >= 0"):
        DifferADGRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], group_filter="dapo",
                           group_filter_refill_rounds=-1)


def test_training_runs_with_every_peer_option(model_path, tmp_path):
    """A real ``train()`` (loss, backward, optimizer) with EMIT's re-roll and weights, a DAPO filter and a
    peer box reward, reached through the TRL reward factory."""
    rows = make_prompt_rows(["hard", "wrong", "flat", "easy"])
    for i, row in enumerate(rows):
        row["solution"] = [0, 0, 0, 0] if i == 0 else [8, 8, 30, 40]
    assert set(PEER_REWARD_FACTORIES) <= set(reward_names())
    _, processor = load_tiny_qwen_vl(model_path)
    giou, matched = differad_rewards(processor, names=("giou", "matched_hits"))
    assert (giou.__name__, matched.__name__) == ("giou_reward", "matched_hits_reward")
    trainer = make_trainer(DifferADGRPOTrainer, model_path, [KindReward(), giou, matched], rows, 8, tmp_path,
                           max_steps=2, resample_rounds=1, degeneracy_rule="emit", correct_threshold=0.5,
                           advantage_weighting="emit", group_filter="dapo", group_filter_refill_rounds=1,
                           localization_reward="kind_loc_reward")
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    logged = [h for h in trainer.state.log_history if "differad/filtered" in h]
    assert logged and all(0.0 <= h["differad/filtered"] <= 1.0 for h in logged)
    assert all("rewards/giou_reward/mean" in h for h in logged)
