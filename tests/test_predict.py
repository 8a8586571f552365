"""``differad-rl predict`` on the tiny offline Qwen-VL folders: protocol prompt, left-padded batches,
recorded sizes, resuming, bad input, and predict → eval end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("transformers")

from differad_rl import cli  # noqa: E402
from differad_rl.coords import smart_resize  # noqa: E402
from differad_rl.data.records import load_pairs  # noqa: E402
from differad_rl.integrations.qwen_vl import predict as P  # noqa: E402
from differad_rl.integrations.qwen_vl.loading import load_model_and_processor, pixel_budget  # noqa: E402
from differad_rl.integrations.qwen_vl.tiny import FAMILIES, tiny_model_for  # noqa: E402
from differad_rl.prompts import INSTRUCTIONS, SYSTEM_PROMPT  # noqa: E402

SIZES = [(64, 64), (120, 80), (90, 150), (200, 100), (56, 112), (150, 150), (80, 60), (100, 200)]
FAST = P.PredictConfig(batch_size=3, max_new_tokens=6)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """8 pairs of different sizes (so batches really pad), 3 in the test split."""
    d = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    rows = []
    for i, (w, h) in enumerate(SIZES):
        for part in "rt":
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{i}{part}.png")
        rows.append({"id": f"c{i % 2}/{i}", "reference": f"{i}r.png", "target": f"{i}t.png",
                     "boxes": [[5, 5, 30, 30]] if i % 2 else [], "width": w, "height": h,
                     "category": f"c{i % 2}", "split": "test" if i < 3 else "train"})
    (d / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "pairs.jsonl"


@pytest.fixture(scope="module")
def loaded():
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            cache[family] = load_model_and_processor(str(tiny_model_for(family)), training=False)
        return cache[family]

    return get


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = cli.main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# ------------------------------------------------------------------------------- the prompt
def test_protocol_prompt_reference_first_same_instruction():
    msgs = P.protocol_messages("reasoning")
    assert msgs[0]["content"][0]["text"] == SYSTEM_PROMPT
    user = msgs[1]["content"]
    assert [c["type"] for c in user] == ["image", "image", "text"]  # reference, target, instruction
    assert user[2]["text"].startswith(INSTRUCTIONS[0]) and "<answer>" in user[2]["text"]
    plain = P.protocol_messages("qwen")
    assert len(plain) == 1 and plain[0]["content"][2]["text"].startswith(INSTRUCTIONS[0])
    assert "<answer>" not in plain[0]["content"][2]["text"]
    with pytest.raises(ValueError, match="prompt='chat'"):
        P.protocol_messages("chat")


# ------------------------------------------------------------------------------- batching / sizes
@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batches_equal_one_by_one_and_sizes_are_the_processors(family, pairs, loaded):
    model, processor = loaded(family)
    records = load_pairs(pairs)
    cfg = P.PredictConfig(max_new_tokens=10)
    batch = P.generate_predictions(model, processor, records, cfg, model_name="m")
    one = [P.generate_predictions(model, processor, [r], cfg, model_name="m")[0] for r in records]
    assert [b["output"] for b in batch] == [o["output"] for o in one]
    ip = processor.image_processor
    lo, hi = pixel_budget(processor)
    for r, line in zip(records, batch):
        assert line["id"] == r.id and line["family"] == line["space"] == family
        assert line["image_size"] == [r.width, r.height]
        h, w = smart_resize(r.height, r.width, ip.patch_size * ip.merge_size, lo, hi)
        assert line["input_size"] == [w, h]
        assert line["settings"] == {"prompt": "reasoning", "temperature": 0.0, "top_p": 1.0,
                                    "max_new_tokens": 10, "min_pixels": lo, "max_pixels": hi}
    assert len({tuple(b["input_size"]) for b in batch}) > 3  # the batch really pads


def test_a_right_padded_processor_is_refused(pairs, loaded):
    model, processor = loaded("qwen2_vl")
    processor.tokenizer.padding_side = "right"
    try:
        with pytest.raises(ValueError, match="padding_side='right'"):
            P.generate_predictions(model, processor, load_pairs(pairs)[:2], FAST)
    finally:
        processor.tokenizer.padding_side = "left"


def test_sampling_is_seeded_and_differs_from_greedy(pairs, loaded, tmp_path):
    model, processor = loaded("qwen2_5_vl")
    records = load_pairs(pairs)[:4]
    hot = P.PredictConfig(batch_size=4, max_new_tokens=8, temperature=1.5, top_p=0.95, seed=3)
    a = P.predict_records(model, processor, records, tmp_path / "a.jsonl", model_name="m", config=hot, progress=False)
    b = P.predict_records(model, processor, records, tmp_path / "b.jsonl", model_name="m", config=hot, progress=False)
    g = P.predict_records(model, processor, records, tmp_path / "g.jsonl", model_name="m", config=FAST, progress=False)
    assert a.written == b.written == g.written == 4
    out = {k: [x["output"] for x in _lines(tmp_path / f"{k}.jsonl")] for k in "abg"}
    assert out["a"] == out["b"] and out["a"] != out["g"]
    assert _lines(tmp_path / "a.jsonl")[0]["settings"]["temperature"] == 1.5
    with pytest.raises(ValueError, match="--top-p 0"):
        P.PredictConfig(top_p=0)


# ------------------------------------------------------------------------------- resuming
def test_interrupted_run_resumes_and_a_torn_line_is_dropped(pairs, loaded, tmp_path, monkeypatch):
    model, processor = loaded("qwen2_vl")
    records = load_pairs(pairs)
    full = tmp_path / "full.jsonl"
    P.predict_records(model, processor, records, full, model_name="m", config=FAST, progress=False)

    out = tmp_path / "part.jsonl"
    real = P.generate_predictions
    calls = {"n": 0}

    def crash_on_second_batch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(P, "generate_predictions", crash_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        P.predict_records(model, processor, records, out, model_name="m", config=FAST, progress=False)
    monkeypatch.setattr(P, "generate_predictions", real)
    assert len(_lines(out)) == 3  # the first batch survived whole, the one in flight is lost
    with open(out, "ab") as fh:  # a crash in the middle of a write
        fh.write(b'{"id": "c1/3", "output": "(1,2),(3')
    res = P.predict_records(model, processor, records, out, model_name="m", config=FAST, progress=False)
    assert res.dropped_torn_line and (res.written, res.skipped, res.total) == (5, 3, 8)
    assert out.read_bytes().endswith(b"\n")
    assert sorted(map(json.dumps, _lines(out))) == sorted(map(json.dumps, _lines(full)))
    again = P.predict_records(model, processor, records, out, model_name="m", config=FAST, progress=False)
    assert (again.written, again.skipped) == (0, 8)


def test_out_from_another_model_or_settings_is_refused_untouched(pairs, loaded, tmp_path):
    records = load_pairs(pairs)[:3]
    out = tmp_path / "p.jsonl"
    m2, p2 = loaded("qwen2_vl")
    P.predict_records(m2, p2, records[:2], out, model_name="model-a", config=FAST, progress=False)
    before = out.read_bytes()
    with pytest.raises(ValueError, match=r"written by another model \(model='model-a'; this run: 'model-b'\)"):
        P.predict_records(m2, p2, records, out, model_name="model-b", config=FAST, progress=False)
    m25, p25 = loaded("qwen2_5_vl")
    with pytest.raises(ValueError, match="written by another family"):
        P.predict_records(m25, p25, records, out, model_name="model-a", config=FAST, progress=False)
    with pytest.raises(ValueError, match="written with max_new_tokens=6, this run has max_new_tokens=7"):
        P.predict_records(m2, p2, records, out, model_name="model-a",
                          config=P.PredictConfig(batch_size=3, max_new_tokens=7), progress=False)
    assert out.read_bytes() == before
    with pytest.raises(ValueError, match="is a folder"):
        P.predict_records(m2, p2, records, tmp_path, model_name="model-a", config=FAST, progress=False)


# ------------------------------------------------------------------------------- the command line
def test_cli_predict_then_eval_on_the_test_split(pairs, tmp_path, capsys):
    model = str(tiny_model_for("qwen2_5_vl"))
    out = tmp_path / "preds" / "test.jsonl"
    rc, stdout, err = _run_cli(["predict", "--model", model, "--pairs", str(pairs), "--split", "test",
                                "--out", str(out), "--max-new-tokens", "6", "--batch-size", "2", "--no-progress"],
                               capsys)
    assert rc == 0, err
    assert "wrote 3 predictions" in stdout and "(qwen2_5_vl)" in stdout
    lines = _lines(out)
    assert {x["id"] for x in lines} == {r.id for r in load_pairs(pairs) if r.split == "test"}
    assert all(x["model"] == str(Path(model).resolve()) for x in lines)
    rc, stdout, _ = _run_cli(["predict", "--model", model, "--pairs", str(pairs), "--split", "test",
                              "--out", str(out), "--max-new-tokens", "6", "--no-progress"], capsys)
    assert rc == 0 and "wrote 0 predictions" in stdout and "3 already there" in stdout

    # eval reads the family and the sizes from the file; --split test ignores nothing here
    rc, stdout, err = _run_cli(["eval", "--pred", str(out), "--gt", str(pairs), "--split", "test",
                                "--out", str(tmp_path / "ev"), "--no-report"], capsys)
    assert rc == 0, err
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["overall"]["n"] == 3 and metrics["config"]["family"] == "qwen2_5_vl"
    assert metrics["recorded_input_sizes"] == 3 and metrics["config"]["split"] == "test"
    samples = _lines(tmp_path / "ev" / "samples.jsonl")
    assert [s["output"] for s in samples] == [x["output"] for x in lines]
    assert all(s["parse_status"] in ("parsed", "unparsable") for s in samples)
    # the whole file against --split train: every prediction id is a test id → none for train
    rc, _, err = _run_cli(["eval", "--pred", str(out), "--gt", str(pairs), "--split", "train",
                           "--out", str(tmp_path / "ev2"), "--no-report"], capsys)
    assert rc == 2 and "without a prediction" in err


def _one_error_line(err: str, *needles: str) -> None:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("differad-rl predict: error: ")
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_bad_input_is_one_line_and_nothing_is_written(pairs, tmp_path, capsys):
    model = str(tiny_model_for("qwen2_vl"))
    out = tmp_path / "o" / "preds.jsonl"
    base = ["predict", "--pairs", str(pairs), "--out", str(out), "--no-progress", "--max-new-tokens", "4"]

    # unknown family
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    rc, _, err = _run_cli([*base, "--model", str(gpt)], capsys)
    assert rc == 2
    _one_error_line(err, "model_type 'gpt2' is not a supported family")
    rc, _, err = _run_cli([*base, "--model", "tiny:llava"], capsys)
    _one_error_line(err, "unknown tiny family 'llava'")

    # a model folder without a processor
    bare = tmp_path / "weights_only"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        (bare / name).write_bytes((Path(model) / name).read_bytes())
    rc, _, err = _run_cli([*base, "--model", str(bare)], capsys)
    _one_error_line(err, f"--model {bare}: no processor could be loaded")

    # a split with no records
    rc, _, err = _run_cli([*base, "--model", model, "--split", "tset"], capsys)
    _one_error_line(err, "--split 'tset': no record of", "'test' (3), 'train' (5)")

    # pairs with missing images
    broken = tmp_path / "broken.jsonl"
    rows = [json.loads(x) for x in pairs.read_text().splitlines()]
    rows[1]["target"] = str(tmp_path / "gone.png")
    for r in rows:
        for k in ("reference", "target"):
            r[k] = str(pairs.parent / r[k]) if not os.path.isabs(r[k]) else r[k]
    broken.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, _, err = _run_cli([*base[:2], str(broken), *base[3:], "--model", model], capsys)
    _one_error_line(err, "missing images", "'c1/1' (target", "gone.png")

    # a target whose size differs from its record
    rows[1]["target"] = str(pairs.parent / "0t.png")
    broken.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, _, err = _run_cli([*base[:2], str(broken), *base[3:], "--model", model], capsys)
    _one_error_line(err, "'c1/1' (target is 64x64, record says 120x80)")
    assert not out.exists() and not out.parent.exists()

    # an --out written by another model
    out.parent.mkdir()
    out.write_text(json.dumps({"id": "c0/0", "output": "", "model": "Qwen/Qwen2.5-VL-7B-Instruct",
                               "family": "qwen2_5_vl", "settings": {}}) + "\n")
    before = out.read_bytes()
    rc, _, err = _run_cli([*base, "--model", model], capsys)
    _one_error_line(err, "written by another model", "Qwen/Qwen2.5-VL-7B-Instruct")
    assert out.read_bytes() == before


@pytest.mark.slow
def test_sigint_ends_with_one_line_and_only_whole_lines(tmp_path, pairs):
    """A real Ctrl-C on the console script: exit 130, no traceback, the file holds whole lines, and
    the same command resumes."""
    rows = [json.loads(x) for x in pairs.read_text().splitlines()]
    many = []
    for k in range(60):
        for r in rows:
            many.append({**r, "id": f"{r['id']}#{k}", "reference": str(pairs.parent / r["reference"]),
                         "target": str(pairs.parent / r["target"])})
    big = tmp_path / "many.jsonl"
    big.write_text("".join(json.dumps(r) + "\n" for r in many))
    out = tmp_path / "preds.jsonl"
    cmd = [sys.executable, "-m", "differad_rl.cli", "predict", "--model", str(tiny_model_for("qwen2_vl")),
           "--pairs", str(big), "--out", str(out), "--batch-size", "1", "--max-new-tokens", "16", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not (out.exists() and out.stat().st_size > 0):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted; rerun the same command to resume" in err
    done = _lines(out)  # every line parses: nothing torn
    assert 0 < len(done) < len(many)
