"""veRL plugin: loaded by ``import verl`` in every process through the ``verl.plugins`` entry point.

Declared in pyproject as ``[project.entry-points."verl.plugins"] differad =
"differad_rl.integrations.verl.plugin"``, so ``algorithm.adv_estimator=differad`` works in the
trainer and every Ray worker without user code. Importing this module

1. checks the veRL / transformers versions (:func:`differad_rl.integrations.verl.compat.check_versions`);
2. registers the ``differad`` advantage estimator (:func:`differad_rl.integrations.verl.estimator.register`);
3. installs the localization bridge (:func:`differad_rl.integrations.verl.compat.install_localization_bridge`),
   which lets the reward's per-sample localization score reach the estimator in the V1 trainer;
4. makes ``actor_rollout_ref.actor.freeze_vision_tower=True`` freeze the vision tower in veRL's FSDP
   engine, which otherwise ignores the option
   (:func:`differad_rl.integrations.verl.freeze.install_vision_freeze`);
5. lets veRL's FSDP engine build models beside TRL 1.16
   (:func:`differad_rl.integrations.verl.compat.install_trl_value_head_guard`);
6. installs the start-up check (:func:`differad_rl.integrations.verl.checks.install_startup_check`):
   ``verl.trainer.main_ppo`` validates every differad-rl option (estimator, reward kwargs,
   resampling, sampler class, the vision-tower freeze) in the driver, before Ray starts, instead of after the first rollout
   or inside a Ray worker.

The group-resampling classes (:mod:`differad_rl.integrations.verl.resampling`) need no import here:
veRL loads them by name from the configuration (``agent_loop_manager_class``, ``custom_sampler``),
and importing them in every process would pull in veRL's trainer modules (~2 s) everywhere.

veRL swallows exceptions raised by plugins (logged at DEBUG level), which would turn a broken
install into "Unknown advantage estimator: differad" much later. Failures are therefore logged at
ERROR level here before they propagate. ``VERL_USE_EXTERNAL_MODULES=differad_rl.integrations.verl.plugin``
is the fallback where entry points are unavailable.
"""

from __future__ import annotations

import logging

__all__ = ["REGISTERED", "load"]

logger = logging.getLogger(__name__)

REGISTERED: tuple[str, ...] = ()
"""What this process registered (estimator names)."""


def load() -> tuple[str, ...]:
    """Register everything (idempotent); returns :data:`REGISTERED`."""
    from differad_rl.integrations.verl import checks, compat, estimator, freeze

    compat.check_versions()
    estimator.register()
    compat.install_localization_bridge()
    freeze.install_vision_freeze()
    compat.install_trl_value_head_guard()
    checks.install_startup_check()
    return (estimator.ESTIMATOR_NAME,)


try:
    REGISTERED = load()
except Exception:
    logger.error(
        "differad_rl veRL plugin failed to load; algorithm.adv_estimator=differad will be unknown", exc_info=True
    )
    raise
