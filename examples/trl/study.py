#!/usr/bin/env python
"""The ablation on the real trainer: ARMS × SEEDS of ``DifferADGRPOTrainer`` from one cold start, at an equal
generation budget, scored on the held-out split by predict + eval (three seeds for the spread).

Every run is ``train_grpo.py --recipe learner --model COLD_START`` (its own code path, called in process)
with the arm's options, stopped by :class:`GenerationBudget` as soon as the completions it sampled —
regenerated groups included (``differad/regenerations`` × G) — reach ``--budget``. Then the final checkpoint
answers the held-out pairs greedily with the protocol's prompt
(:func:`differad_rl.integrations.qwen_vl.predict.predict_records`) and is scored by
:func:`differad_rl.eval.protocol.evaluate_records` (mIoU, Acc@0.3, F1@0.3) beside box-shape statistics
(:func:`box_shape_stats`) that show collapse modes. The cold start itself is evaluated once (reference row).

    python examples/trl/study.py                       # every arm × seeds 0,1,2 → examples/trl/study_results
    python examples/trl/study.py --arms dclr_sides_enclosing --seeds 0,1,2   # the recommended arm's spread
    python examples/trl/study.py --quick               # smoke run: 1 seed, 2 arms, 2 steps, temp folder

Output (``--out``): ``<arm>/<seed>/`` (``result.json``, ``curve.jsonl``, ``predictions.jsonl``,
``train.log``, train_grpo's ``train/metrics.jsonl`` and ``summary.json``), ``cold_start/``, ``study.md`` /
``study.json`` (mean ± std over seeds), ``curves.png`` (reward, localization reward, rollout mIoU vs
generations, one line per arm), ``heldout.png`` (held-out bars), and ``runs.tar.xz``: the raw per-run folders
(``cold_start/``, ``<arm>/<seed>/``) in one archive — the repository keeps only the summary and this archive
(the raw folders are git-ignored). Finished runs are skipped (resumable; a run whose options, model, data or
budget changed is run again); run files missing on disk are first restored from ``runs.tar.xz``, so a fresh
checkout resumes the committed study. ``--quick`` writes to a temp folder and refuses to write into the
committed results.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

#: the committed results of the full study
RESULTS = HERE / "study_results"
#: the raw per-run folders of a study, in one archive beside its study.md
RUNS_ARCHIVE = "runs.tar.xz"
QUICK_OUT = Path(tempfile.gettempdir()) / "differad-rl-study-quick"
DATA_CACHE = Path(tempfile.gettempdir()) / "differad-rl-study-data"
#: measured on the project's 2-core CPU machine (learner recipe, one thread per run)
STEP_SECONDS_PER_32 = 3.5  # one GRPO step of 32 completions
PREDICT_SECONDS_PER_100 = 15.0  # greedy held-out predict of 100 pairs
RUN_OVERHEAD_SECONDS = 10.0  # imports, loading and saving the model


# ------------------------------------------------------------------------------- arms
@dataclass(frozen=True)
class Arm:
    """One arm: a description and ``train_grpo.py`` options on top of the learner recipe (the recommended
    settings: DCLR sides + enclosing, format reward, difficulty weights ω, K = 2 resampling rounds).

    ``options``: ``{"rewards": "iou,format"}`` → ``--rewards iou,format``; ``True`` → a flag; ``"set"`` →
    ``--set FIELD=VALUE`` per item (any ``DifferADGRPOConfig`` field, e.g. the peers' options)."""

    description: str
    options: dict[str, Any] = field(default_factory=dict)

    def argv(self) -> list[str]:
        out: list[str] = []
        for key, value in self.options.items():
            if key == "set":
                for name, v in value.items():
                    out += ["--set", f"{name}={json.dumps(v) if not isinstance(v, str) else v}"]
            elif value is True:
                out.append("--" + key.replace("_", "-"))
            else:
                out += ["--" + key.replace("_", "-"), str(value)]
        return out


RECOMMENDED = "dclr_sides_enclosing"
ARMS: dict[str, Arm] = {
    "iou": Arm("continuous IoU (VLM-R1) instead of DCLR", {"rewards": "iou,format"}),
    "dclr_paper": Arm("the paper's DCLR (area term, centre distance / larger diagonal)",
                      {"size_term": "area", "center_norm": "paper"}),
    RECOMMENDED: Arm("recommended: DCLR sides + enclosing, ω on, K = 2 resampling rounds", {}),
    "iou_threshold": Arm("IoU > 0.5 → 1 (AnomalyR1, Visual-RFT)", {"rewards": "iou_threshold,format"}),
    "iou_squared": Arm("IoU² (Perception-R1)", {"rewards": "iou_squared,format"}),
    "giou": Arm("GIoU mapped to [0, 1] (torchvision)", {"rewards": "giou,format"}),
    "no_weights": Arm("ω off (no difficulty weights)", {"no_difficulty_weights": True}),
    "no_resampling": Arm("K = 0: no resampling, no filtering", {"resample_rounds": 0}),
    "emit_reroll": Arm("EMIT's re-roll: K = 2 rounds on groups with no DCLR > 0.5",
                       {"set": {"degeneracy_rule": "emit", "correct_threshold": 0.5}}),
    "dapo_filter": Arm("DAPO-style: K = 0, zero-variance groups replaced by new prompts (2 refill rounds), "
                       "the rest dropped from the loss",
                       {"resample_rounds": 0, "set": {"group_filter": "dapo", "group_filter_refill_rounds": 2}}),
    "dapo_drop": Arm("DAPO's filter without refill: K = 0, zero-variance groups dropped from the loss",
                     {"resample_rounds": 0, "set": {"group_filter": "dapo"}}),
    "easyr1_filter": Arm("EasyR1-style: K = 0, groups with mean outside (0.01, 0.99) replaced by new prompts "
                         "(2 refill rounds), the rest dropped",
                         {"resample_rounds": 0, "set": {"group_filter": "easyr1", "group_filter_refill_rounds": 2}}),
    "emit_weights": Arm("EMIT's weights × (1 + share wrong, DCLR ≤ 0.5) instead of ω",
                        {"no_difficulty_weights": True,
                         "set": {"advantage_weighting": "emit", "correct_threshold": 0.5}}),
    "univg_weights": Arm("UniVG-R1's weight exp(1 − batch mean DCLR) instead of ω (its released form)",
                         {"no_difficulty_weights": True, "set": {"advantage_weighting": "univg", "univg_form": "exp"}}),
}
#: available with --arms, not in the default list
EXTRA_ARMS: dict[str, Arm] = {
    "diou": Arm("DIoU mapped to [0, 1] (torchvision)", {"rewards": "diou,format"}),
    "ciou": Arm("CIoU mapped to [0, 1] (torchvision)", {"rewards": "ciou,format"}),
}
QUICK_ARMS = ("iou", RECOMMENDED)


def arms_by_name(names: list[str]) -> dict[str, Arm]:
    known = {**ARMS, **EXTRA_ARMS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"study.py: error: --arms: unknown arm {unknown[0]!r}; known: {', '.join(known)}")
    return {n: known[n] for n in names}


# ------------------------------------------------------------------------------- the budget rule
def make_budget_callback(budget: int, curve_path: Path) -> Any:
    """A ``TrainerCallback`` that stops training at the first step at which the completions sampled so far,
    ``Σ (batch + (differad/regenerations + differad/refills) × G)``, reach ``budget``; it writes one row per
    step to ``curve_path``.

    Needs one generation per optimiser step and a log every step (``logging_steps = 1``,
    ``steps_per_generation = 1``, as in the learner recipe); anything else raises at the start of training."""
    from transformers import TrainerCallback

    class GenerationBudget(TrainerCallback):
        def __init__(self) -> None:
            self.budget = int(budget)
            self.generations = 0
            self.rows: list[dict[str, Any]] = []
            self.per_step = 0
            self.group = 0

        def on_train_begin(self, args, state, control, **kw):  # noqa: D401
            spg = getattr(args, "steps_per_generation", 1) or 1
            if args.logging_steps != 1 or spg != 1:
                raise ValueError(f"GenerationBudget counts one generation per logged step; got logging_steps="
                                 f"{args.logging_steps}, steps_per_generation={spg} (set both to 1)")
            self.per_step = int(args.per_device_train_batch_size) * int(args.world_size)
            self.group = int(args.num_generations)

        def on_log(self, args, state, control, logs=None, **kw):  # noqa: D401
            if not logs or "reward" not in logs:
                return
            regen = int(round(float(logs.get("differad/regenerations") or 0.0)))  # same prompt again
            regen += int(round(float(logs.get("differad/refills") or 0.0)))  # new prompts (group filter refill)
            sampled = self.per_step + regen * self.group
            self.generations += sampled
            loc = [k for k in logs if k.startswith("rewards/") and k.endswith("/mean")
                   and not k.startswith(("rewards/format", "rewards/rollout_iou"))]
            row = {"step": state.global_step, "sampled": sampled, "regenerated": regen * self.group,
                   "generations": self.generations, "reward": logs.get("reward"),
                   "localization": logs.get(loc[0]) if loc else None,
                   "localization_reward": loc[0].split("/")[1] if loc else None,
                   "dclr": logs.get("rewards/dclr_reward/mean"), "miou": logs.get("rewards/rollout_iou/mean"),
                   "degenerate_before": logs.get("differad/degenerate_before"),
                   "filtered": logs.get("differad/filtered"), "weight_mean": logs.get("differad/weight_mean")}
            self.rows.append(row)
            if state.is_world_process_zero:
                with curve_path.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
            if self.generations >= self.budget:
                control.should_training_stop = True
            return control

    return GenerationBudget()


# ------------------------------------------------------------------------------- box shapes
def box_shape_stats(pred_boxes: Any, pred_valid: Any, gt_boxes: list[list[Any]], widths: Any, heights: Any,
                    full_share: float = 0.9) -> dict[str, float | None]:
    """Shape statistics of predicted boxes (original pixels) vs the ground truth, so that collapse shows.

    * ``area_ratio_median``: median of area(pred) / area(gt) over anomalous targets with a non-zero valid
      box (gt = the target's largest ground-truth box); ``None`` when there is none.
    * ``aspect_median`` / ``aspect_median_gt``: median width / height of those predicted / gt boxes.
    * ``full_image_share``: share of all samples whose box covers ≥ ``full_share`` of the image.
    * ``zero_box_share``: share of all samples answering the zero box (``normal_share``: share of normal
      targets, what a perfect model answers with the zero box); ``invalid_share``: no parsable box.
    """
    p = np.asarray(pred_boxes, dtype=np.float64).reshape(-1, 4)
    valid = np.asarray(pred_valid, dtype=bool) & np.isfinite(p).all(axis=1)
    w, h = np.asarray(widths, dtype=np.float64), np.asarray(heights, dtype=np.float64)
    n = len(p)
    pw, ph = np.clip(p[:, 2] - p[:, 0], 0, None), np.clip(p[:, 3] - p[:, 1], 0, None)
    pw, ph = np.where(valid, pw, 0.0), np.where(valid, ph, 0.0)
    zero = valid & (np.nan_to_num(np.abs(p)).sum(axis=1) == 0)
    boxed = valid & (pw > 0) & (ph > 0)
    ratios, aspects, aspects_gt = [], [], []
    for i, gts in enumerate(gt_boxes):
        gts = [g for g in gts if (g[2] - g[0]) > 0 and (g[3] - g[1]) > 0]
        if not gts:
            continue
        g = max(gts, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
        gw, gh = g[2] - g[0], g[3] - g[1]
        aspects_gt.append(gw / gh)
        if boxed[i]:
            ratios.append(pw[i] * ph[i] / (gw * gh))
            aspects.append(pw[i] / ph[i])

    def med(xs: list[float]) -> float | None:
        return float(np.median(xs)) if xs else None

    return {
        "area_ratio_median": med(ratios),
        "aspect_median": med(aspects),
        "aspect_median_gt": med(aspects_gt),
        "full_image_share": float((boxed & (pw * ph >= full_share * w * h)).mean()) if n else 0.0,
        "zero_box_share": float(zero.mean()) if n else 0.0,
        "normal_share": float(np.mean([not any(gts) for gts in gt_boxes])) if n else 0.0,
        "invalid_share": float((~valid).mean()) if n else 0.0,
    }


def evaluate_checkpoint(ckpt: Path, records: list[Any], preds_path: Path, label: str) -> dict[str, Any]:
    """Greedy predict + eval of a checkpoint on ``records``: protocol metrics and :func:`box_shape_stats`."""
    from differad_rl.eval.protocol import EvalConfig, evaluate_records, read_predictions
    from differad_rl.integrations.qwen_vl.loading import load_model_and_processor
    from differad_rl.integrations.qwen_vl.predict import PredictConfig, predict_records

    model, processor = load_model_and_processor(ckpt, training=False)
    if preds_path.exists():
        preds_path.unlink()  # a fresh checkpoint: never resume another one's answers
    predict_records(model, processor, records, preds_path, model_name=label,
                    config=PredictConfig(batch_size=16, max_new_tokens=64), progress=False)
    res = evaluate_records(read_predictions(preds_path), records, EvalConfig(reasoning=True))
    shape = box_shape_stats(res.pred_boxes, res.pred_valid, res.gt_boxes, [r.width for r in records],
                            [r.height for r in records])
    m = res.metrics
    return {"overall": m["overall"], "anomalous": m["anomalous"], "normal": m["normal"], "shape": shape}


# ------------------------------------------------------------------------------- one run
def _atomic_json(path: Path, obj: Any) -> None:
    from differad_rl.data.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2))


def _finished(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return result if result.get("key") == key else None


def _owner_free(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def unpack_runs(out: Path) -> list[str]:
    """Restore from ``out/runs.tar.xz`` every run file missing on disk (a checkout holds only the archive);
    files already on disk are kept. Returns the archive's top-level folders (``cold_start`` and the arms);
    no archive → ``[]``."""
    path = out / RUNS_ARCHIVE
    if not path.is_file():
        return []
    with tarfile.open(path, "r:xz") as tar:
        members = tar.getmembers()
        missing = [m for m in members if m.isfile() and not (out / m.name).exists()]
        tar.extractall(out, members=missing, filter="data")
    return sorted({m.name.split("/", 1)[0] for m in members})


def pack_runs(out: Path, names: list[str]) -> Path:
    """Write ``out/runs.tar.xz`` (atomically) holding the folders ``names`` of ``out`` that exist — the raw
    per-run outputs; ``study.md``, ``study.json`` and the charts stay beside it, uncompressed."""
    path = out / RUNS_ARCHIVE
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w:xz") as tar:
        for name in sorted(set(names)):
            if (out / name).is_dir():
                tar.add(out / name, arcname=name, filter=_owner_free)
    os.replace(tmp, path)
    return path


@contextlib.contextmanager
def _logged(path: Path):
    with path.open("a") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        yield


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train one arm × seed with train_grpo's ``main`` under the budget, evaluate it, write ``result.json``."""
    import train_grpo

    from differad_rl.data.records import load_pairs

    run_dir = Path(job["run_dir"])
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an unfinished or outdated run starts over
    run_dir.mkdir(parents=True)
    train_dir = run_dir / "train"
    argv = [*job["argv"], "--output-dir", str(train_dir)]
    start = time.time()
    with _logged(run_dir / "train.log"):
        print("train_grpo.py " + " ".join(argv), flush=True)
        cb = make_budget_callback(job["budget"], run_dir / "curve.jsonl")
        rc = train_grpo.main(argv, callbacks=(cb,))
        if rc != 0:
            raise RuntimeError(f"train_grpo.main returned {rc} for {run_dir}")
        train_s = time.time() - start
        held_out = [r for r in load_pairs(job["data"]) if r.split == "test"]
        ev = evaluate_checkpoint(train_dir / "checkpoint", held_out, run_dir / "predictions.jsonl",
                                 f"{job['arm']}/seed{job['seed']}")
    if not job.get("keep_checkpoints"):
        for name in ("checkpoint", "trainer", "tiny_models", "pairs.jsonl", "reward_curve.png"):
            target = train_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    rows = cb.rows
    result = {
        "key": job["key"], "arm": job["arm"], "seed": job["seed"], "argv": argv,
        "steps": len(rows), "generations": cb.generations,
        "regenerated": int(sum(r["regenerated"] for r in rows)), "budget": job["budget"],
        "train_s": round(train_s, 1), "wall_s": round(time.time() - start, 1), **ev,
    }
    _atomic_json(run_dir / "result.json", result)
    return result


def cold_start_result(out: Path, model: str, data: Path, key: dict[str, Any]) -> dict[str, Any]:
    """The cold start's held-out evaluation (once; ``out/cold_start/result.json``)."""
    from differad_rl.data.records import load_pairs

    path = out / "cold_start" / "result.json"
    done = _finished(path, key)
    if done is not None:
        return done
    path.parent.mkdir(parents=True, exist_ok=True)
    held_out = [r for r in load_pairs(data) if r.split == "test"]
    with _logged(path.parent / "eval.log"):
        ev = evaluate_checkpoint(Path(model), held_out, path.parent / "predictions.jsonl", "cold start")
    result = {"key": key, "arm": "cold start", **ev}
    _atomic_json(path, result)
    return result


# ------------------------------------------------------------------------------- summary
METRICS = (("mIoU", ("overall", "miou")), ("Acc@0.3", ("overall", "acc")), ("F1@0.3", ("overall", "f1")),
           ("area ratio", ("shape", "area_ratio_median")), ("aspect", ("shape", "aspect_median")),
           ("full-image", ("shape", "full_image_share")), ("zero box", ("shape", "zero_box_share")),
           ("invalid", ("shape", "invalid_share")))


def _get(result: dict[str, Any], path: tuple[str, ...]) -> float | None:
    v: Any = result
    for k in path:
        v = v.get(k) if isinstance(v, dict) else None
    return None if v is None else float(v)


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None, int]:
    xs = [v for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return None, None, 0
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0, len(xs)


def summarize(cold: dict[str, Any], runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """``{"rows": [{"arm", "seeds", <metric>: {"mean", "std", "n"}, ...}]}``; the cold start is the first row."""
    rows = []
    for arm, results in [("cold start", [cold]), *runs.items()]:
        row: dict[str, Any] = {"arm": arm, "seeds": [r.get("seed") for r in results]}
        for name, path in METRICS:
            mean, std, n = _mean_std([_get(r, path) for r in results])
            row[name] = {"mean": mean, "std": std, "n": n}
        for name in ("generations", "steps", "regenerated", "wall_s"):
            mean, std, n = _mean_std([r.get(name) for r in results])
            row[name] = {"mean": mean, "std": std, "n": n}
        rows.append(row)
    return {"rows": rows}


def _cell(stat: dict[str, Any], spec: str = ".3f") -> str:
    if stat["mean"] is None:
        return "–"
    if stat["n"] > 1:
        return f"{stat['mean']:{spec}} ± {stat['std']:{spec}}"
    return f"{stat['mean']:{spec}}"


def summary_markdown(summary: dict[str, Any], arms: dict[str, Arm]) -> str:
    head = ["arm", *[m for m, _ in METRICS], "generations", "steps", "regen."]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in summary["rows"]:
        cells = [row["arm"], *[_cell(row[m]) for m, _ in METRICS], _cell(row["generations"], ".0f"),
                 _cell(row["steps"], ".1f"), _cell(row["regenerated"], ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- `{name}`: {arm.description}" for name, arm in arms.items()]
    return "\n".join(lines) + "\n"


def save_plots(out: Path, runs: dict[str, list[dict[str, Any]]], summary: dict[str, Any]) -> list[Path]:
    """``curves.png`` (reward / localization reward / rollout mIoU vs generations, seed means) and
    ``heldout.png`` (mIoU, Acc@0.3, F1@0.3 per arm, error bar = std over seeds, cold start first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), dpi=100)
    colors = plt.cm.tab20(np.linspace(0, 1, max(1, len(runs))))
    for color, (arm, results) in zip(colors, runs.items()):
        curves = []
        for r in results:
            p = out / arm / str(r["seed"]) / "curve.jsonl"
            if p.is_file():
                curves.append([json.loads(line) for line in p.read_text().splitlines() if line.strip()])
        if not curves:
            continue
        n = min(len(c) for c in curves)
        gens = np.mean([[row["generations"] for row in c[:n]] for c in curves], axis=0)
        for ax, key in zip(axes, ("reward", "localization", "miou"), strict=True):
            ys = np.asarray([[np.nan if row[key] is None else row[key] for row in c[:n]] for c in curves], float)
            ax.plot(gens, np.nanmean(ys, axis=0) if np.isfinite(ys).any() else ys[0], label=arm, color=color)
    for ax, title in zip(axes, ("reward (the arm's own sum)", "localization reward (DCLR / IoU / … of the arm)",
                                "rollout mIoU (protocol)"), strict=True):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("completions sampled (regenerations included)")
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    paths.append(_save_fig(fig, out / "curves.png"))
    plt.close(fig)

    rows = summary["rows"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(rows) + 2), 4), dpi=100)
    x = np.arange(len(rows))
    for k, metric in enumerate(("mIoU", "Acc@0.3", "F1@0.3")):
        means = [row[metric]["mean"] or 0.0 for row in rows]
        stds = [row[metric]["std"] or 0.0 for row in rows]
        ax.bar(x + (k - 1) * 0.27, means, 0.27, yerr=stds, capsize=2, label=metric)
    ax.set_xticks(x, [row["arm"] for row in rows], rotation=35, ha="right", fontsize=8)
    ax.set_title("held-out split: greedy answers, mean ± std over seeds", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    paths.append(_save_fig(fig, out / "heldout.png"))
    plt.close(fig)
    return paths


def _save_fig(fig: Any, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


STUDY_MD = HERE / "STUDY.md"
BEGIN, END = "<!-- study:results:begin -->", "<!-- study:results:end -->"


def update_results_section(path: Path, text: str) -> None:
    """Replace what lies between the two result markers of ``path`` (STUDY.md) with ``text``, atomically."""
    from differad_rl.data.atomic import atomic_write_text

    doc = path.read_text()
    head, sep, rest = doc.partition(BEGIN)
    _, sep2, tail = rest.partition(END)
    if not (sep and sep2):
        raise ValueError(f"{path}: the markers {BEGIN} … {END} are missing; put them around the results section")
    atomic_write_text(path, f"{head}{BEGIN}\n{text.strip()}\n\n![curves](study_results/curves.png)\n"
                            f"![held-out](study_results/heldout.png)\n{END}{tail}")


# ------------------------------------------------------------------------------- driver
def estimate_seconds(n_runs: int, budget: int, test_pairs: int, workers: int, cold_start: bool = True) -> float:
    """Wall-time estimate on the project's 2-core machine (constants at the top of this file)."""
    per_run = budget / 32 * STEP_SECONDS_PER_32 + test_pairs / 100 * PREDICT_SECONDS_PER_100 + RUN_OVERHEAD_SECONDS
    cold = test_pairs / 100 * PREDICT_SECONDS_PER_100 + RUN_OVERHEAD_SECONDS if cold_start else 0.0
    return cold + math.ceil(n_runs / max(1, workers)) * per_run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from train_grpo import LEARNER_GRPO

    full_budget = LEARNER_GRPO["max_steps"] * LEARNER_GRPO["per_device_train_batch_size"]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="the cold-start checkpoint (default: examples/trl/cold_start)")
    p.add_argument("--arms", default=None, help=f"comma-separated (default: all {len(ARMS)}; quick: "
                                                 f"{','.join(QUICK_ARMS)}); also: {', '.join(EXTRA_ARMS)}")
    p.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2; quick 0)")
    p.add_argument("--budget", type=int, default=None,
                   help=f"completions per run, regenerations included (default {full_budget} = the default run's "
                        f"{LEARNER_GRPO['max_steps']} steps × {LEARNER_GRPO['per_device_train_batch_size']}; "
                        "quick: 2 steps)")
    p.add_argument("--out", default=None, help=f"default {RESULTS.relative_to(HERE.parents[1])} (quick: {QUICK_OUT})")
    p.add_argument("--quick", action="store_true", help="smoke run: the pipeline, not the claims")
    p.add_argument("--workers", type=int, default=None, help="runs in parallel, one thread each (default 2; quick 1)")
    p.add_argument("--data-dir", default=str(DATA_CACHE), help="cache of the demo pairs")
    p.add_argument("--demo-pairs", type=int, default=None, help="default: the learner recipe's (quick: 40)")
    p.add_argument("--demo-size", type=int, default=None, help="default: the learner recipe's (quick: 64)")
    p.add_argument("--train-args", default="", help="more train_grpo.py options for every run (one string)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoint and trainer folder")
    p.add_argument("--estimate", action="store_true", help="print the wall-time estimate and exit")
    return p.parse_args(argv)


def build_data(args: argparse.Namespace) -> Path:
    """The demo pairs every run trains on (train split) and is scored on (test split), built once."""
    from sft_cold_start import LEARNER_DEMO

    from differad_rl.data.demo import build_demo_pairs

    demo = dict(LEARNER_DEMO)
    if args.quick:
        demo.update(n_pairs=40, size=64, test_fraction=0.25)
    demo.update({k: v for k, v in (("n_pairs", args.demo_pairs), ("size", args.demo_size)) if v is not None})
    tag = hashlib.sha256(json.dumps(demo, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(args.data_dir) / f"demo-{demo['n_pairs']}x{demo['size']}-{tag}"
    return build_demo_pairs(folder, **demo, workers=1, progress=False)


def _jobs_pool(jobs: list[dict[str, Any]], workers: int, bar: Any) -> list[dict[str, Any]]:
    done = []
    if workers <= 1:
        for job in jobs:
            bar.set_postfix_str(f"{job['arm']}/{job['seed']}")
            done.append(run_one(job))
            bar.update()
        return done
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"), max_tasks_per_child=1) as ex:
        futures = {ex.submit(run_one, job): job for job in jobs}
        for fut in as_completed(futures):
            done.append(fut.result())
            bar.set_postfix_str(f"{futures[fut]['arm']}/{futures[fut]['seed']}")
            bar.update()
    return done


def main(argv: list[str] | None = None) -> int:
    import shlex

    args = parse_args(argv)
    from train_grpo import LEARNER_GRPO, SHIPPED_COLD_START
    from train_grpo import parse_args as grpo_args

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quick = args.quick
    out = Path(args.out) if args.out else (QUICK_OUT if quick else RESULTS)
    if quick and out.resolve() == RESULTS.resolve():
        raise SystemExit(f"study.py: error: --quick would write over the committed results in {RESULTS}; "
                         "give another --out (default: a temp folder)")
    model = args.model or str(SHIPPED_COLD_START)
    if not (Path(model) / "config.json").is_file():
        raise SystemExit(f"study.py: error: --model {model}: not a checkpoint folder (no config.json); "
                         "pass the cold start made by sft_cold_start.py --recipe learner")
    arms = arms_by_name(args.arms.split(",") if args.arms else list(QUICK_ARMS if quick else ARMS))
    try:
        seeds = [int(s) for s in (args.seeds or ("0" if quick else "0,1,2")).split(",")]
    except ValueError:
        raise SystemExit(f"study.py: error: --seeds {args.seeds}: expected comma-separated integers") from None
    extra = shlex.split(args.train_args)
    probe = grpo_args(["--recipe", "learner", *extra])
    batch = probe.batch_size or LEARNER_GRPO["per_device_train_batch_size"]
    budget = args.budget if args.budget is not None else (2 * batch if quick else LEARNER_GRPO["max_steps"] * batch)
    if budget < 1:
        raise SystemExit(f"study.py: error: --budget {budget}: must be >= 1 completion")
    workers = args.workers if args.workers is not None else (1 if quick else 2)

    data = build_data(args) if not args.estimate else None
    if data is None:
        n_test = 100
    else:
        from differad_rl.data.records import load_pairs

        n_test = sum(r.split == "test" for r in load_pairs(data))
    n_runs = len(arms) * len(seeds)
    est = estimate_seconds(n_runs, budget, n_test, workers)
    print(f"study: {len(arms)} arms × {len(seeds)} seeds = {n_runs} runs, budget {budget} completions "
          f"(≤ {math.ceil(budget / batch)} steps of {batch}), {n_test} held-out pairs, {workers} worker(s); "
          f"estimated wall time on 2 cores ≈ {est / 60:.0f} min (a full run from scratch)", flush=True)
    if args.estimate:
        return 0
    out.mkdir(parents=True, exist_ok=True)
    archived = unpack_runs(out)
    cold = cold_start_result(out, model, data, {"model": str(Path(model).resolve()), "data": str(data)})

    jobs, finished = [], {}
    for arm_name, arm in arms.items():
        for seed in seeds:
            grpo = ["--recipe", "learner", "--model", model, "--data", str(data), "--eval-split", "",
                    "--cold-start-steps", "0", "--seed", str(seed), "--max-steps", str(math.ceil(budget / batch)),
                    *extra, *arm.argv()]
            key = {"argv": grpo, "model": str(Path(model).resolve()), "data": str(data), "budget": budget}
            run_dir = out / arm_name / str(seed)
            done = _finished(run_dir / "result.json", key)
            if done is not None:
                finished[(arm_name, seed)] = done
                continue
            jobs.append({"arm": arm_name, "seed": seed, "argv": grpo, "key": key, "budget": budget,
                         "run_dir": str(run_dir), "data": str(data), "keep_checkpoints": args.keep_checkpoints})
    if finished:
        print(f"{len(finished)} finished run(s) skipped; {len(jobs)} to run "
              f"(≈ {estimate_seconds(len(jobs), budget, n_test, workers, cold_start=False) / 60:.0f} min)")
    from tqdm.auto import tqdm

    with tqdm(total=len(jobs), desc="study runs", unit="run") as bar:
        for r in _jobs_pool(jobs, workers, bar):
            finished[(r["arm"], r["seed"])] = r
    runs = {a: [finished[(a, s)] for s in seeds] for a in arms}
    summary = summarize(cold, runs)
    summary.update({"budget": budget, "seeds": seeds, "model": model, "data": str(data),
                    "command": "python examples/trl/study.py " + " ".join(shlex.quote(a) for a in
                                                                     (argv if argv is not None else sys.argv[1:])),
                    "arms": {n: {"description": a.description, "train_grpo": a.argv()} for n, a in arms.items()},
                    "quick": quick})
    md = summary_markdown(summary, arms)
    header = (f"# Study: {len(arms)} arms × seeds {','.join(map(str, seeds))}, budget {budget} completions"
              f"{' (QUICK smoke run: the numbers mean nothing)' if quick else ''}\n\n"
              f"Command: `{summary['command']}`; cold start `{model}`; {n_test} held-out pairs, greedy.\n"
              "Columns: held-out mIoU / Acc@0.3 / F1@0.3, median area ratio pred/gt and median aspect (w/h) of the "
              "predicted boxes on anomalous targets, shares of full-image, zero and invalid answers over all "
              "held-out pairs (mean ± std over seeds), completions sampled, steps and completions regenerated.\n\n")
    from differad_rl.data.atomic import atomic_write_text

    atomic_write_text(out / "study.md", header + md)
    _atomic_json(out / "study.json", summary)
    save_plots(out, runs, summary)
    pack_runs(out, [*archived, "cold_start", *arms])
    if not quick and out.resolve() == RESULTS.resolve():
        update_results_section(STUDY_MD, header.split("\n", 1)[1] + md)
    print(header + md)
    print(f"wrote {out / 'study.md'}, study.json, curves.png, heldout.png, {RUNS_ARCHIVE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
