"""Training-engine benchmark: every figure measured in this one run, on this machine.

- ray_vs_plain_throughput: tokens/s of jobs/pretrain.py (Ray Train, one worker with all CPUs)
  over the same config in a plain process (`train` with LocalSession; a fresh process each
  run, as each Ray run's worker is): Ray's overhead. Over
  the whole training phase (checkpoint saves, reports, evaluation included), the median of
  --rounds rounds alternating which side goes first, with its spread (min, max) and each
  round's ratio; ray_vs_plain_steps_only (and _spread): the same from the training steps'
  time alone.
- ray_vs_plain_core_left (machines with 2+ cores): the same comparison with both sides on
  cpu_count - 1 intra-op threads (the Ray worker reserving as many CPUs), so one core is left
  to Ray's own processes: where the first ratio's gap is their CPU on a machine whose every
  core trains, this one is near 1.
- mfu_cpu: MFU of the plain runs (median) against the CPU peak measured by a timed matmul.
- recovery_s: a Ray Train worker SIGKILLed mid-run -> first step after the automatic resume.
- span_speedup: forward time at long context of a full-attention model over a learnt-span model
  (keys beyond the learnt window never computed); span_train_speedup: the same for a training
  step's forward and backward; each the median of alternating rounds' ratios, with its spread
  (`_spread`); span_loss_delta: held-out loss (span) − held-out loss (full) after equal steps.
- fp16_skipped_steps: overflowing steps the dynamic loss scaler skipped in a short fp16 run
  (fp16 is emulated on this CPU: the count is real, the speed is not meaningful).

The last line printed is one JSON object with these figures.
Usage: python -m scripts.bench_train [--quick] [--rounds N] [--only-overhead]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import statistics
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from orchestrator.config import TrainConfig
from orchestrator.training.data import VOCAB_SIZE
from orchestrator.training.loop import train
from orchestrator.training.model import GPT, GPTConfig
from orchestrator.training.session import LocalSession
from orchestrator.validation import strict_int
from scripts.flags import require_at_least
from scripts.rounds import median_ratio, paired_rounds, rotated

CPU = torch.device("cpu")


def plain_vs_ray(steps: int, rounds: int, workdir: Path, cpus: int | None = None) -> dict:
    """The same run under Ray Train (jobs/pretrain.py: one worker with `cpus` CPUs, default
    every CPU) and in a plain process (`train` with LocalSession, as many intra-op threads),
    in `rounds` rounds that alternate which goes first, so machine drift falls on both. Each
    side's figure is tokens/s over its whole training phase (first step to the last: three
    checkpoint saves, a report every tenth step and the final evaluation included); the
    step-only rate is kept beside it to show where a difference goes."""
    cpus = cpus or os.cpu_count()
    log_every = max(steps // 10, 1)
    flags = {"model_size": "small", "batch_size": 16, "seq_len": 128, "max_steps": steps,
             "checkpoint_every": max(steps // 4, 1), "log_every": log_every,
             "warmup_steps": 5}
    phase: dict[str, list[float]] = {"plain": [], "ray": []}
    steps_only: dict[str, list[float]] = {"plain": [], "ray": []}
    mfu = []
    for r in range(rounds):
        for side in rotated(["plain", "ray"], r):
            run_dir = workdir / f"{side}-{r}"
            figures = (_plain_run(flags, run_dir, cpus) if side == "plain"
                       else _ray_run(flags, run_dir, cpus))
            phase[side].append(figures["phase_tokens_per_s"])
            steps_only[side].append(figures["steps_tokens_per_s"])
            if side == "plain":
                mfu.append(figures["mfu"])
            print(f"round {r + 1} {side} ({cpus} CPUs): {figures['phase_tokens_per_s']:,.0f} "
                  f"tokens/s over the phase, {figures['steps_tokens_per_s']:,.0f} in the steps",
                  flush=True)
    overhead = median_ratio(phase["ray"], phase["plain"])
    steps_overhead = median_ratio(steps_only["ray"], steps_only["plain"])
    return {"plain_tokens_per_s": round(statistics.median(phase["plain"])),
            "ray_tokens_per_s": round(statistics.median(phase["ray"])),
            "ray_vs_plain_throughput": round(overhead["ratio"], 3),
            "ray_vs_plain_spread": [round(x, 3) for x in overhead["spread"]],
            "ray_vs_plain_rounds": [round(x, 3) for x in overhead["rounds"]],
            "ray_vs_plain_steps_only": round(steps_overhead["ratio"], 3),
            "ray_vs_plain_steps_only_spread": [round(x, 3) for x in steps_overhead["spread"]],
            "mfu_cpu": round(statistics.median(mfu), 4)}


def _plain_run(flags: dict, run_dir: Path, cpus: int) -> dict:
    """The plain run in a fresh process, as each Ray run's worker is one (jobs/pretrain.py
    starts and stops its Ray): in this process the first plain run was cold and the others
    warm (a process's first train() is its slowest), so round 0's alone paid what every Ray
    run pays."""
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
        return pool.submit(_plain_run_here, flags, run_dir, cpus).result()


def _plain_run_here(flags: dict, run_dir: Path, cpus: int) -> dict:
    torch.set_num_threads(cpus)  # what Ray gives a worker holding `cpus` CPUs (OMP_NUM_THREADS)
    metrics = train(TrainConfig(**flags), LocalSession(run_dir, device=CPU))
    return {"phase_tokens_per_s": metrics["phase_tokens_per_s"],
            "steps_tokens_per_s": metrics["run_tokens_per_s"], "mfu": metrics["mfu"]}


def _ray_run(flags: dict, run_dir: Path, cpus: int) -> dict:
    from jobs import pretrain

    argv = [f"--{name.replace('_', '-')}={value}" for name, value in flags.items()]
    code = pretrain.main([*argv, "--num-workers", "1", "--cpus-per-worker", str(cpus),
                          "--run-dir", str(run_dir)])
    if code != 0:
        raise SystemExit(f"jobs/pretrain.py failed with exit code {code}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"phase_tokens_per_s": summary["phase_tokens_per_s"],
            "steps_tokens_per_s": summary["tokens_per_s"]}


def ray_train_workers() -> list:
    """This process's Ray Train worker processes (psutil.Process), by pid: descendants of
    this process, whose Ray (embedded, or ray.cluster_utils.Cluster's nodes) starts them.
    Every such process on the machine was a candidate, another session's too."""
    import psutil

    def is_train_worker(process) -> bool:
        try:
            return any("RayTrainWorker" in part for part in process.cmdline())
        except psutil.Error:  # gone, or not ours to read
            return False

    return sorted((p for p in psutil.Process().children(recursive=True) if is_train_worker(p)),
                  key=lambda p: p.pid)


def measure_recovery(run_dir: Path, extra_args: list[str], timeout_s: float = 600) -> dict:
    """Run jobs/pretrain.py, SIGKILL one Ray Train worker once Ray Train has registered a
    checkpoint, and return the job's exit code, its summary and the recovery time (kill ->
    first step after the automatic resume)."""
    from jobs import pretrain

    outcome: dict = {}
    job = threading.Thread(target=lambda: outcome.setdefault("code", pretrain.main(
        [*extra_args, "--run-dir", str(run_dir)])))
    job.start()
    # Kill only once Ray Train has registered a checkpoint (its snapshot lists one).
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + timeout_s
    while not (snapshot.exists() and "checkpoint_" in snapshot.read_text(errors="ignore")):
        if time.monotonic() > deadline or not job.is_alive():
            job.join(timeout=5)
            raise RuntimeError("no checkpoint was registered before the job ended or timed out")
        time.sleep(0.5)
    workers = ray_train_workers()
    if not workers:
        raise RuntimeError("no Ray Train worker process found")
    os.kill(workers[0].pid, signal.SIGKILL)
    killed_at = time.time()
    job.join(timeout=timeout_s)
    summary = json.loads((run_dir / "summary.json").read_text()) if outcome.get("code") == 0 \
        else {}
    if summary and not summary.get("resumed_from_step"):
        # Its only attempt ran through: the kill did not reach it (first_step_at - killed_at
        # would be negative, a "recovery" before the fault).
        raise RuntimeError("the run never restarted after the kill: no recovery to measure")
    recovery = summary["first_step_at"] - killed_at if summary else None
    return {"code": outcome.get("code"), "summary": summary, "recovery_s": recovery}


def recovery(workdir: Path) -> dict:
    result = measure_recovery(workdir / "killed", [
        "--model-size", "tiny", "--batch-size", "4", "--seq-len", "32", "--num-workers", "2",
        "--max-steps", "300", "--checkpoint-every", "20", "--log-every", "50"])
    if result["code"] != 0:
        raise SystemExit(f"the killed-worker run failed (exit {result['code']})")
    return {"recovery_s": round(result["recovery_s"], 1),
            "recovery_resumed_from_step": result["summary"]["resumed_from_step"]}


SPAN_ROUNDS = 6  # alternating rounds of each span timing


def attention_span(steps: int, seq_len: int, workdir: Path) -> dict:
    """Equal steps with and without a learnt span at long context; then time both models."""
    common = dict(model_size="small", batch_size=4, seq_len=seq_len, max_steps=steps,
                  checkpoint_every=steps, log_every=max(steps // 4, 1), warmup_steps=10,
                  eval_batches=4)
    results, models = {}, {}
    for name, extra in (("full", {}), ("span", {"attention_span": True, "span_ramp": 32})):
        config = TrainConfig(**common, **extra)
        session = LocalSession(workdir / f"span-{name}", device=CPU)
        results[name] = train(config, session)
        model = GPT(GPTConfig.from_train_config(config, vocab_size=VOCAB_SIZE))
        from orchestrator.training.checkpoint import load_checkpoint
        model.load_state_dict(load_checkpoint(session.checkpoints()[-1])["model"])
        models[name] = model.eval()
    idx = torch.randint(0, VOCAB_SIZE, (4, seq_len))

    def forward(model):
        with torch.no_grad():
            model(idx)

    def train_step(model):  # forward and backward at the learnt window, as a step trains
        model.train()
        model.zero_grad(set_to_none=True)
        model(idx, idx)[1].backward()

    forwards = paired_rounds(lambda: forward(models["full"]), lambda: forward(models["span"]),
                             SPAN_ROUNDS)
    training = paired_rounds(lambda: train_step(models["full"]),
                             lambda: train_step(models["span"]), SPAN_ROUNDS)
    return {"span_seq_len": seq_len,
            "span_speedup": round(forwards["ratio"], 2),
            "span_speedup_spread": [round(r, 2) for r in forwards["spread"]],
            "span_forward_ms": {"full": round(forwards["first_s"] * 1e3, 1),
                                "span": round(forwards["second_s"] * 1e3, 1)},
            "span_train_speedup": round(training["ratio"], 2),
            "span_train_speedup_spread": [round(r, 2) for r in training["spread"]],
            "span_window": results["span"]["attention_window"],
            "span_mean_per_layer": results["span"]["attention_span_mean"],
            "span_loss_delta": round(results["span"]["held_out_loss"]
                                     - results["full"]["held_out_loss"], 4),
            "held_out_loss": {"full": round(results["full"]["held_out_loss"], 4),
                              "span": round(results["span"]["held_out_loss"], 4)}}


def fp16_skips(workdir: Path) -> dict:
    metrics = train(TrainConfig(model_size="tiny", batch_size=4, seq_len=32, max_steps=20,
                                precision="fp16", checkpoint_every=20, log_every=20),
                    LocalSession(workdir / "fp16", device=CPU))
    return {"fp16_skipped_steps": metrics["skipped_steps"],
            "fp16_final_loss_scale": metrics["loss_scale"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer steps and a shorter context (a smoke run, not a result)")
    parser.add_argument("--rounds", type=strict_int, default=3,
                        help="rounds of plain vs Ray Train, alternating which goes first")
    parser.add_argument("--only-overhead", action="store_true",
                        help="measure Ray Train's overhead and stop")
    args = parser.parse_args()
    require_at_least(parser, args, 1, "rounds")  # a median of no rounds is no figure
    figures: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        workdir = Path(tmp)
        steps = 20 if args.quick else 100
        figures.update(plain_vs_ray(steps, args.rounds, workdir))
        if (os.cpu_count() or 1) > 1:
            left = plain_vs_ray(steps, args.rounds, workdir / "core-left", os.cpu_count() - 1)
            figures.update({"ray_vs_plain_core_left": left["ray_vs_plain_throughput"],
                            "ray_vs_plain_core_left_spread": left["ray_vs_plain_spread"]})
        if args.only_overhead:
            print(json.dumps(figures))
            return
        print(json.dumps(figures), flush=True)
        figures.update(recovery(workdir))
        print(json.dumps(figures), flush=True)
        figures.update(attention_span(20 if args.quick else 150,
                                      256 if args.quick else 1024, workdir))
        print(json.dumps(figures), flush=True)
        figures.update(fp16_skips(workdir))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
