"""The throughput table (orchestrator/throughput.py): bootstrap, learning, persistence; the
workload keys jobs carry; how `status` shows it; how a training worker sends its figures."""
import csv
import json
import math
from types import SimpleNamespace

import pytest

from orchestrator.__main__ import format_status, format_throughput
from orchestrator.cluster_model import GAVEL_CSV
from orchestrator.config import ACCELERATOR_SPEED, ConfigError, JobSpec, TrainConfig
from orchestrator.throughput import (EMA_WEIGHT, ThroughputTable, per_worker_rate,
                                     pretrain_workload, workload_key)

W = "gpt-small/seq128/b16/auto"
RESNET = "ResNet-50 (batch size 64)"


def gavel_row(job_type: str, num_gpus: int = 1) -> dict[str, float]:
    with GAVEL_CSV.open(newline="") as f:
        for row in csv.DictReader(f):
            if row["job_type"] == job_type and int(row["num_gpus"]) == num_gpus:
                return {k: float(v) for k, v in row.items() if k.endswith("_consolidated")}
    raise AssertionError(f"{job_type} not in {GAVEL_CSV}")


# -- bootstrap ---------------------------------------------------------------------------------

def test_gavel_bootstrap_ratios_are_the_csv_ratios_at_one_gpu():
    table = ThroughputTable.from_gavel()
    row = gavel_row(RESNET)
    assert table.speed(RESNET, "V100") == pytest.approx(1.0)
    assert table.speed(RESNET, "K80") == pytest.approx(row["k80_consolidated"] /
                                                       row["v100_consolidated"])
    assert table.speed(RESNET, "P100") == pytest.approx(row["p100_consolidated"] /
                                                        row["v100_consolidated"])
    # Types Gavel did not measure: V100 x the static speed-up.
    assert table.speed(RESNET, "A100") == pytest.approx(ACCELERATOR_SPEED["A100"])
    # Ratios differ per job type: that is the point of a per-workload table.
    lm = "LM (batch size 20)"
    assert table.speed(lm, "K80") != pytest.approx(table.speed(RESNET, "K80"), rel=0.05)
    assert table.source(RESNET, "K80") == "gavel"


def test_unknown_workload_or_family_falls_back_to_the_prior_then_one():
    table = ThroughputTable.from_gavel()
    assert table.speed("never-seen", "A100") == ACCELERATOR_SPEED["A100"]
    assert table.speed(RESNET, "B200") == ACCELERATOR_SPEED["B200"]  # not modelled by Gavel
    assert table.speed("never-seen", "Z80") == 1.0
    assert table.speed("never-seen", "") == 1.0  # a CPU job: as the core's default speed
    assert table.source("never-seen", "A100") == "static"


def test_the_prior_is_rescaled_to_the_reference_family_and_checked():
    table = ThroughputTable({"T4": 2.0, "A100": 8.0}, reference="T4")
    assert table.speed("w", "T4") == 1.0 and table.speed("w", "A100") == 4.0
    with pytest.raises(ValueError, match="'A100': -1"):
        ThroughputTable({"A100": -1})
    with pytest.raises(ValueError, match="reference"):
        ThroughputTable(reference="")


# -- learning ----------------------------------------------------------------------------------

def test_one_observed_family_keeps_the_prior_ratios():
    table = ThroughputTable()
    for t in range(5):
        table.observe(W, "T4", 1234.0, now=t)
    assert table.speed(W, "T4") == pytest.approx(ACCELERATOR_SPEED["T4"])
    assert table.speed(W, "A100") == pytest.approx(ACCELERATOR_SPEED["A100"])
    assert table.source(W, "T4") == "measured"


def test_two_observed_families_set_their_measured_ratio():
    table = ThroughputTable()
    table.observe(W, "T4", 100.0, now=1)
    table.observe(W, "A100", 300.0, now=2)  # 3x, where the static table says 5.5x
    assert table.speed(W, "A100") / table.speed(W, "T4") == pytest.approx(3.0)
    # Scaled to agree with the prior on geometric average; unobserved families keep theirs.
    assert math.sqrt(table.speed(W, "A100") / ACCELERATOR_SPEED["A100"]
                     * table.speed(W, "T4") / ACCELERATOR_SPEED["T4"]) == pytest.approx(1.0)
    assert table.speed(W, "V100") == 1.0
    assert table.speed("another", "A100") == ACCELERATOR_SPEED["A100"]  # per workload


def test_learning_on_gavel_families_changes_the_gavel_ratio():
    table = ThroughputTable.from_gavel()
    k80, v100 = table.speed(RESNET, "K80"), table.speed(RESNET, "V100")
    table.observe(RESNET, "K80", 10.0, now=0)
    table.observe(RESNET, "V100", 20.0, now=0)
    assert table.speed(RESNET, "V100") / table.speed(RESNET, "K80") == pytest.approx(2.0)
    assert v100 / k80 != pytest.approx(2.0)  # (so the assertion above measures a change)
    assert table.speed(RESNET, "P100") == pytest.approx(
        gavel_row(RESNET)["p100_consolidated"] / gavel_row(RESNET)["v100_consolidated"])


def test_units_do_not_matter():
    tokens, kilotokens = ThroughputTable(), ThroughputTable()
    for t, (family, rate) in enumerate([("T4", 80.0), ("A100", 400.0), ("T4", 90.0),
                                        ("H100", 700.0)]):
        tokens.observe(W, family, rate, now=t)
        kilotokens.observe(W, family, rate * 1000, now=t)
    for family in ("T4", "A100", "H100", "V100", "L4"):
        assert tokens.speed(W, family) == pytest.approx(kilotokens.speed(W, family))


def test_observations_are_smoothed():
    table = ThroughputTable()
    table.observe(W, "T4", 100.0, now=0)
    table.observe(W, "T4", 200.0, now=1)
    (row,) = table.rows()
    assert row["rate"] == pytest.approx(100 + EMA_WEIGHT * 100) and row["samples"] == 2
    assert row["updated_at"] == 1


@pytest.mark.parametrize("workload, family, rate", [
    (W, "T4", 0.0), (W, "T4", -5.0), (W, "T4", math.nan), (W, "T4", math.inf),
    (W, "T4", True), (W, "T4", "100"), (W, "T4", None), ("", "T4", 100.0), (W, "", 100.0),
    (None, "T4", 100.0), (W, 3, 100.0), ("x" * 201, "T4", 100.0),
])
def test_bad_observations_are_ignored(workload, family, rate):
    table = ThroughputTable()
    table.observe(W, "A100", 300.0, now=0)
    table.observe(W, "T4", 100.0, now=0)
    before = table.to_dict()
    table.observe(workload, family, rate, now=1)
    assert table.to_dict() == before


def test_the_oldest_workload_is_forgotten_beyond_the_limit(monkeypatch):
    from orchestrator import throughput

    monkeypatch.setattr(throughput, "MAX_WORKLOADS", 2)
    table = ThroughputTable()
    for t, workload in enumerate(["old", "mid", "new"]):
        table.observe(workload, "T4", 100.0, now=t)
    assert sorted(r["workload"] for r in table.rows()) == ["mid", "new"]


def test_rows_list_measured_first_then_gavel():
    table = ThroughputTable.from_gavel()
    table.observe(W, "T4", 100.0, now=0)
    rows = table.rows()
    assert rows[0]["workload"] == W and rows[0]["source"] == "measured"
    assert {r["source"] for r in rows[1:]} == {"gavel"}


# -- persistence -------------------------------------------------------------------------------

def learnt() -> ThroughputTable:
    table = ThroughputTable()
    for t, (family, rate) in enumerate([("T4", 100.0), ("A100", 300.0), ("T4", 110.0)]):
        table.observe(W, family, rate, now=t)
    table.observe("other", "H100", 50.0, now=9)
    return table


def test_round_trip_through_json_keeps_every_speed():
    table = learnt()
    restored, problems = ThroughputTable.from_dict(json.loads(json.dumps(table.to_dict())))
    assert problems == []
    assert restored.rows() == table.rows()
    for family in ("T4", "A100", "V100"):
        assert restored.speed(W, family) == table.speed(W, family)


def test_a_gavel_table_is_restored_with_its_bootstrap():
    table = ThroughputTable.from_gavel()
    table.observe(RESNET, "K80", 1.0, now=0)
    restored, problems = ThroughputTable.from_dict(table.to_dict())
    assert problems == [] and restored.rows() == table.rows()


def test_a_corrupt_entry_is_skipped_and_named_the_rest_kept():
    saved = learnt().to_dict()
    saved["observed"][1]["rate"] = -3
    saved["observed"].append("garbage")
    saved["observed"].append({"workload": W, "family": "", "rate": 1.0, "samples": 1,
                              "updated_at": 0})
    restored, problems = ThroughputTable.from_dict(saved)
    assert len(problems) == 3
    assert "observed[1]" in problems[0] and "rate must be a finite number > 0, got -3" \
        in problems[0]
    assert "observed[3]" in problems[1] and "expected a mapping" in problems[1]
    assert "observed[4]" in problems[2] and "family" in problems[2]
    kept = {(r["workload"], r["family"]) for r in restored.rows()}
    assert len(kept) == len(saved["observed"]) - 3 == 2


@pytest.mark.parametrize("saved, expected", [
    ("nonsense", "expected a mapping, got str"),
    ({"observed": {"a": 1}}, "observed must be a list"),
    ({"reference": 7, "observed": []}, "reference must be a family name"),
])
def test_an_unreadable_table_is_named_and_starts_from_the_bootstrap(saved, expected):
    restored, problems = ThroughputTable.from_dict(saved)
    assert len(problems) == 1 and expected in problems[0]
    assert restored.speed(W, "A100") == ACCELERATOR_SPEED["A100"]


# -- workload keys -----------------------------------------------------------------------------

def test_workload_keys_name_what_sets_the_speed():
    assert workload_key("small", 128, 16, "bf16") == "gpt-small/seq128/b16/bf16"
    assert workload_key(124_000_000, 1024, 8, "fp16") == "gpt-124M/seq1024/b8/fp16"
    base = TrainConfig()
    assert pretrain_workload(base) == \
        f"gpt-small/seq{base.seq_len}/b{base.batch_size}/auto/v{base.vocab_size}"
    # (the vocabulary sets the LM head's share of the work: 257 bytes against GPT-2's 50,257
    # tokens is a third of GPT-2 small's FLOPs; FSDP adds gathers DDP has not)
    changes = ({}, {"model_size": "large"}, {"seq_len": 256}, {"batch_size": 8},
               {"precision": "fp32"}, {"attention_span": True}, {"compile": False},
               {"compile": True}, {"compile": True, "attention_span": True},
               {"vocab_size": 50257}, {"strategy": "fsdp"})
    keys = {pretrain_workload(TrainConfig(**change)) for change in changes}
    assert len(keys) == len(changes)  # each of these changes the key
    assert pretrain_workload(TrainConfig(lr=1e-3, max_steps=5)) == pretrain_workload(base)


def test_pretrain_sets_the_workload_of_its_jobspec(tmp_path):
    from jobs.pretrain import build_configs, parse_args

    args = parse_args(["--model-size", "tiny", "--seq-len", "64", "--batch-size", "4",
                       "--precision", "fp32"])
    _, spec = build_configs(args, tmp_path / "run-1")
    assert spec.workload == "gpt-tiny/seq64/b4/fp32/v256"  # (no data resolved here)


def test_jobspec_workload_is_checked_and_saved():
    assert JobSpec("a").workload == "" and JobSpec.from_dict({"name": "a"}).workload == ""
    spec = JobSpec("a", workload=W)
    assert JobSpec.from_dict(spec.to_dict()) == spec
    for bad in (3, "x" * 201, "line\nbreak"):
        with pytest.raises(ConfigError, match="workload must be a string of at most 200"):
            JobSpec("a", workload=bad)


@pytest.mark.parametrize("metrics, expected", [
    ({"tokens_per_s": 1000.0, "world_size": 4}, 250.0),
    ({"tokens_per_s": 1000.0}, 1000.0),
    ({"step": 3}, None), ({"tokens_per_s": 0.0, "world_size": 2}, None),
    ({"tokens_per_s": math.nan, "world_size": 2}, None),
    ({"tokens_per_s": 10.0, "world_size": 0}, None),
])
def test_per_worker_rate_from_a_report(metrics, expected):
    assert per_worker_rate(metrics) == expected


# -- status ------------------------------------------------------------------------------------

def test_status_shows_measured_workloads_and_counts_the_rest():
    table = ThroughputTable.from_gavel()
    table.observe(W, "T4", 100.0, now=0)
    table.observe(W, "A100", 300.0, now=1)
    lines = format_throughput({"reference": "V100", "rows": table.rows()})
    assert lines[0].startswith("throughput (speed relative to V100")
    assert lines[1] == f"  {W}: A100 1.62x (1), T4 0.54x (1)"
    gavel_rows = len(table.rows()) - 2
    assert lines[2] == f"  {gavel_rows} bootstrapped (workload, family) speed(s) not shown"
    assert len(lines) == 3


def test_status_says_when_nothing_is_measured_and_caps_the_workloads():
    assert "nothing measured yet" in format_throughput(
        {"reference": "V100", "rows": []})[1]
    assert format_throughput(None) == []
    table = ThroughputTable()
    for i in range(12):
        table.observe(f"w{i:02d}", "T4", 1.0, now=i)
    lines = format_throughput({"reference": "V100", "rows": table.rows()}, max_workloads=10)
    assert len(lines) == 12 and lines[-1] == "  ... 2 more measured workload(s)"
    assert "throughput (speed" in format_status([], [], {"reference": "V100",
                                                         "rows": table.rows()})


# -- a training worker's side (ray_layer/train_session.py), Ray calls stubbed ------------------

def test_the_directive_watch_sends_each_new_rate_once_after_the_warm_up(monkeypatch):
    import ray.train

    from ray_layer import train_session

    sent = []
    scheduler = SimpleNamespace(directive=SimpleNamespace(
        remote=lambda *args: sent.append(args)))  # returns None: no answer to wait for
    monkeypatch.setattr(train_session, "scheduler_or_none", lambda: scheduler)
    monkeypatch.setattr(ray.train, "get_context",
                        lambda: SimpleNamespace(get_experiment_name=lambda: "job"))
    clock = iter(range(0, 100, 2))  # two seconds between polls: each poll asks
    monkeypatch.setattr(train_session.time, "monotonic", lambda: next(clock))
    watch = train_session.DirectiveWatch()
    watch.throughput(50.0)  # the warm-up interval: dropped
    watch.poll()
    watch.throughput(None)  # a report without the figure
    watch.throughput(120.0)
    watch.poll()
    watch.poll()
    assert [args[2] for args in sent] == [None, 120.0, None]
    assert all(args[0] == "job" for args in sent)
