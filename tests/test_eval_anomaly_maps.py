"""Anomaly map → box: calibration against brute force, largest component boxes, seeded split."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from differad_rl.eval.anomaly_maps import (
    anomaly_maps_to_boxes,
    best_f1_threshold,
    calibration_split,
    maps_to_boxes,
    pixel_f1,
)


def _brute_force(maps: np.ndarray, masks: np.ndarray) -> tuple[float, float]:
    best_t, best_f = None, -1.0
    for t in np.unique(maps):  # increasing → keep the highest threshold among ties
        f = pixel_f1(maps, masks, float(t))
        if f >= best_f:
            best_t, best_f = float(t), f
    return best_t, best_f


@settings(max_examples=80, deadline=None)
@given(
    arrays(np.int8, (3, 5, 6), elements=st.integers(0, 6)),  # few levels → many ties
    arrays(bool, (3, 5, 6)),
)
def test_calibration_picks_f1_maximising_threshold(levels, masks):
    maps = levels.astype(np.float64) / 6.0
    if not masks.any():
        t, f = best_f1_threshold(maps, masks)
        assert f == 0.0 and not (maps >= t).any()
        return
    t, f = best_f1_threshold(maps, masks)
    bt, bf = _brute_force(maps, masks)
    assert f == pytest.approx(bf)
    assert pixel_f1(maps, masks, t) == pytest.approx(bf)
    assert t == bt


def test_calibration_on_separable_maps_is_perfect():
    rng = np.random.default_rng(0)
    masks = rng.random((4, 16, 16)) > 0.8
    maps = np.where(masks, 0.6 + 0.4 * rng.random(masks.shape), 0.5 * rng.random(masks.shape))
    t, f = best_f1_threshold(maps, masks)
    assert f == 1.0 and t == maps[masks].min()  # the highest threshold keeping every positive


def test_maps_to_boxes_largest_component_exclusive_coordinates():
    m = np.zeros((4, 10, 12))
    m[0, 2:5, 3:9] = 1.0  # 18 px → box (3, 2, 9, 5)
    m[0, 7, 0] = 1.0  # 1 px, smaller
    m[1, 5:9, 0:2] = 0.9  # touches the left border: (0, 5, 2, 9)
    m[1, 0, 11] = 0.9
    m[2, 9, 11] = 0.2  # below threshold → zero box
    m[3, 0:2, 0:2] = 1.0
    m[3, 2:4, 2:4] = 1.0  # diagonal touch: one 8-connected component, two 4-connected
    boxes = maps_to_boxes(m, 0.5)
    assert boxes.tolist() == [[3, 2, 9, 5], [0, 5, 2, 9], [0, 0, 0, 0], [0, 0, 4, 4]]
    assert maps_to_boxes(m, 0.5, connectivity=4)[3].tolist() == [0, 0, 2, 2]
    # a list of maps of different sizes gives the same boxes
    ragged = [*list(m), np.ones((3, 5))]
    assert maps_to_boxes(ragged, 0.5).tolist() == boxes.tolist() + [[0, 0, 5, 3]]
    with pytest.raises(ValueError, match="connectivity"):
        maps_to_boxes(m, 0.5, connectivity=6)


def test_calibration_split_seeded_and_disjoint():
    a = calibration_split(20, 0.3, seed=1)
    b = calibration_split(20, 0.3, seed=1)
    c = calibration_split(20, 0.3, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    assert len(a[0]) == 6 and len(a[1]) == 14
    assert set(a[0]).isdisjoint(a[1]) and set(a[0]) | set(a[1]) == set(range(20))
    assert len(calibration_split(1, 0.3)[0]) == 1
    with pytest.raises(ValueError, match="fraction"):
        calibration_split(10, 1.5)


def test_full_protocol_recovers_boxes():
    rng = np.random.default_rng(3)
    n = 20
    maps = rng.random((n, 32, 32)) * 0.3
    masks = np.zeros_like(maps, dtype=bool)
    truth = np.zeros((n, 4))
    for i in range(n):
        if i % 4 == 0:
            continue  # normal sample
        x, y = rng.integers(0, 24, size=2)
        w, h = rng.integers(2, 8, size=2)
        masks[i, y : y + h, x : x + w] = True
        maps[i, y : y + h, x : x + w] += 0.5
        truth[i] = [x, y, min(x + w, 32), min(y + h, 32)]
    res = anomaly_maps_to_boxes(maps, masks, seed=0)
    assert len(res.calibration) == 6 and len(res.evaluation) == 14
    assert res.calibration_f1 == 1.0
    np.testing.assert_array_equal(res.boxes, truth)


def test_scale_boxes_outward_and_clipped():
    from differad_rl.eval.anomaly_maps import scale_boxes

    boxes = np.array([[1, 2, 3, 4], [0, 0, 0, 0], [30, 10, 32, 32]], dtype=float)
    out = scale_boxes(boxes, (32, 32), (100, 50))  # map 32x32 → image 100 wide, 50 high
    assert out[0].tolist() == [3, 3, 10, 7]  # floor(3.125), floor(3.125), ceil(9.375), ceil(6.25)
    assert out[1].tolist() == [0, 0, 0, 0]
    assert out[2].tolist() == [93, 15, 100, 50]
    per_row = scale_boxes(boxes, [(32, 32)] * 3, [(100, 50)] * 3)
    np.testing.assert_array_equal(per_row, out)
