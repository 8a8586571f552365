"""``actor_rollout_ref.actor.freeze_vision_tower=True`` really freezes the tower in veRL 0.9.1.

What runs for real: veRL's own ``ActorRolloutRefWorker.init_model`` building the actor and reference
FSDP engines (FSDP1 ``strategy=fsdp`` and FSDP2 ``strategy=fsdp2``) from the tiny random Qwen2-VL /
Qwen2.5-VL / Qwen3-VL folders, veRL's ``compute_log_prob`` and ``update_actor`` (its PPO loss, its
optimizer step) on trajectories produced by veRL's agent loop (the tiny model sampling through
:class:`HFGenerationClient`, as in tests/test_verl_resampling.py), and ``main_ppo``'s config
validation for the start-up check.

What is replaced, and why: the accelerator — veRL's platform is the CPU one of
:func:`differad_rl.integrations.verl.cpu_backend.use_cpu_platform` over a one-process gloo group;
FSDP1's guard against CPU parameters under ``sync_module_states=True`` is lifted (a broadcast from
rank 0 to itself) and the reference model's forced parameter CPU offload is off where its forward runs
(offloaded FSDP1 computes on the accelerator); veRL's process-wide patches of transformers' Qwen-VL classes (applied when it
builds an engine) are undone after the module and around the tiny model's generation; the TransferQueue is the in-memory one of test_verl_resampling; the tiny
processor gets Qwen's ``get_rope_index`` bound as veRL binds it to the stock processor classes
(veRL does not recognise the tiny processor class), so position ids are veRL's 4-row M-RoPE ones.
"""

from __future__ import annotations

import contextlib
import socket
import types

import pytest
import torch

pytest.importorskip("verl")
pytest.importorskip("ray")

from tests.test_verl_examples import compose, launch_argv
from tests.test_verl_resampling import env, make_worker, prompt_batch, rollout  # noqa: F401 (env: a fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAMILY_MODEL = {
    "qwen2_vl": "Qwen2VLModel",
    "qwen2_5_vl": "Qwen2_5_VLModel",
    "qwen3_vl": "Qwen3VLModel",
}


# ------------------------------------------------------------------------------------------------
# start-up check


@pytest.fixture(scope="module")
def argv(tmp_path_factory):
    return launch_argv(tmp_path_factory.mktemp("freeze"), NNODES="1", NGPUS_PER_NODE="8")


def test_the_launch_script_freezes_and_passes(argv):
    from differad_rl.integrations.verl.checks import config_problems

    cfg = compose(argv)
    assert cfg.actor_rollout_ref.actor.freeze_vision_tower is True
    assert config_problems(cfg) == []


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["actor_rollout_ref.actor.strategy=megatron"],
         r"freeze_vision_tower=True is read nowhere in veRL 0.9.1.*strategy=megatron.*set actor_rollout_ref.actor.strategy=fsdp"),
        (["actor_rollout_ref.model.lora_rank=8"],
         r"lora_rank=8 and target_modules='all-linear'.*LoRA adapters would train inside the vision tower.*exclude_modules='\.\*visual\.\*'"),
        (["actor_rollout_ref.model.lora_rank=8", "actor_rollout_ref.model.target_modules=[qkv,q_proj]"],
         r"vision tower \(e.g. model.visual.blocks.0.attn.qkv\)"),
        (["++actor_rollout_ref.actor.fsdp_config.wrap_policy.min_num_params=1000"],
         r"strategy=fsdp and .*wrap_policy.min_num_params=1000.*use_orig_params=True"),
        (["++actor_rollout_ref.actor.fsdp_config.wrap_policy.transformer_layer_cls_to_wrap=[Qwen2_5_VLDecoderLayer]"],
         r"wrap_policy.transformer_layer_cls_to_wrap=\['Qwen2_5_VLDecoderLayer'\].*use_orig_params"),
        (["+actor_rollout_ref.differad_vision_cache=maybe"], r"differad_vision_cache must be true or false, got 'maybe'"),
        (["+actor_rollout_ref.differad_vision_cache=true", "actor_rollout_ref.actor.freeze_vision_tower=False"],
         r"exact only for a frozen tower.*set actor_rollout_ref.actor.freeze_vision_tower=True"),
    ],
)
def test_freeze_it_cannot_honour_is_refused_at_start_up(argv, overrides, match):
    """The check main_ppo runs (test_verl_checks: it is wrapped into ``validate_config``); veRL's own
    validation of a megatron actor needs the megatron trainer config, so the check is called directly."""
    from differad_rl.integrations.verl.checks import ConfigError, check_config

    with pytest.raises(ConfigError, match=match):
        check_config(compose([*argv, *overrides]))


@pytest.mark.parametrize(
    "overrides",
    [
        ["actor_rollout_ref.model.lora_rank=8", "actor_rollout_ref.model.exclude_modules='.*visual.*'"],
        ["actor_rollout_ref.model.lora_rank=8", "actor_rollout_ref.model.target_modules=[q_proj,v_proj]"],
        ["++actor_rollout_ref.actor.fsdp_config.wrap_policy.min_num_params=1000",
         "actor_rollout_ref.actor.fsdp_config.use_orig_params=True"],
        ["++actor_rollout_ref.actor.fsdp_config.wrap_policy.min_num_params=1000", "actor_rollout_ref.actor.strategy=fsdp2"],
        ["actor_rollout_ref.actor.strategy=megatron", "actor_rollout_ref.actor.freeze_vision_tower=False"],
        ["+actor_rollout_ref.differad_vision_cache=false"],
    ],
)
def test_freeze_fixes_pass(argv, overrides):
    from differad_rl.integrations.verl.checks import config_problems

    assert config_problems(compose([*argv, *overrides])) == []


def test_plugin_patches_verls_engine_and_worker():
    from verl.models.transformers import monkey_patch
    from verl.workers import engine_workers
    from verl.workers.engine.fsdp import transformer_impl

    mark = "__differad_vision_freeze__"
    assert getattr(engine_workers.ActorRolloutRefWorker.init_model, mark, False)
    assert getattr(transformer_impl.FSDPEngine._build_module, mark, False)
    assert getattr(transformer_impl.FSDPEngine._build_optimizer, mark, False)
    # veRL's dispatch metadata survives the wrap (the worker group still finds init_model's mode)
    from verl.single_controller.base.decorator import MAGIC_ATTR

    assert hasattr(engine_workers.ActorRolloutRefWorker.init_model, MAGIC_ATTR)
    # TRL 1.16 has no AutoModelForCausalLMWithValueHead: veRL's value-head patch is skipped, not crashed into
    assert monkey_patch.is_trl_available() is False


@pytest.mark.slow
def test_a_fresh_veRL_process_patches_the_worker_and_engine_on_import():
    """As in a Ray worker: ``import verl`` loads the plugin, the worker and engine modules imported later
    are patched by the post-import hooks."""
    import subprocess
    import sys

    code = (
        "import verl\n"
        "from verl.workers import engine_workers as w\n"
        "from verl.workers.engine.fsdp import transformer_impl as t\n"
        "m = '__differad_vision_freeze__'\n"
        "print(all(getattr(f, m, False) for f in (w.ActorRolloutRefWorker.init_model, "
        "w.ActorRolloutRefWorker.update_actor, w.ActorRolloutRefWorker.compute_ref_log_prob, "
        "t.FSDPEngine._build_module, t.FSDPEngine._build_optimizer)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert out.stdout.strip().splitlines()[-1] == "True", out.stderr[-2000:]


@pytest.mark.slow
def test_a_ray_worker_process_has_the_patched_worker_and_engine():
    """Where veRL runs ``ActorRolloutRefWorker``: a Ray worker process (the plugin loads with ``import verl``)."""
    import ray

    def probe():  # shipped by value: the worker imports nothing of ours itself
        from verl.workers import engine_workers as w
        from verl.workers.engine.fsdp import transformer_impl as t

        mark = "__differad_vision_freeze__"
        return [getattr(f, mark, False) for f in (w.ActorRolloutRefWorker.init_model, w.ActorRolloutRefWorker.update_actor,
                                                   t.FSDPEngine._build_module, t.FSDPEngine._build_optimizer)]

    owned = not ray.is_initialized()
    if owned:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        assert ray.get(ray.remote(num_cpus=1)(probe).remote(), timeout=300) == [True] * 4
    finally:
        if owned:
            ray.shutdown()


# ------------------------------------------------------------------------------------------------
# veRL's workers on the CPU


_QWEN_MODULES = (
    "transformers.models.qwen2_vl.modeling_qwen2_vl",
    "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
    "transformers.models.qwen3_vl.modeling_qwen3_vl",
    "transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe",
)


def _qwen_classes() -> dict[type, dict]:
    """The attributes of transformers' Qwen-VL classes. veRL's engine build replaces some of them for the
    whole process (``apply_monkey_patch``: the models' ``forward``), which would change every later test
    that runs these models, so the tests restore them."""
    import importlib

    state = {}
    for name in _QWEN_MODULES:
        for cls in vars(importlib.import_module(name)).values():
            if isinstance(cls, type) and cls.__module__ == name:
                state[cls] = dict(vars(cls))
    return state


def _restore(state: dict[type, dict]) -> None:
    for cls, attrs in state.items():
        for key, value in attrs.items():
            if vars(cls).get(key) is not value:
                setattr(cls, key, value)


_PRISTINE = _qwen_classes()  # at collection, before any veRL engine is built in this process


@contextlib.contextmanager
def pristine_qwen_classes():
    """transformers' own Qwen-VL classes within the block (e.g. for generation), veRL's patches after it."""
    patched = _qwen_classes()
    _restore(_PRISTINE)
    try:
        yield
    finally:
        _restore(patched)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cpu_verl():
    """veRL on the CPU in this process: the CPU platform, a one-rank gloo group, FSDP1's CPU guard lifted."""
    import torch.distributed as dist
    import torch.distributed.fsdp._init_utils as fsdp_init
    from differad_rl.integrations.verl.cpu_backend import use_cpu_platform

    use_cpu_platform()
    env_vars = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1",
                "LOCAL_RANK": "0"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env_vars.items():
            mp.setenv(key, value)
        mp.setattr(fsdp_init, "_check_module_states_for_sync_module_states", lambda states: None)
        owned = not dist.is_initialized()
        if owned:
            dist.init_process_group("gloo", rank=0, world_size=1)
        yield
        if owned:
            dist.destroy_process_group()
    _restore(_PRISTINE)


def worker_config(model_path, *, strategy: str = "fsdp", freeze: bool = True, lr: float = 1e-2,
                  cache: bool | None = None):
    cfg = compose([
        *([] if cache is None else [f"+actor_rollout_ref.differad_vision_cache={cache}"]),
        f"actor_rollout_ref.model.path={model_path}",
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        "actor_rollout_ref.model.use_remove_padding=False",
        "actor_rollout_ref.model.enable_gradient_checkpointing=True",
        f"actor_rollout_ref.actor.strategy={strategy}",
        f"actor_rollout_ref.actor.freeze_vision_tower={freeze}",
        "actor_rollout_ref.actor.use_torch_compile=False",
        f"actor_rollout_ref.actor.optim.lr={lr}",
        "actor_rollout_ref.actor.optim.total_training_steps=1",
        "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.actor.use_kl_loss=False",
        "actor_rollout_ref.rollout.name=vllm",
        "actor_rollout_ref.rollout.n=4",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=4",
    ])
    return cfg.actor_rollout_ref


def build(role: str, model_path, **kw):
    from verl.workers.engine_workers import ActorRolloutRefWorker

    worker = ActorRolloutRefWorker(worker_config(model_path, **kw), role=role)
    worker.init_model()
    return worker


def build_cpu_ref(model_path, **kw):
    """The reference worker with FSDP1's parameter CPU offload off: veRL forces it on for the reference,
    and its forward then computes on the accelerator (a CPU-only stand-in, like the guard above)."""
    from torch.distributed import fsdp

    real = fsdp.CPUOffload
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fsdp, "CPUOffload", lambda offload_params=False: real(offload_params=False))
        return build("ref", model_path, **kw)


def tower_flags(module) -> tuple[list[bool], list[bool]]:
    """``requires_grad`` of the tower's parameters and of the others (FSDP1 flat parameters: by unit)."""
    tower, rest = [], []
    for name, p in module.named_parameters():
        (tower if ".visual." in f".{name}" else rest).append(p.requires_grad)
    return tower, rest


@pytest.mark.parametrize("strategy", ["fsdp", "fsdp2"])
@pytest.mark.parametrize("family", sorted(FAMILY_MODEL))
def test_actor_engine_tower_frozen_and_out_of_the_optimizer(cpu_verl, family, strategy):
    from differad_rl.integrations.qwen_vl.tiny import tiny_model_for
    from differad_rl.integrations.verl.freeze import FROZEN_TOWER_ATTR

    path = tiny_model_for(family)
    engine = build("actor", path, strategy=strategy).actor.engine
    tower, rest = tower_flags(engine.module)
    assert tower and rest
    assert not any(tower) and all(rest)
    held = {id(p) for group in engine.optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in engine.module.parameters() if p.requires_grad}
    assert getattr(engine, FROZEN_TOWER_ATTR).parameters > 0
    if strategy == "fsdp":  # the tower is its own FSDP unit: no flat parameter mixes frozen and trainable tensors
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        units = {type(m._fsdp_wrapped_module).__name__ for m in engine.module.modules() if isinstance(m, FSDP)}
        assert getattr(engine, FROZEN_TOWER_ATTR).tower_class in units



def test_reference_engine_tower_frozen(cpu_verl):
    """The reference engine (forward only, no optimizer) freezes its tower the same way."""
    from differad_rl.integrations.qwen_vl.tiny import tiny_model_for

    ref = build("ref", tiny_model_for("qwen2_5_vl")).ref.engine
    tower, rest = tower_flags(ref.module)
    assert tower and not any(tower) and all(rest) and ref.optimizer is None


def test_without_the_option_veRL_trains_the_tower(cpu_verl):
    """veRL 0.9.1's behaviour the plugin changes only when asked: every parameter in the optimizer."""
    from differad_rl.integrations.qwen_vl.tiny import tiny_model_for

    engine = build("actor", tiny_model_for("qwen2_5_vl"), freeze=False).actor.engine
    tower, rest = tower_flags(engine.module)
    assert all(tower) and all(rest)
    held = {id(p) for group in engine.optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in engine.module.parameters()}


# ------------------------------------------------------------------------------------------------
# a veRL training step


def bind_rope_index(processor, family: str, model_path) -> None:
    """What veRL's ``hf_processor`` does for the stock Qwen processor classes."""
    import transformers

    processor.config = transformers.AutoConfig.from_pretrained(model_path)
    model_class = getattr(transformers, FAMILY_MODEL[family])
    processor.get_rope_index = types.MethodType(model_class.get_rope_index, processor)
    if hasattr(model_class, "get_vision_position_ids"):
        processor.get_vision_position_ids = types.MethodType(model_class.get_vision_position_ids, processor)


def family_env(family: str) -> dict:
    """test_verl_resampling's ``env`` (config, reward worker, tiny model and processor) for another family."""
    from differad_rl.integrations.qwen_vl.tiny import load_tiny_qwen_vl, tiny_model_for
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker

    import tests.test_verl_resampling as resampling

    path = tiny_model_for(family)
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        cfg = hydra_compose(config_name="ppo_trainer", overrides=[
            f"actor_rollout_ref.model.path={path}", "actor_rollout_ref.rollout.name=vllm",
            f"actor_rollout_ref.rollout.n={resampling.N}", "actor_rollout_ref.rollout.prompt_length=512",
            f"actor_rollout_ref.rollout.response_length={resampling.RESPONSE_LENGTH}",
            f"reward.custom_reward_function.path={resampling.__file__}", "reward.custom_reward_function.name=score_for_test",
            f"+reward.custom_reward_function.reward_kwargs.space={family}",
            f"data.custom_cls.path={resampling.__file__}", "data.custom_cls.name=PILImagesDataset",
            "data.train_batch_size=3", "+differad.resample.rounds=0",
        ])
    model, processor = load_tiny_qwen_vl(path)
    return {"cfg": cfg, "reward": resampling.InProcessRewardHandle(RewardLoopWorker(cfg)), "model": model,
            "processor": processor}


def agent_loop_batch(setup: dict, family: str):
    """veRL agent-loop trajectories (2 prompts × n = 4) as veRL's workers receive them (nested tensors)."""
    from differad_rl.integrations.qwen_vl.tiny import tiny_model_for
    from verl.utils import tensordict_utils as tu

    bind_rope_index(setup["processor"], family, tiny_model_for(family))
    with pytest.MonkeyPatch.context() as monkeypatch, pristine_qwen_classes():
        worker, _, store = make_worker(setup, monkeypatch, rounds=0)
        rollout(worker, prompt_batch(["real", "spread"]))
    rows = [store.fields["train"][key] for key in sorted(store.fields["train"])]
    seq = ("prompts", "responses", "response_mask", "loss_mask", "input_ids", "position_ids")
    data = {name: torch.nested.as_nested_tensor([row[name] for row in rows], layout=torch.jagged) for name in seq}
    batch = tu.get_tensordict(data, non_tensor_dict={})
    tu.assign_non_tensor_stack(batch, "multi_modal_inputs", [tu.unwrap_non_tensor_data(row["multi_modal_inputs"]) for row in rows])
    return batch


@pytest.fixture(scope="module")
def trajectories(env):  # noqa: F811 (the imported fixture)
    return agent_loop_batch(env, "qwen2_5_vl")


def with_meta(batch, **meta):
    from verl.utils import tensordict_utils as tu

    batch = batch.clone()
    tu.assign_non_tensor(batch, temperature=1.0, **meta)
    return batch


def tower_state(worker) -> dict[str, torch.Tensor]:
    module = worker.actor.engine.module
    state = module.state_dict()
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in state.items()}


def ppo_step(worker, batch) -> None:
    """One veRL actor update as the trainer runs it: old log-probs from the worker, ±1 advantages."""
    from verl.workers.utils.padding import response_from_nested

    out = worker.compute_log_prob(with_meta(batch, calculate_entropy=False, compute_loss=False))
    old = response_from_nested(out["log_probs"], batch["response_mask"])
    n = batch.shape[0]
    train = batch.clone()
    train["old_log_probs"] = old
    train["advantages"] = torch.nested.as_nested_tensor(
        [torch.full_like(old[i], 1.0 if i % 2 == 0 else -1.0) for i in range(n)], layout=torch.jagged
    )
    worker.update_actor(with_meta(
        train, calculate_entropy=False, distillation_use_topk=False, distillation_only=False,
        global_batch_size=n, mini_batch_size=n, epochs=1, seed=0, dataloader_kwargs={"shuffle": False},
        compute_loss=True,
    ))


def changed_weights(worker, batch) -> tuple[list[str], list[str], list[str]]:
    """(tower weights, language-model weights, weights changed by one PPO step)."""
    before = tower_state(worker)
    ppo_step(worker, batch)
    after = tower_state(worker)
    tower = [k for k in before if ".visual." in f".{k}"]
    language = [k for k in before if k not in tower]
    return tower, language, [k for k in before if not torch.equal(before[k], after[k])]


@pytest.mark.parametrize("strategy", ["fsdp", "fsdp2"])
def test_training_step_leaves_the_tower_bit_identical(cpu_verl, trajectories, strategy):
    from differad_rl.integrations.qwen_vl.tiny import tiny_model_for

    assert trajectories["position_ids"][0].shape[0] == 4  # veRL's text + 3 M-RoPE rows
    worker = build("actor", tiny_model_for("qwen2_5_vl"), strategy=strategy)
    tower, language, changed = changed_weights(worker, trajectories)
    assert tower and language
    assert not set(changed) & set(tower)
    assert len(changed) >= len(language) // 2, changed


def test_without_the_option_the_same_step_changes_the_tower(cpu_verl, trajectories):
    from differad_rl.integrations.qwen_vl.tiny import tiny_model_for

    worker = build("actor", tiny_model_for("qwen2_5_vl"), freeze=False)
    tower, _, changed = changed_weights(worker, trajectories)
    assert len(set(changed) & set(tower)) >= len(tower) // 2


# ------------------------------------------------------------------------------------------------
# the feature cache in veRL's passes

IMAGES = 2 * 4 * 2  # prompts × n × images per prompt, per pass
DISTINCT = 2 * 2


def passes(worker, role: str = "actor"):
    from differad_rl.integrations.verl.freeze import TOWER_PASSES_ATTR

    return list(getattr(getattr(worker, role).engine, TOWER_PASSES_ATTR).passes)


@pytest.mark.parametrize("strategy", ["fsdp", "fsdp2"])
def test_cache_on_and_off_give_equal_log_probs_and_updates(cpu_verl, trajectories, strategy):
    from differad_rl.integrations.qwen_vl.tiny import tiny_model_for

    path = tiny_model_for("qwen2_5_vl")
    on = build("actor", path, strategy=strategy)
    off = build("actor", path, strategy=strategy, cache=False)
    meta = {"calculate_entropy": False, "compute_loss": False}
    lp_on = on.compute_log_prob(with_meta(trajectories, **meta))["log_probs"]
    lp_off = off.compute_log_prob(with_meta(trajectories, **meta))["log_probs"]
    assert torch.equal(lp_on.values(), lp_off.values())
    assert passes(on)[-1] == ("compute_log_prob", IMAGES, DISTINCT)
    assert passes(off)[-1] == ("compute_log_prob", IMAGES, IMAGES)
    # a whole PPO step (old log-probs, update): the same weights after it, bit for bit
    ppo_step(on, trajectories)
    ppo_step(off, trajectories)
    a, b = tower_state(on), tower_state(off)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_cache_on_and_off_give_equal_log_probs_on_the_other_families(cpu_verl, family):
    """Qwen2-VL and Qwen3-VL (deepstack features) through veRL's own forward: log-probs bitwise equal."""
    from differad_rl.integrations.qwen_vl.tiny import tiny_model_for

    batch = agent_loop_batch(family_env(family), family)
    path = tiny_model_for(family)
    meta = {"calculate_entropy": False, "compute_loss": False}
    on, off = build("actor", path), build("actor", path, cache=False)
    lp_on = on.compute_log_prob(with_meta(batch, **meta))["log_probs"]
    lp_off = off.compute_log_prob(with_meta(batch, **meta))["log_probs"]
    assert torch.equal(lp_on.values(), lp_off.values())
    assert (passes(on), passes(off)) == ([("compute_log_prob", IMAGES, DISTINCT)], [("compute_log_prob", IMAGES, IMAGES)])


def test_images_encoded_per_pass(cpu_verl, trajectories):
    """Each distinct image once per step on the actor (the update reuses the old-log-prob pass's
    features, then the cache is cleared), once per reference pass; copies always served."""
    from differad_rl.integrations.qwen_vl.tiny import tiny_model_for

    path = tiny_model_for("qwen2_5_vl")
    actor = build("actor", path)
    for _ in range(2):
        ppo_step(actor, trajectories)
    assert passes(actor) == [("compute_log_prob", IMAGES, DISTINCT), ("update_actor", IMAGES, 0)] * 2
    ref = build_cpu_ref(path)
    for _ in range(2):
        ref.compute_ref_log_prob(with_meta(trajectories, calculate_entropy=False, compute_loss=False))
    assert passes(ref, "ref") == [("compute_ref_log_prob", IMAGES, DISTINCT)] * 2
    cache = actor.actor.engine.differad_tower_passes.cache
    assert len(cache) == 0  # cleared after the update: nothing grows across steps


@pytest.mark.parametrize("family", sorted(FAMILY_MODEL))
def test_tower_router_equals_the_tower_on_the_three_families(family):
    """The call veRL's Qwen-VL forward makes (``model.visual(pixel_values, grid_thw=...)``) answered by the
    router equals the tower's own output field by field (Qwen3-VL's deepstack features too), bitwise; a
    group's copies are encoded once; the whole model's logits are unchanged."""
    from differad_rl.integrations.qwen_vl.loading import vision_tower
    from differad_rl.integrations.qwen_vl.tiny import load_tiny_qwen_vl, tiny_model_for
    from differad_rl.integrations.verl.freeze import TowerPasses, freeze_for_fsdp

    from tests.test_vision_cache import _batch

    model, processor = load_tiny_qwen_vl(tiny_model_for(family))
    model.eval()
    frozen = freeze_for_fsdp(model)
    assert frozen.unwrapped and frozen.tower_class in model._no_split_modules
    assert not set(frozen.unwrapped) & set(model._no_split_modules)  # the tower is one unit, blocks inside
    inputs = _batch(processor)
    pv, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    tower = vision_tower(model)
    with torch.no_grad(), pristine_qwen_classes():  # transformers' own forward (veRL's patches may be active)
        stock = tower(pv, grid_thw=grid)
        stock_logits = model(**inputs).logits
        router = TowerPasses(tower, cache=True)
        with router.pass_("compute_log_prob"):
            served = tower(pv, grid_thw=grid)
            logits = model(**inputs).logits
    assert torch.equal(served.pooler_output, stock.pooler_output)
    assert torch.equal(served.last_hidden_state, stock.last_hidden_state)
    if family == "qwen3_vl":
        assert all(torch.equal(a, b) for a, b in zip(served.deepstack_features, stock.deepstack_features, strict=True))
    assert torch.equal(logits, stock_logits)
    assert list(router.passes) == [("compute_log_prob", 20, 4)]  # 2 calls × 10 images, 4 distinct


def _gpu_check_freeze_script() -> str:
    """The frozen-tower check embedded in examples/verl/gpu_check_resampling.sh (its last Python block)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "examples" / "verl" / "gpu_check_resampling.sh").read_text()
    block = text.rsplit("<<'PY'\n", 1)[1]
    return block.split("\nPY\n", 1)[0]


def test_the_gpu_checks_tower_assertion_on_a_cpu_checkpoint(cpu_verl, trajectories, tmp_path, capsys, monkeypatch):
    """The GPU script's check, run on a checkpoint veRL's worker saved after a PPO step on the CPU: it reads the
    model folder and the saved ``actor/huggingface`` weights, finds the tower unchanged and the language model
    changed, and reads the per-pass lines the workers print. (veRL moves a CPU-resident model "to the GPU"
    before saving; on the CPU that move is skipped.)"""
    import subprocess
    import sys

    from verl.workers.engine.fsdp import transformer_impl

    monkeypatch.setattr(transformer_impl, "load_fsdp_model_to_gpu", lambda module: None)

    from differad_rl.integrations.qwen_vl.tiny import tiny_model_for

    path = tiny_model_for("qwen2_5_vl")
    cfg = worker_config(path)
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.actor.checkpoint.save_contents = ["hf_model"]
    from verl.workers.engine_workers import ActorRolloutRefWorker

    worker = ActorRolloutRefWorker(cfg, role="actor")
    worker.init_model()
    capsys.readouterr()
    ppo_step(worker, trajectories)
    log = capsys.readouterr().out
    worker.save_checkpoint(str(tmp_path / "checkpoints" / "global_step_1" / "actor"), global_step=1)
    (tmp_path / "train.log").write_text(log)
    script = _gpu_check_freeze_script()
    out = subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path), "1", "4", "true"],
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert "tensors bit-for-bit unchanged" in out.stdout and "OK: frozen tower unchanged, 2 passes logged" in out.stdout
    assert "images encoded per pass: compute_log_prob: 4 of 16" in out.stdout
