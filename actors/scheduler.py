"""SchedulerActor: holds the ClusterState and answers placement requests.

A thin shell: the decisions are made by orchestrator.placement; this actor only keeps the
state between calls and stamps reports with its own clock.
"""
from __future__ import annotations

import time

import ray

from orchestrator.config import JobSpec
from orchestrator.inventory import ClusterState, NodeReport
from orchestrator.placement import Placement, PlacementError, Rejection, place

SCHEDULER_NAME = "orchestrator-scheduler"
NAMESPACE = "orchestrator"


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class SchedulerActor:
    def __init__(self, stale_after_s: float = 30.0) -> None:
        self.state = ClusterState(stale_after_s=stale_after_s)

    def report(self, report: NodeReport) -> None:
        self.state.update(report, now=time.time())

    def place(self, spec: JobSpec) -> Placement | Rejection:
        """Place and reserve, or say why not. Errors come back as data, not exceptions, so
        the caller gets the reasons without a remote traceback."""
        try:
            placement = place(spec, self.state, now=time.time())
        except PlacementError as e:
            return e.rejection
        self.state.reserve(spec.name, placement.reservations())
        return placement

    def release(self, job_name: str) -> bool:
        return self.state.release(job_name)

    def snapshot(self) -> dict:
        now = time.time()
        return {
            "reports": dict(self.state.reports),
            "age_s": {n: now - t for n, t in self.state.last_seen.items()},
            "reservations": dict(self.state.reservations),
        }
