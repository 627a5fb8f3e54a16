"""One node agent that stops answering (a hung NVML call, a stuck process; here its process is
SIGSTOPped) on the session cluster: jobs and `status` carry on with a warning naming its node,
and the scheduler's maintenance kills that agent and starts a new one.

The CPU node's agent is the one stopped: no other test's placement needs that node. Each test
lets the process go again (SIGCONT) and leaves with the node reporting.
"""
import contextlib
import os
import signal
import time
from types import SimpleNamespace

import pytest
import ray

from orchestrator.__main__ import main as orchestrator_main
from orchestrator.config import JobSpec
from orchestrator.placement import Placement
from ray_layer import cluster as cluster_module
from ray_layer.cluster import ensure_control_plane
from ray_layer.launch import dry_run_placement
from ray_layer.scheduler_client import get_agent
from tests.support import wait_for


def agent_pid(agent) -> int:
    return ray.get(agent.__ray_call__.remote(lambda self: os.getpid()), timeout=30)


@contextlib.contextmanager
def stopped(pid: int):
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def node_ip(node_id: str) -> str:
    return next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id)


def reporting(scheduler, node_id: str) -> bool:
    return ray.get(scheduler.snapshot.remote())["health"].get(node_id) == "healthy"


def test_a_hung_agent_is_named_in_a_warning_and_launch_and_status_go_on(cluster, monkeypatch,
                                                                        capsys):
    scheduler, agents = ensure_control_plane()
    silent = cluster["cpu"]
    monkeypatch.setattr(cluster_module, "AGENT_REPORT_WAIT_S", 3.0)
    warnings = []
    with stopped(agent_pid(agents[silent])):
        started = time.monotonic()
        scheduler_again, agents_again = ensure_control_plane(warn=warnings.append)
        took = time.monotonic() - started
        assert scheduler_again._actor_id == scheduler._actor_id
        assert set(agents_again) == set(cluster.values())
        (warning,) = warnings
        # Only the stopped agent is named, with its node's id and address; the others answered.
        assert f"node {silent} ({node_ip(silent)}): no report within 3s" in warning
        assert "1 of 4 node agent(s) did not report" in warning
        assert all(node not in warning for node in cluster.values() if node != silent)
        assert took < 10, took

        # A launch's path (connected_scheduler): placed on the others, a warning on stderr.
        decision = dry_run_placement(JobSpec("despite-hung-agent", num_workers=1), None)
        assert isinstance(decision, Placement), decision
        assert f"node {silent} (" in capsys.readouterr().err

        # `python -m orchestrator status` (its _connect, in this process: Ray is up already).
        assert orchestrator_main(["status"]) == 0
        out, err = capsys.readouterr()
        assert "NODE" in out and cluster["t4"][:12] in out
        assert "warning: 1 of 4 node agent(s) did not report" in err
        assert f"node {silent} (" in err
    wait_for("the stopped agent to report again", lambda: reporting(scheduler, silent),
             timeout_s=60)


@ray.remote(num_cpus=0)
def never_ready():
    time.sleep(60)


def test_ensure_control_plane_fails_clearly_only_when_the_scheduler_is_not_up(cluster,
                                                                              monkeypatch):
    """The one thing that still stops ensure_control_plane: the scheduler not answering."""
    pending = never_ready.remote()
    hung = SimpleNamespace(__ray_ready__=SimpleNamespace(remote=lambda: pending))
    monkeypatch.setattr(cluster_module, "ensure_scheduler", lambda: hung)
    try:
        with pytest.raises(cluster_module.SchedulerNotUp,
                           match=r"the scheduler actor \('orchestrator-scheduler' in Ray "
                                 r"namespace 'orchestrator'\) did not come up: GetTimeoutError"):
            ensure_control_plane(timeout_s=0.5, start_timeout_s=1.0)
    finally:
        ray.cancel(pending, force=True)


def test_maintenance_kills_a_hung_agent_and_starts_a_new_one(cluster):
    """The session's scheduler: suspect_after_s 15 s, a maintenance pass every 5 s."""
    scheduler, agents = ensure_control_plane()
    node = cluster["cpu"]
    old = agents[node]
    pid = agent_pid(old)
    with stopped(pid):
        started = time.monotonic()
        new = wait_for("a new agent on the node of the stopped one",
                       lambda: (a := get_agent(node))._actor_id != old._actor_id and a,
                       timeout_s=60, every_s=0.5, ignore=(ValueError,))
        replaced_after = time.monotonic() - started
        # The new agent answers and the node reports again (healthy: it may take new work).
        assert ray.get(new.report_now.remote(), timeout=30).node_id == node
        wait_for("the node to report again", lambda: reporting(scheduler, node), timeout_s=30)
        # The stopped process is gone for good (killed, not left to wake up later).
        wait_for("the stopped agent's process to end", lambda: not _alive(pid), timeout_s=30)
    # Killed once it had been silent past suspect_after_s (15 s), not sooner.
    assert replaced_after > 10, replaced_after
    # The new agent is left alone: the next maintenance passes keep it.
    time.sleep(6)
    assert get_agent(node)._actor_id == new._actor_id
    assert ray.get(scheduler.maintain.remote())["agents_restarted"] == []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
