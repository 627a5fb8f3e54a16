"""The HTTP front (ray_layer/serve_app.Ingress) with its model calls replaced: what it asks
of the model replicas, and what it answers, without Ray. The live paths are in
tests/integration/test_serving_ingress.py."""
import asyncio
import json
import logging
import threading
import time

import pytest
from starlette.requests import Request

from orchestrator.serving import protocol
from orchestrator.serving.generation import Chunk, GenerationResult, collect
from orchestrator.serving.protocol import Encoder
from orchestrator.serving.settings import ServeSettings

serve_app = pytest.importorskip("ray_layer.serve_app")

INFO = {"context_length": 64, "tokenizer_sha256": "bytes", "token_ids": 257,
        "batching": "static"}


class BareIngress(serve_app.Ingress.func_or_class):
    def __del__(self):  # (Serve's wrapper shuts its ASGI app down: there is none here)
        pass


def ingress(model_info):
    """An Ingress whose model_info call is `model_info` (async) and whose generation answers
    at once; metrics are dropped."""
    ing = object.__new__(BareIngress)
    ing.settings = ServeSettings()
    ing.deployment = "Ingress"
    ing._info, ing._info_at, ing._info_refresh = None, 0.0, None
    ing._record = ing._record_error = lambda *args: None

    async def with_retries(call):
        return await model_info()

    async def encoder(info):
        return Encoder(None, 257)

    ing._with_retries = with_retries
    ing._encoder = encoder
    ing.model = None
    return ing


def request(body: dict, route=serve_app.COMPLETIONS_ROUTE) -> Request:
    sent = json.dumps(body).encode()

    async def receive():
        return {"type": "http.request", "body": sent, "more_body": False}

    return Request({"type": "http", "method": "POST", "path": route,
                    "headers": [(b"content-type", b"application/json")]}, receive)


def test_concurrent_requests_on_an_expired_cache_ask_the_model_once():
    # Each of 200 requests arriving together sent its own model_info call, every one queued
    # at a replica beside generation.
    calls = 0

    async def model_info():
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return INFO

    async def main():
        ing = ingress(model_info)
        answers = await asyncio.gather(*(ing._model_info(1.0) for _ in range(200)))
        assert all(a == INFO for a in answers)

    asyncio.run(main())
    assert calls == 1


def test_a_failed_refresh_fails_every_waiting_request_at_once():
    # Taken in turn, each waiting request made its own call after the one before failed:
    # the k-th got its 503 after k x replica_wait_s.
    calls = 0

    async def no_answer():
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.2)
        raise RuntimeError("no replica")

    async def main():
        ing = ingress(no_answer)
        started = time.monotonic()
        answers = await asyncio.gather(*(ing._model_info(1.0) for _ in range(6)),
                                       return_exceptions=True)
        return answers, time.monotonic() - started

    answers, took = asyncio.run(main())
    assert all(isinstance(a, RuntimeError) for a in answers)
    assert calls == 1 and took < 1.0, (calls, took)


def test_a_body_that_names_a_bad_field_is_refused_without_waiting_for_a_replica():
    # No replica up (a replacement starting): a typo waited replica_wait_s, then was told 503.
    async def no_replica():
        await asyncio.sleep(3600)

    async def main():
        ing = ingress(no_replica)
        for body, status, words in (({"prompt": "hi", "max_token": 5}, 400, "max_token"),
                                    ({"prompt": "hi", "model": "gpt-4"}, 404, "gpt-4"),
                                    ({"prompt": "hi", "n": 2}, 400, "n=2")):
            response = await asyncio.wait_for(ing._serve(request(body),
                                                         serve_app.COMPLETIONS_ROUTE), 5)
            assert response.status_code == status and words in response.body.decode()

    asyncio.run(main())


def test_an_answer_from_a_model_in_a_non_latin_directory_is_sent_not_a_500():
    version = "прогон-1/checkpoint_000001@abcdef12"

    async def model_info():
        return INFO

    async def main():
        ing = ingress(model_info)

        async def generate(request, route):
            return GenerationResult("Hello", 5, "length", version)

        ing._generate = generate
        response = await ing._serve(request({"prompt": "hi", "max_tokens": 5}),
                                    serve_app.COMPLETIONS_ROUTE)
        assert response.status_code == 200, response.body
        body = json.loads(response.body)
        assert body["system_fingerprint"] == version and body["choices"][0]["text"] == "Hello"
        assert response.headers["x-model-version"].startswith("%D0%BF")

    asyncio.run(main())


def test_a_client_that_leaves_while_sending_is_not_a_server_error():
    from starlette.requests import ClientDisconnect

    ing = ingress(None)
    error = ing._as_api_error(ClientDisconnect())
    assert error.status == 499 and error.code == "client_closed"
    from orchestrator.metric_catalogue import serve_error_kind

    assert serve_error_kind(error.status, error.code) == "client_closed"


def test_an_unexpected_error_tells_the_client_no_traceback_and_logs_it_whole():
    # A replica's exception reaches the ingress as a RayTaskError whose text is the remote
    # traceback (file paths, the replica's pid and IP): it was the client's 500 message.
    from ray.exceptions import RayTaskError

    remote = RayTaskError("GPTModel.generate", "Traceback (most recent call last):\n  File "
                          '"/home/op/secret_dir/serve_model.py", line 1\nRuntimeError: boom',
                          RuntimeError("boom"))
    logged = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(logging.Formatter().format(record))
    serve_app.log.addHandler(handler)  # (Ray's "ray.serve" logger does not propagate)
    try:
        error = ingress(None)._as_api_error(remote)
    finally:
        serve_app.log.removeHandler(handler)
    assert error.status == 500 and error.type == "server_error"
    assert "secret_dir" not in json.dumps(error.body()) and "Traceback" not in error.message
    assert "RuntimeError" in error.message  # what kind of failure, no more
    assert "secret_dir" in "".join(logged)  # the operator's log keeps it all


def test_health_names_a_replicas_failure_without_its_remote_traceback(monkeypatch):
    # /health's 503 said f"{type(e).__name__}: {e}": for a replica that raised, the remote
    # traceback (file paths, pid, IP) went to whoever asked.
    from types import SimpleNamespace

    from ray.exceptions import RayTaskError

    async def replica_stats():
        raise RayTaskError("GPTModel.replica_stats", "Traceback (most recent call last):\n"
                           '  File "/home/op/secret_dir/serve_model.py", line 1\n'
                           "RuntimeError: boom", RuntimeError("boom"))

    async def unknown_state():
        return "the controller did not answer"

    ing = ingress(None)
    ing.model = SimpleNamespace(deployment_name="GPTModel",
                                replica_stats=SimpleNamespace(remote=replica_stats))
    ing._deployment_state = unknown_state
    ing.retries = {}
    monkeypatch.setattr(serve_app, "routable_replicas", lambda handle: 1)
    response = asyncio.run(ing.health())
    body = json.loads(response.body)
    assert response.status_code == 503 and "RuntimeError: boom" in body["error"], body
    assert "secret_dir" not in response.body.decode()


def test_health_says_starting_while_serve_replaces_a_lost_replica_up_to_replica_wait_s(
        monkeypatch):
    # The only replica killed: /health said 503 for the 5-6 s its replacement took to start.
    # Past replica_wait_s of it (requests are refused then too) it is a 503.
    from types import SimpleNamespace

    from orchestrator.serving.retries import DeploymentState

    async def replacing():
        return DeploymentState("UNHEALTHY", {"STARTING": 1, "STOPPING": 1},
                               "A replica's health check failed. This deployment will be "
                               "UNHEALTHY until the replica recovers or a new deploy happens.")

    ing = ingress(None)
    ing.model = SimpleNamespace(deployment_name="GPTModel")
    ing._deployment_state = replacing
    ing.retries, ing._replacing_since = {}, None
    monkeypatch.setattr(serve_app, "routable_replicas", lambda handle: 0)
    clock = [1000.0]
    monkeypatch.setattr(serve_app.time, "monotonic", lambda: clock[0])
    seen = []
    for at in (1000.0, 1030.0, 1060.0, 1061.0):
        clock[0] = at
        response = asyncio.run(ing.health())
        seen.append((response.status_code, json.loads(response.body)["status"]))
    assert seen == [(200, "starting"), (200, "starting"), (200, "starting"),
                    (503, "unavailable")], seen


def test_the_served_model_can_be_retrieved_by_its_id_and_another_is_a_404():
    # openai-python's client.models.retrieve(id): a route that did not exist (404 Not Found).
    async def model_info():
        return INFO

    async def main():
        ing = ingress(model_info)
        found = await ing.retrieve_model(ing.settings.model_name)
        missing = await ing.retrieve_model("gpt-4")
        return found, missing

    found, missing = asyncio.run(main())
    # Another model's name: a 404 at once, with no replica up (it waited for one first).

    async def never():
        await asyncio.sleep(3600)

    async def wrong_name():
        return await asyncio.wait_for(ingress(never).retrieve_model("gpt-4"), 5)

    assert asyncio.run(wrong_name()).status_code == 404
    assert found.status_code == 200
    assert json.loads(found.body)["id"] == ServeSettings().model_name
    assert missing.status_code == 404
    assert json.loads(missing.body)["error"]["code"] == "model_not_found"


def answered(body: dict, route: str, chunks: list[Chunk] | None,
             info=INFO) -> tuple[int, dict, bytes]:
    """Status, headers and body of `body` answered by a model that produces `chunks` for each
    prompt (streamed as they come, or collected whole); generation fails the test when
    `chunks` is None."""
    async def model_info():
        return info

    async def stream_one(request, route):
        assert chunks is not None, "the request reached the model"
        for chunk in chunks:
            await asyncio.sleep(0)
            yield chunk

    async def generate(request, route):
        assert chunks is not None, "the request reached the model"
        return collect(chunks)

    async def main():
        ing = ingress(model_info)
        ing._stream_one, ing._generate = stream_one, generate
        response = await ing._serve(request(body, route), route)
        if hasattr(response, "body_iterator"):
            sent = b"".join([part async for part in response.body_iterator])
            return response.status_code, dict(response.headers), sent
        return response.status_code, dict(response.headers), response.body

    return asyncio.run(main())


def events(sent: bytes) -> list[dict]:
    return [json.loads(event[len("data: "):]) for event in sent.decode().split("\n\n")
            if event.startswith("data: {")]


def test_a_chat_answer_starts_without_the_templates_space_streamed_or_whole():
    # The model continues "Assistant:" with " ": every answer began with a space, doubled
    # in the history a client sent back next turn ("Assistant:  Yo.").
    chunks = [Chunk((32,), " ", None, "v1"), Chunk((89,), "Y", None, "v1"),
              Chunk((111, 46), "o.", "length", "v1")]
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    status, _, sent = answered(body, serve_app.CHAT_ROUTE, chunks)
    assert status == 200 and json.loads(sent)["choices"][0]["message"]["content"] == "Yo."
    assert json.loads(sent)["usage"]["completion_tokens"] == 4  # the space was generated
    status, _, sent = answered({**body, "stream": True}, serve_app.CHAT_ROUTE, chunks)
    deltas = [event["choices"][0]["delta"] for event in events(sent)]
    assert status == 200 and deltas == [{"role": "assistant", "content": ""}, {"content": "Y"},
                                        {"content": "o."}, {}]
    # Completions continue the prompt as it is: their text keeps its space.
    status, _, sent = answered({"prompt": "Hi", "max_tokens": 4}, serve_app.COMPLETIONS_ROUTE,
                               chunks)
    assert json.loads(sent)["choices"][0]["text"] == " Yo."


def test_a_streamed_prompt_over_the_kv_cache_is_a_400_before_any_text():
    # Only chat was checked against kv_cache_tokens here: this was a 200, the first
    # prompt's text, then an error event for the second.
    info = {**INFO, "batching": "continuous", "kv_cache_tokens": 32}
    body = {"prompt": ["hi", "x" * 40], "max_tokens": 2, "stream": True}
    status, _, sent = answered(body, serve_app.COMPLETIONS_ROUTE, None, info)
    error = json.loads(sent)["error"]
    assert status == 400 and error["param"] == "prompt" and "prompt[1] (40 tokens)" in \
        error["message"]
    # Static batching has no such cache: the same request is served.
    chunks = [Chunk((121,), "y", "length", "v1")]
    status, _, sent = answered(body, serve_app.COMPLETIONS_ROUTE, chunks)
    assert status == 200 and sent.endswith(b"data: [DONE]\n\n")


def test_a_streamed_answer_names_its_model_version_in_a_header_as_a_whole_one_does():
    version = "прогон-1/checkpoint_000001@abcdef12"
    chunks = [Chunk((72,), "H", None, version), Chunk((105,), "i", "length", version)]
    for stream in (False, True):
        status, headers, _ = answered({"prompt": "hi", "max_tokens": 2, "stream": stream},
                                      serve_app.COMPLETIONS_ROUTE, chunks)
        assert status == 200 and headers["x-model-version"] == protocol.version_header(version)


def test_a_503_tells_the_client_when_to_retry():
    # Overloaded or no replica: a 503 without Retry-After, so clients (openai-python reads
    # it) fell back to guessing how long to wait.
    from ray.serve.exceptions import BackPressureError

    from orchestrator.serving.retries import untaken_error

    async def model_info():
        return INFO

    for raised, code in ((BackPressureError(num_queued_requests=1, max_queued_requests=1),
                          "overloaded"),
                         (untaken_error(60, "GPTModel", "timed out"), "no_replica")):
        async def generate(request, route, raised=raised):
            raise raised

        async def stream_one(request, route, raised=raised):
            raise raised
            yield

        async def main():
            ing = ingress(model_info)
            ing._generate, ing._stream_one = generate, stream_one
            return [await ing._serve(request({"prompt": "hi", "max_tokens": 2,
                                              "stream": stream}), serve_app.COMPLETIONS_ROUTE)
                    for stream in (False, True)]

        for response in asyncio.run(main()):
            assert response.status_code == 503
            assert json.loads(response.body)["error"]["code"] == code
            assert response.headers["retry-after"] == str(protocol.RETRY_AFTER_S)
    # A client's mistake is not to be retried as is: no Retry-After.
    status, headers, _ = answered({"prompt": "hi", "n": 2}, serve_app.COMPLETIONS_ROUTE, None)
    assert status == 400 and "retry-after" not in headers


def test_a_wrong_method_is_a_405_naming_the_allowed_one():
    # The OpenAI-shaped error body dropped Starlette's Allow header (HTTP requires it on a 405).
    from starlette.testclient import TestClient

    response = TestClient(serve_app.api).get(serve_app.COMPLETIONS_ROUTE)
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    assert response.json()["error"]["message"].startswith("GET /v1/completions")


def test_unknown_routes_and_wrong_methods_are_counted_under_a_bounded_route_label(monkeypatch):
    # A 404 or 405 answered by the exception handler was in no serve_requests_total series:
    # a client calling a wrong path at 100 QPS showed as no traffic at all.
    import types

    from starlette.testclient import TestClient

    from orchestrator import metric_catalogue as catalogue

    recorded = []
    monkeypatch.setattr(serve_app, "record",
                        lambda spec, value, **tags: recorded.append((spec.name, value, tags)))
    monkeypatch.setattr(serve_app.serve, "get_replica_context",
                        lambda: types.SimpleNamespace(deployment="Ingress"))
    client = TestClient(serve_app.api)
    assert client.get("/v1/engines").status_code == 404
    assert client.post("/admin/../../etc/passwd?x=1", json={}).status_code == 404
    assert client.get(serve_app.COMPLETIONS_ROUTE).status_code == 405
    requests = [tags for name, _, tags in recorded if name == catalogue.SERVE_REQUESTS.name]
    assert requests == [
        {"deployment": "Ingress", "route": catalogue.SERVE_UNMATCHED_ROUTE, "status": "404"},
        {"deployment": "Ingress", "route": catalogue.SERVE_UNMATCHED_ROUTE, "status": "404"},
        {"deployment": "Ingress", "route": serve_app.COMPLETIONS_ROUTE, "status": "405"}]
    errors = [tags["kind"] for name, _, tags in recorded if name == catalogue.SERVE_ERRORS.name]
    assert errors == ["bad_request"] * 3


def test_every_field_that_needs_no_model_is_refused_without_waiting_for_a_replica():
    # Only unknown fields, the model's name and the default-only fields were: with no
    # replica up, a temperature of 5 or a "tool" message waited replica_wait_s for one, then
    # got a 503, which clients retry, instead of its 400.
    async def no_replica():
        await asyncio.sleep(3600)

    chat = [{"role": "user", "content": "hi"}]
    cases = [({"prompt": "hi", "temperature": 5}, serve_app.COMPLETIONS_ROUTE, "temperature"),
             ({"prompt": "hi", "top_p": -1}, serve_app.COMPLETIONS_ROUTE, "top_p"),
             ({"prompt": "hi", "stop": 3}, serve_app.COMPLETIONS_ROUTE, "stop"),
             ({"prompt": "hi", "seed": 0.5}, serve_app.COMPLETIONS_ROUTE, "seed"),
             ({"prompt": "hi", "max_tokens": 0}, serve_app.COMPLETIONS_ROUTE, "max_tokens"),
             ({"prompt": "hi", "stream_options": {}}, serve_app.COMPLETIONS_ROUTE,
              "stream_options"),
             ({"messages": [{"role": "tool", "content": "x"}]}, serve_app.CHAT_ROUTE,
              "messages"),
             ({"messages": chat, "max_completion_tokens": "5"}, serve_app.CHAT_ROUTE,
              "max_completion_tokens"),
             ({"messages": chat, "max_tokens": 1, "max_completion_tokens": 1},
              serve_app.CHAT_ROUTE, "max_completion_tokens"),
             ({"messages": chat, "stream": "yes"}, serve_app.CHAT_ROUTE, "stream"),
             # the prompt's shape and count need no tokenizer either (a missing prompt does:
             # it starts from the model's end-of-text token, or is refused where it has none)
             ({"prompt": {"text": "hi"}}, serve_app.COMPLETIONS_ROUTE, "prompt"),
             ({"prompt": ["hi", ""]}, serve_app.COMPLETIONS_ROUTE, "prompt"),
             ({"prompt": ["hi"] * 33}, serve_app.COMPLETIONS_ROUTE, "prompt")]

    async def main():
        ing = ingress(no_replica)
        for body, route, param in cases:
            response = await asyncio.wait_for(ing._serve(request(body, route), route), 5)
            assert (response.status_code, json.loads(response.body)["error"]["param"]) == \
                (400, param), body

    asyncio.run(main())


class SlowTokenizer:
    """A tokenizer that holds its thread for `seconds` per text (a BPE over a long prompt),
    noting the threads it ran on and how often the event loop ticked meanwhile (`ticks` is
    set to the ticker's count)."""
    name, vocab_size, eos_id = "slow", 257, None

    def __init__(self, seconds: float) -> None:
        self.seconds, self.threads, self.ticks_while_encoding = seconds, [], []
        self.ticks = lambda: 0

    def encode(self, text: str) -> list[int]:
        self.threads.append(threading.current_thread())
        before = self.ticks()
        time.sleep(self.seconds)
        self.ticks_while_encoding.append(self.ticks() - before)
        return [1, 2, 3]

    encode_as_text = encode


def served_beside_a_ticker(body: dict, route: str, tokenizer) -> tuple[int, str, float]:
    """Status and body of `body` encoded with `tokenizer`, and the longest the event loop
    stood still meanwhile (a coroutine ticking every 10 ms)."""
    async def model_info():
        return INFO

    async def encoder(info):
        return Encoder(tokenizer, 257)

    async def main():
        ing = ingress(model_info)
        ing._encoder = encoder
        gaps, done = [0.0], False

        async def ticker():
            last = time.monotonic()
            while not done:
                await asyncio.sleep(0.01)
                gaps.append(time.monotonic() - last)
                last = time.monotonic()

        tokenizer.ticks = lambda: len(gaps)
        ticking = asyncio.ensure_future(ticker())
        await asyncio.sleep(0)
        response = await ing._serve(request(body, route), route)
        done = True
        await ticking
        return response.status_code, response.body.decode(), max(gaps)

    return asyncio.run(main())


@pytest.mark.parametrize("route, field", [
    (serve_app.COMPLETIONS_ROUTE, lambda text: {"prompt": text}),
    (serve_app.CHAT_ROUTE, lambda text: {"messages": [{"role": "user", "content": text}]})])
def test_a_large_prompt_is_tokenized_off_the_event_loop_and_a_small_one_on_it(route, field):
    # A 1 MiB prompt took ~0.3 s with a BPE tokenizer, encoded on the ingress's event loop:
    # every other request it handled (streams too) stood still meanwhile.
    # (max_tokens over the context: refused once the prompt is encoded, before generation)
    tokenizer = SlowTokenizer(0.4)
    large = {**field("x" * serve_app.PARSE_OFF_LOOP_BYTES), "max_tokens": 1000}
    status, body, gap = served_beside_a_ticker(large, route, tokenizer)
    assert status == 400 and "maximum context length" in body
    # The loop ticked (every 10 ms) while the prompt was encoded: on the loop's own thread it
    # could not tick at all. (Counted, not timed: under load a free loop's longest gap reached
    # 0.61 s, which a 0.2 s bound on it read as a blocked loop.)
    assert tokenizer.ticks_while_encoding and min(tokenizer.ticks_while_encoding) >= 3, \
        f"the event loop stood still while a prompt was encoded (longest gap {gap:.2f} s)"
    assert tokenizer.threads and threading.main_thread() not in tokenizer.threads
    # A small body is encoded where it is: no thread hop for the common case.
    tokenizer.seconds, tokenizer.threads = 0.0, []
    status, body, _ = served_beside_a_ticker({**field("hi"), "max_tokens": 1000}, route,
                                             tokenizer)
    assert status == 400 and "maximum context length" in body
    assert tokenizer.threads and set(tokenizer.threads) == {threading.main_thread()}


def test_a_call_serve_refuses_for_a_failed_deploy_is_a_503_saying_why():
    # A model deployment whose replicas could not start (`serve run serve_config.yaml` with no
    # pretrain run to serve): Serve refuses every call at once (DeploymentUnavailableError),
    # and the client got "no model replica could serve the request
    # (DeploymentUnavailableError); retry shortly", code "unavailable", never the why that
    # Serve holds and /health gave.
    import types

    from ray.serve._private.common import DeploymentID
    from ray.serve.exceptions import DeploymentUnavailableError

    from orchestrator.serving.generation import GenerationRequest, SamplingParams
    from orchestrator.serving.retries import DeploymentState

    why = ("The deployment failed to start 3 times in a row. Error: RuntimeError: checkpoint "
           "(none named) cannot be served: no pretrain-* run")
    refused = DeploymentUnavailableError(DeploymentID(name="GPTModel", app_name="gpt"))
    calls = 0

    async def call():
        nonlocal calls
        calls += 1
        raise refused

    async def stream_one(request, route):
        raise refused
        yield

    async def state():
        return DeploymentState("DEPLOY_FAILED", {}, why)

    async def main():
        ing = object.__new__(BareIngress)
        ing.settings = ServeSettings(request_retries=1)
        ing.retries = {"calls": 0}
        ing.model = types.SimpleNamespace(deployment_name="GPTModel")
        ing._deployment_state = state
        with pytest.raises(protocol.APIError) as whole:
            await serve_app.Ingress.func_or_class._with_retries(ing, call)
        ing._stream_one = stream_one
        queue = asyncio.Queue()
        await ing._pump(queue, 0, GenerationRequest([1], SamplingParams(2)), "/v1/completions")
        return whole.value, (await queue.get())[1]

    for error in asyncio.run(main()):
        assert isinstance(error, protocol.APIError)
        assert (error.status, error.code) == (503, "no_replica")
        assert error.message == ("no GPTModel replica can take the request: none is running "
                                 f"(GPTModel is DEPLOY_FAILED; {why}); retry shortly, or see "
                                 "`serve status`")
    assert calls == 2  # (still resent request_retries times first)


def test_health_checks_are_counted_under_their_own_route(monkeypatch):
    # GET /health answered 200 or 503 and was in no serve_requests_total series (the only
    # route that was not): a load balancer probing at 10 Hz, or a 503 for every probe while
    # no replica ran, showed as nothing. Counted under route "/health", apart from the API's.
    from types import SimpleNamespace

    from orchestrator import metric_catalogue as catalogue
    from orchestrator.serving.retries import DeploymentState

    recorded = []

    def record(spec, value, **tags):
        recorded.append((spec.name, tags))

    monkeypatch.setattr(serve_app, "record", record)
    # (Serve's decorator gives Ingress's methods a copy of the module's globals)
    monkeypatch.setitem(BareIngress._record.__globals__, "record", record)

    async def replica_stats():
        return {"batching": "static"}

    async def none_running():
        return DeploymentState("UNHEALTHY", {}, "")

    ing = ingress(None)
    del ing._record, ing._record_error  # (the real ones: metrics recorded)
    ing.model = SimpleNamespace(deployment_name="GPTModel",
                                replica_stats=SimpleNamespace(remote=replica_stats))
    ing._deployment_state = none_running
    ing.retries, ing._replacing_since = {}, None
    routable = [True]

    async def replica_to_ask():
        return routable[0]

    ing._replica_to_ask = replica_to_ask
    assert asyncio.run(ing.health()).status_code == 200
    routable[0] = False
    assert asyncio.run(ing.health()).status_code == 503
    requests = [tags for name, tags in recorded if name == catalogue.SERVE_REQUESTS.name]
    assert requests == [{"deployment": "Ingress", "route": "/health", "status": "200"},
                        {"deployment": "Ingress", "route": "/health", "status": "503"}]
    errors = [tags for name, tags in recorded if name == catalogue.SERVE_ERRORS.name]
    assert errors == [{"deployment": "Ingress", "route": "/health", "kind": "unavailable"}]
    latencies = [tags for name, tags in recorded
                 if name == catalogue.SERVE_REQUEST_LATENCY.name]
    assert latencies == [{"deployment": "Ingress", "route": "/health"}] * 2


def test_fastapis_api_explorer_routes_are_counted_under_their_own_routes(monkeypatch):
    # FastAPI serves /docs, /redoc and /openapi.json itself: 200s in no serve_requests_total
    # series, while the metric counts every answer the ingress gives.
    import types

    from starlette.testclient import TestClient

    from orchestrator import metric_catalogue as catalogue

    recorded = []
    monkeypatch.setattr(serve_app, "record",
                        lambda spec, value, **tags: recorded.append((spec.name, tags)))
    monkeypatch.setattr(serve_app.serve, "get_replica_context",
                        lambda: types.SimpleNamespace(deployment="Ingress"))
    client = TestClient(serve_app.api)
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert client.get(path).status_code == 200
    assert client.post("/openapi.json").status_code == 405
    requests = [tags for name, tags in recorded if name == catalogue.SERVE_REQUESTS.name]
    assert requests == [{"deployment": "Ingress", "route": "/docs", "status": "200"},
                        {"deployment": "Ingress", "route": "/redoc", "status": "200"},
                        {"deployment": "Ingress", "route": "/openapi.json", "status": "200"},
                        {"deployment": "Ingress", "route": "/openapi.json", "status": "405"}]


def test_a_head_health_check_is_answered_as_get_is(monkeypatch):
    # HEAD /health was a 405 (FastAPI routes a GET route for GET alone): a load balancer
    # probing with HEAD (HAProxy's `option httpchk HEAD /health`) took every replica for down.
    from types import SimpleNamespace

    from starlette.testclient import TestClient

    async def replica_stats():
        return {"batching": "static"}

    ing = ingress(None)
    ing.model = SimpleNamespace(deployment_name="GPTModel",
                                replica_stats=SimpleNamespace(remote=replica_stats))
    ing.retries, ing._replacing_since = {}, None

    async def replica_to_ask():
        return True

    ing._replica_to_ask = replica_to_ask
    monkeypatch.setattr(serve_app.serve, "get_replica_context",
                        lambda: SimpleNamespace(deployment="Ingress", servable_object=ing))
    client = TestClient(serve_app.api)
    head, get = client.head("/health"), client.get("/health")
    assert (head.status_code, get.status_code) == (200, 200), head.text
    assert head.content == b"" and get.json()["status"] == "ok"

    async def model_info(max_age_s):
        return INFO

    ing._model_info = model_info  # (the model routes: HEAD as GET too)
    name = ing.settings.model_name
    for path, status in (("/v1/models", 200), (f"/v1/models/{name}", 200),
                         ("/v1/models/gpt-4", 404)):
        head, get = client.head(path), client.get(path)
        assert head.status_code == get.status_code == status, (path, head.status_code)


def test_time_to_first_token_counts_the_wait_outside_the_replica_streamed_or_whole():
    # The only time to first token was the replica's: a call waiting 0.3 s in Serve's router
    # for a replica with room (here: before the fake replica "arrives") read 0.05 s.
    from types import SimpleNamespace

    recorded = {}
    outside, first_token, held = 0.3, 0.05, 0.2

    async def answer(call, route=None):  # the router's wait, then the replica's hold
        await asyncio.sleep(outside + held)
        return GenerationResult("Hello", 5, "length", "v1", first_token, held)

    async def stream(request, route):
        await asyncio.sleep(outside + first_token)
        yield Chunk((72,), "H", None, "v1", first_token_s=first_token)
        yield Chunk((105,), "i", "length", "v1")

    async def served(streamed: bool) -> dict[str, float]:
        ing = ingress(None)
        ing._info, ing._info_at = INFO, time.monotonic()  # (no model_info call)
        ing._with_retries = lambda call: call()
        ing.model = SimpleNamespace(generate=SimpleNamespace(remote=lambda *args: None))
        ing.stream_model = SimpleNamespace(generate_stream=SimpleNamespace(remote=stream))
        ing._answer = answer

        async def taken(response):
            pass

        ing._taken = taken
        # (Serve's deployment wrapper gives Ingress's methods their own module globals: the
        # metrics are caught at the methods that record them)
        ing._record_first_token = lambda seconds, route: recorded.update(client=seconds)
        ing._record_router_wait = lambda seconds, route: recorded.update(router=seconds)
        recorded.clear()
        response = await ing._serve(request({"prompt": "hi", "max_tokens": 2,
                                             "stream": streamed}), serve_app.COMPLETIONS_ROUTE)
        if streamed:
            assert b"[DONE]" in b"".join([part async for part in response.body_iterator])
        assert response.status_code == 200
        return dict(recorded)

    for streamed in (False, True):
        figures = asyncio.run(served(streamed))
        # Lower bounds exact (sleeps never end early); upper ones leave room for busy cores.
        assert outside <= figures["router"] < outside + 0.15, streamed
        assert outside + first_token <= figures["client"] < outside + first_token + 0.15, \
            streamed


class FakeCall:
    """A model call as the ingress sees Serve's DeploymentResponse: a replica takes it after
    `taken_after_s` (None: none ever does), then it answers `outcome` (a GenerationResult, a
    list of chunks streamed) or raises it (an exception)."""

    def __init__(self, taken_after_s: float | None, outcome) -> None:
        self.taken_after_s, self.outcome = taken_after_s, outcome
        self._replica_result = None
        self._replica_result_future = asyncio.get_running_loop().create_future()

    async def _fetch_future_result_async(self) -> None:
        await asyncio.sleep(3600 if self.taken_after_s is None else self.taken_after_s)
        self._replica_result_future.set_result(None)

    def cancel(self) -> None:
        pass

    def __await__(self):
        return self._answer().__await__()

    async def _answer(self):
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome

    async def __aiter__(self):
        if isinstance(self.outcome, Exception):
            raise self.outcome
        for chunk in self.outcome:
            yield chunk


def waits_recorded(calls: list[tuple[float | None, object]], streamed: bool,
                   wait_s: float) -> tuple[int, dict[str, list[float]]]:
    """The status of a one-prompt request whose model calls, in turn, are `calls`
    ((taken_after_s, outcome) for FakeCall), with replica_wait_s `wait_s`, and the router
    waits and ingress times to first token the ingress recorded for it."""
    from types import SimpleNamespace

    from orchestrator.serving.retries import DeploymentState

    recorded = {"router": [], "client": []}

    async def full():
        return DeploymentState("HEALTHY", {"RUNNING": 1})

    async def main():
        pending = [FakeCall(*call) for call in calls]
        remote = SimpleNamespace(remote=lambda request, route: pending.pop(0))
        ing = ingress(None)
        ing._info, ing._info_at = INFO, time.monotonic()  # (no model_info call)
        ing.settings = ServeSettings(replica_wait_s=wait_s, request_retries=len(calls) - 1)
        ing.retries = serve_app.Counter()
        ing.model = SimpleNamespace(deployment_name="GPTModel", generate=remote)
        ing.stream_model = SimpleNamespace(generate_stream=remote)
        ing._deployment_state = full
        del ing._with_retries  # (the real one: a lost replica's call is resent)
        ing._record_first_token = lambda s, route: recorded["client"].append(s)
        ing._record_router_wait = lambda s, route: recorded["router"].append(s)
        response = await ing._serve(request({"prompt": "hi", "max_tokens": 1,
                                             "stream": streamed}), serve_app.COMPLETIONS_ROUTE)
        if hasattr(response, "body_iterator"):
            _ = [part async for part in response.body_iterator]
        return response.status_code

    status = asyncio.run(main())
    return status, {name: [s for s in seconds if s is not None]
                    for name, seconds in recorded.items()}


@pytest.mark.parametrize("streamed", [False, True])
def test_a_call_no_replica_took_records_its_router_wait_and_its_clients_wait(streamed):
    # A call that waited in Serve's router for all of replica_wait_s, then was answered 503,
    # recorded nothing: under overload, the worst waits were in neither the router wait nor
    # the time to first token that ServeFirstTokenP99High judges.
    wait_s = 0.2
    status, recorded = waits_recorded([(None, None)], streamed, wait_s)
    assert status == 503
    assert len(recorded["router"]) == 1 and wait_s <= recorded["router"][0] < wait_s + 0.15
    assert len(recorded["client"]) == 1 and wait_s <= recorded["client"][0] < wait_s + 0.15


@pytest.mark.parametrize("streamed", [False, True])
def test_a_call_whose_replica_was_lost_records_its_router_wait_up_to_being_taken(streamed):
    # The first attempt waited 1 s for a replica, which then lost its engine; the resend was
    # answered at once. Only the answered call's wait was recorded: the lost wait was nowhere.
    from orchestrator.serving.retries import engine_lost

    # (1 s, bounds of half that: with 0.3 s and 0.15 s bounds a loaded machine's scheduling
    # delay failed the whole-suite run once)
    taken_after = 1.0
    answer = ([Chunk((72,), "H", "length", "v1", first_token_s=0.0)] if streamed
              else GenerationResult("H", 1, "length", "v1", 0.0, 0.0))
    status, recorded = waits_recorded([(taken_after, engine_lost("engine died")),
                                       (0.0, answer)], streamed, 5.0)
    assert status == 200
    lost, resent = recorded["router"]
    assert taken_after <= lost < taken_after + 0.5 and resent < 0.5, recorded
    assert recorded["client"][0] >= taken_after  # (the client's wait counts the lost attempt)
