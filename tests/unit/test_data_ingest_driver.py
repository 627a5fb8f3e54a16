"""The tokenizing pass's driver side (ray_layer/data_ingest.py), with Ray Data stood in for:
no Ray is started."""
import json

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
