"""Masks → boxes by connected components, and mask file loading.

Box convention (same as the records): ``[x1, y1, x2, y2]`` in pixels with **exclusive** right and
bottom edges — a component covering columns ``c0..c1`` and rows ``r0..r1`` (inclusive) gives
``x1 = c0, y1 = r0, x2 = c1 + 1, y2 = r1 + 1``. So a one-pixel component at (row 3, col 5) is
``[5, 3, 6, 4]`` and a full ``H × W`` mask is ``[0, 0, W, H]``; box width = ``x2 - x1`` = number of
covered columns.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

__all__ = ["mask_to_boxes", "largest_component", "load_mask", "union_masks", "check_mask_size"]

BoxMode = Literal["largest", "all"]


def mask_to_boxes(
    mask: np.ndarray,
    mode: BoxMode = "all",
    *,
    connectivity: int = 2,
    min_area: int = 1,
) -> list[list[int]]:
    """Boxes of the connected components of a 2-D mask.

    Args:
        mask: ``(H, W)`` array; nonzero / ``True`` pixels are foreground.
        mode: ``"all"`` — one box per component; ``"largest"`` — only the first of those (a list of
            length ≤ 1).
        connectivity: 2 = 8-connected (diagonal neighbours join, the default: a diagonal scratch is
            one defect), 1 = 4-connected.
        min_area: components with fewer foreground pixels are dropped (noise specks).

    Returns:
        ``[[x1, y1, x2, y2], ...]`` Python ints, exclusive x2/y2 (module docstring), sorted by box
        area descending, ties by pixel count descending, then by ``(y1, x1)``. An empty mask → ``[]``.
        Boxes of different components may overlap (e.g. a ring around a dot).
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {m.shape}")
    if mode not in ("largest", "all"):
        raise ValueError(f"mode must be 'largest' or 'all', got {mode!r}")
    boxes, _ = _components(m, connectivity, min_area)
    if mode == "largest":
        boxes = boxes[:1]
    return boxes.tolist()


def _components(m: np.ndarray, connectivity: int, min_area: int) -> tuple[np.ndarray, np.ndarray]:
    """(boxes (K, 4) int64 in :func:`mask_to_boxes` order, their label ids (K,))."""
    _, boxes, ids = _label(m, connectivity, min_area)
    return boxes, ids


def _label(m: np.ndarray, connectivity: int, min_area: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from scipy import ndimage

    if connectivity not in (1, 2):
        raise ValueError(f"connectivity must be 1 or 2, got {connectivity!r}")
    fg = m.astype(bool, copy=False)
    empty = np.zeros((0, 4), dtype=np.int64)
    if not fg.any():
        return np.zeros(fg.shape, dtype=np.int32), empty, np.zeros(0, dtype=np.int64)
    structure = ndimage.generate_binary_structure(2, connectivity)
    labels, n = ndimage.label(fg, structure=structure)
    slices = ndimage.find_objects(labels)
    counts = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    boxes = np.array([[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in slices], dtype=np.int64)
    ids = np.arange(1, n + 1)
    keep = counts >= min_area
    boxes, counts, ids = boxes[keep], counts[keep], ids[keep]
    if len(boxes) == 0:
        return labels, empty, np.zeros(0, dtype=np.int64)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    order = np.lexsort((boxes[:, 0], boxes[:, 1], -counts, -areas))
    return labels, boxes[order], ids[order]


def largest_component(mask: np.ndarray, *, connectivity: int = 2) -> np.ndarray:
    """Bool mask of the single component ``mask_to_boxes(mask, "largest")`` boxes (all-False if empty)."""
    m = np.asarray(mask)
    labels, boxes, ids = _label(m, connectivity, 1)
    if len(ids) == 0:
        return np.zeros(m.shape, dtype=bool)
    return labels == ids[0]


def check_mask_size(mask: np.ndarray, image_size: tuple[int, int], mask_path: str | os.PathLike[str]) -> None:
    """Raise ``ValueError`` naming ``mask_path`` when ``mask`` (H, W) is not ``image_size`` = (W, H)."""
    h, w = mask.shape[:2]
    if (w, h) != tuple(image_size):
        raise ValueError(
            f"mask {mask_path} is {w}x{h} but its image is {image_size[0]}x{image_size[1]} (width x height)"
        )


def load_mask(path: str | os.PathLike[str], image_size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a mask image as a bool ``(H, W)`` array (any nonzero channel value is foreground).

    ``image_size = (width, height)`` checks the size and raises ``ValueError`` naming the file on a
    mismatch. A missing or unreadable file raises ``FileNotFoundError`` / ``ValueError`` naming it.
    """
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"mask file not found: {p}")
    try:
        with Image.open(p) as im:
            im.load()
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"corrupt or unreadable mask {p}: {exc}") from None
    if arr.ndim == 3:
        arr = np.asarray(arr.any(axis=2))
    mask = arr.astype(bool)
    if image_size is not None:
        check_mask_size(mask, image_size, p)
    return mask


def union_masks(
    paths: Sequence[str | os.PathLike[str]], image_size: tuple[int, int] | None = None
) -> np.ndarray:
    """Logical OR of several mask files (MVTec LOCO stores one file per defect region).

    All masks must share one size (and equal ``image_size`` when given); ``ValueError`` names the
    first file that differs. An empty ``paths`` raises ``ValueError``.
    """
    if not paths:
        raise ValueError("union_masks needs at least one mask path")
    out: np.ndarray | None = None
    for p in paths:
        m = load_mask(p)
        if image_size is None:
            image_size = (m.shape[1], m.shape[0])
        check_mask_size(m, image_size, p)
        out = m if out is None else (out | m)
    assert out is not None
    return out
