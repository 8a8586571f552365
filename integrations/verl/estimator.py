"""The ``differad`` advantage estimator for veRL: group advantages × difficulty weights.

For the samples of one prompt (veRL's ``uid`` index, any order — the trainer balances and shuffles
the batch), with ``r`` the summed reward (``token_level_rewards.sum(-1)``) and ``l`` the
**localization** reward of each sample (DESIGN §4–§5)::

    A_i = (r_i - mean_g(r)) / (std_g(r) + eps)         # Bessel std; scale="none": r_i - mean_g(r)
    ω_g = (exp(1 - α_g) + sqrt(1 + β_g)) / 2           # α_g = mean_g(l), β_g = mean_g(l < tau)
    advantages[i, t] = ω_g · A_i · response_mask[i, t]

Both factors come from the core (:func:`differad_rl.groups.group_advantages_by_id`,
:func:`differad_rl.groups.difficulty_weights_by_id`); this module only maps veRL's arguments.
A group whose rewards are all equal gets exactly 0; a single-sample group gets 0.

Where the localization reward comes from: veRL calls an estimator with ``token_level_rewards``,
``response_mask``, ``index`` and ``config`` only. The per-sample localization score is
provided, in this order of precedence, by

1. the ``localization=`` argument (direct calls, tests);
2. :func:`provide_localization` — installed by the plugin's localization bridge
   (:func:`differad_rl.integrations.verl.compat.install_localization_bridge`) around veRL's V1
   ``PPOTrainer._compute_advantage``, which reads ``reward_extra_info["localization"]`` of each
   trajectory from the TransferQueue;
3. with ``+algorithm.differad.weight_source=score``, the summed reward itself (for a reward that
   is the localization score alone).

Otherwise the estimator raises ``ValueError`` rather than weigh by the wrong signal. veRL's
deprecated legacy trainer (``trainer.use_v1=False``) has no bridge: use ``weight_source=score`` there.

Options (``+algorithm.differad.<name>=<value>`` on the command line), see :class:`DifferadConfig`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import numpy as np
import torch

from differad_rl.group_weights import MEAN_REWARD_FORMS, mean_reward_weight, wrong_share_weights_by_id
from differad_rl.groups import difficulty_weights_by_id, group_advantages_by_id

__all__ = [
    "ESTIMATOR_NAME",
    "DifferadConfig",
    "compute_differad_advantage",
    "group_ids_from_index",
    "provide_localization",
    "register",
]

ESTIMATOR_NAME = "differad"
"""``algorithm.adv_estimator`` value that selects this estimator."""

_LOCALIZATION: contextvars.ContextVar[Any] = contextvars.ContextVar("differad_localization", default=None)


@dataclasses.dataclass(frozen=True)
class DifferadConfig:
    """Options of the ``differad`` estimator (``algorithm.differad.*``), the paper's defaults.

    Attributes:
        tau: missed-detection threshold; a sample with localization reward ``< tau`` is a miss (β).
        scope: ``"group"`` — α is the group's mean localization reward (the definition);
            ``"batch"`` — α is the batch mean (the original code's behaviour).
        scale: ``"group"`` divides by the group's Bessel std + ``eps``; ``"none"`` only centres.
            ``None`` (default) follows veRL's ``algorithm.norm_adv_by_std_in_grpo`` (True → group).
        eps: added to the std (DESIGN §4: 1e-4).
        difficulty_weights: ``False`` turns the weights off (plain GRPO advantages; ablation).
        weight_source: ``"localization"`` (the reward's per-sample localization score) or
            ``"score"`` (the summed reward; for rewards that are localization only).
        localization_key: the reward's extra-info key holding the localization score.
        weighting: the peers' weightings (DESIGN §9), replacing ω when set: ``"emit"`` — × (1 + share
            of the group's wrong completions, localization ``<= correct_threshold``), × 1 when all are
            wrong (:func:`differad_rl.group_weights.wrong_share_weights_by_id`); ``"univg"`` — × one
            factor of the batch's mean localization ``m``: ``univg_form`` ``"power"`` ``(1.05 − m)^univg_power``,
            ``"exp"`` ``exp(1 − m)``, ``"log"`` ``−log(0.02 + m)`` floored at 0
            (:func:`differad_rl.group_weights.mean_reward_weight`); ``"differad"`` — ω even when
            ``difficulty_weights=false``; ``None`` (default) — ``difficulty_weights`` decides.
        correct_threshold: EMIT's "correct" (localization ``> correct_threshold``; EMIT's rule is ``> 0``).
        univg_form, univg_power: UniVG-R1's factor (defaults: its code's ``"power"``, 1).
    """

    tau: float = 0.3
    scope: Literal["group", "batch"] = "group"
    scale: Literal["group", "none"] | None = None
    eps: float = 1e-4
    difficulty_weights: bool = True
    weight_source: Literal["localization", "score"] = "localization"
    localization_key: str = "localization"
    weighting: Literal["differad", "emit", "univg"] | None = None
    correct_threshold: float = 0.0
    univg_form: Literal["power", "exp", "log"] = "power"
    univg_power: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not 0.0 <= float(self.tau) <= 1.0:
            raise ValueError(f"algorithm.differad.tau must be a number in [0, 1], got {self.tau!r}")
        if self.scope not in ("group", "batch"):
            raise ValueError(f"algorithm.differad.scope must be 'group' or 'batch', got {self.scope!r}")
        if self.scale not in (None, "group", "none"):
            raise ValueError(f"algorithm.differad.scale must be 'group', 'none' or null, got {self.scale!r}")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not float(self.eps) > 0.0:
            raise ValueError(f"algorithm.differad.eps must be a positive number, got {self.eps!r}")
        if not isinstance(self.difficulty_weights, bool):
            raise ValueError(
                f"algorithm.differad.difficulty_weights must be true or false, got {self.difficulty_weights!r}"
            )
        if self.weight_source not in ("localization", "score"):
            raise ValueError(
                f"algorithm.differad.weight_source must be 'localization' or 'score', got {self.weight_source!r}"
            )
        if not isinstance(self.localization_key, str) or not self.localization_key:
            raise ValueError(
                f"algorithm.differad.localization_key must be a non-empty string, got {self.localization_key!r}"
            )
        if self.weighting not in (None, "differad", "emit", "univg"):
            raise ValueError(
                f"algorithm.differad.weighting must be 'differad', 'emit', 'univg' or null, got {self.weighting!r}"
            )
        for name in ("correct_threshold", "univg_power"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                raise ValueError(f"algorithm.differad.{name} must be a finite number, got {value!r}")
        if self.univg_form not in MEAN_REWARD_FORMS:
            raise ValueError(f"algorithm.differad.univg_form must be one of {MEAN_REWARD_FORMS}, got {self.univg_form!r}")

    @property
    def active_weighting(self) -> str | None:
        """The weighting applied: ``weighting`` when set, else ``"differad"`` iff ``difficulty_weights``."""
        if self.weighting is not None:
            return self.weighting
        return "differad" if self.difficulty_weights else None

    @classmethod
    def known_options(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_algorithm_config(cls, config: Any) -> DifferadConfig:
        """Build from veRL's ``algorithm`` config (DictConfig, dict, AlgoConfig or ``None``).

        Reads the ``differad`` sub-section; ``scale`` unset follows ``norm_adv_by_std_in_grpo``.

        Raises:
            ValueError: an unknown option (the message lists the known ones) or an invalid value.
        """
        section = _get(config, ESTIMATOR_NAME)
        options: dict[str, Any] = {}
        if section is not None:
            if not isinstance(section, Mapping) and not hasattr(section, "items"):
                raise ValueError(
                    f"algorithm.differad must be a mapping of options, got {section!r}; "
                    f"known options: {', '.join(cls.known_options())}"
                )
            options = {str(k): _plain(v) for k, v in section.items()}
        unknown = sorted(set(options) - set(cls.known_options()))
        if unknown:
            raise ValueError(
                f"unknown option(s) algorithm.differad.{', algorithm.differad.'.join(unknown)}; "
                f"known options: {', '.join(cls.known_options())}"
            )
        if options.get("scale") is None:
            norm = _get(config, "norm_adv_by_std_in_grpo")
            options["scale"] = "none" if norm is not None and not bool(norm) else "group"
        if isinstance(options.get("tau"), int) and not isinstance(options.get("tau"), bool):
            options["tau"] = float(options["tau"])
        return cls(**options)


def _get(config: Any, key: str) -> Any:
    if config is None:
        return None
    if isinstance(config, Mapping):
        return config.get(key)
    getter = getattr(config, "get", None)
    if callable(getter):
        try:
            return getter(key, None)
        except Exception:  # noqa: BLE001 - dataclass-style configs whose get() differs
            pass
    return getattr(config, key, None)


def _plain(value: Any) -> Any:
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(value):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf comes with veRL
        pass
    return value


@contextlib.contextmanager
def provide_localization(localization: Any) -> Iterator[None]:
    """Make per-sample localization rewards visible to ``differad`` calls inside the block.

    Args:
        localization: ``(bs,)`` array-like aligned with the rows of the batch whose advantages are
            computed inside the block (the order of ``token_level_rewards``).
    """
    token = _LOCALIZATION.set(localization)
    try:
        yield
    finally:
        _LOCALIZATION.reset(token)


def group_ids_from_index(index: Any, device: torch.device | str | None = None) -> torch.Tensor:
    """veRL's per-sample ``uid`` labels → ``(bs,)`` int64 group ids (order of first appearance).

    Integer tensors/arrays pass through; other labels (UUID strings in an object array) are
    factorised with a hash table (``pandas.factorize``: O(bs), no sort).
    """
    if isinstance(index, torch.Tensor) and not index.is_floating_point():
        return index.reshape(-1).to(device=device, dtype=torch.long)
    arr = np.asarray(index).reshape(-1)
    if arr.dtype.kind in "iub":
        return torch.from_numpy(arr.astype(np.int64, copy=False)).to(device)
    import pandas as pd

    codes, _ = pd.factorize(arr.astype(object, copy=False), use_na_sentinel=False)
    return torch.from_numpy(codes.astype(np.int64, copy=False)).to(device)


def compute_differad_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any = None,
    config: Any = None,
    localization: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DifferAD-R1 advantages: group-relative advantages × per-group difficulty weights.

    Args:
        token_level_rewards: ``(bs, response_length)``; the per-sample reward is the row sum.
        response_mask: ``(bs, response_length)``, 1 on response tokens.
        index: ``(bs,)`` veRL ``uid`` of each sample's prompt (its group).
        config: veRL's ``algorithm`` config; options under ``config.differad`` (:class:`DifferadConfig`).
        localization: ``(bs,)`` localization reward of each sample; default: the value given by
            :func:`provide_localization` (the plugin's bridge), see the module docstring.
        **kwargs: other arguments veRL may pass (``reward_baselines``...), ignored.

    Returns:
        ``(advantages, returns)``, both ``(bs, response_length)`` and equal (outcome reward), in the
        dtype/device of ``token_level_rewards``.

    Raises:
        ValueError: no ``index``; invalid/unknown ``algorithm.differad`` options; no localization
            reward available with ``weight_source="localization"``; a length mismatch.
    """
    del kwargs
    cfg = DifferadConfig.from_algorithm_config(config)
    if index is None:
        raise ValueError("the differad estimator needs veRL's uid index (index=None): rollout.n samples per prompt")
    with torch.no_grad():
        scores = token_level_rewards.sum(dim=-1)
        ids = group_ids_from_index(index, device=scores.device)
        if ids.numel() != scores.numel():
            raise ValueError(f"index has {ids.numel()} entries for {scores.numel()} samples")
        adv = group_advantages_by_id(scores, ids, scale=cfg.scale, eps=cfg.eps)
        weighting = cfg.active_weighting
        if weighting is not None:
            loc = _resolve_localization(localization, scores, cfg)
            if weighting == "differad":
                adv = adv * difficulty_weights_by_id(loc, ids, tau=cfg.tau, scope=cfg.scope)
            elif weighting == "emit":
                adv = adv * wrong_share_weights_by_id(loc, ids, float(cfg.correct_threshold))
            else:
                adv = adv * mean_reward_weight(loc, cfg.univg_form, float(cfg.univg_power))
        # cast the (int) mask once into a fresh tensor, then scale it in place: ~3x faster than the
        # mixed-dtype broadcast product, and never writes into the caller's mask (copy=True)
        advantages = response_mask.to(token_level_rewards.dtype, copy=True).mul_(adv.to(token_level_rewards.dtype).unsqueeze(-1))
    return advantages, advantages


def _resolve_localization(localization: Any, scores: torch.Tensor, cfg: DifferadConfig) -> torch.Tensor:
    if localization is None and cfg.weight_source == "score":
        return scores
    if localization is None:
        localization = _LOCALIZATION.get()
    if localization is None:
        raise ValueError(
            "the differad estimator weighs groups by the localization reward, but none reached it. "
            "With veRL's V1 trainer the differad_rl plugin provides it (install differad-rl so that its "
            "verl.plugins entry point loads, and return 'localization' from the reward: "
            "reward.custom_reward_function.path=pkg://differad_rl.integrations.verl.reward); "
            "or set +algorithm.differad.weight_source=score to weigh by the summed reward."
        )
    loc = torch.as_tensor(np.asarray(localization) if not isinstance(localization, torch.Tensor) else localization)
    loc = loc.to(device=scores.device, dtype=scores.dtype).reshape(-1)
    if loc.numel() != scores.numel():
        raise ValueError(f"localization has {loc.numel()} entries for {scores.numel()} samples")
    return loc


def register() -> None:
    """Register :func:`compute_differad_advantage` as veRL's ``differad`` estimator (idempotent)."""
    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, register_adv_est

    if ADV_ESTIMATOR_REGISTRY.get(ESTIMATOR_NAME) is not compute_differad_advantage:
        ADV_ESTIMATOR_REGISTRY.pop(ESTIMATOR_NAME, None)
        register_adv_est(ESTIMATOR_NAME)(compute_differad_advantage)
