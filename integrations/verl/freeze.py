"""``actor_rollout_ref.actor.freeze_vision_tower=True`` honoured in veRL 0.9.1's FSDP engine.

veRL 0.9.1 declares ``ActorConfig.freeze_vision_tower`` but reads it nowhere (verl issue #2526: "has
no effect"): the FSDP engine (``verl.workers.engine.fsdp.transformer_impl.FSDPEngine``, the engine
of the actor and the reference model for ``strategy=fsdp`` and ``fsdp2``) trains every parameter,
the vision tower included, and gives all of them AdamW state. With gradient checkpointing on (the
recipe's setting), transformers' ``enable_input_require_grads`` also hooks the tower's patch
embedding, so even a tower frozen by hand would be recomputed and back-propagated in every
micro-batch.

:func:`install_vision_freeze` (run by the plugin in every veRL process) makes the option mean
frozen. When a worker's ``init_model`` runs with ``actor.freeze_vision_tower=True``, every FSDP
engine it builds (the actor's, and the reference model's when the worker holds one) applies
:func:`freeze_for_fsdp` to the Hugging Face model right after veRL built it, before LoRA and FSDP:

1. every parameter of the tower (``model.visual``: patch embedding, blocks, merger; Qwen3-VL's
   deepstack mergers) gets ``requires_grad=False``
   (:func:`differad_rl.integrations.loading.freeze_vision_tower`);
2. FSDP1 (``strategy=fsdp``): the tower's class joins the model's ``_no_split_modules``, the list
   veRL's FSDP1 auto-wrap policy reads, so the tower becomes its own FSDP unit. FSDP1 without
   ``use_orig_params`` refuses a flat parameter that mixes frozen and trainable tensors; with the
   tower in its own unit the root unit (embeddings, norm, LM head) stays all-trainable and the
   tower's unit all-frozen, so no ``use_orig_params=True`` is needed. FSDP2 (``strategy=fsdp2``)
   shards parameter by parameter and takes frozen ones beside trainable ones in a group; there the
   list is left alone (veRL's ``apply_fsdp2`` shards the listed modules in the order it meets them,
   so a tower listed before its own blocks would be sharded parent-first, which FSDP2 does not
   support);
3. the tower's ``forward`` runs under ``torch.no_grad()``: its output carries no autograd graph,
   so no tower block is recomputed or back-propagated whatever hooks gradient checkpointing or
   LoRA registered on its patch embedding; the language model's gradients are unchanged (nothing
   upstream of the tower is trainable);
4. the optimizer (veRL's ``build_optimizer``) receives only the parameters that require grad, so
   the tower has no optimizer state.

The reference model never trains; it is frozen the same way so that its tower runs without
autograd and is wrapped identically. What cannot honour the option (another engine, LoRA adapters
on the tower, an FSDP1 wrap policy that would mix frozen and trainable tensors in one unit) is
refused at start-up by :mod:`differad_rl.integrations.verl.checks`.

The patches wrap three veRL methods (``ActorRolloutRefWorker.init_model``,
``FSDPEngine._build_module``, ``FSDPEngine._build_optimizer``) and install lazily, when the modules
are imported (:func:`differad_rl.integrations.verl.compat.patch_when_imported`); the signatures are
checked against veRL 0.9.1's.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import inspect
import logging
from collections.abc import Callable, Iterator
from typing import Any

__all__ = [
    "ENGINE_TARGET",
    "FROZEN_TOWER_ATTR",
    "WORKER_TARGET",
    "FrozenTower",
    "freeze_for_fsdp",
    "freeze_requested",
    "install_vision_freeze",
    "trainable_parameters",
]

logger = logging.getLogger(__name__)

WORKER_TARGET = "verl.workers.engine_workers"
"""Module of ``ActorRolloutRefWorker`` (its ``init_model`` builds the actor and reference engines)."""

ENGINE_TARGET = "verl.workers.engine.fsdp.transformer_impl"
"""Module of veRL's ``FSDPEngine`` (``_build_module``, ``_build_optimizer``)."""

FROZEN_TOWER_ATTR = "differad_frozen_tower"
"""Attribute an FSDP engine carries after :func:`freeze_for_fsdp` froze its tower (a :class:`FrozenTower`)."""

_MARK = "__differad_vision_freeze__"

_REQUESTED: contextvars.ContextVar[bool] = contextvars.ContextVar("differad_freeze_vision_tower", default=False)


@dataclasses.dataclass(frozen=True)
class FrozenTower:
    """What :func:`freeze_for_fsdp` did to a model.

    Attributes:
        tower_class: class name of the vision tower.
        parameters: number of frozen tower parameters (elements).
        tensors: number of frozen tower parameter tensors.
    """

    tower_class: str
    parameters: int
    tensors: int


def freeze_for_fsdp(model: Any, *, own_unit: bool = True) -> FrozenTower:
    """Freeze a Qwen-VL's vision tower for veRL's FSDP engine (steps 1–3 of the module docstring).

    Call on the plain Hugging Face model, before LoRA and FSDP wrapping. Idempotent.

    Args:
        model: the Hugging Face Qwen-VL.
        own_unit: add the tower's class to the model's ``_no_split_modules`` (FSDP1 wraps it as its
            own unit); ``False`` for FSDP2.

    Raises:
        ValueError: the model has no ``visual`` sub-module.
    """
    import torch
    from differad_rl.integrations.loading import freeze_vision_tower, vision_tower

    tower = vision_tower(model)
    n = freeze_vision_tower(model)
    name = type(tower).__name__
    split = list(getattr(model, "_no_split_modules", None) or [])
    if own_unit and name not in split:
        model._no_split_modules = [*split, name]  # instance attribute: the class keeps its own list
    if not getattr(tower.forward, _MARK, False):
        forward = tower.forward

        @functools.wraps(forward)
        def frozen_forward(*args: Any, **kwargs: Any) -> Any:
            with torch.no_grad():
                return forward(*args, **kwargs)

        setattr(frozen_forward, _MARK, True)
        tower.forward = frozen_forward
    return FrozenTower(tower_class=name, parameters=n, tensors=sum(1 for _ in tower.parameters()))


@contextlib.contextmanager
def freeze_requested(enabled: bool) -> Iterator[None]:
    """Within the block, veRL FSDP engines that build their model freeze its vision tower iff ``enabled``."""
    token = _REQUESTED.set(bool(enabled))
    try:
        yield
    finally:
        _REQUESTED.reset(token)


class _Trainable:
    """``module`` seen through ``parameters()`` as only its parameters that require grad."""

    def __init__(self, module: Any) -> None:
        self.module = module

    def parameters(self, recurse: bool = True) -> Iterator[Any]:
        return trainable_parameters(self.module, recurse=recurse)


def trainable_parameters(module: Any, *, recurse: bool = True) -> Iterator[Any]:
    """The parameters of ``module`` that require grad (FSDP1 flat parameters or FSDP2 DTensors alike)."""
    return (p for p in module.parameters(recurse=recurse) if p.requires_grad)


def _check_signature(method: Callable[..., Any], expected: list[str], where: str) -> None:
    from differad_rl.integrations.verl.compat import (
        SUPPORTED_VERL,
        UnsupportedVersionError,
    )

    params = list(inspect.signature(method).parameters)
    if params != expected:
        raise UnsupportedVersionError(
            f"{where}{tuple(params)} differs from veRL 0.9's {tuple(expected)}; the vision-tower freeze "
            f"supports veRL{SUPPORTED_VERL}"
        )


def _patch_worker(module: Any) -> None:
    worker = module.ActorRolloutRefWorker
    original = worker.init_model
    if getattr(original, _MARK, False):
        return
    inner = getattr(original, "__wrapped__", original)
    _check_signature(inner, ["self"], "ActorRolloutRefWorker.init_model")

    @functools.wraps(original)
    def init_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        actor = self.config.get("actor", None) if hasattr(self.config, "get") else getattr(self.config, "actor", None)
        enabled = bool(actor.get("freeze_vision_tower", False)) if actor is not None else False
        with freeze_requested(enabled):
            return original(self, *args, **kwargs)

    setattr(init_model, _MARK, True)
    worker.init_model = init_model


def _patch_engine(module: Any) -> None:
    engine = module.FSDPEngine
    build_module = engine._build_module
    if getattr(build_module, _MARK, False):
        return
    build_optimizer = engine._build_optimizer
    _check_signature(build_module, ["self"], "FSDPEngine._build_module")
    _check_signature(build_optimizer, ["self", "module"], "FSDPEngine._build_optimizer")

    @functools.wraps(build_module)
    def _build_module(self: Any) -> Any:
        model = build_module(self)
        if _REQUESTED.get():
            frozen = freeze_for_fsdp(model, own_unit=self.engine_config.strategy == "fsdp")
            setattr(self, FROZEN_TOWER_ATTR, frozen)
            logger.info(
                "actor.freeze_vision_tower=True: %s frozen (%d parameters, %d tensors), run without autograd%s",
                frozen.tower_class,
                frozen.parameters,
                frozen.tensors,
                "" if self.engine_config.forward_only else "; the optimizer holds only trainable parameters",
            )
        return model

    @functools.wraps(build_optimizer)
    def _build_optimizer(self: Any, module: Any) -> Any:
        if getattr(self, FROZEN_TOWER_ATTR, None) is None:
            return build_optimizer(self, module)
        return build_optimizer(self, _Trainable(module))

    for fn in (_build_module, _build_optimizer):
        setattr(fn, _MARK, True)
    engine._build_module = _build_module
    engine._build_optimizer = _build_optimizer


def install_vision_freeze() -> tuple[bool, bool]:
    """Make ``actor.freeze_vision_tower=True`` freeze the tower in veRL's FSDP engine (idempotent).

    Returns:
        whether the worker and the engine module were patched now (``False``: pending their import).

    Raises:
        UnsupportedVersionError: a wrapped method's signature is not veRL 0.9.1's.
    """
    from differad_rl.integrations.verl.compat import patch_when_imported

    return (
        patch_when_imported(WORKER_TARGET, _patch_worker, ready="ActorRolloutRefWorker"),
        patch_when_imported(ENGINE_TARGET, _patch_engine, ready="FSDPEngine"),
    )
