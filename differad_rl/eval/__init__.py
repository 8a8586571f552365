"""Evaluation of dual-image anomaly localization (docs/method.md §8).

* :mod:`~differad_rl.eval.metrics` — mIoU, Acc@τ, F1@τ: functional API + :class:`LocalizationMetric`;
* :mod:`~differad_rl.eval.protocol` — prediction files, family formats/spaces, :func:`evaluate`;
* :mod:`~differad_rl.eval.report` — metrics JSON, per-sample JSONL, PNG sheets and HTML report;
* :mod:`~differad_rl.eval.anomaly_maps` — anomaly map → box (calibrated threshold, largest component);
* :mod:`~differad_rl.eval.baseline` — the non-LLM baselines (classic difference, PatchCore, PaDiM:
  :mod:`~differad_rl.eval.patchcore`, :mod:`~differad_rl.eval.padim` on
  :mod:`~differad_rl.eval.backbone`), with the map metrics of :mod:`~differad_rl.eval.map_metrics`;
* :mod:`~differad_rl.eval.comparison` — constant predictors and several methods side by side;
* :mod:`~differad_rl.eval.cli` — ``differad-rl eval`` / ``differad-rl baseline``.

Names are re-exported lazily so ``import differad_rl.eval`` (and the CLI) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LocalizationMetric": "metrics",
    "localization_metrics": "metrics",
    "sample_ious": "metrics",
    "mean_iou": "metrics",
    "accuracy_at": "metrics",
    "f1_at": "metrics",
    "EvalConfig": "protocol",
    "EvalResult": "protocol",
    "FAMILIES": "protocol",
    "evaluate": "protocol",
    "evaluate_outputs": "protocol",
    "evaluate_records": "protocol",
    "read_predictions": "protocol",
    "write_report": "report",
    "anomaly_maps_to_boxes": "anomaly_maps",
    "best_f1_threshold": "anomaly_maps",
    "calibration_split": "anomaly_maps",
    "maps_to_boxes": "anomaly_maps",
    "scale_boxes": "anomaly_maps",
    "BaselineConfig": "baseline",
    "run_baseline": "baseline",
    "baseline_splits": "baseline",
    "normal_images": "baseline",
    "PatchCore": "patchcore",
    "PatchCoreConfig": "patchcore",
    "Padim": "padim",
    "PadimConfig": "padim",
    "map_metrics": "map_metrics",
    "aupro": "map_metrics",
    "pixel_auroc": "map_metrics",
    "image_auroc": "map_metrics",
    "constant_predictions": "comparison",
    "write_comparison": "comparison",
    "comparison_table": "comparison",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'differad_rl.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(f"differad_rl.eval.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
