"""The controller callbacks of jobs/pretrain.py, with Ray's calls replaced by fakes."""
import socket
from types import SimpleNamespace

import pytest
import ray

from ray_layer import train_callbacks
from ray_layer.train_callbacks import FollowPlacement, NodeLostError, lost_nodes
from orchestrator.config import JobSpec
from orchestrator.placement import Placement, Queued, Rejection


@pytest.fixture
def listening_port():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server.getsockname()[1]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node(node_id, alive, port):
    return {"NodeID": node_id, "Alive": alive, "NodeManagerAddress": "127.0.0.1",
            "NodeManagerPort": port}


def test_a_node_is_lost_when_ray_lists_it_dead_or_its_raylet_refuses(monkeypatch,
                                                                      listening_port):
    monkeypatch.setattr(ray, "nodes", lambda: [
        node("up", True, listening_port), node("dead", False, listening_port),
        node("raylet-gone", True, closed_port())])
    assert lost_nodes({"up", "dead", "raylet-gone", "never-seen"}) == [
        "dead", "never-seen", "raylet-gone"]
    assert lost_nodes({"up"}) == []


class FakeScheduler:
    def __init__(self, *answers):
        self.answers, self.calls = list(answers), []
        self.replace = SimpleNamespace(remote=self._replace)
        self.poll = SimpleNamespace(remote=self._poll)

    def _replace(self, spec, owner, lost):
        self.calls.append((spec.name, owner, lost))
        return self.answers.pop(0)

    def _poll(self, name, owner):
        self.calls.append((name, owner, "poll"))
        return self.answers.pop(0)


def follower(monkeypatch, scheduler, placed, lost):
    monkeypatch.setattr(train_callbacks, "lost_nodes", lambda ids: sorted(set(lost) & ids))
    monkeypatch.setattr(ray, "get_actor", lambda name, namespace: scheduler)
    monkeypatch.setattr(ray, "get", lambda value, timeout=None: value)
    monkeypatch.setattr(train_callbacks.time, "sleep", lambda s: None)
    callback = FollowPlacement(JobSpec(name="run", num_workers=2), owner="job-1", timeout_s=60)
    selectors = [{"ray.io/node-id": n} for n in placed]
    callback.after_controller_start(SimpleNamespace(
        scaling_config=SimpleNamespace(label_selector=selectors)))
    return callback, selectors


def test_selectors_follow_a_new_placement_after_a_node_is_lost(monkeypatch):
    new = Placement("run", ("b", "c"), 1.0, 0)
    scheduler = FakeScheduler(new)
    callback, selectors = follower(monkeypatch, scheduler, ["a", "b"], lost=["a"])
    callback.follow_lost_nodes()
    assert scheduler.calls == [("run", "job-1", ["a"])]
    assert selectors == [{"ray.io/node-id": "b"}, {"ray.io/node-id": "c"}]  # same list object
    callback.follow_lost_nodes()  # nothing lost any more: no second re-placement
    assert len(scheduler.calls) == 1


def test_a_busy_cluster_is_waited_for_and_a_cluster_too_small_is_a_clear_error(monkeypatch):
    # No room now: the scheduler queues the job (it may preempt) and the callback polls.
    busy = Queued("run", 1, "lost node(s) a, b; waiting for room")
    scheduler = FakeScheduler(busy, busy, Placement("run", ("c", "c"), 1.0, 0))
    callback, selectors = follower(monkeypatch, scheduler, ["a", "b"], lost=["a", "b"])
    callback.follow_lost_nodes()
    assert [c[2] for c in scheduler.calls] == [["a", "b"], "poll", "poll"]
    assert selectors[0] == {"ray.io/node-id": "c"}
    endless = FakeScheduler(*[busy] * 100)
    callback, _ = follower(monkeypatch, endless, ["a", "b"], lost=["a"])
    callback.timeout_s = -1  # the queue timeout passed
    with pytest.raises(NodeLostError, match="waited in the queue until --queue-timeout"):
        callback.follow_lost_nodes()

    never = Rejection("run", "it needs 2 worker(s), room for 1", fits_when_free=False)
    callback, selectors = follower(monkeypatch, FakeScheduler(never), ["a", "b"], lost=["a"])
    with pytest.raises(NodeLostError, match="node\\(s\\) a of job 'run' were lost .* room for 1"):
        callback.follow_lost_nodes()
    assert selectors == [{"ray.io/node-id": "a"}, {"ray.io/node-id": "b"}]  # untouched


def test_a_cancel_read_before_the_node_was_lost_ends_the_run_as_a_cancel(monkeypatch):
    # The scheduler answers a cancelled job's re-placement with its cancel: said as one, not
    # as "cannot be placed on the nodes that are left".
    cancelled = Rejection("run", "job 'run' was cancelled: cancelled by an operator",
                          cancelled=True)
    callback, _ = follower(monkeypatch, FakeScheduler(cancelled), ["a", "b"], lost=["a"])
    with pytest.raises(train_callbacks.JobCancelled, match="^job 'run' was cancelled"):
        callback.follow_lost_nodes()


def test_a_scheduler_killed_for_good_is_found_again_and_a_silent_one_is_named(monkeypatch):
    # The callback looked the scheduler up once, without the driver's reconnect: a scheduler
    # killed for good ended the run as "training failed after N restart(s)".
    from ray_layer.scheduler_client import SchedulerUnreachable

    def dead(*args):
        raise ray.exceptions.ActorDiedError()
    new = Placement("run", ("b", "c"), 1.0, 0)
    handles = iter([SimpleNamespace(replace=SimpleNamespace(remote=dead)), FakeScheduler(new)])
    callback, selectors = follower(monkeypatch, None, ["a", "b"], lost=["a"])
    callback.reconnect = lambda timeout_s=None: next(handles)
    callback.follow_lost_nodes()
    assert selectors == [{"ray.io/node-id": "b"}, {"ray.io/node-id": "c"}]

    def hung(value, timeout=None):
        assert timeout is not None  # a hung scheduler must not hold the controller for good
        raise ray.exceptions.GetTimeoutError()
    callback, _ = follower(monkeypatch, None, ["a", "b"], lost=["a"])
    monkeypatch.setattr(ray, "get", hung)
    callback.reconnect = lambda timeout_s=None: FakeScheduler(new)
    with pytest.raises(SchedulerUnreachable, match=r"did not answer replace\(\) after 3 tries"):
        callback.follow_lost_nodes()


def test_a_job_preempted_as_it_lost_a_node_waits_past_the_queue_timeout(monkeypatch):
    # It failed as "cannot be placed on the nodes that are left" after --queue-timeout, where
    # any preempted job waits as long as it takes to get back in.
    preempted = Queued("run", 2, "preempted by an operator", preempted=True)
    plain = Queued("run", 2, "preempted by an operator")
    new = Placement("run", ("c", "c"), 1.0, 0)
    scheduler = FakeScheduler(preempted, plain, plain, new)
    callback, selectors = follower(monkeypatch, scheduler, ["a", "b"], lost=["a"])
    callback.timeout_s = -1  # the queue timeout long past
    callback.follow_lost_nodes()
    assert selectors[0] == {"ray.io/node-id": "c"}


def test_a_scheduler_hung_while_a_lost_nodes_job_waits_ends_the_wait_at_its_deadline(
        monkeypatch):
    # Each poll waited CALL_TIMEOUT_S three times, whatever --queue-timeout had left: a hung
    # scheduler held the job up to 3 x 60 s past its deadline.
    from ray_layer import scheduler_client
    from ray_layer.scheduler_client import SchedulerUnreachable

    clock = SimpleNamespace(now=0.0)
    busy = Queued("run", 1, "lost node(s) a; waiting for room")
    hung = SimpleNamespace(replace=SimpleNamespace(remote=lambda *a: "replace"),
                           poll=SimpleNamespace(remote=lambda *a: "hung"))

    def get(ref, timeout=None):
        if ref == "replace":
            return busy
        assert timeout is not None, "a call to a hung scheduler without a timeout never returns"
        clock.now += timeout
        raise ray.exceptions.GetTimeoutError("timed out")

    def sleep(seconds):
        clock.now += seconds

    callback, _ = follower(monkeypatch, hung, ["a", "b"], lost=["a"])
    callback.timeout_s = 30
    monkeypatch.setattr(ray, "get", get)
    for module in (train_callbacks, scheduler_client):
        monkeypatch.setattr(module.time, "monotonic", lambda: clock.now)
        monkeypatch.setattr(module.time, "sleep", sleep)
    with pytest.raises((SchedulerUnreachable, NodeLostError)):
        callback.follow_lost_nodes()
    assert clock.now <= 30 + 3
