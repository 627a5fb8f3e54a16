"""What is known about the cluster: per-node reports from the agents, and what jobs hold.

Pure data and bookkeeping: no Ray here. Time is always passed in (`now`), so heartbeat
expiry is tested by stepping a number rather than sleeping.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

GIB = 1024 ** 3


@dataclass(frozen=True)
class GpuInfo:
    """One accelerator. `source` says whether it was measured (NVML) or declared by the operator."""

    index: int
    name: str
    memory_total_bytes: int
    memory_free_bytes: int
    utilization_pct: float | None = None
    uuid: str = ""
    source: str = "nvml"  # "nvml" = measured; "declared" = from node labels / config
    memory_used_bytes: int | None = None
    nvlink_links: int | None = None  # active NVLink links; None where NVML does not expose it
    pcie_gen: int | None = None  # current PCIe link generation
    pcie_width: int | None = None  # current PCIe link width (lanes)

    @property
    def memory_free_gb(self) -> float:
        return self.memory_free_bytes / GIB


@dataclass(frozen=True)
class NodeReport:
    """One heartbeat from a node agent."""

    node_id: str
    hostname: str
    ray_cpus: float  # logical CPUs Ray schedules on this node (what placement may hand out)
    ray_gpus: float  # logical GPUs Ray schedules on this node
    cpu_count: int  # CPUs the OS sees
    load_avg_1m: float
    ram_total_bytes: int
    ram_available_bytes: int
    gpus: tuple[GpuInfo, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    probe_errors: dict[str, str] = field(default_factory=dict)  # probe name -> what went wrong
    # Measured node-to-node throughput from this node to each peer it probed, GB/s.
    bandwidth_gbps: dict[str, float] = field(default_factory=dict)

    @property
    def load_per_cpu(self) -> float:
        return self.load_avg_1m / max(self.cpu_count, 1)


@dataclass(frozen=True)
class Reservation:
    """Resources one job holds on one node."""

    job_name: str
    node_id: str
    cpus: float
    gpus: int
    owner: str = ""  # the Ray job id of the driver holding it; "" = unknown


class ClusterState:
    """Latest report per node, when it was received, and the reservations of placed jobs."""

    def __init__(self, stale_after_s: float = 30.0) -> None:
        self.stale_after_s = stale_after_s
        self.reports: dict[str, NodeReport] = {}
        self.last_seen: dict[str, float] = {}
        self.reservations: dict[str, tuple[Reservation, ...]] = {}

    def update(self, report: NodeReport, now: float) -> None:
        self.reports[report.node_id] = report
        self.last_seen[report.node_id] = now

    def remove_node(self, node_id: str) -> None:
        self.reports.pop(node_id, None)
        self.last_seen.pop(node_id, None)

    def staleness_reason(self, node_id: str, now: float) -> str | None:
        """Why this node's report cannot be trusted now, or None if it is fresh."""
        age = now - self.last_seen.get(node_id, float("-inf"))
        if age > self.stale_after_s:
            return f"no heartbeat for {age:.0f}s (limit {self.stale_after_s:.0f}s)"
        return None

    def reserved_on(self, node_id: str) -> tuple[float, int]:
        """(CPUs, GPUs) reserved on a node by all placed jobs."""
        held = [r for rs in self.reservations.values() for r in rs if r.node_id == node_id]
        return sum(r.cpus for r in held), sum(r.gpus for r in held)

    def reserve(self, job_name: str, reservations: Iterable[Reservation]) -> None:
        if job_name in self.reservations:
            raise ValueError(f"job '{job_name}' already holds a reservation; release it first")
        self.reservations[job_name] = tuple(reservations)

    def release(self, job_name: str) -> bool:
        return self.reservations.pop(job_name, None) is not None

    def release_orphans(self, dead_owners: set[str]) -> list[str]:
        """Release reservations whose owner (a driver) is known to be dead: a driver killed
        before its `finally` ran must not hold resources forever. Returns the jobs released."""
        orphaned = [job for job, held in self.reservations.items()
                    if any(r.owner and r.owner in dead_owners for r in held)]
        for job in orphaned:
            del self.reservations[job]
        return orphaned


# Node labels an operator sets (`ray start --labels=...`, or `labels=` in
# ray.cluster_utils.Cluster) to declare accelerators NVML cannot see: NPUs, or simulated GPUs
# when modelling a heterogeneous cluster on a laptop.
LABEL_ACCELERATOR_TYPE = "orchestrator.io/accelerator-type"
LABEL_ACCELERATOR_COUNT = "orchestrator.io/accelerator-count"
LABEL_ACCELERATOR_MEMORY_GB = "orchestrator.io/accelerator-memory-gb"
MAX_DECLARED_ACCELERATORS = 64  # more than any real node has: a typo, not a machine


def declared_gpus(labels: dict[str, str]) -> tuple[GpuInfo, ...]:
    """Accelerators declared by node labels, marked source="declared".

    Raises ValueError naming the label when a value is malformed."""
    name = labels.get(LABEL_ACCELERATOR_TYPE)
    if not name:
        return ()
    try:
        count = int(labels.get(LABEL_ACCELERATOR_COUNT, "1"))
        memory_gb = float(labels.get(LABEL_ACCELERATOR_MEMORY_GB, "0"))
    except ValueError as e:
        raise ValueError(f"node label {LABEL_ACCELERATOR_COUNT} or "
                         f"{LABEL_ACCELERATOR_MEMORY_GB} is not a number: {e}") from None
    if not 0 <= count <= MAX_DECLARED_ACCELERATORS:
        raise ValueError(f"node label {LABEL_ACCELERATOR_COUNT}={count}: must be between 0 and "
                         f"{MAX_DECLARED_ACCELERATORS}")
    if not (math.isfinite(memory_gb) and 0 <= memory_gb <= 100_000):
        raise ValueError(f"node label {LABEL_ACCELERATOR_MEMORY_GB}={memory_gb}: must be a "
                         "finite number of GiB >= 0")
    memory = int(memory_gb * GIB)
    return tuple(GpuInfo(index=i, name=name, memory_total_bytes=memory,
                         memory_free_bytes=memory, source="declared") for i in range(count))
