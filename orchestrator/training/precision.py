"""Mixed precision: which dtype to compute in, autocast, and loss scaling for fp16.

Weights and optimizer state stay fp32 ("master weights"); only the forward/backward math runs
in the low-precision dtype under torch.autocast. fp16's narrow exponent range underflows small
gradients, so it gets dynamic loss scaling (GradScaler); bf16 has fp32's range and needs none.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_precision(requested: str, device: torch.device) -> str:
    """`auto` -> bf16 on a GPU that supports it, fp16 (with loss scaling) on an older GPU,
    fp32 on CPU (CPUs without bf16 kernels run a bf16 matmul ~150x slower than fp32)."""
    if requested != "auto":
        if requested not in _DTYPES:
            raise ValueError(f"precision must be one of auto, {', '.join(_DTYPES)}; "
                             f"got {requested!r}")
        return requested
    if device.type == "cuda":
        return "bf16" if _native_bf16() else "fp16"
    return "fp32"


def emulation_warning(requested: str, device: torch.device) -> str | None:
    """What to say where a precision asked for (not auto) runs emulated, far slower, on
    `device`; None where it runs natively. Said by the job once (loop.job_precision), not by
    every worker."""
    if device.type == "cpu" and requested in ("fp16", "bf16"):
        return (f"precision {requested} on CPU is emulated on most CPUs and can be far slower "
                "than fp32; use it on CPU only to test the code path")
    if device.type == "cuda" and requested == "bf16" and not _native_bf16():
        # (named as a field and as its flag: train() also takes a TrainConfig built in code)
        return ("precision bf16 on a GPU without native bf16 (compute capability below 8.0: "
                "T4, V100) is emulated and far slower; use precision fp16 (--precision fp16), "
                "with loss scaling, as auto would")
    return None


def _native_bf16() -> bool:
    """Whether this process's GPU computes bf16 natively (compute capability 8.0+). By
    default torch also counts emulated bf16, which a T4 or V100 runs far slower than fp16."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


@dataclass(frozen=True)
class Precision:
    """A resolved training precision (fp32, fp16 or bf16) on a device type: gives the autocast
    context and the grad scaler that go with it."""

    name: str  # fp32 | fp16 | bf16, already resolved
    device_type: str  # "cpu" | "cuda"

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.name]

    def autocast(self):
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Dynamic loss scaling for fp16; a disabled (pass-through) scaler otherwise."""
        return torch.amp.GradScaler(self.device_type, enabled=self.name == "fp16")


def saved_loss_scale(saved: dict) -> float:
    """The loss scale a checkpoint's scaler state was at: 1 for a run without loss scaling
    (it saved an empty state)."""
    return float(saved.get("scale", 1.0)) if saved else 1.0


def load_scaler_state(scaler: torch.amp.GradScaler, saved: dict) -> None:
    """A checkpoint's loss-scaler state into this run's scaler. A run saved without loss
    scaling (fp32, bf16) saved an empty state, which an fp16 scaler refuses: resumed in fp16
    (an A100's bf16 run moved to a T4), the scaler starts afresh at its initial scale."""
    if saved:
        scaler.load_state_dict(saved)
