"""Placement policies the simulator compares, all through one interface:

    policy(spec: JobSpec, state: ClusterState, now: float, job: SimJob) -> Placement | None

None means "does not fit now". Policies never reserve: the simulator reserves what they return
with state.reserve(), exactly as the live scheduler does.

- fifo     first-fit: nodes in table order, every free slot taken until the job is covered
- random   nodes with room in a random (seeded) order
- bestfit  the tightest single node that holds the job; else the fewest nodes (largest first),
           blind to racks and bandwidth
- ours     orchestrator.placement.place(): the live scheduler's code, unchanged
- gavel    heterogeneity-aware greedy (Gavel-style): the GPU types in order of the job's model
           throughput on them (Gavel's table), each tried with place() restricted to that type
           via JobSpec.accelerator_types; the first that fits wins
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from orchestrator.config import JobSpec
from orchestrator.inventory import ClusterState
from orchestrator.placement import (Placement, PlacementError, bottleneck_gbps, place,
                                    worker_capacity)

POLICY_NAMES = ("fifo", "random", "bestfit", "ours", "gavel")

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
                     bottleneck_gbps=bottleneck_gbps(state, nodes))


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


def ours(spec: JobSpec, state: ClusterState, now: float, job=None) -> Placement | None:
    try:
        return place(spec, state, now, explain=False)
    except PlacementError:
        return None


def make_gavel(type_order: Callable[[object], tuple[str, ...]]) -> Policy:
    """`type_order(job)` gives the accelerator families present in the cluster, fastest first
    for that job's model (and allowed by its constraint)."""
    specs: dict[tuple[str, str], JobSpec] = {}

    def gavel(spec: JobSpec, state: ClusterState, now: float, job=None):
        t = state.table
        n = len(t)
        free = t.gpus[:n] - t.reserved_gpus[:n]
        for family in type_order(job):
            code = t.families.get(family)
            if code is None or free[t.family[:n] == code].sum() < spec.total_gpus:
                continue  # cheap check: not enough free GPUs of this type, skip place()
            key = (spec.name, family)
            typed = specs.get(key)
            if typed is None:
                typed = specs[key] = dataclasses.replace(spec, accelerator_types=(family,))
            try:
                placement = place(typed, state, now, explain=False)
            except PlacementError:
                continue
            specs.pop(key, None)
            return placement
        return None

    return gavel


def make_policy(name: str, seed: int = 0,
                type_order: Callable[[object], tuple[str, ...]] | None = None) -> Policy:
    if name == "fifo":
        return first_fit
    if name == "random":
        return make_random(seed)
    if name == "bestfit":
        return best_fit
    if name == "ours":
        return ours
    if name == "gavel":
        if type_order is None:
            raise ValueError("the gavel policy needs type_order")
        return make_gavel(type_order)
    raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICY_NAMES)}, all")

