"""Thin adapters that register the differad-rl core into RL frameworks, and the model side they share.

Installed as ``differad_rl.integrations``:

* ``differad_rl.integrations.trl`` — TRL's ``GRPOTrainer`` (config, rewards, trainer, evaluation);
* ``differad_rl.integrations.verl`` — veRL's reward loop, advantage-estimator registry and engine hooks;
* ``differad_rl.integrations.qwen_vl`` — the transformers side both adapters and the CLI use: loading a
  Qwen-VL and its processor, batched inference (``differad-rl predict``), the frozen vision tower's
  feature cache and the offline tiny Qwen-VL builds;
* ``differad_rl.integrations.hardware`` — the bf16 / gradient-checkpointing defaults every trainer we
  build takes from the hardware (torch only);
* ``differad_rl.integrations.testing`` — test infrastructure (hub-shaped fixtures); product code never
  imports it.

No algorithm lives here; every formula comes from :mod:`differad_rl`.
"""
