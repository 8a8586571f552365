"""Evaluate the classic no-model baseline on the embedded demo pairs and write its report.

    python examples/baseline/run_baseline.py --out runs/baseline

Builds (or reuses) the demo pair set offline (``differad_rl.data.demo.build_demo_pairs``), draws a
seeded 30 % calibration subset of the *train* split, calibrates the threshold there, and evaluates
on the whole *test* split with the protocol of DESIGN §8 (mIoU, Acc@0.3, F1@0.3, per category).
Writes ``preds.jsonl``, ``metrics.json``, ``samples.jsonl``, ``iou_hist.png``, ``cases.png`` and
``report.html`` into ``--out``. The same as::

    differad-rl demo-data --out runs/demo
    differad-rl baseline --pairs runs/demo/pairs.jsonl --out runs/baseline

These numbers are the floor a trained model must beat on the demo pairs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/baseline", help="report folder")
    parser.add_argument("--demo", default=None, help="demo pair folder (default: <out>/../demo_pairs)")
    parser.add_argument("--n-pairs", type=int, default=160, help="demo pairs to build (default 160)")
    parser.add_argument("--seed", type=int, default=0, help="demo and calibration seed")
    parser.add_argument("--objective", default="pixel_f1", choices=["pixel_f1", "miou"])
    args = parser.parse_args(argv)

    from differad_rl.data.demo import build_demo_pairs
    from differad_rl.eval import cli as eval_cli

    out = Path(args.out)
    demo_dir = Path(args.demo) if args.demo else out.parent / "demo_pairs"
    pairs = build_demo_pairs(demo_dir, n_pairs=args.n_pairs, seed=args.seed)

    sub = argparse.ArgumentParser(prog="differad-rl").add_subparsers(dest="command")
    eval_cli.register(sub)
    ns = sub.choices["baseline"].parse_args(
        ["--pairs", str(pairs), "--out", str(out), "--seed", str(args.seed), "--objective", args.objective]
    )
    code = int(ns.func(ns))
    metrics = json.loads((out / "metrics.json").read_text())
    rows = [("overall", metrics["overall"]), ("anomalous", metrics["anomalous"]), ("normal", metrics["normal"])]
    rows += sorted(metrics["per_category"].items())
    print("\n| group | n | mIoU | Acc@0.3 | F1@0.3 |\n|---|---:|---:|---:|---:|")
    for name, m in rows:
        f1 = "–" if m["f1"] is None else f"{m['f1']:.3f}"
        print(f"| {name} | {m['n']} | {m['miou']:.3f} | {m['acc']:.3f} | {f1} |")
    print(f"\nreport: {out / 'report.html'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
