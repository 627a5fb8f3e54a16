"""A worker whose GPU lacks the free memory the job asked for: the job is placed again without
that GPU and trains there; it never ends as if it had finished.

train_under_ray (ray_layer/train_session.py) is the training function, as jobs/pretrain.py
runs it; the test wraps it in the worker to fake the two things a CPU machine cannot give:
the first attempt's GPU reports too little free memory (the seam is
RayTrainSession.gpu_memory_shortfall, what each worker asks about its own GPU), and the
second attempt's training is a single checkpointed report instead of a model's (the loop
itself is tested elsewhere). The workers run on the session cluster's declared T4 GPUs.
"""
import tempfile
from pathlib import Path
from types import SimpleNamespace

import ray

from orchestrator.config import JobSpec, TrainConfig
from ray_layer import launch as launch_module
from ray_layer.cluster import ensure_control_plane
from ray_layer.launch import launch


class SchedulerSpy:
    """The scheduler's handle, recording the driver's gpu_too_small calls."""

    def __init__(self, handle) -> None:
        self.handle, self.gpu_too_small_calls = handle, []

    def __getattr__(self, name):
        method = getattr(self.handle, name)
        if name != "gpu_too_small":
            return method
        calls = self.gpu_too_small_calls

        def remote(*args):
            calls.append(args)
            return method.remote(*args)
        return SimpleNamespace(remote=remote)


def short_once_then_train(marker: Path):
    """A TorchTrainer training function: train_under_ray, whose first attempt finds its GPU
    short of memory and whose next one reports step 3 with a checkpoint."""

    def train_fn(config):
        from ray_layer import train_session

        def shortfall(self, min_gpu_memory_gb):
            if marker.exists():
                return None
            marker.write_text(self.node_id)
            return {"node_id": self.node_id, "gpu_index": int(ray.get_gpu_ids()[0]),
                    "free_gb": 1.0, "needed_gb": min_gpu_memory_gb}

        def train(train_config, session):  # returns its final metrics, as loop.train does
            directory = tempfile.mkdtemp()
            Path(directory, "weights.txt").write_text("trained")
            metrics = {"step": 3, "trained_on": session.node_id}
            session.report(metrics, directory)
            return metrics

        train_session.RayTrainSession.gpu_memory_shortfall = shortfall
        train_session.train = train
        return train_session.train_under_ray(config)

    return train_fn


def test_a_gpu_short_of_memory_gets_the_job_placed_again_not_finished(cluster, tmp_path,
                                                                      monkeypatch, capsys):
    spies = []

    class SpiedPlacedRun(launch_module.PlacedRun):
        def __init__(self, scheduler, *args, **kwargs):
            spies.append(SchedulerSpy(scheduler))
            super().__init__(spies[-1], *args, **kwargs)

    monkeypatch.setattr(launch_module, "PlacedRun", SpiedPlacedRun)
    name = "short-gpu-job"
    spec = JobSpec(name, num_workers=1, gpus_per_worker=1, min_gpu_memory_gb=12,
                   accelerator_types=("T4",))
    marker = tmp_path / "shorted"
    launched = launch(short_once_then_train(marker),
                      {"train": TrainConfig().to_dict(), "min_gpu_memory_gb": 12}, spec,
                      tmp_path / name, address=None, queue_timeout_s=60, max_failures=0)
    out = capsys.readouterr().out

    # The first attempt's worker found its GPU short (it ran on the T4 node) ...
    assert marker.read_text() == cluster["t4"]
    # ... and its driver told the scheduler which GPU, then was placed again.
    (call,) = spies[0].gpu_too_small_calls
    job, owner, gpus, given_back = call
    assert job == name and owner == ray.get_runtime_context().get_job_id()
    assert given_back == 0  # the first placement it gives back (a resend would carry 0 too)
    assert [node for node, _ in gpus] == [cluster["t4"]]
    assert out.count(f"placement for {name}: ") == 2, out
    assert "lacked the free memory asked: placing it again without them" in out
    # The job ended after training on its new placement, not with the shortfall's
    # checkpointless report (Result.metrics None: a summary with null steps).
    assert launched.result.metrics is not None, "the job ended as if finished, untrained"
    assert launched.result.metrics["step"] == 3
    assert Path(launched.result.checkpoint.path, "weights.txt").read_text() == "trained"
    assert launched.placement.worker_nodes == (cluster["t4"],)
    scheduler, _ = ensure_control_plane()
    snapshot = ray.get(scheduler.snapshot.remote())
    assert name not in snapshot["reservations"]
    assert all(j["job"] != name for j in snapshot["jobs"])
