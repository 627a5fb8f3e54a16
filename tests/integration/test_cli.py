"""`python -m orchestrator status|place` against the shared cluster, as a user runs them."""
import json
import subprocess
import sys

import ray

from ray_layer.cluster import ensure_control_plane


def run_cli(*args):
    address = ray.get_runtime_context().gcs_address
    return subprocess.run([sys.executable, "-m", "orchestrator", *args, "--address", address],
                          capture_output=True, text=True, timeout=120)


def test_status_lists_every_node_with_health_and_accelerators(cluster):
    ensure_control_plane()
    result = run_cli("status", "--json")
    assert result.returncode == 0, result.stderr
    nodes = {n["node_id"]: n for n in json.loads(result.stdout)["nodes"]}
    assert set(cluster.values()) <= set(nodes)
    t4 = nodes[cluster["t4"]]
    assert t4["accelerators"] == "2xT4 (declared)" and t4["gpus"] == 2
    assert nodes[cluster["cpu"]]["health"] == "healthy"

    table = run_cli("status")
    assert table.returncode == 0 and "ACCELERATORS" in table.stdout
    assert cluster["t4"][:12] in table.stdout


def test_place_dry_run_explains_without_reserving(cluster, tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text("name: dry\nnum_workers: 2\ngpus_per_worker: 1\naccelerator_types: [T4]\n")
    result = run_cli("place", "--spec", str(spec), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert f"worker 0 -> node {cluster['t4'][:12]}" in result.stdout
    assert "reports no GPUs" in result.stdout  # the CPU nodes, with their reason
    assert "(A100) is not one of T4" in result.stdout
    scheduler, _ = ensure_control_plane()
    assert "dry" not in ray.get(scheduler.snapshot.remote())["reservations"]

    spec.write_text("name: dry\nnum_workers: 2\ngpus_per_worker: 1\naccelerator_types: [H100]\n")
    refused = run_cli("place", "--spec", str(spec), "--dry-run")
    assert refused.returncode == 3 and "is not one of H100" in refused.stdout


def test_submit_dry_run_places_the_job_file_as_submit_would(cluster, tmp_path):
    # Through the launcher's own connection (an embedded Ray when no cluster is given, as
    # pretrain --dry-run), where it refused without a running cluster; the JSON unchanged.
    (tmp_path / "train.py").write_text("def train_loop(config):\n    pass\n")
    job = tmp_path / "job.yaml"
    job.write_text("name: dry-submit\nentrypoint: train.py:train_loop\nnum_workers: 2\n"
                   "gpus_per_worker: 1\naccelerator_types: [T4]\n")
    result = run_cli("submit", str(job), "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    placed = json.loads(result.stdout)
    assert placed["worker_nodes"] == [cluster["t4"]] * 2
