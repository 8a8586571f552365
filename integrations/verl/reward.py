"""DifferAD-R1 reward for veRL 0.9's reward loop: ``compute_score`` → ``{score, localization, format, iou,
acc_0.3, tp, fp, fn}``.

Configure (0.9 ``reward.*`` keys; veRL silently ignores the legacy top-level
``custom_reward_function.*``)::

    reward.custom_reward_function.path=pkg://differad_rl.integrations.verl.reward
    reward.custom_reward_function.name=compute_score
    +reward.custom_reward_function.reward_kwargs.center_norm=enclosing   # options, see RewardOptions

Per sample (docs/method.md §3), with ``p`` the first box of the first ``<answer>`` and ``g`` the ground truth
in the model's coordinate space::

    localization = DCLR(p, g)      (zero-box, degenerate-box and sane-bound rules; multi_box=True: Hungarian)
    format       = 1 if <think>…</think><answer>one box</answer> else 0
    score        = localization_weight · localization + format_weight · format

``p`` is read in the format of ``prompt_family`` (default ``"reasoning"``: ``(x1,y1),(x2,y2)``),
the rule of the format reward too (:data:`differad_rl.prompts.PROMPT_BOX_FORMATS`).

**Evaluation-protocol indicators** (docs/method.md §8), so that veRL's validation logs — which average every
returned key per data source — carry held-out mIoU, Acc@0.3 and F1@0.3. They follow the protocol:
the first box of the answer in *any* format (lenient parsing, as ``differad-rl eval``), IoU against
the best-matching ground-truth box, a normal target scoring IoU 1 iff it answers the zero box::

    iou      = protocol IoU                                    (mean → mIoU)
    acc_0.3  = 1 if iou >= 0.3 else 0                          (mean → Acc@0.3)
    tp       = anomalous target and iou >= 0.3
    fp       = a box (valid, not the zero box) on a normal target, or with iou < 0.3
    fn       = anomalous target and not iou >= 0.3             F1@0.3 = 2·TP / (2·TP + FP + FN)

(an anomalous target answered by a wrong box counts one FP and one FN; F1 from the per-source means
equals F1 from the counts, the ratio is scale-free).

Every sample returns the same keys (:data:`REWARD_KEYS`; veRL requires it); a model's output never
raises (bad output scores 0). The values come from the core (:func:`differad_rl.rewards.score_box`,
the scalar twin of :func:`differad_rl.rewards.localization_scores`;
:func:`differad_rl.rewards.multi_box_score`, :func:`differad_rl.parsing.is_well_formatted`). A call
creates no tensor (single-box mode): about as cheap as a plain scalar implementation.

Ground truth and coordinate spaces (veRL passes no images): ``ground_truth`` holds the box(es) —
a box ``[x1, y1, x2, y2]``, a list of boxes, ``[]`` or the zero box for a normal target, a JSON
string of those, a box string such as ``"(x1,y1),(x2,y2)"``, or a dict ``{"boxes": ..., <metadata>}``.
The metadata is looked up in the ``ground_truth`` dict, then ``extra_info``, then the reward kwargs:

- ``space``: the model's coordinate space (``differad_rl.coords.SPACES``, e.g. ``"qwen2_5_vl"``);
- ``width``, ``height``: size of the ORIGINAL target image (pixels);
- ``gt_space``: ``"pixel"`` (ground truth in original target pixels; converted to the model's
  space and snapped to its integer grid, so that the best answer a model can write scores exactly
  1: :func:`differad_rl.coords.to_model_grid`) or ``"model"`` (already in the model's space). Unset:
  ``"pixel"`` when ``space`` or an image size is given, else ``"model"`` — with neither given the
  ground truth is taken as already in the model's space;
- ``min_pixels``, ``max_pixels``: the processor's pixel budget (Qwen2.5-VL's resize).

A ground truth in pixels without ``space``, or without an image size where the space needs one,
raises ``ValueError`` naming the field (a data/config mistake, not a model output).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from math import isfinite
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch

from differad_rl.coords import DEFAULT_FACTOR, DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, SPACES, box_to_model_grid, check_space
from differad_rl.parsing import BoxFormat, answer_boxes, first_box, is_well_formatted, parse_boxes
from differad_rl.prompts import PROMPT_BOX_FORMATS, box_format
from differad_rl.boxes import PAPER_DCLR, CenterNorm, SizeTerm
from differad_rl.rewards import DCLRConfig, gt_row_error, multi_box_score, score_box

__all__ = ["RewardOptions", "REWARD_KEYS", "PROTOCOL_IOU_THRESHOLD", "compute_score", "ground_truth_boxes"]

REWARD_KEYS = ("score", "localization", "format", "iou", "acc_0.3", "tp", "fp", "fn")
"""Keys of every :func:`compute_score` result, in this order."""

PROTOCOL_IOU_THRESHOLD = 0.3
"""τ of the evaluation protocol's Acc@τ and F1@τ (docs/method.md §8)."""

# Passed by veRL's naive reward manager when a reward-model router is configured; not ours.
_VERL_PASSTHROUGH = frozenset({"reward_router_address", "reward_model_tokenizer"})


@dataclasses.dataclass(frozen=True)
class RewardOptions:
    """Options of :func:`compute_score` (``reward.custom_reward_function.reward_kwargs``).

    Attributes:
        localization_weight: weight of the localization reward in ``score`` (default 1).
        format_weight: weight of the format reward in ``score`` (default 1; TRL sums reward
            functions with weight 1 each).
        w_center, w_area, eps, center_norm, size_term: DCLR parameters
            (:class:`differad_rl.rewards.DCLRConfig`).
        multi_box: ``True`` scores all predicted vs all ground-truth boxes (Hungarian, docs/method.md §3);
            ``False`` (paper) the first predicted box vs the first (largest) ground-truth box.
        require_answer: boxes only count inside ``<answer>…</answer>`` (default ``True``).
        space, gt_space, min_pixels, max_pixels: defaults for the per-sample metadata (module
            docstring); the ground truth / extra_info override them.
        factor: the processor's resize factor (patch size × merge size; 28 for Qwen2/2.5-VL).
        prompt_family: the prompt family whose box format the reward and the format check accept
            (:data:`differad_rl.prompts.PROMPT_BOX_FORMATS`, default ``"reasoning"``; ``None``: any).
    """

    localization_weight: float = 1.0
    format_weight: float = 1.0
    w_center: float = PAPER_DCLR.w_center
    w_area: float = PAPER_DCLR.w_area
    eps: float = PAPER_DCLR.eps
    center_norm: CenterNorm = PAPER_DCLR.center_norm
    size_term: SizeTerm = PAPER_DCLR.size_term
    multi_box: bool = False
    require_answer: bool = True
    space: str | None = None
    gt_space: Literal["pixel", "model"] | None = None
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    factor: int = DEFAULT_FACTOR
    prompt_family: str | None = "reasoning"

    def __post_init__(self) -> None:
        for name in ("localization_weight", "format_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"reward_kwargs.{name} must be a finite number >= 0, got {value!r}")
        for name in ("multi_box", "require_answer"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"reward_kwargs.{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("min_pixels", "max_pixels", "factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"reward_kwargs.{name} must be a positive integer, got {value!r}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"reward_kwargs.min_pixels={self.min_pixels} must be <= max_pixels={self.max_pixels}")
        _check_space(self.space, "reward_kwargs.space")
        _check_gt_space(self.gt_space, "reward_kwargs.gt_space")
        if self.prompt_family is not None and self.prompt_family not in PROMPT_BOX_FORMATS:
            raise ValueError(f"reward_kwargs.prompt_family must be one of {', '.join(PROMPT_BOX_FORMATS)} or null, "
                             f"got {self.prompt_family!r}")
        _ = self.dclr  # validates w_center / w_area / eps / center_norm / size_term (raises ValueError)

    @functools.cached_property
    def dclr(self) -> DCLRConfig:
        return DCLRConfig(w_center=self.w_center, w_area=self.w_area, eps=self.eps, center_norm=self.center_norm,
                          size_term=self.size_term)

    @functools.cached_property
    def fmt(self) -> BoxFormat | None:
        return box_format(self.prompt_family)

    @classmethod
    def known_options(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


def _check_space(space: Any, field: str) -> None:
    if space is not None and space not in SPACES:
        raise ValueError(f"{field} must be one of {', '.join(SPACES)}, got {space!r}")


def _check_gt_space(gt_space: Any, field: str) -> None:
    if gt_space not in (None, "pixel", "model"):
        raise ValueError(f"{field} must be 'pixel' or 'model', got {gt_space!r}")


@functools.lru_cache(maxsize=64)
def _options(items: tuple[tuple[str, Any], ...]) -> RewardOptions:
    unknown = sorted(k for k, _ in items if k not in RewardOptions.known_options())
    if unknown:
        raise ValueError(
            f"unknown reward_kwargs {', '.join(unknown)}; known: {', '.join(RewardOptions.known_options())}"
        )
    return RewardOptions(**dict(items))


_DEFAULT_OPTIONS: RewardOptions | None = None
_BY_CALL: dict[tuple[tuple[str, Any], ...], RewardOptions] = {}


def _options_from_kwargs(kwargs: Mapping[str, Any]) -> RewardOptions:
    global _DEFAULT_OPTIONS
    if not kwargs:
        if _DEFAULT_OPTIONS is None:
            _DEFAULT_OPTIONS = RewardOptions()
        return _DEFAULT_OPTIONS
    raw = tuple(kwargs.items())  # veRL passes the same config in the same order every call
    try:
        hit = _BY_CALL.get(raw)
    except TypeError:  # an unhashable value (e.g. a list): validate without the cache
        hit = None
        raw = None  # type: ignore[assignment]
    if hit is not None:
        return hit
    items = tuple(sorted((k, v) for k, v in kwargs.items() if k not in _VERL_PASSTHROUGH))
    try:
        options = _options(items)
    except TypeError:
        return _options.__wrapped__(items)
    if raw is not None and len(_BY_CALL) < 256:
        _BY_CALL[raw] = options
    return options


def _as_boxes(value: Any, field: str) -> np.ndarray:
    """Ground-truth boxes → ``(N, 4)`` float64; ``[]`` and the zero box → ``(0, 4)`` (normal)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith(("[", "{")):
            try:
                return _as_boxes(json.loads(text), field)
            except json.JSONDecodeError:
                pass
        parsed = parse_boxes(text, require_answer=False)
        if not parsed and text:
            raise ValueError(f"{field} must hold boxes, e.g. '(x1,y1),(x2,y2)' or '[[x1,y1,x2,y2]]'; got {value!r}")
        return _as_boxes([list(b) for b in parsed], field)
    if isinstance(value, Mapping):
        return _as_boxes(value.get("boxes", value.get("box", [])), field)
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.dtype == object):
            items = list(value)
            if not items:
                arr = np.zeros((0, 4), dtype=np.float64)
            elif all(np.isscalar(x) for x in items):
                arr = np.asarray(items, dtype=np.float64).reshape(1, -1)
            else:
                arr = np.stack([np.asarray(x, dtype=np.float64).reshape(-1) for x in items])
        else:
            arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{field} must hold boxes [x1, y1, x2, y2], got {value!r}") from err
    if arr.size == 0:
        return np.zeros((0, 4), dtype=np.float64)
    if arr.ndim == 1:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2 or arr.shape[1] != 4 or not np.isfinite(arr).all():
        raise ValueError(f"{field} must hold finite boxes [x1, y1, x2, y2], got {value!r}")
    nonzero = np.any(arr != 0, axis=1)
    return arr[nonzero]


def _lookup(key: str, *sources: Mapping[str, Any] | None) -> Any:
    for source in sources:
        if source is not None and key in source and source[key] is not None:
            value = source[key]
            return value.item() if isinstance(value, np.generic) else value
    return None


def _fast_rows(value: Any) -> list[tuple[float, float, float, float]] | None:
    """The common ground-truth forms as float tuples (``[x1, y1, x2, y2]``, a list of those — also
    as parquet gives them, numpy arrays in an object array — or ``[]``), else ``None``."""
    try:
        if isinstance(value, np.ndarray):
            if value.dtype != object:
                value = value.tolist()
            else:
                value = [v.tolist() if isinstance(v, np.ndarray) else v for v in value]
        if not isinstance(value, (list, tuple)):
            return None
        if len(value) == 4 and not isinstance(value[0], (list, tuple, np.ndarray, str, Mapping)):
            value = [value]
        rows = []
        for b in value:
            if b.__class__ is np.ndarray:
                b = b.tolist()
            if b.__class__ is not list and b.__class__ is not tuple or len(b) != 4:
                return None
            x1, y1, x2, y2 = b
            if x1.__class__ is str or x1.__class__ is bool or y1.__class__ is str or y1.__class__ is bool or (
                    x2.__class__ is str or x2.__class__ is bool or y2.__class__ is str or y2.__class__ is bool):
                return None
            r = (float(x1), float(y1), float(x2), float(y2))
            if not (isfinite(r[0]) and isfinite(r[1]) and isfinite(r[2]) and isfinite(r[3])):
                return None  # the slow path raises the message
            if r[0] != 0 or r[1] != 0 or r[2] != 0 or r[3] != 0:
                rows.append(r)
    except (TypeError, ValueError):
        return None
    return rows


def _ground_truth_rows(
    ground_truth: Any, extra_info: Mapping[str, Any] | None, options: RewardOptions
) -> list[tuple[float, float, float, float]]:
    """:func:`ground_truth_boxes` as a list of float tuples (the per-call path, no numpy)."""
    gt_meta = ground_truth if isinstance(ground_truth, Mapping) else None
    info = extra_info if isinstance(extra_info, Mapping) else None
    rows = _fast_rows(ground_truth) if gt_meta is None else _fast_rows(
        ground_truth.get("boxes", ground_truth.get("box", [])))
    if rows is None:
        rows = [tuple(b) for b in _as_boxes(ground_truth, "ground_truth").tolist()]

    space = _lookup("space", gt_meta, info) or options.space
    _check_space(space, "space")
    gt_space = _lookup("gt_space", gt_meta, info) or options.gt_space
    _check_gt_space(gt_space, "gt_space")
    width, height = _lookup("width", gt_meta, info), _lookup("height", gt_meta, info)
    if gt_space is None:
        gt_space = "pixel" if (space is not None or width is not None or height is not None) else "model"
    for b in rows:  # the core's ground-truth rule (zero boxes are already dropped)
        why = gt_row_error(b)
        if why is not None:
            raise ValueError(f"ground_truth box {list(b)} {why}; use [] or [0, 0, 0, 0] for a normal target")
    if gt_space == "model" or not rows:
        return rows
    if space is None:
        raise ValueError(
            "the ground truth is in original image pixels (gt_space='pixel' or an image size given) but the "
            "model's coordinate space is missing: set extra_info['space'] or reward_kwargs.space "
            f"to one of {', '.join(SPACES)}"
        )
    if space == "pixel":
        return rows
    if width is None or height is None:
        missing = [name for name, v in (("width", width), ("height", height)) if v is None]
        raise ValueError(
            f"missing image size: extra_info (or ground_truth) needs {' and '.join(missing)} of the original "
            f"target image to convert the ground truth from pixels to space {space!r}"
        )
    if float(width) <= 0 or float(height) <= 0:
        raise ValueError(f"image size must be positive, got width={width!r}, height={height!r}")
    min_pixels = _lookup("min_pixels", gt_meta, info) or options.min_pixels
    max_pixels = _lookup("max_pixels", gt_meta, info) or options.max_pixels
    grid = check_space(space)
    args = (int(width), int(height), grid, int(min_pixels), int(max_pixels), options.factor)
    return [box_to_model_grid(b, *args) for b in rows]


def ground_truth_boxes(
    ground_truth: Any, extra_info: Mapping[str, Any] | None = None, options: RewardOptions | None = None
) -> np.ndarray:
    """The ground-truth boxes of one sample in the model's coordinate space, ``(N, 4)`` float64.

    ``N = 0`` means a normal target (zero box). Metadata precedence: ``ground_truth`` dict, then
    ``extra_info``, then ``options`` (module docstring). Boxes given in original pixels are snapped
    to the model's integer grid (:func:`differad_rl.coords.to_model_grid`).

    Raises:
        ValueError: malformed boxes; unknown ``space``/``gt_space``; ``gt_space="pixel"`` without
            ``space``, or without ``width``/``height`` when the space needs them.
    """
    rows = _ground_truth_rows(ground_truth, extra_info, options or RewardOptions())
    return np.asarray(rows, dtype=np.float64).reshape(-1, 4)


def compute_score(
    data_source: Any = None,
    solution_str: str | None = None,
    ground_truth: Any = None,
    extra_info: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, float]:
    """Score one completion for veRL's reward loop.

    Args:
        data_source: the row's ``data_source`` (unused; any dataset).
        solution_str: the decoded completion; ``None``/non-string scores 0.
        ground_truth: the row's ``reward_model.ground_truth`` (module docstring).
        extra_info: the row's ``extra_info`` (space, width, height, ...); veRL adds ``num_turns``
            and ``rollout_reward_scores``, which are ignored.
        **kwargs: :class:`RewardOptions` (``reward.custom_reward_function.reward_kwargs``).

    Returns:
        ``{"score", "localization", "format", "iou", "acc_0.3", "tp", "fp", "fn"}`` floats
        (:data:`REWARD_KEYS`), the same keys for every sample; all but ``score`` in [0, 1] (the last
        four are 0/1 protocol indicators, module docstring).

    Raises:
        ValueError: an unknown/invalid option, a malformed ground truth or missing metadata
            (never because of the completion).
    """
    del data_source
    options = _options_from_kwargs(kwargs)
    gt = _ground_truth_rows(ground_truth, extra_info, options)
    text = solution_str if isinstance(solution_str, str) else ""
    require = options.require_answer

    fmt = 1.0 if is_well_formatted(text, fmt=options.fmt) else 0.0
    box = first_box(text, require, options.fmt)
    if options.multi_box:
        preds = answer_boxes(text, require_answer=require, fmt=options.fmt)
        loc = float(multi_box_score(preds, gt, options.dclr))
    else:
        loc = score_box(box, gt[0] if gt else _ZERO, "dclr", options.dclr)
    # evaluation protocol (docs/method.md §8): lenient parsing, best-matching ground-truth box. A
    # well-formatted answer holds one box and no other number, so the lenient parse finds that box.
    pbox = box if fmt == 1.0 else first_box(text, require, None)
    if gt:
        iou = max(score_box(pbox, g, "iou") for g in gt)
        hit = iou >= PROTOCOL_IOU_THRESHOLD
        has_box = pbox is not None and pbox != _ZERO
        tp, fp, fn = float(hit), float(has_box and not hit), float(not hit)
    else:
        iou = 1.0 if pbox is not None and pbox == _ZERO else 0.0
        tp, fp, fn = 0.0, float(pbox is not None and iou == 0.0), 0.0
    score = options.localization_weight * loc + options.format_weight * fmt
    return {"score": float(score), "localization": loc, "format": fmt, "iou": iou,
            "acc_0.3": float(iou >= PROTOCOL_IOU_THRESHOLD), "tp": tp, "fp": fp, "fn": fn}


_ZERO = (0.0, 0.0, 0.0, 0.0)
