"""What is known about the cluster: per-node reports from the agents, and what jobs hold.

Pure data and bookkeeping: no Ray here. Time is always passed in (`now`), so heartbeat
expiry is tested by stepping a number rather than sleeping.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from orchestrator.config import ACCELERATOR_ALIASES, ACCELERATOR_FAMILIES, ACCELERATOR_SPEED
from orchestrator.saved_records import saved_fields
from orchestrator.validation import is_number, parse_number

GIB = 1024 ** 3
# Reports of a node after RAM reserved there is released during which its estimate of the
# RAM in use outside the reservations is not raised (NodeTable.note_ram_outside): the
# released workers' RAM may still show in use (processes exiting) for a heartbeat or two.
RAM_SETTLE_REPORTS = 2


@dataclass(frozen=True)
class GpuInfo:
    """One accelerator. `source` says whether it was measured (NVML) or declared by the operator."""

    index: int
    name: str
    memory_total_bytes: int
    memory_free_bytes: int
    utilization_pct: float | None = None
    uuid: str = ""
    source: str = "nvml"  # "nvml" = measured; "declared" = from node labels / config
    memory_used_bytes: int | None = None
    nvlink_links: int | None = None  # active NVLink links; None where NVML does not expose it
    pcie_gen: int | None = None  # current PCIe link generation
    pcie_width: int | None = None  # current PCIe link width (lanes)

    @property
    def memory_free_gb(self) -> float:
        return self.memory_free_bytes / GIB

    @property
    def holds_nothing(self) -> bool:
        """Measured with no memory at all: a MIG-enabled board with no slices created
        (probes._mig_slice), which nothing CUDA runs on. Placement counts it as no GPU (a job
        stating no GPU memory was placed on it: 0 GiB >= 0). A declared GPU without the
        memory label (0 GiB) is not one: it counts, for jobs that state no memory."""
        return self.source == "nvml" and self.memory_total_bytes == 0


@dataclass(frozen=True)
class NodeReport:
    """One heartbeat from a node agent."""

    node_id: str
    hostname: str
    ray_cpus: float  # logical CPUs Ray schedules on this node (what placement may hand out)
    ray_gpus: float  # logical GPUs Ray schedules on this node
    # CPUs the agent's processes may use (cgroup CPU quota, rounded up, and affinity; older
    # agents: the OS's count) and the load on them, so that load / count is how busy they are
    # (probes.host_cpu_figures: under a quota, the cgroup's own usage, not the host's load).
    cpu_count: int
    load_avg_1m: float
    ram_total_bytes: int
    ram_available_bytes: int
    gpus: tuple[GpuInfo, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    probe_errors: dict[str, str] = field(default_factory=dict)  # probe name -> what went wrong
    # Measured node-to-node throughput from this node to each peer it probed, GB/s.
    bandwidth_gbps: dict[str, float] = field(default_factory=dict)
    # Ray's custom resources of the node (autoscaling.custom_resources: its node type's, e.g.
    # {"pool_big": 1}), which the autoscaler counts it by for bundles steered to a type; None:
    # not reported (an agent of an older version, whose report is still taken).
    custom_resources: dict[str, float] | None = None

    @property
    def load_per_cpu(self) -> float:
        return self.load_avg_1m / max(self.cpu_count, 1)


# Fields a report of an older agent may lack: read as their default (not known).
REPORT_FIELDS_OPTIONAL = frozenset({"custom_resources"})


def _missing_fields(obj: object) -> list[str]:
    """The dataclass fields `obj` lacks: a report pickled by an agent of an older version
    unpickles without the fields added since (pickle restores the attributes it carries);
    those of REPORT_FIELDS_OPTIONAL read as their default."""
    present = getattr(obj, "__dict__", {})
    return [f.name for f in dataclasses.fields(obj)
            if f.name not in present and f.name not in REPORT_FIELDS_OPTIONAL]


def report_problem(report: NodeReport) -> str | None:
    """What makes a node report unusable (a field missing, a number that is not one, or
    below zero), or None. Checked before any of it is stored: a NaN CPU count made every job
    look as if it could never fit, a NaN GPU count left the node's row half made, and a
    report without bandwidth_gbps was stored but not counted (its node's restored
    reservations were lost, and the node handed out twice)."""
    missing = _missing_fields(report)
    missing += [f"gpus[{i}].{name}" for i, gpu in enumerate(getattr(report, "gpus", ()))
                for name in _missing_fields(gpu)]
    if missing:
        return (f"it lacks {', '.join(missing)}: its agent runs another version of this "
                "project (restart the node's agent with the scheduler's version)")
    figures = {"ray_cpus": report.ray_cpus, "ray_gpus": report.ray_gpus,
               "cpu_count": report.cpu_count, "load_avg_1m": report.load_avg_1m,
               "ram_total_bytes": report.ram_total_bytes,
               "ram_available_bytes": report.ram_available_bytes}
    for name, value in figures.items():
        if not _is_reading(value):
            return f"{name} is {value!r}: not a finite number >= 0"
    if report.custom_resources is not None and not isinstance(report.custom_resources, dict):
        return f"custom_resources is {report.custom_resources!r:.60}: not a mapping"
    for gpu in report.gpus:
        problem = gpu_memory_problem(gpu.memory_free_bytes, gpu.memory_total_bytes)
        if problem:
            return f"gpus[{gpu.index}]: {problem}"
    return _bandwidth_problem(report.bandwidth_gbps)


def _is_reading(value: object) -> bool:
    """Whether a report's figure is a finite number >= 0 (not a bool). validation.is_number:
    math.isfinite raised OverflowError on an int past float's range."""
    return is_number(value) and value >= 0


def gpu_memory_problem(free: object, total: object) -> str | None:
    """Why a GPU's memory figures (bytes free, of total) are no reading, or None. The scheduler
    refuses a report carrying such a GPU (report_problem), and the agent leaves the GPU out
    of its report (probes._nvml_gpu), so one GPU's nonsense does not silence its node."""
    if not (_is_reading(free) and _is_reading(total)):
        return f"its memory reads {free!r} bytes free of {total!r}: not finite numbers >= 0"
    if free > total:
        return f"its memory reads {free} bytes free of {total}: more free than it holds"
    return None


def _bandwidth_problem(measured: object) -> str | None:
    """Why measured bandwidths are not peer ids to finite GB/s > 0, or None. An infinite link
    let a bandwidth-bound job span a slow one; a string failed every placement near the
    node."""
    if not isinstance(measured, dict):
        return f"bandwidth_gbps is {measured!r:.60}: not a mapping of peers to GB/s"
    for peer, gbps in measured.items():
        if not isinstance(peer, str) or not is_number(gbps) or gbps <= 0:
            return f"bandwidth_gbps[{peer!r:.40}] is {gbps!r:.40}: not a finite number > 0"
    return None


@dataclass(frozen=True)
class Reservation:
    """Resources one job holds on one node."""

    job_name: str
    node_id: str
    cpus: float
    gpus: int
    owner: str = ""  # the Ray job id of the driver holding it; "" = unknown
    memory_gb: float = 0.0  # host RAM its workers there asked for (JobSpec.min_host_memory_gb)


# Health of a node as the scheduler sees it, from the age of its last heartbeat.
HEALTHY, SUSPECT, DEAD = "healthy", "suspect", "dead"



def name_tokens(gpu_name: str) -> set[str]:
    """The upper-case alphanumeric tokens of a device name ("NVIDIA A100-SXM4-80GB" ->
    {"NVIDIA", "A100", "SXM4", "80GB"})."""
    return set(re.split(r"[^A-Z0-9]+", gpu_name.upper()))


@functools.lru_cache(maxsize=1024)  # (a rejection explains every node, each GPU's name: a
def accelerator_family(gpu_name: str) -> str:  # victim search parsed 2.4 M names per pass)
    """The family of a GPU name as NVML or a label gives it ("NVIDIA A100-SXM4-80GB" -> "A100");
    "" when the name matches no known family. A family must be a whole token of the name: by
    substring, "NVIDIA L40" read as L4 and "NVIDIA GH200" as H200. A MIG slice ("NVIDIA
    A100-SXM4-80GB MIG 1g.10gb") is none: it has a fraction of the board's compute, so it
    must not take jobs that ask for the board's family, nor lend it its speed or peak."""
    tokens = {ACCELERATOR_ALIASES.get(t, t) for t in name_tokens(gpu_name)}
    if "MIG" in tokens:
        return ""
    return next((family for family in ACCELERATOR_FAMILIES if family in tokens), "")


def gpu_families(gpus: Iterable[GpuInfo]) -> list[str]:
    """The accelerator families of a node's GPUs, sorted ("" for a name of no known family)."""
    return sorted({accelerator_family(g.name) for g in gpus})


def node_family(families: list[str]) -> str:
    """The accelerator family of a node whose GPUs are of `families` (gpu_families): their
    one family; "" for none, an unknown one, or several. Ray hands a worker any of a node's
    GPUs, not the one a job named, so a node with an A100 and a T4 can promise neither: jobs
    that name families do not go there, those that name none may (the scheduler treats it as
    GPUs of no known family)."""
    return families[0] if len(families) == 1 else ""


class ClusterState:
    """Latest report per node, heartbeat ages, reservations, and a columnar NodeTable of the
    same facts for fast placement.

    Reservations are the source of truth for what is held; the table's reserved columns are
    derived from them and kept in step by reserve/release."""

    def __init__(self, suspect_after_s: float = 15.0, dead_after_s: float = 60.0,
                 inter_group_gbps: float = 1.25,
                 max_load_per_cpu: float = math.inf) -> None:
        if not 0 < suspect_after_s <= dead_after_s:
            raise ValueError(f"need 0 < suspect_after_s ({suspect_after_s}) <= dead_after_s "
                             f"({dead_after_s})")
        self.suspect_after_s = suspect_after_s
        self.dead_after_s = dead_after_s
        # Assumed bandwidth between nodes of different network groups when not measured
        # (1.25 GB/s = 10 GbE, the slowest link a training cluster commonly has).
        self.inter_group_gbps = inter_group_gbps
        # Nodes busier than this (1-min load average per CPU) take no new workers; off by
        # default since a node's own training workers raise its load.
        self.max_load_per_cpu = max_load_per_cpu
        self.reports: dict[str, NodeReport] = {}
        self.last_seen: dict[str, float] = {}
        self.dead: set[str] = set()  # declared dead by Ray or by missed heartbeats
        self.silent: set[str] = set()  # of those, the ones dead by missed heartbeats only
        # When each dead node was first seen dead by a dead_past call (not saved: a restarted
        # scheduler counts from its first pass), to forget it once dead long enough.
        self.dead_since: dict[str, float] = {}
        # Nodes a job's driver could not reach (a failed TCP probe), with why: they take no new
        # work until their next report, but keep what they hold; a blip is not a death.
        self.suspected: dict[str, str] = {}
        # Reservations dropped from nodes declared dead by silence alone, by node: re-applied
        # if the node reports again.
        self.silent_reservations: dict[str, list[Reservation]] = {}
        self.reservations: dict[str, tuple[Reservation, ...]] = {}
        # Counts the changes to `reservations` (all made by _set_reservations): what is
        # derived from them all may be kept until it moves (SchedulerCore._busy_worker_nodes).
        self.reservations_changed = 0
        self.table = NodeTable()
        # A predecessor's estimate of the RAM in use outside the reservations (GiB, and its
        # ram_settling) for nodes not reported to this scheduler yet: set at their first
        # report (restore_ram_outside).
        self.ram_outside_saved: dict[str, tuple[float, int]] = {}

    # -- reports and health -------------------------------------------------------------
    def update(self, report: NodeReport, now: float) -> None:
        is_new = report.node_id not in self.table.index
        self.reports[report.node_id] = report
        self.last_seen[report.node_id] = now
        self.table.upsert(report, now)
        self.suspected.pop(report.node_id, None)  # it answered: no longer suspect
        self.table.suspect[self.table.index[report.node_id]] = False
        if is_new:  # reservations restored before this node's first report now count
            for held in self.reservations.values():
                for r in held:
                    if r.node_id == report.node_id:
                        self.table.add_reserved(r.node_id, r.cpus, r.gpus, r.memory_gb)
            saved = self.ram_outside_saved.pop(report.node_id, None)
            if saved is not None:  # (the predecessor's estimate, lowered below where less)
                row = self.table.index[report.node_id]
                self.table.ram_outside_gib[row], self.table.ram_settling[row] = saved
        if report.node_id in self.dead:  # a node that reports again is alive again
            self.dead.discard(report.node_id)
            self.dead_since.pop(report.node_id, None)
            self.silent.discard(report.node_id)
            self._revive(report.node_id)  # (after: these count once, as they are set)
        self.table.note_ram_outside(self.table.index[report.node_id])  # (its reservations set)

    def health(self, node_id: str, now: float) -> str:
        if node_id in self.dead:
            return DEAD
        age = now - self.last_seen.get(node_id, float("-inf"))
        if age > self.dead_after_s:
            return DEAD
        return SUSPECT if age > self.suspect_after_s or node_id in self.suspected else HEALTHY

    def health_reason(self, node_id: str, now: float) -> str | None:
        """Why a node may not take new work now, or None when it is healthy."""
        health = self.health(node_id, now)
        if health == HEALTHY:
            return None
        if node_id in self.dead and node_id not in self.silent:
            return "dead: Ray reports the node gone"
        if node_id in self.suspected:
            return f"suspect: {self.suspected[node_id]} (takes no new work until it reports)"
        if node_id not in self.last_seen:  # dead by silence before the scheduler restarted
            return f"{health}: no heartbeat since the scheduler (re)started"
        age = now - self.last_seen[node_id]
        limit = self.dead_after_s if health == DEAD else self.suspect_after_s
        return f"{health}: no heartbeat for {age:.0f}s (limit {limit:.0f}s)"

    def mark_suspect(self, node_id: str, reason: str) -> bool:
        """Something failed to reach the node (not Ray, not its heartbeat): it takes no new
        work until it reports again, and keeps its reservations. False for unknown or dead
        nodes (nothing to do)."""
        if node_id not in self.reports or node_id in self.dead:
            return False
        self.suspected[node_id] = reason
        self.table.suspect[self.table.index[node_id]] = True
        return True

    def mark_dead(self, node_id: str) -> list[str]:
        """Ray says the node is gone: exclude it and drop what was reserved on it for good.
        Returns the jobs that lost a reservation there."""
        if node_id in self.reports:
            self.dead.add(node_id)
            self.table.set_dead(node_id, True)
        self.silent.discard(node_id)
        if self.suspected.pop(node_id, None) is not None:
            self.table.suspect[self.table.index[node_id]] = False
        self.silent_reservations.pop(node_id, None)
        return [job for job, _ in self._drop_reservations_on({node_id})]

    def expire(self, now: float) -> tuple[list[str], list[str]]:
        """Declare nodes dead whose heartbeat is older than dead_after_s and release what was
        reserved on them. Returns (nodes newly dead, jobs that lost a reservation).

        Only the heartbeat is known to be gone, not the node: what was reserved there is kept
        aside and re-applied if the node reports again (its workers may still be running),
        so a node that comes back is never handed out twice."""
        newly_dead = [n for n in self.reports
                      if n not in self.dead and now - self.last_seen[n] > self.dead_after_s]
        for node_id in newly_dead:
            self.dead.add(node_id)
            self.silent.add(node_id)  # its agent went quiet: said so, not "Ray reports it gone"
            self.table.set_dead(node_id, True)
        dropped = self._drop_reservations_on(set(newly_dead))
        for job, reservation in dropped:
            self.silent_reservations.setdefault(reservation.node_id, []).append(reservation)
        return newly_dead, sorted({job for job, _ in dropped})

    def dead_past(self, now: float, retention_s: float) -> list[str]:
        """Nodes dead for good (Ray's word, or silent and then no longer listed by Ray: not
        silent only, which may report again) for longer than `retention_s`, counted from
        the first call that saw them dead: candidates to forget (SchedulerCore decides)."""
        if len(self.dead) != len(self.dead_since):  # (dead_since's nodes are all dead)
            for node in self.dead - self.dead_since.keys():
                self.dead_since[node] = now
        due = []
        for node, since in self.dead_since.items():  # in the order they were seen dead
            if now - since <= retention_s:
                break
            if node not in self.silent:
                due.append(node)
        return due

    def forget(self, nodes: Iterable[str]) -> None:
        """Forget dead nodes for good: their reports, health records and table rows. The
        caller makes sure nothing holds or keeps aside anything on them."""
        nodes = set(nodes)
        for node in nodes:
            self.reports.pop(node, None)
            self.last_seen.pop(node, None)
            self.suspected.pop(node, None)
            self.silent_reservations.pop(node, None)
            self.dead_since.pop(node, None)
            self.ram_outside_saved.pop(node, None)
        self.dead -= nodes
        self.silent -= nodes
        self.table.remove(nodes)

    def _drop_reservations_on(self, nodes: set[str]) -> list[tuple[str, Reservation]]:
        dropped = []
        if not nodes:  # the common case (every tick): no pass over the reservations
            return dropped
        for job, held in list(self.reservations.items()):
            kept = tuple(r for r in held if r.node_id not in nodes)
            dropped += [(job, r) for r in held if r.node_id in nodes]
            if len(kept) != len(held):
                self._set_reservations(job, kept)
        return dropped

    def _revive(self, node_id: str) -> None:
        """A node declared dead by silence reports again: its jobs' reservations come back
        (for jobs still holding any)."""
        for r in self.silent_reservations.pop(node_id, []):
            if r.job_name in self.reservations:
                self._set_reservations(r.job_name, self.reservations[r.job_name] + (r,))

    def placeable(self, now: float) -> np.ndarray:
        """Per table row: may the node take new work now (alive, reporting, not suspect, not
        overloaded)?"""
        t = self.table
        n = len(t)
        return (~t.dead[:n] & ~t.suspect[:n] & (now - t.last_seen[:n] <= self.suspect_after_s)
                & (t.load[:n] <= self.max_load_per_cpu))

    # -- reservations ---------------------------------------------------------------------
    def reserved_on(self, node_id: str) -> tuple[float, int]:
        """(CPUs, GPUs) reserved on a node by all placed jobs."""
        row = self.table.index.get(node_id)
        if row is None:
            return 0.0, 0
        return float(self.table.reserved_cpus[row]), int(self.table.reserved_gpus[row])

    def reserved_memory_on(self, node_id: str) -> float:
        """Host RAM (GiB) the workers placed on a node asked for."""
        row = self.table.index.get(node_id)
        return 0.0 if row is None else float(self.table.reserved_memory_gib[row])

    def outside_on(self, node_id: str) -> tuple[float, int]:
        """(CPUs, GPUs) a node's Ray work that the scheduler did not place holds."""
        row = self.table.index.get(node_id)
        if row is None:
            return 0.0, 0
        return float(self.table.outside_cpus[row]), int(self.table.outside_gpus[row])

    def set_ray_usage(self, node_id: str, used_cpus: float, used_gpus: float,
                      unstarted: tuple[float, int] = (0.0, 0)) -> None:
        """What Ray says is in use on a node. Beyond what this scheduler reserved there, it is
        held by work the scheduler did not place (Serve replicas, other users' tasks) and is
        not free, whatever the reservations say. `unstarted`: the part of the reservations
        whose workers may not run yet (a job just placed, a migration claim). Netted against
        those, the outside work looked smaller than it is (a Serve replica's GPU was handed
        out twice), so it is never lowered below what the other reservations leave of
        Ray's usage, nor raised by them (a job that did start counts as outside until then)."""
        row = self.table.index.get(node_id)
        if row is None:
            return
        t = self.table
        # Whole GPUs: a fraction held (a Serve replica on half a GPU) keeps that GPU from a
        # worker needing a whole one (round() gave 0.5 -> 0 and 2.5 -> 2).
        used = (used_cpus, math.ceil(used_gpus - 1e-9))
        reserved = (float(t.reserved_cpus[row]), int(t.reserved_gpus[row]))
        before = (float(t.outside_cpus[row]), int(t.outside_gpus[row]))
        outside = [max(0, u - r) for u, r in zip(used, reserved)]
        for i, waiting in enumerate(unstarted):
            if waiting:
                outside[i] = max(outside[i], min(before[i], used[i] - (reserved[i] - waiting)))
        t.outside_cpus[row], t.outside_gpus[row] = max(0.0, outside[0]), max(0, outside[1])

    def reserve(self, job_name: str, reservations: Iterable[Reservation]) -> None:
        if job_name in self.reservations:
            raise ValueError(f"job '{job_name}' already holds a reservation; release it first")
        self._set_reservations(job_name, tuple(reservations))

    def release(self, job_name: str) -> bool:
        if job_name not in self.reservations:
            return False
        self._set_reservations(job_name, ())
        del self.reservations[job_name]
        return True

    def release_orphans(self, dead_owners: set[str]) -> list[str]:
        """Release reservations whose owner (a driver) is known to be dead: a driver killed
        before its `finally` ran must not hold resources forever. Returns the jobs released."""
        orphaned = [job for job, held in self.reservations.items()
                    if any(r.owner and r.owner in dead_owners for r in held)]
        for job in orphaned:
            self.release(job)
        return orphaned

    def _set_reservations(self, job_name: str, held: tuple[Reservation, ...]) -> None:
        self.reservations_changed += 1
        for r in self.reservations.get(job_name, ()):
            self.table.add_reserved(r.node_id, -r.cpus, -r.gpus, -r.memory_gb)
        self.reservations[job_name] = held
        for r in held:
            self.table.add_reserved(r.node_id, r.cpus, r.gpus, r.memory_gb)

    # -- bandwidth ------------------------------------------------------------------------
    def pair_bandwidth_gbps(self, a: str, b: str) -> float:
        """Bandwidth between two nodes: the declared bandwidth of a network group both are in;
        else what the agents measured (the slower direction); else inter_group_gbps.

        Declared wins over measured because the agents measure through Ray's object store,
        which on fast fabrics (NVLink, 400 Gb/s InfiniBand) is far below the link itself;
        measurement is what we know where the operator declared nothing. (The rule itself is
        NodeTable.known_links; this is links_gbps for one pair.)"""
        t = self.table
        return float(self.links_gbps(t.index[a], np.array([t.index[b]]))[0])

    def links_gbps(self, row: int, rows: np.ndarray) -> np.ndarray:
        """Bandwidth from the node in table row `row` to the node in each of `rows`: its known
        link (declared or measured) where it has one, else inter_group_gbps."""
        peers, gbps = self.table.known_links(row)
        out = np.full(len(rows), self.inter_group_gbps)
        if len(peers):
            by_row = np.argsort(peers)
            at = by_row[np.minimum(np.searchsorted(peers, rows, sorter=by_row), len(peers) - 1)]
            hit = peers[at] == rows
            out[hit] = gbps[at[hit]]
        return out

    # -- persistence ----------------------------------------------------------------------
    def reservations_to_dict(self) -> dict:
        return {job: [dataclasses.asdict(r) for r in held]
                for job, held in self.reservations.items()}

    def restore_reservations(self, data: dict) -> list[str]:
        """Reload reservations persisted by reservations_to_dict (after a scheduler restart),
        job by job: one that cannot be read is skipped and named, the others kept. Fields a
        newer version added are ignored."""
        problems = []
        for job, held in data.items():
            try:
                records = saved_reservations(held)
            except Exception as e:
                problems.append(f"cannot restore the reservations of {job!r}, skipping them: "
                                f"{type(e).__name__}: {e}")
                continue
            self.release(job)
            self.reserve(job, records)
        return problems

    def forget_silent(self, job_name: str) -> None:
        """The job stopped: what was kept aside for it on silent nodes is no longer its."""
        for node in list(self.silent_reservations):
            kept = [r for r in self.silent_reservations[node] if r.job_name != job_name]
            if kept:
                self.silent_reservations[node] = kept
            else:
                del self.silent_reservations[node]

    def silence_to_dict(self) -> dict:
        """Nodes declared dead by silence alone and the reservations kept aside for them: a
        restarted scheduler must still give those back if the node reports again."""
        return {node: [dataclasses.asdict(r) for r in held]
                for node, held in self.silent_reservations.items()}

    def silent_reports_to_dict(self) -> dict:
        """The last report of each node dead by silence alone, and when it came: what it
        holds still counts for the jobs only it makes possible (see SchedulerCore
        _silent_alive), so a restarted scheduler, which hears nothing from it, needs it."""
        return {node: {"last_seen": self.last_seen[node],
                       "report": dataclasses.asdict(self.reports[node])}
                for node in sorted(self.silent) if node in self.reports}

    def restore_silent_reports(self, data: dict) -> list[str]:
        """Reload silent_reports_to_dict's record before restore_silence (a node already
        dead by then would be revived by its report): each node's row as its last report
        left it, dead by silence until it reports again. Node by node: one that cannot be
        read is named and skipped (its jobs are judged without it). The problems met."""
        problems = []
        for node, record in data.items():
            try:
                report, last_seen = saved_silent_report(node, record)
            except Exception as e:
                problems.append(f"cannot restore the last report of silent node {node!r}, "
                                f"skipping it: {type(e).__name__}: {e}")
                continue
            if node in self.reports:
                continue  # it reported since: that report stands
            estimate = self.ram_outside_saved.get(node)
            self.update(report, last_seen)
            if estimate is not None:  # (made from this report: not counted again, settling)
                row = self.table.index[node]
                self.table.ram_outside_gib[row], self.table.ram_settling[row] = estimate
            self.dead.add(node)
            self.silent.add(node)
            self.table.set_dead(node, True)
        return problems

    def ram_outside_to_dict(self) -> dict:
        """The estimate of the RAM in use outside the reservations (NodeTable
        note_ram_outside) of each node where it matters after a restart: one holding RAM
        reservations, or settling after a release (a node first seen holding reservations
        would start from none, and the system's use not yet visible in the measured figure
        was handed out once), or keeping RAM reservations aside while silent (once back,
        the last report's use, its workers' included, was taken for use outside). Nodes not
        reported yet keep their predecessor's figure."""
        t = self.table
        held = {r.node_id for rs in (*self.reservations.values(),
                                     *self.silent_reservations.values())
                for r in rs if r.memory_gb}
        saved = {node: {"gib": gib, "settling": settling}
                 for node, (gib, settling) in self.ram_outside_saved.items() if node in held}
        for node, row in t.index.items():
            if t.reserved_memory_gib[row] > 1e-9 or t.ram_settling[row] or node in held:
                saved[node] = {"gib": t.ram_outside_gib.item(row),
                               "settling": t.ram_settling.item(row)}
        return saved

    def restore_ram_outside(self, data: dict) -> list[str]:
        """Reload ram_outside_to_dict's record, node by node (one that cannot be read is named
        and skipped: its estimate starts from none, as before it was saved); set at each
        node's first report. The problems met."""
        problems = []
        for node, record in data.items():
            try:
                gib, settling = (record.get("gib"), record.get("settling")) \
                    if isinstance(record, dict) else (record, None)
                if not (is_number(gib) and gib >= 0):
                    raise ValueError(f"its gib is {gib!r:.60}, not a number >= 0")
                if not (isinstance(settling, int) and not isinstance(settling, bool)
                        and settling >= 0):
                    raise ValueError(f"its settling is {settling!r:.60}, not an integer >= 0")
            except ValueError as e:
                problems.append(f"cannot restore the RAM in use outside the reservations of "
                                f"node {node!r}, skipping it: {e}")
                continue
            self.ram_outside_saved[node] = (float(gib), min(settling, RAM_SETTLE_REPORTS))
        return problems

    def restore_silence(self, data: dict) -> list[str]:
        """Reload silence_to_dict's record: each node counts as dead until it reports again,
        when its reservations come back (as before the restart). Node by node: one that
        cannot be read is named and skipped. Returns the problems met."""
        problems = []
        for node, held in data.items():
            try:
                self.silent_reservations[node] = saved_reservations(held)
            except Exception as e:
                problems.append(f"cannot restore what silent node {node!r} held, skipping "
                                f"it: {type(e).__name__}: {e}")
                continue
            self.dead.add(node)
            self.silent.add(node)
        return problems


def saved_silent_report(node: str, record: object) -> tuple[NodeReport, float]:
    """A silent node's saved last report and when it came, every field checked (and the
    report as a live one is, report_problem); ValueError naming what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"a JSON {type(record).__name__}, not an object")
    last_seen = record.get("last_seen")
    if isinstance(last_seen, bool) or not isinstance(last_seen, (int, float)) \
            or not math.isfinite(last_seen):
        raise ValueError(f"its last_seen is {last_seen!r:.60}, not a number")
    fields = saved_fields(NodeReport, record.get("report"), "its report")
    fields["gpus"] = tuple(GpuInfo(**saved_fields(GpuInfo, gpu, f"its report's gpus[{i}]"))
                           for i, gpu in enumerate(fields.get("gpus", ())))
    report = NodeReport(**fields)
    if report.node_id != node:
        raise ValueError(f"its report is node {report.node_id!r:.60}'s")
    problem = report_problem(report)
    if problem:
        raise ValueError(f"its report: {problem}")
    return report, float(last_seen)


def saved_reservations(held: object) -> list[Reservation]:
    """A job's (or a silent node's) reservations from saved state, every field checked."""
    if not isinstance(held, list):
        raise ValueError(f"a JSON {type(held).__name__}, not a list of reservations")
    reservations = [Reservation(**saved_fields(Reservation, r, "a reservation")) for r in held]
    # (typed right, yet no amount held: -2 CPUs handed out two a job holds; inf held the
    # node for ever)
    for r in reservations:
        for amount in ("cpus", "gpus", "memory_gb"):
            value = getattr(r, amount)
            if not (is_number(value) and value >= 0):  # (finite: is_number)
                raise ValueError(f"a reservation's {amount} is {value!r}, not a number >= 0")
    return reservations


class NodeTable:
    """The placement-relevant facts of every node as numpy columns, one row per node, so a
    placement over 10,000 nodes is a handful of vector operations rather than a Python loop.
    Rows are appended as nodes appear; they move only when nodes are forgotten (remove), the
    others closing up in their order."""

    _GROW = 64
    _GPU_COLUMNS = ("gpu_free_gib", "gpu_total_gib")  # one column per GPU slot
    _ROW_COLUMNS = ("cpus", "gpus", "family", "load", "group", "group_gbps", "speed", "dead",
                    "suspect", "reserved_cpus", "reserved_gpus", "outside_cpus",
                    "outside_gpus", "ram_total_gib", "ram_available_gib",
                    "reserved_memory_gib", "ram_outside_gib", "ram_settling", "last_seen",
                    *_GPU_COLUMNS)

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.index: dict[str, int] = {}
        self.groups: dict[str, int] = {}  # network group name -> code
        self._next_group = 0  # (codes are never reused: a forgotten node's own group goes)
        self.families: dict[str, int] = {"": 0}  # accelerator family -> code (0 = none)
        n, g = self._GROW, 1
        self.cpus = np.zeros(n)
        self.gpus = np.zeros(n, dtype=np.int64)
        self.gpu_free_gib = np.full((n, g), -np.inf)  # per GPU slot; -inf pads missing GPUs
        self.gpu_total_gib = np.full((n, g), -np.inf)
        self.family = np.zeros(n, dtype=np.int64)
        self.load = np.zeros(n)
        self.last_seen = np.full(n, -np.inf)
        self.group = np.zeros(n, dtype=np.int64)
        self.group_gbps = np.zeros(n)
        self.speed = np.zeros(n)  # relative accelerator speed (0 for CPU-only nodes)
        self.dead = np.zeros(n, dtype=bool)
        self.suspect = np.zeros(n, dtype=bool)  # unreachable by a driver: no new work for now
        self.reserved_cpus = np.zeros(n)
        self.reserved_gpus = np.zeros(n, dtype=np.int64)
        # Held by Ray work this scheduler did not place (ClusterState.set_ray_usage).
        self.outside_cpus = np.zeros(n)
        self.outside_gpus = np.zeros(n, dtype=np.int64)
        # Host RAM (GiB): what the node's agent reports in all (inf while its host probe
        # fails: not known) and available now, and what the workers placed there asked for
        # (JobSpec.min_host_memory_gb).
        self.ram_total_gib = np.zeros(n)
        self.ram_available_gib = np.zeros(n)
        self.reserved_memory_gib = np.zeros(n)
        # ... and what is in use outside those reservations (the system's own, work that
        # states no RAM), as estimated: see note_ram_outside.
        self.ram_outside_gib = np.zeros(n)
        # Reports left, after RAM reserved there was released, during which that estimate is
        # not raised (the released workers' RAM may still show in use: RAM_SETTLE_REPORTS).
        self.ram_settling = np.zeros(n, dtype=np.int64)
        # Measured bandwidth, kept sparse (each agent measures a few peers, so a dense matrix
        # would be 10,000 x 10,000 for nothing): what each row's report measured, who measured
        # each node, and the rows with any measurement at all.
        self._measured_from: dict[int, dict[str, float]] = {}  # row -> {peer id: GB/s}
        self._measured_to: dict[str, dict[int, float]] = {}  # node id -> {measuring row: GB/s}
        self.measuring: set[int] = set()
        # Caches of known_links and of each group's rows, dropped when what they derive from
        # changes (a report with new labels or new measurements), not on every heartbeat.
        self._links: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._group_rows: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def _row(self, node_id: str) -> int:
        row = self.index.get(node_id)
        if row is not None:
            return row
        row = len(self.ids)
        if row == len(self.cpus):
            self._grow_rows(len(self.cpus) * 2)
        self.ids.append(node_id)
        self.index[node_id] = row
        return row

    def _fill(self, name: str) -> float:
        """What a column holds in a row no node has."""
        return -np.inf if name == "last_seen" or name in self._GPU_COLUMNS else 0

    def _grow_rows(self, n: int) -> None:
        for name in self._ROW_COLUMNS:
            old = getattr(self, name)
            new = np.full((n,) + old.shape[1:], self._fill(name), dtype=old.dtype)
            new[:len(old)] = old
            setattr(self, name, new)

    def remove(self, node_ids: Iterable[str]) -> None:
        """Drop the rows of nodes forgotten for good (ClusterState.forget). The other rows
        close up in their order (the order first-fit walks); every column, the index, the
        measured bandwidths and the caches keyed by row follow them, and the freed rows at
        the end are as a new row expects them."""
        gone = sorted(self.index[n] for n in set(node_ids) if n in self.index)
        if not gone:
            return
        n = len(self.ids)
        keep = np.ones(n, dtype=bool)
        keep[gone] = False
        new_row = np.cumsum(keep) - 1  # old row -> new row (for the rows kept)
        left = n - len(gone)
        for name in self._ROW_COLUMNS:
            column = getattr(self, name)
            column[:left] = column[:n][keep]
            column[left:n] = self._fill(name)
        gone_ids = {self.ids[row] for row in gone}
        self.ids[:] = [node for node in self.ids if node not in gone_ids]  # (in place: both
        self.index.clear()  # are shared, as by a pass's _HeadRoom)
        self.index.update((node, row) for row, node in enumerate(self.ids))
        for node in gone_ids:  # a node without a network-group label was a group of its own
            self.groups.pop(f"node:{node}", None)
        gone_rows = set(gone)
        self._measured_from = {int(new_row[r]): peers for r, peers in self._measured_from.items()
                               if r not in gone_rows}
        for node in list(self._measured_to):
            by = {int(new_row[r]): v for r, v in self._measured_to[node].items()
                  if r not in gone_rows}
            if by or node not in gone_ids:  # (kept while a live node's report names it)
                self._measured_to[node] = by
            else:
                del self._measured_to[node]
        self.measuring = {int(new_row[r]) for r in self.measuring if r not in gone_rows}
        self._links.clear()
        self._group_rows.clear()

    def upsert(self, report: NodeReport, now: float) -> None:
        is_new = report.node_id not in self.index
        row = self._row(report.node_id)
        self.cpus[row] = report.ray_cpus
        self.gpus[row] = int(report.ray_gpus)
        # A failed host probe reports no RAM (probes.host_figures): none to hand out now, but
        # no bound either for "would it fit the idle cluster?" (a job is not refused for it).
        host_failed = "host" in report.probe_errors
        self.ram_total_gib[row] = math.inf if host_failed else report.ram_total_bytes / GIB
        self.ram_available_gib[row] = 0.0 if host_failed else report.ram_available_bytes / GIB
        # (-inf, as a missing slot's, for a GPU that holds nothing: no job fits there)
        for name, values in (("gpu_free_gib", [-np.inf if g.holds_nothing else g.memory_free_gb
                                               for g in report.gpus]),
                             ("gpu_total_gib", [-np.inf if g.holds_nothing
                                                else g.memory_total_bytes / GIB
                                                for g in report.gpus])):
            column = getattr(self, name)
            if len(values) > column.shape[1]:
                wider = np.full((len(self.cpus), len(values)), -np.inf)
                wider[:, :column.shape[1]] = column
                column = wider
                setattr(self, name, column)
            column[row] = -np.inf
            column[row, :len(values)] = values
        families = gpu_families(report.gpus)
        self.family[row] = self.families.setdefault(node_family(families), len(self.families))
        # A node's pace is its slowest GPU's (several families: Ray may hand out any).
        self.speed[row] = min((ACCELERATOR_SPEED.get(f, 1.0) for f in families), default=0.0)
        self.load[row] = report.load_per_cpu
        self.last_seen[row] = now
        # Nodes without a network-group label are each a group of their own.
        group = report.labels.get(LABEL_NETWORK_GROUP) or f"node:{report.node_id}"
        code = self.groups.get(group)
        if code is None:
            code = self.groups[group] = self._next_group
            self._next_group += 1
        self._set_network(row, is_new, code,
                          _float_label(report.labels, LABEL_NETWORK_GBPS), report.bandwidth_gbps)
        self.dead[row] = False

    # -- bandwidth --------------------------------------------------------------------------
    def _set_network(self, row: int, is_new: bool, group: int, gbps: float,
                     measured: dict[str, float]) -> None:
        if is_new or self.group[row] != group or self.group_gbps[row] != gbps:
            # Declared links of whole groups change: rare (a node joins or is relabelled).
            self._links.clear()
            self._group_rows.clear()
        self.group[row] = group
        self.group_gbps[row] = gbps
        before = self._measured_from.get(row, {})
        if not is_new and measured == before:
            return
        for peer in before.keys() - measured.keys():
            self._measured_to[peer].pop(row, None)
        for peer, value in measured.items():
            self._measured_to.setdefault(peer, {})[row] = value
        self._measured_from[row] = dict(measured)
        # Links change for this row, for the peers it measures or stopped measuring, and, for
        # a node new to the table, for those that measured it before it first reported.
        changed = {row, *self._measured_to.get(self.ids[row], {})}
        changed.update(self.index[p] for p in before.keys() | measured.keys() if p in self.index)
        for r in changed:
            self._links.pop(r, None)
            if self._measured_from.get(r) or self._measured_to.get(self.ids[r]):
                self.measuring.add(r)
            else:
                self.measuring.discard(r)

    def declared_gbps(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Declared bandwidth between the nodes of rows `a` and `b` (broadcast): the lower of
        the two nodes' declared figures when both are in one network group, else 0 (none
        declared). Two labels of one group may disagree: the lower is trusted."""
        return np.where(self.group[a] == self.group[b],
                        np.minimum(self.group_gbps[a], self.group_gbps[b]), 0.0)

    def group_rows(self, group: int) -> np.ndarray:
        """The rows of one network group."""
        rows = self._group_rows.get(group)
        if rows is None:
            rows = self._group_rows[group] = np.flatnonzero(self.group[:len(self)] == group)
        return rows

    def known_links(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, GB/s), fastest first: every node with a declared or measured link to the
        node in `row`, and that link's bandwidth. Every other node is inter-group from it
        (ClusterState.inter_group_gbps).

        Declared: see declared_gbps. Measured: the slower direction of what the two agents
        measured. Declared wins (see ClusterState.pair_bandwidth_gbps)."""
        cached = self._links.get(row)
        if cached is not None:
            return cached
        measured: dict[int, float] = {}
        for peer, value in self._measured_from.get(row, {}).items():
            peer_row = self.index.get(peer)
            if peer_row is not None and peer_row != row:
                measured[peer_row] = value
        for peer_row, value in self._measured_to.get(self.ids[row], {}).items():
            if peer_row != row:
                measured[peer_row] = min(value, measured.get(peer_row, math.inf))
        rows = np.fromiter(measured, dtype=np.int64, count=len(measured))
        gbps = np.fromiter(measured.values(), dtype=float, count=len(measured))
        if self.group_gbps[row] > 0:
            members = self.group_rows(int(self.group[row]))
            declared = self.declared_gbps(row, members)
            keep = (declared > 0) & (members != row)
            members, declared = members[keep], declared[keep]
            undeclared = ~np.isin(rows, members)
            rows = np.concatenate([members, rows[undeclared]])
            gbps = np.concatenate([declared, gbps[undeclared]])
        order = np.lexsort((rows, -gbps))  # fastest first; by row among equals
        self._links[row] = rows[order], gbps[order]
        return self._links[row]

    def note_ram_outside(self, row: int) -> None:
        """Estimate a row's host RAM in use outside the reservations (the system's own, work
        that states no RAM) from its last report: all its use while nothing is reserved there;
        while something is, the figure from when nothing was, or the whole use where that is
        less. Which part of the use is a reserved worker's the figure does not say: RAM in use
        before a job's workers started thus still counts once they use theirs, and their use
        is not counted beside their reservation (free_host_memory). A node first seen with
        reservations (a restart) starts from none: what they leave of the use. While its host
        probe fails (total not finite) the last estimate stands. For RAM_SETTLE_REPORTS
        reports after RAM reserved there was released it is not raised: the released
        workers' RAM still in use was taken for use outside, and kept while the next job ran
        (min), so a job its room held waited."""
        total = self.ram_total_gib.item(row)  # (.item: ~4x faster than [row])
        if total == math.inf:
            return
        settling = self.ram_settling.item(row)
        if settling:
            self.ram_settling[row] = settling - 1
        in_use = max(total - self.ram_available_gib.item(row), 0.0)
        self.ram_outside_gib[row] = (
            in_use if self.reserved_memory_gib.item(row) <= 1e-9 and not settling
            else min(self.ram_outside_gib.item(row), in_use))

    def taken(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Per row, CPUs and GPUs not free: reserved by placed jobs, or held by Ray work the
        scheduler did not place."""
        return (self.reserved_cpus[:n] + self.outside_cpus[:n],
                self.reserved_gpus[:n] + self.outside_gpus[:n])

    def set_dead(self, node_id: str, dead: bool) -> None:
        self.dead[self.index[node_id]] = dead

    def add_reserved(self, node_id: str, cpus: float, gpus: int,
                     memory_gb: float = 0.0) -> None:
        row = self.index.get(node_id)
        if row is not None:  # a reservation restored before its node re-reported
            self.reserved_cpus[row] += cpus
            self.reserved_gpus[row] += gpus
            if memory_gb:
                self.reserved_memory_gib[row] += memory_gb
                if memory_gb < 0:  # (released: its workers' RAM may show in use a while)
                    self.ram_settling[row] = RAM_SETTLE_REPORTS

    def group_of(self, node_id: str) -> int | None:
        row = self.index.get(node_id)
        return None if row is None else int(self.group[row])

    def group_gbps_of(self, node_id: str) -> float:
        return float(self.group_gbps[self.index[node_id]])


def check_network_labels(labels: dict[str, str]) -> None:
    """Raise ValueError naming the label when the network-group bandwidth label is not a
    positive finite number (placement then ignores it, treating the group as undeclared)."""
    raw = labels.get(LABEL_NETWORK_GBPS)
    if raw is None:
        return
    value = _number(raw)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"node label {LABEL_NETWORK_GBPS}={raw!r}: must be a positive number "
                         "of GB/s; ignored")


def _number(label_value: str) -> float:
    """A label's value as a number, NaN when it is none (which every range check refuses).
    Read by validation.parse_number, as the autoscaler's node types read the same labels:
    float() took `1_0` as 10 GPUs, other scripts' digits and spaces around."""
    try:
        return float(parse_number(label_value))
    except (TypeError, ValueError):
        return math.nan


def _float_label(labels: dict[str, str], key: str) -> float:
    """A positive label's value, 0.0 when it is absent or no positive number
    (check_network_labels says why)."""
    value = _number(labels.get(key) or "0")
    return value if math.isfinite(value) and value > 0 else 0.0


# Node labels an operator sets (`ray start --labels=...`, or `labels=` in
# ray.cluster_utils.Cluster) to declare accelerators NVML cannot see: NPUs, or simulated GPUs
# when modelling a heterogeneous cluster on a laptop.
LABEL_ACCELERATOR_TYPE = "orchestrator.io/accelerator-type"
LABEL_ACCELERATOR_COUNT = "orchestrator.io/accelerator-count"
LABEL_ACCELERATOR_MEMORY_GB = "orchestrator.io/accelerator-memory-gb"
# A node's network group (rack, switch, placement group, NVLink domain...) and the bandwidth
# between nodes inside that group, in GB/s; used where agents have not measured a pair.
LABEL_NETWORK_GROUP = "orchestrator.io/network-group"
LABEL_NETWORK_GBPS = "orchestrator.io/network-gbps"
MAX_DECLARED_ACCELERATORS = 64  # more than any real node has: a typo, not a machine


def declared_gpus(labels: dict[str, str], ray_gpus: float = 0.0) -> tuple[GpuInfo, ...]:
    """Accelerators declared by node labels, marked source="declared". Without a count label,
    as many as the whole GPUs Ray was given on the node (`ray_gpus`; placement hands out no
    part of one), at least one (the type label declares one; gpu_count_problem says when Ray
    has none to hand out) and at most MAX_DECLARED_ACCELERATORS: one by default declared a
    single accelerator on a node Ray gave four, and placement refused a 2-GPU worker there.

    Raises ValueError naming the label when a value is malformed."""
    name = labels.get(LABEL_ACCELERATOR_TYPE)
    if not name:
        return ()
    count_label = labels.get(LABEL_ACCELERATOR_COUNT)
    count = float(min(max(int(ray_gpus), 1), MAX_DECLARED_ACCELERATORS)) \
        if count_label is None else _number(count_label)
    # A whole number written as a decimal ("4.0": YAML or a template may write 4 so) counts.
    if not (count.is_integer() and 0 <= count <= MAX_DECLARED_ACCELERATORS):
        raise ValueError(f"node label {LABEL_ACCELERATOR_COUNT}={count_label!r}: must be a "
                         f"whole number between 0 and {MAX_DECLARED_ACCELERATORS}")
    memory_label = labels.get(LABEL_ACCELERATOR_MEMORY_GB, "0")
    memory_gb = _number(memory_label)
    if not 0 <= memory_gb <= 100_000:  # (NaN fails both)
        raise ValueError(f"node label {LABEL_ACCELERATOR_MEMORY_GB}={memory_label!r}: must be a "
                         "number of GiB between 0 and 100000")
    memory = int(memory_gb * GIB)
    return tuple(GpuInfo(index=i, name=name, memory_total_bytes=memory,
                         memory_free_bytes=memory, source="declared") for i in range(int(count)))


def silent_agent(known: tuple[str, float] | None, actor_id: str, last_seen: float | None,
                 now: float, limit_s: float) -> tuple[tuple[str, float], bool]:
    """For a node whose agent has not reported lately: (what to remember about its agent,
    whether to kill it). `known`: (actor id, silent since) remembered from earlier passes;
    `last_seen`: the node's last report (None: never). An agent seen silent for the first
    time counts as silent since the node's last report (nothing answered since, from this
    agent or an earlier one), or from now if the node never reported (its agent may only be
    starting). Killed once silent for more than `limit_s`; the caller then remembers the new
    agent from now, so it gets as long to report before it could be killed in its turn."""
    if known is None or known[0] != actor_id:
        known = (actor_id, now if last_seen is None else last_seen)
    return known, now - known[1] > limit_s
