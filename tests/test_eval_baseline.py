"""The classic baseline: alignment, difference map, calibrated boxes, and the baseline command."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from differad_rl.data.records import PairRecord, write_pairs
from differad_rl.eval import cli as eval_cli
from differad_rl.eval.baseline import (
    BaselineConfig,
    baseline_splits,
    difference_map,
    phase_shift,
    run_baseline,
)
from differad_rl.eval.protocol import evaluate

SIZE = 64


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.random((size, size, 3)), sigma=(1.5, 1.5, 0))
    noise -= noise.min()
    return noise / noise.max()


def _pair(rng: np.random.Generator, anomalous: bool) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    big = _texture(rng, SIZE + 16)
    dy, dx = rng.integers(-3, 4, size=2)
    ref = big[8 : 8 + SIZE, 8 : 8 + SIZE]
    tgt = big[8 + dy : 8 + dy + SIZE, 8 + dx : 8 + dx + SIZE] * 0.9 + 0.05  # shift + contrast/brightness
    boxes: list[list[int]] = []
    if anomalous:
        w, h = rng.integers(6, 16, size=2)
        x, y = rng.integers(8, SIZE - 24, size=2)
        tgt = tgt.copy()
        tgt[y : y + h, x : x + w] = [1.0, 0.1, 0.1]
        boxes = [[int(x), int(y), int(x + w), int(y + h)]]
    return ref, tgt, boxes


@pytest.fixture(scope="module")
def pair_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(7)
    recs = []
    for i in range(16):
        ref, tgt, boxes = _pair(rng, anomalous=i % 4 != 0)
        for name, img in (("ref", ref), ("tgt", tgt)):
            Image.fromarray((img * 255).astype(np.uint8)).save(root / f"{i}_{name}.png")
        recs.append(
            PairRecord(
                id=f"tex/{'good' if not boxes else 'patch'}/{i:03d}",
                reference=str(root / f"{i}_ref.png"),
                target=str(root / f"{i}_tgt.png"),
                boxes=boxes,
                width=SIZE,
                height=SIZE,
                category="tex" if i % 2 else "tex2",
                split="test" if i >= 8 else "train",
            )
        )
    path = root / "pairs.jsonl"
    write_pairs(recs, path)
    return path


def test_phase_shift_recovers_integer_shift():
    rng = np.random.default_rng(0)
    big = _texture(rng, 80)
    ref = big[8:72, 8:72]
    tgt = big[5:69, 10:74]  # target(y, x) = ref(y - 3, x + 2)
    assert phase_shift(tgt, ref, max_shift=8) == (3, -2)
    assert phase_shift(tgt, ref, max_shift=0) == (0, 0)


def test_difference_map_peaks_on_the_defect():
    rng = np.random.default_rng(1)
    ref, tgt, boxes = _pair(rng, anomalous=True)
    m = difference_map(tgt, ref, BaselineConfig(work_size=0))
    x1, y1, x2, y2 = boxes[0]
    inside = m[y1:y2, x1:x2].mean()
    outside = np.delete(m.reshape(-1), np.ravel_multi_index(np.mgrid[y1:y2, x1:x2].reshape(2, -1), m.shape)).mean()
    assert inside > 5 * outside
    with pytest.raises(ValueError, match="shapes differ"):
        difference_map(tgt, ref[:-1], BaselineConfig())


def test_run_baseline_finds_the_defects(pair_set):
    from differad_rl.data.records import load_pairs
    from differad_rl.eval.metrics import localization_metrics

    recs = load_pairs(pair_set)
    evaluated, calib = baseline_splits(recs, "test", "train", 0.5, seed=0)
    assert [r.split for r in evaluated] == ["test"] * 8 and len(calib) == 4
    assert all(r.split == "train" for r in calib)
    res = run_baseline(evaluated, calib, BaselineConfig(workers=1))
    m = localization_metrics(res.boxes, None, [r.boxes for r in evaluated])
    assert m["anomalous"]["miou"] > 0.7
    assert m["overall"]["acc"] >= 0.75
    again = run_baseline(evaluated, calib, BaselineConfig(workers=2))
    np.testing.assert_array_equal(res.boxes, again.boxes)  # thread count does not change results


def test_splits_fall_back_to_a_held_out_part_of_the_evaluated_set(pair_set):
    from differad_rl.data.records import load_pairs

    recs = load_pairs(pair_set)
    evaluated, calib = baseline_splits(recs, None, None, 0.25, seed=0)
    assert len(calib) == 4 and len(evaluated) == 12
    assert {r.id for r in calib}.isdisjoint(r.id for r in evaluated)


def test_unknown_split_is_an_error_listing_the_valid_ones(pair_set, tmp_path, capsys):
    from dataclasses import replace

    from differad_rl.data.records import load_pairs

    recs = load_pairs(pair_set)
    with pytest.raises(ValueError, match=r"--split 'tset': no record of pairs has it; splits present: 'test' \(\d+\), 'train'"):
        baseline_splits(recs, "tset")
    with pytest.raises(ValueError, match=r"--calib-split 'trian'.*splits present: 'test'.*'train'"):
        baseline_splits(recs, "test", "trian")
    with pytest.raises(ValueError, match="no record outside the evaluated split"):
        baseline_splits(recs, "test", "test")
    evaluated, calib = baseline_splits(recs, "all", "all", 0.25)
    assert len(evaluated) == 12 and len(calib) == 4
    # "auto": test when present, else every record; train calibration when present
    assert [r.split for r in baseline_splits(recs)[0]] == ["test"] * 8
    only_train = [replace(r, split="train") for r in recs]
    evaluated, calib = baseline_splits(only_train, "auto", "auto", 0.25)
    assert len(evaluated) == 12 and {r.id for r in calib}.isdisjoint(r.id for r in evaluated)
    parser = argparse.ArgumentParser()
    eval_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["baseline", "--pairs", str(pair_set), "--out", str(tmp_path / "o"), "--split", "tset"])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert "'tset'" in err and "splits present: 'test' (8), 'train' (8)" in err and not (tmp_path / "o").exists()


def test_config_validation():
    with pytest.raises(ValueError, match="objective"):
        BaselineConfig(objective="auc")
    with pytest.raises(ValueError, match="calibration_fraction"):
        BaselineConfig(calibration_fraction=1.0)


def test_baseline_command_writes_preds_and_report(tmp_path, pair_set, capsys):
    parser = argparse.ArgumentParser()
    eval_cli.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "bl"
    args = parser.parse_args(
        ["baseline", "--pairs", str(pair_set), "--out", str(out), "--calib-fraction", "0.5", "--objective", "miou"]
    )
    assert args.func(args) == 0
    names = {p.name for p in out.iterdir()}
    assert {"preds.jsonl", "pairs_eval.jsonl", "metrics.json", "baseline.json", "report.html", "cases.png"} <= names
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["overall"]["n"] == 8
    info = json.loads((out / "baseline.json").read_text())
    assert info["config"]["objective"] == "miou" and len(info["calibration_ids"]) == 4
    # the written predictions re-evaluate to the same numbers through the normal eval path
    again = evaluate(out / "preds.jsonl", out / "pairs_eval.jsonl", family="pixel")
    assert again.metrics["overall"]["miou"] == pytest.approx(metrics["overall"]["miou"])


@pytest.mark.slow
def test_baseline_on_demo_pairs(tmp_path):
    """End to end on the embedded demo pairs: the test split is scored, well above chance."""
    from differad_rl.data.demo import build_demo_pairs
    from differad_rl.data.records import load_pairs
    from differad_rl.eval.metrics import localization_metrics

    recs = load_pairs(build_demo_pairs(tmp_path / "demo", n_pairs=32, size=96, progress=False, workers=1))
    evaluated, calib = baseline_splits(recs, "test", "train", 0.3, seed=0)
    assert evaluated and all(r.split == "test" for r in evaluated)
    res = run_baseline(evaluated, calib, BaselineConfig(workers=1))
    m = localization_metrics(res.boxes, None, [r.boxes for r in evaluated], [r.category for r in evaluated])
    assert m["overall"]["n"] == len(evaluated)
    assert m["anomalous"]["miou"] > 0.3  # 0.0 would mean the pipeline is broken
