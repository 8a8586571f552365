"""The evaluation protocol (DESIGN §8): prediction file + pair records → per-sample IoUs + metrics.

Prediction file (JSONL, one object a line)::

    {"id": "brick/scratch/003", "output": "<think>…</think><answer>(12,40),(88,95)</answer>"}
    {"id": "brick/good/004", "box": [0, 0, 0, 0]}      # already parsed (null = no box)

``output`` is the raw model text, parsed with the core parser (:mod:`differad_rl.parsing`): the
first box inside the first ``<answer>…</answer>``, or — for non-reasoning families — the first box
anywhere when there is no answer tag. ``box`` skips parsing. Either way the box is in the model's
coordinate space and is converted back to original target pixels with
:func:`differad_rl.coords.from_model_space` before scoring against the records' boxes.

Families (the output format each is prompted for, and the coordinate space it writes):

==============  ==============================  ===========================================
family          format                          default space
==============  ==============================  ===========================================
qwen2_vl        ``(x1,y1),(x2,y2)`` (opt.        ``qwen2_vl`` (0..1000 relative)
                ``<|box_start|>…<|box_end|>``)
qwen2_5_vl      same                            ``qwen2_5_vl`` (pixels of the resized image)
qwen3_vl        same                            ``qwen3_vl`` (0..1000 relative)
internvl        ``<box>[[x1,y1,x2,y2]]</box>``  ``qwen2_vl`` (0..1000 relative)
minicpm         ``x1 y1 x2 y2``                 ``qwen2_vl`` (0..1000 relative)
cogvlm          ``[[x0,y0,x1,y1]]``             ``qwen2_vl`` (0..1000 relative; CogVLM's
                                                000..999 grid is within 0.1 % of it)
mantis          ``[x1, y1, x2, y2]``            ``pixel``
mplug_owl3      ``[x1, y1, x2, y2]``            ``pixel``
pixel           any of the above                ``pixel`` (e.g. the classic baseline)
==============  ==============================  ===========================================

``space=`` overrides the family's default; ``reasoning=True`` (a DifferAD-R1-style model) makes
the ``<answer>`` tag mandatory (``require_answer=True``): an output without it is invalid.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from differad_rl.coords import SPACES, from_model_space
from differad_rl.data.records import iter_jsonl
from differad_rl.eval.metrics import _as_pred, _compute, _sample_ious, _update, ragged_ground_truth
from differad_rl.parsing import completion_text, parse_boxes_batch

__all__ = [
    "FAMILIES",
    "EvalConfig",
    "EvalResult",
    "Predictions",
    "align_ids",
    "evaluate",
    "evaluate_outputs",
    "evaluate_records",
    "read_predictions",
]

#: family → default coordinate space (see the module docstring).
FAMILIES: dict[str, str] = {
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_5_vl",
    "qwen3_vl": "qwen3_vl",
    "internvl": "qwen2_vl",
    "minicpm": "qwen2_vl",
    "cogvlm": "qwen2_vl",
    "mantis": "pixel",
    "mplug_owl3": "pixel",
    "pixel": "pixel",
}


@dataclass(frozen=True)
class EvalConfig:
    """Options of the protocol (defaults = the paper's: τ = 0.3, Qwen2.5-VL pixel budget).

    Attributes:
        family: a key of :data:`FAMILIES`.
        space: coordinate space of the predictions (None → the family's default); one of
            ``differad_rl.coords.SPACES``.
        reasoning: the ``<answer>`` tag is required (reasoning models); otherwise the first box
            anywhere counts when there is no answer tag.
        iou_threshold: τ of Acc@τ and F1@τ.
        min_pixels, max_pixels: Qwen2.5-VL ``smart_resize`` budget (space ``qwen2_5_vl`` only).
        allow_missing: ground-truth ids absent from the predictions count as invalid (IoU 0)
            instead of raising.
    """

    family: str = "qwen2_5_vl"
    space: str | None = None
    reasoning: bool = False
    iou_threshold: float = 0.3
    min_pixels: int = 3136
    max_pixels: int = 1003520
    allow_missing: bool = False

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {self.family!r}")
        if self.space is not None and self.space not in SPACES:
            raise ValueError(f"space must be one of {list(SPACES)} or None, got {self.space!r}")
        if not 0.0 < float(self.iou_threshold) <= 1.0:
            raise ValueError(f"iou_threshold must be in (0, 1], got {self.iou_threshold!r}")
        if int(self.min_pixels) <= 0 or int(self.max_pixels) < int(self.min_pixels):
            raise ValueError(
                f"need 0 < min_pixels <= max_pixels, got min_pixels={self.min_pixels!r}, "
                f"max_pixels={self.max_pixels!r}"
            )

    @property
    def resolved_space(self) -> str:
        """The coordinate space actually used."""
        return self.space if self.space is not None else FAMILIES[self.family]


@dataclass
class Predictions:
    """A prediction file in memory.

    ``outputs[i]`` is the raw text (None when the line gave ``box``), ``boxes`` ``(N, 4)`` holds the
    given boxes (NaN rows for text lines and for ``"box": null``), ``given[i]`` is True for box lines.
    """

    ids: list[str]
    outputs: list[str | None]
    boxes: np.ndarray
    given: np.ndarray


def read_predictions(path: str | os.PathLike[str]) -> Predictions:
    """Read a prediction JSONL file; a bad line raises ``ValueError`` starting with ``<file>:<line>:``.

    Each line needs ``"id"`` and either ``"output"`` (str) or ``"box"`` (4 numbers or null).
    Duplicate ids raise ``ValueError`` naming them.
    """
    p = Path(path)
    ids: list[str] = []
    outputs: list[str | None] = []
    boxes: list[Any] = []
    nan4 = [float("nan")] * 4
    for lineno, obj in iter_jsonl(p, what="prediction file"):
        if not isinstance(obj, dict) or "id" not in obj:
            raise ValueError(f"{p}:{lineno}: each line must be an object with an 'id' field")
        if "output" in obj:
            out = obj["output"]  # a string, or a chat message list (TRL's conversational form)
            outputs.append(out if isinstance(out, str) else ("" if out is None else completion_text(out)))
            boxes.append(nan4)
        elif "box" in obj:
            box = obj["box"]
            if box is None:
                boxes.append(nan4)
            else:
                if not isinstance(box, list | tuple) or len(box) != 4:
                    raise ValueError(f"{p}:{lineno}: field 'box' must be 4 numbers or null, got {box!r}")
                try:
                    boxes.append([float(v) for v in box])
                except (TypeError, ValueError):
                    raise ValueError(f"{p}:{lineno}: field 'box' must be 4 numbers, got {box!r}") from None
            outputs.append(None)
        else:
            raise ValueError(f"{p}:{lineno}: record {obj['id']!r} has neither 'output' nor 'box'")
        ids.append(str(obj["id"]))
    given = np.fromiter((o is None for o in outputs), dtype=bool, count=len(outputs))
    arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return Predictions(ids, outputs, arr, given)


def _name_ids(ids: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(i) for i in list(ids)[:limit])
    more = f", … ({len(ids)} in all)" if len(ids) > limit else f" ({len(ids)} in all)"
    return shown + more


def align_ids(pred_ids: Sequence[str], gt_ids: Sequence[str], allow_missing: bool = False) -> np.ndarray:
    """Index of each ground-truth id in ``pred_ids`` (``-1`` where missing and ``allow_missing``).

    Raises ``ValueError`` naming the first few offending ids and their count when predictions hold
    ids unknown to the ground truth, when an id appears twice in the predictions, or (unless
    ``allow_missing``) when ground-truth ids have no prediction.
    """
    index: dict[str, int] = {}
    dups: list[str] = []
    for i, pid in enumerate(pred_ids):
        if pid in index:
            dups.append(pid)
        index[pid] = i
    if dups:
        raise ValueError(f"duplicate prediction ids: {_name_ids(dups)}")
    gt_set = set(gt_ids)
    if len(gt_set) != len(gt_ids):
        seen: set[str] = set()
        gdups = [g for g in gt_ids if g in seen or seen.add(g)]  # type: ignore[func-returns-value]
        raise ValueError(f"duplicate ground-truth ids: {_name_ids(gdups)}")
    unknown = [pid for pid in pred_ids if pid not in gt_set]
    if unknown:
        raise ValueError(f"prediction ids not in the ground truth: {_name_ids(unknown)}")
    pos = np.fromiter((index.get(g, -1) for g in gt_ids), dtype=np.int64, count=len(gt_ids))
    if not allow_missing and (pos < 0).any():
        missing = [g for g, k in zip(gt_ids, pos, strict=True) if k < 0]
        raise ValueError(f"ground-truth ids without a prediction: {_name_ids(missing)}")
    return pos


@dataclass
class EvalResult:
    """Outcome of one evaluation.

    Attributes:
        metrics: the dictionary of :func:`differad_rl.eval.metrics.localization_metrics`.
        ids: sample ids in ground-truth order.
        ious: ``(N,)`` per-sample IoU.
        pred_boxes: ``(N, 4)`` predictions in original target pixels (NaN rows = invalid).
        pred_valid: ``(N,)`` a box was parsed.
        gt_boxes: per-sample ground-truth boxes (original pixels; ``[]`` = normal; the records' lists).
        categories: ``(N,)`` category names.
        targets: target image paths (for the visual report; empty when unknown).
        config: the protocol options.
    """

    metrics: dict[str, Any]
    ids: list[str]
    ious: np.ndarray
    pred_boxes: np.ndarray
    pred_valid: np.ndarray
    gt_boxes: list[list[list[float]]] | list[Any]
    categories: np.ndarray
    targets: list[str] = field(default_factory=list)
    config: EvalConfig = field(default_factory=EvalConfig)

    def summary(self) -> dict[str, Any]:
        """JSON-ready ``{"config": …, "space": …, **metrics}``."""
        return {"config": asdict(self.config), "space": self.config.resolved_space, **self.metrics}


def evaluate_outputs(
    outputs: Sequence[str | None] | None,
    gt_boxes: Any,
    widths: Any,
    heights: Any,
    categories: Any | None = None,
    *,
    given_boxes: Any | None = None,
    config: EvalConfig | None = None,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray]:
    """In-memory protocol: parse, convert to pixels, score. Returns ``(metrics, ious, boxes, valid)``.

    Args:
        outputs: N raw model texts (None entries are taken from ``given_boxes``); None = all given.
        gt_boxes: ground truth in original pixels (see ``metrics.ragged_ground_truth``).
        widths, heights: ``(N,)`` target sizes (needed by the relative and resized spaces).
        categories: ``(N,)`` category names or None.
        given_boxes: ``(N, 4)`` already-parsed boxes in model space (NaN = none) for None outputs.
        config: protocol options.
    """
    cfg = config if config is not None else EvalConfig()
    if outputs is None:
        if given_boxes is None:
            raise ValueError("evaluate_outputs needs outputs or given_boxes")
        boxes = np.array(given_boxes, dtype=np.float64).reshape(-1, 4)
    else:
        n = len(outputs)
        boxes = (
            np.full((n, 4), np.nan)
            if given_boxes is None
            else np.array(given_boxes, dtype=np.float64).reshape(n, 4)
        )
        text_idx = [i for i, o in enumerate(outputs) if o is not None]
        if text_idx:
            texts = outputs if len(text_idx) == n else [outputs[i] for i in text_idx]
            parsed, ok = parse_boxes_batch(list(texts), require_answer=cfg.reasoning)
            parsed = np.asarray(parsed, dtype=np.float64)
            parsed[~np.asarray(ok, dtype=bool)] = np.nan
            if len(text_idx) == n:
                boxes = parsed
            else:
                boxes[np.asarray(text_idx)] = parsed
    n = boxes.shape[0]
    w = np.broadcast_to(np.asarray(widths, dtype=np.float64), (n,))
    h = np.broadcast_to(np.asarray(heights, dtype=np.float64), (n,))
    space = cfg.resolved_space
    if space != "pixel" and n:
        boxes = np.asarray(
            from_model_space(
                boxes, w, h, space, min_pixels=int(cfg.min_pixels), max_pixels=int(cfg.max_pixels)
            ),
            dtype=np.float64,
        )
    pred, valid = _as_pred(boxes, None)
    gt, owner, _ = ragged_ground_truth(gt_boxes, n)
    ious, is_normal, has_box = _sample_ious(pred, valid, gt, owner, n)
    names, stats = _update(ious, is_normal, has_box, valid, categories, cfg.iou_threshold)
    return _compute(names, stats, cfg.iou_threshold), ious, pred, valid


def evaluate(
    preds_path: str | os.PathLike[str],
    gt_path: str | os.PathLike[str],
    family: str = "qwen2_5_vl",
    space: str | None = None,
    *,
    reasoning: bool = False,
    iou_threshold: float = 0.3,
    min_pixels: int = 3136,
    max_pixels: int = 1003520,
    allow_missing: bool = False,
    config: EvalConfig | None = None,
) -> EvalResult:
    """Evaluate a prediction JSONL against a pairs JSONL (``differad_rl.data.records`` schema).

    ``config`` (an :class:`EvalConfig`) replaces the keyword options when given. Ids must match
    (see :func:`align_ids`); the result is in ground-truth order.
    """
    from differad_rl.data.records import load_pairs

    cfg = config or EvalConfig(
        family=family,
        space=space,
        reasoning=reasoning,
        iou_threshold=iou_threshold,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        allow_missing=allow_missing,
    )
    records = load_pairs(gt_path)
    preds = read_predictions(preds_path)
    return evaluate_records(preds, records, cfg)


def evaluate_records(preds: Predictions, records: Sequence[Any], config: EvalConfig | None = None) -> EvalResult:
    """Evaluate in-memory predictions against pair records (``PairRecord``-like objects with
    ``id``, ``boxes``, ``width``, ``height``, ``category``, ``target``); ground-truth order."""
    cfg = config if config is not None else EvalConfig()
    gt_ids = [r.id for r in records]
    pos = align_ids(preds.ids, gt_ids, cfg.allow_missing)
    have = pos >= 0
    take = np.where(have, pos, 0)
    outputs: list[str | None] = [preds.outputs[k] if ok else None for k, ok in zip(take, have, strict=True)]
    given = preds.boxes[take] if len(preds.ids) else np.full((len(gt_ids), 4), np.nan)
    given[~have] = np.nan
    gt_boxes = [r.boxes for r in records]
    widths = np.fromiter((r.width for r in records), dtype=np.float64, count=len(records))
    heights = np.fromiter((r.height for r in records), dtype=np.float64, count=len(records))
    categories = np.asarray([r.category for r in records], dtype=str)
    any_text = any(o is not None for o in outputs)
    metrics, ious, boxes, valid = evaluate_outputs(
        outputs if any_text else None,
        gt_boxes,
        widths,
        heights,
        categories,
        given_boxes=given,
        config=cfg,
    )
    return EvalResult(
        metrics=metrics,
        ids=gt_ids,
        ious=ious,
        pred_boxes=boxes,
        pred_valid=valid,
        gt_boxes=gt_boxes,
        categories=categories,
        targets=[r.target for r in records],
        config=cfg,
    )
