"""Compress a trained GPT: prune, INT8 quantization-aware training, distillation, INT8 export.

    python jobs/compress.py --checkpoint ~/orchestrator-runs/pretrain-... --out compressed
    ray job submit --working-dir . -- python jobs/compress.py --checkpoint RUN --out DIR

--checkpoint takes a run directory (its newest usable checkpoint) or one checkpoint directory.
Stages (each resumable: rerun the same command to continue): [distil into a smaller
--student-size] -> prune (gradual, with distillation) -> QAT (with distillation) -> export
(int8 ONNX for ONNX Runtime + int8 torch tensors) -> report (table + report.json).

It runs in this one process: under `ray job submit` that is the job's driver, on the node Ray
chose; no Ray cluster is needed to run it locally.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from orchestrator.compression.config import CompressConfig
from orchestrator.config import MODEL_PRESETS, ConfigError

EXIT_BAD_INPUT = 2
EXIT_FAILED = 4


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = CompressConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a pretrain run directory (newest usable checkpoint) or a checkpoint "
                   "directory (holding state.pt)")
    p.add_argument("--out", required=True, help="output directory (rerun to resume)")
    p.add_argument("--student-size", choices=list(MODEL_PRESETS), default=None,
                   help="distil into this smaller preset first (default: the teacher's shape)")
    p.add_argument("--distill-steps", type=int, default=d.distill_steps,
                   help="fine-tune steps training a smaller --student-size from the teacher")
    p.add_argument("--prune-sparsity", type=float, default=d.prune_sparsity,
                   help="fraction of the block Linear weights to zero")
    p.add_argument("--prune-scope", choices=["global", "per_layer"], default=d.prune_scope)
    p.add_argument("--prune-steps", type=int, default=d.prune_steps)
    p.add_argument("--prune-ramp-fraction", type=float, default=d.prune_ramp_fraction,
                   help="share of --prune-steps over which sparsity rises to its target")
    p.add_argument("--prune-every", type=int, default=d.prune_every,
                   help="steps between mask updates while sparsity rises")
    p.add_argument("--qat-steps", type=int, default=d.qat_steps)
    p.add_argument("--weight-bits", type=int, default=d.weight_bits,
                   help="7: int8 weights in [-63, 63], exact on every x86 CPU; 8: [-127, 127], "
                   "exact only on CPUs with VNNI")
    p.add_argument("--alpha", type=float, default=d.alpha,
                   help="weight of cross-entropy on the data (1 - alpha: KL to the teacher)")
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seq-len", type=int, default=None,
                   help="fine-tune and perplexity window (default: the teacher's context)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=d.device)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="steps between a fine-tune's resumable progress checkpoints")
    p.add_argument("--eval-tokens", type=int, default=d.eval_tokens,
                   help="held-out tokens scored for perplexity")
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    p.add_argument("--latency-batch", type=int, default=d.latency_batch)
    p.add_argument("--latency-seq", type=int, default=d.latency_seq)
    p.add_argument("--latency-repeats", type=int, default=d.latency_repeats)
    p.add_argument("--threads", type=int, default=d.threads,
                   help="CPU threads for every latency measurement")
    p.add_argument("--no-onnx-baseline", dest="onnx_baseline", action="store_false",
                   help="skip timing the original model in ONNX Runtime fp32")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> CompressConfig:
    fields = {f for f in CompressConfig.__dataclass_fields__}
    return CompressConfig(**{k: v for k, v in vars(args).items() if k in fields})


class JobFailed(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def run(args: argparse.Namespace) -> dict:
    # Everything that can be wrong with the input is checked before --out is touched: a
    # refused run leaves no half-made output behind.
    from orchestrator.compression.export import ExportError
    from orchestrator.compression.pipeline import resolve_device, run_pipeline
    from orchestrator.compression.source import load_teacher
    from orchestrator.training.checkpoint import CheckpointError

    out = Path(args.out).expanduser().resolve()
    existed = out.exists()
    try:
        config = build_config(args)
        resolve_device(config.device)
        teacher, source = load_teacher(args.checkpoint, log=print)
    except (ConfigError, CheckpointError) as e:
        raise JobFailed(str(e), EXIT_BAD_INPUT) from None
    print(f"teacher: {source['model_size']} GPT, {source['params'] / 1e6:.2f}M params, step "
          f"{source['step']} ({source['checkpoint']})", flush=True)
    try:
        return run_pipeline(teacher, source, config, out)
    except ConfigError as e:
        raise JobFailed(str(e), EXIT_BAD_INPUT) from None
    except (CheckpointError, ExportError) as e:
        raise JobFailed(str(e), EXIT_FAILED) from None
    finally:
        # A run refused before its first stage leaves no empty --out behind.
        if not existed and out.is_dir() and not any(p.name != "compress_config.json"
                                                    for p in out.iterdir()):
            shutil.rmtree(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except JobFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    print(f"report: {Path(args.out).expanduser().resolve() / 'report.json'}")
    print(f"int8 model: {report['artifacts']['int8_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
