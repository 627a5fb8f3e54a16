"""scripts/gen_constrained_trace.py: the constrained heterogeneous trace has the shape the
issue asks for (cluster, constraint shares, gang jobs, load), fits, is reproducible and loads
back. One 8,000-job trace per module keeps it fast. No Ray."""
import math
from collections import Counter

import numpy as np
import pytest

from orchestrator.cluster_model import FAMILY_TO_TYPE, GPU_TYPES, parse_cluster_spec, throughput
from orchestrator.simulator import make_jobs
from orchestrator.traces import load_canonical, write_canonical
from scripts import gen_constrained_trace as gen

SPEC = parse_cluster_spec(gen.CONSTRAINED_CLUSTER)
GPUS = gen.family_gpus(SPEC)  # family -> GPUs
N = gen.DEFAULT_JOBS


@pytest.fixture(scope="module")
def jobs():
    return gen.generate()


def replay_gpu_s(jobs, family):
    """Each job's GPU-seconds on `family`, all on one server, as the simulator runs it: its
    work (iterations) over its throughput there (simulator.make_jobs, _Replay.start)."""
    return np.array([j.trace.num_gpus * j.work / throughput(
        j.model, (FAMILY_TO_TYPE[family],), j.trace.num_gpus, math.inf)
        for j in make_jobs(jobs, SPEC)])


def load_on(family, jobs, selected):
    """The load `selected` (a mask over jobs) offers `family`, in the replay's units."""
    last = max(j.submit_time_s for j in jobs)
    return replay_gpu_s(jobs, family)[selected].sum() / (GPUS[family] * last)


def test_the_cluster_has_four_families_and_a_scarce_one_in_8_gpu_servers():
    assert list(GPUS) == ["K80", "P100", "V100", "A100"] and SPEC.total_gpus == 992
    assert gen.scarce_family(GPUS) == "A100" and GPUS["A100"] / SPEC.total_gpus <= 0.10
    scarce_groups = [g for g in SPEC.groups if GPU_TYPES[g.gpu_type].family == "A100"]
    assert scarce_groups and all(g.gpus_per_server == 8 for g in scarce_groups)
    sizes = Counter((GPU_TYPES[g.gpu_type].family, g.gpus_per_server) for g in SPEC.groups)
    assert {f for f, _ in sizes if sum(k[0] == f for k in sizes) > 1} == {"V100", "P100"}


def test_job_count_and_constraint_shares(jobs):
    assert len(jobs) == N == 8_000
    by_len = Counter(len(j.accelerators) for j in jobs)
    assert by_len == {1: round(N / 3), 2: round(0.15 * N), 0: N - round(N / 3) - round(0.15 * N)}
    pairs = Counter("|".join(j.accelerators) for j in jobs if len(j.accelerators) == 2)
    assert set(pairs) == {"K80|P100", "P100|V100", "V100|A100"}


def test_gang_jobs_are_5_percent_of_8_gpus_on_the_scarce_family_at_its_load(jobs):
    # In the replay's units: the GPU-seconds the gang jobs take on the A100s in the simulator
    # (they offered 1.06 there when the load was set with config.ACCELERATOR_SPEED's ratios)
    gang = np.array([j.accelerators == ("A100",) for j in jobs])
    assert gang.sum() == round(0.05 * N) and {j.num_gpus for j in np.array(jobs)[gang]} == {8}
    assert load_on("A100", jobs, gang) == pytest.approx(gen.DEFAULT_SCARCE_LOAD, rel=1e-6)


def test_other_single_family_jobs_pick_by_gpu_count(jobs):
    singles = Counter(j.accelerators[0] for j in jobs
                      if len(j.accelerators) == 1 and j.accelerators != ("A100",))
    total = sum(singles.values())
    assert set(singles) == {"K80", "P100", "V100"}
    others = GPUS["K80"] + GPUS["P100"] + GPUS["V100"]
    for family, count in singles.items():  # 2,267 draws: 5 standard deviations ~ 0.05
        assert count / total == pytest.approx(GPUS[family] / others, abs=0.05), family


def test_offered_load_is_the_target_in_the_replays_units(jobs):
    # A family's capacity in P100s for this trace: its GPUs x the P100-seconds of the trace's
    # work per GPU-second it takes there in the simulator (all jobs on it). Counted with
    # config.ACCELERATOR_SPEED's ratios instead (1,355 P100s), the trace offered 1.34.
    everything = np.ones(len(jobs), dtype=bool)
    work = sum(j.num_gpus * j.duration_s for j in jobs)
    last = max(j.submit_time_s for j in jobs)
    capacity = sum(GPUS[f] * work / replay_gpu_s(jobs, f).sum() for f in GPUS)
    assert work / (capacity * last) == pytest.approx(gen.DEFAULT_LOAD, rel=1e-6)
    overall, per_family = gen.trace_loads(jobs, GPUS)
    assert overall == pytest.approx(0.95, rel=1e-6)
    pinned = {f: np.array([j.accelerators == (f,) for j in jobs]) for f in GPUS}
    for f in GPUS:  # the summary's pinned loads are the replay's too
        assert per_family[f][0] == pytest.approx(load_on(f, jobs, pinned[f]), rel=1e-9), f
    assert load_on("P100", jobs, everything) == pytest.approx(work / (GPUS["P100"] * last))
    submits = [j.submit_time_s for j in jobs]
    assert submits[0] == 0 and submits == sorted(submits)


def test_every_job_fits_its_allowed_families_and_sizes_are_philly_sizes(jobs):
    for j in jobs:
        allowed = j.accelerators or tuple(GPUS)
        assert j.num_gpus <= sum(GPUS[f] for f in allowed), j
    philly_sizes, philly_durations = gen.philly_pairs()
    assert {j.num_gpus for j in jobs} <= set(philly_sizes.tolist())
    non_gang = [j for j in jobs if j.accelerators != ("A100",)]
    rows = set(zip(philly_sizes.tolist(), philly_durations.tolist()))
    assert all((j.num_gpus, j.duration_s) in rows for j in non_gang)  # drawn as pairs


def test_a_job_that_does_not_fit_its_families_is_redrawn():
    rng = np.random.default_rng(3)
    sizes = np.array([1, 64, 128, 2])
    rows = gen.draw_fitting_rows(rng, np.array([2] * 500 + [128] * 500), sizes)
    assert (sizes[rows[:500]] <= 2).all() and set(sizes[rows[500:]].tolist()) == {1, 2, 64, 128}


def test_same_seed_same_bytes_other_seed_other_trace(jobs, tmp_path):
    write_canonical(jobs, tmp_path / "a.csv")
    write_canonical(gen.generate(seed=0), tmp_path / "b.csv")
    write_canonical(gen.generate(seed=1), tmp_path / "c.csv")
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert (tmp_path / "a.csv").read_bytes() != (tmp_path / "c.csv").read_bytes()


def test_the_cli_writes_a_csv_that_loads_back(jobs, tmp_path, capsys):
    out = tmp_path / "trace.csv"
    assert gen.main(["--out", str(out), "--seed", "0"]) == 0
    back = load_canonical(out)
    assert [(j.submit_time_s, j.duration_s, j.num_gpus, j.model_type, j.accelerators)
            for j in back] == \
        [(j.submit_time_s, j.duration_s, j.num_gpus, j.model_type, j.accelerators)
         for j in jobs]
    printed = capsys.readouterr().out
    assert "jobs: 8,000" in printed and "A100 96 (9.7%)" in printed
    assert "offered load: 0.950 overall" in printed


def test_no_gang_jobs_need_no_room_for_a_gang_load(tmp_path, capsys):
    # --scarce-load is the gang jobs' load: without gang jobs it bounds nothing (at --load 0.1
    # the default 0.7 on the A100s was refused as "more than --load").
    out = tmp_path / "trace.csv"
    assert gen.main(["--out", str(out), "--jobs", "200", "--gang-share", "0",
                     "--load", "0.1"]) == 0, capsys.readouterr().err
    back = load_canonical(out)
    assert len(back) == 200 and not any(j.accelerators == ("A100",) for j in back)


@pytest.mark.parametrize("load", ["1e-300", "1e-7"])
def test_a_load_so_low_that_arrivals_span_over_31_years_is_refused(tmp_path, capsys, load):
    # --load 1e-300 wrote submit times of 1e301 s with exit 0: a trace the simulator refuses
    # ("over 1e+10 s ... written in ms or µs?"); --load 1e-7 one spanning 780 years.
    out = tmp_path / "x.csv"
    assert gen.main(["--out", str(out), "--jobs", "50", "--gang-share", "0",
                     "--load", load]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gen_constrained_trace: error: --load {float(load)!r}: ") and \
        "over 1e+09 s (31 years)" in err, err
    assert not out.exists()


def test_a_job_count_past_a_million_is_refused_before_any_array_is_built(tmp_path, capsys,
                                                                         monkeypatch):
    # --jobs 1000000000 ended in numpy's _ArrayMemoryError traceback ("Unable to allocate
    # 22.4 GiB"); --jobs 100000000 ate memory for minutes first. (No generating here: the
    # random generator, made before any array, stops the test if the job count got past.)
    monkeypatch.setattr(gen.np.random, "default_rng",
                        lambda seed: pytest.fail("--jobs 1000000000 went on to generate"))
    out = tmp_path / "x.csv"
    assert gen.main(["--out", str(out), "--jobs", "1000000000"]) == 2
    assert capsys.readouterr().err == ("gen_constrained_trace: error: --jobs must be an integer "
                                       "from 2 to 1,000,000, got 1000000000\n")
    assert not out.exists()
    gen.check_parameters(0, gen.MAX_JOBS, 0.95, 0.7, 0.05, 1 / 3, 0.15,
                         gen.parse_cluster_spec(gen.CONSTRAINED_CLUSTER))


@pytest.mark.parametrize("args, message", [
    (["--jobs", "1"], "--jobs must be an integer from 2 to 1,000,000"),
    (["--seed", "-1"], "--seed must be an integer >= 0, got -1"),
    (["--load", "0"], "--load must be a number > 0"),
    (["--gang-share", "0.5", "--single-share", "0.4"], "--gang-share 0.5 > --single-share"),
    (["--single-share", "0.9", "--pair-share", "0.2"], "> 1"),
    (["--cluster", "v100:8x4"], "needs at least two accelerator families"),
    (["--cluster", "v100:8x4,a100:4x1"], "the scarce family A100 has 4 GPUs"),
    (["--scarce-load", "20", "--jobs", "400"],
     "--scarce-load 20.0 on 96 A100 GPUs is more than --load"),
    (["--cluster", "v100:8"], "part 'v100:8'"),
    (["--jobs", "10", "--gang-share", "0.96", "--single-share", "1", "--pair-share", "0"],
     "makes every job a gang job"),
])
def test_bad_parameters_are_one_error_line(tmp_path, capsys, args, message):
    assert gen.main(["--out", str(tmp_path / "x.csv"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gen_constrained_trace: error: ") and message in err
    assert not (tmp_path / "x.csv").exists()


@pytest.mark.parametrize("where", [".", "missing-dir/x.csv"])
def test_an_out_it_cannot_write_is_refused_naming_the_flag_before_generating(
        tmp_path, capsys, monkeypatch, where):
    # Refused only once the whole trace was generated, as "PATH: cannot write: Is a
    # directory", naming no flag.
    monkeypatch.setattr(gen.np.random, "default_rng",
                        lambda seed: pytest.fail("generated a trace it could not write"))
    out = tmp_path / where
    assert gen.main(["--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith(f"gen_constrained_trace: error: --out {out}: ")


def test_an_out_with_a_home_the_shell_left_unexpanded_is_written_there(tmp_path, monkeypatch):
    # `--out=~/t.csv` reaches the script with its ~ (the shell expands only a word's start):
    # refused as "~ is not a directory", where every other path flag reads ~ as home.
    monkeypatch.setenv("HOME", str(tmp_path))
    assert gen.main(["--out=~/t.csv", "--jobs", "50", "--gang-share", "0"]) == 0
    assert (tmp_path / "t.csv").read_text().count("\n") > 50
