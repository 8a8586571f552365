import math
import pickle
import random

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from differad_rl.boxes import (
    area_consistency,
    box_area,
    box_iou,
    center_consistency,
    consistency_score,
    dclr,
    is_degenerate,
    is_zero_box,
    pairwise_dclr,
    side_consistency,
)
from differad_rl.coords import to_model_space
from differad_rl.parsing import render_box
from differad_rl.rewards import (
    DCLRConfig,
    check_gt_boxes,
    consistency_reward,
    dclr_reward,
    format_reward,
    get_dclr_reward,
    get_iou_reward,
    get_multi_box_reward,
    iou_reward,
    localization_scores,
    multi_box_reward,
    multi_box_score,
)
from tests import oracle

NORMS = ("paper", "enclosing")


def T(b):
    return torch.tensor(b, dtype=torch.float64)


def valid_box(lo=0.0, hi=1000.0):
    return st.tuples(
        st.floats(lo, hi), st.floats(lo, hi), st.floats(0.5, hi), st.floats(0.5, hi)
    ).map(lambda t: (t[0], t[1], t[0] + t[2], t[1] + t[3]))


def random_box(rng, scale=1000):
    x1, y1 = rng.uniform(0, scale), rng.uniform(0, scale)
    return (x1, y1, x1 + rng.uniform(0.1, scale / 2), y1 + rng.uniform(0.1, scale / 2))


def edge_cases():
    g = (100.0, 100.0, 200.0, 150.0)
    return [
        (g, g), ((100, 100, 200, 150.0001), g), ((0.0, 0.0, 1.0, 1.0), g), ((500, 500, 900, 990.0), g),
        ((100, 100, 101, 101.0), g), ((150, 125, 150.5, 125.5), g), ((0, 0, 1000, 1000.0), g),
        ((125.0, 75.0, 175.0, 175.0), g),  # same centre, different shape
        ((1.0, 1.0, 1.5, 1.5), (1.0, 1.0, 1.2, 1.2)),  # sub-pixel boxes: the max(·, 1) floor
    ]


@pytest.mark.parametrize("norm", NORMS)
def test_formulas_equal_oracle(norm):
    rng = random.Random(0)
    pairs = edge_cases() + [(random_box(rng), random_box(rng)) for _ in range(2000)]
    p = torch.tensor([a for a, _ in pairs], dtype=torch.float64)
    g = torch.tensor([b for _, b in pairs], dtype=torch.float64)
    checks = [
        (box_iou(p, g), [oracle.iou(a, b) for a, b in pairs]),
        (center_consistency(p, g, center_norm=norm), [oracle.center(a, b, center_norm=norm) for a, b in pairs]),
        (area_consistency(p, g), [oracle.area_score(a, b) for a, b in pairs]),
        (consistency_score(p, g, DCLRConfig(center_norm=norm)), [oracle.consistency(a, b, center_norm=norm) for a, b in pairs]),
        (dclr(p, g, DCLRConfig(center_norm=norm)), [oracle.dclr(a, b, center_norm=norm) for a, b in pairs]),
        (dclr(p, g, DCLRConfig(0.3, 0.9, 1e-3, norm)), [oracle.dclr(a, b, 0.3, 0.9, 1e-3, norm) for a, b in pairs]),
        (side_consistency(p, g), [oracle.side_score(a, b) for a, b in pairs]),
        (dclr(p, g, DCLRConfig(center_norm=norm, size_term="sides")),
         [oracle.dclr(a, b, center_norm=norm, size_term="sides") for a, b in pairs]),
    ]
    for got, want in checks:
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-9)


def test_localization_scores_equal_oracle_with_rules():
    rng = random.Random(1)
    gts, preds = [], []
    for i in range(3000):
        gt = oracle.ZERO if i % 7 == 0 else random_box(rng)
        kind = i % 6
        if kind == 0:
            pred = None
        elif kind == 1:
            pred = oracle.ZERO
        elif kind == 2:
            b = random_box(rng)
            pred = (b[2], b[1], b[0], b[3])  # x2 < x1: degenerate
        elif kind == 3:
            pred = gt
        else:
            pred = random_box(rng)
        gts.append(gt)
        preds.append(pred)
    arr = torch.tensor([p if p is not None else (math.nan,) * 4 for p in preds], dtype=torch.float64)
    valid = torch.tensor([p is not None for p in preds])
    for kind in ("dclr", "iou", "consistency"):
        for norm in NORMS:
            for size_term in ("area", "sides"):
                cfg = DCLRConfig(center_norm=norm, size_term=size_term)
                got = localization_scores(arr, valid, torch.tensor(gts, dtype=torch.float64), kind, cfg)
                want = [oracle.localization(p, g, kind, center_norm=norm, size_term=size_term) for p, g in zip(preds, gts)]
                np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-9)


@settings(max_examples=300, deadline=None)
@given(p=valid_box(), g=valid_box(), norm=st.sampled_from(NORMS))
def test_dclr_bounds_and_dominates_iou(p, g, norm):
    r = float(dclr(T(p), T(g), DCLRConfig(center_norm=norm)))
    i = float(box_iou(T(p), T(g)))
    assert 0.0 <= i <= 1.0 and 0.0 <= r <= 1.0 + 1e-12
    assert r >= i - 1e-12


@settings(max_examples=300, deadline=None)
@given(p=valid_box(), g=valid_box(), norm=st.sampled_from(NORMS))
def test_dclr_is_one_iff_coincide_or_same_centre_and_area(p, g, norm):
    """R = 1 iff the boxes coincide — except that the paper's formula also gives 1 to a box with the
    same centre and area but another shape (S = 1); that exception is documented in dclr()."""
    r = float(dclr(T(p), T(g), DCLRConfig(center_norm=norm)))
    if p == g:
        assert r == pytest.approx(1.0, abs=1e-12)
    same_centre_area = (
        math.isclose((p[0] + p[2]) / 2, (g[0] + g[2]) / 2, abs_tol=1e-9)
        and math.isclose((p[1] + p[3]) / 2, (g[1] + g[3]) / 2, abs_tol=1e-9)
        and math.isclose(oracle.area(p), oracle.area(g), rel_tol=1e-12)
    )
    if r >= 1.0 - 1e-12:
        assert p == pytest.approx(g, rel=1e-5, abs=1e-3) or same_centre_area


@settings(max_examples=300, deadline=None)
@given(p=valid_box(), g=valid_box(), norm=st.sampled_from(NORMS))
def test_sides_dclr_is_one_iff_boxes_coincide(p, g, norm):
    r = float(dclr(T(p), T(g), DCLRConfig(center_norm=norm, size_term="sides")))
    assert 0.0 <= r <= 1.0 + 1e-12 and r >= float(box_iou(T(p), T(g))) - 1e-12
    if p == g:
        assert r == pytest.approx(1.0, abs=1e-12)
    if r >= 1.0 - 1e-12:
        assert p == pytest.approx(g, rel=1e-5, abs=1e-3)


def test_sides_term_closes_the_shape_loophole():
    g = T([100.0, 100.0, 200.0, 150.0])
    strip = T([50.0, 112.5, 250.0, 137.5])  # same centre and area, twice as wide, half as tall
    assert float(dclr(strip, g)) == pytest.approx(1.0)
    assert float(dclr(strip, g, DCLRConfig(size_term="sides"))) == pytest.approx(0.8)  # IoU 1/3, s_s 0.25
    with pytest.raises(ValueError, match="size_term='volume'"):
        DCLRConfig(size_term="volume")
    r = get_dclr_reward(size_term="sides")
    assert r(["<answer>(50,112.5),(250,137.5)</answer>"], [[100, 100, 200, 150]])[0] == pytest.approx(0.8)


def test_transposed_box_scores_one_documented_exception():
    g = torch.tensor([100.0, 100.0, 200.0, 150.0])
    p = torch.tensor([125.0, 75.0, 175.0, 175.0])  # same centre and area, transposed shape
    assert float(box_iou(p, g)) < 1
    assert float(dclr(p, g)) == pytest.approx(1.0)


@settings(max_examples=300, deadline=None)
@given(p=valid_box(), g=valid_box(), dx=st.floats(-500, 500), dy=st.floats(-500, 500), norm=st.sampled_from(NORMS))
def test_translation_invariance(p, g, dx, dy, norm):
    t = torch.tensor([dx, dy, dx, dy], dtype=torch.float64)
    P, G = torch.tensor(p, dtype=torch.float64), torch.tensor(g, dtype=torch.float64)
    assert float(box_iou(P + t, G + t)) == pytest.approx(float(box_iou(P, G)), abs=1e-6)
    assert float(consistency_score(P + t, G + t, DCLRConfig(center_norm=norm))) == pytest.approx(
        float(consistency_score(P, G, DCLRConfig(center_norm=norm))), abs=1e-6)


@settings(max_examples=200, deadline=None)
@given(p=valid_box(), g=valid_box())
def test_iou_and_centre_are_symmetric(p, g):
    P, G = T(p), T(g)
    assert float(box_iou(P, G)) == pytest.approx(float(box_iou(G, P)), abs=1e-12)
    for norm in NORMS:
        assert float(center_consistency(P, G, center_norm=norm)) == pytest.approx(
            float(center_consistency(G, P, center_norm=norm)), abs=1e-12)


def test_enclosing_norm_keeps_position_signal_far_away():
    g = torch.tensor([[500.0, 500.0, 510.0, 510.0]])
    far = torch.tensor([[600.0, 600.0, 610.0, 610.0], [700.0, 700.0, 710.0, 710.0]])
    paper = center_consistency(far, g)
    enclosing = center_consistency(far, g, center_norm="enclosing")
    assert paper.tolist() == [0.0, 0.0]  # saturated: no position signal
    assert enclosing[0] > enclosing[1] > 0  # closer is better


def test_dtype_device_preserved_and_ints_upcast():
    p = torch.tensor([[0.0, 0.0, 2.0, 2.0]], dtype=torch.float32)
    assert dclr(p, p).dtype == torch.float32
    assert box_iou(torch.tensor([[0, 0, 2, 2]]), torch.tensor([[1, 1, 3, 3]])).dtype == torch.float64
    assert box_area([[0, 0, 2, 3]]).tolist() == [6.0]
    assert is_zero_box([[0, 0, 0, 0], [0, 0, 1, 1]]).tolist() == [True, False]
    assert is_degenerate([[0, 0, 0, 1], [0, 0, 1, 1]]).tolist() == [True, False]


def test_pairwise_matches_elementwise():
    rng = random.Random(2)
    P = torch.tensor([random_box(rng) for _ in range(5)], dtype=torch.float64)
    G = torch.tensor([random_box(rng) for _ in range(3)], dtype=torch.float64)
    m = pairwise_dclr(P, G)
    assert m.shape == (5, 3)
    for i in range(5):
        for j in range(3):
            assert float(m[i, j]) == pytest.approx(oracle.dclr(tuple(P[i].tolist()), tuple(G[j].tolist())), abs=1e-9)


def test_multi_box_equals_brute_force_oracle():
    rng = random.Random(3)
    for _ in range(300):
        gts = [random_box(rng) for _ in range(rng.randint(0, 3))]
        preds = [random_box(rng) if rng.random() > 0.2 else oracle.ZERO for _ in range(rng.randint(0, 4))]
        if rng.random() < 0.1:
            preds = None
        got = multi_box_score(preds, gts if gts else np.zeros((0, 4)))
        assert got == pytest.approx(oracle.multi_box(preds, gts), abs=1e-9)


def test_multi_box_single_equals_dclr():
    g, p = (10.0, 10.0, 50.0, 60.0), (12.0, 15.0, 40.0, 70.0)
    assert multi_box_score([p], [g]) == pytest.approx(oracle.dclr(p, g), abs=1e-12)
    assert multi_box_score([], []) == 1.0 and multi_box_score([oracle.ZERO], [oracle.ZERO]) == 1.0
    assert multi_box_score(None, []) == 0.0 and multi_box_score([p], []) == 0.0


def test_trl_shaped_rewards():
    c = [
        "<think>.</think><answer>(10,10),(20,20)</answer>",
        [{"role": "assistant", "content": "<think>.</think><answer>(0,0),(0,0)</answer>"}],
        "garbage",
        "<answer>(10,10),(30,30)</answer>",
    ]
    sol = [[10, 10, 20, 20], [0, 0, 0, 0], [10, 10, 20, 20], [10, 10, 20, 20]]
    d = dclr_reward(c, sol)
    assert d[:3] == [1.0, 1.0, 0.0] and d[3] == pytest.approx(oracle.dclr((10, 10, 30, 30), (10, 10, 20, 20)))
    assert iou_reward(c, sol) == [1.0, 1.0, 0.0, 0.25]
    assert format_reward(c, sol) == [1.0, 1.0, 0.0, 0.0]
    assert consistency_reward(c, sol)[3] == pytest.approx(oracle.consistency((10, 10, 30, 30), (10, 10, 20, 20)))
    assert multi_box_reward(c, [[s] for s in sol]) == pytest.approx(d)
    assert dclr_reward.__name__ == "dclr_reward" and format_reward.__name__ == "format_reward"


def test_reward_converts_pixel_ground_truth_per_space():
    W, H = 640, 480
    gt_pixel = [[64.0, 48.0, 320.0, 240.0]]
    for space in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        pred = to_model_space(np.array(gt_pixel), W, H, space)[0]
        text = f"<think>.</think><answer>{render_box(pred)}</answer>"
        r = get_dclr_reward(space=space, gt_space="pixel")
        assert r([text], gt_pixel, image_size=[[W, H]]) == [pytest.approx(1.0, abs=1e-2)]  # grid rounding
        # the unconverted reward would compare pixels with model coordinates and be wrong
        if space != "qwen2_5_vl":
            assert dclr_reward([text], gt_pixel)[0] < 0.9
    small = get_iou_reward(space="qwen2_5_vl", gt_space="pixel", max_pixels=112 * 112)
    pred = to_model_space(np.array(gt_pixel), W, H, "qwen2_5_vl", max_pixels=112 * 112)[0]
    assert small([f"<answer>{render_box(pred)}</answer>"], gt_pixel, image_size=[[W, H]]) == [pytest.approx(1.0, abs=0.1)]


def test_rewards_are_picklable_and_configurable():
    r = get_dclr_reward(w_center=0.5, w_area=0.5, center_norm="enclosing", name="loc")
    r2 = pickle.loads(pickle.dumps(r))
    assert r2.__name__ == "loc" and r2.config == r.config
    c = ["<answer>(100,100),(110,110)</answer>"]
    assert r2(c, [[0, 0, 10, 10]])[0] > get_dclr_reward()(c, [[0, 0, 10, 10]])[0]
    m = get_multi_box_reward(name="mb")
    assert pickle.loads(pickle.dumps(m)).__name__ == "mb"


def test_unparsable_output_is_counted():
    logged = {}
    dclr_reward(["junk", "<answer>(1,1),(2,2)</answer>"], [[1, 1, 2, 2]] * 2, log_metric=lambda k, v: logged.setdefault(k, v))
    assert logged == {"dclr_reward/unparsable": 0.5}


@pytest.mark.parametrize(
    "solution,match",
    [
        ([[1, 2, 3]], r"shape \(N, 4\)"),
        ([[1, 2, 3, float("nan")]], r"solution\[0\].*not finite"),
        ([[5, 5, 1, 9]], r"solution\[0\].*negative size"),
        ([[0, 0, 1, 1], [0, 0, 1, 1]], "2 boxes but there are 1 completions"),
        ([["a", 1, 2, 3]], "could not read"),
    ],
)
def test_user_mistakes_raise_naming_the_field(solution, match):
    with pytest.raises(ValueError, match=match):
        dclr_reward(["<answer>(1,1),(2,2)</answer>"], solution)


def test_config_and_space_errors():
    with pytest.raises(ValueError, match="center_norm='diag'"):
        DCLRConfig(center_norm="diag")
    with pytest.raises(ValueError, match="w_center"):
        DCLRConfig(w_center=-1)
    with pytest.raises(ValueError, match="space='qwen9'"):
        get_dclr_reward(space="qwen9")
    with pytest.raises(ValueError, match="image_size"):
        get_dclr_reward(space="qwen2_vl", gt_space="pixel")(["x"], [[0, 0, 1, 1]])
    with pytest.raises(ValueError, match=r"image_size\[0\]"):
        get_dclr_reward(space="qwen2_vl", gt_space="pixel")(["x"], [[0, 0, 1, 1]], image_size=[[0, 5]])
    with pytest.raises(ValueError, match="kind="):
        localization_scores(torch.zeros(1, 4), torch.ones(1, dtype=torch.bool), torch.zeros(1, 4), kind="giou")
    assert check_gt_boxes([[0, 0, 0, 0]]).shape == (1, 4)


@settings(max_examples=300, deadline=None)
@given(texts=st.lists(st.text(max_size=60), min_size=1, max_size=6), data=st.data())
def test_rewards_never_raise_on_model_output_and_stay_in_unit_interval(texts, data):
    sol = [data.draw(st.one_of(st.just((0.0, 0.0, 0.0, 0.0)), valid_box())) for _ in texts]
    for f in (dclr_reward, iou_reward, consistency_reward, format_reward):
        out = f(texts, sol)
        assert len(out) == len(texts) and all(0.0 <= v <= 1.0 for v in out)
    out = multi_box_reward(texts, [[s] for s in sol])
    assert all(0.0 <= v <= 1.0 for v in out)
