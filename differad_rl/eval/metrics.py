"""Localization metrics of the evaluation protocol (docs/method.md §8): mIoU, Acc@τ, F1@τ.

Two layers over the same code, torchmetrics style:

* private helpers ``_sample_ious`` (per-sample IoU), ``_update`` (per-sample values →
  sufficient statistics per (category, anomalous/normal) cell) and ``_compute`` (statistics →
  metric dictionaries);
* public functions (:func:`sample_ious`, :func:`mean_iou`, :func:`accuracy_at`, :func:`f1_at`,
  :func:`localization_metrics`) and the accumulating :class:`LocalizationMetric`, which sums the
  statistics of many ``update`` calls (and of other metric objects via :meth:`merge`) and calls
  the same ``_compute`` at the end — so the object and the functions agree exactly.

Conventions (all arrays NumPy, batch first, boxes ``(x1, y1, x2, y2)`` in one coordinate space,
exclusive right/bottom edges):

* **Per-sample IoU.** A *normal* target (no ground-truth box, or only zero boxes) scores 1 iff the
  prediction is valid and is the zero box ``(0, 0, 0, 0)``, else 0. An *anomalous* target scores
  the IoU of the prediction with the best-matching ground-truth box (``max_j IoU(p, g_j)``) when
  the prediction is a valid, non-zero, non-degenerate box (``x2 > x1`` and ``y2 > y1``), else 0
  (missing/unparsable, zero or degenerate answers score 0).
* **Acc@τ** = share of samples with IoU ≥ τ. A normal sample's IoU is 0 or 1, so it is correct iff
  it answers the zero box.
* **F1@τ** (localization F1): a prediction *has a box* when it is valid and not the zero box.
  TP: anomalous target with IoU ≥ τ. FP: a box on a normal target, or a box with IoU < τ on an
  anomalous target. FN: anomalous target without IoU ≥ τ. An anomalous target answered by a wrong
  box therefore counts one FP *and* one FN. Precision = TP/(TP+FP), recall = TP/(TP+FN),
  F1 = 2TP / (2TP + FP + FN). A ratio whose denominator is 0 is NaN (written ``null`` in JSON).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from differad_rl.boxes import inter_union

__all__ = [
    "STAT_FIELDS",
    "LocalizationMetric",
    "accuracy_at",
    "f1_at",
    "localization_metrics",
    "mean_iou",
    "ragged_ground_truth",
    "sample_ious",
]

#: Columns of the sufficient-statistics arrays (one row per (category, kind) cell).
STAT_FIELDS: tuple[str, ...] = ("n", "iou_sum", "correct", "tp", "fp", "fn", "invalid")
_N, _IOU, _COR, _TP, _FP, _FN, _INV = range(len(STAT_FIELDS))
_KINDS = ("anomalous", "normal")  # kind index 0 = anomalous, 1 = normal


def _check_threshold(iou_threshold: float) -> float:
    value = float(iou_threshold)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold!r}")
    return value


def _as_pred(pred_boxes: Any, pred_valid: Any | None) -> tuple[np.ndarray, np.ndarray]:
    """Predictions as ``(N, 4) float64`` and ``(N,) bool``; NaN rows are invalid."""
    boxes = np.asarray(pred_boxes, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        if boxes.size == 0:
            boxes = boxes.reshape(0, 4)
        else:
            raise ValueError(f"pred_boxes must have shape (N, 4), got {boxes.shape}")
    finite = np.isfinite(boxes).all(axis=1)
    if pred_valid is None:
        valid = finite
    else:
        valid = np.asarray(pred_valid, dtype=bool).reshape(-1)
        if valid.shape[0] != boxes.shape[0]:
            raise ValueError(
                f"pred_valid has {valid.shape[0]} entries but pred_boxes has {boxes.shape[0]} rows"
            )
        valid = valid & finite
    return boxes, np.asarray(valid, dtype=bool)


def ragged_ground_truth(gt_boxes: Any, num_samples: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Normalise ground truth to a ragged ``(boxes (K, 4) float64, owner (K,) int64, N)`` form.

    Args:
        gt_boxes: either ``(N, 4)`` (an array or a list of N boxes: one box per sample, the zero
            box means normal), ``(N, M, 4)`` (M boxes per sample, zero boxes are padding), or a
            sequence of N per-sample box lists of any lengths (``[]`` or only zero boxes means
            normal). Nesting depth decides: a list of boxes is one box per sample.
        num_samples: expected N (checked when given).

    Zero boxes are dropped, so a sample owns no box iff it is a normal target. ``owner[k]`` is the
    sample index of box ``k``; boxes of one sample are contiguous and samples are in order.
    """
    try:
        arr: np.ndarray | None = np.asarray(gt_boxes, dtype=np.float64)
    except (ValueError, TypeError):  # ragged: samples with different box counts
        arr = None
    if arr is not None and arr.ndim == 2 and arr.shape[1] == 0:  # [[], [], ...]: all normal
        n, boxes, owner = arr.shape[0], np.zeros((0, 4)), np.zeros(0, dtype=np.int64)
    elif arr is not None and arr.ndim == 2:
        if arr.shape[1] != 4:
            raise ValueError(f"gt_boxes must have shape (N, 4), got {arr.shape}")
        n = arr.shape[0]
        owner = np.arange(n, dtype=np.int64)
        boxes = arr
    elif arr is not None and arr.ndim == 3:
        if arr.shape[2] != 4:
            raise ValueError(f"gt_boxes must have shape (N, M, 4), got {arr.shape}")
        n, m = arr.shape[:2]
        owner = np.repeat(np.arange(n, dtype=np.int64), m)
        boxes = arr.reshape(-1, 4)
    elif arr is not None and arr.ndim == 1 and arr.size == 0:
        n, boxes, owner = 0, np.zeros((0, 4)), np.zeros(0, dtype=np.int64)
    else:
        seq = list(gt_boxes)
        n = len(seq)
        lengths = np.fromiter((len(b) for b in seq), dtype=np.int64, count=n)
        chain = itertools.chain.from_iterable
        try:
            if not all(len(b) == 4 for b in chain(seq)):
                raise ValueError
            boxes = np.fromiter(chain(chain(seq)), dtype=np.float64).reshape(-1, 4)
        except (ValueError, TypeError):
            raise ValueError("every ground-truth box must have 4 numbers (x1, y1, x2, y2)") from None
        owner = np.repeat(np.arange(n, dtype=np.int64), lengths)
    if num_samples is not None and n != num_samples:
        raise ValueError(f"ground truth has {n} samples but the predictions have {num_samples}")
    keep = ~(boxes == 0).all(axis=1)
    return boxes[keep], owner[keep], n


def _pair_iou(p: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Elementwise IoU of ``(K, 4)`` float64 arrays: the formula of :func:`differad_rl.boxes.box_iou`
    over the same kernel (:func:`differad_rl.boxes.inter_union`), in NumPy.

    The evaluation path is NumPy end to end; torch's intra-op threads make the same 100k-element
    op 50-100x slower on an oversubscribed CPU. The tests check equality with the core function.
    """
    inter, union = inter_union(p, g)
    out = np.zeros_like(inter)
    np.divide(inter, union, out=out, where=union > 0)
    return out


def _sample_ious(
    pred: np.ndarray, valid: np.ndarray, gt: np.ndarray, owner: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-sample IoU, ``is_normal`` and ``has_box`` (see the module docstring)."""
    zero = valid & (pred == 0).all(axis=1)
    has_box = valid & ~zero
    usable = has_box & (pred[:, 2] > pred[:, 0]) & (pred[:, 3] > pred[:, 1])
    iou = np.zeros(n, dtype=np.float64)
    pairs = usable[owner]  # only (usable prediction, GT box) pairs
    if pairs.any():
        own = owner[pairs]
        np.maximum.at(iou, own, _pair_iou(pred[own], gt[pairs]))
    is_normal = np.bincount(owner, minlength=n)[:n] == 0
    iou[is_normal] = zero[is_normal]
    return iou, is_normal, has_box


def sample_ious(pred_boxes: Any, pred_valid: Any | None, gt_boxes: Any) -> np.ndarray:
    """Per-sample IoU of the protocol, ``(N,) float64`` in [0, 1].

    ``pred_boxes`` ``(N, 4)`` (NaN rows = no prediction), ``pred_valid`` ``(N,)`` bool or None
    (then validity = finite row), ``gt_boxes`` as in :func:`ragged_ground_truth`. With several
    ground-truth boxes the prediction is scored against the best-matching one.
    """
    pred, valid = _as_pred(pred_boxes, pred_valid)
    gt, owner, n = ragged_ground_truth(gt_boxes, pred.shape[0])
    return _sample_ious(pred, valid, gt, owner, n)[0]


def mean_iou(ious: Any) -> float:
    """mIoU = mean of the per-sample IoUs (NaN for no samples)."""
    arr = np.asarray(ious, dtype=np.float64)
    return float(arr.mean()) if arr.size else float("nan")


def accuracy_at(ious: Any, iou_threshold: float = 0.3) -> float:
    """Acc@τ = share of samples with IoU ≥ τ (NaN for no samples)."""
    t = _check_threshold(iou_threshold)
    arr = np.asarray(ious, dtype=np.float64)
    return float((arr >= t).mean()) if arr.size else float("nan")


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else float("nan")


def f1_at(ious: Any, is_normal: Any, has_box: Any, iou_threshold: float = 0.3) -> float:
    """Localization F1@τ = 2TP / (2TP + FP + FN) with TP/FP/FN as in the module docstring."""
    t = _check_threshold(iou_threshold)
    iou = np.asarray(ious, dtype=np.float64)
    normal = np.asarray(is_normal, dtype=bool)
    box = np.asarray(has_box, dtype=bool)
    hit = ~normal & (iou >= t)
    tp = int(hit.sum())
    fp = int((box & (normal | ~hit)).sum())
    fn = int((~normal & ~hit).sum())
    return _ratio(2 * tp, 2 * tp + fp + fn)


def _update(
    ious: np.ndarray,
    is_normal: np.ndarray,
    has_box: np.ndarray,
    valid: np.ndarray,
    categories: Any | None,
    iou_threshold: float,
) -> tuple[list[str], np.ndarray]:
    """Per-sample values → ``(category names, stats (C, 2, len(STAT_FIELDS)) float64)``.

    Cell ``[c, k]`` holds the sums over the samples of category ``c`` and kind ``k`` (0 anomalous,
    1 normal) of: count, IoU, correct (IoU ≥ τ), TP, FP, FN, invalid (no parsable box).
    """
    t = _check_threshold(iou_threshold)
    n = ious.shape[0]
    if categories is None:
        names, inverse = ["all"], np.zeros(n, dtype=np.int64)
    else:
        cats = np.asarray(categories).astype(str, copy=False).reshape(-1)
        if cats.shape[0] != n:
            raise ValueError(f"categories has {cats.shape[0]} entries but there are {n} samples")
        uniq, inverse = np.unique(cats, return_inverse=True)
        names = [str(u) for u in uniq]
    hit = ~is_normal & (ious >= t)
    cols = np.stack(
        [
            np.ones(n),
            ious,
            ious >= t,
            hit,
            has_box & (is_normal | ~hit),
            ~is_normal & ~hit,
            ~valid,
        ],
        axis=1,
    ).astype(np.float64)
    cell = inverse.reshape(-1) * 2 + is_normal.astype(np.int64)
    size = 2 * len(names)
    stats = np.stack([np.bincount(cell, weights=cols[:, j], minlength=size) for j in range(cols.shape[1])], 1)
    return names, stats.reshape(len(names), 2, len(STAT_FIELDS))


def _summary(row: np.ndarray) -> dict[str, float]:
    """One statistics row → metric dictionary."""
    n, iou_sum, correct, tp, fp, fn, invalid = (float(v) for v in row)
    return {
        "n": int(n),
        "miou": _ratio(iou_sum, n),
        "acc": _ratio(correct, n),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "tp": int(tp),
        "fp": int(fp),
        "fn": int(fn),
        "invalid_rate": _ratio(invalid, n),
    }


def _compute(names: Sequence[str], stats: np.ndarray, iou_threshold: float) -> dict[str, Any]:
    """Statistics ``(C, 2, F)`` → ``{"iou_threshold", "overall", "anomalous", "normal", "per_category"}``.

    ``per_category[name]`` is that category's summary plus its ``"anomalous"``/``"normal"`` parts.
    """
    stats = np.asarray(stats, dtype=np.float64).reshape(len(names), 2, len(STAT_FIELDS))
    per_category: dict[str, Any] = {}
    for c, name in enumerate(names):
        entry: dict[str, Any] = _summary(stats[c].sum(axis=0))
        for k, kind in enumerate(_KINDS):
            entry[kind] = _summary(stats[c, k])
        per_category[name] = entry
    by_kind = stats.sum(axis=0)
    return {
        "iou_threshold": float(iou_threshold),
        "overall": _summary(by_kind.sum(axis=0)),
        "anomalous": _summary(by_kind[0]),
        "normal": _summary(by_kind[1]),
        "per_category": per_category,
    }


def localization_metrics(
    pred_boxes: Any,
    pred_valid: Any | None,
    gt_boxes: Any,
    categories: Any | None = None,
    iou_threshold: float = 0.3,
) -> dict[str, Any]:
    """All protocol metrics at once: mIoU, Acc@τ, F1@τ (+ precision, recall, counts).

    Returns ``{"iou_threshold", "overall", "anomalous", "normal", "per_category"}``; each summary is
    ``{"n", "miou", "acc", "f1", "precision", "recall", "tp", "fp", "fn", "invalid_rate"}``.
    ``categories``: ``(N,)`` names (None → a single category ``"all"``).
    """
    pred, valid = _as_pred(pred_boxes, pred_valid)
    gt, owner, n = ragged_ground_truth(gt_boxes, pred.shape[0])
    ious, is_normal, has_box = _sample_ious(pred, valid, gt, owner, n)
    names, stats = _update(ious, is_normal, has_box, valid, categories, iou_threshold)
    return _compute(names, stats, iou_threshold)


class LocalizationMetric:
    """Accumulating protocol metrics: ``update`` with batches, ``compute`` at the end, ``merge`` shards.

    Holds only sufficient statistics per (category, anomalous/normal) cell — memory does not grow
    with the number of samples unless ``keep_samples=True`` (then the per-sample IoUs are kept in
    :attr:`ious` for histograms). ``compute()`` equals :func:`localization_metrics` over the
    concatenation of every update.

    Example:
        >>> m = LocalizationMetric()
        >>> _ = m.update([[0, 0, 10, 10]], None, [[[0, 0, 10, 10]]], ["a"])
        >>> m.compute()["overall"]["miou"]
        1.0
    """

    def __init__(self, iou_threshold: float = 0.3, keep_samples: bool = False) -> None:
        self.iou_threshold = _check_threshold(iou_threshold)
        self.keep_samples = bool(keep_samples)
        self.reset()

    def reset(self) -> None:
        """Forget every update."""
        self._stats: dict[str, np.ndarray] = {}
        self._ious: list[np.ndarray] = []

    def update(
        self, pred_boxes: Any, pred_valid: Any | None, gt_boxes: Any, categories: Any | None = None
    ) -> np.ndarray:
        """Add a batch (same arguments as :func:`localization_metrics`); returns its per-sample IoUs."""
        pred, valid = _as_pred(pred_boxes, pred_valid)
        gt, owner, n = ragged_ground_truth(gt_boxes, pred.shape[0])
        ious, is_normal, has_box = _sample_ious(pred, valid, gt, owner, n)
        names, stats = _update(ious, is_normal, has_box, valid, categories, self.iou_threshold)
        self._add(names, stats)
        if self.keep_samples:
            self._ious.append(ious)
        return ious

    def _add(self, names: Iterable[str], stats: np.ndarray) -> None:
        for name, cell in zip(names, stats, strict=True):
            if name in self._stats:
                self._stats[name] = self._stats[name] + cell
            else:
                self._stats[name] = np.array(cell, dtype=np.float64)

    def merge(self, other: LocalizationMetric) -> LocalizationMetric:
        """Add ``other``'s statistics (e.g. another worker's shard) into this object; returns self."""
        if other.iou_threshold != self.iou_threshold:
            raise ValueError(
                f"cannot merge metrics with iou_threshold {other.iou_threshold} into {self.iou_threshold}"
            )
        names = list(other._stats)
        if names:
            self._add(names, np.stack([other._stats[k] for k in names]))
        self._ious.extend(other._ious)
        return self

    @property
    def ious(self) -> np.ndarray:
        """Per-sample IoUs of every update in order (empty unless ``keep_samples=True``)."""
        return np.concatenate(self._ious) if self._ious else np.zeros(0)

    def compute(self) -> dict[str, Any]:
        """The metric dictionary of :func:`localization_metrics` over everything seen so far."""
        names = sorted(self._stats)
        if not names:
            stats = np.zeros((0, 2, len(STAT_FIELDS)))
        else:
            stats = np.stack([self._stats[k] for k in names])
        return _compute(names, stats, self.iou_threshold)
