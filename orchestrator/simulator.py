"""Trace-driven, discrete-event replay of a job trace on a modelled cluster.

Every placement goes through a policy (orchestrator/policies.py); the policy "ours" is
orchestrator.placement.place() on an orchestrator.inventory.ClusterState — the code the live
scheduler runs. Resources are held with state.reserve() and given back with state.release(),
never by touching the NodeTable. Time in the ClusterState is a constant (SIM_NOW) and heartbeat
limits are infinite, so no modelled server ever goes stale; simulated time lives here.

Scheduling: events are arrivals (in submit order) and completions (a heap). After all events of
one instant, one pass over the FIFO queue places jobs in order; a job that does not fit is
passed over and later ones may start (backfill without reservation), until `backfill` + 1 jobs
(default 16 + 1) have been passed over in this pass: then the pass ends. `backfill=0` is strict
FIFO (the pass ends at the first job that does not fit).
A job needing more GPUs than are free (of its allowed type) is skipped without calling the
policy. Jobs that can never fit (more GPUs than the cluster has of the allowed types) are
counted as `never_fits`, not queued.

Metrics (per policy):
- allocation_rate = sum(GPUs x runtime) / (cluster GPUs x makespan)
- allocation_rate_while_queued = GPUs allocated / cluster GPUs, time-averaged over the periods
  when at least one job waits (the allocation rate at saturating load; the long tail of a
  trace, when a few long jobs run alone, drags the makespan-wide figure down)
- goodput_utilization = sum(GPUs x runtime x achieved/ideal speed) / (cluster GPUs x makespan),
  ideal = consolidated throughput on the fastest GPU type in the cluster (cluster_model)
- JCT = finish - submit (mean, median, p99), queueing delay = start - submit (mean),
  makespan = last finish - first submit, jobs finished, decisions/s = policy calls / seconds
  spent inside the policy.
"""
from __future__ import annotations

import csv
import heapq
import json
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from orchestrator.cluster_model import (FAMILY_TO_TYPE, GPU_TYPES, REFERENCE_GPU, ClusterSpec,
                                        build_state, consolidated_throughput, model_for,
                                        parse_cluster_spec, throughput)
from orchestrator.config import JobSpec
from orchestrator.policies import POLICY_NAMES, make_policy
from orchestrator.traces import TraceJob

SIM_NOW = 0.0  # the ClusterState's clock: constant, see the module docstring
DEFAULT_CLUSTER = "v100:8x48,p100:8x48,k80:4x64;rack=16"  # 1,024 GPUs, 160 servers
DEFAULT_BACKFILL = 16

FINISHED, NEVER_FITS = "finished", "never_fits"


@dataclass
class SimJob:
    trace: TraceJob
    model: str
    spec: JobSpec
    ref_throughput: float  # consolidated on REFERENCE_GPU: the speed the trace duration is at
    ideal_throughput: float  # consolidated on the fastest type in the cluster
    status: str = "pending"
    start: float = math.nan
    finish: float = math.nan
    runtime: float = math.nan
    speed_vs_ideal: float = math.nan
    bottleneck_gbps: float = math.nan
    nodes: str = ""  # "node:gpus;node:gpus"
    n_nodes: int = 0
    n_racks: int = 0
    gpu_types: str = ""
    used: dict = field(default_factory=dict)  # gpu type -> GPUs held


@dataclass
class SimResult:
    policy: str
    jobs: list[SimJob]
    timeline_t: np.ndarray
    timeline_alloc: np.ndarray  # GPUs allocated from timeline_t[i] until the next point
    timeline_goodput: np.ndarray  # allocated GPUs weighted by achieved/ideal speed
    timeline_queue: np.ndarray  # jobs waiting
    metrics: dict


def _type_of(node_id: str) -> str:
    return node_id.rsplit("-", 1)[0]


def _families_by_speed(model: str, n: int, present: tuple[str, ...]) -> tuple[str, ...]:
    speed = {f: consolidated_throughput(model, FAMILY_TO_TYPE[f], n) for f in present}
    return tuple(sorted(present, key=lambda f: -speed[f]))


def make_jobs(trace: list[TraceJob], cluster: ClusterSpec) -> list[SimJob]:
    present = tuple(cluster.gpus_by_type())
    jobs = []
    for t in trace:
        model = model_for(t.duration_s, t.num_gpus, t.model_type)
        spec = JobSpec(f"job-{t.job_id}", num_workers=t.num_gpus, cpus_per_worker=1.0,
                       gpus_per_worker=1,
                       accelerator_types=(t.accelerator,) if t.accelerator else ())
        ideal = max(consolidated_throughput(model, k, t.num_gpus) for k in present)
        jobs.append(SimJob(t, model, spec,
                           consolidated_throughput(model, REFERENCE_GPU, t.num_gpus), ideal))
    return jobs


def simulate(trace: list[TraceJob], cluster: ClusterSpec | str, policy: str, *, seed: int = 0,
             backfill: int = DEFAULT_BACKFILL, check: bool = False,
             progress: Callable[[str], None] | None = None,
             progress_every_s: float = 5.0) -> SimResult:
    """Replay `trace` (sorted by submit time, e.g. from traces.prepare) under one policy.

    `check` asserts after every placement that no server holds more GPUs than it has and that
    the reservations add up to the running jobs (conservation)."""
    if isinstance(cluster, str):
        cluster = parse_cluster_spec(cluster)
    jobs = make_jobs(trace, cluster)
    state = build_state(cluster, SIM_NOW)
    by_type = cluster.gpus_by_type()
    total_gpus = cluster.total_gpus
    families = {GPU_TYPES[k].family: k for k in by_type}
    present = tuple(families)
    free_total = total_gpus
    free_by_type = dict(by_type)

    def type_order(job: SimJob) -> tuple[str, ...]:
        allowed = job.spec.accelerator_types or present
        return tuple(f for f in _families_by_speed(job.model, job.trace.num_gpus, present)
                     if f in allowed)

    call = make_policy(policy, seed=seed, type_order=type_order)

    queue: list[int] = []
    completions: list[tuple[float, int]] = []
    arrivals = sorted(range(len(jobs)), key=lambda i: jobs[i].trace.submit_time_s)
    next_arrival = 0
    running_gpus = 0
    running_goodput = 0.0
    decisions, policy_s = 0, 0.0
    tl_t, tl_alloc, tl_good, tl_queue = [], [], [], []
    finished = never = 0
    wall0 = last_progress = time.perf_counter()

    def free_for(job: SimJob) -> int:
        types = job.spec.accelerator_types
        return free_by_type.get(families.get(types[0], ""), 0) if types else free_total

    def start(job: SimJob, placement, now: float) -> None:
        nonlocal free_total, running_gpus, running_goodput
        state.reserve(job.spec.name, placement.reservations())
        per_node = Counter(placement.worker_nodes)
        used: dict[str, int] = {}
        for node, workers in per_node.items():
            k = _type_of(node)
            used[k] = used.get(k, 0) + workers * placement.gpus_per_worker
        n = job.trace.num_gpus
        speed = throughput(job.model, tuple(sorted(used)), n, placement.bottleneck_gbps)
        job.runtime = job.trace.duration_s * job.ref_throughput / speed
        job.start, job.finish = now, now + job.runtime
        job.speed_vs_ideal = speed / job.ideal_throughput
        job.bottleneck_gbps = placement.bottleneck_gbps
        job.used = used
        job.nodes = ";".join(f"{node}:{w * placement.gpus_per_worker}"
                             for node, w in per_node.items())
        job.n_nodes = len(per_node)
        t = state.table
        job.n_racks = len({int(t.group[t.index[node]]) for node in per_node})
        job.gpu_types = "/".join(sorted(used))
        job.status = "running"
        for k, g in used.items():
            free_by_type[k] -= g
        free_total -= n
        running_gpus += n
        running_goodput += n * job.speed_vs_ideal
        heapq.heappush(completions, (job.finish, job.trace.job_id))
        if check:
            rows = len(t)
            assert (t.reserved_gpus[:rows] <= t.gpus[:rows]).all(), "GPU over-committed"
            assert int(t.reserved_gpus[:rows].sum()) == running_gpus, "reservations != running"
            assert all(v >= 0 for v in free_by_type.values()), free_by_type

    while next_arrival < len(arrivals) or completions or queue:
        if not completions and next_arrival >= len(arrivals):
            raise RuntimeError(f"{policy}: {len(queue)} job(s) queued on an idle cluster; "
                               f"first: {jobs[queue[0]].spec}")
        t_arr = jobs[arrivals[next_arrival]].trace.submit_time_s \
            if next_arrival < len(arrivals) else math.inf
        now = min(t_arr, completions[0][0] if completions else math.inf)
        while completions and completions[0][0] <= now:
            _, job_id = heapq.heappop(completions)
            job = jobs[job_id]
            state.release(job.spec.name)
            job.status = FINISHED
            finished += 1
            for k, g in job.used.items():
                free_by_type[k] += g
            free_total += job.trace.num_gpus
            running_gpus -= job.trace.num_gpus
            running_goodput -= job.trace.num_gpus * job.speed_vs_ideal
        while next_arrival < len(arrivals) and \
                jobs[arrivals[next_arrival]].trace.submit_time_s <= now:
            job = jobs[arrivals[next_arrival]]
            next_arrival += 1
            types = job.spec.accelerator_types
            limit = by_type.get(families.get(types[0], ""), 0) if types else total_gpus
            if job.trace.num_gpus > limit:
                job.status = NEVER_FITS
                never += 1
            else:
                queue.append(job.trace.job_id)
        # One FIFO pass with a bounded backfill window.
        i, skipped = 0, 0
        while i < len(queue) and free_total > 0:
            job = jobs[queue[i]]
            placement = None
            if free_for(job) >= job.trace.num_gpus:
                t0 = time.perf_counter()
                placement = call(job.spec, state, SIM_NOW, job)
                policy_s += time.perf_counter() - t0
                decisions += 1
            if placement is None:
                skipped += 1
                if skipped > backfill:
                    break
                i += 1
                continue
            start(job, placement, now)
            del queue[i]
        tl_t.append(now)
        tl_alloc.append(running_gpus)
        tl_good.append(running_goodput)
        tl_queue.append(len(queue))
        if progress is not None and time.perf_counter() - last_progress >= progress_every_s:
            last_progress = time.perf_counter()
            progress(f"[{policy}] {finished + never:,}/{len(jobs):,} jobs done, simulated "
                     f"{now / 86400:.1f} days, {len(queue):,} queued, {running_gpus}/"
                     f"{total_gpus} GPUs busy, {last_progress - wall0:.0f}s")
    timeline = (np.array(tl_t, dtype=float), np.array(tl_alloc, dtype=float),
                np.array(tl_good, dtype=float), np.array(tl_queue, dtype=float))
    metrics = summarize(jobs, total_gpus, decisions, policy_s)
    metrics["allocation_rate_while_queued"] = allocation_while_queued(*timeline[:2],
                                                                      timeline[3], total_gpus)
    metrics["wall_s"] = round(time.perf_counter() - wall0, 3)
    return SimResult(policy, jobs, *timeline, metrics)


def allocation_while_queued(t: np.ndarray, alloc: np.ndarray, queue: np.ndarray,
                            total_gpus: int) -> float | None:
    """Share of the cluster's GPUs allocated, averaged over the time jobs were waiting: the
    allocation rate at saturating load (None if no job ever waited)."""
    if len(t) < 2:
        return None
    dt = np.diff(t)
    waiting = queue[:-1] > 0
    span = float(dt[waiting].sum())
    return float((alloc[:-1] * dt)[waiting].sum() / (span * total_gpus)) if span > 0 else None


def summarize(jobs: list[SimJob], total_gpus: int, decisions: int, policy_s: float) -> dict:
    done = [j for j in jobs if j.status == FINISHED]
    jct = np.array([j.finish - j.trace.submit_time_s for j in done])
    wait = np.array([j.start - j.trace.submit_time_s for j in done])
    gpu_time = sum(j.trace.num_gpus * j.runtime for j in done)
    good_time = sum(j.trace.num_gpus * j.runtime * j.speed_vs_ideal for j in done)
    first = min((j.trace.submit_time_s for j in jobs), default=0.0)
    makespan = max((j.finish for j in done), default=first) - first
    denominator = total_gpus * makespan
    multi = [j for j in done if j.n_nodes > 1]

    def stat(x, f):
        return float(f(x)) if len(x) else None

    return {
        "jobs": len(jobs),
        "jobs_finished": len(done),
        "jobs_never_fit": sum(j.status == NEVER_FITS for j in jobs),
        "cluster_gpus": total_gpus,
        "mean_jct_s": stat(jct, np.mean),
        "median_jct_s": stat(jct, np.median),
        "p99_jct_s": stat(jct, lambda x: np.percentile(x, 99)),
        "mean_queue_s": stat(wait, np.mean),
        "makespan_s": float(makespan),
        "allocation_rate": gpu_time / denominator if denominator > 0 else None,
        "goodput_utilization": good_time / denominator if denominator > 0 else None,
        "mean_speed_vs_ideal": stat(np.array([j.speed_vs_ideal for j in done]), np.mean),
        "multi_server_jobs": len(multi),
        "multi_rack_jobs": sum(j.n_racks > 1 for j in multi),
        "decisions": decisions,
        "policy_s": round(policy_s, 3),
        "decisions_per_s": decisions / policy_s if policy_s > 0 else None,
    }


# -- outputs ----------------------------------------------------------------------------------------

JOB_COLUMNS = ("policy", "job_id", "trace_line", "submit_time_s", "num_gpus", "model_type",
               "accelerator", "status", "start_time_s", "finish_time_s", "jct_s", "queue_s",
               "runtime_s", "duration_ref_s", "speed_vs_ideal", "gpu_types", "n_nodes",
               "n_racks", "bottleneck_gbps", "nodes")


def write_jobs_csv(results: list[SimResult], path: Path) -> None:
    def num(x: float):
        return "" if x is None or (isinstance(x, float) and math.isnan(x)) else (
            "inf" if math.isinf(x) else f"{x:.3f}")

    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(JOB_COLUMNS)
        for r in results:
            for j in r.jobs:
                t = j.trace
                done = j.status == FINISHED
                w.writerow((r.policy, t.job_id, t.line, num(t.submit_time_s), t.num_gpus,
                            j.model, t.accelerator, j.status, num(j.start), num(j.finish),
                            num(j.finish - t.submit_time_s) if done else "",
                            num(j.start - t.submit_time_s) if done else "", num(j.runtime),
                            num(t.duration_s), num(j.speed_vs_ideal), j.gpu_types, j.n_nodes,
                            j.n_racks, num(j.bottleneck_gbps) if done else "", j.nodes))


def format_summary(results: list[SimResult]) -> str:
    header = ("POLICY", "FINISHED", "NEVER FIT", "MEAN JCT h", "MEDIAN JCT h", "P99 JCT h",
              "MEAN QUEUE h", "MAKESPAN d", "ALLOC %", "ALLOC QUEUED %", "GOODPUT %",
              "DECISIONS/s")

    def h(x):
        return "-" if x is None else f"{x / 3600:.2f}"

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}"

    rows = [header]
    for r in results:
        m = r.metrics
        rows.append((r.policy, f"{m['jobs_finished']:,}", f"{m['jobs_never_fit']:,}",
                     h(m["mean_jct_s"]), h(m["median_jct_s"]), h(m["p99_jct_s"]),
                     h(m["mean_queue_s"]), f"{m['makespan_s'] / 86400:.2f}",
                     pct(m["allocation_rate"]), pct(m.get("allocation_rate_while_queued")),
                     pct(m["goodput_utilization"]),
                     "-" if m["decisions_per_s"] is None else f"{m['decisions_per_s']:,.0f}"))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(str(v).rjust(w) if i else str(v).ljust(w)
                               for i, (v, w) in enumerate(zip(row, widths))).rstrip()
                     for row in rows)


def binned_utilization(r: SimResult, total_gpus: int, bins: int = 400,
                       end: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Time-weighted mean allocated and goodput fraction of the cluster per time bin."""
    t = r.timeline_t
    end = end if end is not None else (float(t[-1]) if len(t) else 0.0)
    edges = np.linspace(0.0, max(end, 1e-9), bins + 1)
    out = []
    for series in (r.timeline_alloc, r.timeline_goodput):
        if len(t) == 0:
            out.append(np.zeros(bins))
            continue
        cum = np.concatenate([[0.0], np.cumsum(series[:-1] * np.diff(t))])
        k = np.clip(np.searchsorted(t, edges, side="right") - 1, 0, len(t) - 1)
        integral = np.where(edges >= t[0], cum[k] + series[k] * (edges - t[k]), 0.0)
        out.append(np.diff(integral) / np.diff(edges) / total_gpus)
    return (edges[:-1] + edges[1:]) / 2, out[0], out[1]


def write_plots(results: list[SimResult], total_gpus: int, out: Path) -> list[str]:
    """JCT CDF per policy and utilization over time, as PNGs (matplotlib, imported here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        jct = np.sort([j.finish - j.trace.submit_time_s for j in r.jobs if j.status == FINISHED])
        if len(jct):
            ax.step(np.maximum(jct, 1.0) / 3600, np.arange(1, len(jct) + 1) / len(jct),
                    where="post", label=r.policy)
    ax.set_xscale("log")
    ax.set_xlabel("job completion time (hours, log scale)")
    ax.set_ylabel("fraction of jobs")
    ax.set_title("JCT CDF per policy")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "jct_cdf.png", dpi=110)
    plt.close(fig)
    written.append("jct_cdf.png")

    end = max((float(r.timeline_t[-1]) for r in results if len(r.timeline_t)), default=0.0)
    fig, axes = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for r in results:
        mid, alloc, good = binned_utilization(r, total_gpus, end=end)
        axes[0].plot(mid / 86400, 100 * alloc, label=r.policy, lw=1)
        axes[1].plot(mid / 86400, 100 * good, label=r.policy, lw=1)
    axes[0].set_ylabel("GPUs allocated (%)")
    axes[1].set_ylabel("goodput-weighted (%)")
    axes[1].set_xlabel("simulated time (days)")
    axes[0].set_title("cluster utilization over time")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.set_ylim(0, 105)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "utilization.png", dpi=110)
    plt.close(fig)
    written.append("utilization.png")
    return written


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


# -- command line -----------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("--trace", help="trace CSV (default with --format philly: the bundled "
                        "data/philly.csv)")
    parser.add_argument("--format", choices=("auto", "philly", "canonical"), default="auto",
                        help="trace format (auto: from the header)")
    parser.add_argument("--policy", default="all",
                        help=f"one of {', '.join(POLICY_NAMES)}, or all (default)")
    parser.add_argument("--cluster", default=DEFAULT_CLUSTER,
                        help=f"TYPE:GPUSxSERVERS[,...][;rack=N][;rack_gbps=G][;inter_gbps=G] "
                        f"(default {DEFAULT_CLUSTER!r})")
    parser.add_argument("--max-jobs", type=int, help="first N jobs by submit time")
    parser.add_argument("--load-scale", type=float, default=1.0,
                        help="divide inter-arrival times by X (> 1 = busier)")
    parser.add_argument("--backfill", type=int, default=DEFAULT_BACKFILL,
                        help="jobs looked at behind a blocked one per pass")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random policy")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def _sniff_format(path: Path) -> str:
    from orchestrator.traces import TraceError

    try:
        with path.open() as f:
            first = f.readline()
    except OSError as e:
        raise TraceError(f"{path}: cannot read: {e.strerror or e}") from None
    return "philly" if first.strip().split(",")[0].strip() == "timestamp" else "canonical"


def run_cli(args) -> int:
    """`python -m orchestrator simulate ...`; never imports Ray."""
    from orchestrator.cluster_model import ClusterSpecError
    from orchestrator.traces import PHILLY_CSV, TraceError, load_trace, prepare

    def err(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 2

    policies = list(POLICY_NAMES) if args.policy == "all" else [args.policy]
    if any(p not in POLICY_NAMES for p in policies):
        return err(f"--policy {args.policy!r}: use one of {', '.join(POLICY_NAMES)}, all")
    if args.backfill < 0:
        return err(f"--backfill must be >= 0, got {args.backfill}")
    try:
        cluster = parse_cluster_spec(args.cluster)
        if args.trace is None:
            if args.format != "philly":
                return err("--trace is required (or --format philly for the bundled trace)")
            path = PHILLY_CSV
        else:
            path = Path(args.trace)
        fmt = _sniff_format(path) if args.format == "auto" else args.format
        t0 = time.perf_counter()
        raw = load_trace(path, fmt)
        trace = prepare(raw, args.max_jobs, args.load_scale)
    except (ClusterSpecError, TraceError) as e:
        return err(str(e))
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").write_text("")
        (out / ".write-test").unlink()
    except OSError as e:
        return err(f"cannot write to --out {out}: {e.strerror or e}")
    log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    log(f"trace {path} ({fmt}): {len(raw):,} jobs read, {len(trace):,} replayed "
        f"(load scale {args.load_scale:g}) in {time.perf_counter() - t0:.1f}s; cluster "
        f"{cluster.total_gpus:,} GPUs on {cluster.servers:,} servers")
    results = []
    for name in policies:
        result = simulate(trace, cluster, name, seed=args.seed, backfill=args.backfill,
                          progress=log)
        log(f"[{name}] done in {result.metrics['wall_s']:.1f}s")
        results.append(result)
    write_jobs_csv(results, out / "jobs.csv")
    plots = [] if args.no_plots else write_plots(results, cluster.total_gpus, out)
    summary = {
        "trace": str(path), "format": fmt, "jobs_in_trace": len(raw), "max_jobs": args.max_jobs,
        "load_scale": args.load_scale, "cluster": cluster.text,
        "cluster_gpus": cluster.total_gpus, "cluster_servers": cluster.servers,
        "backfill": args.backfill, "seed": args.seed, "reference_gpu": REFERENCE_GPU,
        "policies": {r.policy: r.metrics for r in results},
        "files": ["jobs.csv", "summary.json"] + plots,
    }
    (out / "summary.json").write_text(json.dumps(_json_safe(summary), indent=2) + "\n")
    print(format_summary(results))
    never = results[0].metrics["jobs_never_fit"] if results else 0
    if never:
        print(f"{never:,} job(s) need more GPUs (of their allowed type) than the cluster has: "
              "counted as never_fits in jobs.csv, not replayed")
    print(f"wrote {', '.join(summary['files'])} to {out}")
    return 0
