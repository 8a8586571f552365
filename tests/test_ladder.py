"""examples/ladder/ladder.py: the rung pairs hold what they claim, the best constant box is the best of its
candidates, and the sin/cos lever writes a position code into the vision tower's embedding."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("trl")

ROOT = Path(__file__).resolve().parents[1]
LADDER = ROOT / "examples" / "ladder"


def _ladder_module(name: str):
    """Import ``examples/ladder/<name>.py`` (the folder is on ``sys.path`` only while importing)."""
    sys.path.insert(0, str(LADDER))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(LADDER))


@pytest.fixture(scope="module")
def ladder():
    return _ladder_module("ladder")


@pytest.mark.parametrize("rung", ["r1", "r2", "r3"])
def test_square_pairs_put_one_square_in_the_target_only(ladder, tmp_path, rung):
    from PIL import Image

    recs = ladder.square_pairs(tmp_path / rung, rung, n=6, seed=3, split="test", size=64, square=(8, 20))
    assert [r.split for r in recs] == ["test"] * 6 and len({r.id for r in recs}) == 6
    for r in recs:
        x1, y1, x2, y2 = r.box
        assert 8 <= x2 - x1 == y2 - y1 <= 20
        ref = np.asarray(Image.open(r.reference).convert("RGB"), dtype=np.int16)
        tgt = np.asarray(Image.open(r.target).convert("RGB"), dtype=np.int16)
        changed = np.abs(ref - tgt).max(axis=2) > 0
        if rung == "r1":
            assert not ref.any()  # the same black reference for every pair
        else:  # the target differs from the reference exactly inside the box (high contrast)
            inside = np.zeros_like(changed)
            inside[y1:y2, x1:x2] = True
            assert not changed[~inside].any() and changed[inside].mean() > 0.9
    again = ladder.square_pairs(tmp_path / rung, rung, n=6, seed=3, split="test", size=64, square=(8, 20))
    assert [r.box for r in again] == [r.box for r in recs]


@pytest.mark.parametrize("background", ["random", "grey", "dark-white", "grey-bw"])
def test_backgrounds_fix_or_vary_the_two_colours_as_documented(ladder, tmp_path, background):
    """The two factors between ``grey`` (passes) and ``random`` (fails): is the background's colour fixed,
    is the square's? Each background varies exactly the ones it says."""
    from PIL import Image

    recs = ladder.square_pairs(tmp_path / background, "r2", n=12, seed=1, split="train", size=64, square=(8, 20),
                               background=background)
    bgs, sqs = [], []
    for r in recs:
        x1, y1, x2, y2 = r.box
        tgt = np.asarray(Image.open(r.target).convert("RGB"), dtype=np.float64) / 255
        bgs.append(tgt[0, 0] if (x1, y1) != (0, 0) else tgt[-1, -1])
        sqs.append(tgt[(y1 + y2) // 2, (x1 + x2) // 2])
        assert np.abs(sqs[-1] - bgs[-1]).max() > 0.25  # high contrast whatever the colours
    bg_varies = np.ptp(np.array(bgs), axis=0).max() > 0.1
    sq_varies = np.ptp(np.array(sqs), axis=0).max() > 0.1
    assert (bg_varies, sq_varies) == {"random": (True, True), "grey": (False, False),
                                      "dark-white": (True, False), "grey-bw": (False, True)}[background]
    if background == "dark-white":
        assert np.array(bgs).max() <= 0.6 + 1 / 255 and np.allclose(sqs, 1.0)


def test_best_constant_box_beats_the_mean_box_on_its_training_pairs(ladder, tmp_path):
    from differad_rl.eval.comparison import mean_relative_box
    from differad_rl.eval.metrics import sample_ious

    recs = ladder.square_pairs(tmp_path / "r2", "r2", n=40, seed=0, split="train", size=64, square=(8, 30))
    best = ladder.best_constant_box(recs)
    size = np.array([[r.width, r.height, r.width, r.height] for r in recs], dtype=np.float64)
    gts = [r.boxes for r in recs]

    def score(rel):
        return sample_ious(rel[None] * size, None, gts).mean()

    assert best.shape == (4,) and (0 <= best).all() and (best <= 1).all()
    assert score(best) >= score(mean_relative_box(recs)) - 1e-12
    assert score(best) >= max(score(np.asarray(r.box, float) / 64) for r in recs[:10]) - 1e-12


def test_sincos_positions_code_rows_and_columns(ladder):
    import torch

    emb = torch.nn.Embedding(64, 32)
    model = type("M", (), {})()
    model.model = type("I", (), {})()
    model.model.visual = type("V", (), {"pos_embed": emb})()
    ladder.sincos_positions(model, 2.0)
    w = emb.weight.detach().numpy().reshape(8, 8, 32)
    assert np.abs(w).max() <= 2.0 + 1e-6
    assert np.allclose(w[:, 0, :16], w[:, 5, :16])  # the first half codes the row only
    assert np.allclose(w[0, :, 16:], w[5, :, 16:])  # the second half the column only
    flat = w.reshape(64, 32)
    assert len({tuple(np.round(r, 5)) for r in flat}) == 64  # every cell has its own code


def test_square_cells_match_a_pixel_raster(ladder):
    from differad_rl.data.records import PairRecord

    rng = np.random.default_rng(0)
    for _ in range(200):
        size, grid = 128, int(rng.choice([2, 4, 6]))
        s = int(rng.integers(1, 60))
        x1, y1 = (int(v) for v in rng.integers(0, size - s + 1, size=2))
        rec = PairRecord(id="a", reference="r.png", target="t.png", boxes=[[x1, y1, x1 + s, y1 + s]], width=size,
                         height=size, category="plain")
        mask = np.zeros((size, size), bool)
        mask[y1:y1 + s, x1:x1 + s] = True
        cell = size / grid
        want = [mask[int(r * cell):int((r + 1) * cell), int(c * cell):int((c + 1) * cell)].any()
                for r in range(grid) for c in range(grid)] if size % grid == 0 else None
        got = ladder.square_cells(rec, grid, grid)
        assert got.shape == (grid * grid,) and got.any()
        if want is not None:
            assert got.tolist() == want


def test_square_attention_splits_each_heads_target_attention(ladder, tmp_path):
    from differad_rl.integrations.qwen_vl.loading import load_model_and_processor
    from differad_rl.integrations.qwen_vl.tiny import tiny_model_for

    recs = ladder.square_pairs(tmp_path / "r1", "r1", n=3, seed=0, split="test", size=128, square=(16, 40))
    model, processor = load_model_and_processor(str(tiny_model_for("qwen3_vl", min_pixels=128 * 128,
                                                                  max_pixels=128 * 128)))
    att = ladder.square_attention(model, processor, recs)
    share, mass = np.array(att["share"]), np.array(att["target_mass"])
    layers = model.config.text_config.num_hidden_layers
    assert share.shape == mass.shape and share.shape[0] == layers
    assert ((0 <= share) & (share <= 1)).all() and ((0 < mass) & (mass <= 1 + 1e-9)).all()
    assert att["chance"] == pytest.approx(np.mean([ladder.square_cells(r, 4, 4).mean() for r in recs]))
    maps = att["maps"]  # the best head's attention over the 4 × 4 target grid, normalised per record
    assert maps.shape == (3, 4, 4) and np.allclose(maps.sum(axis=(1, 2)), 1.0)
    on = [maps[j].ravel()[ladder.square_cells(r, 4, 4)].sum() for j, r in enumerate(recs)]
    assert att["best_share"] == pytest.approx(np.mean(on)) == pytest.approx(share.max())
    hs = ladder.digit_hidden_states(model, processor, recs)
    assert hs.shape == (3, layers + 1, model.config.text_config.hidden_size)
    # the position before the first digit holds the same token, "(", in every answer: equal embeddings,
    # while the layers above it have seen different images
    assert np.allclose(hs[:, 0], hs[0, 0]) and not np.allclose(hs[:, -1], hs[0, -1])


def test_contrast_patches_remove_a_plain_images_colour(ladder):
    import torch
    from PIL import Image

    from differad_rl.integrations.qwen_vl.loading import load_model_and_processor
    from differad_rl.integrations.qwen_vl.tiny import tiny_model_for

    model, processor = load_model_and_processor(str(tiny_model_for("qwen3_vl", min_pixels=128 * 128,
                                                                  max_pixels=128 * 128)))
    imgs = [Image.new("RGB", (128, 128), c) for c in ((200, 30, 30), (20, 90, 160))]
    square = np.full((128, 128, 3), 40, np.uint8)
    square[32:64, 64:96] = 250
    imgs.append(Image.fromarray(square))

    def tokens():
        enc = processor.image_processor(images=imgs, return_tensors="pt")
        with torch.inference_mode():
            out = model.model.get_image_features(enc["pixel_values"], enc["image_grid_thw"]).pooler_output
        return [o.clone() for o in out]

    before = tokens()
    assert not torch.allclose(before[0], before[1], atol=1e-4)  # the colour is in every token
    ladder.contrast_patches(model)
    after = tokens()
    assert torch.allclose(after[0], after[1], atol=1e-5)  # two plain colours: the same tokens
    assert not torch.allclose(after[2], after[0], atol=1e-3)  # the square still shows


@pytest.mark.parametrize("pairs", [False, "slot", "match"])
def test_pretrain_tower_trains_the_tower_only(ladder, tmp_path, pairs):
    import torch

    from differad_rl.integrations.qwen_vl.loading import load_model_and_processor
    from differad_rl.integrations.qwen_vl.tiny import tiny_model_for

    recs = ladder.square_pairs(tmp_path / "r2", "r2", n=10, seed=0, split="train", size=128, square=(16, 40))
    model, processor = load_model_and_processor(str(tiny_model_for("qwen3_vl", min_pixels=128 * 128,
                                                                  max_pixels=128 * 128)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = ladder.pretrain_tower(model, processor, recs[:8], recs[8:], steps=3, batch=4, pairs=pairs)
    assert set(out) >= {"head_miou", "loss_first", "loss_last"} and 0.0 <= out["head_miou"] <= 1.0
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".visual." in k or k.startswith("visual.") for k in changed)
    assert any("patch_embed" in k for k in changed)  # the gradient reaches the first layer of the tower


@pytest.mark.parametrize("nuisance", ["none", "geometric", "photometric"])
def test_r4_factors_keep_the_demo_sets_defects_and_drop_what_they_say(ladder, tmp_path, nuisance):
    """--nuisance / --normal-fraction: the same defects and boxes as R4, minus the named nuisance (and normals)."""
    import json

    from PIL import Image

    base = ["--rung", "r4", "--name", "t", "--n-train", "12", "--n-test", "4", "--data-root", str(tmp_path)]
    full = ladder.rung_data(ladder.parse_args(base), tmp_path)
    split = ladder.rung_data(ladder.parse_args(base + ["--nuisance", nuisance]), tmp_path)
    assert [r.boxes for r in split[0] + split[1]] == [r.boxes for r in full[0] + full[1]]
    params = json.loads(next(tmp_path.glob(f"r4_*_{nuisance}/demo_pairs/manifest.json")).read_text())["params"]
    assert params.get("photometric", True) is (nuisance == "photometric")
    assert (params["max_shift"] == 0) is (nuisance != "geometric")
    for r in split[0]:
        ref = np.asarray(Image.open(r.reference), dtype=np.int16)
        tgt = np.asarray(Image.open(r.target), dtype=np.int16)
        outside = np.ones(ref.shape[:2], dtype=bool)
        for x1, y1, x2, y2 in r.boxes:
            outside[y1:y2, x1:x2] = False
        assert bool(np.abs(ref - tgt)[outside].max() == 0) is (nuisance == "none")
    no_normals = ladder.rung_data(ladder.parse_args(base + ["--normal-fraction", "0", "--defect-kinds", "hole"]),
                                  tmp_path)
    assert {r.defect for r in no_normals[0] + no_normals[1]} == {"hole"}


def test_defect_signal_measures_what_reaches_a_token(tmp_path):
    """examples/ladder/defect_signal.py: clean sets have no signal outside the defect (floor 0), the recipe's
    nuisance puts some there, and a hole changes more of its box than a thin scratch."""
    import json

    defect_signal = _ladder_module("defect_signal")
    out = tmp_path / "out"
    assert defect_signal.main(["--n-pairs", "8", "--data-root", str(tmp_path / "data"), "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert (out / "signal.png").stat().st_size > 0 and "example" not in result["kinds"]["hole"]
    assert set(result["kinds"]) == {"scratch", "stain", "texture", "hole"}
    for kind in result["kinds"].values():
        assert kind["clean"]["token_floor"] == 0 and kind["clean"]["token_signal"] > 0
        assert kind["nuisance"]["token_floor"] > 0.01
    assert result["kinds"]["hole"]["clean"]["box_changed"] > 3 * result["kinds"]["scratch"]["clean"]["box_changed"]
    assert defect_signal.main(["--n-pairs", "8", "--data-root", str(tmp_path / "data"), "--out", str(out)]) == 1


def test_tables_list_every_committed_run_and_skip_other_studies(ladder):
    """``ladder.py --table`` reads every committed run; folders of other studies (``defect_signal``) are skipped."""
    results = LADDER / "results"
    runs = sorted(p.parent.name for p in results.glob("*/results.json") if p.parent.name != "defect_signal")
    table = ladder.results_table(results)
    assert [line.split(" | ")[0][2:] for line in table.splitlines()[2:]] == runs
    assert "defect_signal" not in table and "defect_signal" not in ladder.tower_table(results)
