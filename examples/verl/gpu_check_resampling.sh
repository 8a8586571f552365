#!/usr/bin/env bash
# One-command GPU check of same-prompt group resampling (docs/method.md §6) inside veRL 0.9's real rollout:
# vLLM serving Qwen2.5-VL-3B-Instruct, veRL's V1 trainer, differad's reward, the differad agent-loop
# manager (regenerates degenerate groups up to K rounds) and replay buffer (logs the statistics).
# A few training steps on the offline demo pairs, then the logged metrics are checked.
#
#   pip install "differad-rl[verl-vllm]"        # veRL's pinned vLLM extra (brings torchvision, which veRL's image path needs)
#   MODEL_PATH=/models/Qwen2.5-VL-3B-Instruct bash examples/verl/gpu_check_resampling.sh
#
# Environment: MODEL_PATH (a local folder or a hub id the machine can download), NGPUS (1),
# ROUNDS (K = 2), STEPS (3), ADV_ESTIMATOR (differad; grpo isolates the rollout side),
# WORK (output folder; $OUT or a fresh temp folder). Extra arguments are appended as Hydra overrides.
# Passes (exit 0) when every step logged training/differad_resample/* with groups = the batch's
# prompts, rounds_used/max <= K, degenerate_after <= degenerate_before, and regenerations >= 1 whenever
# a degenerate group was seen with K > 0; and when the vision tower, frozen by
# actor.freeze_vision_tower=True (made real by the plugin, differad_rl.integrations.verl.freeze), is
# bit-for-bit unchanged in the final checkpoint while the language model changed, and every
# old-log-prob pass encoded at most 1/GROUP_SIZE of the images it was asked for (the feature cache;
# each pass's "images, encoded" is printed; VISION_CACHE=false turns the cache off and the bound).
# The overrides are checked against veRL 0.9.1's config schema on CPU by tests/test_verl_resampling.py.
set -euo pipefail

MODEL_PATH=${MODEL_PATH:-Qwen/Qwen2.5-VL-3B-Instruct}
NGPUS=${NGPUS:-1}
ROUNDS=${ROUNDS:-2}
STEPS=${STEPS:-3}
ADV_ESTIMATOR=${ADV_ESTIMATOR:-differad}
WORK=${WORK:-${OUT:-$(mktemp -d)}}
VISION_CACHE=${VISION_CACHE:-true}
PROMPTS=8                 # prompts per step
GROUP_SIZE=4              # rollout.n
MAX_PIXELS=200704         # 256 visual tokens per image keeps the check fast
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$WORK"

python3 "$HERE/prepare_data.py" --demo "$WORK/pairs" --demo-pairs 48 --out "$WORK/data" \
    --space qwen2_5_vl --max-pixels "$MAX_PIXELS"

export VERL_FILE_LOGGER_PATH="$WORK/metrics.jsonl"
rm -f "$VERL_FILE_LOGGER_PATH"
rm -rf "$WORK/checkpoints"
set -o pipefail
python3 -m verl.trainer.main_ppo \
    trainer.use_v1=True \
    trainer.v1.trainer_mode=sync \
    algorithm.adv_estimator="$ADV_ESTIMATOR" \
    algorithm.use_kl_in_reward=False \
    reward.custom_reward_function.path=pkg://differad_rl.integrations.verl.reward \
    reward.custom_reward_function.name=compute_score \
    reward.num_workers=2 \
    +actor_rollout_ref.rollout.agent.agent_loop_manager_class=differad_rl.integrations.verl.resampling.DifferadAgentLoopManagerTQ \
    actor_rollout_ref.rollout.agent.num_workers=2 \
    trainer.v1.sampler.custom_sampler.path=pkg://differad_rl.integrations.verl.resampling \
    trainer.v1.sampler.custom_sampler.name=DifferadReplayBuffer \
    +differad.resample.rounds="$ROUNDS" \
    +differad.resample.metric=localization \
    data.train_files="$WORK/data/train.parquet" \
    data.val_files="$WORK/data/val.parquet" \
    data.train_batch_size="$PROMPTS" \
    data.max_prompt_length=1024 \
    data.max_response_length=512 \
    data.filter_overlong_prompts=True \
    data.truncation=error \
    data.image_key=images \
    actor_rollout_ref.model.path="$MODEL_PATH" \
    actor_rollout_ref.model.use_remove_padding=True \
    actor_rollout_ref.model.enable_gradient_checkpointing=True \
    actor_rollout_ref.actor.freeze_vision_tower=True \
    +actor_rollout_ref.differad_vision_cache="$VISION_CACHE" \
    actor_rollout_ref.actor.checkpoint.save_contents='[hf_model]' \
    actor_rollout_ref.actor.optim.lr=1e-6 \
    actor_rollout_ref.actor.ppo_mini_batch_size="$PROMPTS" \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4 \
    actor_rollout_ref.actor.use_kl_loss=False \
    actor_rollout_ref.actor.entropy_coeff=0 \
    actor_rollout_ref.rollout.name=vllm \
    actor_rollout_ref.rollout.n="$GROUP_SIZE" \
    actor_rollout_ref.rollout.temperature=1.0 \
    actor_rollout_ref.rollout.tensor_model_parallel_size=1 \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.5 \
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8 \
    +actor_rollout_ref.rollout.limit_images=2 \
    trainer.critic_warmup=0 \
    trainer.logger='["console","file"]' \
    trainer.project_name=differad_rl_checks \
    trainer.experiment_name=resampling \
    trainer.nnodes=1 \
    trainer.n_gpus_per_node="$NGPUS" \
    trainer.total_epochs=1 \
    trainer.total_training_steps="$STEPS" \
    trainer.val_before_train=False \
    trainer.test_freq=-1 \
    trainer.save_freq="$STEPS" \
    trainer.default_local_dir="$WORK/checkpoints" \
    "$@" 2>&1 | tee "$WORK/train.log"

python3 - "$VERL_FILE_LOGGER_PATH" "$ROUNDS" "$PROMPTS" <<'PY'
import json, sys

path, rounds, prompts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
p = "training/differad_resample/"
steps = [json.loads(line) for line in open(path) if line.strip()]
steps = [s for s in steps if any(k.startswith("training/") for k in s["data"])]
assert steps, f"no training step logged in {path}"
seen_degenerate = regenerations = 0
for s in steps:
    m = s["data"]
    missing = [k for k in ("groups/total", "groups_resampled/total", "regenerations/total", "rounds_used/max",
                           "rounds_used/mean", "degenerate_before", "degenerate_after") if p + k not in m]
    assert not missing, f"step {s['step']}: missing {missing}"
    assert m[p + "groups/total"] == prompts, (s["step"], m[p + "groups/total"])
    assert 0 <= m[p + "rounds_used/max"] <= rounds, (s["step"], m[p + "rounds_used/max"])
    assert m[p + "degenerate_after"] <= m[p + "degenerate_before"] + 1e-9, s["step"]
    assert m[p + "regenerations/total"] >= m[p + "groups_resampled/total"], s["step"]
    seen_degenerate += m[p + "degenerate_before"] > 0
    regenerations += m[p + "regenerations/total"]
    print(f"step {s['step']}: " + ", ".join(f"{k[len(p):]}={m[k]:g}" for k in sorted(m) if k.startswith(p)))
if rounds > 0 and seen_degenerate:
    assert regenerations >= 1, "degenerate groups were seen but none was regenerated"
print(f"OK: {len(steps)} steps, {regenerations:g} group regenerations")
PY

python3 - "$MODEL_PATH" "$WORK" "$STEPS" "$GROUP_SIZE" "$VISION_CACHE" <<'PY'
import glob, os, re, sys

import torch
from safetensors.torch import load_file

model_path, work, steps, group, cache = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]


def weights(folder):
    out = {}
    for f in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        for k, v in load_file(f).items():  # hub names (visual.*, model.layers.*) and transformers 5 names alike
            out[k.removeprefix("model.").removeprefix("language_model.").removeprefix("model.")] = v.float()
    return out


if not os.path.isdir(model_path):
    from huggingface_hub import snapshot_download

    model_path = snapshot_download(model_path, local_files_only=True)
saved_dir = os.path.join(work, "checkpoints", f"global_step_{steps}", "actor", "huggingface")
before, after = weights(model_path), weights(saved_dir)
tower = [k for k in before if k.startswith("visual.")]
assert tower and all(k in after for k in tower), f"tower weights missing in {saved_dir}"
moved = [k for k in tower if not torch.equal(before[k], after[k])]
assert not moved, f"frozen vision tower changed: {moved[:5]} ({len(moved)} of {len(tower)} tensors)"
language = [k for k in before if not k.startswith("visual.") and k in after]
changed = [k for k in language if not torch.equal(before[k], after[k])]
print(f"vision tower: {len(tower)} tensors bit-for-bit unchanged; language model: {len(changed)} of "
      f"{len(language)} tensors changed after {steps} steps")
assert changed, "the language model did not change: nothing trained"

passes = re.findall(r"\[differad\] vision tower (\w+): (\d+) images, (\d+) encoded", open(os.path.join(work, "train.log")).read())
assert passes, "no '[differad] vision tower' pass line in the log: the plugin's freeze did not run in the workers"
for name, images, encoded in passes:
    print(f"images encoded per pass: {name}: {encoded} of {images}")
    if cache == "true" and name == "compute_log_prob":
        assert int(encoded) * group <= int(images), (name, images, encoded)
    if cache == "true" and name == "update_actor":
        assert int(encoded) == 0, (name, images, encoded)
print(f"OK: frozen tower unchanged, {len(passes)} passes logged")
PY
