"""``actor_rollout_ref.actor.freeze_vision_tower=True`` honoured in veRL 0.9.1's FSDP engine, and the
frozen tower's features computed once per distinct image in the log-prob and update passes.

veRL 0.9.1 declares ``ActorConfig.freeze_vision_tower`` but reads it nowhere (verl issue #2526: "has
no effect"): the FSDP engine (``verl.workers.engine.fsdp.transformer_impl.FSDPEngine``, the engine
of the actor and the reference model for ``strategy=fsdp`` and ``fsdp2``) trains every parameter,
the vision tower included, and gives all of them AdamW state. With gradient checkpointing on (the
recipe's setting), transformers' ``enable_input_require_grads`` also hooks the tower's patch
embedding, so even a tower frozen by hand would be recomputed and back-propagated in every
micro-batch.

Freezing
--------
:func:`install_vision_freeze` (run by the plugin in every veRL process) makes the option mean
frozen. When a worker's ``init_model`` runs with ``actor.freeze_vision_tower=True``, every FSDP
engine it builds (the actor's, and the reference model's when the worker holds one) applies
:func:`freeze_for_fsdp` to the Hugging Face model right after veRL built it, before LoRA and FSDP:

1. every parameter of the tower (``model.visual``: patch embedding, blocks, merger; Qwen3-VL's
   deepstack mergers) gets ``requires_grad=False``
   (:func:`differad_rl.integrations.qwen_vl.loading.freeze_vision_tower`);
2. the tower becomes ONE FSDP unit: its class replaces its block class in the model's
   ``_no_split_modules``, the list veRL's FSDP1 auto-wrap policy and FSDP2 ``apply_fsdp2`` read.
   FSDP1 without ``use_orig_params`` refuses a flat parameter that mixes frozen and trainable
   tensors: the root unit (embeddings, norm, LM head) stays all-trainable and the tower's unit
   all-frozen, so no ``use_orig_params=True`` is needed. One unit also means one all-gather per
   tower call, at the unit's boundary, whatever happens inside (see the cache below). (Listing the
   tower beside its blocks would nest units, which veRL's FSDP2 path shards parent-first and FSDP2
   does not support.)
3. transformers' input-require-grad hooks are kept off the frozen tower
   (:func:`differad_rl.integrations.qwen_vl.vision_cache.keep_frozen_tower_out_of_autograd`): its output
   carries no autograd graph, no tower block is recomputed or back-propagated, the language model's
   gradients are unchanged (nothing upstream of the tower is trainable);
4. the optimizer (veRL's ``build_optimizer``) receives only the parameters that require grad, so
   the tower has no optimizer state.

The reference model never trains; it is frozen the same way (same wrapping, no autograd, its own
cache). What cannot honour the option (another engine, LoRA adapters on the tower, an FSDP1 wrap
policy that would mix frozen and trainable tensors in one unit) is refused at start-up by
:mod:`differad_rl.integrations.verl.checks`.

The feature cache
-----------------
veRL repeats each prompt ``rollout.n`` times and its Qwen-VL forward (veRL's own, patched into
transformers' classes) calls ``model.visual(pixel_values, grid_thw=...)`` on every row of every
micro-batch, in the old-log-prob, reference and update passes. With the tower frozen its output
is a pure function of the image, so each engine gets a :class:`TowerPasses` router on its tower's
``forward``: while the cache is on, a call is answered by
:class:`differad_rl.integrations.qwen_vl.vision_cache.VisionFeatureCache` (each distinct image encoded once,
in one tower call for the missing ones; copies and later passes served from memory), through a
``get_image_features`` view of the raw tower (:class:`_TowerView`), and the result is handed back in
the tower's own output form. Lifetime: the actor's cache lives from a step's first actor pass to the
end of its update (``update_actor`` clears it), so the old-log-prob pass encodes the step's images
and the update's micro-batches reuse them; the reference engine's cache is cleared when each
``compute_ref_log_prob`` starts. On by default with a frozen tower;
``+actor_rollout_ref.differad_vision_cache=false`` turns it off.

Why every rank runs the same collectives: the router sits INSIDE the tower's FSDP unit (step 2 makes
the whole tower one unit, blocks included). FSDP gathers the unit's parameters in its pre-forward,
on every rank, on every ``model.visual`` call — before the router decides between cache and tower.
Inside the unit there are no collectives, so a hit on one rank and a miss on another differ only in
local compute. The number of ``model.visual`` calls per micro-batch is veRL's own (its forward
calls the tower once per micro-batch with images, with a dummy image where it must keep ranks
aligned); the cache does not change it. Without step 2 (blocks as separate units) a cache hit
would skip the blocks' all-gathers on one rank while another rank runs them: a hang.

Each pass logs ``[differad] vision tower <pass>: <images> images, <encoded> encoded`` (every rank at
INFO; rank 0 also prints it to stdout, which Ray forwards to the driver), and
:attr:`TowerPasses.passes` keeps the figures.

The patches wrap veRL's ``ActorRolloutRefWorker.init_model`` / ``compute_log_prob`` /
``compute_ref_log_prob`` / ``update_actor`` and ``FSDPEngine._build_module`` / ``_build_optimizer``,
installed when their modules are imported
(:func:`differad_rl.integrations.verl.compat.patch_when_imported`); the signatures are checked
against veRL 0.9.1's.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
import functools
import inspect
import logging
from collections.abc import Callable, Iterator
from typing import Any

from differad_rl.integrations.verl.checks import CACHE_OPTION

__all__ = [
    "CACHE_OPTION",
    "ENGINE_TARGET",
    "FROZEN_TOWER_ATTR",
    "PASSES",
    "PASSES_KEPT",
    "TOWER_PASSES_ATTR",
    "WORKER_TARGET",
    "FreezeRequest",
    "FrozenTower",
    "TowerPasses",
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

TOWER_PASSES_ATTR = "differad_tower_passes"
"""Attribute an FSDP engine with a frozen tower carries: its :class:`TowerPasses` router."""


PASSES = {"compute_log_prob": "actor", "compute_ref_log_prob": "ref", "update_actor": "actor"}
"""The worker passes that run the tower, and the engine (``worker.actor`` / ``worker.ref``) each uses."""

PASSES_KEPT = 64
"""How many finished passes :attr:`TowerPasses.passes` keeps (the newest)."""

_MARK = "__differad_vision_freeze__"


@dataclasses.dataclass(frozen=True)
class FreezeRequest:
    """What a worker's ``init_model`` asks of the FSDP engines it builds."""

    freeze: bool = False
    cache: bool = True


_REQUEST: contextvars.ContextVar[FreezeRequest] = contextvars.ContextVar(
    "differad_freeze", default=FreezeRequest()  # noqa: B039 - a frozen dataclass
)


@dataclasses.dataclass(frozen=True)
class FrozenTower:
    """What :func:`freeze_for_fsdp` did to a model.

    Attributes:
        tower_class: class name of the vision tower (one FSDP unit now).
        parameters: number of frozen tower parameters (elements).
        tensors: number of frozen tower parameter tensors.
        unwrapped: the ``_no_split_modules`` names inside the tower that were dropped (its block class).
    """

    tower_class: str
    parameters: int
    tensors: int
    unwrapped: tuple[str, ...]


def freeze_for_fsdp(model: Any) -> FrozenTower:
    """Freeze a Qwen-VL's vision tower for veRL's FSDP engine (steps 1–3 of the module docstring).

    Call on the plain Hugging Face model, before LoRA and FSDP wrapping. Idempotent.

    Raises:
        ValueError: the model has no ``visual`` sub-module.
    """
    from differad_rl.integrations.qwen_vl.loading import freeze_vision_tower, vision_tower
    from differad_rl.integrations.qwen_vl.vision_cache import keep_frozen_tower_out_of_autograd

    tower = vision_tower(model)
    n = freeze_vision_tower(model)
    name = type(tower).__name__
    in_tower = {id(m) for m in tower.modules()}
    inside = {type(m).__name__ for m in tower.modules()} - {name}
    outside = {type(m).__name__ for m in model.modules() if id(m) not in in_tower}
    split = list(getattr(model, "_no_split_modules", None) or [])
    unwrapped = tuple(c for c in split if c in inside and c not in outside)
    # instance attribute: the class keeps its own list
    model._no_split_modules = [c for c in split if c not in unwrapped] + ([] if name in split else [name])
    keep_frozen_tower_out_of_autograd(model)
    return FrozenTower(name, n, sum(1 for _ in tower.parameters()), unwrapped)


@contextlib.contextmanager
def freeze_requested(request: FreezeRequest) -> Iterator[None]:
    """Within the block, veRL FSDP engines that build their model follow ``request``."""
    token = _REQUEST.set(request)
    try:
        yield
    finally:
        _REQUEST.reset(token)


def _split_pooler(out: Any, grid_thw: Any, merge: int) -> Any:
    """The tower's output in ``get_image_features`` form: ``pooler_output`` split per image."""
    import torch

    sizes = (grid_thw.prod(-1) // merge**2).tolist()
    out.pooler_output = torch.split(out.pooler_output, sizes)
    return out


def _tower_view_class() -> type:
    from torch import nn

    class _TowerView(nn.Module):
        """``get_image_features`` over the RAW tower forward (what transformers' inner Qwen-VL models
        define), so :class:`VisionFeatureCache` can wrap it; calling the raw forward, not the tower
        module, keeps a cache miss inside the FSDP unit the router was entered through."""

        def __init__(self, tower: Any, forward: Callable[..., Any]) -> None:
            super().__init__()
            self._modules["visual"] = tower
            self.merge = int(tower.spatial_merge_size)
            self.raw_forward = forward

        def get_image_features(self, pixel_values: Any, image_grid_thw: Any = None, **kwargs: Any) -> Any:
            out = self.raw_forward(pixel_values, grid_thw=image_grid_thw, **kwargs)
            return _split_pooler(out, image_grid_thw, self.merge)

    return _TowerView


class TowerPasses:
    """Routes a frozen tower's calls through a :class:`VisionFeatureCache` and counts images per pass.

    Installed on the tower module as an instance ``forward`` (inside its FSDP unit). Attributes:
    ``cache`` (``None`` when off); ``images`` / ``encoded``: images the tower was asked for / really
    encoded since the start; ``passes``: ``(pass, images, encoded)`` per finished worker pass.
    """

    def __init__(self, tower: Any, *, cache: bool) -> None:
        from differad_rl.integrations.qwen_vl.vision_cache import VisionFeatureCache

        self.tower = tower
        self.raw_forward = tower.forward
        self.view = _tower_view_class()(tower, self.raw_forward)
        self.cache = VisionFeatureCache() if cache else None
        if self.cache is not None:
            self.cache.attach(self.view)
            self.cache.start_batch()
        self.images = 0
        self.encoded = 0
        self.passes: collections.deque[tuple[str, int, int]] = collections.deque(maxlen=PASSES_KEPT)
        def routed(pixel_values: Any, grid_thw: Any = None, **kwargs: Any) -> Any:
            return self._forward(pixel_values, grid_thw, **kwargs)

        setattr(routed, _MARK, True)
        tower.forward = routed

    def _forward(self, pixel_values: Any, grid_thw: Any = None, **kwargs: Any) -> Any:
        import torch

        n = int(grid_thw.size(0)) if grid_thw is not None else 0
        self.images += n
        cache = self.cache
        plain = all(k == "return_dict" and v is not False for k, v in kwargs.items())  # Qwen3-VL passes return_dict=True
        if cache is None or not cache.active or grid_thw is None or not plain:
            self.encoded += n
            return self.raw_forward(pixel_values, grid_thw=grid_thw, **kwargs)
        encoded, passed = cache.stats.images_encoded, cache.stats.passthrough_calls
        out = self.view.get_image_features(pixel_values, grid_thw)
        self.encoded += cache.stats.images_encoded - encoded
        if cache.stats.passthrough_calls != passed:
            self.encoded += n
        out.pooler_output = torch.cat(list(out.pooler_output), dim=0)  # back to the tower's own form
        return out

    @contextlib.contextmanager
    def pass_(self, name: str) -> Iterator[None]:
        """Record the images asked for and encoded in the block as the pass ``name``; log them."""
        images, encoded = self.images, self.encoded
        try:
            yield
        finally:
            record = (name, self.images - images, self.encoded - encoded)
            self.passes.append(record)
            message = f"[differad] vision tower {name}: {record[1]} images, {record[2]} encoded"
            logger.info(message)
            if _rank() == 0:
                print(message, flush=True)  # worker stdout: Ray forwards it to the driver's log

    def clear(self) -> None:
        """Drop the cached images (the cache stays on)."""
        if self.cache is not None:
            self.cache.start_batch()


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


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

    params = list(inspect.signature(inspect.unwrap(method)).parameters)
    if params != expected:
        raise UnsupportedVersionError(
            f"{where}{tuple(params)} differs from veRL 0.9's {tuple(expected)}; the vision-tower freeze "
            f"supports veRL{SUPPORTED_VERL}"
        )


def _request_of(config: Any) -> FreezeRequest:
    """The :class:`FreezeRequest` of a worker's ``actor_rollout_ref`` config."""
    def get(node: Any, key: str, default: Any) -> Any:
        return node.get(key, default) if hasattr(node, "get") else getattr(node, key, default)

    actor = get(config, "actor", None)
    freeze = bool(get(actor, "freeze_vision_tower", False)) if actor is not None else False
    return FreezeRequest(freeze=freeze, cache=bool(get(config, CACHE_OPTION.rsplit(".", 1)[-1], True)))


def _wrap_pass(original: Callable[..., Any], name: str) -> Callable[..., Any]:
    role = PASSES[name]

    @functools.wraps(original)
    def run_pass(self: Any, data: Any, *args: Any, **kwargs: Any) -> Any:
        owner = getattr(self, role, None)
        passes = getattr(getattr(owner, "engine", None), TOWER_PASSES_ATTR, None)
        if passes is None:
            return original(self, data, *args, **kwargs)
        if name == "compute_ref_log_prob":
            passes.clear()  # the reference engine: one pass per step
        with passes.pass_(name):
            result = original(self, data, *args, **kwargs)
        if name == "update_actor":
            passes.clear()  # the step's last actor pass
        return result

    setattr(run_pass, _MARK, True)
    return run_pass


def _patch_worker(module: Any) -> None:
    worker = module.ActorRolloutRefWorker
    original = worker.init_model
    if getattr(original, _MARK, False):
        return
    _check_signature(original, ["self"], "ActorRolloutRefWorker.init_model")
    for name in PASSES:
        _check_signature(getattr(worker, name), ["self", "data"], f"ActorRolloutRefWorker.{name}")

    @functools.wraps(original)
    def init_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        with freeze_requested(_request_of(self.config)):
            return original(self, *args, **kwargs)

    setattr(init_model, _MARK, True)
    worker.init_model = init_model
    for name in PASSES:
        setattr(worker, name, _wrap_pass(getattr(worker, name), name))


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
        request = _REQUEST.get()
        if request.freeze:
            from differad_rl.integrations.qwen_vl.loading import vision_tower

            frozen = freeze_for_fsdp(model)
            setattr(self, FROZEN_TOWER_ATTR, frozen)
            setattr(self, TOWER_PASSES_ATTR, TowerPasses(vision_tower(model), cache=request.cache))
            logger.info(
                "actor.freeze_vision_tower=True: %s frozen (%d parameters, %d tensors), one FSDP unit, kept out "
                "of autograd, feature cache %s%s",
                frozen.tower_class,
                frozen.parameters,
                frozen.tensors,
                "on" if request.cache else "off",
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
    """Make ``actor.freeze_vision_tower=True`` freeze the tower in veRL's FSDP engine and cache its
    features per pass (idempotent; module docstring).

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
