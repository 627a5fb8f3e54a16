"""The model deployment of the serving app (ray_layer/serve_app.py builds the app): one
GPTModel replica holds a model, generates with a KV cache, batches requests (continuously over
a paged KV cache, or in static whole-request batches: the `batching` setting), hot reloads a
new checkpoint through its user_config, and reports its health. The decisions (engine,
batching policy, generation, loading, resources) are the pure modules of orchestrator/serving/.
"""
import asyncio
import dataclasses
import hashlib
import itertools
import json
import logging
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, AsyncIterator

import ray
import torch
from ray import serve

from orchestrator import metric_catalogue as catalogue
from orchestrator.config import ConfigError
from orchestrator.serving.engine import CapacityError, EngineLimits, check_request
from orchestrator.serving.engine_host import EngineHostHandle, engine_source
from orchestrator.serving.batching import (AdmissionGate, ArrivalRate, BatchSettings,
                                           batch_loop_problem, choose_batch_settings)
from orchestrator.serving.generation import (BatchGeneration, Chunk, GenerationRequest,
                                             GenerationResult, collect)
from orchestrator.serving.loading import (CheckpointPin, LoadedModel, forward_problem,
                                          load_for_serving, pin_once, record_refused,
                                          record_served, resolve_checkpoint,
                                          superseding_pin)
# (CHAT_ROUTE: known here too, as before it moved to protocol)
from orchestrator.serving.protocol import (CHAT_ROUTE, COMPLETIONS_ROUTE,  # noqa: F401
                                           NON_FINITE_LOGITS, APIError)
from orchestrator.serving.retries import engine_lost
from orchestrator.serving.settings import (RuntimeConfig, ServeSettings, health_probe_timeout_s,
                                           shutdown_grace_problem)
from orchestrator.training.checkpoint import CheckpointError
from ray_layer.gcs_store import GcsJsonStore
from ray_layer.telemetry import record

log = logging.getLogger("ray.serve")

# An engine not open this long after it was asked for (its model loading in the engine
# process) is taken as hung: a reload waiting for it is refused, a replica serving from it is
# unhealthy.
ENGINE_OPEN_TIMEOUT_S = 300.0
# The last runtime config a replica of each deployment applied, in the GCS key-value store:
# a refused config stays Serve's target, and a replica started after it (a replacement, an
# autoscaled one) has no old model of its own to keep serving; it serves this one instead.
LAST_GOOD_NAMESPACE = "orchestrator-serve"
# The checkpoint pins a deployment's replicas share (loading.pin_once), in the same namespace.
PINS_PREFIX = "checkpoint-pins"
# An engine process that dies (out of memory, a crash) is started again, at most this many
# times in this window; beyond that the replica stays down and its health check fails, so
# Serve replaces it.
HOST_RESTARTS, HOST_RESTART_WINDOW_S = 3, 600.0


@dataclasses.dataclass(eq=False)
class EngineRecord:
    """The replica's view of one engine in the host: its model and limits, whether it has
    opened (`ready` holds None then, or why it could not), whether it was retired (it takes
    no new requests), and what the host said about it after its latest step
    (engine_host.engine_snapshot)."""

    id: int
    loaded: LoadedModel
    limits: EngineLimits
    ready: asyncio.Future
    asked_at: float = dataclasses.field(default_factory=time.monotonic)
    retired: bool = False
    snapshot: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def opened(self) -> bool:
        return self.ready.done() and self.ready.result() is None


class GcsPinStore:
    """loading.PinStore in the GCS key-value store: each key a JSON document under `prefix`."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def _at(self, key: str) -> GcsJsonStore:
        return GcsJsonStore(f"{self.prefix}/{key}", LAST_GOOD_NAMESPACE)

    def get(self, key: str) -> Any:
        return self._at(key).load()

    def put(self, key: str, value: Any) -> None:
        self._at(key).save(value)

    def put_if_absent(self, key: str, value: Any) -> Any:
        from ray.experimental.internal_kv import _internal_kv_put

        at = self._at(key)
        _internal_kv_put(at.key, json.dumps(value).encode(), overwrite=False,
                         namespace=at.namespace)
        return at.load()


def generation_failed(message: str, code: str | None = None) -> APIError:
    """The 500 of a request whose engine failed (a step raised, or it never opened), or that
    its engine ended alone (`code`: NON_FINITE_LOGITS)."""
    return APIError(500, message if message.startswith("generation failed")
                    else f"generation failed: {message}", type="server_error", code=code)


def request_failed(chunk: Chunk, version: str) -> APIError:
    """The error of a request whose row its engine ended (Chunk.error: its logits went NaN
    or infinite), its other rows decoding on: a 500 the ingress does not resend (the same
    model fails it the same way), logged once with the model version and the request id."""
    log.error("model %s: request %s failed: %s", version, serve_request_id(), chunk.error)
    return generation_failed(chunk.error, NON_FINITE_LOGITS)


def serve_request_id() -> str:
    """Serve's id of the request being served (the x-request-id header of its answer; the
    ingress's call to the model replica carries it), or "-" outside one."""
    from ray.serve.context import _get_serve_request_context  # (no public accessor in 2.60)

    return _get_serve_request_context().request_id or "-"


# (graceful_shutdown_timeout_s: the setting, which serve_app.app gives the deployment)
@serve.deployment(name="GPTModel", graceful_shutdown_wait_loop_s=0.5)
class GPTModel:
    """The model replica deployment: holds one loaded model, batches requests dynamically and
    generates with a KV cache; reloads on a new checkpoint and reports its health to Serve."""

    def __init__(self, settings: dict[str, Any], build: str = "", run: str = "") -> None:
        """`build`: the app build this replica belongs to (serve_app.app names each): its
        checkpoint pins are that build's, so an app deployed afresh resolves its run dirs
        afresh. `run`: the run dir the app's args named, which the builder pinned to the
        settings' checkpoint ("" when they named none, or a checkpoint)."""
        self.settings = ServeSettings.from_args(settings)
        self.build, self.run = build, run
        torch.set_num_threads(self.settings.torch_threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.deployment = serve.get_replica_context().deployment
        self.loaded: LoadedModel | None = None
        self.pin: CheckpointPin | None = None  # the pin `loaded` was loaded for
        self.runtime: RuntimeConfig | None = None
        # The checkpoint of the config Serve gave last, applied or refused (None: none that
        # parsed yet): a config naming another is a reload here too, as on the replicas that
        # applied the one refused here.
        self.given_checkpoint: str | None = None
        self.reload_error: dict[str, Any] | None = None
        self.last_good: GcsJsonStore | None = None  # made at the first config applied
        self.bounds = RuntimeConfig.from_user_config(None, self.settings).bounds
        self.batch_settings: BatchSettings | None = None
        # Static batching decodes on one thread of its own: the event loop stays free to take
        # requests (so batches fill while one runs) and to answer health checks.
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="generate")
        self.arrivals = ArrivalRate(window_s=1.0)
        self.queued: set[int] = set()  # requests whose batch has not started (by id)
        self.gate = AdmissionGate(self.settings.max_batch_size,
                                  self.settings.max_concurrent_batches)
        self.running: set[int] = set()  # requests in running batches (by id)
        self.abandoned: set[int] = set()  # of those, requests whose client left
        self.static_cancelled = 0
        self.last_progress = time.monotonic()
        self.batch_loop_started = False
        self.stats: Counter = Counter()
        self.batch_sizes: Counter = Counter()
        # Continuous batching's tokens/s gauge: (start of the window, tokens produced in it).
        self.decode_window: tuple[float, int] = (time.monotonic(), 0)
        self.wedged = threading.Event()  # fault injection: the generation thread stops
        # Continuous batching: the engines run in an engine host (engine_host.py: a process
        # of their own by default, setting engine_process), started at the first use. The
        # engine of the model and cache served now takes new requests; an older one, of the
        # model before a reload or the cache before a resize, is retired: it finishes its
        # rows and closes. Each request's chunks reach it through its queue, keyed by an int
        # that travels to the host and back.
        self.host: EngineHostHandle | None = None
        self.host_deaths: list[float] = []  # monotonic times, within HOST_RESTART_WINDOW_S
        self.engines: list[EngineRecord] = []
        self.serving_engine: EngineRecord | None = None  # where new requests go
        self.engine_problem: str | None = None  # the serving engine could not open: why
        self.engine_ids = itertools.count()
        self.keys = itertools.count()
        self.streams: dict[int, tuple[asyncio.Queue, EngineRecord]] = {}
        self.probes: dict[int, asyncio.Future] = {}  # the engine host's, by key
        # The health checks' probe of the model, until a check has its answer: a check that
        # gave up on it leaves it to the next, which waits for it rather than queueing
        # another behind it on the generation thread.
        self.health_probe: asyncio.Future | None = None
        self.batch = serve.batch(max_batch_size=self.settings.max_batch_size,
                                 batch_wait_timeout_s=self.settings.max_batch_wait_ms / 1000,
                                 max_concurrent_batches=self.settings.max_concurrent_batches
                                 )(self._run_batch)

    # -- hot reload -------------------------------------------------------------------------
    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply a runtime config: load the checkpoint it names (off the event loop, while the
        current model keeps serving), then swap. A bad config never takes a serving replica
        down: it is refused, logged and reported, and the previous model keeps serving. At
        start-up (nothing serving yet) the config the deployment's replicas last applied is
        served instead, the refusal reported as for a serving replica (a replica replacing
        one that died after a refused reload failed to start, and so did every later one:
        the app went down); with none, it fails the replica with the message."""
        if self.loaded is not None:
            return await self._apply(user_config)
        try:
            await self._apply(user_config)
        except RuntimeError as refused:
            given = self.given_checkpoint  # the refused config's, as Serve sees this replica
            fallback = await asyncio.get_running_loop().run_in_executor(
                None, self._last_good_config)
            if fallback is None or fallback == user_config:
                raise
            await self._apply(fallback)  # (raises in turn if that one no longer loads)
            self.given_checkpoint = given if given is not None else self.given_checkpoint
            self._refuse_update(str(refused))

    async def _apply(self, user_config: dict[str, Any]) -> None:
        started = time.perf_counter()
        try:
            runtime = RuntimeConfig.from_user_config(user_config, self.settings)
        except ConfigError as e:
            return self._refuse_update(str(e))
        loaded, pin = self.loaded, self.pin
        requested = runtime.checkpoint or self.settings.checkpoint
        # A config naming the checkpoint served here is still a reload when the one Serve
        # gave before, refused here, named another (a revert): the replicas that applied that
        # one pin `requested` afresh, and this one joins them whichever Serve updates first
        # (waiting for their pin instead, a replica updated before them kept its old model).
        given, self.given_checkpoint = self.given_checkpoint, runtime.checkpoint
        if (loaded is None or runtime.checkpoint != self.runtime.checkpoint
                or runtime.checkpoint != given or await self._pin_superseded()):
            try:
                loaded, pin = await asyncio.get_running_loop().run_in_executor(
                    None, self._load_pinned, requested)
            except Exception as e:  # a missing, corrupt or foreign checkpoint: any error
                named = repr(requested) if requested else "(none named)"
                return self._refuse_update(f"checkpoint {named} cannot be served: "
                                           f"{type(e).__name__}: {e}")
        engine = None
        if runtime.batching == "continuous":  # open before taking requests, refuse if not
            engine, problem = await self._engine_ready(loaded, runtime)
            if problem is not None:
                return self._refuse_update(f"continuous batching cannot serve checkpoint "
                                           f"{loaded.path!r} with this config: {problem}")
        swapped, repinned = loaded is not self.loaded, pin != self.pin
        if swapped:
            self._swap(loaded, time.perf_counter() - started)
        self.pin = pin
        self.runtime, self.bounds, self.reload_error = runtime, runtime.bounds, None
        self.serving_engine, self.engine_problem = engine, None
        self._adapt_batching(time.monotonic())  # the new bounds apply from now
        self._retire_engines(keep=engine)  # (static batching: every engine goes)
        # GCS writes, off the event loop (on it, a slow GCS stalled the streaming requests);
        # awaited: this replica's records keep the order of its reloads.
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._remember_good_config, user_config)
        if repinned:
            await loop.run_in_executor(None, self._record_pin, pin)

    def _load_pinned(self, requested: str) -> tuple[LoadedModel, CheckpointPin]:
        """The model of the checkpoint a config names ("" = the newest pretrain-* run), from
        the directory the deployment pinned for it (loading.pin_once). Without the pin store
        (outside a Serve replica, or without Ray) this replica resolves it alone."""
        try:
            pin = pin_once(self._pin_store(), requested, self.pin, self._resolve)
        except CheckpointError:
            raise
        except Exception as e:  # the store, not the checkpoint
            log.warning("could not share the checkpoint pin (%s): this replica resolves %r "
                        "alone", e, requested)
            pin = CheckpointPin(requested, str(self._resolve(requested)), 0)
        served = self.pin
        if self.loaded is not None and served is not None and (
                (pin.requested, pin.directory) == (served.requested, served.directory)):
            return self.loaded, pin  # (a revert pinned what this replica serves: no 2nd copy)
        try:
            loaded = load_for_serving(pin.directory, self.device)
        except CheckpointError:  # the checkpoint's own fault (corrupt, diverged): any replica's
            self._record_pin(pin, record_refused)
            raise
        # (Anything else, out of memory on this replica's GPU above all, is this replica's
        # alone: recorded as refused, it had the next replica to start resolve the run dir
        # afresh while the others still loaded this pin, and replicas served two checkpoints.)
        loaded.requested = requested or loaded.requested  # (/v1/models: what was named)
        return loaded, pin

    def _resolve(self, requested: str) -> Path:
        """loading.resolve_checkpoint, told the run dir the app's args named where `requested`
        is the checkpoint the app pinned from it."""
        return resolve_checkpoint(requested,
                                  self.run if requested == self.settings.checkpoint else "")

    async def _pin_superseded(self) -> bool:
        """Whether the deployment pinned the checkpoint this replica's config names anew since
        this replica loaded it (loading.superseding_pin): the config unchanged, it is loaded
        all the same, so that every replica serves one checkpoint."""
        if self.pin is None or not self.pin.generation:  # resolved alone: nothing shared
            return False
        try:
            newer = await asyncio.get_running_loop().run_in_executor(
                None, superseding_pin, self._pin_store(), self.pin)
        except Exception as e:  # the store: this replica keeps what it serves
            log.warning("could not read the checkpoint pinned for %r (%s): this replica keeps "
                        "serving %s", self.pin.requested, e, self.pin.directory)
            return False
        return newer is not None

    def _pin_store(self) -> GcsPinStore:
        return GcsPinStore(f"{PINS_PREFIX}/{self._deployment_key()}/{self.build}")

    def _record_pin(self, pin: CheckpointPin, record=record_served) -> None:
        """`record` (loading.record_served or record_refused) of a shared pin. Synchronous
        GCS calls: run off the event loop (a slow GCS stalled every request meanwhile)."""
        if not pin.generation:  # resolved alone: nothing to share
            return
        try:
            record(self._pin_store(), pin)
        except Exception as e:  # only later replicas' agreement is lost, never the reload
            log.warning("could not record whether the checkpoint pinned for %r loaded (%s)",
                        pin.requested, e)

    def _deployment_key(self) -> str:
        """This deployment, as built with these settings: an app deployed afresh with other
        settings never takes an earlier app's records."""
        built = hashlib.sha256(json.dumps(dataclasses.asdict(self.settings), sort_keys=True,
                                          default=str).encode()).hexdigest()[:16]
        return f"{serve.get_replica_context().app_name}/{self.deployment}/{built}"

    def _deployment_option(self, name: str) -> Any:
        """An option of this deployment as Serve applies it: a config file's deployment
        options override what the app's settings gave it (the settings' value outside
        Serve; the replica context's config is private, pinned Ray)."""
        config = getattr(serve.get_replica_context(), "_deployment_config", None)
        return getattr(config, name, getattr(self.settings, name))

    def _last_good_store(self) -> GcsJsonStore:
        """Where this deployment records the config applied."""
        return GcsJsonStore(f"last-good-config/{self._deployment_key()}", LAST_GOOD_NAMESPACE)

    def _remember_good_config(self, user_config: dict[str, Any] | None) -> None:
        """Record the config applied (a synchronous GCS put: run off the event loop)."""
        try:  # (the store too: outside a Serve replica, or without Ray, there is none)
            self.last_good = self.last_good or self._last_good_store()
            self.last_good.save(user_config)
        except Exception as e:  # only the fallback is lost, never the reload
            log.warning("could not record the config applied (%s): a replica started after a "
                        "refused reload will fail to start", e)

    def _last_good_config(self) -> dict[str, Any] | None:
        try:
            return (self.last_good or self._last_good_store()).load()
        except Exception as e:
            log.warning("could not read the config last applied: %s", e)
            return None

    def _swap(self, loaded: LoadedModel, switch_s: float) -> None:
        previous, self.loaded = self.loaded, loaded  # batches running keep their own model
        if previous is not None:
            record(catalogue.SERVE_MODEL_VERSION, 0, deployment=self.deployment,
                   version=previous.version)
        record(catalogue.SERVE_MODEL_VERSION, 1, deployment=self.deployment,
               version=loaded.version)
        self.stats["switch_ms"] = round(switch_s * 1000)
        for warning in loaded.warnings:
            log.warning("checkpoint %s: %s", loaded.requested, warning)
        grace = shutdown_grace_problem(loaded.block_size,
                                       self._deployment_option("graceful_shutdown_timeout_s"))
        if grace:
            log.warning("checkpoint %s: %s", loaded.requested, grace)
        log.info("serving %s (%s, %d params) from %s; %s took %.2fs", loaded.version,
                 loaded.format, loaded.params, loaded.path,
                 "switch" if previous else "load", switch_s)

    def _refuse_update(self, message: str) -> None:
        if self.loaded is None:
            raise RuntimeError(message)
        self.reload_error = {"message": message, "at": time.time(),
                             "still_serving": self.loaded.version}
        record(catalogue.SERVE_ERRORS, 1, deployment=self.deployment, route="reconfigure",
               kind="bad_config")
        log.error("config update refused, still serving %s: %s", self.loaded.version, message)

    # -- generation ---------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest,
                       route: str = COMPLETIONS_ROUTE) -> GenerationResult:
        """The whole answer, with how long this replica held the request: the ingress takes
        it from its own wait to tell the wait outside this replica (generation.py)."""
        arrived = time.perf_counter()
        chunks = [chunk async for chunk in self.generate_stream(request, route)]
        return collect(chunks, held_s=time.perf_counter() - arrived)

    async def generate_stream(self, request: GenerationRequest,
                              route: str = COMPLETIONS_ROUTE) -> AsyncIterator[Chunk]:
        """`route`: the API route the request came by, the label of its latency metrics."""
        stream = (self._continuous_stream if self.runtime is None
                  or self.runtime.batching == "continuous" else self._static_stream)
        async for chunk in stream(request, route):
            yield chunk

    # -- continuous batching ------------------------------------------------------------------
    async def _continuous_stream(self, request: GenerationRequest,
                                 route: str) -> AsyncIterator[Chunk]:
        """Queue the request in the current engine and yield its chunks as steps produce
        them. Leaving early (the client went away: Serve cancels this generator) cancels it
        in the engine, which frees its row and blocks before the next step."""
        arrived = time.perf_counter()
        engine = self._current_engine()
        try:
            check_request(request, engine.loaded.block_size, engine.limits,
                          engine.loaded.model.config.vocab_size)
        except CapacityError as e:
            raise APIError(400, str(e), e.param, code=e.code) from None
        key, queue = next(self.keys), asyncio.Queue()
        if not self.streams:
            self.last_progress = time.monotonic()  # an idle engine was not stalled
        self.streams[key] = (queue, engine)
        self.host.send(("add", engine.id, key, request, time.monotonic()))
        self.stats["requests"] += 1
        finished, produced, first_at = False, 0, None
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.error is not None:  # its row left the engine: nothing to cancel
                    self.streams.pop(key, None)
                    raise request_failed(item, engine.loaded.version)
                first_token_s = None
                if first_at is None:
                    first_at = time.perf_counter()
                    first_token_s = self._record_first_token(first_at - arrived, route)
                produced += len(item.tokens)
                finished = item.finish_reason is not None
                yield dataclasses.replace(item, version=engine.loaded.version,
                                          first_token_s=first_token_s)
        finally:
            if self.streams.pop(key, None) is not None and not finished:
                self.host.send(("cancel", engine.id, key))
            elif finished and produced > 1:
                self._record_tpot((time.perf_counter() - first_at) / (produced - 1), route)

    def _current_engine(self) -> EngineRecord:
        """The engine of the model served now, with the cache the settings ask for. Opened
        by reconfigure; opened again here (its requests wait for it) only after it failed."""
        loaded = self.loaded
        if loaded is None:
            raise APIError(503, "no model is loaded yet", type="server_error")
        self.serving_engine = self._engine_for(loaded, self.runtime)
        return self.serving_engine

    def _engine_for(self, loaded: LoadedModel, runtime: RuntimeConfig | None) -> EngineRecord:
        """The engine not retired for this model and the cache `runtime` asks for, opened
        now when there is none."""
        host = self._engine_host()
        limits = self._engine_limits(loaded, runtime)
        for engine in reversed(self.engines):
            if not engine.retired and engine.loaded is loaded and engine.limits == limits:
                return engine
        engine = EngineRecord(next(self.engine_ids), loaded, limits,
                              asyncio.get_running_loop().create_future())
        self.engines.append(engine)  # first: if the send finds the host gone, it is ended too
        host.send(("open", engine.id, engine_source(loaded, host.process_host), limits))
        if not host.alive:  # (it was ended with the host, and a fresh host may be opening it)
            raise engine_lost(f"continuous batching is down: {host.problem}")
        return engine

    async def _engine_ready(self, loaded: LoadedModel, runtime: RuntimeConfig
                            ) -> tuple[EngineRecord | None, str | None]:
        """The engine for this model and config, once open (the host loads its model while
        the current one keeps serving); or why it cannot open."""
        try:
            engine = self._engine_for(loaded, runtime)
        except APIError as e:  # the host is gone
            return None, e.message
        waited = time.monotonic() - engine.asked_at
        try:
            return engine, await asyncio.wait_for(asyncio.shield(engine.ready),
                                                  max(ENGINE_OPEN_TIMEOUT_S - waited, 0))
        except asyncio.TimeoutError:
            if engine is not self.serving_engine:  # should it open after all: it closes
                self._retire(engine)
            return engine, (f"the engine process did not load the model within "
                            f"{ENGINE_OPEN_TIMEOUT_S:g}s")

    def _retire_engines(self, keep: EngineRecord | None) -> None:
        """Every engine but `keep` takes no new requests: each closes once its rows finish."""
        for engine in self.engines:
            if engine is not keep:
                self._retire(engine)

    def _retire(self, engine: EngineRecord) -> None:
        if not engine.retired:
            engine.retired = True
            self.host.send(("retire", engine.id))

    def _engine_host(self) -> EngineHostHandle:
        if self.host is None:
            self.host = EngineHostHandle(self.settings.engine_process, str(self.device),
                                         self.settings.torch_threads, self._on_host_events,
                                         asyncio.get_running_loop())
        if not self.host.alive:  # not restarted (it died too often): another replica may serve
            raise engine_lost(f"continuous batching is down: {self.host.problem}")
        return self.host

    def _engine_limits(self, loaded: LoadedModel,
                       runtime: RuntimeConfig | None = None) -> EngineLimits:
        runtime = runtime or self.runtime
        rows = runtime.max_batch_size if runtime else self.settings.max_batch_size
        cache = runtime.kv_cache_tokens if runtime else self.settings.kv_cache_tokens
        return EngineLimits.sized_for(rows, loaded.block_size, self.settings.kv_block_tokens,
                                      self.settings.prefill_chunk_tokens, cache)

    def _on_host_events(self, events: list[tuple]) -> None:
        """The host's events (engine_host.py's list), on the event loop: chunks to their
        requests, figures to the metrics, failures to the requests they end."""
        for event in events:
            kind = event[0]
            if kind == "step":
                self._on_step(*event[1:])
            elif kind == "probe":
                future = self.probes.pop(event[1], None)
                if future is not None and not future.done():
                    future.set_result(event[2])
            elif kind == "opened":
                self._on_opened(event[1], event[2])
            elif kind == "failed":
                self._end_engine(event[1], event[2], held=event[3])
            elif kind == "open_failed":
                self._end_engine(event[1], event[2])
            elif kind == "gone":
                self._on_gone(event[1], event[2])
            elif kind == "rejected":
                stream = self.streams.get(event[2])
                if stream is not None:
                    stream[0].put_nowait(APIError(400, event[3], event[4], code=event[5]))
            elif kind == "closed":
                self.engines = [e for e in self.engines if e.id != event[1]]
            elif kind == "host_died":
                self._on_host_died(event[1])

    def _on_host_died(self, message: str) -> None:
        """The engine host is gone: its requests get a retryable error (the ingress sends
        them again, a stream continuing after what it delivered), and a fresh host opens the
        served model's engine again, unless hosts died too often here lately."""
        now = time.monotonic()
        self.host_deaths = [t for t in self.host_deaths if now - t < HOST_RESTART_WINDOW_S]
        self.host_deaths.append(now)
        self._end_engine(None, message)
        for probe in self.probes.values():  # (never answered now: a check waits on them)
            if not probe.done():
                probe.set_result(f"continuous batching's engine process died: {message}")
        if len(self.host_deaths) > HOST_RESTARTS:
            log.error("continuous batching is down: %s (the engine process died %d times in "
                      "%gs: not restarted)", message, len(self.host_deaths),
                      HOST_RESTART_WINDOW_S)
            return
        log.error("%s; starting it again (%d of %d restarts in %gs)", message,
                  len(self.host_deaths), HOST_RESTARTS, HOST_RESTART_WINDOW_S)
        self.stats["engine_restarts"] += 1
        dead = self.host
        if dead is not None:
            dead.close()  # its socket; the process is gone already (killed if it lingered)
        try:
            self.host = None
            self.engine_problem = None  # the fresh host opens the engine again
            if self.loaded is not None and self.runtime is not None \
                    and self.runtime.batching == "continuous":
                self.serving_engine = self._engine_for(self.loaded, self.runtime)
        except Exception as e:  # (this may run inside a send to the dead host: never raise)
            log.error("the engine process could not be started again: %s: %s",
                      type(e).__name__, e)
            if self.host is None:  # it did not start: the dead one stays, and health fails
                self.host = dead

    def _on_opened(self, engine_id: int, version: str) -> None:
        engine = self._engine(engine_id)
        if engine is None:
            return
        if version != engine.loaded.version:
            keys = [k for k, (_, e) in self.streams.items() if e is engine]
            self._end_engine(engine_id, f"the engine process loaded {version}, not "
                                        f"{engine.loaded.version}: the checkpoint changed "
                                        f"on disk")
            for key in keys:  # nobody waits for them any more: the process drops them
                self.host.send(("cancel", engine_id, key))
            self._retire(engine)
            return
        if not engine.ready.done():
            engine.ready.set_result(None)
        if engine is self.serving_engine:
            self.engine_problem = None
        self.last_progress = time.monotonic()  # its requests waited for a load, not a stall

    def _on_step(self, engine_id: int, chunks: list, waits: list[float],
                 snapshot: dict[str, int]) -> None:
        self.last_progress = time.monotonic()
        engine = self._engine(engine_id)
        if engine is not None:
            engine.snapshot = snapshot
        for key, chunk in chunks:
            stream = self.streams.get(key)
            if stream is not None:
                stream[0].put_nowait(chunk)
        for waited in waits:
            record(catalogue.SERVE_QUEUE_TIME, waited, deployment=self.deployment)
        produced = sum(len(chunk.tokens) for _, chunk in chunks)
        if produced:  # a decoding step is continuous batching's "batch"
            self.batch_sizes[len(chunks)] += 1
            self.stats["batches"] += 1
            self.stats["most_held"] = max(self.stats["most_held"],
                                          snapshot["running"] + snapshot["waiting"])
            record(catalogue.SERVE_GENERATED_TOKENS, produced, deployment=self.deployment)
            self._record_step(len(chunks), snapshot["waiting"], produced)

    def _engine(self, engine_id: int) -> EngineRecord | None:
        return next((e for e in self.engines if e.id == engine_id), None)

    def _end_engine(self, engine_id: int | None, message: str,
                    held: set | None = None) -> None:
        """An engine that failed or never opened (None: every engine, the host is gone):
        the requests it holds get the error (`held`: the keys a failed step took with it;
        the engine's other requests crossed the failure and are answered "gone", _on_gone;
        one that never opened: _open_failure), and the next request opens a fresh one. An
        engine serving now that could not open makes the replica unhealthy (check_health): a
        fresh replica may load where this one cannot."""
        ended = [e for e in self.engines if engine_id is None or e.id == engine_id]
        keys = [key for key, (_, engine) in self.streams.items()
                if (engine_id is None or engine.id == engine_id)
                and (held is None or key in held)]
        if not ended and not keys:
            return  # already ended (a late answer to a request sent before it was)
        log.error("continuous batching engine %s failed: %s",
                  "*" if engine_id is None else engine_id, message)
        error = (engine_lost(message) if engine_id is None  # the host died: retryable
                 else self._open_failure(ended[0], message)
                 if ended and not ended[0].ready.done()
                 else generation_failed(message))
        for key in keys:  # popped: the stream's end sends no cancel for them
            self.streams.pop(key)[0].put_nowait(error)
        for engine in ended:
            if not engine.ready.done():
                engine.ready.set_result(message)
                if engine is self.serving_engine:
                    self.engine_problem = message
        self.engines = [e for e in self.engines if e not in ended]

    def _on_gone(self, engine_id: int, key: int) -> None:
        """A request sent to an engine that had already failed (the host's failure and the
        request crossed): it never ran, so it is retryable when the engine had opened (the
        resend opens a fresh one); an engine that never opened fails it as it did its other
        requests (_open_failure)."""
        stream = self.streams.pop(key, None)
        if stream is None:
            return
        queue, engine = stream
        why = engine.ready.result() if engine.ready.done() else None
        queue.put_nowait(
            engine_lost(f"engine {engine_id} failed before the request started")
            if why is None else self._open_failure(engine, why))

    def _open_failure(self, engine: EngineRecord, why: str) -> APIError:
        """The error of the requests of an engine that could not open. The model this
        replica serves is opened again from disk after its engine process died or a step
        failed, and its checkpoint may be gone by then (training prunes older ones, as
        keep_checkpoints says): this replica cannot serve it any more (its health check fails,
        and Serve replaces it) but another replica can, so they are resent (retryable 503).
        Any other model's: why, as a 500."""
        if engine.loaded is not None and engine.loaded is self.loaded:
            return engine_lost(f"this replica cannot open the model it serves in its engine "
                               f"again ({why})")
        return generation_failed(why)

    def _record_first_token(self, seconds: float, route: str) -> float:
        """Record the time to a request's first token here; returned for its first chunk
        (Chunk.first_token_s), which tells the ingress how much of its own wait was ours."""
        record(catalogue.SERVE_TIME_TO_FIRST_TOKEN, seconds, deployment=self.deployment,
               route=route)
        return seconds

    def _record_tpot(self, seconds: float, route: str) -> None:
        record(catalogue.SERVE_TIME_PER_OUTPUT_TOKEN, seconds, deployment=self.deployment,
               route=route)

    # -- static batching ----------------------------------------------------------------------
    async def _static_stream(self, request: GenerationRequest,
                             route: str) -> AsyncIterator[Chunk]:
        arrived = time.perf_counter()
        self._admit(request)
        finished, first_at, produced = False, None, 0
        try:
            await self.gate.enter(id(request))
            async for chunk in self.batch(request):
                if chunk.error is not None:  # its row left the batch
                    finished = True
                    raise request_failed(chunk, chunk.version)
                if first_at is None:
                    first_at = time.perf_counter()
                    chunk = dataclasses.replace(chunk, first_token_s=self._record_first_token(
                        first_at - arrived, route))
                finished = chunk.finish_reason is not None
                produced += len(chunk.tokens)
                yield chunk
        finally:  # cancelled before its batch started: it no longer waits
            self.queued.discard(id(request))
            self.gate.leave(id(request))
            if not finished and id(request) in self.running:
                self.abandoned.add(id(request))  # its row stops before the batch's next step
        if finished and produced > 1:
            self._record_tpot((time.perf_counter() - first_at) / (produced - 1), route)
        if not finished:  # the batch's model could not hold it (reloaded meanwhile)
            unfit = request.unfit_for(self.loaded.block_size,
                                      self.loaded.model.config.vocab_size)
            raise APIError(400, "the request no longer fits the model version now served "
                                "(a reload changed its context or vocabulary): retry, shorter "
                                "if the context shrank", unfit[1] if unfit else "max_tokens",
                           code=unfit[2] if unfit else None)

    def _admit(self, request: GenerationRequest) -> None:
        loaded = self.loaded
        if loaded is None:
            raise APIError(503, "no model is loaded yet", type="server_error")
        unfit = request.unfit_for(loaded.block_size, loaded.model.config.vocab_size)
        if unfit:
            why, param, code = unfit
            raise APIError(400, why, param, code=code)
        now = time.monotonic()
        if not self.queued and not self.running:
            self.last_progress = now  # an idle loop was not stalled
        self.arrivals.observe(now)
        self.queued.add(id(request))
        self.stats["most_held"] = max(self.stats["most_held"],
                                      len(self.queued) + len(self.running))
        self.batch_loop_started = True
        self._adapt_batching(now)

    def _adapt_batching(self, now: float) -> None:
        chosen = choose_batch_settings(len(self.queued), self.arrivals.rate(now), self.bounds)
        if chosen != self.batch_settings:
            self.batch.set_max_batch_size(chosen.max_batch_size)
            self.gate.set_max_batch_size(chosen.max_batch_size)
            self.batch.set_batch_wait_timeout_s(chosen.wait_timeout_s)
            self.batch_settings = chosen

    async def _run_batch(self, requests: list[GenerationRequest]):
        """@serve.batch handler (an async generator): one list per decoding step, a chunk or
        StopIteration (that request is complete) per request."""
        loaded = self.loaded  # a reload during this batch does not change its model
        self.queued.difference_update(map(id, requests))
        self.gate.batch_started(list(map(id, requests)))
        self.running.update(map(id, requests))
        self._record_batch(len(requests))
        started, produced = time.perf_counter(), 0
        fits = [r.unfit_for(loaded.block_size, loaded.model.config.vocab_size) is None
                for r in requests]
        runnable = [i for i, ok in enumerate(fits) if ok]
        done = [not ok for ok in fits]  # unfit: ended at once (generate_stream explains)
        try:
            generation = (BatchGeneration(loaded.model, [requests[i] for i in runnable],
                                          loaded.block_size, loaded.tokenizer)
                      if runnable else None)
            loop = asyncio.get_running_loop()
            while generation is not None and not generation.done:
                self._drop_abandoned(requests, runnable, generation, done)
                if generation.done:
                    break
                chunks = await loop.run_in_executor(self.executor, self._step, generation)
                self.last_progress = time.monotonic()
                step: list[Any] = [StopIteration] * len(requests)
                for i, chunk in zip(runnable, chunks):
                    if done[i] or chunk is None:
                        continue
                    produced += len(chunk.tokens)
                    step[i] = dataclasses.replace(chunk, version=loaded.version)
                    done[i] = chunk.finish_reason is not None
                yield step
        finally:
            self.running.difference_update(map(id, requests))
            self.abandoned.difference_update(map(id, requests))
            self.gate.batch_finished()
            elapsed = time.perf_counter() - started
            record(catalogue.SERVE_GENERATED_TOKENS, produced, deployment=self.deployment)
            if elapsed > 0 and produced:
                record(catalogue.SERVE_TOKENS_PER_SECOND, produced / elapsed,
                       deployment=self.deployment)

    def _drop_abandoned(self, requests: list[GenerationRequest], runnable: list[int],
                        generation: BatchGeneration, done: list[bool]) -> None:
        """Rows whose client disconnected leave the batch instead of decoding to the end."""
        if not self.abandoned:
            return
        for row, i in enumerate(runnable):
            if not done[i] and id(requests[i]) in self.abandoned:
                generation.cancel(row)
                done[i] = True
                self.static_cancelled += 1

    def _step(self, generation: BatchGeneration) -> list[Chunk | None]:
        if self.wedged.is_set():
            threading.Event().wait()  # fault injection: this thread never comes back
        return generation.step()

    def _record_batch(self, size: int) -> None:
        self.stats["batches"] += 1
        self.stats["requests"] += size
        self.batch_sizes[size] += 1
        self._record_batch_metrics(size, len(self.queued))

    def _record_batch_metrics(self, size: int, waiting: int) -> None:
        """A batch (static) or a decoding step (continuous): its size and what waits."""
        record(catalogue.SERVE_BATCH_SIZE, size, deployment=self.deployment)
        record(catalogue.SERVE_BATCHED_REQUESTS, size, deployment=self.deployment)
        record(catalogue.SERVE_QUEUE_DEPTH, waiting, deployment=self.deployment)

    def _record_step(self, rows: int, waiting: int, produced: int) -> None:
        """Continuous batching's step metrics; tokens/s over windows of >= 1 s of steps (one
        step's rate would swing with each step's length)."""
        self._record_batch_metrics(rows, waiting)
        now = time.monotonic()
        began, tokens = self.decode_window
        if now - began > 5.0:  # idle before this step: a window starts here
            began, tokens = now, 0
        tokens += produced
        if now - began >= 1.0:
            record(catalogue.SERVE_TOKENS_PER_SECOND, tokens / (now - began),
                   deployment=self.deployment)
            began, tokens = now, 0
        self.decode_window = (began, tokens)

    # -- introspection and health --------------------------------------------------------------
    def model_info(self) -> dict[str, Any]:
        """The loaded model (/v1/models), with its tokenizer, the token ids its embedding
        reads, how this replica batches and, with continuous batching, its KV cache's
        capacity in tokens (None under static batching)."""
        loaded = self.loaded
        if loaded is None:
            raise APIError(503, "no model is loaded yet", type="server_error")
        continuous = self.runtime is not None and self.runtime.batching == "continuous"
        limits = self._engine_limits(loaded) if continuous else None
        model_ids = int(getattr(getattr(loaded.model, "config", None), "vocab_size",
                                loaded.tokenizer.vocab_size))
        return {**loaded.info(), "tokenizer": loaded.tokenizer.name,
                "tokenizer_sha256": loaded.tokenizer.sha256,
                "token_ids": min(model_ids, loaded.tokenizer.vocab_size),
                "batching": self.runtime.batching if self.runtime else None,
                # (static batching has no paged cache: no figure, rather than one that
                # holds no request to anything)
                "kv_cache_tokens": (limits.num_blocks * limits.block_tokens if limits
                                    else None),
                "reload_error": self.reload_error}

    def tokenizer(self) -> Any:
        """The served model's tokenizer (the ingress encodes prompts with it)."""
        if self.loaded is None:
            raise APIError(503, "no model is loaded yet", type="server_error")
        return self.loaded.tokenizer

    def replica_stats(self) -> dict[str, Any]:
        """This replica's batching figures (the /health route shows one replica's). With
        continuous batching a batch is one decoding step, and its size the rows that
        produced a token in it. Ray 2.60 runs a replica's plain methods on a thread pool,
        beside the loop that changes what they read: collections are copied in one step
        (C-level, under the GIL) before they are looped over (iterated live, /health
        answered 503 "dictionary changed size during iteration" from a busy replica)."""
        settings = self.batch_settings
        batch_sizes = dict(self.batch_sizes)
        waiting, rows = self._continuous_load()
        engines = [{"version": engine.loaded.version, "waiting": 0, "running": 0,
                    "kv_blocks_free": engine.limits.num_blocks, "steps": 0,
                    "prefill_tokens": 0, "decode_tokens": 0, "cancelled": 0,
                    **engine.snapshot, "kv_blocks": engine.limits.num_blocks,
                    "kv_block_tokens": engine.limits.block_tokens,
                    "max_rows": engine.limits.max_rows} for engine in tuple(self.engines)]
        return {"replica": serve.get_replica_context().replica_id.unique_id,
                "node_id": ray.get_runtime_context().get_node_id(),
                "version": self.loaded.version if self.loaded else None,
                "batching": self.runtime.batching if self.runtime else None,
                "batches": self.stats["batches"], "requests": self.stats["requests"],
                "largest_batch": max(batch_sizes, default=0),
                "batch_sizes": {str(k): v for k, v in sorted(batch_sizes.items())},
                "max_batch_size_now": settings.max_batch_size if settings else None,
                "batch_wait_ms_now": (round(settings.wait_timeout_s * 1000, 3)
                                      if settings else None),
                "queued": len(self.queued) + waiting, "waiting_for_a_slot": self.gate.waiting,
                "running": len(self.running) + rows,
                "static_cancelled": self.static_cancelled, "most_requests_held": self.stats["most_held"],
                "engine_restarts": self.stats["engine_restarts"],
                "engines": engines, "last_switch_ms": self.stats.get("switch_ms"),
                "reload_error": self.reload_error}

    def _continuous_load(self, opened_only: bool = False) -> tuple[int, int]:
        """Requests waiting for and rows running in the engines: every open continuous
        request is one or the other, and the rows are what the engines said last.
        `opened_only`: leave out requests waiting for an engine's model to load."""
        streams = sum(1 for _, e in tuple(self.streams.values()) if e.opened or not opened_only)
        rows = min(sum(e.snapshot.get("running", 0) for e in tuple(self.engines)), streams)
        return streams - rows, rows

    def replica_actor_name(self) -> str:
        """The Ray actor name of this replica (chaos drills kill replicas by it)."""
        return ray.get_runtime_context().get_actor_name()

    async def inject_fault(self, kind: str) -> str:
        """`hang_batch_loop`: the generation thread and the engine host stop for good, so
        requests queue and no step finishes - what a wedged GPU or a deadlock looks like.
        Returns this replica's actor name. Only with the fault_injection setting. Async: on
        the replica's loop, as every other send to the engine host is (a plain method runs
        on Serve's thread pool)."""
        if not self.settings.fault_injection:
            raise APIError(403, "fault injection is off (setting fault_injection)")
        if kind != "hang_batch_loop":
            raise APIError(400, f"unknown fault {kind!r}; known: hang_batch_loop", "kind")
        self.wedged.set()
        if self.host is not None:
            self.host.send(("wedge", None))
        log.warning("fault injected: %s", kind)
        return self.replica_actor_name()

    async def check_health(self) -> None:
        """Serve calls this every health_check_period_s; raising (or not answering within
        health_check_timeout_s) 3 times in a row gets the replica replaced. Unhealthy: no
        model, the batch loop task or the engine host gone, the engine of the model served
        now unable to open or not open after ENGINE_OPEN_TIMEOUT_S, requests waiting or
        running with no decoding step for hang_after_s (waiting for a model to load does not
        count), or a one-token forward pass (on the generation thread, and in the engine host
        once it has opened an engine) giving non-finite logits or not finishing within
        hang_after_s, bounded by Serve's timeout (settings.health_probe_timeout_s). A probe
        still running when its check gave up is the next check's: never a second one."""
        if self.loaded is None:
            raise RuntimeError("no model loaded")
        # Re-recorded while the replica lives (telemetry holds a gauge for 10 minutes).
        record(catalogue.SERVE_MODEL_VERSION, 1, deployment=self.deployment,
               version=self.loaded.version)
        if self.host is not None and not self.host.alive:
            raise RuntimeError(f"continuous batching is down: {self.host.problem}")
        if self.engine_problem is not None:
            raise RuntimeError(f"continuous batching cannot open its engine: "
                               f"{self.engine_problem}")
        serving = self.serving_engine
        if serving is not None and not serving.ready.done() \
                and time.monotonic() - serving.asked_at > ENGINE_OPEN_TIMEOUT_S:
            raise RuntimeError(f"continuous batching's engine has not opened in "
                               f"{ENGINE_OPEN_TIMEOUT_S:g}s (its model loading in the engine "
                               f"process)")
        alive = (await self.batch._is_batching_task_alive()) if self.batch_loop_started \
            else True
        waiting, rows = self._continuous_load(opened_only=True)
        problem = batch_loop_problem(len(self.queued) + waiting, len(self.running) + rows,
                                     self.last_progress, time.monotonic(),
                                     self.settings.hang_after_s, alive)
        if problem:
            raise RuntimeError(problem)
        if self.health_probe is None:
            self.health_probe = asyncio.ensure_future(self._probe())
        bound = health_probe_timeout_s(self.settings.hang_after_s,
                                       self._deployment_option("health_check_timeout_s"))
        try:  # (shielded: giving up leaves the probe running, for the next check)
            results = await asyncio.wait_for(asyncio.shield(self.health_probe), timeout=bound)
        except asyncio.TimeoutError:
            raise RuntimeError(f"a one-token forward pass did not finish within {bound:g}s "
                               f"(hang_after_s within Serve's health_check_timeout_s)") from None
        finally:
            if self.health_probe.done():
                self.health_probe = None  # answered: the next check probes afresh
        problem = next((r for r in results if r), None)  # each probe's: None when healthy
        if problem:
            raise RuntimeError(problem)

    async def _probe(self) -> list[str | None]:
        """A one-token forward pass on the generation thread, and in the engine host once it
        has opened an engine: each one's problem, None when healthy."""
        loop = asyncio.get_running_loop()
        probes = [loop.run_in_executor(self.executor, self._probe_model, self.loaded)]
        token = None
        if self.host is not None and any(e.opened for e in self.engines):  # (not loading)
            token = next(self.keys)
            self.probes[token] = loop.create_future()
            self.host.send(("probe", token))
            probes.append(self.probes[token])
        try:
            return await asyncio.gather(*probes)
        finally:
            self.probes.pop(token, None)

    def __del__(self) -> None:
        """Serve's graceful shutdown: the engine process goes with the replica (it would
        also leave on its own once the replica's end of the socket closes)."""
        if getattr(self, "host", None) is not None:
            self.host.close()

    def _probe_model(self, loaded: LoadedModel) -> str | None:
        if self.wedged.is_set():
            threading.Event().wait()
        return forward_problem(loaded, self.device)
