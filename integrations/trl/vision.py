"""The frozen vision tower in ``DifferADGRPOTrainer``: the feature cache's switch and the autograd guard.

The mechanism is :mod:`differad_rl.integrations.qwen_vl.vision_cache` (shared with veRL); this module only
decides, at start-up, whether it is safe in this trainer and wires it to TRL's generation batches:

- :func:`setup_vision` (called once by the trainer's ``__init__``): keeps a frozen tower out of
  autograd under gradient checkpointing (always, when the tower is frozen: TRL's default
  ``gradient_checkpointing=True`` would otherwise recompute and back-propagate the frozen blocks in
  every policy micro-batch and add one input-grad hook per generation), then resolves
  ``vision_feature_cache`` and, when on, attaches one :class:`VisionFeatureCache` to the policy and
  to the reference model (equal tower weights share entries; a reference tower that differs gets its
  own entries, so it is never served the policy's features).
- The trainer calls ``cache.start_batch()`` when each generation batch starts (every pass and
  resampling round of the batch is then served; the previous batch's features are dropped) and
  pauses it during evaluation.

Unsafe, so refused with ``vision_feature_cache=True`` and switched off with a one-line warning with
``None``: a trainable or adapter-wrapped tower (its features change with the step or with the
adapter's state), DeepSpeed ZeRO-3 and FSDP (the tower's weights are gathered collectively inside
its forward, and ranks whose cache hits differ would stop in different collectives).
"""

from __future__ import annotations

import warnings
from typing import Any

from transformers.utils import logging

from differad_rl.integrations.qwen_vl.vision_cache import (
    VisionFeatureCache,
    find_vision_model,
    keep_frozen_tower_out_of_autograd,
    tower_is_frozen,
    vision_cache_blocker,
)

__all__ = ["setup_vision", "sharding_blocker"]

logger = logging.get_logger(__name__)


def sharding_blocker(trainer: Any) -> str | None:
    """A one-line reason when the trainer shards parameters (ZeRO-3, FSDP), else ``None``."""
    if getattr(trainer, "is_fsdp_enabled", False):
        return "FSDP shards the tower's weights and gathers them collectively inside its forward"
    plugin = getattr(getattr(trainer, "args", None), "deepspeed_plugin", None)
    if getattr(trainer, "is_deepspeed_enabled", False) and getattr(plugin, "zero_stage", None) == 3:
        return "DeepSpeed ZeRO-3 shards the tower's weights and gathers them collectively inside its forward"
    return None


def setup_vision(trainer: Any) -> VisionFeatureCache | None:
    """Guard a frozen tower against autograd and build the feature cache when it is on and safe.

    Returns the cache (attached, inactive until the first ``start_batch``) or ``None`` when it is off.
    Raises ``ValueError`` naming ``vision_feature_cache`` when it is ``True`` and the setup is unsafe.
    """
    model = trainer.model
    if tower_is_frozen(model):
        keep_frozen_tower_out_of_autograd(model)
    requested = getattr(trainer.args, "vision_feature_cache", None)
    if requested is False or (requested is None and find_vision_model(model) is None):
        return None
    reason = vision_cache_blocker(model) or sharding_blocker(trainer)
    ref = getattr(trainer, "ref_model", None)
    if reason is None and ref is not None:
        ref_reason = vision_cache_blocker(ref)
        if ref_reason is not None and "trainable parameters" not in ref_reason:  # the ref runs under no_grad
            reason = f"reference model: {ref_reason}"
    if reason is not None:
        if requested:
            raise ValueError(f"vision_feature_cache=True is unsafe here: {reason}. Set vision_feature_cache=False "
                             "(or None to switch it off automatically)")
        if "trainable parameters" in reason:
            logger.info("DifferADGRPOTrainer: vision feature cache off: %s", reason)
        else:
            warnings.warn(f"DifferADGRPOTrainer: vision feature cache off: {reason}", stacklevel=3)
        return None
    cache = VisionFeatureCache()
    cache.attach(model)
    if ref is not None and cache.attach(ref) != 0:
        logger.warning("DifferADGRPOTrainer: the reference model's vision tower differs from the policy's; "
                       "its features are cached separately")
    return cache
