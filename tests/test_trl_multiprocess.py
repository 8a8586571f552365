"""Two CPU processes (torch.distributed.run, gloo) take the same resampling decisions and produce the
same advantages as one process on the same global batch — REAL TRL, tiny Qwen2.5-VL.

The global batch is 3 groups of 4 over 2 ranks × 6 rows, so group 1 spans both ranks and the ranks
regenerate different numbers of rows (rank 1 pads with filler rows, and regenerates nothing in round 2).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from differad_rl.integrations.qwen_vl.tiny import tiny_model_for  # noqa: E402
from differad_rl.integrations.trl.trainer import DifferADGRPOTrainer  # noqa: E402

from tests.trl_mp_worker import (  # noqa: E402
    G,
    ScriptedReward,
    make_prompt_rows,
    make_trainer,
    mp_kinds,
    mp_server_kinds,
    run_scripted_step,
)

WORKER = Path(__file__).with_name("trl_mp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _launch(tmp_path, model_path, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent.parent)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), str(WORKER), str(tmp_path), str(model_path), *extra,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    return ranks


def _single_process(tmp_path, model_path, kinds=None):
    rows = make_prompt_rows(kinds or mp_kinds())
    return run_scripted_step(
        make_trainer(DifferADGRPOTrainer, model_path, [ScriptedReward(True), ScriptedReward(False)], rows,
                     per_device_batch=len(rows) * G, output_dir=tmp_path / "single", difficulty_weighting=True,
                     resample_rounds=2, localization_reward="scripted_loc_reward"),
        rows, rank=0, world=1,
    )


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    model_path = tiny_model_for("qwen2_5_vl")
    ranks = _launch(tmp_path, model_path)
    single = _single_process(tmp_path, model_path)
    # resampling decisions and statistics: identical on every rank and equal to one process
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    for name, value in single["metrics"].items():
        assert ranks[0]["metrics"][name] == pytest.approx(value, rel=1e-6), name
    m = single["metrics"]
    assert (m["differad/rounds_used"], m["differad/groups_resampled"], m["differad/regenerations"]) == (2, 2, 3)
    # the gathered (spliced) rewards agree everywhere
    for r in ranks:
        torch.testing.assert_close(torch.tensor(r["rewards_per_func"]), torch.tensor(single["rewards_per_func"]))
    # local advantages of rank 0 then rank 1 == the single-process advantages
    both = torch.tensor(ranks[0]["advantages"] + ranks[1]["advantages"])
    torch.testing.assert_close(both, torch.tensor(single["advantages"]))
    # the loss-token count is global: the same on both ranks, the sum of the local counts
    total = ranks[0]["local_loss_tokens"] + ranks[1]["local_loss_tokens"]
    assert ranks[0]["num_items_in_batch"] == ranks[1]["num_items_in_batch"] == total
    # tokens seen: the final batch's, counted once over both ranks; rank 1's filler rows are not counted
    final = ranks[0]["local_tokens"] + ranks[1]["local_tokens"]
    assert ranks[0]["num_tokens"] == ranks[1]["num_tokens"] == final == single["num_tokens"]


@pytest.mark.slow
def test_two_processes_vllm_tensor_parallel_lockstep(tmp_path):
    """The same step through TRL's vLLM colocate path with tensor parallel 2 (fake engine,
    tests/fake_vllm.py). TRL all-gathers the two ranks' prompts in the TP group before every generate and
    slices the outputs by equal sizes: both ranks must call it in every round with the same number of rows
    (filler rows pad rank 1), and the decisions must still equal one process's."""
    model_path = tiny_model_for("qwen2_5_vl")
    ranks = _launch(tmp_path, model_path, "vllm-tp2")
    # one engine call per generation (the batch, then 2 rounds), each with both ranks' rows: 2 × 6, 2 × 6
    # (rank 0 holds 6 rows of groups 0-1, rank 1 2 rows + 4 filler), 2 × 4 (group 0 on rank 0; rank 1 filler)
    assert [len(c) for c in ranks[0]["vllm_calls"]] == [12, 12, 8]
    assert ranks[0]["vllm_calls"] == ranks[1]["vllm_calls"]  # the same gathered prompts on both ranks
    assert ranks[0]["vllm_tokens"] == ranks[1]["vllm_tokens"]  # one TP group, one seed: the same samples
    single = _single_process(tmp_path, model_path)
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    for name, value in single["metrics"].items():
        assert ranks[0]["metrics"][name] == pytest.approx(value, rel=1e-6), name
    for r in ranks:
        torch.testing.assert_close(torch.tensor(r["rewards_per_func"]), torch.tensor(single["rewards_per_func"]))
    torch.testing.assert_close(torch.tensor(ranks[0]["advantages"] + ranks[1]["advantages"]),
                               torch.tensor(single["advantages"]))
    total = ranks[0]["local_loss_tokens"] + ranks[1]["local_loss_tokens"]
    assert ranks[0]["num_items_in_batch"] == ranks[1]["num_items_in_batch"] == total


@pytest.mark.slow
def test_two_processes_vllm_server_rows_keep_their_prompts(tmp_path):
    """The step through TRL's vLLM server path (fake server, tests/fake_vllm.py). The main process
    gathers both ranks' rows, samples G completions for every G-th prompt and hands them out in order; with
    whole groups per rank (the layout ``check_vllm_regeneration`` requires) every final row's completion was
    sampled from that row's own prompt, also for rank 1's filler rounds, and the decisions equal one process's."""
    model_path = tiny_model_for("qwen2_5_vl")
    ranks = _launch(tmp_path, model_path, "vllm-server")
    # the server (rank 0): all 16 rows, then groups 0-1 + rank 1's filler (16 rows), then group 0 + filler (8)
    assert [len(c) for c in ranks[0]["vllm_calls"]] == [16, 16, 8] and ranks[1]["vllm_calls"] == []
    sampled_from = {}
    for prompts, tokens in zip(ranks[0]["vllm_calls"], ranks[0]["vllm_tokens"]):
        for p, t in zip(prompts, tokens):
            sampled_from.setdefault(tuple(t), []).append(p)
    for r in ranks:
        for prompt, completion in zip(r["prompt_rows"], r["completion_rows"]):
            assert prompt in sampled_from[tuple(completion)]  # the row's own prompt produced its completion
    single = _single_process(tmp_path, model_path, mp_server_kinds())
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    for name, value in single["metrics"].items():
        assert ranks[0]["metrics"][name] == pytest.approx(value, rel=1e-6), name
    torch.testing.assert_close(torch.tensor(ranks[0]["advantages"] + ranks[1]["advantages"]),
                               torch.tensor(single["advantages"]))
