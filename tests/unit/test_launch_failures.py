"""What a failed Ray Train run tells the user (ray_layer/launch.py): the workers' failure after
their restarts, or what went wrong in Ray Train's controller, each with its exit code. Ray's
exceptions are built here; no Ray is started."""
from pathlib import Path

import pytest
from ray.train import ControllerError
from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

from orchestrator.config import JobSpec
from orchestrator.job_exit import EXIT_FAILED, EXIT_NOT_PLACEABLE, JobFailed
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


def test_a_controller_that_cannot_start_is_one_line_without_a_restart_count(tmp_path):
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
    run = tmp_path / "run"  # with the checkpoints whose record was refused
    (run / "checkpoint_2026-12-07_01-49-34.503573").mkdir(parents=True)
    failed = launch._failure(ActorDiedError(task_error), run, max_failures=3)
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


def test_a_refused_report_fails_the_job_naming_it_with_no_restart_spent(tmp_path):
    # The loop ended on every rank at the report launch.report refused (ray_layer/user_loop
    # returns it from rank 0): Ray Train restarted it max_failures times over before.
    from types import SimpleNamespace

    from ray_layer.user_loop import REPORT_REFUSED

    line = ("worker rank 0: TypeError: launch.report: metrics['loss'] is a torch tensor "
            "(tensor(2.5000)), ... (train.py line 12, in train_loop)")
    failed = launch.refused_report_failure(
        SimpleNamespace(return_value={REPORT_REFUSED: line}), tmp_path)
    assert failed.exit_code == EXIT_FAILED
    assert str(failed) == (f"training failed, not restarted (the report would be refused "
                           f"again on every try): {line}\n(no checkpoint was saved in "
                           f"{tmp_path}: submit the job again, without --resume)")
    for fine in ({"accuracy": 0.9}, None, [REPORT_REFUSED]):
        assert launch.refused_report_failure(SimpleNamespace(return_value=fine),
                                             tmp_path) is None


def test_a_worker_whose_process_died_is_one_line_saying_so_not_rays_worker_dump():
    # A worker's process gone (os._exit in the loop, a signal, the kernel's OOM killer) read
    # "worker rank 1: WorkerHealthCheckFailedError: A worker health check failed." and then
    # 16 lines of Ray's Worker(...) and actor fields, the reason last.
    import ray
    from ray.core.generated.common_pb2 import ActorDiedErrorContext
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    why = ("The actor is dead because its worker process has died. Worker exit type: "
           "SYSTEM_ERROR Worker exit detail: Worker unexpectedly exits with a connection error "
           "code 2. End of file.")
    died = ray.exceptions.ActorDiedError(ActorDiedErrorContext(
        class_name="RayTrainWorker", actor_id=bytes(16), pid=21304,
        node_ip_address="192.0.2.2", error_message=why))
    error = RuntimeError("workers failed")
    error.worker_failures = {1: WorkerHealthCheckFailedError(
        "A worker health check failed.\nWorker info: Worker(\n  actor=Actor(RayTrainWorker, "
        "eb40d3a1),\n  metadata=ActorMetadata(\n    pid=21304,\n  ),\n)", failure=died)}
    said = str(launch._failure(error, RUN, max_failures=0)).splitlines()
    assert said[0] == ("training failed after 0 restart(s): worker rank 1: its process died "
                       f"(pid 21304 at 192.0.2.2): {why}")
    assert len(said) == 2  # and the line on the checkpoints
    # A process that died left no traceback: the line pointed at one in the worker log
    assert said[1] == ("(no traceback: the worker's process ended without one, for the reason "
                       f"above; no checkpoint was saved in {RUN}: submit the job again, without "
                       "--resume)"), said[1]
    # Its peers' collectives then fail ("Connection reset by peer"): the process that died is
    # the cause, whatever its rank (it named rank 0's gloo error, blaming a healthy worker).
    error.worker_failures = {0: RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error "
                                             "[127.0.0.1]:50391: Connection reset by peer"),
                             **error.worker_failures}
    said = str(launch._failure(error, RUN, max_failures=0)).splitlines()
    assert said[0] == ("training failed after 0 restart(s): worker rank 1: its process died "
                       f"(pid 21304 at 192.0.2.2): {why}")


def test_worker_groups_that_do_not_start_are_retried_a_bounded_number_of_times():
    trainer_for = launch._trainer_factory(lambda config: None, {}, JobSpec("run"), RUN, "o",
                                          queue_timeout_s=60, max_failures=0,
                                          keep_checkpoints=2)
    failure = trainer_for(Placement("run", ("n1",), 0.0, 1)).run_config.failure_config
    assert failure.controller_failure_limit == launch.STARTUP_RETRIES  # Ray's default: none
    assert launch.startup_retries(10) == 10  # --max-failures, when larger


def test_a_loops_own_error_is_one_line_naming_the_file_line_and_function_it_came_from(
        tmp_path):
    # A bare `assert` in the user's script read "worker rank 0: AssertionError: " and nothing
    # else: the line said neither what failed nor where (the traceback is in a worker's log).
    import ray

    from orchestrator.entrypoints import load_entrypoint
    from ray_layer.user_loop import yielding

    (tmp_path / "train.py").write_text(
        "import torch\n\n"
        "def forward(model, x):\n"
        "    return model(x)\n\n"
        "def train_loop(config):\n"
        "    assert config['steps'] > 0\n"
        "    forward(torch.nn.Linear(4, 1), torch.zeros(2, 3))\n")
    loop = load_entrypoint("train.py:train_loop", tmp_path).function
    said = []
    for config in ({"steps": 0}, {"steps": 5}):
        with pytest.raises(Exception) as raised:
            yielding(loop)(config)
        sent = ray.cloudpickle.loads(ray.cloudpickle.dumps(raised.value))  # to the driver
        error = RuntimeError("workers failed")
        error.worker_failures = {0: sent}
        said.append(str(launch._failure(error, RUN, max_failures=1)).splitlines()[0])
    assert said[0] == ("training failed after 1 restart(s): worker rank 0: AssertionError "
                       "(train.py line 7, in train_loop)")
    # Raised inside torch: the innermost frame of the user's own code is named.
    assert said[1].startswith("training failed after 1 restart(s): worker rank 0: "
                              "RuntimeError: mat1 and mat2 shapes cannot be multiplied")
    assert said[1].endswith("(train.py line 4, in forward)")


def test_a_loops_sys_exit_names_the_file_and_line_it_came_from(tmp_path):
    # sys.exit("diverged") in a loop (a script's habit) is a SystemExit, not an Exception: the
    # error line read "worker rank 0: SystemExit: loss diverged" without where it was raised.
    import ray

    from orchestrator.entrypoints import load_entrypoint
    from ray_layer.user_loop import yielding

    (tmp_path / "train.py").write_text(
        "import sys\n\n"
        "def train_loop(config):\n"
        "    sys.exit('loss diverged at step 2')\n")
    loop = load_entrypoint("train.py:train_loop", tmp_path).function
    with pytest.raises(SystemExit) as raised:
        yielding(loop)({})
    error = RuntimeError("workers failed")
    error.worker_failures = {0: ray.cloudpickle.loads(ray.cloudpickle.dumps(raised.value))}
    assert str(launch._failure(error, RUN, max_failures=0)).splitlines()[0] == (
        "training failed after 0 restart(s): worker rank 0: SystemExit: loss diverged at "
        "step 2 (train.py line 4, in train_loop)")


@pytest.mark.parametrize("call", ["sys.exit(0)", "sys.exit()", "raise SystemExit",
                                  "sys.exit(None)", "sys.exit(False)"])
def test_a_loops_sys_exit_0_is_its_normal_end_not_a_failure(tmp_path, call):
    # A script's "done: sys.exit(0)" failed the job: Ray Train restarted the loop
    # max_failures times from its checkpoint, then exit 4 with "worker rank 0: SystemExit: 0".
    from orchestrator.entrypoints import load_entrypoint
    from ray_layer import user_loop
    from orchestrator.stuck_ranks import RETURNED

    (tmp_path / "train.py").write_text(
        "import sys\n\n"
        "def train_loop(config):\n"
        f"    {call}\n"
        "    return 'not reached'\n")
    loop = load_entrypoint("train.py:train_loop", tmp_path).function
    assert user_loop.yielding(loop)({}) is None
    assert user_loop._where[0] == RETURNED  # (the other ranks are told it returned)


@pytest.mark.parametrize("code", [3, "diverged", True, 0.0, "numpy 0"])
def test_a_loops_sys_exit_with_another_code_stays_a_failure(code):
    # Python exits 1 for a code that is no int, even one equal to 0 (it prints it): a loop's
    # sys.exit(0.0) or sys.exit(np.int64(0)) was taken for its normal end.
    import sys

    import numpy as np

    from ray_layer.user_loop import yielding

    code = np.int64(0) if code == "numpy 0" else code
    with pytest.raises(SystemExit) as raised:
        yielding(lambda config: sys.exit(code))({})
    assert raised.value.code is code


def test_a_package_installed_in_the_user_site_is_not_taken_for_the_users_own_code(
        tmp_path, monkeypatch):
    # `pip install --user torch` puts torch in ~/.local/lib/pythonX.Y/site-packages, which
    # sysconfig's paths do not hold: its frame was named as where the loop raised
    # ("functional.py line ..."), not the user's own line that called it.
    import site

    from orchestrator.entrypoints import load_entrypoint
    from ray_layer.user_loop import RAISED_AT, yielding

    user_site = tmp_path / "usersite"
    user_site.mkdir()
    (user_site / "fakelib_hf55.py").write_text("def boom():\n    raise ValueError('deep')\n")
    monkeypatch.setattr(site, "getusersitepackages", lambda: str(user_site))
    monkeypatch.syspath_prepend(str(user_site))
    (tmp_path / "train.py").write_text(
        "import fakelib_hf55\n\n"
        "def train_loop(config):\n"
        "    fakelib_hf55.boom()\n")
    loop = load_entrypoint("train.py:train_loop", tmp_path).function
    with pytest.raises(ValueError) as raised:
        yielding(loop)({})
    assert getattr(raised.value, RAISED_AT) == "train.py line 4, in train_loop"


def test_torch_compiles_generated_code_is_not_taken_for_the_users_own_code(tmp_path,
                                                                         monkeypatch):
    # A torch.compile'd model runs code inductor writes to its cache folder
    # (/tmp/torchinductor_<user>/ce/ceveuvyn....py): a stuck rank's "now at" and the line an
    # error was raised at named that file ("ceveuvyn...py line 156, in call"), not the
    # user's line that called the model.
    import torch._inductor.runtime.cache_dir_utils  # noqa: F401 (as torch.compile does)

    from orchestrator.entrypoints import load_entrypoint
    from ray_layer.user_loop import RAISED_AT, yielding

    cache = tmp_path / "inductor"
    (cache / "ce").mkdir(parents=True)
    (cache / "ce" / "ceveuvyn.py").write_text(
        "def call(args):\n    raise AssertionError('expected size 4==8')\n")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    monkeypatch.syspath_prepend(str(cache / "ce"))
    (tmp_path / "train.py").write_text(
        "import ceveuvyn\n\n"
        "def train_loop(config):\n"
        "    ceveuvyn.call([])\n")
    loop = load_entrypoint("train.py:train_loop", tmp_path).function
    with pytest.raises(AssertionError) as raised:
        yielding(loop)({})
    assert getattr(raised.value, RAISED_AT) == "train.py line 4, in train_loop"


def test_a_compiled_librarys_frame_is_not_taken_for_the_users_own_code(tmp_path):
    # Cython's frames (pyarrow, pandas) carry their source's path relative to the package,
    # "pyarrow/error.pxi": a checkpoint folder removed before its report failed in Ray
    # Train's upload as "FileNotFoundError: ... (error.pxi line 92, in
    # pyarrow.lib.check_status)", not the user's line that called launch.report.
    from orchestrator.entrypoints import load_entrypoint
    from ray_layer.user_loop import RAISED_AT, yielding

    (tmp_path / "train.py").write_text(
        "def train_loop(config):\n"
        "    config['copy']()\n")
    namespace = {}
    exec(compile("def check_status():\n    raise FileNotFoundError('Failed to open')\n",
                 "pyarrow/error.pxi", "exec"), namespace)
    loop = load_entrypoint("train.py:train_loop", tmp_path).function
    with pytest.raises(FileNotFoundError) as raised:
        yielding(loop)({"copy": namespace["check_status"]})
    assert getattr(raised.value, RAISED_AT) == "train.py line 2, in train_loop"


@pytest.mark.parametrize("cause", [
    None,  # the loop's own error (examples/image_cnn without its make_data.py)
    JobCancelled("job 'run' was cancelled: cancelled by an operator"),
    SchedulerUnreachable("the scheduler did not answer replace() after 3 tries"),
    WorkerGroupStartupTimeoutError(2),
])
def test_a_run_that_saved_no_checkpoint_does_not_point_at_checkpoints_or_resume(cause,
                                                                               tmp_path):
    # It read "checkpoints so far are in <run dir> (--resume continues the run)" with none
    # there, and `submit --resume` is then refused ("no checkpoint in run_dir ... to resume
    # from"); with one saved, the hint stays.
    run = tmp_path / "run"
    run.mkdir()
    error = ControllerError(cause) if cause else RuntimeError("workers failed")
    if cause is None:
        error.worker_failures = {0: FileNotFoundError("no train-*.npz/test.npz in data")}
    said = str(launch._failure(error, run, max_failures=1))
    assert "checkpoints so far" not in said and "--resume" not in said.replace(
        "without --resume", ""), said
    assert f"no checkpoint was saved in {run}" in said, said
    (run / "checkpoint_2026-12-07_01-49-34.503573").mkdir()
    said = str(launch._failure(error, run, max_failures=1))
    assert f"checkpoints so far are in {run}" in said, said
    if cause is not None:
        assert "(--resume " in said, said


def test_a_checkpoint_folder_whose_upload_failed_is_not_left_for_a_checkpoint(tmp_path):
    # A loop's checkpoint folder removed before launch.report: Ray Train made the run's
    # checkpoint_<time> folder, copied nothing into it (FileNotFoundError) and never
    # registered it. Left there, the error said "checkpoints so far are in <run dir>", a
    # plain submit again was refused ("already holds checkpoints") and --resume started from
    # scratch, warning of an unregistered checkpoint.
    import json
    from types import SimpleNamespace

    from orchestrator.launch import resolve_fit_run_dir

    run = tmp_path / "run"
    error = RuntimeError("workers failed")
    error.worker_failures = {0: FileNotFoundError("Failed to open local file '/tmp/tmp6cxg'")}

    def fit():
        (run / "checkpoint_2026-12-07_12-02-46.230562").mkdir(parents=True)
        raise error
    with pytest.raises(JobFailed) as failed:
        launch._fit(SimpleNamespace(fit=fit), run, max_failures=0)
    assert (f"no checkpoint was saved in {run}: submit the job again, without --resume"
            in str(failed.value)), str(failed.value)
    assert resolve_fit_run_dir(JobSpec("run"), run, False) == run  # a plain submit again
    # One Ray Train registered stays, empty or not (a loop may save an empty folder); so
    # does one holding files (unregistered: a run stopped as it reported it)
    registered, unregistered = run / "checkpoint_1", run / "checkpoint_2"
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(
        {"checkpoint_results": [{"checkpoint_dir_name": registered.name}]}))
    registered.mkdir()
    unregistered.mkdir()
    (unregistered / "state.pt").write_bytes(b"x")
    with pytest.raises(JobFailed) as failed:
        launch._fit(SimpleNamespace(fit=fit), run, max_failures=0)
    assert f"checkpoints so far are in {run}" in str(failed.value)
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == [registered.name,
                                                                  unregistered.name]
    # A run that ends well leaves none either
    (run / "checkpoint_3").mkdir()
    assert launch._fit(SimpleNamespace(fit=lambda: "result"), run, 0) == "result"
    assert not (run / "checkpoint_3").exists()


def test_a_loops_exception_whose_str_fails_is_one_line_not_a_driver_traceback():
    # An exception whose __str__ itself raises gave a traceback from launch._failure on the
    # driver, in place of the job's error line.
    class Unprintable(Exception):
        def __str__(self):
            raise RuntimeError("no text")

    error = RuntimeError("workers failed")
    error.worker_failures = {0: Unprintable("x")}
    said = str(launch._failure(error, RUN, max_failures=0)).splitlines()
    assert said[0] == ("training failed after 0 restart(s): worker rank 0: Unprintable: "
                       "<str() failed>"), said


def test_a_checkpoint_ray_train_never_listed_is_pruned_as_keep_checkpoints_would_have(
        tmp_path):
    # Ctrl-C as the workers saved step 500: Ray Train never listed it, so its keep_checkpoints
    # never pruned it, and every Ctrl-C + resume left one more checkpoint to delete by hand.
    import json
    import shutil
    from types import SimpleNamespace

    from orchestrator.runs import checkpoint_dirs, checkpoint_name

    run = tmp_path / "run"

    def saved(listed, unlisted):
        for step in (*listed, *unlisted):
            (run / checkpoint_name(step)).mkdir(parents=True, exist_ok=True)
            (run / checkpoint_name(step) / "state.pt").write_bytes(b"x")
        (run / "checkpoint_manager_snapshot.json").write_text(json.dumps({
            "checkpoint_results": [{"checkpoint_dir_name": checkpoint_name(s)}
                                   for s in listed]}))

    def steps():
        return sorted(int(p.name.split("_")[1]) for p in checkpoint_dirs(run))
    saved((400, 550, 600), (500,))  # resumed from 500: two listed ones newer, keep 3
    launch._fit(SimpleNamespace(fit=lambda: "result"), run, 0, keep_checkpoints=3)
    assert steps() == [400, 500, 550, 600]
    for step in (400, 550):  # Ray Train pruned them; a second Ctrl-C left 750 unlisted
        shutil.rmtree(run / checkpoint_name(step))
    saved((600, 650, 700), (500, 750))
    launch._fit(SimpleNamespace(fit=lambda: "result"), run, 0, keep_checkpoints=None)
    assert steps() == [500, 600, 650, 700, 750]  # None: keep every one
    launch._fit(SimpleNamespace(fit=lambda: "result"), run, 0, keep_checkpoints=3)
    assert steps() == [600, 650, 700, 750]  # the newest, what a resume takes, stays
    (run / checkpoint_name(610)).mkdir()  # unlisted, two listed newer
    (run / "checkpoint_manager_snapshot.json").write_text("{")  # unreadable: nothing goes
    launch._fit(SimpleNamespace(fit=lambda: "result"), run, 0, keep_checkpoints=1)
    assert steps() == [600, 610, 650, 700, 750]
