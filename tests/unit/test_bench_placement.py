"""scripts/bench_placement.py on small clusters (no Ray: the actor part is skipped): place()
beats the baselines where it must, and the benchmark's clusters are what it says they are."""
import json

import pytest

from orchestrator.config import JobSpec
from orchestrator.inventory import GIB, GpuInfo, NodeReport, Reservation
from scripts import bench_placement as bench

KEYS = ("placements_per_s", "p99_ms", "actor_placements_per_s",
        "measured_bottleneck_gbps_mean", "measured_bestfit_bottleneck_gbps_mean",
        "measured_firstfit_bottleneck_gbps_mean", "nodes_spanned_mean",
        "firstfit_nodes_spanned_mean")


@pytest.fixture(scope="module")
def small():
    return bench.run(nodes=400, jobs=150, seed=0, actor=False, quiet=True)


# Two racks of two 8-GPU nodes, listed in rack order; agents measured 20 GB/s to their
# rack-mate and 2 GB/s across. Background work holds 4 GPUs of the first node.
RACKS = {"a0": "r0", "a1": "r0", "b0": "r1", "b1": "r1"}


def measured_node(node_id: str) -> NodeReport:
    gpus = tuple(GpuInfo(i, "NVIDIA A100-SXM4-80GB", 80 * GIB, 79 * GIB,
                         uuid=f"GPU-{node_id}-{i}") for i in range(8))
    return NodeReport(node_id=node_id, hostname=node_id, ray_cpus=96.0, ray_gpus=8.0,
                      cpu_count=96, load_avg_1m=0.0, ram_total_bytes=1024 * GIB,
                      ram_available_bytes=900 * GIB, gpus=gpus,
                      bandwidth_gbps={other: 20.0 if RACKS[other] == RACKS[node_id] else 2.0
                                      for other in RACKS if other != node_id})


def test_on_a_hand_made_cluster_ours_takes_one_rack_and_fewer_nodes_than_first_fit():
    """A job of 16 GPUs. First-fit walks the table: the 4 free GPUs of a0, all of a1, then b0
    (3 nodes, across racks). Best-fit takes the two emptiest nodes in table order, a1 and b0
    (across racks). Only b0 + b1 hold the job on 2 nodes inside one rack."""
    cluster = bench.Cluster("hand-made", [measured_node(n) for n in RACKS],
                            [Reservation("background/a0", "a0", 16, 4)], dict(RACKS),
                            inter_group_gbps=1.0, hold=1.0,
                            jobs=[JobSpec("job", num_workers=16, cpus_per_worker=4.0,
                                          gpus_per_worker=1)], total_gpus=32)
    figures = bench.summarise(bench.run_streams(cluster), cluster.jobs)
    ours, first, best = (figures[p] for p in ("ours", "first-fit", "best-fit"))
    assert (ours["nodes_spanned_mean_common"], first["nodes_spanned_mean_common"]) == (2, 3)
    assert (ours["cross_rack_jobs_common"], first["cross_rack_jobs_common"],
            best["cross_rack_jobs_common"]) == (0, 1, 1)
    assert ours["bottleneck_gbps_mean_common"] == 20.0
    assert first["bottleneck_gbps_mean_common"] == best["bottleneck_gbps_mean_common"] == 2.0


def test_measured_links_steer_ours_to_faster_sets_than_the_baselines(small):
    # Same jobs for every policy (like for like), all spanning several nodes.
    ours = small["measured_bottleneck_gbps_mean"]
    assert ours > 1.5 * small["measured_bestfit_bottleneck_gbps_mean"]
    assert ours > small["measured_firstfit_bottleneck_gbps_mean"]
    assert small["measured_ours_cross_rack_jobs_common"] \
        < small["measured_firstfit_cross_rack_jobs_common"]


def test_ours_spans_fewer_nodes_than_rack_ordered_first_fit(small):
    assert small["nodes_spanned_mean"] < small["firstfit_nodes_spanned_mean"]


def test_declared_racks_keep_ours_inside_one_rack(small):
    assert small["declared_ours_cross_rack_jobs"] == 0
    assert small["declared_firstfit_cross_rack_jobs"] > 0  # rack order alone does not do it
    assert small["declared_ours_bottleneck_gbps_mean_common"] \
        > small["declared_firstfit_bottleneck_gbps_mean_common"]


def test_every_policy_meets_the_same_stream_under_churn(small):
    for cluster in ("declared", "measured"):
        for policy in ("ours", "firstfit", "bestfit"):
            prefix = f"{cluster}_{policy}_"
            assert small[prefix + "placed"] + small[prefix + "rejected"] == 150
            # Held GPUs stay near the cluster's hold threshold: placement under contention.
            assert small[prefix + "held_gpu_fraction_end"] > 0.3


def test_main_prints_tables_then_one_json_line_without_ray(capsys):
    returned = bench.main(["--nodes", "200", "--jobs", "40", "--no-actor"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("[measured]") for line in lines)
    result = json.loads(lines[-1])
    assert result == json.loads(json.dumps(returned))
    assert set(KEYS) <= result.keys()
    assert result["actor_placements_per_s"] is None
    assert result["meets_actor_placements_per_s"] is None
    # The claims the targets name hold on this stream too: ours on faster and fewer nodes
    # than first-fit...
    assert result["measured_bottleneck_gbps_mean"] \
        > result["measured_firstfit_bottleneck_gbps_mean"]
    assert result["nodes_spanned_mean"] < result["firstfit_nodes_spanned_mean"]
    assert result["meets_bandwidth_vs_firstfit"] is True
    assert result["meets_fewer_nodes_than_firstfit"] is True
    # ...and each target's verdict is the comparison it names.
    assert result["meets_bandwidth_vs_bestfit"] == (
        result["measured_bottleneck_gbps_mean"]
        >= bench.TARGET_BESTFIT_BANDWIDTH_RATIO * result["measured_bestfit_bottleneck_gbps_mean"])
    assert result["meets_p99_ms"] == (result["p99_ms"] <= bench.TARGET_P99_MS)


def test_a_target_missed_is_reported_false():
    figures = {"placements_per_s": 10.0, "p99_ms": 50.0, "actor_placements_per_s": 100.0,
               "measured_bottleneck_gbps_mean": 5.0,
               "measured_bestfit_bottleneck_gbps_mean": 4.0,
               "measured_firstfit_bottleneck_gbps_mean": 6.0,
               "nodes_spanned_mean": 3.0, "firstfit_nodes_spanned_mean": 3.0}
    assert set(bench.targets(figures).values()) == {False}
    better = {**figures, "placements_per_s": 5000.0, "p99_ms": 1.0,
              "actor_placements_per_s": 500.0, "measured_bottleneck_gbps_mean": 9.0,
              "nodes_spanned_mean": 2.0}
    assert set(bench.targets(better).values()) == {True}


def test_a_run_too_small_for_like_for_like_figures_says_so(capsys):
    # 16 nodes, 1 job: no job placed by every policy, the like-for-like figures are None; it
    # crashed multiplying None.
    result = bench.main(["--nodes", "16", "--jobs", "1", "--no-actor", "--seed", "11"])
    assert result["like_for_like_jobs"] == 0  # seed 11: the one job is not placed by all
    assert result["nodes_spanned_mean"] is None
    assert result["meets_fewer_nodes_than_firstfit"] is None
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result


def test_the_measured_cluster_is_rack_ordered_unlabelled_and_sparsely_measured():
    cluster = bench.measured_cluster(64, 1, seed=0)
    state = cluster.fresh_state()
    racks = [cluster.rack_of[n] for n in state.table.ids]
    assert racks == sorted(racks)  # listed in rack order
    assert all(not r.labels for r in cluster.reports)
    a = cluster.reports[0]
    assert len(a.bandwidth_gbps) == bench.RACK_SIZE - 1 + bench.CROSS_RACK_PEERS
    assert 10 <= state.pair_bandwidth_gbps(a.node_id, state.table.ids[1]) <= 25  # a rack-mate
    strangers = [r.node_id for r in cluster.reports[bench.RACK_SIZE:]
                 if r.node_id not in a.bandwidth_gbps and a.node_id not in r.bandwidth_gbps]
    assert strangers  # most pairs across racks were never measured: the fallback counts
    assert {state.pair_bandwidth_gbps(a.node_id, n) for n in strangers} == {1.0}


def test_same_seed_same_clusters_and_streams():
    a, b = bench.declared_cluster(120, 30, seed=3), bench.declared_cluster(120, 30, seed=3)
    assert a.reports == b.reports and a.background == b.background and a.jobs == b.jobs
    c, d = bench.measured_cluster(64, 30, seed=3), bench.measured_cluster(64, 30, seed=3)
    assert c.reports == d.reports and c.jobs == d.jobs
    assert bench.measured_cluster(64, 30, seed=4).jobs != c.jobs


@pytest.mark.parametrize("args, message", [
    # The actor takes the declared stream's first --actor-jobs jobs: 8 of a 5-job stream ran 5
    # and the JSON's actor_jobs said 5, unsaid.
    (["--actor-jobs", "8", "--jobs", "5"], "--actor-jobs must be <= --jobs (5): the actor places the declared stream's first "
     "jobs, got 8"),
    # No bound: 100,000,000 nodes built for minutes until memory ran out.
    (["--nodes", "100000000", "--no-actor"], "--nodes must be <= 100000 (the simulator's --cluster bound), got 100000000"),
    # (3 jobs profiled, and the header said "cProfile of 500 jobs")
    (["--nodes", "16", "--jobs", "3", "--no-actor", "--profile", "500"],
     "--profile must be <= --jobs (3): it profiles the measured stream's first jobs, got 500"),
    (["--jobs", "1000000000", "--no-actor"],
     "--jobs must be <= 1000000 (scripts.gen_constrained_trace's --jobs bound), got 1000000000"),
])
def test_flags_the_run_cannot_honour_are_refused_naming_the_flag(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_actor_jobs_default_to_the_stream_when_it_is_shorter(monkeypatch):
    asked = {}
    monkeypatch.setattr(bench, "run", lambda *a, **kw: asked.update(kw) or {})
    with pytest.raises(KeyError):  # (the stubbed run returns no figures to print)
        bench.main(["--jobs", "5"])
    assert asked["actor_jobs"] == 5


def test_dead_nodes_run_forgets_every_dead_node_where_the_baseline_keeps_them(monkeypatch):
    # Ray lists only its last 10 dead here: the 30 others went silent, then unlisted.
    monkeypatch.setattr(bench, "RAY_DEAD_LISTED", 10)
    result = bench.dead_nodes_run(40, seed=0, live=bench.DEAD_RUN_LIVE_NODES, rounds=1,
                                  passes=2, quiet=True)
    assert result["ray_dead_listed"] == 10
    assert result["nodes_held_after"] == bench.DEAD_RUN_LIVE_NODES  # only the live ones
    assert result["nodes_held_kept"] == bench.DEAD_RUN_LIVE_NODES + 40  # the baseline: all
    for op in ("tick", "ray_nodes", "submit"):
        assert result[f"{op}_speedup"] > 0 and len(result[f"{op}_speedup_spread"]) == 2


def test_main_with_dead_nodes_runs_that_part_alone_and_ends_with_its_json(capsys):
    returned = bench.main(["--dead-nodes", "20", "--seed", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result == json.loads(json.dumps(returned))
    assert {"dead_nodes", "tick_ms_kept", "tick_ms_forgotten", "tick_speedup", "submit_ms_kept",
            "submit_ms_forgotten", "submit_speedup", "nodes_held_after"} <= result.keys()
    assert (result["dead_nodes"], result["nodes_held_after"], result["nodes_held_kept"]) \
        == (20, bench.DEAD_RUN_LIVE_NODES, bench.DEAD_RUN_LIVE_NODES + 20)
    assert "placements_per_s" not in result  # (the placement run's figures: not this run)
    assert any(line.startswith("tick:") for line in lines)


@pytest.mark.parametrize("value", ["-3", "100001"])
def test_dead_nodes_out_of_range_is_refused_naming_the_flag(value, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--dead-nodes", value])
    assert exit_.value.code == 2
    assert f"--dead-nodes must be 1 to 100000 (0: the placement run), got {value}" \
        in capsys.readouterr().err
