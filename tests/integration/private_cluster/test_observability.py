"""Metrics end to end: a real Prometheus (Debian's package, on loopback) scrapes a Ray
cluster through Ray's service-discovery file while a short training job runs; our metrics
arrive with plausible values, and the rules from monitoring/alerts.yml are evaluated (the MFU
alert, a GPU one, leaves the CPU run alone).

The cluster is the tests' own cluster.local.yaml cluster (private_ray.py beside it:
one CPU worker node, so agents measure bandwidth between two nodes, and a metrics export
interval of 1 s instead of Ray's 10 s, so the test takes seconds, not minutes).
"""
import contextlib
import json
import math
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml

from orchestrator import metric_catalogue as m
from orchestrator import monitoring
from tests.prometheus_tools import tool_or_skip
from tests.support import free_port, wait_for
from .private_ray import REPO, PrivateRay

if TYPE_CHECKING:  # (imported where used: only this test needs prometheus_client)
    import prometheus_client

RUN = "observed-run"
MAX_STEPS = 20


@pytest.fixture(scope="module")
def prometheus_binary():
    return tool_or_skip("prometheus")


@pytest.fixture(scope="module")
def ray_cluster(local_cluster):
    return local_cluster


class Prometheus:
    def __init__(self, binary: str, workdir: Path, service_discovery: Path) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        # The real rules, with every `for:` dropped: a rule fires on its first true
        # evaluation, so a job of seconds can show it (promtool unit tests cover `for:`).
        rules = yaml.safe_load(monitoring.ALERTS_PATH.read_text())
        for rule in rules["groups"][0]["rules"]:
            rule.pop("for", None)
        (workdir / "alerts.yml").write_text(yaml.safe_dump(rules))
        config = yaml.safe_load(monitoring.render_prometheus_config(
            str(service_discovery), str(workdir / "alerts.yml"), interval_s=1))
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = open(workdir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address={self.url.removeprefix('http://')}"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def get(self, path: str, **params) -> dict:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as response:
            return json.loads(response.read())

    def query(self, expr: str) -> list[dict]:
        return self.get("/api/v1/query", query=expr)["data"]["result"]

    def wait_ready(self, timeout_s: float = 60) -> None:
        def ready() -> bool:
            assert self.proc.poll() is None, Path(self.log.name).read_text()[-2000:]
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2):
                return True

        wait_for("prometheus ready", ready, timeout_s, ignore=(OSError,))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def prometheus(prometheus_binary, ray_cluster, tmp_path_factory):
    # Written by the dashboard on the head: every node's metrics-export address.
    service_discovery = ray_cluster.session_dir / "prom_metrics_service_discovery.json"
    prom = Prometheus(prometheus_binary, tmp_path_factory.mktemp("prometheus"),
                      service_discovery)
    try:
        prom.wait_ready()
        yield prom
    finally:
        prom.stop()


def scrape(targets: list[str]) -> dict[str, "prometheus_client.Metric"]:
    """Every Ray node's metrics endpoint, parsed with prometheus_client's text parser; our
    families only, by name (the parser names a counter family without its _total)."""
    from prometheus_client.parser import text_string_to_metric_families

    families = {}
    for target in targets:
        try:
            with urllib.request.urlopen(f"http://{target}/metrics", timeout=5) as response:
                text = response.read().decode()
        except OSError:  # a node between start and first export
            continue
        for family in text_string_to_metric_families(text):
            if family.name.startswith("ray_orchestrator_"):
                seen = families.setdefault(family.name, family)
                if seen is not family:
                    seen.samples.extend(family.samples)
    return families


def sd_targets(cluster: PrivateRay) -> list[str]:
    path = cluster.session_dir / "prom_metrics_service_discovery.json"
    return [t for group in json.loads(path.read_text()) for t in group["targets"]]


@pytest.fixture(scope="module")
def observed(ray_cluster, prometheus, tmp_path_factory):
    """Run a short training job; while it runs, scrape the nodes ourselves every second.
    Returns (our latest parsed families, the job's output)."""
    run_dir = tmp_path_factory.mktemp("runs") / RUN
    job = subprocess.Popen(
        [sys.executable, "jobs/pretrain.py", "--model-size", "tiny", "--batch-size", "4",
         "--seq-len", "32", "--log-every", "2", "--num-workers", "2",
         "--max-steps", str(MAX_STEPS), "--checkpoint-every", "1000", "--run-dir", str(run_dir)],
        cwd=REPO, env=ray_cluster.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    start = time.monotonic()
    families, deadline = {}, start + 240
    try:
        while job.poll() is None and time.monotonic() < deadline:
            # Keep the latest view of each family: training ones may vanish after the job.
            families.update(scrape(sd_targets(ray_cluster)))
            with contextlib.suppress(subprocess.TimeoutExpired):  # (its end: seen at once)
                job.wait(timeout=2)
        output = job.communicate(timeout=max(deadline - time.monotonic(), 1))[0]
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, output[-4000:]
    print(f"\ntraining job took {time.monotonic() - start:.0f}s")
    return families, output


def samples(families, name: str, **labels) -> list:
    """Family `name`'s samples that carry `labels`. Fails when there are none: a series that
    never arrived must fail a check, not pass an `all(...)` over nothing."""
    assert name in families, f"{name} never exported (seen: {sorted(families)})"
    found = [s for s in families[name].samples
             if all(s.labels.get(k) == v for k, v in labels.items())]
    assert found, f"no {name} sample with labels {labels}: {families[name].samples[:5]}"
    return found


def values(families, name: str, **labels) -> list[float]:
    return [s.value for s in samples(families, name, **labels)]


def test_our_metrics_are_well_formed_as_prometheus_parses_them(observed):
    families, _ = observed
    expected = {spec for spec in m.ALL if not spec.name.startswith("orchestrator_serve_")
                and spec not in (m.GPU_MEMORY_USED, m.GPU_MEMORY_TOTAL, m.GPU_UTILIZATION,
                                 m.NODE_PROBE_FAILURES, m.SCHEDULER_REJECTIONS,
                                 m.SCHEDULER_REPORTS_REFUSED, m.TRAIN_LOSS_SCALE,
                                 m.SCHEDULER_YIELDS, m.SCHEDULER_STATE_SAVES_FAILED)}
    # (no NVML GPU, no fault, no forged report, no fp16, no preemption, no failed save here)
    for spec in expected:
        name = spec.exported.removesuffix("_total")
        assert name in families, f"{spec.exported} never exported (seen: {sorted(families)})"
        family = families[name]
        assert family.type == spec.kind, (name, family.type)
        assert family.samples, f"{name} exported with no sample"
        # The names the catalogue documents are the names Ray exports.
        suffixes = ("_bucket", "_count", "_sum") if spec.kind == m.HISTOGRAM else ("",)
        assert {s.name for s in family.samples} <= {spec.exported + x for x in suffixes}, name
        for sample in family.samples:
            assert set(spec.tag_keys) <= set(sample.labels), (name, sample.labels)
            assert math.isfinite(sample.value), (name, sample)


def test_values_are_plausible_for_a_tiny_cpu_training_run(observed):
    f, output = observed
    train = {"run": RUN}
    # Every check below fails when its series is missing (values() asserts samples exist).
    # ln 256 = 5.5 at the start
    assert all(0 < v < 10 for v in values(f, "ray_orchestrator_train_loss", **train))
    assert all(v > 0 for v in values(f, "ray_orchestrator_train_tokens_per_second", **train))
    mfu = values(f, "ray_orchestrator_train_mfu_ratio", **train)
    assert all(0 < v < 1 for v in mfu)
    assert all(0 <= v < 1 for v in values(f, "ray_orchestrator_train_comm_share_ratio", **train))
    assert all(0 <= v < 1 for v in values(f, "ray_orchestrator_train_comm_exposed_share_ratio",
                                          **train))
    assert all(v > 10e6 for v in values(f, "ray_orchestrator_train_peak_memory_bytes", **train))
    assert all(0 < v <= MAX_STEPS for v in values(f, "ray_orchestrator_train_step", **train))
    ranks = {s.labels["rank"] for s in samples(f, "ray_orchestrator_train_step", **train)}
    assert ranks == {"0", "1"}
    # Node agents: both nodes, host figures in range, bandwidth measured between them.
    load = samples(f, "ray_orchestrator_node_load_per_cpu")
    assert {s.labels["node_type"] for s in load} >= {"head", "cpu"}
    assert all(s.value >= 0 for s in load)
    assert all(0 < v < 1 for v in values(f, "ray_orchestrator_node_memory_used_ratio"))
    bandwidth = values(f, "ray_orchestrator_node_bandwidth_bytes_per_second")
    assert all(1e6 < v < 1e12 for v in bandwidth)
    # A node's summary over its peers (its per-peer series are its slowest few only).
    summary = samples(f, "ray_orchestrator_node_bandwidth_summary_bytes_per_second")
    assert {s.labels["stat"] for s in summary} == set(m.BANDWIDTH_STATS)
    assert all(1e6 < s.value < 1e12 for s in summary)
    assert max(values(f, "ray_orchestrator_node_bandwidth_peers")) >= 1
    # Scheduler: two healthy nodes, the job placed (counted, and timed).
    assert max(values(f, "ray_orchestrator_scheduler_nodes", health="healthy")) >= 2
    assert max(values(f, "ray_orchestrator_scheduler_placement_decisions",
                      outcome="placed")) >= 1
    latency = samples(f, "ray_orchestrator_scheduler_placement_latency_seconds")
    count = [s.value for s in latency if s.name.endswith("_count")]
    total = [s.value for s in latency if s.name.endswith("_sum")]
    assert count and max(count) >= 1 and total and 0 < max(total) < 10
    print(f"\nscraped: MFU {mfu}, bandwidth {[f'{b / 1e9:.2f} GB/s' for b in bandwidth]}")


def test_prometheus_scraped_ray_through_its_service_discovery_file(observed, prometheus,
                                                                   ray_cluster):
    # The file lists each node's metrics-export port (ours are there) plus the autoscaler's
    # and dashboard's own ports, which may be taken by another Ray on a shared machine.
    up = {r["metric"]["instance"]: r["value"][1] for r in prometheus.query('up{job="ray"}')}
    assert set(up) == set(sd_targets(ray_cluster))
    exporting = prometheus.query(f"count by (instance) ({m.NODE_LOAD_PER_CPU.exported})")
    instances = {r["metric"]["instance"] for r in exporting}
    # One per node: the head and the CPU worker, no more (test_autoscaling, run before in the
    # same cluster, stops the nodes it added: they would compete with this module's job).
    assert len(instances) == 2 and all(up[i] == "1" for i in instances), (up, instances)
    seen = prometheus.query(f'max_over_time({m.TRAIN_STEP.exported}{{run="{RUN}"}}[10m])')
    assert seen and max(float(r["value"][1]) for r in seen) >= 2


def test_the_mfu_alert_stays_quiet_for_the_cpu_run_below_45_percent(observed, prometheus):
    """A 2x64 model with 4x32-token batches spends most of each step outside matrix
    multiplies, far below 45% of the measured matmul peak; 45% is a GPU figure, so the real
    rules (loaded, evaluated without error) leave the run, `device="cpu"`, alone: it fired
    for every CPU run."""
    mfu = prometheus.query(f'max_over_time(avg by (run, device) ({m.TRAIN_MFU.exported}'
                           f'{{run="{RUN}"}})[10m:1s])')
    assert mfu and float(mfu[0]["value"][1]) < m.ALERT_MIN_MFU
    assert {r["metric"]["device"] for r in mfu} == {"cpu"}
    rules = [r for g in prometheus.get("/api/v1/rules")["data"]["groups"] for r in g["rules"]]
    assert {r["name"] for r in rules} == {r.name for r in monitoring.ALERT_RULES}
    assert all(r["health"] == "ok" for r in rules), rules
    fired = prometheus.query('max_over_time(ALERTS{alertname="TrainingMFULow",'
                             f'run="{RUN}"}}[10m])')
    assert not fired, fired
    print(f"\nTrainingMFULow quiet: CPU MFU peaked at {float(mfu[0]['value'][1]):.1%}")


def test_a_finished_runs_training_series_go_with_its_workers(observed, ray_cluster):
    """Held training gauges are re-sent for GAUGE_HOLD_S (10 minutes) by the process that
    recorded them (ray_layer/telemetry.py). Ray Train kills a run's workers when it ends
    (finished, failed, preempted or cancelled alike), and the agent drops a gauge not sent
    within two export intervals: so the run's series go within seconds of its end, and
    TrainingMFULow or TrainingCommunicationHigh cannot keep firing for a run that stopped.
    Were a worker to outlive its run, they would stay for ten minutes: this fails then."""
    def gone() -> bool:
        left = [f"{s.name} rank {s.labels.get('rank')}"
                for family in scrape(sd_targets(ray_cluster)).values() for s in family.samples
                if s.name.startswith("ray_orchestrator_train_") and s.labels.get("run") == RUN]
        assert not left, f"still served: {left[:4]}"  # (named in wait_for's TimeoutError)
        return True

    # (the agent's TTL is twice Ray's own 10 s interval, whatever the cluster's export one)
    wait_for("the finished run's training series to go", gone, 60, every_s=0.5,
             ignore=(AssertionError,))


def test_no_log_or_output_shows_the_auth_token_or_cloud_credentials(observed, ray_cluster):
    """After a training job ran with the token and (canary) AWS credentials in every process's
    environment: not one log of the cluster (GCS, raylets, dashboard, autoscaler, workers, our
    actors) and not the job's output holds any of them."""
    secrets = {"the auth token": ray_cluster.token, **ray_cluster.canaries}
    logs = [p for p in (ray_cluster.session_dir / "logs").rglob("*") if p.is_file()]
    assert len(logs) > 20, logs  # the scan covers the whole cluster, not an empty directory
    found = [f"{name} in {path.name}" for path in logs for name, value in secrets.items()
             if value.encode() in path.read_bytes()]
    found += [f"{name} in the job's output" for name, value in secrets.items()
              if value in observed[1]]
    assert not found, found

