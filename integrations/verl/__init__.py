"""veRL 0.9 adapter of differad-rl (``pip install "differad-rl[verl]"``).

- :func:`compute_score` — reward for veRL's reward loop
  (``reward.custom_reward_function.path=pkg://differad_rl.integrations.verl.reward``).
- the ``differad`` advantage estimator (:mod:`.estimator`), registered in every veRL process by
  the ``verl.plugins`` entry point (:mod:`.plugin`): ``algorithm.adv_estimator=differad``.
- :mod:`.data` — pair records → veRL's multimodal parquet.
- :mod:`.compat` — supported versions and the localization bridge.

Importing this package imports neither veRL nor Ray (only the core and torch); the submodules
that need veRL import it themselves.
"""

from __future__ import annotations

from differad_rl.integrations.verl.reward import compute_score

__all__ = ["compute_score"]
