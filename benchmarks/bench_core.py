"""Core speed, side by side with the peers (see conftest.py for the ratio report).

* scoring 65,536 parsed completions with ``localization_scores``: ≥ 10× the scalar oracle looping
  per sample (end to end, parsing included on both sides, the ratio is reported for information:
  the per-sample side parses with the same regex, so parsing caps it);
* ``dclr_reward`` on 65,536 completions of ~250 characters: within 1.5× of a single compiled-regex
  pass over the same texts (the floor): the
  package's box regex searched once over each whole text, no answer-span logic, no number
  extraction, no scoring. A stricter, Qwen-format-only regex anchored on ``<answer>`` is timed too,
  for information (no target).

torch runs with one intra-op thread here: the peers are single-threaded Python, and on a 2-core
machine torch's second thread only adds contention at these sizes (65k boxes); on a loaded machine
it made the scoring ~8× slower.
* ``group_advantages`` + ``difficulty_weights`` on 8,192 responses (groups of 8): no slower than
  veRL's vectorised GRPO advantage, ≥ 10× veRL's per-sample loop.
"""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch

from differad_rl.groups import difficulty_weights, group_advantages
from differad_rl.parsing import _BOX_RE, parse_box, parse_boxes_batch
from differad_rl.rewards import dclr_reward, localization_scores
from tests import oracle

N_TEXTS = 65_536
THOUGHTS = [
    "The reference shows a clean surface; in the target there is a dark scratch near the upper left.",
    "Comparing both images, the texture matches except a small bright blob close to the centre.",
    "The second image has a missing piece on the right edge that the first image does not have.",
    "I see no structural change apart from a stain; its extent is moderate and roughly square.",
]


def make_texts(n: int, seed: int = 0) -> tuple[list[str], list[list[float]]]:
    rng = random.Random(seed)
    texts, sols = [], []
    for _ in range(n):
        x1, y1 = rng.randint(0, 900), rng.randint(0, 900)
        x2, y2 = x1 + rng.randint(5, 99), y1 + rng.randint(5, 99)
        thought = rng.choice(THOUGHTS) + " " + rng.choice(THOUGHTS)[: rng.randint(40, 90)]
        texts.append(f"<think>{thought}</think>\n<answer>({x1},{y1}),({x2},{y2})</answer>")
        gx, gy = x1 + rng.randint(-20, 20), y1 + rng.randint(-20, 20)
        sols.append([max(gx, 0), max(gy, 0), max(gx, 0) + rng.randint(5, 99), max(gy, 0) + rng.randint(5, 99)])
    return texts, sols


@pytest.fixture(scope="module")
def texts():
    t, s = make_texts(N_TEXTS)
    assert 200 <= np.mean([len(x) for x in t]) <= 300
    return t, s


STRICT = re.compile(r"<answer>\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*,\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*</answer>")


def test_regex_floor(benchmark, texts):
    t, _ = texts
    search = _BOX_RE.search
    out = benchmark.pedantic(lambda: [search(x) for x in t], rounds=9, iterations=1)
    assert sum(m is not None for m in out) == N_TEXTS


def test_strict_qwen_regex(benchmark, texts):
    t, _ = texts
    search = STRICT.search
    out = benchmark.pedantic(lambda: [search(x) for x in t], rounds=9, iterations=1)
    assert sum(m is not None for m in out) == N_TEXTS


def test_dclr_reward_vs_strict_regex(benchmark, texts):
    t, s = texts
    benchmark.extra_info.update(peer="test_strict_qwen_regex", target="information only")
    benchmark.pedantic(lambda: dclr_reward(t, s), rounds=9, iterations=1)


def test_scalar_oracle(benchmark, texts):
    """The per-sample loop, end to end: the package's parser per text + the scalar oracle."""
    t, s = texts

    def run():
        return [oracle.localization(parse_box(x), tuple(map(float, g))) for x, g in zip(t, s)]

    out = benchmark.pedantic(run, rounds=2, iterations=1)
    assert len(out) == N_TEXTS


def test_dclr_reward_vs_oracle(benchmark, texts):
    """End to end. Both sides parse with the same compiled regex, which is ~2/3 of the vectorised
    side's time, so this ratio is capped by parsing; the scoring ratio is the next pair."""
    t, s = texts
    benchmark.extra_info.update(peer="test_scalar_oracle", target="information (parsing shared by both sides)")
    out = benchmark.pedantic(lambda: dclr_reward(t, s), rounds=9, iterations=1)
    ref = [oracle.localization(parse_box(x), tuple(map(float, g))) for x, g in zip(t[:2000], s[:2000])]
    np.testing.assert_allclose(out[:2000], ref, atol=1e-9)


@pytest.fixture(scope="module")
def parsed(texts):
    t, s = texts
    boxes, valid = parse_boxes_batch(t)
    return boxes, valid, s


def test_scalar_oracle_scoring(benchmark, parsed):
    boxes, valid, s = parsed
    preds = [tuple(b) if v else None for b, v in zip(boxes.tolist(), valid.tolist())]
    gts = [tuple(map(float, g)) for g in s]
    out = benchmark.pedantic(lambda: [oracle.localization(p, g) for p, g in zip(preds, gts)], rounds=2, iterations=1)
    assert len(out) == N_TEXTS


def test_localization_scores_vs_oracle(benchmark, parsed):
    boxes, valid, s = parsed
    benchmark.extra_info.update(peer="test_scalar_oracle_scoring", target=">= 10x faster", ratio_min=10.0)
    b, v = torch.from_numpy(boxes), torch.from_numpy(valid)
    out = benchmark.pedantic(lambda: localization_scores(b, v, s).tolist(), rounds=9, iterations=1)
    assert len(out) == N_TEXTS


def test_dclr_reward_vs_regex_floor(benchmark, texts):
    t, s = texts
    benchmark.extra_info.update(peer="test_regex_floor", target="within 1.5x of one regex pass (ratio >= 0.667)",
                                ratio_min=1 / 1.5)
    benchmark.pedantic(lambda: dclr_reward(t, s), rounds=9, iterations=1)


# --- group algorithms vs veRL ---------------------------------------------------------------------

N_RESP, G = 8192, 8


@pytest.fixture(scope="module")
def group_batch():
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(N_RESP, generator=gen, dtype=torch.float32)
    loc = torch.rand(N_RESP, generator=gen, dtype=torch.float32)
    uids = np.array([f"uid-{i // G}" for i in range(N_RESP)], dtype=object)
    return scores, loc, uids


def _verl():
    return pytest.importorskip("verl.trainer.ppo.core_algos")


def test_verl_grpo_loop(benchmark, group_batch):
    core_algos = _verl()
    scores, _, uids = group_batch
    token = torch.zeros(N_RESP, 1)
    token[:, 0] = scores
    mask = torch.ones(N_RESP, 1)
    benchmark.pedantic(lambda: core_algos.compute_grpo_outcome_advantage(token, mask, uids), rounds=3, iterations=1)


def test_verl_grpo_vectorized(benchmark, group_batch):
    core_algos = _verl()
    scores, _, uids = group_batch
    token = torch.zeros(N_RESP, 1)
    token[:, 0] = scores
    mask = torch.ones(N_RESP, 1)
    fn = core_algos.get_adv_estimator_fn("grpo_vectorized")
    benchmark.pedantic(lambda: fn(token_level_rewards=token, response_mask=mask, index=uids), rounds=20, iterations=1)


def _ours(scores, loc):
    return group_advantages(scores, G) * difficulty_weights(loc, G)


def test_group_advantages_and_weights_vs_vectorized(benchmark, group_batch):
    scores, loc, _ = group_batch
    benchmark.extra_info.update(peer="test_verl_grpo_vectorized", target="no slower (ratio >= 1)", ratio_min=1.0)
    out = benchmark.pedantic(lambda: _ours(scores, loc), rounds=20, iterations=1)
    assert out.shape == (N_RESP,)


def test_group_advantages_and_weights_vs_loop(benchmark, group_batch):
    scores, loc, _ = group_batch
    benchmark.extra_info.update(peer="test_verl_grpo_loop", target=">= 10x faster", ratio_min=10.0)
    benchmark.pedantic(lambda: _ours(scores, loc), rounds=20, iterations=1)
