"""DifferAD-R1 for TRL: rewards, dataset format and a GRPO trainer with the method's extras.

Importing this package checks the installed TRL version first (:func:`.compat.check_trl_version`,
supported range :data:`.compat.SUPPORTED_TRL`) and raises ``ImportError`` with the installed and
supported versions when it does not match: the trainer overrides private TRL methods (listed in
:data:`.compat.OVERRIDDEN_TRL_METHODS`) that change between releases.

A GRPO script gets the method by changing a few lines::

    from differad_rl.integrations.trl import (
        DifferADGRPOConfig, DifferADGRPOTrainer, differad_rewards, to_trl_dataset)

    train = to_trl_dataset("pairs.jsonl")                       # validated; ref first, target second
    args = DifferADGRPOConfig.paper("out")                      # docs/method.md §1 + weights + resampling
    trainer = DifferADGRPOTrainer(model=model, processing_class=processor, args=args,
                                  reward_funcs=differad_rewards(processor), train_dataset=train)
"""

from .compat import SUPPORTED_TRL, check_trl_version

check_trl_version()

from .dataset import (  # noqa: E402 - after the version guard on purpose
    build_messages,
    draw_instruction,
    pair_to_row,
    pairs_to_rows,
    to_trl_dataset,
    trl_features,
    validate_trl_rows,
)
from .rewards import (  # noqa: E402
    REWARD_FACTORIES,
    CoordinateSpec,
    TargetSizeReward,
    coordinate_spec,
    differad_rewards,
    get_reward,
    localization_reward_name,
    reward_names,
    target_image_sizes,
)
from .config import DifferADGRPOConfig  # noqa: E402
from .trainer import DifferADGRPOTrainer  # noqa: E402
from .evaluation import ProtocolEvaluation, protocol_log_metrics, records_from_rows  # noqa: E402

__all__ = [
    "SUPPORTED_TRL",
    "check_trl_version",
    "DifferADGRPOConfig",
    "DifferADGRPOTrainer",
    "ProtocolEvaluation",
    "protocol_log_metrics",
    "records_from_rows",
    "REWARD_FACTORIES",
    "CoordinateSpec",
    "TargetSizeReward",
    "coordinate_spec",
    "differad_rewards",
    "get_reward",
    "localization_reward_name",
    "reward_names",
    "target_image_sizes",
    "build_messages",
    "draw_instruction",
    "pair_to_row",
    "pairs_to_rows",
    "to_trl_dataset",
    "trl_features",
    "validate_trl_rows",
]
