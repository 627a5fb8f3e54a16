"""Probes: each measures one thing about this node and fails on its own.

A failing probe returns nothing and an error string; it never stops the others, so a broken
NVML install still leaves the node's CPUs and memory placeable.
"""
from __future__ import annotations

import math
import os
import random
import socket
import statistics
import threading
import time
from types import SimpleNamespace
from typing import Any, Callable, Iterable, NamedTuple

from orchestrator.inventory import (LABEL_ACCELERATOR_COUNT, LABEL_ACCELERATOR_TYPE,
                                    MAX_DECLARED_ACCELERATORS, GpuInfo, accelerator_family,
                                    declared_gpus, gpu_families, gpu_memory_problem)


def probe_host() -> dict[str, Any]:
    """The node's CPUs, load and memory as this process may use them: within its CPU quota
    and affinity and its memory cgroup (a container's limits, not the host's figures;
    host_cpu_figures for the CPUs and load)."""
    total, available = memory_within_cgroup()
    cpu_count, load = host_cpu_figures()
    return {
        "hostname": socket.gethostname(),
        "cpu_count": cpu_count,
        "load_avg_1m": load,
        "ram_total_bytes": total,
        "ram_available_bytes": available,
    }


# The first reading of a cgroup's CPU usage counter has no earlier one to take a rate from:
# the counter is read twice this far apart (once per agent: later readings take the rate
# since the previous one).
CPU_FIRST_SAMPLE_S = 0.25
# The usage rate is smoothed as the kernel smooths its 1-minute load average (an exponential
# average of this time constant): load_avg_1m keeps its meaning, and one heartbeat's burst
# does not swing placement.
CPU_LOAD_WINDOW_S = 60.0


class CgroupCpuLoad:
    """The CPUs' worth a cgroup used (usage counter's rate), smoothed over CPU_LOAD_WINDOW_S,
    one figure per cgroup directory. Thread-safe: an agent's heartbeat and report_now probe
    at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.last: dict[str, tuple[float, float]] = {}  # dir -> (monotonic time, CPU seconds)
        self.smoothed: dict[str, float] = {}  # dir -> CPUs busy

    def busy_cpus(self, key: str, now: float, cpu_seconds: float) -> float | None:
        """The smoothed CPUs busy after a reading of the counter (`cpu_seconds` at `now`);
        None for a first reading (no rate yet) or a counter that went back (a new cgroup
        of the same name)."""
        with self._lock:
            before = self.last.get(key)
            self.last[key] = (now, cpu_seconds)
            if before is None or now <= before[0] or cpu_seconds < before[1]:
                return None
            rate = (cpu_seconds - before[1]) / (now - before[0])
            previous = self.smoothed.get(key)
            weight = 1 - math.exp(-(now - before[0]) / CPU_LOAD_WINDOW_S)
            smoothed = rate if previous is None else previous + (rate - previous) * weight
            self.smoothed[key] = smoothed
            return smoothed


_CPU_LOAD = CgroupCpuLoad()  # one per process: every report continues the same average


def _affinity_cpus() -> int:
    """The CPUs this process may run on (its affinity; the OS's count where there is none)."""
    try:
        return len(os.sched_getaffinity(0)) or os.cpu_count() or 1
    except (AttributeError, OSError):  # (not on macOS)
        return os.cpu_count() or 1


def host_cpu_figures(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup",
                     load: CgroupCpuLoad = _CPU_LOAD,
                     clock: Callable[[], float] = time.monotonic,
                     sleep: Callable[[float], None] = time.sleep, *,
                     affinity: Callable[[], int] | None = None,
                     host_cpus: Callable[[], int | None] | None = None,
                     host_load: Callable[[], float] | None = None) -> tuple[int, float]:
    """(cpu_count, load_avg_1m) as a node reports them: the CPUs this process's cgroups and
    affinity let it use, and a load on the same CPUs, so that load / count is how busy they
    are. In a pod of 4 CPUs on a 64-core host, the host's figures said 64 CPUs and a load
    per CPU that said nothing about the pod (throttled at its quota while the host idled,
    idle while other pods kept the host busy).

    Under a CPU quota (cgroup_cpu_limit): the smaller of the quota and the affinity, and the
    load of the cgroup setting the quota: its CPU usage rate, smoothed over a minute, plus
    the share of time a task of it waited for a CPU (v2's cpu.pressure "some avg60": at least
    one task waiting then). The count is whole (ceil: a quota of 1.5 runs on 2 CPUs at once),
    and the load scaled by count / quota so that load per CPU stays usage over the quota.
    Without a quota (or its usage unreadable): the affinity's CPUs and the host's load
    average scaled to them, i.e. the host's load per CPU (a host's pinned process does not
    make its node look loaded)."""
    usable = (affinity or _affinity_cpus)()
    limit = cgroup_cpu_limit(proc_cgroup, root)
    busy = None if limit is None else _cgroup_busy_cpus(limit, load, clock, sleep)
    if busy is not None:
        cpus = min(limit.cpus, usable)
        count = max(math.ceil(cpus - 1e-9), 1)  # (1e-9: a quota of 2 read as 2.0000000001)
        return count, busy * count / cpus
    load_avg = host_load() if host_load else os.getloadavg()[0]
    return usable, load_avg * usable / max((host_cpus or os.cpu_count)() or 1, 1)


def _cgroup_busy_cpus(limit: CpuLimit, load: CgroupCpuLoad, clock: Callable[[], float],
                      sleep: Callable[[float], None]) -> float | None:
    """The CPUs' worth `limit`'s cgroup keeps busy (smoothed usage rate plus tasks waiting,
    host_cpu_figures), or None when its usage counter cannot be read."""
    seconds = _cgroup_cpu_seconds(limit)
    if seconds is None:
        return None
    busy = load.busy_cpus(limit.usage_dir, clock(), seconds)
    if busy is None:  # a first reading: sample the counter over a short pause
        sleep(CPU_FIRST_SAMPLE_S)
        seconds = _cgroup_cpu_seconds(limit)
        if seconds is None:
            return None
        busy = load.busy_cpus(limit.usage_dir, clock(), seconds)
    return None if busy is None else busy + _cgroup_cpu_waiting(limit)


class CpuLimit(NamedTuple):
    """The tightest CPU quota over a process's cgroups: CPUs' worth, and where to read the
    usage of the cgroup setting it."""
    cpus: float
    usage_dir: str  # v2: cpu.stat's usage_usec; v1: cpuacct.usage (the cpuacct hierarchy)
    v2: bool


def cgroup_cpu_limit(proc_cgroup: str = "/proc/self/cgroup",
                     root: str = "/sys/fs/cgroup") -> CpuLimit | None:
    """The smallest CPU quota (quota / period: CPUs' worth) of this process's cgroups, from
    its own up to the mount's root as for memory (_cgroup_dirs: a pod's quota set above
    the agent's own cgroup binds it), v2's cpu.max or v1's cpu.cfs_quota_us and
    cpu.cfs_period_us; None without a quota (or without cgroups)."""
    quotas = []
    for base, v2 in _cgroup_dirs(proc_cgroup, root, "cpu"):
        cpus = _cgroup_cpu_quota(base, v2)
        if cpus is not None:
            usage_dir = base if v2 else f"{root.rstrip('/')}/cpuacct" + base[
                len(f"{root.rstrip('/')}/cpu"):]
            quotas.append(CpuLimit(cpus, usage_dir, v2))
    return min(quotas, key=lambda limit: limit.cpus, default=None)


def _cgroup_cpu_quota(base: str, v2: bool) -> float | None:
    """CPUs' worth of one cgroup's quota, or None when it sets none or cannot be read."""
    try:
        if v2:
            with open(f"{base}/cpu.max") as f:
                quota, _, period = f.read().strip().partition(" ")
        else:
            with open(f"{base}/cpu.cfs_quota_us") as f:
                quota = f.read().strip()
            with open(f"{base}/cpu.cfs_period_us") as f:
                period = f.read().strip()
        if quota in ("max", "-1"):
            return None
        cpus = int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None
    return cpus if cpus > 0 else None


def _cgroup_cpu_seconds(limit: CpuLimit) -> float | None:
    """The CPU seconds the cgroup's tasks have used (its counter), or None when unreadable."""
    try:
        if limit.v2:
            usec = _cgroup_stat(f"{limit.usage_dir}/cpu.stat", "usage_usec", None)
            return None if usec is None else usec / 1e6
        with open(f"{limit.usage_dir}/cpuacct.usage") as f:
            return int(f.read().strip()) / 1e9
    except (OSError, ValueError):
        return None


def _cgroup_cpu_waiting(limit: CpuLimit) -> float:
    """The share of the last minute some task of the cgroup waited for a CPU (v2's PSI, 0-1);
    0 where it is not exposed (v1, a kernel without PSI)."""
    if not limit.v2:
        return 0.0
    try:
        with open(f"{limit.usage_dir}/cpu.pressure") as f:
            for line in f:
                kind, *fields = line.split()
                if kind == "some":
                    averages = dict(field.split("=", 1) for field in fields)
                    return min(max(float(averages["avg60"]) / 100, 0.0), 1.0)
    except (OSError, ValueError, KeyError):
        pass
    return 0.0


def memory_within_cgroup() -> tuple[int, int]:
    """(total, available) bytes of RAM this process may use: the kernel's figures, within its
    memory cgroup's limit (a container's, not the host's)."""
    import psutil

    memory = psutil.virtual_memory()
    limit = cgroup_memory_limit()
    if limit is None:
        return memory.total, memory.available
    return min(memory.total, limit[0]), min(memory.available, limit[0] - limit[1])


def cgroup_memory_limit(proc_cgroup: str = "/proc/self/cgroup",
                        root: str = "/sys/fs/cgroup") -> tuple[int, int] | None:
    """(limit, usage) in bytes of this process's memory cgroups (v2, or v1's memory
    controller), or None without a limit (or without cgroups). In a container the host's
    figures overstate what the process may take: psutil reads the host's.

    Every cgroup from the process's own up to the mount's root counts (a limit set on any
    of them binds it): the limit is the smallest of theirs, and the usage is that limit less
    the least room any of them leaves (siblings may fill a parent's). The process's own
    cgroup alone read as no limit where the container's was set above it (Ray's workers in
    a child cgroup of the container's). Usage leaves out the page cache the kernel reclaims
    first (inactive files), as the kubelet's working set does: counted, a container that had
    read its dataset once looked nearly full."""
    levels = [figures for base, names in _cgroup_memory_dirs(proc_cgroup, root)
              if (figures := _cgroup_level(base, names)) is not None]
    if not levels:
        return None
    limit = min(level_limit for level_limit, _ in levels)
    room = min(level_limit - usage for level_limit, usage in levels)
    return limit, limit - max(room, 0)


def _cgroup_level(base: str, names: tuple[str, str, str, str | None]) -> tuple[int, int] | None:
    """(limit, usage) of one cgroup directory, or None when it sets no limit or cannot be
    read. v1 also reads memory.stat's hierarchical_memory_limit: its ancestors' limits,
    including those outside a container's view."""
    limit_name, usage_name, inactive_key, hierarchical_key = names
    try:
        with open(f"{base}/{limit_name}") as f:
            text = f.read().strip()
        with open(f"{base}/{usage_name}") as f:
            usage = int(f.read().strip())
        limit = NO_CGROUP_LIMIT if text == "max" else int(text)
    except (OSError, ValueError):
        return None
    stat = f"{base}/memory.stat"
    if hierarchical_key:
        limit = min(limit, _cgroup_stat(stat, hierarchical_key, NO_CGROUP_LIMIT))
    if limit >= NO_CGROUP_LIMIT:
        return None
    usage -= min(_cgroup_stat(stat, inactive_key), usage)
    return limit, min(usage, limit)


NO_CGROUP_LIMIT = 1 << 60  # v2 writes "no limit" as "max", v1 as ~2**63
_CGROUP_V2 = ("memory.max", "memory.current", "inactive_file", None)
_CGROUP_V1 = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file",
              "hierarchical_memory_limit")


def _cgroup_memory_dirs(proc_cgroup: str, root: str
                        ) -> list[tuple[str, tuple[str, str, str, str | None]]]:
    """Directories (with their file names) of this process's memory cgroups (_cgroup_dirs)."""
    return [(base, _CGROUP_V2 if v2 else _CGROUP_V1)
            for base, v2 in _cgroup_dirs(proc_cgroup, root, "memory")]


def _cgroup_dirs(proc_cgroup: str, root: str, v1_controller: str) -> list[tuple[str, bool]]:
    """Directories of this process's cgroups, each with whether it is v2's (else v1's
    `v1_controller`'s, mounted at root/<controller>): its own path under the mount and each
    parent up to the mount's root. A container sharing the host's cgroup namespace (Docker's
    default on v1) lists its host path in /proc/self/cgroup, which is not under the mount,
    but has its own cgroup mounted at the root: the walk ends there."""
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    dirs = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if not controllers:
            mount, v2 = root.rstrip("/"), True
        elif v1_controller in controllers.split(","):
            mount, v2 = f"{root.rstrip('/')}/{v1_controller}", False
        else:
            continue
        parts = [part for part in path.split("/") if part]
        if ".." in parts:  # a cgroup outside this namespace's view: only the mount's root
            parts = []
        dirs += [("/".join([mount, *parts[:depth]]), v2) for depth in range(len(parts), -1, -1)]
    return list(dict.fromkeys(dirs))


def _cgroup_stat(path: str, key: str, default: int | None = 0) -> int | None:
    """One figure of a flat-keyed cgroup file (memory.stat, cpu.stat), `default` when it
    cannot be read."""
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name == key:
                    return max(int(value), 0)
    except (OSError, ValueError):
        pass
    return default


# What a node whose host probe failed reports: one CPU's worth of nothing, and a load so high
# it loses every load tie-break until the probe works again. Finite, because the scheduler
# refuses reports carrying a number that is not one (inventory.report_problem): infinity took
# such a node out of the cluster and released its running jobs' reservations.
HOST_PROBE_FAILED_LOAD = 1e6


def host_figures(errors: dict[str, str]) -> dict[str, Any]:
    """probe_host's figures, or the stand-in above with the failure recorded in `errors`."""
    return run_probe("host", probe_host, None, errors) or {
        "hostname": "?", "cpu_count": 1, "load_avg_1m": HOST_PROBE_FAILED_LOAD,
        "ram_total_bytes": 0, "ram_available_bytes": 0}


# nvmlInit's errors that mean "no NVIDIA driver here", i.e. a CPU node (pynvml's codes).
NVML_ABSENT_ERRORS = {9: "driver not loaded", 12: "library not found"}


def probe_nvml(errors: dict[str, str] | None = None) -> tuple[GpuInfo, ...]:
    """Measured GPUs. No library or no driver -> () without an error: that is a normal CPU
    node, not a fault. Any other nvmlInit failure (a driver/library version mismatch after a
    driver upgrade, no permission) raises: a GPU node must not quietly read as a CPU node.
    With `errors`, a GPU whose queries fail is left out and its error recorded there (one lost
    GPU of eight used to drop all eight); without, the failure raises."""
    try:
        import pynvml  # lazy: keeps `actors` importable fast on CPU-only machines
    except ImportError:
        return ()
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        if getattr(e, "value", None) in NVML_ABSENT_ERRORS:
            return ()
        raise
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            try:
                gpus.append(_nvml_gpu(pynvml, index, errors))
            except (pynvml.NVMLError, UnicodeDecodeError, GpuUnknown) as e:  # (UUID not UTF-8)
                if errors is None:
                    raise
                why = str(e) if isinstance(e, GpuUnknown) else f"{type(e).__name__}: {e}"
                _nvml_error(errors, f"GPU {index}: {why}")
        return tuple(gpus)
    finally:
        _nvml_shutdown(pynvml, errors)


class GpuUnknown(Exception):
    """What a GPU offers cannot be known this time (its MIG slices cannot be counted): left
    out of the probe and named in its error, as a lost GPU is, never reported as empty."""


def _nvml_error(errors: dict[str, str], problem: str) -> None:
    """Add `problem` to the nvml probe's error (its own name: a metrics label and the status
    column), after any there already."""
    errors["nvml"] = f"{errors['nvml']}; {problem}" if "nvml" in errors else problem


def _nvml_shutdown(pynvml: Any, errors: dict[str, str] | None = None) -> None:
    """nvmlShutdown, whose failure loses nothing read before it (recorded in `errors`): raised
    from a `finally`, it replaced the readings, and every GPU was lost for the heartbeat."""
    try:
        pynvml.nvmlShutdown()
    except pynvml.NVMLError as e:
        if errors is not None:
            _nvml_error(errors, f"nvmlShutdown: {type(e).__name__}: {e} (readings kept)")


def nvml_index_and_process_bytes(uuid: str, pid: int) -> tuple[int | None, int]:
    """(the NVML index of the device torch names by `uuid`, the bytes process `pid` holds on
    it): None when NVML cannot find the device (no library or driver), 0 when it cannot list
    its processes (MIG, vGPU, WSL, another PID namespace). Each falls back on its own. For a
    MIG slice, its board's index (the one probe_nvml reports the board under)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return None, 0
    try:
        handle = _nvml_handle_by_uuid(pynvml, uuid)
        index = pynvml.nvmlDeviceGetIndex(_nvml_board(pynvml, handle))
        try:
            held = sum(p.usedGpuMemory or 0 for p in
                       pynvml.nvmlDeviceGetComputeRunningProcesses(handle) if p.pid == pid)
        except pynvml.NVMLError:
            held = 0
        return index, held
    except pynvml.NVMLError:
        return None, 0
    finally:
        _nvml_shutdown(pynvml)


def _nvml_handle_by_uuid(pynvml: Any, uuid: str):
    """The NVML handle of the device torch names by `uuid` (torch gives it bare, NVML wants
    the "GPU-" or, for a MIG slice, the "MIG-" prefix)."""
    if uuid.startswith(("GPU-", "MIG-")):
        return pynvml.nvmlDeviceGetHandleByUUID(uuid)
    try:
        return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
    except pynvml.NVMLError:
        return pynvml.nvmlDeviceGetHandleByUUID(f"MIG-{uuid}")


def _nvml_board(pynvml: Any, handle: Any) -> Any:
    """The board of a MIG device handle (the handle itself otherwise, or where this driver or
    pynvml cannot tell): a MIG handle's own NVML index is its slot on the board (what
    nvmlDeviceGetMigDeviceHandleByIndex takes), not the board's index, so a worker on board
    2's first slice named GPU 0 short of memory and placement excluded another GPU."""
    is_mig = getattr(pynvml, "nvmlDeviceIsMigDeviceHandle", None)
    parent = getattr(pynvml, "nvmlDeviceGetDeviceHandleFromMigDeviceHandle", None)
    if is_mig and parent and _nvml_optional(pynvml, is_mig, handle):
        return parent(handle)
    return handle


def _nvml_gpu(pynvml: Any, index: int, errors: dict[str, str] | None) -> GpuInfo:
    """One GPU. Name, UUID and memory are required (without them, or with memory figures
    that are no reading, gpu_memory_problem, the GPU is left out); utilization, NVLink and
    PCIe are optional: None where this GPU or driver lacks them (NotSupported on consumer
    cards, MIG slices, virtual GPUs). A name that is not UTF-8 is UNKNOWN_GPU_NAME (recorded
    in `errors`; without, it raises)."""
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    board = _gpu_name(pynvml.nvmlDeviceGetName(handle), index, errors)
    # With MIG on, what a worker given this GPU can use is one slice, not the board.
    name, memory = _mig_slice(pynvml, handle, board, index, errors) or (
        board, pynvml.nvmlDeviceGetMemoryInfo(handle))
    # (a driver's nonsense, an underflow read as 2**64 - 1 bytes free: the scheduler refuses
    # a report carrying it, and the whole node went silent for this one GPU)
    nonsense = gpu_memory_problem(memory.free, memory.total)
    if nonsense:
        raise GpuUnknown(nonsense)
    utilization = _nvml_optional(pynvml, pynvml.nvmlDeviceGetUtilizationRates, handle)
    return GpuInfo(
        index=index,
        name=name,
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


def _mig_slice(pynvml: Any, handle: Any, board: str, index: int,
              errors: dict[str, str] | None) -> tuple[str, Any] | None:
    """(name, memory info) of the MIG slice standing for a MIG-enabled GPU, or None when MIG
    is off (or this driver or pynvml cannot say). Ray counts and hands out whole GPUs by
    index, and a CUDA process given a MIG-enabled GPU that way runs on one of its slices, not
    the board: the smallest slice is what a worker can count on (never the board's memory,
    which let placement put a worker needing 40 GB on a 10 GB slice). Its name keeps NVML's
    "MIG <profile>" ("NVIDIA A100-SXM4-80GB MIG 1g.10gb"), so it has no family and no MFU.
    MIG on with no slices created: nothing CUDA can run on, zero memory. MIG on with the
    slots uncountable, or a slot failing otherwise than NotFound (no slice there), or the
    mode failing otherwise than NotSupported (no MIG), or a slice's name or memory query
    failing: GpuUnknown (left out, as a lost GPU, the query named: _nvml_or_unknown). They
    read as no slice and as MIG off: a lost slot's 10 GB slice left the board at its 40 GB
    one, a lost mode at the board's 80 GB, and the nvml error said nothing."""
    mode = _nvml_or_unknown(  # (NotSupported: a card without MIG; a lost one: unknown)
        pynvml, "its MIG mode cannot be read", "nvmlDeviceGetMigMode", handle,
        absent=("NOT_SUPPORTED", "FUNCTION_NOT_FOUND")) \
        if hasattr(pynvml, "nvmlDeviceGetMigMode") else None
    if not mode or mode[0] != getattr(pynvml, "NVML_DEVICE_MIG_ENABLE", 1):
        return None
    count = _nvml_or_unknown(  # (failing, it read "no instances", 0 bytes, over the slices)
        pynvml, "MIG is on and its slices cannot be counted",
        "nvmlDeviceGetMaxMigDeviceCount", handle)
    slices = []
    for slot in range(count):
        # (a slice there unread: the smallest left could be larger than a worker's)
        unread = f"MIG is on and its slice in slot {slot} cannot be read"
        mig = _nvml_or_unknown(pynvml, unread, "nvmlDeviceGetMigDeviceHandleByIndex",
                               handle, slot, absent=("NOT_FOUND",))
        if mig is None:
            continue  # no slice in this slot
        slices.append((
            _gpu_name(_nvml_or_unknown(pynvml, unread, "nvmlDeviceGetName", mig), index, errors),
            _nvml_or_unknown(pynvml, unread, "nvmlDeviceGetMemoryInfo", mig)))
    if not slices:
        return f"{board} MIG (no instances)", SimpleNamespace(total=0, free=0, used=0)
    return min(slices, key=lambda s: s[1].total)


# pynvml's codes of the errors _nvml_says tells apart (where a pynvml lacks the constants)
_NVML_ERROR_CODES = {"NOT_SUPPORTED": 3, "NOT_FOUND": 6, "FUNCTION_NOT_FOUND": 13,
                     "GPU_IS_LOST": 15}


def _nvml_says(pynvml: Any, error: Exception, *names: str) -> bool:
    """Whether NVML's `error` is one of `names` (NVML_ERROR_<name>), or carries no code to
    tell (taken as the normal absence the caller expects, as before codes were read)."""
    code = getattr(error, "value", None)
    return code is None or code in {
        getattr(pynvml, f"NVML_ERROR_{name}", _NVML_ERROR_CODES[name]) for name in names}


def _nvml_or_unknown(pynvml: Any, unknown: str, query: str, *args: Any,
                     absent: tuple[str, ...] = ()) -> Any:
    """pynvml's `query` on `args` (a MIG query); None where it fails with one of the `absent`
    codes (_nvml_says: the absence the caller expects, NotFound for an empty slot); any other
    failure raises GpuUnknown: `unknown`, then the query and NVML's error."""
    try:
        return getattr(pynvml, query)(*args)
    except pynvml.NVMLError as e:
        if absent and _nvml_says(pynvml, e, *absent):
            return None
        raise GpuUnknown(f"{unknown} ({query}: {type(e).__name__}: {e})") from e


def _nvml_optional(pynvml: Any, query: Callable[..., Any], *args: Any) -> Any:
    """An NVML query whose absence is normal: None instead of failing the GPU or the probe.
    Not where NVML says the GPU is lost (GPU_IS_LOST): that raises, so the GPU is left out
    and named in the nvml error, as a failing memory query leaves it; it read as a GPU
    without NVLink or a PCIe figure, placed, with no error."""
    try:
        return query(*args)
    except pynvml.NVMLError as e:
        if getattr(e, "value", None) is not None and _nvml_says(pynvml, e, "GPU_IS_LOST"):
            raise
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


# The name of a GPU whose NVML name is not UTF-8: no accelerator family (so no MFU, and no job
# naming a family goes there), the GPU otherwise reported as measured.
UNKNOWN_GPU_NAME = "unknown GPU (NVML name not UTF-8)"


def _gpu_name(value: bytes | str, index: int, errors: dict[str, str] | None) -> str:
    """A GPU's (or MIG slice's) NVML name; UNKNOWN_GPU_NAME, recorded in `errors`, where it
    is not UTF-8 (without `errors` that raises). Its UnicodeDecodeError, not an NVMLError,
    lost every GPU of the node for the heartbeat."""
    try:
        return _text(value)
    except UnicodeDecodeError:
        if errors is None:
            raise
        _nvml_error(errors, f"GPU {index}: name {value!r} is not UTF-8: reported as "
                            f"{UNKNOWN_GPU_NAME!r}, of no accelerator family (no MFU)")
        return UNKNOWN_GPU_NAME


def run_probe(name: str, probe: Callable[[], Any], default: Any,
              errors: dict[str, str]) -> Any:
    """Run one probe; on failure record `name: error` and return `default`."""
    try:
        return probe()
    except Exception as e:  # one probe's failure must not stop the others
        errors[name] = f"{type(e).__name__}: {e}"
        return default


def gpu_count_problem(gpus: tuple[GpuInfo, ...], ray_gpus: float,
                      labels: dict[str, str]) -> str | None:
    """Why the GPUs probed disagree with the GPUs Ray was given on the node, or None. NVML
    sees every GPU of the machine, CUDA_VISIBLE_DEVICES or --num-gpus only some: the node's
    memory and family then count GPUs Ray never hands out (a T4 beside four A100s made an
    A100 node mixed, kept off A100 jobs). Fewer probed than Ray counts: placement hands out
    only those probed (per-GPU memory is theirs), the others sit idle. No GPU probed where Ray
    counts some: the node is placed as a CPU node, which the operator must hear of. Declared
    ones (the node's `labels`) are worded by what declared their count: _declared_problem."""
    if ray_gpus > 0 and not gpus:
        try:
            declared = len(declared_gpus(labels, ray_gpus))
        except ValueError:  # (a malformed label: the declared probe's error names it)
            declared = 0
        if declared:  # (probe_gpus takes them where NVML is absent: it is there, failing)
            return (f"Ray counts {ray_gpus:g} GPU(s) here, and NVML fails on this node (a "
                    "driver/library mismatch, a hung call, or every GPU lost: the nvml probe "
                    f"error says which); the {declared} the node's labels declare do not stand "
                    "in for GPUs NVML cannot reach: placed as a CPU node")
        return (f"Ray counts {ray_gpus:g} GPU(s) here, but NVML found none usable (NVML "
                "library missing or driver not loaded? or every GPU failing, or a hung call: the "
                "nvml probe error names them) and no node label declares any in their stead "
                f"({LABEL_ACCELERATOR_COUNT}=0?): placed as a CPU node")
    if not gpus or len(gpus) == ray_gpus:
        return None
    if gpus[0].source != "nvml":
        return _declared_problem(len(gpus), ray_gpus, LABEL_ACCELERATOR_COUNT in labels)
    seen = f"NVML sees {len(gpus)} GPU(s), Ray was given {ray_gpus:g}"
    if ray_gpus > 0 and len(gpus) > ray_gpus:
        return (f"{seen} (CUDA_VISIBLE_DEVICES or --num-gpus?): the node's GPU memory and "
                "families count GPUs Ray does not hand out")
    if len(gpus) < ray_gpus:
        return (f"{seen} (--num-gpus above the GPUs present, or a GPU lost?): placement hands "
                f"out only {len(gpus)} GPU(s) here")
    return None


def _declared_problem(declared: int, ray_gpus: float, counted: bool) -> str | None:
    """gpu_count_problem for `declared` accelerators, `counted` by the count label or else
    as many as Ray's whole GPUs (declared_gpus): never a count label's value nobody wrote.
    Placement hands out whole GPUs only, so none of them on a node Ray gave less than one."""
    whole = int(ray_gpus)
    if declared == whole:
        return None
    seen = (f"node label {LABEL_ACCELERATOR_COUNT} declares {declared}" if counted else
            f"node label {LABEL_ACCELERATOR_TYPE} declares {declared} accelerator(s) (no "
            f"{LABEL_ACCELERATOR_COUNT} label: Ray's whole GPUs, at least 1, at most "
            f"{MAX_DECLARED_ACCELERATORS})")
    if whole == 0:
        hint = "--num-gpus missing?" if ray_gpus == 0 else "a whole --num-gpus?"
        return (f"{seen}, but Ray was given {ray_gpus:g} GPU(s) here ({hint}): placement "
                "hands out none of them")
    if not counted:  # (fewer than Ray's: only where Ray's count is past the most declared)
        return (f"{seen}, Ray was given {ray_gpus:g} (--num-gpus above the accelerators "
                f"present?): placement hands out only {declared} here")
    relabel = f"set {LABEL_ACCELERATOR_COUNT} to Ray's count, or --num-gpus to the label's"
    if declared > whole:
        return (f"{seen}, Ray was given {ray_gpus:g} ({relabel}): the node's GPU memory and "
                "families count GPUs Ray does not hand out")
    return (f"{seen}, Ray was given {ray_gpus:g} ({relabel}): placement hands out only "
            f"{declared} GPU(s) here")


# How long a report waits for NVML. Under the gap the scheduler allows between a node's reports
# (suspect_after_s, 15 s) less one heartbeat (5 s): a hung call must cost the GPUs, not the node.
NVML_TIMEOUT_S = 8.0


class _Call:
    """One run of a probe on a thread of its own: its value or exception, its own errors."""

    def __init__(self, probe: Callable[[dict[str, str]], Any], now: float) -> None:
        self.started = now
        self.value: Any = None
        self.error: BaseException | None = None
        self.errors: dict[str, str] = {}
        self.done = threading.Event()
        threading.Thread(target=self._run, args=(probe,), name="nvml-probe", daemon=True).start()

    def _run(self, probe: Callable[[dict[str, str]], Any]) -> None:
        try:
            self.value = probe(self.errors)
        except BaseException as e:  # handed to the caller, as if raised there
            self.error = e
        self.done.set()


class BoundedProbe:
    """A probe whose calls may hang (NVML on a GPU fallen off the bus, a wedged driver:
    nvidia-smi hangs alike), run on a thread of its own and waited for at most `timeout_s`
    from its start. Hung, it held the agent's report with it: the node went silent, its
    agent was killed and restarted into the same hang, and its running jobs' reservations
    were set aside as of a dead node. One call at a time: callers arriving while it runs wait
    for that one; one past its deadline is not joined by another (no pile of hung threads)
    and every caller gets TimeoutError until it returns. Only a call still running is
    joined: a finished one is read by those already waiting on it and otherwise dropped,
    for a fresh call. So what a call that overran returns is dropped (read at some point of
    the hang), and so is one that answered in time just as its last waiter gave up: stored,
    it handed the next report a reading one heartbeat old."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._call: _Call | None = None

    def run(self, probe: Callable[[dict[str, str]], Any], timeout_s: float,
            errors: dict[str, str]) -> Any:
        with self._lock:
            call = self._call
            if call is None or call.done.is_set():  # (never join a finished call: stale)
                call = self._call = _Call(probe, time.monotonic())
        call.done.wait(max(call.started + timeout_s - time.monotonic(), 0.0))
        if not call.done.is_set():
            raise TimeoutError(f"NVML has not answered for {time.monotonic() - call.started:.0f} "
                               "s (a GPU fallen off the bus? a hung driver?): no GPU reported "
                               "until it does")
        with self._lock:
            if self._call is call:
                self._call = None  # (answered: the next report reads afresh)
        errors.update(call.errors)
        if call.error is not None:
            raise call.error
        return call.value


_NVML = BoundedProbe()  # one per process: an agent's heartbeat and report_now share its call


def probe_gpus(labels: dict[str, str], errors: dict[str, str],
               ray_gpus: float = 0.0) -> tuple[GpuInfo, ...]:
    """Measured GPUs when NVML sees any; otherwise whatever the node's labels declare (by Ray's
    GPU count, `ray_gpus`, where they declare no count: declared_gpus). Not where NVML counted
    GPUs and every one failed (lost, fallen off the bus), or failed to start (nvmlInit): none
    then, as for the failing ones among others; the nvml probe error says why. The labels
    stood in for them, as many GPUs as declared with all their memory free: a node whose
    every GPU was lost was placed as healthy, while losing all but one left one placeable
    (cluster.yaml's GPU node types carry such labels). NVML is waited for at most
    NVML_TIMEOUT_S (BoundedProbe): hung, it costs the GPUs, with an nvml error, not the
    report."""
    measured = run_probe("nvml", lambda: _NVML.run(probe_nvml, NVML_TIMEOUT_S, errors), (),
                         errors)
    if measured:
        problem = declared_family_problem(measured, labels)
        if problem:
            errors["declared"] = problem
        return measured
    if "nvml" in errors:  # (NVML there but failing: nvmlInit, or every GPU it counts)
        return ()
    return run_probe("declared", lambda: declared_gpus(labels, ray_gpus), (), errors)


def declared_family_problem(measured: tuple[GpuInfo, ...], labels: dict[str, str]) -> str | None:
    """Why the node's accelerator-type label disagrees with the GPUs NVML measured, or None.
    Measured GPUs replace declared ones, so such a label is ignored while the autoscaler
    still adds its node type for jobs of the declared family (cluster.yaml's labels), which
    then never fit there: labels left from another instance type, or cluster.local.yaml's fake
    nodes on a machine whose own GPU NVML reports on every one of them."""
    declared = labels.get(LABEL_ACCELERATOR_TYPE)
    if not declared:
        return None
    families, family = gpu_families(measured), accelerator_family(declared)
    if families == [family]:
        return None
    names = ", ".join(sorted({g.name for g in measured}))
    measured_families = ", ".join(f or "none" for f in families)
    return (f"node label {LABEL_ACCELERATOR_TYPE}={declared!r} (family {family or 'none'}) "
            f"is not what NVML measures here ({len(measured)} x {names}, family "
            f"{measured_families}): the measured GPUs are used and the label ignored (labels "
            "of another instance type? a fake_multinode cluster on a machine with GPUs?)")


# Node-to-node bandwidth. The transfer itself needs Ray (ray_layer/node_agent.py); the arithmetic
# lives here so it is tested without a cluster.
MIB = 1024 ** 2
# Each measurement times two sizes, the larger BANDWIDTH_DEFAULT_BYTES and the smaller
# BANDWIDTH_SIZE_RATIO times less. One size alone measured Ray's per-transfer overhead (tens of
# ms: scheduling the pull, object lookup, connection) more than the link: 8 MiB transfers
# between raylets on one machine gave 0.19-0.35 GB/s, below the 1.25 GB/s assumed for a pair
# never measured, so a measured pair lost bandwidth floors an unmeasured one met.
BANDWIDTH_DEFAULT_BYTES = 64 * MIB
BANDWIDTH_SIZE_RATIO = 8
BANDWIDTH_MAX_BYTES = 256 * MIB  # bounds the object-store memory one measurement can take
# The fit is used only when the larger transfer took clearly longer than the smaller: by this
# share of its own time and by this many seconds. Times closer than that are within timing
# noise of each other (overhead dominating both) and the fit could claim any rate: 8 and 64 MiB
# in 31 and 32 ms fitted 58.7 GB/s for a link whose 64 MiB transfer ran at 2.1. The share also
# bounds the fit: at most 1 / share (4) times the larger transfer's own rate.
BANDWIDTH_MIN_FIT_SHARE = 0.25
BANDWIDTH_MIN_FIT_DIFF_S = 0.003


def bandwidth_probe_bytes(nbytes: int) -> int:
    """The payload size actually sent: at least 1 byte, at most BANDWIDTH_MAX_BYTES, so a
    caller's typo cannot fill a node's object store."""
    return max(1, min(int(nbytes), BANDWIDTH_MAX_BYTES))


def bandwidth_probe_sizes(nbytes: int) -> tuple[int, ...]:
    """The payload sizes one measurement sends, smallest first: `nbytes` (bounded by
    bandwidth_probe_bytes) and BANDWIDTH_SIZE_RATIO times less (one size when that rounds to
    the same)."""
    large = bandwidth_probe_bytes(nbytes)
    return tuple(sorted({max(1, large // BANDWIDTH_SIZE_RATIO), large}))


def _fastest(seconds: Iterable[float | None]) -> float | None:
    """The fastest usable round: failed rounds (None) and non-positive or non-finite times are
    dropped rather than turned into absurd rates."""
    return min((s for s in seconds if s is not None and math.isfinite(s) and s > 0),
               default=None)


def bandwidth_gbps(seconds_by_size: dict[int, Iterable[float | None]]) -> float | None:
    """GB/s (1e9 bytes/s) of a link from the times of its transfers, by payload size in bytes;
    None when no size has a usable time.

    Each size's fastest round, not the mean: the first transfer to a peer pays one-time costs
    (connections, memory mapping) that say nothing about the link. With two sizes, time = a +
    n / B is fitted through their fastest rounds and B reported: the per-transfer overhead a,
    the same for both sizes, is no part of the link's rate. The fit only where the larger
    took clearly longer (BANDWIDTH_MIN_FIT_SHARE of its time, BANDWIDTH_MIN_FIT_DIFF_S), and
    never below the larger transfer's own rate (noise making the smaller look faster per byte
    than the larger: no overhead left to remove). Otherwise, and with one usable size (one
    sent, or the larger's transfers failed or timed out: a link too slow for it), the larger
    usable size's own rate: the overhead counted, it is below the link's, never above (no
    figure would leave the link at the rate assumed for pairs never measured)."""
    usable = sorted((n, t) for n, times in seconds_by_size.items()
                    if n > 0 and (t := _fastest(times)) is not None)
    if not usable:
        return None
    (small, t_small), (large, t_large) = usable[0], usable[-1]
    plain = large / t_large
    longer_by = t_large - t_small
    if small == large or longer_by < max(BANDWIDTH_MIN_FIT_SHARE * t_large,
                                         BANDWIDTH_MIN_FIT_DIFF_S):
        return plain / 1e9  # nothing size-dependent to fit, beyond timing noise
    return max((large - small) / longer_by, plain) / 1e9


# A peer's figure is the median of its last few measurements: one round that met a burst of
# other traffic no longer replaces a steady figure on its own, while two slow rounds in a row
# (a link that really degraded) do.
BANDWIDTH_HISTORY = 3
# A figure is dropped once it is older than one pass over every peer (stalest peers are measured
# first) plus this many periods: an agent whose measurements stopped (Ray unreachable, its
# thread stuck) stops vouching for links it last saw long ago.
BANDWIDTH_STALE_PERIODS = 2

# peer node id -> ((monotonic time measured, GB/s), ...), oldest first, at most BANDWIDTH_HISTORY
BandwidthHistory = dict[str, tuple[tuple[float, float], ...]]


def record_bandwidth(history: BandwidthHistory, measured: dict[str, float], sampled: set[str],
                     alive: set[str], now: float,
                     failed: frozenset[str] | set[str] = frozenset()) -> BandwidthHistory:
    """A node's bandwidth history after one refresh: this round's measurements appended to each
    peer's last ones; peers not sampled this time (clusters larger than max_bandwidth_peers)
    unchanged; nothing for a node that left the cluster. A peer sampled this round one of whose
    transfers failed or timed out (`failed`) keeps only this round's figure, if any (the
    smaller transfer's rate, a lower bound): its old, fast figures would outvote it in the
    median and keep a degraded link looking healthy to placement."""
    updated = {node: samples for node, samples in history.items()
               if node in alive and node not in sampled}
    for node, gbps in measured.items():
        before = () if node in failed else history.get(node, ())
        updated[node] = (before + ((now, gbps),))[-BANDWIDTH_HISTORY:]
    return updated


def current_bandwidth(history: BandwidthHistory, now: float,
                      max_age_s: float) -> dict[str, float]:
    """{peer: GB/s} as reported: the median of each peer's measurements of the last max_age_s;
    a peer with none that recent is left out (no figure rather than an old one)."""
    figures = {}
    for node, samples in history.items():
        recent = [gbps for measured_at, gbps in samples if now - measured_at <= max_age_s]
        if recent:
            figures[node] = statistics.median(recent)
    return figures


def bandwidth_max_age_s(peer_count: int, max_peers: int, period_s: float) -> float:
    """How old a figure may be: the periods one pass over `peer_count` peers takes at
    `max_peers` per period, plus BANDWIDTH_STALE_PERIODS of slack. `period_s` is the longest a
    period can take (the pause between refreshes plus a refresh whose peers all time out);
    without a timer (period 0: refreshes only on request) figures never age out."""
    if period_s <= 0:
        return math.inf
    passes = math.ceil(peer_count / max_peers) if max_peers > 0 else 0
    return (passes + BANDWIDTH_STALE_PERIODS) * period_s


# Each pause between an agent's timed measurements is its period times a factor drawn uniformly
# from [1 - this, 1 + this]: agents started together with one period measured at the same
# moments, several pulling from one node at once, and each under-measured that node's link.
BANDWIDTH_JITTER = 0.2


def bandwidth_pause_s(period_s: float, rng: random.Random) -> float:
    """The pause before an agent's next timed measurement (the first one too): `period_s`
    jittered by BANDWIDTH_JITTER with the agent's own `rng`, so agents drift apart."""
    return period_s * rng.uniform(1 - BANDWIDTH_JITTER, 1 + BANDWIDTH_JITTER)


def peers_to_measure(candidates: Iterable[str], last_tried: dict[str, float], max_peers: int,
                     rng: random.Random) -> list[str]:
    """Up to max_peers of `candidates`, the stalest first: peers never tried, then those tried
    longest ago (by `last_tried`, their last attempt, answered or not: peers that keep failing
    must not crowd out the others), so every peer of a large cluster is reached within
    ceil(peers / max_peers) periods. Ties (all peers, at start) are broken at random so that
    the agents of a large cluster do not all measure the same few nodes first."""
    order = list(candidates)
    rng.shuffle(order)  # sort() is stable: the shuffle decides among equally stale peers
    order.sort(key=lambda node: last_tried.get(node, -math.inf))
    return order[:max(max_peers, 0)]
