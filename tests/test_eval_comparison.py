"""Constant predictors and the side-by-side comparison of several methods on the same pairs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from differad_rl.data.records import PairRecord
from differad_rl.eval.comparison import (
    comparison_rows,
    comparison_table,
    constant_predictions,
    mean_relative_box,
    write_comparison,
)
from differad_rl.eval.protocol import EvalConfig, evaluate_records


def _rec(i: int, boxes, w: int = 100, h: int = 50, split: str = "test") -> PairRecord:
    return PairRecord(id=f"c/d/{i}", reference="r.png", target="t.png", boxes=boxes, width=w, height=h,
                      category="c", defect="good" if not boxes else "d", source="s", split=split)


TRAIN = [_rec(0, [[0, 0, 50, 25]], split="train"), _rec(1, [[50, 25, 100, 50]], split="train"),
         _rec(2, [], split="train")]
TEST = [_rec(10, [[20, 10, 70, 35]], w=200, h=100), _rec(11, []), _rec(12, [[0, 0, 10, 10]])]


def test_mean_relative_box_ignores_normals_and_divides_by_size():
    assert mean_relative_box(TRAIN).tolist() == [0.25, 0.25, 0.75, 0.75]
    with pytest.raises(ValueError, match="no anomalous pair"):
        mean_relative_box([TRAIN[2]])


def test_constant_predictions_score_as_the_protocol_says():
    pixel = EvalConfig(family="pixel")
    zero = evaluate_records(constant_predictions("zero_box", TEST), TEST, pixel)
    assert zero.ious.tolist() == [0.0, 1.0, 0.0]  # only the normal target is right
    mean = constant_predictions("mean_box", TEST, TRAIN)
    assert mean.boxes[0].tolist() == [50.0, 25.0, 150.0, 75.0]  # scaled to the 200 x 100 target
    res = evaluate_records(mean, TEST, pixel)
    assert res.ious[1] == 0.0  # a box on a normal target
    assert res.ious[0] == pytest.approx(200 / (100 * 50 + 50 * 25 - 200))  # overlap 20 x 10
    with pytest.raises(ValueError, match="kind="):
        constant_predictions("median", TEST)


def test_comparison_table_and_files(tmp_path):
    pixel = EvalConfig(family="pixel")
    results = {"zero": evaluate_records(constant_predictions("zero_box", TEST), TEST, pixel),
               "mean": evaluate_records(constant_predictions("mean_box", TEST, TRAIN), TEST, pixel)}
    rows = comparison_rows(results)
    assert [r["method"] for r in rows] == ["zero", "mean"]
    assert rows[0]["miou"] == pytest.approx(1 / 3) and rows[0]["normal_acc"] == 1.0
    table = comparison_table(results)
    assert table.splitlines()[0].startswith("| method | n | mIoU | Acc@0.3 | F1@0.3")
    assert "| zero | 3 | 0.333 |" in table
    paths = write_comparison(results, tmp_path / "cmp", title="t", links={"zero": "zero/report.html"})
    assert json.loads(paths["json"].read_text())["rows"] == json.loads(json.dumps(rows))
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    assert 'href="zero/report.html"' in paths["html"].read_text()
    other = {"zero": results["zero"], "x": evaluate_records(constant_predictions("zero_box", TEST[:2]), TEST[:2], pixel)}
    with pytest.raises(ValueError, match="other pairs"):
        comparison_rows(other)
    assert not np.isnan(rows[1]["f1"])
