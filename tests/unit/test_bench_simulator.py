"""scripts/bench_simulator.py: its headline figure (hetero-las' mean-JCT speedup over FIFO
first-fit) on a stream built so that it must win, and the script end to end on small traces."""
import json

import pytest

from orchestrator.traces import TraceJob, prepare
from scripts import bench_simulator as bench

PER_POLICY = ("mean_jct_s", "p99_jct_s", "allocation_rate", "gpu_time_efficiency", "makespan_s")
MODEL = "ResNet-18 (batch size 64)"
# Two racks of two 4-GPU P100 servers, and a rack of K80s no job below may use. First-fit walks
# the table rack by rack, so with one P100 server taken, its next 8 GPUs straddle two racks
# (1.25 GB/s between racks); place() keeps them inside the free rack (12.5 GB/s).
CLUSTER = "p100:4x4,k80:4x2;rack=2"


def stream(*jobs):
    """(submit s, duration s on a P100, GPUs), every job constrained to P100s."""
    return prepare([TraceJob(i, float(submit), float(duration), gpus, MODEL, ("P100",))
                    for i, (submit, duration, gpus) in enumerate(jobs)])


def compare(trace, cluster, policies):
    results = bench.run_policies(trace, cluster, policies)
    return results, bench.figures(results)


def test_hetero_las_beats_fifo_on_a_contended_type_constrained_stream():
    # One 4-GPU job holds a server; an 8-GPU job arrives while it runs.
    results, figures = compare(stream((0, 3600, 4), (1, 3600, 8)), CLUSTER,
                               ("fifo", "hetero-las"))
    fifo, ours = ({j.trace.job_id: j for j in r.jobs} for r in results)
    assert all(j.gpu_types == "p100" for r in results for j in r.jobs)  # the constraint holds
    assert (fifo[1].n_racks, ours[1].n_racks) == (2, 1)  # why ours wins, below
    assert ours[1].runtime < fifo[1].runtime
    speedup = figures["speedup_vs_fifo"]
    assert speedup == round(figures["policies"]["fifo"]["mean_jct_s"]
                            / figures["policies"]["hetero-las"]["mean_jct_s"], 3)
    # JCTs: both 3600 s for the 4-GPU job; the 8-GPU one 3600 s x step(12.5 GB/s)/compute for
    # ours and x step(1.25 GB/s)/compute for FIFO: a clear margin, not a rounding effect.
    assert speedup > 1.2, figures


def test_the_same_stream_where_no_placement_can_do_better_is_a_tie():
    # Nothing contends: both policies put each job inside one rack, so the speedup is 1.
    _, figures = compare(stream((0, 3600, 8), (3600, 3600, 8)), CLUSTER,
                         ("fifo", "hetero-las"))
    assert figures["speedup_vs_fifo"] == 1.0


def test_replays_in_parallel_processes_give_the_sequential_results():
    trace = stream((0, 3600, 4), (1, 3600, 8), (5, 600, 2), (9, 1200, 4))
    policies = ("fifo", "gavel", "hetero-las")
    timing = {"wall_s", "decisions_per_s", "policy_s"}
    sequential = bench.run_policies(trace, CLUSTER, policies)
    parallel = bench.run_policies(trace, CLUSTER, policies, processes=2)
    assert [r.policy for r in parallel] == list(policies)  # the order asked, not finishing
    for one, other in zip(sequential, parallel, strict=True):
        assert {k: v for k, v in one.metrics.items() if k not in timing} == \
            {k: v for k, v in other.metrics.items() if k not in timing}


def test_small_traces_end_with_a_json_line_of_every_policy_and_section(capsys, monkeypatch):
    # The constrained generator at 400 jobs instead of 8,000 (the same cluster and shares),
    # at 20x the load so that jobs wait (a few long jobs hold most of a short trace's GPU-time).
    real = bench.gen_constrained_trace.generate
    monkeypatch.setattr(bench.gen_constrained_trace, "generate",
                        lambda seed: real(seed=seed, jobs=400, load=20.0))
    returned = bench.main(["--sections", "philly,constrained", "--jobs", "300",
                           "--load-scale", "3"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("POLICY") for line in lines)
    result = json.loads(lines[-1])
    assert result == json.loads(json.dumps(returned))
    for section, jobs in (("philly", 300), ("constrained", 400)):
        by = result[section]["policies"]
        assert set(by) == {"fifo", "random", "bestfit", "tiresias", "gavel", "hetero-las"}
        for metrics in by.values():
            assert all(metrics[k] is not None and metrics[k] > 0 for k in PER_POLICY)
            assert metrics["jobs_finished"] + metrics["jobs_never_fit"] == jobs
            # every wait, not only the first: at least the delay to the first start
            assert metrics["mean_wait_s"] >= metrics["mean_first_start_delay_s"] - 1e-6
            assert "mean_queue_s" not in metrics  # it meant the first-start delay only
        assert result[section]["speedup_vs_fifo"] == pytest.approx(
            by["fifo"]["mean_jct_s"] / by["hetero-las"]["mean_jct_s"], abs=1e-3)
        assert result[section]["speedup_vs_gavel"] == pytest.approx(
            by["gavel"]["mean_jct_s"] / by["hetero-las"]["mean_jct_s"], abs=1e-3)
    assert result["philly"]["p99_vs_gavel"] == pytest.approx(
        result["philly"]["policies"]["gavel"]["p99_jct_s"]
        / result["philly"]["policies"]["hetero-las"]["p99_jct_s"], abs=1e-3)
    assert set(result["constrained"]["sweep"]) == {"0.5", "1", "2"}
    busy = result["constrained"]["usable_gpus_busy_while_waiting"]
    assert 0 < busy <= 1
    assert busy == result["constrained"]["policies"]["hetero-las"][
        "usable_gpus_busy_while_waiting"]


def _small_constrained_trace_replays_recorded(monkeypatch) -> list[str]:
    """A 200-job constrained trace; the list the policies' names are appended to as each
    replay runs (once per policy per load scale)."""
    real = bench.gen_constrained_trace.generate
    monkeypatch.setattr(bench.gen_constrained_trace, "generate",
                        lambda seed: real(seed=seed, jobs=200, load=20.0))
    replayed = []
    real_replay = bench._timed_replay
    monkeypatch.setattr(bench, "_timed_replay",
                        lambda trace, cluster, name, *rest: replayed.append(name) or
                        real_replay(trace, cluster, name, *rest))
    return replayed


def test_the_sweep_runs_only_the_policies_asked_for(capsys, monkeypatch):
    # --policies hetero-las: the sweep replayed FIFO at 0.5x and 2x all the same.
    replayed = _small_constrained_trace_replays_recorded(monkeypatch)
    result = bench.main(["--sections", "constrained", "--policies", "hetero-las",
                         "--processes", "1"])
    assert replayed == ["hetero-las"] * 3  # at 1x, 0.5x and 2x the load
    for point in result["constrained"]["sweep"].values():
        assert set(point["mean_jct_s"]) == {"hetero-las"}
    assert set(result["constrained"]["policies"]) == {"hetero-las"}


@pytest.mark.parametrize("args, message", [
    (["--policies", "fifo,hetero_las"], "--policies: unknown hetero_las"),
    (["--load-scale", "0"], "--load-scale must be a number > 0"),
    (["--sweep", "1,x"], "argument --sweep: 'x' is not a number"),
    (["--start", "-1"], "--start must be >= 0"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--sections", "philly,ful"], "--sections: unknown ful"),
    (["--sections", ""], "--sections names no section: give one or more of philly, "
                         "constrained, full, separated by commas"),
    (["--sections", ","], "--sections names no section"),
    (["--policies", ","], "--policies names no policy: give one or more of fifo, "),
    (["--sections", "constrained", "--trace-seed", "-1"], "--trace-seed must be >= 0, got -1"),
    (["--restart-s", "5", "--yield-s", "6"], "--yield-s (6) <= --restart-s (5) must hold"),
    (["--restart-s", "nan"], "--restart-s nan: seconds must be numbers >= 0"),
])
def test_bad_flags_are_refused_before_any_replay(capsys, args, message):
    # A misspelt policy failed only when its replay came, after the others had run.
    with pytest.raises(SystemExit) as e:
        bench.main(["--processes", "1", *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("args", [
    ["--sections", "philly", "--jobs", "20", "--load-scale", "1e-300"],
    ["--sections", "constrained", "--sweep", "1,1e-300"],
])
def test_a_load_scale_past_31_years_of_arrivals_is_refused_before_any_replay(
        capsys, monkeypatch, args):
    # --load-scale 1e-300 printed JCTs of 0 and a 300-digit makespan (a job's run lost in its
    # submit time's rounding); a sweep scale so was refused only after the section's replays.
    real = bench.gen_constrained_trace.generate
    monkeypatch.setattr(bench.gen_constrained_trace, "generate",
                        lambda seed: real(seed=seed, jobs=50))
    monkeypatch.setattr(bench, "run_policies", lambda *a, **k: pytest.fail("replay ran"))
    with pytest.raises(SystemExit) as e:
        bench.main(["--processes", "1", *args])
    assert e.value.code == 2
    assert "error: --load-scale 1e-300: the submit times span" in capsys.readouterr().err


def test_an_out_that_cannot_be_a_directory_is_refused_before_any_replay(tmp_path, capsys,
                                                                       monkeypatch):
    # It ran every replay of the section and then failed with NotADirectoryError.
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(bench, "run_policies", lambda *a, **k: pytest.fail("replay ran"))
    with pytest.raises(SystemExit) as e:
        bench.main(["--processes", "1", "--sections", "constrained", "--out",
                    str(tmp_path / "file" / "out")])
    assert e.value.code == 2
    assert f"cannot write to --out {tmp_path / 'file' / 'out'}: Not a directory" in \
        capsys.readouterr().err


def test_a_slice_past_the_end_of_the_trace_is_a_usage_error(capsys, monkeypatch):
    # It exited 1 with the message, where every other bad flag is argparse's exit 2.
    monkeypatch.setattr(bench, "run_policies", lambda *a, **k: pytest.fail("replay ran"))
    with pytest.raises(SystemExit) as e:
        bench.main(["--processes", "1", "--sections", "philly", "--start", "90000"])
    assert e.value.code == 2
    assert "error: --start 90000: the trace has 82,247 jobs" in capsys.readouterr().err


def test_the_docstring_and_the_docs_name_every_ratio_the_json_carries():
    # speedup_vs_tiresias was emitted (and quoted in the docs' figures) but named in neither
    # list of the JSON's keys; the docstring named the whole-trace section by a --full flag
    # that does not exist.
    from pathlib import Path
    from types import SimpleNamespace

    results = [SimpleNamespace(policy=name, metrics={"mean_jct_s": jct, "p99_jct_s": 2 * jct,
                                                     "usable_gpus_busy_while_waiting": 0.9})
               for name, jct in (("fifo", 3.0), ("gavel", 2.5), ("tiresias", 2.0),
                                 ("hetero-las", 2.0))]
    ratios = set(bench.figures(results)) - {"policies"}
    assert "speedup_vs_tiresias" in ratios
    docs = (Path(__file__).parents[2] / "docs" / "simulator.md").read_text()
    benchmark = docs[docs.index("## Benchmark"):docs.index("### Latest figures")]
    assert [key for key in sorted(ratios) if key not in bench.__doc__] == []
    assert [key for key in sorted(ratios) if key not in benchmark] == []
    assert "(--full)" not in bench.__doc__ and "--sections full" in bench.__doc__


def test_empty_names_in_sections_and_policies_are_skipped(capsys):
    # `--sections "philly,"` (a trailing comma) was refused as `--sections: unknown ` (the
    # empty name, printed as nothing), `--policies "fifo,"` as `--policies: unknown ; use ...`.
    # Empty names are skipped, as --sweep's are, and a name's spaces are not part of it.
    result = bench.main(["--sections", "philly,", "--policies", "fifo, ", "--jobs", "20",
                         "--processes", "1", "--sweep", ""])
    assert set(result) == {"restart", "published_baselines", "philly"}
    assert set(result["philly"]["policies"]) == {"fifo"}
    assert "unknown" not in capsys.readouterr().err


def test_an_out_with_a_leading_tilde_is_home_and_an_empty_one_is_refused(tmp_path, capsys,
                                                                          monkeypatch):
    # `--out=~/bench` made a directory named `~` in the working directory; `--out ""` wrote
    # each section's outputs under the working directory.
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(bench, "run_policies", lambda *a, **k: pytest.fail("replay ran"))
    with pytest.raises(SystemExit) as e:
        bench.main(["--processes", "1", "--sections", "constrained", "--out", ""])
    assert e.value.code == 2
    assert "--out is empty" in capsys.readouterr().err
    written = []
    monkeypatch.setattr(bench, "constrained_section", lambda args, traces: ({}, ["results"]))
    monkeypatch.setattr(bench, "constrained_traces", lambda args: None)
    monkeypatch.setattr(bench, "write_outputs", lambda results, out: written.append(out))
    bench.main(["--processes", "1", "--sections", "constrained", "--out=~/bench"])
    assert written == [home / "bench" / "constrained"]
    assert list(cwd.iterdir()) == []


def test_a_policy_or_sweep_scale_named_twice_is_replayed_once(capsys, monkeypatch):
    # `--policies fifo,fifo` replayed FIFO twice and printed its row twice; `--sweep 2,2,1`
    # replayed the 2x trace twice.
    replayed = _small_constrained_trace_replays_recorded(monkeypatch)
    result = bench.main(["--sections", "constrained", "--policies", "hetero-las, hetero-las",
                         "--sweep", "2,2,1,1", "--processes", "1"])
    assert replayed == ["hetero-las"] * 2  # at 1x and 2x the load, once each
    assert list(result["constrained"]["sweep"]) == ["2", "1"]
    table = capsys.readouterr().out.split("\nConstrained trace at")[0]
    assert table.count("\nhetero-las ") == 1
