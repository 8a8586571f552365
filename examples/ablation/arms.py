"""The ablation's arms: which reward and which group tricks a run uses."""

from __future__ import annotations

from dataclasses import dataclass

from reward_kinds import REWARD_KINDS


@dataclass(frozen=True)
class Arm:
    """One training recipe.

    Attributes:
        name: short identifier (file names, table keys).
        label: human-readable description for tables and plots.
        reward: localization reward kind, one of ``REWARD_KINDS``.
        difficulty: scale advantages by ``differad_rl.groups.difficulty_weights`` (docs/method.md §5).
        resample_rounds: K of ``differad_rl.resampling.resample_groups`` (0 = off, docs/method.md §6).
        dapo: DAPO-style dynamic sampling: drop groups whose advantages are all zero and draw new
            prompts until the batch is full (at most ``TrainConfig.dapo_max_draws`` draws per step).
    """

    name: str
    label: str
    reward: str
    difficulty: bool = False
    resample_rounds: int = 0
    dapo: bool = False

    def __post_init__(self) -> None:
        if self.reward not in REWARD_KINDS:
            raise ValueError(f"reward must be one of {REWARD_KINDS}, got {self.reward!r}")
        if self.resample_rounds < 0:
            raise ValueError(f"resample_rounds must be >= 0, got {self.resample_rounds}")
        if self.dapo and self.resample_rounds:
            raise ValueError("dapo and resample_rounds are alternatives; set one of them")


ARMS: tuple[Arm, ...] = (
    # IoU (plain GRPO, then each group trick; ω and DAPO on IoU too, for a fair comparison)
    Arm("grpo_iou", "GRPO + IoU", "iou"),
    Arm("iou_w", "GRPO + IoU + difficulty ω", "iou", difficulty=True),
    Arm("iou_rs2", "GRPO + IoU + resampling K=2", "iou", resample_rounds=2),
    Arm("iou_dapo", "GRPO + IoU + DAPO filtering", "iou", dapo=True),
    # DCLR as in the paper (size_term="area": shape-blind)
    Arm("grpo_dclr", "GRPO + DCLR", "dclr"),
    Arm("grpo_dclr_enc", "GRPO + DCLR (enclosing centre)", "dclr_enclosing"),
    Arm("dclr_w", "GRPO + DCLR + difficulty ω", "dclr", difficulty=True),
    Arm("dclr_rs1", "GRPO + DCLR + resampling K=1", "dclr", resample_rounds=1),
    Arm("dclr_rs2", "GRPO + DCLR + resampling K=2", "dclr", resample_rounds=2),
    Arm("dclr_dapo", "GRPO + DCLR + DAPO filtering", "dclr", dapo=True),
    Arm("full", "full: DCLR + ω + resampling K=2", "dclr", difficulty=True, resample_rounds=2),
    Arm("full_enc", "full, enclosing centre", "dclr_enclosing", difficulty=True, resample_rounds=2),
    # Shape-aware DCLR (DCLRConfig(size_term="sides"))
    Arm("grpo_dclr_sides", "GRPO + DCLR-sides", "dclr_sides"),
    Arm("grpo_dclr_sides_enc", "GRPO + DCLR-sides (enclosing centre)", "dclr_sides_enclosing"),
    Arm("dclr_sides_rs2", "GRPO + DCLR-sides + resampling K=2", "dclr_sides", resample_rounds=2),
    Arm("full_sides", "full with sides: DCLR-sides + ω + resampling K=2", "dclr_sides", difficulty=True,
        resample_rounds=2),
    Arm("full_sides_enc", "full with sides, enclosing centre", "dclr_sides_enclosing", difficulty=True,
        resample_rounds=2),
)


def arms_by_name(names: list[str] | None) -> tuple[Arm, ...]:
    """Select arms by name (None: all); unknown names raise ValueError."""
    if not names:
        return ARMS
    known = {a.name: a for a in ARMS}
    for n in names:
        if n not in known:
            raise ValueError(f"arms: unknown arm {n!r}; known: {sorted(known)}")
    return tuple(known[n] for n in names)
