"""The six localization rewards the ablation compares, behind one batch function.

Kinds (all scores in [0, 1], the zero-box rule of docs/method.md §3 applied by the core):

- ``"iou"``: plain IoU, ``differad_rl.rewards.localization_scores(kind="iou")``.
- ``"iou_area_penalty"``: **baseline, implemented here, not in the package.** A reconstruction of the
  original research code's IoU-with-area-penalty reward (the exact constant of the original is not
  available to us; the shape is what matters for the study)::

      R = clip(IoU(p, g) - lam * |A_p - A_g| / (A_g + eps), 0, 1),   lam = 0.5, eps = 1e-6

  for a valid prediction and a non-zero ground truth; the zero-box rule otherwise (normal target:
  1 iff the zero box is answered; missing / zero / degenerate prediction on an anomalous target: 0).
  Like IoU it is 0 for every non-overlapping box, so it cannot tell near misses from far misses.
- ``"dclr"``: DCLR with the paper's centre term (``DCLRConfig(center_norm="paper")``).
- ``"dclr_enclosing"``: DCLR with the centre distance normalised by the diagonal of the smallest
  box enclosing both (``DCLRConfig(center_norm="enclosing")``).
- ``"dclr_sides"``: DCLR with the shape-aware size term (``DCLRConfig(size_term="sides")``, paper
  centre term): the area consistency s_a is replaced by
  ``s_s = 1 − min(1, (|w_p − w_g| / (w_g + ε) + |h_p − h_g| / (h_g + ε)) / 2)``, so R = 1 iff the
  boxes coincide (a strip with the true centre and area no longer scores 1).
- ``"dclr_sides_enclosing"``: the same with the enclosing centre term
  (``DCLRConfig(size_term="sides", center_norm="enclosing")``).
"""

from __future__ import annotations

import torch

from differad_rl.boxes import box_area, box_iou, is_zero_box
from differad_rl.rewards import DCLRConfig, localization_scores

REWARD_KINDS: tuple[str, ...] = (
    "iou", "iou_area_penalty", "dclr", "dclr_enclosing", "dclr_sides", "dclr_sides_enclosing"
)
REWARD_LABELS: dict[str, str] = {
    "iou": "IoU",
    "iou_area_penalty": "IoU − area penalty (original, baseline)",
    "dclr": "DCLR (paper centre term)",
    "dclr_enclosing": "DCLR (enclosing centre term)",
    "dclr_sides": "DCLR-sides (paper centre term)",
    "dclr_sides_enclosing": "DCLR-sides (enclosing centre term)",
}

#: DCLR configuration of each DCLR kind (the package's own ``DCLRConfig``).
DCLR_CONFIGS: dict[str, DCLRConfig] = {
    "dclr": DCLRConfig(center_norm="paper"),
    "dclr_enclosing": DCLRConfig(center_norm="enclosing"),
    "dclr_sides": DCLRConfig(center_norm="paper", size_term="sides"),
    "dclr_sides_enclosing": DCLRConfig(center_norm="enclosing", size_term="sides"),
}

AREA_PENALTY_LAMBDA = 0.5
AREA_PENALTY_EPS = 1e-6


def iou_area_penalty_scores(
    pred: torch.Tensor,
    pred_valid: torch.Tensor,
    gt: torch.Tensor,
    lam: float = AREA_PENALTY_LAMBDA,
    eps: float = AREA_PENALTY_EPS,
) -> torch.Tensor:
    """Baseline reward ``clip(IoU - lam * |A_p - A_g| / (A_g + eps), 0, 1)`` with the zero-box rule.

    Args:
        pred: ``(N, 4)`` predicted boxes ``(x1, y1, x2, y2)`` in pixels (rows may be NaN if invalid).
        pred_valid: ``(N,)`` bool, False where no box was produced.
        gt: ``(N, 4)`` ground-truth boxes; the zero box means "normal target".
        lam: penalty weight (>= 0).
        eps: stabiliser of the relative area difference.

    Returns:
        ``(N,)`` float scores in [0, 1], dtype of ``pred`` (float32 for integer input).
    """
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    iou_rule = localization_scores(pred, pred_valid, gt, kind="iou")  # zero-box rule lives here
    dtype = iou_rule.dtype
    safe_pred = torch.nan_to_num(torch.as_tensor(pred, dtype=dtype))
    gt_t = torch.as_tensor(gt, dtype=dtype)
    rel_area = (box_area(safe_pred) - box_area(gt_t)).abs() / (box_area(gt_t) + eps)
    penalised = (box_iou(safe_pred, gt_t) - lam * rel_area).clamp(0.0, 1.0)
    # Only where IoU's rule produced a geometric score (anomalous target, valid box) is the penalty used.
    anomalous = ~is_zero_box(gt_t)
    return torch.where(anomalous & (iou_rule > 0), penalised, iou_rule)


def score(kind: str, pred: torch.Tensor, pred_valid: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Localization reward ``(N,)`` of one of ``REWARD_KINDS`` for a batch of boxes in pixels."""
    if kind == "iou":
        return localization_scores(pred, pred_valid, gt, kind="iou")
    if kind == "iou_area_penalty":
        return iou_area_penalty_scores(pred, pred_valid, gt)
    if kind in DCLR_CONFIGS:
        return localization_scores(pred, pred_valid, gt, kind="dclr", config=DCLR_CONFIGS[kind])
    raise ValueError(f"kind must be one of {REWARD_KINDS}, got {kind!r}")
