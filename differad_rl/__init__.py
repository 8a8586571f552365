"""differad-rl: the DifferAD-R1 method for TRL and veRL.

Framework-agnostic core: coordinate spaces, box parsing, the dual-consistency localization reward
(DCLR), group advantages, difficulty weights and group resampling. Nothing here imports trl, verl
or transformers; the adapters live in :mod:`differad_rl.integrations`.
"""

__version__ = "0.1.0"
