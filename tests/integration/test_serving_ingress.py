"""The ingress's request path driven directly on an event loop, with a stand-in for the model
deployment's handle (no Ray started): what a live app shows only by a race."""
import asyncio
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
    """A stand-in for Serve's DeploymentResponse(Generator): `taken` resolves once a replica
    takes the call (never, for a deployment without a running replica)."""

    def __init__(self, result, taken: bool):
        self.result, self.taken, self.cancelled = result, taken, False

    async def _fetch_future_result_async(self):
        if not self.taken:
            await asyncio.sleep(3600)

    def cancel(self):
        self.cancelled = True
        if hasattr(self.result, "close"):  # a coroutine never awaited: no warning
            self.result.close()

    def __await__(self):
        return self.result.__await__()

    def __aiter__(self):
        return self.result.__aiter__()


class Remote:
    def __init__(self, call, taken: bool = True):
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
    return node


def tokenizer(name):
    return SimpleNamespace(name=name, vocab_size=256, eos_id=None)


@pytest.fixture(autouse=True)
def no_metrics(monkeypatch):
    from ray_layer import serve_app

    monkeypatch.setattr(serve_app, "record", lambda *args, **kwargs: None)


def test_during_a_reload_a_tokenizer_is_kept_only_under_its_own_name():
    # A hot reload changes the tokenizer; the fetch reaches replicas still on the old model
    # twice before one on the new model answers.
    answers = [tokenizer("old"), tokenizer("old"), tokenizer("new")]

    async def fetch():
        return answers.pop(0)
    node = ingress(SimpleNamespace(tokenizer=Remote(fetch)))
    info = {"tokenizer": "new", "token_ids": 256}
    encoder = asyncio.run(node._encoder(info))
    assert encoder.tokenizer.name == "new"
    assert {name: t.name for name, t in node._tokenizers.items()} == {"old": "old", "new": "new"}

    # Never on the new model within the tries: a 503 to retry, nothing cached as "new".
    answers[:] = [tokenizer("old")] * 3
    node._tokenizers.clear()
    with pytest.raises(APIError) as refused:
        asyncio.run(node._encoder(info))
    assert refused.value.status == 503 and refused.value.code == "reloading"
    assert list(node._tokenizers) == ["old"]


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
    unary, streamed = Remote(generate, taken=False), Remote(generate_stream, taken=False)
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
