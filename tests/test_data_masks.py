"""Mask → boxes by connected components (exclusive x2/y2), mask loading and size checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from differad_rl.data.masks import largest_component, load_mask, mask_to_boxes, union_masks


def test_single_component_exclusive_edges():
    m = np.zeros((10, 12), bool)
    m[3:6, 4:9] = True  # rows 3..5, cols 4..8
    assert mask_to_boxes(m) == [[4, 3, 9, 6]]
    one = np.zeros((5, 5), bool)
    one[2, 3] = True
    assert mask_to_boxes(one) == [[3, 2, 4, 3]]


def test_several_components_sorted_by_area():
    m = np.zeros((20, 20), bool)
    m[0:2, 0:2] = True  # area 4
    m[5:10, 5:15] = True  # area 50
    m[15:19, 15:18] = True  # area 12
    assert mask_to_boxes(m) == [[5, 5, 15, 10], [15, 15, 18, 19], [0, 0, 2, 2]]
    assert mask_to_boxes(m, "largest") == [[5, 5, 15, 10]]


def test_touching_the_border_and_full_mask():
    m = np.zeros((8, 6), bool)
    m[5:, 4:] = True
    assert mask_to_boxes(m) == [[4, 5, 6, 8]]
    assert mask_to_boxes(np.ones((8, 6), np.uint8)) == [[0, 0, 6, 8]]


def test_empty_mask():
    assert mask_to_boxes(np.zeros((4, 4))) == []
    assert mask_to_boxes(np.zeros((4, 4)), "largest") == []
    assert not largest_component(np.zeros((4, 4))).any()


def test_connectivity_and_min_area():
    m = np.zeros((4, 4), bool)
    m[0, 0] = m[1, 1] = True  # diagonal neighbours
    assert mask_to_boxes(m) == [[0, 0, 2, 2]]
    assert mask_to_boxes(m, connectivity=1) == [[0, 0, 1, 1], [1, 1, 2, 2]]
    m[3, 3] = True
    assert mask_to_boxes(m, min_area=2) == [[0, 0, 2, 2]]


def test_ring_around_dot_overlapping_boxes():
    m = np.zeros((9, 9), bool)
    m[1:8, 1:8] = True
    m[2:7, 2:7] = False
    m[4, 4] = True
    assert mask_to_boxes(m) == [[1, 1, 8, 8], [4, 4, 5, 5]]
    lc = largest_component(m)
    assert lc.sum() == m.sum() - 1 and not lc[4, 4]


def test_bad_arguments():
    with pytest.raises(ValueError, match="2-D"):
        mask_to_boxes(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="mode"):
        mask_to_boxes(np.zeros((2, 2)), mode="some")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="connectivity"):
        mask_to_boxes(np.ones((2, 2)), connectivity=3)


@settings(max_examples=60, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 12), st.integers(1, 12))))
def test_boxes_cover_exactly_the_mask(m):
    boxes = mask_to_boxes(m)
    cover = np.zeros_like(m)
    for x1, y1, x2, y2 in boxes:
        assert 0 <= x1 < x2 <= m.shape[1] and 0 <= y1 < y2 <= m.shape[0]
        # tight: every edge row/column of the box holds a foreground pixel
        sub = m[y1:y2, x1:x2]
        assert sub[0].any() and sub[-1].any() and sub[:, 0].any() and sub[:, -1].any()
        cover[y1:y2, x1:x2] = True
    assert not (m & ~cover).any()
    areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]
    assert areas == sorted(areas, reverse=True)
    assert mask_to_boxes(m, "largest") == boxes[:1]


def _save(path: Path, arr: np.ndarray) -> Path:
    Image.fromarray(arr).save(path)
    return path


def test_load_mask_and_union(tmp_path: Path):
    a = np.zeros((6, 8), np.uint8)
    a[1:3, 1:3] = 255
    b = np.zeros((6, 8), np.uint8)
    b[4:6, 5:8] = 1
    pa, pb = _save(tmp_path / "a.png", a), _save(tmp_path / "b.png", b)
    assert load_mask(pa, image_size=(8, 6)).sum() == 4
    u = union_masks([pa, pb])
    assert u.dtype == bool and u.sum() == 4 + 6
    assert mask_to_boxes(u) == [[5, 4, 8, 6], [1, 1, 3, 3]]
    rgb = np.zeros((6, 8, 3), np.uint8)
    rgb[0, 0, 2] = 9
    assert load_mask(_save(tmp_path / "rgb.png", rgb)).sum() == 1


def test_mask_errors_name_the_file(tmp_path: Path):
    pa = _save(tmp_path / "a.png", np.zeros((6, 8), np.uint8))
    with pytest.raises(ValueError, match=r"a\.png is 8x6 but its image is 9x6"):
        load_mask(pa, image_size=(9, 6))
    pc = _save(tmp_path / "c.png", np.zeros((5, 8), np.uint8))
    with pytest.raises(ValueError, match=r"c\.png"):
        union_masks([pa, pc])
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match=r"bad\.png"):
        load_mask(tmp_path / "bad.png")
    with pytest.raises(FileNotFoundError, match=r"gone\.png"):
        load_mask(tmp_path / "gone.png")
    with pytest.raises(ValueError, match="at least one"):
        union_masks([])
