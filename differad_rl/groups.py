"""Group-relative algorithms of the method: advantages, difficulty weights, degenerate groups.

Pure torch, vectorised, dtype and device preserving (integer input is upcast to float64). Two
layouts are supported:

* contiguous groups (TRL): a 1-D tensor of length ``groups × group_size`` ordered
  ``[g0 s0, g0 s1, …, g1 s0, …]``, functions taking ``group_size``;
* arbitrary group ids (veRL's per-sample ``uid``): the ``*_by_id`` functions take an integer id per
  sample (``np.unique(uids, return_inverse=True)[1]`` turns veRL's string uids into ids).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

Scale = Literal["group", "batch", "none"]
Scope = Literal["group", "batch"]
SCALES: tuple[Scale, ...] = ("group", "batch", "none")
SCOPES: tuple[Scope, ...] = ("group", "batch")
MAX_WEIGHT = (math.e + math.sqrt(2.0)) / 2  # ω at α = 0, β = 1


def as_rewards(x: Any, name: str = "rewards") -> Tensor:
    """``x`` as a 1-D floating tensor: tensors and numpy float arrays keep their dtype; integers,
    booleans and Python lists (of ints or floats alike) become float64."""
    if isinstance(x, Tensor):
        t = x
    elif isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.floating):
        t = torch.from_numpy(x)
    else:
        t = torch.as_tensor(np.asarray(x, dtype=np.float64))
    if not t.is_floating_point():
        t = t.to(torch.float64)
    if t.ndim != 1:
        raise ValueError(f"{name} must be a 1-D tensor (one value per completion), got shape {tuple(t.shape)}")
    return t


_rewards = as_rewards


def check_group_size(group_size: Any) -> int:
    """``group_size`` as an ``int`` (numpy integers accepted); raises unless a positive integer."""
    if isinstance(group_size, (bool, np.bool_)) or not isinstance(group_size, numbers.Integral) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    return int(group_size)


def _grouped(x: Any, group_size: int, name: str) -> Tensor:
    t = _rewards(x, name)
    group_size = check_group_size(group_size)
    if t.numel() % group_size:
        raise ValueError(
            f"{name} has length {t.numel()}, which is not a multiple of group_size={group_size}"
        )
    return t.view(-1, group_size)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not known; expected one of {choices}")


def _raw_ids(group_ids: Any, n: int) -> Tensor:
    ids = group_ids if isinstance(group_ids, Tensor) else torch.as_tensor(group_ids)
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.ndim != 1:
        raise ValueError(f"group_ids must be a 1-D integer tensor, got dtype {ids.dtype} shape {tuple(ids.shape)}")
    if ids.numel() != n:
        raise ValueError(f"group_ids has length {ids.numel()} but rewards has length {n}")
    if n and int(ids.min()) < 0:
        raise ValueError(f"group_ids must be >= 0, got {int(ids.min())}")
    return ids.long()


def _ids(group_ids: Any, n: int) -> tuple[Tensor, int]:
    """Dense ids ``0..k-1`` and ``k``. Ids already dense enough (max < 2n + 64) are used as given;
    sparse ones (hashed uids near 2^40, 10^7 for a batch of thousands) are compacted with
    ``torch.unique``, so memory and time follow the batch, not the largest id."""
    ids = _raw_ids(group_ids, n)
    if not n:
        return ids, 0
    top = int(ids.max()) + 1
    if top <= 2 * n + 64:
        return ids, top
    uniq, inverse = torch.unique(ids, return_inverse=True)
    return inverse, int(uniq.numel())


def group_advantages(rewards: Any, group_size: int, scale: Scale = "group", eps: float = 1e-4) -> Tensor:
    """Group-relative advantages ``A_i = (r_i − mean_g) / (std_g + eps)``.

    Args:
        rewards: ``(groups × group_size,)`` summed rewards, groups contiguous.
        group_size: completions per prompt ``G``.
        scale: ``"group"`` divides by the group's std (Bessel-corrected, the original's choice),
            ``"batch"`` by the whole batch's std (TRL's ``scale_rewards="batch"``), ``"none"``
            only centres (Dr. GRPO).
        eps: added to the std.

    Returns:
        ``(N,)`` advantages; they sum to 0 in every group and are exactly 0 (never NaN) in a group
        whose rewards are all equal, including ``G = 1``.
    """
    _check_choice("scale", scale, SCALES)
    r = _grouped(rewards, group_size, "rewards")
    adv = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
        adv = adv / (std + eps)
    elif scale == "batch":
        std = r.std() if r.numel() > 1 else torch.zeros((), dtype=r.dtype, device=r.device)
        adv = adv / (std + eps)
    flat = r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)
    return torch.where(flat, torch.zeros_like(adv), adv).reshape(-1)


def _segment_stats(r: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-id count, mean, Bessel std (0 for singletons), max and min."""
    count = torch.zeros(k, dtype=r.dtype, device=r.device).index_add_(0, ids, torch.ones_like(r))
    mean = torch.zeros(k, dtype=r.dtype, device=r.device).index_add_(0, ids, r) / count.clamp(min=1)
    sq = torch.zeros(k, dtype=r.dtype, device=r.device).index_add_(0, ids, (r - mean[ids]) ** 2)
    std = torch.where(count > 1, (sq / (count - 1).clamp(min=1)).sqrt(), torch.zeros_like(sq))
    hi = torch.full((k,), -math.inf, dtype=r.dtype, device=r.device).scatter_reduce(0, ids, r, "amax")
    lo = torch.full((k,), math.inf, dtype=r.dtype, device=r.device).scatter_reduce(0, ids, r, "amin")
    return count, mean, std, hi, lo


def group_advantages_by_id(rewards: Any, group_ids: Any, scale: Scale = "group", eps: float = 1e-4) -> Tensor:
    """:func:`group_advantages` over an integer group id per sample (any order, any group sizes)."""
    _check_choice("scale", scale, SCALES)
    r = _rewards(rewards, "rewards")
    ids, k = _ids(group_ids, r.numel())
    _, mean, std, hi, lo = _segment_stats(r, ids, k)
    flat = hi == lo
    adv = r - mean[ids]
    if scale == "group":
        adv = adv / (std[ids] + eps)
    elif scale == "batch":
        adv = adv / ((r.std() if r.numel() > 1 else torch.zeros((), dtype=r.dtype)) + eps)
    return torch.where(flat[ids], torch.zeros_like(adv), adv)


def _weights(alpha: Tensor, beta: Tensor) -> Tensor:
    return ((1 - alpha).exp() + (1 + beta).sqrt()) / 2


def difficulty_weights(loc_rewards: Any, group_size: int, tau: float = 0.3, scope: Scope = "group") -> Tensor:
    """Difficulty-aware weight ``ω_g = (exp(1 − α_g) + sqrt(1 + β_g)) / 2`` per sample.

    ``α_g`` is the mean localization reward of the group (``scope="group"``, the definition) or of
    the whole batch (``scope="batch"``, the original code's per-device mean); ``β_g`` is the share of
    the group's completions whose localization reward is below ``tau`` (missed detections). For
    rewards in ``[0, 1]``, ``ω ∈ [1, (e + √2)/2 ≈ 2.066]``: hard groups weigh more. Returns ``(N,)``,
    equal within a group; multiply it into the advantages.
    """
    _check_choice("scope", scope, SCOPES)
    r = _grouped(loc_rewards, group_size, "loc_rewards")
    alpha = r.mean(dim=1) if scope == "group" else r.mean().expand(r.shape[0])
    beta = (r < tau).to(r.dtype).mean(dim=1)
    return _weights(alpha, beta).repeat_interleave(group_size)


def difficulty_weights_by_id(loc_rewards: Any, group_ids: Any, tau: float = 0.3, scope: Scope = "group") -> Tensor:
    """:func:`difficulty_weights` over an integer group id per sample."""
    _check_choice("scope", scope, SCOPES)
    r = _rewards(loc_rewards, "loc_rewards")
    ids, k = _ids(group_ids, r.numel())
    count, mean, _, _, _ = _segment_stats(r, ids, k)
    alpha = mean if scope == "group" else r.mean().expand(k)
    missed = torch.zeros(k, dtype=r.dtype, device=r.device).index_add_(0, ids, (r < tau).to(r.dtype))
    beta = missed / count.clamp(min=1)
    return _weights(alpha, beta)[ids]


def degenerate_groups(loc_rewards: Any, group_size: int, tol: float = 1e-6, perfect: float = 1.0) -> Tensor:
    """``(groups,)`` bool: the group's localization rewards are all equal (std < ``tol``) and none
    reaches ``perfect``. Such a group has zero advantage and teaches nothing; a group of perfect
    answers is not degenerate (nothing to fix)."""
    r = _grouped(loc_rewards, group_size, "loc_rewards")
    std = r.std(dim=1) if group_size > 1 else torch.zeros_like(r[:, 0])
    return (std < tol) & ~(r >= perfect).any(dim=1)


def degenerate_samples_by_id(loc_rewards: Any, group_ids: Any, tol: float = 1e-6, perfect: float = 1.0) -> Tensor:
    """``(N,)`` bool: True where the sample's group (by integer id) is degenerate
    (:func:`degenerate_groups`). Any ids, however sparse (memory follows the batch)."""
    r = _rewards(loc_rewards, "loc_rewards")
    ids, k = _ids(group_ids, r.numel())
    _, _, std, hi, _ = _segment_stats(r, ids, k)
    return ((std < tol) & ~(hi >= perfect))[ids]


MAX_DENSE_IDS = 1 << 27
"""The largest ``max_id + 1`` :func:`degenerate_groups_by_id` allocates a slot per id for."""


def degenerate_groups_by_id(loc_rewards: Any, group_ids: Any, tol: float = 1e-6, perfect: float = 1.0) -> Tensor:
    """``(max_id + 1,)`` bool: :func:`degenerate_groups` over an integer group id per sample (an id
    with no sample is reported False). The statistics are computed on the ids present only; the
    result has a slot per id up to the largest, so for sparse ids (hashed uids) use
    :func:`degenerate_samples_by_id`.

    Raises:
        ValueError: ``max_id + 1 > MAX_DENSE_IDS`` (the message points to the per-sample function).
    """
    r = _rewards(loc_rewards, "loc_rewards")
    raw = _raw_ids(group_ids, r.numel())
    top = int(raw.max()) + 1 if raw.numel() else 0
    if top > MAX_DENSE_IDS:
        raise ValueError(
            f"group_ids reach {top - 1}: a slot per id up to it would need {top} entries (> MAX_DENSE_IDS = "
            f"{MAX_DENSE_IDS}); use degenerate_samples_by_id (one value per sample) for sparse ids"
        )
    out = torch.zeros(top, dtype=torch.bool, device=r.device)
    if top:
        uniq, inverse = torch.unique(raw, return_inverse=True)
        _, _, std, hi, _ = _segment_stats(r, inverse, int(uniq.numel()))
        out[uniq] = (std < tol) & ~(hi >= perfect)
    return out
