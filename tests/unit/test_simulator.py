"""The trace-driven simulator: known answers on hand-built traces, conservation, determinism,
loaders' errors and the `simulate` CLI. No Ray (the unit tier's fixture makes ray.init raise)."""
import json
import math
import os
from collections import defaultdict

import numpy as np
import pytest

from orchestrator import cluster_model, policies, scheduler_core
from orchestrator.scheduler_types import SchedulerSettings
from orchestrator.__main__ import main
from orchestrator.cluster_model import (ClusterSpecError, build_state, iteration_times,
                                        parse_cluster_spec, throughput)
from orchestrator.simulator import (FINISHED, NEVER_FITS, NOTICE_S, RELOAD_S, RESTART_S,
                                    YIELD_S, RestartCost, simulate, simulation_settings)
from orchestrator.traces import (TraceError, TraceJob, load_canonical, load_philly, load_trace,
                                 prepare, unknown_families)

ALL = policies.POLICY_NAMES
MODEL = "ResNet-18 (batch size 64)"


def trace(*jobs):
    """jobs: (submit, duration, gpus[, "V100" or "V100|K80"]) on the reference GPU."""
    return prepare([TraceJob(i, float(j[0]), float(j[1]), int(j[2]), MODEL,
                             tuple(j[3].split("|")) if len(j) > 3 else ())
                    for i, j in enumerate(jobs)])


def by_id(result):
    return {j.trace.job_id: j for j in result.jobs}


@pytest.mark.parametrize("policy", ALL)
def test_one_job_on_the_reference_gpu_runs_for_its_trace_duration(policy):
    # P100 is the reference GPU: a consolidated job runs exactly its trace duration.
    result = simulate(trace((0, 100, 2)), "p100:8x1", policy, check=True)
    (job,) = result.jobs
    assert job.status == FINISHED and job.start == 0 and job.finish == pytest.approx(100)
    assert job.nodes == "p100-0000:2"
    m = result.metrics
    assert m["mean_jct_s"] == pytest.approx(100) and m["mean_first_start_delay_s"] == 0
    assert m["mean_wait_s"] == 0
    assert m["makespan_s"] == pytest.approx(100)
    assert m["allocation_rate"] == pytest.approx(2 / 8)
    assert m["jobs_finished"] == 1 and m["decisions"] == 1


def test_a_faster_gpu_shortens_the_run_by_the_throughput_ratio():
    result = simulate(trace((0, 1000, 1)), "v100:8x1", "hetero-las")
    ratio = cluster_model.consolidated_throughput(MODEL, "p100", 1) / \
        cluster_model.consolidated_throughput(MODEL, "v100", 1)
    assert result.jobs[0].runtime == pytest.approx(1000 * ratio)
    # The ratio comes from the same model the simulator reads: alone, the check above passes
    # for a model that makes a V100 no faster (or slower) than the P100 the trace ran on.
    assert result.jobs[0].runtime < 0.95 * 1000  # (ResNet-18: 0.93 x on a V100)
    assert result.jobs[0].speed_vs_ideal == pytest.approx(1.0)  # the fastest type present


@pytest.mark.parametrize("policy", ALL)
def test_two_jobs_contending_for_one_server_run_one_after_the_other(policy):
    jobs = by_id(simulate(trace((0, 100, 4), (10, 50, 4)), "p100:4x1", policy, check=True))
    assert (jobs[0].start, jobs[0].finish) == (0, 100)
    assert (jobs[1].start, jobs[1].finish) == (100, 150)


@pytest.mark.parametrize("policy", ALL)
def test_a_job_waits_until_another_ends_while_a_smaller_one_backfills(policy):
    result = simulate(trace((0, 100, 6), (5, 10, 4), (6, 10, 2)), "p100:8x1", policy,
                      check=True)
    jobs = by_id(result)
    assert jobs[1].start == 100 and jobs[1].finish == 110  # fits only once job 0 ends
    assert jobs[2].start == 6 and jobs[2].finish == 16  # backfilled into the 2 free GPUs
    assert result.metrics["mean_first_start_delay_s"] == pytest.approx(95 / 3)
    assert result.metrics["mean_wait_s"] == pytest.approx(95 / 3)  # nobody waits twice


def test_no_backfill_is_strict_queue_order():
    jobs = by_id(simulate(trace((0, 100, 6), (5, 10, 4), (6, 10, 2)), "p100:8x1", "hetero-las",
                          backfill=False))
    assert jobs[2].start == 100  # waits behind the blocked job 1


def test_no_backfill_under_las_is_strict_las_order_not_fifo():
    # A (level 1 after 7,200 s) is preempted by B at 8,000 s and waits; C comes at 8,500 s at
    # level 0. When B ends, C starts first, though A was submitted first: the order nothing
    # may jump is the queue's (here LAS), FIFO only under a FIFO queue order.
    jobs = by_id(simulate(trace((0, 10_000, 1), (8000, 3000, 1), (8500, 100, 1)), "p100:1x1",
                          "hetero-las", backfill=False, check=True))
    a, b, c = jobs[0], jobs[1], jobs[2]
    assert a.preemptions == 1 and c.start == pytest.approx(b.finish)
    assert a.history[1][0] == pytest.approx(c.finish)


@pytest.mark.parametrize("policy", ALL)
def test_accelerator_constraint_is_honoured_and_impossible_jobs_are_counted(policy):
    result = simulate(trace((0, 10, 2, "V100"), (0, 10, 1, "K80"), (0, 10, 16, "V100"),
                            (1, 10, 4, "P100")), "p100:8x2,v100:8x1", policy, check=True)
    jobs = by_id(result)
    assert jobs[0].status == FINISHED and jobs[0].gpu_types == "v100"
    assert jobs[1].status == NEVER_FITS  # no K80 in the cluster
    assert jobs[2].status == NEVER_FITS  # 16 V100s asked, 8 exist
    assert jobs[3].status == FINISHED and jobs[3].gpu_types == "p100"
    assert result.metrics["jobs_never_fit"] == 2


def test_jobs_bigger_than_the_cluster_are_counted_not_dropped():
    result = simulate(trace((0, 10, 2), (0, 10, 32), (0, 10, 2, "K80")), "p100:8x2", "hetero-las")
    jobs = by_id(result)
    assert [jobs[i].status for i in range(3)] == [FINISHED, NEVER_FITS, NEVER_FITS]
    assert result.metrics["jobs_never_fit"] == 2 and result.metrics["jobs"] == 3


def test_spreading_over_racks_is_slower_than_inside_a_rack_as_the_formula_says():
    one_rack = simulate(trace((0, 1000, 8)), "p100:4x2;rack=2;rack_gbps=12.5", "hetero-las").jobs[0]
    two_racks = simulate(trace((0, 1000, 8)), "p100:4x2;rack=1;inter_gbps=1.25", "hetero-las").jobs[0]
    assert one_rack.bottleneck_gbps == 12.5 and two_racks.bottleneck_gbps == 1.25
    compute, comm = iteration_times(MODEL, "p100", 8)
    for job, gbps in ((one_rack, 12.5), (two_racks, 1.25)):
        step = compute + comm * cluster_model.REFERENCE_NETWORK_GBPS / gbps
        assert job.runtime == pytest.approx(1000 * step / compute)
    assert two_racks.runtime > one_rack.runtime > 1000


def test_hetero_las_places_multi_server_jobs_inside_one_rack():
    # Two racks of 2 servers; first-fit order might cross racks, place() must not.
    result = simulate(trace((0, 100, 8)), "p100:4x4;rack=2", "hetero-las", check=True)
    assert result.jobs[0].n_racks == 1 and result.jobs[0].n_nodes == 2


def test_hetero_las_calls_the_live_placement_code(monkeypatch):
    calls = []
    real = scheduler_core.place

    def spy(*args, **kwargs):
        calls.append(args[0].name)
        return real(*args, **kwargs)

    monkeypatch.setattr(scheduler_core, "place", spy)
    simulate(trace((0, 10, 1), (1, 10, 2)), "p100:8x1", "hetero-las")
    assert calls == ["job-0", "job-1"]


def test_gavel_sends_a_job_to_its_fastest_gpu_type():
    # ResNet-18 bs64 runs ~3.4x faster on a V100 than a K80 (Gavel's table).
    result = simulate(trace((0, 100, 1)), "k80:4x4,v100:4x1", "gavel")
    assert result.jobs[0].gpu_types == "v100"
    assert throughput(MODEL, ("v100",), 1, math.inf) > throughput(MODEL, ("k80",), 1, math.inf)


def test_gavel_runs_a_job_no_single_gpu_type_can_hold_across_types():
    # 6 GPUs: neither 4 K80 nor 4 V100 hold it, both together do. Gavel's one-type rule
    # alone would queue it forever on an idle cluster (the simulation used to stop there).
    result = simulate(trace((0, 100, 6), (5000, 100, 2)), "k80:4x1,v100:4x1", "gavel")
    assert by_id(result)[0].gpu_types == "k80/v100"
    assert by_id(result)[1].gpu_types == "v100"  # one type still when one type holds it


def test_gavel_type_order_is_kept_per_allowed_families_not_only_per_model_and_size():
    # The order is memoized per job kind: two jobs of one model and size, the second allowed
    # K80 only, must not share the first's order (V100 first), nor the first the second's.
    for allowed in ("K80", ""):
        jobs = [(0, 100, 1, "K80"), (1, 100, 1)] if allowed else [(0, 100, 1), (1, 100, 1, "K80")]
        result = by_id(simulate(trace(*jobs), "k80:4x1,v100:4x1", "gavel"))
        assert {i: j.gpu_types for i, j in result.items()} == {
            0: "k80" if allowed else "v100", 1: "v100" if allowed else "k80"}


def test_gavel_moves_a_job_only_to_the_families_its_claim_allows():
    # The core claims for a migrating job only faster types no waiting job wants; Gavel-style
    # put J on the A100 server that H (both A100 servers, head of the queue) was waiting for,
    # and H started at 47,991 s instead of when the long A100 job ended (3,652 s).
    jobs = [TraceJob(0, 0.0, 20000.0, 8, accelerators=("A100",)),
            TraceJob(1, 0.0, 200.0, 8, accelerators=("A100",)),
            TraceJob(2, 0.0, 200.0, 8, accelerators=("V100",)),
            TraceJob(3, 1.0, 100000.0, 8),
            TraceJob(4, 2.0, 1000.0, 16, accelerators=("A100",)),
            TraceJob(5, 3.0, 100000.0, 8, accelerators=("A100",))]
    cluster = "a100:8x2,v100:8x1,p100:8x1;rack=16"
    head_starts = {policy: by_id(simulate(jobs, cluster, policy, check=True))[4].history[0][0]
                   for policy in ("fifo", "gavel")}
    assert head_starts["gavel"] == head_starts["fifo"] < 4000


@pytest.mark.parametrize("policy", ("gavel", "fifo", "bestfit", "tiresias", "hetero-las"))
def test_a_job_refused_as_backfill_on_one_family_starts_on_another(policy):
    # The 8-GPU A100-only head waits for job 0's A100s; a long 1-GPU job of any family found
    # room on the A100 server first (Gavel-style: its fastest type; first-fit: table order),
    # which the core refused (it would delay the head), and it waited 711 s at 5 of 12 GPUs
    # busy beside 4 idle K80s. Asked again without the A100s, it starts at once on a K80.
    jobs = [TraceJob(0, 0.0, 2000.0, 4, MODEL, ("A100",)),
            TraceJob(1, 1.0, 1000.0, 8, MODEL, ("A100",)),
            TraceJob(2, 2.0, 20000.0, 1, MODEL)]
    jobs = by_id(simulate(prepare(jobs), "a100:8x1,k80:4x1;rack=16", policy, check=True))
    assert jobs[2].history[0][0] == 2.0 and jobs[2].history[0][2] == "k80-0000:1"
    assert jobs[1].history[0][0] == jobs[0].finish  # the head was not delayed


def random_trace(n, seed, max_gpus=16):
    rng = np.random.default_rng(seed)
    sizes = rng.choice([1, 1, 1, 2, 4, 8, max_gpus], size=n)
    submits = np.cumsum(rng.exponential(30, size=n))
    durations = rng.lognormal(5, 1.2, size=n)
    return prepare([TraceJob(i, float(s), float(d), int(g)) for i, (s, d, g)
                    in enumerate(zip(submits, durations, sizes))])


@pytest.mark.parametrize("policy", ALL)
def test_conservation_no_gpu_double_allocated_and_every_job_accounted_for(policy):
    jobs = random_trace(300, seed=1) + prepare([TraceJob(0, 0, 10, 64)])  # one never fits
    spec = "v100:8x2,p100:4x3,k80:4x2;rack=2"
    capacity = {node: int(state_gpus) for node, state_gpus in zip(
        build_state(parse_cluster_spec(spec)).table.ids,
        build_state(parse_cluster_spec(spec)).table.gpus)}
    result = simulate(jobs, spec, policy, check=True, seed=5)
    statuses = [j.status for j in result.jobs]
    assert statuses.count(FINISHED) + statuses.count(NEVER_FITS) == len(jobs)
    assert statuses.count(NEVER_FITS) == 1
    # Independent sweep over every server: GPUs held never exceed what it has.
    events = defaultdict(list)
    for j in result.jobs:
        if j.status != FINISHED:
            continue
        assert j.start >= j.trace.submit_time_s and j.finish > j.start
        assert j.history[0][0] == j.start and j.history[-1][1] == j.finish
        for start, end, nodes in j.history:  # several after a preemption or migration
            held = [part.rsplit(":", 1) for part in nodes.split(";")]
            assert sum(int(g) for _, g in held) == j.trace.num_gpus
            for node, g in held:
                events[node] += [(end, -int(g)), (start, int(g))]
    for node, evs in events.items():
        level = 0
        for _, delta in sorted(evs):  # releases sort before starts at the same instant
            level += delta
            assert 0 <= level <= capacity[node], node
    assert 0 < result.metrics["allocation_rate"] <= 1
    assert 0 < result.metrics["gpu_time_efficiency"] <= 1


def test_same_seed_same_replay_and_the_seed_matters_for_random():
    # 80 jobs keep the 40 GPUs contended (every policy's makespan is 3-6 times the last
    # submit: a queue forms) in a seventh of 200 jobs' time (gavel's rounds grow faster than
    # the job count).
    jobs = random_trace(80, seed=2)
    spec = "v100:8x3,k80:4x4;rack=2"

    def run(seed):
        r = simulate(jobs, spec, "random", seed=seed)
        return [(j.start, j.finish, j.nodes) for j in r.jobs]

    assert run(7) == run(7)
    assert run(7) != run(8)
    for policy in ("fifo", "bestfit", "hetero-las", "gavel"):
        a, b = (simulate(jobs, spec, policy).metrics for _ in range(2))
        for key in ("mean_jct_s", "p99_jct_s", "makespan_s", "allocation_rate"):
            assert a[key] == b[key], (policy, key)



def test_the_same_trace_and_seed_write_the_same_outputs_in_another_process(tmp_path):
    # In one process sets of strings iterate alike, so the test above cannot see a decision
    # that hangs on their order: two processes with other hash seeds must write byte-identical
    # jobs.csv and the same summary.json but for the timings (policy_s, decisions_per_s,
    # wall_s: seconds of this machine's, not of the replay).
    import subprocess
    import sys

    path = tmp_path / "trace.csv"
    path.write_text("submit_time_s,duration_s,num_gpus,accelerator\n" + "".join(
        f"{j.submit_time_s},{j.duration_s},{j.num_gpus},{('', 'V100', 'K80|P100')[i % 3]}\n"
        for i, j in enumerate(random_trace(40, seed=3))))
    timings = {"policy_s", "decisions_per_s", "wall_s"}
    outputs = []
    for hash_seed in ("1", "2"):
        out = tmp_path / f"out{hash_seed}"
        done = subprocess.run(
            [sys.executable, "-m", "orchestrator", "simulate", "--trace", str(path), "--cluster",
             "v100:8x2,p100:4x3,k80:4x2;rack=2", "--seed", "4", "--out", str(out), "--quiet",
             "--no-plots"], capture_output=True, text=True, timeout=120,
            env={**os.environ, "PYTHONHASHSEED": hash_seed})
        assert done.returncode == 0, done.stderr
        summary = json.loads((out / "summary.json").read_text())
        summary.pop("files")
        for m in summary["policies"].values():
            assert timings <= set(m)
            for key in timings:
                m.pop(key)
        outputs.append(((out / "jobs.csv").read_bytes(), summary))
    assert outputs[0][0].count(b"\n") == 1 + 40 * len(ALL)
    assert outputs[0] == outputs[1]

# -- traces and cluster specs ---------------------------------------------------------------------

def test_canonical_loader_reads_optional_columns(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("submit_time_s,duration_s,num_gpus,model_type,accelerator\n"
                    "0,100,1,,\n5,50.5,4,LM (batch size 20),v100\n\n")
    jobs = load_canonical(path)
    assert [(j.submit_time_s, j.duration_s, j.num_gpus, j.model_type, j.accelerators, j.line)
            for j in jobs] == [(0, 100, 1, "", (), 2), (5, 50.5, 4, "LM (batch size 20)",
                                                         ("V100",), 3)]


@pytest.mark.parametrize("text, message", [
    ("submit_time_s,duration_s,num_gpus,user\n0,1,1,x\n", ":1: unknown column(s) 'user'"),
    # Excel writes a trailing comma: it was "unknown column(s) ''", which names nothing.
    ("submit_time_s,duration_s,num_gpus,\n0,1,1,\n",
     ":1: an empty column name (a trailing comma in the header?)"),
    ("submit_time_s,,duration_s,num_gpus\n0,,1,1\n", ":1: an empty column name (column 2)"),
    ("submit_time_s,num_gpus\n0,1\n", ":1: missing column(s) duration_s"),
    ("submit_time_s,duration_s,num_gpus\n0,1,1\n3,5,two\n", ":3: num_gpus is not a number"),
    ("submit_time_s,duration_s,num_gpus\n0,0,1\n", ":2: duration_s must be a finite number > 0"),
    ("submit_time_s,duration_s,num_gpus\n0,1,1.5\n",
     ":2: num_gpus must be an integer in [1, 100000]"),
    ("submit_time_s,duration_s,num_gpus\n-1,1,1\n", ":2: submit_time_s must be a finite"),
    ("submit_time_s,duration_s,num_gpus\n0,1\n", ":2: 2 field(s), the header has 3"),
    ("submit_time_s,duration_s,num_gpus,accelerator\n0,1,1,V100|\n",
     ":2: accelerator 'V100|' has an empty part"),
    ("submit_time_s,duration_s,num_gpus,model_type\n0,1,1,GPT\n", ":2: unknown model_type"),
    ("", ":1: empty file"),
    ("submit_time_s,duration_s,num_gpus\n0,10,1\n0,10," + "9" * 140_000 + "\n",
     ":3: not readable as CSV: field larger than field limit"),
])
def test_canonical_loader_errors_name_file_and_line(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(TraceError) as e:
        load_canonical(path)
    assert str(e.value).startswith(str(path)) and message in str(e.value)


def test_a_trace_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "t16.csv"
    path.write_text("submit_time_s,duration_s,num_gpus\n0,10,1\n", encoding="utf-16")
    with pytest.raises(TraceError, match=f"{path}:1: not UTF-8 text"):
        load_canonical(path)


def test_an_unknown_family_is_kept_and_its_job_never_fits(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("submit_time_s,duration_s,num_gpus,accelerator\n0,10,1,Z80\n"
                    "0,10,1,z80|P100\n")
    jobs = load_canonical(path)
    assert [j.accelerators for j in jobs] == [("Z80",), ("Z80", "P100")]
    assert [unknown_families(j.accelerators) for j in jobs] == [("Z80",), ("Z80",)]
    result = by_id(simulate(prepare(jobs), "p100:8x1", "hetero-las"))
    # Only Z80 allowed: never submitted. Z80 or P100: runs on the P100 it may use.
    assert result[0].status == NEVER_FITS and result[1].status == FINISHED


def test_makespan_counts_from_the_first_submit_a_job_that_never_fits_included():
    # docs/simulator.md#metrics: first submit of any job (here the Z80 one, at 0) to the last
    # finish; 0 when no job finishes.
    result = simulate(trace((0, 10, 1, "Z80"), (1000, 100, 2)), "p100:8x1", "fifo")
    assert [j.status for j in result.jobs] == [NEVER_FITS, FINISHED]
    assert result.metrics["makespan_s"] == pytest.approx(1100)
    assert simulate(trace((0, 10, 1, "Z80")), "p100:8x1", "fifo").metrics["makespan_s"] == 0


def test_philly_loader_and_its_errors(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("timestamp,duration,num_gpus,gpu_time,cluster\n"
                    "2017-10-09 07:01:55,66.0,1,66.0,a\n2017-10-09 06:01:55,10.0,2,20.0,b\n")
    jobs = load_philly(path)
    assert [(j.submit_time_s, j.duration_s, j.num_gpus) for j in jobs] == [(3600, 66, 1),
                                                                            (0, 10, 2)]
    assert [j.submit_time_s for j in prepare(jobs)] == [0, 3600]
    path.write_text("timestamp,duration,num_gpus,gpu_time,cluster\n"
                    "2017-10-09 07:01:55,66.0,1,66.0,a\n2017/10/09 06:01,10.0,2,20.0,b\n")
    with pytest.raises(TraceError, match=r"p.csv:3: timestamp is not"):
        load_philly(path)
    with pytest.raises(TraceError, match="unknown trace format"):
        load_trace(path, "swf")


def test_bundled_philly_trace_is_complete():
    jobs = load_philly()
    assert len(jobs) == 82_247 and sum(j.num_gpus for j in jobs) == 107_235


def test_prepare_takes_the_first_jobs_by_submit_time_and_scales_load():
    jobs = [TraceJob(i, s, 10, 1) for i, s in enumerate([300, 100, 200, 400])]
    out = prepare(jobs, max_jobs=3, load_scale=2)
    assert [j.submit_time_s for j in out] == [0, 50, 100] and [j.job_id for j in out] == [0, 1, 2]
    with pytest.raises(TraceError, match="load-scale"):
        prepare(jobs, load_scale=0)


@pytest.mark.parametrize("text, part", [
    ("v100:8y40", "v100:8y40"), ("tpu9:8x2", "tpu9:8x2"), ("v100:8x40,k80", "k80"),
    ("v100:0x4", "v100:0x4"), ("v100:8x4;rack=0", "rack=0"), ("v100:8x4;racks=2", "racks=2"),
    ("v100:8x4;rack_gbps=fast", "rack_gbps=fast"),
])
def test_bad_cluster_spec_names_the_part(text, part):
    with pytest.raises(ClusterSpecError, match=f"part '{part}'"):
        parse_cluster_spec(text)


def test_cluster_spec_refuses_a_server_count_it_could_not_build():
    # A typo such as 8x99999999 built one modelled server after another for minutes, then ran
    # out of memory, where every other malformed part is one line at once.
    with pytest.raises(ClusterSpecError, match="part 'k80:4x99999999'.*at most 100,000"):
        parse_cluster_spec("v100:8x4,k80:4x99999999")
    with pytest.raises(ClusterSpecError, match="at most 100,000 servers in all"):
        parse_cluster_spec("v100:8x60000,k80:4x60000")
    assert parse_cluster_spec("v100:8x50000,k80:4x50000").servers == 100_000


def test_cluster_spec_rack_must_be_whole_and_options_given_once():
    # rack=2.5 was refused as "must be a number"; rack=2;rack=3 silently took the last one
    with pytest.raises(ClusterSpecError, match="part 'rack=2.5': rack must be a whole number"):
        parse_cluster_spec("v100:8x4;rack=2.5")
    with pytest.raises(ClusterSpecError, match="part 'rack=3': rack is given twice"):
        parse_cluster_spec("v100:8x4;rack=2;rack=3")


@pytest.mark.parametrize("text, part, why", [
    # int() and float() took these: v100:8x1_0 read as 10 servers
    ("v100:8x1_0", "v100:8x1_0", "'_'"), ("v100:1_6x2", "v100:1_6x2", "'_'"),
    ("v100:8x\u0662", "v100:8x\u0662", "'\u0662'"),  # Arabic-Indic 2
    ("v100:8x2;rack=1_6", "rack=1_6", "'_'"),
    ("v100:8x2;rack_gbps=1_2.5", "rack_gbps=1_2.5", "'_'"),
    ("v100:8x2;inter_gbps=\uff12", "inter_gbps=\uff12", "'\uff12'"),  # full-width 2
])
def test_cluster_spec_refuses_underscores_and_other_digits_naming_the_part(text, part, why):
    with pytest.raises(ClusterSpecError) as e:
        parse_cluster_spec(text)
    assert f"part '{part}'" in str(e.value) and why in str(e.value), str(e.value)
    # Plain notation, spaces around the separators included, still reads.
    spec = parse_cluster_spec("v100: 8 x 2 ;rack= 4;rack_gbps=2.5e1;inter_gbps=.5")
    assert (spec.servers, spec.rack, spec.rack_gbps, spec.inter_gbps) == (2, 4, 25.0, 0.5)


@pytest.mark.parametrize("part", ["inter_gbps=1e-320", "rack_gbps=1e-300", "inter_gbps=0.0009"])
def test_cluster_spec_refuses_a_bandwidth_below_1_mb_per_s(tmp_path, capsys, part):
    # inter_gbps=1e-320 made a spread job's speed 0: ZeroDivisionError from the replay;
    # 1e-300 printed a 300-digit JCT with exit 0.
    with pytest.raises(ClusterSpecError, match=f"part '{part}': .* >= 0.001"):
        parse_cluster_spec(f"v100:4x2;rack=1;{part}")
    path = tmp_path / "trace.csv"
    path.write_text("submit_time_s,duration_s,num_gpus\n0,100,8\n")
    assert main(["simulate", "--trace", str(path), "--out", str(tmp_path / "o"), "--quiet",
                 "--no-plots", "--cluster", f"v100:4x2;rack=1;{part}"]) == 2
    assert capsys.readouterr().err.startswith(f"error: --cluster 'v100:4x2;rack=1;{part}'")
    assert parse_cluster_spec("v100:4x2;rack=1;inter_gbps=0.001").inter_gbps == 0.001


def test_prepare_refuses_a_load_scale_that_overflows_submit_times():
    # --load-scale 1e-307 turned the second submit time into inf: every figure came out nan
    jobs = [TraceJob(0, 0, 10, 1), TraceJob(1, 50, 10, 1)]
    with pytest.raises(TraceError, match="--load-scale 1e-307.*submit time"):
        prepare(jobs, load_scale=1e-307)


@pytest.mark.parametrize("scale", [1e-300, 1e-10])
def test_prepare_refuses_a_load_scale_that_spreads_arrivals_past_31_years(scale):
    # --load-scale 1e-300 put the third job at 2e301 s, where a 300 s job's finish equals its
    # submit time in floats: JCTs came out 0 and the makespan a 300-digit number of days, exit 0
    jobs = [TraceJob(0, 0, 100, 1), TraceJob(1, 10, 200, 1), TraceJob(2, 20, 300, 1)]
    with pytest.raises(TraceError, match=f"--load-scale {scale:g}: .*20 s.*over 1e\\+09 s"):
        prepare(jobs, load_scale=scale)
    assert prepare(jobs, load_scale=2e-8)[-1].submit_time_s == pytest.approx(1e9)


def test_cluster_spec_builds_racks_as_network_groups():
    spec = parse_cluster_spec("V100:8x5,k80:4x3;rack=2;rack_gbps=25;inter_gbps=2")
    assert spec.total_gpus == 52 and spec.gpus_by_type() == {"v100": 40, "k80": 12}
    state = build_state(spec)
    assert len(state.table) == 8 and state.inter_group_gbps == 2
    assert state.pair_bandwidth_gbps("v100-0000", "v100-0001") == 25
    assert state.pair_bandwidth_gbps("v100-0001", "v100-0002") == 2  # next rack
    assert state.pair_bandwidth_gbps("v100-0004", "k80-0000") == 2


# -- the command line -----------------------------------------------------------------------------

def test_simulate_cli_writes_jobs_summary_and_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "trace.csv"
    path.write_text("submit_time_s,duration_s,num_gpus,accelerator\n0,100,2,\n10,50,4,\n"
                    "20,30,1,V100\n30,10,64,\n")
    out = tmp_path / "out"
    assert main(["simulate", "--trace", str(path), "--policy", "all", "--cluster",
                 "v100:4x1,p100:4x1;rack=1", "--out", str(out), "--quiet"]) == 0
    stdout = capsys.readouterr().out
    assert "POLICY" in stdout and "hetero-las" in stdout and "never_fits" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["policies"]) == set(ALL)
    for m in summary["policies"].values():
        assert m["jobs"] == 4 and m["jobs_finished"] == 3 and m["jobs_never_fit"] == 1
    lines = (out / "jobs.csv").read_text().splitlines()
    assert len(lines) == 1 + 4 * len(ALL)
    for png in ("jct_cdf.png", "utilization.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, message", [
    (["--cluster", "v100:8"], "part 'v100:8'"),
    (["--policy", "magic"], "--policy 'magic'"),
    (["--load-scale", "-1"], "--load-scale must be"),
    (["--policy", "random", "--seed", "-1"], "--seed must be an integer >= 0"),
])
def test_simulate_cli_bad_input_is_one_error_line(tmp_path, capsys, args, message):
    path = tmp_path / "trace.csv"
    path.write_text("submit_time_s,duration_s,num_gpus\n0,100,2\n")
    code = main(["simulate", "--trace", str(path), "--out", str(tmp_path / "o"), "--quiet",
                 "--no-plots", *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err


def test_simulate_cli_reports_the_bad_trace_line(tmp_path, capsys):
    path = tmp_path / "trace.csv"
    path.write_text("submit_time_s,duration_s,num_gpus\n0,100,2\n1,x,1\n")
    assert main(["simulate", "--trace", str(path), "--out", str(tmp_path / "o"),
                 "--quiet"]) == 2
    assert f"{path}:3: duration_s is not a number" in capsys.readouterr().err


def simulate_cli(tmp_path, text: str, *args: str):
    """Run `simulate` (fifo, no plots, out in tmp_path/o) on a trace of `text`: (exit code,
    the trace's path)."""
    path = tmp_path / "trace.csv"
    path.write_text(text, encoding="utf-8")
    code = main(["simulate", "--trace", str(path), "--policy", "fifo", "--out",
                 str(tmp_path / "o"), "--quiet", "--no-plots", *args])
    return code, path


@pytest.mark.parametrize("text, message", [
    ("submit_time_s,duration_s,num_gpus\n0,100,1\n1,100,100001\n",
     ":3: num_gpus must be an integer in [1, 100000], got '100001'"),
    ("timestamp,duration,num_gpus\n2017-10-09 07:01:55,100,200000\n", ":2: num_gpus must be"),
    ("submit_time_s,duration_s,num_gpus\n0,1e300,1\n", ":2: duration_s '1e300' is over 1e+09 s"),
    ("submit_time_s,duration_s,num_gpus\n", ": no jobs (only a header)"),
])
def test_simulate_cli_refuses_what_a_replay_cannot_use_naming_the_line(tmp_path, capsys, text,
                                                                      message):
    # A GPU count over JobSpec's limit was a ConfigError traceback (exit 1); a huge duration
    # or a header alone replayed into inf/nan or an empty table with exit 0.
    code, path = simulate_cli(tmp_path, text)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {path}") and message in err
    assert "Traceback" not in err


@pytest.mark.parametrize("text", [
    "\ufefftimestamp,duration,num_gpus\n2017-10-09 07:01:55,100,1\n",
    '"timestamp","duration","num_gpus"\n"2017-10-09 07:01:55",100,1\n',
    "duration,timestamp,num_gpus\n100,2017-10-09 07:01:55,1\n",
    "\n \nsubmit_time_s,duration_s,num_gpus\n0,100,1\n",
])
def test_simulate_cli_auto_format_reads_bom_quoted_reordered_and_blank_led_headers(
        tmp_path, capsys, text):
    code, _ = simulate_cli(tmp_path, text)
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "o" / "summary.json").read_text())[
        "policies"]["fifo"]["jobs_finished"] == 1


def test_no_plots_removes_the_plots_of_an_earlier_run(tmp_path, capsys):
    # They stayed beside the new jobs.csv and summary.json, showing another replay.
    out = tmp_path / "o"
    out.mkdir()
    for name in ("jct_cdf.png", "utilization.png"):
        (out / name).write_bytes(b"old")
    code, _ = simulate_cli(tmp_path, "submit_time_s,duration_s,num_gpus\n0,100,1\n")
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["jobs.csv", "summary.json"]
    assert json.loads((out / "summary.json").read_text())["files"] == ["jobs.csv",
                                                                      "summary.json"]


def test_an_accelerator_alias_never_fits_naming_the_family_to_write(tmp_path, capsys):
    code, _ = simulate_cli(tmp_path, "submit_time_s,duration_s,num_gpus,accelerator\n"
                           "0,100,1,V100S\n1,100,1,P100\n", "--cluster", "v100:8x1,p100:8x1")
    assert code == 0
    assert "unknown accelerator family V100S (V100S is an alias of V100; write V100)" in \
        capsys.readouterr().out


def test_a_job_of_an_alias_and_a_missing_family_never_fits_naming_the_alias_too():
    # V100S|A100 on V100s (the user meant V100 or A100) never fit with the reason "no server
    # of A100 in the cluster": the alias, the whole trouble, was named nowhere.
    result = simulate(trace((0, 10, 1, "V100S|A100"), (0, 10, 1, "Z80|A100")), "v100:8x1",
                      "fifo")
    assert result.metrics["never_fit_reasons"] == {
        "no server of A100 in the cluster; unknown accelerator family V100S (V100S is an "
        "alias of V100; write V100)": 1,
        "no server of A100 in the cluster; unknown accelerator family Z80": 1}


def test_simulate_never_imports_ray(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "trace.csv"
    path.write_text("submit_time_s,duration_s,num_gpus\n0,100,2\n")
    code = ("import sys; from orchestrator.__main__ import main; "
            f"rc = main(['simulate', '--trace', {str(path)!r}, '--out', {str(tmp_path / 'o')!r}, "
            "'--quiet', '--no-plots', '--policy', 'hetero-las']); "
            "assert 'ray' not in sys.modules, 'ray imported'; sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr


# -- the metrics ----------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ALL)
def test_report_figures_on_a_hand_computed_trace(policy):
    # 4 GPUs. A (0 s, 100 s, 4 GPUs) runs 0-100; B (10 s, 50 s, 2) and C (20 s, 30 s, 2) wait
    # for it and run 100-150 and 100-130; D (300 s, 10 s, 1) arrives on an idle cluster; E
    # (400 s, 8 GPUs) never fits: counted, and in no average. No choice is left to a policy,
    # so every one must report these numbers.
    result = simulate(trace((0, 100, 4), (10, 50, 2), (20, 30, 2), (300, 10, 1), (400, 10, 8)),
                      "p100:4x1", policy, check=True)
    jobs = by_id(result)
    assert [(jobs[i].start, jobs[i].finish) for i in range(4)] == [
        (0, 100), (100, 150), (100, 130), (300, 310)]
    m = result.metrics
    assert (m["jobs"], m["jobs_finished"], m["jobs_never_fit"]) == (5, 4, 1)
    assert m["never_fit_reasons"] == {"needs 8 GPUs, the cluster has 4 of any type": 1}
    jct = [100, 140, 110, 10]  # finish - submit
    assert m["mean_jct_s"] == pytest.approx(90)
    assert m["p50_jct_s"] == pytest.approx(105)
    assert m["p99_jct_s"] == pytest.approx(110 + 0.97 * 30) == np.percentile(jct, 99)
    assert m["mean_wait_s"] == m["mean_first_start_delay_s"] == pytest.approx((90 + 80) / 4)
    assert m["makespan_s"] == pytest.approx(310)  # first submit (0) to the last finish
    gpu_seconds = 4 * 100 + 2 * 50 + 2 * 30 + 1 * 10
    assert m["allocation_rate"] == pytest.approx(gpu_seconds / (4 * 310))
    # jobs waited 10-100 s, all 4 GPUs busy throughout; nothing waited while D ran
    assert m["allocation_rate_while_queued"] == pytest.approx(1.0)
    assert m["usable_gpus_busy_while_waiting"] == pytest.approx(1.0)
    assert m["gpu_time_efficiency"] == pytest.approx(1.0)  # P100 is the only (ideal) type
    assert m["preemptions"] == m["migrations"] == 0 and m["restart_overhead"] == 0

@pytest.mark.parametrize("allowed, busy", [("P100", 1.0), ("", 8 / 12)])
def test_usable_gpus_busy_while_waiting_counts_only_gpus_the_waiting_job_may_use(allowed, busy):
    # An 8-GPU job holds the P100 server; an 8-GPU job waits from t=1 to t=1000. The 4 K80s
    # idle meanwhile count against the metric only when the waiting job may use K80s.
    second = (1, 10, 8, allowed) if allowed else (1, 10, 8)
    result = simulate(trace((0, 1000, 8, "P100"), second), "p100:8x1,k80:4x1", "fifo")
    assert result.metrics["usable_gpus_busy_while_waiting"] == pytest.approx(busy)


def test_usable_gpus_busy_while_waiting_is_a_share_of_the_gpus_the_waiting_job_may_use():
    # An 8-GPU P100-only job waits (1 s to 1,000 s) while a 4-GPU job holds half the P100
    # server and 4 P100s idle; 96 V100s are busy with jobs of their own. Of the GPUs the
    # waiting job may use, half are busy; with every allocated GPU (the V100s too, while they
    # run) in the numerator it read 0.92.
    jobs = [(0, 1000, 4, "P100")] + [(0, 1000, 8, "V100")] * 12 + [(1, 10, 8, "P100")]
    result = simulate(trace(*jobs), "p100:8x1,v100:8x12", "fifo", check=True)
    assert by_id(result)[13].start == pytest.approx(1000)
    assert result.metrics["usable_gpus_busy_while_waiting"] == pytest.approx(0.5)


def test_never_fitting_jobs_are_counted_by_reason():
    result = simulate(trace((0, 10, 1, "A100"), (0, 10, 64), (0, 10, 1, "Z80"),
                            (0, 10, 1, "Z80|P100")), "p100:8x1,k80:4x1", "hetero-las")
    assert result.metrics["never_fit_reasons"] == {
        "no server of A100 in the cluster": 1,
        "needs 64 GPUs, the cluster has 12 of any type": 1,
        "unknown accelerator family Z80": 1}
    assert by_id(result)[3].status == FINISHED  # Z80|P100 runs on the P100


def test_a_las_preemption_costs_the_measured_restart_and_loses_no_work():
    # One P100. A runs 8,000 s (> 7,200 GPU-s: LAS level 1); B arrives and preempts it. Told to
    # yield, A checkpoints at its step boundary (as the live loop does), so it keeps all the
    # work done until it saw the directive, and from the directive to its first step after
    # the restart it spends RESTART_S (the measured yield, save included) as B runs between.
    result = simulate(trace((0, 10_000, 1), (8000, 100, 1)), "p100:1x1", "hetero-las",
                      check=True)
    a, b = by_id(result)[0], by_id(result)[1]
    assert a.preemptions == 1
    assert (b.start, b.finish) == (pytest.approx(8000 + YIELD_S), pytest.approx(8100 + YIELD_S))
    assert a.finish == pytest.approx(8100 + RESTART_S + 10_000 - (8000 + NOTICE_S))
    m = result.metrics
    assert m["preemptions_per_job"] == 0.5
    # the GPU is busy throughout: A's yield and reload over all GPU-time
    assert m["restart_overhead"] == pytest.approx((YIELD_S - NOTICE_S + RELOAD_S) / a.finish)


def test_another_restart_cost_is_the_one_the_replay_charges():
    # The same preemption as above at a cheaper restart (bench_yield's tiny CPU job): B starts
    # when A has released its GPU, A trains again restart_s after the directive.
    restart = RestartCost(notice_s=0.5, yield_s=1.2, restart_s=13.8)
    result = simulate(trace((0, 10_000, 1), (8000, 100, 1)), "p100:1x1", "hetero-las",
                      check=True, restart=restart)
    a, b = by_id(result)[0], by_id(result)[1]
    assert a.preemptions == 1
    assert b.start == pytest.approx(8000 + 1.2)
    assert a.finish == pytest.approx(8100 + 1.2 + 13.8 - 1.2 + 10_000 - (8000 + 0.5))
    assert result.metrics["restart_overhead"] == pytest.approx((1.2 - 0.5 + 12.6) / a.finish)
    assert RestartCost(notice_s=2, yield_s=1).problem().startswith("--notice-s (2) <=")
    assert RestartCost().problem() is None


def test_a_restart_over_31_years_is_refused_naming_the_flag():
    # --restart-s 1e300 replayed with exit 0 and printed 300-digit JCTs (every preemption or
    # migration cost 1e300 s): seconds in the wrong unit, as traces.MAX_SECONDS says for traces.
    problem = RestartCost(restart_s=1e300, yield_s=1e300, notice_s=1e300).problem()
    assert problem == ("--notice-s 1e+300, --yield-s 1e+300, --restart-s 1e+300: seconds must "
                       "be numbers >= 0 and at most 1e+09 (31 years)")
    assert RestartCost(restart_s=1e9).problem() is None


def test_the_wait_after_a_preemption_counts_as_waiting_not_only_the_first_start():
    # A starts at once, is preempted by B at 8,000 s and waits while B runs its 100 s: its
    # first start came at once, but it waited 100 s. B waits for A's yield (YIELD_S). The
    # first-start delay says nothing of A's wait (as "mean queue" it read 0, with yields
    # carried out at once).
    result = simulate(trace((0, 10_000, 1), (8000, 100, 1)), "p100:1x1", "hetero-las",
                      check=True)
    a = by_id(result)[0]
    assert a.preemptions == 1
    m = result.metrics
    assert m["mean_first_start_delay_s"] == pytest.approx(YIELD_S / 2)
    assert m["mean_wait_s"] == pytest.approx((100 + YIELD_S) / 2, abs=0.01)
    held = sum(end - start for start, end, _ in a.history)
    assert m["mean_wait_s"] == pytest.approx((a.finish - held + YIELD_S) / 2)  # A came at 0


def test_a_job_moved_without_a_gap_waited_exactly_0():
    # B starts on the P100s at once and restarts on the V100s the instant it releases the
    # P100s: it never waited, but JCT minus the sum of its segments came out 1.5e-11 s (float
    # cancellation at ~1e5 s), and the bench JSON's mean_wait_s read 4.5e-14 for a 0.
    model = "ResNet-50 (batch size 64)"
    result = simulate(prepare([TraceJob(0, 0.0, 1.0, 1, model),
                               TraceJob(1, 20_000.0, 300.0, 4, model, ("V100",)),
                               TraceJob(2, 20_270.0, 96_182.0, 4, model)]),
                      "v100:4x1,p100:4x1", "gavel", check=True)
    b = by_id(result)[2]
    assert b.migrations == 1 and b.start == b.trace.submit_time_s
    assert b.history[0][1] == b.history[1][0]  # no gap between its two segments
    assert result.metrics["mean_wait_s"] == 0.0


def test_jobs_csv_names_the_first_start_delay_and_the_whole_wait(tmp_path):
    from orchestrator.simulator import write_jobs_csv
    import csv

    result = simulate(trace((0, 10_000, 1), (8000, 100, 1)), "p100:1x1", "hetero-las")
    write_jobs_csv([result], tmp_path / "jobs.csv")
    rows = list(csv.DictReader((tmp_path / "jobs.csv").open()))
    assert "queue_s" not in rows[0]
    assert float(rows[0]["first_start_delay_s"]) == 0
    assert float(rows[0]["wait_s"]) == pytest.approx(100, abs=0.01)
    assert float(rows[1]["wait_s"]) == pytest.approx(YIELD_S, abs=0.01)


def test_a_job_that_never_started_waited_none_and_its_csv_wait_is_empty(tmp_path):
    # waited_s on a never-fitting job (no segment run) raised zip()'s bare ValueError. It
    # never entered the queue: its wait is None ("never started"), not 0 and not an error; a
    # job still running or yielded has a wait not over yet, refused naming the job.
    import csv
    import dataclasses

    from orchestrator.simulator import waited_s, write_jobs_csv

    result = simulate(trace((0, 10, 1, "Z80"), (0, 10, 64), (5, 10, 1)), "p100:8x1", "fifo")
    never, too_big, ran = (by_id(result)[i] for i in range(3))
    assert never.status == too_big.status == NEVER_FITS and ran.status == FINISHED
    assert waited_s(never) is None and waited_s(too_big) is None
    assert waited_s(ran) == 0.0
    with pytest.raises(ValueError, match="job-2 .*has not finished \\(running\\)"):
        waited_s(dataclasses.replace(ran, status="running"))
    write_jobs_csv([result], tmp_path / "jobs.csv")
    rows = list(csv.DictReader((tmp_path / "jobs.csv").open()))
    assert [(r["status"], r["wait_s"]) for r in rows] == [
        (NEVER_FITS, ""), (NEVER_FITS, ""), (FINISHED, "0.000")]


@pytest.mark.parametrize("family", ["P100", "V100"])
def test_gpu_time_efficiency_says_where_jobs_ran_at_the_same_makespan(family):
    # C (10,000 s, P100 only) sets the makespan; A (1,000 s) runs beside it on the other P100
    # or on the V100. The work done at ideal (V100) speed is the same either way, so the old
    # goodput_utilization (that work / (cluster GPUs x makespan)) read the same for both:
    # r x 11,000 / (3 x 10,000). The GPU-time it took differs: 11,000 s on P100s, or
    # 10,000 s + 1,000 r s when A runs on the V100.
    result = simulate(trace((0, 10_000, 1, "P100"), (0, 1000, 1, family)), "v100:1x1,p100:1x2",
                      "hetero-las", check=True)
    r = cluster_model.consolidated_throughput(MODEL, "p100", 1) / \
        cluster_model.consolidated_throughput(MODEL, "v100", 1)
    m = result.metrics
    assert m["makespan_s"] == pytest.approx(10_000) and "goodput_utilization" not in m
    gpu_time = 11_000 if family == "P100" else 10_000 + 1000 * r
    assert m["gpu_time_efficiency"] == pytest.approx(11_000 * r / gpu_time)


def test_a_yielding_job_keeps_its_gpus_until_it_has_checkpointed_and_released_them():
    # Live (bench_yield) a victim sees its directive 2.32 s later, at a step boundary, and
    # holds its GPUs while it checkpoints and stops: 6.63 s from the directive to the release.
    # B (level 0) preempts A (level 1) at 8,000 s and starts only then; A trains until it sees
    # the directive, and from the directive to its first step after the restart it spends
    # the measured RESTART_S when placed again at once.
    from orchestrator.simulator import NOTICE_S, RELOAD_S, YIELD_S

    assert (NOTICE_S, YIELD_S, RESTART_S) == (2.32, 6.63, 61.0)
    assert YIELD_S + RELOAD_S == RESTART_S
    result = simulate(trace((0, 10_000, 1), (8000, 100, 1)), "p100:1x1", "hetero-las",
                      check=True)
    a, b = by_id(result)[0], by_id(result)[1]
    assert a.preemptions == 1 and a.history[0][:2] == (0, pytest.approx(8000 + YIELD_S))
    assert b.start == pytest.approx(8000 + YIELD_S)
    trained = 8000 + NOTICE_S
    assert a.finish == pytest.approx(b.finish + RELOAD_S + 10_000 - trained)
    assert a.overhead_s == pytest.approx(YIELD_S - NOTICE_S + RELOAD_S)


def test_a_directive_taken_back_before_the_job_sees_it_stops_nothing():
    # B arrives at 8,000 s and preempts A or C (both past LAS level 1). C ends at 8,001 s,
    # before the victim sees its directive (2.32 s): B starts on C's GPU and the unread
    # directive is withdrawn, as live. Yields carried out at once stopped the victim at
    # 8,000 s.
    result = simulate(trace((0, 20_000, 1), (0, 8001, 1), (8000, 100, 1)), "p100:1x2",
                      "hetero-las", check=True)
    a, c, b = (by_id(result)[i] for i in range(3))
    assert result.metrics["preemptions"] == 0 and len(a.history) == len(c.history) == 1
    assert b.start == pytest.approx(8001) and a.finish == pytest.approx(20_000)


# Decisions that time alone makes possible: the simulator ticks the core when one falls due, as
# the live actor's periodic tick does, not only on arrivals and completions.

def test_a_job_moves_to_a_faster_gpu_once_it_has_run_min_run_s():
    # B starts on the P100 at 10 s while A holds the V100; A ends at 46 s, before B has run
    # min_run_s (120 s), and no event follows: B is told to move when it passes min_run_s
    # (and leaves the P100 once it has yielded).
    result = simulate(trace((0, 50, 1), (10, 10_000, 1)), "v100:1x1,p100:1x1", "hetero-las",
                      check=True)
    b = by_id(result)[1]
    assert b.migrations == 1 and b.nodes == "v100-0000:1"
    assert b.history[0][1] == pytest.approx(10 + 120 + YIELD_S, abs=0.01)


def test_jobs_csv_says_a_moved_jobs_placement_columns_are_its_last(tmp_path):
    # B ran on the P100, then on the V100: its row's placement columns are the V100's, and
    # `placements` says there were two (the columns alone read as if it ran on a V100 only).
    from orchestrator.simulator import write_jobs_csv
    import csv

    result = simulate(trace((0, 50, 1), (10, 10_000, 1)), "v100:1x1,p100:1x1", "hetero-las")
    write_jobs_csv([result], tmp_path / "jobs.csv")
    row = list(csv.DictReader((tmp_path / "jobs.csv").open()))[1]
    assert (row["placements"], row["gpu_types"], row["nodes"]) == ("2", "v100", "v100-0000:1")


def test_a_running_job_crossing_a_las_level_is_preempted_then():
    # A reaches LAS level 1 at 7,200 GPU-s; B (level 0) has waited since 100 s and starts then
    # (once A has yielded), not when A ends.
    result = simulate(trace((0, 10_000, 1), (100, 100, 1)), "p100:1x1", "hetero-las",
                      check=True)
    a, b = by_id(result)[0], by_id(result)[1]
    assert a.preemptions == 1
    assert b.start == pytest.approx(7200 + YIELD_S, abs=0.01)
    assert b.finish == pytest.approx(7300 + YIELD_S, abs=0.01)


def test_a_starving_job_is_promoted_when_its_time_comes():
    # B preempts A at 7,200 s (A at level 1); A yields, having held the GPU for y = 7,200 s +
    # YIELD_S; B reaches level 1 at y + 7,200 s (no preemption between equals). With
    # starvation_factor 1.5, A waits 1.5 y and is put back at level 0 at 2.5 y, where it
    # preempts B, starting once B has yielded; nothing else happens then.
    cluster = "p100:1x1"
    settings = simulation_settings(parse_cluster_spec(cluster), starvation_factor=1.5)
    result = simulate(trace((0, 20_000, 1), (10, 20_000, 1)), cluster, "hetero-las",
                      check=True, settings=settings)
    a, b = by_id(result)[0], by_id(result)[1]
    promoted = 2.5 * (7200 + YIELD_S)
    assert [s for s, _, _ in a.history] == [0, pytest.approx(promoted + YIELD_S, abs=0.01)]
    assert b.preemptions == 1 and b.history[0][1] == pytest.approx(promoted + YIELD_S, abs=0.01)


def test_reloading_after_a_preemption_is_not_goodput():
    # One P100 (ideal = achieved speed): A is preempted by B, holds the GPU while it
    # checkpoints and releases it, and reloads for RELOAD_S. The reload counted as useful work
    # (goodput 100%), flattering the policies that preempt.
    result = simulate(trace((0, 20_000, 1), (8000, 100, 1)), "p100:1x1", "hetero-las",
                      check=True)
    a, b = by_id(result)[0], by_id(result)[1]
    lost = YIELD_S - NOTICE_S + RELOAD_S
    assert a.preemptions == 1 and a.overhead_s == pytest.approx(lost)
    useful = a.runtime - lost + b.runtime
    assert result.metrics["gpu_time_efficiency"] == pytest.approx(
        useful / (a.runtime + b.runtime))
    assert a.speed_vs_ideal == pytest.approx(1 - lost / a.runtime)


def test_tuned_settings_keep_the_policys_own_rules():
    # FIFO given settings ran with LAS order and preemption: the short job preempted the long.
    jobs = trace((0, 20_000, 1), (8000, 100, 1))
    plain = simulate(jobs, "p100:1x1", "fifo", check=True)
    tuned = simulate(jobs, "p100:1x1", "fifo", check=True,
                     settings=SchedulerSettings(min_run_s=300))
    assert plain.metrics["preemptions"] == tuned.metrics["preemptions"] == 0
    assert by_id(tuned)[1].start == by_id(plain)[1].start == pytest.approx(20_000, abs=0.01)
    # The caller's own backfill choice stands (it was overridden by simulate's default).
    cluster = parse_cluster_spec("p100:1x1")
    assert not simulation_settings(cluster, base=SchedulerSettings(backfill=False)).backfill
    assert simulation_settings(cluster, True, base=SchedulerSettings(backfill=False)).backfill


def test_jobs_refused_as_backfill_on_the_fastest_type_start_at_once_on_another():
    # Gavel-style, job 2 (P100|V100, 2 GPUs) first in line. At 330 s job 5's queue pass
    # refuses jobs as backfill (they would delay job 2) and then starts job 5; jobs 3 and 4
    # then fit on GPUs job 2 cannot use, which the live actor's next tick finds. The
    # simulator passed again only at the next event (833 s). They were refused on a V100
    # (Gavel-style's fastest type first) beside free K80s: asked again without the V100s
    # (SchedulerCore._backfill_elsewhere), they now start as they arrive, on the K80s.
    jobs = [(0, 900, 1), (0, 2500, 2), (100, 2500, 2, "P100|V100"), (130, 2500, 1),
            (230, 2500, 1), (330, 60, 1)]
    cluster = "v100:2x1,p100:1x2,k80:1x2"
    settings = simulation_settings(parse_cluster_spec(cluster), queue_order="fifo")
    started = {j.trace.job_id: j.start for j in
               simulate(trace(*jobs), cluster, "gavel", check=True, settings=settings).jobs}
    assert started[3] == 130 and started[4] == 230 and started[5] == 330


@pytest.mark.parametrize("policy", ["fifo", "bestfit", "tiresias"])
def test_type_blind_baselines_are_still_migrated_by_the_core(policy):
    # docs/simulator.md#policies: the type-blind baselines choose only where a job starts;
    # the core's migration (on for every policy) then moves it to a faster free family.
    # Job 1 starts on the K80 server (the V100 one is busy with V100-only job 0) and moves to
    # the V100s once job 0 is done; without migration it would finish on the K80s.
    jobs = by_id(simulate(trace((0, 600, 4, "V100"), (10, 36000, 4)), "k80:4x1,v100:4x1",
                          policy, check=True))
    assert jobs[1].migrations == 1 and jobs[1].gpu_types == "v100"
    assert jobs[1].history[0][2].startswith("k80-0000")
    off = by_id(simulate(trace((0, 600, 4, "V100"), (10, 36000, 4)), "k80:4x1,v100:4x1",
                         policy, settings=SchedulerSettings(migration=False)))
    assert off[1].migrations == 0 and off[1].gpu_types == "k80"
    published = by_id(simulate(trace((0, 600, 4, "V100"), (10, 36000, 4)), "k80:4x1,v100:4x1",
                               policy, published_baselines=True))
    assert published[1].migrations == 0 and published[1].gpu_types == "k80"


def test_published_baselines_leave_the_live_schedulers_own_rules_their_migration(
        tmp_path, capsys):
    # --published-baselines: the type-blind baselines as their papers' schedulers; hetero-las
    # (and gavel) keep the core's migration. The CLI says which in its summary.
    for policy in ("hetero-las", "gavel"):
        jobs = by_id(simulate(trace((0, 600, 4, "V100"), (10, 36000, 4)), "k80:4x1,v100:4x1",
                              policy, published_baselines=True))
        assert jobs[1].gpu_types == "v100", policy
    path = tmp_path / "trace.csv"
    path.write_text(f"submit_time_s,duration_s,num_gpus,model_type,accelerator\n"
                    f"0,600,4,{MODEL},V100\n10,36000,4,{MODEL},\n")
    for flag, migrations in ((["--published-baselines"], 0), ([], 1)):
        out = tmp_path / f"out{len(flag)}"
        assert main(["simulate", "--trace", str(path), "--out", str(out), "--quiet",
                     "--no-plots", "--policy", "tiresias", "--cluster", "k80:4x1,v100:4x1",
                     *flag]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["published_baselines"] == bool(flag)
        assert summary["policies"]["tiresias"]["migrations"] == migrations
    capsys.readouterr()


def test_simulate_cli_ctrl_c_is_one_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    # Ctrl-C in a long replay printed a traceback from deep in the core; the other commands
    # say what happened in one line and exit 130.
    from orchestrator import simulator

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(simulator, "simulate", interrupted)
    path = tmp_path / "trace.csv"
    path.write_text("submit_time_s,duration_s,num_gpus\n0,100,2\n")
    out = tmp_path / "o"
    code = main(["simulate", "--trace", str(path), "--out", str(out), "--quiet", "--no-plots",
                 "--policy", "fifo"])
    err = capsys.readouterr().err
    assert code == 130 and err.startswith("interrupted") and str(out) in err
    # Nor is --out left behind, empty, where there was none: "nothing written to o" left an
    # empty directory o that a user took for a run's outputs gone missing.
    assert not out.exists()


def test_strict_order_head_is_not_kept_off_a_family_by_a_job_behind_it():
    # A random-trace check found a deadlock under --no-backfill: job 1 (all 12 GPUs, any
    # family) is the head; job 2 (8 GPUs, K80 only) behind it had "first call" on the K80s,
    # so the head's room there was 0 for as long as job 2 waited, and job 2 could not start
    # before the head in strict order: both waited on an idle cluster (a RuntimeError here,
    # for ever live). In strict order no job behind the head can start first: none has
    # first call against it.
    jobs = by_id(simulate(trace((0, 30000, 1, "V100|K80"), (0, 30, 12), (1200, 300, 8, "K80")),
                          "v100:4x1,k80:4x2;rack=1", "hetero-las", backfill=False, check=True))
    assert all(j.status == FINISHED for j in jobs.values())
    assert jobs[1].start < jobs[2].start  # strict order kept: the head first


def test_a_job_the_core_drops_without_a_word_stops_the_replay(monkeypatch):
    # Every trace job must finish or be counted as never fitting. A job the core took and
    # then neither ran nor kept queued was left out of every figure without a word (only a
    # job still queued at the end was noticed); now the replay names it.
    from orchestrator.scheduler_types import Outcome

    submit = scheduler_core.SchedulerCore.submit

    def drop_job_1(self, spec, owner, now, *args, **kwargs):
        return Outcome(None) if spec.name == "job-1" else submit(self, spec, owner, now,
                                                                 *args, **kwargs)

    monkeypatch.setattr(scheduler_core.SchedulerCore, "submit", drop_job_1)
    with pytest.raises(RuntimeError, match=r"fifo: 1 job\(s\) neither finished nor .*job-1"):
        simulate(trace((0, 100, 1), (10, 100, 1)), "p100:4x1", "fifo")


def test_plots_of_a_replay_where_no_job_finished_warn_of_nothing(tmp_path):
    # No job finished (every one never fits): matplotlib printed "UserWarning: No artists
    # with labels found to put in legend" into the `simulate` output. The CDF now says that
    # no job finished instead of an empty legend.
    import warnings

    from orchestrator.simulator import PLOT_FILES, write_plots

    result = simulate(trace((0, 100, 64)), "p100:8x1", "fifo")
    assert [j.status for j in result.jobs] == [NEVER_FITS]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert write_plots([result], 8, tmp_path) == list(PLOT_FILES)
    assert all((tmp_path / name).stat().st_size for name in PLOT_FILES)


@pytest.mark.parametrize("policy", ["bestfit", "tiresias", "fifo"])
def test_a_type_blind_baseline_is_migrated_to_the_fastest_free_family_at_once(policy):
    # Job 3 starts on the K80 server (the others are busy); by the time it may move (its
    # min_run_s) the V100 server and one P100 GPU are free. The core asked the policy for a
    # target over both faster families: best-fit took the tightest node, the P100 one, and
    # the job moved again 120 s later, to the V100s: two restarts where one does (the
    # Philly slice at load 6 under tiresias: 179 of 800 jobs moved twice).
    jobs = by_id(simulate(trace((0, 50, 4, "V100"), (0, 100000, 3, "P100"), (0, 50, 1, "P100"),
                                (10, 36000, 1)), "k80:4x1,p100:4x1,v100:4x1", policy,
                          check=True))
    assert jobs[3].history[0][2].startswith("k80-0000")
    assert jobs[3].migrations == 1 and jobs[3].gpu_types == "v100"


@pytest.mark.parametrize("flag", ["--out", "--trace"])
def test_simulate_reads_a_leading_tilde_as_home_and_refuses_an_empty_out(tmp_path, capsys,
                                                                         monkeypatch, flag):
    # `--out=~/sim` (the shell leaves that ~ as written) made a directory named `~` in the
    # working directory, `--trace=~/t.csv` was not found, and `--out ""` wrote jobs.csv and
    # summary.json into the working directory.
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    (home / "t.csv").write_text("submit_time_s,duration_s,num_gpus\n0,100,2\n")
    trace_arg = "~/t.csv" if flag == "--trace" else str(home / "t.csv")
    out_arg = "~/sim" if flag == "--out" else str(tmp_path / "o")
    assert main(["simulate", f"--trace={trace_arg}", f"--out={out_arg}", "--quiet",
                 "--no-plots", "--policy", "fifo"]) == 0
    assert list(cwd.iterdir()) == []
    out = home / "sim" if flag == "--out" else tmp_path / "o"
    assert (out / "summary.json").exists()
    if flag == "--out":
        assert main(["simulate", f"--trace={trace_arg}", "--out", "", "--quiet",
                     "--no-plots", "--policy", "fifo"]) == 2
        assert "error: --out is empty" in capsys.readouterr().err
        assert list(cwd.iterdir()) == []


def test_simulate_refuses_an_empty_trace_naming_the_flag(tmp_path, capsys):
    # `--trace "$UNSET"` read the working directory: "error: .: cannot read: Is a directory".
    assert main(["simulate", "--trace", "", "--out", str(tmp_path / "o"), "--quiet",
                 "--no-plots"]) == 2
    assert capsys.readouterr().err.startswith("error: --trace is empty")
