"""Where a job's workers go: filter nodes, count how many workers each can host, choose.

Pure functions over a ClusterState snapshot. A decision is data (a Placement), and every node
not used can be given a reason, so an operator can see why a job went where it went — or why
it could not go anywhere.

The per-node arithmetic runs on the NodeTable's numpy columns, so it costs a few vector
operations whatever the cluster size; only the handful of chosen nodes (and their links) are
handled in Python.

Choice, in order of importance:
1. fit: healthy, the right accelerator family, enough free CPUs, GPUs and GPU memory (each GPU
   must have the job's free memory itself; GPUs a job was told to avoid do not count);
2. fewest nodes: a job that fits on one node goes to one node (no network crossed);
3. best connected: a multi-node job goes to the node set with the highest bottleneck bandwidth
   (slowest link between any two of its nodes) that the search finds, and never below the
   job's bandwidth floor. Links are what NodeTable.known_links knows — a network group's
   declared bandwidth, else what the agents measured — and inter_group_gbps for the rest.
   The search (_choose) grows a set from each of a bounded number of seed nodes, each step
   adding the node whose slowest link to the set is fastest (a maximin, Prim-like growth),
   most promising seeds first, stopping when no seed left can beat the best set found;
4. fewest nodes again: among sets as well connected, the fewest nodes (the winner's region is
   grown once more taking the largest nodes that keep its bandwidth);
5. preferred hardware: for GPU jobs the faster accelerator family (config.ACCELERATOR_SPEED),
   for CPU jobs nodes without GPUs;
6. best fit: the tightest node (or, for the last node of a set, the tightest that holds the
   rest), so big nodes stay whole for big jobs (no fragmentation);
7. least loaded, as the tie-break.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from orchestrator.config import JobSpec
from orchestrator.inventory import ClusterState, NodeReport, Reservation

INTRA_NODE = math.inf  # bottleneck bandwidth of a single-node job: no network crossed
EXPLAIN_LIMIT = 512  # above this many nodes, per-node reasons are given only on request
# Seeds of the multi-node search: the best node of each of the best few declared network
# groups that can hold the job, the largest node, and this many nodes spread evenly over the
# table (so measured-only clusters, with no groups declared, are searched across all racks).
# The search's cost grows with the seeds actually grown, not with the cluster.
MAX_GROUP_SEEDS = 8
SEED_SAMPLE = 24

GpuSlots = frozenset  # of (node id, GPU index) pairs


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
                    ignore_reservations: bool = False,
                    excluded_gpus: GpuSlots = frozenset()) -> np.ndarray:
    """Workers of `spec` each node of the table can host now (0 where it cannot).

    `excluded_gpus`: (node id, GPU index) pairs that do not count for this job — e.g. a GPU
    that a worker, once started, found without the free memory the table said it had."""
    t = state.table
    n = len(t)
    reserved_cpus = 0 if ignore_reservations else t.reserved_cpus[:n]
    reserved_gpus = 0 if ignore_reservations else t.reserved_gpus[:n]
    capacity = np.floor((t.cpus[:n] - reserved_cpus) / spec.cpus_per_worker + 1e-9)
    if spec.gpus_per_worker:
        # Free memory is measured, so GPUs busy with reserved jobs look full; with reservations
        # ignored ("would it fit an idle cluster?") their total memory is what counts.
        memory = t.gpu_total_gib if ignore_reservations else t.gpu_free_gib
        fits = memory[:n] >= spec.min_gpu_memory_gb  # per GPU: a worker's GPU is one GPU
        fitting = np.count_nonzero(fits, axis=1)
        if excluded_gpus:
            rows, slots = _excluded_slots(state, excluded_gpus)
            np.subtract.at(fitting, rows, fits[rows, slots])  # only those that counted
        # Ray hands out only the GPUs it schedules, minus those reserved. GPUs busy with a
        # reserved job usually lack free memory too, so they are not subtracted twice: the
        # smaller count is what is really free. (Ray picks the GPU index.)
        usable = np.minimum(fitting, t.gpus[:n] - reserved_gpus)
        capacity = np.minimum(capacity, usable // spec.gpus_per_worker)
        if spec.accelerator_types:
            allowed = [t.families[f.upper()] for f in spec.accelerator_types
                       if f.upper() in t.families]
            capacity = np.where(np.isin(t.family[:n], allowed), capacity, 0)
    # Suspect and overloaded nodes may recover: they count for the idle view, not for now.
    usable_node = ~t.dead[:n] if ignore_reservations else state.placeable(now)
    # Clip before the integer cast: a tiny per-worker size must not overflow int64.
    return np.where(usable_node, np.clip(capacity, 0, 1_000_000), 0).astype(np.int64)


def _excluded_slots(state: ClusterState, excluded_gpus: GpuSlots
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(table rows, GPU columns) of the excluded GPUs that the table knows. A GPU's column is
    its position in its node's report, which need not be its index."""
    rows, slots = [], []
    for node_id, gpu_index in excluded_gpus:
        report = state.reports.get(node_id)
        if report is None or node_id not in state.table.index:
            continue
        for slot, gpu in enumerate(report.gpus):
            if gpu.index == gpu_index:
                rows.append(state.table.index[node_id])
                slots.append(slot)
    return np.array(rows, dtype=np.int64), np.array(slots, dtype=np.int64)


# -- bandwidth --------------------------------------------------------------------------------

def bottleneck_gbps(state: ClusterState, node_ids: list[str]) -> float:
    """Slowest link between any two distinct nodes of `node_ids` (INTRA_NODE for one node)."""
    t = state.table
    rows = np.array([t.index[n] for n in dict.fromkeys(node_ids)], dtype=np.int64)
    if len(rows) < 2:
        return INTRA_NODE
    if t.measuring.isdisjoint(rows.tolist()):
        # Nothing measured between them (the simulator's case, ~80k jobs a replay): every
        # link is declared or inter-group, one matrix for all pairs.
        declared = t.declared_gbps(rows[:, None], rows[None, :])
        links = np.where(declared > 0, declared, state.inter_group_gbps)
        np.fill_diagonal(links, INTRA_NODE)
        return float(links.min())
    return min(float(state.links_gbps(int(r), rows[i + 1:]).min())
               for i, r in enumerate(rows[:-1]))


# -- choosing among nodes that fit ------------------------------------------------------------

@dataclass
class NodeSet:
    """Rows chosen for a job, in the order they were added, and their slowest link."""

    rows: list[int]
    bottleneck: float


@dataclass
class Choice:
    """The node set chosen, and how much was searched to find it (for a rejection's message)."""

    rows: list[int]
    bottleneck: float
    seeds_considered: int = 0
    sets_grown: int = 0  # growths from a seed run to the end (those that could not win stop early)


class _Search:
    """One multi-node job's search for its node set: what every growth from a seed shares."""

    def __init__(self, state: ClusterState, capacity: np.ndarray, workers: int,
                 preference: np.ndarray) -> None:
        self.state = state
        self.capacity = capacity
        self.workers = workers
        self.preference = preference
        self.load = state.table.load[:len(capacity)]
        self.inter = state.inter_group_gbps
        self.candidates = np.flatnonzero(capacity > 0)
        self.sets_grown = 0

    def take(self, rows: np.ndarray, left: int) -> int:
        """The next node among `rows` for `left` workers still to place: the tightest that
        holds them all (least loaded, then preferred hardware, among equals); when none can,
        the largest (preferred hardware, then least loaded) — a big node is not spent on a
        small remainder, and a set needs as few nodes as the sizes allow."""
        capacity = self.capacity[rows]
        fits = capacity >= left
        if fits.any():
            rows, capacity = rows[fits], capacity[fits]
            rows = rows[capacity == capacity.min()]
            load = self.load[rows]
            rows = rows[load == load.min()]
            return int(rows[np.argmax(self.preference[rows])])
        rows = rows[capacity == capacity.max()]
        preference = self.preference[rows]
        rows = rows[preference == preference.max()]
        return int(rows[np.argmin(self.load[rows])])

    # -- seeds
    def seeds(self, group_seeds: list[int]) -> list[tuple[float, int]]:
        """(reach, row) of each seed, most promising first: highest reach, then the order
        given (declared groups best first, the largest node, then the table sample)."""
        sample = self.candidates[np.unique(np.linspace(0, len(self.candidates) - 1,
                                                       SEED_SAMPLE).astype(np.int64))]
        rows = dict.fromkeys([*group_seeds, self.take(self.candidates, self.workers),
                              *sample.tolist()])
        ranked = [(self.reach(row), i, row) for i, row in enumerate(rows)]
        return [(reach, row) for reach, _, row in sorted(ranked, key=lambda x: (-x[0], x[1]))]

    def reach(self, seed: int) -> float:
        """An upper bound on the bottleneck of any set holding the job grown from `seed`: the
        fastest link speed at which the seed's links alone reach enough capacity, or
        inter_group_gbps where they do not (nodes without a known link are that far)."""
        peers, gbps = self.state.table.known_links(seed)
        capacity = self.capacity[peers]
        order = np.argsort(-gbps, kind="stable")
        covered = np.cumsum(capacity[order])
        at = int(np.searchsorted(covered, self.workers - self.capacity[seed]))
        return max(float(gbps[order][at]) if at < len(order) else -math.inf, self.inter)

    # -- growth
    def grow(self, seed: int, *, beat: float = -math.inf,
             floor: float | None = None) -> NodeSet | None:
        """A node set holding the job, grown from `seed`.

        Without `floor` (maximin): each step adds the node whose slowest link to the set is
        fastest, `take` deciding among equals. With `floor`: each step adds by `take` among
        the nodes whose links to the set are all >= floor (fewest nodes at that bandwidth).
        None once the set's bottleneck would fall to `beat` or below (it cannot beat the best
        set found), or when no node may be added."""
        chosen, left, worst = [seed], self.workers - int(self.capacity[seed]), INTRA_NODE
        # Nodes with a known link to a chosen node: their slowest such link, and how many
        # chosen nodes they have one with (to the others they are inter_group_gbps away).
        slowest: dict[int, float] = {}
        linked: dict[int, int] = {}
        self._link(seed, chosen, slowest, linked)
        while left > 0:
            row, gbps = self._next(chosen, slowest, linked, left, floor)
            if row is None or gbps <= beat:
                return None
            chosen.append(row)
            slowest.pop(row, None)
            linked.pop(row, None)
            left -= int(self.capacity[row])
            worst = min(worst, gbps)
            self._link(row, chosen, slowest, linked)
        self.sets_grown += 1
        return NodeSet(chosen, worst)

    def _link(self, row: int, chosen: list[int], slowest: dict[int, float],
              linked: dict[int, int]) -> None:
        peers, gbps = self.state.table.known_links(row)
        usable = self.capacity[peers] > 0
        for peer, value in zip(peers[usable].tolist(), gbps[usable].tolist()):
            if peer in chosen:
                continue
            slowest[peer] = min(value, slowest.get(peer, math.inf))
            linked[peer] = linked.get(peer, 0) + 1

    def _next(self, chosen: list[int], slowest: dict[int, float], linked: dict[int, int],
              left: int, floor: float | None) -> tuple[int | None, float]:
        """The node to add next, and its slowest link to the chosen set."""
        n = len(chosen)
        to_set = {row: (gbps if linked[row] == n else min(gbps, self.inter))
                  for row, gbps in slowest.items()}
        # Nodes with no known link to any chosen node are inter_group_gbps from all of them.
        unlinked = len(self.candidates) > len(slowest) + n
        if floor is None:  # maximin: the fastest, take() among equals
            best = max(to_set.values(), default=-math.inf)
            if unlinked and self.inter >= best:
                best = self.inter
            eligible = [row for row, gbps in to_set.items() if gbps == best]
            with_unlinked = unlinked and self.inter == best
        else:
            eligible = [row for row, gbps in to_set.items() if gbps >= floor]
            with_unlinked = unlinked and self.inter >= floor
        rows = np.array(eligible, dtype=np.int64)
        if with_unlinked:
            rows = np.concatenate([rows, self._unlinked(chosen, slowest)])
        if len(rows) == 0:
            return None, -math.inf
        row = self.take(rows, left)
        return row, to_set.get(row, self.inter)

    def _unlinked(self, chosen: list[int], slowest: dict[int, float]) -> np.ndarray:
        free = np.zeros(len(self.capacity), dtype=bool)
        free[self.candidates] = True
        free[chosen] = False
        free[list(slowest)] = False
        return np.flatnonzero(free)

    def rank(self, node_set: NodeSet) -> tuple:
        """Sort key of a node set, best first: bandwidth, fewest nodes, preferred hardware,
        tightest fit, least load."""
        rows = node_set.rows
        return (-node_set.bottleneck, len(rows), -float(self.preference[rows].mean()),
                int(self.capacity[rows].sum()), float(self.load[rows].sum()))


def _group_seeds(search: _Search, state: ClusterState) -> list[int]:
    """The largest node of each of the best declared network groups that can hold the job,
    best group first: highest declared bandwidth, then preferred hardware, then tightest
    total capacity (best fit), then least load."""
    t = state.table
    candidates = search.candidates
    if not (t.group_gbps[candidates] > 0).any():
        return []  # no bandwidth declared: groups say nothing about links
    capacity, preference = search.capacity, search.preference
    groups = t.group[candidates]
    totals = np.bincount(groups, weights=capacity[candidates])
    ok = np.flatnonzero(totals >= search.workers)
    if len(ok) == 0:
        return []
    gbps = np.zeros(len(totals))
    np.maximum.at(gbps, groups, t.group_gbps[candidates])
    counts = np.maximum(np.bincount(groups), 1)
    load = np.bincount(groups, weights=t.load[candidates]) / counts
    preferred = np.bincount(groups, weights=preference[candidates]) / counts
    ranked = ok[np.lexsort((load[ok], totals[ok], -preferred[ok], -gbps[ok]))][:MAX_GROUP_SEEDS]
    return [search.take(candidates[groups == g], search.workers) for g in ranked]


def _choose(spec: JobSpec, state: ClusterState, capacity: np.ndarray) -> Choice:
    """The rows to use and their bottleneck bandwidth (which may be below the job's floor:
    the caller decides). `capacity` must cover the job."""
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
        return Choice([int(tightest[np.argmin(t.load[tightest])])], INTRA_NODE)
    search = _Search(state, capacity, spec.num_workers, preference)
    seeds = search.seeds(_group_seeds(search, state))
    best: NodeSet | None = None
    for reach, seed in seeds:
        if best is not None and reach <= best.bottleneck:
            break  # sorted by reach: no seed left can beat the best set
        grown = search.grow(seed, beat=best.bottleneck if best else -math.inf)
        best = grown or best
    assert best is not None  # the first seed always grows: capacity covers the job
    if len(best.rows) > 2:  # the same bandwidth on fewer nodes?
        fewer = search.grow(best.rows[0], floor=best.bottleneck)
        if fewer is not None and search.rank(fewer) < search.rank(best):
            best = fewer
    return Choice(best.rows, best.bottleneck, len(seeds), search.sets_grown)


# -- the entry point ------------------------------------------------------------------------------

def place(spec: JobSpec, state: ClusterState, now: float, owner: str = "",
          explain: bool | None = None, excluded_gpus: GpuSlots = frozenset()) -> Placement:
    """Place every worker of `spec` on a node, or raise PlacementError saying why not.

    `owner` identifies who will hold the reservation (the driver's Ray job id), so that it can
    be released if that driver dies without releasing it. `explain` gives every node not used
    a reason (default: on for clusters up to EXPLAIN_LIMIT nodes; rejections always explain).
    `excluded_gpus`: (node id, GPU index) pairs this job must not count on (see
    worker_capacity)."""
    if spec.name in state.reservations:
        raise PlacementError(Rejection(spec.name, (
            f"job '{spec.name}' already holds a reservation: a job of that name is running "
            "(two launches of the same run?)")))
    if explain is None:
        explain = len(state.table) <= EXPLAIN_LIMIT
    capacity = worker_capacity(spec, state, now, excluded_gpus=excluded_gpus)
    if capacity.sum() < spec.num_workers:
        raise PlacementError(_rejection(spec, state, now, capacity, explain, excluded_gpus))
    choice = _choose(spec, state, capacity)
    if choice.bottleneck < spec.min_bandwidth_gbps:
        raise PlacementError(_rejection(spec, state, now, capacity, explain, excluded_gpus,
                                        too_slow=choice))
    t = state.table
    worker_nodes: list[str] = []
    for row in choice.rows:  # every node but the last is filled (see _Search.grow)
        worker_nodes += [t.ids[row]] * min(int(capacity[row]), spec.num_workers - len(worker_nodes))
    reasons = _node_reasons(spec, state, now, capacity, set(worker_nodes),
                            excluded_gpus=excluded_gpus) if explain else {}
    return Placement(spec.name, tuple(worker_nodes), spec.cpus_per_worker,
                     spec.gpus_per_worker, reasons, owner, choice.bottleneck)


# -- explanations -------------------------------------------------------------------------------

def _node_reason(spec: JobSpec, state: ClusterState, report: NodeReport, now: float,
                 excluded_gpus: GpuSlots = frozenset()) -> str:
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
    excluded = sum((report.node_id, g.index) in excluded_gpus for g in report.gpus)
    not_for_this_job = f", {excluded} excluded for this job" if excluded else ""
    fitting = [g for g in report.gpus if g.memory_free_gb >= spec.min_gpu_memory_gb
               and (report.node_id, g.index) not in excluded_gpus]
    if spec.min_gpu_memory_gb and len(fitting) < spec.gpus_per_worker:
        most = max(g.memory_free_gb for g in report.gpus)
        return (f"needs {spec.gpus_per_worker} GPU(s) with >= {spec.min_gpu_memory_gb:g} GiB "
                f"free, {len(fitting)} of {len(report.gpus)} have it (most free: {most:.1f} GiB"
                f"{not_for_this_job})")
    usable = min(len(fitting), int(report.ray_gpus) - reserved_gpus)
    return (f"needs {spec.gpus_per_worker} GPU per worker, {max(usable, 0)} free "
            f"({reserved_gpus} reserved{not_for_this_job})")


def _node_reasons(spec: JobSpec, state: ClusterState, now: float, capacity: np.ndarray,
                  used: set[str], limit: int | None = None,
                  excluded_gpus: GpuSlots = frozenset()) -> dict[str, str]:
    reasons = {}
    for row, node_id in enumerate(state.table.ids[:limit]):
        if node_id in used:
            continue
        if capacity[row] > 0 and not used:  # a rejection: the node was not the problem
            reasons[node_id] = f"has room for {capacity[row]} worker(s)"
        elif capacity[row] > 0:
            reasons[node_id] = ("not needed: the job fits on fewer, better-connected or "
                                "better-fitting nodes")
        else:
            reasons[node_id] = _node_reason(spec, state, state.reports[node_id], now,
                                            excluded_gpus)
    return reasons


def _rejection(spec: JobSpec, state: ClusterState, now: float, capacity: np.ndarray,
               explain: bool, excluded_gpus: GpuSlots = frozenset(),
               too_slow: Choice | None = None) -> Rejection:
    """`too_slow`: the best node set found, when it was below the job's bandwidth floor."""
    available = int(capacity.sum())
    idle = worker_capacity(spec, state, now, ignore_reservations=True,
                           excluded_gpus=excluded_gpus)
    fits_when_free = (int(idle.sum()) >= spec.num_workers and _choose(spec, state, idle)
                      .bottleneck >= spec.min_bandwidth_gbps)
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
    if too_slow is not None:
        headline = (f"cannot place job '{spec.name}': {available} worker slot(s) are free, but no "
                    f"node set found holding {spec.num_workers} worker(s) has >= "
                    f"{spec.min_bandwidth_gbps:g} GB/s between every pair: searched "
                    f"{too_slow.sets_grown} node set(s) grown from {too_slow.seeds_considered} "
                    f"seed node(s); the best, {len(too_slow.rows)} node(s), has "
                    f"{too_slow.bottleneck:.3g} GB/s between its slowest pair")
    else:
        headline = (f"cannot place job '{spec.name}': it needs {spec.num_workers} worker(s) x "
                    f"({per_worker}) = {spec.total_cpus:g} CPUs, {spec.total_gpus} GPUs; room "
                    f"for {available} worker(s) now on {len(healthy)} healthy node(s) with "
                    f"{total_cpus:g} CPUs, {total_gpus} GPUs in total")
    if fits_when_free and too_slow is None:
        headline += "; it fits once running jobs release their reservations"
    lines = [headline]
    if not state.reports:
        lines.append("  no node has reported yet (are the node agents running?)")
    # Reasons cost a Python step per node: on big clusters, unless asked, the first nodes only.
    limit = None if explain else EXPLAIN_LIMIT
    reasons = _node_reasons(spec, state, now, capacity, used=set(), limit=limit,
                            excluded_gpus=excluded_gpus)
    for node_id, why in sorted(reasons.items()):
        lines.append(f"  node {node_id[:12]}: {why}")
    if len(state.table) > len(reasons):
        lines.append(f"  ... and {len(state.table) - len(reasons)} more node(s) not shown")
    return Rejection(spec.name, "\n".join(lines), reasons, fits_when_free)
