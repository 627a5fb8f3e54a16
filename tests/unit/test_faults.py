import pytest

from orchestrator.faults import (FAULTS, RESTARTS_TRAINING, Attempt, attempts, fault_schedule,
                                reservation_problems, steps_lost)


def test_the_schedule_is_seeded_and_holds_every_fault_once():
    a = fault_schedule(7, max_steps=600, checkpoint_every=20)
    assert a == fault_schedule(7, max_steps=600, checkpoint_every=20)
    assert sorted(f.kind for f in a) == sorted(FAULTS)
    assert [f.at_step for f in a] == sorted(f.at_step for f in a)
    orders = {tuple(f.kind for f in fault_schedule(s, 600, 20)) for s in range(10)}
    assert len(orders) > 1  # the seed changes the order


def test_training_restarts_are_two_checkpoints_apart_inside_the_run():
    for seed in range(50):
        faults = fault_schedule(seed, max_steps=400, checkpoint_every=10, repeat=2)
        restarts = [f.at_step for f in faults if f.kind in RESTARTS_TRAINING]
        assert len(restarts) == 2 * len(RESTARTS_TRAINING)
        assert all(b - a >= 20 for a, b in zip(restarts, restarts[1:])), (seed, restarts)
        assert all(60 <= f.at_step <= 340 for f in faults)


def test_a_run_too_short_for_its_restarts_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="raise max_steps or lower checkpoint_every"):
        fault_schedule(0, max_steps=100, checkpoint_every=20)
    with pytest.raises(ValueError, match="unknown fault kind"):
        fault_schedule(0, max_steps=600, checkpoint_every=20, kinds=["meteor"])


def record(step, start, t, nodes=("a", "b")):
    return {"step": step, "start_step": start, "time": t, "worker_nodes": list(nodes)}


def test_attempts_and_steps_lost_from_a_restarted_run():
    records = [record(s, 0, s) for s in range(1, 36)]  # checkpoints at 10, 20, 30
    records += [record(s, 30, 100 + s, ("a", "c")) for s in range(31, 51)]  # killed at 35
    records += [record(s, 40, 200 + s) for s in range(41, 61)]  # killed at 50, resumed at 40
    runs = attempts(records)
    assert runs == [Attempt(0, 35, 1.0, ("a", "b")), Attempt(30, 50, 131.0, ("a", "c")),
                    Attempt(40, 60, 241.0, ("a", "b"))]
    assert steps_lost(runs) == 5 + 10


def test_a_restart_from_the_same_checkpoint_is_a_new_attempt():
    records = [record(s, 20, s) for s in range(21, 26)] + [record(s, 20, 50 + s)
                                                           for s in range(21, 30)]
    assert [(a.start_step, a.last_step) for a in attempts(records)] == [(20, 25), (20, 29)]
    assert steps_lost(attempts(records)) == 5


def reservation(node, cpus=2.0):
    return {"job_name": "j", "node_id": node, "cpus": cpus, "gpus": 0, "owner": ""}


def test_reservation_problems_finds_double_booking_and_dead_nodes():
    capacity = {"n1": 2.0, "n2": 2.0}
    assert reservation_problems({"j": [reservation("n1"), reservation("n2")]}, capacity) == []
    problems = reservation_problems({"j": [reservation("n1")], "k": [reservation("n1")]},
                                    capacity)
    assert problems == ["node n1 booked for 4 CPUs of 2"]
    problems = reservation_problems({"j": [reservation("n3")]}, capacity)
    assert "not alive" in problems[0]
    problems = reservation_problems({"j": [reservation("n1", 1), reservation("n1", 1)]},
                                    {"n1": 2.0})
    assert problems == ["job j holds two reservations on one node"]

