"""The scheduler's rules, pure: one core that the live SchedulerActor and the simulator drive.

Events come in as method calls, each with `now` (time is an input, never read here):
node reports, Ray's view of the nodes, submissions, polls, releases, cancellations, yields
(a preempted or migrating job checkpointed and let go), owners (drivers) found dead, and a
periodic tick. Each returns an `Outcome`: the decision (a Placement, Queued or Rejection,
or a plain answer) and the effects for the driver of the core to carry out — persist the
state, start an agent on a node, tell a running job to yield, metric samples.

What it decides:
- **Queue.** A job that fits the cluster but not its free capacity waits, highest priority
  first, then (`queue_order` "las") least attained service (Tiresias' levels of GPU-seconds
  run so far) and first submitted within a level, or ("fifo") first submitted. A job that can
  never fit is rejected with the reason (once every node Ray lists alive has reported, or
  `suspect_after_s` has passed).
- **Backfill (EASY).** When the first waiting job (the head) cannot start, later jobs may
  start only if they do not delay it: the head gets a reservation at its earliest start time
  (the *shadow time*: when the nodes it can use hold all its workers, node by node), computed
  from the running jobs' expected ends (`JobSpec.expected_duration_s`); a later job may start
  if it ends before that, or uses only capacity the head does not need then (the *extra*: its
  workers still fit beside it, node by node), or capacity the head cannot use at all
  (another accelerator type). Without estimates, only the last. A job refused so is asked
  again without the families on which its refused placement took the delayed job's nodes
  (_backfill_elsewhere).
  Look-ahead is bounded by cost (failed placement attempts per pass), not by a count of
  jobs: a job whose shape already failed in this pass, or whose GPU/CPU count exceeds what
  is free, costs a dict look-up.
- **Preemption.** A waiting job of higher priority (or, under LAS, the same priority and a
  lower service level) that fits the cluster but not its free capacity may preempt running
  jobs it outranks: victims lowest priority first, then least
  work lost since their last checkpoint, the fewest that make room — room as the queue pass
  will place the job once they have yielded (its family choice; behind a blocked head, only
  a start the backfill rule allows). A job runs at least `min_run_s` between preemptions (no
  thrashing) and, once preempted `max_preemptions` times, only by a higher priority (ageing:
  LAS cannot starve it for ever). Victims keep their reservation until they yield, so nothing
  is ever double-booked; a yielded victim waits in the queue with its original submit time.
- **Migration.** When a faster accelerator family has free capacity that no waiting job can
  use, a running job with a time estimate moves there if the modelled gain (remaining time x
  (1 - old speed / new speed)) exceeds its restart cost. The target is claimed (reserved under
  `<job>#migration`) at once and handed over when the job yields.
- **Ownership.** A job is held by its driver (a Ray job id); only its owner or an operator
  (owner "") may release or cancel it; jobs of drivers found dead are released.
- **Node health.** Dead only when Ray says so or heartbeats stop past `dead_after_s`; a failed
  TCP probe from a job's driver makes a node suspect (no new work until it reports), not dead.
  A job that only nodes dead by silence alone (Ray lists them alive) could hold waits for
  them out of line, as one waiting for the autoscaler's nodes does.
"""
from __future__ import annotations

import bisect
import copy
import dataclasses
import heapq
import itertools
import math
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from orchestrator import metric_catalogue as catalogue
from orchestrator.autoscaling import (NodeType, PlanPart, accelerator_resource_note,
                                      adds_none_note, cluster_max_note, cluster_room,
                                      cluster_room_note,
                                      cpu_note, gpu_note, host_memory_note, max_workers_note,
                                      RESOURCE_KEY_PREFIX, node_has_resource, nodes_up_key,
                                      parts_to_add, plan_bundles, plan_named,
                                      ray_memory_gib, scale_up_parts, short_gpus_note,
                                      steering_note, unlabelled_memory_note,
                                      untold_plan_note)
from orchestrator.config import ACCELERATOR_SPEED, CLAIM_SUFFIX, JobSpec
from orchestrator.inventory import (ClusterState, NodeReport, Reservation, gpu_families,
                                    node_family, report_problem)
from orchestrator.placement import (FITS_WHEN_FREED, Placement, PlacementError, Queued,
                                    Rejection, capacity_shape, free_host_memory, place,
                                    ram_use_freed, worker_capacity, workers_by_count)
from orchestrator.queue import JobQueue, QueuedJob, allowed_families
from orchestrator.saved_records import SAVED_STATE_VERSION
from orchestrator.scheduler_types import (CANCEL, MIGRATE, PREEMPT, Directive, Outcome, Persist,
                                          RunningJob, SaveSoon, SchedulerSettings, StartAgent,
                                          Yield)
from orchestrator.validation import is_int, is_number, json_type

# CLAIM_SUFFIX (config.py): reservation name of a migration target, held until the handover
DEAD_NODE_RETENTION_S = 3600.0
MAX_VICTIMS_TRIED = 64  # bounds one preemption search (a place() call per candidate)
# Look-ahead also ends after this many jobs were placed but refused (they would delay the
# head): under a long queue each costs a placement, as a failed one does.
BACKFILL_DENIALS_PER_PASS = 128
# EASY reservations per queue pass: the head's, and the first blocked job's on nodes of other
# accelerator families (_plan_blocked)
MAX_PLANS_PER_PASS = 8
MAX_BLOCKED_EXAMINED = 256  # blocked waiting jobs, in queue order, one pass asks to preempt
TYPICAL_WEIGHT = 0.01  # the typical job's speeds follow the last ~100 GPU jobs submitted
# A wake-up (next_wakeup) falls this long after the moment it is for, so float rounding of
# start + min_run_s never leaves `now - start >= min_run_s` just unmet at the tick.
WAKE_MARGIN_S = 1e-3
# A job's last checkpoint time told again within this of the one known is the same checkpoint:
# the live actor turns the job's clock into its own at each check, which moves the figure by
# rounding, and every such move was a save.
SAME_CHECKPOINT_S = 1.0

# speed(spec, accelerator family) -> relative training speed; the simulator passes its model.
SpeedModel = Callable[[JobSpec, str], float]
# A placement policy other than place() (the simulator's baselines): (spec, state, now, owner)
# -> Placement, or None when the job does not fit now.
Policy = Callable[[JobSpec, ClusterState, float, str], "Placement | None"]


def default_speed(spec: JobSpec, family: str) -> float:
    return ACCELERATOR_SPEED.get(family, 1.0)


@dataclass
class _FamilyChoice:
    """Where a job that may use several accelerator families should be tried (see
    SchedulerCore._family_choice)."""

    order: list[str]  # families to try one at a time, best first
    open_families: tuple[str, ...]  # families it may use now, together: the last try
    kept_off: tuple[str, ...]  # families with free GPUs it is kept off (for the reason)
    usable: tuple[str, ...]  # families it is not shielded from (what it waits for)


class _HeadRoom:
    """The head's room node by node: the CPUs and GPUs (and, for a head stating its workers'
    host RAM, that RAM: `ram_available`, `ram_room`) free on each node it could use, and the
    whole workers of its shape they hold (a worker's CPUs and GPUs on one node; at most `cap`,
    what the node holds of them idle: GPU memory, families, excluded GPUs). Counted in units
    summed over nodes, 2 GPUs free on each of two nodes held a 4-GPU worker."""

    def __init__(self, spec: JobSpec, cap: np.ndarray, cpus: np.ndarray,
                 gpus: np.ndarray, state: ClusterState, ram: bool = False) -> None:
        self.spec = spec
        self.index = state.table.index
        # Host RAM, for a head stating it (`ram`), per node as free_host_memory counts it:
        # the agent's available figure (`ram_available`: a running job that ends gives back
        # its own use in it, ram_use_freed) and the total less the reservations and the use
        # outside them (`ram_room`: it gives back its reservation).
        memory = self.ram_available = self.ram_room = None
        if ram:
            t, n = state.table, len(cap)
            self.ram_total, self.ram_outside = t.ram_total_gib[:n].tolist(), \
                t.ram_outside_gib[:n].tolist()
            self.ram_available = t.ram_available_gib[:n].tolist()
            self.ram_room = (t.ram_total_gib[:n] - t.reserved_memory_gib[:n]
                             - t.ram_outside_gib[:n]).tolist()
            memory = np.maximum(free_host_memory(state), 0)
        workers = np.minimum(cap, workers_by_count(spec, cpus, gpus, memory)).astype(np.int64)
        self.total = int(workers.sum())
        # Per node as Python lists: add() updates one node at a time, once per reservation
        # of every job that ends before the head's start, where numpy's per-element access
        # and scalar calls cost several times the arithmetic.
        self.cap, self.workers = cap.astype(np.int64).tolist(), workers.tolist()
        self.cpus, self.gpus = cpus.astype(float).tolist(), gpus.astype(np.int64).tolist()

    def end(self, reservations) -> None:
        """A running job ends: its reservations are freed on the head's nodes, and the host
        RAM its workers use, shown in use by the agents, comes back as available."""
        self.add(reservations, +1, ends=True)

    def add(self, reservations, sign: int = 1, ends: bool = False) -> None:
        """Reservations freed (sign 1: a job ends, or one taken is put back) or taken (-1) on
        the head's nodes."""
        for r in reservations:
            row = self.index.get(r.node_id)
            if row is None or row >= len(self.cap) or not self.cap[row]:
                continue
            cpus = self.cpus[row] = self.cpus[row] + sign * r.cpus
            gpus = self.gpus[row] = self.gpus[row] + sign * r.gpus
            memory = None
            if self.ram_room is not None:
                if ends and r.memory_gb:
                    self.ram_available[row] += ram_use_freed(
                        r.memory_gb, self.ram_total[row], self.ram_available[row],
                        self.ram_outside[row])
                room = self.ram_room[row] = self.ram_room[row] + sign * r.memory_gb
                memory = min(self.ram_available[row], room)
            fits = min(self.cap[row], int(workers_by_count(
                self.spec, max(cpus, 0.0), max(gpus, 0),
                None if memory is None else max(memory, 0.0))))
            self.total += fits - self.workers[row]
            self.workers[row] = fits

    def take_if_spare(self, reservations) -> bool:
        """Take `reservations` if the head's workers still fit beside them."""
        self.add(reservations, -1)
        if self.total >= self.spec.num_workers:
            return True
        self.add(reservations, +1)
        return False

    def copy(self) -> "_HeadRoom":
        new = copy.copy(self)
        new.workers, new.cpus, new.gpus = list(self.workers), list(self.cpus), list(self.gpus)
        if self.ram_room is not None:
            new.ram_available, new.ram_room = list(self.ram_available), list(self.ram_room)
        return new


@dataclass
class _HeadPlan:
    """EASY's reservation for the first waiting job that could not start."""

    job: str
    usable: np.ndarray  # bool per node row: capacity the head could use
    per_gpu: bool  # units are GPUs (else CPUs)
    shadow: float | None  # earliest start; None = unknown (running jobs lack estimates)
    room: _HeadRoom  # its room at the shadow time (what is spare there is the *extra*)
    # A GPU head's workers need CPUs beside their GPUs: free CPUs on its nodes now beyond
    # what it needs, which a job taking no GPUs may use while the shadow time is unknown
    # (inf when units are CPUs already; once it is known, the room at it judges such a job)
    spare_cpus: float = math.inf
    # GPUs per family that jobs allowed only that family may take on a family the head is
    # kept off: they have first call there (the head's room leaves them out, its shadow and
    # extra do not: such a start can push the head past its shadow, see _may_backfill)
    first_call: dict[str, int] = dataclasses.field(default_factory=dict)
    families: frozenset = frozenset()  # family codes of its usable nodes (_plan_blocked)


class _AsIfYielded:
    """The cluster and the queue as they will be once some running jobs have yielded, for the
    victim search to ask what the queue pass would do then: their reservations free, their
    GPUs waiting in the queue again (those allowed a single family then have first call on
    it, see SchedulerCore._family_choice). Victims are added one at a time (and may be taken
    back); leaving the `with` block puts everything back."""

    def __init__(self, core: "SchedulerCore", victims: tuple[str, ...] | list[str] = ()) -> None:
        self.core = core
        # victim -> its reservation, released meanwhile (None: it held none). An empty one is
        # kept too: a job wholly on a silent node holds () so that its reservation comes back
        # when the node reports (ClusterState._revive); dropped, its GPUs went to another job.
        self.held: dict[str, tuple | None] = {}
        # victim -> (table row, GPU slots, their measured free GiB), shown free meanwhile
        self.memory: dict[str, list[tuple[int, np.ndarray, np.ndarray]]] = {}
        # (row, slot) of every entry in `memory`: kept as victims come and go (rebuilt from
        # `memory` on every add, it was quadratic in the victims of one search)
        self.shown: set[tuple[int, int]] = set()
        # table row -> how many of `shown` are on it: a row with none needs no slot-by-slot
        # filter (_show_gpus_free ran one per victim reservation of every search)
        self.shown_rows: Counter = Counter()
        # victim -> (table row, host RAM GiB shown available for it meanwhile); and each such
        # row's measured figure, put back as it was once no victim shows RAM there
        self.ram: dict[str, list[tuple[int, float]]] = {}
        self.ram_measured: dict[int, float] = {}
        for victim in victims:
            self.add(victim)

    def __enter__(self) -> "_AsIfYielded":
        return self

    def __exit__(self, *exc) -> None:
        for victim in list(self.held):
            self.take_back(victim)

    def add(self, victim: str) -> None:
        core = self.core
        self.held[victim] = core.state.reservations.get(victim)
        core.state.release(victim)
        self.memory[victim] = self._show_gpus_free(self.held[victim] or ())
        self.ram[victim] = self._show_ram_free(self.held[victim] or ())
        self._count_waiting(core.running[victim].spec, +1)

    def take_back(self, victim: str) -> None:
        held = self.held.pop(victim)
        if held is not None:
            self.core.state.reserve(victim, held)
        table = self.core.state.table
        for row, slots, measured in self.memory.pop(victim):
            table.gpu_free_gib[row, slots] = measured
            self.shown.difference_update((row, int(slot)) for slot in slots)
            self.shown_rows[row] -= len(slots)
        for row, shown in self.ram.pop(victim):
            table.ram_available_gib[row] -= shown
        for row in [row for row in self.ram_measured  # (exactly as measured, no rounding)
                    if not any(r == row for entries in self.ram.values() for r, _ in entries)]:
            table.ram_available_gib[row] = self.ram_measured.pop(row)
        self._count_waiting(self.core.running[victim].spec, -1)

    def _show_gpus_free(self, reservations) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """A victim's GPUs at their whole memory, as they will be once it has yielded. The
        agents measure free memory, and the victim's training fills its GPUs: a job with a
        memory floor (every GPU job pretrain.py submits) never fitted in thought, so it never
        preempted. Which GPUs a job has is Ray's choice: its count of the node's fullest."""
        table, shown = self.core.state.table, []
        # (row, slot) already shown free for another victim: that one's (taken again, its
        # measured figure was overwritten for good when the two were put back)
        others = self.shown
        for r in reservations:
            row = table.index.get(r.node_id)
            if not r.gpus or row is None:
                continue
            free, total = table.gpu_free_gib[row], table.gpu_total_gib[row]
            present = np.flatnonzero(np.isfinite(total))  # -inf: none
            if self.shown_rows[row]:
                present = np.array([s for s in present if (row, int(s)) not in others],
                                   dtype=np.int64)
            slots = present[np.argsort(free[present] - total[present], kind="stable")][:r.gpus]
            shown.append((row, slots, free[slots].copy()))
            free[slots] = total[slots]
        others.update((row, int(slot)) for row, slots, _ in shown for slot in slots)
        for row, slots, _ in shown:
            self.shown_rows[row] += len(slots)
        return shown

    def _show_ram_free(self, reservations) -> list[tuple[int, float]]:
        """The host RAM a victim's workers use, up to what they asked for (min_host_memory_gb),
        shown available as it will be once it has yielded (ram_use_freed, as a running job's
        end in the backfill plan): the agents measure available RAM, the victim's workers use
        it, and a job stating its RAM never fitted in thought (the victim's reservation freed,
        its use still counted), so it never preempted."""
        table, shown = self.core.state.table, []
        for r in reservations:
            row = table.index.get(r.node_id)
            if not r.memory_gb or row is None or not math.isfinite(table.ram_total_gib[row]):
                continue  # (not finite: its host probe failed, no RAM known to hand out)
            self.ram_measured.setdefault(row, float(table.ram_available_gib[row]))
            freed = ram_use_freed(r.memory_gb, float(table.ram_total_gib[row]),
                                  float(table.ram_available_gib[row]),
                                  float(table.ram_outside_gib[row]))
            table.ram_available_gib[row] += freed
            shown.append((row, freed))
        return shown

    def _count_waiting(self, spec: JobSpec, sign: int) -> None:
        """Its GPUs waiting (+1) or running again (-1), as JobQueue and _count_pinned count."""
        if not spec.total_gpus:
            return
        self.core.queue.count_gpus_waiting(spec, sign)
        self.core._count_pinned(spec, -sign)


# -- the core ------------------------------------------------------------------------------------

class SchedulerCore:
    """Cluster state, wait queue, running jobs and their owners; see the module docstring."""

    def __init__(self, settings: SchedulerSettings | None = None,
                 speed: SpeedModel = default_speed, state: ClusterState | None = None,
                 policy: Policy | None = None, wakeups: bool = False,
                 dead_node_retention_s: float = DEAD_NODE_RETENTION_S) -> None:
        """`state`: a prepared cluster (the simulator's model); `policy`: where jobs go, if
        not place() (the simulator compares baselines through the same queue); `wakeups`:
        note the moments time alone makes a decision possible, for next_wakeup (a driver
        that ticks the core only then; the live actor ticks every 5 s and needs none);
        `dead_node_retention_s`: how long a node dead for good is kept (_forget_dead_nodes;
        math.inf keeps every one, as before 2026-12-07: scripts/bench_placement.py's
        baseline)."""
        self.settings = settings or SchedulerSettings()
        self.dead_node_retention_s = dead_node_retention_s
        s = self.settings
        self.state = state or ClusterState(suspect_after_s=s.suspect_after_s,
                                           dead_after_s=s.dead_after_s,
                                           inter_group_gbps=s.inter_group_gbps,
                                           max_load_per_cpu=s.max_load_per_cpu)
        self.speed = speed
        self.policy = policy
        # The node types the cluster's autoscaler can add (orchestrator/autoscaling.py; set
        # by the live actor from the cluster config, empty elsewhere): a job only they can
        # hold waits for them instead of being rejected.
        self.node_types: tuple[NodeType, ...] = ()
        # Which of Ray's autoscalers adds them, "v1" or "v2" (set by the live actor from
        # Ray's GCS), "unknown" elsewhere: the scale-up notes say what that one adds, or
        # name both where not known (orchestrator/autoscaling.py AUTOSCALERS).
        self.autoscaler = "unknown"
        # The head node's id (the live actor runs there), None where not known: the other
        # nodes Ray lists alive are worker nodes, which count against the cluster's
        # max_workers (cluster_room_note).
        self.head_node: str | None = None
        self._awaits_memo: tuple[float, dict] = (math.nan, {})
        self.awaiting_since: dict[str, float] = {}  # job -> when it began waiting for nodes
        # Waiting job -> (when it was queued, the worker bundles asked of the autoscaler for
        # it), kept until it leaves the queue: withdrawn once its nodes joined but while it
        # still waits (for a running job), they would sit idle and be removed, and it would
        # ask again. The queue time tells a job from a later one of the same name.
        # job -> (when it entered the queue, the bundles asked, its plan's parts: each
        # {"node_type", "nodes" to add, "workers"}, scale_up_asked_by_job)
        self.nodes_asked: dict[str, tuple[float, list[dict[str, float]], list[dict]]] = {}
        self._alive_changed_at = -math.inf  # when Ray's alive set last changed
        # A waiting job was kept although it may never fit, as nodes had not reported: once
        # they have (or suspect_after_s passed), the queue is judged again (report and tick)
        self._verdicts_due = False
        self.queue = JobQueue(self._level if s.queue_order == "las" else None,
                              self._promote_after)
        self.running: dict[str, RunningJob] = {}
        # GPUs running jobs allowed a single family hold there (what protects it, see
        # _family_choice), and a typical job's relative speed per family (comparative advantage).
        self.pinned_running: dict[str, int] = {}
        self.running_priorities: Counter = Counter()  # priority -> running jobs
        # (planned end, name) of running jobs with a time estimate, kept sorted as they start
        # and stop: the head's shadow time walks it instead of sorting every running job.
        self.planned_ends: list[tuple[float, str]] = []
        self.typical_speed: dict[str, float] = {}
        self.typical_count = 0
        self.preempting: dict[str, set[str]] = {}  # waiting job -> victims not yet yielded
        # (due, needs a waiting job, job, its started_at): moments time alone changes what may
        # be decided about a running job (next_wakeup); lazily deleted (a stopped job's stay).
        self._wakeups: list[tuple[float, bool, str, float]] | None = [] if wakeups else None
        # A queue pass refused a job as backfill and then started a later one: the refused job
        # may fit elsewhere now, which the live actor's next tick finds (next_wakeup).
        self._repass_due = False
        # The jobs the last queue pass made EASY plans for (_plan_blocked): the migration
        # scan right after it spares their room too (_migration_spares_head)
        self._plan_jobs: list[str] = []
        # (_busy_worker_nodes: the state and its reservations_changed count -> node -> jobs)
        self._jobs_by_node: tuple[tuple | None, dict[str, list[str]]] = (None, {})
        # (_nodes_that_may_go, while a queue pass runs: the plan's kept keys -> nodes going)
        self._going_this_pass: dict[frozenset, set[str]] | None = None
        # (node id, GPU index) pairs a job must not be given: its worker found the GPU Ray
        # assigned without the free memory the job asks for (memory used outside Ray).
        self.excluded_gpus: dict[str, set[tuple[str, int]]] = {}
        # How many placements each job's driver has given back (yielded, gpu_too_small): the
        # driver says how many it had before each such call, so a call already carried out
        # and sent again (its answer lost: Ray retries calls to a restarted actor, and the
        # driver's link resends) is answered, not carried out twice.
        self.placements_given_back: dict[str, int] = {}
        self.ray_alive: set[str] = set()
        self.ray_dead: set[str] = set()
        # Known nodes Ray said were removed on purpose (tick's `retired`), kept once said: Ray's
        # GCS lists only its last maximum_gcs_dead_node_cached_count (1000) dead nodes, and a
        # retired node it evicted was counted dead (NodeDown paged at each later scale-down).
        self.retired: set[str] = set()
        # Nodes whose reports are being refused, and why (the reason's kind): logged when a
        # run of refusals starts or its kind changes (an accepted report ends the run; kept
        # for good, a later refusal of another kind went unlogged while the agent pointed the
        # operator to the scheduler's log).
        self.refused_nodes: dict[str, str] = {}
        # When each of them was last refused, the least recent first: a node never taken (a
        # stale agent of a node forgotten long ago, a mistyped id) is forgotten once that is
        # older than dead_node_retention_s (_forget_refusals); they were kept for good.
        self.refused_at: dict[str, float] = {}
        # When each node's agent last sent a report refused as malformed: it is alive and
        # reporting, so restarting it (every suspect_after_s, for ever) would not help.
        self.malformed_at: dict[str, float] = {}
        # When this incarnation restored a previous one's state: until every node Ray lists
        # alive has reported (or suspect_after_s passed), the queue places nothing, since it
        # would decide on part of the cluster.
        self.restored_at: float | None = None

    # -- nodes ----------------------------------------------------------------------------
    def report(self, report: NodeReport, now: float) -> Outcome:
        """A node agent's report; decision True if taken. Only nodes Ray lists alive count
        (unless synthetic_nodes): a forged or mistyped id, or a stale agent of a node Ray
        declared dead, never brings back capacity that is not there."""
        node = report.node_id
        if not self.settings.synthetic_nodes and node not in self.ray_alive:
            reason = catalogue.REPORT_DEAD_NODE if node in self.ray_dead \
                else catalogue.REPORT_UNKNOWN_NODE
            self._refused(node, reason, now)
            return Outcome(reason, samples=[(catalogue.SCHEDULER_REPORTS_REFUSED, 1,
                                             {"reason": reason})])
        problem = report_problem(report)
        if problem:
            self._refused(node, catalogue.REPORT_MALFORMED, now)
            self.malformed_at[node] = now
            return Outcome(f"{catalogue.REPORT_MALFORMED}: {problem}",
                           samples=[(catalogue.SCHEDULER_REPORTS_REFUSED, 1,
                                     {"reason": catalogue.REPORT_MALFORMED})])
        was_placeable = self.state.health(node, now) == "healthy" if node in \
            self.state.reports else False
        self._forget_refusal(node)
        self.state.update(report, now)
        self._nodes_changed()
        outcome = Outcome(True)
        if self._verdicts_due and not self._unknown_nodes(now):
            outcome.add(self._reject_unfittable(now))  # the last node needed to judge them
        if not was_placeable and len(self.queue):  # capacity (re)appeared: waiting jobs may start
            outcome.add(self._drain(now))
        return outcome

    def _refused(self, node: str, reason: str, now: float) -> None:
        """Note a refused report (refused_at kept in order of the last refusal)."""
        self.refused_nodes[node] = reason
        self.refused_at.pop(node, None)
        self.refused_at[node] = now

    def _forget_refusal(self, node: str) -> None:
        """A node's refusals are over: a report taken, the node forgotten or long quiet."""
        self.refused_nodes.pop(node, None)
        self.refused_at.pop(node, None)
        self.malformed_at.pop(node, None)

    def _forget_refusals(self, now: float) -> None:
        """Forget the refusals of nodes not known (never taken, or already forgotten) last
        refused over dead_node_retention_s ago, the rule for dead nodes: kept, every stale
        agent's or mistyped node id stayed for good. A known node's go with it
        (_forget_dead_nodes) or its next report taken."""
        old = list(itertools.takewhile(
            lambda item: now - item[1] > self.dead_node_retention_s, self.refused_at.items()))
        for node, _ in old:
            if node not in self.state.reports:
                self._forget_refusal(node)

    def knows_alive(self, node_id: str) -> bool:
        return self.settings.synthetic_nodes or node_id in self.ray_alive

    def ray_nodes(self, alive: set[str], dead: set[str], now: float) -> Outcome:
        """Ray's view of the nodes. Nodes Ray lists dead, and nodes holding reservations that
        Ray no longer lists alive (died while the scheduler was restarting), are dead; so are
        silent nodes it no longer lists alive (what they kept aside is dropped)."""
        if set(alive) != self.ray_alive:
            self._alive_changed_at = now
            self._nodes_changed()
        silent_before = self._silent_alive()
        self.ray_alive, self.ray_dead = set(alive), set(dead)
        if self.settings.synthetic_nodes:
            return Outcome([])
        holding = {r.node_id for held in self.state.reservations.values() for r in held}
        newly_dead = sorted(((dead & set(self.state.reports)) - self.state.dead)
                            | (holding - alive))
        outcome = Outcome(newly_dead)
        lost = set()
        for node_id in newly_dead:
            lost.update(self.state.mark_dead(node_id))
        if newly_dead:
            self._nodes_changed()
        # Dead by silence, then by Ray: listed dead, or no longer listed at all (its GCS keeps
        # only its last 1000 dead nodes; such a node kept what it held aside, and its place in
        # the saved state, for good). Its workers are gone, nothing to give back.
        gone_silent = self.state.silent - self.ray_alive
        for node_id in gone_silent & self.state.silent_reservations.keys():
            lost.update(r.job_name for r in self.state.silent_reservations.pop(node_id))
        self._withdraw_lost_migrations(lost)
        self.state.silent -= gone_silent  # Ray's word now, whatever silence said before
        if gone_silent and not newly_dead:
            outcome.effects.append(Persist())
        if newly_dead:
            outcome.effects.append(Persist())
        # A silent node Ray no longer lists alive has left: jobs only it could hold never fit
        if newly_dead or silent_before - self._silent_alive():
            outcome.add(self._reject_unfittable(now))
        return outcome

    def ray_usage(self, available: dict[str, dict[str, float]], now: float) -> Outcome:
        """Ray's available CPUs and GPUs per node: what is used beyond this scheduler's
        reservations is held by work it did not place, and is not free (see
        ClusterState.set_ray_usage). Freed capacity lets waiting jobs start."""
        freed = False
        unstarted = self._unstarted_reservations(now)
        for node_id, resources in available.items():
            report = self.state.reports.get(node_id)
            if report is None:
                continue
            before = self.state.outside_on(node_id)
            self.state.set_ray_usage(node_id, report.ray_cpus - resources.get("CPU", 0.0),
                                     report.ray_gpus - resources.get("GPU", 0.0),
                                     unstarted=unstarted.get(node_id, (0.0, 0)))
            freed |= self.state.outside_on(node_id) < before
        return self._drain(now) if freed else Outcome()

    def _unstarted_reservations(self, now: float) -> dict[str, tuple[float, int]]:
        """Per node, (CPUs, GPUs) reserved whose workers may not run yet: jobs placed within
        worker_start_grace_s, and migration claims (held for a job still running elsewhere)."""
        grace = self.settings.worker_start_grace_s
        starting = {name for name, job in self.running.items() if now - job.started_at < grace}
        held: dict[str, tuple[float, int]] = {}
        for name, reservations in self.state.reservations.items():
            if name in starting or name.endswith(CLAIM_SUFFIX):
                for r in reservations:
                    cpus, gpus = held.get(r.node_id, (0.0, 0))
                    held[r.node_id] = (cpus + r.cpus, gpus + r.gpus)
        return held

    def agents_needed(self, alive: set[str], now: float) -> list[StartAgent]:
        """Alive nodes whose agent has not reported lately: start (or restart) their agent."""
        if self.settings.synthetic_nodes:
            return []
        reporting = {n for n, at in self.malformed_at.items()
                     if now - at < self.settings.suspect_after_s}
        return [StartAgent(n) for n in sorted(alive - reporting)
                if self.state.health(n, now) != "healthy"]

    def node_unreachable(self, node_id: str, why: str, now: float) -> bool:
        """A job's driver could not reach the node: suspect, not dead (see the docstring)."""
        if node_id in self.ray_dead and node_id in self.state.reports:
            self.state.mark_dead(node_id)
            return True
        return self.state.mark_suspect(node_id, why)

    # -- jobs: submit, poll, place ------------------------------------------------------------
    def submit(self, spec: JobSpec, owner: str, now: float) -> Outcome:
        """Place now, or queue when the job fits the cluster but not its free capacity (or
        must not jump the queue); reject what can never fit, or a name in use."""
        name = spec.name
        held_by = self.owner_of(name)
        if held_by is not None:
            if owner and held_by == owner:  # a retried call: the same answer
                return Outcome(self._answer(name, owner))
            return self._reject(Rejection(name, (
                f"job '{name}' already holds a reservation or waits in the queue: a job of "
                "that name is running (two launches of the same run?)")),
                catalogue.REJECT_DUPLICATE)
        self.excluded_gpus.pop(name, None)  # an earlier job's of this name (a new run now)
        self.placements_given_back.pop(name, None)
        # (put back if the job is refused below: one that never competed is no typical job)
        typical_before = dict(self.typical_speed), self.typical_count
        self._learn_typical_speed(spec)
        self.queue.add(QueuedJob(spec, owner, now, "submitted"))
        outcome = Outcome(effects=[Persist()])
        outcome.add(self._drain(now, answered=name))
        placed = self.queue.ready.pop(name, None)
        if placed is not None:  # (counted by the queue pass that placed it)
            outcome.decision = placed
            return outcome
        never = self._never_fits(spec, now)  # asked only of jobs that did not start
        if never is not None:
            self.queue.remove(name)
            self.typical_speed, self.typical_count = typical_before
            outcome.decision = never
            outcome.samples += catalogue.decision_samples(never, None)
            return outcome
        if name in self.queue.rejected and not self.queue.holds(name):  # dropped by this pass
            self.typical_speed, self.typical_count = typical_before
            outcome.decision = self.queue.take_rejection(name)
            outcome.samples += catalogue.decision_samples(outcome.decision, None)
            return outcome
        # (a rejection left for an earlier job of this name, cancelled while its driver was
        # gone, say, stays for that driver: it is not this job's answer)
        outcome.decision = self.queue.status(name)
        outcome.samples += catalogue.decision_samples(outcome.decision, None)
        return outcome

    def poll(self, job_name: str, owner: str, now: float) -> Outcome:
        """A job's state for its driver: the placement once made, else its place in line and
        what it waits for, or why it was dropped."""
        placed = self.queue.ready.get(job_name)
        if placed is not None and (not owner or placed.owner == owner):
            del self.queue.ready[job_name]
            return Outcome(placed, [Persist()])
        answer = self._answer(job_name, owner)
        stuck = [self._not_stopping(v, now) for v in sorted(self.preempting.get(job_name, ()))]
        if isinstance(answer, Queued) and any(stuck):
            answer = dataclasses.replace(answer, reason=answer.reason + "; " + "; ".join(
                f"{v!r} {note}" for v, note in zip(sorted(self.preempting[job_name]), stuck)
                if note))
        return Outcome(answer)

    def _not_stopping(self, job_name: str, now: float) -> str:
        """For a running job told to yield that read it and has reported no checkpoint in
        this placement: that it stops only at a checkpoint, so a loop that never passes one
        never stops (a preemptible job's promise broken); "" otherwise. `status` and the
        waiting drivers of the jobs it makes room for said only "preempted by ..." for good."""
        job = self.running.get(job_name)
        d = job.directive if job is not None else None
        if d is None or d.read_at is None or job.last_checkpoint_at is not None:
            return ""
        return (f"read its directive {now - d.read_at:.0f}s ago and has reported no checkpoint "
                f"since it started {now - job.started_at:.0f}s ago: it stops at its next "
                "checkpoint, and a loop that never passes one to launch.report never stops "
                "(stop its driver; declare such a loop preemptible: false)")

    def place_now(self, spec: JobSpec, owner: str, now: float, dry_run: bool = False,
                  explain: bool | None = None, history: QueuedJob | None = None) -> Outcome:
        """Place immediately, bypassing the queue (the `place` CLI, replacement after a node
        loss), or say why not. A retry by the same owner gets what it already holds.
        `history`: what the job went through before (a replacement keeps its service)."""
        held = self.running.get(spec.name)
        if held is not None and not dry_run and owner and held.placement.owner == owner:
            return Outcome(held.placement)
        if held is not None and not dry_run:
            # (even were its reservation lost: a second start gave its devices to two jobs)
            return Outcome(Rejection(spec.name, (
                f"job '{spec.name}' already holds a reservation: a job of that name is running "
                f"(held by {held.placement.owner or 'an operator'})")))
        if self.queue.holds(spec.name) and not dry_run:
            return Outcome(Rejection(spec.name, f"job '{spec.name}' already waits in the queue"))
        try:
            placement = self._place(spec, now, owner, explain)
        except PlacementError as e:
            return Outcome(self._not_final(e.rejection, spec, now))
        if dry_run:
            return Outcome(placement)
        self._start(spec, owner, placement, now, history or QueuedJob(spec, owner, now))
        return Outcome(placement, [Persist()])

    def replace(self, spec: JobSpec, owner: str, lost_nodes: list[str], now: float) -> Outcome:
        """A running job lost node(s) (its driver could not reach them): they become suspect
        (or dead, where Ray says so), the job's reservation is released and it is placed
        afresh (its whole worker group restarts anyway). Only its owner may. When nothing fits
        now it waits in the queue with its submit time and service (as a preempted job does:
        it may preempt, and goes before later jobs); its driver then polls."""
        held_by = self.owner_of(spec.name)
        if held_by not in (owner, None):
            return Outcome(Rejection(spec.name, f"job '{spec.name}' is held by another driver"))
        if self.queue.holds(spec.name):  # a retried call while it waits: where it stands
            return self.poll(spec.name, owner, now)
        kept = self._kept_rejection(spec.name, owner)
        if spec.name not in self.running and kept is not None:
            # A retried call (the answer to the first was lost): the cancel it was told, not
            # a fresh placement of the cancelled job.
            return Outcome(kept)
        for node_id in lost_nodes:
            self.node_unreachable(node_id, "a job's driver could not reach its raylet", now)
        previous = self.running.get(spec.name)
        if previous is not None and previous.directive is not None:
            return self._yielded_as_it_lost_nodes(spec.name, owner, now)
        self._stop(spec.name)
        # Its service so far carries over (LAS level, the time left of its estimate)
        history = QueuedJob(spec, owner, now, "") if previous is None else QueuedJob(
            spec, owner, previous.enqueued_at, "", previous.preemptions,
            previous.ran_s + max(now - previous.started_at, 0.0),
            las_baseline_s=previous.las_baseline_s)
        outcome = self.place_now(spec, owner, now, history=history)
        if previous is not None and isinstance(outcome.decision, Placement):
            self.running[spec.name].last_checkpoint_at = previous.last_checkpoint_at
        elif isinstance(outcome.decision, Rejection) and outcome.decision.fits_when_free:
            history.reason = (f"lost node(s) {', '.join(n[:12] for n in lost_nodes)}; "
                              "waiting for room")
            history.queued_at = now
            self.queue.add(history)
            # (it may preempt lower-priority jobs)
            outcome.add(self._drain(now, answered=spec.name))
            placed = self.queue.ready.pop(spec.name, None)
            outcome.decision = placed or self.queue.status(spec.name) or \
                self.queue.take_rejection(spec.name, outcome.decision)
            if placed is not None:  # (counted by the queue pass that placed it)
                outcome.effects.append(Persist())
                return outcome
        # Counted as a submit's decision is: a job refused after losing a node was in neither
        # placement_decisions_total nor rejections_total.
        outcome.samples += catalogue.decision_samples(outcome.decision, None)
        outcome.effects.append(Persist())
        return outcome

    def _yielded_as_it_lost_nodes(self, job_name: str, owner: str, now: float) -> Outcome:
        """A job told to stop (cancel, preempt, migrate) lost a node first: the worker group
        is down either way, so this is the yield it was going to make (placed afresh, the
        directive was dropped: a cancelled job trained to its end, and an operator's
        preemption made no room). A cancel is kept for a retried call until the job is
        released (_yield); a preempted job's answer says so (it waits without a deadline)."""
        outcome = self._yield(self.running[job_name], owner, now, "lost node(s)")
        if isinstance(outcome.decision, Queued):
            outcome.decision = dataclasses.replace(outcome.decision, preempted=True)
        return outcome

    # -- jobs: ending, yielding ----------------------------------------------------------------
    def release(self, job_name: str, owner: str, now: float) -> Outcome:
        """The job ended: free what it held (only its owner, or an operator passing no owner)."""
        if owner and self.owner_of(job_name) not in (owner, None):
            return Outcome(False)
        released = self._stop(job_name)
        if self.queue.remove(job_name) is not None:  # its driver ended before it was placed
            self._forget_preemption(job_name)
            released = True
        if self.queue.rejected_owners.get(job_name) == owner:  # (its driver is done with it)
            self.queue.take_rejection(job_name)
        self.excluded_gpus.pop(job_name, None)
        self.placements_given_back.pop(job_name, None)
        outcome = Outcome(released, [Persist()])
        outcome.add(self._after_capacity_freed(now))
        return outcome

    def cancel(self, job_name: str, owner: str, now: float,
               waiting_only: bool = False) -> Outcome:
        """Leave the queue, or, running, be told to checkpoint and stop (CANCEL directive);
        only its owner or an operator (no owner). A driver cancelling its own job frees it at
        once: it is not training. `waiting_only`: leave the queue, and nothing if it is not
        waiting (a driver's Ctrl-C: running workers still hold their devices until aborted,
        and the driver releases them after)."""
        if owner and self.owner_of(job_name) not in (owner, None):
            return Outcome(False)
        if waiting_only and not (job_name in self.queue.waiting
                                 or job_name in self.queue.ready):
            return Outcome(False)
        outcome = Outcome(False, [Persist()])
        self.excluded_gpus.pop(job_name, None)
        if job_name in self.queue.waiting or job_name in self.queue.ready:
            if not owner:  # an operator: the polling driver is told why
                self.queue.keep_rejection(job_name, Rejection(job_name, (
                    f"job '{job_name}' was cancelled by an operator"), cancelled=True),
                    self.queue.owner_of(job_name) or "")
            self.queue.remove(job_name)
            ready = self.queue.ready.pop(job_name, None)
            if ready is not None:
                self._stop(job_name)
            self._forget_preemption(job_name)
            outcome.decision = True
        elif job_name in self.running:
            if owner:
                self._stop(job_name)
            elif not self.running[job_name].spec.preemptible:
                return Outcome(False)  # it would never read the directive: not cancelled
            elif getattr(self.running[job_name].directive, "kind", None) != CANCEL:
                # (told once: a repeat is accepted, not told again, counted or logged again)
                outcome.add(self._direct(job_name, CANCEL, "cancelled by an operator", now))
            outcome.decision = True
        outcome.add(self._after_capacity_freed(now))
        return outcome

    def preempt(self, job_name: str, now: float, reason: str = "preempted by an operator"
                ) -> Outcome:
        """An operator's preemption: the job checkpoints, yields and waits in the queue. A
        job already told to stop for good (cancelled) is not brought back; one already
        being preempted stays so (done)."""
        if job_name not in self.running or job_name in self.queue.ready \
                or not self.running[job_name].spec.preemptible:
            return Outcome(False)
        directive = self.running[job_name].directive
        if directive is not None and directive.kind in (CANCEL, PREEMPT):
            return Outcome(directive.kind == PREEMPT)
        claimed = job_name + CLAIM_SUFFIX in self.state.reservations
        outcome = self._direct(job_name, PREEMPT, reason, now)
        outcome.decision = True
        if claimed:  # its migration's claimed target is free again (_direct)
            outcome.add(self._after_capacity_freed(now))
        return outcome

    def directive(self, job_name: str, now: float, last_checkpoint_at: float | None = None
                  ) -> Outcome:
        """What a running job should do at its next step boundary (decision: a Directive, or
        None to keep training). The job's check also says when it last checkpointed (victim
        choice uses it): a new time is saved soon (SaveSoon). A directive's first read is
        saved at once: the job acts on it from then on, and a restarted scheduler that lost
        the read withdrew it (_forget_preemption), its yield uncounted as a preemption."""
        job = self.running.get(job_name)
        if job is None:
            return Outcome(None)
        outcome = Outcome()
        if last_checkpoint_at is not None:
            if job.last_checkpoint_at is None or \
                    abs(last_checkpoint_at - job.last_checkpoint_at) >= SAME_CHECKPOINT_S:
                outcome.effects.append(SaveSoon())
            job.last_checkpoint_at = last_checkpoint_at
        if job.directive is not None and job.directive.read_at is None:
            job.directive = dataclasses.replace(job.directive, read_at=now)
            outcome.effects.append(Persist())
        outcome.decision = job.directive
        return outcome

    def gpu_too_small(self, job_name: str, owner: str, gpus: list[tuple[str, int]],
                      now: float, given_back: int | None = None) -> Outcome:
        """A worker found that the GPU Ray gave it lacks the free memory the job asks for:
        the job gives its placement back and is placed again without those GPUs.
        `given_back`: as for yielded."""
        job = self._giving_back(job_name, owner, given_back)
        if job is None:
            return self._where_it_stands(job_name, owner, now)
        excluded = self.excluded_gpus.setdefault(job_name, set())
        for node, index in gpus:
            report = self.state.reports.get(node)
            if (node, index) in excluded or not is_int(index):
                # Ray picks GPU ids and picked it again, or the worker could not say which
                # of the node's GPUs it was (a UUID NVML did not map; int() raised here and
                # failed the job): the node is avoided for this job altogether
                excluded.update((node, g.index) for g in (report.gpus if report else ()))
                continue
            excluded.add((str(node), int(index)))
        where = ", ".join(f"GPU {i} of node {n[:12]}" for n, i in gpus)
        outcome = self._yield(job, owner, now,
                              reason=f"{where} lacked {job.spec.min_gpu_memory_gb:g} GiB free: "
                                     "placed again without it")
        self._count_given_back(job_name, given_back)
        return outcome

    def yielded(self, job_name: str, owner: str, now: float, reason: str = "",
                given_back: int | None = None) -> Outcome:
        """The job checkpointed and stopped as told: preempted -> back in the queue (its
        original submit time kept); migrating -> handed its claimed target at once;
        cancelled -> gone. The decision is what its driver should do next. `given_back`: how
        many placements the driver had given back before this call (None: not said, the
        simulator's); fewer than the scheduler counts: the call was carried out already and
        is sent again, so it is answered with where the job stands now."""
        job = self._giving_back(job_name, owner, given_back)
        if job is None:
            return self._where_it_stands(job_name, owner, now)
        outcome = self._yield(job, owner, now, reason)
        self._count_given_back(job_name, given_back)
        return outcome

    def _giving_back(self, job_name: str, owner: str, given_back: int | None
                     ) -> RunningJob | None:
        """The running job a driver's yielded or gpu_too_small gives back, or None: not
        running (or another driver's), or a call already carried out."""
        job = self.running.get(job_name)
        if job is None or (owner and job.placement.owner != owner):
            return None
        if given_back is not None and given_back < self.placements_given_back.get(job_name, 0):
            return None
        return job

    def _count_given_back(self, job_name: str, given_back: int | None) -> None:
        if given_back is not None:
            self.placements_given_back[job_name] = given_back + 1

    def _where_it_stands(self, job_name: str, owner: str, now: float) -> Outcome:
        """The answer to a yielded or gpu_too_small for a placement the job no longer holds
        (a call carried out already, sent again; a job already stopped): what a poll says,
        a rejection kept for this driver (a cancel, a drop) included (_kept_rejection)."""
        return self.poll(job_name, owner, now)

    def _yield(self, job: RunningJob, owner: str, now: float, reason: str = "") -> Outcome:
        """Carry out a running job's yield (see yielded). A rejection (cancelled, or dropped
        as it can no longer fit) is kept for its driver until it releases the job, so that a
        retried call hears it again."""
        job_name = job.spec.name
        directive = job.directive
        claim = self.state.reservations.get(job_name + CLAIM_SUFFIX)
        self._stop(job_name)
        outcome = Outcome(effects=[Persist()])
        ran = job.ran_s + max(now - job.started_at, 0.0)  # a clock stepped back: not < 0
        if directive is not None and directive.kind == CANCEL:
            outcome.decision = Rejection(job_name, f"job '{job_name}' was cancelled: "
                                         f"{directive.reason}", cancelled=True)
        elif directive is not None and directive.kind == MIGRATE and \
                self._take_claim(job, directive.target, claim, now, ran):
            outcome.decision = directive.target
        else:
            preempted = job.preemptions + (directive is not None and directive.kind == PREEMPT)
            reason = directive.reason if directive else (reason or "yielded")
            # An operator's preemption is meant to make room: the job goes behind those
            # already waiting at its priority (with its first submit time it was first in
            # line again and placed at once, ahead of the job it made room for).
            # Under LAS also at their level at least: with a fresh submit time alone, a job
            # of less service still went back ahead of them.
            by_operator = directive is not None and directive.kind == PREEMPT \
                and not directive.for_job
            self.queue.add(QueuedJob(job.spec, job.placement.owner,
                                     now if by_operator else job.enqueued_at,
                                     reason, preempted, ran, queued_at=now,
                                     las_baseline_s=job.las_baseline_s,
                                     level_floor=self.queue.last_level(job.spec.priority)
                                     if by_operator else 0))
            # Nodes may have left while it checkpointed: refused only the jobs waiting then,
            # it waited for ever for room the cluster no longer has
            outcome.decision = self._refuse_if_never_fits(job.spec, now, outcome) \
                or self.queue.status(job_name)
            if isinstance(outcome.decision, Rejection):
                self.queue.take_rejection(job_name)  # (kept below for its driver)
        outcome.add(self._after_capacity_freed(now))
        if isinstance(outcome.decision, Queued):  # it may have been placed again at once
            placed = self.queue.ready.pop(job_name, None)  # or dropped: it can no longer fit
            outcome.decision = placed or self.queue.status(job_name) or \
                self.queue.take_rejection(job_name)
        if owner and isinstance(outcome.decision, Rejection):
            self.queue.keep_rejection(job_name, outcome.decision, owner)
        return outcome

    def owners_dead(self, dead_owners: set[str], now: float) -> Outcome:
        """Drivers that exited: release what they held, forget what they queued and the
        rejections kept for them."""
        released = [name for name, job in self.running.items()
                    if job.placement.owner and job.placement.owner in dead_owners]
        for name in released:
            self._stop(name)
        dropped = self.queue.drop_owners(dead_owners)
        for name in dropped:
            self._stop(name)
            self._forget_preemption(name)
        outcome = Outcome((released, dropped))
        if released or dropped:
            outcome.effects.append(Persist())
            outcome.add(self._after_capacity_freed(now))
        if self.queue.drop_rejections_of(dead_owners) and not outcome.persist:
            outcome.effects.append(Persist())
        return outcome

    def tick(self, now: float, retired: set[str] = frozenset(), gauges: bool = True) -> Outcome:
        """Periodic pass: heartbeat expiry, jobs that can no longer fit, queue, preemption for
        the head of the queue, migrations; gauges (a pass over the nodes) unless `gauges` is
        False (the simulator records none), which leave out the nodes Ray says were removed
        on purpose (`retired`), now or at an earlier tick (self.retired)."""
        expired, lost = self.state.expire(now)
        if expired:
            self._nodes_changed()
        self._forget_dead_nodes(now)
        self._forget_refusals(now)
        # (node ids are never reused; dropped as the node is forgotten: _forget_dead_nodes)
        self.retired.update(n for n in retired if n in self.state.reports)
        # A migration whose target went silent: withdrawn as when Ray lists it dead (it made
        # the job restart for nothing; the move is made afresh once the node reports again)
        self._withdraw_lost_migrations(set(lost))
        outcome = Outcome({"expired": expired, "lost_reservations": lost})
        self.awaiting_since = {name: since for name, since in self.awaiting_since.items()
                               if self._waits_for_new_nodes(name, now)}
        # GPUs excluded for a job that has gone (its driver died, it was rejected): not a
        # later job's of that name
        self.excluded_gpus = {name: gpus for name, gpus in self.excluded_gpus.items()
                              if self.owner_of(name) is not None}
        self.placements_given_back = {name: n for name, n in self.placements_given_back.items()
                                      if self.owner_of(name) is not None}
        if expired or any(now - since > self.settings.scale_up_timeout_s
                          for since in self.awaiting_since.values()) \
                or (self._verdicts_due and not self._unknown_nodes(now)):
            outcome.effects.append(Persist())
            outcome.add(self._reject_unfittable(now))
        outcome.add(self._drain(now))
        outcome.add(self._migrate(now))
        if gauges:
            outcome.samples += catalogue.scheduler_samples(
                self.state, [j.in_queue_since for j in self.queue.waiting.values()],
                len(self.running), now, self.retired)
        return outcome

    def _forget_dead_nodes(self, now: float) -> None:
        """Forget nodes dead for good (ClusterState.dead_past) for over dead_node_retention_s
        (DEAD_NODE_RETENTION_S by default) that nothing refers to any more: no reservation or
        migration claim, nothing kept aside, no running or placed job's placement, no
        directive's target. Kept, every node that ever joined a long-lived autoscaling
        cluster stayed in each pass and in the table (`python -m scripts.bench_placement
        --dead-nodes 20000`: docs/benchmarks.md)."""
        due = self.state.dead_past(now, self.dead_node_retention_s)
        if not due:
            return
        held = {r.node_id for rs in self.state.reservations.values() for r in rs}
        held.update(self.state.silent_reservations)
        held.update(r.node_id for rs in self.state.silent_reservations.values() for r in rs)
        for job in self.running.values():
            held.update(job.placement.worker_nodes)
            if job.directive is not None and job.directive.target is not None:
                held.update(job.directive.target.worker_nodes)
        for placement in self.queue.ready.values():
            held.update(placement.worker_nodes)
        gone = [node for node in due if node not in held]
        if not gone:
            return
        self.state.forget(gone)
        self.retired.difference_update(gone)
        self._nodes_changed()
        for node in gone:
            self._forget_refusal(node)

    def next_wakeup(self, now: float, until: float) -> float | None:
        """The first moment in (now, until] at which time alone may change a decision, or None:
        a running job passes `min_run_s` (it may be preempted or moved), crosses a LAS level
        (it may be preempted by a job of a lower level), or passes its planned end (the head's
        shadow time moves); a waiting job's promotion falls due. Those needing a waiting job
        are skipped while none waits. The live actor ticks every 5 s and needs none of this;
        a driver that calls the core only on events (the simulator) calls tick() at these
        moments, in time order. Each is returned once. Also a moment just after `now` when the
        last queue pass refused a job as backfill and then started a later one (the live
        actor's next tick passes again)."""
        if self._repass_due:
            self._repass_due = False
            if now + WAKE_MARGIN_S <= until:
                return now + WAKE_MARGIN_S
        promotion = self.queue.next_promotion(after=now)
        while self._wakeups and self._wakeups[0][0] <= until:  # (None: not noted)
            due = self._wakeups[0][0]
            if promotion is not None and promotion <= due:
                break
            _, needs_queue, name, started = heapq.heappop(self._wakeups)
            job = self.running.get(name)
            if (due > now and job is not None and job.started_at == started
                    and (len(self.queue) or not needs_queue)):
                return due
        return promotion if promotion is not None and promotion <= until else None

    def _plan_wakeups(self, job: RunningJob) -> None:
        """Note the moments time alone changes what may be decided about a job that started
        (next_wakeup); each says whether it matters only while a job waits."""
        if self._wakeups is None:
            return
        s, start = self.settings, job.started_at
        dues = []
        if s.min_run_s > 0 and (s.preemption or s.migration):
            dues.append((start + s.min_run_s, not s.migration))  # a move needs no waiting job
        if s.preemption and self.queue.level is not None and job.size:
            counted = job.ran_s - job.las_baseline_s  # (run time its level counts)
            dues += [(start + t / job.size - counted, True) for t in s.las_thresholds_gpu_s]
        if s.backfill and job.planned_end is not None:
            dues.append((job.planned_end, True))
        for due, needs_queue in dues:
            if due > start:
                heapq.heappush(self._wakeups,
                               (due + WAKE_MARGIN_S, needs_queue, job.spec.name, start))

    # -- views -------------------------------------------------------------------------------
    def owner_of(self, job_name: str) -> str | None:
        job = self.running.get(job_name)
        return job.placement.owner if job is not None else self.queue.owner_of(job_name)

    def running_family(self, job_name: str) -> str | None:
        """The accelerator family a running job's pace is set by (its slowest), or None when
        it is not running; "" for a CPU job or an unknown device."""
        job = self.running.get(job_name)
        if job is None:
            return None
        if job.family is not None:
            return job.family
        family = self._family_of(job.placement, job.spec)
        # Kept only once every node of it has reported: a node that reports late after a
        # restart read as "" (no family) for good, and no job of its family could preempt it.
        if all(n in self.state.reports for n in job.placement.nodes):
            job.family = family
        return family

    def jobs(self, now: float) -> list[dict]:
        """Every job the scheduler knows, for `status`: running (with any pending directive),
        placed (its driver has not collected the placement: nothing runs yet, so `preempt`
        refuses it), waiting (preempted ones say so) with its reason and place in line."""
        rows = []
        for name, job in sorted(self.running.items()):
            d = job.directive
            state = "yielding" if d else "placed" if name in self.queue.ready else "running"
            rows.append({"job": name, "state": state,
                         "priority": job.spec.priority, "owner": job.placement.owner,
                         "nodes": job.placement.nodes, "since_s": round(now - job.started_at, 1),
                         "preemptions": job.preemptions, "preemptible": job.spec.preemptible,
                         "reason": (f"{d.kind}: {d.reason}" if d else "") + (
                             f" (it {note})" if (note := self._not_stopping(name, now))
                             else "")})
        for position, job in enumerate(self.queue.ordered(), start=1):
            rows.append({"job": job.spec.name,
                         "state": "preempted" if job.preemptions else "waiting",
                         "priority": job.spec.priority, "owner": job.owner, "nodes": [],
                         # Since it entered the queue this time: a preempted job's wait
                         # starts at its preemption, not at its first submission.
                         "since_s": round(now - job.in_queue_since, 1),
                         "preemptions": job.preemptions, "preemptible": job.spec.preemptible,
                         "position": position, "reason": job.reason})
        return rows

    def _answer(self, job_name: str, owner: str) -> Placement | Queued | Rejection:
        """Where the job stands, for its driver. A rejection kept for this driver (a cancel, a
        drop) is said again on every call until the driver releases the job or exits
        (_kept_rejection); one of no known owner is handed over once and then forgotten."""
        job = self.running.get(job_name)
        if job is not None and (not owner or job.placement.owner == owner):
            return job.placement
        waiting_owner = self.queue.owner_of(job_name)
        mine = waiting_owner is not None and bool(owner) and waiting_owner == owner
        if job_name in self.queue.rejected and not mine:  # (an earlier job's, for its driver)
            whose = self.queue.rejected_owners.get(job_name, "")
            if not whose:  # nobody would release it or exit: kept, it would stay for ever
                return self.queue.take_rejection(job_name)
            kept = self._kept_rejection(job_name, owner or whose)  # (an operator's look too)
            if kept is not None:
                return kept
        return self.queue.status(job_name) or Rejection(
            job_name, f"job '{job_name}' is not in the queue")

    def _kept_rejection(self, job_name: str, owner: str) -> Rejection | None:
        """The rejection kept for `owner`'s job, or None. Kept after it was said, until the
        driver releases the job (release) or exits (owners_dead): handed over once, a call
        sent again (the link's resend after a timeout, while Ray still runs the first; Ray's
        retry after a restart) was told "not in the queue" and the driver's exit never said
        that its job was cancelled."""
        if owner and self.queue.rejected_owners.get(job_name) == owner:
            return self.queue.rejected.get(job_name)
        return None

    # -- persistence ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"version": SAVED_STATE_VERSION,
                "reservations": self.state.reservations_to_dict(),
                "queue": self.queue.to_dict(),
                "running": {name: job.to_dict() for name, job in self.running.items()},
                "preempting": {name: sorted(v) for name, v in self.preempting.items()},
                "excluded_gpus": {name: sorted(v) for name, v in self.excluded_gpus.items()},
                "placements_given_back": dict(self.placements_given_back),
                # ("enqueued_at": when the job entered the queue this time, in_queue_since)
                "nodes_asked": {name: {"enqueued_at": since, "bundles": bundles,
                                       "node_types": parts}
                                for name, (since, bundles, parts) in self.nodes_asked.items()},
                # (without it each restart started the jobs' scale_up_timeout_s afresh)
                "awaiting_since": dict(self.awaiting_since),
                "silent_nodes": self.state.silence_to_dict(),
                # (else a node first seen holding reservations starts from none)
                "ram_outside": self.state.ram_outside_to_dict(),
                # (their last reports: the jobs only they make possible still wait for them)
                "silent_node_reports": self.state.silent_reports_to_dict(),
                # (the comparative-advantage yardstick: victim order and family ranking)
                "typical": {"speed": dict(self.typical_speed), "count": self.typical_count},
                "settings": dataclasses.asdict(self.settings)}

    def restore(self, saved: dict) -> list[str]:
        """Reload what a previous incarnation promised; returns the problems met. A part that
        cannot be read is skipped (the scheduler must still start) and named. The restored
        queue was judged against the cluster as it was: it is judged again once the nodes
        have reported (a node may have gone while no scheduler ran)."""
        problems = []
        version = saved.get("version", 1)
        if not is_int(version):  # (a corrupt field, not an upgrade)
            problems.append(f"scheduler state's version is {version!r:.60}, not an integer: read "
                            f"as format {SAVED_STATE_VERSION}, what this scheduler does not "
                            "know left out")
        elif version > SAVED_STATE_VERSION:
            problems.append(f"scheduler state saved in format {version!r:.60}, this scheduler "
                            f"reads format {SAVED_STATE_VERSION} (saved by a newer version?): "
                            "what it added is left out")
        self._verdicts_due = True
        # (Silent nodes before the running jobs: a job held only there has no reservation;
        # their last reports before what they held: a report revives a node already dead.)
        parts = (("reservations", lambda d: problems.extend(self.state.restore_reservations(d))),
                 # (before the silent nodes' reports, which set their rows)
                 ("ram_outside", lambda d: problems.extend(self.state.restore_ram_outside(d))),
                 ("silent_node_reports",
                  lambda d: problems.extend(self.state.restore_silent_reports(d))),
                 ("silent_nodes", lambda d: problems.extend(self.state.restore_silence(d))),
                 ("queue", lambda d: setattr(self, "queue", JobQueue.from_dict(
                     d, self.queue.level, self._promote_after, problems))),
                 ("running", lambda d: problems.extend(self._restore_running(d))),
                 # (entry by entry: one bad entry cost every job's, and a waiting job whose
                 # preemption record was lost preempted more victims beside those yielding)
                 ("preempting", lambda d: problems.extend(self._restore_entries(
                     d, self.preempting, "the preemption for", lambda v: set(_saved_names(v))))),
                 ("excluded_gpus", lambda d: problems.extend(self._restore_entries(
                     d, self.excluded_gpus, "the excluded GPUs of", _saved_gpus))),
                 # (without it, a call carried out just before a restart was carried out twice)
                 ("placements_given_back", lambda d: problems.extend(self._restore_entries(
                     d, self.placements_given_back, "the placements given back by",
                     _saved_count))),
                 # (a restarted scheduler keeps asking for the nodes of jobs still waiting)
                 ("nodes_asked", lambda d: problems.extend(self._restore_nodes_asked(d))),
                 # (one from before the job's present stay in the queue is not its own:
                 # _awaiting_since starts it afresh)
                 ("awaiting_since", lambda d: problems.extend(self._restore_entries(
                     d, self.awaiting_since, "the scale-up clock of", _saved_time))),
                 # (without it a restarted scheduler chose other victims than before)
                 ("typical", self._restore_typical))
        for key, restore in parts:
            part = saved.get(key, {})  # (absent: saved before the part was)
            if not isinstance(part, dict):  # (else named in Python's words, or not at all)
                problems.append(f"cannot restore scheduler {key}, skipping it: a JSON "
                                f"{json_type(part)}, not an object")
                continue
            try:
                restore(part)
            except Exception as e:  # corrupt or from another version: keep going
                problems.append(f"cannot restore scheduler {key}, skipping it: {e}")
        return problems + self._release_unowned_reservations() + self._drop_unowned_ready() \
            + self._drop_waiting_copies_of_running() + self._drop_preemptions_for_unrestored() \
            + self._withdraw_unclaimed_migrations()

    @staticmethod
    def _restore_entries(data: dict, into: dict, what: str, read) -> list[str]:
        """Per-job entries of a saved part, each `read` (ValueError naming what is wrong):
        one that cannot be read is named and skipped, the others kept."""
        problems = []
        for name, value in data.items():
            try:
                into[name] = read(value)
            except ValueError as e:
                problems.append(f"cannot restore {what} {name!r}, skipping it: {e}")
        return problems

    def _restore_typical(self, data: dict) -> None:
        """The typical job's relative speed per family and how many jobs it folds in;
        ValueError naming what is wrong (the yardstick is then learnt afresh)."""
        if not data:
            return
        speed, count = data.get("speed"), data.get("count")
        if not (isinstance(speed, dict) and all(isinstance(f, str) and is_number(v) and v >= 0
                                                for f, v in speed.items())):
            raise ValueError(f"its speeds are {speed!r:.60}, not family names to numbers >= 0")
        # (is_number: an integer past float's range made 1.0 / count in every GPU job's
        # submit raise OverflowError)
        if not (is_int(count) and is_number(count) and count >= 0):
            raise ValueError(f"its count is {count!r:.60}, not an integer >= 0 within "
                             "float's range")
        self.typical_speed, self.typical_count = {f: float(v) for f, v in speed.items()}, count

    def _restore_nodes_asked(self, data: dict) -> list[str]:
        """The autoscaler requests of waiting jobs, job by job (one that cannot be read is
        named and skipped: it is asked for again at the next pass if still needed), as is one
        naming a node type the cluster's autoscaling config (read before the restore) no
        longer has: it was shown in status --json's asked_by_job until the next pass."""
        problems = []
        known = {t.name for t in self.node_types}
        for name, record in data.items():
            try:
                asked = saved_nodes_asked(record)
                gone = next((p["node_type"] for p in asked[2] if p["node_type"] not in known),
                            None) if known else None
                if gone is not None:
                    raise ValueError(f"node type {gone!r} is not in the cluster's autoscaling "
                                     "config (changed since?): asked afresh at the next pass")
                self.nodes_asked[name] = asked
            except ValueError as e:
                problems.append(f"cannot restore the nodes asked for {name!r}, skipping "
                                f"them: {e}")
        return problems

    def _release_unowned_reservations(self) -> list[str]:
        """Every reservation is a running job's (or its migration claim's): one whose job
        could not be restored would otherwise hold its capacity for ever (so would what a
        silent node keeps aside for it, once the node reports)."""
        unowned = [name for name in self.state.reservations
                   if name.removesuffix(CLAIM_SUFFIX) not in self.running]
        for name in unowned:
            self.state.release(name)
        # What silent nodes hold aside for them too: it would go, when the node reports, to
        # a later job of that name (on other nodes), held for nobody's workers as it ran.
        aside = sorted({r.job_name for held in self.state.silent_reservations.values()
                        for r in held if r.job_name.removesuffix(CLAIM_SUFFIX)
                        not in self.running})
        for name in aside:
            self.state.forget_silent(name)
        return [f"released the reservation of {name!r}: no running job of that name was "
                "restored" for name in unowned] + [
            f"dropped what silent nodes kept aside for {name!r}: no running job of that name "
            "was restored" for name in aside]

    def _drop_unowned_ready(self) -> list[str]:
        """A placement not yet collected whose running job could not be restored: its
        reservation was released, so handing it to the driver would give the same devices to
        two jobs. Its driver is told to submit again instead."""
        unowned = [name for name in self.queue.ready if name not in self.running]
        for name in unowned:
            placement = self.queue.ready.pop(name)
            self.queue.keep_rejection(name, Rejection(
                name, f"job '{name}' was placed, but the scheduler restarted and could not "
                "restore its record: submit it again", fits_when_free=True),
                placement.owner)
        return [f"withdrew the placement of {name!r} not yet collected: no running job of "
                "that name was restored" for name in unowned]

    def _drop_waiting_copies_of_running(self) -> list[str]:
        """A job saved both running and waiting (a hand-edited or corrupt state) runs: its
        workers hold the devices. Its waiting copy goes, named (kept, a queue pass dropped it
        later without a word)."""
        both = [name for name in self.queue.waiting if name in self.running]
        for name in both:
            self.queue.remove(name)
            self._forget_preemption(name)
        return [f"dropped the waiting entry of {name!r}: a running job of that name was "
                "restored (a job cannot both run and wait)" for name in both]

    def _drop_preemptions_for_unrestored(self) -> list[str]:
        """A preemption made for a waiting job that could not be restored (or no longer
        waits): its victims that have not read their directive yet keep running, as after a
        cancel of that job (_forget_preemption; they were told to yield for nobody)."""
        gone = sorted(name for name in self.preempting if name not in self.queue.waiting)
        problems = []
        for name in gone:
            victims = ", ".join(repr(v) for v in sorted(self.preempting[name]))
            self._forget_preemption(name)
            problems.append(f"withdrew the preemption of {victims or 'no job'} for {name!r} "
                            "(those that have not read it yet): no waiting job of that name "
                            "was restored")
        return problems

    def _withdraw_unclaimed_migrations(self) -> list[str]:
        """A restored migration whose claim's reservation record was not, or not whole (its
        part on a node silent past dead_after_s kept aside, as saved before such a migration
        was withdrawn at once): the move can no longer be made (_take_claim), so one not read
        yet is withdrawn, as when a node of its target dies (_withdraw_lost_migrations); one
        read is carried out (placed afresh)."""
        unclaimed = {name + CLAIM_SUFFIX for name, job in self.running.items()
                     if job.directive is not None and job.directive.kind == MIGRATE
                     and not _claim_whole(job.directive.target,
                                          self.state.reservations.get(name + CLAIM_SUFFIX))}
        unread = sorted(claim.removesuffix(CLAIM_SUFFIX) for claim in unclaimed
                        if self.running[claim.removesuffix(CLAIM_SUFFIX)].directive.read_at
                        is None)
        self._withdraw_lost_migrations(unclaimed)
        return [f"withdrew the migration of {name!r} (not read yet): the reservation record of "
                "its claimed target was not restored, or not whole (a node of it silent)"
                for name in unread]

    def _restore_running(self, data: dict) -> list[str]:
        """The running jobs, one by one: one that cannot be read is named and skipped, the
        others kept; one whose reservation record was lost holds its placement again (its
        workers are still training on it)."""
        problems = []
        for name, record in data.items():
            try:
                job = RunningJob.from_dict(record)
            except Exception as e:
                problems.append(f"cannot restore running job {name!r}, skipping it: "
                                f"{type(e).__name__}: {e}")
                continue
            if name not in self.state.reservations:
                # Less what is kept aside for silent nodes (given back when they report:
                # only to a job holding a reservation, an empty one included)
                aside = {r.node_id for held in self.state.silent_reservations.values()
                         for r in held if r.job_name == name}
                self.state.reserve(name, [r for r in job.placement.reservations()
                                          if r.node_id not in aside])
            self._track_running(job)
        return problems

    # -- internals: starting and stopping ----------------------------------------------------------
    def _place(self, spec: JobSpec, now: float, owner: str = "",
               explain: bool | None = False, free_gpus: dict[int, int] | None = None,
               trial: bool = False) -> Placement:
        """Where the job would go now (PlacementError if nowhere), by place() or the policy.
        With `free_gpus` (the queue pass's free GPUs per family code) place() is asked family
        by family in _family_choice's order first. `trial`: the caller only asks whether it
        fits (place()'s trial: a rejection without per-node reasons)."""
        if self.policy is None:
            excluded = frozenset(self.excluded_gpus.get(spec.name.removesuffix(CLAIM_SUFFIX), ()))
            choice = None if free_gpus is None else self._family_choice(spec, free_gpus)
            if choice is None:
                return place(spec, self.state, now, owner=owner, explain=explain,
                             excluded_gpus=excluded, trial=trial)
            return self._place_by_family(spec, choice, now, owner, explain, excluded, trial)
        placement = self.policy(spec, self.state, now, owner)
        if placement is None:
            raise PlacementError(Rejection(spec.name, f"job '{spec.name}' does not fit now",
                                           fits_when_free=True))
        return dataclasses.replace(placement, owner=owner)

    def _place_by_family(self, spec: JobSpec, choice: "_FamilyChoice", now: float, owner: str,
                         explain: bool | None, excluded: frozenset,
                         trial: bool = False) -> Placement:
        """place() on one family at a time in the choice's order, then across the families
        the job may use now; a job kept off the others waits (never rejected for it).
        The per-family place() are trials (their rejections are dropped); the one across
        the open families gives its headline, read as the wait reason, unless `trial` (the
        caller only asks whether it fits), which makes the rejection of a job that never
        fits (_cannot_hold) a trial too."""
        for family in choice.order:
            try:
                return place(spec.narrowed(accelerator_types=(family,)), self.state,
                             now, owner=owner, explain=explain, excluded_gpus=excluded,
                             trial=True)
            except PlacementError:
                continue
        why = ""
        if choice.open_families:
            try:
                return place(spec.narrowed(accelerator_types=choice.open_families),
                             self.state, now, owner=owner, explain=explain,
                             excluded_gpus=excluded, trial=trial, reasons=False)
            except PlacementError as e:
                why = e.rejection.message.splitlines()[0]
        never = self._cannot_hold(spec, now, trial)
        if never is not None:  # (its own excluded GPUs, say): waiting would not help
            raise PlacementError(never)
        kept = (f"; kept off {'/'.join(choice.kept_off)}: jobs that can run only there wait "
                "for it or hold most of it" if choice.kept_off else "")
        raise PlacementError(Rejection(spec.name, (why or f"cannot place job '{spec.name}' "
                                                   "now") + kept, fits_when_free=True))

    def _family_choice(self, spec: JobSpec, free_gpus: dict[int, int]) -> "_FamilyChoice | None":
        """For a GPU job that may use several accelerator families: which to try, best first.

        Room on a family is its free GPUs less what waiting jobs allowed only that family
        need (they can run nowhere else: they have first call on it, against jobs of their
        priority or below). A family is shielded when jobs allowed only there hold, or wait
        at this job's priority or above for, protect_share of its GPUs; under
        contention (other GPU jobs wait) the job is kept off shielded families, so the gang
        jobs that need them whole find them unfragmented. Order: without contention the
        fastest family for this job; with it, comparative advantage — the job's speed there
        relative to its best, over a typical job's (a job goes to fast hardware when it
        gains more there than others do). None: place() as given (one family, a CPU job, or
        the setting off)."""
        if not self.settings.comparative_advantage or not spec.gpus_per_worker:
            return None
        families = self.state.table.families
        named = allowed_families(spec)
        capacity = self._family_gpus()
        # A job that names no family may also run on GPUs of none known ("", where the
        # cluster has such: tried last, never shielded, as no job can be kept to them)
        candidates = [f for f in named or families
                      if f in families and (f or (not named and capacity.get(f, 0) > 0))]
        if len(candidates) < 2:
            return None
        need = spec.total_gpus
        waiting = self.queue.gpus_by_allowed
        own = need if spec.name in self.queue.waiting else 0
        contention = sum(waiting.values()) > own
        # In strict queue order (backfill off) nothing behind the head starts before it, so
        # no job there has first call against it: counted, a job pinned to a family behind
        # the head kept it off that family while neither could start, for ever.
        head = self.queue.head() if not self.settings.backfill else None
        strict_head = head is not None and head.spec.name == spec.name
        first_call = {f: 0 if strict_head else self.queue.first_call_gpus(f, spec.priority)
                      for f in candidates}
        room = {f: free_gpus.get(families[f], 0) - first_call[f] for f in candidates}
        shielded = {f for f in candidates if contention and capacity.get(f, 0) > 0 and
                    self.pinned_running.get(f, 0) + first_call[f]
                    >= self.settings.protect_share * capacity[f]}
        if sum(capacity.get(f, 0) for f in candidates if f not in shielded) < need:
            shielded = set()  # it cannot run without them: never kept off for good
        speeds = {f: self.speed(spec, f) for f in candidates}
        best = max(speeds.values())
        if contention and best > 0:
            def rank(f: str) -> float:
                relative = speeds[f] / best
                return -relative / (self.typical_speed.get(f) or relative or 1.0)
        else:
            def rank(f: str) -> float:
                return -speeds[f]
        usable = [f for f in candidates if f not in shielded]
        order = sorted((f for f in usable if room[f] >= need), key=lambda f: (f == "", rank(f)))
        open_families = tuple(sorted(f for f in usable if room[f] > 0))
        kept_off = tuple(sorted(f for f in candidates if free_gpus.get(families[f], 0) > 0
                                and (f in shielded or room[f] <= 0)))
        return _FamilyChoice(order, open_families, kept_off, tuple(sorted(usable)))

    def _family_gpus(self) -> dict[str, int]:
        """GPUs per accelerator family on nodes not dead ("": of no known family)."""
        t = self.state.table
        n = len(t)
        gpus = np.bincount(t.family[:n], weights=np.where(t.dead[:n], 0, t.gpus[:n]),
                           minlength=len(t.families))
        return {f: int(gpus[code]) for f, code in t.families.items()}

    def _learn_typical_speed(self, spec: JobSpec) -> None:
        """Fold a submitted GPU job's relative speed per family (speed / its best) into the
        typical job's: the yardstick of comparative advantage (recent jobs weigh most)."""
        if not self.settings.comparative_advantage or not spec.gpus_per_worker:
            return
        speeds = {f: self.speed(spec, f) for f in self.state.table.families if f}
        best = max(speeds.values(), default=0.0)
        if best <= 0:
            return
        self.typical_count += 1
        weight = max(TYPICAL_WEIGHT, 1.0 / self.typical_count)  # a plain mean at first
        for f, v in speeds.items():
            old = self.typical_speed.get(f, v / best)
            self.typical_speed[f] = old + weight * (v / best - old)

    def _promote_after(self, job: QueuedJob) -> float | None:
        """Tiresias' starvation guard: a job that has waited `starvation_factor` times as long
        as it has run goes back to level 0 (None: off, or it never ran)."""
        factor = self.settings.starvation_factor
        return factor * job.ran_s if factor and job.ran_s > 0 else None

    def _level(self, attained_gpu_s: float) -> int:
        """LAS service level of a job that has received this much service (0 = least)."""
        return bisect.bisect_right(self.settings.las_thresholds_gpu_s, attained_gpu_s)

    def _start(self, spec: JobSpec, owner: str, placement: Placement, now: float,
               queued: QueuedJob) -> None:
        self._refuse_if_running(spec.name)  # (before its reservation is made)
        self.state.reserve(spec.name, placement.reservations())
        self._track_running(RunningJob(spec, placement, now, queued.enqueued_at,
                                       queued.preemptions, queued.ran_s,
                                       las_baseline_s=queued.las_baseline_s))

    def _refuse_if_running(self, job_name: str) -> None:
        """A running job's record is never replaced: the job it describes still holds its
        devices, and a second placement under its name gave them to two jobs (a reservation
        lost by a bug no longer stood in the way)."""
        if job_name in self.running:
            raise ValueError(f"job '{job_name}' is already running: not started again")

    def _track_running(self, job: RunningJob) -> None:
        self._refuse_if_running(job.spec.name)
        self.running[job.spec.name] = job
        if job.planned_end is not None:
            bisect.insort(self.planned_ends, (job.planned_end, job.spec.name))
        self._count_pinned(job.spec, +1)
        self.running_priorities[job.spec.priority] += 1
        self._plan_wakeups(job)

    def _count_pinned(self, spec: JobSpec, sign: int) -> None:
        """A job allowed a single family starts (+1) or stops (-1) holding GPUs there."""
        pinned = allowed_families(spec)
        if len(pinned) == 1 and spec.total_gpus:
            self.pinned_running[pinned[0]] = (self.pinned_running.get(pinned[0], 0)
                                              + sign * spec.total_gpus)

    def _stop(self, job_name: str) -> bool:
        """Release everything the job holds (its reservation, a migration claim)."""
        job = self.running.pop(job_name, None)
        if job is not None:
            if job.planned_end is not None:
                entry = (job.planned_end, job_name)
                del self.planned_ends[bisect.bisect_left(self.planned_ends, entry)]
            self._count_pinned(job.spec, -1)
            self.running_priorities[job.spec.priority] -= 1
            if not self.running_priorities[job.spec.priority]:
                del self.running_priorities[job.spec.priority]
        self.queue.ready.pop(job_name, None)
        self._drop_claim(job_name)
        self.state.forget_silent(job_name)
        released = self.state.release(job_name)
        if job is not None and job.directive is not None and job.directive.for_job:
            victims = self.preempting.get(job.directive.for_job)
            if victims is not None:
                victims.discard(job_name)
        return released or job is not None

    def _reject(self, rejection: Rejection, reason: str | None = None) -> Outcome:
        return Outcome(rejection, samples=catalogue.decision_samples(rejection, None, reason))

    def _unreported(self) -> int:
        """Nodes Ray lists alive that have not reported to this scheduler (yet: it restarted,
        or they joined a moment ago)."""
        if self.settings.synthetic_nodes:
            return 0
        return len(self.ray_alive - self.state.reports.keys())

    def _unknown_nodes(self, now: float) -> int:
        """Nodes whose capacity is not known yet: alive in Ray, not reported, and listed
        alive (or the scheduler restored) less than suspect_after_s ago. Past that, a node
        that never reports (its agent failed, its reports are refused) is not waited for: a
        job that cannot fit the rest is rejected rather than kept for ever."""
        missing = self._unreported()
        since = max(self._alive_changed_at, self.restored_at or -math.inf)
        if missing and now - since < self.settings.suspect_after_s:
            return missing
        return 0

    def _judged_later(self, now: float) -> int:
        """_unknown_nodes, remembering that a verdict waits for them (report and tick)."""
        missing = self._unknown_nodes(now)
        self._verdicts_due |= bool(missing)
        return missing

    def _nodes_changed(self) -> None:
        """Forget the answers of this moment (_memo): a node reported, joined, left or
        expired since they were made. Kept, the queue pass run at the first of several
        reports of one moment (the others unknown: "the idle cluster may hold it") left a job
        waiting for the autoscaler's nodes rejected as never fitting at the last."""
        self._awaits_memo = (math.nan, {})

    def _still_gathering(self, now: float) -> bool:
        """Just restarted, and nodes Ray lists alive have not reported yet."""
        return (self.restored_at is not None and self._unreported() > 0
                and now - self.restored_at < self.settings.suspect_after_s)

    def _not_final(self, rejection: Rejection, spec: JobSpec | None = None,
                   now: float | None = None) -> Rejection:
        """While alive nodes have not reported, "can never fit" is not known: wait for them.
        Nor is it final when (given `spec`) only nodes the autoscaler can add would hold it.
        A final one carries the node-type notes (_with_node_type_notes): every path refusing
        a job (submit, the queue pass, a yield, a replacement, `place`) comes here, so all
        give the same reason (the queue pass's and a replacement's lacked them)."""
        if rejection.fits_when_free:
            return rejection
        plan = self._new_nodes_plan(spec, now) if spec is not None else None
        if plan is not None:
            return dataclasses.replace(rejection, fits_when_free=True, message=(
                f"{rejection.message}\n  {self._scale_up_reason(spec, plan)}"))
        missing = self._judged_later(now) if now is not None else self._unreported()
        if missing:
            return dataclasses.replace(rejection, fits_when_free=True, message=(
                f"{rejection.message}\n  {missing} node(s) Ray lists alive have not reported "
                "yet (did the scheduler restart?): waiting for them"))
        silent = self._silent_alive()
        if spec is not None and now is not None and silent and \
                self._cannot_hold(spec, now, trial=True) is None:
            return dataclasses.replace(rejection, fits_when_free=True, message=(
                f"{rejection.message}\n  "
                f"{_silent_reason(self._silent_nodes_needed(spec, now) or sorted(silent))}"))
        return rejection if spec is None or now is None else \
            self._with_node_type_notes(rejection, spec, now)

    def _waits_for_new_nodes(self, job_name: str, now: float) -> bool:
        """The job waits in the queue for nodes not up yet (or not known yet: nodes have not
        reported). Not once the cluster as it is, idle, would hold it: it then waits for
        running jobs, and scale_up_timeout_s, a bound on waiting for nodes, must not run."""
        job = self.queue.waiting.get(job_name)
        return job is not None and (self._unknown_nodes(now) > 0
                                    or self._new_nodes_plan(job.spec, now) is not None)

    def _never_fits(self, spec: JobSpec, now: float) -> Rejection | None:
        """A rejection when the job cannot fit even the idle healthy cluster, nor nodes the
        autoscaler can add (None while some alive nodes have not reported: it is not known
        yet)."""
        rejection = self._cannot_hold(spec, now)
        plan = self._new_nodes_plan(spec, now) if rejection is not None else None
        if plan is None:
            self.awaiting_since.pop(spec.name, None)
            return None if rejection is None else self._not_final(rejection, spec, now)
        since = self._awaiting_since(spec.name, now)
        if now - since <= self.settings.scale_up_timeout_s:
            return None  # it waits for the autoscaler (scale_up_requests)
        self.awaiting_since.pop(spec.name, None)
        return dataclasses.replace(rejection, message=(
            f"{rejection.message}\n  waited {now - since:.0f} s (scale_up_timeout_s) for the "
            f"autoscaler's nodes: {self._not_joined(spec, plan, now)}"))

    def _awaiting_since(self, job_name: str, now: float) -> float:
        """When the waiting job began waiting for new nodes (now, if it did not yet), in its
        present stay in the queue: a time from before it entered the queue is an earlier
        job's of that name (cancelled and submitted again before a tick forgot it), whose
        clock it inherited and was refused early for."""
        since = self.awaiting_since.get(job_name)
        job = self.queue.waiting.get(job_name)
        if since is None or (job is not None and since < job.in_queue_since):
            since = self.awaiting_since[job_name] = now
        return since

    def _scale_up_reason(self, spec: JobSpec, plan: tuple[PlanPart, ...]) -> str:
        """A job waiting for new nodes: which, and where the worker nodes up leave Ray room
        for fewer under the cluster's max_workers, that idle ones must go first, or where
        those are too few, the busy ones (their jobs ending)."""
        workers_up = self._worker_nodes_up()
        # (the nodes that may go are counted only where the room is short: for each job
        # waiting on each pass, they cost a look at every node up and every reservation)
        note = cluster_room_note(plan, workers_up, *self._nodes_that_may_go(spec, plan),
                                 self.autoscaler) if cluster_room(plan, workers_up) else None
        return _scale_up_reason(plan) + (f"; {note}" if note else "")

    def _nodes_that_may_go(self, spec: JobSpec, plan: tuple[PlanPart, ...]
                           ) -> tuple[int, dict[str, list[str]]]:
        """Of the worker nodes up, those that may go to make room under the cluster's
        max_workers for a plan's nodes: how many are idle, and the busy ones (node id ->
        jobs, _busy_worker_nodes). Nodes of a family the plan's bundles name are not: the
        request keeps them (they hold some of its workers, as the autoscaler counts them)."""
        kept = frozenset({nodes_up_key(spec, node_type) for node_type, _, _ in plan} - {""})
        memo = self._going_this_pass
        going = None if memo is None else memo.get(kept)
        if going is None:
            going = {node for node in self.ray_alive - {self.head_node}
                     if not any(self._counted_for(node, key) for key in kept)}
            if memo is not None:
                memo[kept] = going
        busy = {node: jobs for node, jobs in self._busy_worker_nodes().items()
                if node in going}
        return len(going) - len(busy), busy

    def _worker_nodes_up(self) -> int | None:
        """The worker nodes Ray lists alive, of any type, as it counts them against the
        cluster's max_workers: all but the head (None where the head is not known)."""
        return len(self.ray_alive - {self.head_node}) \
            if self.head_node in self.ray_alive else None

    def _busy_worker_nodes(self) -> dict[str, list[str]]:
        """The worker nodes up running jobs (node id -> their jobs): they stay up, held
        against the cluster's max_workers, until those end."""
        # (the jobs per node are kept until the reservations change: asked for each job
        # waiting for new nodes on each pass, they were a look at every reservation each time)
        changed = (self.state, self.state.reservations_changed)
        if self._jobs_by_node[0] != changed:
            by_node: dict[str, set[str]] = {}
            for name, held in self.state.reservations.items():
                for r in held:
                    by_node.setdefault(r.node_id, set()).add(name.removesuffix(CLAIM_SUFFIX))
            self._jobs_by_node = (changed, {node: sorted(jobs)
                                            for node, jobs in by_node.items()})
        return {node: jobs for node, jobs in self._jobs_by_node[1].items()
                if node in self.ray_alive and node != self.head_node}

    def _not_joined(self, spec: JobSpec, plan: tuple[PlanPart, ...], now: float) -> str:
        """Why a job waiting for new nodes (`plan`: those still to add, per type) is not held
        after scale_up_timeout_s: the types whose nodes never joined (the autoscaler still
        has them to add: it did not), and the types whose nodes up hold fewer of its workers
        than the autoscaler counts them for (a label promising more GPU memory than NVML
        reports, a GPU the job found short). It said "the nodes that joined do not hold it
        (do their labels promise more ...?)" of a type whose nodes never joined."""
        missing = [(t, n) for t, n, _ in plan if n]
        one = sum(n for _, n in missing) == 1
        workers_up = self._worker_nodes_up()
        at_max = cluster_max_note(plan, workers_up, self._nodes_that_may_go(spec, plan)[1],
                                  self.autoscaler) if cluster_room(plan, workers_up) else None
        said = [at_max or f"{plan_named(plan)} never joined (the autoscaler did not add "
                f"{'it' if one else 'them'}: its log, `ray status`, says why, e.g. no "
                "instances available or a launch failing)"] if missing else []
        counted = self._held_by_nodes_up(spec, now)
        excluded = frozenset(self.excluded_gpus.get(spec.name, ()))
        holding = worker_capacity(spec, self.state, now, ignore_reservations=True,
                                  excluded_gpus=excluded, revivable=self._silent_alive())
        seen = set()
        for node_type, _, _ in plan:
            key = nodes_up_key(spec, node_type)
            if key in seen:
                continue
            seen.add(key)
            expected, held = counted(node_type), self._on_nodes_up_of(spec, node_type, holding)
            if held < expected:
                where = ("the nodes up" if not key else
                         f"the node(s) up with resource {key.removeprefix(RESOURCE_KEY_PREFIX)}"
                         if key.startswith(RESOURCE_KEY_PREFIX) else f"the {key} node(s) up")
                said.append(f"{where} (node type {node_type.name!r}) hold {held} of the "
                            f"{expected} workers the autoscaler counts them for (do their "
                            "labels promise more than they report?)")
        untold = untold_plan_note(spec, plan, self.node_types, self.autoscaler)
        return "; ".join(said + ([untold] if untold else [])) or "the nodes up do not hold it"

    def _with_node_type_notes(self, rejection: Rejection | None,
                              spec: JobSpec, now: float) -> Rejection | None:
        """A job refused although a node type would hold it, but for its max_workers or the
        cluster's, the type's missing GPU-memory label or accelerator_type resource, its RAM,
        or the autoscaler adding none of it (the nodes up hold its bundles as it counts
        them): the reason says so (not only what the nodes up lack); and a GPU job no type
        has the GPUs for, what the types have."""
        notes = [note for note in (max_workers_note(spec, self.node_types),
                                   unlabelled_memory_note(spec, self.node_types),
                                   accelerator_resource_note(spec, self.node_types),
                                   gpu_note(spec, self.node_types),
                                   cpu_note(spec, self.node_types),
                                   host_memory_note(spec, self.node_types),
                                   steering_note(spec, self.node_types),
                                   short_gpus_note(spec, self.node_types),
                                   self.node_types and adds_none_note(
                                       spec, self.node_types, self._held_by_nodes_up(spec, now)))
                 if note] if rejection else []
        if not notes:
            return rejection
        return dataclasses.replace(rejection, message="\n  ".join([rejection.message, *notes]))

    def _new_nodes_plan(self, spec: JobSpec, now: float) -> tuple[PlanPart, ...] | None:
        """The nodes to add, per type (PlanPart), when only nodes the autoscaler can add would
        hold the job, else None (always with no node types). Answered once per job shape and
        moment: the queue pass and scale_up_requests ask it of every waiting job."""
        if not self.node_types:
            return None
        key = self._shape(spec)
        memo = self._memo(now)
        if key not in memo:
            plan = scale_up_parts(spec, self.node_types)
            holdable = plan is None or self._cannot_hold(spec, now, trial=True) is None
            memo[key] = None if holdable else self._beside_nodes_up(spec, now)
        return memo[key]

    def _memo(self, now: float) -> dict:
        """Answers kept for one moment, per job shape (_new_nodes_plan) or kind of worker
        (_idle_with_silent), until the nodes change (_nodes_changed)."""
        if self._awaits_memo[0] != now:
            self._awaits_memo = (now, {})
        return self._awaits_memo[1]

    def _beside_nodes_up(self, spec: JobSpec, now: float) -> tuple[PlanPart, ...] | None:
        """The nodes to add, per type, for a job node types hold: of the plans, the one that
        adds the fewest nodes beside the nodes up, less the nodes its workers' bundles would
        fill on nodes already up (request_resources is a shape the whole cluster should
        hold, busy or not, so the autoscaler adds only the rest). None when it would add
        none for any plan (adds_none_note says why)."""
        held_up = self._held_by_nodes_up(spec, now)
        plan = scale_up_parts(spec, self.node_types, held_up)
        return None if plan is None else parts_to_add(spec, plan, held_up)

    def _held_by_nodes_up(self, spec: JobSpec, now: float) -> Callable[[NodeType], int]:
        """How many of the job's workers the nodes up would hold, busy or not, for bundles
        asked of a node type (only nodes of the type's family, when the bundles name it), as
        the autoscaler counts them: host RAM only where the bundles ask for it (the type
        states its memory), and then a node's Ray memory (ray_memory_gib), not all its RAM;
        a GPU by its count and accelerator_type, whatever its memory (Ray names an A100 of
        40 GB and one of 80 GB alike) and whether the job found it short (excluded_gpus)."""
        idle = worker_capacity(dataclasses.replace(spec, min_host_memory_gb=0.0,
                                                   min_gpu_memory_gb=0.0),
                               self.state, now, ignore_reservations=True)
        t = self.state.table
        with_ram = np.minimum(idle, np.floor(ray_memory_gib(t.ram_total_gib[:len(idle)])
                                             / spec.min_host_memory_gb + 1e-9)) \
            if spec.min_host_memory_gb else idle

        def held(node_type: NodeType) -> int:
            return self._on_nodes_up_of(spec, node_type,
                                        idle if node_type.memory_gb is None else with_ram)
        return held

    def _on_nodes_up_of(self, spec: JobSpec, node_type: NodeType, counts: np.ndarray) -> int:
        """Of `counts` (workers per node row), those on the nodes up that count for bundles
        asked of `node_type` (nodes_up_key)."""
        key = nodes_up_key(spec, node_type)
        if not key:
            return int(counts.sum())
        t = self.state.table
        if key.startswith(RESOURCE_KEY_PREFIX):
            rows = [row for node, row in t.index.items()
                    if row < len(counts) and self._counted_for(node, key)]
            return int(counts[rows].sum())
        return int(counts[t.family[:len(counts)] == t.families.get(key, -1)].sum())

    def _counted_for(self, node: str, key: str) -> bool:
        """The node up is one the autoscaler counts toward bundles whose nodes_up_key is
        `key` (not "", all nodes): of that family, or having that resource of a type's own
        (node_has_resource). False for a node that has not reported."""
        report = self.state.reports.get(node)
        if report is None:
            return False
        if key.startswith(RESOURCE_KEY_PREFIX):
            return node_has_resource(report.custom_resources, report.labels,
                                     key.removeprefix(RESOURCE_KEY_PREFIX), self.node_types)
        return node_family(gpu_families(report.gpus)) == key

    def scale_up_requests(self, now: float) -> list[dict[str, float]]:
        """What to ask the autoscaler for (request_resources' bundles): the workers of every
        waiting job that the cluster as it stands cannot hold and a node type can, and still
        those of a job asked for before, until it leaves the queue (placed, cancelled,
        rejected): its nodes must not go idle and be removed while it waits for a running
        job. Empty when none: asking for nothing withdraws an earlier request, so nodes a job
        that left no longer needs can go idle and be removed. While a node that just joined
        has not reported (for suspect_after_s) nothing is planned (not known): the asks made
        stand, less those of jobs that left the queue (the whole last request stood, a
        cancelled job's nodes asked for until the node reported)."""
        waiting = self.queue.ordered()
        # (a job of the same name queued since, e.g. cancelled and submitted again with
        # another shape, is another job: the earlier one's request goes; so does a job's
        # own from an earlier stay in the queue, placed and back since, e.g. preempted:
        # kept by its first submit time, a request for nodes it no longer waits for stood)
        self.nodes_asked = {job.spec.name: self.nodes_asked[job.spec.name] for job in waiting
                            if self.nodes_asked.get(job.spec.name, (None,))[0]
                            == job.in_queue_since}
        # (a node that never reports: afterwards nothing is held for it)
        for job in waiting if not self._unknown_nodes(now) else ():
            self._ask_for_new_nodes(job, self._new_nodes_plan(job.spec, now))
        return [bundle for job in waiting
                for bundle in self.nodes_asked.get(job.spec.name, (0.0, ()))[1]]

    def _ask_for_new_nodes(self, job: QueuedJob, plan: tuple[PlanPart, ...] | None) -> None:
        """Note the bundles a job that needs new nodes asks for (the latest plan's); without a
        plan (the cluster as it is would hold it) an earlier ask stands."""
        if plan is not None:
            self.nodes_asked[job.spec.name] = (
                job.in_queue_since, plan_bundles(job.spec, plan),
                [{"node_type": node_type.name, "nodes": nodes, "workers": workers}
                 for node_type, nodes, workers in plan if workers])

    def scale_up_asked_by_job(self) -> list[dict]:
        """Why the autoscaler is asked for what scale_up_requests last returned, in its
        order: for each waiting job and node type, {"job", "node_type", "nodes" (to add, as
        planned when asked), "workers" (its bundles)}; `status --json`'s
        `autoscaling.asked_by_job`."""
        return [{"job": job.spec.name, **part} for job in self.queue.ordered()
                for part in self.nodes_asked.get(job.spec.name, (0.0, (), ()))[2]]

    def _silent_alive(self) -> frozenset[str]:
        """Nodes dead only by their agent's silence that Ray still lists alive: they have
        not left (an agent restarting, a hung probe) and may report again."""
        return frozenset(self.state.silent & self.ray_alive)

    def _silent_nodes_needed(self, spec: JobSpec, now: float) -> tuple[str, ...]:
        """The silent nodes (_silent_alive) with room for the job when the idle cluster holds
        it only with them, else (). The queue pass asks it of every waiting job."""
        if not self.state.silent:  # the common case: no set built
            return ()
        silent = self._silent_alive()
        if not silent:
            return ()
        silent_with_room, on_silent, with_them = self._idle_with_silent(spec, silent, now)
        needed = with_them >= spec.num_workers > with_them - on_silent
        return silent_with_room if needed else ()

    def _idle_with_silent(self, spec: JobSpec, silent: frozenset[str],
                          now: float) -> tuple[tuple[str, ...], int, int]:
        """Workers of the job's kind the idle cluster holds with the `silent` nodes counted:
        (the silent nodes with room for one, how many on them, how many in all). Kept per
        kind of worker (capacity_shape, the job's own excluded GPUs), moment and silent set,
        not per job shape: the worker count does not change it, and one computation per job
        shape over every node cost a pass of 700 waiting shapes at 500 nodes ~14 ms."""
        excluded = frozenset(self.excluded_gpus.get(spec.name, ()))
        key = ("idle with silent", silent, capacity_shape(spec), excluded)
        memo = self._memo(now)
        if key not in memo:
            index = self.state.table.index
            idle = worker_capacity(spec, self.state, now, ignore_reservations=True,
                                   excluded_gpus=excluded, revivable=silent)
            on_silent = {node: int(idle[index[node]]) for node in silent if node in index}
            memo[key] = (tuple(sorted(n for n, w in on_silent.items() if w)),
                         sum(on_silent.values()), int(idle.sum()))
        return memo[key]

    def _cannot_hold(self, spec: JobSpec, now: float, trial: bool = False) -> Rejection | None:
        """A rejection when the job cannot fit even the idle healthy cluster as it stands
        (None while some alive nodes have not reported: it is not known yet). Nodes only
        silent (_silent_alive) count: a job is not dropped for a 65 s agent hiccup.
        `trial`: only whether it is None matters (place()'s trial: no per-node reasons)."""
        if self._judged_later(now):
            return None
        excluded = frozenset(self.excluded_gpus.get(spec.name, ()))
        idle = worker_capacity(spec, self.state, now, ignore_reservations=True,
                               excluded_gpus=excluded, revivable=self._silent_alive())
        if int(idle.sum()) >= spec.num_workers:
            return None  # (a bandwidth floor may still stand in the way: place() says so)
        try:
            place(spec, self.state, now, explain=False, excluded_gpus=excluded, trial=trial)
        except PlacementError as e:
            return e.rejection
        return None  # cannot happen (idle capacity >= free capacity); keep the job

    def _reject_unfittable(self, now: float) -> Outcome:
        """Nodes left, or the last unknown ones reported: waiting jobs that can never fit now
        are dropped with the reason."""
        outcome = Outcome()
        self._verdicts_due = False  # (set again while nodes are still unknown)
        for job in self.queue.ordered():
            self._refuse_if_never_fits(job.spec, now, outcome)
        return outcome

    def _refuse_if_never_fits(self, spec: JobSpec, now: float, outcome: Outcome
                              ) -> Rejection | None:
        """Drop a waiting job the cluster can never hold now (_never_fits), its rejection
        kept for its driver; the rejection, or None (it may wait)."""
        never = self._never_fits(spec, now)
        if never is not None:
            self.queue.reject(spec.name, never)
            self._forget_preemption(spec.name)
            outcome.samples += catalogue.decision_samples(never, None,
                                                        catalogue.REJECT_CLUSTER_SHRANK)
            outcome.effects.append(Persist())
        return never

    def _after_capacity_freed(self, now: float) -> Outcome:
        outcome = self._drain(now)
        return outcome.add(self._migrate(now))

    # -- internals: the queue pass (EASY backfill) ------------------------------------------------
    def _drain(self, now: float, answered: str | None = None) -> Outcome:
        """The queue pass (_drain_pass), the worker nodes that may go, per plan, kept for it
        (_nodes_that_may_go: the nodes up and their reports do not change within it)."""
        self._going_this_pass = {}
        try:
            return self._drain_pass(now, answered)
        finally:
            self._going_this_pass = None

    def _drain_pass(self, now: float, answered: str | None = None) -> Outcome:
        """Start every waiting job that may start now, in queue order; see the module doc.
        `answered`: the job submit() or replace() just queued, whose answer the caller counts
        (counted here too, a job refused at submission was two rejections, cluster_shrank
        and capacity, and one no node set had the bandwidth for never `bandwidth`)."""
        outcome = Outcome()
        self._plan_jobs = []
        if not len(self.queue) or self._still_gathering(now):
            return outcome
        self.queue.promote_due(now)
        free_gpus, free_cpus = self._free_units(now)
        # Shapes that could not start this pass -> the first such job: one of the same shape
        # behind it fails alike, and says so (it kept "submitted" for ever).
        failed_shapes: dict[tuple, str] = {}
        budget = self.settings.failed_placements_per_pass
        denials = BACKFILL_DENIALS_PER_PASS
        plans: list[_HeadPlan] = []  # [0]: the head's; then see _plan_blocked
        holding: dict = {}  # (_plan_blocked)
        blocked: list[QueuedJob] = []  # could not start now: they may preempt (below)
        refused = False  # a job was refused as backfill (see _repass_due)
        for job in self.queue.ordered():
            spec = job.spec
            new_nodes = self._new_nodes_plan(spec, now)
            if new_nodes is not None:
                # Out of line until its nodes join: it cannot start on the cluster as it
                # stands, so it neither blocks nor plans a start for the jobs behind it.
                self._wait_reason(job, self._scale_up_reason(spec, new_nodes))
                self._awaiting_since(spec.name, now)  # (its scale_up_timeout_s)
                # (here too, so that the state a submission saves holds it for a restart)
                self._ask_for_new_nodes(job, new_nodes)
                continue
            silent = self._silent_nodes_needed(spec, now)
            if silent:
                # Out of line as well, until they report (or Ray lists them dead): kept as the
                # head, its start was unknown (they are not capacity meanwhile), and every job
                # behind it that would use its other nodes was refused while their GPUs idled.
                self._wait_reason(job, _silent_reason(silent))
                continue
            shape = self._shape(spec)
            if shape in failed_shapes or not _counts_allow(spec, free_gpus, free_cpus,
                                                           self.state):
                if shape in failed_shapes:
                    self._wait_reason(job, f"as '{failed_shapes[shape]}' ahead of it (the "
                                           "same shape)")
                else:
                    self._wait_reason(job, _waiting_reason(spec, free_gpus, free_cpus,
                                                           self.state))
                failed_shapes.setdefault(shape, spec.name)
                blocked.append(job)
                if not self.settings.backfill:
                    break
                self._plan_blocked(plans, job, now, free_gpus, holding)
                continue
            try:
                placement = self._place(spec, now, job.owner, free_gpus=free_gpus)
            except PlacementError as e:
                failed_shapes.setdefault(shape, spec.name)
                final = self._not_final(e.rejection, spec, now)
                if not final.fits_when_free:
                    self.queue.reject(spec.name, final)
                    self._forget_preemption(spec.name)
                    if spec.name != answered:
                        outcome.samples += catalogue.decision_samples(
                            final, None, catalogue.REJECT_CLUSTER_SHRANK)
                    outcome.effects.append(Persist())
                    continue
                self._wait_reason(job, e.rejection.message.splitlines()[0])
                blocked.append(job)
                if not self.settings.backfill:
                    break
                self._plan_blocked(plans, job, now, free_gpus, holding)
                budget -= 1
                if budget <= 0:
                    break
                continue
            delayed = self._delays(plans, spec, placement, now, job.expected_left_s)
            if delayed is not None:
                elsewhere = self._backfill_elsewhere(plans, job, placement, now, free_gpus,
                                                     delayed)
                if elsewhere is not None:
                    placement, delayed = elsewhere, None
            if delayed is not None:
                where = "first in line" if delayed is plans[0] else \
                    "first in line for those GPUs"
                self._wait_reason(job, f"would delay '{delayed.job}' ({where}) if started "
                                       "now: waits for a gap that ends before it can start")
                refused = True
                denials -= 1
                if denials <= 0:
                    break  # a placement found and refused costs as much as one that failed
                continue
            self._repass_due |= refused
            self.queue.remove(spec.name)
            self._forget_preemption(spec.name)
            self._start(spec, job.owner, placement, now, job)
            self.queue.ready[spec.name] = placement
            _take_units(placement, self.state, free_gpus, free_cpus)
            outcome.samples += catalogue.decision_samples(placement, None)
            if not outcome.persist:
                outcome.effects.append(Persist())
        self._plan_jobs = [plan.job for plan in plans]
        if blocked:
            outcome.add(self._preempt_for_blocked(blocked, free_gpus, now))
        return outcome

    def _plan_blocked(self, plans: list[_HeadPlan], job: QueuedJob, now: float,
                      free_gpus: dict[int, int], holding: dict) -> None:
        """EASY's reservation for a job that could not start: the head's, and also the first
        blocked job's on nodes no earlier plan could use (the head's reservation covers only
        its families: an 8-GPU A100-only job behind a T4-only head was passed by every 4-GPU
        A100 job submitted after it, for good). One per set of accelerator families at most,
        found by a family look-up before any plan is made (a long queue costs no more):
        the families it names that have a node with GPUs enough for one of its workers
        (`holding`, per pass: GPUs per worker -> family codes; by its names alone, an 8-GPU
        A100-or-T4 job behind a T4 head got no plan though no 4-GPU T4 node could hold it;
        and (GPUs per worker, accelerator_types) -> the codes a plan already covers).
        A job whose victims are yielding (_preempt_for_blocked) gets one on any nodes: its
        start is "now" once they have, and without it a job behind it took the room the first
        victim freed, and it waited on with its preemption spent."""
        t = self.state.table
        preempting = bool(self.preempting.get(job.spec.name))
        if plans:
            if len(plans) >= MAX_PLANS_PER_PASS:
                return
            if not preempting:
                if not job.spec.gpus_per_worker:
                    return  # (a CPU job may use every node: behind another plan, none is its own)
                per_worker = job.spec.gpus_per_worker
                # (per_worker, accelerator_types) a plan already covers: plans are only
                # added within a pass, so a job alike behind it needs no look-up (a pass
                # over a long queue made one per waiting job)
                covered = (per_worker, job.spec.accelerator_types)
                if covered in holding:
                    return
                named = allowed_families(job.spec)
                codes = {t.families[f] for f in named if f in t.families} if named \
                    else set(t.families.values())
                if per_worker not in holding:
                    n = len(t)
                    holding[per_worker] = set(
                        np.unique(t.family[:n][t.gpus[:n] >= per_worker]).tolist())
                codes &= holding[per_worker]
                if any(codes & p.families for p in plans):
                    holding[covered] = codes
                    return
        plan = self._head_plan(job, now, free_gpus)
        if plans and not preempting and any((plan.usable & p.usable).any() for p in plans):
            return
        n = len(t)
        plan.families = frozenset(np.unique(t.family[:n][plan.usable[:n]]).tolist())
        plans.append(plan)

    def _plans_for(self, blocked: list[QueuedJob], now: float, free_gpus: dict[int, int]
                   ) -> list[_HeadPlan]:
        """The EASY plans a queue pass makes for these blocked jobs, in queue order (the
        head first): _plan_blocked's, asked again where a pass's plans are judged later (a
        preemption's start, a migration)."""
        plans: list[_HeadPlan] = []
        holding: dict = {}
        for job in blocked:
            self._plan_blocked(plans, job, now, free_gpus, holding)
        return plans

    def _delays(self, plans: list[_HeadPlan], spec: JobSpec, placement: Placement,
                now: float, expected_s: float | None) -> _HeadPlan | None:
        """The plan whose job starting `placement` now would delay (EASY's test, each plan on
        its own nodes); None when it delays none. A placement over the nodes of several plans
        is judged on copies, so that one refused takes no plan's room."""
        if not plans:
            return None
        index = self.state.table.index
        rows = [index[r.node_id] for r in placement.reservations() if r.node_id in index]
        touched = [i for i, p in enumerate(plans) if any(p.usable[row] for row in rows
                                                         if row < len(p.usable))]
        if len(touched) == 1:
            plan = plans[touched[0]]
            return None if self._may_backfill(plan, spec, placement, now, expected_s) \
                else plan
        trial = {i: dataclasses.replace(plans[i], room=plans[i].room.copy(),
                                        first_call=dict(plans[i].first_call))
                 for i in touched}
        for i, plan in trial.items():
            if not self._may_backfill(plan, spec, placement, now, expected_s):
                return plans[i]
        for i, plan in trial.items():
            plans[i] = plan
        return None

    def _backfill_elsewhere(self, plans: list[_HeadPlan], job: QueuedJob, placement: Placement,
                            now: float, free_gpus: dict[int, int],
                            delayed: _HeadPlan) -> Placement | None:
        """A placement of `job` that delays no plan, without the families on which
        `placement` (refused: it would delay plan `delayed`) took that plan's nodes: the
        placement (the policy's, or place()'s family by family) is asked again without them,
        until one delays no plan or no family is left; None if none. Without it a job refused
        on its first family waited beside free GPUs of its others (Gavel-style tries the
        fastest type first: at 13% allocation a 1-GPU job of any family waited 311 s behind
        an A100 gang job's reservation). Only the families where it hit the plan are left
        out: a placement over two families (first-fit's one free T4 GPU and three A100s)
        dropped both, and the job waited beside idle A100s the T4-only head cannot use."""
        spec = job.spec
        if not spec.gpus_per_worker:
            return None
        t = self.state.table
        index = t.index
        left = [f for f in (allowed_families(spec) or t.families) if t.families.get(f)]
        while True:
            rows = [index[r.node_id] for r in placement.reservations() if r.node_id in index]
            used = {int(t.family[row]) for row in rows
                    if row < len(delayed.usable) and delayed.usable[row]} \
                or {int(t.family[row]) for row in rows}
            # (A family with fewer free GPUs than one worker takes cannot help: no place() call)
            left = [f for f in left if t.families[f] not in used
                    and free_gpus.get(t.families[f], 0) >= spec.gpus_per_worker]
            if sum(free_gpus.get(t.families[f], 0) for f in left) < spec.total_gpus:
                return None
            try:
                placement = self._place(spec.narrowed(accelerator_types=tuple(left)), now,
                                        job.owner, free_gpus=free_gpus)
            except PlacementError:
                return None
            delayed = self._delays(plans, spec, placement, now, job.expected_left_s)
            if delayed is None:
                return placement

    def _first_in_line(self, now: float) -> QueuedJob | None:
        """The first waiting job in queue order that is not out of line (waiting for nodes
        the autoscaler adds, or for silent ones): the head whose start EASY protects."""
        for job in self.queue.ordered():
            if self._new_nodes_plan(job.spec, now) is None and \
                    not self._silent_nodes_needed(job.spec, now):
                return job
        return None

    def _shape(self, spec: JobSpec) -> tuple:
        """Jobs of one shape fit or fail alike (_shape); a job's own excluded GPUs make its
        shape its own, so its failure (or its need for new nodes) is never another's."""
        return _shape(spec), frozenset(self.excluded_gpus.get(spec.name, ()))

    def _wait_reason(self, job: QueuedJob, reason: str) -> None:
        """What a waiting job waits for; one waiting for its victims to yield says that."""
        if not self.preempting.get(job.spec.name):
            job.reason = reason

    def _free_units(self, now: float) -> tuple[dict[int, int], list[float]]:
        """Free GPUs per accelerator family code, and free CPUs, on placeable nodes."""
        t = self.state.table
        n = len(t)
        ok = self.state.placeable(now)
        taken_cpus, taken_gpus = t.taken(n)
        gpus = np.where(ok, np.maximum(t.gpus[:n] - taken_gpus, 0), 0)
        by_family = np.bincount(t.family[:n], weights=gpus, minlength=len(t.families))
        cpus = float(np.where(ok, np.maximum(t.cpus[:n] - taken_cpus, 0), 0).sum())
        return {code: int(v) for code, v in enumerate(by_family)}, [cpus]

    def _head_plan(self, head: QueuedJob, now: float, free_gpus: dict[int, int]) -> _HeadPlan:
        """The head's shadow time (EASY): the first moment the nodes it could use hold all
        its workers, node by node (_HeadRoom), as the running jobs end as expected; and its
        room then. Families the head is kept off (_family_choice) are not its: jobs that may
        run only there do not delay it."""
        spec = head.spec
        choice = self._family_choice(spec, free_gpus)
        first_call = {}
        if choice is not None and choice.usable:
            first_call = {f: gpus for f in choice.kept_off
                          if (gpus := self.queue.first_call_gpus(f, spec.priority))}
            spec = spec.narrowed(accelerator_types=choice.usable)
        t = self.state.table
        n = len(t)
        excluded = frozenset(self.excluded_gpus.get(spec.name, ()))
        cap = worker_capacity(spec, self.state, now, ignore_reservations=True,
                              excluded_gpus=excluded)[:n]
        if choice is not None and not choice.usable:
            cap = np.zeros_like(cap)
        usable, per_gpu = cap > 0, spec.gpus_per_worker > 0
        placeable = usable & self.state.placeable(now)
        taken_cpus, taken_gpus = t.taken(n)
        free_cpus = np.where(placeable, np.maximum(t.cpus[:n] - taken_cpus, 0), 0.0)
        spare_cpus = math.inf
        if per_gpu:
            # (never below 0: a job taking no CPUs there never delays the head)
            spare_cpus = max(float(free_cpus.sum()) - head.spec.total_cpus, 0.0)
        room = _HeadRoom(spec, np.where(placeable, cap, 0), free_cpus,
                         np.where(placeable, np.maximum(t.gpus[:n] - taken_gpus, 0), 0),
                         self.state, ram=bool(spec.min_host_memory_gb))
        shadow = now if room.total >= spec.num_workers else None
        if shadow is None:
            # Running jobs by expected end; what they free on the head's nodes is counted
            # only until its workers fit (most of a long running list is never looked at),
            # and those ending at that same moment too (a sweep placed with one estimate):
            # left out, its room then was short of them, and backfills that fit were refused.
            reservations = self.state.reservations
            for end, name in self._running_by_end(now):
                if shadow is not None and end > shadow:
                    break
                room.end(reservations.get(name, ()))
                if shadow is None and room.total >= spec.num_workers:
                    shadow = end
        return _HeadPlan(head.spec.name, usable, per_gpu, shadow, room, spare_cpus, first_call)

    def _running_by_end(self, now: float) -> Iterator[tuple[float, str]]:
        """(expected end, name) of the running jobs with an estimate, soonest first: those
        told to yield (they end now), then the rest by planned end (`planned_ends`)."""
        yielding = sorted(name for name, job in self.running.items()
                          if job.directive is not None)
        for name in yielding:
            yield now, name
        running = self.running
        # Jobs past their estimate (planned end <= now) have none left: skipped by bisection.
        for i in range(bisect.bisect_right(self.planned_ends, (now, "\U0010ffff")),
                       len(self.planned_ends)):
            end, name = self.planned_ends[i]
            if running[name].directive is None:
                yield end, name

    def _may_backfill(self, plan: _HeadPlan, spec: JobSpec, placement: Placement,
                      now: float, expected_s: float | None) -> bool:
        """EASY's test: the job does not delay the head's reserved start. `expected_s`: how
        long it is expected to run from now (a resumed job: what is left of its estimate)."""
        reservations = placement.reservations()
        units = _units_on(reservations, plan.usable, self.state, plan.per_gpu)
        only = allowed_families(spec)
        if units and len(only) == 1 and units <= plan.first_call.get(only[0], 0):
            # The head is kept off its family while it waits (its room leaves these GPUs
            # out): refusing it would idle them while the head waits for them for ever. The
            # shadow counted them, so the head may start later than planned (measured: the
            # variant that left them out of the shadow too did no better).
            plan.first_call[only[0]] -= units
            return True
        if units == 0:
            # Capacity the head cannot use; but a job taking no GPUs may still take the CPUs
            # the head's workers need beside theirs. Its start known, as any backfill (below:
            # the sum alone let a GPU backfill later in the pass take the same CPUs from the
            # head's room, and the head missed its start); else only the CPUs free now
            # beyond what the head needs, summed over its nodes.
            cpus = _units_on(reservations, plan.usable, self.state, False) \
                if plan.per_gpu else 0.0
            if not cpus:
                return True
            if plan.shadow is None:
                if cpus > plan.spare_cpus + 1e-9:
                    return False
                plan.spare_cpus -= cpus
                return True
        if plan.shadow is None:
            return False
        if expected_s is not None and now + expected_s <= plan.shadow:
            return True
        # Room the head does not need at its start: its workers still fit beside the job,
        # node by node (a GPU spare in all may be the one a node needs for a whole worker)
        return plan.room.take_if_spare(reservations)

    # -- internals: preemption ---------------------------------------------------------------------
    def _preempt_for_blocked(self, blocked: list[QueuedJob], free_gpus: dict[int, int],
                             now: float) -> Outcome:
        """Waiting jobs that could not start, in queue order, look for running jobs they
        outrank (lower priority; or, under LAS, the same priority and a higher service level)
        to preempt; at most preemption_searches_per_pass of them search."""
        outcome = Outcome()
        if not self.settings.preemption or self._still_gathering(now):
            return outcome
        searches = self.settings.preemption_searches_per_pass
        if self.queue.level is None and all(  # FIFO order: only a higher priority outranks
                job.spec.priority <= min(self.running_priorities, default=job.spec.priority)
                for job in blocked[:MAX_BLOCKED_EXAMINED]):
            return outcome  # without a pass over the running jobs
        pool = self._victim_pool(now)
        aged = self.settings.max_preemptions  # preempted this often: LAS leaves it alone
        top_level = self._top_levels(pool, aged)
        lowest = min(top_level, default=None)
        tried: set[tuple] = set()  # (priority, level, shape) that found no victims
        in_victim_order = False
        planned = set(self._plan_jobs)  # (this pass's EASY plans: _may_start_behind)
        for i, job in enumerate(blocked[:MAX_BLOCKED_EXAMINED]):
            if searches == 0 or lowest is None:
                break
            name = job.spec.name
            if self.preempting.get(name) or name not in self.queue.waiting:
                continue
            priority, level = job.spec.priority, self.queue.level_of(name)
            if lowest >= priority and top_level.get(priority, -1) <= level:
                continue  # outranks nothing running
            key = (priority, level, self._shape(job.spec))
            if key in tried:
                continue
            if not in_victim_order:
                pool = self._with_levels(pool)
                self._sort_victims(pool, now)
                in_victim_order = True
            # Ageing (max_preemptions) bounds LAS only: a higher priority always outranks.
            candidates = [entry for entry in pool if entry[2].directive is None and (
                entry[0] < priority or (entry[0] == priority and entry[1] > level
                                        and entry[2].preemptions < aged))]
            searches -= 1
            ahead = [b for b in blocked[:i] if b.spec.name in planned]
            found = self._preempt_for(job, candidates, free_gpus, now, ahead)
            if not found.effects:
                tried.add(key)
            outcome.add(found)
        return outcome

    def _victim_pool(self, now: float) -> list[tuple[int, float, RunningJob]]:
        """(priority, LAS attained service, job) of the running jobs that may be preempted
        now (by a job that outranks them; one preempted max_preemptions times, only by a
        higher priority). The service counts only under LAS (else 0.0): its level is read
        (_with_levels) only in a pass that searches for victims, most passes never do."""
        s = self.settings
        ready, min_run_s = self.queue.ready, s.min_run_s
        # las_attained_s inlined: this runs for every running job on every pass.
        las = self.queue.level is not None
        return [(job.spec.priority,
                 (job.ran_s - job.las_baseline_s + now - job.started_at) * job.size
                 if las else 0.0, job)
                for name, job in self.running.items()
                if job.directive is None and job.spec.preemptible and name not in ready
                and now - job.started_at >= min_run_s]

    def _top_levels(self, pool: list[tuple[int, float, RunningJob]], aged: int
                    ) -> dict[int, int]:
        """Per priority of the pool, the highest service level running there that LAS may
        preempt (-1: none, all preempted `aged` times), to say "outranks nobody" in O(1):
        the common case costs one pass over the pool and no sort. Levels grow with the
        service (_level), so the top level is the level of the most service: one bisection
        per priority, not one per running job."""
        most: dict[int, float | None] = {}
        for priority, attained, running in pool:
            if running.preemptions < aged:
                top = most.get(priority)
                if top is None or attained > top:
                    most[priority] = attained
            else:
                most.setdefault(priority, None)
        las = self.queue.level is not None
        return {priority: -1 if attained is None else self._level(attained) if las else 0
                for priority, attained in most.items()}

    def _with_levels(self, pool: list[tuple[int, float, RunningJob]]
                     ) -> list[tuple[int, int, RunningJob]]:
        """The pool with each job's service level (_level, inlined) in place of its service:
        running jobs are ranked by levels only under LAS (else level 0)."""
        if self.queue.level is None:
            return [(priority, 0, job) for priority, _, job in pool]
        thresholds = self.settings.las_thresholds_gpu_s
        return [(priority, bisect.bisect_right(thresholds, attained), job)
                for priority, attained, job in pool]

    def _sort_victims(self, pool: list[tuple[int, int, RunningJob]], now: float) -> None:
        """Victim order: lowest priority, then highest level (most service received), then
        the fastest hardware, then the least work lost since the last checkpoint."""
        # Among equals, victims on the fastest hardware first: the job that preempts them has
        # received less service (is likely shorter) and should get it.
        speed = {f: self.typical_speed.get(f, 0.0) for f in self.state.table.families}
        pool.sort(key=lambda e: (e[0], -e[1], -speed.get(e[2].family or "", 0.0)
                                 if e[2].family is not None else
                                 -speed.get(self.running_family(e[2].spec.name), 0.0),
                                 now - (e[2].last_checkpoint_at or e[2].started_at)))

    def _preempt_for(self, job: QueuedJob, candidates: list[tuple[int, int, RunningJob]],
                     free_gpus: dict[int, int], now: float, ahead: list[QueuedJob]) -> Outcome:
        """Make room for a waiting job by preempting running jobs it outranks, if enough do
        and the queue pass would then start it (`ahead`: the blocked jobs before it in queue
        order that the pass made EASY plans for, _plan_blocked)."""
        outcome = Outcome()
        job_name = job.spec.name
        victims = self._choose_victims(job.spec, candidates, free_gpus, now)
        if not victims or not self._may_start_behind(ahead, job, victims, now):
            return outcome
        self.preempting[job_name] = set(victims)
        job.reason = (f"preempting {', '.join(victims)}: starts when they have checkpointed "
                      "and yielded")
        level = self.queue.level_of(job_name)
        for victim in victims:
            running = self.running[victim]
            if running.spec.priority < job.spec.priority:
                why = f"priority {job.spec.priority} > {running.spec.priority}"
            else:
                service = running.las_attained_s(now)
                since = " since its promotion" if running.las_baseline_s else ""
                why = (f"least attained service first: it has run {service / 3600:.2f} "
                       f"GPU-h{since}, level {level} < {self._level(service)}")
            outcome.add(self._direct(victim, PREEMPT, f"preempted for job '{job_name}' ({why})",
                                     now, for_job=job_name))
        return outcome

    def _choose_victims(self, spec: JobSpec, candidates: list[tuple[int, int, RunningJob]],
                        free_gpus: dict[int, int], now: float) -> list[str]:
        """The fewest candidates (in victim order) whose resources make the job fit as the
        queue pass would place it once they have yielded; [] if none do (see
        _victims_in_reach)."""
        reach, first = self._victims_in_reach(spec, candidates, free_gpus)
        if not reach:
            return []
        with _AsIfYielded(self, reach) as yielded:
            # More victims only free more (a victim allowed one family adds as much first
            # call there as it frees): when all those in reach make no room, fewer do not
            # either. One placement tried, not one per victim (most searches end here).
            if not self._would_place(spec, now):
                return []
            for name in reach[first:]:
                yielded.take_back(name)
            n = first
            while n < len(reach) and not self._would_place(spec, now):
                yielded.add(reach[n])
                n += 1
            chosen = reach[:n]
            for name in list(reversed(chosen))[1:]:  # drop any the later ones made unneeded
                yielded.take_back(name)
                if self._would_place(spec, now):
                    chosen.remove(name)
                else:
                    yielded.add(name)
        return chosen

    def _victims_in_reach(self, spec: JobSpec, candidates: list[tuple[int, int, RunningJob]],
                          free_gpus: dict[int, int]) -> tuple[list[str], int]:
        """The candidates that could help the job, in victim order, as far as a search goes,
        and how many of them the first placement is tried with: those whose GPUs, with the
        free ones, could hold it; then one more per try, MAX_VICTIMS_TRIED tries at most.
        ([], 0): never enough. A victim on a family the job may not use cannot help."""
        allowed = set(allowed_families(spec))
        room = _free_allowed_gpus(spec, free_gpus, self.state) if spec.gpus_per_worker \
            else math.inf
        names: list[str] = []
        first = 0
        for _, _, job in candidates:
            if spec.gpus_per_worker and job.spec.gpus_per_worker:
                # Its GPUs on nodes of the families the job may use: a victim spread over two
                # families counts for both (by its slowest alone, an A100 job never
                # preempted one on A100 and T4 nodes).
                usable = self._gpus_held_on(job.spec.name, allowed)
                if not usable:
                    continue
                room += usable
            elif spec.gpus_per_worker and not self._beside_gpus(job.spec.name, allowed):
                continue  # a job taking no GPUs helps only by the CPUs beside usable GPUs
            names.append(job.spec.name)
            if not first and room >= spec.total_gpus:
                first = len(names)
            if first and len(names) == first + MAX_VICTIMS_TRIED - 1:
                break
        return (names, first) if first else ([], 0)

    def _beside_gpus(self, job_name: str, allowed: set[str]) -> bool:
        """Whether the job holds CPUs on a node with GPUs of the `allowed` families (any when
        empty)."""
        return any(r.cpus > 0 and self.state.table.gpus[row] > 0
                   for r, row in self._held_on(job_name, allowed))

    def _gpus_held_on(self, job_name: str, allowed: set[str]) -> int:
        """GPUs the job holds on nodes of the `allowed` families (any when empty)."""
        return sum(r.gpus for r, _ in self._held_on(job_name, allowed))

    def _held_on(self, job_name: str, allowed: set[str]) -> list[tuple[Reservation, int]]:
        """The job's reservations (with their table rows) on nodes of the `allowed`
        families (any when empty), as worker_capacity reads a node's family."""
        t = self.state.table
        codes = {t.families[f] for f in allowed if f in t.families}
        rows = ((r, t.index.get(r.node_id)) for r in self.state.reservations.get(job_name, ()))
        return [(r, row) for r, row in rows
                if row is not None and (not allowed or t.family[row] in codes)]

    def _would_place(self, spec: JobSpec, now: float) -> bool:
        """Would the queue pass place `spec` now (victims yielded in thought, _AsIfYielded)?
        Asked as the pass asks (its family choice), not of place() alone: a job kept off a
        family (jobs allowed only that family have first call on it) preempted victims
        there, the pass then started a job of that family instead, and the preemptor
        preempted again."""
        free_gpus = self._free_units(now)[0]
        if not self._enough_gpus_to_try(spec, free_gpus):
            return False
        try:
            self._place(spec, now, free_gpus=free_gpus, trial=True)
            return True
        except PlacementError:
            return False

    def _enough_gpus_to_try(self, spec: JobSpec, free_gpus: dict[int, int]) -> bool:
        """False when the families the queue pass would try for the job (_family_choice)
        have fewer free GPUs than it needs: _place would fail, and a failed place() costs
        an explanation per node (the victim search asks for many victim sets)."""
        choice = self._family_choice(spec, free_gpus) if self.policy is None else None
        if choice is None:
            return True  # (place() as given)
        codes = self.state.table.families
        # (every family of choice.order has room for the job, so is one of open_families)
        return sum(free_gpus.get(codes[f], 0) for f in choice.open_families) >= spec.total_gpus

    def _may_start_behind(self, ahead: list[QueuedJob], job: QueuedJob, victims: list[str],
                          now: float) -> bool:
        """Whether the queue pass, once `victims` have yielded, would let `job` start behind
        the blocked jobs `ahead` of it that it plans for (EASY's test for each plan,
        _delays; the head itself always may). A job the pass then refuses as delaying one
        of them took the victims' run for capacity that idles (judged against the head's
        plan alone, an A100 job preempted for a start the plan of an 8-GPU A100 job ahead
        of it then refused, behind a T4 head)."""
        if not ahead:
            return True
        with _AsIfYielded(self, victims):
            free_gpus = self._free_units(now)[0]
            try:
                placement = self._place(job.spec, now, free_gpus=free_gpus, trial=True)
            except PlacementError:
                return False
            plans = self._plans_for(ahead, now, free_gpus)
            return self._delays(plans, job.spec, placement, now, job.expected_left_s) is None

    def _direct(self, job_name: str, kind: str, reason: str, now: float, for_job: str = "",
                target: Placement | None = None) -> Outcome:
        job = self.running[job_name]
        if job.directive is not None and job.directive.for_job not in ("", for_job):
            if kind == CANCEL:
                # Still that waiting job's victim: it yields all the same, freeing the room
                # the job waits for (dropped from it, the job preempted a second victim at
                # once); kept in the directive, _stop drops it when it yields.
                for_job = job.directive.for_job
            else:
                # No longer that waiting job's victim: it must not wait on it for ever (and
                # look for no other victims meanwhile)
                self.preempting.get(job.directive.for_job, set()).discard(job_name)
        if job.directive is not None and job.directive.kind == MIGRATE and kind != MIGRATE:
            # preempted or cancelled instead: it will not move, and its claim held the target
            # until it had yielded, the jobs waiting for those GPUs kept waiting
            self._drop_claim(job_name)
        job.directive = Directive(kind, reason, now, for_job, target)
        return Outcome(effects=[Persist(), Yield(job_name, job.placement.owner, kind, reason,
                                                 target.worker_nodes if target else ())])

    def _withdraw_lost_migrations(self, lost: set[str]) -> None:
        """Migration claims that lost a reservation on a node Ray lists dead, or one silent past
        dead_after_s: the move can no longer be made (_take_claim), so a directive not read
        yet is withdrawn, what the node kept aside for the claim forgotten, and the rest
        of the claim released (told, the job checkpointed and restarted where it was). One
        already read is carried out: the job yields and is placed afresh."""
        for claim in lost:
            job = self.running.get(claim.removesuffix(CLAIM_SUFFIX))
            if not claim.endswith(CLAIM_SUFFIX) or job is None or job.directive is None \
                    or job.directive.kind != MIGRATE or job.directive.read_at is not None:
                continue
            job.directive = None
            self._drop_claim(job.spec.name)

    def _drop_claim(self, job_name: str) -> bool:
        """Release the job's migration claim, and what silent nodes keep aside for it (kept, a
        later claim of the job got it back when the node reported): the move will not be
        made. Whether it held one."""
        self.state.forget_silent(job_name + CLAIM_SUFFIX)
        return self.state.release(job_name + CLAIM_SUFFIX)

    def _forget_preemption(self, job_name: str) -> None:
        """The job no longer waits: victims that have not read their directive yet keep
        running. One that has is checkpointing to yield: it keeps the directive, so that its
        yield counts as the preemption it is (withdrawn, it was an uncounted restart)."""
        for victim in self.preempting.pop(job_name, ()):
            job = self.running.get(victim)
            if job is not None and job.directive is not None and job.directive.kind == PREEMPT \
                    and job.directive.read_at is None:
                job.directive = None

    # -- internals: migration ----------------------------------------------------------------------
    def _migrate(self, now: float) -> Outcome:
        """Move running jobs to faster accelerators that nobody waiting can use, where the
        modelled gain beats the restart cost. The target is claimed at once."""
        outcome = Outcome()
        if not self.settings.migration or not self.running or self._still_gathering(now):
            return outcome
        free_gpus, _ = self._free_units(now)
        free = {f: free_gpus.get(code, 0) for f, code in self.state.table.families.items() if f}
        for family in self._families_wanted_by_queue(free):  # waiting jobs have first pick
            free.pop(family)
        if not any(free.values()):
            return outcome  # the common case under load: checked before any per-job work
        room: dict[tuple, bool] = {}  # (faster families, GPUs) -> enough free there
        head_plans: dict = {}  # the blocked head's EASY plan, made at the first target found
        for name, job in list(self.running.items()):
            key = job.migration_key
            if key is None:
                key = job.migration_key = self._migration_key(job)
            if not key:
                continue
            if now - job.started_at < self.settings.min_run_s:
                continue  # too soon after its start (checked first: the simulator's ticks)
            fits = room.get(key)
            if fits is None:
                fits = room[key] = sum(free.get(f, 0) for f in key[0]) >= key[1]
            if not fits:
                continue  # the common case when GPUs are free: a look-up per job
            faster = key[0]
            seen = tuple(free.get(f, 0) for f in faster)
            if job.no_target_at is not None and all(
                    a <= b for a, b in zip(seen, job.no_target_at)):
                continue  # nothing freed where it could go since it last found no target
            target = self._migration_target(job, free, now)
            if target is None:
                continue
            if not self._migration_spares_head(job, target, now, head_plans):
                job.no_target_at = seen  # looked at again once more is freed there
                continue
            # The claim is the target placed under the claim's name: a real reservation.
            self.state.reserve(name + CLAIM_SUFFIX, target.reservations())
            new = self._family_of(target, job.spec)
            free[new] = free.get(new, 0) - job.spec.total_gpus
            room.clear()
            current = self._family_of(job.placement, job.spec)
            reason = (f"migrating from {current} to {new}: expected "
                      f"{job.remaining_s(now):.0f}s left at {self.speed(job.spec, current):g}x, "
                      f"{self.speed(job.spec, new):g}x there")
            outcome.add(self._direct(name, MIGRATE, reason, now,
                                     target=dataclasses.replace(target, job_name=name)))
            if not any(free.values()):
                break
        return outcome

    def _families_wanted_by_queue(self, free: dict[str, int]) -> set[str]:
        """Families with enough free GPUs for some waiting job that may run on them."""
        wanted: set[str] = set()
        for allowed, gpus in self.queue.sizes_by_allowed:  # distinct shapes, not jobs
            wanted |= {f for f in allowed or free if free.get(f, 0) >= gpus}
            if len(wanted) == len(free):
                break
        return wanted

    def _migration_spares_head(self, job: RunningJob, target: Placement, now: float,
                               plans: dict) -> bool:
        """Whether a migration to `target` passes the test a job starting behind the blocked
        head of the queue must pass (EASY's, _may_backfill), for the head and for the other
        blocked jobs the last queue pass planned for (_plan_blocked): a migration took the
        head's first 4 of 8 GPUs as they freed and delayed it by the migrated job's whole
        run, or took the room a preemption for it was making. `plans` keeps the plans for
        the rest of the pass (each start the test lets through uses some of their slack)."""
        head = self._first_in_line(now)
        if head is None:
            return True
        if "plans" not in plans:
            behind = [self.queue.waiting.get(name) for name in self._plan_jobs
                      if name != head.spec.name]
            plans["plans"] = self._plans_for([head, *(q for q in behind if q is not None)],
                                             now, self._free_units(now)[0])
        made = plans["plans"]
        # A move within what a plan's job may use (a flexible head: any family) frees as many
        # units there as it takes: it delays nothing. (Tested whole, the Philly slice's mean
        # JCT lost 8%: its LAS queue always has a head, and migrations to faster GPUs stopped.)
        held = self.state.reservations.get(job.spec.name, ())
        hit = [i for i, plan in enumerate(made)
               if _units_on(target.reservations(), plan.usable, self.state, plan.per_gpu)
               > _units_on(held, plan.usable, self.state, plan.per_gpu)]
        if not hit:
            return True
        judged = [made[i] for i in hit]
        # (it runs on there for what is left of its estimate, not the whole of it)
        if self._delays(judged, job.spec, target, now, job.remaining_s(now)) is not None:
            return False
        for i, plan in zip(hit, judged):
            made[i] = plan
        return True

    def _migration_key(self, job: RunningJob) -> tuple:
        """(faster families, GPUs) of a job the migration scan looks at; () for one it never
        moves (not preemptible, no GPUs, or nothing faster in the cluster)."""
        if not job.spec.preemptible or not job.spec.gpus_per_worker:
            return ()
        faster = self._faster_families(job)
        return (faster, job.spec.total_gpus) if faster else ()

    def _faster_families(self, job: RunningJob) -> tuple[str, ...]:
        """Families present that the job may use and runs faster on than where it runs
        (worked out once per placement: speeds are per job, the families per cluster)."""
        if job.faster is None:
            here = self.speed(job.spec, self.running_family(job.spec.name))
            allowed = set(allowed_families(job.spec))
            job.faster = tuple(f for f in self.state.table.families if f
                               and (not allowed or f in allowed)
                               and self.speed(job.spec, f) > here)
        return job.faster

    def _migration_target(self, job: RunningJob, free: dict[str, int],
                          now: float) -> Placement | None:
        """Where the job would gain more than its restart cost, among families with free
        GPUs (`free`) that no waiting job can use; None if nowhere. Cheap checks first (the
        caller checked that it has run min_run_s)."""
        spec = job.spec
        if (job.directive is not None or spec.gpus_per_worker == 0
                or spec.name in self.queue.ready):
            return None
        remaining = job.remaining_s(now)
        here = self.speed(spec, self.running_family(spec.name))
        fastest = max(self.speed(spec, f) for f in self._faster_families(job))
        if remaining is None or remaining * (1 - here / fastest) <= self.settings.restart_cost_s:
            # Not worth it even on its fastest family, now or later (what is left only
            # shrinks, and no estimate stays none): the scan skips it from now on.
            job.migration_key = ()
            return None
        # From here a no is final until more is free where it could go: its gain only
        # shrinks as it runs.
        job.no_target_at = tuple(free.get(f, 0) for f in self._faster_families(job))
        speeds = job.speeds
        for f in free:
            if f not in speeds:
                speeds[f] = self.speed(spec, f)
        faster = [f for f in self._faster_families(job) if free.get(f, 0) > 0]
        if not faster or sum(free[f] for f in faster) < spec.total_gpus:
            return None
        best = max(speeds[f] for f in faster)
        if remaining * (1 - here / best) <= self.settings.restart_cost_s:
            return None  # not worth it even on the fastest free family
        # A policy's placement (the simulator's baselines) is blind to families: asked over
        # all the faster ones, best-fit took the tightest node, a slower family's, and the
        # job moved again min_run_s later, paying two restarts for one move. Such a policy
        # is asked family by family, fastest first, then over them all (the core's own
        # placement chooses the family itself).
        tries = [(f,) for f in sorted(faster, key=lambda f: -speeds[f])
                 if free[f] >= spec.total_gpus] if self.policy is not None else []
        for families in [*tries, tuple(sorted(faster))]:
            try:  # placed under the claim's name: the job itself still holds its reservation
                target = self._place(spec.narrowed(name=spec.name + CLAIM_SUFFIX,
                                                   accelerator_types=families),
                                     now, job.placement.owner, trial=True)
            except PlacementError:
                continue
            if target.bottleneck_gbps < job.placement.bottleneck_gbps:
                # The gain counts accelerator speed alone, no network: a job on one node
                # moved to 2 + 2 faster GPUs across 10 GbE for it (its gradients then cross
                # that link every step). Never traded away: it waits for a target as well
                # connected.
                continue
            gain = remaining * (1 - here / self.speed(spec, self._family_of(target, spec)))
            if gain <= self.settings.restart_cost_s:
                continue
            job.no_target_at = None
            return target
        return None

    def _family_of(self, placement: Placement, spec: JobSpec) -> str:
        """The slowest accelerator family among the placement's nodes (it sets the pace)."""
        families = []
        for node_id in placement.nodes:  # a node with several families: its slowest
            report = self.state.reports.get(node_id)
            families += (gpu_families(report.gpus) if report is not None else []) or [""]
        return min(families, key=lambda f: self.speed(spec, f), default="")

    def _take_claim(self, job: RunningJob, target: Placement | None, claim, now: float,
                    ran: float) -> bool:
        """Hand a migrating job its claimed target (the claim was released with the job's
        reservation, in the same call); False if part of the claim was lost (a node died)."""
        if not _claim_whole(target, claim):
            return False
        self._start(job.spec, job.placement.owner, target, now,
                    QueuedJob(job.spec, job.placement.owner, job.enqueued_at, "",
                              job.preemptions, ran, las_baseline_s=job.las_baseline_s))
        return True


# -- small pure helpers ----------------------------------------------------------------------------

def saved_nodes_asked(record: object) -> tuple[float, list[dict[str, float]], list[dict]]:
    """A waiting job's saved autoscaler request: (its queue time, the bundles asked, the
    node types they are for: none in a state saved before they were), each bundle resource
    names to non-negative numbers; ValueError naming what is wrong (a bad bundle sent to
    request_resources failed every job's request, on every pass)."""
    if not isinstance(record, dict):
        raise ValueError(f"a JSON {type(record).__name__}, not an object")
    since, bundles = record.get("enqueued_at"), record.get("bundles")
    if not is_number(since):
        raise ValueError(f"its enqueued_at is {since!r:.60}, not a number")
    if not isinstance(bundles, list) or not all(
            isinstance(b, dict) and all(isinstance(k, str) and is_number(v) and v >= 0
                                        for k, v in b.items()) for b in bundles):
        raise ValueError(f"its bundles are {bundles!r:.60}, not a list of resource names to "
                         "numbers >= 0")
    parts = record.get("node_types", [])
    if not isinstance(parts, list) or not all(
            isinstance(p, dict) and isinstance(p.get("node_type"), str)
            and all(is_int(p.get(k)) and p.get(k) >= 0 for k in ("nodes", "workers"))
            for p in parts):
        raise ValueError(f"its node_types are {parts!r:.60}, not a list of node type names "
                         "with their nodes and workers")
    return float(since), [dict(b) for b in bundles], [dict(p) for p in parts]


def _saved_count(value: object) -> int:
    if not (is_int(value) and value >= 0):
        raise ValueError(f"a count of {value!r:.60}, not an integer >= 0")
    return value


def _saved_time(value: object) -> float:
    """A saved moment (the scheduler's clock, seconds)."""
    if not is_number(value):
        raise ValueError(f"{value!r:.60} is not a time (a number)")
    return float(value)


def _saved_gpus(value: object) -> set[tuple[str, int]]:
    """A saved list of [node id, GPU index] pairs (the GPUs a job must not be given)."""
    if not (isinstance(value, list) and all(
            isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], str)
            and is_int(pair[1]) for pair in value)):
        raise ValueError(f"a list of [node id, GPU index] pairs was expected, got "
                         f"{value!r:.60}")
    return {(node, index) for node, index in value}


def _saved_names(value: object) -> list[str]:
    """A saved list of job names (the victims of a preemption in progress)."""
    if not (isinstance(value, list) and all(isinstance(name, str) for name in value)):
        raise ValueError(f"a list of job names was expected, got {value!r:.60}")
    return value


def _scale_up_reason(plan: tuple[PlanPart, ...]) -> str:
    return (f"waiting for the autoscaler to add {plan_named(plan)} node(s): the "
            "cluster as it stands cannot hold it")


def _claim_whole(target: Placement | None, claim) -> bool:
    """Whether a migration claim (its reservations) still holds all of its target."""
    return target is not None and claim is not None and len(claim) == len(target.reservations())


def _silent_reason(nodes) -> str:
    """Why a job waits for nodes dead only by their agents' silence (_silent_alive)."""
    named = ", ".join(n[:12] for n in list(nodes)[:8]) + (", ..." if len(nodes) > 8 else "")
    return (f"waiting for silent node(s) {named} to report again (Ray lists them alive; no "
            "agent report for over dead_after_s: their agents may be restarting): the "
            "cluster without them cannot hold it")


def _shape(spec: JobSpec) -> tuple:
    """Jobs of one shape fit or fail alike: a failure is remembered for the pass."""
    return (spec.num_workers, spec.cpus_per_worker, spec.gpus_per_worker,
            spec.min_gpu_memory_gb, spec.min_bandwidth_gbps, spec.accelerator_types,
            spec.min_host_memory_gb)


def _free_allowed_gpus(spec: JobSpec, free_gpus: dict[int, int], state: ClusterState) -> int:
    """Free GPUs (the pass's count per family code) of the families the job may use: any,
    those of no known family ("": an RTX A6000, an A800) included, when it names none."""
    allowed = allowed_families(spec)
    return sum(free_gpus.get(code, 0) for f, code in state.table.families.items()
               if f in allowed or not allowed)


def _counts_allow(spec: JobSpec, free_gpus: dict[int, int], free_cpus: list[float],
                  state: ClusterState) -> bool:
    """A cheap necessary condition: enough free GPUs of allowed families and free CPUs."""
    if free_cpus[0] + 1e-9 < spec.total_cpus:
        return False
    return not spec.gpus_per_worker or \
        _free_allowed_gpus(spec, free_gpus, state) >= spec.total_gpus


def _waiting_reason(spec: JobSpec, free_gpus: dict[int, int], free_cpus: list[float],
                    state: ClusterState) -> str:
    if spec.gpus_per_worker:
        types = allowed_families(spec)
        what = f"{spec.total_gpus} GPU(s)" + (f" of type {'/'.join(types)}" if types else "")
        free = f"{_free_allowed_gpus(spec, free_gpus, state)} free now"
        if free_cpus[0] + 1e-9 < spec.total_cpus:  # the CPUs beside the GPUs are short too
            what += f" and {spec.total_cpus:g} CPUs"
            free = f"{_free_allowed_gpus(spec, free_gpus, state)} GPU(s) and " \
                   f"{free_cpus[0]:g} CPUs free now"
        return f"needs {what}, {free}; {FITS_WHEN_FREED}"
    return f"needs {spec.total_cpus:g} CPUs, {free_cpus[0]:g} free now; {FITS_WHEN_FREED}"


def _take_units(placement: Placement, state: ClusterState, free_gpus: dict[int, int],
                free_cpus: list[float]) -> None:
    t = state.table
    for r in placement.reservations():
        code = int(t.family[t.index[r.node_id]])
        free_gpus[code] = free_gpus.get(code, 0) - r.gpus
        free_cpus[0] -= r.cpus


def _units_on(reservations, usable: np.ndarray, state: ClusterState, per_gpu: bool) -> float:
    """GPUs (or CPUs) of `reservations` that sit on rows marked usable."""
    total = 0.0
    index = state.table.index
    for r in reservations:
        row = index.get(r.node_id)
        if row is not None and row < len(usable) and usable[row]:
            total += r.gpus if per_gpu else r.cpus
    return total
