"""The registry: one name table for rewards, weightings and group rules (docs/method.md §9)."""

from __future__ import annotations

import pytest
import torch

from differad_rl import registry
from differad_rl.group_weights import mean_reward_weight, wrong_share_weights
from differad_rl.groups import difficulty_weights


def test_unknown_names_and_options_are_refused_naming_them() -> None:
    with pytest.raises(ValueError, match="reward name 'dice' is unknown; known rewards: dclr, iou"):
        registry.build_reward("dice")
    with pytest.raises(ValueError, match="reward 'iou' takes no option center_norm"):
        registry.build_reward("iou", center_norm="enclosing")
    with pytest.raises(ValueError, match="already registered"):
        registry.register_reward("dclr", registry.REWARDS["dclr"].factory)
    with pytest.raises(ValueError, match="weighting='omega' is not known"):
        registry.check_weighting("omega")


def test_shared_options_go_to_the_rewards_that_take_them() -> None:
    shared = {"center_norm": "enclosing", "threshold": 0.3, "prompt_family": "mantis"}
    assert registry.reward_options("dclr", shared) == {"center_norm": "enclosing", "prompt_family": "mantis"}
    assert registry.reward_options("iou_threshold", shared) == {"threshold": 0.3, "prompt_family": "mantis"}
    assert registry.reward_options("format", shared) == {"prompt_family": "mantis"}
    assert registry.build_reward("dclr", **registry.reward_options("dclr", shared)).config.center_norm == "enclosing"


def test_every_entry_builds_a_named_reward() -> None:
    for name, entry in registry.REWARDS.items():
        reward = registry.build_reward(name)
        assert reward.__name__ == f"{name}_reward"
        solution = [[[10, 10, 20, 20]]] if entry.multi_box else [[10, 10, 20, 20]]
        text = "<think>.</think><answer>(10,10),(20,20)</answer>"
        assert reward([text], solution=solution) == [1.0]


@pytest.mark.parametrize("name", registry.WEIGHTINGS)
def test_advantage_weights_equal_the_core_functions(name: str) -> None:
    g = 4
    loc = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.1, 0.6, 0.2, 0.9, 1.0, 1.0, 0.0, 0.4], dtype=torch.float64)
    got = registry.advantage_weights(name, loc, registry.contiguous_ids(loc.numel(), g), correct_threshold=0.5,
                                     univg_form="exp")
    want = {
        "differad": lambda: difficulty_weights(loc, g),
        "emit": lambda: wrong_share_weights(loc, g, 0.5),
        "univg": lambda: mean_reward_weight(loc, "exp").expand(loc.numel()),
    }[name]()
    torch.testing.assert_close(got, want)


def test_rule_names_are_one_vocabulary() -> None:
    assert registry.GROUP_RULES == ("differad", "emit", "dapo", "easyr1")
    assert set(registry.RULE_ALIASES.values()) == set(registry.GROUP_RULES)
    r = torch.tensor([0.2, 0.2, 0.2, 0.2, 1.0, 1.0, 1.0, 1.0])
    assert registry.rule("differad")(r, 4).tolist() == [True, False]
    assert registry.rule("dapo")(r, 4).tolist() == [True, True]
