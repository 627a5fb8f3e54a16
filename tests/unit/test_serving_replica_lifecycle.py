"""A model replica's lifecycle without Ray (Serve's replica context, the metrics and the GCS
store are stand-ins): which checkpoint replicas started at different times serve, and its
health check's probe. Static batching only (continuous batching's engine process is
tests/integration/test_serving_replica.py's)."""
import asyncio
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from orchestrator.serving.loading import save_untrained_checkpoint

CONTEXT = 32


class DictStore:
    """The pin store (loading.PinStore) in a dict: what the GCS key-value store is to a
    deployment's replicas."""

    def __init__(self):
        self.data = {}

    def get(self, key):
        return self.data.get(key)

    def put(self, key, value):
        self.data[key] = value

    def put_if_absent(self, key, value):
        return self.data.setdefault(key, value)


@pytest.fixture
def replicas(monkeypatch):
    """make(settings) -> a replica of one deployment (they share one pin store)."""
    from ray import serve

    import ray_layer.serve_model as serve_model

    store = DictStore()
    monkeypatch.setattr(serve_model, "record", lambda *args, **kwargs: None)
    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(
        deployment="GPTModel", replica_id=SimpleNamespace(unique_id="r")))
    monkeypatch.setattr(serve_model.GPTModel.func_or_class, "_pin_store",
                        lambda self: store, raising=False)
    threads = torch.get_num_threads()  # a replica sets this process's: given back after
    made = []

    def make(**settings):
        model = serve_model.GPTModel.func_or_class({"torch_threads": 1, "max_batch_size": 4,
                                                    "batching": "static", **settings})
        made.append(model)
        return model
    yield make
    for model in made:
        model.executor.shutdown(wait=False, cancel_futures=True)
    torch.set_num_threads(threads)


class BatchOfOne:
    """@serve.batch, which needs a replica's context: a batch per request."""

    def __init__(self, run):
        self.run = run

    async def __call__(self, request):
        async for step in self.run([request]):
            if step[0] is not StopIteration:
                yield step[0]

    def set_max_batch_size(self, size):
        pass

    def set_batch_wait_timeout_s(self, seconds):
        pass


def checkpoint(run: Path, step: int) -> str:
    return str(save_untrained_checkpoint(run / f"checkpoint_{step:08d}", "tiny", CONTEXT,
                                         seed=step, step=step))


def test_a_run_dir_in_the_user_config_is_pinned_once_for_every_replica(replicas, tmp_path):
    # serve_config.yaml's user_config names a run dir and training goes on: a replica added
    # by autoscaling later served the newer checkpoint, the first the one of its start.
    run = tmp_path / "run"
    first = checkpoint(run, 1)
    config = {"checkpoint": str(run), "batching": "static"}
    early = replicas()
    asyncio.run(early.reconfigure(config))
    checkpoint(run, 2)  # training writes on
    later = replicas()
    asyncio.run(later.reconfigure(config))
    assert early.loaded.path == later.loaded.path == first


def test_a_reload_back_to_a_run_dir_pins_its_newest_checkpoint_once_for_all(replicas,
                                                                           tmp_path):
    run, other = tmp_path / "run", tmp_path / "other"
    checkpoint(run, 1)
    fixed = checkpoint(other, 7)
    a, b = replicas(), replicas()
    for replica in (a, b):
        asyncio.run(replica.reconfigure({"checkpoint": str(run)}))
    newer = checkpoint(run, 2)
    for replica in (a, b):  # a reload to another checkpoint ...
        asyncio.run(replica.reconfigure({"checkpoint": fixed}))
    # ... and back: an explicit reload, so the run's newest now; training writing on between
    # the replicas' reconfigure calls changes nothing, nor for a replica started after.
    asyncio.run(a.reconfigure({"checkpoint": str(run)}))
    checkpoint(run, 3)
    asyncio.run(b.reconfigure({"checkpoint": str(run)}))
    c = replicas()
    asyncio.run(c.reconfigure({"checkpoint": str(run)}))
    assert a.loaded.path == b.loaded.path == c.loaded.path == newer



def test_a_replica_out_of_memory_leaves_the_pin_that_others_are_loading(replicas, tmp_path,
                                                                        monkeypatch):
    # a and b start together on a run dir; b's smaller GPU runs out of memory while a is
    # still loading. b's refusal marked the pin refused (none served it yet), so c, Serve's
    # replacement for b, pinned the run afresh after training wrote on: a served checkpoint
    # 1, c checkpoint 2, and answers differed by the replica a request landed on.
    import ray_layer.serve_model as serve_model

    run = tmp_path / "run"
    first = checkpoint(run, 1)
    config = {"checkpoint": str(run), "batching": "static"}
    a, b, c = replicas(), replicas(), replicas()
    real, loads = serve_model.load_for_serving, []

    def load(path, device):
        loads.append(path)
        if len(loads) == 1:  # a, still loading: b starts and fails, then c starts
            with pytest.raises(RuntimeError):
                asyncio.run(b.reconfigure(config))
            checkpoint(run, 2)
            asyncio.run(c.reconfigure(config))
        elif len(loads) == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(path, device)
    monkeypatch.setattr(serve_model, "load_for_serving", load)
    asyncio.run(a.reconfigure(config))
    assert b.loaded is None
    assert a.loaded.path == c.loaded.path == first


def test_a_run_dir_in_the_args_is_pinned_again_once_rotation_deletes_its_checkpoint(
        replicas, tmp_path):
    # `serve run ...:app checkpoint=<run>`: the app pins the run's newest checkpoint when it
    # is built. Training's keep_checkpoints rotation deleted it, and every replica started
    # after (autoscaling, a replacement) failed: "checkpoint .../checkpoint_00000003 does not
    # exist" (a run dir named in the user_config was pinned again, as documented).
    import shutil

    from ray_layer import serve_app
    import ray_layer.serve_model as serve_model

    run = tmp_path / "pretrain-x"
    built = [checkpoint(run, step) for step in (1, 2, 3)][-1]
    model = serve_app.app({"accelerator": "cpu", "checkpoint": str(run),
                           "batching": "static"})._bound_deployment.init_args[0]._bound_deployment
    settings, *rest = model.init_args
    assert settings["checkpoint"] == built

    def replica():
        made = serve_model.GPTModel.func_or_class({**settings, "torch_threads": 1}, *rest)
        made.executor.shutdown(wait=False)
        return made
    early = replica()
    asyncio.run(early.reconfigure(model.user_config))
    newest = [checkpoint(run, step) for step in (4, 5, 6)][-1]
    for step in (1, 2, 3):
        shutil.rmtree(run / f"checkpoint_{step:08d}")
    later, last = replica(), replica()
    asyncio.run(later.reconfigure(model.user_config))
    checkpoint(run, 7)
    asyncio.run(last.reconfigure(model.user_config))
    assert early.loaded.path == built and later.loaded.path == last.loaded.path == newest
    # A checkpoint named in the args is served as long as it exists, never another.
    named = serve_app.app({"accelerator": "cpu", "checkpoint": newest,
                           "batching": "static"})._bound_deployment.init_args[0]._bound_deployment
    settings, *rest = named.init_args
    shutil.rmtree(newest)
    with pytest.raises(RuntimeError, match="does not exist"):
        asyncio.run(replica().reconfigure(named.user_config))

@pytest.mark.parametrize("revert_order", ["refused_one_last", "refused_one_first"])
def test_reverting_a_reload_one_replica_refused_brings_every_replica_to_one_checkpoint(
        replicas, tmp_path, revert_order):
    # a reloads run -> other, b refuses it (out of memory with two models held), the operator
    # reverts the user_config. Serve rolls a config out a few replicas at a time, in no set
    # order: b, given the revert first, its config unchanged and no replica having pinned the
    # run anew yet, kept the old checkpoint and a then pinned the run's newest (two
    # checkpoints served until the next reload). c, started later, joins the revert's pin
    # though training wrote on.
    run = tmp_path / "run"
    checkpoint(run, 1)
    other = checkpoint(tmp_path / "other", 7)
    a, b = replicas(), replicas()
    for replica in (a, b):
        asyncio.run(replica.reconfigure({"checkpoint": str(run), "batching": "static"}))
    newer = checkpoint(run, 2)
    asyncio.run(a.reconfigure({"checkpoint": other, "batching": "static"}))
    load = b._load_pinned

    def out_of_memory(requested):
        raise MemoryError("CUDA out of memory")
    b._load_pinned = out_of_memory
    asyncio.run(b.reconfigure({"checkpoint": other, "batching": "static"}))
    b._load_pinned = load
    assert b.reload_error is not None
    for replica in ((a, b) if revert_order == "refused_one_last" else (b, a)):
        asyncio.run(replica.reconfigure({"checkpoint": str(run), "batching": "static"}))
    checkpoint(run, 3)
    c = replicas()
    asyncio.run(c.reconfigure({"checkpoint": str(run), "batching": "static"}))
    assert a.loaded.path == b.loaded.path == c.loaded.path == newer
    assert b.reload_error is None


def test_reverting_a_reload_every_replica_refused_loads_no_second_copy(replicas, tmp_path):
    # The revert pins the checkpoint afresh: where that is the directory served, the model
    # served is kept (a second copy could not fit beside it where memory is tight).
    fixed = checkpoint(tmp_path / "fixed", 1)
    a = replicas()
    asyncio.run(a.reconfigure({"checkpoint": fixed, "batching": "static"}))
    served = a.loaded
    asyncio.run(a.reconfigure({"checkpoint": str(tmp_path / "missing"), "batching": "static"}))
    assert str(tmp_path / "missing") in a.reload_error["message"]
    asyncio.run(a.reconfigure({"checkpoint": fixed, "batching": "static"}))
    assert a.loaded is served and a.reload_error is None


def test_a_fixed_config_typo_moves_no_replica_off_its_checkpoint(replicas, tmp_path):
    # A config refused before it named a checkpoint (a typo in another field) is no reload
    # of the run dir: fixing it keeps the checkpoint every replica serves.
    run = tmp_path / "run"
    first = checkpoint(run, 1)
    a = replicas()
    asyncio.run(a.reconfigure({"checkpoint": str(run), "batching": "static"}))
    checkpoint(run, 2)
    asyncio.run(a.reconfigure({"checkpoint": str(run), "batching": "static",
                               "max_batch_size": -1}))
    assert a.reload_error is not None
    asyncio.run(a.reconfigure({"checkpoint": str(run), "batching": "static",
                               "max_batch_size": 4}))
    assert a.loaded.path == first and a.reload_error is None


def test_the_pin_store_is_never_called_on_the_replicas_event_loop(replicas, tmp_path):
    # record_served's GCS get and put ran on the event loop: a slow GCS stalled every request
    # of the replica while it answered.
    import threading

    run, other = tmp_path / "run", tmp_path / "other"
    checkpoint(run, 1)
    fixed = checkpoint(other, 7)
    replica = replicas()
    store = replica._pin_store()
    on_loop = []
    for name in ("get", "put", "put_if_absent"):
        def call(*args, _call=getattr(store, name), _name=name):
            on_loop.append((_name, args[0], threading.current_thread() is
                            threading.main_thread()))
            return _call(*args)
        setattr(store, name, call)
    asyncio.run(replica.reconfigure({"checkpoint": str(run), "batching": "static"}))
    asyncio.run(replica.reconfigure({"checkpoint": fixed, "batching": "static"}))
    assert replica.loaded.path == fixed
    assert ("put", "current", False) in on_loop  # (recorded: served)
    assert [call for call in on_loop if call[2]] == []


def test_the_config_applied_is_recorded_off_the_replicas_event_loop(replicas, tmp_path):
    # _remember_good_config's GCS put ran on the event loop at each reconfigure: a slow GCS
    # stalled the replica's streaming requests while it answered.
    import threading

    saved = []

    class Store:
        def save(self, data):
            saved.append((data, threading.current_thread() is threading.main_thread()))

        def load(self):
            return saved[-1][0] if saved else None

    run, other = tmp_path / "run", tmp_path / "other"
    checkpoint(run, 1)
    fixed = checkpoint(other, 7)
    replica = replicas()
    replica._last_good_store = Store
    for config in ({"checkpoint": str(run), "batching": "static"},
                   {"checkpoint": fixed, "batching": "static"}):
        asyncio.run(replica.reconfigure(config))
    assert [data["checkpoint"] for data, _ in saved] == [str(run), fixed]
    assert [on_loop for _, on_loop in saved] == [False, False]


def test_the_app_builds_without_a_checkpoint_in_its_args(monkeypatch, tmp_path):
    # serve_config.yaml names the checkpoint in the model's user_config, which the builder
    # never sees: it resolved "the newest pretrain-* run" instead and failed the deploy
    # where there was none (a run trained with its own --run-dir), or pinned an unrelated one.
    from orchestrator.serving.loading import CheckpointError
    from ray_layer import serve_app

    def no_default_run():
        raise CheckpointError("checkpoint: none given and no pretrain-* run")
    monkeypatch.setattr(serve_app, "default_checkpoint", no_default_run, raising=False)
    built = serve_app.app({"accelerator": "cpu"})
    model = built._bound_deployment.init_args[0]._bound_deployment
    settings, build, run_dir = model.init_args
    assert settings["checkpoint"] == "" and build and run_dir == ""  # the replicas pin it
    assert model.user_config["checkpoint"] == ""
    # Named in the args, it is pinned when the app is built (a wrong path fails the deploy).
    run = tmp_path / "run"
    newest = checkpoint(run, 1)
    built = serve_app.app({"accelerator": "cpu", "checkpoint": str(run)})
    settings, _, run_dir = built._bound_deployment.init_args[0]._bound_deployment.init_args
    assert settings["checkpoint"] == newest and run_dir == str(run)
    with pytest.raises(CheckpointError, match="does not exist"):
        serve_app.app({"accelerator": "cpu", "checkpoint": str(tmp_path / "missing")})


def test_stopping_replicas_give_a_whole_context_generation_time_to_finish():
    # Serve force-kills a stopping replica (scale-down, an args redeploy) after its
    # graceful_shutdown_timeout_s: 10 s on the model (a chat's default max_tokens, the rest of
    # a 512-token context, takes ~10-12 s at 20-23 ms a token) and Serve's 20 s on the
    # Ingress, which holds the client's connection as long.
    from orchestrator.serving.settings import ServeSettings, shutdown_grace_problem
    from ray_layer import serve_app

    built = serve_app.app({"accelerator": "cpu", "graceful_shutdown_timeout_s": 300})
    model = built._bound_deployment.init_args[0]._bound_deployment
    assert model._deployment_config.graceful_shutdown_timeout_s == 300
    assert built._bound_deployment._deployment_config.graceful_shutdown_timeout_s == 300
    default = ServeSettings().graceful_shutdown_timeout_s
    assert shutdown_grace_problem(2048, default) is None  # up to a 2048-token context
    problem = shutdown_grace_problem(4096, default)
    assert "graceful_shutdown_timeout_s (120 s)" in problem and "4096 tokens" in problem


def test_a_hung_probe_fails_the_check_within_serves_timeout_and_is_not_sent_again(replicas,
                                                                                  tmp_path):
    # The probe waited up to hang_after_s (30 s) while Serve fails a check after
    # health_check_timeout_s (10 s); each later check queued another probe behind the hung
    # one on the generation thread.
    import threading

    from orchestrator.serving.settings import health_probe_timeout_s

    model = replicas(health_check_timeout_s=1.0, hang_after_s=30)
    asyncio.run(model.reconfigure({"checkpoint": checkpoint(tmp_path / "run", 1)}))
    stuck, probes = threading.Event(), []

    def probe(loaded):
        probes.append(loaded)
        stuck.wait(10)
    model._probe_model = probe
    bound = health_probe_timeout_s(30, 1.0)
    assert bound < 1.0

    async def scenario():
        for _ in range(2):
            with pytest.raises(RuntimeError, match=f"did not finish within {bound:g}s"):
                await asyncio.wait_for(model.check_health(), 3)
        assert len(probes) == 1  # the second check waited for the same probe
        stuck.set()
        await model.check_health()  # (the late answer of that probe: healthy)
        await model.check_health()
        assert len(probes) == 2  # and then a fresh one
    asyncio.run(scenario())


def test_health_of_an_app_scaled_to_zero_is_ok_and_wakes_no_replica():
    # min_replicas 0: /health called a replica (none running), answered 503 after 5 s and
    # made Serve start one.
    from orchestrator.serving.retries import DeploymentState
    from orchestrator.serving.settings import ServeSettings
    from ray_layer import serve_app

    calls = []

    class Model:  # (a DeploymentHandle's part the route uses)
        deployment_name = "GPTModel"

        class replica_stats:
            @staticmethod
            def remote():
                calls.append(1)
                return asyncio.sleep(3600)

    def ingress(state):
        ing = object.__new__(type("BareIngress", (serve_app.Ingress.func_or_class,),
                                  {"__del__": lambda self: None}))
        ing.settings, ing.model, ing.retries = ServeSettings(), Model(), {}
        ing.deployment = "Ingress"

        async def deployment_state():
            return state
        ing._deployment_state = deployment_state
        return ing

    async def health(state):
        return await asyncio.wait_for(ingress(state).health(), 10)

    idle = asyncio.run(health(DeploymentState("HEALTHY", {})))
    assert idle.status_code == 200 and b'"status":"scaled_to_zero"' in idle.body
    failed = asyncio.run(health(DeploymentState("DEPLOY_FAILED", {}, "no resources")))
    assert failed.status_code == 503 and b"no resources" in failed.body
    assert calls == []


def _bare_ingress(model):
    from orchestrator.serving.settings import ServeSettings
    from ray_layer import serve_app

    ing = object.__new__(type("BareIngress", (serve_app.Ingress.func_or_class,),
                              {"__del__": lambda self: None}))
    ing.settings, ing.model, ing.retries = ServeSettings(), model, {}
    ing.deployment = "Ingress"
    ing._state, ing._state_refresh = None, None
    return ing


class _Router:  # (the private part of a handle's router that routable_replicas reads)
    def __init__(self, routable: int):
        self._asyncio_router = SimpleNamespace(
            running_replicas_populated=lambda: True, _running_replicas=None,
            _request_router=SimpleNamespace(curr_replicas=dict.fromkeys(range(routable))))


def test_health_asks_a_running_replica_without_asking_serves_controller():
    # /health called serve.status() first, every time: while Serve's controller restarted,
    # /health waited on it (5 s) though a replica could answer.
    calls = []

    class Model:
        deployment_name = "GPTModel"
        _router = _Router(routable=1)

        class replica_stats:
            @staticmethod
            def remote():
                calls.append(1)

                async def stats():
                    return {"version": "run/checkpoint_1@abcd", "reload_error": None}
                return stats()

    ing = _bare_ingress(Model())

    def controller_down():
        raise AssertionError("Serve's controller was asked")
    ing._model_state = controller_down
    answer = asyncio.run(asyncio.wait_for(ing.health(), 10))
    assert answer.status_code == 200 and b'"status":"ok"' in answer.body and calls == [1]


def test_health_during_a_hot_reload_is_ok_and_asks_no_updating_replica():
    # A one-replica deployment applying a user_config is UPDATING (Serve routes no call to
    # it): /health answered 503 "no GPTModel replica is running" for the whole reload.
    from orchestrator.serving.retries import DeploymentState

    calls = []

    class Model:
        deployment_name = "GPTModel"
        _router = _Router(routable=0)

        class replica_stats:
            @staticmethod
            def remote():
                calls.append(1)
                return asyncio.sleep(3600)

    ing = _bare_ingress(Model())
    ing._model_state = lambda: DeploymentState("UPDATING", {"UPDATING": 1})
    answer = asyncio.run(asyncio.wait_for(ing.health(), 10))
    assert answer.status_code == 200 and b'"status":"ok"' in answer.body
    assert b"GPTModel is UPDATING" in answer.body and calls == []


def test_serves_view_is_one_controller_call_at_a_time_and_bounded():
    # While Serve's controller restarted, each caller held a lock for 5 s (every other /health
    # waited in turn) and started its own serve.status() thread, which never returned.
    import threading
    from ray_layer import serve_app

    release, calls = threading.Event(), []

    def hung_controller():
        calls.append(1)
        release.wait(30)
        raise RuntimeError("controller gone")

    ing = _bare_ingress(SimpleNamespace(deployment_name="GPTModel"))
    ing._model_state = hung_controller

    async def scenario():
        started = time.monotonic()
        states = await asyncio.gather(*(ing._deployment_state() for _ in range(5)))
        waited = time.monotonic() - started
        again = await ing._deployment_state()
        release.set()
        return states, waited, again
    states, waited, again = asyncio.run(scenario())
    assert calls == [1] and waited < serve_app.MODEL_STATE_WAIT_S + 1
    assert set(states) == {again} == {
        f"Serve's controller did not answer within {serve_app.MODEL_STATE_WAIT_S:g} s"}


def test_a_request_over_the_served_context_has_openais_context_length_code(replicas, tmp_path):
    # The replica's own refusal (the model reloaded to a shorter context since the ingress
    # checked) had code null, where the ingress's says context_length_exceeded.
    from orchestrator.serving.generation import GenerationRequest, SamplingParams
    from orchestrator.serving.protocol import APIError

    replica = replicas()
    asyncio.run(replica.reconfigure({"checkpoint": checkpoint(tmp_path / "run", 1),
                                     "batching": "static"}))
    with pytest.raises(APIError) as refused:
        asyncio.run(replica.generate(GenerationRequest((1,) * 30, SamplingParams(5))))
    assert (refused.value.status, refused.value.param, refused.value.code) == (
        400, "max_tokens", "context_length_exceeded"), refused.value.message
    assert refused.value.type == "invalid_request_error"


def test_a_reload_with_a_number_past_floats_range_is_refused_and_the_model_serves_on(
        replicas, tmp_path):
    # max_batch_wait_ms: 1000...0 (a YAML integer past float's range) raised OverflowError
    # out of reconfigure: Serve replaced the serving replica, and the replacement, given the
    # same config, failed to start.
    served = checkpoint(tmp_path / "run", 1)
    a = replicas()
    asyncio.run(a.reconfigure({"checkpoint": served, "batching": "static"}))
    asyncio.run(a.reconfigure({"checkpoint": served, "batching": "static",
                               "max_batch_wait_ms": 10 ** 400}))
    assert a.loaded.path == served
    assert "max_batch_wait_ms" in a.reload_error["message"]


def test_a_served_model_its_engine_cannot_open_again_gets_its_requests_resent(replicas,
                                                                               tmp_path):
    # The engine process reloads the served model from disk when it opens its engine again
    # (after the process died, or a step failed). Training had pruned that checkpoint
    # meanwhile (keep_checkpoints): every request then got a 500 "generation failed:
    # CheckpointError: ... does not exist", which the ingress does not resend, until Serve
    # replaced the replica. This replica cannot serve its model, another can: retryable.
    from ray_layer.serve_model import EngineRecord
    from orchestrator.serving.retries import is_engine_lost

    replica = replicas()
    asyncio.run(replica.reconfigure({"checkpoint": checkpoint(tmp_path / "run", 1),
                                     "batching": "static"}))
    gone = "CheckpointError: checkpoint /run/checkpoint_00000001 does not exist"

    async def scenario():
        loop = asyncio.get_running_loop()
        engine = EngineRecord(3, replica.loaded, replica._engine_limits(replica.loaded),
                              loop.create_future())
        replica.engines.append(engine)
        replica.serving_engine = engine
        waiting, crossed = asyncio.Queue(), asyncio.Queue()
        replica.streams[30] = (waiting, engine)
        replica._on_host_events([("open_failed", 3, gone)])
        replica.streams[31] = (crossed, engine)  # its add crossed the failure
        replica._on_host_events([("gone", 3, 31)])
        return waiting.get_nowait(), crossed.get_nowait()
    for error in asyncio.run(scenario()):
        assert is_engine_lost(error) and error.status == 503, error.message
        assert "does not exist" in error.message
    assert replica.engine_problem == gone  # its health check fails: Serve replaces it


def test_models_info_shows_a_kv_cache_only_under_continuous_batching(replicas, tmp_path):
    # /v1/models showed kv_cache_tokens 128 (max_batch_size 4 x the 32-token context) from a
    # static-batching replica, which has no paged KV cache: a size no request was held to.
    import dataclasses

    replica = replicas()
    asyncio.run(replica.reconfigure({"checkpoint": checkpoint(tmp_path / "run", 1),
                                     "batching": "static", "kv_cache_tokens": 64}))
    info = replica.model_info()
    assert (info["batching"], info["kv_cache_tokens"]) == ("static", None)
    # (the figure continuous batching's engine would run with; no engine is started here)
    replica.runtime = dataclasses.replace(replica.runtime, batching="continuous")
    info = replica.model_info()
    assert (info["batching"], info["kv_cache_tokens"]) == ("continuous", 64)


def test_a_request_whose_logits_go_non_finite_is_a_500_naming_it_in_both_batching_modes(
        replicas, tmp_path, caplog):
    # A row whose logits went NaN decoded token 0 or garbage and answered 200; now its engine
    # ends it with an error chunk (test_serving_engine.py, test_serving_generation.py), which
    # the replica raises as a 500 the ingress does not resend (an error event mid-stream),
    # logged once with the model version.
    import dataclasses
    import logging

    from orchestrator.serving.generation import Chunk, GenerationRequest, SamplingParams
    from orchestrator.serving.protocol import APIError
    from orchestrator.serving.retries import is_engine_lost
    from ray_layer.serve_model import EngineRecord
    from tests.tiny_gpt import overflowing_from

    replica = replicas()
    asyncio.run(replica.reconfigure({"checkpoint": checkpoint(tmp_path / "run", 1),
                                     "batching": "static"}))
    replica.batch = BatchOfOne(replica._run_batch)
    request = GenerationRequest((1,) * 10, SamplingParams(20, temperature=0.0))
    logging.getLogger("ray.serve").addHandler(caplog.handler)
    try:
        with overflowing_from(replica.loaded.model, 15), pytest.raises(APIError) as static:
            asyncio.run(replica.generate(request))

        async def continuous() -> list:  # the engine host's step event, as the replica gets it
            sent = []
            replica.host = SimpleNamespace(alive=True, send=sent.append, close=lambda: None)
            loop = asyncio.get_running_loop()
            engine = EngineRecord(7, replica.loaded, replica._engine_limits(replica.loaded),
                                  loop.create_future())
            replica.engines.append(engine)
            stream = replica._continuous_stream(request, "/v1/completions")
            first = asyncio.ensure_future(stream.__anext__())
            await asyncio.sleep(0)
            key = sent[0][2]
            failed = Chunk((), "", "error", error="the model's logits are NaN or infinite at "
                                                  "position 15 of this request")
            replica._on_host_events([("step", 7, [(key, Chunk((5,), "x")), (key, failed)], [],
                                      {"running": 0, "waiting": 0})])
            assert (await first).tokens == (5,)
            with pytest.raises(APIError) as raised:
                await stream.__anext__()
            return [raised.value, sent, key]
        replica.runtime = dataclasses.replace(replica.runtime, batching="continuous")
        continuous_error, sent, key = asyncio.run(continuous())
    finally:
        logging.getLogger("ray.serve").removeHandler(caplog.handler)
    for error in (static.value, continuous_error):
        assert (error.status, error.code, error.type) == (500, "non_finite_logits",
                                                          "server_error"), error.message
        assert "NaN or infinite at position 15" in error.message
        assert not is_engine_lost(error)  # not resent: the same model fails it again
    assert [s[0] for s in sent] == ["add"]  # no cancel: the engine had freed its row
    assert key not in replica.streams
    lines = [r.getMessage() for r in caplog.records if "NaN or infinite" in r.getMessage()]
    assert len(lines) == 2 and all(replica.loaded.version in line for line in lines), lines


def test_a_replica_says_how_long_it_held_a_request_and_when_its_first_token_came(replicas,
                                                                                 tmp_path):
    # The ingress tells the wait outside the replica (Serve's router) from these: without
    # them a client's time to first token under load was seen nowhere.
    from orchestrator.serving.generation import GenerationRequest, SamplingParams

    replica = replicas()
    asyncio.run(replica.reconfigure({"checkpoint": checkpoint(tmp_path / "run", 1),
                                     "batching": "static"}))
    replica.batch = BatchOfOne(replica._run_batch)
    request = GenerationRequest((1,) * 4, SamplingParams(6, temperature=0.0))
    answer = asyncio.run(replica.generate(request))
    assert answer.completion_tokens == 6
    assert 0 < answer.first_token_s < answer.held_s

    async def streamed():
        return [chunk async for chunk in replica.generate_stream(request)]
    chunks = asyncio.run(streamed())
    assert chunks[0].first_token_s > 0  # on the first chunk only
    assert [c.first_token_s for c in chunks[1:]] == [None] * (len(chunks) - 1)
