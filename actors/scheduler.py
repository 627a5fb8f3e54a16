"""SchedulerActor: holds the ClusterState and the wait queue, answers placement requests.

A thin shell around orchestrator.placement / inventory / queue. What it adds is what needs
Ray: its own clock, a maintenance thread (agents for new nodes, Ray's view of dead nodes,
heartbeat expiry, reclaiming dead drivers' reservations, draining the queue), and
persistence of reservations and queue in Ray's GCS key-value store, so a restarted scheduler
(max_restarts=-1) forgets nothing it had promised.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time

import ray

from actors.telemetry import record, record_all
from orchestrator import metrics
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
        self.queue = JobQueue()
        self.placements: dict[str, Placement] = {}  # every job holding a reservation
        self._restore()
        # Node ids as Ray's GCS last listed them: reports are accepted only for alive ones.
        self._ray_alive: set[str] = set()
        self._ray_dead: set[str] = set()
        self._ray_checked_at = float("-inf")
        self._refused_nodes: set[str] = set()
        # Methods run on Ray's thread and the maintenance loop on its own: one lock.
        self.lock = threading.RLock()
        self.maintain_every_s = maintain_every_s
        threading.Thread(target=self._maintain_forever, name="scheduler-maintenance",
                         daemon=True).start()

    # -- agents ---------------------------------------------------------------------------
    def report(self, report: NodeReport) -> bool:
        """Take a node agent's report; False if refused. Only nodes Ray lists alive count: a
        report for a node id Ray never listed (a mistyped or forged id) or one Ray declared
        dead (a stale agent) is refused, counted and logged once per node, so it can never
        bring back capacity that is not there."""
        reason = self._report_refusal(report.node_id)
        if reason:
            record(metrics.SCHEDULER_REPORTS_REFUSED, 1, reason=reason)
            if report.node_id not in self._refused_nodes:
                self._refused_nodes.add(report.node_id)
                log.warning("refused a report for node %s: %s (logged once per node)",
                            report.node_id[:16], reason)
            return False
        with self.lock:
            self.state.update(report, now=time.time())
        return True

    def _report_refusal(self, node_id: str) -> str | None:
        if node_id not in self._ray_alive and time.monotonic() - self._ray_checked_at > 1.0:
            # A node that joined since the last maintenance pass: ask Ray, at most once a
            # second, so a flood of bad reports cannot turn into a flood of GCS queries.
            self._note_ray_nodes(*_ray_nodes()[:2])
        if node_id in self._ray_alive:
            return None
        return metrics.REPORT_DEAD_NODE if node_id in self._ray_dead else \
            metrics.REPORT_UNKNOWN_NODE

    def _note_ray_nodes(self, alive: set[str], dead: set[str]) -> None:
        self._ray_alive, self._ray_dead = alive, dead
        self._ray_checked_at = time.monotonic()

    # -- placement ------------------------------------------------------------------------
    def place(self, spec: JobSpec, owner: str = "", dry_run: bool = False,
              explain: bool | None = None) -> Placement | Rejection:
        """Place now and reserve for `owner` (the caller's Ray job id), or say why not.
        Errors come back as data, not exceptions: the caller gets the reasons, no traceback.
        A retry by the same owner (e.g. Ray re-sending after a scheduler restart) gets the
        placement it already has."""
        start = time.perf_counter()
        decision = self._place(spec, owner, dry_run, explain)
        if not dry_run:  # a dry run (`status`/`place` CLI, queue checks) decides nothing
            record_all(metrics.decision_samples(decision, time.perf_counter() - start))
        return decision

    def _place(self, spec: JobSpec, owner: str = "", dry_run: bool = False,
               explain: bool | None = None) -> Placement | Rejection:
        with self.lock:
            self._reclaim_orphans()
            held = self.placements.get(spec.name)
            if held is not None and not dry_run and owner and held.owner == owner:
                return held
            try:
                placement = place(spec, self.state, now=time.time(), owner=owner,
                                  explain=explain)
            except PlacementError as e:
                return e.rejection
            if not dry_run:
                self.state.reserve(spec.name, placement.reservations())
                self.placements[spec.name] = placement
                self._persist()
            return placement

    def replace(self, spec: JobSpec, owner: str, lost_nodes: list[str]) -> Placement | Rejection:
        """A running job lost node(s): mark them dead, release the job's reservation and place
        it afresh (its whole worker group restarts anyway). Only the job's owner may; a job
        that holds nothing is placed like a new one. The owner's word is taken before Ray's,
        which declares a node dead only after missed health checks: a node wrongly reported
        lost comes back with its agent's next report."""
        start = time.perf_counter()
        with self.lock:
            held_by = self._owner(spec.name)
            if held_by not in (owner, None):
                return Rejection(spec.name, f"job '{spec.name}' is held by another driver")
            for node_id in lost_nodes:
                self.state.mark_dead(node_id)
            self._release(spec.name)
            decision = self._place(spec, owner)
            self._persist()
        record_all(metrics.decision_samples(decision, time.perf_counter() - start))
        return decision

    def submit(self, spec: JobSpec, owner: str = "") -> Placement | Queued | Rejection:
        """Place now, or queue the job when it fits the cluster but not its free capacity (or
        higher-priority jobs wait); reject only what can never fit, or a name in use."""
        start = time.perf_counter()
        decision = self._submit(spec, owner)
        record_all(metrics.decision_samples(decision, time.perf_counter() - start))
        return decision

    def _submit(self, spec: JobSpec, owner: str) -> Placement | Queued | Rejection:
        with self.lock:
            if self.queue.holds(spec.name):
                if owner and self.queue.owner_of(spec.name) == owner:  # a retried call
                    return self._status(spec.name)
                return Rejection(spec.name, f"job '{spec.name}' is already queued by another "
                                            "driver (two launches of the same run?)")
            if self.queue.outranks(spec):
                decision = self._place(spec, owner, dry_run=True, explain=False)
                if isinstance(decision, Placement):
                    return self._enqueue(spec, owner, "behind higher-priority waiting job(s)")
            else:
                decision = self._place(spec, owner)
            if isinstance(decision, Rejection) and decision.fits_when_free:
                return self._enqueue(spec, owner, decision.message.splitlines()[0])
            return decision

    def poll(self, job_name: str, owner: str = "") -> Placement | Queued | Rejection:
        """A queued job's state: its placement once made, else its place in line and what it
        waits for, or why it was dropped. Placing happens on releases and the maintenance
        timer, not here, so polling drivers cannot slow the scheduler down."""
        with self.lock:
            ready = self.queue.ready.get(job_name)
            if ready is not None and (not owner or ready.owner == owner):
                del self.queue.ready[job_name]
                self._persist()
                return ready
            held = self.placements.get(job_name)
            if held is not None and owner and held.owner == owner:  # a retried poll
                return held
            return self._status(job_name)

    def cancel(self, job_name: str, owner: str = "") -> bool:
        """Leave the queue and release anything placed for the job; only its owner (or an
        operator passing no owner) may."""
        with self.lock:
            if owner and self._owner(job_name) not in (owner, None):
                return False
            found = self.queue.cancel(job_name) | self._release(job_name)
            self._persist()
            return found

    def release(self, job_name: str, owner: str = "") -> bool:
        """The job ended: free what it held (only its owner, or an operator passing no owner)."""
        with self.lock:
            if owner and self._owner(job_name) not in (owner, None):
                return False
            released = self._release(job_name)
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
            }

    # -- maintenance ----------------------------------------------------------------------
    def maintain(self) -> dict:
        """One maintenance pass (also run by the timer thread); returns what it changed."""
        alive, gone, retired = _ray_nodes()
        self._note_ray_nodes(alive, gone)
        with self.lock:
            now = time.time()
            changes = {"dead_by_ray": [], "expired": [], "lost_reservations": []}
            # Nodes Ray reports gone, and nodes holding reservations that Ray no longer knows
            # as alive (e.g. died while the scheduler was restarting, never reported since).
            holding = {r.node_id for held in self.state.reservations.values() for r in held}
            for node_id in sorted((gone & set(self.state.reports) - self.state.dead)
                                  | (holding - alive)):
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
            gauges = metrics.scheduler_samples(
                self.state, [job.enqueued_at for job in self.queue.waiting.values()],
                len(self.state.reservations), now, retired)
        record_all(gauges)
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
        rejected_before = set(self.queue.rejected)
        placed = self.queue.drain(self.state, time.time())
        for placement in placed:
            self.placements[placement.job_name] = placement
            record_all(metrics.decision_samples(placement, latency_s=None))
        for name in set(self.queue.rejected) - rejected_before:
            record_all(metrics.decision_samples(self.queue.rejected[name], latency_s=None,
                                                reason=metrics.REJECT_CLUSTER_SHRANK))
        if placed:
            self._persist()
        return placed

    def _status(self, job_name: str) -> Queued | Rejection:
        if job_name in self.queue.rejected:
            return self.queue.rejected.pop(job_name)
        return self.queue.status(job_name) or Rejection(
            job_name, f"job '{job_name}' is not in the queue")

    def _enqueue(self, spec: JobSpec, owner: str, reason: str) -> Queued:
        queued = self.queue.add(spec, owner, time.time(), reason)
        self._persist()
        return queued

    def _owner(self, job_name: str) -> str | None:
        held = self.placements.get(job_name)
        return held.owner if held is not None else self.queue.owner_of(job_name)

    def _release(self, job_name: str) -> bool:
        self.placements.pop(job_name, None)
        return self.state.release(job_name)

    def _reclaim_orphans(self) -> list[str]:
        dead = _dead_drivers()
        released = self.state.release_orphans(dead)
        for job in released:
            self.placements.pop(job, None)
        dropped = self.queue.drop_owners(dead)
        if released or dropped:
            log.warning("driver(s) died: released %s, dropped from queue %s", released, dropped)
            self._persist()
        return released

    def _persist(self) -> None:
        self.store.save({
            "reservations": self.state.reservations_to_dict(),
            "queue": self.queue.to_dict(),
            "placements": {name: dataclasses.asdict(p) for name, p in self.placements.items()},
        })

    def _restore(self) -> None:
        """Reload what a previous incarnation promised. A part that cannot be read (corrupt,
        or from an older version) is logged and skipped: the scheduler must still start."""
        try:
            saved = self.store.load()
        except Exception as e:
            log.error("scheduler state in the GCS is unreadable, starting empty: %s", e)
            return
        parts = (("reservations", self.state.restore_reservations),
                 ("queue", lambda d: setattr(self, "queue", JobQueue.from_dict(d))),
                 ("placements", lambda d: self.placements.update(
                     {n: Placement(**{**p, "worker_nodes": tuple(p["worker_nodes"])})
                      for n, p in d.items() if n in self.state.reservations})))
        for key, restore in parts:
            try:
                restore(saved.get(key, {}))
            except Exception as e:
                log.error("cannot restore scheduler %s, skipping it: %s", key, e)
        if saved:
            log.warning("scheduler restarted: restored %d reservation(s), %d queued job(s)",
                        len(self.state.reservations), len(self.queue.waiting))


def _ray_nodes() -> tuple[set[str], set[str], set[str]]:
    """(alive, dead, retired) node ids as Ray's GCS sees them; retired: the dead ones removed
    on purpose (scale-down, `ray stop`), which metrics do not count as nodes down."""
    nodes = ray.nodes()
    dead = [n for n in nodes if not n["Alive"]]
    return ({n["NodeID"] for n in nodes if n["Alive"]}, {n["NodeID"] for n in dead},
            {n["NodeID"] for n in dead if n.get("DeathReason") in metrics.RAY_DEATH_EXPECTED})


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
