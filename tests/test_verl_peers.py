"""The peers' strategies in the veRL adapter: ``algorithm.differad.weighting`` through veRL's REAL
``compute_advantage`` and the registered estimator, and the peer box rewards' ``compute_score``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("verl")

from verl.trainer.ppo.ray_trainer import compute_advantage  # noqa: E402

from differad_rl.group_weights import mean_reward_weight, wrong_share_weights_by_id  # noqa: E402
from differad_rl.groups import group_advantages_by_id  # noqa: E402
from differad_rl.integrations.verl import estimator as est  # noqa: E402
from differad_rl.integrations.verl.peers import PEER_BOX_REWARDS, compute_score  # noqa: E402
from differad_rl.integrations.verl.reward import REWARD_KEYS  # noqa: E402
from differad_rl.integrations.verl.reward import compute_score as method_score  # noqa: E402
from tests import oracle_peers  # noqa: E402
from tests.test_verl_estimator import algorithm_config, trainer_batch  # noqa: E402

est.register()


def _batch():
    rng = np.random.default_rng(5)
    n, prompts = 4, 6
    loc = rng.choice([0.0, 0.2, 0.6, 0.9, 1.0], size=n * prompts)
    loc[:n] = 0.0  # all wrong
    rewards = loc + rng.integers(0, 2, size=n * prompts)
    data, perm = trainer_batch(rewards, loc, n, seed=2)
    return data, perm, rewards[perm.numpy()], loc[perm.numpy()], n


@pytest.mark.parametrize("weighting, options", [("emit", {"correct_threshold": 0.5}),
                                                ("univg", {"univg_form": "log"}),
                                                ("univg", {"univg_form": "power", "univg_power": 2})])
def test_peer_weightings_through_verl_compute_advantage(weighting, options):
    data, perm, rewards, loc, n = _batch()
    with est.provide_localization(loc):
        out = compute_advantage(data, adv_estimator="differad", config=algorithm_config(weighting=weighting, **options))
    ids = torch.as_tensor(np.unique(data.non_tensor_batch["uid"], return_inverse=True)[1])
    r, l_ = torch.as_tensor(rewards, dtype=torch.float32), torch.as_tensor(loc, dtype=torch.float32)
    adv = group_advantages_by_id(r, ids)
    if weighting == "emit":
        w = wrong_share_weights_by_id(l_, ids, 0.5)
        # against the scalar oracle in generation order
        gen = torch.empty_like(w)
        gen[perm] = w
        want = oracle_peers.wrong_share_weights(list(loc[np.argsort(perm.numpy())]), n, 0.5)
        np.testing.assert_allclose(gen.numpy(), want, rtol=0, atol=1e-6)
    else:
        form, power = options["univg_form"], float(options.get("univg_power", 1.0))
        w = mean_reward_weight(l_, form, power)
        assert float(w) == pytest.approx(oracle_peers.mean_reward_weight(list(loc), form, power), abs=1e-6)
    expected = (adv * w)[:, None] * data.batch["response_mask"]
    torch.testing.assert_close(out.batch["advantages"], expected, rtol=1e-6, atol=1e-6)


def test_weighting_options_validated_and_default_unchanged():
    cfg = est.DifferadConfig.from_algorithm_config(algorithm_config())
    assert (cfg.weighting, cfg.active_weighting, cfg.correct_threshold, cfg.univg_form) == (None, "differad", 0.0, "power")
    assert est.DifferadConfig(difficulty_weights=False).active_weighting is None
    assert est.DifferadConfig(difficulty_weights=False, weighting="emit").active_weighting == "emit"
    for options, match in (({"weighting": "dapo"}, "weighting"), ({"univg_form": "sqrt"}, "univg_form"),
                           ({"correct_threshold": "high"}, "correct_threshold")):
        with pytest.raises(ValueError, match=match):
            est.DifferadConfig.from_algorithm_config(algorithm_config(**options))


@pytest.mark.parametrize("box_reward", PEER_BOX_REWARDS)
def test_peer_compute_score_keys_rules_and_values(box_reward):
    gt = {"boxes": [[10, 10, 50, 50]], "space": "pixel"}
    good = "<think>.</think><answer>(10,10),(50,50)</answer>"
    near = "<think>.</think><answer>(12,10),(52,50)</answer>"
    for text, want in ((good, 1.0), ("no box", 0.0)):
        out = compute_score("d", text, gt, {}, box_reward=box_reward)
        assert tuple(out) == REWARD_KEYS and out["localization"] == pytest.approx(want)
    out = compute_score("d", near, gt, {}, box_reward=box_reward, format_weight=0.5)
    base = method_score("d", near, gt, {}, format_weight=0.5)
    assert (out["iou"], out["format"]) == (base["iou"], base["format"])
    assert out["score"] == pytest.approx(out["localization"] + 0.5 * out["format"])
    p, g = (12.0, 10.0, 52.0, 50.0), (10.0, 10.0, 50.0, 50.0)
    want = oracle_peers.matched_hits([p], [g]) if box_reward == "matched_hits" else oracle_peers.peer_box(p, g, box_reward)
    assert out["localization"] == pytest.approx(want, abs=1e-12)
    normal = compute_score("d", "<answer>(0,0),(0,0)</answer>", {"boxes": []}, {}, box_reward=box_reward)
    assert normal["localization"] == 1.0
    # the box is read in the prompt family's format only, as the method's reward reads it
    bare = "<think>.</think><answer>[10, 10, 50, 50]</answer>"
    assert method_score("d", bare, gt, {})["localization"] == 0.0
    assert compute_score("d", bare, gt, {}, box_reward=box_reward)["localization"] == 0.0
    assert compute_score("d", bare, gt, {}, box_reward=box_reward, prompt_family=None)["localization"] == 1.0
    prose = compute_score("d", "<think>.</think><answer>nothing here</answer>", {"boxes": []}, {},
                          box_reward=box_reward)
    assert prose["localization"] == 0.0  # prose is no answer of a box, not "nothing there"


def test_peer_compute_score_converts_coordinates_like_the_method():
    gt, info = [[64, 48, 192, 144]], {"space": "qwen2_vl", "width": 640, "height": 480}
    text = "<answer>(100,100),(300,300)</answer>"  # exactly the ground truth in 0..1000
    assert compute_score("d", text, gt, info, box_reward="ciou")["localization"] == pytest.approx(1.0)


def test_peer_compute_score_errors():
    with pytest.raises(ValueError, match="box_reward"):
        compute_score("d", "x", [[0, 0, 1, 1]], {})
    with pytest.raises(ValueError, match="iou_threshold"):
        compute_score("d", "x", [[0, 0, 1, 1]], {}, box_reward="iou_threshold", iou_threshold=2)
    with pytest.raises(ValueError, match="unknown reward_kwargs"):
        compute_score("d", "x", [[0, 0, 1, 1]], {}, box_reward="giou", threshold=0.3)
