"""Benchmark the compression pipeline on a model whose Linear layers dominate (~20M params).

    python -m scripts.bench_compress            # about 10-15 minutes on 2 CPU cores

Trains its own teacher first (a 6-layer, 528-wide GPT, 20.3M parameters, 250 steps on the
project's corpus: no download, no checkpoint needed), then runs the same pipeline as
jobs/compress.py (prune -> QAT -> int8 export, with pure distillation: alpha 0) and measures
original vs int8 on this machine's CPU. The last stdout line is one JSON object:

    size_ratio          original fp32 weights bytes / int8 ONNX bytes        (target >= 3.5)
    latency_ratio       original (torch fp32) / int8 (ONNX Runtime), CPU     (target >= 2)
    latency_ratio_vs_onnx_fp32  the same against the original in ONNX Runtime fp32
    ppl_original, ppl_int8, ppl_increase_pct   held-out perplexity          (target <= 5%)
    sparsity            zeros in the int8 block Linear weights              (target >= 0.30)
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from orchestrator.compression.artifacts import load_tensors, save_tensors
from orchestrator.compression.config import CompressConfig
from orchestrator.compression.finetune import Plan, finetune, say
from orchestrator.compression.pipeline import run_pipeline
from orchestrator.compression.source import weights_digest
from orchestrator.training.data import load_corpus, split_corpus
from orchestrator.training.model import GPT, GPTConfig

TEACHER_STREAM = 100  # the teacher's own batch stream (get_batch rank)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--n-embd", type=int, default=528)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--teacher-steps", type=int, default=250)
    p.add_argument("--teacher-lr", type=float, default=2e-3)
    p.add_argument("--prune-steps", type=int, default=80)
    p.add_argument("--qat-steps", type=int, default=80)
    # Pure distillation by default: the fine-tunes learn from the teacher only, never from the
    # data directly, so the perplexity change measures what compression costs rather than
    # what 160 more training steps on an under-trained teacher's data would add.
    p.add_argument("--alpha", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=CompressConfig.lr)
    # One thread per runtime by default: on a 2-core machine shared with other work, a
    # second OpenMP thread that loses its core stalls every torch op at a barrier (measured:
    # torch fp32 63 ms -> 337 ms at 1 x 16 tokens, ONNX Runtime barely moved), which would
    # inflate latency_ratio. On a quiet machine pass --threads 2.
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--latency-batch", type=int, default=1)
    p.add_argument("--latency-seq", type=int, default=64)
    p.add_argument("--latency-repeats", type=int, default=30)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--work", help="keep the teacher and the pipeline's outputs here (a rerun "
                   "reuses them); default: a temporary directory, deleted at the end")
    return p.parse_args(argv)


def teacher_model(args: argparse.Namespace, work: Path) -> GPT:
    """Train the teacher (or reuse the one a previous run with --work left)."""
    config = GPTConfig(block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
                       n_embd=args.n_embd)
    path = work / "teacher.pt"
    model = GPT(config)
    if path.is_file():
        model.load_state_dict(load_tensors(path)["model"])
        say(f"teacher: reusing {path}")
        return model.eval()
    torch.manual_seed(args.seed)
    model = GPT(config)
    say(f"teacher: training a {args.n_layer}x{args.n_embd} GPT "
        f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params) for "
        f"{args.teacher_steps} steps")
    plan = Plan(stage="teacher", steps=args.teacher_steps, stream=TEACHER_STREAM,
                lr=args.teacher_lr, warmup_steps=20, weight_decay=0.1, grad_clip=1.0,
                batch_size=args.batch_size, seq_len=args.block_size, seed=args.seed,
                alpha=1.0, temperature=1.0, log_every=25, checkpoint_every=10 ** 9)
    finetune(model, None, split_corpus(load_corpus())[0], plan, torch.device("cpu"))
    save_tensors(path, {"model": model.state_dict()})
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    work = Path(args.work).expanduser().resolve() if args.work else Path(
        tempfile.mkdtemp(prefix="bench-compress-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        teacher = teacher_model(args, work)
        teacher_seconds = time.perf_counter() - started
        params = sum(p.numel() for p in teacher.parameters())
        source = {"checkpoint": None, "sha256": weights_digest(teacher),
                  "model_size": f"bench {args.n_layer}x{args.n_embd}", "params": params,
                  "step": args.teacher_steps}
        config = CompressConfig(
            prune_steps=args.prune_steps, prune_every=max(1, args.prune_steps // 8),
            qat_steps=args.qat_steps, alpha=args.alpha, lr=args.lr,
            batch_size=args.batch_size, seed=args.seed, threads=args.threads,
            latency_batch=args.latency_batch, latency_seq=args.latency_seq,
            latency_repeats=args.latency_repeats, eval_tokens=args.eval_tokens,
            checkpoint_every=25, log_every=20, device="cpu")
        report = run_pipeline(teacher, source, config, work / "compressed")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    rows = {r["model"]: r for r in report["rows"]}
    result = {
        **report["summary"],
        "params": params,
        "size_original_bytes": rows["original"]["size_bytes"],
        "size_int8_bytes": rows["int8"]["size_bytes"],
        "latency_original_ms": rows["original"]["latency_ms"],
        "latency_int8_ms": rows["int8"]["latency_ms"],
        "latency_original_onnx_fp32_ms": rows.get("original-onnx", {}).get("latency_ms"),
        "latency_shape": [args.latency_batch, report["latency_setup"]["seq_len"]],
        "threads": args.threads,
        "alpha": args.alpha,
        "ppl_pruned": rows["pruned"]["perplexity"],
        "load_average_1min": report["latency_setup"]["cpu"]["load_average_1min"],
        "teacher_seconds": round(teacher_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
