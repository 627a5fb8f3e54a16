"""Where a Ray Train worker's checkpoints go (ray_layer/train_session.py): Ray Train's own copy
into the run directory, fsync'd before Ray prunes older ones, and a copy that fails (a full
disk) one error naming it, its partial directory removed. Ray Train's context is stubbed; no
Ray is started."""
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray.train

from orchestrator.training.checkpoint import CheckpointError
from ray_layer import train_session


class Storage:
    """Ray Train's StorageContext as persisted_to_disk uses it: copy into the run dir."""

    def __init__(self, run_dir: Path, fail: OSError | None = None):
        self.experiment_fs_path, self.fail = str(run_dir), fail

    def persist_current_checkpoint(self, checkpoint, name):
        target = Path(self.experiment_fs_path) / name
        target.mkdir(parents=True)
        (target / "state.pt").write_bytes(b"half" if self.fail else b"whole")
        if self.fail:
            raise self.fail
        return ray.train.Checkpoint(str(target))


@pytest.fixture
def run_dir(tmp_path):
    (tmp_path / "run").mkdir()
    return tmp_path / "run"


def storage_is(storage, monkeypatch):
    monkeypatch.setattr(ray.train, "get_context",
                        lambda: SimpleNamespace(get_storage=lambda: storage))


def test_a_persisted_checkpoint_is_synced_before_ray_prunes(run_dir, monkeypatch):
    # Ray's copy was never fsync'd and Ray deletes the oldest checkpoint right after: after a
    # power loss the only checkpoint left (keep_checkpoints=1) could be empty.
    synced = []
    monkeypatch.setattr(train_session, "sync_tree", lambda path: synced.append(path))
    storage_is(Storage(run_dir), monkeypatch)
    persisted = train_session.persisted_to_disk(ray.train.Checkpoint("/local/tmp"), "ckpt_1")
    assert persisted.path == str(run_dir / "ckpt_1") and synced == [run_dir / "ckpt_1"]


def test_a_copy_that_fills_the_disk_is_one_error_and_leaves_no_partial_checkpoint(run_dir,
                                                                                  monkeypatch):
    storage_is(Storage(run_dir, fail=OSError(28, "No space left on device")), monkeypatch)
    with pytest.raises(CheckpointError) as caught:
        train_session.persisted_to_disk(ray.train.Checkpoint("/local/tmp"), "ckpt_1")
    assert str(caught.value).startswith(f"checkpoint {run_dir / 'ckpt_1'} cannot be written: "
                                        "No space left on device (")
    assert "GiB free on its filesystem" in str(caught.value)
    assert not (run_dir / "ckpt_1").exists()  # never registered: never pruned by Ray


def test_rank_0s_reports_reach_metrics_log_though_ray_train_never_takes_them(run_dir,
                                                                             monkeypatch):
    # Ctrl-C: Ray Train's controller stops taking reports as it aborts, while the workers
    # train on for up to 5 s, report and save a checkpoint. Its MetricsLog wrote
    # metrics.jsonl, so those reports (printed by rank 0) were missing from it and `logs`.
    from orchestrator.runs import read_metrics

    def never_taken(metrics, checkpoint=None, checkpoint_dir_name=None,
                    checkpoint_upload_fn=None):
        if checkpoint is not None:  # Ray Train uploads before it waits for the controller
            checkpoint_upload_fn(checkpoint, checkpoint_dir_name)
        raise SystemExit  # killed while waiting: the controller never takes it
    storage_is(Storage(run_dir), monkeypatch)
    monkeypatch.setattr(ray.train, "report", never_taken)
    monkeypatch.setattr(train_session, "sync_tree", lambda path: None)
    monkeypatch.setattr(train_session, "record_training", lambda *args: None)
    session = object.__new__(train_session.RayTrainSession)
    session.world_rank, session._worker_nodes = 0, ["n1"]
    session.device = SimpleNamespace(type="cpu")
    session._watch = train_session.DirectiveWatch()
    for step, checkpoint in ((450, None), (500, "/local/tmp")):
        with pytest.raises(SystemExit):
            session.report({"step": step, "loss": 2.0}, checkpoint)
    [metrics_only, checkpointed] = read_metrics(run_dir)
    assert (metrics_only["step"], metrics_only["checkpoint"]) == (450, None)
    assert checkpointed["step"] == 500 and checkpointed["worker_nodes"] == ["n1"]
    assert checkpointed["checkpoint"].startswith(str(run_dir / "checkpoint_00000500_"))
    session.world_rank = 1  # the other ranks' reports are not the run's log
    with pytest.raises(SystemExit):
        session.report({"step": 550, "loss": 2.0}, None)
    assert len(read_metrics(run_dir)) == 2


def test_pretrains_loop_logs_its_own_reports_and_ray_train_does_not_write_them_again():
    from orchestrator.config import JobSpec
    from orchestrator.placement import Placement
    from ray_layer import launch
    from ray_layer.train_callbacks import MetricsLog

    def callbacks(**logs):
        trainer_for = launch._trainer_factory(lambda config: None, {}, JobSpec("run"),
                                              Path("/runs/run"), "o", queue_timeout_s=60,
                                              max_failures=0, keep_checkpoints=2, **logs)
        placed = trainer_for(Placement("run", ("n1",), 0.0, 1))
        return [type(c) for c in placed.run_config.callbacks]
    assert MetricsLog in callbacks()  # a user's loop: the controller writes them
    assert MetricsLog not in callbacks(loop_logs_metrics=True)
