#!/usr/bin/env python
"""Benchmark: every scheduling policy of the simulator on two traces, through one core.

1. **Philly slice**: the bundled data/philly.csv sorted by submit time, jobs 20,000-29,999
   (2017-10-10 .. 2017-10-15, past the trace's quiet first weeks), on
   "v100:8x48,p100:8x48,k80:4x64;rack=16" (1,024 GPUs) with inter-arrival times divided by 3
   (--load-scale 3): the cluster is saturated for days.
2. **Constrained trace**: scripts/gen_constrained_trace.py's seeded heterogeneous trace (8,000
   jobs; a third allowed one family only, 5% gang jobs of 8 GPUs allowed only the scarce
   A100s, offered load 0.95) on its four-family cluster, at the trace's load under every
   policy, and at 0.5x and 2x the load (--sweep) under FIFO first-fit and hetero-las (those
   of them --policies names; none: no sweep).
3. **Full Philly** (--sections full): the whole trace (82,247 jobs, load scale 1) under every
   policy, timed: the figure is the wall time of all the replays together. Replays are
   independent and single-threaded, so they run in --processes processes (default: one per
   core).

Prints each section's summary table, then, as the last line, one JSON object:
    {"philly": {"speedup_vs_fifo", "speedup_vs_gavel", "speedup_vs_tiresias", "p99_vs_gavel",
                "usable_gpus_busy_while_waiting", "policies": {...}, ...},
     "constrained": {the same, "sweep": {"0.5": {"speedup_vs_fifo", ...}, ...}, ...},
     "full_philly": {the same, "wall_s", ...}}
Speedups are the baseline's mean JCT / hetero-las'; p99_vs_gavel is Gavel-style p99 JCT /
hetero-las'; usable_gpus_busy_while_waiting is hetero-las'.

    python -m scripts.bench_simulator [--sections philly,constrained,full] [--out DIR]
                                      [--processes N] [--restart-s S --yield-s S --notice-s S]
                                      [--published-baselines]

--restart-s, --yield-s and --notice-s replace the modelled GPU-job restart (docs/simulator.md)
to see how the policies compare at another; the JSON's "restart" names the one used.
--published-baselines runs fifo, random, bestfit and tiresias without the core's migration to
faster GPU types, as their papers' schedulers (the JSON's "published_baselines" says which).

No Ray: pure simulation.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from orchestrator.policies import POLICY_NAMES
from orchestrator.simulator import (RestartCost, SimResult, add_published_baselines_argument,
                                    add_restart_arguments,
                                    format_summary, out_dir, restart_cost, simulate,
                                    write_jobs_csv, write_plots)
from orchestrator.traces import PHILLY_CSV, TraceError, TraceJob, load_philly, prepare
from orchestrator.validation import strict_float, strict_int
from scripts import gen_constrained_trace

DEFAULT_CLUSTER = "v100:8x48,p100:8x48,k80:4x64;rack=16"
OURS = "hetero-las"
SWEEP = (0.5, 1.0, 2.0)
SWEEP_POLICIES = ("fifo", OURS)
KEYS = ("mean_jct_s", "p50_jct_s", "p99_jct_s", "mean_wait_s", "mean_first_start_delay_s",
        "makespan_s",
        "usable_gpus_busy_while_waiting", "allocation_rate", "allocation_rate_while_queued",
        "gpu_time_efficiency", "jobs_finished", "jobs_never_fit", "never_fit_reasons",
        "preemptions", "migrations", "preemptions_per_job", "migrations_per_job",
        "restart_overhead", "multi_rack_jobs", "decisions_per_s", "wall_s")


def philly_slice(start: int, jobs: int, load_scale: float, path: Path = PHILLY_CSV):
    ordered = prepare(load_philly(path))
    chunk = ordered[start:start + jobs]
    if not chunk:  # a benchmark of no jobs would print figures of nothing
        # A TraceError: main() makes it a usage error (exit 2), as every other bad flag is.
        raise TraceError(f"--start {start}: the trace has {len(ordered):,} jobs (0 to "
                         f"{len(ordered) - 1:,})")
    return prepare(chunk, load_scale=load_scale)


# Replay time per policy on the full trace, longest first (measured, 22f57c0): processes
# take the longest replays first, so the last one to finish starts early.
LONGEST_FIRST = ("random", "bestfit", "tiresias", "fifo", "hetero-las", "gavel")


def run_policies(trace: list[TraceJob], cluster: str, policies, seed: int = 0,
                 label: str = "", processes: int = 1,
                 restart: RestartCost = RestartCost(),
                 published: bool = False) -> list[SimResult]:
    """One replay per policy, in `processes` processes (each replay is single-threaded and
    independent: on N cores up to N run at once); results in the order of `policies`."""
    def ranked(name: str) -> int:
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    if processes <= 1 or len(policies) <= 1:
        return [_timed_replay(trace, cluster, name, seed, label, restart, published)
                for name in policies]
    with ProcessPoolExecutor(min(processes, len(policies))) as pool:
        futures = {name: pool.submit(_timed_replay, trace, cluster, name, seed, label, restart,
                                     published)
                   for name in sorted(policies, key=ranked)}
        return [futures[name].result() for name in policies]


def _timed_replay(trace: list[TraceJob], cluster: str, name: str, seed: int,
                  label: str, restart: RestartCost = RestartCost(),
                  published: bool = False) -> SimResult:
    t0 = time.perf_counter()
    result = simulate(trace, cluster, name, seed=seed, restart=restart,
                      published_baselines=published)
    print(f"[{label}{name}] {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    return result


def figures(results: list[SimResult]) -> dict:
    """Per policy the KEYS metrics, and hetero-las' ratios against each baseline's mean JCT
    (baseline / ours: above 1 when ours finishes jobs sooner) and Gavel-style p99."""
    by = {r.policy: {k: r.metrics.get(k) for k in KEYS} for r in results}
    out: dict = {}
    ours = by.get(OURS)
    if ours and ours["mean_jct_s"]:
        for base in ("fifo", "gavel", "tiresias"):
            if base in by and by[base]["mean_jct_s"]:
                out[f"speedup_vs_{base}"] = round(by[base]["mean_jct_s"] / ours["mean_jct_s"], 3)
        if "gavel" in by and by["gavel"]["p99_jct_s"] and ours["p99_jct_s"]:
            out["p99_vs_gavel"] = round(by["gavel"]["p99_jct_s"] / ours["p99_jct_s"], 3)
        out["usable_gpus_busy_while_waiting"] = ours["usable_gpus_busy_while_waiting"]
    out["policies"] = by
    return out


def philly_section(args, trace: list[TraceJob]) -> tuple[dict, list[SimResult]]:
    results = run_policies(trace, DEFAULT_CLUSTER, args.policies, args.seed, "philly ",
                           args.processes, restart_cost(args), args.published_baselines)
    print(f"Philly jobs {args.start:,}..{args.start + len(trace) - 1:,} by submit time, load "
          f"scale {args.load_scale:g}, cluster {DEFAULT_CLUSTER!r}")
    print(format_summary(results))
    return {"start": args.start, "jobs": len(trace), "load_scale": args.load_scale,
            "cluster": DEFAULT_CLUSTER, **figures(results)}, results


def constrained_traces(args) -> tuple[list[TraceJob], dict[float, list[TraceJob]]]:
    """The constrained trace, and it at each --sweep scale but 1 (when the sweep runs)."""
    trace = prepare(gen_constrained_trace.generate(seed=args.trace_seed))
    sweep = args.sweep if any(p in args.policies for p in SWEEP_POLICIES) else ()
    return trace, {scale: prepare(trace, load_scale=scale) for scale in sweep if scale != 1.0}


def constrained_section(args, traces) -> tuple[dict, list[SimResult]]:
    trace, swept_traces = traces
    cluster = gen_constrained_trace.CONSTRAINED_CLUSTER
    results = run_policies(trace, cluster, args.policies, args.seed, "constrained ",
                           args.processes, restart_cost(args), args.published_baselines)
    print(f"\nConstrained trace (scripts/gen_constrained_trace.py, seed {args.trace_seed}): "
          f"{len(trace):,} jobs, cluster {cluster!r}")
    print(format_summary(results))
    section = {"trace_seed": args.trace_seed, "jobs": len(trace), "cluster": cluster,
               **figures(results), "sweep": {}}
    sweep_policies = [p for p in SWEEP_POLICIES if p in args.policies]  # those asked for
    for scale in args.sweep if sweep_policies else ():
        if scale == 1.0:
            swept = [r for r in results if r.policy in sweep_policies]
        else:
            swept = run_policies(swept_traces[scale], cluster, sweep_policies,
                                 args.seed, f"constrained x{scale:g} ", args.processes,
                                 restart_cost(args), args.published_baselines)
            print(f"\nConstrained trace at {scale:g}x its load")
            print(format_summary(swept))
        ratios = figures(swept)
        section["sweep"][f"{scale:g}"] = {
            "speedup_vs_fifo": ratios.get("speedup_vs_fifo"),
            "usable_gpus_busy_while_waiting": ratios.get("usable_gpus_busy_while_waiting"),
            "mean_jct_s": {p: m["mean_jct_s"] for p, m in ratios["policies"].items()}}
    return section, results


def full_philly_section(args, trace: list[TraceJob]) -> tuple[dict, list[SimResult]]:
    t0 = time.perf_counter()
    results = run_policies(trace, DEFAULT_CLUSTER, args.policies, args.seed, "full ",
                           args.processes, restart_cost(args), args.published_baselines)
    wall = time.perf_counter() - t0
    print(f"\nFull Philly trace: {len(trace):,} jobs at load scale 1, all policies in "
          f"{wall:.0f}s ({args.processes} process(es))")
    print(format_summary(results))
    return {"jobs": len(trace), "wall_s": round(wall, 1), "processes": args.processes,
            **figures(results)}, results


SECTIONS = ("philly", "constrained", "full")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"which of {', '.join(SECTIONS)} to run")
    parser.add_argument("--start", type=strict_int, default=20_000)
    parser.add_argument("--jobs", type=strict_int, default=10_000)
    parser.add_argument("--load-scale", type=strict_float, default=3.0)
    parser.add_argument("--trace-seed", type=strict_int, default=gen_constrained_trace.DEFAULT_SEED)
    parser.add_argument("--sweep", type=load_scales, default=",".join(f"{s:g}" for s in SWEEP),
                        help="load scales of the constrained trace's sweep")
    parser.add_argument("--seed", type=strict_int, default=0, help="seed of the random policy")
    parser.add_argument("--policies", default=",".join(POLICY_NAMES))
    parser.add_argument("--out", help="also write jobs.csv and plots per section here")
    parser.add_argument("--processes", type=strict_int, default=os.cpu_count() or 1,
                        help="replays run at once, one per process (default: one per core)")
    add_restart_arguments(parser)
    add_published_baselines_argument(parser)
    args = parser.parse_args(argv)
    for problem in argument_problems(args):
        parser.error(problem)  # the first, before any replay runs
    args.policies = names(args.policies)
    sections = set(names(args.sections))
    summary: dict = {"restart": dataclasses.asdict(restart_cost(args)),
                     "published_baselines": args.published_baselines}
    # Every trace is built before any replay runs: a --load-scale or --sweep scale that spreads
    # arrivals past 31 years (traces.prepare) is refused at once, not after other replays.
    try:
        traces = {name: build() for name, build in (
            ("philly", lambda: philly_slice(args.start, args.jobs, args.load_scale)),
            ("constrained", lambda: constrained_traces(args)),
            ("full", lambda: prepare(load_philly(PHILLY_CSV)))) if name in sections}
    except TraceError as e:
        parser.error(str(e))
    for name, key, run in (("philly", "philly", philly_section),
                           ("constrained", "constrained", constrained_section),
                           ("full", "full_philly", full_philly_section)):
        if name in sections:
            summary[key], results = run(args, traces[name])
            if args.out:
                write_outputs(results, Path(args.out) / name)
    print(json.dumps(summary))
    return summary


def names(text: str) -> list[str]:
    """The names of a comma-separated flag (--sections, --policies), without their spaces;
    empty ones (a trailing comma) skipped, as --sweep's are, and each once (`--policies
    fifo,fifo` replayed FIFO twice and printed its row twice)."""
    return list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))


def load_scales(text: str) -> list[float]:
    """--sweep's argparse type: its comma-separated load scales, each read as every number
    flag is (validation.strict_float: float() took `1_0` as 10 and `\u0662` as 2) and > 0
    (nan, inf and 0 spread no arrivals); empty ones skipped and spaces around each dropped,
    as --policies' are, and each once (`--sweep 2,2` replayed 2x once, as a policy named
    twice is)."""
    scales = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        scale = strict_float(item)  # ArgumentTypeError: "'1_0' is not a number (...)"
        if not (math.isfinite(scale) and scale > 0):
            raise argparse.ArgumentTypeError(f"{item!r} is not a load scale > 0")
        scales.append(scale)
    return list(dict.fromkeys(scales))


def argument_problems(args) -> list[str]:
    """What is wrong with the flags, each naming its flag; checked before any replay runs (a
    bad policy name failed only when its replay came, after the others had run)."""
    problems = []
    if args.processes < 1:
        problems.append(f"--processes must be >= 1, got {args.processes}")
    for flag, given, known, what in (("--sections", args.sections, SECTIONS, "section"),
                                     ("--policies", args.policies, POLICY_NAMES, "policy")):
        unknown = [name for name in dict.fromkeys(names(given)) if name not in known]
        if not names(given):
            problems.append(f"{flag} names no {what}: give one or more of {', '.join(known)}, "
                            "separated by commas")
        elif unknown:
            problems.append(f"{flag}: unknown {', '.join(unknown)}; use {', '.join(known)}")
    if not (math.isfinite(args.load_scale) and args.load_scale > 0):
        problems.append(f"--load-scale must be a number > 0, got {args.load_scale:g}")
    if args.start < 0 or args.jobs < 1:
        problems.append(f"--start must be >= 0 and --jobs >= 1, got {args.start}, {args.jobs}")
    if args.seed < 0:
        problems.append(f"--seed must be >= 0, got {args.seed}")
    if restart_cost(args).problem():
        problems.append(restart_cost(args).problem())
    if args.trace_seed < 0:  # numpy's default_rng takes no negative seed
        problems.append(f"--trace-seed must be >= 0, got {args.trace_seed}")
    if args.out is not None:  # else found only when the first section's replays are done
        args.out, problem = out_dir(args.out)  # (~ read as home: write_outputs uses it)
        if problem:
            problems.append(problem)
    return problems


def write_outputs(results: list[SimResult], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_jobs_csv(results, out / "jobs.csv")
    write_plots(results, results[0].metrics["cluster_gpus"], out)


if __name__ == "__main__":
    main()
