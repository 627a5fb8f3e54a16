"""The scheduling core's vocabulary: its settings, the effects and outcome each event returns,
the directive a running job is told, and a running job's record (persisted with the state).
The rules that use them are in orchestrator/scheduler_core.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from orchestrator.config import JobSpec
from orchestrator.placement import Placement
from orchestrator.queue import (estimate_left_s, placement_from_dict, placement_to_dict,
                                service_size)
from orchestrator.saved_records import saved_fields, saved_spec
from orchestrator.validation import is_int, is_number

PREEMPT, MIGRATE, CANCEL = "preempt", "migrate", "cancel"  # the kinds of Yield and Directive


@dataclass(frozen=True)
class SchedulerSettings:
    """Everything the rules depend on; validated here so a bad value names itself."""

    suspect_after_s: float = 15.0
    dead_after_s: float = 60.0
    inter_group_gbps: float = 1.25
    max_load_per_cpu: float = math.inf
    preemption: bool = True
    # A job runs at least this long between preemptions or migrations, counted from its
    # placement. A GPU job's restart takes up to a minute before the first step (modelled
    # at 61 s, simulator.RESTART_S), so at 60 s a job could be preempted again while still reloading
    # (seen in the Philly replay: segments of 72 s); the default equals restart_cost_s, so a job
    # trains at least as long as its restart costs.
    min_run_s: float = 120.0
    # Ageing: a job preempted this often is not preempted again by its own priority (LAS);
    # a higher priority still preempts it.
    max_preemptions: int = 3
    migration: bool = True
    restart_cost_s: float = 120.0  # checkpoint + restart, what a migration must win back
    backfill: bool = True  # False: strict queue order, nothing starts while an earlier job waits
    # A job's workers start some seconds after its placement (its driver polls, then Ray Train
    # starts them). Until this long after a placement, Ray's usage on its nodes may not show
    # it yet, so what Ray work outside the scheduler holds there is never lowered meanwhile:
    # netted against a reservation not started yet, it hid a Serve replica's GPU, which was
    # then handed out twice.
    worker_start_grace_s: float = 120.0
    failed_placements_per_pass: int = 32  # backfill look-ahead budget (see the module doc)
    synthetic_nodes: bool = False  # accept reports for node ids Ray does not list (benchmarks)
    # Within a priority class: "las" = least attained service first (Tiresias' discretised
    # 2D-LAS: GPU-seconds run so far, in levels split at these thresholds), a waiting job of a
    # lower level may preempt a running job of a higher one; "fifo" = first submitted first.
    queue_order: str = "las"
    las_thresholds_gpu_s: tuple = (7200.0, 72000.0)
    # Starvation guard (Tiresias' promotion): a waiting job that has waited this many times as
    # long as it has run goes back to level 0. 0 = off.
    starvation_factor: float = 0.0
    # Blocked waiting jobs, in queue order, that may look for victims in one queue pass.
    preemption_searches_per_pass: int = 4
    # Placement weighs the queue: under contention a job goes to the accelerator family where
    # its speed, relative to what a typical job gains there, is best (comparative advantage),
    # and keeps off families that jobs allowed only there are waiting for, or mostly hold
    # (at least protect_share of the family's GPUs). False: the fastest family that fits.
    comparative_advantage: bool = True
    protect_share: float = 1.0
    # Autoscaling clusters: how long a job that only new nodes could hold waits for them. A
    # node type's labels can promise what the node, once up, does not report (80 GB labelled,
    # 79.6 GiB measured; MIG on): without a bound the job would wait, and the request keep
    # the nodes up, for ever. Then it is rejected with the reason.
    scale_up_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        problems = []
        for name in ("preemption", "migration", "backfill", "synthetic_nodes",
                     "comparative_advantage"):
            value = getattr(self, name)
            if not isinstance(value, bool):  # "false" in a settings file would mean on
                problems.append(f"{name} must be true or false, got {value!r}")
        # Durations and rates may be infinite (the simulator's never-silent nodes), not NaN.
        for name, low in (("suspect_after_s", 0), ("dead_after_s", 0), ("inter_group_gbps", 0),
                          ("max_load_per_cpu", 0), ("min_run_s", None),
                          ("restart_cost_s", None), ("starvation_factor", None),
                          ("worker_start_grace_s", None), ("scale_up_timeout_s", None)):
            value = getattr(self, name)
            # (is_number: an int past float's range raised OverflowError in math.isnan)
            ok = (is_number(value) or isinstance(value, float) and math.isinf(value)) \
                and (value > low if low is not None else value >= 0)
            if not ok:
                problems.append(f"{name} must be a number {'>' if low is not None else '>='}"
                                f" 0, got {value!r}")
        for name in ("max_preemptions", "failed_placements_per_pass"):
            value = getattr(self, name)
            if not (is_int(value) and value >= (0 if name == "max_preemptions" else 1)):
                problems.append(f"{name} must be a whole number >= "
                                f"{0 if name == 'max_preemptions' else 1}, got {value!r}")
        if self.queue_order not in ("las", "fifo"):
            problems.append(f"queue_order must be 'las' or 'fifo', got {self.queue_order!r}")
        thresholds = self.las_thresholds_gpu_s
        if not (isinstance(thresholds, (tuple, list)) and all(
                is_number(x) and x > 0 for x in thresholds)
                and list(thresholds) == sorted(set(thresholds))):
            problems.append("las_thresholds_gpu_s must be increasing numbers > 0, got "
                            f"{thresholds!r}")
        if not (is_int(self.preemption_searches_per_pass)
                and self.preemption_searches_per_pass >= 1):
            problems.append("preemption_searches_per_pass must be a whole number >= 1, got "
                            f"{self.preemption_searches_per_pass!r}")
        if not (is_number(self.protect_share) and 0 < self.protect_share <= 1):
            problems.append(f"protect_share must be a number in (0, 1], got "
                            f"{self.protect_share!r}")
        # (checked here, not only where ClusterState is built: saved settings breaking it made
        # every new scheduler fail in its constructor, settings_to_run_with never told)
        if not problems and self.suspect_after_s > self.dead_after_s:
            problems.append(f"suspect_after_s ({self.suspect_after_s}) must be <= dead_after_s "
                            f"({self.dead_after_s})")
        if problems:
            raise ValueError("invalid scheduler settings: " + "; ".join(problems))


def settings_to_run_with(given: dict, saved_state: dict) -> tuple[SchedulerSettings, str]:
    """The settings a scheduler starts with, and a problem met ("" if none): those `given`;
    none given (recreated by ensure_scheduler() after it was lost, not restarted by Ray,
    which keeps the arguments), those its predecessor ran with, saved with its state
    (SchedulerCore.to_dict), so a cluster's settings are not quietly reset to the defaults."""
    if given:
        return SchedulerSettings(**given), ""
    saved = saved_state.get("settings") if isinstance(saved_state, dict) else None
    if not saved:
        return SchedulerSettings(), ""
    if not isinstance(saved, dict):
        return SchedulerSettings(), (f"saved scheduler settings unreadable, using the "
                                     f"defaults: a JSON {type(saved).__name__}, not an object")
    known = {f: saved[f] for f in SchedulerSettings.__dataclass_fields__ if f in saved}
    if isinstance(known.get("las_thresholds_gpu_s"), list):  # (JSON has no tuples)
        known["las_thresholds_gpu_s"] = tuple(known["las_thresholds_gpu_s"])
    try:
        return SchedulerSettings(**known), ""
    except (TypeError, ValueError) as e:
        problem = str(e)
    # A wrong value costs that setting alone (its default), not every other saved one (one
    # hand-edited value switched preemption back on and reset the LAS thresholds).
    bad = []
    for name, value in known.items():
        # (alone, but beside a partner its relation holds with: suspect_after_s <= dead_after_s)
        partner = {"suspect_after_s": {"dead_after_s": math.inf},
                   "dead_after_s": {"suspect_after_s": value}}.get(name, {})
        try:
            SchedulerSettings(**{**partner, name: value})
        except (TypeError, ValueError):
            bad.append(name)
    kept = {name: value for name, value in known.items() if name not in bad}
    try:
        settings = SchedulerSettings(**kept)
    except (TypeError, ValueError):
        # suspect_after_s > dead_after_s: each fine alone, not together, or one kept beside
        # the other's default (a bad dead_after_s beside a suspect_after_s above 60): the
        # pair goes back to its defaults, the others as saved
        bad += [name for name in ("suspect_after_s", "dead_after_s")
                if name in kept and name not in bad]
        kept = {name: value for name, value in known.items() if name not in bad}
        try:
            settings = SchedulerSettings(**kept)
        except (TypeError, ValueError):
            return SchedulerSettings(), f"saved scheduler settings unreadable, using the " \
                f"defaults: {problem}"
    return settings, (f"saved scheduler settings partly unreadable, {', '.join(bad)} at "
                      f"{'their defaults' if len(bad) > 1 else 'its default'}, the others as "
                      f"saved: {problem}")


# -- effects ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Persist:
    """The state changed: save `core.to_dict()` before answering."""


@dataclass(frozen=True)
class SaveSoon:
    """The state changed, but not in a way worth a write per call (a running job's last
    checkpoint time, told at every step-boundary check): saved with the next change that
    persists, or by the next maintenance pass."""


@dataclass(frozen=True)
class StartAgent:
    """Effect: start (or restart) the agent of an alive node whose agent has not reported
    lately (a node that joined, or one whose agent stopped)."""

    node_id: str


@dataclass(frozen=True)
class Yield:
    """Tell a running job to checkpoint and give its resources back (kind preempt, migrate or
    cancel). Live jobs learn it by polling `directive`; the simulator carries it out."""

    job_name: str
    owner: str
    kind: str
    reason: str
    target_nodes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Directive:
    """What a running job is told at its next step boundary (preempt, migrate or cancel), why,
    since when, and for a migration the placement claimed for it."""

    kind: str  # PREEMPT, MIGRATE or CANCEL
    reason: str
    since: float
    for_job: str = ""  # the job a preemption makes room for
    target: Placement | None = None  # a migration's claimed destination
    read_at: float | None = None  # when the job first read it (it acts on it from then)


@dataclass
class Outcome:
    """What one event to the core produced: the answer for the caller, the effects a driver of
    the core must carry out, and metric samples to record."""

    decision: object = None
    effects: list = field(default_factory=list)
    samples: list = field(default_factory=list)  # metric samples (orchestrator.metric_catalogue)

    @property
    def persist(self) -> bool:
        return any(isinstance(e, Persist) for e in self.effects)

    def add(self, other: "Outcome") -> "Outcome":
        self.effects += [e for e in other.effects if not (isinstance(e, Persist) and self.persist)]
        self.samples += other.samples
        return self


@dataclass
class RunningJob:
    """A job holding a reservation (placed, collected by its driver or not)."""

    spec: JobSpec
    placement: Placement
    started_at: float
    enqueued_at: float  # first submission: kept across preemptions (not an operator's:
    # that one re-queues the job as if submitted then, behind those waiting; see yielded)
    preemptions: int = 0
    ran_s: float = 0.0  # run time in earlier placements
    # Run time (of ran_s) its LAS level no longer counts: the starvation guard promoted it
    # then (QueuedJob.las_baseline_s); without it the next new job preempted it at once
    las_baseline_s: float = 0.0
    last_checkpoint_at: float | None = None
    directive: Directive | None = None
    # Derived, not persisted: the accelerator family it runs on, its speed per family and the
    # families faster for it (asked on every release for every running job, for migrations).
    family: str | None = field(default=None, compare=False, repr=False)
    speeds: dict = field(default_factory=dict, compare=False, repr=False)
    faster: tuple | None = field(default=None, compare=False, repr=False)  # families
    # (faster families, GPUs) for the migration scan, () if it can never migrate.
    migration_key: tuple | None = field(default=None, compare=False, repr=False)
    # Free GPUs on those families when it last found no migration target worth it.
    no_target_at: tuple | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        # Asked for every running job on every queue pass under LAS: worked out once.
        self.size = service_size(self.spec)

    def attained_s(self, now: float) -> float:
        """Service received so far, this run included: run time x GPUs (workers for CPU)."""
        return (self.ran_s + now - self.started_at) * self.size

    def las_attained_s(self, now: float) -> float:
        """The service its LAS level counts: since its last promotion (see las_baseline_s)."""
        return (self.ran_s - self.las_baseline_s + now - self.started_at) * self.size

    @property
    def planned_end(self) -> float | None:
        """When it is expected to end, if it has an estimate (fixed while it runs)."""
        left = estimate_left_s(self.spec, self.ran_s)
        return None if left is None else self.started_at + left

    def remaining_s(self, now: float) -> float | None:
        """Expected seconds left, or None without an estimate (or past it)."""
        end = self.planned_end
        if end is None:
            return None
        left = end - now
        return left if left > 0 else None

    def to_dict(self) -> dict:
        d = self.directive
        return {"spec": self.spec.to_dict(), "placement": placement_to_dict(self.placement),
                "started_at": self.started_at, "enqueued_at": self.enqueued_at,
                "preemptions": self.preemptions, "ran_s": self.ran_s,
                "las_baseline_s": self.las_baseline_s,
                "last_checkpoint_at": self.last_checkpoint_at,
                "directive": None if d is None else {
                    "kind": d.kind, "reason": d.reason, "since": d.since, "for_job": d.for_job,
                    "read_at": d.read_at,
                    "target": None if d.target is None else placement_to_dict(d.target)}}

    @classmethod
    def from_dict(cls, data: dict) -> "RunningJob":
        """From saved state, every field checked (saved_records)."""
        fields = saved_fields(cls, data, "running job", RUNNING_JOB_SAVED)
        d = data.get("directive")
        directive = None if d is None else Directive(
            **saved_fields(Directive, d, "its directive", DIRECTIVE_SAVED),
            target=None if d.get("target") is None
            else placement_from_dict(d["target"], "its migration's target"))
        if directive is not None and directive.kind not in (PREEMPT, MIGRATE, CANCEL):
            raise ValueError(f"its directive's kind is {directive.kind!r}, not one of "
                             f"{PREEMPT}, {MIGRATE}, {CANCEL}")
        return cls(saved_spec(data.get("spec"), "running job"),
                   placement_from_dict(data.get("placement"), "its placement"),
                   directive=directive, **fields)


# What RunningJob.to_dict saves besides its spec, placement and directive.
RUNNING_JOB_SAVED = ("started_at", "enqueued_at", "preemptions", "ran_s", "las_baseline_s",
                     "last_checkpoint_at")
DIRECTIVE_SAVED = ("kind", "reason", "since", "for_job", "read_at")
