"""Core speed, side by side with the peers (see conftest.py for the ratio report).

* **the call shapes the frameworks use** — TRL calls a reward once per device batch (8–64
  completions), veRL's reward loop calls ``compute_score`` once per sample: ``dclr_reward`` and
  ``iou_reward`` per completion at batch 1, 8, 64, 512 and 65,536, and ``compute_score`` per call,
  each beside a plain scalar reference of the same work in the same run (the package's parser and
  the pure-Python oracle, one completion at a time): never slower (ratio ≥ 1) at any size;

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

from differad_rl.coords import box_to_model_grid
from differad_rl.groups import difficulty_weights, group_advantages
from differad_rl.integrations.verl.reward import compute_score
from differad_rl.parsing import _BOX_RE, is_well_formatted, parse_box, parse_boxes_batch
from differad_rl.rewards import dclr_reward, iou_reward, localization_scores
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


def test_dclr_reward_vs_strict_regex_pass(benchmark, texts):
    """The issue's bound: at 65,536 within 2x one compiled-regex pass — the cheapest one, a strict
    Qwen-only pattern anchored on ``<answer>`` searched once over each text."""
    t, s = texts
    benchmark.extra_info.update(peer="test_strict_qwen_regex", target="within 2x of one strict regex pass "
                                "(ratio >= 0.5)", ratio_min=0.5)
    benchmark.pedantic(lambda: dclr_reward(t, s), rounds=9, iterations=1)


# --- the call shapes: per completion at TRL's batch sizes, veRL's per-sample compute_score ---------

BATCHES = (1, 8, 64, 512, 65_536)
PER_ROUND = 4096  # completions per round at the small batch sizes (rounds are comparable per completion)


def _batches(texts, n):
    t, s = texts
    if n >= N_TEXTS:
        return [(t, s)]
    return [(t[i : i + n], s[i : i + n]) for i in range(0, PER_ROUND, n)]


def _reference(kind):
    """A plain scalar implementation: per completion the package's parser (the Qwen format the
    prompt asks for) and the pure-Python oracle formula."""

    def run(chunks):
        return [[oracle.localization(parse_box(x, fmt="qwen"), tuple(map(float, g)), kind) for x, g in zip(t, s)]
                for t, s in chunks]

    return run


@pytest.mark.parametrize("kind", ["dclr", "iou"])
@pytest.mark.parametrize("n", BATCHES)
def test_scalar_reference_batch(benchmark, texts, n, kind):
    chunks = _batches(texts, n)
    benchmark.pedantic(_reference(kind), args=(chunks,), rounds=3 if n >= N_TEXTS else 9, iterations=1)


@pytest.mark.parametrize("kind", ["dclr", "iou"])
@pytest.mark.parametrize("n", BATCHES)
def test_reward_batch_vs_scalar_reference(benchmark, texts, n, kind):
    chunks = _batches(texts, n)
    fn = dclr_reward if kind == "dclr" else iou_reward
    benchmark.extra_info.update(peer=f"test_scalar_reference_batch[{n}-{kind}]", target="never slower (ratio >= 1)",
                                ratio_min=1.0)
    out = benchmark.pedantic(lambda: [fn(t, s) for t, s in chunks], rounds=9, iterations=1)
    ref = _reference(kind)(chunks[:1] if n >= 512 else chunks[:8])
    np.testing.assert_allclose(np.concatenate(out[: len(ref)])[:2000], np.concatenate(ref)[:2000], rtol=0, atol=1e-9)


N_CALLS = 4096
SIZES = [(640, 480), (1024, 768), (800, 800), (1920, 1080)]


@pytest.fixture(scope="module")
def verl_calls(texts):
    """veRL's per-sample calls: ground truth in original pixels, extra_info with the model's space."""
    rng = random.Random(1)
    t, s = texts
    calls = []
    for i in range(N_CALLS):
        w, h = SIZES[i % len(SIZES)]
        g = [min(v, w - 1 if j % 2 == 0 else h - 1) for j, v in enumerate(s[i])]
        g = [g[0], g[1], max(g[2], g[0] + 1), max(g[3], g[1] + 1)] if rng.random() > 0.2 else []
        calls.append((t[i], [g] if g else [], {"space": "qwen2_vl", "width": w, "height": h, "index": i}))
    return calls


def _scalar_compute_score(text, gt, info):
    """The same work as compute_score, plainly: format check, parse, ground truth to the model's
    grid, the oracle's DCLR and IoU."""
    fmt = 1.0 if is_well_formatted(text) else 0.0
    box = parse_box(text, fmt="qwen")
    g = box_to_model_grid(tuple(map(float, gt[0])), info["width"], info["height"], info["space"]) if gt else oracle.ZERO
    loc = oracle.localization(box, g)
    iou = oracle.localization(parse_box(text), g, "iou")
    return {"score": loc + fmt, "localization": loc, "format": fmt, "iou": iou}


def test_scalar_compute_score(benchmark, verl_calls):
    out = benchmark.pedantic(lambda: [_scalar_compute_score(*c) for c in verl_calls], rounds=9, iterations=1)
    assert len(out) == N_CALLS


def test_compute_score_vs_scalar(benchmark, verl_calls):
    benchmark.extra_info.update(peer="test_scalar_compute_score", target="never slower (ratio >= 1)", ratio_min=1.0)
    out = benchmark.pedantic(lambda: [compute_score("differad", *c) for c in verl_calls], rounds=9, iterations=1)
    ref = [_scalar_compute_score(*c) for c in verl_calls]
    for key in ("localization", "iou", "format", "score"):
        np.testing.assert_allclose([o[key] for o in out], [r[key] for r in ref], rtol=0, atol=1e-9)


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
