"""Held-out evaluation of the stand-in policy with the project's evaluation code.

Metrics come from ``differad_rl.eval.localization_metrics`` (docs/method.md §8): mIoU, Acc@0.3, F1@0.3
("overall" summary). A normal target scores IoU 1 iff the zero box is answered; an anomalous one the
IoU with its best-matching ground-truth box. F1 at IoU ≥ 0.3: TP = anomalous target hit, FP = a box
on a normal target or a box with IoU < 0.3, FN = anomalous target not hit. An undefined F1 (no
anomalous target and no box) is reported as 0.
"""

from __future__ import annotations

import math

import torch

from differad_rl.eval import localization_metrics

THRESHOLD = 0.3


def box_metrics(pred: torch.Tensor, gt_boxes: list[list[list[float]]], threshold: float = THRESHOLD) -> dict[str, float]:
    """Overall mIoU / Acc@τ / F1@τ of greedy boxes ``pred`` (N, 4) against per-sample box lists."""
    out = localization_metrics(pred.detach().double().numpy(), None, gt_boxes, iou_threshold=threshold)["overall"]
    f1 = out["f1"]
    return {
        "miou": float(out["miou"]),
        "acc": float(out["acc"]),
        "f1": 0.0 if f1 is None or math.isnan(f1) else float(f1),
    }
