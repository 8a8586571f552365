"""The tiny offline Qwen-VL builder: real architecture, real processor, dual-image generation."""

from __future__ import annotations

import numpy as np
import json

import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")

from transformers import AutoProcessor  # noqa: E402
from transformers.processing_utils import ProcessorMixin  # noqa: E402

from differad_rl.integrations.qwen_vl.tiny import (  # noqa: E402
    FAMILIES,
    QWEN_SPECIAL_TOKENS,
    build_tiny_qwen_vl,
    default_pixel_budget,
    load_tiny_processor,
    load_tiny_qwen_vl,
    mark_tiny_checkpoint,
    tiny_model_for,
)

ARCH = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


def _images(rng: np.random.Generator, w: int, h: int) -> list[Image.Image]:
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(2)]


@pytest.mark.parametrize("family", FAMILIES)
def test_build_load_generate_two_images(family, tiny_root):
    path = build_tiny_qwen_vl(family, tiny_root / family)
    model, processor = load_tiny_qwen_vl(path)

    # the real architecture and a real multimodal processor
    assert type(model).__name__ == ARCH[family]
    assert model.config.model_type == family
    assert isinstance(processor, ProcessorMixin)
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    n_params = sum(p.numel() for p in model.parameters())
    assert 50_000 < n_params < 1_000_000
    # the pixel budget (decides Qwen2.5-VL's coordinate space) is readable off the processor
    lo, hi = default_pixel_budget(family)
    assert processor.image_processor.size.shortest_edge == lo
    assert processor.image_processor.size.longest_edge == hi
    assert processor.image_processor.patch_size == (16 if family == "qwen3_vl" else 14)
    assert processor.image_processor.merge_size == 2
    # special tokens agree between tokenizer and model config
    tok = processor.tokenizer
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert tok.padding_side == "left"

    # one batched generation with two images per prompt (reference, target), different sizes
    rng = np.random.default_rng(0)
    msgs = [
        {"role": "system", "content": "system"},
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "find it"}]},
    ]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 2
    images = _images(rng, 120, 90) + _images(rng, 64, 200)
    inputs = processor(text=[text, text + "hint"], images=images, return_tensors="pt", padding=True)
    merge = processor.image_processor.merge_size ** 2
    assert inputs["image_grid_thw"].shape == (4, 3)
    n_img_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_img_tokens == int(inputs["image_grid_thw"].prod(-1).sum()) // merge
    torch.manual_seed(0)
    out = model.generate(**inputs, max_new_tokens=6, do_sample=True)
    assert out.shape[0] == 2 and out.shape[1] > inputs["input_ids"].shape[1]
    texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_tokenizer_writes_boxes_and_tags(tiny_root):
    _, processor = load_tiny_qwen_vl(build_tiny_qwen_vl("qwen2_5_vl", tiny_root / "qwen2_5_vl"))
    tok = processor.tokenizer
    s = "<think>the crack</think><answer>(12,345),(678,999)</answer>"
    ids = tok(s, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == s
    for t in ("<think>", "</think>", "<answer>", "</answer>", *QWEN_SPECIAL_TOKENS):
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1, t
    # digits are single tokens: any number is writable
    assert all(len(tok(str(d), add_special_tokens=False)["input_ids"]) == 1 for d in range(10))


def test_cache_reuse_and_rebuild(tmp_path):
    p1 = build_tiny_qwen_vl("qwen2_vl", tmp_path / "m")
    stamp = (p1 / "model.safetensors").stat().st_mtime_ns
    p2 = build_tiny_qwen_vl("qwen2_vl", tmp_path / "m")
    assert p2 == p1 and (p1 / "model.safetensors").stat().st_mtime_ns == stamp
    # other arguments: rebuilt in place, with the new budget and other weights
    w0 = load_tiny_qwen_vl(p1)[0].lm_head.weight.detach().clone()
    p3 = build_tiny_qwen_vl("qwen2_vl", tmp_path / "m", seed=1, min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 9)
    model, proc = load_tiny_qwen_vl(p3)
    assert proc.image_processor.size.longest_edge == 28 * 28 * 9
    assert not torch.equal(model.lm_head.weight, w0)
    assert not list(tmp_path.glob(".m.tmp-*"))  # no temporary folder left behind


def test_same_seed_same_weights(tmp_path):
    a = load_tiny_qwen_vl(build_tiny_qwen_vl("qwen3_vl", tmp_path / "a", seed=3))[0]
    b = load_tiny_qwen_vl(build_tiny_qwen_vl("qwen3_vl", tmp_path / "b", seed=3))[0]
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)


def test_auto_processor_fallback_is_caught(tmp_path, tiny_root):
    path = build_tiny_qwen_vl("qwen2_5_vl", tiny_root / "qwen2_5_vl")
    # the trap this loader exists for: AutoProcessor silently returns the bare tokenizer
    assert not isinstance(AutoProcessor.from_pretrained(path), ProcessorMixin)
    assert isinstance(load_tiny_processor(path), ProcessorMixin)
    with pytest.raises(ValueError, match="no complete tiny Qwen-VL build"):
        load_tiny_qwen_vl(tmp_path)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="family='llava'"):
        build_tiny_qwen_vl("llava", tmp_path / "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_pixels=5000, max_pixels=4000"):
        build_tiny_qwen_vl("qwen2_vl", tmp_path / "x", min_pixels=5000, max_pixels=4000)
    with pytest.raises(ValueError, match="family='pixel'"):
        tiny_model_for("pixel", cache_dir=tmp_path)


def test_tiny_model_for_caches_by_arguments(tmp_path):
    a = tiny_model_for("qwen2_5_vl", cache_dir=tmp_path)
    b = tiny_model_for("qwen2_5_vl", cache_dir=tmp_path)
    c = tiny_model_for("qwen2_5_vl", cache_dir=tmp_path, max_pixels=28 * 28 * 25)
    assert a == b != c
    assert load_tiny_processor(c).image_processor.size.longest_edge == 28 * 28 * 25


def test_never_overwrites_foreign_folders_or_checkpoints(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a tiny Qwen-VL build; refusing to overwrite"):
        build_tiny_qwen_vl("qwen2_vl", foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    # a fine-tuned checkpoint of a tiny build loads like the build, and is protected
    build = build_tiny_qwen_vl("qwen2_vl", tmp_path / "build")
    model, proc = load_tiny_qwen_vl(build)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    proc.save_pretrained(ckpt)
    mark_tiny_checkpoint(build, ckpt)
    assert isinstance(load_tiny_qwen_vl(ckpt)[1], ProcessorMixin)
    with pytest.raises(ValueError, match="trained tiny checkpoint"):
        build_tiny_qwen_vl("qwen2_vl", ckpt, seed=5)
    with pytest.raises(ValueError, match="holds no tiny Qwen-VL build"):
        mark_tiny_checkpoint(foreign, ckpt)
    # an empty folder is fine
    (tmp_path / "empty").mkdir()
    assert build_tiny_qwen_vl("qwen2_vl", tmp_path / "empty") == tmp_path / "empty"


def test_tiny_arch_sizes_are_built_and_recorded(tmp_path):
    from differad_rl.integrations.qwen_vl.tiny import LEARNER_ARCH, TinyArch, build_tiny_qwen_vl, load_tiny_qwen_vl

    path = build_tiny_qwen_vl("qwen3_vl", tmp_path / "learner", arch=LEARNER_ARCH, min_pixels=128 * 128,
                              max_pixels=128 * 128)
    model, _ = load_tiny_qwen_vl(path)
    text = model.config.text_config
    assert (text.hidden_size, text.num_hidden_layers) == (128, 4)
    assert text.rope_parameters["mrope_section"] == [4, 6, 6]  # covers head_dim / 2 = 16 frequencies
    assert model.config.vision_config.hidden_size == 64
    assert 0.9e6 < sum(p.numel() for p in model.parameters()) < 1.5e6
    manifest = json.loads((path / "tiny_build.json").read_text())
    assert manifest["arch"]["hidden_size"] == 128
    with pytest.raises(ValueError, match="multiple of num_heads"):
        TinyArch(hidden_size=100, num_heads=3)
    with pytest.raises(ValueError, match="perfect square"):
        TinyArch(vision_positions=50)
