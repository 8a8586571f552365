"""Run the whole ablation: ``python examples/ablation/run.py`` (full, ≤ 15 min on 2 CPU cores) or
``python examples/ablation/run.py --quick`` (CI smoke run, about a minute; checks only that the
pipeline works, the numbers mean nothing).

Steps: (1) signal-density simulation → ``density.md`` / ``density.png``, rewards of canonical answers →
``size_bias.md``; (2) the demo pairs
(``differad_rl.data.build_demo_pairs``, cached in the temp folder); (3) one supervised cold start
per seed; (4) every arm × seed with GRPO at an equal generation budget → ``ablation.md``,
``curves.png``, ``runs.json`` in ``--out`` (default ``examples/ablation/results`` for the full run;
a ``--quick`` run writes to a temp folder, ``<tmp>/differad-rl-ablation-quick``, and refuses to write
over the committed results: a smoke run never replaces published numbers).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, replace

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from arms import ARMS, arms_by_name  # noqa: E402
from atomic_io import write_json, write_text  # noqa: E402
from cold_start import ColdStartConfig, cold_start  # noqa: E402
from pairs import PairTensors, load_demo_splits  # noqa: E402
from policy import BoxPolicy  # noqa: E402
from report import arms_markdown, curves_plot  # noqa: E402
from size_bias import canonical_markdown, canonical_rewards  # noqa: E402
from signal_density import DensityConfig, density_markdown, density_plot, run_density  # noqa: E402
from training import TrainConfig, evaluate, train_arm  # noqa: E402

_DATA: dict[str, PairTensors] = {}


def _init_worker(data_path: str) -> None:
    torch.set_num_threads(1)
    _DATA.update(torch.load(data_path, weights_only=False))


def _job(job: tuple) -> tuple:
    """Worker entry: ("cold", seed, cfg, width) or ("arm", arm, cfg, seed, state)."""
    if job[0] == "cold":
        _, seed, cs_cfg, width = job
        torch.manual_seed(seed)
        policy = BoxPolicy(width=width, res=_DATA["train"].images.shape[-1])
        state = cold_start(policy, _DATA["train"], cs_cfg, seed)
        return ("cold", seed, state, evaluate(policy, _DATA["test"]))
    _, arm, cfg, seed, state = job
    return ("arm", train_arm(arm, cfg, _DATA["train"], _DATA["test"], seed, state))


class _Runner:
    """Jobs in ``workers`` spawned processes (one pool for the whole study) or in-process for 1."""

    def __init__(self, workers: int, data_path: str):
        self.pool = None
        if workers <= 1:
            _init_worker(data_path)
        else:
            import multiprocessing as mp

            self.pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(data_path,))

    def map(self, jobs: list[tuple], bar: tqdm):
        """Yield job results as they finish, advancing ``bar`` once per job."""
        results = map(_job, jobs) if self.pool is None else self.pool.imap_unordered(_job, jobs)
        for out in results:
            bar.update(1)
            yield out

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()


RESULTS = os.path.join(HERE, "results")
QUICK_OUT = os.path.join(tempfile.gettempdir(), "differad-rl-ablation-quick")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny CI run: checks the pipeline, not the claims")
    ap.add_argument("--out", default=None,
                    help="output folder (default: examples/ablation/results; with --quick a temp folder)")
    ap.add_argument("--data-dir", default=None, help="demo pair folder (default: a cached temp folder)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per arm (default 3; quick 1)")
    ap.add_argument("--workers", type=int, default=None, help="processes (default 2; quick 1)")
    ap.add_argument("--arms", nargs="*", default=None, help=f"subset of {[a.name for a in ARMS]}")
    ap.add_argument("--budget", type=int, default=None, help="generations per run (default 15360)")
    ap.add_argument("--pairs", type=int, default=None, help="demo pairs (default 600; quick 32)")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    quick = args.quick
    if args.out is None:
        args.out = QUICK_OUT if quick else RESULTS
    elif quick and os.path.realpath(args.out) == os.path.realpath(RESULTS):
        print(f"run.py: error: --quick would overwrite the published results in {RESULTS}; "
              "give another --out (a smoke run's numbers mean nothing)", file=sys.stderr)
        return 2
    seeds = args.seeds if args.seeds is not None else (1 if quick else 3)
    workers = args.workers if args.workers is not None else (1 if quick else 2)
    n_pairs = args.pairs if args.pairs is not None else (32 if quick else 600)
    for name, v in (("seeds", seeds), ("workers", workers), ("pairs", n_pairs)):
        if v < 1:
            raise ValueError(f"--{name} must be >= 1, got {v}")
    arms = arms_by_name(args.arms)
    size, res = (64, 32) if quick else (128, 64)
    cfg = TrainConfig(budget=512 if quick else 15360, eval_points=2 if quick else 6)
    if args.budget is not None:
        cfg = replace(cfg, budget=args.budget)
    cs_cfg = ColdStartConfig(steps=3 if quick else 100)
    dcfg = (
        DensityConfig(sides=(0.05, 0.2), offsets=(0.05, 0.15), groups=64)
        if quick
        else DensityConfig(groups=2000)
    )
    os.makedirs(args.out, exist_ok=True)

    # 1. signal density
    cells = len(dcfg.sides) * len(dcfg.offsets)
    with tqdm(total=cells, desc="signal density", unit="cell") as bar:
        rows = run_density(dcfg, progress=bar.update)
    write_text(os.path.join(args.out, "density.md"), density_markdown(rows, dcfg.kinds))
    write_json(os.path.join(args.out, "density.json"), {"config": asdict(dcfg), "rows": rows})
    density_plot(rows, os.path.join(args.out, "density.png"), dcfg.kinds)
    write_text(os.path.join(args.out, "size_bias.md"), canonical_markdown(canonical_rewards()))

    # 2. data
    tmp_root = tempfile.mkdtemp(prefix="differad-ablation-")
    data_dir = args.data_dir or os.path.join(
        tempfile.gettempdir(), "differad_ablation", f"demo-{n_pairs}-{size}-0"
    )
    train, test, _ = load_demo_splits(data_dir, n_pairs=n_pairs, size=size, seed=0, res=res)
    data_path = os.path.join(tmp_root, "tensors.pt")
    torch.save({"train": train, "test": test}, data_path)

    # 3. cold start per seed, 4. arms × seeds
    states: dict[int, dict] = {}
    cold_metrics: dict[int, dict] = {}
    runs: list[dict] = []
    total = seeds + len(arms) * seeds
    runner = _Runner(workers, data_path)
    try:
        with tqdm(total=total, desc="cold starts + runs", unit="run") as bar:
            for out in runner.map([("cold", s, cs_cfg, cfg.width) for s in range(seeds)], bar):
                states[out[1]], cold_metrics[out[1]] = out[2], out[3]
            jobs = [("arm", a, cfg, s, states[s]) for s in range(seeds) for a in arms]
            for out in runner.map(jobs, bar):
                runs.append(out[1])
    finally:
        runner.close()
    runs.sort(key=lambda r: ([a.name for a in arms].index(r["arm"]), r["seed"]))
    elapsed = time.perf_counter() - t0

    table = arms_markdown(arms, runs)
    meta = (
        f"Demo pairs: {len(train)} train / {len(test)} held-out (build_demo_pairs(n_pairs={n_pairs}, size={size}, "
        f"seed=0), policy input {res}²); "
        f"budget {cfg.budget} generations per run, {cfg.prompts_per_step} prompts × G = {cfg.group_size} per step, "
        f"lr {cfg.lr}, initial σ {cfg.init_std}, cold start {cs_cfg.steps} steps; {seeds} seed(s); "
        f"{workers} worker(s); whole study {elapsed / 60:.1f} min wall clock"
        f"{' (QUICK smoke run: numbers are meaningless)' if quick else ''}.\n"
    )
    write_text(os.path.join(args.out, "ablation.md"), meta + "\n" + table)
    write_json(
        os.path.join(args.out, "runs.json"),
        {"train_config": asdict(cfg), "cold_start": asdict(cs_cfg), "cold_metrics": cold_metrics,
         "seconds": elapsed, "runs": runs},
    )
    curves_plot(arms, runs, os.path.join(args.out, "curves.png"))
    print(meta)
    print(table)

    # The quick run asserts only that the pipeline works.
    assert len(runs) == len(arms) * seeds, "a run is missing"
    for r in runs:
        assert r["generations"] >= cfg.budget, f"{r['arm']}: budget not consumed"
        assert r["steps"] >= 1, f"{r['arm']}: no update step"
        for k in ("miou", "acc", "f1"):
            assert math.isfinite(r["final"][k]) and 0.0 <= r["final"][k] <= 1.0, f"{r['arm']}: bad {k}"
    for name in ("density.md", "density.png", "size_bias.md", "ablation.md", "curves.png", "runs.json"):
        assert os.path.getsize(os.path.join(args.out, name)) > 0, f"{name} not written"
    return 0


if __name__ == "__main__":
    sys.exit(main())
