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
]


def __getattr__(name: str):  # PEP 562: lazy heavy imports
    if name == "build_demo_pairs":
        from differad_rl.data.demo import build_demo_pairs

        return build_demo_pairs
    raise AttributeError(f"module 'differad_rl.data' has no attribute {name!r}")
