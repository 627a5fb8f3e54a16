"""ray_layer/launch._fit: how Ray Train's ways of ending become the job's exit."""
import pytest

from orchestrator.job_exit import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_NOT_PLACEABLE, JobFailed, \
    run_job
from ray_layer import launch
from ray_layer.train_callbacks import NodeLostError


class Trainer:
    def __init__(self, error: BaseException) -> None:
        self.error = error

    def fit(self):
        raise self.error


class ControllerError(Exception):  # the shape of ray.train.ControllerError
    def __init__(self, failure: Exception) -> None:
        super().__init__(str(failure))
        self.controller_failure = failure


@pytest.mark.parametrize("code", [0, 1])
def test_ctrl_c_during_training_is_an_interrupt_not_an_exit(tmp_path, capsys, code):
    # Ray Train's SIGINT handler aborts the run and calls sys.exit(0): the job ended with
    # status 0 (or 1) and no word on how to go on.
    status, _ = run_job(lambda: launch._fit(Trainer(SystemExit(code)), tmp_path, 3),
                        on_interrupt="interrupted; resume with --resume")
    assert status == EXIT_INTERRUPTED
    assert "resume with --resume" in capsys.readouterr().err


def test_a_lost_node_with_no_room_left_is_not_placeable(tmp_path):
    lost = NodeLostError("node(s) abc lost and 'job' cannot be placed again: no room")
    with pytest.raises(JobFailed) as e:
        launch._fit(Trainer(ControllerError(lost)), tmp_path, 3)
    assert e.value.exit_code == EXIT_NOT_PLACEABLE and "cannot be placed again" in str(e.value)
    with pytest.raises(JobFailed) as e:
        launch._fit(Trainer(ControllerError(ValueError("bad batch"))), tmp_path, 3)
    assert e.value.exit_code == EXIT_FAILED and "ValueError: bad batch" in str(e.value)


def auto_found_at(monkeypatch, address: str) -> None:
    """"auto" names `address` (the cluster `ray start` runs here, as Ray's lookup would find
    it: connect's _auto_address), reachable (its check: test_cluster_address.py), so that
    no test depends on the Ray clusters this machine runs."""
    from ray_layer import cluster

    monkeypatch.setattr(cluster, "_auto_address", lambda: (address, "the test's"))
    monkeypatch.setattr(cluster, "_check_reachable", lambda *args, **kwargs: None)


def test_a_job_without_an_address_starts_its_own_ray(monkeypatch):
    # ray.init(address=None) joined whatever `ray start` last recorded on this machine, and
    # retried a stale record's dead head for minutes.
    import ray

    from ray_layer import cluster

    calls = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs["address"]))
    monkeypatch.setattr(cluster, "_running_local_clusters", lambda: [])
    auto_found_at(monkeypatch, "10.0.0.7:6379")
    assert cluster.connect(None) is True  # started here: the caller shuts it down
    assert cluster.connect("auto") is False
    assert calls == ["local", "10.0.0.7:6379"]


@pytest.mark.parametrize("address", ["", "  "])
def test_an_empty_address_is_refused_not_an_embedded_ray(monkeypatch, address):
    # `submit JOB.yaml --address "$RAY_HEAD"` (unset) or launch.fit(address=""): an embedded
    # local Ray started, and the job trained on this machine instead of the cluster.
    import ray

    from ray_layer import cluster

    calls = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs["address"]))
    monkeypatch.setattr(cluster, "_running_local_clusters", lambda: [])
    with pytest.raises(cluster.ClusterConnectionError, match="--address is empty"):
        cluster.connect(address)
    assert calls == []


def test_an_embedded_ray_started_beside_a_running_cluster_says_so(monkeypatch, capsys):
    # The job ran unseen by the cluster `ray start` runs here: `status` showed no job and
    # `preempt` found none, with nothing saying why.
    import ray

    from ray_layer import cluster

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: None)
    monkeypatch.setattr(cluster, "_running_local_clusters", lambda: ["10.0.0.5:6379"])
    cluster.connect(None)
    err = capsys.readouterr().err
    assert "a Ray cluster already runs on this machine (10.0.0.5:6379)" in err
    assert "--address auto" in err
    auto_found_at(monkeypatch, "10.0.0.5:6379")
    cluster.connect("auto")  # joining it: nothing to say
    assert capsys.readouterr().err == ""


def test_ctrl_c_withdraws_the_job_before_ray_trains_abort_and_ends_as_an_interrupt(
        tmp_path, monkeypatch, capsys):
    """Ray Train's Ctrl-C handler blocks on the controller's abort, which waits while
    FollowPlacement waits for room after a lost node (it holds the controller's event loop):
    Ctrl-C did nothing until --queue-timeout. The first Ctrl-C now withdraws the job from
    the scheduler first (that wait's next poll finds it gone), and the failure that follows
    is the interrupt, not "not placeable"."""
    import signal

    import ray
    from ray.train import ScalingConfig
    from ray.train.v2.api import data_parallel_trainer

    events = []

    class Abort:
        def remote(self):
            events.append("abort")
            return "ref"

    class Controller:
        abort = Abort()

    monkeypatch.setattr(data_parallel_trainer.ray, "get", lambda ref: None)
    assert data_parallel_trainer.ray is ray
    trainer = launch.InterruptibleTrainer(
        lambda config: None, scaling_config=ScalingConfig(num_workers=1),
        on_interrupt=lambda: events.append("withdraw"))
    before = signal.getsignal(signal.SIGINT)
    try:
        trainer._register_sigint_handler(Controller())
        handler = signal.getsignal(signal.SIGINT)
        handler(signal.SIGINT, None)
        handler(signal.SIGINT, None)  # the second Ctrl-C: withdrawn once only
    finally:
        signal.signal(signal.SIGINT, before)
    assert events == ["withdraw", "abort"] and trainer.interrupted

    lost = NodeLostError("node(s) abc of job 'job' were lost and the job cannot be placed "
                         "on the nodes that are left: job 'job' is not in the queue")
    trainer.fit = Trainer(ControllerError(lost)).fit
    status, _ = run_job(lambda: launch._fit(trainer, tmp_path, 3),
                        on_interrupt="interrupted; resume with --resume")
    assert status == EXIT_INTERRUPTED
    assert "resume with --resume" in capsys.readouterr().err
