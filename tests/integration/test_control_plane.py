import ray

from actors.cluster import ensure_control_plane
from orchestrator.config import JobSpec
from orchestrator.placement import Placement, Rejection


def test_every_node_gets_one_agent_and_reports(cluster):
    scheduler, agents = ensure_control_plane()
    assert set(agents) == set(cluster.values())
    # Idempotent: a second call reuses the same named actors.
    scheduler_again, agents_again = ensure_control_plane()
    assert scheduler_again._actor_id == scheduler._actor_id
    assert {a._actor_id for a in agents_again.values()} == {a._actor_id for a in agents.values()}

    reports = ray.get(scheduler.snapshot.remote())["reports"]
    assert set(reports) == set(cluster.values())
    t4 = reports[cluster["t4"]]
    assert [g.name for g in t4.gpus] == ["T4", "T4"] and t4.gpus[0].source == "declared"
    assert reports[cluster["cpu"]].gpus == () and reports[cluster["cpu"]].ray_cpus == 2
    assert all(r.ram_total_bytes > 0 and not r.probe_errors for r in reports.values())


def test_gpu_job_goes_to_the_gpu_node_and_releases(cluster):
    scheduler, _ = ensure_control_plane()
    spec = JobSpec("gpu-job", num_workers=2, gpus_per_worker=1, min_gpu_memory_gb=12)
    placement = ray.get(scheduler.place.remote(spec))
    assert isinstance(placement, Placement)
    assert placement.worker_nodes == (cluster["t4"],) * 2
    assert "no GPUs" in placement.node_reasons[cluster["cpu"]]

    # Both GPUs are now reserved: a second GPU job must wait, told why.
    second = ray.get(scheduler.place.remote(JobSpec("gpu-job-2", gpus_per_worker=1)))
    assert isinstance(second, Rejection) and "2 reserved" in second.node_reasons[cluster["t4"]]

    assert ray.get(scheduler.release.remote("gpu-job"))
    third = ray.get(scheduler.place.remote(JobSpec("gpu-job-2", gpus_per_worker=1)))
    assert isinstance(third, Placement)
    ray.get(scheduler.release.remote("gpu-job-2"))
