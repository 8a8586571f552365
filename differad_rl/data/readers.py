"""Readers for public anomaly-detection layouts already on disk.

Each reader returns a list of :class:`Sample` (one image, normal or anomalous with its mask files),
sorted by (category, defect, path) so every later seeded step is reproducible. Nothing is decoded
here except the VisA CSV; images and masks are opened by the pairing step.

Layouts:

* ``mvtec`` (MVTec AD): ``<root>/<cat>/train/good/*.png``, ``<root>/<cat>/test/<defect>/*.png``
  (``good`` = normal), ``<root>/<cat>/ground_truth/<defect>/<name>_mask.png``.
* ``visa`` (VisA): ``<root>/split_csv/1cls.csv`` with columns ``object,split,label,image,mask``
  (label ``normal``/``anomaly``; paths relative to ``root``; ``mask`` empty for normals).
* ``loco`` (MVTec LOCO AD): like MVTec AD plus ``validation/good``; masks are folders,
  ``<root>/<cat>/ground_truth/<defect>/<name>/000.png, 001.png, ...`` (one file per region,
  their union is the image's mask).
* ``folder`` (generic): ``<root>/good/*``, ``<root>/<defect>/*``, and
  ``<root>/ground_truth/<defect>/<stem>_mask.<ext>`` or ``<stem>.<ext>``; ``<root>`` is one
  category (named after the folder) or holds several such category folders.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "IMAGE_EXTENSIONS",
    "LAYOUTS",
    "Sample",
    "read_layout",
    "read_mvtec",
    "read_visa",
    "read_loco",
    "read_folder",
]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
LAYOUTS = ("mvtec", "visa", "loco", "folder")
NORMAL = "good"


@dataclass(frozen=True)
class Sample:
    """One image of a dataset.

    ``defect == "good"`` ⇔ normal (``mask_paths`` empty). ``masks_paths`` of an anomalous image are
    unioned. ``split`` is the dataset's own split (``train``/``validation``/``test``), ``source``
    the layout name recorded in the pair records (``mvtec_ad``, ``visa``, ``mvtec_loco``, ``folder``).
    """

    path: Path
    category: str
    defect: str
    split: str
    source: str
    mask_paths: tuple[Path, ...] = field(default=())

    @property
    def is_normal(self) -> bool:
        return self.defect == NORMAL

    @property
    def name(self) -> str:
        return self.path.stem


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _require_dir(root: str | os.PathLike[str]) -> Path:
    """The dataset root as an absolute path: every sample path read under it is absolute, so the
    pairs written from them resolve from anywhere (a relative ``--root`` is relative to the
    current folder, which a pairs file read later knows nothing about)."""
    r = Path(root)
    if not r.is_dir():
        raise FileNotFoundError(f"dataset root not found or not a folder: {r}")
    return r.absolute()


def _select(found: list[str], categories: Iterable[str] | None, root: Path) -> list[str]:
    if categories is None:
        if not found:
            raise ValueError(f"no categories found under {root}")
        return found
    wanted = list(categories)
    missing = [c for c in wanted if c not in found]
    if missing:
        raise ValueError(f"category {missing[0]!r} not found under {root} (found: {found})")
    return wanted


def _check_nonempty(samples: list[Sample], category: str, where: Path) -> None:
    if not samples:
        raise ValueError(f"category {category!r} is empty: no images under {where}")
    if not any(s.is_normal for s in samples):
        raise ValueError(f"category {category!r} has no normal ('good') images under {where}")


def _mvtec_like(
    root: str | os.PathLike[str], categories: Iterable[str] | None, *, loco: bool
) -> list[Sample]:
    r = _require_dir(root)
    source = "mvtec_loco" if loco else "mvtec_ad"
    found = sorted(d.name for d in r.iterdir() if d.is_dir() and ((d / "train").is_dir() or (d / "test").is_dir()))
    out: list[Sample] = []
    for cat in _select(found, categories, r):
        cdir = r / cat
        cat_samples: list[Sample] = []
        normal_splits = ("train", "validation", "test") if loco else ("train", "test")
        for split in normal_splits:
            cat_samples += [Sample(p, cat, NORMAL, split, source) for p in _images(cdir / split / NORMAL)]
        test = cdir / "test"
        defects = sorted(d.name for d in test.iterdir() if d.is_dir() and d.name != NORMAL) if test.is_dir() else []
        for defect in defects:
            for p in _images(test / defect):
                gt = cdir / "ground_truth" / defect
                if loco:
                    mdir = gt / p.stem
                    masks = tuple(_images(mdir))
                    if not masks:
                        raise FileNotFoundError(f"mask folder missing or empty for {p}: expected {mdir}/000.png")
                else:
                    cands = [gt / f"{p.stem}_mask{p.suffix}", gt / f"{p.stem}_mask.png", gt / f"{p.stem}.png"]
                    hit = next((c for c in cands if c.is_file()), None)
                    if hit is None:
                        raise FileNotFoundError(f"mask missing for {p}: expected {cands[0]}")
                    masks = (hit,)
                cat_samples.append(Sample(p, cat, defect, "test", source, masks))
        _check_nonempty(cat_samples, cat, cdir)
        out += cat_samples
    return out


def read_mvtec(root: str | os.PathLike[str], categories: Iterable[str] | None = None) -> list[Sample]:
    """MVTec AD layout (module docstring). ``categories`` restricts and orders; unknown → ValueError."""
    return _mvtec_like(root, categories, loco=False)


def read_loco(root: str | os.PathLike[str], categories: Iterable[str] | None = None) -> list[Sample]:
    """MVTec LOCO AD layout: several mask files per anomalous image (their union is the mask)."""
    return _mvtec_like(root, categories, loco=True)


def read_visa(
    root: str | os.PathLike[str],
    categories: Iterable[str] | None = None,
    *,
    split_csv: str | os.PathLike[str] | None = None,
) -> list[Sample]:
    """VisA layout from its split CSV (default ``<root>/split_csv/1cls.csv``).

    The CSV's ``label`` is ``normal`` or ``anomaly`` (anomalies get ``defect = "anomaly"``: VisA
    names no defect types). Missing columns, unknown labels, a missing image or mask file raise
    errors naming the CSV line or the file.
    """
    r = _require_dir(root)
    csv_path = Path(split_csv) if split_csv is not None else r / "split_csv" / "1cls.csv"
    if not csv_path.is_file():
        raise FileNotFoundError(f"VisA split CSV not found: {csv_path}")
    by_cat: dict[str, list[Sample]] = {}
    with csv_path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        need = {"object", "split", "label", "image", "mask"}
        if reader.fieldnames is None or not need <= set(reader.fieldnames):
            raise ValueError(f"{csv_path}: needs columns {sorted(need)}, has {reader.fieldnames}")
        for lineno, row in enumerate(reader, start=2):
            label = (row["label"] or "").strip().lower()
            if label not in ("normal", "anomaly"):
                raise ValueError(f"{csv_path}:{lineno}: label must be 'normal' or 'anomaly', got {row['label']!r}")
            img = r / row["image"].strip()
            if not img.is_file():
                raise FileNotFoundError(f"{csv_path}:{lineno}: image not found: {img}")
            cat = row["object"].strip()
            if label == "normal":
                s = Sample(img, cat, NORMAL, row["split"].strip(), "visa")
            else:
                mrel = (row["mask"] or "").strip()
                if not mrel:
                    raise ValueError(f"{csv_path}:{lineno}: anomalous image {img} has no mask")
                m = r / mrel
                if not m.is_file():
                    raise FileNotFoundError(f"{csv_path}:{lineno}: mask not found: {m}")
                s = Sample(img, cat, "anomaly", row["split"].strip(), "visa", (m,))
            by_cat.setdefault(cat, []).append(s)
    out: list[Sample] = []
    for cat in _select(sorted(by_cat), categories, r):
        samples = sorted(by_cat[cat], key=lambda s: (s.defect, str(s.path)))
        _check_nonempty(samples, cat, csv_path)
        out += samples
    return out


def _folder_category(cdir: Path, cat: str) -> list[Sample]:
    samples = [Sample(p, cat, NORMAL, "train", "folder") for p in _images(cdir / NORMAL)]
    defects = sorted(d.name for d in cdir.iterdir() if d.is_dir() and d.name not in (NORMAL, "ground_truth"))
    for defect in defects:
        gt = cdir / "ground_truth" / defect
        for p in _images(cdir / defect):
            cands = [gt / f"{p.stem}_mask{p.suffix}", gt / f"{p.stem}_mask.png", gt / f"{p.stem}{p.suffix}", gt / f"{p.stem}.png"]
            hit = next((c for c in cands if c.is_file()), None)
            if hit is None:
                raise FileNotFoundError(f"mask missing for {p}: expected {cands[0]} or {cands[2]}")
            samples.append(Sample(p, cat, defect, "test", "folder", (hit,)))
    _check_nonempty(samples, cat, cdir)
    return samples


def read_folder(root: str | os.PathLike[str], categories: Iterable[str] | None = None) -> list[Sample]:
    """Generic ``good/`` + ``<defect>/`` + ``ground_truth/<defect>/`` layout (module docstring).

    ``<root>`` with a ``good/`` folder is a single category named ``root.name``; otherwise every
    sub-folder with a ``good/`` folder is a category.
    """
    r = _require_dir(root)
    if (r / NORMAL).is_dir():
        found = {r.name: r}
    else:
        found = {d.name: d for d in sorted(r.iterdir()) if d.is_dir() and (d / NORMAL).is_dir()}
    out: list[Sample] = []
    for cat in _select(sorted(found), categories, r):
        out += _folder_category(found[cat], cat)
    return out


def read_layout(layout: str, root: str | os.PathLike[str], categories: Iterable[str] | None = None) -> list[Sample]:
    """Dispatch on ``layout`` in :data:`LAYOUTS`; an unknown layout raises ``ValueError``."""
    readers = {"mvtec": read_mvtec, "visa": read_visa, "loco": read_loco, "folder": read_folder}
    if layout not in readers:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return readers[layout](root, categories)
