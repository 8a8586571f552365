"""The peers' box rewards (docs/method.md §9) for veRL 0.9's reward loop: ``compute_score`` with ``box_reward=<kind>``.

Same contract, ground truth and options as :func:`differad_rl.integrations.verl.reward.compute_score`
(the method's reward), with the localization score replaced by a peer's box reward::

    reward.custom_reward_function.path=pkg://differad_rl.integrations.verl.peers
    reward.custom_reward_function.name=compute_score
    +reward.custom_reward_function.reward_kwargs.box_reward=giou        # a registered box reward

``box_reward``: ``"iou_threshold"`` (1 iff IoU > ``iou_threshold``; AnomalyR1, Visual-RFT),
``"iou_squared"`` (Perception-R1), ``"giou"`` / ``"diou"`` / ``"ciou"`` (torchvision's, mapped to
[0, 1] by ``(x + 1) / 2``), ``"matched_hits"`` (VisionReasoner: Hungarian matching of all boxes,
``(1[IoU > iou_threshold] + 1[mean L1 < l1_threshold]) / 2`` per match, over ``max(P, N)``).
Formulas and sources: :mod:`differad_rl.box_rewards`. Every sample returns ``{score, localization,
format, iou}`` with ``localization`` = the peer reward, so the ``differad`` estimator's weights,
veRL's ``filter_groups`` (``metric=localization``) and the resampling read it like the method's DCLR.
Boxes are read only in the box format of ``prompt_family`` (``reward_kwargs.prompt_family``), as the
method's reward reads them; the protocol keys (``iou``, ``acc_0.3``, ...) stay lenient.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from differad_rl import registry

from .reward import _options_from_kwargs, compute_score as _method_score, ground_truth_boxes

__all__ = ["PEER_BOX_REWARDS", "compute_score"]

PEER_BOX_REWARDS: tuple[str, ...] = tuple(n for n, e in registry.REWARDS.items() if e.peer and e.box)
"""The peers' values of ``reward_kwargs.box_reward`` (any registered box reward is accepted)."""



@functools.lru_cache(maxsize=64)
def _reward(box_reward: str, prompt_family: str | None, require_answer: bool, iou_threshold: float,
            l1_threshold: float) -> Any:
    """The registry's reward ``box_reward`` on ground truth already in the model's space (cached)."""
    entry = registry.reward_entry(box_reward)
    thresholds = {"threshold": iou_threshold, "iou_threshold": iou_threshold, "l1_threshold": l1_threshold}
    own = {k: v for k, v in thresholds.items() if k in entry.options}
    return registry.build_reward(box_reward, prompt_family=prompt_family, require_answer=require_answer, **own)


def compute_score(
    data_source: Any = None,
    solution_str: str | None = None,
    ground_truth: Any = None,
    extra_info: Mapping[str, Any] | None = None,
    box_reward: str | None = None,
    iou_threshold: float = 0.5,
    l1_threshold: float = 10.0,
    **kwargs: Any,
) -> dict[str, float]:
    """Score one completion with a peer's box reward (module docstring).

    Args:
        data_source, solution_str, ground_truth, extra_info: as veRL passes them.
        box_reward: a registered box reward (:data:`differad_rl.registry.REWARDS`; the peers':
            :data:`PEER_BOX_REWARDS`), required.
        iou_threshold: threshold of ``"iou_threshold"`` and ``"matched_hits"`` (strict ``>``).
        l1_threshold: mean-L1 threshold of ``"matched_hits"``, in the model's coordinate units.
        **kwargs: the method reward's :class:`~differad_rl.integrations.verl.reward.RewardOptions`
            (weights, ``space``, ``require_answer``, ``prompt_family``, pixel budget...; the DCLR parameters
            are unused).

    Returns:
        the method reward's keys (:data:`~differad_rl.integrations.verl.reward.REWARD_KEYS`) with
        ``localization`` = the peer reward and ``score = localization_weight · localization
        + format_weight · format``.

    Raises:
        ValueError: ``box_reward`` missing or unknown, an invalid option, a malformed ground truth.
    """
    if not (isinstance(box_reward, str) and box_reward in registry.REWARDS and registry.REWARDS[box_reward].box):
        known = ", ".join(n for n, e in registry.REWARDS.items() if e.box)
        raise ValueError(f"reward_kwargs.box_reward={box_reward!r} is not known; expected one of {known}")
    for name, value, top in (("iou_threshold", iou_threshold, 1.0), ("l1_threshold", l1_threshold, float("inf"))):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= top:
            raise ValueError(f"reward_kwargs.{name} must be a number in [0, {top}], got {value!r}")
    base = _method_score(data_source, solution_str, ground_truth, extra_info, **kwargs)
    options = _options_from_kwargs(kwargs)
    gt = ground_truth_boxes(ground_truth, extra_info, options).tolist()
    text = solution_str if isinstance(solution_str, str) else ""
    reward = _reward(box_reward, options.prompt_family, options.require_answer, float(iou_threshold), float(l1_threshold))
    # the registry's reward: the box read in the prompt family's format, the core's scoring rules
    solution = [gt] if registry.reward_entry(box_reward).multi_box else [gt[0] if gt else [0.0, 0.0, 0.0, 0.0]]
    loc = float(reward([text], solution=solution)[0])
    score = options.localization_weight * loc + options.format_weight * base["format"]
    return {**base, "score": float(score), "localization": loc}  # the protocol keys stay the method's
