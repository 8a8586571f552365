"""PaDiM (Defard et al., "PaDiM: a Patch Distribution Modeling Framework for Anomaly Detection and
Localization", ICPR workshops 2021).

Fitted on normal images only; every patch position has its own multivariate Gaussian.

1. **Embedding.** Three stages of a pretrained backbone (here EfficientNet-Lite0 stages 2, 3 and 5:
   strides 4, 8 and 16, the analogue of the paper's ResNet ``layer1``–``layer3``), the deeper ones
   upsampled (nearest) to the stride-4 grid and concatenated (24 + 40 + 112 = 176 channels), then a
   seeded **random subset** of ``dims`` channels (100, the paper's choice for ResNet-18) — the same
   subset for every category.
2. **Fit.** At every position ``(i, j)`` of the grid, over the N normal images:
   ``μ_ij = mean x_ij``, ``Σ_ij = (1 / (N − 1)) Σ_n (x_ij − μ_ij)(x_ij − μ_ij)ᵀ + ε·I`` with ε = 0.01
   (for N = 1 the sample covariance is taken as 0, leaving ``ε·I``). The inverses are stored.
3. **Score.** ``M(x_ij) = sqrt((x_ij − μ_ij)ᵀ Σ_ij⁻¹ (x_ij − μ_ij))``, upsampled bilinearly to the
   input size and blurred with a Gaussian of σ = 4 pixels; the image score is the map's maximum.

Memory: the inverse covariances take ``(S / 4)² · dims² · 4`` bytes (164 MB at S = 256, dims = 100).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from differad_rl.eval.backbone import STAGE_CHANNELS, EfficientNetLite0, normalize_images
from differad_rl.eval.feature_maps import stage_features, upsample_and_smooth

__all__ = ["Padim", "PadimConfig", "fit_gaussians", "mahalanobis"]


@dataclass(frozen=True)
class PadimConfig:
    """PaDiM options (defaults: the paper's, on EfficientNet-Lite0).

    Attributes:
        image_size: square input side in pixels (images are resized to it).
        stages: backbone stages concatenated (1-based; (2, 3, 5) = strides 4, 8, 16).
        dims: size of the random channel subset (100; at most the stages' total channels).
        eps: covariance regulariser ε (0.01).
        sigma: Gaussian blur σ of the upsampled map, in input pixels (4).
        seed: seed of the channel subset.
    """

    image_size: int = 256
    stages: tuple[int, ...] = (2, 3, 5)
    dims: int = 100
    eps: float = 0.01
    sigma: float = 4.0
    seed: int = 0

    def __post_init__(self) -> None:
        valid_stages = len(self.stages) >= 1 and all(1 <= s <= len(STAGE_CHANNELS) for s in self.stages)
        total = sum(STAGE_CHANNELS[s - 1] for s in self.stages) if valid_stages else 0
        checks = {
            "image_size": self.image_size >= 32,
            "stages": valid_stages,
            "dims": 1 <= self.dims <= total,
            "eps": self.eps > 0,
            "sigma": self.sigma >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"PadimConfig.{name} is invalid: {getattr(self, name)!r}")


def fit_gaussians(embeddings: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position mean ``(P, d)`` and inverse regularised covariance ``(P, d, d)`` of ``(N, P, d)``.

    ``Σ_p = Xcᵀ Xc / max(N − 1, 1) + eps·I`` with ``Xc`` the centred ``(N, d)`` samples at position p;
    computed in float64 (inverse through the Cholesky factor), returned in the input's dtype.
    """
    n = embeddings.shape[0]
    if n == 0:
        raise ValueError("PaDiM needs at least one normal image")
    x = embeddings.double()
    mean = x.mean(dim=0)
    xc = (x - mean).permute(1, 0, 2)  # (P, N, d)
    cov = xc.transpose(1, 2) @ xc / max(n - 1, 1)
    cov += eps * torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    inv = torch.cholesky_inverse(torch.linalg.cholesky(cov))  # Σ is SPD (ε > 0); 2-8x faster than inv
    return mean.to(embeddings.dtype), inv.to(embeddings.dtype)


def mahalanobis(embeddings: torch.Tensor, mean: torch.Tensor, inv_cov: torch.Tensor) -> torch.Tensor:
    """``(B, P)`` distances ``sqrt((x − μ_p)ᵀ Σ_p⁻¹ (x − μ_p))`` of ``(B, P, d)`` embeddings."""
    diff = (embeddings - mean).transpose(0, 1)  # (P, B, d)
    q = (torch.bmm(diff, inv_cov) * diff).sum(dim=-1).transpose(0, 1)
    return q.clamp_min(0).sqrt()


class Padim:
    """PaDiM on a frozen backbone (see the module docstring): :meth:`fit`, then :meth:`score`."""

    def __init__(self, backbone: EfficientNetLite0, config: PadimConfig | None = None) -> None:
        self.backbone = backbone
        self.config = config if config is not None else PadimConfig()
        total = sum(STAGE_CHANNELS[s - 1] for s in self.config.stages)
        gen = torch.Generator().manual_seed(self.config.seed)
        self.channels = torch.randperm(total, generator=gen)[: self.config.dims].sort().values
        self.mean: torch.Tensor | None = None
        self.inv_cov: torch.Tensor | None = None
        self.grid: tuple[int, int] | None = None

    @torch.no_grad()
    def embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, h·w, dims)`` embeddings of images ``(B, 3, S, S)`` in ``[0, 1]``; sets :attr:`grid`."""
        device = next(self.backbone.parameters()).device
        feats = self.backbone.stages(normalize_images(images.to(device)), tuple(self.config.stages))
        e = stage_features(feats, mode="nearest")[:, self.channels.to(device)]
        b, d, h, w = e.shape
        self.grid = (h, w)
        return e.permute(0, 2, 3, 1).reshape(b, h * w, d)

    def fit(self, batches: Iterable[torch.Tensor]) -> Padim:
        """Per-position Gaussians of the normal images in ``batches``."""
        embs = [self.embeddings(b) for b in batches if b.shape[0]]
        if not embs:
            raise ValueError("Padim.fit needs at least one normal image")
        self.mean, self.inv_cov = fit_gaussians(torch.cat(embs), self.config.eps)
        return self

    def score(self, images: torch.Tensor) -> np.ndarray:
        """Anomaly maps ``(B, S, S) float32`` of images ``(B, 3, S, S)`` (higher = more anomalous)."""
        if self.mean is None or self.inv_cov is None:
            raise RuntimeError("Padim.score called before fit")
        e = self.embeddings(images)
        assert self.grid is not None
        d = mahalanobis(e, self.mean, self.inv_cov).reshape(e.shape[0], *self.grid)
        return upsample_and_smooth(d, self.config.image_size, self.config.sigma)
