"""Pretrain a GPT-style model on the cluster, through the scheduler and Ray Train.

    python jobs/pretrain.py                      # embedded local Ray, default small model
    ray job submit --working-dir . -- python jobs/pretrain.py --max-steps 20

The path of a job: connect (or start Ray) -> scheduler and node agents up, each node reported
-> the scheduler places the workers -> Ray Train runs them exactly there -> checkpoints ->
summary.json in the run directory.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import shlex
import sys
import time
from collections import Counter
from pathlib import Path

from orchestrator.config import (LR_SCHEDULES, MAX_GPU_MEMORY_GB, MAX_HOST_MEMORY_GB,
                                 MODEL_PRESETS, PRECISIONS, STRATEGIES, ConfigError, JobSpec,
                                 TrainConfig, resume_conflicts, saved_train_config_problem)
from orchestrator.help_format import DefaultsHelpFormatter
from orchestrator.hf_export import ExportError, check_init_context
from orchestrator.tokenizer import TOKENIZER_FILE, TokenizerError, save_tokenizer
from orchestrator.training.corpus import DataError
from orchestrator.training.data_plan import (DataSetup, check_trainable, configure_data,
                                             default_cache_root, resume_data_conflicts)
from orchestrator.job_exit import (EXIT_BAD_INPUT, EXIT_FAILED, EXIT_NOT_PLACEABLE, JobFailed,
                                  run_job)
from orchestrator.launch import (host_memory_per_worker_gb, host_memory_refusal_named,
                                 refuse_a_cpu_run_past_this_machine,
                                 refuse_what_embedded_ray_cannot_hold)
from orchestrator.runs import (CONFIG_FILE, DEFAULT_RUNS_ROOT, SUMMARY_FILE, RunDirError,
                              ResumePoint, checkpoint_verdicts_kept, has_checkpoints,
                              not_a_run_dirs_files, resolve_run_dir, resume_point, run_dir_held,
                              verified_newest)
from orchestrator.placement import describe_decision
from orchestrator.throughput import pretrain_workload
from orchestrator.validation import given_by_flags, strict_float, strict_int
from orchestrator.training.memory import (LOWER_MEMORY, gpu_memory_needed_gb, memory_lines,
                                         sizing_flags)

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--address", help="Ray cluster address (host:port, or auto: the one `ray "
                   "start` runs on this machine); default: RAY_ADDRESS, else start an "
                   "embedded local Ray")
    p.add_argument("--run-dir", help=f"run directory (default: a new one under "
                   f"{DEFAULT_RUNS_ROOT}; on a multi-node cluster use shared storage)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir (default: the newest pretrain-* run) from its "
                   "latest checkpoint")
    p.add_argument("--dry-run", action="store_true",
                   help="print the memory a worker needs under DDP and FSDP and the placement "
                   "the scheduler would give now; starts no training and writes no run directory")
    p.add_argument("--model-size", choices=list(MODEL_PRESETS), default=defaults.model_size,
                   help="model preset (docs/training.md: tiny to xl, GPT-2 shapes)")
    p.add_argument("--precision", choices=list(PRECISIONS), default=defaults.precision,
                   help="auto: bf16 on GPUs that support it, fp16 + loss scaling on older "
                   "GPUs, fp32 on CPU")
    p.add_argument("--strategy", choices=list(STRATEGIES), default=defaults.strategy,
                   help="ddp: every worker holds the whole model; fsdp: FSDP2 shards "
                   "parameters, gradients and optimizer state over the workers (models DDP "
                   "cannot hold; sharded checkpoints). Either resumes the other's checkpoints")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on CUDA unless --attention-span, "
                   "off on CPU unless --compile; docs/training.md)")
    p.add_argument("--max-steps", type=strict_int, default=defaults.max_steps,
                   help="optimizer steps to train to (micro-batches with --accumulation)")
    p.add_argument("--batch-size", type=strict_int, default=defaults.batch_size,
                   help="sequences per worker per step")
    p.add_argument("--seq-len", type=strict_int, default=defaults.seq_len,
                   help="tokens per sequence (the model's context)")
    p.add_argument("--lr", type=strict_float, default=defaults.lr, help="peak learning rate")
    p.add_argument("--min-lr", type=strict_float, default=None,
                   help="where the cosine schedule ends (default: --lr / 10; on --resume, the "
                   "run's own)")
    p.add_argument("--lr-schedule", choices=list(LR_SCHEDULES), default=defaults.lr_schedule,
                   help="after warmup: cosine to min_lr, step (x0.1 every --lr-decay-every "
                   "steps) or constant")
    p.add_argument("--lr-decay-every", type=strict_int, default=defaults.lr_decay_every,
                   help="steps between x0.1 decays (--lr-schedule step)")
    p.add_argument("--warmup-steps", type=strict_int, default=defaults.warmup_steps,
                   help="linear warmup to --lr")
    p.add_argument("--checkpoint-every", type=strict_int, default=defaults.checkpoint_every,
                   help="steps between checkpoints")
    p.add_argument("--attention-span", action="store_true",
                   help="learnable per-head attention span (keys beyond the learnt window are "
                   "never computed); default: standard causal attention")
    p.add_argument("--span-ramp", type=strict_int, default=defaults.span_ramp,
                   help="width of the soft edge of each head's span, tokens")
    p.add_argument("--span-penalty", type=strict_float, default=defaults.span_penalty,
                   help="weight of the L1 penalty on spans in the loss")
    p.add_argument("--accumulation", default=defaults.accumulation,
                   help="gradient accumulation factor: K for every parameter group, or per "
                   "group, e.g. embeddings=4,lower=2,upper=1,head=1 (--max-steps counts "
                   "micro-batches)")
    p.add_argument("--log-every", type=strict_int, default=defaults.log_every,
                   help="steps between reports (loss, tokens/s, MFU)")
    p.add_argument("--seed", type=strict_int, default=defaults.seed,
                   help="initialisation and data seed")
    p.add_argument("--num-workers", type=strict_int, default=2,
                   help="training workers (DDP/FSDP ranks)")
    p.add_argument("--cpus-per-worker", type=strict_float, default=1.0,
                   help="CPUs each worker reserves")
    p.add_argument("--gpus-per-worker", type=strict_int, default=0,
                   help="GPUs each worker reserves (0: CPU training; more than 1 is refused)")
    p.add_argument("--min-gpu-memory-gb", type=strict_float, default=None,
                   help="free GPU memory each worker's GPU must have (default with GPUs: the "
                   "run's estimated need, as --dry-run prints; 0: no check)")
    p.add_argument("--accelerator-type", action="append", default=[], dest="accelerator_types",
                   help="allowed accelerator family, e.g. A100 (repeatable; default: any)")
    p.add_argument("--min-bandwidth-gbps", type=strict_float, default=0.0,
                   help="bandwidth floor between every pair of nodes the job spans, in GB/s "
                        "(gigabytes per second: 100 Gb/s is 12.5)")
    p.add_argument("--priority", type=strict_int, default=0,
                   help="queue priority (higher first); a job may preempt running jobs of "
                   "lower priority, which checkpoint, wait and resume")
    p.add_argument("--expected-duration-s", type=strict_float, default=None,
                   help="your estimate of the run time: lets the queue backfill the job into "
                   "short gaps and the scheduler weigh moving it to faster accelerators")
    p.add_argument("--queue-timeout", type=strict_float, default=600.0,
                   help="seconds to wait in the scheduler's queue when the cluster is busy "
                   "(0: fail at once); time spent preempted is not counted")
    p.add_argument("--max-failures", type=strict_int, default=3,
                   help="worker-group restarts Ray Train attempts before giving up")
    data = p.add_argument_group("data and tokenizer (docs/data.md)")
    data.add_argument("--data", action="append", default=[],
                      help="training text: a file, directory or glob of .txt, .jsonl or "
                      ".parquet, local or a URI (s3://...); repeatable. Default: the bundled "
                      "corpus")
    data.add_argument("--text-field", default="text",
                      help="the text field of .jsonl records / column of .parquet files")
    data.add_argument("--skip-bad-lines", action="store_true",
                      help="skip (and count) .jsonl lines or parquet rows without the text "
                      "field instead of stopping")
    data.add_argument("--tokenizer", default="bytes",
                      help="'bytes', or a Hugging Face tokenizer.json (or a directory with one)")
    data.add_argument("--train-tokenizer", type=strict_int, metavar="VOCAB_SIZE",
                      help="train a byte-level BPE of this many tokens on the data")
    data.add_argument("--data-cache", help="where token shards are cached (a path or URI "
                      "every node reads; default: data-cache/ beside the run directory)")
    data.add_argument("--retokenize", action="store_true",
                      help="tokenize again even when the cache has the shards")
    data.add_argument("--ingest-workers", type=strict_int, default=0,
                      help="Ray Data tokenizer workers (default: the cluster's CPUs)")
    data.add_argument("--init-from", metavar="DIR",
                      help="start from a GPT-2-shaped Hugging Face model directory "
                      "(config.json, model.safetensors, tokenizer.json): fine-tuning")
    args = p.parse_args(argv)
    args.flags = {a.dest: a.option_strings[0] for a in p._actions if a.option_strings}
    args.given = _flags_given(p, argv)
    return args


def _flags_given(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The destinations of the flags on the command line (not left at their defaults): on
    --resume the others come from the run itself."""
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


# Flags that are the run's own settings (config.json's train and job sections): on --resume,
# those not given are the run's, not the defaults (`pretrain.py --resume` alone continues a
# run started with --model-size tiny). Left out: the minimum GPU memory (without the flag it
# is the run's estimated need, worked out again for the settings resumed with), the host RAM
# per worker (always that estimate, for CPU runs), and the data
# and --init-from (configure_data resumes them: recorded_data).
NOT_INHERITED = {"name", "min_gpu_memory_gb", "min_host_memory_gb", "data_cache", "init_from"}
INHERITED = {**{f.name: "train" for f in dataclasses.fields(TrainConfig)
                if f.name not in NOT_INHERITED},
             **{f.name: "job" for f in dataclasses.fields(JobSpec)
                if f.name not in NOT_INHERITED}}


def inherit_run_settings(args: argparse.Namespace, run_dir: Path) -> list[str]:
    """On --resume: every run setting not given on the command line set to the run's
    recorded value (config.json). Returns the settings that differ from the flags' defaults,
    as 'name value' (said once, so the user sees what the run goes on with)."""
    where = run_dir / CONFIG_FILE
    saved = _run_config(run_dir)
    taken = []
    for dest, section in INHERITED.items():
        recorded = saved.get(section, {})
        if not hasattr(args, dest) or dest in getattr(args, "given", ()) or dest not in recorded:
            continue
        if dest == "accelerator_types" and "gpus_per_worker" in getattr(args, "given", ()) \
                and args.gpus_per_worker == 0:  # on CPU workers the run's GPU families
            continue  # are no choice to keep (and no flag could clear them)
        value = recorded[dest]
        if not _recorded_kind_fits(value, getattr(args, dest)):
            flag = getattr(args, "flags", {}).get(dest, f"--{dest.replace('_', '-')}")
            raise ConfigError(f"--resume: {where}: {section}.{dest} is {value!r}, which no "
                              f"{flag} could have given; pass {flag} with the run's value")
        # What the flag would give: --min-lr's absence means --lr / 10 (of the run's --lr,
        # taken just before), not None.
        default = _min_lr(args) if dest == "min_lr" else getattr(args, dest)
        if value != default:
            taken.append(f"{dest} {value}")
        setattr(args, dest, value)
    return taken


def _run_config(run_dir: Path) -> dict:
    """The config.json of the run being resumed ({} where there is none); ConfigError naming
    it when its train or job section is not a mapping (read first by resolve_data, where
    such a file was a traceback), or its train section lacks a field every version wrote
    (saved_train_config_problem: the flag's default was taken, and the workers refused the
    run's checkpoint after placement). The first version wrote the train fields alone, with
    no sections: such a file has no train section, and nothing is inherited from it."""
    where = run_dir / CONFIG_FILE
    saved = _read_json(where) or {}
    if not isinstance(saved, dict) or not all(isinstance(saved.get(section, {}), dict)
                                              for section in ("train", "job")):
        raise ConfigError(f"--resume: {where} is not a run's config (its train and job "
                          "sections must be mappings); restore it, or start a new run")
    problem = saved_train_config_problem(saved["train"]) if "train" in saved else None
    if problem:
        raise ConfigError(f"--resume: {where}: {problem}; restore it, or start a new run")
    return saved


def build_configs(args: argparse.Namespace, run_dir: Path, data_fields: dict | None = None
                  ) -> tuple[TrainConfig, JobSpec]:
    """Validated configs; a ConfigError names every bad field at once. `data_fields`: the
    TrainConfig fields the data and tokenizer flags resolved to (configure_data)."""
    taken = inherit_run_settings(args, run_dir) if args.resume else []
    problems = _launcher_problems(args)
    fields = {"model_size": args.model_size, **(data_fields or {})}  # --init-from sets the size
    if "model_size" in getattr(args, "given", ()) and fields["model_size"] != args.model_size:
        problems.append(f"--model-size {args.model_size}: the --init-from model has the "
                        f"{fields['model_size']} preset's shape; leave --model-size out")
    train_config, left_pending = None, None
    # Each field's problem names its flag: `seq_len (--seq-len) must be ...`
    with given_by_flags(getattr(args, "flags", {})):
        try:
            train_config = TrainConfig(
                precision=args.precision, max_steps=args.max_steps,
                batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                lr_schedule=args.lr_schedule, lr_decay_every=args.lr_decay_every,
                warmup_steps=args.warmup_steps, attention_span=args.attention_span,
                span_ramp=args.span_ramp, span_penalty=args.span_penalty,
                accumulation=args.accumulation, min_lr=_min_lr(args),
                checkpoint_every=args.checkpoint_every, log_every=args.log_every, seed=args.seed,
                strategy=args.strategy, compile=args.compile, **fields)
        except ConfigError as e:
            problems.append(str(e))
        min_gpu_memory_gb = (_min_gpu_memory_gb(args, train_config)
                             if train_config and args.num_workers >= 1
                             else args.min_gpu_memory_gb or 0.0)
        if args.min_gpu_memory_gb is None and min_gpu_memory_gb > MAX_GPU_MEMORY_GB:
            # (not JobSpec's "--min-gpu-memory-gb must be in [0, 10000]": a flag not given)
            problems.append(_need_past_any_gpu(args, train_config, min_gpu_memory_gb))
            min_gpu_memory_gb = 0.0
        # A CPU run's workers ask placement for their estimated RAM (--dry-run's figure)
        host_memory_gb = (host_memory_per_worker_gb(train_config, args.num_workers,
                                                    args.gpus_per_worker)
                          if train_config and args.num_workers >= 1 else 0.0)
        if host_memory_gb > MAX_HOST_MEMORY_GB:
            problems.append(f"the run's estimated need of {host_memory_gb:,.1f} GiB of RAM on "
                            f"each CPU worker ({sizing_flags(train_config)}) is more than any "
                            f"node has (over {MAX_HOST_MEMORY_GB:,} GiB): {LOWER_MEMORY}")
            host_memory_gb = 0.0
        try:  # checked even when the TrainConfig is not: every bad flag named at once
            spec = JobSpec(name=run_dir.name, num_workers=args.num_workers,
                           cpus_per_worker=args.cpus_per_worker,
                           gpus_per_worker=args.gpus_per_worker,
                           min_gpu_memory_gb=min_gpu_memory_gb,
                           min_host_memory_gb=host_memory_gb,
                           min_bandwidth_gbps=args.min_bandwidth_gbps,
                           accelerator_types=tuple(args.accelerator_types), priority=args.priority,
                           expected_duration_s=args.expected_duration_s,
                           workload=pretrain_workload(train_config) if train_config else "")
        except ConfigError as e:
            problems.append(str(e))
    if problems:
        raise ConfigError("; ".join(problems))
    # The step the resume goes on from: its newest checkpoint that verifies (resume_point
    # hashes them: only once the flags are known good). Accumulation vs --max-steps matters
    # only where training happens: a finished run resumed with nothing to do (run:
    # _already_complete) is said so, exit 0. Kept in args.resume_point for that check (the
    # metrics log read once: a long run's is hundreds of MB).
    args.resume_point = resume_point(run_dir) if args.resume else ResumePoint(0)
    resumed_at = args.resume_point.step
    with given_by_flags(getattr(args, "flags", {})):
        if never_steps := train_config.never_stepping_groups(from_step=resumed_at):
            raise ConfigError(never_steps)
        if train_config.max_steps > resumed_at:
            left_pending = train_config.left_pending_at_end(after=resumed_at)
    # Said, never refused: a first leg to be extended by `--resume --max-steps N` is meant
    # (loop.cosine_legs resumes during the warmup), and so are short smoke runs
    # (--max-steps 4, under the default warmup).
    warmup = _warmup_past_the_end(args)
    if warmup:
        print(f"warning: {warmup} (pass --warmup-steps <= --max-steps to reach it, or extend "
              f"the run later with --resume --max-steps >= {args.warmup_steps})",
              file=sys.stderr)
    if left_pending:  # said, as the warmup is: a first leg to extend with --resume is legitimate
        print(f"warning: {left_pending}", file=sys.stderr)
    for ignored in _ignored_flags(args, train_config):
        print(f"warning: {ignored}", file=sys.stderr)
    if train_config.init_from and not args.resume:  # (a resume loads its checkpoint's
        check_init_context(train_config.init_from, train_config.seq_len)  # weights, not DIR)
    if args.resume:
        _check_resumable(run_dir, train_config)
    if taken:  # (said once it goes on: before a refusal it contradicted it)
        print(f"--resume: going on with the run's own {', '.join(taken)}")
    return train_config, spec


def _warmup_past_the_end(args: argparse.Namespace) -> str | None:
    """On a new run, a warmup longer than the run: the learning rate rises the whole run and
    never reaches --lr (at --warmup-steps == --max-steps it does, at the last step: the
    quickstart's --max-steps 20). None on --resume (the warmup is the run's own, and its
    --warmup-steps may not be the flag's), and where either flag is bad itself (TrainConfig
    names it)."""
    warmup, steps = args.warmup_steps, args.max_steps
    if args.resume or not (warmup >= 0 and steps >= 1) or warmup <= steps:
        return None
    default = "" if "warmup_steps" in getattr(args, "given", ()) else " (its default)"
    return (f"--warmup-steps {warmup}{default} is more than --max-steps {steps}: the learning "
            f"rate rises over the whole run and ends at {steps}/{warmup} of --lr")


# Flags that only act with a setting: (the flags' destinations, the setting's test, the
# setting as a flag). Given without it they change nothing.
ACTING_WITH = (
    (("span_ramp", "span_penalty"), lambda c: c.attention_span, "--attention-span"),
    (("lr_decay_every",), lambda c: c.lr_schedule == "step", "--lr-schedule step"),
    (("min_lr",), lambda c: c.lr_schedule == "cosine", "--lr-schedule cosine"),
)


def _ignored_flags(args: argparse.Namespace, train_config: TrainConfig) -> list[str]:
    """The flags given whose setting is off (`--span-penalty` without --attention-span
    trained standard attention, silently), as '--FLAG ignored: ...' lines."""
    given, flags = getattr(args, "given", set()), getattr(args, "flags", {})
    lines = []
    for dests, on, setting in ACTING_WITH:
        named = [flags.get(dest, dest) for dest in dests if dest in given]
        if named and not on(train_config):
            lines.append(f"{', '.join(named)} ignored: "
                         f"{'they apply' if len(named) > 1 else 'it applies'} with {setting}")
    return lines


def _launcher_problems(args: argparse.Namespace) -> list[str]:
    """The flags that are neither TrainConfig's nor JobSpec's, checked."""
    problems = []
    if args.address is not None and not args.address.strip():  # (connect: None, embedded)
        problems.append("--address is empty: give host:port or auto, or leave the flag out "
                        "(RAY_ADDRESS, else an embedded local Ray)")
    if args.max_failures < 0:
        problems.append(f"--max-failures must be >= 0, got {args.max_failures}")
    if not args.queue_timeout >= 0:
        problems.append(f"--queue-timeout must be >= 0, got {args.queue_timeout}")
    if args.ingest_workers < 0:
        problems.append(f"--ingest-workers must be >= 0 (0: the cluster's CPUs), got "
                        f"{args.ingest_workers}")
    if args.gpus_per_worker > 1:
        # DDP and FSDP both drive one device per worker: more per worker would be reserved
        # and sit idle. (--num-workers 0, refused itself, still gets a command that works.)
        workers = max(args.num_workers, 1) * args.gpus_per_worker
        problems.append(
            f"--gpus-per-worker {args.gpus_per_worker}: pretraining runs one GPU per worker "
            f"(DDP and FSDP alike), so the other {args.gpus_per_worker - 1} would sit idle. "
            f"Use --num-workers {workers} --gpus-per-worker 1")
    return problems


def _recorded_kind_fits(value, flag_default) -> bool:
    """A recorded setting has the type its flag gives (a float flag's may be an int; a flag
    whose default is None may be None or a plain number or bool): a hand-edited "lr": "fast"
    is named, not inherited into a traceback."""
    if flag_default is None:
        return value is None or isinstance(value, (bool, int, float))
    if isinstance(flag_default, bool):
        return isinstance(value, bool)
    if isinstance(flag_default, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and \
            (isinstance(flag_default, float) or isinstance(value, int))
    if isinstance(flag_default, list):
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, type(flag_default))


def _min_lr(args: argparse.Namespace) -> float:
    """--min-lr (on --resume, when not given, the run's own: inherit_run_settings), else
    --lr / 10 (the defaults' ratio). (Until 2026-12-05 the default was min(3e-4, --lr); a run
    begun then resumes with the floor it recorded.)"""
    if args.min_lr is not None:
        return args.min_lr
    if not 0 <= args.lr < 10:  # (NaN too) refused by name: not also the floor nobody gave
        return TrainConfig.min_lr
    return args.lr * TrainConfig.min_lr / TrainConfig.lr


def _min_gpu_memory_gb(args: argparse.Namespace, train_config: TrainConfig) -> float:
    """What each worker's GPU must have free: the flag when given, else the run's estimated
    need (so a model that cannot fit is refused before training, naming need and free
    memory, instead of running out of memory in the first step)."""
    if args.min_gpu_memory_gb is not None:
        return args.min_gpu_memory_gb
    if args.gpus_per_worker == 0:
        return 0.0
    return gpu_memory_needed_gb(train_config, args.num_workers)


def _need_past_any_gpu(args: argparse.Namespace, train_config: TrainConfig,
                       need_gb: float) -> str:
    """Why a run whose estimated need (the default of --min-gpu-memory-gb) is past what any
    GPU has cannot be placed, naming the flags that size it."""
    return (f"the run's estimated need of {need_gb:g} GiB on each worker's GPU "
            f"({sizing_flags(train_config)}) is more than any GPU has (over "
            f"{MAX_GPU_MEMORY_GB:,} GiB): {LOWER_MEMORY}")


def _check_resumable(run_dir: Path, train_config: TrainConfig) -> None:
    """Refuse to resume with settings that would make it another run (checked here, before any
    worker starts, so the answer is one line rather than failed restarts)."""
    saved = _read_json(run_dir / CONFIG_FILE)
    conflicts = resume_conflicts(saved.get("train", {}), train_config) if saved else []
    if conflicts:
        raise ConfigError(f"--resume: {run_dir} was trained with other settings: "
                          f"{'; '.join(conflicts)}. Pass the original values, or start a new "
                          "run without --resume")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None


def resolve_data(args: argparse.Namespace, run_dir: Path) -> DataSetup:
    """The data, tokenizer and --init-from flags checked and resolved, before Ray starts."""
    for flag, value in (("--tokenizer", args.tokenizer), ("--init-from", args.init_from),
                        ("--data-cache", args.data_cache)):
        if value is not None and not value.strip():  # read as unset: a run without it
            raise ConfigError(f"{flag} is empty: give a path, or leave the flag out")
    saved = _run_config(run_dir).get("train") if args.resume else None
    if saved is not None and args.init_from is not None:
        _refuse_other_init_from(args.init_from, saved, run_dir)
    setup = configure_data(
        data=args.data, text_field=args.text_field, skip_bad_lines=args.skip_bad_lines,
        tokenizer=args.tokenizer, train_tokenizer=args.train_tokenizer,
        cache_root=args.data_cache or default_cache_root(run_dir), retokenize=args.retokenize,
        init_from=args.init_from, saved=saved, run_dir=run_dir, data_flags=_data_flags(args),
        dry_run=args.dry_run)
    if saved is not None and setup.tokenizer is not None:  # (None: a dry run's untrained BPE)
        # The model the run started from, the spans' start and the MLP width it set stay the
        # run's own: a resume loads neither (its checkpoint's weights), and without
        # --init-from given again (--data given again: configure_data starts afresh)
        # config.json lost them (a pruned model's narrower MLP: its checkpoint would not load).
        setup.fields.update({name: saved[name] for name in ("init_from", "span_init",
                                                            "mlp_hidden") if name in saved})
        problems = resume_data_conflicts(saved, setup.fields, setup.plan)
        if problems:
            raise ConfigError(f"--resume: {run_dir}: {'; '.join(problems)}. Start a new run "
                              "without --resume to train on this")
    for note in setup.notes:
        print(f"warning: {note}", file=sys.stderr)
    return setup


def _refuse_other_init_from(init_from: str, saved: dict, run_dir: Path) -> None:
    """`--resume --init-from DIR`: the run goes on from its checkpoint, whose weights replace
    any --init-from (loaded at step 0 only), so a DIR other than the one the run started from
    would be ignored, while config.json recorded it as the run's origin. Refused naming both
    flags; the run's own DIR again is accepted (the same command with --resume added)."""
    from orchestrator.validation import expand_home

    given = str(expand_home(init_from, "--init-from", ConfigError).resolve())
    recorded = saved.get("init_from") or ""
    if given == recorded:
        return
    origin = (f"started from --init-from {recorded}" if recorded
              else "started without --init-from")
    raise ConfigError(f"--init-from {init_from} with --resume: the run {run_dir} {origin} and "
                      "continues from its checkpoint, whose weights, optimizer state and step "
                      "replace any --init-from (its weights are loaded at step 0 only). Leave "
                      "--init-from out to continue the run, or start a new run (without "
                      "--resume) to fine-tune from that model")


def _data_flags(args: argparse.Namespace) -> tuple[str, ...]:
    """The flags given that apply only to --data files (said when they are ignored)."""
    given = {"--data-cache": args.data_cache is not None, "--retokenize": args.retokenize,
             "--text-field": args.text_field != "text", "--skip-bad-lines": args.skip_bad_lines,
             "--ingest-workers": args.ingest_workers > 0}  # (< 0: refused, not ignored)
    return tuple(flag for flag, on in given.items() if on)


def resume_hint(args: argparse.Namespace) -> str:
    """What Ctrl-C says: --resume alone continues the newest pretrain-* run under the runs root, which
    need not be this one (another run since, or a --run-dir elsewhere): name it."""
    run_dir = getattr(args, "resolved_run_dir", None)
    if run_dir is None:
        return "interrupted; resume with --resume"
    if not has_checkpoints(run_dir):  # (--resume would be refused: no checkpoint)
        return ("interrupted before the run's first checkpoint: nothing to resume; run the "
                "same command again")
    return f"interrupted; resume with --resume --run-dir {shlex.quote(str(run_dir))}"


def run(args: argparse.Namespace) -> dict | None:
    # (a resume hashes its checkpoints once: build_configs' resume_point, then the ones
    # run_dir_held sets aside)
    with checkpoint_verdicts_kept():
        return _run(args)


def _run(args: argparse.Namespace) -> dict | None:
    started = time.time()
    try:
        run_dir = resolve_run_dir(args.run_dir, args.resume, DEFAULT_RUNS_ROOT, "pretrain",
                                  dt.datetime.now())
        args.resolved_run_dir = run_dir  # for the Ctrl-C hint
        _refuse_other_jobs_folder(run_dir)
        setup = resolve_data(args, run_dir)
        train_config, spec = build_configs(args, run_dir, setup.fields)
        if setup.plan is not None and setup.plan.cached:  # (shards of an earlier run: too
            # short for --seq-len refused before Ray starts, --dry-run as the run)
            check_trainable(setup.plan.manifest, train_config.seq_len, setup.plan.cache_uri)
        if args.dry_run:
            return dry_run(train_config, spec, args.address)
        if args.resume and _already_complete(run_dir, train_config, args.resume_point):
            return None
        refuse_what_embedded_ray_cannot_hold(spec, args.address)
        refuse_a_cpu_run_past_this_machine(train_config, spec, args.address)
    except (ConfigError, RunDirError, DataError, TokenizerError, ExportError) as e:
        raise JobFailed(str(e), EXIT_BAD_INPUT) from None

    # Ray is imported only once the input is known good: bad flags fail in well under a second.
    from ray_layer.cluster import ClusterConnectionError
    from ray_layer.data_ingest import prepare_shards
    from ray_layer.launch import launch
    from ray_layer.train_session import train_under_ray

    started_ray = False
    try:
        if setup.plan is not None:  # tokenized before any training worker starts
            try:
                manifest, started_ray = prepare_shards(setup.plan, args.address,
                                                       args.ingest_workers)
                if not setup.plan.cached:  # (cached: checked above, the same manifest)
                    check_trainable(manifest, train_config.seq_len, setup.plan.cache_uri)
            except (DataError, ClusterConnectionError) as e:
                raise JobFailed(str(e), EXIT_BAD_INPUT) from None
        # Written once the data is known good; a run refused after (no cluster at --address,
        # not placeable) takes back what it added (run_dir_held): nothing is
        # left behind.
        with run_dir_held(run_dir, new_run=not args.resume, any_checkpoint=True,
                          written={CONFIG_FILE, TOKENIZER_FILE}):
            _write_resolved_config(run_dir, train_config, spec, setup.tokenizer)
            try:
                launched = launch(train_under_ray, {"train": train_config.to_dict(),
                                                    "min_gpu_memory_gb": spec.min_gpu_memory_gb,
                                                    "verified_checkpoint":
                                                        verified_newest(run_dir)},
                                  spec, run_dir, address=args.address,
                                  queue_timeout_s=args.queue_timeout,
                                  max_failures=args.max_failures,
                                  keep_checkpoints=train_config.keep_checkpoints,
                                  loop_logs_metrics=True)
            except JobFailed as e:
                raise host_memory_refusal_named(e, train_config, spec) from None
            return _write_summary(launched.result, train_config, launched.placement, run_dir,
                                  time.time() - started, launched.yields)
    except RunDirError as e:
        raise JobFailed(str(e), EXIT_BAD_INPUT) from None
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def _refuse_other_jobs_folder(run_dir: Path) -> None:
    """RunDirError naming what `run_dir` holds that no run put there (a Hugging Face export,
    a compression's --out): asked before anything is written, since the run's config.json
    and tokenizer.json would replace that folder's own."""
    found = not_a_run_dirs_files(run_dir)
    if found:
        raise RunDirError(f"--run-dir {run_dir} is not a run directory: it holds "
                          f"{'; '.join(found)}, which a run would overwrite or mix its files "
                          "with. Give a new or empty folder (to fine-tune a Hugging Face "
                          "model, pass its folder as --init-from)")


def dry_run(train_config: TrainConfig, spec: JobSpec, address: str | None) -> None:
    """Memory per worker and the placement the job would get now; nothing trained or written."""
    from ray_layer.launch import dry_run_placement

    for line in memory_lines(train_config, spec.num_workers, on_gpu=spec.gpus_per_worker > 0):
        print(line)
    refuse_a_cpu_run_past_this_machine(train_config, spec, address)
    if spec.min_host_memory_gb:
        print(f"placement asks each worker's node for >= {spec.min_host_memory_gb:g} GiB of "
              "host RAM available (the estimate above)")
    if spec.min_gpu_memory_gb:
        print(f"placement asks each worker's GPU for >= {spec.min_gpu_memory_gb:g} GiB free "
              "(--min-gpu-memory-gb)")
    decision = dry_run_placement(spec, address)
    print(describe_decision(decision))
    if not hasattr(decision, "worker_nodes"):
        raise JobFailed("not placeable now (see above)", EXIT_NOT_PLACEABLE)
    return None


def _already_complete(run_dir: Path, train_config: TrainConfig, point: ResumePoint) -> bool:
    """True (and says so) when the run already reached --max-steps at `point` (build_configs'
    resume_point: a run stopped before its end may be resumed with a lower one; a damaged
    checkpoint does not count, and is named): nothing to start."""
    for step, problem in point.unusable:
        print(f"warning: the run's checkpoint of step {step} is unusable: {problem}",
              file=sys.stderr)
    if point.unusable:
        print("warning: so this --resume " + (
            f"resumes from step {point.step}, the newest checkpoint the metrics log lists "
            "that verifies" if point.step else "resumes from the newest checkpoint in the run "
            "directory that loads (the metrics log lists none older that verifies), or stops "
            "naming why none does"), file=sys.stderr)
    if point.step < train_config.max_steps:
        return False
    _say_nothing_to_do(f"{run_dir} is already at step {point.step}", train_config)
    return True


def _say_nothing_to_do(where: str, train_config: TrainConfig) -> None:
    print(f"nothing to do: {where} (--max-steps {train_config.max_steps}); raise --max-steps "
          "to train further")


def _write_resolved_config(run_dir: Path, train_config: TrainConfig, spec: JobSpec,
                           tokenizer) -> None:
    """config.json and the run's tokenizer.json (what serving, compression and export read)."""
    from orchestrator.training.checkpoint import CheckpointError, write_json

    resolved = {"train": train_config.to_dict(), "job": spec.to_dict()}
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if train_config.tokenizer_sha256:  # runs from before tokenizers were recorded: none
            save_tokenizer(tokenizer, run_dir)
        # (whole or not at all: written in place, a full disk left a resumed run's
        # config.json half written, and --resume, serving and export could not read it)
        write_json(run_dir / CONFIG_FILE, resolved)
    except OSError as e:
        raise RunDirError(f"cannot write to run dir {run_dir}: {e.strerror or e}") from None
    except CheckpointError as e:
        raise RunDirError(f"cannot write to run dir {run_dir}: {e}") from None


def _write_summary(result, train_config: TrainConfig, placement, run_dir: Path,
                   elapsed_s: float, yields: list[dict]) -> dict | None:
    metrics = result.metrics or {}
    # The checkpoint ahead of the summary and the log: leave everything alone. Only the
    # workers' return value says so (their report has no checkpoint, so Result.metrics are
    # the checkpoint's, past the end).
    from ray_layer.train_session import DIVERGED

    returned = getattr(result, "return_value", None)
    if isinstance(returned, dict) and returned.get("already_complete"):
        _say_nothing_to_do(f"the checkpoint is already at step {returned['step']}", train_config)
        return None
    if isinstance(returned, dict) and returned.get(DIVERGED):
        raise JobFailed(f"{returned[DIVERGED]} (checkpoints so far, if any, are in "
                        f"{run_dir})", EXIT_FAILED)
    if metrics.get("step") is None or metrics["step"] < train_config.max_steps:
        # Ray Train's result holds the last report with a checkpoint: one short of the end
        # means training stopped without saying why. No summary then, and never a made-up one.
        raise JobFailed(f"training ended at step {metrics.get('step')} of "
                        f"{train_config.max_steps} without a final checkpointed report: "
                        f"nothing to summarize (checkpoints so far, if any, are in {run_dir})",
                        EXIT_FAILED)
    actual = metrics.get("worker_nodes", [])
    summary = {
        "steps": metrics.get("step"),
        "max_steps": train_config.max_steps,
        "resumed_from_step": metrics.get("start_step"),
        # Unix time the first step of the last attempt finished (after a worker failure and
        # Ray Train's restart, failure -> this is the recovery time).
        "first_step_at": metrics.get("first_step_at"),
        "first_loss": metrics.get("first_loss"),
        "final_loss": metrics.get("loss"),
        "final_loss_steps": metrics.get("loss_steps"),  # the last steps final_loss averages
        "held_out_loss": metrics.get("held_out_loss"),
        # The training steps alone (a compiled model's first step, its compile, left out).
        "tokens_per_s": metrics.get("run_tokens_per_s"),
        # First step to the last, checkpoint saves, reports and evaluation included.
        "phase_tokens_per_s": metrics.get("phase_tokens_per_s"),
        "mfu": metrics.get("mfu"),  # last logging interval
        "comm_share": metrics.get("comm_share"),
        "comm_exposed_share": metrics.get("comm_exposed_share"),
        "peak_memory_bytes": metrics.get("peak_memory_bytes"),
        "precision": metrics.get("precision"),
        "compiled": metrics.get("compiled"),
        "model_size": train_config.model_size,
        "num_workers": len(placement.worker_nodes),
        "placement": list(placement.worker_nodes),
        "worker_nodes": actual,
        "placement_honoured": Counter(actual) == Counter(placement.worker_nodes),
        "bottleneck_gbps": (None if placement.bottleneck_gbps == float("inf")
                            else placement.bottleneck_gbps),
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        # Each time the scheduler took the placement back (preempted, migrated): step, why.
        "yields": yields,
        "run_dir": str(run_dir),
        "elapsed_s": round(elapsed_s, 1),
    }
    from orchestrator.training.checkpoint import CheckpointError, write_json

    try:  # (whole or not at all, and said: a full disk here was a traceback)
        write_json(run_dir / SUMMARY_FILE, summary)
    except CheckpointError as e:
        raise JobFailed(f"{e}; the run finished: its checkpoints are in {run_dir}",
                        EXIT_FAILED) from None
    start = summary["resumed_from_step"]
    # (a resumed run's figures are this leg's: its first loss is the resumed step's, not 0's)
    trained = (f"trained steps {start} -> {summary['steps']} (resumed)" if start else
               f"trained {summary['steps']} steps")
    print(f"\n{trained} in {summary['precision']} on "
          f"{summary['num_workers']} worker(s): loss {_figure(summary['first_loss'], '.3f')} "
          f"-> {_figure(summary['final_loss'], '.3f')} (held-out "
          f"{_figure(summary['held_out_loss'], '.3f')}), "
          f"{_figure(summary['tokens_per_s'], ',.0f')} tokens/s"
          + (f", MFU {summary['mfu']:.1%}" if summary["mfu"] is not None else "")
          + (f", all-reduce {summary['comm_share']:.0%} of step time"
             f" ({summary['comm_exposed_share']:.0%} exposed)"
             if summary["comm_share"] is not None else ""))
    if not summary["placement_honoured"]:
        print(f"warning: workers ran on {actual}, not where placed: {placement.worker_nodes}",
              file=sys.stderr)
    print(f"checkpoint: {summary['checkpoint']}\nsummary:    {run_dir / SUMMARY_FILE}")
    return summary


def _figure(value, spec: str) -> str:
    """A summary figure, or "-" where the final report did not carry it."""
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    code, _ = run_job(lambda: run(args), on_interrupt=lambda: resume_hint(args))
    return code


if __name__ == "__main__":
    sys.exit(main())
