"""Supported veRL / transformers versions and the version-checked patches of veRL.

Supported: veRL ``>=0.9.1,<0.10`` (:data:`SUPPORTED_VERL`), with the transformers range veRL 0.9.1
itself pins (:data:`SUPPORTED_TRANSFORMERS`; 5.6.0 is excluded by veRL). :func:`check_versions`
raises :class:`UnsupportedVersionError` (an ``ImportError``) naming the package, the installed and
the supported version.

The localization bridge
-----------------------
veRL 0.9's V1 trainer (``verl.trainer.ppo.v1.trainer_base.PPOTrainer._compute_advantage``) fetches
only ``uid``, ``response_mask`` and ``rm_scores`` from the TransferQueue before it calls the
advantage estimator, so the per-sample **localization** reward that
:func:`differad_rl.integrations.verl.reward.compute_score` returns (it lands in each trajectory's
``extra_fields["reward_extra_info"]``, exactly where veRL's own DAPO ``filter_groups.metric`` reads
it) never reaches the estimator. :func:`install_localization_bridge` wraps that one method: when
``algorithm.adv_estimator == "differad"`` it reads the localization of the batch's trajectories
from the TransferQueue (same keys, same order as the method's own fetch) — only when the
difficulty weights need it (``difficulty_weights=true``, ``weight_source=localization``) — and
provides it to the estimator for the duration of the call
(:func:`differad_rl.integrations.verl.estimator.provide_batch_context`), together with the
multi-output session layout of the keys (only each session's final output enters the group
statistics, as veRL's GRPO) and, with ``mask_truncated``, the rollout's response length.
For every other estimator the wrapper is a pass-through. veRL's code is not copied or edited.

The wrap is installed lazily: ``trainer_base`` costs ~2 s to import and is only needed in the
trainer process, so :func:`install_localization_bridge` patches it now if it is already imported
and otherwise the moment it is imported (:func:`patch_when_imported`, a one-module post-import hook
on ``sys.meta_path``).

TRL in the same environment
---------------------------
:func:`install_trl_value_head_guard`: veRL 0.9.1's FSDP engine cannot build a model while TRL 1.16
is installed (it imports a TRL class that 1.16 removed); the guard skips that one TRL patch.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import importlib.metadata
import inspect
import logging
import numbers
import sys
import types
from collections.abc import Callable
from typing import Any

import numpy as np
from packaging.specifiers import SpecifierSet
from packaging.version import Version

__all__ = [
    "SUPPORTED_VERL",
    "SUPPORTED_TRANSFORMERS",
    "UnsupportedVersionError",
    "check_versions",
    "install_localization_bridge",
    "localization_from_extra_fields",
    "BRIDGE_TARGET",
    "TRL_GUARD_TARGET",
    "install_trl_value_head_guard",
    "patch_when_imported",
]

logger = logging.getLogger(__name__)

SUPPORTED_VERL = SpecifierSet(">=0.9.1,<0.10")
"""veRL releases this adapter is written and tested against."""

SUPPORTED_TRANSFORMERS = SpecifierSet(">=5.5.3,<5.11,!=5.6.0")
"""The transformers range veRL 0.9.1 pins (and TRL 1.16 accepts): one environment serves both."""

BRIDGE_TARGET = "verl.trainer.ppo.v1.trainer_base"
"""Module whose ``PPOTrainer._compute_advantage`` the localization bridge wraps."""

_BRIDGE_MARK = "__differad_localization_bridge__"


class UnsupportedVersionError(ImportError):
    """An installed veRL or transformers outside the supported range."""


def _installed(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_versions(*, verl_version: str | None = None, transformers_version: str | None = None) -> None:
    """Raise :class:`UnsupportedVersionError` unless veRL and transformers are in the supported range.

    Args:
        verl_version: version string to check instead of the installed ``verl`` (for tests).
        transformers_version: same for ``transformers``.

    Raises:
        UnsupportedVersionError: a package is missing or outside :data:`SUPPORTED_VERL` /
            :data:`SUPPORTED_TRANSFORMERS`; the message names the package, the installed version,
            the supported range and how to fix it.
    """
    checks = (
        ("verl", verl_version or _installed("verl"), SUPPORTED_VERL, 'pip install "differad-rl[verl]"'),
        (
            "transformers",
            transformers_version or _installed("transformers"),
            SUPPORTED_TRANSFORMERS,
            'pip install "transformers>=5.5.3,<5.11,!=5.6.0"',
        ),
    )
    for name, version, spec, fix in checks:
        if version is None:
            raise UnsupportedVersionError(
                f"differad_rl.integrations.verl needs {name}{spec}, which is not installed; {fix}"
            )
        if Version(version) not in spec:
            raise UnsupportedVersionError(
                f"differad_rl.integrations.verl supports {name}{spec}, found {name}=={version}; {fix}"
            )


# ----------------------------------------------------------------------------------------------
# localization bridge


def _unwrap(value: Any) -> Any:
    """A tensordict ``NonTensorData`` → its payload; plain values (numbers, numpy scalars — which
    have a ``.data`` buffer of their own — dicts, tensors) pass through."""
    if isinstance(value, (dict, numbers.Number, np.generic, np.ndarray, str)) or value is None:
        return value
    try:
        import torch

        if isinstance(value, torch.Tensor):
            return value
    except ImportError:  # pragma: no cover - torch is a core dependency
        pass
    return getattr(value, "data", value)


def localization_from_extra_fields(extra_fields: Any, key: str = "localization") -> np.ndarray | None:
    """Per-trajectory ``reward_extra_info[key]`` from TransferQueue ``extra_fields`` values.

    Args:
        extra_fields: iterable of the ``extra_fields`` values of a batch (dicts, or tensordict
            ``NonTensorData`` wrappers around dicts), in batch order.
        key: the reward's extra-info key.

    Returns:
        ``(N,)`` float64 array, or ``None`` if any trajectory lacks the key (the caller decides).
    """
    values = []
    for item in extra_fields:
        fields = _unwrap(item)
        info = fields.get("reward_extra_info", {}) if isinstance(fields, dict) else {}
        if not isinstance(info, dict) or key not in info:
            return None
        values.append(float(info[key]))
    return np.asarray(values, dtype=np.float64)


def _fetch_localization(tq: Any, batch: Any, key: str) -> np.ndarray:
    """Localization of ``batch.keys`` from the TransferQueue, in ``batch.keys`` order.

    Trajectories scored in the agent loop (the default, rule-based reward) carry it in
    ``extra_fields.reward_extra_info``; the colocated reward-model path writes each extra key as a
    top-level field. Raises ``RuntimeError`` naming the key when neither has it.
    """
    data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["extra_fields"])
    loc = localization_from_extra_fields(list(data["extra_fields"]), key)
    if loc is not None:
        return loc
    try:
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=[key])
        values = data[key]
        loc = np.asarray([float(_unwrap(v)) for v in values], dtype=np.float64)
    except Exception as err:  # noqa: BLE001 - re-raised with the reason below
        raise RuntimeError(
            f"algorithm.adv_estimator=differad needs the per-sample reward extra info {key!r}, but the "
            f"trajectories carry none (neither extra_fields.reward_extra_info[{key!r}] nor a field {key!r}). "
            "Use reward.custom_reward_function.path=pkg://differad_rl.integrations.verl.reward "
            "(name=compute_score), or set +algorithm.differad.localization_key to the key your reward "
            "returns, or +algorithm.differad.difficulty_weights=false for plain group advantages."
        ) from err
    return loc


def _wrap_compute_advantage(original: Callable[..., Any], tq: Any) -> Callable[..., Any]:
    from differad_rl.integrations.verl.estimator import (
        ESTIMATOR_NAME,
        BatchContext,
        DifferadConfig,
        provide_batch_context,
        session_layout,
    )

    @functools.wraps(original)
    def _compute_advantage(self: Any, batch: Any, metrics: dict) -> Any:
        algorithm = self.config.algorithm
        if str(algorithm.adv_estimator) != ESTIMATOR_NAME:
            return original(self, batch, metrics)
        cfg = DifferadConfig.from_algorithm_config(algorithm)
        needs_loc = cfg.difficulty_weights and cfg.weight_source == "localization"
        loc = _fetch_localization(tq, batch, cfg.localization_key) if needs_loc else None
        layout = session_layout(batch.keys)
        response_length = None
        if cfg.mask_truncated:
            response_length = int(self.config.actor_rollout_ref.rollout.response_length)
        context = BatchContext(
            localization=loc,
            session_of_row=None if layout is None else layout[0],
            final_rows=None if layout is None else layout[1],
            response_length=response_length,
        )
        with provide_batch_context(context):
            return original(self, batch, metrics)

    setattr(_compute_advantage, _BRIDGE_MARK, True)
    return _compute_advantage


def _patch_trainer_base(module: types.ModuleType) -> None:
    trainer = getattr(module, "PPOTrainer", None)
    method = getattr(trainer, "_compute_advantage", None)
    if method is None:
        raise UnsupportedVersionError(
            f"{module.__name__}.PPOTrainer._compute_advantage not found: "
            f"the localization bridge supports veRL{SUPPORTED_VERL}"
        )
    if getattr(method, _BRIDGE_MARK, False):
        return
    params = list(inspect.signature(method).parameters)
    if params != ["self", "batch", "metrics"]:
        raise UnsupportedVersionError(
            f"PPOTrainer._compute_advantage{tuple(params)} differs from veRL 0.9's (self, batch, metrics); "
            f"the localization bridge supports veRL{SUPPORTED_VERL}"
        )
    trainer._compute_advantage = _wrap_compute_advantage(method, module.tq)


class _PostImportPatch(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Runs ``patch(module)`` right after the module ``fullname`` has executed (once)."""

    def __init__(self, fullname: str, patch: Callable[[types.ModuleType], None]) -> None:
        self.fullname = fullname
        self.patch = patch
        self._loader: importlib.abc.Loader | None = None

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.fullname:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        assert self._loader is not None
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        assert self._loader is not None
        self._loader.exec_module(module)
        module.__spec__.loader = self._loader
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        self.patch(module)


def install_localization_bridge() -> bool:
    """Make ``differad``'s localization reward reach the estimator in veRL's V1 trainer.

    Idempotent. Patches ``PPOTrainer._compute_advantage`` now if :data:`BRIDGE_TARGET` is
    imported, else registers a post-import hook that patches it when it is.

    Returns:
        ``True`` if the method is patched now, ``False`` if the patch is pending (hook installed).

    Raises:
        UnsupportedVersionError: veRL outside :data:`SUPPORTED_VERL`, or the method's signature is
            not the one this bridge wraps.
    """
    check_versions()
    return patch_when_imported(BRIDGE_TARGET, _patch_trainer_base, ready="PPOTrainer")


def patch_when_imported(fullname: str, patch: Callable[[types.ModuleType], None], *, ready: str) -> bool:
    """Run ``patch(module)`` on the module ``fullname`` now if it is imported, else right after its import.

    The patches of this adapter touch heavy veRL modules (trainer, workers, engine) that only some
    processes import; this keeps ``import verl`` cheap everywhere. Idempotence is the patch's job
    (it marks what it wrapped); one pending hook per module name.

    Args:
        fullname: the module's dotted name.
        patch: called with the executed module.
        ready: an attribute the module defines once it has executed (a module seen half-imported,
            inside an import cycle, waits for the hook instead).

    Returns:
        ``True`` if patched now, ``False`` if the patch waits for the import.
    """
    module = sys.modules.get(fullname)
    if module is not None and getattr(module, ready, None) is not None:
        patch(module)
        return True
    if not any(isinstance(f, _PostImportPatch) and f.fullname == fullname for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportPatch(fullname, patch))
    return False


# ----------------------------------------------------------------------------------------------
# TRL beside veRL: veRL's value-head patch

TRL_GUARD_TARGET = "verl.models.transformers.monkey_patch"
"""Module whose ``is_trl_available`` :func:`install_trl_value_head_guard` wraps."""

_TRL_GUARD_MARK = "__differad_trl_value_head_guard__"


def _trl_has_value_head() -> bool:
    """Whether the installed TRL still defines ``AutoModelForCausalLMWithValueHead`` (TRL 1.16 does not)."""
    for name in ("trl.experimental.ppo", "trl"):
        try:
            if hasattr(importlib.import_module(name), "AutoModelForCausalLMWithValueHead"):
                return True
        except ImportError:
            continue
    return False


def _patch_monkey_patch_module(module: types.ModuleType) -> None:
    original = getattr(module, "is_trl_available", None)
    if original is None:
        raise UnsupportedVersionError(
            f"{module.__name__}.is_trl_available not found: the TRL value-head guard supports veRL{SUPPORTED_VERL}"
        )
    if getattr(original, _TRL_GUARD_MARK, False):
        return

    @functools.wraps(original)
    def is_trl_available() -> bool:
        return bool(original()) and _trl_has_value_head()

    setattr(is_trl_available, _TRL_GUARD_MARK, True)
    setattr(module, "is_trl_available", is_trl_available)  # noqa: B010 - a module attribute mypy cannot see


def install_trl_value_head_guard() -> bool:
    """Let veRL's FSDP engine build its model in an environment that also holds TRL 1.16.

    veRL 0.9.1's ``apply_monkey_patch`` (called by the FSDP engine for every actor, reference and
    critic model) imports ``AutoModelForCausalLMWithValueHead`` from TRL whenever TRL is importable,
    to patch its ``state_dict``; TRL 1.16 no longer has that class, so the import raises and no model
    can be built — although differad-rl's ``[trl]`` and ``[verl]`` extras are meant to share one
    environment. The guard makes veRL's ``is_trl_available`` (as that module sees it) true only
    when the class exists: with TRL 1.16 the value-head patch, which concerns a TRL class that no
    longer exists, is skipped; with a TRL that has the class nothing changes. Idempotent.

    Returns:
        ``True`` if patched now, ``False`` if the patch waits for the module's import.
    """
    return patch_when_imported(TRL_GUARD_TARGET, _patch_monkey_patch_module, ready="apply_monkey_patch")


def bridge_installed() -> bool:
    """Whether ``PPOTrainer._compute_advantage`` is currently wrapped (imports trainer_base)."""
    module = importlib.import_module(BRIDGE_TARGET)
    return bool(getattr(module.PPOTrainer._compute_advantage, _BRIDGE_MARK, False))
