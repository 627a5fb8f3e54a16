"""FSDP2 against DDP on two local gloo workers (CPU), every figure measured in this one run.

- fsdp_vs_ddp_throughput: training tokens/s of `--strategy fsdp` over `--strategy ddp`, same
  config and data (tiny preset, 2 workers, one thread each), over `--steps` steps after
  WARMUP_STEPS (10) untimed ones on each side (FSDP's first steps on a CPU are several times
  slower), from the loop's own reports; rounds alternate which strategy goes first; median
  of the per-round ratios, with their spread.
- checkpoint save/load seconds, sharded (torch.distributed.checkpoint, every worker writes its
  shard) against full (rank 0 writes state.pt; every worker reads it), for the same model and
  optimizer state (`--ckpt-size` preset, default medium), each through the loop's own save and
  restore functions, after an untimed save and load of each; rounds alternate the order;
  medians, and sharded_vs_full_save / _load the median of the per-round ratios sharded over
  full, with their spread (`_spread`).

The machine is shared and its load drifts: each ratio is the median of the rounds' own ratios
(scripts.rounds.median_ratio), each side going first in turn (scripts.rounds.rotated). The
last line printed is one JSON object.
Usage: python -m scripts.bench_fsdp [--rounds 3] [--steps 60] [--ckpt-size medium]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from orchestrator.config import MODEL_PRESETS, TrainConfig
from orchestrator.runs import read_metrics
from orchestrator.training.local_workers import train_on_local_workers
from orchestrator.validation import strict_int
from scripts.flags import require_at_least
from scripts.rounds import median_ratio, rotated


# Steps each side runs untimed before its --steps are timed (FSDP's first steps on a CPU ran
# at 854 and 3,557 tok/s, then ~20k: a whole-run figure carried them).
WARMUP_STEPS = 10


def steady_tokens_per_s(run_dir: Path) -> float:
    """Tokens/s over the run's steps after WARMUP_STEPS, from its reports (metrics.jsonl; one
    every WARMUP_STEPS steps): the timed steps over the time their intervals' tokens_per_s
    say they took (each step's tokens alike, they cancel)."""
    steps = seconds_per_token_of_a_step = 0.0
    previous = 0
    for report in read_metrics(run_dir):
        step = int(report["step"])
        if previous >= WARMUP_STEPS:
            steps += step - previous
            seconds_per_token_of_a_step += (step - previous) / report["tokens_per_s"]
        previous = step
    return steps / seconds_per_token_of_a_step


def throughput_rounds(rounds: int, steps: int, workdir: Path) -> dict:
    rates = {"ddp": [], "fsdp": []}
    for r in range(rounds):
        got = {}
        for strategy in rotated(["ddp", "fsdp"], r):
            # WARMUP_STEPS untimed steps first on both sides (a report at their end), then
            # `steps` timed ones.
            config = TrainConfig(model_size="tiny", batch_size=8, seq_len=64,
                                 max_steps=WARMUP_STEPS + steps,
                                 checkpoint_every=WARMUP_STEPS + steps, log_every=WARMUP_STEPS,
                                 warmup_steps=5, eval_batches=1, strategy=strategy)
            run_dir = workdir / f"{strategy}-{r}"
            outcome = train_on_local_workers(config, run_dir)
            if "error" in outcome:
                raise SystemExit(f"{strategy} run failed: {outcome['error']}")
            got[strategy] = steady_tokens_per_s(run_dir)
            rates[strategy].append(got[strategy])
        print(f"round {r + 1}: ddp {got['ddp']:,.0f} tok/s, fsdp {got['fsdp']:,.0f} tok/s",
              flush=True)
    paired = median_ratio(rates["fsdp"], rates["ddp"])
    return {"ddp_tokens_per_s": round(statistics.median(rates["ddp"])),
            "fsdp_tokens_per_s": round(statistics.median(rates["fsdp"])),
            "fsdp_vs_ddp_throughput": round(paired["ratio"], 3),
            "fsdp_vs_ddp_spread": [round(r, 3) for r in paired["spread"]]}


def _checkpoint_worker(rank: int, world: int, size: str, rounds: int, workdir: str,
                       rendezvous: str) -> None:
    from orchestrator.training import loop
    from orchestrator.training import strategy as strategies
    from orchestrator.training.checkpoint import checkpoint_header, save_checkpoint
    from orchestrator.training.optim import build_optimizer
    from orchestrator.training.precision import Precision
    from orchestrator.training.local_workers import WorkerSession

    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=600))
    cpu = torch.device("cpu")
    session = WorkerSession(workdir, rank, world)
    built = {}
    for strategy in ("ddp", "fsdp"):
        config = TrainConfig(model_size=size, batch_size=2, seq_len=64, strategy=strategy)
        model = loop._new_model(config, cpu)
        if strategy == "fsdp":
            strategies.shard_model(model, Precision("fp32", "cpu"))
        optimizer = build_optimizer(model, config)
        x = torch.randint(0, 256, (2, 64))
        model(x, x)[1].backward()  # one step: the optimizer's moments exist and are saved
        if strategy == "ddp":
            for p in model.parameters():
                dist.all_reduce(p.grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        built[strategy] = (config, model, optimizer, scaler)

    def save(strategy: str, directory: str) -> None:
        config, model, optimizer, scaler = built[strategy]
        legs = loop.cosine_legs(None, config.max_steps, 0, config)
        if strategy == "fsdp":
            loop._save_sharded_checkpoint(directory, model, optimizer, scaler, config, 1, 0,
                                          session, legs)
        elif rank == 0:  # DDP: rank 0 holds everything and writes it
            save_checkpoint(directory, loop._checkpoint_state(model, optimizer, scaler,
                                                              config, 1, 0, world, legs))

    def load(strategy: str, directory: str) -> None:
        config, model, optimizer, scaler = built[strategy]
        loop._restore((directory, checkpoint_header(directory)), session, config, model,
                      optimizer, scaler)

    times = {f"{kind}_{op}": [] for kind in ("full", "sharded") for op in ("save", "load")}
    # A warm-up save and load of each kind first, not timed: the first of each pays one-time
    # costs (2 workers, tiny model: sharded save 0.35 s, then 0.10-0.14 s; full 0.026 s, then
    # ~0.011 s), which --rounds 1 reported and which could be the median of 3 rounds.
    for r in ("warmup", *range(rounds)):
        for strategy in rotated(["ddp", "fsdp"], 0 if r == "warmup" else r):
            kind = "sharded" if strategy == "fsdp" else "full"
            directory = os.path.join(workdir, f"{kind}-{r}")  # one directory all ranks share
            for op, fn in (("save", save), ("load", load)):
                dist.barrier()
                started = time.perf_counter()
                fn(strategy, directory)
                dist.barrier()  # done when the slowest worker is
                if r != "warmup":
                    times[f"{kind}_{op}"].append(time.perf_counter() - started)
    if rank == 0:
        sizes = {kind: sum(f.stat().st_size for f in Path(workdir, f"{kind}-0").iterdir())
                 for kind in ("full", "sharded")}
        figures = {f"{name}_s": round(statistics.median(values), 3)
                   for name, values in times.items()}
        figures.update({f"{kind}_checkpoint_mb": round(size / 2 ** 20, 1)
                        for kind, size in sizes.items()})
        for op in ("save", "load"):
            paired = median_ratio(times[f"sharded_{op}"], times[f"full_{op}"])
            figures[f"sharded_vs_full_{op}"] = round(paired["ratio"], 3)
            figures[f"sharded_vs_full_{op}_spread"] = [round(r, 3) for r in paired["spread"]]
        Path(workdir, "figures.json").write_text(json.dumps(figures))
    dist.destroy_process_group()


def checkpoint_rounds(size: str, rounds: int, workdir: Path) -> dict:
    import torch.multiprocessing as mp

    workdir.mkdir(parents=True, exist_ok=True)
    mp.spawn(_checkpoint_worker, args=(2, size, rounds, str(workdir),
                                       str(workdir / "rendezvous")), nprocs=2, join=True)
    return json.loads((workdir / "figures.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=strict_int, default=3)
    parser.add_argument("--steps", type=strict_int, default=60)
    parser.add_argument("--ckpt-size", default="medium", choices=tuple(MODEL_PRESETS))
    args = parser.parse_args()
    require_at_least(parser, args, 1, "rounds", "steps")  # a median of no rounds is no figure
    with tempfile.TemporaryDirectory(prefix="bench-fsdp-") as tmp:
        figures = {"workers": 2, "rounds": args.rounds, "steps": args.steps,
                   "checkpoint_model_size": args.ckpt_size}
        figures.update(throughput_rounds(args.rounds, args.steps, Path(tmp) / "train"))
        figures.update(checkpoint_rounds(args.ckpt_size, args.rounds, Path(tmp) / "ckpt"))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
