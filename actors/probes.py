"""Probes: each measures one thing about this node and fails on its own.

A failing probe returns nothing and an error string; it never stops the others, so a broken
NVML install still leaves the node's CPUs and memory placeable.
"""
from __future__ import annotations

import os
import socket
from typing import Any, Callable

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
        import pynvml
    except ImportError:
        return ()
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:  # NVML library or driver absent: a CPU-only node
        return ()
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            gpus.append(GpuInfo(
                index=index,
                name=name.decode() if isinstance(name, bytes) else name,
                memory_total_bytes=int(memory.total),
                memory_free_bytes=int(memory.free),
                utilization_pct=float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                uuid=uuid.decode() if isinstance(uuid, bytes) else uuid,
                source="nvml",
            ))
        return tuple(gpus)
    finally:
        pynvml.nvmlShutdown()


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
