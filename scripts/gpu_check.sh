#!/usr/bin/env bash
# GPU checks, run in one go on a machine with CUDA (e.g. the lent H200):
#   the GPU test tier, then a short pretrain in auto precision (bf16 on Ampere+) on an
#   embedded Ray. Prints the GPU, the tests' result and the run's summary.json.
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -q -e ".[test]"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -m pytest tests/gpu -q
run_dir=$(mktemp -d)/gpu-run
python jobs/pretrain.py --num-workers 1 --gpus-per-worker 1 --cpus-per-worker 1 \
    --model-size medium --max-steps 100 --batch-size 32 --seq-len 256 --run-dir "$run_dir"
cat "$run_dir/summary.json"
