"""Readers (MVTec AD, VisA, MVTec LOCO, generic folder) on tiny fake trees, pairing, build-pairs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from differad_rl.data.pairing import PairingConfig, build_pair_dir, build_pairs, default_textures, plan_pairs
from differad_rl.data.readers import Sample, read_folder, read_layout, read_loco, read_mvtec, read_visa
from differad_rl.data.records import from_hf_dataset, load_pairs

SIZE = 40
NONE = PairingConfig(split="none")

def img(path: Path, seed: int, size: tuple[int, int] = (SIZE, SIZE)) -> Path:
    rng = np.random.default_rng(seed)
    arr = (rng.random((size[1], size[0], 3)) * 200 + 20).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def mask(path: Path, boxes: list[tuple[int, int, int, int]], size: tuple[int, int] = (SIZE, SIZE)) -> Path:
    m = np.zeros((size[1], size[0]), dtype=np.uint8)
    for x1, y1, x2, y2 in boxes:
        m[y1:y2, x1:x2] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(m).save(path)
    return path


def make_mvtec(root: Path, categories=("bottle", "cable"), n_train=4, n_test_good=2) -> Path:
    seed = 0
    for c in categories:
        for i in range(n_train):
            img(root / c / "train" / "good" / f"{i:03d}.png", seed := seed + 1)
        for i in range(n_test_good):
            img(root / c / "test" / "good" / f"{i:03d}.png", seed := seed + 1)
        for d, boxes in (("crack", [(5, 6, 15, 12)]), ("hole", [(2, 2, 6, 6), (20, 22, 35, 30)])):
            for i in range(2):
                img(root / c / "test" / d / f"{i:03d}.png", seed := seed + 1)
                mask(root / c / "ground_truth" / d / f"{i:03d}_mask.png", boxes)
    return root


def make_loco(root: Path, categories=("juice_bottle",)) -> Path:
    seed = 100
    for c in categories:
        for split in ("train", "validation", "test"):
            for i in range(2):
                img(root / c / split / "good" / f"{i:03d}.png", seed := seed + 1)
        for i in range(2):
            img(root / c / "test" / "logical_anomalies" / f"{i:03d}.png", seed := seed + 1)
            mask(root / c / "ground_truth" / "logical_anomalies" / f"{i:03d}" / "000.png", [(1, 1, 5, 5)])
            mask(root / c / "ground_truth" / "logical_anomalies" / f"{i:03d}" / "001.png", [(30, 30, 38, 39)])
    return root


def make_visa(root: Path, categories=("candle", "pcb1")) -> Path:
    rows = ["object,split,label,image,mask"]
    seed = 200
    for c in categories:
        for i in range(4):
            rel = f"{c}/Data/Images/Normal/{i:04d}.JPG"
            img(root / rel, seed := seed + 1)
            rows.append(f"{c},train,normal,{rel},")
        for i in range(3):
            rel = f"{c}/Data/Images/Anomaly/{i:03d}.JPG"
            mrel = f"{c}/Data/Masks/Anomaly/{i:03d}.png"
            img(root / rel, seed := seed + 1)
            mask(root / mrel, [(10, 10, 20 + i, 14)])
            rows.append(f"{c},test,anomaly,{rel},{mrel}")
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    return root


def make_folder(root: Path) -> Path:
    for i in range(3):
        img(root / "good" / f"n{i}.png", 300 + i)
    img(root / "dent" / "a.png", 310)
    mask(root / "ground_truth" / "dent" / "a_mask.png", [(3, 4, 9, 30)])
    img(root / "dent" / "b.png", 311)
    mask(root / "ground_truth" / "dent" / "b.png", [(0, 0, 40, 40)])
    return root


# ----------------------------------------------------------------------------- readers
class TestReaders:
    def test_mvtec(self, tmp_path: Path):
        s = read_mvtec(make_mvtec(tmp_path))
        assert Counter((x.category, x.defect) for x in s) == {
            ("bottle", "good"): 6, ("bottle", "crack"): 2, ("bottle", "hole"): 2,
            ("cable", "good"): 6, ("cable", "crack"): 2, ("cable", "hole"): 2,
        }
        crack = next(x for x in s if x.defect == "crack")
        assert crack.mask_paths == (tmp_path / "bottle" / "ground_truth" / "crack" / "000_mask.png",)
        assert all(x.source == "mvtec_ad" for x in s)
        assert [x.category for x in read_mvtec(tmp_path, ["cable"])] == ["cable"] * 10

    def test_mvtec_errors_name_file_or_category(self, tmp_path: Path):
        root = make_mvtec(tmp_path / "m")
        with pytest.raises(ValueError, match="'carpet' not found"):
            read_mvtec(root, ["carpet"])
        (root / "bottle" / "ground_truth" / "crack" / "001_mask.png").unlink()
        with pytest.raises(FileNotFoundError, match="001_mask.png"):
            read_mvtec(root)
        (tmp_path / "e" / "empty_cat" / "train" / "good").mkdir(parents=True)
        with pytest.raises(ValueError, match="'empty_cat' is empty"):
            read_mvtec(tmp_path / "e")
        with pytest.raises(FileNotFoundError, match="nowhere"):
            read_mvtec(tmp_path / "nowhere")

    def test_loco_unions_mask_folders(self, tmp_path: Path):
        s = read_loco(make_loco(tmp_path))
        assert Counter(x.split for x in s if x.is_normal) == {"train": 2, "validation": 2, "test": 2}
        anom = [x for x in s if not x.is_normal]
        assert len(anom) == 2 and all(len(x.mask_paths) == 2 for x in anom)
        cfg = PairingConfig(split="none", normal_ratio=0.0)
        recs = build_pairs(plan_pairs(s, cfg), cfg, progress=False)
        assert {tuple(map(tuple, r.boxes)) for r in recs} == {((30, 30, 38, 39), (1, 1, 5, 5))}

    def test_visa_csv(self, tmp_path: Path):
        s = read_visa(make_visa(tmp_path))
        assert Counter((x.category, x.defect) for x in s) == {
            ("candle", "good"): 4, ("candle", "anomaly"): 3, ("pcb1", "good"): 4, ("pcb1", "anomaly"): 3,
        }
        assert all(x.source == "visa" for x in s)

    def test_visa_errors_name_line(self, tmp_path: Path):
        root = make_visa(tmp_path)
        csv_path = root / "split_csv" / "1cls.csv"
        lines = csv_path.read_text().splitlines()
        lines[3] = lines[3].replace("normal", "weird")
        csv_path.write_text("\n".join(lines) + "\n")
        with pytest.raises(ValueError, match=r"1cls.csv:4: label"):
            read_visa(root)
        csv_path.write_text("a,b\n1,2\n")
        with pytest.raises(ValueError, match="needs columns"):
            read_visa(root)

    def test_folder_single_and_multi_category(self, tmp_path: Path):
        single = read_folder(make_folder(tmp_path / "widget"))
        assert {x.category for x in single} == {"widget"} and sum(not x.is_normal for x in single) == 2
        make_folder(tmp_path / "multi" / "a")
        make_folder(tmp_path / "multi" / "b")
        assert {x.category for x in read_layout("folder", tmp_path / "multi")} == {"a", "b"}
        with pytest.raises(ValueError, match="layout must be"):
            read_layout("kaggle", tmp_path)


# ----------------------------------------------------------------------------- pairing
class TestPairing:
    def test_plan_is_deterministic_and_follows_rules(self, tmp_path: Path):
        s = read_mvtec(make_mvtec(tmp_path, categories=("a", "b", "c", "d")))
        cfg = PairingConfig(normal_ratio=0.5, seed=1, test_fraction=0.25)
        p1, p2 = plan_pairs(s, cfg), plan_pairs(list(reversed(s)), cfg)
        assert [(p.id, p.reference.path, p.target.path, p.split) for p in p1] == [
            (p.id, p.reference.path, p.target.path, p.split) for p in p2
        ]
        assert len({p.id for p in p1}) == len(p1)
        for p in p1:
            assert p.reference.is_normal and p.reference.category == p.target.category
            assert p.reference.path != p.target.path and p.reference.split == "train"
        per_cat = Counter((p.target.category, p.target.is_normal) for p in p1)
        assert all(per_cat[(c, True)] == per_cat[(c, False)] == 4 for c in "abcd")  # ratio 0.5
        # open-set: whole categories are test
        test_cats = {p.target.category for p in p1 if p.split == "test"}
        assert len(test_cats) == 1 and all(p.split == "test" for p in p1 if p.target.category in test_cats)
        other = plan_pairs(s, PairingConfig(normal_ratio=0.5, seed=2))
        assert [p.reference.path for p in other] != [p.reference.path for p in p1]

    def test_category_rng_independent_of_other_categories(self, tmp_path: Path):
        s = read_mvtec(make_mvtec(tmp_path, categories=("a", "b")))
        cfg = PairingConfig(split="none")
        only_a = [(p.id, p.reference.path) for p in plan_pairs([x for x in s if x.category == "a"], cfg)]
        both = [(p.id, p.reference.path) for p in plan_pairs(s, cfg) if p.target.category == "a"]
        assert only_a == both

    def test_explicit_test_categories_and_pair_split(self, tmp_path: Path):
        s = read_mvtec(make_mvtec(tmp_path))
        p = plan_pairs(s, PairingConfig(test_categories=("cable",)))
        assert {x.target.category for x in p if x.split == "test"} == {"cable"}
        with pytest.raises(ValueError, match="'nope'"):
            plan_pairs(s, PairingConfig(test_categories=("nope",)))
        p = plan_pairs(s, PairingConfig(split="pair", test_fraction=0.5))
        assert Counter(x.split for x in p) == {"train": 6, "test": 4}  # 5 pairs per category, round(2.5) = 2 test

    def test_build_records_boxes_from_masks(self, tmp_path: Path):
        s = read_mvtec(make_mvtec(tmp_path / "m"))
        cfg = PairingConfig(split="none")
        recs = build_pairs(plan_pairs(s, cfg), cfg, progress=False, workers=1)
        by_defect = {r.defect: r for r in recs}
        assert by_defect["crack"].boxes == [[5, 6, 15, 12]]
        assert by_defect["hole"].boxes == [[20, 22, 35, 30], [2, 2, 6, 6]]
        assert by_defect["good"].boxes == [] and by_defect["good"].box == (0, 0, 0, 0)
        cfg = PairingConfig(split="none", box_mode="largest")
        largest = build_pairs(plan_pairs(s, cfg), cfg, progress=False)
        assert {r.defect: r for r in largest}["hole"].boxes == [[20, 22, 35, 30]]
        assert all((r.width, r.height) == (SIZE, SIZE) for r in recs)

    def test_mask_size_mismatch_and_corrupt_image_named(self, tmp_path: Path):
        root = make_mvtec(tmp_path / "m", categories=("a",))
        bad_mask = mask(root / "a" / "ground_truth" / "crack" / "000_mask.png", [(0, 0, 3, 3)], size=(41, 40))
        with pytest.raises(ValueError, match=str(bad_mask)):
            build_pairs(plan_pairs(read_mvtec(root), NONE), NONE, progress=False, workers=1)
        mask(bad_mask, [(0, 0, 3, 3)])
        bad_img = root / "a" / "train" / "good" / "000.png"
        bad_img.write_bytes(b"\x89PNG garbage")
        with pytest.raises(ValueError, match="corrupt.*000.png"):
            build_pairs(plan_pairs(read_mvtec(root), NONE), NONE, progress=False, workers=1)

    def test_empty_mask_pair_dropped_with_warning(self, tmp_path: Path):
        root = make_mvtec(tmp_path / "m", categories=("a",))
        mask(root / "a" / "ground_truth" / "crack" / "000_mask.png", [])
        with pytest.warns(UserWarning, match="000_mask.png"):
            cfg = PairingConfig(split="none", normal_ratio=0)
            recs = build_pairs(plan_pairs(read_mvtec(root), cfg), cfg, progress=False)
        assert len(recs) == 3

    def test_needs_two_normals(self, tmp_path: Path):
        root = make_mvtec(tmp_path / "m", categories=("a",), n_train=1, n_test_good=0)
        with pytest.raises(ValueError, match="'a' needs at least 2 normal"):
            plan_pairs(read_mvtec(root), PairingConfig())
        assert len(plan_pairs(read_mvtec(root), PairingConfig(normal_ratio=0))) == 4

    @pytest.mark.parametrize(
        "kwargs, name",
        [({"normal_ratio": 1.0}, "normal_ratio"), ({"box_mode": "x"}, "box_mode"), ({"split": "x"}, "split"),
         ({"max_side": 64}, "max_side"), ({"synthetic": ("blur",)}, "synthetic")],
    )
    def test_config_validation(self, kwargs, name):
        with pytest.raises(ValueError, match=name):
            PairingConfig(**kwargs)


class TestBuildDir:
    def test_copy_resize_synthetic_hf_and_determinism(self, tmp_path: Path):
        s = read_mvtec(make_mvtec(tmp_path / "m", categories=("a",)))
        cfg = PairingConfig(
            split="pair", copy_images=True, max_side=20, synthetic=("perlin", "cutpaste"), synthetic_per_category=2
        )
        tex = default_textures()[:2]
        out1 = build_pair_dir(s, tmp_path / "o1", cfg, textures=tex, progress=False, workers=1, hf_dataset=True)
        out2 = build_pair_dir(s, tmp_path / "o2", cfg, textures=tex, progress=False, workers=2)
        recs = load_pairs(out1)
        assert out1.read_bytes() == out2.read_bytes()
        for r in recs:
            assert Path(r.reference).is_file() and str(tmp_path / "o1") in r.target
            with Image.open(r.target) as im:
                assert im.size == (20, 20) == (r.width, r.height)
            assert r.boxes or r.is_normal
        c = Counter(r.defect for r in recs)
        assert c["synthetic_perlin"] == 2 and c["synthetic_cutpaste"] == 2
        crack = next(r for r in recs if r.defect == "crack")
        assert crack.boxes == [[2, 3, 8, 6]]  # [5, 6, 15, 12] · 0.5, outward rounded
        import datasets

        assert from_hf_dataset(datasets.load_from_disk(str(tmp_path / "o1" / "hf_dataset"))) == recs
        for r in recs:
            if r.defect.startswith("synthetic"):
                # the change is inside the box (synthetic target vs. its untouched base image)
                assert r.boxes and all(0 <= b[0] < b[2] <= 20 for b in r.boxes)
        info = json.loads((tmp_path / "o1" / "build.json").read_text())
        assert info["n_pairs"] == len(recs)

    def test_copy_without_resize_copies_bytes(self, tmp_path: Path):
        s = read_visa(make_visa(tmp_path / "v", categories=("candle",)))
        out = build_pair_dir(s, tmp_path / "o", PairingConfig(split="none", copy_images=True), progress=False, workers=1)
        recs = load_pairs(out)
        originals = {x.path.name: x.path.read_bytes() for x in s}
        for r in recs:
            assert r.target.startswith(str(tmp_path / "o" / "images"))
            assert Path(r.target).suffix == ".jpg"  # the original format, lower-cased extension
            assert Path(r.target).read_bytes() in originals.values()

    def test_refuses_foreign_dir_and_leaves_no_partial_output(self, tmp_path: Path):
        s = read_mvtec(make_mvtec(tmp_path / "m", categories=("a",)))
        out = tmp_path / "o"
        out.mkdir()
        (out / "notes.txt").write_text("x")
        with pytest.raises(ValueError, match="refusing"):
            build_pair_dir(s, out, PairingConfig(split="none"), progress=False)
        bad = tmp_path / "m" / "a" / "test" / "crack" / "001.png"
        bad.write_bytes(b"junk")
        with pytest.raises(ValueError, match="001.png"):
            build_pair_dir(s, tmp_path / "o2", PairingConfig(split="none", copy_images=True), progress=False, workers=1)
        assert not (tmp_path / "o2").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def _data_cli(argv: list[str]) -> int:
    import argparse

    from differad_rl.data import cli as data_cli

    parser = argparse.ArgumentParser(prog="differad-rl")
    data_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


@pytest.mark.parametrize("layout, maker", [("mvtec", make_mvtec), ("visa", make_visa), ("loco", make_loco), ("folder", make_folder)])
def test_cli_build_pairs(tmp_path: Path, layout, maker, capsys):
    root = maker(tmp_path / "data")
    out = tmp_path / "out"
    assert _data_cli(["build-pairs", "--layout", layout, "--root", str(root), "--out", str(out), "--quiet", "--split", "pair"]) == 0
    recs = load_pairs(out / "pairs.jsonl")
    assert recs and all(r.source for r in recs) and any(not r.is_normal for r in recs)
    assert "pairs" in capsys.readouterr().out


def test_cli_build_pairs_error_is_reported(tmp_path: Path, capsys):
    assert _data_cli(["build-pairs", "--layout", "mvtec", "--root", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "missing" in capsys.readouterr().err


@settings(max_examples=40, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["a", "b", "c", "d"]),
        st.tuples(st.integers(2, 9), st.integers(0, 3), st.integers(0, 9)),
        min_size=1,
    ),
    st.floats(0.0, 0.9),
    st.integers(0, 2**31),
    st.randoms(use_true_random=False),
)
def test_plan_invariants(spec, ratio, seed, shuffler):
    """Whatever the data: references are other normal images of the target's category, ids are
    unique, the normal share follows the formula, and input order does not matter."""
    samples = []
    for cat, (n_train, n_test_good, n_anom) in spec.items():
        samples += [Sample(Path(f"/d/{cat}/train/{i}.png"), cat, "good", "train", "fake") for i in range(n_train)]
        samples += [Sample(Path(f"/d/{cat}/test/g{i}.png"), cat, "good", "test", "fake") for i in range(n_test_good)]
        samples += [Sample(Path(f"/d/{cat}/test/x{i}.png"), cat, "x", "test", "fake", (Path("/m"),)) for i in range(n_anom)]
    cfg = PairingConfig(normal_ratio=ratio, seed=seed)
    plans = plan_pairs(samples, cfg)
    shuffled = list(samples)
    shuffler.shuffle(shuffled)
    assert [(p.id, p.reference.path, p.split) for p in plan_pairs(shuffled, cfg)] == [
        (p.id, p.reference.path, p.split) for p in plans
    ]
    assert len({p.id for p in plans}) == len(plans)
    for p in plans:
        assert p.reference.is_normal and p.reference.split == "train"
        assert p.reference.category == p.target.category and p.reference.path != p.target.path
    for cat, (_, _, n_anom) in spec.items():
        n_norm = sum(p.target.is_normal for p in plans if p.target.category == cat)
        assert n_norm == (round(n_anom * ratio / (1 - ratio)) if n_anom else 0)


# --- relative roots, interruptions, leftovers, file modes --------------------------------


def test_relative_root_writes_paths_that_resolve_from_the_pairs_file(tmp_path: Path, monkeypatch):
    make_mvtec(tmp_path / "data" / "m", categories=("a",))
    monkeypatch.chdir(tmp_path / "data")
    assert _data_cli(["build-pairs", "--layout", "mvtec", "--root", "m", "--out", str(tmp_path / "out"), "--quiet",
                      "--split", "none"]) == 0
    monkeypatch.chdir(tmp_path)  # read from elsewhere: the paths must not depend on the folder of the build
    recs = load_pairs(tmp_path / "out" / "pairs.jsonl")
    assert recs and all(Path(r.reference).is_file() and Path(r.target).is_file() for r in recs)
    samples = read_layout("mvtec", Path("data") / "m")
    assert all(Path(s.path).is_absolute() for s in samples)


def test_ctrl_c_is_reported_without_traceback_and_leaves_nothing(tmp_path: Path, monkeypatch, capsys):
    from differad_rl.data import pairing

    root = make_mvtec(tmp_path / "m", categories=("a",))

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pairing, "build_pairs", interrupt)
    code = _data_cli(["build-pairs", "--layout", "mvtec", "--root", str(root), "--out", str(tmp_path / "o"), "--quiet"])
    assert code == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_out_that_is_a_file_is_an_error_not_a_traceback(tmp_path: Path, capsys):
    root = make_mvtec(tmp_path / "m", categories=("a",))
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        assert _data_cli(["build-pairs", "--layout", "mvtec", "--root", str(root), "--out", str(out), "--quiet"]) == 2
        assert "error" in capsys.readouterr().err


def test_leftovers_of_a_killed_build_are_removed_by_the_next_run(tmp_path: Path):
    import subprocess
    import sys

    from differad_rl.data.atomic import atomic_directory, atomic_write_text, clean_stale_temporaries

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale_dir = tmp_path / f".tmp-out.{dead.pid}.abc"
    (stale_dir / "images").mkdir(parents=True)
    stale_old = tmp_path / f".old-out.{dead.pid}.xyz"
    stale_old.mkdir()
    stale_file = tmp_path / f".tmp-pairs.jsonl.{dead.pid}.q"
    stale_file.write_text("half")
    live = tmp_path / f".tmp-out.{1}.live"  # pid 1 always runs: a concurrent writer's temporary
    live.mkdir()
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "x").write_text("1")
    assert not stale_dir.exists() and not stale_old.exists() and live.exists()
    atomic_write_text(tmp_path / "pairs.jsonl", "{}\n")
    assert not stale_file.exists()
    assert clean_stale_temporaries(tmp_path / "out") == []


def test_outputs_honour_the_umask(tmp_path: Path):
    import os

    from differad_rl.data.atomic import atomic_directory, atomic_write_text

    old = os.umask(0o027)
    try:
        f = atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_directory(tmp_path / "d") as tmp:
            (tmp / "y").write_text("y")
        plain = tmp_path / "plain"
        plain.write_text("z")
        (tmp_path / "plaind").mkdir()
    finally:
        os.umask(old)
    assert f.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "d").stat().st_mode & 0o777 == (tmp_path / "plaind").stat().st_mode & 0o777 == 0o750
