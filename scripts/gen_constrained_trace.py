#!/usr/bin/env python
"""Generate a reproducible "constrained" heterogeneous trace: Philly-sized jobs, a third of them
pinned to one accelerator family, some allowed a set of two, on a four-family cluster whose
scarcest family holds under 10% of the GPUs.

    python -m scripts.gen_constrained_trace --out FILE.csv [--seed 0] [--jobs 8000]
        [--load 0.95] [--scarce-load 0.7] [--gang-share 0.05] [--single-share 0.3333]
        [--pair-share 0.15] [--cluster SPEC]

writes a canonical trace CSV (orchestrator.traces.write_canonical) and prints a summary. Replay:

    python -m orchestrator simulate --trace FILE.csv --cluster "<CONSTRAINED_CLUSTER>" ...

The cluster (CONSTRAINED_CLUSTER, --cluster):
    "a100:8x12,v100:8x24,v100:4x48,p100:8x16,p100:4x32,k80:4x64;rack=16"
    96 A100 (9.7% of 992 GPUs, 8-GPU servers), 384 V100 and 256 P100 (each in 8- and 4-GPU
    servers), 256 K80 (4-GPU servers). The SCARCE family is the one with the fewest GPUs.

Parameters (generate()'s keywords; the CLI's options):
    seed          numpy default_rng seed; the same seed (and parameters) gives a byte-identical
                  CSV.
    jobs          number of jobs (default 8,000; 2 to MAX_JOBS, 1,000,000).
    load          target offered load of the whole cluster (default 0.95), see below; one so
                  low that the arrivals would span over 1e9 s (31 years) is refused, as the
                  simulator would refuse the trace.
    scarce_load   offered load of the gang jobs alone on the scarce family (default 0.7).
    gang_share    share of jobs that are gang jobs: exactly GANG_GPUS (8) GPUs, allowed only the
                  scarce family (default 0.05).
    single_share  share of jobs allowed ONE family, gang jobs included (default 1/3). The
                  others of them pick one of the non-scarce families with probability
                  proportional to that family's GPU count.
    pair_share    share of jobs allowed a set of two families (default 0.15): neighbours in
                  speed (config.ACCELERATOR_SPEED), written slower first, chosen uniformly:
                  "K80|P100", "P100|V100", "V100|A100" on the default cluster.
    cluster       the --cluster SPEC the trace is sized for (default CONSTRAINED_CLUSTER).
    The remaining jobs may run on any family. Counts are exact: round(share x jobs) jobs of each
    kind, assigned to random positions in submit order.

Definitions:
- Sizes and durations: each non-gang job's (num_gpus, duration) pair is one row of the bundled
  Philly trace (orchestrator.traces.load_philly), drawn uniformly with replacement, so sizes and
  durations keep Philly's joint distribution. A job must fit what its allowed families hold
  (num_gpus <= their GPUs together; it may span servers): a pair that does not fit is redrawn
  (none does not on the default cluster: Philly's largest job has 128 GPUs, the smallest
  non-scarce family 256).
- Durations above Philly's 99th percentile (254,758 s = 70.8 h) are clipped to it: the
  other 1% run for up to 37 days, and a handful of such jobs would carry much of the offered
  load past the trace's span (a 37-day job pinned to a K80 runs for months), so that the
  cluster would see far less contention while jobs arrive than `load` says.
- Durations are on the reference GPU (P100), as the simulator reads them. Each job's model
  type is the one the simulator gives a Philly row (cluster_model.model_for, by GPU-hours of
  the drawn row) and is written in the trace's model_type column, so the speeds below are the
  replay's, gang jobs' included (scaled, some would cross a GPU-hours bucket).
- Loads are in the replay's units: a job's run time on a family, all its GPUs on one server,
  is its duration / its speed-up there over a P100 in the simulator's speed model
  (cluster_model.speed_over_reference: Gavel's measurements for its model at its GPU count;
  an A100 is 2.2 V100s). A family's capacity in reference GPUs (P100s) for the trace is its
  GPUs x the work-weighted harmonic mean of the jobs' speed-ups there: the P100-seconds of
  the trace's work one second of all its GPUs runs (about 960 P100s on the default cluster
  at seed 0, K80 0.27, V100 1.07, A100 2.35 each). Until 2026-12-06 capacity was counted
  with the static config.ACCELERATOR_SPEED ratios (K80 0.42, V100 1.67, A100 3.67: 1,355
  P100s), which overstate what Gavel measured for these models: the trace said 0.95 and
  offered 1.34 in the replay, the gang jobs 1.06 of the A100s (said 0.7), the K80-pinned
  jobs 1.44 (said 0.91).
- Gang jobs' durations are Philly durations (drawn uniformly from all rows) times ONE factor,
  chosen (by bisection) so that their GPU-seconds on the scarce family / (its GPUs x last
  submit time) equals scarce_load while the trace offers `load`. Unscaled, 5% of the jobs at
  8 GPUs of Philly durations would offer the 10% of GPUs about twice what they can serve, and
  every policy's JCT would be set by an unstable queue rather than by where it places jobs.
- Offered load = sum(num_gpus x duration_s) / (cluster capacity x last submit time).
- Arrivals are Poisson at rate (jobs - 1) / T, the first at 0: exponential gaps, scaled so that
  the last submit time is exactly T = sum(num_gpus x duration_s) / (capacity x load); the
  offered load is then `load` to rounding.
- Per-family load in the summary, in the family's own GPU-seconds at the jobs' speeds there:
  "pinned" counts only jobs allowed that family alone (a lower bound on what it must serve;
  above 1, those jobs' queue grows while jobs arrive); "spread" splits every job's work over
  its allowed families (all, for "any") in proportion to their GPU counts.
"""
from __future__ import annotations

import argparse
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np

from orchestrator.cluster_model import (FAMILY_TO_TYPE, GPU_TYPES, REFERENCE_GPU, ClusterSpec,
                                        model_for, parse_cluster_spec, speed_over_reference)
from orchestrator.config import ACCELERATOR_SPEED
from orchestrator.runs import out_file
from orchestrator.traces import MAX_SECONDS, TraceError, TraceJob, load_philly, write_canonical
from orchestrator.validation import strict_float, strict_int

CONSTRAINED_CLUSTER = "a100:8x12,v100:8x24,v100:4x48,p100:8x16,p100:4x32,k80:4x64;rack=16"
DEFAULT_SEED = 0
DEFAULT_JOBS = 8_000
# The most jobs a trace may have: 12x the Philly trace, a replay of hours; 1e9 ended in numpy's
# MemoryError traceback (22 GiB for one array), 1e8 ate memory for minutes first.
MAX_JOBS = 1_000_000
DEFAULT_LOAD = 0.95
DEFAULT_SCARCE_LOAD = 0.7
DEFAULT_GANG_SHARE = 0.05
DEFAULT_SINGLE_SHARE = 1 / 3
DEFAULT_PAIR_SHARE = 0.15
GANG_GPUS = 8
REFERENCE_FAMILY = GPU_TYPES[REFERENCE_GPU].family  # trace durations are on a P100
DURATION_CLIP_PERCENTILE = 99  # Philly's p99 duration, 254,758 s (70.8 h)
# Constraint kinds, as the summary counts them.
ANY, SINGLE, GANG, PAIR = "any", "single", "gang", "pair"


@lru_cache(maxsize=1)
def philly_pairs() -> tuple[np.ndarray, np.ndarray]:
    """(num_gpus, duration_s) of every Philly job, in file order (read once), durations
    clipped at Philly's 99th percentile (see the module docstring)."""
    jobs = load_philly()
    sizes = np.array([j.num_gpus for j in jobs], dtype=np.int64)
    durations = np.array([j.duration_s for j in jobs], dtype=float)
    durations = np.minimum(durations, np.percentile(durations, DURATION_CLIP_PERCENTILE))
    sizes.flags.writeable = durations.flags.writeable = False  # shared by every call
    return sizes, durations


def family_gpus(cluster: ClusterSpec) -> dict[str, int]:
    """Accelerator family -> GPUs in the cluster, slowest family first."""
    by_family: dict[str, int] = {}
    for gpu_type, gpus in cluster.gpus_by_type().items():
        family = GPU_TYPES[gpu_type].family
        by_family[family] = by_family.get(family, 0) + gpus
    return dict(sorted(by_family.items(), key=lambda kv: (ACCELERATOR_SPEED[kv[0]], kv[0])))


def speedups(sizes, models, families) -> dict[str, np.ndarray]:
    """Family -> each job's speed-up there over the reference GPU, all its GPUs on one server,
    in the simulator's speed model (cluster_model.speed_over_reference: Gavel's measurements
    of the job's model at its GPU count): its duration over that is its run time there."""
    return {f: np.array([speed_over_reference(m, FAMILY_TO_TYPE[f], int(n))
                         for m, n in zip(models, sizes)]) for f in families}


def family_capacity(gpus: dict[str, int], work: np.ndarray,
                    speedup: dict[str, np.ndarray]) -> dict[str, float]:
    """Family -> its capacity in reference GPUs (P100s) for this mix of jobs (`work`: each
    job's GPUs x duration on the reference GPU): its GPUs x the work-weighted harmonic mean of
    the jobs' speed-ups there, i.e. the reference GPU-seconds of the trace's work that one
    second of all its GPUs runs."""
    return {f: n * work.sum() / (work / speedup[f]).sum() for f, n in gpus.items()}


def offered_load(gpus: dict[str, int], work: np.ndarray, speedup: dict[str, np.ndarray],
                 last_s: float) -> float:
    """sum(GPUs x duration on the reference GPU) / (capacity in reference GPUs x last_s)."""
    return float(work.sum()) / (sum(family_capacity(gpus, work, speedup).values()) * last_s)


def last_submit_s(gpus: dict[str, int], work: np.ndarray, speedup: dict[str, np.ndarray],
                  load: float) -> float:
    """The last submit time at which `work` offers `load` (offered_load solved for it)."""
    return offered_load(gpus, work, speedup, 1.0) / load


def checked_last_submit_s(last_s: float, load: float) -> float:
    """`last_s`; ValueError naming --load when it is over MAX_SECONDS (31 years), a span of
    submit times the simulator refuses (orchestrator.traces): the trace would not replay."""
    if not last_s <= MAX_SECONDS:
        raise ValueError(f"--load {load!r}: the arrivals would span {last_s:g} s, over "
                         f"{MAX_SECONDS:g} s (31 years), which a trace may not; raise --load")
    return last_s


def family_load(family: str, gpus: dict[str, int], work: np.ndarray,
                speedup: dict[str, np.ndarray], last_s: float) -> float:
    """The GPU-seconds `work` (GPUs x reference duration per job) takes on `family`, all on
    one server each, over the family's GPU-seconds until `last_s`."""
    return float((work / speedup[family]).sum()) / (gpus[family] * last_s)


def scarce_family(gpus: dict[str, int]) -> str:
    """The family with the fewest GPUs (ties: the faster one)."""
    return min(reversed(list(gpus)), key=lambda f: gpus[f])


def neighbour_pairs(gpus: dict[str, int]) -> tuple[tuple[str, str], ...]:
    """Families next to each other in speed, slower first: ("K80", "P100"), ("P100", "V100")."""
    order = list(gpus)
    return tuple(zip(order, order[1:]))


def check_parameters(seed: int, jobs: int, load: float, scarce_load: float, gang_share: float,
                     single_share: float, pair_share: float, cluster: ClusterSpec) -> None:
    """Raise ValueError naming the option when the parameters cannot make a trace."""
    gpus = family_gpus(cluster)
    # numpy's default_rng refuses a negative seed without naming it ("expected non-negative
    # integer").
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"--seed must be an integer >= 0, got {seed!r}")
    if not isinstance(jobs, (int, np.integer)) or not 2 <= jobs <= MAX_JOBS:
        raise ValueError(f"--jobs must be an integer from 2 to {MAX_JOBS:,}, got {jobs!r}")
    for name, value in (("--load", load), ("--scarce-load", scarce_load)):
        if not (np.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a number > 0, got {value!r}")
    for name, value in (("--gang-share", gang_share), ("--single-share", single_share),
                        ("--pair-share", pair_share)):
        if not (np.isfinite(value) and 0 <= value <= 1):
            raise ValueError(f"{name} must be between 0 and 1, got {value!r}")
    if gang_share > single_share:
        raise ValueError(f"--gang-share {gang_share} > --single-share {single_share}: gang jobs "
                         f"are single-family jobs")
    if gang_share >= 1:
        raise ValueError("--gang-share must be < 1: the gang jobs' scale is set against the "
                         "other jobs' load")
    if single_share + pair_share > 1:
        raise ValueError(f"--single-share {single_share} + --pair-share {pair_share} > 1")
    if kind_counts(jobs, gang_share, single_share, pair_share)[GANG] >= jobs:
        raise ValueError(f"--gang-share {gang_share} of --jobs {jobs} makes every job a gang "
                         "job: at least one other job is needed (the gang jobs' scale is set "
                         "against the other jobs' load)")
    if len(gpus) < 2:
        raise ValueError(f"--cluster {cluster.text!r}: needs at least two accelerator "
                         f"families (has {', '.join(gpus)})")
    scarce = scarce_family(gpus)
    if gang_share > 0 and gpus[scarce] < GANG_GPUS:
        raise ValueError(f"--cluster {cluster.text!r}: the scarce family {scarce} has "
                         f"{gpus[scarce]} GPUs, fewer than a gang job's {GANG_GPUS}")
    # (whether --scarce-load fits in --load depends on the jobs' speeds: gang_scale says)


def kind_counts(jobs: int, gang_share: float, single_share: float,
                pair_share: float) -> dict[str, int]:
    """Exact number of jobs of each constraint kind: round(share x jobs), the rest any."""
    singles = round(single_share * jobs)
    gang = min(round(gang_share * jobs), singles)
    pair = min(round(pair_share * jobs), jobs - singles)
    return {GANG: gang, SINGLE: singles - gang, PAIR: pair, ANY: jobs - singles - pair}


def allowed_families(rng: np.random.Generator, kinds: np.ndarray,
                     gpus: dict[str, int]) -> list[tuple[str, ...]]:
    """Each job's allowed families by its kind (see the module docstring)."""
    scarce = scarce_family(gpus)
    others = [f for f in gpus if f != scarce]
    weights = np.array([gpus[f] for f in others], dtype=float)
    pairs = neighbour_pairs(gpus)
    single = iter(rng.choice(len(others), size=int((kinds == SINGLE).sum()),
                             p=weights / weights.sum()))
    pair = iter(rng.integers(len(pairs), size=int((kinds == PAIR).sum())))
    by_kind = {GANG: lambda: (scarce,), SINGLE: lambda: (others[next(single)],),
               PAIR: lambda: pairs[next(pair)], ANY: lambda: ()}
    return [by_kind[k]() for k in kinds]


def draw_fitting_rows(rng: np.random.Generator, capacity: np.ndarray,
                      sizes: np.ndarray) -> np.ndarray:
    """A Philly row per job whose num_gpus fits the job's `capacity` (GPUs its allowed families
    hold): draw uniformly, redraw those that do not fit."""
    fits_somewhere = capacity >= sizes.min()
    if not fits_somewhere.all():
        raise ValueError(f"no Philly job fits {int(capacity.min())} GPUs")
    rows = rng.integers(len(sizes), size=len(capacity))
    misfit = np.flatnonzero(sizes[rows] > capacity)
    while len(misfit):
        rows[misfit] = rng.integers(len(sizes), size=len(misfit))
        misfit = misfit[sizes[rows[misfit]] > capacity[misfit]]
    return rows


def gang_scale(gpus: dict[str, int], work: np.ndarray, speedup: dict[str, np.ndarray],
               is_gang: np.ndarray, load: float, scarce_load: float) -> float:
    """The factor on the gang jobs' durations that makes their load on the scarce family
    `scarce_load` when the last submit time makes the whole trace offer `load`. The gang
    load grows with the factor (more of the trace's work is theirs) towards `load` x the
    cluster's capacity over the scarce family's for gang jobs alone: found by bisection;
    ValueError naming --scarce-load when it is beyond that."""
    scarce = scarce_family(gpus)

    def gang_load(factor: float) -> float:
        scaled = np.where(is_gang, work * factor, work)
        return family_load(scarce, gpus, np.where(is_gang, scaled, 0.0), speedup,
                           last_submit_s(gpus, scaled, speedup, load))

    low, high = 0.0, 1.0
    while gang_load(high) < scarce_load:
        low, high = high, high * 2
        if high > 1e12:  # the gang jobs would have to be all the load, and more
            raise ValueError(f"--scarce-load {scarce_load} on {gpus[scarce]} {scarce} GPUs is "
                             f"more than --load {load} on all {sum(gpus.values())} GPUs "
                             f"can carry")
    for _ in range(100):  # to float precision
        mid = (low + high) / 2
        low, high = (mid, high) if gang_load(mid) < scarce_load else (low, mid)
    return (low + high) / 2


def arrival_times(rng: np.random.Generator, jobs: int, last_s: float) -> np.ndarray:
    """Poisson arrivals, the first at 0 and the last exactly at `last_s`."""
    times = np.concatenate(([0.0], np.cumsum(rng.exponential(size=jobs - 1))))
    times *= last_s / times[-1]
    times[-1] = last_s
    return times


def generate(seed: int = DEFAULT_SEED, jobs: int = DEFAULT_JOBS, load: float = DEFAULT_LOAD,
             scarce_load: float = DEFAULT_SCARCE_LOAD, gang_share: float = DEFAULT_GANG_SHARE,
             single_share: float = DEFAULT_SINGLE_SHARE, pair_share: float = DEFAULT_PAIR_SHARE,
             cluster: str = CONSTRAINED_CLUSTER) -> list[TraceJob]:
    """The constrained trace, in submit order (see the module docstring for every parameter)."""
    spec = parse_cluster_spec(cluster)
    check_parameters(seed, jobs, load, scarce_load, gang_share, single_share, pair_share,
                     spec)
    gpus = family_gpus(spec)
    rng = np.random.default_rng(seed)
    counts = kind_counts(jobs, gang_share, single_share, pair_share)
    kinds = rng.permutation(np.repeat(list(counts), list(counts.values())))
    allowed = allowed_families(rng, kinds, gpus)
    capacity = np.array([sum(gpus[f] for f in a) if a else spec.total_gpus for a in allowed])
    philly_sizes, philly_durations = philly_pairs()
    is_gang = kinds == GANG
    rows = draw_fitting_rows(rng, capacity[~is_gang], philly_sizes)
    sizes = np.full(jobs, GANG_GPUS, dtype=np.int64)
    durations = np.empty(jobs)
    sizes[~is_gang], durations[~is_gang] = philly_sizes[rows], philly_durations[rows]
    durations[is_gang] = philly_durations[rng.integers(len(philly_durations),
                                                       size=int(is_gang.sum()))]
    # The model the simulator would give each Philly row (by its GPU-hours), written in the
    # trace: the speeds the loads are set with are then the replay's, gang jobs' included
    # (their scaled durations would move some across a GPU-hours bucket)
    models = [model_for(float(d), int(n)) for d, n in zip(durations, sizes)]
    speedup = speedups(sizes, models, gpus)
    # The other jobs' work alone sets a lower bound (before the gang scale's bisection)
    checked_last_submit_s(last_submit_s(gpus, np.where(is_gang, 0.0, sizes * durations),
                                        speedup, load), load)
    if is_gang.any():
        durations[is_gang] *= gang_scale(gpus, sizes * durations, speedup, is_gang, load,
                                         scarce_load)
    submits = arrival_times(rng, jobs, checked_last_submit_s(
        last_submit_s(gpus, sizes * durations, speedup, load), load))
    return [TraceJob(i, float(submits[i]), float(durations[i]), int(sizes[i]), models[i],
                     allowed[i]) for i in range(jobs)]


# -- summary ---------------------------------------------------------------------------------------

def trace_loads(jobs: list[TraceJob], gpus: dict[str, int]
                ) -> tuple[float, dict[str, tuple[float, float]]]:
    """(offered load of the whole cluster, family -> (pinned, spread) load), in the replay's
    units (see the module docstring): the jobs' speeds by their model (model_for, as the
    simulator reads the trace)."""
    sizes = np.array([j.num_gpus for j in jobs])
    work = sizes * np.array([j.duration_s for j in jobs])
    speedup = speedups(sizes, [model_for(j.duration_s, j.num_gpus, j.model_type)
                               for j in jobs], gpus)
    last = max(j.submit_time_s for j in jobs)
    allowed = [[f for f in (j.accelerators or gpus) if f in gpus] for j in jobs]
    loads = {}
    for f in gpus:
        pinned = np.array([len(j.accelerators) == 1 and a == [f]
                           for j, a in zip(jobs, allowed)])
        share = np.array([gpus[f] / sum(gpus[g] for g in a) if f in a else 0.0
                          for a in allowed])
        loads[f] = (family_load(f, gpus, np.where(pinned, work, 0.0), speedup, last),
                    family_load(f, gpus, work * share, speedup, last))
    return offered_load(gpus, work, speedup, last), loads


def summary(jobs: list[TraceJob], cluster: str = CONSTRAINED_CLUSTER) -> str:
    """Jobs, GPUs per family, share of jobs per constraint kind, offered load overall and per
    family, as printed by the CLI."""
    spec = parse_cluster_spec(cluster)
    gpus = family_gpus(spec)
    scarce = scarce_family(gpus)
    n = len(jobs)
    gang = sum(j.accelerators == (scarce,) and j.num_gpus == GANG_GPUS for j in jobs)
    by_len = [sum(len(j.accelerators) == k for j in jobs) for k in (0, 1, 2)]
    last = max(j.submit_time_s for j in jobs)
    overall, loads = trace_loads(jobs, gpus)
    lines = [
        f"jobs: {n:,} over {last / 86400:.2f} days (last submit {last:,.0f} s)",
        f"cluster: {spec.total_gpus:,} GPUs: " + ", ".join(
            f"{f} {g:,} ({g / spec.total_gpus:.1%})" for f, g in reversed(gpus.items())),
        f"constraints: any family {by_len[0] / n:.1%}, one family {by_len[1] / n:.1%} "
        f"(of which {GANG_GPUS}-GPU {scarce}-only gang jobs {gang / n:.1%}), "
        f"two families {by_len[2] / n:.1%}",
        f"offered load: {overall:.3f} overall (sum GPUs x duration on a {REFERENCE_FAMILY} / "
        f"(cluster capacity in {REFERENCE_FAMILY}s for this job mix x last submit))",
        "per family, in its GPU-seconds at the jobs' speeds there (pinned = jobs allowed only "
        "it; spread = every job split by GPU count):",
        *(f"  {f:>5}: pinned {p:.3f}, spread {s:.3f}" for f, (p, s) in reversed(loads.items())),
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scripts.gen_constrained_trace",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="the canonical CSV to write")
    p.add_argument("--seed", type=strict_int, default=DEFAULT_SEED)
    p.add_argument("--jobs", type=strict_int, default=DEFAULT_JOBS)
    p.add_argument("--load", type=strict_float, default=DEFAULT_LOAD,
                   help="offered load of the whole cluster (default %(default)s)")
    p.add_argument("--scarce-load", type=strict_float, default=DEFAULT_SCARCE_LOAD,
                   help="gang jobs' offered load on the scarce family (default %(default)s)")
    p.add_argument("--gang-share", type=strict_float, default=DEFAULT_GANG_SHARE)
    p.add_argument("--single-share", type=strict_float, default=DEFAULT_SINGLE_SHARE)
    p.add_argument("--pair-share", type=strict_float, default=DEFAULT_PAIR_SHARE)
    p.add_argument("--cluster", default=CONSTRAINED_CLUSTER, help="--cluster SPEC")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out, problem = out_file(args.out, "--out")  # before generating, not after
    if problem:
        print(f"gen_constrained_trace: error: --out {args.out}: {problem}", file=sys.stderr)
        return 2
    try:
        jobs = generate(args.seed, args.jobs, args.load, args.scarce_load, args.gang_share,
                        args.single_share, args.pair_share, args.cluster)
        write_canonical(jobs, args.out)
    except (ValueError, TraceError) as e:  # ClusterSpecError and TraceError are ValueErrors
        print(f"gen_constrained_trace: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} (seed {args.seed})")
    print(summary(jobs, args.cluster))
    return 0


if __name__ == "__main__":
    sys.exit(main())
