"""Signal-density study: how much learning signal does each reward give a group of G boxes?

Pure simulation (no network). An image of ``IMAGE`` × ``IMAGE`` pixels holds one defect box with side
fraction ``s`` (aspect ratio log-uniform in [1/2, 2], centre uniform with the box inside the image).
A policy's group of G = 8 predictions around it has

- centre = true centre + ``offset`` · IMAGE · N(0, I₂) (i.i.d. per completion),
- width, height = true width, height · exp(``SCALE_NOISE`` · N(0, 1)) (independent per side),

clipped to the image (except in the equal-size variant below). For every reward kind, defect size and offset we draw ``groups`` groups and
report (definitions, all per group, then averaged over groups):

- **signal**: share of groups whose GRPO advantages (``differad_rl.groups.group_advantages``) are not
  all zero, i.e. max |A_i| > 1e-6. A group without signal contributes no gradient.
- **position signal**: the same groups re-drawn with one common size per group (width and height drawn
  once per group, only the centres differ). Any reward difference inside such a group can only come
  from position, so the share of these groups with a non-zero advantage is the share in which the
  reward says something about *where* the box is, not only how big it is.
- **position pairs**: in those equal-size groups, the share of completion pairs (i < j) whose rewards
  differ (|r_i − r_j| > 1e-6), averaged over groups: how finely the reward ranks a group by position
  (one near box among seven far ones gives a non-zero advantage but only 7 of 28 ordered pairs).
- **position ρ**: in those equal-size groups, the within-group Spearman correlation between the
  reward and minus the centre distance (ties averaged; a constant group counts as ρ = 0), averaged
  over groups: how well the advantage ranking follows the position error.
- **error ρ**: in the original groups, the within-group Spearman correlation between the reward and
  minus the true box error, error = mean |corner coordinate difference| / IMAGE (constant group → 0),
  averaged over groups: how well the advantage ranking follows the box error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.stats import rankdata

from differad_rl.groups import group_advantages
from atomic_io import save_figure
from reward_kinds import REWARD_KINDS, REWARD_LABELS, score

IMAGE = 512.0
GROUP_SIZE = 8
SCALE_NOISE = 0.3
SIGNAL_TOL = 1e-6


@dataclass(frozen=True)
class DensityConfig:
    """Grid of the simulation. ``sides`` are defect side fractions (area = side², e.g. 0.05 → 0.25 %)."""

    sides: tuple[float, ...] = (0.03, 0.05, 0.1, 0.2, 0.4)
    offsets: tuple[float, ...] = (0.02, 0.05, 0.1, 0.15)
    groups: int = 2000
    group_size: int = GROUP_SIZE
    scale_noise: float = SCALE_NOISE
    seed: int = 0
    kinds: tuple[str, ...] = field(default=REWARD_KINDS)

    def __post_init__(self) -> None:
        if self.groups < 1:
            raise ValueError(f"groups must be >= 1, got {self.groups}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2, got {self.group_size}")
        for s in self.sides:
            if not 0 < s < 1:
                raise ValueError(f"sides must lie in (0, 1), got {s}")
        for o in self.offsets:
            if o < 0:
                raise ValueError(f"offsets must be >= 0, got {o}")
        for k in self.kinds:
            if k not in REWARD_KINDS:
                raise ValueError(f"kinds must be in {REWARD_KINDS}, got {k!r}")


def _truth(rng: np.random.Generator, side: float, m: int) -> np.ndarray:
    """``(m, 4)`` true boxes with area fraction side² and aspect in [1/2, 2]."""
    aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0), m))
    w = np.minimum(side * np.sqrt(aspect), 0.95) * IMAGE
    h = np.minimum(side / np.sqrt(aspect), 0.95) * IMAGE
    cx = rng.uniform(w / 2, IMAGE - w / 2)
    cy = rng.uniform(h / 2, IMAGE - h / 2)
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)


def _predictions(
    rng: np.random.Generator, truth: np.ndarray, g: int, offset: float, scale_noise: float, equal_size: bool
) -> np.ndarray:
    """``(m, g, 4)`` predicted boxes around ``truth`` (see module docstring)."""
    m = truth.shape[0]
    cx = (truth[:, 0] + truth[:, 2]) / 2
    cy = (truth[:, 1] + truth[:, 3]) / 2
    w = truth[:, 2] - truth[:, 0]
    h = truth[:, 3] - truth[:, 1]
    pcx = cx[:, None] + offset * IMAGE * rng.standard_normal((m, g))
    pcy = cy[:, None] + offset * IMAGE * rng.standard_normal((m, g))
    shape = (m, 1) if equal_size else (m, g)
    pw = w[:, None] * np.exp(scale_noise * rng.standard_normal(shape))
    ph = h[:, None] * np.exp(scale_noise * rng.standard_normal(shape))
    pw, ph = np.broadcast_to(pw, (m, g)), np.broadcast_to(ph, (m, g))
    boxes = np.stack([pcx - pw / 2, pcy - ph / 2, pcx + pw / 2, pcy + ph / 2], axis=-1)
    # Equal-size groups are not clipped: clipping at the border would change sizes and leak size signal.
    return boxes if equal_size else np.clip(boxes, 0.0, IMAGE)


def _rowwise_spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman ρ per row of two ``(m, g)`` arrays, ties averaged; 0 where a row is constant."""
    rx = rankdata(x, axis=1)
    ry = rankdata(y, axis=1)
    rx = rx - rx.mean(axis=1, keepdims=True)
    ry = ry - ry.mean(axis=1, keepdims=True)
    den = np.sqrt((rx**2).sum(axis=1) * (ry**2).sum(axis=1))
    num = (rx * ry).sum(axis=1)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def _pair_resolution(r: np.ndarray) -> np.ndarray:
    """Per row of ``r`` (m, g): share of pairs i < j with |r_i - r_j| > SIGNAL_TOL."""
    g = r.shape[1]
    diff = np.abs(r[:, :, None] - r[:, None, :]) > SIGNAL_TOL
    iu = np.triu_indices(g, k=1)
    return diff[:, iu[0], iu[1]].mean(axis=1)


def _group_scores(kind: str, pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rewards ``(m, g)`` and per-group 'has non-zero advantage' ``(m,)`` for one reward kind."""
    m, g, _ = pred.shape
    p = torch.as_tensor(pred.reshape(m * g, 4), dtype=torch.float64)
    t = torch.as_tensor(np.repeat(truth, g, axis=0), dtype=torch.float64)
    # A clipped box can collapse to zero width at the border; the core then scores it 0, as it should.
    valid = torch.ones(m * g, dtype=torch.bool)
    r = score(kind, p, valid, t)
    adv = group_advantages(r, g)
    has_signal = (adv.abs().reshape(m, g) > SIGNAL_TOL).any(dim=1)
    return r.reshape(m, g).numpy(), has_signal.numpy()


def run_density(config: DensityConfig, progress=None) -> list[dict]:
    """Run the grid; one result row per (kind, side, offset) with the four metrics of the docstring.

    ``progress``: optional callable ``progress(n)`` advanced once per (side, offset) cell.
    """
    rows: list[dict] = []
    rng = np.random.default_rng(config.seed)
    g = config.group_size
    for side in config.sides:
        for offset in config.offsets:
            truth = _truth(rng, side, config.groups)
            free = _predictions(rng, truth, g, offset, config.scale_noise, equal_size=False)
            same = _predictions(rng, truth, g, offset, config.scale_noise, equal_size=True)
            err = np.abs(free - truth[:, None, :]).mean(axis=-1) / IMAGE
            tc = np.stack([(truth[:, 0] + truth[:, 2]) / 2, (truth[:, 1] + truth[:, 3]) / 2], axis=-1)
            sc = np.stack([(same[..., 0] + same[..., 2]) / 2, (same[..., 1] + same[..., 3]) / 2], axis=-1)
            dist = np.linalg.norm(sc - tc[:, None, :], axis=-1)
            for kind in config.kinds:
                r_free, sig_free = _group_scores(kind, free, truth)
                r_same, sig_same = _group_scores(kind, same, truth)
                rows.append(
                    {
                        "kind": kind,
                        "side": side,
                        "area_pct": 100.0 * side * side,
                        "offset": offset,
                        "signal": float(sig_free.mean()),
                        "position_signal": float(sig_same.mean()),
                        "position_pairs": float(_pair_resolution(r_same).mean()),
                        "position_rho": float(_rowwise_spearman(r_same, -dist).mean()),
                        "error_rho": float(_rowwise_spearman(r_free, -err).mean()),
                    }
                )
            if progress is not None:
                progress(1)
    return rows


METRICS: dict[str, str] = {
    "signal": "share of groups with a non-zero advantage",
    "position_signal": "share of equal-size groups with a non-zero advantage (position signal)",
    "position_pairs": "share of within-group completion pairs with different rewards, equal-size groups",
    "position_rho": "mean within-group Spearman ρ(reward, −centre distance), equal-size groups",
    "error_rho": "mean within-group Spearman ρ(reward, −box error)",
}


def density_markdown(rows: list[dict], kinds: tuple[str, ...] = REWARD_KINDS) -> str:
    """One Markdown table per metric: rows = (defect area, offset), columns = reward kinds."""
    cells = {(r["kind"], r["side"], r["offset"]): r for r in rows}
    sides = sorted({r["side"] for r in rows})
    offsets = sorted({r["offset"] for r in rows})
    out: list[str] = []
    for metric, title in METRICS.items():
        out.append(f"#### {title}\n")
        out.append("| defect area | centre error σ | " + " | ".join(REWARD_LABELS[k] for k in kinds) + " |")
        out.append("|---|---|" + "---|" * len(kinds))
        for s in sides:
            for o in offsets:
                vals = []
                for k in kinds:
                    r = cells.get((k, s, o))
                    vals.append("–" if r is None else f"{r[metric]:.2f}")
                out.append(f"| {100 * s * s:.2g} % | {100 * o:.0f} % | " + " | ".join(vals) + " |")
        out.append("")
    return "\n".join(out)


def density_plot(rows: list[dict], path: str, kinds: tuple[str, ...] = REWARD_KINDS) -> None:
    """Grid of panels (rows: metrics, columns: centre error σ), one line per reward vs defect area."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    offsets = sorted({r["offset"] for r in rows})
    fig, axes = plt.subplots(
        len(METRICS), len(offsets), figsize=(3.2 * len(offsets), 2.6 * len(METRICS)), squeeze=False
    )
    for i, metric in enumerate(METRICS):
        for j, o in enumerate(offsets):
            ax = axes[i][j]
            for k in kinds:
                pts = sorted((r["area_pct"], r[metric]) for r in rows if r["kind"] == k and r["offset"] == o)
                if pts:
                    ax.plot(*zip(*pts), marker="o", ms=3, label=REWARD_LABELS[k])
            ax.set_xscale("log")
            ax.set_ylim(-0.05, 1.05)
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(f"centre error σ = {100 * o:.0f} % of image")
            if i == len(METRICS) - 1:
                ax.set_xlabel("defect area (% of image)")
            if j == 0:
                ax.set_ylabel(metric.replace("_", " "))
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Signal density, G = {GROUP_SIZE}, simulated groups")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)

