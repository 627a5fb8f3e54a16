"""Every metric the product exports and every alert threshold, in one place.

Node agents, the scheduler, training workers and serving replicas record these through
`ray.util.metrics` (see ray_layer/telemetry.py); Ray's metrics agent on each node exposes them to
Prometheus with a `ray_` prefix, counters with a further `_total` suffix, histograms as
`_bucket`/`_sum`/`_count`. `MetricSpec.exported` gives the name to query. Ray adds its own
labels too (SessionName, NodeAddress, WorkerId, Component, Version), so the label sets here
are the ones we set, not all a series carries.

The alert rules (monitoring/alerts.yml), the Grafana dashboard
(monitoring/grafana_dashboard.json) and the metrics table (docs/metrics.md) are checked
against this module by tests/unit/test_metrics_catalogue.py: change a name or a threshold here
and those tests say what else must follow.

Pure data: importing this module needs neither Ray nor torch.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from orchestrator.throughput import per_worker_rate
from orchestrator.validation import python_scalar

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
RAY_PREFIX = "ray_"  # what Ray's Prometheus exporter puts in front of every application metric


@dataclass(frozen=True)
class MetricSpec:
    """One metric: `name` is what the code records, `exported` what Prometheus sees."""

    name: str
    kind: str  # COUNTER, GAUGE or HISTOGRAM
    description: str
    unit: str  # human unit for docs and dashboards ("bytes", "seconds", "ratio", "1", ...)
    tag_keys: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None  # histogram upper bounds (Ray requires > 0)
    # A gauge recorded rarely (a model version at load, training figures at each report):
    # re-sent between records (ray_layer/telemetry.py), as Ray's agent drops a gauge not
    # refreshed within 20 s. Gauges recorded every few seconds are not held: a figure no
    # longer recorded (a peer that left, a GPU lost) must vanish, not linger.
    held: bool = False

    def __post_init__(self) -> None:
        if self.kind not in (COUNTER, GAUGE, HISTOGRAM):
            raise ValueError(f"metric {self.name}: kind must be counter, gauge or histogram, "
                             f"got {self.kind!r}")
        if (self.kind == HISTOGRAM) != bool(self.buckets):
            raise ValueError(f"metric {self.name}: buckets are required for a histogram and "
                             "only for one")
        if self.buckets and (any(b <= 0 for b in self.buckets)
                             or list(self.buckets) != sorted(set(self.buckets))):
            raise ValueError(f"metric {self.name}: buckets must be positive and increasing, "
                             f"got {self.buckets}")
        if self.held and self.kind != GAUGE:
            raise ValueError(f"metric {self.name}: only a gauge is held")
        if self.kind == COUNTER and self.name.endswith("_total"):
            raise ValueError(f"metric {self.name}: Ray appends _total to counters itself")

    @property
    def exported(self) -> str:
        """The series name to query in Prometheus (for a histogram, the base of
        _bucket/_sum/_count)."""
        suffix = "_total" if self.kind == COUNTER else ""
        return f"{RAY_PREFIX}{self.name}{suffix}"


# Bucket bounds. Each alert threshold on a histogram is itself a bound, so that
# histogram_quantile() is exact at the threshold rather than interpolated across it.
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Waits before a model replica takes a call (the router's, and the client's time to first
# token that holds it): up to ServeSettings.replica_wait_s, 60 s, before a 503. Ending at
# 10 s, their p99 read 10 s whether clients waited 11 s or 59 s.
WAIT_BUCKETS_S = TTFT_BUCKETS_S + (30.0, 60.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Placement is a few numpy passes: milliseconds on thousands of nodes; seconds means trouble.
PLACEMENT_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)

# -- node agents (ray_layer/node_agent.py), one set per node -------------------------------------
NODE_TAGS = ("node_id", "node_type")
GPU_TAGS = NODE_TAGS + ("gpu", "accelerator")

GPU_MEMORY_USED = MetricSpec(
    "orchestrator_gpu_memory_used_bytes", GAUGE,
    "GPU memory in use, per GPU, as NVML measures it: PyTorch's caching allocator's reserve, "
    "the CUDA context and NCCL's buffers count (declared GPUs are not measured)",
    "bytes", GPU_TAGS)
GPU_MEMORY_TOTAL = MetricSpec(
    "orchestrator_gpu_memory_total_bytes", GAUGE,
    "GPU memory capacity, per GPU, as NVML measures it", "bytes", GPU_TAGS)
GPU_UTILIZATION = MetricSpec(
    "orchestrator_gpu_utilization_ratio", GAUGE,
    "Share of the last sample period a kernel ran on the GPU (NVML), 0-1", "ratio", GPU_TAGS)
NODE_GPUS = MetricSpec(
    "orchestrator_node_gpus", GAUGE,
    "Accelerators the node agent sees, by source: nvml (measured) or declared (node labels)",
    "1", NODE_TAGS + ("source",))
# A load is not a share: above 1 per CPU is normal on a busy node (unit "1", not "ratio",
# which the dashboard draws as a percentage).
NODE_LOAD_PER_CPU = MetricSpec(
    "orchestrator_node_load_per_cpu", GAUGE,
    "1-minute load over the CPUs the node agent may use (under a CPU quota its cgroup's own "
    "usage; else the host's load average per host CPU; absent while the host probe fails)",
    "1", NODE_TAGS)
NODE_MEMORY_USED = MetricSpec(
    "orchestrator_node_memory_used_ratio", GAUGE,
    "RAM in use within the node agent's memory cgroups (a container's limit, else the "
    "host's; 1 - available/total), 0-1", "ratio", NODE_TAGS)
# One series per (node, peer) for every peer is n^2 series: a million at 1,000 nodes, more
# than one Prometheus holds. A node exports its slowest peers (what a slow link shows up as)
# and a summary over all it measured, so a node's series stay bounded whatever the cluster.
BANDWIDTH_EXPORTED_PEERS = 8
BANDWIDTH_STATS = ("min", "median", "max")
NODE_BANDWIDTH = MetricSpec(
    "orchestrator_node_bandwidth_bytes_per_second", GAUGE,
    "Measured throughput from this node to a peer through Ray's object store (median of "
    "the last 3 measurements, each from the best of 2 rounds of 8 MiB and of 64 MiB: fitted "
    "to leave Ray's per-transfer overhead out where their times differ clearly, else the 64 "
    f"MiB transfer's own rate), to each of the node's {BANDWIDTH_EXPORTED_PEERS} slowest "
    "peers only (a series for every pair grows with the square of the cluster); the summary "
    "covers all", "bytes/s",
    NODE_TAGS + ("peer",))
NODE_BANDWIDTH_SUMMARY = MetricSpec(
    "orchestrator_node_bandwidth_summary_bytes_per_second", GAUGE,
    "Measured throughput from this node over all the peers it measured, by stat: min, median, "
    "max (absent until one is measured)", "bytes/s", NODE_TAGS + ("stat",))
NODE_BANDWIDTH_PEERS = MetricSpec(
    "orchestrator_node_bandwidth_peers", GAUGE,
    "Peers this node has a bandwidth measurement to (the peer series cover the slowest "
    f"{BANDWIDTH_EXPORTED_PEERS} of them)", "1", NODE_TAGS)
NODE_PROBE_FAILURES = MetricSpec(
    "orchestrator_node_probe_failures", COUNTER,
    "Probe runs that failed, by probe (nvml, declared, gpu-count, host, network-labels)", "1",
    NODE_TAGS + ("probe",))

# -- scheduler (ray_layer/scheduler_actor.py), one per cluster -----------------------------------------
SCHEDULER_NODES = MetricSpec(
    "orchestrator_scheduler_nodes", GAUGE,
    "Nodes known to the scheduler, by health (healthy, suspect: heartbeat late, dead); nodes "
    "the autoscaler removed on purpose are not counted as dead, also once Ray's GCS no longer "
    "lists them (it keeps its last 1000 dead nodes). Dead counts the deaths within the last "
    "hour (DEAD_NODE_RETENTION_S; older ones only while a job still refers to the node): a "
    "dead node is then forgotten, which only lowers the gauge (NodeDown alerts on a rise)",
    "1", ("health",))
SCHEDULER_QUEUE_LENGTH = MetricSpec(
    "orchestrator_scheduler_queue_length", GAUGE,
    "Jobs waiting in the scheduler's queue for capacity", "1")
SCHEDULER_QUEUE_OLDEST_WAIT = MetricSpec(
    "orchestrator_scheduler_queue_oldest_wait_seconds", GAUGE,
    "How long the longest-waiting queued job has waited since it last entered the queue (a "
    "preempted job's wait starts again; 0 when the queue is empty)", "seconds")
SCHEDULER_JOBS_PLACED = MetricSpec(
    "orchestrator_scheduler_jobs_placed", GAUGE,
    "Jobs currently holding a reservation", "1")
SCHEDULER_PLACEMENTS = MetricSpec(
    "orchestrator_scheduler_placement_decisions", COUNTER,
    "Placement decisions, by outcome: placed (now or from the queue), queued, rejected", "1",
    ("outcome",))
SCHEDULER_PLACEMENT_LATENCY = MetricSpec(
    "orchestrator_scheduler_placement_latency_seconds", HISTOGRAM,
    "Time to decide one submit/place request, by outcome", "seconds", ("outcome",),
    PLACEMENT_BUCKETS_S)
SCHEDULER_REJECTIONS = MetricSpec(
    "orchestrator_scheduler_rejections", COUNTER,
    "Jobs refused, by reason: duplicate (name in use), capacity (larger than the cluster), "
    "bandwidth (no node set fast enough), busy (fits once jobs finish, yet not queued), "
    "cluster_shrank (was queued, can no longer fit); one job refused is counted once, a job "
    "refused at its submission or its replacement by its own reason", "1", ("reason",))

SCHEDULER_REPORTS_REFUSED = MetricSpec(
    "orchestrator_scheduler_reports_refused", COUNTER,
    "Node reports the scheduler refused, by reason: unknown_node (a node id Ray has never "
    "listed), dead_node (Ray lists the node dead), malformed (a figure not a finite number "
    ">= 0)", "1", ("reason",))
REPORT_UNKNOWN_NODE, REPORT_DEAD_NODE, REPORT_MALFORMED = "unknown_node", "dead_node", "malformed"
SCHEDULER_YIELDS = MetricSpec(
    "orchestrator_scheduler_yields", COUNTER,
    "Running jobs told to checkpoint and give their resources back, by kind: preempt (for a "
    "higher-priority job, or by an operator), migrate (to faster accelerators), cancel (by an "
    "operator)", "1", ("kind",))
SCHEDULER_STATE_SAVES_FAILED = MetricSpec(
    "orchestrator_scheduler_state_saves_failed", COUNTER,
    "Saves of the scheduler's state to the GCS key-value store that failed (the GCS failing "
    "over): the change stands and is answered as made, and the next maintenance pass saves "
    "it again; a scheduler restarted before then forgets it", "1")

# Rejection reasons, a closed set so the label cannot grow without bound.
REJECT_DUPLICATE = "duplicate"  # a job of that name already runs or waits
REJECT_CAPACITY = "capacity"  # larger than the healthy cluster even when idle
REJECT_BANDWIDTH = "bandwidth"  # room exists, but not with the required bandwidth between nodes
REJECT_BUSY = "busy"  # fits once running jobs release, yet was not queued
REJECT_CLUSTER_SHRANK = "cluster_shrank"  # was queued; nodes left and it can never fit now
REJECTION_REASONS = (REJECT_DUPLICATE, REJECT_CAPACITY, REJECT_BANDWIDTH, REJECT_BUSY,
                     REJECT_CLUSTER_SHRANK)

# -- training (ray_layer/train_session.py, RayTrainSession.report), per worker ----------
# device: the worker's torch device type ("cuda", "cpu"): MFU's 45% is a GPU figure, and a
# CPU run (against the CPU's measured matmul peak) fired TrainingMFULow for its whole length.
TRAIN_TAGS = ("run", "rank", "device")

TRAIN_LOSS = MetricSpec("orchestrator_train_loss", GAUGE,
                        "Training loss at the last report", "nats/token", TRAIN_TAGS,
                        held=True)
TRAIN_TOKENS_PER_SECOND = MetricSpec(
    "orchestrator_train_tokens_per_second", GAUGE,
    "Tokens per second over the last logging interval, this worker's share of the job's "
    "(the sum over ranks is the job's rate)", "tokens/s", TRAIN_TAGS, held=True)
TRAIN_MFU = MetricSpec(
    "orchestrator_train_mfu_ratio", GAUGE,
    "Model FLOPs utilisation (PaLM's 6N + 12LHQT FLOPs/token x tokens/s over the device's "
    "peak), 0-1", "ratio", TRAIN_TAGS, held=True)
TRAIN_COMM_SHARE = MetricSpec(
    "orchestrator_train_comm_share_ratio", GAUGE,
    "Share of step time a gradient all-reduce was in flight over the last interval (from a "
    "bucket's launch to its completion, waiting for the slowest worker included), 0-1; time "
    "overlapping the backward pass counts too, so it bounds what communication costs a step "
    "from above; DDP only (absent under FSDP)", "ratio", TRAIN_TAGS, held=True)
TRAIN_COMM_EXPOSED_SHARE = MetricSpec(
    "orchestrator_train_comm_exposed_share_ratio", GAUGE,
    "Share of step time spent waiting on gradient all-reduce after the backward pass over the "
    "last interval (per step, from the last bucket's launch, all gradients computed, to the "
    "latest all-reduce's completion), 0-1: the communication the steps could not hide, what "
    "TrainingCommunicationHigh judges; DDP only (absent under FSDP)", "ratio", TRAIN_TAGS,
    held=True)
TRAIN_PEAK_MEMORY = MetricSpec(
    "orchestrator_train_peak_memory_bytes", GAUGE,
    "Peak memory of the worker (CUDA max allocated, or peak RSS on CPU)", "bytes", TRAIN_TAGS,
    held=True)
TRAIN_MEMORY_FRACTION = MetricSpec(
    "orchestrator_train_memory_fraction_ratio", GAUGE,
    "Peak memory over the device's capacity, 0-1", "ratio", TRAIN_TAGS, held=True)
TRAIN_LOSS_SCALE = MetricSpec(
    "orchestrator_train_loss_scale", GAUGE,
    "fp16 dynamic loss scale (absent in bf16/fp32)", "1", TRAIN_TAGS, held=True)
# A gauge, not a counter: the loop counts from 0 again at each resume or restart (training.md).
TRAIN_SKIPPED_STEPS = MetricSpec(
    "orchestrator_train_skipped_steps", GAUGE,
    "Optimizer steps skipped for inf/NaN gradients (fp16) since this attempt started: a "
    "resume or restart counts from 0 again", "1", TRAIN_TAGS, held=True)
TRAIN_STEP = MetricSpec("orchestrator_train_step", GAUGE,
                        "Optimizer step of the last report", "1", TRAIN_TAGS,
                        held=True)

# The RayTrainSession.report metrics dict key behind each training metric.
TRAIN_REPORT_KEYS: dict[str, MetricSpec] = {
    "loss": TRAIN_LOSS,
    "tokens_per_s": TRAIN_TOKENS_PER_SECOND,
    "mfu": TRAIN_MFU,
    "comm_share": TRAIN_COMM_SHARE,
    "comm_exposed_share": TRAIN_COMM_EXPOSED_SHARE,
    "peak_memory_bytes": TRAIN_PEAK_MEMORY,
    "memory_fraction": TRAIN_MEMORY_FRACTION,
    "loss_scale": TRAIN_LOSS_SCALE,
    "skipped_steps": TRAIN_SKIPPED_STEPS,
    "step": TRAIN_STEP,
}

# -- serving (orchestrator/serving/), per replica ---------------------------------------------
SERVE_TAGS = ("deployment", "route")

# The route label of a request to a path the server has no route for (a 404): the path itself
# would make a series of every path a client or a scanner tries.
SERVE_UNMATCHED_ROUTE = "unmatched"
SERVE_REQUESTS = MetricSpec(
    "orchestrator_serve_requests", COUNTER,
    "HTTP requests answered, by route and status code (rate() gives QPS); health checks "
    "(route /health) and FastAPI's API explorer (/docs, /redoc, /openapi.json) too, each "
    "under its own route; a path with no "
    f"route (404) is counted as route {SERVE_UNMATCHED_ROUTE!r}, a wrong method (405) under "
    "its route", "1", SERVE_TAGS + ("status",))
SERVE_ERRORS = MetricSpec(
    "orchestrator_serve_errors", COUNTER,
    "Requests that failed, by route and kind (bad_request; client_closed: the client left "
    "while sending its body; overloaded: back-pressure, add "
    "replicas; unavailable: no model loaded yet, a reload, a lost replica or engine, or no "
    "replica running, retried by clients; internal), and refused hot reloads (kind bad_config)",
    "1", SERVE_TAGS + ("kind",))
SERVE_REQUEST_LATENCY = MetricSpec(
    "orchestrator_serve_request_latency_seconds", HISTOGRAM,
    "Request latency from arrival at the ingress replica to the last byte of the response",
    "seconds",
    SERVE_TAGS, LATENCY_BUCKETS_S)
SERVE_TIME_TO_FIRST_TOKEN = MetricSpec(
    "orchestrator_serve_time_to_first_token_seconds", HISTOGRAM,
    "Time from arrival at the model replica to the first generated token, per prompt: the "
    "model's share (batch slot and prefill) of the client's wait; the proxy and ingress "
    "hops and a wait in Serve's router for a replica with room are not counted (the "
    "ingress's figure and the router wait are)",
    "seconds", SERVE_TAGS, TTFT_BUCKETS_S)
# The client's time to first token grows under load mostly in Serve's router, which holds a
# call until a model replica has room (max_ongoing_requests): the replica never sees that
# wait. The ingress measures it, on its own clock only (generation.outside_replica_s).
SERVE_INGRESS_TIME_TO_FIRST_TOKEN = MetricSpec(
    "orchestrator_serve_ingress_time_to_first_token_seconds", HISTOGRAM,
    "Time from arrival at the ingress replica to the first generated token, per request: "
    "what a client waits for it, the router's wait for a model replica with room, the hops "
    "and any resend after a lost replica included (the proxy's hop to the ingress is not). "
    "Streamed: to the first chunk the ingress receives; whole: the ingress's wait for the "
    "answer less what the model replica held after the first token (monotonic durations "
    "measured on each side, no two machines' clocks compared); a request of several prompts "
    "counts its earliest. A request answered 503 because no model replica took its call "
    "within replica_wait_s got no token: it counts its wait up to that 503 (a lower bound), "
    "so an overload whose calls all time out in the router is seen here too",
    "seconds", SERVE_TAGS, WAIT_BUCKETS_S)
SERVE_ROUTER_WAIT = MetricSpec(
    "orchestrator_serve_router_wait_seconds", HISTOGRAM,
    "Time a model call spent outside the model replica, per call (each resend its own): "
    "waiting in Serve's router for a replica with room (max_ongoing_requests), plus the hops "
    "there and back. Answered: the ingress's wait for the answer (whole) or the first chunk "
    "(streamed) less the replica's own time to it; taken by no replica within replica_wait_s "
    "(a 503): its whole wait; failed in its replica before answering (a lost replica or "
    "engine): its wait until taken (not recorded with replica_wait_s 0, which leaves that "
    "moment unknown). High while the replica's time to first token stays low: add replicas",
    "seconds", SERVE_TAGS, WAIT_BUCKETS_S)
SERVE_TIME_PER_OUTPUT_TOKEN = MetricSpec(
    "orchestrator_serve_time_per_output_token_seconds", HISTOGRAM,
    "Time per output token after the first (the stream's pace), per completed request",
    "seconds", SERVE_TAGS, TTFT_BUCKETS_S)
SERVE_QUEUE_TIME = MetricSpec(
    "orchestrator_serve_queue_time_seconds", HISTOGRAM,
    "Time a request waited for a row and KV-cache blocks (continuous batching)", "seconds",
    ("deployment",), TTFT_BUCKETS_S)
SERVE_BATCH_SIZE = MetricSpec(
    "orchestrator_serve_batch_size", HISTOGRAM,
    "Requests per batch (static batching) or rows per decoding step (continuous); its _sum is "
    "Ray's estimate from bucket midpoints: the mean is batched_requests over _count",
    "requests", ("deployment",), BATCH_SIZE_BUCKETS)
SERVE_BATCHED_REQUESTS = MetricSpec(
    "orchestrator_serve_batched_requests", COUNTER,
    "Requests over all batches (static) or rows over all decoding steps (continuous): over "
    "the batch-size histogram's _count, the exact mean batch size", "requests",
    ("deployment",))
SERVE_QUEUE_DEPTH = MetricSpec(
    "orchestrator_serve_queue_depth", GAUGE,
    "Requests waiting for a batch (static) or for a row and KV-cache blocks (continuous), "
    "at the last batch or decoding step", "requests", ("deployment",))
SERVE_TOKENS_PER_SECOND = MetricSpec(
    "orchestrator_serve_tokens_per_second", GAUGE,
    "Tokens generated per second by the replica over its last batch (static) or its last "
    "second or more of decoding (continuous)", "tokens/s", ("deployment",))
SERVE_GENERATED_TOKENS = MetricSpec(
    "orchestrator_serve_generated_tokens", COUNTER,
    "Tokens generated (rate() gives cluster-wide tokens/s)", "tokens", ("deployment",))
SERVE_MODEL_VERSION = MetricSpec(
    "orchestrator_serve_model_version_info", GAUGE,
    "1 for the model version (checkpoint) a replica serves; hot reload moves it, and the "
    "version served before reads 0 for 10 minutes while the replica lives (the dashboard "
    "draws the switch with it): `== 1` selects the versions served", "1",
    ("deployment", "version"), held=True)

ALL: tuple[MetricSpec, ...] = (
    GPU_MEMORY_USED, GPU_MEMORY_TOTAL, GPU_UTILIZATION, NODE_GPUS, NODE_LOAD_PER_CPU,
    NODE_MEMORY_USED, NODE_BANDWIDTH, NODE_BANDWIDTH_SUMMARY, NODE_BANDWIDTH_PEERS,
    NODE_PROBE_FAILURES,
    SCHEDULER_NODES, SCHEDULER_QUEUE_LENGTH, SCHEDULER_QUEUE_OLDEST_WAIT, SCHEDULER_JOBS_PLACED,
    SCHEDULER_PLACEMENTS, SCHEDULER_PLACEMENT_LATENCY, SCHEDULER_REJECTIONS,
    SCHEDULER_REPORTS_REFUSED,
    SCHEDULER_YIELDS, SCHEDULER_STATE_SAVES_FAILED,
    *TRAIN_REPORT_KEYS.values(),
    SERVE_REQUESTS, SERVE_ERRORS, SERVE_REQUEST_LATENCY, SERVE_INGRESS_TIME_TO_FIRST_TOKEN,
    SERVE_ROUTER_WAIT, SERVE_TIME_TO_FIRST_TOKEN,
    SERVE_TIME_PER_OUTPUT_TOKEN, SERVE_QUEUE_TIME, SERVE_BATCH_SIZE, SERVE_BATCHED_REQUESTS,
    SERVE_QUEUE_DEPTH, SERVE_TOKENS_PER_SECOND, SERVE_GENERATED_TOKENS,
    SERVE_MODEL_VERSION,
)
BY_NAME: dict[str, MetricSpec] = {spec.name: spec for spec in ALL}

# Ray Serve's own metrics that the alerts use (Ray exports them; we only read them). Serve's
# controller sets a replica's `replica_healthy` gauge to 0 when it stops it (as unhealthy, or
# in a scale-down or rolling update alike: the alert asks for its failure series too), and
# the series goes ~20 s later (checked on a live Ray 2.60): an alert needing it 0 for a
# minute never fired, but the samples stay in Prometheus, so replicas that were unhealthy
# within a window can be counted. The controller also counts failed health checks, per
# replica by default (a replaced replica's series appears already at 3: increase() misses it)
# or per deployment with RAY_SERVE_CONTROLLER_METRICS_INCLUDE_HIGH_CARDINALITY_TAGS=0.
RAY_SERVE_REPLICA_HEALTHY = "ray_serve_deployment_replica_healthy"  # gauge, 1 = healthy
RAY_SERVE_HEALTH_CHECK_FAILURES = "ray_serve_health_check_failures_total"  # counter
# The labels Serve's controller sets on both (Ray 2.60's DeploymentState; "replica" only with
# the high-cardinality tags on, the default): the alert groups and joins on them.
RAY_SERVE_LABELS = ("application", "deployment", "replica")

# -- alert thresholds (monitoring/alerts.yml uses exactly these) ------------------------------
# The training thresholds are TrainConfig's warn_* defaults (the once-per-run warning in the
# progress log); a test keeps the three in step.
ALERT_MIN_MFU = 0.45  # well-tuned dense LLM training reaches 45-55% MFU (PaLM: 46%)
ALERT_MAX_COMM_SHARE = 0.15  # exposed share; more: the all-reduce, not compute, sets the pace
ALERT_MAX_MEMORY_FRACTION = 0.90  # above it, allocator fragmentation tips into OOM
# GPU memory as NVML sees it includes what PyTorch's caching allocator keeps reserved, the
# CUDA context and NCCL's buffers: a healthy training run holds over 90% of it (at 0.90 the
# alert fired on such runs). Near full is the sign here; peak allocated is
# TrainingMemoryHigh's.
ALERT_MAX_GPU_MEMORY_USED = 0.97
ALERT_NODE_DOWN_FOR_S = 60  # the scheduler calls a node suspect after 15 s without heartbeat
# Twice the default --queue-timeout (600 s): a driver with default settings has given up long
# before, so a job still waiting is one someone asked to wait for very long, or a queue that
# does not drain although capacity is free.
ALERT_QUEUE_STUCK_AFTER_S = 1200
# The scheduler's state saves (SCHEDULER_STATE_SAVES_FAILED): a failed one is tried again by
# each maintenance pass (every 5 s) until one succeeds, so saves that keep failing are counted
# several times a minute. Page once a failed save has been counted in every minute (the window,
# 6 scrapes at Prometheus' 10 s, 2 at 30 s) for 3 minutes: a GCS failover ends within Ray's
# 60 s reconnect timeout (gcs_rpc_server_reconnect_timeout_s: a raylet that cannot reach the
# GCS for longer exits), so saves still failing 2 minutes on are a GCS refusing them. Until one succeeds
# the saved state lags: a scheduler restarted then forgets every change since (a running
# job's reservation: the next job placed over it). A single failure, saved again 5 s later,
# pages nobody.
ALERT_STATE_SAVES_FAILING_WINDOW_S = 60
ALERT_STATE_SAVES_FAILING_FOR_S = 180
# Interactive use: 99% of requests see their first token within 2.5 s, judged over 5 minutes
# of traffic so one slow batch does not page anyone. On time to first token, not the whole
# request: a request's end-to-end time grows with its max_tokens, whatever the load. As the
# ingress measures it (SERVE_INGRESS_TIME_TO_FIRST_TOKEN): the replica's own figure misses
# the wait in Serve's router, where the client's grows under load.
ALERT_SERVE_P99_TTFT_S = 2.5
ALERT_SERVE_LATENCY_FOR_S = 300
# Serve replaces a replica after 3 failed health checks in a row: two replicas unhealthy, or
# this many failures, within the window is a crash loop or a model that hangs.
ALERT_UNHEALTHY_REPLICAS = 2
ALERT_HEALTH_CHECK_FAILURES = 6
ALERT_HEALTH_CHECK_WINDOW_S = 600
# Training figures are reported every --log-every steps; allow a few reports before alerting.
ALERT_TRAINING_FOR_S = 300


# nginx's status for a client that closed the connection before the answer: not a server error
CLIENT_CLOSED_STATUS = 499


def serve_error_kind(status: int, code: str | None) -> str:
    """The SERVE_ERRORS kind of an error response: every 503 read as "overloaded" sent
    operators adding replicas for a missing model or a dead replica."""
    if status == CLIENT_CLOSED_STATUS:
        return "client_closed"
    if status < 500:
        return "bad_request"
    if status == 503:
        return "overloaded" if code == "overloaded" else "unavailable"
    return "internal"


def rejection_reason(message: str, fits_when_free: bool) -> str:
    """The REJECTION_REASONS label for a Rejection (orchestrator/placement.py), from its
    headline: the message is the only place placement states which check failed."""
    headline = message.splitlines()[0] if message else ""
    if "already holds a reservation" in headline or "already waits in the queue" in headline:
        return REJECT_DUPLICATE
    if "GB/s between every pair" in headline:
        return REJECT_BANDWIDTH
    return REJECT_BUSY if fits_when_free else REJECT_CAPACITY


# -- samples: what each component records, as data ------------------------------------------
# Each builder turns the component's own state into (spec, value, tags) samples; the actors
# hand them to ray_layer.telemetry.record_all. Pure functions, so tests check them without Ray.
Sample = tuple[MetricSpec, "float | None", dict[str, str]]

# Node label that says which role a node was launched for (cluster.yaml sets it per node type).
LABEL_NODE_TYPE = "orchestrator.io/node-type"
# Ray's NodeDeathInfo reasons for nodes removed on purpose (ray.core.generated.common_pb2):
# EXPECTED_TERMINATION (ray stop, scale-down) and AUTOSCALER_DRAIN_IDLE. A node gone for
# these is not "down"; a preempted or crashed one is.
RAY_DEATH_EXPECTED = frozenset({1, 4})


def node_samples(report) -> list[Sample]:
    """A NodeReport (orchestrator/inventory.py) as node-agent samples."""
    node = {"node_id": report.node_id,
            "node_type": report.labels.get(LABEL_NODE_TYPE, "")}
    samples: list[Sample] = []
    for source in ("nvml", "declared"):
        samples.append((NODE_GPUS, sum(g.source == source for g in report.gpus),
                        {**node, "source": source}))
    for gpu in report.gpus:
        if gpu.source != "nvml":  # declared GPUs carry a capacity, never a measurement
            continue
        tags = {**node, "gpu": str(gpu.index), "accelerator": gpu.name}
        used = (gpu.memory_used_bytes if gpu.memory_used_bytes is not None
                else gpu.memory_total_bytes - gpu.memory_free_bytes)
        samples += [(GPU_MEMORY_USED, used, tags),
                    (GPU_MEMORY_TOTAL, gpu.memory_total_bytes, tags),
                    (GPU_UTILIZATION, None if gpu.utilization_pct is None
                     else gpu.utilization_pct / 100, tags)]
    if "host" not in report.probe_errors:  # else its load is the stand-in that loses ties
        samples.append((NODE_LOAD_PER_CPU, report.load_per_cpu, node))
    if report.ram_total_bytes > 0:
        samples.append((NODE_MEMORY_USED,
                        1 - report.ram_available_bytes / report.ram_total_bytes, node))
    samples += bandwidth_samples(report.bandwidth_gbps, node)
    for probe in sorted(report.probe_errors):
        samples.append((NODE_PROBE_FAILURES, 1, {**node, "probe": probe}))
    return samples


def bandwidth_samples(bandwidth_gbps: dict[str, float], node: dict[str, str]) -> list[Sample]:
    """A node's measured bandwidth: its BANDWIDTH_EXPORTED_PEERS slowest peers, a summary over
    all it measured and their count; bounded whatever the cluster's size."""
    measured = sorted((gbps, peer) for peer, gbps in bandwidth_gbps.items()
                      if isinstance(gbps, (int, float)) and math.isfinite(gbps))
    samples: list[Sample] = [(NODE_BANDWIDTH, gbps * 1e9, {**node, "peer": peer})
                             for gbps, peer in measured[:BANDWIDTH_EXPORTED_PEERS]]
    if measured:
        figures = [gbps for gbps, _ in measured]
        for stat, gbps in zip(BANDWIDTH_STATS, (figures[0], statistics.median(figures),
                                                 figures[-1])):
            samples.append((NODE_BANDWIDTH_SUMMARY, gbps * 1e9, {**node, "stat": stat}))
    samples.append((NODE_BANDWIDTH_PEERS, len(measured), node))
    return samples


def scheduler_samples(state, waiting_since: list[float], jobs_placed: int, now: float,
                      retired: set[str] = frozenset()) -> list[Sample]:
    """The scheduler's gauges from its ClusterState, when each waiting job last entered the
    queue (`waiting_since`: a preempted job's wait is since its preemption, not its first
    submission, which paged SchedulerQueueStuck seconds after a long job was preempted) and
    the number of jobs holding reservations. `retired` nodes (removed on purpose, see
    RAY_DEATH_EXPECTED) are left out of the health counts."""
    counts = {"healthy": 0, "suspect": 0, "dead": 0}
    for node_id in state.reports:
        if node_id not in retired:
            counts[state.health(node_id, now)] += 1
    samples: list[Sample] = [(SCHEDULER_NODES, n, {"health": h}) for h, n in counts.items()]
    oldest = max((now - t for t in waiting_since), default=0.0)
    samples += [(SCHEDULER_QUEUE_LENGTH, len(waiting_since), {}),
                (SCHEDULER_QUEUE_OLDEST_WAIT, max(oldest, 0.0), {}),
                (SCHEDULER_JOBS_PLACED, jobs_placed, {})]
    return samples


def decision_outcome(decision) -> str:
    from orchestrator.placement import Placement, Queued, Rejection

    if isinstance(decision, Placement):
        return "placed"
    if isinstance(decision, Queued):
        return "queued"
    if isinstance(decision, Rejection):
        return "rejected"
    raise TypeError(f"not a placement decision: {type(decision).__name__}")


def latency_samples(decision, latency_s: float) -> list[Sample]:
    """How long one submit/place request took to decide (counted by decision_samples)."""
    return [(SCHEDULER_PLACEMENT_LATENCY, latency_s, {"outcome": decision_outcome(decision)})]


def decision_samples(decision, latency_s: float | None,
                     reason: str | None = None) -> list[Sample]:
    """One placement decision (Placement, Queued or Rejection from orchestrator/placement.py)
    as samples; latency_s None for decisions made asynchronously (from the queue). `reason`
    overrides the rejection reason read from the message (a queued job the cluster can no
    longer hold is REJECT_CLUSTER_SHRANK, though its message reads like a capacity one)."""
    outcome = decision_outcome(decision)
    samples: list[Sample] = [(SCHEDULER_PLACEMENTS, 1, {"outcome": outcome})]
    if latency_s is not None:
        samples += latency_samples(decision, latency_s)
    if outcome == "rejected":
        reason = reason or rejection_reason(decision.message, decision.fits_when_free)
        samples.append((SCHEDULER_REJECTIONS, 1, {"reason": reason}))
    return samples


def training_samples(metrics: dict, run: str, rank: int, device: str) -> list[Sample]:
    """The figures of one RayTrainSession.report metrics dict (absent or None: skipped), of
    a worker training on `device` (its torch device type: "cuda", "cpu").
    The report's tokens_per_s is the whole job's, the same on every rank: each rank records
    its share, so summing the ranks (the dashboard's panel) gives the job's rate, not N x it."""
    tags = {"run": run, "rank": str(rank), "device": device}
    # A loop's own numpy figures (np.float32 loss, np.int64 step) are numbers too: they were
    # skipped, and its dashboard stayed empty while metrics.jsonl had them.
    metrics = {key: python_scalar(value) for key, value in metrics.items()}
    metrics = {**metrics, "tokens_per_s": per_worker_rate(metrics)}
    return [(spec, metrics[key], tags) for key, spec in TRAIN_REPORT_KEYS.items()
            if _is_figure(metrics.get(key))]


def _is_figure(value) -> bool:
    """Whether `value` (after python_scalar) is a number a series takes (a bool is not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def non_number_report_keys(metrics: dict) -> list[str]:
    """The TRAIN_REPORT_KEYS of `metrics` whose value is there but is no number (text such as
    f"{loss:.3f}", a list, a bool), sorted: training_samples leaves them out, and a loop of
    the user's own is told why its series stay empty. None is a figure not measured."""
    return sorted(key for key in TRAIN_REPORT_KEYS if metrics.get(key) is not None
                  and not _is_figure(python_scalar(metrics[key])))
