"""Run a training function on the cluster, where the scheduler places it, under Ray Train.

    outcome = launch(train_under_ray, {"train": ...}, spec, run_dir, address=None,
                     queue_timeout_s=600, max_failures=3)

The path: connect (or start an embedded Ray) -> scheduler and node agents up -> submit the
JobSpec and wait in the queue -> a TorchTrainer with one worker per placed slot, each pinned to
its node -> after a yield (preemption, migration) wait and fit again, resuming from the run's
checkpoints -> release the reservation. jobs/pretrain.py is one client; any training function
that follows Ray Train's conventions (report metrics, checkpoint through `ray.train.report`, and
"yielded" in its metrics when the scheduler's directive stopped it) can be launched the same way.

Every failure becomes a JobFailed with an exit code (orchestrator/job_exit.py): a wrong address
is bad input, a job the cluster cannot hold is not placeable, a training failure after Ray
Train's restarts names the first worker's own exception.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ray
import torch.distributed as dist
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from orchestrator.config import JobSpec
from orchestrator.job_file import DEFAULT_KEEP_CHECKPOINTS
from orchestrator.job_exit import (CALL_TIMEOUT_S, EXIT_BAD_INPUT, EXIT_FAILED,
                                  EXIT_NOT_PLACEABLE, JobFailed, last_exception)
from orchestrator.placement import Placement
from orchestrator.runs import (checkpoint_dirs, prune_unlisted_checkpoints,
                               remove_failed_uploads)
from ray_layer.cluster import (ClusterConnectionError, connect, ensure_control_plane,
                               ensure_scheduler)
from ray_layer.placed_run import NotPlaced, PlacedRun
from ray_layer.scheduler_client import SchedulerUnreachable, failed_call
from ray_layer.train_callbacks import (FollowPlacement, JobCancelled, MetricsLog,
                                       NodeLostError, WatchStuckRanks)
from ray_layer.user_loop import RAISED_AT, REPORT_REFUSED


@dataclass
class Launched:
    """What a launch ended with: Ray Train's last result, where the workers ran at the end
    (a lost node moves them), and each time the scheduler took the placement back."""

    result: Any  # ray.train.Result
    placement: Placement
    yields: list[dict]


REPORT_POLL_ENV, REPORT_POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25"
# Retries of a worker group that failed to start (each start waits up to Ray Train's 60 s
# start timeout), over the whole run, before it gives up (or --max-failures, if larger): Ray
# Train retries them without limit by default, and a placed node that is up but cannot host
# its worker (its CPUs or GPUs taken by work outside the scheduler) left the run retrying for
# good - no exit code, the reservation held.
STARTUP_RETRIES = 3
# Ray Train's controller errors for a worker group that did not start (private classes:
# matched by name).
STARTUP_FAILURES = ("WorkerGroupStartupTimeoutError", "WorkerGroupStartupFailedError")


def startup_retries(max_failures: int) -> int:
    """Ray Train's controller_failure_limit for a run of `max_failures`."""
    return max(STARTUP_RETRIES, max_failures)


@contextlib.contextmanager
def connected_scheduler(address: str | None, runtime_env: dict | None = None):
    """The scheduler actor, on the cluster at `address` (an embedded local Ray when there is
    none, shut down on exit); JobFailed when neither comes up."""
    try:
        started_ray = connect(address, runtime_env)
    except ClusterConnectionError as e:
        raise JobFailed(str(e), EXIT_BAD_INPUT) from None
    try:
        try:  # node agents that do not report are named in a warning, not fatal
            scheduler, _ = ensure_control_plane()
        except (ray.exceptions.RayError, TimeoutError) as e:  # SchedulerNotUp is a TimeoutError
            raise JobFailed(str(e), EXIT_NOT_PLACEABLE) from None
        yield scheduler
    finally:
        if started_ray:
            ray.shutdown()


def dry_run_placement(spec: JobSpec, address: str | None):
    """The placement `spec` would get now (a Placement or a Rejection), reserving nothing."""
    with connected_scheduler(address) as scheduler:
        try:  # (dry run, explained)
            return ray.get(scheduler.place.remote(spec, "", True, True), timeout=CALL_TIMEOUT_S)
        except ray.exceptions.RayError as e:  # gone, hung, or failed inside: exit 3 as promised
            raise JobFailed(failed_call("place", e, CALL_TIMEOUT_S), EXIT_NOT_PLACEABLE) from None


def launch(train_fn: Callable[[dict], None], train_loop_config: dict, spec: JobSpec,
           run_dir: Path, *, address: str | None, queue_timeout_s: float, max_failures: int,
           keep_checkpoints: int | None = DEFAULT_KEEP_CHECKPOINTS,
           runtime_env: dict | None = None, stuck_timeout_s: float | None = None,
           loop_logs_metrics: bool = False) -> Launched:
    """Place `spec`, run `train_fn(train_loop_config)` on every worker under Ray Train with
    its checkpoints in `run_dir` (the run's name is the directory's name), and release.
    `stuck_timeout_s`: a user loop's (ray_layer/user_loop.py) rank stuck in its own code that
    long while the others wait for it fails as that worker's failure (WatchStuckRanks);
    None: no watch. `loop_logs_metrics`: `train_fn` appends rank 0's reports to
    metrics.jsonl itself (train_under_ray's session), so Ray Train's controller does not
    (MetricsLog: it would write each twice)."""
    # Ray Train's controller takes a worker's report once per poll, 2 s apart by default, and
    # the worker's next report waits for it: a run reporting every second or so spent a
    # quarter of its training phase waiting (scripts/bench_train.py, 2026-12-03). Ray Train
    # passes this variable from the driver to its controller; a value already set is kept.
    os.environ.setdefault(REPORT_POLL_ENV, REPORT_POLL_S)
    with connected_scheduler(address, runtime_env) as scheduler:
        driver = PlacedRun(scheduler, spec, queue_timeout_s, reconnect=ensure_scheduler)
        trainer_for = _trainer_factory(train_fn, train_loop_config, spec, run_dir, driver.owner,
                                       queue_timeout_s, max_failures, keep_checkpoints,
                                       stuck_timeout_s, loop_logs_metrics)
        fitted = []  # (whether workers were started: a refusal after that ran the job)

        def fit_placed(placement: Placement):
            fitted.append(placement)
            result = _fit(trainer_for(placement), run_dir, max_failures, keep_checkpoints)
            refused = refused_report_failure(result, run_dir)
            if refused is not None:
                raise refused
            return result
        try:
            result, placement = driver.run(
                fit_placed, resumed_from=[str(p) for p in checkpoint_dirs(run_dir)])
            placement = driver.current_placement(placement)
        except NotPlaced as e:  # (a cancel, or no room after a yield: it may have trained)
            kept = (f"\ncheckpoints so far are in {run_dir} (--resume continues the run)"
                    if checkpoint_dirs(run_dir) else "")
            raise JobFailed(f"{e}{kept}", EXIT_NOT_PLACEABLE, ran=bool(fitted)) from None
        except (JobFailed, KeyboardInterrupt) as e:  # (run_dir_held: whether to take back)
            e.ran = getattr(e, "ran", False) or bool(fitted)
            raise
        finally:
            warning = driver.release()
            if warning:
                print(f"warning: {warning}", file=sys.stderr)
    return Launched(result, placement, driver.yields)


class InterruptibleTrainer(TorchTrainer):
    """A TorchTrainer whose Ctrl-C also reaches FollowPlacement's wait for room after a lost
    node. That wait runs inside Ray Train's controller, an async actor whose event loop it
    holds, so Ray Train's own Ctrl-C (ray.get of the controller's abort) waited for it to end.
    The first Ctrl-C now first withdraws the job from the scheduler's queue if it waits there
    (fire and forget), so the wait's next poll finds it gone and stops; `interrupted` tells
    _fit that the failure which follows is the user's interrupt."""

    def __init__(self, *args, on_interrupt: Callable[[], None], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.on_interrupt, self.interrupted = on_interrupt, False

    def _register_sigint_handler(self, controller) -> None:
        super()._register_sigint_handler(controller)  # Ray 2.60's handler: abort, exit
        ray_handler = signal.getsignal(signal.SIGINT)

        def interrupt(signum, frame):
            if not self.interrupted:
                self.interrupted = True
                try:
                    self.on_interrupt()
                except Exception as e:  # the abort below still stops the run
                    print(f"warning: could not withdraw the job on Ctrl-C: {e}",
                          file=sys.stderr)
            ray_handler(signum, frame)

        signal.signal(signal.SIGINT, interrupt)


def _trainer_factory(train_fn, train_loop_config: dict, spec: JobSpec, run_dir: Path,
                     owner: str, queue_timeout_s: float, max_failures: int,
                     keep_checkpoints: int, stuck_timeout_s: float | None = None,
                     loop_logs_metrics: bool = False):
    def withdraw() -> None:
        from ray_layer.scheduler_client import get_scheduler

        # Waiting only: a running job's workers hold their devices until the abort ends
        # them; its reservation is released after, as at any end (PlacedRun.release).
        get_scheduler().cancel.remote(spec.name, owner, True)

    def trainer_for(placement: Placement) -> TorchTrainer:
        return InterruptibleTrainer(
            train_fn,
            train_loop_config=train_loop_config,
            torch_config=TorchConfig(backend=collective_backend(placement)),
            scaling_config=ScalingConfig(
                num_workers=len(placement.worker_nodes),
                use_gpu=placement.gpus_per_worker > 0,
                resources_per_worker={"CPU": placement.cpus_per_worker,
                                      "GPU": placement.gpus_per_worker},
                label_selector=placement.label_selectors(),  # worker i -> its placed node
            ),
            run_config=RunConfig(
                name=run_dir.name, storage_path=str(run_dir.parent),
                checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
                failure_config=FailureConfig(
                    max_failures=max_failures,
                    controller_failure_limit=startup_retries(max_failures)),
                # A lost node: re-placed by the scheduler before the worker group restarts.
                callbacks=([] if loop_logs_metrics else [MetricsLog(run_dir)])
                + [FollowPlacement(spec, owner, timeout_s=queue_timeout_s,
                                   reconnect=ensure_scheduler)]
                + ([WatchStuckRanks(stuck_timeout_s)] if stuck_timeout_s else []),
            ),
            on_interrupt=withdraw,
        )
    return trainer_for


def _fit(trainer: TorchTrainer, run_dir: Path, max_failures: int,
         keep_checkpoints: int | None = None):
    try:
        with _signal_handlers_kept():
            try:
                return trainer.fit()
            finally:  # (before _failure counts the checkpoints saved)
                remove_failed_uploads(run_dir)
                # (Ray Train is done with the folder: its own pruning cannot race this one)
                prune_unlisted_checkpoints(run_dir, keep_checkpoints)
    except SystemExit:
        # Ray Train's own Ctrl-C handler aborts the run and calls sys.exit: to our callers it
        # is an interrupt (run_job: the resume hint and exit 130), not a success or exit 1.
        raise KeyboardInterrupt from None
    except Exception as e:
        if getattr(trainer, "interrupted", False):  # Ctrl-C ended a wait for room
            raise KeyboardInterrupt from None
        raise _failure(e, run_dir, max_failures) from None


def refused_report_failure(result, run_dir: Path) -> JobFailed | None:
    """The job's failure where a user loop ended at a report launch.report refused (rank 0
    returned {REPORT_REFUSED: its line}: ray_layer/user_loop.py), else None."""
    value = getattr(result, "return_value", None)
    line = value.get(REPORT_REFUSED) if isinstance(value, dict) else None
    if line is None:
        return None
    return JobFailed(f"training failed, not restarted (the report would be refused again on "
                     f"every try): {line}\n({_checkpoints_kept(run_dir)})", EXIT_FAILED)


def _checkpoints_kept(run_dir: Path, resume: str = "") -> str:
    """Where a failed run's checkpoints are (and how to go on: `resume`), or that it has
    none: `--resume` is refused then ("no checkpoint in run_dir ... to resume from")."""
    if not checkpoint_dirs(run_dir):
        return f"no checkpoint was saved in {run_dir}: submit the job again, without --resume"
    return f"checkpoints so far are in {run_dir}" + (f" ({resume})" if resume else "")


def _failure(error: Exception, run_dir: Path, max_failures: int) -> JobFailed:
    """What a failed fit() tells the user: the workers' failure after their restarts, or what
    went wrong in Ray Train's controller (no restart count: none was spent on it)."""
    def kept(resume: str = "") -> str:
        return _checkpoints_kept(run_dir, resume)

    if isinstance(error, ray.exceptions.RayActorError):  # Ray Train's controller itself
        return JobFailed(f"{_controller_died(error)}\n{kept('--resume continues the run')}",
                         EXIT_FAILED)
    cause = _controller_cause(error)
    if cause is None:
        # A worker whose process died (os._exit, a signal, the OOM killer) left no traceback
        trace = ("no traceback: the worker's process ended without one, for the reason "
                 "above" if _process_died(_first_failure(error)[1])
                 else "full traceback in the worker log above")
        return JobFailed(f"training failed after {max_failures} restart(s): "
                         f"{root_cause(error)}\n({trace}; {kept()})", EXIT_FAILED)
    if isinstance(cause, NodeLostError):  # a lost node's workers found no room
        # On a line of its own: the rejection ends with its per-node reasons.
        return JobFailed(f"{cause}\n{kept('--resume once there is room')}", EXIT_NOT_PLACEABLE)
    if isinstance(cause, JobCancelled):
        return JobFailed(f"{cause}\n{kept('--resume continues the run')}", EXIT_NOT_PLACEABLE)
    if isinstance(cause, SchedulerUnreachable):
        hint = kept("--resume once the scheduler answers: `python -m orchestrator status`")
        return JobFailed(f"a node of the job was lost and {cause}\n{hint}", EXIT_NOT_PLACEABLE)
    if type(cause).__name__ in STARTUP_FAILURES:
        return JobFailed(f"the workers did not start on their placed nodes, retried "
                         f"{startup_retries(max_failures)} times in this run (last: "
                         f"{type(cause).__name__}: {cause}): work the scheduler does not see "
                         "(another Ray job, a Serve replica) may hold those nodes' CPUs or "
                         "GPUs; `ray status` shows what is used\n"
                         f"{kept('--resume places the job again')}", EXIT_NOT_PLACEABLE)
    return JobFailed(f"training failed in Ray Train's controller: {type(cause).__name__}: "
                     f"{cause}\n{kept()}", EXIT_FAILED)


def _controller_died(error: ray.exceptions.RayActorError) -> str:
    """Ray Train's controller failed to start (its __init__ raised: Ray's message carries the
    traceback, whose last top-level `Name: message` line and what follows it say what) or
    died (Ray's message names the actor, then why): no worker ran, no restart was spent. It
    read "training failed after 3 restart(s): ActorDiedError: ... Traceback ..."."""
    if getattr(error, "actor_init_failed", False):
        return f"Ray Train's controller could not start: {last_exception(str(error)) or error}"
    return f"Ray Train's controller died: {_why_actor_died(error)[1]}"


_ACTOR_FIELD = re.compile(r"\s*(class_name|actor_id|pid|name|namespace|ip):\s*(.*)")


def _why_actor_died(error: ray.exceptions.RayActorError) -> tuple[dict[str, str], str]:
    """(the actor's fields in Ray's message: pid, ip, ...; why it died, on one line): Ray's
    message names the actor, a field a line, then says why."""
    lines = str(error).splitlines()
    fields = {m.group(1): m.group(2).strip() for m in map(_ACTOR_FIELD.match, lines[1:]) if m}
    why = [line.strip() for line in lines[1:]
           if line.strip() and not _ACTOR_FIELD.match(line)]
    return fields, " ".join(why) or (lines[0] if lines else type(error).__name__)


def _process_died(error: BaseException) -> str | None:
    """A worker's failure that is its process gone (os._exit in the loop, a signal, the
    kernel's OOM killer), on one line: Ray Train's WorkerHealthCheckFailedError read "A
    worker health check failed." and 16 lines of Ray's worker and actor fields after it."""
    died = getattr(error, "health_check_failure", None)
    if not isinstance(died, ray.exceptions.RayActorError) or died.actor_init_failed:
        return None
    fields, why = _why_actor_died(died)
    where = " at ".join(([f"pid {fields['pid']}"] if fields.get("pid") else [])
                        + ([fields["ip"]] if fields.get("ip") else []))
    return f"its process died ({where}): {why}" if where else f"its process died: {why}"


def _controller_cause(error: Exception) -> BaseException | None:
    """The exception behind Ray Train's ControllerError (a callback's own, unwrapped from a
    task error), or None when the run failed otherwise (the workers' WorkerGroupError)."""
    cause = getattr(error, "controller_failure", None)
    if cause is None:
        return None
    return getattr(cause, "cause", None) or cause


def collective_backend(placement: Placement) -> str:
    """NCCL for GPU workers on GPUs NVML measured, where torch has it; else gloo. A CUDA
    build of torch (pip's default on Linux) has NCCL without any GPU: GPUs declared by node
    labels (a machine modelling a GPU cluster) got it, and ProcessGroupNCCL refused to start
    ("only supported with GPUs, no GPUs found")."""
    return ("nccl" if placement.gpus_per_worker and placement.gpus_measured
            and dist.is_nccl_available() else "gloo")


@contextlib.contextmanager
def _signal_handlers_kept():
    """Ray Train installs an "abort the run" SIGINT handler and leaves it after fit() returns;
    a caller that goes on (a benchmark, the chaos run) must get Ctrl-C back."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread has signal handlers
        return
    handler = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)


def _first_failure(error: Exception) -> tuple[str, BaseException]:
    """("worker rank N: " or "", the exception root_cause names)."""
    failures = getattr(error, "worker_failures", None)  # ray.train.WorkerGroupError
    if failures:
        rank, error = min(failures.items(), key=lambda item: (
            _process_died(getattr(item[1], "cause", None) or item[1]) is None, item[0]))
        prefix = f"worker rank {rank}: "
    else:
        error = getattr(error, "controller_failure", error)  # ray.train.ControllerError
        prefix = ""
    return prefix, getattr(error, "cause", None) or error  # (RayTaskError: the original)


def root_cause(error: Exception) -> str:
    """The first worker's original exception, not Ray Train's wrapper around it; a worker
    whose process died first of all (its peers' collectives then fail, "Connection reset by
    peer": rank 0's was named, blaming a healthy worker)."""
    prefix, cause = _first_failure(error)
    died = _process_died(cause)
    if died:
        return f"{prefix}{died}"
    try:
        text = str(cause)
    except Exception:  # (a loop's exception whose __str__ raises: a traceback here before)
        text = "<str() failed>"
    first, newline, rest = text.partition("\n")
    # Where a user's loop raised it (ray_layer/user_loop.py notes it on the worker): the
    # traceback is only in a worker's log, and a bare `assert` had no message at all.
    where = getattr(cause, RAISED_AT, None)
    head = f"{type(cause).__name__}: {first}" if first else type(cause).__name__
    if isinstance(where, str):
        head += f" ({where})"
    return f"{prefix}{head}{newline}{rest}"
