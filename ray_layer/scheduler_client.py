"""How anything on the cluster finds the scheduler and the node agents: their names, and the
look-up. Jobs, training workers, the Ray Train callbacks, serving, the CLI and the scripts use
this module, so a renamed actor or namespace changes here only.

Looked up on every call rather than cached by callers: a scheduler that was replaced (not just
restarted) is found again.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import ray

SCHEDULER_NAME = "orchestrator-scheduler"
NAMESPACE = "orchestrator"


class SchedulerNotRunning(RuntimeError):
    """The cluster has no scheduler actor: the control plane was never brought up there."""


def agent_name(node_id: str) -> str:
    """The name a node's agent is registered under."""
    return f"node-agent-{node_id}"


def get_scheduler(timeout_s: float | None = None) -> "ray.actor.ActorHandle":
    """The cluster's scheduler; SchedulerNotRunning, saying how to start one, when absent.
    (A look-up: nothing to wait for. `timeout_s` is taken so that it can be a SchedulerLink's
    `reconnect`.)"""
    try:
        return ray.get_actor(SCHEDULER_NAME, namespace=NAMESPACE)
    except ValueError:
        raise SchedulerNotRunning(
            "no scheduler on this cluster yet: it is created by the first job run on it "
            "(`python -m orchestrator submit`, also with --dry-run, or jobs/pretrain.py, with "
            "--address) or by `python -m orchestrator place --spec JOB.yaml --dry-run` (actor "
            f"{SCHEDULER_NAME!r} in namespace {NAMESPACE!r})") from None


class SchedulerUnreachable(RuntimeError):
    """No scheduler answered a call, looked up again between tries."""


ASK_TRIES = 3  # calls to a scheduler actor that died: looked up again between tries
# The least one try waits when a deadline is near or past: a scheduler that is up answers in
# milliseconds, and a try of a few of them would read a busy one as hung.
MIN_TRY_S = 1.0


class SchedulerLink:
    """Calls to the scheduler that outlive its actor. One killed for good (an operator's
    `ray kill`) leaves a caller's handle dead: the link looks the scheduler up again through
    `reconnect` (which may bring it up: the new one restores the same state) and retries, a
    few times, with a pause; SchedulerUnreachable, naming the call, when none answers. A call
    past its `timeout_s` (a hung scheduler) is retried the same way. `handle` None: looked
    up at the first call. `reconnect(timeout_s=)` takes at most `timeout_s` seconds (None:
    no bound; bringing a scheduler up may take minutes), else raises: the link passes what
    a call's deadline leaves (ray_layer.cluster.ensure_scheduler honours it)."""

    def __init__(self, handle: "ray.actor.ActorHandle | None",
                 reconnect: Callable[..., Any] = get_scheduler) -> None:
        self.handle, self.reconnect = handle, reconnect

    def ask(self, method: str, *args, timeout_s: float | None = None,
            deadline: float | None = None) -> Any:
        """`method`'s answer. `deadline` (a time.monotonic() instant, None: none): each try
        waits at most what it leaves (MIN_TRY_S at least), a scheduler's re-creation by
        `reconnect` included, and no retry starts past it, so the tries together end by it;
        with `timeout_s` alone each try waits that long."""
        asked_at = time.monotonic()
        problem: BaseException | None = None
        tries = 0
        for attempt in range(ASK_TRIES):
            if attempt:
                if _left(deadline) <= 0:
                    break
                time.sleep(min(float(attempt), _left(deadline)))
            tries += 1
            if attempt or self.handle is None:
                try:
                    self.handle = self.reconnect(timeout_s=_reconnect_timeout(deadline))
                except Exception as e:  # noqa: BLE001 - said below if it persists
                    problem = e
                    continue
            try:
                return ray.get(getattr(self.handle, method).remote(*args),
                               timeout=_try_timeout(timeout_s, deadline))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
                problem = e
        raise SchedulerUnreachable(
            f"the scheduler did not answer {method}(){_by_deadline(deadline, asked_at)} after "
            f"{tries} {'try' if tries == 1 else 'tries'}: {type(problem).__name__}: {problem}")


def _left(deadline: float | None) -> float:
    return math.inf if deadline is None else deadline - time.monotonic()


def _reconnect_timeout(deadline: float | None) -> float | None:
    """How long a reconnect may take: what the deadline leaves (MIN_TRY_S at least, as a
    try), unbounded without one. A lost scheduler's re-creation (the control plane brought
    up by a process of its own) held a driver up to 180 s past its --queue-timeout."""
    return None if deadline is None else max(_left(deadline), MIN_TRY_S)


def _by_deadline(deadline: float | None, asked_at: float) -> str:
    """Said of a call whose deadline ended its tries: how long it had."""
    if deadline is None or _left(deadline) > 0:
        return ""
    return f" within the {round(max(deadline - asked_at, 0.0), 1):g} s its deadline left,"


def _try_timeout(timeout_s: float | None, deadline: float | None) -> float | None:
    if deadline is None:
        return timeout_s
    left = max(_left(deadline), MIN_TRY_S)
    return left if timeout_s is None else min(timeout_s, left)


def failed_call(method: str, error: BaseException, timeout_s: float | None = None) -> str:
    """One line for a call to the scheduler that Ray failed: an exception raised inside it
    (Ray's RayTaskError keeps it as `cause`; its own text is the actor's traceback), a call
    past `timeout_s`, or the actor gone."""
    cause = getattr(error, "cause", None)
    if isinstance(error, ray.exceptions.RayTaskError) and cause is not None:
        return f"the scheduler failed in {method}(): {type(cause).__name__}: {_first_line(cause)}"
    if isinstance(error, ray.exceptions.GetTimeoutError) and timeout_s is not None:
        return f"the scheduler did not answer {method}() within {timeout_s:g} s"
    return f"the scheduler did not answer {method}(): {type(error).__name__}: {_first_line(error)}"


def takes_fewer_arguments(error: BaseException) -> bool:
    """Whether a call failed because the scheduler's code takes fewer arguments than were
    sent: a scheduler started by an older version of this package (a detached actor outlives
    an upgrade of the code calling it). Ray refuses the call in .remote(), checking it against
    the actor's class as the caller's handle knows it, or the method raises inside the actor
    (a RayTaskError keeps that TypeError as `cause`)."""
    cause = getattr(error, "cause", None) or error
    return isinstance(cause, TypeError) and "positional argument" in str(cause)


def _first_line(error: BaseException) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), "")


def scheduler_or_none() -> "ray.actor.ActorHandle | None":
    """The scheduler, or None where a run works without one (plain Ray Train, a lone replica)."""
    try:
        return get_scheduler()
    except SchedulerNotRunning:
        return None


def get_agent(node_id: str) -> "ray.actor.ActorHandle":
    """The agent of one node (ValueError from Ray when that node has none)."""
    return ray.get_actor(agent_name(node_id), namespace=NAMESPACE)


def actor_restarts(actor: "ray.actor.ActorHandle") -> int:
    """How many times Ray has restarted `actor` and brought it back up (-1 while it is down).
    `ray.kill(actor, no_restart=False)` is asynchronous: until this count moves, the old
    incarnation may still answer, so whoever checks what a restart kept waits for it first."""
    from ray.util.state import get_actor

    state = get_actor(actor._actor_id.hex())
    return state.num_restarts if state.state == "ALIVE" else -1
