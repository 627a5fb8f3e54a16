"""The ingress's resend rules (orchestrator/serving/retries.py), with fake replicas."""
import asyncio

import pytest

from orchestrator.serving.generation import Chunk, GenerationRequest, SamplingParams
from orchestrator.serving.protocol import APIError
from orchestrator.serving.retries import (engine_lost, gather_or_cancel, is_engine_lost,
                                          resumable_stream, with_retries)

REQUEST = GenerationRequest(tuple(b"hi"), SamplingParams(max_tokens=4, temperature=0.0))


class Lost(Exception):
    """A replica that died (what Ray raises for a dead actor)."""


def lost(error: BaseException) -> bool:
    return isinstance(error, Lost) or is_engine_lost(error)


class Replica:
    """Streams tokens 1, 2, ... after the request's delivered ones; fails with `errors`,
    one per attempt, after `after` chunks (None: after the final chunk)."""

    def __init__(self, errors: list[BaseException], after: int | None = 2) -> None:
        self.errors, self.after, self.seen = list(errors), after, []

    async def generate_stream(self, request: GenerationRequest):
        self.seen.append(request.generated)
        error = self.errors.pop(0) if self.errors else None
        for i, token in enumerate(range(len(request.generated) + 1, 5)):
            if error is not None and i == self.after:
                raise error
            yield Chunk((token,), str(token), "length" if token == 4 else None)
        if error is not None:  # the replica died as its stream closed
            raise error


def stream(replica: Replica, retries: int = 2) -> tuple[list[Chunk], list]:
    retried = []

    async def consume():
        return [c async for c in resumable_stream(
            replica.generate_stream, REQUEST, lost, retries,
            lambda e, attempt, delivered: retried.append((type(e).__name__, delivered)))]
    return asyncio.run(consume()), retried


def test_a_stream_whose_engine_died_continues_after_the_tokens_delivered():
    replica = Replica([engine_lost("the engine process exited (exit code -9)")])
    chunks, retried = stream(replica)
    assert [c.tokens[0] for c in chunks] == [1, 2, 3, 4]  # each token once, in order
    assert replica.seen == [(), (1, 2)] and retried == [("APIError", 2)]
    assert chunks[-1].finish_reason == "length"


def test_a_failure_after_the_final_chunk_ends_the_stream_without_resending():
    replica = Replica([Lost()], after=None)
    chunks, retried = stream(replica)
    assert [c.tokens[0] for c in chunks] == [1, 2, 3, 4]
    assert [c.finish_reason for c in chunks].count("length") == 1
    assert replica.seen == [()] and retried == []


def test_other_errors_and_exhausted_retries_reach_the_client():
    with pytest.raises(APIError, match="too long"):
        stream(Replica([APIError(400, "too long")]))
    with pytest.raises(Lost):
        stream(Replica([Lost(), Lost(), Lost()], after=0), retries=2)
    # An engine error other than the process's death (a failed step) is not resent either.
    with pytest.raises(APIError) as error:
        stream(Replica([APIError(500, "generation failed: boom", type="server_error")]))
    assert error.value.status == 500


def test_a_call_is_resent_only_while_its_failure_is_retryable():
    attempts = []

    async def call():
        attempts.append(1)
        if len(attempts) < 3:
            raise engine_lost("gone")
        return "done"
    assert asyncio.run(with_retries(call, lost, 3, lambda e, a: None)) == "done"
    assert len(attempts) == 3
    assert engine_lost("gone").status == 503 and is_engine_lost(engine_lost("gone"))
    assert not is_engine_lost(APIError(503, "overloaded", code="overloaded"))


def test_when_one_prompt_fails_the_others_are_cancelled():
    cancelled = []

    async def long_prompt():
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append("long")
            raise

    async def refused():
        await asyncio.sleep(0)
        raise APIError(400, "over the KV cache", "max_tokens")

    async def run():
        with pytest.raises(APIError, match="KV cache"):
            await asyncio.wait_for(gather_or_cancel(long_prompt(), refused()), timeout=5)
    asyncio.run(run())
    assert cancelled == ["long"]


def test_a_request_no_replica_takes_says_whether_replicas_are_full_or_none_runs():
    from orchestrator.serving.retries import DeploymentState, untaken_error

    full = untaken_error(60, "GPTModel", DeploymentState("HEALTHY", {"RUNNING": 2}))
    assert (full.status, full.code) == (503, "overloaded")
    assert "all 2 running are full" in full.message
    none = untaken_error(60, "GPTModel", DeploymentState(
        "UNHEALTHY", {"RUNNING": 0, "STARTING": 1}, "The replica failed to start"))
    assert (none.status, none.code) == (503, "no_replica")
    assert "none is running (GPTModel is UNHEALTHY, replicas: 1 starting; The replica " \
           "failed to start)" in none.message
    unknown = untaken_error(60, "GPTModel", "TimeoutError: ")
    assert unknown.code == "no_replica" and "state is unknown: TimeoutError" in unknown.message


# What Serve 2.60 says of a deployment whose replicas fail in their constructor (here: the
# checkpoint served was deleted, then the replica killed), cut short: Ray's coloured actor
# line, then the replica's whole traceback.
SERVE_START_FAILURE = (
    "The deployment failed to start 17 times in a row. This may be due to a problem with its "
    "constructor or initial health check failing. See controller logs for details. Error:\n"
    "\x1b[36mray::ServeReplica:exp:GPTModel.initialize_and_get_metadata()\x1b[39m (pid=23255, "
    "ip=192.0.2.2, actor_id=fb28d1, repr=<ray.serve._private.replica.ServeReplica object>)\n"
    '  File "/site-packages/ray/serve/_private/replica.py", line 1928, in initialize\n'
    "    raise RuntimeError(traceback.format_exc()) from None\n"
    "RuntimeError: Traceback (most recent call last):\n"
    '  File "/repo/ray_layer/serve_model.py", line 352, in _refuse_update\n'
    "    raise RuntimeError(message)\n"
    "RuntimeError: checkpoint '/runs/ck' cannot be served: CheckpointError: checkpoint /runs/ck "
    "does not exist\n")


def test_serves_message_reaches_clients_as_one_line_without_the_replicas_traceback():
    # The 503 of a request no replica took, and /health's, carried Serve's message whole: a
    # 4.5 KB traceback with terminal colour codes (and the server's file paths), the cause
    # on its last line.
    from orchestrator.serving.retries import DeploymentState, unanswered_health, untaken_error

    state = DeploymentState("UNHEALTHY", {"STARTING": 1}, SERVE_START_FAILURE)
    error = untaken_error(60, "GPTModel", state)
    _, health = unanswered_health("GPTModel", state)
    for message in (error.message, health["error"]):
        assert "\n" not in message and "\x1b" not in message and "File " not in message
        assert ("replicas: 1 starting; The deployment failed to start 17 times in a row. "
                "This may be due to a problem with its constructor or initial health check "
                "failing. See controller logs for details. Error: RuntimeError: checkpoint "
                "'/runs/ck' cannot be served: CheckpointError: checkpoint /runs/ck does not "
                "exist)") in message, message


def test_waiting_for_a_replica_is_bounded_and_withdraws_the_request():
    from orchestrator.serving.retries import taken_within

    withdrawn = []

    async def untaken():
        return APIError(503, "nobody took it", code="no_replica")

    async def never():
        await asyncio.sleep(3600)

    async def soon():
        await asyncio.sleep(0.01)
    def no():
        return False
    with pytest.raises(APIError, match="nobody took it"):
        asyncio.run(taken_within(never, 0.05, no, lambda: withdrawn.append("late"), untaken))
    asyncio.run(taken_within(soon, 5.0, no, lambda: withdrawn.append("soon"), untaken))
    # Taken just as the wait ended: it runs, so it is neither withdrawn nor refused.
    asyncio.run(taken_within(never, 0.05, lambda: True,
                             lambda: withdrawn.append("taken at the end"), untaken))
    # 0: as long as it takes (the assignment is not even awaited here: the answer's own
    # await waits for it).
    asyncio.run(taken_within(never, 0, no, lambda: withdrawn.append("unbounded"), untaken))

    async def client_leaves():
        task = asyncio.ensure_future(taken_within(never, 5.0, no,
                                                  lambda: withdrawn.append("left"), untaken))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    asyncio.run(client_leaves())
    assert withdrawn == ["late", "left"]


def test_health_without_a_running_replica_is_told_from_serves_view_alone():
    # With min_replicas 0 and no traffic, /health asked a replica: a 503 after 5 s, and the
    # call woke one (Serve scales up for it).
    from orchestrator.serving.retries import DeploymentState, unanswered_health

    for status, replicas in (("HEALTHY", {}), ("DOWNSCALING", {"STOPPING": 1})):
        code, body = unanswered_health("GPTModel", DeploymentState(status, replicas))
        assert (code, body["status"], body["starting"]) == (200, "scaled_to_zero", 0)
    # a replica started for a request that came in is wanted: starting, not scaled to zero
    code, body = unanswered_health("GPTModel", DeploymentState(
        "UPSCALING", {"STARTING": 1}, "Upscaling from 0 to 1 replicas."))
    assert (code, body["status"], body["starting"]) == (200, "starting", 1)
    assert body["serve"] == ("GPTModel is UPSCALING, replicas: 1 starting; Upscaling from 0 "
                             "to 1 replicas.")
    code, body = unanswered_health("GPTModel", DeploymentState(
        "UNHEALTHY", {"STARTING": 1}, "The replica failed to start"))
    assert code == 503 and body["status"] == "unavailable"
    assert body["error"] == ("no GPTModel replica is running (GPTModel is UNHEALTHY, replicas: "
                             "1 starting; The replica failed to start)")


def test_health_while_serve_replaces_a_lost_replica_is_starting_within_a_bound():
    # A one-replica deployment whose replica was killed (after a refused reload, live): Serve
    # marks it UNHEALTHY while the replacement starts (5-6 s here), and /health said 503 "no
    # GPTModel replica is running" (or, having asked the replica just lost, "did not answer:
    # TimeoutError: "), paging for a replica that was merely starting.
    from orchestrator.serving.retries import DeploymentState, unanswered_health

    replacing = DeploymentState("UNHEALTHY", {"STARTING": 1}, (
        "A replica's health check failed. This deployment will be UNHEALTHY until the replica "
        "recovers or a new deploy happens."))
    for error in (None, "TimeoutError: no answer within 5 s"):
        code, body = unanswered_health("GPTModel", replacing, error, starting_for_s=3.0,
                                       start_limit_s=60.0)
        assert (code, body["status"], body["starting"]) == (200, "starting", 1), body
        assert body["serve"].startswith("GPTModel is UNHEALTHY, replicas: 1 starting; A "
                                        "replica's health check failed.")
    # A replacement that has not started within the bound (no node has room for it: Serve
    # keeps its message, and never says it cannot schedule it) is an outage.
    code, body = unanswered_health("GPTModel", replacing, starting_for_s=61.0,
                                   start_limit_s=60.0)
    assert (code, body["status"]) == (503, "unavailable")
    assert body["error"].startswith("no GPTModel replica has started within 60 s of Serve "
                                    "replacing a lost one (GPTModel is UNHEALTHY"), body
    # One that fails to start says so: a 503 at once.
    code, body = unanswered_health("GPTModel", DeploymentState(
        "UNHEALTHY", {"STARTING": 1}, "A replica failed to start with exception. Retrying. "
        "Error: RuntimeError: boom"), starting_for_s=1.0, start_limit_s=60.0)
    assert code == 503


def test_health_of_a_replica_serve_cannot_schedule_is_503_with_serves_message():
    # A replica no node has room for stays STARTING, the deployment UPSCALING: /health said
    # 200 scaled_to_zero for as long as it could not be placed.
    from orchestrator.serving.retries import DeploymentState, unanswered_health

    message = ("Deployment 'GPTModel' in application 'llm' has 1 replicas that have taken "
               "more than 30s to be scheduled. This may be due to waiting for the cluster to "
               "auto-scale or for a runtime environment to be installed. Resources required "
               "for each replica: {'CPU': 1.0, 'GPU': 1.0}, total resources available: "
               "{'CPU': 8.0}. Use `ray status` for more details.")
    code, body = unanswered_health("GPTModel", DeploymentState("UPSCALING", {"STARTING": 1},
                                                               message))
    assert (code, body["status"]) == (503, "unavailable")
    assert body["error"] == ("no GPTModel replica can be scheduled (GPTModel is UPSCALING, "
                             f"replicas: 1 starting; {message})")


def test_health_counts_updating_recovering_and_migrating_replicas_as_serving():
    # A hot reload of a one-replica deployment (UPDATING), a controller restart (RECOVERING)
    # and a draining node (PENDING_MIGRATION) each answered 503 "no replica is running".
    from orchestrator.serving.retries import DeploymentState, unanswered_health

    # (a migrating replica takes calls: one that was asked and failed is a 503, as RUNNING)
    for status, replicas, errors in (
            ("UPDATING", {"UPDATING": 1}, (None, "TimeoutError: ")),
            ("HEALTHY", {"RECOVERING": 1}, (None, "TimeoutError: ")),
            ("HEALTHY", {"PENDING_MIGRATION": 1, "STARTING": 1}, (None,))):
        for error in errors:  # not asked, or asked while it updated
            code, body = unanswered_health("GPTModel", DeploymentState(status, replicas),
                                           error)
            assert (code, body["status"]) == (200, "ok"), (replicas, error)
            assert f"GPTModel is {status}" in body["serve"]


def test_health_of_a_running_replica_that_did_not_answer_is_503_with_the_error():
    from orchestrator.serving.retries import DeploymentState, unanswered_health

    code, body = unanswered_health("GPTModel", DeploymentState("HEALTHY", {"RUNNING": 1}),
                                   "TimeoutError: no answer in 5 s")
    assert code == 503 and body["error"] == (
        "the GPTModel replica asked did not answer: TimeoutError: no answer in 5 s (GPTModel "
        "is HEALTHY, replicas: 1 running)")
    code, body = unanswered_health("GPTModel", "TimeoutError: the controller", "ActorDiedError")
    assert code == 503 and body["error"] == (
        "ActorDiedError; Serve's view of GPTModel is unknown: TimeoutError: the controller")


# Serve's message for a model deployment whose replicas could not start (Ray 2.60, a fresh
# machine with no pretrain run, `serve run serve_config.yaml`), shortened in the middle.
_FAILED_TO_START = (
    "The deployment failed to start 3 times in a row. This may be due to a problem with its "
    "constructor or initial health check failing. See controller logs for details. Error:\n"
    "\x1b[36mray::ServeReplica:gpt:GPTModel.initialize_and_get_metadata()\x1b[39m (pid=15620, "
    "ip=192.0.2.2, actor_id=5491a1d5)\n"
    '  File "/venv/lib/python3.11/site-packages/ray/serve/_private/replica.py", line 1928, in '
    "initialize\n"
    "    raise RuntimeError(traceback.format_exc()) from None\n"
    "RuntimeError: Traceback (most recent call last):\n"
    '  File "/repo/orchestrator/serving/loading.py", line 129, in default_checkpoint\n'
    '    raise CheckpointError(f"checkpoint: none given and no pretrain-* run with checkpoints '
    'under "\n'
    "orchestrator.training.checkpoint.CheckpointError: checkpoint: none given and no "
    "pretrain-* run with checkpoints under /home/u/orchestrator-runs\n"
    "\n"
    "During handling of the above exception, another exception occurred:\n"
    "\n"
    "\x1b[36mray::ServeReplica:gpt:GPTModel.initialize_and_get_metadata()\x1b[39m (pid=15620)\n"
    '  File "/repo/ray_layer/serve_model.py", line 352, in _refuse_update\n'
    "    raise RuntimeError(message)\n"
    "RuntimeError: checkpoint (none named) cannot be served: CheckpointError: checkpoint: none "
    "given and no pretrain-* run with checkpoints under /home/u/orchestrator-runs; train one "
    "with jobs/pretrain.py, or name the run")


def test_a_deployment_that_failed_to_start_is_told_in_one_line_not_serves_traceback():
    """The 503 of a request (and /health's) carried Serve's whole message: some 3.5 KB of
    traceback with terminal colour codes, the why (no run to serve) in its last line. Now:
    Serve's sentence and that last exception, on one line."""
    from orchestrator.serving.retries import DeploymentState, unanswered_health, untaken_error

    state = DeploymentState("DEPLOY_FAILED", {}, _FAILED_TO_START)
    expected = ("GPTModel is DEPLOY_FAILED; The deployment failed to start 3 times in a row. "
                "This may be due to a problem with its constructor or initial health check "
                "failing. See controller logs for details. Error: RuntimeError: checkpoint "
                "(none named) cannot be served: CheckpointError: checkpoint: none given and no "
                "pretrain-* run with checkpoints under /home/u/orchestrator-runs; train one "
                "with jobs/pretrain.py, or name the run")
    error = untaken_error(60, "GPTModel", state)
    assert error.status == 503 and error.code == "no_replica"
    assert error.message == (f"no GPTModel replica took the request within 60 s: none is "
                             f"running ({expected}); retry shortly, or see `serve status`")
    code, body = unanswered_health("GPTModel", state)
    assert (code, body) == (503, {"status": "unavailable",
                                  "error": f"no GPTModel replica is running ({expected})"})
    # A message without a traceback is kept as Serve wrote it.
    plain = DeploymentState("UPDATING", {"STARTING": 2}, "Scaling up to 2 replicas.")
    assert "Scaling up to 2 replicas.)" in untaken_error(60, "GPTModel", plain).message


def test_serves_message_ending_in_an_exception_without_a_message_is_one_line():
    """A replica constructor failing on a bare `assert` (or `raise SomeError`) ends the
    traceback in a line with no colon: 'AssertionError'. The last `Name: message` line was
    then Serve's wrapping 'RuntimeError: Traceback (most recent call last):', and the 503
    carried the replica's frames (server paths, source lines) after it; a chained traceback
    whose last exception has no message carried the whole second traceback."""
    from orchestrator.job_exit import one_line_error

    head = ("The deployment failed to start 3 times in a row. This may be due to a problem "
            "with its constructor or initial health check failing. See controller logs for "
            "details. Error:")
    serve_wrapped = (
        head + "\n\x1b[36mray::ServeReplica:gpt:GPTModel.initialize_and_get_metadata()\x1b[39m "
        "(pid=15620)\n"
        '  File "/venv/ray/serve/_private/replica.py", line 1928, in initialize\n'
        "    raise RuntimeError(traceback.format_exc()) from None\n"
        "RuntimeError: Traceback (most recent call last):\n"
        '  File "/repo/ray_layer/serve_model.py", line 40, in __init__\n'
        "    assert torch.cuda.is_available()\n"
        "           ^^^^^^^^^^^^^^^^^^^^^^^^^\n"
        "AssertionError\n")
    assert one_line_error(serve_wrapped) == f"{head} AssertionError"
    chained = (
        "Deployment failed:\nTraceback (most recent call last):\n"
        '  File "a.py", line 1, in <module>\n    x()\nValueError: bad\n\n'
        "During handling of the above exception, another exception occurred:\n\n"
        'Traceback (most recent call last):\n  File "b.py", line 2, in <module>\n    y()\n'
        '  File "c.py", line 3, in y\n    raise Lost\nmodule.sub.Lost\n')
    assert one_line_error(chained) == "Deployment failed: module.sub.Lost"
    # A traceback cut before its exception: Serve's first line, not the frames.
    cut = 'Deployment failed:\nTraceback (most recent call last):\n  File "a.py", line 1\n    x()\n'
    assert one_line_error(cut) == "Deployment failed:"


def test_health_while_serve_replaces_a_lost_replica_beside_a_running_one_is_ok():
    # A two-replica deployment, one replica killed: Serve marks it UNHEALTHY while the
    # replacement starts, the other serves. /health that asked the lost one (still in this
    # router's list) said 503 "the replica asked did not answer" - where a one-replica
    # deployment in the same plight says 200 "starting": the healthier deployment paged.
    from orchestrator.serving.retries import DeploymentState, replacing, unanswered_health

    state = DeploymentState("UNHEALTHY", {"RUNNING": 1, "STARTING": 1}, (
        "A replica's health check failed. This deployment will be UNHEALTHY until the replica "
        "recovers or a new deploy happens."))
    assert replacing(state) == 1
    for error in (None, "ActorDiedError: The actor died unexpectedly before finishing"):
        code, body = unanswered_health("GPTModel", state, error, starting_for_s=3.0,
                                       start_limit_s=60.0)
        assert (code, body["status"]) == (200, "ok"), body
        assert body["serve"].startswith("GPTModel is UNHEALTHY, replicas: 1 running, 1 "
                                        "starting; A replica's health check failed.")
    # Past the bound, a running replica that failed to answer is an outage again.
    code, body = unanswered_health("GPTModel", state, "TimeoutError: no answer within 5 s",
                                   starting_for_s=61.0, start_limit_s=60.0)
    assert code == 503 and body["error"].startswith(
        "the GPTModel replica asked did not answer: TimeoutError"), body
