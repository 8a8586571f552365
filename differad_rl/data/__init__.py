"""Pair data for DifferAD-R1: records (JSONL / Hugging Face ``datasets``), mask → boxes, readers of
public anomaly-detection layouts, pairing, synthetic anomalies and the embedded demo pairs.

Only the light record API is imported eagerly; image work lives in the submodules
(``masks``, ``readers``, ``pairing``, ``synthetic``, ``demo``) and loads on first use.
"""

from differad_rl.data.records import (
    ZERO_BOX,
    PairRecord,
    from_hf_dataset,
    hf_features,
    load_pairs,
    to_hf_dataset,
    write_pairs,
)

__all__ = [
    "ZERO_BOX",
    "PairRecord",
    "from_hf_dataset",
    "hf_features",
    "load_pairs",
    "to_hf_dataset",
    "write_pairs",
    "build_demo_pairs",
    "mask_to_boxes",
    "read_layout",
    "PairingConfig",
    "plan_pairs",
    "build_pairs",
    "build_pair_dir",
]

_LAZY = {
    "build_demo_pairs": "differad_rl.data.demo",
    "mask_to_boxes": "differad_rl.data.masks",
    "read_layout": "differad_rl.data.readers",
    "PairingConfig": "differad_rl.data.pairing",
    "plan_pairs": "differad_rl.data.pairing",
    "build_pairs": "differad_rl.data.pairing",
    "build_pair_dir": "differad_rl.data.pairing",
}


def __getattr__(name: str):  # PEP 562: heavy modules load on first use
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'differad_rl.data' has no attribute {name!r}")
