"""One registry of names: rewards, advantage weightings and group rules, for TRL's and veRL's configs.

Every option string a user writes in a config resolves here, and only here; the adapters never keep
their own name lists. The vocabulary names each strategy after its source (docs/method.md §9):

* rewards (:data:`REWARDS`): the method's ``dclr``, ``iou``, ``consistency``, ``multi_box``,
  ``format`` and the peers' ``iou_threshold``, ``iou_squared``, ``giou``, ``diou``, ``ciou``,
  ``matched_hits``;
* advantage weightings (:data:`WEIGHTINGS`): ``differad`` (ω), ``emit``, ``univg``;
* group rules (:data:`GROUP_RULES`): ``differad`` (degenerate groups), ``emit`` (none correct),
  ``dapo`` (zero variance), ``easyr1`` (mean outside the band).

The descriptive names the core and veRL used before (``degenerate``, ``no_correct``,
``zero_variance``, ``out_of_band``) still resolve, with a ``FutureWarning``
(:data:`RULE_ALIASES`).

Adding a reward is one formula plus one :func:`register_reward` entry (see docs/contributing.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
from torch import Tensor

from differad_rl import box_rewards as _peers
from differad_rl import rewards as _method
from differad_rl.group_filters import GROUP_RULES, RULE_ALIASES, group_rule, resolve_rule
from differad_rl.group_weights import MeanRewardForm, mean_reward_weight, wrong_share_weights_by_id
from differad_rl.groups import Scope, difficulty_weights_by_id

__all__ = [
    "GROUP_RULES",
    "RULE_ALIASES",
    "REWARDS",
    "SPACE_OPTIONS",
    "WEIGHTINGS",
    "RewardEntry",
    "advantage_weights",
    "build_reward",
    "check_weighting",
    "contiguous_ids",
    "reward_entry",
    "reward_names",
    "reward_options",
    "register_reward",
    "resolve_rule",
    "rule",
]
# GROUP_RULES, RULE_ALIASES, resolve_rule: defined in differad_rl.group_filters, re-exported here

WeightingName = Literal["differad", "emit", "univg"]

SPACE_OPTIONS: frozenset[str] = frozenset(
    {"name", "require_answer", "space", "gt_space", "min_pixels", "max_pixels", "factor", "prompt_family"}
)
"""Keywords every box reward takes (:class:`differad_rl.rewards.SingleBoxReward`): the scoring front."""

DCLR_OPTIONS: frozenset[str] = frozenset(f.name for f in fields(_method.DCLRConfig))
"""The DCLR parameters (:class:`differad_rl.rewards.DCLRConfig`)."""


@dataclass(frozen=True)
class RewardEntry:
    """One registered reward.

    Attributes:
        name: the config name (``"dclr"``); the callable's ``__name__`` is ``f"{name}_reward"``.
        factory: builds the TRL-shaped callable from keyword options.
        box: whether it scores a box (``False``: it judges the text only, like ``format``).
        multi_box: whether ``solution`` holds a list of boxes per completion (Hungarian matching).
        options: the reward's own options beyond :data:`SPACE_OPTIONS`.
        peer: a peer's reward (docs/method.md §9), not the method's.
    """

    name: str
    factory: Callable[..., Any]
    box: bool = True
    multi_box: bool = False
    options: frozenset[str] = frozenset()
    peer: bool = False

    def accepts(self) -> frozenset[str]:
        """Every keyword the factory takes."""
        return self.options | (SPACE_OPTIONS if self.box else frozenset({"name", "prompt_family"}))


REWARDS: dict[str, RewardEntry] = {}
"""name → :class:`RewardEntry`, in registration order (the method's first)."""


def register_reward(
    name: str,
    factory: Callable[..., Any],
    *,
    box: bool = True,
    multi_box: bool = False,
    options: Iterable[str] = (),
    peer: bool = False,
) -> RewardEntry:
    """Register a reward under ``name`` (TRL's ``reward_funcs`` names and veRL's ``box_reward``).

    Raises:
        ValueError: ``name`` is taken.
    """
    if name in REWARDS:
        raise ValueError(f"reward {name!r} is already registered")
    entry = RewardEntry(name, factory, box=box, multi_box=multi_box, options=frozenset(options), peer=peer)
    REWARDS[name] = entry
    return entry


def reward_names() -> tuple[str, ...]:
    """The registered reward names, in registration order."""
    return tuple(REWARDS)


def reward_entry(name: str) -> RewardEntry:
    """The entry of reward ``name``.

    Raises:
        ValueError: unknown ``name`` (the message lists the known ones).
    """
    if name not in REWARDS:
        raise ValueError(f"reward name {name!r} is unknown; known rewards: {', '.join(REWARDS)}")
    return REWARDS[name]


def reward_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The subset of shared ``options`` that reward ``name`` takes (one option set can configure a
    whole reward list: the DCLR parameters go to the DCLR rewards only)."""
    accepts = reward_entry(name).accepts()
    return {k: v for k, v in options.items() if k in accepts}


def build_reward(name: str, /, **options: Any) -> Any:
    """The TRL-shaped callable of reward ``name`` built with ``options``.

    Raises:
        ValueError: unknown ``name`` or an option the reward does not take (naming it and the
            accepted ones).
    """
    entry = reward_entry(name)
    unknown = sorted(set(options) - entry.accepts())
    if unknown:
        raise ValueError(
            f"reward {name!r} takes no option {', '.join(unknown)}; it takes {', '.join(sorted(entry.accepts()))}"
        )
    return entry.factory(**options)


_DCLR = tuple(sorted(DCLR_OPTIONS))
register_reward("dclr", _method.get_dclr_reward, options=_DCLR)
register_reward("iou", _method.get_iou_reward)
register_reward("consistency", _method.get_consistency_reward, options=_DCLR)
register_reward("multi_box", _method.get_multi_box_reward, multi_box=True, options=_DCLR)
register_reward("format", _method.get_format_reward, box=False)
register_reward("iou_threshold", _peers.get_iou_threshold_reward, options=("threshold",), peer=True)
register_reward("iou_squared", _peers.get_iou_squared_reward, peer=True)
register_reward("giou", _peers.get_giou_reward, peer=True)
register_reward("diou", _peers.get_diou_reward, options=("eps",), peer=True)
register_reward("ciou", _peers.get_ciou_reward, options=("eps",), peer=True)
register_reward("matched_hits", _peers.get_matched_hits_reward, multi_box=True,
                options=("iou_threshold", "l1_threshold"), peer=True)


# ------------------------------------------------------------------------------ group rules
rule = group_rule
"""The group rule by name (:func:`differad_rl.group_filters.group_rule`, :data:`GROUP_RULES`)."""


# ------------------------------------------------------------------------------ weightings
WEIGHTINGS: tuple[WeightingName, ...] = ("differad", "emit", "univg")
"""The advantage weightings: ``differad`` — the method's difficulty weight ω per group
(:func:`differad_rl.groups.difficulty_weights`); ``emit`` — ``1 +`` share wrong
(:func:`differad_rl.group_weights.wrong_share_weights`); ``univg`` — one factor of the batch's mean
localization reward (:func:`differad_rl.group_weights.mean_reward_weight`)."""


def check_weighting(name: Any, *, field: str = "weighting") -> WeightingName | None:
    """``name`` if it is ``None`` or one of :data:`WEIGHTINGS`.

    Raises:
        ValueError: naming ``field``, the value and the accepted ones.
    """
    if name is None or name in WEIGHTINGS:
        return name
    raise ValueError(f"{field}={name!r} is not known; expected None or one of {', '.join(WEIGHTINGS)}")


def advantage_weights(
    name: WeightingName,
    loc_rewards: Tensor,
    group_ids: Tensor,
    *,
    tau: float = 0.3,
    scope: Scope = "group",
    correct_threshold: float = 0.0,
    univg_form: MeanRewardForm = "power",
    univg_power: float = 1.0,
) -> Tensor:
    """Per-sample weight ``(N,)`` of weighting ``name`` from the localization rewards.

    Args:
        name: one of :data:`WEIGHTINGS`.
        loc_rewards: ``(N,)`` localization rewards.
        group_ids: ``(N,)`` integer group id per sample (contiguous groups of ``G``:
            ``torch.arange(N) // G``).
        tau, scope: of ``differad``; ``correct_threshold``: of ``emit``; ``univg_form``,
            ``univg_power``: of ``univg``.
    """
    check_weighting(name)
    if name == "differad":
        return difficulty_weights_by_id(loc_rewards, group_ids, tau=tau, scope=scope)
    if name == "emit":
        return wrong_share_weights_by_id(loc_rewards, group_ids, float(correct_threshold))
    factor = mean_reward_weight(loc_rewards, univg_form, float(univg_power))
    return factor.expand(torch.as_tensor(loc_rewards).numel())


def contiguous_ids(n: int, group_size: int, device: torch.device | None = None) -> Tensor:
    """``torch.arange(n) // group_size``: the group id of each sample when groups are contiguous."""
    return torch.arange(n, device=device) // group_size

