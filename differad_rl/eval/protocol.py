"""The evaluation protocol (docs/method.md §8): prediction file + pair records → per-sample IoUs + metrics.

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

**Recorded sizes** (lines written by ``differad-rl predict``, docs/method.md §8)::

    {"id": …, "output": …, "family": "qwen2_5_vl", "space": "qwen2_5_vl",
     "image_size": [900, 700], "input_size": [896, 700],
     "settings": {"min_pixels": 3136, "max_pixels": 12845056, …}}

``input_size`` is the target as the processor really fed it to the model, so Qwen2.5-VL boxes are
converted back with it (``x = x' · W / W'``) and the pixel budget is never guessed. The recorded
family/space are used when none is given; a given ``family`` / ``space`` / ``min_pixels`` /
``max_pixels`` that disagrees with what the lines record, or an ``image_size`` that differs from
the pair record, raises ``ValueError`` naming the id. Lines without these fields (other tools)
use the config's budget (default: the paper's, 3136 … 1,003,520).

``split=`` scores only the records of one split (predictions for the other splits' ids are
ignored; ids unknown to the whole file still raise); a split no record has raises, listing the
splits present.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from differad_rl.coords import DEFAULT_FACTOR, SPACES, Space, check_space, from_model_space, smart_resize_array
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
    "resolve_config",
    "select_split",
]

#: The pixel budget used for lines that record no input size (the paper's training budget).
DEFAULT_MIN_PIXELS = 3136
DEFAULT_MAX_PIXELS = 1003520

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
        family: a key of :data:`FAMILIES`; None → the predictions' recorded family, else ``qwen2_5_vl``.
        space: coordinate space of the predictions (None → the recorded space, else the family's
            default); one of ``differad_rl.coords.SPACES``.
        reasoning: the ``<answer>`` tag is required (reasoning models); otherwise the first box
            anywhere counts when there is no answer tag.
        iou_threshold: τ of Acc@τ and F1@τ.
        min_pixels, max_pixels: Qwen2.5-VL ``smart_resize`` budget for lines without a recorded
            ``input_size`` (None → 3136 / 1,003,520); when given, it must agree with the recorded sizes.
        allow_missing: ground-truth ids absent from the predictions count as invalid (IoU 0)
            instead of raising.
        split: score only the records of this split (None = all).
    """

    family: str | None = None
    space: str | None = None
    reasoning: bool = False
    iou_threshold: float = 0.3
    min_pixels: int | None = None
    max_pixels: int | None = None
    allow_missing: bool = False
    split: str | None = None

    def __post_init__(self) -> None:
        if self.family is not None and self.family not in FAMILIES:
            raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {self.family!r}")
        if self.space is not None and self.space not in SPACES:
            raise ValueError(f"space must be one of {list(SPACES)} or None, got {self.space!r}")
        if not 0.0 < float(self.iou_threshold) <= 1.0:
            raise ValueError(f"iou_threshold must be in (0, 1], got {self.iou_threshold!r}")
        lo, hi = self.budget
        if lo <= 0 or hi < lo:
            raise ValueError(
                f"need 0 < min_pixels <= max_pixels, got min_pixels={self.min_pixels!r}, "
                f"max_pixels={self.max_pixels!r}"
            )

    @property
    def resolved_family(self) -> str:
        """The family actually used (``qwen2_5_vl`` when none is set)."""
        return self.family if self.family is not None else "qwen2_5_vl"

    @property
    def resolved_space(self) -> Space:
        """The coordinate space actually used."""
        return check_space(self.space if self.space is not None else FAMILIES[self.resolved_family])

    @property
    def budget(self) -> tuple[int, int]:
        """``(min_pixels, max_pixels)`` for lines without a recorded input size."""
        lo = DEFAULT_MIN_PIXELS if self.min_pixels is None else int(self.min_pixels)
        hi = DEFAULT_MAX_PIXELS if self.max_pixels is None else int(self.max_pixels)
        return lo, hi


@dataclass
class Predictions:
    """A prediction file in memory.

    ``outputs[i]`` is the raw text (None when the line gave ``box``), ``boxes`` ``(N, 4)`` holds the
    given boxes (NaN rows for text lines and for ``"box": null``), ``given[i]`` is True for box lines.
    What ``differad-rl predict`` records (None / NaN where a line does not say):
    ``image_sizes`` / ``input_sizes`` ``(N, 2)`` ``[width, height]`` of the target as stored and as
    fed to the model, ``budgets`` ``(N, 2)`` the recorded ``[min_pixels, max_pixels]``, and the one
    ``family`` / ``space`` / ``model`` all lines share.
    """

    ids: list[str]
    outputs: list[str | None]
    boxes: np.ndarray
    given: np.ndarray
    image_sizes: np.ndarray | None = None
    input_sizes: np.ndarray | None = None
    budgets: np.ndarray | None = None
    family: str | None = None
    space: str | None = None
    model: str | None = None

    def _column(self, name: str) -> np.ndarray:
        col = getattr(self, name)
        return np.full((len(self.ids), 2), np.nan) if col is None else col

    def subset(self, index: Sequence[int]) -> Predictions:
        """The lines at ``index`` (in that order)."""
        idx = np.asarray(index, dtype=np.int64)
        return Predictions(
            ids=[self.ids[i] for i in idx],
            outputs=[self.outputs[i] for i in idx],
            boxes=self.boxes[idx] if len(self.ids) else self.boxes,
            given=self.given[idx] if len(self.ids) else self.given,
            image_sizes=None if self.image_sizes is None else self.image_sizes[idx],
            input_sizes=None if self.input_sizes is None else self.input_sizes[idx],
            budgets=None if self.budgets is None else self.budgets[idx],
            family=self.family,
            space=self.space,
            model=self.model,
        )


def _size_field(obj: dict[str, Any], key: str, where: str) -> list[float]:
    v = obj.get(key)
    if v is None:
        return [float("nan")] * 2
    ok = isinstance(v, list | tuple) and len(v) == 2 and all(
        isinstance(x, int | float) and not isinstance(x, bool) and x > 0 for x in v
    )
    if not ok:
        raise ValueError(f"{where}: field {key!r} must be [width, height] (two positive numbers), got {v!r}")
    return [float(v[0]), float(v[1])]


def _shared(values: list[Any], key: str, p: Path) -> Any:
    found = {v for v in values if v is not None}
    if len(found) > 1:
        raise ValueError(f"{p}: lines disagree on {key!r} ({sorted(map(str, found))}); one run per file")
    return found.pop() if found else None


def read_predictions(path: str | os.PathLike[str]) -> Predictions:
    """Read a prediction JSONL file; a bad line raises ``ValueError`` starting with ``<file>:<line>:``.

    Each line needs ``"id"`` and either ``"output"`` (str) or ``"box"`` (4 numbers or null); the
    fields ``differad-rl predict`` records (``family``, ``space``, ``model``, ``image_size``,
    ``input_size``, ``settings.min_pixels`` / ``max_pixels``) are read when present.
    Duplicate ids raise ``ValueError`` naming them.
    """
    p = Path(path)
    ids: list[str] = []
    outputs: list[str | None] = []
    boxes: list[Any] = []
    image_sizes: list[list[float]] = []
    input_sizes: list[list[float]] = []
    budgets: list[list[float]] = []
    families: list[Any] = []
    spaces: list[Any] = []
    models: list[Any] = []
    nan2 = [float("nan")] * 2
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
        where = f"{p}:{lineno}"
        image_sizes.append(_size_field(obj, "image_size", where))
        input_sizes.append(_size_field(obj, "input_size", where))
        raw_settings = obj.get("settings")
        settings: dict[str, Any] = raw_settings if isinstance(raw_settings, dict) else {}
        budgets.append(
            _size_field({"budget": [settings["min_pixels"], settings["max_pixels"]]}, "budget", where)
            if settings.get("min_pixels") is not None and settings.get("max_pixels") is not None
            else nan2
        )
        for key, seen, allowed in (("family", families, FAMILIES), ("space", spaces, SPACES)):
            v = obj.get(key)
            if v is not None and v not in allowed:
                raise ValueError(f"{where}: field {key!r} is {v!r}; expected one of {sorted(allowed)}")
            seen.append(v)
        models.append(obj.get("model"))
    given = np.fromiter((o is None for o in outputs), dtype=bool, count=len(outputs))
    arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)

    def col(rows: list[list[float]]) -> np.ndarray | None:
        a = np.asarray(rows, dtype=np.float64).reshape(-1, 2)
        return a if np.isfinite(a).any() else None

    return Predictions(
        ids, outputs, arr, given,
        image_sizes=col(image_sizes), input_sizes=col(input_sizes), budgets=col(budgets),
        family=_shared(families, "family", p), space=_shared(spaces, "space", p), model=_shared(models, "model", p),
    )


def select_split(
    records: Sequence[Any], split: str | None, *, source: str = "pairs", option: str = "--split"
) -> list[Any]:
    """The records of ``split`` (all when None); ``option`` names the option in the error.

    Raises:
        ValueError: no records at all, or none with that split (the message lists the splits present).
    """
    if not records:
        raise ValueError(f"{source}: no pair records")
    if split is None:
        return list(records)
    chosen = [r for r in records if r.split == split]
    if not chosen:
        counts: dict[str, int] = {}
        for r in records:
            counts[r.split] = counts.get(r.split, 0) + 1
        present = ", ".join(f"{k!r} ({n})" for k, n in sorted(counts.items()))
        raise ValueError(f"{option} {split!r}: no record of {source} has it; splits present: {present}")
    return chosen


def resolve_config(config: EvalConfig, preds: Predictions) -> EvalConfig:
    """``config`` with the family / space the predictions record filled in.

    Raises:
        ValueError: a given family, space or pixel budget disagrees with what the lines record.
    """
    from dataclasses import replace

    family, space = config.family, config.space
    for key, given, recorded in (("family", family, preds.family), ("space", space, preds.space)):
        if given is not None and recorded is not None and given != recorded:
            raise ValueError(
                f"--{key} {given} disagrees with the predictions' recorded {key} {recorded!r} "
                f"(written by {preds.model or 'differad-rl predict'}); drop --{key}"
            )
    family = family if family is not None else preds.family
    space = space if space is not None else preds.space
    if preds.budgets is not None and (config.min_pixels is not None or config.max_pixels is not None):
        have = preds.budgets[np.isfinite(preds.budgets).all(axis=1)]
        for col, name, pixels in ((0, "min_pixels", config.min_pixels), (1, "max_pixels", config.max_pixels)):
            bad = have[:, col] != pixels if pixels is not None else np.zeros(len(have), dtype=bool)
            if bad.any():
                raise ValueError(
                    f"--{name.replace('_', '-')} {pixels} disagrees with the predictions' recorded {name} "
                    f"{int(have[bad][0, col])}; the recorded input sizes are what the model saw: drop the option"
                )
    return replace(config, family=family, space=space)


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
        config: the protocol options (family / space resolved from the predictions).
        outputs: the raw model text per sample (None for box lines and missing predictions).
        parse_status: per sample ``"parsed"`` (a box was read from the text), ``"unparsable"``
            (text without a valid box), ``"given"`` (a ``box`` line; ``null`` = no box) or
            ``"missing"`` (no prediction, with ``allow_missing``).
        recorded_sizes: how many samples were converted with their recorded input size.
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
    outputs: list[str | None] = field(default_factory=list)
    parse_status: list[str] = field(default_factory=list)
    recorded_sizes: int = 0

    def summary(self) -> dict[str, Any]:
        """JSON-ready ``{"config": …, "space": …, "recorded_input_sizes": …, **metrics}``."""
        return {
            "config": asdict(self.config),
            "space": self.config.resolved_space,
            "recorded_input_sizes": int(self.recorded_sizes),
            **self.metrics,
        }


def evaluate_outputs(
    outputs: Sequence[str | None] | None,
    gt_boxes: Any,
    widths: Any,
    heights: Any,
    categories: Any | None = None,
    *,
    given_boxes: Any | None = None,
    input_sizes: Any | None = None,
    config: EvalConfig | None = None,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray]:
    """In-memory protocol: parse, convert to pixels, score. Returns ``(metrics, ious, boxes, valid)``.

    Args:
        outputs: N raw model texts (None entries are taken from ``given_boxes``); None = all given.
        gt_boxes: ground truth in original pixels (see ``metrics.ragged_ground_truth``).
        widths, heights: ``(N,)`` target sizes (needed by the relative and resized spaces).
        categories: ``(N,)`` category names or None.
        given_boxes: ``(N, 4)`` already-parsed boxes in model space (NaN = none) for None outputs.
        input_sizes: ``(N, 2)`` recorded ``[width, height]`` the model saw (NaN rows = unknown);
            space ``qwen2_5_vl`` converts those rows with it (``x · W / W'``), the others with the
            config's pixel budget.
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
        lo, hi = cfg.budget
        px = np.asarray(from_model_space(boxes, w, h, space, min_pixels=lo, max_pixels=hi), dtype=np.float64)
        if space == "qwen2_5_vl" and input_sizes is not None:
            sizes = np.asarray(input_sizes, dtype=np.float64).reshape(n, 2)
            known = np.isfinite(sizes).all(axis=1)
            if known.any():
                sx, sy = sizes[known, 0] / w[known], sizes[known, 1] / h[known]
                px[known] = boxes[known] / np.stack([sx, sy, sx, sy], axis=-1)
        boxes = px
    pred, valid = _as_pred(boxes, None)
    gt, owner, _ = ragged_ground_truth(gt_boxes, n)
    ious, is_normal, has_box = _sample_ious(pred, valid, gt, owner, n)
    names, stats = _update(ious, is_normal, has_box, valid, categories, cfg.iou_threshold)
    return _compute(names, stats, cfg.iou_threshold), ious, pred, valid


def evaluate(
    preds_path: str | os.PathLike[str],
    gt_path: str | os.PathLike[str],
    family: str | None = None,
    space: str | None = None,
    *,
    reasoning: bool = False,
    iou_threshold: float = 0.3,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    allow_missing: bool = False,
    split: str | None = None,
    config: EvalConfig | None = None,
) -> EvalResult:
    """Evaluate a prediction JSONL against a pairs JSONL (``differad_rl.data.records`` schema).

    ``config`` (an :class:`EvalConfig`) replaces the keyword options when given. Ids must match
    (see :func:`align_ids`); the result is in ground-truth order. Recorded family / space / sizes
    are used as the module docstring says.
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
        split=split,
    )
    records = load_pairs(gt_path)
    preds = read_predictions(preds_path)
    return evaluate_records(preds, records, cfg, source=str(gt_path))


def _check_recorded_sizes(preds: Predictions, pos: np.ndarray, records: Sequence[Any], cfg: EvalConfig) -> np.ndarray:
    """``(N, 2)`` recorded input sizes in ground-truth order (NaN = none), after checking the recorded
    image sizes against the records and, with an explicit budget, the input sizes against it."""
    n = len(records)
    have = pos >= 0
    take = np.where(have, pos, 0)
    img = preds._column("image_sizes")[take] if len(preds.ids) else np.full((n, 2), np.nan)
    inp = preds._column("input_sizes")[take] if len(preds.ids) else np.full((n, 2), np.nan)
    img[~have] = np.nan
    inp[~have] = np.nan
    wh = np.array([[r.width, r.height] for r in records], dtype=np.float64).reshape(n, 2)
    known = np.isfinite(img).all(axis=1)
    bad = np.flatnonzero(known & (img != wh).any(axis=1))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"prediction {records[i].id!r} was made on a {int(img[i, 0])}x{int(img[i, 1])} target "
            f"(recorded image_size) but the pair record says {records[i].width}x{records[i].height} "
            f"({bad.size} such ids); predict and evaluate on the same pairs file"
        )
    rec = np.isfinite(inp).all(axis=1)
    if cfg.resolved_space == "qwen2_5_vl" and rec.any() and (cfg.min_pixels is not None or cfg.max_pixels is not None):
        lo, hi = cfg.budget
        rh, rw = smart_resize_array(wh[rec, 1], wh[rec, 0], factor=DEFAULT_FACTOR, min_pixels=lo, max_pixels=hi)
        diff = np.flatnonzero((rw != inp[rec, 0]) | (rh != inp[rec, 1]))
        if diff.size:
            j = int(np.flatnonzero(rec)[diff[0]])
            raise ValueError(
                f"prediction {records[j].id!r} records input size {int(inp[j, 0])}x{int(inp[j, 1])} but "
                f"--min-pixels {lo} / --max-pixels {hi} give {int(rw[diff[0]])}x{int(rh[diff[0]])} "
                f"({diff.size} such ids); the recorded sizes are what the model saw: drop the options"
            )
    return inp


def evaluate_records(
    preds: Predictions, records: Sequence[Any], config: EvalConfig | None = None, *, source: str = "pairs"
) -> EvalResult:
    """Evaluate in-memory predictions against pair records (``PairRecord``-like objects with
    ``id``, ``boxes``, ``width``, ``height``, ``category``, ``target``, ``split``); ground-truth order.

    With ``config.split`` only that split's records are scored (other ids in ``preds`` are ignored;
    ids unknown to ``records`` raise)."""
    cfg = resolve_config(config if config is not None else EvalConfig(), preds)
    if cfg.split is not None:
        known = {r.id for r in records}
        unknown = [pid for pid in preds.ids if pid not in known]
        if unknown:
            raise ValueError(f"prediction ids not in the ground truth: {_name_ids(unknown)}")
        records = select_split(records, cfg.split, source=source)
        keep = {r.id for r in records}
        preds = preds.subset([i for i, pid in enumerate(preds.ids) if pid in keep])
    gt_ids = [r.id for r in records]
    pos = align_ids(preds.ids, gt_ids, cfg.allow_missing)
    have = pos >= 0
    take = np.where(have, pos, 0)
    outputs: list[str | None] = [preds.outputs[k] if ok else None for k, ok in zip(take, have, strict=True)]
    given = preds.boxes[take] if len(preds.ids) else np.full((len(gt_ids), 4), np.nan)
    given[~have] = np.nan
    input_sizes = _check_recorded_sizes(preds, pos, records, cfg)
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
        input_sizes=input_sizes,
        config=cfg,
    )
    status = [
        "missing" if not ok else ("given" if o is None else ("parsed" if v else "unparsable"))
        for ok, o, v in zip(have, outputs, valid, strict=True)
    ]
    recorded = int(np.isfinite(input_sizes).all(axis=1).sum()) if cfg.resolved_space == "qwen2_5_vl" else 0
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
        outputs=outputs,
        parse_status=status,
        recorded_sizes=recorded,
    )
