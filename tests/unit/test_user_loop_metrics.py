"""A loop of the user's own (launch.fit / launch.report, ray_layer/user_loop.py) exports the
training series jobs/pretrain.py's runs export, from the keys it reports. No Ray is started:
Ray Train's context and report are stand-ins."""
import types

import pytest
import torch

from orchestrator import metric_catalogue as m

user_loop = pytest.importorskip("ray_layer.user_loop")


@pytest.fixture
def worker(monkeypatch):
    """Rank 1 of 4 in run "my-run" on the CPU; returns (recorded samples, reported dicts)."""
    import ray.train.torch

    from ray_layer import telemetry

    recorded, reported = [], []
    context = types.SimpleNamespace(get_world_rank=lambda: 1, get_world_size=lambda: 4,
                                    get_experiment_name=lambda: "my-run")
    monkeypatch.setattr(ray.train, "get_context", lambda: context)
    monkeypatch.setattr(ray.train, "report",
                        lambda metrics, checkpoint=None: reported.append(metrics))
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(telemetry, "record",
                        lambda spec, value, **tags: recorded.append((spec, value, tags)))
    return recorded, reported


def test_a_loops_own_reports_export_the_training_series_under_the_documented_keys(worker):
    # Only RayTrainSession.report (jobs/pretrain.py) recorded them: a loop of one's own
    # reporting loss and step through launch.report had nothing in Prometheus.
    recorded, reported = worker
    metrics = {"step": 7, "loss": 2.5, "tokens_per_s": 4000.0, "mfu": 0.3, "lr": 1e-3,
               "note": "text", "done": True}
    user_loop.report(metrics)
    assert reported == [metrics]  # what Ray Train keeps is what the loop reported
    tags = {"run": "my-run", "rank": "1", "device": "cpu"}
    # tokens_per_s is the job's (the same on every rank): each of the 4 ranks records its
    # share, so the dashboard's sum over ranks is the job's rate.
    assert {(spec.name, value) for spec, value, _ in recorded} == {
        (m.TRAIN_STEP.name, 7), (m.TRAIN_LOSS.name, 2.5),
        (m.TRAIN_TOKENS_PER_SECOND.name, 1000.0), (m.TRAIN_MFU.name, 0.3)}
    assert all(t == tags for _, _, t in recorded)


def test_a_loop_that_says_its_world_size_is_taken_at_its_word(worker):
    recorded, _ = worker
    user_loop.report({"tokens_per_s": 4000.0, "world_size": 2})
    assert [(spec, value) for spec, value, _ in recorded] == [
        (m.TRAIN_TOKENS_PER_SECOND, 2000.0)]


def test_metrics_that_cannot_be_exported_never_fail_the_report(worker, monkeypatch, capsys):
    import ray.train.torch

    def no_device():
        raise RuntimeError("no device here")

    recorded, reported = worker
    monkeypatch.setattr(ray.train.torch, "get_device", no_device)
    monkeypatch.setattr(user_loop, "_export_failed", False)
    user_loop.report({"step": 1, "loss": 2.0})
    user_loop.report({"step": 2, "loss": 1.9})
    assert [r["step"] for r in reported] == [1, 2] and not recorded
    assert capsys.readouterr().err.count("training metrics were not exported") == 1


def test_numpy_numbers_a_loop_reports_are_exported_as_the_numbers_they_are(worker):
    # A loss averaged with numpy (np.float32), a step counted in an np.int64 array, a 0-d
    # array: metrics.jsonl wrote them as numbers, but Prometheus got none of them.
    import numpy as np

    recorded, _ = worker
    user_loop.report({"step": np.int64(7), "loss": np.float32(2.5),
                      "tokens_per_s": np.float64(4000.0), "mfu": np.array(0.25)})
    assert {(spec.name, value) for spec, value, _ in recorded} == {
        (m.TRAIN_STEP.name, 7), (m.TRAIN_LOSS.name, 2.5),
        (m.TRAIN_TOKENS_PER_SECOND.name, 1000.0), (m.TRAIN_MFU.name, 0.25)}
    assert all(type(value) in (int, float) for _, value, _ in recorded)


def test_a_report_key_with_no_number_is_warned_of_once_naming_it(worker, capsys,
                                                                monkeypatch):
    # `{"loss": f"{loss:.3f}"}` reached Ray Train and metrics.jsonl, but not Prometheus, and
    # nothing said why the run's loss panel stayed empty.
    recorded, reported = worker
    monkeypatch.setattr(user_loop, "_non_numbers_said", set())
    user_loop.report({"step": 1, "loss": "0.500"})
    user_loop.report({"step": 2, "loss": "0.400"})
    assert [r["loss"] for r in reported] == ["0.500", "0.400"]  # the report itself stands
    assert [spec for spec, _, _ in recorded] == [m.TRAIN_STEP, m.TRAIN_STEP]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "metrics['loss'] is str '0.500', not a number" in err
    assert f"not exported as {m.TRAIN_LOSS.exported} " in err
