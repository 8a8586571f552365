#!/usr/bin/env python
"""Phase 1 of DifferAD-R1: a supervised cold start on reference/target difference pairs (TRL SFTTrainer).

The model learns the answer format before RL: for each pair the assistant turn is

    <think>…one sentence about where the target differs…</think><answer>(x1,y1),(x2,y2)</answer>

with the box in the MODEL FAMILY's coordinate space (Qwen2-VL / Qwen3-VL 0..1000, Qwen2.5-VL pixels of
the resized image — read off the processor; docs/method.md §2) and the zero box ``(0,0),(0,0)`` for a normal
target. Prompts are the method's (system prompt, reference image first, target second, a seeded
instruction from the pool) — the same rows the GRPO example trains on.

Defaults run offline on CPU in well under a minute: a tiny random Qwen2.5-VL built on the spot and
the embedded demo pairs::

    python examples/trl/sft_cold_start.py --output-dir runs/sft

The real thing (GPU; the paper fine-tunes on "spot the difference" pairs)::

    accelerate launch examples/trl/sft_cold_start.py --model Qwen/Qwen2.5-VL-3B-Instruct \\
        --data pairs.jsonl --output-dir runs/sft-3b --bf16 --max-steps -1 --epochs 1 \\
        --batch-size 4 --grad-accum 4 --learning-rate 1e-5 --max-pixels 1003520 --freeze-vision

Writes ``--output-dir/checkpoint`` (model + processor, loadable by ``train_grpo.py --model``) and
``--output-dir/sft_loss.png``.

Loading follows :mod:`differad_rl.integrations.qwen_vl.loading` (shared with ``train_grpo.py`` and
``differad-rl predict``): hub ids and folders go through ``AutoProcessor.from_pretrained`` /
``AutoModelForImageTextToText.from_pretrained``, tiny builds (``--model tiny``, ``tiny:<family>``, or a
folder with ``tiny_build.json``) through their own loader; left padding is forced and checked;
``--bf16`` trains under bf16 autocast over fp32 master weights (bf16 *weights* would round most
updates at lr 1e-5 away).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np

from differad_rl.coords import to_model_space
from differad_rl.data.atomic import atomic_write_text
from differad_rl.data.records import PairRecord, load_pairs
from differad_rl.integrations.hardware import resolve_bf16, resolve_gradient_checkpointing
from differad_rl.integrations.qwen_vl.loading import (
    TINY,
    freeze_vision_tower,
    is_tiny,
    keep_tiny_manifest,
    load_model_and_processor,
    set_pixel_budget,
)
from differad_rl.parsing import render_box

__all__ = [
    "TINY_PREFIX",
    "answer_text",
    "demo_or_data",
    "freeze_vision_tower",
    "is_tiny",
    "keep_tiny_manifest",
    "load_model_and_processor",
    "run_sft",
    "save_curve",
    "set_pixel_budget",
    "sft_rows",
]

# The one loader every entry point shares (padding side, dtype, pixel budget, family and tiny
# detection: differad_rl.integrations.qwen_vl.loading); re-exported here for the GRPO example.
TINY_PREFIX = TINY  # the exact keyword "tiny" / "tiny:<family>", not a name prefix (see is_tiny)


# ------------------------------------------------------------------------------- the learner recipe
#: ``--recipe learner``: what the main job's shipped cold start was trained with (examples/trl/README.md).
#: A tiny model learns to localize only where it can see: Qwen3-VL (its vision tower's learned position
#: embedding puts *where* into each visual token; Qwen2/2.5-VL's rotary-only towers leave it out of the
#: token contents), images of 128 px = 4 × 4 visual tokens of 32 px, and defects of 3–15 % of the image
#: (one defect per target; a quarter of the targets normal). 2,000 pairs, 100 held out.
LEARNER_DEMO: dict[str, Any] = {"n_pairs": 2000, "size": 128, "seed": 0, "test_fraction": 0.05,
                                "normal_fraction": 0.25, "size_bins": ("medium", "large"), "multi_every": 0}
LEARNER_FAMILY = "qwen3_vl"
LEARNER_PIXELS = 128 * 128  # min = max: every 128 px image is fed as it is (4 × 4 tokens)
LEARNER_SFT: dict[str, Any] = {"max_steps": 4000, "batch_size": 8, "learning_rate": 3e-3, "lr_scheduler": "cosine"}


def learner_model(cache_dir: str | os.PathLike[str] | None, seed: int = 0) -> Path:
    """Build (or reuse) the recipe's untrained tiny Qwen3-VL (:data:`~differad_rl.integrations.qwen_vl.tiny.LEARNER_ARCH`)."""
    from differad_rl.integrations.qwen_vl.tiny import LEARNER_ARCH, tiny_model_for

    return tiny_model_for(LEARNER_FAMILY, cache_dir=cache_dir, seed=seed, min_pixels=LEARNER_PIXELS,
                          max_pixels=LEARNER_PIXELS, arch=LEARNER_ARCH)


# ------------------------------------------------------------------------------- shared helpers
def demo_or_data(data: str | None, out_dir: Path, *, n_pairs: int, size: int, seed: int, split: str | None,
                 **demo: Any) -> list[PairRecord]:
    """Records of ``--data`` (a pairs JSONL), else the embedded demo pairs built under ``out_dir``
    (``demo``: more :func:`~differad_rl.data.demo.build_demo_pairs` options)."""
    if data:
        records = load_pairs(data)
    else:
        from differad_rl.data.demo import build_demo_pairs

        path = build_demo_pairs(out_dir / "demo_pairs", n_pairs=n_pairs, size=size, seed=seed, progress=False,
                                workers=1, **demo)
        records = load_pairs(path)
    from differad_rl.eval.protocol import select_split

    # a split no record has is an error listing the splits present (never silently every record)
    return select_split(records, split or None, source=str(data or "the demo pairs"))


def save_curve(path: Path, steps: list[float], series: dict[str, list[float]], title: str) -> Path:
    """Write a PNG line plot atomically (temp file + os.replace)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for name, ys in series.items():
        if ys:
            ax.plot(steps[: len(ys)], ys, marker="o", label=name)
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------- SFT rows
def answer_text(record: PairRecord, spec: Any) -> str:
    """``<think>…</think><answer>(x1,y1),(x2,y2)</answer>`` for ``record`` in the model's space
    (``spec``: a :class:`~differad_rl.integrations.trl.CoordinateSpec`), rounded as the model writes."""
    box = np.asarray(record.box, dtype=np.float64)
    b = to_model_space(box, record.width, record.height, spec.space, round=True, **spec.coord_kwargs())
    b = [int(v) for v in np.asarray(b).tolist()]
    if record.is_normal:
        think = "No difference."
    else:
        cx, cy = (b[0] + b[2]) // 2, (b[1] + b[3]) // 2
        think = f"A difference near ({cx},{cy})."
    return f"<think>{think}</think><answer>{render_box(b, 'qwen')}</answer>"


def sft_rows(records: list[PairRecord], processor: Any, *, seed: int = 0) -> list[dict[str, Any]]:
    """Prompt-completion rows for SFTTrainer (the GRPO rows + the assistant answer)."""
    from differad_rl.integrations.trl import coordinate_spec, pairs_to_rows

    spec = coordinate_spec(processor)
    rows = pairs_to_rows(records, seed=seed)
    out = []
    for rec, row in zip(records, rows):
        text = answer_text(rec, spec)
        out.append({"prompt": row["prompt"], "images": row["images"],
                    "completion": [{"role": "assistant", "content": [{"type": "text", "text": text}]}]})
    return out


def run_sft(
    model: Any,
    processor: Any,
    records: list[PairRecord],
    output_dir: Path,
    *,
    max_steps: int,
    epochs: float = 1.0,
    batch_size: int = 4,
    grad_accum: int = 1,
    learning_rate: float = 1e-2,
    seed: int = 0,
    bf16: bool | None = None,
    gradient_checkpointing: bool | None = None,
    use_cpu: bool = True,
    max_length: int | None = None,
    logging_steps: int = 1,
    quiet: bool = False,
    lr_scheduler: str = "constant",
    save_steps: int = 0,
) -> Any:
    """Run TRL's SFTTrainer on the pairs (completion-only loss); returns the trainer.

    ``save_steps > 0`` keeps a trainer checkpoint every that many steps under ``output_dir/trainer``.
    ``bf16`` / ``gradient_checkpointing``: ``None`` = decided from the hardware
    (:mod:`differad_rl.integrations.hardware`: fp32 and no checkpointing on a CPU), not TRL's "on everywhere".
    """
    import datasets
    from trl import SFTConfig, SFTTrainer

    rows = sft_rows(records, processor, seed=seed)
    ds = datasets.Dataset.from_list(rows)
    args = SFTConfig(
        output_dir=str(output_dir / "trainer"),
        max_steps=max_steps,
        num_train_epochs=epochs,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        learning_rate=learning_rate,
        lr_scheduler_type=lr_scheduler,
        logging_steps=logging_steps,
        save_strategy="steps" if save_steps > 0 else "no",
        save_steps=save_steps if save_steps > 0 else 500,
        save_only_model=True,
        report_to="none",
        seed=seed,
        bf16=resolve_bf16(bf16, use_cpu=use_cpu),
        gradient_checkpointing=resolve_gradient_checkpointing(gradient_checkpointing, use_cpu=use_cpu),
        use_cpu=use_cpu,
        max_length=max_length,
        completion_only_loss=True,
        dataloader_num_workers=0,
        disable_tqdm=quiet,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=processor)
    if quiet:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    trainer.train()
    return trainer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=None, choices=("learner",),
                   help="'learner': the main job's cold start (tiny Qwen3-VL, LEARNER_ARCH, 128 px demo pairs with "
                        "3-15 %% defects, 4,000 steps, cosine lr 3e-3); explicit options still win")
    p.add_argument("--model", default=None, help="'tiny', 'tiny:<family>', a hub id or a folder (default: tiny Qwen2.5-VL)")
    p.add_argument("--data", default=None, help="pairs JSONL (default: the embedded demo pairs)")
    p.add_argument("--split", default="train", help="use records of this split ('' = all; falls back to all)")
    p.add_argument("--output-dir", default="runs/sft_cold_start")
    p.add_argument("--max-steps", type=int, default=None, help="default 150 (4000 with --recipe learner); -1 = use --epochs")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=None, help="default 4 (8 with --recipe learner)")
    p.add_argument("--lr-scheduler", default=None, help="default constant (cosine with --recipe learner)")
    p.add_argument("--save-steps", type=int, default=0, help="keep a trainer checkpoint every N steps (0 = none)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--learning-rate", type=float, default=None, help="default 1e-2 (tiny) / 1e-5 (real models)")
    p.add_argument("--min-pixels", type=int, default=None)
    p.add_argument("--max-pixels", type=int, default=None)
    p.add_argument("--freeze-vision", action="store_true")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast over fp32 master weights (default: on a GPU that supports it, fp32 on a CPU)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="default: on with a GPU, off on a CPU")
    p.add_argument("--demo-pairs", type=int, default=None, help="default 32 (2000 with --recipe learner)")
    p.add_argument("--demo-size", type=int, default=None, help="default 64 (128 with --recipe learner)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    learner = args.recipe == "learner"
    if args.model is None:
        args.model = str(learner_model(out / "tiny_models", seed=args.seed)) if learner else TINY
    tiny = is_tiny(args.model)  # the keyword or the tiny manifest, never a name prefix
    if tiny and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # ~1M-parameter model: thread start-up costs more than it saves
    model, processor = load_model_and_processor(
        args.model, cache_dir=out / "tiny_models", min_pixels=args.min_pixels, max_pixels=args.max_pixels,
        bf16=bool(args.bf16))
    if args.freeze_vision:
        print(f"froze {freeze_vision_tower(model):,} vision parameters")
    demo = dict(LEARNER_DEMO) if learner else {"n_pairs": 32, "size": 64, "seed": args.seed}
    demo.update({k: v for k, v in (("n_pairs", args.demo_pairs), ("size", args.demo_size)) if v is not None})
    records = demo_or_data(args.data, out, split=args.split or None, **demo)
    sft = dict(LEARNER_SFT) if learner else {"max_steps": 150, "batch_size": 4, "lr_scheduler": "constant",
                                             "learning_rate": 1e-2 if tiny else 1e-5}
    sft.update({k: v for k, v in (("max_steps", args.max_steps), ("batch_size", args.batch_size),
                                  ("learning_rate", args.learning_rate), ("lr_scheduler", args.lr_scheduler))
                if v is not None})
    print(f"SFT: {len(records)} pairs, {sft}", flush=True)
    gpu = torch.cuda.is_available() and not tiny
    trainer = run_sft(model, processor, records, out, epochs=args.epochs, grad_accum=args.grad_accum,
                      seed=args.seed, bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing,
                      use_cpu=not gpu, quiet=args.quiet,
                      save_steps=args.save_steps, logging_steps=10 if learner else 1, **sft)
    logs = [r for r in trainer.state.log_history if "loss" in r]
    steps = [float(r["step"]) for r in logs]
    losses = [float(r["loss"]) for r in logs]
    for s, l in zip(steps, losses):
        print(f"step {int(s):4d}  loss {l:.4f}")
    ckpt = out / "checkpoint"
    trainer.save_model(str(ckpt))
    processor.save_pretrained(str(ckpt))
    keep_tiny_manifest(model, ckpt)
    png = save_curve(out / "sft_loss.png", steps, {"loss": losses}, "SFT cold start")
    summary = {"steps": len(steps), "first_loss": losses[0] if losses else None,
               "last_loss": losses[-1] if losses else None, "checkpoint": str(ckpt), "curve": str(png)}
    atomic_write_text(out / "sft_summary.json", json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
