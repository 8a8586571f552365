"""Reward of canonical answers, to explain what a reward pulls a spread-out policy towards.

For a square defect of side fraction ``s`` centred at (0.35, 0.4) of a 512 × 512 image, each reward kind
scores four answers:

- ``exact``: the true box;
- ``near miss``: the true size, shifted by 1.5 sides (no overlap, centre 1.5 sides away);
- ``far miss``: the true size, shifted by 0.3 of the image;
- ``2× side, centred``: the same centre, twice the side (4× area, IoU = 0.25);
- ``whole image``: the box (0, 0, 512, 512);
- ``4:1 strip, same centre & area``: a box 2s wide and s/2 high on the true centre
  (IoU = (s · s/2) / (s² + s² − s²/2) = 1/3);
- ``full-width strip, same area``: a strip across the whole image width, as high as keeps the true
  area, on the defect's row (what the stand-in policy learned under DCLR).

DCLR's S term (paper, ``size_term="area"``) sees only centre distance and area, so any box with the
true centre and the true area has S = 1 and therefore R = IoU + (1 − IoU) · 1 = 1, whatever its shape;
and a wide box inflates the paper's normaliser max(diag_p, diag_g), so its centre score stays high even
when its centre is off. The shape-aware ``size_term="sides"`` kinds (``dclr_sides*``) score width and
height separately: the 4:1 strip's sides are off by 100 % and 50 %, so s_s = 0.25 and its S drops.

If ``whole image`` scores above the misses, a policy whose samples mostly miss is rewarded for
growing its boxes: DCLR's area term saturates at 0 once the predicted area exceeds twice the true
one, while its centre term (and IoU) keep growing with the box.
"""

from __future__ import annotations

import torch

from reward_kinds import REWARD_KINDS, REWARD_LABELS, score

IMAGE = 512.0
ANSWERS = (
    "exact",
    "near miss",
    "far miss",
    "2× side, centred",
    "whole image",
    "4:1 strip, same centre & area",
    "full-width strip, same area",
)


def canonical_rewards(sides: tuple[float, ...] = (0.03, 0.05, 0.1)) -> list[dict]:
    """Rows ``{"side", "answer", kind: reward, ...}`` for every side fraction and answer."""
    rows = []
    for s in sides:
        a = s * IMAGE
        cx, cy = 0.35 * IMAGE, 0.4 * IMAGE
        gt = torch.tensor([cx - a / 2, cy - a / 2, cx + a / 2, cy + a / 2], dtype=torch.float64)
        shift = lambda d: gt + torch.tensor([d, 0, d, 0], dtype=torch.float64)  # noqa: E731
        preds = torch.stack(
            [
                gt,
                shift(1.5 * a),
                shift(0.3 * IMAGE),
                torch.tensor([cx - a, cy - a, cx + a, cy + a], dtype=torch.float64),
                torch.tensor([0, 0, IMAGE, IMAGE], dtype=torch.float64),
                torch.tensor([cx - a, cy - a / 4, cx + a, cy + a / 4], dtype=torch.float64),
                torch.tensor([0, cy - a * a / IMAGE / 2, IMAGE, cy + a * a / IMAGE / 2], dtype=torch.float64),
            ]
        )
        gts = gt.expand(len(ANSWERS), 4)
        valid = torch.ones(len(ANSWERS), dtype=torch.bool)
        scores = {k: score(k, preds, valid, gts) for k in REWARD_KINDS}
        for i, name in enumerate(ANSWERS):
            rows.append({"side": s, "answer": name, **{k: float(scores[k][i]) for k in REWARD_KINDS}})
    return rows


def canonical_markdown(rows: list[dict]) -> str:
    """Markdown table of :func:`canonical_rewards`."""
    out = ["| defect area | answer | " + " | ".join(REWARD_LABELS[k] for k in REWARD_KINDS) + " |"]
    out.append("|---|---|" + "---|" * len(REWARD_KINDS))
    for r in rows:
        out.append(
            f"| {100 * r['side'] ** 2:.2g} % | {r['answer']} | "
            + " | ".join(f"{r[k]:.2f}" for k in REWARD_KINDS)
            + " |"
        )
    return "\n".join(out) + "\n"
