"""Callbacks that run in Ray Train's controller for jobs/pretrain.py.

MetricsLog: every report of rank 0 appended to the run's metrics.jsonl as it happens (a user's
loop; jobs/pretrain.py's writes its own: RayTrainSession._log).

FollowPlacement: keep a Ray Train run on nodes the scheduler chose, also after one is lost.
Each worker is pinned to its placed node by a label selector. When a node dies, Ray Train
restarts the worker group with the same selectors, and a worker pinned to the dead node could
never start again: Ray Train would wait for it and retry forever. This callback runs in Ray
Train's controller before every worker-group start; when a placed node is no longer alive, it
asks the scheduler to place the job again (the dead node excluded, the old reservation
released) and points the selectors at the new nodes, so the run resumes from its latest
checkpoint on the nodes that are left.

WatchStuckRanks: a user loop's rank stuck in its own code (neither reporting nor returning)
while the others wait for it fails as that worker's failure after `stuck_timeout_s`, named
(orchestrator/stuck_ranks.py decides), where the others waited for the process group's
30-minute timeout with no message (and, once they had all returned, for as long as it stayed
stuck).

FollowPlacement uses Ray Train's ControllerCallback (a DeveloperAPI that RunConfig.callbacks accepts "for
custom workarounds built on top of internal callbacks"), the only hook that runs between a
failure and the next worker-group start.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import ray
from ray.train import UserCallback
from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback

from orchestrator.config import JobSpec
from orchestrator.job_exit import CALL_TIMEOUT_S
from orchestrator.placement import Placement, Queued, Rejection
from orchestrator.runs import append_metrics
from orchestrator.stuck_ranks import stuck_verdict
from ray_layer.scheduler_client import SchedulerLink, get_scheduler

log = logging.getLogger(__name__)


class MetricsLog(UserCallback):
    """Rank 0's reports appended to <run_dir>/metrics.jsonl. Ray Train's controller, where
    this runs, lives on the driver's node, where the run directory is."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        append_metrics(self.run_dir, metrics[0], checkpoint.path if checkpoint else None)


class NodeLostError(RuntimeError):
    """A placed node is gone and the job cannot be placed on the nodes that are left."""


class JobCancelled(RuntimeError):
    """An operator cancelled the job, and a node of it was lost before it stopped."""


class FollowPlacement(ControllerCallback):
    """Ray Train controller callback that keeps a run on the nodes the scheduler chose: before
    each worker-group start it has a lost node's workers placed again and points the label
    selectors at the new nodes."""

    def __init__(self, spec: JobSpec, owner: str, timeout_s: float = 600.0,
                 reconnect: Callable[..., Any] = get_scheduler) -> None:
        self.spec, self.owner, self.timeout_s = spec, owner, timeout_s
        # How a scheduler is found (and brought up again, killed for good): the driver's way.
        self.reconnect = reconnect
        self.scaling_config = None

    def after_controller_start(self, train_run_context) -> None:
        # The controller reads its selectors from this very object at every worker-group
        # start, so updating the list in place redirects the next start.
        self.scaling_config = train_run_context.scaling_config

    def after_controller_state_update(self, previous_state, current_state) -> None:
        from ray.train.v2._internal.execution.controller.state import SchedulingState

        if isinstance(current_state, SchedulingState) and self.scaling_config is not None:
            self.follow_lost_nodes()

    def follow_lost_nodes(self) -> None:
        selectors = self.scaling_config.label_selector
        lost = lost_nodes({selector["ray.io/node-id"] for selector in selectors})
        if not lost:
            return
        placement = self._replace(lost)
        selectors[:] = placement.label_selectors()
        log.warning("node(s) %s lost: %s re-placed on %s", ", ".join(n[:12] for n in lost),
                    self.spec.name, ", ".join(n[:12] for n in placement.worker_nodes))

    def _replace(self, lost: list[str]) -> Placement:
        """A new placement from the scheduler, waiting while the cluster is busy (the
        capacity may come back: the autoscaler adds a node, another job ends). A scheduler
        killed for good is found again (SchedulerUnreachable when none answers)."""
        link = SchedulerLink(None, self.reconnect)
        decision = link.ask("replace", self.spec, self.owner, lost, timeout_s=CALL_TIMEOUT_S)
        # A job preempted as it lost the node waits as long as it takes to get back in, as
        # any preempted job does; one that only lost a node, up to --queue-timeout.
        deadline = math.inf if isinstance(decision, Queued) and decision.preempted \
            else time.monotonic() + self.timeout_s
        while isinstance(decision, Queued):  # waits in the queue (it may preempt) for room
            if time.monotonic() > deadline:
                raise NodeLostError(_lost_message(self.spec.name, lost, decision))
            time.sleep(min(2.0, max(deadline - time.monotonic(), 0.0)))
            # A poll's tries together end by the deadline: each waiting CALL_TIMEOUT_S held a
            # hung scheduler's job up to 3 x 60 s past --queue-timeout.
            decision = link.ask("poll", self.spec.name, self.owner, timeout_s=CALL_TIMEOUT_S,
                                deadline=None if deadline == math.inf else deadline)
        if isinstance(decision, Placement):
            return decision
        if decision.cancelled:  # told to stop before the node was lost: it stops here
            raise JobCancelled(decision.message)
        raise NodeLostError(_lost_message(self.spec.name, lost, decision))


def lost_nodes(node_ids: set[str], timeout_s: float = 2.0) -> list[str]:
    """The nodes among `node_ids` that are gone: listed dead by Ray, or whose raylet refuses
    connections. The second catches a node lost a moment ago: Ray Train restarts the worker
    group within a second of a worker's death, while the GCS declares a node dead only after
    several missed health checks (~15 s by default) - and a worker group waiting for a dead
    node gives up only after RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s)."""
    import socket

    by_id = {n["NodeID"]: n for n in ray.nodes()}
    lost = []
    for node_id in sorted(node_ids):
        node = by_id.get(node_id)
        if node is None or not node["Alive"]:
            lost.append(node_id)
            continue
        try:
            socket.create_connection((node["NodeManagerAddress"], node["NodeManagerPort"]),
                                     timeout=timeout_s).close()
        except OSError:
            lost.append(node_id)
    return lost


def _lost_message(job_name: str, lost: list[str], decision: Rejection | Queued) -> str:
    why = decision.message if isinstance(decision, Rejection) else (
        f"it waited in the queue until --queue-timeout (position {decision.position}: "
        f"{decision.reason})")
    return (f"node(s) {', '.join(n[:12] for n in lost)} of job '{job_name}' were lost and the "
            f"job cannot be placed on the nodes that are left: {why}")


class StuckRank(RuntimeError):
    """A worker of a user loop neither reported nor returned for stuck_timeout_s while the
    others waited for it (orchestrator/stuck_ranks.py)."""


class WatchStuckRanks(WorkerGroupCallback):
    """Every `check_every_s`, asks each worker where its loop is (ray_layer.user_loop.progress,
    run in the worker's actor beside the loop: nothing is added to a report) without waiting
    for the answers, which a later poll of the controller collects; when stuck_verdict names
    stuck ranks, their status carries a StuckRank error, which Ray Train's controller handles
    as any worker's failure (a restart from the latest checkpoint within max_failures, then
    the run fails naming it)."""

    def __init__(self, timeout_s: float, check_every_s: float | None = None) -> None:
        self.timeout_s = timeout_s
        self.check_every_s = check_every_s or min(10.0, timeout_s / 4)
        self._reset(None)

    def _reset(self, worker_group) -> None:
        self.worker_group, self.asked, self.asked_at = worker_group, None, time.monotonic()

    def after_worker_group_start(self, worker_group) -> None:
        self._reset(worker_group)

    def before_worker_group_shutdown(self, worker_group) -> None:
        self._reset(None)

    def after_worker_group_poll_status(self, worker_group_status) -> None:
        try:  # never a failure of the run's own: a watch that fails watches no more
            self._check(worker_group_status)
        except Exception as e:  # noqa: BLE001
            log.warning("the watch for stuck ranks stopped: %s: %s", type(e).__name__, e)
            self._reset(None)

    def _check(self, worker_group_status) -> None:
        from ray_layer.user_loop import progress

        if self.worker_group is None:
            return
        now = time.monotonic()
        if self.asked is None:
            if now - self.asked_at >= self.check_every_s:
                self.asked = self.worker_group.execute_async(progress, self.timeout_s)
                self.asked_at = now
            return
        ready, _ = ray.wait(self.asked, num_returns=len(self.asked), timeout=0)
        if len(ready) < len(self.asked) and now - self.asked_at < self.check_every_s:
            return  # (a worker that does not answer is neither named nor waited on)
        answers = {}
        for rank, ref in enumerate(self.asked):
            try:
                answers[rank] = ray.get(ref, timeout=0) if ref in ready else None
            except Exception:  # noqa: BLE001 (a dead worker: Ray Train's own poll says so)
                answers[rank] = None
        self.asked, self.asked_at = None, now
        verdict = stuck_verdict(answers, self.timeout_s)
        if verdict is None:
            return
        ranks, message = verdict
        log.error("%s", message)
        for rank in ranks:
            status = worker_group_status.worker_statuses.get(rank)
            if status is not None and status.error is None:
                status.error = StuckRank(message)
