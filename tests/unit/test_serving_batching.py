"""The load-adaptive batching policy, the admission gate and batch-loop health, stepped
through time."""
import asyncio

import pytest

from orchestrator.serving.batching import (AdmissionGate, ArrivalRate, BatchBounds,
                                           BatchSettings, batch_loop_problem,
                                           choose_batch_settings, may_join_batch_queue)

BOUNDS = BatchBounds(min_batch_size=4, max_batch_size=32, max_wait_s=0.01)


def test_idle_runs_at_once_with_a_small_batch():
    assert choose_batch_settings(1, 0.0, BOUNDS) == BatchSettings(4, 0.0)
    assert choose_batch_settings(0, 50.0, BOUNDS) == BatchSettings(4, 0.0)  # 0.5 expected
    # A few requests that arrived together still go together, without waiting.
    assert choose_batch_settings(1, 90.0, BOUNDS).wait_timeout_s == 0.0


def test_moderate_load_waits_just_long_enough_to_fill_the_batch():
    settings = choose_batch_settings(2, 1000.0, BOUNDS)  # 2 + 1000 x 0.01 = 12 expected
    assert settings.max_batch_size == 16
    assert settings.wait_timeout_s == pytest.approx(0.01)  # 14 more at 1000/s: capped
    # 29 queued + 200/s x 0.02 s = 33 expected -> the cap, 32; 3 more come in 15 ms.
    settings = choose_batch_settings(29, 200.0, BatchBounds(1, 32, 0.02))
    assert settings == BatchSettings(32, pytest.approx(3 / 200))


def test_heavy_load_takes_the_largest_batch_without_waiting():
    assert choose_batch_settings(40, 3000.0, BOUNDS) == BatchSettings(32, 0.0)
    assert choose_batch_settings(32, 0.0, BOUNDS) == BatchSettings(32, 0.0)


def test_batch_size_grows_with_load_and_stays_within_bounds():
    sizes = [choose_batch_settings(q, r, BOUNDS).max_batch_size
             for q, r in [(0, 0), (1, 100), (2, 300), (4, 800), (8, 1600), (30, 5000)]]
    assert sizes == sorted(sizes) and sizes[0] == 4 and sizes[-1] == 32
    assert all(4 <= s <= 32 for s in sizes)


def test_static_mode_uses_fixed_settings():
    static = BatchBounds(1, 8, 0.05, adaptive=False)
    assert choose_batch_settings(0, 0.0, static) == BatchSettings(8, 0.05)
    assert choose_batch_settings(100, 1e4, static) == BatchSettings(8, 0.05)


def test_arrival_rate_counts_the_last_window():
    rate = ArrivalRate(window_s=1.0)
    for t in (0.0, 0.1, 0.2, 0.3):
        rate.observe(t)
    assert rate.rate(0.5) == 4.0
    assert rate.rate(1.15) == 2.0  # 0.0 and 0.1 fell out
    assert rate.rate(5.0) == 0.0


def test_an_idle_loop_is_never_hung():
    assert batch_loop_problem(0, 0, last_progress_at=0.0, now=1e6, hang_after_s=5) is None


def test_waiting_requests_without_progress_are_a_hung_loop():
    assert batch_loop_problem(3, 0, last_progress_at=10.0, now=14.0, hang_after_s=5) is None
    problem = batch_loop_problem(3, 2, last_progress_at=10.0, now=16.0, hang_after_s=5)
    assert "no progress for 6.0s" in problem and "3 request(s) waiting and 2 running" in problem


def test_a_dead_batch_loop_is_unhealthy_even_when_idle():
    assert "exited" in batch_loop_problem(0, 0, 0.0, 0.0, 5, loop_alive=False)


def test_requests_wait_in_front_of_the_batch_queue_while_every_slot_is_busy():
    # Two slots, batches of up to 4.
    assert may_join_batch_queue(0, 0, 4, 2)
    assert may_join_batch_queue(1, 3, 4, 2)  # joins the batch the queue is forming
    assert not may_join_batch_queue(1, 4, 4, 2)  # that batch is full; the other slot is busy
    assert not may_join_batch_queue(2, 0, 4, 2)  # both slots busy: wait for one to finish
    assert may_join_batch_queue(0, 7, 4, 2)  # a second batch fits the second slot
    assert not may_join_batch_queue(0, 8, 4, 2)


async def _arrive(gate: AdmissionGate, ids) -> dict[int, asyncio.Task]:
    tasks = {i: asyncio.create_task(gate.enter(i)) for i in ids}
    await asyncio.sleep(0)  # every task reaches the gate, in order
    return tasks


def test_the_gate_lets_requests_in_first_come_first_in_as_batches_free_slots():
    async def scenario():
        gate = AdmissionGate(max_batch_size=2, max_concurrent_batches=1)
        tasks = await _arrive(gate, range(5))
        assert gate.entered == {0, 1} and gate.waiting == 3  # one batch's worth, in order
        gate.batch_started([0, 1])
        assert gate.entered == set() and gate.waiting == 3  # the only slot is busy
        gate.batch_finished()
        assert gate.entered == {2, 3} and gate.waiting == 1
        await asyncio.sleep(0)
        assert all(tasks[i].done() for i in range(4)) and not tasks[4].done()
        tasks[4].cancel()

    asyncio.run(scenario())


def test_a_deep_queue_wakes_only_those_that_may_enter():
    async def scenario():
        gate = AdmissionGate(max_batch_size=32, max_concurrent_batches=2)
        tasks = await _arrive(gate, range(500))
        assert len(gate.entered) == 64 and gate.waiting == 436  # two batches' worth
        gate.batch_started(list(range(32)))
        gate.batch_started(list(range(32, 64)))
        gate.batch_finished()
        assert gate.entered == set(range(64, 96)) and gate.waiting == 404
        for task in tasks.values():
            task.cancel()

    asyncio.run(scenario())


def test_a_request_that_leaves_gives_its_place_to_the_next_and_cancelled_ones_are_skipped():
    async def scenario():
        gate = AdmissionGate(max_batch_size=2, max_concurrent_batches=1)
        tasks = await _arrive(gate, "abcd")
        tasks["c"].cancel()  # gave up while waiting
        await asyncio.sleep(0)
        assert gate.waiting == 1
        gate.leave("a")  # its client went away before its batch started
        assert gate.entered == {"b", "d"} and gate.waiting == 0

    asyncio.run(scenario())


def test_a_larger_batch_size_lets_more_in():
    async def scenario():
        gate = AdmissionGate(max_batch_size=1, max_concurrent_batches=1)
        tasks = await _arrive(gate, range(4))
        assert gate.entered == {0}
        gate.set_max_batch_size(4)
        assert gate.entered == {0, 1, 2, 3}
        await asyncio.gather(*tasks.values())

    asyncio.run(scenario())


def test_the_gates_waiting_count_can_be_read_from_another_thread():
    # Ray 2.60 runs a replica's plain methods (replica_stats, behind /health) on a thread
    # pool while the loop admits requests: iterated live, the count raised "deque mutated
    # during iteration", and /health answered 503 from a busy replica.
    import asyncio
    import sys
    import threading

    from orchestrator.serving.batching import AdmissionGate

    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch often: a race shows within the test
    try:
        gate, loop = AdmissionGate(8, 1), asyncio.new_event_loop()
        errors, stop = [], threading.Event()

        def read():
            while not stop.is_set():
                try:
                    gate.waiting
                except RuntimeError as e:
                    errors.append(e)

        reader = threading.Thread(target=read)
        reader.start()
        for i in range(100_000):
            gate._waiting.append((loop.create_future(), i))
            if len(gate._waiting) > 50:
                gate._waiting.popleft()
        stop.set()
        reader.join()
        loop.close()
    finally:
        sys.setswitchinterval(switch_interval)
    assert not errors, errors[:1]
