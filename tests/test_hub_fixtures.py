"""Hub-shaped fixtures: folders laid out like Qwen2-VL-2B / Qwen2.5-VL-3B / Qwen3-VL-2B
Instruct, loaded through the documented code path; and veRL's real ``RLHFDataset`` on 700–1024 px
pairs with the launch script's own data settings, which must keep every row (item 10).
"""

from __future__ import annotations

import importlib
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from differad_rl.integrations.testing import (  # noqa: E402
    HUB_FILES,
    HUB_REPOS,
    build_hub_fixture,
    family_of,
    image_only_processor,
)

HUB_LAYOUT = {
    "Qwen/Qwen2-VL-2B-Instruct": {"config.json", "generation_config.json", "preprocessor_config.json",
                                  "chat_template.json", "tokenizer_config.json", "tokenizer.json", "vocab.json",
                                  "merges.txt"},
    "Qwen/Qwen2.5-VL-3B-Instruct": {"config.json", "generation_config.json", "preprocessor_config.json",
                                    "chat_template.json", "tokenizer_config.json", "tokenizer.json", "vocab.json",
                                    "merges.txt"},
    "Qwen/Qwen3-VL-2B-Instruct": {"config.json", "generation_config.json", "preprocessor_config.json",
                                  "video_preprocessor_config.json", "chat_template.json", "tokenizer_config.json",
                                  "tokenizer.json", "vocab.json", "merges.txt"},
}


def _torchvision_importable() -> bool:
    try:
        importlib.import_module("torchvision")
    except Exception:  # noqa: BLE001 - a CUDA torchvision beside CPU torch raises RuntimeError
        return False
    return True


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    return {repo: build_hub_fixture(repo, root / repo.replace("/", "--")) for repo in HUB_REPOS}


@pytest.mark.parametrize("repo", HUB_REPOS)
def test_layout_and_published_defaults(fixtures, repo):
    path = fixtures[repo]
    names = {p.name for p in path.iterdir()}
    assert HUB_LAYOUT[repo] <= names
    assert names - HUB_LAYOUT[repo] == {"model.safetensors", "hub_fixture.json"}
    for name in ("preprocessor_config.json", "video_preprocessor_config.json", "chat_template.json"):
        if name in HUB_FILES[repo]:
            assert json.loads((path / name).read_text()) == HUB_FILES[repo][name]
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "Qwen2Tokenizer" and "padding_side" not in tok_cfg  # hub: right by default
    assert tok_cfg["eos_token"] == "<|im_end|>" and tok_cfg["pad_token"] == "<|endoftext|>"


@pytest.mark.parametrize("repo", HUB_REPOS)
def test_model_loads_through_auto_model_with_consistent_token_ids(fixtures, repo):
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    path = fixtures[repo]
    model = AutoModelForImageTextToText.from_pretrained(path)
    assert model.config.model_type == family_of(repo)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert tokenizer.padding_side == "right"  # as the hub's tokenizer: the trainer must force left


@pytest.mark.parametrize("repo", HUB_REPOS)
def test_auto_processor_behaves_like_the_hub_folder(fixtures, repo):
    """Without torchvision the published folders' processors fail to load (their video processor needs
    it): the fixtures fail the same way; with torchvision they load the full multimodal processor."""
    from transformers import AutoProcessor

    if _torchvision_importable():
        processor = AutoProcessor.from_pretrained(fixtures[repo])
        assert type(processor).__name__ == HUB_FILES[repo]["preprocessor_config.json"]["processor_class"]
        assert processor.video_processor is not None
    else:
        with pytest.raises(ImportError, match="Torchvision"):
            AutoProcessor.from_pretrained(fixtures[repo])


@pytest.mark.parametrize("repo", HUB_REPOS)
def test_image_only_processor_feeds_the_model_two_images(fixtures, repo):
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    path = fixtures[repo]
    processor = image_only_processor(path)
    budget = HUB_FILES[repo]["preprocessor_config.json"]
    hi = budget.get("max_pixels") or budget["size"]["longest_edge"]
    assert processor.image_processor.size["longest_edge"] == hi  # the hub's pixel budget, not a guess
    from differad_rl.integrations.trl import coordinate_spec

    assert coordinate_spec(processor).space == family_of(repo)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)) for _ in range(2)]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Find it."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=images, text=[text], return_tensors="pt")
    assert inputs["image_grid_thw"].shape == (2, 3)
    model = AutoModelForImageTextToText.from_pretrained(path)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()


# ------------------------------------------------------------------------------------------------
# item 10: veRL's RLHFDataset keeps every 700–1024 px pair with the launch script's data settings


def _import_qwen_vl_utils_for_images():
    """qwen_vl_utils imports torchvision at module level for its VIDEO readers only; its image path
    (fetch_image: PIL open + smart_resize + PIL resize) does not use it. Where torchvision does not
    import (this CPU machine), import it once with a placeholder that only satisfies those module-level
    names and fails on any use, then remove the placeholder so nothing else sees it."""
    if "qwen_vl_utils" in sys.modules or _torchvision_importable():
        return importlib.import_module("qwen_vl_utils")

    def _unavailable(*args, **kwargs):
        raise RuntimeError("torchvision placeholder: video decoding is not available in this test")

    fake = types.ModuleType("torchvision")
    fake.__version__ = "0.0"
    fake.io = types.SimpleNamespace(read_video=_unavailable)
    fake.transforms = types.SimpleNamespace(InterpolationMode=types.SimpleNamespace(BICUBIC="bicubic"),
                                            functional=types.SimpleNamespace(resize=_unavailable))
    names = {"torchvision": fake, "torchvision.io": fake.io, "torchvision.transforms": fake.transforms}
    saved = {k: sys.modules.get(k) for k in names}
    sys.modules.update(names)
    try:
        return importlib.import_module("qwen_vl_utils")
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def _pairs(tmp_path: Path, sides: list[int]):
    from PIL import Image

    from differad_rl.data.records import PairRecord

    rng = np.random.default_rng(0)
    records = []
    for i, side in enumerate(sides):
        w, h = side, side * 3 // 4 if i % 2 else side
        paths = []
        for kind in ("ref", "tgt"):
            p = tmp_path / f"{i}_{kind}.png"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
            paths.append(str(p))
        records.append(PairRecord(id=f"p{i}", reference=paths[0], target=paths[1], boxes=[[10, 10, 60, 50]],
                                  width=w, height=h, category="demo"))
    return records


@pytest.fixture(scope="module")
def launch_data_settings(tmp_path_factory):
    pytest.importorskip("verl")
    from tests.test_verl_examples import compose, launch_argv

    cfg = compose(launch_argv(tmp_path_factory.mktemp("launch"), NNODES="1", NGPUS_PER_NODE="8"))
    return cfg.data


def _dataset(parquet: Path, data_cfg, processor, **overrides):
    from omegaconf import OmegaConf, open_dict
    from verl.utils.dataset.rl_dataset import RLHFDataset

    cfg = OmegaConf.create(OmegaConf.to_container(data_cfg, resolve=False))
    with open_dict(cfg):
        cfg.cache_dir = str(parquet.parent / "cache")
        cfg.update(overrides)
    return RLHFDataset(data_files=[str(parquet)], tokenizer=processor.tokenizer, config=cfg, processor=processor)


def test_rlhf_dataset_keeps_every_large_pair(fixtures, launch_data_settings, tmp_path):
    pytest.importorskip("verl")
    _import_qwen_vl_utils_for_images()
    from differad_rl.integrations.verl.data import ParquetOptions, write_verl_parquet

    data_cfg = launch_data_settings
    assert data_cfg.filter_overlong_prompts is True and data_cfg.truncation == "error"
    sides = [700, 760, 840, 900, 1000, 1024]
    parquet = write_verl_parquet(_pairs(tmp_path, sides), tmp_path / "train.parquet",
                                 ParquetOptions(space="qwen2_5_vl", max_pixels=1003520), progress=False)
    processor = image_only_processor(fixtures["Qwen/Qwen2.5-VL-3B-Instruct"])

    dataset = _dataset(parquet, data_cfg, processor)
    assert len(dataset) == len(sides)  # every row kept
    from verl.utils.dataset import rl_dataset

    lengths = []
    for i in range(len(dataset)):
        messages = dataset[i]["raw_prompt"]  # what the agent loop tokenises, measured as veRL's filter does
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        images, _, _ = dataset._process_multi_modal_info(messages, dataset.image_patch_size, dataset.config)
        inputs = rl_dataset.build_multimodal_processor_inputs(processor, text=[text], images=images)
        lengths.append(len(inputs["input_ids"][0]))
        # the pixel budget really reached the resize: at most 1280 visual tokens per image
        assert len(images) == 2 and (inputs["image_grid_thw"].prod(-1) // 4 <= 1280).all()
    assert max(lengths) <= data_cfg.max_prompt_length
    assert min(lengths) > 1024 and max(lengths) > 2500  # measured: 700 px square 1,436; 1000 px square 2,629

    # the old budget (1024 tokens) silently drops every one of these pairs
    assert len(_dataset(parquet, data_cfg, processor, max_prompt_length=1024)) == 0
