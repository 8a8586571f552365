"""The ``differad-rl`` command line: ``differad-rl <command> ...``.

Each command group registers itself from its own module (``differad_rl.data.cli`` and
``differad_rl.eval.cli``); ``predict`` is defined here and imports its generation code
(:mod:`differad_rl.integrations.qwen_vl.predict`, which needs transformers) only when it runs, so this file
stays import-light: the heavy modules load when their command runs. Ctrl-C ends any command with
one line and exit code 130, not a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _register_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="run a Qwen-VL on pair records with the evaluation protocol and write a predictions JSONL",
        description="Generate predictions with the evaluation protocol's prompt (docs/method.md §8): reference image "
        "first, target second; greedy by default; resumable (ids already in --out are skipped). Each line "
        "records the raw output, family and the target's original and model-input sizes, for `differad-rl eval`.",
    )
    p.add_argument("--model", required=True,
                   help="hub id, checkpoint folder, tiny folder, or 'tiny' / 'tiny:<family>' (a random offline model)")
    p.add_argument("--pairs", required=True, help="pair records JSONL")
    p.add_argument("--split", default=None, help="predict only the records of this split (default: all)")
    p.add_argument("--out", required=True, help="predictions JSONL to write (appended to when resuming)")
    p.add_argument("--prompt", default="reasoning", choices=["reasoning", "qwen"],
                   help="reasoning: the method's system prompt and <think>/<answer> (trained checkpoints); "
                   "qwen: the plain Qwen grounding hint (stock models)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass when sampling")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    p.add_argument("--min-pixels", type=int, default=None, help="image processor min_pixels (default: its own)")
    p.add_argument("--max-pixels", type=int, default=None, help="image processor max_pixels (default: its own)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu … (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="weights dtype (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--attn-implementation", default=None, help="e.g. sdpa, flash_attention_2")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(args: argparse.Namespace) -> int:
    try:
        from differad_rl.integrations.qwen_vl.predict import PredictConfig, predict
    except ImportError as exc:
        print(f"differad-rl predict: error: needs transformers ({exc}); pip install 'differad-rl[trl]'",
              file=sys.stderr)
        return 2
    try:
        cfg = PredictConfig(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_p=args.top_p, seed=args.seed, prompt=args.prompt)
        result = predict(args.model, args.pairs, args.out, split=args.split, config=cfg,
                         min_pixels=args.min_pixels, max_pixels=args.max_pixels, device=args.device,
                         dtype=args.dtype, attn_implementation=args.attn_implementation,
                         progress=not args.no_progress)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"differad-rl predict: error: {exc}", file=sys.stderr)
        return 2
    torn = " (dropped a torn last line)" if result.dropped_torn_line else ""
    print(f"wrote {result.written} predictions to {result.out}; {result.skipped} already there{torn}; "
          f"model {result.model} ({result.family})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every command group registered."""
    from differad_rl.data import cli as data_cli
    from differad_rl.eval import cli as eval_cli

    parser = argparse.ArgumentParser(
        prog="differad-rl",
        description="DifferAD-R1 data building, prediction and evaluation for dual-image anomaly localization.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    data_cli.register(sub)
    eval_cli.register(sub)
    _register_predict(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``differad-rl`` console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        extra = "; rerun the same command to resume" if args.command == "predict" else ""
        print(f"\ndifferad-rl {args.command}: interrupted{extra}", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
