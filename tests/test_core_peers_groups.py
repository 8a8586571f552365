"""The peers' group weights and rules (differad_rl.group_weights, differad_rl.group_filters) against
the scalar oracle in tests/oracle_peers.py."""

import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from differad_rl.group_filters import (
    GROUP_RULES,
    group_rule,
    no_correct_groups,
    no_correct_groups_by_id,
    out_of_band_groups,
    out_of_band_groups_by_id,
    regenerate_groups,
    zero_variance_groups,
    zero_variance_groups_by_id,
)
from differad_rl.group_weights import (
    MEAN_REWARD_FORMS,
    mean_reward_weight,
    wrong_share_weights,
    wrong_share_weights_by_id,
)
from differad_rl.groups import degenerate_groups
from differad_rl.resampling import resample_groups
from tests import oracle_peers

reward = st.one_of(st.sampled_from([0.0, 0.005, 0.1, 0.3, 0.5, 0.99, 1.0]), st.floats(0, 1))


@st.composite
def grouped(draw):
    g = draw(st.integers(1, 8))
    n = draw(st.integers(1, 6))
    vals = []
    for _ in range(n):
        if draw(st.booleans()):
            vals.extend([draw(reward)] * g)
        else:
            vals.extend(draw(st.lists(reward, min_size=g, max_size=g)))
    return vals, g


def shuffled_ids(n_values, g, seed):
    """A random permutation of the contiguous layout, with the group id of every sample."""
    perm = list(range(n_values))
    random.Random(seed).shuffle(perm)
    return perm, torch.tensor([i // g for i in perm])


@settings(max_examples=300, deadline=None)
@given(data=grouped(), threshold=st.sampled_from([0.0, 0.3, 0.5]))
def test_wrong_share_weights_equal_oracle_and_by_id(data, threshold):
    vals, g = data
    got = wrong_share_weights(torch.tensor(vals, dtype=torch.float64), g, threshold)
    want = oracle_peers.wrong_share_weights(vals, g, threshold)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)
    assert bool(((got >= 1) & (got < 2)).all())
    perm, ids = shuffled_ids(len(vals), g, len(vals))
    by_id = wrong_share_weights_by_id(torch.tensor([vals[i] for i in perm], dtype=torch.float64), ids, threshold)
    np.testing.assert_allclose(by_id.numpy(), [want[i] for i in perm], rtol=0, atol=1e-12)


def test_wrong_share_weights_emit_cases():
    # EMIT: acc in {1, 0, -1}; weight 1 + share of <= 0, and 1 when all are wrong
    acc = torch.tensor([1.0, 0.0, -1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, -1.0, 0.0])
    assert wrong_share_weights(acc, 4).tolist() == [1.75] * 4 + [1.0] * 4 + [1.0] * 4


@settings(max_examples=300, deadline=None)
@given(vals=st.lists(reward, min_size=1, max_size=40), form=st.sampled_from(MEAN_REWARD_FORMS),
       power=st.sampled_from([1.0, 2.0, 0.5]), floor=st.sampled_from([0.0, None]))
def test_mean_reward_weight_equals_oracle(vals, form, power, floor):
    got = mean_reward_weight(torch.tensor(vals, dtype=torch.float64), form, power, floor)
    assert got.ndim == 0
    assert float(got) == pytest.approx(oracle_peers.mean_reward_weight(vals, form, power, floor), abs=1e-12)


def test_mean_reward_weight_values_and_floor():
    assert float(mean_reward_weight(torch.zeros(4), "exp")) == pytest.approx(math.e)
    assert float(mean_reward_weight(torch.ones(4), "power")) == pytest.approx(0.05)
    assert float(mean_reward_weight(torch.ones(4), "log")) == 0.0  # -log(1.02) < 0, floored
    assert float(mean_reward_weight(torch.ones(4), "log", floor=None)) == pytest.approx(-math.log(1.02))
    assert mean_reward_weight(torch.zeros(3, dtype=torch.float32), "power", 2.0).dtype == torch.float32
    easy, hard = torch.full((8,), 0.9), torch.full((8,), 0.1)
    for form in MEAN_REWARD_FORMS:
        assert float(mean_reward_weight(hard, form)) > float(mean_reward_weight(easy, form))


@settings(max_examples=300, deadline=None)
@given(data=grouped(), threshold=st.sampled_from([0.0, 0.3]), band=st.sampled_from([(0.01, 0.99), (0.2, 0.8)]))
def test_rules_equal_oracle_and_by_id(data, threshold, band):
    vals, g = data
    r = torch.tensor(vals, dtype=torch.float64)
    perm, ids = shuffled_ids(len(vals), g, 7)
    r_perm = torch.tensor([vals[i] for i in perm], dtype=torch.float64)
    checks = [
        (no_correct_groups(r, g, threshold), no_correct_groups_by_id(r_perm, ids, threshold),
         oracle_peers.no_correct(vals, g, threshold)),
        (zero_variance_groups(r, g), zero_variance_groups_by_id(r_perm, ids), oracle_peers.zero_variance(vals, g)),
        (out_of_band_groups(r, g, *band), out_of_band_groups_by_id(r_perm, ids, *band),
         oracle_peers.out_of_band(vals, g, *band)),
    ]
    for contiguous, by_id, want in checks:
        assert contiguous.tolist() == want
        assert by_id.tolist() == want


def test_rules_on_named_cases():
    r = torch.tensor([0.0] * 4 + [1.0] * 4 + [0.0, 0.0, 0.0, 0.4] + [0.3] * 4)
    assert no_correct_groups(r, 4).tolist() == [True, False, False, False]
    assert zero_variance_groups(r, 4).tolist() == [True, True, False, True]  # perfect groups too (DAPO)
    assert degenerate_groups(r, 4).tolist() == [True, False, False, True]  # ours keeps perfect groups
    assert out_of_band_groups(r, 4).tolist() == [True, True, False, False]
    assert zero_variance_groups(torch.tensor([0.5, 0.7]), 1).tolist() == [False, False]  # singletons kept
    ids = torch.tensor([0, 0, 2, 2])  # id 1 has no sample
    assert no_correct_groups_by_id(torch.zeros(4), ids).tolist() == [True, False, True]
    assert out_of_band_groups_by_id(torch.zeros(4), ids).tolist() == [True, False, True]


@pytest.mark.parametrize("name", GROUP_RULES)
def test_regenerate_groups_runs_any_rule_k_rounds_at_most(name):
    rule = group_rule(name)
    g, rng = 4, random.Random(3)
    start = torch.tensor([0.0] * 4 + [1.0] * 4 + [0.2, 0.4, 0.6, 0.8] + [0.3] * 4, dtype=torch.float64)
    calls = []

    def regenerate(groups, round_index):
        calls.append(groups.tolist())
        return torch.tensor([rng.random() for _ in range(groups.numel() * g)], dtype=torch.float64)

    out, stats = regenerate_groups(start, g, regenerate, 3, rule)
    first = rule(start, g).nonzero().flatten().tolist()
    assert (calls[0] if calls else []) == first
    assert stats.rounds_used == len(calls) <= 3
    assert stats.degenerate_before == pytest.approx(len(first) / 4)
    assert stats.degenerate_after == pytest.approx(float(rule(out, g).float().mean()))
    for k in set(range(4)) - {i for c in calls for i in c}:  # untouched groups keep their rewards
        assert out[k * g:(k + 1) * g].tolist() == start[k * g:(k + 1) * g].tolist()


def test_regenerate_groups_with_degenerate_rule_equals_resample_groups():
    g = 4
    start = torch.tensor([0.0] * 4 + [0.5] * 4 + [0.1, 0.2, 0.3, 0.4], dtype=torch.float64)

    def make():
        rng = random.Random(11)
        return lambda groups, _: torch.tensor([round(rng.random(), 1) for _ in range(groups.numel() * g)])

    a, sa = regenerate_groups(start, g, make(), 5, group_rule("differad"))
    b, sb = resample_groups(start, g, make(), 5)
    assert a.tolist() == b.tolist() and sa == sb


def test_regenerate_groups_off_and_bad_callback():
    start = torch.zeros(8)
    out, stats = regenerate_groups(start, 4, lambda *_: pytest.fail("called"), 0, group_rule("emit"))
    assert out.tolist() == start.tolist() and stats.rounds_used == 0 and stats.degenerate_before == 1.0
    with pytest.raises(ValueError, match="regenerate returned"):
        regenerate_groups(start, 4, lambda groups, _: torch.zeros(3), 1, group_rule("emit"))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: group_rule("dynamic"), "rule"),
        (lambda: group_rule("easyr1", low=0.9, high=0.1), "low must be < high"),
        (lambda: wrong_share_weights(torch.zeros(4), 4, threshold=math.nan), "threshold"),
        (lambda: mean_reward_weight(torch.zeros(4), "sqrt"), "form"),
        (lambda: no_correct_groups(torch.zeros(5), 4), "multiple of group_size"),
        (lambda: regenerate_groups(torch.zeros(4), 4, lambda *_: None, -1, group_rule("differad")), "max_rounds"),
    ],
)
def test_user_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()



@pytest.mark.parametrize("old,new", [("degenerate", "differad"), ("no_correct", "emit"),
                                     ("zero_variance", "dapo"), ("out_of_band", "easyr1")])
def test_former_rule_names_resolve_with_a_warning(old, new):
    from differad_rl.group_filters import resolve_rule

    with pytest.warns(FutureWarning, match=f"rule={old!r} is deprecated; write rule={new!r}"):
        assert resolve_rule(old) == new
    r = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.2, 0.4, 0.6, 0.8])
    with pytest.warns(FutureWarning):
        assert group_rule(old)(r, 4).tolist() == group_rule(new)(r, 4).tolist()
