"""SchedulerActor: holds the ClusterState and answers placement requests.

A thin shell: the decisions are made by orchestrator.placement; this actor only keeps the
state between calls and stamps reports with its own clock.
"""
from __future__ import annotations

import logging
import time

import ray

from orchestrator.config import JobSpec
from orchestrator.inventory import ClusterState, NodeReport
from orchestrator.placement import Placement, PlacementError, Rejection, place

log = logging.getLogger(__name__)

SCHEDULER_NAME = "orchestrator-scheduler"
NAMESPACE = "orchestrator"


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class SchedulerActor:
    def __init__(self, stale_after_s: float = 30.0) -> None:
        self.state = ClusterState(stale_after_s=stale_after_s)

    def report(self, report: NodeReport) -> None:
        self.state.update(report, now=time.time())

    def place(self, spec: JobSpec, owner: str = "") -> Placement | Rejection:
        """Place and reserve for `owner` (the caller's Ray job id), or say why not. Errors come
        back as data, not exceptions, so the caller gets the reasons without a traceback."""
        self.reclaim_orphans()
        try:
            placement = place(spec, self.state, now=time.time(), owner=owner)
        except PlacementError as e:
            return e.rejection
        self.state.reserve(spec.name, placement.reservations())
        return placement

    def reclaim_orphans(self) -> list[str]:
        """Release the reservations of jobs whose driver has exited; returns those jobs."""
        released = self.state.release_orphans(_dead_drivers())
        if released:
            log.warning("released reservations of jobs whose driver died: %s", released)
        return released

    def release(self, job_name: str) -> bool:
        return self.state.release(job_name)

    def snapshot(self) -> dict:
        now = time.time()
        return {
            "reports": dict(self.state.reports),
            "age_s": {n: now - t for n, t in self.state.last_seen.items()},
            "reservations": dict(self.state.reservations),
        }


def _dead_drivers() -> set[str]:
    """Ray job ids of drivers that have exited. Ray has no public job-table API that works
    without the dashboard, so this reads the GCS job table through ray._private.state; if that
    fails, nothing is reclaimed (never the reverse)."""
    try:
        from ray._private.state import jobs

        return {job["JobID"] for job in jobs() if job.get("IsDead")}
    except Exception as e:
        log.warning("cannot read the job table to reclaim reservations: %s", e)
        return set()
