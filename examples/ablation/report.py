"""Tables (Markdown) and learning-curve plots of the ablation runs."""

from __future__ import annotations

import numpy as np

from arms import Arm
from atomic_io import save_figure

METRIC_NAMES = (("miou", "mIoU"), ("acc", "Acc@0.3"), ("f1", "F1@0.3"))


def _mean_std(values: list[float]) -> str:
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return "–"
    sd = a.std(ddof=1) if a.size > 1 else 0.0
    return f"{a.mean():.3f} ± {sd:.3f}"


def late_mean(run: dict, key: str = "miou") -> float:
    """Mean of ``key`` over the evaluation points in the second half of the budget (generations >
    half the last point's): one run's level late in training, less noisy than its final point."""
    top = run["curve"][-1]["generations"]
    return float(np.mean([c[key] for c in run["curve"] if c["generations"] > top / 2]))


def arms_markdown(arms: tuple[Arm, ...], runs: list[dict]) -> str:
    """One row per arm: final metrics (mean ± sample std over seeds), the late mIoU
    (:func:`late_mean`, mean ± std over seeds) and budget statistics."""
    head = (
        "| arm | " + " | ".join(n for _, n in METRIC_NAMES)
        + " | late mIoU (2nd-half mean) | seeds | generations (mean) | steps (mean) | degenerate groups, first draw | extra generations"
        + " (resampling / DAPO draws) | mean answered box area | median box elongation | s per run |"
    )
    lines = [head, "|---" * (len(METRIC_NAMES) + 10) + "|"]
    start = list({r["seed"]: r["curve"][0] for r in runs}.values())  # identical for every arm of a seed
    if start:
        lines.append(
            "| cold start only (generation 0, all arms) | "
            + " | ".join(_mean_std([c[k] for c in start]) for k, _ in METRIC_NAMES)
            + " | – | – | 0 | 0 | – | – | "
            + f"{100 * np.nanmean([c['box_area'] for c in start]):.1f} % | "
            + f"{np.nanmean([c['box_elongation'] for c in start]):.1f} | – |"
        )
    for arm in arms:
        rs = [r for r in runs if r["arm"] == arm.name]
        if not rs:
            continue
        gens = np.mean([r["generations"] for r in rs])
        steps = np.mean([r["steps"] for r in rs])
        degen = np.mean([r["degenerate_share_first_draw"] for r in rs])
        extra = np.mean([r["extra_generations"] / max(r["generations"], 1) for r in rs])
        secs = np.mean([r["seconds"] for r in rs])
        area = np.nanmean([r["final"]["box_area"] for r in rs])
        elong = np.nanmean([r["final"]["box_elongation"] for r in rs])
        lines.append(
            f"| {arm.label} | "
            + " | ".join(_mean_std([r["final"][k] for r in rs]) for k, _ in METRIC_NAMES)
            + f" | {_mean_std([late_mean(r) for r in rs])}"
            + f" | {len(rs)} | {gens:.0f} | {steps:.0f} | {100 * degen:.0f} % | {100 * extra:.0f} % | {100 * area:.1f} % | {elong:.1f} | {secs:.0f} |"
        )
    return "\n".join(lines) + "\n"


def curves_plot(arms: tuple[Arm, ...], runs: list[dict], path: str) -> None:
    """mIoU, Acc@0.3, mean answered box area (mean over seeds ± 1 std) and the median box elongation
    (geometric mean over seeds, ×/÷ one geometric std) vs generations consumed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        *METRIC_NAMES[:2],
        ("box_area", "mean answered box area (share of the image)"),
        ("box_elongation", "median box elongation max(w,h)/min(w,h)"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 6.2))
    cmap = plt.get_cmap("tab20")
    for j, (key, name) in enumerate(panels):
        ax = axes[j]
        for i, arm in enumerate(arms):
            rs = [r for r in runs if r["arm"] == arm.name]
            if not rs:
                continue
            # Seeds evaluate at slightly different generation counts: interpolate on a common grid.
            top = min(r["curve"][-1]["generations"] for r in rs)
            grid = np.linspace(0, top, 25)
            ys = np.stack(
                [np.interp(grid, [c["generations"] for c in r["curve"]], [c[key] for c in r["curve"]]) for r in rs]
            )
            if key == "box_elongation":  # ratio ≥ 1 on a log axis: geometric mean and band
                ly = np.log(ys)
                m, lo, hi = np.exp(ly.mean(0)), np.exp(ly.mean(0) - ly.std(0)), np.exp(ly.mean(0) + ly.std(0))
            else:
                m, sd = ys.mean(0), ys.std(0)
                lo, hi = m - sd, m + sd
            # IoU arms dashed, shape-blind DCLR (area term) dotted, shape-aware DCLR-sides solid.
            style = "--" if arm.reward.startswith("iou") else ("-" if "sides" in arm.reward else ":")
            ax.plot(grid, m, style, color=cmap(i % 20), label=arm.label, lw=1.6)
            ax.fill_between(grid, lo, hi, color=cmap(i % 20), alpha=0.10)
        ax.set_xlabel("generations consumed (regenerations and extra draws included)")
        ax.set_ylabel(f"held-out {name}")
        if key == "box_elongation":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=6, fontsize=8, frameon=False)
    fig.suptitle("Stand-in box policy (not an MLLM): held-out metrics vs generation budget, mean ± std over seeds")
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    save_figure(fig, path)
    plt.close(fig)
