"""NodeAgent: one per node, pinned to it; probes the node and reports to the scheduler.

Reports on a timer (the heartbeat) from a daemon thread, and on demand via `report_now`
so a job can make sure the scheduler's view is fresh before it asks for a placement.

It also measures node-to-node bandwidth through the Ray object store, the path training data
and checkpoints actually take: it `ray.put`s a buffer and asks each peer agent to `ray.get` it,
timing the fetch on the peer, at two sizes so that Ray's per-transfer overhead is fitted out
(probes.bandwidth_gbps). Measurements run on their own timer thread and land in every later
report as `bandwidth_gbps`.

Every report is also exported as metrics (orchestrator/metric_catalogue.py: per-GPU memory and
utilization, host load and memory, measured bandwidth), so Prometheus sees each node at the
heartbeat's pace.
"""
from __future__ import annotations

import logging
import math
import random
import threading
import time

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from orchestrator.autoscaling import custom_resources
from orchestrator.inventory import NodeReport, check_network_labels
from orchestrator.metric_catalogue import node_samples
from orchestrator.probes import (BANDWIDTH_DEFAULT_BYTES, BANDWIDTH_JITTER, BandwidthHistory,
                                 bandwidth_gbps, bandwidth_max_age_s, bandwidth_pause_s,
                                 bandwidth_probe_sizes, current_bandwidth, gpu_count_problem,
                                 host_figures, peers_to_measure, probe_gpus, record_bandwidth,
                                 run_probe)
from ray_layer.scheduler_client import NAMESPACE, agent_name, get_agent, get_scheduler
from ray_layer.telemetry import record_all

log = logging.getLogger(__name__)

BANDWIDTH_ROUNDS = 2  # best of 2: the first transfer to a peer can include one-time setup
REPORT_TIMEOUT_S = 30.0  # a report's answer waited for (a scheduler stuck restarting)


# Concurrency groups, so that a long bandwidth measurement (up to timeout x peers when peers
# are down) never delays heartbeats or report_now, and a peer's pull request is served even
# while this agent is measuring itself (two agents measuring each other must not deadlock).
@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1,
            concurrency_groups={"bandwidth": 1, "transfer": 2})
class NodeAgent:
    """The per-node agent (one per node, pinned to it): runs the probes on a timer and reports
    a NodeReport to the scheduler as a heartbeat and on demand."""

    def __init__(self, heartbeat_s: float = 5.0, bandwidth_every_s: float = 60.0,
                 max_bandwidth_peers: int = 8) -> None:
        context = ray.get_runtime_context()
        self.node_id = context.get_node_id()
        self.labels = dict(context.get_node_labels())
        # A node's logical resources are fixed when its raylet starts: read them once.
        node = next(n for n in ray.nodes() if n["NodeID"] == self.node_id)
        self.ray_cpus = float(node["Resources"].get("CPU", 0))
        self.ray_gpus = float(node["Resources"].get("GPU", 0))
        # (its type's custom resources: what the autoscaler counts the node by, SchedulerCore)
        self.custom_resources = {key: float(value) for key, value in
                                 custom_resources(node["Resources"]).items()}
        self.heartbeat_s = heartbeat_s
        self.bandwidth_every_s = bandwidth_every_s
        self.max_bandwidth_peers = max_bandwidth_peers
        # Peer node id -> its last few measurements; reports carry current_bandwidth() of it.
        self._bandwidth: BandwidthHistory = {}
        self._bandwidth_max_age_s = math.inf  # set by each refresh from the cluster's size
        self._last_tried: dict[str, float] = {}  # peer -> when it was last measured or tried
        self._rng = random.Random()
        # One measurement at a time (the timer's and an explicit refresh would compete for the
        # same link); reentrant because refresh_bandwidth holds it around measure_bandwidth.
        self._bandwidth_lock = threading.RLock()
        self._failing_peers: set[str] = set()  # logged once until they answer again
        self._failed_peers_last: set[str] = set()  # a transfer failed in the last measurement
        # Peer -> its pull that timed out and is not answered yet (_time_pull): it holds its
        # object in this node's store, so the peer is sent no other until it answers.
        self._unanswered: dict[str, ray.ObjectRef] = {}
        self._refused = False  # the last report was refused (logged once until one is taken)
        self._stop = threading.Event()
        threading.Thread(target=self._heartbeat, name="node-agent-heartbeat",
                         daemon=True).start()
        # Its own thread, not the heartbeat's: a measurement against dead peers can take
        # timeout x peers, longer than a report may go missing before the node looks stale.
        if bandwidth_every_s > 0:
            threading.Thread(target=self._bandwidth_loop, name="node-agent-bandwidth",
                             daemon=True).start()

    def collect(self) -> NodeReport:
        errors: dict[str, str] = {}
        host = host_figures(errors)
        run_probe("network-labels", lambda: check_network_labels(self.labels), None, errors)
        gpus = probe_gpus(self.labels, errors, self.ray_gpus)
        mismatch = gpu_count_problem(gpus, self.ray_gpus, self.labels)
        if mismatch:
            errors["gpu-count"] = mismatch
        return NodeReport(node_id=self.node_id, ray_cpus=self.ray_cpus, ray_gpus=self.ray_gpus,
                          gpus=gpus, labels=self.labels, probe_errors=errors,
                          bandwidth_gbps=self.bandwidth_figures(),
                          custom_resources=dict(self.custom_resources), **host)

    def bandwidth_figures(self) -> dict[str, float]:
        """{peer node id: GB/s} as reports carry them (recent measurements, smoothed)."""
        return current_bandwidth(self._bandwidth, time.monotonic(), self._bandwidth_max_age_s)

    def report_now(self) -> NodeReport:
        """Measure, export and report now, waiting for the scheduler's answer (what a caller
        bringing the control plane up waits on)."""
        report = self._measured()
        # Bounded: a scheduler stuck restarting must not freeze the caller.
        self._answered(ray.get(get_scheduler().report.remote(report), timeout=REPORT_TIMEOUT_S))
        return report

    def _measured(self) -> NodeReport:
        report = self.collect()
        # Exported before sending: a node whose scheduler is away still shows in Prometheus.
        record_all(node_samples(report))
        return report

    def _answered(self, accepted: bool) -> None:
        if not accepted and not self._refused:  # once per run of refusals
            log.warning("the scheduler refused this agent's report for node %s (the "
                        "scheduler's log says why: a node Ray does not list alive, or a "
                        "malformed figure)", self.node_id[:16])
        self._refused = not accepted

    def _heartbeat(self) -> None:
        """Every beat measures and exports; the report goes without waiting, its answer read
        at a later beat (a slow scheduler's answer took up to 30 s a beat, and the node's
        gauges, unrefreshed past Ray's 20 s, vanished from Prometheus meanwhile). While an
        answer is outstanding, no second report queues behind it; one unanswered for
        REPORT_TIMEOUT_S is given up (a scheduler replaced meanwhile) and a new one sent."""
        pending, sent_at = None, 0.0
        while not self._stop.wait(self.heartbeat_s):
            try:
                report = self._measured()
            except Exception as e:  # (the probes catch their own: this is unexpected)
                log.warning("node agent %s: measuring failed: %s", self.node_id[:12], e)
                continue
            if pending is not None:
                answered = bool(ray.wait([pending], timeout=0)[0])
                if not answered and time.monotonic() - sent_at < REPORT_TIMEOUT_S:
                    continue  # still answering: nothing queued behind it
                pending = self._read_answer(pending, answered)
            try:  # (this beat's report goes now, also after an answer failed or timed out)
                pending, sent_at = get_scheduler().report.remote(report), time.monotonic()
            except Exception as e:  # no scheduler now: try again next beat
                log.warning("node agent %s: heartbeat failed: %s", self.node_id[:12], e)

    def _read_answer(self, pending, answered: bool) -> None:
        """Read a report's answer, or give it up; None: nothing pending any more."""
        try:
            if not answered:
                raise TimeoutError(f"no answer to a report in {REPORT_TIMEOUT_S:g} s")
            self._answered(ray.get(pending))
        except Exception as e:  # a scheduler replaced meanwhile, or stuck
            log.warning("node agent %s: heartbeat failed: %s", self.node_id[:12], e)
        return None

    # --- bandwidth -------------------------------------------------------------------------

    @ray.method(concurrency_group="transfer")
    def pull(self, refs: list, timeout_s: float = 10.0) -> float:
        """Seconds `ray.get` took to fetch refs[0] onto this node. The ref comes wrapped in a
        list so Ray hands it over unresolved: resolving it before the call would hide the
        transfer from the timer."""
        start = time.perf_counter()
        ray.get(refs[0], timeout=timeout_s)
        return time.perf_counter() - start

    @ray.method(concurrency_group="bandwidth")
    def measure_bandwidth(self, peers: dict, nbytes: int = BANDWIDTH_DEFAULT_BYTES,
                          timeout_s: float = 10.0) -> dict[str, float]:
        """{peer node id: GB/s} from this node to each peer agent in `peers` (node id ->
        handle), timing transfers of `nbytes` and of bandwidth_probe_sizes' smaller size. A
        peer none of whose transfers came through is left out, never raised; one whose larger
        transfer failed or timed out gets the smaller's rate (a lower bound) and is named in
        `_failed_peers_last` for record_bandwidth."""
        sizes = bandwidth_probe_sizes(nbytes)
        with self._bandwidth_lock:
            seconds: dict[str, dict[int, list[float | None]]] = {
                node_id: {size: [] for size in sizes} for node_id in peers}
            for _ in range(BANDWIDTH_ROUNDS):
                for node_id, peer in peers.items():
                    for size, times in seconds[node_id].items():
                        if not _failed(seconds[node_id]):  # a failing peer is not retried
                            times.append(self._time_pull(node_id, peer, size, timeout_s))
            self._failed_peers_last = {node_id for node_id, by_size in seconds.items()
                                       if _failed(by_size)}
        measured = {node_id: bandwidth_gbps(times) for node_id, times in seconds.items()}
        return {node_id: gbps for node_id, gbps in measured.items() if gbps is not None}

    @ray.method(concurrency_group="bandwidth")
    def refresh_bandwidth(self, nbytes: int = BANDWIDTH_DEFAULT_BYTES,
                          timeout_s: float = 10.0) -> dict[str, float]:
        """Measure now against up to max_bandwidth_peers other agents; the result also goes
        into every later report. Returns this measurement ({} when no peer answered)."""
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        with self._bandwidth_lock:
            peers = self._peers(alive)
            measured = self.measure_bandwidth(peers, nbytes, timeout_s)
            # One assignment: collect() never sees half an update.
            self._bandwidth = record_bandwidth(self._bandwidth, measured, set(peers), alive,
                                               time.monotonic(), self._failed_peers_last)
            self._last_tried = {node: tried for node, tried in self._last_tried.items()
                                if node in alive}
            self._unanswered = {node: pull for node, pull in self._unanswered.items()
                                if node in alive}
            self._bandwidth_max_age_s = bandwidth_max_age_s(
                len(alive - {self.node_id}), self.max_bandwidth_peers,
                self._longest_period_s(timeout_s))
            self._failing_peers &= alive
        return measured

    def _longest_period_s(self, timeout_s: float) -> float:
        """The longest pause between timed refreshes (jittered up to BANDWIDTH_JITTER) plus the
        longest a refresh can take (every transfer to every sampled peer taking all its
        timeout); 0 when there is no timer."""
        if self.bandwidth_every_s <= 0:
            return 0.0
        transfers = BANDWIDTH_ROUNDS * len(bandwidth_probe_sizes(BANDWIDTH_DEFAULT_BYTES))
        return (self.bandwidth_every_s * (1 + BANDWIDTH_JITTER)
                + transfers * timeout_s * self.max_bandwidth_peers)

    def _time_pull(self, node_id: str, peer, nbytes: int, timeout_s: float) -> float | None:
        """Seconds for one peer to fetch a fresh nbytes object from here, or None on failure.

        A fresh object each time: a peer that already holds a copy would fetch nothing, and a
        copy on a third node could be where Ray fetches from.

        A pull that timed out still holds its object here (the task's argument) until the
        peer answers it; ray.cancel frees nothing of a running or queued actor task. So a
        peer whose last pull is unanswered (a frozen agent) is sent no other, and fails:
        each refresh pinned another 8 MiB in this node's object store until it resumed."""
        import numpy as np

        pull = self._unanswered.pop(node_id, None)
        try:
            if pull is not None and not ray.wait([pull], timeout=0)[0]:
                raise TimeoutError("its pull that timed out before is still unanswered (a "
                                   "frozen agent?): no other sent until it is")
            ref = ray.put(np.ones(nbytes, dtype=np.uint8))
            pull = peer.pull.remote([ref], timeout_s)
            seconds = ray.get(pull, timeout=timeout_s)
        except Exception as e:  # dead, restarting or slow peer: leave it out of this round
            if isinstance(e, TimeoutError) and pull is not None:  # (Ray's GetTimeoutError too)
                self._unanswered[node_id] = pull
            if node_id not in self._failing_peers:
                self._failing_peers.add(node_id)
                log.warning("node agent %s: bandwidth to %s not measured: %s: %s",
                            self.node_id[:12], node_id[:12], type(e).__name__, e)
            return None
        self._failing_peers.discard(node_id)
        return seconds

    def _peers(self, alive: set[str]) -> dict:
        """Handles of other nodes' agents, at most max_bandwidth_peers of them, the stalest
        first so that successive refreshes cover a large cluster."""
        chosen = peers_to_measure(alive - {self.node_id}, self._last_tried,
                                  self.max_bandwidth_peers, self._rng)
        # Chosen counts as tried, agent found or not: nodes whose agents are not up yet must
        # not take every slot, round after round.
        self._last_tried.update(dict.fromkeys(chosen, time.monotonic()))
        peers = {}
        for node_id in chosen:
            try:
                peers[node_id] = get_agent(node_id)
            except ValueError:  # that node's agent is not up yet: measure it next time
                continue
        return peers

    def _bandwidth_loop(self) -> None:
        # First measurement after one heartbeat interval, not a full period: placement wants
        # numbers soon after start. While no peer agent has been found (agents start one by
        # one) keep looking at that pace; once peers exist, answering or not, settle to
        # bandwidth_every_s so dead peers do not turn this into a busy loop of timeouts.
        # Every pause is jittered (bandwidth_pause_s): agents started together measured at the
        # same moments, pulling from one node at once, and under-measured its links.
        soon = min(self.heartbeat_s, self.bandwidth_every_s)
        delay = bandwidth_pause_s(soon, self._rng)
        while not self._stop.wait(delay):
            try:
                self.refresh_bandwidth()
            except Exception as e:  # Ray briefly unreachable: try again next period
                log.warning("node agent %s: bandwidth refresh failed: %s", self.node_id[:12], e)
            found_peers = self._bandwidth or self._failing_peers
            delay = bandwidth_pause_s(self.bandwidth_every_s if found_peers else soon,
                                      self._rng)


def _failed(seconds_by_size: dict[int, list[float | None]]) -> bool:
    """Whether one of a peer's transfers failed or timed out (None)."""
    return any(None in times for times in seconds_by_size.values())


def ensure_agent(node_id: str) -> "ray.actor.ActorHandle":
    """The agent of one node, created if missing (hard affinity: an agent must never drift)."""
    return NodeAgent.options(
        name=agent_name(node_id), namespace=NAMESPACE, lifetime="detached",
        get_if_exists=True,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
    ).remote()
