"""The method's rewards: batched tensor scoring plus TRL-shaped callables.

Every reward is in ``[0, 1]``. The rules of docs/method.md §3:

* **Zero-box rule.** Ground truth ``(0, 0, 0, 0)`` means "normal target": the reward is 1 iff the
  prediction is the zero box, else 0. For a non-zero ground truth a missing, zero or degenerate
  (``x2 ≤ x1`` or ``y2 ≤ y1``) prediction scores 0.
* **DCLR** for valid boxes: ``R = IoU + (1 − IoU) · S`` with ``S`` the weighted centre/area
  consistency (:func:`differad_rl.boxes.dclr`).
* **Several boxes**: pairwise DCLR, optimal one-to-one assignment (Hungarian), reward
  ``Σ matched / max(P, N)``; a normal target (``N = 0``) scores 1 iff the answer is empty or the
  zero box(es) — prose or an unparsable answer scores 0.
* **Sane bound.** A predicted box with a coordinate of magnitude above
  :data:`differad_rl.boxes.MAX_COORD` is invalid (0, never NaN); such ground truth raises.
* **One format rule in training.** The TRL-shaped rewards read the box only in the format the
  prompt of their ``prompt_family`` asks for (:data:`differad_rl.prompts.PROMPT_BOX_FORMATS`; default
  ``"reasoning"``: ``(x1,y1),(x2,y2)`` inside ``<answer>``), the same rule the format reward applies,
  so an answer never earns a localization reward for a format the format reward rejects. ``prompt_family=None``
  accepts every format (evaluation parsing is lenient: :mod:`differad_rl.parsing`).
* **Ground truth on the model's grid.** With ``gt_space="pixel"`` the ground truth is converted to the
  model's space and snapped to its integer grid (:func:`differad_rl.coords.to_model_grid`), so the
  best answer a model can write scores exactly 1.

The TRL-shaped callables have the signature ``f(completions, solution, **kwargs) -> list[float]``
(``completions``: strings or TRL's ``[{"role": "assistant", "content": str}]``). Parameterised
versions come from the ``get_*`` factories, which return picklable callables with a ``__name__``
(TRL names reward columns after it). A model's output never raises: unparsable output scores 0 and
is counted (``<name>/unparsable`` through TRL's ``log_metric`` when it is passed).

Speed: a call with at most :data:`SCALAR_MAX_BATCH` completions (TRL's per-device batches) runs a
pure-Python scalar path (no tensor is created); larger calls parse in one pass and score vectorised.
Both compute the same formulas (checked against ``tests/oracle.py`` to 1e-9).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, fields
from typing import Any, Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from differad_rl.boxes import (
    MAX_COORD,
    PAPER_DCLR,
    DCLRConfig,
    box_iou,
    consistency_score,
    dclr,
    is_degenerate,
    is_zero_box,
)
from differad_rl.coords import (
    Space,
    DEFAULT_FACTOR,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    box_to_model_grid,
    check_space,
    to_model_grid,
)
from differad_rl.parsing import answer_boxes, first_box, is_well_formatted, parse_boxes_batch
from differad_rl.prompts import PromptFamily, box_format

LocalizationKind = Literal["dclr", "iou", "consistency"]
LOCALIZATION_KINDS: tuple[LocalizationKind, ...] = ("dclr", "iou", "consistency")
SCALAR_MAX_BATCH = 96
"""Calls of at most this many completions take the scalar pure-Python path (faster below it)."""


_SEQ, _FOUR = frozenset({list, tuple}), {4}


def check_gt_boxes(gt: Any, *, name: str = "solution", n: int | None = None) -> Tensor:
    """Validate ground-truth boxes: shape ``(N, 4)``, finite and within ``|v| <= MAX_COORD``, and each
    either the zero box or of positive width and height. Returns them as a float tensor (float64 unless already floating).

    Raises:
        ValueError: naming ``name``, the offending index and value.
    """
    if isinstance(gt, Tensor):
        t = gt if gt.is_floating_point() else gt.to(torch.float64)
    elif isinstance(gt, (list, tuple)) and gt and set(map(type, gt)) <= _SEQ and set(map(len, gt)) == _FOUR:
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
    bounded = (t.abs() <= MAX_COORD).all(dim=1)
    bad = ~bounded | (~is_zero_box(t) & is_degenerate(t))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        if not bool(finite[i]):
            why = "is not finite"
        elif not bool(bounded[i]):
            why = f"has a coordinate beyond the sane bound |v| <= MAX_COORD = {MAX_COORD:g}"
        else:
            why = "has zero or negative size (x2 <= x1 or y2 <= y1)"
        raise ValueError(f"{name}[{i}] = {t[i].tolist()} {why}; use [0, 0, 0, 0] for a normal target")
    return t


def localization_scores(
    pred: Any,
    pred_valid: Any,
    gt: Any,
    kind: LocalizationKind = "dclr",
    config: DCLRConfig | None = None,
) -> Tensor:
    """Localization reward per sample with the zero-box and degenerate rules, shape ``(N,)``.

    Args:
        pred: predicted boxes ``(N, 4)``; rows where ``pred_valid`` is False are ignored (may be NaN);
            a row with a value beyond ``|v| <= MAX_COORD`` (or not finite) counts as no prediction.
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


def masked_scores(pred: Any, pred_valid: Any, g: Tensor, formula: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """The scoring rules of every single-box reward around its ``formula``, shape ``(N,)``.

    The one place the rules are written (the method's rewards and the peers' call it):

    * a predicted row counts only where ``pred_valid`` is True and every value is within
      ``|v| <= MAX_COORD`` (NaN fails the comparison; beyond the bound the products overflow);
    * ground truth ``(0, 0, 0, 0)`` (normal target): 1 iff the prediction is the zero box, else 0;
    * otherwise a missing, zero or degenerate prediction scores 0, and a valid one
      ``formula(p, g)`` (called on all rows at once; masked rows get a harmless unit box, so no NaN
      reaches it).

    Args:
        pred: ``(N, 4)`` predicted boxes (any value where ``pred_valid`` is False).
        pred_valid: ``(N,)`` bool, whether a box was read.
        g: ``(N, 4)`` floating ground truth, already validated (:func:`check_gt_boxes`).
        formula: elementwise ``(N, 4), (N, 4) -> (N,)`` reward of valid boxes, in ``[0, 1]``.

    Returns:
        ``(N,)`` in the dtype and on the device of ``g``.
    """
    p = torch.as_tensor(pred, dtype=g.dtype, device=g.device)
    if p.shape != g.shape:
        raise ValueError(f"pred must have the shape of gt {tuple(g.shape)}, got {tuple(p.shape)}")
    valid = torch.as_tensor(pred_valid, dtype=torch.bool, device=g.device) & (p.abs() <= MAX_COORD).all(dim=1)
    gt_zero = is_zero_box(g)
    p_finite = torch.nan_to_num(p)
    pred_zero = valid & is_zero_box(p_finite)
    usable = valid & ~is_degenerate(p_finite) & ~gt_zero
    unit = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=g.dtype, device=g.device)
    raw = formula(torch.where(usable[:, None], p, unit), torch.where(usable[:, None], g, unit))
    zero = torch.zeros((), dtype=g.dtype, device=g.device)
    return torch.where(gt_zero, pred_zero.to(g.dtype), torch.where(usable, raw, zero))


def _scores(pred: Any, pred_valid: Any, g: Tensor, kind: LocalizationKind, cfg: DCLRConfig) -> Tensor:
    """:func:`localization_scores` on ground truth already validated by :func:`check_gt_boxes`."""
    return masked_scores(pred, pred_valid, g, lambda p, q: _method_formula(kind, p, q, cfg))


def _method_formula(kind: str, p: Tensor, g: Tensor, cfg: DCLRConfig) -> Tensor:
    if kind == "dclr":
        return dclr(p, g, cfg)
    if kind == "iou":
        return box_iou(p, g)
    return consistency_score(p, g, cfg)


def gt_row_error(box: Sequence[float]) -> str | None:
    """Why one ground-truth box ``(x1, y1, x2, y2)`` is not usable, or ``None`` when it is.

    Usable: the zero box (normal target), or finite, within ``|v| <= MAX_COORD`` and of positive
    width and height. The scalar twin of :func:`check_gt_boxes` (same rule, one row, no tensor),
    for the per-call paths of the TRL and veRL rewards.
    """
    x1, y1, x2, y2 = box
    # x1 < x2 makes two comparisons per axis enough; NaN fails every comparison
    if x2 > x1 and y2 > y1 and x1 >= -MAX_COORD and x2 <= MAX_COORD and y1 >= -MAX_COORD and y2 <= MAX_COORD:
        return None
    if x1 == 0 and y1 == 0 and x2 == 0 and y2 == 0:
        return None
    if not all(math.isfinite(v) for v in box):
        return "is not finite"
    if not all(-MAX_COORD <= v <= MAX_COORD for v in box):
        return f"has a coordinate beyond the sane bound |v| <= MAX_COORD = {MAX_COORD:g}"
    if not (x2 > x1 and y2 > y1):
        return "has zero or negative size (x2 <= x1 or y2 <= y1)"
    return None


def score_box(
    pred: tuple[float, float, float, float] | None,
    gt: tuple[float, float, float, float],
    kind: LocalizationKind = "dclr",
    config: DCLRConfig = PAPER_DCLR,
) -> float:
    """Scalar :func:`localization_scores` of one sample (pure Python; the small-batch fast path).

    A deliberate scalar twin of :func:`masked_scores` + :func:`differad_rl.boxes.dclr`: no tensor is
    created, which makes TRL's per-device calls and veRL's per-sample calls several times cheaper;
    ``tests/test_core_rewards.py`` checks both paths against ``tests/oracle.py``.

    ``pred`` is the parsed box or ``None``; ``gt`` a ground truth already validated
    (:func:`check_gt_boxes`); ``config`` the DCLR parameters. The zero-box, degenerate and
    sane-bound rules and the formulas are those
    of :mod:`differad_rl.boxes`, in the same order of operations.
    """
    gx1, gy1, gx2, gy2 = gt
    if gx1 == 0 and gy1 == 0 and gx2 == 0 and gy2 == 0:
        return 1.0 if pred is not None and pred[0] == 0 and pred[1] == 0 and pred[2] == 0 and pred[3] == 0 else 0.0
    if pred is None:
        return 0.0
    x1, y1, x2, y2 = pred
    # degenerate, zero, NaN or beyond the sane bound: no box (x1 < x2 makes two comparisons enough)
    if not (x2 > x1 and y2 > y1 and x1 >= -MAX_COORD and x2 <= MAX_COORD and y1 >= -MAX_COORD and y2 <= MAX_COORD):
        return 0.0
    wp, hp, wg, hg = x2 - x1, y2 - y1, gx2 - gx1, gy2 - gy1
    iw = (x2 if x2 < gx2 else gx2) - (x1 if x1 > gx1 else gx1)
    ih = (y2 if y2 < gy2 else gy2) - (y1 if y1 > gy1 else gy1)
    inter = iw * ih if iw > 0 and ih > 0 else 0.0
    ap, ag = wp * hp, wg * hg
    union = ap + ag - inter
    iou = inter / union if union > 0 else 0.0
    if kind == "iou":
        return iou
    w_center, w_area, eps = config.w_center, config.w_area, config.eps
    d = math.hypot(((x1 - gx1) + (x2 - gx2)) / 2, ((y1 - gy1) + (y2 - gy2)) / 2)
    if config.center_norm == "enclosing":
        norm = math.hypot((x2 if x2 > gx2 else gx2) - (x1 if x1 < gx1 else gx1),
                          (y2 if y2 > gy2 else gy2) - (y1 if y1 < gy1 else gy1))
    else:
        norm = max(math.hypot(wp, hp), math.hypot(wg, hg))
    s_c = 1 - min(d / ((norm if norm > 1.0 else 1.0) + eps), 1.0)
    if config.size_term == "sides":
        s_s = 1 - min((abs(wp - wg) / (wg + eps) + abs(hp - hg) / (hg + eps)) / 2, 1.0)
    else:
        s_s = 1 - min(abs(ap - ag) / (ag + eps), 1.0)
    s = (w_center * s_c + w_area * s_s) / (w_center + w_area)
    return s if kind == "consistency" else iou + (1 - iou) * s


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
        In ``[0, 1]``. Normal target: 1 iff an answer exists and is empty or only zero boxes (pass
        ``None`` for an answer without a parsable box: :func:`differad_rl.parsing.answer_boxes`).
        Otherwise a degenerate, zero or out-of-bound predicted box counts in ``P`` and matches with
        0; equal to single-box DCLR when ``P = N = 1``.
    """
    cfg = config or DCLRConfig()
    early, p_safe, ok, g = matching_inputs(pred_boxes, gt_boxes)
    if early is not None:
        return early
    m = dclr(p_safe[:, None, :], g[None, :, :], cfg)
    return matched_mean(m, ok)


def matching_inputs(
    pred_boxes: Any, gt_boxes: Any
) -> tuple[float | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The shared front of every several-box score: ``(score, p_safe, ok, g)``.

    ``score`` is the answer when the rules decide it before any matching (no answer → 0; a normal
    target → 1 iff every predicted box is the zero box; no predicted box → 0), else None. ``g`` holds
    the non-zero ground-truth boxes (validated); ``ok`` marks the predicted boxes that are valid
    (finite, within ``MAX_COORD``, not degenerate) and ``p_safe`` replaces the others by a unit box.
    """
    g = torch.as_tensor(np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4))
    g = g[~is_zero_box(g)] if g.numel() else g
    if g.numel():
        check_gt_boxes(g, name="gt_boxes")
    empty = torch.zeros((0, 4), dtype=torch.float64)
    if pred_boxes is None:
        return 0.0, empty, torch.zeros(0, dtype=torch.bool), g
    p = torch.as_tensor(np.asarray(pred_boxes, dtype=np.float64).reshape(-1, 4))
    if g.shape[0] == 0:
        return (1.0 if bool(is_zero_box(p).all()) else 0.0), p, torch.zeros(0, dtype=torch.bool), g
    if p.shape[0] == 0:
        return 0.0, p, torch.zeros(0, dtype=torch.bool), g
    ok = (p.abs() <= MAX_COORD).all(dim=1) & ~is_degenerate(torch.nan_to_num(p))
    p_safe = torch.where(ok[:, None], p, torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=p.dtype))
    return None, p_safe, ok, g


def matched_mean(scores: torch.Tensor, ok: torch.Tensor) -> float:
    """Optimal one-to-one assignment of a ``(P, N)`` score matrix (invalid rows score 0), summed and
    divided by ``max(P, N)`` (docs/method.md §3, several boxes)."""
    m = torch.where(ok[:, None], scores, torch.zeros_like(scores)).numpy()
    rows, cols = linear_sum_assignment(m, maximize=True)
    return float(m[rows, cols].sum() / max(m.shape[0], m.shape[1]))


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
        require_answer: bool = True,
        space: Space = "pixel",
        gt_space: Space | None = None,
        min_pixels: int = DEFAULT_MIN_PIXELS,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        factor: int = DEFAULT_FACTOR,
        prompt_family: PromptFamily | None = "reasoning",
    ) -> None:
        check_space(space)
        self.prompt_family = prompt_family
        self.fmt = box_format(prompt_family)
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

    @property
    def _converts(self) -> bool:
        return self.gt_space == "pixel" and self.space != "pixel"

    def _score_box_sets(
        self, completions: Sequence[Any], solution: Any, kwargs: dict[str, Any],
        score: Callable[[list[Any] | None, np.ndarray], float],
    ) -> list[float]:
        """The several-box rewards' loop: ``score(answer boxes, ground-truth boxes)`` per completion.

        The answer's boxes are :func:`~differad_rl.parsing.answer_boxes` in the prompt family's format
        (``None``: no box answer); the ground truth is :meth:`_row_boxes` (validated, snapped to the
        model's grid). The unparsable share is logged (:meth:`_log_unparsable`)."""
        n = len(completions)
        if len(solution) != n:
            raise ValueError(f"solution has {len(solution)} entries but there are {n} completions")
        sizes = _image_sizes(kwargs, n) if self._converts else None
        out: list[float] = []
        valid = np.zeros(n, dtype=bool)
        for i, (completion, gts) in enumerate(zip(completions, solution)):
            preds = answer_boxes(completion, require_answer=self.require_answer, fmt=self.fmt)
            valid[i] = bool(preds)
            out.append(score(preds, self._row_boxes(gts, i, sizes)))
        self._log_unparsable(kwargs, valid)
        return out

    def _row_boxes(self, gts: Any, i: int, sizes: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
        """Row ``i``'s ground-truth boxes ``(N, 4)`` of a several-box reward, validated and — when
        ``sizes`` (the targets' widths, heights) are given — snapped to the model's integer grid."""
        g = np.asarray(gts if gts is not None else [], dtype=np.float64).reshape(-1, 4)
        if g.size:
            check_gt_boxes(g, name=f"solution[{i}]")
        if sizes is not None and g.size:
            g = to_model_grid(g, sizes[0][i], sizes[1][i], self.space, min_pixels=self.min_pixels,
                              max_pixels=self.max_pixels, factor=self.factor)
        return g

    def _to_space(self, boxes: Any, kwargs: dict[str, Any], n: int) -> Any:
        """Ground truth given in original pixels → the model's integer grid (:func:`to_model_grid`)."""
        if not self._converts:
            return boxes
        w, h = _image_sizes(kwargs, n)
        return to_model_grid(boxes, w, h, self.space, min_pixels=self.min_pixels, max_pixels=self.max_pixels,
                             factor=self.factor)

    def _gt_rows(self, solution: Any, kwargs: dict[str, Any], n: int) -> list[tuple[float, float, float, float]]:
        """Scalar twin of ``check_gt_boxes`` + :meth:`_to_space`: validated ground truth as float tuples
        in the model's grid. Anything unusual goes through the vectorised checks (same errors)."""
        if not isinstance(solution, (list, tuple)) or len(solution) != n:
            return [tuple(b) for b in self._to_space(check_gt_boxes(solution, n=n), kwargs, n).tolist()]
        rows: list[tuple[float, float, float, float]] = []
        try:
            for b in solution:
                g = (float(b[0]), float(b[1]), float(b[2]), float(b[3]))
                if len(b) != 4 or gt_row_error(g) is not None:
                    raise ValueError
                rows.append(g)
        except (TypeError, ValueError, IndexError, KeyError):
            check_gt_boxes(solution, n=n)  # raises the message naming the row
            raise  # pragma: no cover - check_gt_boxes accepted what the scalar check refused
        if not self._converts:
            return rows
        sizes = kwargs.get("image_size")
        try:
            if sizes is None or len(sizes) != n:
                raise ValueError
            whs = [(float(s[0]), float(s[1])) for s in sizes]
            if not all(len(s) == 2 for s in sizes):
                raise ValueError
        except (TypeError, ValueError, IndexError):
            _image_sizes(kwargs, n)  # raises the message
            raise  # pragma: no cover
        args = (self.space, self.min_pixels, self.max_pixels, self.factor)
        out = []
        for g, (w, h) in zip(rows, whs):
            if not (w > 0 and h > 0 and math.isfinite(w) and math.isfinite(h)):
                _image_sizes(kwargs, n)  # raises naming the row
            out.append(box_to_model_grid(g, w, h, *args))
        return out

    def _log_unparsable(self, kwargs: dict[str, Any], valid: np.ndarray) -> None:
        log = kwargs.get("log_metric")
        if callable(log) and len(valid):
            log(f"{self.__name__}/unparsable", float(1.0 - valid.mean()))


class SingleBoxReward(_Reward):
    """A single-box reward: the first box of each answer, read in the prompt family's format, against one
    ground-truth box per completion, scored by :func:`masked_scores` around :meth:`formula`.

    Subclasses define :meth:`formula` (the reward of valid boxes); every rule (prompt family's format, grid
    snapping, ``MAX_COORD``, zero-box rule) is this class's and :func:`masked_scores`'.
    """

    def formula(self, p: Tensor, g: Tensor) -> Tensor:
        """Elementwise reward of valid boxes ``(N, 4), (N, 4) -> (N,)`` in ``[0, 1]``."""
        raise NotImplementedError

    def scores(self, completions: Sequence[Any], solution: Any, **kwargs: Any) -> Tensor:
        """The rewards as a float64 tensor ``(N,)``, scored vectorised (any batch size)."""
        n = len(completions)
        # validated once; the conversion scales by positive factors and keeps boxes boxes
        gt = torch.as_tensor(self._to_space(check_gt_boxes(solution, n=n), kwargs, n))
        boxes, valid = parse_boxes_batch(completions, require_answer=self.require_answer, fmt=self.fmt)
        self._log_unparsable(kwargs, valid)
        return masked_scores(torch.from_numpy(boxes).to(gt.dtype), torch.from_numpy(valid), gt, self.formula)

    def __call__(self, completions: Sequence[Any], solution: Any, **kwargs: Any) -> list[float]:
        return self.scores(completions, solution, **kwargs).tolist()


class LocalizationReward(SingleBoxReward):
    """Single-box localization reward (``kind`` = ``"dclr"``, ``"iou"`` or ``"consistency"``).

    ``solution``: one ``[x1, y1, x2, y2]`` per completion, ``[0, 0, 0, 0]`` for a normal target, in
    the model's space (or original pixels with ``gt_space="pixel"`` and an ``image_size`` column: then
    snapped to the model's integer grid). ``prompt_family``: the prompt family whose box format counts
    (:data:`differad_rl.prompts.PROMPT_BOX_FORMATS`; ``None`` = any format).
    """

    def __init__(self, kind: LocalizationKind = "dclr", config: DCLRConfig | None = None, *, name: str | None = None,
                 require_answer: bool = True, space: Space = "pixel", gt_space: Space | None = None,
                 min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS,
                 factor: int = DEFAULT_FACTOR, prompt_family: PromptFamily | None = "reasoning") -> None:
        if kind not in LOCALIZATION_KINDS:
            raise ValueError(f"kind={kind!r} is not known; expected one of {LOCALIZATION_KINDS}")
        super().__init__(name or f"{kind}_reward", config or DCLRConfig(), require_answer=require_answer,
                         space=space, gt_space=gt_space, min_pixels=min_pixels, max_pixels=max_pixels,
                         factor=factor, prompt_family=prompt_family)
        self.kind = kind

    def formula(self, p: Tensor, g: Tensor) -> Tensor:
        return _method_formula(self.kind, p, g, self.config)

    def __call__(self, completions: Sequence[Any], solution: Any, **kwargs: Any) -> list[float]:
        n = len(completions)
        if n > SCALAR_MAX_BATCH:
            return self.scores(completions, solution, **kwargs).tolist()
        gts = self._gt_rows(solution, kwargs, n)
        cfg, kind, require, fmt = self.config, self.kind, self.require_answer, self.fmt
        out: list[float] = []
        missing = 0
        for completion, g in zip(completions, gts):
            p = first_box(completion, require, fmt)
            if p is None:
                missing += 1
            out.append(score_box(p, g, kind, cfg))
        log = kwargs.get("log_metric")
        if n and callable(log):
            log(f"{self.__name__}/unparsable", missing / n)
        return out


class MultiBoxReward(_Reward):
    """Several-box DCLR with Hungarian matching; ``solution``: a list of boxes per completion
    (``[]`` or ``[[0, 0, 0, 0]]`` = normal)."""

    def __init__(self, config: DCLRConfig | None = None, *, name: str = "multi_box_reward",
                 require_answer: bool = True, space: Space = "pixel", gt_space: Space | None = None,
                 min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS,
                 factor: int = DEFAULT_FACTOR, prompt_family: PromptFamily | None = "reasoning") -> None:
        super().__init__(name, config or DCLRConfig(), require_answer=require_answer, space=space,
                         gt_space=gt_space, min_pixels=min_pixels, max_pixels=max_pixels, factor=factor,
                         prompt_family=prompt_family)

    def __call__(self, completions: Sequence[Any], solution: Any, **kwargs: Any) -> list[float]:
        return self._score_box_sets(completions, solution, kwargs,
                                    lambda preds, g: multi_box_score(preds, g, self.config))


class FormatReward:
    """1 if the completion is ``<think>…</think>`` then ``<answer>`` with exactly one box, else 0.

    The box must be in the format of ``prompt_family`` (default ``"reasoning"``: ``(x1,y1),(x2,y2)``), the
    rule the localization rewards parse with; ``prompt_family=None`` accepts any format.
    """

    def __init__(self, name: str = "format_reward", *, prompt_family: PromptFamily | None = "reasoning") -> None:
        self.__name__ = name
        self.prompt_family = prompt_family
        self.fmt = box_format(prompt_family)

    def __repr__(self) -> str:
        return f"FormatReward(name={self.__name__!r}, prompt_family={self.prompt_family!r})"

    def __call__(self, completions: Sequence[Any], solution: Any = None, **kwargs: Any) -> list[float]:
        fmt = self.fmt
        return [1.0 if is_well_formatted(c, fmt=fmt) else 0.0 for c in completions]


_DCLR_FIELDS = frozenset(f.name for f in fields(DCLRConfig))


def _split(options: dict[str, Any]) -> tuple[DCLRConfig, dict[str, Any]]:
    """``options`` → (the :class:`DCLRConfig` of its DCLR fields, the rest)."""
    dclr_options = {k: options.pop(k) for k in list(options) if k in _DCLR_FIELDS}
    return DCLRConfig(**dclr_options), options


def get_dclr_reward(*, name: str = "dclr_reward", **options: Any) -> LocalizationReward:
    """DCLR reward callable.

    ``options``: the :class:`DCLRConfig` fields (``w_center``, ``w_area``, ``eps``, ``center_norm``,
    ``size_term``; the paper's by default) and the scoring front's ``require_answer``, ``space``,
    ``gt_space``, ``min_pixels``, ``max_pixels``, ``factor``, ``prompt_family`` (see :class:`LocalizationReward`).

    >>> r = get_dclr_reward()
    >>> r(["<think>.</think><answer>(10,10),(20,20)</answer>"], solution=[[10, 10, 20, 20]])
    [1.0]
    """
    config, space_kwargs = _split(options)
    return LocalizationReward("dclr", config, name=name, **space_kwargs)


def get_iou_reward(*, name: str = "iou_reward", **space_kwargs: Any) -> LocalizationReward:
    """Plain IoU reward with the zero-box rule (the ablation baseline)."""
    return LocalizationReward("iou", PAPER_DCLR, name=name, **space_kwargs)


def get_consistency_reward(*, name: str = "consistency_reward", **options: Any) -> LocalizationReward:
    """Centre/area consistency ``S`` alone, with the zero-box rule (ablation); ``options`` as
    :func:`get_dclr_reward`."""
    config, space_kwargs = _split(options)
    return LocalizationReward("consistency", config, name=name, **space_kwargs)


def get_multi_box_reward(*, name: str = "multi_box_reward", **options: Any) -> MultiBoxReward:
    """Several-box DCLR reward with Hungarian matching (see :func:`multi_box_score`); ``options`` as
    :func:`get_dclr_reward`."""
    config, space_kwargs = _split(options)
    return MultiBoxReward(config, name=name, **space_kwargs)


def get_format_reward(*, name: str = "format_reward", prompt_family: PromptFamily | None = "reasoning") -> FormatReward:
    """Format reward callable (see :class:`FormatReward`)."""
    return FormatReward(name=name, prompt_family=prompt_family)


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
    "SingleBoxReward",
    "gt_row_error",
    "masked_scores",
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
    "score_box",
    "SCALAR_MAX_BATCH",
]
