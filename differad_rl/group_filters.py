"""The peers' group rules, beside the method's degenerate groups (docs/method.md §6, §9), and one driver that
regenerates the groups a rule selects.

A *rule* maps the rewards of a batch to one bool per group: True = this group is asked again
(same prompt: the method's resampling, EMIT's re-roll) or replaced (new prompt: DAPO / EasyR1
filtering with refill). The rules, named after their source (the vocabulary of
:mod:`differad_rl.registry`):

* ``"differad"`` — the method's degenerate groups: all localization rewards equal and none perfect
  (:func:`differad_rl.groups.degenerate_groups`).
* ``"emit"`` — EMIT's re-roll rule: no completion of the group is correct (reward
  ``> threshold``), :func:`no_correct_groups`.
* ``"dapo"`` — DAPO's dynamic sampling (veRL ``algorithm.filter_groups``): every reward of
  the group identical, perfect groups included, :func:`zero_variance_groups`.
* ``"easyr1"`` — EasyR1's online filtering: the group's mean reward not strictly inside
  ``(low, high) = (0.01, 0.99)``, :func:`out_of_band_groups`.

The descriptive names used before (``"degenerate"``, ``"no_correct"``, ``"zero_variance"``,
``"out_of_band"``) resolve with a ``FutureWarning`` (:data:`RULE_ALIASES`).

:func:`regenerate_groups` runs any rule for at most K rounds (the method's
:func:`differad_rl.resampling.resample_groups` is this driver with the ``"degenerate"`` rule), with
the same determinism contract: called with the rewards gathered over all processes, every process
selects the same groups in the same rounds.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from differad_rl.groups import _grouped, _ids, _rewards, _segment_stats, degenerate_groups
from differad_rl.resampling import Regenerate, ResampleStats, regenerate_rounds

RuleName = Literal["differad", "emit", "dapo", "easyr1"]
GROUP_RULES: tuple[RuleName, ...] = ("differad", "emit", "dapo", "easyr1")
RULE_ALIASES: Mapping[str, RuleName] = {
    "degenerate": "differad",
    "no_correct": "emit",
    "zero_variance": "dapo",
    "out_of_band": "easyr1",
}
"""Deprecated rule names → their name in :data:`GROUP_RULES`."""

Rule = Callable[[Tensor, int], Tensor]
"""``rule(rewards (groups × G,), G) -> (groups,) bool``."""

__all__ = [
    "GROUP_RULES",
    "RULE_ALIASES",
    "Rule",
    "RuleName",
    "group_rule",
    "resolve_rule",
    "no_correct_groups",
    "no_correct_groups_by_id",
    "out_of_band_groups",
    "out_of_band_groups_by_id",
    "regenerate_groups",
    "zero_variance_groups",
    "zero_variance_groups_by_id",
]


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _band(low: Any, high: Any) -> tuple[float, float]:
    lo, hi = _number("low", low), _number("high", high)
    if not lo < hi:
        raise ValueError(f"low must be < high, got low={lo!r}, high={hi!r}")
    return lo, hi


def no_correct_groups(loc_rewards: Any, group_size: int, threshold: float = 0.0) -> Tensor:
    """``(groups,)`` bool: no completion of the group is correct (every reward ``<= threshold``).

    EMIT's re-roll rule. Source: EMIT (arXiv 2507.21619, code guanwei49/EMIT), ``grpo_Trainer.py``
    ``_dynamic_sampling`` lines 1127–1290: ``group_all_non_positive = (grouped_rewards <= 0).all(1)``
    on the accuracy reward (1 correct, 0 wrong, −1 unparsable); those groups are re-generated from the
    same prompts up to ``max_resample_times`` (3 in its ``Stage2.sh``). ``threshold=0`` is that rule;
    on a graded localization reward choose the reward of a hit (e.g. 0.5 on IoU).
    """
    t = _number("threshold", threshold)
    r = _grouped(loc_rewards, group_size, "loc_rewards")
    return (r <= t).all(dim=1)


def no_correct_groups_by_id(loc_rewards: Any, group_ids: Any, threshold: float = 0.0) -> Tensor:
    """``(max_id + 1,)`` bool: :func:`no_correct_groups` over an integer group id per sample (an id
    with no sample is reported False)."""
    t = _number("threshold", threshold)
    r = _rewards(loc_rewards, "loc_rewards")
    ids, k = _ids(group_ids, r.numel())
    count, _, _, hi, _ = _segment_stats(r, ids, k)
    return (count > 0) & (hi <= t)


def zero_variance_groups(rewards: Any, group_size: int) -> Tensor:
    """``(groups,)`` bool: the group has more than one sample and all its rewards are identical.

    DAPO's dynamic sampling (arXiv 2503.14476) as veRL 0.9 implements it
    (``verl/trainer/ppo/v1/replay_buffer.py`` ``_dapo_filtered_keys``: a group is filtered when
    ``len(values) > 1 and np.std(values) == 0.0``; groups of perfect answers included). Equality is
    tested as ``max == min``, which ``np.std`` can miss by rounding for identical non-dyadic values.
    """
    r = _grouped(rewards, group_size, "rewards")
    flat = r.amax(dim=1) == r.amin(dim=1)
    return flat & (group_size > 1)


def zero_variance_groups_by_id(rewards: Any, group_ids: Any) -> Tensor:
    """``(max_id + 1,)`` bool: :func:`zero_variance_groups` over an integer group id per sample."""
    r = _rewards(rewards, "rewards")
    ids, k = _ids(group_ids, r.numel())
    count, _, _, hi, lo = _segment_stats(r, ids, k)
    return (count > 1) & (hi == lo)


def out_of_band_groups(rewards: Any, group_size: int, low: float = 0.01, high: float = 0.99) -> Tensor:
    """``(groups,)`` bool: the group's mean reward is not strictly inside ``(low, high)``.

    EasyR1's online filtering. Source: hiyouga/EasyR1, ``verl/trainer/ray_trainer.py`` lines 518–537
    (kept iff ``filter_low < mean < filter_high`` of the ``filter_key`` score per ``uid``; the dropped
    groups are refilled by generating further batches) and ``verl/trainer/config.py`` lines 87–93
    (``online_filtering=False``, ``filter_key="overall"``, ``filter_low=0.01``, ``filter_high=0.99``).
    """
    lo, hi = _band(low, high)
    m = _grouped(rewards, group_size, "rewards").mean(dim=1)
    return ~((m > lo) & (m < hi))


def out_of_band_groups_by_id(rewards: Any, group_ids: Any, low: float = 0.01, high: float = 0.99) -> Tensor:
    """``(max_id + 1,)`` bool: :func:`out_of_band_groups` over an integer group id per sample (an id
    with no sample is reported False)."""
    lo, hi = _band(low, high)
    r = _rewards(rewards, "rewards")
    ids, k = _ids(group_ids, r.numel())
    count, mean, _, _, _ = _segment_stats(r, ids, k)
    return (count > 0) & ~((mean > lo) & (mean < hi))


def resolve_rule(name: Any, *, field: str = "rule") -> RuleName:
    """The name in :data:`GROUP_RULES` of rule ``name``; a deprecated alias (:data:`RULE_ALIASES`)
    warns (``FutureWarning``) and is translated.

    Raises:
        ValueError: unknown ``name``, naming ``field`` and the accepted values.
    """
    if name in GROUP_RULES:
        return name
    if isinstance(name, str) and name in RULE_ALIASES:
        new = RULE_ALIASES[name]
        warnings.warn(f"{field}={name!r} is deprecated; write {field}={new!r}", FutureWarning, stacklevel=3)
        return new
    raise ValueError(f"{field}={name!r} is not known; expected one of {', '.join(GROUP_RULES)}")


def group_rule(
    name: str,
    *,
    tol: float = 1e-6,
    perfect: float = 1.0,
    threshold: float = 0.0,
    low: float = 0.01,
    high: float = 0.99,
    field: str = "rule",
) -> Rule:
    """The rule called ``name`` (:data:`GROUP_RULES`) with its parameters bound, validated now.

    ``tol``, ``perfect``: of ``"differad"``; ``threshold``: of ``"emit"``; ``low``, ``high``:
    of ``"easyr1"``. ``field`` names the config field in error messages.
    """
    name = resolve_rule(name, field=field)
    if name == "differad":
        tol, perfect = _number("tol", tol), _number("perfect", perfect)
        return lambda r, g: degenerate_groups(r, g, tol, perfect)
    if name == "emit":
        t = _number("threshold", threshold)
        return lambda r, g: no_correct_groups(r, g, t)
    if name == "dapo":
        return zero_variance_groups
    lo, hi = _band(low, high)
    return lambda r, g: out_of_band_groups(r, g, lo, hi)


def regenerate_groups(
    rewards: Any,
    group_size: int,
    regenerate: Regenerate,
    max_rounds: int,
    rule: Rule,
) -> tuple[Tensor, ResampleStats]:
    """Regenerate the groups ``rule`` selects, for at most ``max_rounds`` rounds.

    The driver of :func:`differad_rl.resampling.resample_groups` with any rule: each round, every
    group the rule selects gets ``G`` new completions (``regenerate(group_indices, round) ->
    rewards``, ``(len(group_indices) × G,)`` in the order given; same prompt or a new one, as the
    caller decides) and only those groups are judged again. K = 0 is off; K means at most K rounds.

    Returns:
        The final rewards (a new tensor) and the :class:`~differad_rl.resampling.ResampleStats`
        (``degenerate_before`` / ``degenerate_after``: the shares of groups the rule selects before
        the first and after the last round).

    Raises:
        ValueError: ``max_rounds`` negative, or ``regenerate`` returned the wrong number of rewards.
    """
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 0:
        raise ValueError(f"max_rounds must be an integer >= 0, got {max_rounds!r}")
    out = (rewards if isinstance(rewards, Tensor) else torch.as_tensor(rewards)).clone()
    if not out.is_floating_point():
        out = out.to(torch.float64)
    _grouped(out, group_size, "rewards")  # validates the layout
    return regenerate_rounds(out, int(group_size), regenerate, max_rounds, rule)
