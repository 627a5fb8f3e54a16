#!/usr/bin/env python
"""Placement benchmark: place() against first-fit and best-fit, under churn, at 10,000 nodes.

Baselines are the product's own policies (orchestrator/policies.py: `first_fit`, `best_fit`),
set up as well as a user would: the node table is listed in rack order, as real clusters list
their nodes, so first-fit's consecutive nodes are mostly rack-mates. Every policy runs the same
job stream on its own fresh copy of the same cluster, and what it places is reserved exactly
as the live scheduler does (Placement.reservations() + state.reserve).

Two clusters, each `--nodes` nodes:
- declared: a heterogeneous inventory (8xA100-80GB, 8xH100, 4xT4, 8xV100 and CPU-only nodes,
  racks of 16-32 nodes of one type, each rack a declared network group with a bandwidth tier,
  1.25 GB/s between racks), ~30% of its GPUs held by background work; GPU jobs of 1-64
  one-GPU workers (most small), some asking a GPU type or free GPU memory.
- measured: 8-GPU nodes in racks of 16, no labels at all: each agent measured its 15
  rack-mates (10-25 GB/s) and 8 random nodes in other racks (1-3 GB/s); pairs nobody
  measured count as inter_group_gbps = 1.0 GB/s (below every measured figure, so an
  unmeasured pair is never mistaken for a fast one); ~30% of the GPUs held by background
  work; jobs of 2-16 nodes' worth of one-GPU workers (16-128 GPUs).
Jobs are placed and held; while more than a threshold share of the GPUs is held the oldest
jobs are released, so the cluster stays busy and fragmented while jobs keep coming. The
policies take the stream job by job in turn (rotating who goes first), each on its own copy.

Only the policy call is timed. Prints a table per cluster, then, as the last line, one JSON
object; "like for like" figures are over the jobs every policy placed (the same jobs), and
bottleneck means over those every policy put on two or more nodes (one node has no network
link). The headline keys: placements_per_s, p50/p99_ms (ours, over every place() call of
both streams); measured_*bottleneck_gbps_mean (measured cluster, like for like);
*nodes_spanned_mean (both clusters, like for like).

The actor part (the default; --no-actor skips it; it runs last, on a private local Ray
instance) starts a live SchedulerActor with synthetic_nodes=True, loads the declared
cluster's reports (report_many; no background reservations, so only the callers' own jobs
are held) and has 4 concurrent callers each submit a job then release it, through Ray, GCS
persistence included: actor_placements_per_s = jobs placed / wall time.

    python -m scripts.bench_placement [--nodes 10000] [--jobs 2000] [--seed 0] [--no-actor]
                                      [--actor-jobs 1000] [--profile N]
    python -m scripts.bench_placement --dead-nodes 20000 [--seed 0]

--dead-nodes N runs, instead, the scheduler core (SchedulerCore itself) on DEAD_RUN_LIVE_NODES
live nodes of the declared cluster and N that joined and died, told as the live actor tells it
(ray_nodes, then tick): Ray lists the last 1,000 dead, the others it no longer lists go silent
and then count as dead. Two hours on, it times tick, ray_nodes and submit+release
(DEAD_RUN_PASSES a round, DEAD_RUN_ROUNDS rounds alternating which goes first,
scripts/rounds.py) with the retention as shipped (DEAD_NODE_RETENTION_S, 1 h: the dead nodes
are forgotten) against an infinite one (dead nodes kept, as before 2026-12-07), prints the
ratio per operation and, as
the last line, one JSON object: tick_ms_kept / _forgotten / tick_speedup, submit_ms_kept /
_forgotten / submit_speedup (kept / forgotten, median of the rounds' ratios, spread beside),
the same for ray_nodes (Ray's unchanged view told again, the call before each tick),
nodes_held_after (with the retention) and nodes_held_kept.

--nodes is at most 100,000 (orchestrator.cluster_model.MAX_SERVERS, the simulator's bound),
--jobs at most 1,000,000 (scripts.gen_constrained_trace.MAX_JOBS), --actor-jobs at most --jobs
(default 1,000, or --jobs where fewer).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from orchestrator.cluster_model import MAX_SERVERS
from orchestrator.config import JobSpec
from orchestrator.inventory import (GIB, LABEL_NETWORK_GBPS, LABEL_NETWORK_GROUP, ClusterState,
                                    GpuInfo, NodeReport, Reservation)
from orchestrator.placement import Placement, bottleneck_gbps
from orchestrator.policies import best_fit, first_fit
from orchestrator.policies import live_place as ours
from orchestrator.scheduler_core import DEAD_NODE_RETENTION_S, SchedulerCore
from orchestrator.scheduler_types import SchedulerSettings
from orchestrator.validation import strict_int
from scripts.flags import require, require_at_least
from scripts.gen_constrained_trace import MAX_JOBS
from scripts.rounds import paired_rounds

NOW = 1_000.0
TARGET_PLACEMENTS_PER_S = 1_000.0
TARGET_P99_MS = 10.0
TARGET_ACTOR_PLACEMENTS_PER_S = 200.0
TARGET_BESTFIT_BANDWIDTH_RATIO = 2.0
POLICIES: dict[str, Callable[..., Placement | None]] = {
    "ours": ours, "first-fit": first_fit, "best-fit": best_fit}
CPUS_PER_BACKGROUND_GPU = 4

# -- the declared cluster -------------------------------------------------------------------------
# name, share of racks, GPU name, GPUs, GPU memory GiB, Ray CPUs, RAM GiB, rack GB/s
NODE_TYPES = (
    ("a100", 0.25, "NVIDIA A100-SXM4-80GB", 8, 80.0, 96, 1024, 25.0),
    ("h100", 0.15, "NVIDIA H100 80GB HBM3", 8, 80.0, 96, 2048, 50.0),
    ("t4", 0.20, "Tesla T4", 4, 15.0, 48, 192, 3.125),
    ("v100", 0.20, "Tesla V100-SXM2-32GB", 8, 32.0, 64, 512, 12.5),
    ("cpu", 0.20, "", 0, 0.0, 32, 128, 3.125),
)
DECLARED_INTER_GROUP_GBPS = 1.25
JOB_SIZES = (1, 2, 4, 8, 16, 32, 64)  # one-GPU workers per job
JOB_SIZE_P = (0.30, 0.18, 0.17, 0.17, 0.09, 0.06, 0.03)
CPUS_PER_WORKER = (4.0, 6.0, 8.0)
CPUS_PER_WORKER_P = (0.7, 0.2, 0.1)
ACCELERATORS = ((), ("A100",), ("H100",), ("A100", "H100"), ("V100",))
ACCELERATORS_P = (0.65, 0.12, 0.10, 0.05, 0.08)
MIN_GPU_MEMORY = (0.0, 20.0, 40.0)  # 20 excludes T4; 40 excludes T4 and V100
MIN_GPU_MEMORY_P = (0.7, 0.15, 0.15)
DECLARED_HOLD = 0.40  # release the oldest jobs while more than this share of GPUs is held

# -- the measured cluster -------------------------------------------------------------------------
RACK_SIZE = 16
GPUS_PER_NODE = 8
INTRA_RACK_GBPS = (10.0, 25.0)
CROSS_RACK_GBPS = (1.0, 3.0)
CROSS_RACK_PEERS = 8  # random nodes of other racks each agent measured
MEASURED_INTER_GROUP_GBPS = 1.0
NODES_WORTH = (2, 3, 4, 6, 8, 12, 16)  # job sizes, in nodes' worth of GPUs
NODES_WORTH_P = (0.25, 0.15, 0.20, 0.12, 0.12, 0.08, 0.08)
MEASURED_HOLD = 0.60


@dataclass
class Cluster:
    """A synthetic cluster and its job stream: everything needed to build identical copies."""

    name: str
    reports: list[NodeReport]
    background: list[Reservation]
    rack_of: dict[str, str]  # node id -> rack (the measured cluster declares none)
    inter_group_gbps: float
    hold: float  # release the oldest jobs while more than this share of GPUs is held
    jobs: list[JobSpec]
    total_gpus: int = 0
    info: dict = field(default_factory=dict)

    def fresh_state(self) -> ClusterState:
        state = ClusterState(inter_group_gbps=self.inter_group_gbps)
        for report in self.reports:
            state.update(report, now=NOW)
        for r in self.background:
            state.reserve(r.job_name, [r])
        return state


def _gpus(rng, node_id: str, gpu_name: str, n_gpus: int, mem_gib: float) -> tuple[int, tuple]:
    """(GPUs busy with background work, the node's GpuInfos): ~55% of GPU nodes idle, ~15%
    full, ~30% partly used. Busy GPUs have little memory free; idle ones nearly all."""
    busy = 0
    if n_gpus:
        u = rng.random()
        busy = 0 if u < 0.55 else n_gpus if u < 0.70 else int(rng.integers(1, n_gpus))
    gpus = tuple(GpuInfo(index=i, name=gpu_name, memory_total_bytes=int(mem_gib * GIB),
                         memory_free_bytes=int((float(rng.uniform(0.5, 0.35 * mem_gib)) if i < busy
                                                else mem_gib - float(rng.uniform(0.3, 1.0))) * GIB),
                         utilization_pct=float(rng.uniform(60, 100)) if i < busy else 0.0,
                         uuid=f"GPU-{node_id}-{i}")
                 for i in range(n_gpus))
    return busy, gpus


def _report(rng, node_id: str, cpus: int, ram_gib: int, busy: int, gpus: tuple, labels=None,
            bandwidth=None) -> NodeReport:
    busy_share = busy / len(gpus) if gpus else float(rng.uniform(0, 0.5))
    return NodeReport(
        node_id=node_id, hostname=node_id, ray_cpus=float(cpus), ray_gpus=float(len(gpus)),
        cpu_count=cpus, load_avg_1m=cpus * min(1.0, busy_share * 0.9 + float(rng.uniform(0, 0.1))),
        ram_total_bytes=ram_gib * GIB,
        ram_available_bytes=int(ram_gib * GIB * (1 - 0.6 * busy_share)),
        gpus=gpus, labels=labels or {}, bandwidth_gbps=bandwidth or {})


def _background(node_id: str, busy: int) -> Reservation:
    return Reservation(f"background/{node_id}", node_id, busy * CPUS_PER_BACKGROUND_GPU, busy)


def declared_cluster(n_nodes: int, n_jobs: int, seed: int) -> Cluster:
    """The heterogeneous cluster, racks declared by labels and listed in rack order."""
    rng = np.random.default_rng([seed, 0])
    shares = np.array([t[1] for t in NODE_TYPES])
    reports, background, rack_of = [], [], {}
    per_type = {t[0]: 0 for t in NODE_TYPES}
    rack = 0
    while len(reports) < n_nodes:
        kind = int(rng.choice(len(NODE_TYPES), p=shares))
        name, _, gpu_name, n_gpus, mem_gib, cpus, ram_gib, gbps = NODE_TYPES[kind]
        rack_name = f"rack-{rack:04d}"
        for i in range(min(int(rng.integers(16, 33)), n_nodes - len(reports))):
            node_id = f"{name}-r{rack:04d}-n{i:02d}"
            busy, gpus = _gpus(rng, node_id, gpu_name, n_gpus, mem_gib)
            reports.append(_report(rng, node_id, cpus, ram_gib, busy, gpus, labels={
                LABEL_NETWORK_GROUP: rack_name, LABEL_NETWORK_GBPS: str(gbps)}))
            background += [_background(node_id, busy)] if busy else []
            rack_of[node_id] = rack_name
            per_type[name] += 1
        rack += 1
    cluster = Cluster("declared", reports, background, rack_of, DECLARED_INTER_GROUP_GBPS,
                      DECLARED_HOLD, declared_jobs(n_jobs, seed))
    cluster.total_gpus = sum(len(r.gpus) for r in reports)
    cluster.info = {"racks": rack, "per_type": per_type}
    return cluster


def declared_jobs(n_jobs: int, seed: int) -> list[JobSpec]:
    rng = np.random.default_rng([seed, 1])
    sizes = rng.choice(JOB_SIZES, size=n_jobs, p=JOB_SIZE_P)
    cpus = rng.choice(CPUS_PER_WORKER, size=n_jobs, p=CPUS_PER_WORKER_P)
    accel = rng.choice(len(ACCELERATORS), size=n_jobs, p=ACCELERATORS_P)
    memory = rng.choice(MIN_GPU_MEMORY, size=n_jobs, p=MIN_GPU_MEMORY_P)
    # No impossible asks: a V100 has 32 GB, so V100-only jobs ask at most 20 GB free.
    v100_only = np.array([ACCELERATORS[a] == ("V100",) for a in accel], dtype=bool)
    memory = np.where(v100_only, np.minimum(memory, 20.0), memory)
    return [JobSpec(f"job-{i:05d}", num_workers=int(sizes[i]), cpus_per_worker=float(cpus[i]),
                    gpus_per_worker=1, min_gpu_memory_gb=float(memory[i]),
                    accelerator_types=ACCELERATORS[int(accel[i])])
            for i in range(n_jobs)]


def measured_cluster(n_nodes: int, n_jobs: int, seed: int) -> Cluster:
    """8-GPU nodes in racks of RACK_SIZE, no labels: only the agents' measurements (to their
    rack-mates and to CROSS_RACK_PEERS random nodes elsewhere) say where the racks are."""
    rng = np.random.default_rng([seed, 2])
    ids = [f"r{i // RACK_SIZE:04d}-n{i % RACK_SIZE:02d}" for i in range(n_nodes)]
    reports, background = [], []
    for i, node_id in enumerate(ids):
        rack = i // RACK_SIZE
        mates = [j for j in range(rack * RACK_SIZE, min((rack + 1) * RACK_SIZE, n_nodes)) if j != i]
        others = rng.integers(0, n_nodes, size=CROSS_RACK_PEERS * 2)
        others = [int(j) for j in dict.fromkeys(others.tolist())
                  if j // RACK_SIZE != rack][:CROSS_RACK_PEERS]
        # Each agent measures its own direction; a pair counts at the slower of the two.
        bandwidth = {ids[j]: float(g)
                     for j, g in zip(mates, rng.uniform(*INTRA_RACK_GBPS, len(mates)))}
        bandwidth.update({ids[j]: float(g)
                          for j, g in zip(others, rng.uniform(*CROSS_RACK_GBPS, len(others)))})
        busy, gpus = _gpus(rng, node_id, "NVIDIA A100-SXM4-80GB", GPUS_PER_NODE, 80.0)
        reports.append(_report(rng, node_id, 96, 1024, busy, gpus, bandwidth=bandwidth))
        background += [_background(node_id, busy)] if busy else []
    jobs_rng = np.random.default_rng([seed, 3])
    worth = jobs_rng.choice(NODES_WORTH, size=n_jobs, p=NODES_WORTH_P)
    jobs = [JobSpec(f"job-{i:05d}", num_workers=int(w) * GPUS_PER_NODE, cpus_per_worker=4.0,
                    gpus_per_worker=1) for i, w in enumerate(worth)]
    cluster = Cluster("measured", reports, background,
                      {n: n.split("-")[0] for n in ids}, MEASURED_INTER_GROUP_GBPS,
                      MEASURED_HOLD, jobs)
    cluster.total_gpus = GPUS_PER_NODE * n_nodes
    cluster.info = {"racks": -(-n_nodes // RACK_SIZE)}
    return cluster


# -- running a stream -----------------------------------------------------------------------------

@dataclass
class Placed:
    nodes: int
    racks: int
    bottleneck: float  # inf for a single node


class Stream:
    """One policy's run of a cluster's job stream, on its own fresh copy of the cluster: each
    job is placed, held, and the oldest released while too many GPUs are held."""

    def __init__(self, policy: str, cluster: Cluster, warmup: int = 5) -> None:
        self.call = POLICIES[policy]
        self.cluster = cluster
        self.state = cluster.fresh_state()
        for spec in cluster.jobs[:warmup]:  # warm caches; nothing is reserved
            self.call(JobSpec(**{**spec.to_dict(), "name": f"warmup/{spec.name}"}),
                      self.state, NOW)
        self.held: deque[tuple[str, int]] = deque()
        self.held_gpus = sum(r.gpus for r in cluster.background)
        self.latency_ms: list[float] = []
        self.placed: dict[str, Placed] = {}

    def step(self, spec: JobSpec) -> None:
        """Place one job (only the policy's call is timed) and hold it."""
        state, cluster = self.state, self.cluster
        start = time.perf_counter()
        placement = self.call(spec, state, NOW)
        self.latency_ms.append((time.perf_counter() - start) * 1e3)
        if placement is None:
            return
        assert len(placement.worker_nodes) == spec.num_workers, spec.name
        self.placed[spec.name] = Placed(len(placement.nodes),
                                        len({cluster.rack_of[n] for n in placement.nodes}),
                                        bottleneck_gbps(state, placement.nodes))
        state.reserve(spec.name, placement.reservations())
        self.held.append((spec.name, spec.total_gpus))
        self.held_gpus += spec.total_gpus
        while self.held and self.held_gpus > cluster.hold * cluster.total_gpus:
            name, gpus = self.held.popleft()
            state.release(name)
            self.held_gpus -= gpus

    def result(self) -> dict:
        return {"latency_ms": np.array(self.latency_ms), "placed": self.placed,
                "held_gpu_fraction_end": self.held_gpus / max(self.cluster.total_gpus, 1)}


def run_streams(cluster: Cluster) -> dict[str, dict]:
    """Every policy on the same stream, alternating job by job (in a rotating order), so a
    machine busier at one moment than another weighs on all policies alike."""
    streams = {policy: Stream(policy, cluster) for policy in POLICIES}
    # The clusters' long-lived state out of the cyclic collector's view, as the live
    # scheduler does after a bulk load (SchedulerActor.report_many): otherwise a full pass
    # over three 10,000-node copies lands inside some policy's timed call.
    gc.collect()
    gc.freeze()
    order = list(streams.values())
    for i, spec in enumerate(cluster.jobs):
        for stream in order[i % len(order):] + order[:i % len(order)]:
            stream.step(spec)
    return {policy: stream.result() for policy, stream in streams.items()}


def _mean(values) -> float | None:
    values = list(values)
    return float(np.mean(values)) if values else None


def summarise(runs: dict[str, dict], jobs: list[JobSpec]) -> dict[str, dict]:
    """Per policy: speed over all calls; spans and bandwidth over all it placed, and over the
    jobs every policy placed (like for like: the same jobs, so the same sizes)."""
    names = [j.name for j in jobs]
    common = [n for n in names if all(n in run["placed"] for run in runs.values())]
    out = {}
    for policy, run in runs.items():
        placed, lat = run["placed"], run["latency_ms"]
        multi = [p for p in placed.values() if p.nodes > 1]
        both = [placed[n] for n in common]
        total_s = lat.sum() / 1e3
        out[policy] = {
            "placed": len(placed), "rejected": len(jobs) - len(placed),
            "placements_per_s": len(placed) / total_s if total_s else 0.0,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "max_ms": float(lat.max()),
            "nodes_spanned_mean": _mean(p.nodes for p in placed.values()),
            "multinode_jobs": len(multi),
            "cross_rack_jobs": sum(p.racks > 1 for p in placed.values()),
            "bottleneck_gbps_mean_multinode": _mean(p.bottleneck for p in multi),
            "like_for_like_jobs": len(common),
            "nodes_spanned_mean_common": _mean(p.nodes for p in both),
            "cross_rack_jobs_common": sum(p.racks > 1 for p in both),
            # Over the common jobs placed on several nodes by every policy (a single node has
            # no network link: its bottleneck is infinite and would swamp a mean).
            "bottleneck_gbps_mean_common": _mean(
                placed[n].bottleneck for n in common
                if all(run_["placed"][n].nodes > 1 for run_ in runs.values())),
            "held_gpu_fraction_end": run["held_gpu_fraction_end"],
            "_latency_ms": lat,
        }
    return out


ROWS = (("placed", "placed"), ("rejected", "rejected"), ("placements/s", "placements_per_s"),
        ("p50 ms", "p50_ms"), ("p99 ms", "p99_ms"), ("max ms", "max_ms"),
        ("nodes spanned (mean, all placed)", "nodes_spanned_mean"),
        ("multi-node jobs", "multinode_jobs"), ("  of which cross-rack", "cross_rack_jobs"),
        ("bottleneck GB/s (multi-node mean)", "bottleneck_gbps_mean_multinode"),
        ("like for like: jobs all placed", "like_for_like_jobs"),
        ("  nodes spanned (mean)", "nodes_spanned_mean_common"),
        ("  cross-rack jobs", "cross_rack_jobs_common"),
        ("  bottleneck GB/s (all on 2+ nodes)", "bottleneck_gbps_mean_common"))


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"
    return f"{value:,}"


def print_table(cluster: Cluster, by_policy: dict[str, dict]) -> None:
    jobs = cluster.jobs
    print(f"\n[{cluster.name}] {len(cluster.reports):,} nodes in {cluster.info['racks']:,} racks "
          f"(listed in rack order), {cluster.total_gpus:,} GPUs, "
          f"{sum(r.gpus for r in cluster.background):,} held by background work; "
          f"inter_group_gbps {cluster.inter_group_gbps:g}; {len(jobs):,} jobs asking "
          f"{sum(j.total_gpus for j in jobs):,} GPUs, oldest released while > "
          f"{cluster.hold:.0%} of GPUs are held")
    print(f"{'':38}" + "".join(f"{p:>12}" for p in by_policy))
    for label, key in ROWS:
        print(f"{label:38}" + "".join(f"{_fmt(m[key]):>12}" for m in by_policy.values()))


# -- the live actor -------------------------------------------------------------------------------

def actor_placements_per_s(cluster: Cluster, n_jobs: int, callers: int = 4) -> dict:
    """Placements per second through a live SchedulerActor on the cluster's nodes (reported
    as synthetic nodes): `callers` threads each submit a job then release it, through Ray."""
    import threading

    import ray

    from ray_layer.scheduler_actor import SchedulerActor

    # A private local instance ("local"), not a cluster this machine may already run.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        # Heartbeats never come again: keep the nodes healthy for the whole run.
        scheduler = SchedulerActor.options(name="bench-placement-scheduler",
                                           namespace="bench-placement").remote(
            synthetic_nodes=True, suspect_after_s=3600.0, dead_after_s=7200.0)
        start = time.perf_counter()
        taken = sum(ray.get([scheduler.report_many.remote(cluster.reports[i:i + 1000])
                             for i in range(0, len(cluster.reports), 1000)]))
        load_s = time.perf_counter() - start
        jobs = cluster.jobs[:n_jobs]
        outcomes: list[str] = []

        def caller(k: int) -> None:
            for spec in jobs[k::callers]:
                decision = ray.get(scheduler.submit.remote(spec, "bench"))
                outcomes.append(type(decision).__name__)
                ray.get(scheduler.release.remote(spec.name, "bench"))

        threads = [threading.Thread(target=caller, args=(k,)) for k in range(callers)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
    finally:
        ray.shutdown()
    placed = outcomes.count("Placement")
    return {"actor_placements_per_s": placed / wall, "actor_jobs": len(outcomes),
            "actor_placed": placed, "actor_nodes_reported": taken,
            "actor_load_s": load_s, "actor_callers": callers}


# -- dead nodes -----------------------------------------------------------------------------------

DEAD_RUN_LIVE_NODES = 200  # the live cluster beside the dead nodes
RAY_DEAD_LISTED = 1_000  # Ray's GCS lists its last maximum_gcs_dead_node_cached_count dead nodes
DEAD_RUN_ROUNDS = 7
DEAD_RUN_PASSES = 20  # ticks, and submit+release pairs, per side and round
DEAD_RUN_JOB = JobSpec("bench-dead", num_workers=4, cpus_per_worker=4.0, gpus_per_worker=1)


class DeadNodesCore:
    """A SchedulerCore on a cluster of which all but `live` nodes joined and died, told as the
    live actor tells it (SchedulerActor.maintain: ray_nodes, then tick): Ray lists the last
    RAY_DEAD_LISTED to die as dead and no longer lists the others, which go silent past
    dead_after_s and are then dead by Ray's word. Then it passes `after_s` on."""

    def __init__(self, reports: list[NodeReport], live: int, retention_s: float,
                 after_s: float) -> None:
        self.core = core = SchedulerCore(SchedulerSettings(), dead_node_retention_s=retention_s)
        self.live = reports[-live:]
        dead = [r.node_id for r in reports[:-live]]
        live_ids = {r.node_id for r in self.live}
        listed = set(dead[-RAY_DEAD_LISTED:])
        now = NOW
        core.ray_nodes(live_ids | set(dead), set(), now)
        for report in reports:
            core.report(report, now)
        core.tick(now)
        now += core.settings.dead_after_s + 1  # the unlisted ones go silent...
        for _ in range(2):  # ...then Ray's word on them counts
            self.now = now
            self.maintain(live_ids, listed)
            now += 5.0
        self.now += after_s
        self.live_ids, self.listed = live_ids, listed
        self.maintain(live_ids, listed)
        self.jobs = 0
        if math.isinf(retention_s):  # (every death counted, none by silence alone)
            assert len(core.state.dead) == len(dead) and not core.state.silent

    def maintain(self, alive: set[str], dead: set[str]) -> None:
        for report in self.live:
            self.core.report(report, self.now)
        self.core.ray_nodes(alive, dead, self.now)
        self.core.tick(self.now)

    def ticks(self, passes: int) -> None:
        for _ in range(passes):
            self.now += 0.01
            self.core.tick(self.now)

    def ray_nodes(self, passes: int) -> None:
        """Ray's view told again, unchanged (the maintenance pass's call before tick)."""
        for _ in range(passes):
            self.now += 0.01
            self.core.ray_nodes(self.live_ids, self.listed, self.now)

    def submits(self, passes: int) -> None:
        for _ in range(passes):
            self.jobs += 1
            spec = JobSpec(**{**DEAD_RUN_JOB.to_dict(), "name": f"bench-dead-{self.jobs}"})
            decision = self.core.submit(spec, "bench", self.now).decision
            assert isinstance(decision, Placement), decision
            self.core.release(spec.name, "bench", self.now)

    def held(self) -> int:
        """Nodes the core still holds: reports and node-table rows (the same, or it says)."""
        state = self.core.state
        assert len(state.reports) == len(state.table.ids), (len(state.reports), len(state.table))
        return len(state.reports)


def dead_nodes_run(dead: int, seed: int, live: int = DEAD_RUN_LIVE_NODES,
                   rounds: int = DEAD_RUN_ROUNDS, passes: int = DEAD_RUN_PASSES,
                   quiet: bool = False) -> dict:
    """The scheduler core with `dead` dead nodes known, two hours after they died: the
    retention as shipped (DEAD_NODE_RETENTION_S: forgotten) against an infinite one (the
    behaviour before 2026-12-07: kept), in rounds that alternate which goes first; ratios
    are the median of the rounds' own (scripts/rounds.py)."""
    wall = time.perf_counter()
    reports = declared_cluster(dead + live, 1, seed).reports  # the first `dead` died
    after_s = 2 * DEAD_NODE_RETENTION_S
    kept = DeadNodesCore(reports, live, math.inf, after_s)
    forgotten = DeadNodesCore(reports, live, DEAD_NODE_RETENTION_S, after_s)
    gc.collect()
    gc.freeze()  # (as run_streams: the cores' long-lived state out of the collector's view)
    result = {"dead_nodes": dead, "live_nodes": live,
              "ray_dead_listed": min(dead, RAY_DEAD_LISTED),
              "seed": seed, "rounds": rounds, "passes_per_round": passes,
              "after_s": after_s, "retention_s": DEAD_NODE_RETENTION_S}
    for name, op in (("tick", DeadNodesCore.ticks), ("ray_nodes", DeadNodesCore.ray_nodes),
                     ("submit", DeadNodesCore.submits)):
        r = paired_rounds(lambda: op(kept, passes), lambda: op(forgotten, passes), rounds)
        result.update({f"{name}_ms_kept": r["first_s"] / passes * 1e3,
                       f"{name}_ms_forgotten": r["second_s"] / passes * 1e3,
                       f"{name}_speedup": r["ratio"], f"{name}_speedup_spread": r["spread"]})
        if not quiet:
            print(f"{name}{' + release' if name == 'submit' else ''}: "
                  f"{result[f'{name}_ms_kept']:.3f} ms with the dead nodes kept, "
                  f"{result[f'{name}_ms_forgotten']:.3f} ms forgotten: "
                  f"{r['ratio']:.1f}x (rounds {r['spread'][0]:.1f}-{r['spread'][1]:.1f}x)")
    result.update({"nodes_held_after": forgotten.held(), "nodes_held_kept": kept.held(),
                   "wall_s": time.perf_counter() - wall})
    if not quiet:
        print(f"nodes held {after_s / 3600:g} h after the deaths: {result['nodes_held_kept']:,} "
              f"kept, {result['nodes_held_after']:,} with the retention ({live:,} live)")
    return result


# -- main -----------------------------------------------------------------------------------------

def profile_place(cluster: Cluster, calls: int) -> None:
    """cProfile `calls` place() calls of the cluster's stream (held as in the benchmark)."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    stream = Stream("ours", cluster)
    for spec in cluster.jobs[:calls]:
        profiler.runcall(stream.step, spec)
    print(f"\ncProfile of {calls} jobs of the {cluster.name} stream with place() "
          "(top 15 cumulative):", file=sys.stderr)
    pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(15)


def run(nodes: int, jobs: int, seed: int, actor: bool = True, actor_jobs: int = 1_000,
        profile: int = 0, quiet: bool = False) -> dict:
    wall = time.perf_counter()
    clusters = [declared_cluster(nodes, jobs, seed), measured_cluster(nodes, jobs, seed)]
    results = {}
    for cluster in clusters:
        results[cluster.name] = summarise(run_streams(cluster), cluster.jobs)
        if not quiet:
            print_table(cluster, results[cluster.name])
    declared, measured = results["declared"], results["measured"]
    latency = np.concatenate([declared["ours"]["_latency_ms"], measured["ours"]["_latency_ms"]])
    placed = declared["ours"]["placed"] + measured["ours"]["placed"]
    # Nodes spanned summed over the jobs every policy placed (none on a small run: no mean).
    spans = {p: [(results[c][p]["nodes_spanned_mean_common"] or 0)
                 * results[c][p]["like_for_like_jobs"] for c in results] for p in POLICIES}
    common_jobs = sum(results[c]["ours"]["like_for_like_jobs"] for c in results)

    def spanned(policy: str) -> float | None:
        return sum(spans[policy]) / common_jobs if common_jobs else None

    result = {
        "nodes": nodes, "jobs_per_cluster": jobs, "seed": seed,
        # Ours, pure place(), over every call of both streams (10,000 nodes by default).
        "placements_per_s": placed / (latency.sum() / 1e3),
        "p50_ms": float(np.percentile(latency, 50)), "p99_ms": float(np.percentile(latency, 99)),
        "max_ms": float(latency.max()),
        # The measured cluster, over the jobs every policy placed (all multi-node).
        "measured_bottleneck_gbps_mean": measured["ours"]["bottleneck_gbps_mean_common"],
        "measured_bestfit_bottleneck_gbps_mean":
            measured["best-fit"]["bottleneck_gbps_mean_common"],
        "measured_firstfit_bottleneck_gbps_mean":
            measured["first-fit"]["bottleneck_gbps_mean_common"],
        # Both clusters, over the jobs every policy placed.
        "nodes_spanned_mean": spanned("ours"),
        "firstfit_nodes_spanned_mean": spanned("first-fit"),
        "bestfit_nodes_spanned_mean": spanned("best-fit"),
        "like_for_like_jobs": common_jobs,
    }
    for cluster_name, by_policy in results.items():
        for policy, m in by_policy.items():
            prefix = f"{cluster_name}_{policy.replace('-', '')}_"
            result.update({prefix + k: v for k, v in m.items() if not k.startswith("_")})
    result["actor_placements_per_s"] = None
    if actor:
        result.update(actor_placements_per_s(clusters[0], actor_jobs))
    result.update(targets(result))
    if profile:
        profile_place(clusters[1], profile)
    result["wall_s"] = time.perf_counter() - wall
    return result


def targets(r: dict) -> dict:
    """Each target met (True/False; None where not measured: no actor run, or no job that
    every policy placed on a small run)."""
    def at_least(a, b, factor: float = 1.0) -> bool | None:
        return None if a is None or b is None else bool(a >= factor * b)

    nodes, firstfit_nodes = r["nodes_spanned_mean"], r["firstfit_nodes_spanned_mean"]
    return {
        "meets_placements_per_s": bool(r["placements_per_s"] >= TARGET_PLACEMENTS_PER_S),
        "meets_p99_ms": bool(r["p99_ms"] <= TARGET_P99_MS),
        "meets_actor_placements_per_s": at_least(r["actor_placements_per_s"],
                                                 TARGET_ACTOR_PLACEMENTS_PER_S),
        "meets_bandwidth_vs_bestfit": at_least(r["measured_bottleneck_gbps_mean"],
                                               r["measured_bestfit_bottleneck_gbps_mean"],
                                               TARGET_BESTFIT_BANDWIDTH_RATIO),
        "meets_bandwidth_vs_firstfit": at_least(r["measured_bottleneck_gbps_mean"],
                                                r["measured_firstfit_bottleneck_gbps_mean"]),
        "meets_fewer_nodes_than_firstfit": None if nodes is None or firstfit_nodes is None
        else bool(nodes < firstfit_nodes),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=strict_int, default=10_000,
                        help=f"nodes of each cluster ({RACK_SIZE} to {MAX_SERVERS:,})")
    parser.add_argument("--jobs", type=strict_int, default=2_000,
                        help=f"jobs per cluster's stream (at most {MAX_JOBS:,})")
    parser.add_argument("--seed", type=strict_int, default=0)
    parser.add_argument("--no-actor", action="store_true",
                        help="skip the live SchedulerActor part (needs Ray)")
    parser.add_argument("--actor-jobs", type=strict_int, default=None,
                        help="the declared stream's first jobs placed through the actor "
                             "(default: 1,000, or --jobs where fewer; at most --jobs)")
    parser.add_argument("--profile", type=strict_int, default=0, metavar="N",
                        help="also cProfile N jobs of the measured stream, to stderr "
                             "(at most --jobs)")
    parser.add_argument("--dead-nodes", type=strict_int, default=0, metavar="N",
                        help=f"instead of the placement run: the scheduler core's tick and "
                             f"submit+release with N dead nodes known beside "
                             f"{DEAD_RUN_LIVE_NODES} live ones, 2 h after the deaths, the "
                             f"retention as shipped against dead nodes kept (only --seed "
                             f"applies; at most {MAX_SERVERS:,})")
    args = parser.parse_args(argv)
    if args.dead_nodes:
        require(parser, args, ("dead_nodes",), lambda n: 0 < n <= MAX_SERVERS,
                f"must be 1 to {MAX_SERVERS} (0: the placement run)")
        require_at_least(parser, args, 0, "seed")
        result = dead_nodes_run(args.dead_nodes, args.seed)
        print(json.dumps(result))
        return result
    if args.nodes < RACK_SIZE or args.jobs < 1:
        parser.error(f"--nodes must be >= {RACK_SIZE} and --jobs >= 1")
    if args.actor_jobs is None:
        args.actor_jobs = min(1_000, args.jobs)
    if args.actor_jobs < 1 or args.profile < 0:  # (negative: jobs[:-5] ran, said nothing)
        parser.error("--actor-jobs must be >= 1 and --profile >= 0")
    # (more than the stream: the actor placed the stream's jobs only, and actor_jobs said so
    # in the JSON alone; no bound on --nodes: 100,000,000 built until memory ran out)
    require(parser, args, ("actor_jobs",), lambda n: n <= args.jobs,
            f"must be <= --jobs ({args.jobs}): the actor places the declared stream's first jobs")
    # (more: the stream's jobs profiled, under a header naming the number asked)
    require(parser, args, ("profile",), lambda n: n <= args.jobs,
            f"must be <= --jobs ({args.jobs}): it profiles the measured stream's first jobs")
    require(parser, args, ("nodes",), lambda n: n <= MAX_SERVERS,
            f"must be <= {MAX_SERVERS} (the simulator's --cluster bound)")
    require(parser, args, ("jobs",), lambda n: n <= MAX_JOBS,
            f"must be <= {MAX_JOBS} (scripts.gen_constrained_trace's --jobs bound)")
    require_at_least(parser, args, 0, "seed")  # numpy's default_rng takes no negative seed
    result = run(args.nodes, args.jobs, args.seed, actor=not args.no_actor,
                 actor_jobs=args.actor_jobs, profile=args.profile)
    print(f"\nours, place() over both streams: {result['placements_per_s']:,.0f} placements/s, "
          f"p99 {result['p99_ms']:.2f} ms; measured cluster, like for like: bottleneck "
          f"{_fmt(result['measured_bottleneck_gbps_mean'])} GB/s vs best-fit "
          f"{_fmt(result['measured_bestfit_bottleneck_gbps_mean'])}, first-fit "
          f"{_fmt(result['measured_firstfit_bottleneck_gbps_mean'])}; nodes spanned (both, like "
          f"for like) {_fmt(result['nodes_spanned_mean'])} vs first-fit "
          f"{_fmt(result['firstfit_nodes_spanned_mean'])}; actor "
          f"{_fmt(result['actor_placements_per_s'])} placements/s; wall {result['wall_s']:.1f}s")
    missed = [k for k, v in result.items() if k.startswith("meets_") and v is False]
    print("targets: " + ("all met" if not missed else "MISSED " + ", ".join(missed)))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
