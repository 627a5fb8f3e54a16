"""A model replica driven directly on an event loop, with a real engine process and no Ray
(Serve's replica context and the metrics are stand-ins), so that a kill lands at a chosen
token and a checkpoint appears at a chosen moment:
  - its engine process dying (out of memory, a crash): the in-flight requests get a retryable
    error and the replica starts a fresh engine process, so the next request (the ingress's
    resend) is served by the same replica; after too many deaths it stays down and fails its
    health check, for Serve to replace it;
  - a user_config that leaves the checkpoint empty serves the one the app pinned, not the
    run's newest."""
import asyncio
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from orchestrator.serving.generation import GenerationRequest, SamplingParams
from orchestrator.serving.loading import save_untrained_checkpoint
from orchestrator.serving.retries import is_engine_lost

CONTEXT = 1024  # a row decodes for ~1 s: the kill lands mid-stream


@pytest.fixture
def replica(monkeypatch, tmp_path):
    import ray
    from ray import serve

    import ray_layer.serve_model as serve_model

    monkeypatch.setattr(serve_model, "record", lambda *args, **kwargs: None)
    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(
        deployment="GPTModel", replica_id=SimpleNamespace(unique_id="r")))
    # (replica_stats names the node: Ray's own runtime context would connect this process to
    # whatever Ray it finds, start one, or wait on a dead one /tmp/ray/ray_current_cluster
    # still names, when this file runs before any other has started Ray)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(
        get_node_id=lambda: "node", get_actor_name=lambda: "replica"))
    checkpoint = str(save_untrained_checkpoint(tmp_path / "run" / "checkpoint_00000001",
                                               "tiny", CONTEXT))
    ray_was_up = ray.is_initialized()
    threads = torch.get_num_threads()  # the replica sets this process's: given back after
    model = serve_model.GPTModel.func_or_class({"torch_threads": 1, "max_batch_size": 4,
                                                "checkpoint": checkpoint})
    yield model, checkpoint
    if model.host is not None:
        model.host.close()
    torch.set_num_threads(threads)
    assert ray.is_initialized() == ray_was_up, "the replica started or joined Ray"


def request(tokens: int) -> GenerationRequest:
    return GenerationRequest(tuple(b"hello"), SamplingParams(tokens, temperature=0.0))


async def tokens_of(model, req: GenerationRequest) -> tuple[int, ...]:
    return tuple(t for chunk in [c async for c in model.generate_stream(req)]
                 for t in chunk.tokens)


def test_a_dead_engine_process_fails_its_requests_retryably_and_is_started_again(replica):
    model, checkpoint = replica

    async def scenario():
        await model.reconfigure({"checkpoint": checkpoint, "batching": "continuous"})
        expected = await tokens_of(model, request(40))
        delivered, error = [], None
        try:
            async for chunk in model.generate_stream(request(CONTEXT - 8)):
                delivered += chunk.tokens
                if len(delivered) >= 3:
                    os.kill(model.host.worker.pid, signal.SIGKILL)
        except Exception as e:
            error = e
        assert error is not None and is_engine_lost(error), error
        assert error.status == 503 and 3 <= len(delivered) < CONTEXT - 8
        # The ingress's resend, to the same replica: served by a fresh engine process, the
        # same greedy tokens as before the kill.
        assert await tokens_of(model, request(40)) == expected
        await model.check_health()
        assert model.replica_stats()["engine_restarts"] == 1

        # Dying again and again (a model that cannot run here): the replica gives up and
        # its health check fails.
        for _ in range(3):
            os.kill(model.host.worker.pid, signal.SIGKILL)
            with pytest.raises(Exception) as failed:
                await tokens_of(model, request(4))
            assert is_engine_lost(failed.value)
        with pytest.raises(RuntimeError, match="continuous batching is down"):
            await model.check_health()
        with pytest.raises(Exception) as down:
            await tokens_of(model, request(4))
        assert is_engine_lost(down.value)  # the ingress tries another replica

    asyncio.run(scenario())


def test_an_empty_checkpoint_in_the_user_config_serves_the_one_the_app_pinned(replica):
    # serve_config.yaml's user_config says checkpoint: "", and training wrote a newer
    # checkpoint since the app pinned one (its args): a replica starting now (autoscaling)
    # serves the pinned one, as the others do.
    model, checkpoint = replica
    newer = save_untrained_checkpoint(Path(checkpoint).parent / "checkpoint_00000002", "tiny",
                                      CONTEXT, seed=5, step=2)
    asyncio.run(model.reconfigure({"checkpoint": "", "batching": "static"}))
    assert model.loaded.path == checkpoint != str(newer)


def test_a_token_the_model_cannot_read_is_a_400_and_the_replica_serves_on(replica):
    # A prompt encoded for another vocabulary (the ingress's view of the model is up to 1 s
    # old across a hot reload): refused alone, naming the prompt, by the engine (continuous
    # batching) and before it joins a batch (static: Serve's batcher is not here, so the
    # admission check itself).
    model, checkpoint = replica
    from orchestrator.serving.protocol import APIError

    async def scenario():
        await model.reconfigure({"checkpoint": checkpoint, "batching": "continuous"})
        vocab = model.loaded.model.config.vocab_size
        bad = GenerationRequest((72, vocab), SamplingParams(3, temperature=0.0))
        with pytest.raises(APIError) as e:
            await tokens_of(model, bad)
        assert e.value.status == 400 and e.value.param == "prompt"
        assert f"token id {vocab} is not one this model reads" in e.value.message
        assert len(await tokens_of(model, request(5))) == 5
        await model.check_health()
        with pytest.raises(APIError, match=f"token id {vocab} is not one"):
            model._admit(bad)

    asyncio.run(scenario())


def test_latency_metrics_carry_the_route_the_request_came_by(replica, monkeypatch):
    # Chat's time to first token and per output token were counted as completions'.
    from ray import serve

    import ray_layer.serve_model as serve_model
    from orchestrator import metric_catalogue as catalogue

    model, checkpoint = replica
    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(  # static's
        deployment="GPTModel", replica_id=SimpleNamespace(unique_id="r"),  # serve.batch too
        _deployment_config=SimpleNamespace(max_ongoing_requests=256)))
    recorded = []
    monkeypatch.setattr(serve_model, "record", lambda spec, value, **tags: recorded.append(
        (spec.name, tags.get("route"))))
    latency = {catalogue.SERVE_TIME_TO_FIRST_TOKEN.name,
               catalogue.SERVE_TIME_PER_OUTPUT_TOKEN.name}

    async def scenario():
        for batching in ("continuous", "static"):
            await model.reconfigure({"checkpoint": checkpoint, "batching": batching})
            for route in (serve_model.CHAT_ROUTE, serve_model.COMPLETIONS_ROUTE):
                recorded.clear()
                await model.generate(request(4), route)
                assert sorted(r for r in recorded if r[0] in latency) == sorted(
                    (name, route) for name in latency), (batching, recorded)
    asyncio.run(asyncio.wait_for(scenario(), timeout=120))


def test_a_request_that_reached_an_engine_already_failed_is_resent_not_failed(replica):
    # The host's "failed" for a step and a new request's add cross (the host answers that
    # add "gone", after the "failed"): the request never ran, so it gets the retryable
    # error (it got the 500 of the engine's own requests, which the ingress does not
    # resend); an engine that never opened fails it with why, as its other requests.
    from ray_layer.serve_model import EngineRecord

    model, _ = replica

    def stream(key, engine):
        queue = asyncio.Queue()
        model.streams[key] = (queue, engine)
        return queue

    async def scenario():
        ready = asyncio.get_running_loop().create_future()
        ready.set_result(None)  # it had opened
        failed_step = EngineRecord(7, None, None, ready)
        model.engines.append(failed_step)
        ran, crossed = stream(70, failed_step), stream(71, failed_step)
        model._on_host_events([("failed", 7, "generation failed: device lost", {70}),
                               ("gone", 7, 71)])
        never_opened = asyncio.get_running_loop().create_future()
        never_opened.set_result("its KV cache needs 9.0 GiB")
        late = stream(80, EngineRecord(8, None, None, never_opened))
        model._on_host_events([("gone", 8, 80)])
        return ran.get_nowait(), crossed.get_nowait(), late.get_nowait()
    ran, crossed, late = asyncio.run(scenario())
    assert ran.status == 500 and "device lost" in ran.message and not is_engine_lost(ran)
    assert is_engine_lost(crossed) and crossed.status == 503
    assert late.status == 500 and "9.0 GiB" in late.message and not is_engine_lost(late)
    assert not model.streams and not model.engines


def test_a_served_checkpoint_pruned_before_its_engine_restarts_gets_requests_resent(replica):
    # Training prunes the checkpoint served (keep_checkpoints), then the engine process dies:
    # the fresh one cannot load the model from disk again. Its requests got a 500 the
    # ingress does not resend, until Serve replaced the replica; now a retryable 503 (another
    # replica serves them), and the health check fails so that Serve replaces this one.
    import shutil

    model, checkpoint = replica

    async def scenario():
        await model.reconfigure({"checkpoint": checkpoint, "batching": "continuous"})
        shutil.rmtree(checkpoint)
        os.kill(model.host.worker.pid, signal.SIGKILL)
        while not model.stats["engine_restarts"]:  # (its socket's EOF: a fresh process)
            await asyncio.sleep(0.05)
        with pytest.raises(Exception) as failed:
            await tokens_of(model, request(4))
        assert is_engine_lost(failed.value) and failed.value.status == 503, failed.value
        assert "does not exist" in failed.value.message
        with pytest.raises(RuntimeError, match="cannot open its engine"):
            await model.check_health()

    asyncio.run(asyncio.wait_for(scenario(), timeout=120))
