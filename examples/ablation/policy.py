"""A compact stochastic box policy: the stand-in for the MLLM in the ablation.

Input: a reference/target pair downsampled to ``res`` × ``res`` (default 64), stacked as 9 channels:
reference RGB, target RGB and |target − reference| RGB, values in [0, 1].

Network: three 3×3 conv blocks (two 2× max-pools) → a 16 × 16 feature map; a 1×1 conv gives a
spatial logit map whose softmax ``p`` is used as attention. The box centre mean is the soft-argmax of
``p``; width, height and the "normal" logit come from a linear layer on the attention-pooled and the
max-pooled features. The attention logits get a prior ``gain · d / max(d)`` with ``d`` the
|difference| averaged over channels and 4×4 cells (``gain`` learned, initially 4): "look where the
images differ", which photometric nuisance makes imperfect. The size means are bounded, ``μ_{2,3} = 3·tanh(raw / 3)``, so that a
saturated sigmoid cannot let them drift without bound. ~15k parameters (width 16).

Action distribution (per prompt, sampled G times):

- ``normal ~ Bernoulli(sigmoid(ℓ))``; a "normal" answer is the zero box ``(0, 0, 0, 0)``.
- otherwise ``z ~ N(μ, diag σ²)`` in R⁴ (σ: a learned, state-independent parameter, clamped to
  [0.02, 1.5]) and the box, reparametrised so that x2 > x1 and y2 > y1 always, in image fractions::

      cx = sigmoid(z0), cy = sigmoid(z1), w = sigmoid(z2), h = sigmoid(z3)
      box = clip((cx − w/2, cy − h/2, cx + w/2, cy + h/2), 0, 1) · (W, H, W, H)

  (cx ∈ (0, 1) and w > 0 keep x1 < x2 after clipping).

``log π(a) = log Bernoulli(normal; ℓ) + (1 − normal) · Σ_d log N(z_d; μ_d, σ_d)``; the Gaussian term is
dropped for "normal" answers because z is then unused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

LOG_STD_MIN = math.log(0.02)
LOG_STD_MAX = math.log(1.5)
SIZE_BOUND = 3.0


@dataclass
class Actions:
    """Sampled actions of B·G completions (batch-first, groups contiguous)."""

    z: torch.Tensor  # (N, 4) Gaussian sample
    normal: torch.Tensor  # (N,) bool

    def splice(self, rows: torch.Tensor, other: "Actions") -> None:
        """Overwrite rows ``rows`` (LongTensor) with ``other``'s rows, in place."""
        self.z[rows] = other.z
        self.normal[rows] = other.normal


class BoxPolicy(nn.Module):
    """Gaussian box policy with a "normal" logit; see the module docstring for the maths."""

    def __init__(self, width: int = 16, res: int = 64, init_std: float = 0.5, normal_bias: float = -2.0):
        super().__init__()
        if res % 4 != 0 or res < 16:
            raise ValueError(f"res must be a multiple of 4 and >= 16, got {res}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        if not 0.02 <= init_std <= 1.5:
            raise ValueError(f"init_std must lie in [0.02, 1.5], got {init_std}")
        c = width
        self.body = nn.Sequential(
            nn.Conv2d(9, c, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c, 2 * c, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * c, 2 * c, 3, padding=1),
            nn.ReLU(),
        )
        self.heat = nn.Conv2d(2 * c, 1, 1)
        self.prior_gain = nn.Parameter(torch.tensor(4.0))  # weight of the |difference| prior
        self.head = nn.Linear(4 * c, 3)  # (z_w, z_h, normal logit)
        self.log_std = nn.Parameter(torch.full((4,), math.log(init_std)))
        with torch.no_grad():
            self.head.bias.copy_(torch.tensor([-1.5, -1.5, normal_bias]))  # boxes ~18 % of the side
        side = res // 4
        grid = (torch.arange(side, dtype=torch.float32) + 0.5) / side
        self.register_buffer("gx", grid.repeat(side), persistent=False)  # (side², ) x of each cell
        self.register_buffer("gy", grid.repeat_interleave(side), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` (B, 9, res, res) → ``mu`` (B, 4), ``log_std`` (4,), ``normal_logit`` (B,)."""
        f = self.body(x)  # (B, C, s, s)
        b, c = f.shape[:2]
        prior = nn.functional.avg_pool2d(x[:, 6:9].mean(1, keepdim=True), 4).flatten(1)  # (B, s²)
        prior = prior / (prior.amax(1, keepdim=True) + 1e-6)
        p = torch.softmax(self.heat(f).flatten(1) + self.prior_gain * prior, dim=1)  # (B, s²)
        cx = (p * self.gx).sum(1).clamp(1e-4, 1 - 1e-4)
        cy = (p * self.gy).sum(1).clamp(1e-4, 1 - 1e-4)
        flat = f.flatten(2)  # (B, C, s²)
        pooled = torch.cat([(flat * p[:, None, :]).sum(2), flat.amax(2)], dim=1)
        out = self.head(pooled)
        size = SIZE_BOUND * torch.tanh(out[:, :2] / SIZE_BOUND)  # bounded: sides in (4.7 %, 95 %) at σ = 0
        mu = torch.stack([torch.logit(cx), torch.logit(cy), size[:, 0], size[:, 1]], dim=1)
        return mu, self.log_std.clamp(LOG_STD_MIN, LOG_STD_MAX), out[:, 2]


def sample_actions(
    mu: torch.Tensor, log_std: torch.Tensor, normal_logit: torch.Tensor, group_size: int, generator: torch.Generator
) -> Actions:
    """Draw ``group_size`` actions per row of ``mu`` (B, 4); rows of the result are grouped contiguously."""
    mu_r = mu.detach().repeat_interleave(group_size, dim=0)
    eps = torch.randn(mu_r.shape, generator=generator, dtype=mu_r.dtype)
    z = mu_r + log_std.detach().exp() * eps
    prob = torch.sigmoid(normal_logit.detach()).repeat_interleave(group_size)
    normal = torch.rand(prob.shape, generator=generator, dtype=prob.dtype) < prob
    return Actions(z=z, normal=normal)


def log_prob(mu: torch.Tensor, log_std: torch.Tensor, normal_logit: torch.Tensor, actions: Actions, group_size: int) -> torch.Tensor:
    """``log π(a)`` (N,) of grouped actions under per-prompt parameters ``mu`` (B, 4), ``normal_logit`` (B,)."""
    mu_r = mu.repeat_interleave(group_size, dim=0)
    logit_r = normal_logit.repeat_interleave(group_size)
    gauss = torch.distributions.Normal(mu_r, log_std.exp()).log_prob(actions.z).sum(-1)
    is_normal = actions.normal.to(mu.dtype)
    bern = -nn.functional.binary_cross_entropy_with_logits(logit_r, is_normal, reduction="none")
    return bern + (1.0 - is_normal) * gauss


def to_boxes(z: torch.Tensor, normal: torch.Tensor, width: torch.Tensor, height: torch.Tensor) -> torch.Tensor:
    """Boxes ``(N, 4)`` in pixels from ``z`` (N, 4) and ``normal`` (N,); ``width``/``height`` (N,)."""
    s = torch.sigmoid(z)
    half_w, half_h = s[:, 2] / 2, s[:, 3] / 2
    frac = torch.stack([s[:, 0] - half_w, s[:, 1] - half_h, s[:, 0] + half_w, s[:, 1] + half_h], dim=1)
    frac = frac.clamp(0.0, 1.0)
    scale = torch.stack([width, height, width, height], dim=1).to(z.dtype)
    boxes = frac * scale
    return torch.where(normal[:, None], torch.zeros_like(boxes), boxes)


def greedy_boxes(mu: torch.Tensor, normal_logit: torch.Tensor, width: torch.Tensor, height: torch.Tensor) -> torch.Tensor:
    """Deterministic answer for evaluation: the zero box if ℓ > 0, else the box of ``z = μ``."""
    return to_boxes(mu, normal_logit > 0, width, height)
