"""examples/verl: the launch script's overrides compose against veRL 0.9.1's own config schema
(Hydra, ``verl/trainer/config/ppo_trainer.yaml``) and its dataclasses, so a typo fails here; the
docs/method.md §1 hyperparameters are what the script sets; prepare_data.py writes loadable parquet files.
"""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("verl")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "verl" / "run_differad_qwen2_5_vl.sh"
README = ROOT / "examples" / "verl" / "README.md"


def launch_argv(tmp_path: Path, *extra: str, **env: str) -> list[str]:
    """Run the launch script with a fake ``python3`` that records its argv (exactly as bash expands it)."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    out = tmp_path / "argv.txt"
    shim = fake / "python3"
    shim.write_text(f"#!/usr/bin/env bash\nprintf '%s\\n' \"$@\" > {shlex.quote(str(out))}\n")
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    run_env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "HOME": str(tmp_path), **env}
    subprocess.run(["bash", str(SCRIPT), *extra], check=True, env=run_env, timeout=60)
    argv = out.read_text().splitlines()
    assert argv[:2] == ["-m", "verl.trainer.main_ppo"]
    return argv[2:]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        return hydra_compose(config_name="ppo_trainer", overrides=overrides)


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    argv = launch_argv(tmp_path_factory.mktemp("launch"), NNODES="2", NGPUS_PER_NODE="8")
    return argv, compose(argv)


def test_every_override_is_in_verls_schema(launch):
    argv, cfg = launch
    assert len(argv) > 50
    # no legacy reward keys (veRL 0.9 silently ignores them)
    assert not [a for a in argv if a.lstrip("+").startswith(("custom_reward_function.", "reward_model."))]
    # the dataclass conversions veRL performs on these nodes accept the added keys
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.config import RolloutConfig

    rollout = omega_conf_to_dataclass(cfg.actor_rollout_ref.rollout)  # as veRL's rollout replicas do (via _target_)
    assert isinstance(rollout, RolloutConfig)
    assert rollout.limit_images == 2
    assert rollout.agent.agent_loop_manager_class == "differad_rl.integrations.verl.resampling.DifferadAgentLoopManagerTQ"


def test_a_typo_fails_the_schema_check(tmp_path):
    from hydra.errors import ConfigCompositionException

    argv = launch_argv(tmp_path, "actor_rollout_ref.actor.clip_ratio_hihg=0.28")
    with pytest.raises(ConfigCompositionException, match="clip_ratio_hihg"):
        compose(argv)


def test_design_hyperparameters(launch):
    _, cfg = launch
    actor, rollout = cfg.actor_rollout_ref.actor, cfg.actor_rollout_ref.rollout
    assert rollout.n == 8  # G
    assert actor.ppo_micro_batch_size_per_gpu == 8  # 8 completions per device
    # gradient accumulation 2: one mini-batch (= the whole step) over 2 micro-batches per GPU
    n_gpus = cfg.trainer.nnodes * cfg.trainer.n_gpus_per_node
    assert cfg.data.train_batch_size == actor.ppo_mini_batch_size == 2 * n_gpus
    assert actor.ppo_mini_batch_size * rollout.n // n_gpus // actor.ppo_micro_batch_size_per_gpu == 2
    assert actor.use_kl_loss and actor.kl_loss_coef == 0.04 and actor.kl_loss_type == "low_var_kl"
    assert not cfg.algorithm.use_kl_in_reward
    assert (actor.clip_ratio_low, actor.clip_ratio_high) == (0.2, 0.28)
    assert actor.loss_agg_mode == "token-mean"
    assert actor.freeze_vision_tower is True
    # the prompt budget follows the pixel budget: two images of 1,003,520 px = 2 × 1280 visual tokens + text
    assert cfg.data.max_prompt_length == 2 * 1003520 // 28**2 + 512 == 3072
    assert cfg.algorithm.differad.mask_truncated is True  # docs/method.md §1: truncated completions masked
    assert cfg.trainer.total_epochs == 1
    assert rollout.limit_images == 2
    assert cfg.trainer.use_v1 is True


def test_plugin_pieces_resolve(launch):
    """The estimator, its options, the reward and its kwargs, and the resampling options all load."""
    _, cfg = launch
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn
    from verl.trainer.ppo.reward import get_custom_reward_fn

    from differad_rl.integrations.verl.estimator import DifferadConfig, compute_differad_advantage
    from differad_rl.integrations.verl.reward import _options_from_kwargs

    assert get_adv_estimator_fn(cfg.algorithm.adv_estimator) is compute_differad_advantage
    assert DifferadConfig.from_algorithm_config(cfg.algorithm) == DifferadConfig(scale="group", mask_truncated=True)
    fn = get_custom_reward_fn(cfg)  # veRL's own pkg:// loading with the reward_kwargs bound
    out = fn(data_source="d", solution_str="<think>.</think><answer>(1,1),(9,9)</answer>", ground_truth=[[1, 1, 9, 9]])
    assert out["score"] == 2.0
    _options_from_kwargs(dict(cfg.reward.custom_reward_function.reward_kwargs))
    resampling = pytest.importorskip("differad_rl.integrations.verl.resampling")
    assert resampling.ResampleConfig.from_config(cfg).rounds == 2


def test_resampling_rounds_from_environment(tmp_path):
    argv = launch_argv(tmp_path, RESAMPLE_ROUNDS="0")
    assert "+differad.resample.rounds=0" in argv


def test_readme_commands_compose():
    """Every ``key=value`` override shown in examples/verl/README.md is valid in veRL's schema."""
    text = README.read_text()
    lines = [ln.strip().rstrip("\\").strip() for ln in text.splitlines()]
    overrides = [ln for ln in lines if "=" in ln and ln.split("=", 1)[0].lstrip("+").count(".") >= 1 and " " not in ln]
    assert overrides, "README shows no overrides"
    overrides = [o.replace("$HEAD_IP", "10.0.0.1") for o in overrides]
    compose([o for o in overrides if not o.startswith("+")] + [o for o in overrides if o.startswith("+")])


def test_prepare_data_writes_train_and_val(tmp_path):
    from differad_rl.data.demo import build_demo_pairs

    pairs = build_demo_pairs(tmp_path / "pairs", n_pairs=8, size=48, workers=1, progress=False, test_fraction=0.25)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "verl" / "prepare_data.py"), "--pairs", str(pairs), "--out", str(tmp_path / "pq")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    import datasets

    train = datasets.load_dataset("parquet", data_files=str(tmp_path / "pq" / "train.parquet"))["train"]
    val = datasets.load_dataset("parquet", data_files=str(tmp_path / "pq" / "val.parquet"))["train"]
    assert len(train) + len(val) == 8 and len(val) >= 1
    assert {r["extra_info"]["split"] for r in train} == {"train"}
    assert "train" not in {r["extra_info"]["split"] for r in val}
    assert train[0]["extra_info"]["space"] == "qwen2_5_vl" and train[0]["extra_info"]["max_pixels"] == 1003520
