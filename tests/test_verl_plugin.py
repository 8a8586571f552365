"""Registration through the ``verl.plugins`` entry point (fresh process, Ray worker), version checks,
and the localization bridge run through veRL 0.9.1's real V1 ``PPOTrainer._compute_advantage`` on a
real TransferQueue (local Ray).

veRL swallows plugin import errors, so these tests check that registration actually happened.
The module deliberately does not import ``differad_rl.integrations.verl`` at top level: the
subprocess and the Ray worker must get it from ``import verl`` alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
import uuid

import numpy as np
import pytest
import torch

pytest.importorskip("verl")

PROBE = r"""
import json, sys
import verl  # loads the verl.plugins entry points, nothing else of ours
from verl.trainer.ppo.core_algos import get_adv_estimator_fn
fn = get_adv_estimator_fn("differad")
loaded_by_plugin = "differad_rl.integrations.verl.plugin" in sys.modules
bridge_pending = "verl.trainer.ppo.v1.trainer_base" not in sys.modules
import verl.trainer.ppo.v1.trainer_base as tb  # the trainer process imports it later: the hook patches it
print(json.dumps({
    "module": fn.__module__, "name": fn.__name__, "loaded_by_plugin": loaded_by_plugin,
    "bridge_pending": bridge_pending,
    "bridged": bool(getattr(tb.PPOTrainer._compute_advantage, "__differad_localization_bridge__", False)),
}))
"""


def _run_probe(env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=240, env=env)


def test_fresh_process_registers_via_entry_point():
    proc = _run_probe()
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {
        "module": "differad_rl.integrations.verl.estimator",
        "name": "compute_differad_advantage",
        "loaded_by_plugin": True,
        "bridge_pending": True,  # trainer_base is not imported by the plugin (it costs ~2 s per process)
        "bridged": True,  # ...but patched the moment the trainer imports it
    }


def test_entry_point_declared():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="verl.plugins")}
    assert eps.get("differad") == "differad_rl.integrations.verl.plugin"


# ------------------------------------------------------------------------------------------------
# versions


def test_check_versions_accepts_installed_and_rejects_others():
    from differad_rl.integrations.verl import compat

    compat.check_versions()  # the installed environment is supported
    with pytest.raises(compat.UnsupportedVersionError, match=r"supports verl<0\.10,>=0\.9\.1, found verl==0\.8\.0"):
        compat.check_versions(verl_version="0.8.0")
    with pytest.raises(compat.UnsupportedVersionError, match=r"found verl==0\.10\.0"):
        compat.check_versions(verl_version="0.10.0")
    with pytest.raises(compat.UnsupportedVersionError, match=r"found transformers==5\.6\.0"):
        compat.check_versions(transformers_version="5.6.0")
    with pytest.raises(compat.UnsupportedVersionError, match=r"found transformers==4\.57\.0"):
        compat.check_versions(transformers_version="4.57.0")
    assert issubclass(compat.UnsupportedVersionError, ImportError)


def test_bridge_refuses_an_unknown_trainer_signature():
    from differad_rl.integrations.verl import compat

    class PPOTrainer:
        def _compute_advantage(self, batch, metrics, extra):  # not veRL 0.9's signature
            return batch

    fake = types.ModuleType("fake_trainer_base")
    fake.PPOTrainer, fake.tq = PPOTrainer, None
    with pytest.raises(compat.UnsupportedVersionError, match=r"differs from veRL 0\.9's \(self, batch, metrics\)"):
        compat._patch_trainer_base(fake)


def test_localization_from_extra_fields():
    from differad_rl.integrations.verl.compat import localization_from_extra_fields

    wrapped = types.SimpleNamespace(data={"reward_extra_info": {"localization": 0.5}})
    assert localization_from_extra_fields([{"reward_extra_info": {"localization": 1}}, wrapped]).tolist() == [1.0, 0.5]
    assert localization_from_extra_fields([{"reward_extra_info": {"acc": 1}}]) is None
    assert localization_from_extra_fields([{}, None]) is None


# ------------------------------------------------------------------------------------------------
# local Ray: a worker process, and the bridge through the real V1 trainer method + TransferQueue


@pytest.fixture(scope="module")
def ray_tq():
    ray = pytest.importorskip("ray")
    tq = pytest.importorskip("transfer_queue")
    from omegaconf import OmegaConf

    # Logical CPUs: TransferQueue's controller and storage unit each reserve one (idle actors).
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        tq.init(OmegaConf.create({"backend": {"SimpleStorage": {"num_data_storage_units": 1}}}))
        yield ray, tq
    finally:
        try:
            tq.close()
        finally:
            ray.shutdown()


@pytest.mark.slow
def test_ray_worker_has_the_estimator(ray_tq):
    ray, _ = ray_tq

    def probe():  # defined locally: cloudpickle ships it by value, the worker imports nothing of ours
        import sys

        from verl.trainer.ppo.core_algos import get_adv_estimator_fn

        return get_adv_estimator_fn("differad").__module__, "differad_rl.integrations.verl.plugin" in sys.modules

    module, by_plugin = ray.get(ray.remote(num_cpus=1)(probe).remote(), timeout=180)
    assert module == "differad_rl.integrations.verl.estimator" and by_plugin


def _put_trajectories(tq, n, prompts, rng, *, with_localization=True, partition="train"):
    """Trajectories as AgentLoopWorkerTQ._agent_loop_postprocess stores them (key uid_session_0)."""
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict

    keys, fields, loc, rew = [], [], [], []
    for _ in range(prompts):
        uid = str(uuid.uuid4())
        for s in range(n):
            length = int(rng.integers(2, 9))
            l_ = float(rng.choice([0.0, 0.1, 0.3, 0.6, 0.9, 1.0]))
            f = float(rng.integers(0, 2))
            rm = torch.zeros(length)
            rm[-1] = l_ + f
            info = {"score": l_ + f, "format": f, "iou": 0.0}
            if with_localization:
                info["localization"] = l_
            keys.append(f"{uid}_{s}_0")
            fields.append(
                {
                    "uid": uid,
                    "response_mask": torch.ones(length, dtype=torch.int64),
                    "rm_scores": rm,
                    "old_log_probs": torch.zeros(length),
                    "extra_fields": {"reward_extra_info": info},
                }
            )
            loc.append(l_)
            rew.append(l_ + f)
    tags = [{"status": "success"} for _ in keys]
    tq.kv_batch_put(keys=keys, partition_id=partition, fields=list_of_dict_to_tensordict(fields), tags=tags)
    return keys, tags, np.array(loc), np.array(rew)


def _trainer_config(n, **differad):
    from hydra import compose, initialize_config_module

    overrides = ["algorithm.adv_estimator=differad", f"actor_rollout_ref.rollout.n={n}"]
    overrides += [f"+algorithm.differad.{k}={v}" for k, v in differad.items()]
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        return compose(config_name="ppo_trainer", overrides=overrides)


@pytest.mark.slow
def test_bridge_through_real_v1_compute_advantage(ray_tq):
    """The V1 trainer's own _compute_advantage, fed from the TransferQueue, yields core advantages ×
    difficulty weights computed from the reward's *localization* extra info (not the summed score)."""
    _, tq = ray_tq
    from transfer_queue import KVBatchMeta
    from verl.trainer.ppo.v1 import trainer_base

    from differad_rl.groups import difficulty_weights_by_id, group_advantages_by_id
    from differad_rl.integrations.verl import compat

    assert compat.bridge_installed()
    rng = np.random.default_rng(0)
    n, prompts = 4, 5
    keys, tags, loc, rew = _put_trajectories(tq, n, prompts, rng)
    perm = rng.permutation(len(keys))  # balance_batch reorders
    batch = KVBatchMeta(keys=[keys[i] for i in perm], tags=[tags[i] for i in perm], partition_id="train")
    stub = types.SimpleNamespace(config=_trainer_config(n, tau=0.35))
    trainer_base.PPOTrainer._compute_advantage(stub, batch, {})

    got = tq.kv_batch_get(keys=batch.keys, partition_id="train", select_fields=["advantages"])["advantages"]
    got = [row for row in got.unbind()]
    ids = torch.as_tensor(perm // n)
    r = torch.as_tensor(rew[perm], dtype=torch.float32)
    l_ = torch.as_tensor(loc[perm], dtype=torch.float32)
    want = group_advantages_by_id(r, ids) * difficulty_weights_by_id(l_, ids, tau=0.35)
    for row, w in zip(got, want):
        torch.testing.assert_close(row, torch.full_like(row, float(w)), rtol=1e-6, atol=1e-6)
    # weights from the summed score would differ: the bridge really used the localization
    w_score = group_advantages_by_id(r, ids) * difficulty_weights_by_id(r, ids, tau=0.35)
    assert not torch.allclose(want, w_score)
    tq.kv_clear(keys=keys, partition_id="train")


@pytest.mark.slow
def test_bridge_without_localization_raises_then_reads_top_level_field(ray_tq):
    """No localization anywhere: a clear error. The colocated reward-model path writes each reward
    extra key as a top-level TransferQueue field (PPOTrainer._compute_reward_colocate): read from there."""
    _, tq = ray_tq
    from transfer_queue import KVBatchMeta
    from verl.trainer.ppo.v1 import trainer_base
    from verl.utils import tensordict_utils as tu

    from differad_rl.groups import difficulty_weights_by_id, group_advantages_by_id

    n = 4
    keys, tags, loc, rew = _put_trajectories(tq, n, 3, np.random.default_rng(1), with_localization=False)
    batch = KVBatchMeta(keys=keys, tags=tags, partition_id="train")
    stub = types.SimpleNamespace(config=_trainer_config(n))
    with pytest.raises(RuntimeError, match=r"needs the per-sample reward extra info 'localization'"):
        trainer_base.PPOTrainer._compute_advantage(stub, batch, {})
    # weights off (an ablation with any reward) need no extra info
    trainer_base.PPOTrainer._compute_advantage(types.SimpleNamespace(config=_trainer_config(n, difficulty_weights=False)), batch, {})

    tq.kv_batch_put(keys=keys, partition_id="train", fields=tu.get_tensordict({"localization": np.asarray(loc)}))
    trainer_base.PPOTrainer._compute_advantage(stub, batch, {})
    got = tq.kv_batch_get(keys=keys, partition_id="train", select_fields=["advantages"])["advantages"]
    ids = torch.arange(len(keys)) // n
    want = group_advantages_by_id(torch.as_tensor(rew, dtype=torch.float32), ids) * difficulty_weights_by_id(
        torch.as_tensor(loc, dtype=torch.float32), ids
    )
    for row, w in zip(got.unbind(), want):
        torch.testing.assert_close(row, torch.full_like(row, float(w)), rtol=1e-6, atol=1e-6)
    tq.kv_clear(keys=keys, partition_id="train")


@pytest.mark.slow
def test_reward_loop_worker_on_ray(ray_tq):
    """veRL's RewardLoopWorker as a Ray actor (as RewardLoopManager creates it) loads the reward
    through pkg:// in its own process and returns the same values as compute_score here."""
    ray, _ = ray_tq
    from hydra import compose, initialize_config_module
    from verl import DataProto
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker

    from differad_rl.integrations.qwen_vl.tiny import load_tiny_processor, tiny_model_for
    from differad_rl.integrations.verl import compute_score

    model = tiny_model_for("qwen2_5_vl")
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        cfg = compose(
            config_name="ppo_trainer",
            overrides=[
                f"actor_rollout_ref.model.path={model}",
                "reward.custom_reward_function.path=pkg://differad_rl.integrations.verl.reward",
                "reward.custom_reward_function.name=compute_score",
                "+reward.custom_reward_function.reward_kwargs.center_norm=enclosing",
            ],
        )
    tok = load_tiny_processor(model).tokenizer
    texts = ["<think>.</think><answer>(10,10),(40,30)</answer>", "<answer>(0,0),(0,0)</answer>"]
    gts = [[[12, 10, 44, 36]], []]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(i) for i in ids)
    responses = torch.tensor([i + [tok.pad_token_id] * (width - len(i)) for i in ids])
    attention = torch.cat([torch.ones(2, 2, dtype=torch.int64), (responses != tok.pad_token_id).long()], dim=1)
    data = DataProto.from_single_dict(
        {
            "prompts": torch.ones(2, 2, dtype=torch.int64),
            "responses": responses,
            "attention_mask": attention,
            "data_source": np.array(["differad"] * 2, dtype=object),
            "reward_model": np.array([{"style": "rule", "ground_truth": g} for g in gts], dtype=object),
            "extra_info": np.array([{"index": 0}, {"index": 1}], dtype=object),
        }
    )
    worker = ray.remote(RewardLoopWorker).options(num_cpus=1).remote(cfg)
    try:
        outs = ray.get(worker.compute_score_batch.remote(data), timeout=240)
    finally:
        ray.kill(worker)
    for text, gt, out in zip(texts, gts, outs):
        want = compute_score("differad", text, gt, {}, center_norm="enclosing")
        assert out["reward_score"] == pytest.approx(want["score"])
        assert {k: out["reward_extra_info"][k] for k in want} == pytest.approx(want)
    assert outs[1]["reward_score"] == 1.0  # zero box on a normal target, but no <think>: format 0
