"""``differad-rl`` data commands: ``demo-data`` and ``build-pairs``.

:func:`register` is called by :mod:`differad_rl.cli`; heavy modules are imported inside the command
functions so ``differad-rl --help`` stays fast. Each command returns a process exit code.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def _demo_data(args: argparse.Namespace) -> int:
    from differad_rl.data.demo import build_demo_pairs
    from differad_rl.data.records import load_pairs

    try:
        path = build_demo_pairs(
            args.out,
            n_pairs=args.n_pairs,
            size=args.size,
            seed=args.seed,
            test_fraction=args.test_fraction,
            normal_fraction=args.normal_fraction,
            workers=args.workers,
            progress=not args.quiet,
            force=args.force,
        )
    except ValueError as exc:
        print(f"differad-rl demo-data: error: {exc}", file=sys.stderr)
        return 2
    recs = load_pairs(path)
    n_test = sum(r.split == "test" for r in recs)
    n_normal = sum(r.is_normal for r in recs)
    print(f"{path}: {len(recs)} pairs ({len(recs) - n_test} train, {n_test} test; {n_normal} normal)")
    return 0


def register(subparsers: Any) -> None:
    """Add the data subcommands to ``subparsers`` (an ``argparse`` sub-parser action)."""
    p = subparsers.add_parser(
        "demo-data",
        help="build the embedded demo pair set (offline, from images bundled with scikit-image)",
        description="Build the embedded demo reference/target pairs (no network). Reuses an existing "
        "identical set in --out.",
    )
    p.add_argument("--out", required=True, help="output folder (pairs.jsonl, images/, manifest.json)")
    p.add_argument("--n-pairs", type=int, default=160, help="number of pairs (default 160)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--test-fraction", type=float, default=0.25, help="share of test pairs (default 0.25)")
    p.add_argument("--normal-fraction", type=float, default=0.25, help="share of normal pairs (default 0.25)")
    p.add_argument("--workers", type=int, default=None, help="rendering processes (default min(4, CPUs))")
    p.add_argument("--force", action="store_true", help="rebuild even if a matching set exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_demo_data)
