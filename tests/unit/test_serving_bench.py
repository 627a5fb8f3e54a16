"""scripts/bench_serve.py's arithmetic (the load itself needs Ray: run the script)."""
import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_serve.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_serve", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_serve"] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules["bench_serve"]


def test_summary_counts_only_successes_in_qps_and_latency(bench):
    results = [bench.Result(0.0, 0.010 * (i + 1), 200) for i in range(100)]
    results.append(bench.Result(0.0, 5.0, 503, error="overloaded"))
    figures = bench.summarize("x", results, seconds=10)
    assert (figures["requests"], figures["ok"], figures["failed"]) == (101, 100, 1)
    assert figures["qps"] == 10.0
    assert figures["p50_ms"] == pytest.approx(505.0) and figures["p99_ms"] == pytest.approx(1000.0)


def test_switch_time_is_until_the_first_answer_of_the_new_version(bench):
    results = [bench.Result(9.0, 10.5, 200, "old"), bench.Result(10.2, 10.9, 200, "new"),
               bench.Result(10.4, 11.3, 200, "new")]
    assert bench.switch_time(results, "new", applied_at=10.0) == pytest.approx(0.9)
    assert bench.switch_time(results[:1], "new", applied_at=10.0) is None


def test_fresh_checkpoints_are_two_different_servable_models(bench, tmp_path):
    from orchestrator.serving.loading import load_model

    first, second = bench.fresh_checkpoints("tiny", 32, tmp_path)
    assert load_model(first).version != load_model(second).version
