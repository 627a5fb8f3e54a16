"""Load-adaptive dynamic batching, and the health of the batch loop: pure functions of time.

Ray Serve's @serve.batch runs a batch when `max_batch_size` requests are queued or
`batch_wait_timeout_s` has passed since the first one arrived. Fixed values force a choice:
wait long and an idle server adds the full wait to every request; wait little and a busy one
runs many small batches, each paying a whole forward pass per token. So both are set from the
observed load before every request joins the queue:

- idle (fewer than two requests expected within the longest wait): no wait, and a small batch
  cap (`min_batch_size`, or what is already queued): requests that happen to arrive together
  still share a forward pass, which costs about what one request's does - lowest latency;
- busy: batch size = the requests expected within the longest wait (those queued plus
  arrival rate x max wait), rounded up to a power of two, within [min, max]; the wait is the
  time the arrival rate needs to fill it, never longer than `max_wait_s`. Under a flood the
  queue alone fills the largest batch and the wait drops to 0.

Time is always an argument (`now`), so tests step it instead of sleeping.
"""
from __future__ import annotations

import asyncio
import math
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class BatchBounds:
    """Limits of the policy (validated where they are configured: settings.py)."""

    min_batch_size: int = 4
    max_batch_size: int = 32
    max_wait_s: float = 0.01
    adaptive: bool = True  # False: always (max_batch_size, max_wait_s), Serve's static mode


@dataclass(frozen=True)
class BatchSettings:
    """The batch size cap and wait that the batching policy chose for the next batch."""

    max_batch_size: int
    wait_timeout_s: float


def choose_batch_settings(queue_depth: int, arrival_rate: float,
                          bounds: BatchBounds) -> BatchSettings:
    """Batch size and wait for the next batch, from the requests waiting now and the recent
    arrival rate (requests/s)."""
    if not bounds.adaptive:
        return BatchSettings(bounds.max_batch_size, bounds.max_wait_s)
    expected = queue_depth + max(arrival_rate, 0.0) * bounds.max_wait_s
    if expected < 2:  # idle: no waiting; take whatever arrived together, up to a small batch
        return BatchSettings(_clamp(_next_power_of_two(queue_depth), bounds), 0.0)
    size = _clamp(_next_power_of_two(math.ceil(expected)), bounds)
    missing = size - queue_depth
    if missing <= 0 or arrival_rate <= 0:
        return BatchSettings(size, 0.0)
    return BatchSettings(size, min(missing / arrival_rate, bounds.max_wait_s))


def _clamp(size: int, bounds: BatchBounds) -> int:
    return min(max(size, bounds.min_batch_size), bounds.max_batch_size)


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class ArrivalRate:
    """Requests per second over the last `window_s` seconds."""

    def __init__(self, window_s: float = 1.0) -> None:
        self.window_s = window_s
        self._times: deque[float] = deque()

    def observe(self, now: float) -> None:
        self._times.append(now)
        self._forget_before(now - self.window_s)

    def rate(self, now: float) -> float:
        self._forget_before(now - self.window_s)
        return len(self._times) / self.window_s

    def _forget_before(self, cutoff: float) -> None:
        while self._times and self._times[0] < cutoff:
            self._times.popleft()


def batch_loop_problem(waiting: int, running: int, last_progress_at: float, now: float,
                       hang_after_s: float, loop_alive: bool = True) -> str | None:
    """Why the batch loop is unhealthy, or None. It is hung when requests wait or run but no
    decoding step has finished for `hang_after_s`; an idle loop is never hung."""
    if not loop_alive:
        return "the batch loop task has exited: queued requests would never run"
    stalled = now - last_progress_at
    if (waiting or running) and stalled > hang_after_s:
        return (f"the batch loop made no progress for {stalled:.1f}s with {waiting} request(s) "
                f"waiting and {running} running (limit {hang_after_s:g}s)")
    return None


def may_join_batch_queue(running_batches: int, in_queue: int, max_batch_size: int,
                         max_concurrent_batches: int) -> bool:
    """Whether one more request may enter Serve's batch queue now.

    Serve's batch loop closes a batch as soon as its wait expires, even while every batch
    slot is busy; that batch then waits for a slot holding only the requests of its own wait
    window. Under load this makes batches small exactly when they should be large (measured:
    mean batch 1.3 with 60 requests waiting). So a request enters only if the batches the
    queue would then form, plus those running, fit the slots; the others wait in front and
    enter together when a batch finishes, and the next batch is formed from all of them."""
    return running_batches + math.ceil((in_queue + 1) / max_batch_size) <= max_concurrent_batches


class AdmissionGate:
    """Where a replica's requests wait for may_join_batch_queue, first come first in.

    Only as many waiters wake as may enter, so a deep queue costs nothing per finished batch
    (a replica accepts several rounds of batches: settings.QUEUED_ROUNDS). The replica tells it
    when a batch starts or ends, when the batch size changes, and when a request leaves."""

    def __init__(self, max_batch_size: int, max_concurrent_batches: int) -> None:
        self.max_batch_size = max_batch_size
        self.max_concurrent_batches = max_concurrent_batches
        self.running_batches = 0
        self.entered: set[int] = set()  # let into Serve's batch queue, batch not started
        self._waiting: deque[tuple[asyncio.Future, int]] = deque()

    @property
    def waiting(self) -> int:
        # (copied in one step first: the replica's stats are read on a thread of Serve's
        # pool while the loop appends; iterated live, "deque mutated during iteration")
        return sum(not let_in.done() for let_in, _ in tuple(self._waiting))

    async def enter(self, request_id: int) -> None:
        let_in = asyncio.get_running_loop().create_future()
        self._waiting.append((let_in, request_id))
        self._let_in()  # at once if no one is ahead and there is room
        await let_in  # cancelled: the future is too, and _let_in skips it

    def batch_started(self, request_ids: list[int]) -> None:
        self.entered.difference_update(request_ids)
        self.running_batches += 1
        self._let_in()

    def batch_finished(self) -> None:
        self.running_batches -= 1
        self._let_in()

    def set_max_batch_size(self, size: int) -> None:
        self.max_batch_size = size
        self._let_in()

    def leave(self, request_id: int) -> None:
        """The request is done, or gone before its batch started."""
        self.entered.discard(request_id)
        self._let_in()

    def _let_in(self) -> None:
        while self._waiting and may_join_batch_queue(self.running_batches, len(self.entered),
                                                     self.max_batch_size,
                                                     self.max_concurrent_batches):
            let_in, request_id = self._waiting.popleft()
            if not let_in.done():
                self.entered.add(request_id)
                let_in.set_result(None)
