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
# a degenerate group was seen with K > 0. The overrides are checked against veRL 0.9.1's config
# schema on CPU by tests/test_verl_resampling.py.
set -euo pipefail

MODEL_PATH=${MODEL_PATH:-Qwen/Qwen2.5-VL-3B-Instruct}
NGPUS=${NGPUS:-1}
ROUNDS=${ROUNDS:-2}
STEPS=${STEPS:-3}
ADV_ESTIMATOR=${ADV_ESTIMATOR:-differad}
WORK=${WORK:-${OUT:-$(mktemp -d)}}
PROMPTS=8                 # prompts per step
GROUP_SIZE=4              # rollout.n
MAX_PIXELS=200704         # 256 visual tokens per image keeps the check fast
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$WORK"

python3 "$HERE/prepare_data.py" --demo "$WORK/pairs" --demo-pairs 48 --out "$WORK/data" \
    --space qwen2_5_vl --max-pixels "$MAX_PIXELS"

export VERL_FILE_LOGGER_PATH="$WORK/metrics.jsonl"
rm -f "$VERL_FILE_LOGGER_PATH"
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
    trainer.save_freq=-1 \
    trainer.default_local_dir="$WORK/checkpoints" \
    "$@"

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
