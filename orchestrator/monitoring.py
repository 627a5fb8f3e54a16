"""Prometheus alert rules, the Grafana dashboard and the metrics table, rendered from the
catalogue (orchestrator/metric_catalogue.py), so names and thresholds exist in one place only.

    python -m orchestrator.monitoring          # rewrite monitoring/*.{yml,json}, docs/metrics.md
    python -m orchestrator.monitoring --check  # exit 1 if a checked-in file is out of date

tests/unit/test_metrics_catalogue.py runs the check, `promtool check rules` and
`promtool test rules` on the result.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from orchestrator import metric_catalogue as m

REPO = Path(__file__).resolve().parents[1]
ALERTS_PATH = REPO / "monitoring" / "alerts.yml"
DASHBOARD_PATH = REPO / "monitoring" / "grafana_dashboard.json"
PROMETHEUS_PATH = REPO / "monitoring" / "prometheus.yml"
TABLE_PATH = REPO / "docs" / "metrics.md"


@dataclass(frozen=True)
class AlertRule:
    """One Prometheus alert rule as generated into monitoring/alerts.yml: its PromQL expression,
    how long it must hold, severity and the texts an operator sees."""

    name: str
    expr: str
    for_s: int
    severity: str  # "page": someone should act now; "warn": look at it during work hours
    summary: str
    description: str


def _q(spec: m.MetricSpec, selector: str = "") -> str:
    """The PromQL series name of a catalogue metric, with an optional label selector."""
    return f"{spec.exported}{{{selector}}}" if selector else spec.exported


GPU_DEVICE = 'device="cuda"'  # a training series of a worker on a GPU (metric_catalogue.TRAIN_TAGS)


def _nodes(health: str) -> str:
    return "max(" + _q(m.SCHEDULER_NODES, f'health="{health}"') + ")"


def _replicas_failing_within(window_s: int) -> str:
    """Per (application, deployment): replicas Serve stopped within the window that had failed
    health checks, or failed health checks within it. Each replaced replica's gauge is 0 for
    seconds only and its failure series appears already at 3, so neither a `for:` nor
    increase() alone sees them; both terms only ever under-count across a gap in the data (no
    false page after a Prometheus restart). Serve sets the gauge to 0 for every replica it
    stops (a scale-down, a rolling update too: Ray 2.60's DeploymentState._stop_replica), so
    a stopped replica counts only where its failure series is there too."""
    window = f"{window_s // 60}m"
    failures = m.RAY_SERVE_HEALTH_CHECK_FAILURES
    replica = ", ".join(m.RAY_SERVE_LABELS)  # one replica's series
    # A replica's failures within the window: its series appeared in it (already at 3), or
    # grew in it. (Its total alone counted a failure long past: two replicas that had each
    # failed one check under load once paged at the scale-down that followed.)
    failed_within = (f"((max_over_time({failures}[{window}]) > 0 unless on ({replica}) "
                     f"max_over_time({failures}[{window}] offset {window}))"
                     f" or (max_over_time({failures}[{window}]) - min_over_time({failures}"
                     f"[{window}]) > 0))")
    return (f"(count by (application, deployment) ((min_over_time("
            f"{m.RAY_SERVE_REPLICA_HEALTHY}[{window}]) == 0) "
            f"and on ({replica}) {failed_within}) "
            f">= {m.ALERT_UNHEALTHY_REPLICAS}) "
            f"or (sum by (application, deployment) (increase("
            f"{m.RAY_SERVE_HEALTH_CHECK_FAILURES}[{window}])) >= "
            f"{m.ALERT_HEALTH_CHECK_FAILURES})")


ALERT_RULES: tuple[AlertRule, ...] = (
    AlertRule(
        "NodeDown",
        # Late heartbeats (Ray still lists the node), or a node lost unexpectedly in the last
        # 10 minutes: more dead nodes now than at the window's low point. Nodes removed on
        # purpose (scale-down) are never counted dead (see RAY_DEATH_EXPECTED).
        f"{_nodes('suspect')} > 0"
        f" or ({_nodes('dead')} - min_over_time({_nodes('dead')}[10m:30s])) > 0",
        m.ALERT_NODE_DOWN_FOR_S, "page",
        "A node stopped reporting to the scheduler",
        "{{ $value }} node(s) suspect or lost: no new work goes there and reservations on "
        "dead nodes are released. Check `python -m orchestrator status` and `ray status`."),
    AlertRule(
        "TrainingMFULow",
        # GPU runs only, as the training log's warning: against a CPU's measured peak
        # every run falls short (its MFU is on the dashboard all the same).
        f"avg by (run) ({_q(m.TRAIN_MFU, GPU_DEVICE)}) < {m.ALERT_MIN_MFU}",
        m.ALERT_TRAINING_FOR_S, "warn",
        f"Training run {{{{ $labels.run }}}} is below {m.ALERT_MIN_MFU:.0%} MFU",
        "Model FLOPs utilisation {{ $value | humanizePercentage }}: check batch size, "
        "precision, data loading and the communication share. (GPU runs only: 45% is a GPU "
        "figure.)"),
    AlertRule(
        "TrainingCommunicationHigh",
        # The exposed share: all-reduce hidden behind the backward pass costs a step nothing.
        f"avg by (run) ({_q(m.TRAIN_COMM_EXPOSED_SHARE)}) > {m.ALERT_MAX_COMM_SHARE}",
        m.ALERT_TRAINING_FOR_S, "warn",
        f"Steps of {{{{ $labels.run }}}} wait on gradient all-reduce over "
        f"{m.ALERT_MAX_COMM_SHARE:.0%} of step time",
        "Exposed communication share {{ $value | humanizePercentage }}: after the backward "
        "pass the steps wait that long for the all-reduce (time it overlaps backward is not "
        "counted), so the network sets the pace. Place the job inside one network group or "
        "raise the batch size."),
    AlertRule(
        "TrainingMemoryHigh",
        f"max by (run) ({_q(m.TRAIN_MEMORY_FRACTION)}) > {m.ALERT_MAX_MEMORY_FRACTION}",
        m.ALERT_TRAINING_FOR_S, "warn",
        f"Training run {{{{ $labels.run }}}} uses over {m.ALERT_MAX_MEMORY_FRACTION:.0%} of "
        "device memory",
        "Peak memory {{ $value | humanizePercentage }} of capacity: close to out-of-memory."),
    AlertRule(
        "GpuMemoryHigh",
        f"max by (node_id, gpu) ({_q(m.GPU_MEMORY_USED)}) / max by (node_id, gpu) "
        f"({_q(m.GPU_MEMORY_TOTAL)}) > {m.ALERT_MAX_GPU_MEMORY_USED}",
        m.ALERT_TRAINING_FOR_S, "warn",
        f"GPU {{{{ $labels.gpu }}}} on node {{{{ $labels.node_id }}}} is over "
        f"{m.ALERT_MAX_GPU_MEMORY_USED:.0%} full",
        "{{ $value | humanizePercentage }} of the GPU's memory in use (NVML), which counts "
        "what PyTorch's caching allocator keeps reserved, the CUDA context and NCCL's "
        "buffers: a healthy training run holds over 90%. Near full, a process that allocates "
        "outside the cache (another job, a second engine) fails; TrainingMemoryHigh judges a "
        "run's own peak."),
    AlertRule(
        "SchedulerQueueStuck",
        f"max({_q(m.SCHEDULER_QUEUE_OLDEST_WAIT)}) > {m.ALERT_QUEUE_STUCK_AFTER_S}",
        0, "warn",
        "A job has waited in the scheduler's queue for over "
        f"{m.ALERT_QUEUE_STUCK_AFTER_S // 60} minutes",
        "Oldest wait {{ $value | humanizeDuration }}: the cluster is too small for the "
        "demand, or the queue does not drain. `python -m orchestrator status` shows why."),
    AlertRule(
        "SchedulerStateSavesFailing",
        # A failed save in every window for `for`: saves that keep failing (each maintenance
        # pass tries again), not one that the next pass made good or a GCS failover. The
        # counter's series appears at its first failure, already at 1 (unseen by increase()),
        # so the next failure, one pass on, is what starts the timer.
        f"sum(increase({_q(m.SCHEDULER_STATE_SAVES_FAILED)}"
        f"[{m.ALERT_STATE_SAVES_FAILING_WINDOW_S // 60}m])) > 0",
        m.ALERT_STATE_SAVES_FAILING_FOR_S, "page",
        "The scheduler cannot save its state to the GCS",
        f"{{{{ $value | humanize }}}} failed saves within the last "
        f"{m.ALERT_STATE_SAVES_FAILING_WINDOW_S // 60} min, and some in every such window for "
        f"{m.ALERT_STATE_SAVES_FAILING_FOR_S // 60} min: the scheduler's changes "
        "(reservations, the queue) stand in its memory only, and a scheduler restarted now "
        "forgets them (a job placed over a running one's reservation). The scheduler's log "
        "warns of each with the GCS's error (`saving the scheduler's state ... failed`); check "
        "the GCS on the head node (`ray status`, "
        "/tmp/ray/session_latest/logs/gcs_server.out)."),
    AlertRule(
        "ServeFirstTokenP99High",
        f"histogram_quantile(0.99, sum by (deployment, le) "
        f"(rate({m.SERVE_INGRESS_TIME_TO_FIRST_TOKEN.exported}_bucket[5m]))) > "
        f"{m.ALERT_SERVE_P99_TTFT_S}",
        m.ALERT_SERVE_LATENCY_FOR_S, "page",
        f"p99 time to first token of {{{{ $labels.deployment }}}} is above "
        f"{m.ALERT_SERVE_P99_TTFT_S:g}s",
        "p99 {{ $value | humanizeDuration }} over the last 5 minutes, as clients wait for it "
        "(from arrival at the ingress). The dashboard's router wait high: requests wait for "
        "a model replica with room, add replicas; the replica's own time to first token "
        "high: they wait for a batch slot, lower max_batch_size or the batch wait timeout."),
    AlertRule(
        "ServeHealthChecksFailing",
        _replicas_failing_within(m.ALERT_HEALTH_CHECK_WINDOW_S),
        0, "page",
        "Serve health checks of {{ $labels.deployment }} keep failing",
        f"{{{{ $value | humanize }}}} unhealthy replicas or failed health checks in the last "
        f"{m.ALERT_HEALTH_CHECK_WINDOW_S // 60} minutes: Serve keeps replacing replicas (a "
        "crash loop, a model that does not load, a hung engine). The replica logs say why."),
)


def alerts_document() -> dict:
    return {"groups": [{
        "name": "hetero-orchestrator",
        "rules": [{
            "alert": rule.name,
            "expr": rule.expr,
            **({"for": f"{rule.for_s}s"} if rule.for_s else {}),
            "labels": {"severity": rule.severity},
            "annotations": {"summary": rule.summary, "description": rule.description},
        } for rule in ALERT_RULES],
    }]}


HEADER = ("# GENERATED by `python -m orchestrator.monitoring` from orchestrator/metric_catalogue.py: "
          "edit there, not here.\n")


def render_alerts() -> str:
    return HEADER + yaml.safe_dump(alerts_document(), sort_keys=False, width=100)


# -- Grafana ------------------------------------------------------------------------------------
GRAFANA_UNITS = {"bytes": "bytes", "ratio": "percentunit", "seconds": "s", "bytes/s": "Bps",
                 "tokens/s": "short", "tokens": "short", "requests": "short", "1": "short",
                 "nats/token": "short"}


@dataclass(frozen=True)
class Panel:
    """One panel of the generated Grafana dashboard: a catalogue metric (for unit and
    description) and the PromQL series drawn on it."""

    title: str
    spec: m.MetricSpec  # gives the unit and the description
    expr: str
    legend: str
    more: tuple[tuple[str, str], ...] = ()  # further (expr, legend) on the same axes


def _panels() -> dict[str, list[Panel]]:
    latency = m.SERVE_REQUEST_LATENCY.exported
    ttft = m.SERVE_INGRESS_TIME_TO_FIRST_TOKEN.exported
    replica_ttft = m.SERVE_TIME_TO_FIRST_TOKEN.exported
    router_wait = m.SERVE_ROUTER_WAIT.exported
    batch = m.SERVE_BATCH_SIZE.exported
    decide = m.SCHEDULER_PLACEMENT_LATENCY.exported
    median, slowest = 'stat="median"', 'stat="min"'  # NODE_BANDWIDTH_SUMMARY's BANDWIDTH_STATS
    return {
        "Nodes": [
            Panel("GPU memory used", m.GPU_MEMORY_USED,
                  f"max by (node_id, gpu, accelerator) ({m.GPU_MEMORY_USED.exported})",
                  "{{node_id}} gpu{{gpu}} {{accelerator}}",
                  ((f"max by (node_id, gpu) ({m.GPU_MEMORY_TOTAL.exported})",
                    "{{node_id}} gpu{{gpu}} capacity"),)),
            Panel("GPU utilization", m.GPU_UTILIZATION,
                  f"max by (node_id, gpu) ({m.GPU_UTILIZATION.exported})",
                  "{{node_id}} gpu{{gpu}}"),
            Panel("Host load per CPU", m.NODE_LOAD_PER_CPU,
                  f"max by (node_id, node_type) ({m.NODE_LOAD_PER_CPU.exported})",
                  "{{node_type}} {{node_id}}"),
            Panel("Memory used (within cgroup)", m.NODE_MEMORY_USED,
                  f"max by (node_id, node_type) ({m.NODE_MEMORY_USED.exported})",
                  "{{node_type}} {{node_id}}"),
            Panel("Measured bandwidth per node", m.NODE_BANDWIDTH_SUMMARY,
                  f"max by (node_id) ({_q(m.NODE_BANDWIDTH_SUMMARY, median)})",
                  "{{node_id}} median to peers",
                  ((f"min by (node_id) ({_q(m.NODE_BANDWIDTH_SUMMARY, slowest)})",
                    "{{node_id}} slowest peer"),)),
            Panel("Slowest measured links", m.NODE_BANDWIDTH,
                  f"bottomk(10, min by (node_id, peer) ({m.NODE_BANDWIDTH.exported}))",
                  "{{node_id}} -> {{peer}}"),
            Panel("Peers with a bandwidth measurement", m.NODE_BANDWIDTH_PEERS,
                  f"min({m.NODE_BANDWIDTH_PEERS.exported})", "fewest (one node)",
                  ((f"max({m.NODE_BANDWIDTH_PEERS.exported})", "most (one node)"),)),
            Panel("Accelerators by source", m.NODE_GPUS,
                  f"sum by (source) ({m.NODE_GPUS.exported})", "{{source}}"),
            Panel("Probe failures / s", m.NODE_PROBE_FAILURES,
                  f"sum by (node_id, probe) (rate({m.NODE_PROBE_FAILURES.exported}[5m]))",
                  "{{node_id}} {{probe}}"),
        ],
        "Scheduler": [
            Panel("Nodes by health", m.SCHEDULER_NODES,
                  f"max by (health) ({m.SCHEDULER_NODES.exported})", "{{health}}"),
            Panel("Queue length", m.SCHEDULER_QUEUE_LENGTH,
                  f"max({m.SCHEDULER_QUEUE_LENGTH.exported})", "waiting",
                  ((f"max({m.SCHEDULER_JOBS_PLACED.exported})", "holding a reservation"),)),
            Panel("Oldest queued job", m.SCHEDULER_QUEUE_OLDEST_WAIT,
                  f"max({m.SCHEDULER_QUEUE_OLDEST_WAIT.exported})", "oldest wait"),
            Panel("Placement decisions / min", m.SCHEDULER_PLACEMENTS,
                  f"sum by (outcome) (rate({m.SCHEDULER_PLACEMENTS.exported}[5m])) * 60",
                  "{{outcome}}"),
            Panel("Placement latency p99", m.SCHEDULER_PLACEMENT_LATENCY,
                  f"histogram_quantile(0.99, sum by (le) (rate({decide}_bucket[5m])))", "p99"),
            Panel("Rejections / min", m.SCHEDULER_REJECTIONS,
                  f"sum by (reason) (rate({m.SCHEDULER_REJECTIONS.exported}[5m])) * 60",
                  "{{reason}}"),
            Panel("Refused node reports / min", m.SCHEDULER_REPORTS_REFUSED,
                  f"sum by (reason) (rate({m.SCHEDULER_REPORTS_REFUSED.exported}[5m])) * 60",
                  "{{reason}}"),
            Panel("Preemptions and migrations / h", m.SCHEDULER_YIELDS,
                  f"sum by (kind) (rate({m.SCHEDULER_YIELDS.exported}[1h])) * 3600", "{{kind}}"),
            Panel("Failed state saves / h", m.SCHEDULER_STATE_SAVES_FAILED,
                  f"sum(rate({m.SCHEDULER_STATE_SAVES_FAILED.exported}[1h])) * 3600",
                  "failed saves"),
        ],
        "Training": [
            Panel("Loss", m.TRAIN_LOSS, f"avg by (run) ({m.TRAIN_LOSS.exported})", "{{run}}"),
            Panel("Tokens / s (all workers)", m.TRAIN_TOKENS_PER_SECOND,
                  f"sum by (run) ({m.TRAIN_TOKENS_PER_SECOND.exported})", "{{run}}"),
            Panel("MFU", m.TRAIN_MFU, f"avg by (run) ({m.TRAIN_MFU.exported})", "{{run}}"),
            Panel("Communication share", m.TRAIN_COMM_SHARE,
                  f"avg by (run) ({m.TRAIN_COMM_SHARE.exported})", "{{run}} in flight",
                  ((f"avg by (run) ({m.TRAIN_COMM_EXPOSED_SHARE.exported})",
                    "{{run}} exposed"),)),
            Panel("Peak memory / capacity", m.TRAIN_MEMORY_FRACTION,
                  f"max by (run) ({m.TRAIN_MEMORY_FRACTION.exported})", "{{run}}"),
            Panel("Peak memory", m.TRAIN_PEAK_MEMORY,
                  f"max by (run, rank) ({m.TRAIN_PEAK_MEMORY.exported})", "{{run}} rank {{rank}}"),
            Panel("Loss scale (fp16)", m.TRAIN_LOSS_SCALE,
                  f"max by (run) ({m.TRAIN_LOSS_SCALE.exported})", "{{run}}"),
            Panel("Skipped steps (fp16)", m.TRAIN_SKIPPED_STEPS,
                  f"max by (run) ({m.TRAIN_SKIPPED_STEPS.exported})", "{{run}}"),
            Panel("Step", m.TRAIN_STEP, f"max by (run) ({m.TRAIN_STEP.exported})", "{{run}}"),
        ],
        "Serving": [
            Panel("Requests / s", m.SERVE_REQUESTS,
                  f"sum by (route, status) (rate({m.SERVE_REQUESTS.exported}[1m]))",
                  "{{route}} {{status}}"),
            Panel("Errors / s", m.SERVE_ERRORS,
                  f"sum by (route, kind) (rate({m.SERVE_ERRORS.exported}[1m]))",
                  "{{route}} {{kind}}"),
            Panel("Request latency p50 / p99", m.SERVE_REQUEST_LATENCY,
                  f"histogram_quantile(0.99, sum by (deployment, le) (rate({latency}_bucket[5m])))",
                  "{{deployment}} p99",
                  ((f"histogram_quantile(0.5, sum by (deployment, le) "
                    f"(rate({latency}_bucket[5m])))", "{{deployment}} p50"),)),
            Panel("Time to first token p99", m.SERVE_INGRESS_TIME_TO_FIRST_TOKEN,
                  f"histogram_quantile(0.99, sum by (deployment, le) (rate({ttft}_bucket[5m])))",
                  "{{deployment}} p99 (client's, from the ingress)",
                  ((f"histogram_quantile(0.99, sum by (deployment, le) "
                    f"(rate({replica_ttft}_bucket[5m])))",
                    "{{deployment}} p99 in the model replica"),)),
            Panel("Router wait p99", m.SERVE_ROUTER_WAIT,
                  f"histogram_quantile(0.99, sum by (deployment, le) "
                  f"(rate({router_wait}_bucket[5m])))", "{{deployment}} p99"),
            Panel("Time per output token p99", m.SERVE_TIME_PER_OUTPUT_TOKEN,
                  f"histogram_quantile(0.99, sum by (deployment, le) "
                  f"(rate({m.SERVE_TIME_PER_OUTPUT_TOKEN.exported}_bucket[5m])))",
                  "{{deployment}} p99"),
            Panel("Queue time p99", m.SERVE_QUEUE_TIME,
                  f"histogram_quantile(0.99, sum by (deployment, le) "
                  f"(rate({m.SERVE_QUEUE_TIME.exported}_bucket[5m])))", "{{deployment}} p99"),
            Panel("Mean batch size", m.SERVE_BATCHED_REQUESTS,
                  f"sum by (deployment) (rate({m.SERVE_BATCHED_REQUESTS.exported}[5m])) / "
                  f"sum by (deployment) (rate({batch}_count[5m]))", "{{deployment}}"),
            Panel("Queue depth", m.SERVE_QUEUE_DEPTH,
                  f"sum by (deployment) ({m.SERVE_QUEUE_DEPTH.exported})", "{{deployment}}"),
            Panel("Generated tokens / s", m.SERVE_GENERATED_TOKENS,
                  f"sum by (deployment) (rate({m.SERVE_GENERATED_TOKENS.exported}[1m]))",
                  "{{deployment}} (all replicas)",
                  ((f"max by (deployment) ({m.SERVE_TOKENS_PER_SECOND.exported})",
                    "{{deployment}} fastest replica, last batch or second"),)),
            Panel("Model version", m.SERVE_MODEL_VERSION,
                  f"max by (deployment, version) ({m.SERVE_MODEL_VERSION.exported})",
                  "{{deployment}} {{version}}"),
        ],
    }


def dashboard_document() -> dict:
    datasource = {"type": "prometheus", "uid": "${datasource}"}
    panels, y, next_id = [], 0, 1
    for row, row_panels in _panels().items():
        panels.append({"id": next_id, "type": "row", "title": row, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        next_id, y = next_id + 1, y + 1
        for i, panel in enumerate(row_panels):
            panels.append({
                "id": next_id, "type": "timeseries", "title": panel.title,
                "description": f"{panel.spec.exported}: {panel.spec.description}",
                "datasource": datasource,
                "gridPos": {"h": 8, "w": 8, "x": 8 * (i % 3), "y": y + 8 * (i // 3)},
                "fieldConfig": {"defaults": {"unit": GRAFANA_UNITS[panel.spec.unit]},
                                "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
                "targets": [{"datasource": datasource, "expr": expr, "legendFormat": legend,
                             "refId": chr(ord("A") + k)}
                            for k, (expr, legend) in enumerate(((panel.expr, panel.legend),
                                                                *panel.more))],
            })
            next_id += 1
        y += 8 * ((len(row_panels) + 2) // 3)
    return {
        "uid": "hetero-orchestrator", "title": "hetero-orchestrator",
        "tags": ["ray", "hetero-orchestrator"], "timezone": "browser", "editable": True,
        "schemaVersion": 39, "version": 1, "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [{"name": "datasource", "label": "Prometheus",
                                 "type": "datasource", "query": "prometheus"}]},
        "panels": panels,
    }


def render_dashboard() -> str:
    return json.dumps(dashboard_document(), indent=2) + "\n"


# -- metrics table ------------------------------------------------------------------------------
SECTIONS = (("Node agents (per node)", "orchestrator_gpu_", "orchestrator_node_"),
            ("Scheduler", "orchestrator_scheduler_"),
            ("Training (per worker, from `RayTrainSession.report`)", "orchestrator_train_"),
            ("Serving (per replica)", "orchestrator_serve_"))


def render_table() -> str:
    lines = ["# Metrics", "",
             "<!-- GENERATED by `python -m orchestrator.monitoring` from "
             "orchestrator/metric_catalogue.py: edit there, not here. -->", "",
             "Every metric is recorded with `ray.util.metrics` and exported by Ray's metrics "
             "agent on each node; query the **exported** name in Prometheus. Ray adds its own "
             "labels too (`SessionName`, `NodeAddress`, `WorkerId`, `Component`, ...).", ""]
    for title, *prefixes in SECTIONS:
        lines += [f"## {title}", "", "| exported name | type | unit | labels | description |",
                  "|---|---|---|---|---|"]
        for spec in m.ALL:
            if spec.name.startswith(tuple(prefixes)):
                labels = ", ".join(f"`{t}`" for t in spec.tag_keys) or "-"
                lines.append(f"| `{spec.exported}` | {spec.kind} | {spec.unit} | {labels} | "
                             f"{spec.description} |")
        lines.append("")
    lines += ["## Alerts (`monitoring/alerts.yml`)", "",
              "| alert | fires when | for | severity |", "|---|---|---|---|"]
    for rule in ALERT_RULES:
        expr = rule.expr.replace("|", "\\|")  # a pipe would end the table cell
        lines.append(f"| {rule.name} | `{expr}` | {rule.for_s}s | {rule.severity} |")
    return "\n".join(lines) + "\n"


def render_prometheus_config(service_discovery_file: str = "/tmp/ray/prom_metrics_service_discovery.json",
                             rules_file: str = "alerts.yml", interval_s: int = 10) -> str:
    """A Prometheus config that scrapes every Ray node through Ray's service-discovery file
    (written by the dashboard on the head, listing each node's metrics-export port) and loads
    the alert rules."""
    return HEADER + yaml.safe_dump({
        "global": {"scrape_interval": f"{interval_s}s", "evaluation_interval": f"{interval_s}s"},
        "rule_files": [rules_file],
        "scrape_configs": [{"job_name": "ray",
                            "file_sd_configs": [{"files": [service_discovery_file],
                                                 "refresh_interval": f"{interval_s}s"}]}],
    }, sort_keys=False)


OUTPUTS = ((ALERTS_PATH, render_alerts), (DASHBOARD_PATH, render_dashboard),
           (PROMETHEUS_PATH, render_prometheus_config), (TABLE_PATH, render_table))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a checked-in file differs from what the catalogue renders")
    args = parser.parse_args(argv)
    stale = []
    for path, render in OUTPUTS:
        text = render()
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path.relative_to(REPO)))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print(f"out of date (run `python -m orchestrator.monitoring`): {', '.join(stale)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
