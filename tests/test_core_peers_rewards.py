"""The peers' box rewards (differad_rl.box_rewards) against the scalar oracle in tests/oracle_peers.py."""

import math
import pickle
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from differad_rl import box_rewards as br
from differad_rl.box_rewards import (
    PEER_BOX_KINDS,
    complete_iou,
    distance_iou,
    generalized_iou,
    get_ciou_reward,
    get_iou_threshold_reward,
    get_matched_hits_reward,
    matched_hits_score,
    peer_box_scores,
)
from differad_rl.coords import to_model_grid, to_model_space
from differad_rl.rewards import get_iou_reward
from tests import oracle, oracle_peers


def random_box(rng, scale=1000):
    x1, y1 = rng.uniform(0, scale), rng.uniform(0, scale)
    return (x1, y1, x1 + rng.uniform(0.1, scale / 2), y1 + rng.uniform(0.1, scale / 2))


def valid_box(lo=0.0, hi=1000.0):
    return st.tuples(st.floats(lo, hi), st.floats(lo, hi), st.floats(0.5, hi), st.floats(0.5, hi)).map(
        lambda t: (t[0], t[1], t[0] + t[2], t[1] + t[3])
    )


def answer(b):
    return f"<think>.</think><answer>({b[0]},{b[1]}),({b[2]},{b[3]})</answer>"


def test_raw_formulas_equal_oracle():
    rng = random.Random(0)
    g = (100.0, 100.0, 200.0, 150.0)
    pairs = [(g, g), ((0.0, 0.0, 1.0, 1.0), g), ((125.0, 75.0, 175.0, 175.0), g), ((0, 0, 1000, 1000.0), g),
             ((150, 125, 150.5, 125.5), g), ((500, 0, 501, 1000.0), (0, 500, 1000, 501.0))]
    pairs += [(random_box(rng), random_box(rng)) for _ in range(2000)]
    p = torch.tensor([a for a, _ in pairs], dtype=torch.float64)
    q = torch.tensor([b for _, b in pairs], dtype=torch.float64)
    for got, fn in ((generalized_iou(p, q), oracle_peers.giou), (distance_iou(p, q), oracle_peers.diou),
                    (complete_iou(p, q), oracle_peers.ciou)):
        np.testing.assert_allclose(got.numpy(), [fn(a, b) for a, b in pairs], rtol=0, atol=1e-9)
    for kind in PEER_BOX_KINDS:
        got = peer_box_scores(p, torch.ones(len(pairs), dtype=torch.bool), q, kind)
        np.testing.assert_allclose(got.numpy(), [oracle_peers.raw(kind, a, b) for a, b in pairs], rtol=0, atol=1e-9)


def test_scores_equal_oracle_with_rules():
    rng = random.Random(1)
    gts, preds = [], []
    for i in range(3000):
        gt = oracle.ZERO if i % 7 == 0 else random_box(rng)
        case = i % 6
        if case == 0:
            pred = None
        elif case == 1:
            pred = oracle.ZERO
        elif case == 2:
            b = random_box(rng)
            pred = (b[2], b[1], b[0], b[3])  # x2 < x1: degenerate
        elif case == 3:
            pred = gt
        else:
            pred = random_box(rng)
        gts.append(gt)
        preds.append(pred)
    arr = torch.tensor([p if p is not None else (math.nan,) * 4 for p in preds], dtype=torch.float64)
    valid = torch.tensor([p is not None for p in preds])
    gt_t = torch.tensor(gts, dtype=torch.float64)
    for kind in PEER_BOX_KINDS:
        for threshold in (0.5, 0.3):
            got = peer_box_scores(arr, valid, gt_t, kind, threshold=threshold)
            want = [oracle_peers.peer_box(p, g, kind, threshold) for p, g in zip(preds, gts)]
            np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-9)


@settings(max_examples=300, deadline=None)
@given(p=valid_box(), g=valid_box(), kind=st.sampled_from(PEER_BOX_KINDS))
def test_rewards_in_unit_interval_and_one_for_the_true_box(p, g, kind):
    pt, gt, ok = torch.tensor([p, g], dtype=torch.float64), torch.tensor([g, g], dtype=torch.float64), torch.ones(2, dtype=torch.bool)
    r = peer_box_scores(pt, ok, gt, kind)
    assert 0.0 <= float(r[0]) <= 1.0
    assert float(r[1]) == pytest.approx(1.0, abs=1e-12)
    if kind in ("giou", "diou"):  # in (-1, 1] before the shift: never clamped
        raw = (generalized_iou if kind == "giou" else distance_iou)(pt[0], gt[0])
        assert -1.0 < float(raw) <= 1.0 + 1e-12


def test_giou_diou_signal_where_iou_is_blind():
    g = torch.tensor([[100.0, 100.0, 110.0, 110.0]] * 3, dtype=torch.float64)
    p = torch.tensor([[120.0, 100.0, 130.0, 110.0], [300.0, 100.0, 310.0, 110.0], [900, 900, 910, 910.0]],
                     dtype=torch.float64)
    ok = torch.ones(3, dtype=torch.bool)
    assert peer_box_scores(p, ok, g, "iou_squared").tolist() == [0.0, 0.0, 0.0]
    for kind in ("giou", "diou", "ciou"):
        r = peer_box_scores(p, ok, g, kind).tolist()
        assert r[0] > r[1] > r[2] > 0.0, kind  # nearer misses score higher


def test_threshold_is_strict_like_visual_rft():
    g = torch.tensor([[0.0, 0.0, 10.0, 10.0]], dtype=torch.float64)
    half = torch.tensor([[0.0, 0.0, 10.0, 5.0]], dtype=torch.float64)  # IoU exactly 0.5
    ok = torch.ones(1, dtype=torch.bool)
    assert peer_box_scores(half, ok, g, "iou_threshold").item() == 0.0
    assert peer_box_scores(half, ok, g, "iou_threshold", threshold=0.49).item() == 1.0


def test_dtype_device_and_ciou_clamp():
    g = torch.tensor([[0.0, 0.0, 1000.0, 1.0]], dtype=torch.float32)
    p = torch.tensor([[5000.0, 5000.0, 5001.0, 6000.0]], dtype=torch.float32)  # far, transposed strip: CIoU < -1
    assert float(complete_iou(p.double(), g.double())) < -1.0
    r = peer_box_scores(p, torch.ones(1, dtype=torch.bool), g, "ciou")
    assert r.dtype == torch.float32 and float(r) == 0.0


@settings(max_examples=200, deadline=None)
@given(
    preds=st.one_of(st.none(), st.lists(valid_box(0, 100), max_size=3)),
    gts=st.lists(valid_box(0, 100), max_size=3),
    normal=st.booleans(),
    l1=st.sampled_from([10.0, 30.0, 0.0]),
)
def test_matched_hits_equals_brute_force_oracle(preds, gts, normal, l1):
    if normal:
        gts = [oracle.ZERO]
    got = matched_hits_score(preds, gts, l1_threshold=l1)
    assert got == pytest.approx(oracle_peers.matched_hits(preds, gts, l1_threshold=l1), abs=1e-12)
    assert 0.0 <= got <= 1.0


def test_matched_hits_rules():
    g = [[10.0, 10.0, 50.0, 50.0], [60.0, 60.0, 90.0, 90.0]]
    assert matched_hits_score([tuple(b) for b in g[::-1]], g) == 1.0  # order does not matter
    assert matched_hits_score([g[0]], g) == 0.5  # one of two found
    assert matched_hits_score([(10.0, 10.0, 50.0, 50.0), (5.0, 5.0, 5.0, 9.0)], [g[0]]) == 0.5  # degenerate extra
    assert matched_hits_score(None, g) == 0.0
    assert matched_hits_score([], []) == 1.0 and matched_hits_score([(0, 0, 0, 0)], []) == 1.0
    assert matched_hits_score([(1.0, 1.0, 2.0, 2.0)], []) == 0.0


def test_trl_shaped_rewards_zero_box_rule_and_logging():
    logged = {}
    r = get_iou_threshold_reward()
    out = r(
        [answer((0, 0, 10, 10)), answer((0, 0, 0, 0)), "no box", answer((0, 0, 0, 0)), answer((1, 1, 9, 9))],
        solution=[[0, 0, 10, 8], [0, 0, 10, 8], [0, 0, 10, 8], [0, 0, 0, 0], [0, 0, 0, 0]],
        log_metric=lambda k, v: logged.update({k: v}),
    )
    assert out == [1.0, 0.0, 0.0, 1.0, 0.0]
    assert logged == {"iou_threshold_reward/unparsable": pytest.approx(0.2)}
    assert r.__name__ == "iou_threshold_reward"


@pytest.mark.parametrize("factory", [br.get_iou_threshold_reward, br.get_iou_squared_reward, br.get_giou_reward,
                                     br.get_diou_reward, br.get_ciou_reward])
def test_factories_pickle_and_convert_ground_truth_like_iou_reward(factory):
    """Same coordinate handling as the method's IoU reward: squared IoU of a pixel-space ground truth
    converted to Qwen2-VL's 0..1000 space equals the square of get_iou_reward's value."""
    r = pickle.loads(pickle.dumps(factory(space="qwen2_vl", gt_space="pixel")))
    base = get_iou_reward(space="qwen2_vl", gt_space="pixel")
    sol, size = [[40, 20, 120, 60], [0, 0, 0, 0]], [[640, 480], [640, 480]]
    texts = [answer((70, 45, 180, 120)), answer((0, 0, 0, 0))]
    got = r(texts, solution=sol, image_size=size)
    ious = base(texts, solution=sol, image_size=size)
    assert got[1] == 1.0 and ious[1] == 1.0
    if r.kind == "iou_squared":
        assert got[0] == pytest.approx(ious[0] ** 2, abs=1e-12)
    g = to_model_grid(np.asarray([sol[0]], dtype=np.float64), 640, 480, "qwen2_vl")  # snapped as the model writes
    p = torch.tensor([[70.0, 45.0, 180.0, 120.0]], dtype=torch.float64)
    want = peer_box_scores(p, torch.ones(1, dtype=torch.bool), torch.as_tensor(g), r.kind)
    assert got[0] == pytest.approx(float(want), abs=1e-12)


def test_matched_hits_reward_pickles_and_scores_several_boxes():
    r = pickle.loads(pickle.dumps(get_matched_hits_reward(l1_threshold=5.0)))
    text = "<think>.</think><answer>(10,10),(50,50) (60,60),(91,91)</answer>"
    assert r([text, "<answer></answer>"], solution=[[[10, 10, 50, 50], [60, 60, 90, 90]], []]) == [1.0, 1.0]
    assert r(["nothing"], solution=[[[10, 10, 50, 50]]]) == [0.0]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: get_iou_threshold_reward(threshold=1.5), "threshold"),
        (lambda: get_ciou_reward(eps=0), "eps"),
        (lambda: get_matched_hits_reward(l1_threshold=-1), "l1_threshold"),
        (lambda: peer_box_scores([[0, 0, 1, 1]], [True], [[0, 0, 1, 1]], "dice"), "kind"),
        (lambda: br.get_giou_reward()([answer((0, 0, 1, 1))], solution=[[5, 5, 1, 1]]), r"solution\[0\]"),
    ],
)
def test_user_errors_name_the_field(call, match):
    with pytest.raises(ValueError, match=match):
        call()
