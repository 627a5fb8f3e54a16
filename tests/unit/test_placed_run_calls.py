"""A driver's calls to the scheduler (ray_layer/placed_run.py, and the dry run's in
ray_layer/launch.py): each is bounded, so a scheduler that hangs or restarts for good ends the
driver with exit 3 (--queue-timeout included) instead of holding it for ever, and an error
raised inside the scheduler is said in one line, not a traceback. Ray's calls are stubbed; no
Ray is started."""
import contextlib
from types import SimpleNamespace

import pytest

from orchestrator.config import JobSpec
from orchestrator.job_exit import CALL_TIMEOUT_S, EXIT_NOT_PLACEABLE, JobFailed
from orchestrator.placement import Queued


def failure_in_the_scheduler(method: str):
    """What ray.get raises for an exception inside the actor (a GCS put failing in _save)."""
    import ray

    error = ray.exceptions.RayTaskError(
        method, "Traceback (most recent call last):\n  File \"scheduler_actor.py\"\n"
        "RuntimeError: GCS put failed (Deadline Exceeded)", RuntimeError("GCS put failed"))
    return error.as_instanceof_cause()


def driver(monkeypatch, scheduler, get, queue_timeout_s=600.0):
    import ray

    from ray_layer import placed_run

    monkeypatch.setattr(ray, "get", get)
    monkeypatch.setattr(placed_run, "driver_id", lambda: "driver")
    return placed_run.PlacedRun(scheduler, JobSpec("job"), queue_timeout_s,
                                say=lambda line: None, reconnect=lambda timeout_s=None: scheduler)


def test_an_error_inside_the_scheduler_ends_the_driver_in_one_line(monkeypatch):
    # It escaped PlacedRun, launch and run_job as a RayTaskError traceback, with no exit code.
    from ray_layer.placed_run import NotPlaced

    def get(ref, timeout=None):
        raise failure_in_the_scheduler("submit")
    scheduler = SimpleNamespace(submit=SimpleNamespace(remote=lambda *args: None))
    with pytest.raises(NotPlaced) as raised:
        driver(monkeypatch, scheduler, get).run(lambda placement: None)
    message = str(raised.value)
    assert message == "the scheduler failed in submit(): RuntimeError: GCS put failed"


class HungScheduler:
    """A scheduler that answers submit (queued) and then nothing: each call waits for its
    timeout on a fake clock. One without a timeout would wait for ever: the test fails."""

    def __init__(self, monkeypatch) -> None:
        from ray_layer import placed_run

        self.now, self.timeouts = 0.0, []
        monkeypatch.setattr(placed_run.time, "monotonic", lambda: self.now)
        monkeypatch.setattr(placed_run.time, "sleep", self.sleep)
        self.submit = SimpleNamespace(remote=lambda *args: "submit")
        self.poll = self.cancel = SimpleNamespace(remote=lambda *args: "hung")

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def get(self, ref, timeout=None):
        import ray

        if ref == "submit":
            return Queued("job", 1, "waits for room")
        if timeout is None:
            raise AssertionError("a call to a hung scheduler without a timeout never returns")
        self.timeouts.append(timeout)
        self.now += timeout
        raise ray.exceptions.GetTimeoutError("timed out")


def test_a_hung_scheduler_ends_the_queue_wait_at_its_deadline(monkeypatch):
    # Polls had no timeout: with max_task_retries=-1 a hung or crash-looping scheduler held
    # the driver for ever, and --queue-timeout (checked between polls) never fired. Then each
    # of SchedulerLink's three tries waited what the deadline left at the first: 185 s for
    # --queue-timeout 100.
    from ray_layer.placed_run import POLL_EVERY_S, NotPlaced

    scheduler = HungScheduler(monkeypatch)
    with pytest.raises(NotPlaced, match=r"gave up after waiting 100s in the queue "
                                        r"\(--queue-timeout\): waits for room \(the scheduler "
                                        r"did not answer poll\(\)"):
        driver(monkeypatch, scheduler, scheduler.get, queue_timeout_s=100.0).run(
            lambda placement: None)
    assert scheduler.timeouts and all(t <= CALL_TIMEOUT_S for t in scheduler.timeouts)
    assert scheduler.now <= 100.0 + POLL_EVERY_S + 3


def test_a_scheduler_hung_at_the_deadline_still_ends_the_wait_then(monkeypatch):
    # Polls answered "queued" until the deadline, then the scheduler hung: the cancel sent at
    # the deadline waited 60 s three times (283 s for --queue-timeout 100) and its failure
    # replaced the queue timeout's message.
    from ray_layer.placed_run import CANCEL_TIMEOUT_S, NotPlaced

    scheduler = HungScheduler(monkeypatch)
    scheduler.poll = SimpleNamespace(remote=lambda *args: "submit")  # answered: queued
    with pytest.raises(NotPlaced) as raised:
        driver(monkeypatch, scheduler, scheduler.get, queue_timeout_s=100.0).run(
            lambda placement: None)
    message = str(raised.value)
    assert message.startswith("gave up after waiting 100s in the queue (--queue-timeout): "
                              "waits for room"), message
    assert "not cancelled" in message and "cancel()" in message
    assert scheduler.timeouts == [CANCEL_TIMEOUT_S] and CANCEL_TIMEOUT_S <= 10
    assert scheduler.now <= 100.0 + CANCEL_TIMEOUT_S


def test_a_hung_scheduler_ends_the_wait_after_a_yield_too(monkeypatch):
    # After a yield the wait has no deadline, but each call still has one: NotPlaced, saying
    # the scheduler did not answer, rather than a driver waiting for ever.
    from ray_layer.placed_run import NotPlaced

    scheduler = HungScheduler(monkeypatch)
    run = driver(monkeypatch, scheduler, scheduler.get)
    with pytest.raises(NotPlaced, match=r"did not answer poll\(\) after 3 tries"):
        run.wait(Queued("job", 1, "preempted"), deadline_s=None)
    assert scheduler.timeouts == [CALL_TIMEOUT_S] * 3


@contextlib.contextmanager
def scheduler_stub(address, runtime_env=None):
    yield SimpleNamespace(place=SimpleNamespace(remote=lambda *args: "place"))


@pytest.mark.parametrize("error, words", [
    # The scheduler died for good between coming up and place(): a RayActorError traceback.
    (lambda: __import__("ray").exceptions.RayActorError(),
     "the scheduler did not answer place(): RayActorError"),
    (lambda: __import__("ray").exceptions.GetTimeoutError("timed out"),
     f"the scheduler did not answer place() within {CALL_TIMEOUT_S:g} s"),
    (lambda: failure_in_the_scheduler("place"),
     "the scheduler failed in place(): RuntimeError: GCS put failed"),
])
def test_a_dry_run_whose_scheduler_does_not_answer_exits_3(monkeypatch, error, words):
    # docs/operations.md promises exit 3 when the scheduler did not answer within 60 s; the
    # dry run waited without a timeout and let Ray's errors out as tracebacks.
    import ray

    from ray_layer import launch

    timeouts = []

    def get(ref, timeout=None):
        timeouts.append(timeout)
        raise error()
    monkeypatch.setattr(launch, "connected_scheduler", scheduler_stub)
    monkeypatch.setattr(ray, "get", get)
    with pytest.raises(JobFailed) as raised:
        launch.dry_run_placement(JobSpec("job"), None)
    assert raised.value.exit_code == EXIT_NOT_PLACEABLE and timeouts == [CALL_TIMEOUT_S]
    assert str(raised.value).startswith(words) and "\n" not in str(raised.value)


def test_a_give_back_sent_again_carries_the_same_number(monkeypatch):
    # The scheduler tells a yielded it already carried out (its answer lost to a restart) from
    # the next one by this number; a resend with a new number would be carried out twice.
    import ray

    from orchestrator.placement import Placement
    from ray_layer import placed_run

    placement, sent = Placement("job", ("n1",), 0.0, 1), []

    def yielded(*args):
        sent.append(args)
        if len(sent) == 1:  # the scheduler restarted before answering: the link resends
            raise ray.exceptions.ActorDiedError()
        return placement
    scheduler = SimpleNamespace(submit=SimpleNamespace(remote=lambda *args: placement),
                                yielded=SimpleNamespace(remote=yielded))
    monkeypatch.setattr(placed_run.time, "sleep", lambda s: None)
    run = driver(monkeypatch, scheduler, lambda value, timeout=None: value)
    fits = [SimpleNamespace(metrics={"step": 3, "yielded": "preempt"}, return_value=None,
                            checkpoint=SimpleNamespace(path=f"/run/checkpoint_{step}"))
            for step in (3, 6)] + [SimpleNamespace(metrics={"step": 9}, return_value=None,
                                                   checkpoint=None)]
    run.run(lambda p: fits.pop(0))
    assert [args[-1] for args in sent] == [0, 0, 1]


def older_yielded(where: str):
    """yielded of a scheduler started by an older version (a detached actor outlives upgrades):
    (job_name, owner) only. Ray refuses the extra argument when .remote() checks it against
    the actor's class (`where` "remote"), or the method raises inside the actor ("actor")."""
    import ray

    def check(args):
        if len(args) > 2:
            error = TypeError("yielded() takes from 2 to 3 positional arguments but 4 were given")
            if where == "remote":
                raise error
            return ray.exceptions.RayTaskError("yielded", "Traceback ...", error
                                               ).as_instanceof_cause()
        return None
    return check


@pytest.mark.parametrize("where", ["remote", "actor"])
def test_a_scheduler_of_an_older_version_is_given_back_placements_without_the_count(
        monkeypatch, where):
    # The count of placements given back, a new positional argument, failed every yield
    # against a scheduler still running the previous version: the driver ended with
    # "the scheduler failed in yielded(): TypeError" after its first preemption.
    from orchestrator.placement import Placement

    placement, sent, said = Placement("job", ("n1",), 0.0, 1), [], []
    check = older_yielded(where)

    def yielded(*args):
        sent.append(args)
        return check(args) or placement
    scheduler = SimpleNamespace(submit=SimpleNamespace(remote=lambda *args: placement),
                                yielded=SimpleNamespace(remote=yielded))

    def get(value, timeout=None):
        if isinstance(value, Exception):
            raise value
        return value
    run = driver(monkeypatch, scheduler, get)
    run.say = said.append
    fits = [SimpleNamespace(metrics={"step": step, "yielded": "preempt"}, return_value=None,
                            checkpoint=SimpleNamespace(path=f"/run/checkpoint_{step}"))
            for step in (3, 6)] + [SimpleNamespace(metrics={"step": 9}, return_value=None,
                                                   checkpoint=None)]
    result, _ = run.run(lambda p: fits.pop(0))
    assert result.metrics == {"step": 9}
    assert sent == [("job", "driver", 0), ("job", "driver"), ("job", "driver")]
    older = [line for line in said if "older version" in line]
    assert len(older) == 1 and "kill it for good" in older[0] and "yielded()" in older[0]
