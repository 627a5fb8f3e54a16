"""scripts/bench_placement.py runs end to end on a small cluster and ends with its JSON line."""
import importlib.util
import json
import math
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_placement.py"

REQUIRED = ("nodes", "jobs", "placements_per_s", "p50_ms", "p99_ms",
            "baseline_nodes_spanned_mean", "ours_nodes_spanned_mean",
            "baseline_bottleneck_gbps_mean", "ours_bottleneck_gbps_mean",
            "placed", "rejected", "baseline_placed", "baseline_rejected",
            "meets_target_placements_per_s", "meets_target_p99_ms", "meets_target")


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_placement", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_small_benchmark_ends_with_a_json_line_of_sane_figures(capsys):
    bench = load_bench()
    returned = bench.main(["--nodes", "200", "--jobs", "50", "--seed", "0"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) > 1  # a human-readable table comes first
    result = json.loads(lines[-1])
    assert result == json.loads(json.dumps(returned))
    assert all(key in result for key in REQUIRED), set(REQUIRED) - result.keys()
    assert result["nodes"] == 200 and result["jobs"] == 50
    assert result["placed"] > 0 and result["baseline_placed"] > 0
    assert result["placed"] + result["rejected"] == 50
    assert result["baseline_placed"] + result["baseline_rejected"] == 50
    assert result["placements_per_s"] > 0
    assert 0 < result["p50_ms"] <= result["p99_ms"]
    assert result["ours_nodes_spanned_mean"] >= 1 and result["baseline_nodes_spanned_mean"] >= 1
    for key in ("ours_bottleneck_gbps_mean", "baseline_bottleneck_gbps_mean"):
        assert result[key] is None or (math.isfinite(result[key]) and result[key] > 0)
    assert isinstance(result["meets_target"], bool)


def test_same_seed_same_inventory_and_stream():
    bench = load_bench()
    a, info_a = bench.build_cluster(120, seed=3)
    b, info_b = bench.build_cluster(120, seed=3)
    assert info_a == info_b and a.table.ids == b.table.ids
    assert a.reservations_to_dict() == b.reservations_to_dict()
    assert bench.job_stream(30, seed=3) == bench.job_stream(30, seed=3)
