"""Pair-building throughput (pairs/s) next to the pure image I/O it cannot beat.

Run: ``pytest benchmarks/bench_data.py --benchmark-enable`` (group ``pairs-*``). For each group the
``io_only`` entry decodes and, for the copy group, copies exactly the distinct images a build
touches (and decodes its masks), in one process, with the same PIL calls; the builder's time over that is its
overhead (planning, masks → boxes, records, atomic writes). ``extra_info`` holds pairs/s.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from differad_rl.data.pairing import PairingConfig, build_pair_dir, plan_pairs
from differad_rl.data.readers import read_mvtec

SIDE = 256
CATS = ("a", "b", "c")


def _make_tree(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for c in CATS:
        for split, defect, n in (("train", "good", 20), ("test", "good", 6), ("test", "scratch", 12)):
            for i in range(n):
                small = (rng.random((SIDE // 8, SIDE // 8, 3)) * 60 + 100).astype(np.uint8)
                # a smooth texture plus mild noise: compresses like a real photograph, not like noise
                arr = np.asarray(Image.fromarray(small).resize((SIDE, SIDE), Image.Resampling.BICUBIC))
                arr = (arr + rng.integers(0, 4, size=arr.shape)).astype(np.uint8)
                p = root / c / split / defect / f"{i:03d}.png"
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(p)
                if defect != "good":
                    m = np.zeros((SIDE, SIDE), np.uint8)
                    y, x = rng.integers(0, SIDE - 40, size=2)
                    m[y : y + 30, x : x + 20] = 255
                    mp = root / c / "ground_truth" / defect / f"{i:03d}_mask.png"
                    mp.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(m).save(mp)
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return _make_tree(tmp_path_factory.mktemp("bench") / "mvtec")


def _distinct_images(samples, cfg) -> tuple[int, list[Path], list[Path]]:
    plans = plan_pairs(samples, cfg)
    images = sorted({p.reference.path for p in plans} | {p.target.path for p in plans})
    masks = sorted({m for p in plans for m in p.target.mask_paths})
    return len(plans), images, masks


def _io_only(images: list[Path], masks: list[Path], out: Path | None, max_side: int | None) -> None:
    """Decode every image (and mask) once; with ``out`` also write it there the way a build does:
    a byte copy, or (``max_side``) a resized PNG."""
    for i, p in enumerate(images):
        with Image.open(p) as im:
            im.load()
            rgb = im.convert("RGB")
        if out is not None and max_side is None:
            shutil.copyfile(p, out / f"{i}.png")
        elif out is not None:
            s = max_side / max(rgb.size)
            small = rgb.resize((round(rgb.size[0] * s), round(rgb.size[1] * s)), Image.Resampling.BILINEAR, reducing_gap=None)
            small.save(out / f"{i}.png", format="PNG", compress_level=6)
    for p in masks:
        with Image.open(p) as im:
            np.asarray(im).astype(bool)


MODES = {"verify": {}, "copy": {"copy_images": True}, "resize": {"copy_images": True, "max_side": SIDE // 2}}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("who", ["io_only", "build_w1", "build_w2"])
def test_pair_building(benchmark, tree: Path, tmp_path: Path, mode: str, who: str):
    samples = read_mvtec(tree)
    cfg = PairingConfig(split="none", **MODES[mode])
    n_pairs, images, masks = _distinct_images(samples, cfg)
    benchmark.group = f"pairs-{mode}"
    out = tmp_path / "out"

    if who == "io_only":
        def run():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            _io_only(images, masks, out if cfg.copy_images else None, cfg.max_side)
    else:
        workers = int(who[-1])

        def run():
            shutil.rmtree(out, ignore_errors=True)
            build_pair_dir(samples, out, cfg, workers=workers, progress=False)

    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(
        n_pairs=n_pairs, n_images=len(images), n_masks=len(masks),
        pairs_per_s=n_pairs / benchmark.stats.stats.mean,
    )


def test_demo_build(benchmark, tmp_path: Path):
    from differad_rl.data.demo import build_demo_pairs

    benchmark.group = "demo"
    out = tmp_path / "demo"

    def run():
        build_demo_pairs(out, n_pairs=160, size=128, progress=False, force=True)

    benchmark.pedantic(run, rounds=2, iterations=1)
    benchmark.extra_info["pairs_per_s"] = 160 / benchmark.stats.stats.mean
