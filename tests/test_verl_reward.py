"""``compute_score`` for veRL 0.9.1: values equal the core's rewards, same keys for every sample,
clear errors, and a run through veRL's real reward loop (``RewardLoopWorker`` → ``pkg://`` loading →
``NaiveRewardManager.run_single`` decoding real token ids)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hypothesis import given, settings
from hypothesis import strategies as st

from differad_rl.integrations.verl import compute_score
from differad_rl.integrations.verl.reward import REWARD_KEYS, ground_truth_boxes
from differad_rl.rewards import (
    format_reward,
    get_dclr_reward,
    get_iou_reward,
    get_multi_box_reward,
)
from tests import oracle

SPACES = ("pixel", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def completion(box, *, think=True, fmt="qwen"):
    if box is None:
        return "<think>no idea</think>"
    x1, y1, x2, y2 = box
    inner = f"({x1},{y1}),({x2},{y2})" if fmt == "qwen" else f"[{x1}, {y1}, {x2}, {y2}]"
    return (f"<think>r</think>" if think else "") + f"<answer>{inner}</answer>"


boxes_st = st.tuples(st.integers(0, 200), st.integers(0, 200), st.integers(1, 200), st.integers(1, 200)).map(
    lambda t: (t[0], t[1], t[0] + t[2], t[1] + t[3])
)


@settings(max_examples=60, deadline=None)
@given(
    gt=st.one_of(st.just(None), boxes_st),
    pred=st.one_of(st.just(None), st.just((0, 0, 0, 0)), boxes_st),
    think=st.booleans(),
    space=st.sampled_from(SPACES),
    size=st.tuples(st.integers(400, 1600), st.integers(400, 1600)),
)
def test_values_equal_core_rewards(gt, pred, think, space, size):
    """Ground truth in original pixels + extra_info {space, width, height} → the core's TRL rewards
    with gt_space='pixel' and image_size; score = localization + format."""
    w, h = size
    text = completion(pred, think=think)
    gt_box = list(gt) if gt is not None else [0, 0, 0, 0]
    info = {"space": space, "width": w, "height": h}
    got = compute_score("differad", text, [gt_box] if gt is not None else [], info)
    assert tuple(got) == REWARD_KEYS
    kw = {"space": space, "gt_space": "pixel"}
    sol, sizes = [gt_box], [[w, h]]
    assert got["localization"] == pytest.approx(get_dclr_reward(**kw)([text], solution=sol, image_size=sizes)[0], abs=1e-12)
    assert got["iou"] == pytest.approx(get_iou_reward(**kw)([text], solution=sol, image_size=sizes)[0], abs=1e-12)
    assert got["format"] == format_reward([text])[0]
    assert got["score"] == pytest.approx(got["localization"] + got["format"])


@settings(max_examples=40, deadline=None)
@given(gt=boxes_st, pred=st.one_of(st.just(None), st.just((0, 0, 0, 0)), boxes_st))
def test_model_space_ground_truth_equals_oracle(gt, pred):
    """With neither space nor image size given, the ground truth is already in the model's space."""
    got = compute_score("d", completion(pred), f"({gt[0]},{gt[1]}),({gt[2]},{gt[3]})")
    p = oracle.ZERO if pred is None else tuple(map(float, pred))
    want = oracle.localization(p, tuple(map(float, gt))) if pred is not None else 0.0
    assert got["localization"] == pytest.approx(want, abs=1e-9)
    assert got["iou"] == pytest.approx(oracle.localization(p, tuple(map(float, gt)), kind="iou") if pred else 0.0, abs=1e-9)


def test_multi_box_equals_core():
    gts = [[10, 10, 50, 50], [60, 60, 90, 80]]
    texts = [
        "<think>.</think><answer>(10,10),(50,50) (61,60),(90,80)</answer>",
        "<think>.</think><answer>(10,10),(50,50)</answer>",
        "<think>.</think>",
    ]
    core = get_multi_box_reward()(texts, solution=[gts] * 3)
    got = [compute_score("d", t, gts, multi_box=True)["localization"] for t in texts]
    assert got == pytest.approx(core, abs=1e-12)
    assert got[0] > got[1] > got[2] == 0.0


def test_same_keys_for_every_sample():
    texts = [completion((1, 1, 5, 5)), "garbage", "", None, "<answer>(0,0),(0,0)</answer>", "<think>", 123]
    outs = [compute_score("d", t, [[1, 1, 5, 5]]) for t in texts] + [compute_score("d", t, []) for t in texts]
    assert {tuple(o) for o in outs} == {REWARD_KEYS}
    assert all(all(isinstance(v, float) for v in o.values()) for o in outs)
    assert outs[0]["score"] == 2.0 and outs[1]["score"] == 0.0


def test_normal_target_zero_box_rule():
    assert compute_score("d", completion((0, 0, 0, 0)), [])["localization"] == 1.0
    assert compute_score("d", completion((0, 0, 0, 0)), [[0, 0, 0, 0]])["localization"] == 1.0
    assert compute_score("d", completion((1, 1, 4, 4)), "(0,0),(0,0)")["localization"] == 0.0


def test_ground_truth_forms_agree():
    info = {"space": "qwen2_5_vl", "width": 900, "height": 700}
    forms = [
        [[100, 120, 300, 330]],
        [100, 120, 300, 330],
        json.dumps([[100, 120, 300, 330]]),
        "(100,120),(300,330)",
        {"boxes": [[100, 120, 300, 330]]},
        np.array([np.array([100.0, 120, 300, 330])], dtype=object),  # as pandas reads a parquet list column
    ]
    ref = ground_truth_boxes(forms[0], info)
    for f in forms[1:]:
        np.testing.assert_allclose(ground_truth_boxes(f, info), ref)
    # metadata inside the ground-truth dict takes precedence over extra_info
    moved = ground_truth_boxes({"boxes": [[100, 120, 300, 330]], "space": "qwen2_vl", "width": 1000, "height": 1000}, info)
    np.testing.assert_allclose(moved, [[100, 120, 300, 330]])


def test_reward_kwargs_options():
    text = "<think>.</think><answer>(0,0),(10,10)</answer>"
    base = compute_score("d", text, [[100, 100, 110, 110]])
    encl = compute_score("d", text, [[100, 100, 110, 110]], center_norm="enclosing")
    assert base["localization"] < encl["localization"]  # the paper's centre term is blind that far away
    strip = "<think>.</think><answer>(50,112.5),(250,137.5)</answer>"  # true centre and area, wrong shape
    assert compute_score("d", strip, [[100, 100, 200, 150]])["localization"] == pytest.approx(1.0)
    assert compute_score("d", strip, [[100, 100, 200, 150]], size_term="sides")["localization"] == pytest.approx(0.8)
    weighted = compute_score("d", text, [[0, 0, 10, 10]], localization_weight=2.0, format_weight=0.5)
    assert weighted["score"] == pytest.approx(2.5)
    # space as a reward kwarg (set once in the config), size per row
    a = compute_score("d", text, [[0, 0, 500, 500]], {"width": 1000, "height": 1000}, space="qwen2_vl")
    assert a["localization"] < 1.0 and compute_score("d", text, [[0, 0, 10, 10]])["localization"] == 1.0
    # veRL's reward-model router kwargs are accepted and ignored
    assert compute_score("d", text, [[0, 0, 10, 10]], reward_router_address=None, reward_model_tokenizer=None) == base | {
        "localization": 1.0, "iou": 1.0, "score": 2.0, "acc_0.3": 1.0, "tp": 1.0, "fp": 0.0, "fn": 0.0
    }


@pytest.mark.parametrize(
    ("gt", "info", "kwargs", "match"),
    [
        ([[1, 2, 30, 40]], {"space": "qwen2_vl"}, {}, r"missing image size: .*width and height"),
        ([[1, 2, 30, 40]], {"space": "qwen2_5_vl", "width": 100}, {}, r"missing image size: .*height"),
        ([[1, 2, 30, 40]], {"width": 100, "height": 100}, {}, r"model's coordinate space is missing"),
        ([[1, 2, 30, 40]], {"space": "qwen9_vl"}, {}, r"space must be one of pixel, qwen2_vl"),
        ([[1, 2, 30, 40]], {"gt_space": "pixels"}, {}, r"gt_space must be 'pixel' or 'model'"),
        ([[1, 2, 30]], None, {}, r"ground_truth must hold finite boxes"),
        ("not a box", None, {}, r"ground_truth must hold boxes"),
        ([[1, 2, 30, 40]], None, {"centre_norm": "paper"}, r"unknown reward_kwargs centre_norm; known: localization_weight"),
        ([[1, 2, 30, 40]], None, {"format_weight": -1}, r"reward_kwargs.format_weight must be a finite number >= 0"),
        ([[1, 2, 30, 40]], None, {"center_norm": "diou"}, r"center_norm"),
        ([[1, 2, 30, 40]], None, {"max_pixels": 0}, r"reward_kwargs.max_pixels must be a positive integer"),
    ],
)
def test_user_mistakes_raise_value_error(gt, info, kwargs, match):
    with pytest.raises(ValueError, match=match):
        compute_score("d", completion((1, 2, 30, 40)), gt, info, **kwargs)


# ------------------------------------------------------------------------------------------------
# veRL's real reward loop


@pytest.fixture(scope="module")
def reward_worker():
    pytest.importorskip("verl")
    from hydra import compose, initialize_config_module
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker

    from differad_rl.integrations.qwen_vl.tiny import tiny_model_for

    model = tiny_model_for("qwen2_5_vl")
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        cfg = compose(
            config_name="ppo_trainer",
            overrides=[
                f"actor_rollout_ref.model.path={model}",
                "reward.custom_reward_function.path=pkg://differad_rl.integrations.verl.reward",
                "reward.custom_reward_function.name=compute_score",
                "+reward.custom_reward_function.reward_kwargs.space=qwen2_5_vl",
                "+reward.custom_reward_function.reward_kwargs.format_weight=0.5",
            ],
        )
    return RewardLoopWorker(cfg), model


def test_reward_loop_worker_scores_equal_compute_score(reward_worker):
    from verl import DataProto

    from differad_rl.integrations.qwen_vl.tiny import load_tiny_processor

    worker, model = reward_worker
    tok = load_tiny_processor(model).tokenizer
    texts = [
        "<think>it is there</think><answer>(101,102),(504,406)</answer>",  # gt in the resized 1008x812 image
        "<think>x</think><answer>(0,0),(0,0)</answer>",
        "no answer at all",
        "<answer>(30,30),(100,100)</answer>",
    ]
    gts = [[[100, 100, 500, 400]], [], [[10, 10, 20, 20]], [[100, 100, 500, 400]]]
    infos = [{"space": "qwen2_5_vl", "width": 1000, "height": 800, "index": i} for i in range(4)]
    prompt_len, resp_len = 3, 48
    responses = torch.full((4, resp_len), tok.pad_token_id)
    attention = torch.zeros(4, prompt_len + resp_len, dtype=torch.int64)
    attention[:, :prompt_len] = 1
    for i, t in enumerate(texts):
        ids = tok(t, add_special_tokens=False)["input_ids"]
        responses[i, : len(ids)] = torch.tensor(ids)
        attention[i, prompt_len : prompt_len + len(ids)] = 1
    data = DataProto.from_single_dict(
        {
            "prompts": torch.ones(4, prompt_len, dtype=torch.int64),
            "responses": responses,
            "attention_mask": attention,
            "data_source": np.array(["differad"] * 4, dtype=object),
            "reward_model": np.array([{"style": "rule", "ground_truth": g} for g in gts], dtype=object),
            "extra_info": np.array(infos, dtype=object),
        }
    )
    outs = worker.loop.run_until_complete(worker.compute_score_batch(data))  # the loop veRL bound it to
    for text, gt, info, out in zip(texts, gts, infos, outs):
        want = compute_score("differad", text, gt, info, space="qwen2_5_vl", format_weight=0.5)
        assert out["reward_score"] == pytest.approx(want["score"])
        assert {k: out["reward_extra_info"][k] for k in REWARD_KEYS} == pytest.approx(want)
    assert outs[0]["reward_extra_info"]["localization"] > 0.99  # converted to Qwen2.5-VL pixels, not compared raw
    assert outs[1]["reward_score"] == pytest.approx(1.5)  # zero box on a normal target, well formatted


# ------------------------------------------------------------------------------------------------
# evaluation-protocol indicators, exactness corners


def test_protocol_indicators_equal_the_evaluation_metrics():
    """Means of iou / acc_0.3 and F1 from the means of tp, fp, fn = the eval module's mIoU, Acc@0.3, F1@0.3."""
    from differad_rl.eval.metrics import f1_at, sample_ious
    from differad_rl.parsing import parse_boxes_batch

    rng = np.random.default_rng(0)
    texts, gts = [], []
    for i in range(300):
        g = [] if i % 4 == 0 else [[int(v) for v in (rng.integers(0, 300), rng.integers(0, 300))]]
        if g:
            g[0] += [g[0][0] + int(rng.integers(5, 200)), g[0][1] + int(rng.integers(5, 200))]
            if i % 7 == 0:
                g.append([400, 400, 450, 470])
        kind = i % 5
        if kind == 0:
            p = (0, 0, 0, 0)
        elif kind == 1:
            p = None
        elif kind == 2 and g:
            p = tuple(v + int(rng.integers(-15, 15)) for v in g[-1])
        else:
            p = tuple(int(v) for v in sorted(rng.integers(0, 500, 2))) * 2
            p = (p[0], p[1], p[0] + int(rng.integers(-5, 150)), p[1] + int(rng.integers(1, 150)))
        texts.append(completion(p, fmt="bracket" if i % 3 == 0 else "qwen"))
        gts.append(g)
    outs = [compute_score("d", t, g) for t, g in zip(texts, gts)]
    pred, valid = parse_boxes_batch(texts)
    gt_lists = [g if g else [] for g in gts]
    ious = sample_ious(pred, valid, gt_lists)
    np.testing.assert_allclose([o["iou"] for o in outs], ious, rtol=0, atol=1e-12)
    assert np.mean([o["acc_0.3"] for o in outs]) == pytest.approx(np.mean(ious >= 0.3))
    normal = np.array([not g for g in gts])
    has_box = valid & ~(pred == 0).all(axis=1)
    tp, fp, fn = (np.mean([o[k] for o in outs]) for k in ("tp", "fp", "fn"))
    assert 2 * tp / (2 * tp + fp + fn) == pytest.approx(f1_at(ious, normal, has_box, 0.3))
    # the protocol reads every format; the training reward only the prompt family's
    bracket = compute_score("d", completion((1, 1, 5, 5), fmt="bracket"), [[1, 1, 5, 5]])
    assert bracket["iou"] == 1.0 and bracket["tp"] == 1.0 and bracket["localization"] == 0.0 and bracket["format"] == 0.0
    assert compute_score("d", completion((1, 1, 5, 5), fmt="bracket"), [[1, 1, 5, 5]], prompt_family="mantis")["score"] == 2.0


def test_best_writable_answer_scores_exactly_one_and_huge_values_score_zero():
    info = {"space": "qwen2_vl", "width": 4000, "height": 3000}
    g = [[1001, 1001, 1013, 1009]]
    best = ground_truth_boxes(g, info)[0].astype(int)
    assert compute_score("d", completion(tuple(best)), g, info)["localization"] == 1.0
    for huge in ("1e307", "1.7e308"):
        out = compute_score("d", f"<think>r</think><answer>(10,10),({huge},20)</answer>", [[10, 10, 20, 20]])
        assert out["localization"] == 0.0 and out["iou"] == 0.0 and not any(np.isnan(v) for v in out.values())
    with pytest.raises(ValueError, match="sane bound"):
        compute_score("d", "x", [[0, 0, 1e307, 10]])
    with pytest.raises(ValueError, match="prompt_family"):
        compute_score("d", "x", [], prompt_family="llava")
