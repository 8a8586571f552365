"""The evaluation protocol end to end: every family's output format, coordinate spaces, id checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from differad_rl.coords import to_model_space
from differad_rl.eval.protocol import (
    FAMILIES,
    EvalConfig,
    align_ids,
    evaluate,
    evaluate_outputs,
    read_predictions,
)

W, H = 640, 480
BOX = [64, 48, 320, 240]  # original target pixels


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _record(rid: str, boxes: list, category: str = "brick") -> dict:
    return {
        "id": rid,
        "reference": "ref.png",
        "target": "tgt.png",
        "boxes": boxes,
        "width": W,
        "height": H,
        "category": category,
        "defect": "scratch" if boxes else "good",
        "source": "test",
        "split": "test",
    }


def _model_box(space: str) -> list[int]:
    return [int(v) for v in np.asarray(to_model_space(np.array([BOX], float), W, H, space))[0]]


def _fmt(template: str, b: list[int]) -> str:
    return template.format(*b)


# (family, output template, reasoning flag); {0..3} = x1, y1, x2, y2 in the family's space.
CASES = [
    ("qwen2_vl", "The defect is at ({0},{1}),({2},{3}).", False),
    ("qwen2_5_vl", "<|object_ref_start|>defect<|object_ref_end|><|box_start|>({0},{1}),({2},{3})<|box_end|>", False),
    ("qwen3_vl", "({0}, {1}), ({2}, {3})", False),
    ("internvl", "<ref>defect</ref><box>[[{0}, {1}, {2}, {3}]]</box>", False),
    ("minicpm", "{0} {1} {2} {3}", False),
    ("minicpm", "<box>{0} {1} {2} {3}</box>", False),
    ("mantis", "The anomaly is located at [{0}, {1}, {2}, {3}].", False),
    ("mplug_owl3", "[{0}, {1}, {2}, {3}]", False),
    ("cogvlm", "There is a scratch [[{0},{1},{2},{3}]] on the surface.", False),
    ("qwen2_5_vl", "<think>the left part differs</think>\n<answer>({0},{1}),({2},{3})</answer>", True),
    ("qwen2_vl", "<think>look</think><answer> [{0}, {1}, {2}, {3}] </answer>", True),
]


@pytest.mark.parametrize(("family", "template", "reasoning"), CASES)
def test_every_family_format_end_to_end(tmp_path, family, template, reasoning):
    space = FAMILIES[family]
    b = _model_box(space)
    gt = _write_jsonl(tmp_path / "pairs.jsonl", [_record("a", [BOX]), _record("n", [], "tile")])
    zero = "<answer>(0,0),(0,0)</answer>" if reasoning else _fmt(template, [0, 0, 0, 0])
    preds = _write_jsonl(
        tmp_path / "preds.jsonl",
        [{"id": "n", "output": zero}, {"id": "a", "output": _fmt(template, b)}],
    )
    res = evaluate(preds, gt, family=family, reasoning=reasoning)
    assert res.ids == ["a", "n"]
    assert res.pred_valid.all()
    # relative grids round to 1/1000 of the side; the IoU stays close to 1
    assert res.ious[0] > 0.99 and res.ious[1] == 1.0
    np.testing.assert_allclose(res.pred_boxes[0], BOX, atol=max(W, H) / 1000)
    assert res.metrics["overall"]["acc"] == 1.0 and res.metrics["overall"]["f1"] == 1.0
    assert set(res.metrics["per_category"]) == {"brick", "tile"}


def test_reasoning_requires_answer_tag(tmp_path):
    gt = _write_jsonl(tmp_path / "pairs.jsonl", [_record("a", [BOX])])
    preds = _write_jsonl(tmp_path / "preds.jsonl", [{"id": "a", "output": "({0},{1}),({2},{3})".format(*BOX)}])
    assert evaluate(preds, gt, family="pixel").ious[0] == 1.0
    strict = evaluate(preds, gt, family="pixel", reasoning=True)
    assert strict.ious[0] == 0.0 and not strict.pred_valid[0]
    assert strict.metrics["overall"]["invalid_rate"] == 1.0


def test_answer_tag_wins_over_earlier_boxes(tmp_path):
    gt = _write_jsonl(tmp_path / "pairs.jsonl", [_record("a", [BOX])])
    text = "<think>maybe (0,0),(10,10)?</think><answer>({0},{1}),({2},{3})</answer>".format(*BOX)
    preds = _write_jsonl(tmp_path / "preds.jsonl", [{"id": "a", "output": text}])
    assert evaluate(preds, gt, family="pixel").ious[0] == 1.0


def test_space_override_and_given_boxes(tmp_path):
    gt = _write_jsonl(tmp_path / "pairs.jsonl", [_record("a", [BOX]), _record("b", [BOX]), _record("c", [])])
    rel = _model_box("qwen2_vl")
    preds = _write_jsonl(
        tmp_path / "preds.jsonl",
        [
            {"id": "a", "box": rel},
            {"id": "b", "box": None},
            {"id": "c", "output": "no anomaly"},
        ],
    )
    res = evaluate(preds, gt, family="mantis", space="qwen2_vl")
    assert res.ious[0] > 0.99 and res.ious[1] == 0 and res.ious[2] == 0
    assert res.pred_valid.tolist() == [True, False, False]
    # the same box read as pixels is wrong
    assert evaluate(preds, gt, family="mantis").ious[0] < 0.5


def test_qwen2_5_vl_uses_the_resized_grid():
    big_w, big_h = 4000, 3000  # resized by smart_resize to the pixel budget
    model = np.asarray(to_model_space(np.array([[400, 300, 2000, 1500]], float), big_w, big_h, "qwen2_5_vl"))[0]
    assert model[2] < 2000  # really resized
    text = "({0:.0f},{1:.0f}),({2:.0f},{3:.0f})".format(*model)
    metrics, ious, boxes, valid = evaluate_outputs(
        [text], [[[400, 300, 2000, 1500]]], [big_w], [big_h], config=EvalConfig(family="qwen2_5_vl")
    )
    assert ious[0] > 0.99 and metrics["overall"]["n"] == 1


def test_id_mismatch_names_ids_and_count(tmp_path):
    gt = _write_jsonl(tmp_path / "pairs.jsonl", [_record(f"g{i}", [BOX]) for i in range(3)])
    rows = [{"id": f"g{i}", "output": ""} for i in range(3)] + [{"id": f"x{i}", "output": ""} for i in range(7)]
    preds = _write_jsonl(tmp_path / "preds.jsonl", rows)
    with pytest.raises(ValueError, match=r"not in the ground truth: 'x0', 'x1', 'x2', 'x3', 'x4', … \(7 in all\)"):
        evaluate(preds, gt, family="pixel")
    preds = _write_jsonl(tmp_path / "preds.jsonl", [{"id": "g0", "output": ""}])
    with pytest.raises(ValueError, match=r"without a prediction: 'g1', 'g2' \(2 in all\)"):
        evaluate(preds, gt, family="pixel")
    res = evaluate(preds, gt, family="pixel", allow_missing=True)
    assert res.pred_valid.tolist() == [False, False, False] and res.metrics["overall"]["n"] == 3
    with pytest.raises(ValueError, match="duplicate prediction ids: 'a'"):
        align_ids(["a", "a"], ["a"])


def test_bad_prediction_lines_name_file_and_line(tmp_path):
    p = tmp_path / "preds.jsonl"
    p.write_text('{"id": "a", "output": "x"}\n{oops\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"preds.jsonl:2: invalid JSON"):
        read_predictions(p)
    p.write_text('{"id": "a"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"preds.jsonl:1: record 'a' has neither"):
        read_predictions(p)
    p.write_text('{"id": "a", "box": [1, 2, 3]}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"preds.jsonl:1: field 'box'"):
        read_predictions(p)
    with pytest.raises(FileNotFoundError):
        read_predictions(tmp_path / "missing.jsonl")


def test_config_validation():
    with pytest.raises(ValueError, match="family"):
        EvalConfig(family="gpt")
    with pytest.raises(ValueError, match="space"):
        EvalConfig(space="unit")
    with pytest.raises(ValueError, match="iou_threshold"):
        EvalConfig(iou_threshold=1.5)


def test_garbage_outputs_never_raise():
    outs = ["", "(((", "<answer></answer>", "[1, 2, inf, 4]", "nan nan nan nan", "\x00" * 50, "<box>1 2</box>"]
    metrics, ious, _, valid = evaluate_outputs(
        outs, [[[0, 0, 5, 5]]] * len(outs), 10, 10, config=EvalConfig(family="pixel")
    )
    assert (ious == 0).all() and not valid.any() and metrics["overall"]["invalid_rate"] == 1.0


def test_conversational_outputs_are_read(tmp_path):
    gt = _write_jsonl(tmp_path / "pairs.jsonl", [_record("a", [BOX])])
    msg = [{"role": "assistant", "content": "<answer>({0},{1}),({2},{3})</answer>".format(*BOX)}]
    preds = _write_jsonl(tmp_path / "preds.jsonl", [{"id": "a", "output": msg}])
    assert evaluate(preds, gt, family="pixel", reasoning=True).ious[0] == 1.0


# --------------------------------------------------------------------------------------------
# Recorded sizes (lines of `differad-rl predict`), splits
# --------------------------------------------------------------------------------------------
STOCK_MAX = 12845056  # the stock Qwen2.5-VL processor's max_pixels


def _big_record(rid: str, split: str = "test") -> dict:
    return {**_record(rid, [[100, 200, 612, 712]]), "width": 1024, "height": 1024, "split": split}


def _stock_line(rid: str, **extra) -> dict:
    """A perfect answer of a stock-budget Qwen2.5-VL on a 1024×1024 target, as predict records it."""
    from differad_rl.coords import smart_resize

    h, w = smart_resize(1024, 1024, 28, 3136, STOCK_MAX)
    b = np.asarray(to_model_space(np.array([[100, 200, 612, 712]], float), 1024, 1024, "qwen2_5_vl",
                                  min_pixels=3136, max_pixels=STOCK_MAX))[0].astype(int)
    return {"id": rid, "output": "<answer>({0},{1}),({2},{3})</answer>".format(*b), "family": "qwen2_5_vl",
            "space": "qwen2_5_vl", "model": "Qwen/Qwen2.5-VL-7B-Instruct", "image_size": [1024, 1024],
            "input_size": [w, h], "settings": {"min_pixels": 3136, "max_pixels": STOCK_MAX}, **extra}


def test_recorded_input_size_converts_qwen2_5_vl_without_guessing(tmp_path):
    gt = _write_jsonl(tmp_path / "pairs.jsonl", [_big_record("a")])
    line = _stock_line("a")
    assert line["input_size"] == [1036, 1036]  # not the 980-px grid of the default budget
    preds = _write_jsonl(tmp_path / "preds.jsonl", [line])
    res = evaluate(preds, gt)  # no --family, no budget: everything comes from the line
    assert res.ious[0] > 0.99 and res.recorded_sizes == 1 and res.config.family == "qwen2_5_vl"
    assert res.summary()["recorded_input_sizes"] == 1
    # the same text from another tool (no sizes) is read with the default budget: badly off
    bare = _write_jsonl(tmp_path / "bare.jsonl", [{"id": "a", "output": line["output"]}])
    assert evaluate(bare, gt).ious[0] < 0.95
    # the right budget given explicitly agrees with the record; a wrong one is an error
    assert evaluate(preds, gt, max_pixels=STOCK_MAX).ious[0] > 0.99
    with pytest.raises(ValueError, match="--max-pixels 1003520 disagrees with the predictions' recorded max_pixels"):
        evaluate(preds, gt, max_pixels=1003520)
    no_settings = _write_jsonl(tmp_path / "ns.jsonl", [{k: v for k, v in line.items() if k != "settings"}])
    with pytest.raises(ValueError, match=r"records input size 1036x1036 but --min-pixels 3136 / --max-pixels "
                                         r"1003520 give 980x980"):
        evaluate(no_settings, gt, max_pixels=1003520)


def test_recorded_family_and_image_size_must_agree(tmp_path):
    gt = _write_jsonl(tmp_path / "pairs.jsonl", [_big_record("a")])
    preds = _write_jsonl(tmp_path / "preds.jsonl", [_stock_line("a")])
    with pytest.raises(ValueError, match="--family qwen2_vl disagrees with the predictions' recorded family"):
        evaluate(preds, gt, family="qwen2_vl")
    with pytest.raises(ValueError, match="--space pixel disagrees"):
        evaluate(preds, gt, space="pixel")
    assert evaluate(preds, gt, family="qwen2_5_vl").ious[0] > 0.99  # agreeing is fine
    wrong = _write_jsonl(tmp_path / "w.jsonl", [_stock_line("a", image_size=[512, 512])])
    with pytest.raises(ValueError, match=r"'a' was made on a 512x512 target .* record says 1024x1024"):
        evaluate(wrong, gt)
    mixed = _write_jsonl(tmp_path / "m.jsonl", [_stock_line("a"), {**_stock_line("b"), "family": "qwen2_vl"}])
    with pytest.raises(ValueError, match="lines disagree on 'family'"):
        read_predictions(mixed)
    bad = _write_jsonl(tmp_path / "b.jsonl", [_stock_line("a", input_size=[0, 10])])
    with pytest.raises(ValueError, match=r"b.jsonl:1: field 'input_size' must be \[width, height\]"):
        read_predictions(bad)


def test_relative_families_record_sizes_but_need_no_budget(tmp_path):
    gt = _write_jsonl(tmp_path / "pairs.jsonl", [_big_record("a")])
    b = np.asarray(to_model_space(np.array([[100, 200, 612, 712]], float), 1024, 1024, "qwen3_vl"))[0].astype(int)
    line = {"id": "a", "output": "({0},{1}),({2},{3})".format(*b), "family": "qwen3_vl", "space": "qwen3_vl",
            "image_size": [1024, 1024], "input_size": [1024, 1024]}
    res = evaluate(_write_jsonl(tmp_path / "p.jsonl", [line]), gt)
    assert res.config.resolved_space == "qwen3_vl" and res.ious[0] > 0.99 and res.recorded_sizes == 0


def test_split_selects_records_and_a_missing_split_lists_the_present_ones(tmp_path):
    gt = _write_jsonl(tmp_path / "pairs.jsonl", [_big_record("a", "test"), _big_record("b", "train"),
                                                  _big_record("c", "test")])
    preds = _write_jsonl(tmp_path / "preds.jsonl", [_stock_line(i) for i in "abc"])
    res = evaluate(preds, gt, split="test")
    assert res.ids == ["a", "c"] and res.metrics["overall"]["n"] == 2
    with pytest.raises(ValueError, match=r"--split 'tset': no record of .* splits present: 'test' \(2\), 'train' \(1\)"):
        evaluate(preds, gt, split="tset")
    stray = _write_jsonl(tmp_path / "s.jsonl", [_stock_line("a"), _stock_line("zzz")])
    with pytest.raises(ValueError, match="not in the ground truth: 'zzz'"):
        evaluate(stray, gt, split="test", allow_missing=True)


def test_parse_status_and_outputs_per_sample(tmp_path):
    gt = _write_jsonl(tmp_path / "pairs.jsonl", [_record("a", [BOX]), _record("b", [BOX]), _record("c", []),
                                                  _record("d", [])])
    preds = _write_jsonl(tmp_path / "preds.jsonl", [
        {"id": "a", "output": "({0},{1}),({2},{3})".format(*BOX)},
        {"id": "b", "output": "I see nothing"},
        {"id": "c", "box": None},
    ])
    res = evaluate(preds, gt, family="pixel", allow_missing=True)
    assert res.parse_status == ["parsed", "unparsable", "given", "missing"]
    assert res.outputs == ["({0},{1}),({2},{3})".format(*BOX), "I see nothing", None, None]
