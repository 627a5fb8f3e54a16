"""Typed configs for jobs and training, each validated at construction.

Every error names the field at fault, and all problems of one config are reported together
so a user fixes them in one go rather than one per run.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any, Mapping

from orchestrator import validation
from orchestrator.validation import SEED_RULE, has_control_characters, is_int, is_number, is_seed
# `seq_len (--seq-len)` where a command line gave the field (validation.given_by_flags)
from orchestrator.validation import field_with_flag as _named


class ConfigError(ValueError):
    """A config value is wrong. The message names the field(s) at fault."""


PRECISIONS = ("auto", "fp32", "fp16", "bf16")
STRATEGIES = ("ddp", "fsdp")  # data parallelism: whole model per worker | FSDP2 shards
LR_SCHEDULES = ("cosine", "step", "constant")
# Parameter groups of hierarchical gradient accumulation, input to output. The LM head's
# weight is tied to the token embedding, so it steps with "embeddings"; "head" is the final
# LayerNorm. "lower"/"upper" are the first/second half of the transformer blocks.
ACCUMULATION_GROUPS = ("embeddings", "lower", "upper", "head")
MAX_ACCUMULATION = 1024
# The reservation name of a migration's target is the job's name with this suffix: no job
# may be named so (orchestrator/scheduler_core.py).
CLAIM_SUFFIX = "#migration"
MAX_WORKLOAD_CHARS = 200  # JobSpec.workload: a key, not a description
MAX_GPU_MEMORY_GB = 10_000  # JobSpec.min_gpu_memory_gb: more than any GPU has
MAX_HOST_MEMORY_GB = 100_000  # JobSpec.min_host_memory_gb: more RAM than any node has

# Accelerator families the scheduler knows. A family must be a whole token of the device name
# (inventory.accelerator_family), so the order does not matter; names a vendor also uses for a
# near-identical part map to one family through ACCELERATOR_ALIASES.
ACCELERATOR_FAMILIES = ("MI300X", "MI300A", "MI250", "GH200", "H200", "H100", "B200", "A100",
                        "A10G", "L40S", "L40", "V100", "P100", "K80", "A10", "T4", "L4", "NPU",
                        "TPU")
ACCELERATOR_ALIASES = {"MI250X": "MI250", "V100S": "V100"}

# Rough training throughput of one accelerator relative to a V100 (mixed precision, typical
# published figures rounded down; K80/P100 from Gavel's measurements). Placement uses it only
# to prefer faster hardware among nodes that fit equally well; the simulator's speed model
# uses it for the types Gavel did not measure.
ACCELERATOR_SPEED = {"K80": 0.25, "P100": 0.6, "V100": 1.0, "T4": 0.4, "L4": 0.6, "A10": 0.6,
                     "A10G": 0.6, "L40": 0.9, "L40S": 1.4, "A100": 2.2, "H100": 4.4,
                     "H200": 5.0, "GH200": 5.0, "B200": 8.0, "MI250": 1.6, "MI300A": 2.8,
                     "MI300X": 3.5, "NPU": 1.0, "TPU": 1.0}

# Named model presets. Plain data so `orchestrator` imports without torch.
# n_layer / n_head / n_embd follow GPT-2's naming; context length comes from seq_len.
MODEL_PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"n_layer": 2, "n_head": 2, "n_embd": 64},
    "small": {"n_layer": 4, "n_head": 4, "n_embd": 128},
    "medium": {"n_layer": 6, "n_head": 8, "n_embd": 256},
    "large": {"n_layer": 12, "n_head": 12, "n_embd": 768},  # GPT-2 small's shape (124M)
    # GPT-2's larger shapes (355M, 774M, 1.5B parameters with GPT-2's 50,257-token vocabulary):
    # for GPU clusters; `jobs/pretrain.py --dry-run` shows the memory a worker needs.
    "gpt2-medium": {"n_layer": 24, "n_head": 16, "n_embd": 1024},
    "gpt2-large": {"n_layer": 36, "n_head": 20, "n_embd": 1280},
    "gpt2-xl": {"n_layer": 48, "n_head": 25, "n_embd": 1600},
}


def _shorten(value: Any, limit: int = 60) -> str:
    """repr of a value, a long string cut to `limit` characters (an error message must stay
    readable)."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} characters)"
    return repr(value)


def _check(problems: list[str], ok: bool, message: str) -> bool:
    """`ok`; `message` added to `problems` when it is not."""
    if not ok:
        problems.append(message)
    return ok


def _raise_if_any(what: str, problems: list[str]) -> None:
    if problems:
        raise ConfigError(f"invalid {what}: " + "; ".join(problems))


def parse_accumulation(spec: str) -> dict[str, int]:
    """Accumulation factor k per group from "4" (every group) or "embeddings=1,lower=2,..."
    (groups not named take 1). Raises ConfigError naming the field and the bad part."""
    def factor(text: str, where: str) -> int:
        why = ""
        try:  # (int() took `1_0` as 10 and other scripts' digits)
            k = validation.parse_number(text, whole=True)
        except ValueError as e:
            k, why = 0, f" ({e})" if str(e) else ""
        if not 1 <= k <= MAX_ACCUMULATION:
            raise ConfigError(f"accumulation: {where} must be an integer in "
                              f"[1, {MAX_ACCUMULATION}], got {text!r}{why}")
        return k

    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"accumulation must be a string like '4' or 'embeddings=1,lower=2,"
                          f"upper=4,head=1', got {spec!r}")
    if "=" not in spec:
        k = factor(spec.strip(), "the factor")
        return {group: k for group in ACCUMULATION_GROUPS}
    factors = dict.fromkeys(ACCUMULATION_GROUPS, 1)
    seen: set[str] = set()
    for part in spec.split(","):
        group, _, value = part.partition("=")
        group = group.strip()
        if group in seen:
            raise ConfigError(f"accumulation: group {group!r} is given twice in {spec!r}")
        seen.add(group)
        if group not in ACCUMULATION_GROUPS:
            raise ConfigError(f"accumulation: unknown group {group!r} in {spec!r}; groups are "
                              f"{', '.join(ACCUMULATION_GROUPS)}")
        factors[group] = factor(value.strip(), f"the factor of {group!r}")
    return factors


def unknown_fields(data: Mapping[str, Any], known: list[str], what: str) -> str | None:
    """'unknown field(s) in WHAT: 'x' (did you mean 'y'?); known fields: ...', or None when
    every key of `data` is known."""
    unknown = [key for key in data if key not in known]
    if not unknown:
        return None
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), known, n=1)
        hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    return f"unknown field(s) in {what}: {', '.join(hints)}; known fields: {', '.join(known)}"


def known_fields_problems(cls, data: Mapping[str, Any], known: list[str]) -> str:
    """"; " and what the known fields' values are refused for, so that one run names every
    mistake (a typo and a bad value), not one per try; "" when they pass or cannot be
    judged alone (a required field among the unknown). A misspelt key's value stands in for
    the field it is closest to: judged at that field's default instead, a correct value
    beside it was refused (`min_replicas: 3` "must be <= max_replicas (2)" beside
    `max_replica: 4`)."""
    meant = {key: value for key, value in data.items() if key in known}
    for key, value in data.items():
        close = difflib.get_close_matches(str(key), known, n=1) if key not in known else []
        if close and close[0] not in meant:
            meant[close[0]] = value
    try:
        cls(**meant)
    except ConfigError as e:
        return f"; {e}"
    except TypeError:
        pass
    return ""


def from_mapping(cls, data: Mapping[str, Any], what: str):
    """Build dataclass `cls` from a mapping, rejecting unknown keys with a did-you-mean hint."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{what} must be a mapping of field names to values, "
                          f"got {type(data).__name__}")
    known = [f.name for f in dataclasses.fields(cls)]
    problem = unknown_fields(data, known, what)
    if problem:
        raise ConfigError(problem + known_fields_problems(cls, data, known))
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in data]
    if missing:
        raise ConfigError(f"missing required field(s) in {what}: {', '.join(missing)}")
    return cls(**data)


MAX_WORKERS = 100_000  # a job's num_workers (JobSpec), and a trace job's num_gpus (traces.py)


@dataclass(frozen=True)
class JobSpec:
    """What a distributed training job asks of the cluster."""

    name: str
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: int = 0
    min_gpu_memory_gb: float = 0.0
    min_bandwidth_gbps: float = 0.0  # floor between every pair of nodes the job spans, GB/s
    accelerator_types: tuple[str, ...] = ()  # allowed accelerator families; () = any
    priority: int = 0  # higher is placed first when jobs wait in the queue
    # The user's estimate of the run time in seconds (like Slurm's time limit, never enforced:
    # it plans backfill and migration); None = unknown.
    # Lets the queue backfill a job into a gap that ends before a blocked job could start,
    # and lets the scheduler weigh a migration's gain against its restart cost.
    expected_duration_s: float | None = None
    # False: the job's loop never checkpoints on the scheduler's request (a loop that does not
    # call orchestrator.launch.report), so it is never chosen to preempt or migrate.
    preemptible: bool = True
    # What determines the job's training speed on an accelerator (jobs/pretrain.py sets it
    # from the model, sequence length, per-worker batch and precision: throughput.workload_key).
    # Jobs with the same key share what the scheduler learns of their speed per accelerator
    # family (orchestrator/throughput.py); "" = unknown: the static speeds apply.
    workload: str = ""
    # Host RAM (GiB) each worker needs on its node; 0 = not counted. Placement puts a worker
    # only where the node's available RAM, less what workers placed there already asked
    # for, covers it (a CPU run past a node's RAM was killed by the OOM killer mid-run).
    # jobs/pretrain.py sets it for CPU runs from the memory estimate.
    min_host_memory_gb: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.accelerator_types, str):  # from YAML / CLI: one type
            object.__setattr__(self, "accelerator_types", (self.accelerator_types,))
        elif isinstance(self.accelerator_types, list):
            object.__setattr__(self, "accelerator_types", tuple(self.accelerator_types))
        self.validate()

    def narrowed(self, **changes: Any) -> "JobSpec":
        """A copy with `changes`, not validated again: for the scheduler's own derived specs of
        a valid spec (a subset of its families, a claim's name), made on every queue pass,
        where validation would cost more than the placement."""
        copy = object.__new__(JobSpec)
        copy.__dict__.update(self.__dict__, **changes)
        return copy

    def validate(self) -> None:
        # (Python refuses to print an int of over 4,300 digits: the messages below would
        # fail with a ValueError of their own)
        huge = [_named(f.name) for f in dataclasses.fields(self)
                if is_int(getattr(self, f.name)) and abs(getattr(self, f.name)) > 10**18]
        if huge:
            raise ConfigError(f"invalid JobSpec: {', '.join(huge)} must be far smaller "
                              "(over 18 digits)")
        p: list[str] = []
        _check(p, isinstance(self.name, str) and self.name.strip() != "",
               f"name must be a non-empty string, got {self.name!r}")
        _check(p, not (isinstance(self.name, str) and has_control_characters(self.name)),
               f"name must not contain control characters (`status` prints it to operators' "
               f"terminals), got {self.name!r}")
        _check(p, not (isinstance(self.name, str) and self.name.endswith(CLAIM_SUFFIX)),
               f"name must not end in {CLAIM_SUFFIX!r} (the scheduler's name for the GPUs a "
               f"migrating job moves to), got {self.name!r}")
        # Upper bounds catch typos (an extra zero) long before any cluster could be that big.
        _check(p, is_int(self.num_workers) and 1 <= self.num_workers <= MAX_WORKERS,
               f"{_named('num_workers')} must be an integer in [1, {MAX_WORKERS}], got "
               f"{self.num_workers!r}")
        _check(p, is_number(self.cpus_per_worker) and 0.01 <= self.cpus_per_worker <= 4096,
               f"{_named('cpus_per_worker')} must be a number in [0.01, 4096], got "
               f"{self.cpus_per_worker!r}")
        gpus_valid = _check(p, is_int(self.gpus_per_worker) and 0 <= self.gpus_per_worker <= 64,
                            f"{_named('gpus_per_worker')} must be an integer in [0, 64], got "
                            f"{self.gpus_per_worker!r}")
        memory_valid = _check(
            p, is_number(self.min_gpu_memory_gb)
            and 0 <= self.min_gpu_memory_gb <= MAX_GPU_MEMORY_GB,
            f"{_named('min_gpu_memory_gb')} must be a number in [0, {MAX_GPU_MEMORY_GB}], "
            f"got {self.min_gpu_memory_gb!r}")
        _check(p, is_number(self.min_host_memory_gb)
               and 0 <= self.min_host_memory_gb <= MAX_HOST_MEMORY_GB,
               f"{_named('min_host_memory_gb')} must be a number of GiB in [0, "
               f"{MAX_HOST_MEMORY_GB}], got {self.min_host_memory_gb!r}")
        _check(p, is_number(self.min_bandwidth_gbps) and self.min_bandwidth_gbps >= 0,
               f"{_named('min_bandwidth_gbps')} must be a number >= 0, got "
               f"{self.min_bandwidth_gbps!r}")
        _check(p, is_int(self.priority) and -2**31 <= self.priority < 2**31,
               f"{_named('priority')} must be an integer in [-2147483648, 2147483647], "
               f"got {self.priority!r}")
        _check(p, isinstance(self.preemptible, bool),
               f"preemptible must be true or false, got {self.preemptible!r}")
        _check(p, self.expected_duration_s is None
               or (is_number(self.expected_duration_s) and self.expected_duration_s > 0),
               f"{_named('expected_duration_s')} must be a number of seconds > 0 (or unset), "
               f"got {self.expected_duration_s!r}")
        _check(p, isinstance(self.workload, str) and len(self.workload) <= MAX_WORKLOAD_CHARS
               and self.workload.isprintable(),
               f"workload must be a string of at most {MAX_WORKLOAD_CHARS} printable "
               f"characters, got {_shorten(self.workload)}")
        types_valid = self._check_accelerator_types(p)
        # The rules between fields, for fields that passed alone: named with the others,
        # not on the next try.
        if types_valid and gpus_valid and self.accelerator_types and self.gpus_per_worker == 0:
            p.append(f"{_named('accelerator_types')} {list(self.accelerator_types)} needs "
                     f"{_named('gpus_per_worker')} >= 1")
        if memory_valid and gpus_valid and self.min_gpu_memory_gb > 0 \
                and self.gpus_per_worker == 0:
            p.append(f"{_named('min_gpu_memory_gb')} {self.min_gpu_memory_gb} needs "
                     f"{_named('gpus_per_worker')} >= 1 (a CPU-only worker has no GPU memory to "
                     "require)")
        # (repr: a name's escape sequence would reach the terminal in the message itself)
        _raise_if_any(f"JobSpec {self.name!r}" if isinstance(self.name, str)
                      else f"JobSpec '{self.name}'", p)

    def _check_accelerator_types(self, p: list[str]) -> bool:
        """Whether accelerator_types is a list of known families; what is wrong added to `p`."""
        if not isinstance(self.accelerator_types, tuple):
            p.append(f"{_named('accelerator_types')} must be a list of accelerator families, got "
                     f"{self.accelerator_types!r}")
            return False
        unknown = [t for t in self.accelerator_types
                   if not isinstance(t, str) or t.upper() not in ACCELERATOR_FAMILIES]
        return _check(p, not unknown, f"{_named('accelerator_types')} has unknown type(s) "
                      f"{unknown}; known: {', '.join(ACCELERATOR_FAMILIES)}")

    @property
    def total_cpus(self) -> float:
        return self.num_workers * self.cpus_per_worker

    @property
    def total_gpus(self) -> int:
        return self.num_workers * self.gpus_per_worker

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "JobSpec":
        return from_mapping(cls, data, "JobSpec")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TrainConfig:
    """Everything the training loop needs; serialisable to a plain dict for Ray Train workers."""

    model_size: str = "small"
    max_steps: int = 200
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    lr_schedule: str = "cosine"  # after warmup: cosine to min_lr | step (x0.1) | constant
    lr_decay_every: int = 100  # step schedule: multiply by 0.1 every this many steps
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    precision: str = "auto"
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    log_every: int = 10
    eval_batches: int = 8
    seed: int = 1337
    dropout: float = 0.0
    # Warn when MFU falls below / exposed all-reduce share (steps waiting on it after
    # backward: comm_exposed_share) or memory fraction rise above these.
    warn_min_mfu: float = 0.45
    warn_max_comm_share: float = 0.15
    warn_max_memory_fraction: float = 0.90
    # Learnable attention span (training/attention.py); off = standard causal attention.
    attention_span: bool = False
    span_ramp: int = 32  # R: soft edge of each head's span, tokens
    span_init: float = 0.0  # initial span as a fraction of seq_len
    span_penalty: float = 2e-6  # weight of the L1 penalty (sum over layers of mean span, tokens)
    # Hierarchical gradient accumulation: "k" for every group or "embeddings=1,lower=2,...";
    # a group's optimizer step happens every k micro-batches (max_steps counts micro-batches).
    accumulation: str = "1"
    # Data and tokenizer (docs/data.md). data_cache: the token-shard cache directory (or URI)
    # to train on; "" = the bundled corpus read in memory. data_key: that data's cache key
    # (files, sizes, times, tokenizer): resuming on other data is refused.
    data_cache: str = ""
    data_key: str = ""
    # The model's vocabulary, the tokenizer's. 256 (the default) is a run from before
    # tokenizers were recorded: bytes without an end-of-text token.
    vocab_size: int = 256
    tokenizer_sha256: str = ""  # sha256 of the run's tokenizer.json; "" = bytes (old runs)
    init_from: str = ""  # a GPT-2-shaped Hugging Face model directory the weights start from
    # The MLP's hidden width in every block; None = 4 x n_embd (the presets'). Set by
    # --init-from from the model's n_inner: an export of a model pruned to one MLP width.
    mlp_hidden: int | None = None
    # Data parallelism (orchestrator/training/strategy.py): "ddp" (every worker holds the
    # model) or "fsdp" (FSDP2: parameters, gradients, optimizer state sharded over workers).
    strategy: str = "ddp"
    # torch.compile the model: None (the default) compiles on CUDA, where scripts/gpu_check.py
    # measured it 1.09-1.18x faster on an H200 at the byte vocabulary and 1.54-1.87x with
    # GPT-2's, and not on CPU, where compiling costs minutes
    # (docs/training.md); True or False forces it.
    compile: bool | None = None

    def compiles_on(self, device_type: str) -> bool:
        """Whether the model is compiled on a device of this type ("cuda", "cpu"). Not by
        default with the learnt span: its attention window is a host integer that moves as
        the spans learn, and each new value recompiles (torch gives up after 8 and runs those
        frames eagerly, having spent the compiles)."""
        if self.compile is not None:
            return self.compile
        return device_type == "cuda" and not self.attention_span

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        p: list[str] = []
        _check(p, is_int(self.vocab_size) and 2 <= self.vocab_size <= 1 << 24,
               f"vocab_size must be an integer in [2, 16777216], got {self.vocab_size!r}")
        for name in ("data_cache", "data_key", "tokenizer_sha256", "init_from"):
            _check(p, isinstance(getattr(self, name), str),
                   f"{_named(name)} must be a string, got {getattr(self, name)!r}")
        _check(p, self.mlp_hidden is None or is_int(self.mlp_hidden) and self.mlp_hidden >= 1,
               f"{_named('mlp_hidden')} must be an integer >= 1 or null (null: 4 x n_embd), "
               f"got {self.mlp_hidden!r}")
        preset_valid = _check(p, isinstance(self.model_size, str)  # (a list: unhashable)
                              and self.model_size in MODEL_PRESETS,
                              f"{_named('model_size')} must be one of {', '.join(MODEL_PRESETS)}, "
                              f"got {self.model_size!r}")
        _check(p, self.lr_schedule in LR_SCHEDULES,
               f"{_named('lr_schedule')} must be one of {', '.join(LR_SCHEDULES)}, got "
               f"{self.lr_schedule!r}")
        _check(p, is_int(self.lr_decay_every) and self.lr_decay_every >= 1,
               f"{_named('lr_decay_every')} must be an integer >= 1, got {self.lr_decay_every!r}")
        _check(p, self.precision in PRECISIONS,
               f"{_named('precision')} must be one of {', '.join(PRECISIONS)}, got "
               f"{self.precision!r}")
        valid = {}
        for name in ("max_steps", "batch_size", "seq_len", "checkpoint_every",
                     "keep_checkpoints", "log_every", "eval_batches"):
            value = getattr(self, name)
            valid[name] = _check(p, is_int(value) and value >= 1,
                                 f"{_named(name)} must be an integer >= 1, got {value!r}")
        _check(p, is_int(self.warmup_steps) and self.warmup_steps >= 0,
               f"{_named('warmup_steps')} must be an integer >= 0, got {self.warmup_steps!r}")
        _check(p, is_seed(self.seed), f"{_named('seed')} {SEED_RULE}, got {self.seed!r}")
        for name in ("lr", "min_lr"):
            value = getattr(self, name)
            valid[name] = _check(p, is_number(value) and 0 <= value < 10,
                                 f"{_named(name)} must be a number in [0, 10), got {value!r}")
        _check(p, is_number(self.weight_decay) and self.weight_decay >= 0,
               f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
        _check(p, is_number(self.grad_clip) and self.grad_clip >= 0,
               f"grad_clip must be a number >= 0 (0 disables clipping), got {self.grad_clip!r}")
        _check(p, is_number(self.dropout) and 0 <= self.dropout < 1,
               f"dropout must be a number in [0, 1), got {self.dropout!r}")
        for name in ("warn_min_mfu", "warn_max_comm_share", "warn_max_memory_fraction",
                     "span_init"):
            value = getattr(self, name)
            _check(p, is_number(value) and 0 <= value <= 1,
                   f"{name} must be a fraction in [0, 1], got {value!r}")
        _check(p, self.strategy in STRATEGIES,
               f"{_named('strategy')} must be one of {', '.join(STRATEGIES)}, got "
               f"{_shorten(self.strategy)}")
        _check(p, self.compile is None or isinstance(self.compile, bool),
               f"{_named('compile')} must be true, false or null (null: compile on CUDA only), "
               f"got {self.compile!r}")
        _check(p, isinstance(self.attention_span, bool),
               f"{_named('attention_span')} must be true or false, got {self.attention_span!r}")
        _check(p, is_int(self.span_ramp) and self.span_ramp >= 1,
               f"{_named('span_ramp')} must be an integer >= 1, got {self.span_ramp!r}")
        _check(p, is_number(self.span_penalty) and self.span_penalty >= 0,
               f"{_named('span_penalty')} must be a number >= 0, got {self.span_penalty!r}")
        try:
            parse_accumulation(self.accumulation)
        except ConfigError as e:
            p.append(str(e).replace("accumulation", _named("accumulation"), 1))
        # The rules between fields, for fields that passed alone: named with the others,
        # not on the next try.
        if preset_valid:
            preset = MODEL_PRESETS[self.model_size]
            _check(p, preset["n_embd"] % preset["n_head"] == 0,
                   f"{_named('model_size')} {self.model_size!r}: n_embd must divide by n_head")
        if valid["seq_len"]:
            _check(p, self.seq_len <= 8192,
                   f"{_named('seq_len')} must be <= 8192 for the built-in presets, got "
                   f"{self.seq_len}")
        if valid["lr"] and valid["min_lr"]:
            _check(p, self.min_lr <= self.lr,
                   f"{_named('min_lr')} ({self.min_lr}) must be <= {_named('lr')} ({self.lr})")
        _raise_if_any("TrainConfig", p)

    def never_stepping_groups(self, from_step: int = 0) -> str | None:
        """Why this config cannot train from `from_step` (a resume's step): a group whose
        factor exceeds max_steps would never take an optimizer step (it trained nothing while
        the run reported a loss as if it had); None when every group steps, or when nothing
        is left to train (a finished run resumed says so, even with a config saved before this
        rule). A rule for training, not part of validate(): a saved run's config must still
        load (to serve, export or compress its checkpoint)."""
        if from_step >= self.max_steps:
            return None
        never = {group: k for group, k in self.accumulation_factors.items()
                 if k > self.max_steps}
        if not never:
            return None
        groups = ", ".join(f"{group} (factor {k})" for group, k in never.items())
        return (f"{_named('accumulation')} {self.accumulation!r}: {groups} would never take an "
                f"optimizer step in {_named('max_steps')} {self.max_steps} micro-batches; "
                f"raise max_steps to >= {max(never.values())} or lower "
                f"{'its factor' if len(never) == 1 else 'their factors'}")

    def left_pending_at_end(self, after: int = 0) -> str | None:
        """What a run of this config leaves unapplied when max_steps is not a multiple of a
        group's factor (the last max_steps % k micro-batches' gradients of that group stay
        pending in the final checkpoint, where a resume with a higher max_steps applies
        them), with the nearest max_steps that leaves nothing and lies past `after` (a
        resume's step: a max_steps at or below it trains nothing); None when every group
        ends on a step. Said, never refused: a first leg to be extended later is
        legitimate."""
        factors = self.accumulation_factors
        left = {group: self.max_steps % k for group, k in factors.items()}
        by_count: dict[int, list[str]] = {}
        for group, count in left.items():
            if count:
                by_count.setdefault(count, []).append(group)
        if not by_count:
            return None
        pending = " and ".join(
            f"the last {f'{count} micro-batches' if count > 1 else 'micro-batch'} "
            f"({', '.join(groups)})" for count, groups in sorted(by_count.items()))
        period = math.lcm(*factors.values())  # every group steps on its multiples
        below, above = self.max_steps // period * period, -(-self.max_steps // period) * period
        ends = " or ".join(str(n) for n in (below, above) if n > after)
        return (f"{_named('max_steps')} {self.max_steps} ends mid-accumulation "
                f"({_named('accumulation')} {self.accumulation!r}): the gradients of {pending} "
                "are never applied in this run (they stay pending in its final checkpoint, for "
                f"a resume with a higher max_steps); max_steps {ends} ends on a step of every "
                "group")

    @property
    def model_preset(self) -> dict[str, int]:
        return MODEL_PRESETS[self.model_size]

    @property
    def accumulation_factors(self) -> dict[str, int]:
        return parse_accumulation(self.accumulation)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        return from_mapping(cls, data, "TrainConfig")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The TrainConfig fields every saved config holds (a checkpoint's, a run's config.json): the
# first version's, saved whole (to_dict) ever since. A saved config without one is a damaged
# or foreign file: filled with the default it described another model (a 'tiny' run's
# weights read as a 'small' GPT's). Every field not listed was added later, with a default
# that behaves as the versions before it did (256 = bytes, "ddp", no span, "cosine", one
# accumulation step, the bundled corpus, 4 x n_embd MLPs; warn_*: warnings only): a config
# saved before a field existed keeps loading as it did.
ALWAYS_SAVED_TRAIN_FIELDS = ("model_size", "max_steps", "batch_size", "seq_len", "lr", "min_lr",
                             "warmup_steps", "weight_decay", "grad_clip", "precision",
                             "checkpoint_every", "keep_checkpoints", "log_every",
                             "eval_batches", "seed", "dropout")


def saved_train_config_problem(saved: Any) -> str | None:
    """What makes `saved` (a TrainConfig as a checkpoint or config.json recorded it) no config
    this project saved, in words to follow the file's name; None when it is one. Only whether
    it is a mapping holding every ALWAYS_SAVED_TRAIN_FIELDS field: its values are
    TrainConfig.from_dict's to check."""
    return validation.saved_fields_problem(saved, ALWAYS_SAVED_TRAIN_FIELDS, "training config")


# Fields a resumed run may change: they do not alter what the checkpoint's weights mean or
# which batches come next (max_steps extends the run; the rest are bookkeeping or hardware).
RESUMABLE_CHANGES = frozenset({"max_steps", "log_every", "checkpoint_every", "keep_checkpoints",
                               "eval_batches", "precision", "warn_min_mfu",
                               "warn_max_comm_share", "warn_max_memory_fraction",
                               # Where the shards are may move (what they hold is data_key);
                               # the starting weights and spans matter only before the first
                               # checkpoint.
                               "data_cache", "init_from", "span_init",
                               # A checkpoint of either strategy is converted on load; compiling
                               # changes speed, not the weights' meaning.
                               "strategy", "compile"})


def resume_conflicts(saved: Mapping[str, Any], config: TrainConfig) -> list[str]:
    """Fields whose value differs from the run being resumed, as 'field: old -> new' (a field
    the saved config lacks counts as its default: orchestrator/validation.py).

    Continuing with another model shape cannot load; with another lr, batch size or seed it
    would silently become a different run. Both are refused by the callers."""
    return validation.resume_conflicts(saved, config, RESUMABLE_CHANGES)
