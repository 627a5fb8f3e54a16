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
from orchestrator.placement import Placement, PlacementError, Queued, place


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
                placement = place(job.spec, state, now, owner=job.owner)
            except PlacementError as e:
                job.reason = e.rejection.message.splitlines()[0]
                continue
            state.reserve(job.spec.name, placement.reservations())
            del self.waiting[job.spec.name]
            self.ready[job.spec.name] = placement
            placed.append(placement)
        return placed

    def cancel(self, job_name: str) -> bool:
        return (self.waiting.pop(job_name, None) or self.ready.pop(job_name, None)) is not None

    def drop_owners(self, dead_owners: set[str]) -> list[str]:
        """Forget waiting jobs whose driver died: nobody will collect their placement."""
        gone = [name for name, job in self.waiting.items() if job.owner in dead_owners]
        for name in gone:
            del self.waiting[name]
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
