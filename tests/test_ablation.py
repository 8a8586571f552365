"""The ablation example (examples/ablation): a --quick end-to-end run plus unit checks of its parts.

The quick run checks only that the pipeline works (files written, budgets consumed, metrics in
range); the study's claims are checked by the full run whose results are committed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABLATION = os.path.join(ROOT, "examples", "ablation")
sys.path.insert(0, ABLATION)

from policy import Actions, BoxPolicy, log_prob, sample_actions, to_boxes  # noqa: E402
from differad_rl.rewards import DCLRConfig, localization_scores  # noqa: E402
from reward_kinds import REWARD_KINDS, iou_area_penalty_scores, score  # noqa: E402
from signal_density import DensityConfig, _pair_resolution, _rowwise_spearman, run_density  # noqa: E402
from size_bias import ANSWERS, canonical_rewards  # noqa: E402
from training import _PromptStream  # noqa: E402

from arms import Arm  # noqa: E402
from training import TrainConfig  # noqa: E402


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, os.path.join(ABLATION, "run.py"), "--quick", "--out", str(out),
         "--data-dir", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=150,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("density.md", "density.png", "size_bias.md", "ablation.md", "curves.png", "runs.json"):
        assert (out / name).stat().st_size > 0
    runs = json.loads((out / "runs.json").read_text())["runs"]
    assert {r["arm"] for r in runs} >= {
        "grpo_iou", "grpo_dclr", "full", "dclr_dapo", "grpo_dclr_sides", "full_sides_enc", "iou_w", "iou_dapo"
    }
    table = (out / "ablation.md").read_text()
    assert "GRPO + IoU" in table and "full" in table and "DCLR-sides" in table
    assert "DCLR-sides" in (out / "size_bias.md").read_text() and "DCLR-sides" in (out / "density.md").read_text()
    with open(out / "curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_area_penalty_formula_and_zero_box_rule():
    gt = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 10, 10]])
    pred = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 20], [0, 0, 0, 0], [0, 0, 5, 5], [50, 50, 60, 60]])
    valid = torch.ones(5, dtype=torch.bool)
    r = iou_area_penalty_scores(pred, valid, gt)
    # exact: 1; double area: IoU 0.5 - 0.5 * 1 = 0 (clipped); normal+zero box: 1; normal+box: 0; miss: 0
    assert torch.allclose(r, torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0], dtype=r.dtype), atol=1e-6)
    r2 = iou_area_penalty_scores(torch.tensor([[0.0, 0, 10, 12]]), valid[:1], gt[:1])
    expected = (100 / 120) - 0.5 * 0.2
    assert abs(float(r2[0]) - expected) < 1e-5


def test_unknown_reward_kind_raises():
    with pytest.raises(ValueError, match="kind"):
        score("giou", torch.zeros(1, 4), torch.ones(1, dtype=torch.bool), torch.zeros(1, 4))


@settings(max_examples=20, deadline=None)
@given(st.lists(st.floats(-6, 6), min_size=4, max_size=4), st.floats(10, 500), st.floats(10, 500))
def test_policy_boxes_are_ordered_and_inside(z, w, h):
    zt = torch.tensor([z], dtype=torch.float64)
    b = to_boxes(zt, torch.tensor([False]), torch.tensor([w]), torch.tensor([h]))[0]
    assert b[2] > b[0] and b[3] > b[1]
    wt, ht = float(torch.tensor(w)), float(torch.tensor(h))  # the sizes as the float32 tensors hold them
    assert 0 <= b[0] and b[2] <= wt * (1 + 1e-6) and 0 <= b[1] and b[3] <= ht * (1 + 1e-6)


def test_policy_normal_answer_is_zero_box_and_log_prob_matches_torch():
    torch.manual_seed(0)
    pol = BoxPolicy(width=4, res=32)
    x = torch.rand(3, 9, 32, 32)
    mu, ls, nl = pol(x)
    acts = sample_actions(mu, ls, nl, 4, torch.Generator().manual_seed(1))
    assert acts.z.shape == (12, 4) and acts.normal.shape == (12,)
    lp = log_prob(mu, ls, nl, acts, 4)
    i = 5
    bern = torch.distributions.Bernoulli(logits=nl[i // 4]).log_prob(acts.normal[i].float())
    gauss = torch.distributions.Normal(mu[i // 4], ls.exp()).log_prob(acts.z[i]).sum()
    expect = bern + (0.0 if acts.normal[i] else gauss)
    assert torch.allclose(lp[i], expect, atol=1e-5)
    forced = Actions(z=acts.z.clone(), normal=torch.ones(12, dtype=torch.bool))
    boxes = to_boxes(forced.z, forced.normal, torch.full((12,), 100.0), torch.full((12,), 100.0))
    assert (boxes == 0).all()


def test_prompt_stream_covers_every_prompt_each_pass():
    s = _PromptStream(10, torch.Generator().manual_seed(0))
    a = s.next(7)
    b = s.next(3)
    assert sorted(torch.cat([a, b]).tolist()) == list(range(10))


def test_spearman_and_pair_resolution():
    x = np.array([[1.0, 2, 3, 4], [1, 1, 1, 1], [4, 3, 2, 1]])
    y = np.array([[1.0, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])
    assert np.allclose(_rowwise_spearman(x, y), [1.0, 0.0, -1.0])
    assert np.allclose(_pair_resolution(np.array([[0.0, 0, 0, 0], [0, 0, 0, 1.0]])), [0.0, 0.5])


def test_density_enclosing_keeps_position_signal_where_iou_loses_it():
    rows = run_density(DensityConfig(sides=(0.03,), offsets=(0.15,), groups=300, seed=1))
    by = {r["kind"]: r for r in rows}
    assert set(by) == set(REWARD_KINDS)
    assert by["dclr_enclosing"]["position_signal"] > 0.99
    assert by["iou"]["signal"] < 0.5  # far misses on a tiny defect: mostly all-zero IoU groups
    assert by["dclr_enclosing"]["position_rho"] > by["dclr"]["position_rho"] > by["iou_area_penalty"]["position_rho"] - 0.05


def test_configs_validate():
    with pytest.raises(ValueError, match="budget"):
        TrainConfig(budget=0)
    with pytest.raises(ValueError, match="reward"):
        Arm("x", "x", "giou")
    with pytest.raises(ValueError, match="dapo"):
        Arm("x", "x", "dclr", resample_rounds=1, dapo=True)
    with pytest.raises(ValueError, match="groups"):
        DensityConfig(groups=0)


def test_canonical_answers_exact_is_perfect_and_misses_get_no_iou():
    rows = canonical_rewards(sides=(0.05,))
    by = {r["answer"]: r for r in rows}
    assert set(by) == set(ANSWERS)
    for kind in REWARD_KINDS:
        assert abs(by["exact"][kind] - 1.0) < 1e-6
    assert by["near miss"]["iou"] == 0.0 and by["far miss"]["iou"] == 0.0
    assert by["near miss"]["dclr_enclosing"] > by["near miss"]["dclr"] > 0.0
    assert abs(by["4:1 strip, same centre & area"]["iou"] - 1 / 3) < 1e-6


def test_sides_kinds_are_the_core_sides_config_and_see_shape():
    gt = torch.tensor([[100.0, 100, 140, 140]] * 3)
    # exact box; its 2:1 reshaping with the true centre and area; the same strip, transposed
    pred = torch.tensor([[100.0, 100, 140, 140], [80, 110, 160, 130], [110, 80, 130, 160]])
    valid = torch.ones(3, dtype=torch.bool)
    for kind, norm in (("dclr_sides", "paper"), ("dclr_sides_enclosing", "enclosing")):
        r = score(kind, pred, valid, gt)
        core = localization_scores(pred, valid, gt, kind="dclr", config=DCLRConfig(center_norm=norm, size_term="sides"))
        assert torch.equal(r, core)
        assert abs(float(r[0]) - 1.0) < 1e-6 and float(r[1]) < 0.95 and float(r[2]) < 0.95
    # the paper's area term is blind to the same reshaping: R = 1
    assert torch.allclose(score("dclr", pred, valid, gt), torch.ones(3, dtype=torch.float32), atol=1e-6)


def test_canonical_strips_lose_their_perfect_score_under_sides():
    by = {r["answer"]: r for r in canonical_rewards(sides=(0.05,))}
    strip = by["4:1 strip, same centre & area"]
    assert abs(strip["dclr"] - 1.0) < 1e-6 and abs(strip["dclr_enclosing"] - 1.0) < 1e-6
    # IoU 1/3, s_s = 1 - (1 + 0.5) / 2 = 0.25, S = 0.6 + 0.4 * 0.25 = 0.7, R = 1/3 + 2/3 * 0.7 = 0.8
    assert abs(strip["dclr_sides"] - 0.8) < 1e-6
    assert by["full-width strip, same area"]["dclr_sides"] < by["full-width strip, same area"]["dclr"] - 0.3


def test_reward_iou_alignment_iou_agrees_with_itself(tmp_path):
    from alignment import alignment_markdown, reward_iou_alignment
    from cold_start import ColdStartConfig
    from pairs import load_demo_splits

    train, _, _ = load_demo_splits(str(tmp_path / "demo"), n_pairs=32, size=64, seed=0, res=32)
    out = reward_iou_alignment(train, 0, TrainConfig(width=4), ColdStartConfig(steps=2), ("iou", "dclr_sides"))
    assert out["iou"]["overlap_share"] > 0
    assert abs(out["iou"]["rho_overlap"] - 1.0) < 1e-9  # IoU ranks groups exactly as IoU does
    assert -1.0 <= out["dclr_sides"]["rho_all"] <= 1.0
    assert "DCLR-sides" in alignment_markdown([out])


def test_quick_run_never_writes_over_published_results(capsys):
    import run

    results = os.path.join(ABLATION, "results")
    before = {n: os.path.getmtime(os.path.join(results, n)) for n in os.listdir(results)
              if os.path.isfile(os.path.join(results, n))}
    assert run.main(["--quick", "--out", results]) == 2
    assert "published results" in capsys.readouterr().err
    assert before == {n: os.path.getmtime(os.path.join(results, n)) for n in before}
    assert os.path.realpath(run.QUICK_OUT) != os.path.realpath(results)
    assert not os.path.realpath(run.QUICK_OUT).startswith(os.path.realpath(ABLATION))
