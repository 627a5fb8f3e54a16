"""Launcher overhead: `orchestrator.launch.fit` against a bare `TorchTrainer(...).fit()` of the
same loop, on the same embedded Ray (2 workers, 1 CPU each, DDP over gloo).

The loop is one function for both; the only difference is the report it calls
(`ray.train.report` bare, `orchestrator.launch.report` under the launcher, which adds the
scheduler's directive check and a broadcast from rank 0 per report). The launcher also
connects, brings the scheduler and node agents up, submits the job, waits for its placement,
pins each worker to its placed node and releases the reservation at the end.

- startup: from the driver's call (`fit`) to rank 0's first report, per round;
  startup_overhead_s = median(launcher) - median(bare); startup_ratio = median over the rounds
  of launcher over bare start-up of the same round, with its spread (startup_ratio_spread).
- steady state: samples trained between rank 0's first and last report over the wall time
  between them (rank 0's clock, taken as it calls report). Ray Train's controller takes one
  report per poll (Ray's default 2 s; the launcher sets 0.25 s for the process, so every run
  after its first call, the bare one too, polls at 0.25 s) and a worker's next report waits
  for it, so every report here
  covers --seconds-per-report (default 4) of training, calibrated before the rounds: the
  pacing then never holds a worker back. steady_state_ratio = median over the rounds of
  launcher samples/s over the bare samples/s of the same round (each round's in
  steady_state_ratios, min and max in steady_state_ratio_spread).
- where the time goes: in_report_s (mean time rank 0 spends inside a report call, after the
  first) and compute_samples_per_s (samples over the time outside report calls), per kind;
  compute_ratio (and compute_ratio_spread) as steady_state_ratio, from the latter.
- each round runs one of each, each side going first in turn (bare first in even rounds:
  neither always follows the other's teardown); one warm-up of each first (not
  counted: the first launcher call creates the scheduler and the agents). Before every run,
  bare or not, the machine idles --settle-s (default 6 s): the scheduler learns what Ray has
  free from its maintenance pass (every 5 s), and a bare run's workers, which it does not
  know about, would otherwise still count as busy and queue the next launcher run.

The last stdout line is one JSON object.
Usage: python -m scripts.bench_launch [--rounds 3] [--reports 5] [--seconds-per-report 4]
                                      [--settle-s 6]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from orchestrator.validation import strict_float, strict_int
from scripts.flags import require, require_at_least
from scripts.rounds import median_ratio, rotated

WORKERS = 2
BATCH = 256
WIDTH = 512


def model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(),
                         nn.Linear(WIDTH, 1))


def train_step(net: nn.Module, optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    optimizer.zero_grad()
    loss = nn.functional.mse_loss(net(x).squeeze(-1), y)
    loss.backward()
    optimizer.step()
    return loss.item()


def bench_loop(config: dict) -> None:
    """The loop both ways: `steps_per_report` steps, then a report, `reports` times; rank 0
    appends (report index, time, samples so far) to config["timing"] as it reports."""
    import ray.train
    import ray.train.torch

    from orchestrator import launch

    report = ray.train.report if config["bare"] else launch.report
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(0)
    net = ray.train.torch.prepare_model(model())
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(rank)
    x, y = torch.randn(BATCH, 64, generator=generator), torch.randn(BATCH, generator=generator)
    samples = 0
    for index in range(config["reports"]):
        for _ in range(config["steps_per_report"]):
            loss = train_step(net, optimizer, x, y)
        samples += config["steps_per_report"] * BATCH * world
        called = time.time()
        report({"step": index, "loss": loss, "samples": samples})
        if rank == 0:
            with open(config["timing"], "a") as f:
                f.write(json.dumps({"report": index, "time": called, "returned": time.time(),
                                    "samples": samples}) + "\n")


def calibrate(seconds_per_report: float) -> tuple[int, float]:
    """Steps that take `seconds_per_report` in one process on one thread (a worker's share
    of this machine), and the time of one step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net, x, y = model(), torch.randn(BATCH, 64), torch.randn(BATCH)
        optimizer = torch.optim.SGD(net.parameters(), lr=1e-3)
        for _ in range(5):
            train_step(net, optimizer, x, y)
        start, n = time.perf_counter(), 30
        for _ in range(n):
            train_step(net, optimizer, x, y)
        step_s = (time.perf_counter() - start) / n
    finally:
        torch.set_num_threads(threads)
    return max(1, round(seconds_per_report / step_s)), step_s


def figures(timing: Path, called_at: float) -> dict:
    """startup_s; samples_per_s over wall time; in_report_s, the mean time rank 0 spent inside
    a report call (after the first); compute_samples_per_s, over the time outside them."""
    rows = [json.loads(line) for line in timing.read_text().splitlines()]
    first, last = rows[0], rows[-1]
    samples = last["samples"] - first["samples"]
    outside = sum(b["time"] - a["returned"] for a, b in zip(rows, rows[1:]))
    return {"startup_s": first["time"] - called_at,
            "samples_per_s": samples / (last["time"] - first["time"]),
            "in_report_s": statistics.mean(r["returned"] - r["time"] for r in rows[1:]),
            "compute_samples_per_s": samples / outside}


def run_bare(config: dict, storage: Path, name: str) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    called_at = time.time()
    TorchTrainer(bench_loop, train_loop_config={**config, "bare": True},
                 scaling_config=ScalingConfig(num_workers=WORKERS,
                                              resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name=name, storage_path=str(storage))).fit()
    return figures(Path(config["timing"]), called_at)


def run_launcher(config: dict, storage: Path, name: str) -> dict:
    from orchestrator import launch
    from orchestrator.config import JobSpec

    called_at = time.time()
    launch.fit(bench_loop, spec=JobSpec(name, num_workers=WORKERS, cpus_per_worker=1),
               config={**config, "bare": False}, run_dir=storage / name, max_failures=0)
    return figures(Path(config["timing"]), called_at)


def comparison(rows: list[dict]) -> dict:
    """The launcher against bare from every run's figures (`rows`: round, kind and figures();
    round 0 is the warm-up): each ratio the median of the rounds' own ratios with its spread
    (scripts.rounds.median_ratio), the sides' figures as medians."""
    measured = [r for r in rows if r["round"] > 0]

    def of(kind: str, key: str) -> list[float]:
        return [r[key] for r in measured if r["kind"] == kind]

    def median_of(kind: str, key: str) -> float:
        return statistics.median(of(kind, key))

    def launcher_over_bare(key: str) -> dict:
        return median_ratio(of("launcher", key), of("bare", key))

    def spread(paired: dict) -> list[float]:
        return [round(r, 3) for r in paired["spread"]]

    startup, steady, compute = (launcher_over_bare(key) for key in (
        "startup_s", "samples_per_s", "compute_samples_per_s"))
    return {
        "startup_overhead_s": round(median_of("launcher", "startup_s")
                                    - median_of("bare", "startup_s"), 2),
        "steady_state_ratio": round(steady["ratio"], 3),
        "steady_state_ratio_spread": spread(steady),
        "bare_startup_s": round(median_of("bare", "startup_s"), 2),
        "launcher_startup_s": round(median_of("launcher", "startup_s"), 2),
        "startup_ratio": round(startup["ratio"], 3),
        "startup_ratio_spread": spread(startup),
        "bare_samples_per_s": round(median_of("bare", "samples_per_s")),
        "launcher_samples_per_s": round(median_of("launcher", "samples_per_s")),
        "steady_state_ratios": [round(r, 3) for r in steady["rounds"]],
        "bare_in_report_s": round(median_of("bare", "in_report_s"), 3),
        "launcher_in_report_s": round(median_of("launcher", "in_report_s"), 3),
        "compute_ratio": round(compute["ratio"], 3),
        "compute_ratio_spread": spread(compute),
        "warmup_launcher_startup_s": round(next(r["startup_s"] for r in rows
                                                if r["round"] == 0 and r["kind"] == "launcher"),
                                           2),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=strict_int, default=3, help="measured rounds of each")
    parser.add_argument("--reports", type=strict_int, default=5, help="reports per run")
    parser.add_argument("--seconds-per-report", type=strict_float, default=4.0)
    parser.add_argument("--settle-s", type=strict_float, default=6.0,
                        help="idle time before each run (see above)")
    args = parser.parse_args(argv)
    # (NaN is refused too: it passed `<= 0` and failed in calibrate; a negative --settle-s
    # failed in time.sleep after Ray had started)
    require_at_least(parser, args, 1, "rounds")
    require_at_least(parser, args, 2, "reports")
    require(parser, args, ("seconds_per_report",), lambda seconds: seconds > 0, "must be > 0")
    require_at_least(parser, args, 0, "settle_s")

    import ray

    steps_per_report, step_s = calibrate(args.seconds_per_report)
    print(f"{steps_per_report} steps per report (one step {step_s * 1000:.1f} ms on one "
          f"thread), {args.reports} reports per run", flush=True)
    ray.init(address="local", num_cpus=WORKERS, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            storage = Path(tmp)
            sides = [("bare", run_bare), ("launcher", run_launcher)]
            for round_ in range(args.rounds + 1):  # round 0: the warm-up
                # Each side first in turn: neither always follows the other's teardown.
                for kind, run in rotated(sides, round_):
                    name = f"bench-{kind}-{round_}"
                    config = {"reports": args.reports, "steps_per_report": steps_per_report,
                              "timing": str(storage / f"{name}.jsonl")}
                    time.sleep(args.settle_s)
                    row = {"round": round_, "kind": kind, **run(config, storage, name)}
                    print(f"{'warm-up' if round_ == 0 else f'round {round_}'} {kind:<8} "
                          f"startup {row['startup_s']:.2f} s, "
                          f"{row['samples_per_s']:,.0f} samples/s ({row['in_report_s']:.3f} s "
                          f"in each report, {row['compute_samples_per_s']:,.0f} samples/s "
                          "outside them)", flush=True)
                    rows.append(row)
    finally:
        ray.shutdown()

    result = {**comparison(rows), "rounds": args.rounds, "steps_per_report": steps_per_report,
              "reports": args.reports, "settle_s": args.settle_s, "workers": WORKERS}
    print(f"launcher vs bare: start-up +{result['startup_overhead_s']:.2f} s "
          f"({result['launcher_startup_s']:.2f} vs {result['bare_startup_s']:.2f} s), "
          f"steady state x{result['steady_state_ratio']:.3f} "
          f"({result['launcher_samples_per_s']:,} vs {result['bare_samples_per_s']:,} "
          "samples/s)")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
