"""Reward–IoU alignment on the stand-in policy's own samples: ``python examples/ablation/alignment.py``.

A diagnostic for section 3 of the README (why a denser reward need not train the IoU metric faster).
For each seed, the policy is the same supervised cold start the arms start from (``cold_start``,
seeded as in ``run.py``), with σ reset to ``TrainConfig.init_std``. On every *anomalous* training pair it
draws one group of G = 8 box answers (the "normal" head is switched off, so only localization is compared)
and scores them with every reward kind. Per group:

- **ρ(reward, IoU)**: within-group Spearman correlation between the reward and the boxes' IoU with the truth
  (ties averaged; a constant group counts as 0), i.e. how far the reward's advantage ranking agrees with
  the ranking the IoU metric would give. Reported over all groups and over the groups in which at least
  one box overlaps the truth (in the others IoU is constant and every ρ is 0 by definition).

Mean over groups, then mean ± std over seeds. Writes ``alignment.md`` to ``--out``; about 20 s.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from atomic_io import write_text  # noqa: E402
from cold_start import ColdStartConfig, cold_start  # noqa: E402
from differad_rl.boxes import box_iou  # noqa: E402
from pairs import PairTensors, load_demo_splits  # noqa: E402
from policy import BoxPolicy, sample_actions, to_boxes  # noqa: E402
from reward_kinds import REWARD_KINDS, REWARD_LABELS, score  # noqa: E402
from signal_density import _rowwise_spearman  # noqa: E402
from training import TrainConfig  # noqa: E402


def reward_iou_alignment(
    train: PairTensors, seed: int, cfg: TrainConfig, cs_cfg: ColdStartConfig, kinds: tuple[str, ...] = REWARD_KINDS
) -> dict[str, dict[str, float]]:
    """``{kind: {"rho_all", "rho_overlap", "overlap_share"}}`` for one seed's cold-start policy (docstring)."""
    torch.manual_seed(seed)
    policy = BoxPolicy(width=cfg.width, res=train.images.shape[-1])
    policy.load_state_dict(cold_start(policy, train, cs_cfg, seed))
    with torch.no_grad():
        policy.log_std.fill_(math.log(cfg.init_std))
        mu, log_std, _ = policy(train.images)
    idx = torch.nonzero(~(train.gt == 0).all(dim=1)).flatten()
    g = cfg.group_size
    never_normal = torch.full((idx.numel(),), -1e4)
    actions = sample_actions(mu[idx], log_std, never_normal, g, torch.Generator().manual_seed(seed))
    rep = idx.repeat_interleave(g)
    boxes = to_boxes(actions.z, actions.normal, train.width[rep], train.height[rep])
    gt = train.gt[rep]
    iou = box_iou(boxes.double(), gt.double()).reshape(-1, g).numpy()
    overlap = iou.max(axis=1) > 0
    valid = torch.ones(rep.numel(), dtype=torch.bool)
    out = {}
    for kind in kinds:
        r = score(kind, boxes, valid, gt).double().reshape(-1, g).numpy()
        rho = _rowwise_spearman(r, iou)
        out[kind] = {
            "rho_all": float(rho.mean()),
            "rho_overlap": float(rho[overlap].mean()) if overlap.any() else float("nan"),
            "overlap_share": float(overlap.mean()),
        }
    return out


def alignment_markdown(per_seed: list[dict[str, dict[str, float]]]) -> str:
    """Markdown table: one row per reward kind, mean ± std over seeds."""

    def ms(kind: str, key: str) -> str:
        a = np.array([s[kind][key] for s in per_seed])
        sd = a.std(ddof=1) if a.size > 1 else 0.0
        return f"{a.mean():.2f} ± {sd:.2f}"

    share = np.mean([s[REWARD_KINDS[0]]["overlap_share"] for s in per_seed])
    lines = [
        f"Cold-start policy, σ reset to the training value, G = 8 box answers per anomalous training pair; "
        f"{len(per_seed)} seed(s); {100 * share:.0f} % of groups have at least one overlapping box.\n",
        "| reward | ρ(reward, IoU), all groups | ρ(reward, IoU), groups with overlap |",
        "|---|---|---|",
    ]
    for kind in per_seed[0]:
        lines.append(f"| {REWARD_LABELS[kind]} | {ms(kind, 'rho_all')} | {ms(kind, 'rho_overlap')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="output folder")
    ap.add_argument("--data-dir", default=None, help="demo pair folder (default: run.py's cached temp folder)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds (cold starts), default 3")
    ap.add_argument("--pairs", type=int, default=600, help="demo pairs (default 600, as run.py)")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    torch.set_num_threads(1)
    data_dir = args.data_dir or os.path.join(tempfile.gettempdir(), "differad_ablation", f"demo-{args.pairs}-128-0")
    train, _, _ = load_demo_splits(data_dir, n_pairs=args.pairs, size=128, seed=0, res=64)
    cfg, cs_cfg = TrainConfig(), ColdStartConfig(steps=100)
    per_seed = [reward_iou_alignment(train, s, cfg, cs_cfg) for s in tqdm(range(args.seeds), desc="alignment")]
    os.makedirs(args.out, exist_ok=True)
    text = alignment_markdown(per_seed)
    write_text(os.path.join(args.out, "alignment.md"), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
