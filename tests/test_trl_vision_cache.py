"""The frozen-vision feature cache and autograd guard in DifferADGRPOTrainer (REAL TRL 1.16, three tiny families).

Cache on vs off on the same frozen model: the generation batch (sampled completions, reference log-probs,
advantages after a resampling round), the policy loss and the language-model gradients are bitwise equal
in fp32; the tower encodes each distinct image of the generation batch exactly once (counted with forward
hooks on the policy's and the reference model's towers); with gradient checkpointing on, no vision block
runs in backward and no input-grad hook piles up over steps; nothing is kept across steps.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from transformers import TrainerCallback, set_seed  # noqa: E402

from differad_rl.integrations.qwen_vl.tiny import FAMILIES, tiny_model_for  # noqa: E402
from differad_rl.integrations.trl.config import DifferADGRPOConfig  # noqa: E402
from differad_rl.integrations.trl.trainer import DifferADGRPOTrainer  # noqa: E402
from differad_rl.integrations.trl.vision import sharding_blocker  # noqa: E402
from differad_rl.integrations.qwen_vl.vision_cache import (  # noqa: E402
    TowerMeter,
    count_input_grad_hooks,
    find_vision_model,
)

from tests.trl_mp_worker import ScriptedReward, expand_groups, make_prompt_rows, make_trainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KINDS = ["always", "easy"]  # group 0 stays degenerate: regenerated in the resampling round
DISTINCT = 2 * len(KINDS)  # two images per prompt


def _trainer(path, tmp_path, cache, **config):
    rows = [{**row, "row": i} for i, row in enumerate(make_prompt_rows(KINDS))]  # ScriptedReward reads 'row'
    values = {"beta": 0.04, "resample_rounds": 1, "difficulty_weighting": True,
              "localization_reward": "scripted_loc_reward"}
    values.update(config)
    return make_trainer(DifferADGRPOTrainer, path, [ScriptedReward(), ScriptedReward(localization=False)], rows,
                        4 * len(KINDS), tmp_path, freeze_vision=True, vision_feature_cache=cache, **values), rows


def _step_and_grads(trainer, batch):
    trainer.model.train()
    torch.manual_seed(0)
    out = trainer._generate_and_score_completions(batch)
    trainer.model.zero_grad(set_to_none=True)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which is not running here
    loss = trainer.compute_loss(trainer.model, out)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return out, loss.detach(), grads


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_on_equals_off_and_encodes_each_image_once(family, tmp_path):
    path = tiny_model_for(family)
    on, rows = _trainer(path, tmp_path / "on", True)
    off, _ = _trainer(path, tmp_path / "off", False)
    assert on.vision_cache is not None and off.vision_cache is None
    batch = expand_groups([{k: v for k, v in r.items() if k != 'row'} for r in rows])
    with TowerMeter(off.model) as meter_off, TowerMeter(off.ref_model) as ref_off:
        out_off, loss_off, grads_off = _step_and_grads(off, batch)
    with TowerMeter(on.model) as meter_on, TowerMeter(on.ref_model) as ref_on:
        out_on, loss_on, grads_on = _step_and_grads(on, batch)
    assert on._metrics["train"]["differad/regenerations"][-1] == 1.0  # a resampling round really ran
    assert set(out_on) == set(out_off)
    for key, value in out_off.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(out_on[key], value), (family, key)
        else:
            assert out_on[key] == value, (family, key)
    assert "ref_per_token_logps" in out_on
    assert torch.equal(loss_on, loss_off)
    assert grads_on.keys() == grads_off.keys() and grads_on
    assert not any(".visual." in n for n in grads_on)
    for name, g in grads_off.items():
        assert torch.equal(grads_on[name], g), (family, name)
    # each distinct image once per generation batch: prefill, reference pass, resampling round and policy pass
    assert meter_on.images + ref_on.images == DISTINCT and meter_on.calls == 1 and ref_on.calls == 0
    stats = on.vision_cache.stats
    assert stats.images_encoded == DISTINCT and stats.images_served > 4 * meter_on.images
    assert meter_off.images + ref_off.images > 4 * DISTINCT  # the G copies in every pass
    assert meter_on.backward_calls == 0 and meter_off.backward_calls == 0  # frozen tower: never in backward


class _Record(TrainerCallback):
    def __init__(self, trainer, meter):
        self.trainer, self.meter, self.cached, self.images, self.hooks = trainer, meter, [], [], []

    def on_step_end(self, args, state, control, **kwargs):
        self.cached.append(len(self.trainer.vision_cache) if self.trainer.vision_cache is not None else 0)
        self.images.append(self.meter.images)
        self.hooks.append(count_input_grad_hooks(self.trainer.model))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cache", [True, False])
def test_training_with_checkpointing_no_tower_backward_no_growth(family, cache, tmp_path):
    path = tiny_model_for(family)
    trainer, _ = _trainer(path, tmp_path, cache, beta=0.0, max_steps=3, gradient_checkpointing=True)
    tower = find_vision_model(trainer.model).visual
    with TowerMeter(trainer.model) as meter:
        record = _Record(trainer, meter)
        trainer.add_callback(record)
        set_seed(0)
        trainer.train()
    assert meter.backward_calls == 0, family  # no vision block recomputed or back-propagated
    assert count_input_grad_hooks(tower) == 0
    assert record.hooks == [1, 1, 1], family  # one hook (the text embedding's), not one more per generation
    if cache:
        # every step's generation batch holds the same 2 prompts: 4 distinct images, encoded once per step
        assert [b - a for a, b in zip([0, *record.images], record.images)] == [DISTINCT] * 3
        assert record.cached == [DISTINCT] * 3  # nothing grows across steps
        assert len(trainer.vision_cache) == 0 and not trainer.vision_cache.active  # emptied when training ends
    else:
        assert meter.images > 3 * 4 * DISTINCT


def test_switch_and_refusals(tmp_path):
    path = tiny_model_for("qwen2_5_vl")
    rows = make_prompt_rows(["easy"])
    funcs = [ScriptedReward()]
    auto_frozen = make_trainer(DifferADGRPOTrainer, path, funcs, rows, 4, tmp_path, freeze_vision=True)
    assert auto_frozen.vision_cache is not None and not auto_frozen.vision_cache.active
    assert make_trainer(DifferADGRPOTrainer, path, funcs, rows, 4, tmp_path).vision_cache is None  # trainable
    assert make_trainer(DifferADGRPOTrainer, path, funcs, rows, 4, tmp_path, freeze_vision=True,
                        vision_feature_cache=False).vision_cache is None
    with pytest.raises(ValueError, match=r"vision_feature_cache=True.*trainable parameters"):
        make_trainer(DifferADGRPOTrainer, path, funcs, rows, 4, tmp_path, vision_feature_cache=True)
    with pytest.raises(ValueError, match="vision_feature_cache"):
        DifferADGRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], vision_feature_cache="yes")
    zero3 = types.SimpleNamespace(is_deepspeed_enabled=True, is_fsdp_enabled=False,
                                  args=types.SimpleNamespace(deepspeed_plugin=types.SimpleNamespace(zero_stage=3)))
    assert "ZeRO-3" in sharding_blocker(zero3)
    zero2 = types.SimpleNamespace(is_deepspeed_enabled=True, is_fsdp_enabled=False,
                                  args=types.SimpleNamespace(deepspeed_plugin=types.SimpleNamespace(zero_stage=2)))
    assert sharding_blocker(zero2) is None
    assert "FSDP" in sharding_blocker(types.SimpleNamespace(is_fsdp_enabled=True))


@pytest.mark.slow
def test_two_processes_with_the_cache(tmp_path):
    """Two gloo processes (DDP-style data parallelism; the cache has no collective of its own): both ranks
    finish the resampling rounds in lockstep with the same decisions, and each encodes the distinct images of
    its own rows once (rank 0: prompts 0, 1; rank 1: prompts 1, 2; two images each)."""
    worker = Path(__file__).with_name("trl_mp_worker.py")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(worker.parent.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(worker), str(tmp_path), str(tiny_model_for("qwen2_5_vl")), "vision-cache"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["metrics"] == ranks[1]["metrics"] and ranks[0]["metrics"]["differad/rounds_used"] >= 1
    assert [r["images_encoded"] for r in ranks] == [4, 4]
    assert all(r["images_served"] > 0 for r in ranks)


def _peft_trainer(path, tmp_path, cache, targets):
    from peft import LoraConfig

    from differad_rl.integrations.qwen_vl.tiny import load_tiny_qwen_vl

    rows = [{**row, "row": i} for i, row in enumerate(make_prompt_rows(KINDS))]
    model, processor = load_tiny_qwen_vl(path)
    from datasets import Dataset

    cfg = DifferADGRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4,
                             max_completion_length=10, use_cpu=True, bf16=False, report_to=[], seed=0,
                             beta=0.04, resample_rounds=1, localization_reward="scripted_loc_reward",
                             vision_feature_cache=cache)
    trainer = DifferADGRPOTrainer(model=model, processing_class=processor, args=cfg,
                                  reward_funcs=[ScriptedReward(), ScriptedReward(localization=False)],
                                  train_dataset=Dataset.from_list(rows),
                                  peft_config=LoraConfig(r=4, target_modules=targets))
    return trainer, rows


def test_peft_on_the_language_model_keeps_the_cache_exact(tmp_path):
    """LoRA on the language model only (the tower frozen by PEFT, not wrapped): the cache is on and the
    step equals the cache-off step bit for bit (the reference pass runs with the adapter disabled)."""
    pytest.importorskip("peft")
    path = tiny_model_for("qwen2_5_vl")
    on, rows = _peft_trainer(path, tmp_path / "on", None, ["q_proj", "v_proj"])
    off, _ = _peft_trainer(path, tmp_path / "off", False, ["q_proj", "v_proj"])
    assert on.vision_cache is not None and off.vision_cache is None and on.ref_model is None
    batch = expand_groups([{k: v for k, v in r.items() if k != "row"} for r in rows])
    with TowerMeter(on.model) as meter:
        out_on, loss_on, grads_on = _step_and_grads(on, batch)
    out_off, loss_off, grads_off = _step_and_grads(off, batch)
    assert meter.images == DISTINCT
    for key, value in out_off.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(out_on[key], value), key
    assert torch.equal(loss_on, loss_off) and grads_on.keys() == grads_off.keys() and grads_on
    assert all(torch.equal(grads_on[n], g) for n, g in grads_off.items())


def test_adapter_wrapped_tower_is_refused(tmp_path):
    pytest.importorskip("peft")
    path = tiny_model_for("qwen2_5_vl")
    with pytest.raises(ValueError, match=r"vision_feature_cache=True.*adapter-wrapped"):
        _peft_trainer(path, tmp_path / "t", True, ["qkv", "q_proj"])  # "qkv": the vision blocks' attention
    with pytest.warns(UserWarning, match="vision feature cache off.*adapter-wrapped"):
        trainer, _ = _peft_trainer(path, tmp_path / "n", None, ["qkv", "q_proj"])
    assert trainer.vision_cache is None


def test_reference_tower_that_differs_gets_its_own_features(tmp_path, monkeypatch):
    """A policy whose frozen tower differs from the checkpoint TRL loads the reference model from: the
    reference pass is never served the policy's features (its tower encodes its own), and the step still
    equals the cache-off step bit for bit."""
    from differad_rl.integrations.qwen_vl import loading

    def freeze_and_perturb(model):
        n = loading.freeze_vision_tower.__wrapped_original__(model)
        with torch.no_grad():
            for p in find_vision_model(model).visual.merger.parameters():
                p.mul_(1.5)
        return n

    freeze_and_perturb.__wrapped_original__ = loading.freeze_vision_tower  # type: ignore[attr-defined]
    monkeypatch.setattr(loading, "freeze_vision_tower", freeze_and_perturb)
    path = tiny_model_for("qwen2_5_vl")
    on, rows = _trainer(path, tmp_path / "on", True)
    off, _ = _trainer(path, tmp_path / "off", False)
    batch = expand_groups([{k: v for k, v in r.items() if k != "row"} for r in rows])
    with TowerMeter(on.model) as policy, TowerMeter(on.ref_model) as ref:
        out_on, loss_on, _ = _step_and_grads(on, batch)
    out_off, loss_off, _ = _step_and_grads(off, batch)
    assert (policy.images, ref.images) == (DISTINCT, DISTINCT)
    assert torch.equal(out_on["ref_per_token_logps"], out_off["ref_per_token_logps"])
    assert torch.equal(loss_on, loss_off)
