#!/usr/bin/env bash
# TRL GRPO through vLLM with group regeneration, on a GPU: the paper configuration
# (--paper: G = 8, bf16, max_pixels = 1,003,520, frozen vision tower, weights, K = 1 resampling) with
# --use-vllm (colocate), then the same with the DAPO filter and one refill round instead of resampling.
# Both regenerate groups through TRL 1.16's own vLLM generation path.
#
# NOT RUN YET: written on a CPU-only machine (no GPU, no vLLM). On CPU the splice and the lockstep are
# tested through TRL's real vLLM code on an engine that honours vllm.LLM.generate and samples the tiny
# model (tests/test_trl_vllm.py; tests/test_trl_multiprocess.py::test_two_processes_vllm_tensor_parallel_lockstep).
#
#   pip install "differad-rl[trl]" "trl[vllm]==1.16.*"        # TRL 1.16 supports vLLM 0.22 to 0.31
#   bash examples/trl/gpu_check_vllm.sh                         # MODEL_PATH=<local Qwen-VL folder>; default:
#                                                               # the Qwen2.5-VL hub-shaped fixture
#   (examples/gpu_check.sh runs it as its last section, on its fixture.)
#
# Must print, per run: "step reward ..." lines (one per step), a JSON line with "steps": 2, then
#   "vllm resample: 2 steps in <s> s; regenerations per step [...]; IS ratio mean per step [...]"
#   "vllm refill: 2 steps in <s> s; refills per step [...]; IS ratio mean per step [...]"
# and finally "GPU VLLM CHECK PASSED" (exit code != 0 at the first failure).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
WORK=${WORK:-${OUT:-$(mktemp -d)}}
MODEL_PATH=${MODEL_PATH:-}
STEPS=${STEPS:-2}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
mkdir -p "$WORK"
cd "$ROOT"

python3 -c "import torch, vllm; assert torch.cuda.is_available(), 'no GPU'; \
print('torch', torch.__version__, 'vllm', vllm.__version__)"

if [[ -z "$MODEL_PATH" ]]; then
    MODEL_PATH=$(python3 -c "from differad_rl.integrations.testing import build_hub_fixture; \
print(build_hub_fixture('Qwen/Qwen2.5-VL-3B-Instruct', '$WORK/fixtures/Qwen--Qwen2.5-VL-3B-Instruct'))")
fi

# vLLM builds its own image processor from the model folder, so the folder must carry the pixel budget the
# run uses (train_grpo.py refuses otherwise): a copy with --paper's budget, weights linked, not copied.
VLLM_MODEL=$(python3 -c "import sys; sys.path.insert(0, 'examples/trl'); from gpu_bench import folder_for_vllm; \
print(folder_for_vllm('$MODEL_PATH', '$WORK/model_for_vllm'))")

run() {  # $1 name; the rest: extra train_grpo.py options
    local name=$1
    shift
    local start=$SECONDS
    python3 -m torch.distributed.run --standalone --nproc_per_node 1 examples/trl/train_grpo.py \
        --paper --model "$VLLM_MODEL" --use-vllm --vllm-mode colocate \
        --max-steps "$STEPS" --demo-pairs 32 --demo-size 1024 --max-completion-length 64 \
        --set vllm_gpu_memory_utilization=0.35 --set vllm_max_model_length=8192 \
        --output-dir "$WORK/$name" "$@" | tee "$WORK/$name.log"
    local took=$((SECONDS - start))
    python3 - "$WORK/$name" "$name" "$STEPS" "$took" <<'EOF'
import json, sys
out, name, steps, took = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
rows = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
assert len(rows) == steps, rows
key = "regenerations" if name == "resample" else "refills"
counts = [r[key] for r in rows]
ratios = [r["is_ratio_mean"] for r in rows]
assert all(c is not None for c in counts), f"no differad/{key} logged: {rows}"
assert all(isinstance(x, float) for x in ratios), f"no sampling/importance_sampling_ratio/mean logged: {rows}"
print(f"vllm {name}: {steps} steps in {took} s; {key} per step {counts}; IS ratio mean per step {ratios}")
EOF
}

echo "== vLLM colocate + K = 1 resampling (--paper)"
run resample
echo "== vLLM colocate + DAPO filter with one refill round"
run refill --resample-rounds 0 --set group_filter=dapo --set group_filter_refill_rounds=1
echo "GPU VLLM CHECK PASSED"
