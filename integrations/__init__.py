"""Thin adapters that register the differad-rl core into RL frameworks.

Installed as ``differad_rl.integrations``: ``differad_rl.integrations.trl`` (TRL's GRPOTrainer) and
``differad_rl.integrations.verl`` (veRL's reward loop and advantage-estimator registry). No
algorithm lives here; every formula comes from :mod:`differad_rl`.
"""
