"""Pair records: schema validation, JSONL round trip, Hugging Face Dataset round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from differad_rl.data.records import (
    PairRecord,
    from_hf_dataset,
    load_pairs,
    to_hf_dataset,
    write_pairs,
)


def _rec(i: int = 0, boxes=None, split: str = "train", **kw) -> PairRecord:
    base = dict(
        id=f"cat/def/{i:03d}",
        reference=f"ref_{i}.png",
        target=f"tgt_{i}.png",
        boxes=[[1, 2, 5, 6]] if boxes is None else boxes,
        width=32,
        height=24,
        category="cat",
        defect="def",
        source="unit",
        split=split,
    )
    base.update(kw)
    return PairRecord(**base)


class TestValidation:
    def test_boxes_sorted_by_area_and_box_is_largest(self):
        r = _rec(boxes=[[0, 0, 2, 2], [3, 3, 13, 13], [0, 0, 4, 4]])
        assert r.boxes == [[3, 3, 13, 13], [0, 0, 4, 4], [0, 0, 2, 2]]
        assert r.box == (3, 3, 13, 13)

    def test_normal_record_has_zero_box(self):
        r = _rec(boxes=[], defect="good")
        assert r.box == (0, 0, 0, 0)
        assert r.is_normal
        assert r.image_size == (32, 24)

    def test_integral_floats_become_ints(self):
        r = _rec(boxes=[[1.0, 2.0, 5.5, 6.0]])
        assert r.boxes == [[1, 2, 5.5, 6]]
        assert isinstance(r.boxes[0][0], int) and isinstance(r.boxes[0][2], float)

    @pytest.mark.parametrize(
        "boxes, fragment",
        [
            ([[1, 2, 3]], "4 numbers"),
            ([[5, 2, 5, 6]], "x2 > x1"),
            ([[1, 6, 5, 6]], "y2 > y1"),
            ([[1, 2, 33, 6]], "outside"),
            ([[-1, 2, 5, 6]], "outside"),
            ([[1, 2, 5, 25]], "outside"),
            ([[1, 2, "a", 6]], "non-numeric"),
            ([[1, 2, float("nan"), 6]], "non-finite"),
        ],
    )
    def test_bad_box_names_id_and_field(self, boxes, fragment):
        with pytest.raises(ValueError) as ei:
            _rec(i=7, boxes=boxes)
        msg = str(ei.value)
        assert "cat/def/007" in msg and "boxes[0]" in msg and fragment in msg

    @pytest.mark.parametrize("field_name, value", [("width", 0), ("height", -3), ("width", 2.5), ("id", "")])
    def test_bad_scalar_fields(self, field_name, value):
        with pytest.raises(ValueError, match=field_name):
            _rec(**{field_name: value})

    def test_from_dict_rejects_unknown_and_missing(self):
        d = _rec().to_dict()
        with pytest.raises(ValueError, match="unknown field"):
            PairRecord.from_dict({**d, "bxoes": []})
        d.pop("width")
        with pytest.raises(ValueError, match="missing field"):
            PairRecord.from_dict(d)


class TestJsonl:
    def test_round_trip_resolves_relative_paths(self, tmp_path: Path):
        recs = [_rec(0), _rec(1, boxes=[], defect="good", split="test"), _rec(2, boxes=[[0, 0, 32, 24], [1, 1, 2, 2]])]
        out = write_pairs(recs, tmp_path / "sub" / "pairs.jsonl")
        back = load_pairs(out)
        assert [r.id for r in back] == [r.id for r in recs]
        for a, b in zip(recs, back):
            assert b.reference == str((tmp_path / "sub" / a.reference).resolve())
            assert a.with_paths(b.reference, b.target) == b
        # writing loaded records again makes paths under the folder relative again: byte-identical
        before = out.read_bytes()
        write_pairs(back, out)
        assert out.read_bytes() == before

    def test_absolute_paths_outside_folder_kept(self, tmp_path: Path):
        r = _rec(reference="/elsewhere/r.png", target="/elsewhere/t.png")
        out = write_pairs([r], tmp_path / "p.jsonl")
        line = json.loads(out.read_text().splitlines()[0])
        assert line["reference"] == "/elsewhere/r.png"
        assert load_pairs(out)[0].reference == "/elsewhere/r.png"

    def test_paths_under_symlinked_folder_become_relative(self, tmp_path: Path):
        real = tmp_path / "real"
        real.mkdir()
        link = tmp_path / "link"
        link.symlink_to(real, target_is_directory=True)
        r = _rec(reference=str(link / "img" / "r.png"), target=str(real / "img" / "t.png"))
        for folder in (real, link):
            out = write_pairs([r], folder / "p.jsonl")
            line = json.loads(out.read_text())
            assert (line["reference"], line["target"]) == ("img/r.png", "img/t.png")

    def test_bad_json_names_file_and_line(self, tmp_path: Path):
        out = write_pairs([_rec(0)], tmp_path / "p.jsonl")
        with out.open("a") as fh:
            fh.write("\n{not json}\n")
        with pytest.raises(ValueError) as ei:
            load_pairs(out)
        assert f"{out}:3:" in str(ei.value) and "invalid JSON" in str(ei.value)

    def test_invalid_record_names_file_line_and_id(self, tmp_path: Path):
        p = tmp_path / "p.jsonl"
        d = _rec(4).to_dict()
        d["boxes"] = [[0, 0, 99, 1]]
        p.write_text(json.dumps(_rec(0).to_dict()) + "\n" + json.dumps(d) + "\n")
        with pytest.raises(ValueError) as ei:
            load_pairs(p)
        assert f"{p}:2:" in str(ei.value) and "cat/def/004" in str(ei.value)

    def test_missing_file(self, tmp_path: Path):
        with pytest.raises(FileNotFoundError, match="nope.jsonl"):
            load_pairs(tmp_path / "nope.jsonl")

    def test_duplicate_ids_rejected_and_nothing_written(self, tmp_path: Path):
        with pytest.raises(ValueError, match="duplicate id"):
            write_pairs([_rec(0), _rec(0)], tmp_path / "p.jsonl")
        assert list(tmp_path.iterdir()) == []


class TestHfDataset:
    def test_round_trip(self, tmp_path: Path):
        recs = load_pairs(write_pairs([_rec(0), _rec(1, boxes=[]), _rec(2, boxes=[[0, 0, 3.5, 4], [5, 5, 6, 6]])], tmp_path / "p.jsonl"))
        ds = to_hf_dataset(recs)
        assert len(ds) == 3 and ds.column_names[:3] == ["id", "reference", "target"]
        assert from_hf_dataset(ds) == recs

    def test_extra_columns_ignored(self):
        ds = to_hf_dataset([_rec(0)]).add_column("prompt", ["hello"])
        assert from_hf_dataset(ds) == [_rec(0)]


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 30), st.integers(0, 22), st.integers(1, 30), st.integers(1, 22)),
        max_size=5,
    )
)
def test_any_valid_boxes_round_trip_and_sort(raw):
    boxes = [[x, y, min(32, x + w), min(24, y + h)] for x, y, w, h in raw]
    r = _rec(boxes=boxes)
    areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in r.boxes]
    assert areas == sorted(areas, reverse=True)
    assert sorted(map(tuple, r.boxes)) == sorted(map(tuple, boxes))
    assert PairRecord.from_dict(json.loads(json.dumps(r.to_dict()))) == r
