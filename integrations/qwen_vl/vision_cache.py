"""A frozen Qwen-VL vision tower, encoded once per image: a feature cache, a tower meter, no autograd.

Framework-agnostic (transformers only; no TRL or veRL import), used by the TRL trainer and the veRL
worker alike. Supported: the inner model (``Qwen2VLModel``, ``Qwen2_5_VLModel``, ``Qwen3VLModel``) of
transformers 5's Qwen-VL families, found inside any wrapper (``…ForConditionalGeneration``, a PEFT
model, DDP) as the module that owns a ``visual`` child and defines ``get_image_features``.

GRPO repeats each prompt G times and every pass of a step (generation prefill, reference, old policy,
policy micro-batches, every resampling round) re-runs the tower on every copy of every image. With
the tower frozen its output is a pure function of the image, so:

- :class:`VisionFeatureCache` wraps the inner model's ``get_image_features`` (an instance attribute
  shadowing the class method, which the model's ``forward`` calls through ``self``): while the cache
  is active, each distinct image (key: its pixel rows, ``grid_thw``, dtype and the autocast state; matched on an exact
  integer fingerprint computed on the device and confirmed by ``torch.equal`` on the pixels, so a
  collision can never serve a wrong image) is encoded once; the images of a call that are not cached yet are
  encoded together in ONE tower call, under ``torch.no_grad``; the call's output is assembled from
  the per-image features in the caller's order (``pooler_output`` per image, ``last_hidden_state``
  and Qwen3-VL's ``deepstack_features`` concatenated), detached. Inactive, or on any call it cannot
  serve exactly (keyword arguments that may change the output, such as ``output_hidden_states=True``;
  ``use_cache`` and the like are ignored; a tower with a trainable parameter while grad is enabled),
  it calls the original method unchanged.
- :class:`TowerMeter` counts the images and tower calls that really reach a tower, and the seconds
  spent in it, with forward hooks on the tower module (tests and benchmarks read it, cache on or off).
- :func:`keep_frozen_tower_out_of_autograd` stops transformers' ``enable_input_require_grads``
  (called by ``gradient_checkpointing_enable``, and by TRL again after every generation) from hooking
  a frozen tower's patch embedding (so the frozen blocks are neither recomputed nor back-propagated)
  and from piling up one more hook per call.

Typical use (one generation batch)::

    cache = VisionFeatureCache()
    cache.attach(policy)            # and the reference model: a tower with equal weights shares entries
    cache.start_batch()             # clears, then active: every pass of this batch is served
    ...                             # generate, log-probs, backward
    cache.start_batch()             # the next batch: nothing grows across steps
    cache.stop()                    # inactive and empty

Exactness: a cached image's features are the ones the tower computed for it in a batch of the
distinct missing images; the uncached path encodes all copies in one call. The tower processes
images independently (block-diagonal attention by ``cu_seqlens``, row-wise layers), so the two are
equal whenever the row-wise kernels do not change their last bits with the number of rows; the CPU
tests check bitwise equality in fp32 on the three tiny families.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "CacheStats",
    "TowerMeter",
    "VisionFeatureCache",
    "find_vision_model",
    "keep_frozen_tower_out_of_autograd",
    "tower_is_frozen",
    "vision_cache_blocker",
]

_HOOK_NAME = "make_inputs_require_grads"  # transformers' enable_input_require_grads closure
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CHUNK_ROWS = 8192
#: keyword arguments generate / forward hand to get_image_features that do not change the tower's output
_NEUTRAL_KWARGS = frozenset({"use_cache", "cache_position", "past_key_values"})
_FALSY_OK_KWARGS = frozenset({"output_attentions", "output_hidden_states"})


def _neutral(key: str, value: Any) -> bool:
    return key in _NEUTRAL_KWARGS or (key in _FALSY_OK_KWARGS and not value)


def find_vision_model(model: nn.Module) -> nn.Module | None:
    """The inner Qwen-VL model inside ``model``: the module owning a ``visual`` child and defining
    ``get_image_features`` (``Qwen2VLModel`` / ``Qwen2_5_VLModel`` / ``Qwen3VLModel``); ``None`` if none."""
    for module in model.modules():
        if "visual" in module._modules and callable(getattr(type(module), "get_image_features", None)):
            return module
    return None


def _visual(inner: nn.Module) -> nn.Module:
    tower = inner._modules["visual"]
    assert tower is not None
    return tower


def _tower(model: nn.Module) -> nn.Module:
    inner = find_vision_model(model)
    if inner is None:
        raise ValueError(f"{type(model).__name__} has no Qwen-VL vision tower (no module with a 'visual' child "
                         "and get_image_features)")
    return _visual(inner)


def tower_is_frozen(model: nn.Module) -> bool:
    """True when ``model`` has a vision tower and none of its parameters requires grad."""
    inner = find_vision_model(model)
    return inner is not None and not any(p.requires_grad for p in _visual(inner).parameters())


def vision_cache_blocker(model: nn.Module) -> str | None:
    """Why the feature cache would be unsafe for ``model`` (a one-line reason), or ``None`` if it is safe.

    Checked here: no Qwen-VL vision tower; a tower parameter that requires grad (a trainable tower's
    features depend on the step); an adapter-wrapped tower (a PEFT layer inside it, e.g. LoRA on the
    vision blocks: its output changes when the adapter is disabled for the reference pass). Sharded
    parameters (DeepSpeed ZeRO-3, FSDP) are the caller's to check: they gather weights collectively
    inside the tower, so ranks that hit the cache differently would stop in different collectives.
    """
    inner = find_vision_model(model)
    if inner is None:
        return f"{type(model).__name__} has no Qwen-VL vision tower"
    tower = _visual(inner)
    for name, module in tower.named_modules():
        if hasattr(module, "base_layer") or type(module).__module__.startswith("peft"):
            return f"the vision tower is adapter-wrapped ({name or 'visual'}: {type(module).__name__})"
    trainable = sum(int(p.numel()) for p in tower.parameters() if p.requires_grad)
    if trainable:
        return f"the vision tower has {trainable:,} trainable parameters (freeze it to cache its features)"
    return None


@dataclass
class CacheStats:
    """Counters of a :class:`VisionFeatureCache` (reset by :meth:`VisionFeatureCache.reset_stats`).

    ``images_encoded``: images the cache sent to the tower; ``images_served``: images answered from
    the cache (every copy after the first); ``tower_calls``: tower calls the cache made;
    ``passthrough_calls``: calls given to the original method (inactive, or not servable);
    ``tower_seconds``: wall time of the cache's tower calls (CUDA synchronised).
    """

    images_encoded: int = 0
    images_served: int = 0
    tower_calls: int = 0
    passthrough_calls: int = 0
    tower_seconds: float = 0.0


class _Entry:
    __slots__ = ("deepstack", "grid", "hidden", "pixels", "pooled")

    def __init__(self, pixels: torch.Tensor, grid: torch.Tensor, pooled: torch.Tensor,
                 hidden: torch.Tensor | None, deepstack: list[torch.Tensor] | None) -> None:
        self.pixels, self.grid, self.pooled, self.hidden, self.deepstack = pixels, grid, pooled, hidden, deepstack


class VisionFeatureCache:
    """Per-image cache of a frozen Qwen-VL vision tower's ``get_image_features`` (see the module docstring).

    One cache may serve several models (policy and reference): models whose towers have equal
    weights (``torch.equal`` on every parameter, checked at :meth:`attach`) share entries, others get
    their own. Memory: while active, the pixels and features of the distinct images seen since the
    last :meth:`start_batch` / :meth:`clear` (never more than one generation batch's images when the
    caller starts every batch).
    """

    def __init__(self) -> None:
        self.stats = CacheStats()
        self._active = False
        self._entries: dict[tuple, list[_Entry]] = {}
        self._towers: list[nn.Module] = []  # one per namespace (equal weights share one)
        self._patched: dict[int, tuple[nn.Module, int]] = {}  # id(inner) -> (inner, namespace)
        self._weights: torch.Tensor | None = None
        self._output_types: dict[int, type] = {}  # namespace -> the tower's output class

    # ------------------------------------------------------------------------------ attach / detach
    def attach(self, model: nn.Module) -> int:
        """Wrap the inner model's ``get_image_features``; returns the model's namespace (an int; models with
        equal tower weights get the same one). Idempotent. Raises ``ValueError`` without a vision tower."""
        inner = find_vision_model(model)
        if inner is None:
            raise ValueError(f"{type(model).__name__} has no Qwen-VL vision tower to cache")
        if id(inner) in self._patched:
            return self._patched[id(inner)][1]
        namespace = next((i for i, t in enumerate(self._towers) if _same_weights(t, _visual(inner))), None)
        if namespace is None:
            namespace = len(self._towers)
            self._towers.append(_visual(inner))
        original = inner.get_image_features  # the bound class method

        def get_image_features(pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None,
                               **kwargs: Any) -> Any:
            return self._serve(inner, namespace, original, pixel_values, image_grid_thw, kwargs)

        get_image_features.__wrapped__ = original  # type: ignore[attr-defined]
        setattr(inner, "get_image_features", get_image_features)  # noqa: B010 - shadows the class method
        self._patched[id(inner)] = (inner, namespace)
        return namespace

    def detach(self) -> None:
        """Restore every attached model's ``get_image_features`` and empty the cache."""
        for inner, _ in self._patched.values():
            if "get_image_features" in inner.__dict__:
                del inner.get_image_features
        self._patched.clear()
        self._towers.clear()
        self._output_types.clear()
        self.stop()

    # ---------------------------------------------------------------------------------- lifecycle
    @property
    def active(self) -> bool:
        return self._active

    def start_batch(self) -> None:
        """Empty the cache and make it active (call when a new generation batch starts)."""
        self.clear()
        self._active = True

    def stop(self) -> None:
        """Empty the cache and make it inactive (every call goes to the original method)."""
        self.clear()
        self._active = False

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Inactive inside the block (entries kept, nothing added), e.g. around an evaluation."""
        was = self._active
        self._active = False
        try:
            yield
        finally:
            self._active = was

    def clear(self) -> None:
        """Drop every cached image (counters are kept)."""
        self._entries.clear()

    def reset_stats(self) -> None:
        self.stats = CacheStats()

    def __len__(self) -> int:
        """Number of distinct images cached."""
        return sum(len(v) for v in self._entries.values())

    # ------------------------------------------------------------------------------------- serving
    def _serve(self, inner: nn.Module, namespace: int, original: Any, pixel_values: torch.Tensor,
               grid_thw: torch.Tensor | None, kwargs: dict[str, Any]) -> Any:
        return_dict = kwargs.pop("return_dict", None)
        extra = {k: v for k, v in kwargs.items() if not _neutral(k, v)}
        servable = (
            self._active and grid_thw is not None and not extra and pixel_values.dim() == 2
            and not (torch.is_grad_enabled() and any(p.requires_grad for p in _visual(inner).parameters()))
        )
        if not servable or grid_thw is None:
            self.stats.passthrough_calls += 1
            if return_dict is not None:
                kwargs["return_dict"] = return_dict
            return original(pixel_values, grid_thw, **kwargs)
        rows = grid_thw.prod(-1)
        row_list = rows.tolist()
        pixels = list(torch.split(pixel_values, row_list))
        keys = self._keys(namespace, pixel_values, grid_thw, rows)
        entries: list[_Entry | None] = [self._lookup(k, p) for k, p in zip(keys, pixels)]
        missing: dict[int, list[int]] = {}  # first index of a missing distinct image -> all its indices
        for i, entry in enumerate(entries):
            if entry is not None:
                continue
            first = next((j for j in missing if keys[j] == keys[i] and torch.equal(pixels[j], pixels[i])), None)
            missing.setdefault(i if first is None else first, []).append(i)
        self.stats.images_served += len(entries) - len(missing)
        if missing:
            firsts = list(missing)
            new = self._encode(namespace, original, [pixels[i] for i in firsts], grid_thw[firsts])
            for i, entry in zip(firsts, new):
                self._entries.setdefault(keys[i], []).append(entry)
                for j in missing[i]:
                    entries[j] = entry
        out = _assemble(self._output_types[namespace], [e for e in entries if e is not None])
        return out if return_dict is not False else out.to_tuple()

    def _keys(self, namespace: int, pixel_values: torch.Tensor, grid_thw: torch.Tensor,
              rows: torch.Tensor) -> list[tuple]:
        """Per image: (namespace, grid, dtype, device, autocast dtype, two 64-bit fingerprints): features
        computed under autocast are never served to a pass without it, or the reverse. The fingerprints are integer
        sums (wrapping mod 2^64, so exact and order-free on any device) of the pixels' bit patterns times
        fixed random weights, summed plain and position-weighted; a match is confirmed by ``torch.equal``."""
        x = pixel_values.detach().contiguous()
        bits = x.view(_INT_OF_SIZE[x.element_size()])
        dim, device = x.size(-1), x.device
        if self._weights is None or self._weights.numel() != dim or self._weights.device != device:
            g = torch.Generator().manual_seed(0x17)
            self._weights = torch.randint(1, 2**31 - 1, (dim,), generator=g, dtype=torch.int64).to(device)
        per_row = torch.empty(x.size(0), dtype=torch.int64, device=device)
        for start in range(0, x.size(0), _CHUNK_ROWS):  # bounded int64 temporaries
            chunk = bits[start : start + _CHUNK_ROWS].to(torch.int64)
            per_row[start : start + _CHUNK_ROWS] = (chunk * self._weights).sum(dim=1)
        rows_d = rows.to(device)
        image_of_row = torch.repeat_interleave(torch.arange(rows.numel(), device=device), rows_d)
        pos = torch.arange(x.size(0), device=device) - (torch.cumsum(rows_d, 0) - rows_d)[image_of_row] + 1
        sums = torch.zeros(rows.numel(), 2, dtype=torch.int64, device=device)
        sums.index_add_(0, image_of_row, torch.stack([per_row, per_row * pos], dim=1))
        autocast = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None,)
        return [(namespace, tuple(gr), str(x.dtype), str(device), autocast, a, b)
                for gr, (a, b) in zip(grid_thw.tolist(), sums.tolist())]

    def _lookup(self, key: tuple, pixels: torch.Tensor) -> _Entry | None:
        for entry in self._entries.get(key, ()):
            if torch.equal(entry.pixels, pixels):
                return entry
        return None

    def _encode(self, namespace: int, original: Any, pixels: list[torch.Tensor],
                grid_thw: torch.Tensor) -> list[_Entry]:
        """One tower call on the distinct missing images; per-image entries (detached)."""
        cuda = pixels[0].is_cuda
        if cuda:
            torch.cuda.synchronize(pixels[0].device)
        start = time.perf_counter()
        with torch.no_grad():
            out = original(torch.cat(pixels, dim=0), grid_thw, return_dict=True)
        if cuda:
            torch.cuda.synchronize(pixels[0].device)
        self.stats.tower_seconds += time.perf_counter() - start
        self.stats.tower_calls += 1
        self.stats.images_encoded += len(pixels)
        self._output_types[namespace] = type(out)
        pooled = [t.detach() for t in out.pooler_output]
        merged = [int(t.size(0)) for t in pooled]
        hidden = getattr(out, "last_hidden_state", None)
        hidden_parts: list[torch.Tensor | None] = (
            list(torch.split(hidden.detach(), [int(p.size(0)) for p in pixels]))
            if hidden is not None and hidden.size(0) == sum(int(p.size(0)) for p in pixels) else [None] * len(pixels)
        )
        deep = getattr(out, "deepstack_features", None)
        deep_parts = [list(torch.split(d.detach(), merged)) for d in deep] if deep is not None else None
        return [
            _Entry(p.detach().clone(), grid_thw[i].clone(), pooled[i], hidden_parts[i],
                   [d[i] for d in deep_parts] if deep_parts is not None else None)
            for i, p in enumerate(pixels)
        ]

def _assemble(output_type: type, entries: list[_Entry]) -> Any:
    fields: dict[str, Any] = {"pooler_output": tuple(e.pooled for e in entries)}
    if all(e.hidden is not None for e in entries):
        fields["last_hidden_state"] = torch.cat([e.hidden for e in entries], dim=0)  # type: ignore[misc]
    if entries[0].deepstack is not None:
        layers = len(entries[0].deepstack)
        fields["deepstack_features"] = [torch.cat([e.deepstack[k] for e in entries], dim=0)  # type: ignore[index]
                                        for k in range(layers)]
    return output_type(**fields)


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    if a is b:
        return True
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    if pa.keys() != pb.keys():
        return False
    return all(
        x.shape == pb[k].shape and x.dtype == pb[k].dtype and x.device == pb[k].device and torch.equal(x, pb[k])
        for k, x in pa.items()
    )


class TowerMeter:
    """Images, calls and seconds that really reach a vision tower, counted by forward hooks on it.

    ``images``: rows of ``grid_thw`` the tower was called with (each copy counts); ``calls``: tower
    forwards; ``seconds``: wall time inside them (CUDA synchronised; hooks add two synchronisations
    per call, so use it for measurement runs). ``backward_calls`` counts vision-block forwards run
    during a backward pass (gradient-checkpointing recomputation) and block backward hooks fired.
    Use as a context manager or call :meth:`remove`.
    """

    def __init__(self, model: nn.Module) -> None:
        self.tower = _tower(model)
        self.images = 0
        self.calls = 0
        self.seconds = 0.0
        self.backward_calls = 0
        self._start: float | None = None
        self._handles = [
            self.tower.register_forward_pre_hook(self._pre, with_kwargs=True),
            self.tower.register_forward_hook(self._post),
        ]
        blocks = getattr(self.tower, "blocks", None)
        for block in blocks if blocks is not None else ():
            self._handles.append(block.register_forward_hook(self._block_forward))
            self._handles.append(block.register_full_backward_hook(self._block_backward))

    def _sync(self) -> None:
        p = next(self.tower.parameters(), None)
        if p is not None and p.is_cuda:
            torch.cuda.synchronize(p.device)

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        self.images += int(grid.size(0)) if grid is not None else 0
        self.calls += 1
        self._sync()
        self._start = time.perf_counter()

    def _post(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._sync()
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self._start = None

    def _block_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        if torch._C._current_graph_task_id() != -1:  # inside a backward pass: a checkpoint recomputation
            self.backward_calls += 1

    def _block_backward(self, module: nn.Module, grad_input: Any, grad_output: Any) -> None:
        self.backward_calls += 1

    def reset(self) -> None:
        self.images = self.calls = self.backward_calls = 0
        self.seconds = 0.0

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> TowerMeter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _input_grad_hooks(module: nn.Module) -> list[int]:
    return [k for k, fn in module._forward_hooks.items() if getattr(fn, "__name__", "") == _HOOK_NAME]


def count_input_grad_hooks(model: nn.Module) -> int:
    """How many ``enable_input_require_grads`` hooks are registered anywhere in ``model``."""
    return sum(len(_input_grad_hooks(m)) for m in model.modules())


def keep_frozen_tower_out_of_autograd(model: nn.Module) -> bool:
    """Make transformers' ``enable_input_require_grads`` leave a frozen vision tower alone, for good.

    ``gradient_checkpointing_enable`` calls ``enable_input_require_grads``, which hooks the input
    embeddings of every ``PreTrainedModel`` inside (the Qwen2/2.5-VL tower's ``patch_embed`` included),
    so a frozen tower's output requires grad and its checkpointed blocks are recomputed and
    back-propagated in every backward; TRL disables and re-enables checkpointing around each
    generation, and each enable registers one more hook per embedding (the old handles are dropped,
    the hooks stay). This patches ``enable_input_require_grads`` on every ``PreTrainedModel`` instance
    inside ``model`` that contains the tower: it first removes every such hook in ``model``, calls
    the original (one hook per embedding), then removes the hooks inside the tower while every tower
    parameter is frozen (checked at each call). The existing hooks are cleaned the same way now.
    Returns True when the tower is frozen now (hooks inside it removed). Idempotent.
    """
    inner = find_vision_model(model)
    if inner is None:
        return False
    tower = _visual(inner)
    owners = [m for m in model.modules() if callable(getattr(m, "enable_input_require_grads", None))
              and any(sub is tower for sub in m.modules())]
    for owner in owners:
        if "enable_input_require_grads" in owner.__dict__:
            continue
        original = owner.enable_input_require_grads

        def enable_input_require_grads(_original: Any = original, _owner: nn.Module = owner) -> None:
            for m in _owner.modules():
                for k in _input_grad_hooks(m):
                    del m._forward_hooks[k]
            _original()
            _strip_tower_hooks(tower)

        setattr(owner, "enable_input_require_grads", enable_input_require_grads)  # noqa: B010 - instance patch
    # the hooks already there: keep one per embedding outside the tower, none inside a frozen tower
    for m in model.modules():
        keys = _input_grad_hooks(m)
        for k in keys[:-1]:
            del m._forward_hooks[k]
    return _strip_tower_hooks(tower)


def _strip_tower_hooks(tower: nn.Module) -> bool:
    if any(p.requires_grad for p in tower.parameters()):
        return False
    for m in tower.modules():
        for k in _input_grad_hooks(m):
            del m._forward_hooks[k]
    return True


__all__ += ["count_input_grad_hooks"]
