"""The frozen-vision feature cache and the autograd guard on the three tiny Qwen-VL families (real transformers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from differad_rl.integrations.qwen_vl.loading import freeze_vision_tower
from differad_rl.integrations.qwen_vl.tiny import FAMILIES, load_tiny_qwen_vl, tiny_model_for
from differad_rl.integrations.qwen_vl.vision_cache import (
    TowerMeter,
    VisionFeatureCache,
    count_input_grad_hooks,
    find_vision_model,
    keep_frozen_tower_out_of_autograd,
    tower_is_frozen,
    vision_cache_blocker,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _images(n: int, seed: int = 0, size: int = 56) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def _batch(processor, copies: int = 4, seed: int = 0):
    """``copies`` rows of the same two-image prompt (a GRPO group), plus one row of two other images."""
    pair, other = _images(2, seed), _images(2, seed + 1, size=84)
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Find the difference."}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    processor.tokenizer.padding_side = "left"
    return processor(text=[text] * (copies + 1), images=[pair] * copies + [other], return_tensors="pt",
                     padding=True)


@pytest.fixture(scope="module", params=FAMILIES)
def frozen(request):
    model, processor = load_tiny_qwen_vl(tiny_model_for(request.param))
    freeze_vision_tower(model)
    model.eval()
    return request.param, model, processor


def test_forward_and_generate_equal_with_cache(frozen):
    family, model, processor = frozen
    inputs = _batch(processor)
    with torch.no_grad():
        ref_logits = model(**inputs).logits
        ref_gen = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    cache = VisionFeatureCache()
    cache.attach(model)
    cache.start_batch()
    with TowerMeter(model) as meter, torch.no_grad():
        logits = model(**inputs).logits
        again = model(**inputs).logits  # a second pass: everything from the cache
        gen = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(logits, ref_logits) and torch.equal(again, ref_logits), family
    assert torch.equal(gen, ref_gen), family
    # 10 images per pass (4 copies of a pair + one other pair), 4 distinct: encoded once, in one tower call
    assert (meter.images, meter.calls) == (4, 1)
    assert (cache.stats.images_encoded, cache.stats.tower_calls) == (4, 1)
    assert cache.stats.images_served == 3 * 10 - 4 and len(cache) == 4
    cache.start_batch()  # the next generation batch: empty again
    assert len(cache) == 0
    cache.detach()
    assert "get_image_features" not in find_vision_model(model).__dict__


def test_get_image_features_fields_equal_stock(frozen):
    """Every field of the output, assembled from per-image entries (hits and misses mixed, copies out of
    order), equals the stock call: pooler_output per image, last_hidden_state, Qwen3-VL's deepstack_features."""
    family, model, processor = frozen
    inputs = _batch(processor, copies=2)
    inner = find_vision_model(model)
    pv, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    sizes = grid.prod(-1).tolist()
    parts = list(torch.split(pv, sizes))
    order = [4, 0, 5, 1, 2, 3]  # the other pair first, then the two copies of the pair
    pv2, grid2 = torch.cat([parts[i] for i in order]), grid[order]
    with torch.no_grad():
        stock = inner.get_image_features(pv2, grid2)
        cache = VisionFeatureCache()
        cache.attach(model)
        cache.start_batch()
        inner.get_image_features(pv[: sizes[0] + sizes[1]], grid[:2])  # the pair cached first
        cached = inner.get_image_features(pv2, grid2)
    assert type(cached) is type(stock)
    assert len(cached.pooler_output) == len(stock.pooler_output) == 6
    assert all(torch.equal(a, b) for a, b in zip(cached.pooler_output, stock.pooler_output)), family
    assert torch.equal(cached.last_hidden_state, stock.last_hidden_state), family
    if family == "qwen3_vl":
        assert len(cached.deepstack_features) == len(stock.deepstack_features) > 0
        assert all(torch.equal(a, b) for a, b in zip(cached.deepstack_features, stock.deepstack_features))
    assert not cached.pooler_output[0].requires_grad
    assert cache.stats.images_encoded == 4 and cache.stats.tower_calls == 2
    cache.detach()


def test_autocast_passes_get_their_own_features(frozen):
    """Features encoded under autocast are not served to an fp32 pass (nor the reverse): each equals stock."""
    family, model, processor = frozen
    inputs = _batch(processor, copies=2)
    with torch.no_grad():
        ref32 = model(**inputs).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref16 = model(**inputs).logits
    cache = VisionFeatureCache()
    cache.attach(model)
    cache.start_batch()
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(model(**inputs).logits, ref16), family
        assert torch.equal(model(**inputs).logits, ref32), family
    assert cache.stats.images_encoded == 2 * 4 and len(cache) == 8
    cache.detach()


def test_features_detached_and_grads_equal(frozen):
    """Policy-style pass with grad on: same loss, same language-model gradients, tower out of the graph."""
    family, model, processor = frozen
    inputs = _batch(processor, copies=2)

    def grads():
        model.zero_grad(set_to_none=True)
        model(**inputs).logits.float().pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.train()
    try:
        plain = grads()
        cache = VisionFeatureCache()
        cache.attach(model)
        cache.start_batch()
        cached = grads()
        cache.detach()
    finally:
        model.eval()
    assert plain.keys() == cached.keys() and plain
    assert not any(".visual." in n or n.startswith("visual") for n in cached)
    for name in plain:
        assert torch.equal(plain[name], cached[name]), (family, name)


def test_inactive_and_unservable_calls_pass_through(frozen):
    _, model, processor = frozen
    inputs = _batch(processor, copies=1)
    cache = VisionFeatureCache()
    cache.attach(model)
    assert cache.attach(model) == 0  # idempotent
    with torch.no_grad():
        model(**inputs)  # not started: the original method
        cache.start_batch()
        with cache.paused():
            model(**inputs)
    assert cache.stats.passthrough_calls == 2 and cache.stats.images_encoded == 0 and len(cache) == 0
    inner = find_vision_model(model)
    pv, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    with torch.no_grad():
        out = inner.get_image_features(pv, grid, output_hidden_states=True)  # extra kwargs: not servable
        assert out.hidden_states is not None and cache.stats.passthrough_calls == 3
        as_tuple = inner.get_image_features(pv, grid, return_dict=False)
        assert isinstance(as_tuple, tuple) and cache.stats.images_encoded == 4
    cache.stop()
    assert not cache.active and len(cache) == 0
    cache.detach()


def test_equal_towers_share_entries_other_towers_do_not(frozen):
    family, model, processor = frozen
    twin, _ = load_tiny_qwen_vl(tiny_model_for(family))
    other, _ = load_tiny_qwen_vl(tiny_model_for(family))
    with torch.no_grad():
        next(find_vision_model(other).visual.parameters()).add_(1.0)
    cache = VisionFeatureCache()
    assert (cache.attach(model), cache.attach(twin), cache.attach(other)) == (0, 0, 1)
    inputs = _batch(processor, copies=1)
    cache.start_batch()
    with torch.no_grad():
        model(**inputs)
        twin(**inputs)
        ref = other(**inputs).logits
    assert cache.stats.images_encoded == 8  # 4 for the shared tower, 4 for the different one
    cache.detach()
    with torch.no_grad():
        assert torch.equal(other(**inputs).logits, ref)


def test_blockers(frozen):
    family, _, _ = frozen
    model, _ = load_tiny_qwen_vl(tiny_model_for(family))
    assert not tower_is_frozen(model)
    assert "trainable parameters" in vision_cache_blocker(model)
    freeze_vision_tower(model)
    assert tower_is_frozen(model) and vision_cache_blocker(model) is None
    blocks = find_vision_model(model).visual.blocks
    blocks[0].mlp.base_layer = torch.nn.Identity()  # what a PEFT LoRA layer carries
    assert "adapter-wrapped" in vision_cache_blocker(model)
    assert "no Qwen-VL vision tower" in vision_cache_blocker(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no Qwen-VL vision tower"):
        VisionFeatureCache().attach(torch.nn.Linear(2, 2))


def test_no_autograd_through_frozen_tower_with_checkpointing(frozen):
    """gradient_checkpointing_enable hooks the tower's patch embedding (Qwen2/2.5-VL) and re-enabling adds
    hooks; with the guard: one hook per text embedding, none in the tower, no vision block in backward."""
    family, _, processor = frozen
    model, _ = load_tiny_qwen_vl(tiny_model_for(family))
    freeze_vision_tower(model)
    model.train()
    inputs = _batch(processor, copies=1)
    tower = find_vision_model(model).visual

    def step(meter):
        model.zero_grad(set_to_none=True)
        model(**inputs).logits.float().pow(2).mean().backward()
        return meter.backward_calls

    keep_frozen_tower_out_of_autograd(model)
    for _ in range(3):  # TRL: disable + enable around every generation
        model.gradient_checkpointing_disable()
        model.gradient_checkpointing_enable({"use_reentrant": False})
    assert count_input_grad_hooks(tower) == 0
    assert count_input_grad_hooks(model) == 1  # the language model's embedding only
    with TowerMeter(model) as meter:
        assert step(meter) == 0
        assert meter.calls == 1


def test_without_guard_tower_is_backpropagated_qwen2_5():
    """The problem the guard solves, shown on stock transformers (Qwen2.5-VL)."""
    model, processor = load_tiny_qwen_vl(tiny_model_for("qwen2_5_vl"))
    freeze_vision_tower(model)
    model.train()
    for _ in range(3):
        model.gradient_checkpointing_disable()
        model.gradient_checkpointing_enable({"use_reentrant": False})
    tower = find_vision_model(model).visual
    assert count_input_grad_hooks(tower) == 3 and count_input_grad_hooks(model) == 6
    with TowerMeter(model) as meter:
        model(**_batch(processor, copies=1)).logits.float().pow(2).mean().backward()
        assert meter.backward_calls > 0
    assert keep_frozen_tower_out_of_autograd(model)  # cleans what is there already
    assert count_input_grad_hooks(tower) == 0 and count_input_grad_hooks(model) == 1
