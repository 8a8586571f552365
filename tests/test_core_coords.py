import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from differad_rl.coords import (
    SPACES,
    from_model_space,
    smart_resize,
    smart_resize_array,
    space_for_model,
    to_model_space,
)
from tests import oracle

sizes = st.integers(min_value=8, max_value=4000)


@settings(max_examples=300, deadline=None)
@given(h=sizes, w=sizes, mn=st.sampled_from([56 * 56, 4 * 28 * 28, 256 * 28 * 28]),
       mx=st.sampled_from([112 * 112, 28 * 28 * 1280, 16384 * 28 * 28]))
def test_smart_resize_equals_transformers(h, w, mn, mx):
    if max(h, w) / min(h, w) > 200 or mn > mx:
        return
    expected = hf_smart_resize(h, w, factor=28, min_pixels=mn, max_pixels=mx)
    assert smart_resize(h, w, 28, mn, mx) == expected
    rh, rw = smart_resize_array(np.array([h]), np.array([w]), 28, mn, mx)
    assert (int(rh[0]), int(rw[0])) == expected


def test_smart_resize_rejects_bad_sizes():
    with pytest.raises(ValueError, match="height"):
        smart_resize(0, 10)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 3000)


def test_relative_space_matches_oracle():
    boxes = np.array([[10.0, 20.0, 300.0, 400.0], [0, 0, 0, 0]])
    out = to_model_space(boxes, 640, 480, "qwen2_vl")
    assert out[0].tolist() == list(oracle.to_relative(boxes[0], 640, 480))
    assert out[1].tolist() == [0, 0, 0, 0]
    assert to_model_space(boxes, 640, 480, "qwen3_vl").tolist() == out.tolist()


def test_qwen2_5_vl_uses_resized_pixels():
    h, w = smart_resize(480, 640)
    out = to_model_space(np.array([640.0, 480.0, 640.0, 480.0]), 640, 480, "qwen2_5_vl")
    assert out.tolist() == [w, h, w, h]
    out = to_model_space(np.array([640.0, 480.0, 640.0, 480.0]), 640, 480, "qwen2_5_vl", max_pixels=112 * 112)
    h2, w2 = smart_resize(480, 640, max_pixels=112 * 112)
    assert out.tolist() == [w2, h2, w2, h2]


@settings(max_examples=200, deadline=None)
@given(
    x1=st.floats(0, 999), y1=st.floats(0, 999), bw=st.floats(1, 1000), bh=st.floats(1, 1000),
    w=st.integers(1000, 3000), h=st.integers(1000, 3000), space=st.sampled_from(SPACES),
)
def test_round_trip_exact_up_to_grid(x1, y1, bw, bh, w, h, space):
    if max(h, w) / min(h, w) > 200:
        return
    box = np.array([x1, y1, x1 + bw, y1 + bh])
    exact = from_model_space(to_model_space(box, w, h, space, round=False), w, h, space)
    np.testing.assert_allclose(exact, box, rtol=1e-12, atol=1e-9)
    rounded = from_model_space(to_model_space(box, w, h, space), w, h, space)
    if space in ("qwen2_vl", "qwen3_vl"):
        cell = np.array([w, h, w, h]) / 1000
    elif space == "qwen2_5_vl":
        rh, rw = smart_resize(h, w)
        cell = np.array([w / rw, h / rh, w / rw, h / rh])
    else:
        cell = np.zeros(4)
    assert np.all(np.abs(rounded - box) <= cell / 2 + 1e-9)


def test_torch_keeps_dtype_and_batches():
    b = torch.tensor([[[10.0, 10.0, 20.0, 20.0]] * 3] * 2, dtype=torch.float32)
    out = to_model_space(b, torch.tensor([[100, 200, 300]] * 2), 100, "qwen2_vl", round=False)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 4)
    assert out[0, 1].tolist() == pytest.approx([50.0, 100.0, 100.0, 200.0])
    assert to_model_space(torch.tensor([[1, 2, 3, 4]]), 10, 10, "pixel").dtype == torch.float64


def test_user_errors_name_the_field():
    with pytest.raises(ValueError, match="space='qwen9'"):
        to_model_space([[0, 0, 1, 1]], 10, 10, "qwen9")
    with pytest.raises(ValueError, match="width"):
        to_model_space([[0, 0, 1, 1]], -5, 10, "qwen2_vl")
    with pytest.raises(ValueError, match="shape"):
        to_model_space([[0, 0, 1]], 10, 10, "qwen2_vl")
    with pytest.raises(ValueError, match="model="):
        space_for_model("llava-1.5")


@pytest.mark.parametrize("name,space", [
    ("Qwen/Qwen2.5-VL-3B-Instruct", "qwen2_5_vl"), ("Qwen/Qwen2-VL-7B-Instruct", "qwen2_vl"),
    ("Qwen/Qwen3-VL-8B-Instruct", "qwen3_vl"), ("qwen2_5_vl", "qwen2_5_vl"), ("pixel", "pixel"),
])
def test_space_for_model(name, space):
    assert space_for_model(name) == space
