"""Scalar pure-Python oracle of the peers' formulas (docs/method.md §9), one sample at a time, no numpy or
torch: box rewards (thresholded IoU, IoU², GIoU, DIoU, CIoU, matched hits), EMIT's and UniVG-R1's
weights, and the group rules (EMIT, DAPO, EasyR1). Written from the peers' code as cited in
``differad_rl.box_rewards`` / ``group_weights`` / ``group_filters``. A deliberate near-copy of those
formulas, written independently: never import them here."""

from __future__ import annotations

import itertools
import math

from tests.oracle import area, iou, is_zero


def _enclosing(p, g):
    return max(p[2], g[2]) - min(p[0], g[0]), max(p[3], g[3]) - min(p[1], g[1])


def giou(p, g):
    i = iou(p, g)
    ew, eh = _enclosing(p, g)
    c = max(ew, 0.0) * max(eh, 0.0)
    iw = max(min(p[2], g[2]) - max(p[0], g[0]), 0.0)
    ih = max(min(p[3], g[3]) - max(p[1], g[1]), 0.0)
    union = area(p) + area(g) - iw * ih
    return i - ((c - union) / c if c > 0 else 0.0)


def diou(p, g, eps=1e-7):
    ew, eh = _enclosing(p, g)
    rho2 = ((p[0] + p[2]) / 2 - (g[0] + g[2]) / 2) ** 2 + ((p[1] + p[3]) / 2 - (g[1] + g[3]) / 2) ** 2
    return iou(p, g) - rho2 / (ew * ew + eh * eh + eps)


def ciou(p, g, eps=1e-7):
    i = iou(p, g)
    v = 4 / math.pi**2 * (math.atan((g[2] - g[0]) / (g[3] - g[1])) - math.atan((p[2] - p[0]) / (p[3] - p[1]))) ** 2
    alpha = v / (1 - i + v + eps)
    return diou(p, g, eps) - alpha * v


def _unit(x):
    return min(max((x + 1) / 2, 0.0), 1.0)


def raw(kind, p, g, threshold=0.5, eps=1e-7):
    if kind == "iou_threshold":
        return 1.0 if iou(p, g) > threshold else 0.0
    if kind == "iou_squared":
        return iou(p, g) ** 2
    if kind == "giou":
        return _unit(giou(p, g))
    if kind == "diou":
        return _unit(diou(p, g, eps))
    return _unit(ciou(p, g, eps))


def peer_box(pred, gt, kind, threshold=0.5, eps=1e-7):
    """Zero-box rule + degenerate rule + the peer's formula. ``pred`` is None when nothing parsed."""
    if is_zero(gt):
        return 1.0 if pred is not None and is_zero(pred) else 0.0
    if pred is None or not all(math.isfinite(v) for v in pred):
        return 0.0
    if is_zero(pred) or pred[2] <= pred[0] or pred[3] <= pred[1]:
        return 0.0
    return raw(kind, pred, gt, threshold, eps)


def matched_hits(preds, gts, iou_threshold=0.5, l1_threshold=10.0):
    """Brute force over all one-to-one matchings (small P, N only)."""
    gts = [g for g in gts if not is_zero(g)]
    if preds is None:
        return 0.0
    if not gts:
        return 1.0 if all(is_zero(p) for p in preds) else 0.0
    if not preds:
        return 0.0

    def hit(p, g):
        if not (all(math.isfinite(v) for v in p) and p[2] > p[0] and p[3] > p[1]):
            return 0.0
        l1 = sum(abs(a - b) for a, b in zip(p, g)) / 4
        return ((1.0 if iou(p, g) > iou_threshold else 0.0) + (1.0 if l1 < l1_threshold else 0.0)) / 2

    best = 0.0
    k = min(len(preds), len(gts))
    for pi in itertools.permutations(range(len(preds)), k):
        for gi in itertools.combinations(range(len(gts)), k):
            best = max(best, sum(hit(preds[a], gts[b]) for a, b in zip(pi, gi)))
    return best / max(len(preds), len(gts))


def wrong_share_weights(loc, group_size, threshold=0.0):
    out = []
    for s in range(0, len(loc), group_size):
        grp = loc[s : s + group_size]
        wrong = sum(1 for r in grp if r <= threshold) / len(grp)
        out.extend([1.0 if wrong == 1 else 1.0 + wrong] * len(grp))
    return out


def mean_reward_weight(loc, form="power", power=1.0, floor=0.0):
    m = sum(loc) / len(loc) if loc else 0.0
    if form == "power":
        w = (1.05 - m) ** power
    elif form == "exp":
        w = math.exp(1 - m)
    else:
        w = -math.log(0.02 + m)
    return w if floor is None else max(w, floor)


def _groups(values, group_size):
    return [values[s : s + group_size] for s in range(0, len(values), group_size)]


def no_correct(loc, group_size, threshold=0.0):
    return [all(r <= threshold for r in grp) for grp in _groups(loc, group_size)]


def zero_variance(rewards, group_size):
    return [len(grp) > 1 and all(r == grp[0] for r in grp) for grp in _groups(rewards, group_size)]


def out_of_band(rewards, group_size, low=0.01, high=0.99):
    return [not (low < sum(grp) / len(grp) < high) for grp in _groups(rewards, group_size)]
