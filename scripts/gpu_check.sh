#!/usr/bin/env bash
# GPU checks in one go on a machine with CUDA (the lent H200: its own torch, no Ray, no package
# registry): the GPU test tier where pytest is there, then scripts/gpu_check.py (plain-process
# training: auto precision, a measured bf16 matmul peak, bf16 MFU with and without
# torch.compile, fp16 with loss scaling, peak memory). Its last line is one JSON object.
# Under 8 minutes on one H200-class GPU, 9 at most (GPU_CHECK_TOTAL_S's default).
# RESULTS_DIR (default: $OUT, else /tmp) receives gpu_tier.log, gpu_check.log and
# gpu_check.json (rewritten after every run, so a check cut short still leaves its figures).
# Arguments go to gpu_check.py (--steps, --budget-s, --runs).
# GPU_CHECK_TOTAL_S (default 540) bounds the whole script, kill grace included: set it to the
# call's timeout less a margin. gpu_check.py gets what the test tier left of it (at most
# 420 s), so a slow tier shortens the check instead of the call's limit killing it before
# its final line.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1
results="${RESULTS_DIR:-${OUT:-/tmp}}"
mkdir -p "$results"
total_s="${GPU_CHECK_TOTAL_S:-540}"
grace_s=10  # timeout's -k: SIGKILL this long after SIGTERM, for a process that ignores it
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
if python3 -c "import pytest" 2>/dev/null; then
    timeout -k "$grace_s" 150 python3 -m pytest tests/gpu -q -p no:cacheprovider 2>&1 \
        | tee "$results/gpu_tier.log" | tail -25
fi
left_s=$((total_s - SECONDS - grace_s - 5))  # 5 s for printing the final line
check_s=$((left_s > 420 ? 420 : left_s < 1 ? 1 : left_s))  # (timeout 0 would mean none)
timeout -k "$grace_s" "$check_s" python3 -m scripts.gpu_check --out "$results/gpu_check.json" \
    "$@" 2>&1 | tee "$results/gpu_check.log" | grep -v "^step \|^warning: MFU"
if [ "${PIPESTATUS[0]}" = 137 ]; then
    # Killed past SIGTERM's grace: its own final line never came; the last saved figures do.
    python3 -c "import json, sys; s = json.load(open(sys.argv[1])); s['killed'] = True;
print(json.dumps(s))" "$results/gpu_check.json" 2>/dev/null \
        || echo '{"killed": true, "error": "gpu_check.py was killed before saving a figure"}'
fi
