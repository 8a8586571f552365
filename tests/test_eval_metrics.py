"""Metrics of the evaluation protocol against hand-computed values, and object == functional."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from differad_rl.eval.metrics import (
    LocalizationMetric,
    accuracy_at,
    f1_at,
    localization_metrics,
    mean_iou,
    ragged_ground_truth,
    sample_ious,
)

NAN4 = [math.nan] * 4

# Nine hand-made samples covering every rule (IoU computed by hand in the comments).
PRED = [
    [0, 0, 10, 5],  # s0 anomalous, IoU 50/100 = 0.5 → TP
    [5, 5, 15, 15],  # s1 anomalous, inter 25, union 175 → 1/7 → FP + FN
    NAN4,  # s2 anomalous, no box → 0 → FN
    [0, 0, 0, 0],  # s3 normal, zero box → 1 (correct, no F1 count)
    [1, 1, 5, 5],  # s4 normal, a box → 0 → FP
    NAN4,  # s5 normal (GT given as the zero box), no box → 0, no F1 count
    [10, 10, 20, 15],  # s6 anomalous with 2 GT boxes, best IoU 50/100 = 0.5 → TP
    [0, 0, 0, 0],  # s7 anomalous, zero box → 0 → FN only
    [5, 5, 3, 8],  # s8 anomalous, degenerate box → 0 → FP + FN
]
GT = [
    [[0, 0, 10, 10]],
    [[0, 0, 10, 10]],
    [[20, 20, 30, 30]],
    [],
    [],
    [[0, 0, 0, 0]],
    [[0, 0, 4, 4], [10, 10, 20, 20]],
    [[1, 1, 3, 3]],
    [[0, 0, 9, 9]],
]
CATS = list("aaaaabbbb")
IOUS = np.array([0.5, 1 / 7, 0, 1, 0, 0, 0.5, 0, 0])


def test_sample_ious_hand_computed():
    np.testing.assert_allclose(sample_ious(PRED, None, GT), IOUS, rtol=0, atol=1e-12)


def test_all_metrics_hand_computed():
    m = localization_metrics(PRED, None, GT, CATS)
    o = m["overall"]
    assert o["n"] == 9
    assert o["miou"] == pytest.approx(IOUS.mean())
    assert o["acc"] == pytest.approx(3 / 9)  # s0, s3, s6
    assert (o["tp"], o["fp"], o["fn"]) == (2, 3, 4)
    assert o["f1"] == pytest.approx(2 * 2 / (2 * 2 + 3 + 4))
    assert o["precision"] == pytest.approx(2 / 5)
    assert o["recall"] == pytest.approx(2 / 6)
    assert o["invalid_rate"] == pytest.approx(2 / 9)
    assert m["anomalous"]["n"] == 6 and m["normal"]["n"] == 3
    assert m["normal"]["acc"] == pytest.approx(1 / 3)
    assert (m["normal"]["tp"], m["normal"]["fp"], m["normal"]["fn"]) == (0, 1, 0)
    assert math.isnan(m["normal"]["recall"])  # no anomalous target → 0/0
    a, b = m["per_category"]["a"], m["per_category"]["b"]
    assert (a["n"], b["n"]) == (5, 4)
    assert a["miou"] == pytest.approx((0.5 + 1 / 7 + 1) / 5)
    assert b["miou"] == pytest.approx(0.5 / 4)
    assert (a["tp"], a["fp"], a["fn"]) == (1, 2, 2)
    assert (b["tp"], b["fp"], b["fn"]) == (1, 1, 2)
    assert a["anomalous"]["n"] == 3 and a["normal"]["n"] == 2
    assert b["normal"]["n"] == 1 and b["normal"]["invalid_rate"] == 1.0


def test_public_functions_agree():
    ious = sample_ious(PRED, None, GT)
    is_normal = np.array([len([b for b in g if any(b)]) == 0 for g in GT])
    has_box = np.array([np.isfinite(p).all() and any(p) for p in np.asarray(PRED, float)])
    m = localization_metrics(PRED, None, GT)["overall"]
    assert mean_iou(ious) == pytest.approx(m["miou"])
    assert accuracy_at(ious) == pytest.approx(m["acc"])
    assert f1_at(ious, is_normal, has_box) == pytest.approx(m["f1"])
    assert list(localization_metrics(PRED, None, GT)["per_category"]) == ["all"]


def test_threshold_is_configurable():
    m = localization_metrics(PRED, None, GT, iou_threshold=0.1)["overall"]
    assert m["acc"] == pytest.approx(4 / 9)  # s1 (1/7 ≥ 0.1) now counts
    assert (m["tp"], m["fp"], m["fn"]) == (3, 2, 3)
    with pytest.raises(ValueError, match="iou_threshold"):
        localization_metrics(PRED, None, GT, iou_threshold=0.0)


def test_pred_valid_mask_and_array_ground_truth():
    gt_arr = np.array([[0, 0, 10, 10], [0, 0, 0, 0]])
    pred = np.array([[0, 0, 10, 10], [0, 0, 0, 0]])
    assert sample_ious(pred, None, gt_arr).tolist() == [1.0, 1.0]
    assert sample_ious(pred, [False, False], gt_arr).tolist() == [0.0, 0.0]
    boxes, owner, n = ragged_ground_truth(gt_arr)
    assert n == 2 and owner.tolist() == [0] and boxes.tolist() == [[0, 0, 10, 10]]


def test_shape_errors_name_the_problem():
    with pytest.raises(ValueError, match="pred_boxes"):
        sample_ious([[1, 2, 3]], None, [[]])
    with pytest.raises(ValueError, match="ground truth has 2 samples"):
        sample_ious([[1, 2, 3, 4]], None, [[], []])
    with pytest.raises(ValueError, match="categories"):
        localization_metrics([[1, 2, 3, 4]], None, [[]], ["a", "b"])


box_st = st.tuples(*[st.integers(0, 20)] * 4).map(
    lambda t: [min(t[0], t[2]), min(t[1], t[3]), max(t[0], t[2]), max(t[1], t[3])]
)
sample_st = st.tuples(
    st.one_of(box_st, st.just([0, 0, 0, 0]), st.just(NAN4)),
    st.lists(box_st.filter(lambda b: b[2] > b[0] and b[3] > b[1]), max_size=3),
    st.sampled_from(["x", "y", "z"]),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(sample_st, min_size=1, max_size=30), st.data())
def test_accumulating_object_equals_functional(samples, data):
    pred = [s[0] for s in samples]
    gt = [s[1] for s in samples]
    cats = [s[2] for s in samples]
    expected = localization_metrics(pred, None, gt, cats)
    cut = data.draw(st.integers(0, len(samples)))
    m1, m2 = LocalizationMetric(keep_samples=True), LocalizationMetric(keep_samples=True)
    m1.update(pred[:cut], None, gt[:cut], cats[:cut])
    m2.update(pred[cut:], None, gt[cut:], cats[cut:])
    merged = m1.merge(m2).compute()
    one = LocalizationMetric()
    for i in range(len(samples)):
        one.update(pred[i : i + 1], None, gt[i : i + 1], cats[i : i + 1])
    for got in (merged, one.compute()):
        assert got.keys() == expected.keys()
        assert _close(got, expected)
    np.testing.assert_allclose(m1.ious, sample_ious(pred, None, gt))
    ious = sample_ious(pred, None, gt)
    assert ((ious >= 0) & (ious <= 1)).all()
    o = expected["overall"]
    n_anomalous = sum(1 for g in gt if g)
    n_boxes = sum(1 for p in pred if np.isfinite(p).all() and any(p))
    assert o["tp"] + o["fn"] == n_anomalous == expected["anomalous"]["n"]
    assert o["tp"] + o["fp"] == n_boxes  # every answered box is either a TP or an FP
    assert o["acc"] >= o["tp"] / len(samples) - 1e-12


@settings(max_examples=40, deadline=None)
@given(st.lists(box_st.filter(lambda b: b[2] > b[0] and b[3] > b[1]), min_size=1, max_size=10))
def test_exact_prediction_scores_one(boxes):
    m = localization_metrics(boxes, None, [[b] for b in boxes])["overall"]
    assert m["miou"] == pytest.approx(1.0) and m["acc"] == 1.0 and m["f1"] == 1.0


def test_metric_object_reset_and_threshold_mismatch():
    m = LocalizationMetric()
    m.update(PRED, None, GT, CATS)
    m.reset()
    assert m.compute()["overall"]["n"] == 0
    with pytest.raises(ValueError, match="iou_threshold"):
        m.merge(LocalizationMetric(iou_threshold=0.5))


def _close(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == pytest.approx(b, abs=1e-12)


def test_ground_truth_layouts_agree():
    pred = [[0, 0, 10, 10], [0, 0, 0, 0], [2, 2, 6, 6]]
    one_each = sample_ious(pred, None, [[0, 0, 10, 10], [0, 0, 0, 0], [0, 0, 4, 4]])
    nested = sample_ious(pred, None, [[[0, 0, 10, 10]], [], [[0, 0, 4, 4]]])
    layout = [[[0, 0, 10, 10], [0, 0, 0, 0]], [[0] * 4] * 2, [[0, 0, 4, 4], [5, 5, 6, 6]]]
    padded = sample_ious(pred, None, np.array(layout))
    np.testing.assert_allclose(one_each, [1, 1, 4 / 28])
    np.testing.assert_allclose(nested, one_each)
    np.testing.assert_allclose(padded, [1, 1, 4 / 28])  # best of the two boxes of sample 2
    assert sample_ious([[0, 0, 0, 0]] * 2, None, [[], []]).tolist() == [1.0, 1.0]
    assert sample_ious(np.zeros((0, 4)), None, []).shape == (0,)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(*[st.floats(-50, 150, allow_nan=False)] * 4), min_size=1, max_size=20),
    st.lists(st.tuples(*[st.floats(-50, 150, allow_nan=False)] * 4), min_size=1, max_size=20),
)
def test_numpy_iou_equals_core_box_iou(p, g):
    """The shared oracle: the evaluation's NumPy IoU is the core formula."""
    import torch

    from differad_rl.boxes import box_iou
    from differad_rl.eval.metrics import _pair_iou

    k = min(len(p), len(g))
    pa, ga = np.asarray(p[:k], dtype=np.float64), np.asarray(g[:k], dtype=np.float64)
    want = box_iou(torch.from_numpy(pa), torch.from_numpy(ga)).numpy()
    np.testing.assert_allclose(_pair_iou(pa, ga), want, rtol=1e-12, atol=1e-12)


def test_package_exports_resolve():
    import differad_rl.eval as ev

    for name in ev.__all__:
        assert getattr(ev, name) is not None
    with pytest.raises(AttributeError):
        _ = ev.not_a_name
