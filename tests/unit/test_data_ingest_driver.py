"""The tokenizing pass's driver side (ray_layer/data_ingest.py), with Ray Data stood in for:
no Ray is started."""
import json
import logging
import warnings

import pytest
import ray.exceptions

from orchestrator.training.corpus import DataError
from orchestrator.training.data_plan import plan_data
from ray_layer import data_ingest


class _DyingDataset:
    """Ray Data's dataset as the pass drives it: the first file's result comes back, then a
    tokenizer worker has died more times than it may be restarted."""

    def __init__(self, items, **_):
        self.items, self.map_kwargs = items, None

    def map_batches(self, fn, **kwargs):
        self.map_kwargs = kwargs
        return self

    def iter_rows(self):
        worker = data_ingest.TokenizeFiles(**self.map_kwargs["fn_constructor_kwargs"])
        yield {"result": worker({"index": [0], "source": [self.items[0]["source"]]})
               ["result"][0]}
        raise ray.exceptions.ActorDiedError()


def test_a_tokenizer_worker_that_keeps_dying_stops_the_pass_naming_the_files_left(
        tmp_path, monkeypatch):
    """Ray Data restarts a dead tokenizer actor and retries its file without end (its
    default), so a file that gets its worker killed every time (the OOM killer) held the pass
    forever (31 kills in 40 s, the pass waiting on): restarts are bounded, and then the
    pass stops with a DataError naming the files not tokenized, not a raw ActorDiedError
    traceback."""
    for name in ("a", "b"):
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({"text": f"{name} document {i}"}) + "\n" for i in range(50)))
    plan = plan_data([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")],
                     cache_root=str(tmp_path / "cache"))
    made = []
    monkeypatch.setattr(data_ingest.ray.data, "from_items",
                        lambda items, **kw: made.append(_DyingDataset(items)) or made[-1])
    with pytest.raises(DataError) as stopped:
        data_ingest.tokenize_with_ray_data(plan, 2, say=lambda _: None)
    message = str(stopped.value)
    assert f"{tmp_path / 'b.jsonl'}" in message and f"{tmp_path / 'a.jsonl'}" not in message
    assert "kept dying" in message and "out-of-memory" in message
    assert "\n" not in message
    restarts = made[0].map_kwargs["max_restarts"]
    assert 0 < restarts == made[0].map_kwargs["max_task_retries"]


class _RecordingDataset(_DyingDataset):
    """Ray Data's own Dataset.map_batches (its argument checks and deprecation warnings run),
    stopping where it would build the plan: what reaches Ray Data is kept."""

    map_batches = ray.data.Dataset.map_batches

    def map_batches_internal(self, fn, **kwargs):
        self.map_kwargs = kwargs
        return self

    def iter_rows(self):
        return iter(())


def test_the_pass_bounds_worker_restarts_without_ray_data_s_deprecation_warning(
        tmp_path, monkeypatch):
    """Every --data run printed Ray's `RayDeprecationWarning: ray_remote_args is deprecated`
    for max_restarts / max_task_retries, which Ray 2.60's map_batches has no named parameter
    for; the bound still reaches Ray Data, and no warning is printed."""
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "a document"}) + "\n")
    plan = plan_data([str(tmp_path / "a.jsonl")], cache_root=str(tmp_path / "cache"))
    made = []
    monkeypatch.setattr(data_ingest.ray.data, "from_items",
                        lambda items, **kw: made.append(_RecordingDataset(items)) or made[-1])
    monkeypatch.setattr(data_ingest, "finish", lambda plan, results: {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data_ingest.tokenize_with_ray_data(plan, 1, say=lambda _: None)
    assert [str(w.message) for w in caught if "ray_remote_args" in str(w.message)] == []
    kwargs = made[0].map_kwargs
    assert kwargs["max_restarts"] == kwargs["max_task_retries"] == data_ingest.WORKER_RESTARTS
    assert kwargs["num_cpus"] == 1


class _ExecutingDataset(_RecordingDataset):
    """Runs the step of Ray Data's executor that picks the progress display (and tells of
    the bars being off), then logs another warning on the same logger."""

    def iter_rows(self):
        import ray.util.debug
        from ray.data._internal.progress import get_progress_manager

        ray.util.debug._logged.discard("ray_data_progress_manager_disabled")  # (once a process)
        get_progress_manager(ray.data.DataContext.get_current(), "ds", {}, False)
        logging.getLogger("ray.data._internal.progress").warning("another warning")
        return iter(())


def test_the_pass_does_not_print_ray_data_s_progress_bars_disabled_warning(
        tmp_path, monkeypatch, caplog):
    """The pass turns Ray Data's progress bars off (PassProgress says more), and every --data
    run printed `WARNING ... Progress bars disabled. To enable, set ...`; that one message is
    kept out, other warnings are not."""
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "a document"}) + "\n")
    plan = plan_data([str(tmp_path / "a.jsonl")], cache_root=str(tmp_path / "cache"))
    monkeypatch.setattr(data_ingest.ray.data, "from_items",
                        lambda items, **kw: _ExecutingDataset(items))
    # (Ray Data's handlers write to the stderr of when ray.data was imported: pytest's)
    logger = logging.getLogger("ray.data._internal.progress")
    logger.addHandler(caplog.handler)
    try:
        data_ingest.tokenize_with_ray_data(plan, 1, say=lambda _: None)
    finally:
        logger.removeHandler(caplog.handler)
    said = [r.getMessage() for r in caplog.records]
    assert not [m for m in said if "Progress bars disabled" in m], said
    assert "another warning" in said, said
