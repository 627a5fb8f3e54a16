"""The wait queue: jobs that fit the cluster but not its free capacity right now.

Pure data, no placement: the scheduling core (orchestrator/scheduler_core.py) decides who
starts. Order: higher priority first; within a priority class, the lower service level first
(least attained service, Tiresias-style: the core's `level` function maps a job's GPU-seconds
run so far to a level; 0 for every job under FIFO); then first submitted (a preempted job
keeps its original submit time, so it goes back near the front of its level, not to the end).
Starvation guard (Tiresias' promotion): under LAS, a job above level 0 by its service that has
waited longer than its own `promote_after` (the core's: a multiple of the time it has run) goes
back to level 0 (a level floor alone, an operator's preemption, is not lifted).

Besides the waiting jobs it holds two mailboxes, since drivers learn of decisions by polling:
`ready` (placed from the queue, not yet collected by the driver) and `rejected` (dropped:
the cluster shrank and the job can never fit, or an operator cancelled it; kept until its
driver polls or exits).
"""
from __future__ import annotations

import bisect
import dataclasses
import heapq
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

from orchestrator.config import JobSpec
from orchestrator.placement import Placement, Queued, Rejection
from orchestrator.saved_records import saved_fields, saved_spec
from orchestrator.validation import json_type


@dataclass
class QueuedJob:
    """A job waiting in the scheduler's queue: its spec, the driver that owns it, when it was
    first submitted (its place in line) and what it has been through (preemptions, time run)."""

    spec: JobSpec
    owner: str
    enqueued_at: float  # first submission (an operator's preemption: that time), the queue
    # order, and what ageing counts from
    reason: str = ""
    preemptions: int = 0  # times this job was preempted (ageing: see SchedulerSettings)
    ran_s: float = 0.0  # run time in earlier placements, before it was preempted
    queued_at: float | None = None  # when it entered the queue this time (None: enqueued_at)
    promoted: bool = False  # waited long enough to be put back at level 0 (starvation guard)
    # Run time (of ran_s) its LAS level no longer counts: all it had run when the starvation
    # guard last promoted it (Tiresias resets a promoted job's attained service)
    las_baseline_s: float = 0.0
    # The LAS level it waits at, at least: an operator's preemption puts the job behind those
    # waiting at its priority, at the highest level among them (at its own, a job of little
    # service went straight back ahead of the one it was preempted for). Until it runs again.
    level_floor: int = 0

    @property
    def in_queue_since(self) -> float:
        """When it entered the queue this time (a preempted job: at its preemption)."""
        return self.enqueued_at if self.queued_at is None else self.queued_at

    @property
    def attained_s(self) -> float:
        """Service received so far: run time x GPUs (x workers for a CPU job)."""
        return self.ran_s * service_size(self.spec)

    @property
    def expected_left_s(self) -> float | None:
        """How long it is expected to run once started: what its earlier runs left of its
        estimate (a preempted job resumes); None without one, or past it (its end unknown)."""
        left = estimate_left_s(self.spec, self.ran_s)
        return left if left is not None and left > 0 else None

    @property
    def las_attained_s(self) -> float:
        """The service its LAS level counts: since its last promotion (attained_s, all of it,
        is what is reported)."""
        return (self.ran_s - self.las_baseline_s) * service_size(self.spec)

    def to_dict(self) -> dict:
        return {"spec": self.spec.to_dict(), "owner": self.owner,
                "enqueued_at": self.enqueued_at, "reason": self.reason,
                "preemptions": self.preemptions, "ran_s": self.ran_s,
                "queued_at": self.queued_at, "promoted": self.promoted,
                "las_baseline_s": self.las_baseline_s, "level_floor": self.level_floor}

    @classmethod
    def from_dict(cls, data: dict) -> "QueuedJob":
        """From saved state, every field checked (saved_records)."""
        fields = saved_fields(cls, data, "queued job", QUEUED_JOB_SAVED)
        if fields.get("promoted") and "las_baseline_s" not in fields:
            # saved before the baseline: a promotion then cleared all it had run, as now
            fields["las_baseline_s"] = fields.get("ran_s", 0.0)
        return cls(saved_spec(data.get("spec"), "queued job"), **fields)


QUEUED_JOB_SAVED = ("owner", "enqueued_at", "reason", "preemptions", "ran_s", "queued_at",
                    "promoted", "las_baseline_s", "level_floor")  # to_dict's, bar the spec


def service_size(spec: JobSpec) -> int:
    """What one second of a job's run counts as attained service: its GPUs (its workers for a
    CPU job), as Tiresias' 2D-LAS counts GPU-time."""
    return spec.total_gpus or spec.num_workers


def estimate_left_s(spec: JobSpec, ran_s: float) -> float | None:
    """What `ran_s` seconds of earlier runs leave of a job's time estimate (None: it has
    none; negative past it)."""
    if spec.expected_duration_s is None:
        return None
    return spec.expected_duration_s - ran_s


def placement_to_dict(placement: Placement) -> dict:
    return dataclasses.asdict(placement)


def placement_from_dict(data: dict, what: str = "placement") -> Placement:
    """From saved state, every field checked (saved_records)."""
    return Placement(**saved_fields(Placement, data, what))


def _saved_str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"a JSON {type(value).__name__}, not a string")
    return value


def allowed_families(spec: JobSpec) -> tuple[str, ...]:
    """The accelerator families a job may use, upper-cased and sorted; () = any."""
    return tuple(sorted({t.upper() for t in spec.accelerator_types}))


class JobQueue:
    """The scheduler's wait queue (pure data): waiting jobs in priority then submission order,
    placements made from the queue until their drivers collect them, and jobs dropped with the
    reason their drivers will be told."""

    def __init__(self, level: Callable[[float], int] | None = None,
                 promote_after: Callable[[QueuedJob], float | None] | None = None) -> None:
        """`level(attained GPU-seconds)`: the job's service level (lower goes first within a
        priority class); None = FIFO within a class. `promote_after(job)`: seconds of waiting
        after which a job above level 0 is put back at level 0 (None: never)."""
        self.level = level
        self.promote_after = promote_after
        self._promotions: list[tuple[float, str]] = []  # heap of (due time, job name)
        self._promote_at: dict[str, float] = {}  # the current due time of each waiting job
        self.waiting: dict[str, QueuedJob] = {}
        self._order: list[tuple] = []  # sorted order keys of the waiting jobs
        self._keys: dict[str, tuple] = {}  # each waiting job's key (its level is fixed while it
        # waits: attained service grows only while running)
        # Waiting GPU jobs' GPUs by the families they may use (() = any): what each family's
        # waiting demand is, without a pass over the queue.
        self.gpus_by_allowed: Counter = Counter()
        # The GPUs of waiting jobs allowed one family, by (family, priority): the first call
        # on a family is theirs against jobs they do not outrank only (first_call_gpus).
        self._single_family_gpus: Counter = Counter()
        self.sizes_by_allowed: Counter = Counter()  # (allowed families, GPUs) -> waiting jobs
        self.ready: dict[str, Placement] = {}  # placed from the queue, not yet collected
        self.rejected: dict[str, Rejection] = {}  # dropped; told to the driver on its poll
        # Whose each rejected job was (by name; "" = unknown): told to that driver only.
        self.rejected_owners: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.waiting)

    def holds(self, job_name: str) -> bool:
        return job_name in self.waiting or job_name in self.ready

    def owner_of(self, job_name: str) -> str | None:
        if job_name in self.waiting:
            return self.waiting[job_name].owner
        if job_name in self.ready:
            return self.ready[job_name].owner
        return None

    def add(self, job: QueuedJob) -> None:
        if job.spec.name in self.waiting:
            raise ValueError(f"job '{job.spec.name}' is already waiting")
        self.waiting[job.spec.name] = job
        key = self._keys[job.spec.name] = self.order_key(job)
        bisect.insort(self._order, key)
        # (by its own level: a floor alone, an operator's preemption, is not lifted by waiting)
        if key[1] > 0 and self.promote_after is not None and self.level(job.las_attained_s):
            wait = self.promote_after(job)
            if wait is not None:
                since = job.in_queue_since
                self._promote_at[job.spec.name] = since + wait
                heapq.heappush(self._promotions, (since + wait, job.spec.name))
        if job.spec.total_gpus:
            self.count_gpus_waiting(job.spec, +1)
            self.sizes_by_allowed[allowed_families(job.spec), job.spec.total_gpus] += 1

    def count_gpus_waiting(self, spec: JobSpec, sign: int) -> None:
        """A GPU job's GPUs counted as waiting (+1) or no longer (-1), by allowed families."""
        allowed = allowed_families(spec)
        self.gpus_by_allowed[allowed] += sign * spec.total_gpus
        if not self.gpus_by_allowed[allowed]:
            del self.gpus_by_allowed[allowed]
        if len(allowed) == 1:
            key = (allowed[0], spec.priority)
            self._single_family_gpus[key] += sign * spec.total_gpus
            if not self._single_family_gpus[key]:
                del self._single_family_gpus[key]

    def first_call_gpus(self, family: str, priority: int) -> int:
        """GPUs waiting jobs allowed only `family` need, of those at `priority` or above: they
        have first call on it against a job of `priority` (a lower-priority job allowed only
        the A100s kept a higher-priority job that may use any family off them, for good)."""
        return sum(gpus for (f, p), gpus in self._single_family_gpus.items()
                   if f == family and p >= priority)

    def remove(self, job_name: str) -> QueuedJob | None:
        job = self.waiting.pop(job_name, None)
        if job is not None:
            self._promote_at.pop(job_name, None)  # its heap entry goes stale
            key = self._keys.pop(job_name)
            del self._order[bisect.bisect_left(self._order, key)]
            if job.spec.total_gpus:
                self.count_gpus_waiting(job.spec, -1)
                shape = (allowed_families(job.spec), job.spec.total_gpus)
                self.sizes_by_allowed[shape] -= 1
                if not self.sizes_by_allowed[shape]:
                    del self.sizes_by_allowed[shape]
        return job

    def order_key(self, job: QueuedJob) -> tuple:
        level = max(self.level(job.las_attained_s), job.level_floor) \
            if self.level is not None and not job.promoted else 0
        return (-job.spec.priority, level, job.enqueued_at, job.spec.name)

    def last_level(self, priority: int) -> int:
        """The highest level among the jobs waiting at `priority` (0: none waits)."""
        # (keys are sorted by -priority, then level: the last one of the priority's run)
        at = bisect.bisect_left(self._order, (-priority + 1,)) - 1
        return self._order[at][1] if at >= 0 and self._order[at][0] == -priority else 0

    def promote_due(self, now: float) -> list[str]:
        """Put back at level 0 the waiting jobs whose promotion time has come; their names."""
        promoted = []
        while self._promotions and self._promotions[0][0] <= now:
            due, name = heapq.heappop(self._promotions)
            if self._promote_at.get(name) != due:
                continue  # stale: it left the queue (and may have come back) since
            job = self.waiting[name]
            self.remove(name)
            job.promoted = True
            job.las_baseline_s = job.ran_s  # kept once it runs (the running job's level)
            self.add(job)
            promoted.append(name)
        return promoted

    def next_promotion(self, after: float) -> float | None:
        """When the next promotion after `after` falls due (None: none planned); stale heap
        entries on top are dropped."""
        while self._promotions:
            due, name = self._promotions[0]
            if self._promote_at.get(name) != due:
                heapq.heappop(self._promotions)
                continue
            if due > after:
                return due
            # One already due (promote_due has not run since): the next after it, by a scan
            return min((d for d, n in self._promotions
                        if d > after and self._promote_at.get(n) == d), default=None)
        return None

    def level_of(self, job_name: str) -> int:
        return self._keys[job_name][1]

    def head(self) -> QueuedJob | None:
        """The first waiting job in queue order, if any."""
        return self.waiting[self._order[0][-1]] if self._order else None

    def ordered(self) -> list[QueuedJob]:
        """Waiting jobs in queue order (a copy: callers may remove while iterating)."""
        return [self.waiting[key[-1]] for key in self._order]

    def position(self, job_name: str) -> int | None:
        job = self.waiting.get(job_name)
        if job is None:
            return None
        return bisect.bisect_left(self._order, self._keys[job_name]) + 1

    def status(self, job_name: str) -> Queued | None:
        position = self.position(job_name)
        if position is None:
            return None
        return Queued(job_name, position, self.waiting[job_name].reason)

    def reject(self, job_name: str, rejection: Rejection) -> None:
        """Drop a waiting job, keeping why for its driver's next poll."""
        self.keep_rejection(job_name, rejection, self.owner_of(job_name) or "")
        self.remove(job_name)

    def keep_rejection(self, job_name: str, rejection: Rejection, owner: str) -> None:
        """Why `owner`'s job was dropped, until that driver polls."""
        self.rejected[job_name] = rejection
        self.rejected_owners[job_name] = owner

    def take_rejection(self, job_name: str, default=None):
        """The kept rejection of `job_name` (else `default`), forgotten with its owner."""
        self.rejected_owners.pop(job_name, None)
        return self.rejected.pop(job_name, default)

    def cancel(self, job_name: str) -> bool:
        found = self.holds(job_name) or job_name in self.rejected
        self.remove(job_name)
        self.ready.pop(job_name, None)
        self.take_rejection(job_name)
        return found

    def drop_owners(self, dead_owners: set[str]) -> list[str]:
        """Forget jobs whose driver died, waiting or placed but not collected: nobody will
        collect them (the caller releases their reservations)."""
        gone = [name for name, job in self.waiting.items() if job.owner in dead_owners]
        gone += [name for name, p in self.ready.items() if p.owner in dead_owners]
        for name in gone:
            self.remove(name)
            self.ready.pop(name, None)
        return gone

    def drop_rejections_of(self, dead_owners: set[str]) -> list[str]:
        """Forget the rejections kept for drivers that died: nobody will poll for them (kept,
        they grew the saved state without bound). Those of no known owner stay."""
        gone = [name for name, owner in self.rejected_owners.items()
                if owner and owner in dead_owners]
        for name in gone:
            self.take_rejection(name)
        return gone

    def to_dict(self) -> dict:
        return {"waiting": [job.to_dict() for job in self.ordered()],
                "ready": {name: placement_to_dict(p) for name, p in self.ready.items()},
                # Dropped jobs' reasons, until their drivers poll: a restart in between
                # would otherwise tell them only "not in the queue".
                "rejected": {name: dataclasses.asdict(r) for name, r in self.rejected.items()},
                "rejected_owners": self.rejected_owners}

    @classmethod
    def from_dict(cls, data: dict, level: Callable[[float], int] | None = None,
                  promote_after: Callable[[QueuedJob], float | None] | None = None,
                  problems: list[str] | None = None) -> "JobQueue":
        """The queue persisted by to_dict, entry by entry: one that cannot be read is named
        in `problems` and skipped, the others kept in their order."""
        queue = cls(level, promote_after)
        problems = [] if problems is None else problems

        def each(key: str, what: str, restore) -> None:
            entries = data.get(key, {})
            if isinstance(entries, Mapping):
                entries = entries.items()
            elif key == "waiting" and isinstance(entries, list):
                entries = ((item.get("spec", {}).get("name", i) if isinstance(item, dict)
                            and isinstance(item.get("spec"), dict) else i, item)
                           for i, item in enumerate(entries))
            else:
                problems.append(f"cannot restore the queue's {key}, skipping it: a JSON "
                                f"{json_type(entries)}")
                return
            for name, value in entries:
                try:
                    restore(name, value)
                except Exception as e:
                    problems.append(f"cannot restore {what} {name!r}, skipping it: "
                                    f"{type(e).__name__}: {e}")

        each("waiting", "queued job", lambda _, item: queue.add(QueuedJob.from_dict(item)))
        each("ready", "placed job", lambda name, p: queue.ready.__setitem__(
            name, placement_from_dict(p, f"the placement of {name!r}")))
        each("rejected", "rejection", lambda name, r: queue.rejected.__setitem__(
            name, Rejection(**saved_fields(Rejection, r, f"the rejection of {name!r}"))))
        each("rejected_owners", "the owner of rejected job",
             lambda name, owner: queue.rejected_owners.__setitem__(name, _saved_str(owner)))
        return queue
