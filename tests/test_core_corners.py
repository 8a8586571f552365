"""Corner cases: each reproduced, each fixed (values checked against tests/oracle.py)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from differad_rl.boxes import MAX_COORD, DCLRConfig, consistency_score, dclr
from differad_rl.coords import box_to_model_grid, from_model_space, to_model_grid, to_model_space
from differad_rl.groups import (
    degenerate_groups,
    degenerate_groups_by_id,
    degenerate_samples_by_id,
    difficulty_weights,
    difficulty_weights_by_id,
    group_advantages,
    group_advantages_by_id,
)
from differad_rl.parsing import answer_boxes, parse_box, parse_boxes_batch
from differad_rl.resampling import resample_groups
from differad_rl.rewards import (
    SCALAR_MAX_BATCH,
    LocalizationReward,
    check_gt_boxes,
    dclr_reward,
    format_reward,
    get_dclr_reward,
    get_format_reward,
    get_multi_box_reward,
    iou_reward,
    localization_scores,
    multi_box_reward,
    multi_box_score,
    score_box,
)
from tests import oracle

SMALL, LARGE = 3, SCALAR_MAX_BATCH + 5  # the scalar path and the vectorised path


def answer(box):
    return f"<think>r</think><answer>({box[0]},{box[1]}),({box[2]},{box[3]})</answer>"


def both_paths(reward, texts, sol, **kw):
    """The reward at a small batch (scalar path) and inside a large one (vectorised path)."""
    small = reward(texts, sol, **kw)
    reps = -(-LARGE // len(texts))
    big = reward(texts * reps, sol * reps, **{k: v * reps for k, v in kw.items()})[: len(texts)]
    return small, big


# 1. finite huge coordinates ------------------------------------------------------------------------

@pytest.mark.parametrize("huge", ["1e307", "-1e307", "1.7e308", "1000001", "9e15"])
def test_huge_finite_prediction_scores_zero_never_nan(huge):
    texts = [f"<think>r</think><answer>(10,10),({huge},20)</answer>",
             f"<think>r</think><answer>({'-' + huge.lstrip('-')},10),(20,20)</answer>"]
    sol = [[10, 10, 20, 20], [10, 10, 20, 20]]
    for f in (dclr_reward, iou_reward):
        small, big = both_paths(f, texts, sol)
        assert small == [0.0, 0.0] and big == [0.0, 0.0]
    assert multi_box_reward(texts, [[s] for s in sol]) == [0.0, 0.0]  # the matcher no longer raises
    assert multi_box_score([(1e307, 1e307, 1.7e308, 1.7e308), (10, 10, 20, 20)], [[10, 10, 20, 20]]) == 0.5


def test_boxes_at_the_bound_still_score():
    g = (0.0, 0.0, MAX_COORD, MAX_COORD)
    t = [answer((0, 0, int(MAX_COORD), int(MAX_COORD)))]
    assert dclr_reward(t, [list(g)]) == [1.0]


def test_huge_ground_truth_is_a_user_mistake():
    with pytest.raises(ValueError, match=r"solution\[0\].*sane bound"):
        dclr_reward(["x"], [[0, 0, 1e307, 1e307]])
    with pytest.raises(ValueError, match="sane bound"):
        check_gt_boxes([[0, 0, 2e6, 10]])


# 2. several boxes on a normal target ----------------------------------------------------------------

@pytest.mark.parametrize(
    "inner,expected",
    [("", 1.0), ("  ", 1.0), ("(0,0),(0,0)", 1.0), ("(0,0),(0,0) (0,0),(0,0)", 1.0),
     ("there is no anomaly", 0.0), ("12,30,200,180", 0.0), ("[1, 2, 3, 4, 5]", 0.0),
     ("(1,2),(30,40)", 0.0)],
)
def test_multi_box_normal_target_is_one_only_for_empty_or_zero(inner, expected):
    text = f"<think>r</think><answer>{inner}</answer>"
    assert multi_box_reward([text], [[]]) == [expected]
    assert multi_box_reward([text], [[[0, 0, 0, 0]]]) == [expected]


def test_answer_boxes_distinguishes_empty_from_unparsable():
    assert answer_boxes("<answer> </answer>") == []
    assert answer_boxes("<answer>prose</answer>") is None
    assert answer_boxes("no answer") is None
    assert answer_boxes("<answer>(1,2),(3,4)</answer>") == [(1, 2, 3, 4)]


# 3. ground truth on the model's integer grid --------------------------------------------------------

@settings(max_examples=150, deadline=None)
@given(
    space=st.sampled_from(["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]),
    w=st.integers(64, 5000), h=st.integers(64, 5000),
    box=st.tuples(st.floats(0, 0.98), st.floats(0, 0.98), st.floats(1e-4, 1), st.floats(1e-4, 1)),
)
def test_best_writable_answer_scores_exactly_one(space, w, h, box):
    x1, y1 = box[0] * w, box[1] * h
    g = [x1, y1, x1 + max(box[2] * (w - x1), 0.5), y1 + max(box[3] * (h - y1), 0.5)]
    best = box_to_model_grid(tuple(g), w, h, space)
    assert all(float(v).is_integer() for v in best) and best[2] > best[0] and best[3] > best[1]
    np.testing.assert_array_equal(to_model_grid(np.array([g]), w, h, space)[0], best)
    text = [answer(tuple(int(v) for v in best))]
    for kind in ("dclr", "iou", "consistency"):
        r = LocalizationReward(kind, space=space, gt_space="pixel")
        small, big = both_paths(r, text, [g], image_size=[[w, h]])
        assert small == [1.0] and big == [1.0]


def test_small_box_in_large_image_is_solved_exactly():
    """The issue's case: a small box in a large image scored 0.9923 for the best answer."""
    w, h, g = 4000, 3000, [1001.0, 1001.0, 1013.0, 1009.0]
    best = box_to_model_grid(tuple(g), w, h, "qwen2_vl")
    r = get_dclr_reward(space="qwen2_vl", gt_space="pixel")
    assert r([answer(tuple(int(v) for v in best))], [g], image_size=[[w, h]]) == [1.0]
    # a box thinner than one grid cell keeps one cell (it would round to zero width)
    assert box_to_model_grid((1000.0, 1000.0, 1001.0, 1001.0), w, h, "qwen2_vl") == (250.0, 333.0, 251.0, 334.0)


# 4. identical boxes give exactly 1 ------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(box=st.tuples(st.floats(-1e5, 1e5), st.floats(-1e5, 1e5), st.floats(1e-3, 1e5), st.floats(1e-3, 1e5)),
       norm=st.sampled_from(["paper", "enclosing"]), size=st.sampled_from(["area", "sides"]),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_identical_boxes_score_exactly_one(box, norm, size, dtype):
    b = (box[0], box[1], box[0] + box[2], box[1] + box[3])
    t = torch.tensor([b], dtype=dtype)
    assume(bool(t[0, 2] > t[0, 0]) and bool(t[0, 3] > t[0, 1]))  # float32 may round a side away
    assert float(consistency_score(t, t, DCLRConfig(center_norm=norm, size_term=size))[0]) == 1.0
    assert float(dclr(t, t, DCLRConfig(center_norm=norm, size_term=size))[0]) == 1.0
    if dtype == torch.float64:
        assert score_box(b, b, "dclr", DCLRConfig(center_norm=norm, size_term=size)) == 1.0
        assert score_box(b, b, "consistency") == 1.0


def test_identical_float_boxes_issue_example():
    b = torch.tensor([[0.1, 0.2, 0.7, 0.9]], dtype=torch.float64)
    assert float(consistency_score(b, b)[0]) == 1.0


# 5. resampling keeps fractional rewards --------------------------------------------------------------

def test_resample_groups_upcasts_integer_rewards():
    loc = torch.zeros(4, dtype=torch.int64)  # two degenerate groups of 2
    out, stats = resample_groups(loc, 2, lambda idx, r: torch.full((idx.numel() * 2,), 0.25), 1)
    assert out.dtype == torch.float64 and out.tolist() == [0.25] * 4 and stats.rounds_used == 1
    out, _ = resample_groups([0, 0, 0, 0], np.int64(2), lambda idx, r: [0.5, 0.75] * idx.numel(), np.int32(1))
    assert out.tolist() == [0.5, 0.75, 0.5, 0.75]


# 6. sparse group ids ----------------------------------------------------------------------------------

def test_by_id_functions_compact_sparse_ids():
    rng = np.random.default_rng(0)
    r = torch.tensor(rng.random(64))
    dense = torch.arange(64) // 8
    for sparse in (dense * (2**40 // 8) + 12345, dense * 10**7, torch.tensor(rng.permutation(8) * 999_983)[dense]):
        torch.testing.assert_close(group_advantages_by_id(r, sparse), group_advantages_by_id(r, dense))
        torch.testing.assert_close(difficulty_weights_by_id(r, sparse), difficulty_weights_by_id(r, dense))
    flat = torch.tensor([0.2] * 8 + [0.1, 0.9] * 4)
    ids = torch.tensor([7 * 2**40] * 8 + [3] * 8)
    assert degenerate_samples_by_id(flat, ids).tolist() == [True] * 8 + [False] * 8
    with pytest.raises(ValueError, match="degenerate_samples_by_id"):
        degenerate_groups_by_id(flat, ids)
    got = degenerate_groups_by_id(flat, torch.tensor([5] * 8 + [1] * 8))
    assert got.tolist() == [False, False, False, False, False, True]


# 7. one format rule in training, lenient evaluation ----------------------------------------------

@pytest.mark.parametrize(
    "inner", ["1 2 30 40", "[1, 2, 30, 40]", "<box>1 2 30 40</box>", "(1,2,30,40)", "[[1,2,30,40]]"]
)
def test_training_rewards_and_format_reward_agree(inner):
    text = f"<think>r</think><answer>{inner}</answer>"
    sol = [[1, 2, 30, 40]]
    assert dclr_reward([text], sol) == [0.0] and format_reward([text]) == [0.0]
    # evaluation stays lenient: the box is read
    assert parse_box(text) == (1.0, 2.0, 30.0, 40.0)


@pytest.mark.parametrize(
    "prompt_family,inner",
    [("reasoning", "(1,2),(30,40)"), ("qwen", "<|box_start|>(1,2),(30,40)<|box_end|>"),
     ("mantis", "[1, 2, 30, 40]"), ("internvl", "<box>[[1, 2, 30, 40]]</box>"),
     ("minicpm", "<box>1 2 30 40</box>"), ("cogvlm", "[[1,2,30,40]]"), (None, "1 2 30 40")],
)
def test_each_family_accepts_its_own_format(prompt_family, inner):
    text = f"<think>r</think><answer>{inner}</answer>"
    r = get_dclr_reward(prompt_family=prompt_family)
    small, big = both_paths(r, [text], [[1, 2, 30, 40]])
    assert small == [1.0] and big == [1.0]
    if prompt_family is not None:
        assert get_format_reward(prompt_family=prompt_family)([text]) == [1.0]
    for other in ("reasoning", "mantis", "minicpm"):
        if prompt_family not in (None, other) and not (prompt_family == "qwen" and other == "reasoning") and not (
                prompt_family in ("internvl", "cogvlm") and other == "mantis"):
            assert get_dclr_reward(prompt_family=other)([text], [[1, 2, 30, 40]]) == [0.0]
            assert get_format_reward(prompt_family=other)([text]) == [0.0]
    with pytest.raises(ValueError, match="prompt_family='llava'"):
        get_dclr_reward(prompt_family="llava")


def test_every_training_reward_is_positive_only_with_format_compatible_answers():
    rng = random.Random(0)
    forms = ["({0},{1}),({2},{3})", "[{0}, {1}, {2}, {3}]", "{0} {1} {2} {3}", "<box>{0} {1} {2} {3}</box>"]
    texts = [f"<think>r</think><answer>{rng.choice(forms).format(1, 2, 30, 40)}</answer>" for _ in range(200)]
    d = dclr_reward(texts, [[1, 2, 30, 40]] * 200)
    f = format_reward(texts)
    assert all((a > 0) == (b > 0) for a, b in zip(d, f))


# 8. exact .5 ties in the 0..1000 spaces ------------------------------------------------------------

def test_relative_ties_follow_round_x_over_w_times_1000():
    ties = []
    for w in range(3, 4000, 7):
        for x in range(0, w, max(1, w // 50)):
            a = x / w * 1000
            if a != x * (1000 / w) and a % 1 == 0.5 and a < 990:
                ties.append((x, w))
    assert ties, "the search found no tie that the two orders of operation round differently"
    for x, w in ties:
        want = round(x / w * 1000)
        got = to_model_space(np.array([[x, x, x + 1, x + 1]], dtype=np.float64), w, w, "qwen2_vl")[0, 0]
        assert got == want == oracle.to_relative((x, x, x, x), w, w)[0]
        assert box_to_model_grid((float(x), 0.0, float(w), 1.0), w, w, "qwen2_vl")[0] == want
        t = to_model_space(torch.tensor([[x, x, x + 1, x + 1]], dtype=torch.float64), w, w, "qwen3_vl")
        assert float(t[0, 0]) == want


def test_from_model_space_round_trip():
    b = np.array([[12.0, 30.0, 200.0, 180.0]])
    for space in ("qwen2_vl", "qwen2_5_vl"):
        back = from_model_space(to_model_space(b, 640, 480, space, round=False), 640, 480, space)
        np.testing.assert_allclose(back, b, rtol=1e-12)


# 9. dtypes of Python lists, numpy integer group sizes -------------------------------------------

def test_python_float_lists_are_float64_and_numpy_sizes_work():
    floats = [0.1, 0.2, 0.3, 0.4]
    assert group_advantages(floats, 2).dtype == torch.float64
    assert difficulty_weights(floats, np.int64(2)).dtype == torch.float64
    assert degenerate_groups(floats, np.int32(2)).tolist() == [False, False]
    want = torch.tensor(oracle.group_advantages(floats, 2), dtype=torch.float64)
    torch.testing.assert_close(group_advantages(floats, np.int64(2)), want, rtol=0, atol=1e-9)
    assert group_advantages(np.array(floats, dtype=np.float32), 2).dtype == torch.float32
    assert group_advantages_by_id(floats, [0, 0, 1, 1]).dtype == torch.float64
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(floats, np.float64(2.0))


# 12. non-reasoning mode never reads the reasoning -------------------------------------------------

@pytest.mark.parametrize(
    "text,expected",
    [("<think>at (1,2),(3,4)</think><answer>(5,6),(7,8)", (5, 6, 7, 8)),
     ("<think>at (1,2),(3,4)</think><answer>", None),
     ("<think>at (1,2),(3,4)</think> then (5,6),(7,8)", (5, 6, 7, 8)),
     ("<think>at (1,2),(3,4) and I was cut off", None),
     ("(5,6),(7,8) <think>at (1,2),(3,4)", (5, 6, 7, 8)),
     ("plain (5,6),(7,8)", (5, 6, 7, 8))],
)
def test_lenient_mode_never_reads_the_reasoning(text, expected):
    want = None if expected is None else tuple(map(float, expected))
    assert parse_box(text, require_answer=False) == want
    arr, valid = parse_boxes_batch([text], require_answer=False)
    assert bool(valid[0]) == (want is not None) and (want is None or tuple(arr[0]) == want)


# property tests over both paths ----------------------------------------------------------------------

huge = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-10**320, 10**320).map(str))
token = st.one_of(huge.map(str), st.sampled_from(["(", ")", ",", "[", "]", " ", "<answer>", "</answer>",
                                                  "<think>", "</think>", "0", "-", "."]))


@settings(max_examples=200, deadline=None)
@given(parts=st.lists(st.lists(token, max_size=14).map("".join), min_size=1, max_size=4), data=st.data())
def test_rewards_in_unit_interval_never_raise_equal_oracle(parts, data):
    gt_box = st.one_of(st.just((0.0, 0.0, 0.0, 0.0)),
                       st.tuples(st.floats(-1e5, 1e5), st.floats(-1e5, 1e5), st.floats(1e-3, 1e5),
                                 st.floats(1e-3, 1e5)).map(lambda t: (t[0], t[1], t[0] + t[2], t[1] + t[3])))
    sol = [list(data.draw(gt_box)) for _ in parts]
    sol = [g if (g[2] > g[0] and g[3] > g[1]) or not any(g) else [0.0] * 4 for g in sol]
    texts = [f"<think>r</think><answer>{p}</answer>" if i % 2 else p for i, p in enumerate(parts)]
    for f in (dclr_reward, iou_reward):
        small, big = both_paths(f, texts, sol)
        for v in small + big:
            assert 0.0 <= v <= 1.0 and not math.isnan(v)
        np.testing.assert_allclose(small, big, rtol=0, atol=1e-9)
        kind = "dclr" if f is dclr_reward else "iou"
        for t, g, v in zip(texts, sol, small):
            p = parse_box(t, fmt="qwen")
            p = p if p is None or max(abs(c) for c in p) <= MAX_COORD else None
            assert v == pytest.approx(oracle.localization(p, tuple(g), kind), abs=1e-9)
    for v in multi_box_reward(texts, [[g] for g in sol]) + format_reward(texts):
        assert 0.0 <= v <= 1.0


def test_scalar_and_vectorised_paths_agree_with_the_oracle():
    rng = random.Random(5)
    texts, sol = [], []
    for i in range(600):
        g = (0.0,) * 4 if i % 9 == 0 else tuple(float(rng.randint(0, 400)) for _ in range(2))
        if any(g):
            g = g + (g[0] + rng.randint(1, 300), g[1] + rng.randint(1, 300))
        p = [rng.randint(-10, 800) for _ in range(4)] if i % 5 else [0, 0, 0, 0]
        texts.append(f"<think>r</think><answer>({p[0]}, {p[1]}),({p[2]},{p[3]})</answer>")
        sol.append(list(g))
    for cfg in ({}, {"center_norm": "enclosing"}, {"size_term": "sides"}, {"w_center": 0.3, "w_area": 0.9}):
        r = get_dclr_reward(**cfg)
        vec = r.scores(texts, sol).tolist()
        scal = [v for k in range(0, 600, 50) for v in r(texts[k:k + 50], sol[k:k + 50])]
        want = [oracle.localization(parse_box(t), tuple(g), **cfg) for t, g in zip(texts, sol)]
        np.testing.assert_allclose(vec, want, rtol=0, atol=1e-9)
        np.testing.assert_allclose(scal, want, rtol=0, atol=1e-9)
    torch.testing.assert_close(localization_scores(*map(torch.from_numpy, parse_boxes_batch(texts)), sol),
                               get_dclr_reward(prompt_family=None).scores(texts, sol))
