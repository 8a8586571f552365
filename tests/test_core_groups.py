import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from differad_rl.groups import (
    MAX_WEIGHT,
    degenerate_groups,
    degenerate_groups_by_id,
    difficulty_weights,
    difficulty_weights_by_id,
    group_advantages,
    group_advantages_by_id,
)
from differad_rl.resampling import ResampleStats, resample_groups
from tests import oracle

reward = st.one_of(st.sampled_from([0.0, 0.1, 0.3, 0.5, 1.0]), st.floats(0, 1))


@st.composite
def grouped(draw):
    g = draw(st.integers(1, 8))
    n = draw(st.integers(1, 6))
    flat = draw(st.booleans())
    vals = []
    for _ in range(n):
        if flat and draw(st.booleans()):
            vals.extend([draw(reward)] * g)
        else:
            vals.extend(draw(st.lists(reward, min_size=g, max_size=g)))
    return vals, g


@settings(max_examples=300, deadline=None)
@given(data=grouped(), scale=st.sampled_from(["group", "batch", "none"]))
def test_advantages_equal_oracle_and_sum_to_zero(data, scale):
    vals, g = data
    r = torch.tensor(vals, dtype=torch.float64)
    adv = group_advantages(r, g, scale=scale)
    np.testing.assert_allclose(adv.numpy(), oracle.group_advantages(vals, g, scale), rtol=0, atol=1e-9)
    assert not torch.isnan(adv).any()
    sums = adv.view(-1, g).sum(1)
    assert torch.allclose(sums, torch.zeros_like(sums), atol=1e-9)
    flat = r.view(-1, g)
    flat = flat.amax(1) == flat.amin(1)
    assert (adv.view(-1, g)[flat] == 0).all()  # exactly 0, never NaN
    ids = torch.arange(len(vals)) // g
    perm = torch.randperm(len(vals), generator=torch.Generator().manual_seed(0))
    by_id = group_advantages_by_id(r[perm], ids[perm], scale=scale)
    np.testing.assert_allclose(by_id.numpy(), adv[perm].numpy(), rtol=0, atol=1e-9)


@settings(max_examples=300, deadline=None)
@given(data=grouped(), scope=st.sampled_from(["group", "batch"]), tau=st.sampled_from([0.3, 0.5, 0.0, 1.0]))
def test_weights_equal_oracle_and_are_bounded(data, scope, tau):
    vals, g = data
    r = torch.tensor(vals, dtype=torch.float64)
    w = difficulty_weights(r, g, tau=tau, scope=scope)
    np.testing.assert_allclose(w.numpy(), oracle.difficulty_weights(vals, g, tau, scope), rtol=0, atol=1e-12)
    assert ((w >= 1 - 1e-12) & (w <= MAX_WEIGHT + 1e-12)).all()
    assert (w.view(-1, g) == w.view(-1, g)[:, :1]).all()
    ids = torch.arange(len(vals)) // g
    np.testing.assert_allclose(difficulty_weights_by_id(r, ids, tau, scope).numpy(), w.numpy(), rtol=0, atol=1e-12)


def test_weight_extremes():
    assert difficulty_weights(torch.zeros(8), 8).tolist() == pytest.approx([MAX_WEIGHT] * 8)
    assert difficulty_weights(torch.ones(8), 8).tolist() == pytest.approx([1.0] * 8)
    assert MAX_WEIGHT == pytest.approx((math.e + math.sqrt(2)) / 2)


@settings(max_examples=300, deadline=None)
@given(data=grouped())
def test_degenerate_equals_oracle(data):
    vals, g = data
    r = torch.tensor(vals, dtype=torch.float64)
    d = degenerate_groups(r, g)
    assert d.tolist() == oracle.degenerate(vals, g)
    assert degenerate_groups_by_id(r, torch.arange(len(vals)) // g).tolist() == d.tolist()


def test_degenerate_rules():
    r = torch.tensor([0.0] * 4 + [1.0] * 4 + [0.2, 0.2, 0.2, 0.3] + [0.4] * 4)
    assert degenerate_groups(r, 4).tolist() == [True, False, False, True]


def test_dtype_device_and_int_input():
    for dtype in (torch.float32, torch.float64):
        r = torch.rand(16, dtype=dtype)
        assert group_advantages(r, 8).dtype == dtype
        assert difficulty_weights(r, 8).dtype == dtype
        assert group_advantages_by_id(r, torch.arange(16) // 8).dtype == dtype
    assert group_advantages(torch.tensor([0, 1, 0, 1]), 2).dtype == torch.float64


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: group_advantages(torch.zeros(10), 8), "length 10, which is not a multiple of group_size=8"),
        (lambda: group_advantages(torch.zeros(8), 0), "group_size"),
        (lambda: group_advantages(torch.zeros(8), 8, scale="std"), "scale='std'"),
        (lambda: difficulty_weights(torch.zeros(8), 8, scope="device"), "scope='device'"),
        (lambda: difficulty_weights(torch.zeros(2, 4), 4), "1-D"),
        (lambda: group_advantages_by_id(torch.zeros(4), torch.zeros(3, dtype=torch.long)), "group_ids has length 3"),
        (lambda: group_advantages_by_id(torch.zeros(4), torch.zeros(4)), "integer"),
        (lambda: resample_groups(torch.zeros(8), 8, lambda i, k: torch.zeros(8), -1), "max_rounds"),
    ],
)
def test_user_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


class SeededRegenerator:
    """A deterministic stand-in policy: each group has a success probability; a regeneration draws
    new rewards from a seeded generator (as a real one would sample new completions)."""

    def __init__(self, p_good, seed):
        self.p_good = p_good
        self.gen = torch.Generator().manual_seed(seed)
        self.calls = []

    def __call__(self, idx, round_index):
        self.calls.append((idx.tolist(), round_index))
        hits = torch.rand(len(idx), 8, generator=self.gen) < self.p_good[idx][:, None]
        return torch.where(hits, 0.9, 0.1).to(torch.float64).flatten()


def test_resampling_regenerates_only_degenerate_groups_and_splices():
    r = torch.tensor([0.1] * 8 + [0.5, 0.6] * 4 + [1.0] * 8 + [0.0] * 8, dtype=torch.float64)
    regen = SeededRegenerator(torch.tensor([0.5, 0.5, 0.5, 0.5]), seed=0)
    out, stats = resample_groups(r, 8, regen, max_rounds=2)
    assert regen.calls[0] == ([0, 3], 0)
    assert torch.equal(out[8:24], r[8:24])  # untouched groups are kept bit for bit
    assert torch.equal(r[:8], torch.full((8,), 0.1, dtype=torch.float64))  # input not modified
    assert stats.degenerate_before == 0.5
    assert stats.groups_resampled == 2 and stats.rounds_used == len(regen.calls)
    assert stats.regenerations == sum(len(c[0]) for c in regen.calls)
    assert stats.degenerate_after == degenerate_groups(out, 8).float().mean().item()


def test_resampling_rounds_are_exactly_k_when_always_degenerate():
    for k in range(4):
        calls = []
        out, stats = resample_groups(torch.zeros(32), 8, lambda i, rd: calls.append(rd) or torch.zeros(len(i) * 8), k)
        assert calls == list(range(k)) and stats.rounds_used == k
        assert stats.per_round == [4] * k and stats.regenerations == 4 * k
        assert stats.degenerate_after == 1.0 and stats.groups_resampled == (4 if k else 0)


def test_resampling_off_and_nothing_degenerate():
    r = torch.tensor([0.1, 0.9] * 8)
    out, stats = resample_groups(r, 8, lambda i, k: pytest.fail("must not regenerate"), 3)
    assert stats == ResampleStats() and torch.equal(out, r)
    out, stats = resample_groups(torch.zeros(16), 8, lambda i, k: pytest.fail("K=0 is off"), 0)
    assert stats.rounds_used == 0 and stats.degenerate_before == 1.0 == stats.degenerate_after


def test_resampling_is_deterministic_for_a_seed():
    r = torch.tensor([0.1] * 64, dtype=torch.float64)
    p = torch.rand(8, generator=torch.Generator().manual_seed(1))
    a = resample_groups(r, 8, SeededRegenerator(p, seed=7), 3)
    b = resample_groups(r, 8, SeededRegenerator(p, seed=7), 3)
    assert torch.equal(a[0], b[0]) and a[1] == b[1]


def test_resampling_rejects_wrong_callback_output():
    with pytest.raises(ValueError, match="regenerate returned"):
        resample_groups(torch.zeros(16), 8, lambda i, k: torch.zeros(3), 1)


def test_stats_as_metrics():
    m = ResampleStats(rounds_used=2, groups_resampled=3, regenerations=4, degenerate_before=0.5, degenerate_after=0.25).as_metrics()
    assert m == {"resample/rounds_used": 2.0, "resample/groups_resampled": 3.0, "resample/regenerations": 4.0,
                 "resample/degenerate_before": 0.5, "resample/degenerate_after": 0.25}
