"""Every box reward reads answers by one rule: the prompt family's format, the MAX_COORD bound, the
zero-box and degenerate rules (docs/method.md §3). Each reward — the method's, the peers', and the
veRL reward functions — scores the same adversarial texts; they must agree on which are readable."""

from __future__ import annotations

import pytest

from differad_rl import registry
from differad_rl.integrations.verl import peers as verl_peers
from differad_rl.integrations.verl import reward as verl_reward

GT = [10.0, 10.0, 20.0, 20.0]
ZERO = [0.0, 0.0, 0.0, 0.0]

# (text, ground truth, readable): where a readable box is written it equals the ground truth, so a
# readable answer scores > 0 under every reward and an unreadable or invalid one scores 0.
CASES: list[tuple[object, list[float], bool]] = [
    ("<answer>(10,10),(20,20)</answer>", GT, True),
    ("<think>look</think><answer>(10,10),(20,20)</answer>", GT, True),
    ("<answer> ( 10 , 10 ) , ( 20 , 20 ) </answer>", GT, True),
    ("<answer>(10.0,10.0),(20.0,20.0)</answer>", GT, True),
    ("<answer><|box_start|>(10,10),(20,20)<|box_end|></answer>", GT, True),
    ([{"role": "assistant", "content": "<answer>(10,10),(20,20)</answer>"}], GT, True),
    ("<answer>(10,10),(20,20) and (10,10),(20,20)</answer>", GT, True),
    # the bug this file guards: another prompt family's format never earns a box reward
    ("<answer>[10, 10, 20, 20]</answer>", GT, False),
    ("<answer>[[10,10,20,20]]</answer>", GT, False),
    ("<answer><box>10 10 20 20</box></answer>", GT, False),
    ('<answer>{"bbox_2d": [10, 10, 20, 20]}</answer>', GT, False),
    ("<answer>(10,10,20,20)</answer>", GT, False),
    # no complete answer span
    ("(10,10),(20,20)", GT, False),
    ("<answer>(10,10),(20,20)", GT, False),
    ("", GT, False),
    (None, GT, False),
    # beyond the sane bound (a box enclosing the ground truth: its overlap rewards would be > 0)
    ("<answer>(-2000000,-2000000),(2000000,2000000)</answer>", GT, False),
    ("<answer>(10,10),(20,20000000)</answer>", GT, False),
    ("<answer>(10,10),(1e400,20)</answer>", GT, False),
    # zero, degenerate, not numbers
    ("<answer>(0,0),(0,0)</answer>", GT, False),
    ("<answer>(20,20),(10,10)</answer>", GT, False),
    ("<answer>(10,10),(10,20)</answer>", GT, False),
    ("<answer>(nan,10),(20,20)</answer>", GT, False),
    # normal target: the zero box in the prompt family's format, and nothing else
    ("<answer>(0,0),(0,0)</answer>", ZERO, True),
    ("<answer>[0, 0, 0, 0]</answer>", ZERO, False),
    ("<answer>(10,10),(20,20)</answer>", ZERO, False),
    ("no answer", ZERO, False),
]
# Not here, by design: an empty answer on a normal target scores 1 under the several-box rewards
# ("no box" is their normal answer) and 0 under the single-box ones (no box read).


def _trl_scores(name: str) -> list[float]:
    reward = registry.build_reward(name)
    multi = registry.reward_entry(name).multi_box
    solution = [([] if gt == ZERO else [gt]) if multi else gt for _, gt, _ in CASES]
    return reward([text for text, _, _ in CASES], solution=solution)


def _verl_scores(name: str) -> list[float]:
    out = []
    for text, gt, _ in CASES:
        if isinstance(text, list):
            text = text[-1]["content"]
        if name in ("dclr", "multi_box"):
            res = verl_reward.compute_score("d", text, gt, None, multi_box=name == "multi_box")
        else:
            res = verl_peers.compute_score("d", text, gt, None, box_reward=name)
        out.append(res["localization"])
    return out


BOX_REWARDS = [n for n in registry.reward_names() if registry.reward_entry(n).box]
VERL_REWARDS = ["dclr", "multi_box", *verl_peers.PEER_BOX_REWARDS]


def test_every_box_reward_is_registered_and_covered() -> None:
    assert {"dclr", "iou", "consistency", "multi_box", "giou", "matched_hits"} <= set(BOX_REWARDS)
    assert set(VERL_REWARDS) <= set(BOX_REWARDS)


@pytest.mark.parametrize("name", BOX_REWARDS)
def test_trl_shaped_rewards_agree_on_readable_answers(name: str) -> None:
    scores = _trl_scores(name)
    got = [s > 0 for s in scores]
    want = [readable for _, _, readable in CASES]
    bad = [(CASES[i][0], scores[i]) for i in range(len(CASES)) if got[i] != want[i]]
    assert not bad, f"{name}: disagrees on {bad}"
    assert all(0.0 <= s <= 1.0 for s in scores)


@pytest.mark.parametrize("name", VERL_REWARDS)
def test_verl_rewards_agree_on_readable_answers(name: str) -> None:
    scores = _verl_scores(name)
    got = [s > 0 for s in scores]
    want = [readable for _, _, readable in CASES]
    bad = [(CASES[i][0], scores[i]) for i in range(len(CASES)) if got[i] != want[i]]
    assert not bad, f"veRL {name}: disagrees on {bad}"


@pytest.mark.parametrize("name", BOX_REWARDS)
def test_every_box_reward_takes_the_family(name: str) -> None:
    """``prompt_family=`` selects the format for every box reward (it raised TypeError for the peers')."""
    multi = registry.reward_entry(name).multi_box
    text = ["<answer>[10, 10, 20, 20]</answer>"]
    solution = [[GT]] if multi else [GT]
    assert registry.build_reward(name, prompt_family="mantis")(text, solution=solution) == [1.0]
    assert registry.build_reward(name, prompt_family="reasoning")(text, solution=solution) == [0.0]
    assert registry.build_reward(name, prompt_family=None)(text, solution=solution) == [1.0]


def test_giou_reward_reads_only_the_family_format() -> None:
    """The original report: GIoU scored a bracket answer 1.0 where DCLR and IoU score 0."""
    from differad_rl.box_rewards import get_giou_reward
    from differad_rl.rewards import dclr_reward, iou_reward

    text = ["<answer>[10, 10, 20, 20]</answer>"]
    for reward in (get_giou_reward(), dclr_reward, iou_reward):
        assert reward(text, solution=[GT]) == [0.0]
    assert get_giou_reward(prompt_family="mantis")(text, solution=[GT]) == [1.0]
