"""``differad-rl eval`` and ``differad-rl baseline`` (registered by :mod:`differad_rl.cli`).

Heavy modules (NumPy, SciPy, matplotlib, PIL) are imported inside the command functions.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["register"]

# Kept literal so that building the parser imports nothing heavy; a test checks it equals
# differad_rl.eval.protocol.FAMILIES and differad_rl.coords.SPACES.
FAMILY_NAMES = ("cogvlm", "internvl", "mantis", "minicpm", "mplug_owl3", "pixel", "qwen2_5_vl", "qwen2_vl", "qwen3_vl")
SPACE_NAMES = ("pixel", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (metrics.json, samples.jsonl, report)")
    p.add_argument("--iou-threshold", type=float, default=0.3, help="τ of Acc@τ and F1@τ (default 0.3)")
    p.add_argument("--num-cases", type=int, default=8, help="worst/best cases drawn in the report")
    p.add_argument("--no-report", action="store_true", help="skip the PNG/HTML visual report")


def register(subparsers: Any) -> None:
    """Add the ``eval`` and ``baseline`` commands to an ``argparse`` sub-parser set."""
    p = subparsers.add_parser(
        "eval",
        help="score a prediction JSONL against pair records (mIoU, Acc@0.3, F1@0.3) and write a report",
        description="Evaluate model outputs with the DifferAD-R1 protocol (docs/method.md §8).",
    )
    p.add_argument("--pred", required=True, help='prediction JSONL: {"id", "output"} or {"id", "box"} per line')
    p.add_argument("--gt", required=True, help="pair records JSONL (differad_rl.data.records schema)")
    p.add_argument(
        "--family",
        default=None,
        choices=FAMILY_NAMES,
        help="output format / default space (default: the family the predictions record, else qwen2_5_vl)",
    )
    p.add_argument(
        "--space",
        default=None,
        choices=SPACE_NAMES,
        help="coordinate space of the boxes (default: the recorded space, else the family's)",
    )
    p.add_argument("--split", default=None, help="score only the pair records of this split (default: all)")
    p.add_argument("--reasoning", action="store_true", help="require <answer>…</answer> (reasoning models)")
    p.add_argument(
        "--min-pixels",
        type=int,
        default=None,
        help="Qwen2.5-VL smart_resize min_pixels for lines without a recorded input_size (default 3136); "
        "must agree with recorded sizes",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="Qwen2.5-VL smart_resize max_pixels for lines without a recorded input_size (default 1003520); "
        "must agree with recorded sizes",
    )
    p.add_argument(
        "--allow-missing", action="store_true", help="ground-truth ids without a prediction score 0 instead of failing"
    )
    _add_common(p)
    p.set_defaults(func=_user_errors(_cmd_eval, "eval"))

    b = subparsers.add_parser(
        "baseline",
        help="run a non-LLM baseline (classic difference, PatchCore or PaDiM) through the box protocol and evaluate it",
        description="Non-LLM baselines: anomaly maps (diff: align, blur, |difference|; patchcore / padim: "
        "pretrained EfficientNet-Lite0 fitted per category on normal images), threshold calibrated on a seeded "
        "split, largest component → box. Writes preds.jsonl, the evaluation report and baseline.json "
        "(threshold, image AUROC, pixel AUROC, AUPRO).",
    )
    b.add_argument("--pairs", required=True, help="pair records JSONL")
    b.add_argument(
        "--method",
        default="diff",
        choices=["diff", "patchcore", "padim"],
        help="diff (classic, default), patchcore or padim (need the 'baselines' extra)",
    )
    b.add_argument(
        "--split",
        default="auto",
        help="split to evaluate (default: test when the pairs have one, else all records; 'all' = every record)",
    )
    b.add_argument(
        "--calib-split",
        default="auto",
        help="split the calibration set is drawn from (default train when present; else part of the evaluated split)",
    )
    b.add_argument("--calib-fraction", type=float, default=0.3, help="calibration share (default 0.3)")
    b.add_argument("--seed", type=int, default=0, help="seed of the calibration split")
    b.add_argument("--work-size", type=int, default=256, help="diff: longest side of the working resolution")
    b.add_argument("--sigma", type=float, default=1.0, help="diff: Gaussian blur sigma (working pixels)")
    b.add_argument("--max-shift", type=int, default=8, help="diff: alignment search radius (working pixels)")
    b.add_argument("--local-search", type=int, default=3, help="diff: residual misalignment tolerance (pixels)")
    b.add_argument("--image-size", type=int, default=256, help="patchcore/padim: square input side (default 256)")
    b.add_argument("--coreset-ratio", type=float, default=0.1, help="patchcore: memory-bank share (default 0.1)")
    b.add_argument("--padim-dims", type=int, default=100, help="padim: random channel subset size (default 100)")
    b.add_argument("--device", default="cpu", help="patchcore/padim: torch device (default cpu)")
    b.add_argument(
        "--objective",
        default="pixel_f1",
        choices=["pixel_f1", "miou"],
        help="what the calibrated threshold maximises (default pixel_f1, the anomaly-map protocol)",
    )
    b.add_argument("--workers", type=int, default=2, help="threads computing/decoding anomaly maps")
    _add_common(b)
    b.set_defaults(func=_user_errors(_cmd_baseline, "baseline"))


def _user_errors(func: Callable[[argparse.Namespace], int], name: str) -> Callable[[argparse.Namespace], int]:
    """Report a user's mistake (bad file, id mismatch, bad option) as one line and exit code 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (ValueError, FileNotFoundError) as exc:
            print(f"differad-rl {name}: error: {exc}", file=sys.stderr)
            return 2

    run.__name__ = func.__name__
    return run


def _check_out_folder(out: str) -> None:
    """Refuse an ``--out`` that exists as a file, before any work is done."""
    from pathlib import Path

    if Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out {out}: is an existing file, not a folder; choose a folder for the report")


def _print_summary(metrics: dict[str, Any]) -> None:
    from differad_rl.eval.report import jsonable

    short = {k: metrics[k] for k in ("overall", "anomalous", "normal")}
    short["per_category"] = {
        name: {m: v[m] for m in ("n", "miou", "acc", "f1")} for name, v in metrics["per_category"].items()
    }
    print(json.dumps(jsonable(short), indent=2))


def _cmd_eval(args: argparse.Namespace) -> int:
    from differad_rl.eval.protocol import EvalConfig, evaluate
    from differad_rl.eval.report import write_report

    _check_out_folder(args.out)
    cfg = EvalConfig(
        family=args.family,
        space=args.space,
        reasoning=args.reasoning,
        iou_threshold=args.iou_threshold,
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
        allow_missing=args.allow_missing,
        split=args.split,
    )
    result = evaluate(args.pred, args.gt, config=cfg)
    paths = write_report(result, args.out, num_cases=args.num_cases, visual=not args.no_report)
    _print_summary(result.metrics)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _cmd_baseline(args: argparse.Namespace) -> int:
    from dataclasses import asdict
    from pathlib import Path

    import numpy as np

    from differad_rl.data.atomic import atomic_write_text
    from differad_rl.data.records import load_pairs, write_pairs
    from differad_rl.eval.baseline import BaselineConfig, baseline_splits, normal_images, run_baseline
    from differad_rl.eval.padim import PadimConfig
    from differad_rl.eval.patchcore import PatchCoreConfig
    from differad_rl.eval.protocol import EvalConfig, Predictions, evaluate_records
    from differad_rl.eval.report import jsonable, write_metrics_json, write_report

    _check_out_folder(args.out)
    cfg = BaselineConfig(
        method=args.method,
        work_size=args.work_size,
        sigma=args.sigma,
        max_shift=args.max_shift,
        local_search=args.local_search,
        objective=args.objective,
        calibration_fraction=args.calib_fraction,
        seed=args.seed,
        workers=args.workers,
        patchcore=PatchCoreConfig(image_size=args.image_size, coreset_ratio=args.coreset_ratio),
        padim=PadimConfig(image_size=args.image_size, dims=args.padim_dims),
        device=args.device,
    )
    records = load_pairs(args.pairs)
    evaluated, calibration = baseline_splits(records, args.split, args.calib_split, args.calib_fraction, args.seed)
    try:
        normal = normal_images(records, evaluated, calibration) if cfg.method != "diff" else None
        result = run_baseline(evaluated, calibration, cfg, normal=normal)
    except ImportError as exc:
        print(f"differad-rl baseline: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"id": r.id, "box": b.tolist()}) for r, b in zip(evaluated, result.boxes, strict=True)]
    atomic_write_text(out / "preds.jsonl", "\n".join(lines) + "\n")
    write_pairs(evaluated, out / "pairs_eval.jsonl")
    preds = Predictions(
        ids=[r.id for r in evaluated],
        outputs=[None] * len(evaluated),
        boxes=result.boxes,
        given=np.ones(len(evaluated), dtype=bool),
    )
    ev = evaluate_records(preds, evaluated, EvalConfig(family="pixel", iou_threshold=args.iou_threshold))
    write_report(ev, out, num_cases=args.num_cases, visual=not args.no_report)
    info = {
        "method": cfg.method,
        "threshold": result.threshold,
        "calibration_pixel_f1": result.calibration_f1,
        "calibration_ids": result.calibration_ids,
        "evaluated": len(evaluated),
        "map_metrics": result.map_metrics,
        "fit_images": result.fit_images,
        "config": asdict(cfg),
    }
    write_metrics_json(info, out / "baseline.json")
    _print_summary(ev.metrics)
    summary = {k: info[k] for k in ("method", "threshold", "calibration_pixel_f1", "evaluated")}
    if result.map_metrics is not None:
        summary["map_metrics"] = result.map_metrics["overall"]
    print(json.dumps(jsonable(summary)))
    print(f"wrote {out / 'preds.jsonl'}, {out / 'metrics.json'}, {out / 'baseline.json'}, report in {out}")
    return 0
