"""Same-prompt group resampling inside veRL 0.9's V1 rollout (integrations/verl/resampling.py).

What runs for real: veRL's ``AgentLoopWorkerTQ`` (our subclass) fanning a TensorDict batch out
(``generate_sequences`` → ``_run_prompt`` → ``_run_agent_loop``), veRL's ``SingleTurnAgentLoop``
(chat template, Continuous-Token prompt building with two images, multimodal post-processing),
veRL's ``RewardLoopWorker`` + reward manager loading the reward by path, veRL's TransferQueue
post-processing (``AgentLoopWorkerTQ._agent_loop_postprocess``) and veRL's ``ReplayBuffer`` /
``ReplayBufferAsync`` sampling (DAPO ``filter_groups`` included). Generation is real sampling of the
tiny random Qwen2.5-VL through :class:`HFGenerationClient` (veRL's server-client interface).

What is replaced in the fast tests, and why: the TransferQueue store (:class:`MemoryTQ`, the
calls veRL makes) — the real one needs a Ray cluster plus controller and storage actors; the Ray
handle of the reward worker (an in-process adapter exposing ``.compute_score.remote``). The slow
``test_ray_transferqueue_end_to_end`` runs the same through the real thing: veRL's manager creating
our worker as Ray actors, the real TransferQueue, veRL's reward-loop worker as a Ray actor.
Everywhere: qwen_vl_utils' image extraction (needs torchvision, not installed) is replaced by a
dataset class that returns the PIL images as they are, and the tiny build's processor is set on the
worker after veRL's init (veRL's ``HFModelConfig`` cannot resolve its custom processor class).
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("verl")
pytest.importorskip("ray")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from verl.utils.dataset.rl_dataset import RLHFDataset  # noqa: E402

from differad_rl.resampling import resample_groups  # noqa: E402

N = 4  # rollout.n
RESPONSE_LENGTH = 10
GT = [[10, 10, 40, 40]]


# ------------------------------------------------------------------------------------------------
# loaded by veRL by path (reward.custom_reward_function.path / data.custom_cls.path = this file)


def score_for_test(data_source: Any, solution_str: str, ground_truth: Any, extra_info: Any, **kwargs: Any) -> dict:
    """The package's reward; ``extra_info["mode"]`` can replace its localization (other keys kept).

    ``real``: differad's compute_score (a random tiny model never finds the box → all 0 →
    degenerate); ``spread``: a value in [0, 0.9] from the completion's hash (distinct completions →
    a spread group); ``perfect``: 1.0 (a perfect group is never degenerate); ``half``: 0.5 (zero
    variance, mean inside EasyR1's band); ``low``: a value in [0, 0.009] from the hash (spread, mean
    below the band).
    """
    from differad_rl.integrations.verl import compute_score

    out = compute_score(data_source, solution_str, ground_truth, extra_info, **kwargs)
    mode = (extra_info or {}).get("mode", "real")
    if mode == "spread":
        out["localization"] = int(hashlib.sha256(solution_str.encode()).hexdigest()[:6], 16) % 901 / 1000
    elif mode == "perfect":
        out["localization"] = 1.0
    elif mode == "half":
        out["localization"] = 0.5
    elif mode == "low":
        out["localization"] = int(hashlib.sha256(solution_str.encode()).hexdigest()[:6], 16) % 10 / 1000
    return out


class PILImagesDataset(RLHFDataset):
    """RLHFDataset whose image extraction returns the messages' PIL images unchanged."""

    @classmethod
    def _process_multi_modal_info(cls, messages, image_patch_size, config):
        images = [
            item["image"]
            for message in messages
            if isinstance(message.get("content"), list)
            for item in message["content"]
            if isinstance(item, dict) and item.get("type") == "image"
        ]
        return images or None, None, None


# ------------------------------------------------------------------------------------------------
# an in-memory TransferQueue (only the calls veRL's worker and replay buffer make)


class MemoryTQ:
    def __init__(self) -> None:
        self.tags: dict[str, dict[str, dict]] = {}
        self.fields: dict[str, dict[str, Any]] = {}

    def init(self, *args: Any, **kwargs: Any) -> None:
        pass

    def _put(self, key: str, partition_id: str, field: Any, tag: dict | None) -> None:
        self.tags.setdefault(partition_id, {}).setdefault(key, {}).update(tag or {})
        if field is not None:
            self.fields.setdefault(partition_id, {})[key] = field

    async def async_kv_put(self, key, partition_id, fields=None, tag=None, data_parser=None) -> None:
        self._put(key, partition_id, fields, tag)

    async def async_kv_batch_put(self, keys, partition_id, fields=None, tags=None, data_parser=None) -> None:
        for i, key in enumerate(keys):
            self._put(key, partition_id, None if fields is None else fields[i], None if tags is None else tags[i])

    def kv_batch_put(self, keys, partition_id, fields=None, tags=None, data_parser=None) -> None:
        for i, key in enumerate(keys):
            self._put(key, partition_id, None if fields is None else fields[i], None if tags is None else tags[i])

    def kv_list(self, partition_id: str | None = None) -> dict:
        if partition_id is not None:
            return {partition_id: {k: dict(v) for k, v in self.tags.get(partition_id, {}).items()}}
        return {p: {k: dict(v) for k, v in d.items()} for p, d in self.tags.items()}

    def kv_clear(self, keys, partition_id) -> None:
        for key in [keys] if isinstance(keys, str) else keys:
            self.tags.get(partition_id, {}).pop(key, None)
            self.fields.get(partition_id, {}).pop(key, None)

    def kv_batch_get(self, keys, partition_id, select_fields=None) -> dict:
        names = [select_fields] if isinstance(select_fields, str) else list(select_fields)
        rows = [self.fields[partition_id][k] for k in ([keys] if isinstance(keys, str) else keys)]
        return {name: [row[name] for row in rows] for name in names}

    def extra(self, key: str, partition_id: str = "train") -> dict:
        value = self.fields[partition_id][key]["extra_fields"]
        return getattr(value, "data", value)


class _RemoteMethod:
    def __init__(self, fn):
        self.remote = fn


class InProcessRewardHandle:
    """Stands in for the Ray handle of veRL's RewardLoopWorker: ``handle.compute_score.remote(data)``."""

    def __init__(self, worker):
        self.compute_score = _RemoteMethod(worker.compute_score)


# ------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def env():
    from hydra import compose, initialize_config_module
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker

    from differad_rl.integrations.qwen_vl.tiny import load_tiny_qwen_vl, tiny_model_for
    from differad_rl.integrations.verl.cpu_backend import HFGenerationClient

    model_path = tiny_model_for("qwen2_5_vl")
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        cfg = compose(
            config_name="ppo_trainer",
            overrides=[
                f"actor_rollout_ref.model.path={model_path}",
                "actor_rollout_ref.rollout.name=vllm",
                f"actor_rollout_ref.rollout.n={N}",
                "actor_rollout_ref.rollout.prompt_length=512",
                f"actor_rollout_ref.rollout.response_length={RESPONSE_LENGTH}",
                f"reward.custom_reward_function.path={__file__}",
                "reward.custom_reward_function.name=score_for_test",
                "+reward.custom_reward_function.reward_kwargs.space=qwen2_5_vl",
                f"data.custom_cls.path={__file__}",
                "data.custom_cls.name=PILImagesDataset",
                "data.train_batch_size=3",
                "+differad.resample.rounds=2",
            ],
        )
    model, processor = load_tiny_qwen_vl(model_path)
    return {
        "cfg": cfg,
        "reward": InProcessRewardHandle(RewardLoopWorker(cfg)),
        "model": model,
        "processor": processor,
    }


def with_options(cfg, **resample):
    from omegaconf import OmegaConf, open_dict

    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        for key, value in resample.items():
            OmegaConf.update(cfg, f"differad.resample.{key}", value, force_add=True)
    return cfg


def make_worker(env, monkeypatch, **resample):
    """Our worker class (the plain class under the Ray actor), wired to an in-memory TQ."""
    import verl.trainer.ppo.v1.agent_loop_tq as agent_loop_tq
    import verl.trainer.ppo.v1.replay_buffer as replay_buffer
    import verl.trainer.ppo.v1.trainer_base as trainer_base

    from differad_rl.integrations.verl.cpu_backend import HFGenerationClient
    from differad_rl.integrations.verl.resampling import DifferadAgentLoopWorkerTQ

    store = MemoryTQ()
    monkeypatch.setattr(agent_loop_tq, "tq", store)
    monkeypatch.setattr(replay_buffer, "tq", store)
    monkeypatch.setattr(trainer_base, "tq", store)
    cfg = with_options(env["cfg"], **resample)
    client = HFGenerationClient(cfg, env["model"], env["processor"], seed=0)
    worker = DifferadAgentLoopWorkerTQ(cfg, client, None, [env["reward"]])
    worker.processor = env["processor"]
    return worker, client, store


def prompt_batch(modes: list[str], *, validate: bool = False, prefix: str = ""):
    """A batch as the V1 trainer submits it: veRL's collate_fn over RLHFDataset-style rows + uid."""
    import verl.utils.tensordict_utils as tu
    from PIL import Image
    from verl.utils.dataset.rl_dataset import collate_fn

    rng = np.random.default_rng(0)
    rows = []
    for i, mode in enumerate(modes):
        images = [Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)) for _ in range(2)]
        content = [{"type": "image", "image": im} for im in images]
        content.append({"type": "text", "text": "Reference first, target second: box the defect."})
        rows.append(
            {
                "raw_prompt": [{"role": "user", "content": content}],
                "data_source": "differad",
                "reward_model": {"style": "rule", "ground_truth": GT},
                "extra_info": {"space": "qwen2_5_vl", "width": 56, "height": 56, "index": i, "mode": mode},
                "index": i,
                "tools_kwargs": {},
                "interaction_kwargs": {},
                "dummy_tensor": torch.tensor([0], dtype=torch.uint8),
            }
        )
    batch = collate_fn(rows)
    batch["uid"] = np.array([f"{prefix}{mode}{i}" for i, mode in enumerate(modes)], dtype=object)
    td = tu.get_tensordict(batch)
    tu.assign_non_tensor_data(td, "global_steps", 1)
    if validate:
        tu.assign_non_tensor_data(td, "validate", True)
    return td


def rollout(worker, batch) -> None:
    """Submit ``batch`` with veRL's own trainer code (prompt tags, then the manager's
    ``generate_sequences``, here the worker's: one fire-and-forget task per prompt); wait."""
    from types import SimpleNamespace

    from verl.trainer.ppo.v1.trainer_base import PPOTrainer
    from verl.utils.ray_utils import get_event_loop

    loop = get_event_loop()
    validate = "validate" in batch.keys()
    if validate:
        loop.run_until_complete(worker.generate_sequences(batch))
    else:
        manager = SimpleNamespace(generate_sequences=lambda b: loop.run_until_complete(worker.generate_sequences(b)))
        PPOTrainer._submit_batch_to_rollout(
            SimpleNamespace(trainer_mode="sync", global_steps=1, agent_loop_manager=manager), batch
        )

    async def drain():
        while worker.background_tasks:
            await asyncio.gather(*list(worker.background_tasks))

    loop.run_until_complete(drain())


def group_keys(store: MemoryTQ, uid: str, partition_id: str = "train") -> list[str]:
    return sorted(k for k in store.tags.get(partition_id, {}) if k.startswith(f"{uid}_"))


# ------------------------------------------------------------------------------------------------
# through veRL's real agent-loop code


def test_degenerate_group_regenerated_exactly_k_rounds_others_untouched(env, monkeypatch):
    from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer

    from differad_rl.integrations.verl.resampling import RECORD_KEY, DifferadReplayBuffer

    worker, client, store = make_worker(env, monkeypatch, rounds=2)
    rollout(worker, prompt_batch(["real", "spread", "perfect"]))

    # 3 prompts × n = 12 first samples, + 2 regeneration rounds × n for the degenerate group only
    assert client.requests == 3 * N + 2 * N
    for uid in ("real0", "spread1", "perfect2"):
        assert store.tags["train"][uid]["status"] == "finished"
        # only the final group is stored: exactly n sessions, veRL's key layout
        assert group_keys(store, uid) == [f"{uid}_{s}_0" for s in range(N)]
    records = {uid: store.extra(f"{uid}_0_0")[RECORD_KEY] for uid in ("real0", "spread1", "perfect2")}
    assert records["real0"] == {
        "rounds_used": 2.0,
        "regenerations": 2.0,
        "groups_resampled": 1.0,
        "degenerate_before": 1.0,
        "degenerate_after": 1.0,  # a random model stays wrong: exactly K rounds, then kept
    }
    for uid in ("spread1", "perfect2"):
        assert records[uid]["rounds_used"] == 0.0 and records[uid]["degenerate_before"] == 0.0
    # the judged signal is the reward's localization extra, as stored with each trajectory
    locs = [store.extra(k)["reward_extra_info"]["localization"] for k in group_keys(store, "spread1")]
    assert len(set(locs)) > 1
    assert all(store.extra(k)["reward_extra_info"]["localization"] == 0.0 for k in group_keys(store, "real0"))

    # the statistics land in the step's metrics through veRL's own sampling (sync replay buffer)
    buffer = DifferadReplayBuffer(
        trainer_mode="sync",
        trainer_config={},
        max_off_policy_threshold=None,
        max_off_policy_strategy="drop",
        sampler_kwargs={},
        refill_fn=lambda k: pytest.fail("no refill expected"),
        train_batch_size=3,
        gen_batch_size=3,
    )
    assert isinstance(buffer, ReplayBuffer)
    batch, metrics = buffer.sample(global_steps=1, partition_id="train", batch_size=3)
    assert len(batch.keys) == 3 * N
    p = "training/differad_resample/"
    assert metrics[p + "groups/total"] == 3
    assert metrics[p + "groups_resampled/total"] == 1
    assert metrics[p + "regenerations/total"] == 2
    assert metrics[p + "rounds_used/max"] == 2
    assert metrics[p + "degenerate_before"] == pytest.approx(1 / 3)
    assert metrics[p + "degenerate_after"] == pytest.approx(1 / 3)


def test_the_stored_group_is_the_last_regenerated_one(env, monkeypatch):
    """The driver's regenerate() splices the payload: what reaches the TransferQueue is the last
    round's n completions, not the first round's (and nothing of the rounds in between)."""
    from differad_rl.integrations.verl.cpu_backend import HFGenerationClient

    worker, client, store = make_worker(env, monkeypatch, rounds=2)
    generated: list[list[int]] = []
    original = HFGenerationClient._generate

    def recording(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        generated.append(out.token_ids[:RESPONSE_LENGTH])
        return out

    monkeypatch.setattr(HFGenerationClient, "_generate", recording)
    rollout(worker, prompt_batch(["real"]))
    assert len(generated) == 3 * N
    stored = []
    for key in group_keys(store, "real0"):
        ids = store.fields["train"][key]["responses"]
        stored.append([int(t) for t in (ids.tolist() if hasattr(ids, "tolist") else ids)])
    rounds = [sorted(generated[r * N : (r + 1) * N]) for r in range(3)]
    assert sorted(stored) == rounds[2]
    assert rounds[2] != rounds[0]  # fresh samples each round (sampling, not a cached answer)


def test_no_regeneration_without_degenerate_groups_or_with_k0(env, monkeypatch):
    from differad_rl.integrations.verl.resampling import RECORD_KEY

    worker, client, store = make_worker(env, monkeypatch, rounds=3)
    rollout(worker, prompt_batch(["spread", "perfect"]))
    assert client.requests == 2 * N
    assert all(store.extra(f"{u}_0_0")[RECORD_KEY]["regenerations"] == 0.0 for u in ("spread0", "perfect1"))

    # K = 0: off, but the degenerate share is still reported (for comparison with DAPO)
    worker, client, store = make_worker(env, monkeypatch, rounds=0)
    rollout(worker, prompt_batch(["real"]))
    assert client.requests == N
    record = store.extra("real0_0_0")[RECORD_KEY]
    assert record["rounds_used"] == 0.0 and record["degenerate_before"] == record["degenerate_after"] == 1.0


def test_validation_is_never_resampled(env, monkeypatch):
    from differad_rl.integrations.verl.resampling import RECORD_KEY

    worker, client, store = make_worker(env, monkeypatch, rounds=2)
    rollout(worker, prompt_batch(["real"], validate=True))
    n_val = env["cfg"].actor_rollout_ref.rollout.val_kwargs.n
    assert client.requests == n_val  # veRL's own path: no regeneration
    assert store.tags["val"]["real0"]["status"] == "finished"
    assert RECORD_KEY not in store.extra("real0_0_0", "val")


def test_missing_metric_marks_the_prompt_failed(env, monkeypatch):
    worker, client, store = make_worker(env, monkeypatch, rounds=1, metric="no_such_key")
    rollout(worker, prompt_batch(["real"]))
    assert store.tags["train"]["real0"]["status"] == "failure"  # veRL's contract: marked, not raised
    assert group_keys(store, "real0") == []  # nothing half-written


def test_dapo_filter_groups_side_by_side(env, monkeypatch):
    """veRL's own DAPO eviction still runs (through our sampler) on what resampling left."""
    worker, client, store = make_worker(env, monkeypatch, rounds=1)
    rollout(worker, prompt_batch(["real", "spread", "perfect"]))
    refills: list[int] = []
    buffer = _async_buffer({"filter_groups_metric": "localization"}, refills)
    assert buffer.filter_groups_metric == "localization"
    batch, metrics = buffer.sample(global_steps=1, partition_id="train", batch_size=1)
    # DAPO evicts both zero-variance groups (the still-degenerate one and the all-perfect one)
    assert refills == [2]
    assert {k.split("_")[0] for k in batch.keys} == {"spread1"}
    assert metrics["training/filter_groups/evicted_samples"] == 2
    assert metrics["training/differad_resample/groups/total"] == 1


def _async_buffer(sampler_kwargs: dict, refills: list[int]):
    """veRL's async replay buffer through differad's sampler, refills recorded."""
    from differad_rl.integrations.verl.resampling import DifferadReplayBufferAsync

    return DifferadReplayBufferAsync(trainer_mode="colocate_async", trainer_config={}, max_off_policy_threshold=None,
                                     max_off_policy_strategy="drop", sampler_kwargs=sampler_kwargs,
                                     refill_fn=refills.append)


# ------------------------------------------------------------------------------------------------
# the peers' group rules: EMIT's re-roll rule in the worker, EasyR1's online filter in the sampler


def localizations(store: MemoryTQ, uid: str) -> list[float]:
    return [store.extra(k)["reward_extra_info"]["localization"] for k in group_keys(store, uid)]


@pytest.mark.parametrize("rule", ["differad", "emit"])
def test_resample_rule_picks_the_groups(env, monkeypatch, rule):
    """EMIT's rule re-rolls a group none of whose rewards exceeds the threshold even when they differ
    (``spread``: all in [0, 0.9] < 0.95); the method's rule re-rolls only the all-equal one."""
    from differad_rl.integrations.verl.resampling import RECORD_KEY

    options = {"rounds": 2, "rule": rule}
    if rule == "emit":
        options["correct_threshold"] = 0.95
    worker, client, store = make_worker(env, monkeypatch, **options)
    rollout(worker, prompt_batch(["real", "spread", "perfect"]))
    spread = localizations(store, "spread1")
    assert len(set(spread)) > 1 and max(spread) <= 0.95  # differs, yet no completion is "correct"
    rerolled = {"real0", "spread1"} if rule == "emit" else {"real0"}
    assert client.requests == 3 * N + 2 * N * len(rerolled)
    for uid in ("real0", "spread1", "perfect2"):
        assert group_keys(store, uid) == [f"{uid}_{s}_0" for s in range(N)]
        record = store.extra(f"{uid}_0_0")[RECORD_KEY]
        assert record["rounds_used"] == (2.0 if uid in rerolled else 0.0)
        assert record["degenerate_before"] == float(uid in rerolled)


def test_no_correct_threshold_counts_a_hit(env, monkeypatch):
    """With EMIT's threshold 0 (the default) a spread group holding a reward > 0 is kept as it is."""
    worker, client, store = make_worker(env, monkeypatch, rounds=2, rule="no_correct")
    rollout(worker, prompt_batch(["spread", "real"]))
    assert max(localizations(store, "spread0")) > 0.0
    assert client.requests == 2 * N + 2 * N  # only the all-zero group is re-rolled


def test_online_filter_evicts_exactly_out_of_band_groups_and_refills(env, monkeypatch):
    """veRL's sync buffer, EasyR1's band (0.01, 0.99) on the localization extra: the out-of-band groups
    (all 0, all 1, spread but mean < 0.01) are evicted whatever their variance, the in-band ones
    (spread, and all-0.5 which DAPO would evict) kept; veRL's refill rule draws new prompts (2k credits,
    at most train_batch_size in flight) through the real worker, and the surplus is discarded."""
    from differad_rl.integrations.verl.resampling import DifferadReplayBuffer

    worker, client, store = make_worker(env, monkeypatch, rounds=0)
    rollout(worker, prompt_batch(["real", "spread", "perfect", "half", "low"]))
    assert len(set(localizations(store, "low4"))) > 1 and np.mean(localizations(store, "low4")) < 0.01
    refills: list[int] = []

    def refill(k: int) -> None:  # the trainer's _add_prompts_to_generate: k new prompts
        refills.append(k)
        rollout(worker, prompt_batch((["low", "spread", "spread"] * k)[:k], prefix="new"))

    buffer = DifferadReplayBuffer(
        trainer_mode="sync",
        trainer_config={},
        max_off_policy_threshold=None,
        max_off_policy_strategy="drop",
        sampler_kwargs={"online_filter_metric": "localization", "train_batch_size": 3},
        refill_fn=refill,
        poll_interval=0.0,
    )
    assert buffer.dapo_metric is None and buffer.gen_batch_size == 1
    batch, metrics = buffer.sample(global_steps=1, partition_id="train", batch_size=3)
    assert refills == [3]  # 3 evicted -> 6 credits, 3 slots in flight
    kept = {k.split("_")[0] for k in batch.keys}
    assert len(kept) == 3 and kept <= {"spread1", "half3", "newspread1", "newspread2"}
    assert metrics["training/differad_filter/evicted_samples"] == 4  # real0, perfect2, low4, newlow0
    assert metrics["training/filter_groups/evicted_samples"] == 4
    assert metrics["training/filter_groups/discarded_surplus_samples"] == 1
    for uid in ("real0", "perfect2", "low4", "newlow0"):
        assert group_keys(store, uid) == [] and uid not in store.tags["train"]


def test_online_filter_and_dapo_side_by_side(env, monkeypatch):
    """Async buffer with both: DAPO adds the zero-variance in-band group; veRL refills k for k evicted."""
    worker, client, store = make_worker(env, monkeypatch, rounds=0)
    rollout(worker, prompt_batch(["real", "spread", "perfect", "half", "low"]))
    refills: list[int] = []
    buffer = _async_buffer({"filter_groups_metric": "localization", "online_filter_metric": "localization",
                        "online_filter_low": 0.01, "online_filter_high": 0.99}, refills)
    assert buffer.dapo_metric == "localization"
    batch, metrics = buffer.sample(global_steps=1, partition_id="train", batch_size=1)
    assert refills == [4]
    assert {k.split("_")[0] for k in batch.keys} == {"spread1"}
    assert metrics["training/filter_groups/evicted_samples"] == 4
    assert metrics["training/differad_filter/evicted_samples"] == 3  # half3 is DAPO's alone


def test_online_filter_options_refused_by_the_sampler():
    from differad_rl.integrations.verl.resampling import DifferadReplayBuffer

    common = dict(trainer_mode="sync", trainer_config={}, max_off_policy_threshold=None,
                  max_off_policy_strategy="drop", refill_fn=lambda k: None)
    with pytest.raises(ValueError, match=r"unknown trainer.v1.sampler.sampler_kwargs \['online_filter_lo'\]"):
        DifferadReplayBuffer(sampler_kwargs={"online_filter_metric": "localization", "online_filter_lo": 0.1}, **common)
    with pytest.raises(ValueError, match=r"online_filter_low=0.5 must be < online_filter_high=0.5"):
        DifferadReplayBuffer(sampler_kwargs={"online_filter_metric": "localization", "online_filter_low": 0.5,
                                             "online_filter_high": 0.5, "train_batch_size": 3}, **common)
    with pytest.raises(ValueError, match=r"needs \+trainer.v1.sampler.sampler_kwargs.train_batch_size"):
        DifferadReplayBuffer(sampler_kwargs={"online_filter_metric": "localization"}, **common)


# ------------------------------------------------------------------------------------------------
# the CPU generation backend


def test_hf_backend_sampling_contract(env):
    import pickle

    from PIL import Image
    from verl.utils.ray_utils import get_event_loop

    from differad_rl.integrations.verl.cpu_backend import HFGenerationClient

    client = HFGenerationClient(env["cfg"], env["model"], env["processor"], seed=1)
    tok = env["processor"].tokenizer
    prompt = tok("<think>", add_special_tokens=False)["input_ids"]
    loop = get_event_loop()

    def gen(params, **kw):
        return loop.run_until_complete(client.generate("r", prompt_ids=prompt, sampling_params=params, **kw))

    sampled = gen({"temperature": 1.0, "top_p": 1.0, "top_k": -1, "logprobs": True})
    assert 0 < len(sampled.token_ids) <= RESPONSE_LENGTH
    assert len(sampled.log_probs) == len(sampled.token_ids) and max(sampled.log_probs) <= 0.0
    assert sampled.extra_fields["global_steps"] == 0
    greedy = [gen({"temperature": 0, "top_p": 1.0, "top_k": -1}).token_ids for _ in range(2)]
    assert greedy[0] == greedy[1] and gen({"temperature": 0, "max_tokens": 3}).log_probs is None
    assert len(gen({"temperature": 0, "max_tokens": 3}).token_ids) <= 3
    with pytest.raises(ValueError, match="image placeholder tokens"):
        gen({"temperature": 0}, image_data=[Image.new("RGB", (56, 56))])  # the prompt has no image tokens
    with pytest.raises(ValueError, match="text and images only"):
        gen({"temperature": 0}, video_data=[object()])
    clone = pickle.loads(pickle.dumps(client))  # veRL ships the client to its Ray workers
    assert loop.run_until_complete(
        clone.generate("r", prompt_ids=prompt, sampling_params={"temperature": 0})
    ).token_ids == greedy[0]


# ------------------------------------------------------------------------------------------------
# configuration


def test_manager_is_loadable_by_verl_and_validates(env):
    import ray
    from verl.utils.import_utils import load_class_from_fqn

    from differad_rl.integrations.verl.resampling import (
        MANAGER_FQN,
        DifferadAgentLoopWorkerTQ,
        ResampleConfig,
    )

    cls = load_class_from_fqn(MANAGER_FQN, "AgentLoopManager")
    manager = cls(config=env["cfg"], llm_client=None, reward_loop_worker_handles=[])
    assert manager.resample_config == ResampleConfig(rounds=2)
    assert isinstance(manager.agent_loop_workers_class, ray.actor.ActorClass)
    assert manager.agent_loop_workers_class.__ray_actor_class__ is DifferadAgentLoopWorkerTQ
    with pytest.raises(ValueError, match=r"differad\.resample\.round\b"):
        cls(config=with_options(env["cfg"], round=2), llm_client=None)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"roundz": 1}, r"unknown option\(s\) differad.resample.roundz"),
        ({"rounds": -1}, "rounds must be an integer >= 0"),
        ({"rounds": True}, "rounds must be an integer >= 0"),
        ({"rounds": 1.5}, "rounds must be an integer >= 0"),
        ({"tol": 0.0}, "tol must be > 0"),
        ({"perfect": float("nan")}, "perfect must be a finite number"),
        ({"metric": ""}, "metric must be a non-empty string"),
        ({"rule": "zero_variance"}, r"rule='zero_variance' is not a same-prompt re-roll rule; set \+differad.resample.rule=differad or emit"),
        ({"correct_threshold": 0.5}, r"correct_threshold=0.5 is read only by rule=emit"),
        ({"rule": "no_correct", "correct_threshold": "0.5"}, "correct_threshold must be a finite number"),
    ],
)
def test_invalid_options_raise(options, match):
    from differad_rl.integrations.verl.resampling import ResampleConfig

    with pytest.raises(ValueError, match=match):
        ResampleConfig.from_config({"differad": {"resample": options}})


def test_trainer_level_checks(env):
    from omegaconf import open_dict

    from differad_rl.integrations.verl.resampling import ResampleConfig, validate_trainer_config

    assert ResampleConfig.from_config({}) == ResampleConfig()  # absent: off
    cfg = copy.deepcopy(env["cfg"])
    with open_dict(cfg):
        cfg.actor_rollout_ref.rollout.n = 1
    with pytest.raises(ValueError, match=r"rollout.n=1 < 2"):
        validate_trainer_config(cfg)
    cfg = copy.deepcopy(env["cfg"])
    with open_dict(cfg):
        cfg.trainer.use_v1 = False
    with pytest.raises(ValueError, match="V1 trainer only"):
        validate_trainer_config(cfg)
    cfg = copy.deepcopy(env["cfg"])
    with open_dict(cfg):
        cfg.algorithm.filter_groups.enable = True
        cfg.algorithm.filter_groups.metric = "localization"
        cfg.trainer.v1.sampler.custom_sampler.name = "DifferadReplayBuffer"
    with pytest.raises(ValueError, match="sampler_kwargs.filter_groups_metric=localization"):
        validate_trainer_config(cfg)
    with open_dict(cfg):
        cfg.trainer.v1.sampler.sampler_kwargs.filter_groups_metric = "localization"
        cfg.trainer.v1.sampler.sampler_kwargs.train_batch_size = 3
    assert validate_trainer_config(cfg).rounds == 2


# ------------------------------------------------------------------------------------------------
# per-prompt decisions == one decision over the whole (gathered) batch


@settings(max_examples=40, deadline=None)
@given(
    groups=st.integers(1, 6),
    group_size=st.integers(2, 4),
    rounds=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_per_group_driver_matches_batch_driver(groups, group_size, rounds, seed):
    """What the worker does (the driver per prompt, records aggregated by ``resample_metrics``)
    equals the driver over the whole batch: the decision for a group never depends on where the
    other groups were generated, so several workers agree without a collective."""
    from differad_rl.integrations.verl.resampling import group_record, resample_metrics

    rng = np.random.default_rng(seed)
    # per group and round: either a degenerate draw (all 0) or a spread one
    table = torch.tensor(
        np.where(rng.random((groups, rounds + 1, 1)) < 0.6, 0.0, rng.random((groups, rounds + 1, group_size))),
        dtype=torch.float64,
    )
    calls = Counter()

    def regen_batch(idx, r):
        return table[idx, r + 1].reshape(-1)

    batch_rewards, batch_stats = resample_groups(table[:, 0].reshape(-1), group_size, regen_batch, rounds)
    records, finals = [], []
    for g in range(groups):

        def regen_one(idx, r, g=g):
            calls[g] += 1
            return table[g, r + 1]

        final, stats = resample_groups(table[g, 0], group_size, regen_one, rounds)
        records.append({"differad_resample": group_record(stats)})
        finals.append(final)
    assert torch.equal(torch.cat(finals), batch_rewards)
    m = resample_metrics([f"u{g}" for g in range(groups)], records, prefix="")
    assert m["groups/total"] == groups
    assert m["groups_resampled/total"] == batch_stats.groups_resampled
    assert m["regenerations/total"] == batch_stats.regenerations == sum(calls.values())
    assert m["rounds_used/max"] == batch_stats.rounds_used
    assert m["degenerate_before"] == pytest.approx(batch_stats.degenerate_before)
    assert m["degenerate_after"] == pytest.approx(batch_stats.degenerate_after)


def test_resample_metrics_one_record_per_group_and_empty():
    from differad_rl.integrations.verl.resampling import resample_metrics

    rec = {"rounds_used": 1, "regenerations": 1, "groups_resampled": 1, "degenerate_before": 1, "degenerate_after": 0}
    extra = [{"differad_resample": rec}] * 3 + [{"other": 1}]
    m = resample_metrics(["a", "a", "a", "b"], extra, prefix="")
    assert m["groups/total"] == 1 and m["regenerations/total"] == 1 and m["degenerate_after"] == 0
    assert resample_metrics(["a"], [{}]) == {}
    with pytest.raises(ValueError, match="differ in length"):
        resample_metrics(["a"], [])


# ------------------------------------------------------------------------------------------------
# the GPU check script: its overrides compose against veRL 0.9.1's schema and our validation


def test_gpu_check_script_overrides_compose(tmp_path):
    import os
    import shlex
    import stat
    import subprocess
    from pathlib import Path
    from types import SimpleNamespace

    from hydra import compose, initialize_config_module
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer
    from verl.utils.config import omega_conf_to_dataclass

    from differad_rl.integrations.verl.resampling import DifferadReplayBuffer, validate_trainer_config

    script = Path(__file__).resolve().parents[1] / "examples" / "verl" / "gpu_check_resampling.sh"
    calls = tmp_path / "calls"
    calls.mkdir()
    shim = tmp_path / "bin" / "python3"
    shim.parent.mkdir()
    record = f'printf "%s\\n" "$@" > {shlex.quote(str(calls))}/$(date +%s%N)'
    shim.write_text(f"#!/usr/bin/env bash\n{record}\ncat > /dev/null\n")
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    env = {**os.environ, "PATH": f"{shim.parent}:{os.environ['PATH']}", "WORK": str(tmp_path / "work")}
    subprocess.run(["bash", str(script)], check=True, env=env, timeout=60)
    argvs = [p.read_text().splitlines() for p in sorted(calls.iterdir())]
    assert [a[:2] for a in argvs][1] == ["-m", "verl.trainer.main_ppo"] and len(argvs) == 4
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=argvs[1][2:])
    assert validate_trainer_config(cfg).rounds == 2
    # the tower frozen (the plugin makes it real), its cache on, the final HF checkpoint for the check
    from differad_rl.integrations.verl.checks import config_problems

    assert cfg.actor_rollout_ref.actor.freeze_vision_tower is True and cfg.actor_rollout_ref.differad_vision_cache is True
    assert list(cfg.actor_rollout_ref.actor.checkpoint.save_contents) == ["hf_model"]
    assert cfg.trainer.save_freq == 3 and config_problems(cfg) == []
    rollout = omega_conf_to_dataclass(cfg.actor_rollout_ref.rollout)  # as veRL's workers convert it
    assert rollout.agent.agent_loop_manager_class.endswith("DifferadAgentLoopManagerTQ")
    assert rollout.limit_images == 2 and rollout.n == 4
    # veRL's own trainer code builds our sampler from this config
    trainer = SimpleNamespace(config=cfg, trainer_mode="sync", _add_prompts_to_generate=lambda k: k)
    assert isinstance(PPOTrainer._build_replay_buffer(trainer), DifferadReplayBuffer)


# ------------------------------------------------------------------------------------------------
# the whole thing on a local Ray cluster with the real TransferQueue (slow; opt out with
# DIFFERAD_SKIP_RAY_E2E=1)


@pytest.mark.slow
@pytest.mark.skipif(
    bool(__import__("os").environ.get("DIFFERAD_SKIP_RAY_E2E")),
    reason="DIFFERAD_SKIP_RAY_E2E is set (this test starts Ray + TransferQueue + 3 actors, ~40-70 s)",
)
def test_ray_transferqueue_end_to_end(env):
    """veRL's manager and agent-loop worker Ray actors (2), the real TransferQueue, veRL's
    reward-loop actor and replay buffer; two-image prompts. The workers get the tiny processor set
    after veRL's init (veRL's HFModelConfig cannot load the tiny build's processor class)."""
    from types import SimpleNamespace

    import ray
    import transfer_queue as tq
    from omegaconf import open_dict
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    from differad_rl.integrations.verl.cpu_backend import HFGenerationClient
    from differad_rl.integrations.verl.resampling import (
        DifferadAgentLoopManagerTQ,
        DifferadAgentLoopWorkerTQ,
        DifferadReplayBuffer,
    )

    cfg = copy.deepcopy(env["cfg"])
    with open_dict(cfg):
        cfg.actor_rollout_ref.rollout.agent.num_workers = 2
    if ray.is_initialized():
        pytest.skip("a Ray cluster is already attached to this process")
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        tq.init()
        reward = ray.remote(RewardLoopWorker).remote(cfg)
        client = HFGenerationClient(cfg, env["model"], env["processor"], seed=0)
        processor_path = env["cfg"].actor_rollout_ref.model.path

        class TinyProcessorWorker(DifferadAgentLoopWorkerTQ):  # local: Ray ships it by value
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                from differad_rl.integrations.qwen_vl.tiny import load_tiny_processor

                self.processor = load_tiny_processor(processor_path)

        class Manager(DifferadAgentLoopManagerTQ):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.agent_loop_workers_class = ray.remote(TinyProcessorWorker)

        manager = Manager.create(config=cfg, llm_client=client, reward_loop_worker_handles=[reward])
        batch = prompt_batch(["real", "spread", "perfect", "real"])
        PPOTrainer._submit_batch_to_rollout(
            SimpleNamespace(trainer_mode="sync", global_steps=1, agent_loop_manager=manager), batch
        )
        buffer = DifferadReplayBuffer(
            trainer_mode="sync",
            trainer_config={},
            max_off_policy_threshold=None,
            max_off_policy_strategy="drop",
            sampler_kwargs={},
            refill_fn=lambda k: pytest.fail("no refill expected"),
            train_batch_size=4,
            gen_batch_size=4,
            poll_interval=0.5,
        )
        sampled, metrics = buffer.sample(global_steps=1, partition_id="train", batch_size=4)  # waits for the workers
        assert len(sampled.keys) == 4 * N
        p = "training/differad_resample/"
        assert metrics[p + "groups/total"] == 4
        assert metrics[p + "groups_resampled/total"] == 2
        assert metrics[p + "regenerations/total"] == 4  # 2 degenerate groups × K = 2 rounds
        assert metrics[p + "rounds_used/max"] == 2
        assert metrics[p + "degenerate_before"] == pytest.approx(0.5)
    finally:
        try:
            tq.close()
        finally:
            ray.shutdown()
