"""Preemption and migration on the live cluster, carried out through checkpoints.

Drivers are separate processes (`python jobs/pretrain.py --address ...`), as users run them.
Both jobs ask for the T4 node's declared GPUs, so they contend; declared GPUs train on the CPU
with the gloo backend. The scheduler here lets a job be preempted or moved after 2 s of
running and counts 5 s per restart (tests/integration/conftest.py).
"""
import subprocess
import sys
import time

import ray

from jobs import pretrain
from ray_layer.cluster import ensure_control_plane
from orchestrator.config import JobSpec
from orchestrator.runs import read_metrics
from tests.support import run_summary, wait_for

PRETRAIN = pretrain.__file__
TINY = ["--model-size", "tiny", "--batch-size", "4", "--seq-len", "32", "--log-every", "50",
        "--checkpoint-every", "100"]
ON_T4 = ["--num-workers", "2", "--gpus-per-worker", "1", "--accelerator-type", "T4"]


def start_driver(run_dir, *args):
    address = ray.get_runtime_context().gcs_address
    return subprocess.Popen([sys.executable, PRETRAIN, "--address", address, *TINY,
                             "--run-dir", str(run_dir), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(driver, timeout_s=300):
    out, _ = driver.communicate(timeout=timeout_s)
    assert driver.returncode == 0, out[-3000:]
    return out


def wait_until_training(run_dir, timeout_s=120):
    """Until the run has logged a step (its workers are up and training)."""
    wait_for(f"{run_dir} to start training", lambda: read_metrics(run_dir), timeout_s)


def test_preempted_job_yields_to_a_higher_priority_one_and_resumes_from_its_checkpoint(
        cluster, tmp_path):
    """That the resumed run ends with the undisturbed run's weights is asserted where an
    undisturbed reference run is paid for once: the chaos run (an operator's preemption among
    its faults, under Ray Train) and the loop's unit tests (a yield resumes to the same
    weights). Here: the scheduler's side of a priority preemption, end to end.

    The low job runs far longer than the test waits (a fixed length let a fast machine finish
    it before the preemption reached it): once it has resumed, an operator cancels it, as in
    the migration test, so the test takes the same time on a fast machine and a slow one."""
    run_dir = tmp_path / "low"
    low = start_driver(run_dir, *ON_T4, "--max-steps", "1000000")
    try:
        wait_until_training(run_dir)  # its first report: step 50
        time.sleep(2.0)  # past the scheduler's minimum run time between preemptions
        # The high job's driver is this process (already connected: it submits at once).
        submitted_at = time.time()
        high_code = pretrain.main([*TINY, "--run-dir", str(tmp_path / "high"), "--num-workers",
                                   "1", "--gpus-per-worker", "1", "--accelerator-type", "T4",
                                   "--max-steps", "4", "--priority", "10"])
        assert high_code == 0
        resumed = wait_for_record(run_dir, lambda r: r.get("start_step"))
    finally:
        scheduler, _ = ensure_control_plane()
        assert ray.get(scheduler.cancel.remote(run_dir.name))  # as `orchestrator cancel`
    low_out, _ = low.communicate(timeout=300)
    assert low.returncode == 3 and "cancelled by an operator" in low_out, low_out[-3000:]

    records = read_metrics(run_dir)
    (yielded,) = [r for r in records if r.get("yielded", "").startswith("preempt:")]
    assert yielded["yielded"].startswith("preempt: preempted for job 'high'"), low_out
    assert "stopped at step" in low_out
    high_summary = run_summary(tmp_path / "high")
    assert high_summary["steps"] == 4 and high_summary["placement"] == [cluster["t4"]]
    # The low job let go within 30 s; the high job ran while the low one waited; then the low
    # one resumed from the step it had checkpointed at when it yielded.
    assert yielded["time"] - submitted_at < 30
    high_first = read_metrics(tmp_path / "high")[0]
    assert high_first["time"] > yielded["time"]
    assert resumed["start_step"] == yielded["step"] and resumed["time"] > high_first["time"]


def test_migration_moves_a_job_from_t4_to_a100_when_the_a100s_free(cluster, tmp_path):
    """The job runs far longer than the test waits: once it has moved and trained on the A100
    node, an operator cancels it (it checkpoints and stops), so the test takes the same time
    on a fast machine and a slow one."""
    scheduler, _ = ensure_control_plane()
    blocker = ray.get(scheduler.place.remote(JobSpec(
        "a100-blocker", num_workers=1, cpus_per_worker=0.01, gpus_per_worker=8,
        accelerator_types=("A100",))))
    assert blocker.nodes == [cluster["a100"]]
    run_dir = tmp_path / "mover"
    try:
        mover = start_driver(run_dir, "--num-workers", "1", "--gpus-per-worker", "1",
                             "--max-steps", "1000000", "--expected-duration-s", "3600")
        wait_until_training(run_dir)
        assert summary_of_placement(run_dir) == cluster["t4"]  # the only free GPUs
        time.sleep(2.5)  # past the scheduler's minimum run time
    finally:
        ray.get(scheduler.release.remote("a100-blocker"))
    try:
        moved = wait_for_record(run_dir, lambda r: r.get("start_step")
                                and set(r.get("worker_nodes", ())) == {cluster["a100"]})
    finally:
        assert ray.get(scheduler.cancel.remote(run_dir.name))  # as `orchestrator cancel`
    out, _ = mover.communicate(timeout=300)
    records = read_metrics(run_dir)
    (yielded,) = [r for r in records if r.get("yielded", "").startswith("migrate:")]
    assert yielded["yielded"].startswith("migrate: migrating from T4 to A100"), out
    assert moved["start_step"] == yielded["step"]  # resumed where it stopped, on the A100s
    # The operator's cancel: the job checkpointed, stopped, and its driver said why.
    assert mover.returncode == 3 and "cancelled by an operator" in out, out[-2000:]
    # ... and where its checkpoints are, to continue it (it ended with no hint).
    assert f"checkpoints so far are in {run_dir} (--resume continues the run)" in out
    assert records[-1].get("yielded", "").startswith("cancel:")
    assert run_dir.name not in ray.get(scheduler.snapshot.remote())["reservations"]


def wait_for_record(run_dir, predicate, timeout_s=120):
    """The first metrics.jsonl record that satisfies `predicate`."""
    return wait_for(f"a matching record in {run_dir}/metrics.jsonl",
                    lambda: next((r for r in read_metrics(run_dir) if predicate(r)), None),
                    timeout_s)


def summary_of_placement(run_dir):
    """The node of the run's first logged step (metrics.jsonl carries the workers' nodes)."""
    (node,) = set(read_metrics(run_dir)[0]["worker_nodes"])
    return node
