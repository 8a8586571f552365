"""Start-up checks: every differad-rl misconfiguration of the veRL recipe is
refused when ``python -m verl.trainer.main_ppo`` validates its config — in the driver, before Ray
starts — with a message naming the option and the fix; the launch script itself passes.

The checks run through the very function ``main_ppo`` calls (``verl.trainer.main_ppo.validate_config``,
wrapped by the plugin), on configs composed from the launch script's own argv by veRL's Hydra schema.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("verl")

from tests.test_verl_examples import compose, launch_argv  # noqa: E402


SK = "trainer.v1.sampler.sampler_kwargs"


@pytest.fixture(scope="module")
def argv(tmp_path_factory):
    return launch_argv(tmp_path_factory.mktemp("checks"), NNODES="1", NGPUS_PER_NODE="8")


def validate(argv: list[str], *overrides: str) -> None:
    """What main_ppo.main does first: veRL's validate_config (wrapped by the plugin) on the composed config."""
    from verl.trainer import main_ppo
    from verl.trainer.ppo.utils import need_critic, need_reference_policy

    cfg = compose([*argv, *overrides])
    main_ppo.validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))


def test_main_ppo_calls_the_wrapped_check():
    from verl.trainer import main_ppo
    from verl.utils import config as verl_config

    assert getattr(main_ppo.validate_config, "__differad_startup_check__", False)
    assert main_ppo.validate_config is verl_config.validate_config


def test_the_launch_script_passes(argv):
    from differad_rl.integrations.verl.checks import config_problems

    validate(argv)
    assert config_problems(compose(argv)) == []


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        # item 11: the sampler class against the trainer mode
        (["trainer.v1.trainer_mode=colocate_async"], r"trainer_mode=colocate_async.*custom_sampler.name=DifferadReplayBufferAsync"),
        (["trainer.v1.trainer_mode=separate_async"], r"trainer_mode=separate_async.*custom_sampler.name=DifferadReplayBufferAsync"),
        (["trainer.v1.sampler.custom_sampler.name=DifferadReplayBufferAsync"], r"trainer_mode=sync \(.*\); set trainer.v1.sampler.custom_sampler.name=DifferadReplayBuffer$"),
        # item 12: weight_source=score with the package's own [0, 2] score
        (["++algorithm.differad.weight_source=score"], r"weight_source=score.*1·localization \+ 1·format.*format_weight=0"),
        # item 13: the legacy trainer, named with its option
        (["trainer.use_v1=False"], r"needs veRL's V1 trainer.*set trainer.use_v1=True"),
        # item 16: estimator options and reward kwargs at start-up
        (["++algorithm.differad.tau=2"], r"algorithm.differad.tau must be a number in \[0, 1\]"),
        (["++algorithm.differad.taus=0.3"], r"unknown option\(s\) algorithm.differad.taus"),
        (["++algorithm.differad.mask_truncated=maybe"], r"algorithm.differad.mask_truncated must be true or false"),
        (["++reward.custom_reward_function.reward_kwargs.center_norm=centre"], r"reward_kwargs.*center_norm"),
        (["++reward.custom_reward_function.reward_kwargs.fromat_weight=1"], r"reward_kwargs.fromat_weight; known: .*format_weight"),
        (["++reward.custom_reward_function.reward_kwargs.format_weight=-1"], r"reward_kwargs.format_weight must be a finite number >= 0"),
        (["actor_rollout_ref.rollout.temperature=0"], r"temperature=0.*set actor_rollout_ref.rollout.temperature=1.0"),
        (["actor_rollout_ref.rollout.do_sample=False"], r"do_sample=False.*do_sample=True"),
        (["actor_rollout_ref.rollout.n=1"], r"rollout.n=1: every advantage is 0 and nothing trains; set actor_rollout_ref.rollout.n=8"),
        (["reward.reward_model.enable=True"], r"rewards computed at rollout time.*enable_resource_pool=True"),
        (["++differad.resample.metric=loc"], r"differad.resample.metric='loc' is not returned.*metric=localization"),
        (["++differad.resample.rounds=-1"], r"differad.resample.rounds must be an integer >= 0"),
        # the peers' group rules
        (["++differad.resample.rule=out_of_band"], r"differad.resample.rule='out_of_band' is not a same-prompt re-roll rule; set \+differad.resample.rule=differad or emit"),
        (["++differad.resample.correct_threshold=0.5"], r"correct_threshold=0.5 is read only by rule=emit, but differad.resample.rule='differad'"),
        ([f"++{SK}.online_filter_high=0.9"], rf"{SK}.online_filter_high set without {SK}.online_filter_metric.*online_filter_metric=localization"),
        ([f"++{SK}.online_filter_metric=localization", f"++{SK}.online_filter_low=0.5", f"++{SK}.online_filter_high=0.1"], r"online_filter_low=0.5 must be < online_filter_high=0.1"),
        ([f"++{SK}.online_filter_metric=loc", "data.gen_batch_size=1"], rf"{SK}.online_filter_metric='loc' is not returned by differad's compute_score.*online_filter_metric=localization"),
        ([f"++{SK}.online_filter_metric=localization"], r"data.gen_batch_size=None.*set data.gen_batch_size=1"),
        ([f"++{SK}.online_filter_metric=localization"], rf"bounds its refills.*set \+{SK}.train_batch_size=\d+ \(got None\)"),
        ([f"++{SK}.online_filter_metric=localization", "trainer.v1.sampler.custom_sampler.name=null"], r"read only by differad's sampler.*custom_sampler.name=DifferadReplayBuffer$"),
        ([f"++{SK}.online_filter_metric=localization", "trainer.v1.trainer_mode=colocate_async", "trainer.v1.sampler.custom_sampler.name=DifferadReplayBufferAsync", "reward.reward_model.enable=True"], r"online_filter_metric=localization judges groups on rewards computed at rollout time.*enable_resource_pool=True"),
        ([f"++{SK}.online_filter_band=0.5"], rf"unknown option\(s\) {SK}.online_filter_band for .*DifferadReplayBuffer; known: .*online_filter_low"),
    ],
)
def test_misconfiguration_refused_at_start_up(argv, overrides, match):
    from differad_rl.integrations.verl.checks import ConfigError

    with pytest.raises(ConfigError, match=match):
        validate(argv, *overrides)


def test_every_problem_is_listed_at_once(argv):
    from differad_rl.integrations.verl.checks import config_problems

    cfg = compose([*argv, "trainer.v1.trainer_mode=colocate_async", "actor_rollout_ref.rollout.temperature=0",
                   "++algorithm.differad.weight_source=score"])
    assert len(config_problems(cfg)) == 3


def test_fixes_the_messages_offer_pass(argv):
    validate(argv, "trainer.v1.trainer_mode=colocate_async", "trainer.v1.sampler.custom_sampler.name=DifferadReplayBufferAsync")
    validate(argv, "++algorithm.differad.weight_source=score", "++reward.custom_reward_function.reward_kwargs.format_weight=0")
    validate(argv, "actor_rollout_ref.rollout.temperature=0", "++differad.resample.rounds=0")
    validate(argv, "reward.reward_model.enable=True", "reward.reward_model.enable_resource_pool=True")
    # item 14: an ablation with another reward and no weights needs no localization key
    validate(argv, "++algorithm.differad.difficulty_weights=false", "reward.custom_reward_function.path=pkg://my.rewards",
             "++differad.resample.metric=reward")
    # EMIT's re-roll rule, EasyR1's online filter (sync: single-prompt refills, batch size passed)
    validate(argv, "++differad.resample.rule=no_correct", "++differad.resample.correct_threshold=0.5")
    batch = compose(argv).data.train_batch_size
    validate(argv, f"++{SK}.online_filter_metric=localization", "data.gen_batch_size=1", f"++{SK}.train_batch_size={batch}")
    validate(argv, f"++{SK}.online_filter_metric=reward", f"++{SK}.online_filter_low=0.1", f"++{SK}.online_filter_high=1.5",
             "trainer.v1.trainer_mode=colocate_async", "trainer.v1.sampler.custom_sampler.name=DifferadReplayBufferAsync")


def test_main_ppo_refuses_before_ray_starts(argv):
    """The real entry point, in a fresh process: our message, and Ray never initialised."""
    proc = subprocess.run(
        [sys.executable, "-m", "verl.trainer.main_ppo", *argv, "trainer.v1.trainer_mode=separate_async"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    assert "custom_sampler.name=DifferadReplayBufferAsync" in proc.stderr
    assert "ray init kwargs" not in proc.stdout


# ------------------------------------------------------------------------------------------------
# the bridge and the estimator on a batch: items 14, 15, 17, and item 12 at run time


class _NoTQ:
    def kv_batch_get(self, **kwargs):
        raise AssertionError("the bridge read the TransferQueue although nothing needs the localization")


def _batch(keys):
    import types

    return types.SimpleNamespace(keys=list(keys), partition_id="train")


def _algorithm(**differad):
    from omegaconf import OmegaConf

    return OmegaConf.create({"adv_estimator": "differad", "norm_adv_by_std_in_grpo": True, "differad": differad})


def _trainer(n: int = 4, response_length: int = 6, **differad):
    import types

    from omegaconf import OmegaConf

    return types.SimpleNamespace(config=OmegaConf.create({
        "algorithm": _algorithm(**differad),
        "actor_rollout_ref": {"rollout": {"n": n, "response_length": response_length}},
    }))


def _run_bridge(trainer, keys, rewards, mask, loc=None, tq=None):
    """The bridge around a stand-in of veRL's _compute_advantage that calls the estimator as veRL does."""
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn

    from differad_rl.integrations.verl import compat

    seen = {}

    def original(self, batch, metrics):
        uids = np.array([k.rsplit("_", 2)[0] for k in batch.keys], dtype=object)
        tlr = torch.zeros(mask.shape)
        tlr[:, 0] = torch.as_tensor(rewards, dtype=torch.float32)
        seen["adv"], _ = get_adv_estimator_fn("differad")(
            token_level_rewards=tlr, response_mask=mask, index=uids, config=self.config.algorithm)
        return batch

    if tq is None and loc is not None:
        import types

        tq = types.SimpleNamespace(kv_batch_get=lambda **kw: {
            "extra_fields": [{"reward_extra_info": {"localization": float(v)}} for v in loc]})
    wrapped = compat._wrap_compute_advantage(original, tq or _NoTQ())
    wrapped(trainer, _batch(keys), {})
    return seen["adv"]


def test_weights_off_needs_no_localization():
    """item 14: difficulty_weights=false never asks the TransferQueue for 'localization'."""
    from differad_rl.groups import group_advantages_by_id

    keys = [f"u{g}_{s}_0" for g in range(2) for s in range(4)]
    rewards = np.array([0.0, 1.0, 0.5, 0.2, 0.3, 0.3, 0.9, 0.1])
    mask = torch.ones(8, 6, dtype=torch.int64)
    adv = _run_bridge(_trainer(difficulty_weights=False), keys, rewards, mask)
    want = group_advantages_by_id(torch.as_tensor(rewards, dtype=torch.float32), torch.arange(8) // 4)
    torch.testing.assert_close(adv[:, 0], want)


def test_multi_output_sessions_use_the_final_output_like_verls_grpo():
    """item 15: with 2 outputs in some sessions, only the final output enters the group statistics and
    its advantage is broadcast to the session — exactly veRL's own GRPO path (weights off, same eps)."""
    from verl.protocol import DataProto
    from verl.trainer.ppo.v1.utils import compute_advantage_for_multi_trajectories

    rng = np.random.default_rng(0)
    keys, rewards = [], []
    for g in range(3):
        for s in range(4):
            for i in range(1 + (s % 2)):  # odd sessions have two outputs
                keys.append(f"uid{g}_{s}_{i}")
                rewards.append(float(rng.random()))
    rewards = np.asarray(rewards)
    n = len(keys)
    mask = torch.ones(n, 5, dtype=torch.int64)
    adv = _run_bridge(_trainer(difficulty_weights=False, eps=1e-6), keys, rewards, mask)

    tlr = torch.zeros(n, 5)
    tlr[:, 0] = torch.as_tensor(rewards, dtype=torch.float32)
    data = DataProto.from_dict(tensors={"token_level_rewards": tlr, "response_mask": mask},
                               non_tensors={"uid": np.array([k.rsplit("_", 2)[0] for k in keys], dtype=object)})
    want = compute_advantage_for_multi_trajectories(
        data, batch_keys=keys, adv_estimator="grpo", num_repeat=4, norm_adv_by_std_in_grpo=True,
        config=_algorithm()).batch["advantages"]
    torch.testing.assert_close(adv, want.to(adv.dtype), rtol=1e-5, atol=1e-6)
    # and the statistics really differ from counting every output
    from differad_rl.integrations.verl.estimator import compute_differad_advantage

    naive, _ = compute_differad_advantage(tlr, mask, np.array([k.rsplit("_", 2)[0] for k in keys], dtype=object),
                                          config=_algorithm(difficulty_weights=False, eps=1e-6))
    assert not torch.allclose(naive, adv)


def test_multi_output_sessions_weights_from_final_localization():
    from differad_rl.groups import difficulty_weights_by_id, group_advantages_by_id

    keys = ["a_0_0", "a_0_1", "a_1_0", "b_0_0", "b_1_0", "b_1_1"]
    rewards = np.array([9.0, 1.0, 0.0, 0.4, 9.0, 0.2])  # non-final outputs carry junk
    loc = np.array([9.0, 0.8, 0.1, 0.5, 9.0, 0.0])
    mask = torch.ones(6, 3, dtype=torch.int64)
    adv = _run_bridge(_trainer(n=2), keys, rewards, mask, loc=loc)
    final = [1, 2, 3, 5]
    ids = torch.tensor([0, 0, 1, 1])
    r = torch.as_tensor(rewards[final], dtype=torch.float32)
    want = group_advantages_by_id(r, ids) * difficulty_weights_by_id(torch.as_tensor(loc[final], dtype=torch.float32), ids)
    torch.testing.assert_close(adv[:, 0], want[[0, 0, 1, 2, 3, 3]])


def test_mask_truncated_zeroes_completions_that_used_the_whole_budget():
    """item 17: mask_truncated zeroes the advantage of a response of response_length tokens, after the
    group statistics (which still count its reward)."""
    from differad_rl.groups import difficulty_weights_by_id, group_advantages_by_id

    keys = [f"u{g}_{s}_0" for g in range(2) for s in range(4)]
    rewards = np.array([0.0, 1.0, 0.5, 0.2, 0.3, 0.6, 0.9, 0.1])
    loc = rewards.copy()
    lengths = [6, 3, 6, 1, 2, 6, 5, 4]  # budget 6: rows 0, 2, 5 truncated
    mask = torch.zeros(8, 6, dtype=torch.int64)
    for i, length in enumerate(lengths):
        mask[i, :length] = 1
    adv = _run_bridge(_trainer(mask_truncated=True, response_length=6), keys, rewards, mask, loc=loc)
    ids = torch.arange(8) // 4
    r = torch.as_tensor(rewards, dtype=torch.float32)
    want = group_advantages_by_id(r, ids) * difficulty_weights_by_id(r, ids)
    want[[0, 2, 5]] = 0.0
    torch.testing.assert_close(adv[:, 0], want)
    assert (adv[[0, 2, 5]] == 0).all() and adv[1].abs().sum() > 0


def test_mask_truncated_without_the_bridge_raises():
    from differad_rl.integrations.verl.estimator import compute_differad_advantage

    with pytest.raises(ValueError, match="mask_truncated=True needs the rollout's response length"):
        compute_differad_advantage(torch.zeros(2, 3), torch.ones(2, 3), np.array(["a", "a"], dtype=object),
                                   config=_algorithm(mask_truncated=True, difficulty_weights=False))


def test_weight_source_score_refuses_scores_outside_unit_interval():
    """item 12 at run time: a summed score in [0, 2] would give ω < 1."""
    from differad_rl.integrations.verl.estimator import compute_differad_advantage

    tlr = torch.tensor([[2.0], [0.5], [1.0], [0.0]])
    with pytest.raises(ValueError, match=r"weight_source=score.*\[0, 2\].*format_weight=0"):
        compute_differad_advantage(tlr, torch.ones(4, 1), np.array(["a"] * 4, dtype=object),
                                   config=_algorithm(weight_source="score"))
    adv, _ = compute_differad_advantage(tlr / 2, torch.ones(4, 1), np.array(["a"] * 4, dtype=object),
                                        config=_algorithm(weight_source="score"))
    assert torch.isfinite(adv).all()


def test_session_layout():
    from differad_rl.integrations.verl.estimator import session_layout

    assert session_layout(["a_0_0", "a_1_0"]) is None
    of_row, final = session_layout(["a_0_1", "a_0_0", "b_2_0", "a_0_2"])
    assert of_row.tolist() == [0, 0, 1, 0] and final.tolist() == [3, 2]
    with pytest.raises(ValueError, match="not veRL's"):
        session_layout(["nokey"])
