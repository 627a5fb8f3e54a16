"""Bring your own training loop: the scheduler places it, Ray Train runs it there.

    import ray.train
    from orchestrator import launch
    from orchestrator.config import JobSpec

    def train_loop(config):               # a plain Ray Train train_loop_per_worker
        ...                               # resume from ray.train.get_checkpoint() if any
        for step in range(start, config["steps"]):
            ...
            checkpoint = ray.train.Checkpoint.from_directory(d) if step % 100 == 0 else None
            launch.report({"step": step, "loss": loss}, checkpoint=checkpoint)

    fitted = launch.fit(train_loop, spec=JobSpec("my-run", num_workers=2), config={"steps": 1000})

`fit` connects to the cluster (RAY_ADDRESS or `address`; an embedded local Ray when neither is
given), brings the scheduler and node agents up, submits the JobSpec and waits in the queue,
runs the loop under a TorchTrainer with each worker pinned to the node it was placed on,
follows the placement if a node is lost, and releases the reservation at the end.

`report` is `ray.train.report` plus preemption: when the scheduler asks the job to yield (a
higher-priority job needs the room, faster accelerators freed up, an operator's preempt or
cancel), the loop stops right after a report that carried a checkpoint; `fit` then waits in
the queue and runs the loop again, which resumes from that checkpoint. A loop that never calls
`report` runs too, but declare it with `JobSpec(preemptible=False)` so the scheduler never
counts on it to stop.

This module is the user-facing name; the work is done in the Ray layer (ray_layer/launch.py,
ray_layer/user_loop.py), imported when called.
"""
from __future__ import annotations

import importlib.machinery
import os
import sys
from pathlib import Path
from typing import Any, Callable

from orchestrator.config import ConfigError, JobSpec, TrainConfig
from orchestrator.entrypoints import accepts_config, local_modules
from orchestrator.job_exit import EXIT_BAD_INPUT, EXIT_NOT_PLACEABLE, JobFailed
from orchestrator.job_file import (DEFAULT_KEEP_CHECKPOINTS, EMPTY_RUN_DIR, launcher_problems,
                                   run_name_problem)
from orchestrator.runs import (DEFAULT_RUNS_ROOT, RunDirError, has_checkpoints, run_dir_held,
                               writable_dir_problem)
from orchestrator.stuck_ranks import DEFAULT_STUCK_TIMEOUT_S
from orchestrator.validation import expand_home


def fit(train_loop: Callable, *, spec: JobSpec, config: dict[str, Any] | None = None,
        run_dir: str | Path | None = None, resume: bool = False, address: str | None = None,
        queue_timeout_s: float = 600.0, max_failures: int = 3,
        runtime_env: dict[str, Any] | None = None,
        keep_checkpoints: int | None = DEFAULT_KEEP_CHECKPOINTS,
        stuck_timeout_s: float | None = DEFAULT_STUCK_TIMEOUT_S):
    """Run `train_loop` on the cluster where the scheduler places `spec`; returns a
    `ray_layer.launch.Launched` (Ray Train's `result`, the final `placement`, the `yields`).

    train_loop: Ray Train's train_loop_per_worker, taking `config` or nothing.
    spec: what the job asks of the cluster; `spec.name` names the run and its directory.
    config: handed to every worker (Ray Train's train_loop_config).
    run_dir: where Ray Train keeps the checkpoints; default `<runs root>/<spec.name>`
        (`ORCHESTRATOR_RUNS_DIR` or ~/orchestrator-runs). Its last part must be the job's name.
    resume: continue the run in `run_dir` from its latest checkpoint; without it, a run_dir
        that already holds checkpoints is refused (two runs mixed in one folder).
    address: the Ray cluster (host:port, "auto"); default RAY_ADDRESS, else an embedded Ray.
    queue_timeout_s: how long to wait in the queue before giving up (time spent preempted is
        not counted).
    max_failures: worker-group restarts Ray Train attempts (a worker's crash, a lost node).
    runtime_env: Ray's runtime_env for the job (working_dir, pip, env_vars), set when this
        call connects.
    keep_checkpoints: how many checkpoints Ray Train keeps; None: every one.
    stuck_timeout_s: a rank in its own code this long (neither calling report nor returning)
        while another rank has waited as long for it, in report or after returning, fails as
        that worker's failure, named with its last report (a restart from the latest
        checkpoint within max_failures, as for a crash); None: no watch (the others wait for
        the process group's 30-minute timeout).

    Raises JobFailed (its `exit_code` as in docs/training.md) naming what went wrong: bad
    input, a job the cluster cannot hold, or the first worker's own exception.
    """
    per_worker, directory = prepare_fit(  # bool(): None here is "no", not a dry run's "either"
        train_loop, spec=spec, config=config, run_dir=run_dir, resume=bool(resume),
        queue_timeout_s=queue_timeout_s, max_failures=max_failures, runtime_env=runtime_env,
        keep_checkpoints=keep_checkpoints, stuck_timeout_s=stuck_timeout_s)
    refuse_what_embedded_ray_cannot_hold(spec, address)
    from ray_layer.launch import launch

    try:  # (a refused fit leaves no directory it made behind: run_dir_held)
        with run_dir_held(directory, new_run=not resume):
            return launch(per_worker, config or {}, spec, directory, address=address,
                          queue_timeout_s=queue_timeout_s, max_failures=max_failures,
                          keep_checkpoints=keep_checkpoints, runtime_env=runtime_env,
                          stuck_timeout_s=stuck_timeout_s)
    except RunDirError as e:
        raise JobFailed(str(e), EXIT_BAD_INPUT) from None


def prepare_fit(train_loop: Callable, *, spec: JobSpec, config: dict[str, Any] | None,
                run_dir: str | Path | None, resume: bool | None, queue_timeout_s: float,
                max_failures: int, runtime_env: dict[str, Any] | None,
                keep_checkpoints: int | None = DEFAULT_KEEP_CHECKPOINTS,
                stuck_timeout_s: float | None = DEFAULT_STUCK_TIMEOUT_S
                ) -> tuple[Callable, Path]:
    """(the function each worker runs, the run directory): everything `fit` checks before it
    connects to Ray, so that `submit --dry-run` refuses what `submit` would. JobFailed
    (EXIT_BAD_INPUT) naming the first problem. `resume=None` (a dry run) accepts a run
    directory with or without checkpoints."""
    if not isinstance(spec, JobSpec):
        raise JobFailed(f"spec must be an orchestrator.config.JobSpec, got {spec!r}",
                        EXIT_BAD_INPUT)
    problems = launcher_problems({"max_failures": max_failures,
                                  "queue_timeout_s": queue_timeout_s,
                                  "runtime_env": runtime_env, "config": config,
                                  "keep_checkpoints": keep_checkpoints,
                                  "stuck_timeout_s": stuck_timeout_s})
    if problems:
        raise JobFailed("; ".join(problems), EXIT_BAD_INPUT)
    try:
        accepts_config(train_loop)
        directory = resolve_fit_run_dir(spec, run_dir, resume)
    except (TypeError, ConfigError) as e:
        raise JobFailed(str(e), EXIT_BAD_INPUT) from None
    from ray_layer.cluster import (runtime_env_problem, runtime_env_warnings,
                                   submitted_runtime_env_conflict)
    from ray_layer.user_loop import (config_pickling_problem, pickling_problem,
                                     ship_by_value, yielding)

    problem = (runtime_env_problem(runtime_env) or submitted_runtime_env_conflict(runtime_env)
               if runtime_env else None)
    if problem:
        raise JobFailed(problem, EXIT_BAD_INPUT)
    for warning in runtime_env_warnings(runtime_env or {}):
        print(f"warning: {warning}", file=sys.stderr)
    module = sys.modules.get(getattr(train_loop, "__module__", None) or "")
    script_folders: tuple[str, ...] = ()
    if module is not None and (module.__name__ == "__main__"
                               or not importable_by_name(module)):
        if module.__name__ != "__main__":  # cloudpickle sends __main__'s functions by value
            ship_by_value(module)
        for helper in local_modules(module):  # files beside the script that it imported
            ship_by_value(helper)
        if getattr(module, "__file__", None):  # for what the loop imports only when it runs
            script_folders = (str(Path(module.__file__).resolve().parent),)
    per_worker = yielding(train_loop, script_folders)
    # After ship_by_value: an object of a class defined in the script travels with it.
    problem = pickling_problem(train_loop, per_worker) or config_pickling_problem(config or {})
    if problem:
        raise JobFailed(problem, EXIT_BAD_INPUT)
    return per_worker, directory


def runs_on_embedded_ray(address: str | None) -> bool:
    """Whether a job would run on an embedded Ray on this machine: no address, no
    RAY_ADDRESS, Ray not started here. Every worker then runs on this machine."""
    ray = sys.modules.get("ray")
    return not (address or os.environ.get("RAY_ADDRESS")
                or (ray is not None and ray.is_initialized()))


def refuse_what_embedded_ray_cannot_hold(spec: JobSpec, address: str | None) -> None:
    """JobFailed (EXIT_NOT_PLACEABLE) for a job that asks more CPUs than this machine has when
    it would run on an embedded Ray (no address, no RAY_ADDRESS, Ray not started here): the
    scheduler refused it only once Ray and the node agents had started, some seconds on. The
    machine's CPU count is at least what Ray counts (it may count fewer, under a cgroup
    limit), so nothing Ray would hold is refused here."""
    if not runs_on_embedded_ray(address):
        return
    cpus = os.cpu_count() or 1
    if spec.total_cpus > cpus:
        raise JobFailed(
            f"job '{spec.name}' asks {spec.num_workers} worker(s) x {spec.cpus_per_worker:g} "
            f"CPUs = {spec.total_cpus:g} CPUs, and this machine has {cpus} (no --address: an "
            "embedded Ray on this machine); use fewer workers or CPUs per worker, or give "
            "--address of a cluster", EXIT_NOT_PLACEABLE)


def host_memory_per_worker_gb(train_config: TrainConfig, num_workers: int,
                             gpus_per_worker: int) -> float:
    """The host RAM (GiB) each worker of a training run asks placement for
    (JobSpec.min_host_memory_gb): a CPU run's estimated need per worker
    (memory.cpu_memory_needed_gb); 0 for a GPU run (its estimate is GPU memory). Without it,
    a cluster placed a CPU run by CPU count alone on a node whose RAM could not hold it,
    and the kernel's OOM killer ended it mid-run."""
    if gpus_per_worker:
        return 0.0
    from orchestrator.training.memory import cpu_memory_needed_gb  # (torch: imported late)

    return cpu_memory_needed_gb(train_config, num_workers)


def host_memory_refusal_named(failure: JobFailed, train_config: TrainConfig,
                              spec: JobSpec) -> JobFailed:
    """A placement refusal for want of host RAM, with the flags that sized what was asked
    (host_memory_per_worker_gb: the run's estimate, not a flag of its own): it named only
    the JobSpec field (min_host_memory_gb), which jobs/pretrain.py has no flag for."""
    if (failure.exit_code != EXIT_NOT_PLACEABLE or not spec.min_host_memory_gb
            or "(min_host_memory_gb)" not in str(failure)):
        return failure
    from orchestrator.training.memory import LOWER_MEMORY, sizing_flags  # (torch: late)

    return JobFailed(f"{failure}\nthe host RAM asked per worker is the run's estimated need "
                     f"({sizing_flags(train_config)}): {LOWER_MEMORY}", failure.exit_code,
                     failure.ran)


def refuse_a_cpu_run_past_this_machine(train_config: TrainConfig, spec: JobSpec,
                                       address: str | None) -> None:
    """JobFailed (EXIT_NOT_PLACEABLE) for a CPU run on an embedded Ray (every worker on this
    machine) whose estimated memory is more than this machine has available, as its node
    agent would report it (within its memory cgroup): such a run was killed by the kernel's
    OOM killer mid-run, a Ray worker-died message. Refused here, before Ray starts, by the
    per-worker figure placement is asked for (spec.min_host_memory_gb, which
    host_memory_per_worker_gb worked out: not again here) times the workers; on a cluster,
    placement counts it node by node."""
    if spec.gpus_per_worker or not runs_on_embedded_ray(address):
        return
    from orchestrator import probes
    from orchestrator.training.memory import cpu_memory_refusal  # (torch: imported late)

    _, available = probes.memory_within_cgroup()
    refusal = cpu_memory_refusal(train_config, spec.min_host_memory_gb, spec.num_workers,
                                 available, "this machine")
    if refusal:
        raise JobFailed(refusal, EXIT_NOT_PLACEABLE)


def report(metrics: dict[str, Any], checkpoint=None) -> None:
    """Inside the loop, on every worker: `ray.train.report(metrics, checkpoint=checkpoint)`,
    and the point where a preemption or migration is honoured (after a checkpoint)."""
    from ray_layer.user_loop import report as report_and_maybe_yield

    report_and_maybe_yield(metrics, checkpoint)


def resolve_fit_run_dir(spec: JobSpec, run_dir: str | Path | None,
                        resume: bool | None) -> Path:
    """The run's directory (see `fit`); ConfigError when it is not the job's, cannot be
    written, or would mix two runs (resume=None, a dry run: either way is fine)."""
    name_problem = run_name_problem(spec.name)
    if name_problem:
        raise ConfigError(f"name {spec.name!r} {name_problem}: a fitted job's name is its run "
                          "directory's")
    if isinstance(run_dir, str) and not run_dir.strip():  # Path(""): the working directory
        raise ConfigError(EMPTY_RUN_DIR)
    directory = (expand_home(run_dir, "run_dir", ConfigError) if run_dir is not None
                 else DEFAULT_RUNS_ROOT.expanduser() / spec.name).resolve()
    if directory.name != spec.name:
        raise ConfigError(f"run_dir {directory} must end in the job's name {spec.name!r} (Ray "
                          "Train and the scheduler both know the run by it)")
    problem = writable_dir_problem(directory)
    if problem:  # Ray Train found it only once the job was placed, as "failed after restarts"
        raise ConfigError(f"cannot write to run_dir {directory}: {problem}")
    if resume is False and has_checkpoints(directory):
        raise ConfigError(f"run_dir {directory} already holds checkpoints of a run: resume it "
                          "(resume=True, --resume) or give the job another name")
    if resume and not has_checkpoints(directory):  # as pretrain's --resume: never a silent
        # fresh start (a mistyped or misresolved run_dir would look like a resume)
        raise ConfigError(f"resume: no checkpoint in run_dir {directory} to resume from; "
                          "start it as a new run (without resume=True, --resume)")
    return directory


def importable_by_name(module) -> bool:
    """Whether a worker can import `module` by its name from the import path (workers get the
    driver's). A script loaded from a file path cannot: it must travel by value."""
    top = module.__name__.partition(".")[0]
    return top in sys.builtin_module_names or \
        importlib.machinery.PathFinder.find_spec(top) is not None

