"""The method's rewards: batched tensor scoring plus TRL-shaped callables.

Every reward is in ``[0, 1]``. The rules of DESIGN §3:

* **Zero-box rule.** Ground truth ``(0, 0, 0, 0)`` means "normal target": the reward is 1 iff the
  prediction is the zero box, else 0. For a non-zero ground truth a missing, zero or degenerate
  (``x2 ≤ x1`` or ``y2 ≤ y1``) prediction scores 0.
* **DCLR** for valid boxes: ``R = IoU + (1 − IoU) · S`` with ``S`` the weighted centre/area
  consistency (:func:`differad_rl.boxes.dclr`).
* **Several boxes**: pairwise DCLR, optimal one-to-one assignment (Hungarian), reward
  ``Σ matched / max(P, N)``; a normal target (``N = 0``) scores 1 iff the answer is empty or the
  zero box.

The TRL-shaped callables have the signature ``f(completions, solution, **kwargs) -> list[float]``
(``completions``: strings or TRL's ``[{"role": "assistant", "content": str}]``). Parameterised
versions come from the ``get_*`` factories, which return picklable callables with a ``__name__``
(TRL names reward columns after it). A model's output never raises: unparsable output scores 0 and
is counted (``<name>/unparsable`` through TRL's ``log_metric`` when it is passed).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from differad_rl.boxes import CENTER_NORMS, SIZE_TERMS, box_iou, consistency_score, dclr, is_degenerate, is_zero_box
from differad_rl.coords import DEFAULT_FACTOR, DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, check_space, to_model_space
from differad_rl.parsing import answer_span, completion_text, is_well_formatted, parse_boxes, parse_boxes_batch

LOCALIZATION_KINDS: tuple[str, ...] = ("dclr", "iou", "consistency")


@dataclass(frozen=True)
class DCLRConfig:
    """Parameters of the dual-consistency localization reward (defaults: the paper's).

    Attributes:
        w_center: weight of the centre consistency ``s_c`` (normalised with ``w_area`` to sum 1).
        w_area: weight of the area consistency ``s_a``.
        eps: ``ε`` of both consistency terms.
        center_norm: ``"paper"`` (distance over the larger box diagonal) or ``"enclosing"``
            (distance over the enclosing box diagonal, DIoU-style; never saturates).
        size_term: ``"area"`` (the paper's area consistency; blind to shape) or ``"sides"``
            (width and height consistency; DCLR = 1 only for the true box).
    """

    w_center: float = 0.6
    w_area: float = 0.4
    eps: float = 1e-6
    center_norm: str = "paper"
    size_term: str = "area"

    def __post_init__(self) -> None:
        for name in ("w_center", "w_area"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.w_center + self.w_area <= 0:
            raise ValueError(
                f"w_center + w_area must be > 0, got w_center={self.w_center!r}, w_area={self.w_area!r}"
            )
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps must be a finite number > 0, got {self.eps!r}")
        if self.center_norm not in CENTER_NORMS:
            raise ValueError(f"center_norm={self.center_norm!r} is not known; expected one of {CENTER_NORMS}")
        if self.size_term not in SIZE_TERMS:
            raise ValueError(f"size_term={self.size_term!r} is not known; expected one of {SIZE_TERMS}")


def check_gt_boxes(gt: Any, *, name: str = "solution", n: int | None = None) -> Tensor:
    """Validate ground-truth boxes: shape ``(N, 4)``, finite, and each either the zero box or of
    positive width and height. Returns them as a float tensor (float64 unless already floating).

    Raises:
        ValueError: naming ``name``, the offending index and value.
    """
    if isinstance(gt, Tensor):
        t = gt if gt.is_floating_point() else gt.to(torch.float64)
    elif isinstance(gt, (list, tuple)) and all(isinstance(b, (list, tuple)) and len(b) == 4 for b in gt):
        # fast path for the common case (a dataset column): a list of 4-number lists
        try:
            flat = np.fromiter(itertools.chain.from_iterable(gt), dtype=np.float64, count=4 * len(gt))
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"{name} must hold one box [x1, y1, x2, y2] per sample; could not read it as numbers ({err})"
            ) from None
        t = torch.from_numpy(flat.reshape(-1, 4))
    else:
        try:
            t = torch.as_tensor(np.asarray(gt, dtype=np.float64))
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"{name} must hold one box [x1, y1, x2, y2] per sample; could not read it as numbers ({err})"
            ) from None
    if t.ndim != 2 or t.shape[1] != 4:
        raise ValueError(f"{name} must have shape (N, 4) (one [x1, y1, x2, y2] per sample), got shape {tuple(t.shape)}")
    if n is not None and t.shape[0] != n:
        raise ValueError(f"{name} has {t.shape[0]} boxes but there are {n} completions")
    finite = torch.isfinite(t).all(dim=1)
    bad = ~finite | (~is_zero_box(t) & is_degenerate(t))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        why = "is not finite" if not bool(finite[i]) else "has zero or negative size (x2 <= x1 or y2 <= y1)"
        raise ValueError(f"{name}[{i}] = {t[i].tolist()} {why}; use [0, 0, 0, 0] for a normal target")
    return t


def localization_scores(
    pred: Any,
    pred_valid: Any,
    gt: Any,
    kind: str = "dclr",
    config: DCLRConfig | None = None,
) -> Tensor:
    """Localization reward per sample with the zero-box and degenerate rules, shape ``(N,)``.

    Args:
        pred: predicted boxes ``(N, 4)``; rows where ``pred_valid`` is False are ignored (may be NaN).
        pred_valid: ``(N,)`` bool, whether a box was parsed.
        gt: ground-truth boxes ``(N, 4)`` in the same space (validated by :func:`check_gt_boxes`).
        kind: ``"dclr"`` (the method), ``"iou"`` (plain IoU) or ``"consistency"`` (``S`` alone).
        config: DCLR parameters (the paper's by default).

    Returns:
        Rewards in ``[0, 1]`` with the dtype of ``gt`` (float64 for non-float input).
    """
    if kind not in LOCALIZATION_KINDS:
        raise ValueError(f"kind={kind!r} is not known; expected one of {LOCALIZATION_KINDS}")
    return _scores(pred, pred_valid, check_gt_boxes(gt, name="gt"), kind, config or DCLRConfig())


def _scores(pred: Any, pred_valid: Any, g: Tensor, kind: str, cfg: DCLRConfig) -> Tensor:
    """:func:`localization_scores` on ground truth already validated by :func:`check_gt_boxes`."""
    p = torch.as_tensor(pred, dtype=g.dtype, device=g.device)
    if p.shape != g.shape:
        raise ValueError(f"pred must have the shape of gt {tuple(g.shape)}, got {tuple(p.shape)}")
    valid = torch.as_tensor(pred_valid, dtype=torch.bool, device=g.device) & torch.isfinite(p).all(dim=1)
    gt_zero = is_zero_box(g)
    p_finite = torch.nan_to_num(p)
    pred_zero = valid & is_zero_box(p_finite)
    usable = valid & ~is_degenerate(p_finite) & ~gt_zero
    # Masked rows get a harmless stand-in so no NaN reaches the formula; they are overwritten below.
    unit = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=g.dtype, device=g.device)
    p_safe = torch.where(usable[:, None], p, unit)
    g_safe = torch.where(usable[:, None], g, unit)
    if kind == "dclr":
        raw = dclr(p_safe, g_safe, cfg.w_center, cfg.w_area, cfg.eps, cfg.center_norm, cfg.size_term)
    elif kind == "iou":
        raw = box_iou(p_safe, g_safe)
    else:
        raw = consistency_score(p_safe, g_safe, cfg.w_center, cfg.w_area, cfg.eps, cfg.center_norm, cfg.size_term)
    zero = torch.zeros((), dtype=g.dtype, device=g.device)
    return torch.where(gt_zero, pred_zero.to(g.dtype), torch.where(usable, raw, zero))


def multi_box_score(
    pred_boxes: Sequence[Sequence[float]] | None,
    gt_boxes: Any,
    config: DCLRConfig | None = None,
) -> float:
    """Several-box reward: ``Σ matched DCLR / max(P, N)`` under the optimal one-to-one matching.

    Args:
        pred_boxes: the ``P`` parsed boxes, or ``None`` when the completion has no answer at all.
        gt_boxes: ``(N, 4)`` ground truth; ``N = 0`` (or only zero boxes) means a normal target.
        config: DCLR parameters.

    Returns:
        In ``[0, 1]``. Normal target: 1 iff an answer exists and is empty or only zero boxes.
        Otherwise a degenerate or zero predicted box counts in ``P`` and matches with 0; equal to
        single-box DCLR when ``P = N = 1``.
    """
    cfg = config or DCLRConfig()
    g = torch.as_tensor(np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4))
    g = g[~is_zero_box(g)] if g.numel() else g
    if g.numel():
        check_gt_boxes(g, name="gt_boxes")
    if pred_boxes is None:
        return 0.0
    p = torch.as_tensor(np.asarray(pred_boxes, dtype=np.float64).reshape(-1, 4))
    if g.shape[0] == 0:
        return 1.0 if bool(is_zero_box(p).all()) else 0.0
    if p.shape[0] == 0:
        return 0.0
    ok = torch.isfinite(p).all(dim=1) & ~is_degenerate(torch.nan_to_num(p))
    p_safe = torch.where(ok[:, None], p, torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=p.dtype))
    m = dclr(p_safe[:, None, :], g[None, :, :], cfg.w_center, cfg.w_area, cfg.eps, cfg.center_norm, cfg.size_term)
    m = torch.where(ok[:, None], m, torch.zeros_like(m)).numpy()
    rows, cols = linear_sum_assignment(m, maximize=True)
    return float(m[rows, cols].sum() / max(p.shape[0], g.shape[0]))


def _image_sizes(kwargs: dict[str, Any], n: int) -> tuple[np.ndarray, np.ndarray]:
    if "image_size" not in kwargs or kwargs["image_size"] is None:
        raise ValueError(
            "gt_space='pixel' needs the per-sample target image size: pass an `image_size` column "
            "([width, height] per row)"
        )
    try:
        sizes = np.asarray(kwargs["image_size"], dtype=np.float64)
    except (ValueError, TypeError):
        raise ValueError(f"image_size must be [width, height] per sample, got {kwargs['image_size']!r}") from None
    if sizes.shape != (n, 2):
        raise ValueError(f"image_size must have shape ({n}, 2) ([width, height] per sample), got {sizes.shape}")
    if not (np.isfinite(sizes).all() and (sizes > 0).all()):
        i = int(np.flatnonzero(~(np.isfinite(sizes).all(1) & (sizes > 0).all(1)))[0])
        raise ValueError(f"image_size[{i}] = {sizes[i].tolist()} must be positive and finite")
    return sizes[:, 0], sizes[:, 1]


class _Reward:
    """Shared plumbing of the TRL-shaped rewards: naming, parameters, ground-truth conversion."""

    def __init__(
        self,
        name: str,
        config: DCLRConfig,
        *,
        require_answer: bool,
        space: str,
        gt_space: str | None,
        min_pixels: int,
        max_pixels: int,
        factor: int,
    ) -> None:
        check_space(space)
        if gt_space is not None:
            check_space(gt_space)
        if gt_space not in (None, "pixel", space):
            raise ValueError(f"gt_space={gt_space!r} must be None, 'pixel' or the model's space {space!r}")
        self.__name__ = name
        self.config = config
        self.require_answer = bool(require_answer)
        self.space = space
        self.gt_space = gt_space
        self.min_pixels, self.max_pixels, self.factor = int(min_pixels), int(max_pixels), int(factor)

    def __repr__(self) -> str:
        params = {k: v for k, v in vars(self).items() if k != "__name__"}
        params["config"] = asdict(self.config)
        return f"{type(self).__name__}(name={self.__name__!r}, {params})"

    def _to_space(self, boxes: Any, kwargs: dict[str, Any], n: int) -> Any:
        """Ground truth given in original pixels → the model's space (continuous, not rounded)."""
        if self.gt_space != "pixel" or self.space == "pixel":
            return boxes
        w, h = _image_sizes(kwargs, n)
        return to_model_space(
            boxes, w, h, self.space,
            min_pixels=self.min_pixels, max_pixels=self.max_pixels, factor=self.factor, round=False,
        )

    def _log_unparsable(self, kwargs: dict[str, Any], valid: np.ndarray) -> None:
        log = kwargs.get("log_metric")
        if callable(log) and len(valid):
            log(f"{self.__name__}/unparsable", float(1.0 - valid.mean()))


class LocalizationReward(_Reward):
    """Single-box localization reward (``kind`` = ``"dclr"``, ``"iou"`` or ``"consistency"``).

    ``solution``: one ``[x1, y1, x2, y2]`` per completion, ``[0, 0, 0, 0]`` for a normal target, in
    the model's space (or original pixels with ``gt_space="pixel"`` and an ``image_size`` column).
    """

    def __init__(self, kind: str = "dclr", config: DCLRConfig | None = None, *, name: str | None = None,
                 require_answer: bool = True, space: str = "pixel", gt_space: str | None = None,
                 min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS,
                 factor: int = DEFAULT_FACTOR) -> None:
        if kind not in LOCALIZATION_KINDS:
            raise ValueError(f"kind={kind!r} is not known; expected one of {LOCALIZATION_KINDS}")
        super().__init__(name or f"{kind}_reward", config or DCLRConfig(), require_answer=require_answer,
                         space=space, gt_space=gt_space, min_pixels=min_pixels, max_pixels=max_pixels,
                         factor=factor)
        self.kind = kind

    def scores(self, completions: Sequence[Any], solution: Any, **kwargs: Any) -> Tensor:
        """The rewards as a float64 tensor ``(N,)`` (the list-returning ``__call__`` wraps this)."""
        n = len(completions)
        # validated once; the conversion scales by positive factors, so it stays valid
        gt = torch.as_tensor(self._to_space(check_gt_boxes(solution, n=n), kwargs, n))
        boxes, valid = parse_boxes_batch(completions, require_answer=self.require_answer)
        self._log_unparsable(kwargs, valid)
        return _scores(torch.from_numpy(boxes).to(gt.dtype), torch.from_numpy(valid), gt, self.kind, self.config)

    def __call__(self, completions: Sequence[Any], solution: Any, **kwargs: Any) -> list[float]:
        return self.scores(completions, solution, **kwargs).tolist()


class MultiBoxReward(_Reward):
    """Several-box DCLR with Hungarian matching; ``solution``: a list of boxes per completion
    (``[]`` or ``[[0, 0, 0, 0]]`` = normal)."""

    def __init__(self, config: DCLRConfig | None = None, *, name: str = "multi_box_reward",
                 require_answer: bool = True, space: str = "pixel", gt_space: str | None = None,
                 min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS,
                 factor: int = DEFAULT_FACTOR) -> None:
        super().__init__(name, config or DCLRConfig(), require_answer=require_answer, space=space,
                         gt_space=gt_space, min_pixels=min_pixels, max_pixels=max_pixels, factor=factor)

    def __call__(self, completions: Sequence[Any], solution: Any, **kwargs: Any) -> list[float]:
        n = len(completions)
        if len(solution) != n:
            raise ValueError(f"solution has {len(solution)} entries but there are {n} completions")
        sizes = _image_sizes(kwargs, n) if (self.gt_space == "pixel" and self.space != "pixel") else None
        out: list[float] = []
        valid = np.zeros(n, dtype=bool)
        for i, (completion, gts) in enumerate(zip(completions, solution)):
            g = np.asarray(gts if gts is not None else [], dtype=np.float64).reshape(-1, 4)
            if g.size:
                check_gt_boxes(g, name=f"solution[{i}]")
            if sizes is not None and g.size:
                g = to_model_space(g, sizes[0][i], sizes[1][i], self.space, min_pixels=self.min_pixels,
                                   max_pixels=self.max_pixels, factor=self.factor, round=False)
            text = completion_text(completion)
            has_answer = answer_span(text) is not None or not self.require_answer
            preds = parse_boxes(text, require_answer=self.require_answer) if has_answer else None
            valid[i] = bool(preds)
            out.append(multi_box_score(preds, g, self.config))
        self._log_unparsable(kwargs, valid)
        return out


class FormatReward:
    """1 if the completion is ``<think>…</think>`` then ``<answer>`` with exactly one box, else 0."""

    def __init__(self, name: str = "format_reward") -> None:
        self.__name__ = name

    def __repr__(self) -> str:
        return f"FormatReward(name={self.__name__!r})"

    def __call__(self, completions: Sequence[Any], solution: Any = None, **kwargs: Any) -> list[float]:
        return [1.0 if is_well_formatted(c) else 0.0 for c in completions]


def _config(w_center: float, w_area: float, eps: float, center_norm: str, size_term: str) -> DCLRConfig:
    return DCLRConfig(w_center=w_center, w_area=w_area, eps=eps, center_norm=center_norm, size_term=size_term)


def get_dclr_reward(*, w_center: float = 0.6, w_area: float = 0.4, eps: float = 1e-6,
                    center_norm: str = "paper", size_term: str = "area", name: str = "dclr_reward",
                    **space_kwargs: Any) -> LocalizationReward:
    """DCLR reward callable. ``space_kwargs``: ``require_answer``, ``space``, ``gt_space``,
    ``min_pixels``, ``max_pixels``, ``factor`` (see :class:`LocalizationReward`).

    >>> r = get_dclr_reward()
    >>> r(["<think>.</think><answer>(10,10),(20,20)</answer>"], solution=[[10, 10, 20, 20]])
    [1.0]
    """
    return LocalizationReward("dclr", _config(w_center, w_area, eps, center_norm, size_term), name=name,
                              **space_kwargs)


def get_iou_reward(*, name: str = "iou_reward", **space_kwargs: Any) -> LocalizationReward:
    """Plain IoU reward with the zero-box rule (the ablation baseline)."""
    return LocalizationReward("iou", DCLRConfig(), name=name, **space_kwargs)


def get_consistency_reward(*, w_center: float = 0.6, w_area: float = 0.4, eps: float = 1e-6,
                           center_norm: str = "paper", size_term: str = "area", name: str = "consistency_reward",
                           **space_kwargs: Any) -> LocalizationReward:
    """Centre/area consistency ``S`` alone, with the zero-box rule (ablation)."""
    return LocalizationReward("consistency", _config(w_center, w_area, eps, center_norm, size_term), name=name,
                              **space_kwargs)


def get_multi_box_reward(*, w_center: float = 0.6, w_area: float = 0.4, eps: float = 1e-6,
                         center_norm: str = "paper", size_term: str = "area", name: str = "multi_box_reward",
                         **space_kwargs: Any) -> MultiBoxReward:
    """Several-box DCLR reward with Hungarian matching (see :func:`multi_box_score`)."""
    return MultiBoxReward(_config(w_center, w_area, eps, center_norm, size_term), name=name, **space_kwargs)


def get_format_reward(*, name: str = "format_reward") -> FormatReward:
    """Format reward callable (see :class:`FormatReward`)."""
    return FormatReward(name=name)


dclr_reward = get_dclr_reward()
iou_reward = get_iou_reward()
consistency_reward = get_consistency_reward()
format_reward = get_format_reward()
multi_box_reward = get_multi_box_reward()

__all__ = [
    "DCLRConfig",
    "LOCALIZATION_KINDS",
    "FormatReward",
    "LocalizationReward",
    "MultiBoxReward",
    "check_gt_boxes",
    "consistency_reward",
    "dclr_reward",
    "format_reward",
    "get_consistency_reward",
    "get_dclr_reward",
    "get_format_reward",
    "get_iou_reward",
    "get_multi_box_reward",
    "iou_reward",
    "localization_scores",
    "multi_box_reward",
    "multi_box_score",
]
