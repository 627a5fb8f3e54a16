"""The wait queue: jobs that fit the cluster but not its free capacity right now.

Pure data, no placement: the scheduling core (orchestrator/scheduler_core.py) decides who
starts. Order: higher priority first; within a priority class, the lower service level first
(least attained service, Tiresias-style: the core's `level` function maps a job's GPU-seconds
run so far to a level; 0 for every job under FIFO); then first submitted (a preempted job
keeps its original submit time, so it goes back near the front of its level, not to the end).

Besides the waiting jobs it holds two mailboxes, since drivers learn of decisions by polling:
`ready` (placed from the queue, not yet collected by the driver) and `rejected` (dropped:
the cluster shrank and the job can never fit, or an operator cancelled it).
"""
from __future__ import annotations

import bisect
import dataclasses
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from orchestrator.config import JobSpec
from orchestrator.placement import Placement, Queued, Rejection


@dataclass
class QueuedJob:
    """A job waiting in the scheduler's queue: its spec, the driver that owns it, when it was
    first submitted (its place in line) and what it has been through (preemptions, time run)."""

    spec: JobSpec
    owner: str
    enqueued_at: float  # first submission: the queue order, and what ageing counts from
    reason: str = ""
    preemptions: int = 0  # times this job was preempted (ageing: see SchedulerSettings)
    ran_s: float = 0.0  # run time in earlier placements, before it was preempted

    @property
    def attained_s(self) -> float:
        """Service received so far: run time x GPUs (x workers for a CPU job)."""
        return self.ran_s * service_size(self.spec)

    def to_dict(self) -> dict:
        return {"spec": self.spec.to_dict(), "owner": self.owner,
                "enqueued_at": self.enqueued_at, "reason": self.reason,
                "preemptions": self.preemptions, "ran_s": self.ran_s}

    @classmethod
    def from_dict(cls, data: dict) -> "QueuedJob":
        return cls(JobSpec.from_dict(data["spec"]), data["owner"], data["enqueued_at"],
                   data.get("reason", ""), data.get("preemptions", 0), data.get("ran_s", 0.0))


def service_size(spec: JobSpec) -> int:
    """What one second of a job's run counts as attained service: its GPUs (its workers for a
    CPU job), as Tiresias' 2D-LAS counts GPU-time."""
    return spec.total_gpus or spec.num_workers


def placement_to_dict(placement: Placement) -> dict:
    return dataclasses.asdict(placement)


def placement_from_dict(data: dict) -> Placement:
    return Placement(**{**data, "worker_nodes": tuple(data["worker_nodes"])})


def allowed_families(spec: JobSpec) -> tuple[str, ...]:
    """The accelerator families a job may use, upper-cased and sorted; () = any."""
    return tuple(sorted({t.upper() for t in spec.accelerator_types}))


class JobQueue:
    """The scheduler's wait queue (pure data): waiting jobs in priority then submission order,
    placements made from the queue until their drivers collect them, and jobs dropped with the
    reason their drivers will be told."""

    def __init__(self, level: Callable[[float], int] | None = None) -> None:
        """`level(attained GPU-seconds)`: the job's service level (lower goes first within a
        priority class); None = FIFO within a class."""
        self.level = level
        self.waiting: dict[str, QueuedJob] = {}
        self._order: list[tuple] = []  # sorted order keys of the waiting jobs
        self._keys: dict[str, tuple] = {}  # each waiting job's key (its level is fixed while it
        # waits: attained service grows only while running)
        # Waiting GPU jobs' GPUs by the families they may use (() = any): what each family's
        # waiting demand is, without a pass over the queue.
        self.gpus_by_allowed: Counter = Counter()
        self.sizes_by_allowed: Counter = Counter()  # (allowed families, GPUs) -> waiting jobs
        self.ready: dict[str, Placement] = {}  # placed from the queue, not yet collected
        self.rejected: dict[str, Rejection] = {}  # dropped; told to the driver on its poll

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
        if job.spec.total_gpus:
            allowed = allowed_families(job.spec)
            self.gpus_by_allowed[allowed] += job.spec.total_gpus
            self.sizes_by_allowed[allowed, job.spec.total_gpus] += 1

    def remove(self, job_name: str) -> QueuedJob | None:
        job = self.waiting.pop(job_name, None)
        if job is not None:
            key = self._keys.pop(job_name)
            del self._order[bisect.bisect_left(self._order, key)]
            if job.spec.total_gpus:
                allowed = allowed_families(job.spec)
                self.gpus_by_allowed[allowed] -= job.spec.total_gpus
                if not self.gpus_by_allowed[allowed]:
                    del self.gpus_by_allowed[allowed]
                shape = (allowed, job.spec.total_gpus)
                self.sizes_by_allowed[shape] -= 1
                if not self.sizes_by_allowed[shape]:
                    del self.sizes_by_allowed[shape]
        return job

    def order_key(self, job: QueuedJob) -> tuple:
        level = self.level(job.attained_s) if self.level is not None else 0
        return (-job.spec.priority, level, job.enqueued_at, job.spec.name)

    def level_of(self, job_name: str) -> int:
        return self._keys[job_name][1]

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
        self.remove(job_name)
        self.rejected[job_name] = rejection

    def cancel(self, job_name: str) -> bool:
        found = self.holds(job_name) or job_name in self.rejected
        self.remove(job_name)
        self.ready.pop(job_name, None)
        self.rejected.pop(job_name, None)
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

    def to_dict(self) -> dict:
        return {"waiting": [job.to_dict() for job in self.ordered()],
                "ready": {name: placement_to_dict(p) for name, p in self.ready.items()}}

    @classmethod
    def from_dict(cls, data: dict, level: Callable[[float], int] | None = None) -> "JobQueue":
        queue = cls(level)
        for item in data.get("waiting", []):
            queue.add(QueuedJob.from_dict(item))
        for name, p in data.get("ready", {}).items():
            queue.ready[name] = placement_from_dict(p)
        return queue
