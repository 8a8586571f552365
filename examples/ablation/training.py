"""GRPO-style training of the stand-in box policy at a fixed generation budget.

One step (on-policy, one gradient step per batch, so the clipped GRPO surrogate reduces to
REINFORCE with group advantages):

1. draw P prompts, sample G completions each (no grad), score them with the arm's localization
   reward → ``loc`` (P·G,); every sampled completion counts against the budget;
2. arm tricks, all from the package: ``resample_groups`` with a ``regenerate`` callback that
   re-samples the policy for the degenerate groups (each regeneration counts G completions), or
   DAPO-style filtering (groups whose ``group_advantages`` are all zero are dropped and new prompts
   are drawn, up to ``dapo_max_draws`` draws of P prompts per step, all counted);
3. ``A = group_advantages(loc, G)`` (scale "group"), times ``difficulty_weights(loc, G, tau)`` when
   the arm uses them;
4. loss = −mean_i(A_i · log π(a_i)) over the batch's completions; Adam step.

The run stops at the first step that reaches the budget (overshoot ≤ one step, reported).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from arms import Arm
from differad_rl.groups import degenerate_groups, difficulty_weights, group_advantages
from differad_rl.resampling import resample_groups
from evaluation import box_metrics
from pairs import PairTensors
from policy import Actions, BoxPolicy, greedy_boxes, log_prob, sample_actions, to_boxes
from reward_kinds import score


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters shared by every arm (equal budget = equal ``budget``)."""

    budget: int = 40960
    prompts_per_step: int = 16
    group_size: int = 8
    lr: float = 3e-3
    eval_points: int = 10
    dapo_max_draws: int = 3
    tau: float = 0.3
    width: int = 16
    init_std: float = 0.5

    def __post_init__(self) -> None:
        for name in ("budget", "prompts_per_step", "eval_points", "dapo_max_draws", "width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2, got {self.group_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0.02 <= self.init_std <= 1.5:
            raise ValueError(f"init_std must lie in [0.02, 1.5], got {self.init_std}")
        if not 0 < self.tau <= 1:
            raise ValueError(f"tau must lie in (0, 1], got {self.tau}")


class _PromptStream:
    """Endless shuffled passes over ``n`` training prompts."""

    def __init__(self, n: int, generator: torch.Generator):
        self.n, self.g = n, generator
        self.order = torch.randperm(n, generator=generator)
        self.pos = 0

    def next(self, k: int) -> torch.Tensor:
        out = []
        while k > 0:
            if self.pos == self.n:
                self.order, self.pos = torch.randperm(self.n, generator=self.g), 0
            take = min(k, self.n - self.pos)
            out.append(self.order[self.pos : self.pos + take])
            self.pos += take
            k -= take
        return torch.cat(out)


def _score(kind: str, actions: Actions, data: PairTensors, idx: torch.Tensor, g: int) -> torch.Tensor:
    rep = idx.repeat_interleave(g)
    boxes = to_boxes(actions.z, actions.normal, data.width[rep], data.height[rep])
    valid = torch.ones(rep.shape[0], dtype=torch.bool)
    return score(kind, boxes, valid, data.gt[rep]).float()


def evaluate(policy: BoxPolicy, data: PairTensors) -> dict[str, float]:
    """Greedy held-out metrics (mIoU, Acc@0.3, F1@0.3) plus ``box_area``: the mean area of the
    answered non-zero boxes as a share of the image, and ``box_elongation``: their median
    max(w, h) / min(w, h) (both NaN if every answer is "normal")."""
    policy.eval()
    with torch.no_grad():
        mu, _, nl = policy(data.images)
    policy.train()
    boxes = greedy_boxes(mu, nl, data.width, data.height)
    out = box_metrics(boxes, data.gt_boxes)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / (data.width * data.height)
    answered = area > 0
    out["box_area"] = float(area[answered].mean()) if bool(answered.any()) else float("nan")
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    elong = torch.maximum(w, h) / torch.minimum(w, h).clamp(min=1e-6)
    out["box_elongation"] = float(elong[answered].median()) if bool(answered.any()) else float("nan")
    return out


def train_arm(
    arm: Arm,
    cfg: TrainConfig,
    train: PairTensors,
    test: PairTensors,
    seed: int,
    init_state: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Train one (arm, seed) run from ``init_state`` (the seed's cold start; None: random init).

    Returns final metrics, the learning curve (metrics vs generations consumed) and statistics.
    """
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    policy = BoxPolicy(width=cfg.width, res=train.images.shape[-1])
    if init_state is not None:
        policy.load_state_dict(init_state)
    with torch.no_grad():  # every arm starts exploring with the same σ
        policy.log_std.fill_(math.log(cfg.init_std))
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    stream = _PromptStream(len(train), gen)
    p, g = cfg.prompts_per_step, cfg.group_size
    used = 0
    curve = [{"generations": 0, **evaluate(policy, test)}]
    every = cfg.budget / cfg.eval_points
    next_eval = every
    n_steps = n_groups = n_degenerate = n_regen = n_dapo_dropped = n_steps_first_draws = 0

    while used < cfg.budget:
        idx = stream.next(p)
        mu_t, log_std_t, nl_t = policy(train.images[idx])  # graph kept for the loss
        mu, log_std, nl = mu_t.detach(), log_std_t.detach(), nl_t.detach()
        actions = sample_actions(mu, log_std, nl, g, gen)
        loc = _score(arm.reward, actions, train, idx, g)
        used += p * g
        n_steps_first_draws += p * g
        n_groups += p
        n_degenerate += int(degenerate_groups(loc, g).sum())

        if arm.resample_rounds:
            counter = [0]

            def regenerate(groups: torch.Tensor, round_: int) -> torch.Tensor:
                groups = torch.as_tensor(groups, dtype=torch.long)
                new = sample_actions(mu[groups], log_std, nl[groups], g, gen)
                rows = (groups[:, None] * g + torch.arange(g)).reshape(-1)
                actions.splice(rows, new)
                counter[0] += groups.numel() * g
                return _score(arm.reward, new, train, idx[groups], g)

            loc, _stats = resample_groups(loc, g, regenerate, arm.resample_rounds)
            used += counter[0]
            n_regen += counter[0]
        elif arm.dapo:
            keep = (group_advantages(loc, g).abs().view(-1, g) > 0).any(dim=1)
            n_dapo_dropped += int((~keep).sum())
            parts = [(idx[keep], _rows(actions, keep, g), loc.view(-1, g)[keep].reshape(-1))]
            have, draws = int(keep.sum()), 1
            while have < p and draws < cfg.dapo_max_draws:
                idx2 = stream.next(p)
                with torch.no_grad():
                    mu2, _, nl2 = policy(train.images[idx2])
                act2 = sample_actions(mu2, log_std, nl2, g, gen)
                loc2 = _score(arm.reward, act2, train, idx2, g)
                used += p * g
                draws += 1
                keep2 = (group_advantages(loc2, g).abs().view(-1, g) > 0).any(dim=1)
                n_dapo_dropped += int((~keep2).sum())
                sel = torch.nonzero(keep2).flatten()[: p - have]
                mask = torch.zeros(p, dtype=torch.bool)
                mask[sel] = True
                parts.append((idx2[mask], _rows(act2, mask, g), loc2.view(-1, g)[mask].reshape(-1)))
                have += int(mask.sum())
            idx = torch.cat([q[0] for q in parts])
            actions = Actions(z=torch.cat([q[1].z for q in parts]), normal=torch.cat([q[1].normal for q in parts]))
            loc = torch.cat([q[2] for q in parts])
            if idx.numel() == 0:
                continue

        adv = group_advantages(loc, g)
        if arm.difficulty:
            adv = adv * difficulty_weights(loc, g, tau=cfg.tau)
        if arm.dapo:  # the batch mixes several draws: recompute its parameters
            mu_t, log_std_t, nl_t = policy(train.images[idx])
        loss = -(adv.detach() * log_prob(mu_t, log_std_t, nl_t, actions, g)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n_steps += 1
        if used >= next_eval or used >= cfg.budget:
            curve.append({"generations": used, **evaluate(policy, test)})
            while next_eval <= used:
                next_eval += every

    return {
        "arm": arm.name,
        "seed": seed,
        "final": curve[-1],
        "curve": curve,
        "generations": used,
        "steps": n_steps,
        "degenerate_share_first_draw": n_degenerate / max(n_groups, 1),
        "regenerations": n_regen,
        "extra_generations": used - n_steps_first_draws,
        "dapo_dropped_groups": n_dapo_dropped,
        "seconds": time.perf_counter() - t0,
        "config": asdict(cfg),
    }


def _rows(actions: Actions, group_mask: torch.Tensor, g: int) -> Actions:
    """Actions of the groups selected by ``group_mask`` (P,) bool."""
    m = group_mask.repeat_interleave(g)
    return Actions(z=actions.z[m], normal=actions.normal[m])
