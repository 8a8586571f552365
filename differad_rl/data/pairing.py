"""Pairing: dataset samples → reference/target pair records (AD-DualDiff style, docs/method.md §7).

* **Reference** = a normal image of the same category, chosen by a seeded generator (from the
  dataset's ``train`` normals when there are any, else from all normals; never the target itself).
* **Target** = every anomalous image (boxes from its mask by connected components, ``box_mode``
  ``"all"`` or ``"largest"``, exclusive x2/y2, see :mod:`differad_rl.data.masks`), plus normal
  targets (``boxes = []``) so that they make up ``normal_ratio`` of the category's pairs:
  ``n_normal = round(n_anomalous · r / (1 − r))`` (held-out normals — ``test``/``validation`` —
  first; reused with other references when there are too few).
* Optional **synthetic** anomalous targets (:mod:`differad_rl.data.synthetic`): Perlin-shaped
  foreign texture and Poisson-blended cut-paste of the category's real defects.
* **Split**: ``"category"`` — open set, whole categories are held out for test
  (``test_categories`` or a seeded ``test_fraction`` of them); ``"pair"`` — a seeded
  ``test_fraction`` of each category's pairs; ``"none"`` — all ``train``.

Each category draws from ``numpy.random.default_rng([seed, crc32(category)])``, so adding or
removing a category leaves the others' pairs unchanged. Image work (decode check, mask → boxes,
optional resized copies, synthetic rendering) runs once per distinct image in a process pool with a
tqdm bar; the output folder is written to a temporary sibling and moved into place whole.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from differad_rl.data.readers import Sample

if TYPE_CHECKING:
    from differad_rl.data.masks import BoxMode

__all__ = ["PairingConfig", "PairPlan", "plan_pairs", "build_pairs", "build_pair_dir", "default_textures", "BUILD_MANIFEST"]

BUILD_MANIFEST = "build.json"
SPLIT_MODES = ("category", "pair", "none")
SYNTHETIC_KINDS = ("perlin", "cutpaste")
SKIMAGE_PREFIX = "skimage:"


@dataclass(frozen=True)
class PairingConfig:
    """Validated pairing parameters (defaults: the paper's mix, one box per connected component).

    Attributes:
        normal_ratio: share of normal targets among a category's real pairs, in [0, 1).
        box_mode: ``"all"`` (one box per component) or ``"largest"``.
        min_component_area: mask components with fewer pixels are ignored.
        seed: the seed of every random choice.
        split: ``"category"`` (open set), ``"pair"`` or ``"none"``.
        test_categories: explicit held-out categories for ``split="category"``.
        test_fraction: share of categories (``"category"``, when ``test_categories`` is empty) or
            of pairs (``"pair"``) that go to ``test``.
        copy_images: copy every used image into ``<out>/images`` (byte copies after a decode
            check; needed for ``max_side``); otherwise records point at the original files.
        max_side: write copies as PNG with the longer side at most this (boxes scaled, outward
            rounded: ``x1 → floor(x1·s)``, ``x2 → ceil(x2·s)``).
        synthetic: synthetic kinds to add (``"perlin"``, ``"cutpaste"``).
        synthetic_per_category: synthetic pairs per category and kind.
    """

    normal_ratio: float = 0.25
    box_mode: BoxMode = "all"
    min_component_area: int = 1
    seed: int = 0
    split: str = "category"
    test_categories: tuple[str, ...] = ()
    test_fraction: float = 0.25
    copy_images: bool = False
    max_side: int | None = None
    synthetic: tuple[str, ...] = ()
    synthetic_per_category: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.normal_ratio < 1.0:
            raise ValueError(f"normal_ratio must be in [0, 1), got {self.normal_ratio}")
        if self.box_mode not in ("all", "largest"):
            raise ValueError(f"box_mode must be 'all' or 'largest', got {self.box_mode!r}")
        if self.min_component_area < 1:
            raise ValueError(f"min_component_area must be >= 1, got {self.min_component_area}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.split not in SPLIT_MODES:
            raise ValueError(f"split must be one of {SPLIT_MODES}, got {self.split!r}")
        if not 0.0 <= self.test_fraction <= 1.0:
            raise ValueError(f"test_fraction must be in [0, 1], got {self.test_fraction}")
        if self.max_side is not None and self.max_side < 8:
            raise ValueError(f"max_side must be >= 8 or None, got {self.max_side}")
        if self.max_side is not None and not self.copy_images:
            raise ValueError("max_side needs copy_images=True (originals are never modified)")
        bad = [k for k in self.synthetic if k not in SYNTHETIC_KINDS]
        if bad:
            raise ValueError(f"synthetic kinds must be in {SYNTHETIC_KINDS}, got {bad[0]!r}")
        if self.synthetic_per_category < 0:
            raise ValueError(f"synthetic_per_category must be >= 0, got {self.synthetic_per_category}")


@dataclass(frozen=True)
class PairPlan:
    """One planned pair (no image opened yet). ``synthetic`` = kind or ``""`` for a real target;
    ``donor`` = the anomalous sample whose defect is cut-pasted; ``texture`` = a foreign image."""

    id: str
    reference: Sample
    target: Sample
    split: str
    synthetic: str = ""
    donor: Sample | None = None
    texture: Path | str | None = None
    index: int = 0


def _cat_rng(seed: int, category: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(category.encode("utf-8"))])


def _test_categories(categories: list[str], cfg: PairingConfig) -> set[str]:
    if cfg.split != "category":
        return set()
    if cfg.test_categories:
        missing = [c for c in cfg.test_categories if c not in categories]
        if missing:
            raise ValueError(f"test category {missing[0]!r} is not in the data (categories: {categories})")
        return set(cfg.test_categories)
    k = int(round(len(categories) * cfg.test_fraction))
    if cfg.test_fraction > 0 and len(categories) >= 2:
        k = min(max(k, 1), len(categories) - 1)
    rng = np.random.default_rng([cfg.seed, 0x5EED])
    return {categories[i] for i in rng.permutation(len(categories))[:k]}


def plan_pairs(
    samples: Sequence[Sample], config: PairingConfig | None = None, textures: Sequence[Path | str] = ()
) -> list[PairPlan]:
    """Seeded pairing plan (pure: no image I/O). See the module docstring for the rules.

    Raises ``ValueError`` naming the category when it has fewer than 2 normal images (a normal
    target needs a different reference) or no normal image at all.
    """
    cfg = config or PairingConfig()
    by_cat: dict[str, list[Sample]] = {}
    for s in samples:
        by_cat.setdefault(s.category, []).append(s)
    categories = sorted(by_cat)
    if not categories:
        raise ValueError("no samples to pair")
    test_cats = _test_categories(categories, cfg)
    plans: list[PairPlan] = []
    for cat in categories:
        rng = _cat_rng(cfg.seed, cat)
        cs = sorted(by_cat[cat], key=lambda s: (s.defect, s.split, str(s.path)))
        normals = [s for s in cs if s.is_normal]
        anomalous = [s for s in cs if not s.is_normal]
        if not normals:
            raise ValueError(f"category {cat!r} has no normal image to use as reference")
        ref_pool = [s for s in normals if s.split == "train"] or normals
        n_norm = int(round(len(anomalous) * cfg.normal_ratio / (1.0 - cfg.normal_ratio))) if anomalous else 0
        if n_norm and len(normals) < 2:
            raise ValueError(f"category {cat!r} needs at least 2 normal images for normal targets, has {len(normals)}")
        held = [normals[i] for i in rng.permutation(len(normals)) if normals[i].split != "train"]
        rest = [normals[i] for i in rng.permutation(len(normals)) if normals[i].split == "train"]
        order = held + rest
        normal_targets = [order[i % len(order)] for i in range(n_norm)]

        cat_plans: list[tuple[Sample, Sample, str, Sample | None, Path | str | None]] = []
        pick_ref = _RefPicker(ref_pool, normals, cat)
        for tgt in anomalous + normal_targets:
            cat_plans.append((pick_ref(rng, tgt), tgt, "", None, None))
        for kind in cfg.synthetic:
            if cfg.synthetic_per_category == 0:
                continue
            if kind == "cutpaste" and not anomalous:
                raise ValueError(f"category {cat!r} has no anomalous image to cut defects from (synthetic 'cutpaste')")
            if kind == "perlin" and not textures:
                raise ValueError("synthetic 'perlin' needs foreign texture images (none given)")
            for _ in range(cfg.synthetic_per_category):
                base = normals[int(rng.integers(len(normals)))]
                ref = pick_ref(rng, base)
                donor = anomalous[int(rng.integers(len(anomalous)))] if kind == "cutpaste" else None
                tex = textures[int(rng.integers(len(textures)))] if kind == "perlin" else None
                cat_plans.append((ref, base, kind, donor, tex))

        if cfg.split == "category":
            splits = ["test" if cat in test_cats else "train"] * len(cat_plans)
        elif cfg.split == "pair":
            k = int(round(len(cat_plans) * cfg.test_fraction))
            test_idx = set(rng.permutation(len(cat_plans))[:k].tolist())
            splits = ["test" if i in test_idx else "train" for i in range(len(cat_plans))]
        else:
            splits = ["train"] * len(cat_plans)

        seen: dict[str, int] = {}
        syn_count: dict[str, int] = {}
        for (ref, tgt, kind, donor, tex), split in zip(cat_plans, splits):
            if kind:
                n = syn_count.get(kind, 0)
                syn_count[kind] = n + 1
                rid = f"{cat}/synthetic_{kind}/{n:04d}"
            elif tgt.is_normal:
                rid = f"{cat}/good/{tgt.split}-{tgt.name}"
            else:
                rid = f"{cat}/{tgt.defect}/{tgt.name}"
            if rid in seen:
                seen[rid] += 1
                rid = f"{rid}-{seen[rid]}"
            else:
                seen[rid] = 0
            plans.append(PairPlan(rid, ref, tgt, split, kind, donor, tex, len(plans)))
    return plans


class _RefPicker:
    """Uniform reference choice from a pool minus the target itself, O(1) per draw: draw among
    n − 1 and skip the target's slot. Falls back to all normals when the pool is only the target."""

    def __init__(self, pool: list[Sample], normals: list[Sample], cat: str) -> None:
        self.levels = [(pool, {s.path: i for i, s in enumerate(pool)}), (normals, {s.path: i for i, s in enumerate(normals)})]
        self.cat = cat

    def __call__(self, rng: np.random.Generator, tgt: Sample) -> Sample:
        for cands, pos in self.levels:
            j = pos.get(tgt.path, -1)
            n = len(cands) - (j >= 0)
            if n > 0:
                k = int(rng.integers(n))
                return cands[k + int(0 <= j <= k)]
        raise ValueError(f"category {self.cat!r}: no normal reference different from target {tgt.path}")


# ----------------------------------------------------------------------------- image work
def _open_rgb(path: Path) -> Any:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"corrupt or unreadable image {path}: {exc}") from None


def _scale_boxes(boxes: list[list[int]], sx: float, sy: float, w: int, h: int) -> list[list[int]]:
    """Scale exclusive boxes outward: x1 → floor(x1·sx), x2 → ceil(x2·sx), clipped, ≥ 1 px wide."""
    out = []
    for x1, y1, x2, y2 in boxes:
        nx1, ny1 = min(w - 1, math.floor(x1 * sx)), min(h - 1, math.floor(y1 * sy))
        nx2, ny2 = max(nx1 + 1, min(w, math.ceil(x2 * sx))), max(ny1 + 1, min(h, math.ceil(y2 * sy)))
        out.append([nx1, ny1, nx2, ny2])
    return out


def _resized(im: Any, max_side: int | None) -> Any:
    from PIL import Image

    if max_side is None or max(im.size) <= max_side:
        return im
    s = max_side / max(im.size)
    size = (max(1, round(im.size[0] * s)), max(1, round(im.size[1] * s)))
    return im.resize(size, Image.Resampling.BILINEAR, reducing_gap=None)


@dataclass(frozen=True)
class _Job:
    """One unit of image work: a real image (inspect/copy) or a synthetic target (render/write)."""

    key: str
    path: Path
    mask_paths: tuple[Path, ...] = ()
    write_to: Path | None = None
    max_side: int | None = None
    box_mode: BoxMode = "all"
    min_area: int = 1
    synthetic: str = ""
    donor: Path | None = None
    donor_masks: tuple[Path, ...] = ()
    texture: Path | str | None = None
    seed: tuple[int, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


def _run_job(job: _Job) -> tuple[str, tuple[int, int], list[list[int]]]:
    """Returns ``(key, (width, height), boxes)`` of the image as the record will reference it."""
    from differad_rl.data.masks import mask_to_boxes, union_masks

    im = _open_rgb(job.path)
    w0, h0 = im.size
    if job.synthetic:
        return _run_synthetic(job, im)
    boxes: list[list[int]] = []
    if job.mask_paths:
        mask = union_masks(job.mask_paths, image_size=(w0, h0))
        boxes = mask_to_boxes(mask, job.box_mode, min_area=job.min_area)
    if job.write_to is not None:
        im2 = _resized(im, job.max_side)
        if im2.size != im.size:
            boxes = _scale_boxes(boxes, im2.size[0] / w0, im2.size[1] / h0, *im2.size)
        if im2 is im and job.write_to.suffix.lower() == job.path.suffix.lower():
            # unchanged image in its own format: copy the file's bytes (decoded above as a check)
            job.write_to.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(job.path, job.write_to)
        else:
            _save_png(im2, job.write_to)
        return job.key, im2.size, boxes
    return job.key, (w0, h0), boxes


def _ignore_sigint() -> None:
    """Worker initializer: Ctrl-C is the parent's to handle (it stops the pool and cleans up once),
    not every worker's (each would print its own traceback)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _save_png(im: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format="PNG", compress_level=6)


def _run_synthetic(job: _Job, im: Any) -> tuple[str, tuple[int, int], list[list[int]]]:
    from PIL import Image

    from differad_rl.data.masks import union_masks
    from differad_rl.data.synthetic import cut_paste_anomaly, perlin_anomaly

    rng = np.random.default_rng(list(job.seed))
    im = _resized(im, job.max_side)
    img = np.asarray(im, dtype=np.float64) / 255.0
    h, w = img.shape[:2]
    if job.synthetic == "perlin":
        assert job.texture is not None
        tex = _load_texture(job.texture).resize((w, h), Image.Resampling.BILINEAR)
        tex_arr = np.asarray(tex, dtype=np.float64) / 255.0
        out, _, boxes = perlin_anomaly(img, tex_arr, rng)
    else:
        assert job.donor is not None
        dim = _open_rgb(job.donor)
        dw, dh = dim.size
        dmask = union_masks(job.donor_masks, image_size=(dw, dh))
        if (dw, dh) != (w, h):  # bring donor to the target's scale
            dim = dim.resize((w, h), Image.Resampling.BILINEAR)
            dmask = np.asarray(Image.fromarray(dmask).resize((w, h), Image.Resampling.NEAREST))
        darr = np.asarray(dim, dtype=np.float64) / 255.0
        out, _, boxes = cut_paste_anomaly(img, darr, dmask, rng, blend="poisson")
    arr = np.round(np.clip(out, 0, 1) * 255).astype(np.uint8)
    assert job.write_to is not None
    _save_png(Image.fromarray(arr, mode="RGB"), job.write_to)
    return job.key, (w, h), boxes


def _load_texture(texture: Path | str) -> Any:
    """A texture image as PIL RGB: a file path, or ``skimage:<name>`` for a bundled photograph."""
    from PIL import Image

    t = str(texture)
    if t.startswith(SKIMAGE_PREFIX):
        from differad_rl.data.demo import load_source_image

        arr = np.round(load_source_image(t[len(SKIMAGE_PREFIX) :]) * 255).astype(np.uint8)
        return Image.fromarray(arr, mode="RGB")
    return _open_rgb(Path(t))


def default_textures() -> list[str]:
    """Foreign textures for Perlin anomalies when none are given: the scikit-image photographs of
    the demo set as ``skimage:<name>`` (always available offline)."""
    from differad_rl.data.demo import DEFAULT_CATEGORIES

    return [f"{SKIMAGE_PREFIX}{n}" for n in DEFAULT_CATEGORIES]


def _copy_name(s: Sample, resize: bool) -> str:
    """``images/<category>/<defect>/<split>-<stem><ext>``: the original extension when the file is
    copied as is, ``.png`` when images may be resized (re-encoded)."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in f"{s.split}-{s.name}")
    ext = ".png" if resize else s.path.suffix.lower()
    return f"images/{s.category}/{s.defect}/{safe}{ext}"


def build_pairs(
    plans: Sequence[PairPlan],
    config: PairingConfig,
    *,
    out_dir: str | os.PathLike[str] | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> list[Any]:
    """Run the image work of ``plans`` and return :class:`~differad_rl.data.records.PairRecord` s.

    ``config`` must be the one the plans were made with (its box/copy/resize options apply here).

    ``out_dir`` receives image copies / synthetic targets under ``images/`` (required when
    ``copy_images`` or synthetic plans are present). Every distinct image is opened once: a missing
    or corrupt image, or a mask whose size differs from its image, raises an error naming the
    file. ``workers`` (default ``min(4, cpu_count)``) are processes of the platform's start method
    (see :func:`differad_rl.data.demo.build_demo_pairs`); the result does not depend on it. An
    anomalous target whose mask has no component ≥ ``min_component_area`` is dropped with
    a warning naming the file (it would otherwise look normal).
    """
    import warnings

    from tqdm.auto import tqdm

    from differad_rl.data.records import PairRecord

    cfg = config
    needs_dir = cfg.copy_images or any(p.synthetic for p in plans)
    if needs_dir and out_dir is None:
        raise ValueError("out_dir is required with copy_images or synthetic pairs")
    out = Path(out_dir) if out_dir is not None else None
    jobs: dict[str, _Job] = {}
    rel_of: dict[str, str] = {}

    def real_job(s: Sample, with_mask: bool) -> str:
        key = f"{s.path}|{int(with_mask)}"
        if key not in jobs:
            write = None
            if cfg.copy_images and out is not None:
                rel = _copy_name(s, cfg.max_side is not None)
                write, rel_of[key] = out / rel, rel
            jobs[key] = _Job(key, s.path, s.mask_paths if with_mask else (), write, cfg.max_side, cfg.box_mode,
                             cfg.min_component_area)
        return key

    plan_keys: list[tuple[str, str]] = []
    for p in plans:
        rkey = real_job(p.reference, False)
        if p.synthetic:
            assert out is not None
            rel = f"images/{p.id.replace('/', '_')}.png"
            key = f"syn|{p.id}"
            rel_of[key] = rel
            jobs[key] = _Job(
                key, p.target.path, (), out / rel, cfg.max_side if cfg.copy_images else None, synthetic=p.synthetic,
                donor=p.donor.path if p.donor else None, donor_masks=p.donor.mask_paths if p.donor else (),
                texture=p.texture, seed=(cfg.seed, 0x51, p.index),
            )
            tkey = key
        else:
            tkey = real_job(p.target, not p.target.is_normal)
        plan_keys.append((rkey, tkey))

    results: dict[str, tuple[tuple[int, int], list[list[int]]]] = {}
    n_workers = max(1, min(4, os.cpu_count() or 1)) if workers is None else int(workers)
    job_list = list(jobs.values())
    with tqdm(total=len(job_list), desc="pair images", unit="img", disable=not progress) as bar:
        if n_workers <= 1 or len(job_list) < 16:
            for j in job_list:
                k, size, boxes = _run_job(j)
                results[k] = (size, boxes)
                bar.update(1)
        else:
            with ProcessPoolExecutor(max_workers=n_workers, initializer=_ignore_sigint) as ex:
                chunk = max(1, len(job_list) // (16 * n_workers))
                for k, size, boxes in ex.map(_run_job, job_list, chunksize=chunk):
                    results[k] = (size, boxes)
                    bar.update(1)

    records = []
    for p, (rkey, tkey) in zip(plans, plan_keys):
        (w, h), boxes = results[tkey]
        if not p.target.is_normal or p.synthetic:
            if not boxes:
                what = p.target.mask_paths[0] if p.target.mask_paths and not p.synthetic else p.target.path
                warnings.warn(f"pair {p.id!r}: empty defect mask ({what}); pair dropped", stacklevel=2)
                continue
        # absolute: a relative sample path is relative to the current folder, not to the pairs file
        ref_path = (out / rel_of[rkey]) if rkey in rel_of and out is not None else Path(p.reference.path).absolute()
        tgt_path = (out / rel_of[tkey]) if tkey in rel_of and out is not None else Path(p.target.path).absolute()
        defect = f"synthetic_{p.synthetic}" if p.synthetic else p.target.defect
        records.append(
            PairRecord(
                id=p.id, reference=str(ref_path), target=str(tgt_path), boxes=boxes, width=w, height=h,
                category=p.target.category, defect=defect, source=p.target.source, split=p.split,
            )
        )
    return records


def build_pair_dir(
    samples: Sequence[Sample],
    out_dir: str | os.PathLike[str],
    config: PairingConfig | None = None,
    *,
    textures: Sequence[Path | str] = (),
    workers: int | None = None,
    progress: bool = True,
    hf_dataset: bool = False,
) -> Path:
    """Plan, build and write a pair folder atomically; returns the path of ``pairs.jsonl``.

    Writes ``<out>/pairs.jsonl``, ``<out>/build.json`` (config and counts), ``<out>/images/`` when
    images are copied or synthesised, and ``<out>/hf_dataset/`` (``datasets.Dataset.save_to_disk``)
    when ``hf_dataset``. Everything is written into a temporary sibling and swapped in whole; an
    existing non-empty ``out_dir`` that is not a previous build raises ``ValueError``.
    """
    from differad_rl.data.atomic import atomic_directory
    from differad_rl.data.records import to_hf_dataset, write_pairs

    cfg = config or PairingConfig()
    out = Path(out_dir).absolute()  # image paths are written relative to it: never cwd-relative
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / BUILD_MANIFEST).is_file())):
        raise ValueError(f"out_dir {out} exists and is not a differad-rl pair build; refusing to overwrite it")
    plans = plan_pairs(samples, cfg, textures)
    with atomic_directory(out) as tmp:
        records = build_pairs(plans, cfg, out_dir=tmp, workers=workers, progress=progress)
        write_pairs(records, tmp / "pairs.jsonl")  # paths under tmp are written relative
        final = [r.with_paths(_rebase(r.reference, tmp, out), _rebase(r.target, tmp, out)) for r in records]
        if hf_dataset:
            to_hf_dataset(final).save_to_disk(str(tmp / "hf_dataset"))
        info = {
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
            "n_pairs": len(final),
            "n_normal": sum(r.is_normal for r in final),
            "n_test": sum(r.split == "test" for r in final),
            "categories": sorted({r.category for r in final}),
            "test_categories": sorted({r.category for r in final if r.split == "test"}),
        }
        (tmp / BUILD_MANIFEST).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return out / "pairs.jsonl"


def _rebase(path: str, old: Path, new: Path) -> str:
    p = Path(path)
    try:
        return str(new / p.relative_to(old))
    except ValueError:
        return path
