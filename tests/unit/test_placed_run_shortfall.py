"""PlacedRun (ray_layer/placed_run.py) when the workers found a GPU without the free memory
asked: the training function returns {GPU_SHORTFALL: [...]} (Ray Train's
Result.return_value); the driver tells the scheduler and fits again on the new placement.
Ray Train's Result.metrics are the latest *checkpointed* report's: None on a fresh run, an
earlier attempt's on a run resumed after a yield - never the shortfall."""
from types import SimpleNamespace

import pytest

from orchestrator.config import JobSpec
from orchestrator.placement import Placement
from ray_layer.train_session import GPU_SHORTFALL

SHORT = [{"node_id": "n1", "gpu_index": 1, "free_gb": 2.0, "needed_gb": 40.0}]


@pytest.fixture
def driver(monkeypatch):
    import ray

    from ray_layer import placed_run

    first, second = Placement("job", ("n1",), 0.0, 1), Placement("job", ("n2",), 0.0, 1)
    calls = []

    def remote(name, value):
        return SimpleNamespace(remote=lambda *args: calls.append((name, *args)) or value)
    scheduler = SimpleNamespace(submit=remote("submit", first),
                                gpu_too_small=remote("gpu_too_small", second),
                                yielded=remote("yielded", second))
    monkeypatch.setattr(ray, "get", lambda value, timeout=None: value)
    monkeypatch.setattr(placed_run, "driver_id", lambda: "driver")
    run = placed_run.PlacedRun(scheduler, JobSpec("job"), 60.0, say=lambda line: None)
    return run, calls, second


def result(metrics, checkpoint=None, return_value=None):
    return SimpleNamespace(metrics=metrics, return_value=return_value,
                           checkpoint=checkpoint and SimpleNamespace(path=checkpoint))


@pytest.mark.parametrize("short_result", [
    result(None, return_value={GPU_SHORTFALL: SHORT}),  # a fresh run
    # resumed after a yield: the metrics are that yield's checkpointed report's
    result({"step": 7, "yielded": "preempt: by an operator"}, "/run/checkpoint_7",
           return_value={GPU_SHORTFALL: SHORT}),
], ids=["fresh", "resumed"])
def test_a_shortfall_is_told_to_the_scheduler_and_the_job_fits_again(driver, short_result):
    run, calls, second = driver
    placements = []
    fits = [short_result, result({"step": 9}, "/run/checkpoint_9")]

    def fit(placement):
        placements.append(placement)
        return fits.pop(0)
    final, placement = run.run(fit)
    assert ("gpu_too_small", "job", "driver", [("n1", 1)], 0) in calls  # (its first give-back)
    assert not fits and placements[1] == second and placement == second
    assert final.metrics["step"] == 9 and run.yields == []


def test_a_resumed_run_does_not_take_an_earlier_drivers_yield_for_its_own(driver):
    # The run's newest checkpoint was saved by a yield of the driver before (preempted, then
    # stopped while queued); resumed, the loop ends without a newer checkpoint, so Ray Train's
    # result still carries that yield. It ran once: not a yield to wait out and fit again.
    run, calls, _ = driver
    fits = []

    def fit(placement):
        fits.append(placement)
        return result({"step": 9, "yielded": "cancel: by an operator"}, "/run/checkpoint_9")
    final, _ = run.run(fit, resumed_from="/run/checkpoint_9/")
    assert len(fits) == 1 and run.yields == []
    assert [c[0] for c in calls] == ["submit"]


def test_a_scheduler_replaced_mid_job_is_looked_up_again(monkeypatch):
    # Killed for good and replaced (same state, restored from the GCS): the driver's handle
    # stayed dead and its next call escaped as an ActorDiedError traceback.
    import ray

    from ray_layer import placed_run

    placement = Placement("job", ("n1",), 0.0, 1)

    def dead(*args):
        raise ray.exceptions.ActorDiedError()

    def answer(value):
        return SimpleNamespace(remote=lambda *args: value)
    old = SimpleNamespace(submit=answer(placement), yielded=SimpleNamespace(remote=dead),
                          release=SimpleNamespace(remote=dead))
    new = SimpleNamespace(yielded=answer(placement), release=answer(True))
    monkeypatch.setattr(ray, "get", lambda value, timeout=None: value)
    monkeypatch.setattr(placed_run, "driver_id", lambda: "driver")
    monkeypatch.setattr(placed_run.time, "sleep", lambda s: None)
    run = placed_run.PlacedRun(old, JobSpec("job"), 60.0, say=lambda line: None,
                               reconnect=lambda timeout_s=None: new)
    fits = [result({"step": 3, "yielded": "preempt: by an operator"}, "/run/checkpoint_3"),
            result({"step": 9}, "/run/checkpoint_9")]
    final, _ = run.run(lambda placement: fits.pop(0))
    assert final.metrics["step"] == 9 and run.scheduler is new and run.release() is None


def test_no_scheduler_answering_is_said_not_a_traceback(monkeypatch):
    import ray

    from ray_layer import placed_run
    from ray_layer.scheduler_client import SchedulerNotRunning

    def dead(*args):
        raise ray.exceptions.ActorDiedError()

    def gone(timeout_s=None):
        raise SchedulerNotRunning("no scheduler on this Ray cluster")
    monkeypatch.setattr(ray, "get", lambda value, timeout=None: value)
    monkeypatch.setattr(placed_run, "driver_id", lambda: "driver")
    monkeypatch.setattr(placed_run.time, "sleep", lambda s: None)
    run = placed_run.PlacedRun(SimpleNamespace(submit=SimpleNamespace(remote=dead)),
                               JobSpec("job"), 60.0, say=lambda line: None, reconnect=gone)
    with pytest.raises(placed_run.NotPlaced, match=r"did not answer submit\(\) after 3 tries"):
        run.run(lambda placement: None)


def test_a_users_loop_returning_its_own_gpu_too_small_is_its_answer(driver):
    # A user's loop's return value is the result's return_value too (it was dropped): a key
    # of its own named like the launcher's marker must not place the job again.
    run, calls, _ = driver
    mine = result({"step": 3}, "/run/checkpoint_3", return_value={"gpu_too_small": ["mine"]})
    final, _ = run.run(lambda placement: mine)
    assert final.return_value == {"gpu_too_small": ["mine"]}
    assert [c[0] for c in calls] == ["submit"]


def test_a_workers_gpu_named_by_uuid_does_not_crash_the_memory_check(monkeypatch):
    # CUDA_VISIBLE_DEVICES of UUIDs (a MIG slice needs one): Ray's GPU ids are those strings,
    # and int() failed every worker before training. Without NVML, Ray's id stands.
    import ray

    from ray_layer import train_session

    for ray_id, expected in (("GPU-5e1c0a7f", "GPU-5e1c0a7f"), ("3", 3)):
        monkeypatch.setattr(ray, "get_gpu_ids", lambda: [ray_id])
        assert train_session._nvml_index_and_own_bytes(torch_cpu()) == (expected, 0)


def torch_cpu():
    import torch

    return torch.device("cpu")  # (no CUDA here: NVML's view is not reached)


def test_a_resume_past_an_unregistered_checkpoint_is_not_taken_for_a_yield(monkeypatch, tmp_path):
    # The run yielded at step 10 (Ray Train's record: that checkpoint, its report "yielded"),
    # ran on and wrote its final checkpoint at step 20, but the driver was stopped before
    # Ray Train registered it. A --resume finds step 20 already complete: Ray Train's result
    # still shows the yield of step 10, an earlier driver's. It was taken for a yield of this
    # driver: the completed job was given back, queued again behind others (no deadline) and
    # fitted a second time before it said there was nothing to do.
    import contextlib

    import ray

    from ray_layer import launch, placed_run

    for name in ("checkpoint_00000010_2026-12-06_22-27-40.182693",
                 "checkpoint_00000020_2026-12-06_22-27-40.290455"):
        (tmp_path / "run" / name).mkdir(parents=True)
    placement = Placement("run", ("n1",), 0.0, 1)
    calls = []

    def remote(name, value):
        return SimpleNamespace(remote=lambda *args: calls.append(name) or value)
    scheduler = SimpleNamespace(submit=remote("submit", placement), poll=remote("poll", placement),
                                yielded=remote("yielded", placement),
                                release=remote("release", True))
    monkeypatch.setattr(launch, "connected_scheduler",
                        lambda address, runtime_env=None: contextlib.nullcontext(scheduler))
    monkeypatch.setattr(ray, "get", lambda value, timeout=None: value)
    monkeypatch.setattr(placed_run, "driver_id", lambda: "driver")
    monkeypatch.setattr(launch, "_trainer_factory", lambda *args: lambda placement: None)
    fits = []

    def fit(trainer, run_dir, max_failures, keep_checkpoints=None):
        fits.append(run_dir)
        return result({"step": 10, "yielded": "preempt: preempted for job 'high'"},
                      str(tmp_path / "run" / "checkpoint_00000010_2026-12-06_22-27-40.182693"),
                      return_value={"already_complete": True, "step": 20})
    monkeypatch.setattr(launch, "_fit", fit)
    launched = launch.launch(None, {}, JobSpec("run"), tmp_path / "run", address=None,
                             queue_timeout_s=60, max_failures=3)
    assert len(fits) == 1 and launched.yields == []
    assert "yielded" not in calls and calls[-1] == "release"
