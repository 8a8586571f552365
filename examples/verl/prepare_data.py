"""Pair records → veRL parquet files (train / val) for ``run_differad_qwen2_5_vl.sh``.

    # your own pairs (JSONL, see docs/core-api.md "Pair records"):
    python examples/verl/prepare_data.py --pairs data/pairs.jsonl --out ~/data/differad
    # or the small offline demo set (skimage pictures with synthetic defects):
    python examples/verl/prepare_data.py --demo ~/data/differad_demo_pairs --out ~/data/differad

Records with ``split == "train"`` go to ``train.parquet``, every other split to ``val.parquet``.
``--space`` / ``--max-pixels`` must match the model and the processor budget you train with:
the reward converts the pixel ground truth into that space, and each image carries the budget to
veRL's resize (see :mod:`differad_rl.integrations.verl.data`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from differad_rl.coords import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, SPACES
from differad_rl.data.records import load_pairs
from differad_rl.integrations.verl.data import ParquetOptions, write_verl_parquet


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pairs", type=Path, help="pairs JSONL file")
    src.add_argument("--demo", type=Path, help="build (or reuse) the offline demo pair set in this folder")
    p.add_argument("--demo-pairs", type=int, default=160, help="number of demo pairs (with --demo)")
    p.add_argument("--out", type=Path, required=True, help="output folder for train.parquet / val.parquet")
    p.add_argument("--space", default="qwen2_5_vl", choices=SPACES, help="coordinate space of the model to train")
    p.add_argument("--min-pixels", type=int, default=DEFAULT_MIN_PIXELS)
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="docs/method.md §1: 1003520")
    p.add_argument("--seed", type=int, default=0, help="seeds the instruction drawn for each row")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.demo is not None:
        from differad_rl.data.demo import build_demo_pairs

        pairs_path = build_demo_pairs(args.demo, n_pairs=args.demo_pairs)
    else:
        pairs_path = args.pairs
    records = load_pairs(pairs_path)
    options = ParquetOptions(space=args.space, min_pixels=args.min_pixels, max_pixels=args.max_pixels, seed=args.seed)
    splits = {"train": [r for r in records if r.split == "train"], "val": [r for r in records if r.split != "train"]}
    for name, recs in splits.items():
        if not recs:
            print(f"no {name} records; {name}.parquet not written", file=sys.stderr)
            continue
        out = write_verl_parquet(recs, args.out / f"{name}.parquet", options)
        print(f"{name}: {len(recs)} rows -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
