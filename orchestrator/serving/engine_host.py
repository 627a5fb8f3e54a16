"""Where a model replica's continuous-batching engines run: a process of their own (the
default, setting `engine_process`) or a thread of the replica's process.

Why a process: a decoding step is a long series of small torch calls, and each releases
Python's GIL and takes it back. In the replica's process the other holder of the GIL is its
event loop, which handles every request's HTTP/gRPC and (de)serialisation. Measured here
(2-core CPU, docs/benchmarks.md): the engine alone next to a thread running Python 30% of
the time lost ~29% of its throughput, next to a *process* doing the same 0-10%; and in the
replica under the mixed load, the generation thread spent 2.7 ms of every 27 ms step period
just waiting to get the GIL back from the event loop before it could start the step. A
process has its own GIL; what it costs is one message each way per step (a step's chunks, a
few KB pickled) and its own copy of the model, loaded from the same checkpoint directory.
The thread host runs the same loop over in-process queues (engine_process: false): no second
copy of the weights, for a model that only just fits its accelerator.

The host owns engines by id (the replica opens a new one for a new model or cache size and
retires the one it replaces, which finishes its rows, then closes) and loops: take the
replica's commands, step every engine with work, send back one list of events. A model is
loaded on a thread of the host's, so the engines already running keep stepping through a hot
reload. In the process, an engine opened for a model another open engine holds (the same
directory and version: a cache resize) shares its weights.

In the process, a reader thread takes every command as it arrives, so the replica's sends
never wait on a step (or a wedged host), and the process ends at once when the replica's end
of the socket closes: the replica exited or was killed, even in the middle of a step.

Commands (replica -> host; tuples, the first item names them):
    ("open", engine_id, source, limits)   source: engine_source(): a LoadedModel (thread
                                          host) or (checkpoint directory, version) (process)
    ("add", engine_id, key, request, arrived)     arrived: time.monotonic() (system-wide)
    ("cancel", engine_id, key)
    ("retire", engine_id)  it takes no more requests: it closes once its rows are done
    ("probe", token)       a one-token forward pass of the newest model, answered in turn
    ("wedge", None)        fault injection: the host stops stepping for good
    ("stop", None)
Events (host -> replica; lists):
    ("opened", engine_id, version)  ("open_failed", engine_id, message)
    ("step", engine_id, chunks, queue_seconds, snapshot)    chunks: [(key, Chunk)]
    ("failed", engine_id, message, keys)  a step raised: the engine is gone, and so are
                                    the requests it held (keys); an add that crossed the
                                    failure is answered "gone"
    ("gone", engine_id, key)        an add for an engine already gone (failed or never
                                    opened): the request never ran
    ("rejected", engine_id, key, message, param, code)   add refused: over its capacity
    ("closed", engine_id)           a retired engine finished its rows
    ("probe", token, problem)       problem: None when healthy
    ("host_died", message)          (made by the replica's end when the host is gone)
"""
from __future__ import annotations

import logging
import os
import queue
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any, Callable

import torch

from orchestrator.probes import memory_within_cgroup
from orchestrator.serving.engine import (CapacityError, ContinuousEngine, EngineLimits,
                                         kv_cache_bytes)
from orchestrator.serving.loading import LoadedModel, forward_problem, load_for_serving
from orchestrator.serving.settings import ENGINE_THREAD

log = logging.getLogger(__name__)

LOAD_POLL_S = 0.05  # how often an idle host looks for a model its loader thread finished
MAX_EVENTS_PER_WAKE = 32  # event lists the replica's loop takes in one go before yielding
EXIT_WAIT_S = 2.0  # how long a dead engine process's exit code is waited for after EOF


def engine_snapshot(engine: ContinuousEngine) -> dict[str, int]:
    """What the replica reports about an engine (/health), taken after each step."""
    stats = engine.stats
    return {"waiting": len(engine.waiting), "running": len(engine.running),
            "kv_blocks_free": engine.free_blocks, "steps": stats.steps,
            "prefill_tokens": stats.prefill_tokens, "decode_tokens": stats.decode_tokens,
            "cancelled": stats.cancelled}


class EngineHost:
    """The engines and what commands do to them (no transport: run_host drives it)."""

    def __init__(self, device: torch.device | str,
                 load: Callable[[str, torch.device], LoadedModel] = load_for_serving) -> None:
        self.device = torch.device(device)
        self.load = load
        self.engines: dict[int, tuple[ContinuousEngine, LoadedModel]] = {}
        self.loading: dict[int, list[tuple]] = {}  # engine id -> its commands until loaded
        self.loaded: queue.SimpleQueue = queue.SimpleQueue()  # (id, limits, model | error)
        self.changed: set[int] = set()  # engines a command changed since their last event
        self.retired: set[int] = set()  # engines that close once their rows are done
        # Keys each engine holds (added, neither finished nor cancelled): those a failed
        # step takes with it. Kept here, not read from the engine, which may lose track of
        # a row in the middle of the step that failed.
        self.held: dict[int, set] = {}

    @property
    def busy(self) -> bool:
        return any(not engine.idle for engine, _ in self.engines.values())

    def apply(self, command: tuple) -> list[tuple]:
        kind, engine_id = command[0], command[1]
        if kind == "open":
            return self._open(engine_id, command[2], command[3])
        if kind == "probe":
            return [("probe", engine_id, self._probe())]
        if engine_id in self.loading:  # add / cancel / retire for a model still loading
            self.loading[engine_id].append(command)
            return []
        if kind == "retire":
            if engine_id in self.engines:  # (one that failed or closed: nothing to keep)
                self.retired.add(engine_id)
                self.changed.add(engine_id)
            return []
        if engine_id not in self.engines:  # it failed: a late cancel needs no answer
            return [] if kind == "cancel" else [("gone", engine_id, command[2])]
        engine = self.engines[engine_id][0]
        self.changed.add(engine_id)
        if kind == "cancel":
            engine.cancel(command[2])
            self.held[engine_id].discard(command[2])
            return []
        _, _, key, request, arrived = command
        try:
            engine.add(key, request, arrived)
        except CapacityError as e:  # the replica checks first; a race with new limits
            return [("rejected", engine_id, key, str(e), e.param, e.code)]
        self.held[engine_id].add(key)
        return []

    def _open(self, engine_id: int, source: LoadedModel | tuple[str, str],
              limits: EngineLimits) -> list[tuple]:
        if isinstance(source, LoadedModel):
            return self._ready(engine_id, limits, source)
        path, version = source
        held = next((loaded for _, loaded in self.engines.values()
                     if loaded.path == path and loaded.version == version), None)
        if held is not None:  # a new cache for the same model: one copy of the weights
            return self._ready(engine_id, limits, held)
        self.loading[engine_id] = []

        def load() -> None:  # off the stepping thread: running engines keep decoding
            try:
                loaded = self.load(path, self.device)
            except Exception as e:  # any failure is the replica's to report
                self.loaded.put((engine_id, limits, f"{type(e).__name__}: {e}"))
                return
            self.loaded.put((engine_id, limits, loaded))

        threading.Thread(target=load, name=f"load-engine-{engine_id}", daemon=True).start()
        return []

    def collect_loaded(self) -> list[tuple]:
        """Engines whose model finished loading: ready, with the commands they were sent."""
        events: list[tuple] = []
        while True:
            try:
                engine_id, limits, result = self.loaded.get_nowait()
            except queue.Empty:
                return events
            events += (self._ready(engine_id, limits, result) if isinstance(result, LoadedModel)
                       else self._open_failed(engine_id, result))

    def _ready(self, engine_id: int, limits: EngineLimits, loaded: LoadedModel) -> list[tuple]:
        try:  # any failure here fails this engine only, never the host
            too_big = self._cache_too_big(loaded, limits)
            if too_big:
                return self._open_failed(engine_id, too_big)
            engine = ContinuousEngine(loaded.model, loaded.block_size, loaded.tokenizer,
                                      limits, self.device)
        except Exception as e:
            return self._open_failed(engine_id, f"{type(e).__name__}: {e}")
        self.engines[engine_id] = (engine, loaded)
        self.held[engine_id] = set()
        events: list[tuple] = [("opened", engine_id, loaded.version)]
        for command in self.loading.pop(engine_id, []):
            events += self.apply(command)
        return events

    def _cache_too_big(self, loaded: LoadedModel, limits: EngineLimits) -> str | None:
        """Why the engine's KV cache cannot fit the device's available memory, or None. The
        cache's layers are allocated at their first write: asked before, the answer is an
        error naming the setting rather than an out-of-memory kill in the middle of serving."""
        need = kv_cache_bytes(loaded.model, limits)
        free = free_memory_bytes(self.device)
        if need <= free:
            return None
        return (f"its KV cache ({limits.num_blocks * limits.block_tokens} positions: setting "
                f"kv_cache_tokens, or max_batch_size x the model's context when 0) needs "
                f"{need / 2**30:.1f} GiB for this model, and the {self.device.type} has "
                f"{free / 2**30:.1f} GiB available")

    def _open_failed(self, engine_id: int, message: str) -> list[tuple]:
        self.loading.pop(engine_id, None)
        self.retired.discard(engine_id)
        return [("open_failed", engine_id, message)]

    def step(self) -> list[tuple]:
        """One step of every engine with work (a step event each; an engine without work
        that a command changed reports its state too); retired engines that are done
        close."""
        events: list[tuple] = []
        for engine_id, (engine, _) in list(self.engines.items()):
            if not engine.idle:
                try:
                    chunks = engine.step()
                except Exception as e:  # a bug or a device error: fail its requests only
                    log.exception("continuous batching step failed")
                    held = self.held[engine_id]
                    self._forget(engine_id)
                    events.append(("failed", engine_id, f"generation failed: "
                                                        f"{type(e).__name__}: {e}", held))
                    continue
                self.held[engine_id].difference_update(
                    key for key, chunk in chunks if chunk.finish_reason is not None)
                events.append(("step", engine_id, chunks,
                               [waited for _, waited in engine.queue_seconds],
                               engine_snapshot(engine)))
            elif engine_id in self.changed:  # e.g. its last row cancelled: its blocks free
                events.append(("step", engine_id, [], [], engine_snapshot(engine)))
            if engine.idle and engine_id in self.retired:
                self._forget(engine_id)
                events.append(("closed", engine_id))
        self.changed.clear()
        return events

    def _forget(self, engine_id: int) -> None:
        del self.engines[engine_id]
        del self.held[engine_id]
        self.retired.discard(engine_id)

    def _probe(self) -> str | None:
        """The newest open model's one-token forward pass: None when healthy."""
        if not self.engines:
            return None
        loaded = self.engines[max(self.engines)][1]
        try:
            return forward_problem(loaded, self.device)
        except Exception as e:  # e.g. the device failed: unhealthy, not a dead host
            return f"a one-token forward pass failed: {type(e).__name__}: {e}"


def free_memory_bytes(device: torch.device) -> int:
    """Memory a new allocation on `device` can take now. CUDA: the device's free memory plus
    what PyTorch's allocator holds unused (a closed engine's cache stays there). CPU: the
    kernel's available memory, within the process's cgroup limit."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return memory_within_cgroup()[1]  # as the node agents' memory probe reads it


def run_host(host: EngineHost, receive: Callable[[bool, float | None], list[tuple]],
             emit: Callable[[list[tuple]], None]) -> None:
    """The host's loop until a stop command: commands in (waiting for one only while no
    engine has work), a step of every engine, the events out."""
    while True:
        events: list[tuple] = []
        idle = not host.busy
        for command in receive(idle, LOAD_POLL_S if host.loading else None):
            if command[0] == "stop":
                return
            if command[0] == "wedge":
                log.warning("fault injected: the engine host stops")
                threading.Event().wait()  # never returns (a process still ends on EOF)
            events += host.apply(command)
        events += host.collect_loaded()
        events += host.step()
        if events:
            emit(events)


def _receive_from_queue(commands: queue.SimpleQueue) -> Callable[[bool, float | None], list]:
    def receive(block: bool, timeout: float | None) -> list[tuple]:
        out: list[tuple] = []
        if block:
            try:
                out.append(commands.get(timeout=timeout))
            except queue.Empty:
                return out
        while True:
            try:
                out.append(commands.get_nowait())
            except queue.Empty:
                return out
    return receive


def _read_commands(conn, commands: queue.SimpleQueue) -> None:
    """The engine process's reader thread: every command into the queue as it arrives. The
    replica's end closing (it exited, or was killed) ends the process at once, even while
    the stepping thread is in a step or wedged."""
    try:
        while True:
            commands.put(conn.recv())
    except (EOFError, OSError):
        pass
    except BaseException:  # a message it cannot read: the replica's end is broken too
        log.exception("the engine process cannot read its commands")
    finally:  # never a process left without a reader: it could not see the replica leave
        os._exit(0)


def _start_host_process(device: str, torch_threads: int) -> tuple[Connection, subprocess.Popen]:
    """`python -m orchestrator.serving.engine_host` with one end of a socket pair, on this
    process's import path. A fresh interpreter rather than multiprocessing's spawn, which
    re-runs the parent's main script in the child (a Ray worker's, or any user's)."""
    ours, theirs = socket.socketpair()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    worker = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.serving.engine_host", str(theirs.fileno()),
         str(device), str(torch_threads)], pass_fds=[theirs.fileno()], env=env)
    theirs.close()
    return Connection(ours.detach()), worker


def _name_this_thread(name: str) -> None:
    try:  # Linux: the name top and /proc show; elsewhere only a label, not needed
        with open("/proc/thread-self/comm", "w") as f:
            f.write(name)
    except OSError:
        pass


def host_process_main(conn, device: str, torch_threads: int) -> None:
    """The engine process: the host's loop over its end of the socket. It ends with a stop
    command or when the replica's end closes (the replica exited or was killed)."""
    logging.basicConfig(level=logging.INFO, format="engine host: %(levelname)s %(message)s")
    os.set_inheritable(conn.fileno(), False)  # nothing it starts may keep the socket open
    _name_this_thread(ENGINE_THREAD)
    torch.set_num_threads(torch_threads)
    commands: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=_read_commands, args=(conn, commands), name="commands",
                     daemon=True).start()
    try:
        run_host(EngineHost(device), _receive_from_queue(commands), conn.send)
    except OSError:  # the replica is gone: nothing left to serve
        pass


class EngineHostHandle:
    """The replica's end of a host: start it (a process, or a thread), send it commands, and
    get its events on the replica's event loop (`on_events(list)`, called there)."""

    def __init__(self, process: bool, device: str, torch_threads: int,
                 on_events: Callable[[list[tuple]], None], loop) -> None:
        self.process_host, self.on_events, self.loop = process, on_events, loop
        self.problem: str | None = None  # why the host is gone, once it is
        if process:
            self.conn, self.worker = _start_host_process(device, torch_threads)
            loop.add_reader(self.conn.fileno(), self._readable)
            self.reading = True
        else:
            self.commands: queue.SimpleQueue = queue.SimpleQueue()
            self.worker = threading.Thread(target=self._thread_main, args=(str(device),),
                                           name="generate", daemon=True)
            self.worker.start()

    @property
    def alive(self) -> bool:
        return self.problem is None

    def send(self, command: tuple) -> None:
        if self.problem is not None:
            return
        if not self.process_host:
            self.commands.put(command)
            return
        try:  # never waits long: the process's reader thread takes commands as they come
            self.conn.send(command)
        except (OSError, ValueError) as e:  # the process is gone; its EOF reports it too
            self._gone(f"the engine process is gone ({type(e).__name__}: {e})")

    def close(self) -> None:
        """Stop the host; a process that does not stop within 5 s is killed."""
        self.send(("stop", None))
        if self.process_host:
            self._stop_reading()
            try:
                self.worker.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.worker.kill()
                self.worker.wait()
            self.conn.close()
        self.problem = self.problem or "closed"

    def _readable(self) -> None:
        """Event lists waiting on the socket, a bounded number per wake-up (the loop calls
        again while more wait), so a chatty host cannot starve the replica's requests."""
        try:
            for _ in range(MAX_EVENTS_PER_WAKE):
                if not self.conn.poll():
                    return
                self.on_events(self.conn.recv())
        except (EOFError, OSError):
            self._gone(f"the engine process exited ({self._exit_status()})")

    def _exit_status(self) -> str:
        """The engine process's exit code, once reaped: its socket closes a moment before, and
        polled at once it read "exit code None" (an OOM kill's -9 is what an operator needs)."""
        try:
            return f"exit code {self.worker.wait(timeout=EXIT_WAIT_S)}"
        except subprocess.TimeoutExpired:
            return f"its socket closed; still running after {EXIT_WAIT_S:g} s"

    def _stop_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.conn.fileno())

    def _gone(self, message: str) -> None:
        if self.problem is not None:
            return
        self.problem = message
        if self.process_host:
            self._stop_reading()
            if self.worker.poll() is None:  # a send failed but it runs: it must not linger
                self.worker.kill()
        self.on_events([("host_died", message)])

    def _thread_main(self, device: str) -> None:
        def emit(events: list[tuple]) -> None:
            self.loop.call_soon_threadsafe(self.on_events, events)
        try:
            run_host(EngineHost(device), _receive_from_queue(self.commands), emit)
        except BaseException as e:  # a bug in the loop itself: the replica must hear of it
            log.exception("the engine host thread failed")
            self.loop.call_soon_threadsafe(self._gone, f"the engine thread failed: "
                                                       f"{type(e).__name__}: {e}")


def engine_source(loaded: LoadedModel, process: bool) -> Any:
    """What an "open" command carries: the loaded model itself for a thread host; for a
    process host (which loads its own copy, or shares one it holds of the same version) the
    directory it was loaded from and its version."""
    return (loaded.path, loaded.version) if process else loaded


if __name__ == "__main__":  # the engine process (_start_host_process)
    host_process_main(Connection(int(sys.argv[1])), sys.argv[2], int(sys.argv[3]))
