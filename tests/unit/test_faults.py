import time
from types import SimpleNamespace

import pytest

from orchestrator.faults import (FAULTS, JOB_PREEMPTED, RESTARTS_TRAINING,
                                SCHEDULER_KILLED, TRAIN_WORKER_KILLED, Attempt, Fault,
                                attempts, comparable_losses, due, fault_schedule, losses_match,
                                reservation_problems, resumed_after, seconds_per_step,
                                steps_lost)


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


def test_every_schedule_accepted_keeps_restarts_two_checkpoints_apart():
    # Tight settings included: 100 steps with a checkpoint every 10 was accepted and put its
    # four restarts ~17 steps apart for every seed.
    import random
    rng = random.Random(0)
    accepted = 0
    for _ in range(400):
        max_steps, every = rng.randint(20, 400), rng.randint(1, 30)
        try:
            faults = fault_schedule(rng.randint(0, 99), max_steps, every)
        except ValueError:
            continue
        accepted += 1
        restarts = [f.at_step for f in faults if f.kind in RESTARTS_TRAINING]
        assert all(b - a >= 2 * every for a, b in zip(restarts, restarts[1:])), \
            (max_steps, every, restarts)
    assert accepted > 100
    with pytest.raises(ValueError, match="raise max_steps"):
        fault_schedule(0, max_steps=100, checkpoint_every=10)


@pytest.mark.parametrize("name, kwargs", [
    ("max_steps", dict(max_steps=0, checkpoint_every=10)),
    ("checkpoint_every", dict(max_steps=600, checkpoint_every=-100)),
    ("repeat", dict(max_steps=600, checkpoint_every=10, repeat=-1)),
])
def test_a_schedule_of_a_count_below_one_is_refused_naming_it(name, kwargs):
    # checkpoint_every=-100 put faults past the run's end (never injected); repeat=-1 gave
    # an empty schedule: a chaos run with no chaos.
    with pytest.raises(ValueError, match=f"{name} must be an integer >= 1"):
        fault_schedule(0, **kwargs)


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


def test_a_resume_counts_once_it_registers_a_checkpoint_even_in_its_first_report():
    # Yielded at step 197 of 200 (at t=50): the resumed attempt reports once, at 200, with the
    # final checkpoint. A check that wanted a checkpoint *after* the attempt's first report
    # never saw this resume (the CI failure of 2026-12-03).
    records = [record(s, 0, s) for s in range(5, 200, 5)] + [record(197, 0, 49.5)]
    records[-1]["checkpoint"] = "/c/197"
    assert resumed_after(records, at=50.0) is None  # not resumed yet
    records.append({**record(200, 197, 80.0), "checkpoint": "/c/200"})
    assert resumed_after(records, at=50.0) == Attempt(197, 200, 80.0, ("a", "b"))
    # An attempt that has reported but registered nothing yet has made no progress.
    progressing = records[:-1] + [record(199, 197, 80.0)]
    assert resumed_after(progressing, at=50.0) is None


def test_a_restart_fault_waits_for_the_run_to_recover_from_the_one_before():
    # A worker kill due at step 40 landed at t=61, the run by then at step 60 (a checkpoint
    # there): the next restart, due at step 60, was injected at once on the killed attempt's
    # last report, in the middle of the restart.
    records = [record(s, 0, s) for s in range(5, 65, 5)]
    for r in records:
        if r["step"] % 10 == 0:
            r["checkpoint"] = f"/c/{r['step']}"
    killed_at = 61.0
    nxt = Fault(TRAIN_WORKER_KILLED, 60)
    assert due(nxt, records, restarted_at=None)  # the first restart fault: by step alone
    assert not due(nxt, records, restarted_at=killed_at)
    # Other faults land anywhere, a restart in progress included.
    assert due(Fault(SCHEDULER_KILLED, 55), records, restarted_at=killed_at)
    # The resumed attempt's first reports, before it registers a checkpoint: not yet.
    records += [record(s, 60, 90.0 + s) for s in (65,)]
    assert not due(nxt, records, restarted_at=killed_at)
    records.append({**record(70, 60, 160.0), "checkpoint": "/c/70"})
    assert due(nxt, records, restarted_at=killed_at)
    # Recovered but not at the step yet.
    assert not due(Fault(JOB_PREEMPTED, 80), records, restarted_at=killed_at)
    assert not due(nxt, [], restarted_at=None)


def test_seconds_per_step_from_the_last_two_reports_of_one_attempt():
    assert seconds_per_step([record(5, 0, 10.0), record(10, 0, 12.5)]) == pytest.approx(0.5)
    assert seconds_per_step([record(10, 0, 12.5), record(15, 10, 40.0)]) is None  # a restart
    assert seconds_per_step([record(5, 0, 10.0)]) is None


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



def test_losses_compare_the_final_training_loss_only_over_equal_intervals():
    reference = {"final_loss": 2.9919, "final_loss_steps": 5, "held_out_loss": 3.10}
    # Resumed 3 steps before the end: a shorter last interval, another mean; the held-out
    # loss (the final weights) must still agree.
    late_yield = {"final_loss": 2.9629, "final_loss_steps": 3, "held_out_loss": 3.10}
    assert comparable_losses(late_yield, reference) == ["held_out_loss"]
    assert losses_match(late_yield, reference, relative=1e-5)
    assert not losses_match({**late_yield, "held_out_loss": 3.11}, reference, relative=1e-5)
    same = {**reference, "final_loss": 2.9629}
    assert comparable_losses(same, reference) == ["held_out_loss", "final_loss"]
    assert not losses_match(same, reference, relative=1e-5)
    assert not losses_match({}, reference, relative=1e-5)  # a run that wrote no summary


def test_a_chaos_run_whose_training_ended_before_a_fault_does_not_pass():
    # Faults due after training ended were dropped unseen, and the exit code compared only
    # the injected ones: one fault of seven injected and survived passed.
    from scripts import chaos

    settings = chaos.Settings.quick(0)
    schedule = fault_schedule(0, settings.max_steps, settings.checkpoint_every)
    first = schedule[0]
    injected = [chaos.Injected(first.kind, first.at_step, 0.0, "done", survived=True)]
    load = SimpleNamespace(results=[], failures=lambda: [])
    result = chaos.report(settings, {"code": 0, "summary": {"steps": settings.max_steps}},
                          {}, [], schedule, injected, [], load, 1.0)
    assert result["faults_scheduled"] == len(schedule) == len(result["faults_not_injected"]) + 1
    assert result["train_restarts"] == 0  # no records: not -1
    assert not chaos.passed(result)
    everything = [chaos.Injected(f.kind, f.at_step, 0.0, "done", survived=True)
                  for f in schedule]
    losses = {"steps": 200, "final_loss": 2.7, "final_loss_steps": 5, "held_out_loss": 2.9}
    served = SimpleNamespace(results=[(200, "")] * 10, failures=lambda: [])
    assert chaos.passed(chaos.report(settings, {"code": 0, "summary": losses}, losses, [],
                                     schedule, everything, [], served, 1.0))


def test_a_chaos_run_passes_only_with_the_reference_losses_sound_books_and_served_requests():
    # The exit code looked at training and the faults alone: a run that resumed to other
    # weights, left the scheduler's books wrong or served nothing exited 0.
    from scripts import chaos

    settings = chaos.Settings.quick(0)
    schedule = fault_schedule(0, settings.max_steps, settings.checkpoint_every)
    everything = [chaos.Injected(f.kind, f.at_step, 0.0, "done", survived=True)
                  for f in schedule]
    reference = {"steps": 200, "final_loss": 2.7, "final_loss_steps": 5, "held_out_loss": 2.9}

    def verdict(summary=reference, problems=(), results=((200, ""),) * 1000):
        load = SimpleNamespace(results=list(results),
                               failures=lambda: [r for r in results if r[0] != 200])
        return chaos.passed(chaos.report(settings, {"code": 0, "summary": summary}, reference,
                                         [], schedule, everything, list(problems), load, 1.0))

    assert verdict()
    assert not verdict(summary={**reference, "held_out_loss": 3.0})  # other weights
    assert not verdict(problems=["node n1 booked for 4 CPUs of 2"])
    assert not verdict(results=())  # serving answered nothing
    assert not verdict(results=((200, ""),) * 990 + ((0, "timed out"),) * 10)


@pytest.fixture
def scheduler_kill(monkeypatch, tmp_path):
    """Chaos.kill_scheduler with Ray faked: the scheduler restarts at once and answers with
    `books["after"]`; the chaos job's records are written as the test asks. Short waits."""
    import ray

    import ray_layer.scheduler_client
    from orchestrator import polling
    from orchestrator.runs import append_metrics
    from scripts import chaos

    books = {"before": {"chaos": [reservation("n1")]}, "after": {}}
    restarts = iter(range(100))
    monkeypatch.setattr(ray, "kill", lambda actor, no_restart: None)
    monkeypatch.setattr(ray_layer.scheduler_client, "actor_restarts", lambda a: next(restarts))
    monkeypatch.setattr(chaos, "scheduler", lambda: object())
    monkeypatch.setattr(chaos, "alive_nodes", lambda: {"n1": 2.0})
    monkeypatch.setattr(chaos, "polling", SimpleNamespace(wait_for=lambda what, check, t, **kw:
                                                          polling.wait_for(what, check, 1, **kw)))
    state = SimpleNamespace(training=True)

    def check(last_step: int, after: dict, finished_meanwhile: bool = False,
              waiting: frozenset = frozenset()):
        append_metrics(tmp_path, {"step": last_step, "start_step": 0, "time": 1.0}, None)
        answers = iter([(books["before"], set()), (after, set(waiting))])

        def view_read(timeout_s=30.0):
            answer = next(answers)
            if finished_meanwhile and answer[0] is after:  # the last report, the release
                append_metrics(tmp_path, {"step": 200, "start_step": 0}, None)
            return answer
        monkeypatch.setattr(chaos, "scheduler_view", view_read)
        injector = chaos.Chaos(None, tmp_path, chaos.Settings.quick(0),
                               training=lambda: state.training)
        _, survived = injector.kill_scheduler()
        survived(chaos.Injected(SCHEDULER_KILLED, 150, 0.0, "killed"))
    return check, state


def test_a_scheduler_restart_that_lost_a_running_jobs_reservation_is_caught(scheduler_kill):
    check, _ = scheduler_kill
    with pytest.raises(AssertionError, match="job chaos lost its reservation"):
        check(last_step=160, after={})
    check(last_step=160, after={"chaos": [reservation("n1")]})


def test_a_job_that_finished_during_the_scheduler_restart_may_leave_empty_books(scheduler_kill):
    # Its last step reported, the job gave its reservation back while its driver was still
    # finishing: the empty books waited for as "no answer" (a timeout), and the job's absence
    # was taken for a loss while the driver thread lived.
    check, state = scheduler_kill
    check(last_step=200, after={})
    state.training = False
    check(last_step=200, after={})


def test_a_job_that_finished_while_the_restarted_scheduler_came_up_lost_nothing(
        scheduler_kill):
    # At step 185 when the restart was seen; its last report and its release reached the
    # new scheduler before the books were read: "has it reported its last step?", asked
    # before the books, took the release for a loss.
    check, _ = scheduler_kill
    check(last_step=185, after={}, finished_meanwhile=True)


def test_a_job_that_yielded_while_the_scheduler_restarted_waits_and_lost_nothing(
        scheduler_kill):
    # Killed between a preemption's checkpoint and the driver's yielded(): the restarted
    # scheduler restored the reservation, the yield then gave it back and queued the job.
    check, _ = scheduler_kill
    check(last_step=166, after={}, waiting=frozenset({"chaos"}))
    with pytest.raises(AssertionError, match="job chaos lost its reservation"):
        check(last_step=166, after={}, waiting=frozenset({"other"}))


def test_a_node_agent_kill_is_survived_only_by_a_new_agent_that_reports(monkeypatch, tmp_path):
    # ray.kill is asynchronous: a report the dying agent sent landed after the kill, and the
    # check took it for the new agent's (it never looked for a new agent).
    import ray

    import ray_layer.scheduler_client
    from orchestrator import polling
    from scripts import chaos

    def actor(hex_id):
        return SimpleNamespace(_actor_id=SimpleNamespace(hex=lambda: hex_id))

    agents = {"n1": actor("old")}
    reported_at = {"n1": time.time() - 3.0}

    def get_agent(node_id):
        if node_id not in agents:
            raise ValueError("no agent")
        return agents[node_id]

    def kill(handle, no_restart):
        del agents["n1"]
        reported_at["n1"] = time.time() + 0.01  # the dying agent's last report lands later

    monkeypatch.setattr(ray, "kill", kill)
    monkeypatch.setattr(ray_layer.scheduler_client, "get_agent", get_agent)
    monkeypatch.setattr(chaos, "alive_nodes", lambda: {"n1": 2.0})
    monkeypatch.setattr(chaos, "scheduler", lambda: SimpleNamespace(
        snapshot=SimpleNamespace(remote=lambda: None)))
    monkeypatch.setattr(chaos, "ray_get", lambda ref: {
        "age_s": {n: time.time() - t for n, t in reported_at.items()}})
    monkeypatch.setattr(chaos, "polling", SimpleNamespace(wait_for=lambda what, check, t, **kw:
                                                          polling.wait_for(what, check, 0.5,
                                                                           every_s=0.05, **kw)))
    injector = chaos.Chaos(None, tmp_path, chaos.Settings.quick(0), training=lambda: True)
    _, survived = injector.kill_node_agent()
    injected = chaos.Injected("node_agent_killed", 85, time.time(), "killed")
    time.sleep(0.05)
    with pytest.raises(TimeoutError, match="a new agent on node n1"):
        survived(injected)
    agents["n1"] = actor("new")  # the scheduler's maintenance starts one...
    with pytest.raises(TimeoutError, match="the new agent on node n1 reports"):
        survived(injected)
    reported_at["n1"] = time.time() + 0.2  # ...which reports
    survived(injected)


def test_the_chaos_scripts_docstring_names_every_fault_it_injects():
    # The operator's preemption (JOB_PREEMPTED) was injected in every run, quick or full, and
    # missing from the list of faults the script's docstring gave.
    from orchestrator import faults
    from scripts import chaos

    words = {faults.TRAIN_WORKER_KILLED: "training workers SIGKILLed",
             faults.NODE_REPLACED: "a training node removed",
             faults.SCHEDULER_KILLED: "the scheduler actor killed",
             faults.SERVE_REPLICA_KILLED: "a Serve replica killed",
             faults.NODE_AGENT_KILLED: "a node agent killed",
             faults.CHECKPOINT_TRUNCATED: "the newest checkpoint truncated",
             faults.JOB_PREEMPTED: "preempted by an operator"}
    doc = " ".join(chaos.__doc__.split())
    injected = set(chaos.Settings().kinds) | set(chaos.Settings.quick(0).kinds)
    assert injected <= set(words)
    assert [k for k in injected if words[k] not in doc] == []
