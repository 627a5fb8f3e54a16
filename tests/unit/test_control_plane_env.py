"""The control plane's actors (ray_layer/cluster.py) are not created inside a job's runtime_env.
Ray gives an actor the runtime_env of the process creating it, field by field: an explicit
runtime_env option replaces only the fields it names (env_vars merge per variable), and none
removes one. Created by the first job's driver, the scheduler and node agents ran for the
cluster's life in that job's pip venv, working_dir and env_vars (and waited for the venv to
build, past the driver's 60 s wait). A missing one is now created by a driver process of its
own, started without a runtime_env. Ray is stubbed; no Ray is started, no process run."""
import json
import sys
from types import SimpleNamespace

import pytest

SUBMITTED = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # Ray's: a `ray job submit` job's config, runtime_env


@pytest.fixture
def cluster(monkeypatch):
    """ray_layer.cluster with Ray stubbed: a job with a pip runtime_env, no scheduler yet;
    `.runs` lists the processes started, `.created` the actors created in this process."""
    import ray

    from ray_layer import cluster
    from ray_layer.scheduler_client import SchedulerNotRunning

    runs, created = [], []
    context = SimpleNamespace(runtime_env={"pip": ["pandas"]}, gcs_address="10.0.0.1:6379")
    monkeypatch.setattr(ray, "get_runtime_context", lambda: context)

    def no_scheduler():
        raise SchedulerNotRunning("none")
    monkeypatch.setattr(cluster, "get_scheduler", no_scheduler)
    monkeypatch.setattr(cluster, "SchedulerActor", SimpleNamespace(
        options=lambda **options: SimpleNamespace(
            remote=lambda **settings: created.append(settings) or "scheduler")))

    def run(command, **kwargs):
        runs.append((command, kwargs))
        return SimpleNamespace(returncode=0, stderr="")
    monkeypatch.setattr(cluster.subprocess, "run", run)
    monkeypatch.setattr(cluster, "_bring_up_failed", False)
    monkeypatch.setenv(SUBMITTED, json.dumps({"runtime_env": {"pip": ["pandas"]}}))
    return SimpleNamespace(module=cluster, context=context, runs=runs, created=created)


def test_a_missing_scheduler_is_created_by_a_process_without_the_jobs_runtime_env(cluster):
    assert cluster.module.ensure_scheduler(min_run_s=5.0) == "scheduler"
    [(command, kwargs)] = cluster.runs
    assert command == [sys.executable, "-m", "ray_layer.cluster", "10.0.0.1:6379",
                       json.dumps({"min_run_s": 5.0})]
    # Not `ray job submit`'s runtime_env either (Ray reads it from the environment)
    assert SUBMITTED not in kwargs["env"] and kwargs["timeout"] > 60


def test_nothing_is_started_aside_without_a_runtime_env_or_with_a_scheduler_up(cluster,
                                                                              monkeypatch):
    cluster.context.runtime_env = {}  # a plain driver: what it creates inherits nothing
    cluster.module.ensure_scheduler()
    cluster.context.runtime_env = {"pip": ["pandas"]}
    monkeypatch.setattr(cluster.module, "get_scheduler", lambda: "scheduler")  # up already
    cluster.module.ensure_scheduler()
    assert cluster.runs == [] and len(cluster.created) == 2  # (looked up: get_if_exists)


def test_the_process_aside_never_starts_another(cluster, monkeypatch):
    # Its own Ray job has no runtime_env; were one still there, it must not loop.
    monkeypatch.setenv(cluster.module.CLEAN_BRING_UP_ENV, "1")
    cluster.module.ensure_scheduler()
    assert cluster.runs == []


def test_a_failed_process_aside_is_said_and_the_scheduler_created_here_as_before(
        cluster, monkeypatch, capsys):
    monkeypatch.setattr(cluster.module.subprocess, "run", lambda command, **kwargs:
                        SimpleNamespace(returncode=1, stderr="...\nConnectionError: GCS down\n"))
    assert cluster.module.ensure_scheduler() == "scheduler" and cluster.created == [{}]
    err = capsys.readouterr().err
    assert err.startswith("warning: could not create the control plane outside this job's "
                          "runtime_env (ConnectionError: GCS down)"), err


def test_the_process_aside_imports_the_installed_package_not_the_jobs_copy(
        cluster, monkeypatch, tmp_path):
    # Ray adds a driver's working directory to its job's workers' sys.path when the job has
    # no working_dir. Run from the caller's, under `ray job submit --working-dir .` the job's
    # extracted copy (a folder Ray deletes once unused), the scheduler imported that snapshot
    # while agents on other nodes ran the installed package. The copy was also on PYTHONPATH.
    import os
    from pathlib import Path

    job_copy = tmp_path / "session" / "runtime_resources" / "working_dir_files" / "_ray_pkg_1"
    job_copy.mkdir(parents=True)
    monkeypatch.chdir(job_copy)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(job_copy), "/opt/cluster-libs"]))
    seen = []

    def run(command, **kwargs):
        seen.append((kwargs["cwd"], sorted(os.listdir(kwargs["cwd"])), kwargs["env"]))
        return SimpleNamespace(returncode=0, stderr="")
    monkeypatch.setattr(cluster.module.subprocess, "run", run)
    cluster.module.ensure_scheduler()
    [(cwd, listing, env)] = seen
    assert listing == [] and Path(cwd) != job_copy and not Path(cwd).exists()  # removed after
    assert env["PYTHONPATH"] == "/opt/cluster-libs"


def test_a_package_not_installed_on_the_node_is_said_and_created_here_as_before(
        cluster, monkeypatch, capsys):
    # Shipped only by the job's working_dir, the package cannot be imported outside it: the
    # process aside fails, and the caller creates the control plane itself, saying why.
    monkeypatch.setattr(cluster.module.subprocess, "run", lambda command, **kwargs:
                        SimpleNamespace(returncode=1, stderr=(
                            "Traceback (most recent call last):\n  ...\n"
                            "ModuleNotFoundError: No module named 'ray_layer'\n")))
    assert cluster.module.ensure_scheduler() == "scheduler" and cluster.created == [{}]
    err = capsys.readouterr().err
    assert err.startswith("warning: this package (ray_layer, orchestrator) is not installed on "
                          "this node, only shipped with the job"), err
    assert "pip install" in err and "operations.md" in err


def test_a_failed_process_aside_is_not_tried_again_by_the_same_process(cluster, monkeypatch,
                                                                       capsys):
    # A lost scheduler's re-creation ran it twice (ensure_scheduler, then
    # ensure_control_plane), each up to CLEAN_BRING_UP_TIMEOUT_S, with the warning twice.
    tried = []
    monkeypatch.setattr(cluster.module.subprocess, "run", lambda command, **kwargs:
                        tried.append(command) or SimpleNamespace(returncode=1, stderr="boom"))
    cluster.module.ensure_scheduler()
    cluster.module.ensure_scheduler()
    assert len(tried) == 1 and capsys.readouterr().err.count("warning:") == 1
    assert cluster.created == [{}, {}]  # both created here, as before


class Clock:
    """time.monotonic and time.sleep on a fake clock; the process aside takes the whole
    `timeout` it is given (a slow GCS, a scheduler restoring a large state) and is killed."""

    def __init__(self, monkeypatch, cluster) -> None:
        import subprocess
        import time

        self.now, self.timeouts = 0.0, []
        monkeypatch.setattr(time, "monotonic", lambda: self.now)
        monkeypatch.setattr(time, "sleep", self.sleep)

        def slow(command, **kwargs):
            self.timeouts.append(kwargs["timeout"])
            self.now += kwargs["timeout"]
            raise subprocess.TimeoutExpired(command, kwargs["timeout"])
        monkeypatch.setattr(cluster.module.subprocess, "run", slow)

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def dead_scheduler():
    import ray

    def dead(*args):
        raise ray.exceptions.ActorDiedError()
    return SimpleNamespace(poll=SimpleNamespace(remote=dead))


def test_a_lost_schedulers_re_creation_ends_by_the_calls_deadline(cluster, monkeypatch):
    # A driver's poll found the scheduler killed for good: its re-creation (ensure_scheduler,
    # the control plane brought up by a process of its own) waited up to 180 s, whatever the
    # poll's deadline (--queue-timeout) left: 30 s left ended 180 s later.
    from ray_layer.scheduler_client import SchedulerLink, SchedulerUnreachable

    clock = Clock(monkeypatch, cluster)
    monkeypatch.setattr(cluster.module.SchedulerActor, "options", lambda **options:
                        SimpleNamespace(remote=lambda **settings: cluster.created.append(
                            settings) or dead_scheduler()))  # (created here: dead too)
    link = SchedulerLink(dead_scheduler(), cluster.module.ensure_scheduler)
    with pytest.raises(SchedulerUnreachable) as raised:
        link.ask("poll", "job", "driver", timeout_s=60.0, deadline=30.0)
    assert clock.timeouts == [pytest.approx(29.0)] and clock.now <= 30.0  # (1 s of pause)
    assert str(raised.value).startswith(
        "the scheduler did not answer poll() within the 30 s its deadline left, after 2 tries: "
        "SchedulerNotUp: the control plane"), raised.value
    assert "not up within the 29 s the call's deadline left" in str(raised.value)
    # Cut short by a deadline, the process aside has not failed: tried again by the next
    # call, and nothing was created here (in the job's runtime_env, for the cluster's life).
    assert cluster.created == [] and cluster.module._bring_up_failed is False


def test_without_a_deadline_a_re_creation_waits_as_before(cluster, monkeypatch, capsys):
    # A call with no deadline (a job's submit, a Ray Train controller's replace) gives the
    # process aside its full time, and then creates the control plane itself, as before.
    from ray_layer.scheduler_client import SchedulerLink

    clock = Clock(monkeypatch, cluster)
    scheduler = SimpleNamespace(poll=SimpleNamespace(remote=lambda *args: "queued"))
    monkeypatch.setattr(cluster.module.SchedulerActor, "options", lambda **options:
                        SimpleNamespace(remote=lambda **settings: scheduler))
    monkeypatch.setattr(__import__("ray"), "get", lambda value, timeout=None: value)
    link = SchedulerLink(None, cluster.module.ensure_scheduler)
    assert link.ask("poll", "job", "driver", timeout_s=60.0) == "queued"
    assert clock.timeouts == [cluster.module.CLEAN_BRING_UP_TIMEOUT_S]
    assert "could not create the control plane outside" in capsys.readouterr().err
