"""The metric catalogue (orchestrator/metric_catalogue.py) and everything rendered from it: alert rules
(checked and unit-tested with promtool), the Grafana dashboard, the metrics table."""
import json
import re
import subprocess

import pytest
import yaml

from nodes import NOW, cluster, node
from orchestrator import metric_catalogue as m
from orchestrator import monitoring
from orchestrator.config import JobSpec, TrainConfig
from orchestrator.inventory import GIB, GpuInfo, NodeReport
from orchestrator.placement import PlacementError, Queued, place
from orchestrator.training.efficiency import Thresholds
from tests.prometheus_tools import tool_or_skip

PROM_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")  # no ':' (Ray deprecates it)


# -- the catalogue ----------------------------------------------------------------------------

def test_names_are_unique_valid_and_ours():
    names = [spec.name for spec in m.ALL]
    assert len(names) == len(set(names))
    for spec in m.ALL:
        assert PROM_NAME.match(spec.name) and spec.name.startswith("orchestrator_"), spec.name
        assert spec.description and spec.unit, spec.name
        assert all(PROM_NAME.match(t) for t in spec.tag_keys), spec.name
    assert m.BY_NAME["orchestrator_train_mfu_ratio"] is m.TRAIN_MFU


def test_exported_names_follow_rays_prefix_and_counter_suffix():
    assert m.TRAIN_MFU.exported == "ray_orchestrator_train_mfu_ratio"
    assert m.SERVE_REQUESTS.exported == "ray_orchestrator_serve_requests_total"
    assert m.SERVE_REQUEST_LATENCY.exported == "ray_orchestrator_serve_request_latency_seconds"


@pytest.mark.parametrize("kwargs, problem", [
    (dict(kind="summary"), "kind"),
    (dict(kind=m.HISTOGRAM), "buckets are required"),
    (dict(kind=m.GAUGE, buckets=(1.0,)), "buckets are required"),
    (dict(kind=m.HISTOGRAM, buckets=(2.0, 1.0)), "increasing"),
    (dict(kind=m.HISTOGRAM, buckets=(0.0, 1.0)), "positive"),
])
def test_malformed_specs_are_refused_naming_the_metric(kwargs, problem):
    with pytest.raises(ValueError, match=f"bad_metric.*{problem}"):
        m.MetricSpec("bad_metric", description="d", unit="1", **kwargs)


def test_counter_names_must_not_carry_rays_suffix():
    with pytest.raises(ValueError, match="_total"):
        m.MetricSpec("x_total", m.COUNTER, "d", "1")


def test_serving_names_the_serving_code_imports():
    for spec in (m.SERVE_REQUESTS, m.SERVE_ERRORS, m.SERVE_REQUEST_LATENCY,
                 m.SERVE_TIME_TO_FIRST_TOKEN, m.SERVE_BATCH_SIZE, m.SERVE_QUEUE_DEPTH,
                 m.SERVE_TOKENS_PER_SECOND, m.SERVE_MODEL_VERSION):
        assert spec in m.ALL
    assert "status" in m.SERVE_REQUESTS.tag_keys and "route" in m.SERVE_REQUESTS.tag_keys
    assert "version" in m.SERVE_MODEL_VERSION.tag_keys


def test_training_metrics_cover_every_key_the_loop_reports():
    assert set(m.TRAIN_REPORT_KEYS) == {"loss", "tokens_per_s", "mfu", "comm_share",
                                        "comm_exposed_share", "peak_memory_bytes", "memory_fraction", "loss_scale",
                                        "skipped_steps", "step"}


# -- thresholds ---------------------------------------------------------------------------------

def test_training_thresholds_agree_with_the_progress_log_warnings():
    config, warn = TrainConfig(), Thresholds()
    assert m.ALERT_MIN_MFU == config.warn_min_mfu == warn.min_mfu
    assert m.ALERT_MAX_COMM_SHARE == config.warn_max_comm_share == warn.max_comm_share
    assert m.ALERT_MAX_MEMORY_FRACTION == config.warn_max_memory_fraction \
        == warn.max_memory_fraction


def test_latency_target_is_a_bucket_bound_so_the_p99_is_exact_there():
    assert m.ALERT_SERVE_P99_TTFT_S in m.SERVE_INGRESS_TIME_TO_FIRST_TOKEN.buckets


def test_the_waits_before_a_replica_takes_a_call_have_buckets_up_to_how_long_it_may_wait():
    # A call waits in Serve's router up to replica_wait_s (60 s) before its 503: with buckets
    # ending at 10 s, the router wait's and the client's time to first token's p99 read 10 s
    # whether clients waited 11 s or 59 s.
    from orchestrator.serving.settings import ServeSettings

    for spec in (m.SERVE_ROUTER_WAIT, m.SERVE_INGRESS_TIME_TO_FIRST_TOKEN):
        assert max(spec.buckets) >= ServeSettings().replica_wait_s, spec.name
        assert min(spec.buckets) <= 0.005, spec.name  # (a hop on an idle cluster: ~1-3 ms)


def test_alert_rules_use_the_catalogue_thresholds():
    rules = {r["alert"]: r for r in yaml.safe_load(monitoring.ALERTS_PATH.read_text())
             ["groups"][0]["rules"]}
    assert set(rules) >= {"NodeDown", "TrainingMFULow", "TrainingCommunicationHigh",
                          "TrainingMemoryHigh", "GpuMemoryHigh", "SchedulerQueueStuck",
                          "ServeFirstTokenP99High", "ServeHealthChecksFailing",
                          "SchedulerStateSavesFailing"}
    assert rules["TrainingMFULow"]["expr"].endswith(f"< {m.ALERT_MIN_MFU}")
    assert rules["TrainingCommunicationHigh"]["expr"].endswith(f"> {m.ALERT_MAX_COMM_SHARE}")
    # On the exposed share: all-reduce hidden behind backward does not slow a step.
    assert m.TRAIN_COMM_EXPOSED_SHARE.exported in rules["TrainingCommunicationHigh"]["expr"]
    assert m.TRAIN_COMM_SHARE.exported not in rules["TrainingCommunicationHigh"]["expr"]
    assert rules["TrainingMemoryHigh"]["expr"].endswith(f"> {m.ALERT_MAX_MEMORY_FRACTION}")
    assert rules["GpuMemoryHigh"]["expr"].endswith(f"> {m.ALERT_MAX_GPU_MEMORY_USED}")
    assert "caching allocator" in rules["GpuMemoryHigh"]["annotations"]["description"]
    assert rules["SchedulerQueueStuck"]["expr"].endswith(f"> {m.ALERT_QUEUE_STUCK_AFTER_S}")
    assert rules["ServeFirstTokenP99High"]["expr"].endswith(f"> {m.ALERT_SERVE_P99_TTFT_S}")
    assert rules["ServeHealthChecksFailing"]["expr"].endswith(
        f">= {m.ALERT_HEALTH_CHECK_FAILURES})")
    assert rules["NodeDown"]["for"] == f"{m.ALERT_NODE_DOWN_FOR_S}s"
    assert rules["SchedulerStateSavesFailing"]["for"] == f"{m.ALERT_STATE_SAVES_FAILING_FOR_S}s"
    assert (f"{m.SCHEDULER_STATE_SAVES_FAILED.exported}"
            f"[{m.ALERT_STATE_SAVES_FAILING_WINDOW_S // 60}m]"
            in rules["SchedulerStateSavesFailing"]["expr"])


# -- rendered files -----------------------------------------------------------------------------

def test_checked_in_files_are_what_the_catalogue_renders():
    assert monitoring.main(["--check"]) == 0, "run `python -m orchestrator.monitoring`"


def referenced_series(expr: str) -> set[str]:
    return set(re.findall(r"\b(ray_[a-zA-Z0-9_]+)", expr))


def known_series() -> set[str]:
    known = {m.RAY_SERVE_HEALTH_CHECK_FAILURES, m.RAY_SERVE_REPLICA_HEALTHY}
    for spec in m.ALL:
        known.add(spec.exported)
        if spec.kind == m.HISTOGRAM:
            known |= {f"{spec.exported}_{part}" for part in ("bucket", "sum", "count")}
    return known


def test_alert_rules_reference_only_catalogue_series():
    for rule in monitoring.ALERT_RULES:
        series = referenced_series(rule.expr)
        assert series and series <= known_series(), (rule.name, series - known_series())


# Labels: a query on a label its series does not carry is valid PromQL that matches nothing
# (a selector), groups everything into one series (by) or joins nothing (on); a legend or
# an alert text naming a label the aggregation dropped shows it empty.
def series_labels() -> dict[str, set[str]]:
    """Every series we may query -> the labels we (or Serve) set on it; `le` on buckets."""
    labels = {name: set(m.RAY_SERVE_LABELS) for name in (m.RAY_SERVE_HEALTH_CHECK_FAILURES,
                                                         m.RAY_SERVE_REPLICA_HEALTHY)}
    for spec in m.ALL:
        if spec.kind == m.HISTOGRAM:
            labels[f"{spec.exported}_bucket"] = {*spec.tag_keys, "le"}
            labels[f"{spec.exported}_sum"] = labels[f"{spec.exported}_count"] = set(spec.tag_keys)
        else:
            labels[spec.exported] = set(spec.tag_keys)
    return labels


def label_values() -> dict[tuple[str, str], set[str]]:
    """(series, label) -> every value the product records, for labels with a closed set."""
    health = {t["health"] for spec, _, t in m.scheduler_samples(cluster(), [], 0, NOW)
              if spec is m.SCHEDULER_NODES}
    return {(m.SCHEDULER_NODES.exported, "health"): health,
            (m.SCHEDULER_REJECTIONS.exported, "reason"): set(m.REJECTION_REASONS)}


SERIES = re.compile(r"\b(ray_[a-zA-Z0-9_]+)(?:\{([^}]*)\})?")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
BARE_AGGREGATION = re.compile(r"\b(?:sum|avg|min|max|count|group|stddev|stdvar)\s*\(")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def label_problems(expr: str, shown: list[str] = ()) -> list[str]:
    """What in `expr` asks for a label its series lack: selectors, by/on lists (every series
    of the expression must carry each), and `shown` labels (a legend's {{x}}, an alert's
    $labels.x), which every grouping must also keep."""
    known, values = series_labels(), label_values()
    problems, used = [], []
    for name, selector in SERIES.findall(expr):
        if name not in known:
            problems.append(f"{name} is not a series we export")
            continue
        used.append(name)
        for label, op, value in MATCHER.findall(selector):
            if label not in known[name]:
                problems.append(f"{name}{{{label}...}}: {name} has no label {label!r}")
            elif op == "=" and (name, label) in values and value not in values[name, label]:
                problems.append(f"{name}{{{label}={value!r}}}: never recorded; "
                                f"{sorted(values[name, label])}")
    groups = [{g.strip() for g in group.split(",") if g.strip()}
              for group in GROUPING.findall(expr)]
    groups += [set()] * len(BARE_AGGREGATION.findall(expr))  # sum(...) keeps no label
    for label in set().union(*groups):
        problems += [f"by/on ({label}): {name} has no label {label!r}"
                     for name in used if label not in known[name]]
    for label in shown:
        if any(label not in group for group in groups) or \
                any(label not in known[name] for name in used):
            problems.append(f"shows {label!r}, which the query's result does not carry")
    return problems


def test_alert_rules_query_only_labels_their_series_carry():
    for rule in monitoring.ALERT_RULES:
        shown = re.findall(r"\$labels\.([a-zA-Z_]+)", rule.summary + rule.description)
        assert label_problems(rule.expr, shown) == [], rule.name


def test_dashboard_queries_only_labels_their_series_carry():
    for panel in (p for row in monitoring._panels().values() for p in row):
        for expr, legend in ((panel.expr, panel.legend), *panel.more):
            shown = re.findall(r"\{\{\s*([a-zA-Z_]+)\s*\}\}", legend)
            assert label_problems(expr, shown) == [], (panel.title, expr)


@pytest.mark.parametrize("expr, shown, problem", [
    (f'max({m.SCHEDULER_NODES.exported}{{status="dead"}})', [], "no label 'status'"),
    (f'max({m.SCHEDULER_NODES.exported}{{health="down"}})', [], "never recorded"),
    (f"avg by (node_id) ({m.TRAIN_MFU.exported})", [], "no label 'node_id'"),
    (f"avg by (run) ({m.TRAIN_MFU.exported})", ["rank"], "shows 'rank'"),
    (f"sum({m.SERVE_QUEUE_DEPTH.exported})", ["deployment"], "shows 'deployment'"),
    (f"histogram_quantile(0.99, sum by (le) (rate({m.SERVE_QUEUE_DEPTH.exported}[5m])))", [],
     "no label 'le'"),
    (f"{m.GPU_MEMORY_USED.exported} / on (node_id, route) {m.GPU_MEMORY_TOTAL.exported}", [],
     "no label 'route'"),
    ("rate(ray_orchestrator_serve_requests[1m])", [], "not a series we export"),
])
def test_the_label_check_catches_queries_that_would_match_nothing(expr, shown, problem):
    assert any(problem in p for p in label_problems(expr, shown)), label_problems(expr, shown)


def test_dashboard_is_valid_grafana_json_covering_the_catalogue():
    dashboard = json.loads(monitoring.DASHBOARD_PATH.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    used = set()
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
        for target in panel["targets"]:
            series = referenced_series(target["expr"])
            assert series and series <= known_series(), (panel["title"], series)
            used |= series
    # Every metric of ours is on some panel.
    assert {spec.exported for spec in m.ALL} <= {s.removesuffix("_bucket").removesuffix("_sum")
                                                   .removesuffix("_count") for s in used}
    # No two panels overlap on Grafana's 24-column grid.
    cells = set()
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine and g["x"] + g["w"] <= 24, panel["title"]
        cells |= mine


def test_metrics_table_lists_every_metric_with_its_type_and_labels():
    table = monitoring.TABLE_PATH.read_text()
    rows = {line.split("|")[1].strip(" `"): line for line in table.splitlines()
            if line.startswith("| `ray_")}
    assert set(rows) == {spec.exported for spec in m.ALL}
    for spec in m.ALL:
        assert f"| {spec.kind} |" in rows[spec.exported]
        assert all(f"`{t}`" in rows[spec.exported] for t in spec.tag_keys)
    for rule in monitoring.ALERT_RULES:
        assert f"| {rule.name} |" in table


# Not metrics, though they look like one: the key a training function returns its GPU
# shortfall under (ray_layer/train_session.GPU_SHORTFALL, docs/scheduler.md).
NOT_METRICS = {"orchestrator_gpu_too_small"}


def metric_names_in_prose_docs() -> dict[str, list[str]]:
    """Each metric-like name the README and docs/*.md write -> where (benchmarks.md and
    changes.md are logs: their old entries keep the names of their day)."""
    pages = [monitoring.REPO / "README.md"] + [
        p for p in sorted((monitoring.REPO / "docs").glob("*.md"))
        if p.name not in ("benchmarks.md", "changes.md")]
    found: dict[str, list[str]] = {}
    for page in pages:
        for number, line in enumerate(page.read_text().splitlines(), 1):
            for name in re.findall(r"\b(?:ray_)?orchestrator_[a-z0-9_]+", line):
                found.setdefault(name, []).append(f"{page.name}:{number}")
    return found


def test_every_metric_the_docs_name_is_one_the_catalogue_exports():
    # A name is queryable as exported (with a histogram's series suffixes) or recorded
    # (prose that says "Ray adds the ray_ prefix"); a mix of the two, the recorded name with
    # Ray's counter suffix, is neither, and cannot be found in Prometheus as written.
    known = {spec.name for spec in m.ALL} | NOT_METRICS
    for spec in m.ALL:
        known |= {spec.exported + suffix for suffix in ("", "_bucket", "_sum", "_count")}
    unknown = {name: where for name, where in metric_names_in_prose_docs().items()
               if name not in known}
    assert unknown == {}


def test_training_docs_name_the_series_of_each_report_key_named_otherwise():
    # docs/training.md maps a loop's report keys to their series; a key whose series is not
    # `_train_<key>` must be mapped by name (it said `memory_fraction` went to a series of
    # that name: _train_memory_fraction does not exist, _train_memory_fraction_ratio does).
    text = " ".join((monitoring.REPO / "docs" / "training.md").read_text().split())
    for key, spec in m.TRAIN_REPORT_KEYS.items():
        if spec.name != f"orchestrator_train_{key}":
            series = spec.name.removeprefix("orchestrator")
            assert re.search(rf"`{key}` → `(?:ray_orchestrator)?{series}`", text), key


# -- promtool ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def promtool():
    return tool_or_skip("promtool")


def test_promtool_accepts_the_rules_and_the_prometheus_config(promtool):
    for command in (["check", "rules", str(monitoring.ALERTS_PATH)],
                    ["check", "config", str(monitoring.PROMETHEUS_PATH)]):
        result = subprocess.run([promtool, *command], capture_output=True, text=True,
                                cwd=monitoring.PROMETHEUS_PATH.parent, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


def series(name, labels, values):
    selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{selector}}}", "values": values}


def alert_cases() -> list[dict]:
    """promtool unit tests: for each alert, inputs on both sides of its catalogue threshold.
    Values are written with the thresholds, so they move with the catalogue."""
    mins = 12  # every rule's `for` is at most 5 minutes: evaluate 12 minutes in
    flat = lambda v: f"{v}x{mins * 2}"  # noqa: E731 - one sample every 30 s
    run = {"run": "r1", "rank": "0", "device": "cuda"}
    cases = []

    def case(series_list, alert, fired_labels):
        cases.append({"interval": "30s", "input_series": series_list, "alert_rule_test": [
            {"eval_time": f"{mins}m", "alertname": alert,
             "exp_alerts": [{"exp_labels": {**lbl, "severity": sev}} for lbl, sev in fired_labels]}]})

    sev = {r.name: r.severity for r in monitoring.ALERT_RULES}
    for alert, spec, low, high, fires_high in (
            ("TrainingMFULow", m.TRAIN_MFU, m.ALERT_MIN_MFU - 0.01, m.ALERT_MIN_MFU + 0.01, False),
            ("TrainingCommunicationHigh", m.TRAIN_COMM_EXPOSED_SHARE,
             m.ALERT_MAX_COMM_SHARE - 0.01, m.ALERT_MAX_COMM_SHARE + 0.01, True),
            ("TrainingMemoryHigh", m.TRAIN_MEMORY_FRACTION, m.ALERT_MAX_MEMORY_FRACTION - 0.01,
             m.ALERT_MAX_MEMORY_FRACTION + 0.01, True)):
        case([series(spec.exported, run, flat(high if fires_high else low))], alert,
             [({"run": "r1"}, sev[alert])])
        case([series(spec.exported, run, flat(low if fires_high else high))], alert, [])
    # All-reduce in flight most of the step but hidden behind backward: no alert.
    case([series(m.TRAIN_COMM_SHARE.exported, run, flat(0.9)),
          series(m.TRAIN_COMM_EXPOSED_SHARE.exported, run, flat(0.01))],
         "TrainingCommunicationHigh", [])
    # 45% is a GPU figure (the training log warns on GPUs only): a CPU run, far below it
    # against the CPU's measured matmul peak, fired TrainingMFULow for its whole length.
    case([series(m.TRAIN_MFU.exported, {**run, "device": "cpu"}, flat(0.02))],
         "TrainingMFULow", [])
    gpu = {"node_id": "n1", "gpu": "0", "node_type": "train", "accelerator": "A100"}
    # A healthy training run holds ~92% in NVML's eyes (PyTorch's cached blocks, the CUDA
    # context, NCCL's buffers): the alert fired on it at 90%.
    for used, fired in ((m.ALERT_MAX_GPU_MEMORY_USED + 0.01, True), (0.92, False),
                        (0.5, False)):
        case([series(m.GPU_MEMORY_USED.exported, gpu, flat(int(used * 80 * GIB))),
              series(m.GPU_MEMORY_TOTAL.exported, gpu, flat(80 * GIB))], "GpuMemoryHigh",
             [({"node_id": "n1", "gpu": "0"}, sev["GpuMemoryHigh"])] if fired else [])
    # A node suspect (late heartbeats); a node lost; a node count that merely stays dead.
    nodes = m.SCHEDULER_NODES.exported
    case([series(nodes, {"health": "suspect"}, flat(1)),
          series(nodes, {"health": "dead"}, flat(0))], "NodeDown", [({}, sev["NodeDown"])])
    case([series(nodes, {"health": "suspect"}, flat(0)),
          series(nodes, {"health": "dead"}, f"0x{mins * 2 - 4} 1x4")], "NodeDown",
         [({}, sev["NodeDown"])])
    case([series(nodes, {"health": "suspect"}, flat(0)),
          series(nodes, {"health": "dead"}, flat(1))], "NodeDown", [])
    wait = m.SCHEDULER_QUEUE_OLDEST_WAIT.exported
    case([series(wait, {}, flat(m.ALERT_QUEUE_STUCK_AFTER_S + 1))], "SchedulerQueueStuck",
         [({}, sev["SchedulerQueueStuck"])])
    case([series(wait, {}, flat(m.ALERT_QUEUE_STUCK_AFTER_S - 1))], "SchedulerQueueStuck", [])
    # The scheduler's saves to the GCS: each maintenance pass (every 5 s) tries an unsaved
    # state again, so saves that keep failing count 6 every 30 s. Failing throughout: page.
    # Failing for less than the rule's `for` (2 minutes so far, still failing): quiet yet;
    # one failed save long ago, its counter standing since: quiet; a lone failed save 3.5
    # minutes ago, saved again at the next pass: quiet (a window as long as the `for` paged).
    saves = m.SCHEDULER_STATE_SAVES_FAILED.exported
    failing_for = m.ALERT_STATE_SAVES_FAILING_FOR_S // 30 - 1  # samples, one short of `for`
    case([series(saves, {}, f"0+6x{mins * 2}")], "SchedulerStateSavesFailing",
         [({}, sev["SchedulerStateSavesFailing"])])
    case([series(saves, {}, f"0x{mins * 2 - failing_for} 6+6x{failing_for}")],
         "SchedulerStateSavesFailing", [])
    case([series(saves, {}, f"1x{mins * 2}")], "SchedulerStateSavesFailing", [])
    case([series(saves, {}, f"1x{mins * 2 - 8} 2x8")], "SchedulerStateSavesFailing", [])
    # p99 time to first token, as clients wait for it (at the ingress): every request in the
    # bucket just above the target, or in the first one. The replica's own figure, fast
    # while requests wait in Serve's router, does not hold the page back.
    target = m.ALERT_SERVE_P99_TTFT_S

    def ttft(spec, slow):
        return [series(f"{spec.exported}_bucket",
                       {"deployment": "gpt", "route": "/v1/completions", "le": str(bound)},
                       f"0+{0 if slow and bound != '+Inf' and bound <= target else 10}x{mins * 2}")
                for bound in (*spec.buckets, "+Inf")]
    for slow in (True, False):
        case(ttft(m.SERVE_INGRESS_TIME_TO_FIRST_TOKEN, slow)
             + ttft(m.SERVE_TIME_TO_FIRST_TOKEN, False), "ServeFirstTokenP99High",
             [({"deployment": "gpt"}, sev["ServeFirstTokenP99High"])] if slow else [])
    # Serve (live Ray 2.60): a replica stopped as unhealthy has its healthy gauge at 0 for a
    # scrape or two, then the series goes; its failure counter appears already at 3 and stays.
    deployment = {"application": "app", "deployment": "gpt"}
    healthy, failures = m.RAY_SERVE_REPLICA_HEALTHY, m.RAY_SERVE_HEALTH_CHECK_FAILURES

    def replaced(replica, at_min):  # healthy until at_min, 0 for one scrape, then gone
        return series(healthy, {**deployment, "replica": replica},
                      f"1x{at_min * 2 - 1} 0")

    def counted(replica, at_min):
        return series(failures, {**deployment, "replica": replica},
                      f"_x{at_min * 2} 3x{(mins - at_min) * 2}" if at_min else f"3x{mins * 2}")

    # A crash loop: two replicas replaced within the window.
    case([replaced("r1", 5), replaced("r2", 8), counted("r1", 5), counted("r2", 8)],
         "ServeHealthChecksFailing", [(deployment, sev["ServeHealthChecksFailing"])])
    # One replica replaced: no page; nor for replicas replaced long before (series still there,
    # their whole count included where the data before them is missing, as after a restart).
    case([replaced("r1", 5), counted("r1", 5), counted("old", 0)], "ServeHealthChecksFailing",
         [])
    case([series(failures, {**deployment, "replica": f"old{i}"}, f"_x{mins} 3x{mins}")
          for i in range(4)], "ServeHealthChecksFailing", [])
    # An autoscaling scale-down (or a rolling update): Serve sets the gauge of every replica it
    # stops to 0; none failed a health check, so no page (it paged as a crash loop).
    case([replaced("r1", 5), replaced("r2", 8), series(healthy, {**deployment, "replica": "r3"},
                                                       flat(1)), counted("r3", 0)],
         "ServeHealthChecksFailing", [])
    # A scale-down of two replicas that each failed one check long before the window (a
    # hang-check timeout under the load that preceded it): their totals are 1, not failures
    # within the window.
    case([replaced("r1", 5), replaced("r2", 8),
          *(series(failures, {**deployment, "replica": r}, flat(1)) for r in ("r1", "r2"))],
         "ServeHealthChecksFailing", [])
    # Failure counts per deployment (Serve's high-cardinality tags off): by their increase.
    case([series(failures, deployment, f"0+0.5x{mins * 2}")], "ServeHealthChecksFailing",
         [(deployment, sev["ServeHealthChecksFailing"])])
    return cases


def test_every_alert_fires_past_its_threshold_and_stays_quiet_before(promtool, tmp_path):
    # promtool compares annotations too; they are presentation (rendered $value), so the
    # rules under test are alerts.yml without them: same expressions, durations and labels.
    rules = yaml.safe_load(monitoring.ALERTS_PATH.read_text())
    for rule in rules["groups"][0]["rules"]:
        rule.pop("annotations")
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    tests = {"rule_files": [str(tmp_path / "rules.yml")], "evaluation_interval": "30s",
             "tests": alert_cases()}
    tested = {t["alert_rule_test"][0]["alertname"] for t in tests["tests"]}
    assert tested == {r.name for r in monitoring.ALERT_RULES}
    path = tmp_path / "alerts_test.yml"
    path.write_text(yaml.safe_dump(tests))
    result = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# -- samples: what each component records ---------------------------------------------------------

def by_metric(samples):
    out = {}
    for spec, value, tags in samples:
        out.setdefault(spec.name, []).append((value, tags))
    return out


def test_node_samples_export_measured_gpus_host_and_bandwidth():
    measured = GpuInfo(0, "NVIDIA A100-SXM4-80GB", 80 * GIB, 60 * GIB, utilization_pct=75.0,
                       memory_used_bytes=20 * GIB)
    declared = GpuInfo(1, "T4", 16 * GIB, 16 * GIB, source="declared")
    report = NodeReport("n1", "host", 8, 2, 8, 4.0, 64 * GIB, 16 * GIB,
                        gpus=(measured, declared), labels={m.LABEL_NODE_TYPE: "train"},
                        probe_errors={"nvml": "boom"}, bandwidth_gbps={"n2": 1.5})
    s = by_metric(m.node_samples(report))
    tags = {"node_id": "n1", "node_type": "train", "gpu": "0",
            "accelerator": "NVIDIA A100-SXM4-80GB"}
    assert s[m.GPU_MEMORY_USED.name] == [(20 * GIB, tags)]  # declared GPUs: no measurement
    assert s[m.GPU_MEMORY_TOTAL.name] == [(80 * GIB, tags)]
    assert s[m.GPU_UTILIZATION.name] == [(0.75, tags)]
    assert sorted((v, t["source"]) for v, t in s[m.NODE_GPUS.name]) == [(1, "declared"),
                                                                         (1, "nvml")]
    assert s[m.NODE_LOAD_PER_CPU.name][0][0] == 0.5
    assert s[m.NODE_MEMORY_USED.name][0][0] == 0.75
    assert s[m.NODE_BANDWIDTH.name] == [(1.5e9, {"node_id": "n1", "node_type": "train",
                                                 "peer": "n2"})]
    assert s[m.NODE_PROBE_FAILURES.name][0][1]["probe"] == "nvml"
    for spec, _, tags in m.node_samples(report):
        assert set(tags) == set(spec.tag_keys), spec.name


def test_bandwidth_series_per_node_are_bounded_whatever_the_cluster_size():
    # Every node exported one series per peer: n^2 series, a million at 1,000 nodes. Now its
    # slowest BANDWIDTH_EXPORTED_PEERS peers and a summary over all it measured.
    peers = {f"p{i:04d}": 1.0 + i / 100 for i in range(999)}
    report = NodeReport("n1", "host", 8, 2, 8, 4.0, 64 * GIB, 16 * GIB,
                        labels={m.LABEL_NODE_TYPE: "train"}, bandwidth_gbps=peers)
    s = by_metric(m.node_samples(report))
    k = m.BANDWIDTH_EXPORTED_PEERS
    assert 0 < k <= 16
    slowest = sorted(s[m.NODE_BANDWIDTH.name], key=lambda vt: vt[0])
    assert [t["peer"] for _, t in slowest] == [f"p{i:04d}" for i in range(k)]
    assert [v for v, _ in slowest] == pytest.approx([(1.0 + i / 100) * 1e9 for i in range(k)])
    summary = {t["stat"]: v for v, t in s[m.NODE_BANDWIDTH_SUMMARY.name]}
    assert summary == pytest.approx({"min": 1e9, "median": 5.99e9, "max": 10.98e9})
    assert s[m.NODE_BANDWIDTH_PEERS.name] == [(999, {"node_id": "n1", "node_type": "train"})]
    assert len(m.node_samples(report)) < 2 * k + 10
    for spec, _, tags in m.node_samples(report):
        assert set(tags) == set(spec.tag_keys), spec.name
    # Nothing measured yet: no summary (not a zero), the count says 0.
    empty = by_metric(m.node_samples(NodeReport("n1", "host", 8, 2, 8, 4.0, 64 * GIB,
                                                16 * GIB)))
    assert m.NODE_BANDWIDTH.name not in empty and m.NODE_BANDWIDTH_SUMMARY.name not in empty
    assert empty[m.NODE_BANDWIDTH_PEERS.name][0][0] == 0


def test_a_failed_host_probe_exports_no_load_or_memory_figure(monkeypatch):
    # Its stand-in load (10^6, so the node loses every tie-break) was drawn on the dashboard
    # as a load of a million per CPU.
    from orchestrator import probes

    def no_psutil():
        raise ImportError("No module named 'psutil'")

    monkeypatch.setattr(probes, "probe_host", no_psutil)
    errors = {}
    host = probes.host_figures(errors)
    report = NodeReport(node_id="n1", ray_cpus=8, ray_gpus=0, probe_errors=errors, **host)
    s = by_metric(m.node_samples(report))
    assert m.NODE_LOAD_PER_CPU.name not in s and m.NODE_MEMORY_USED.name not in s
    assert s[m.NODE_PROBE_FAILURES.name][0][1]["probe"] == "host"


def test_load_per_cpu_is_drawn_as_a_plain_number_not_a_percentage():
    # As a "ratio" Grafana drew a load of 2 per CPU as 200%.
    panels = [p for row in monitoring._panels().values() for p in row]
    load = next(p for p in panels if p.spec is m.NODE_LOAD_PER_CPU)
    assert monitoring.GRAFANA_UNITS[load.spec.unit] == "short"
    assert "cgroup" in m.NODE_MEMORY_USED.description


def test_scheduler_samples_count_health_queue_and_skip_retired_nodes():
    state = cluster(node("a"), node("b"), node("c"))
    state.update(node("a"), now=NOW + 40)  # b and c are 40 s late: suspect (after 30 s)
    state.mark_dead("c")
    s = by_metric(m.scheduler_samples(state, [NOW + 10, NOW + 25], 1, NOW + 40))
    health = {t["health"]: v for v, t in s[m.SCHEDULER_NODES.name]}
    assert health == {"healthy": 1, "suspect": 1, "dead": 1}
    assert s[m.SCHEDULER_QUEUE_LENGTH.name] == [(2, {})]
    assert s[m.SCHEDULER_QUEUE_OLDEST_WAIT.name] == [(30.0, {})]
    assert s[m.SCHEDULER_JOBS_PLACED.name] == [(1, {})]
    retired = by_metric(m.scheduler_samples(state, [], 0, NOW + 40, retired={"c"}))
    assert {t["health"]: v for v, t in retired[m.SCHEDULER_NODES.name]}["dead"] == 0
    assert retired[m.SCHEDULER_QUEUE_OLDEST_WAIT.name] == [(0.0, {})]


def rejection(spec, state):
    with pytest.raises(PlacementError) as e:
        place(spec, state, NOW)
    return e.value.rejection


def test_decisions_are_counted_by_outcome_and_rejections_by_reason():
    state = cluster(node("a", cpus=4), node("b", cpus=4))
    placed = place(JobSpec("fits", num_workers=2), state, NOW)
    s = by_metric(m.decision_samples(placed, 0.002))
    assert s[m.SCHEDULER_PLACEMENTS.name] == [(1, {"outcome": "placed"})]
    assert s[m.SCHEDULER_PLACEMENT_LATENCY.name] == [(0.002, {"outcome": "placed"})]
    assert m.SCHEDULER_REJECTIONS.name not in s
    queued = by_metric(m.decision_samples(Queued("q", 1, "waiting"), None))
    assert queued == {m.SCHEDULER_PLACEMENTS.name: [(1, {"outcome": "queued"})]}

    state.reserve("fits", placed.reservations())
    reasons = {
        m.REJECT_DUPLICATE: rejection(JobSpec("fits"), state),
        m.REJECT_CAPACITY: rejection(JobSpec("huge", num_workers=50), state),
        m.REJECT_BUSY: rejection(JobSpec("later", num_workers=8), state),
    }
    state.release("fits")
    reasons[m.REJECT_BANDWIDTH] = rejection(
        JobSpec("fast", num_workers=2, cpus_per_worker=4, min_bandwidth_gbps=1000), state)
    for reason, rej in reasons.items():
        s = by_metric(m.decision_samples(rej, 0.001))
        assert s[m.SCHEDULER_REJECTIONS.name] == [(1, {"reason": reason})], rej.message
    shrank = by_metric(m.decision_samples(reasons[m.REJECT_CAPACITY], None,
                                          reason=m.REJECT_CLUSTER_SHRANK))
    assert shrank[m.SCHEDULER_REJECTIONS.name] == [(1, {"reason": "cluster_shrank"})]
    assert set(reasons) | {m.REJECT_CLUSTER_SHRANK} == set(m.REJECTION_REASONS)


def test_training_samples_skip_figures_not_measured():
    report = {"loss": 2.5, "tokens_per_s": 1000.0, "mfu": 0.3, "comm_share": None,
              "peak_memory_bytes": 10 ** 8, "memory_fraction": 0.1, "loss_scale": None,
              "skipped_steps": 0, "step": 20, "lr": 1e-3, "worker_nodes": ["n"]}
    s = by_metric(m.training_samples(report, "run-1", 1, "cuda"))
    assert set(s) == {m.TRAIN_REPORT_KEYS[k].name for k in
                      ("loss", "tokens_per_s", "mfu", "peak_memory_bytes", "memory_fraction",
                       "skipped_steps", "step")}
    assert s[m.TRAIN_MFU.name] == [(0.3, {"run": "run-1", "rank": "1", "device": "cuda"})]


def test_report_keys_whose_value_is_no_number_are_named_not_dropped_silently():
    # `"loss": f"{loss:.3f}"` (text), a one-element list, a bool: training_samples skips
    # them and the loop's dashboard stayed empty, with nothing said. None is "not measured".
    import numpy as np

    report = {"loss": "0.500", "step": True, "mfu": [0.3], "tokens_per_s": np.float32(9.0),
              "comm_share": None, "peak_memory_bytes": 10 ** 8, "note": "text"}
    assert m.non_number_report_keys(report) == ["loss", "mfu", "step"]
    assert m.non_number_report_keys({"loss": 2.5, "step": 3, "lr": "cosine"}) == []


def test_each_rank_records_its_share_of_the_jobs_tokens_per_second():
    # The report's tokens_per_s covers all workers and every rank reports it: summed over
    # ranks (the dashboard's panel) it must be the job's rate, not world_size times it.
    report = {"tokens_per_s": 8000.0, "world_size": 4}
    shares = [by_metric(m.training_samples(report, "run-1", rank, "cpu"))
              [m.TRAIN_TOKENS_PER_SECOND.name][0][0] for rank in range(4)]
    assert sum(shares) == 8000.0


# -- ray_layer/telemetry.py (without Ray: the Ray metric objects are replaced) -----------------------

class FakeMetric:
    def __init__(self):
        self.calls = []

    def set(self, value, tags):
        self.calls.append(("set", value, tags))

    def inc(self, value, tags):
        self.calls.append(("inc", value, tags))

    def observe(self, value, tags):
        self.calls.append(("observe", value, tags))


@pytest.fixture
def fake_metrics(monkeypatch):
    from ray_layer import telemetry

    made = {}
    monkeypatch.setattr(telemetry, "_metric", lambda spec: made.setdefault(spec.name, FakeMetric()))
    monkeypatch.setattr(telemetry, "_held", {})
    monkeypatch.setattr(telemetry, "_refresher", "started")  # no thread: tests refresh by hand
    return telemetry, made


def test_a_gauge_is_held_for_prometheus_between_records_then_let_go(fake_metrics):
    # Ray's agent drops a gauge not set again within 20 s: a model version recorded at load, or
    # an MFU reported every few minutes, vanished between records and alerts never fired.
    telemetry, made = fake_metrics
    telemetry.record(m.SERVE_MODEL_VERSION, 1, deployment="gpt", version="v1")
    telemetry.record(m.SERVE_GENERATED_TOKENS, 5, deployment="gpt")  # counters need nothing
    # Recorded every heartbeat: not held (a peer that left must vanish, not linger).
    telemetry.record(m.NODE_BANDWIDTH, 2e9, node_id="n", node_type="t", peer="gone")
    recorded_at = telemetry._held[next(iter(telemetry._held))][3]
    assert telemetry.refresh_gauges(recorded_at + 60) == 1
    assert made[m.SERVE_MODEL_VERSION.name].calls == [
        ("set", 1.0, {"deployment": "gpt", "version": "v1"})] * 2
    assert telemetry.refresh_gauges(recorded_at + telemetry.GAUGE_HOLD_S + 1) == 0
    assert len(made[m.SERVE_MODEL_VERSION.name].calls) == 2 and not telemetry._held


def test_record_uses_the_kind_and_skips_what_was_not_measured(fake_metrics):
    import numpy as np

    telemetry, made = fake_metrics
    telemetry.record(m.TRAIN_MFU, np.float64(0.4), run="r", rank=0, device="cpu")
    telemetry.record(m.SCHEDULER_PLACEMENTS, 1, outcome="placed")
    telemetry.record(m.SCHEDULER_PLACEMENT_LATENCY, 0.01, outcome="placed")
    for skipped in (None, float("nan"), float("inf")):
        telemetry.record(m.TRAIN_LOSS, skipped, run="r", rank=0, device="cpu")
    assert made[m.TRAIN_MFU.name].calls == [("set", 0.4, {"run": "r", "rank": "0", "device": "cpu"})]
    assert made[m.SCHEDULER_PLACEMENTS.name].calls[0][0] == "inc"
    assert made[m.SCHEDULER_PLACEMENT_LATENCY.name].calls[0][0] == "observe"
    assert m.TRAIN_LOSS.name not in made


def test_a_held_gauge_that_turns_nan_is_no_longer_re_sent(fake_metrics):
    # A diverged run: its last finite loss, re-sent for ten minutes, showed it healthy.
    telemetry, made = fake_metrics
    telemetry.record(m.TRAIN_LOSS, 2.31, run="a", rank=0, device="cpu")
    telemetry.record(m.TRAIN_LOSS, 2.5, run="b", rank=0, device="cpu")
    telemetry.record(m.TRAIN_LOSS, float("nan"), run="a", rank=0, device="cpu")
    recorded_at = telemetry._held[next(iter(telemetry._held))][3]
    assert telemetry.refresh_gauges(recorded_at + 5) == 1  # run b's only
    assert made[m.TRAIN_LOSS.name].calls[-1] == ("set", 2.5, {"run": "b", "rank": "0", "device": "cpu"})


def test_record_refuses_a_wrong_tag_set_naming_the_metric(fake_metrics):
    telemetry, _ = fake_metrics
    with pytest.raises(ValueError, match="orchestrator_train_mfu_ratio.*missing.*rank"):
        telemetry.record(m.TRAIN_MFU, 0.5, run="r")
    with pytest.raises(ValueError, match="unknown.*colour"):
        telemetry.record(m.SCHEDULER_QUEUE_LENGTH, 1, colour="red")


def test_a_failing_metric_backend_never_raises(monkeypatch, caplog):
    from ray_layer import telemetry

    def broken(spec):
        raise RuntimeError("no metrics agent")

    monkeypatch.setattr(telemetry, "_metric", broken)
    monkeypatch.setattr(telemetry, "_failed", set())
    telemetry.record(m.SCHEDULER_QUEUE_LENGTH, 3)
    telemetry.record(m.SCHEDULER_QUEUE_LENGTH, 4)
    assert caplog.text.count("cannot record metric orchestrator_scheduler_queue_length") == 1


def test_continuous_batching_records_its_steps_as_batches(monkeypatch):
    # Only static batching recorded batch size, queue depth and tokens/s: with the default
    # continuous batching those panels stayed empty.
    import time
    from types import SimpleNamespace

    from ray_layer import serve_model

    replica_class = serve_model.GPTModel.func_or_class
    recorded = []
    monkeypatch.setattr(serve_model, "record",
                        lambda spec, value, **tags: recorded.append((spec.name, value)))
    replica = SimpleNamespace(deployment="gpt", decode_window=(time.monotonic() - 2.0, 30))
    replica._record_batch_metrics = lambda size, waiting: \
        replica_class._record_batch_metrics(replica, size, waiting)
    replica_class._record_step(replica, rows=3, waiting=2, produced=3)
    names = dict(recorded)
    assert names[m.SERVE_BATCH_SIZE.name] == 3 and names[m.SERVE_BATCHED_REQUESTS.name] == 3
    assert names[m.SERVE_QUEUE_DEPTH.name] == 2
    assert 10 < names[m.SERVE_TOKENS_PER_SECOND.name] < 20  # 33 tokens over ~2 s


@pytest.mark.parametrize("status, code, kind", [
    (400, None, "bad_request"), (503, "overloaded", "overloaded"),
    (503, "unavailable", "unavailable"), (503, "engine_lost", "unavailable"),
    (503, "reloading", "unavailable"), (503, None, "unavailable"), (500, None, "internal")])
def test_serve_errors_say_whether_to_add_replicas(status, code, kind):
    # Every 503 was "overloaded": no model loaded or a lost replica read as a need for more.
    assert m.serve_error_kind(status, code) == kind


# What Ray 2.60's metrics agent serves to Prometheus, without a cluster: the recorder the
# agent hands every metric to (kind by kind, as reporter_agent does for a worker's Counter,
# Gauge and Histogram) renders one sample of each catalogue metric, in a process of its own
# (it installs a global meter provider). The integration tier checks the same on a cluster.
RAY_EXPOSITION = """
import json, sys
from prometheus_client import REGISTRY, generate_latest
from ray._private.telemetry.open_telemetry_metric_recorder import OpenTelemetryMetricRecorder

recorder = OpenTelemetryMetricRecorder(gauge_metric_ttl_seconds=600)
for name, kind, tags, buckets in json.load(sys.stdin):
    if kind == "histogram":
        recorder.register_histogram_metric(name, "d", buckets)
    else:
        getattr(recorder, f"register_{kind}_metric")(name, "d")
    recorder.set_metric_value(name, tags, buckets[0] if buckets else 1.0)
print(generate_latest(REGISTRY).decode())
"""


def test_rays_exporter_serves_each_metric_under_its_exported_name_and_labels():
    import sys

    from prometheus_client.parser import text_string_to_metric_families

    specs = [(s.name, s.kind, {t: "x" for t in s.tag_keys}, list(s.buckets or ()))
             for s in m.ALL]
    out = subprocess.run([sys.executable, "-c", RAY_EXPOSITION], input=json.dumps(specs),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    served: dict[str, set[str]] = {}  # sample name -> its labels
    for family in text_string_to_metric_families(out.stdout):
        for sample in family.samples:
            served.setdefault(sample.name, set()).update(sample.labels)
    for name, labels in series_labels().items():
        if name.startswith("ray_orchestrator_"):
            assert name in served, (name, sorted(n for n in served if "orchestrator" in n))
            assert labels <= served[name], (name, labels - served[name])
