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
