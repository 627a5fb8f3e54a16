"""scripts/bench_data.py's rounds, with the passes faked (the Ray Data side needs Ray: run the
script)."""
import sys
import types

import pytest

from scripts import bench_data


def test_the_first_ray_data_pass_of_the_process_is_a_warm_up_not_one_sides_figure(
        tmp_path, monkeypatch):
    # The process's first Ray Data pass paid one-time costs (4.9 s, then 1.8-2.2 s a pass
    # with 1 worker on --quick's corpus): always ray_1's of round 0, which ray_2 and the
    # single-process side never paid; --quick's 2 rounds averaged it into ray_1_vs_single.
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "part00.txt").write_bytes(b"x" * 1_000_000)
    clock, calls = [0.0], []

    def tokenize_with_ray_data(plan, workers, say):
        calls.append(f"ray_{workers}")
        clock[0] += 5.0 if calls.count("ray_1") + calls.count("ray_2") == 1 else 1.0
        return {"train_tokens": 1, "held_out_tokens": 0}

    def tokenize_in_process(plan, say):
        calls.append("single")
        clock[0] += 1.0
        return {"train_tokens": 1, "held_out_tokens": 0}

    monkeypatch.setitem(sys.modules, "ray_layer.data_ingest",
                        types.SimpleNamespace(tokenize_with_ray_data=tokenize_with_ray_data))
    monkeypatch.setattr(bench_data, "tokenize_in_process", tokenize_in_process)
    monkeypatch.setattr(bench_data, "plan_data", lambda *a, **k: None)
    monkeypatch.setattr(bench_data.time, "perf_counter", lambda: clock[0])
    figures = bench_data.tokenizing(corpus, tmp_path / "tokenizer.json", tmp_path / "tok", 2)
    assert figures["ray_1_vs_single"] == pytest.approx(1.0)
    assert figures["ray_2_vs_single"] == pytest.approx(1.0)
    assert figures["tokenize_mb_per_s_ray_1"] == pytest.approx(1.0)
    assert sorted(calls[:3]) == ["ray_1", "ray_2", "single"]  # a warm-up pass of each
