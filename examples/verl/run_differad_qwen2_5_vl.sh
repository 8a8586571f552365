#!/usr/bin/env bash
# DifferAD-R1 GRPO on Qwen2.5-VL with veRL 0.9 (V1 trainer, vLLM rollout):
# DCLR + format reward, the `differad` advantage estimator (difficulty weights from the localization
# reward), same-prompt group resampling, the paper's hyperparameters (docs/method.md §1).
#
#   pip install "differad-rl[verl-vllm]"   # on the GPU machines: veRL's own vllm extra (vllm 0.24.0 with the
#                                          # torch / torchvision / transformers it pins)
#   python examples/verl/prepare_data.py --pairs pairs.jsonl --out ~/data/differad --max-pixels 1003520
#   bash examples/verl/run_differad_qwen2_5_vl.sh [extra hydra overrides ...]
#
# Multi-node: start Ray on every node first (`ray start --head` on one, `ray start
# --address=<head>:6379` on the others), then run this script on the head node with NNODES set.
# Every config key below is checked against veRL 0.9.1's own config schema by
# tests/test_verl_examples.py. Keys that veRL's YAML lacks need a leading `+`. Every differad-rl
# option is checked again when veRL starts (before Ray), by the plugin's start-up check.
set -euo pipefail

MODEL_PATH=${MODEL_PATH:-Qwen/Qwen2.5-VL-7B-Instruct}
DATA_DIR=${DATA_DIR:-$HOME/data/differad}
NNODES=${NNODES:-1}
NGPUS_PER_NODE=${NGPUS_PER_NODE:-8}
RESAMPLE_ROUNDS=${RESAMPLE_ROUNDS:-2}        # K regeneration rounds of degenerate groups; 0 = off
TP=${TP:-2}                                 # vLLM tensor parallel size per replica
# docs/method.md §1: G = 8 completions per prompt, 8 completions per GPU, gradient accumulation 2
# -> one update per step over 2 prompts per GPU.
GROUP_SIZE=8
PROMPTS_PER_STEP=$((2 * NNODES * NGPUS_PER_NODE))
# The prompt budget follows the pixel budget (docs/method.md §1: max_pixels = 14·14·4·1280). Each image is
# at most MAX_PIXELS / FACTOR² visual tokens (FACTOR = patch 14 × merge 2 for Qwen2/2.5-VL; 32 for
# Qwen3-VL), two images per prompt, plus the text (system prompt, instruction, chat template: under
# 300 tokens). The paper's 1024-token cap fits only images under ~560 px; with
# data.filter_overlong_prompts=True a smaller budget silently drops every larger pair.
MAX_PIXELS=${MAX_PIXELS:-1003520}
FACTOR=${FACTOR:-28}
IMAGES_PER_PROMPT=2
TEXT_TOKENS=512
MAX_PROMPT_LENGTH=$((IMAGES_PER_PROMPT * MAX_PIXELS / (FACTOR * FACTOR) + TEXT_TOKENS))   # 3072

python3 -m verl.trainer.main_ppo \
    trainer.use_v1=True \
    algorithm.adv_estimator=differad \
    +algorithm.differad.tau=0.3 \
    +algorithm.differad.scope=group \
    +algorithm.differad.eps=1e-4 \
    +algorithm.differad.mask_truncated=True \
    algorithm.norm_adv_by_std_in_grpo=True \
    algorithm.use_kl_in_reward=False \
    reward.custom_reward_function.path=pkg://differad_rl.integrations.verl.reward \
    reward.custom_reward_function.name=compute_score \
    +reward.custom_reward_function.reward_kwargs.center_norm=paper \
    +reward.custom_reward_function.reward_kwargs.localization_weight=1.0 \
    +reward.custom_reward_function.reward_kwargs.format_weight=1.0 \
    reward.num_workers=8 \
    +actor_rollout_ref.rollout.agent.agent_loop_manager_class=differad_rl.integrations.verl.resampling.DifferadAgentLoopManagerTQ \
    trainer.v1.sampler.custom_sampler.path=pkg://differad_rl.integrations.verl.resampling \
    trainer.v1.sampler.custom_sampler.name=DifferadReplayBuffer \
    +differad.resample.rounds="$RESAMPLE_ROUNDS" \
    +differad.resample.metric=localization \
    data.train_files="$DATA_DIR/train.parquet" \
    data.val_files="$DATA_DIR/val.parquet" \
    data.train_batch_size="$PROMPTS_PER_STEP" \
    data.max_prompt_length="$MAX_PROMPT_LENGTH" \
    data.max_response_length=1024 \
    data.filter_overlong_prompts=True \
    data.truncation=error \
    data.image_key=images \
    actor_rollout_ref.model.path="$MODEL_PATH" \
    actor_rollout_ref.model.use_remove_padding=True \
    actor_rollout_ref.model.enable_gradient_checkpointing=True \
    actor_rollout_ref.actor.freeze_vision_tower=True \
    actor_rollout_ref.actor.optim.lr=1e-6 \
    actor_rollout_ref.actor.ppo_mini_batch_size="$PROMPTS_PER_STEP" \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8 \
    actor_rollout_ref.actor.ppo_epochs=1 \
    actor_rollout_ref.actor.use_kl_loss=True \
    actor_rollout_ref.actor.kl_loss_coef=0.04 \
    actor_rollout_ref.actor.kl_loss_type=low_var_kl \
    actor_rollout_ref.actor.entropy_coeff=0 \
    actor_rollout_ref.actor.clip_ratio_low=0.2 \
    actor_rollout_ref.actor.clip_ratio_high=0.28 \
    actor_rollout_ref.actor.loss_agg_mode=token-mean \
    actor_rollout_ref.actor.fsdp_config.param_offload=False \
    actor_rollout_ref.actor.fsdp_config.optimizer_offload=False \
    actor_rollout_ref.rollout.name=vllm \
    actor_rollout_ref.rollout.n="$GROUP_SIZE" \
    actor_rollout_ref.rollout.temperature=1.0 \
    actor_rollout_ref.rollout.tensor_model_parallel_size="$TP" \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.6 \
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=16 \
    +actor_rollout_ref.rollout.limit_images=2 \
    actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=16 \
    actor_rollout_ref.ref.fsdp_config.param_offload=True \
    trainer.critic_warmup=0 \
    trainer.logger='["console","tensorboard"]' \
    trainer.project_name=differad_rl \
    trainer.experiment_name=differad_qwen2_5_vl \
    trainer.nnodes="$NNODES" \
    trainer.n_gpus_per_node="$NGPUS_PER_NODE" \
    trainer.total_epochs=1 \
    trainer.save_freq=50 \
    trainer.test_freq=25 \
    "$@"
