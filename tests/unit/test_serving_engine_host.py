"""The engine host (orchestrator/serving/engine_host.py): the continuous-batching engines of a
replica run in a process of their own or on a thread, driven by commands and answering with
events. Outputs equal each request decoded alone over either transport; a reload opens a new
engine while the retired old one finishes its rows; failures reach the requests they end; the
engine process never outlives the replica's end."""
import asyncio
import threading
import time

import pytest
from orchestrator.serving.engine import ContinuousEngine, EngineLimits, run_to_completion
from orchestrator.serving import engine_host
from orchestrator.serving.engine_host import (EngineHost, EngineHostHandle, engine_source,
                                              run_host)
from orchestrator.serving.generation import GenerationRequest, SamplingParams
from orchestrator.serving.loading import load_model, save_untrained_checkpoint

LIMITS = EngineLimits(max_rows=4, num_blocks=64, block_tokens=4, prefill_chunk_tokens=6)
PROMPTS = [b"Hello", b"A longer prompt than the first", b"x", b"seeded"]


def requests() -> list[GenerationRequest]:
    out = [GenerationRequest(tuple(p), SamplingParams(10, 0.0)) for p in PROMPTS[:3]]
    return out + [GenerationRequest(tuple(PROMPTS[3]), SamplingParams(10, 0.9, 0.95, seed=7))]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("host")
    return [str(save_untrained_checkpoint(root / "run" / f"checkpoint_{i:08d}", "tiny", 64,
                                          seed=i, step=i)) for i in (1, 2)]


def alone(loaded, request) -> tuple[int, ...]:
    engine = ContinuousEngine(loaded.model, loaded.block_size, loaded.tokenizer, LIMITS)
    return run_to_completion(engine, [request])[0][1]


def drive(process: bool, commands_at: dict[int, list[tuple]], until_closed: int | None = None,
          timeout_s: float = 60.0) -> list[tuple]:
    """Start a host, send the commands of each "round" when the previous round's adds have
    finished, and collect every event until all requests finished (and engine
    `until_closed` closed, if given)."""
    events: list[tuple] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        finished: set[int] = set()
        closed: set[int] = set()
        expected = {c[2] for round_ in commands_at.values() for c in round_ if c[0] == "add"}

        def on_events(batch: list[tuple]) -> None:
            events.extend(batch)
            for event in batch:
                if event[0] == "step":
                    finished.update(k for k, chunk in event[2] if chunk.finish_reason)
                elif event[0] in ("failed", "open_failed", "host_died"):
                    done.set()
                elif event[0] == "closed":
                    closed.add(event[1])
            if finished >= expected and (until_closed is None or until_closed in closed):
                done.set()

        handle = EngineHostHandle(process, "cpu", 1, on_events, loop)
        try:
            for _, round_ in sorted(commands_at.items()):
                for command in round_:
                    handle.send(command)
                await asyncio.sleep(0.05)
            await asyncio.wait_for(done.wait(), timeout_s)
        finally:
            handle.close()

    asyncio.run(main())
    return events


def tokens_by_key(events: list[tuple]) -> dict[int, tuple[int, ...]]:
    out: dict[int, tuple[int, ...]] = {}
    for event in events:
        if event[0] == "step":
            for key, chunk in event[2]:
                out[key] = out.get(key, ()) + chunk.tokens
    return out


@pytest.mark.parametrize("process", [False, True], ids=["thread", "process"])
def test_a_host_returns_what_each_request_gets_alone(checkpoints, process):
    loaded = load_model(checkpoints[0])
    source = engine_source(loaded, process)
    assert source == ((loaded.path, loaded.version) if process else loaded)
    adds = [("add", 0, key, request, 0.0) for key, request in enumerate(requests())]
    events = drive(process, {0: [("open", 0, source, LIMITS), *adds]})
    assert ("opened", 0, loaded.version) in events
    got = tokens_by_key(events)
    for key, request in enumerate(requests()):
        assert got[key] == alone(loaded, request), key
    snapshots = [e[4] for e in events if e[0] == "step"]
    assert snapshots[-1]["running"] == 0 and snapshots[-1]["kv_blocks_free"] == 64


def test_a_reload_opens_a_new_engine_while_the_retired_one_finishes_its_rows(checkpoints):
    # Process sources: the models load on the host's loader thread (as in the process).
    old, new = (load_model(c) for c in checkpoints)
    first, second = requests()[1], requests()[0]
    events = drive(False, {0: [("open", 0, engine_source(old, True), LIMITS),
                               ("add", 0, 1, first, 0.0)],
                           1: [("open", 1, engine_source(new, True), LIMITS),
                               ("add", 1, 2, second, 0.0), ("retire", 0)]},
                   until_closed=0)
    got = tokens_by_key(events)
    assert got[1] == alone(old, first) and got[2] == alone(new, second)
    assert ("opened", 1, new.version) in events
    assert ("closed", 0) in events and ("closed", 1) not in events
    last_old_step = max(i for i, e in enumerate(events) if e[0] == "step" and e[1] == 0)
    assert events.index(("closed", 0)) > last_old_step


def test_a_model_that_cannot_load_and_a_failing_step_are_reported_not_raised(tmp_path):
    events = drive(False, {0: [("open", 0, (str(tmp_path / "missing"), "v"), LIMITS),
                               ("add", 0, 1, requests()[0], 0.0)]})
    failed = [e for e in events if e[0] == "open_failed"]
    assert failed and failed[0][1] == 0 and "missing" in failed[0][2]

    host, emitted = EngineHost("cpu"), []
    loaded = load_model(str(save_untrained_checkpoint(tmp_path / "r" / "checkpoint_1")))
    emitted += host.apply(("open", 0, loaded, LIMITS))

    def device_lost(*_):
        raise RuntimeError("device lost")

    host.engines[0][0].cache.write = device_lost
    commands = [[("add", 0, 1, requests()[0], 0.0)], [("stop", None)]]
    run_host(host, lambda block, timeout: commands.pop(0), emitted.extend)
    failed = [e for e in emitted if e[0] == "failed"]
    assert failed and "device lost" in failed[0][2] and 0 not in host.engines
    assert failed[0][3] == {1}  # the request the failed step took with it
    # An add for the engine that is gone is answered, naming the request that never ran (the
    # replica resends it); a late cancel needs no answer (the replica ended its requests).
    assert host.apply(("add", 0, 2, requests()[0], 0.0)) == [("gone", 0, 2)]
    assert host.apply(("cancel", 0, 2)) == []
    # So does a retire (a reload's): it was kept for good in the host's sets.
    assert host.apply(("retire", 0)) == [] and 0 not in host.retired | host.changed


def until_opened(host: EngineHost, engine_id: int) -> list[tuple]:
    deadline = time.monotonic() + 60
    while engine_id in host.loading and time.monotonic() < deadline:
        time.sleep(0.01)
        events = host.collect_loaded()
        if events:
            return events
    return []


def test_an_engine_only_closes_once_retired_and_a_new_cache_shares_the_model(checkpoints):
    host = EngineHost("cpu")
    old, new = (load_model(c) for c in checkpoints)
    assert host.apply(("open", 0, engine_source(old, True), LIMITS)) == []  # loading
    assert until_opened(host, 0) == [("opened", 0, old.version)]
    # A resized cache for the same model and version: open at once, the same weights.
    bigger = EngineLimits(max_rows=8, num_blocks=128, block_tokens=4, prefill_chunk_tokens=6)
    assert host.apply(("open", 1, engine_source(old, True), bigger)) == [
        ("opened", 1, old.version)]
    assert host.engines[1][1] is host.engines[0][1]
    # Another version of the model: loaded, not shared.
    assert host.apply(("open", 2, engine_source(new, True), LIMITS)) == []
    assert until_opened(host, 2) == [("opened", 2, new.version)]
    assert host.step() == [] and set(host.engines) == {0, 1, 2}  # idle, not retired: kept
    host.apply(("add", 0, 1, requests()[0], 0.0))
    host.apply(("retire", 0))
    events = host.step()
    assert [e[0] for e in events] == ["step"] and 0 in host.engines  # its row still runs
    while 0 in host.engines:
        events = host.step()
    assert events[-1] == ("closed", 0) and set(host.engines) == {1, 2}


def test_a_cache_the_device_cannot_hold_and_a_failing_probe_are_answered(checkpoints,
                                                                         monkeypatch):
    host = EngineHost("cpu")
    loaded = load_model(checkpoints[0])
    host.apply(("open", 0, loaded, LIMITS))

    def no_memory(*args, **kwargs):
        raise MemoryError("cannot allocate the KV cache")

    # Asked before anything is allocated: a cache larger than the memory available.
    huge = EngineLimits(max_rows=4, num_blocks=10**9, block_tokens=4, prefill_chunk_tokens=6)
    (event,) = host.apply(("open", 1, loaded, huge))
    assert event[:2] == ("open_failed", 1)
    assert "needs" in event[2] and "GiB available" in event[2] and "kv_cache_tokens" in event[2]
    monkeypatch.setattr(engine_host, "ContinuousEngine", no_memory)
    events = host.apply(("open", 1, loaded, LIMITS))
    assert events == [("open_failed", 1, "MemoryError: cannot allocate the KV cache")]
    assert set(host.engines) == {0}  # the engine already open is untouched

    def device_lost(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(loaded, "model", device_lost)
    assert host.apply(("probe", 7)) == [
        ("probe", 7, "a one-token forward pass failed: RuntimeError: device lost")]


def test_the_engine_process_ends_when_the_replica_end_closes_even_when_wedged():
    conn, worker = engine_host._start_host_process("cpu", 1)
    try:
        conn.send(("wedge", None))  # the stepping thread never comes back
        # Far more than a socket buffer holds (~200 KB): the reader thread still takes them,
        # so the replica's sends never block on a host that does not step.
        sender = threading.Thread(target=lambda: [
            conn.send(("cancel", 0, "x" * 10_000)) for _ in range(300)], daemon=True)
        sender.start()
        sender.join(timeout=30)
        assert not sender.is_alive()
        assert worker.poll() is None
        conn.close()  # what the replica's death does to its end
        assert worker.wait(timeout=30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()


@pytest.mark.parametrize("end", ["kill", "terminate"])
def test_the_replica_end_reports_a_host_process_that_died(end):
    # SIGTERM closes the socket a moment before the process is reaped: read at once, the
    # message said "exit code None".
    events: list[tuple] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        died = asyncio.Event()

        def on_events(batch):
            events.extend(batch)
            if any(e[0] == "host_died" for e in batch):
                died.set()

        handle = EngineHostHandle(True, "cpu", 1, on_events, loop)
        getattr(handle.worker, end)()  # no goodbye, only the pipe's EOF
        await asyncio.wait_for(died.wait(), 30)
        signal = {"kill": -9, "terminate": -15}[end]
        assert not handle.alive and f"exit code {signal}" in handle.problem, handle.problem
        handle.send(("probe", 1))  # ignored: no error, no hang
        handle.close()

    asyncio.run(main())
    assert [e[0] for e in events] == ["host_died"]
