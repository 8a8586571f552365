"""``differad-rl`` data commands: ``demo-data`` and ``build-pairs``.

:func:`register` is called by :mod:`differad_rl.cli`; heavy modules are imported inside the command
functions so ``differad-rl --help`` stays fast. Each command returns a process exit code.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


INTERRUPTED = 130  # the shell's exit status for SIGINT


def _interrupted(command: str) -> int:
    print(f"differad-rl {command}: interrupted; nothing was written (the output folder is unchanged)",
          file=sys.stderr)
    return INTERRUPTED


def _demo_data(args: argparse.Namespace) -> int:
    try:
        return _demo_data_run(args)
    except KeyboardInterrupt:
        return _interrupted("demo-data")


def _build_pairs(args: argparse.Namespace) -> int:
    try:
        return _build_pairs_run(args)
    except KeyboardInterrupt:
        return _interrupted("build-pairs")


def _demo_data_run(args: argparse.Namespace) -> int:
    from differad_rl.data.demo import NO_NUISANCE, build_demo_pairs
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
            **(NO_NUISANCE if args.clean else {}),
        )
    except ValueError as exc:
        print(f"differad-rl demo-data: error: {exc}", file=sys.stderr)
        return 2
    recs = load_pairs(path)
    n_test = sum(r.split == "test" for r in recs)
    n_normal = sum(r.is_normal for r in recs)
    print(f"{path}: {len(recs)} pairs ({len(recs) - n_test} train, {n_test} test; {n_normal} normal)")
    return 0


def _csv(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else ()


def _build_pairs_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from differad_rl.data.pairing import PairingConfig, build_pair_dir, default_textures
    from differad_rl.data.readers import IMAGE_EXTENSIONS, read_layout

    try:
        cfg = PairingConfig(
            normal_ratio=args.normal_ratio,
            box_mode=args.box_mode,
            min_component_area=args.min_component_area,
            seed=args.seed,
            split=args.split,
            test_categories=_csv(args.test_categories),
            test_fraction=args.test_fraction,
            copy_images=args.copy_images or args.max_side is not None,
            max_side=args.max_side,
            synthetic=_csv(args.synthetic),
            synthetic_per_category=args.synthetic_per_category,
        )
        textures: list[Path | str]
        if args.texture_dir:
            tdir = Path(args.texture_dir)
            if not tdir.is_dir():
                raise FileNotFoundError(f"texture folder not found: {tdir}")
            textures = sorted(p for p in tdir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not textures:
                raise ValueError(f"no images in texture folder {tdir}")
        else:
            textures = list(default_textures())
        samples = read_layout(args.layout, args.root, _csv(args.categories) or None)
        path = build_pair_dir(
            samples, args.out, cfg, textures=textures, workers=args.workers, progress=not args.quiet,
            hf_dataset=args.hf_dataset,
        )
    except (ValueError, OSError) as exc:  # FileNotFoundError, a file where a folder must be, permissions
        print(f"differad-rl build-pairs: error: {exc}", file=sys.stderr)
        return 2
    from differad_rl.data.records import load_pairs

    recs = load_pairs(path)
    n_test = sum(r.split == "test" for r in recs)
    n_normal = sum(r.is_normal for r in recs)
    cats = len({r.category for r in recs})
    print(f"{path}: {len(recs)} pairs over {cats} categories ({len(recs) - n_test} train, {n_test} test; {n_normal} normal)")
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
    p.add_argument("--clean", action="store_true",
                   help="no nuisance: no shift, rotation, scale, lighting or noise, so the two images of a pair are "
                        "equal outside the defects (the same windows, defects and boxes as without --clean)")
    p.add_argument("--force", action="store_true", help="rebuild even if a matching set exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_demo_data)

    b = subparsers.add_parser(
        "build-pairs",
        help="build reference/target pairs from MVTec AD, VisA, MVTec LOCO or a generic folder",
        description="Read a dataset layout, pair every anomalous (and some normal) target with a seeded "
        "normal reference of its category, turn masks into boxes and write pairs.jsonl atomically.",
    )
    b.add_argument("--layout", required=True, choices=["mvtec", "visa", "loco", "folder"])
    b.add_argument("--root", required=True, help="dataset root folder")
    b.add_argument("--out", required=True, help="output folder (pairs.jsonl, build.json, images/)")
    b.add_argument("--categories", default=None, help="comma-separated categories (default: all)")
    b.add_argument("--normal-ratio", type=float, default=0.25, help="share of normal targets (default 0.25)")
    b.add_argument("--box-mode", choices=["all", "largest"], default="all", help="one box per component or the largest")
    b.add_argument("--min-component-area", type=int, default=1, help="ignore smaller mask components (pixels)")
    b.add_argument("--split", choices=["category", "pair", "none"], default="category",
                   help="open-set by category (default), by pair, or all train")
    b.add_argument("--test-categories", default=None, help="comma-separated held-out categories (split=category)")
    b.add_argument("--test-fraction", type=float, default=0.25, help="share of test categories / pairs (default 0.25)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--copy-images", action="store_true", help="write PNG copies into OUT/images")
    b.add_argument("--max-side", type=int, default=None, help="resize copies to this longer side (implies --copy-images)")
    b.add_argument("--synthetic", default=None, help="add synthetic anomalies: perlin,cutpaste")
    b.add_argument("--synthetic-per-category", type=int, default=0, help="synthetic pairs per category and kind")
    b.add_argument("--texture-dir", default=None,
                   help="foreign textures for perlin (default: images bundled with scikit-image)")
    b.add_argument("--hf-dataset", action="store_true", help="also save a Hugging Face Dataset to OUT/hf_dataset")
    b.add_argument("--workers", type=int, default=None, help="image worker processes (default min(4, CPUs))")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_build_pairs)
