"""Planned-yield cost: what one preemption costs a running job, measured live.

On one embedded local Ray (2 CPUs), jobs/pretrain.py trains the smallest preset (tiny, fp32,
CPU) on 2 workers of 1 CPU each (DDP over gloo) under the scheduler, through the product's
launcher (`pretrain.main`, run in a thread of this process, as scripts/bench_train.py does).
Once it trains steadily, the scheduler preempts it the way `python -m orchestrator preempt
NAME` does (`preempt` on the scheduler actor found through ray_layer/scheduler_client.py);
the job checkpoints, yields, is placed again (nothing else waits on this cluster) and resumes
from the checkpoint it wrote. The same job is preempted --rounds times, then trains to its
last step and writes summary.json.

Each round is split at the timestamps the job, its driver and Ray Train record:

  issued      this script, just before the scheduler's `preempt` call (the directive is set)
  seen        metrics.jsonl, the yield's report: directive_seen_at (all ranks agreed to stop)
  saved       metrics.jsonl, the yield's report: time (its checkpoint written: rank 0 logs it
              then, before Ray Train takes it; until 2026-12-07 the controller did, on taking it)
  released    summary.json yields[i].at (fit returned: workers stopped; the scheduler is told)
  placed      summary.json yields[i].placed_at (the driver has its new placement)
  started     metrics.jsonl, first report after the resume: started_at (train() began)
  restored    ... restored_at (data, model, optimizer built, the checkpoint loaded into them)
  first_step  ... first_step_at (the first step after the resume trained)

The parts are the differences: notice (issued -> seen), checkpoint, release, replace, restart,
restore, first_step; planned_yield_s is issued -> first_step. Every figure is the median over
the rounds (so the parts' medians need not add up to the total's). For reference, the same
split of the job's first start (no checkpoint to load): fresh_restore_s, fresh_first_step_s.
load_avg_1m (before, after): other work on the machine shares its cores.

Cadence: the checkpoint a yield writes is its own (the loop saves at the step the directive is
agreed), so --checkpoint-every is the run's length (no periodic checkpoint before the last
step): every checkpoint in the measured window is a yield's, and each resume is checked to
restore exactly the step its yield saved. Reports come every --log-every steps (default 20,
~2.5 s here), above Ray Train's report poll (0.25 s as the launcher sets it; Ray's default
2 s), so training is not paced by its reports
(docs/training.md); the yield's report is taken at the controller's next poll, as in any run.

The last stdout line is one JSON object.
Usage: python -m scripts.bench_yield [--rounds 3] [--segment-steps 120] [--log-every 20]
                                     [--timeout-s 300]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from orchestrator.polling import wait_for
from orchestrator.runs import read_metrics
from orchestrator.validation import strict_float, strict_int
from scripts.flags import require, require_at_least

MODEL = "tiny"
PRECISION = "fp32"
WORKERS = 2
JOB_NAME = "bench-yield"

# (mark, where it comes from) in the order a planned yield passes them.
MARKS = ("issued", "seen", "saved", "released", "placed", "started", "restored", "first_step")
# (part, the mark it ends at, what it is): each part runs from the mark before its end mark.
PARTS = (
    ("notice", "seen", "directive issued -> seen by the job at a step boundary"),
    ("checkpoint", "saved", "the step, checkpoint written (rank 0 logs the report)"),
    ("release", "released", "Ray Train takes the report, its run ends, driver tells scheduler"),
    ("replace", "placed", "scheduler places the job again"),
    ("restart", "started", "new worker group up, training function started"),
    ("restore", "restored", "data, model, optimizer built, checkpoint loaded"),
    ("first_step", "first_step", "first step after the resume trained"),
)


def round_marks(issued_at: float, yield_record: dict[str, Any], yielded: dict[str, Any],
                resumed: dict[str, Any]) -> dict[str, float]:
    """The timestamps of one planned yield, by mark (MARKS), from: when the preemption was
    issued, the yield's metrics.jsonl record, the driver's summary.json yields entry for it,
    and the first metrics.jsonl record after the resume. ValueError when the three records
    are not of the same yield (steps differ, or the resume did not restore the yield's
    checkpoint)."""
    step = yield_record.get("step")
    if not yield_record.get("yielded"):
        raise ValueError(f"the record of step {step} is not a yield's report")
    if yielded.get("step") != step:
        raise ValueError(f"the driver's yield is at step {yielded.get('step')}, the job's "
                         f"yield report at step {step}")
    if resumed.get("start_step") != step:
        raise ValueError(f"the resume started at step {resumed.get('start_step')}, not at the "
                         f"step the yield checkpointed ({step})")
    return {"issued": float(issued_at),
            "seen": float(yield_record["directive_seen_at"]),
            "saved": float(yield_record["time"]),
            "released": float(yielded["at"]),
            "placed": float(yielded["placed_at"]),
            "started": float(resumed["started_at"]),
            "restored": float(resumed["restored_at"]),
            "first_step": float(resumed["first_step_at"])}


def split(marks: dict[str, float]) -> dict[str, float]:
    """Seconds of each part ("<part>_s") and the total ("planned_yield_s"), from the marks.
    ValueError when a mark comes before the one it follows: each is caused by the previous
    one on one machine's clock, so that means the records were mixed up."""
    parts = {}
    for before, (part, end, _) in zip(MARKS, PARTS):
        seconds = marks[end] - marks[before]
        if seconds < 0:
            raise ValueError(f"mark {end!r} ({marks[end]:.3f}) precedes {before!r} "
                             f"({marks[before]:.3f})")
        parts[f"{part}_s"] = seconds
    parts["planned_yield_s"] = marks[MARKS[-1]] - marks[MARKS[0]]
    return parts


def summarise(per_round: list[dict[str, float]]) -> dict[str, float]:
    """Median over the rounds of each part and of the total, rounded to 10 ms."""
    if not per_round:
        raise ValueError("no rounds to summarise")
    keys = ["planned_yield_s"] + [f"{part}_s" for part, _, _ in PARTS]
    return {key: round(statistics.median(r[key] for r in per_round), 2) for key in keys}


def format_table(per_round: list[dict[str, float]], medians: dict[str, float]) -> str:
    """Rows: the parts and the total; columns: each round, then the median."""
    header = ["PART (s)", *(f"round {i}" for i in range(1, len(per_round) + 1)), "median",
              "what"]
    rows = [header]
    for part, _, what in PARTS:
        key = f"{part}_s"
        rows.append([part, *(f"{r[key]:.2f}" for r in per_round), f"{medians[key]:.2f}", what])
    rows.append(["total", *(f"{r['planned_yield_s']:.2f}" for r in per_round),
                 f"{medians['planned_yield_s']:.2f}", "directive issued -> first step trained"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return "\n".join("  ".join([*(cell.rjust(w) if i else cell.ljust(w)
                                  for i, (cell, w) in enumerate(zip(row, widths))), row[-1]])
                     for row in rows)


def fresh_start(records: list[dict[str, Any]]) -> dict[str, float]:
    """The job's first attempt (nothing to restore) as a reference for the restore and
    first-step parts: the same builds without a checkpoint load, the first step of a fresh
    model."""
    first = next((r for r in records if r.get("start_step") == 0 and "started_at" in r), None)
    if first is None:
        raise ValueError("no report of the job's first attempt")
    return {"fresh_restore_s": round(first["restored_at"] - first["started_at"], 3),
            "fresh_first_step_s": round(first["first_step_at"] - first["restored_at"], 3)}


# -- live part ---------------------------------------------------------------------------------
def _attempt(records: list[dict], start_step: int) -> list[dict]:
    """The reports of the attempt that began at `start_step` (the yield's own report too)."""
    return [r for r in records if r.get("start_step") == start_step]


def _checkpoint_bytes(path: str | None) -> int | None:
    if not path or not Path(path).is_dir():
        return None
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


class Job:
    """jobs/pretrain.py in a thread of this process (its driver), on the Ray already up."""

    def __init__(self, run_dir: Path, max_steps: int, log_every: int) -> None:
        from jobs import pretrain

        self.run_dir = run_dir
        self.argv = ["--model-size", MODEL, "--precision", PRECISION, "--num-workers",
                     str(WORKERS), "--cpus-per-worker", "1", "--max-steps", str(max_steps),
                     "--checkpoint-every", str(max_steps), "--log-every", str(log_every),
                     "--max-failures", "0", "--run-dir", str(run_dir)]
        self.outcome: dict[str, Any] = {}
        self.thread = threading.Thread(
            target=lambda: self.outcome.setdefault("code", pretrain.main(self.argv)),
            name="bench-yield-job", daemon=True)

    def records(self) -> list[dict]:
        """metrics.jsonl so far; RuntimeError once the job has ended (nothing more comes)."""
        records = read_metrics(self.run_dir)
        if not self.thread.is_alive():
            raise RuntimeError(f"the job ended (exit code {self.outcome.get('code')}) while "
                               f"the benchmark waited; last report: "
                               f"{records[-1] if records else None}")
        return records


def one_round(job: Job, scheduler, start_step: int, preempt_after_step: int,
              timeout_s: float) -> dict[str, Any]:
    """Wait for steady training past `preempt_after_step`, preempt, wait for the resume.
    Returns the raw material of round_marks (less the driver's yields entry, known at the
    end)."""
    import ray

    from orchestrator.__main__ import refusal

    def steady():
        reports = [r for r in _attempt(job.records(), start_step) if not r.get("yielded")]
        return len(reports) >= 2 and reports[-1]["step"] >= preempt_after_step and reports[-1]

    last = wait_for(f"the job to train steadily past step {preempt_after_step}", steady,
                    timeout_s)
    issued_at = time.time()
    done = ray.get(scheduler.preempt.remote(JOB_NAME))  # what `orchestrator preempt` calls
    call_s = time.time() - issued_at
    if not done:
        rows = {row["job"]: row for row in ray.get(scheduler.snapshot.remote())["jobs"]}
        raise RuntimeError(f"preempt refused: {refusal('preempt', JOB_NAME, rows.get(JOB_NAME))}")
    yield_record = wait_for("the job's yield report", lambda: next(
        (r for r in _attempt(job.records(), start_step) if r.get("yielded")), None), timeout_s)
    if not str(yield_record["yielded"]).startswith("preempt:"):
        raise RuntimeError(f"the job yielded for another reason: {yield_record['yielded']}")
    checkpoint_bytes = _checkpoint_bytes(yield_record.get("checkpoint"))
    resumed = wait_for("the first report after the resume", lambda: next(
        iter(_attempt(job.records(), yield_record["step"])), None), timeout_s)
    return {"issued_at": issued_at, "preempt_call_s": call_s, "yield_record": yield_record,
            "resumed": resumed, "checkpoint_bytes": checkpoint_bytes,
            "steady_step": last["step"], "tokens_per_s": last["tokens_per_s"]}


def model_description() -> str:
    from orchestrator.config import TrainConfig
    from orchestrator.training.data import VOCAB_SIZE
    from orchestrator.training.memory import parameters_label
    from orchestrator.training.model import GPT, GPTConfig

    model = GPT(GPTConfig.from_train_config(TrainConfig(model_size=MODEL), vocab_size=VOCAB_SIZE))
    return (f"{MODEL} GPT ({parameters_label(model.num_params(non_embedding=False))}), "
            f"{PRECISION}, CPU")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=strict_int, default=3, help="preemptions measured")
    parser.add_argument("--segment-steps", type=strict_int, default=120,
                        help="round k preempts once the job is past step k x this; the job "
                        "runs (rounds + 1) x this steps")
    parser.add_argument("--log-every", type=strict_int, default=20, help="steps between reports")
    parser.add_argument("--timeout-s", type=strict_float, default=300.0, help="for each wait")
    args = parser.parse_args(argv)
    require_at_least(parser, args, 1, "rounds", "log_every")
    require(parser, args, ("segment_steps",), lambda steps: steps >= 4 * args.log_every,
            f"must be >= 4 x --log-every ({4 * args.log_every}: two steady reports after each "
            "resume)")
    require(parser, args, ("timeout_s",), lambda seconds: seconds > 0, "must be > 0")

    import ray

    from ray_layer.scheduler_client import get_scheduler

    model = model_description()
    max_steps = (args.rounds + 1) * args.segment_steps
    print(f"{model} on {WORKERS} workers; {args.rounds} preemption(s), one every "
          f"{args.segment_steps} steps, {max_steps} steps in all", flush=True)
    load_before = os.getloadavg()[0]  # other work on this machine shares its cores
    ray.init(address="local", num_cpus=WORKERS, include_dashboard=False, log_to_driver=False)
    raw = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            job = Job(Path(tmp) / JOB_NAME, max_steps, args.log_every)
            job.thread.start()
            wait_for("the job's first report", job.records, args.timeout_s)
            scheduler = get_scheduler()  # the launcher brought the control plane up
            start_step = 0
            for k in range(1, args.rounds + 1):
                got = one_round(job, scheduler, start_step, k * args.segment_steps,
                                args.timeout_s)
                start_step = got["yield_record"]["step"]
                back_s = got["resumed"]["first_step_at"] - got["issued_at"]
                print(f"round {k}: preempted after step {got['steady_step']}, yielded at step "
                      f"{start_step}, training again {back_s:.2f} s after the directive",
                      flush=True)
                raw.append(got)
            job.thread.join(args.timeout_s)
            if job.thread.is_alive() or job.outcome.get("code") != 0:
                raise RuntimeError(f"the job did not finish cleanly (exit code "
                                   f"{job.outcome.get('code')})")
            summary = json.loads((job.run_dir / "summary.json").read_text())
            fresh = fresh_start(read_metrics(job.run_dir))
    finally:
        ray.shutdown()

    if len(summary["yields"]) != len(raw):
        raise RuntimeError(f"the driver recorded {len(summary['yields'])} yields, "
                           f"{len(raw)} preemptions were issued")
    per_round = []
    for got, yielded in zip(raw, summary["yields"]):
        marks = round_marks(got["issued_at"], got["yield_record"], yielded, got["resumed"])
        per_round.append({**{k: round(v, 3) for k, v in split(marks).items()},
                          "step": yielded["step"],
                          "preempt_call_s": round(got["preempt_call_s"], 3),
                          "checkpoint_bytes": got["checkpoint_bytes"],
                          "tokens_per_s": round(got["tokens_per_s"])})
    medians = summarise(per_round)
    print()
    print(format_table(per_round, medians))
    print(f"reference, the job's first start (no checkpoint): restore "
          f"{fresh['fresh_restore_s']:.2f} s, first step {fresh['fresh_first_step_s']:.2f} s")
    result = {**medians, "rounds": args.rounds, "per_round": per_round, "model": model,
              "workers": WORKERS, **fresh,
              "checkpoint_bytes": per_round[-1]["checkpoint_bytes"],
              "segment_steps": args.segment_steps, "log_every": args.log_every,
              "final_steps": summary["steps"],
              "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
