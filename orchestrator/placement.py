"""Where a job's workers go: filter nodes, count how many workers each can host, choose.

Pure functions over a ClusterState snapshot. A decision is data (a Placement), and every node
not used can be given a reason, so an operator can see why a job went where it went — or why
it could not go anywhere.

The per-node arithmetic runs on the NodeTable's numpy columns, so it costs a few vector
operations whatever the cluster size; only the handful of chosen nodes (and their links) are
handled in Python.

Choice, in order of importance:
1. fit: healthy, the right accelerator family, enough free CPUs, GPUs and GPU memory (each GPU
   must have the job's free memory itself; GPUs a job was told to avoid do not count), and,
   for a job that states its workers' host RAM (min_host_memory_gb), enough of it: the RAM
   the node's agent reports available, less what the workers placed there asked for;
2. fewest nodes: a job that fits on one node goes to one node (no network crossed);
3. best connected: a multi-node job goes to the node set with the highest bottleneck bandwidth
   (slowest link between any two of its nodes) that the search finds, and never below the
   job's bandwidth floor. Links are what NodeTable.known_links knows — a network group's
   declared bandwidth, else what the agents measured — and inter_group_gbps for the rest.
   The search (_choose) grows a set from each of a bounded number of seed nodes, each step
   adding the node whose slowest link to the set is fastest (a maximin, Prim-like growth),
   most promising seeds first, stopping when no seed left can beat the best set found.
   When that set misses the job's floor, each seed that could reach it is grown again
   taking only nodes whose links all pass the floor, before the job is refused;
4. fewest nodes again: among sets as well connected, the fewest nodes (the winner's region is
   grown once more taking the largest nodes that keep its bandwidth);
5. preferred hardware: for GPU jobs the faster accelerator family (config.ACCELERATOR_SPEED);
   CPU jobs go to nodes without GPUs whenever those hold them within the floor;
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
from orchestrator.inventory import (LABEL_ACCELERATOR_MEMORY_GB, ClusterState,
                                    NodeReport, Reservation, gpu_families)

INTRA_NODE = math.inf  # bottleneck bandwidth of a single-node job: no network crossed
EXPLAIN_LIMIT = 512  # above this many nodes, per-node reasons are given only on request
# Seeds of the multi-node search: the best node of each of the best few declared network
# groups that can hold the job, the largest node, and this many nodes spread evenly over the
# table (so measured-only clusters, with no groups declared, are searched across all racks).
# Seeds are grown most promising first, and at most MAX_GROWTHS of them: the search's cost
# is bounded by that, not by the cluster's size. (On scripts/bench_placement.py's measured
# cluster, 10,000 nodes, 1,000 jobs: 8 growths at most kept the mean bottleneck within 1% of
# growing every seed, at 1.7x the speed; sampling 128 seeds instead of 24 cut the jobs put
# across racks from 129 to 79 (mean bottleneck 13.9 -> 15.5 GB/s) for ~1.5x the time.) Only
# a job whose best set misses its bandwidth floor has every seed that could reach the floor
# grown once more, through links that pass it (on the measured 10,000-node cluster a
# refused job took 23 ms instead of 20).
MAX_GROUP_SEEDS = 8
SEED_SAMPLE = 128
MAX_GROWTHS = 8
# Links within this factor of each other count as equally fast when choosing nodes: measured
# bandwidth is noisy (on one host, 0.19-0.35 GB/s between raylets from one probe to the next),
# and noise must not outrank preferred hardware or a tighter fit.
BANDWIDTH_BAND = 1.25


# Free room is what neither the scheduler's jobs nor Ray work outside it (Serve replicas,
# other users' actors) hold: either may be what a waiting job waits for.
FITS_WHEN_FREED = ("it fits once running jobs (or Ray work outside the scheduler: see "
                   "`status`) release their room")


def bandwidth_band(gbps: float) -> float:
    """The band a bottleneck falls in (higher is faster); inf for a single node."""
    if gbps <= 0:
        return -math.inf
    return math.inf if math.isinf(gbps) else math.floor(math.log(gbps, BANDWIDTH_BAND))


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
    # True when an operator cancelled the job (not a question of room): its driver says so
    # rather than "cannot be placed".
    cancelled: bool = False


@dataclass(frozen=True)
class Queued:
    """The job waits for capacity: `reason` says what it is waiting for."""

    job_name: str
    position: int  # 1 = next in line
    reason: str
    # True on the answer to a job that stopped as told (preempted) as it lost a node: like
    # any preempted job it waits as long as it takes, with no --queue-timeout.
    preempted: bool = False


class PlacementError(Exception):
    """Raised by place() when a job cannot be placed now; `rejection` says why, naming every
    factor."""

    def __init__(self, rejection: Rejection) -> None:
        super().__init__(rejection.message)
        self.rejection = rejection


@dataclass(frozen=True)
class Placement:
    """Where a job runs: a node id for every worker by rank, the resources each worker holds,
    the slowest link between the chosen nodes, and why every other node was not chosen."""

    job_name: str
    worker_nodes: tuple[str, ...]  # node id of each worker, by rank
    cpus_per_worker: float
    gpus_per_worker: int
    node_reasons: dict[str, str] = field(default_factory=dict)  # nodes not chosen -> why
    owner: str = ""  # who holds the reservation (a Ray job id); "" = unknown, never reclaimed
    bottleneck_gbps: float = INTRA_NODE  # slowest link between any two chosen nodes
    # Every chosen node's GPUs measured by NVML (False: declared by labels, as on a laptop
    # modelling a GPU cluster): NCCL needs real GPUs, and a CUDA build of torch has it
    # whether or not there are any (ray_layer/launch.collective_backend).
    gpus_measured: bool = True
    host_memory_gb_per_worker: float = 0.0  # host RAM each worker holds (min_host_memory_gb)

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
                            count * self.gpus_per_worker, self.owner,
                            count * self.host_memory_gb_per_worker)
                for node_id, count in per_node.items()]


# -- capacity: how many of the job's workers each node can host ------------------------------

def capacity_shape(spec: JobSpec) -> tuple:
    """What worker_capacity reads of a job: jobs alike in these get the same answer from it
    whatever their worker count (a memo of its answer is keyed on them: keep both in step)."""
    return (spec.cpus_per_worker, spec.gpus_per_worker, spec.min_gpu_memory_gb,
            spec.accelerator_types, spec.min_host_memory_gb)


def worker_capacity(spec: JobSpec, state: ClusterState, now: float, *,
                    ignore_reservations: bool = False,
                    excluded_gpus: GpuSlots = frozenset(),
                    revivable: frozenset[str] = frozenset()) -> np.ndarray:
    """Workers of `spec` each node of the table can host now (0 where it cannot).

    `excluded_gpus`: (node id, GPU index) pairs that do not count for this job — e.g. a GPU
    that a worker, once started, found without the free memory the table said it had.
    `revivable`: dead nodes that count in the idle view (ignore_reservations) as their last
    report left them: nodes dead only by their agent's silence that Ray still lists alive
    may report again, and a job that needs them has not become unfittable."""
    t = state.table
    n = len(t)
    reserved_cpus, reserved_gpus = (0, 0) if ignore_reservations else t.taken(n)
    free_gpus = None
    if spec.gpus_per_worker:
        # Free memory is measured, so GPUs busy with reserved jobs look full; with reservations
        # ignored ("would it fit an idle cluster?") their total memory is what counts.
        memory = t.gpu_total_gib if ignore_reservations else t.gpu_free_gib
        fits = memory[:n] >= spec.min_gpu_memory_gb  # per GPU: a worker's GPU is one GPU
        # GPUs that fit, per node: einsum counts short rows ~5x faster than count_nonzero.
        fitting = np.einsum("ij->i", fits.view(np.uint8)).astype(np.int64)
        if excluded_gpus:
            rows, slots = _excluded_slots(state, excluded_gpus)
            np.subtract.at(fitting, rows, fits[rows, slots])  # only those that counted
        # Ray hands out only the GPUs it schedules, minus those reserved. GPUs busy with a
        # reserved job usually lack free memory too, so they are not subtracted twice: the
        # smaller count is what is really free. (Ray picks the GPU index.)
        free_gpus = np.minimum(fitting, t.gpus[:n] - reserved_gpus)
    capacity = workers_by_count(spec, t.cpus[:n] - reserved_cpus, free_gpus,
                                free_host_memory(state, ignore_reservations)
                                if spec.min_host_memory_gb else None)
    if spec.gpus_per_worker and spec.accelerator_types:
        allowed = np.zeros(len(t.families), dtype=bool)
        allowed[[t.families[f.upper()] for f in spec.accelerator_types
                 if f.upper() in t.families]] = True
        capacity = np.where(allowed[t.family[:n]], capacity, 0)
    # Suspect and overloaded nodes may recover: they count for the idle view, not for now.
    usable_node = ~t.dead[:n] if ignore_reservations else state.placeable(now)
    if ignore_reservations and revivable:
        usable_node[[t.index[node] for node in revivable if node in t.index]] = True
    # Clip before the integer cast: a tiny per-worker size must not overflow int64.
    return np.where(usable_node, np.clip(capacity, 0, 1_000_000), 0).astype(np.int64)


def free_host_memory(state: ClusterState, ignore_reservations: bool = False) -> np.ndarray:
    """Host RAM (GiB) per table row that workers stating their need (min_host_memory_gb) may
    have: the node's total less what the workers placed there asked for and less what is in
    use outside them (NodeTable.note_ram_outside), and never more than its agent reports
    available. A placed worker's own use is not counted beside its reservation (it was: the
    measured figure less the reservations), and nothing is handed out twice. With
    reservations ignored ("would it fit an idle cluster?"), the node's total."""
    t = state.table
    n = len(t)
    if ignore_reservations:
        return t.ram_total_gib[:n]
    return host_ram_free(t.ram_total_gib[:n], t.ram_available_gib[:n],
                         t.reserved_memory_gib[:n], t.ram_outside_gib[:n])


def host_ram_free(total, available, reserved, outside):
    """free_host_memory's rule, for arrays or one node's numbers."""
    return np.minimum(available, total - reserved - outside)


def ram_use_freed(memory_gb: float, total: float, available: float, outside: float) -> float:
    """Host RAM (GiB) a node's agent shows available again once workers that asked for
    `memory_gb` there have gone: their own use, up to what they asked for, of the use not
    outside the reservations (none known where the host probe failed). The backfill plan
    (a running job that ends) and the victim search (one that yields) give it back."""
    if not math.isfinite(total):
        return 0.0
    return min(memory_gb, max(total - available - outside, 0.0))


def workers_by_count(spec: JobSpec, free_cpus, free_gpus, free_memory=None):
    """Whole workers of `spec` that nodes with these free CPUs, GPUs and (`free_memory`,
    GiB; counted only for a job stating min_host_memory_gb) host RAM (per node: arrays, or
    one node's numbers) hold by count alone, each worker's on one node (worker_capacity adds
    GPU memory, families and health; the head's plan, what frees as running jobs end)."""
    # (one node's plain numbers by Python's own: numpy on a scalar costs ~1 us a call, and the
    # head's plan counts one node at a time as each running job ends)
    floor, least = (math.floor, min) if isinstance(free_cpus, (int, float)) \
        else (np.floor, np.minimum)
    workers = floor(free_cpus / spec.cpus_per_worker + 1e-9)
    if spec.gpus_per_worker:
        workers = least(workers, free_gpus // spec.gpus_per_worker)
    if spec.min_host_memory_gb and free_memory is not None:
        workers = least(workers, floor(free_memory / spec.min_host_memory_gb + 1e-9))
    return workers


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
    """Slowest link between any two distinct nodes of `node_ids` (INTRA_NODE for one node):
    the one figure placement, the simulator's policies and the benchmark report."""
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
    seeds_ranked: int = 0  # seed nodes considered
    seeds_grown: int = 0  # of which a set was grown from
    sets_completed: int = 0  # growths that held the job (the others stopped: they could not win)


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
        self.sets_completed = 0

    def take(self, rows: np.ndarray, left: int) -> int:
        """The next node among `rows` for `left` workers still to place: of those that hold
        them all, preferred hardware, then the tightest, then the least loaded; when none can,
        the largest (preferred hardware, then least loaded) — a big node is not spent on a
        small remainder, and a set needs as few nodes as the sizes allow."""
        if len(rows) == 1:
            return int(rows[0])
        capacity = self.capacity[rows]
        fits = capacity >= left
        if fits.any():
            rows = rows[fits]
            preference = self.preference[rows]
            rows = rows[preference == preference.max()]
            capacity = self.capacity[rows]
            rows = rows[capacity == capacity.min()]
            return int(rows[np.argmin(self.load[rows])])
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
        rows = list(dict.fromkeys([*group_seeds, self.take(self.candidates, self.workers),
                                   *sample.tolist()]))
        reach = self.reach(np.array(rows, dtype=np.int64))
        order = np.lexsort((np.arange(len(rows)), -reach))
        return [(float(reach[i]), rows[i]) for i in order]

    def reach(self, seeds: np.ndarray) -> np.ndarray:
        """Per seed, an upper bound on the bottleneck of any set holding the job grown from
        it: the fastest link speed at which the seed's links alone reach enough capacity, or
        inter_group_gbps where they do not (nodes without a known link are that far).
        One pass over all the seeds' links together."""
        links = [self.state.table.known_links(seed) for seed in seeds.tolist()]
        counts = np.array([len(peers) for peers, _ in links], dtype=np.int64)
        reach = np.full(len(seeds), self.inter)
        if counts.sum() == 0:
            return reach
        owner = np.repeat(np.arange(len(seeds)), counts)
        peers = np.concatenate([peers for peers, _ in links])  # each seed's, fastest first
        gbps = np.concatenate([gbps for _, gbps in links])
        covered = np.cumsum(self.capacity[peers])
        before = np.concatenate([[0], covered])[np.cumsum(counts) - counts]  # per seed
        enough = covered - before[owner] >= (self.workers - self.capacity[seeds])[owner]
        at = np.flatnonzero(enough)
        seeds_reached, first = np.unique(owner[at], return_index=True)
        reach[seeds_reached] = np.maximum(gbps[at[first]], self.inter)
        return reach

    # -- growth
    def grow(self, seed: int, floor: float = -math.inf, maximin: bool = True
             ) -> NodeSet | None:
        """A node set holding the job, grown from `seed`, every link of it >= `floor`; None
        when no such set is found.

        maximin: each step adds the node whose slowest link to the set is fastest, `take`
        deciding among equals. Otherwise each step adds by `take` alone among the nodes whose
        links to the set all pass the floor (the fewest nodes at that bandwidth)."""
        growth = _Growth(self, seed, floor)
        left, worst = self.workers - int(self.capacity[seed]), INTRA_NODE
        while left > 0:
            row, gbps = growth.next(left, maximin)
            if row is None:
                return None
            growth.add(row)
            left -= int(self.capacity[row])
            worst = min(worst, gbps)
        self.sets_completed += 1
        return NodeSet(growth.chosen, worst)

    def rank(self, node_set: NodeSet) -> tuple:
        """Sort key of a node set, best first: bandwidth (in bands: noise is not a
        difference), fewest nodes, preferred hardware, bandwidth within the band, tightest
        fit, least load."""
        rows = node_set.rows
        return (-bandwidth_band(node_set.bottleneck), len(rows),
                -float(self.preference[rows].mean()), -node_set.bottleneck,
                int(self.capacity[rows].sum()), float(self.load[rows].sum()))


class _Growth:
    """One node set being grown, every link >= floor. For every node with a known link to a
    chosen node: its slowest such link, and how many chosen nodes it has one with — to the
    others it is inter_group_gbps away.

    When inter_group_gbps is below the floor (the usual case once a first set is found: a
    later one must beat it), only nodes with a known link to every chosen node, each at or
    above the floor, may join: the candidates are then the chosen nodes' common fast
    neighbourhood, which shrinks as the set grows. (Plain dicts: a neighbourhood is a few
    dozen nodes, where Python beats numpy's per-call cost.)"""

    def __init__(self, search: _Search, seed: int, floor: float) -> None:
        self.search = search
        self.floor = floor
        self.exclusive = search.inter < floor
        self.chosen: list[int] = []
        self.in_set: set[int] = set()
        self.slowest: dict[int, float] = {}
        self.linked: dict[int, int] = {}
        self.add(seed)

    def add(self, row: int) -> None:
        self.chosen.append(row)
        self.in_set.add(row)
        s = self.search
        peers, gbps = s.state.table.known_links(row)
        usable = s.capacity[peers] > 0
        links = zip(peers[usable].tolist(), gbps[usable].tolist())
        slowest, floor = self.slowest, self.floor
        if self.exclusive and len(self.chosen) > 1:  # keep the common fast neighbourhood
            self.slowest = {peer: low for peer, value in links if peer in slowest
                            and (low := min(value, slowest[peer])) >= floor}
        elif self.exclusive:
            self.slowest = {peer: value for peer, value in links if value >= floor}
        else:
            slowest.pop(row, None)
            self.linked.pop(row, None)
            for peer, value in links:
                if peer not in self.in_set:
                    slowest[peer] = min(value, slowest.get(peer, math.inf))
                    self.linked[peer] = self.linked.get(peer, 0) + 1

    def next(self, left: int, maximin: bool) -> tuple[int | None, float]:
        """The node to add next and its slowest link to the chosen set; None if none may."""
        s, n = self.search, len(self.chosen)
        if self.exclusive:
            to_set, unlinked = self.slowest, False
            if s.capacity[list(to_set)].sum() < left:
                return None, -math.inf  # the nodes that may still join cannot hold the rest
        else:
            to_set = {row: (gbps if self.linked[row] == n else min(gbps, s.inter))
                      for row, gbps in self.slowest.items()}
            # Nodes with no known link to any chosen node are inter_group_gbps from them all.
            unlinked = len(s.candidates) > len(to_set) + n
        if maximin:  # the fastest (within noise: one band); take() among equals
            best = max(to_set.values(), default=-math.inf)
            if unlinked and s.inter >= best:
                best = s.inter
            if best < self.floor:
                return None, -math.inf
            # The slowest link in best's band (one log, not one per node: this loop is hot).
            low = max(self.floor, BANDWIDTH_BAND ** bandwidth_band(best))
            eligible = [row for row, gbps in to_set.items() if gbps >= low]
            with_unlinked = unlinked and s.inter >= low
        else:
            eligible = [row for row, gbps in to_set.items() if gbps >= self.floor]
            with_unlinked = unlinked  # not exclusive: inter_group_gbps passes the floor
        rows = np.array(eligible, dtype=np.int64)
        if with_unlinked:
            rows = np.concatenate([rows, self._unlinked()])
        if len(rows) == 0:
            return None, -math.inf
        row = s.take(rows, left)
        return row, to_set.get(row, s.inter)

    def _unlinked(self) -> np.ndarray:
        """Candidates neither chosen nor linked to a chosen node."""
        s = self.search
        free = np.zeros(len(s.capacity), dtype=bool)
        free[s.candidates] = True
        free[self.chosen] = False
        free[list(self.slowest)] = False
        return np.flatnonzero(free)


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
    if not spec.gpus_per_worker:
        # Not only a preference: a CPU job goes to GPU nodes only when the others cannot hold
        # it within its bandwidth floor (their CPUs feed GPU work, Serve replicas...).
        without_gpus = np.where(t.gpus[:n] == 0, capacity, 0)
        if without_gpus.sum() >= spec.num_workers:
            choice = _choose_among(spec, state, without_gpus, preference)
            if choice.bottleneck >= spec.min_bandwidth_gbps:
                return choice
    return _choose_among(spec, state, capacity, preference)


def _choose_among(spec: JobSpec, state: ClusterState, capacity: np.ndarray,
                  preference: np.ndarray) -> Choice:
    """_choose over the nodes `capacity` counts."""
    t = state.table
    candidates = np.flatnonzero(capacity > 0)
    single = candidates[capacity[candidates] >= spec.num_workers]
    if len(single):
        fastest = single[preference[single] == preference[single].max()]
        tightest = fastest[capacity[fastest] == capacity[fastest].min()]
        return Choice([int(tightest[np.argmin(t.load[tightest])])], INTRA_NODE)
    search = _Search(state, capacity, spec.num_workers, preference)
    seeds = search.seeds(_group_seeds(search, state))
    best: NodeSet | None = None
    grown = 0
    for reach, seed in seeds:
        if best is not None and (reach <= best.bottleneck or grown == MAX_GROWTHS):
            break  # sorted by reach: no seed left can beat the best set
        # A later seed must beat the best set found: every link of its set faster.
        floor = -math.inf if best is None else np.nextafter(best.bottleneck, math.inf)
        best = search.grow(seed, floor) or best
        grown += 1
    assert best is not None  # the first seed always grows: capacity covers the job
    # The same bandwidth on fewer nodes? Only asked above inter_group_gbps: a set as slow as
    # that is one the first growth, blind to links beyond its seed's, already filled by take.
    if len(best.rows) > 2 and best.bottleneck > search.inter:
        fewer = search.grow(best.rows[0], best.bottleneck, maximin=False)
        if fewer is not None and search.rank(fewer) < search.rank(best):
            best = fewer
    if best.bottleneck < spec.min_bandwidth_gbps:
        # The maximin growth can dead-end: its fastest link leads to a node too small to
        # finish the set, and the link past it is slow. Before the job is refused as never
        # fitting, grow every seed that could reach the floor taking only nodes whose links
        # to the set all pass it (cheap: that neighbourhood is small).
        rescued = [found for reach, seed in seeds if reach >= spec.min_bandwidth_gbps
                   if (found := search.grow(seed, spec.min_bandwidth_gbps, maximin=False))]
        if rescued:
            best = min(rescued, key=search.rank)
    return Choice(best.rows, best.bottleneck, len(seeds), grown, search.sets_completed)


# -- the entry point ------------------------------------------------------------------------------

def place(spec: JobSpec, state: ClusterState, now: float, owner: str = "",
          explain: bool | None = None, excluded_gpus: GpuSlots = frozenset(),
          trial: bool = False, reasons: bool = True) -> Placement:
    """Place every worker of `spec` on a node, or raise PlacementError saying why not.

    `owner` identifies who will hold the reservation (the driver's Ray job id), so that it can
    be released if that driver dies without releasing it. `explain` gives every node not used
    a reason (default: on for clusters up to EXPLAIN_LIMIT nodes; rejections always explain).
    `excluded_gpus`: (node id, GPU index) pairs this job must not count on (see
    worker_capacity). `trial`: a "would it fit?" question whose rejection nobody reads but
    for being one (the victim search asks hundreds per pass): a rejection then carries a bare
    message, no per-node reasons (a Python step per node) and no verdict (fits_when_free is
    left False uncomputed: a _choose on the idle cluster); a placement is as without it.
    `reasons=False`: a rejection whose caller shows its headline alone: the headline and the
    verdict, no per-node reasons."""
    if spec.name in state.reservations:
        raise PlacementError(Rejection(spec.name, (
            f"job '{spec.name}' already holds a reservation: a job of that name is running "
            "(two launches of the same run?)")))
    if explain is None:
        explain = len(state.table) <= EXPLAIN_LIMIT
    capacity = worker_capacity(spec, state, now, excluded_gpus=excluded_gpus)
    if capacity.sum() < spec.num_workers:
        raise PlacementError(_rejection(spec, state, now, capacity, explain, excluded_gpus,
                                        trial=trial, reasons=reasons))
    choice = _choose(spec, state, capacity)
    if choice.bottleneck < spec.min_bandwidth_gbps:
        raise PlacementError(_rejection(spec, state, now, capacity, explain, excluded_gpus,
                                        too_slow=choice, trial=trial, reasons=reasons))
    t = state.table
    worker_nodes: list[str] = []
    for row in choice.rows:  # every node but the last is filled (see _Search.grow)
        worker_nodes += [t.ids[row]] * min(int(capacity[row]), spec.num_workers - len(worker_nodes))
    reasons = _node_reasons(spec, state, now, capacity, set(worker_nodes),
                            excluded_gpus=excluded_gpus) if explain else {}
    return Placement(spec.name, tuple(worker_nodes), spec.cpus_per_worker,
                     spec.gpus_per_worker, reasons, owner, choice.bottleneck,
                     gpus_measured(state, worker_nodes), spec.min_host_memory_gb)


def gpus_measured(state: ClusterState, nodes) -> bool:
    """Whether every GPU of `nodes` was measured by NVML (none declared by labels only)."""
    return all(gpu.source == "nvml" for node in set(nodes)
               for gpu in state.reports[node].gpus if node in state.reports)


# -- explanations -------------------------------------------------------------------------------

def _node_reason(spec: JobSpec, state: ClusterState, report: NodeReport, now: float,
                 excluded_gpus: GpuSlots = frozenset()) -> str:
    """Why this node can host none of the job's workers."""
    unhealthy = state.health_reason(report.node_id, now)
    if unhealthy:
        return unhealthy
    if report.load_per_cpu > state.max_load_per_cpu:
        if "host" in report.probe_errors:  # its load is the agent's stand-in, not measured
            return (f"load unknown, over the limit until its host probe works again: "
                    f"{report.probe_errors['host']}")
        return (f"overloaded: load {report.load_per_cpu:.2f} per CPU > "
                f"{state.max_load_per_cpu:g}")
    reserved_cpus, reserved_gpus = state.reserved_on(report.node_id)
    outside_cpus, outside_gpus = state.outside_on(report.node_id)
    free_cpus = report.ray_cpus - reserved_cpus - outside_cpus
    if free_cpus < spec.cpus_per_worker:
        outside = f", {outside_cpus:g} used by Ray work not placed here" if outside_cpus else ""
        return (f"needs {spec.cpus_per_worker:g} CPU per worker, has {free_cpus:g} free "
                f"({report.ray_cpus:g} total, {reserved_cpus:g} reserved{outside})")
    if spec.min_host_memory_gb and "host" in report.probe_errors:
        return (f"needs {spec.min_host_memory_gb:g} GiB of host RAM per worker, unknown until "
                f"its host probe works again: {report.probe_errors['host']}")
    if spec.min_host_memory_gb:
        t = state.table
        row = t.index[report.node_id]
        total, available = float(t.ram_total_gib[row]), float(t.ram_available_gib[row])
        reserved_memory = float(t.reserved_memory_gib[row])
        free_memory = host_ram_free(total, available, reserved_memory,
                                    float(t.ram_outside_gib[row]))
        if free_memory + 1e-9 < spec.min_host_memory_gb:
            # (what is in use outside the reservations, as it bounds the free figure)
            outside = total - reserved_memory - free_memory
            return (f"needs {spec.min_host_memory_gb:g} GiB of host RAM per worker, has "
                    f"{max(free_memory, 0):.1f} GiB available ({total:.1f} GiB total, "
                    f"{reserved_memory:g} GiB reserved"
                    + (f", {outside:.1f} GiB in use outside them" if outside >= 0.05 else "")
                    + ")")
    if not report.gpus:
        probe_errors = "; ".join(f"{k}: {v}" for k, v in report.probe_errors.items())
        return (f"needs {spec.gpus_per_worker} GPU per worker, node reports no GPUs"
                + (f" (probe errors: {probe_errors})" if probe_errors else ""))
    if report.ray_gpus < min(len(report.gpus), spec.gpus_per_worker):
        return (f"Ray schedules {report.ray_gpus:g} GPU(s) on this node, which has "
                f"{len(report.gpus)} ({report.gpus[0].source}): start Ray there with "
                f"--num-gpus={len(report.gpus)} (or its node type's resources in cluster.yaml)")
    if spec.accelerator_types:
        families = gpu_families(report.gpus)
        if len(families) > 1:
            return (f"GPUs of several families ({', '.join(f or 'unknown' for f in families)}): "
                    "Ray may hand a worker any of them, so a job naming families does not "
                    "go here")
        if families[0] not in {f.upper() for f in spec.accelerator_types}:
            return (f"accelerator {report.gpus[0].name} ({families[0] or 'unknown family'}) "
                    f"is not one of {', '.join(spec.accelerator_types)}")
    excluded = sum((report.node_id, g.index) in excluded_gpus for g in report.gpus)
    not_for_this_job = f", {excluded} excluded for this job" if excluded else ""
    fitting = [g for g in report.gpus if g.memory_free_gb >= spec.min_gpu_memory_gb
               and not g.holds_nothing and (report.node_id, g.index) not in excluded_gpus]
    empty = sum(g.holds_nothing for g in report.gpus)
    if empty:
        not_for_this_job += f", {empty} with MIG on and no slices"
    if spec.min_gpu_memory_gb and len(fitting) < spec.gpus_per_worker:
        most = max(g.memory_free_gb for g in report.gpus)
        unlabelled = (f" - declared GPUs without the {LABEL_ACCELERATOR_MEMORY_GB} label "
                      "count as 0 GiB"
                      if most == 0 and all(g.source == "declared" for g in report.gpus) else "")
        return (f"needs {spec.gpus_per_worker} GPU(s) with >= {spec.min_gpu_memory_gb:g} GiB "
                f"free, {len(fitting)} of {len(report.gpus)} have it (most free: {most:.1f} GiB"
                f"{not_for_this_job}){unlabelled}")
    usable = min(len(fitting), int(report.ray_gpus) - reserved_gpus - outside_gpus)
    outside = f", {outside_gpus} used by Ray work not placed here" if outside_gpus else ""
    return (f"needs {spec.gpus_per_worker} GPU per worker, {max(usable, 0)} free "
            f"({reserved_gpus} reserved{outside}{not_for_this_job})")


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
               too_slow: Choice | None = None, trial: bool = False,
               reasons: bool = True) -> Rejection:
    """`too_slow`: the best node set found, when it was below the job's bandwidth floor;
    `trial`: a bare message, no verdict; `reasons=False`: the headline and fits_when_free
    only, no per-node reasons (see place())."""
    if trial:  # (the verdict and the totals below cost a Python step per node, and more)
        why = "no node set fast enough" if too_slow is not None else "no room"
        return Rejection(spec.name, f"cannot place job '{spec.name}' ({why}; a trial: "
                                    "no reasons computed)")
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
    if spec.min_host_memory_gb:
        per_worker += f" + {spec.min_host_memory_gb:g} GiB host RAM"
    healthy = [r for n, r in state.reports.items() if state.health(n, now) == "healthy"]
    total_cpus = sum(r.ray_cpus for r in healthy)
    total_gpus = sum(int(r.ray_gpus) for r in healthy)
    if too_slow is not None:
        headline = (f"cannot place job '{spec.name}': {available} worker slot(s) are free, but no "
                    f"node set found holding {spec.num_workers} worker(s) has >= "
                    f"{spec.min_bandwidth_gbps:g} GB/s between every pair: of "
                    f"{too_slow.seeds_ranked} seed node(s), {too_slow.seeds_grown} grown into "
                    f"sets ({too_slow.sets_completed} held the job; the rest could not beat the "
                    f"best found); the best, {len(too_slow.rows)} node(s), has "
                    f"{too_slow.bottleneck:.3g} GB/s between its slowest pair")
    else:
        headline = (f"cannot place job '{spec.name}': it needs {spec.num_workers} worker(s) x "
                    f"({per_worker}) = {spec.total_cpus:g} CPUs, {spec.total_gpus} GPUs; room "
                    f"for {available} worker(s) now on {len(healthy)} healthy node(s) with "
                    f"{total_cpus:g} CPUs, {total_gpus} GPUs in total")
    if not fits_when_free and too_slow is None:
        headline += _host_memory_past_every_node(spec, state, now)
    if fits_when_free and too_slow is None:
        headline += f"; {FITS_WHEN_FREED}"
    lines = [headline]
    if not reasons:
        return Rejection(spec.name, headline, {}, fits_when_free)
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


def _host_memory_past_every_node(spec: JobSpec, state: ClusterState, now: float) -> str:
    """'; each worker needs N GiB of host RAM..., and the largest node has M GiB' when no
    live node's RAM holds one worker, else '' (also where a node's RAM is not known: its host
    probe failed)."""
    if not spec.min_host_memory_gb:
        return ""
    t = state.table
    live = ~t.dead[:len(t)]
    largest = float(t.ram_total_gib[:len(t)][live].max()) if live.any() else 0.0
    if largest + 1e-9 >= spec.min_host_memory_gb:
        return ""
    return (f"; each worker needs {spec.min_host_memory_gb:g} GiB of host RAM "
            f"(min_host_memory_gb), and the largest node has {largest:.1f} GiB")


def describe_decision(decision: "Placement | Rejection") -> str:
    """A placement as people read it (worker -> node, slowest link, why each node was or was
    not used), or the rejection's message."""
    if isinstance(decision, Rejection):
        return decision.message
    lines = [f"would place '{decision.job_name}': " + ", ".join(
        f"worker {rank} -> node {node[:12]}" for rank, node in enumerate(decision.worker_nodes))]
    if math.isfinite(decision.bottleneck_gbps):
        lines.append(f"slowest link between chosen nodes: {decision.bottleneck_gbps:.2f} GB/s")
    for node_id, why in sorted(decision.node_reasons.items()):
        lines.append(f"  node {node_id[:12]}: {why}")
    return "\n".join(lines)
