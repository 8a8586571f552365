"""Anomaly map → box, the protocol for PaDiM / PatchCore / WinCLIP-style methods (docs/method.md §8).

1. Split the samples into a seeded calibration split (30 % by default) and the rest
   (:func:`calibration_split`).
2. On the calibration split pick the threshold ``t`` that maximises the pixel F1 of
   ``map >= t`` against the ground-truth masks, pooled over every pixel of every calibration
   map (:func:`best_f1_threshold`, exact: every distinct score is a candidate).
3. Binarise every map with ``map >= t``, keep the largest connected component and return its box
   ``(x1, y1, x2, y2)`` with exclusive right/bottom edges (``x2 = last column + 1``); a map with no
   pixel above the threshold gives the zero box (= "normal") (:func:`maps_to_boxes`).

Everything is vectorised: the calibration sorts the pooled scores once, and one
``scipy.ndimage.label`` call labels a whole ``(N, H, W)`` stack (no connectivity across maps).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = [
    "MapBoxes",
    "anomaly_maps_to_boxes",
    "best_f1_threshold",
    "calibration_split",
    "maps_to_boxes",
    "pixel_f1",
    "scale_boxes",
]


def calibration_split(n: int, fraction: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(n)`` into ``(calibration, evaluation)`` index arrays (both sorted).

    The calibration split has ``max(1, round(fraction · n))`` samples (for n ≥ 1); the same ``n``,
    ``fraction`` and ``seed`` always give the same split.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1 to split, got {n}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    k = min(n, max(1, int(round(fraction * n))))
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[:k]), np.sort(perm[k:])


def _pooled(maps: Any, masks: Any) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(maps, np.ndarray):
        scores = maps.reshape(-1)
    else:
        scores = np.concatenate([np.asarray(m).reshape(-1) for m in maps])
    if isinstance(masks, np.ndarray):
        labels = masks.reshape(-1)
    else:
        labels = np.concatenate([np.asarray(m).reshape(-1) for m in masks])
    if scores.shape != labels.shape:
        raise ValueError(f"maps and masks differ in size: {scores.shape[0]} vs {labels.shape[0]} pixels")
    return scores.astype(np.float64, copy=False), labels.astype(bool, copy=False)


def pixel_f1(maps: Any, masks: Any, threshold: float) -> float:
    """Pixel F1 of ``maps >= threshold`` against boolean ``masks`` (pooled; NaN if both are empty)."""
    scores, labels = _pooled(maps, masks)
    pred = scores >= threshold
    tp = float(np.count_nonzero(pred & labels))
    den = float(np.count_nonzero(pred)) + float(np.count_nonzero(labels))
    return 2 * tp / den if den > 0 else float("nan")


def best_f1_threshold(maps: Any, masks: Any) -> tuple[float, float]:
    """Threshold maximising the pooled pixel F1 of ``maps >= t``; returns ``(t, f1)``.

    Exact: with the scores sorted in decreasing order, cutting after the last copy of each distinct
    score ``s`` predicts ``k`` pixels with ``tp = cumsum(labels)[k-1]`` true positives, so
    ``F1(s) = 2·tp / (k + P)`` (P = positive pixels); the best ``s`` over all distinct scores is
    returned (ties → the highest threshold). With no positive pixel at all the F1 is 0 everywhere and
    the threshold is set just above the maximum score (nothing is flagged).
    """
    scores, labels = _pooled(maps, masks)
    if scores.size == 0:
        raise ValueError("best_f1_threshold needs at least one pixel")
    if not np.isfinite(scores).all():
        raise ValueError("anomaly maps must be finite")
    positives = int(np.count_nonzero(labels))
    if positives == 0:
        top = float(scores.max())
        return float(np.nextafter(top, np.inf)), 0.0
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    tp = np.cumsum(labels[order], dtype=np.int64)
    last = np.flatnonzero(np.r_[s[1:] != s[:-1], True])  # last index of each distinct score
    k = last + 1
    f1 = 2.0 * tp[last] / (k + positives)
    best = int(np.argmax(f1))  # first max = highest threshold among ties
    return float(s[last[best]]), float(f1[best])


@dataclass(frozen=True)
class MapBoxes:
    """Result of :func:`anomaly_maps_to_boxes`.

    Attributes:
        boxes: ``(N, 4) float64`` boxes of every map (zero box where nothing passes the threshold).
        threshold: the calibrated threshold.
        calibration_f1: pixel F1 at ``threshold`` on the calibration split.
        calibration: indices of the calibration samples.
        evaluation: indices of the remaining samples (the ones to report metrics on).
    """

    boxes: np.ndarray
    threshold: float
    calibration_f1: float
    calibration: np.ndarray
    evaluation: np.ndarray


def _structure(connectivity: int) -> np.ndarray:
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity!r}")
    s2 = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    s3 = np.zeros((3, 3, 3), dtype=bool)
    s3[1] = s2  # no connection between neighbouring maps of the stack
    return s3


def _largest_component_boxes(binary: np.ndarray, connectivity: int) -> np.ndarray:
    """Boxes of the largest component of every ``(N, H, W)`` binary map (zero box if empty)."""
    n = binary.shape[0]
    boxes = np.zeros((n, 4), dtype=np.float64)
    labels, count = ndimage.label(binary, structure=_structure(connectivity))
    if count == 0:
        return boxes
    sizes = np.bincount(labels.reshape(-1), minlength=count + 1)[1:]
    slices = ndimage.find_objects(labels)
    bb = np.array([[sl[0].start, sl[2].start, sl[1].start, sl[2].stop, sl[1].stop] for sl in slices])
    owner = bb[:, 0]
    order = np.lexsort((-sizes, owner))  # by map, then largest first (ties: lowest label)
    first = np.r_[True, owner[order][1:] != owner[order][:-1]]
    pick = order[first]
    boxes[owner[pick]] = bb[pick, 1:]
    return boxes


def maps_to_boxes(maps: Any, threshold: float, connectivity: int = 8) -> np.ndarray:
    """Binarise ``maps >= threshold`` and box the largest connected component of each map.

    Args:
        maps: ``(N, H, W)`` array, or a sequence of 2-D maps of possibly different sizes.
        threshold: score threshold (a pixel is anomalous when ``score >= threshold``).
        connectivity: 8 (diagonal neighbours connect, the default) or 4.

    Returns:
        ``(N, 4) float64`` boxes ``(x1, y1, x2, y2)`` in map pixels, exclusive right/bottom edges;
        the zero box for a map with no anomalous pixel.
    """
    if isinstance(maps, np.ndarray):
        if maps.ndim != 3:
            raise ValueError(f"maps must have shape (N, H, W), got {maps.shape}")
        return _largest_component_boxes(maps >= threshold, connectivity)
    seq = [np.asarray(m) for m in maps]
    out = np.zeros((len(seq), 4), dtype=np.float64)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, m in enumerate(seq):
        if m.ndim != 2:
            raise ValueError(f"map {i} must be 2-D, got shape {m.shape}")
        by_shape.setdefault(m.shape, []).append(i)
    for idx in by_shape.values():
        stack = np.stack([seq[i] for i in idx])
        out[idx] = _largest_component_boxes(stack >= threshold, connectivity)
    return out


def scale_boxes(boxes: Any, map_hw: Any, image_wh: Any) -> np.ndarray:
    """Boxes in map pixels → image pixels, rounded outward and clipped to the image.

    Args:
        boxes: ``(N, 4)`` boxes in map pixels (exclusive edges; zero box = none).
        map_hw: ``(N, 2)`` or ``(2,)`` map ``(height, width)``.
        image_wh: ``(N, 2)`` or ``(2,)`` image ``(width, height)``.

    ``x1' = floor(x1 · W / w)``, ``x2' = min(ceil(x2 · W / w), W)`` (same for y); zero boxes stay
    zero. Use it when the maps are at a lower resolution than the images (PaDiM, PatchCore).
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    hw = np.broadcast_to(np.asarray(map_hw, dtype=np.float64), (b.shape[0], 2))
    wh = np.broadcast_to(np.asarray(image_wh, dtype=np.float64), (b.shape[0], 2))
    sx, sy = wh[:, 0] / hw[:, 1], wh[:, 1] / hw[:, 0]
    out = np.stack(
        [
            np.floor(b[:, 0] * sx),
            np.floor(b[:, 1] * sy),
            np.minimum(np.ceil(b[:, 2] * sx), wh[:, 0]),
            np.minimum(np.ceil(b[:, 3] * sy), wh[:, 1]),
        ],
        axis=1,
    )
    return np.where((b == 0).all(axis=1, keepdims=True), 0.0, out)


def anomaly_maps_to_boxes(
    maps: Any,
    masks: Any,
    *,
    calibration_fraction: float = 0.3,
    seed: int = 0,
    connectivity: int = 8,
) -> MapBoxes:
    """The full protocol: calibrate the threshold on a seeded split, then box every map.

    ``masks`` are the ground-truth masks (boolean, same shapes as ``maps``; all-False for a normal
    sample); only the calibration split's masks are read. Report metrics on ``result.evaluation``.
    """
    n = maps.shape[0] if isinstance(maps, np.ndarray) else len(maps)
    n_masks = masks.shape[0] if isinstance(masks, np.ndarray) else len(masks)
    if n != n_masks:
        raise ValueError(f"got {n} maps but {n_masks} masks")
    calib, rest = calibration_split(n, calibration_fraction, seed)
    sub_maps: Sequence[Any] | np.ndarray
    if isinstance(maps, np.ndarray) and isinstance(masks, np.ndarray):
        sub_maps, sub_masks = maps[calib], masks[calib]
    else:
        sub_maps = [maps[i] for i in calib]
        sub_masks = [masks[i] for i in calib]
    threshold, f1 = best_f1_threshold(sub_maps, sub_masks)
    boxes = maps_to_boxes(maps, threshold, connectivity)
    return MapBoxes(boxes, threshold, f1, calib, rest)
