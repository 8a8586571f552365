"""The ``differad`` advantage estimator through veRL 0.9.1's real registry and ``compute_advantage``.

Batches are built the way the trainer builds them: one uuid4 ``uid`` per prompt
(``str(uuid.uuid4())``, object array), ``DataProto.repeat(n, interleave=True)``, the reward on the
last valid response token (``rm_scores``), then rows permuted as ``_balance_batch`` does.
"""

from __future__ import annotations

import copy
import functools
import uuid

import numpy as np
import pytest
import torch

pytest.importorskip("verl")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.trainer.ppo.ray_trainer import compute_advantage  # noqa: E402

from differad_rl.groups import difficulty_weights_by_id, group_advantages_by_id  # noqa: E402
from differad_rl.integrations.verl import estimator as est  # noqa: E402
from tests import oracle  # noqa: E402

est.register()  # the plugin does this on `import verl`; explicit here so the test reads standalone


@functools.lru_cache(maxsize=None)
def composed_algorithm(overrides: tuple[str, ...] = ()):
    """veRL's own ``algorithm`` section of ppo_trainer.yaml, composed by Hydra with ``overrides``."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=["algorithm.adv_estimator=differad", *overrides])
    return cfg.algorithm


def algorithm_config(**differad):
    """The composed ``algorithm`` section plus ``algorithm.differad.*`` options (as ``+key=value`` adds them)."""
    cfg = copy.deepcopy(composed_algorithm())
    OmegaConf.set_struct(cfg, False)
    if differad:
        cfg.differad = differad
    return cfg


@pytest.fixture(scope="module")
def algo():
    return algorithm_config()


def trainer_batch(rewards, loc, n, *, resp_len=12, seed=0):
    """A DataProto as the V1 trainer hands it to ``compute_advantage`` (shuffled like balance_batch).

    ``rewards``/``loc`` are given per (prompt, sample) in generation order; returns the batch and the
    permutation applied (row ``i`` of the batch is generation-order sample ``perm[i]``).
    """
    g = torch.Generator().manual_seed(seed)
    prompts = len(rewards) // n
    data = DataProto.from_single_dict(
        {"dummy": torch.zeros(prompts, 1), "uid": np.array([str(uuid.uuid4()) for _ in range(prompts)], dtype=object)}
    )
    data = data.repeat(repeat_times=n, interleave=True)
    lengths = torch.randint(1, resp_len + 1, (len(data),), generator=g)
    mask = (torch.arange(resp_len)[None, :] < lengths[:, None]).to(torch.int64)
    rm = torch.zeros(len(data), resp_len)
    rm[torch.arange(len(data)), lengths - 1] = torch.as_tensor(rewards, dtype=torch.float32)
    data.batch["response_mask"] = mask
    data.batch["token_level_rewards"] = rm
    perm = torch.randperm(len(data), generator=g)
    data.reorder(perm)
    return data, perm


def core_expected(rewards, loc, uids, mask, *, tau=0.3, scope="group", scale="group"):
    ids = torch.as_tensor(np.unique(uids, return_inverse=True)[1])
    r = torch.as_tensor(rewards, dtype=torch.float32)
    l_ = torch.as_tensor(loc, dtype=torch.float32)
    adv = group_advantages_by_id(r, ids, scale=scale) * difficulty_weights_by_id(l_, ids, tau=tau, scope=scope)
    return adv[:, None] * mask


def test_registered_in_verl_registry():
    assert core_algos.get_adv_estimator_fn("differad") is est.compute_differad_advantage


def test_equals_core_on_trainer_built_batch(algo):
    rng = np.random.default_rng(0)
    n, prompts = 8, 16
    loc = rng.choice([0.0, 0.1, 0.25, 0.5, 0.8, 1.0], size=n * prompts)
    fmt = rng.integers(0, 2, size=n * prompts).astype(float)
    rewards = loc + fmt
    loc[:n] = 0.2  # one degenerate group: all equal localization
    rewards[:n] = 0.2 + 1.0
    data, perm = trainer_batch(rewards, loc, n)
    with est.provide_localization(loc[perm.numpy()]):
        out = compute_advantage(data, adv_estimator="differad", config=algo)
    expected = core_expected(
        rewards[perm.numpy()], loc[perm.numpy()], data.non_tensor_batch["uid"], data.batch["response_mask"]
    )
    torch.testing.assert_close(out.batch["advantages"], expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.batch["returns"], out.batch["advantages"])
    # the flat group gets exactly zero advantage, and masked tokens are zero
    flat_rows = torch.isin(perm, torch.arange(n))
    assert out.batch["advantages"][flat_rows].abs().max() == 0
    assert (out.batch["advantages"][data.batch["response_mask"] == 0] == 0).all()


def test_equals_independent_oracle_in_generation_order(algo):
    rng = np.random.default_rng(1)
    n, prompts = 4, 6
    loc = rng.uniform(0, 1, size=n * prompts).round(2)
    rewards = loc + rng.integers(0, 2, size=n * prompts)
    data, perm = trainer_batch(rewards, loc, n, seed=3)
    with est.provide_localization(loc[perm.numpy()]):
        adv = compute_advantage(data, adv_estimator="differad", config=algo).batch["advantages"]
    scalar = torch.empty(n * prompts, dtype=torch.float64)
    scalar[perm] = (adv.sum(-1) / data.batch["response_mask"].sum(-1)).double()
    want = [a * w for a, w in zip(oracle.group_advantages(list(rewards), n), oracle.difficulty_weights(list(loc), n))]
    torch.testing.assert_close(scalar, torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-5)


def test_options_from_command_line_overrides():
    """``+algorithm.differad.tau=0.5`` etc. on the command line (Hydra override syntax) reach the estimator."""
    algo = composed_algorithm(("+algorithm.differad.tau=0.5", "+algorithm.differad.scope=batch", "+algorithm.differad.eps=0.01"))
    rng = np.random.default_rng(2)
    n = 4
    loc = rng.uniform(0, 1, size=n * 5)
    rewards = loc * 2
    data, perm = trainer_batch(rewards, loc, n)
    with est.provide_localization(loc[perm.numpy()]):
        adv = compute_advantage(data, adv_estimator="differad", config=algo).batch["advantages"]
    ids = torch.as_tensor(np.unique(data.non_tensor_batch["uid"], return_inverse=True)[1])
    r = torch.as_tensor(rewards[perm.numpy()], dtype=torch.float32)
    l_ = torch.as_tensor(loc[perm.numpy()], dtype=torch.float32)
    want = group_advantages_by_id(r, ids, eps=0.01) * difficulty_weights_by_id(l_, ids, tau=0.5, scope="batch")
    torch.testing.assert_close(adv, want[:, None] * data.batch["response_mask"])


def test_norm_adv_by_std_false_means_no_std_scaling():
    cfg = algorithm_config()
    cfg.norm_adv_by_std_in_grpo = False
    assert est.DifferadConfig.from_algorithm_config(cfg).scale == "none"
    cfg.differad = {"scale": "group"}
    assert est.DifferadConfig.from_algorithm_config(cfg).scale == "group"
    assert est.DifferadConfig.from_algorithm_config(algorithm_config()).scale == "group"


def test_weights_off_is_plain_group_advantage(algo):
    cfg = algorithm_config(difficulty_weights=False)
    rewards = np.array([0.0, 1.0, 0.5, 0.5, 2.0, 1.0])
    data, perm = trainer_batch(rewards, rewards, 3)
    adv = compute_advantage(data, adv_estimator="differad", config=cfg).batch["advantages"]  # no localization needed
    ids = torch.as_tensor(np.unique(data.non_tensor_batch["uid"], return_inverse=True)[1])
    want = group_advantages_by_id(torch.as_tensor(rewards[perm.numpy()], dtype=torch.float32), ids)
    torch.testing.assert_close(adv, want[:, None] * data.batch["response_mask"])


def test_weight_source_score_uses_summed_reward():
    cfg = algorithm_config(weight_source="score")
    rewards = np.array([0.0, 0.2, 0.9, 0.1, 0.1, 0.6])
    data, perm = trainer_batch(rewards, rewards, 3)
    adv = compute_advantage(data, adv_estimator="differad", config=cfg).batch["advantages"]
    r = rewards[perm.numpy()]
    torch.testing.assert_close(adv, core_expected(r, r, data.non_tensor_batch["uid"], data.batch["response_mask"]))


def test_missing_localization_raises_clearly(algo):
    data, _ = trainer_batch(np.array([0.0, 1.0]), np.array([0.0, 1.0]), 2)
    with pytest.raises(ValueError, match="localization reward, but none reached it"):
        compute_advantage(data, adv_estimator="differad", config=algo)


def test_localization_length_mismatch_raises(algo):
    data, _ = trainer_batch(np.array([0.0, 1.0, 1.0, 0.0]), np.zeros(4), 2)
    with est.provide_localization(np.zeros(3)), pytest.raises(ValueError, match="3 entries for 4 samples"):
        compute_advantage(data, adv_estimator="differad", config=algo)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"taus": 0.3}, r"unknown option\(s\) algorithm\.differad\.taus; known options: tau, scope"),
        ({"tau": 1.5}, r"algorithm\.differad\.tau must be a number in \[0, 1\], got 1\.5"),
        ({"scope": "device"}, r"algorithm\.differad\.scope must be 'group' or 'batch'"),
        ({"scale": "batch"}, r"algorithm\.differad\.scale must be 'group', 'none' or null"),
        ({"eps": 0}, r"algorithm\.differad\.eps must be a positive number"),
        ({"weight_source": "format"}, r"algorithm\.differad\.weight_source"),
    ],
)
def test_config_errors_name_the_option(options, match):
    cfg = algorithm_config(**options)
    data, _ = trainer_batch(np.array([0.0, 1.0]), np.array([0.0, 1.0]), 2)
    with est.provide_localization(np.zeros(2)), pytest.raises(ValueError, match=match):
        compute_advantage(data, adv_estimator="differad", config=cfg)


def test_dtype_and_device_kept(algo):
    rewards = torch.tensor([[0.0, 1.0], [0.0, 0.0], [2.0, 0.0], [0.0, 0.5]], dtype=torch.float64)
    mask = torch.ones(4, 2, dtype=torch.int64)
    adv, ret = est.compute_differad_advantage(
        rewards, mask, index=np.array(["a", "a", "b", "b"], dtype=object), config=algo, localization=[0, 1, 0.2, 0.2]
    )
    assert adv.dtype == torch.float64 and adv.device == rewards.device and adv.shape == (4, 2)
    assert ret is adv


def test_group_ids_from_index_first_appearance():
    ids = est.group_ids_from_index(np.array(["b", "a", "b", "c", "a"], dtype=object))
    assert ids.tolist() == [0, 1, 0, 2, 1]
    assert est.group_ids_from_index(np.array([7, 7, 3])).tolist() == [7, 7, 3]


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 6),
    prompts=st.integers(1, 6),
    loc=st.data(),
    seed=st.integers(0, 2**16),
)
def test_invariants(n, prompts, loc, seed):
    """Any batch: per-group advantages sum to 0, masked tokens are 0, and the result equals the
    core on the shuffled batch."""
    values = st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.9, 1.0])
    loc_v = np.array(loc.draw(st.lists(values, min_size=n * prompts, max_size=n * prompts)))
    rewards = loc_v + np.array(loc.draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=n * prompts, max_size=n * prompts)))
    data, perm = trainer_batch(rewards, loc_v, n, seed=seed)
    algo = OmegaConf.create({"adv_estimator": "differad", "norm_adv_by_std_in_grpo": True})
    with est.provide_localization(loc_v[perm.numpy()]):
        adv = compute_advantage(data, adv_estimator="differad", config=algo).batch["advantages"]
    mask = data.batch["response_mask"]
    assert (adv[mask == 0] == 0).all()
    scalar = adv.sum(-1) / mask.sum(-1)
    uids = data.non_tensor_batch["uid"]
    for u in set(uids.tolist()):
        rows = torch.as_tensor(uids == u)
        assert abs(float(scalar[rows].sum())) < 1e-3
    torch.testing.assert_close(
        adv, core_expected(rewards[perm.numpy()], loc_v[perm.numpy()], uids, mask), rtol=1e-6, atol=1e-6
    )
