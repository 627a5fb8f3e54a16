#!/usr/bin/env python
"""Benchmark of orchestrator.placement.place() against a naive first-fit, on a synthetic cluster.

A heterogeneous inventory (8xA100-80GB, 8xH100, 4xT4, 8xV100 and CPU-only nodes, in racks of
16-32 nodes of one type, each rack a network group with a bandwidth tier) with ~30% of its GPUs
held by background work, and a stream of GPU jobs of 1-64 workers (most small). Each job is
placed, then held (reserved); once the GPUs held pass a threshold the oldest jobs are released,
so the cluster stays busy and fragmented while jobs keep fitting. The same stream is run by
both policies, each on its own copy of the same inventory.

Only the place() call is timed. Prints a short table, then, as the last line, one JSON object.

    python scripts/bench_placement.py [--nodes 10000] [--jobs 1000] [--seed 0] [--profile 200]

No Ray: this is pure placement logic, and runs in the unit tier's sandbox.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import deque
from itertools import combinations
from pathlib import Path

import numpy as np

try:
    import orchestrator  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.config import JobSpec
from orchestrator.inventory import (GIB, LABEL_NETWORK_GBPS, LABEL_NETWORK_GROUP, ClusterState,
                                    GpuInfo, NodeReport, Reservation)
from orchestrator.placement import PlacementError, place, worker_capacity

NOW = 1_000.0
TARGET_PLACEMENTS_PER_S = 1_000.0
TARGET_P99_MS = 10.0

# name, share of racks, GPU name, GPUs, GPU memory GiB, Ray CPUs, RAM GiB, rack GB/s
NODE_TYPES = (
    ("a100", 0.25, "NVIDIA A100-SXM4-80GB", 8, 80.0, 96, 1024, 25.0),
    ("h100", 0.15, "NVIDIA H100 80GB HBM3", 8, 80.0, 96, 2048, 50.0),
    ("t4", 0.20, "Tesla T4", 4, 15.0, 48, 192, 3.125),
    ("v100", 0.20, "Tesla V100-SXM2-32GB", 8, 32.0, 64, 512, 12.5),
    ("cpu", 0.20, "", 0, 0.0, 32, 128, 3.125),
)
CPUS_PER_BACKGROUND_GPU = 4

# Job stream: GPUs per job (one GPU per worker) and how often each size comes.
JOB_SIZES = (1, 2, 4, 8, 16, 32, 64)
JOB_SIZE_P = (0.30, 0.18, 0.17, 0.17, 0.09, 0.06, 0.03)
CPUS_PER_WORKER = (4.0, 6.0, 8.0)
CPUS_PER_WORKER_P = (0.7, 0.2, 0.1)
ACCELERATORS = ((), ("A100",), ("H100",), ("A100", "H100"), ("V100",))
ACCELERATORS_P = (0.65, 0.12, 0.10, 0.05, 0.08)
MIN_GPU_MEMORY = (0.0, 20.0, 40.0)  # 20 excludes T4; 40 excludes T4 and V100
MIN_GPU_MEMORY_P = (0.7, 0.15, 0.15)
HOLD_THRESHOLD = 0.40  # release the oldest jobs while more than this share of GPUs is held


# -- the synthetic cluster ------------------------------------------------------------------------

def build_cluster(n_nodes: int, seed: int) -> tuple[ClusterState, dict]:
    """A fresh ClusterState of `n_nodes` nodes, the same for the same seed."""
    rng = np.random.default_rng([seed, 0])
    shares = np.array([t[1] for t in NODE_TYPES])
    specs = []  # (node_id, type index, rack name)
    rack = 0
    while len(specs) < n_nodes:
        kind = int(rng.choice(len(NODE_TYPES), p=shares))
        size = min(int(rng.integers(16, 33)), n_nodes - len(specs))
        name = NODE_TYPES[kind][0]
        specs += [(f"{name}-r{rack:04d}-n{i:02d}", kind, f"rack-{rack:04d}") for i in range(size)]
        rack += 1
    order = rng.permutation(len(specs))  # interleave racks: table order is not rack order

    state = ClusterState()  # inter_group_gbps left at its default (1.25 GB/s)
    background: list[tuple[str, int]] = []  # (node id, GPUs held by background work)
    per_type = {t[0]: 0 for t in NODE_TYPES}
    total_gpus = 0
    for idx in order:
        node_id, kind, rack_name = specs[idx]
        name, _, gpu_name, n_gpus, mem_gib, cpus, ram_gib, gbps = NODE_TYPES[kind]
        per_type[name] += 1
        total_gpus += n_gpus
        # Background work: ~55% of GPU nodes idle, ~15% full, ~30% partly used (~30% of GPUs).
        busy = 0
        if n_gpus:
            u = rng.random()
            busy = 0 if u < 0.55 else n_gpus if u < 0.70 else int(rng.integers(1, n_gpus))
        gpus = []
        for i in range(n_gpus):
            if i < busy:  # busy GPUs have little memory free
                free = float(rng.uniform(0.5, 0.35 * mem_gib))
            else:  # idle: the driver and context hold a little
                free = mem_gib - float(rng.uniform(0.3, 1.0))
            gpus.append(GpuInfo(index=i, name=gpu_name, memory_total_bytes=int(mem_gib * GIB),
                                memory_free_bytes=int(free * GIB),
                                utilization_pct=float(rng.uniform(60, 100)) if i < busy else 0.0,
                                uuid=f"GPU-{node_id}-{i}"))
        busy_share = busy / n_gpus if n_gpus else float(rng.uniform(0, 0.5))
        load = cpus * min(1.0, busy_share * 0.9 + float(rng.uniform(0, 0.1)))
        report = NodeReport(
            node_id=node_id, hostname=node_id, ray_cpus=float(cpus), ray_gpus=float(n_gpus),
            cpu_count=cpus, load_avg_1m=load, ram_total_bytes=ram_gib * GIB,
            ram_available_bytes=int(ram_gib * GIB * (1 - 0.6 * busy_share)), gpus=tuple(gpus),
            labels={LABEL_NETWORK_GROUP: rack_name, LABEL_NETWORK_GBPS: str(gbps)})
        state.update(report, now=NOW)
        if busy:
            background.append((node_id, busy))
    background_gpus = 0
    for node_id, busy in background:
        state.reserve(f"background/{node_id}", [Reservation(
            f"background/{node_id}", node_id, busy * CPUS_PER_BACKGROUND_GPU, busy)])
        background_gpus += busy
    info = {"racks": rack, "per_type": per_type, "total_gpus": total_gpus,
            "background_gpus": background_gpus}
    return state, info


def job_stream(n_jobs: int, seed: int) -> list[JobSpec]:
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


# -- the policies ---------------------------------------------------------------------------------

def bottleneck_gbps(state: ClusterState, node_ids: list[str]) -> float:
    """Slowest link between any two of the nodes (inf for one node: no network crossed)."""
    if len(node_ids) < 2:
        return math.inf
    return min(state.pair_bandwidth_gbps(a, b) for a, b in combinations(node_ids, 2))


def first_fit(spec: JobSpec, state: ClusterState, now: float) -> list[str]:
    """Naive baseline: walk the nodes in table order, taking every free slot until the job's
    workers are covered. Returns the node id of each worker; raises ValueError if none fits."""
    capacity = worker_capacity(spec, state, now)
    covered = np.cumsum(capacity)
    if len(covered) == 0 or covered[-1] < spec.num_workers:
        raise ValueError(f"first-fit: no room for job '{spec.name}'")
    last = int(np.searchsorted(covered, spec.num_workers))  # first row covering the job
    ids = state.table.ids
    workers: list[str] = []
    for row in np.flatnonzero(capacity[:last + 1]):
        workers += [ids[row]] * min(int(capacity[row]), spec.num_workers - len(workers))
    return workers


def reservations_of(spec: JobSpec, workers: list[str]) -> list[Reservation]:
    per_node: dict[str, int] = {}
    for node_id in workers:
        per_node[node_id] = per_node.get(node_id, 0) + 1
    return [Reservation(spec.name, node_id, count * spec.cpus_per_worker,
                        count * spec.gpus_per_worker) for node_id, count in per_node.items()]


def _ours(spec: JobSpec, state: ClusterState) -> list[str]:
    return list(place(spec, state, NOW, explain=False).worker_nodes)


def _baseline(spec: JobSpec, state: ClusterState) -> list[str]:
    return first_fit(spec, state, NOW)


POLICIES = {"ours": (_ours, (PlacementError,)), "baseline": (_baseline, (ValueError,))}


def run_stream(policy: str, jobs: list[JobSpec], state: ClusterState, total_gpus: int,
               background_gpus: int, warmup: int = 5) -> dict:
    """Place, hold and release the job stream with one policy; time only the policy call."""
    call, refused = POLICIES[policy]
    for spec in jobs[:warmup]:  # warm caches and numpy; nothing is reserved
        try:
            call(JobSpec(**{**spec.to_dict(), "name": f"warmup/{spec.name}"}), state)
        except refused:
            pass
    held: deque[tuple[str, int]] = deque()
    held_gpus = background_gpus
    latency_ms, placed_ms, rejected_ms = [], [], []
    spans, bottlenecks, groups_spanned, placed_names = [], [], [], {}
    rejected = 0
    for spec in jobs:
        start = time.perf_counter()
        try:
            workers = call(spec, state)
        except refused:
            ms = (time.perf_counter() - start) * 1e3
            latency_ms.append(ms)
            rejected_ms.append(ms)
            rejected += 1
            continue
        ms = (time.perf_counter() - start) * 1e3
        latency_ms.append(ms)
        placed_ms.append(ms)
        nodes = list(dict.fromkeys(workers))
        assert len(workers) == spec.num_workers, (policy, spec.name, workers)
        spans.append(len(nodes))
        placed_names[spec.name] = len(nodes)
        if len(nodes) > 1:
            bottlenecks.append(bottleneck_gbps(state, nodes))
            groups_spanned.append(len({state.table.group_of(n) for n in nodes}))
        state.reserve(spec.name, reservations_of(spec, workers))
        held.append((spec.name, spec.total_gpus))
        held_gpus += spec.total_gpus
        while held and held_gpus > HOLD_THRESHOLD * total_gpus:
            name, gpus = held.popleft()
            state.release(name)
            held_gpus -= gpus
    total_s = sum(latency_ms) / 1e3
    lat = np.array(latency_ms)
    return {
        "placed": len(placed_ms), "rejected": rejected,
        "time_in_place_s": total_s,
        "placements_per_s": len(placed_ms) / total_s if total_s else 0.0,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else 0.0,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else 0.0,
        "max_ms": float(lat.max()) if len(lat) else 0.0,
        "placed_p50_ms": float(np.percentile(placed_ms, 50)) if placed_ms else 0.0,
        "placed_p99_ms": float(np.percentile(placed_ms, 99)) if placed_ms else 0.0,
        "rejected_mean_ms": float(np.mean(rejected_ms)) if rejected_ms else 0.0,
        "nodes_spanned_mean": float(np.mean(spans)) if spans else 0.0,
        "multinode_jobs": len(bottlenecks),
        "bottleneck_gbps_mean_multinode": float(np.mean(bottlenecks)) if bottlenecks else None,
        "bottleneck_gbps_min_multinode": float(np.min(bottlenecks)) if bottlenecks else None,
        "cross_group_jobs": sum(g > 1 for g in groups_spanned),
        "held_gpu_fraction_end": held_gpus / total_gpus if total_gpus else 0.0,
        "_spans": placed_names,
    }


# -- reporting ------------------------------------------------------------------------------------

def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"
    return f"{value:,}"


def profile_place(n_nodes: int, n_jobs: int, seed: int, calls: int) -> None:
    """cProfile `calls` place() calls of the stream (held as in the benchmark) to stderr."""
    import cProfile
    import pstats

    state, info = build_cluster(n_nodes, seed)
    jobs = job_stream(max(n_jobs, calls), seed)[:calls]
    profiler = cProfile.Profile()
    held_gpus = info["background_gpus"]
    held: deque[tuple[str, int]] = deque()
    for spec in jobs:
        profiler.enable()
        try:
            placement = place(spec, state, NOW, explain=False)
        except PlacementError:
            profiler.disable()
            continue
        profiler.disable()
        state.reserve(spec.name, placement.reservations())
        held.append((spec.name, spec.total_gpus))
        held_gpus += spec.total_gpus
        while held and held_gpus > HOLD_THRESHOLD * info["total_gpus"]:
            name, gpus = held.popleft()
            state.release(name)
            held_gpus -= gpus
    print(f"\ncProfile of {calls} place() calls at {n_nodes} nodes (top 15 cumulative):",
          file=sys.stderr)
    pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(15)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--jobs", type=int, default=1_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also cProfile N place() calls, printed to stderr")
    args = parser.parse_args(argv)
    if args.nodes < 1 or args.jobs < 1:
        parser.error("--nodes and --jobs must be >= 1")
    wall = time.perf_counter()

    jobs = job_stream(args.jobs, args.seed)
    results, build_s = {}, {}
    for policy in ("ours", "baseline"):
        start = time.perf_counter()
        state, info = build_cluster(args.nodes, args.seed)  # a fresh, identical copy each
        build_s[policy] = time.perf_counter() - start
        results[policy] = run_stream(policy, jobs, state, info["total_gpus"],
                                     info["background_gpus"])
    ours, base = results["ours"], results["baseline"]
    ours_spans, base_spans = ours.pop("_spans"), base.pop("_spans")
    both = sorted(ours_spans.keys() & base_spans.keys())

    types = ", ".join(f"{n} {k}" for k, n in info["per_type"].items())
    gpu_jobs = sum(j.total_gpus for j in jobs)
    print(f"inventory: {args.nodes:,} nodes in {info['racks']:,} racks ({types}); "
          f"{info['total_gpus']:,} GPUs, {info['background_gpus']:,} "
          f"({info['background_gpus'] / max(info['total_gpus'], 1):.0%}) held by background work")
    print(f"stream: {args.jobs:,} jobs asking {gpu_jobs:,} GPUs in all (seed {args.seed}); "
          f"oldest released while > {HOLD_THRESHOLD:.0%} of GPUs are held")
    rows = [("placed", "placed"), ("rejected", "rejected"),
            ("placements/s", "placements_per_s"), ("p50 ms", "p50_ms"), ("p99 ms", "p99_ms"),
            ("max ms", "max_ms"), ("nodes spanned (mean)", "nodes_spanned_mean"),
            ("multi-node jobs", "multinode_jobs"), ("  of which cross-rack", "cross_group_jobs"),
            ("bottleneck GB/s (multi-node mean)", "bottleneck_gbps_mean_multinode"),
            ("bottleneck GB/s (multi-node min)", "bottleneck_gbps_min_multinode")]
    print(f"{'':36}{'place()':>14}{'first-fit':>14}")
    for label, key in rows:
        print(f"{label:36}{_fmt(ours[key]):>14}{_fmt(base[key]):>14}")

    result = {
        "nodes": args.nodes, "jobs": args.jobs, "seed": args.seed,
        "racks": info["racks"], "gpus": info["total_gpus"],
        "background_gpus": info["background_gpus"],
        "placed": ours["placed"], "rejected": ours["rejected"],
        "placements_per_s": ours["placements_per_s"],
        "p50_ms": ours["p50_ms"], "p99_ms": ours["p99_ms"], "max_ms": ours["max_ms"],
        "placed_p50_ms": ours["placed_p50_ms"], "placed_p99_ms": ours["placed_p99_ms"], "rejected_mean_ms": ours["rejected_mean_ms"],
        "time_in_place_s": ours["time_in_place_s"],
        "baseline_placed": base["placed"], "baseline_rejected": base["rejected"],
        "baseline_placements_per_s": base["placements_per_s"],
        "baseline_p99_ms": base["p99_ms"],
        "ours_nodes_spanned_mean": ours["nodes_spanned_mean"],
        "baseline_nodes_spanned_mean": base["nodes_spanned_mean"],
        # Over jobs both policies placed, so the comparison is like for like.
        "jobs_placed_by_both": len(both),
        "ours_nodes_spanned_mean_both": float(np.mean([ours_spans[j] for j in both]))
        if both else None,
        "baseline_nodes_spanned_mean_both": float(np.mean([base_spans[j] for j in both]))
        if both else None,
        "ours_multinode_jobs": ours["multinode_jobs"],
        "baseline_multinode_jobs": base["multinode_jobs"],
        "ours_cross_rack_jobs": ours["cross_group_jobs"],
        "baseline_cross_rack_jobs": base["cross_group_jobs"],
        # Bottlenecks are over multi-node jobs only: a single-node job crosses no network.
        "ours_bottleneck_gbps_mean": ours["bottleneck_gbps_mean_multinode"],
        "baseline_bottleneck_gbps_mean": base["bottleneck_gbps_mean_multinode"],
        "ours_bottleneck_gbps_mean_multinode": ours["bottleneck_gbps_mean_multinode"],
        "baseline_bottleneck_gbps_mean_multinode": base["bottleneck_gbps_mean_multinode"],
        "ours_bottleneck_gbps_min_multinode": ours["bottleneck_gbps_min_multinode"],
        "baseline_bottleneck_gbps_min_multinode": base["bottleneck_gbps_min_multinode"],
        "held_gpu_fraction_end": ours["held_gpu_fraction_end"],
        "hold_threshold": HOLD_THRESHOLD,
        "build_s": build_s["ours"],
    }
    meets_rate = ours["placements_per_s"] >= TARGET_PLACEMENTS_PER_S
    meets_p99 = ours["p99_ms"] <= TARGET_P99_MS
    result.update({
        "meets_target_placements_per_s": meets_rate,
        "meets_target_p99_ms": meets_p99,
        "meets_target": meets_rate and meets_p99,
        "fewer_nodes_than_baseline":
            ours["nodes_spanned_mean"] < base["nodes_spanned_mean"],
        "higher_bottleneck_than_baseline": (
            None if result["ours_bottleneck_gbps_mean"] is None
            or result["baseline_bottleneck_gbps_mean"] is None
            else result["ours_bottleneck_gbps_mean"] > result["baseline_bottleneck_gbps_mean"]),
    })
    if args.profile:
        profile_place(args.nodes, args.jobs, args.seed, args.profile)
    result["wall_s"] = time.perf_counter() - wall
    print(f"target >= {TARGET_PLACEMENTS_PER_S:,.0f} placements/s and p99 <= "
          f"{TARGET_P99_MS:g} ms: {'met' if result['meets_target'] else 'MISSED'}; "
          f"wall {result['wall_s']:.1f}s")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
