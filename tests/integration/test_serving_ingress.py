"""The ingress's request path driven directly on an event loop, with a stand-in for the model
deployment's handle (no Ray started): what a live app shows only by a race."""
import asyncio
import concurrent.futures
from collections import Counter
from types import SimpleNamespace

import pytest

from orchestrator.serving.generation import Chunk, GenerationRequest, SamplingParams
from orchestrator.serving.protocol import APIError
from orchestrator.serving.settings import ServeSettings

# The ingress object is made without Serve's wrapper running its constructor; the wrapper's
# asynchronous __del__ then finds no loop. Nothing of the code under test.
pytestmark = pytest.mark.filterwarnings(
    "ignore:coroutine .*ASGIIngressWrapper.__del__.* was never awaited:RuntimeWarning")


class Response:
    """A stand-in for Serve's DeploymentResponse(Generator): a replica takes the call at
    once ("now"), never (a deployment without a running replica), or just as the ingress's
    wait for it ends ("as_the_wait_ends": the router's future resolved, the fetch not yet
    resumed)."""

    def __init__(self, result, taken: str):
        self.result, self.taken, self.cancelled = result, taken, False
        self._replica_result_future = concurrent.futures.Future()
        self._replica_result = None
        self.replica_result = SimpleNamespace(cancelled=False)
        self.replica_result.cancel = lambda: setattr(self.replica_result, "cancelled", True)
        if taken == "now":
            self._replica_result_future.set_result(self.replica_result)

    async def _fetch_future_result_async(self):
        if self.taken != "now":
            if self.taken == "as_the_wait_ends":
                self._replica_result_future.set_result(self.replica_result)
            await asyncio.sleep(3600)

    def cancel(self):
        self.cancelled = True
        self._replica_result_future.cancel()
        if hasattr(self.result, "close"):  # a coroutine never awaited: no warning
            self.result.close()

    def __await__(self):
        return self.result.__await__()

    def __aiter__(self):
        return self.result.__aiter__()


class Remote:
    def __init__(self, call, taken: str = "now"):
        self.call, self.taken, self.sent = call, taken, []

    def remote(self, *args):
        self.sent.append(Response(self.call(*args), self.taken))
        return self.sent[-1]


def ingress(model, **settings):
    from ray_layer import serve_app

    node = object.__new__(serve_app.Ingress.func_or_class)
    node.model = node.stream_model = model
    node.settings = ServeSettings.from_args({"request_retries": 1, **settings})
    node.deployment, node._info, node._info_at = "Ingress", None, 0.0
    node.retries, node._tokenizers = Counter(), {}
    node._state, node._state_refresh = None, None
    return node


def tokenizer(name, sha256=None):
    return SimpleNamespace(name=name, sha256=sha256 or f"sha-of-{name}", vocab_size=256,
                           eos_id=None)


@pytest.fixture(autouse=True)
def no_metrics(monkeypatch):
    from ray_layer import serve_app

    monkeypatch.setattr(serve_app, "record", lambda *args, **kwargs: None)


def test_during_a_reload_a_tokenizer_is_kept_only_as_what_it_is():
    # A hot reload changes the tokenizer; the fetch reaches replicas still on the old model
    # twice before one on the new model answers.
    answers = [tokenizer("old"), tokenizer("old"), tokenizer("new")]

    async def fetch():
        return answers.pop(0)
    node = ingress(SimpleNamespace(tokenizer=Remote(fetch)))
    info = {"tokenizer": "new", "tokenizer_sha256": "sha-of-new", "token_ids": 256}
    encoder = asyncio.run(node._encoder(info))
    assert encoder.tokenizer.name == "new"
    assert {sha: t.name for sha, t in node._tokenizers.items()} == {
        "sha-of-old": "old", "sha-of-new": "new"}

    # Never on the new model within the tries: a 503 to retry, nothing cached as "new".
    answers[:] = [tokenizer("old")] * 3
    node._tokenizers.clear()
    with pytest.raises(APIError) as refused:
        asyncio.run(node._encoder(info))
    assert refused.value.status == 503 and refused.value.code == "reloading"
    assert list(node._tokenizers) == ["sha-of-old"]


def test_a_new_tokenizer_at_the_path_of_an_old_one_is_fetched_not_taken_from_the_cache():
    # A compression's --out reused with another teacher: the same file name, another
    # vocabulary. Cached by name, prompts went on being encoded with the old one.
    answers = [tokenizer("/models/out/tokenizer.json", "sha-1"),
               tokenizer("/models/out/tokenizer.json", "sha-2")]

    async def fetch():
        return answers.pop(0)
    node = ingress(SimpleNamespace(tokenizer=Remote(fetch)))
    for sha in ("sha-1", "sha-2"):
        info = {"tokenizer": "/models/out/tokenizer.json", "tokenizer_sha256": sha,
                "token_ids": 256}
        assert asyncio.run(node._encoder(info)).tokenizer.sha256 == sha


def test_a_stream_whose_client_left_before_it_started_cancels_its_prompts():
    from orchestrator.serving.protocol import parse_completion_request
    from ray_layer.serve_app import COMPLETIONS_ROUTE

    decoding = []

    async def generate_stream(request, route):
        yield Chunk((65,), "A")
        decoding.append(request)
        await asyncio.sleep(30)  # a long answer: only a cancel ends it early
        yield Chunk((66,), "B", "length")

    node = ingress(SimpleNamespace(generate_stream=Remote(generate_stream)))

    async def scenario():
        parsed = parse_completion_request({"prompt": ["a", "b"], "max_tokens": 8, "stream": True},
                                          block_size=64, model_name="m", max_prompts=4)
        requests = [GenerationRequest(p, SamplingParams(8)) for p in parsed.prompts]
        response = await node._stream_response(parsed, requests, 0.0, COMPLETIONS_ROUTE)
        while len(decoding) < 2:
            await asyncio.sleep(0.01)

        async def gone(message):  # the client closed the connection
            raise OSError("connection reset")

        async def receive():
            await asyncio.sleep(30)
        with pytest.raises(Exception):
            await response({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, gone)
        await asyncio.sleep(0)
        assert all(task.done() for task in response.tasks)
        assert all(task.cancelled() for task in response.tasks)

    asyncio.run(asyncio.wait_for(scenario(), timeout=20))


def test_a_call_no_replica_takes_is_withdrawn_and_answered_503_naming_why():
    from orchestrator.serving.retries import DeploymentState

    async def generate(request, route):
        raise AssertionError("never reached: no replica took the call")

    async def generate_stream(request, route):
        raise AssertionError("never reached: no replica took the call")
        yield
    unary, streamed = Remote(generate, "never"), Remote(generate_stream, "never")
    node = ingress(SimpleNamespace(generate=unary, generate_stream=streamed,
                                   deployment_name="GPTModel"), replica_wait_s=0.2)
    node._model_state = lambda: DeploymentState(
        "DEPLOYING", {"PENDING_ALLOCATION": 1}, "1 replica has taken more than 30s to be "
        "scheduled: resources {'CPU': 64.0} are not available")
    request = GenerationRequest((65,), SamplingParams(4))

    async def stream():
        return [chunk async for chunk in node._stream_one(request, "/v1/completions")]
    for call, remote in ((node._generate(request, "/v1/completions"), unary),
                         (stream(), streamed)):
        with pytest.raises(APIError) as refused:
            asyncio.run(asyncio.wait_for(call, timeout=20))
        error = refused.value
        assert (error.status, error.code) == (503, "no_replica")
        assert "within 0.2 s" in error.message and "DEPLOYING" in error.message
        assert "'CPU': 64.0" in error.message and "1 pending_allocation" in error.message
        assert [r.cancelled for r in remote.sent] == [True]  # withdrawn, and not resent


def test_a_call_a_replica_takes_as_the_wait_ends_is_answered_not_refused():
    # With Serve's router on the ingress's loop the assignment can finish in the loop pass
    # in which the wait times out: the call then runs on its replica, and a 503 for it (with
    # a cancel that no longer reaches it) left it generating for nobody.
    from orchestrator.serving.generation import GenerationResult

    answer = GenerationResult("the answer", 2, "length", "v1")  # (the ingress reads held_s)

    async def generate(request, route):
        return answer
    unary = Remote(generate, "as_the_wait_ends")
    node = ingress(SimpleNamespace(generate=unary, deployment_name="GPTModel"),
                   replica_wait_s=0.1)
    request = GenerationRequest((65,), SamplingParams(4))
    assert asyncio.run(asyncio.wait_for(node._generate(request, "/v1/completions"), 20)) \
        is answer
    assert not unary.sent[0].cancelled


def test_a_call_withdrawn_as_a_replica_takes_it_is_stopped_on_that_replica():
    from ray_layer.serve_app import withdraw

    async def generate(request, route):
        return "the answer"
    response = Response(generate(None, None), "now")  # taken; its result never fetched
    withdraw(response)
    assert response.cancelled and response.replica_result.cancelled
