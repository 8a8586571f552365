"""The TRL example's ``--paper`` configuration on hub-shaped fixtures: ``train_grpo.py --paper
--model <folder laid out like Qwen/Qwen2.5-VL-3B-Instruct>`` runs through its own ``main(argv)`` on CPU
for 2 optimizer steps, loading the folder through the product loader (no torchvision here: the
image-only processor), and saves a checkpoint that loads again.

CPU-sized overrides, each only where the GPU is the reason: ``--max-steps 2`` (the paper runs one epoch
of a real data set). Everything else is the ``--paper`` branch's: G = 8, 8 completions per device,
gradient accumulation 2 (16 completions = 2 prompts per optimizer step), lr 1e-6, β = 0.04, DAPO loss,
512 completion tokens, DCLR + format rewards, difficulty weights, K = 1 resampling, frozen vision tower,
``max_pixels`` = 1,003,520; bf16 is off because ``build_config`` turns it off without CUDA (and the
weights are fp32 in any case: bf16 means autocast over fp32 master weights).
"""

from __future__ import annotations

import dataclasses
import json
import importlib
import math
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("trl")

from differad_rl.integrations.qwen_vl import loading  # noqa: E402
from differad_rl.integrations.testing import HUB_FILES, family_of, hub_fixture_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "trl"
PAPER_MAX_PIXELS = 1003520

#: The repositories run here: Qwen2.5-VL (the paper's model) and Qwen3-VL (another image processor
#: budget and patch size 16). Qwen2-VL shares Qwen2.5-VL's processor and loss path.
REPOS = ("Qwen/Qwen2.5-VL-3B-Instruct", "Qwen/Qwen3-VL-2B-Instruct")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """12 demo pairs of 64 px (9 train, 3 test): enough prompts for 2 optimizer steps of 2 prompts."""
    from differad_rl.data.demo import build_demo_pairs

    return build_demo_pairs(tmp_path_factory.mktemp("demo"), n_pairs=12, size=64, seed=0, workers=1, progress=False)


class _Capture:
    """A TrainerCallback keeping what the trainer was really given (args, model, processor, optimizer)."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        seen: dict[str, Any] = {}
        self.seen = seen

        class _CB(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):  # noqa: D401
                seen.update(args=args, model=kw["model"], processor=kw["processing_class"],
                            optimizer=kw["optimizer"])
                seen["dtypes"] = {p.dtype for p in kw["model"].parameters()}
                seen["visual_trainable"] = [n for n, p in kw["model"].named_parameters()
                                            if "visual" in n and p.requires_grad]
                seen["trainable"] = sum(p.numel() for p in kw["model"].parameters() if p.requires_grad)

        self.callback = _CB()


def _expected_config(output_dir: str) -> Any:
    """DifferADGRPOConfig.paper(...) with the script's run-bookkeeping settings, the --paper branch's
    lr / completion length, what CPU changes (use_cpu, no bf16), the test's --max-steps 2 and the one
    field TRL's trainer sets itself."""
    from differad_rl.integrations.trl import DifferADGRPOConfig

    return DifferADGRPOConfig.paper(
        output_dir=output_dir,
        # the script's bookkeeping (build_config's ``common``)
        logging_steps=1, report_to="none", seed=0, temperature=1.0, reward_weights=[1.0, 1.0, 0.0],
        save_strategy="no", dataloader_num_workers=0, disable_tqdm=True,
        # the --paper branch
        learning_rate=1e-6, max_completion_length=512, localization_reward="dclr_reward",
        # build_config's own rule (CPU here: no bf16, use_cpu); and the one CPU-sized override
        use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available(), max_steps=2,
        # TRL's GRPOTrainer sets this on the args it is given for a vision-language model (trl 1.16
        # grpo_trainer.py: a text-only batch leaves the vision tower without gradients under DDP)
        ddp_find_unused_parameters=True,
    )


@pytest.mark.slow
@pytest.mark.parametrize("repo", REPOS)
def test_paper_configuration_runs_two_steps_on_the_hub_fixture(repo, pairs, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    grpo = importlib.import_module("train_grpo")
    folder = hub_fixture_for(repo)
    out = tmp_path / "grpo"
    cap = _Capture()
    argv = ["--paper", "--model", str(folder), "--data", str(pairs), "--output-dir", str(out), "--max-steps", "2"]
    assert grpo.main(argv, callbacks=(cap.callback,)) == 0
    seen = cap.seen

    # the configuration is the paper's, field for field (TrainingArguments' own fields included)
    args, expected = seen["args"], _expected_config(str(out / "trainer"))
    differ = {f.name: (getattr(args, f.name), getattr(expected, f.name)) for f in dataclasses.fields(expected)
              if f.name != "output_dir" and getattr(args, f.name) != getattr(expected, f.name)}
    assert differ == {}
    assert (args.num_generations, args.per_device_train_batch_size, args.gradient_accumulation_steps) == (8, 8, 2)
    assert (args.beta, args.loss_type, args.epsilon, args.epsilon_high) == (0.04, "dapo", 0.2, 0.28)
    assert args.difficulty_weighting is True and args.resample_rounds == 1 and args.max_steps == 2

    # the processor is the folder's: its min_pixels / patch size, the --paper max_pixels, left padding
    processor = seen["processor"]
    published = HUB_FILES[repo]["preprocessor_config.json"]
    min_pixels = published.get("min_pixels") or published["size"]["shortest_edge"]
    assert loading.pixel_budget(processor) == (min_pixels, PAPER_MAX_PIXELS)
    assert processor.image_processor.patch_size == published["patch_size"]
    assert processor.tokenizer.padding_side == "left"
    stock = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}[family_of(repo)]
    assert stock in [c.__name__ for c in type(processor).__mro__]  # the stock class or its image-only subclass

    # fp32 weights (no bf16 on CPU), vision tower frozen and outside the optimizer
    model = seen["model"]
    assert seen["dtypes"] == {torch.float32} and args.bf16 is torch.cuda.is_available()
    assert seen["visual_trainable"] == [] and seen["trainable"] > 0
    visual = {id(p) for p in model.model.visual.parameters()}
    optimised = [p for g in seen["optimizer"].param_groups for p in g["params"]]
    assert optimised and not any(id(p) in visual for p in optimised)

    # 2 optimizer steps logged, finite loss, in-range rewards
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["loss"] is not None and math.isfinite(r["loss"])
        assert 0.0 <= r["reward"] <= 2.0 + 1e-6 and 0.0 <= r["dclr"] <= 1.0 + 1e-6
        assert r["rounds_used"] in (0, 1)

    # the checkpoint reloads through the product loader with the same processor settings and weights
    ckpt = out / "checkpoint"
    reloaded, reproc = loading.load_model_and_processor(ckpt)
    assert loading.model_family(reloaded) == family_of(repo)
    assert {p.dtype for p in reloaded.parameters()} == {torch.float32}
    assert loading.pixel_budget(reproc) == (min_pixels, PAPER_MAX_PIXELS)
    assert reproc.image_processor.patch_size == published["patch_size"] and reproc.tokenizer.padding_side == "left"
    assert type(reproc) is type(processor)
    trained = model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, trained[name].cpu()), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and "SFT + GRPO" in summary["eval"]  # the held-out comparison ran too
