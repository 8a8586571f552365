"""Evaluation speed: 100,000 predictions (parse + all metrics + per category) must take ≤ 2 s.

Run with ``pytest benchmarks/bench_eval.py --benchmark-enable``. Side by side in one run:

* ``vectorised`` — :func:`differad_rl.eval.protocol.evaluate_outputs`: one parse pass
  (``parse_boxes_batch``), one coordinate conversion, NumPy IoU/metrics, per category by
  ``np.unique`` inverse + ``np.bincount``;
* ``files`` — :func:`differad_rl.eval.protocol.evaluate` from JSONL files (adds JSON reading and
  record validation);
* ``oracle`` — a plain per-sample Python loop (``parse_box`` per text, scalar IoU, dict counters)
  that is also the correctness check of the vectorised path.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from differad_rl.coords import from_model_space, to_model_space
from differad_rl.eval.protocol import EvalConfig, evaluate, evaluate_outputs
from differad_rl.parsing import parse_box

N = 100_000
CATEGORIES = [f"cat{i:02d}" for i in range(15)]


def _make(n: int = N, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    sizes = np.array([[640, 480], [900, 900], [1024, 768], [320, 320]])
    wh = sizes[rng.integers(0, len(sizes), n)]
    w, h = wh[:, 0].astype(float), wh[:, 1].astype(float)
    normal = rng.random(n) < 0.25
    x1 = rng.random(n) * w * 0.7
    y1 = rng.random(n) * h * 0.7
    x2 = np.minimum(x1 + 5 + rng.random(n) * w * 0.3, w)
    y2 = np.minimum(y1 + 5 + rng.random(n) * h * 0.3, h)
    gt = np.stack([x1, y1, x2, y2], 1).round()
    noisy = gt + rng.normal(0, 15, gt.shape)
    noisy[:, 2:] = np.maximum(noisy[:, 2:], noisy[:, :2] + 1)
    model = np.asarray(to_model_space(noisy, w, h, "qwen2_5_vl")).astype(int)
    kind = rng.random(n)
    outputs = []
    for i in range(n):
        b = model[i]
        if kind[i] < 0.05:
            outputs.append("<think>unsure</think><answer>no idea</answer>")
        elif normal[i] and kind[i] < 0.8:
            outputs.append("<think>both look the same</think>\n<answer>(0,0),(0,0)</answer>")
        else:
            outputs.append(
                f"<think>the region differs in texture</think>\n<answer>({b[0]},{b[1]}),({b[2]},{b[3]})</answer>"
            )
    gt_boxes = [[] if normal[i] else [gt[i].tolist()] for i in range(n)]
    cats = np.asarray(CATEGORIES)[rng.integers(0, len(CATEGORIES), n)]
    return {"outputs": outputs, "gt": gt_boxes, "w": w, "h": h, "cats": cats}


@pytest.fixture(scope="module")
def data() -> dict:
    return _make()


CFG = EvalConfig(family="qwen2_5_vl", reasoning=True)


def _oracle_parse(d: dict) -> list[tuple[float, float, float, float] | None]:
    """Per-sample parse + conversion to original pixels (scale per image size from the core)."""
    scales: dict[tuple[float, float], tuple[float, float]] = {}
    out: list[tuple[float, float, float, float] | None] = []
    for text, w, h in zip(d["outputs"], d["w"], d["h"], strict=True):
        box = parse_box(text, require_answer=True)
        if box is not None:
            if (w, h) not in scales:
                unit = from_model_space(np.array([[1.0, 1.0, 1.0, 1.0]]), w, h, "qwen2_5_vl")[0]
                scales[(w, h)] = (float(unit[0]), float(unit[1]))
            sx, sy = scales[(w, h)]
            box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
        out.append(box)
    return out


def _oracle(d: dict, boxes: list | None = None) -> dict:
    """Per-sample loop, written straight from docs/method.md §8 (the slow reference)."""
    boxes = _oracle_parse(d) if boxes is None else boxes
    stats: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0, 0, 0, 0])
    for box, gts, cat in zip(boxes, d["gt"], d["cats"], strict=True):
        has_box = box is not None and any(box)
        if not gts:
            iou = 1.0 if box is not None and not any(box) else 0.0
        elif not has_box or box[2] <= box[0] or box[3] <= box[1]:
            iou = 0.0
        else:
            iou = 0.0
            for g in gts:
                iw = max(0.0, min(box[2], g[2]) - max(box[0], g[0]))
                ih = max(0.0, min(box[3], g[3]) - max(box[1], g[1]))
                inter = iw * ih
                union = (box[2] - box[0]) * (box[3] - box[1]) + (g[2] - g[0]) * (g[3] - g[1]) - inter
                iou = max(iou, inter / union if union > 0 else 0.0)
        hit = bool(gts) and iou >= 0.3
        s = stats[str(cat)]
        s[0] += 1
        s[1] += iou
        s[2] += iou >= 0.3
        s[3] += hit
        s[4] += has_box and (not gts or not hit)
        s[5] += bool(gts) and not hit
    out = {}
    for cat, (n, iou_sum, correct, tp, fp, fn) in stats.items():
        den = 2 * tp + fp + fn
        out[cat] = {"miou": iou_sum / n, "acc": correct / n, "f1": 2 * tp / den if den else math.nan}
    return out


def _vectorised(d: dict) -> dict:
    return evaluate_outputs(d["outputs"], d["gt"], d["w"], d["h"], d["cats"], config=CFG)[0]


def test_vectorised_matches_oracle():
    d = _make(3000, seed=1)
    got = _vectorised(d)["per_category"]
    want = _oracle(d)
    assert set(got) == set(want)
    for cat, m in want.items():
        for k in ("miou", "acc", "f1"):
            assert got[cat][k] == pytest.approx(m[k], abs=1e-9), (cat, k)


@pytest.mark.benchmark(group="eval-100k")
def test_bench_vectorised_100k(benchmark, data):
    metrics = benchmark.pedantic(_vectorised, args=(data,), rounds=5, iterations=1, warmup_rounds=1)
    assert metrics["overall"]["n"] == N and len(metrics["per_category"]) == len(CATEGORIES)


@pytest.fixture(scope="module")
def files(data, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bench_eval")
    gt_lines, pred_lines = [], []
    for i in range(N):
        rid = f"{data['cats'][i]}/x/{i:06d}"
        gt_lines.append(
            json.dumps(
                {
                    "id": rid,
                    "reference": "r.png",
                    "target": "t.png",
                    "boxes": data["gt"][i],
                    "width": int(data["w"][i]),
                    "height": int(data["h"][i]),
                    "category": str(data["cats"][i]),
                }
            )
        )
        pred_lines.append(json.dumps({"id": rid, "output": data["outputs"][i]}))
    gt, pred = root / "pairs.jsonl", root / "preds.jsonl"
    gt.write_text("\n".join(gt_lines) + "\n")
    pred.write_text("\n".join(pred_lines) + "\n")
    return pred, gt


@pytest.mark.benchmark(group="eval-100k")
def test_bench_files_100k(benchmark, files):
    pred, gt = files
    res = benchmark.pedantic(evaluate, args=(pred, gt), kwargs={"config": CFG}, rounds=1, iterations=1)
    assert res.metrics["overall"]["n"] == N


@pytest.mark.benchmark(group="eval-100k")
def test_bench_oracle_100k(benchmark, data):
    out = benchmark.pedantic(_oracle, args=(data,), rounds=1, iterations=1)
    assert len(out) == len(CATEGORIES)


@pytest.fixture(scope="module")
def parsed(data) -> tuple[list, np.ndarray]:
    boxes = _oracle_parse(data)
    arr = np.array([b if b is not None else [np.nan] * 4 for b in boxes], dtype=np.float64)
    return boxes, arr


@pytest.mark.benchmark(group="metrics-only-100k")
def test_bench_metrics_vectorised_100k(benchmark, data, parsed):
    from differad_rl.eval.metrics import localization_metrics

    _, arr = parsed
    m = benchmark.pedantic(
        localization_metrics, args=(arr, None, data["gt"], data["cats"]), rounds=5, iterations=1, warmup_rounds=1
    )
    want = _oracle(data, parsed[0])
    assert m["per_category"]["cat00"]["miou"] == pytest.approx(want["cat00"]["miou"])


@pytest.mark.benchmark(group="metrics-only-100k")
def test_bench_metrics_oracle_100k(benchmark, data, parsed):
    out = benchmark.pedantic(_oracle, args=(data, parsed[0]), rounds=2, iterations=1)
    assert len(out) == len(CATEGORIES)
