"""Pair records → veRL multimodal parquet, loaded by veRL 0.9.1's own ``RLHFDataset`` and processed by
the tiny Qwen2.5-VL processor through veRL's ``build_multimodal_processor_inputs``.

CPU note: veRL resizes images with ``qwen_vl_utils`` (``process_vision_info``), which imports
torchvision; there is no torchvision in this CPU environment, so the test feeds the decoded images
to the processor directly (the processor resizes them itself) and keeps
``data.filter_overlong_prompts=False`` (veRL's default; with it on and no torchvision every
multimodal row fails to measure and is silently filtered out).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("verl")
pytest.importorskip("datasets")

from differad_rl import prompts  # noqa: E402
from differad_rl.data.demo import build_demo_pairs  # noqa: E402
from differad_rl.data.records import load_pairs  # noqa: E402
from differad_rl.integrations.verl import compute_score  # noqa: E402
from differad_rl.integrations.verl.data import (  # noqa: E402
    EXTRA_INFO_KEYS,
    ParquetOptions,
    pairs_to_rows,
    write_verl_parquet,
)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return build_demo_pairs(out / "pairs", n_pairs=8, size=64, workers=1, progress=False, normal_fraction=0.25)


@pytest.fixture(scope="module")
def parquet(pairs, tmp_path_factory):
    path = tmp_path_factory.mktemp("pq") / "train.parquet"
    return write_verl_parquet(pairs, path, ParquetOptions(space="qwen2_5_vl", min_pixels=3136, max_pixels=12544), progress=False)


@pytest.fixture(scope="module")
def processor():
    from differad_rl.integrations.qwen_vl.tiny import load_tiny_processor, tiny_model_for

    return load_tiny_processor(tiny_model_for("qwen2_5_vl"))


def _verl_data_config(path):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=[f"data.train_files={path}", "data.max_prompt_length=1024"])
    return cfg.data


def test_rlhf_dataset_loads_two_images_in_order(parquet, pairs, processor):
    from verl.utils.dataset.rl_dataset import RLHFDataset, collate_fn

    records = load_pairs(pairs)
    ds = RLHFDataset(data_files=[str(parquet)], tokenizer=processor.tokenizer, config=_verl_data_config(parquet), processor=processor)
    assert len(ds) == len(records)
    for i in (0, len(ds) - 1):
        row = ds[i]
        system, user = row["raw_prompt"]
        assert system["role"] == "system" and user["role"] == "user"
        kinds = [c["type"] for c in user["content"]]
        assert kinds == ["image", "image", "text"]  # one <image> tag per image, in order
        for c in user["content"][:2]:  # the pixel budget rides with each image to qwen_vl_utils.fetch_image
            assert (c["min_pixels"], c["max_pixels"]) == (3136, 12544)
        ref, tgt = (np.asarray(c["image"].convert("RGB")) for c in user["content"][:2])
        np.testing.assert_array_equal(ref, np.asarray(Image.open(records[i].reference).convert("RGB")))
        np.testing.assert_array_equal(tgt, np.asarray(Image.open(records[i].target).convert("RGB")))
        assert user["content"][2]["text"] in {f"{ins} {prompts.FORMAT_HINTS['reasoning']}" for ins in prompts.INSTRUCTIONS}
        assert system["content"][0]["text"] == prompts.SYSTEM_PROMPT
        assert tuple(row["extra_info"]) == EXTRA_INFO_KEYS
        assert row["extra_info"]["id"] == records[i].id
        assert row["reward_model"]["ground_truth"] == [[float(v) for v in b] for b in records[i].boxes]
    batch = collate_fn([ds[0], ds[1]])
    assert len(batch["raw_prompt"]) == 2 and batch["dummy_tensor"].shape[0] == 2

    # the agent loop's processor step: chat template, then veRL's multimodal processor call
    from verl.utils.tokenizer import build_multimodal_processor_inputs

    messages = ds[0]["raw_prompt"]
    images = [c["image"] for c in messages[1]["content"][:2]]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.count("<|vision_start|>") == 2
    inputs = build_multimodal_processor_inputs(processor, text=[text], images=images)
    grid = inputs["image_grid_thw"]
    assert grid.shape == (2, 3)
    pad_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    merge = processor.image_processor.merge_size
    assert int((inputs["input_ids"][0] == pad_id).sum()) == int(grid.prod(-1).sum()) // merge**2


def test_rows_score_with_compute_score_as_read_back(parquet, pairs):
    """The ground truth and extra_info as veRL reads them back drive compute_score: a completion with the
    ground truth converted to Qwen2.5-VL pixels (by the same processor budget) scores 1."""
    import datasets

    from differad_rl.coords import to_model_space

    ds = datasets.load_dataset("parquet", data_files=str(parquet))["train"]
    records = load_pairs(pairs)
    assert {tuple(r["extra_info"]) for r in ds} == {EXTRA_INFO_KEYS}
    for rec, row in zip(records, ds):
        info, gt = row["extra_info"], row["reward_model"]["ground_truth"]
        if rec.is_normal:
            box = (0, 0, 0, 0)
            assert gt == []
        else:
            box = tuple(
                to_model_space(np.asarray(rec.box, dtype=float), rec.width, rec.height, "qwen2_5_vl", min_pixels=3136, max_pixels=12544)
            )
        text = "<think>.</think><answer>({},{}),({},{})</answer>".format(*[int(v) for v in box])
        out = compute_score(row["data_source"], text, gt, info)
        assert out["format"] == 1.0
        assert out["localization"] > (0.9 if not rec.is_normal else 0.99)
        assert compute_score(row["data_source"], "<think>.</think>", gt, info)["score"] == 0.0


def test_instructions_seeded_and_written_atomically(pairs, tmp_path):
    a = pairs_to_rows(pairs, ParquetOptions(seed=3))
    b = pairs_to_rows(pairs, ParquetOptions(seed=3))
    assert [r["prompt"][1]["content"] for r in a] == [r["prompt"][1]["content"] for r in b]
    assert all(r["prompt"][1]["content"].startswith("<image><image>") for r in a)
    assert all(r["prompt"][1]["content"].count("<image>") == 2 for r in a)
    out = write_verl_parquet(a, tmp_path / "x.parquet", progress=False)
    assert out.exists() and [p.name for p in tmp_path.iterdir()] == ["x.parquet"]  # no temp file left
    with open(out, "rb") as fh:
        assert fh.read(4) == b"PAR1"


def test_errors_name_the_field(pairs, tmp_path):
    with pytest.raises(ValueError, match="space must be one of"):
        ParquetOptions(space="qwen25")
    with pytest.raises(ValueError, match="min_pixels=20000 must be <= max_pixels=100"):
        ParquetOptions(min_pixels=20000, max_pixels=100)
    rec = load_pairs(pairs)[0]
    broken = rec.with_paths(rec.reference, str(tmp_path / "missing.png"))
    with pytest.raises(ValueError, match=r"field 'target' image .*missing\.png"):
        pairs_to_rows([broken])
    with pytest.raises(ValueError, match="no pair records"):
        write_verl_parquet([], tmp_path / "empty.parquet")
    assert not (tmp_path / "empty.parquet").exists()


def test_image_bytes_roundtrip(pairs):
    row = pairs_to_rows(pairs)[0]
    ref = Image.open(io.BytesIO(row["images"][0]["bytes"]))
    rec = load_pairs(pairs)[0]
    np.testing.assert_array_equal(np.asarray(ref), np.asarray(Image.open(rec.reference)))
    assert row["images"][0]["path"] == rec.reference.rsplit("/", 1)[-1]
