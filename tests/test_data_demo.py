"""Embedded demo pairs: offline, deterministic, exact boxes, atomic and reusable."""

from __future__ import annotations

import json
import socket
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from differad_rl.data.demo import (
    DEFAULT_CATEGORIES,
    MANIFEST_FILE,
    build_demo_pairs,
    demo_content_hash,
    load_source_image,
)
from differad_rl.data.records import load_pairs


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    load_source_image.cache_clear()
    yield
    load_source_image.cache_clear()


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_default_categories_load_offline(no_network):
    for name in DEFAULT_CATEGORIES:
        img = load_source_image(name)
        assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.float64
        assert 0.0 <= img.min() and img.max() <= 1.0 and img.std() > 0.02


def test_unknown_category_is_named():
    with pytest.raises(ValueError, match="'no_such_image'"):
        load_source_image("no_such_image")


def test_builds_offline_twice_identically(tmp_path: Path, no_network):
    # 32 pairs: enough for the process pool (workers=2) to be used; the bytes must not depend on it
    a = build_demo_pairs(tmp_path / "a", n_pairs=32, size=32, seed=3, workers=1, progress=False)
    b = build_demo_pairs(tmp_path / "b", n_pairs=32, size=32, seed=3, workers=2, progress=False)
    ta, tb = _tree_bytes(a.parent), _tree_bytes(b.parent)
    assert ta == tb and len(ta) == 2 * 32 + 2
    c = build_demo_pairs(tmp_path / "c", n_pairs=32, size=32, seed=4, workers=1, progress=False)
    assert demo_content_hash(c.parent) != demo_content_hash(a.parent)


@pytest.fixture(scope="module")
def demo40(tmp_path_factory) -> Path:
    return build_demo_pairs(tmp_path_factory.mktemp("demo") / "d", n_pairs=40, size=96, seed=0, progress=False)


def test_records_schema_and_mix(demo40: Path):
    recs = load_pairs(demo40)
    assert len(recs) == 40 and len({r.id for r in recs}) == 40
    assert Counter(r.split for r in recs) == {"train": 30, "test": 10}
    assert sum(r.is_normal for r in recs) == 10
    cats = {r.category for r in recs}
    assert cats == set(DEFAULT_CATEGORIES)
    for r in recs:
        assert r.id.split("/")[0] == r.category and r.id.split("/")[1] == r.defect
        assert (r.defect == "good") == r.is_normal
        assert (r.defect == "multi") == (len(r.boxes) == 2)
        assert (r.width, r.height) == (96, 96)
        for p in (r.reference, r.target):
            with Image.open(p) as im:
                assert im.mode == "RGB" and im.size == (96, 96)
    # every category has test pairs and train pairs
    assert all({"train", "test"} <= {r.split for r in recs if r.category == c} for c in cats)


def test_defect_sizes_span_tiny_to_large(demo40: Path):
    recs = load_pairs(demo40)
    fr = np.array([(r.box[2] - r.box[0]) * (r.box[3] - r.box[1]) / 96**2 for r in recs if r.boxes])
    assert fr.min() < 0.01 and fr.max() > 0.08


def test_nuisance_on_normal_pairs_and_change_inside_boxes(demo40: Path):
    recs = load_pairs(demo40)
    for r in recs:
        ref = np.asarray(Image.open(r.reference), dtype=np.float64)
        tgt = np.asarray(Image.open(r.target), dtype=np.float64)
        diff = np.abs(ref - tgt).mean(axis=2)
        if r.is_normal:
            # nuisance: a normal target is not a copy of its reference
            assert diff.mean() > 1.0
        else:
            for x1, y1, x2, y2 in r.boxes:
                inside = diff[y1:y2, x1:x2]
                # the box is tight: its border rows/columns contain changed pixels
                assert inside.max() > 30


def test_reuse_and_rebuild(tmp_path: Path):
    out = tmp_path / "d"
    p = build_demo_pairs(out, n_pairs=8, size=64, progress=False)
    man = out / MANIFEST_FILE
    stamp = man.stat().st_mtime_ns
    assert build_demo_pairs(out, n_pairs=8, size=64, progress=False) == p
    assert man.stat().st_mtime_ns == stamp  # reused, not rebuilt
    # a tampered image makes the set incomplete: it is rebuilt, identically
    img = next((out / "images").iterdir())
    good = img.read_bytes()
    img.write_bytes(b"garbage")
    build_demo_pairs(out, n_pairs=8, size=64, progress=False)
    assert img.read_bytes() == good
    # other parameters replace the set as a whole
    build_demo_pairs(out, n_pairs=9, size=64, progress=False)
    assert len(load_pairs(p)) == 9 and json.loads(man.read_text())["params"]["n_pairs"] == 9
    assert sorted(x.name for x in tmp_path.iterdir()) == ["d"]  # no temp folders left


def test_refuses_foreign_folder(tmp_path: Path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a demo pair set"):
        build_demo_pairs(out, n_pairs=4, size=64, progress=False)
    assert (out / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "kwargs, field_name",
    [({"n_pairs": 0}, "n_pairs"), ({"size": 8}, "size"), ({"seed": -1}, "seed"), ({"test_fraction": 1.5}, "test_fraction"),
     ({"categories": ["brick", "nonexistent_image"]}, "nonexistent_image")],
)
def test_bad_parameters_name_the_field(tmp_path: Path, kwargs, field_name):
    with pytest.raises(ValueError, match=field_name):
        build_demo_pairs(tmp_path / "d", progress=False, **kwargs)
    assert not (tmp_path / "d").exists()


def _data_cli(argv: list[str]) -> int:
    """Parse with only the data commands registered (the full CLI also loads the eval group)."""
    import argparse

    from differad_rl.data import cli as data_cli

    parser = argparse.ArgumentParser(prog="differad-rl")
    data_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_cli_demo_data(tmp_path: Path, capsys):
    assert _data_cli(["demo-data", "--out", str(tmp_path / "d"), "--n-pairs", "6", "--size", "64", "--quiet"]) == 0
    assert "6 pairs" in capsys.readouterr().out
    assert len(load_pairs(tmp_path / "d" / "pairs.jsonl")) == 6


def test_relative_out_dir_writes_paths_relative_to_the_jsonl(tmp_path, monkeypatch):
    """A cwd-relative out_dir must still give image paths that resolve from the JSONL's folder."""
    from differad_rl.data import build_demo_pairs, load_pairs

    monkeypatch.chdir(tmp_path)
    path = build_demo_pairs("runs/demo", n_pairs=8, size=64, seed=3, progress=False)
    monkeypatch.chdir("/")
    for rec in load_pairs(tmp_path / path):
        assert Path(rec.reference).is_file() and Path(rec.target).is_file()


def test_size_bins_choose_the_defect_sizes(tmp_path):
    from differad_rl.data.demo import DemoConfig, build_demo_pairs
    from differad_rl.data.records import load_pairs

    def areas(path):
        return [(b[2] - b[0]) * (b[3] - b[1]) / (r.width * r.height) for r in load_pairs(path) for b in r.boxes]

    big = build_demo_pairs(tmp_path / "big", n_pairs=24, size=64, size_bins=("large",), multi_every=0,
                           progress=False, workers=1)
    small = build_demo_pairs(tmp_path / "small", n_pairs=24, size=64, size_bins=("tiny",), multi_every=0,
                             progress=False, workers=1)
    assert min(areas(big)) > 0.04 and max(areas(small)) < 0.04
    assert all(len(r.boxes) <= 1 for r in load_pairs(big))  # multi_every=0: one defect a target
    manifest = json.loads((tmp_path / "big" / "manifest.json").read_text())
    assert manifest["params"]["size_bins"] == ["large"]
    with pytest.raises(ValueError, match="size_bins"):
        DemoConfig(size_bins=("huge",))


def test_nuisance_switches_give_a_clean_aligned_set_with_the_same_defects(tmp_path):
    """max_shift = max_rotation_deg = max_scale = 0 and photometric=False: the two images are equal outside the
    defects, and the boxes are the default set's (every draw is still made). ``NO_NUISANCE`` is exactly the
    geometric and the photometric switches together."""
    from differad_rl.data.demo import (
        NO_GEOMETRIC_NUISANCE,
        NO_NUISANCE,
        NO_PHOTOMETRIC_NUISANCE,
        DemoConfig,
        build_demo_pairs,
    )
    from differad_rl.data.records import load_pairs

    kw = dict(n_pairs=16, size=64, multi_every=0, progress=False, workers=1)
    noisy = load_pairs(build_demo_pairs(tmp_path / "noisy", **kw))
    assert dict(NO_NUISANCE) == {**NO_GEOMETRIC_NUISANCE, **NO_PHOTOMETRIC_NUISANCE}
    assert dict(NO_NUISANCE) == {"max_shift": 0, "max_rotation_deg": 0, "max_scale": 0, "photometric": False}
    clean_path = build_demo_pairs(tmp_path / "clean", **NO_NUISANCE, **kw)
    clean = load_pairs(clean_path)
    assert [r.boxes for r in clean] == [r.boxes for r in noisy]
    assert [r.id for r in clean] == [r.id for r in noisy]
    for r in clean:
        ref = np.asarray(Image.open(r.reference), dtype=np.int16)
        tgt = np.asarray(Image.open(r.target), dtype=np.int16)
        outside = np.ones(ref.shape[:2], dtype=bool)
        for x1, y1, x2, y2 in r.boxes:
            outside[y1:y2, x1:x2] = False
            assert np.abs(ref - tgt)[y1:y2, x1:x2].max() > 30
        assert np.abs(ref - tgt)[outside].max() == 0, r.id
    params = json.loads((tmp_path / "clean" / "manifest.json").read_text())["params"]
    assert params["photometric"] is False and params["max_scale"] == 0
    default = json.loads((tmp_path / "noisy" / "manifest.json").read_text())["params"]
    assert "photometric" not in default and "max_scale" not in default  # older manifests stay valid
    assert _data_cli(["demo-data", "--out", str(tmp_path / "cli"), "--clean", "--n-pairs", "16", "--size", "64",
                      "--quiet", "--workers", "1"]) == 0
    cli = json.loads((tmp_path / "cli" / "manifest.json").read_text())["params"]
    assert cli["photometric"] is False and cli["max_shift"] == cli["max_rotation_deg"] == cli["max_scale"] == 0
    with pytest.raises(ValueError, match="max_scale"):
        DemoConfig(max_scale=-0.1)
    with pytest.raises(ValueError, match="photometric"):
        DemoConfig(photometric="no")


def test_defect_kinds_choose_what_is_drawn(tmp_path):
    from differad_rl.data.demo import DemoConfig, build_demo_pairs
    from differad_rl.data.records import load_pairs

    path = build_demo_pairs(tmp_path / "holes", n_pairs=24, size=64, defect_kinds=("hole", "stain"), multi_every=4,
                            progress=False, workers=1)
    defects = {r.defect for r in load_pairs(path)}
    assert defects <= {"hole", "stain", "multi", "good"} and {"hole", "stain"} <= defects
    manifest = json.loads((tmp_path / "holes" / "manifest.json").read_text())
    assert manifest["params"]["defect_kinds"] == ["hole", "stain"]
    with pytest.raises(ValueError, match="defect_kinds"):
        DemoConfig(defect_kinds=("crack",))
