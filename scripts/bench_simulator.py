#!/usr/bin/env python
"""Benchmark: replay a fixed slice of the Philly trace under every policy of the simulator.

The slice (defaults): the bundled data/philly.csv sorted by submit time, jobs 20,000-29,999
(2017-10-10 .. 2017-10-16, past the trace's quiet first weeks), replayed on the simulator's
default cluster "v100:8x48,p100:8x48,k80:4x64;rack=16" (384 V100 + 384 P100 + 256 K80 =
1,024 GPUs, 160 servers, racks of 16 servers at 12.5 GB/s, 1.25 GB/s between racks) with
inter-arrival times divided by 3 (--load-scale 3), so that the cluster is saturated for days:
jobs queue for most of an hour on average under every policy.

Prints the simulator's summary table, then, as the last line, one JSON object with, per policy,
mean_jct_s, p99_jct_s, allocation_rate, goodput_utilization, makespan_s (and a few more), and
ours_vs_fifo_mean_jct_speedup (FIFO first-fit's mean JCT / ours).

    python -m scripts.bench_simulator [--start 20000] [--jobs 10000] [--load-scale 3]
                                      [--cluster SPEC] [--seed 0] [--out DIR]

No Ray: pure simulation, runs in the unit tier's sandbox.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from orchestrator.policies import POLICY_NAMES
from orchestrator.simulator import (SimResult, format_summary, simulate, write_jobs_csv,
                                    write_plots)
from orchestrator.traces import PHILLY_CSV, TraceJob, load_philly, prepare

DEFAULT_CLUSTER = "v100:8x48,p100:8x48,k80:4x64;rack=16"
TARGET_SPEEDUP = 1.5
TARGET_ALLOCATION = 0.92
KEYS = ("mean_jct_s", "median_jct_s", "p99_jct_s", "mean_queue_s", "allocation_rate",
        "allocation_rate_while_queued", "goodput_utilization", "makespan_s", "jobs_finished", "jobs_never_fit",
        "multi_rack_jobs", "preemptions", "migrations", "decisions_per_s", "wall_s")


def philly_slice(start: int, jobs: int, load_scale: float, path: Path = PHILLY_CSV):
    ordered = prepare(load_philly(path))
    chunk = ordered[start:start + jobs]
    return prepare(chunk, load_scale=load_scale)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--start", type=int, default=20_000)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--load-scale", type=float, default=3.0)
    parser.add_argument("--cluster", default=DEFAULT_CLUSTER)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policies", default=",".join(POLICY_NAMES))
    parser.add_argument("--out", help="also write jobs.csv and plots here")
    args = parser.parse_args(argv)

    trace = philly_slice(args.start, args.jobs, args.load_scale)
    results, figures = compare(trace, args.cluster, args.policies.split(","), args.seed)
    print(f"Philly jobs {args.start:,}..{args.start + len(trace) - 1:,} by submit time, "
          f"load scale {args.load_scale:g}, cluster {args.cluster!r}")
    print(format_summary(results))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_jobs_csv(results, out / "jobs.csv")
        write_plots(results, results[0].metrics["cluster_gpus"], out)
    summary = {"trace": "philly", "start": args.start, "jobs": len(trace),
               "load_scale": args.load_scale, "cluster": args.cluster, "seed": args.seed,
               **figures}
    print(json.dumps(summary))
    return summary


def compare(trace: list[TraceJob], cluster: str, policies=POLICY_NAMES,
            seed: int = 0) -> tuple[list[SimResult], dict]:
    """Replay `trace` on `cluster` under each policy: the results, and the benchmark's
    figures: per policy the KEYS metrics, and ours' (and gavel's) mean-JCT speedup over FIFO
    first-fit (FIFO's mean JCT / theirs: above 1 when theirs finishes jobs sooner)."""
    results = []
    for name in policies:
        t0 = time.perf_counter()
        results.append(simulate(trace, cluster, name, seed=seed))
        print(f"[{name}] {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    by = {r.policy: {k: r.metrics.get(k) for k in KEYS} for r in results}
    figures: dict = {"policies": by}
    if "ours" in by and "fifo" in by and by["ours"]["mean_jct_s"]:
        speedup = by["fifo"]["mean_jct_s"] / by["ours"]["mean_jct_s"]
        figures["ours_vs_fifo_mean_jct_speedup"] = round(speedup, 3)
        figures["meets_target_speedup"] = speedup >= TARGET_SPEEDUP
        figures["meets_target_allocation"] = (by["ours"]["allocation_rate_while_queued"]
                                               or 0) >= TARGET_ALLOCATION
    if "gavel" in by and "fifo" in by and by["gavel"]["mean_jct_s"]:
        figures["gavel_vs_fifo_mean_jct_speedup"] = round(
            by["fifo"]["mean_jct_s"] / by["gavel"]["mean_jct_s"], 3)
    return results, figures


if __name__ == "__main__":
    main()
