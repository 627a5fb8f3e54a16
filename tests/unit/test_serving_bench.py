"""scripts/bench_serve.py's arithmetic (the load itself needs Ray: run the script)."""
import pytest
import torch

from scripts import bench_serve as bench


def test_summary_counts_only_successes_in_qps_and_latency():
    results = [bench.Result(0.0, 0.010 * (i + 1), 200) for i in range(100)]
    results.append(bench.Result(0.0, 5.0, 503, error="overloaded"))
    figures = bench.summarize("x", [bench.Run(results, 0.0, 10.0)])
    assert (figures["requests"], figures["ok"], figures["failed"]) == (101, 100, 1)
    assert figures["qps"] == 10.0
    # Interpolated between ranks (numpy's rule): p99 of 100 is not simply the slowest one
    assert figures["p50_ms"] == pytest.approx(505.0) and figures["p99_ms"] == pytest.approx(990.1)


def test_qps_counts_only_answers_inside_the_window_of_each_round():
    # A warm-up answer (before 2.0) and the clients' last answers (after 4.0) are not
    # credited to the 2 s window; a second round's window adds its answers and seconds.
    first = bench.Run([bench.Result(0.0, t, 200) for t in (1.0, 2.5, 3.0, 4.0, 4.5)],
                      2.0, 4.0)
    second = bench.Run([bench.Result(20.0, t, 200) for t in (20.5, 21.0, 21.5, 23.0)],
                       20.0, 22.0)
    figures = bench.summarize("x", [first, second])
    assert figures["ok"] == 9 and figures["qps"] == 6 / 4
    assert figures["p50_ms"] == pytest.approx(2000.0)  # of the 6 measured only


def test_batch_sizes_since_counts_only_new_batches():
    before = {"batch_sizes": {"1": 3, "32": 2}}
    after = {"batch_sizes": {"1": 3, "16": 1, "32": 5}}
    assert bench.batch_sizes_since(before, after) == {16: 1, 32: 3}


def test_switch_time_is_until_the_first_answer_of_the_new_version():
    results = [bench.Result(9.0, 10.5, 200, "old"), bench.Result(10.2, 10.9, 200, "new"),
               bench.Result(10.4, 11.3, 200, "new")]
    assert bench.switch_time(results, "new", applied_at=10.0) == pytest.approx(0.9)
    assert bench.switch_time(results[:1], "new", applied_at=10.0) is None


def test_fresh_checkpoints_are_two_different_servable_models(tmp_path):
    from orchestrator.serving.loading import load_model

    first, second = bench.fresh_checkpoints("tiny", 32, tmp_path)
    first, second = load_model(first), load_model(second)
    # Other weights: the versions (checkpoint name, hash of a file that holds the step too)
    # differed for two copies of one model as well.
    assert first.version != second.version
    assert not torch.equal(first.model.tok_emb.weight, second.model.tok_emb.weight)


def test_cpu_figures_name_the_replica_its_generation_thread_and_the_serving_path():
    import os

    from orchestrator.cpu_shares import ThreadShare

    threads = [ThreadShare(10, 11, "ray::ServeReplica:app:GPTModel.handle_request", "gen",
                           56.0, 41.0),
               ThreadShare(10, 12, "ray::ServeReplica:app:GPTModel", "io", 6.0, 2.0),
               ThreadShare(20, 20, "ray::ServeReplica:app:Ingress", "main", 42.0, 30.0),
               ThreadShare(30, 30, "ray::ProxyActor", "main", 27.0, 20.0),
               ThreadShare(os.getpid(), 1, "python -m scripts.bench_serve", "main", 4.0, 1.0)]
    assert bench.cpu_figures(threads, "static") == {
        "cpu_pct_replica_static": 62.0, "cpu_pct_ingress_static": 42.0,
        "cpu_pct_proxy_static": 27.0, "cpu_pct_load_generator_static": 4.0,
        "cpu_pct_all_static": 135.0, "generation_thread_cpu_pct_static": 56.0,
        "generation_thread_runqueue_wait_pct_static": 41.0}
    assert bench.cpu_figures([], "static") == {}  # no schedstat here: no figures
    # Continuous batching in its engine process: its stepping thread is the generation
    # thread, and the process's threads are counted apart from the replica's.
    engine = [ThreadShare(40, 40, "python -m orchestrator.serving.engine_host 9 cpu 1",
                          "engine-host", 80.0, 9.0),
              ThreadShare(40, 41, "python -m orchestrator.serving.engine_host 9 cpu 1",
                          "load-engine-0", 1.0, 0.0)]
    figures = bench.cpu_figures(threads + engine, "continuous")
    assert figures["cpu_pct_engine_process_continuous"] == 81.0
    assert figures["cpu_pct_replica_continuous"] == 62.0
    assert (figures["generation_thread_cpu_pct_continuous"],
            figures["generation_thread_runqueue_wait_pct_continuous"]) == (80.0, 9.0)
    # Static batching decodes on the replica's thread while the engine process idles.
    idle = [ThreadShare(40, 40, "python -m orchestrator.serving.engine_host 9 cpu 1",
                        "engine-host", 0.1, 0.0)]
    figures = bench.cpu_figures(threads + idle, "static")
    assert (figures["generation_thread_cpu_pct_static"],
            figures["generation_thread_runqueue_wait_pct_static"]) == (56.0, 41.0)
    assert figures["cpu_pct_engine_process_static"] == 0.1


def _rounds(*answers: int, seconds: float = 10.0) -> list:
    """One Run per round, each with `answers` successes inside a `seconds` window."""
    return [bench.Run([bench.Result(0.0, 1.0, 200)] * n, 0.0, seconds) for n in answers]


def test_ratios_between_settings_are_medians_of_the_rounds_own_ratios_with_their_spread():
    # Continuous 70 then 40 QPS, unbatched 7 then 8: the rounds' ratios are 10 and 5, their
    # median 7.5. QPS pooled over both rounds gave 55 / 7.5 = 7.33, which no round measured.
    runs = {"continuous": _rounds(700, 400), "static": _rounds(350, 100),
            "unbatched": _rounds(70, 80)}
    qps = {mode: [run.qps for run in rounds] for mode, rounds in runs.items()}
    assert qps == {"continuous": [70.0, 40.0], "static": [35.0, 10.0], "unbatched": [7.0, 8.0]}
    figures = bench.round_ratios(qps, bench.SERVED_RATIOS)
    assert figures["batching_speedup"] == 7.5
    assert figures["batching_speedup_spread"] == [5.0, 10.0]
    assert figures["continuous_vs_static_qps"] == 3.0  # rounds 2 and 4
    assert figures["continuous_vs_static_qps_spread"] == [2.0, 4.0]
    assert figures["static_batching_speedup"] == 3.12  # rounds 5 and 1.25: median 3.125
    assert figures["static_batching_speedup_spread"] == [1.25, 5.0]
    assert bench.summarize("x", runs["continuous"])["qps"] == 55.0  # each mode's own QPS


def test_model_alone_ratios_are_medians_of_the_rounds_own_ratios():
    qps = {"continuous": [20.0, 30.0], "continuous_matmul": [10.0, 30.0],
           "static": [10.0, 10.0], "unbatched": [4.0, 2.0]}
    figures = bench.round_ratios(qps, bench.ALONE_RATIOS)
    assert figures["model_alone_batching_speedup"] == 10.0  # rounds 5 and 15
    assert figures["model_alone_batching_speedup_spread"] == [5.0, 15.0]
    assert figures["model_alone_decode_kernel_speedup"] == 1.5  # rounds 2 and 1
    assert figures["model_alone_continuous_vs_static_qps"] == 2.5


def test_a_round_that_answered_nothing_gives_no_ratio():
    figures = bench.round_ratios({"continuous": [50.0, 40.0], "static": [20.0, 0.0],
                                  "unbatched": [5.0, 4.0]}, bench.SERVED_RATIOS)
    assert figures["continuous_vs_static_qps"] is None
    assert figures["continuous_vs_static_qps_spread"] is None
    assert figures["batching_speedup"] == 10.0


def stop_at_model_alone(monkeypatch) -> list:
    """The benchmark stops (RuntimeError "stop") as its model-alone phase starts, before any
    Ray; the list returned gets the checkpoint that phase was handed."""
    handed = []

    def stop(checkpoint, *_):
        handed.append(checkpoint)
        raise RuntimeError("stop")

    monkeypatch.setattr(bench, "model_alone", stop)
    return handed


def test_the_fresh_checkpoints_folder_is_removed_when_the_benchmark_ends(tmp_path,
                                                                          monkeypatch):
    # Two small GPTs in a bench-serve-* folder were left behind by every run (here it stops
    # in the model-alone phase, before any Ray: the folder goes whatever the way out).
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    written = stop_at_model_alone(monkeypatch)
    with pytest.raises(RuntimeError, match="stop"):
        bench.main(["--model-size", "tiny", "--context", "328"])
    assert written and written[0].startswith(str(tmp_path))  # it did write them there
    assert list(tmp_path.iterdir()) == []



@pytest.mark.parametrize("batch", ["1", "2", "3"])
def test_a_batch_cap_the_app_refuses_is_refused_before_any_work(batch, capsys):
    # --max-batch-size 2 was accepted; after the model-alone phases (minutes) and Ray's
    # start, the first deploy failed with a traceback: "min_batch_size (4) must be <=
    # max_batch_size (2)", a setting the user never gave, and no figure was printed.
    with pytest.raises(SystemExit) as exit_:
        bench.parse_args(["--max-batch-size", batch])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert f"the serving app of --max-batch-size {batch}," in err and "min_batch_size" in err


def test_every_setting_the_phases_deploy_is_checked_with_the_flags():
    args = bench.parse_args(["--max-batch-size", "8", "--max-concurrent-batches", "2"])
    for batching in bench.batching_settings(args).values():
        bench.app_config(8000, "/ckpt", "/ckpt", 1, batching, args)  # no ConfigError


@pytest.mark.parametrize("args, message", [
    # 0 read as "not given": the app's default ran, and the JSON did not say which.
    (["--max-concurrent-batches", "0"], "--max-concurrent-batches must be >= 1, got 0"),
    # (a ConfigError traceback once the model-alone phases and Ray had run)
    (["--max-concurrent-batches", "-1"], "--max-concurrent-batches must be >= 1, got -1"),
])
def test_serving_flags_the_app_refuses_are_refused_before_any_work(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.parse_args(args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_the_json_says_how_many_batches_a_replica_ran_at_once():
    assert bench.run_settings(bench.parse_args([]))["max_concurrent_batches"] == 1
    assert bench.run_settings(bench.parse_args(["--max-concurrent-batches", "3"]))[
        "max_concurrent_batches"] == 3


def test_the_model_alones_batching_gain_is_the_median_of_alternating_rounds(monkeypatch):
    # Each side was timed once, the batch of 1 always first: one 13 ms call of a shared
    # machine set the gain (3.95x, 4.85x, 5.76x in three runs on the same machine).
    import types

    from orchestrator.serving import generation, loading

    calls, clock = [], [0.0]
    # warm-up, then 5 rounds (the batch of 1: each of the 4 rows alone, each call this long)
    seconds = {1: iter([t for t in (1.0, 1.0, 2.0, 1.0, 4.0, 1.0) for _ in range(4)]),
               4: iter([1.0, 2.0, 2.0, 2.0, 2.0, 2.0])}

    def fake_generate(model, requests, block_size):
        calls.append(len(requests))
        clock[0] += next(seconds[len(requests)])

    monkeypatch.setattr(loading, "load_model", lambda path: types.SimpleNamespace(
        model=None, block_size=64))
    monkeypatch.setattr(generation, "generate", fake_generate)
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    import scripts.rounds
    monkeypatch.setattr(scripts.rounds.time, "perf_counter", lambda: clock[0])
    figures, gain = bench.model_alone("/ckpt", 4, 10, rounds=5)
    alone, batched = [1, 1, 1, 1], [4]
    assert calls == (alone + batched + alone + batched + batched + alone + alone + batched
                     + batched + alone + alone + batched)  # each side first in turn
    # Per round 4 x t1 / t4: 2, 4, 2, 8, 2: the median 2 (a ratio of medians: 2 too, but
    # one side's slow round paired with the other's fast one).
    assert gain == {"ratio": 2.0, "spread": [2.0, 8.0]}
    assert figures[1]["tokens_per_s"] == 10 and figures[4]["tokens_per_s"] == 20


def test_the_model_alones_mixed_modes_each_get_the_same_requests(monkeypatch):
    # One generator was shared by every mode and round: each mode drew the requests after
    # the previous mode's, so the modes compared were given different prompts and lengths.
    import types

    from orchestrator.serving import engine as engine_module
    from orchestrator.serving import generation, loading

    clock = [0.0]
    drawn: list[tuple[str, tuple]] = []  # (mode, request) in the order each mode drew them

    def shape(request) -> tuple:
        return request.prompt, request.params.max_tokens

    def fake_generate(model, requests, block_size):
        drawn.extend(("static" if len(requests) > 1 else "unbatched", shape(r))
                     for r in requests)
        clock[0] += 1.0

    class FakeEngine:
        def __init__(self, *args, **kwargs):
            self.cache = types.SimpleNamespace(use_decode_kernel=True)
            self.rows: list = []

        def add(self, key, request):
            mode = "continuous" if self.cache.use_decode_kernel else "continuous_matmul"
            drawn.append((mode, shape(request)))
            self.rows.append(key)

        def step(self):  # every row finishes at each step
            clock[0] += 1.0
            finished, self.rows = self.rows, []
            return [(key, types.SimpleNamespace(finish_reason="length")) for key in finished]

    tokenizer = types.SimpleNamespace(encode=lambda text: list(text.encode()))
    monkeypatch.setattr(loading, "load_model", lambda path: types.SimpleNamespace(
        model=None, block_size=256, tokenizer=tokenizer))
    monkeypatch.setattr(generation, "generate", fake_generate)
    monkeypatch.setattr(engine_module, "ContinuousEngine", FakeEngine)
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    bench.model_alone_mixed("/ckpt", rows=2, seconds=3.0, rounds=2)
    runs: list[tuple[str, list]] = []  # each mode's run, in the order they ran
    for mode, request in drawn:
        if not runs or runs[-1][0] != mode:
            runs.append((mode, []))
        runs[-1][1].append(request)
    assert len(runs) == 8  # 4 modes x 2 rounds
    shortest = min(len(requests) for _, requests in runs)
    assert shortest >= 2
    assert all(requests[:shortest] == runs[0][1][:shortest] for _, requests in runs)


@pytest.mark.parametrize("flag", ["--checkpoint", "--reload-checkpoint"])
def test_a_checkpoint_that_is_not_there_is_refused_naming_the_flag(flag, tmp_path, capsys):
    # Accepted; after the fresh models were written, the model-alone phase's load raised
    # CheckpointError as a traceback ("checkpoint ... does not exist"), naming no flag.
    with pytest.raises(SystemExit) as exit_:
        bench.parse_args([flag, str(tmp_path / "no-run")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert f"{flag} {tmp_path / 'no-run'}: checkpoint" in err and "does not exist" in err


@pytest.mark.parametrize("args, message", [
    # A ConfigError traceback from the fresh models' TrainConfig, naming seq_len.
    (["--context", "100000"], "--context 100000: "),
    # (accepted, and handed to Serve's HTTP options after the model-alone phases)
    (["--port", "70000"], "--port must be a TCP port in [0, 65535] (0: a free one), got 70000"),
    (["--port", "-1"], "--port must be a TCP port in [0, 65535] (0: a free one), got -1"),
])
def test_a_fresh_models_context_or_a_port_out_of_range_is_refused_naming_it(args, message,
                                                                          capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.parse_args(args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    # Accepted; the model-alone phase's first long mixed request raised CapacityError as a
    # traceback ("maximum context length is 128 tokens, however you requested 227").
    (["--context", "128"], "--context must be >= 328 (the mixed load's longest prompt, 200 "
                           "tokens, and max_tokens 128), got 128"),
    (["--max-tokens", "500"], "--context must be >= 540 (the equal load's longest prompt, 40 "
                              "tokens, and --max-tokens 500), got 512"),
])
def test_a_fresh_model_too_short_for_the_loads_is_refused_naming_the_flag(args, message,
                                                                         capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.parse_args(args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    bench.parse_args(["--context", "328"])  # the mixed load's longest request fits


def test_the_model_alones_batch_of_1_runs_the_batchs_own_prompts(monkeypatch):
    # The batch of 1 was the shortest prompt (8 bytes) against rows of 8-40 bytes: a longer
    # prefill on the batched side alone. Now each of the batch's prompts runs alone in turn,
    # and the gain is the same tokens' time alone over batched.
    import types

    from orchestrator.serving import generation, loading

    clock, lengths = [0.0], {"alone": [], "batched": []}

    def fake_generate(model, requests, block_size):
        side = "alone" if len(requests) == 1 else "batched"
        lengths[side].append(sorted(len(r.prompt) for r in requests))
        clock[0] += 1.0 if side == "alone" else 2.0

    monkeypatch.setattr(loading, "load_model", lambda path: types.SimpleNamespace(
        model=None, block_size=64))
    monkeypatch.setattr(generation, "generate", fake_generate)
    import scripts.rounds
    monkeypatch.setattr(scripts.rounds.time, "perf_counter", lambda: clock[0])
    figures, gain = bench.model_alone("/ckpt", 4, 10, rounds=1)
    batched = lengths["batched"][0]
    assert len(set(batched)) > 1
    assert sorted(n for one in lengths["alone"][:4] for n in one) == batched
    # 4 rows alone: 4 s; batched: 2 s, for the same 40 tokens.
    assert gain["ratio"] == 2.0
    assert figures[1]["tokens_per_s"] == 10 and figures[4]["tokens_per_s"] == 20


@pytest.mark.parametrize("flag", ["--checkpoint", "--reload-checkpoint"])
def test_a_users_checkpoint_too_short_for_the_loads_is_refused_naming_the_flag(flag, tmp_path,
                                                                              capsys):
    # Accepted; the model-alone phase's first long mixed request raised CapacityError as a
    # traceback ("maximum context length is 64 tokens, however you requested 227 tokens").
    from orchestrator.serving.loading import save_untrained_checkpoint

    short = save_untrained_checkpoint(tmp_path / "short", "tiny", seq_len=64)
    with pytest.raises(SystemExit) as exit_:
        bench.parse_args([flag, str(short)])
    assert exit_.value.code == 2
    assert (f"{flag} {short}: its context, 64 tokens, must be >= 328 (the mixed load's longest "
            "prompt, 200 tokens, and max_tokens 128)") in capsys.readouterr().err
    long_enough = save_untrained_checkpoint(tmp_path / "long", "tiny", seq_len=328)
    bench.parse_args([flag, str(long_enough)])


def test_a_users_checkpoints_context_is_read_without_loading_its_model(tmp_path, monkeypatch):
    # The context check loaded the whole model (weights read, GPT built) a first time, only
    # to read its block size; the model-alone phase then loaded it again.
    from orchestrator.serving import loading

    short = loading.save_untrained_checkpoint(tmp_path / "short", "tiny", seq_len=64)
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(SystemExit):
        bench.parse_args(["--checkpoint", str(short)])  # (too short: refused, unloaded)
    bench.parse_args(["--checkpoint", str(loading.save_untrained_checkpoint(
        tmp_path / "long", "tiny", seq_len=328))])


def test_no_fresh_model_is_made_where_both_checkpoints_are_given(tmp_path, monkeypatch):
    # Two fresh GPTs were written whatever was given: with both checkpoints named, their
    # --context (checked only where a fresh model is made) reached TrainConfig unchecked, a
    # ConfigError traceback ("seq_len must be <= 8192"), and otherwise the writing was wasted.
    from orchestrator.serving.loading import save_untrained_checkpoint

    model = str(save_untrained_checkpoint(tmp_path / "mine", "tiny", seq_len=400))
    monkeypatch.setattr(bench, "fresh_checkpoints", lambda *a: pytest.fail("fresh models"))
    served = stop_at_model_alone(monkeypatch)
    with pytest.raises(RuntimeError, match="stop"):
        bench.main(["--checkpoint", model, "--reload-checkpoint", model, "--context", "100000"])
    assert served == [model]
