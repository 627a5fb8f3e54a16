"""Resending a request whose model replica (or its engine process) was lost: the ingress's
rules, free of Ray so that they are tested without it. What counts as lost is the caller's
predicate (ray_layer/serve_app.py: a dead replica actor, no replica reachable, or the
replica's engine process gone, `ENGINE_LOST`)."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from orchestrator.job_exit import one_line_error
from orchestrator.serving.generation import Chunk, GenerationRequest
from orchestrator.serving.protocol import APIError

T = TypeVar("T")

# The code of the error a replica gives its in-flight requests when its engine process dies
# (out of memory, a crash): nothing of theirs is lost that another attempt cannot redo.
ENGINE_LOST = "engine_lost"
RETRY_BACKOFF_S = 0.05  # doubled after each attempt


def engine_lost(message: str) -> APIError:
    """The error of a request whose engine process died under it: retryable (503)."""
    return APIError(503, f"generation failed: {message}; retry shortly", type="server_error",
                    code=ENGINE_LOST)


def is_engine_lost(error: BaseException) -> bool:
    return isinstance(error, APIError) and error.code == ENGINE_LOST


async def with_retries(call: Callable[[], Awaitable[T]], retryable: Callable[[BaseException], bool],
                       retries: int, on_retry: Callable[[BaseException, int], None]) -> T:
    """`call()`, sent again up to `retries` times while it fails in a retryable way (nothing
    of its answer was delivered, so it is safe to); `on_retry(error, attempt)` before each."""
    for attempt in range(retries + 1):
        try:
            return await call()
        except Exception as e:
            if not retryable(e) or attempt == retries:
                raise
            on_retry(e, attempt)
            await asyncio.sleep(RETRY_BACKOFF_S * 2 ** attempt)
    raise AssertionError("unreachable")


async def resumable_stream(start: Callable[[GenerationRequest], AsyncIterator[Chunk]],
                           request: GenerationRequest, retryable: Callable[[BaseException], bool],
                           retries: int, on_retry: Callable[[BaseException, int, int], None]
                           ) -> AsyncIterator[Chunk]:
    """One prompt's chunks from `start(request)`. When the stream fails in a retryable way
    it starts again, continuing after the tokens already delivered (`on_retry(error,
    attempt, delivered)` before each). A failure after the final chunk (the replica died
    as its stream closed) ends the stream: everything was delivered."""
    delivered: tuple[int, ...] = ()
    finished = False
    for attempt in range(retries + 1):
        try:
            async for chunk in start(request.resumed_after(delivered) if delivered else request):
                delivered += chunk.tokens
                finished = chunk.finish_reason is not None
                yield chunk
            return
        except Exception as e:
            if finished:
                return
            if not retryable(e) or attempt == retries:
                raise
            on_retry(e, attempt, len(delivered))
            await asyncio.sleep(RETRY_BACKOFF_S * 2 ** attempt)


async def gather_or_cancel(*calls: Awaitable[T]) -> list[T]:
    """Every call's result, in order; when one fails, the others are cancelled (their
    replicas free the rows and cache blocks) before its error is raised."""
    tasks = [asyncio.ensure_future(c) for c in calls]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


@dataclass(frozen=True)
class DeploymentState:
    """What Serve says of the model deployment (`serve status`): its status, replicas by
    state, and its message (why replicas do not start, for one)."""

    status: str
    replicas: Mapping[str, int]
    message: str = ""

    @property
    def running(self) -> int:
        return self.replicas.get("RUNNING", 0)


class UntakenError(APIError):
    """untaken_error's 503, told apart from the others with its codes: the call waited in
    Serve's router for all of replica_wait_s, so the ingress records that wait (router wait,
    and its client's wait with no first token)."""


def untaken_error(wait_s: float, deployment: str, state: DeploymentState | str) -> UntakenError:
    """The 503 of a request no replica of `deployment` took within `wait_s`: every running
    one full ("overloaded"), or none running, with what Serve says of why ("no_replica");
    `state` is the error that kept Serve from saying."""
    error = _untaken(wait_s, deployment, state)
    return UntakenError(error.status, error.message, error.param, error.type, error.code)


def _untaken(wait_s: float, deployment: str, state: DeploymentState | str) -> APIError:
    head = f"no {deployment} replica took the request within {wait_s:g} s"
    if isinstance(state, str):
        return APIError(503, f"{head} (its state is unknown: {state}); retry shortly",
                        type="server_error", code="no_replica")
    if state.running:
        return APIError(503, f"{head}: all {state.running} running are full (the server is "
                             "overloaded); retry shortly", type="server_error",
                        code="overloaded")
    return _none_running(head, deployment, state)


def unavailable_error(deployment: str, state: DeploymentState | str) -> APIError:
    """The 503 of a call Serve refused at once (DeploymentUnavailableError: `deployment`
    failed to deploy, its replicas could not start), with what Serve says of why."""
    head = f"no {deployment} replica can take the request"
    if isinstance(state, str):
        return APIError(503, f"{head} (it failed to deploy; its state is unknown: {state}); "
                             "retry shortly, or see `serve status`", type="server_error",
                        code="no_replica")
    return _none_running(head, deployment, state)


def _none_running(head: str, deployment: str, state: DeploymentState) -> APIError:
    return APIError(503, f"{head}: none is running ({_described(deployment, state)}); retry "
                         "shortly, or see `serve status`", type="server_error",
                    code="no_replica")


def _described(deployment: str, state: DeploymentState) -> str:
    """'GPTModel is UPDATING, replicas: 2 starting; <Serve's message>'."""
    others = ", ".join(f"{count} {name.lower()}" for name, count in sorted(state.replicas.items())
                       if count)
    why = f"; {one_line_error(state.message)}" if state.message else ""  # (not its traceback)
    return f"{deployment} is {state.status}{', replicas: ' + others if others else ''}{why}"


# Replica states whose replicas serve: RUNNING and PENDING_MIGRATION ones (on a draining
# node) take calls; UPDATING ones apply a user_config (a hot reload: the model before it
# serves meanwhile) and RECOVERING ones are found again after the controller restarted, both
# taking calls again within moments. A 503 for those made every hot reload of a one-replica
# deployment an outage to a load balancer.
ROUTABLE_STATES = ("RUNNING", "PENDING_MIGRATION")
SERVING_STATES = ROUTABLE_STATES + ("UPDATING", "RECOVERING")
# Serve's deployment statuses with no replica serving by autoscaling's choice: scaled to zero
# (min_replicas 0, no traffic), being scaled down to it, or starting one for a request.
SCALED_TO_ZERO_STATUSES = ("HEALTHY", "DOWNSCALING", "UPSCALING")
# In Serve's message (2.60, deployment_state.py) while replicas wait for a node with room for
# them: "... has N replicas that have taken more than 30s to be scheduled. ... Resources
# required for each replica: ...". The deployment stays UPSCALING, its replicas STARTING, for
# as long as none fits: /health said 200 for ever to a replica that could never start.
UNSCHEDULABLE_MARK = "to be scheduled"
# Serve's message (2.60, deployment_state.py) on a deployment it marked UNHEALTHY as a replica
# died or failed its health checks; the replacement is STARTING meanwhile (a replacement that
# fails to start gets another message: "A replica failed to start with exception ..."). Serve
# then never adds UNSCHEDULABLE_MARK: how long the replacement may take is /health's bound.
REPLACING_MARK = "A replica's health check failed"


def _active(state: DeploymentState) -> set[str]:
    """The replica states some replica of the deployment is in, stopping ones left out."""
    return {name for name, count in state.replicas.items()
            if count and name not in ("STOPPING", "STOPPED")}


def replacing(state: DeploymentState) -> int:
    """Replicas Serve starts in place of a lost one, others serving or not (0: not so)."""
    active = _active(state)
    if state.status == "UNHEALTHY" and REPLACING_MARK in state.message \
            and "STARTING" in active and active <= {"STARTING", *SERVING_STATES}:
        return state.replicas["STARTING"]
    return 0


def replicas_in(state: DeploymentState, states: tuple[str, ...]) -> int:
    return sum(state.replicas.get(name, 0) for name in states)


def unanswered_health(deployment: str, state: DeploymentState | str,
                      error: str | None = None, starting_for_s: float = 0.0,
                      start_limit_s: float = 60.0) -> tuple[int, dict]:
    """/health's status code and body when no replica of `deployment` answered it: none was
    asked (none takes calls: asking would wait for one, and wake one, as Serve scales a
    deployment up from zero for any call), or `error` is why the one asked did not answer.
    Told from Serve's view (`state`; as text, why Serve could not say):
      - a replica serving that was not asked (all updating, recovering, or not yet known to
        this router): 200 "ok", with Serve's view;
      - scaled to zero (none wanted: nothing but stopping ones): 200 "scaled_to_zero";
      - starting replicas (for a request, at a scale-up) that Serve does not say it cannot
        place: 200 "starting", with Serve's view;
      - a replica starting in place of a lost one (`replacing`; the one asked may be the one
        lost): none other serving, 200 "starting", and another serving, 200 "ok" even if the
        one asked did not answer, until the caller has seen it so for `starting_for_s` over
        `start_limit_s`;
      - else (a running replica that failed to answer, replicas Serve cannot schedule, a
        failed deploy, replicas unable to start, Serve unreachable): 503 "unavailable", with
        Serve's view and the error."""
    if isinstance(state, str):
        why = f"{error}; " if error else ""
        return 503, {"status": "unavailable",
                     "error": f"{why}Serve's view of {deployment} is unknown: {state}"}
    described = _described(deployment, state)
    replacements = replacing(state)
    serving = replicas_in(state, SERVING_STATES)
    replacing_now = replacements and starting_for_s <= start_limit_s
    if replacing_now and not serving:
        return 200, {"status": "starting", "starting": replacements, "serve": described}
    if serving and (replacing_now or not (error and replicas_in(state, ROUTABLE_STATES))):
        return 200, {"status": "ok", "serve": described}
    active = _active(state)
    unschedulable = UNSCHEDULABLE_MARK in state.message
    if state.status in SCALED_TO_ZERO_STATUSES and active <= {"STARTING"} and not unschedulable:
        starting = state.replicas.get("STARTING", 0)
        if not starting:
            return 200, {"status": "scaled_to_zero", "starting": 0}
        return 200, {"status": "starting", "starting": starting, "serve": described}
    head = (f"no {deployment} replica has started within {start_limit_s:g} s of Serve "
            "replacing a lost one") if replacements and not serving \
        else f"the {deployment} replica asked did not answer: {error}" if error \
        else f"no {deployment} replica can be scheduled" if unschedulable \
        else f"no {deployment} replica is running"
    return 503, {"status": "unavailable", "error": f"{head} ({described})"}


async def taken_within(assignment: Callable[[], Awaitable[object]], wait_s: float,
                       taken: Callable[[], bool], cancel: Callable[[], None],
                       untaken: Callable[[], Awaitable[APIError]]) -> None:
    """Wait until a replica took the request (`assignment()` resolves), at most `wait_s`
    (0: as long as it takes): past that the request is withdrawn (`cancel()`) and
    `untaken()`'s error raised - unless `taken()` says a replica took it as the wait ended
    (it runs: its answer is awaited, not a 503 given while it runs for nobody). Without a
    bound a request waits for ever while no replica can start, and its client sees
    nothing."""
    if not wait_s:
        return
    try:
        await asyncio.wait_for(assignment(), wait_s)
    except asyncio.TimeoutError:
        if taken():
            return
        cancel()
        raise await untaken() from None
    except asyncio.CancelledError:  # the client left: nothing stays queued or runs for it
        cancel()
        raise
