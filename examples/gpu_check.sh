#!/usr/bin/env bash
# The GPU validation of the documented real-model recipes (TRL and veRL), in one prepared run.
# NOT RUN YET: it was written on a CPU-only machine (no GPU, no vLLM, no torchvision there); every
# piece it drives is exercised on CPU by the tests named below, but only this script runs them on
# an accelerator with the real processors (torchvision) and vLLM.
#
#   pip install "differad-rl[verl-vllm,dev]"      # veRL's pinned vllm 0.24.0 / torch 2.11 / torchvision 0.26
#   bash examples/gpu_check.sh                    # REAL_MODEL=/models/Qwen2.5-VL-3B-Instruct to add a real model
#
# Steps, and what each must print (the script stops at the first failure, exit code != 0):
#   1. hub-shaped fixtures with torchvision present (tests/test_hub_fixtures.py): AutoProcessor now loads
#      the full processor of each fixture, and veRL's RLHFDataset keeps every 700-1024 px pair with the
#      launch script's data settings through the REAL qwen_vl_utils:
#        "13 passed"                                   (pytest's summary line)
#   2. TRL, the paper configuration (--paper: G = 8, bf16, max_pixels = 1,003,520, frozen vision tower,
#      DAPO loss, weights, K = 1) on the Qwen2.5-VL fixture at full image size (1024 px demo pairs):
#        "model <fixture>: space=qwen2_5_vl min_pixels=3136 max_pixels=1003520 factor=28"
#        one line per step "   1  <reward> ..." then a JSON line with "steps": 2
#   3. veRL, same-prompt resampling through vLLM on the Qwen2.5-VL fixture (examples/verl/gpu_check_resampling.sh):
#        "step N: degenerate_after=..., groups/total=8, ..." per step, then "OK: 2 steps, ...";
#        the frozen vision tower: "vision tower: N tensors bit-for-bit unchanged; language model:
#        M of K tensors changed after 2 steps", one "images encoded per pass: <pass>: <encoded> of <images>"
#        per pass (old-log-prob passes at most 1/4 of their images, updates 0), then "OK: frozen tower unchanged, ..."
#   4. with REAL_MODEL set (a local folder): steps 2 and 3 again on the real model; step 2 must print
#      "space=qwen2_5_vl min_pixels=3136 max_pixels=1003520 factor=28" for a Qwen2.5-VL checkpoint.
#   5. TRL through vLLM colocate with group resampling, then with group refill (examples/trl/gpu_check_vllm.sh):
#        "vllm resample: 2 steps in ..." and "vllm refill: 2 steps in ..." lines, then "GPU VLLM CHECK PASSED"
#   Finally: "GPU CHECK PASSED".
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${WORK:-${OUT:-$(mktemp -d)}}
REAL_MODEL=${REAL_MODEL:-}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
mkdir -p "$WORK"
cd "$ROOT"

python3 -c "import torch, torchvision, vllm; assert torch.cuda.is_available(), 'no GPU'; \
print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'vllm', vllm.__version__)"

echo "== 1. hub-shaped fixtures with torchvision"
python3 -m pytest -q -p no:cacheprovider tests/test_hub_fixtures.py

echo "== building the Qwen2.5-VL fixture"
FIXTURE=$(python3 -c "from differad_rl.integrations.testing import build_hub_fixture; \
print(build_hub_fixture('Qwen/Qwen2.5-VL-3B-Instruct', '$WORK/fixtures/Qwen--Qwen2.5-VL-3B-Instruct'))")

trl_paper() {  # $1 model folder, $2 output folder
    python3 examples/trl/train_grpo.py --paper --model "$1" --output-dir "$2" \
        --max-steps 2 --demo-pairs 32 --demo-size 1024 --max-completion-length 64 | tee "$2.log"
    grep -q "max_pixels=1003520" "$2.log"
    python3 -c "import json,sys; s=json.load(open('$2/summary.json')); assert s['steps']==2, s; print(json.dumps(s))"
}

echo "== 2. TRL --paper on the fixture at full image size"
trl_paper "$FIXTURE" "$WORK/trl_fixture"

echo "== 3. veRL resampling through vLLM on the fixture"
MODEL_PATH="$FIXTURE" STEPS=2 WORK="$WORK/verl_fixture" bash examples/verl/gpu_check_resampling.sh

if [[ -n "$REAL_MODEL" ]]; then
    echo "== 4. the real model: $REAL_MODEL"
    trl_paper "$REAL_MODEL" "$WORK/trl_real"
    MODEL_PATH="$REAL_MODEL" STEPS=2 WORK="$WORK/verl_real" bash examples/verl/gpu_check_resampling.sh
else
    echo "== 4. skipped: set REAL_MODEL=<local Qwen-VL folder> to run the recipes on a real model"
fi
# ---- vLLM section (examples/trl/gpu_check_vllm.sh, which documents what it must print) ----
echo "== 5. TRL through vLLM colocate with K = 1 resampling, then with DAPO refill, on the fixture"
MODEL_PATH="$FIXTURE" STEPS=2 WORK="$WORK/trl_vllm" bash examples/trl/gpu_check_vllm.sh
# ---- end of the vLLM section ----
echo "GPU CHECK PASSED"
