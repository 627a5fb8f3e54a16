"""Bring the control plane up: a named scheduler and an agent on every alive node.

Idempotent: actors that already exist are reused, so every job can call this and only the
first one on a cluster creates anything.
"""
from __future__ import annotations

import ray

from ray_layer.node_agent import ensure_agent
from ray_layer.scheduler_actor import SchedulerActor
from ray_layer.scheduler_client import NAMESPACE, SCHEDULER_NAME

HEAD_NODE_RESOURCE = "node:__internal_head__"  # Ray gives the head node this resource


def ensure_scheduler(**settings):
    """The cluster's scheduler, created with `settings` (SchedulerActor's keyword arguments:
    the fields of orchestrator.scheduler_types.SchedulerSettings, plus maintain_every_s) if it
    does not exist yet; an existing one keeps the settings it was created with."""
    return SchedulerActor.options(name=SCHEDULER_NAME, namespace=NAMESPACE, lifetime="detached",
                                  get_if_exists=True,
                                  # On the head node, which outlives worker nodes: a scheduler
                                  # on a node that is lost restarts with no reports for a while.
                                  resources={HEAD_NODE_RESOURCE: 0.001}).remote(**settings)


def alive_node_ids() -> list[str]:
    return [n["NodeID"] for n in ray.nodes() if n["Alive"]]


def ensure_agents() -> dict[str, "ray.actor.ActorHandle"]:
    """An agent on every alive node. The scheduler also does this on a timer, so nodes that
    join later (autoscaling, `ray start` elsewhere) get one without anyone asking."""
    return {node_id: ensure_agent(node_id) for node_id in alive_node_ids()}


def ensure_control_plane(timeout_s: float = 60.0):
    """Scheduler + agents up, and a fresh report from every agent in the scheduler."""
    scheduler = ensure_scheduler()
    agents = ensure_agents()
    ray.get([agent.report_now.remote() for agent in agents.values()], timeout=timeout_s)
    return scheduler, agents


class ClusterConnectionError(RuntimeError):
    """Ray could not be reached at the given address."""


def _check_reachable(address: str, source: str, timeout_s: float = 5.0) -> None:
    """Fail fast on an unreachable host:port. ray.init itself retries for minutes."""
    import socket

    if address.startswith(("http://", "https://")):
        raise ClusterConnectionError(
            f"{source} {address!r} is a dashboard URL (what `ray job submit` wants); a job "
            "connects to the cluster's GCS address, host:6379. Unset it to use an embedded Ray")
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ClusterConnectionError(f"{source} {address!r} is not of the form host:port")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ClusterConnectionError(
            f"cannot reach a Ray cluster at {address} ({source}): {e.strerror or e}. Is "
            "`ray start --head` running there, and is the port open from here?") from None


def connect(address: str | None, runtime_env: dict | None = None) -> bool:
    """Connect to the cluster at `address` (or RAY_ADDRESS); start an embedded local Ray when
    neither is given. `runtime_env` (Ray's: working_dir, pip, env_vars, ...) becomes the job's.
    Returns True when this call started Ray (and so should stop it)."""
    import os

    if ray.is_initialized():
        if runtime_env:
            raise ClusterConnectionError(
                "runtime_env applies when the launcher connects, but Ray is already "
                "initialized in this process: pass it to your own ray.init() instead")
        return False
    source = "--address"
    if not address and os.environ.get("RAY_ADDRESS"):
        address, source = os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    if address and address != "auto":
        _check_reachable(address, source)
    try:
        ray.init(address=address or None, runtime_env=runtime_env)
    except Exception as e:  # auth, version mismatch, ...: Ray raises many types here
        where = f"Ray at {address} ({source})" if address else "an embedded local Ray"
        raise ClusterConnectionError(f"cannot start or connect to {where}: "
                                     f"{type(e).__name__}: {e}") from None
    return not address
