"""Serving benchmark: continuous batching vs static batching vs none, hot reload under load,
a replica killed under load. An async HTTP load generator against the app it deploys
(orchestrator/serving).

    python -m scripts.bench_serve                    # embedded local Ray, ~9 minutes
    python -m scripts.bench_serve --address auto     # an existing cluster (`ray start`)

Phases, same model, same replica (reconfigured through user_config, no restart):
  1. mixed load   `--concurrency` closed-loop clients; each request draws its prompt length
                  (8-200 tokens) and max_tokens (8-128) from a seeded generator; greedy. Three
                  settings alternate for `--rounds` rounds: continuous batching (the default),
                  static batching (@serve.batch, whole requests, cap `--max-batch-size`, the
                  same as continuous's rows) and unbatched (static, batches of 1). QPS counts
                  the answers that end inside each round's measured window (after a warm-up,
                  before the clients stop; requests still running then are abandoned);
  2. equal load   the same three, one round: every prompt 8-40 tokens, `--max-tokens` tokens
                  (the load of earlier measurements);
  3. reload       steady load; the checkpoint in user_config changes mid-run (hot reload):
                  failed requests, and the switch time = from the config update to the first
                  response carrying the new version;
  4. chaos        two replicas, steady load, one replica SIGKILLed (ray.kill) mid-run:
                  success rate.
In each setting's first mixed round, where the CPU went (orchestrator/cpu_shares.py): the
replica, its generation thread and the time that thread waited for a CPU, the ingress, Serve's
HTTP front (`--serving-path`: HAProxy by default, or Serve's Python proxy) and the load
generator, in percent of one core (cpu_pct_*, generation_thread_*).
Every `--stream-every`-th client streams (stream_options.include_usage): time to first token
(TTFT: to the first event) and time per output token (TPOT: the rest of the stream over the
tokens after the first) come from those; latency from all. Plus the latency of a single client
and two ceilings on the same machine: the serving path without generation (GET /v1/models) and
the model alone in this process (tokens/s of a batch of 1 vs a full batch, one thread; QPS
of each batching mode on the mixed load).
The last line printed is one JSON object with every figure. A ratio between two settings
(continuous_vs_static_qps, batching_speedup, static_batching_speedup and the model_alone_
ones) is the median of the rounds' own ratios, its spread [min, max] beside it (KEY_spread);
each round's QPS: qps_rounds_*, model_alone_mixed_qps_rounds. A setting's qps_* is its
answers over all its rounds' windows.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from orchestrator import cpu_shares
from orchestrator.polling import wait_for
from orchestrator.config import ConfigError, TrainConfig
from orchestrator.serving.settings import (ENGINE_THREAD, SERVING_PATHS, ServeSettings,
                                           free_port, serve_app_config)
from orchestrator.validation import strict_float, strict_int
from scripts.flags import require, require_at_least
from scripts.rounds import median_ratio, paired_rounds, rotated

APP = "bench-gpt"
MODEL = "orchestrator-gpt"
PROMPT_TEXT = ("The quick brown fox jumps over the lazy dog while the orchestrator places "
               "workers on heterogeneous nodes and serves completions.")
LONG_TEXT = (PROMPT_TEXT + " ") * 4  # prompts of the mixed load: slices of up to 200 bytes
MODES = ("continuous", "static", "unbatched")
# The ratios between settings (key: top, bottom), served and in this process without serving.
SERVED_RATIOS = {"continuous_vs_static_qps": ("continuous", "static"),
                 "batching_speedup": ("continuous", "unbatched"),
                 "static_batching_speedup": ("static", "unbatched")}
ALONE_RATIOS = {"model_alone_continuous_vs_static_qps": ("continuous", "static"),
                # the served batching_speedup's ceiling on this machine
                "model_alone_batching_speedup": ("continuous", "unbatched"),
                "model_alone_decode_kernel_speedup": ("continuous", "continuous_matmul")}


@dataclass(frozen=True)
class Load:
    """What each request asks: prompt length and max_tokens ranges (inclusive)."""

    prompt: tuple[int, int]
    max_tokens: tuple[int, int]

    def draw(self, rng: random.Random) -> tuple[str, int]:
        length = rng.randint(*self.prompt)
        start = rng.randrange(0, len(LONG_TEXT) - length)
        return LONG_TEXT[start:start + length], rng.randint(*self.max_tokens)


MIXED = Load((8, 200), (8, 128))
EQUAL_PROMPT = (8, 40)  # the equal load's prompt lengths (its max_tokens: --max-tokens)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", default=None,
                   help="Ray cluster to deploy on (default: start an embedded local Ray)")
    p.add_argument("--checkpoint", default=None,
                   help="model to serve (default: a fresh --model-size GPT written to a temp dir)")
    p.add_argument("--reload-checkpoint", default=None,
                   help="model to hot-reload to (default: a second fresh GPT)")
    p.add_argument("--model-size", default="small", choices=("tiny", "small", "medium"))
    p.add_argument("--context", type=strict_int, default=512, help="block size of fresh models")
    p.add_argument("--concurrency", type=strict_int, default=64, help="clients in phases 1-2")
    p.add_argument("--steady-concurrency", type=strict_int, default=16,
                   help="clients in phases 3-4")
    p.add_argument("--duration", type=strict_float, default=12.0,
                   help="measured seconds of each mixed-load round of each setting")
    p.add_argument("--equal-duration", type=strict_float, default=8.0,
                   help="measured seconds of each equal-load setting")
    p.add_argument("--rounds", type=strict_int, default=2,
                   help="alternating rounds of the mixed load (a drifting machine hits all)")
    p.add_argument("--warmup", type=strict_float, default=3.0,
                   help="seconds of load before a phase's measured window")
    p.add_argument("--max-tokens", type=strict_int, default=16, help="of the equal load")
    p.add_argument("--model-alone-seconds", type=strict_float, default=8.0,
                   help="seconds of each in-process mixed-load round per batching mode")
    p.add_argument("--stream-every", type=strict_int, default=8,
                   help="every n-th client streams (TTFT and TPOT are measured on those)")
    p.add_argument("--max-batch-size", type=strict_int, default=64,
                   help="rows of continuous batching, batch cap of static batching")
    p.add_argument("--max-concurrent-batches", type=strict_int, default=None,
                   help="batches a replica runs at once (default: the app's, 1)")
    p.add_argument("--port", type=strict_int, default=0, help="HTTP port (default: a free one)")
    p.add_argument("--serving-path", default="haproxy", choices=tuple(SERVING_PATHS),
                   help="HTTP front: Ray Serve's throughput mode behind HAProxy (the app's "
                        "default) or Serve's Python proxy (orchestrator/serving/settings.py)")
    p.add_argument("--engine-thread", action="store_true",
                   help="run continuous batching's engines on a thread of the replica instead "
                        "of a process of their own (the app's engine_process: false)")
    p.add_argument("--torch-threads", type=strict_int, default=1,
                   help="intra-op threads of the model replica (the app's torch_threads)")
    args = p.parse_args(argv)
    # Before Ray, Serve and the model-alone phases (~1 min): 0 rounds or a 0 s window died at
    # the end dividing by zero.
    require_at_least(p, args, 1, "rounds", "concurrency", "steady_concurrency", "max_tokens",
                     "stream_every", "max_batch_size", "torch_threads", "context")
    require(p, args, ("duration", "equal_duration", "model_alone_seconds"),
            lambda seconds: seconds > 0, "must be > 0")
    require_at_least(p, args, 0, "warmup")
    require(p, args, ("port",), lambda port: 0 <= port <= 65535,
            "must be a TCP port in [0, 65535] (0: a free one)")
    # Both found only later, as tracebacks: a missing model when the model-alone phase loaded
    # it (CheckpointError), a context the fresh models' TrainConfig refuses (ConfigError).
    from orchestrator.serving.loading import model_config
    from orchestrator.training.checkpoint import CheckpointError

    # The loads' longest requests (a longer one than a model's context: a CapacityError
    # traceback in the model-alone phase, and 400s counted as failures when served).
    longest_requests = (
        (MIXED.prompt[1] + MIXED.max_tokens[1],
         f"the mixed load's longest prompt, {MIXED.prompt[1]} tokens, and max_tokens "
         f"{MIXED.max_tokens[1]}"),
        (EQUAL_PROMPT[1] + args.max_tokens,
         f"the equal load's longest prompt, {EQUAL_PROMPT[1]} tokens, and "
         f"--max-tokens {args.max_tokens}"))
    for flag, path in (("--checkpoint", args.checkpoint),
                       ("--reload-checkpoint", args.reload_checkpoint)):
        if path is None:
            continue
        try:
            context = model_config(path).block_size  # (its weights are not read)
        except CheckpointError as e:
            p.error(f"{flag} {path}: {e}")
        for longest, what in longest_requests:
            if context < longest:
                p.error(f"{flag} {path}: its context, {context} tokens, must be >= {longest} "
                        f"({what})")
    if args.checkpoint is None or args.reload_checkpoint is None:  # a fresh model is made
        try:
            TrainConfig(model_size=args.model_size, seq_len=args.context)
        except ConfigError as e:
            p.error(f"--context {args.context}: {e}")
        for longest, what in longest_requests:
            require(p, args, ("context",), lambda context: context >= longest,
                    f"must be >= {longest} ({what})")
    # (0 read as "not given": the app's default ran, and nothing said so)
    require(p, args, ("max_concurrent_batches",), lambda n: n is None or n >= 1, "must be >= 1")
    # Every app the phases deploy, checked now: a setting the app refuses failed its deploy
    # only after the model-alone phases, Ray and Serve had started (minutes), as a traceback.
    try:
        for batching in batching_settings(args).values():
            app_config(args.port, "checkpoint", "checkpoint", 1, batching, args)
    except ConfigError as e:
        p.error(f"the serving app of --max-batch-size {args.max_batch_size}, "
                f"--max-concurrent-batches {args.max_concurrent_batches}, --torch-threads "
                f"{args.torch_threads} is refused: {e}")
    return args


def batching_settings(args: argparse.Namespace) -> dict[str, dict]:
    """The user_config of each batching setting (MODES) the mixed and equal loads compare."""
    return {
        "continuous": {"batching": "continuous", "max_batch_size": args.max_batch_size},
        "static": {"batching": "static", "adaptive_batching": True, "min_batch_size": 4,
                   "max_batch_size": args.max_batch_size, "max_batch_wait_ms": 10},
        "unbatched": {"batching": "static", "adaptive_batching": False, "min_batch_size": 1,
                      "max_batch_size": 1, "max_batch_wait_ms": 0}}


def run_settings(args: argparse.Namespace) -> dict:
    """The settings of this run that the JSON names (the batches a replica runs at once too:
    the app's default when --max-concurrent-batches is not given)."""
    return {"model_size": args.model_size, "max_tokens": args.max_tokens,
            "concurrency": args.concurrency, "max_batch_size": args.max_batch_size,
            "max_concurrent_batches": (args.max_concurrent_batches
                                       or ServeSettings().max_concurrent_batches),
            "serving_path": args.serving_path, "torch_threads": args.torch_threads,
            "engine_process": not args.engine_thread}


@dataclass
class Result:
    started: float
    ended: float
    status: int
    version: str = ""
    error: str = ""
    ttft: float | None = None  # streamed requests: seconds to the first event
    tpot: float | None = None  # streamed requests: seconds per output token after the first

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass
class Run:
    """One load phase: every request's result, and the window its throughput is measured
    in - from the end of the warm-up to the moment the clients stop sending."""

    results: list[Result]
    start: float
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start

    @property
    def qps(self) -> float:
        return len(self.measured()) / self.seconds

    def measured(self) -> list[Result]:
        """Successes that ended inside the window. Counting also those that end after it
        (every client's last request) would credit a phase with up to one latency of extra
        answers: 3 s of a 20 s phase without batching, 1 s with it - a bias against the
        batched/unbatched ratio."""
        return [r for r in self.results if r.ok and self.start <= r.ended <= self.end]


def fresh_checkpoints(model_size: str, context: int, directory: Path) -> tuple[str, str]:
    """Two differently initialised GPTs in the training checkpoint format (what a pretrain
    run writes), without spending minutes training: serving cost does not depend on it."""
    from orchestrator.serving.loading import save_untrained_checkpoint

    return tuple(str(save_untrained_checkpoint(directory / "bench-run" / f"checkpoint_{step:08d}",
                                               model_size, context, seed=seed, step=step))
                 for step, seed in ((100, 1), (200, 2)))


def app_config(port: int, initial: str, checkpoint: str, replicas: int, batching: dict,
               args: argparse.Namespace) -> dict:
    """The bench app. Only user_config and the replica count vary between phases: the args
    (with the `initial` checkpoint) stay the same, or Serve would replace the replicas
    instead of reconfiguring them. `--max-concurrent-batches` None: the app's default."""
    return serve_app_config(
        APP, port,
        {"checkpoint": initial, "accelerator": "cpu", "cpus_per_replica": 0.5,
         "max_batch_size": args.max_batch_size, "torch_threads": args.torch_threads,
         "engine_process": not args.engine_thread,
         **({"max_concurrent_batches": args.max_concurrent_batches}
            if args.max_concurrent_batches else {}),
         "health_check_period_s": 2, "hang_after_s": 10},
        autoscaling={"min_replicas": replicas, "max_replicas": replicas},
        user_config={"checkpoint": checkpoint, **batching}, serving_path=args.serving_path)


async def client_loop(session, base: str, until: float, results: list[Result],
                      rng: random.Random, load: Load | None, stream: bool = False) -> None:
    """One closed-loop client: POST a completion drawn from `load` (or GET /v1/models when
    load is None), wait for the whole answer, repeat."""
    import aiohttp

    while time.monotonic() < until:
        began = time.monotonic()
        try:
            if load is None:
                async with session.get(f"{base}/v1/models") as response:
                    await response.read()
                    results.append(Result(began, time.monotonic(), response.status))
                continue
            prompt, max_tokens = load.draw(rng)
            body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens,
                    "temperature": 0}
            if stream:
                results.append(await _streamed(session, base, body, began))
                continue
            async with session.post(f"{base}/v1/completions", json=body) as response:
                data = await response.json(content_type=None)
                results.append(Result(began, time.monotonic(), response.status,
                                      data.get("system_fingerprint", "") or "",
                                      "" if response.status == 200 else json.dumps(data)[:200]))
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
            results.append(Result(began, time.monotonic(), 0, "", f"{type(e).__name__}: {e}"))


async def _streamed(session, base: str, body: dict, began: float) -> Result:
    """One streamed completion: its TTFT (to the first event) and TPOT (the rest of the
    stream over the tokens after the first, counted by the usage event)."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    first, version, tokens = None, "", 0
    async with session.post(f"{base}/v1/completions", json=body) as response:
        if response.status != 200:
            text = await response.text()
            return Result(began, time.monotonic(), response.status, error=text[:200])
        async for line in response.content:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return Result(began, time.monotonic(), -1, error=json.dumps(event)[:200])
            if first is None and event.get("choices"):
                first = time.monotonic()
            version = event.get("system_fingerprint") or version
            tokens = (event.get("usage") or {}).get("completion_tokens", tokens)
    ended = time.monotonic()
    tpot = (ended - first) / (tokens - 1) if first is not None and tokens > 1 else None
    return Result(began, ended, 200, version, ttft=None if first is None else first - began,
                  tpot=tpot)


async def run_load(base: str, concurrency: int, seconds: float, load: Load | None,
                   during=None, warmup_s: float = 0.0, stream_every: int = 0,
                   abandon_after_s: float | None = None) -> Run:
    """`concurrency` closed-loop clients for `warmup_s` + `seconds`; `during()` runs alongside
    (the reload or the kill). With `abandon_after_s`, requests still running that long after
    the window are abandoned (their connections closed): they could not count any more, and
    a queue of slow unbatched requests would take minutes to drain."""
    import aiohttp

    results: list[Result] = []
    began = time.monotonic()
    until = began + warmup_s + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [asyncio.create_task(client_loop(
            session, base, until, results, random.Random(i), load,
            stream=bool(stream_every) and i % stream_every == stream_every - 1))
            for i in range(concurrency)]
        extra = [asyncio.create_task(during())] if during is not None else []
        if abandon_after_s is None:
            await asyncio.gather(*tasks, *extra)
        else:
            await asyncio.sleep(max(until - time.monotonic(), 0))
            await asyncio.wait(tasks, timeout=abandon_after_s)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, *extra, return_exceptions=True)
    return Run(results, began + warmup_s, until)


MODEL_ALONE_ROUNDS = 5  # alternating rounds of the batch of 1 and the full batch


def model_alone(checkpoint: str, batch: int, max_tokens: int,
                rounds: int = MODEL_ALONE_ROUNDS) -> tuple[dict, dict]:
    """Tokens/s of the served model in this process, one thread (as a replica runs it), for
    a batch of 1 and a full batch of the bench's prompts (8-40 bytes; the batch of 1 runs
    each of the full batch's prompts alone in turn, so both sides decode the same prompts:
    it was the shortest one alone) (each size's median over `rounds`
    alternating rounds, scripts.rounds.paired_rounds), and the batching gain: the median of
    the rounds' own full-batch over batch-of-1 tokens/s, with its spread. What batching can
    buy at most. (Each side was timed once, the batch of 1 always first: one call of a few
    ms set the gain.)"""
    import torch

    from orchestrator.serving.generation import GenerationRequest, SamplingParams, generate
    from orchestrator.serving.loading import load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loaded = load_model(checkpoint)
        rows = [GenerationRequest(tuple(PROMPT_TEXT[i:i + 8 + i % 33].encode()),
                                  SamplingParams(max_tokens, 0.0)) for i in range(batch)]

        def alone() -> None:  # the batch's own prompts, each a batch of 1 (the same lengths)
            for row in rows:
                generate(loaded.model, [row], loaded.block_size)

        timed = paired_rounds(alone, lambda: generate(loaded.model, rows, loaded.block_size),
                              rounds)
    finally:
        torch.set_num_threads(threads)
    # Each side decodes the same batch x max_tokens tokens: the batch of 1 in `batch` calls.
    figures = {size: {"step_ms": round(elapsed / (batch // size * max_tokens) * 1000, 2),
                      "tokens_per_s": round(batch * max_tokens / elapsed)}
               for size, elapsed in ((1, timed["first_s"]), (batch, timed["second_s"]))}
    # Per round: the same tokens' time alone over batched, t_1 / t_batch.
    gain = {"ratio": timed["ratio"], "spread": list(timed["spread"])}
    return figures, gain


# The processes of Serve's HTTP front, by command line: the Python proxy actor; HAProxy and the
# actor that manages it.
HTTP_FRONT = ("ProxyActor", "HAProxyManager", "/bin/haproxy")


def cpu_figures(threads: list, mode: str) -> dict:
    """Where the CPU went during a setting's load (percent of one core; orchestrator/
    cpu_shares.py): the model replica, the engine process where continuous batching runs,
    the generation thread (the busier of the engine process's stepping thread and the
    replica's busiest thread: static batching decodes on the replica's even while an idle
    engine process exists) with the time that thread waited, runnable, for a CPU, the
    ingress, Serve's HTTP front (HTTP_FRONT) and this process (the load generator). Empty
    where /proc has no schedstat."""
    if not threads:
        return {}
    replica = cpu_shares.of_process(threads, "GPTModel")
    # Continuous batching's engine process (engine_host.py), found by its stepping thread's
    # name.
    engine_pids = {t.pid for t in threads if t.thread == ENGINE_THREAD}
    engine = [t for t in threads if t.pid in engine_pids]
    stepping = [t for t in engine if t.thread == ENGINE_THREAD]
    generation = max(stepping + replica, key=lambda t: t.cpu_pct, default=None)

    def total(chosen: list) -> float:
        return round(sum(t.cpu_pct for t in chosen), 1)

    figures = {f"cpu_pct_replica_{mode}": total(replica),
               f"cpu_pct_ingress_{mode}": total(cpu_shares.of_process(threads, "Ingress")),
               f"cpu_pct_proxy_{mode}": total([t for marker in HTTP_FRONT
                                               for t in cpu_shares.of_process(threads, marker)]),
               f"cpu_pct_load_generator_{mode}": total(cpu_shares.this_process(threads)),
               f"cpu_pct_all_{mode}": total(threads)}
    if engine:
        figures[f"cpu_pct_engine_process_{mode}"] = total(engine)
    if generation is not None:
        figures[f"generation_thread_cpu_pct_{mode}"] = generation.cpu_pct
        figures[f"generation_thread_runqueue_wait_pct_{mode}"] = generation.runqueue_wait_pct
    return figures


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (0-1) of `values` in ms, interpolated between ranks as numpy's (and so
    the other benchmarks') percentile; None without values. (It was the rank above: p99 of
    100 requests was their slowest, and p50 of an even count the upper middle one.)"""
    if not values:
        return None
    return round(float(np.percentile(values, 100 * q)) * 1000, 1)


def model_alone_mixed(checkpoint: str, rows: int, seconds: float, rounds: int = 2
                      ) -> dict[str, list[float]]:
    """Each round's QPS of the served model in this process, one thread, on the mixed load
    with `rows` requests always outstanding (a closed loop without HTTP): continuous batching
    (the engine refilled as rows finish) vs static batching (batches of `rows` decoded to
    their end, generation.generate) vs unbatched (batches of one), alternating rounds of
    `seconds` each, every run drawing the same seeded sequence of requests. What the
    batching modes can give on this machine before the serving path
    takes its share. `continuous_matmul`: continuous batching with the decode kernel off (the
    matrix-product paths CUDA takes), the baseline of the kernel on this CPU."""
    import torch

    from orchestrator.serving.engine import ContinuousEngine, EngineLimits
    from orchestrator.serving.generation import GenerationRequest, SamplingParams, generate
    from orchestrator.serving.loading import load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    loaded = load_model(checkpoint)

    def requests():
        """The mixed load's requests, the same sequence for every run of every mode (one
        generator shared by all gave each mode the requests after the previous one's)."""
        rng = random.Random(0)
        while True:
            prompt, max_tokens = MIXED.draw(rng)
            yield GenerationRequest(tuple(loaded.tokenizer.encode(prompt)),
                                    SamplingParams(max_tokens, 0.0))

    def static(batch: int) -> float:
        drawn = requests()
        began, done = time.perf_counter(), 0
        while time.perf_counter() - began < seconds:
            generate(loaded.model, [next(drawn) for _ in range(batch)], loaded.block_size)
            done += batch
        return done / (time.perf_counter() - began)

    def continuous(use_decode_kernel: bool = True) -> float:
        engine = ContinuousEngine(loaded.model, loaded.block_size, loaded.tokenizer,
                                  EngineLimits.sized_for(rows, loaded.block_size, 16, 256))
        engine.cache.use_decode_kernel = use_decode_kernel
        drawn = requests()
        for key in range(rows):
            engine.add(key, next(drawn))
        # Timed from the steady state (as a closed loop runs): after `rows` have finished,
        # not while the first `rows` prompts are all prefilled at once.
        began, done, key = None, 0, rows
        while began is None or time.perf_counter() - began < seconds:
            for _, chunk in engine.step():
                if chunk.finish_reason:
                    done, key = done + 1, key + 1
                    engine.add(key, next(drawn))
            if began is None and done >= rows:
                began, done = time.perf_counter(), 0
        return done / (time.perf_counter() - began)

    qps: dict[str, list[float]] = {"continuous": [], "static": [], "unbatched": [],
                                   "continuous_matmul": []}
    measure = {"continuous": continuous,
               "continuous_matmul": lambda: continuous(use_decode_kernel=False),
               "static": lambda: static(rows), "unbatched": lambda: static(1)}
    try:
        for round_ in range(rounds):
            for mode in rotated(list(measure), round_):  # each mode first in turn
                qps[mode].append(measure[mode]())
    finally:
        torch.set_num_threads(threads)
    return qps


def round_ratios(qps: dict[str, list[float]], ratios: dict[str, tuple[str, str]]) -> dict:
    """Each of `ratios` (key: top, bottom) from every round's QPS of each setting: the median
    of the rounds' own ratios (scripts/rounds.py), its spread [min, max] under `KEY_spread`.
    None for both where a round of either side answered nothing (a 0 QPS round gives no
    ratio worth a median)."""
    figures: dict = {}
    for key, (top, bottom) in ratios.items():
        if not (all(qps[top]) and all(qps[bottom])):
            figures[key] = figures[f"{key}_spread"] = None
            continue
        paired = median_ratio(qps[top], qps[bottom])
        figures[key] = round(paired["ratio"], 2)
        figures[f"{key}_spread"] = [round(r, 2) for r in paired["spread"]]
    return figures


def summarize(name: str, runs: list[Run]) -> dict:
    """Requests and failures over whole runs; QPS, latency, TTFT and TPOT over their windows
    (runs of the same setting in alternating rounds add up)."""
    results = [r for run in runs for r in run.results]
    measured = [r for run in runs for r in run.measured()]
    ok = sum(r.ok for r in results)
    latencies = [r.ended - r.started for r in measured]
    ttft = [r.ttft for r in measured if r.ttft is not None]
    tpot = [r.tpot for r in measured if r.tpot is not None]
    figures = {"phase": name, "requests": len(results), "ok": ok,
               "failed": len(results) - ok,
               "qps": round(len(measured) / sum(run.seconds for run in runs), 1),
               "p50_ms": percentile(latencies, 0.5), "p99_ms": percentile(latencies, 0.99),
               "ttft_p50_ms": percentile(ttft, 0.5), "ttft_p99_ms": percentile(ttft, 0.99),
               "tpot_p50_ms": percentile(tpot, 0.5), "tpot_p99_ms": percentile(tpot, 0.99)}
    errors = sorted({r.error for r in results if not r.ok})[:3]
    print(f"{name:>10}: {figures}" + (f" errors: {errors}" if errors else ""), flush=True)
    return figures


def batch_sizes_since(before: dict, after: dict) -> Counter:
    """Batches run between two replica_stats() answers, by size."""
    return Counter({int(size): n - before["batch_sizes"].get(size, 0)
                    for size, n in after["batch_sizes"].items()
                    if n > before["batch_sizes"].get(size, 0)})


def switch_time(results: list[Result], new_version: str, applied_at: float) -> float | None:
    """Seconds from the config update to the first response that carries the new version."""
    firsts = [r.ended for r in results if r.ok and r.version == new_version]
    return round(min(firsts) - applied_at, 3) if firsts else None


def wait_for_checkpoint(base: str, checkpoint: str, timeout_s: float = 60.0) -> str:
    """The version /v1/models reports once it serves `checkpoint`."""
    def served() -> str | None:
        model = json.loads(_get(f"{base}/v1/models"))["data"][0]
        return model["version"] if model["checkpoint"] == str(Path(checkpoint).resolve()) \
            else None

    return wait_for(f"{checkpoint} served", served, timeout_s, every_s=0.2)


def replica_names(count: int, timeout_s: float = 30.0) -> list[str]:
    """Actor names of the model replicas, asked through the deployment handle."""
    from ray import serve

    handle = serve.get_deployment_handle("GPTModel", app_name=APP)
    names: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while len(names) < count and time.monotonic() < deadline:
        names.add(handle.replica_actor_name.remote().result(timeout_s=10))
    return sorted(names)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The two fresh checkpoints (a small GPT each) were left behind after every run.
    checkpoints = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    try:
        return benchmark(args, checkpoints)
    finally:
        shutil.rmtree(checkpoints, ignore_errors=True)


def benchmark(args: argparse.Namespace, checkpoints: Path) -> int:
    """Every phase; fresh models are written to `checkpoints`."""
    import ray
    from ray import serve

    from ray_layer.serve_app import deploy_config, wait_for_app

    # (only where one is missing: --context is checked for the fresh models alone)
    first, second = (args.checkpoint, args.reload_checkpoint)
    if first is None or second is None:
        fresh = fresh_checkpoints(args.model_size, args.context, checkpoints)
        first, second = first or fresh[0], second or fresh[1]
    out: dict = run_settings(args)
    alone, gain = model_alone(first, args.max_batch_size, args.max_tokens)
    out["model_alone_tokens_per_s"] = {f"batch_{k}": v["tokens_per_s"] for k, v in alone.items()}
    out["model_alone_step_ms"] = {f"batch_{k}": v["step_ms"] for k, v in alone.items()}
    # What batching gains inside the model: the end-to-end speedup cannot go far beyond it.
    out["model_alone_batching_gain"] = round(gain["ratio"], 2)
    out["model_alone_batching_gain_spread"] = [round(r, 2) for r in gain["spread"]]
    print(f"model alone: {alone}", flush=True)
    mixed_alone = model_alone_mixed(first, args.max_batch_size, args.model_alone_seconds)
    out["model_alone_mixed_qps"] = {mode: round(statistics.median(rounds), 2)
                                    for mode, rounds in mixed_alone.items()}
    out["model_alone_mixed_qps_rounds"] = {mode: [round(q, 2) for q in rounds]
                                           for mode, rounds in mixed_alone.items()}
    out.update(round_ratios(mixed_alone, ALONE_RATIOS))
    print(f"model alone, mixed load: {out['model_alone_mixed_qps_rounds']}", flush=True)

    # Not the replicas' logs: one access-log line per request (thousands) would bury the
    # figures, and this process, which also runs the load, would spend CPU printing them.
    if args.address:
        ray.init(address=args.address, log_to_driver=False)
    else:
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    port = args.port or free_port()
    base = f"http://127.0.0.1:{port}"
    settings = batching_settings(args)
    batched = settings["continuous"]
    equal = Load(EQUAL_PROMPT, (args.max_tokens, args.max_tokens))

    def deploy(checkpoint: str, replicas: int, batching: dict) -> None:
        deploy_config(app_config(port, first, checkpoint, replicas, batching, args))
        wait_for_app(APP, replicas={"GPTModel": replicas})

    def load(concurrency: int, seconds: float, kind: Load | None = equal, during=None,
             warmup_s: float = args.warmup, stream_every: int = 0,
             abandon_after_s: float | None = None) -> Run:
        return asyncio.run(run_load(base, concurrency, seconds, kind, during, warmup_s,
                                    stream_every, abandon_after_s))

    def sample_cpu_into(into: dict, mode: str, seconds: float):
        async def during() -> None:  # inside the measured window, after the warm-up
            await asyncio.sleep(args.warmup)
            into[mode] = await asyncio.to_thread(cpu_shares.sample, min(seconds, 10.0))
        return during

    def stats() -> dict:
        return serve.get_deployment_handle("GPTModel", app_name=APP) \
            .replica_stats.remote().result(timeout_s=10)

    def compare(name: str, kind: Load, rounds: int, seconds: float) -> dict:
        """The three settings on the same replica and load, alternating for `rounds`; where
        the CPU went is sampled in each setting's first round."""
        runs: dict[str, list[Run]] = {mode: [] for mode in MODES}
        sizes: dict[str, Counter] = {mode: Counter() for mode in MODES}
        threads: dict[str, list] = {}
        for round_ in range(rounds):
            for mode in rotated(list(MODES), round_):  # each first in turn: drift is shared
                deploy(first, 1, settings[mode])
                before = stats()
                sampler = None if round_ else sample_cpu_into(threads, mode, seconds)
                runs[mode].append(load(args.concurrency, seconds, kind, during=sampler,
                                       stream_every=args.stream_every, abandon_after_s=2.0))
                sizes[mode].update(batch_sizes_since(before, stats()))
        figures: dict = {}
        for mode, sampled in threads.items():
            figures.update(cpu_figures(sampled, mode))
        for mode in MODES:
            phase = summarize(f"{name} {mode}", runs[mode])
            count = sum(sizes[mode].values())
            print(f"   {mode} passes: {count}, rows per pass "
                  f"{dict(sorted(sizes[mode].items()))}", flush=True)
            figures.update({f"{key}_{mode}": phase[key] for key in (
                "qps", "p50_ms", "p99_ms", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms",
                "tpot_p99_ms", "failed")})
            figures[f"mean_rows_per_pass_{mode}"] = round(
                sum(k * n for k, n in sizes[mode].items()) / max(count, 1), 2)
            figures[f"qps_rounds_{mode}"] = [round(run.qps, 1) for run in runs[mode]]
        figures.update(round_ratios({mode: [run.qps for run in runs[mode]] for mode in MODES},
                                    SERVED_RATIOS))
        return figures

    try:
        deploy(first, 1, batched)
        load(8, 3)  # warm-up
        phase = summarize("ceiling", [load(args.concurrency, 5, None)])
        out["qps_without_generation"] = phase["qps"]

        phase = summarize("one client", [load(1, 6)])  # latency without queueing
        out.update(p50_ms_one_client=phase["p50_ms"], p99_ms_one_client=phase["p99_ms"])

        out.update(compare("mixed", MIXED, args.rounds, args.duration))
        out["mixed_load"] = {"prompt_tokens": list(MIXED.prompt),
                             "max_tokens": list(MIXED.max_tokens), "context": args.context}
        out["equal_length"] = compare("equal", equal, 1, args.equal_duration)

        deploy(first, 1, batched)
        applied: dict[str, float] = {}

        async def reload() -> None:
            await asyncio.sleep(5)
            applied["at"] = time.monotonic()
            await asyncio.to_thread(deploy_config, app_config(port, first, second, 1, batched,
                                                              args))

        run = load(args.steady_concurrency, 15, MIXED, during=reload, warmup_s=0)
        summarize("reload", [run])
        results = run.results
        new_version = wait_for_checkpoint(base, second)
        out["reload_switch_s"] = switch_time(results, new_version, applied["at"])
        out["reload_replica_load_ms"] = stats()["last_switch_ms"]
        out["reload_failed_requests"] = sum(not r.ok for r in results)
        out["reload_requests"] = len(results)

        deploy(second, 2, batched)
        victim = replica_names(2)[0]

        async def kill() -> None:
            await asyncio.sleep(5)
            ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
            print(f"     chaos: killed {victim}", flush=True)

        run = load(args.steady_concurrency, 20, MIXED, during=kill, warmup_s=0)
        summarize("chaos", [run])
        results = run.results
        out["chaos_requests"] = len(results)
        out["chaos_success_rate"] = round(sum(r.ok for r in results) / max(len(results), 1), 5)
        status = wait_for_app(APP, timeout_s=60, replicas={"GPTModel": 2})
        out["chaos_replicas_after"] = status.deployments["GPTModel"].replica_states
    finally:
        serve.shutdown()
        ray.shutdown()
    print(json.dumps(out))
    return 0


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read().decode()


if __name__ == "__main__":
    sys.exit(main())
