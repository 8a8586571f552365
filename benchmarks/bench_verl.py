"""The ``differad`` veRL estimator on 8,192 × 512 responses (groups of 8), side by side with veRL's own.

Targets (ratios printed by conftest.py after ``pytest benchmarks/bench_verl.py --benchmark-enable``):

* no slower than veRL's ``grpo_vectorized`` (which computes no difficulty weights);
* ≥ 10× faster than veRL's ``compute_grpo_outcome_advantage`` (per-sample Python loop).

torch runs with one intra-op thread (both sides alike): on this 2-core machine the second thread only
adds contention, and under load it made every side 2-3x slower and the ratios noise.

The batch is what the V1 trainer hands the estimator: uuid4 ``uid`` strings in an object array,
rows shuffled (balance_batch), an int64 ``response_mask`` with random lengths, the outcome reward
on the last response token.
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import torch

pytest.importorskip("verl")

from omegaconf import OmegaConf  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402

from differad_rl.groups import difficulty_weights_by_id, group_advantages_by_id  # noqa: E402
from differad_rl.integrations.verl import estimator as est  # noqa: E402

N_RESP, RESP_LEN, G = 8192, 512, 8


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(0)
    uids = np.array([str(uuid.uuid4()) for _ in range(N_RESP // G)], dtype=object).repeat(G)
    perm = torch.randperm(N_RESP, generator=gen).numpy()
    uids = uids[perm]
    lengths = torch.randint(1, RESP_LEN + 1, (N_RESP,), generator=gen)
    mask = (torch.arange(RESP_LEN)[None, :] < lengths[:, None]).to(torch.int64)
    loc = torch.rand(N_RESP, generator=gen)
    fmt = (torch.rand(N_RESP, generator=gen) > 0.5).float()
    rewards = torch.zeros(N_RESP, RESP_LEN)
    rewards[torch.arange(N_RESP), lengths - 1] = loc + fmt
    config = OmegaConf.create({"adv_estimator": "differad", "norm_adv_by_std_in_grpo": True})
    return rewards, mask, uids, loc, config


def _differad(batch):
    rewards, mask, uids, loc, config = batch
    return est.compute_differad_advantage(rewards, mask, index=uids, config=config, localization=loc)


def test_verl_bench_grpo_loop_8192x512(benchmark, batch):
    rewards, mask, uids, _, config = batch
    adv, _ = benchmark.pedantic(
        lambda: core_algos.compute_grpo_outcome_advantage(rewards, mask, uids, config=config), rounds=3, iterations=1
    )
    assert adv.shape == (N_RESP, RESP_LEN)


def test_verl_bench_grpo_vectorized_8192x512(benchmark, batch):
    rewards, mask, uids, _, config = batch
    fn = core_algos.get_adv_estimator_fn("grpo_vectorized")
    adv, _ = benchmark.pedantic(
        lambda: fn(token_level_rewards=rewards, response_mask=mask, index=uids, config=config), rounds=40, iterations=1
    )
    assert adv.shape == (N_RESP, RESP_LEN)


def test_verl_bench_differad_vs_grpo_vectorized(benchmark, batch):
    benchmark.extra_info.update(
        peer="test_verl_bench_grpo_vectorized_8192x512", target="no slower (ratio >= 1)", ratio_min=1.0
    )
    adv, _ = benchmark.pedantic(lambda: _differad(batch), rounds=40, iterations=1)
    rewards, mask, uids, loc, _ = batch
    ids = torch.as_tensor(np.unique(uids, return_inverse=True)[1])
    scalar = group_advantages_by_id(rewards.sum(-1), ids) * difficulty_weights_by_id(loc, ids)
    torch.testing.assert_close(adv, scalar[:, None] * mask)


def test_verl_bench_differad_vs_grpo_loop(benchmark, batch):
    benchmark.extra_info.update(peer="test_verl_bench_grpo_loop_8192x512", target=">= 10x faster", ratio_min=10.0)
    adv, _ = benchmark.pedantic(lambda: _differad(batch), rounds=40, iterations=1)
    assert adv.shape == (N_RESP, RESP_LEN)
