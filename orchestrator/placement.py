"""Where a job's workers go: filter nodes, count how many workers each can host, choose.

Pure functions over a ClusterState snapshot. A decision is data (a Placement), and every node
not used is given a reason, so an operator can see why a job went where it went — or why it
could not go anywhere.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from orchestrator.config import JobSpec
from orchestrator.inventory import ClusterState, NodeReport, Reservation


@dataclass(frozen=True)
class Rejection:
    """Why a job cannot be placed now: a summary and a reason per node."""

    job_name: str
    message: str
    node_reasons: dict[str, str] = field(default_factory=dict)


class PlacementError(Exception):
    def __init__(self, rejection: Rejection) -> None:
        super().__init__(rejection.message)
        self.rejection = rejection


@dataclass(frozen=True)
class Placement:
    job_name: str
    worker_nodes: tuple[str, ...]  # node id of each worker, by rank
    cpus_per_worker: float
    gpus_per_worker: int
    node_reasons: dict[str, str] = field(default_factory=dict)  # nodes not chosen -> why
    owner: str = ""  # who holds the reservation (a Ray job id); "" = unknown, never reclaimed

    @property
    def nodes(self) -> list[str]:
        """Distinct nodes used, in rank order."""
        return list(dict.fromkeys(self.worker_nodes))

    def label_selectors(self) -> list[dict[str, str]]:
        """One Ray label selector per worker: pins worker i to worker_nodes[i]."""
        return [{"ray.io/node-id": node_id} for node_id in self.worker_nodes]

    def reservations(self) -> list[Reservation]:
        per_node = Counter(self.worker_nodes)
        return [Reservation(self.job_name, node_id, count * self.cpus_per_worker,
                            count * self.gpus_per_worker, self.owner)
                for node_id, count in per_node.items()]


@dataclass(frozen=True)
class _Candidate:
    node_id: str
    capacity: int  # workers of this job the node can host now
    load: float


def _worker_capacity(spec: JobSpec, report: NodeReport, reserved_cpus: float,
                     reserved_gpus: int) -> tuple[int, str]:
    """How many of the job's workers fit on this node, and a reason when that is zero."""
    free_cpus = report.ray_cpus - reserved_cpus
    by_cpu = math.floor(free_cpus / spec.cpus_per_worker + 1e-9)
    if by_cpu < 1:
        return 0, (f"needs {spec.cpus_per_worker:g} CPU per worker, has {free_cpus:g} free "
                   f"({report.ray_cpus:g} total, {reserved_cpus:g} reserved)")
    if spec.gpus_per_worker == 0:
        return by_cpu, ""
    fitting = [g for g in report.gpus if g.memory_free_gb >= spec.min_gpu_memory_gb]
    # Ray hands out only the GPUs it schedules, minus those reserved. GPUs in use by reserved
    # jobs usually also lack free memory, so they are not subtracted a second time: the
    # smaller of the two counts is what is really free. (Ray, not this scheduler, picks which
    # GPU index a worker gets; the memory check is per node.)
    usable = min(len(fitting), int(report.ray_gpus) - reserved_gpus)
    by_gpu = usable // spec.gpus_per_worker
    if by_gpu < 1:
        if not report.gpus:
            probe_errors = "; ".join(f"{k}: {v}" for k, v in report.probe_errors.items())
            return 0, (f"needs {spec.gpus_per_worker} GPU per worker, node reports no GPUs"
                       + (f" (probe errors: {probe_errors})" if probe_errors else ""))
        if spec.min_gpu_memory_gb and len(fitting) < len(report.gpus):
            most = max(g.memory_free_gb for g in report.gpus)
            return 0, (f"needs {spec.gpus_per_worker} GPU(s) with >= "
                       f"{spec.min_gpu_memory_gb:g} GiB free, {len(fitting)} of "
                       f"{len(report.gpus)} have it (most free: {most:.1f} GiB)")
        return 0, (f"needs {spec.gpus_per_worker} GPU per worker, {max(usable, 0)} free "
                   f"({reserved_gpus} reserved)")
    return min(by_cpu, by_gpu), ""


def _choose(candidates: list[_Candidate], workers: int) -> list[_Candidate]:
    """Fewest nodes, and no big node spent on a small remainder.

    While no single node can take what is left, take the largest (that minimises the node
    count); once one can, take the tightest such node (best fit), least loaded on ties."""
    chosen: list[_Candidate] = []
    remaining = sorted(candidates, key=lambda c: (-c.capacity, c.load, c.node_id))
    left = workers
    while left > 0:
        fits = [c for c in remaining if c.capacity >= left]
        pick = min(fits, key=lambda c: (c.capacity, c.load, c.node_id)) if fits else remaining[0]
        chosen.append(pick)
        remaining.remove(pick)
        left -= pick.capacity
    return chosen


def place(spec: JobSpec, state: ClusterState, now: float, owner: str = "") -> Placement:
    """Place every worker of `spec` on a node, or raise PlacementError saying why not.

    `owner` identifies who will hold the reservation (the driver's Ray job id), so that it can
    be released if that driver dies without releasing it."""
    if spec.name in state.reservations:
        raise PlacementError(Rejection(spec.name, (
            f"job '{spec.name}' already holds a reservation: a job of that name is running "
            "(two launches of the same run?)"), {}))
    reasons: dict[str, str] = {}
    candidates: list[_Candidate] = []
    for node_id, report in sorted(state.reports.items()):
        stale = state.staleness_reason(node_id, now)
        if stale:
            reasons[node_id] = stale
            continue
        capacity, why_not = _worker_capacity(spec, report, *state.reserved_on(node_id))
        if capacity == 0:
            reasons[node_id] = why_not
        else:
            candidates.append(_Candidate(node_id, capacity, report.load_per_cpu))

    available = sum(c.capacity for c in candidates)
    if available < spec.num_workers:
        raise PlacementError(Rejection(
            spec.name, _explain_shortfall(spec, state, available, reasons), reasons))

    worker_nodes: list[str] = []
    for c in _choose(candidates, spec.num_workers):
        worker_nodes += [c.node_id] * min(c.capacity, spec.num_workers - len(worker_nodes))
    for c in candidates:
        if c.node_id not in worker_nodes:
            reasons[c.node_id] = "not needed: the job fits on fewer or better-fitting nodes"
    return Placement(spec.name, tuple(worker_nodes), spec.cpus_per_worker,
                     spec.gpus_per_worker, reasons, owner)


def _explain_shortfall(spec: JobSpec, state: ClusterState, available: int,
                       reasons: dict[str, str]) -> str:
    per_worker = f"{spec.cpus_per_worker:g} CPU"
    if spec.gpus_per_worker:
        per_worker += f" + {spec.gpus_per_worker} GPU"
        if spec.min_gpu_memory_gb:
            per_worker += f" with >= {spec.min_gpu_memory_gb:g} GiB free"
    total_cpus = sum(r.ray_cpus for r in state.reports.values())
    total_gpus = sum(int(r.ray_gpus) for r in state.reports.values())
    lines = [
        f"cannot place job '{spec.name}': it needs {spec.num_workers} worker(s) x ({per_worker}) "
        f"= {spec.total_cpus:g} CPUs, {spec.total_gpus} GPUs; room for {available} worker(s) now "
        f"on {len(state.reports)} known node(s) with {total_cpus:g} CPUs, {total_gpus} GPUs "
        "in total"
    ]
    if not state.reports:
        lines.append("  no node has reported yet (are the node agents running?)")
    for node_id, why in sorted(reasons.items()):
        lines.append(f"  node {node_id[:12]}: {why}")
    return "\n".join(lines)
