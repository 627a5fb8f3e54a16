"""scripts/bench_data.py's rounds, with the passes faked (the Ray Data side needs Ray: run the
script)."""
import sys
import types

import numpy

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
    # Each ratio's spread [min, max] of the rounds' own beside it (a median alone hid them).
    assert figures["ray_1_vs_single_spread"] == figures["ray_2_vs_single_spread"] == [1.0, 1.0]
    assert sorted(calls[:3]) == ["ray_1", "ray_2", "single"]  # a warm-up pass of each



class FakeStream:
    """A token stream of four tokens (training() loads each in memory for the other side)."""

    def __len__(self):
        return 4

    def window(self, start, length):
        return numpy.zeros(length, dtype=numpy.int64)


def test_the_first_training_run_of_the_process_is_a_warm_up_not_one_sides_figure(
        tmp_path, monkeypatch):
    # The process's first train() was the slowest (1 thread, same config: 8,983-10,027 tok/s,
    # then 9,381-11,788): always round 0's mmap run, which the in-memory side never paid,
    # against mmap_vs_memory_train's target of 0.95.
    from orchestrator.training import loop

    shards_source, sides = loop.training_data, []

    def train(config, session):
        sides.append("mmap" if loop.training_data is shards_source else "memory")
        # (after the warm-up: each round's mmap run at 1000 tok/s, memory 1000 then 1250)
        rate = {1: 500.0, 5: 1250.0}.get(len(sides), 1000.0)
        return {"run_tokens_per_s": rate}

    monkeypatch.setattr(bench_data, "plan_data", lambda *a, **k: types.SimpleNamespace(
        cache_uri="", key="", tokenizer=types.SimpleNamespace(vocab_size=256, sha256="")))
    monkeypatch.setattr(bench_data, "tokenize_in_process", lambda plan, say: None)
    monkeypatch.setattr(bench_data, "open_shards",
                        lambda uri: (FakeStream(), FakeStream(), None))
    monkeypatch.setattr(bench_data, "batch_cost", lambda *a: {})
    monkeypatch.setattr(loop, "train", train)
    figures = bench_data.training(tmp_path / "corpus", tmp_path / "tokenizer.json",
                                  tmp_path / "train", 2, 6)
    assert sorted(sides[:2]) == ["memory", "mmap"]  # an untimed run of each first
    assert len(sides) == 2 + 2 * 2
    assert sides[2:] == ["mmap", "memory", "memory", "mmap"]
    assert figures["mmap_vs_memory_train"] == pytest.approx(0.9)  # median of 1.0 and 0.8
    assert figures["mmap_vs_memory_train_spread"] == [0.8, 1.0]
    assert figures["train_tokens_per_s_mmap"] == 1000
