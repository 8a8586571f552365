"""Vectorised box geometry and the dual-consistency localization reward (DCLR) formula.

Boxes are ``(x1, y1, x2, y2)`` in the last dimension, continuous geometry (area ``(x2-x1)(y2-y1)``,
no "+1 pixel" convention). Functions are elementwise over broadcastable batch shapes unless named
``pairwise_*``. Tensors keep their floating dtype and device; integer tensors, numpy arrays and
lists are upcast to float64 tensors. These are the raw formulas for *valid* boxes; the zero-box and
degenerate-prediction rules of the method live in :mod:`differad_rl.rewards`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

CenterNorm = Literal["paper", "enclosing"]
SizeTerm = Literal["area", "sides"]
CENTER_NORMS: tuple[CenterNorm, ...] = ("paper", "enclosing")
SIZE_TERMS: tuple[SizeTerm, ...] = ("area", "sides")

MAX_COORD = 1e6
"""The sane bound on a coordinate: boxes with a value of magnitude above it are not valid.

The rewards score a predicted box with ``|v| > MAX_COORD`` as invalid (0, never NaN) and reject such
ground truth at start-up. A million pixels is far beyond any image a vision-language model reads, and
below it every product of the formulas stays finite (``(2·MAX_COORD)² ≈ 4e12``, even in float32)."""


def _check_center_norm(center_norm: str) -> None:
    if center_norm not in CENTER_NORMS:
        raise ValueError(f"center_norm={center_norm!r} is not known; expected one of {CENTER_NORMS}")


def _check_size_term(size_term: str) -> None:
    if size_term not in SIZE_TERMS:
        raise ValueError(f"size_term={size_term!r} is not known; expected one of {SIZE_TERMS}")


@dataclass(frozen=True)
class DCLRConfig:
    """Parameters of the dual-consistency localization reward (defaults: the paper's; the one place
    they are written).

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
    center_norm: CenterNorm = "paper"
    size_term: SizeTerm = "area"

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
        _check_center_norm(self.center_norm)
        _check_size_term(self.size_term)


PAPER_DCLR = DCLRConfig()
"""The paper's DCLR parameters (``w_c = 0.6``, ``w_a = 0.4``, ``ε = 1e-6``, centre over the larger
diagonal, area consistency)."""


def as_boxes(boxes: Any, *, name: str = "boxes") -> Tensor:
    """``boxes`` as a floating tensor shaped ``(..., 4)`` (integers and non-tensors → float64)."""
    if isinstance(boxes, Tensor):
        t = boxes if boxes.is_floating_point() else boxes.to(torch.float64)
    else:
        t = torch.as_tensor(boxes, dtype=torch.float64)
    if t.shape[-1:] != (4,):
        raise ValueError(f"{name} must have shape (..., 4), got shape {tuple(t.shape)}")
    return t


def box_area(boxes: Any) -> Tensor:
    """Area ``max(x2 - x1, 0) · max(y2 - y1, 0)``, shape ``boxes.shape[:-1]``."""
    b = as_boxes(boxes)
    return (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)


def _pair(p: Any, g: Any) -> tuple[Tensor, Tensor]:
    pt, gt = as_boxes(p, name="pred"), as_boxes(g, name="gt")
    dtype = torch.promote_types(pt.dtype, gt.dtype)
    return pt.to(dtype), gt.to(dtype)


def _xp(x: Any) -> Any:
    return np if isinstance(x, np.ndarray) else torch


def inter_union(p: Any, g: Any) -> tuple[Any, Any]:
    """The box-geometry kernel: intersection and union areas of paired boxes ``(..., 4)``.

    ``|p ∩ g| = max(min(x2) − max(x1), 0) · max(min(y2) − max(y1), 0)``,
    ``|p ∪ g| = |p| + |g| − |p ∩ g|`` (areas of degenerate boxes count 0). Works on torch tensors
    and NumPy arrays alike (the evaluation metrics are NumPy end to end), returning the same kind;
    the caller has promoted both to one floating dtype. IoU, GIoU, DIoU, CIoU, DCLR and the metrics
    all take their overlap from here.
    """
    xp = _xp(p)
    iw = (xp.minimum(p[..., 2], g[..., 2]) - xp.maximum(p[..., 0], g[..., 0])).clip(0)
    ih = (xp.minimum(p[..., 3], g[..., 3]) - xp.maximum(p[..., 1], g[..., 1])).clip(0)
    inter = iw * ih
    area_p = (p[..., 2] - p[..., 0]).clip(0) * (p[..., 3] - p[..., 1]).clip(0)
    area_g = (g[..., 2] - g[..., 0]).clip(0) * (g[..., 3] - g[..., 1]).clip(0)
    return inter, area_p + area_g - inter


def enclosing_wh(p: Any, g: Any) -> tuple[Any, Any]:
    """Width and height of the smallest box enclosing both paired boxes ``(..., 4)`` (torch or NumPy)."""
    xp = _xp(p)
    return (
        xp.maximum(p[..., 2], g[..., 2]) - xp.minimum(p[..., 0], g[..., 0]),
        xp.maximum(p[..., 3], g[..., 3]) - xp.minimum(p[..., 1], g[..., 1]),
    )


def box_iou(p: Any, g: Any) -> Tensor:
    """Elementwise intersection over union; 0 where the union is empty.

    ``IoU = |p ∩ g| / (|p| + |g| − |p ∩ g|)`` (:func:`inter_union`). Shapes broadcast:
    ``(..., 4), (..., 4) -> (...)``.
    """
    p, g = _pair(p, g)
    inter, union = inter_union(p, g)
    return torch.where(union > 0, inter / torch.where(union > 0, union, 1), torch.zeros_like(union))


def center_consistency(p: Any, g: Any, eps: float = PAPER_DCLR.eps, center_norm: CenterNorm = "paper") -> Tensor:
    """Centre consistency ``s_c = 1 − min(1, d / (D + ε))`` in ``[0, 1]``.

    ``d`` is the distance between the box centres. ``D`` is ``max(diag_p, diag_g, 1)`` with
    ``center_norm="paper"`` (DifferAD-R1), or ``max(diag_e, 1)`` with ``"enclosing"``, where ``diag_e``
    is the diagonal of the smallest box enclosing both (as DIoU). The paper's form saturates at 0
    once the centres are further apart than the larger box's diagonal; the enclosing form keeps a
    position signal at every distance (``d ≤ diag_e`` always). Identical boxes give exactly 1.
    """
    _check_center_norm(center_norm)
    p, g = _pair(p, g)
    # (p0 − g0) + (p2 − g2): exactly 0 for identical boxes (p0 + p2 − g0 − g2 is not, in floats)
    d = torch.hypot(
        ((p[..., 0] - g[..., 0]) + (p[..., 2] - g[..., 2])) / 2,
        ((p[..., 1] - g[..., 1]) + (p[..., 3] - g[..., 3])) / 2,
    )
    if center_norm == "paper":
        diag_p = torch.hypot(p[..., 2] - p[..., 0], p[..., 3] - p[..., 1])
        diag_g = torch.hypot(g[..., 2] - g[..., 0], g[..., 3] - g[..., 1])
        norm = torch.maximum(diag_p, diag_g)
    else:
        norm = torch.hypot(*enclosing_wh(p, g))
    norm = norm.clamp(min=1.0) + eps
    return 1 - (d / norm).clamp(max=1.0)


def area_consistency(p: Any, g: Any, eps: float = PAPER_DCLR.eps) -> Tensor:
    """Area consistency ``s_a = 1 − min(1, |A_p − A_g| / (A_g + ε))`` in ``[0, 1]``."""
    p, g = _pair(p, g)
    ag = box_area(g)
    return 1 - ((box_area(p) - ag).abs() / (ag + eps)).clamp(max=1.0)


def side_consistency(p: Any, g: Any, eps: float = PAPER_DCLR.eps) -> Tensor:
    """Side consistency ``s_s = 1 − min(1, (|w_p − w_g| / (w_g + ε) + |h_p − h_g| / (h_g + ε)) / 2)``.

    A shape-aware replacement for :func:`area_consistency` (``size_term="sides"``, beyond the paper):
    equal area is not enough, width and height must both match, so a thin strip of the right area
    no longer scores as well as the true box.
    """
    p, g = _pair(p, g)
    wp, hp = (p[..., 2] - p[..., 0]).clamp(min=0), (p[..., 3] - p[..., 1]).clamp(min=0)
    wg, hg = (g[..., 2] - g[..., 0]).clamp(min=0), (g[..., 3] - g[..., 1]).clamp(min=0)
    return 1 - (((wp - wg).abs() / (wg + eps) + (hp - hg).abs() / (hg + eps)) / 2).clamp(max=1.0)


def consistency_score(p: Any, g: Any, config: DCLRConfig = PAPER_DCLR) -> Tensor:
    """``S = (w_c · s_c + w_a · s_a) / (w_c + w_a)``: the centre/size part of DCLR, in ``[0, 1]``.

    ``s_a`` is :func:`area_consistency` with ``config.size_term="area"`` (the paper) or
    :func:`side_consistency` with ``"sides"``; ``s_c`` is :func:`center_consistency`.
    """
    c = config
    size = area_consistency(p, g, c.eps) if c.size_term == "area" else side_consistency(p, g, c.eps)
    return (c.w_center * center_consistency(p, g, c.eps, c.center_norm) + c.w_area * size) / (c.w_center + c.w_area)


def dclr(p: Any, g: Any, config: DCLRConfig = PAPER_DCLR) -> Tensor:
    """Dual-consistency localization reward for valid boxes: ``R = IoU + (1 − IoU) · S``.

    ``S`` is :func:`consistency_score` with ``config`` (:class:`DCLRConfig`; the paper's by
    default). ``R ≥ IoU``, ``R ∈ [0, 1]`` and ``R = 1`` when the boxes
    coincide. With the paper's ``size_term="area"``, ``R = 1`` also when the boxes share centre and
    area but differ in shape (a box and its transpose, or a thin strip of the right area), since then
    ``S = 1`` — a policy can learn to exploit it (see the ablation in ``examples/ablation``). With
    ``size_term="sides"``, ``R = 1`` iff the boxes coincide.
    """
    iou = box_iou(p, g)
    return iou + (1 - iou) * consistency_score(p, g, config)


def is_zero_box(boxes: Any) -> Tensor:
    """``True`` where the box is exactly ``(0, 0, 0, 0)`` (the method's "normal target" answer)."""
    return (as_boxes(boxes) == 0).all(dim=-1)


def is_degenerate(boxes: Any) -> Tensor:
    """``True`` where ``x2 ≤ x1`` or ``y2 ≤ y1`` (or a value is NaN): the box has no area."""
    b = as_boxes(boxes)
    return ~((b[..., 2] > b[..., 0]) & (b[..., 3] > b[..., 1]))


def pairwise_dclr(p: Any, g: Any, config: DCLRConfig = PAPER_DCLR) -> Tensor:
    """DCLR of every prediction against every ground-truth box: ``(P, 4), (N, 4) -> (P, N)``."""
    pt, gt = _pair(p, g)
    return dclr(pt[:, None, :], gt[None, :, :], config)
