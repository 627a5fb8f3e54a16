#!/usr/bin/env bash
# GPU checks in one go on a machine with CUDA (the lent H200: its own torch, no Ray, no package
# registry): the GPU test tier where pytest is there, then scripts/gpu_check.py (plain-process
# training: auto precision, a measured bf16 matmul peak, bf16 MFU with and without
# torch.compile, fp16 with loss scaling, peak memory). Its last line is one JSON object.
# Under 8 minutes on one H200-class GPU. RESULTS_DIR (default: $OUT, else /tmp) receives
# gpu_tier.log, gpu_check.log and gpu_check.json (rewritten after every run, so a check cut
# short still leaves its figures). Arguments go to gpu_check.py (--steps, --budget-s).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1
results="${RESULTS_DIR:-${OUT:-/tmp}}"
mkdir -p "$results"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
if python3 -c "import pytest" 2>/dev/null; then
    timeout 150 python3 -m pytest tests/gpu -q -p no:cacheprovider 2>&1 \
        | tee "$results/gpu_tier.log" | tail -25
fi
timeout 420 python3 -m scripts.gpu_check --out "$results/gpu_check.json" "$@" 2>&1 \
    | tee "$results/gpu_check.log" | grep -v "^step \|^warning: MFU"
