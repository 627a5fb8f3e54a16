"""SchedulerActor: holds the ClusterState and the wait queue, answers placement requests.

A thin shell around orchestrator.placement / inventory / queue. What it adds is what needs
Ray: its own clock, a maintenance thread (agents for new nodes, Ray's view of dead nodes,
heartbeat expiry, reclaiming dead drivers' reservations, draining the queue), and
persistence of reservations and queue in Ray's GCS key-value store, so a restarted scheduler
(max_restarts=-1) forgets nothing it had promised.
"""
from __future__ import annotations

import json
import logging
import threading
import time

import ray

from orchestrator.config import JobSpec
from orchestrator.inventory import ClusterState, NodeReport
from orchestrator.placement import Placement, PlacementError, Queued, Rejection, place
from orchestrator.queue import JobQueue

log = logging.getLogger(__name__)

SCHEDULER_NAME = "orchestrator-scheduler"
NAMESPACE = "orchestrator"
STATE_KEY = b"scheduler-state"


class _GcsStore:
    """Scheduler state in the GCS key-value store: it outlives the actor's process, and the
    GCS is what the whole cluster already depends on (no extra service, no shared disk)."""

    def load(self) -> dict:
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(STATE_KEY, namespace=NAMESPACE)
        return json.loads(raw) if raw else {}

    def save(self, data: dict) -> None:
        from ray.experimental.internal_kv import _internal_kv_put

        _internal_kv_put(STATE_KEY, json.dumps(data).encode(), overwrite=True,
                         namespace=NAMESPACE)


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class SchedulerActor:
    def __init__(self, suspect_after_s: float = 15.0, dead_after_s: float = 60.0,
                 maintain_every_s: float = 5.0, max_load_per_cpu: float = float("inf"),
                 inter_group_gbps: float = 1.25) -> None:
        self.state = ClusterState(suspect_after_s=suspect_after_s, dead_after_s=dead_after_s,
                                  inter_group_gbps=inter_group_gbps,
                                  max_load_per_cpu=max_load_per_cpu)
        self.store = _GcsStore()
        saved = self.store.load()
        self.state.restore_reservations(saved.get("reservations", {}))
        self.queue = JobQueue.from_dict(saved.get("queue", {}))
        if saved:
            log.warning("scheduler restarted: restored %d reservation(s), %d queued job(s)",
                        len(self.state.reservations), len(self.queue.waiting))
        # Methods run on Ray's thread and the maintenance loop on its own: one lock.
        self.lock = threading.RLock()
        self.maintain_every_s = maintain_every_s
        threading.Thread(target=self._maintain_forever, name="scheduler-maintenance",
                         daemon=True).start()

    # -- agents ---------------------------------------------------------------------------
    def report(self, report: NodeReport) -> None:
        with self.lock:
            self.state.update(report, now=time.time())

    # -- placement ------------------------------------------------------------------------
    def place(self, spec: JobSpec, owner: str = "", dry_run: bool = False,
              explain: bool | None = None) -> Placement | Rejection:
        """Place now and reserve for `owner` (the caller's Ray job id), or say why not.
        Errors come back as data, not exceptions: the caller gets the reasons, no traceback."""
        with self.lock:
            self._reclaim_orphans()
            try:
                placement = place(spec, self.state, now=time.time(), owner=owner,
                                  explain=explain)
            except PlacementError as e:
                return e.rejection
            if not dry_run:
                self.state.reserve(spec.name, placement.reservations())
                self._persist()
            return placement

    def submit(self, spec: JobSpec, owner: str = "") -> Placement | Queued | Rejection:
        """Place now, or queue the job when it fits the cluster but not its free capacity;
        reject only what can never fit (or a duplicate name)."""
        with self.lock:
            decision = self.place(spec, owner)
            if isinstance(decision, Rejection) and decision.fits_when_free \
                    and spec.name not in self.queue.waiting:
                decision = self.queue.add(spec, owner, time.time(),
                                          decision.message.splitlines()[0])
                self._persist()
            return decision

    def poll(self, job_name: str) -> Placement | Queued | Rejection:
        """A queued job's state: its placement once made (collected once), else its place in
        line and what it waits for."""
        with self.lock:
            self._drain()
            if job_name in self.queue.ready:
                placement = self.queue.ready.pop(job_name)
                self._persist()
                return placement
            status = self.queue.status(job_name)
            return status or Rejection(job_name, f"job '{job_name}' is not in the queue")

    def cancel(self, job_name: str) -> bool:
        """Leave the queue, and release anything placed for the job."""
        with self.lock:
            found = self.queue.cancel(job_name) | self.state.release(job_name)
            self._persist()
            return found

    def release(self, job_name: str) -> bool:
        with self.lock:
            released = self.state.release(job_name)
            self._drain()
            self._persist()
            return released

    def reclaim_orphans(self) -> list[str]:
        """Release the reservations of jobs whose driver has exited; returns those jobs."""
        with self.lock:
            return self._reclaim_orphans()

    def snapshot(self) -> dict:
        with self.lock:
            now = time.time()
            return {
                "reports": dict(self.state.reports),
                "age_s": {n: now - t for n, t in self.state.last_seen.items()},
                "health": {n: self.state.health(n, now) for n in self.state.reports},
                "reservations": dict(self.state.reservations),
                "queue": [self.queue.status(name) for name in self.queue.waiting],
                "bandwidth_gbps": {n: dict(r.bandwidth_gbps)
                                   for n, r in self.state.reports.items()},
            }

    # -- maintenance ----------------------------------------------------------------------
    def maintain(self) -> dict:
        """One maintenance pass (also run by the timer thread); returns what it changed."""
        alive, gone = _ray_nodes()
        with self.lock:
            now = time.time()
            changes = {"dead_by_ray": [], "expired": [], "lost_reservations": []}
            for node_id in gone & set(self.state.reports) - self.state.dead:
                changes["dead_by_ray"].append(node_id)
                changes["lost_reservations"] += self.state.mark_dead(node_id)
            expired, lost = self.state.expire(now)
            changes["expired"], changes["lost_reservations"] = expired, \
                changes["lost_reservations"] + lost
            changes["orphans_released"] = self._reclaim_orphans()
            changes["placed_from_queue"] = [p.job_name for p in self._drain()]
            unreported = [n for n in alive if self.state.health(n, now) != "healthy"]
            if any(changes.values()):
                log.warning("scheduler maintenance: %s", changes)
                self._persist()
        if unreported:  # outside the lock: creating actors can take a while
            _ensure_agents_on(unreported)
        changes["agents_ensured"] = unreported
        return changes

    def _maintain_forever(self) -> None:
        while True:
            time.sleep(self.maintain_every_s)
            try:
                self.maintain()
            except Exception as e:  # keep maintaining: the next pass may succeed
                log.warning("scheduler maintenance failed: %s", e)

    def _drain(self) -> list[Placement]:
        placed = self.queue.drain(self.state, time.time())
        if placed:
            self._persist()
        return placed

    def _reclaim_orphans(self) -> list[str]:
        dead = _dead_drivers()
        released = self.state.release_orphans(dead)
        dropped = self.queue.drop_owners(dead)
        if released or dropped:
            log.warning("driver(s) died: released %s, dropped from queue %s", released, dropped)
            self._persist()
        return released

    def _persist(self) -> None:
        self.store.save({"reservations": self.state.reservations_to_dict(),
                         "queue": self.queue.to_dict()})


def _ray_nodes() -> tuple[set[str], set[str]]:
    """(alive, dead) node ids as Ray's GCS sees them."""
    nodes = ray.nodes()
    return ({n["NodeID"] for n in nodes if n["Alive"]},
            {n["NodeID"] for n in nodes if not n["Alive"]})


def _ensure_agents_on(node_ids: list[str]) -> None:
    from actors.cluster import ensure_agent  # import here: cluster imports this module

    for node_id in node_ids:
        try:
            ensure_agent(node_id)
        except Exception as e:  # a node going away while we create its agent
            log.warning("cannot start a node agent on %s: %s", node_id[:12], e)


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
