"""scripts/bench_simulator.py runs end to end on a small slice and ends with its JSON line."""
import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_simulator.py"
PER_POLICY = ("mean_jct_s", "p99_jct_s", "allocation_rate", "goodput_utilization", "makespan_s")


def test_small_slice_ends_with_a_json_line_of_every_policy(capsys):
    spec = importlib.util.spec_from_file_location("bench_simulator", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    returned = bench.main(["--jobs", "300", "--cluster", "v100:8x4,k80:4x4;rack=2",
                           "--load-scale", "3"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) > 2 and "POLICY" in lines[1]
    result = json.loads(lines[-1])
    assert result == json.loads(json.dumps(returned))
    assert set(result["policies"]) == {"fifo", "random", "bestfit", "ours", "gavel"}
    for metrics in result["policies"].values():
        assert all(metrics[k] is not None and metrics[k] > 0 for k in PER_POLICY)
        assert metrics["jobs_finished"] + metrics["jobs_never_fit"] == 300
    assert result["ours_vs_fifo_mean_jct_speedup"] > 0
