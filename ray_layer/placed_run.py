"""A job's life with the scheduler, as its driver lives it: submit, wait in the queue, run, and
when the scheduler takes the placement back (preemption, migration), yield and run again.

Any launcher wraps its own `fit(placement)` in `PlacedRun.run`; jobs/pretrain.py is one.
`fit` must resume from the run's checkpoints (Ray Train does, given the same run name and
storage) and return a result whose metrics carry "yielded" when the job stopped because the
scheduler told it to (orchestrator/training/loop.py does that at a step boundary, in the
report that saves its checkpoint). A training function whose workers found a GPU without the
free memory asked returns {GPU_SHORTFALL: [...]} (ray_layer/train_session.py): read from
the result's `return_value`, since Ray Train's `metrics` are those of the latest report with
a checkpoint only, and that report has none.

A yield does not count as a failure (it never uses up Ray Train's `max_failures`: the run
returns normally), and `--queue-timeout` covers only the first wait: a job the scheduler
preempted waits as long as it takes to get back in.
"""
from __future__ import annotations

import math
import os
import time
from collections import Counter
from typing import Any, Callable, Iterable

import ray

from orchestrator.config import JobSpec
from orchestrator.job_exit import CALL_TIMEOUT_S
from orchestrator.placement import Placement, Queued, Rejection
from ray_layer.scheduler_client import (SchedulerLink, SchedulerUnreachable, failed_call,
                                        get_scheduler, takes_fewer_arguments)

POLL_EVERY_S = 2.0
# How long the cancel sent at --queue-timeout may take, one try: the driver ends at the
# deadline, not 3 x CALL_TIMEOUT_S after it, and a scheduler that missed the cancel drops the
# job once the driver has exited.
CANCEL_TIMEOUT_S = 10.0
SAY_EVERY_S = 30.0  # a waiting driver says where it stands this often


class NotPlaced(Exception):
    """The scheduler rejected the job, dropped it, or it waited past its queue timeout."""


class OlderScheduler(NotPlaced):
    """The scheduler's code takes fewer arguments than a call sent (takes_fewer_arguments)."""


def driver_id() -> str:
    """This driver's Ray job id: the scheduler reclaims what it holds if the driver dies."""
    return ray.get_runtime_context().get_job_id()


def describe(placement: Placement) -> str:
    counts = Counter(placement.worker_nodes)
    link = ("" if placement.bottleneck_gbps == float("inf")
            else f"; slowest link {placement.bottleneck_gbps:.2f} GB/s")
    return ", ".join(f"{n} worker(s) on node {node[:12]}" for node, n in counts.items()) + link


def gpu_shortfall(result) -> list[dict] | None:
    """The GPUs the workers found without the free memory asked, if the training function
    returned them (rank 0's return value: Ray Train's Result.return_value)."""
    from ray_layer.train_session import GPU_SHORTFALL

    value = getattr(result, "return_value", None)
    return value.get(GPU_SHORTFALL) if isinstance(value, dict) else None


def _checkpoint_path(result) -> str | None:
    checkpoint = getattr(result, "checkpoint", None)
    return None if checkpoint is None else _normalized(str(checkpoint.path))


def _normalized(path: str | None) -> str | None:
    return None if path is None else os.path.normpath(path)


def _gave_up(deadline_s: float, decision: Queued) -> str:
    return (f"gave up after waiting {deadline_s:g}s in the queue (--queue-timeout): "
            f"{decision.reason}")


class PlacedRun:
    """A job's side of the scheduler: submit, wait in the queue, fit on the placement, and when
    the scheduler takes the placement back, report the yield and fit again."""

    def __init__(self, scheduler, spec: JobSpec, queue_timeout_s: float,
                 say: Callable[[str], None] = lambda line: print(line, flush=True),
                 reconnect: Callable[..., Any] | None = None) -> None:
        self.spec, self.queue_timeout_s, self.say = spec, queue_timeout_s, say
        # A scheduler handle in place of a dead one: the cluster's, brought up if gone (within
        # what a call's deadline leaves: SchedulerLink).
        self.link = SchedulerLink(scheduler, reconnect or get_scheduler)
        self.owner = driver_id()
        # Each time the job yielded: step, reason, at (fit returned: its workers stopped, the
        # scheduler told next) and placed_at (placed again).
        self.yields: list[dict[str, Any]] = []
        # Placements given back so far (yielded, gpu_too_small), sent with each such call: the
        # scheduler answers a call it already carried out, sent again, instead of doing it twice
        self.given_back = 0
        self.scheduler_counts = True  # False: one of an older version, which takes no count

    def run(self, fit: Callable[[Placement], Any],
            resumed_from: str | Iterable[str] | None = None) -> tuple[Any, Placement]:
        """Place, fit, and again after every yield; returns the last result and placement.
        `resumed_from`: the run's checkpoints when this driver started (a resume; one path:
        its newest)."""
        decision = self._ask("submit", self.spec, self.owner)
        placement = self.wait(decision, deadline_s=self.queue_timeout_s)
        # Checkpoints no yield of this driver's can show: those of earlier drivers, and this
        # one's yields so far. A fit that registers no newer checkpoint still shows the one
        # Ray Train registered last: an earlier driver's yield (also when a newer checkpoint
        # on disk went unregistered, its driver stopped as it reported it: the resume takes
        # that one and may find the run complete), or this driver's last. Taken for a new
        # yield, a finished job was given back, queued again and fitted a second time.
        not_ours = {_normalized(p) for p in ([resumed_from] if isinstance(resumed_from, str)
                                             else resumed_from or ())}
        while True:
            result = fit(placement)
            short = gpu_shortfall(result)
            if short:
                gpus = [(f["node_id"], f["gpu_index"]) for f in short]
                self.say(f"{self.spec.name}: " + "; ".join(
                    f"GPU {i} of node {n[:12]}" for n, i in gpus) + " lacked the free memory "
                    "asked: placing it again without them")
                decision = self._give_back("gpu_too_small", gpus)
                placement = self.wait(decision, deadline_s=self.queue_timeout_s)
                continue
            reason = (result.metrics or {}).get("yielded")
            # Ray Train's result keeps the metrics of the latest checkpoint's report: a run
            # resumed after a yield that saved no checkpoint since still shows that yield.
            checkpoint = _checkpoint_path(result)
            if not reason or (checkpoint is not None and checkpoint in not_ours):
                return result, placement
            not_ours.add(checkpoint)
            step = result.metrics.get("step")
            self.say(f"{self.spec.name} stopped at step {step} with a checkpoint: {reason}")
            self.yields.append({"step": step, "reason": reason, "at": time.time()})
            decision = self._give_back("yielded")
            placement = self.wait(decision, deadline_s=None)  # preempted time is not counted
            self.yields[-1]["placed_at"] = time.time()  # placed again: the next fit starts

    def wait(self, decision, deadline_s: float | None) -> Placement:
        """Poll until placed; NotPlaced on a rejection or past the deadline (None: no limit).
        Polls end by the deadline, a poll's tries together included (CALL_TIMEOUT_S each at
        most): a hung or crash-looping scheduler must not hold the driver past it."""
        start = last_said = time.monotonic()
        deadline = None if deadline_s is None else start + deadline_s

        def left() -> float:
            return math.inf if deadline is None else deadline - time.monotonic()
        while isinstance(decision, Queued):
            if left() <= 0:
                raise NotPlaced(self._leave_queue(deadline_s, decision))
            if time.monotonic() - last_said >= SAY_EVERY_S or last_said == start:
                self.say(f"queued ({decision.position} in line): {decision.reason}")
                last_said = time.monotonic()
            time.sleep(max(0.0, min(POLL_EVERY_S, left())))  # (never past the deadline)
            try:
                decision = self._ask("poll", self.spec.name, self.owner, deadline=deadline)
            except NotPlaced as e:
                if left() > 0:
                    raise
                # Not cancelled: a scheduler that does not answer cannot be told; it drops
                # the job once this driver has exited, as for any driver gone.
                raise NotPlaced(f"{_gave_up(deadline_s, decision)} ({e})") from None
        if isinstance(decision, Rejection):
            raise NotPlaced(decision.message)
        self.say(f"placement for {self.spec.name}: {describe(decision)}")
        return decision

    def _leave_queue(self, deadline_s: float, decision: Queued) -> str:
        """Cancel the job at its queue timeout; the timeout's message. The cancel waits
        CANCEL_TIMEOUT_S at most: the timeout is said either way, and a scheduler that did not
        hear the cancel drops the job once this driver has exited, as for any driver gone."""
        try:
            self._ask("cancel", self.spec.name, self.owner, timeout_s=CANCEL_TIMEOUT_S,
                      deadline=time.monotonic() + CANCEL_TIMEOUT_S)
        except NotPlaced as e:
            return f"{_gave_up(deadline_s, decision)} (not cancelled: {e})"
        return _gave_up(deadline_s, decision)

    @property
    def scheduler(self):
        """The scheduler's handle now (another after a scheduler killed for good)."""
        return self.link.handle

    def _ask(self, method: str, *args, timeout_s: float = CALL_TIMEOUT_S,
             deadline: float | None = None) -> Any:
        """A call to the scheduler, through a dead actor's replacement (SchedulerLink, which
        `deadline` bounds); NotPlaced, saying so in one line, when none answers or the call
        failed inside it (Ray's RayTaskError: a GCS write failing, say)."""
        try:
            return self.link.ask(method, *args, timeout_s=timeout_s, deadline=deadline)
        except SchedulerUnreachable as e:
            raise NotPlaced(str(e)) from None
        except (TypeError, ray.exceptions.RayError) as e:
            if takes_fewer_arguments(e):
                raise OlderScheduler(failed_call(method, e)) from None
            if not isinstance(e, ray.exceptions.RayError):
                raise  # (this driver's own bug)
            raise NotPlaced(failed_call(method, e)) from None

    def _give_back(self, method: str, *args) -> Any:
        """yielded or gpu_too_small, numbered (the same number on every try of one call). A
        scheduler of an older version, still running (a detached actor outlives an upgrade),
        takes no number: sent without it, from then on, said once."""
        call = (method, self.spec.name, self.owner, *args)
        try:
            decision = self._ask(*call, self.given_back) if self.scheduler_counts \
                else self._ask(*call)
        except OlderScheduler:
            if not self.scheduler_counts:
                raise
            self.scheduler_counts = False
            self.say(f"warning: the scheduler runs an older version of this package (its "
                     f"{method}() takes no count of placements given back, so a call sent "
                     "again after a lost answer may be carried out twice): to pick up fixes, "
                     "kill it for good (ray.kill on its handle; a restart by Ray keeps the code "
                     "it was created with) and the next job brings up one of this version, "
                     "which restores its state")
            decision = self._ask(*call)
        self.given_back += 1
        return decision

    def current_placement(self, placement: Placement) -> Placement:
        """The job's placement now: a node lost during training moves workers elsewhere."""
        try:
            current = self._ask("poll", self.spec.name, self.owner, timeout_s=30)
        except Exception:  # the summary then compares with the last placement; never fatal
            return placement
        return current if isinstance(current, Placement) else placement

    def release(self) -> str | None:
        """Best effort; returns a warning instead of raising, so a failure here never hides
        the job's own outcome. What is left held is reclaimed once this driver has exited."""
        try:
            self._ask("release", self.spec.name, self.owner, timeout_s=30)
        except Exception as e:
            return f"could not release the reservation of {self.spec.name}: {e}"
        return None
