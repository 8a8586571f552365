"""Pair records → TRL conversational VLM rows: order, prompt, ground truth, seeding, validation."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from differad_rl import prompts  # noqa: E402
from differad_rl.data.records import PairRecord, write_pairs  # noqa: E402
from differad_rl.integrations.trl import (  # noqa: E402
    build_messages,
    pairs_to_rows,
    to_trl_dataset,
    validate_trl_rows,
)

REF_COLOR, TGT_COLOR = (10, 20, 30), (200, 100, 50)


def _pairs(tmp_path, n=6):
    recs = []
    for i in range(n):
        w, h = 60 + 10 * i, 40 + 5 * i
        Image.new("RGB", (w, h), REF_COLOR).save(tmp_path / f"{i}_ref.png")
        Image.new("RGB", (w, h), TGT_COLOR).save(tmp_path / f"{i}_tgt.png")
        boxes = [] if i % 3 == 0 else [[1, 2, 11, 12], [5, 5, 30, 25]]
        recs.append(PairRecord(id=f"cat/d/{i:03d}", reference=str(tmp_path / f"{i}_ref.png"),
                               target=str(tmp_path / f"{i}_tgt.png"), boxes=boxes, width=w, height=h,
                               category="cat"))
    return recs


def test_rows_reference_first_target_second(tmp_path):
    recs = _pairs(tmp_path)
    rows = pairs_to_rows(recs, seed=0)
    for rec, row in zip(recs, rows):
        ref, tgt = row["images"]
        assert ref.getpixel((0, 0)) == REF_COLOR and tgt.getpixel((0, 0)) == TGT_COLOR
        assert row["image_size"] == [rec.width, rec.height] == list(tgt.size)
        assert row["id"] == rec.id and row["category"] == "cat"
        # largest box in original target pixels; normal → zero box
        assert row["solution"] == ([0.0] * 4 if rec.is_normal else [5.0, 5.0, 30.0, 25.0])
        assert row["boxes"] == [[float(c) for c in b] for b in rec.boxes]
        system, user = row["prompt"]
        assert system["role"] == "system" and system["content"] == [{"type": "text", "text": prompts.SYSTEM_PROMPT}]
        assert user["role"] == "user"
        assert [b["type"] for b in user["content"]] == ["image", "image", "text"]
        text = user["content"][2]["text"]
        assert any(text.startswith(ins) for ins in prompts.INSTRUCTIONS)
        assert text.endswith(prompts.FORMAT_HINTS["reasoning"])


def test_instructions_are_seeded_draws_from_the_pool(tmp_path):
    recs = _pairs(tmp_path, n=12)
    text = lambda rows: [r["prompt"][1]["content"][2]["text"] for r in rows]  # noqa: E731
    a = text(pairs_to_rows(recs, seed=1, load_images=False))
    assert a == text(pairs_to_rows(recs, seed=1, load_images=False))
    assert a != text(pairs_to_rows(recs, seed=2, load_images=False))
    assert len(set(a)) > 1  # drawn, not constant
    rng = random.Random(1)
    assert a == [prompts.build_prompt("reasoning", rng) for _ in recs]
    hinted = text(pairs_to_rows(recs, seed=1, prompt_family="qwen", load_images=False))
    assert all(t.endswith(prompts.FORMAT_HINTS["qwen"]) for t in hinted)


def test_hf_dataset_round_trip_from_jsonl(tmp_path):
    recs = _pairs(tmp_path)
    path = write_pairs(recs, tmp_path / "pairs.jsonl")
    ds = to_trl_dataset(path, seed=0)
    assert isinstance(ds, datasets.Dataset) and len(ds) == len(recs)
    row = ds[1]
    assert [im.size for im in row["images"]] == [(70, 45), (70, 45)]
    assert row["images"][1].convert("RGB").getpixel((0, 0)) == TGT_COLOR
    assert row["solution"] == [5.0, 5.0, 30.0, 25.0] and row["image_size"] == [70, 45]
    assert row["prompt"][1]["content"][0]["type"] == "image"
    rows = pairs_to_rows(path, seed=0, load_images=False)
    assert [r["prompt"][1]["content"][2]["text"] for r in rows] == [
        p[1]["content"][2]["text"] for p in ds["prompt"]
    ]


def _row(tmp_path, **over):
    rec = _pairs(tmp_path, n=2)[1]
    row = pairs_to_rows([rec], load_images=False)[0]
    row.update(over)
    return row


@pytest.mark.parametrize(
    "over, match",
    [
        ({"solution": None}, r"row 'cat/d/001': no 'solution' box"),
        ({"image_size": None}, r"row 'cat/d/001': no 'image_size'"),
        ({"image_size": [71, 45]}, r"row 'cat/d/001': image_size=\[71, 45\] but the target image is 70x45"),
        ({"image_size": [70.5, 45]}, r"row 'cat/d/001': image_size=.* must be two positive integers"),
        ({"solution": [1, 2, 3]}, r"row 'cat/d/001': solution=\[1, 2, 3\] is not \[x1, y1, x2, y2\]"),
        ({"solution": [5, 5, 80, 20]}, r"row 'cat/d/001': solution=.* is not inside the 70x45 target"),
        ({"solution": [5, 5, 5, 20]}, r"is not inside"),
        ({"solution": [float("nan"), 0, 1, 1]}, r"finite numbers"),
    ],
)
def test_validation_names_the_row(tmp_path, over, match):
    good = _row(tmp_path)
    validate_trl_rows([good])
    with pytest.raises(ValueError, match=match):
        validate_trl_rows([good, _row(tmp_path, **over)])


def test_validation_images_and_placeholders(tmp_path):
    row = _row(tmp_path)
    with pytest.raises(ValueError, match=r"row 'cat/d/001': 'images' must be \[reference, target\], got 1"):
        validate_trl_rows([{**row, "images": row["images"][:1]}])
    with pytest.raises(ValueError, match="cannot be read"):
        validate_trl_rows([{**row, "images": [row["images"][0], str(tmp_path / "missing.png")]}])
    bad_prompt = build_messages("x", num_images=1)
    with pytest.raises(ValueError, match="1 image placeholder"):
        validate_trl_rows([{**row, "prompt": bad_prompt}])
    with pytest.raises(ValueError, match=r"row #0: no 'solution'"):
        validate_trl_rows([{k: v for k, v in row.items() if k not in ("id", "solution")}])


def test_validation_on_hf_dataset_reads_headers_only(tmp_path):
    recs = _pairs(tmp_path)
    ds = to_trl_dataset(recs)
    validate_trl_rows(ds)
    # a wrong size anywhere in a Dataset is caught before training and names the row
    sizes = list(ds["image_size"])
    sizes[4] = [sizes[4][0], sizes[4][1] + 1]
    bad = ds.remove_columns("image_size").add_column("image_size", sizes)
    with pytest.raises(ValueError, match=r"row 'cat/d/004': image_size=\[100, 61\] but the target image is 100x60"):
        validate_trl_rows(bad)
    # the decoded view is untouched (still PIL images for TRL)
    assert isinstance(ds[0]["images"][0], Image.Image)


def test_bad_records_raise_before_rows(tmp_path):
    rec = _pairs(tmp_path, n=1)[0].to_dict()
    rec["boxes"] = [[1, 2, 500, 3]]
    with pytest.raises(ValueError, match="cat/d/000"):
        pairs_to_rows([rec])


def test_demo_pairs_become_a_valid_dataset(tmp_path):
    demo = pytest.importorskip("differad_rl.data.demo")
    path = demo.build_demo_pairs(tmp_path / "demo", n_pairs=8, size=64, seed=0, progress=False, workers=1)
    ds = to_trl_dataset(path)
    assert len(ds) == 8
    sizes = np.array(ds["image_size"])
    assert (sizes == 64).all()
