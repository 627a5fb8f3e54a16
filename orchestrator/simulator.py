"""Trace-driven, discrete-event replay of a job trace on a modelled cluster.

Every decision is the live scheduler's: the simulator drives the same SchedulerCore
(orchestrator/scheduler_core.py) the SchedulerActor drives — its queue, EASY backfill,
preemption and migration — with trace arrivals (`submit`), modelled completions
(`release`) and `tick` at each moment time alone makes a decision possible (the live actor
ticks every 5 s; SchedulerCore.next_wakeup names those moments), and carries out its yields
as live jobs and drivers do: the job asks `directive` at a step boundary NOTICE_S after the
directive was issued (one taken back before then is not seen: the job trains on),
checkpoints there and keeps its GPUs until it has released them (YIELD_S after the
directive), then `yielded`; placed again, it reloads for RELOAD_S before it trains (RESTART_S
= YIELD_S + RELOAD_S, measured live). Modelled jobs checkpoint only when told to yield (as the
job bench_yield measured: no periodic checkpoints), so a running job has no checkpoint in its
current attempt to report with `directive` (live, DirectiveWatch reports the last of the
attempt, None before one): the core's victim tie-break, least time since the last checkpoint,
goes by time since the job (re)started, as live for such jobs; a live job that also
checkpoints periodically reports its last save, which is not modelled here, so among victims
otherwise equal the live core may pick another. Policies (orchestrator/policies.py) differ in
where jobs go and in the queue's order: "hetero-las" is the live scheduler's own rules, the
others are baselines plugged into the same core. Time in the ClusterState is a constant
(SIM_NOW) and heartbeat limits are infinite, so no modelled server ever goes stale; simulated
time lives here.

Each job's `expected_duration_s` is its trace duration (on the reference GPU), as a user would
estimate it; EASY backfill uses it. `backfill=False` is strict queue order: nothing starts
while a job ahead of it in the queue's order waits (FIFO under a FIFO queue order; under LAS,
least attained service first, so a new job may start before an earlier preempted one). Jobs
that can never fit are counted as `never_fits` with the reason (an unknown accelerator family,
allowed families the cluster does not have, more GPUs than the cluster has of the allowed
families), not queued.

Metrics (per policy):
- JCT = finish - submit (mean, p50, p99); wait = JCT - time holding GPUs (mean): all the
  time a job spent queued, before its first start and after each preemption or migration;
  first-start delay = first start - submit (mean: a preempted job's later waits are not in
  it); makespan = last finish - first submit; jobs finished / never fitting (by reason)
- usable_gpus_busy_while_waiting = usable allocated GPU-time / (usable allocated + usable idle
  GPU-time), over the time jobs wait, where usable = of a family some waiting job is allowed
  to use and allocated = reserved (running jobs, a migration's claimed target): the share of
  the GPUs waiting jobs could use that were busy; 1.0 = no usable GPU ever idles while a job
  waits. GPUs held back for the head of the queue count as idle, deliberately: a reservation
  is worth it only if it pays for itself in JCT.
- allocation_rate = sum(GPUs x runtime) / (cluster GPUs x makespan);
  allocation_rate_while_queued = allocated / cluster GPUs, averaged over the time jobs wait
- gpu_time_efficiency = sum(GPUs x runtime x achieved/ideal speed) / sum(GPUs x runtime): the
  GPU-time the jobs' work would take at the ideal speed over the GPU-time they were allocated,
  ideal = consolidated throughput on the fastest GPU type in the cluster (cluster_model); the
  RELOAD_S a resumed segment spends reloading, and a yielding job's checkpoint and release
  after it saw the directive, count as runtime at speed 0. Its numerator is
  the trace's work, the same under every policy, so a goodput over cluster GPUs x makespan
  would say nothing makespan does not; over the GPU-time allocated it says how well the
  policy placed jobs (slower families, spread placements and reloads lower it). The goodput
  timeline (a plot: allocated GPUs x achieved/ideal speed, counting a segment's GPUs from its
  start to its release) shows when that work was done.
- preemptions and migrations (in all and per job), restart_overhead = GPU-time spent
  yielding (checkpoint and release, after the job saw its directive) and reloading
  checkpoints (RELOAD_S per restart), over all GPU-time allocated
- decisions/s = policy calls / seconds spent inside the policy
"""
from __future__ import annotations

import csv
import heapq
import dataclasses
import json
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np

from orchestrator.cluster_model import (FAMILY_TO_TYPE, GPU_TYPES, REFERENCE_GPU, ClusterSpec,
                                        build_state, consolidated_throughput, model_for,
                                        parse_cluster_spec, throughput)
from orchestrator.config import JobSpec
from orchestrator.inventory import ClusterState
from orchestrator.job_exit import EXIT_INTERRUPTED
from orchestrator.placement import Placement, Rejection
from orchestrator.policies import POLICY_NAMES, make_policy
from orchestrator.runs import writable_dir_problem
from orchestrator.scheduler_core import CLAIM_SUFFIX, SchedulerCore
from orchestrator.scheduler_types import MIGRATE, PREEMPT, SchedulerSettings, Yield
from orchestrator.throughput import ThroughputTable
from orchestrator.traces import MAX_SECONDS, TraceJob, unknown_families, unknown_family_reason
from orchestrator.validation import expand_home, finite_json, strict_float, strict_int

SIM_NOW = 0.0  # the ClusterState's clock: constant, see the module docstring
DEFAULT_CLUSTER = "v100:8x48,p100:8x48,k80:4x64;rack=16"  # 1,024 GPUs, 160 servers
# A preempted or migrated job spends RESTART_S from the directive to its first step after the
# restart (directive -> checkpoint -> release -> placed again -> workers restarted ->
# checkpoint restored -> first step). A modelled GPU-job restart, not today's live figure: the
# values are scripts/bench_yield.py's first run (a2f8eec, docs/benchmarks.md 2026-12-02:
# median 60.7 s, on a loaded machine, with Ray Train's 2 s report poll); on current code and a
# quieter machine the tiny CPU job restarts in 13.8 s (benchmarks.md 2026-12-06 (evening)),
# but a GPU job also pays what it does not (CUDA contexts, NCCL communicators, reading a
# multi-GB checkpoint), so the replay keeps the minute. Of it, the job keeps its old GPUs for
# YIELD_S: it sees the directive at a step boundary NOTICE_S after it was issued (notice
# 2.32 s), checkpoints there (2.04 s) and releases its GPUs (2.27 s), that run's medians. It
# trains until it sees the directive and loses no work: the checkpoint saves it
# (training/loop.py). Placed again, it spends the rest, RELOAD_S, before it trains.
RESTART_S = 61.0
NOTICE_S = 2.32
YIELD_S = 6.63  # notice + checkpoint + release
RELOAD_S = RESTART_S - YIELD_S


@dataclass(frozen=True)
class RestartCost:
    """A preempted or migrated job's restart in the replay: it sees the directive notice_s
    after it was issued, releases its GPUs yield_s after it and trains again restart_s after
    it (the rest, reload_s, on its new GPUs). The defaults are the modelled GPU-job restart
    above; `--notice-s`, `--yield-s` and `--restart-s` ask how the policies compare at
    another."""
    notice_s: float = NOTICE_S
    yield_s: float = YIELD_S
    restart_s: float = RESTART_S

    @property
    def reload_s(self) -> float:
        return self.restart_s - self.yield_s

    def problem(self) -> str | None:
        """What is wrong with it, naming the flags; None when it is a restart."""
        figures = {"--notice-s": self.notice_s, "--yield-s": self.yield_s,
                   "--restart-s": self.restart_s}
        # Over MAX_SECONDS is a unit mistake, as in a trace: 1e300 printed 300-digit JCTs.
        bad = [f"{flag} {value:g}" for flag, value in figures.items()
               if not (math.isfinite(value) and 0 <= value <= MAX_SECONDS)]
        if bad:
            return (f"{', '.join(bad)}: seconds must be numbers >= 0 and at most "
                    f"{MAX_SECONDS:g} (31 years)")
        if not self.notice_s <= self.yield_s <= self.restart_s:
            return (f"--notice-s ({self.notice_s:g}) <= --yield-s ({self.yield_s:g}) <= "
                    f"--restart-s ({self.restart_s:g}) must hold: the yield includes the "
                    "notice, the restart the yield")
        return None


def add_published_baselines_argument(parser) -> None:
    """--published-baselines, for `simulate` and the simulator benchmark alike."""
    parser.add_argument("--published-baselines", action="store_true",
                        help="fifo, random, bestfit and tiresias without the core's migration "
                        "of running jobs to faster GPU types, as their papers' schedulers "
                        "(default: the live scheduler's migration under every policy)")


def add_restart_arguments(parser) -> None:
    """The flags of RestartCost, for `simulate` and scripts/bench_simulator.py alike."""
    parser.add_argument("--restart-s", type=strict_float, default=RESTART_S,
                        help=f"directive -> first step after the restart (default {RESTART_S:g})")
    parser.add_argument("--yield-s", type=strict_float, default=YIELD_S,
                        help=f"directive -> old GPUs released (default {YIELD_S:g})")
    parser.add_argument("--notice-s", type=strict_float, default=NOTICE_S,
                        help=f"directive -> seen at a step boundary (default {NOTICE_S:g})")


def restart_cost(args) -> RestartCost:
    return RestartCost(notice_s=args.notice_s, yield_s=args.yield_s, restart_s=args.restart_s)
# Events of the replay's heap besides arrivals, at the same instant in this order per job
ENDS, SEES_DIRECTIVE, RELEASES = 0, 1, 2

FINISHED, NEVER_FITS = "finished", "never_fits"
PLOT_FILES = ("jct_cdf.png", "utilization.png")  # what write_plots writes


@dataclass
class SimJob:
    """One trace job in a simulation: its spec and modelled speeds, and what happened to it
    (start, finish, where it ran, how fast compared with the ideal)."""

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
    work: float = 0.0  # iterations to run: trace duration x reference throughput
    work_done: float = 0.0  # iterations saved in checkpoints before the current segment
    speed: float = math.nan  # iterations/s where it runs now
    segment_start: float = math.nan
    trained_until: float = math.nan  # when it saw its directive to yield (its checkpoint)
    segments: int = 0  # times started (1 + restarts after preemption or migration)
    good_time: float = 0.0  # run time weighted by achieved/ideal speed
    preemptions: int = 0
    migrations: int = 0
    history: list = field(default_factory=list)  # (start, end, nodes) of every segment run
    overhead_s: float = 0.0  # run time reloading checkpoints, checkpointing to yield, releasing
    never_fit_reason: str = ""


@dataclass
class SimResult:
    """The outcome of replaying a trace under one policy: every job, the allocation, goodput
    and queue timelines, and the summary metrics."""

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


@lru_cache(maxsize=1)
def gavel_throughputs() -> ThroughputTable:
    """The scheduler's throughput table bootstrapped from Gavel's measurements (read once;
    nothing is learnt into it during a replay, so every policy sees the same table)."""
    return ThroughputTable.from_gavel()


def make_jobs(trace: list[TraceJob], cluster: ClusterSpec) -> list[SimJob]:
    present = tuple(cluster.gpus_by_type())
    jobs = []
    for i, t in enumerate(trace):
        model = model_for(t.duration_s, t.num_gpus, t.model_type)
        # The user's estimate of the run time is the trace's duration (on the reference GPU).
        # Named by position: a job's identity in the core (trace ids need not be unique).
        # JobSpec rejects unknown families, so only the known ones go in; a job allowed only
        # unknown families is never submitted and counts as never fitting, with the reason.
        unknown = unknown_families(t.accelerators)
        known = tuple(a for a in t.accelerators if a not in unknown)
        spec = JobSpec(f"job-{i}", num_workers=t.num_gpus, cpus_per_worker=1.0,
                       gpus_per_worker=1, accelerator_types=known,
                       expected_duration_s=max(t.duration_s, 1.0))
        ideal = max(consolidated_throughput(model, k, t.num_gpus) for k in present)
        reference = consolidated_throughput(model, REFERENCE_GPU, t.num_gpus)
        job = SimJob(t, model, spec, reference, ideal, work=t.duration_s * reference)
        if t.accelerators and not known:
            job.status = NEVER_FITS
            job.never_fit_reason = unknown_family_reason(unknown)
        jobs.append(job)
    return jobs


def simulate(trace: list[TraceJob], cluster: ClusterSpec | str, policy: str, *, seed: int = 0,
             backfill: bool | None = None, check: bool = False,
             progress: Callable[[str], None] | None = None,
             progress_every_s: float = 5.0,
             settings: SchedulerSettings | None = None,
             restart: RestartCost = RestartCost(),
             published_baselines: bool = False) -> SimResult:
    """Replay `trace` (sorted by submit time, e.g. from traces.prepare) under one policy.

    Every decision is the live scheduler's: a SchedulerCore (queue, EASY backfill, preemption,
    migration) whose placement and queue order are `policy`'s (orchestrator/policies.py;
    "hetero-las" = the live scheduler's own rules). `backfill=False` is strict queue order
    (the policy's: FIFO or LAS; default: `settings`' own, EASY backfill as the live
    scheduler). `check` asserts after every event that no server holds more GPUs than it has
    and that the reservations add up to the running jobs (conservation). `restart`: what a
    preempted or migrated job spends restarting. `published_baselines`: the type-blind
    baselines without the core's migration (policies.make_policy)."""
    if isinstance(cluster, str):
        cluster = parse_cluster_spec(cluster)
    jobs = make_jobs(trace, cluster)
    by_name = {j.spec.name: j for j in jobs}
    present = tuple(GPU_TYPES[k].family for k in cluster.gpus_by_type())
    total_gpus = cluster.total_gpus

    orders: dict[tuple, tuple[str, ...]] = {}

    def type_order(job: SimJob) -> tuple[str, ...]:
        # Kept per (model, GPU count, allowed families): a pure function of them (the speed
        # table is fixed for the replay), and Gavel-style asks it on every placement try.
        key = (job.model, job.trace.num_gpus, job.spec.accelerator_types)
        order = orders.get(key)
        if order is None:
            allowed = job.spec.accelerator_types or present
            order = orders[key] = tuple(
                f for f in _families_by_speed(job.model, job.trace.num_gpus, present)
                if f in allowed)
        return order

    call, overrides = make_policy(policy, seed=seed, type_order=type_order,
                                  published=published_baselines)
    timing = {"decisions": 0, "policy_s": 0.0}

    def timed_policy(spec: JobSpec, state: ClusterState, now: float, owner: str):
        t0 = time.perf_counter()
        try:
            return call(spec, state, SIM_NOW, by_name[spec.name.removesuffix(CLAIM_SUFFIX)])
        finally:
            timing["decisions"] += 1
            timing["policy_s"] += time.perf_counter() - t0

    table = gavel_throughputs()

    def speed(spec: JobSpec, family: str) -> float:
        """The live scheduler's throughput table, keyed by the job's Gavel job type."""
        return table.speed(by_name[spec.name.removesuffix(CLAIM_SUFFIX)].model, family)

    state = build_state(cluster, SIM_NOW)
    settings = simulation_settings(cluster, backfill, base=settings, **overrides)
    core = SchedulerCore(settings, speed=speed, state=state,
                         policy=timed_policy if call is not None else None, wakeups=True)
    if call is None:  # the core's own placement: time the core's calls of place()
        core_place = core._place

        def timed_place(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return core_place(*args, **kwargs)
            finally:
                timing["decisions"] += 1
                timing["policy_s"] += time.perf_counter() - t0

        core._place = timed_place
    run = _Replay(jobs, state, check, restart.reload_s)
    # (time, job index, segment, ENDS | SEES_DIRECTIVE | RELEASES); lazy deletion: an event of
    # an earlier segment, or of a job no longer in the state it expects, is skipped
    completions: list[tuple[float, int, int, int]] = []
    index = {j.spec.name: i for i, j in enumerate(jobs)}
    arrivals = sorted(range(len(jobs)), key=lambda i: jobs[i].trace.submit_time_s)
    next_arrival = 0
    tl_t, tl_alloc, tl_good, tl_queue = [], [], [], []
    tl_usable = []  # (allocated, idle) GPUs of the families some waiting job may use
    usable_gpus = _usable_gpus_counter(state)
    wall0 = last_progress = time.perf_counter()

    def at(t: float, job: SimJob, event: int) -> None:
        heapq.heappush(completions, (t, index[job.spec.name], job.segments, event))

    def start(job: SimJob, placement: Placement, now: float) -> None:
        run.start(job, placement, now)
        at(job.finish, job, ENDS)

    def carry_out(outcome, now: float, job: SimJob | None = None) -> None:
        """Start what the core placed (`job`: the one the decision is about); tell the jobs
        it directs to yield (preemption, migration): each sees it restart.notice_s later."""
        if job is not None and isinstance(outcome.decision, Placement):
            start(job, outcome.decision, now)
        for effect in outcome.effects:
            if isinstance(effect, Yield) and by_name[effect.job_name].status == "running":
                at(now + restart.notice_s, by_name[effect.job_name], SEES_DIRECTIVE)
        for name in list(core.queue.ready):
            start(by_name[name], core.poll(name, "", now).decision, now)

    def sees_directive(job: SimJob, now: float) -> None:
        """The job asks at a step boundary, as a live job does (core.directive, through
        which the live actor answers; with no checkpoint in this attempt to report: see the
        module docstring). None: taken back before it read it (its preemptor started
        elsewhere), it trains on. Else it checkpoints and releases its GPUs."""
        if core.directive(job.spec.name, now).decision is None:
            return
        run.sees_directive(job, now)
        at(now + restart.yield_s - restart.notice_s, job, RELEASES)

    def releases(job: SimJob, now: float) -> None:
        """The job has checkpointed and stopped: `yielded`, as its driver calls it."""
        kind = core.running[job.spec.name].directive.kind
        run.stop(job, now, yielding=True)
        job.preemptions += kind == PREEMPT
        job.migrations += kind == MIGRATE
        carry_out(core.yielded(job.spec.name, "", now), now, job)

    def record(now: float) -> None:
        """The timeline after an event; progress every progress_every_s of wall time."""
        nonlocal last_progress
        tl_t.append(now)
        tl_alloc.append(run.gpus)
        tl_good.append(run.goodput)
        tl_queue.append(len(core.queue))
        tl_usable.append(usable_gpus(core.queue.gpus_by_allowed) if len(core.queue) else (0, 0))
        if progress is not None and time.perf_counter() - last_progress >= progress_every_s:
            last_progress = time.perf_counter()
            progress(f"[{policy}] {run.finished + run.never:,}/{len(jobs):,} jobs done, "
                     f"simulated {now / 86400:.1f} days, {len(core.queue):,} queued, "
                     f"{run.gpus}/{total_gpus} GPUs busy, {last_progress - wall0:.0f}s")

    now = -math.inf
    while next_arrival < len(arrivals) or completions:
        t_arr = jobs[arrivals[next_arrival]].trace.submit_time_s \
            if next_arrival < len(arrivals) else math.inf
        t_event = min(t_arr, completions[0][0] if completions else math.inf)
        # Between events, tick the core when time alone may change a decision (a job passing
        # min_run_s, a LAS level or its planned end; a promotion), as the live actor's
        # periodic tick does (within its 5 s).
        wake = core.next_wakeup(now, until=t_event)
        if wake is not None:
            now = wake
            carry_out(core.tick(now, gauges=False), now)
            record(now)
            continue
        now = t_event
        while completions and completions[0][0] <= now:
            _, i, segment, event = heapq.heappop(completions)
            job = jobs[i]
            if segment != job.segments:
                continue  # planned before the job was preempted or moved
            if event == RELEASES:
                releases(job, now)
            elif job.status != "running":
                continue  # it ended, or saw a directive, before this
            elif event == SEES_DIRECTIVE:
                sees_directive(job, now)
            else:
                run.finish(job, now)
                carry_out(core.release(job.spec.name, "", now), now)
        while next_arrival < len(arrivals) and \
                jobs[arrivals[next_arrival]].trace.submit_time_s <= now:
            job = jobs[arrivals[next_arrival]]
            next_arrival += 1
            if job.status == NEVER_FITS:  # allowed only unknown families (make_jobs)
                run.never += 1
                continue
            outcome = core.submit(job.spec, "", now)
            if isinstance(outcome.decision, Rejection):
                job.status = NEVER_FITS
                job.never_fit_reason = never_fit_reason(
                    job.spec, cluster, unknown_families(job.trace.accelerators))
                run.never += 1
                continue
            carry_out(outcome, now, job)
        if not completions and next_arrival >= len(arrivals) and len(core.queue):
            raise RuntimeError(f"{policy}: {len(core.queue)} job(s) queued on an idle cluster;"
                               f" first: {core.queue.ordered()[0].spec}")
        record(now)
    # Every job finished or was counted as never fitting: one the core dropped without a
    # word (neither started nor kept queued) would be left out of every figure silently.
    lost = [j.spec.name for j in jobs if j.status not in (FINISHED, NEVER_FITS)]
    if lost:
        raise RuntimeError(f"{policy}: {len(lost)} job(s) neither finished nor never fitting "
                           f"at the end of the replay: {', '.join(lost[:5])}")
    timeline = (np.array(tl_t, dtype=float), np.array(tl_alloc, dtype=float),
                np.array(tl_good, dtype=float), np.array(tl_queue, dtype=float))
    metrics = summarize(jobs, total_gpus, timing["decisions"], timing["policy_s"])
    metrics["allocation_rate_while_queued"] = allocation_while_queued(*timeline[:2],
                                                                      timeline[3], total_gpus)
    usable = np.array(tl_usable, dtype=float).reshape(-1, 2)
    metrics["usable_gpus_busy_while_waiting"] = busy_while_waiting(
        timeline[0], timeline[3], usable[:, 0], usable[:, 1])
    metrics["wall_s"] = round(time.perf_counter() - wall0, 3)
    return SimResult(policy, jobs, *timeline, metrics)


def simulation_settings(cluster: ClusterSpec, backfill: bool | None = None,
                        base: SchedulerSettings | None = None, **overrides) -> SchedulerSettings:
    """`base` (default: the live defaults) with heartbeats that never expire (modelled
    servers never go stale), the cluster's inter-rack bandwidth, `backfill` when given (else
    the base's), and `overrides` (a policy's own: its queue order, no preemption for FIFO...)
    on top: a caller's tuned settings must not undo what makes a baseline that baseline (FIFO
    ran with LAS order and preemption when given settings)."""
    fixed = {"suspect_after_s": math.inf, "dead_after_s": math.inf,
             "inter_group_gbps": cluster.inter_gbps, "synthetic_nodes": True,
             **({} if backfill is None else {"backfill": backfill}), **overrides}
    return dataclasses.replace(base, **fixed) if base is not None else SchedulerSettings(**fixed)


def never_fit_reason(spec: JobSpec, cluster: ClusterSpec, unknown: tuple[str, ...] = ()) -> str:
    """Why a job the core rejected can never run on the modelled cluster, in a few words
    that group alike jobs (the summary counts jobs per reason). `unknown`: the families of
    its constraint the spec left out (traces.unknown_families: a typo, an alias such as
    V100S), named too: they may be what the user meant."""
    present = {GPU_TYPES[k].family: n for k, n in cluster.gpus_by_type().items()}
    allowed = [f.upper() for f in spec.accelerator_types] or sorted(present)
    also = f"; {unknown_family_reason(unknown)}" if unknown else ""
    if not any(f in present for f in allowed):
        return f"no server of {'|'.join(allowed)} in the cluster{also}"
    have = sum(present.get(f, 0) for f in allowed)
    kinds = "|".join(allowed) if spec.accelerator_types else "any type"
    return f"needs {spec.total_gpus} GPUs, the cluster has {have} of {kinds}{also}"


def _usable_gpus_counter(state: ClusterState) -> Callable[[Counter], tuple[int, int]]:
    """usable(waiting GPUs by allowed families) -> (allocated, free) GPUs of the families some
    waiting job may use (JobQueue.gpus_by_allowed; a key () allows any family)."""
    t = state.table

    def usable(gpus_by_allowed: Counter) -> tuple[int, int]:
        n = len(t)
        held = np.bincount(t.family[:n], weights=t.reserved_gpus[:n], minlength=len(t.families))
        free = np.bincount(t.family[:n], weights=t.gpus[:n] - t.reserved_gpus[:n],
                           minlength=len(t.families))
        if () in gpus_by_allowed:
            codes = [code for f, code in t.families.items() if f]
        else:
            wanted = {f for key in gpus_by_allowed for f in key}
            codes = [t.families[f] for f in wanted if f in t.families]
        return int(sum(held[c] for c in codes)), int(sum(free[c] for c in codes))

    return usable


class _Replay:
    """The simulated jobs' progress: work done, segments run, GPUs and goodput held."""

    def __init__(self, jobs: list[SimJob], state: ClusterState, check: bool,
                 reload_s: float = RELOAD_S) -> None:
        self.state, self.check, self.reload_s = state, check, reload_s
        self.gpus, self.goodput = 0, 0.0
        self.finished = self.never = 0

    def start(self, job: SimJob, placement: Placement, now: float) -> None:
        per_node = Counter(placement.worker_nodes)
        used: dict[str, int] = {}
        for node, workers in per_node.items():
            used[_type_of(node)] = used.get(_type_of(node), 0) + workers * placement.gpus_per_worker
        n = job.trace.num_gpus
        job.speed = throughput(job.model, tuple(sorted(used)), n, placement.bottleneck_gbps)
        restart = self.reload_s if job.segments else 0.0  # a resumed job reloads its checkpoint
        job.segment_start = now
        job.finish = now + restart + (job.work - job.work_done) / job.speed
        if math.isnan(job.start):
            job.start = now
        job.segments += 1
        job.speed_vs_ideal = job.speed / job.ideal_throughput
        job.bottleneck_gbps = placement.bottleneck_gbps
        job.used = used
        job.nodes = ";".join(f"{node}:{w * placement.gpus_per_worker}"
                             for node, w in per_node.items())
        job.n_nodes = len(per_node)
        t = self.state.table
        job.n_racks = len({int(t.group[t.index[node]]) for node in per_node})
        job.gpu_types = "/".join(sorted(used))
        job.status = "running"
        self.gpus += n
        self.goodput += n * job.speed_vs_ideal
        self._check()

    def sees_directive(self, job: SimJob, now: float) -> None:
        """The job read a directive to yield at a step boundary: it trains no more (the
        checkpoint it writes now keeps its work) but holds its GPUs until it releases them."""
        job.trained_until = now
        job.status = "yielding"

    def stop(self, job: SimJob, now: float, yielding: bool) -> None:
        """The job releases its GPUs: finished, or yielding (its work saved by the checkpoint
        written when it saw the directive)."""
        held = now - job.segment_start
        trained = (job.trained_until if yielding else now) - job.segment_start
        job.history.append((job.segment_start, now, job.nodes))
        job.runtime = (0.0 if math.isnan(job.runtime) else job.runtime) + held
        reloading = min(trained, self.reload_s) if job.segments > 1 else 0.0
        job.good_time += (trained - reloading) * job.speed_vs_ideal  # reloading trains nothing
        job.overhead_s += held - (trained - reloading)  # reloading, checkpointing, releasing
        if yielding:
            job.work_done += job.speed * (trained - reloading)
            job.status = "yielded"
        self.gpus -= job.trace.num_gpus
        self.goodput -= job.trace.num_gpus * job.speed_vs_ideal

    def finish(self, job: SimJob, now: float) -> None:
        self.stop(job, now, yielding=False)
        job.speed_vs_ideal = job.good_time / job.runtime if job.runtime > 0 else 1.0
        job.status = FINISHED
        self.finished += 1

    def _check(self) -> None:
        if not self.check:
            return
        t = self.state.table
        rows = len(t)
        assert (t.reserved_gpus[:rows] <= t.gpus[:rows]).all(), "GPU over-committed"
        held = int(t.reserved_gpus[:rows].sum())
        assert held >= self.gpus, f"reservations {held} < running {self.gpus}"


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


def busy_while_waiting(t: np.ndarray, queue: np.ndarray, usable_busy: np.ndarray,
                       usable_idle: np.ndarray) -> float | None:
    """Usable allocated GPU-time / (usable allocated + usable idle GPU-time), over the time
    jobs wait (see the module docstring); None if no job ever waited."""
    if len(t) < 2:
        return None
    dt = np.diff(t)
    waiting = queue[:-1] > 0
    busy = float((usable_busy[:-1] * dt)[waiting].sum())
    idle = float((usable_idle[:-1] * dt)[waiting].sum())
    return busy / (busy + idle) if busy + idle > 0 else None


def waited_s(job: SimJob) -> float | None:
    """All the time a finished job spent without GPUs: JCT - time holding them (its first
    start's delay and every wait after a preemption or migration). None for a job that never
    started: a replay runs every job that fits to its end, so that is one that never fits,
    which never entered the queue (jobs.csv leaves its wait_s empty). A job started but not
    finished (mid-replay) is refused: its wait is not over, and its history lacks the gap
    before the segment it runs now."""
    if not job.history:
        return None
    if job.status != FINISHED:
        raise ValueError(f"waited_s: {job.spec.name} (trace job {job.trace.job_id}) has not "
                         f"finished ({job.status}): its wait is not over")
    # Summed from the gaps between its stored segment times, not as JCT - runtime: that
    # difference of sums left float noise (+-1e-11 s at 1e5 s) for a job that never waited;
    # a gap of none is start == previous end, exactly 0.
    ends = [job.trace.submit_time_s] + [end for _, end, _ in job.history[:-1]]
    return float(sum(start - end for (start, _, _), end in zip(job.history, ends,
                                                                strict=True)))


def summarize(jobs: list[SimJob], total_gpus: int, decisions: int, policy_s: float) -> dict:
    done = [j for j in jobs if j.status == FINISHED]
    jct = np.array([j.finish - j.trace.submit_time_s for j in done])
    first_start_delay = np.array([j.start - j.trace.submit_time_s for j in done])
    wait = np.array([waited_s(j) for j in done])
    gpu_time = sum(j.trace.num_gpus * j.runtime for j in done)
    ideal_gpu_time = sum(j.trace.num_gpus * j.runtime * j.speed_vs_ideal for j in done)
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
        "never_fit_reasons": dict(Counter(j.never_fit_reason for j in jobs
                                          if j.status == NEVER_FITS).most_common()),
        "mean_jct_s": stat(jct, np.mean),
        "p50_jct_s": stat(jct, np.median),
        "p99_jct_s": stat(jct, lambda x: np.percentile(x, 99)),
        "mean_wait_s": stat(wait, np.mean),
        "mean_first_start_delay_s": stat(first_start_delay, np.mean),
        "makespan_s": float(makespan),
        "allocation_rate": gpu_time / denominator if denominator > 0 else None,
        "gpu_time_efficiency": ideal_gpu_time / gpu_time if gpu_time > 0 else None,
        "mean_speed_vs_ideal": stat(np.array([j.speed_vs_ideal for j in done]), np.mean),
        "preemptions": sum(j.preemptions for j in jobs),
        "migrations": sum(j.migrations for j in jobs),
        "preemptions_per_job": sum(j.preemptions for j in done) / len(done) if done else None,
        "migrations_per_job": sum(j.migrations for j in done) / len(done) if done else None,
        "restart_overhead": (sum(j.trace.num_gpus * j.overhead_s for j in done) / gpu_time
                             if gpu_time > 0 else None),
        "multi_server_jobs": len(multi),
        "multi_rack_jobs": sum(j.n_racks > 1 for j in multi),
        "decisions": decisions,
        "policy_s": round(policy_s, 3),
        "decisions_per_s": decisions / policy_s if policy_s > 0 else None,
    }


# -- outputs ----------------------------------------------------------------------------------------

# gpu_types, n_nodes, n_racks, bottleneck_gbps and nodes describe a job's last placement;
# `placements` counts them (> 1 after a preemption or migration; speed_vs_ideal is over all).
JOB_COLUMNS = ("policy", "job_id", "trace_line", "submit_time_s", "num_gpus", "model_type",
               "accelerator", "status", "never_fit_reason", "start_time_s", "finish_time_s",
               "jct_s", "wait_s", "first_start_delay_s", "runtime_s", "duration_ref_s",
               "speed_vs_ideal", "placements", "gpu_types", "n_nodes", "n_racks",
               "bottleneck_gbps", "nodes")


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
                            j.model, "|".join(t.accelerators), j.status, j.never_fit_reason,
                            num(j.start),
                            num(j.finish),
                            num(j.finish - t.submit_time_s) if done else "",
                            num(waited_s(j)),  # None (empty): never started
                            num(j.start - t.submit_time_s) if done else "", num(j.runtime),
                            num(t.duration_s), num(j.speed_vs_ideal), j.segments,
                            j.gpu_types, j.n_nodes,
                            j.n_racks, num(j.bottleneck_gbps) if done else "", j.nodes))


def format_summary(results: list[SimResult]) -> str:
    header = ("POLICY", "FINISHED", "NEVER FIT", "MEAN JCT h", "P50 JCT h", "P99 JCT h",
              "MEAN WAIT h", "FIRST START h", "MAKESPAN d", "BUSY WAITING %", "ALLOC QUEUED %",
              "GPU EFF %", "MIGRATIONS", "PREEMPTIONS", "RESTART %", "DECISIONS/s")

    def h(x):
        return "-" if x is None else f"{x / 3600:.2f}"

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}"

    rows = [header]
    for r in results:
        m = r.metrics
        rows.append((r.policy, f"{m['jobs_finished']:,}", f"{m['jobs_never_fit']:,}",
                     h(m["mean_jct_s"]), h(m["p50_jct_s"]), h(m["p99_jct_s"]),
                     h(m["mean_wait_s"]), h(m["mean_first_start_delay_s"]),
                     f"{m['makespan_s'] / 86400:.2f}",
                     pct(m.get("usable_gpus_busy_while_waiting")),
                     pct(m.get("allocation_rate_while_queued")),
                     pct(m["gpu_time_efficiency"]), f"{m.get('migrations', 0):,}",
                     f"{m.get('preemptions', 0):,}", pct(m.get("restart_overhead")),
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
        else:  # (named in the legend all the same: with none at all, matplotlib warned)
            ax.plot([], [], label=f"{r.policy} (no job finished)")
    ax.set_xscale("log")
    ax.set_xlabel("job completion time (hours, log scale)")
    ax.set_ylabel("fraction of jobs")
    ax.set_title("JCT CDF per policy")
    ax.set_ylim(0, 1.05)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / PLOT_FILES[0], dpi=110)
    plt.close(fig)
    written.append(PLOT_FILES[0])

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
    fig.savefig(out / PLOT_FILES[1], dpi=110)
    plt.close(fig)
    written.append(PLOT_FILES[1])
    return written


def remove_stale_plots(out: Path) -> None:
    """Delete the plots an earlier run wrote to `out`: with --no-plots they would sit beside
    the new jobs.csv and summary.json, showing another replay."""
    for name in PLOT_FILES:
        (out / name).unlink(missing_ok=True)


def out_dir(value: str | Path) -> tuple[Path, str | None]:
    """--out's directory, a leading `~` read as home (`--out=~/sim`: the shell leaves that ~
    as written, and it became a directory named `~` here), and why it cannot take the
    outputs, or None: checked before any replay runs, not found when the first file is
    written. A missing one is made only when the outputs are written, so that a run stopped
    by Ctrl-C leaves none. An empty one (`--out "$UNSET"`) is refused: it was the working
    directory."""
    if not str(value).strip():
        return Path(value), "--out is empty: give the directory to write the outputs to"
    try:
        out = expand_home(value, "--out")
    except ValueError as e:
        return Path(value), str(e)
    problem = writable_dir_problem(out)
    if problem:
        return out, f"cannot write to --out {out}: {problem}"
    return out, None


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
    parser.add_argument("--max-jobs", type=strict_int, help="first N jobs by submit time")
    parser.add_argument("--load-scale", type=strict_float, default=1.0,
                        help="divide inter-arrival times by X (> 1 = busier)")
    parser.add_argument("--no-backfill", dest="backfill", action="store_false",
                        help="strict queue order (FIFO, or LAS for tiresias and "
                        "hetero-las): nothing starts while a job ahead of it waits "
                        "(default: EASY backfill, as the live scheduler)")
    parser.add_argument("--seed", type=strict_int, default=0, help="seed of the random policy")
    add_published_baselines_argument(parser)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    add_restart_arguments(parser)


def run_cli(args) -> int:
    """`python -m orchestrator simulate ...`; never imports Ray."""
    from orchestrator.cluster_model import ClusterSpecError
    from orchestrator.traces import PHILLY_CSV, TraceError, load_trace, prepare, sniff_format

    def err(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 2

    policies = list(POLICY_NAMES) if args.policy == "all" else [args.policy]
    if any(p not in POLICY_NAMES for p in policies):
        return err(f"--policy {args.policy!r}: use one of {', '.join(POLICY_NAMES)}, all")
    if args.seed < 0:  # the random policy's numpy generator takes no negative seed
        return err(f"--seed must be an integer >= 0, got {args.seed}")
    restart = restart_cost(args)
    if restart.problem():
        return err(restart.problem())
    try:
        cluster = parse_cluster_spec(args.cluster)
        if args.trace is None:
            if args.format != "philly":
                return err("--trace is required (or --format philly for the bundled trace)")
            path = PHILLY_CSV
        elif not args.trace.strip():  # (`--trace "$UNSET"`: it read the working directory)
            return err("--trace is empty: give the trace CSV (or --format philly for the "
                       "bundled trace)")
        else:
            path = expand_home(args.trace, "--trace", TraceError)
        fmt = sniff_format(path) if args.format == "auto" else args.format
        t0 = time.perf_counter()
        raw = load_trace(path, fmt)
        trace = prepare(raw, args.max_jobs, args.load_scale)
    except (ClusterSpecError, TraceError) as e:
        return err(str(e))
    out, problem = out_dir(args.out)
    if problem:
        return err(problem)
    log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    log(f"trace {path} ({fmt}): {len(raw):,} jobs read, {len(trace):,} replayed "
        f"(load scale {args.load_scale:g}) in {time.perf_counter() - t0:.1f}s; cluster "
        f"{cluster.total_gpus:,} GPUs on {cluster.servers:,} servers")
    results = []
    try:
        for name in policies:
            result = simulate(trace, cluster, name, seed=args.seed, backfill=args.backfill,
                              progress=log, restart=restart,
                              published_baselines=args.published_baselines)
            log(f"[{name}] done in {result.metrics['wall_s']:.1f}s")
            results.append(result)
    except KeyboardInterrupt:  # a long replay stopped: one line, as the other commands say
        print(f"interrupted after {len(results)} of {len(policies)} policies: nothing "
              f"written to {out}", file=sys.stderr)
        return EXIT_INTERRUPTED
    out.mkdir(parents=True, exist_ok=True)
    write_jobs_csv(results, out / "jobs.csv")
    if args.no_plots:
        remove_stale_plots(out)
    plots = [] if args.no_plots else write_plots(results, cluster.total_gpus, out)
    summary = {
        "trace": str(path), "format": fmt, "jobs_in_trace": len(raw), "max_jobs": args.max_jobs,
        "load_scale": args.load_scale, "cluster": cluster.text,
        "cluster_gpus": cluster.total_gpus, "cluster_servers": cluster.servers,
        "backfill": args.backfill, "published_baselines": args.published_baselines,
        "seed": args.seed, "reference_gpu": REFERENCE_GPU,
        "policies": {r.policy: r.metrics for r in results},
        "files": ["jobs.csv", "summary.json"] + plots,
    }
    (out / "summary.json").write_text(json.dumps(finite_json(summary), indent=2, allow_nan=False) + "\n")
    print(format_summary(results))
    never = results[0].metrics["never_fit_reasons"] if results else {}
    if never:
        print(f"{sum(never.values()):,} job(s) can never run on this cluster (never_fits in "
              "jobs.csv, not replayed):")
        for reason, count in never.items():
            print(f"  {count:,}  {reason}")
    print(f"wrote {', '.join(summary['files'])} to {out}")
    return 0
