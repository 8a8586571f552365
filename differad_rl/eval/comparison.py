"""Several methods on the same held-out pairs, side by side: constant predictors, one table, one report.

A trained model is only worth something against what needs no training. :func:`constant_predictions`
gives the two floors of the protocol (docs/method.md §8) — *always the zero box* (scores every normal target,
nothing else) and *always the training set's mean box* (the best fixed box in relative coordinates) —
as prediction sets the protocol scores like any model's. :func:`write_comparison` puts several
:class:`~differad_rl.eval.protocol.EvalResult` (same pairs, same order) into ``comparison.md`` /
``comparison.json`` / ``comparison.png`` and a self-contained ``comparison.html``.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from differad_rl.data.atomic import atomic_write_bytes, atomic_write_text
from differad_rl.eval.protocol import EvalResult, Predictions

__all__ = ["CONSTANTS", "comparison_rows", "comparison_table", "constant_predictions", "mean_relative_box",
           "write_comparison"]

#: The constant predictors :func:`constant_predictions` knows.
CONSTANTS: tuple[str, ...] = ("zero_box", "mean_box")


def mean_relative_box(records: Sequence[Any]) -> np.ndarray:
    """Mean of the anomalous records' largest boxes, each divided by its image size: ``(4,)`` in [0, 1].

    Raises:
        ValueError: no anomalous record (a mean box is undefined).
    """
    rel = [np.asarray(r.box, dtype=np.float64) / np.array([r.width, r.height, r.width, r.height], dtype=np.float64)
           for r in records if not r.is_normal]
    if not rel:
        raise ValueError("mean_relative_box: the records hold no anomalous pair (no box to average)")
    return np.mean(rel, axis=0)


def constant_predictions(kind: str, records: Sequence[Any], train_records: Sequence[Any] = ()) -> Predictions:
    """The same answer for every pair of ``records``, as pixel-space predictions (family ``"pixel"``).

    Args:
        kind: ``"zero_box"`` — always ``(0, 0, 0, 0)``; ``"mean_box"`` — always
            :func:`mean_relative_box` of ``train_records``, scaled to each target's size.
        records: the evaluated pairs.
        train_records: where the mean box is learnt (never the evaluated pairs).

    Raises:
        ValueError: unknown ``kind``; ``"mean_box"`` without an anomalous training record.
    """
    n = len(records)
    if kind == "zero_box":
        boxes = np.zeros((n, 4), dtype=np.float64)
    elif kind == "mean_box":
        rel = mean_relative_box(train_records)
        size = np.array([[r.width, r.height, r.width, r.height] for r in records], dtype=np.float64).reshape(n, 4)
        boxes = rel[None, :] * size
    else:
        raise ValueError(f"kind={kind!r}: expected one of {CONSTANTS}")
    return Predictions(ids=[r.id for r in records], outputs=[None] * n, boxes=boxes, given=np.ones(n, dtype=bool))


def comparison_rows(results: Mapping[str, EvalResult]) -> list[dict[str, Any]]:
    """One row a method: ``{"method", "n", "miou", "acc", "f1", "anomalous_miou", "normal_acc", "invalid_rate"}``.

    Raises:
        ValueError: the results were not computed on the same pairs in the same order.
    """
    rows = []
    ids: list[str] | None = None
    for name, res in results.items():
        if ids is None:
            ids = list(res.ids)
        elif list(res.ids) != ids:
            raise ValueError(f"method {name!r} was evaluated on other pairs than {next(iter(results))!r}")
        m = res.metrics
        rows.append({
            "method": name,
            "n": m["overall"]["n"],
            "miou": m["overall"]["miou"],
            "acc": m["overall"]["acc"],
            "f1": m["overall"]["f1"],
            "anomalous_miou": m["anomalous"]["miou"],
            "normal_acc": m["normal"]["acc"],
            "invalid_rate": m["overall"]["invalid_rate"],
        })
    return rows


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return "–" if np.isnan(v) else f"{v:.3f}"
    return str(v)


def comparison_table(results: Mapping[str, EvalResult]) -> str:
    """A Markdown table of :func:`comparison_rows` (τ = the results' IoU threshold)."""
    rows = comparison_rows(results)
    tau = next(iter(results.values())).config.iou_threshold if results else 0.3
    head = ["method", "n", "mIoU", f"Acc@{tau:g}", f"F1@{tau:g}", "mIoU anomalous", "Acc normal", "invalid"]
    keys = ["method", "n", "miou", "acc", "f1", "anomalous_miou", "normal_acc", "invalid_rate"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    lines += ["| " + " | ".join(_cell(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _chart_png(rows: list[dict[str, Any]], title: str) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(names) + 2), 3.4), dpi=100)
    for k, (key, label) in enumerate((("miou", "mIoU"), ("acc", "Acc@0.3"), ("f1", "F1@0.3"))):
        vals = [0.0 if np.isnan(r[key]) else r[key] for r in rows]
        ax.bar(x + (k - 1) * 0.27, vals, width=0.27, label=label)
    ax.set_xticks(x, names, rotation=15, ha="right")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_comparison(
    results: Mapping[str, EvalResult],
    out_dir: str | os.PathLike[str],
    *,
    title: str = "held-out pairs",
    notes: str = "",
    links: Mapping[str, str] | None = None,
) -> dict[str, Path]:
    """Write ``comparison.{md,json,png,html}`` into ``out_dir`` (atomically); return the paths.

    ``links`` maps a method to a path (relative to ``out_dir``) of its own report, linked from the
    HTML. ``notes`` is a paragraph of plain text put under the table.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = comparison_rows(results)
    table = comparison_table(results)
    png = _chart_png(rows, title)
    paths = {
        "md": atomic_write_text(out / "comparison.md", f"# {title}\n\n{table}\n{notes}\n" if notes else f"# {title}\n\n{table}"),
        "json": atomic_write_text(out / "comparison.json", json.dumps({"title": title, "rows": rows}, indent=2) + "\n"),
        "png": atomic_write_bytes(out / "comparison.png", png),
    }
    import html as _html

    head = "".join(f"<th>{h}</th>" for h in ("method", "n", "mIoU", "Acc@0.3", "F1@0.3", "mIoU anomalous",
                                              "Acc normal", "invalid", "report"))
    body = ""
    for r in rows:
        link = (links or {}).get(r["method"])
        ref = f'<a href="{_html.escape(link)}">open</a>' if link else ""
        cells = [_html.escape(r["method"])] + [_cell(r[k]) for k in ("n", "miou", "acc", "f1", "anomalous_miou",
                                                                       "normal_acc", "invalid_rate")] + [ref]
        body += "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>\n"
    img = base64.b64encode(png).decode("ascii")
    page = (f"<!doctype html><meta charset='utf-8'><title>{_html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}</style>"
            f"<h1>{_html.escape(title)}</h1><table><tr>{head}</tr>\n{body}</table>"
            f"<p>{_html.escape(notes)}</p><img src='data:image/png;base64,{img}'>")
    paths["html"] = atomic_write_text(out / "comparison.html", page)
    return paths
