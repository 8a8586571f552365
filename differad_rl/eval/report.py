"""Evaluation reports: metrics JSON, per-sample JSONL, and a visual report (PNG sheets + HTML).

Files written by :func:`write_report` into ``out_dir`` (each atomically: temp file + ``os.replace``):

* ``metrics.json``   — config, overall / anomalous / normal / per-category metrics (NaN → ``null``);
* ``samples.jsonl``  — one line per sample: id, category, IoU, predicted box (original pixels,
  ``null`` when invalid), ground-truth boxes, the raw model output (``null`` for box lines) and its
  parse status (``parsed`` / ``unparsable`` / ``given`` / ``missing``);
* ``iou_hist.png``   — the IoU distribution, anomalous and normal targets stacked, τ marked;
* ``cases.png``      — the worst and the best cases: target images with the predicted box (red)
  and the ground-truth boxes (green);
* ``report.html``    — a self-contained page (PNGs embedded as base64) with the metric tables and
  both figures.

Without the visual report (``visual=False``) the PNGs and ``report.html`` of an earlier run in the
same folder are removed, so a folder never shows a report of other results.

Plots use matplotlib's Agg canvas directly (no pyplot state, no display needed).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from differad_rl.data.atomic import atomic_write_bytes, atomic_write_text
from differad_rl.eval.protocol import EvalResult

__all__ = ["VISUAL_FILES", "draw_case", "jsonable", "select_cases", "write_metrics_json", "write_report"]

_METRIC_COLUMNS = ("n", "miou", "acc", "f1", "precision", "recall", "invalid_rate")
#: The files of the visual report (removed by a run without it).
VISUAL_FILES = ("iou_hist.png", "cases.png", "report.html")


def jsonable(obj: Any) -> Any:
    """Recursively convert NumPy scalars/arrays to Python and non-finite floats to ``None``."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_metrics_json(summary: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write a metric dictionary as pretty JSON (NaN → null), atomically."""
    return atomic_write_text(path, json.dumps(jsonable(summary), indent=2) + "\n")


def select_cases(result: EvalResult, k: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the ``k`` worst and ``k`` best samples.

    Worst: lowest IoU first, anomalous targets before normal ones at equal IoU (a missed defect is
    more telling than a false alarm on a normal target), then ground-truth order. Best: highest IoU
    among anomalous targets (all samples when there is none), then ground-truth order.
    """
    n = result.ious.shape[0]
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    normal = np.fromiter((len(b) == 0 for b in result.gt_boxes), dtype=bool, count=n)
    idx = np.arange(n)
    worst = np.lexsort((idx, normal, result.ious))[:k]
    pool = idx[~normal] if (~normal).any() else idx
    best = pool[np.lexsort((pool, -result.ious[pool]))][:k]
    return worst, best


def _png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _hist_png(result: EvalResult) -> bytes:
    from matplotlib.figure import Figure

    normal = np.fromiter((len(b) == 0 for b in result.gt_boxes), dtype=bool, count=len(result.gt_boxes))
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot(1, 1, 1)
    bins = np.linspace(0.0, 1.0, 21).tolist()
    ax.hist(
        [result.ious[~normal], result.ious[normal]],
        bins=bins,
        stacked=True,
        color=["tab:orange", "tab:blue"],
        label=[f"anomalous ({int((~normal).sum())})", f"normal ({int(normal.sum())})"],
    )
    t = result.config.iou_threshold
    ax.axvline(t, color="k", linestyle="--", linewidth=1, label=f"τ = {t:g}")
    ax.set_xlabel("IoU")
    ax.set_ylabel("samples")
    miou = result.metrics["overall"]["miou"]
    ax.set_title(f"IoU distribution (mIoU {miou:.3f})" if miou == miou else "IoU distribution")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _load_image(path: str) -> np.ndarray | None:
    try:
        from PIL import Image

        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError):
        return None


def draw_case(ax: Any, result: EvalResult, i: int) -> None:
    """Draw case ``i`` of ``result`` on matplotlib axes ``ax``: the target image (or a note when it cannot
    be read), the ground-truth boxes in lime and the predicted box in red (none for an unparsable answer or
    the zero box), titled with the id, the IoU, the truth and the kind of answer."""
    from matplotlib.patches import Rectangle

    img = _load_image(result.targets[i]) if i < len(result.targets) else None
    if img is not None:
        ax.imshow(img)
    else:
        ax.text(0.5, 0.5, "image not found", ha="center", va="center", transform=ax.transAxes)
    # imshow puts pixel centres on integers: an exclusive-edge box spans [x1 - 0.5, x2 - 0.5].
    for b in result.gt_boxes[i]:
        ax.add_patch(Rectangle((b[0] - 0.5, b[1] - 0.5), b[2] - b[0], b[3] - b[1], fill=False, ec="lime", lw=1.5))
    p = result.pred_boxes[i]
    if result.pred_valid[i] and not (p == 0).all():
        ax.add_patch(Rectangle((p[0] - 0.5, p[1] - 0.5), p[2] - p[0], p[3] - p[1], fill=False, ec="red", lw=1.5))
    if not result.pred_valid[i]:
        answer = "no box"
    elif (p == 0).all():
        answer = "zero box"
    else:
        answer = "box"
    truth = "normal" if not result.gt_boxes[i] else f"{len(result.gt_boxes[i])} box(es)"
    ax.set_title(f"{result.ids[i]}\nIoU {result.ious[i]:.2f} · {truth} · {answer}", fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])


def _cases_png(result: EvalResult, worst: np.ndarray, best: np.ndarray) -> bytes:
    from matplotlib.figure import Figure
    from tqdm.auto import tqdm

    cols = max(len(worst), len(best), 1)
    fig = Figure(figsize=(2.2 * cols, 5.8))
    rows = (("worst", worst), ("best", best))
    with tqdm(total=len(worst) + len(best), desc="report cases", leave=False) as bar:
        for r, (label, idx) in enumerate(rows):
            for c in range(cols):
                ax = fig.add_subplot(2, cols, r * cols + c + 1)
                if c < len(idx):
                    draw_case(ax, result, int(idx[c]))
                    bar.update(1)
                else:
                    ax.axis("off")
                if c == 0:
                    ax.set_ylabel(label)
    fig.suptitle("worst (top) and best (bottom) cases — prediction red, ground truth green", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "–" if not math.isfinite(v) else f"{v:.3f}"
    return html.escape(str(v))


def _table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    head = "".join(f"<th>{c}</th>" for c in ("group", *_METRIC_COLUMNS))
    body = "".join(
        "<tr><td>" + html.escape(name) + "</td>" + "".join(f"<td>{_fmt(m[c])}</td>" for c in _METRIC_COLUMNS) + "</tr>"
        for name, m in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _html(result: EvalResult, hist: bytes, cases: bytes) -> str:
    m = result.metrics
    t = result.config.iou_threshold
    main = _table([("overall", m["overall"]), ("anomalous", m["anomalous"]), ("normal", m["normal"])])
    per = _table([(name, v) for name, v in m["per_category"].items()])
    cfg = html.escape(json.dumps(jsonable(result.summary()["config"])))

    def img(data: bytes, alt: str) -> str:
        return f'<img alt="{alt}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'

    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>differad-rl evaluation</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}td:first-child{{text-align:left}}
img{{max-width:100%}}</style></head><body>
<h1>Evaluation report</h1>
<p>{len(result.ids)} samples · space <code>{html.escape(result.config.resolved_space)}</code> ·
acc and F1 at IoU ≥ {t:g} · {result.recorded_sizes} boxes converted with their recorded input size ·
config <code>{cfg}</code></p>
<h2>Metrics</h2>{main}
<h2>Per category</h2>{per}
<h2>IoU distribution</h2>{img(hist, "IoU histogram")}
<h2>Cases</h2><p>Prediction in red, ground truth in green.</p>{img(cases, "worst and best cases")}
</body></html>
"""


def write_report(
    result: EvalResult, out_dir: str | os.PathLike[str], num_cases: int = 8, visual: bool = True
) -> dict[str, Path]:
    """Write ``metrics.json``, ``samples.jsonl`` and (if ``visual``) the PNGs and ``report.html``.

    Returns the written paths by name (``"metrics"``, ``"samples"``, ``"hist"``, ``"cases"``,
    ``"html"``). Missing target images are drawn as a placeholder, not an error. Without
    ``visual`` the visual files of an earlier report in ``out_dir`` are deleted.

    Raises:
        ValueError: ``out_dir`` exists and is not a folder.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is an existing file, not a folder; choose a folder for the report")
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    paths["metrics"] = write_metrics_json(result.summary(), out / "metrics.json")
    lines = []
    for i, sid in enumerate(result.ids):
        box = result.pred_boxes[i].tolist() if result.pred_valid[i] else None
        lines.append(
            json.dumps(
                {
                    "id": sid,
                    "category": str(result.categories[i]),
                    "iou": float(result.ious[i]),
                    "pred_box": box,
                    "gt_boxes": result.gt_boxes[i],
                    "output": result.outputs[i] if i < len(result.outputs) else None,
                    "parse_status": result.parse_status[i] if i < len(result.parse_status) else None,
                }
            )
        )
    paths["samples"] = atomic_write_text(out / "samples.jsonl", "\n".join(lines) + ("\n" if lines else ""))
    if visual:
        hist = _hist_png(result)
        worst, best = select_cases(result, num_cases)
        cases = _cases_png(result, worst, best)
        paths["hist"] = atomic_write_bytes(out / "iou_hist.png", hist)
        paths["cases"] = atomic_write_bytes(out / "cases.png", cases)
        paths["html"] = atomic_write_text(out / "report.html", _html(result, hist, cases))
    else:
        for name in VISUAL_FILES:
            (out / name).unlink(missing_ok=True)
    return paths
