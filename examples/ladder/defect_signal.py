#!/usr/bin/env python
"""How much of each demo defect kind reaches a visual token: the pixel signal behind the R4 factor runs.

For each of the demo set's four defect kinds (``differad_rl.data.demo.DEFECT_KINDS``) it builds the learner
recipe's pairs (``sft_cold_start.LEARNER_DEMO``: 128 px, medium and large defects, no normal targets) with one
kind only, once clean (``NO_NUISANCE``: the two images are equal outside the defect) and once with the
recipe's nuisance (shift, lighting, noise), and measures on ``|target - reference|`` (mean over RGB, 0..1):

- ``box_diff``: the mean difference inside the defect's box;
- ``box_changed``: the share of the box's pixels that change by more than 0.1;
- ``token_signal``: the mean difference of the most-changed 32 px cell the box touches (one cell = one visual
  token of the learner: 16 px patches, 2 × 2 merged) and ``token_floor``: the mean over the cells the box does not
  touch (the nuisance alone); ``token_snr = token_signal / token_floor`` (clean sets: the floor is 0);
- ``defect_level``: the defect pixels' mean intensity, mean and spread over pairs (a hole is nearly black or, on
  dark material, nearly white; a stain's colour and a texture's look change from pair to pair).

    python examples/ladder/defect_signal.py           # ~1 min; writes results/defect_signal/{results.json,signal.png}

Data go under ``runs/ladder/data/defect_signal/`` (not committed); an existing result is kept unless ``--force``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trl"))

import sft_cold_start  # noqa: E402

from differad_rl.data.atomic import atomic_write_bytes, atomic_write_text  # noqa: E402
from differad_rl.data.demo import DEFECT_KINDS, NO_NUISANCE, build_demo_pairs  # noqa: E402
from differad_rl.data.records import PairRecord, load_pairs  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "defect_signal"
CELL = 32  # px of one learner visual token (16 px patches, 2 x 2 merge)


def _rgb(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0


def pair_signal(record: PairRecord) -> dict[str, float]:
    """The figures of one anomalous pair on ``|target - reference|``."""
    diff = np.abs(_rgb(record.target) - _rgb(record.reference)).mean(-1)
    h, w = diff.shape
    x1, y1, x2, y2 = (int(v) for v in record.boxes[0])
    box = diff[y1:y2, x1:x2]
    cells = diff[: h // CELL * CELL, : w // CELL * CELL].reshape(h // CELL, CELL, w // CELL, CELL).mean((1, 3))
    touched = np.zeros(cells.shape, dtype=bool)
    touched[y1 // CELL: (y2 - 1) // CELL + 1, x1 // CELL: (x2 - 1) // CELL + 1] = True
    return {
        "box_diff": float(box.mean()),
        "box_changed": float((box > 0.1).mean()),
        "token_signal": float(cells[touched].max()),
        "token_floor": float(cells[~touched].mean()) if (~touched).any() else float("nan"),
    }


def defect_level(clean: PairRecord) -> float:
    """The defect pixels' mean intensity in a clean pair (its mask: the pixels that differ, Δ > 0.02)."""
    tgt = _rgb(clean.target)
    mask = np.abs(tgt - _rgb(clean.reference)).mean(-1) > 0.02
    return float(tgt[mask].mean()) if mask.any() else float("nan")


def kind_signal(kind: str, n_pairs: int, root: Path) -> dict[str, Any]:
    """Mean figures of one kind, clean and with the recipe's nuisance (the same defects and boxes), and the
    defects' intensity (the same in both settings: read off the clean pairs)."""
    demo = dict(sft_cold_start.LEARNER_DEMO, n_pairs=n_pairs, normal_fraction=0.0, defect_kinds=(kind,),
                progress=False)
    noisy = load_pairs(build_demo_pairs(root / f"{kind}_nuisance", **demo))
    clean = load_pairs(build_demo_pairs(root / f"{kind}_clean", **demo, **NO_NUISANCE))
    levels = [defect_level(r) for r in clean if r.boxes]
    out: dict[str, Any] = {"defect_level": float(np.nanmean(levels)), "defect_level_spread": float(np.nanstd(levels))}
    for name, records in (("clean", clean), ("nuisance", noisy)):
        rows = [pair_signal(r) for r in records if r.boxes]
        figures: dict[str, Any] = {key: float(np.nanmean([row[key] for row in rows])) for key in rows[0]}
        figures["token_snr"] = (figures["token_signal"] / figures["token_floor"]
                                if figures["token_floor"] > 0 else None)  # clean: no floor
        figures["pairs"] = len(rows)
        out[name] = figures
    out["example"] = {"clean": [clean[0].reference, clean[0].target], "nuisance": [noisy[0].reference,
                                                                                  noisy[0].target],
                      "box": clean[0].boxes[0]}
    return out


def signal_png(result: dict[str, Any], path: Path) -> None:
    """One row per kind: the clean target, |Δ| clean, the target with nuisance, |Δ| with nuisance (token grid)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    kinds = list(result["kinds"])
    fig = Figure(figsize=(8.4, 2.2 * len(kinds)))
    axes = fig.subplots(len(kinds), 4)
    for row, kind in zip(axes, kinds):
        ex = result["kinds"][kind]["example"]
        for col, setting in enumerate(("clean", "nuisance")):
            ref, tgt = (_rgb(p) for p in ex[setting])
            diff = np.abs(tgt - ref).mean(-1)
            f = result["kinds"][kind][setting]
            for ax, img, title in ((row[2 * col], tgt, f"{kind}: target, {setting}"),
                                   (row[2 * col + 1], diff, f"|Δ| cell {f['token_signal']:.3f} / floor "
                                                            f"{f['token_floor']:.3f}")):
                ax.imshow(img, cmap="magma" if img.ndim == 2 else None, vmin=0, vmax=1 if img.ndim == 3 else 0.4)
                x1, y1, x2, y2 = ex["box"]
                ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, ec="lime", lw=1))
                for k in range(CELL, img.shape[0], CELL):
                    ax.axhline(k - 0.5, color="white", lw=0.4, alpha=0.5)
                    ax.axvline(k - 0.5, color="white", lw=0.4, alpha=0.5)
                ax.set_title(title, fontsize=7)
                ax.set_xticks([])
                ax.set_yticks([])
    fig.suptitle("Demo defects: what reaches a 32 px visual token (green: the box; grid: the tokens)", fontsize=9)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-pairs", type=int, default=200, help="pairs per kind and setting")
    p.add_argument("--data-root", default="runs/ladder/data/defect_signal")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--force", action="store_true", help="overwrite an existing result")
    args = p.parse_args(argv)
    out = Path(args.out)
    if (out / "results.json").exists() and not args.force:
        print(f"{out}/results.json exists (--force overwrites)", file=sys.stderr)
        return 1
    command = " ".join(["python examples/ladder/defect_signal.py", *(sys.argv[1:] if argv is None else argv)])
    result: dict[str, Any] = {"command": command, "n_pairs": args.n_pairs, "kinds": {}}
    for kind in DEFECT_KINDS:
        result["kinds"][kind] = kind_signal(kind, args.n_pairs, Path(args.data_root))
        figures = result["kinds"][kind]
        c, n = figures["clean"], figures["nuisance"]
        print(f"{kind:8s} box Δ {c['box_diff']:.3f} changed {c['box_changed']:.2f} token {c['token_signal']:.3f} "
              f"| nuisance: token {n['token_signal']:.3f} floor {n['token_floor']:.3f} SNR {n['token_snr'] or 0:.2f} "
              f"| level {figures['defect_level']:.2f} ± {figures['defect_level_spread']:.2f}", flush=True)
    signal_png(result, out / "signal.png")
    for figures in result["kinds"].values():
        figures.pop("example")  # local image paths: the picture shows them
    atomic_write_text(out / "results.json", json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}/results.json and signal.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
