"""The CPU-runnable parts of the GPU benchmark (examples/trl/gpu_bench.py): the full-size
Qwen2.5-VL-3B fixture's architecture, and the script itself end to end on the tiny hub fixture."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from differad_rl.integrations.testing import FULL_SIZES, build_hub_fixture, hub_config  # noqa: E402
from differad_rl.integrations.qwen_vl.tiny import QWEN_SPECIAL_TOKENS  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "trl"
REPO = "Qwen/Qwen2.5-VL-3B-Instruct"


def test_full_size_fixture_is_the_published_architecture(tmp_path):
    from transformers import AutoConfig, AutoModelForImageTextToText

    ids = {t: i for i, t in enumerate(QWEN_SPECIAL_TOKENS)}
    (tmp_path / "config.json").write_text(json.dumps(hub_config(REPO, ids, 600, full_size=True)))
    config = AutoConfig.from_pretrained(tmp_path)
    with torch.device("meta"):  # the architecture only: no 15 GB of weights on a CPU test
        model = AutoModelForImageTextToText.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for p in model.model.visual.parameters())
    assert total == 3_754_622_976  # 3.755 B, as measured on the H200 (shared/notes/gpu-scale.md)
    assert vision == 668_684_288
    assert (config.text_config.num_hidden_layers, config.text_config.hidden_size,
            config.text_config.vocab_size) == (36, 2048, 151936)
    assert (config.vision_config.depth, config.vision_config.hidden_size) == (32, 1280)
    tiny = hub_config(REPO, ids, 600)
    assert tiny["hidden_size"] == 64 and tiny["vision_config"]["depth"] == 4  # the default stays tiny
    for repo in ("Qwen/Qwen2-VL-2B-Instruct", "Qwen/Qwen3-VL-2B-Instruct"):
        assert repo not in FULL_SIZES
        with pytest.raises(ValueError, match="full_size"):
            build_hub_fixture(repo, tmp_path / "x", full_size=True)


def test_full_size_build_path(tmp_path, monkeypatch):
    """build_hub_fixture(full_size=True) end to end with the recorded sizes swapped for small ones (the real
    ones are 7.5 GB): the sizes land in config.json, the weights are bf16, and the build has its own manifest."""
    from differad_rl.integrations import testing

    small = {"hidden_size": 96, "num_hidden_layers": 3, "intermediate_size": 160, "vocab_size": 4096,
             "vision_config": {"depth": 5, "hidden_size": 48, "num_heads": 3, "out_hidden_size": 96,
                               "fullatt_block_indexes": [4]}}
    monkeypatch.setitem(testing.FULL_SIZES, REPO, small)
    folder = build_hub_fixture(REPO, tmp_path / "full", full_size=True)
    config = json.loads((folder / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (96, 3, 4096)
    assert config["vision_config"]["depth"] == 5 and config["torch_dtype"] == "bfloat16"
    assert json.loads((folder / "hub_fixture.json").read_text())["full_size"] is True
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    tiny = build_hub_fixture(REPO, tmp_path / "full")  # same folder, other arguments: rebuilt tiny
    assert json.loads((tiny / "config.json").read_text())["hidden_size"] == 64


@pytest.fixture()
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return importlib.import_module("gpu_bench")


@pytest.mark.slow
def test_gpu_bench_runs_on_cpu_with_the_tiny_fixture(bench, tmp_path, monkeypatch):
    """The whole script on CPU (tiny hub fixture, 64 px, 1 step per variant): per-step rows for both
    variants, each distinct image encoded once per generation batch with the cache on, no tower in backward."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    fixture = build_hub_fixture(REPO, tmp_path / "fixture")
    summary = bench.main(["--work", str(tmp_path / "work"), "--model", str(fixture), "--steps", "1",
                          "--demo-size", "64", "--demo-pairs", "8", "--max-completion-length", "4",
                          "--train-arg=--num-generations=4", "--train-arg=--batch-size=4"])
    on, off = summary["runs"]["cache=on"], summary["runs"]["cache=off"]
    assert on["cache_on"] and not off["cache_on"]
    assert len(on["steps"]) == len(off["steps"]) == 1
    # --paper: gradient accumulation 2, so one generation batch = 2 x 4 rows = 2 prompts x G 4 = 4 images
    assert on["steps"][0]["tower_images"] == 4 and on["steps"][0]["tower_calls"] == 1
    assert off["steps"][0]["tower_images"] > 4 * 4
    assert on["steps"][0]["tower_backward_calls"] == off["steps"][0]["tower_backward_calls"] == 0
    assert summary["ratios"]["tower_off_over_on"] > 1.0
    assert json.loads((tmp_path / "work" / "bench.json").read_text())["steps"] == 1
    with pytest.raises(SystemExit, match="variants"):
        bench.variants(bench.parse_args(["--variants", "maybe"]))


def test_vllm_variants_and_their_model_folder(bench, tmp_path):
    """--use-vllm adds each variant again through vLLM colocate, on a copy of the folder that carries the paper's
    pixel budget (vLLM builds its own processor from the folder); the weights are linked, not copied."""
    from differad_rl.integrations.qwen_vl.loading import load_processor, pixel_budget

    labels = [label for label, _ in bench.variants(bench.parse_args(["--use-vllm"]))]
    assert labels == ["cache=on", "cache=off", "cache=on vllm", "cache=off vllm"]
    extra = dict(bench.variants(bench.parse_args(["--use-vllm"])))["cache=on vllm"]
    assert extra[extra.index("--vllm-mode") + 1] == "colocate"
    fixture = build_hub_fixture(REPO, tmp_path / "fixture")
    copy = bench.folder_for_vllm(fixture, tmp_path / "vllm")
    assert pixel_budget(load_processor(str(copy)))[1] == 1003520 != pixel_budget(load_processor(str(fixture)))[1]
    weights = copy / "model.safetensors"
    assert weights.is_symlink() and weights.resolve() == (fixture / "model.safetensors").resolve()
