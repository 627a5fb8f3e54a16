"""Chaos run: the whole product under several faults at once, on a local multi-node cluster.

A ray.cluster_utils.Cluster (head without CPUs, an inference node declaring two T4s, three
training nodes) runs, at the same time:
- jobs/pretrain.py (2 DDP workers, one per training node, a checkpoint every few steps),
- the Serve app (2 model replicas and the ingress on the inference node) under a steady load of
  clients that check every answer against the greedy completion,
- the scheduler and a node agent on every node.
Faults land on a seeded schedule (orchestrator/faults.py): training workers SIGKILLed, a
training node removed (SIGKILL of its raylet and workers) and a fresh one added, the scheduler
actor killed, a Serve replica killed, a node agent killed, the newest checkpoint truncated
(right after a worker kill, so the resume must read it), the training job preempted by an
operator (as `python -m orchestrator preempt`: it checkpoints, yields, waits in the queue and
resumes). Each fault has its own survival check; --quick injects each once, the full run
kills a training worker twice.

Before the faults, the same training job runs undisturbed on the same cluster: the disturbed
run must end at the same loss (resume is exact: model, optimizer, data position, RNG).

The last line printed is one JSON object: train_completed, train_steps_lost,
loss_matches_reference (the held-out loss, and the final training loss when both runs average
the same last steps: faults.comparable_losses), losses_compared, each run's losses,
scheduler_reservations_consistent, serve_requests, serve_failed, serve_success_rate,
faults_injected, faults_survived, and each fault's record.

Usage: python -m scripts.chaos [--seed N] [--quick]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from orchestrator import faults, polling
from orchestrator.inventory import (
    LABEL_ACCELERATOR_COUNT, LABEL_ACCELERATOR_MEMORY_GB, LABEL_ACCELERATOR_TYPE)
from orchestrator.runs import checkpoint_age, checkpoint_dirs, read_metrics
from orchestrator.serving.settings import free_port, serve_app_config
from orchestrator.validation import strict_int
from scripts.bench_train import ray_train_workers

APP = "gpt-chaos"
T4_LABELS = {LABEL_ACCELERATOR_TYPE: "T4", LABEL_ACCELERATOR_COUNT: "2",
             LABEL_ACCELERATOR_MEMORY_GB: "16"}
TRAIN_NODE_CPUS = 2
LOSS_TOLERANCE = 1e-5  # relative; exact resume on CPU agrees to ~1e-7
SURVIVAL_TIMEOUT_S = 90.0
# Steps between reports: the resolution of train_steps_lost (the last step a killed attempt
# reported is known, not the one it died at).
LOG_EVERY = 5
MAX_JITTER_S = 2.0
NOT_INJECTED = "not injected"  # an Injected's detail when the injection itself failed
# The clients never retry; in past runs a killed replica cost no request (the ingress resent
# them to the other replica). The test and the exit code share this bar.
MIN_SERVE_SUCCESS_RATE = 0.999


def say(line: str) -> None:
    sys.stdout.write(f"[chaos] {line}\n")
    sys.stdout.flush()


@dataclasses.dataclass
class Settings:
    seed: int = 0
    max_steps: int = 600
    checkpoint_every: int = 20
    clients: int = 4
    client_pause_s: float = 0.0  # between one client's requests (0: closed loop)
    kinds: tuple[str, ...] = faults.FAULTS + (faults.TRAIN_WORKER_KILLED,)

    @classmethod
    def quick(cls, seed: int) -> "Settings":
        # Paced clients: a closed loop kept serving on a whole core of the 2, and every
        # training restart (new worker processes, imports) took twice as long beside it.
        return cls(seed=seed, max_steps=200, checkpoint_every=10, clients=2,
                   client_pause_s=0.25, kinds=faults.FAULTS)

    def train_args(self) -> list[str]:
        return ["--model-size", "tiny", "--batch-size", "4", "--seq-len", "32",
                "--num-workers", "2", "--cpus-per-worker", str(TRAIN_NODE_CPUS),
                "--max-steps", str(self.max_steps), "--checkpoint-every",
                str(self.checkpoint_every), "--log-every", str(LOG_EVERY), "--seed", "1",
                "--max-failures", "20", "--queue-timeout", "120"]


# -- the cluster ---------------------------------------------------------------------------------
class Lab:
    """The cluster and the handles the faults need."""

    def __init__(self) -> None:
        import ray
        from ray.cluster_utils import Cluster

        # Faster failure detection than Ray's defaults (a node is declared dead after ~3 s of
        # missed health checks instead of ~15 s), so a short run sees a whole recovery.
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "_system_config": {"health_check_period_ms": 1000,
                                              "health_check_failure_threshold": 3}})
        self.cluster.add_node(num_cpus=2, num_gpus=2, labels=T4_LABELS,
                              resources={"serving": 1})
        for _ in range(3):
            self.add_training_node()
        self.cluster.wait_for_nodes()
        ray.init(address=self.cluster.address)

    def add_training_node(self):
        return self.cluster.add_node(num_cpus=TRAIN_NODE_CPUS)

    def node(self, node_id: str):
        return next(n for n in self.cluster.worker_nodes if n.node_id == node_id)

    def shutdown(self) -> None:
        import ray

        ray.shutdown()
        self.cluster.shutdown()


def scheduler():
    from ray_layer.scheduler_client import get_scheduler

    return get_scheduler()


def scheduler_view(timeout_s: float = 30.0) -> tuple[dict[str, list[dict]], set[str]]:
    """The scheduler's books (job -> its reservations) and the jobs waiting in its queue,
    from one snapshot."""
    import ray

    snapshot = ray.get(scheduler().snapshot.remote(), timeout=timeout_s)
    return ({job: [dataclasses.asdict(r) for r in held]
             for job, held in snapshot["reservations"].items()},
            {queued.job_name for queued in snapshot["queue"]})


def scheduler_books(timeout_s: float = 30.0) -> dict[str, list[dict]]:
    return scheduler_view(timeout_s)[0]


def alive_nodes() -> dict[str, float]:
    """Alive node id -> its CPUs, as Ray lists them."""
    import ray

    return {n["NodeID"]: n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]}


def wait_for(what: str, check: Callable[[], Any], timeout_s: float = SURVIVAL_TIMEOUT_S):
    """check() until truthy; its value, or a TimeoutError naming `what`. Exceptions from
    check() count as 'not yet' (the thing checked may be restarting)."""
    return polling.wait_for(what, check, timeout_s, ignore=(Exception,))


# -- serving ---------------------------------------------------------------------------------------
def deploy_serving(workdir: Path) -> str:
    from ray_layer.serve_app import deploy_config, wait_for_app
    from orchestrator.serving.loading import save_untrained_checkpoint

    checkpoint = str(save_untrained_checkpoint(workdir / "serve" / "checkpoint_00000001",
                                               "tiny", 64))
    port = free_port()
    deploy_config(serve_app_config(
        APP, port,
        {"checkpoint": checkpoint, "accelerator": "auto", "cpus_per_replica": 0.25,
         "gpus_per_replica": 0.5, "max_batch_size": 8, "health_check_period_s": 2,
         "health_check_timeout_s": 10},
        autoscaling={"min_replicas": 2, "max_replicas": 2},
        user_config={"checkpoint": checkpoint},
        model_options={"graceful_shutdown_timeout_s": 2},
        # The ingress stays on the inference node: a node lost under it would take its
        # in-flight requests along (clients retry those; this load does not).
        deployments=[{"name": "Ingress", "ray_actor_options": {
            "num_cpus": 0, "resources": {"serving": 0.01}}}]))
    wait_for_app(APP, timeout_s=180, replicas={"GPTModel": 2})
    return f"http://127.0.0.1:{port}"


def model_replica_names() -> set[str]:
    """Actor names of the live model replicas (Serve names each replica actor)."""
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and "GPTModel" in a["name"]}


def running_model_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get(APP)
    return app.deployments["GPTModel"].replica_states.get("RUNNING", 0) if app else 0


# -- the faults --------------------------------------------------------------------------------
@dataclasses.dataclass
class Injected:
    kind: str
    at_step: int
    at: float  # unix time of the injection
    detail: str
    survived: bool | None = None
    recovery_s: float | None = None
    problem: str | None = None


class Chaos:
    """Injects faults into the running lab and checks that each one is survived."""

    def __init__(self, lab: Lab, run_dir: Path, settings: Settings,
                 training: Callable[[], bool]) -> None:
        self.lab, self.run_dir, self.settings, self.training = lab, run_dir, settings, training
        self.rng = random.Random(settings.seed)
        self.checks = ThreadPoolExecutor(max_workers=8, thread_name_prefix="survival")
        self.pending: list[tuple[Injected, Future]] = []

    def inject(self, fault: faults.Fault) -> Injected:
        act = {faults.TRAIN_WORKER_KILLED: self.kill_train_worker,
               faults.NODE_REPLACED: self.replace_node,
               faults.SCHEDULER_KILLED: self.kill_scheduler,
               faults.SERVE_REPLICA_KILLED: self.kill_serve_replica,
               faults.NODE_AGENT_KILLED: self.kill_node_agent,
               faults.CHECKPOINT_TRUNCATED: self.truncate_checkpoint,
               faults.JOB_PREEMPTED: self.preempt_job}[fault.kind]
        time.sleep(self.rng.uniform(0, self._checkpoint_interval_s()))
        try:
            detail, check = act()
        except Exception as e:  # noqa: BLE001 - a fault that cannot be injected is a finding
            injected = Injected(fault.kind, fault.at_step, time.time(), NOT_INJECTED,
                                survived=False, problem=f"injection failed: "
                                                        f"{type(e).__name__}: {e}")
            say(f"step {fault.at_step}: {fault.kind} could not be injected: {injected.problem}")
            self.pending.append((injected, self.checks.submit(lambda: None)))
            return injected
        injected = Injected(fault.kind, fault.at_step, time.time(), detail)
        say(f"step {fault.at_step}: {fault.kind} ({detail})")
        self.pending.append((injected, self.checks.submit(self._survive, injected, check)))
        return injected

    @staticmethod
    def _survive(injected: Injected, check: Callable[[Injected], None]) -> None:
        try:
            check(injected)
            injected.survived = True
        except Exception as e:  # noqa: BLE001 - every failure is a finding to report
            injected.survived, injected.problem = False, f"{type(e).__name__}: {e}"

    def results(self) -> list[Injected]:
        for _, future in self.pending:
            future.result()
        self.checks.shutdown()
        return [injected for injected, _ in self.pending]

    # -- training ------------------------------------------------------------------------
    def _records(self) -> list[dict]:
        return read_metrics(self.run_dir)

    def _reported_last_step(self, by: float) -> bool:
        """Whether the run's last step was reported at time `by` or before."""
        return any(int(r["step"]) >= self.settings.max_steps and r["time"] <= by
                   for r in self._records())

    def _checkpoint_interval_s(self) -> float:
        """How long a checkpoint interval takes now (at most MAX_JITTER_S). Reports come every
        LOG_EVERY steps: a seeded pause of up to this long puts a fault anywhere in the
        interval rather than right after a report. The tiny model runs ~30 steps a second on a
        quiet machine: a fixed 2 s pause was 60 steps, and a preemption due at step 142 of 200
        yielded at step 181."""
        pace = faults.seconds_per_step(self._records())
        if pace is None:
            return MAX_JITTER_S
        return min(MAX_JITTER_S, pace * self.settings.checkpoint_every)

    def _kill_a_worker(self) -> str:
        # Right after another fault the worker group may be restarting: wait for it.
        workers = wait_for("a Ray Train worker process to kill", ray_train_workers,
                           timeout_s=60)
        victim = self.rng.choice(workers)
        os.kill(victim.pid, signal.SIGKILL)
        return f"pid {victim.pid}"

    def _resumed_after(self, injected: Injected) -> faults.Attempt:
        """The first attempt started after the fault that went on to register a checkpoint
        (recovery made progress); sets the fault's recovery time."""
        attempt = wait_for("training resumed and registered a new checkpoint",
                           lambda: faults.resumed_after(self._records(), injected.at))
        injected.recovery_s = round(attempt.started_at - injected.at, 1)
        return attempt

    def kill_train_worker(self):
        return self._kill_a_worker(), self._resumed_after

    def truncate_checkpoint(self):
        # Kill first, then cut the newest checkpoint: once a rank is dead no newer one can be
        # registered (the other way round, training may register one between the two). Wait
        # until the whole old worker group is gone: the surviving rank may still hand the
        # controller a report it had queued (a 1 s wait was seen to be too short). The
        # restart needs new worker processes, so it reads the checkpoint seconds later.
        old_group = {p.pid for p in ray_train_workers()}
        killed = self._kill_a_worker()
        # Not gone in 30 s: an injection failure saying so (cutting the checkpoint anyway let
        # the survivor register a newer one, and the check failed on a "resumed at step").
        polling.wait_for("the killed worker's group exits",
                         lambda: not old_group & {p.pid for p in ray_train_workers()},
                         timeout_s=30, every_s=0.2)
        time.sleep(0.5)  # the controller's last poll of the old group's reports
        recorded = next(r for r in reversed(self._records()) if r.get("checkpoint"))
        # The newest on disk, registered or not: what the resume takes first (the dying group
        # may have written one after the last it reported).
        newest = checkpoint_dirs(Path(recorded["checkpoint"]).parent)[0]
        files = [p for p in newest.rglob("*") if p.is_file()]
        biggest = max(files, key=lambda p: p.stat().st_size)
        size = biggest.stat().st_size
        with open(biggest, "r+b") as f:
            f.truncate(size // 2)
        truncated_step = checkpoint_age(newest)[1]  # (step-named: runs.checkpoint_name)

        def fell_back(injected: Injected) -> None:
            attempt = self._resumed_after(injected)
            if attempt.start_step >= truncated_step:
                raise AssertionError(f"resumed at step {attempt.start_step}, not before the "
                                     f"truncated checkpoint of step {truncated_step}")

        return (f"worker {killed} killed, then {biggest.name} of step {truncated_step} cut to "
                f"{size // 2} of {size} bytes"), fell_back

    def replace_node(self):
        records = self._records()
        victim_id = self.rng.choice(sorted(set(records[-1]["worker_nodes"])))
        self.lab.cluster.remove_node(self.lab.node(victim_id), allow_graceful=False)
        added = self.lab.add_training_node()

        def survived(injected: Injected) -> None:
            attempt = self._resumed_after(injected)
            if victim_id in attempt.worker_nodes:
                raise AssertionError(f"workers resumed on the removed node {victim_id[:12]}")
            wait_for("the added node's agent reports to the scheduler",
                     lambda: added.node_id in ray_get(scheduler().snapshot.remote())["reports"])

        return f"node {victim_id[:12]} removed, node {added.node_id[:12]} added", survived

    # -- control plane -------------------------------------------------------------------
    def kill_scheduler(self):
        import ray

        from ray_layer.scheduler_client import actor_restarts

        before = scheduler_books()
        restarts = actor_restarts(scheduler())
        ray.kill(scheduler(), no_restart=False)

        def survived(injected: Injected) -> None:
            # The kill is asynchronous: the old incarnation may answer until Ray counts the
            # restart, and the books it shows would prove nothing.
            wait_for("Ray restarts the scheduler",
                     lambda: actor_restarts(scheduler()) > restarts, timeout_s=60)
            ended_before = not self.training()
            # Empty books are an answer too (the job done and released): waiting for truthy
            # books timed out on them.
            after, waiting = wait_for("the scheduler answers again", scheduler_view)
            read_at = time.time()
            # A job gives its reservation back when it yields (it then waits in the queue:
            # the kill can land between its yield's checkpoint and its driver's call) or
            # after its last step's report: missing from books read by `read_at`, it lost
            # its reservation unless it waits or that report came before then. (Asked before
            # the books, a job finishing while the restarted scheduler came up read as one
            # still training; asked after them, "is the driver thread alive?" took a release
            # made while the driver was finishing for a lost reservation.)
            may_have_released = ended_before or self._reported_last_step(read_at)
            injected.recovery_s = round(time.time() - injected.at, 1)
            problems = faults.reservation_problems(after, alive_nodes())
            problems += [f"job {job} lost its reservation" for job in before
                         if job not in after and job not in waiting and not may_have_released]
            if problems:
                raise AssertionError(f"after the restart: {'; '.join(problems)} (before the "
                                     f"kill: {before}, after: {after})")

        return "restarted by Ray (max_restarts=-1)", survived

    def preempt_job(self):
        """As an operator would (`python -m orchestrator preempt`): the job checkpoints at its
        next step boundary, gives its reservation back, waits in the queue and resumes."""
        job = self.run_dir.name
        asked = time.time()
        if not ray_get(scheduler().preempt.remote(job)):
            raise RuntimeError(f"the scheduler does not list job {job} as running")
        # The yield itself is part of this fault: the next fault (a scheduler kill, say) must
        # not land before the job has acted on the directive, or a short run may end first.
        wait_for("the job checkpoints and yields", lambda: any(
            r.get("yielded") and r["time"] > asked for r in self._records()), timeout_s=60)
        return f"operator preempted {job}", self._resumed_after

    def kill_node_agent(self):
        import ray

        from ray_layer.scheduler_client import get_agent

        node_id = self.rng.choice(sorted(alive_nodes()))
        killed = get_agent(node_id)
        killed_id = killed._actor_id.hex()
        ray.kill(killed, no_restart=True)

        def survived(injected: Injected) -> None:
            # ray.kill is asynchronous and the scheduler takes calls in turn: a report the
            # killed agent sent as it died could land after the kill, and "a report after the
            # kill" passed with no new agent. So: another actor under the node's agent name,
            # then a report after it was seen.
            wait_for(f"a new agent on node {node_id[:12]}",
                     lambda: get_agent(node_id)._actor_id.hex() != killed_id)
            new_agent_seen = time.time()

            def reported_since():
                ages = ray_get(scheduler().snapshot.remote())["age_s"]
                return time.time() - ages.get(node_id, float("inf")) > new_agent_seen
            wait_for(f"the new agent on node {node_id[:12]} reports", reported_since)
            injected.recovery_s = round(time.time() - injected.at, 1)

        return f"agent of node {node_id[:12]} killed for good", survived

    def kill_serve_replica(self):
        import ray

        before = model_replica_names()
        victim = self.rng.choice(sorted(before))
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)

        def survived(injected: Injected) -> None:
            wait_for("Serve starts a new replica in place of the killed one",
                     lambda: running_model_replicas() == 2
                     and model_replica_names() - before and victim not in model_replica_names())
            injected.recovery_s = round(time.time() - injected.at, 1)

        return f"replica {victim.split(':')[-1]} killed", survived


def ray_get(ref, timeout_s: float = 10.0):
    import ray

    return ray.get(ref, timeout=timeout_s)


# -- the run -----------------------------------------------------------------------------------
def train(run_dir: Path, settings: Settings) -> tuple[int, dict]:
    from jobs import pretrain

    code = pretrain.main([*settings.train_args(), "--run-dir", str(run_dir)])
    summary = json.loads((run_dir / "summary.json").read_text()) if code == 0 else {}
    return code, summary


def run(settings: Settings, workdir: Path) -> dict:
    from ray import serve

    from ray_layer.cluster import ensure_control_plane
    from orchestrator.serving.loadgen import Load

    started = time.monotonic()
    schedule = faults.fault_schedule(settings.seed, settings.max_steps,
                                    settings.checkpoint_every, settings.kinds)
    say("schedule: " + ", ".join(f"{f.kind}@{f.at_step}" for f in schedule))
    lab = Lab()
    try:
        ensure_control_plane()
        say("reference run (undisturbed)")
        ref_code, reference = train(workdir / "reference", settings)
        if ref_code != 0:
            raise SystemExit(f"the undisturbed reference run failed (exit {ref_code})")
        url = deploy_serving(workdir)
        say(f"serving at {url}; chaos run starts")
        run_dir = workdir / "chaos"
        outcome: dict = {}
        job = threading.Thread(target=lambda: outcome.update(zip(("code", "summary"),
                                                                 train(run_dir, settings))))
        injector = Chaos(lab, run_dir, settings, training=job.is_alive)
        with Load(url, clients=settings.clients, pause_s=settings.client_pause_s) as load:
            job.start()
            restarted_at = None  # when the last fault that restarts training was injected
            for fault in schedule:
                while job.is_alive() and not faults.due(fault, read_metrics(run_dir),
                                                        restarted_at):
                    time.sleep(0.2)
                if not job.is_alive():
                    say(f"training ended before step {fault.at_step}"
                        + (" of a run resumed from the fault before" if restarted_at
                           and fault.kind in faults.RESTARTS_TRAINING else "")
                        + f": {fault.kind} not injected")
                    break
                landed = injector.inject(fault)
                if fault.kind in faults.RESTARTS_TRAINING and landed.detail != NOT_INJECTED:
                    restarted_at = landed.at
            job.join()
            injected = injector.results()
        books = scheduler_books()
        problems = faults.reservation_problems(books, alive_nodes())
        if "chaos" in books:
            problems.append("the finished chaos job still holds a reservation")
        serve.shutdown()
    finally:
        lab.shutdown()
    return report(settings, outcome, reference, read_metrics(run_dir), schedule, injected,
                  problems, load, time.monotonic() - started)


def report(settings: Settings, outcome: dict, reference: dict, records: list[dict],
           schedule: list[faults.Fault], injected: list[Injected], problems: list[str], load,
           elapsed_s: float) -> dict:
    summary = outcome.get("summary") or {}
    scheduler_ok = not problems and all(f.survived for f in injected
                                        if f.kind == faults.SCHEDULER_KILLED)
    requests, failed = len(load.results), len(load.failures())
    return {
        "seed": settings.seed,
        "train_completed": outcome.get("code") == 0 and summary.get("steps") == settings.max_steps,
        "train_steps_lost": faults.steps_lost(faults.attempts(records)),
        "train_restarts": max(len(faults.attempts(records)) - 1, 0),
        "loss_matches_reference": faults.losses_match(summary, reference, LOSS_TOLERANCE),
        "losses_compared": faults.comparable_losses(summary, reference),
        **{f"{side}{k}": run.get(k) for side, run in (("", summary), ("reference_", reference))
           for k in ("final_loss", "final_loss_steps", "held_out_loss")},
        "scheduler_reservations_consistent": scheduler_ok,
        "scheduler_problems": problems,
        "serve_requests": requests, "serve_failed": failed,
        "serve_success_rate": round((requests - failed) / requests, 5) if requests else None,
        "serve_failures_sample": load.failures()[:3],
        # Faults due after training ended are not injected: the run proved nothing of them.
        "faults_scheduled": len(schedule),
        "faults_not_injected": [f"{f.kind}@{f.at_step}" for f in schedule[len(injected):]],
        "faults_injected": len(injected),
        "faults_survived": sum(bool(f.survived) for f in injected),
        "faults": [dataclasses.asdict(f) for f in injected],
        "elapsed_s": round(elapsed_s, 1),
    }


def passed(result: dict) -> bool:
    """The exit code's rule: training completed and every scheduled fault was injected and
    survived (one due after training ended passed unseen), the run ended with the undisturbed
    run's losses, the scheduler's books were consistent, and serving answered (nearly) every
    request right. Without the last three a run that resumed to other weights, or served
    nothing, exited 0."""
    rate = result["serve_success_rate"]
    return bool(result["train_completed"] and result["faults_survived"]
                == result["faults_injected"] == result["faults_scheduled"]
                and result["loss_matches_reference"]
                and result["scheduler_reservations_consistent"]
                and rate is not None and rate >= MIN_SERVE_SUCCESS_RATE)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=strict_int, default=0, help="fault order, steps and victims")
    parser.add_argument("--quick", action="store_true",
                        help="shorter training, each fault once (the integration test's size)")
    args = parser.parse_args(argv)
    settings = Settings.quick(args.seed) if args.quick else Settings(seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        result = run(settings, Path(tmp))
    for f in result["faults"]:
        say(f"{f['kind']}@{f['at_step']}: {'survived' if f['survived'] else 'NOT survived'}"
            + (f" in {f['recovery_s']}s" if f["recovery_s"] is not None else "")
            + (f" - {f['problem']}" if f["problem"] else ""))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    outcome = main()
    sys.exit(0 if passed(outcome) else 1)
