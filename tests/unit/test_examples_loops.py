"""The examples' training loops, run in this process as one worker would run them (Ray Train's
context, checkpoint and DDP wrapper stood in for): they report through `launch.report` only,
every step, with a checkpoint every `checkpoint_every` steps from rank 0 (examples/README.md),
and resume exactly from such a checkpoint."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import ray.train
import ray.train.torch

from orchestrator import launch
from orchestrator.entrypoints import load_entrypoint
from orchestrator.job_file import load_job_file

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


class _Context:
    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def get_world_rank(self) -> int:
        return self.rank

    def get_world_size(self) -> int:
        return self.world


def _run(monkeypatch, tmp_path, example: str, config: dict, rank: int = 0,
         checkpoint=None) -> list[tuple[dict, object]]:
    """(metrics, kept checkpoint or None) of each launch.report of one worker's loop."""
    job = load_job_file(EXAMPLES / example / "job.yaml")
    loop = load_entrypoint(job.entrypoint, job.path.parent).function
    reports = []

    def report(metrics, checkpoint=None):
        kept = None
        if checkpoint is not None:  # the loop deletes its folder after the report
            kept = ray.train.Checkpoint.from_directory(
                shutil.copytree(checkpoint.path, tmp_path / f"kept-{len(list(tmp_path.iterdir()))}"))
        reports.append((dict(metrics), kept))

    def not_documented(*args, **kwargs):
        raise AssertionError("the example called ray.train.report: launch.report is its API")

    monkeypatch.setattr(launch, "report", report)
    monkeypatch.setattr(ray.train, "report", not_documented)
    monkeypatch.setattr(ray.train, "get_context", lambda: _Context(rank, 2))
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: checkpoint)
    monkeypatch.setattr(ray.train.torch, "prepare_model", lambda model, *a, **k: model)
    loop({**job.config, **config})
    return reports


@pytest.fixture
def image_data(tmp_path_factory):
    import runpy

    out = tmp_path_factory.mktemp("lines")
    runpy.run_path(str(EXAMPLES / "image_cnn" / "make_data.py"))["main"](
        ["--out", str(out), "--train", "256", "--test", "64", "--shards", "2"])
    return {"data_dir": str(out)}


@pytest.mark.parametrize("example", ["regression", "image_cnn"])
def test_an_example_reports_every_step_checkpoints_from_rank_0_and_resumes_exactly(
        example, monkeypatch, tmp_path, request):
    data = request.getfixturevalue("image_data") if example == "image_cnn" else {}
    config = {**data, "steps": 12, "checkpoint_every": 5}
    whole = _run(monkeypatch, tmp_path, example, config)
    assert [m["step"] for m, _ in whole] == list(range(12))
    assert [m["step"] for m, kept in whole if kept] == [4, 9, 11]  # every 5, and the last
    assert whole[-1][0]["loss"] < whole[0][0]["loss"]
    other_rank = _run(monkeypatch, tmp_path, example, config, rank=1)
    assert len(other_rank) == 12 and not any(kept for _, kept in other_rank)

    resumed = _run(monkeypatch, tmp_path, example, config, checkpoint=whole[9][1])
    assert [m["step"] for m, _ in resumed] == [10, 11]
    assert resumed[-1][0] == {**whole[-1][0], "start_step": 10}  # same loss, from step 10
