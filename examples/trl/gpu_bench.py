#!/usr/bin/env python
"""What one GRPO step of the paper's recipe costs on a GPU, with the frozen-vision feature cache on and off.

NOT RUN YET on a GPU (written on a CPU-only machine; its CPU-runnable parts are tested by
``tests/test_trl_gpu_bench.py`` on a tiny model). On one H200, about 10 minutes::

    python examples/trl/gpu_bench.py --work /tmp/bench          # builds the full-size fixture first

It builds the hub-shaped fixture of the published Qwen2.5-VL-3B architecture with random weights
(:func:`differad_rl.integrations.testing.build_hub_fixture` with ``full_size=True``: 3.755 B
parameters, bf16, initialised on the GPU) unless ``--model`` names a folder, then runs
``examples/trl/train_grpo.py --paper`` in this process for ``--steps`` optimizer steps on demo pairs of
``--demo-size`` px (1024: the paper's pixel budget of 1,003,520 applies) once per variant
(``vision_feature_cache`` on / off), and prints one line per step and a JSON summary::

    cache=on  step 1: 41.2 s, peak 48.1 GiB, vision tower 2.1 s in 1 calls (16 images)

Per step: wall time (optimizer step, generation batch included), peak GPU memory allocated in the step,
the time inside the vision towers (policy and reference; forward hooks, CUDA synchronised) and the
images they encoded. Random weights never stop before ``--max-completion-length`` and make every group
degenerate, so K = 1 regenerates all of them: a real model pays less generation, not less vision.
The default completion cap is 128 tokens (the paper's 512 does not fit the 10 minutes with the cache
off: about 163 s per step was measured, ``shared/notes/gpu-scale.md``); ``--max-completion-length 512``
for the paper's.

``--use-vllm`` (vLLM installed) runs the same variants again with ``train_grpo.py --use-vllm --vllm-mode
colocate`` (generation and group regeneration through TRL's vLLM path) on a copy of the model folder that
carries the paper's pixel budget (:func:`folder_for_vllm`).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_grpo.py beside this file

REPO = "Qwen/Qwen2.5-VL-3B-Instruct"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="runs/gpu_bench", help="output folder (fixture, runs, bench.json)")
    p.add_argument("--model", default=None, help="a model folder (default: build the full-size 3B fixture)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--demo-size", type=int, default=1024)
    p.add_argument("--demo-pairs", type=int, default=32)
    p.add_argument("--max-completion-length", type=int, default=128)
    p.add_argument("--variants", default="on,off", help="comma-separated: on, off (vision_feature_cache)")
    p.add_argument("--use-vllm", action="store_true", help="also run the variants through vLLM colocate (vLLM installed)")
    p.add_argument("--train-arg", action="append", default=[], metavar="ARG",
                   help="extra train_grpo.py argument (repeatable), e.g. --train-arg=--num-generations=4")
    return p.parse_args(argv)


class StepMeter:
    """A ``TrainerCallback``-compatible recorder: per optimizer step its wall time, peak memory and the
    vision towers' time / images / calls (policy and reference model, via :class:`TowerMeter`)."""

    def __init__(self, label: str, trainer: Any) -> None:
        self.label, self.trainer = label, trainer  # trainer: () -> the trainer being run
        self.rows: list[dict[str, Any]] = []
        self.meters: list[Any] = []
        self._start = 0.0
        self._start_gib: float | None = None

    def callback(self) -> Any:
        from transformers import TrainerCallback

        meter = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):  # noqa: D401
                meter.watch(meter.trainer())

            def on_step_begin(self, args, state, control, **kw):  # noqa: D401
                meter.step_begin()

            def on_step_end(self, args, state, control, **kw):  # noqa: D401
                meter.step_end(state.global_step)

        return _Callback()

    def watch(self, trainer: Any) -> None:
        from differad_rl.integrations.qwen_vl.vision_cache import TowerMeter

        self.meters = [TowerMeter(m) for m in (trainer.model, getattr(trainer, "ref_model", None)) if m is not None]

    @staticmethod
    def _cuda() -> Any:
        import torch

        return torch.cuda if torch.cuda.is_available() else None

    def step_begin(self) -> None:
        cuda = self._cuda()
        if cuda is not None:
            cuda.synchronize()
            cuda.reset_peak_memory_stats()
        for m in self.meters:
            m.reset()
        self._start_gib = cuda.memory_allocated() / 2**30 if cuda is not None else None
        self._start = time.perf_counter()

    def step_end(self, step: int) -> None:
        cuda = self._cuda()
        if cuda is not None:
            cuda.synchronize()
        row = {
            "step": step,
            "seconds": time.perf_counter() - self._start,
            "start_gib": self._start_gib,
            "peak_gib": cuda.max_memory_allocated() / 2**30 if cuda is not None else None,
            "tower_seconds": sum(m.seconds for m in self.meters),
            "tower_calls": sum(m.calls for m in self.meters),
            "tower_images": sum(m.images for m in self.meters),
            "tower_backward_calls": sum(m.backward_calls for m in self.meters),
        }
        self.rows.append(row)
        peak = f"{row['peak_gib']:.1f} GiB" if row["peak_gib"] is not None else "n/a (CPU)"
        print(f"{self.label} step {step}: {row['seconds']:.1f} s, peak {peak}, vision tower "
              f"{row['tower_seconds']:.2f} s in {row['tower_calls']} calls ({row['tower_images']} images)", flush=True)

    def close(self) -> None:
        for m in self.meters:
            m.remove()
        self.meters = []


def variants(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(label, extra train_grpo.py arguments) per run."""
    out = []
    for v in [x.strip() for x in args.variants.split(",") if x.strip()]:
        if v not in ("on", "off"):
            raise SystemExit(f"--variants: expected 'on' / 'off', got {v!r}")
        out.append((f"cache={v}", ["--set", f"vision_feature_cache={'true' if v == 'on' else 'false'}"]))
    # vLLM colocate: the same variants again with generation (and regeneration) through TRL's vLLM path;
    # main() points them at a copy of the model folder carrying the run's pixel budget (folder_for_vllm).
    if args.use_vllm:
        vllm = ["--use-vllm", "--vllm-mode", "colocate", "--set", "vllm_gpu_memory_utilization=0.35",
                "--set", "vllm_max_model_length=8192"]  # as examples/trl/gpu_check_vllm.sh
        out += [(f"{label} vllm", [*extra, *vllm]) for label, extra in list(out)]
    return out


def folder_for_vllm(src: str | Path, dst: str | Path, max_pixels: int = 1003520) -> Path:
    """A copy of model folder ``src`` at ``dst`` whose processor carries ``max_pixels`` (weights linked, not copied).

    vLLM builds its own image processor from the model folder, so the folder must hold the pixel budget the
    run uses (``train_grpo.py --use-vllm`` refuses a folder whose budget differs from the run's).
    """
    import shutil

    from differad_rl.integrations.qwen_vl.loading import load_processor

    src, dst = Path(src), Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            (dst / f.name).symlink_to(f.resolve())
        elif f.is_dir():
            shutil.copytree(f, dst / f.name)
        else:
            shutil.copy2(f, dst / f.name)
    load_processor(str(dst), max_pixels=max_pixels).save_pretrained(str(dst))
    return dst


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    import torch

    import train_grpo
    from differad_rl.integrations.trl import DifferADGRPOTrainer

    model = args.model
    if model is None:
        from differad_rl.integrations.testing import build_hub_fixture

        start = time.perf_counter()
        device = "cuda" if torch.cuda.is_available() else None
        model = str(build_hub_fixture(REPO, work / "fixture-3b-full", full_size=True, device=device))
        print(f"full-size fixture {model} ({time.perf_counter() - start:.0f} s)", flush=True)
    summary: dict[str, Any] = {"model": model, "steps": args.steps, "demo_size": args.demo_size,
                               "max_completion_length": args.max_completion_length, "runs": {}}
    built: list[Any] = []
    original_init = DifferADGRPOTrainer.__init__

    def init(self: Any, *a: Any, **k: Any) -> None:  # the trainer train_grpo builds, to hook its towers
        original_init(self, *a, **k)
        built.append(self)

    DifferADGRPOTrainer.__init__ = init  # type: ignore[method-assign]
    try:
        runs = variants(args)
        vllm_model = str(folder_for_vllm(model, work / "model_for_vllm")) if args.use_vllm else model
        for label, extra in runs:
            built.clear()
            meter = StepMeter(label, lambda: built[-1])

            argv_run = ["--paper", "--model", vllm_model if "--use-vllm" in extra else model, "--output-dir", str(work / label.replace(" ", "_").replace("=", "-")),
                        "--max-steps", str(args.steps), "--demo-pairs", str(args.demo_pairs),
                        "--demo-size", str(args.demo_size), "--max-completion-length", str(args.max_completion_length),
                        "--eval-split", "", *extra, *args.train_arg]
            print(f"== {label}: train_grpo.py {' '.join(argv_run)}", flush=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            try:
                train_grpo.main(argv_run, callbacks=(meter.callback(),))
            finally:
                meter.close()
            cache = getattr(built[-1], "vision_cache", None) if built else None
            summary["runs"][label] = {"steps": meter.rows, "cache_on": cache is not None}
            del cache
            built.clear()  # release the run's model, optimizer and reference model before the next one
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    finally:
        DifferADGRPOTrainer.__init__ = original_init  # type: ignore[method-assign]
    runs = summary["runs"]
    if "cache=on" in runs and "cache=off" in runs:
        def later(rows: list[dict[str, Any]], key: str) -> float:
            rest = rows[1:] or rows  # the first step carries start-up costs
            return sum(r[key] for r in rest) / len(rest)

        on, off = runs["cache=on"]["steps"], runs["cache=off"]["steps"]
        summary["ratios"] = {
            "step_off_over_on": later(off, "seconds") / later(on, "seconds"),
            "tower_off_over_on": later(off, "tower_seconds") / max(later(on, "tower_seconds"), 1e-9),
            "peak_on_minus_off_gib": (max(r["peak_gib"] for r in on) - max(r["peak_gib"] for r in off))
            if on[0]["peak_gib"] is not None else None,
        }
    (work / "bench.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: summary[k] for k in ("model", "ratios") if k in summary}))
    return summary


if __name__ == "__main__":
    main()
