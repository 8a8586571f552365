"""Cold start: a short supervised fit of the policy's means before RL (docs/method.md §1, phase 1).

The method fine-tunes the MLLM on "spot the difference" pairs before GRPO; the stand-in does the
same in miniature, so that RL starts from a policy that roughly knows where to look (and the arms
differ in what they do with near misses rather than in escaping a random start). Loss per batch::

    L = mean_anomalous |box(μ) − gt| / (W, H)  +  BCE(ℓ, normal)

(L1 on image-fraction corner coordinates of the greedy box; the normal logit fit to the normal
label). σ is not trained here; it starts at its initial value in every RL arm. One cold start per
seed is shared by all arms of that seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pairs import PairTensors
from policy import BoxPolicy, to_boxes


@dataclass(frozen=True)
class ColdStartConfig:
    """``steps`` Adam steps of ``batch`` pairs at learning rate ``lr`` (0 steps: no cold start)."""

    steps: int = 150
    batch: int = 32
    lr: float = 3e-3

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def cold_start(policy: BoxPolicy, train: PairTensors, cfg: ColdStartConfig, seed: int) -> dict[str, torch.Tensor]:
    """Fit ``policy`` in place and return a copy of its ``state_dict``."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    params = [p for n, p in policy.named_parameters() if n != "log_std"]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    scale = torch.stack([train.width, train.height, train.width, train.height], dim=1)
    target = train.gt / scale
    for _ in range(cfg.steps):
        i = torch.randint(0, len(train), (cfg.batch,), generator=gen)
        mu, _, nl = policy(train.images[i])
        ones = torch.ones(cfg.batch)
        box = to_boxes(mu, torch.zeros(cfg.batch, dtype=torch.bool), ones, ones)
        anomalous = ~train.normal[i]
        l1 = ((box - target[i]).abs().mean(dim=1) * anomalous).sum() / anomalous.sum().clamp(min=1)
        bce = nn.functional.binary_cross_entropy_with_logits(nl, train.normal[i].float())
        loss = l1 + bce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in policy.state_dict().items()}
