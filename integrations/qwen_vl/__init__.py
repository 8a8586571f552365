"""The transformers side of the Qwen-VL models: what the TRL and veRL adapters and the CLI share.

* :mod:`~differad_rl.integrations.qwen_vl.loading` — resolve a model id / folder, load the model and its
  processor, the model family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), pixel budgets, left padding, the vision tower;
* :mod:`~differad_rl.integrations.qwen_vl.predict` — batched generation to a predictions JSONL
  (``differad-rl predict``);
* :mod:`~differad_rl.integrations.qwen_vl.vision_cache` — the frozen vision tower's per-step feature cache;
* :mod:`~differad_rl.integrations.qwen_vl.tiny` — tiny random Qwen-VL builds, written locally (offline runs).

Imports transformers; the core (:mod:`differad_rl`) never imports this package.
"""
