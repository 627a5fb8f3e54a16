"""NodeAgent: one per node, pinned to it; probes the node and reports to the scheduler.

Reports on a timer (the heartbeat) from a daemon thread, and on demand via `report_now`
so a job can make sure the scheduler's view is fresh before it asks for a placement.
"""
from __future__ import annotations

import logging
import threading

import ray

from actors.probes import probe_gpus, probe_host, run_probe
from actors.scheduler import NAMESPACE, SCHEDULER_NAME
from orchestrator.inventory import NodeReport

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class NodeAgent:
    def __init__(self, heartbeat_s: float = 5.0) -> None:
        context = ray.get_runtime_context()
        self.node_id = context.get_node_id()
        self.labels = dict(context.get_node_labels())
        # A node's logical resources are fixed when its raylet starts: read them once.
        node = next(n for n in ray.nodes() if n["NodeID"] == self.node_id)
        self.ray_cpus = float(node["Resources"].get("CPU", 0))
        self.ray_gpus = float(node["Resources"].get("GPU", 0))
        self.heartbeat_s = heartbeat_s
        self._stop = threading.Event()
        threading.Thread(target=self._heartbeat, name="node-agent-heartbeat",
                         daemon=True).start()

    def collect(self) -> NodeReport:
        errors: dict[str, str] = {}
        # A node whose host probe failed must not look idle: infinite load loses every
        # load tie-break until the probe works again.
        host = run_probe("host", probe_host, None, errors) or {
            "hostname": "?", "cpu_count": 1, "load_avg_1m": float("inf"),
            "ram_total_bytes": 0, "ram_available_bytes": 0}
        return NodeReport(node_id=self.node_id, ray_cpus=self.ray_cpus, ray_gpus=self.ray_gpus,
                          gpus=probe_gpus(self.labels, errors), labels=self.labels,
                          probe_errors=errors, **host)

    def report_now(self) -> NodeReport:
        report = self.collect()
        ray.get(self._scheduler().report.remote(report))
        return report

    def _scheduler(self):
        # Looked up each time: a scheduler that was replaced (not just restarted) is found again.
        return ray.get_actor(SCHEDULER_NAME, namespace=NAMESPACE)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.report_now()
            except Exception as e:  # scheduler briefly away: try again next beat
                log.warning("node agent %s: heartbeat failed: %s", self.node_id[:12], e)
