"""jobs/pretrain.py --strategy fsdp under Ray Train: every worker reports its own shard
directory and Ray Train merges them into one checkpoint, which the run resumes from."""
from jobs import pretrain
from tests.support import run_summary as read_summary

TINY = ["--model-size", "tiny", "--batch-size", "4", "--seq-len", "32", "--log-every", "2"]


def test_fsdp_run_checkpoints_every_workers_shard_and_resumes(cluster, tmp_path):
    from pathlib import Path

    run_dir = tmp_path / "fsdp"
    args = [*TINY, "--num-workers", "2", "--strategy", "fsdp", "--checkpoint-every", "2",
            "--run-dir", str(run_dir)]
    assert pretrain.main([*args, "--max-steps", "4"]) == 0
    first = read_summary(run_dir)
    files = {p.name for p in Path(first["checkpoint"]).iterdir()}
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "meta.pt"} <= files
    # Each worker's shard digest reached rank 0's meta.pt, from its own directory, with
    # the index's
    from orchestrator.training.checkpoint import SHARD_DIGESTS, load_tensors
    meta = load_tensors(Path(first["checkpoint"]) / "meta.pt")
    assert sorted(meta[SHARD_DIGESTS]) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert pretrain.main([*args, "--max-steps", "6", "--resume"]) == 0
    resumed = read_summary(run_dir)
    assert resumed["resumed_from_step"] == 4 and resumed["steps"] == 6
    assert resumed["final_loss"] < first["first_loss"]
