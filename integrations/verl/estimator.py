"""The ``differad`` advantage estimator for veRL: group advantages × difficulty weights.

For the samples of one prompt (veRL's ``uid`` index, any order — the trainer balances and shuffles
the batch), with ``r`` the summed reward (``token_level_rewards.sum(-1)``) and ``l`` the
**localization** reward of each sample (docs/method.md §4–§5)::

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
2. :func:`provide_batch_context` — installed by the plugin's localization bridge
   (:func:`differad_rl.integrations.verl.compat.install_localization_bridge`) around veRL's V1
   ``PPOTrainer._compute_advantage``, which reads ``reward_extra_info["localization"]`` of each
   trajectory from the TransferQueue;
3. with ``+algorithm.differad.weight_source=score``, the summed reward itself — only for a reward
   that IS the localization score, in [0, 1]: a score outside [0, 1] raises (ω would leave
   [1, 2.066]; differad's own ``compute_score`` adds the format reward unless
   ``reward_kwargs.format_weight=0``).

Otherwise the estimator raises ``ValueError`` rather than weigh by the wrong signal. veRL's
deprecated legacy trainer (``trainer.use_v1=False``) has no bridge; the start-up check
(:mod:`differad_rl.integrations.verl.checks`) refuses it with the localization weights on.

Multi-output sessions: an agent loop may return several outputs per session (``{uid}_{session}_{i}``
TransferQueue keys). As veRL's own GRPO (``compute_advantage_for_multi_trajectories``), only the
final output of each session enters the group statistics, and its advantage is broadcast to the
other outputs of the session; the bridge provides the layout (``session_of_row``).

Truncated completions (``mask_truncated=True``, docs/method.md §1): a completion that used the whole
response budget (``actor_rollout_ref.rollout.response_length`` generated tokens, provided by the
bridge) gets advantage 0 after the group statistics are taken — it adds no policy-gradient term,
as TRL's ``mask_truncated_completions``; its reward still counts in its group's mean and std.

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

from differad_rl.group_weights import MEAN_REWARD_FORMS
from differad_rl.groups import group_advantages_by_id
from differad_rl.registry import advantage_weights, check_weighting

__all__ = [
    "ESTIMATOR_NAME",
    "DifferadConfig",
    "compute_differad_advantage",
    "group_ids_from_index",
    "BatchContext",
    "provide_batch_context",
    "provide_localization",
    "register",
    "session_layout",
]

ESTIMATOR_NAME = "differad"
"""``algorithm.adv_estimator`` value that selects this estimator."""

_SCORE_RANGE_TOL = 1e-6


@dataclasses.dataclass(frozen=True)
class BatchContext:
    """What the bridge knows about the batch beyond veRL's estimator arguments (rows in batch order).

    Attributes:
        localization: ``(bs,)`` localization reward of each row, or ``None``.
        session_of_row: ``(bs,)`` int index of each row's session, with ``final_rows[s]`` the row of
            session ``s``'s final output; ``None`` when every session has one output.
        final_rows: ``(sessions,)`` int rows of the final outputs, or ``None``.
        response_length: the rollout's response budget (tokens), for ``mask_truncated``; or ``None``.
    """

    localization: Any = None
    session_of_row: Any = None
    final_rows: Any = None
    response_length: int | None = None


_CONTEXT: contextvars.ContextVar[BatchContext | None] = contextvars.ContextVar("differad_batch", default=None)


@dataclasses.dataclass(frozen=True)
class DifferadConfig:
    """Options of the ``differad`` estimator (``algorithm.differad.*``), the paper's defaults.

    Attributes:
        tau: missed-detection threshold; a sample with localization reward ``< tau`` is a miss (β).
        scope: ``"group"`` — α is the group's mean localization reward (the definition);
            ``"batch"`` — α is the batch mean (the original code's behaviour).
        scale: ``"group"`` divides by the group's Bessel std + ``eps``; ``"none"`` only centres.
            ``None`` (default) follows veRL's ``algorithm.norm_adv_by_std_in_grpo`` (True → group).
        eps: added to the std (docs/method.md §4: 1e-4).
        difficulty_weights: ``False`` turns the weights off (plain GRPO advantages; ablation).
        weight_source: ``"localization"`` (the reward's per-sample localization score) or
            ``"score"`` (the summed reward; for rewards that are localization only).
        localization_key: the reward's extra-info key holding the localization score.
        weighting: the peers' weightings (docs/method.md §9), replacing ω when set: ``"emit"`` — × (1 + share
            of the group's wrong completions, localization ``<= correct_threshold``), × 1 when all are
            wrong (:func:`differad_rl.group_weights.wrong_share_weights_by_id`); ``"univg"`` — × one
            factor of the batch's mean localization ``m``: ``univg_form`` ``"power"`` ``(1.05 − m)^univg_power``,
            ``"exp"`` ``exp(1 − m)``, ``"log"`` ``−log(0.02 + m)`` floored at 0
            (:func:`differad_rl.group_weights.mean_reward_weight`); ``"differad"`` — ω even when
            ``difficulty_weights=false``; ``None`` (default) — ``difficulty_weights`` decides.
        correct_threshold: EMIT's "correct" (localization ``> correct_threshold``; EMIT's rule is ``> 0``).
        univg_form, univg_power: UniVG-R1's factor (defaults: its code's ``"power"``, 1).
        mask_truncated: ``True`` zeroes the advantage of completions that used the whole response
            budget (module docstring); needs the response length, which the bridge provides.
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
    mask_truncated: bool = False

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
        if not isinstance(self.mask_truncated, bool):
            raise ValueError(f"algorithm.differad.mask_truncated must be true or false, got {self.mask_truncated!r}")
        if not isinstance(self.localization_key, str) or not self.localization_key:
            raise ValueError(
                f"algorithm.differad.localization_key must be a non-empty string, got {self.localization_key!r}"
            )
        check_weighting(self.weighting, field="algorithm.differad.weighting")
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
def provide_batch_context(context: BatchContext) -> Iterator[None]:
    """Make ``context`` visible to ``differad`` calls inside the block (the bridge's hand-over)."""
    token = _CONTEXT.set(context)
    try:
        yield
    finally:
        _CONTEXT.reset(token)


@contextlib.contextmanager
def provide_localization(localization: Any) -> Iterator[None]:
    """Make per-sample localization rewards visible to ``differad`` calls inside the block.

    Args:
        localization: ``(bs,)`` array-like aligned with the rows of the batch whose advantages are
            computed inside the block (the order of ``token_level_rewards``).
    """
    with provide_batch_context(BatchContext(localization=localization)):
        yield


def session_layout(keys: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """TransferQueue keys ``{uid}_{session}_{index}`` → ``(session_of_row, final_rows)``, as veRL's GRPO.

    The final output of a session is its highest ``index``. Returns ``None`` when every session
    has exactly one output (the single-turn case: nothing to select).

    Raises:
        ValueError: a key not in veRL's ``{uid}_{session}_{index}`` layout.
    """
    sessions: dict[str, int] = {}
    session_of_row = np.empty(len(keys), dtype=np.int64)
    final: list[tuple[int, int]] = []  # per session: (index, row)
    for row, key in enumerate(keys):
        parts = str(key).rsplit("_", 2)
        if len(parts) != 3 or not parts[2].lstrip("-").isdigit():
            raise ValueError(f"TransferQueue key {key!r} is not veRL's '{{uid}}_{{session}}_{{index}}' layout")
        s = sessions.setdefault(f"{parts[0]}_{parts[1]}", len(sessions))
        index = int(parts[2])
        if s == len(final):
            final.append((index, row))
        elif final[s][0] < index:
            final[s] = (index, row)
        session_of_row[row] = s
    if len(final) == len(keys):
        return None
    return session_of_row, np.asarray([row for _, row in final], dtype=np.int64)


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
            :func:`provide_batch_context` (the plugin's bridge), see the module docstring.
        **kwargs: other arguments veRL may pass (``reward_baselines``...), ignored.

    Returns:
        ``(advantages, returns)``, both ``(bs, response_length)`` and equal (outcome reward), in the
        dtype/device of ``token_level_rewards``. With a multi-output session layout in the batch
        context, every output of a session carries its final output's advantage.

    Raises:
        ValueError: no ``index``; invalid/unknown ``algorithm.differad`` options; no localization
            reward available with ``weight_source="localization"``; ``weight_source="score"`` with a
            score outside [0, 1]; ``mask_truncated`` without a known response length; a length mismatch.
    """
    del kwargs
    cfg = DifferadConfig.from_algorithm_config(config)
    context = _CONTEXT.get() or BatchContext()
    if index is None:
        raise ValueError("the differad estimator needs veRL's uid index (index=None): rollout.n samples per prompt")
    with torch.no_grad():
        scores = token_level_rewards.sum(dim=-1)
        ids = group_ids_from_index(index, device=scores.device)
        if ids.numel() != scores.numel():
            raise ValueError(f"index has {ids.numel()} entries for {scores.numel()} samples")
        loc = _resolve_localization(localization, context, scores, cfg) if cfg.active_weighting else None
        if context.final_rows is not None:  # only each session's final output enters the statistics
            rows = torch.as_tensor(np.asarray(context.final_rows), device=scores.device, dtype=torch.long)
            back = torch.as_tensor(np.asarray(context.session_of_row), device=scores.device, dtype=torch.long)
            if back.numel() != scores.numel():
                raise ValueError(f"session layout has {back.numel()} rows for {scores.numel()} samples")
            adv = _advantages(scores[rows], ids[rows], None if loc is None else loc[rows], cfg)[back]
        else:
            adv = _advantages(scores, ids, loc, cfg)
        if cfg.mask_truncated:
            adv = adv.masked_fill(_truncated(response_mask, context.response_length), 0.0)
        # cast the (int) mask once into a fresh tensor, then scale it in place: ~3x faster than the
        # mixed-dtype broadcast product, and never writes into the caller's mask (copy=True)
        advantages = response_mask.to(token_level_rewards.dtype, copy=True).mul_(adv.to(token_level_rewards.dtype).unsqueeze(-1))
    return advantages, advantages


def _advantages(scores: torch.Tensor, ids: torch.Tensor, loc: torch.Tensor | None, cfg: DifferadConfig) -> torch.Tensor:
    """Group advantages × the active weighting (ω, EMIT's or UniVG-R1's) of ``loc`` (None: unweighted)."""
    adv = group_advantages_by_id(scores, ids, scale=cfg.scale, eps=cfg.eps)
    weighting = cfg.active_weighting
    if loc is None or weighting is None:
        return adv
    return adv * advantage_weights(weighting, loc, ids, tau=cfg.tau, scope=cfg.scope,  # type: ignore[arg-type]
                                   correct_threshold=float(cfg.correct_threshold), univg_form=cfg.univg_form,
                                   univg_power=float(cfg.univg_power))


def _truncated(response_mask: torch.Tensor, response_length: int | None) -> torch.Tensor:
    """Rows whose response used the whole budget: last response token at position >= budget - 1."""
    if response_length is None:
        raise ValueError(
            "algorithm.differad.mask_truncated=True needs the rollout's response length, which the differad "
            "plugin's bridge provides in veRL's V1 trainer (trainer.use_v1=True); set "
            "+algorithm.differad.mask_truncated=false elsewhere"
        )
    positions = torch.arange(1, response_mask.size(-1) + 1, device=response_mask.device)
    length = (positions * (response_mask != 0)).amax(dim=-1)
    return length >= int(response_length)


def _resolve_localization(
    localization: Any, context: BatchContext, scores: torch.Tensor, cfg: DifferadConfig
) -> torch.Tensor:
    if localization is None and cfg.weight_source == "score":
        low, high = float(scores.min()), float(scores.max())
        if low < -_SCORE_RANGE_TOL or high > 1.0 + _SCORE_RANGE_TOL:
            raise ValueError(
                f"algorithm.differad.weight_source=score weighs groups by the summed reward, which must be a "
                f"localization score in [0, 1]; got rewards in [{low:.4g}, {high:.4g}] (the difficulty weight "
                "would leave [1, 2.066]). Keep weight_source=localization (the default; the reward returns "
                "'localization'), or make the reward the localization score alone "
                "(+reward.custom_reward_function.reward_kwargs.format_weight=0 with differad's compute_score)."
            )
        return scores
    if localization is None:
        localization = context.localization
    if localization is None:
        raise ValueError(
            "the differad estimator weighs groups by the localization reward, but none reached it. "
            "With veRL's V1 trainer the differad_rl plugin provides it (install differad-rl so that its "
            "verl.plugins entry point loads, and return 'localization' from the reward: "
            "reward.custom_reward_function.path=pkg://differad_rl.integrations.verl.reward); "
            "or set +algorithm.differad.difficulty_weights=false for plain group advantages."
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
