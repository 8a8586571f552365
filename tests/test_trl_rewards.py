"""TRL reward adapter: the model family's space read off real processors, equality with the core
and the scalar oracle, target sizes from columns or images, errors, and 2-step GRPO runs of every
tiny family with these rewards."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

pytest.importorskip("trl")

from differad_rl import coords, rewards as core  # noqa: E402
from differad_rl.integrations.qwen_vl.tiny import (  # noqa: E402
    FAMILIES,
    build_tiny_qwen_vl,
    load_tiny_processor,
    load_tiny_qwen_vl,
    tiny_model_for,
)
from differad_rl.integrations.trl import (  # noqa: E402
    CoordinateSpec,
    coordinate_spec,
    differad_rewards,
    get_reward,
    reward_names,
    target_image_sizes,
)

from . import oracle  # noqa: E402


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_rewards")


@pytest.fixture(scope="module")
def processors(tiny_cache):
    return {f: load_tiny_processor(tiny_model_for(f, cache_dir=tiny_cache)) for f in FAMILIES}


def _completion(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def _answer(box) -> str:
    x1, y1, x2, y2 = (int(v) for v in box)
    return f"<think>look</think><answer>({x1},{y1}),({x2},{y2})</answer>"


# ----------------------------------------------------------------------------------- the space
@pytest.mark.parametrize("family", FAMILIES)
def test_spec_is_read_off_the_processor(family, processors):
    proc = processors[family]
    spec = coordinate_spec(proc)
    assert spec.space == family
    assert spec.min_pixels == proc.image_processor.size.shortest_edge
    assert spec.max_pixels == proc.image_processor.size.longest_edge
    assert spec.factor == (32 if family == "qwen3_vl" else 28)


def test_spec_follows_a_custom_pixel_budget(tmp_path):
    lo, hi = 28 * 28 * 4, 14 * 14 * 4 * 1280  # the paper's max_pixels = 1,003,520
    proc = load_tiny_processor(build_tiny_qwen_vl("qwen2_5_vl", tmp_path / "m", min_pixels=lo, max_pixels=hi))
    assert coordinate_spec(proc) == CoordinateSpec("qwen2_5_vl", lo, hi, 28)


@pytest.mark.parametrize("wh", [(120, 90), (900, 700), (64, 200), (37, 41), (1024, 33)])
def test_qwen2_5_space_is_the_image_the_model_sees(wh, processors):
    """The resized size the reward converts to equals what the real processor fed the model."""
    proc = processors["qwen2_5_vl"]
    spec = coordinate_spec(proc)
    w, h = wh
    out = proc.image_processor(images=[Image.new("RGB", (w, h))], return_tensors="pt")
    t, gh, gw = out["image_grid_thw"][0].tolist()
    seen = (gh * proc.image_processor.patch_size, gw * proc.image_processor.patch_size)
    assert coords.smart_resize(h, w, spec.factor, spec.min_pixels, spec.max_pixels) == seen
    # the full box of the original image becomes the full box of the resized image
    full = spec.to_model_space(np.array([0.0, 0.0, w, h]), w, h)
    assert full.tolist() == [0, 0, seen[1], seen[0]]


def test_model_must_agree_explicit_space_wins(processors):
    proc = processors["qwen2_5_vl"]
    assert coordinate_spec(proc, model="Qwen/Qwen2.5-VL-3B-Instruct").space == "qwen2_5_vl"
    with pytest.raises(ValueError, match="writes 'qwen2_5_vl' coordinates but the model is 'qwen2_vl'"):
        coordinate_spec(proc, model="Qwen/Qwen2-VL-7B-Instruct")
    assert coordinate_spec(proc, model="Qwen/Qwen2-VL-7B-Instruct", space="qwen2_vl").space == "qwen2_vl"
    assert coordinate_spec(proc, space="qwen3_vl").space == "qwen3_vl"
    assert coordinate_spec("qwen2_vl") == CoordinateSpec("qwen2_vl")
    assert coordinate_spec("qwen2_5_vl", min_pixels=3136, max_pixels=12544, factor=28).max_pixels == 12544


def test_spec_refuses_to_guess(processors):
    with pytest.raises(ValueError, match="bare tokenizer"):
        coordinate_spec(processors["qwen2_vl"].tokenizer)
    with pytest.raises(ValueError, match="min_pixels=None"):
        coordinate_spec("qwen2_5_vl")
    with pytest.raises(ValueError, match="space='llava'"):
        coordinate_spec("qwen2_vl", space="llava")
    with pytest.raises(ValueError, match="min_pixels=9 > max_pixels=4"):
        CoordinateSpec("qwen2_vl", 9, 4, 28)


# ------------------------------------------------------------------ equality with core / oracle
_box = st.tuples(st.floats(0, 0.95), st.floats(0, 0.95), st.floats(0.02, 1), st.floats(0.02, 1))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    family=st.sampled_from(FAMILIES),
    w=st.integers(20, 1500),
    h=st.integers(20, 1500),
    gt=_box,
    pred=st.tuples(st.integers(0, 1200), st.integers(0, 1200), st.integers(0, 1200), st.integers(0, 1200)),
    normal=st.booleans(),
)
def test_rewards_equal_core_on_converted_boxes(processors, family, w, h, gt, pred, normal):
    proc = processors[family]
    spec = coordinate_spec(proc)
    if normal:
        g = [0.0, 0.0, 0.0, 0.0]
    else:  # a valid box inside the image, in original pixels
        x1, y1 = gt[0] * w, gt[1] * h
        g = [x1, y1, min(w, x1 + gt[2] * (w - x1) + 1), min(h, y1 + gt[3] * (h - y1) + 1)]
    comps = [_completion(_answer(pred)), _completion(_answer((0, 0, 0, 0))), _completion("no box")]
    kw = {"solution": [g] * 3, "image_size": [[w, h]] * 3}
    conv = coords.to_model_grid(np.array([g] * 3), w, h, family, min_pixels=spec.min_pixels,
                                max_pixels=spec.max_pixels, factor=spec.factor)  # snapped as the model writes
    fns = differad_rewards(proc, names=("dclr", "iou", "consistency"))
    for name, fn in zip(("dclr", "iou", "consistency"), fns):
        ours = fn(prompts=[None] * 3, completions=comps, **kw)
        # the core's reward, fed ground truth already in the model's space
        ref = getattr(core, f"get_{name}_reward")(space=family)(comps, solution=conv.tolist())
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)
        # and the scalar oracle on the converted box
        preds = [tuple(float(v) for v in pred), (0.0, 0.0, 0.0, 0.0), None]
        exp = [oracle.localization(p, tuple(conv[0].tolist()), kind=name) for p in preds]
        np.testing.assert_allclose(ours, exp, rtol=0, atol=1e-9)


def test_relative_families_score_the_1000_grid(processors):
    """Qwen2-VL / Qwen3-VL: the ground truth's 0..1000 image scores 1 when written exactly."""
    w, h = 640, 480
    g = [64.0, 48.0, 320.0, 240.0]  # → (100, 100, 500, 500)
    for family in ("qwen2_vl", "qwen3_vl"):
        fn = differad_rewards(processors[family], names=("dclr",))[0]
        r = fn(completions=[_completion(_answer((100, 100, 500, 500))), _completion(_answer(g))],
               solution=[g, g], image_size=[[w, h]] * 2)
        assert r[0] == pytest.approx(1.0) and r[1] < 1.0


def test_size_from_images_equals_size_column(processors):
    fn = differad_rewards(processors["qwen2_5_vl"], names=("dclr",))[0]
    imgs = [[Image.new("RGB", (300, 200)), Image.new("RGB", (120, 90))]]  # reference, target
    comps, sol = [_completion(_answer((10, 10, 60, 40)))], [[10.0, 12.0, 70.0, 50.0]]
    a = fn(completions=comps, solution=sol, image_size=[[120, 90]])
    b = fn(completions=comps, solution=sol, images=imgs)
    c = fn(completions=comps, solution=sol, images=imgs, image_size=[[120, 90]])
    assert a == b == c and 0 < a[0] < 1


def test_target_sizes_errors_name_the_sample():
    img = Image.new("RGB", (50, 40))
    with pytest.raises(ValueError, match=r"sample 1 \(id 'b'\): image_size=\[50, 41\] but the target image is 50x40"):
        target_image_sizes(2, image_size=[[50, 40], [50, 41]], images=[[img, img], [img, img]], ids=["a", "b"])
    with pytest.raises(ValueError, match="sample 0: no 'image_size' column and no 'images' / 'image' column"):
        target_image_sizes(1)
    with pytest.raises(ValueError, match="must be two positive integers"):
        target_image_sizes(1, image_size=[[0, 10]])
    with pytest.raises(ValueError, match="is not \\[width, height\\]"):
        target_image_sizes(1, image_size=[[1, 2, 3]])
    assert target_image_sizes(1, image=[img]).tolist() == [[50, 40]]


def test_multi_box_reward_uses_all_boxes(processors):
    proc = processors["qwen2_vl"]
    fn = differad_rewards(proc, names=("multi_box",))[0]
    w, h = 200, 100
    boxes = [[20.0, 10.0, 60.0, 50.0], [100.0, 20.0, 180.0, 90.0]]
    rel = [oracle.to_relative(b, w, h) for b in boxes]
    text = "<think>two</think><answer>" + ",".join(f"({b[0]},{b[1]}),({b[2]},{b[3]})" for b in rel) + "</answer>"
    out = fn(completions=[_completion(text), _completion(text)], solution=[boxes[1], [0, 0, 0, 0]],
             boxes=[boxes, []], image_size=[[w, h]] * 2)
    assert out[0] == pytest.approx(1.0)
    assert out[1] == 0.0  # boxes on a normal target
    # without a boxes column: the single solution box
    one = fn(completions=[_completion(_answer(rel[0]))], solution=[boxes[0]], image_size=[[w, h]])
    assert one[0] == pytest.approx(1.0)


def test_bad_model_output_never_raises(processors):
    fns = differad_rewards(processors["qwen2_5_vl"], names=reward_names())
    junk = ["", "<answer></answer>", "<answer>(1e999,2),(3,4)</answer>", "<answer>(5,5),(1,1)</answer>",
            "<think>" * 1000, "<answer>(-3,-4),(-1,-2)</answer>", "((((", "<answer>[1,2,3]</answer>"]
    comps = [_completion(t) for t in junk]
    kw = {"solution": [[1.0, 1.0, 20.0, 20.0]] * len(junk), "image_size": [[100, 100]] * len(junk)}
    for fn in fns:
        out = fn(prompts=[None] * len(junk), completions=comps, **kw)
        assert len(out) == len(junk) and all(0.0 <= v <= 1.0 for v in out)
        assert out[0] == 0.0


def test_names_registry_and_errors(processors):
    peers = ("iou_threshold", "iou_squared", "giou", "diou", "ciou", "matched_hits")  # docs/method.md §9
    assert reward_names() == ("dclr", "iou", "consistency", "multi_box", "format", *peers)
    with pytest.raises(ValueError, match="'dice' is unknown; known rewards: dclr, iou, consistency, multi_box, format, iou_"):
        differad_rewards(processors["qwen2_vl"], names=("dclr", "dice"))
    with pytest.raises(ValueError, match="duplicate"):
        differad_rewards(processors["qwen2_vl"], names=("dclr", "dclr"))
    with pytest.raises(ValueError, match="at least one"):
        differad_rewards(processors["qwen2_vl"], names=())
    with pytest.raises(ValueError, match="takes no option center_norm"):
        get_reward("format", "qwen2_vl", center_norm="paper")
    with pytest.raises(ValueError, match="center_norm"):
        differad_rewards(processors["qwen2_vl"], center_norm="diagonal")


def test_options_reach_the_core(processors):
    proc = processors["qwen2_vl"]
    kw = {"solution": [[10.0, 10.0, 20.0, 20.0]], "image_size": [[1000, 1000]]}
    comps = [_completion(_answer((300, 300, 310, 310)))]
    paper = differad_rewards(proc, names=("dclr",))[0](completions=comps, **kw)[0]
    encl = differad_rewards(proc, names=("dclr",), center_norm="enclosing")[0](completions=comps, **kw)[0]
    assert paper == pytest.approx(oracle.localization((300, 300, 310, 310), (10, 10, 20, 20)))
    assert encl == pytest.approx(oracle.localization((300, 300, 310, 310), (10, 10, 20, 20), center_norm="enclosing"))
    assert encl > paper


def test_picklable_with_names(processors):
    fns = differad_rewards(processors["qwen2_5_vl"], names=reward_names())
    assert [f.__name__ for f in fns] == ["dclr_reward", "iou_reward", "consistency_reward",
                                          "multi_box_reward", "format_reward", "iou_threshold_reward",
                                          "iou_squared_reward", "giou_reward", "diou_reward", "ciou_reward",
                                          "matched_hits_reward"]
    kw = {"solution": [[3.0, 4.0, 50.0, 60.0]], "image_size": [[90, 80]]}
    comps = [_completion(_answer((3, 5, 40, 55)))]
    for f in fns:
        g = pickle.loads(pickle.dumps(f))
        assert g.__name__ == f.__name__ and g(completions=comps, **kw) == f(completions=comps, **kw)


# ------------------------------------------------------------------ end to end through TRL
def _tiny_pairs(tmp_path, n=4):
    from differad_rl.data.records import PairRecord

    rng = np.random.default_rng(0)
    recs = []
    for i in range(n):
        w, h = ((96, 80), (120, 90))[i % 2]
        for part in ("ref", "tgt"):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}_{part}.png")
        recs.append(PairRecord(id=f"pair{i}", reference=str(tmp_path / f"{i}_ref.png"),
                               target=str(tmp_path / f"{i}_tgt.png"),
                               boxes=[[8, 8, 40, 30]] if i % 2 == 0 else [], width=w, height=h, category="toy"))
    return recs


@pytest.fixture()
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: threads cost more than they save
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("family", FAMILIES)
def test_two_grpo_steps_per_family(family, tiny_cache, tmp_path):
    import torch

    from differad_rl.integrations.trl import DifferADGRPOConfig, DifferADGRPOTrainer, to_trl_dataset

    torch.manual_seed(0)
    model, proc = load_tiny_qwen_vl(tiny_model_for(family, cache_dir=tiny_cache))
    ds = to_trl_dataset(_tiny_pairs(tmp_path))
    args = DifferADGRPOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
        max_completion_length=8, max_steps=2, use_cpu=True, bf16=False, logging_steps=1, report_to="none",
        save_strategy="no", learning_rate=1e-3, difficulty_weighting=True, resample_rounds=1,
        localization_reward="dclr_reward", dataloader_num_workers=0,
    )
    trainer = DifferADGRPOTrainer(model=model, processing_class=proc, reward_funcs=differad_rewards(proc),
                                  args=args, train_dataset=ds)
    trainer.train()
    logs = [r for r in trainer.state.log_history if "rewards/dclr_reward/mean" in r]
    assert len(logs) == 2
    for r in logs:
        assert 0.0 <= r["rewards/dclr_reward/mean"] <= 1.0
        assert 0.0 <= r["rewards/format_reward/mean"] <= 1.0
        assert 1.0 <= r["differad/weight_mean"] <= r["differad/weight_max"] <= 2.07
        assert 0.0 <= r["differad/degenerate_after"] <= r["differad/degenerate_before"] <= 1.0
        assert r["differad/rounds_used"] in (0.0, 1.0)


def test_package_import_runs_the_version_guard():
    """``import differad_rl.integrations.trl`` refuses an unsupported TRL with a clear error."""
    import subprocess
    import sys

    code = (
        "import importlib.metadata as md\n"
        "real = md.version\n"
        "md.version = lambda name: '1.17.0' if name == 'trl' else real(name)\n"
        "try:\n"
        "    import differad_rl.integrations.trl\n"
        "except ImportError as e:\n"
        "    print('REFUSED', e)\n"
        "else:\n"
        "    print('IMPORTED')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300).stdout
    assert "REFUSED" in out and "trl 1.17.0 is installed" in out and ">=1.16.0,<1.17" in out


def test_one_set_of_dclr_options_configures_a_whole_reward_list():
    from differad_rl.integrations.trl import differad_rewards

    fs = differad_rewards("qwen2_vl", names=("dclr", "iou", "multi_box", "format"),
                          size_term="sides", center_norm="enclosing")
    assert [f.__name__ for f in fs] == ["dclr_reward", "iou_reward", "multi_box_reward", "format_reward"]
    strip = ["<think>.</think><answer>(50,112),(250,137)</answer>"]
    kw = {"solution": [[100, 100, 200, 150]], "image_size": [[1000, 1000]]}
    assert fs[0](strip, **kw)[0] < 0.9  # the sides term sees the wrong shape
