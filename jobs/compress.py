"""Compress a trained GPT: prune, INT8 quantization-aware training, distillation, INT8 export.

    python jobs/compress.py --checkpoint ~/orchestrator-runs/pretrain-... --out compressed
    ray job submit --working-dir . -- python jobs/compress.py --checkpoint RUN --out DIR

--checkpoint takes a run directory (its newest usable checkpoint) or one checkpoint directory.
Stages (each resumable: rerun the same command to continue): [distil into a smaller
--student-size] -> prune (gradual, with distillation; whole heads and MLP channels by default,
then the matrices shrink) -> QAT (with distillation) -> export
(int8 ONNX for ONNX Runtime + int8 torch tensors) -> report (table + report.json).

It runs in this one process: under `ray job submit` that is the job's driver, on the node Ray
chose; no Ray cluster is needed to run it locally.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from orchestrator.compression.config import DEVICES, CompressConfig
from orchestrator.compression.prune import SCOPES
from orchestrator.compression.structured import IMPORTANCE, STRUCTURES
from orchestrator.config import MODEL_PRESETS, ConfigError
from orchestrator.help_format import DefaultsHelpFormatter
from orchestrator.job_exit import EXIT_BAD_INPUT, EXIT_FAILED, JobFailed, on_one_line, run_job
from orchestrator.validation import expand_home, strict_float, strict_int


# Help for every flag (every CompressConfig field is one): --help shows each with its default,
# and test_compression_job checks that none is left without.
FLAG_HELP = {
    "student_size": "distil into this smaller preset first (default: the teacher's shape)",
    "distill_steps": "fine-tune steps training a smaller --student-size from the teacher",
    "prune_sparsity": "fraction of the block parameters to remove (structured) or of the "
                      "block Linear weights to zero (unstructured)",
    "prune_structure": "both: remove whole attention heads and MLP channels, shrinking the "
                       "matrices; heads / channels: only those; unstructured: zero single "
                       "weights (smaller nowhere, faster nowhere)",
    "prune_importance": "how heads and channels are ranked: first-order Taylor (w * grad "
                        "summed over the unit, squared) or weight magnitude",
    "prune_scope": "rank units across the whole stack (global: layers that matter less give "
                   "up more) or within each layer (per_layer: each at --prune-sparsity)",
    "prune_steps": "fine-tune steps of the pruning stage (distillation while sparsity rises)",
    "prune_ramp_fraction": "share of --prune-steps over which sparsity rises to its target",
    "prune_every": "steps between mask updates while sparsity rises",
    "qat_steps": "fine-tune steps of INT8 quantization-aware training (with distillation)",
    "weight_bits": "7: int8 weights in [-63, 63], exact on every x86 CPU; 8: [-127, 127], "
                   "exact only on CPUs with VNNI",
    "alpha": "weight of cross-entropy on the data (1 - alpha: KL to the teacher)",
    "temperature": "softmax temperature of the teacher's and student's logits in the KL term",
    "lr": "peak learning rate of every fine-tune (warmup, then cosine decay)",
    "warmup_steps": "learning-rate warmup steps of every fine-tune (at most its steps - 1)",
    "weight_decay": "AdamW weight decay of every fine-tune",
    "grad_clip": "gradient-norm clip of every fine-tune (0: no clipping)",
    "batch_size": "sequences per fine-tune step (and per calibration batch)",
    "seq_len": "fine-tune and perplexity window (default: the teacher's context)",
    "seed": "seed of the fine-tunes' batches and the latency inputs",
    "device": "where the fine-tunes run (auto: CUDA if available, else CPU)",
    "log_every": "steps between a fine-tune's progress lines",
    "checkpoint_every": "steps between a fine-tune's resumable progress checkpoints",
    "eval_tokens": "held-out tokens scored for perplexity",
    "eval_batch_size": "windows per perplexity batch",
    "latency_batch": "batch of the first latency shape (--latency-batch x --latency-seq)",
    "latency_batched": "the serving-like batch also timed (1: only --latency-batch)",
    "latency_seq": "tokens per latency shape, capped by the model's context (2 at least)",
    "latency_repeats": "timed rounds per shape; the report gives their median",
    "threads": "CPU threads for every latency measurement",
    # Flags that turn a default-on step off: say what happens without them, never argparse's
    # "(default: True)", which reads as "skipped by default".
    "onnx_baseline": "skip timing the original model in ONNX Runtime fp32 (default: timed)",
    "int8_static": "skip timing int8 with static (calibrated) activation scales "
                   "(default: timed)",
}
FLAG_CHOICES = {"student_size": list(MODEL_PRESETS), "prune_scope": list(SCOPES),
                "prune_structure": list(STRUCTURES), "prune_importance": list(IMPORTANCE),
                "device": list(DEVICES)}
FLAG_TYPES = {"seq_len": int}  # fields whose default (None) does not give the type
NUMBER_TYPES = {int: strict_int, float: strict_float}  # the number flags' strict reading


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a pretrain run directory (newest usable checkpoint) or a checkpoint "
                   "directory (holding state.pt, or an FSDP run's sharded meta.pt)")
    p.add_argument("--out", required=True, help="output directory (rerun to resume)")
    for field in dataclasses.fields(CompressConfig):
        flag = "--" + field.name.replace("_", "-")
        if isinstance(field.default, bool):  # on by default: the flag turns it off
            p.add_argument(flag.replace("--", "--no-", 1), dest=field.name,
                           action="store_false", help=FLAG_HELP.get(field.name))
        elif field.name in FLAG_CHOICES:
            p.add_argument(flag, choices=FLAG_CHOICES[field.name], default=field.default,
                           help=FLAG_HELP.get(field.name))
        else:
            kind = FLAG_TYPES.get(field.name, type(field.default))
            p.add_argument(flag, type=NUMBER_TYPES.get(kind, kind),
                           default=field.default, help=FLAG_HELP.get(field.name))
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> CompressConfig:
    fields = {f.name for f in dataclasses.fields(CompressConfig)}
    return CompressConfig(**{k: v for k, v in vars(args).items() if k in fields})


def run(args: argparse.Namespace) -> dict:
    # Everything that can be wrong with the input is checked before --out is touched: a
    # refused run leaves no half-made output behind.
    from orchestrator.compression.export import ExportError
    from orchestrator.compression.pipeline import (check_out_path, fine_tunes_finished,
                                                   resolve_device, run_pipeline)
    from orchestrator.compression.source import load_teacher
    from orchestrator.training.checkpoint import CheckpointError
    from orchestrator.training.loop import TrainingDiverged, is_out_of_memory

    for flag, value in (("--checkpoint", args.checkpoint), ("--out", args.out)):
        if not value.strip():  # `--out "$OUT"` with OUT unset: Path("") is the cwd
            raise JobFailed(f"{flag} is empty: give a directory", EXIT_BAD_INPUT)
    try:
        out = expand_home(args.out, "--out", ConfigError).resolve()
        config = build_config(args)
        resolve_device(config.device)
        check_out_path(out)  # before the teacher is read: that can take a while
        teacher, source = load_teacher(args.checkpoint, log=print)
    except (ConfigError, CheckpointError) as e:
        raise JobFailed(str(e), EXIT_BAD_INPUT) from None
    print(f"teacher: {source['model_size']} GPT, {source['params'] / 1e6:.2f}M params, step "
          f"{source['step']} ({source['checkpoint']})", flush=True)
    try:
        return run_pipeline(teacher, source, config, out)
    except ConfigError as e:
        raise JobFailed(str(e), EXIT_BAD_INPUT) from None
    except (CheckpointError, ExportError, TrainingDiverged) as e:
        raise JobFailed(str(e), EXIT_FAILED) from None
    except OSError as e:  # a full disk, a mount gone read-only: one line, not a traceback
        raise JobFailed(f"cannot read or write a file: {e}", EXIT_FAILED) from None
    except RuntimeError as e:  # torch's allocator failing: a traceback naming no flag
        if not is_out_of_memory(e):
            raise
        raise JobFailed(out_of_memory_message(config, teacher.config.block_size, e,
                                              fine_tunes_finished(out)), EXIT_FAILED) from None
    # (A run refused before its first stage leaves no --out it made behind: out_held.)


def out_of_memory_message(config: CompressConfig, block_size: int, error: Exception,
                          fine_tunes_finished: bool = False) -> str:
    """One line for torch failing to allocate memory (training.loop.is_out_of_memory): what
    torch says, from its allocator's words on, and the flags that size the memory, each with
    what a rerun may do with it. The report's change only the report. The fine-tunes' restart
    the unfinished fine-tunes on a rerun of this --out, keeping the finished stages
    (pipeline.restart_stages); once they are all finished (`fine_tunes_finished`: qat/ is
    there) such a rerun is refused (pipeline.check_out), so the line names a new --out."""
    from orchestrator.training.loop import OUT_OF_MEMORY_MARKS

    text = on_one_line(str(error))
    start = min((text.find(mark) for mark in OUT_OF_MEMORY_MARKS if mark in text), default=0)
    fine_tunes = (f"--batch-size {config.batch_size} x --seq-len "
                  f"{config.seq_len or block_size} tokens a step")
    report = (f"the report --eval-batch-size {config.eval_batch_size} windows and "
              f"--latency-batched {config.latency_batched} rows at a time")
    if fine_tunes_finished:
        return (f"out of memory: {text[start:start + 200]}; {report} (lower them on a rerun "
                f"of this --out); the fine-tunes ({fine_tunes}) are all finished: to change "
                "them, use a new --out")
    return (f"out of memory: {text[start:start + 200]}; the fine-tunes take {fine_tunes} "
            f"(lower them on a rerun of this --out: the stages already finished are kept and "
            f"the others start over from step 0), {report} (lower them on a rerun)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    code, report = run_job(lambda: run(args),
                           on_interrupt="interrupted; rerun the same command to resume")
    if code == 0:
        # (--out was read with expand_home already: a `~user` of no user was refused then)
        print(f"report: {expand_home(args.out, '--out').resolve() / 'report.json'}")
        print(f"int8 model: {report['artifacts']['int8_dir']}")
    return code


if __name__ == "__main__":
    sys.exit(main())
