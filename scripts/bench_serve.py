"""Serving benchmark: dynamic batching on vs off, hot reload under load, a replica killed
under load. An async HTTP load generator against the app it deploys (orchestrator/serving).

    python -m scripts.bench_serve                    # embedded local Ray, ~4 minutes
    python -m scripts.bench_serve --address auto     # an existing cluster (`ray start`)

Phases, same model and replica count for the first two:
  1. batched    adaptive dynamic batching (max batch 32), `--concurrency` closed-loop clients
  2. unbatched  the same replica reconfigured to batches of 1 (user_config, no restart)
     1 and 2 alternate for `--rounds` rounds; QPS counts the answers that end inside each
     round's measured window (after a warm-up, before the clients stop), over its length
  3. reload     steady load; the checkpoint in user_config changes mid-run (hot reload):
                failed requests, and the switch time = from the config update to the first
                response carrying the new version
  4. chaos      two replicas, steady load, one replica SIGKILLed (ray.kill) mid-run:
                success rate
plus the latency of a single client (no queueing) and, to explain the speedup, two ceilings
measured on the same machine: the serving path without generation (GET /v1/models: proxy ->
ingress -> model replica and back, at the same concurrency), and the model alone in this
process (tokens/s of a batch of 1 vs a full batch, one thread as in a replica).
Each request: a prompt of 8-40 bytes, `--max-tokens` greedy tokens. The last line printed is
one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from orchestrator.polling import wait_for
from orchestrator.serving.settings import free_port, serve_app_config

APP = "bench-gpt"
MODEL = "orchestrator-gpt"
PROMPT_TEXT = ("The quick brown fox jumps over the lazy dog while the orchestrator places "
               "workers on heterogeneous nodes and serves completions.")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", default=None,
                   help="Ray cluster to deploy on (default: start an embedded local Ray)")
    p.add_argument("--checkpoint", default=None,
                   help="model to serve (default: a fresh --model-size GPT written to a temp dir)")
    p.add_argument("--reload-checkpoint", default=None,
                   help="model to hot-reload to (default: a second fresh GPT)")
    p.add_argument("--model-size", default="small", choices=("tiny", "small", "medium"))
    p.add_argument("--context", type=int, default=128, help="block size of fresh models")
    p.add_argument("--concurrency", type=int, default=64, help="clients in phases 1-2")
    p.add_argument("--steady-concurrency", type=int, default=16, help="clients in phases 3-4")
    p.add_argument("--duration", type=float, default=12.0,
                   help="measured seconds of each phase-1 and phase-2 round")
    p.add_argument("--rounds", type=int, default=2,
                   help="alternating rounds of phases 1 and 2 (a drifting machine hits both)")
    p.add_argument("--warmup", type=float, default=2.0,
                   help="seconds of load before a phase's measured window")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-concurrent-batches", type=int, default=None,
                   help="batches a replica runs at once (default: the app's, 1)")
    p.add_argument("--port", type=int, default=0, help="HTTP port (default: a free one)")
    return p.parse_args(argv)


@dataclass
class Result:
    started: float
    ended: float
    status: int
    version: str = ""
    error: str = ""

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
               max_batch_size: int, max_concurrent_batches: int | None = None) -> dict:
    """The bench app. Only user_config and the replica count vary between phases: the args
    (with the `initial` checkpoint) stay the same, or Serve would replace the replicas
    instead of reconfiguring them. `max_concurrent_batches` None: the app's default."""
    return serve_app_config(
        APP, port,
        {"checkpoint": initial, "accelerator": "cpu", "cpus_per_replica": 0.5,
         "max_batch_size": max_batch_size,
         **({"max_concurrent_batches": max_concurrent_batches}
            if max_concurrent_batches else {}),
         "health_check_period_s": 2, "hang_after_s": 10},
        autoscaling={"min_replicas": replicas, "max_replicas": replicas},
        user_config={"checkpoint": checkpoint, **batching})


async def client_loop(session, base: str, until: float, results: list[Result],
                      rng: random.Random, max_tokens: int | None) -> None:
    """One closed-loop client: POST a completion (or GET /v1/models when max_tokens is None),
    wait for the answer, repeat."""
    import aiohttp

    while time.monotonic() < until:
        start = rng.randrange(0, len(PROMPT_TEXT) - 40)
        prompt = PROMPT_TEXT[start:start + rng.randrange(8, 41)]
        body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        began = time.monotonic()
        try:
            if max_tokens is None:
                request = session.get(f"{base}/v1/models")
            else:
                request = session.post(f"{base}/v1/completions", json=body)
            async with request as response:
                data = await response.json(content_type=None)
                results.append(Result(began, time.monotonic(), response.status,
                                      data.get("system_fingerprint", "") or "",
                                      "" if response.status == 200 else json.dumps(data)[:200]))
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
            results.append(Result(began, time.monotonic(), 0, "", f"{type(e).__name__}: {e}"))


async def run_load(base: str, concurrency: int, seconds: float, max_tokens: int | None,
                   during=None, warmup_s: float = 0.0) -> Run:
    """`concurrency` closed-loop clients for `warmup_s` + `seconds`; `during()` runs alongside
    (the reload or the kill)."""
    import aiohttp

    results: list[Result] = []
    began = time.monotonic()
    until = began + warmup_s + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [asyncio.create_task(client_loop(session, base, until, results,
                                                 random.Random(i), max_tokens))
                 for i in range(concurrency)]
        if during is not None:
            tasks.append(asyncio.create_task(during()))
        await asyncio.gather(*tasks)
    return Run(results, began + warmup_s, until)


def model_alone(checkpoint: str, batch: int, max_tokens: int) -> dict:
    """Tokens/s of the served model in this process, one thread (as a replica runs it), for
    a batch of 1 and a full batch of the bench's prompts: what batching can buy at most."""
    import torch

    from orchestrator.serving.generation import GenerationRequest, SamplingParams, generate
    from orchestrator.serving.loading import load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loaded = load_model(checkpoint)
        figures = {}
        for size in (1, batch):
            requests = [GenerationRequest(tuple(PROMPT_TEXT[i:i + 8 + i % 33].encode()),
                                          SamplingParams(max_tokens, 0.0)) for i in range(size)]
            generate(loaded.model, requests, loaded.block_size)  # warm-up
            began = time.perf_counter()
            generate(loaded.model, requests, loaded.block_size)
            elapsed = time.perf_counter() - began
            figures[size] = {"step_ms": round(elapsed / max_tokens * 1000, 2),
                             "tokens_per_s": round(size * max_tokens / elapsed)}
    finally:
        torch.set_num_threads(threads)
    return figures


def summarize(name: str, runs: list[Run]) -> dict:
    """Requests and failures over whole runs; QPS and latency over their windows (runs of the
    same setting in alternating rounds add up)."""
    results = [r for run in runs for r in run.results]
    measured = [r for run in runs for r in run.measured()]
    ok = sum(r.ok for r in results)
    latencies = sorted((r.ended - r.started) * 1000 for r in measured)
    figures = {"phase": name, "requests": len(results), "ok": ok,
               "failed": len(results) - ok,
               "qps": round(len(measured) / sum(run.seconds for run in runs), 1),
               "p50_ms": round(statistics.median(latencies), 1) if latencies else None,
               "p99_ms": round(latencies[min(len(latencies) - 1,
                                             int(0.99 * len(latencies)))], 1)
               if latencies else None}
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
    import ray
    from ray import serve

    from ray_layer.serve_app import deploy_config, wait_for_app

    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    first, second = fresh_checkpoints(args.model_size, args.context, tmp)
    first, second = args.checkpoint or first, args.reload_checkpoint or second
    out: dict = {"model_size": args.model_size, "max_tokens": args.max_tokens,
                 "concurrency": args.concurrency, "max_batch_size": args.max_batch_size}
    alone = model_alone(first, args.max_batch_size, args.max_tokens)
    out["model_alone_tokens_per_s"] = {f"batch_{k}": v["tokens_per_s"] for k, v in alone.items()}
    out["model_alone_step_ms"] = {f"batch_{k}": v["step_ms"] for k, v in alone.items()}
    # What batching gains inside the model: the end-to-end speedup cannot go far beyond it.
    out["model_alone_batching_gain"] = round(
        alone[args.max_batch_size]["tokens_per_s"] / alone[1]["tokens_per_s"], 2)
    print(f"model alone: {alone}", flush=True)

    # Not the replicas' logs: one access-log line per request (thousands) would bury the
    # figures, and this process, which also runs the load, would spend CPU printing them.
    if args.address:
        ray.init(address=args.address, log_to_driver=False)
    else:
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    port = args.port or free_port()
    base = f"http://127.0.0.1:{port}"
    batched = {"adaptive_batching": True, "min_batch_size": 4,
               "max_batch_size": args.max_batch_size, "max_batch_wait_ms": 10}
    unbatched = {"adaptive_batching": False, "min_batch_size": 1, "max_batch_size": 1,
                 "max_batch_wait_ms": 0}

    def deploy(checkpoint: str, replicas: int, batching: dict) -> None:
        deploy_config(app_config(port, first, checkpoint, replicas, batching,
                                 args.max_batch_size, args.max_concurrent_batches))
        wait_for_app(APP, replicas={"GPTModel": replicas})

    def load(concurrency: int, seconds: float, max_tokens: int | None = args.max_tokens,
             during=None, warmup_s: float = args.warmup) -> Run:
        return asyncio.run(run_load(base, concurrency, seconds, max_tokens, during, warmup_s))

    def stats() -> dict:
        return serve.get_deployment_handle("GPTModel", app_name=APP) \
            .replica_stats.remote().result(timeout_s=10)

    try:
        deploy(first, 1, batched)
        load(8, 3)  # warm-up
        phase = summarize("ceiling", [load(args.concurrency, 8, max_tokens=None)])
        out["qps_without_generation"] = phase["qps"]

        phase = summarize("one client", [load(1, 8)])  # latency without queueing
        out.update(p50_ms_one_client=phase["p50_ms"], p99_ms_one_client=phase["p99_ms"])

        batched_runs, unbatched_runs, sizes = [], [], Counter()
        for _ in range(args.rounds):
            # Alternating rounds: a drift in this shared machine's speed falls on both.
            deploy(first, 1, batched)
            before = stats()
            batched_runs.append(load(args.concurrency, args.duration))
            sizes.update(batch_sizes_since(before, stats()))
            deploy(first, 1, unbatched)  # the same replica, reconfigured
            unbatched_runs.append(load(args.concurrency, args.duration))
        phase = summarize("batched", batched_runs)
        print(f"   batches: {sum(sizes.values())}, sizes {dict(sorted(sizes.items()))}",
              flush=True)
        out.update(qps_batched=phase["qps"], p50_ms=phase["p50_ms"], p99_ms=phase["p99_ms"],
                   largest_batch=max(sizes, default=0),
                   mean_batch=round(sum(k * n for k, n in sizes.items())
                                    / max(sum(sizes.values()), 1), 2))
        phase = summarize("unbatched", unbatched_runs)
        out.update(qps_unbatched=phase["qps"], p50_ms_unbatched=phase["p50_ms"],
                   p99_ms_unbatched=phase["p99_ms"])
        out["batching_speedup"] = (round(out["qps_batched"] / out["qps_unbatched"], 2)
                                   if out["qps_unbatched"] else None)

        deploy(first, 1, batched)
        applied: dict[str, float] = {}

        async def reload() -> None:
            await asyncio.sleep(5)
            applied["at"] = time.monotonic()
            await asyncio.to_thread(deploy_config, app_config(
                port, first, second, 1, batched, args.max_batch_size,
                args.max_concurrent_batches))

        run = load(args.steady_concurrency, 15, during=reload, warmup_s=0)
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

        run = load(args.steady_concurrency, 20, during=kill, warmup_s=0)
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
