"""The policies the simulator compares, all through one SchedulerCore (one queue, EASY
backfill, preemption, migration): a policy is where jobs go (its placement) and the queue's
order within a priority class.

    placement(spec: JobSpec, state: ClusterState, now: float, job: SimJob) -> Placement | None

None means "does not fit now". Placements never reserve: the core reserves what they return
with state.reserve(), exactly as the live scheduler does.

- fifo        first submitted first; first-fit: nodes in table order, every free slot taken
              until the job is covered
- random      first submitted first; nodes with room in a random (seeded) order
- bestfit     first submitted first; the tightest single node that holds the job, else the
              fewest nodes (largest first), blind to racks and bandwidth
- tiresias    Tiresias-style: least attained service first (discretised 2D-LAS, GPU-seconds,
              with preemption), best-fit placement, blind to accelerator types where it
              starts a job
- gavel       Gavel-style heterogeneity-aware greedy: first submitted first; the GPU types in
              order of the job's throughput on them (Gavel's table), each tried with place()
              restricted to that type; the first that fits wins (a job no one type can
              hold even idle runs across its allowed types, placed by place())
- hetero-las  the live scheduler's own rules (SchedulerSettings defaults): least attained
              service first with preemption, and placement that weighs the queue — comparative
              advantage across accelerator families, families kept for the jobs that can run
              only there, then orchestrator.placement.place() (fewest nodes, best connected,
              best fit)

Migration is the core's and on for every policy: a running job of any of them is moved to a
faster family with free GPUs no waiting job wants (SchedulerCore._migrate), which neither FIFO
first-fit nor Tiresias does as published; make_policy(published=True) turns it off for the
type-blind ones (docs/simulator.md#policies measures the difference).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from orchestrator.config import JobSpec
from orchestrator.inventory import ClusterState
from orchestrator.placement import (Placement, PlacementError, bottleneck_gbps, gpus_measured,
                                    place, worker_capacity)

POLICY_NAMES = ("fifo", "random", "bestfit", "tiresias", "gavel", "hetero-las")
# The queue order of each policy (SchedulerSettings.queue_order); the rest of the settings
# are the live defaults.
QUEUE_ORDER = {"fifo": "fifo", "random": "fifo", "bestfit": "fifo", "tiresias": "las",
               "gavel": "fifo", "hetero-las": "las"}

Policy = Callable[[JobSpec, ClusterState, float, object], "Placement | None"]


def _from_rows(spec: JobSpec, state: ClusterState, rows, capacity: np.ndarray) -> Placement:
    ids = state.table.ids
    workers: list[str] = []
    for row in rows:
        take = min(int(capacity[row]), spec.num_workers - len(workers))
        workers += [ids[row]] * take
        if len(workers) == spec.num_workers:
            break
    nodes = list(dict.fromkeys(workers))
    return Placement(spec.name, tuple(workers), spec.cpus_per_worker, spec.gpus_per_worker,
                     bottleneck_gbps=bottleneck_gbps(state, nodes),
                     gpus_measured=gpus_measured(state, nodes))


def first_fit(spec: JobSpec, state: ClusterState, now: float, job=None) -> Placement | None:
    capacity = worker_capacity(spec, state, now)
    covered = np.cumsum(capacity)
    if len(covered) == 0 or covered[-1] < spec.num_workers:
        return None
    last = int(np.searchsorted(covered, spec.num_workers))
    return _from_rows(spec, state, np.flatnonzero(capacity[:last + 1]), capacity)


def make_random(seed: int) -> Policy:
    rng = np.random.default_rng([seed, 7])

    def random_fit(spec: JobSpec, state: ClusterState, now: float, job=None):
        capacity = worker_capacity(spec, state, now)
        rows = np.flatnonzero(capacity)
        if capacity[rows].sum() < spec.num_workers:
            return None
        return _from_rows(spec, state, rng.permutation(rows), capacity)

    return random_fit


def best_fit(spec: JobSpec, state: ClusterState, now: float, job=None) -> Placement | None:
    capacity = worker_capacity(spec, state, now)
    rows = np.flatnonzero(capacity)
    if capacity[rows].sum() < spec.num_workers:
        return None
    single = rows[capacity[rows] >= spec.num_workers]
    if len(single):
        return _from_rows(spec, state, [single[np.argmin(capacity[single])]], capacity)
    order = rows[np.argsort(-capacity[rows], kind="stable")]  # fewest nodes, racks ignored
    return _from_rows(spec, state, order, capacity)


def live_place(spec: JobSpec, state: ClusterState, now: float, job=None) -> Placement | None:
    """orchestrator.placement.place() alone, as a placement function (scripts/bench_placement
    compares it with first-fit and best-fit job by job, without a queue)."""
    try:
        return place(spec, state, now, explain=False, trial=True)
    except PlacementError:
        return None


def make_gavel(type_order: Callable[[object], tuple[str, ...]]) -> Policy:
    """`type_order(job)` gives the accelerator families present in the cluster, fastest first
    for that job's model (and allowed by its constraint)."""
    specs: dict[tuple[str, str], JobSpec] = {}

    def gavel(spec: JobSpec, state: ClusterState, now: float, job=None):
        t = state.table
        n = len(t)
        # The core may narrow a job's families (a migration's claim: the faster types no
        # waiting job wants). Ignoring that put moves on GPUs kept for the queue, or on the
        # job's own type, where the move gains nothing and was dropped.
        allowed = {f.upper() for f in spec.accelerator_types}
        families = tuple(f for f in type_order(job) if not allowed or f.upper() in allowed)
        idle = _gpus_by_family(t, t.gpus[:n])
        if not any(idle.get(family, 0) >= spec.total_gpus for family in families):
            # No one type could hold it even idle: Gavel's one-type rule would queue it
            # forever; it runs across its allowed types, as every other policy places it.
            return live_place(spec, state, now)
        free = _gpus_by_family(t, t.gpus[:n] - t.reserved_gpus[:n])
        for family in families:
            if free.get(family, 0) < spec.total_gpus:
                continue  # cheap check: not enough free GPUs of this type, skip place()
            key = (spec.name, family)
            typed = specs.get(key)
            if typed is None:
                typed = specs[key] = spec.narrowed(accelerator_types=(family,))
            try:
                placement = place(typed, state, now, explain=False, trial=True)
            except PlacementError:
                continue
            specs.pop(key, None)
            return placement
        return None

    return gavel


def _gpus_by_family(table, gpus: np.ndarray) -> dict[str, int]:
    """Family -> the sum of `gpus` (per row of the node table) over its nodes: one bincount
    for all families (a masked sum per family cost Gavel-style a table pass per family on
    every placement try)."""
    sums = np.bincount(table.family[:len(table)], weights=gpus, minlength=len(table.families))
    return {family: int(sums[code]) for family, code in table.families.items()}


# Blind to accelerator types where they start a job; as published, they never move a running
# job to another GPU type either (the core's migration does, unless `published`).
TYPE_BLIND = ("fifo", "random", "bestfit", "tiresias")


def make_policy(name: str, seed: int = 0,
                type_order: Callable[[object], tuple[str, ...]] | None = None,
                published: bool = False) -> tuple[Policy | None, dict]:
    """The placement of policy `name` (None: the core's own, place() with its family choice)
    and its SchedulerSettings overrides. `published`: a type-blind baseline runs without the
    core's heterogeneity-aware migration, as its paper's scheduler (FIFO first-fit and
    Tiresias never move a job to another GPU type)."""
    if name not in POLICY_NAMES:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICY_NAMES)}, all")
    settings = {"queue_order": QUEUE_ORDER[name],
                **({"migration": False} if published and name in TYPE_BLIND else {})}
    if name == "fifo":
        return first_fit, settings
    if name == "random":
        return make_random(seed), settings
    if name in ("bestfit", "tiresias"):
        return best_fit, settings
    if name == "gavel":
        if type_order is None:
            raise ValueError("the gavel policy needs type_order")
        return make_gavel(type_order), settings
    return None, settings
