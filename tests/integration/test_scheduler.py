"""The scheduler on a live multi-node cluster: joins, deaths, restarts, concurrency, queue."""
import pytest
import ray

from ray_layer.cluster import ensure_control_plane
from ray_layer.scheduler_client import actor_restarts
from orchestrator.config import JobSpec
from orchestrator.placement import Placement, Queued, Rejection
from tests.support import wait_for

T4 = ("T4",)  # the T4 node has 2 GPUs: small numbers make contention easy to set up


@pytest.fixture
def scheduler(cluster):
    scheduler, _ = ensure_control_plane()
    yield scheduler
    for job in ray.get(scheduler.snapshot.remote())["reservations"]:
        ray.get(scheduler.release.remote(job))


def test_a_joining_node_gets_an_agent_and_a_removed_one_is_excluded(cluster, scheduler):
    extra = cluster.cluster.add_node(num_cpus=3)
    # Nobody calls ensure_agents: the scheduler's maintenance finds the node by itself.
    wait_for("the joining node's agent reports",
             lambda: extra.node_id in ray.get(scheduler.snapshot.remote())["reports"])
    placement = ray.get(scheduler.place.remote(JobSpec("on-extra", num_workers=3)))
    assert placement.nodes == [extra.node_id]  # the only node with 3 CPUs

    cluster.cluster.remove_node(extra)
    # The scheduler's own maintenance pass may mark it first; then this call finds no change.
    wait_for("the removed node marked dead",
             lambda: ray.get(scheduler.snapshot.remote())["health"][extra.node_id] == "dead"
             or extra.node_id in ray.get(scheduler.maintain.remote())["dead_by_ray"])
    snapshot = ray.get(scheduler.snapshot.remote())
    assert snapshot["health"][extra.node_id] == "dead"
    assert snapshot["reservations"]["on-extra"] == ()  # what it held there is released
    again = ray.get(scheduler.place.remote(JobSpec("needs-3", num_workers=3), "", True))
    assert extra.node_id not in again.nodes  # dry run: spread over the live nodes instead
    assert again.node_reasons[extra.node_id] == "dead: Ray reports the node gone"


def test_reports_only_count_for_nodes_ray_lists_alive(cluster, scheduler):
    """A report under a node id Ray never listed (forged or mistyped), or for a node Ray
    declared dead (a stale agent), is refused: it never adds capacity the cluster lacks."""
    from orchestrator.inventory import NodeReport

    def fake_report(node_id):
        return NodeReport(node_id=node_id, hostname="forged", ray_cpus=64, ray_gpus=0,
                          cpu_count=64, load_avg_1m=0.0, ram_total_bytes=1 << 40,
                          ram_available_bytes=1 << 40)

    forged = "f" * 56
    assert ray.get(scheduler.report.remote(fake_report(forged))) is False
    extra = cluster.cluster.add_node(num_cpus=1)
    wait_for("the joining node's agent reports",
             lambda: extra.node_id in ray.get(scheduler.snapshot.remote())["reports"])
    cluster.cluster.remove_node(extra)
    wait_for("the removed node marked dead",
             lambda: ray.get(scheduler.snapshot.remote())["health"][extra.node_id] == "dead"
             or ray.get(scheduler.maintain.remote())["dead_by_ray"])
    assert ray.get(scheduler.report.remote(fake_report(extra.node_id))) is False
    snapshot = ray.get(scheduler.snapshot.remote())
    assert forged not in snapshot["reports"] and snapshot["health"][extra.node_id] == "dead"
    real = ray.get(ensure_control_plane()[1][cluster["cpu"]].collect.remote())
    assert ray.get(scheduler.report.remote(real)) is True


def test_killing_the_scheduler_loses_no_reservation(cluster, scheduler):
    """Nor what it learnt of a workload's speed from a running job's reported throughput."""
    placed = ray.get(scheduler.place.remote(JobSpec("survivor", num_workers=2, gpus_per_worker=1, accelerator_types=T4, workload="survivor-shape")))
    assert placed.nodes == [cluster["t4"]]
    assert ray.get(scheduler.directive.remote("survivor", None, 1234.0)) is None
    learnt = [r for r in ray.get(scheduler.snapshot.remote())["throughput"]["rows"]
              if r["workload"] == "survivor-shape"]
    assert [(r["family"], r["source"], r["rate"]) for r in learnt] == [("T4", "measured", 1234.0)]
    ray.get(scheduler.maintain.remote())  # learnt speeds are saved by the maintenance pass
    restarts = actor_restarts(scheduler)
    ray.kill(scheduler, no_restart=False)  # crash; Ray restarts it (max_restarts=-1)
    # The kill is asynchronous: until Ray counts the restart, the old incarnation may still
    # answer (and a call it takes is retried on the new one, which has not heard from the
    # nodes yet). Calls fail while Ray restarts the actor: each failure is "not yet".
    wait_for("Ray restarts the scheduler", lambda: actor_restarts(scheduler) > restarts,
             timeout_s=60)
    snapshot = wait_for("the restarted scheduler answers",
                        lambda: ray.get(scheduler.snapshot.remote(), timeout=5),
                        timeout_s=60, ignore=(Exception,))
    assert "survivor" in snapshot["reservations"]
    assert [r for r in snapshot["throughput"]["rows"] if r["workload"] == "survivor-shape"] \
        == learnt
    # Not forgotten and not double-counted: both GPUs still held, exactly once.
    wait_for("the T4 node reports to the restarted scheduler",
             lambda: cluster["t4"] in ray.get(scheduler.snapshot.remote())["reports"])
    blocked = ray.get(scheduler.place.remote(JobSpec("gpu-1", gpus_per_worker=1, accelerator_types=T4)))
    assert isinstance(blocked, Rejection) and "2 reserved" in blocked.node_reasons[cluster["t4"]]
    ray.get(scheduler.release.remote("survivor"))
    assert isinstance(ray.get(scheduler.place.remote(JobSpec("gpu-2", num_workers=2,
                                                             gpus_per_worker=1, accelerator_types=T4))), Placement)


def test_concurrent_jobs_never_double_book(cluster, scheduler):
    specs = [JobSpec(f"racer-{i}", num_workers=2, gpus_per_worker=1, accelerator_types=T4) for i in range(4)]
    decisions = ray.get([scheduler.place.remote(s) for s in specs])
    winners = [d for d in decisions if isinstance(d, Placement)]
    assert len(winners) == 1  # the T4 node has 2 GPUs: one job of 2 fits, never two


def test_a_job_waits_in_the_queue_until_capacity_is_released(cluster, scheduler):
    first = ray.get(scheduler.submit.remote(JobSpec("holder", num_workers=2, gpus_per_worker=1, accelerator_types=T4)))
    assert isinstance(first, Placement)
    waiting = ray.get(scheduler.submit.remote(JobSpec("waiter", gpus_per_worker=1, accelerator_types=T4)))
    assert isinstance(waiting, Queued) and waiting.position == 1
    assert "fits once running jobs (or Ray work outside the scheduler" in waiting.reason
    never = ray.get(scheduler.submit.remote(JobSpec("too-big", num_workers=3, gpus_per_worker=1, accelerator_types=T4)))
    assert isinstance(never, Rejection)  # more GPUs than exist: rejected, not queued
    ray.get(scheduler.release.remote("holder"))
    placed = ray.get(scheduler.poll.remote("waiter"))
    assert isinstance(placed, Placement) and placed.nodes == [cluster["t4"]]


def test_one_run_name_cannot_be_taken_or_freed_by_another_driver(cluster, scheduler):
    mine = ray.get(scheduler.submit.remote(JobSpec("named", num_workers=1), "driver-a"))
    assert isinstance(mine, Placement)
    # The same driver retrying (e.g. Ray re-sending after a restart) gets the same answer.
    assert ray.get(scheduler.submit.remote(JobSpec("named", num_workers=1), "driver-a")) == mine
    theirs = ray.get(scheduler.submit.remote(JobSpec("named", num_workers=1), "driver-b"))
    assert isinstance(theirs, Rejection) and "already holds a reservation" in theirs.message
    assert not ray.get(scheduler.release.remote("named", "driver-b"))  # not theirs to free
    assert "named" in ray.get(scheduler.snapshot.remote())["reservations"]
    assert ray.get(scheduler.release.remote("named", "driver-a"))
