"""Scalar pure-Python oracle of every formula of the method (docs/method.md §2–§6).

Written from the specification, one sample at a time, with no numpy or torch, so that the
vectorised package code can be checked against an independent implementation. A deliberate
near-copy of the package's formulas (and of their defaults, e.g. w_c = 0.6): never import them here.
"""

from __future__ import annotations

import itertools
import math
import statistics

ZERO = (0.0, 0.0, 0.0, 0.0)


def area(b):
    return max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)


def iou(p, g):
    iw = max(min(p[2], g[2]) - max(p[0], g[0]), 0.0)
    ih = max(min(p[3], g[3]) - max(p[1], g[1]), 0.0)
    inter = iw * ih
    union = area(p) + area(g) - inter
    return inter / union if union > 0 else 0.0


def center(p, g, eps=1e-6, center_norm="paper"):
    d = math.hypot((p[0] + p[2]) / 2 - (g[0] + g[2]) / 2, (p[1] + p[3]) / 2 - (g[1] + g[3]) / 2)
    if center_norm == "paper":
        norm = max(math.hypot(p[2] - p[0], p[3] - p[1]), math.hypot(g[2] - g[0], g[3] - g[1]), 1.0)
    else:
        ex = max(p[2], g[2]) - min(p[0], g[0])
        ey = max(p[3], g[3]) - min(p[1], g[1])
        norm = max(math.hypot(ex, ey), 1.0)
    return 1.0 - min(1.0, d / (norm + eps))


def area_score(p, g, eps=1e-6):
    return 1.0 - min(1.0, abs(area(p) - area(g)) / (area(g) + eps))


def side_score(p, g, eps=1e-6):
    wp, hp = max(p[2] - p[0], 0.0), max(p[3] - p[1], 0.0)
    wg, hg = max(g[2] - g[0], 0.0), max(g[3] - g[1], 0.0)
    return 1.0 - min(1.0, (abs(wp - wg) / (wg + eps) + abs(hp - hg) / (hg + eps)) / 2)


def consistency(p, g, w_center=0.6, w_area=0.4, eps=1e-6, center_norm="paper", size_term="area"):
    size = area_score(p, g, eps) if size_term == "area" else side_score(p, g, eps)
    return (w_center * center(p, g, eps, center_norm) + w_area * size) / (w_center + w_area)


def dclr(p, g, w_center=0.6, w_area=0.4, eps=1e-6, center_norm="paper", size_term="area"):
    i = iou(p, g)
    return i + (1.0 - i) * consistency(p, g, w_center, w_area, eps, center_norm, size_term)


def is_zero(b):
    return all(v == 0 for v in b)


def localization(pred, gt, kind="dclr", w_center=0.6, w_area=0.4, eps=1e-6, center_norm="paper", size_term="area"):
    """Zero-box rule + degenerate rule + formula. ``pred`` is None when nothing parsed."""
    if is_zero(gt):
        return 1.0 if pred is not None and is_zero(pred) else 0.0
    if pred is None or not all(math.isfinite(v) for v in pred):
        return 0.0
    if is_zero(pred) or pred[2] <= pred[0] or pred[3] <= pred[1]:
        return 0.0
    if kind == "iou":
        return iou(pred, gt)
    if kind == "consistency":
        return consistency(pred, gt, w_center, w_area, eps, center_norm, size_term)
    return dclr(pred, gt, w_center, w_area, eps, center_norm, size_term)


def multi_box(preds, gts, **cfg):
    """Brute force over all one-to-one matchings (small P, N only)."""
    gts = [g for g in gts if not is_zero(g)]
    if preds is None:
        return 0.0
    if not gts:
        return 1.0 if all(is_zero(p) for p in preds) else 0.0
    if not preds:
        return 0.0

    def score(p, g):
        ok = all(math.isfinite(v) for v in p) and p[2] > p[0] and p[3] > p[1]
        return dclr(p, g, **cfg) if ok else 0.0

    best = 0.0
    k = min(len(preds), len(gts))
    for pi in itertools.permutations(range(len(preds)), k):
        for gi in itertools.combinations(range(len(gts)), k):
            best = max(best, sum(score(preds[a], gts[b]) for a, b in zip(pi, gi)))
    return best / max(len(preds), len(gts))


def group_advantages(rewards, group_size, scale="group", eps=1e-4):
    out = []
    batch_std = statistics.stdev(rewards) if len(rewards) > 1 else 0.0
    for s in range(0, len(rewards), group_size):
        grp = rewards[s : s + group_size]
        mean = sum(grp) / len(grp)
        if max(grp) == min(grp):
            out.extend([0.0] * len(grp))
            continue
        if scale == "group":
            std = statistics.stdev(grp)
            out.extend([(r - mean) / (std + eps) for r in grp])
        elif scale == "batch":
            out.extend([(r - mean) / (batch_std + eps) for r in grp])
        else:
            out.extend([r - mean for r in grp])
    return out


def difficulty_weights(loc, group_size, tau=0.3, scope="group"):
    out = []
    batch_alpha = sum(loc) / len(loc)
    for s in range(0, len(loc), group_size):
        grp = loc[s : s + group_size]
        alpha = sum(grp) / len(grp) if scope == "group" else batch_alpha
        beta = sum(1 for r in grp if r < tau) / len(grp)
        out.extend([(math.exp(1 - alpha) + math.sqrt(1 + beta)) / 2] * len(grp))
    return out


def degenerate(loc, group_size, tol=1e-6, perfect=1.0):
    out = []
    for s in range(0, len(loc), group_size):
        grp = loc[s : s + group_size]
        std = statistics.stdev(grp) if len(grp) > 1 else 0.0
        out.append(std < tol and not any(r >= perfect for r in grp))
    return out


def to_relative(box, width, height):
    return tuple(round(v / s * 1000) for v, s in zip(box, (width, height, width, height)))
