"""TRL version guard and the one list of TRL internals that :mod:`.trainer` overrides or relies on.

:class:`~differad_rl.integrations.trl.trainer.DifferADGRPOTrainer` hooks into private methods of
``trl.GRPOTrainer`` whose signatures and output dictionaries change between TRL releases. Everything
it depends on is named here, so a TRL upgrade fails loudly (at import, or in ``tests/test_trl_trainer.py``)
instead of silently training with the method switched off.

- :data:`SUPPORTED_TRL` — the range this adapter is tested with (also the ``[trl]`` extra's pin).
- :func:`check_trl_version` — raises :class:`ImportError` naming the installed and supported versions.
- :data:`OVERRIDDEN_TRL_METHODS` — private ``GRPOTrainer`` methods overridden or called, with their
  expected parameter names; :func:`check_trl_internals` verifies them.
- :data:`KNOWN_OUTPUT_KEYS` — keys of the dict returned by ``_generate_and_score_completions`` that the
  resampling splice understands; any other key raises (:func:`check_output_keys`).
"""

from __future__ import annotations

import importlib.metadata
import inspect

from packaging.version import Version

__all__ = [
    "KNOWN_OUTPUT_KEYS",
    "OVERRIDDEN_TRL_METHODS",
    "RELIED_TRL_ATTRIBUTES",
    "SUPPORTED_TRL",
    "TRL_MAX_EXCLUSIVE",
    "TRL_MIN",
    "check_output_keys",
    "check_trl_internals",
    "check_trl_version",
]

TRL_MIN = "1.16.0"
TRL_MAX_EXCLUSIVE = "1.17"
SUPPORTED_TRL = f">={TRL_MIN},<{TRL_MAX_EXCLUSIVE}"

#: Private ``trl.GRPOTrainer`` methods the trainer overrides (and calls through ``super()``), with the
#: parameter names (``self`` included) they must still have.
OVERRIDDEN_TRL_METHODS: dict[str, tuple[str, ...]] = {
    "_generate_and_score_completions": ("self", "inputs"),
    "_calculate_rewards": ("self", "inputs", "prompts", "completions", "completion_ids_list"),
    "_log_metric": ("self", "name", "value"),
    "_log_completion_extra": ("self", "column", "values"),
}

#: Instance attributes of ``trl.GRPOTrainer`` read by the trainer (set in ``GRPOTrainer.__init__``).
RELIED_TRL_ATTRIBUTES: tuple[str, ...] = (
    "_metrics",
    "_logs",
    "_pending_metrics",
    "_pending_extra_logs",
    "accelerator",
    "eos_token_ids",
    "log_multimodal",
    "multi_objective_aggregation",
    "num_generations",
    "reward_func_names",
    "reward_weights",
    "scale_rewards",
    "vllm_importance_sampling_mode",
)

#: Output keys of ``_generate_and_score_completions`` that the resampling splice handles, by layout:
#: ``left``: (B, P) prompt tensors, left-padded; ``right``: (B, C) completion tensors, right-padded;
#: ``prompt_completion``: (B, P + C) (prompt part left-padded, completion part zeros); ``row``: (B,) or
#: (B, 1) per-row values; ``right_or_row``: (B, C) like ``right`` when its width is the completion width, else
#: (B, 1) per row (TRL's vLLM importance-sampling ratio: per token or per sequence, by
#: ``vllm_importance_sampling_mode``); ``images``: pixel values split by ``image_grid_thw``; ``list``: python list
#: per row; ``recompute``: scalars recomputed after the splice.
KNOWN_OUTPUT_KEYS: dict[str, str] = {
    "prompt_ids": "left",
    "prompt_mask": "left",
    "completion_ids": "right",
    "completion_mask": "right",
    "old_per_token_logps": "right",
    "sampling_per_token_logps": "right",  # vLLM: the sampler's log-probs of the sampled tokens
    "importance_sampling_ratio": "right_or_row",  # vLLM: TRL's importance-sampling correction
    "ref_per_token_logps": "right",
    "tool_mask": "right",
    "token_type_ids": "prompt_completion",
    "mm_token_type_ids": "prompt_completion",
    "advantages": "row",
    "pixel_values": "images",
    "image_grid_thw": "images",
    "num_images": "list",
    "num_items_in_batch": "recompute",
}


def _installed_trl_version() -> str:
    try:
        return importlib.metadata.version("trl")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def check_trl_version(version: str | None = None) -> str:
    """Raise unless the TRL version is in :data:`SUPPORTED_TRL`; return it.

    Args:
        version: the version to check; ``None`` reads the installed ``trl`` distribution.

    Raises:
        ImportError: TRL missing or outside ``>=1.16.0,<1.17``; the message names both versions.
    """
    found = _installed_trl_version() if version is None else version
    ok = found != "not installed" and Version(TRL_MIN) <= Version(found) < Version(TRL_MAX_EXCLUSIVE)
    if not ok:
        raise ImportError(
            f"differad_rl.integrations.trl supports trl{SUPPORTED_TRL}, but trl {found} is installed. "
            f"Install a supported release: pip install 'trl{SUPPORTED_TRL}' (or 'differad-rl[trl]'). "
            "DifferADGRPOTrainer overrides private GRPOTrainer methods that change between releases."
        )
    return found


def check_trl_internals(trainer_cls: type | None = None) -> None:
    """Raise :class:`ImportError` if a method in :data:`OVERRIDDEN_TRL_METHODS` is gone or changed.

    Args:
        trainer_cls: the class to inspect; ``None`` imports ``trl.GRPOTrainer``.
    """
    if trainer_cls is None:
        from trl import GRPOTrainer as trainer_cls  # noqa: N813 - local alias of a class
    problems = []
    for name, expected in OVERRIDDEN_TRL_METHODS.items():
        method = getattr(trainer_cls, name, None)
        if method is None:
            problems.append(f"{name} is missing")
            continue
        params = tuple(inspect.signature(method).parameters)
        if params != expected:
            problems.append(f"{name}{params} != expected {expected}")
    if problems:
        raise ImportError(
            f"trl {_installed_trl_version()}: GRPOTrainer internals used by DifferADGRPOTrainer changed: "
            + "; ".join(problems)
            + f". Supported: trl{SUPPORTED_TRL}."
        )


class UnsupportedOutputError(RuntimeError):
    """Group resampling met a generation output it cannot splice (a newer TRL or a non-Qwen-VL model)."""


def check_output_keys(output: dict) -> None:
    """Raise :class:`UnsupportedOutputError` if the generation output has a key the splice does not handle.

    Called before group resampling splices regenerated rows into a batch: an unknown key would be
    silently left stale (e.g. a new per-row tensor of a newer TRL), so it fails loudly instead.
    """
    unknown = sorted(set(output) - set(KNOWN_OUTPUT_KEYS))
    if unknown:
        raise UnsupportedOutputError(
            f"group resampling cannot splice the generation output keys {unknown} (trl {_installed_trl_version()}); "
            f"handled keys: {sorted(KNOWN_OUTPUT_KEYS)}. Set resample_rounds=0 or use trl{SUPPORTED_TRL} with a "
            "Qwen-VL-style model (pixel values split by image_grid_thw)."
        )
