"""runs.repair_ray_record against Ray Train 2.60's own CheckpointManager (in this process, no
Ray started): the record it writes, repaired after an operator deleted a checkpoint or after
a crash tore it, is one Ray Train's controller starts from; unrepaired, it refused to start."""
import asyncio
import shutil

import pytest
from ray.train import Checkpoint, CheckpointConfig
from ray.train.v2._internal.exceptions import CheckpointManagerInitializationError
from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import CheckpointManager
from ray.train.v2._internal.execution.storage import StorageContext
from ray.train.v2._internal.execution.training_report import _TrainingReport

from orchestrator.runs import (RAY_CHECKPOINT_SNAPSHOT, RunDirError, checkpoint_dirs,
                               checkpoint_name, repair_ray_record,
                               set_aside_earlier_history)


def controller_checkpoints(root):
    """What Ray Train's controller makes of the run's record: (its latest, every one)."""
    manager = CheckpointManager(checkpoint_config=CheckpointConfig(num_to_keep=3),
                                storage_context=StorageContext(storage_path=str(root),
                                                               experiment_dir_name="job"))
    latest = manager.latest_checkpoint_result
    names = [r.checkpoint.path.rsplit("/", 1)[-1] for r in manager.best_checkpoint_results]
    return (latest.checkpoint.path.rsplit("/", 1)[-1] if latest else None), sorted(names)


def registered(root, names):
    """A run of checkpoints `names` registered by Ray Train's own CheckpointManager."""
    manager = CheckpointManager(checkpoint_config=CheckpointConfig(num_to_keep=3),
                                storage_context=StorageContext(storage_path=str(root),
                                                               experiment_dir_name="job"))
    for step, name in enumerate(names):
        directory = root / "job" / name
        directory.mkdir(parents=True)
        (directory / "state.pt").write_bytes(b"x")

        async def register():
            manager.register_checkpoint(_TrainingReport(
                checkpoint=Checkpoint(str(directory)), metrics={"step": step},
                validation=False))
        asyncio.run(register())
    return root


@pytest.fixture
def run(tmp_path):
    return registered(tmp_path, [checkpoint_name(step, 1.8e9 + step) for step in (10, 20, 30)])


def test_a_checkpoint_deleted_to_roll_back_is_dropped_from_the_record(run):
    newest = checkpoint_dirs(run / "job")[0]
    shutil.rmtree(newest)
    with pytest.raises(CheckpointManagerInitializationError, match="does not exist anymore"):
        controller_checkpoints(run)
    said = repair_ray_record(run / "job", any_checkpoint=True)
    assert f"({newest.name}): dropped from it" in said
    latest, kept = controller_checkpoints(run)
    assert latest == kept[-1] and [name[:19] for name in kept] == [
        "checkpoint_00000010", "checkpoint_00000020"]
    assert repair_ray_record(run / "job", any_checkpoint=True) is None  # nothing more to do
    assert len(list((run / "job").glob(f"{RAY_CHECKPOINT_SNAPSHOT}.before-repair-*"))) == 1


def test_a_torn_record_is_set_aside(run):
    record = run / "job" / RAY_CHECKPOINT_SNAPSHOT
    record.write_text(record.read_text()[:50])
    with pytest.raises(CheckpointManagerInitializationError):
        controller_checkpoints(run)
    assert "cannot be read" in repair_ray_record(run / "job", any_checkpoint=True)
    assert controller_checkpoints(run) == (None, [])
    assert not record.exists()


def test_a_new_run_where_the_checkpoints_were_deleted_sets_the_record_aside(run):
    for directory in checkpoint_dirs(run / "job"):
        shutil.rmtree(directory)
    moved = set_aside_earlier_history(run / "job")
    assert [p.name.split(".before-")[0] for p in moved] == ["checkpoint_manager_snapshot"]
    assert controller_checkpoints(run) == (None, [])


def test_checkpoints_a_users_loop_named_otherwise_are_kept(tmp_path):
    # Only checkpoint_* directories counted as present: a loop's "epoch_2" was dropped from
    # the record and the resume went back to an older checkpoint.
    run = registered(tmp_path, ["checkpoint_a", "epoch_2", "checkpoint_b"])
    shutil.rmtree(run / "job" / "checkpoint_b")
    assert "(checkpoint_b): dropped" in repair_ray_record(run / "job", any_checkpoint=False)
    assert controller_checkpoints(run) == ("epoch_2", ["checkpoint_a", "epoch_2"])


def test_a_users_loop_is_not_resumed_from_scratch_behind_its_back(run):
    # A user's loop resumes from ray.train.get_checkpoint(), which lists what the record
    # does: set aside, the loop would have started from step 0 without a word.
    record = run / "job" / RAY_CHECKPOINT_SNAPSHOT
    record.write_text(record.read_text()[:50])
    with pytest.raises(RunDirError, match=r"checkpoint_manager_snapshot\.json cannot be read "
                                          r"\(JSONDecodeError.*move it aside to start the loop "
                                          "from scratch"):
        repair_ray_record(run / "job", any_checkpoint=False)
    assert record.read_text()  # untouched


def test_a_record_of_another_ray_version_is_set_aside_for_pretrain(run):
    record = run / "job" / RAY_CHECKPOINT_SNAPSHOT
    record.write_text(record.read_text().replace('"ray_version":"', '"ray_version":"2.59.0-'))
    said = repair_ray_record(run / "job", any_checkpoint=True)
    assert "was written by Ray 2.59.0-" in said and not record.exists()
    assert controller_checkpoints(run) == (None, [])
