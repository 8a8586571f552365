"""Test infrastructure (not used by the product code): hub-shaped fixtures, tiny random Qwen-VL folders
laid out like the published hub repositories. The test suite, ``examples/gpu_check.sh`` and
``examples/trl/gpu_bench.py`` (its full-size build) import it.

``build_hub_fixture(repo, out_dir)`` writes, for one of :data:`HUB_REPOS`
(``Qwen/Qwen2-VL-2B-Instruct``, ``Qwen/Qwen2.5-VL-3B-Instruct``, ``Qwen/Qwen3-VL-2B-Instruct``),
a folder with the same file names as the hub repository and the same default values, so that
code written against a real checkpoint can be run on CPU through exactly the documented code path
(``AutoProcessor.from_pretrained``, ``AutoModelForImageTextToText.from_pretrained``):

=============================  =========  ===========  =========
file                           Qwen2-VL   Qwen2.5-VL   Qwen3-VL
=============================  =========  ===========  =========
config.json                    yes        yes          yes
generation_config.json         yes        yes          yes
preprocessor_config.json       yes        yes          yes
video_preprocessor_config.json no         no           yes
chat_template.json             yes        yes          yes
tokenizer_config.json          yes        yes          yes
tokenizer.json                 yes        yes          yes
vocab.json, merges.txt         yes        yes          yes
model.safetensors              (tiny random weights; the hub shards them)
=============================  =========  ===========  =========

What differs from the hub, on purpose:

- only sizes shrink: text hidden size, layers, heads, intermediate size, vocabulary; vision depth,
  width, heads; the sizes tied to them scale with them (``mrope_section`` sums to ``head_dim / 2``:
  the published sections divided by 8; ``fullatt_block_indexes`` / ``deepstack_visual_indexes``
  keep their spacing within the smaller depth; Qwen3-VL's ``num_position_embeddings`` stays a
  perfect square). Patch size, merge size, temporal patch size, window size, rope theta, the pixel
  budgets, image mean/std, processor and image-processor class names are the published ones.
- the tokenizer is a byte-level BPE trained locally
  (:func:`differad_rl.integrations.qwen_vl.tiny._train_tokenizer`, the tiny model's), so the
  special-token ids in ``config.json`` / ``generation_config.json`` are its ids, not 151643+.
- weights are one ``model.safetensors`` file (the hub shards the 2B/3B checkpoints).

Full size (``full_size=True``, recorded for ``Qwen/Qwen2.5-VL-3B-Instruct``; :data:`FULL_SIZES`): the
published sizes instead of the shrunk ones (text 36 layers x 2048, vision 32 blocks x 1280, vocabulary
151,936; 3.755 B parameters), random weights saved in bf16 (7.5 GB): what a GPU run of the paper's
recipe costs, without the checkpoint. The tokenizer stays the local one (its ids are below 600; the
other embedding rows are never used by it).

Provenance of the values: the files are written from the published hub files as recorded in
this module (:data:`HUB_FILES`); they were NOT fetched here (the hub is unreachable from this
machine) and a byte-for-byte comparison was not possible. The Qwen2-VL / Qwen2.5-VL chat template
was checked against a copy of the published one; the Qwen3-VL chat template here is the image/
video/text part of the published template (its tool-call branches are left out), and the
``generation_config.json`` sampling defaults are as recalled from the model cards. Each
difference found later should be fixed in :data:`HUB_FILES`, not in the tests.

Without torchvision: the hub's ``preprocessor_config.json`` names ``Qwen2VLImageProcessor`` and
the processors have a video processor that needs torchvision, so ``AutoProcessor.from_pretrained``
on a real hub folder raises transformers' ``ImportError`` ("Qwen2VLVideoProcessor requires the
Torchvision library") on a machine without torchvision — and so does it on these fixtures (tested).
:func:`~differad_rl.integrations.qwen_vl.loading.image_only_processor` (re-exported here) loads the same
files into an image-only processor (``Qwen2VLImageProcessorPil`` and the tiny model's processor
classes without a video processor); it is the product loader's own fallback
(:func:`~differad_rl.integrations.qwen_vl.loading.load_processor` uses it when torchvision is missing).

Builds are cached: a folder holding a complete build for the same arguments (``hub_fixture.json``
written last) is reused.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from differad_rl.integrations.qwen_vl.loading import image_only_processor  # re-exported: the product loader's fallback
from differad_rl.integrations.qwen_vl.tiny import QWEN_VL_CHAT_TEMPLATE

__all__ = [
    "FULL_SIZES",
    "HUB_FILES",
    "HUB_REPOS",
    "build_hub_fixture",
    "family_of",
    "hub_fixture_for",
    "image_only_processor",
]

HUB_REPOS: tuple[str, ...] = (
    "Qwen/Qwen2-VL-2B-Instruct",
    "Qwen/Qwen2.5-VL-3B-Instruct",
    "Qwen/Qwen3-VL-2B-Instruct",
)
"""The hub repositories the fixtures copy the layout and defaults of."""

_FAMILY = {
    "Qwen/Qwen2-VL-2B-Instruct": "qwen2_vl",
    "Qwen/Qwen2.5-VL-3B-Instruct": "qwen2_5_vl",
    "Qwen/Qwen3-VL-2B-Instruct": "qwen3_vl",
}
_MANIFEST = "hub_fixture.json"
_BUILD_VERSION = 1

_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

#: the published Qwen2-VL / Qwen2.5-VL chat template (the tiny builds use the same one)
_QWEN2_VL_TEMPLATE = QWEN_VL_CHAT_TEMPLATE

# Qwen3-VL: no default system prompt; images / videos / text parts (tool-call branches omitted).
_QWEN3_VL_TEMPLATE = (
    "{%- set image_count = namespace(value=0) %}{%- set video_count = namespace(value=0) %}"
    "{%- for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{%- if message['content'] is string %}{{ message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{%- set image_count.value = image_count.value + 1 %}"
    "{%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif content['type'] == 'video' or 'video' in content %}"
    "{%- set video_count.value = video_count.value + 1 %}"
    "{%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in content %}{{ content['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}<|im_end|>\n"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)

#: The published files (sizes already shrunk, token ids filled in by :func:`build_hub_fixture`).
#: ``"@<token>"`` stands for the id of that token in the locally trained tokenizer.
HUB_FILES: dict[str, dict[str, Any]] = {
    "Qwen/Qwen2-VL-2B-Instruct": {
        "config.json": {
            "architectures": ["Qwen2VLForConditionalGeneration"],
            "attention_dropout": 0.0,
            "bos_token_id": "@<|endoftext|>",
            "eos_token_id": "@<|im_end|>",
            "vision_start_token_id": "@<|vision_start|>",
            "vision_end_token_id": "@<|vision_end|>",
            "vision_token_id": "@<|vision_pad|>",
            "image_token_id": "@<|image_pad|>",
            "video_token_id": "@<|video_pad|>",
            "hidden_act": "silu",
            "hidden_size": 64,  # hub: 1536
            "initializer_range": 0.02,
            "intermediate_size": 128,  # hub: 8960
            "max_position_embeddings": 32768,
            "max_window_layers": 2,  # hub: 28 (= num_hidden_layers)
            "model_type": "qwen2_vl",
            "num_attention_heads": 4,  # hub: 12
            "num_hidden_layers": 2,  # hub: 28
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0,
            "sliding_window": 32768,
            "tie_word_embeddings": True,
            "torch_dtype": "bfloat16",
            "transformers_version": "4.41.2",
            "use_cache": True,
            "use_sliding_window": False,
            "vision_config": {
                "depth": 2,  # hub: 32
                "embed_dim": 32,  # hub: 1280
                "mlp_ratio": 4,
                "num_heads": 2,  # hub: 16
                "in_chans": 3,
                "hidden_size": 64,  # hub: 1536 (= text hidden size)
                "patch_size": 14,
                "spatial_merge_size": 2,
                "spatial_patch_size": 14,
                "temporal_patch_size": 2,
            },
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},  # hub: [16, 24, 24]
            "vocab_size": "@vocab",  # hub: 151936
        },
        "generation_config.json": {
            "bos_token_id": "@<|endoftext|>",
            "pad_token_id": "@<|endoftext|>",
            "do_sample": True,
            "eos_token_id": ["@<|im_end|>", "@<|endoftext|>"],
            "repetition_penalty": 1.0,
            "temperature": 0.01,
            "top_p": 0.001,
            "top_k": 1,
            "transformers_version": "4.37.0",
        },
        "preprocessor_config.json": {
            "min_pixels": 3136,
            "max_pixels": 12845056,
            "patch_size": 14,
            "temporal_patch_size": 2,
            "merge_size": 2,
            "image_mean": _CLIP_MEAN,
            "image_std": _CLIP_STD,
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen2VLProcessor",
        },
        "chat_template.json": {"chat_template": _QWEN2_VL_TEMPLATE},
        "tokenizer_config.json": {"model_max_length": 32768},
    },
    "Qwen/Qwen2.5-VL-3B-Instruct": {
        "config.json": {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "attention_dropout": 0.0,
            "bos_token_id": "@<|endoftext|>",
            "eos_token_id": "@<|im_end|>",
            "vision_start_token_id": "@<|vision_start|>",
            "vision_end_token_id": "@<|vision_end|>",
            "vision_token_id": "@<|vision_pad|>",
            "image_token_id": "@<|image_pad|>",
            "video_token_id": "@<|video_pad|>",
            "hidden_act": "silu",
            "hidden_size": 64,  # hub: 2048
            "initializer_range": 0.02,
            "intermediate_size": 128,  # hub: 11008
            "max_position_embeddings": 128000,
            "max_window_layers": 70,
            "model_type": "qwen2_5_vl",
            "num_attention_heads": 4,  # hub: 16
            "num_hidden_layers": 2,  # hub: 36
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0,
            "sliding_window": 32768,
            "tie_word_embeddings": True,
            "torch_dtype": "bfloat16",
            "transformers_version": "4.41.2",
            "use_cache": True,
            "use_sliding_window": False,
            "vision_config": {
                "depth": 4,  # hub: 32
                "hidden_act": "silu",
                "hidden_size": 32,  # hub: 1280
                "intermediate_size": 64,  # hub: 3420
                "num_heads": 2,  # hub: 16
                "in_chans": 3,
                "out_hidden_size": 64,  # hub: 2048 (= text hidden size)
                "patch_size": 14,
                "spatial_merge_size": 2,
                "spatial_patch_size": 14,
                "window_size": 112,
                "fullatt_block_indexes": [1, 3],  # hub: [7, 15, 23, 31] (every 8th of 32 blocks)
                "tokens_per_second": 2,
                "temporal_patch_size": 2,
            },
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},  # hub: [16, 24, 24]
            "vocab_size": "@vocab",  # hub: 151936
        },
        "generation_config.json": {
            "bos_token_id": "@<|endoftext|>",
            "pad_token_id": "@<|endoftext|>",
            "do_sample": True,
            "eos_token_id": ["@<|im_end|>", "@<|endoftext|>"],
            "repetition_penalty": 1.05,
            "temperature": 0.1,
            "top_p": 0.001,
            "top_k": 1,
            "transformers_version": "4.37.0",
        },
        "preprocessor_config.json": {
            "min_pixels": 3136,
            "max_pixels": 12845056,
            "patch_size": 14,
            "temporal_patch_size": 2,
            "merge_size": 2,
            "image_mean": _CLIP_MEAN,
            "image_std": _CLIP_STD,
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen2_5_VLProcessor",
        },
        "chat_template.json": {"chat_template": _QWEN2_VL_TEMPLATE},
        "tokenizer_config.json": {"model_max_length": 131072},
    },
    "Qwen/Qwen3-VL-2B-Instruct": {
        "config.json": {
            "architectures": ["Qwen3VLForConditionalGeneration"],
            "image_token_id": "@<|image_pad|>",
            "model_type": "qwen3_vl",
            "text_config": {
                "attention_bias": False,
                "attention_dropout": 0.0,
                "bos_token_id": "@<|endoftext|>",
                "dtype": "bfloat16",
                "eos_token_id": "@<|im_end|>",
                "head_dim": 16,  # hub: 128
                "hidden_act": "silu",
                "hidden_size": 64,  # hub: 2048
                "initializer_range": 0.02,
                "intermediate_size": 128,  # hub: 6144
                "max_position_embeddings": 262144,
                "model_type": "qwen3_vl_text",
                "num_attention_heads": 4,  # hub: 16
                "num_hidden_layers": 2,  # hub: 28
                "num_key_value_heads": 2,  # hub: 8
                "rms_norm_eps": 1e-06,
                "rope_scaling": {"mrope_interleaved": True, "mrope_section": [3, 3, 2], "rope_type": "default"},
                "rope_theta": 5000000,
                "tie_word_embeddings": True,
                "use_cache": True,
                "vocab_size": "@vocab",  # hub: 151936
            },
            "tie_word_embeddings": True,
            "transformers_version": "4.57.0.dev0",
            "video_token_id": "@<|video_pad|>",
            "vision_config": {
                "deepstack_visual_indexes": [1, 2, 3],  # hub: [5, 11, 17] of 24 blocks
                "depth": 4,  # hub: 24
                "hidden_act": "gelu_pytorch_tanh",
                "hidden_size": 32,  # hub: 1024
                "in_channels": 3,
                "initializer_range": 0.02,
                "intermediate_size": 128,  # hub: 4096
                "model_type": "qwen3_vl",
                "num_heads": 2,  # hub: 16
                "num_position_embeddings": 64,  # hub: 2304 (48²)
                "out_hidden_size": 64,  # hub: 2048 (= text hidden size)
                "patch_size": 16,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
            },
            "vision_end_token_id": "@<|vision_end|>",
            "vision_start_token_id": "@<|vision_start|>",
        },
        "generation_config.json": {
            "bos_token_id": "@<|endoftext|>",
            "pad_token_id": "@<|endoftext|>",
            "do_sample": True,
            "eos_token_id": ["@<|im_end|>", "@<|endoftext|>"],
            "top_k": 20,
            "top_p": 0.8,
            "repetition_penalty": 1.0,
            "temperature": 0.7,
            "transformers_version": "4.56.0",
        },
        "preprocessor_config.json": {
            "size": {"longest_edge": 16777216, "shortest_edge": 65536},
            "patch_size": 16,
            "temporal_patch_size": 2,
            "merge_size": 2,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
            "processor_class": "Qwen3VLProcessor",
            "image_processor_type": "Qwen2VLImageProcessorFast",
        },
        "video_preprocessor_config.json": {
            "size": {"longest_edge": 25165824, "shortest_edge": 4096},
            "patch_size": 16,
            "temporal_patch_size": 2,
            "merge_size": 2,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
            "processor_class": "Qwen3VLProcessor",
            "video_processor_type": "Qwen3VLVideoProcessor",
        },
        "chat_template.json": {"chat_template": _QWEN3_VL_TEMPLATE},
        "tokenizer_config.json": {"model_max_length": 262144},
    },
}


#: the published sizes (``config.json`` keys; ``vision_config`` nested) a full-size fixture restores
FULL_SIZES: dict[str, dict[str, Any]] = {
    "Qwen/Qwen2.5-VL-3B-Instruct": {
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "max_window_layers": 70,
        "num_attention_heads": 16,
        "num_hidden_layers": 36,
        "num_key_value_heads": 2,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vocab_size": 151936,
        "vision_config": {
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "out_hidden_size": 2048,
            "fullatt_block_indexes": [7, 15, 23, 31],
        },
    },
}


def hub_config(repo: str, ids: dict[str, int], vocab_size: int, full_size: bool = False) -> dict[str, Any]:
    """``config.json`` of the fixture of ``repo`` (token ids from ``ids``; the published sizes with
    ``full_size``). Raises ``ValueError`` when no full sizes are recorded for ``repo``."""
    config = _fill(copy.deepcopy(HUB_FILES[repo]["config.json"]), ids, vocab_size)
    if full_size:
        if repo not in FULL_SIZES:
            raise ValueError(f"full_size=True: the published sizes are recorded for {sorted(FULL_SIZES)} only, "
                             f"not {repo!r}")
        sizes = copy.deepcopy(FULL_SIZES[repo])
        config["vision_config"].update(sizes.pop("vision_config"))
        config.update(sizes)
    return config


def family_of(repo: str) -> str:
    """``"Qwen/Qwen2.5-VL-3B-Instruct"`` → ``"qwen2_5_vl"`` (the model type = coordinate space)."""
    try:
        return _FAMILY[repo]
    except KeyError:
        raise ValueError(f"repo={repo!r}: hub fixtures exist for {', '.join(HUB_REPOS)}") from None


def _fill(value: Any, ids: dict[str, int], vocab: int) -> Any:
    if isinstance(value, dict):
        return {k: _fill(v, ids, vocab) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, ids, vocab) for v in value]
    if value == "@vocab":
        return vocab
    if isinstance(value, str) and value.startswith("@<|"):
        return ids[value[1:]]
    return value


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _tokenizer_files(out: Path, tokenizer: Any, repo: str) -> None:
    """tokenizer.json / vocab.json / merges.txt and a hub-shaped tokenizer_config.json."""
    tokenizer.save_pretrained(out)
    for extra in ("chat_template.jinja", "special_tokens_map.json"):
        (out / extra).unlink(missing_ok=True)
    tokenizer.backend_tokenizer.model.save(str(out))  # vocab.json, merges.txt
    added = {
        str(tok.content and tokenizer.convert_tokens_to_ids(tok.content)): {
            "content": tok.content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": tok.special,
        }
        for tok in tokenizer.backend_tokenizer.get_added_tokens_decoder().values()
    }
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [
            "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
            "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
        ],
        "bos_token": None,
        "chat_template": HUB_FILES[repo]["chat_template.json"]["chat_template"],
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": HUB_FILES[repo]["tokenizer_config.json"]["model_max_length"],
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    _write_json(out / "tokenizer_config.json", config)


def build_hub_fixture(repo: str, out_dir: str | os.PathLike[str], *, seed: int = 0, vocab_size: int = 600,
                      full_size: bool = False, device: str | None = None) -> Path:
    """Write the hub-shaped tiny fixture of ``repo`` into ``out_dir`` (cached); return its path.

    Args:
        repo: one of :data:`HUB_REPOS`.
        out_dir: the folder to write (replaced when it holds an older or different build).
        seed: seeds the tokenizer corpus and the random weights.
        vocab_size: BPE vocabulary of the local tokenizer (special tokens included).
        full_size: the published sizes (:data:`FULL_SIZES`), random weights saved in bf16.
        device: where the random weights are initialised (``"cuda"`` makes a full-size build take
            seconds instead of minutes); the saved files do not depend on it beyond the random draw.

    Raises:
        ValueError: an unknown ``repo``, or ``full_size`` for a repo without recorded sizes.
    """
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from differad_rl.integrations.qwen_vl.tiny import QWEN_SPECIAL_TOKENS, _tokenizer_corpus, _train_tokenizer

    family = family_of(repo)
    out = Path(out_dir)
    manifest: dict[str, Any] = {"repo": repo, "seed": seed, "vocab_size": vocab_size, "version": _BUILD_VERSION}
    if full_size:
        if repo not in FULL_SIZES:
            raise ValueError(f"full_size=True: the published sizes are recorded for {sorted(FULL_SIZES)} only, "
                             f"not {repo!r}")
        manifest["full_size"] = True
    try:
        if json.loads((out / _MANIFEST).read_text()) == manifest:
            return out
    except (OSError, ValueError):
        pass
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tokenizer = _train_tokenizer(_tokenizer_corpus(seed), vocab_size)
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
        files = _fill(copy.deepcopy(HUB_FILES[repo]), ids, len(tokenizer))
        files["config.json"] = hub_config(repo, ids, len(tokenizer), full_size=full_size)
        if full_size:
            files["config.json"]["torch_dtype"] = "bfloat16"
        _write_json(tmp / "config.json", files["config.json"])
        config = AutoConfig.from_pretrained(tmp)  # the hub's config.json, as transformers reads it
        torch.manual_seed(seed)
        with torch.device(device or "cpu"):
            model = AutoModelForImageTextToText.from_config(
                config, **({"dtype": torch.bfloat16} if full_size else {}))
        model.save_pretrained(tmp)
        del model
        for name in ("config.json", "generation_config.json", "preprocessor_config.json",
                     "video_preprocessor_config.json", "chat_template.json"):
            if name in files:
                _write_json(tmp / name, files[name])
        _tokenizer_files(tmp, tokenizer, repo)
        _write_json(tmp / _MANIFEST, {**manifest, "family": family})
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def hub_fixture_for(repo: str, cache_dir: str | os.PathLike[str] | None = None, *, full_size: bool = False,
                    device: str | None = None) -> Path:
    """The cached fixture of ``repo`` under ``cache_dir`` (default: ``$DIFFERAD_FIXTURES`` or the temp dir);
    ``full_size`` / ``device`` as in :func:`build_hub_fixture` (a full-size build has its own folder)."""
    root = Path(cache_dir or os.environ.get("DIFFERAD_FIXTURES") or Path(tempfile.gettempdir()) / "differad_hub_fixtures")
    name = repo.replace("/", "--") + ("-full" if full_size else "")
    return build_hub_fixture(repo, root / name, full_size=full_size, device=device)
