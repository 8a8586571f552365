"""Image AUROC, pixel AUROC and AUPRO against scalar pure-Python oracles."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from differad_rl.eval.map_metrics import aupro, auroc, image_auroc, map_metrics, pixel_auroc, pro_curve

# ---------------------------------------------------------------- scalar oracles (pure Python)


def oracle_auroc(scores: list[float], labels: list[bool]) -> float:
    """P(score of a positive > score of a negative) + ½ P(tie), by counting every pair."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return math.nan
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def oracle_regions(mask: list[list[bool]]) -> list[list[tuple[int, int]]]:
    """8-connected components of a 2-D boolean grid by flood fill."""
    h, w = len(mask), len(mask[0])
    seen: set[tuple[int, int]] = set()
    regions = []
    for r in range(h):
        for c in range(w):
            if mask[r][c] and (r, c) not in seen:
                stack, region = [(r, c)], []
                seen.add((r, c))
                while stack:
                    y, x = stack.pop()
                    region.append((y, x))
                    for dy in (-1, 0, 1):
                        for dx in (-1, 0, 1):
                            ny, nx = y + dy, x + dx
                            if 0 <= ny < h and 0 <= nx < w and mask[ny][nx] and (ny, nx) not in seen:
                                seen.add((ny, nx))
                                stack.append((ny, nx))
                regions.append(region)
    return regions


def oracle_aupro(maps: list[list[list[float]]], masks: list[list[list[bool]]], limit: float = 0.3) -> float:
    """The definition: (FPR, PRO) at every distinct threshold, trapezoid to FPR = limit, / limit."""
    regions = [(i, reg) for i, m in enumerate(masks) for reg in oracle_regions(m)]
    normal = [maps[i][r][c] for i, m in enumerate(masks) for r, row in enumerate(m) for c, v in enumerate(row) if not v]
    if not regions or not normal:
        return math.nan
    thresholds = sorted({v for m in maps for row in m for v in row}, reverse=True)
    xs, ys = [0.0], [0.0]
    for t in thresholds:
        xs.append(sum(1 for v in normal if v >= t) / len(normal))
        ys.append(sum(sum(1 for (r, c) in reg if maps[i][r][c] >= t) / len(reg) for i, reg in regions) / len(regions))
    area = 0.0
    for k in range(1, len(xs)):
        x0, x1, y0, y1 = xs[k - 1], xs[k], ys[k - 1], ys[k]
        if x1 <= limit:
            area += 0.5 * (y0 + y1) * (x1 - x0)
        else:
            if x0 < limit:
                y_at = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
                area += 0.5 * (y0 + y_at) * (limit - x0)
            break
    return area / limit


# ---------------------------------------------------------------- strategies


def _maps_and_masks(draw, n_max=3, side_max=6, levels=6):
    n = draw(st.integers(1, n_max))
    h, w = draw(st.integers(2, side_max)), draw(st.integers(2, side_max))
    maps = [[[draw(st.integers(0, levels)) / levels for _ in range(w)] for _ in range(h)] for _ in range(n)]
    masks = [[[draw(st.booleans()) for _ in range(w)] for _ in range(h)] for _ in range(n)]
    return maps, masks


maps_and_masks = st.composite(_maps_and_masks)


# ---------------------------------------------------------------- tests


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.booleans()), min_size=1, max_size=30))
def test_auroc_equals_pairwise_oracle(pairs):
    scores = [s / 5 for s, _ in pairs]
    labels = [y for _, y in pairs]
    got, want = auroc(scores, labels), oracle_auroc(scores, labels)
    assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(maps_and_masks())
def test_aupro_equals_scalar_oracle(data):
    maps, masks = data
    got = aupro([np.array(m) for m in maps], [np.array(m) for m in masks])
    want = oracle_aupro(maps, masks)
    assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(maps_and_masks())
def test_metrics_are_invariant_to_a_strictly_increasing_rescaling(data):
    maps, masks = data
    a = [np.array(m) for m in maps]
    b = [np.exp(3 * m) + 7 for m in a]
    g = [np.array(m) for m in masks]
    for f in (pixel_auroc, aupro):
        x, y = f(a, g), f(b, g)
        assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, abs=1e-12)
        assert math.isnan(x) or 0.0 <= x <= 1.0


def test_perfect_and_inverted_maps():
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 16, 16), dtype=bool)
    masks[0, 2:5, 3:9] = True
    masks[0, 10:14, 10:12] = True  # two regions in one map
    masks[1, 0:3, 0:3] = True
    perfect = masks.astype(float) + 0.01 * rng.random(masks.shape)  # ranks every positive above every negative
    assert aupro(perfect, masks) == pytest.approx(1.0)
    assert pixel_auroc(perfect, masks) == pytest.approx(1.0)
    assert image_auroc(perfect, [True, True, False]) == pytest.approx(1.0)
    assert pixel_auroc(-perfect, masks) == pytest.approx(0.0)
    assert aupro(-perfect, masks) == pytest.approx(0.0)


def test_pro_weighs_regions_equally_not_pixels():
    """A big region fully found and a small one missed give PRO ½ at that threshold (pixel TPR ≫ ½)."""
    mask = np.zeros((1, 10, 20), dtype=bool)
    mask[0, 0:10, 0:10] = True  # 100 px region
    mask[0, 0, 19] = True  # 1 px region
    m = np.zeros((1, 10, 20))
    m[0, 0:10, 0:10] = 1.0
    fpr, pro = pro_curve(m, mask)
    assert fpr[1] == 0.0 and pro[1] == pytest.approx(0.5)
    # from FPR 0 the curve stays at ½ until the last threshold jumps to (1, 1)
    assert aupro(m, mask) == pytest.approx(oracle_aupro(m.tolist(), mask.tolist()))


def test_undefined_cases_are_nan_and_bad_input_raises():
    m = np.random.default_rng(1).random((2, 4, 4))
    assert math.isnan(aupro(m, np.zeros_like(m, dtype=bool)))  # no region
    assert math.isnan(pixel_auroc(m, np.zeros_like(m, dtype=bool)))
    assert math.isnan(aupro(m, np.ones_like(m, dtype=bool)))  # no normal pixel
    assert math.isnan(image_auroc(m, [True, True]))
    with pytest.raises(ValueError, match="shape"):
        aupro([m[0]], [np.zeros((3, 3), dtype=bool)])
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(m, m > 0.5, fpr_limit=0.0)
    with pytest.raises(ValueError, match="finite"):
        auroc([0.0, np.nan], [True, False])


def test_maps_of_different_sizes_and_per_category_summary():
    rng = np.random.default_rng(2)
    maps = [rng.random((6, 8)), rng.random((5, 5)), rng.random((7, 4)), rng.random((6, 6))]
    masks = [np.zeros(m.shape, dtype=bool) for m in maps]
    masks[0][1:3, 2:5] = True
    masks[2][4:6, 0:2] = True
    for mp, mk in zip(maps, masks):
        mp[mk] += 0.5
    out = map_metrics(maps, masks, ["a", "a", "b", "b"])
    flat_s = np.concatenate([m.ravel() for m in maps])
    flat_y = np.concatenate([m.ravel() for m in masks])
    assert out["overall"]["pixel_auroc"] == pytest.approx(oracle_auroc(flat_s.tolist(), flat_y.tolist()))
    want = oracle_aupro([m.tolist() for m in maps], [m.tolist() for m in masks])
    assert out["overall"]["aupro"] == pytest.approx(want)
    assert out["per_category"]["a"]["n"] == 2
    want_img = oracle_auroc([float(m.max()) for m in maps[2:]], [True, False])
    assert out["per_category"]["b"]["image_auroc"] == pytest.approx(want_img)
    means = [out["per_category"][c]["aupro"] for c in ("a", "b")]
    assert out["category_mean"]["aupro"] == pytest.approx(np.mean(means))
