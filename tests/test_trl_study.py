"""examples/trl/study.py: the arms reach the trainer as configured, the equal-generation-budget rule counts
regenerations, ``--quick`` writes the table, the curves, the per-run files and their archive, and reruns skip finished runs
(restoring them from the archive when the folders are gone)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("trl")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "trl"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: plumbing settings: 2 groups of G = 4 per step, short completions
TRAIN_ARGS = "--batch-size 8 --num-generations 4 --max-completion-length 16"


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(EXAMPLES))
    try:
        yield importlib.import_module("study")
    finally:
        sys.path.remove(str(EXAMPLES))


def test_every_arm_builds_its_trainer_config(study, tmp_path):
    """Each arm's options go through train_grpo's parser and build_config (the peers' fields validated)."""
    import train_grpo

    expected = {
        "iou": {"localization_reward": "iou_reward"},
        "dclr_sides_enclosing": {"resample_rounds": 2, "difficulty_weighting": True},
        "no_weights": {"difficulty_weighting": False},
        "no_resampling": {"resample_rounds": 0, "group_filter": None},
        "emit_reroll": {"resample_rounds": 2, "degeneracy_rule": "emit", "correct_threshold": 0.5},
        "dapo_filter": {"resample_rounds": 0, "group_filter": "dapo", "group_filter_refill_rounds": 2},
        "dapo_drop": {"resample_rounds": 0, "group_filter": "dapo", "group_filter_refill_rounds": 0},
        "easyr1_filter": {"resample_rounds": 0, "group_filter": "easyr1", "group_filter_refill_rounds": 2},
        "emit_weights": {"advantage_weighting": "emit", "difficulty_weighting": False, "correct_threshold": 0.5},
        "univg_weights": {"advantage_weighting": "univg", "univg_form": "exp", "difficulty_weighting": False},
    }
    for name, arm in {**study.ARMS, **study.EXTRA_ARMS}.items():
        args = train_grpo.parse_args(["--recipe", "learner", *arm.argv()])
        names = args.rewards.split(",")
        cfg = train_grpo.build_config(args, tmp_path, tiny=True, reward_names=names, learner=True)
        for field, value in expected.get(name, {}).items():
            assert getattr(cfg, field) == value, (name, field)
        assert cfg.per_device_train_batch_size == 32 and cfg.num_generations == 8, name
    assert train_grpo.config_overrides(["correct_threshold=0.5", "group_filter=null", "univg_form=exp"]) == {
        "correct_threshold": 0.5, "group_filter": None, "univg_form": "exp"}
    with pytest.raises(SystemExit, match="not_a_field"):
        train_grpo.config_overrides(["not_a_field=1"])
    with pytest.raises(SystemExit, match="unknown arm 'nope'"):
        study.arms_by_name(["iou", "nope"])


def test_budget_counts_regenerated_and_refilled_groups(study, tmp_path):
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    cb = study.make_budget_callback(100, tmp_path / "curve.jsonl")
    args = SimpleNamespace(logging_steps=1, steps_per_generation=1, per_device_train_batch_size=32, world_size=1,
                           num_generations=8)
    state, control = TrainerState(), TrainerControl()
    cb.on_train_begin(args, state, control)
    cb.on_log(args, state, control, logs={"reward": 0.1, "differad/regenerations": 1.0, "differad/refills": 2.0})
    assert cb.rows[-1]["sampled"] == 32 + 3 * 8 and not control.should_training_stop
    cb.on_log(args, state, control, logs={"reward": 0.1})
    assert cb.generations == 56 + 32 and not control.should_training_stop
    cb.on_log(args, state, control, logs={"reward": 0.1, "differad/refills": 1.0})
    assert cb.generations == 128 and control.should_training_stop


def test_box_shape_stats_by_hand(study):
    # 100 × 100 images: a 20 × 10 box on a 10 × 10 defect, a full-image box, the zero box on a normal
    # target, an unparsable answer on a defect
    pred = [[0, 0, 20, 10], [0, 0, 100, 100], [0, 0, 0, 0], [np.nan] * 4]
    valid = [True, True, True, False]
    gt = [[[5, 5, 15, 15]], [[0, 0, 50, 25], [0, 0, 5, 5]], [], [[1, 1, 3, 3]]]
    s = study.box_shape_stats(pred, valid, gt, [100] * 4, [100] * 4)
    assert s["area_ratio_median"] == pytest.approx(np.median([200 / 100, 10000 / 1250]))
    assert s["aspect_median"] == pytest.approx(np.median([2.0, 1.0]))
    assert s["aspect_median_gt"] == pytest.approx(np.median([1.0, 2.0, 1.0]))
    assert s["full_image_share"] == 0.25 and s["zero_box_share"] == 0.25
    assert s["normal_share"] == 0.25 and s["invalid_share"] == 0.25
    empty = study.box_shape_stats(np.zeros((0, 4)), [], [], [], [])
    assert empty["area_ratio_median"] is None and empty["full_image_share"] == 0.0


def test_quick_refuses_the_committed_results(study):
    with pytest.raises(SystemExit, match="committed results"):
        study.main(["--quick", "--out", str(study.RESULTS)])


def test_quick_study_on_the_tiny_model(study, tmp_path, capsys):
    from differad_rl.integrations.qwen_vl.tiny import tiny_model_for

    model = tiny_model_for("qwen2_5_vl", cache_dir=tmp_path / "tiny")
    out, budget = tmp_path / "study", 40
    argv = ["--quick", "--model", str(model), "--out", str(out), "--data-dir", str(tmp_path / "data"),
            "--budget", str(budget), "--arms", "iou,no_resampling", "--train-args", TRAIN_ARGS]
    assert study.main(argv) == 0
    assert "estimated wall time on 2 cores" in capsys.readouterr().out

    for arm in ("iou", "no_resampling"):
        run = out / arm / "0"
        curve = [json.loads(line) for line in (run / "curve.jsonl").read_text().splitlines()]
        logged = [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]
        assert len(curve) == len(logged) >= 1
        total = 0
        for row, log in zip(curve, logged, strict=True):
            # the step's batch plus every regenerated group (G = 4 completions each)
            resampled = 0 if arm == "no_resampling" else log["groups_resampled"] * log["rounds_used"]
            if log["degenerate_after"] == 1.0:  # every group regenerated in every round it was resampled
                assert row["regenerated"] == resampled * 4
            assert row["sampled"] == 8 + row["regenerated"]
            total += row["sampled"]
            assert row["generations"] == total
        # stopped at the first step whose count reached the budget
        assert total >= budget > total - curve[-1]["sampled"]
        result = json.loads((run / "result.json").read_text())
        assert result["generations"] == total and result["steps"] == len(curve)
        assert result["regenerated"] == sum(r["regenerated"] for r in curve)
        assert set(result["overall"]) >= {"miou", "acc", "f1"} and "area_ratio_median" in result["shape"]
        from differad_rl.data.records import load_pairs

        held_out = [r.id for r in load_pairs(result["key"]["data"]) if r.split == "test"]
        lines = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
        assert [x["id"] for x in lines] == held_out and len(held_out) == 10  # quick: 40 pairs, a quarter held out
        assert not (run / "train" / "checkpoint").exists()  # the checkpoint is not kept by default
    no_res = json.loads((out / "no_resampling" / "0" / "result.json").read_text())
    assert no_res["regenerated"] == 0 and no_res["steps"] == budget // 8
    iou = json.loads((out / "iou" / "0" / "result.json").read_text())
    assert iou["regenerated"] > 0 and iou["steps"] < no_res["steps"]  # the random model's groups are all degenerate

    summary = json.loads((out / "study.json").read_text())
    assert [r["arm"] for r in summary["rows"]] == ["cold start", "iou", "no_resampling"]
    assert summary["rows"][2]["generations"]["mean"] == budget and summary["budget"] == budget
    md = (out / "study.md").read_text()
    assert "| arm | mIoU | Acc@0.3 | F1@0.3 |" in md and "| no_resampling |" in md and "QUICK" in md
    for png in ("curves.png", "heldout.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    assert (out / "cold_start" / "result.json").is_file()

    # resumable: a second call skips the finished runs and leaves their results untouched
    before = {arm: (out / arm / "0" / "result.json").stat().st_mtime_ns for arm in ("iou", "no_resampling")}
    assert study.main(argv) == 0
    assert "2 finished run(s) skipped; 0 to run" in capsys.readouterr().out
    assert before == {arm: (out / arm / "0" / "result.json").stat().st_mtime_ns for arm in ("iou", "no_resampling")}

    # the raw runs are in runs.tar.xz: a folder holding only the summary and the archive resumes from it
    import shutil
    import tarfile

    with tarfile.open(out / study.RUNS_ARCHIVE) as tar:
        names = set(tar.getnames())
    assert {"cold_start/result.json", "iou/0/result.json", "no_resampling/0/predictions.jsonl"} <= names
    for name in ("cold_start", "iou", "no_resampling"):
        shutil.rmtree(out / name)
    assert study.main(argv) == 0
    assert "2 finished run(s) skipped; 0 to run" in capsys.readouterr().out
    assert (out / "iou" / "0" / "curve.jsonl").read_text() and (out / "cold_start" / "result.json").is_file()


def test_runs_archive_round_trip_keeps_files_on_disk(study, tmp_path):
    """pack_runs archives only the named folders; unpack_runs restores missing files and keeps existing ones."""
    for name, text in (("a/0/result.json", "a0"), ("a/1/result.json", "a1"), ("cold_start/result.json", "c"),
                       ("other/x.json", "x")):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    study.pack_runs(tmp_path, ["a", "cold_start", "absent"])
    (tmp_path / "a" / "0" / "result.json").unlink()
    (tmp_path / "a" / "1" / "result.json").write_text("edited")
    (tmp_path / "cold_start" / "result.json").unlink()
    assert study.unpack_runs(tmp_path) == ["a", "cold_start"]
    assert (tmp_path / "a" / "0" / "result.json").read_text() == "a0"
    assert (tmp_path / "a" / "1" / "result.json").read_text() == "edited"  # on disk wins
    assert (tmp_path / "cold_start" / "result.json").read_text() == "c"
    assert study.unpack_runs(tmp_path / "a") == []  # no archive there


def test_results_section_is_rewritten_between_the_markers(study, tmp_path):
    doc = study.STUDY_MD.read_text()
    assert doc.count(study.BEGIN) == 1 and doc.count(study.END) == 1  # the full run can regenerate it
    path = tmp_path / "STUDY.md"
    path.write_text(f"# t\n\nintro\n\n{study.BEGIN}\nold table\n{study.END}\n\nafter\n")
    study.update_results_section(path, "| arm | mIoU |\n|---|---|\n| iou | 0.1 |\n")
    new = path.read_text()
    assert "old table" not in new and "| iou | 0.1 |" in new and new.startswith("# t\n\nintro")
    assert new.endswith(f"{study.END}\n\nafter\n") and "study_results/curves.png" in new
    path.write_text("no markers\n")
    with pytest.raises(ValueError, match="markers"):
        study.update_results_section(path, "x")
