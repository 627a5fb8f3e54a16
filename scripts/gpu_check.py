"""GPU checks in one plain process (no Ray, no NCCL), for a lent GPU machine.

Runs the project's own training loop (`orchestrator.training.loop.train` through a
`LocalSession`) and prints one JSON line at the end:
  - the NVML probe's view of the GPUs and the `auto` precision chosen;
  - bf16 MFU of GPT-2 small's shape (`large`) and of `gpt2-medium` at seq 1024, without and
    with `torch.compile` where the loop supports it, against the datasheet dense bf16 peak
    (the table in orchestrator/training/efficiency.py) and against a measured matmul peak
    (`--measured-peak-tflops`: ~790 on the lent H200 for a large bf16 matmul);
  - an fp16 run with dynamic loss scaling (its final scale and that its loss fell);
  - peak memory of each run.

    PYTHONPATH=. python -m scripts.gpu_check [--steps 40] [--measured-peak-tflops 790]

The lent machine has its own torch and no package registry: this imports only torch, numpy
and the project's pure modules.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time

import torch

from orchestrator.config import TrainConfig
from orchestrator.probes import probe_nvml
from orchestrator.training.efficiency import gpu_peak_flops
from orchestrator.training.loop import train
from orchestrator.training.precision import resolve_precision
from orchestrator.training.session import LocalSession

# (preset, sequences per step) at seq 1024: sized for a 80-141 GB GPU in bf16.
MFU_RUNS = (("large", 32), ("gpt2-medium", 16))


def supports_compile() -> bool:
    return "compile" in {f.name for f in dataclasses.fields(TrainConfig)}


def run(config: TrainConfig) -> dict:
    """One training run in this process; its last report's figures and its wall time."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as run_dir:
        torch.cuda.reset_peak_memory_stats()
        metrics = train(config, LocalSession(run_dir, device=torch.device("cuda")))
    return {"mfu": metrics.get("mfu"), "tokens_per_s": metrics.get("tokens_per_s"),
            "first_loss": metrics.get("first_loss"), "loss": metrics.get("loss"),
            "loss_scale": metrics.get("loss_scale"), "precision": metrics.get("precision"),
            "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1024 ** 3, 2),
            "wall_s": round(time.perf_counter() - started, 1)}


def mfu_runs(steps: int, measured_peak: float) -> list[dict]:
    rows = []
    name = torch.cuda.get_device_name()
    datasheet = gpu_peak_flops(name, "bf16")
    for preset, batch in MFU_RUNS:
        for compiled in ((False, True) if supports_compile() else (False,)):
            extra = {"compile": True} if compiled else {}
            config = TrainConfig(model_size=preset, precision="bf16", seq_len=1024,
                                 batch_size=batch, max_steps=steps, log_every=steps // 2,
                                 checkpoint_every=10 * steps, warmup_steps=1, **extra)
            row = {"preset": preset, "batch": batch, "compile": compiled, **run(config)}
            if row["mfu"] is not None and datasheet:
                # The loop's MFU is against the datasheet peak; the same work over the
                # measured matmul peak says how close to the achievable it is.
                row["mfu_vs_measured_peak"] = round(row["mfu"] * datasheet / measured_peak, 4)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--measured-peak-tflops", type=float, default=790.0)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device"}))
        return 1
    name = torch.cuda.get_device_name()
    summary = {
        "device": name, "torch": torch.__version__,
        "capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "nvml": [dataclasses.asdict(g) for g in probe_nvml()],
        "auto_precision": resolve_precision("auto", torch.device("cuda")),
        "datasheet_bf16_tflops": (gpu_peak_flops(name, "bf16") or 0) / 1e12 or None,
        "measured_peak_tflops": args.measured_peak_tflops,
        "compile_supported_by_loop": supports_compile(),
        "bf16": mfu_runs(args.steps, args.measured_peak_tflops * 1e12),
        "fp16": run(TrainConfig(model_size="large", precision="fp16", seq_len=1024,
                                batch_size=16, max_steps=args.steps, log_every=args.steps // 2,
                                checkpoint_every=10 * args.steps, warmup_steps=1)),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
