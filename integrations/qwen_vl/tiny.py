"""A tiny, randomly initialised Qwen-VL that runs offline on CPU (tests, examples, CI).

``build_tiny_qwen_vl(family, out_dir)`` writes a complete Hugging Face model folder for one of the
three Qwen-VL families the method targets — ``"qwen2_vl"``, ``"qwen2_5_vl"``, ``"qwen3_vl"``
(the names equal transformers' ``model_type`` and :data:`differad_rl.coords.SPACES`):

- the REAL architecture (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``,
  ``Qwen3VLForConditionalGeneration``) with random weights, about 0.1–0.3 M parameters;
- a byte-level BPE tokenizer trained on the spot with the ``tokenizers`` library on the method's own
  text (system prompt, instruction pool, box strings such as ``(12,34),(56,78)``, ``<think>`` /
  ``<answer>`` text), digits split one by one as in Qwen, plus Qwen's special tokens and a Qwen-VL
  chat template — so the model can write any box;
- the real image processor (``Qwen2VLImageProcessorPil``: no torchvision needed) with patch 14
  (16 for Qwen3-VL), merge 2 and a small pixel budget;
- a processor subclass without a video processor (the stock processors need torchvision for it).

Nothing is downloaded. ``load_tiny_qwen_vl(path)`` loads the pair back and asserts the processor is
a real multimodal processor: ``AutoProcessor`` on such a folder may silently return the bare
tokenizer, and a trainer fed a bare tokenizer trains text-only without any error.

Builds are cached: a folder holding a complete build for the same arguments (``tiny_build.json``
written last, atomically) is reused as is.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    AutoModelForImageTextToText,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)
from transformers.processing_utils import ProcessorMixin

__all__ = [
    "FAMILIES",
    "QWEN_SPECIAL_TOKENS",
    "QWEN_VL_CHAT_TEMPLATE",
    "TinyQwen2VLProcessor",
    "TinyQwen2_5_VLProcessor",
    "TinyQwen3VLProcessor",
    "build_tiny_qwen_vl",
    "load_tiny_processor",
    "load_tiny_qwen_vl",
    "mark_tiny_checkpoint",
    "tiny_model_for",
    "default_pixel_budget",
]

Family = Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
FAMILIES: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

#: Bump when the build recipe changes: cached folders with another version are rebuilt.
BUILD_VERSION = 3
MANIFEST = "tiny_build.json"

#: Qwen's special tokens, in Qwen's order (ids differ: our vocabulary is tiny).
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
#: Reasoning tags kept as single (non-special) tokens so decoding keeps them.
REASONING_TOKENS: tuple[str, ...] = ("<think>", "</think>", "<answer>", "</answer>")

#: The Qwen2-VL / Qwen2.5-VL chat template (images and videos become vision placeholders in order;
#: Qwen3-VL's template renders images the same way).
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# --------------------------------------------------------------------------------------------
# Processors without a video processor (the stock ones need torchvision for it).
# ProcessorMixin infers its sub-processors from the ``__init__`` signature, so leaving
# ``video_processor`` out of the signature is what makes them image-only.
# --------------------------------------------------------------------------------------------
class TinyQwen2VLProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` with an image processor and a tokenizer only (no video processor)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class TinyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` with an image processor and a tokenizer only (no video processor)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class TinyQwen3VLProcessor(Qwen3VLProcessor):
    """``Qwen3VLProcessor`` with an image processor and a tokenizer only (no video processor)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


_PROCESSORS: dict[str, type[ProcessorMixin]] = {
    "qwen2_vl": TinyQwen2VLProcessor,
    "qwen2_5_vl": TinyQwen2_5_VLProcessor,
    "qwen3_vl": TinyQwen3VLProcessor,
}
_MODELS: dict[str, type[PreTrainedModel]] = {
    "qwen2_vl": Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
    "qwen3_vl": Qwen3VLForConditionalGeneration,
}
_PATCH = {"qwen2_vl": 14, "qwen2_5_vl": 14, "qwen3_vl": 16}
_MERGE = 2


def _check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is not a tiny Qwen-VL family; expected one of {FAMILIES}")
    return family


def default_pixel_budget(family: str) -> tuple[int, int]:
    """``(min_pixels, max_pixels)`` of the tiny builds: (2f)² … (4f)² with f = patch × merge.

    That is 56²…112² for Qwen2-VL / Qwen2.5-VL (f = 28) and 64²…128² for Qwen3-VL (f = 32): an
    image becomes 4–16 visual tokens, which keeps a dual-image prompt short on CPU.
    """
    f = _PATCH[_check_family(family)] * _MERGE
    return (2 * f) ** 2, (4 * f) ** 2


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------
def _tokenizer_corpus(seed: int) -> list[str]:
    """The method's text plus box strings, so BPE learns what the policy must write."""
    import random

    rng = random.Random(seed)
    lines: list[str] = []
    try:  # the core's prompts (present once the core has landed)
        from differad_rl import prompts as _prompts

        lines.append(str(_prompts.SYSTEM_PROMPT))
        lines.extend(str(s) for s in _prompts.INSTRUCTIONS)
        lines.extend(str(s) for s in getattr(_prompts, "FORMAT_HINTS", {}).values())
    except ImportError:
        pass
    lines += [
        "You are a helpful assistant.",
        "The first image is a normal reference sample. The second image is the target to inspect.",
        "Compare the two images and locate the anomaly in the second image.",
        "Output the thinking process in <think> </think> and the final box in <answer> </answer> tags.",
        "If there is no anomaly, answer (0,0),(0,0).",
        "<think>The target differs from the reference in one region.</think><answer>(0,0),(0,0)</answer>",
        "scratch crack hole contamination broken missing color cut bent fold print defect anomaly normal",
    ]
    for _ in range(400):
        x1, y1 = rng.randint(0, 999), rng.randint(0, 999)
        x2, y2 = rng.randint(x1, 1000), rng.randint(y1, 1000)
        box = f"({x1},{y1}),({x2},{y2})"
        lines.append(f"<think>The defect is near ({x1},{y1}).</think><answer>{box}</answer>")
        lines.append(f"[{x1}, {y1}, {x2}, {y2}] <|box_start|>{box}<|box_end|>")
    return lines


def _train_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in REASONING_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        padding_side="left",
        model_max_length=32768,
        additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
        chat_template=QWEN_VL_CHAT_TEMPLATE,
    )
    return fast


# --------------------------------------------------------------------------------------------
# Model configuration
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TinyArch:
    """Sizes of a tiny build (everything else follows the family's published architecture).

    The default (text 64 × 2 layers, vision 32 × 2 blocks, ~0.25M parameters) is for the plumbing
    tests; :data:`LEARNER_ARCH` is wide and deep enough to learn to localize on CPU.
    ``vision_positions`` (Qwen3-VL only) is the learned position-embedding grid's cell count (a
    perfect square; 64 = an 8 × 8 grid, interpolated to the image's token grid).
    """

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    vision_hidden_size: int = 32
    vision_depth: int = 2
    vision_heads: int = 2
    vision_positions: int = 64

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "vision_hidden_size",
                     "vision_depth", "vision_heads", "vision_positions"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TinyArch.{name}={getattr(self, name)} must be >= 1")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"TinyArch: hidden_size={self.hidden_size} must be a multiple of num_heads="
                             f"{self.num_heads}, itself a multiple of num_kv_heads={self.num_kv_heads}")
        if self.vision_hidden_size % self.vision_heads:
            raise ValueError(f"TinyArch: vision_hidden_size={self.vision_hidden_size} must be a multiple of "
                             f"vision_heads={self.vision_heads}")
        if round(self.vision_positions ** 0.5) ** 2 != self.vision_positions:
            raise ValueError(f"TinyArch.vision_positions={self.vision_positions} must be a perfect square")


#: A tiny model that can learn the task on 2 CPU cores (~1M parameters; see examples/trl/README.md).
LEARNER_ARCH = TinyArch(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, vision_hidden_size=64,
                        vision_depth=2, vision_heads=2, vision_positions=64)


def _mrope_section(head_dim: int) -> list[int]:
    """Temporal/height/width split of the ``head_dim / 2`` rotary frequencies (2 : 3 : 3, as [2, 3, 3]
    for head_dim 16 and Qwen's [16, 24, 24] for head_dim 128)."""
    half = head_dim // 2
    hw = (3 * half) // 8
    return [half - 2 * hw, hw, hw]


def _model_config(family: str, tokenizer: PreTrainedTokenizerFast, arch: TinyArch = TinyArch()) -> Any:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    vocab = len(tokenizer)
    text = dict(
        vocab_size=vocab,
        hidden_size=arch.hidden_size,
        intermediate_size=2 * arch.hidden_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_kv_heads,
        max_position_embeddings=4096,
        bos_token_id=None,  # like Qwen's chat models: no BOS is prepended
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    top = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    patch = _PATCH[family]
    if family == "qwen2_vl":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6,
                                   "mrope_section": _mrope_section(arch.hidden_size // arch.num_heads)}
        vision = dict(depth=arch.vision_depth, embed_dim=arch.vision_hidden_size, hidden_size=arch.hidden_size,
                      mlp_ratio=2, num_heads=arch.vision_heads, patch_size=patch,
                      spatial_merge_size=_MERGE, temporal_patch_size=2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **top)
    if family == "qwen2_5_vl":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6,
                                   "mrope_section": _mrope_section(arch.hidden_size // arch.num_heads)}
        vision = dict(depth=arch.vision_depth, hidden_size=arch.vision_hidden_size,
                      intermediate_size=2 * arch.vision_hidden_size, num_heads=arch.vision_heads, patch_size=patch,
                      spatial_merge_size=_MERGE, temporal_patch_size=2, window_size=112,
                      out_hidden_size=arch.hidden_size, fullatt_block_indexes=[arch.vision_depth - 1])
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **top)
    text["head_dim"] = arch.hidden_size // arch.num_heads
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e6,
                               "mrope_section": _mrope_section(arch.hidden_size // arch.num_heads),
                               "mrope_interleaved": True}
    for k in ("bos_token_id", "eos_token_id"):
        text.pop(k)
    vision = dict(depth=arch.vision_depth, hidden_size=arch.vision_hidden_size,
                  intermediate_size=2 * arch.vision_hidden_size, num_heads=arch.vision_heads, patch_size=patch,
                  spatial_merge_size=_MERGE, temporal_patch_size=2, out_hidden_size=arch.hidden_size,
                  num_position_embeddings=arch.vision_positions, deepstack_visual_indexes=[arch.vision_depth - 1])
    return Qwen3VLConfig(text_config=text, vision_config=vision, **top)


# --------------------------------------------------------------------------------------------
# Build / load
# --------------------------------------------------------------------------------------------
def _manifest(family: str, seed: int, min_pixels: int, max_pixels: int, vocab_size: int,
              arch: TinyArch = TinyArch()) -> dict[str, Any]:
    corpus_hash = hashlib.sha256("\n".join(_tokenizer_corpus(seed)).encode()).hexdigest()[:16]
    extra = {} if arch == TinyArch() else {"arch": asdict(arch)}
    return {
        **extra,
        "build_version": BUILD_VERSION,
        "family": family,
        "seed": seed,
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "vocab_size": vocab_size,
        "corpus_sha256_16": corpus_hash,
    }


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _check_replaceable(out: Path) -> None:
    """Only an empty folder or an older tiny BUILD may be replaced — never a trained checkpoint or
    a folder of someone else's files."""
    if not out.is_dir():
        raise ValueError(f"out_dir={str(out)!r} exists and is not a folder")
    if not any(out.iterdir()):
        return
    found = _read_manifest(out)
    if found is None or found.get("checkpoint"):
        what = "a trained tiny checkpoint" if found else "not a tiny Qwen-VL build"
        raise ValueError(f"out_dir={str(out)!r} is {what}; refusing to overwrite it (choose another folder)")


def mark_tiny_checkpoint(build_dir: str | os.PathLike[str], checkpoint_dir: str | os.PathLike[str]) -> Path:
    """Make a saved fine-tune of a tiny build loadable by :func:`load_tiny_qwen_vl`.

    Copies the build's manifest into ``checkpoint_dir`` (atomically) with ``"checkpoint": true``,
    so the loader knows the family and :func:`build_tiny_qwen_vl` never overwrites the checkpoint.

    Raises:
        ValueError: ``build_dir`` holds no tiny build manifest.
    """
    manifest = _read_manifest(Path(build_dir))
    if manifest is None:
        raise ValueError(f"build_dir={str(build_dir)!r} holds no tiny Qwen-VL build ({MANIFEST} missing)")
    dest = Path(checkpoint_dir)
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / (MANIFEST + f".part-{os.getpid()}")
    tmp.write_text(json.dumps({**manifest, "checkpoint": True}, indent=2, sort_keys=True))
    os.replace(tmp, dest / MANIFEST)
    return dest


def build_tiny_qwen_vl(
    family: Family,
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    vocab_size: int = 600,
    arch: TinyArch | None = None,
) -> Path:
    """Build (or reuse) a tiny random Qwen-VL of ``family`` in ``out_dir``; return the folder.

    Args:
        family: ``"qwen2_vl"``, ``"qwen2_5_vl"`` or ``"qwen3_vl"``.
        out_dir: target folder. If it already holds a complete build for the same arguments
            (its ``tiny_build.json`` matches) it is reused untouched; otherwise it is (re)built in
            a temporary sibling folder and moved into place, so a crash never leaves a half build.
            Only an empty folder or an older tiny build is replaced.
        seed: seeds the weights and the tokenizer corpus.
        min_pixels, max_pixels: the image processor's pixel budget (defaults:
            :func:`default_pixel_budget`). For Qwen2.5-VL these decide the coordinate space.
        vocab_size: BPE vocabulary size before the special / reasoning tokens.
        arch: the sizes (:class:`TinyArch`; default: the ~0.25M-parameter plumbing model;
            :data:`LEARNER_ARCH` learns the task on CPU).

    Raises:
        ValueError: unknown ``family``, a pixel budget that is not ``0 < min_pixels <= max_pixels``,
            or an ``out_dir`` that holds other files or a trained checkpoint.
    """
    _check_family(family)
    dmin, dmax = default_pixel_budget(family)
    min_pixels = dmin if min_pixels is None else int(min_pixels)
    max_pixels = dmax if max_pixels is None else int(max_pixels)
    if not 0 < min_pixels <= max_pixels:
        raise ValueError(f"min_pixels={min_pixels}, max_pixels={max_pixels}: need 0 < min_pixels <= max_pixels")
    if vocab_size < 300:
        raise ValueError(f"vocab_size={vocab_size} must be >= 300 (256 byte symbols + special tokens)")
    out = Path(out_dir)
    arch = TinyArch() if arch is None else arch
    manifest = _manifest(family, seed, min_pixels, max_pixels, vocab_size, arch)
    if _read_manifest(out) == manifest:
        return out
    if out.exists():
        _check_replaceable(out)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tokenizer = _train_tokenizer(_tokenizer_corpus(seed), vocab_size)
        image_processor = Qwen2VLImageProcessorPil(
            size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
            patch_size=_PATCH[family],
            merge_size=_MERGE,
            temporal_patch_size=2,
            **({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]} if family == "qwen3_vl" else {}),
        )
        processor = _PROCESSORS[family](
            image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN_VL_CHAT_TEMPLATE
        )
        config = _model_config(family, tokenizer, arch)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _MODELS[family](config)
        # generation stops at <|im_end|> (the tokenizer's eos), pads with <|endoftext|>; no BOS.
        # Set on the top-level config too, so trainers find nothing to "align" (and warn about).
        model.config.eos_token_id = tokenizer.eos_token_id
        model.config.pad_token_id = tokenizer.pad_token_id
        model.config.bos_token_id = None
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.bos_token_id = None
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        tmp_manifest = tmp / (MANIFEST + ".part")
        tmp_manifest.write_text(json.dumps(manifest, indent=2, sort_keys=True))
        os.replace(tmp_manifest, tmp / MANIFEST)
        # Move into place: replace a stale tiny build, tolerate a concurrent builder.
        if out.exists():
            if _read_manifest(out) == manifest:
                return out
            _check_replaceable(out)
            shutil.rmtree(out)
        try:
            os.replace(tmp, out)
        except OSError:
            if _read_manifest(out) != manifest:
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_tiny_processor(path: str | os.PathLike[str]) -> ProcessorMixin:
    """Load the processor of a tiny build, asserting it is multimodal (not a bare tokenizer)."""
    path = Path(path)
    manifest = _read_manifest(path)
    if manifest is None:
        raise ValueError(f"path={str(path)!r} holds no complete tiny Qwen-VL build ({MANIFEST} missing)")
    family = _check_family(manifest["family"])
    processor = _PROCESSORS[family].from_pretrained(path)
    if not isinstance(processor, ProcessorMixin) or getattr(processor, "image_processor", None) is None:
        raise AssertionError(
            f"{path}: loaded {type(processor).__name__}, not a multimodal processor; "
            "training would silently be text-only"
        )
    return processor


def load_tiny_qwen_vl(
    path: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Load ``(model, processor)`` from a folder written by :func:`build_tiny_qwen_vl`.

    The processor is loaded with its own class (never ``AutoProcessor``, which may fall back to
    the bare tokenizer) and asserted to carry an image processor; the model is loaded through
    ``AutoModelForImageTextToText`` so it is exactly what a user's script would get.

    Raises:
        ValueError: ``path`` holds no complete tiny build.
        AssertionError: the processor is not multimodal.
    """
    processor = load_tiny_processor(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
    # transformers keeps these ids on the text sub-config only; trainers read the top-level ones
    # (and warn when they differ from the tokenizer's), so mirror them there.
    tok = processor.tokenizer
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.config.bos_token_id = tok.bos_token_id
    return model, processor


def tiny_model_for(
    space: str,
    cache_dir: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> Path:
    """Build-or-reuse the tiny model of a coordinate ``space`` under a shared cache folder.

    ``cache_dir`` defaults to ``$DIFFERAD_TINY_CACHE`` or ``~/.cache/differad_rl/tiny``; the
    folder name encodes the family and the arguments, so different settings never collide.
    ``kwargs`` go to :func:`build_tiny_qwen_vl`.
    """
    _check_family(space)
    root = Path(cache_dir or os.environ.get("DIFFERAD_TINY_CACHE") or Path.home() / ".cache/differad_rl/tiny")
    def part(k: str, v: Any) -> str:
        if isinstance(v, TinyArch):  # a short, stable name for the sizes
            v = hashlib.sha256(json.dumps(asdict(v), sort_keys=True).encode()).hexdigest()[:8]
        return f"{k}{v}"

    tag = "-".join(part(k, v) for k, v in sorted(kwargs.items()) if v is not None)
    name = f"{space}-v{BUILD_VERSION}" + (f"-{tag}" if tag else "")
    return build_tiny_qwen_vl(space, root / name, **kwargs)  # type: ignore[arg-type]
