"""Coordinate spaces of the Qwen-VL families, and exact conversions between them.

Ground truth is stored in pixels of the *original* target image, together with that image's size.
A reward must compare prediction and ground truth in the space the model writes, which depends on
the model family:

============  ==============================================================================
space         what the model writes
============  ==============================================================================
``pixel``     pixels of the original image (no conversion)
``qwen2_vl``  integers 0..1000 relative to the image: ``x' = round(x / W * 1000)``
``qwen3_vl``  the same relative 0..1000 grid as Qwen2-VL
``qwen2_5_vl`` absolute pixels of the image *after* :func:`smart_resize` (the size the processor
              actually fed the model): ``x' = round(x * W' / W)``
============  ==============================================================================

The names equal transformers' ``config.model_type``. Boxes are ``(x1, y1, x2, y2)`` in the last
dimension of a numpy array or torch tensor of any batch shape; ``width`` and ``height`` are scalars
or arrays broadcastable to ``boxes.shape[:-1]``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal, TypeVar

import numpy as np
import torch

Space = Literal["pixel", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
SPACES: tuple[Space, ...] = ("pixel", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")
RELATIVE_SPACES: frozenset[str] = frozenset({"qwen2_vl", "qwen3_vl"})
RELATIVE_SCALE = 1000.0

# transformers' Qwen2VLImageProcessor defaults: size={"shortest_edge": 56*56, "longest_edge": 28*28*1280}.
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280
DEFAULT_FACTOR = 28  # patch size 14 x spatial merge 2 (Qwen2-VL / Qwen2.5-VL)

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def check_space(space: str) -> Space:
    """Return ``space`` if it is a known coordinate space, else raise ``ValueError`` naming it."""
    if space not in SPACES:
        raise ValueError(f"space={space!r} is not a known coordinate space; expected one of {SPACES}")
    return space


def space_for_model(name: str) -> str:
    """Coordinate space of a model, from its hub name, path or ``config.model_type``.

    >>> space_for_model("Qwen/Qwen2.5-VL-3B-Instruct")
    'qwen2_5_vl'
    >>> space_for_model("qwen3_vl")
    'qwen3_vl'
    """
    key = str(name).lower().replace("-", "_").replace(".", "_")
    for space, needles in (
        ("qwen2_5_vl", ("qwen2_5_vl",)),
        ("qwen3_vl", ("qwen3_vl",)),
        ("qwen2_vl", ("qwen2_vl",)),
    ):
        if any(n in key for n in needles):
            return space
    if key in SPACES:
        return key
    raise ValueError(
        f"model={name!r}: cannot tell its coordinate space; pass space= explicitly, one of {SPACES}"
    )


def smart_resize(
    height: int,
    width: int,
    factor: int = DEFAULT_FACTOR,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[int, int]:
    """Size ``(height, width)`` the Qwen2-VL / Qwen2.5-VL processor resizes an image to.

    Both sides become multiples of ``factor``, the pixel count lands in ``[min_pixels, max_pixels]``
    and the aspect ratio is kept as closely as possible. This is transformers' algorithm verbatim
    (Python's ``round`` rounds halves to even).

    Raises:
        ValueError: a non-positive side, or an aspect ratio above 200 (the processor refuses it too).
    """
    if not (height > 0 and width > 0):
        raise ValueError(f"image size must be positive, got height={height!r}, width={width!r}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be at most 200, got height={height}, width={width}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def smart_resize_array(
    height: np.ndarray | float,
    width: np.ndarray | float,
    factor: int = DEFAULT_FACTOR,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised :func:`smart_resize` over arrays of sizes; equal to it element by element."""
    h = np.asarray(height, dtype=np.float64)
    w = np.asarray(width, dtype=np.float64)
    h, w = np.broadcast_arrays(h, w)
    if np.any(~(h > 0)) or np.any(~(w > 0)):
        raise ValueError("image size must be positive: got a height or width <= 0 or NaN")
    if np.any(np.maximum(h, w) / np.minimum(h, w) > 200):
        raise ValueError("absolute aspect ratio must be at most 200")
    h_bar = np.round(h / factor) * factor
    w_bar = np.round(w / factor) * factor
    big = h_bar * w_bar > max_pixels
    small = (h_bar * w_bar < min_pixels) & ~big
    beta_big = np.sqrt((h * w) / max_pixels)
    beta_small = np.sqrt(min_pixels / (h * w))
    h_out = np.where(big, np.maximum(factor, np.floor(h / beta_big / factor) * factor), h_bar)
    w_out = np.where(big, np.maximum(factor, np.floor(w / beta_big / factor) * factor), w_bar)
    h_out = np.where(small, np.ceil(h * beta_small / factor) * factor, h_out)
    w_out = np.where(small, np.ceil(w * beta_small / factor) * factor, w_out)
    return h_out.astype(np.int64), w_out.astype(np.int64)


def _sizes(
    width: Any, height: Any, space: str, factor: int, min_pixels: int, max_pixels: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-sample original size ``(W, H)`` and the size ``(W', H')`` of the model's space."""
    w = np.asarray(width.cpu() if isinstance(width, torch.Tensor) else width, dtype=np.float64)
    h = np.asarray(height.cpu() if isinstance(height, torch.Tensor) else height, dtype=np.float64)
    if np.any(~np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"width must be positive and finite, got {width!r}")
    if np.any(~np.isfinite(h)) or np.any(h <= 0):
        raise ValueError(f"height must be positive and finite, got {height!r}")
    w, h = np.broadcast_arrays(w, h)
    if space == "pixel":
        return w, h, w, h
    if space in RELATIVE_SPACES:
        full = np.full(w.shape, RELATIVE_SCALE)
        return w, h, full, full
    rh, rw = smart_resize_array(h, w, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return w, h, rw.astype(np.float64), rh.astype(np.float64)


def _apply(boxes: Any, sizes: tuple[np.ndarray, ...], space: str, inverse: bool, rnd: bool) -> Any:
    """Scale ``boxes`` between the original image and ``space`` in the documented order of operations:
    ``x / W * 1000`` for the relative spaces (as ``round(x / W * 1000)`` is written) and
    ``x * W' / W`` for ``qwen2_5_vl``; inverses ``x' * W / 1000`` and ``x' * W / W'``. The order
    matters at exact ``.5`` ties, which then round (half to even) as the formula says."""
    if boxes.shape[-1:] != (4,):
        raise ValueError(f"boxes must have shape (..., 4), got shape {tuple(boxes.shape)}")
    w, h, mw, mh = sizes
    orig = np.stack([w, h, w, h], axis=-1)
    model = np.stack([mw, mh, mw, mh], axis=-1)
    is_tensor = isinstance(boxes, torch.Tensor)
    dtype: Any
    orig_t: Any
    model_t: Any
    out: Any  # a tensor or an array, as ``boxes``
    if is_tensor:
        dtype = boxes.dtype if boxes.is_floating_point() else torch.float64
        orig_t = torch.as_tensor(orig, dtype=torch.float64, device=boxes.device)
        model_t = torch.as_tensor(model, dtype=torch.float64, device=boxes.device)
        out = boxes.to(torch.float64)
    else:
        arr = np.asarray(boxes)
        dtype = arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.float64
        orig_t, model_t = orig, model
        out = arr.astype(np.float64)
    if space != "pixel":
        if inverse:
            out = out * orig_t / model_t
        elif space in RELATIVE_SPACES:
            out = out / orig_t * model_t
        else:
            out = out * model_t / orig_t
    if rnd:
        out = torch.round(out) if is_tensor else np.round(out)
    return out.to(dtype) if is_tensor else out.astype(dtype)


def _as_array(boxes: Any) -> np.ndarray | torch.Tensor:
    if isinstance(boxes, (np.ndarray, torch.Tensor)):
        return boxes
    return np.asarray(boxes, dtype=np.float64)


def to_model_space(
    boxes: Any,
    width: Any,
    height: Any,
    space: Space,
    *,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    factor: int = DEFAULT_FACTOR,
    round: bool = True,  # noqa: A002 - mirrors the math: the model writes integers
) -> Any:
    """Convert boxes from original-image pixels to the coordinates ``space``'s model writes.

    ``x' = x / W * 1000`` (relative spaces) or ``x' = x * W' / W`` (``qwen2_5_vl``, ``(W', H')`` the
    :func:`smart_resize` size), computed in that order so that exact ``.5`` ties round as
    ``round(x / W * 1000)`` does (half to even); ``pixel`` is the identity. Rounded to integers when
    ``round`` (as the model writes them; :func:`to_model_grid` also keeps every box a box). The zero
    box stays the zero box. Floats keep their dtype; integers become float64.

    Raises:
        ValueError: unknown ``space``, a non-positive or non-finite size, boxes not shaped (..., 4).
    """
    check_space(space)
    arr = _as_array(boxes)
    sizes = _sizes(width, height, space, factor, min_pixels, max_pixels)
    return _apply(arr, sizes, space, inverse=False, rnd=round and space != "pixel")


def from_model_space(
    boxes: Any,
    width: Any,
    height: Any,
    space: Space,
    *,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    factor: int = DEFAULT_FACTOR,
    round: bool = False,  # noqa: A002
) -> Any:
    """Inverse of :func:`to_model_space`: a model's boxes back to original-image pixels.

    ``from_model_space(to_model_space(b, ..., round=False), ...) == b`` up to float rounding; with
    the default integer grid the round trip is exact up to half a grid cell (``W / 1000`` pixels
    for the relative spaces, ``W / W'`` for ``qwen2_5_vl``).
    """
    check_space(space)
    arr = _as_array(boxes)
    sizes = _sizes(width, height, space, factor, min_pixels, max_pixels)
    return _apply(arr, sizes, space, inverse=True, rnd=round)


def snap_to_grid(boxes: ArrayT) -> ArrayT:
    """Round boxes to the integer grid, keeping every non-degenerate box non-degenerate.

    Each coordinate is rounded (half to even, as :func:`to_model_space`); a side that would shrink to
    zero length becomes the one grid cell holding its centre, ``[floor(c), floor(c) + 1]``. The zero
    box stays the zero box; degenerate input stays as rounded.
    """
    if isinstance(boxes, torch.Tensor):
        t = boxes if boxes.is_floating_point() else boxes.to(torch.float64)
        r = torch.round(t)
        for lo, hi in ((0, 2), (1, 3)):
            collapsed = (r[..., hi] <= r[..., lo]) & (t[..., hi] > t[..., lo])
            cell = torch.floor((t[..., lo] + t[..., hi]) / 2)
            r[..., lo] = torch.where(collapsed, cell, r[..., lo])
            r[..., hi] = torch.where(collapsed, cell + 1, r[..., hi])
        return r
    a = np.asarray(boxes)
    a = a if np.issubdtype(a.dtype, np.floating) else a.astype(np.float64)
    r = np.round(a)
    for lo, hi in ((0, 2), (1, 3)):
        collapsed = (r[..., hi] <= r[..., lo]) & (a[..., hi] > a[..., lo])
        cell = np.floor((a[..., lo] + a[..., hi]) / 2)
        r[..., lo] = np.where(collapsed, cell, r[..., lo])
        r[..., hi] = np.where(collapsed, cell + 1, r[..., hi])
    return r


def to_model_grid(
    boxes: Any,
    width: Any,
    height: Any,
    space: Space,
    *,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    factor: int = DEFAULT_FACTOR,
) -> Any:
    """Ground truth in original pixels → the integer grid ``space``'s model writes (docs/method.md §3).

    :func:`to_model_space` then :func:`snap_to_grid` (``pixel``: unchanged). This is what the
    rewards compare against, so the best answer a model can write (integers in its space) scores
    exactly 1; a tiny box that would round to zero width or height keeps one grid cell.
    """
    out = to_model_space(boxes, width, height, space, min_pixels=min_pixels, max_pixels=max_pixels,
                         factor=factor, round=False)
    return out if space == "pixel" else snap_to_grid(out)


@functools.lru_cache(maxsize=4096)
def model_size(
    width: float,
    height: float,
    space: Space,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    factor: int = DEFAULT_FACTOR,
) -> tuple[float, float]:
    """``(W', H')`` of ``space`` for an original image of ``width × height`` (cached; scalar).

    ``(W, H)`` for ``pixel``, ``(1000, 1000)`` for the relative spaces, the :func:`smart_resize` size
    for ``qwen2_5_vl``.

    Raises:
        ValueError: unknown ``space`` or a non-positive / non-finite size.
    """
    check_space(space)
    w, h = float(width), float(height)
    if not (math.isfinite(w) and w > 0 and math.isfinite(h) and h > 0):
        raise ValueError(f"image size must be positive and finite, got width={width!r}, height={height!r}")
    if space == "pixel":
        return w, h
    if space in RELATIVE_SPACES:
        return RELATIVE_SCALE, RELATIVE_SCALE
    rh, rw = smart_resize_array(np.float64(h), np.float64(w), factor=factor, min_pixels=min_pixels,
                                max_pixels=max_pixels)
    return float(rw), float(rh)


def box_to_model_grid(
    box: tuple[float, float, float, float], width: float, height: float, space: Space,
    min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS, factor: int = DEFAULT_FACTOR,
) -> tuple[float, float, float, float]:
    """Scalar :func:`to_model_grid` of one box (pure Python, the same arithmetic in the same order)."""
    if space == "pixel":
        return box
    mw, mh = model_size(width, height, space, min_pixels, max_pixels, factor)
    w, h = float(width), float(height)
    if space in RELATIVE_SPACES:
        c = (box[0] / w * mw, box[1] / h * mh, box[2] / w * mw, box[3] / h * mh)
    else:
        c = (box[0] * mw / w, box[1] * mh / h, box[2] * mw / w, box[3] * mh / h)
    r = [float(round(v)) for v in c]
    for lo, hi in ((0, 2), (1, 3)):
        if r[hi] <= r[lo] and c[hi] > c[lo]:
            r[lo] = float(math.floor((c[lo] + c[hi]) / 2))
            r[hi] = r[lo] + 1.0
    return (r[0], r[1], r[2], r[3])
