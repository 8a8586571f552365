"""The peers' strategies (docs/method.md §9) in ``DifferADGRPOTrainer``: config checks and the step that applies them.

The algorithms live in the core (:mod:`differad_rl.group_weights`, :mod:`differad_rl.group_filters`);
this module maps the :class:`~differad_rl.integrations.trl.config.DifferADGRPOConfig` fields onto them:

* ``degeneracy_rule`` — which groups ``resample_rounds`` regenerates (same prompt): ``"differad"``
  (all localization rewards equal, none perfect; the method) or ``"emit"`` (no completion correct,
  i.e. every localization reward ``<= correct_threshold``; EMIT's re-roll).
* ``advantage_weighting`` — ``None``/``"differad"``: the method's ω (``difficulty_weighting``);
  ``"emit"``: × (1 + share of wrong completions), × 1 when all are wrong; ``"univg"``: × one factor
  of the batch's mean localization reward (``univg_form`` = ``"power"`` ``(1.05 − m)^univg_power``,
  ``"exp"`` ``exp(1 − m)``, ``"log"`` ``−log(0.02 + m)``, floored at 0).
* ``group_filter`` — ``"dapo"`` (all localization rewards of the group identical, perfect groups
  included) or ``"easyr1"`` (the group's mean localization reward not inside
  ``(group_filter_low, group_filter_high)``). With ``group_filter_refill_rounds`` = R > 0 the trainer
  first replaces those groups, for at most R rounds, by groups of new prompts drawn from
  ``train_dataset`` (DAPO / EasyR1 refill; :meth:`DifferADGRPOTrainer._draw_rows`); the groups still
  filtered afterwards (all of them with R = 0) are dropped from the loss here (advantages 0,
  completion mask 0, ``num_items_in_batch`` recounted): with TRL's token-normalised losses
  (``loss_type`` ``"dapo"``, the default, or ``"bnpo"``) this equals training on the smaller batch.
  When every group is filtered nothing is masked (the advantages are still set to 0), since an
  empty batch has no loss. veRL's own ``algorithm.filter_groups`` refills with new prompts.

Every decision is taken from the rewards gathered over all processes, so all ranks agree. With
``degeneracy_rule="emit"`` the logged ``differad/degenerate_before`` / ``degenerate_after`` are the shares
of groups with no correct completion.
Logged per step: ``differad/weight_mean``, ``differad/weight_max`` (weights), ``differad/filtered``
(share of groups dropped, after any refill), ``differad/refills`` (groups replaced by new prompts, over
all rounds), ``differad/refill_rounds_used``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from differad_rl.group_filters import Rule, group_rule, resolve_rule
from differad_rl.group_weights import MEAN_REWARD_FORMS
from differad_rl.registry import advantage_weights, check_weighting, contiguous_ids

__all__ = [
    "ADVANTAGE_WEIGHTINGS",
    "DEGENERACY_RULES",
    "GROUP_FILTERS",
    "apply_peer_strategies",
    "check_peer_fields",
    "filter_rule",
    "peers_active",
    "resample_rule",
]

ADVANTAGE_WEIGHTINGS = (None, "differad", "emit", "univg")  # None + differad_rl.registry.WEIGHTINGS
DEGENERACY_RULES = ("differad", "emit")  # the same-prompt rules of differad_rl.group_filters.GROUP_RULES
GROUP_FILTERS = (None, "dapo", "easyr1")  # the new-prompt rules of differad_rl.group_filters.GROUP_RULES

_PREFIX = "differad/"


def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _rule_name(field: str, value: Any, accepted: tuple[str | None, ...]) -> Any:
    """``value`` resolved through the core's rule names (a deprecated alias warns), one of ``accepted``."""
    if value is None and None in accepted:
        return None
    try:
        name = resolve_rule(value, field=field)
    except ValueError:
        name = None
    if name not in accepted or name is None:
        raise ValueError(f"{field}={value!r} is not known; expected one of {accepted}")
    return name


def check_peer_fields(cfg: Any) -> None:
    """Validate the peers' fields of a ``DifferADGRPOConfig`` (called by its ``__post_init__``).

    ``advantage_weighting="differad"`` turns ``difficulty_weighting`` on; another weighting together
    with ``difficulty_weighting=True`` raises (one weighting at a time).

    Raises:
        ValueError: naming the field, the value and the accepted values.
    """
    check_weighting(cfg.advantage_weighting, field="advantage_weighting")
    if cfg.advantage_weighting == "differad":
        cfg.difficulty_weighting = True
    elif cfg.advantage_weighting is not None and cfg.difficulty_weighting:
        raise ValueError(
            f"advantage_weighting={cfg.advantage_weighting!r} and difficulty_weighting=True are two weightings; "
            "set difficulty_weighting=False (or advantage_weighting='differad')"
        )
    cfg.correct_threshold = _finite("correct_threshold", cfg.correct_threshold)
    if cfg.univg_form not in MEAN_REWARD_FORMS:
        raise ValueError(f"univg_form={cfg.univg_form!r} is not known; expected one of {MEAN_REWARD_FORMS}")
    cfg.univg_power = _finite("univg_power", cfg.univg_power)
    cfg.degeneracy_rule = _rule_name("degeneracy_rule", cfg.degeneracy_rule, DEGENERACY_RULES)
    cfg.group_filter = _rule_name("group_filter", cfg.group_filter, GROUP_FILTERS)
    low = _finite("group_filter_low", cfg.group_filter_low)
    high = _finite("group_filter_high", cfg.group_filter_high)
    if not low < high:
        raise ValueError(f"group_filter_low={low!r} must be < group_filter_high={high!r}")
    cfg.group_filter_low, cfg.group_filter_high = low, high
    refill = cfg.group_filter_refill_rounds
    if isinstance(refill, bool) or not isinstance(refill, int) or refill < 0:
        raise ValueError(f"group_filter_refill_rounds must be an int >= 0, got {refill!r}")
    if refill > 0 and cfg.group_filter is None:
        raise ValueError(
            f"group_filter_refill_rounds={refill} refills the groups a filter drops, but group_filter=None; "
            "set group_filter='dapo' or 'easyr1', or group_filter_refill_rounds=0"
        )


def peers_active(cfg: Any) -> bool:
    """True when a peer weighting or a group filter is on (the trainer then needs the localization reward)."""
    return getattr(cfg, "advantage_weighting", None) in ("emit", "univg") or getattr(cfg, "group_filter", None) is not None


def resample_rule(cfg: Any) -> Rule:
    """The rule ``resample_rounds`` regenerates by: the method's degenerate groups or EMIT's "no correct"."""
    if getattr(cfg, "degeneracy_rule", "differad") == "emit":
        return group_rule("emit", threshold=float(getattr(cfg, "correct_threshold", 0.0)))
    return group_rule("differad", tol=float(getattr(cfg, "degenerate_tol", 1e-6)))


def filter_rule(cfg: Any) -> Rule | None:
    """The rule of ``group_filter`` (the groups it drops, and the groups ``group_filter_refill_rounds`` replaces)."""
    name = getattr(cfg, "group_filter", None)
    if name is None:
        return None
    return group_rule(name, low=cfg.group_filter_low, high=cfg.group_filter_high, field="group_filter")


def _filtered(cfg: Any, loc: torch.Tensor, g: int) -> torch.Tensor | None:
    rule = filter_rule(cfg)
    return rule(loc, g) if rule is not None else None


def apply_peer_strategies(trainer: Any, inputs: list, output: dict[str, Any], loc: torch.Tensor, mode: str) -> dict:
    """Apply the peer weighting and group filter to one training generation batch.

    Args:
        trainer: the ``DifferADGRPOTrainer`` (its ``args``, ``num_generations``, ``accelerator``, metrics).
        inputs: this rank's rows of the batch.
        output: the batch as ``_generate_and_score_completions`` returns it (after any resampling).
        loc: ``(N,)`` gathered localization rewards (after any resampling), groups contiguous.
        mode: ``"train"``.

    Returns:
        ``output`` with scaled (or zeroed) advantages and, with a filter, the dropped rows' completion
        mask zeroed and ``num_items_in_batch`` recounted.
    """
    cfg, g = trainer.args, trainer.num_generations
    rank, local_n = trainer.accelerator.process_index, len(inputs)
    local = slice(rank * local_n, (rank + 1) * local_n)
    metrics = trainer._metrics[mode]
    adv = output["advantages"]

    weighting = getattr(cfg, "advantage_weighting", None)
    if weighting in ("emit", "univg"):
        weights = advantage_weights(weighting, loc, contiguous_ids(loc.numel(), g, loc.device),
                                    correct_threshold=cfg.correct_threshold, univg_form=cfg.univg_form,
                                    univg_power=cfg.univg_power)
        w_local = weights[local].to(device=adv.device, dtype=adv.dtype)
        adv = adv * (w_local if adv.dim() == 1 else w_local.unsqueeze(-1))
        metrics[_PREFIX + "weight_mean"].append(weights.float().mean().item())
        metrics[_PREFIX + "weight_max"].append(weights.float().max().item())
        trainer._replace_logged_advantages(trainer._logged_advantages_global(weights))

    dropped = _filtered(cfg, loc, g)
    if dropped is not None:
        metrics[_PREFIX + "filtered"].append(dropped.float().mean().item())
        rows = dropped.repeat_interleave(g)[local].to(adv.device)
        keep = (~rows).to(adv.dtype)
        adv = adv * (keep if adv.dim() == 1 else keep.unsqueeze(-1))
        if not bool(dropped.all()):
            output["completion_mask"] = output["completion_mask"] * (~rows).to(output["completion_mask"].dtype)[:, None]
            loss_mask = output["completion_mask"]
            if "tool_mask" in output:
                loss_mask = loss_mask * output["tool_mask"]
            output["num_items_in_batch"] = trainer.accelerator.gather(loss_mask.sum()).sum()
    output["advantages"] = adv
    return output
