"""Training efficiency figures: MFU, communication share (in flight and exposed), memory, and
their alert thresholds.

MFU (model FLOPs utilisation) follows PaLM (Chowdhery et al. 2022, appendix B): a decoder
needs 6N + 12·L·H·Q·T FLOPs per trained token (N parameters less the position table: the
token embedding, tied to the LM head, counts once, for the head's matrix product, as nanoGPT
counts it; L layers, H heads of size Q, context T), so achieved FLOP/s = that × tokens/s,
over the device's peak.
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from orchestrator.inventory import accelerator_family, name_tokens

# Dense (no sparsity) peak TFLOP/s per GPU by precision, from the vendors' datasheets, per
# family and board variant: an H100 PCIe is not an H100 SXM (756 vs 989 bf16). fp32 is the
# figure the matmuls of training reach (tensor-core/matrix fp32 where the part has it, else
# vector fp32); a precision a part has no fast path for is absent, so it gets no MFU. K80 is
# per die, as NVML lists each die as a device.
GPU_PEAK_TFLOPS: dict[tuple[str, str], dict[str, float]] = {
    ("K80", ""): {"fp32": 4.37},
    ("P100", "SXM"): {"fp16": 21.2, "fp32": 10.6},
    ("P100", "PCIe"): {"fp16": 18.7, "fp32": 9.3},
    ("V100", "SXM"): {"fp16": 125.0, "fp32": 15.7},
    ("V100", "PCIe"): {"fp16": 112.0, "fp32": 14.0},
    ("V100", "V100S"): {"fp16": 130.0, "fp32": 16.4},
    ("T4", ""): {"fp16": 65.0, "fp32": 8.1},
    ("A10", ""): {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2},
    ("A10G", ""): {"bf16": 70.0, "fp16": 70.0, "fp32": 31.2},
    ("L4", ""): {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3},
    ("L40", ""): {"bf16": 181.0, "fp16": 181.0, "fp32": 90.5},
    ("L40S", ""): {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6},
    ("A100", ""): {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},  # 40/80 GB, SXM and PCIe
    ("H100", "SXM"): {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    ("H100", "PCIe"): {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0},
    ("H100", "NVL"): {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0},
    ("H200", "SXM"): {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    ("H200", "NVL"): {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0},
    ("GH200", ""): {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    ("B200", ""): {"bf16": 2250.0, "fp16": 2250.0, "fp32": 75.0},  # HGX B200, 1000 W
    # Per GCD: an MI250(X) module is two dies, and ROCm lists each as a GPU of its own (as
    # NVML does a K80's); the datasheet's 362.1 / 383 TFLOPS are the whole module's.
    ("MI250", "MI250"): {"bf16": 181.05, "fp16": 181.05, "fp32": 45.25},
    ("MI250", "MI250X"): {"bf16": 191.5, "fp16": 191.5, "fp32": 47.85},
    ("MI300X", ""): {"bf16": 1307.4, "fp16": 1307.4, "fp32": 163.4},
    ("MI300A", ""): {"bf16": 980.6, "fp16": 980.6, "fp32": 122.6},
}

# How a family's board variant reads in its device name: (token, variant), first match wins;
# "A+B" matches a name holding both tokens; a None variant, or None as the default = the name
# must say (so an unlisted or ambiguous variant gets no MFU rather than a guess).
# NVML names an H100 SXM "NVIDIA H100 80GB HBM3" (only the SXM board has HBM3 without NVL),
# a V100 SXM "Tesla V100-SXM2-16GB", an H200 SXM plain "NVIDIA H200". ROCm names device
# 0x740c, an MI250 or an MI250X board alike, "AMD Instinct MI250X / MI250" (Ray's label
# AMD-Instinct-MI250X-MI250): it says neither.
VARIANT_TOKENS: dict[str, tuple[tuple[tuple[str, str | None], ...], str | None]] = {
    "P100": ((("PCIE", "PCIe"), ("SXM2", "SXM"), ("SXM", "SXM")), None),
    "V100": ((("V100S", "V100S"), ("PCIE", "PCIe"), ("SXM2", "SXM"), ("SXM3", "SXM"),
              ("SXM", "SXM")), None),
    "H100": ((("NVL", "NVL"), ("PCIE", "PCIe"), ("SXM5", "SXM"), ("SXM", "SXM"),
              ("HBM3", "SXM")), None),
    "H200": ((("NVL", "NVL"),), "SXM"),
    "MI250": ((("MI250X+MI250", None), ("MI250X", "MI250X")), "MI250"),
}


def accelerator_variant(device_name: str) -> tuple[str, str] | None:
    """(family, variant) of a device name, "" variant for families with one set of peaks;
    None when the family is unknown or the name does not say which board it is."""
    family = accelerator_family(device_name)
    if not family:
        return None
    if family not in VARIANT_TOKENS:
        return family, ""
    rules, default = VARIANT_TOKENS[family]
    tokens = name_tokens(device_name)
    variant = next((v for token, v in rules if set(token.split("+")) <= tokens), default)
    return (family, variant) if variant is not None else None


@dataclass(frozen=True)
class Thresholds:
    """When to warn: MFU below, exposed communication share above (`max_comm_share`: the
    share of step time spent waiting on all-reduce after backward), memory fraction above."""

    min_mfu: float = 0.45
    max_comm_share: float = 0.15
    max_memory_fraction: float = 0.90


def flops_per_token(n_params: int, n_layer: int, n_embd: int, context: int) -> int:
    """PaLM's training FLOPs per token: 6N + 12·L·(H·Q)·T, with H·Q = the model width and N
    the parameters that do matrix products per token (GPT.num_params: all but the position
    table)."""
    return 6 * n_params + 12 * n_layer * n_embd * context


def gpu_peak_flops(device_name: str, precision: str) -> float | None:
    """Datasheet peak for a CUDA device name, or None when the table does not know it (an
    unknown device gets no MFU rather than another family's). A MIG slice ("NVIDIA
    A100-SXM4-80GB MIG 1g.10gb") has no family (inventory.accelerator_family): None too,
    rather than the whole board's peak (an MFU several times too low, and the low-MFU
    alert)."""
    peaks = GPU_PEAK_TFLOPS.get(accelerator_variant(device_name), {})
    return peaks[precision] * 1e12 if precision in peaks else None


def measure_cpu_peak_flops(size: int = 2048, repeats: int = 3, min_seconds: float = 1.0
                           ) -> float:
    """A CPU has no datasheet figure we can trust across machines: time the best of several
    fp32 matmuls with the threads this process uses (2·n³ FLOPs each; ~0.3 s per single-thread
    matmul at 2048). Large enough to reach the BLAS kernel's plateau (here 1 thread: 44
    GFLOP/s at n=256, 54 at 512, 57 at 1024, 69 at 2048), so it is the achievable peak. At
    least `repeats` and at least `min_seconds` of matmuls: a fresh process's first ones run
    slow (thread pool and clock ramping up; half the later figure was seen here)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm-up: first call pays for allocation and kernel selection
    best, started, count = float("inf"), time.perf_counter(), 0
    while count < repeats or time.perf_counter() - started < min_seconds:
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
        count += 1
    return 2 * size ** 3 / best


CPU_PEAK_CACHE = Path.home() / ".cache" / "hetero-orchestrator" / "cpu_peak_flops.json"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_peak_flops(cache: Path = CPU_PEAK_CACHE) -> float:
    """The best of this measurement and every earlier one on this machine with this CPU model
    and thread count (kept in a small JSON file). A matmul timed while other processes compete
    for the cores comes out low, and a low peak inflates MFU — above 100% was seen here when
    the peak was measured under load. The best figure seen is the closest to the true one."""
    measured = measure_cpu_peak_flops()
    key = f"{_cpu_model()} | {torch.get_num_threads()} threads"
    try:
        known = json.loads(cache.read_text())
        known = known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        known = {}
    previous = known.get(key)
    best = max(measured, previous) if isinstance(previous, (int, float)) else measured
    if best > (previous or 0):
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({**known, key: best}))
            os.replace(tmp, cache)  # atomic: concurrent workers never read half a file
        except OSError:
            pass  # a read-only home only loses the cache, not the figure
    return best


def mfu(tokens_per_s: float, flops_per_token_: int, peak_flops: float) -> float:
    return tokens_per_s * flops_per_token_ / peak_flops


def warnings_for(metrics: dict, thresholds: Thresholds) -> list[str]:
    """Human warnings for the figures that cross a threshold (absent figures are skipped)."""
    warnings = []
    if metrics.get("mfu") is not None and metrics["mfu"] < thresholds.min_mfu:
        warnings.append(f"MFU {metrics['mfu']:.1%} is below {thresholds.min_mfu:.0%}")
    # The exposed share, not the in-flight one: all-reduce hidden behind backward costs nothing.
    exposed = metrics.get("comm_exposed_share")
    if exposed is not None and exposed > thresholds.max_comm_share:
        warnings.append(f"exposed gradient all-reduce (steps waiting on it after backward) "
                        f"takes {exposed:.1%} of step time (> {thresholds.max_comm_share:.0%})")
    fraction = metrics.get("memory_fraction")
    if fraction is not None and fraction > thresholds.max_memory_fraction:
        warnings.append(f"memory at {fraction:.1%} of capacity "
                        f"(> {thresholds.max_memory_fraction:.0%})")
    return warnings


def peak_memory(device: torch.device) -> tuple[int, int]:
    """(peak bytes used by this process, capacity in bytes): CUDA max allocated over the
    device's memory on a GPU; the process's peak RSS over the RAM it may use on CPU: within
    its memory cgroup (a container's limit: over the host's RAM, the 90% warning never came
    before the container's OOM kill)."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device),
                torch.cuda.get_device_properties(device).total_memory)
    import resource

    from orchestrator.probes import memory_within_cgroup

    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return peak_rss, memory_within_cgroup()[0]


class BucketMark(NamedTuple):
    """One bucket's all-reduce: launch and completion (seconds, or CUDA events until take()
    reads them), the backward pass that launched it, and whether it was that pass's last
    bucket (GradBucket.is_last(): every gradient of the step was computed at its launch)."""

    start: Any
    end: Any
    step: int
    last: bool


class CommSeconds(NamedTuple):
    """All-reduce seconds of an interval: `in_flight`, the union of the buckets' launch to
    completion (overlapping backward included); `exposed`, the part after each step's
    backward, which the step waits for."""

    in_flight: float
    exposed: float


class CommTimer:
    """Time spent in gradient all-reduce, via a DDP communication hook.

    The hook launches the same all-reduce DDP would (sum, then divide by world size) and marks
    when it was launched and when it completed, so the figure includes waiting for the slowest
    worker — which is what communication costs a synchronous step. Overlapping buckets are
    counted once (the union of their intervals). The exposed part is, per step, from the last
    bucket's launch to the latest completion: DDP launches buckets in order, so at the last
    one's launch backward is done, and what remains is the wait the step cannot hide.

    Where the marks come from depends on the backend. gloo completes its future when the
    all-reduce is done, so host clocks are right. NCCL completes the future as soon as the
    kernel is *enqueued*: a host clock there reads ~0. On CUDA the marks are CUDA events
    instead: the start recorded on the compute stream before the launch (the all-reduce cannot
    begin before the gradients it reduces), the end recorded in the future's callback, which
    runs with the all-reduce's stream current, so the event completes when the kernel does.
    Events are read in `take()` (once per logging interval), never in the hook: reading one
    there would stall the backward pass."""

    def __init__(self) -> None:
        self._marks: list[BucketMark] = []  # in completion order
        self._steps_launched = 0  # backward passes whose last bucket was launched

    def take(self) -> CommSeconds:
        """All-reduce seconds since the last take: in flight, and exposed after backward."""
        marks = self._resolve()
        return CommSeconds(union_seconds([(m.start, m.end) for m in marks]),
                           exposed_seconds(marks))

    def _resolve(self) -> list[BucketMark]:
        marks, self._marks = self._marks, []
        if not marks or isinstance(marks[0].start, float):
            return marks
        base = marks[0].start
        marks[-1].end.synchronize()  # the last end: every earlier event is done too
        return [m._replace(start=base.elapsed_time(m.start) / 1e3,
                           end=base.elapsed_time(m.end) / 1e3) for m in marks]

    def attach(self, ddp_model) -> None:
        import torch.distributed as dist

        on_cuda = next(ddp_model.parameters()).is_cuda

        def mark() -> float | torch.cuda.Event:
            if not on_cuda:
                return time.perf_counter()
            event = torch.cuda.Event(enable_timing=True)
            event.record()  # on the current stream
            return event

        def hook(timer: "CommTimer", bucket):
            start, step, last = mark(), timer._steps_launched, bucket.is_last()
            if last:  # the next bucket belongs to the next backward pass
                timer._steps_launched += 1
            world = dist.get_world_size()
            future = dist.all_reduce(bucket.buffer(), async_op=True).get_future()

            def finish(f):
                timer._marks.append(BucketMark(start, mark(), step, last))
                return f.value()[0].div_(world)

            return future.then(finish)

        ddp_model.register_comm_hook(self, hook)


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end] intervals (overlaps counted once)."""
    total, covered_to = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > covered_to:
            total += end - max(start, covered_to)
            covered_to = end
    return total


def exposed_seconds(marks: list[BucketMark]) -> float:
    """Per step, from its last bucket's launch (backward done) to the latest end of its
    buckets, summed: the time steps wait on all-reduce after compute. A step whose last
    bucket is not among the marks adds nothing (its backward did not finish here)."""
    backward_done = {m.step: m.start for m in marks if m.last}
    latest_end: dict[int, float] = {}
    for m in marks:
        latest_end[m.step] = max(latest_end.get(m.step, m.end), m.end)
    return sum(max(0.0, latest_end[step] - done) for step, done in backward_done.items())
