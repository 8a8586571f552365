"""Protocol metrics while training: REAL TRL 1.16 GRPOTrainer, tiny offline Qwen2.5-VL.

The logged ``eval_differad/*`` values must equal a separate ``predict_records`` + ``evaluate`` (the
``differad-rl predict`` / ``eval`` path) of the same weights; bad eval datasets fail at start-up.
Run as a script under ``torch.distributed.run`` this file is also the two-process worker.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("trl")

from differad_rl.eval.protocol import evaluate  # noqa: E402
from differad_rl.integrations.qwen_vl.predict import PredictConfig, predict_records  # noqa: E402
from differad_rl.integrations.qwen_vl.tiny import load_tiny_qwen_vl, tiny_model_for  # noqa: E402
from differad_rl.integrations.trl import differad_rewards, pairs_to_rows, to_trl_dataset  # noqa: E402
from differad_rl.integrations.trl.config import DifferADGRPOConfig  # noqa: E402
from differad_rl.integrations.trl.evaluation import (  # noqa: E402
    protocol_log_metrics,
    records_from_rows,
    score_lines,
)
from differad_rl.integrations.trl.trainer import DifferADGRPOTrainer  # noqa: E402
from differad_rl.data.records import load_pairs  # noqa: E402

from tests.trl_mp_worker import write_rank_result  # noqa: E402

MAX_NEW = 6
SIZES = [(64, 64), (90, 60), (56, 112), (80, 80)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_pairs(d: Path, n: int = 4) -> Path:
    """``n`` pairs of different sizes (batches pad), every other one normal."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        for part in "rt":
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{i}{part}.png")
        rows.append({"id": f"c{i % 2}/{i}", "reference": str(d / f"{i}r.png"), "target": str(d / f"{i}t.png"),
                     "boxes": [[4, 4, 30, 28]] if i % 2 else [], "width": w, "height": h,
                     "category": f"c{i % 2}", "split": "test"})
    (d / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "pairs.jsonl"


def build_trainer(model_path: Any, pairs: Path, out: Path, eval_dataset: Any = "pairs", **config: Any):
    model, processor = load_tiny_qwen_vl(model_path)
    values: dict[str, Any] = {
        "output_dir": str(out), "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4,
        "num_generations": 2, "max_completion_length": MAX_NEW, "max_steps": 2, "logging_steps": 1,
        "eval_strategy": "steps", "eval_steps": 1, "use_cpu": True, "bf16": False, "report_to": [],
        "save_strategy": "no", "seed": 0, "disable_tqdm": True, "protocol_eval_batch_size": 3,
    }
    values.update(config)
    return DifferADGRPOTrainer(
        model=model, processing_class=processor, args=DifferADGRPOConfig(**values),
        reward_funcs=differad_rewards(processor), train_dataset=to_trl_dataset(pairs),
        eval_dataset=to_trl_dataset(pairs) if isinstance(eval_dataset, str) else eval_dataset,
    )


def separate_predict_eval(trainer: Any, pairs: Path, out: Path) -> tuple[dict[str, float], list[dict]]:
    """``differad-rl predict`` + ``eval`` of the trainer's current weights (the package's own path)."""
    preds = out / "preds.jsonl"
    if preds.exists():
        preds.unlink()
    res = predict_records(trainer.model, trainer.processing_class, load_pairs(pairs), preds, model_name="m",
                          config=PredictConfig(batch_size=3, max_new_tokens=MAX_NEW), progress=False,
                          keep_lines=True)
    result = evaluate(preds, pairs, reasoning=True)
    return protocol_log_metrics(result), res.lines


@pytest.fixture(scope="module")
def model_path():
    return tiny_model_for("qwen2_5_vl")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("pairs"))


# ------------------------------------------------------------------------------------------ in training
def test_eval_steps_log_protocol_metrics_equal_to_predict_and_eval(model_path, pairs, tmp_path):
    from transformers import TrainerCallback

    checks: list[tuple[int, dict, dict, list, list]] = []

    class Separately(TrainerCallback):
        """At every evaluation, on the very weights just evaluated: predict + eval separately."""

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            mine = {k[len("eval_"):]: v for k, v in metrics.items() if k.startswith("eval_differad/")}
            ref, lines = separate_predict_eval(trainer, pairs, tmp_path)
            checks.append((state.global_step, mine, ref, list(trainer._protocol_eval.last_lines), lines))

    trainer = build_trainer(model_path, pairs, tmp_path / "run")
    trainer.add_callback(Separately())
    trainer.train()

    logged = [e for e in trainer.state.log_history if "eval_differad/miou" in e]
    assert [e["step"] for e in logged] == [1, 2]  # every eval_steps (=1) of max_steps=2
    for entry in logged:  # TRL's own eval path still runs and lands in the same log entry
        assert "eval_loss" in entry and "eval_reward" in entry
        for key in ("miou", "acc@0.3", "f1@0.3", "invalid_rate", "anomalous/miou", "normal/acc@0.3"):
            assert math.isfinite(entry[f"eval_differad/{key}"]), key
        assert entry["eval_differad/n"] == 4
    assert [c[0] for c in checks] == [1, 2]
    for _, mine, ref, got_lines, ref_lines in checks:
        assert mine == ref  # exactly, every key
        assert [ln["output"] for ln in got_lines] == [ln["output"] for ln in ref_lines]
        assert [ln["input_size"] for ln in got_lines] == [ln["input_size"] for ln in ref_lines]


def test_manual_evaluate_and_dict_of_datasets(model_path, pairs, tmp_path):
    ds = to_trl_dataset(pairs)
    rows = pairs_to_rows(pairs, load_images=False)  # a plain list of rows with image paths works too
    trainer = build_trainer(model_path, pairs, tmp_path / "run", eval_dataset={"held": ds, "rows": rows},
                            eval_strategy="no")
    metrics = trainer.evaluate()
    ref, _ = separate_predict_eval(trainer, pairs, tmp_path)
    for name in ("held", "rows"):
        assert {k[len(f"eval_{name}_"):]: v for k, v in metrics.items() if k.startswith(f"eval_{name}_differad/")} == ref
        assert f"eval_{name}_loss" in metrics
    # TRL's predict() path is untouched: no protocol metrics there
    assert not any("differad/" in k for k in trainer.predict(ds).metrics)


def test_scoring_is_the_eval_protocol_on_real_boxes(model_path, pairs, tmp_path):
    """Hand-written outputs with real boxes: score_lines == differad-rl eval on the same file."""
    records = load_pairs(pairs)
    lines = []
    for i, r in enumerate(records):
        box = "(0,0),(0,0)" if i == 0 else ("(4,4),(30,28)" if i % 2 else "(10,10),(20,20)")
        out = f"<think>x</think><answer>{box}</answer>" if i != 2 else "no box"
        lines.append({"id": r.id, "output": out, "family": "qwen2_5_vl", "space": "qwen2_5_vl",
                      "image_size": [r.width, r.height], "input_size": [r.width, r.height]})
    mine = protocol_log_metrics(score_lines(lines, records))
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert mine == protocol_log_metrics(evaluate(path, pairs, reasoning=True))
    assert mine["differad/miou"] == pytest.approx(0.75)  # normal right, two exact boxes, one invalid
    assert mine["differad/invalid_rate"] == pytest.approx(0.25)
    assert mine["differad/anomalous/acc@0.3"] == 1.0 and mine["differad/f1@0.3"] == 1.0
    assert "differad/normal/miou" in mine and mine["differad/normal/miou"] == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------ start-up errors
def test_bad_eval_dataset_raises_at_start_up_naming_the_field(model_path, pairs, tmp_path):
    from datasets import Dataset

    in_memory = pairs_to_rows(pairs, load_images=True)  # PIL images, no files
    with pytest.raises(ValueError, match=r"row 'c0/0'.*'images'.*in-memory"):
        build_trainer(model_path, pairs, tmp_path / "a", eval_dataset=in_memory)
    no_size = Dataset.from_list([{k: v for k, v in r.items() if k != "image_size"}
                                 for r in pairs_to_rows(pairs, load_images=False)])
    with pytest.raises(ValueError, match=r"'image_size'.*protocol_eval"):
        build_trainer(model_path, pairs, tmp_path / "b", eval_dataset=no_size, protocol_eval=True)
    wrong = pairs_to_rows(pairs, load_images=False, validate=False)
    wrong[1]["image_size"] = [10, 10]
    with pytest.raises(ValueError, match=r"c1/1.*(outside|size)"):
        build_trainer(model_path, pairs, tmp_path / "c", eval_dataset=wrong)
    with pytest.raises(ValueError, match="protocol_eval=True needs an eval_dataset"):
        build_trainer(model_path, pairs, tmp_path / "d", eval_dataset=None, eval_strategy="no", protocol_eval=True)
    for field, value in (("protocol_eval", "yes"), ("protocol_eval_batch_size", 0),
                         ("protocol_eval_max_new_tokens", 0), ("protocol_eval_prompt", "plain")):
        with pytest.raises(ValueError, match=field):
            DifferADGRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], **{field: value})


def test_auto_mode_leaves_other_eval_sets_to_trl(model_path, pairs, tmp_path):
    """Auto (default): an eval set that is not pair rows gets TRL's eval only; False turns ours off."""
    from datasets import Dataset

    text = Dataset.from_list([{"prompt": [{"role": "user", "content": "hi"}], "solution": [0.0, 0.0, 0.0, 0.0],
                               "image_size": [64, 64]}] * 2)
    trainer = build_trainer(model_path, pairs, tmp_path / "a", eval_dataset=text, eval_strategy="no")
    assert not trainer._protocol_eval.enabled
    off = build_trainer(model_path, pairs, tmp_path / "b", eval_strategy="no", protocol_eval=False)
    assert not off._protocol_eval.enabled
    assert not any("differad/" in k for k in off.evaluate())
    records = records_from_rows(to_trl_dataset(pairs))
    assert [(r.id, r.boxes, r.width) for r in records] == [(r.id, r.boxes, r.width) for r in load_pairs(pairs)]


# ------------------------------------------------------------------------------------------ two processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_process(model_path, tmp_path):
    """2 gloo ranks: each predicts its shard, the gathered lines are scored on every rank — identical
    metrics on both ranks, equal to one process on the same weights; eval_steps inside train() too."""
    pairs = write_pairs(tmp_path / "pairs", n=6)  # 3 per rank = one batch of 3 each: same batches as 1 process
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), __file__, str(tmp_path), str(model_path), str(pairs)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["before"] == ranks[1]["before"] and ranks[0]["lines"] == ranks[1]["lines"]
    assert ranks[0]["after"] == ranks[1]["after"]
    assert [e["step"] for e in ranks[0]["logged"]] == [1]

    trainer = build_trainer(model_path, pairs, tmp_path / "single", eval_strategy="no")
    ref, lines = separate_predict_eval(trainer, pairs, tmp_path)
    assert ranks[0]["before"] == ref
    assert [ln["output"] for ln in ranks[0]["lines"]] == [ln["output"] for ln in lines]


def _worker(argv: list[str]) -> int:
    out, model_path, pairs = Path(argv[1]), argv[2], Path(argv[3])
    from accelerate import PartialState

    state = PartialState(cpu=True)
    torch.set_num_threads(1)
    trainer = build_trainer(model_path, pairs, out / "trainer", max_steps=1, per_device_train_batch_size=2,
                            per_device_eval_batch_size=2)
    before = trainer.evaluate()
    lines = trainer._protocol_eval.last_lines
    trainer.train()
    logged = [e for e in trainer.state.log_history if "eval_differad/miou" in e]
    after = trainer._protocol_eval.last_result.metrics["overall"]
    result = {"before": {k[len("eval_"):]: v for k, v in before.items() if k.startswith("eval_differad/")},
              "lines": lines, "after": after, "logged": logged}
    write_rank_result(out, state.process_index, result)
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv))
