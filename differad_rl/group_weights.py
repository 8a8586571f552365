"""The peers' advantage weightings, beside the method's difficulty weights ω (docs/method.md §5, §9).

Both multiply the group-relative advantages (or, equivalently for a positive weight, the clipped
policy term of the loss; the KL term is not scaled):

* :func:`wrong_share_weights` — EMIT's "difficulty-aware GRPO": per group ``1 + (share of wrong
  completions)``, and 1 when every completion is wrong.
* :func:`mean_reward_weight` — UniVG-R1's difficulty weighting: one factor for the whole batch from
  its mean IoU ``m``: ``(1.05 − m)^w``, ``exp(1 − m)`` or ``−log(0.02 + m)``.

Same conventions as :mod:`differad_rl.groups`: 1-D tensors, contiguous groups of ``group_size`` or
an integer group id per sample (``*_by_id``), dtype and device preserved (integers → float64).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from differad_rl.groups import _grouped, _ids, _rewards, _segment_stats

MeanRewardForm = Literal["power", "exp", "log"]
MEAN_REWARD_FORMS: tuple[MeanRewardForm, ...] = ("power", "exp", "log")

__all__ = ["MEAN_REWARD_FORMS", "mean_reward_weight", "wrong_share_weights", "wrong_share_weights_by_id"]


def _check_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _from_share(wrong: Tensor) -> Tensor:
    return torch.where(wrong >= 1, torch.ones_like(wrong), 1 + wrong)


def wrong_share_weights(loc_rewards: Any, group_size: int, threshold: float = 0.0) -> Tensor:
    """EMIT's advantage weight per sample: ``1 + f_g`` with ``f_g`` the share of the group's
    completions that are wrong (reward ``<= threshold``), and 1 when all are wrong (``f_g = 1``).

    Source: EMIT (arXiv 2507.21619, code guanwei49/EMIT), ``grpo_Trainer.py`` lines 1425–1444:
    ``advantage_weight = (acc <= 0).sum(1) / G``, ``advantage_weight[advantage_weight == 1] = 0``,
    ``+ 1``, on its accuracy reward (1 correct, 0 wrong, −1 unparsable; ``plugin.py``
    ``CLSAccuracyORM_choice``). ``threshold=0`` is that rule ("correct" iff reward ``> 0``); for a
    graded localization reward choose the reward that counts as a hit (e.g. 0.5 on IoU).

    Returns:
        ``(N,)`` in ``[1, 2)``, equal within a group: a group with some right answers weighs more the
        more of it is wrong.
    """
    t = _check_number("threshold", threshold)
    r = _grouped(loc_rewards, group_size, "loc_rewards")
    wrong = (r <= t).to(r.dtype).mean(dim=1)
    return _from_share(wrong).repeat_interleave(group_size)


def wrong_share_weights_by_id(loc_rewards: Any, group_ids: Any, threshold: float = 0.0) -> Tensor:
    """:func:`wrong_share_weights` over an integer group id per sample (veRL's ``uid``)."""
    t = _check_number("threshold", threshold)
    r = _rewards(loc_rewards, "loc_rewards")
    ids, k = _ids(group_ids, r.numel())
    count, _, _, _, _ = _segment_stats(r, ids, k)
    wrong = torch.zeros(k, dtype=r.dtype, device=r.device).index_add_(0, ids, (r <= t).to(r.dtype))
    return _from_share(wrong / count.clamp(min=1))[ids]


def mean_reward_weight(
    loc_rewards: Any, form: MeanRewardForm = "power", power: float = 1.0, floor: float | None = 0.0
) -> Tensor:
    """UniVG-R1's batch difficulty factor from the batch mean ``m`` of the localization reward (IoU).

    ``form="power"``: ``(1.05 − m)^power``; ``"exp"``: ``exp(1 − m)``; ``"log"``: ``−log(0.02 + m)``.

    Source: UniVG-R1 (arXiv 2505.14231, code AMAP-ML/UniVG-R1),
    ``src/open-r1-multimodal/src/open_r1/trainer/grpo_trainer.py`` lines 655 (``miou =
    rewards_per_func[:, 0].mean()``, the first reward over the process's batch) and 746–753 (the
    factor times ``per_token_loss`` before the KL term); options ``miou_adjust`` (default off),
    ``miou_adjust_math`` (default ``"power"``, the released script uses ``"exp"``) and
    ``miou_weight`` (default 1) in ``trainer/grpo_config.py`` lines 287–295.

    Args:
        loc_rewards: ``(N,)`` localization rewards of the batch (any layout).
        form: one of :data:`MEAN_REWARD_FORMS`.
        power: the exponent ``w`` of ``"power"``.
        floor: lower bound of the factor (default 0). The ``"log"`` form is negative for ``m > 0.98``;
            UniVG-R1 then multiplies the clipped loss by a negative number. Scaling advantages by a
            negative factor is not the same thing (the clip side flips), so by default the factor
            stops at 0. ``None``: the exact value.

    Returns:
        A 0-dim tensor in the rewards' dtype: larger for a harder (lower-IoU) batch. An empty batch
        uses ``m = 0``.
    """
    if form not in MEAN_REWARD_FORMS:
        raise ValueError(f"form={form!r} is not known; expected one of {MEAN_REWARD_FORMS}")
    w = _check_number("power", power)
    r = _rewards(loc_rewards, "loc_rewards")
    m = r.mean() if r.numel() else torch.zeros((), dtype=r.dtype, device=r.device)
    if form == "power":
        out = (1.05 - m) ** w
    elif form == "exp":
        out = (1 - m).exp()
    else:
        out = -(0.02 + m).log()
    if floor is not None:
        out = out.clamp(min=_check_number("floor", floor))
    return out
