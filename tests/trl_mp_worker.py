"""Shared pieces of the TRL trainer tests, and the worker that ``test_trl_multiprocess.py`` launches.

Run as a script under ``torch.distributed.run`` (``--nproc_per_node 2``, CPU, gloo), every rank builds
the same tiny Qwen2.5-VL and a ``DifferADGRPOTrainer``, takes its slice of one fixed global generation
batch and runs one ``_generate_and_score_completions`` with difficulty weights and group resampling on;
each rank writes its local advantages, the gathered rewards and the resampling statistics to
``<out_dir>/rank<r>.json``. The rewards are scripted from the row id and the call number, not from the
sampled text, so a single-process run on the same global batch must give the same numbers.
"""

from __future__ import annotations

import json
import os
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

G = 4  # completions per prompt in these tests

#: prompt kinds of the scripted rewards: "always" stays degenerate, "once" recovers after one regeneration
MP_KINDS = ("always", "once", "easy")


def make_prompt_rows(kinds: list[str], seed: int = 0, size: int = 56) -> list[dict[str, Any]]:
    """One dataset row per prompt: a conversational prompt of varying length, two images, its kind."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, kind in enumerate(kinds):
        images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(2)]
        text = "Find the difference." + " Look closely at the target." * (i % 3)
        rows.append({"prompt": [{"role": "user", "content": text}], "images": images, "kind": kind, "prompt_id": i})
    return rows


def expand_groups(rows: list[dict[str, Any]], group_size: int = G) -> list[dict[str, Any]]:
    """TRL's generation batch: every prompt row repeated ``group_size`` times, plus its global ``row`` id."""
    out = []
    for row in rows:
        for _ in range(group_size):
            out.append({**row, "row": len(out)})
    return out


def _completion_text(completion: Any) -> str:
    return completion if isinstance(completion, str) else completion[0]["content"]


def text_loc_reward(completions: list, kind: list[str], **kwargs: Any) -> list[float]:
    """Localization stand-in: 0 for every completion of a ``"hard"`` / ``"always"`` prompt, else a
    deterministic value of the sampled text (crc32, identical across processes)."""
    return [
        0.0 if k in ("hard", "always") else (zlib.crc32(_completion_text(c).encode()) % 997) / 997.0
        for c, k in zip(completions, kind)
    ]


def text_format_reward(completions: list, **kwargs: Any) -> list[float]:
    """A second reward that differs inside a group even when the localization reward does not."""
    return [float(len(_completion_text(c)) % 3) / 2.0 for c in completions]


class ScriptedReward:
    """Reward of a row id and the call number (0 = first scoring of the step, k = round k).

    ``kind="always"``: localization 0 on every call; ``"once"``: 0 on call 0, then graded; ``"easy"``:
    graded. Graded values: ((row · 7 + call · 3) mod 11) / 10. With ``localization=False`` it is a
    format-like reward ((row + call) mod 3) / 2 that always varies inside a group.
    """

    def __init__(self, localization: bool = True) -> None:
        self.localization = localization
        self.calls = 0
        self.__name__ = "scripted_loc_reward" if localization else "scripted_format_reward"

    def __call__(self, completions: list, kind: list[str], row: list[int], **kwargs: Any) -> list[float]:
        call = self.calls
        self.calls += 1
        if not self.localization:
            return [((r + call) % 3) / 2.0 for r in row]
        out = []
        for k, r in zip(kind, row):
            degenerate = k == "always" or (k == "once" and call == 0)
            out.append(0.0 if degenerate else ((r * 7 + call * 3) % 11) / 10.0)
        return out


def make_trainer(
    trainer_cls: type,
    model_path: str | os.PathLike[str],
    reward_funcs: list,
    train_rows: list[dict[str, Any]],
    per_device_batch: int,
    output_dir: str | os.PathLike[str],
    freeze_vision: bool = False,
    **config: Any,
):
    """A trainer on the tiny model with CPU-friendly settings; ``config`` goes to the config class
    (``freeze_vision``: the vision tower frozen before the trainer is built, as ``--freeze-vision`` does)."""
    from datasets import Dataset

    from differad_rl.integrations.qwen_vl.tiny import load_tiny_qwen_vl
    from differad_rl.integrations.trl.config import DifferADGRPOConfig

    model, processor = load_tiny_qwen_vl(model_path)
    if freeze_vision:
        from differad_rl.integrations.qwen_vl.loading import freeze_vision_tower

        freeze_vision_tower(model)
    values = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": per_device_batch,
        "num_generations": G,
        "max_completion_length": 10,
        "max_steps": 2,
        "logging_steps": 1,
        "use_cpu": True,
        "bf16": False,
        "report_to": [],
        "save_strategy": "no",
        "seed": 0,
        "disable_tqdm": True,
    }
    values.update(config)
    cfg_cls = DifferADGRPOConfig if trainer_cls.__name__ != "GRPOTrainer" else None
    if cfg_cls is None:
        from trl import GRPOConfig

        cfg_cls = GRPOConfig
        values = {k: v for k, v in values.items() if k in GRPOConfig.__dataclass_fields__}
    args = cfg_cls(**values)
    return trainer_cls(
        model=model,
        processing_class=processor,
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=Dataset.from_list(train_rows),
    )


def mp_kinds() -> list[str]:
    """Prompts of the multi-process check: 3 groups of 4 over 2 ranks × 6 rows (group 1 spans the ranks)."""
    return ["always", "once", "easy"]


def mp_server_kinds() -> list[str]:
    """Prompts of the vLLM-server check: 4 groups of 4 over 2 ranks × 8 rows (whole groups per rank, as
    ``check_vllm_regeneration`` requires of a server)."""
    return ["always", "once", "easy", "easy"]


def run_scripted_step(trainer: Any, rows: list[dict[str, Any]], rank: int, world: int) -> dict[str, Any]:
    """One training-mode generation step on this rank's slice of ``expand_groups(rows)``; JSON-able results."""
    import torch

    batch = expand_groups(rows)
    local_n = len(batch) // world
    local = batch[rank * local_n : (rank + 1) * local_n]
    trainer.model.train()
    torch.manual_seed(1234 + rank)
    tokens_before = trainer.state.num_input_tokens_seen
    out = trainer._generate_and_score_completions(local)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("differad/")}
    return {
        "rank": rank,
        "advantages": out["advantages"].tolist(),
        "rewards_per_func": trainer._last_rewards_per_func.tolist(),
        "metrics": metrics,
        "num_items_in_batch": float(out["num_items_in_batch"]),
        "local_loss_tokens": float(out["completion_mask"].sum()),
        "local_tokens": int(out["prompt_mask"].sum() + out["completion_mask"].sum()),
        "num_tokens": int(trainer.state.num_input_tokens_seen - tokens_before),
        "prompt_rows": [ids[m.bool()].tolist() for ids, m in zip(out["prompt_ids"], out["prompt_mask"])],
        "completion_rows": [ids[m.bool()].tolist() for ids, m in zip(out["completion_ids"], out["completion_mask"])],
    }


def main(argv: list[str]) -> int:
    """``worker.py OUT_DIR MODEL_PATH [vllm-tp2|vllm-server|vision-cache]``: the last argument runs the step
    through TRL's vLLM path on ``tests/fake_vllm.py``'s engine: colocate with tensor parallel 2 (TRL all-gathers
    each rank's prompts in the TP group and slices the outputs by equal sizes), or server mode (the main process
    samples G completions per G gathered rows and broadcasts them) on :func:`mp_server_kinds`; or, with
    ``vision-cache``, freezes the tower with the feature cache on."""
    out_dir, model_path = Path(argv[1]), argv[2]
    mode = argv[3] if len(argv) > 3 else None
    vllm_mode = {"vllm-tp2": "colocate", "vllm-server": "server"}.get(mode or "")
    use_vllm = vllm_mode is not None
    cache = mode == "vision-cache"
    extra: dict[str, Any] = {"freeze_vision": True, "vision_feature_cache": True} if cache else {}
    from accelerate import PartialState

    from differad_rl.integrations.trl.trainer import DifferADGRPOTrainer

    state = PartialState(cpu=True)
    rank, world = state.process_index, state.num_processes
    vllm_config: dict[str, Any] = {}
    if use_vllm:
        from tests import fake_vllm  # the launcher puts the repository on PYTHONPATH

        fake_vllm.install(server_model=model_path)
        vllm_config = {"use_vllm": True, "vllm_mode": vllm_mode}
        if vllm_mode == "colocate":
            vllm_config["vllm_tensor_parallel_size"] = world
    rows = make_prompt_rows(mp_server_kinds() if vllm_mode == "server" else mp_kinds())
    trainer = make_trainer(
        DifferADGRPOTrainer,
        model_path,
        [ScriptedReward(True), ScriptedReward(False)],
        rows,
        per_device_batch=len(rows) * G // world,
        output_dir=out_dir / "trainer",
        difficulty_weighting=True,
        resample_rounds=2,
        localization_reward="scripted_loc_reward",
        **vllm_config,
        **extra,
    )
    result = run_scripted_step(trainer, rows, rank, world)
    result["world"] = world
    if use_vllm:  # what this rank's engine was asked for, call by call (TP: the prompts of both ranks)
        engines = fake_vllm.FakeLLM.instances  # server: only on the main process
        calls = engines[0].calls if engines else []
        result["vllm_calls"] = [[p["prompt_token_ids"] for p in call] for call in calls]
        result["vllm_tokens"] = [[p["token_ids"] for p in call] for call in calls]
    if cache:
        result["images_encoded"] = trainer.vision_cache.stats.images_encoded
        result["images_served"] = trainer.vision_cache.stats.images_served
    write_rank_result(out_dir, rank, result)
    state.wait_for_everyone()
    return 0


def write_rank_result(out_dir: Path, rank: int, result: dict[str, Any]) -> None:
    """A worker's JSON result as ``<out_dir>/rank<r>.json``, written atomically (the test reads it after)."""
    tmp = out_dir / f".rank{rank}.json.tmp"
    tmp.write_text(json.dumps(result))
    os.replace(tmp, out_dir / f"rank{rank}.json")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
