#!/usr/bin/env python
"""DifferAD-R1 GRPO training with TRL: DCLR + format rewards, difficulty weights, group resampling.

The default run (no ``--model``; about 5 minutes on 2 CPU cores, offline) is the *learner recipe*: the
embedded demo pairs of ``sft_cold_start.LEARNER_DEMO`` (2,000 pairs of 128 px, 100 held out), the shipped
cold start ``examples/trl/cold_start`` (a tiny Qwen3-VL made by ``sft_cold_start.py --recipe learner``), then
100 GRPO steps with the recommended settings (DCLR ``size_term="sides"`` + ``center_norm="enclosing"``,
format reward, difficulty weights, K = 2 resampling rounds), then the held-out evaluation::

    python examples/trl/train_grpo.py --output-dir runs/grpo

Each step prints the reward, the DCLR / format rewards, the rollouts' mIoU and Acc@0.3 (evaluation
protocol, in original target pixels), the difficulty weights (mean/max) and the resampling numbers
(degenerate share before/after, groups regenerated, rounds used). At the end it saves a checkpoint
(``--output-dir/checkpoint``), ``reward_curve.png``, ``metrics.jsonl``, the pairs it used (``pairs.jsonl``)
and — when the pairs have an ``--eval-split`` (``test``) — predicts the held-out pairs greedily with the
cold start and with the final checkpoint and scores them with the evaluation protocol beside the constant
predictors and the classic baseline (``eval/comparison.{md,json,png,html}``). ``--model tiny`` is the
~0.25M-parameter plumbing model (a 150-step in-process cold start first: a random model never writes a
well-formed box). The two phases as separate runs, as in the paper::

    python examples/trl/sft_cold_start.py --recipe learner --output-dir runs/sft
    python examples/trl/train_grpo.py --model runs/sft/checkpoint --recipe learner --output-dir runs/grpo

Several processes work the same way (decisions are taken from gathered rewards); a quick CPU check
with two gloo processes: ``torchrun --nproc_per_node 2 examples/trl/train_grpo.py --model tiny --cold-start-steps 0
--max-steps 2`` (the in-process cold start is meant for the single-process demo).

The paper's GPU recipe (docs/method.md §1: G = 8, 8 completions per device, gradient accumulation 2, bf16,
frozen vision tower, max_pixels = 1,003,520, one epoch, β = 0.04, truncated completions masked,
TRL's DAPO loss with ε = 0.2 / ε_high = 0.28, weights on, K = 1 resampling round)::

    accelerate launch --config_file examples/trl/accelerate_zero2.yaml examples/trl/train_grpo.py \\
        --paper --model Qwen/Qwen2.5-VL-3B-Instruct --data pairs.jsonl --output-dir runs/grpo-3b

(8 GPUs, DeepSpeed ZeRO-2, bf16; ``--deepspeed ds_config.json`` instead passes a DeepSpeed JSON
config straight to the trainer. Start from the SFT cold start's checkpoint with ``--model``.)
TRL 1.16 has no ``max_prompt_length``, so the paper's 1024-token prompt cap is not applied: prompt
length is governed by the pixel budget (two images at 1,003,520 pixels are up to 2 × 1,280 visual
tokens). The learning rate (1e-6 with ``--paper``) is this script's choice; docs/method.md §1 gives none.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling cold-start script

from sft_cold_start import (  # noqa: E402
    LEARNER_DEMO,
    LEARNER_SFT,
    demo_or_data,
    learner_model,
    run_sft,
    save_curve,
)

from differad_rl.integrations.qwen_vl.loading import (  # noqa: E402
    TINY,
    freeze_vision_tower,
    is_tiny,
    keep_tiny_manifest,
    load_model_and_processor,
)

from differad_rl.coords import from_model_space  # noqa: E402
from differad_rl.data.atomic import atomic_write_text  # noqa: E402
from differad_rl.parsing import completion_text, parse_boxes_batch  # noqa: E402


# ------------------------------------------------------------------------------- rollout metrics
class RolloutIoU:
    """Zero-weight "reward" that measures the rollouts with the evaluation protocol's metrics.

    Predictions are parsed (core parser), mapped back to original target pixels with the model's
    coordinate spec, and scored by :func:`differad_rl.eval.metrics.sample_ious` against every
    ground-truth box; Acc@0.3 is logged through TRL's ``log_metric``. Returned values are the
    per-sample IoUs, so TRL logs their mean as ``rewards/rollout_iou/mean`` = rollout mIoU.
    """

    __name__ = "rollout_iou"

    def __init__(self, spec: Any) -> None:
        self.spec = spec

    def __call__(self, completions, solution=None, boxes=None, image_size=None, images=None, log_metric=None,
                 **kwargs) -> list[float]:
        from differad_rl.eval.metrics import accuracy_at, sample_ious
        from differad_rl.integrations.trl import target_image_sizes

        n = len(completions)
        sizes = target_image_sizes(n, image_size=image_size, images=images).astype(np.float64)
        pred, valid = parse_boxes_batch([completion_text(c) for c in completions])
        kw = self.spec.coord_kwargs()
        pred_px = from_model_space(np.nan_to_num(pred), sizes[:, 0], sizes[:, 1], self.spec.space, round=False, **kw)
        if boxes is None:
            boxes = [[list(s)] if any(s) else [] for s in solution]
        ious = sample_ious(pred_px, valid, [list(b) for b in boxes])
        if log_metric is not None:
            log_metric("rollout/acc@0.3", accuracy_at(ious, 0.3))
            log_metric("rollout/parsed", float(np.mean(valid)))
        return ious.tolist()


# ------------------------------------------------------------------------------- printing
def _fmt(v: Any, spec: str = ".3f") -> str:
    return "  -  " if v is None else format(v, spec)


class StepPrinter:
    """TrainerCallback printing one line per logged step and collecting the curves."""

    def __init__(self, out_dir: Path) -> None:
        from transformers import TrainerCallback

        self.rows: list[dict[str, Any]] = []
        self.path = out_dir / "metrics.jsonl"
        self.last = time.perf_counter()  # wall clock of the previous logged step (reset at train begin)
        printer = self

        class _CB(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):  # noqa: D401
                printer.last = time.perf_counter()

            def on_log(self, args, state, control, logs=None, **kw):  # noqa: D401
                # every process logs the same (gathered) numbers: print and write once
                if logs and "reward" in logs and state.is_world_process_zero:
                    printer.add(state.global_step, logs)

        self.callback = _CB()

    def add(self, step: int, logs: dict[str, Any]) -> None:
        g = logs.get
        row = {
            "step": step,
            "reward": g("reward"),
            "dclr": g("rewards/dclr_reward/mean"),
            "format": g("rewards/format_reward/mean"),
            "miou": g("rewards/rollout_iou/mean"),
            "acc@0.3": g("rollout/acc@0.3"),
            "weight_mean": g("differad/weight_mean"),
            "weight_max": g("differad/weight_max"),
            "degenerate_before": g("differad/degenerate_before"),
            "degenerate_after": g("differad/degenerate_after"),
            "groups_resampled": g("differad/groups_resampled"),
            "rounds_used": g("differad/rounds_used"),
            "regenerations": g("differad/regenerations"),
            "refills": g("differad/refills"),
            "is_ratio_mean": g("sampling/importance_sampling_ratio/mean"),  # with --use-vllm
            "loss": g("loss"),
            "seconds": round(time.perf_counter() - self.last, 3),  # wall time since the previous logged step
        }
        self.last = time.perf_counter()
        self.rows.append(row)
        with self.path.open("w" if len(self.rows) == 1 else "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if len(self.rows) == 1:
            print("step  reward   dclr  format   mIoU  acc@.3 | w_mean w_max | degen→after resampled rounds |  secs")
        print(
            f"{step:4d}  {_fmt(row['reward'])}  {_fmt(row['dclr'])}  {_fmt(row['format'])}  {_fmt(row['miou'])}"
            f"  {_fmt(row['acc@0.3'])} | {_fmt(row['weight_mean'])}  {_fmt(row['weight_max'])} | "
            f"{_fmt(row['degenerate_before'], '.2f')}→{_fmt(row['degenerate_after'], '.2f')}"
            f"  {_fmt(row['groups_resampled'], '.0f'):>5}  {_fmt(row['rounds_used'], '.0f'):>5} | {row['seconds']:5.1f}",
            flush=True,
        )


# ------------------------------------------------------------------------------- main
#: The cold start shipped with the repository (``sft_cold_start.py --recipe learner``; see
#: examples/trl/README.md for the exact command, seed and its held-out numbers).
SHIPPED_COLD_START = Path(__file__).resolve().parent / "cold_start"
#: GRPO settings of the default run (the package's recommended settings: DCLR with the width/height term
#: and the enclosing-box centre term, format reward, difficulty weights, K = 2 resampling rounds).
LEARNER_GRPO: dict[str, Any] = {"num_generations": 8, "per_device_train_batch_size": 32, "max_completion_length": 48,
                                "learning_rate": 5e-4, "max_steps": 100, "resample_rounds": 2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="default: the shipped cold start (tiny Qwen3-VL, examples/trl/cold_start); 'tiny' (plumbing "
                        "Qwen2.5-VL), 'tiny:<family>', a hub id or a folder")
    p.add_argument("--recipe", default=None, choices=("learner",),
                   help="'learner': the default run's data and GRPO settings with another --model (e.g. your own "
                        "cold start made by sft_cold_start.py --recipe learner)")
    p.add_argument("--data", default=None, help="pairs JSONL (default: the embedded demo pairs)")
    p.add_argument("--split", default="train", help="records of this split ('' = all)")
    p.add_argument("--eval-split", default="test",
                   help="after training, evaluate on this split: cold start vs final vs constant predictors vs the "
                        "classic baseline ('' = no evaluation)")
    p.add_argument("--output-dir", default="runs/differad_grpo")
    p.add_argument("--paper", action="store_true", help="the paper's GPU hyperparameters (docs/method.md §1)")
    p.add_argument("--plain-grpo", action="store_true", help="trl.GRPOTrainer without weights/resampling")
    p.add_argument("--max-steps", type=int, default=None, help="default 100 (default run) / 6 (tiny) / -1 = one epoch (--paper)")
    p.add_argument("--num-generations", type=int, default=None, help="G (default 8; 4 tiny)")
    p.add_argument("--batch-size", type=int, default=None, help="completions per device (default 32; 2G tiny; 8 paper)")
    p.add_argument("--grad-accum", type=int, default=None)
    p.add_argument("--max-completion-length", type=int, default=None, help="default 48 / 32 (tiny) / 512")
    p.add_argument("--learning-rate", type=float, default=None, help="default 5e-4 / 1e-3 (tiny) / 1e-6")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--rewards", default="dclr,format", help="comma-separated reward names")
    p.add_argument("--center-norm", default=None, choices=("paper", "enclosing"),
                   help="DCLR centre term (default: enclosing on the default run, paper otherwise)")
    p.add_argument("--size-term", default=None, choices=("area", "sides"),
                   help="DCLR size term (default: sides on the default run, area otherwise)")
    p.add_argument("--resample-rounds", type=int, default=None, help="K (0 = off; default 2 on the default run, else 1)")
    p.add_argument("--no-difficulty-weights", action="store_true")
    p.add_argument("--difficulty-scope", default="group", choices=("group", "batch"))
    p.add_argument("--cold-start-steps", type=int, default=None,
                   help="SFT steps before GRPO (sft_cold_start.py's run_sft); default 0 when the shipped cold start "
                        "is used, 150 for --model tiny, else 0")
    p.add_argument("--min-pixels", type=int, default=None)
    p.add_argument("--max-pixels", type=int, default=None, help="default: the processor's (paper: 1003520)")
    p.add_argument("--freeze-vision", action="store_true")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast over fp32 weights; default: on a GPU that supports it, fp32 on a CPU "
                        "(--bf16 on a CPU without native bf16 runs fp32 with a warning)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="default: on with a GPU (the --paper recipe: on), off on a CPU")
    p.add_argument("--use-vllm", action="store_true",
                   help="generate with TRL's vLLM path (GPU, vLLM installed); resampling and refill regenerate "
                        "through it too")
    p.add_argument("--vllm-mode", default="colocate", choices=("colocate", "server"),
                   help="colocate: an engine in every training process; server: a running `trl vllm-serve`")
    p.add_argument("--deepspeed", default=None, help="DeepSpeed JSON config passed to the trainer")
    p.add_argument("--attn-implementation", default=None, help="e.g. flash_attention_2 on GPU")
    p.add_argument("--demo-pairs", type=int, default=None, help="default 2000 (default run) / 32 (tiny)")
    p.add_argument("--demo-size", type=int, default=None, help="default 128 (default run) / 64 (tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="set any DifferADGRPOConfig field last (JSON value, else a string), e.g. the peers' options: "
                        "--set advantage_weighting=emit --set correct_threshold=0.5 (repeatable)")
    return p.parse_args(argv)


def config_overrides(items: list[str]) -> dict[str, Any]:
    """``--set FIELD=VALUE`` items as a dict; the value is read as JSON (``0.5``, ``true``, ``null``, ``[1, 0]``),
    else kept as a string. Raises ``SystemExit`` naming an item without ``=`` or an unknown field."""
    import dataclasses

    from differad_rl.integrations.trl import DifferADGRPOConfig

    known = {f.name for f in dataclasses.fields(DifferADGRPOConfig)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or key not in known:
            raise SystemExit(f"--set {item}: expected FIELD=VALUE with FIELD a DifferADGRPOConfig field "
                             f"(e.g. advantage_weighting, group_filter, degeneracy_rule, correct_threshold)")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def build_config(args: argparse.Namespace, out: Path, tiny: bool, reward_names: list[str], learner: bool = False) -> Any:
    from differad_rl.integrations.trl import DifferADGRPOConfig, localization_reward_name

    import torch

    gpu = torch.cuda.is_available() and not tiny
    common: dict[str, Any] = {
        "output_dir": str(out / "trainer"),
        "logging_steps": 1,
        "report_to": "none",
        "seed": args.seed,
        "temperature": args.temperature,
        "reward_weights": [1.0] * len(reward_names) + [0.0],  # rollout_iou is a metric, not a reward
        "save_strategy": "no",
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }
    if args.deepspeed:
        common["deepspeed"] = args.deepspeed
    common["bf16"] = args.bf16  # None: DifferADGRPOConfig decides from the hardware (fp32 on a CPU)
    if args.gradient_checkpointing is not None:
        common["gradient_checkpointing"] = args.gradient_checkpointing
    if args.use_vllm:
        common.update(use_vllm=True, vllm_mode=args.vllm_mode)
    k_default = LEARNER_GRPO["resample_rounds"] if learner else 1  # the paper does not state K: 1
    method = {
        "difficulty_weighting": not (args.no_difficulty_weights or args.plain_grpo),
        "difficulty_scope": args.difficulty_scope,
        "resample_rounds": 0 if args.plain_grpo else (k_default if args.resample_rounds is None else args.resample_rounds),
        "localization_reward": localization_reward_name(reward_names),  # never the format reward
    }
    explicit = {k: v for k, v in {
        "num_generations": args.num_generations,
        "per_device_train_batch_size": args.batch_size,
        "gradient_accumulation_steps": args.grad_accum,
        "max_completion_length": args.max_completion_length,
        "learning_rate": args.learning_rate,
        "max_steps": args.max_steps,
    }.items() if v is not None}
    explicit.update(config_overrides(args.set))
    if args.paper:
        values = {**common, **method, "learning_rate": 1e-6, "max_completion_length": 512,
                  "use_cpu": not gpu, "bf16": gpu if args.bf16 is None else args.bf16, **explicit}
        return DifferADGRPOConfig.paper(**values)
    if learner:
        values = {**common, **method, **{k: v for k, v in LEARNER_GRPO.items() if k != "resample_rounds"},
                  "gradient_accumulation_steps": 1, "use_cpu": True, **explicit}
        return DifferADGRPOConfig(**values)
    g = args.num_generations or 4
    values = {
        **common, **method,
        "num_generations": g,
        "per_device_train_batch_size": args.batch_size or 2 * g,
        "gradient_accumulation_steps": 1,
        "max_completion_length": 32,
        "learning_rate": 1e-3 if tiny else 1e-6,
        "max_steps": 6,
        "use_cpu": not gpu,
        **explicit,
    }
    return DifferADGRPOConfig(**values)


def check_vllm_option(args: argparse.Namespace, tiny: bool, model: Any, processor: Any) -> None:
    """``--use-vllm``: refuse at start-up what cannot work. vLLM needs a GPU, a real model and the ``vllm``
    package; it builds its own image processor from the model folder, so the folder's pixel budget must be
    the one this run uses (``--max-pixels`` / ``--min-pixels`` / ``--paper``), else the number of image tokens
    in TRL's prompts and in vLLM's features may differ."""
    if not args.use_vllm:
        return
    import importlib.util

    import torch

    from differad_rl.integrations.qwen_vl.loading import load_processor, pixel_budget

    if tiny or not torch.cuda.is_available():
        raise SystemExit("--use-vllm needs a GPU and a real model folder (--model); this run is on "
                         f"{'the tiny CPU model' if tiny else 'a machine without CUDA'}. Drop --use-vllm.")
    if importlib.util.find_spec("vllm") is None:
        raise SystemExit("--use-vllm: vLLM is not installed. pip install 'trl[vllm]==1.16.*' "
                         "(TRL 1.16 supports vLLM 0.22 to 0.31), or drop --use-vllm.")
    folder = Path(str(model.name_or_path))
    if folder.is_dir():
        saved, used = pixel_budget(load_processor(str(folder))), pixel_budget(processor)
        if saved != used:
            raise SystemExit(
                f"--use-vllm: vLLM reads the image processor of {folder} (min_pixels, max_pixels = {saved}), "
                f"but this run uses {used}; the image-token counts of TRL's prompts and vLLM's features may differ. "
                f"Save this run's processor into the folder (load_processor(folder, min_pixels={used[0]}, "
                f"max_pixels={used[1]}).save_pretrained(folder)) or pass --min-pixels {saved[0]} --max-pixels {saved[1]}"
            )


def resolve_start(args: argparse.Namespace, out: Path) -> tuple[str, int, bool]:
    """``(model, cold_start_steps, learner)``: what GRPO starts from.

    The default run (no ``--model``) starts from the shipped cold start, or — with
    ``--cold-start-steps N`` or when the shipped folder is missing — from the untrained learner model
    trained in process for N (default :data:`LEARNER_SFT` ``max_steps``) SFT steps.
    """
    if args.model is None:
        if args.cold_start_steps is None and (SHIPPED_COLD_START / "model.safetensors").is_file():
            return str(SHIPPED_COLD_START), 0, True
        steps = LEARNER_SFT["max_steps"] if args.cold_start_steps is None else args.cold_start_steps
        return str(learner_model(out / "tiny_models", seed=args.seed)), steps, True
    cold = args.cold_start_steps
    if cold is None:
        cold = 150 if args.model == TINY or args.model.startswith(TINY + ":") else 0
    return args.model, cold, args.recipe == "learner"


def evaluate_methods(
    out: Path, records: list[Any], train_records: list[Any], models: dict[str, tuple[str, Any, Any]],
) -> dict[str, Any]:
    """Predict + evaluate every model (``{slug: (label, model, processor)}``) on ``records`` (greedy, the
    protocol's prompt) beside the two constant predictors and the classic baseline; write ``eval/``
    (``<slug>.predictions.jsonl``, a report per method, ``comparison.{md,json,png,html}``) and return
    the results by label."""
    from differad_rl.eval.baseline import run_baseline
    from differad_rl.eval.comparison import constant_predictions, write_comparison
    from differad_rl.eval.protocol import EvalConfig, Predictions, evaluate_records, read_predictions
    from differad_rl.eval.report import write_report
    from differad_rl.integrations.qwen_vl.predict import PredictConfig, predict_records

    ev = out / "eval"
    results: dict[str, Any] = {}
    slugs: dict[str, str] = {}
    for slug, (label, model, processor) in models.items():
        preds = ev / f"{slug}.predictions.jsonl"
        if preds.exists():
            preds.unlink()  # each run evaluates its own checkpoints
        predict_records(model, processor, records, preds, model_name=label,
                        config=PredictConfig(batch_size=16, max_new_tokens=64), progress=True)
        # family, space and the sizes the processor fed the model come from the predictions' lines
        results[label] = evaluate_records(read_predictions(preds), records, EvalConfig(reasoning=True))
        slugs[label] = slug
    pixel = EvalConfig(family="pixel")
    for kind, label in (("zero_box", "always zero box"), ("mean_box", "always train mean box")):
        results[label] = evaluate_records(constant_predictions(kind, records, train_records), records, pixel)
        slugs[label] = kind
    base = run_baseline(records, [r for i, r in enumerate(train_records) if i % 3 == 0])
    n = len(records)
    results["classic baseline"] = evaluate_records(
        Predictions(ids=[r.id for r in records], outputs=[None] * n, boxes=base.boxes, given=np.ones(n, bool)),
        records, pixel)
    slugs["classic baseline"] = "classic_baseline"
    links: dict[str, str] = {}
    for label, res in results.items():
        visual = slugs[label] in models
        write_report(res, ev / slugs[label], visual=visual)
        links[label] = f"{slugs[label]}/report.html" if visual else f"{slugs[label]}/metrics.json"
    write_comparison(results, ev, title=f"held-out pairs ({len(records)}: {sum(not r.is_normal for r in records)} "
                                        f"anomalous, {sum(r.is_normal for r in records)} normal)", links=links,
                     notes="Greedy answers to the evaluation protocol's prompt; the classic baseline is calibrated "
                           "on a third of the training pairs.")
    return results


def main(argv: list[str] | None = None, callbacks: tuple[Any, ...] = ()) -> int:
    """Run the script with ``argv`` (default: the command line); ``callbacks``: extra ``TrainerCallback`` s."""
    args = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    import torch
    from trl import GRPOTrainer

    from differad_rl.data.records import write_pairs
    from differad_rl.integrations.trl import (
        DifferADGRPOTrainer,
        coordinate_spec,
        differad_rewards,
        to_trl_dataset,
    )

    from accelerate import PartialState

    torch.manual_seed(args.seed)
    model_id, cold, learner = resolve_start(args, out)
    tiny = is_tiny(model_id)
    max_pixels = args.max_pixels if args.max_pixels is not None else (1003520 if args.paper else None)
    if tiny and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # ~1M-parameter model: thread start-up costs more than it saves
    demo = dict(LEARNER_DEMO) if learner else {"n_pairs": 32, "size": 64, "seed": args.seed}
    demo.update({k: v for k, v in (("n_pairs", args.demo_pairs), ("size", args.demo_size)) if v is not None})
    state = PartialState()  # under accelerate launch: build tiny model / demo pairs once, on rank 0 first
    with state.main_process_first():
        model, processor = load_model_and_processor(
            model_id, cache_dir=out / "tiny_models", min_pixels=args.min_pixels, max_pixels=max_pixels,
            bf16=bool(args.bf16) or (args.paper and torch.cuda.is_available()),
            attn_implementation=args.attn_implementation)
        every = demo_or_data(args.data, out, split=None, **demo)
    from differad_rl.eval.protocol import select_split

    records = select_split(every, args.split or None, source=str(args.data or "the demo pairs"))
    held_out = [r for r in every if args.eval_split and r.split == args.eval_split and r.split != args.split]
    if state.is_main_process:
        write_pairs(every, out / "pairs.jsonl")  # the pairs this run used, with their split
    check_vllm_option(args, tiny, model, processor)
    if args.freeze_vision or args.paper:
        print(f"froze {freeze_vision_tower(model):,} vision-tower parameters")
    spec = coordinate_spec(processor, model=model)  # raises on a bare tokenizer
    print(f"model {model_id}: space={spec.space} min_pixels={spec.min_pixels} max_pixels={spec.max_pixels} "
          f"factor={spec.factor}")

    start_ckpt = Path(model_id)
    if cold > 0:
        print(f"cold start: {cold} SFT steps (phase 1; --cold-start-steps 0 skips it)", flush=True)
        sft = dict(LEARNER_SFT) if learner else {"learning_rate": 1e-2 if tiny else 1e-5, "batch_size": 4}
        sft["max_steps"] = cold
        trainer = run_sft(model, processor, records, out / "cold_start", seed=args.seed,
                          use_cpu=tiny or not torch.cuda.is_available(), quiet=True, **sft)
        start_ckpt = out / "cold_start" / "checkpoint"
        if state.is_main_process and held_out:
            trainer.save_model(str(start_ckpt))
            processor.save_pretrained(str(start_ckpt))
            keep_tiny_manifest(model, start_ckpt)
    train = to_trl_dataset(records, seed=args.seed)  # validated: raises naming a bad row
    print(f"{len(train)} training pairs, {len(held_out)} held-out pairs ({args.eval_split or '-'})")

    names = [n.strip() for n in args.rewards.split(",") if n.strip()]
    dclr_opts = {"center_norm": args.center_norm or ("enclosing" if learner else "paper"),
                 "size_term": args.size_term or ("sides" if learner else "area")}
    reward_funcs = differad_rewards(processor, names=names, model=model, **dclr_opts)
    reward_funcs.append(RolloutIoU(spec))
    config = build_config(args, out, tiny, names, learner=learner)
    trainer_cls = GRPOTrainer if args.plain_grpo else DifferADGRPOTrainer
    printer = StepPrinter(out)
    trainer = trainer_cls(model=model, processing_class=processor, reward_funcs=reward_funcs, args=config,
                          train_dataset=train, callbacks=[printer.callback, *callbacks])
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # our one-line-per-step printer replaces the raw dicts
    print(f"{trainer_cls.__name__}: G={config.num_generations} weights={getattr(config, 'difficulty_weighting', False)} "
          f"resample K={getattr(config, 'resample_rounds', 0)} steps={config.max_steps} DCLR {dclr_opts}")
    trainer.train()

    ckpt = out / "checkpoint"
    trainer.save_model(str(ckpt))
    if not trainer.accelerator.is_main_process:
        return 0
    processor.save_pretrained(str(ckpt))
    keep_tiny_manifest(model, ckpt)
    rows = printer.rows
    steps = [float(r["step"]) for r in rows]
    series = {"reward": [r["reward"] for r in rows], "DCLR": [r["dclr"] for r in rows],
              "mIoU": [r["miou"] for r in rows]}
    series = {k: [float(v) for v in vs if v is not None] for k, vs in series.items()}
    png = save_curve(out / "reward_curve.png", steps, series, f"DifferAD GRPO ({spec.space})")
    summary: dict[str, Any] = {"steps": len(rows), "checkpoint": str(ckpt), "curve": str(png),
                               "metrics": str(printer.path), "pairs": str(out / "pairs.jsonl"),
                               "first": rows[0] if rows else None, "final": rows[-1] if rows else None}
    if held_out and not args.plain_grpo and state.num_processes == 1:
        from differad_rl.eval.comparison import comparison_table

        start_model, start_proc = load_model_and_processor(start_ckpt, min_pixels=args.min_pixels,
                                                           max_pixels=max_pixels, training=False)
        trained = trainer.accelerator.unwrap_model(trainer.model)
        results = evaluate_methods(
            out, held_out, records, {"cold_start": ("cold start (SFT)", start_model, start_proc),
                                      "final": ("SFT + GRPO", trained, processor)})
        table = comparison_table(results)
        print(f"\nheld-out evaluation ({args.eval_split}, {len(held_out)} pairs; report: {out / 'eval' / 'comparison.html'})")
        print(table)
        summary["eval"] = {k: v.metrics["overall"] for k, v in results.items()}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k in ("steps", "checkpoint", "curve", "metrics", "pairs")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
