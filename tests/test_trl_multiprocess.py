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

from differad_rl.integrations.tiny_qwen_vl import tiny_model_for  # noqa: E402
from differad_rl.integrations.trl.trainer import DifferADGRPOTrainer  # noqa: E402

from tests.trl_mp_worker import G, ScriptedReward, make_prompt_rows, make_trainer, mp_kinds, run_scripted_step  # noqa: E402

WORKER = Path(__file__).with_name("trl_mp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    model_path = tiny_model_for("qwen2_5_vl")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent.parent)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), str(WORKER), str(tmp_path), str(model_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]

    rows = make_prompt_rows(mp_kinds())
    single = run_scripted_step(
        make_trainer(DifferADGRPOTrainer, model_path, [ScriptedReward(True), ScriptedReward(False)], rows,
                     per_device_batch=len(rows) * G, output_dir=tmp_path / "single", difficulty_weighting=True,
                     resample_rounds=2, localization_reward="scripted_loc_reward"),
        rows, rank=0, world=1,
    )
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
