"""Start-up checks of a veRL 0.9 trainer config that uses differad-rl's pieces.

veRL validates ``algorithm.*`` extras, reward kwargs and the sampler class only when they are first
used — after the first rollout, or inside Ray reward workers whose ``ValueError`` lands in worker
logs. :func:`check_config` checks everything differad-rl reads, in the driver, before Ray starts:
the plugin (:mod:`differad_rl.integrations.verl.plugin`) wraps ``verl.utils.config.validate_config``
(what ``python -m verl.trainer.main_ppo`` calls first, for the V1 and the legacy trainer alike) so
that :func:`check_config` runs right after veRL's own checks (:func:`install_startup_check`).

Each problem is reported with the option, its value and the fix; all problems are raised at once
as one :class:`ConfigError` (a ``ValueError``). What is checked, when the piece is in use:

- ``algorithm.adv_estimator=differad``: the ``algorithm.differad.*`` options
  (:class:`~differad_rl.integrations.verl.estimator.DifferadConfig`); ``actor_rollout_ref.rollout.n``
  ≥ 2 (one completion per prompt has advantage 0: nothing trains); the V1 trainer when the
  localization bridge is needed (weights from ``localization`` or ``mask_truncated``);
  ``weight_source=score`` only with a score that is the localization alone (differad's own reward
  with ``format_weight=0``, ``localization_weight=1``): else ω leaves [1, 2.066].
- the reward ``pkg://differad_rl.integrations.verl.reward`` / ``compute_score``: its
  ``reward_kwargs`` (:class:`~differad_rl.integrations.verl.reward.RewardOptions`), built as the
  reward builds them.
- group resampling (the ``DifferadAgentLoopManagerTQ`` manager, :class:`ResampleConfig`): the
  ``differad.resample.*`` options (``rule`` one of :data:`RESAMPLE_RULES`, ``correct_threshold``
  only with ``rule=emit``); the V1 trainer; ``n`` ≥ 2, sampling on (``temperature`` > 0,
  ``do_sample``) and rewards computed at rollout time when K > 0; the sampler class matching
  ``trainer.v1.trainer_mode`` (``sync`` → ``DifferadReplayBuffer``, async modes →
  ``DifferadReplayBufferAsync``); DAPO ``filter_groups`` settings passed to a differad sampler.
- a differad sampler in any trainer mode: the class matching ``trainer.v1.trainer_mode``; no unknown
  ``trainer.v1.sampler.sampler_kwargs`` key.
- EasyR1's online filter (``sampler_kwargs.online_filter_*``, :class:`OnlineFilterConfig`): its
  options (``low < high``, no band without a metric); a differad sampler to read them; rewards at
  rollout time; a metric differad's ``compute_score`` returns; in sync mode ``data.gen_batch_size=1``
  and ``sampler_kwargs.train_batch_size`` (unless DAPO is on, which veRL already handles).

- ``actor_rollout_ref.actor.freeze_vision_tower=True`` (made real by
  :mod:`differad_rl.integrations.verl.freeze`): ``actor.strategy`` ``fsdp`` or ``fsdp2`` (another
  engine would silently train the tower); with LoRA (``model.lora_rank`` > 0) no adapter on a
  vision-tower linear layer (``model.exclude_modules='.*visual.*'``); with FSDP1 and
  ``use_orig_params=False`` no custom ``fsdp_config.wrap_policy`` (it would mix frozen and trainable
  tensors in one flat parameter); ``+actor_rollout_ref.differad_vision_cache`` a boolean, and true only
  with a frozen tower.

This module imports neither veRL's trainer nor Ray (only the core, the estimator's config and the
reward's options), so it is cheap in every process.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

from differad_rl.group_filters import Rule, group_rule, resolve_rule

__all__ = [
    "CACHE_OPTION",
    "CONFIG_NODE",
    "ConfigError",
    "FREEZE_OPTION",
    "FREEZE_STRATEGIES",
    "MANAGER_FQN",
    "ONLINE_FILTER_KWARGS",
    "OnlineFilterConfig",
    "PASSED_SAMPLER_KWARGS",
    "RESAMPLE_RULES",
    "REWARD_MODULE",
    "ResampleConfig",
    "SAMPLER_FOR_MODE",
    "SAMPLER_KWARGS",
    "SAMPLER_KWARGS_NODE",
    "TOWER_LINEAR_NAMES",
    "check_config",
    "config_problems",
    "install_startup_check",
    "validate_trainer_config",
]

logger = logging.getLogger(__name__)

CONFIG_NODE = "differad.resample"
"""Where the resampling options live in veRL's config (``+differad.resample.<name>=...``)."""

MANAGER_FQN = "differad_rl.integrations.verl.resampling.DifferadAgentLoopManagerTQ"
"""Value for ``+actor_rollout_ref.rollout.agent.agent_loop_manager_class``."""

RESAMPLE_RULES: tuple[str, ...] = ("differad", "emit")
"""Values of ``differad.resample.rule``: the core rules (:data:`differad_rl.group_filters.GROUP_RULES`)
that ask the same prompt again."""

REWARD_MODULE = "differad_rl.integrations.verl.reward"
"""The module of differad's ``compute_score``."""

SAMPLER_FOR_MODE: Mapping[str, str] = {
    "sync": "DifferadReplayBuffer",
    "colocate_async": "DifferadReplayBufferAsync",
    "separate_async": "DifferadReplayBufferAsync",
}
"""The differad sampler class for each ``trainer.v1.trainer_mode`` (veRL's own choice: the sync
``ReplayBuffer`` for ``sync``, ``ReplayBufferAsync`` for the async modes)."""

_SAMPLER_NAMES = frozenset(SAMPLER_FOR_MODE.values())
_STARTUP_MARK = "__differad_startup_check__"


class ConfigError(ValueError):
    """A differad-rl setting in a veRL config that would fail or silently misbehave later."""


# ------------------------------------------------------------------------------------------------
# config access


def _get(node: Any, key: str) -> Any:
    if node is None:
        return None
    if isinstance(node, Mapping):
        return node.get(key)
    getter = getattr(node, "get", None)
    if callable(getter):
        try:
            return getter(key, None)
        except Exception:  # noqa: BLE001 - dataclass-style configs whose get() differs
            pass
    return getattr(node, key, None)


def _path(config: Any, dotted: str) -> Any:
    node = config
    for key in dotted.split("."):
        node = _get(node, key)
    return node


def _plain(value: Any) -> Any:
    try:  # OmegaConf containers -> python
        from omegaconf import OmegaConf

        if OmegaConf.is_config(value):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf always comes with veRL
        pass
    return value


# ------------------------------------------------------------------------------------------------
# resampling options


@dataclasses.dataclass(frozen=True)
class ResampleConfig:
    """Options of same-prompt group resampling (``+differad.resample.<name>``).

    Attributes:
        rounds: K, regeneration rounds at most (exactly K when a group stays degenerate); 0 turns
            regeneration off while still reporting the degenerate shares.
        metric: the reward extra judged for degeneracy (a key of the reward's extra info);
            ``"reward"`` judges the summed score instead (not recommended, docs/method.md §6).
        tol: std under which a group's rewards count as all equal.
        perfect: the reward of a perfect answer; a group holding one is never degenerate.
        rule: which groups are asked again (:mod:`differad_rl.group_filters`): ``"differad"``
            (the method's degenerate groups: all ``metric`` values equal within ``tol`` and none
            ``>= perfect``) or ``"emit"`` (EMIT's re-roll: every ``metric`` value
            ``<= correct_threshold``, even when they differ). ``tol`` and ``perfect`` are read by
            ``"differad"`` only. The former names ``"degenerate"`` / ``"no_correct"`` still resolve
            (deprecated, with a warning).
        correct_threshold: of ``"emit"`` only (None = 0.0, EMIT's ``<= 0`` on its accuracy
            reward; on the graded localization reward choose the reward of a hit, e.g. 0.5).
    """

    rounds: int = 0
    metric: str = "localization"
    tol: float = 1e-6
    perfect: float = 1.0
    rule: str = "differad"
    correct_threshold: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 0:
            raise ValueError(f"{CONFIG_NODE}.rounds must be an integer >= 0, got {self.rounds!r}")
        if not isinstance(self.metric, str) or not self.metric:
            raise ValueError(f"{CONFIG_NODE}.metric must be a non-empty string, got {self.metric!r}")
        for name in ("tol", "perfect"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{CONFIG_NODE}.{name} must be a finite number, got {value!r}")
        if self.tol <= 0:
            raise ValueError(f"{CONFIG_NODE}.tol must be > 0, got {self.tol!r}")
        try:  # the core's rule names (a deprecated alias warns and is translated)
            resolved: str | None = resolve_rule(self.rule, field=f"{CONFIG_NODE}.rule")
        except ValueError:
            resolved = None
        if resolved not in RESAMPLE_RULES:
            raise ValueError(
                f"{CONFIG_NODE}.rule={self.rule!r} is not a same-prompt re-roll rule; set +{CONFIG_NODE}.rule="
                f"{' or '.join(RESAMPLE_RULES)} (DAPO's zero-variance eviction is algorithm.filter_groups, "
                "EasyR1's band filter trainer.v1.sampler.sampler_kwargs.online_filter_metric)"
            )
        object.__setattr__(self, "rule", resolved)
        if self.correct_threshold is not None:
            value = self.correct_threshold
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{CONFIG_NODE}.correct_threshold must be a finite number, got {value!r}")
            if self.rule != "emit":
                raise ValueError(
                    f"{CONFIG_NODE}.correct_threshold={value!r} is read only by rule=emit, but "
                    f"{CONFIG_NODE}.rule={self.rule!r}; set +{CONFIG_NODE}.rule=emit or drop the threshold"
                )

    def group_rule(self) -> Rule:
        """The core rule these options select (:func:`differad_rl.group_filters.group_rule`)."""
        threshold = 0.0 if self.correct_threshold is None else float(self.correct_threshold)
        return group_rule(self.rule, tol=self.tol, perfect=self.perfect, threshold=threshold)

    @classmethod
    def from_config(cls, config: Any) -> ResampleConfig:
        """Read ``config.differad.resample`` (a veRL DictConfig or a plain mapping).

        A missing node gives the defaults (K = 0). Unknown keys raise ``ValueError`` naming them.
        """
        node = _get(_get(config, "differad"), "resample")
        if node is None:
            return cls()
        if not isinstance(node, Mapping) and not hasattr(node, "items"):
            raise ValueError(f"{CONFIG_NODE} must be a mapping of options, got {node!r}")
        values = {str(k): _plain(v) for k, v in node.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            names = ", ".join(f"{CONFIG_NODE}.{k}" for k in unknown)
            raise ValueError(f"unknown option(s) {names}; known: {sorted(known)}")
        return cls(**values)


# ------------------------------------------------------------------------------------------------
# EasyR1 online filtering options (read by the differad sampler from its sampler_kwargs)


SAMPLER_KWARGS_NODE = "trainer.v1.sampler.sampler_kwargs"
"""Where the online-filter options live: the only config node veRL hands a custom sampler."""

ONLINE_FILTER_KWARGS: tuple[str, ...] = ("online_filter_metric", "online_filter_low", "online_filter_high")
"""The ``sampler_kwargs`` keys of :class:`OnlineFilterConfig`."""

PASSED_SAMPLER_KWARGS: tuple[str, ...] = (
    "filter_groups_metric",
    "train_batch_size",
    "max_inflight_gen_batches",
    "sync_refill_failed_groups",
)
"""veRL ``ReplayBuffer`` arguments a differad sampler takes from its ``sampler_kwargs`` (veRL hands a
custom sampler no ``algorithm.filter_groups`` settings)."""

SAMPLER_KWARGS: tuple[str, ...] = PASSED_SAMPLER_KWARGS + ONLINE_FILTER_KWARGS
"""Every ``sampler_kwargs`` key a differad sampler knows."""


@dataclasses.dataclass(frozen=True)
class OnlineFilterConfig:
    """EasyR1's online filtering in the differad sampler
    (``+trainer.v1.sampler.sampler_kwargs.online_filter_<name>``).

    A finished group is kept iff ``low < mean(metric over its trajectories) < high``
    (:func:`differad_rl.group_filters.out_of_band_groups_by_id`); the others are evicted and new
    prompts drawn, exactly as veRL evicts and refills DAPO's zero-variance groups.

    Attributes:
        metric: what is averaged: a key of the reward's extra info (``"localization"``), or
            ``"reward"`` for the canonical pre-KL score (veRL's ``rm_scores``, as DAPO's
            ``filter_groups.metric=reward`` reads it). None: off.
        low, high: the open band (EasyR1's ``filter_low`` / ``filter_high``: 0.01, 0.99).
    """

    metric: str | None = None
    low: float = 0.01
    high: float = 0.99

    def __post_init__(self) -> None:
        if self.metric is not None and (not isinstance(self.metric, str) or not self.metric):
            raise ValueError(
                f"{SAMPLER_KWARGS_NODE}.online_filter_metric must be a non-empty string (e.g. localization), "
                f"got {self.metric!r}"
            )
        for name in ("low", "high"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{SAMPLER_KWARGS_NODE}.online_filter_{name} must be a finite number, got {value!r}")
        if not self.low < self.high:
            raise ValueError(
                f"{SAMPLER_KWARGS_NODE}.online_filter_low={self.low!r} must be < online_filter_high={self.high!r} "
                "(the band is open: keep iff low < group mean < high; EasyR1: 0.01, 0.99)"
            )

    @property
    def enabled(self) -> bool:
        return self.metric is not None

    @classmethod
    def from_sampler_kwargs(cls, kwargs: Any) -> OnlineFilterConfig:
        """Read the ``online_filter_*`` keys of a sampler_kwargs mapping (other keys ignored).

        A band given without ``online_filter_metric`` raises: the filter would be silently off.
        """
        values = {str(k): _plain(v) for k, v in (kwargs or {}).items() if str(k) in ONLINE_FILTER_KWARGS}
        if values and values.get("online_filter_metric") is None:
            given = ", ".join(f"{SAMPLER_KWARGS_NODE}.{k}" for k in sorted(values))
            raise ValueError(
                f"{given} set without {SAMPLER_KWARGS_NODE}.online_filter_metric, so the online filter is off; "
                f"set +{SAMPLER_KWARGS_NODE}.online_filter_metric=localization"
            )
        return cls(**{k.removeprefix("online_filter_"): v for k, v in values.items()})


def _sampler_problems(config: Any) -> list[str]:
    """The differad sampler class against ``trainer.v1.trainer_mode``."""
    name = _path(config, "trainer.v1.sampler.custom_sampler.name")
    if name not in _SAMPLER_NAMES:
        return []
    mode = str(_path(config, "trainer.v1.trainer_mode") or "sync")
    want = SAMPLER_FOR_MODE.get(mode)
    if want is None or want == name:
        return []
    why = (
        "the sync ReplayBuffer ignores max_off_policy_threshold and lacks the async polling methods"
        if name == "DifferadReplayBuffer"
        else "the async buffer's staleness rules assume asynchronous rollout"
    )
    return [
        f"trainer.v1.sampler.custom_sampler.name={name} does not fit trainer.v1.trainer_mode={mode} ({why}); "
        f"set trainer.v1.sampler.custom_sampler.name={want}"
    ]


def _online_filter_problems(config: Any) -> list[str]:
    """``sampler_kwargs``: unknown keys for a differad sampler; the online filter's options, its sampler,
    rewards at rollout time, its metric, and single-prompt refills in sync mode."""
    kwargs = _plain(_path(config, SAMPLER_KWARGS_NODE)) or {}
    name = _path(config, "trainer.v1.sampler.custom_sampler.name")
    problems: list[str] = []
    if name in _SAMPLER_NAMES:
        unknown = sorted(set(map(str, kwargs)) - set(SAMPLER_KWARGS))
        if unknown:
            problems.append(
                f"unknown option(s) {', '.join(f'{SAMPLER_KWARGS_NODE}.{k}' for k in unknown)} for "
                f"trainer.v1.sampler.custom_sampler.name={name}; known: {', '.join(SAMPLER_KWARGS)}"
            )
    if not any(str(k) in ONLINE_FILTER_KWARGS for k in kwargs):
        return problems
    try:
        cfg = OnlineFilterConfig.from_sampler_kwargs(kwargs)
    except ValueError as err:
        return problems + [str(err)]
    if name not in _SAMPLER_NAMES:
        mode = str(_path(config, "trainer.v1.trainer_mode") or "sync")
        return problems + [
            f"{SAMPLER_KWARGS_NODE}.online_filter_metric={cfg.metric} is read only by differad's sampler, but "
            f"trainer.v1.sampler.custom_sampler.name={name}: the groups would not be filtered; set "
            f"trainer.v1.sampler.custom_sampler.path=pkg://differad_rl.integrations.verl.resampling and "
            f"trainer.v1.sampler.custom_sampler.name={SAMPLER_FOR_MODE.get(mode, 'DifferadReplayBuffer')}"
        ]
    option = f"{SAMPLER_KWARGS_NODE}.online_filter_metric"
    problems += _rollout_reward_problems(config, f"{option}={cfg.metric}")
    problems += _metric_problems(config, option, cfg.metric)
    filter_groups = _path(config, "algorithm.filter_groups")
    dapo = bool(filter_groups is not None and _get(filter_groups, "enable"))
    if str(_path(config, "trainer.v1.trainer_mode") or "sync") == "sync" and not dapo:
        # veRL forces single-prompt fetches only for DAPO, failed-group refills and the async modes
        gen_batch_size = _path(config, "data.gen_batch_size")
        if gen_batch_size != 1:
            problems.append(
                f"{SAMPLER_KWARGS_NODE}.online_filter_metric={cfg.metric} refills evicted groups one prompt at a "
                f"time, but data.gen_batch_size={gen_batch_size} (the dataloader would hand out whole batches "
                "and the sync sampler would wait forever); set data.gen_batch_size=1"
            )
        train_batch_size = _path(config, "data.train_batch_size")
        if _get(kwargs, "train_batch_size") != train_batch_size:
            problems.append(
                f"{SAMPLER_KWARGS_NODE}.online_filter_metric={cfg.metric} in trainer_mode=sync bounds its refills "
                f"by the batch size, which veRL does not pass to a custom sampler; set "
                f"+{SAMPLER_KWARGS_NODE}.train_batch_size={train_batch_size} (got {_get(kwargs, 'train_batch_size')!r})"
            )
    return problems


def _rollout_reward_problems(config: Any, setting: str) -> list[str]:
    """``setting`` judges groups on rewards computed at rollout time: refuse a reward model scored after it."""
    reward_model = _path(config, "reward.reward_model")
    if _get(reward_model, "enable") and not _get(reward_model, "enable_resource_pool"):
        return [
            f"{setting} judges groups on rewards computed at rollout time, but reward.reward_model.enable=True "
            "without reward.reward_model.enable_resource_pool=True scores after the rollout; set "
            "reward.reward_model.enable_resource_pool=True (or use a rule-based reward)"
        ]
    return []


def _metric_problems(config: Any, option: str, metric: str | None) -> list[str]:
    """``option`` = ``metric`` must be ``"reward"`` or a key differad's ``compute_score`` returns."""
    if metric == "reward" or not _uses_differad_reward(config):
        return []
    from differad_rl.integrations.verl.reward import REWARD_KEYS

    if metric in REWARD_KEYS:
        return []
    return [
        f"{option}={metric!r} is not returned by differad's compute_score (it returns {', '.join(REWARD_KEYS)}); "
        f"set +{option}=localization"
    ]


def _resample_problems(config: Any, cfg: ResampleConfig) -> list[str]:
    problems: list[str] = []
    if _path(config, "trainer.use_v1") is False:
        problems.append(
            "differad group resampling runs in veRL's V1 trainer only; got trainer.use_v1=False: "
            "set trainer.use_v1=True (the 0.9 default)"
        )
    rollout = _path(config, "actor_rollout_ref.rollout")
    n = _get(rollout, "n")
    if cfg.rounds > 0:
        if n is not None and int(n) < 2:
            problems.append(
                f"{CONFIG_NODE}.rounds={cfg.rounds} needs groups: actor_rollout_ref.rollout.n={n} < 2; "
                "set actor_rollout_ref.rollout.n=8 (docs/method.md §1)"
            )
        temperature = _get(rollout, "temperature")
        if temperature is not None and float(temperature) <= 0.0:
            problems.append(
                f"{CONFIG_NODE}.rounds={cfg.rounds} with actor_rollout_ref.rollout.temperature={temperature}: "
                "greedy decoding regenerates the very same group, so every round is spent for nothing; set "
                f"actor_rollout_ref.rollout.temperature=1.0 or +{CONFIG_NODE}.rounds=0"
            )
        if _get(rollout, "do_sample") is False:
            problems.append(
                f"{CONFIG_NODE}.rounds={cfg.rounds} with actor_rollout_ref.rollout.do_sample=False: greedy "
                f"groups are never regenerated; set actor_rollout_ref.rollout.do_sample=True or +{CONFIG_NODE}.rounds=0"
            )
        problems += _rollout_reward_problems(config, f"{CONFIG_NODE}.rounds={cfg.rounds}")
    problems += _metric_problems(config, f"{CONFIG_NODE}.metric", cfg.metric)
    filter_groups = _path(config, "algorithm.filter_groups")
    name = _path(config, "trainer.v1.sampler.custom_sampler.name")
    if filter_groups is not None and _get(filter_groups, "enable") and name in _SAMPLER_NAMES:
        kwargs = _path(config, "trainer.v1.sampler.sampler_kwargs") or {}
        want = {
            "filter_groups_metric": _get(filter_groups, "metric"),
            "train_batch_size": _path(config, "data.train_batch_size"),
        }
        for key, value in want.items():
            if _get(kwargs, key) != value:
                problems.append(
                    f"algorithm.filter_groups.enable=True with trainer.v1.sampler.custom_sampler.name={name}: "
                    "veRL passes no filter-groups settings to a custom sampler, so set "
                    f"+trainer.v1.sampler.sampler_kwargs.{key}={value} (got {_get(kwargs, key)!r})"
                )
    return problems


def validate_trainer_config(config: Any) -> ResampleConfig:
    """Check a whole veRL trainer config for resampling; return the :class:`ResampleConfig`.

    Raises:
        ValueError: unknown/invalid ``differad.resample`` options (from :class:`ResampleConfig`), or
            :class:`ConfigError` listing the trainer-level problems (module docstring).
    """
    cfg = ResampleConfig.from_config(config)
    problems = _resample_problems(config, cfg) + _sampler_problems(config) + _online_filter_problems(config)
    if problems:
        raise ConfigError("; ".join(problems))
    if cfg.rounds > 0 and _path(config, "actor_rollout_ref.rollout.full_determinism"):
        logger.warning(
            "actor_rollout_ref.rollout.full_determinism=True: regenerated groups may repeat the same "
            "completions (request ids are deterministic), so resampling cannot help"
        )
    return cfg


# ------------------------------------------------------------------------------------------------
# estimator and reward


def _uses_differad_reward(config: Any) -> bool:
    path = str(_path(config, "reward.custom_reward_function.path") or "")
    name = str(_path(config, "reward.custom_reward_function.name") or "compute_score")
    module_path = path.removeprefix("pkg://").removesuffix(".py").replace("/", ".")
    return name == "compute_score" and module_path.endswith(("differad_rl.integrations.verl.reward", "integrations.verl.reward"))


def _reward_options(config: Any) -> tuple[Any, list[str]]:
    """differad's ``RewardOptions`` from ``reward.custom_reward_function.reward_kwargs``, as the reward builds them."""
    from differad_rl.integrations.verl.reward import RewardOptions

    kwargs = _plain(_path(config, "reward.custom_reward_function.reward_kwargs")) or {}
    prefix = "reward.custom_reward_function.reward_kwargs"
    unknown = sorted(set(kwargs) - set(RewardOptions.known_options()))
    if unknown:
        return None, [
            f"unknown option(s) {', '.join(f'{prefix}.{k}' for k in unknown)}; known: "
            f"{', '.join(RewardOptions.known_options())}"
        ]
    try:
        return RewardOptions(**kwargs), []
    except (TypeError, ValueError) as err:
        return None, [f"{prefix}: {err}"]


def _estimator_problems(config: Any, reward_options: Any) -> list[str]:
    from differad_rl.integrations.verl.estimator import ESTIMATOR_NAME, DifferadConfig

    algorithm = _get(config, "algorithm")
    if str(_get(algorithm, "adv_estimator")) != ESTIMATOR_NAME:
        return []
    try:
        cfg = DifferadConfig.from_algorithm_config(algorithm)
    except ValueError as err:
        return [str(err)]
    problems: list[str] = []
    n = _path(config, "actor_rollout_ref.rollout.n")
    if n is not None and int(n) < 2:
        problems.append(
            f"algorithm.adv_estimator=differad compares the completions of a prompt, but "
            f"actor_rollout_ref.rollout.n={n}: every advantage is 0 and nothing trains; set "
            "actor_rollout_ref.rollout.n=8 (docs/method.md §1)"
        )
    bridge = (cfg.difficulty_weights and cfg.weight_source == "localization") or cfg.mask_truncated
    if bridge and _path(config, "trainer.use_v1") is False:
        needs = [n for n, on in (("difficulty weights from the localization reward",
                                  cfg.difficulty_weights and cfg.weight_source == "localization"),
                                 ("algorithm.differad.mask_truncated=True", cfg.mask_truncated)) if on]
        problems.append(
            f"algorithm.adv_estimator=differad with {' and '.join(needs)} needs veRL's V1 trainer (the plugin's "
            "bridge hands the localization reward and response length to the estimator there); got "
            "trainer.use_v1=False: set trainer.use_v1=True (the veRL 0.9 default)"
        )
    if cfg.difficulty_weights and cfg.weight_source == "score" and reward_options is not None:
        if reward_options.format_weight != 0 or reward_options.localization_weight != 1:
            problems.append(
                "+algorithm.differad.weight_source=score weighs groups by the summed reward, but differad's "
                f"compute_score returns score = {reward_options.localization_weight:g}·localization + "
                f"{reward_options.format_weight:g}·format, which leaves [0, 1] (the difficulty weight would fall "
                "below 1); keep +algorithm.differad.weight_source=localization (the default), or set "
                "+reward.custom_reward_function.reward_kwargs.format_weight=0 and localization_weight=1"
            )
    return problems


# ------------------------------------------------------------------------------------------------
# the vision-tower freeze

FREEZE_OPTION = "actor_rollout_ref.actor.freeze_vision_tower"
"""The option :mod:`differad_rl.integrations.verl.freeze` makes veRL's FSDP engine honour."""

CACHE_OPTION = "actor_rollout_ref.differad_vision_cache"
"""Off switch of the frozen tower's feature cache (:mod:`differad_rl.integrations.verl.freeze`; default on)."""

FREEZE_STRATEGIES = ("fsdp", "fsdp2")
"""The ``actor.strategy`` values whose engine (veRL's ``FSDPEngine``) the plugin freezes the tower in."""

TOWER_LINEAR_NAMES: tuple[str, ...] = (
    # Qwen2-VL
    "model.visual.blocks.0.attn.qkv", "model.visual.blocks.0.attn.proj", "model.visual.blocks.0.mlp.fc1",
    "model.visual.blocks.0.mlp.fc2", "model.visual.merger.mlp.0", "model.visual.merger.mlp.2",
    # Qwen2.5-VL
    "model.visual.blocks.0.mlp.gate_proj", "model.visual.blocks.0.mlp.up_proj", "model.visual.blocks.0.mlp.down_proj",
    # Qwen3-VL
    "model.visual.blocks.0.mlp.linear_fc1", "model.visual.blocks.0.mlp.linear_fc2", "model.visual.merger.linear_fc1",
    "model.visual.merger.linear_fc2", "model.visual.deepstack_merger_list.0.linear_fc1",
)
"""Linear layers of the Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision towers (module names as peft sees them),
against which the LoRA settings are checked."""

_TOWER_LORA_FIX = "actor_rollout_ref.model.exclude_modules='.*visual.*'"


def _peft_matches(spec: Any, name: str) -> bool:
    """Whether peft's ``target_modules`` / ``exclude_modules`` value ``spec`` selects the module ``name``
    (a string is a full-match regular expression, a list matches names equal to or ending in ``.item``)."""
    import re

    if spec is None:
        return False
    if isinstance(spec, str):
        return spec == "all-linear" or re.fullmatch(spec, name) is not None
    return any(name == str(item) or name.endswith(f".{item}") for item in spec)


def _vision_freeze_problems(config: Any) -> list[str]:
    """``freeze_vision_tower=True``: an engine the plugin freezes, no LoRA adapter on the tower, and an
    FSDP1 wrap policy that keeps the frozen tower out of trainable units."""
    actor = _path(config, "actor_rollout_ref.actor")
    cache = _path(config, CACHE_OPTION)
    if cache is not None and not isinstance(cache, bool):
        return [f"+{CACHE_OPTION} must be true or false, got {cache!r}"]
    if not _get(actor, "freeze_vision_tower"):
        if cache:
            return [
                f"+{CACHE_OPTION}=true caches the vision tower's features, which is exact only for a frozen tower, "
                f"but {FREEZE_OPTION}=False; set {FREEZE_OPTION}=True (or drop +{CACHE_OPTION})"
            ]
        return []
    problems: list[str] = []
    strategy = str(_get(actor, "strategy") or "fsdp")
    if strategy not in FREEZE_STRATEGIES:
        problems.append(
            f"{FREEZE_OPTION}=True is read nowhere in veRL 0.9.1; differad-rl honours it in the FSDP engine only, "
            f"but actor_rollout_ref.actor.strategy={strategy}: the tower would silently train; set "
            f"actor_rollout_ref.actor.strategy=fsdp (or fsdp2), or {FREEZE_OPTION}=False"
        )
    model = _path(config, "actor_rollout_ref.model")
    lora_rank = _get(model, "lora_rank") or 0
    if int(lora_rank) > 0:
        target = _plain(_get(model, "target_modules"))
        exclude = _plain(_get(model, "exclude_modules"))
        adapted = [n for n in TOWER_LINEAR_NAMES if _peft_matches(target, n) and not _peft_matches(exclude, n)]
        if adapted:
            problems.append(
                f"{FREEZE_OPTION}=True with actor_rollout_ref.model.lora_rank={lora_rank} and "
                f"target_modules={target!r}, exclude_modules={exclude!r}: LoRA adapters would train inside the "
                f"vision tower (e.g. {adapted[0]}); set {_TOWER_LORA_FIX} (or {FREEZE_OPTION}=False)"
            )
    fsdp = _get(actor, "fsdp_config")
    if strategy == "fsdp" and not _get(fsdp, "use_orig_params"):
        wrap = _get(fsdp, "wrap_policy")
        custom = [
            f"actor_rollout_ref.actor.fsdp_config.wrap_policy.{key}={_plain(_get(wrap, key))!r}"
            for key, off in (("disable", False), ("min_num_params", 0), ("transformer_layer_cls_to_wrap", None))
            if _get(wrap, key) not in (off, None)
        ]
        if custom:
            problems.append(
                f"{FREEZE_OPTION}=True with strategy=fsdp and {', '.join(custom)}: the plugin wraps the frozen tower "
                "as its own FSDP unit through the default policy (the model's _no_split_modules); this policy "
                "would put frozen and trainable tensors into one flat parameter, which FSDP1 refuses without "
                "use_orig_params; remove the wrap_policy setting, or set "
                "actor_rollout_ref.actor.fsdp_config.use_orig_params=True"
            )
    return problems


# ------------------------------------------------------------------------------------------------
# entry points


def config_problems(config: Any) -> list[str]:
    """Every problem :func:`check_config` would raise, one message each (empty: fine)."""
    problems: list[str] = []
    reward_options = None
    if _uses_differad_reward(config):
        reward_options, found = _reward_options(config)
        problems += found
    problems += _estimator_problems(config, reward_options)
    manager = _path(config, "actor_rollout_ref.rollout.agent.agent_loop_manager_class")
    if manager == MANAGER_FQN:
        try:
            cfg = ResampleConfig.from_config(config)
        except ValueError as err:
            problems.append(str(err))
        else:
            problems += _resample_problems(config, cfg)
    problems += _sampler_problems(config) + _online_filter_problems(config)
    problems += _vision_freeze_problems(config)
    return problems


def check_config(config: Any) -> None:
    """Raise :class:`ConfigError` listing every differad-rl problem of a veRL trainer config.

    Args:
        config: veRL's whole trainer config (Hydra DictConfig or a nested mapping).

    Raises:
        ConfigError: one message per problem, each naming the option, its value and the fix.
    """
    problems = config_problems(config)
    if problems:
        raise ConfigError(
            "differad-rl found problems in the veRL config:\n" + "\n".join(f"  - {p}" for p in problems)
        )


def _wrap_validate_config(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def validate_config(config: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(config, *args, **kwargs)
        check_config(config)
        return result

    setattr(validate_config, _STARTUP_MARK, True)
    return validate_config


def install_startup_check() -> None:
    """Run :func:`check_config` whenever veRL validates a trainer config (idempotent).

    Wraps ``verl.utils.config.validate_config``; ``verl.trainer.main_ppo`` imports that name when it
    runs (after ``import verl`` has loaded this plugin), so ``python -m verl.trainer.main_ppo``
    calls the wrapped function in the driver before Ray starts. A ``main_ppo`` imported before the
    plugin is patched in place.
    """
    import sys

    from verl.utils import config as verl_config

    if not getattr(verl_config.validate_config, _STARTUP_MARK, False):
        verl_config.validate_config = _wrap_validate_config(verl_config.validate_config)
    for name in ("verl.trainer.main_ppo", "__main__"):
        module = sys.modules.get(name)
        current = getattr(module, "validate_config", None)
        if current is not None and not getattr(current, _STARTUP_MARK, False) and getattr(
            current, "__module__", None
        ) == "verl.utils.config":
            module.validate_config = verl_config.validate_config
