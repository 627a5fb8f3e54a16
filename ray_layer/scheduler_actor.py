"""SchedulerActor: the live cluster's driver of the pure scheduling core.

All rules live in orchestrator/scheduler_core.py (unit-tested without Ray, and replayed by the
simulator). This shell adds only what needs Ray: the clock (`wall_clock()` passed in as `now`,
continued across restarts), Ray's view of the nodes and of dead drivers, a maintenance thread
(which also starts and restarts node agents and asks the autoscaler for nodes), one lock, the
speeds learnt from jobs' throughput, metric recording and persistence of the core's state in
the GCS key-value store, so a restarted scheduler (max_restarts=-1) forgets nothing it had
promised.
"""
from __future__ import annotations

import gc
import logging
import threading
import time

import ray

from orchestrator import metric_catalogue as catalogue
from orchestrator.autoscaling import autoscaling_summary
from orchestrator.config import JobSpec
from orchestrator.inventory import NodeReport, silent_agent
from orchestrator.placement import Placement, Queued, Rejection
from orchestrator.saved_records import continued_clock
from orchestrator.scheduler_core import SchedulerCore
from orchestrator.scheduler_types import Outcome, SaveSoon, Yield, settings_to_run_with
from orchestrator.throughput import ThroughputTable
from ray_layer.gcs_store import GcsJsonStore
from ray_layer.node_agent import ensure_agent
from ray_layer.scheduler_client import NAMESPACE, get_agent
from ray_layer.telemetry import record_all

log = logging.getLogger(__name__)

# The core's `now`: wall-clock seconds that never jump. Heartbeat ages are differences of it,
# and a step of the host's clock (NTP, a resumed VM) read through time.time() aged every
# report at once: every node was declared dead and the queued jobs rejected for good. Read
# from the monotonic clock, anchored to the wall clock when the process started; a restarted
# scheduler continues its predecessor's clock (_continue_clock), so saved timestamps stay
# comparable across a step of the host's clock.
_WALL_AT_START, _MONOTONIC_AT_START = time.time(), time.monotonic()


def wall_clock() -> float:
    return _WALL_AT_START + (time.monotonic() - _MONOTONIC_AT_START)


def _start_clock_at(wall: float) -> None:
    global _WALL_AT_START, _MONOTONIC_AT_START
    _WALL_AT_START, _MONOTONIC_AT_START = wall, time.monotonic()


def _in_scheduler_clock(driver_time: float | None, now: float) -> float | None:
    """A driver's time.time() reading as wall_clock() would have read it: its age by the wall
    clocks (synchronised across hosts), taken from now."""
    if driver_time is None:
        return None
    return now - max(0.0, time.time() - driver_time)

STATE_KEY = "scheduler-state"
# Waits between reads of the saved state that fail (not unreadable: failed), ~30 s in all: a
# GCS failing over is back well within it.
STATE_READ_WAITS_S = (1.0, 2.0, 4.0, 8.0, 16.0)
THROUGHPUT_KEY = "throughput"  # the learnt speeds, beside the core's parts in the saved state
CLOCK_KEY = "clock"  # {"time": time.time(), "clock": wall_clock()} at the save (continued_clock)
# A maintenance pass saves at least this often, changes or not: the clock pair above is only
# as fresh as the last save, and a host clock step after it shifts a restarted scheduler's
# saved times by the step (an idle cluster can go hours without a change to save).
CLOCK_RESAVE_S = 300.0
RAY_NODES_REFRESH_S = 1.0  # a flood of reports for unknown nodes asks Ray at most this often


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class SchedulerActor:
    """The cluster's one scheduler (a named, detached actor; see ray_layer/cluster.py).

    Node agents call `report`; drivers `submit`, `poll`, `yielded` and `release`; training
    workers `directive` at step boundaries (with their throughput, which the speed table
    learns from); operators `cancel`, `preempt`, `snapshot`.
    Keyword arguments are SchedulerSettings' fields plus `maintain_every_s`."""

    def __init__(self, maintain_every_s: float = 5.0, **settings) -> None:
        # Relative speed per (workload, family), static until jobs report (replaced on restore,
        # hence looked up through self at each call).
        self.throughput = ThroughputTable()
        # Changes saved by the next maintenance pass, not at once (SaveSoon: learnt speeds,
        # jobs' checkpoint times): a figure a second per job is not worth a GCS write each.
        self._unsaved, self._saved_at = False, time.monotonic()
        self.store = GcsJsonStore(STATE_KEY, NAMESPACE)
        saved, unreadable = self._load_state()  # (read once: settings, then the state)
        self._continue_clock(saved)  # before anything reads the clock
        run_with, settings_problem = settings_to_run_with(settings, saved)
        self.core = SchedulerCore(run_with, speed=self._speed)
        self.lock = threading.RLock()  # Ray's thread and the maintenance thread
        self._ray_checked_at = float("-inf")
        # (why the cluster's autoscaling config is not used, for status --json; None: it is;
        # read before the restore, which drops saved requests for types no longer in it)
        self.core.autoscaler = _running_autoscaler()  # (once: Ray sets it as the head starts)
        self.core.node_types, self._autoscaling_problem = \
            _autoscaler_node_types(self.core.autoscaler)
        # (this actor runs on the head: the other nodes alive are worker nodes, counted
        # against the cluster's max_workers in a waiting job's reason)
        self.core.head_node = ray.get_runtime_context().get_node_id()
        self._restore(saved, unreadable, settings_problem, bool(settings))
        self._refresh_ray_view()
        # The last request_resources; None: none made yet, so the first pass makes one, which
        # also withdraws a request left by the scheduler before a restart.
        self._scale_up_asked: list[dict[str, float]] | None = None
        # Which job and node type each part of it is for (SchedulerCore.scale_up_asked_by_job)
        self._scale_up_asked_by: list[dict] = []
        self.maintain_every_s = maintain_every_s
        # Node id -> (its agent's actor id, since when that agent is known to have not
        # reported): an agent that stays silent past suspect_after_s is killed and started
        # afresh (_ensure_agent_on); a new one gets as long again to report.
        self._agent_silent_since: dict[str, tuple[str, float]] = {}
        self._agents_lock = threading.Lock()  # one pass at a time kills and starts agents
        threading.Thread(target=self._maintain_forever, name="scheduler-maintenance",
                         daemon=True).start()

    # -- agents ---------------------------------------------------------------------------
    def report(self, report: NodeReport) -> bool:
        """Take a node agent's report; False if refused (a node Ray does not list alive)."""
        if not self.core.knows_alive(report.node_id) and \
                time.monotonic() - self._ray_checked_at > RAY_NODES_REFRESH_S:
            alive, dead, _ = _ray_nodes()  # a node that joined since the last pass
            self._ray_checked_at = time.monotonic()
            with self.lock:
                self._apply(self.core.ray_nodes(alive, dead, wall_clock()))
        with self.lock:
            refused_before = self.core.refused_nodes.get(report.node_id)
            outcome = self.core.report(report, wall_clock())
            accepted = self._apply(outcome) is True
            refused_now = self.core.refused_nodes.get(report.node_id)
        if not accepted and refused_now != refused_before:
            log.warning("refused a report for node %s: %s (logged once per run of refusals "
                        "of one kind)",
                        report.node_id[:16], outcome.decision)
        return accepted

    def report_many(self, reports: list[NodeReport]) -> int:
        """Several reports in one call (loading a synthetic cluster); returns how many taken.
        What a bulk load leaves is long-lived: it is moved out of the cyclic garbage
        collector's view, whose full passes over 10,000 nodes' reports otherwise pause a
        placement for tens of milliseconds."""
        taken = sum(self.report(r) for r in reports)
        gc.collect()
        gc.freeze()
        return taken

    # -- drivers --------------------------------------------------------------------------
    def submit(self, spec: JobSpec, owner: str = "") -> Placement | Queued | Rejection:
        """Place now, or queue the job when it fits the cluster but not its free capacity (or
        must not delay the first job in line); reject only what can never fit, or a name in
        use. Errors come back as data, not exceptions. A name held by another driver that
        has exited (killed before its `finally` released it: a relaunch within one maintenance
        pass) is freed first, rather than refused as a second launch."""
        with self.lock:
            held_by = self.core.owner_of(spec.name)
        if held_by is not None and held_by != owner:
            self.reclaim_orphans()
        return self._decide(lambda now: self.core.submit(spec, owner, now))

    def place(self, spec: JobSpec, owner: str = "", dry_run: bool = False,
              explain: bool | None = None) -> Placement | Rejection:
        """Place now, bypassing the queue (a dry run decides nothing: the `place` CLI)."""
        return self._decide(lambda now: self.core.place_now(spec, owner, now, dry_run, explain),
                            count=not dry_run)

    def poll(self, job_name: str, owner: str = "") -> Placement | Queued | Rejection:
        """A job's state: its placement once made, else its place in line and what it waits
        for, or why it was dropped. Placing happens on releases and the maintenance timer,
        not here, so polling drivers cannot slow the scheduler down."""
        return self._call(lambda now: self.core.poll(job_name, owner, now))

    def replace(self, spec: JobSpec, owner: str, lost_nodes: list[str]) -> Placement | Rejection:
        """A running job lost node(s): place it afresh without them (see SchedulerCore).
        Ray's view is refreshed first: a lost node Ray already lists dead is dead, one it
        still lists alive is only suspect (a network blip must not evict it for good)."""
        self._refresh_ray_view()
        return self._decide(lambda now: self.core.replace(spec, owner, lost_nodes, now))

    def yielded(self, job_name: str, owner: str = "", given_back: int | None = None
                ) -> Placement | Queued | Rejection:
        """The job checkpointed and stopped as its directive said; what it should do next.
        `given_back`: how many placements its driver had given back before (a call sent
        again is answered, not carried out twice; see SchedulerCore.yielded)."""
        self._refresh_ray_view()  # it is placed again at once: on what Ray sees now
        return self._call(lambda now: self.core.yielded(job_name, owner, now,
                                                        given_back=given_back))

    def gpu_too_small(self, job_name: str, owner: str, gpus: list[tuple[str, int]],
                      given_back: int | None = None) -> Placement | Queued | Rejection:
        """The job's workers found these (node id, GPU index) without the free memory asked:
        placed again without them (`given_back`: as for yielded)."""
        return self._call(lambda now: self.core.gpu_too_small(job_name, owner, gpus, now,
                                                              given_back=given_back))

    def release(self, job_name: str, owner: str = "") -> bool:
        """The job ended: free what it held (only its owner, or an operator passing no owner)."""
        return self._call(lambda now: self.core.release(job_name, owner, now))

    def directive(self, job_name: str, last_checkpoint_at: float | None = None,
                  per_worker_rate: float | None = None) -> dict | None:
        """Asked by a training job at step boundaries: None to keep going, else
        {"kind": preempt|migrate|cancel, "reason": ...}: checkpoint and stop.
        `per_worker_rate`: the job's recent throughput per worker (tokens/s), if it has a new
        figure: learnt for its workload on the family it runs on."""
        with self.lock:
            now = wall_clock()
            if per_worker_rate is not None:
                self._observe(job_name, per_worker_rate, now)
            d = self._apply(self.core.directive(job_name, now,
                                                _in_scheduler_clock(last_checkpoint_at, now)))
        return None if d is None else {"kind": d.kind, "reason": d.reason}

    # -- operators ------------------------------------------------------------------------
    def cancel(self, job_name: str, owner: str = "", waiting_only: bool = False) -> bool:
        """Leave the queue, or (running, by an operator) checkpoint and stop; `waiting_only`:
        leave the queue if waiting, else nothing."""
        return self._call(lambda now: self.core.cancel(job_name, owner, now, waiting_only))

    def preempt(self, job_name: str) -> bool:
        """An operator's preemption: the job checkpoints, yields and waits in the queue."""
        return self._call(lambda now: self.core.preempt(job_name, now))

    def reclaim_orphans(self) -> list[str]:
        """Release what drivers that have exited held or queued; returns those jobs."""
        dead_drivers = _dead_drivers()
        with self.lock:
            released, dropped = self._apply(self.core.owners_dead(dead_drivers, wall_clock()))
        return released + dropped

    def snapshot(self) -> dict:
        with self.lock:
            now = wall_clock()
            state = self.core.state
            return {
                "reports": dict(state.reports),
                "age_s": {n: now - t for n, t in state.last_seen.items()},
                "health": {n: state.health(n, now) for n in state.reports},
                "retired": sorted(self.core.retired),
                "reservations": dict(state.reservations),
                "outside": {n: state.outside_on(n) for n in state.reports},
                "queue": [self.core.queue.status(j.spec.name) for j in self.core.queue.ordered()],
                "jobs": self.core.jobs(now),
                "throughput": {"reference": self.throughput.reference,
                               "rows": self.throughput.rows()},
                "autoscaling": {**autoscaling_summary(self.core.node_types,
                                                      self.core.autoscaler),
                                "asked_for": list(self._scale_up_asked or []),
                                "asked_by_job": list(self._scale_up_asked_by),
                                "config_problem": self._autoscaling_problem},
            }

    # -- maintenance ----------------------------------------------------------------------
    def maintain(self) -> dict:
        """One maintenance pass (also run by the timer thread); returns what it changed."""
        alive, gone, retired = _ray_nodes()
        dead_drivers = _dead_drivers()
        available = _ray_available()
        self._ray_checked_at = time.monotonic()
        with self.lock:
            now = wall_clock()
            ready_before = set(self.core.queue.ready)
            dead = self.core.ray_nodes(alive, gone, now)
            usage = self.core.ray_usage(available, now)
            orphans = self.core.owners_dead(dead_drivers, now)
            tick = self.core.tick(now, retired)
            for outcome in (dead, usage, orphans, tick):
                self._apply(outcome)
            agents = self.core.agents_needed(alive, now)
            last_seen = {e.node_id: self.core.state.last_seen.get(e.node_id) for e in agents}
            scale_up = self.core.scale_up_requests(now)
            asked_by = self.core.scale_up_asked_by_job()
            # (SaveSoon) saved at most once a pass; and the clock pair kept fresh
            if self._unsaved or time.monotonic() - self._saved_at > CLOCK_RESAVE_S:
                self._save()
            changes = {"dead_by_ray": dead.decision, "expired": tick.decision["expired"],
                       "lost_reservations": tick.decision["lost_reservations"],
                       "orphans_released": orphans.decision[0] + orphans.decision[1],
                       "placed_from_queue": sorted(set(self.core.queue.ready) - ready_before)}
        if scale_up != self._scale_up_asked:
            changes["autoscaler_asked_for"] = self._ask_autoscaler(scale_up)
        if scale_up == self._scale_up_asked:  # (it went out, or stands as it was)
            self._scale_up_asked_by = asked_by
        if any(changes.values()):
            log.warning("scheduler maintenance: %s", changes)
        restarted = []
        with self._agents_lock:  # not self.lock: creating actors can take a while
            for effect in agents:
                if self._ensure_agent_on(effect.node_id, last_seen[effect.node_id], now):
                    restarted.append(effect.node_id)
            needing = {e.node_id for e in agents}  # agents that reported again: forgotten
            for node_id in set(self._agent_silent_since) - needing:
                del self._agent_silent_since[node_id]
        changes["agents_ensured"] = [e.node_id for e in agents]
        changes["agents_restarted"] = restarted
        return changes

    def _ask_autoscaler(self, bundles: list[dict[str, float]]) -> list[dict[str, float]]:
        """request_resources for the waiting jobs only new nodes can hold (it replaces the
        previous request; an empty one withdraws it). Kept as asked only once it went out."""
        try:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=bundles)
        except Exception as e:  # asked again at the next pass
            log.warning("cannot ask the autoscaler for %d worker bundle(s): %s", len(bundles), e)
            return []
        self._scale_up_asked = bundles
        return bundles

    def _maintain_forever(self) -> None:
        while True:
            time.sleep(self.maintain_every_s)
            try:
                self.maintain()
            except Exception as e:  # keep maintaining: the next pass may succeed
                log.warning("scheduler maintenance failed: %s", e)

    def _ensure_agent_on(self, node_id: str, last_seen: float | None, now: float) -> bool:
        """The agent of a node Ray lists alive but the core has no recent report from: started
        if missing; killed and started afresh if it has been silent past suspect_after_s (a
        hung probe, a stopped process: Ray restarts an agent only when its process dies, and
        `get_if_exists` hands back the same hung actor). A new agent, or one this scheduler
        just started, gets suspect_after_s to report before it can be killed in its turn.
        Returns True when it killed a silent agent."""
        try:
            try:
                agent = get_agent(node_id)
            except ValueError:  # none (a new node, or the old agent was killed): start one
                self._agent_silent_since[node_id] = \
                    (ensure_agent(node_id)._actor_id.hex(), now)
                return False
            limit = self.core.settings.suspect_after_s
            known, kill = silent_agent(self._agent_silent_since.get(node_id),
                                       agent._actor_id.hex(), last_seen, now, limit)
            self._agent_silent_since[node_id] = known
            if not kill:
                return False
            log.warning("node agent of %s has not reported for %.0fs (limit %.0fs) although "
                        "Ray lists its node alive: killing it and starting a new one",
                        node_id[:12], now - known[1], limit)
            ray.kill(agent, no_restart=True)  # frees the name at once; the process goes later
            fresh = ensure_agent(node_id)
            self._agent_silent_since[node_id] = (fresh._actor_id.hex(), now)
            fresh.report_now.remote()  # not waited for: its heartbeat only starts in 5 s
            return True
        except Exception as e:  # a node going away while we create its agent
            log.warning("cannot start a node agent on %s: %s", node_id[:12], e)
            return False

    # -- carrying out the core's outcomes ---------------------------------------------------
    def _call(self, event):
        with self.lock:
            return self._apply(event(wall_clock()))

    def _decide(self, event, count: bool = True):
        """A decision a caller waits for: its latency is recorded with it."""
        start = time.perf_counter()
        with self.lock:
            outcome = event(wall_clock())
            decision = self._apply(outcome)
        if count:
            record_all(catalogue.latency_samples(decision, time.perf_counter() - start))
        return decision

    def _apply(self, outcome: Outcome):
        """Carry out the effects (inside the lock: saved, or the save tried (_save), before
        anyone is answered)."""
        record_all(outcome.samples)
        for effect in outcome.effects:
            if isinstance(effect, Yield):
                log.warning("job %s told to %s: %s", effect.job_name, effect.kind,
                            effect.reason)
                record_all([(catalogue.SCHEDULER_YIELDS, 1, {"kind": effect.kind})])
        if outcome.persist:
            self._save()
        elif any(isinstance(effect, SaveSoon) for effect in outcome.effects):
            self._unsaved = True
        return outcome.decision

    def _save(self) -> None:
        """Save the core's state now. Unsaved until the write succeeds: a failed one (the GCS
        failing over) is warned of and counted, not raised, and the next maintenance pass
        saves again. Raised, it told the caller a change had failed that stood in memory (a
        submit refused for a job then queued or placed, submitting it again: a duplicate
        name), and cut a maintenance pass short (no autoscaler request, no agent restarted).
        Not marked unsaved, the change waited for the next one, or CLOCK_RESAVE_S, and a
        restart meanwhile forgot it (a job's reservation)."""
        self._unsaved = True
        try:
            self.store.save({**self.core.to_dict(), THROUGHPUT_KEY: self.throughput.to_dict(),
                             CLOCK_KEY: {"time": time.time(), "clock": wall_clock()}})
        except Exception as e:
            log.warning("saving the scheduler's state (GCS key %r) failed: %s: %s; the change "
                        "stands and the next maintenance pass saves it again", STATE_KEY,
                        type(e).__name__, e)
            record_all([(catalogue.SCHEDULER_STATE_SAVES_FAILED, 1, {})])
            return
        self._unsaved, self._saved_at = False, time.monotonic()

    # -- learning speeds ----------------------------------------------------------------------
    def _speed(self, spec: JobSpec, family: str) -> float:
        """The core's speed model: the table's speed for the job's workload."""
        return self.throughput.speed(spec.workload, family)

    def _observe(self, job_name: str, per_worker_rate: float, now: float) -> None:
        """Learn a running job's throughput on the family that sets its pace (jobs without a
        workload key, and CPU jobs, teach nothing). Saved by the next maintenance pass or
        state change, not at once (as SaveSoon)."""
        job = self.core.running.get(job_name)
        family = self.core.running_family(job_name)
        if job is None or not job.spec.workload or not family:
            return
        self.throughput.observe(job.spec.workload, family, per_worker_rate, now)
        self._unsaved = True
        # The core caches a running job's speed per family (RunningJob.speeds) for its
        # migration checks; drop this job's, so its next check uses what was just learnt.
        job.speeds.clear()

    def _refresh_ray_view(self) -> None:
        """Ray's nodes and their available resources, now (at start, and before decisions
        that cannot wait for the next maintenance pass)."""
        alive, dead, _ = _ray_nodes()
        available = _ray_available()
        self._ray_checked_at = time.monotonic()
        with self.lock:
            self._apply(self.core.ray_nodes(alive, dead, wall_clock()))
            self._apply(self.core.ray_usage(available, wall_clock()))

    def _load_state(self) -> tuple[dict, Exception | None]:
        """(what a previous incarnation saved, {} if nothing; the error if it is unreadable).
        A failed read is not an unreadable state: the GCS failing over while Ray restarts
        this actor made it start empty, and its first save replaced every reservation and
        queued job. A read is tried again for STATE_READ_WAITS_S, then the actor fails to
        start (Ray's error names why; the next driver's call makes a new one)."""
        for wait_s in (*STATE_READ_WAITS_S, None):
            try:
                saved = self.store.load()
                break
            except ValueError as e:  # JSON or UTF-8 that cannot be decoded
                return {}, e
            except Exception as e:
                if wait_s is None:
                    raise RuntimeError(f"cannot read the scheduler's saved state (GCS key "
                                       f"{STATE_KEY!r}): {type(e).__name__}: {e}; not "
                                       "starting empty, which would replace it") from e
                log.warning("reading the scheduler's saved state failed (%s); trying again "
                            "in %gs", e, wait_s)
                time.sleep(wait_s)
        if saved is not None and not isinstance(saved, dict):
            return {}, ValueError(f"a JSON {type(saved).__name__}, not an object")
        return saved or {}, None

    def _continue_clock(self, saved: dict) -> None:
        """Start this incarnation's clock where its predecessor's stood (continued_clock)."""
        start, problem = continued_clock(saved.get(CLOCK_KEY), time.time())
        if problem:
            log.warning("%s", problem)
        _start_clock_at(start)

    def _restore(self, saved: dict, unreadable: Exception | None,
                 settings_problem: str | None, settings_given: bool) -> None:
        """Reload what a previous incarnation promised. A part that cannot be read (corrupt,
        or from another version) is logged and skipped: the scheduler must still start. The
        document as saved is then copied aside first (GcsJsonStore.set_aside), as the next
        save replaces it: nothing saved is lost to a bad record."""
        if unreadable is not None:
            # Started empty, but as after a restart: nodes get time to report before jobs are
            # judged against a cluster that looks empty.
            log.error("scheduler state in the GCS is unreadable, starting empty (kept as "
                      "%r): %s", self._set_aside(), unreadable)
            self.core.restored_at = wall_clock()
            return
        problems = [settings_problem] if settings_problem else []
        if not settings_given and not settings_problem and saved.get("settings"):
            log.warning("scheduler recreated with no settings: running with those saved by "
                        "its predecessor")
        problems += self.core.restore(saved)
        if THROUGHPUT_KEY in saved:  # states saved before the table existed lack it
            self.throughput, table_problems = ThroughputTable.from_dict(saved[THROUGHPUT_KEY])
            problems += table_problems
        if problems:
            kept = self._set_aside()
            for problem in problems:
                log.error("%s (the state as saved is kept as %r)", problem, kept)
        if saved:
            self.core.restored_at = wall_clock()
            log.warning("scheduler restarted: restored %d reservation(s), %d running and %d "
                        "queued job(s)", len(self.core.state.reservations),
                        len(self.core.running), len(self.core.queue))

    def _set_aside(self) -> str:
        """Copy the saved document aside before a save replaces it; if that fails, the actor
        does not start (it would replace the only copy)."""
        try:
            return self.store.set_aside()
        except Exception as e:
            raise RuntimeError(f"cannot keep a copy of the scheduler's saved state (GCS key "
                               f"{STATE_KEY!r}) that it cannot fully read: "
                               f"{type(e).__name__}: {e}; not starting, which would replace "
                               "it") from e


def _running_autoscaler() -> str:
    """Which of Ray's autoscalers serves this cluster, "v1" or "v2" (scale-up notes say what
    it adds, orchestrator/autoscaling.py), from the flag in Ray's GCS that the head's
    monitor (node.py start_monitor) and KubeRay's run_autoscaler pick v1 or v2 by; the GCS
    sets it from its own RAY_enable_autoscaler_v2 (`ray up` sets that, `ray start` does not).
    fetch_from_server: else is_autoscaler_v2 answers True from this process's own
    RAY_enable_autoscaler_v2, and caches. "unknown" where it cannot be read."""
    try:
        from ray.autoscaler.v2.utils import is_autoscaler_v2

        return "v2" if is_autoscaler_v2(fetch_from_server=True) else "v1"
    except Exception as e:  # (an assert without a GCS client, a GCS error)
        log.warning("cannot tell which of Ray's autoscalers runs (scale-up notes name both): "
                    "%s: %s", type(e).__name__, e)
        return "unknown"


def _autoscaler_node_types(autoscaler: str = "unknown") -> tuple[tuple, str | None]:
    """The node types this cluster's autoscaler can add, from the config it runs with (the
    `--autoscaling-config` of the autoscaler on this, the head, node; else the
    ~/ray_bootstrap_config.yaml `ray up` leaves on the head), and why the config is not used
    (None: it is, or there is none). None known (no autoscaler, an unreadable file): (), and
    a job the cluster cannot hold is rejected as before. Its note (untold_types_note) says
    what the `autoscaler` that runs (_running_autoscaler) does."""
    import yaml

    from orchestrator.autoscaling import node_types_from_config, untold_types_note

    path = _autoscaling_config_path()
    if path is None:
        return (), None
    try:
        types = node_types_from_config(yaml.safe_load(path.read_text()))
    except (OSError, ValueError, yaml.YAMLError) as e:
        log.warning("autoscaling config %s not used (jobs the cluster cannot hold now are "
                    "rejected, not waited for): %s", path, e)
        return (), f"autoscaling config {path} not used: {e}"
    log.info("autoscaling config %s: jobs only its node types %s can hold wait for them",
             path, ", ".join(t.name for t in types))
    note = untold_types_note(types, autoscaler)
    if note:  # (once: the config is read when the scheduler starts)
        log.warning("autoscaling config %s: %s", path, note)
    return types, None


def _autoscaling_config_path():
    """--autoscaling-config of the autoscaler (Ray's monitor process) serving this cluster
    (matched by its --gcs-address: other Ray clusters may run on the same machine); when no
    such process is found, ~/ray_bootstrap_config.yaml if it exists."""
    from pathlib import Path

    import psutil

    gcs = ray.get_runtime_context().gcs_address
    monitor_found = False
    for process in psutil.process_iter(["cmdline"]):
        try:
            args = process.info["cmdline"] or []
        except (psutil.Error, OSError):
            continue
        if not any(a.endswith("monitor.py") and "autoscaler" in a for a in args) or \
                f"--gcs-address={gcs}" not in args:
            continue
        monitor_found = True
        for arg in args:
            if arg.startswith("--autoscaling-config="):
                path = Path(arg.split("=", 1)[1]).expanduser()
                try:  # as `ray start` was given it: relative to where it ran
                    return path if path.is_absolute() else Path(process.cwd()) / path
                except (psutil.Error, OSError):
                    return path
    if monitor_found:  # an autoscaler without a config (`ray start --head`): it adds nothing
        return None
    bootstrap = Path("~/ray_bootstrap_config.yaml").expanduser()
    return bootstrap if bootstrap.is_file() else None


def _ray_nodes() -> tuple[set[str], set[str], set[str]]:
    """(alive, dead, retired) node ids as Ray's GCS sees them; retired: the dead ones removed
    on purpose (scale-down, `ray stop`), which metrics do not count as nodes down."""
    nodes = ray.nodes()
    dead = [n for n in nodes if not n["Alive"]]
    return ({n["NodeID"] for n in nodes if n["Alive"]}, {n["NodeID"] for n in dead},
            {n["NodeID"] for n in dead if n.get("DeathReason") in catalogue.RAY_DEATH_EXPECTED})


def _ray_available() -> dict[str, dict[str, float]]:
    """Ray's available resources per alive node (through ray._private.state: Ray has no
    public per-node API). On failure, nothing: the scheduler then counts only its own
    reservations, as before it could ask."""
    try:
        from ray._private.state import available_resources_per_node

        return available_resources_per_node()
    except Exception as e:
        log.warning("cannot read Ray's available resources per node: %s", e)
        return {}


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


