"""Benchmark the compression pipeline on a model whose Linear layers dominate (~20M params).

    python -m scripts.bench_compress --work ~/.cache/bench-compress   # teacher cached there

Trains its own teacher first (a 6-layer, 528-wide GPT, 20.3M parameters, on the project's
corpus: no download, no checkpoint needed; cached under --work), then runs the same pipeline
as jobs/compress.py (structured pruning of 30% of the block parameters -> QAT -> int8 export,
with pure distillation: alpha 0) and, with --student-size, the pipeline again on a smaller
student distilled from the teacher (its own row). Every latency is the median of rounds in
which the models take turns, at the same thread count, on this machine's CPU. The last stdout
line is one JSON object:

    latency_ratio_vs_onnx_fp32          original in ONNX Runtime fp32 / int8 in ONNX Runtime,
                                        at 1 x 64 tokens                       (target >= 2)
    latency_ratio_vs_onnx_fp32_batched  the same at 16 x 64
    latency_ratio_vs_onnx_fp32_decode   the same for one decode step (KV cache, 63 cached)
    latency_ratio_vs_onnx_fp32_by_shape every shape, incl. a 16-row decode step
    faster_int8_scheme_by_shape         dynamic or static activation scales, per shape
    size_ratio          original fp32 weights bytes / int8 ONNX bytes          (target >= 4)
    ppl_original, ppl_int8, ppl_increase_pct   held-out perplexity            (target <= 5%)
    sparsity            fraction of the block parameters removed               (target >= 0.30)
    decode_ms           one decode step per model and runtime (torch and ONNX Runtime)
    student             the distilled smaller student's row (with --student-size)
    cpu_isa             the widest int8 instruction set of the CPU the figures were taken on
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
from orchestrator.config import MODEL_PRESETS, ConfigError
from orchestrator.compression.finetune import Plan, finetune, say
from orchestrator.help_format import DefaultsHelpFormatter
from orchestrator.runs import writable_dir_problem
from orchestrator.compression.pipeline import (check_eval_window, check_settings,
                                               run_pipeline)
from orchestrator.compression.source import weights_digest
from orchestrator.training.data import load_corpus, split_corpus
from orchestrator.training.memory import parameters_label
from orchestrator.training.model import GPT, GPTConfig
from orchestrator.validation import (TORCH_THREADS_RULE, expand_home, is_number,
                                     is_torch_threads, strict_float, strict_int)
from scripts.flags import require, require_at_least

TEACHER_STREAM = 100  # the teacher's own batch stream (get_batch rank)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--n-layer", type=strict_int, default=6)
    p.add_argument("--n-embd", type=strict_int, default=528)
    p.add_argument("--n-head", type=strict_int, default=8)
    p.add_argument("--block-size", type=strict_int, default=64)
    p.add_argument("--batch-size", type=strict_int, default=8)
    p.add_argument("--teacher-steps", type=strict_int, default=250)
    p.add_argument("--teacher-lr", type=strict_float, default=2e-3)
    p.add_argument("--prune-steps", type=strict_int, default=80)
    p.add_argument("--qat-steps", type=strict_int, default=80)
    # Pure distillation by default: the fine-tunes learn from the teacher only, never from the
    # data directly, so the perplexity change measures what compression costs rather than
    # what 160 more training steps on an under-trained teacher's data would add.
    p.add_argument("--alpha", type=strict_float, default=0.0)
    p.add_argument("--lr", type=strict_float, default=CompressConfig.lr)
    # One thread per runtime by default: on a 2-core machine shared with other work, a
    # second OpenMP thread that loses its core stalls every torch op at a barrier (measured:
    # torch fp32 63 ms -> 337 ms at 1 x 16 tokens, ONNX Runtime barely moved), which would
    # inflate latency_ratio. On a quiet machine pass --threads 2.
    p.add_argument("--threads", type=strict_int, default=1)
    p.add_argument("--latency-batch", type=strict_int, default=1)
    p.add_argument("--latency-batched", type=strict_int, default=16)
    p.add_argument("--latency-seq", type=strict_int, default=64)
    p.add_argument("--latency-repeats", type=strict_int, default=30)
    p.add_argument("--eval-tokens", type=strict_int, default=16384)
    p.add_argument("--seed", type=strict_int, default=1337)
    p.add_argument("--prune-structure", default="both",
                   choices=("both", "heads", "channels", "unstructured"))
    p.add_argument("--student-size", default=None,
                   help="also distil a student of this preset (tiny, small, medium) from the "
                   "teacher and compress it: its own row")
    p.add_argument("--distill-steps", type=strict_int, default=150)
    p.add_argument("--work", help="keep the teacher and the pipeline's outputs here (a rerun "
                   "reuses them); default: a temporary directory, deleted at the end")
    args = p.parse_args(argv)
    # Every setting checked now, not after the teacher's minutes of training (the student's
    # after the whole pipeline): a typo failed as a traceback, its work deleted.
    require(p, args, ("threads",), is_torch_threads, TORCH_THREADS_RULE)
    if args.work:
        try:
            args.work = expand_home(args.work, "--work")
        except ValueError as e:
            p.error(str(e))
        # A file there (or above it): main's mkdir raised FileExistsError / NotADirectoryError.
        problem = writable_dir_problem(args.work)
        if problem:
            p.error(f"--work {args.work}: {problem}")
    if args.student_size is not None and args.student_size not in MODEL_PRESETS:
        p.error(f"--student-size must be one of {', '.join(MODEL_PRESETS)}, got "
                f"{args.student_size!r}")
    require_at_least(p, args, 1, "teacher_steps", "distill_steps", "n_layer", "n_head", "n_embd",
                     "block_size")
    # The teacher's own settings, which no CompressConfig checks: AdamW refused a bad lr, and
    # the attention layer a width heads cannot split, as tracebacks naming no flag.
    require(p, args, ("teacher_lr",), lambda lr: is_number(lr) and 0 < lr < 1,
            "must be a number in (0, 1)")
    if args.n_embd % args.n_head:
        p.error(f"--n-embd must divide by --n-head, got {args.n_embd} and {args.n_head}")
    try:
        configs = [compress_config(args)]
        if args.student_size:
            configs.append(compress_config(args, student_size=args.student_size,
                                           distill_steps=args.distill_steps))
        teacher = GPTConfig(**teacher_shape(args))
        # What the pipeline would refuse only after the teacher's training (and, for the
        # student, after the first pipeline): asked now, as the flags' own errors.
        held_out = split_corpus(load_corpus())[1]
        for config in configs:
            check_settings(teacher, config)
            check_eval_window(config, held_out, args.block_size)
    except (ConfigError, ValueError) as e:
        p.error(str(e))
    return args


def teacher_shape(args: argparse.Namespace) -> dict:
    return dict(block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
                n_embd=args.n_embd)


def teacher_settings(args: argparse.Namespace) -> dict:
    """What the teacher is trained with: kept beside teacher.pt, and compared before a rerun
    reuses it (it was reused whatever the flags said, and reported with the new ones)."""
    return {**teacher_shape(args), "teacher_steps": args.teacher_steps,
            "teacher_lr": args.teacher_lr, "batch_size": args.batch_size, "seed": args.seed}


def teacher_model(args: argparse.Namespace, work: Path) -> GPT:
    """Train the teacher (or reuse the one a previous run with --work left)."""
    config = GPTConfig(**teacher_shape(args))
    path = work / "teacher.pt"
    model = GPT(config)
    if path.is_file():
        saved = load_tensors(path)
        if saved.get("settings") != teacher_settings(args):
            raise SystemExit(f"error: {path} was trained with {saved.get('settings')}, not "
                             f"{teacher_settings(args)}: use another --work, or delete it")
        model.load_state_dict(saved["model"])
        say(f"teacher: reusing {path}")
        return model.eval()
    torch.manual_seed(args.seed)
    model = GPT(config)
    say(f"teacher: training a {args.n_layer}x{args.n_embd} GPT "
        f"({parameters_label(model.num_params(non_embedding=False))}) for "
        f"{args.teacher_steps} steps")
    plan = Plan(stage="teacher", steps=args.teacher_steps, stream=TEACHER_STREAM,
                lr=args.teacher_lr, warmup_steps=20, weight_decay=0.1, grad_clip=1.0,
                batch_size=args.batch_size, seq_len=args.block_size, seed=args.seed,
                alpha=1.0, temperature=1.0, log_every=25, checkpoint_every=10 ** 9)
    finetune(model, None, split_corpus(load_corpus())[0], plan, torch.device("cpu"))
    save_tensors(path, {"model": model.state_dict(), "settings": teacher_settings(args)})
    return model.eval()


def compress_config(args: argparse.Namespace, **overrides) -> CompressConfig:
    settings = dict(
        prune_steps=args.prune_steps, prune_every=max(1, args.prune_steps // 8),
        prune_structure=args.prune_structure, qat_steps=args.qat_steps, alpha=args.alpha,
        lr=args.lr, batch_size=args.batch_size, seed=args.seed, threads=args.threads,
        latency_batch=args.latency_batch, latency_batched=args.latency_batched,
        latency_seq=args.latency_seq, latency_repeats=args.latency_repeats,
        eval_tokens=args.eval_tokens, checkpoint_every=25, log_every=20, device="cpu")
    return CompressConfig(**{**settings, **overrides})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    # The same thread count for training and every runtime measured: on a shared 2-core
    # machine a second OpenMP thread that loses its core stalls every op at a barrier.
    torch.set_num_threads(args.threads)
    work = Path(args.work).resolve() if args.work else Path(
        tempfile.mkdtemp(prefix="bench-compress-"))
    work.mkdir(parents=True, exist_ok=True)
    student_report = None
    try:
        cached = (work / "teacher.pt").is_file()
        teacher = teacher_model(args, work)
        teacher_seconds = time.perf_counter() - started
        params = sum(p.numel() for p in teacher.parameters())
        source = {"checkpoint": None, "sha256": weights_digest(teacher),
                  "model_size": f"bench {args.n_layer}x{args.n_embd}", "params": params,
                  "step": args.teacher_steps}
        report = run_pipeline(teacher, source, compress_config(args), work / "compressed")
        if args.student_size:
            student_report = run_pipeline(
                teacher, source, compress_config(args, student_size=args.student_size,
                                                 distill_steps=args.distill_steps),
                work / f"student-{args.student_size}")
    except ConfigError as e:  # a --work made with other settings, say: one line, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(bench_result(args, report, student_report, params, cached,
                                  teacher_seconds, time.perf_counter() - started)))
    return 0


def bench_result(args, report, student_report, params, cached, teacher_seconds, total):
    rows = {r["model"]: r for r in report["rows"]}
    summary = report["summary"]
    by_shape = summary.get("latency_ratio_vs_onnx_fp32_by_shape", {})
    shapes = list(report["latency_setup"]["shapes"])
    prefill, batched = shapes[0], next((s for s in shapes[1:] if not s.startswith("decode")),
                                       None)
    decode = next(s for s in shapes if s.startswith("decode"))
    result = {
        **{k: v for k, v in summary.items()},
        "latency_ratio_vs_onnx_fp32_batched": by_shape.get(batched),
        "latency_ratio_vs_onnx_fp32_decode": by_shape.get(decode),
        "latency_ms": {name: row["latency_ms_by_shape"] for name, row in rows.items()},
        "decode_ms": {name: row["latency_ms_by_shape"][decode] for name, row in rows.items()},
        "params": params,
        "size_original_bytes": rows["original"]["size_bytes"],
        "size_int8_bytes": rows["int8"]["size_bytes"],
        "shapes": shapes, "primary_shape": prefill,
        "threads": args.threads, "alpha": args.alpha, "prune_structure": args.prune_structure,
        "teacher_steps": args.teacher_steps, "prune_steps": args.prune_steps,
        "qat_steps": args.qat_steps,
        "ppl_pruned": rows["pruned"]["perplexity"],
        "cpu_isa": report["latency_setup"]["cpu"]["isa"],
        "load_average_1min": report["latency_setup"]["cpu"]["load_average_1min"],
        "teacher_cached": cached,
        "teacher_seconds": round(teacher_seconds, 1),
        "total_seconds": round(total, 1),
    }
    if student_report is not None:
        srows = {r["model"]: r for r in student_report["rows"]}
        result["student"] = {
            "size": args.student_size,
            "distilled": {k: srows["distilled"][k] for k in
                          ("size_bytes", "latency_ms_by_shape", "perplexity")},
            "int8": {k: srows["int8"][k] for k in
                     ("size_bytes", "latency_ms_by_shape", "perplexity")},
            "summary": student_report["summary"]}
    return result


if __name__ == "__main__":
    sys.exit(main())
