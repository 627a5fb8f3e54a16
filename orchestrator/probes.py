"""Probes: each measures one thing about this node and fails on its own.

A failing probe returns nothing and an error string; it never stops the others, so a broken
NVML install still leaves the node's CPUs and memory placeable.
"""
from __future__ import annotations

import math
import os
import socket
from typing import Any, Callable, Iterable

from orchestrator.inventory import GpuInfo, declared_gpus


def probe_host() -> dict[str, Any]:
    import psutil

    memory = psutil.virtual_memory()
    return {
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count() or 1,
        "load_avg_1m": os.getloadavg()[0],
        "ram_total_bytes": memory.total,
        "ram_available_bytes": memory.available,
    }


def probe_nvml() -> tuple[GpuInfo, ...]:
    """Measured GPUs. No driver, no library or no GPU -> () without an error: that is a normal
    CPU node, not a fault."""
    try:
        import pynvml  # lazy: keeps `actors` importable fast on CPU-only machines
    except ImportError:
        return ()
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:  # NVML library or driver absent: a CPU-only node
        return ()
    try:
        return tuple(_nvml_gpu(pynvml, index) for index in range(pynvml.nvmlDeviceGetCount()))
    finally:
        pynvml.nvmlShutdown()


def _nvml_gpu(pynvml: Any, index: int) -> GpuInfo:
    """One GPU. Name, UUID and memory are required (without them the probe fails, as
    before); utilization, NVLink and PCIe are optional: None where this GPU or driver lacks
    them (NotSupported on consumer cards, MIG slices, virtual GPUs)."""
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    utilization = _nvml_optional(pynvml, pynvml.nvmlDeviceGetUtilizationRates, handle)
    return GpuInfo(
        index=index,
        name=_text(pynvml.nvmlDeviceGetName(handle)),
        memory_total_bytes=int(memory.total),
        memory_free_bytes=int(memory.free),
        memory_used_bytes=int(memory.used),
        utilization_pct=None if utilization is None else float(utilization.gpu),
        uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
        source="nvml",
        nvlink_links=_nvlink_active_links(pynvml, handle),
        pcie_gen=_nvml_optional(pynvml, pynvml.nvmlDeviceGetCurrPcieLinkGeneration, handle),
        pcie_width=_nvml_optional(pynvml, pynvml.nvmlDeviceGetCurrPcieLinkWidth, handle),
    )


def _nvml_optional(pynvml: Any, query: Callable[..., Any], *args: Any) -> Any:
    """An NVML query whose absence is normal: None instead of failing the GPU or the probe."""
    try:
        return query(*args)
    except pynvml.NVMLError:
        return None


def _nvlink_active_links(pynvml: Any, handle: Any) -> int | None:
    """Active NVLink links, or None when no link answers (a GPU without NVLink). Links past
    the device's own count answer with an error too, so a failing link counts as inactive."""
    enabled = getattr(pynvml, "NVML_FEATURE_ENABLED", 1)
    states = [_nvml_optional(pynvml, pynvml.nvmlDeviceGetNvLinkState, handle, link)
              for link in range(getattr(pynvml, "NVML_NVLINK_MAX_LINKS", 18))]
    answered = [state for state in states if state is not None]
    return sum(state == enabled for state in answered) if answered else None


def _text(value: bytes | str) -> str:
    # Older pynvml releases return bytes, newer ones str.
    return value.decode() if isinstance(value, bytes) else value


def run_probe(name: str, probe: Callable[[], Any], default: Any,
              errors: dict[str, str]) -> Any:
    """Run one probe; on failure record `name: error` and return `default`."""
    try:
        return probe()
    except Exception as e:  # one probe's failure must not stop the others
        errors[name] = f"{type(e).__name__}: {e}"
        return default


def probe_gpus(labels: dict[str, str], errors: dict[str, str]) -> tuple[GpuInfo, ...]:
    """Measured GPUs when NVML sees any; otherwise whatever the node's labels declare."""
    measured = run_probe("nvml", probe_nvml, (), errors)
    if measured:
        return measured
    return run_probe("declared", lambda: declared_gpus(labels), (), errors)


# Node-to-node bandwidth. The transfer itself needs Ray (ray_layer/node_agent.py); the arithmetic
# lives here so it is tested without a cluster.
MIB = 1024 ** 2
BANDWIDTH_DEFAULT_BYTES = 8 * MIB  # large enough that per-transfer overhead is a small share
BANDWIDTH_MAX_BYTES = 256 * MIB  # bounds the object-store memory one measurement can take


def bandwidth_probe_bytes(nbytes: int) -> int:
    """The payload size actually sent: at least 1 byte, at most BANDWIDTH_MAX_BYTES, so a
    caller's typo cannot fill a node's object store."""
    return max(1, min(int(nbytes), BANDWIDTH_MAX_BYTES))


def best_bandwidth_gbps(nbytes: int, seconds: Iterable[float | None]) -> float | None:
    """GB/s (1e9 bytes/s) of the fastest round, or None when no round gave a usable time.

    The fastest round, not the mean: the first transfer to a peer pays one-time costs
    (connections, memory mapping) that say nothing about the link. Failed rounds (None) and
    non-positive or non-finite times are dropped rather than turned into absurd rates."""
    usable = [s for s in seconds if s is not None and math.isfinite(s) and s > 0]
    if nbytes <= 0 or not usable:
        return None
    return nbytes / min(usable) / 1e9
