"""The TRL example scripts run end to end (subprocess, tiny settings) and write checkpoint + PNG;
the ``--paper`` preset carries docs/method.md §1's hyperparameters."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "trl"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(script: str, *args: str, timeout: int = 600) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(ROOT))
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def _checkpoint_ok(ckpt: Path) -> None:
    from differad_rl.integrations.qwen_vl.tiny import load_tiny_qwen_vl

    assert (ckpt / "model.safetensors").is_file() and (ckpt / "processor_config.json").is_file()
    model, processor = load_tiny_qwen_vl(ckpt)  # asserts a real multimodal processor
    assert model.config.model_type == "qwen2_5_vl"


@pytest.mark.slow
def test_sft_then_grpo_end_to_end(tmp_path):
    sft_dir, grpo_dir = tmp_path / "sft", tmp_path / "grpo"
    out = _run("sft_cold_start.py", "--output-dir", str(sft_dir), "--max-steps", "2", "--demo-pairs", "8",
               "--batch-size", "2", "--quiet")
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["first_loss"] > 0
    assert (sft_dir / "sft_loss.png").read_bytes()[:8] == PNG_MAGIC
    _checkpoint_ok(sft_dir / "checkpoint")

    # GRPO from the cold-start checkpoint, on the same embedded demo pairs
    out = _run("train_grpo.py", "--model", str(sft_dir / "checkpoint"), "--output-dir", str(grpo_dir),
               "--max-steps", "2", "--demo-pairs", "8", "--max-completion-length", "8")
    assert "DifferADGRPOTrainer: G=4 weights=True resample K=1 steps=2" in out
    assert "step  reward   dclr  format   mIoU" in out
    rows = [json.loads(line) for line in (grpo_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("reward", "dclr", "format", "miou", "acc@0.3"):
            assert 0.0 <= r[key] <= 1.0 + 1e-6, (key, r)
        assert 1.0 <= r["weight_mean"] <= r["weight_max"] <= 2.07
        assert 0.0 <= r["degenerate_after"] <= r["degenerate_before"] <= 1.0
        assert r["rounds_used"] in (0, 1)
        assert r["seconds"] > 0  # each logged step's wall time
    assert (grpo_dir / "reward_curve.png").read_bytes()[:8] == PNG_MAGIC
    _checkpoint_ok(grpo_dir / "checkpoint")


@pytest.fixture()
def grpo_script(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return importlib.import_module("train_grpo")


def test_paper_preset_is_design_section_1(grpo_script, tmp_path):
    args = grpo_script.parse_args(["--paper", "--model", "Qwen/Qwen2.5-VL-3B-Instruct", "--data", "pairs.jsonl"])
    cfg = grpo_script.build_config(args, tmp_path, tiny=False, reward_names=["dclr", "format"])
    assert (cfg.num_generations, cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps) == (8, 8, 2)
    assert cfg.num_train_epochs == 1.0 and cfg.max_steps == -1
    assert cfg.beta == 0.04 and cfg.mask_truncated_completions is True
    assert (cfg.loss_type, cfg.epsilon, cfg.epsilon_high) == ("dapo", 0.2, 0.28)
    assert cfg.difficulty_weighting is True and cfg.resample_rounds == 1
    assert cfg.localization_reward == "dclr_reward"
    assert cfg.reward_weights == [1.0, 1.0, 0.0]  # the rollout-mIoU metric carries no reward
    # the real loading path is in the script (not a stub)
    src = (ROOT / "integrations" / "qwen_vl" / "loading.py").read_text()
    assert "AutoModelForImageTextToText.from_pretrained(" in src and "AutoProcessor.from_pretrained(" in src
    assert "1003520" in (EXAMPLES / "train_grpo.py").read_text()


def test_default_run_is_the_learner_recipe(grpo_script, tmp_path):
    args = grpo_script.parse_args([])
    model, cold, learner = grpo_script.resolve_start(args, tmp_path)
    assert learner is True
    if (grpo_script.SHIPPED_COLD_START / "model.safetensors").is_file():
        assert (model, cold) == (str(grpo_script.SHIPPED_COLD_START), 0)  # the shipped cold start, RL only
    cfg = grpo_script.build_config(args, tmp_path, tiny=True, reward_names=["dclr", "format"], learner=True)
    assert (cfg.num_generations, cfg.per_device_train_batch_size, cfg.max_steps) == (8, 32, 100)
    assert cfg.resample_rounds == 2 and cfg.difficulty_weighting is True and cfg.use_cpu is True
    # TRL's bf16 / gradient-checkpointing defaults (on everywhere) do not leak into the CPU main job
    assert cfg.bf16 is False and cfg.gradient_checkpointing is False
    gc_on = grpo_script.build_config(grpo_script.parse_args(["--gradient-checkpointing"]), tmp_path, tiny=True,
                                     reward_names=["dclr", "format"], learner=True)
    assert gc_on.gradient_checkpointing is True and gc_on.bf16 is False
    own = grpo_script.resolve_start(grpo_script.parse_args(["--model", "m", "--recipe", "learner"]), tmp_path)
    assert own == ("m", 0, True)
    assert grpo_script.resolve_start(grpo_script.parse_args(["--model", "tiny"]), tmp_path) == ("tiny", 150, False)


def test_tiny_defaults_and_switches(grpo_script, tmp_path):
    args = grpo_script.parse_args([])
    cfg = grpo_script.build_config(args, tmp_path, tiny=True, reward_names=["dclr", "format"])
    assert cfg.use_cpu is True and cfg.bf16 is False
    assert (cfg.num_generations, cfg.max_steps, cfg.max_completion_length) == (4, 6, 32)
    plain = grpo_script.build_config(grpo_script.parse_args(["--plain-grpo"]), tmp_path, tiny=True,
                                     reward_names=["iou"])
    assert plain.difficulty_weighting is False and plain.resample_rounds == 0
    assert plain.localization_reward == "iou_reward"


def test_pixel_budget_reaches_processor_and_reward_space(tmp_path, monkeypatch):
    """--max-pixels on a loaded processor changes what the model sees AND the rewards' space."""
    from PIL import Image

    from differad_rl.coords import smart_resize
    from differad_rl.integrations.trl import coordinate_spec

    monkeypatch.syspath_prepend(str(EXAMPLES))
    sft = importlib.import_module("sft_cold_start")
    _, processor = sft.load_model_and_processor("tiny", cache_dir=tmp_path)
    sft.set_pixel_budget(processor, 28 * 28 * 4, 1003520)
    spec = coordinate_spec(processor)
    assert (spec.min_pixels, spec.max_pixels) == (28 * 28 * 4, 1003520)
    out = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[Image.new("RGB", (900, 700))],
                    return_tensors="pt")
    _, gh, gw = out["image_grid_thw"][0].tolist()
    assert (gh * 14, gw * 14) == smart_resize(700, 900, 28, spec.min_pixels, spec.max_pixels) == (700, 896)


def test_accelerate_config_is_deepspeed_zero2_bf16():
    yaml = pytest.importorskip("yaml")
    cfg = yaml.safe_load((EXAMPLES / "accelerate_zero2.yaml").read_text())
    assert cfg["distributed_type"] == "DEEPSPEED" and cfg["deepspeed_config"]["zero_stage"] == 2
    assert cfg["mixed_precision"] == "bf16" and cfg["use_cpu"] is False
    assert "accelerate_zero2.yaml" in (EXAMPLES / "train_grpo.py").read_text()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_sft_targets_score_full_reward(family, tmp_path, monkeypatch):
    """The cold start teaches exactly what the GRPO rewards pay for, in each family's space."""
    from PIL import Image

    from differad_rl.data.records import PairRecord
    from differad_rl.integrations.qwen_vl.tiny import load_tiny_processor, tiny_model_for
    from differad_rl.integrations.trl import differad_rewards, pairs_to_rows

    monkeypatch.syspath_prepend(str(EXAMPLES))
    sft = importlib.import_module("sft_cold_start")
    processor = load_tiny_processor(tiny_model_for(family, cache_dir=tmp_path / "tiny"))
    recs = []
    for i, (w, h, boxes) in enumerate([(640, 480, [[100, 60, 300, 200]]), (333, 517, [[5, 7, 40, 90]]),
                                       (120, 90, [])]):
        for part in ("r", "t"):
            Image.new("RGB", (w, h)).save(tmp_path / f"{i}{part}.png")
        recs.append(PairRecord(id=str(i), reference=str(tmp_path / f"{i}r.png"),
                               target=str(tmp_path / f"{i}t.png"), boxes=boxes, width=w, height=h, category="c"))
    rows = sft.sft_rows(recs, processor)
    completions = [r["completion"][0]["content"][0]["text"] for r in rows]
    grpo_rows = pairs_to_rows(recs)
    kw = {k: [r[k] for r in grpo_rows] for k in ("solution", "boxes", "image_size", "images")}
    dclr, fmt = differad_rewards(processor, names=("dclr", "format"))
    assert fmt(completions=completions, **kw) == [1.0, 1.0, 1.0]
    scores = dclr(completions=completions, **kw)
    assert scores[2] == 1.0 and all(s > 0.97 for s in scores[:2])  # only integer rounding is lost


def test_real_loading_path_refuses_a_bare_tokenizer(tmp_path, monkeypatch):
    """The hub/folder path (AutoModelForImageTextToText / AutoProcessor) runs here on a local folder
    without the tiny manifest: AutoProcessor falls back to the tokenizer, and the script refuses."""
    import shutil

    from differad_rl.integrations.qwen_vl.tiny import tiny_model_for

    monkeypatch.syspath_prepend(str(EXAMPLES))
    sft = importlib.import_module("sft_cold_start")
    folder = tmp_path / "plain"
    shutil.copytree(tiny_model_for("qwen2_vl", cache_dir=tmp_path / "tiny"), folder)
    (folder / "tiny_build.json").unlink()
    with pytest.raises(ValueError, match="not a multimodal processor"):
        sft.load_model_and_processor(str(folder))


def test_a_split_typo_is_an_error_not_every_record(grpo_script, tmp_path):
    """--split tset (a typo) must never train on every pair, held-out ones included."""
    sft = importlib.import_module("sft_cold_start")
    with pytest.raises(ValueError, match=r"--split 'tset'.*splits present: 'test' \(\d+\), 'train'"):
        sft.demo_or_data(None, tmp_path, n_pairs=8, size=32, seed=0, split="tset")
    assert {r.split for r in sft.demo_or_data(None, tmp_path, n_pairs=8, size=32, seed=0, split="test")} == {"test"}
