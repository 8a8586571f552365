"""TRL reward functions for dual-image anomaly localization, in the model family's coordinates.

``GRPOTrainer`` calls every reward function as
``f(prompts=, completions=, completion_ids=, **columns, trainer_state=, log_extra=, log_metric=)``
where ``columns`` are the dataset's columns (repeated per completion). The datasets built by
:mod:`differad_rl.integrations.trl.dataset` carry ``solution`` — the box in ORIGINAL target pixels,
``[0, 0, 0, 0]`` for a normal target — ``image_size`` = ``[width, height]`` of the target, and
``images`` = ``[reference, target]``.

The model writes boxes in its family's space (docs/method.md §2): Qwen2-VL / Qwen3-VL integers 0..1000,
Qwen2.5-VL pixels of the image the processor actually fed it (``smart_resize`` with the processor's
own ``min_pixels`` / ``max_pixels`` and ``patch_size × merge_size``). So the adapter:

1. reads the space and those numbers off the processor / model (:func:`coordinate_spec`) — never a
   guessed default;
2. takes each sample's target size from the ``image_size`` column, else from the target (last)
   image of the ``images`` / ``image`` column, and cross-checks both when both are present;
3. calls the core's reward factories (:mod:`differad_rl.rewards`) with ``gt_space="pixel"``, which
   convert the ground truth with :func:`differad_rl.coords.to_model_space` and score.

No formula lives here. The returned callables are picklable module-level classes with a
``__name__`` (TRL logs rewards under it).

Example::

    from differad_rl.integrations.trl import differad_rewards
    reward_funcs = differad_rewards(processor, names=("dclr", "format"))
    GRPOTrainer(model=model, processing_class=processor, reward_funcs=reward_funcs, ...)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from differad_rl import coords as _coords
from differad_rl import registry as _registry

__all__ = [
    "BOX_REWARDS",
    "CoordinateSpec",
    "TargetSizeReward",
    "coordinate_spec",
    "differad_rewards",
    "get_reward",
    "localization_reward_name",
    "reward_names",
    "target_image_sizes",
    "PEER_REWARD_FACTORIES",
    "REWARD_FACTORIES",
]

#: name → the registry entry that builds it (:data:`differad_rl.registry.REWARDS`; kept for callers
#: that list the names; the registry is the one source).
REWARD_FACTORIES: Mapping[str, _registry.RewardEntry] = _registry.REWARDS
#: the peers' box rewards (docs/method.md §9): the registered rewards of :mod:`differad_rl.box_rewards`
PEER_REWARD_FACTORIES: Mapping[str, _registry.RewardEntry] = {k: e for k, e in _registry.REWARDS.items() if e.peer}
#: reward names that score a box (the others — ``format`` — judge the text only).
BOX_REWARDS = frozenset(k for k, e in _registry.REWARDS.items() if e.box)


def reward_names() -> tuple[str, ...]:
    """Names accepted by :func:`get_reward` / :func:`differad_rewards`."""
    return _registry.reward_names()


def localization_reward_name(names: Sequence[str]) -> str:
    """The ``__name__`` of the localization reward in a list of reward names (``"dclr,format"`` → ``"dclr_reward"``).

    The localization reward is the one that judges the box: ``dclr`` when present (the paper's),
    else the first box reward of ``names`` (``iou``, ``consistency``, ``multi_box``) — never
    ``format``, whose values say nothing about where the box is.

    Raises:
        ValueError: ``names`` holds no box reward (difficulty weights and resampling need one).
    """
    boxes = [n for n in names if n in BOX_REWARDS]
    if not boxes:
        raise ValueError(
            f"rewards {list(names)} hold no box reward: difficulty weights and group resampling are judged on the "
            f"localization reward; add one of {sorted(BOX_REWARDS)} (e.g. dclr)"
        )
    return f"{'dclr' if 'dclr' in boxes else boxes[0]}_reward"


# --------------------------------------------------------------------------------------------
# Coordinate space of a model / processor
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CoordinateSpec:
    """Everything a pixel-space ground truth needs to become the model's coordinates.

    Attributes:
        space: one of :data:`differad_rl.coords.SPACES`.
        min_pixels, max_pixels: the processor's pixel budget (``smart_resize``'s clamp).
        factor: ``patch_size × merge_size`` (sides of the resized image are multiples of it).

    For ``qwen2_5_vl`` all three are required (they define the space); for the relative spaces
    they are informational and may be ``None``.
    """

    space: _coords.Space
    min_pixels: int | None = None
    max_pixels: int | None = None
    factor: int | None = None

    def __post_init__(self) -> None:
        _coords.check_space(self.space)
        for name in ("min_pixels", "max_pixels", "factor"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0):
                raise ValueError(f"{name}={v!r} must be a positive integer")
        if self.space == "qwen2_5_vl" and None in (self.min_pixels, self.max_pixels, self.factor):
            raise ValueError(
                f"space='qwen2_5_vl' writes pixels of the resized image: min_pixels={self.min_pixels!r}, "
                f"max_pixels={self.max_pixels!r}, factor={self.factor!r} must all be known — pass the "
                "processor (or the numbers) instead of guessing"
            )
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels={self.min_pixels} > max_pixels={self.max_pixels}")

    def to_model_space(self, boxes: Any, width: Any, height: Any) -> Any:
        """Convert original-pixel boxes to this space (thin call of :func:`differad_rl.coords.to_model_space`)."""
        kw: dict[str, Any] = dict(self.coord_kwargs())
        return _coords.to_model_space(boxes, width, height, self.space, **kw)

    def coord_kwargs(self) -> dict[str, int]:
        """The known ``min_pixels`` / ``max_pixels`` / ``factor`` as keyword arguments of :mod:`differad_rl.coords`."""
        kw: dict[str, int] = {}
        if self.min_pixels is not None:
            kw["min_pixels"] = int(self.min_pixels)
        if self.max_pixels is not None:
            kw["max_pixels"] = int(self.max_pixels)
        if self.factor is not None:
            kw["factor"] = int(self.factor)
        return kw


def _space_of_processor(processor: Any) -> str | None:
    try:
        from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor, Qwen3VLProcessor
    except ImportError:  # pragma: no cover - transformers is a dependency of the trl extra
        return None
    for cls, space in ((Qwen2_5_VLProcessor, "qwen2_5_vl"), (Qwen3VLProcessor, "qwen3_vl"),
                       (Qwen2VLProcessor, "qwen2_vl")):
        if isinstance(processor, cls):
            return space
    return None


def _space_of_model(model: Any) -> str:
    if isinstance(model, str):
        return _coords.space_for_model(model)
    config = getattr(model, "config", model)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise ValueError(f"model={type(model).__name__}: has no config.model_type to read the coordinate space from")
    return _coords.space_for_model(model_type)


def _size_get(size: Any, key: str) -> Any:
    if size is None:
        return None
    if isinstance(size, Mapping):
        return size.get(key)
    return getattr(size, key, None)


def coordinate_spec(
    processor_or_space: Any,
    *,
    model: Any = None,
    space: str | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    factor: int | None = None,
) -> CoordinateSpec:
    """Read the coordinate space and pixel budget off a processor (or take them explicitly).

    Args:
        processor_or_space: a Qwen-VL processor (its ``image_processor`` supplies
            ``size.shortest_edge`` / ``size.longest_edge`` = min/max pixels and
            ``patch_size × merge_size``), a :class:`CoordinateSpec` (returned as is) or a space name.
        model: optional model, config or hub name whose ``model_type`` decides the space; it must
            agree with the processor's class when both tell one (else ``ValueError``).
        space: explicit space (wins over everything).
        min_pixels, max_pixels, factor: explicit numbers (win over the processor's).

    Raises:
        ValueError: a bare tokenizer was passed (no ``image_processor``), the space cannot be told,
            processor and model disagree, or ``qwen2_5_vl`` without its pixel budget.
    """
    if isinstance(processor_or_space, CoordinateSpec):
        return processor_or_space
    lo, hi, f = min_pixels, max_pixels, factor
    found: str | None
    if isinstance(processor_or_space, str):
        found = processor_or_space if processor_or_space in _coords.SPACES else _coords.space_for_model(
            processor_or_space
        )
    else:
        processor = processor_or_space
        ip = getattr(processor, "image_processor", None)
        if ip is None:
            raise ValueError(
                f"processor={type(processor).__name__} has no image_processor: a bare tokenizer trains text-only; "
                "pass the multimodal processor (e.g. load it with its own class, not AutoProcessor's fallback)"
            )
        size = getattr(ip, "size", None)
        lo = lo if lo is not None else (_size_get(size, "shortest_edge") or getattr(ip, "min_pixels", None))
        hi = hi if hi is not None else (_size_get(size, "longest_edge") or getattr(ip, "max_pixels", None))
        if f is None and getattr(ip, "patch_size", None) and getattr(ip, "merge_size", None):
            f = int(ip.patch_size) * int(ip.merge_size)
        found = _space_of_processor(processor)
    if model is not None and space is None:
        from_model = _space_of_model(model)
        if found is not None and found != from_model:
            raise ValueError(
                f"the processor ({type(processor_or_space).__name__}) writes {found!r} coordinates but the model "
                f"is {from_model!r}; pass space= explicitly if this pairing is intended"
            )
        found = from_model
    if space is not None:
        found = space
    if found is None:
        raise ValueError(
            f"processor={type(processor_or_space).__name__}: cannot tell its coordinate space; "
            f"pass space= (one of {_coords.SPACES}) or model="
        )
    return CoordinateSpec(
        space=_coords.check_space(found),
        min_pixels=None if lo is None else int(lo),
        max_pixels=None if hi is None else int(hi),
        factor=None if f is None else int(f),
    )


# --------------------------------------------------------------------------------------------
# Target image sizes per sample
# --------------------------------------------------------------------------------------------
def _image_wh(img: Any) -> tuple[int, int] | None:
    """``(width, height)`` of a PIL image, or of an image TRL also accepts: a path (``file://`` too)
    or a ``{"path"}`` / ``{"bytes"}`` dict (only the header is read). ``None`` when it is none of these."""
    size = getattr(img, "size", None)  # PIL: (width, height)
    if isinstance(size, tuple) and len(size) == 2:
        return int(size[0]), int(size[1])
    source: Any = None
    if isinstance(img, (str, bytes)) or hasattr(img, "__fspath__"):
        source = img
    elif isinstance(img, Mapping):
        source = img.get("bytes") or img.get("path")
    if source is None:
        return None
    import io

    from PIL import Image

    if isinstance(source, bytes):
        source = io.BytesIO(source)
    elif isinstance(source, str) and source.startswith("file://"):
        source = source[len("file://"):]
    with Image.open(source) as opened:
        return int(opened.size[0]), int(opened.size[1])


def target_image_sizes(
    n: int,
    *,
    image_size: Sequence[Any] | None = None,
    images: Sequence[Any] | None = None,
    image: Sequence[Any] | None = None,
    ids: Sequence[Any] | None = None,
) -> np.ndarray:
    """``(n, 2)`` int64 ``[width, height]`` of each sample's target image.

    Taken from the ``image_size`` column; else from the target = LAST image of the ``images``
    column (``[reference, target]``) or the ``image`` column. When both a column and images are
    present they must agree.

    Raises:
        ValueError: no source for a sample's size, a malformed size, or a column/image mismatch
            (the message names the sample index and its ``id`` when given).
    """

    def _name(i: int) -> str:
        return f"sample {i}" + (f" (id {ids[i]!r})" if ids is not None and i < len(ids) else "")

    from_images: list[tuple[int, int] | None] = [None] * n
    pics = images if images is not None else ([[im] for im in image] if image is not None else None)
    if pics is not None:
        if len(pics) != n:
            raise ValueError(f"images: {len(pics)} entries for {n} completions")
        for i, lst in enumerate(pics):
            if lst:
                try:
                    from_images[i] = _image_wh(lst[-1])
                except OSError as err:
                    raise ValueError(f"{_name(i)}: cannot open the target image {lst[-1]!r}: {err}") from err
    if image_size is None:
        missing = [i for i, s in enumerate(from_images) if s is None]
        if missing:
            i = missing[0]
            if pics is None:
                why = "no 'image_size' column and no 'images' / 'image' column"
            elif not pics[i]:
                why = "no 'image_size' column and no images in this row"
            else:
                why = (f"no 'image_size' column, and the target (last) image is a {type(pics[i][-1]).__name__}, "
                       "not a PIL image, a path or a {'path'|'bytes'} dict")
            raise ValueError(f"{_name(i)}: {why}; add image_size = [width, height] of the target image")
        return np.asarray(from_images, dtype=np.int64).reshape(n, 2)
    if len(image_size) != n:
        raise ValueError(f"image_size: {len(image_size)} entries for {n} completions")
    try:
        sizes = np.asarray([np.asarray(s, dtype=np.float64).reshape(2) for s in image_size]).reshape(n, 2)
    except (TypeError, ValueError):
        bad = next(i for i, s in enumerate(image_size) if np.size(np.asarray(s, dtype=object)) != 2)
        raise ValueError(f"{_name(bad)}: image_size={image_size[bad]!r} is not [width, height]") from None
    bad_rows = np.flatnonzero(~np.isfinite(sizes).all(1) | (sizes <= 0).any(1) | (sizes != np.round(sizes)).any(1))
    if bad_rows.size:
        i = int(bad_rows[0])
        raise ValueError(f"{_name(i)}: image_size={list(image_size[i])!r} must be two positive integers")
    sizes = sizes.astype(np.int64)
    for i, s in enumerate(from_images):
        if s is not None and tuple(sizes[i]) != s:
            raise ValueError(
                f"{_name(i)}: image_size={sizes[i].tolist()} but the target image is {s[0]}x{s[1]}"
            )
    return sizes


# --------------------------------------------------------------------------------------------
# Reward callables
# --------------------------------------------------------------------------------------------
def _box_lists(boxes: Sequence[Any] | None, solution: Sequence[Any] | None, n: int) -> list[list[Any]]:
    """Per-sample ground-truth box lists for the multi-box reward: the ``boxes`` column (all boxes
    of the target, ``[]`` = normal) when present, else ``[solution]`` (``[]`` for the zero box)."""
    if boxes is not None:
        return [list(b) if b is not None else [] for b in boxes]
    if solution is None:
        raise ValueError("multi_box reward: neither a 'boxes' nor a 'solution' column is present")
    out: list[list[Any]] = []
    for s in solution:
        a = np.asarray(s, dtype=np.float64).reshape(-1)
        out.append([] if a.size == 4 and not a.any() else [a.tolist()])
    return out


class TargetSizeReward:
    """A core pixel-space reward fed with each sample's target size (picklable, has ``__name__``).

    Calls ``inner(completions=completions, **kwargs, image_size=sizes)`` where ``sizes`` comes from
    :func:`target_image_sizes`; every other keyword (``solution``, TRL's extras) passes through.
    With ``multi_box=True`` the ground truth passed as ``solution`` is the ``boxes`` column (all
    boxes of the target) when the dataset has one.
    """

    def __init__(self, inner: Callable[..., list[float]], name: str, *, multi_box: bool = False) -> None:
        self.inner = inner
        self.__name__ = name
        self.multi_box = multi_box

    def __call__(self, completions: Sequence[Any], **kwargs: Any) -> list[float]:
        if self.multi_box:
            kwargs["solution"] = _box_lists(kwargs.get("boxes"), kwargs.get("solution"), len(completions))
        kwargs["image_size"] = target_image_sizes(
            len(completions),
            image_size=kwargs.get("image_size"),
            images=kwargs.get("images"),
            image=kwargs.get("image"),
            ids=kwargs.get("id"),
        ).tolist()
        return self.inner(completions=completions, **kwargs)

    def __repr__(self) -> str:
        return f"TargetSizeReward({self.__name__!r}, {self.inner!r})"


def get_reward(name: str, spec: CoordinateSpec | Any, /, **options: Any) -> Callable[..., list[float]]:
    """One TRL reward function by ``name`` (see :func:`reward_names`).

    Box rewards are built through the registry (:func:`differad_rl.registry.build_reward`) with
    ``gt_space="pixel"``, ``space=spec.space`` and the spec's pixel budget, then wrapped in
    :class:`TargetSizeReward`; ``"format"`` is the core's format reward (it takes ``name`` and
    ``prompt_family`` only). The option
    ``name=`` renames the function (its ``__name__``, under which TRL logs it and
    ``localization_reward`` finds it): two variants of one reward in a trainer need distinct names.

    Raises:
        ValueError: unknown ``name`` (the message lists the known ones) or an option the reward does not take.
    """
    entry = _registry.reward_entry(name)
    if not entry.box:
        return _registry.build_reward(name, **options)
    spec = coordinate_spec(spec)
    kw: dict[str, Any] = dict(options)
    kw.update(gt_space="pixel", space=spec.space)
    kw.update(spec.coord_kwargs())
    inner = _registry.build_reward(name, **kw)
    return TargetSizeReward(inner, getattr(inner, "__name__", f"{name}_reward"), multi_box=entry.multi_box)


def differad_rewards(
    processor_or_space: Any,
    *,
    names: Sequence[str] = ("dclr", "format"),
    model: Any = None,
    space: str | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    factor: int | None = None,
    **options: Any,
) -> list[Callable[..., list[float]]]:
    """The method's reward functions for ``GRPOTrainer(reward_funcs=...)``, in ``names`` order.

    Args:
        processor_or_space: the model's processor (preferred: the pixel budget is read off it),
            a :class:`CoordinateSpec` or a space name (then pass the budget for ``qwen2_5_vl``).
        names: reward names from :func:`reward_names`; the default is the paper's DCLR + format.
        model, space, min_pixels, max_pixels, factor: see :func:`coordinate_spec`.
        **options: forwarded to every box-reward factory (``w_center``, ``w_area``, ``eps``,
            ``center_norm``, ``require_answer``, ...).

    Raises:
        ValueError: an unknown name (listing the known ones), duplicates, or no names.
    """
    names = list(names)
    if not names:
        raise ValueError("names=[]: give at least one reward name")
    if "name" in options:
        raise ValueError("name= would give every reward the same name; rename one reward with get_reward(kind, spec, name=...)")
    for n in names:
        _registry.reward_entry(n)  # raises on an unknown name, listing the known ones
    # one option set may configure several reward lists (a study's arms): an option the listed rewards do not
    # take is skipped, but one that no registered reward takes is a mistake
    taken = set().union(*(e.accepts() for e in _registry.REWARDS.values()))
    unknown = sorted(set(options) - taken)
    if unknown:
        raise ValueError(f"option(s) {', '.join(unknown)} are taken by no reward; the rewards' options: "
                         f"{', '.join(sorted(taken))}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"names={names}: duplicate reward(s) {dup}")
    spec = coordinate_spec(
        processor_or_space, model=model, space=space, min_pixels=min_pixels, max_pixels=max_pixels, factor=factor
    )
    return [get_reward(n, spec, **_options_for(n, options)) for n in names]


def _options_for(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The shared ``options`` that reward ``name`` takes (:func:`differad_rl.registry.reward_options`):
    the DCLR parameters go to the DCLR rewards only, ``prompt_family`` to every reward (the format reward
    included), so one set of options configures a whole reward list."""
    return _registry.reward_options(name, options)
