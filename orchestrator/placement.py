"""Where a job's workers go: filter nodes, count how many workers each can host, choose.

Pure functions over a ClusterState snapshot. A decision is data (a Placement), and every node
not used can be given a reason, so an operator can see why a job went where it went — or why
it could not go anywhere.

The per-node arithmetic runs on the NodeTable's numpy columns, so it costs a few vector
operations whatever the cluster size; only the handful of chosen nodes are handled in Python.

Choice, in order of importance:
1. fit: healthy, the right accelerator family, enough free CPUs, GPUs and GPU memory;
2. fewest nodes: a job that fits on one node goes to one node;
3. best connected: a multi-node job stays inside one network group (rack, switch) when one
   can hold it, preferring the group with the highest bandwidth, and always meets the
   job's bandwidth floor between every pair of nodes;
4. preferred hardware: for GPU jobs the faster accelerator family (config.ACCELERATOR_SPEED),
   for CPU jobs nodes without GPUs;
5. best fit: the tightest node or group that holds the job, so big nodes stay whole for
   big jobs (no fragmentation);
6. least loaded, as the tie-break.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np

from orchestrator.config import JobSpec
from orchestrator.inventory import ClusterState, NodeReport, Reservation

INTRA_NODE = math.inf  # bottleneck bandwidth of a single-node job: no network crossed
EXPLAIN_LIMIT = 512  # above this many nodes, per-node reasons are given only on request


@dataclass(frozen=True)
class Rejection:
    """Why a job cannot be placed now: a summary and a reason per node."""

    job_name: str
    message: str
    node_reasons: dict[str, str] = field(default_factory=dict)
    # True when the job would fit on the healthy cluster if nothing were reserved: it should
    # wait in the queue rather than fail.
    fits_when_free: bool = False


@dataclass(frozen=True)
class Queued:
    """The job waits for capacity: `reason` says what it is waiting for."""

    job_name: str
    position: int  # 1 = next in line
    reason: str


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
    bottleneck_gbps: float = INTRA_NODE  # slowest link between any two chosen nodes

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


# -- capacity: how many of the job's workers each node can host ------------------------------

def worker_capacity(spec: JobSpec, state: ClusterState, now: float, *,
              ignore_reservations: bool = False) -> np.ndarray:
    """Workers of `spec` each node of the table can host now (0 where it cannot)."""
    t = state.table
    n = len(t)
    reserved_cpus = 0 if ignore_reservations else t.reserved_cpus[:n]
    reserved_gpus = 0 if ignore_reservations else t.reserved_gpus[:n]
    capacity = np.floor((t.cpus[:n] - reserved_cpus) / spec.cpus_per_worker + 1e-9)
    if spec.gpus_per_worker:
        # Free memory is measured, so GPUs busy with reserved jobs look full; with reservations
        # ignored ("would it fit an idle cluster?") their total memory is what counts.
        memory = t.gpu_total_gib if ignore_reservations else t.gpu_free_gib
        fitting = np.count_nonzero(memory[:n] >= spec.min_gpu_memory_gb, axis=1)
        # Ray hands out only the GPUs it schedules, minus those reserved. GPUs busy with a
        # reserved job usually lack free memory too, so they are not subtracted twice: the
        # smaller count is what is really free. (Ray picks the GPU index; memory is per node.)
        usable = np.minimum(fitting, t.gpus[:n] - reserved_gpus)
        capacity = np.minimum(capacity, usable // spec.gpus_per_worker)
        if spec.accelerator_types:
            allowed = [t.families[f.upper()] for f in spec.accelerator_types
                       if f.upper() in t.families]
            capacity = np.where(np.isin(t.family[:n], allowed), capacity, 0)
    usable_node = ~t.dead[:n]
    if not ignore_reservations:  # suspect and overloaded nodes may recover: not for the idle view
        usable_node &= (now - t.last_seen[:n] <= state.suspect_after_s) \
            & (t.load[:n] <= state.max_load_per_cpu)
    # Clip before the integer cast: a tiny per-worker size must not overflow int64.
    return np.where(usable_node, np.clip(capacity, 0, 1_000_000), 0).astype(np.int64)


# -- choosing among nodes that fit --------------------------------------------------------------

def _take(rows: np.ndarray, capacity: np.ndarray, load: np.ndarray, workers: int,
          preference: np.ndarray) -> list[int]:
    """Fewest rows holding `workers`, without spending a big node on a small remainder: while
    no single row can take what is left, take the largest (preferred hardware, then least
    loaded, among equals); then the tightest that can."""
    order = rows[np.lexsort((load[rows], -preference[rows], -capacity[rows]))]
    chosen, left = [], workers
    for i, row in enumerate(order):
        if capacity[row] >= left:
            rest = order[i:]
            fits = rest[capacity[rest] >= left]
            best = fits[np.lexsort((load[fits], capacity[fits]))[0]]  # tightest, least loaded
            return chosen + [int(best)]
        chosen.append(int(row))
        left -= int(capacity[row])
    return chosen  # only reached if the rows cannot hold the job (callers check first)


def _bottleneck(state: ClusterState, node_ids: list[str]) -> float:
    if len(node_ids) < 2:
        return INTRA_NODE
    return min(state.pair_bandwidth_gbps(a, b) for a, b in combinations(node_ids, 2))


def _group_options(state: ClusterState, workers: int, capacity: np.ndarray,
                   candidates: np.ndarray, preference: np.ndarray, max_groups: int = 8):
    """Network groups that can hold the whole job, best first: highest declared bandwidth,
    then preferred hardware, then tightest total capacity (best fit), then least load."""
    t = state.table
    groups = t.group[candidates]
    totals = np.bincount(groups, weights=capacity[candidates])
    ok = np.flatnonzero(totals >= workers)
    if len(ok) == 0:
        return []
    gbps = np.zeros(len(totals))
    np.maximum.at(gbps, groups, t.group_gbps[candidates])
    counts = np.maximum(np.bincount(groups), 1)
    load = np.bincount(groups, weights=t.load[candidates]) / counts
    preferred = np.bincount(groups, weights=preference[candidates]) / counts
    ranked = ok[np.lexsort((load[ok], totals[ok], -preferred[ok], -gbps[ok]))][:max_groups]
    return [candidates[groups == g] for g in ranked]


def _choose(spec: JobSpec, state: ClusterState, capacity: np.ndarray
            ) -> tuple[list[int], float] | None:
    """Rows to use and their bottleneck bandwidth, or None if the bandwidth floor cannot be met."""
    t = state.table
    n = len(t)
    # GPU jobs prefer faster accelerators; CPU jobs prefer nodes without GPUs, leaving GPU
    # nodes' CPUs to the GPU jobs that need them.
    preference = t.speed[:n] if spec.gpus_per_worker else -(t.gpus[:n] > 0).astype(float)
    candidates = np.flatnonzero(capacity > 0)
    single = candidates[capacity[candidates] >= spec.num_workers]
    if len(single):
        fastest = single[preference[single] == preference[single].max()]
        tightest = fastest[capacity[fastest] == capacity[fastest].min()]
        return [int(tightest[np.argmin(t.load[tightest])])], INTRA_NODE
    # Multi-node: inside one network group when one can hold it (best connected first)...
    for rows in _group_options(state, spec.num_workers, capacity, candidates, preference):
        chosen = _take(rows, capacity, t.load, spec.num_workers, preference)
        bottleneck = _bottleneck(state, [t.ids[r] for r in chosen])
        if bottleneck >= spec.min_bandwidth_gbps:
            return chosen, bottleneck
    # ...else across groups: fewest nodes overall.
    chosen = _take(candidates, capacity, t.load, spec.num_workers, preference)
    bottleneck = _bottleneck(state, [t.ids[r] for r in chosen])
    return (chosen, bottleneck) if bottleneck >= spec.min_bandwidth_gbps else None


# -- the entry point ------------------------------------------------------------------------------

def place(spec: JobSpec, state: ClusterState, now: float, owner: str = "",
          explain: bool | None = None) -> Placement:
    """Place every worker of `spec` on a node, or raise PlacementError saying why not.

    `owner` identifies who will hold the reservation (the driver's Ray job id), so that it can
    be released if that driver dies without releasing it. `explain` gives every node not used
    a reason (default: on for clusters up to EXPLAIN_LIMIT nodes; rejections always explain)."""
    if spec.name in state.reservations:
        raise PlacementError(Rejection(spec.name, (
            f"job '{spec.name}' already holds a reservation: a job of that name is running "
            "(two launches of the same run?)")))
    if explain is None:
        explain = len(state.table) <= EXPLAIN_LIMIT
    capacity = worker_capacity(spec, state, now)
    if capacity.sum() < spec.num_workers:
        raise PlacementError(_rejection(spec, state, now, capacity, explain))
    choice = _choose(spec, state, capacity)
    if choice is None:
        raise PlacementError(_rejection(spec, state, now, capacity, explain,
                                        bandwidth_failed=True))
    rows, bottleneck = choice
    t = state.table
    worker_nodes: list[str] = []
    for row in rows:
        worker_nodes += [t.ids[row]] * min(int(capacity[row]), spec.num_workers - len(worker_nodes))
    reasons = _node_reasons(spec, state, now, capacity, set(worker_nodes)) if explain else {}
    return Placement(spec.name, tuple(worker_nodes), spec.cpus_per_worker,
                     spec.gpus_per_worker, reasons, owner, bottleneck)


# -- explanations -------------------------------------------------------------------------------

def _node_reason(spec: JobSpec, state: ClusterState, report: NodeReport, now: float) -> str:
    """Why this node can host none of the job's workers."""
    unhealthy = state.health_reason(report.node_id, now)
    if unhealthy:
        return unhealthy
    if report.load_per_cpu > state.max_load_per_cpu:
        return (f"overloaded: load {report.load_per_cpu:.2f} per CPU > "
                f"{state.max_load_per_cpu:g}")
    reserved_cpus, reserved_gpus = state.reserved_on(report.node_id)
    free_cpus = report.ray_cpus - reserved_cpus
    if free_cpus < spec.cpus_per_worker:
        return (f"needs {spec.cpus_per_worker:g} CPU per worker, has {free_cpus:g} free "
                f"({report.ray_cpus:g} total, {reserved_cpus:g} reserved)")
    if not report.gpus:
        probe_errors = "; ".join(f"{k}: {v}" for k, v in report.probe_errors.items())
        return (f"needs {spec.gpus_per_worker} GPU per worker, node reports no GPUs"
                + (f" (probe errors: {probe_errors})" if probe_errors else ""))
    if spec.accelerator_types:
        from orchestrator.inventory import accelerator_family

        family = accelerator_family(report.gpus[0].name)
        if family not in {f.upper() for f in spec.accelerator_types}:
            return (f"accelerator {report.gpus[0].name} ({family or 'unknown family'}) is not "
                    f"one of {', '.join(spec.accelerator_types)}")
    fitting = [g for g in report.gpus if g.memory_free_gb >= spec.min_gpu_memory_gb]
    if spec.min_gpu_memory_gb and len(fitting) < spec.gpus_per_worker:
        most = max(g.memory_free_gb for g in report.gpus)
        return (f"needs {spec.gpus_per_worker} GPU(s) with >= {spec.min_gpu_memory_gb:g} GiB "
                f"free, {len(fitting)} of {len(report.gpus)} have it (most free: {most:.1f} GiB)")
    usable = min(len(fitting), int(report.ray_gpus) - reserved_gpus)
    return (f"needs {spec.gpus_per_worker} GPU per worker, {max(usable, 0)} free "
            f"({reserved_gpus} reserved)")


def _node_reasons(spec: JobSpec, state: ClusterState, now: float, capacity: np.ndarray,
                  used: set[str], limit: int | None = None) -> dict[str, str]:
    reasons = {}
    for row, node_id in enumerate(state.table.ids[:limit]):
        if node_id in used:
            continue
        if capacity[row] > 0 and not used:  # a rejection: the node was not the problem
            reasons[node_id] = f"has room for {capacity[row]} worker(s)"
        elif capacity[row] > 0:
            reasons[node_id] = "not needed: the job fits on fewer or better-fitting nodes"
        else:
            reasons[node_id] = _node_reason(spec, state, state.reports[node_id], now)
    return reasons


def _rejection(spec: JobSpec, state: ClusterState, now: float, capacity: np.ndarray,
               explain: bool, bandwidth_failed: bool = False) -> Rejection:
    available = int(capacity.sum())
    idle = worker_capacity(spec, state, now, ignore_reservations=True)
    fits_when_free = int(idle.sum()) >= spec.num_workers and _choose(spec, state, idle) is not None
    per_worker = f"{spec.cpus_per_worker:g} CPU"
    if spec.gpus_per_worker:
        per_worker += f" + {spec.gpus_per_worker} GPU"
        if spec.min_gpu_memory_gb:
            per_worker += f" with >= {spec.min_gpu_memory_gb:g} GiB free"
        if spec.accelerator_types:
            per_worker += f" of type {'/'.join(spec.accelerator_types)}"
    healthy = [r for n, r in state.reports.items() if state.health(n, now) == "healthy"]
    total_cpus = sum(r.ray_cpus for r in healthy)
    total_gpus = sum(int(r.ray_gpus) for r in healthy)
    if bandwidth_failed:
        headline = (f"cannot place job '{spec.name}': {available} worker slot(s) are free, but no "
                    f"set of nodes holding {spec.num_workers} worker(s) has >= "
                    f"{spec.min_bandwidth_gbps:g} GB/s between every pair")
    else:
        headline = (f"cannot place job '{spec.name}': it needs {spec.num_workers} worker(s) x "
                    f"({per_worker}) = {spec.total_cpus:g} CPUs, {spec.total_gpus} GPUs; room "
                    f"for {available} worker(s) now on {len(healthy)} healthy node(s) with "
                    f"{total_cpus:g} CPUs, {total_gpus} GPUs in total")
    if fits_when_free and not bandwidth_failed:
        headline += "; it fits once running jobs release their reservations"
    lines = [headline]
    if not state.reports:
        lines.append("  no node has reported yet (are the node agents running?)")
    # Reasons cost a Python step per node: on big clusters, unless asked, the first nodes only.
    limit = None if explain else EXPLAIN_LIMIT
    reasons = _node_reasons(spec, state, now, capacity, used=set(), limit=limit)
    for node_id, why in sorted(reasons.items()):
        lines.append(f"  node {node_id[:12]}: {why}")
    if len(state.table) > len(reasons):
        lines.append(f"  ... and {len(state.table) - len(reasons)} more node(s) not shown")
    return Rejection(spec.name, "\n".join(lines), reasons, fits_when_free)
