"""Shared plumbing of the feature-based anomaly-map methods (PatchCore, PaDiM).

* :func:`load_images` — image files → one ``(B, 3, S, S)`` float tensor in ``[0, 1]`` (every image
  resized to the square input side ``S``, bilinear; the maps are later boxed at this resolution and
  the boxes scaled back to each target's own pixels);
* :func:`stage_features` — backbone stage outputs resized to a common grid and concatenated;
* :func:`upsample_and_smooth` — patch scores ``(B, h, w)`` → anomaly maps ``(B, S, S)``: bilinear
  upsampling to the input size, then a Gaussian blur with σ = 4 input pixels, the post-processing
  both papers use.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from scipy import ndimage
from torch.nn import functional as F

__all__ = ["load_images", "stage_features", "upsample_and_smooth"]


def _read(path: str, size: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as opened:
            im = opened.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.float32) / 255.0
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from None


def load_images(paths: Sequence[str], size: int, workers: int = 2) -> torch.Tensor:
    """``(len(paths), 3, size, size) float32`` RGB in ``[0, 1]`` (threads decode the files)."""
    if size < 1:
        raise ValueError(f"image size must be >= 1, got {size}")
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        arrays = list(pool.map(lambda p: _read(p, size), paths))
    if not arrays:
        return torch.zeros((0, 3, size, size), dtype=torch.float32)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def stage_features(features: Sequence[torch.Tensor], mode: str = "bilinear") -> torch.Tensor:
    """Resize every ``(B, C_i, h_i, w_i)`` map to the first one's ``(h, w)`` and concatenate channels.

    ``mode``: ``"bilinear"`` (PatchCore) or ``"nearest"`` (PaDiM). Returns ``(B, ΣC_i, h, w)``.
    """
    h, w = features[0].shape[-2:]
    out = [features[0]]
    for f in features[1:]:
        if f.shape[-2:] != (h, w):
            f = F.interpolate(f, size=(h, w), mode=mode, align_corners=False if mode == "bilinear" else None)
        out.append(f)
    return torch.cat(out, dim=1)


def upsample_and_smooth(scores: torch.Tensor, size: int, sigma: float) -> np.ndarray:
    """Patch scores ``(B, h, w)`` → ``(B, size, size) float32`` maps.

    Bilinear upsampling (``align_corners=False``) to ``size × size``, then a Gaussian blur of standard
    deviation ``sigma`` input pixels on each map (truncated at 4σ, reflected borders; σ = 0 skips it).
    """
    up = F.interpolate(scores[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    maps = up.cpu().numpy().astype(np.float32, copy=False)
    if sigma > 0:
        maps = ndimage.gaussian_filter(maps, sigma=(0.0, sigma, sigma), mode="reflect", truncate=4.0)
    return maps
