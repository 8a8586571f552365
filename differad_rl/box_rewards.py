"""The peers' box rewards, beside the method's DCLR (docs/method.md §9): thresholded IoU, IoU², GIoU, DIoU,
CIoU and Hungarian-matched thresholded hits.

Every reward is in ``[0, 1]`` and follows the method's rules of docs/method.md §3, like
:mod:`differad_rl.rewards`: a ground truth ``(0, 0, 0, 0)`` (normal target) scores 1 iff the answer
is the zero box, else 0; for an anomalous target a missing, zero or degenerate prediction scores 0.
The formulas, for valid boxes ``p`` (prediction) and ``g`` (ground truth), continuous geometry:

====================  ==========================================  ==============================
kind                  reward                                      used by
====================  ==========================================  ==============================
``"iou"``             ``IoU``  (:func:`differad_rl.rewards.       VLM-R1
                      get_iou_reward`)
``"iou_threshold"``   ``1 if IoU > t else 0`` (``t = 0.5``)       AnomalyR1, Visual-RFT
``"iou_squared"``     ``IoU²``                                    Perception-R1
``"giou"``            ``(GIoU + 1) / 2``                          torchvision ``generalized_box_iou``
``"diou"``            ``(DIoU + 1) / 2``                          torchvision ``distance_box_iou``
``"ciou"``            ``max(0, (CIoU + 1) / 2)``                  torchvision ``complete_box_iou``
matched hits          ``Σ_matched (1[IoU > t] + 1[L1 < l]) / 2``  VisionReasoner
                      ``/ max(P, N)``
====================  ==========================================  ==============================

Sources (read for these definitions):

* Visual-RFT (arXiv 2503.01785, code Liuziyu77/Visual-RFT): ``src/virft/src/open_r1/grpo.py``
  ``sort_and_calculate_iou(..., iou_threshold=0.5)`` counts a match iff ``best_iou > iou_threshold``
  (line 109 ff.). AnomalyR1 uses the same IoU > 0.5 → 1 rule (as its paper states; code not read here).
* Perception-R1 (arXiv 2504.07954, code linkangheng/PR1): ``src/open_r1/rewards.py``
  ``pr1_grounding_reward`` appends ``iou**2`` (line 51).
* torchvision ``ops/boxes.py``: ``generalized_box_iou`` = ``IoU − (C − U) / C`` (``C`` the enclosing
  box's area, ``U`` the union), ``distance_box_iou`` = ``IoU − ρ² / (c² + eps)`` (``ρ`` the centre
  distance, ``c`` the enclosing box's diagonal, ``eps = 1e-7``), ``complete_box_iou`` =
  ``DIoU − α·v`` with ``v = 4/π² · (atan(w_g / h_g) − atan(w_p / h_p))²`` and
  ``α = v / (1 − IoU + v + eps)``. They are similarity scores in ``(−1, 1]`` (CIoU can go below −1
  for very different aspect ratios); as rewards they are mapped by ``(x + 1) / 2`` onto ``[0, 1]``
  (order and the value 1 for coinciding boxes kept), CIoU clamped at 0. Visual-RFT's LISA reward
  uses the same shift, ``GIoU + 1`` (``src/virft/src/open_r1/grpo_lisa.py``, line 88), unhalved.
* VisionReasoner (arXiv 2505.12081; training code JIA-Lab-research/Seg-Zero,
  ``verl/utils/reward_score/vision_reasoner.py``, ``vision_reasoner_accuracy_reward``, read through a
  fork): per (prediction, ground truth) pair three 0/1 terms — ``IoU > 0.5``, mean absolute corner
  difference ``< 10`` and point distance ``< 30`` with the point inside the predicted box — a
  Hungarian matching maximising their sum, and the matched sum over ``max(P, N)``. Our answers carry
  no point, so the point term is dropped and the sum is divided by 2 (the reward stays in
  ``[0, 1]``). The L1 threshold is in the model's coordinate units (VisionReasoner: pixels of an
  840-pixel image; for Qwen2-VL's 0..1000 space 10 units are 1 % of the image side). Their IoU uses
  the "+1 pixel" convention; ours is continuous (docs/method.md §3).

The TRL-shaped callables (``f(completions, solution, **kwargs) -> list[float]``) and their picklable
``get_*`` factories follow :mod:`differad_rl.rewards` exactly (same ground-truth conversion, same
``space`` / ``gt_space`` keywords, unparsable share logged through ``log_metric``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from differad_rl.boxes import _pair, box_iou, enclosing_wh, inter_union
from differad_rl.coords import DEFAULT_FACTOR, DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, Space
from differad_rl.prompts import PromptFamily
from differad_rl.rewards import (
    DCLRConfig,
    SingleBoxReward,
    _Reward,
    check_gt_boxes,
    masked_scores,
    matched_mean,
    matching_inputs,
)

PeerKind = Literal["iou_threshold", "iou_squared", "giou", "diou", "ciou"]
PEER_BOX_KINDS: tuple[PeerKind, ...] = ("iou_threshold", "iou_squared", "giou", "diou", "ciou")

__all__ = [
    "PEER_BOX_KINDS",
    "MatchedHitsReward",
    "PeerBoxReward",
    "ciou_reward",
    "complete_iou",
    "diou_reward",
    "distance_iou",
    "generalized_iou",
    "get_ciou_reward",
    "get_diou_reward",
    "get_giou_reward",
    "get_iou_squared_reward",
    "get_iou_threshold_reward",
    "get_matched_hits_reward",
    "giou_reward",
    "iou_squared_reward",
    "iou_threshold_reward",
    "matched_hits_reward",
    "matched_hits_score",
    "peer_box_scores",
]


# ------------------------------------------------------------------------------------ formulas
def generalized_iou(p: Any, g: Any) -> Tensor:
    """Elementwise GIoU ``IoU − (C − U) / C`` in ``(−1, 1]`` (torchvision's ``generalized_box_iou``,
    elementwise instead of pairwise). ``C`` is the area of the smallest box enclosing both and ``U``
    the union; ``C = 0`` (two empty boxes) gives the IoU (0). Shapes broadcast ``(..., 4) -> (...)``.
    """
    p, g = _pair(p, g)
    iou = box_iou(p, g)
    ew, eh = enclosing_wh(p, g)
    c = ew.clamp(min=0) * eh.clamp(min=0)
    _, union = inter_union(p, g)
    penalty = torch.where(c > 0, (c - union) / torch.where(c > 0, c, 1), torch.zeros_like(c))
    return iou - penalty


def distance_iou(p: Any, g: Any, eps: float = 1e-7) -> Tensor:
    """Elementwise DIoU ``IoU − ρ² / (c² + eps)`` in ``(−1, 1]`` (torchvision's ``distance_box_iou``):
    ``ρ`` the distance of the box centres, ``c`` the diagonal of the smallest enclosing box."""
    p, g = _pair(p, g)
    ew, eh = enclosing_wh(p, g)
    diag2 = ew**2 + eh**2 + eps
    rho2 = ((p[..., 0] + p[..., 2] - g[..., 0] - g[..., 2]) / 2) ** 2 + (
        (p[..., 1] + p[..., 3] - g[..., 1] - g[..., 3]) / 2
    ) ** 2
    return box_iou(p, g) - rho2 / diag2


def complete_iou(p: Any, g: Any, eps: float = 1e-7) -> Tensor:
    """Elementwise CIoU ``DIoU − α·v`` (torchvision's ``complete_box_iou``), ``p`` the prediction:
    ``v = 4/π² · (atan(w_g / h_g) − atan(w_p / h_p))²``, ``α = v / (1 − IoU + v + eps)``.
    In ``(−2, 1]``, below −1 for distant boxes of very different aspect ratios; boxes must have
    ``h > 0`` (the caller masks others).
    """
    p, g = _pair(p, g)
    iou = box_iou(p, g)
    diou = distance_iou(p, g, eps)
    wp, hp = p[..., 2] - p[..., 0], p[..., 3] - p[..., 1]
    wg, hg = g[..., 2] - g[..., 0], g[..., 3] - g[..., 1]
    v = (4 / math.pi**2) * (torch.atan(wg / hg) - torch.atan(wp / hp)) ** 2
    alpha = v / (1 - iou + v + eps)
    return diou - alpha * v


def _unit(x: Tensor) -> Tensor:
    return ((x + 1) / 2).clamp(0.0, 1.0)


def _raw(kind: str, p: Tensor, g: Tensor, threshold: float, eps: float) -> Tensor:
    if kind == "iou_threshold":
        return (box_iou(p, g) > threshold).to(p.dtype)
    if kind == "iou_squared":
        return box_iou(p, g) ** 2
    if kind == "giou":
        return _unit(generalized_iou(p, g))
    if kind == "diou":
        return _unit(distance_iou(p, g, eps))
    return _unit(complete_iou(p, g, eps))


def _check_kind(kind: str) -> None:
    if kind not in PEER_BOX_KINDS:
        raise ValueError(f"kind={kind!r} is not known; expected one of {PEER_BOX_KINDS}")


def _check_threshold(name: str, value: Any, *, unit: bool) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or (unit and not 0.0 <= value <= 1.0) or (not unit and value < 0):
        raise ValueError(f"{name} must be a finite number {'in [0, 1]' if unit else '>= 0'}, got {value!r}")
    return float(value)


def peer_box_scores(
    pred: Any,
    pred_valid: Any,
    gt: Any,
    kind: PeerKind,
    *,
    threshold: float = 0.5,
    eps: float = 1e-7,
) -> Tensor:
    """A peer's box reward per sample with the zero-box and degenerate rules, shape ``(N,)``.

    Args:
        pred: predicted boxes ``(N, 4)``; rows where ``pred_valid`` is False are ignored (may be NaN).
        pred_valid: ``(N,)`` bool, whether a box was parsed.
        gt: ground-truth boxes ``(N, 4)`` in the same space (validated by
            :func:`differad_rl.rewards.check_gt_boxes`).
        kind: one of :data:`PEER_BOX_KINDS` (module docstring).
        threshold: IoU threshold of ``"iou_threshold"`` (strict ``>``, Visual-RFT's rule).
        eps: ``eps`` of DIoU / CIoU (torchvision's 1e-7).

    Returns:
        Rewards in ``[0, 1]`` with the dtype of ``gt`` (float64 for non-float input); exactly 1 for a
        prediction equal to a (non-zero) ground truth, for every kind.
    """
    _check_kind(kind)
    threshold = _check_threshold("threshold", threshold, unit=True)
    return masked_scores(pred, pred_valid, check_gt_boxes(gt, name="gt"), lambda p, g: _raw(kind, p, g, threshold, eps))


def matched_hits_score(
    pred_boxes: Sequence[Sequence[float]] | None,
    gt_boxes: Any,
    *,
    iou_threshold: float = 0.5,
    l1_threshold: float = 10.0,
) -> float:
    """VisionReasoner's several-box accuracy without its point term (module docstring).

    Per pair ``h(p, g) = (1[IoU(p, g) > iou_threshold] + 1[mean |p − g| < l1_threshold]) / 2``; the
    reward is ``Σ h`` over the one-to-one matching that maximises it (Hungarian), over ``max(P, N)``.

    Args:
        pred_boxes: the ``P`` parsed boxes, or ``None`` when the completion has no answer at all.
        gt_boxes: ``(N, 4)`` ground truth; ``N = 0`` (or only zero boxes) means a normal target.

    Returns:
        In ``[0, 1]``. Normal target: 1 iff an answer exists and is empty or only zero boxes. A
        degenerate, zero or out-of-bound (|v| > MAX_COORD) predicted box counts in ``P`` and matches with 0.
    """
    early, p_safe, ok, g = matching_inputs(pred_boxes, gt_boxes)  # the method's rules, shared
    if early is not None:
        return early
    pp, gg = p_safe[:, None, :], g[None, :, :]
    hits = (box_iou(pp, gg) > iou_threshold).to(pp.dtype) + ((pp - gg).abs().mean(-1) < l1_threshold).to(pp.dtype)
    return matched_mean(hits / 2, ok)


# ------------------------------------------------------------------------------ TRL-shaped rewards
class PeerBoxReward(SingleBoxReward):
    """Single-box peer reward (``kind`` in :data:`PEER_BOX_KINDS`), TRL-shaped.

    ``solution``: one ``[x1, y1, x2, y2]`` per completion, ``[0, 0, 0, 0]`` for a normal target, in
    the model's space (or original pixels with ``gt_space="pixel"`` and an ``image_size`` column) —
    the rules of :class:`differad_rl.rewards.SingleBoxReward`, like the method's rewards (the box is
    read only in the format of ``prompt_family``).
    """

    def __init__(self, kind: PeerKind, *, threshold: float = 0.5, eps: float = 1e-7, name: str | None = None,
                 require_answer: bool = True, space: Space = "pixel", gt_space: Space | None = None,
                 min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS,
                 factor: int = DEFAULT_FACTOR, prompt_family: PromptFamily | None = "reasoning") -> None:
        _check_kind(kind)
        super().__init__(name or f"{kind}_reward", DCLRConfig(), require_answer=require_answer, space=space,
                         gt_space=gt_space, min_pixels=min_pixels, max_pixels=max_pixels, factor=factor,
                         prompt_family=prompt_family)
        self.kind = kind
        self.threshold = _check_threshold("threshold", threshold, unit=True)
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
        self.eps = float(eps)

    def formula(self, p: Tensor, g: Tensor) -> Tensor:
        return _raw(self.kind, p, g, self.threshold, self.eps)


class MatchedHitsReward(_Reward):
    """VisionReasoner-style several-box reward (:func:`matched_hits_score`); ``solution``: a list of
    boxes per completion (``[]`` or ``[[0, 0, 0, 0]]`` = normal)."""

    def __init__(self, *, iou_threshold: float = 0.5, l1_threshold: float = 10.0, name: str = "matched_hits_reward",
                 require_answer: bool = True, space: Space = "pixel", gt_space: Space | None = None,
                 min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS,
                 factor: int = DEFAULT_FACTOR, prompt_family: PromptFamily | None = "reasoning") -> None:
        super().__init__(name, DCLRConfig(), require_answer=require_answer, space=space, gt_space=gt_space,
                         min_pixels=min_pixels, max_pixels=max_pixels, factor=factor, prompt_family=prompt_family)
        self.iou_threshold = _check_threshold("iou_threshold", iou_threshold, unit=True)
        self.l1_threshold = _check_threshold("l1_threshold", l1_threshold, unit=False)

    def __call__(self, completions: Sequence[Any], solution: Any, **kwargs: Any) -> list[float]:
        return self._score_box_sets(  # the several-box loop of multi_box_reward, another score
            completions, solution, kwargs,
            lambda preds, g: matched_hits_score(preds, g, iou_threshold=self.iou_threshold,
                                                l1_threshold=self.l1_threshold))


def get_iou_threshold_reward(*, threshold: float = 0.5, name: str = "iou_threshold_reward",
                             **space_kwargs: Any) -> PeerBoxReward:
    """``1 if IoU > threshold else 0`` (AnomalyR1, Visual-RFT), zero-box rule included.
    ``space_kwargs``: ``require_answer``, ``space``, ``gt_space``, ``min_pixels``, ``max_pixels``, ``factor``,
    ``prompt_family``.

    >>> r = get_iou_threshold_reward()
    >>> r(["<answer>(0,0),(10,10)</answer>", "<answer>(0,0),(10,4)</answer>"], solution=[[0, 0, 10, 8]] * 2)
    [1.0, 0.0]
    """
    return PeerBoxReward("iou_threshold", threshold=threshold, name=name, **space_kwargs)


def get_iou_squared_reward(*, name: str = "iou_squared_reward", **space_kwargs: Any) -> PeerBoxReward:
    """``IoU²`` (Perception-R1), zero-box rule included."""
    return PeerBoxReward("iou_squared", name=name, **space_kwargs)


def get_giou_reward(*, name: str = "giou_reward", **space_kwargs: Any) -> PeerBoxReward:
    """``(GIoU + 1) / 2`` (torchvision's GIoU), zero-box rule included."""
    return PeerBoxReward("giou", name=name, **space_kwargs)


def get_diou_reward(*, eps: float = 1e-7, name: str = "diou_reward", **space_kwargs: Any) -> PeerBoxReward:
    """``(DIoU + 1) / 2`` (torchvision's DIoU), zero-box rule included."""
    return PeerBoxReward("diou", eps=eps, name=name, **space_kwargs)


def get_ciou_reward(*, eps: float = 1e-7, name: str = "ciou_reward", **space_kwargs: Any) -> PeerBoxReward:
    """``max(0, (CIoU + 1) / 2)`` (torchvision's CIoU), zero-box rule included."""
    return PeerBoxReward("ciou", eps=eps, name=name, **space_kwargs)


def get_matched_hits_reward(*, iou_threshold: float = 0.5, l1_threshold: float = 10.0,
                            name: str = "matched_hits_reward", **space_kwargs: Any) -> MatchedHitsReward:
    """VisionReasoner's Hungarian-matched thresholded terms (:func:`matched_hits_score`)."""
    return MatchedHitsReward(iou_threshold=iou_threshold, l1_threshold=l1_threshold, name=name, **space_kwargs)


iou_threshold_reward = get_iou_threshold_reward()
iou_squared_reward = get_iou_squared_reward()
giou_reward = get_giou_reward()
diou_reward = get_diou_reward()
ciou_reward = get_ciou_reward()
matched_hits_reward = get_matched_hits_reward()
