"""CompressConfig: every knob of the compression pipeline, validated at construction.

Errors name the field (and its command-line flag: `prune_sparsity` is `--prune-sparsity`);
all problems are reported together, as in orchestrator/config.py.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from orchestrator import validation
from orchestrator.config import MODEL_PRESETS, ConfigError, from_mapping
from orchestrator.compression.distill import MIN_TEMPERATURE
from orchestrator.compression.prune import SCOPES
from orchestrator.compression.structured import IMPORTANCE, STRUCTURES
from orchestrator.validation import (SEED_RULE, TORCH_THREADS_RULE, field_with_flag, flag_of,
                                     is_int, is_number, is_seed, is_torch_threads)

DEVICES = ("auto", "cpu", "cuda")

# Fields that change only bookkeeping or the report, not what a stage computes: a rerun may
# change them and still reuse the finished stages under --out.
RESUMABLE_CHANGES = frozenset({"log_every", "checkpoint_every", "device", "threads",
                               "latency_batch", "latency_batched", "latency_seq",
                               "latency_repeats",
                               "eval_tokens", "eval_batch_size", "onnx_baseline",
                               "int8_static"})
# Fine-tune settings a rerun may change while a fine-tune stage is unfinished (what makes one
# diverge or run out of memory): the fine-tunes not finished yet run with the new values from
# step 0; a finished stage keeps the values it was made with (its stage.json records them
# under `settings`).
RESTART_CHANGES = ("lr", "warmup_steps", "weight_decay", "grad_clip", "temperature",
                   "batch_size", "seq_len")


@dataclass(frozen=True)
class CompressConfig:
    """Every setting of jobs/compress.py (distillation, pruning, QAT, export, report), validated
    at construction."""

    # Stage 0 (only with a smaller student): distil the teacher into a fresh smaller model.
    student_size: str | None = None  # a MODEL_PRESETS name; None = the teacher's architecture
    distill_steps: int = 300
    # Stage 1: gradual pruning during a distillation fine-tune. Structured (the default):
    # whole attention heads and MLP channels, prune_sparsity of the block parameters, then the
    # matrices are shrunk; unstructured: prune_sparsity of the block Linear weights zeroed.
    prune_sparsity: float = 0.30
    prune_structure: str = "both"
    prune_importance: str = "taylor"
    prune_scope: str = "global"
    prune_steps: int = 200
    prune_ramp_fraction: float = 0.75  # sparsity reaches its target at this fraction of steps
    prune_every: int = 10  # steps between mask updates while ramping
    # Stage 2: INT8 quantization-aware distillation fine-tune (masks fixed).
    qat_steps: int = 200
    # 7: int8 storage, values in [-63, 63]: exact in ONNX Runtime on every x86 CPU. 8: the full
    # [-127, 127], exact only where the CPU has VNNI (see qat.WEIGHT_QMAX).
    weight_bits: int = 7
    # Distillation (all fine-tunes).
    alpha: float = 0.5  # weight of cross-entropy on the data; 1 - alpha on the teacher's KL
    temperature: float = 2.0
    # Optimisation.
    lr: float = 3e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch_size: int = 16
    seq_len: int | None = None  # None: the teacher's context length
    seed: int = 1337
    device: str = "auto"
    # Progress and resume.
    log_every: int = 10
    checkpoint_every: int = 50
    # Report.
    eval_tokens: int = 16384  # held-out tokens for perplexity (capped by the held-out text)
    eval_batch_size: int = 8
    latency_batch: int = 1
    latency_batched: int = 16  # the serving-like batch also timed (1: only latency_batch)
    latency_seq: int = 64  # capped by the model's context length
    latency_repeats: int = 20
    threads: int = 2  # CPU threads for every latency measurement (torch and ONNX Runtime)
    onnx_baseline: bool = True  # also time the original model in ONNX Runtime fp32
    # Also time the int8 integers with static (calibrated) activation scales, to compare the
    # two schemes in ONNX Runtime (two more ONNX exports in the report).
    int8_static: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        p: list[str] = []

        def check(ok: bool, field: str, message: str) -> None:
            if not ok:
                p.append(f"{field_with_flag(field, flag_of(field))} {message}, got "
                         f"{getattr(self, field)!r}")

        check(self.student_size is None or isinstance(self.student_size, str)  # (a list:
              and self.student_size in MODEL_PRESETS, "student_size",  # unhashable)
              f"must be one of {', '.join(MODEL_PRESETS)} (or unset: the teacher's shape)")
        for name in ("prune_steps", "batch_size", "log_every", "checkpoint_every", "prune_every",
                     "eval_tokens", "eval_batch_size", "latency_batch", "latency_batched",
                     "latency_repeats"):
            value = getattr(self, name)
            check(is_int(value) and value >= 1, name, "must be an integer >= 1")
        check(is_torch_threads(self.threads), "threads", TORCH_THREADS_RULE)
        # The report times a decode step after latency_seq - 1 cached positions: one at least.
        check(is_int(self.latency_seq) and self.latency_seq >= 2, "latency_seq",
              "must be an integer >= 2")
        for name in ("distill_steps", "qat_steps", "warmup_steps"):
            value = getattr(self, name)
            check(is_int(value) and value >= 0, name, "must be an integer >= 0")
        check(self.seq_len is None or (is_int(self.seq_len) and self.seq_len >= 1), "seq_len",
              "must be an integer >= 1 (or unset: the teacher's context length)")
        check(is_number(self.prune_sparsity) and 0 < self.prune_sparsity < 1,
              "prune_sparsity", "must be a fraction in (0, 1)")
        check(is_int(self.weight_bits) and self.weight_bits in (7, 8), "weight_bits",
              "must be 7 or 8")
        check(self.prune_structure in STRUCTURES, "prune_structure",
              f"must be one of {', '.join(STRUCTURES)}")
        check(self.prune_importance in IMPORTANCE, "prune_importance",
              f"must be one of {', '.join(IMPORTANCE)}")
        check(self.prune_scope in SCOPES, "prune_scope", f"must be one of {', '.join(SCOPES)}")
        check(is_number(self.prune_ramp_fraction) and 0 < self.prune_ramp_fraction <= 1,
              "prune_ramp_fraction", "must be a fraction in (0, 1]")
        check(is_number(self.alpha) and 0 <= self.alpha <= 1, "alpha",
              "must be a fraction in [0, 1]")
        # Below MIN_TEMPERATURE the fp32 loss is NaN (the softened logits overflow) or
        # loses its KL term (T^2 underflows): refused here, not found after the stages.
        check(is_number(self.temperature) and MIN_TEMPERATURE <= self.temperature <= 100,
              "temperature", f"must be a number in [{MIN_TEMPERATURE:.3g}, 100] (smaller "
              "overflows the softened logits or underflows T^2 in fp32)")
        check(is_number(self.lr) and 0 < self.lr < 1, "lr", "must be a number in (0, 1)")
        check(is_number(self.weight_decay) and self.weight_decay >= 0, "weight_decay",
              "must be a number >= 0")
        check(is_number(self.grad_clip) and self.grad_clip >= 0, "grad_clip",
              "must be a number >= 0 (0 disables clipping)")
        check(is_seed(self.seed), "seed", SEED_RULE)
        check(self.device in DEVICES, "device", f"must be one of {', '.join(DEVICES)}")
        check(isinstance(self.onnx_baseline, bool), "onnx_baseline", "must be true or false")
        check(isinstance(self.int8_static, bool), "int8_static", "must be true or false")
        if self.student_size is not None and is_int(self.distill_steps):
            check(self.distill_steps >= 1, "distill_steps",
                  "must be >= 1 with a smaller --student-size (a fresh student must be trained)")
        if p:
            raise ConfigError("invalid CompressConfig: " + "; ".join(p))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CompressConfig":
        return from_mapping(cls, data, "CompressConfig")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resume_conflicts(saved: Mapping[str, Any], config: CompressConfig,
                     block_size: int | None = None, restart: bool = False) -> list[str]:
    """'field: old -> new' for every field whose change would make finished stages stale (a
    field the saved config lacks counts as its default: orchestrator/validation.py); with
    `restart` (a fine-tune is unfinished), not those of RESTART_CHANGES (restart_changes).
    Settings that run the same are the same: seq_len left out or given as the teacher's
    context (`block_size`), the importance of unstructured pruning (which ranks no units),
    the distillation steps of a run without a smaller student."""
    saved, config = _as_run(saved, config, block_size)
    return validation.resume_conflicts(
        saved, config, RESUMABLE_CHANGES | frozenset(RESTART_CHANGES if restart else ()))


def restart_changes(saved: Mapping[str, Any], config: CompressConfig,
                    block_size: int | None = None) -> list[str]:
    """'field: old -> new' for the fields of RESTART_CHANGES that `config` changes (settings
    that run the same are the same, as in resume_conflicts)."""
    saved, config = _as_run(saved, config, block_size)
    others = {field.name for field in dataclasses.fields(config)} - set(RESTART_CHANGES)
    return validation.resume_conflicts(saved, config, frozenset(others))


def _as_run(saved: Mapping[str, Any], config: CompressConfig, block_size: int | None
            ) -> tuple[dict[str, Any], CompressConfig]:
    """`saved` and `config` with the settings that run the same made the same."""
    saved = dict(saved)
    if block_size:
        saved["seq_len"] = saved.get("seq_len") or block_size
        config = dataclasses.replace(config, seq_len=config.seq_len or block_size)
    unused = {"prune_importance": config.prune_structure == "unstructured"
              and saved.get("prune_structure") == "unstructured",
              "distill_steps": not config.student_size and not saved.get("student_size")}
    for name, ignored in unused.items():
        if ignored:
            saved[name] = getattr(config, name)
    return saved, config


def fine_tune_settings(settings: CompressConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The RESTART_CHANGES values of a config, or of a saved one (a field it lacks counts as
    its default): what a fine-tune stage records it was made with."""
    if isinstance(settings, CompressConfig):
        return {name: getattr(settings, name) for name in RESTART_CHANGES}
    defaults = CompressConfig()
    return {name: settings.get(name, getattr(defaults, name)) for name in RESTART_CHANGES}
