"""The anomaly-detection community's metrics of anomaly maps: image AUROC, pixel AUROC, AUPRO.

* **AUROC** (:func:`auroc`) — area under the ROC curve = the Mann–Whitney probability that a
  positive scores above a negative, ties counting ½:
  ``AUROC = (R₊ − P(P + 1)/2) / (P·N)`` with ``R₊`` the sum of the positives' average ranks.
* **Image AUROC** — the image score is the map's maximum; positive = anomalous target.
* **Pixel AUROC** — every pixel of every map pooled; positive = inside the ground-truth mask.
* **AUPRO** (:func:`aupro`; Bergmann et al., "The MVTec Anomaly Detection Dataset", IJCV 2021, and
  their evaluation code). Ground-truth regions are the 8-connected components of every mask. For a
  threshold t: ``FPR(t)`` = share of all normal pixels (outside every region) with score ≥ t;
  ``PRO(t)`` = mean over all regions of the share of the region's pixels with score ≥ t. The curve
  is traced exactly (every distinct score is a threshold, starting from (0, 0)), integrated with the
  trapezoid rule up to ``FPR = 0.3`` (the value at 0.3 linearly interpolated) and divided by 0.3, so
  a perfect map scores 1.

Undefined cases give NaN: AUROC without both classes, AUPRO without any region or normal pixel.
Maps may have different shapes (pass a sequence of 2-D arrays); masks must match them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage, stats

__all__ = ["aupro", "auroc", "image_auroc", "map_metrics", "pixel_auroc", "pro_curve"]

FPR_LIMIT = 0.3


def auroc(scores: Any, labels: Any) -> float:
    """AUROC of ``scores`` against boolean ``labels`` (1-D, same length), ties count ½; NaN if one class."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=bool).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.shape[0]} vs {y.shape[0]}")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    p = int(np.count_nonzero(y))
    n = y.size - p
    if p == 0 or n == 0:
        return float("nan")
    ranks = stats.rankdata(s)  # average ranks for ties
    return float((ranks[y].sum() - p * (p + 1) / 2.0) / (p * n))


def _flat(arrays: Any) -> np.ndarray:
    if isinstance(arrays, np.ndarray):
        return arrays.reshape(-1)
    return np.concatenate([np.asarray(a).reshape(-1) for a in arrays]) if len(arrays) else np.zeros(0)


def image_auroc(maps: Any, labels: Any) -> float:
    """AUROC of the image scores ``max(map)`` against ``labels`` (True = anomalous target)."""
    scores = np.array([float(np.max(m)) for m in maps], dtype=np.float64)
    return auroc(scores, labels)


def pixel_auroc(maps: Any, masks: Any) -> float:
    """AUROC of every pixel of every map (pooled) against the masks."""
    s, y = _flat(maps), _flat(masks)
    if s.shape != y.shape:
        raise ValueError(f"maps and masks differ in size: {s.shape[0]} vs {y.shape[0]} pixels")
    return auroc(s, y.astype(bool))


def pro_curve(maps: Sequence[Any], masks: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """The exact ``(fpr, pro)`` curve (both non-decreasing, starting at (0, 0)); see the module docstring.

    Raises ``ValueError`` when there is no ground-truth region or no normal pixel.
    """
    if len(maps) != len(masks):
        raise ValueError(f"got {len(maps)} maps but {len(masks)} masks")
    eight = np.ones((3, 3), dtype=bool)
    scores, fp_change, pro_change = [], [], []
    n_regions = 0
    n_ok = 0
    for i, (m, g) in enumerate(zip(maps, masks, strict=True)):
        m, g = np.asarray(m, dtype=np.float64), np.asarray(g, dtype=bool)
        if m.shape != g.shape or m.ndim != 2:
            raise ValueError(f"map {i} has shape {m.shape} but its mask has {g.shape} (both must be 2-D)")
        labels, count = ndimage.label(g, structure=eight)
        sizes = np.bincount(labels.reshape(-1), minlength=count + 1).astype(np.float64)
        inv = np.zeros_like(sizes)
        inv[1:] = 1.0 / sizes[1:]
        scores.append(m.reshape(-1))
        ok = labels.reshape(-1) == 0
        fp_change.append(ok)
        pro_change.append(inv[labels.reshape(-1)])
        n_regions += count
        n_ok += int(np.count_nonzero(ok))
    if n_regions == 0 or n_ok == 0:
        raise ValueError("AUPRO needs at least one ground-truth region and one normal pixel")
    s = np.concatenate(scores)
    if not np.isfinite(s).all():
        raise ValueError("anomaly maps must be finite")
    order = np.argsort(-s, kind="stable")
    s = s[order]
    fpr = np.cumsum(np.concatenate(fp_change)[order], dtype=np.float64) / n_ok
    pro = np.cumsum(np.concatenate(pro_change)[order]) / n_regions
    last = np.r_[s[1:] != s[:-1], True]  # one point per distinct threshold
    return np.r_[0.0, fpr[last]], np.r_[0.0, pro[last]]


def _trapezoid_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under ``y(x)`` for ``x`` in ``[x[0], x_max]`` (x sorted; value at x_max interpolated)."""
    k = int(np.searchsorted(x, x_max, side="right"))  # points with x <= x_max
    area = float(np.sum(0.5 * (y[1:k] + y[: k - 1]) * (x[1:k] - x[: k - 1])))
    if k < x.size and x[k - 1] < x_max:
        y_at = y[k - 1] + (y[k] - y[k - 1]) * (x_max - x[k - 1]) / (x[k] - x[k - 1])
        area += 0.5 * (y_at + y[k - 1]) * (x_max - x[k - 1])
    return area


def aupro(maps: Sequence[Any], masks: Sequence[Any], fpr_limit: float = FPR_LIMIT) -> float:
    """Area under the PRO curve up to ``FPR = fpr_limit`` (0.3), divided by ``fpr_limit``; NaN if undefined."""
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit!r}")
    try:
        fpr, pro = pro_curve(maps, masks)
    except ValueError as exc:
        if "at least one ground-truth region" in str(exc):
            return float("nan")
        raise
    return _trapezoid_to(fpr, pro, fpr_limit) / fpr_limit


def _nan_to_none(v: float) -> float | None:
    return None if np.isnan(v) else float(v)


def map_metrics(
    maps: Sequence[Any], masks: Sequence[Any], categories: Sequence[str] | None = None
) -> dict[str, Any]:
    """Image AUROC, pixel AUROC and AUPRO, overall and per category (``None`` where undefined).

    A sample is anomalous when its mask has a positive pixel. Per category the metrics use only that
    category's samples; ``mean`` is the unweighted mean over the categories where a metric is
    defined (the way per-category results are usually summarised).
    """
    if len(maps) != len(masks):
        raise ValueError(f"got {len(maps)} maps but {len(masks)} masks")
    labels = np.array([bool(np.any(g)) for g in masks], dtype=bool)

    def block(idx: Sequence[int]) -> dict[str, Any]:
        mp = [maps[i] for i in idx]
        mk = [masks[i] for i in idx]
        return {
            "n": len(idx),
            "image_auroc": _nan_to_none(image_auroc(mp, labels[list(idx)])),
            "pixel_auroc": _nan_to_none(pixel_auroc(mp, mk)),
            "aupro": _nan_to_none(aupro(mp, mk)),
        }

    out: dict[str, Any] = {"overall": block(range(len(maps)))}
    if categories is not None:
        if len(categories) != len(maps):
            raise ValueError(f"got {len(categories)} categories for {len(maps)} maps")
        per: dict[str, Any] = {}
        for cat in sorted(set(categories)):
            per[cat] = block([i for i, c in enumerate(categories) if c == cat])
        out["per_category"] = per
        mean: dict[str, Any] = {}
        for key in ("image_auroc", "pixel_auroc", "aupro"):
            vals = [v[key] for v in per.values() if v[key] is not None]
            mean[key] = float(np.mean(vals)) if vals else None
        out["category_mean"] = mean
    return out
