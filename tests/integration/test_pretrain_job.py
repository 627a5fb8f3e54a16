"""jobs/pretrain.py end to end on the shared multi-node cluster."""
import json
import re
import shutil
from pathlib import Path

import pytest

from jobs import pretrain
from orchestrator.job_exit import EXIT_FAILED, EXIT_NOT_PLACEABLE
from orchestrator.runs import RAY_CHECKPOINT_SNAPSHOT
from tests.support import run_summary as read_summary

FORWARDED = re.compile(r"^\s*(\x1b\[[0-9;]*m)?\(\w+ pid=\d+")  # a Ray actor's log line

TINY = ["--model-size", "tiny", "--batch-size", "4", "--seq-len", "32", "--log-every", "2"]


@pytest.fixture(scope="module")
def first_run(cluster, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "three-workers"
    # (a 1-step warmup: under the default 20 the lr of 4 steps stayed so low that the loss
    # fell by less than batch-to-batch noise, and final < first held only by chance)
    # 3 workers, more than any node's 2 CPUs hold: the run spans nodes (a test of its own
    # once, which started one more Ray Train run).
    code = pretrain.main([*TINY, "--num-workers", "3", "--max-steps", "4", "--warmup-steps",
                          "1", "--checkpoint-every", "2", "--run-dir", str(run_dir)])
    assert code == 0
    return run_dir


def test_a_job_larger_than_any_node_spans_nodes_exactly_as_placed_with_a_complete_summary(
        first_run, cluster):
    summary = read_summary(first_run)
    assert summary["steps"] == 4 and summary["precision"] == "fp32"
    assert summary["final_loss"] < summary["first_loss"]
    assert summary["tokens_per_s"] > 0
    assert 0 < summary["mfu"] < 1 and 0 < summary["comm_share"] < 1  # 3 workers: DDP all-reduce
    # The wait after backward is part of the time in flight.
    assert 0 <= summary["comm_exposed_share"] <= summary["comm_share"]
    assert summary["peak_memory_bytes"] > 0
    assert summary["num_workers"] == 3 and len(summary["placement"]) == 3
    assert set(summary["placement"]) <= set(cluster.values())
    assert len(set(summary["placement"])) == 2  # 2 CPUs per node: 3 workers need 2 nodes
    # Ray Train ran each worker exactly on the node the scheduler chose.
    assert summary["placement_honoured"]
    assert sorted(summary["worker_nodes"]) == sorted(summary["placement"])
    assert Path(summary["checkpoint"]).is_dir()
    resolved = json.loads((first_run / "config.json").read_text())
    assert resolved["train"]["model_size"] == "tiny" and resolved["job"]["num_workers"] == 3


def resume(run_dir, max_steps):
    """--resume the run in `run_dir` up to `max_steps`; its summary afterwards."""
    code = pretrain.main([*TINY, "--num-workers", "3", "--max-steps", str(max_steps),
                          "--checkpoint-every", "2", "--run-dir", str(run_dir), "--resume"])
    assert code == 0
    return read_summary(run_dir)


def test_a_resume_of_a_complete_run_is_not_taken_for_an_earlier_drivers_yield(first_run, tmp_path,
                                                                               capsys):
    # Ray Train's record ends at a yield; the final checkpoint after it is on disk but went
    # unregistered (its driver stopped as the workers reported it). The resume finds the run
    # complete, and Ray Train's result still shows that yield: it was taken for one of this
    # driver's, and the finished job given back, queued and fitted a second time.
    run_dir = tmp_path / "yield-then-unregistered"
    shutil.copytree(first_run, run_dir)
    (run_dir / "summary.json").unlink()
    record_file = run_dir / RAY_CHECKPOINT_SNAPSHOT
    record = json.loads(record_file.read_text())
    *kept, unregistered = record["checkpoint_results"]
    kept[-1]["metrics"]["yielded"] = "preempt: preempted for job 'high'"
    record.update(checkpoint_results=kept, latest_checkpoint_result=kept[-1],
                  checkpoint_report_indices=record["checkpoint_report_indices"][:len(kept)])
    record_file.write_text(json.dumps(record))
    log = run_dir / "metrics.jsonl"
    log.write_text("".join(line + "\n" for line in log.read_text().splitlines()
                           if unregistered["checkpoint_dir_name"] not in line))
    step = unregistered["metrics"]["step"]
    capsys.readouterr()
    code = pretrain.main([*TINY, "--num-workers", "3", "--max-steps", str(step),
                          "--checkpoint-every", "2", "--run-dir", str(run_dir), "--resume"])
    out = capsys.readouterr().out
    assert code == 0 and "stopped at step" not in out, out
    assert f"nothing to do: the checkpoint is already at step {step}" in out, out


def test_unplaceable_job_is_refused_with_reasons(cluster, tmp_path, capsys):
    code = pretrain.main([*TINY, "--num-workers", "50", "--run-dir", str(tmp_path / "big")])
    assert code == EXIT_NOT_PLACEABLE
    err = capsys.readouterr().err
    assert "needs 50 worker(s)" in err and "room for 8 worker(s)" in err
    # The job's own output, not the lines Ray forwards from the session's earlier runs'
    # actors ("(TrainController pid=...) ..."), which share this driver's stderr.
    own = [line for line in err.splitlines() if not FORWARDED.match(line)]
    assert not any("Traceback" in line for line in own)


def test_a_diverged_run_fails_at_once_keeping_only_finite_checkpoints(cluster, tmp_path,
                                                                      capsys):
    # --lr 9.9 takes the tiny model's loss to NaN within ~15 steps. The workers return why
    # rather than raise: raised, Ray Train restarted them from the last checkpoint and the same
    # seeds diverged again, max_failures times over, saving NaN weights at each checkpoint.
    import torch

    from orchestrator.runs import read_metrics
    from orchestrator.training.checkpoint import load_checkpoint

    run_dir = tmp_path / "diverges"
    code = pretrain.main([*TINY, "--num-workers", "2", "--max-steps", "60", "--lr", "9.9",
                          "--warmup-steps", "1", "--checkpoint-every", "4",
                          "--run-dir", str(run_dir)])
    assert code == EXIT_FAILED
    own = [line for line in capsys.readouterr().err.splitlines()
           if not FORWARDED.match(line)]
    said = [line for line in own if line.startswith("error: ")]
    assert said and said[0].startswith("error: training diverged at step "), own
    assert not any("restart" in line for line in own), own
    assert not (run_dir / "summary.json").exists()
    last = read_metrics(run_dir)[-1]  # (what `logs NAME` shows last: why the reports stop)
    assert last["diverged"] in said[0] and last["checkpoint"] is None
    for checkpoint in run_dir.glob("checkpoint_*"):
        state = load_checkpoint(checkpoint)
        assert all(torch.isfinite(t).all() for t in state["model"].values()), checkpoint


def test_a_run_too_big_for_any_nodes_ram_is_refused_naming_the_flags_that_size_it(
        cluster, tmp_path, capsys):
    # It was placed by CPU count alone and ran out of memory at step 0 (torch's own
    # "DefaultCPUAllocator: can't allocate memory" named no flag); placement now asks each
    # node for the run's estimated RAM per worker, and the refusal names what sized it.
    code = pretrain.main([*TINY, "--batch-size", "100000000", "--max-failures", "0",
                          "--run-dir", str(tmp_path / "oom")])
    assert code == EXIT_NOT_PLACEABLE
    err = capsys.readouterr().err
    assert "GiB of host RAM (min_host_memory_gb), and the largest node has" in err, err
    assert "--batch-size 100000000 x --seq-len" in err and "lower --batch-size" in err, err
    assert not any((tmp_path / "oom").glob("*"))  # nothing left behind


def test_a_corrupt_latest_checkpoint_falls_back_under_ray_train(first_run):
    # first_run's 4 steps kept checkpoints at steps 2 and 4: the cut step-4 one falls back to 2.
    checkpoints = sorted(p for p in first_run.glob("checkpoint_*") if p.is_dir())
    latest = checkpoints[-1] / "state.pt"
    latest.write_bytes(latest.read_bytes()[:1000])
    summary = resume(first_run, max_steps=8)
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 8, summary


def test_resume_continues_the_step_count_and_span_and_accumulation_resume_exactly(cluster,
                                                                                  tmp_path):
    """Two DDP workers, learnt spans, 'upper' stepping every 4 micro-batches: a run stopped at
    a checkpoint taken mid-accumulation (step 6: two micro-batches pending) and resumed ends
    with the weights of an uninterrupted run. The checkpoint micro-batch is all-reduced even
    though no group steps there, so rank 0's pending gradients are every worker's. The resume
    of that finished 6-step run with a higher --max-steps carries the step count on from its
    last checkpoint (the run once a test of its own, which started one more Ray Train run)."""
    import torch

    from orchestrator.training.checkpoint import load_checkpoint

    def run(run_dir, max_steps, *extra):
        code = pretrain.main([*TINY, "--num-workers", "2", "--max-steps", str(max_steps),
                              "--checkpoint-every", "6", "--attention-span",
                              "--accumulation", "lower=2,upper=4", "--run-dir", str(run_dir),
                              # Constant LR: the first half's schedule must not depend on
                              # where that half's --max-steps ends.
                              "--lr-schedule", "constant",
                              *extra])
        assert code == 0
        return read_summary(run_dir)

    straight = run(tmp_path / "straight", 10)
    run(tmp_path / "resumed", 6)
    resumed = run(tmp_path / "resumed", 10, "--resume")
    assert resumed["resumed_from_step"] == 6 and resumed["steps"] == 10, resumed
    a = load_checkpoint(straight["checkpoint"])["model"]
    b = load_checkpoint(resumed["checkpoint"])["model"]
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name


def test_dry_run_prints_memory_and_placement_and_starts_nothing(cluster, tmp_path, capsys):
    run_dir = tmp_path / "dry"
    assert pretrain.main([*TINY, "--num-workers", "3", "--dry-run",
                          "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "DDP over 3 worker(s)" in out and "FSDP over 3 worker(s)" in out
    placed = re.search(r"would place 'dry': (.*)", out).group(1)
    assert placed.count("-> node") == 3
    assert not run_dir.exists()  # no run directory, no checkpoint, no summary
    assert pretrain.main([*TINY, "--num-workers", "50", "--dry-run",
                          "--run-dir", str(tmp_path / "big")]) == EXIT_NOT_PLACEABLE
    assert "needs 50 worker(s)" in capsys.readouterr().out
