"""The wait queue of jobs that fit the cluster but not its free capacity right now.

Pure data: the scheduler actor calls `drain` whenever capacity may have appeared (a release,
a new node, a timer). Higher priority first, then first come first served; a smaller job
behind a blocked large one may still be placed (backfill) rather than idling capacity.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from orchestrator.config import JobSpec
from orchestrator.inventory import ClusterState
from orchestrator.placement import Placement, PlacementError, Queued, Rejection, place


@dataclass
class QueuedJob:
    spec: JobSpec
    owner: str
    enqueued_at: float
    reason: str = ""


class JobQueue:
    def __init__(self) -> None:
        self.waiting: dict[str, QueuedJob] = {}
        self.ready: dict[str, Placement] = {}  # placed from the queue, not yet collected
        self.rejected: dict[str, Rejection] = {}  # can no longer ever fit (the cluster shrank)

    def holds(self, job_name: str) -> bool:
        return job_name in self.waiting or job_name in self.ready

    def owner_of(self, job_name: str) -> str | None:
        if job_name in self.waiting:
            return self.waiting[job_name].owner
        if job_name in self.ready:
            return self.ready[job_name].owner
        return None

    def outranks(self, spec: JobSpec) -> bool:
        """Does a waiting job of higher priority come before `spec`? Then spec must queue
        behind it rather than jump ahead by being submitted later."""
        return any(j.spec.priority > spec.priority for j in self.waiting.values())

    def add(self, spec: JobSpec, owner: str, now: float, reason: str) -> Queued:
        self.waiting[spec.name] = QueuedJob(spec, owner, now, reason)
        return self.status(spec.name)

    def _order(self) -> list[QueuedJob]:
        return sorted(self.waiting.values(), key=lambda j: (-j.spec.priority, j.enqueued_at))

    def status(self, job_name: str) -> Queued | None:
        for position, job in enumerate(self._order(), start=1):
            if job.spec.name == job_name:
                return Queued(job_name, position, job.reason)
        return None

    def drain(self, state: ClusterState, now: float) -> list[Placement]:
        """Place and reserve every waiting job that fits now, in queue order."""
        placed = []
        for job in self._order():
            try:
                placement = place(job.spec, state, now, owner=job.owner, explain=False)
            except PlacementError as e:
                if not e.rejection.fits_when_free:  # nodes left for good: it never will
                    self.rejected[job.spec.name] = e.rejection
                    del self.waiting[job.spec.name]
                else:
                    job.reason = e.rejection.message.splitlines()[0]
                continue
            state.reserve(job.spec.name, placement.reservations())
            del self.waiting[job.spec.name]
            self.ready[job.spec.name] = placement
            placed.append(placement)
        return placed

    def cancel(self, job_name: str) -> bool:
        found = self.holds(job_name) or job_name in self.rejected
        for pending in (self.waiting, self.ready, self.rejected):
            pending.pop(job_name, None)
        return found

    def drop_owners(self, dead_owners: set[str]) -> list[str]:
        """Forget jobs whose driver died, waiting or placed but not collected: nobody will
        collect them (their reservations are released by the caller)."""
        gone = [name for name, job in self.waiting.items() if job.owner in dead_owners]
        gone += [name for name, p in self.ready.items() if p.owner in dead_owners]
        for name in gone:
            self.waiting.pop(name, None)
            self.ready.pop(name, None)
        return gone

    def to_dict(self) -> dict:
        return {
            "waiting": [{"spec": j.spec.to_dict(), "owner": j.owner,
                         "enqueued_at": j.enqueued_at, "reason": j.reason}
                        for j in self.waiting.values()],
            "ready": {name: dataclasses.asdict(p) for name, p in self.ready.items()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> "JobQueue":
        queue = cls()
        for j in data.get("waiting", []):
            spec = JobSpec.from_dict(j["spec"])
            queue.waiting[spec.name] = QueuedJob(spec, j["owner"], j["enqueued_at"], j["reason"])
        for name, p in data.get("ready", {}).items():
            queue.ready[name] = Placement(**{**p, "worker_nodes": tuple(p["worker_nodes"])})
        return queue
