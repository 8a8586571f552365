"""Synthetic anomalies: Perlin noise, Perlin texture and cut-paste (Poisson) — seeded, box == mask box."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from differad_rl.data.masks import mask_to_boxes
from differad_rl.data.synthetic import (
    PerlinAnomalyConfig,
    blob_mask,
    cut_paste_anomaly,
    perlin_anomaly,
    perlin_mask,
    perlin_noise,
    poisson_blend,
)


def _img(seed: int, shape=(48, 56, 3)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    base = 0.4 + 0.2 * np.sin(xx / 5.0)[..., None] + 0.1 * np.cos(yy / 7.0)[..., None]
    return np.clip(base + 0.05 * rng.random(shape), 0, 1)


def test_perlin_noise_range_shape_and_seed():
    a = perlin_noise((37, 50), (4, 3), np.random.default_rng(0))
    b = perlin_noise((37, 50), (4, 3), np.random.default_rng(0))
    c = perlin_noise((37, 50), (4, 3), np.random.default_rng(1))
    assert a.shape == (37, 50) and np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.abs(a).max() <= np.sqrt(2) + 1e-9 and a.std() > 0.05
    # lattice corners are zeros of gradient noise
    assert abs(perlin_noise((40, 40), (4, 4), np.random.default_rng(3))[0, 0]) < 1e-12


def test_perlin_mask_one_component():
    m = perlin_mask((64, 64), np.random.default_rng(5), threshold=0.3, min_scale=1, max_scale=3)
    assert m.any() and len(mask_to_boxes(m)) == 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_perlin_anomaly_deterministic_and_box_is_mask_box(seed):
    img, tex = _img(seed), 1.0 - _img(seed + 10)
    out1, m1, b1 = perlin_anomaly(img, tex, np.random.default_rng(seed))
    out2, m2, b2 = perlin_anomaly(img, tex, np.random.default_rng(seed))
    assert np.array_equal(out1, out2) and np.array_equal(m1, m2) and b1 == b2
    assert b1 == mask_to_boxes(m1) and len(b1) == 1
    changed = np.abs(out1 - img).max(axis=2) > 1e-12
    assert not (changed & ~m1).any()  # nothing outside the mask changes
    x1, y1, x2, y2 = b1[0]
    assert changed[y1:y2, x1:x2].any()


def test_perlin_anomaly_foreground_and_errors():
    img = _img(0)
    fg = np.zeros(img.shape[:2], bool)
    fg[10:40, 10:40] = True
    cfg = PerlinAnomalyConfig(min_area_fraction=0.0005, threshold=0.3)
    _, m, _ = perlin_anomaly(img, 1 - img, np.random.default_rng(0), cfg, foreground=fg)
    assert m.any() and not (m & ~fg).any()
    with pytest.raises(ValueError, match="after 3 tries"):
        perlin_anomaly(img, 1 - img, np.random.default_rng(0), PerlinAnomalyConfig(max_tries=3),
                       foreground=np.zeros_like(fg))
    with pytest.raises(ValueError, match="texture shape"):
        perlin_anomaly(img, img[:10], np.random.default_rng(0))
    with pytest.raises(ValueError, match="beta_range"):
        PerlinAnomalyConfig(beta_range=(0.5, 0.2))


def test_cut_paste_deterministic_box_is_pasted_mask():
    target, donor = _img(1), _img(2)
    dmask = np.zeros(donor.shape[:2], bool)
    dmask[10:18, 20:31] = True
    donor[dmask] = [0.9, 0.1, 0.1]
    o1, m1, b1 = cut_paste_anomaly(target, donor, dmask, np.random.default_rng(7))
    o2, m2, b2 = cut_paste_anomaly(target, donor, dmask, np.random.default_rng(7))
    assert np.array_equal(o1, o2) and b1 == b2 and b1 == mask_to_boxes(m1)
    x1, y1, x2, y2 = b1[0]
    assert (x2 - x1, y2 - y1) == (13, 10)  # the defect 11 x 8 dilated by one pixel
    changed = np.abs(o1 - target).max(axis=2) > 1e-9
    assert not (changed & ~m1).any() and changed[m1].mean() > 0.5
    # the pasted red defect survives the blend (its gradients are kept)
    inner = o1[y1 + 2 : y2 - 2, x1 + 2 : x2 - 2]
    assert (inner[..., 0] - inner[..., 1]).mean() > 0.3
    alpha, _, _ = cut_paste_anomaly(target, donor, dmask, np.random.default_rng(7), blend="alpha")
    assert not np.array_equal(alpha, o1)


def test_cut_paste_errors():
    img = _img(0)
    with pytest.raises(ValueError, match="empty"):
        cut_paste_anomaly(img, img, np.zeros(img.shape[:2], bool), np.random.default_rng(0))
    big = np.ones(img.shape[:2], bool)
    with pytest.raises(ValueError, match="does not fit"):
        cut_paste_anomaly(img, img, big, np.random.default_rng(0))
    with pytest.raises(ValueError, match="blend"):
        cut_paste_anomaly(img, img, big, np.random.default_rng(0), blend="magic")


def test_poisson_blend_reproduces_linear_fields():
    """With src = dst + constant, the Poisson solution inside Ω equals dst (gradients agree, the
    boundary comes from dst): the offset is removed. With a linear src gradient matching dst's,
    the same holds for any interior region."""
    yy, xx = np.mgrid[0:20, 0:24]
    dst = (0.2 + 0.01 * xx + 0.005 * yy)[..., None].repeat(3, axis=2)
    src = dst + 0.3
    m = np.zeros((20, 24), bool)
    m[5:14, 6:18] = True
    out = poisson_blend(dst, src, m)
    np.testing.assert_allclose(out, dst, atol=1e-9)
    assert np.array_equal(poisson_blend(dst, src, np.zeros_like(m)), dst)
    # a 2-D image works as well and Ω touching the image border is allowed
    m2 = np.zeros((20, 24), bool)
    m2[0:6, 0:6] = True
    np.testing.assert_allclose(poisson_blend(dst[..., 0], src[..., 0], m2), dst[..., 0], atol=1e-9)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000), st.floats(2.0, 14.0), st.floats(2.0, 14.0))
def test_blob_mask_connected_nonempty(seed, ry, rx):
    m = blob_mask((40, 40), (20.0, 20.0), (ry, rx), np.random.default_rng(seed))
    boxes = mask_to_boxes(m)
    assert m.any() and len(boxes) == 1
