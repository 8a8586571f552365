"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022).

Fitted on normal images only; every test patch is scored by its distance to the nearest patch of a
memory bank of normal patches.

1. **Locally aware patch features.** Two mid-level stages of a pretrained backbone (here
   EfficientNet-Lite0 stages 3 and 5: the ends of its stride-8 and stride-16 levels, the analogue
   of the paper's WideResNet-50 ``layer2`` and ``layer3``). Each stage is averaged over the 3 × 3
   neighbourhood of every position (``avg_pool2d(k=3, stride=1, padding=1)``, border positions
   average their in-image neighbours), the deeper one is upsampled bilinearly to the stride-8 grid
   and the two are concatenated: one ``C``-dimensional feature per stride-8 patch.
2. **Greedy coreset** of the normal patches (:func:`greedy_coreset`, the paper's Algorithm 1):
   start from a random patch, then repeatedly add the patch farthest from the ones chosen so far
   (minimax facility location, k-center greedy), distances measured after a seeded random linear
   projection to 128 dimensions (Johnson–Lindenstrauss); ``coreset_ratio`` = 10 % of the patches
   are kept.
3. **Score.** A test patch's score is the Euclidean distance to its nearest memory-bank patch
   (:func:`nearest_distances`); the stride-8 score grid is upsampled bilinearly to the input size
   and blurred with a Gaussian of σ = 4 pixels. The image score is the maximum of the map (the
   paper's optional re-weighting by the neighbour's local density is not applied).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from differad_rl.eval.backbone import STAGE_CHANNELS, EfficientNetLite0, normalize_images
from differad_rl.eval.feature_maps import stage_features, upsample_and_smooth

__all__ = ["PatchCore", "PatchCoreConfig", "greedy_coreset", "nearest_distances"]


@dataclass(frozen=True)
class PatchCoreConfig:
    """PatchCore options (defaults: the paper's, on EfficientNet-Lite0).

    Attributes:
        image_size: square input side in pixels (images are resized to it).
        stages: backbone stages whose features are used (1-based; (3, 5) = strides 8 and 16).
        neighbourhood: side of the local aggregation window (3).
        coreset_ratio: share of the normal patches kept in the memory bank, in (0, 1] (0.1).
        projection_dim: dimension of the random projection used by the coreset search (128;
            0 = exact distances).
        sigma: Gaussian blur σ of the upsampled map, in input pixels (4).
        seed: seed of the coreset's start point and projection.
    """

    image_size: int = 256
    stages: tuple[int, ...] = (3, 5)
    neighbourhood: int = 3
    coreset_ratio: float = 0.1
    projection_dim: int = 128
    sigma: float = 4.0
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "image_size": self.image_size >= 32,
            "stages": len(self.stages) >= 1 and all(1 <= s <= len(STAGE_CHANNELS) for s in self.stages),
            "neighbourhood": self.neighbourhood >= 1 and self.neighbourhood % 2 == 1,
            "coreset_ratio": 0.0 < self.coreset_ratio <= 1.0,
            "projection_dim": self.projection_dim >= 0,
            "sigma": self.sigma >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"PatchCoreConfig.{name} is invalid: {getattr(self, name)!r}")


def greedy_coreset(
    features: torch.Tensor, ratio: float, projection_dim: int = 128, seed: int = 0
) -> torch.Tensor:
    """Indices of a k-center greedy coreset of ``features`` ``(N, C)``, ``k = max(1, floor(N·ratio))``.

    Start at a seeded random index; then repeatedly take ``argmax_i min_{j ∈ S} ‖z_i − z_j‖`` (ties →
    the lowest index), where ``z = features · P`` with ``P ~ N(0, 1/d)`` of shape ``(C, d)`` when
    ``0 < d = projection_dim < C``, else ``z = features``. Squared distances are computed as
    ``‖z_i‖² − 2 z_i·z_j + ‖z_j‖²`` (one matrix-vector product per step) in the features' dtype.
    Returns ``(k,) int64`` in selection order.
    """
    n = int(features.shape[0])
    if n == 0:
        raise ValueError("greedy_coreset needs at least one feature")
    k = min(n, max(1, int(math.floor(n * ratio))))
    gen = torch.Generator().manual_seed(seed)
    z = features if features.is_floating_point() else features.double()
    if 0 < projection_dim < z.shape[1]:
        proj = torch.randn(z.shape[1], projection_dim, generator=gen, dtype=torch.float64) / math.sqrt(projection_dim)
        z = z @ proj.to(device=z.device, dtype=z.dtype)
    sq = (z * z).sum(dim=1)

    def dist2(i: int) -> torch.Tensor:  # squared distances to z_i (same argmax as the distances)
        return (sq - 2.0 * (z @ z[i]) + sq[i]).clamp_min_(0)

    start = int(torch.randint(n, (1,), generator=gen).item())
    chosen = [start]
    min_d = dist2(start)
    for _ in range(k - 1):
        i = int(torch.argmax(min_d).item())
        chosen.append(i)
        torch.minimum(min_d, dist2(i), out=min_d)
    return torch.tensor(chosen, dtype=torch.int64)


def nearest_distances(queries: torch.Tensor, bank: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """``(M,)`` Euclidean distance of every query ``(M, C)`` to its nearest row of ``bank`` ``(K, C)``."""
    out = torch.empty(queries.shape[0], dtype=queries.dtype, device=queries.device)
    for s in range(0, queries.shape[0], chunk):
        q = queries[s : s + chunk]
        out[s : s + chunk] = torch.cdist(q, bank, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
    return out


class PatchCore:
    """PatchCore on a frozen backbone (see the module docstring): :meth:`fit`, then :meth:`score`."""

    def __init__(self, backbone: EfficientNetLite0, config: PatchCoreConfig | None = None) -> None:
        self.backbone = backbone
        self.config = config if config is not None else PatchCoreConfig()
        self.memory_bank: torch.Tensor | None = None

    def _device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @torch.no_grad()
    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """Locally aware patch features ``(B, C, h, w)`` of images ``(B, 3, S, S)`` in ``[0, 1]``."""
        cfg = self.config
        feats = self.backbone.stages(normalize_images(images.to(self._device())), tuple(cfg.stages))
        p = cfg.neighbourhood
        pooled = [F.avg_pool2d(f, p, stride=1, padding=p // 2, count_include_pad=False) for f in feats]
        return stage_features(pooled, mode="bilinear")

    def fit(self, batches: Iterable[torch.Tensor]) -> PatchCore:
        """Memory bank = greedy coreset of the patch features of every normal image in ``batches``."""
        feats = [self.patch_features(b) for b in batches if b.shape[0]]
        if not feats:
            raise ValueError("PatchCore.fit needs at least one normal image")
        flat = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]) for f in feats])
        idx = greedy_coreset(flat, self.config.coreset_ratio, self.config.projection_dim, self.config.seed)
        self.memory_bank = flat[idx.to(flat.device)].contiguous()
        return self

    def score(self, images: torch.Tensor) -> np.ndarray:
        """Anomaly maps ``(B, S, S) float32`` of images ``(B, 3, S, S)`` (higher = more anomalous)."""
        if self.memory_bank is None:
            raise RuntimeError("PatchCore.score called before fit")
        f = self.patch_features(images)
        b, c, h, w = f.shape
        d = nearest_distances(f.permute(0, 2, 3, 1).reshape(-1, c), self.memory_bank).reshape(b, h, w)
        return upsample_and_smooth(d, self.config.image_size, self.config.sigma)
