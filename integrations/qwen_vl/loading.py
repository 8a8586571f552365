"""One loader for every entry point: model + processor of a Qwen-VL, with one rule each for padding
side, weight dtype, pixel budget, family and tiny-model detection.

The SFT and GRPO examples and ``differad-rl predict`` all load through
:func:`load_model_and_processor`, so these rules cannot drift apart between them:

* **Padding side — always left.** The processor's tokenizer is set to ``padding_side="left"`` and
  checked (:func:`force_left_padding`). TRL's own loader does the same; with right padding a
  batch's image-token positions and the log-probs of padded rows silently change, and batched
  generation continues after the pad tokens.
* **dtype.** :func:`weights_dtype`: for training the weights are always float32 — ``bf16`` means
  *bf16 autocast* (the trainer's ``bf16=True``) over fp32 master weights; loading the weights in
  bf16 makes most AdamW updates at lr 1e-5 round away. For inference (``training=False``) ``bf16``
  loads bf16 weights (half the memory, what a GPU evaluation wants).
* **Pixel budget.** ``min_pixels`` / ``max_pixels`` go to the image processor's ``size``
  (``shortest_edge`` / ``longest_edge``) and to its legacy attributes
  (:func:`set_pixel_budget`); :func:`pixel_budget` reads them back. For Qwen2.5-VL they decide the
  coordinate space the model writes in (docs/method.md §2).
* **Family** (:func:`model_family`): from the configuration's ``model_type`` — ``qwen2_vl``,
  ``qwen2_5_vl`` or ``qwen3_vl`` — never from the model's name.
* **Tiny models** (:func:`is_tiny`): the keyword ``"tiny"`` / ``"tiny:<family>"`` builds one
  offline (:func:`~differad_rl.integrations.qwen_vl.tiny.tiny_model_for`); a folder is a tiny model
  iff it holds the manifest ``tiny_build.json`` that
  :mod:`~differad_rl.integrations.qwen_vl.tiny` writes — a hub id or folder whose name merely
  starts with "tiny" is a real model. Tiny folders load with
  :func:`~differad_rl.integrations.qwen_vl.tiny.load_tiny_qwen_vl`.
* **Hub processors without torchvision.** transformers' stock Qwen-VL processors carry a video
  processor (and a fast image processor) that import torchvision. Where it is missing,
  :func:`load_processor` loads the same folder's files into an *image-only* processor
  (:func:`image_only_processor`: transformers' PIL image processor + the family's processor class
  without a video processor) and warns once; the padding and pixel-budget rules above apply to it
  unchanged. Videos are then unsupported; installing the torchvision build that matches torch
  brings back the stock processor.

Everything heavy (torch, transformers) is imported inside the functions.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import Any

__all__ = [
    "FAMILIES",
    "PADDING_SIDE",
    "TINY",
    "TINY_MANIFEST",
    "check_left_padding",
    "force_left_padding",
    "freeze_vision_tower",
    "image_only_processor",
    "is_tiny",
    "keep_tiny_manifest",
    "load_model_and_processor",
    "load_processor",
    "model_family",
    "model_name",
    "pixel_budget",
    "resolve_model",
    "set_pixel_budget",
    "tiny_spec_family",
    "vision_tower",
    "weights_dtype",
]

#: The Qwen-VL families (transformers ``model_type`` = coordinate space name).
FAMILIES: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
#: The one padding side of every processor this package hands out.
PADDING_SIDE = "left"
#: ``--model tiny`` / ``--model tiny:<family>`` builds a tiny offline model (exact keyword, not a prefix).
TINY = "tiny"
#: The manifest :mod:`differad_rl.integrations.qwen_vl.tiny` writes into every tiny build / checkpoint.
TINY_MANIFEST = "tiny_build.json"
_DEFAULT_TINY_FAMILY = "qwen2_5_vl"


# ------------------------------------------------------------------------------- tiny models
def tiny_spec_family(model: str | os.PathLike[str]) -> str | None:
    """The family a tiny keyword asks for (``"tiny"`` → ``"qwen2_5_vl"``), else None.

    Raises:
        ValueError: ``"tiny:<x>"`` with an unknown family.
    """
    s = str(model)
    if s == TINY:
        return _DEFAULT_TINY_FAMILY
    if s.startswith(TINY + ":"):
        family = s.split(":", 1)[1]
        if family not in FAMILIES:
            raise ValueError(f"--model {s}: unknown tiny family {family!r}; expected tiny:<family> with one of {FAMILIES}")
        return family
    return None


def is_tiny(model: str | os.PathLike[str]) -> bool:
    """True for the tiny keywords and for a folder holding the tiny manifest (``tiny_build.json``).

    A name is never enough: ``"tiny-llava"`` or ``"runs/tiny_sft"`` without the manifest is a real model.
    """
    if tiny_spec_family(model) is not None:
        return True
    return (Path(model) / TINY_MANIFEST).is_file()


def resolve_model(
    model: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> str:
    """A loadable model path or hub id: a tiny keyword is built (or reused) under ``cache_dir``
    with the given pixel budget; anything else is returned as given."""
    family = tiny_spec_family(model)
    if family is None:
        return str(model)
    from differad_rl.integrations.qwen_vl.tiny import tiny_model_for

    kw = {k: int(v) for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    return str(tiny_model_for(family, cache_dir=cache_dir, **kw))


def model_name(model: str | os.PathLike[str]) -> str:
    """The name a run records for ``model``: the keyword itself for tiny keywords, the absolute path
    for an existing folder, else the hub id as given (so a rerun from another directory matches)."""
    if tiny_spec_family(model) is not None:
        return str(model)
    p = Path(model)
    return str(p.resolve()) if p.is_dir() else str(model)


def keep_tiny_manifest(model: Any, checkpoint_dir: str | os.PathLike[str]) -> None:
    """A fine-tuned tiny model's checkpoint keeps its build manifest (marked as a checkpoint), so
    :func:`~differad_rl.integrations.qwen_vl.tiny.load_tiny_qwen_vl` loads it with its processor class.
    A real model (no manifest where it was loaded from) is left alone."""
    src = Path(getattr(model, "name_or_path", "") or ".")
    if (src / TINY_MANIFEST).is_file():
        from differad_rl.integrations.qwen_vl.tiny import mark_tiny_checkpoint

        mark_tiny_checkpoint(src, checkpoint_dir)


# ------------------------------------------------------------------------------- family, dtype
def model_family(model: Any) -> str:
    """The Qwen-VL family of ``model``: its configuration's ``model_type``.

    Args:
        model: a model, a configuration, or a hub id / folder (its ``config.json`` is read with
            ``AutoConfig``; no weights are loaded).

    Raises:
        ValueError: the ``model_type`` is not one of :data:`FAMILIES`, or no configuration can be read.
    """
    if isinstance(model, (str, os.PathLike)):
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(str(model))
        except (OSError, ValueError) as exc:
            raise ValueError(f"--model {model}: cannot read its config.json ({_first_line(exc)})") from None
        where = str(model)
    else:
        config = getattr(model, "config", model)
        where = type(model).__name__
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"--model {where}: model_type {model_type!r} is not a supported family; expected one of {FAMILIES}"
        )
    return str(model_type)


def weights_dtype(*, bf16: bool, training: bool) -> Any:
    """The dtype to load weights in: float32 for training (``bf16`` = autocast over fp32 master
    weights, set on the trainer), bfloat16 for inference when ``bf16``, else float32."""
    import torch

    return torch.bfloat16 if (bf16 and not training) else torch.float32


# ------------------------------------------------------------------------------- processor rules
def force_left_padding(processor: Any) -> Any:
    """Set the processor's tokenizer to left padding (and the processor's own ``padding_side`` where
    it has one), check it, and return the processor."""
    tok = getattr(processor, "tokenizer", processor)
    tok.padding_side = PADDING_SIDE
    if hasattr(processor, "padding_side") and processor is not tok:
        processor.padding_side = PADDING_SIDE
    check_left_padding(processor)
    return processor


def check_left_padding(processor: Any) -> None:
    """Raise ``ValueError`` unless the processor's tokenizer pads on the left."""
    tok = getattr(processor, "tokenizer", processor)
    side = getattr(tok, "padding_side", None)
    if side != PADDING_SIDE:
        raise ValueError(
            f"processor {type(processor).__name__}: tokenizer.padding_side={side!r}; it must be 'left' "
            "(right padding misaligns image tokens and batched generation); load it with "
            "differad_rl.integrations.qwen_vl.loading.load_model_and_processor or call force_left_padding(processor)"
        )


def _size_fields(ip: Any) -> dict[str, Any]:
    size = getattr(ip, "size", None)
    if size is None:
        return {}
    if hasattr(size, "__dataclass_fields__"):
        return {k: getattr(size, k) for k in size.__dataclass_fields__}
    return dict(size)


def pixel_budget(processor: Any) -> tuple[int, int]:
    """``(min_pixels, max_pixels)`` of the processor's image processor (``size`` first, then the
    legacy ``min_pixels`` / ``max_pixels`` attributes).

    Raises:
        ValueError: a bare tokenizer (no image processor), or no budget can be read.
    """
    ip = getattr(processor, "image_processor", None)
    if ip is None:
        raise ValueError(f"processor {type(processor).__name__} has no image_processor (a bare tokenizer?)")
    size = _size_fields(ip)
    lo = size.get("shortest_edge") or getattr(ip, "min_pixels", None)
    hi = size.get("longest_edge") or getattr(ip, "max_pixels", None)
    if lo is None or hi is None:
        raise ValueError(f"image processor {type(ip).__name__}: no min/max pixel budget found (size={size!r})")
    return int(lo), int(hi)


def set_pixel_budget(processor: Any, min_pixels: int | None, max_pixels: int | None) -> None:
    """Set the image processor's ``size`` = {shortest_edge: min_pixels, longest_edge: max_pixels}
    (and the legacy attributes of the same names); None keeps the processor's value.

    Raises:
        ValueError: the resulting budget is not ``0 < min_pixels <= max_pixels``.
    """
    if min_pixels is None and max_pixels is None:
        return
    ip = processor.image_processor
    cur_lo, cur_hi = pixel_budget(processor)
    lo = cur_lo if min_pixels is None else int(min_pixels)
    hi = cur_hi if max_pixels is None else int(max_pixels)
    if not 0 < lo <= hi:
        raise ValueError(
            f"--min-pixels {lo} / --max-pixels {hi}: need 0 < min_pixels <= max_pixels "
            f"(the processor's own budget is {cur_lo}..{cur_hi})"
        )
    size = _size_fields(ip)
    size["shortest_edge"], size["longest_edge"] = lo, hi
    ip.size = type(ip.size)(**size) if hasattr(ip.size, "__dataclass_fields__") else size
    for name, v in (("min_pixels", lo), ("max_pixels", hi)):
        if hasattr(ip, name):
            setattr(ip, name, v)


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] or type(exc).__name__


def load_processor(
    model: str | os.PathLike[str],
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> Any:
    """The multimodal processor of a (resolved) model folder or hub id, left padding, pixel budget set.

    Tiny folders load with their own processor class; others with ``AutoProcessor``. When
    ``AutoProcessor`` fails only because torchvision is missing (transformers' ``ImportError``
    naming it: the stock video processor and the fast image processor import it), the same files
    are loaded by :func:`image_only_processor` and one warning line says so (once per process).
    Either way the result gets the same pixel budget and left padding.

    Raises:
        ImportError: the processor needs torchvision, it is not installed, and the folder is not a
            Qwen-VL family the image-only processor covers (one line, names the package).
        ValueError: no processor can be loaded, or ``AutoProcessor`` fell back to a bare tokenizer
            (a trainer would then train text-only without any error).
    """
    path = str(model)
    if (Path(path) / TINY_MANIFEST).is_file():
        from differad_rl.integrations.qwen_vl.tiny import load_tiny_processor

        processor = load_tiny_processor(path)
    else:
        from transformers import AutoProcessor

        try:
            processor = AutoProcessor.from_pretrained(path, padding_side=PADDING_SIDE)
        except ImportError as exc:
            if "torchvision" not in str(exc).lower():
                raise
            processor = _image_only_fallback(path)
        except (OSError, ValueError) as exc:
            raise ValueError(f"--model {path}: no processor could be loaded ({_first_line(exc)})") from None
        from transformers.processing_utils import ProcessorMixin

        if not isinstance(processor, ProcessorMixin) or getattr(processor, "image_processor", None) is None:
            raise ValueError(
                f"--model {path}: AutoProcessor returned {type(processor).__name__}, not a multimodal processor "
                "(the folder lacks preprocessor/processor files?)"
            )
    return _finish_processor(processor, min_pixels, max_pixels)


#: Set once the torchvision fallback has warned (the warning is printed once per process).
_image_only_warned = False
#: transformers' stock processor class of each family (what an image-only processor saves itself as).
_STOCK_PROCESSOR: dict[str, str] = {
    "qwen2_vl": "Qwen2VLProcessor",
    "qwen2_5_vl": "Qwen2_5_VLProcessor",
    "qwen3_vl": "Qwen3VLProcessor",
}


def _image_only_fallback(path: str) -> Any:
    """:func:`image_only_processor` of ``path`` after ``AutoProcessor`` failed for want of torchvision,
    with the one warning line; the install hint as one ``ImportError`` line where it cannot apply."""
    global _image_only_warned
    try:
        family = model_family(path)
    except ValueError as exc:
        raise ImportError(
            f"--model {path}: its processor needs torchvision, which is not installed, and the image-only "
            f"fallback covers only the Qwen-VL families {FAMILIES} ({_first_line(exc)}): install the torchvision "
            "build that matches your torch, from the same index (e.g. `pip install torchvision` beside a CUDA "
            "torch; see README 'Install')"
        ) from None
    try:
        processor = image_only_processor(path)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"--model {path}: torchvision is not installed and the image-only processor could not be loaded "
            f"either ({_first_line(exc)})"
        ) from None
    if not _image_only_warned:
        _image_only_warned = True
        warnings.warn(
            f"--model {path}: torchvision is not installed, so transformers' {_STOCK_PROCESSOR[family]} cannot load; "
            f"loaded the same files into an image-only processor ({type(processor).__name__}: PIL image processor, "
            "no video processor; videos are unsupported). For the stock processor install the torchvision build "
            "that matches your torch (e.g. `pip install torchvision` from torch's index; see README 'Install').",
            UserWarning,
            stacklevel=3,
        )
    return processor


@functools.cache
def _image_only_class(family: str) -> type:
    """The family's processor class without a video processor
    (:mod:`~differad_rl.integrations.qwen_vl.tiny`'s ``Tiny*Processor``), saving itself like the stock one.

    What it saves: ``processor_config.json`` names the stock class (``Qwen2_5_VLProcessor`` …; with the
    tiny class's name ``AutoProcessor`` would load a checkpoint as a bare tokenizer) and
    ``preprocessor_config.json`` holds the image processor (as on the hub, where the stock video
    processor reads its settings from it when no video configuration exists; a separate
    ``video_preprocessor_config.json`` of the source folder, as Qwen3-VL's, is not carried over).
    """
    from differad_rl.integrations.qwen_vl import tiny

    base = {"qwen2_vl": tiny.TinyQwen2VLProcessor, "qwen2_5_vl": tiny.TinyQwen2_5_VLProcessor,
            "qwen3_vl": tiny.TinyQwen3VLProcessor}[family]
    stock = _STOCK_PROCESSOR[family]

    def to_dict(self: Any) -> dict[str, Any]:
        out = base.to_dict(self)
        out["processor_class"] = stock
        return out

    def save_pretrained(self: Any, save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Any:
        files = base.save_pretrained(self, save_directory, *args, **kwargs)
        self.image_processor.save_pretrained(save_directory)
        return files

    return type(f"ImageOnly{stock}", (base,), {
        "__module__": __name__, "__qualname__": f"ImageOnly{stock}", "to_dict": to_dict,
        "save_pretrained": save_pretrained,
        "__doc__": f"``{stock}`` without a video processor (PIL image processor; no torchvision needed).",
    })


def _chat_template(path: str, tokenizer: Any) -> str | None:
    """The folder's chat template: ``chat_template.jinja``, else the legacy ``chat_template.json``,
    else the tokenizer's own (what ``ProcessorMixin.from_pretrained`` prefers, in that order)."""
    import json

    from transformers.utils import cached_file

    for name in ("chat_template.jinja", "chat_template.json"):
        found = cached_file(path, name, _raise_exceptions_for_missing_entries=False)
        if found:
            text = Path(found).read_text(encoding="utf-8")
            return text if name.endswith(".jinja") else json.loads(text)["chat_template"]
    return getattr(tokenizer, "chat_template", None)


def image_only_processor(path: str | os.PathLike[str]) -> Any:
    """The folder's processor without its torchvision-backed video processor (no torchvision needed).

    Reads the files ``AutoProcessor`` reads — the image processor's settings (pixel budget, patch and
    merge size, mean/std; from ``processor_config.json`` or ``preprocessor_config.json``, as
    transformers resolves them) into transformers' ``Qwen2VLImageProcessorPil``, the tokenizer
    files, the chat template — into the family's processor class minus its video processor
    (:func:`_image_only_class`). Padding side and pixel budget are left as the files say
    (:func:`load_processor` applies its rules on top).

    The image grid is the stock one: the PIL image processor
    (``image_processing_pil_qwen2_vl``) and the torchvision one (``image_processing_qwen2_vl``) each
    call their own ``smart_resize``, and the two are the same source text (tests/test_loading.py
    compares them), so ``image_grid_thw``, the number of visual tokens and the coordinate space are
    identical. The pixel values themselves (PIL vs torchvision bicubic resize, then the same
    rescale/normalise) may differ slightly; comparing them needs torchvision and is not tested here.

    Raises:
        ValueError: ``model_type`` is not a Qwen-VL family, or no image-processor settings are found.
    """
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = str(path)
    family = model_family(path)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return _image_only_class(family)(image_processor=image_processor, tokenizer=tokenizer,
                                     chat_template=_chat_template(path, tokenizer))


def _finish_processor(processor: Any, min_pixels: int | None, max_pixels: int | None) -> Any:
    set_pixel_budget(processor, min_pixels, max_pixels)
    return force_left_padding(processor)


# ------------------------------------------------------------------------------- model + processor
def load_model_and_processor(
    model: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    bf16: bool = False,
    training: bool = True,
    attn_implementation: str | None = None,
    device: Any = None,
) -> tuple[Any, Any]:
    """Load ``(model, processor)`` by the rules of this module (see its docstring).

    Args:
        model: ``"tiny"`` / ``"tiny:<family>"`` (built offline under ``cache_dir``), a tiny folder
            (manifest), a checkpoint folder or a hub id.
        cache_dir: where tiny keywords are built (default: the shared tiny cache).
        min_pixels, max_pixels: the image processor's pixel budget (None keeps the processor's own).
        bf16: training: the trainer will run under bf16 autocast (weights stay fp32);
            inference (``training=False``): load bf16 weights.
        training: see ``bf16`` (:func:`weights_dtype`).
        attn_implementation: passed to ``from_pretrained`` (e.g. ``"sdpa"``, ``"flash_attention_2"``).
        device: move the model there (None: leave it on the CPU, a trainer places it).

    Raises:
        ValueError: unknown tiny family or model family, no configuration or processor, a bare
            tokenizer instead of a processor, a bad pixel budget.
        ImportError: the processor needs torchvision and no image-only fallback applies
            (see :func:`load_processor`).
    """
    path = resolve_model(model, cache_dir=cache_dir, min_pixels=min_pixels, max_pixels=max_pixels)
    dtype = weights_dtype(bf16=bf16, training=training)
    model_family(path)  # a clear error for another architecture, before any weight is read
    if (Path(path) / TINY_MANIFEST).is_file():
        from differad_rl.integrations.qwen_vl.tiny import load_tiny_qwen_vl

        net, processor = load_tiny_qwen_vl(path, dtype=dtype)
        processor = _finish_processor(processor, min_pixels, max_pixels)
    else:
        processor = load_processor(path, min_pixels=min_pixels, max_pixels=max_pixels)
        from transformers import AutoModelForImageTextToText

        kw: dict[str, Any] = {"dtype": dtype}
        if attn_implementation:
            kw["attn_implementation"] = attn_implementation
        net = AutoModelForImageTextToText.from_pretrained(path, **kw)
    if device is not None:
        net = net.to(device)
    return net, processor


def vision_tower(model: Any) -> Any:
    """The vision encoder of a Qwen-VL (its ``visual`` sub-module, patch embedding to merger).

    Found as ``model.visual`` or ``model.model.visual`` (transformers 5 nests it in the inner model).

    Raises:
        ValueError: the model has no ``visual`` sub-module.
    """
    visual = getattr(model, "visual", None) or getattr(getattr(model, "model", None), "visual", None)
    if visual is None:
        raise ValueError(f"{type(model).__name__}: no 'visual' sub-module (vision tower)")
    return visual


def freeze_vision_tower(model: Any) -> int:
    """Freeze the vision encoder (``visual`` sub-module), as in the paper; returns #frozen params."""
    visual = vision_tower(model)
    n = 0
    for p in visual.parameters():
        p.requires_grad_(False)
        n += p.numel()
    return n
