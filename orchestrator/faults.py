"""The chaos run's pure logic: a seeded fault schedule, and what a run's records say about
lost work and the scheduler's books. scripts/chaos.py injects the faults and gathers the
records; everything here takes data and returns data, so it is tested without Ray.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Iterable

from orchestrator.validation import is_int

# Every fault the chaos run knows, in the words of its report.
TRAIN_WORKER_KILLED = "train_worker_killed"
NODE_REPLACED = "node_removed_and_added"  # a training node removed, a fresh one added
SCHEDULER_KILLED = "scheduler_killed"
SERVE_REPLICA_KILLED = "serve_replica_killed"
NODE_AGENT_KILLED = "node_agent_killed"
CHECKPOINT_TRUNCATED = "checkpoint_truncated"  # a worker killed, the newest one cut, then read
JOB_PREEMPTED = "job_preempted"  # an operator preempts the training job: it yields, resumes
FAULTS = (TRAIN_WORKER_KILLED, NODE_REPLACED, SCHEDULER_KILLED, SERVE_REPLICA_KILLED,
          NODE_AGENT_KILLED, CHECKPOINT_TRUNCATED, JOB_PREEMPTED)
# Faults that restart the training worker group: two of them need a checkpoint in between, or
# the second would only repeat the first's recovery.
RESTARTS_TRAINING = {TRAIN_WORKER_KILLED, NODE_REPLACED, CHECKPOINT_TRUNCATED, JOB_PREEMPTED}


@dataclass(frozen=True)
class Fault:
    """One fault of the chaos run: its kind (one of FAULTS) and the training step after which
    it is injected."""

    kind: str
    at_step: int  # injected once the training run has reported this step


def fault_schedule(seed: int, max_steps: int, checkpoint_every: int,
                   kinds: Iterable[str] = FAULTS, repeat: int = 1) -> list[Fault]:
    """Each kind `repeat` times, in a seeded order, at seeded steps between 15% and 85% of the
    run. Faults that restart training are at least two checkpoints apart (one to resume from,
    one more so that recovery is seen to make progress); the others land anywhere."""
    for name, value in (("max_steps", max_steps), ("checkpoint_every", checkpoint_every),
                        ("repeat", repeat)):
        if not is_int(value) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    kinds = [k for k in kinds for _ in range(repeat)]
    unknown = sorted(set(kinds) - set(FAULTS))
    if unknown:
        raise ValueError(f"unknown fault kind(s) {unknown}; known: {', '.join(FAULTS)}")
    rng = random.Random(seed)
    rng.shuffle(kinds)
    restarts = sum(k in RESTARTS_TRAINING for k in kinds)
    first, last = int(0.15 * max_steps), int(0.85 * max_steps)
    gap = 2 * checkpoint_every
    # Each restart gets an equal share of the window and lands in its first (share - gap)
    # steps, so two are always a gap apart; a share under the gap is refused (the check on
    # (restarts - 1) gaps let restarts 17 steps apart through with a 20-step gap).
    if restarts * gap > last - first:
        raise ValueError(f"{restarts} training restarts need {gap} steps each (two checkpoint "
                         f"intervals) between steps {first} and {last}: raise max_steps or "
                         "lower checkpoint_every")
    # The other faults land anywhere in the window.
    share = (last - first) / max(restarts, 1)
    restart_steps = iter(sorted(
        first + int(i * share + rng.uniform(0, max(share - gap, 0))) for i in range(restarts)))
    faults = [Fault(k, next(restart_steps) if k in RESTARTS_TRAINING
                    else rng.randint(first, last)) for k in kinds]
    return sorted(faults, key=lambda f: f.at_step)


@dataclass(frozen=True)
class Attempt:
    """One run of the worker group: from the step it resumed at to the last step it reported."""

    start_step: int
    last_step: int
    started_at: float
    worker_nodes: tuple[str, ...]


def attempts(records: list[dict[str, Any]]) -> list[Attempt]:
    """Split a run's metrics.jsonl records into attempts: a new one begins where the reported
    step goes back or the resume step changes (a restart, from a checkpoint)."""
    found: list[Attempt] = []
    for r in records:
        step, start = int(r["step"]), int(r.get("start_step") or 0)
        last = found[-1] if found else None
        if last is None or step <= last.last_step or start != last.start_step:
            found.append(Attempt(start, step, float(r["time"]), tuple(r.get("worker_nodes", ()))))
        else:
            found[-1] = Attempt(last.start_step, step, last.started_at, last.worker_nodes)
    return found


def resumed_after(records: list[dict[str, Any]], at: float) -> Attempt | None:
    """The first attempt that began after unix time `at`, once it has registered a checkpoint
    (recovery made progress); None until then. That checkpoint may ride on the attempt's first
    report: a job preempted a few steps before its end resumes for one report, the last."""
    later = [a for a in attempts(records) if a.started_at > at]
    if not later:
        return None
    progressed = any(r.get("checkpoint") and float(r["time"]) >= later[0].started_at
                     for r in records)
    return later[0] if progressed else None


def due(fault: Fault, records: list[dict[str, Any]], restarted_at: float | None) -> bool:
    """Whether `fault` may land now, by the run's metrics.jsonl records: the run has reported
    fault.at_step. A fault that restarts training, after another (injected at unix time
    `restarted_at`), waits for the run to resume from that one, register a checkpoint and
    reach at_step on the resumed attempt: the killed attempt's last report, a checkpoint
    interval or more past the earlier fault's step, can already be past this one's, and a
    fault injected then lands in the middle of a restart (a worker kill hit a dying process,
    and its check passed on the earlier fault's recovery)."""
    if not records:
        return False
    if fault.kind not in RESTARTS_TRAINING or restarted_at is None:
        return int(records[-1]["step"]) >= fault.at_step
    latest = attempts(records)[-1]
    return (resumed_after(records, restarted_at) is not None
            and latest.started_at > restarted_at and latest.last_step >= fault.at_step)


def seconds_per_step(records: list[dict[str, Any]]) -> float | None:
    """The run's recent pace: between its last two reports, if both are of one attempt."""
    if len(records) < 2:
        return None
    before, last = records[-2], records[-1]
    steps = int(last["step"]) - int(before["step"])
    if steps <= 0 or before.get("start_step") != last.get("start_step"):
        return None
    return (float(last["time"]) - float(before["time"])) / steps


def comparable_losses(run: dict[str, Any], reference: dict[str, Any]) -> list[str]:
    """The summary losses (jobs/pretrain.py's summary.json) an exact resume must leave equal to
    the undisturbed reference's: the held-out loss, a function of the final weights alone,
    always; the final training loss when both average the same last steps (a resume or a
    yield a few steps before the end leaves a shorter last interval)."""
    same_interval = run.get("final_loss_steps") == reference.get("final_loss_steps")
    return ["held_out_loss"] + (["final_loss"] if same_interval else [])


def losses_match(run: dict[str, Any], reference: dict[str, Any], relative: float) -> bool:
    """Every comparable loss agrees to `relative` (of the reference's, at least 1.0)."""
    def close(a, b) -> bool:
        return a is not None and b is not None and abs(a - b) <= relative * max(1.0, abs(b))
    return all(close(run.get(k), reference.get(k)) for k in comparable_losses(run, reference))


def steps_lost(runs: list[Attempt]) -> int:
    """Steps done twice: each restart redoes the work between the checkpoint it resumed from
    and the last step the failed attempt reported."""
    return sum(max(before.last_step - after.start_step, 0)
               for before, after in zip(runs, runs[1:]))


def reservation_problems(reservations: dict[str, list[dict]],
                         alive_cpus: dict[str, float]) -> list[str]:
    """What is wrong with the scheduler's reservations (scheduler snapshot's "reservations":
    job -> reservations with node_id and cpus), against the alive nodes and their CPUs: a node
    booked beyond its CPUs (double booking), a reservation on a node that is not alive (lost,
    never released), a job holding two reservations on the same node."""
    problems, booked = [], {}
    for job, held in reservations.items():
        nodes = [r["node_id"] for r in held]
        if len(nodes) != len(set(nodes)):
            problems.append(f"job {job} holds two reservations on one node")
        for r in held:
            booked[r["node_id"]] = booked.get(r["node_id"], 0.0) + float(r["cpus"])
            if r["node_id"] not in alive_cpus:
                problems.append(f"job {job} holds a reservation on node {r['node_id'][:12]}, "
                                "which is not alive")
    for node, cpus in booked.items():
        if node in alive_cpus and cpus > alive_cpus[node] + 1e-9:
            problems.append(f"node {node[:12]} booked for {cpus:g} CPUs of "
                            f"{alive_cpus[node]:g}")
    return problems
