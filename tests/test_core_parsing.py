import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from differad_rl.parsing import (
    BOX_FORMATS,
    answer_span,
    completion_text,
    is_well_formatted,
    parse_box,
    parse_boxes,
    parse_boxes_batch,
    render_box,
)

coord = st.one_of(st.integers(-5000, 5000).map(float), st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False))


@settings(max_examples=400, deadline=None)
@given(box=st.tuples(coord, coord, coord, coord), fmt=st.sampled_from(BOX_FORMATS), wrap=st.booleans())
def test_parse_render_round_trip(box, fmt, wrap):
    text = render_box(box, fmt)
    if wrap:
        text = f"<think>the defect is here</think>\n<answer> {text} </answer>"
        assert is_well_formatted(text)
    assert parse_box(text, require_answer=wrap) == box
    assert parse_boxes(text, require_answer=wrap) == [box]
    arr, valid = parse_boxes_batch([text], require_answer=wrap)
    assert valid[0] and tuple(arr[0]) == box


@settings(max_examples=500, deadline=None)
@given(st.text())
def test_arbitrary_text_never_raises(text):
    for require in (True, False):
        b = parse_box(text, require_answer=require)
        assert b is None or (len(b) == 4 and all(math.isfinite(v) for v in b))
        parse_boxes(text, require_answer=require)
        parse_boxes_batch([text, text], require_answer=require)
    assert isinstance(is_well_formatted(text), bool)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="<>/answerthink()[],. 0123456789-+\n{}\"bo_xe|", max_size=80))
def test_tag_soup_never_raises_and_batch_agrees(text):
    for require in (True, False):
        single = parse_box(text, require_answer=require)
        arr, valid = parse_boxes_batch([text], require_answer=require)
        assert bool(valid[0]) == (single is not None)
        if single is not None:
            assert tuple(arr[0]) == single


@pytest.mark.parametrize(
    "text,expected",
    [
        ("<think>x</think><answer>(12,34),(56,78)</answer>", (12, 34, 56, 78)),
        ("<answer>( 12 , 34 ) , ( 56.5 , 78 )</answer>", (12, 34, 56.5, 78)),
        ("<answer>\n[12, 34, 56, 78]\n</answer>", (12, 34, 56, 78)),
        ("<answer><|box_start|>(1,2),(3,4)<|box_end|></answer>", (1, 2, 3, 4)),
        ('<answer>```json\n[{"bbox_2d": [5, 6, 7, 8], "label": "scratch"}]\n```</answer>', (5, 6, 7, 8)),
        ("<answer><box>[[1, 2, 3, 4]]</box></answer>", (1, 2, 3, 4)),
        ("<answer><box>1 2 3 4</box></answer>", (1, 2, 3, 4)),
        ("<answer>1 2 3 4</answer>", (1, 2, 3, 4)),
        ("<answer>(0,0),(0,0)</answer>", (0, 0, 0, 0)),
        ("<answer>first (1,2),(3,4) then (5,6),(7,8)</answer>", (1, 2, 3, 4)),
        ("(9,9),(9,9) <answer>(1,2),(3,4)</answer>", (1, 2, 3, 4)),
        ("<answer>(1,2),(3,4)</answer><answer>(5,6),(7,8)</answer>", (1, 2, 3, 4)),
        ("<answer>no box here</answer>", None),
        ("<answer>(1,2),(3,4)", None),
        ("(1,2),(3,4)", None),
        ("<answer>(1e999,2),(3,4)</answer>", None),
        ("<answer>the year 2023 had 4 5 6 defects</answer>", None),
    ],
)
def test_examples(text, expected):
    assert parse_box(text) == (None if expected is None else tuple(map(float, expected)))


def test_require_answer_false_searches_whole_text():
    assert parse_box("The box is (1,2),(3,4).", require_answer=False) == (1, 2, 3, 4)
    assert parse_box("[[10,20,30,40]]", require_answer=False) == (10, 20, 30, 40)
    assert parse_box("(9,9),(9,9) <answer>(1,2),(3,4)</answer>", require_answer=False) == (1, 2, 3, 4)


def test_parse_boxes_every_box():
    text = "<answer>[[1,2,3,4],[5,6,7,8]]</answer>"
    assert parse_boxes(text) == [(1, 2, 3, 4), (5, 6, 7, 8)]
    assert parse_boxes("<answer></answer>") == []
    assert answer_span("<answer></answer>") == ""
    assert answer_span("no answer") is None


def test_batch_marks_missing_rows():
    arr, valid = parse_boxes_batch(["<answer>(1,2),(3,4)</answer>", "junk", [{"role": "assistant", "content": "<answer>[5,6,7,8]</answer>"}]])
    assert valid.tolist() == [True, False, True]
    assert np.isnan(arr[1]).all() and arr[2].tolist() == [5, 6, 7, 8]


def test_completion_text_forms():
    assert completion_text("x") == "x"
    assert completion_text([{"role": "assistant", "content": "y"}]) == "y"
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]) == "ab"
    assert completion_text(None) == "" and completion_text(42) == ""


@pytest.mark.parametrize(
    "text,ok",
    [
        ("<think>r</think><answer>(1,2),(3,4)</answer>", True),
        ("  <think>r</think>\n\n<answer> (1,2),(3,4) </answer>\n", True),
        ("<think>r</think><answer><|box_start|>(1,2),(3,4)<|box_end|></answer>", True),
        ("<think>r</think><answer>(1,2),(3,4) (5,6),(7,8)</answer>", False),
        ("<think>r</think><answer>(1,2),(3,4) 5</answer>", False),
        ("<think>r</think><answer>nothing</answer>", False),
        ("<answer>(1,2),(3,4)</answer>", False),
        ("<think>r</think>text<answer>(1,2),(3,4)</answer>", False),
        ("<think>r</think><answer>(1,2),(3,4)</answer> trailing", False),
        ("<think>r<answer>(1,2),(3,4)</answer></think><answer>(1,2),(3,4)</answer>", False),
        ("<think>r</think><answer>(1,2),(3,4)</answer><answer>(1,2),(3,4)</answer>", False),
    ],
)
def test_format(text, ok):
    assert is_well_formatted(text) is ok


def test_render_rejects_bad_input():
    with pytest.raises(ValueError, match="fmt="):
        render_box((1, 2, 3, 4), "llava")
    with pytest.raises(ValueError, match="4 values"):
        render_box((1, 2, 3), "qwen")


ADVERSARIAL = [
    "<answer>(1," * 100_000,
    "<answer>" + "(1, " * 250_000 + "</answer>",
    "(" + "1" * 1_000_000,
    "[1," * 330_000,
    "<answer><box>1 " + "2 " * 500_000 + "</answer>",
    "<answer>(" + " " * 1_000_000 + "</answer>",
    "1." * 500_000,
]


@pytest.mark.parametrize("text", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_adversarial_megabyte_inputs_are_linear(text):
    """Catastrophic-backtracking guard: a quadratic parser would need hours on these 1 MB inputs;
    the bound is deliberately loose (a guard, not a speed measurement: see benchmarks/)."""
    import time

    start = time.perf_counter()
    for require in (True, False):
        parse_box(text, require_answer=require)
        parse_boxes_batch([text], require_answer=require)
    is_well_formatted(text)
    assert time.perf_counter() - start < 5.0


def test_answer_mode_megabyte_without_closing_tag_is_instant():
    import time

    text = "<answer>(1," * 100_000
    start = time.perf_counter()
    for _ in range(100):
        assert parse_box(text) is None
    assert (time.perf_counter() - start) / 100 < 0.01
