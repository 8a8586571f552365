"""Same-prompt group resampling (docs/method.md §6) and EasyR1's online filter inside veRL 0.9's V1 trainer.

No plugin import is needed: veRL loads these classes from the configuration by name
(``actor_rollout_ref.rollout.agent.agent_loop_manager_class`` and
``trainer.v1.sampler.custom_sampler``); the Ray workers import this module when they unpickle
the worker class.

What it does
------------
A group (the ``n`` completions of one prompt) is *degenerate* when all its localization rewards
are equal and none is perfect. :class:`DifferadAgentLoopWorkerTQ` overrides veRL's per-prompt
rollout (``AgentLoopWorkerTQ._run_prompt``, where all ``n`` samples of a prompt and their rewards
are known together): it runs the ``n`` agent loops as veRL does, scores them through veRL's reward
loop, and hands the localization rewards to the core driver
:func:`differad_rl.group_filters.regenerate_groups`, which asks for the whole group again — same
prompt, ``n`` fresh samples, re-scored — for at most K rounds while the rule selects it.
``differad.resample.rule`` picks the core rule: ``differad`` (the default, the method's degenerate
groups, :func:`differad_rl.groups.degenerate_groups`) or ``emit`` (EMIT's re-roll: no completion
with reward ``> correct_threshold``, even when the rewards differ,
:func:`differad_rl.group_filters.no_correct_groups`). Only the final group is written to the
TransferQueue (``{uid}_{session}_{index}`` keys, exactly veRL's layout), then the prompt is marked
``finished``. The decision is taken where all ``n`` samples of the prompt are, so every worker, on
any number of nodes, takes the same decision for its prompts without a collective.

Degeneracy is judged on the reward's ``localization`` extra (what
:func:`differad_rl.integrations.verl.compute_score` returns, landing in
``extra_fields["reward_extra_info"]``), not on the summed score: a group whose boxes are all wrong
but whose format rewards differ has a non-zero score spread and carries only format signal.

veRL's DAPO dynamic sampling (``algorithm.filter_groups``: evict zero-variance groups, draw new
prompts) is a different algorithm; it stays usable on top (see :class:`DifferadReplayBuffer`), so
both can run side by side or one at a time for comparison.

EasyR1's online filtering (keep a group iff ``low < mean metric < high``, default (0.01, 0.99);
evict the others and draw new prompts) runs in the same sampler, on veRL's DAPO eviction-and-refill
loop, with or without DAPO and with or without resampling (:class:`_ResampleMetricsMixin`)::

    +trainer.v1.sampler.sampler_kwargs.online_filter_metric=localization   # or reward (the score)
    +trainer.v1.sampler.sampler_kwargs.online_filter_low=0.01
    +trainer.v1.sampler.sampler_kwargs.online_filter_high=0.99
    +trainer.v1.sampler.sampler_kwargs.train_batch_size=<data.train_batch_size>   # sync mode
    data.gen_batch_size=1                                                # sync mode (refills per prompt)

They live in ``sampler_kwargs`` because that is the only config node veRL hands a custom sampler.
Evicted groups are counted in ``training/filter_groups/evicted_samples`` (veRL's, DAPO's included)
and ``training/differad_filter/evicted_samples`` (the out-of-band ones).

Configuration (a top-level ``differad.resample`` node, with ``+`` on the command line because
veRL's schema does not know it; an extra key under ``actor_rollout_ref.rollout.agent`` would break
veRL's conversion of the rollout node to its ``RolloutConfig`` dataclass in every worker)::

    +actor_rollout_ref.rollout.agent.agent_loop_manager_class=differad_rl.integrations.verl.resampling.DifferadAgentLoopManagerTQ
    trainer.v1.sampler.custom_sampler.path=pkg://differad_rl.integrations.verl.resampling
    trainer.v1.sampler.custom_sampler.name=DifferadReplayBuffer       # DifferadReplayBufferAsync for
    #   trainer.v1.trainer_mode=colocate_async|separate_async (a mismatch is refused at start-up)
    +differad.resample.rounds=2          # K; 0 = off (the statistics are still reported)
    +differad.resample.metric=localization
    +differad.resample.tol=1e-6
    +differad.resample.perfect=1.0
    +differad.resample.rule=differad   # or emit (EMIT's re-roll)
    +differad.resample.correct_threshold=0.5   # emit only: "correct" = reward > this (default 0)

Statistics, per training step, in the logged metrics (``training/differad_resample/...``):
``groups/total`` (groups in the batch that carry a record), ``groups_resampled/total``,
``regenerations/total``, ``rounds_used/max`` and ``rounds_used/mean`` over groups,
``degenerate_before`` and ``degenerate_after`` (shares of groups the rule selects: degenerate ones
under the default rule). Each trajectory also carries its group's record in
``extra_fields["differad_resample"]``.

Only veRL's V1 trainer (``trainer.use_v1=True``, the 0.9 default) is supported; validation
rollouts are never resampled.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import dataclasses
import functools
import logging
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import ray
import torch
from verl.experimental.agent_loop import AgentLoopOutput
from verl.trainer.ppo.v1 import agent_loop_tq as _agent_loop_tq
from verl.trainer.ppo.v1.agent_loop_tq import AgentLoopManagerTQ, apply_greedy_sampling_params
from verl.trainer.ppo.v1 import replay_buffer as _replay_buffer
from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer, ReplayBufferAsync

from differad_rl.group_filters import out_of_band_groups_by_id, regenerate_groups
from differad_rl.integrations.verl.checks import (
    CONFIG_NODE,
    MANAGER_FQN,
    PASSED_SAMPLER_KWARGS,
    SAMPLER_KWARGS,
    SAMPLER_KWARGS_NODE,
    OnlineFilterConfig,
    ResampleConfig,
    _get,
    _plain,
    validate_trainer_config,
)
from differad_rl.resampling import ResampleStats

__all__ = [
    "CONFIG_NODE",
    "MANAGER_FQN",
    "METRIC_PREFIX",
    "RECORD_KEY",
    "DifferadAgentLoopManagerTQ",
    "DifferadAgentLoopWorkerTQ",
    "DifferadReplayBuffer",
    "DifferadReplayBufferAsync",
    "FILTER_METRIC_PREFIX",
    "OnlineFilterConfig",
    "ResampleConfig",
    "group_record",
    "resample_metrics",
    "validate_trainer_config",
]

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "WARN"))

RECORD_KEY = "differad_resample"
"""Key of the per-group record in each trajectory's ``extra_fields``."""

METRIC_PREFIX = "training/differad_resample/"
"""Prefix of the logged statistics."""

FILTER_METRIC_PREFIX = "differad_filter/"
"""Prefix (after veRL's ``training/``) of the online filter's eviction count."""

_SAMPLER_NAMES = ("DifferadReplayBuffer", "DifferadReplayBufferAsync")
_DRIVER_THREADS = 64

# veRL decorates AgentLoopWorkerTQ with @ray.remote; subclass the plain class underneath.
_WorkerTQBase: type = _agent_loop_tq.AgentLoopWorkerTQ.__ray_actor_class__

# Set while a group is being generated for resampling: the agent loops' post-processing then scores
# the samples and hands them back instead of writing them to the TransferQueue.
_COLLECTING: contextvars.ContextVar[bool] = contextvars.ContextVar("differad_resample_collecting", default=False)


# ------------------------------------------------------------------------------------------------
# configuration: ResampleConfig and validate_trainer_config live in .checks (no veRL trainer import),
# where the plugin's start-up check uses them too; re-exported here.


# ------------------------------------------------------------------------------------------------
# per-group records and batch statistics


def group_record(stats: ResampleStats) -> dict[str, float]:
    """The per-group record stored in each trajectory's ``extra_fields[RECORD_KEY]``.

    ``stats`` is the driver's result for one group, so ``groups_resampled``, ``degenerate_before``
    and ``degenerate_after`` are 0 or 1.
    """
    return {
        "rounds_used": float(stats.rounds_used),
        "regenerations": float(stats.regenerations),
        "groups_resampled": float(stats.groups_resampled),
        "degenerate_before": float(stats.degenerate_before),
        "degenerate_after": float(stats.degenerate_after),
    }


def resample_metrics(uids: Sequence[str], extra_fields: Sequence[Any], prefix: str = METRIC_PREFIX) -> dict[str, float]:
    """Batch statistics from the trajectories' records, one record per group (``uid``).

    Returns ``{}`` when no trajectory carries a record (resampling not in use). With ``g`` groups
    carrying one: ``groups/total = g``, ``groups_resampled/total`` and ``regenerations/total``
    summed, ``rounds_used/max`` and ``rounds_used/mean`` over groups, ``degenerate_before`` /
    ``degenerate_after`` the shares of degenerate groups. The names make veRL's V1
    ``MetricsAggregator`` combine several sampling iterations of one step correctly
    (``/total`` summed, ``/max`` maxed, the shares averaged weighted by samples).
    """
    if len(uids) != len(extra_fields):
        raise ValueError(f"uids ({len(uids)}) and extra_fields ({len(extra_fields)}) differ in length")
    per_group: dict[str, Mapping[str, float]] = {}
    for uid, extra in zip(uids, extra_fields):
        record = extra.get(RECORD_KEY) if isinstance(extra, Mapping) else None
        if record is not None and uid not in per_group:
            per_group[uid] = record
    if not per_group:
        return {}
    keys = ("rounds_used", "regenerations", "groups_resampled", "degenerate_before", "degenerate_after")
    table = np.array([[float(r[k]) for k in keys] for r in per_group.values()], dtype=np.float64)
    rounds, regen, resampled, before, after = table.T
    return {
        f"{prefix}groups/total": float(len(per_group)),
        f"{prefix}groups_resampled/total": float(resampled.sum()),
        f"{prefix}regenerations/total": float(regen.sum()),
        f"{prefix}rounds_used/max": float(rounds.max()),
        f"{prefix}rounds_used/mean": float(rounds.mean()),
        f"{prefix}degenerate_before": float(before.mean()),
        f"{prefix}degenerate_after": float(after.mean()),
    }


# ------------------------------------------------------------------------------------------------
# the agent-loop worker and manager


@dataclasses.dataclass
class _Sample:
    """One scored session of a group, held back from the TransferQueue until the group is final."""

    outputs: list[AgentLoopOutput]
    validate: bool
    kwargs: dict[str, Any]
    localization: float


class DifferadAgentLoopWorkerTQ(_WorkerTQBase):
    """veRL's ``AgentLoopWorkerTQ`` with same-prompt group resampling in ``_run_prompt``.

    Everything else — agent loops, tokenisation, multimodal inputs, reward computation, the
    TransferQueue layout — is veRL's own code; this class only holds a group back until the core
    driver has decided it is final.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.resample_config = validate_trainer_config(self.config)
        self._rule = self.resample_config.group_rule()
        self._driver_pool: ThreadPoolExecutor | None = None

    # -- hooks into veRL ---------------------------------------------------------------------

    async def _agent_loop_postprocess(self, output: Any, validate: bool, **kwargs: Any) -> Any:
        """While a group is collected: score the session and return it instead of storing it."""
        if not _COLLECTING.get():
            return await super()._agent_loop_postprocess(output, validate, **kwargs)
        outputs = output if isinstance(output, list) else [output]
        if not outputs:
            raise ValueError(f"agent loop returned no output for prompt {kwargs.get('uid')}")
        await self._compute_score(outputs, kwargs=kwargs)
        return _Sample(outputs, validate, kwargs, self._localization(outputs[-1]))

    async def _run_prompt(self, prompt: dict, sampling_params: dict, trajectory: dict, trace: bool = False) -> None:
        """Run the ``n`` sessions of one prompt, resample the group while the rule selects it, store it."""
        if trajectory["validate"]:
            return await super()._run_prompt(prompt, sampling_params, trajectory, trace)
        tq = _agent_loop_tq.tq
        uid, partition_id = prompt["uid"], "train"
        await tq.async_kv_put(key=uid, partition_id=partition_id, tag={"status": "running"})
        status = "failure"
        try:
            config = self.config.actor_rollout_ref.rollout
            n = int(prompt.pop("__rollout_n__", config.n))
            do_sample = prompt.pop("__do_sample__", True)
            params = dict(sampling_params)
            if not do_sample:
                apply_greedy_sampling_params(params)
            # greedy decoding would regenerate the very same group, and a single sample is no
            # group: report, don't regenerate
            rounds = self.resample_config.rounds if do_sample and n >= 2 else 0
            group = await self._resample_group(prompt, params, trajectory, trace, n, rounds)
            for sample in group:
                await _WorkerTQBase._agent_loop_postprocess(self, sample.outputs, sample.validate, **sample.kwargs)
            status = "finished"
        except Exception as e:  # veRL's contract: a failed prompt is marked, never raised
            logger.exception(f"differad resampling failed for uid={uid}: {e}")
        await tq.async_kv_put(key=uid, partition_id=partition_id, tag={"status": status})

    # -- the group loop ----------------------------------------------------------------------

    async def _generate_group(self, prompt: dict, params: dict, trajectory: dict, trace: bool, n: int) -> list[_Sample]:
        """``n`` fresh sessions of ``prompt`` through veRL's agent loops, scored, in session order."""
        token = _COLLECTING.set(True)
        try:
            tasks = [
                asyncio.create_task(
                    self._run_agent_loop(params, trajectory=trajectory, trace=trace, session_id=i, **prompt)
                )
                for i in range(n)
            ]
        finally:
            _COLLECTING.reset(token)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return list(results)

    async def _resample_group(
        self, prompt: dict, params: dict, trajectory: dict, trace: bool, n: int, rounds: int
    ) -> list[_Sample]:
        state = {"group": await self._generate_group(prompt, params, trajectory, trace, n)}
        rewards = torch.tensor([s.localization for s in state["group"]], dtype=torch.float64)
        driver = functools.partial(regenerate_groups, rule=self._rule)
        if rounds == 0 or not bool(self._rule(rewards, n).any()):
            # the driver will not regenerate: run it inline for its statistics
            _, stats = driver(rewards, n, _never_called, rounds)
        else:
            loop = asyncio.get_running_loop()

            def regenerate(groups: torch.Tensor, round_index: int) -> torch.Tensor:
                # runs in a driver thread; the event loop keeps serving every other prompt
                future = asyncio.run_coroutine_threadsafe(
                    self._generate_group(prompt, params, trajectory, trace, n), loop
                )
                state["group"] = future.result()
                return torch.tensor([s.localization for s in state["group"]], dtype=torch.float64)

            _, stats = await loop.run_in_executor(self._pool(), driver, rewards, n, regenerate, rounds)
        record = group_record(stats)
        for sample in state["group"]:
            for output in sample.outputs:
                output.extra_fields[RECORD_KEY] = dict(record)
        return state["group"]

    def _localization(self, output: AgentLoopOutput) -> float:
        metric = self.resample_config.metric
        if output.reward_score is None:
            raise ValueError(
                "differad resampling needs rewards at rollout time (rule-based reward, or "
                "reward.reward_model.enable_resource_pool=True); the reward loop returned none"
            )
        if metric == "reward":
            return float(output.reward_score)
        info = output.extra_fields.get("reward_extra_info") or {}
        if metric not in info:
            raise ValueError(
                f"{CONFIG_NODE}.metric={metric!r}: the reward returned no such extra "
                f"(it returned {sorted(info)}); use differad_rl.integrations.verl.compute_score"
            )
        return float(info[metric])

    def _pool(self) -> ThreadPoolExecutor:
        if self._driver_pool is None:
            self._driver_pool = ThreadPoolExecutor(_DRIVER_THREADS, thread_name_prefix="differad-resample")
        return self._driver_pool


def _never_called(groups: torch.Tensor, round_index: int) -> torch.Tensor:
    raise AssertionError("the driver regenerated a group the rule did not select")  # pragma: no cover


class DifferadAgentLoopManagerTQ(AgentLoopManagerTQ):
    """veRL's V1 ``AgentLoopManagerTQ`` whose workers resample degenerate groups.

    Select it with ``+actor_rollout_ref.rollout.agent.agent_loop_manager_class=`` :data:`MANAGER_FQN`
    (``differad_rl.integrations.verl.resampling.DifferadAgentLoopManagerTQ``).
    The configuration is validated here, in the trainer process, before any worker starts.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        config = kwargs.get("config", args[0] if args else None)
        self.resample_config = validate_trainer_config(config)
        sampler = _get(_get(_get(_get(config, "trainer"), "v1"), "sampler"), "custom_sampler")
        if _get(sampler, "name") not in _SAMPLER_NAMES:
            logger.warning(
                "differad resampling is on but its statistics are logged only with "
                "trainer.v1.sampler.custom_sampler.path=pkg://%s and .name=DifferadReplayBuffer "
                "(DifferadReplayBufferAsync for async trainer modes)",
                __name__,
            )
        super().__init__(*args, **kwargs)
        # AgentLoopManagerTQ.__init__ installs veRL's worker; use ours (a Ray actor class).
        self.agent_loop_workers_class = ray.remote(DifferadAgentLoopWorkerTQ)


# ------------------------------------------------------------------------------------------------
# replay buffers: veRL's sampling (DAPO filter_groups included) + EasyR1's online filter + statistics


class _ResampleMetricsMixin:
    """veRL's replay buffer + EasyR1's online filter + :func:`resample_metrics` in the sampler metrics.

    veRL hands a custom sampler no ``algorithm.filter_groups`` settings; to keep DAPO's dynamic
    sampling usable side by side, pass them through ``trainer.v1.sampler.sampler_kwargs``:
    ``filter_groups_metric`` (= ``algorithm.filter_groups.metric``), ``train_batch_size``
    (= ``data.train_batch_size``) and optionally ``max_inflight_gen_batches``,
    ``sync_refill_failed_groups``. :class:`DifferadAgentLoopManagerTQ` checks they agree.

    The online filter (``sampler_kwargs.online_filter_metric`` / ``_low`` / ``_high``,
    :class:`~differad_rl.integrations.verl.checks.OnlineFilterConfig`) rides on veRL's DAPO
    machinery: :meth:`_dapo_filtered_keys` returns DAPO's zero-variance groups (when DAPO is on)
    united with the finished groups whose mean ``metric`` is not strictly inside ``(low, high)``
    (:func:`differad_rl.group_filters.out_of_band_groups_by_id`), so veRL's own loop evicts them
    and draws new prompts with DAPO's refill rule (sync: ``2k`` refill credits per ``k`` evicted
    groups, at most ``max_inflight_gen_batches × train_batch_size`` prompts in flight, surplus
    discarded; async: ``k`` new prompts). veRL switches that loop on with ``filter_groups_metric``;
    with the online filter alone it is set to the filter's metric, :attr:`dapo_metric` keeps
    the real DAPO setting (None: no zero-variance eviction).
    """

    _PASSED = PASSED_SAMPLER_KWARGS

    def __init__(self, *args: Any, sampler_kwargs: Any = None, **kwargs: Any) -> None:
        extra = {str(k): _plain(v) for k, v in (sampler_kwargs or {}).items()}
        unknown = sorted(set(extra) - set(SAMPLER_KWARGS))
        if unknown:
            raise ValueError(f"unknown {SAMPLER_KWARGS_NODE} {unknown}; known: {list(SAMPLER_KWARGS)}")
        self.online_filter = OnlineFilterConfig.from_sampler_kwargs(extra)
        for key in self._PASSED:
            if key in extra and kwargs.get(key) is None:
                kwargs[key] = extra[key]
        self.dapo_metric: str | None = kwargs.get("filter_groups_metric")
        if self.dapo_metric is None and self.online_filter.enabled:
            kwargs["filter_groups_metric"] = self.online_filter.metric  # veRL's switch for evict-and-refill
        if kwargs.get("filter_groups_metric") is not None or kwargs.get("sync_refill_failed_groups"):
            kwargs["gen_batch_size"] = 1  # what veRL's trainer passes its own sampler in these modes
        super().__init__(*args, sampler_kwargs=sampler_kwargs, **kwargs)
        if self.online_filter.enabled and self.train_batch_size is None and not isinstance(self, ReplayBufferAsync):
            raise ValueError(
                f"{SAMPLER_KWARGS_NODE}.online_filter_metric in trainer_mode=sync needs "
                f"+{SAMPLER_KWARGS_NODE}.train_batch_size=<data.train_batch_size> (it bounds the refills in flight)"
            )
        # partition -> {uid: out of band?}; finished groups are immutable, like veRL's DAPO cache
        self._band_cache: dict[str, dict[str, bool]] = collections.defaultdict(dict)

    def _dapo_filtered_keys(self, partition_id: str) -> tuple[set[str], collections.Counter]:
        """DAPO's zero-variance groups (when on) ∪ the online filter's out-of-band groups."""
        if self.dapo_metric is not None:
            uids, counts = super()._dapo_filtered_keys(partition_id)
        else:
            uids, counts = set(), collections.Counter()
        if partition_id == "val" or not self.online_filter.enabled:
            return uids, counts
        return uids | self._out_of_band_keys(partition_id), counts

    def _out_of_band_keys(self, partition_id: str) -> set[str]:
        """Finished groups whose mean ``online_filter.metric`` is not strictly inside the band."""
        cfg = self.online_filter
        finished = self.finished_keys[partition_id]
        cache = self._band_cache[partition_id]
        for uid in cache.keys() - finished:
            del cache[uid]
        new = sorted(finished - cache.keys())
        if new:
            values, missing = self._group_values(partition_id, set(new), cfg.metric)
            if missing:
                raise RuntimeError(
                    f"finished groups are missing the online filter metric {cfg.metric!r}: {sorted(missing)[:5]}"
                )
            rewards = [v for uid in new for v in values[uid]]
            ids = [i for i, uid in enumerate(new) for _ in values[uid]]
            out = out_of_band_groups_by_id(rewards, ids, cfg.low, cfg.high)
            cache.update({uid: bool(out[i]) for i, uid in enumerate(new)})
        return {uid for uid, out in cache.items() if out}

    def _group_values(
        self, partition_id: str, uids: set[str], metric: str
    ) -> tuple[dict[str, list[float]], set[str]]:
        """``metric`` of every trajectory of ``uids``, read as veRL's DAPO reads it (``"reward"`` = the
        sum of ``rm_scores``, any other name = ``extra_fields["reward_extra_info"][metric]``), and the
        uids with no trajectory or a trajectory lacking the metric."""
        keys = [key for key in self.partitions[partition_id] if key.split("_")[0] in uids]
        values: dict[str, list[float]] = collections.defaultdict(list)
        missing = uids - {key.split("_")[0] for key in keys}
        if not keys:
            return values, missing
        field = "rm_scores" if metric == "reward" else "extra_fields"
        data = list(_replay_buffer.tq.kv_batch_get(keys=keys, partition_id=partition_id, select_fields=[field])[field])
        for key, value in zip(keys, data, strict=True):
            if metric == "reward":
                values[key.split("_")[0]].append(float(value.sum().item()))
                continue
            extra = getattr(value, "data", value)
            info = extra.get("reward_extra_info", {}) if isinstance(extra, Mapping) else {}
            if metric in info:
                values[key.split("_")[0]].append(float(info[metric]))
            else:
                missing.add(key.split("_")[0])
        return values, missing

    def _evict_terminal_groups(self, global_steps: int, partition_id: str, eviction_reasons: tuple) -> tuple:
        """veRL's eviction, plus ``training/differad_filter/evicted_samples``: the evicted groups that
        were out of band (veRL's ``filter_groups/evicted_samples`` counts DAPO's and these together)."""
        band = {uid for uid in eviction_reasons[1] if self._band_cache[partition_id].get(uid)}
        evicted, stale_count, dapo_count, metrics = super()._evict_terminal_groups(
            global_steps, partition_id, eviction_reasons
        )
        if band:
            metrics[f"{self._metrics_prefix(partition_id)}/{FILTER_METRIC_PREFIX}evicted_samples"] = len(band)
        return evicted, stale_count, dapo_count, metrics

    def sample(self, global_steps: int, partition_id: str, batch_size: int) -> tuple[Any, dict]:
        batch, metrics = super().sample(global_steps, partition_id, batch_size)
        if partition_id != "val" and batch.keys:
            data = _replay_buffer.tq.kv_batch_get(
                keys=batch.keys, partition_id=batch.partition_id, select_fields=["extra_fields"]
            )
            extra = [getattr(value, "data", value) for value in list(data["extra_fields"])]
            metrics = {**metrics, **resample_metrics([k.split("_")[0] for k in batch.keys], extra)}
        return batch, metrics


class DifferadReplayBuffer(_ResampleMetricsMixin, ReplayBuffer):
    """veRL's sync ``ReplayBuffer`` + online filter + resampling statistics
    (``trainer.v1.sampler.custom_sampler.name=DifferadReplayBuffer``)."""


class DifferadReplayBufferAsync(_ResampleMetricsMixin, ReplayBufferAsync):
    """veRL's ``ReplayBufferAsync`` + online filter + resampling statistics (async trainer modes)."""
