"""scripts/bench_yield.py's arithmetic (no Ray): one planned yield split at the job's, the
driver's and Ray Train's timestamps, the medians over rounds, and the checks that refuse
records of different yields."""
import pytest

from scripts import bench_yield as bench

ISSUED = 1000.0


def yield_record(**changes):
    """The yield's metrics.jsonl record (rank 0's report, written by Ray Train's controller)."""
    return {"step": 141, "start_step": 0, "yielded": "preempt: preempted by an operator",
            "directive_seen_at": 1000.7, "time": 1003.6, "checkpoint": "/runs/x/checkpoint_1",
            **changes}


def driver_yield(**changes):
    """The driver's summary.json yields entry."""
    return {"step": 141, "reason": "preempt: preempted by an operator", "at": 1006.4,
            "placed_at": 1006.5, **changes}


def resumed(**changes):
    """The first metrics.jsonl record after the resume."""
    return {"step": 160, "start_step": 141, "started_at": 1038.5, "restored_at": 1044.5,
            "first_step_at": 1047.0, **changes}


def test_a_yield_splits_into_its_parts_which_add_up_to_the_total():
    parts = bench.split(bench.round_marks(ISSUED, yield_record(), driver_yield(), resumed()))
    expected = {"notice_s": 0.7, "checkpoint_s": 2.9, "release_s": 2.8, "replace_s": 0.1,
                "restart_s": 32.0, "restore_s": 6.0, "first_step_s": 2.5,
                "planned_yield_s": 47.0}
    assert parts == pytest.approx(expected)
    assert sum(v for k, v in parts.items() if k != "planned_yield_s") == \
        pytest.approx(parts["planned_yield_s"])


@pytest.mark.parametrize("record, entry, resume, says", [
    (yield_record(yielded=None), driver_yield(), resumed(), "not a yield's report"),
    (yield_record(), driver_yield(step=140), resumed(), "driver's yield is at step 140"),
    # Resumed from an older checkpoint (or from scratch): not the yield's restore.
    (yield_record(), driver_yield(), resumed(start_step=100), "resume started at step 100"),
])
def test_records_of_different_yields_are_refused(record, entry, resume, says):
    with pytest.raises(ValueError, match=says):
        bench.round_marks(ISSUED, record, entry, resume)


def test_a_mark_before_the_one_it_follows_is_refused():
    marks = bench.round_marks(ISSUED, yield_record(), driver_yield(placed_at=1006.0),
                              resumed())
    with pytest.raises(ValueError, match="'placed'.*precedes 'released'"):
        bench.split(marks)


def test_medians_are_per_part_and_the_total_is_the_median_of_totals():
    rounds = [bench.split(bench.round_marks(ISSUED, yield_record(), driver_yield(),
                                            resumed(started_at=started)))
              for started in (1030.5, 1038.5, 1020.5)]  # restarts of 24, 32 and 14 s
    medians = bench.summarise(rounds)
    assert medians["restart_s"] == 24.0
    assert medians["restore_s"] == 14.0  # restored_at fixed: the later start, the shorter
    assert medians["planned_yield_s"] == 47.0
    assert list(medians)[0] == "planned_yield_s"
    # (statistics.median of nothing raises a ValueError too, without saying what is missing)
    with pytest.raises(ValueError, match="no rounds to summarise"):
        bench.summarise([])


def test_the_table_has_a_row_per_part_a_column_per_round_and_the_median():
    rounds = [bench.split(bench.round_marks(ISSUED, yield_record(), driver_yield(),
                                            resumed()))] * 2
    lines = bench.format_table(rounds, bench.summarise(rounds)).splitlines()
    assert lines[0].split()[:5] == ["PART", "(s)", "round", "1", "round"]
    assert [line.split()[0] for line in lines[1:]] == [
        "notice", "checkpoint", "release", "replace", "restart", "restore", "first_step",
        "total"]
    assert lines[5].split()[1:4] == ["32.00", "32.00", "32.00"]


def test_the_fresh_start_reference_is_the_first_attempt():
    records = [{"step": 20, "start_step": 0, "started_at": 10.0, "restored_at": 13.5,
                "first_step_at": 15.0},
               resumed()]
    assert bench.fresh_start(records) == {"fresh_restore_s": 3.5, "fresh_first_step_s": 1.5}
    with pytest.raises(ValueError, match="no report of the job's first attempt"):
        bench.fresh_start([resumed()])


def test_bad_flags_fail_before_ray_starts(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--segment-steps", "30", "--log-every", "20"])
    assert "--segment-steps must be >= 4 x --log-every (80" in capsys.readouterr().err


def test_the_model_is_described_with_the_count_training_gives():
    # Every weight, the position table too (the banner's parameters_label), not FLOPs' count.
    from orchestrator.config import TrainConfig
    from orchestrator.training.data import VOCAB_SIZE
    from orchestrator.training.memory import parameters_label
    from orchestrator.training.model import GPT, GPTConfig

    model = GPT(GPTConfig.from_train_config(TrainConfig(model_size=bench.MODEL),
                                            vocab_size=VOCAB_SIZE))
    every_weight = sum(p.numel() for p in model.parameters())
    assert bench.model_description().startswith(
        f"{bench.MODEL} GPT ({parameters_label(every_weight)}), ")
