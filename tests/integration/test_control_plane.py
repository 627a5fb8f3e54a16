import ray

from ray_layer.cluster import ensure_control_plane
from orchestrator.config import JobSpec
from orchestrator.placement import Placement, Rejection
from tests.support import wait_for


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
    spec = JobSpec("gpu-job", num_workers=2, gpus_per_worker=1, min_gpu_memory_gb=12,
                   accelerator_types=("T4",))
    try:
        placement = ray.get(scheduler.place.remote(spec))
        assert isinstance(placement, Placement)
        assert placement.worker_nodes == (cluster["t4"],) * 2
        assert "reports no GPUs" in placement.node_reasons[cluster["cpu"]]

        # Both GPUs are now reserved: a second GPU job must wait, told why.
        second = ray.get(scheduler.place.remote(JobSpec("gpu-job-2", gpus_per_worker=1, accelerator_types=("T4",))))
        assert isinstance(second, Rejection)
        assert "2 reserved" in second.node_reasons[cluster["t4"]]

        assert ray.get(scheduler.release.remote("gpu-job"))
        third = ray.get(scheduler.place.remote(JobSpec("gpu-job-2", gpus_per_worker=1, accelerator_types=("T4",))))
        assert isinstance(third, Placement)
    finally:  # the scheduler is shared by the session's other tests
        for name in ("gpu-job", "gpu-job-2"):
            ray.get(scheduler.release.remote(name))


CRASHING_DRIVER = """
import os, sys, ray
from orchestrator.config import JobSpec
ray.init(address=sys.argv[1])
scheduler = ray.get_actor("orchestrator-scheduler", namespace="orchestrator")
owner = ray.get_runtime_context().get_job_id()
placement = ray.get(scheduler.place.remote(JobSpec("crashed-job", num_workers=2), owner))
held = ray.get(scheduler.snapshot.remote())["reservations"]
print(type(placement).__name__, "held" if "crashed-job" in held else "not held", flush=True)
os._exit(1)  # killed before releasing, like a SIGKILLed driver
"""


def test_a_dead_drivers_reservation_is_reclaimed(cluster):
    import subprocess
    import sys

    scheduler, _ = ensure_control_plane()
    address = ray.get_runtime_context().gcs_address
    result = subprocess.run([sys.executable, "-c", CRASHING_DRIVER, address],
                            capture_output=True, text=True, timeout=120)
    assert "Placement held" in result.stdout, (result.stdout, result.stderr)
    # Ray marks the driver dead once its raylet notices the exit: poll briefly for that. The
    # scheduler's own maintenance pass (every few seconds) may reclaim it first, and then
    # this call finds nothing left to reclaim: either way the reservation must be gone.
    def reclaimed():
        orphans = ray.get(scheduler.reclaim_orphans.remote())
        held = ray.get(scheduler.snapshot.remote())["reservations"]
        return "crashed-job" in orphans or "crashed-job" not in held

    wait_for("the dead driver's reservation reclaimed", reclaimed, timeout_s=30)
    assert "crashed-job" not in ray.get(scheduler.snapshot.remote())["reservations"]


def test_memory_and_type_constraints_choose_the_right_nodes(cluster):
    scheduler, _ = ensure_control_plane()

    def dry_run(**spec):
        return ray.get(scheduler.place.remote(JobSpec("probe", **spec), "", True))

    big_memory = dry_run(num_workers=2, gpus_per_worker=1, min_gpu_memory_gb=40)
    assert big_memory.nodes == [cluster["a100"]]
    assert "1 have it" not in big_memory.node_reasons[cluster["t4"]]
    assert ">= 40 GiB free, 0 of 2 have it" in big_memory.node_reasons[cluster["t4"]]
    assert dry_run(gpus_per_worker=1, accelerator_types=("T4",)).nodes == [cluster["t4"]]
    eight = dry_run(num_workers=2, gpus_per_worker=4)  # only the A100 node has 8 GPUs
    assert eight.nodes == [cluster["a100"]]
    missing = dry_run(gpus_per_worker=1, accelerator_types=("H100",))
    assert isinstance(missing, Rejection) and not missing.fits_when_free
    assert "is not one of H100" in missing.node_reasons[cluster["a100"]]
