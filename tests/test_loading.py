"""The one loader (differad_rl.integrations.qwen_vl.loading): padding side, dtype, pixel budget, family and
tiny detection follow one rule, and the hub path fails with one clear line where it cannot work."""

from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")

from differad_rl.coords import smart_resize  # noqa: E402
from differad_rl.integrations.qwen_vl import loading  # noqa: E402
from differad_rl.integrations.qwen_vl.tiny import FAMILIES, tiny_model_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "trl"

# What the hub's Qwen2.5-VL-3B-Instruct ships as preprocessor_config.json.
HUB_PREPROCESSOR_25 = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _copy(src: Path, dest: Path, *, manifest: bool = True) -> Path:
    shutil.copytree(src, dest)
    if not manifest:
        (dest / "tiny_build.json").unlink()
    return dest


def _hub_shaped(dest: Path) -> Path:
    """A folder laid out like the hub's Qwen2.5-VL repository (no tiny manifest, stock processor class)."""
    _copy(tiny_model_for("qwen2_5_vl"), dest, manifest=False)
    (dest / "processor_config.json").unlink()
    (dest / "preprocessor_config.json").write_text(json.dumps(HUB_PREPROCESSOR_25, indent=2))
    return dest


# ------------------------------------------------------------------------------- padding side
def test_padding_is_forced_left_even_when_the_folder_says_right(tmp_path):
    folder = _copy(tiny_model_for("qwen2_vl"), tmp_path / "right")
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["padding_side"] = "right"
    cfg_path.write_text(json.dumps(cfg))
    _, processor = loading.load_model_and_processor(str(folder))
    assert processor.tokenizer.padding_side == "left"
    assert loading.load_processor(str(folder)).tokenizer.padding_side == "left"
    processor.tokenizer.padding_side = "right"
    with pytest.raises(ValueError, match="padding_side='right'.*must be 'left'"):
        loading.check_left_padding(processor)
    assert loading.force_left_padding(processor).tokenizer.padding_side == "left"


# ------------------------------------------------------------------------------- dtype
def test_bf16_keeps_fp32_master_weights_for_training_and_bf16_weights_for_inference():
    path = str(tiny_model_for("qwen2_5_vl"))
    train_model, _ = loading.load_model_and_processor(path, bf16=True)
    assert {p.dtype for p in train_model.parameters()} == {torch.float32}
    infer_model, _ = loading.load_model_and_processor(path, bf16=True, training=False)
    assert {p.dtype for p in infer_model.parameters()} == {torch.bfloat16}
    plain, _ = loading.load_model_and_processor(path, training=False)
    assert {p.dtype for p in plain.parameters()} == {torch.float32}
    assert loading.weights_dtype(bf16=True, training=True) == torch.float32


def _changed_fraction(model, steps: int = 3, lr: float = 1e-5, autocast: bool = True) -> float:
    """Share of parameter elements that moved after ``steps`` AdamW steps on a dual-image batch."""
    from differad_rl.integrations.qwen_vl.tiny import load_tiny_processor

    processor = load_tiny_processor(tiny_model_for("qwen2_5_vl"))
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "box?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "<answer>(1,2),(30,40)</answer>"}]}],
        tokenize=False)
    batch = processor(text=[text], images=[Image.new("RGB", (56, 56), c) for c in ("red", "blue")],
                      return_tensors="pt")
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    torch.manual_seed(0)
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    moved = sum(int((p.detach() != b).sum()) for p, b in zip(model.parameters(), before))
    total = sum(b.numel() for b in before)
    return moved / total


def test_training_under_bf16_autocast_updates_most_weights_unlike_bf16_weights():
    """With the loader's training rule nearly every weight moves at lr 1e-5; bf16
    weights (what the examples used to load) round most updates away."""
    path = str(tiny_model_for("qwen2_5_vl"))
    fp32_master, _ = loading.load_model_and_processor(path, bf16=True)  # training=True
    bf16_weights, _ = loading.load_model_and_processor(path, bf16=True, training=False)
    assert _changed_fraction(fp32_master) > 0.8
    assert _changed_fraction(bf16_weights, autocast=False) < 0.5


# ------------------------------------------------------------------------------- pixel budget
@pytest.mark.parametrize("family", FAMILIES)
def test_pixel_budget_set_read_and_applied(family):
    _, processor = loading.load_model_and_processor(str(tiny_model_for(family)), min_pixels=4 * 28 * 28,
                                                    max_pixels=64 * 28 * 28)
    assert loading.pixel_budget(processor) == (4 * 28 * 28, 64 * 28 * 28)
    ip = processor.image_processor
    factor = ip.patch_size * ip.merge_size
    out = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[Image.new("RGB", (300, 200))],
                    return_tensors="pt")
    _, gh, gw = out["image_grid_thw"][0].tolist()
    assert (gh * ip.patch_size, gw * ip.patch_size) == smart_resize(200, 300, factor, 4 * 28 * 28, 64 * 28 * 28)
    loading.set_pixel_budget(processor, None, 100 * 28 * 28)  # None keeps the other bound
    assert loading.pixel_budget(processor) == (4 * 28 * 28, 100 * 28 * 28)
    with pytest.raises(ValueError, match="--min-pixels 5000 / --max-pixels 4000"):
        loading.set_pixel_budget(processor, 5000, 4000)


# ------------------------------------------------------------------------------- family / tiny
@pytest.mark.parametrize("family", FAMILIES)
def test_family_comes_from_model_type_not_the_name(family, tmp_path):
    folder = _copy(tiny_model_for(family), tmp_path / "Qwen2.5-VL-7B-looking-name")
    assert loading.model_family(str(folder)) == family
    model, _ = loading.load_model_and_processor(str(folder))
    assert loading.model_family(model) == family == loading.model_family(model.config)


def test_unknown_family_is_one_clear_error(tmp_path):
    folder = tmp_path / "gpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"model_type 'gpt2' is not a supported family; expected one of"):
        loading.model_family(str(folder))
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        loading.load_model_and_processor(str(folder))
    with pytest.raises(ValueError, match="cannot read its config.json"):
        loading.model_family(str(tmp_path / "nothing-here"))


def test_tiny_is_the_manifest_or_the_exact_keyword(tmp_path):
    assert loading.is_tiny("tiny") and loading.is_tiny("tiny:qwen3_vl")
    assert loading.tiny_spec_family("tiny") == "qwen2_5_vl"
    assert not loading.is_tiny("tiny-llava/TinyLLaVA-3B") and not loading.is_tiny("tinyqwen")
    with pytest.raises(ValueError, match="unknown tiny family 'qwen9'"):
        loading.is_tiny("tiny:qwen9")
    named_tiny = _copy(tiny_model_for("qwen2_vl"), tmp_path / "tiny_but_real", manifest=False)
    assert not loading.is_tiny(named_tiny)  # the name is not enough
    built = loading.resolve_model("tiny:qwen3_vl", cache_dir=tmp_path / "cache")
    assert loading.is_tiny(built) and loading.model_family(built) == "qwen3_vl"
    # a manifest-less copy takes the hub path: AutoProcessor's silent tokenizer fallback is refused
    with pytest.raises(ValueError, match="not a multimodal processor"):
        loading.load_model_and_processor(str(named_tiny))


def test_checkpoint_keeps_the_manifest(tmp_path):
    model, processor = loading.load_model_and_processor(str(tiny_model_for("qwen2_vl")))
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    assert not loading.is_tiny(ckpt)
    loading.keep_tiny_manifest(model, ckpt)
    assert loading.is_tiny(ckpt)
    again, _ = loading.load_model_and_processor(str(ckpt))
    assert loading.model_family(again) == "qwen2_vl"


# ------------------------------------------------------------------------------- hub path errors
def test_folder_without_processor_is_one_clear_error(tmp_path):
    folder = tmp_path / "weights_only"
    folder.mkdir()
    src = tiny_model_for("qwen2_5_vl")
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(src / name, folder / name)
    with pytest.raises(ValueError, match=rf"--model {folder}: no processor could be loaded") as info:
        loading.load_model_and_processor(str(folder))
    assert "\n" not in str(info.value)


def _torchvision_importable() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        importlib.import_module("torchvision")
    except Exception:  # noqa: BLE001 - a CUDA torchvision beside a CPU torch fails to import
        return False
    return True


def _smart_resize_source(module: str) -> str:
    """The text of ``smart_resize`` in a transformers module, read from its file (not imported:
    the torchvision image processor's module imports torchvision)."""
    text = Path(importlib.util.find_spec(module).origin).read_text()
    start = text.index("def smart_resize(")
    return text[start:text.index("\n\n\n", start)]


def test_hub_qwen2_5_vl_processor_without_torchvision_is_image_only(tmp_path, monkeypatch):
    """The stock Qwen2.5-VL processor imports torchvision. Without it: the same folder's files load
    into the image-only processor (PIL image processor, no video processor) with the published
    budget, patch size and left padding, and one warning line says so, once; its checkpoint names
    the stock class and reloads. With torchvision (GPU machines): the stock processor."""
    folder = _hub_shaped(tmp_path / "Qwen2.5-VL-3B-Instruct")
    if _torchvision_importable():
        processor = loading.load_processor(str(folder))
        assert type(processor).__name__ == "Qwen2_5_VLProcessor"
        assert processor.tokenizer.padding_side == "left"
        assert loading.pixel_budget(processor) == (3136, 12845056)
        return
    from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from differad_rl.integrations.qwen_vl.tiny import TinyQwen2_5_VLProcessor

    monkeypatch.setattr(loading, "_image_only_warned", False)
    with pytest.warns(UserWarning) as caught:
        processor = loading.load_processor(str(folder))
    ours = [w for w in caught if "image-only processor" in str(w.message)]
    assert len(ours) == 1
    message = str(ours[0].message)
    assert "\n" not in message and "torchvision is not installed" in message
    assert "videos are unsupported" in message and "install the torchvision build that matches your torch" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: the second load is silent
        again = loading.load_processor(str(folder), max_pixels=1003520)

    assert isinstance(processor, Qwen2_5_VLProcessor) and isinstance(processor, TinyQwen2_5_VLProcessor)
    assert getattr(processor, "video_processor", None) is None
    ip = processor.image_processor
    assert type(ip) is Qwen2VLImageProcessorPil
    # the published preprocessor_config.json, read from the folder (not the tiny build's 12,544 budget)
    assert loading.pixel_budget(processor) == (3136, 12845056)
    assert (ip.patch_size, ip.merge_size, ip.temporal_patch_size) == (14, 2, 2)
    assert list(ip.image_mean) == HUB_PREPROCESSOR_25["image_mean"]
    assert processor.tokenizer.padding_side == "left"
    assert processor.chat_template == (folder / "chat_template.jinja").read_text()
    # the loader's budget rule applies as to the stock processor, and the grid is smart_resize's
    assert loading.pixel_budget(again) == (3136, 1003520) and again.tokenizer.padding_side == "left"
    image = Image.new("RGB", (1500, 1100))
    gh, gw = again(images=[image], text=["<|vision_start|><|image_pad|><|vision_end|>"],
                   return_tensors="pt")["image_grid_thw"][0, 1:].tolist()
    assert (gh * 14, gw * 14) == smart_resize(1100, 1500, 28, 3136, 1003520)
    # the stock (torchvision) image processor resizes with the same smart_resize text
    assert _smart_resize_source("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl") == \
        _smart_resize_source("transformers.models.qwen2_vl.image_processing_qwen2_vl")

    # a checkpoint of it names the stock class (else AutoProcessor would hand back a bare tokenizer)
    # and keeps the hub's preprocessor_config.json, which the stock video processor reads
    ckpt = tmp_path / "checkpoint"
    again.save_pretrained(str(ckpt))
    shutil.copy(folder / "config.json", ckpt / "config.json")
    assert json.loads((ckpt / "processor_config.json").read_text())["processor_class"] == "Qwen2_5_VLProcessor"
    saved = json.loads((ckpt / "preprocessor_config.json").read_text())
    assert saved["size"] == {"shortest_edge": 3136, "longest_edge": 1003520} and saved["patch_size"] == 14
    reloaded = loading.load_processor(str(ckpt))
    assert type(reloaded) is type(again) and loading.pixel_budget(reloaded) == (3136, 1003520)


def test_image_only_fallback_is_not_used_for_other_import_errors(tmp_path, monkeypatch):
    """Only transformers' torchvision ImportError switches to the image-only processor."""
    folder = _hub_shaped(tmp_path / "Qwen2.5-VL-3B-Instruct")
    from transformers import AutoProcessor

    def broken(*args, **kwargs):
        raise ImportError("No module named 'sentencepiece'")

    monkeypatch.setattr(AutoProcessor, "from_pretrained", broken)
    with pytest.raises(ImportError, match="sentencepiece"):
        loading.load_processor(str(folder))


# ------------------------------------------------------------------------------- the examples use it
def test_sft_example_reexports_the_package_loader(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    sys.modules.pop("sft_cold_start", None)
    sft = importlib.import_module("sft_cold_start")
    for name in ("freeze_vision_tower", "keep_tiny_manifest", "load_model_and_processor", "set_pixel_budget"):
        assert getattr(sft, name) is getattr(loading, name)
    assert sft.TINY_PREFIX == "tiny"
    for name in ("demo_or_data", "run_sft", "save_curve"):  # what train_grpo.py imports
        assert callable(getattr(sft, name))
