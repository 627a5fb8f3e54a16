"""The Ray Serve application: an HTTP ingress and the model deployment. Thin: validation,
generation, batching policy, loading and resources are the pure modules of
orchestrator/serving/.

    client --HTTP--> HAProxy ------> Ingress (FastAPI, OpenAI routes) --handle--> GPTModel x N
                                       validates, retries on a          continuous batching
                                       replica's death, streams SSE      (paged KV cache) or
                                                                         @serve.batch, hot reload

Two deployments rather than one so that a model replica dying (crash, kill, failed health
check) costs no request: the ingress resends it to another replica, and a stream that had
already delivered tokens continues after them. Model replicas autoscale; the ingress is a
fixed, light pool on the head node (no CPU reserved). HAProxy, direct ingress and gRPC between
replicas are Ray Serve's throughput mode, chosen in the config (settings.SERVING_PATHS,
docs/serving.md).

    serve run serve_config.yaml
    serve run ray_layer.serve_app:app checkpoint=~/orchestrator-runs/<run> max_replicas=4
"""
# No `from __future__ import annotations`: FastAPI reads the route signatures (Request) at
# runtime through Serve's ingress wrapper, which string annotations break.
import asyncio
import dataclasses
import functools
import logging
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, AsyncIterator

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Route, request_response

from orchestrator import metric_catalogue as catalogue
from orchestrator.serving import protocol
from orchestrator.serving.generation import (Chunk, GenerationRequest, GenerationResult,
                                             SamplingParams, first_token_after_s,
                                             outside_replica_s)
from orchestrator.serving.loading import model_directories, pin_checkpoint
from orchestrator.serving.protocol import APIError
from orchestrator.serving.retries import (ROUTABLE_STATES, DeploymentState, gather_or_cancel,
                                          is_engine_lost, replacing, replicas_in,
                                          resumable_stream, taken_within, unanswered_health,
                                          unavailable_error, untaken_error, with_retries,
                                          UntakenError)
from orchestrator.serving.resources import (ReplicaResources, listed_accelerator_types,
                                            recommend_replica_resources, report_from_ray_node)
from orchestrator.serving.settings import ServeSettings
from orchestrator.tokenizer import ByteTokenizer
from ray_layer.scheduler_client import get_scheduler
from ray_layer.serve_model import CHAT_ROUTE, COMPLETIONS_ROUTE, GPTModel
from ray_layer.telemetry import record

log = logging.getLogger("ray.serve")

# A model replica that died or vanished mid-request: the request is safe to send again.
RETRYABLE = (ray.exceptions.RayActorError, DeploymentUnavailableError)


def retryable(error: BaseException) -> bool:
    """Lost with its replica, or with the replica's engine process (which the replica
    restarts): safe to send again."""
    return isinstance(error, RETRYABLE) or is_engine_lost(error)


# == HTTP ingress =============================================================================
# Behind HAProxy (settings.SERVING_PATHS) an Ingress replica serves HTTP itself, bound to the
# configured host: loopback by default, which HAProxy on another host cannot reach (Serve warns
# that cross-node routing then fails). Clients call the head node, so the Ingress runs there.
INGRESS_ACTOR_OPTIONS = {"num_cpus": 0, "resources": {"node:__internal_head__": 0.001}}

api = FastAPI(title="orchestrator GPT: OpenAI-compatible completions and chat completions")

# A body over max_body_bytes is read (and thrown away) up to this many bytes before the 413 is
# sent: answering while the client still sends makes the server close the connection under
# it, and the client sees a reset instead of the error. Beyond it the connection is cut.
DRAIN_BODY_BYTES = 64 << 20
# Tries to fetch the served model's tokenizer while a hot reload has replicas on two models.
TOKENIZER_FETCHES = 3
# How long the model deployment's state, asked of Serve when calls find no replica, is reused.
MODEL_STATE_MAX_AGE_S = 2.0
# How long a caller waits for Serve's view (one call to the controller at a time, shared):
# a controller restarting never holds /health, or a 503's message, for longer.
MODEL_STATE_WAIT_S = 2.0
# How long /health waits for the model replica it asks.
HEALTH_REPLICA_WAIT_S = 5.0
# How long /health says "starting" while Serve replaces a lost replica and none other serves,
# where replica_wait_s (the bound otherwise: requests are refused past it) is 0, unbounded.
REPLACEMENT_START_S = 60.0
# A body larger than this is validated and its prompts tokenized in a worker thread, not on the
# event loop: a 1 MiB prompt took ~0.3 s with a BPE tokenizer (8k-32k vocabulary; ~12 ms with
# the byte tokenizer), every other request standing still meanwhile. Smaller ones (~5 ms at
# most with BPE) stay on the loop, without the thread hop.
PARSE_OFF_LOOP_BYTES = 16 << 10


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown routes and wrong methods, in OpenAI's error shape too."""
    error = APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                     type="invalid_request_error" if exc.status_code < 500 else "server_error")
    # Counted as every other answer, under one label for all the paths with no route
    deployment = _deployment()
    route = _route_label(request)
    _count_error(deployment, route, error)
    _count_request(deployment, route, error.status)
    # (its headers kept: a 405's Allow names the method to use)
    return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)


def what_was_raised(error: BaseException) -> BaseException:
    """What a replica raised, for a client to be told of: a RayTaskError's own text is the
    remote traceback (file paths, pid, IP)."""
    cause = getattr(error, "cause", None)
    if isinstance(error, ray.exceptions.RayTaskError) and isinstance(cause, BaseException):
        return cause
    return error


def failure_without_traceback(error: BaseException) -> str:
    """"Type: message" of a failure, for a client to read (what_was_raised)."""
    error = what_was_raised(error)
    return f"{type(error).__name__}: {error}"


def was_taken(response) -> bool:
    """Whether Serve's router gave the call to a replica (its private future, pinned Ray)."""
    future = response._replica_result_future
    return future.done() and not future.cancelled() and future.exception() is None


def routable_replicas(handle) -> int | None:
    """How many replicas the handle's router in this process sends calls to now: its own copy
    of the controller's list (RUNNING and PENDING_MIGRATION ones), read without a call; None
    before the router exists or has heard of a replica (private attributes, pinned Ray)."""
    router = getattr(getattr(handle, "_router", None), "_asyncio_router", None)
    if router is None or not router.running_replicas_populated():
        return None
    request_router = router._request_router  # (the property would create one, off its loop)
    replicas = (request_router.curr_replicas if request_router is not None
                else router._running_replicas)
    return len(replicas or ())


def withdraw(response) -> None:
    """Cancel a call, also when a replica took it just as it was withdrawn: with the router
    on this event loop, response.cancel() then finds nothing to cancel (the result was never
    fetched) and the replica would generate for nobody."""
    response.cancel()
    if response._replica_result is None and was_taken(response):
        response._replica_result_future.result().cancel()


class CancellingStream(StreamingResponse):
    """A streamed answer that cancels its prompts' tasks however it ends: also when its body
    never starts (the client left before the status line was out), where the body's own
    cleanup never runs and the prompts would decode to their end for nobody."""

    def __init__(self, content: AsyncIterator[bytes], tasks: list[asyncio.Task],
                 **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.tasks = tasks

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for task in self.tasks:
                task.cancel()


HEALTH_ROUTE = "/health"
# FastAPI's own routes: the API explorer (Swagger UI, its OAuth2 redirect, ReDoc) and the
# OpenAPI schema it reads, each counted under its path (count_explorer_routes).
EXPLORER_ROUTES = tuple(path for path in (api.docs_url, api.swagger_ui_oauth2_redirect_url,
                                          api.redoc_url, api.openapi_url) if path)
# The routes the serving metrics are labelled with (a model's id under /v1/models counts there).
ROUTES = (COMPLETIONS_ROUTE, CHAT_ROUTE, "/v1/models", HEALTH_ROUTE) + EXPLORER_ROUTES


def _route_label(request: Request) -> str:
    """The serving metrics' route of a request: one of ROUTES, else SERVE_UNMATCHED_ROUTE (a
    raw path per series grows without bound)."""
    path, root = request.scope.get("path", ""), request.scope.get("root_path", "")
    if root and path.startswith(root):  # (an application served under a route_prefix)
        path = path[len(root):] or "/"
    if path.startswith("/v1/models/"):
        return "/v1/models"
    return path if path in ROUTES else catalogue.SERVE_UNMATCHED_ROUTE


def _deployment() -> str:
    """The deployment the serving metrics are labelled with, for the handlers outside Ingress's
    methods."""
    try:
        return serve.get_replica_context().deployment
    except Exception:  # (outside a replica: no deployment to count for)
        return "Ingress"


def count_explorer_routes(app: FastAPI) -> None:
    """Count the answers of FastAPI's own routes (EXPLORER_ROUTES; FastAPI answers them, none
    of Ingress's methods) as every other answer is: their endpoints wrapped in place. (A
    wrong method there is the exception handler's, counted by it.)"""
    for route in app.routes:
        if isinstance(route, Route) and route.path in EXPLORER_ROUTES:
            route.app = request_response(_counted(route.endpoint, route.path))


def _counted(endpoint, path: str):
    @functools.wraps(endpoint)
    async def counted(request: Request) -> Response:
        response = await endpoint(request)
        _count_request(_deployment(), path, response.status_code)
        return response
    return counted


def _count_error(deployment: str, route: str, error: APIError) -> None:
    record(catalogue.SERVE_ERRORS, 1, deployment=deployment, route=route,
           kind=catalogue.serve_error_kind(error.status, error.code))


def _count_request(deployment: str, route: str, status: int) -> None:
    record(catalogue.SERVE_REQUESTS, 1, deployment=deployment, route=route, status=str(status))


count_explorer_routes(api)


@serve.deployment(name="Ingress", ray_actor_options=INGRESS_ACTOR_OPTIONS,
                  max_ongoing_requests=1000)
@serve.ingress(api)
class Ingress:
    """The HTTP front deployment (FastAPI): validates OpenAI-style requests, forwards them to
    GPTModel replicas, and resends the requests of a replica that died."""

    def __init__(self, model: DeploymentHandle, settings: dict[str, Any]) -> None:
        self.model = model
        self.stream_model = model.options(stream=True)
        self.settings = ServeSettings.from_args(settings)
        self.deployment = serve.get_replica_context().deployment
        self._info: dict[str, Any] | None = None
        self._info_at = 0.0
        # One refresh at a time, shared: every request arriving while it ran sent its own
        # model_info call (200 at once on an expired cache), each queued at a replica beside
        # generation; its answer, or its error, reaches every request waiting on it.
        self._info_refresh: asyncio.Future | None = None
        self.retries: Counter = Counter()  # calls resent after a model replica was lost
        # By sha256: a name is a file's path, which a new tokenizer can take (a compression's
        # --out reused, a run directory trained again); the one cached under it went on
        # encoding prompts with the old vocabulary.
        self._tokenizers: dict[str, Any] = {ByteTokenizer().sha256: ByteTokenizer()}
        self._state: tuple[float, DeploymentState | str] | None = None  # (when, what)
        self._state_refresh: asyncio.Future | None = None  # the controller call in flight
        self._replacing_since: float | None = None  # (monotonic; retries.replacing)

    @api.post(COMPLETIONS_ROUTE)
    async def completions(self, request: Request) -> Response:
        return await self._serve(request, COMPLETIONS_ROUTE)

    @api.post(CHAT_ROUTE)
    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, CHAT_ROUTE)

    async def _serve(self, request: Request, route: str) -> Response:
        """Both routes: validate, generate (streamed or whole), answer in the route's shape."""
        started = time.perf_counter()
        chat = route == CHAT_ROUTE
        try:
            protocol.check_content_type(request.headers.get("content-type"))
            body = await self._read_body(request)
            data = protocol.parse_json_body(body)
            checked = protocol.check_request_fields(
                data, chat=chat, model_name=self.settings.model_name,
                max_prompts=self.settings.max_prompts_per_request)
            info = await self._model_info(max_age_s=1.0)
            encoder = await self._encoder(info)
            # Every prompt is checked against the replica's KV cache here, before any
            # starts (protocol._check_fits_cache says why); None under static batching
            kv_cache_tokens = info.get("kv_cache_tokens")
            if chat:
                parse = functools.partial(
                    protocol.parse_chat_request, data, block_size=info["context_length"],
                    model_name=self.settings.model_name, encoder=encoder,
                    kv_cache_tokens=kv_cache_tokens, checked=checked)
            else:
                parse = functools.partial(
                    protocol.parse_completion_request, data,
                    block_size=info["context_length"], model_name=self.settings.model_name,
                    max_prompts=self.settings.max_prompts_per_request, encoder=encoder,
                    kv_cache_tokens=kv_cache_tokens, checked=checked)
            # (tokenizing a large prompt holds the loop: see PARSE_OFF_LOOP_BYTES)
            parsed = (await asyncio.to_thread(parse) if len(body) > PARSE_OFF_LOOP_BYTES
                      else parse())
            requests = [GenerationRequest(prompt, SamplingParams(
                parsed.max_tokens, parsed.temperature, parsed.top_p, parsed.stop, parsed.seed,
                parsed.skip_leading_space))
                for prompt in parsed.prompts]
            if parsed.stream:
                return await self._stream_response(parsed, requests, started, route)
            answers = await gather_or_cancel(*(self._answered(r, route) for r in requests))
        except Exception as e:
            self._record_untaken_first_token(e, route, started)
            return self._error_response(e, route, started)
        results = [result for result, _ in answers]
        firsts = [first_token_after_s(at - started, result) for result, at in answers]
        self._record_first_token(min((s for s in firsts if s is not None), default=None), route)
        version = results[0].version
        prompt_tokens = sum(len(p) for p in parsed.prompts)
        completion_tokens = sum(r.completion_tokens for r in results)
        if chat:
            body = protocol.chat_completion_body(
                protocol.chat_completion_id(), self.settings.model_name, version,
                protocol.chat_reply_content(results[0].text), results[0].finish_reason,
                prompt_tokens, completion_tokens)
        else:
            body = protocol.completion_body(
                protocol.completion_id(), self.settings.model_name, version,
                [(r.text, r.finish_reason) for r in results], prompt_tokens,
                completion_tokens)
        self._record(route, 200, started)
        return JSONResponse(body, headers=protocol.version_headers(version))

    # (HEAD on every GET route: load balancers probe with it, and HTTP wants it there)
    @api.head("/v1/models", include_in_schema=False)
    @api.get("/v1/models")
    async def models(self) -> Response:
        started = time.perf_counter()
        try:
            info = await self._model_info(max_age_s=0.0)
        except Exception as e:
            return self._error_response(e, "/v1/models", started)
        self._record("/v1/models", 200, started)
        return JSONResponse(protocol.models_body(self.settings.model_name, info))

    @api.head("/v1/models/{model_id:path}", include_in_schema=False)
    @api.get("/v1/models/{model_id:path}")
    async def retrieve_model(self, model_id: str) -> Response:
        started = time.perf_counter()
        try:
            # (another name: a 404 now, before a replica is asked)
            protocol.check_model_name(model_id, self.settings.model_name)
            body = protocol.model_body(self.settings.model_name,
                                       await self._model_info(max_age_s=0.0))
        except Exception as e:
            return self._error_response(e, "/v1/models", started)
        self._record("/v1/models", 200, started)
        return JSONResponse(body)

    @api.head(HEALTH_ROUTE, include_in_schema=False)
    @api.get(HEALTH_ROUTE)
    async def health(self) -> Response:
        """200 when a model replica answers with a loaded model, with that replica's batching
        figures. A replica is asked only while one takes calls (this router's own list; Serve's
        view before the router has one): a call with none running waits for one, and wakes
        one (Serve scales up from zero for any call). When none is asked, or the one asked
        does not answer, Serve's view says (retries.unanswered_health): 200 while replicas
        serve (a hot reload's updating ones), 200 "scaled_to_zero" when autoscaling removed
        them all (min_replicas 0), 200 "starting" while it starts one Serve can place, or
        one in place of a lost one (for up to replica_wait_s; "ok" where another runs, even if
        the one asked was the one lost), 503 otherwise. Serve's controller is asked only
        then, so /health does not depend on it while replicas answer. (Serve's own liveness
        route is the proxy's /-/healthz.) Counted in the serving metrics as route /health,
        a 503 as an error of kind unavailable."""
        started = time.perf_counter()
        code, body = await self._health()
        if code != 200:
            self._record_error(HEALTH_ROUTE, APIError(code, body.get("error", ""),
                                                      type="server_error", code="unavailable"))
        self._record(HEALTH_ROUTE, code, started)
        return JSONResponse(body, status_code=code)

    async def _health(self) -> tuple[int, dict[str, Any]]:
        """/health's status code and body (health says what they are)."""
        error = None
        if await self._replica_to_ask():
            try:
                stats = await asyncio.wait_for(self.model.replica_stats.remote(),
                                               timeout=HEALTH_REPLICA_WAIT_S)
            except asyncio.TimeoutError:  # (its text is empty)
                error = f"TimeoutError: no answer within {HEALTH_REPLICA_WAIT_S:g} s"
            except Exception as e:
                error = failure_without_traceback(e)
            else:
                self._replacing_since = None
                status = "degraded" if stats.get("reload_error") else "ok"
                return 200, {"status": status, "model": self.settings.model_name, **stats,
                             "ingress_retries": dict(self.retries)}
        state, now = await self._deployment_state(), time.monotonic()
        # (since when this ingress sees Serve replacing a lost replica, none other serving)
        self._replacing_since = (self._replacing_since or now) if isinstance(
            state, DeploymentState) and replacing(state) else None
        code, body = unanswered_health(self.model.deployment_name, state, error,
                                       now - (self._replacing_since or now),
                                       self.settings.replica_wait_s or REPLACEMENT_START_S)
        return code, {**body, "model": self.settings.model_name,
                      "ingress_retries": dict(self.retries)}

    async def _replica_to_ask(self) -> bool:
        """Whether a model replica takes calls now, so that asking one wakes none."""
        routable = routable_replicas(self.model)
        if routable is None:  # (the router has not heard yet: Serve's view says)
            state = await self._deployment_state()
            return not isinstance(state, DeploymentState) or bool(
                replicas_in(state, ROUTABLE_STATES))
        return routable > 0

    # -- helpers ------------------------------------------------------------------------------
    async def _read_body(self, request: Request) -> bytes:
        """The body, or a 413 once it is over max_body_bytes (declared or counted). An
        over-large body is still read to its end, up to DRAIN_BODY_BYTES, so that the client
        can read the 413 (see DRAIN_BODY_BYTES)."""
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length", "")
        too_large = declared.isdigit() and int(declared) > limit
        body, received = bytearray(), 0
        async for part in request.stream():
            received += len(part)
            if too_large:
                if received > DRAIN_BODY_BYTES:
                    break
                continue
            body += part
            too_large = len(body) > limit
        if too_large and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body is {declared} bytes; the limit is {limit}",
                           code="request_too_large")
        if too_large:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes",
                           code="request_too_large")
        return bytes(body)

    async def _encoder(self, info: dict[str, Any]) -> protocol.Encoder:
        """Prompts are encoded with the served model's tokenizer: the byte tokenizer here,
        another one fetched once from a model replica (known by its sha256)."""
        wanted = info.get("tokenizer_sha256")
        if wanted is None:  # a replica of an older release, during a rolling update
            raise APIError(503, "the model replica answering does not name its tokenizer (an "
                                "older release, being replaced?); retry shortly",
                           type="server_error", code="reloading")
        token_ids = info.get("token_ids", protocol.VOCAB_SIZE)
        if wanted in self._tokenizers:
            return protocol.Encoder(self._tokenizers[wanted], token_ids)
        for attempt in range(TOKENIZER_FETCHES):
            # During a hot reload this call may reach a replica still serving the model
            # before: its tokenizer is kept as what it is, never as the one wanted.
            tokenizer = await self._with_retries(
                lambda: self._answer(self.model.tokenizer.remote()))
            self._tokenizers[tokenizer.sha256] = tokenizer
            if tokenizer.sha256 == wanted:
                return protocol.Encoder(tokenizer, token_ids)
            await asyncio.sleep(0.1 * (attempt + 1))
        raise APIError(503, f"the model is being reloaded (its tokenizer {info.get('tokenizer')} "
                            "is not on every replica yet); retry shortly", type="server_error",
                       code="reloading")

    async def _model_info(self, max_age_s: float) -> dict[str, Any]:
        if self._info is not None and time.monotonic() - self._info_at <= max_age_s:
            return self._info
        if self._info_refresh is None:
            self._info_refresh = asyncio.ensure_future(self._refresh_model_info())
            self._info_refresh.add_done_callback(self._refreshed)
        # (shielded: a request that gives up does not cancel the others' refresh)
        return await asyncio.shield(self._info_refresh)

    async def _refresh_model_info(self) -> dict[str, Any]:
        info = await self._with_retries(lambda: self._answer(self.model.model_info.remote()))
        self._info, self._info_at = info, time.monotonic()
        return info

    def _refreshed(self, refresh: asyncio.Future) -> None:
        self._info_refresh = None  # the next expiry starts a new one, a failure too
        if not refresh.cancelled():
            refresh.exception()  # (read: no "never retrieved" warning when nobody waited)

    async def _answered(self, request: GenerationRequest,
                        route: str) -> tuple[GenerationResult, float]:
        """The whole answer, and when it came (perf_counter)."""
        result = await self._generate(request, route)
        return result, time.perf_counter()

    async def _generate(self, request: GenerationRequest, route: str) -> GenerationResult:
        async def call() -> GenerationResult:
            sent = time.perf_counter()
            result = await self._answer(self.model.generate.remote(request, route), route)
            self._record_router_wait(outside_replica_s(time.perf_counter() - sent,
                                                       result.held_s), route)
            return result
        return await self._with_retries(call)

    async def _answer(self, response, route: str | None = None):
        """A model call's answer, once a replica took it within replica_wait_s. With the
        `route` of a generation call, the router wait of a call that got no answer is
        recorded (_taken_recorded; an answered one's, the caller's to record: it knows the
        replica's part)."""
        taken_s = await self._taken_recorded(response, route)
        try:
            return await response
        except Exception:
            if route is not None:  # (a failed call: its wait up to being taken)
                self._record_router_wait(taken_s, route)
            raise

    async def _taken_recorded(self, response, route: str | None) -> float | None:
        """_taken, for a call of `route` (None: not a generation call, nothing recorded):
        the seconds until a replica took it (None where replica_wait_s 0 waits for no
        replica to take it, so that moment is not known). A call no replica took records
        its whole wait as its router wait: the overload's worst waits, else in no figure."""
        sent = time.perf_counter()
        try:
            await self._taken(response)
        except UntakenError:
            if route is not None:
                self._record_router_wait(time.perf_counter() - sent, route)
            raise
        return time.perf_counter() - sent if self.settings.replica_wait_s else None

    async def _taken(self, response) -> None:
        # A handle's call waits in Serve's router until a replica takes it, for ever when
        # none can start; the private _fetch_future_result_async is that wait (pinned Ray).
        await taken_within(response._fetch_future_result_async, self.settings.replica_wait_s,
                           lambda: was_taken(response), lambda: withdraw(response),
                           self._untaken_error)

    async def _untaken_error(self) -> APIError:
        """The 503 of a call no replica took, with Serve's view of the model deployment."""
        return untaken_error(self.settings.replica_wait_s, self.model.deployment_name,
                             await self._deployment_state())

    async def _deployment_state(self) -> DeploymentState | str:
        """Serve's view of the model deployment, asked once per MODEL_STATE_MAX_AGE_S however
        many calls time out (the controller is busy then, starting replicas) or /health
        requests arrive together; as text, the error that kept Serve from saying. One call
        to the controller at a time, shared: a caller waits for it at most
        MODEL_STATE_WAIT_S (a controller restarting answers nobody meanwhile: each caller
        waiting on it in turn held every other, and a call per caller piled up threads)."""
        if self._state is not None and time.monotonic() - self._state[0] <= MODEL_STATE_MAX_AGE_S:
            return self._state[1]
        if self._state_refresh is None:
            self._state_refresh = asyncio.ensure_future(asyncio.to_thread(self._model_state))
            self._state_refresh.add_done_callback(self._state_refreshed)
        try:  # (shielded: a caller that gives up leaves the call to the others)
            return await asyncio.wait_for(asyncio.shield(self._state_refresh),
                                          MODEL_STATE_WAIT_S)
        except asyncio.TimeoutError:
            return f"Serve's controller did not answer within {MODEL_STATE_WAIT_S:g} s"
        except Exception as e:
            return f"{type(e).__name__}: {e}"

    def _state_refreshed(self, refresh: asyncio.Future) -> None:
        self._state_refresh = None
        if refresh.cancelled():
            return
        error = refresh.exception()
        state = f"{type(error).__name__}: {error}" if error else refresh.result()
        self._state = (time.monotonic(), state)

    def _model_state(self) -> DeploymentState:
        """What Serve says of the model deployment (a call to Serve's controller)."""
        app = serve.status().applications[self.model.app_name]
        model = app.deployments[self.model.deployment_name]
        return DeploymentState(getattr(model.status, "value", str(model.status)),
                               {getattr(k, "value", str(k)): n
                                for k, n in model.replica_states.items()}, model.message)

    async def _with_retries(self, call):
        """Resend a call whose model replica died (or none was reachable, or its engine
        process died) up to request_retries times."""
        def counted(error: BaseException, attempt: int) -> None:
            self.retries["calls"] += 1
            log.warning("model replica lost (%s); retrying (attempt %d)",
                        type(error).__name__, attempt + 2)
        try:
            return await with_retries(call, retryable, self.settings.request_retries, counted)
        except DeploymentUnavailableError:
            raise await self._unavailable_error() from None

    async def _unavailable_error(self) -> APIError:
        """The 503 of a call Serve refused, the model deployment having failed to deploy,
        with Serve's view of why (its replicas' error: no checkpoint to serve, say)."""
        return unavailable_error(self.model.deployment_name, await self._deployment_state())

    def _stream_one(self, request: GenerationRequest, route: str) -> AsyncIterator[Chunk]:
        """One prompt's chunks. If its replica (or engine process) dies mid-stream, the rest
        comes from another attempt, continuing after the tokens already delivered."""
        def counted(error: BaseException, attempt: int, delivered: int) -> None:
            self.retries["streams_resumed" if delivered else "streams_restarted"] += 1
            log.warning("model replica lost mid-stream after %d token(s) (%s); resuming",
                        delivered, type(error).__name__)
        return resumable_stream(lambda resumed: self._taken_stream(resumed, route), request,
                                retryable, self.settings.request_retries, counted)

    async def _taken_stream(self, request: GenerationRequest,
                            route: str) -> AsyncIterator[Chunk]:
        sent = time.perf_counter()
        response = self.stream_model.generate_stream.remote(request, route)
        taken_s, answered = await self._taken_recorded(response, route), False
        try:
            async for chunk in response:
                if chunk.first_token_s is not None:  # (the call's first chunk)
                    answered = True
                    self._record_router_wait(outside_replica_s(time.perf_counter() - sent,
                                                               chunk.first_token_s), route)
                yield chunk
        except Exception:
            if not answered:  # (failed before its first chunk: its wait up to being taken)
                self._record_router_wait(taken_s, route)
            raise

    async def _pump(self, queue: asyncio.Queue, index: int, request: GenerationRequest,
                    route: str) -> None:
        """Prompt `index`'s chunks into the response's queue, then its error if it failed,
        then None."""
        try:
            async for chunk in self._stream_one(request, route):
                await queue.put((index, chunk))
        except DeploymentUnavailableError:
            await queue.put((index, await self._unavailable_error()))
        except Exception as e:
            await queue.put((index, e))
        await queue.put((index, None))

    async def _stream_response(self, parsed: protocol.CompletionRequest,
                               requests: list[GenerationRequest], started: float,
                               route: str) -> Response:
        """The SSE response, once the first chunk is in: a request refused before it produced
        anything (over the KV cache, the replica overloaded or without a model) gets its
        status (4xx/5xx) and error body, not a 200 with an error event."""
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(self._pump(queue, i, r, route))
                 for i, r in enumerate(requests)]
        handed_over = False
        try:
            first = await queue.get()
            if isinstance(first[1], Exception):
                self._record_untaken_first_token(first[1], route, started)
                return self._error_response(first[1], route, started)
            if first[1] is not None:  # (None: a prompt that ended with no chunk at all)
                self._record_first_token(time.perf_counter() - started, route)
            handed_over = True
            version = first[1].version if first[1] is not None else ""
            return CancellingStream(self._sse(parsed, first, queue, len(tasks), started, route),
                                    tasks, media_type="text/event-stream",
                                    headers=protocol.version_headers(version))
        finally:
            if not handed_over:  # refused, or the client left while waiting
                for task in tasks:
                    task.cancel()

    async def _sse(self, parsed: protocol.CompletionRequest, first: tuple, queue: asyncio.Queue,
                   streams: int, started: float,
                   route: str = COMPLETIONS_ROUTE) -> AsyncIterator[bytes]:
        """Server-sent events: the `streams` prompts' chunks as they come (`first`, then the
        queue's; interleaved, each tagged with its index), the usage if asked for, then
        [DONE]. An error after the response has started is sent as an error event (the
        status line is already out). Chat chunks carry deltas: the role first, then the
        content (protocol.ChatReply's), then the finish_reason. (CancellingStream cancels the
        prompts' tasks.)"""
        chat = route == CHAT_ROUTE
        reply = protocol.ChatReply()
        request_id = protocol.chat_completion_id() if chat else protocol.completion_id()
        created = int(time.time())
        model, status, version, produced = self.settings.model_name, 200, "", 0
        pending = [first]

        def event(index: int, text: str, reason: str | None) -> bytes:
            if chat:
                delta = {"content": text} if text else {}
                return protocol.sse_event(protocol.chat_chunk_body(
                    request_id, model, version, created, index, delta, reason))
            return protocol.sse_event(protocol.chunk_body(
                request_id, model, version, created, index, text, reason))

        try:
            open_streams, greeted = streams, False
            while open_streams:
                index, item = pending.pop() if pending else await queue.get()
                if item is None:
                    open_streams -= 1
                elif isinstance(item, Exception):
                    error = self._as_api_error(item)
                    status = error.status
                    self._record_error(route, error)
                    yield protocol.sse_event(error.body())
                    break
                else:
                    version, produced = item.version, produced + len(item.tokens)
                    if chat and not greeted:
                        greeted = True
                        yield protocol.sse_event(protocol.chat_chunk_body(
                            request_id, model, version, created, index,
                            {"role": "assistant", "content": ""}, None))
                    text = reply.text(item.text) if chat else item.text
                    if chat and text and item.finish_reason:  # text, then the end
                        yield event(index, text, None)
                        yield event(index, "", item.finish_reason)
                    elif text or item.finish_reason:
                        yield event(index, text, item.finish_reason)
            if status == 200 and parsed.include_usage:
                usage_body = (protocol.chat_usage_chunk_body if chat
                              else protocol.usage_chunk_body)
                yield protocol.sse_event(usage_body(
                    request_id, model, version, created, sum(len(p) for p in parsed.prompts),
                    produced))
            yield protocol.SSE_DONE
        finally:
            self._record(route, status, started)

    def _as_api_error(self, e: Exception) -> APIError:
        if isinstance(e, APIError):
            return APIError(e.status, e.message, e.param, e.type, e.code)
        if isinstance(e, BackPressureError):
            return APIError(503, "the server is overloaded; retry shortly",
                            type="server_error", code="overloaded")
        if isinstance(e, ClientDisconnect):  # (left while sending its body: nobody to answer)
            return APIError(catalogue.CLIENT_CLOSED_STATUS, "the client closed the connection "
                            "before its request body was read", code="client_closed")
        if isinstance(e, RETRYABLE):
            return APIError(503, f"no model replica could serve the request "
                                 f"({type(e).__name__}); retry shortly", type="server_error",
                            code="unavailable")
        # The client gets the exception's type only: its text can be a replica's whole
        # traceback (a RayTaskError's: file paths, pid, IP); the operator's log has it all.
        log.exception("internal error", exc_info=e)
        kind = type(what_was_raised(e)).__name__
        return APIError(500, f"internal error ({kind}); the server's log holds the details",
                        type="server_error")

    def _error_response(self, e: Exception, route: str, started: float) -> JSONResponse:
        error = self._as_api_error(e)
        self._record_error(route, error)
        self._record(route, error.status, started)
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers())

    def _record_error(self, route: str, error: APIError) -> None:
        _count_error(self.deployment, route, error)

    def _record_first_token(self, seconds: float | None, route: str) -> None:
        """A request's time to its first token as its client waits for it (None: not known,
        a replica that did not say how long it held the request)."""
        record(catalogue.SERVE_INGRESS_TIME_TO_FIRST_TOKEN, seconds,
               deployment=self.deployment, route=route)

    def _record_untaken_first_token(self, error: Exception, route: str,
                                    started: float) -> None:
        """A request refused because no model replica took its call within replica_wait_s
        got no first token: its client's wait up to the 503 is recorded as its time to first
        token (a lower bound), so that ServeFirstTokenP99High sees an overload whose calls
        all time out in Serve's router, not only the requests that got through."""
        if isinstance(error, UntakenError):
            self._record_first_token(time.perf_counter() - started, route)

    def _record_router_wait(self, seconds: float | None, route: str) -> None:
        """How long a model call spent outside its model replica (None: not known): one
        answered, one no replica took (its whole wait), one that failed (up to being
        taken)."""
        record(catalogue.SERVE_ROUTER_WAIT, seconds, deployment=self.deployment, route=route)

    def _record(self, route: str, status: int, started: float) -> None:
        _count_request(self.deployment, route, status)
        record(catalogue.SERVE_REQUEST_LATENCY, time.perf_counter() - started,
               deployment=self.deployment, route=route)


# == application builder ======================================================================
def replica_resources(settings: ServeSettings) -> ReplicaResources:
    """The accelerator to ask for, from the scheduler's view of the cluster when it runs
    (agents' measured and declared accelerators, node health), else Ray's node table; when
    Ray is not connected yet (`serve run module:app` builds before connecting), this machine."""
    reports, healthy, accelerator_types = _cluster_reports()
    return recommend_replica_resources(reports, healthy, accelerator=settings.accelerator,
                                       cpus=settings.cpus_per_replica,
                                       gpus=settings.gpus_per_replica,
                                       accelerator_types=accelerator_types)


def _cluster_reports() -> tuple[list, set[str], dict[str, set[str]]]:
    """(node reports, healthy node ids, the accelerator types Ray lists per node id: none
    known before Ray is connected)."""
    if not ray.is_initialized():
        return (*_this_machine(), {})
    nodes = [n for n in ray.nodes() if n["Alive"]]
    accelerator_types = {n["NodeID"]: listed_accelerator_types(n.get("Resources") or {})
                         for n in nodes}
    reports, healthy = _scheduler_view()
    if reports:
        return reports, healthy, accelerator_types
    reports = [report_from_ray_node(n) for n in nodes]
    return reports, {r.node_id for r in reports}, accelerator_types


def _scheduler_view() -> tuple[list, set[str]]:
    """The scheduler's latest agent reports and node health; nothing when it is not running."""
    try:
        snapshot = ray.get(get_scheduler().snapshot.remote(), timeout=10)
    except Exception as e:  # no scheduler on this cluster, or it is restarting
        log.info("no scheduler view of the cluster (%s); using Ray's node table", e)
        return [], set()
    healthy = {node for node, health in snapshot["health"].items() if health == "healthy"}
    return list(snapshot["reports"].values()), healthy


def _this_machine() -> tuple[list, set[str]]:
    """This machine as a one-node cluster, its GPUs probed as a node agent probes them
    (probe_gpus): NVML waited for at most NVML_TIMEOUT_S, so a hung call (a GPU fallen off
    the bus) costs the GPUs, not the app build, which it hung."""
    from orchestrator.probes import probe_gpus
    from orchestrator.inventory import NodeReport

    # Errors collected, not raised: a lost GPU is left out, not every GPU with it.
    errors: dict[str, str] = {}
    gpus = probe_gpus({}, errors)
    for probe, problem in errors.items():  # (else replicas went to CPU without a word)
        log.warning("probing this machine's GPUs for serving: %s: %s", probe, problem)
    return [NodeReport("local", "localhost", 1, len(gpus), 1, 0.0, 0, 0, gpus)], {"local"}


def app(args: dict[str, Any] | None = None) -> serve.Application:
    """Application builder: `serve run ray_layer.serve_app:app key=value ...`, or
    `import_path: ray_layer.serve_app:app` with `args:` in serve_config.yaml. The keys
    are ServeSettings' fields; a checkpoint in them is checked here so a wrong path fails
    before anything starts."""
    settings = ServeSettings.from_args(args)
    # Pinned here, once: replicas started later (autoscaling, replacements) serve the same
    # checkpoint while training writes newer ones into the run. CheckpointError naming it.
    # None in the args: the builder cannot see a user_config (serve_config.yaml's deployment
    # options are applied after it), so the replicas pin the one named there, or the newest
    # pretrain-* run, once for this build (loading.pin_once).
    checkpoint = str(pin_checkpoint(settings.checkpoint)) if settings.checkpoint else ""
    # A run dir named: its directory, so that replicas pin the run again once training's
    # keep_checkpoints rotation deletes the checkpoint pinned here (without it, every replica
    # started after failed: "does not exist"). A checkpoint named is served only as itself.
    run = (str(Path(checkpoint).parent)
           if checkpoint and model_directories(settings.checkpoint)[1] else "")
    log.info("serving checkpoint %s", checkpoint or "named in the model's user_config (none: "
             "the newest pretrain-* run), pinned by its first replica")
    resources = replica_resources(settings)
    log.info("model replicas on %s: %s", resources.accelerator, resources.reason)
    # Also in the args: a user_config that leaves the checkpoint empty (serve_config.yaml's
    # "") means this one.
    arguments = {**dataclasses.asdict(settings), "checkpoint": checkpoint}
    build = uuid.uuid4().hex[:12]  # (Serve builds again only when the args change)
    model = GPTModel.options(
        ray_actor_options=resources.ray_actor_options,
        max_ongoing_requests=settings.replica_max_ongoing_requests,
        autoscaling_config=settings.autoscaling_config(),
        user_config={**settings.user_config(), "checkpoint": checkpoint},
        health_check_period_s=settings.health_check_period_s,
        health_check_timeout_s=settings.health_check_timeout_s,
        graceful_shutdown_timeout_s=settings.graceful_shutdown_timeout_s,
        # The ingress logs every HTTP request; a second line per request from the model hop
        # says nothing new and costs CPU on the serving path (~10-30% QPS here, measured).
        logging_config={"enable_access_log": False},
    ).bind(arguments, build, run)
    # The Ingress holds each request's connection while the model generates: stopped sooner
    # (Serve's default 20 s), it cut them on an args redeploy however long the model waited.
    return Ingress.options(num_replicas=settings.ingress_replicas,
                           graceful_shutdown_timeout_s=settings.graceful_shutdown_timeout_s
                           ).bind(model, arguments)


# == operating a running app (tests, scripts/bench_serve.py) ==================================
def deploy_config(config: dict[str, Any]) -> None:
    """Apply a Serve config - serve_config.yaml's content as a dict - the way `serve deploy`
    and `serve run <config>` do: declaratively, so changing only a deployment's user_config
    reconfigures its running replicas (hot reload) instead of replacing them. Serve has no
    public Python call for this; this is the one `serve run` itself makes."""
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    client = serve_start(http_options=schema.http_options.model_dump(),
                         proxy_location=schema.proxy_location,
                         controller_options=schema.controller_options)
    client.deploy_apps(schema)


def wait_for_app(name: str, timeout_s: float = 120.0,
                 replicas: dict[str, int] | None = None) -> Any:
    """Block until app `name` is RUNNING (and each deployment in `replicas` has exactly that
    many RUNNING replicas); the app's status. A failed deployment raises with Serve's
    message (e.g. the replica's error for a checkpoint that cannot load)."""
    deadline = time.monotonic() + timeout_s
    status = None
    while time.monotonic() < deadline:
        status = serve.status().applications.get(name)
        if status is not None and status.status == "DEPLOY_FAILED":
            raise RuntimeError(f"app {name} failed to deploy: {status.message}; "
                               + "; ".join(f"{d}: {s.message}"
                                           for d, s in status.deployments.items() if s.message))
        if status is not None and status.status == "RUNNING" and all(
                status.deployments[d].replica_states.get("RUNNING", 0) == n
                and sum(status.deployments[d].replica_states.values()) == n
                for d, n in (replicas or {}).items()):
            return status
        time.sleep(0.25)
    raise TimeoutError(f"app {name} not running as wanted within {timeout_s:.0f}s: {status}")
