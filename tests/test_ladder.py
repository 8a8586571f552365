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


@pytest.fixture(scope="module")
def ladder():
    sys.path.insert(0, str(LADDER))
    try:
        yield importlib.import_module("ladder")
    finally:
        sys.path.remove(str(LADDER))


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
