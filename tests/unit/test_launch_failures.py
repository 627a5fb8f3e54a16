"""What a failed Ray Train run tells the user (ray_layer/launch.py): the workers' failure after
their restarts, or what went wrong in Ray Train's controller, each with its exit code. Ray's
exceptions are built here; no Ray is started."""
from pathlib import Path

import pytest
from ray.train import ControllerError
from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

from orchestrator.config import JobSpec
from orchestrator.job_exit import EXIT_FAILED, EXIT_NOT_PLACEABLE
from orchestrator.placement import Placement
from ray_layer import launch
from ray_layer.scheduler_client import SchedulerUnreachable
from ray_layer.train_callbacks import JobCancelled

RUN = Path("/runs/run")


@pytest.mark.parametrize("cause, code, words", [
    # Retried without limit by Ray Train's default: no exit at all before.
    (WorkerGroupStartupTimeoutError(2), EXIT_NOT_PLACEABLE,
     "the workers did not start on their placed nodes, retried 3 times in this run"),
    (JobCancelled("job 'run' was cancelled: cancelled by an operator"), EXIT_NOT_PLACEABLE,
     "job 'run' was cancelled"),
    (SchedulerUnreachable("the scheduler did not answer replace() after 3 tries"),
     EXIT_NOT_PLACEABLE, "a node of the job was lost and the scheduler did not answer"),
    (OSError("No space left on device"), EXIT_FAILED,
     "training failed in Ray Train's controller: OSError: No space left"),
])
def test_a_controller_failure_is_said_for_what_it_is_without_a_restart_count(cause, code,
                                                                           words):
    # All of these read "training failed after 3 restart(s)", none of which had happened.
    failed = launch._failure(ControllerError(cause), RUN, max_failures=3)
    assert failed.exit_code == code and str(failed).startswith(words), str(failed)
    assert "restart(s)" not in str(failed) and str(RUN) in str(failed)


def test_a_controller_that_cannot_start_is_one_line_without_a_restart_count():
    # Ray Train's controller refusing its record of the checkpoints read "training failed
    # after 3 restart(s): ActorDiedError: ... Traceback ...": no restart had happened.
    from ray.exceptions import ActorDiedError, RayTaskError
    from ray.train.v2._internal.exceptions import CheckpointManagerInitializationError

    refused = CheckpointManagerInitializationError(
        "1 validation error for _CheckpointManagerState\ncurrent_report_index\n  Field "
        "required [type=missing]\n    For further information visit https://errors.pydantic")
    task_error = RayTaskError("TrainController.__init__", "Traceback (most recent call last):\n"
                              '  File "checkpoint_manager.py", line 392, in _load_state\n'
                              "    raise CheckpointManagerInitializationError(error) from e\n"
                              f"CheckpointManagerInitializationError: {refused}", refused)
    failed = launch._failure(ActorDiedError(task_error), RUN, max_failures=3)
    assert failed.exit_code == EXIT_FAILED
    assert str(failed).startswith(
        "Ray Train's controller could not start: CheckpointManagerInitializationError: 1 "
        "validation error for _CheckpointManagerState current_report_index Field required")
    assert "restart(s)" not in str(failed) and "Traceback" not in str(failed)
    assert str(failed).endswith("(--resume continues the run)")


def test_a_controller_that_died_says_why():
    from ray.core.generated.common_pb2 import ActorDiedErrorContext
    from ray.exceptions import ActorDiedError

    context = ActorDiedErrorContext(class_name="TrainController", actor_id=b"\1" * 16, pid=7,
                                    error_message="The actor's worker process has died: "
                                                  "killed by the OOM killer")
    failed = launch._failure(ActorDiedError(context), RUN, max_failures=3)
    assert str(failed).startswith("Ray Train's controller died: The actor's worker process "
                                  "has died: killed by the OOM killer"), str(failed)


def test_a_workers_failure_names_the_restarts_and_the_first_workers_error():
    error = RuntimeError("workers failed")
    error.worker_failures = {1: ValueError("bad batch"), 0: KeyError("x")}
    failed = launch._failure(error, RUN, max_failures=2)
    assert failed.exit_code == EXIT_FAILED
    assert str(failed).startswith("training failed after 2 restart(s): worker rank 0: KeyError")


def test_worker_groups_that_do_not_start_are_retried_a_bounded_number_of_times():
    trainer_for = launch._trainer_factory(lambda config: None, {}, JobSpec("run"), RUN, "o",
                                          queue_timeout_s=60, max_failures=0,
                                          keep_checkpoints=2)
    failure = trainer_for(Placement("run", ("n1",), 0.0, 1)).run_config.failure_config
    assert failure.controller_failure_limit == launch.STARTUP_RETRIES  # Ray's default: none
    assert launch.startup_retries(10) == 10  # --max-failures, when larger
