"""Benchmarks' ratios between two sides: the median of the rounds' own ratios with its spread
(scripts.rounds.median_ratio), each side going first in turn (rotated). No Ray: the runs are
faked."""
import json
import os
import statistics

from scripts import bench_fsdp, bench_launch, bench_train


def launch_rows(bare_startup, launcher_startup):
    """bench_launch's rows: a warm-up round 0, then one run of each kind per round."""
    rows = []
    for round_, (bare, launcher) in enumerate(zip([99.0, *bare_startup],
                                                   [98.0, *launcher_startup])):
        for kind, startup in (("bare", bare), ("launcher", launcher)):
            rows.append({"round": round_, "kind": kind, "startup_s": startup,
                         "samples_per_s": 100.0 * startup, "in_report_s": 0.01,
                         "compute_samples_per_s": 1000.0 / startup})
    return rows


def test_the_launchers_startup_ratio_is_the_median_of_the_rounds_own():
    # Per round 3.0, 1.05, 31/30: the median 1.05. The ratio of the medians (30/20 = 1.5)
    # paired one round's launcher with another round's bare run.
    figures = bench_launch.comparison(launch_rows([10.0, 20.0, 30.0], [30.0, 21.0, 31.0]))
    assert figures["startup_ratio"] == 1.05
    assert figures["startup_ratio_spread"] == [round(31 / 30, 3), 3.0]
    assert figures["startup_overhead_s"] == 10.0  # median 30 - median 20
    assert (figures["bare_startup_s"], figures["launcher_startup_s"]) == (20.0, 30.0)
    # The warm-up counts nowhere but in its own key.
    assert figures["warmup_launcher_startup_s"] == 98.0
    # samples/s are 100 x start-up here: the same ratios, each round's kept.
    assert figures["steady_state_ratio"] == 1.05
    assert figures["steady_state_ratios"] == [3.0, 1.05, round(31 / 30, 3)]
    assert figures["compute_ratio"] == round(statistics.median([1 / 3, 20 / 21, 30 / 31]), 3)


def test_plain_and_ray_runs_go_first_in_turn_and_their_ratio_is_per_round(monkeypatch,
                                                                            tmp_path):
    order = []
    rates = {"plain": iter([100.0, 200.0, 300.0]), "ray": iter([90.0, 100.0, 285.0])}

    def fake_run(side):
        def run(flags, run_dir, cpus):
            order.append(side)
            rate = next(rates[side])
            return {"phase_tokens_per_s": rate, "steps_tokens_per_s": rate, "mfu": 0.1}
        return run

    monkeypatch.setattr(bench_train, "_plain_run", fake_run("plain"))
    monkeypatch.setattr(bench_train, "_ray_run", fake_run("ray"))
    figures = bench_train.plain_vs_ray(10, 3, tmp_path, cpus=1)
    assert order == ["plain", "ray", "ray", "plain", "plain", "ray"]
    assert figures["ray_vs_plain_rounds"] == [0.9, 0.5, 0.95]
    assert figures["ray_vs_plain_throughput"] == 0.9
    # The steps-only ratio too: its median and its spread (a median alone hid the rounds').
    assert figures["ray_vs_plain_steps_only"] == 0.9
    assert figures["ray_vs_plain_steps_only_spread"] == [0.5, 0.95]


def test_fsdp_and_ddp_go_first_in_turn_and_their_ratio_is_per_round(monkeypatch, tmp_path):
    order = []
    rates = {"ddp": iter([100.0, 200.0, 300.0]), "fsdp": iter([50.0, 300.0, 150.0])}

    def fake_workers(config, run_dir):
        from orchestrator.runs import append_metrics

        order.append(config.strategy)
        # The warm-up's report (left out), then the timed steps' (bench_fsdp reads both).
        append_metrics(run_dir, {"step": bench_fsdp.WARMUP_STEPS, "tokens_per_s": 1.0}, None)
        append_metrics(run_dir, {"step": config.max_steps,
                                 "tokens_per_s": next(rates[config.strategy])}, None)
        return {"metrics": {"step": config.max_steps}}

    monkeypatch.setattr(bench_fsdp, "train_on_local_workers", fake_workers)
    figures = bench_fsdp.throughput_rounds(3, 4, tmp_path)
    assert order == ["ddp", "fsdp", "fsdp", "ddp", "ddp", "fsdp"]
    assert figures["fsdp_vs_ddp_throughput"] == 0.5  # rounds 0.5, 1.5, 0.5
    assert figures["fsdp_vs_ddp_spread"] == [0.5, 1.5]
    assert figures["ddp_tokens_per_s"] == 200 and figures["fsdp_tokens_per_s"] == 150



def test_checkpoint_rounds_are_timed_after_a_warm_up_of_each_kind(monkeypatch, tmp_path):
    # The first save and load of each kind pay one-time costs (measured on 2 workers, tiny
    # model: sharded save 0.35 s in round 1, 0.10-0.14 s after; full 0.026 s, then ~0.011
    # s): untimed, or --rounds 1 gave cold figures, and a cold round was the median of 3.
    from orchestrator.training import checkpoint, loop

    saves = []
    full, sharded = checkpoint.save_checkpoint, loop._save_sharded_checkpoint
    monkeypatch.setattr(checkpoint, "save_checkpoint", lambda directory, state: (
        saves.append(("full", os.path.basename(directory))), full(directory, state))[1])
    monkeypatch.setattr(loop, "_save_sharded_checkpoint", lambda directory, *rest: (
        saves.append(("sharded", os.path.basename(directory))), sharded(directory, *rest))[1])
    # The worker is a process of its own in the bench: here its torch.set_num_threads(1) and
    # GLOO_SOCKET_IFNAME are put back after it (left, a later test of this process training
    # in-process against a subprocess, test_training_loop's resume, differed in its bits).
    import torch

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    threads = torch.get_num_threads()
    try:
        bench_fsdp._checkpoint_worker(0, 1, "tiny", 1, str(tmp_path),
                                      str(tmp_path / "rendezvous"))
    finally:
        torch.set_num_threads(threads)
    assert saves == [("full", "full-warmup"), ("sharded", "sharded-warmup"),
                     ("full", "full-0"), ("sharded", "sharded-0")]
    figures = json.loads((tmp_path / "figures.json").read_text())
    # One measured round: its own ratio, and a spread of that one.
    assert figures["sharded_vs_full_save_spread"][0] == figures["sharded_vs_full_save_spread"][1]
    assert figures["full_checkpoint_mb"] > 0 and figures["sharded_checkpoint_mb"] > 0


def test_fsdp_throughput_leaves_out_the_same_warm_up_steps_on_both_sides(monkeypatch, tmp_path):
    # FSDP's first steps on a CPU are slow (854 and 3,557 tok/s, then ~20k): the whole-run
    # figure (run_tokens_per_s) carried them. Each side now runs WARMUP_STEPS untimed steps
    # first, and its tokens/s is over the --steps after them alone, read off its reports.
    from orchestrator.runs import append_metrics

    configs = []

    def fake_workers(config, run_dir):
        configs.append(config)
        slow = 100.0 if config.strategy == "fsdp" else 1000.0  # the warm-up's tokens/s
        fast = 1000.0 if config.strategy == "fsdp" else 2000.0
        previous = 0
        for step in range(config.log_every, config.max_steps + 1, config.log_every):
            rate = slow if step <= bench_fsdp.WARMUP_STEPS else fast
            append_metrics(run_dir, {"step": step, "tokens_per_s": rate}, None)
            previous = step
        assert previous == config.max_steps
        return {"metrics": {"step": config.max_steps, "run_tokens_per_s": 1.0}}

    monkeypatch.setattr(bench_fsdp, "train_on_local_workers", fake_workers)
    figures = bench_fsdp.throughput_rounds(1, 4 * bench_fsdp.WARMUP_STEPS, tmp_path)
    assert [(c.strategy, c.max_steps) for c in configs] == [
        ("ddp", 5 * bench_fsdp.WARMUP_STEPS), ("fsdp", 5 * bench_fsdp.WARMUP_STEPS)]
    assert figures["ddp_tokens_per_s"] == 2000 and figures["fsdp_tokens_per_s"] == 1000
    assert figures["fsdp_vs_ddp_throughput"] == 0.5


def test_every_plain_run_trains_in_a_fresh_process_as_every_ray_run_does(monkeypatch,
                                                                          tmp_path):
    # Each Ray run's worker is a new process (jobs/pretrain.py starts and stops its Ray); the
    # plain runs trained in this one, the first cold and the rest warm (a process's first
    # train() is its slowest): round 0's plain run alone paid what every Ray run paid.
    in_this_process = []
    monkeypatch.setattr(bench_train, "train",
                        lambda *args: in_this_process.append(args) or {})
    flags = {"model_size": "tiny", "batch_size": 2, "seq_len": 16, "max_steps": 2,
             "checkpoint_every": 2, "log_every": 1, "warmup_steps": 1}
    figures = bench_train._plain_run(flags, tmp_path / "plain", 1)
    assert in_this_process == []
    assert figures["phase_tokens_per_s"] > 0 and figures["steps_tokens_per_s"] > 0
    assert (tmp_path / "plain" / "metrics.jsonl").is_file()
