#!/usr/bin/env bash
# GPU checks in one go on a machine with CUDA (the lent H200: its own torch, no Ray, no package
# registry): the GPU test tier where pytest is there, then scripts/gpu_check.py (plain-process
# training: auto precision, bf16 MFU with and without torch.compile, fp16 with loss scaling,
# peak memory). Its last line is one JSON object. Under 8 minutes on one H200-class GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
if python -c "import pytest" 2>/dev/null; then
    timeout 120 python -m pytest tests/gpu -q -p no:cacheprovider || true
fi
timeout 420 python -m scripts.gpu_check "$@"
