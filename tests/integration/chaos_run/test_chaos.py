"""The chaos run, short version (scripts/chaos.py --quick): every fault once, on its own
ray.cluster_utils.Cluster, while training, serving and the scheduler all run.

This package sorts before the rest of the integration tier, so its cluster is up before the
session's shared one exists and gone (Ray shut down) before that one starts: two local
clusters at once would share 2 cores.
"""
import json

from orchestrator.faults import FAULTS


def test_training_serving_and_scheduling_survive_every_fault_at_once():
    from scripts import chaos

    result = chaos.main(["--quick", "--seed", "0"])
    everything = json.dumps(result, indent=1)  # the whole record, in every failure message
    assert sorted(f["kind"] for f in result["faults"]) == sorted(FAULTS), everything
    assert all(f["survived"] for f in result["faults"]), everything
    assert result["train_completed"], everything
    assert result["loss_matches_reference"], everything
    assert result["scheduler_reservations_consistent"], everything
    assert result["serve_requests"] > 0, everything
    assert result["serve_success_rate"] >= chaos.MIN_SERVE_SUCCESS_RATE, everything
    # Work redone is bounded by what the checkpoints left: per restart, at most the steps
    # since the checkpoint resumed from (two intervals after the truncated one).
    assert result["train_steps_lost"] <= (result["train_restarts"] + 1) * 2 * 10, everything
