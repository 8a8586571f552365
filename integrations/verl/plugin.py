"""veRL plugin: loaded by ``import verl`` in every process through the ``verl.plugins`` entry point.

Declared in pyproject as ``[project.entry-points."verl.plugins"] differad =
"differad_rl.integrations.verl.plugin"``, so ``algorithm.adv_estimator=differad`` works in the
trainer and every Ray worker without user code. Importing this module

1. checks the veRL / transformers versions (:func:`differad_rl.integrations.verl.compat.check_versions`);
2. registers the ``differad`` advantage estimator (:func:`differad_rl.integrations.verl.estimator.register`);
3. installs the localization bridge (:func:`differad_rl.integrations.verl.compat.install_localization_bridge`),
   which lets the reward's per-sample localization score reach the estimator in the V1 trainer;
4. imports the group-resampling module (``differad_rl.integrations.verl.resampling``) when it is
   installed, so that its registrations happen too.

veRL swallows exceptions raised by plugins (logged at DEBUG level), which would turn a broken
install into "Unknown advantage estimator: differad" much later. Failures are therefore logged at
ERROR level here before they propagate. ``VERL_USE_EXTERNAL_MODULES=differad_rl.integrations.verl.plugin``
is the fallback where entry points are unavailable.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging

__all__ = ["REGISTERED", "load"]

logger = logging.getLogger(__name__)

_OPTIONAL_MODULES = ("differad_rl.integrations.verl.resampling",)

REGISTERED: tuple[str, ...] = ()
"""What this process registered: estimator names and optional modules imported."""


def load() -> tuple[str, ...]:
    """Register everything (idempotent); returns :data:`REGISTERED`."""
    from differad_rl.integrations.verl import compat, estimator

    compat.check_versions()
    estimator.register()
    compat.install_localization_bridge()
    done = [estimator.ESTIMATOR_NAME]
    for name in _OPTIONAL_MODULES:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)
            done.append(name)
    return tuple(done)


try:
    REGISTERED = load()
except Exception:
    logger.error("differad_rl veRL plugin failed to load; algorithm.adv_estimator=differad will be unknown", exc_info=True)
    raise
