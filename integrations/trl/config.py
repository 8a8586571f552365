"""``DifferADGRPOConfig``: TRL's ``GRPOConfig`` plus the DifferAD-R1 switches (DESIGN §5, §6).

Every new field defaults to "off", so a :class:`DifferADGRPOConfig` with no DifferAD field set makes
:class:`~differad_rl.integrations.trl.trainer.DifferADGRPOTrainer` behave exactly like ``trl.GRPOTrainer``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from trl import GRPOConfig

from .peers import check_peer_fields

__all__ = ["DifferADGRPOConfig"]

_SCOPES = ("group", "batch")


@dataclass
class DifferADGRPOConfig(GRPOConfig):
    r"""GRPO configuration with difficulty-aware weights and group-wise resampling.

    DifferAD fields (all other fields are ``trl.GRPOConfig``'s):

    Args:
        difficulty_weighting (`bool`, defaults to `False`):
            Multiply every advantage by its group's weight
            :math:`\omega_g = (e^{1-\alpha_g} + \sqrt{1 + \beta_g}) / 2 \in [1, 2.066]`, with
            :math:`\alpha_g` the mean localization reward of the group and :math:`\beta_g` the share of
            the group whose localization reward is below ``difficulty_tau`` (DESIGN §5). Computed by
            :func:`differad_rl.groups.difficulty_weights` on the rewards gathered over all processes.
        difficulty_tau (`float`, defaults to `0.3`):
            Miss threshold :math:`\tau` in [0, 1].
        difficulty_scope (`str`, defaults to `"group"`):
            ``"group"``: :math:`\alpha_g, \beta_g` per group (the definition); ``"batch"``: over the whole
            global generation batch (the original code's local-batch mean, generalised to several processes).
        resample_rounds (`int`, defaults to `0`):
            K, the number of regeneration rounds of degenerate groups (DESIGN §6); 0 turns it off. A group
            is degenerate when its localization rewards are all equal (std < ``degenerate_tol``) and none
            is perfect; all its completions are regenerated, at most K times.
        localization_reward (`str` or `None`, defaults to `None`):
            Name (``__name__``, as TRL reports it in ``rewards/<name>/mean``) of the reward function whose
            values are the localization reward that weights and resampling are judged on. ``None`` is
            allowed when only one reward function is given (it is used) or when both features are off.
            An unknown name raises ``ValueError`` listing the known ones when the trainer is built.
        degenerate_tol (`float`, defaults to `1e-6`):
            Standard-deviation tolerance under which a group's localization rewards count as equal.

    The peers' strategies (DESIGN §9; :mod:`differad_rl.integrations.trl.peers`), all off by default:
    ``advantage_weighting`` (``None``/``"differad"``/``"emit"``/``"univg"``), ``correct_threshold``,
    ``univg_form``, ``univg_power``, ``degeneracy_rule`` (``"differad"``/``"emit"``), ``group_filter``
    (``None``/``"dapo"``/``"easyr1"``), ``group_filter_low``, ``group_filter_high``,
    ``group_filter_refill_rounds`` (R: rounds in which filtered groups are replaced by groups of new prompts
    drawn from ``train_dataset``, as DAPO / EasyR1 refill their batches; 0 = drop them from the loss only).

    Protocol metrics on ``eval_dataset`` (:mod:`differad_rl.integrations.trl.evaluation`): ``protocol_eval``
    (``None`` = on when the eval rows are pair rows, ``True`` = required, ``False`` = off),
    ``protocol_eval_batch_size``, ``protocol_eval_max_new_tokens`` (``None`` = ``max_completion_length``),
    ``protocol_eval_prompt`` (``"reasoning"``/``"qwen"``).

    Frozen vision tower (:mod:`differad_rl.integrations.trl.vision`): ``vision_feature_cache``
    (``None`` = on when every vision-tower parameter is frozen and nothing makes it unsafe, ``True`` =
    required: an unsafe setup raises at start-up, ``False`` = off). While on, each distinct image of a
    generation batch is encoded once and its features serve the G copies, the generation prefill, the
    reference / old-policy / policy passes and every resampling or refill round; the cache is emptied
    when the next generation batch starts. Unsafe: a trainable or adapter-wrapped tower, DeepSpeed
    ZeRO-3, FSDP. Results are unchanged (the tower is frozen; the tests check bitwise equality).

    Use :meth:`paper` for the reference hyperparameters of DESIGN §1.
    """

    difficulty_weighting: bool = field(
        default=False,
        metadata={"help": "Multiply advantages by the difficulty weight of their group (DESIGN §5)."},
    )
    difficulty_tau: float = field(
        default=0.3,
        metadata={"help": "Localization reward below which a completion counts as a miss (beta_g)."},
    )
    difficulty_scope: str = field(
        default="group",
        metadata={"help": "Difficulty statistics per 'group' (definition) or over the whole 'batch'."},
    )
    resample_rounds: int = field(
        default=0,
        metadata={"help": "K: regeneration rounds for degenerate groups (DESIGN §6); 0 = off."},
    )
    localization_reward: str | None = field(
        default=None,
        metadata={"help": "__name__ of the reward function that is the localization reward."},
    )
    degenerate_tol: float = field(
        default=1e-6,
        metadata={"help": "A group is degenerate when its localization-reward std is below this (and none is 1)."},
    )
    # --- the peers' strategies (DESIGN §9; integrations/trl/peers.py), all off by default -----------------
    advantage_weighting: str | None = field(
        default=None,
        metadata={"help": "None/'differad' (the method's ω), 'emit' (× 1 + share wrong) or 'univg' (× f(batch mIoU))."},
    )
    correct_threshold: float = field(
        default=0.0,
        metadata={"help": "EMIT: a completion is correct iff its localization reward is > this (EMIT's rule: > 0)."},
    )
    univg_form: str = field(
        default="power",
        metadata={"help": "UniVG-R1 factor: 'power' (1.05 − m)^univg_power, 'exp' exp(1 − m), 'log' −log(0.02 + m)."},
    )
    univg_power: float = field(default=1.0, metadata={"help": "UniVG-R1's exponent w of the 'power' form."})
    degeneracy_rule: str = field(
        default="differad",
        metadata={"help": "Groups resample_rounds regenerates: 'differad' (degenerate) or 'emit' (none correct)."},
    )
    group_filter: str | None = field(
        default=None,
        metadata={"help": "Drop groups from the loss: 'dapo' (zero variance) or 'easyr1' (mean outside the band)."},
    )
    group_filter_low: float = field(default=0.01, metadata={"help": "EasyR1 band: keep iff low < group mean."})
    group_filter_high: float = field(default=0.99, metadata={"help": "EasyR1 band: keep iff group mean < high."})
    group_filter_refill_rounds: int = field(
        default=0,
        metadata={"help": "With group_filter: rounds in which the filtered groups are replaced by groups of new "
                          "prompts drawn from train_dataset (DAPO / EasyR1 refill); 0 = only drop them from the loss."},
    )
    # --- protocol metrics on the eval dataset while training (integrations/trl/evaluation.py) ---------------
    protocol_eval: bool | None = field(
        default=None,
        metadata={"help": "Greedy protocol mIoU/Acc/F1 on eval_dataset at every evaluation: None = when its rows "
                          "are pair rows (to_trl_dataset), True = required, False = off."},
    )
    protocol_eval_batch_size: int = field(
        default=8, metadata={"help": "Pairs per generate call of the protocol evaluation (per process)."}
    )
    protocol_eval_max_new_tokens: int | None = field(
        default=None, metadata={"help": "Generation cap of the protocol evaluation (None = max_completion_length)."}
    )
    protocol_eval_prompt: str = field(
        default="reasoning",
        metadata={"help": "Protocol prompt: 'reasoning' (<think>/<answer>, answer tag required) or 'qwen'."},
    )

    # --- frozen vision tower (integrations/trl/vision.py) --------------------------------------------------
    vision_feature_cache: bool | None = field(
        default=None,
        metadata={"help": "Encode each distinct image once per generation batch (frozen vision tower): None = on "
                          "when the tower is frozen and the setup is safe, True = required, False = off."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vision_feature_cache is not None and not isinstance(self.vision_feature_cache, bool):
            raise ValueError(f"vision_feature_cache must be None (auto), True or False, got {self.vision_feature_cache!r}")
        if not isinstance(self.difficulty_weighting, bool):
            raise ValueError(f"difficulty_weighting must be a bool, got {self.difficulty_weighting!r}")
        tau = self.difficulty_tau
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (0.0 <= float(tau) <= 1.0):
            raise ValueError(f"difficulty_tau must be a number in [0, 1], got {tau!r}")
        self.difficulty_tau = float(tau)
        if self.difficulty_scope not in _SCOPES:
            raise ValueError(f"difficulty_scope must be one of {_SCOPES}, got {self.difficulty_scope!r}")
        k = self.resample_rounds
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"resample_rounds must be an int >= 0, got {k!r}")
        if self.localization_reward is not None and (
            not isinstance(self.localization_reward, str) or not self.localization_reward
        ):
            raise ValueError(f"localization_reward must be a non-empty str or None, got {self.localization_reward!r}")
        tol = self.degenerate_tol
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (math.isfinite(tol) and tol >= 0):
            raise ValueError(f"degenerate_tol must be a finite number >= 0, got {tol!r}")
        self.degenerate_tol = float(tol)
        check_peer_fields(self)
        for name, value in (("resample_rounds", k), ("group_filter_refill_rounds", self.group_filter_refill_rounds)):
            if value > 0 and getattr(self, "use_vllm", False):
                raise ValueError(
                    f"{name}={value} is not supported with use_vllm=True (group regeneration generates single rows "
                    f"with TRL's transformers generation); set {name}=0 or use_vllm=False"
                )
        _check_protocol_eval_fields(self)

    @property
    def differad_active(self) -> bool:
        """True when weights or resampling are on (the trainer then needs the localization reward)."""
        return self.difficulty_weighting or self.resample_rounds > 0

    @classmethod
    def paper(cls, output_dir: str, **overrides: Any) -> DifferADGRPOConfig:
        """The reference RL setup of DifferAD-R1 (DESIGN §1), for a GPU run; ``overrides`` win.

        G = 8 completions per prompt, 8 completions per device, gradient accumulation 2, bf16, one epoch,
        KL β = 0.04, truncated completions masked out of the loss, TRL's DAPO loss with the decoupled clip
        ε_low = 0.2 / ε_high = 0.28 the paper names, difficulty weights on (τ = 0.3, per group) and group
        resampling with K = 1 round judged on ``localization_reward`` (default ``"dclr_reward"``).
        K is not stated in the paper; 1 round is this package's choice — pass ``resample_rounds=`` to
        change it. The pixel budget (max_pixels = 1,003,520) is a processor setting and freezing the
        vision tower a model setting; neither lives in this config.
        """
        values: dict[str, Any] = {
            "output_dir": output_dir,
            "num_generations": 8,
            "per_device_train_batch_size": 8,
            "gradient_accumulation_steps": 2,
            "bf16": True,
            "num_train_epochs": 1.0,
            "beta": 0.04,
            "mask_truncated_completions": True,
            "loss_type": "dapo",
            "epsilon": 0.2,
            "epsilon_high": 0.28,
            "difficulty_weighting": True,
            "difficulty_tau": 0.3,
            "difficulty_scope": "group",
            "resample_rounds": 1,
            "localization_reward": "dclr_reward",
        }
        values.update(overrides)
        return cls(**values)


def _check_protocol_eval_fields(cfg: DifferADGRPOConfig) -> None:
    """Validate the ``protocol_eval*`` fields (see :mod:`~differad_rl.integrations.trl.evaluation`)."""
    if cfg.protocol_eval is not None and not isinstance(cfg.protocol_eval, bool):
        raise ValueError(f"protocol_eval must be None (auto), True or False, got {cfg.protocol_eval!r}")
    bs = cfg.protocol_eval_batch_size
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise ValueError(f"protocol_eval_batch_size must be an int >= 1, got {bs!r}")
    mx = cfg.protocol_eval_max_new_tokens
    if mx is not None and (isinstance(mx, bool) or not isinstance(mx, int) or mx < 1):
        raise ValueError(f"protocol_eval_max_new_tokens must be None or an int >= 1, got {mx!r}")
    if cfg.protocol_eval_prompt not in ("reasoning", "qwen"):
        raise ValueError(f"protocol_eval_prompt must be 'reasoning' or 'qwen', got {cfg.protocol_eval_prompt!r}")
