"""Group-wise resampling (docs/method.md §6): ask again where a whole group failed the same way.

A group is *degenerate* when all its localization rewards are equal and none is perfect: its
advantage is zero and it teaches nothing. :func:`resample_groups` regenerates all ``G`` completions
of every degenerate group, re-scores them and repeats, for at most ``max_rounds`` rounds (K = 0 is
off; K means exactly K regeneration rounds, unlike the original code's off-by-one). Groups still
degenerate after K rounds stay as they are.

The driver is framework-agnostic and deterministic: it takes the *global* localization rewards (all
processes' completions, gathered), so every process computes the same degenerate set and makes the
same number of ``regenerate`` calls — a framework adapter keeps its collectives in lockstep by
calling it with gathered rewards on every rank. Compare DAPO's dynamic sampling, which drops
degenerate groups and draws new prompts instead; resampling keeps the hard prompt and asks again.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from differad_rl.groups import as_rewards, check_group_size, degenerate_groups

Regenerate = Callable[[Tensor, int], Any]


@dataclass
class ResampleStats:
    """What one resampling pass did.

    Attributes:
        rounds_used: regeneration rounds run (``≤ max_rounds``; 0 when no group was degenerate).
        groups_resampled: distinct groups regenerated at least once.
        regenerations: group regenerations summed over rounds (the extra generation cost is
            ``regenerations × group_size`` completions).
        degenerate_before: share of groups degenerate before resampling, in ``[0, 1]``.
        degenerate_after: share still degenerate after the last round.
        per_round: number of groups regenerated in each round.
    """

    rounds_used: int = 0
    groups_resampled: int = 0
    regenerations: int = 0
    degenerate_before: float = 0.0
    degenerate_after: float = 0.0
    per_round: list[int] = field(default_factory=list)

    def as_metrics(self, prefix: str = "resample/") -> dict[str, float]:
        """Flat ``{name: float}`` for a trainer's logger."""
        return {
            f"{prefix}rounds_used": float(self.rounds_used),
            f"{prefix}groups_resampled": float(self.groups_resampled),
            f"{prefix}regenerations": float(self.regenerations),
            f"{prefix}degenerate_before": self.degenerate_before,
            f"{prefix}degenerate_after": self.degenerate_after,
        }


def resample_groups(
    loc_rewards: Any,
    group_size: int,
    regenerate: Regenerate,
    max_rounds: int,
    *,
    tol: float = 1e-6,
    perfect: float = 1.0,
) -> tuple[Tensor, ResampleStats]:
    """Regenerate degenerate groups for at most ``max_rounds`` rounds.

    Args:
        loc_rewards: ``(groups × group_size,)`` localization rewards of the whole (gathered) batch,
            groups contiguous.
        group_size: completions per group ``G``.
        regenerate: ``regenerate(group_indices, round) -> rewards``; generates ``G`` new completions
            for each group in ``group_indices`` (a sorted ``LongTensor``), replaces its own payload
            (completions, other rewards) for those groups, and returns their new localization rewards,
            ``(len(group_indices) × G,)`` in the same order. ``round`` counts from 0.
        max_rounds: K, the number of regeneration rounds at most; 0 turns resampling off.
        tol: std under which a group's rewards count as all equal.
        perfect: the reward of a perfect answer (a group of perfect answers is not degenerate).

    Returns:
        The final localization rewards (a new floating tensor — integer input becomes float64, so
        regenerated rewards are never truncated; the input is not modified) and the
        :class:`ResampleStats`.

    Raises:
        ValueError: ``max_rounds`` negative, or ``regenerate`` returned the wrong number of rewards.
    """
    if isinstance(max_rounds, (bool, np.bool_)) or not isinstance(max_rounds, numbers.Integral) or max_rounds < 0:
        raise ValueError(f"max_rounds must be an integer >= 0, got {max_rounds!r}")
    max_rounds, group_size = int(max_rounds), check_group_size(group_size)
    # floating (integer / bool / list input → float64): regenerated rewards are never truncated
    rewards = as_rewards(loc_rewards, "loc_rewards").clone()
    return regenerate_rounds(rewards, group_size, regenerate, max_rounds,
                             lambda r, g: degenerate_groups(r, g, tol, perfect))


def regenerate_rounds(
    rewards: torch.Tensor,
    group_size: int,
    regenerate: Callable[[torch.Tensor, int], Any],
    max_rounds: int,
    rule: Callable[[torch.Tensor, int], torch.Tensor],
) -> tuple[torch.Tensor, ResampleStats]:
    """The regeneration loop shared by :func:`resample_groups` and
    :func:`differad_rl.group_filters.regenerate_groups`: each round regenerates the groups ``rule``
    selects (``(n_groups,)`` bool from ``(rewards, G)``) and judges only those again; updates the
    floating ``rewards`` in place (the callers pass a fresh copy) and returns it with the statistics."""
    selected = rule(rewards, group_size).clone()
    n_groups = selected.numel()
    ever = torch.zeros_like(selected)
    stats = ResampleStats(degenerate_before=float(selected.sum()) / max(n_groups, 1))
    grouped = rewards.view(-1, group_size)
    for round_index in range(max_rounds):
        idx = selected.nonzero().flatten()
        if idx.numel() == 0:
            break
        new = torch.as_tensor(regenerate(idx, round_index), dtype=rewards.dtype, device=rewards.device)
        if new.shape != (idx.numel() * group_size,):
            raise ValueError(
                f"regenerate returned {tuple(new.shape)} rewards for {idx.numel()} groups; "
                f"expected ({idx.numel() * group_size},)"
            )
        grouped[idx] = new.view(-1, group_size)
        ever[idx] = True
        stats.rounds_used += 1
        stats.regenerations += idx.numel()
        stats.per_round.append(int(idx.numel()))
        # Only the regenerated groups can change status; the others keep theirs.
        selected[idx] = rule(new, group_size)
    stats.groups_resampled = int(ever.sum())
    stats.degenerate_after = float(selected.sum()) / max(n_groups, 1)
    return rewards, stats
