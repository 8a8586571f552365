"""Reports: metrics JSON, per-sample JSONL, PNG sheets and the self-contained HTML; the eval CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from differad_rl.eval import cli as eval_cli
from differad_rl.eval.protocol import evaluate
from differad_rl.eval.report import jsonable, select_cases, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def small_set(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    rows, preds = [], []
    for i in range(6):
        img = (rng.random((40, 50, 3)) * 255).astype(np.uint8)
        Image.fromarray(img).save(tmp_path / f"t{i}.png")
        boxes = [] if i % 3 == 0 else [[5 + i, 5, 25 + i, 30]]
        rows.append(
            {
                "id": f"cat{i % 2}/{i}",
                "reference": f"t{i}.png",
                "target": f"t{i}.png",
                "boxes": boxes,
                "width": 50,
                "height": 40,
                "category": f"cat{i % 2}",
            }
        )
        if i == 5:
            out = "I cannot tell."
        elif boxes:
            x1, y1, x2, y2 = boxes[0]
            out = f"<answer>({x1 + i},{y1}),({x2},{y2})</answer>"
        else:
            out = "<answer>(0,0),(0,0)</answer>" if i == 0 else "<answer>(1,1),(9,9)</answer>"
        preds.append({"id": rows[-1]["id"], "output": out})
    gt = tmp_path / "pairs.jsonl"
    gt.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pred = tmp_path / "preds.jsonl"
    pred.write_text("".join(json.dumps(r) + "\n" for r in preds))
    return pred, gt


def test_write_report_files(tmp_path, small_set):
    pred, gt = small_set
    res = evaluate(pred, gt, family="pixel", reasoning=True)
    paths = write_report(res, tmp_path / "out", num_cases=3)
    assert set(paths) == {"metrics", "samples", "hist", "cases", "html"}
    metrics = json.loads(paths["metrics"].read_text())
    assert metrics["overall"]["n"] == 6 and metrics["space"] == "pixel"
    assert metrics["normal"]["recall"] is None  # NaN → null
    assert metrics["overall"]["miou"] == pytest.approx(float(res.ious.mean()))
    samples = [json.loads(line) for line in paths["samples"].read_text().splitlines()]
    assert [s["id"] for s in samples] == res.ids
    assert samples[5]["pred_box"] is None and samples[0]["gt_boxes"] == []
    for key in ("hist", "cases"):
        data = paths[key].read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000
    html = paths["html"].read_text()
    assert html.count("data:image/png;base64,") == 2 and "cat0" in html and "cat1" in html
    assert not list((tmp_path / "out").glob(".tmp-*"))  # atomic writers left no temp files


def test_select_cases_order(small_set):
    pred, gt = small_set
    res = evaluate(pred, gt, family="pixel", reasoning=True)
    worst, best = select_cases(res, 2)
    assert res.ious[worst[0]] == res.ious.min()
    assert res.gt_boxes[worst[0]]  # a missed defect comes before a false alarm at equal IoU
    assert all(res.gt_boxes[i] for i in best)
    assert res.ious[best[0]] == max(res.ious[i] for i in range(6) if res.gt_boxes[i])


def test_missing_images_do_not_break_the_report(tmp_path, small_set):
    pred, gt = small_set
    res = evaluate(pred, gt, family="pixel", reasoning=True)
    res.targets = [str(tmp_path / "nope.png")] * len(res.ids)
    paths = write_report(res, tmp_path / "out2", num_cases=2)
    assert paths["cases"].read_bytes().startswith(PNG_MAGIC)


def test_jsonable():
    assert jsonable({"a": np.float32(1.5), "b": [float("nan"), np.int64(2)], "c": np.arange(2)}) == {
        "a": 1.5,
        "b": [None, 2],
        "c": [0, 1],
    }


def test_eval_cli(tmp_path, small_set, capsys):
    pred, gt = small_set
    parser = argparse.ArgumentParser()
    eval_cli.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "cli"
    args = parser.parse_args(
        ["eval", "--pred", str(pred), "--gt", str(gt), "--family", "pixel", "--reasoning", "--out", str(out)]
    )
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out.split("\nwrote ")[0])
    assert printed["overall"]["n"] == 6 and set(printed["per_category"]) == {"cat0", "cat1"}
    expected = {"metrics.json", "samples.jsonl", "iou_hist.png", "cases.png", "report.html"}
    assert {p.name for p in out.iterdir()} == expected
    args = parser.parse_args(["eval", "--pred", str(pred), "--gt", str(gt), "--out", str(out / "b"), "--no-report"])
    assert args.func(args) == 0
    assert {p.name for p in (out / "b").iterdir()} == {"metrics.json", "samples.jsonl"}


def test_cli_lists_match_the_protocol_and_errors_exit_2(tmp_path, small_set, capsys):
    from differad_rl.coords import SPACES
    from differad_rl.eval.protocol import FAMILIES

    assert set(eval_cli.FAMILY_NAMES) == set(FAMILIES) and set(eval_cli.SPACE_NAMES) == set(SPACES)
    pred, gt = small_set
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "nope", "output": ""}\n')
    parser = argparse.ArgumentParser()
    eval_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "--pred", str(bad), "--gt", str(gt), "--out", str(tmp_path / "o")])
    assert args.func(args) == 2
    assert "not in the ground truth: 'nope'" in capsys.readouterr().err


def test_samples_carry_raw_output_and_parse_status(tmp_path, small_set):
    pred, gt = small_set
    res = evaluate(pred, gt, family="pixel", reasoning=True)
    paths = write_report(res, tmp_path / "out", visual=False)
    samples = [json.loads(line) for line in paths["samples"].read_text().splitlines()]
    raw = [json.loads(line)["output"] for line in pred.read_text().splitlines()]
    assert [s["output"] for s in samples] == raw
    assert samples[5]["parse_status"] == "unparsable" and samples[5]["output"] == "I cannot tell."
    assert {s["parse_status"] for s in samples[:5]} == {"parsed"}


def test_no_report_removes_a_stale_visual_report(tmp_path, small_set):
    pred, gt = small_set
    res = evaluate(pred, gt, family="pixel", reasoning=True)
    out = tmp_path / "out"
    write_report(res, out, num_cases=2)
    assert (out / "report.html").is_file()
    write_report(res, out, visual=False)
    assert {p.name for p in out.iterdir()} == {"metrics.json", "samples.jsonl"}


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    from differad_rl import cli

    rc = cli.main(argv)
    return rc, capsys.readouterr().err


def test_out_that_is_a_file_is_one_error_line(tmp_path, small_set, capsys):
    pred, gt = small_set
    f = tmp_path / "taken.txt"
    f.write_text("x")
    for argv in (["eval", "--pred", str(pred), "--gt", str(gt), "--family", "pixel", "--out", str(f)],
                 ["baseline", "--pairs", str(gt), "--out", str(f)]):
        rc, err = _cli(argv, capsys)
        assert rc == 2 and "Traceback" not in err
        assert err.strip() == f"differad-rl {argv[0]}: error: --out {f}: is an existing file, not a folder; " \
                              "choose a folder for the report"
    assert f.read_text() == "x"
    with pytest.raises(ValueError, match="is an existing file"):
        write_report(evaluate(pred, gt, family="pixel"), f)


def test_a_split_typo_is_an_error_listing_the_splits(tmp_path, small_set, capsys):
    pred, gt = small_set
    rc, err = _cli(["baseline", "--pairs", str(gt), "--split", "tset", "--out", str(tmp_path / "b")], capsys)
    assert rc == 2 and "--split 'tset': no record of" in err and "splits present: 'train' (6)" in err
    assert not (tmp_path / "b").exists()
    rc, err = _cli(["eval", "--pred", str(pred), "--gt", str(gt), "--split", "tset", "--out", str(tmp_path / "e")],
                   capsys)
    assert rc == 2 and "splits present: 'train' (6)" in err and not (tmp_path / "e").exists()


def test_ctrl_c_is_one_line_not_a_traceback(tmp_path, small_set, capsys, monkeypatch):
    from differad_rl.eval import protocol

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(protocol, "evaluate", interrupted)
    pred, gt = small_set
    rc, err = _cli(["eval", "--pred", str(pred), "--gt", str(gt), "--out", str(tmp_path / "o")], capsys)
    assert rc == 130 and err.strip() == "differad-rl eval: interrupted"
