"""scripts/gpu_check.py's bookkeeping, with the GPU faked: a lent machine's minutes are too
few to find there that a failed run stopped the check or that the budget was ignored."""
import argparse
import json
import re

import pytest
import torch
from torch.nn.attention import SDPBackend

from orchestrator.config import TrainConfig
from orchestrator.training.loop import train
from scripts import gpu_check


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(gpu_check, "measure_matmul_tflops", lambda: 791.0)
    monkeypatch.setattr(gpu_check, "probe_nvml", list)
    monkeypatch.setattr(gpu_check, "resolve_precision", lambda *a: "bf16")
    calls = []

    def train_once(run, steps, batch):
        calls.append((run.name, batch))
        if run.preset == "gpt2-medium" and batch == run.batch:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        if run.preset == "gpt2-large":
            raise RuntimeError("inductor failed")
        return {"mfu": 0.4, "tokens_per_s": 1300.0 if run.compile else 1000.0}

    monkeypatch.setattr(gpu_check, "train_once", train_once)
    return calls


def test_a_failed_run_is_recorded_and_the_check_goes_on(fake_gpu, tmp_path, capsys):
    out = tmp_path / "check.json"
    runs = ["gpt2-medium:64", "gpt2-large:32:compiled", "large:128", "large:128:compiled"]
    assert gpu_check.main(["--budget-s", "1000", "--out", str(out), "--runs", *runs]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == summary
    rows = {row["run"]: row for row in summary["runs"]}
    # Out of memory: retried once at half the batch, which fits.
    assert fake_gpu[:2] == [("bf16-gpt2-medium", 64), ("bf16-gpt2-medium", 32)]
    assert rows["bf16-gpt2-medium"]["batch"] == 32 and "error" not in rows["bf16-gpt2-medium"]
    assert rows["bf16-gpt2-large-compiled"]["error"] == "RuntimeError: inductor failed"
    assert rows["bf16-large-compiled"]["mfu_vs_measured_peak"] == round(0.4 * 989 / 791, 4)
    assert summary["compile_speedup"] == {"large-bf16-vocab256-128": 1.3}
    assert summary["measured_matmul_bf16_tflops"] == 791.0


def test_runs_that_cannot_finish_in_the_budget_are_skipped_by_name(fake_gpu, capsys):
    # large compiled costs 55 s, fp16 large 10 s, bf16 large 30 s: a 15 s budget runs only
    # the fp16 one; at 40 steps (twice the cost) none.
    gpu_check.main(["--budget-s", "15", "--runs", "large:128:compiled", "large:16:fp16",
                    "large:128"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["skipped"] == ["bf16-large-compiled", "bf16-large"]
    assert [row["run"] for row in summary["runs"]] == ["fp16-large"]
    gpu_check.main(["--budget-s", "15", "--steps", "40", "--runs", "large:16:fp16"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["runs"] == []


def test_speedups_compare_runs_at_the_same_batch_only(fake_gpu, capsys):
    gpu_check.main(["--budget-s", "1000", "--runs", "large:128:compiled", "large:32"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["compile_speedup"] == {}


def test_out_of_memory_at_batch_one_is_not_retried_at_zero(fake_gpu, capsys):
    gpu_check.main(["--budget-s", "1000", "--runs", "gpt2-medium:1"])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["runs"][0]
    assert fake_gpu == [("bf16-gpt2-medium", 1)]
    assert row["error"].startswith("out of memory at batch 1")


@pytest.mark.parametrize("spec, problem", [
    ("large:many", "the batch must be a whole number >= 1"),
    ("large:0", "the batch must be a whole number >= 1"),
    ("large", "the batch must be a whole number >= 1"),
    ("huge:8", "unknown preset 'huge'"),
    ("large:8:fast", "unknown flags ['fast']"),
    ("large:8:vocab=big", "vocab= must be given once, as a whole number >= 2"),
    ("large:8:vocab=1", "vocab= must be given once, as a whole number >= 2"),
    ("large:8:vocab=300:vocab=400", "vocab= must be given once"),
    ("large:8:autotune", "autotune tunes what inductor compiles: add compiled"),
])
def test_a_bad_run_spec_is_refused_naming_it(spec, problem):
    expected = re.escape(f"bad run {spec!r}: {problem}")
    with pytest.raises(argparse.ArgumentTypeError, match=expected):
        gpu_check.parse_run(spec)


def test_a_run_spec_sets_the_vocabulary_and_takes_the_nearest_known_cost():
    run = gpu_check.parse_run("large:64:compiled:vocab=50000")
    assert (run.preset, run.batch, run.compile, run.vocab) == ("large", 64, True, 50000)
    assert run.name == "bf16-large-compiled-vocab50000"
    nearest = min((r for r in gpu_check.RUNS if r.preset == "large" and r.compile),
                  key=lambda r: abs(r.vocab - 50000))
    assert run.cost_s == nearest.cost_s
    assert gpu_check.parse_run("large:64").vocab == gpu_check.BYTE_VOCAB


def test_speedups_compare_runs_of_the_same_vocabulary_only(fake_gpu, capsys):
    gpu_check.main(["--budget-s", "1000", "--runs", "large:32:compiled:vocab=50257",
                    "large:32", "large:32:vocab=50257"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["compile_speedup"] == {"large-bf16-vocab50257-32": 1.3}


def test_kernels_are_sorted_into_kinds_by_name():
    kinds = {name: gpu_check.kernel_kind(name) for name in (
        "pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>",
        "fmha_cutlassB_bf16_aligned_64x64_k64_sm80",
        "cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x64_4x1x1_kernel0_0",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1",
        "nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTT",
        "triton_red_fused__log_softmax_backward_data_nll_loss_backward_3",
        "triton_poi_fused__to_copy_arange_div_eq_exp_logsumexp_lt_mul_sub_unsqueeze_view_"
        "where_0",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>",
        "triton_poi_fused_add_gelu_native_layer_norm_7",
        "triton_poi_fused__to_copy_add_native_layer_norm_3",
        "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, c10::BFloat16, float, "
        "c10::BFloat16, at::native::(anonymous namespace)::LogSoftMaxForwardEpilogue>",
        "Memcpy HtoD (Pinned -> Device)",
        "void at::native::direct_copy_kernel_cuda(at::TensorIteratorBase &)",
        "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>")}
    assert list(kinds.values()) == ["attention", "attention", "attention", "matmul", "matmul",
                                    "loss", "loss", "optimizer", "fused (inductor)", "fused (inductor)",
                                    "loss", "copies", "copies", "other"]


def test_the_breakdown_gives_each_kinds_share_of_the_gpu_time():
    breakdown = gpu_check.kernel_breakdown(
        {"sm90_xmma_gemm_a": 600.0, "nvjet_b": 100.0, "flash_fwd_kernel": 200.0,
         "triton_poi_fused_add_0": 100.0}, top=2)
    assert breakdown["device_time_shares"] == {"matmul": 0.7, "attention": 0.2,
                                               "fused (inductor)": 0.1}
    assert breakdown["top_kernels"] == [["sm90_xmma_gemm_a", 0.6], ["flash_fwd_kernel", 0.2]]
    # Each kind's largest, so a kind the top list leaves out is still named.
    assert breakdown["top_kernels_by_kind"] == {
        "attention": [["flash_fwd_kernel", 0.2]],
        "fused (inductor)": [["triton_poi_fused_add_0", 0.1]],
        "matmul": [["sm90_xmma_gemm_a", 0.6], ["nvjet_b", 0.1]]}
    assert breakdown["device_time_s"] == 0.001
    assert "profile_error" in gpu_check.kernel_breakdown({})


def test_kernel_times_keep_the_kernels_that_took_gpu_time():
    class Event:
        def __init__(self, key, us):
            self.key, self.self_device_time_total = key, us

    class Profiler:
        def key_averages(self):
            return [Event("cudaLaunchKernel", 0.0), Event("sm90_xmma_gemm", 120.0)]

    assert gpu_check.kernel_times(Profiler()) == {"sm90_xmma_gemm": 120.0}


def test_a_cudnn_run_puts_cudnn_attention_first_and_restores_the_order():
    default = torch._C._get_sdp_priority_order()
    with gpu_check.attention_backends(gpu_check.parse_run("large:8:cudnn")):
        assert torch._C._get_sdp_priority_order()[0] == int(SDPBackend.CUDNN_ATTENTION)
    assert torch._C._get_sdp_priority_order() == default
    with gpu_check.attention_backends(gpu_check.parse_run("large:8")):
        assert torch._C._get_sdp_priority_order() == default


def test_the_profiler_starts_at_the_first_report_past_the_compiling_steps(tmp_path):
    """On CPU (the profiler's CPU activity standing in for CUDA kernels): 4 steps reported
    every 2 record the optimizer steps of steps 3 and 4 only."""
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    session = gpu_check.ProfilingSession(str(tmp_path), profiler, device=torch.device("cpu"))
    config = TrainConfig(model_size="tiny", seq_len=16, batch_size=2, max_steps=4, log_every=2,
                         checkpoint_every=40, warmup_steps=1, compile=False, eval_batches=1)
    try:
        train(config, session)
    finally:
        session.stop_profiling()
    steps = [e for e in profiler.key_averages() if e.key.startswith("Optimizer.step#AdamW")]
    assert [e.count for e in steps] == [2]


def test_cudnn_and_profile_runs_are_named_and_kept_out_of_the_compile_speedups(fake_gpu,
                                                                               capsys):
    run = gpu_check.parse_run("large:32:compiled:cudnn:profile")
    assert (run.cudnn, run.profile, run.name) == (True, True,
                                                  "bf16-large-compiled-cudnn-profiled")
    gpu_check.main(["--budget-s", "1000", "--runs", "large:32:compiled:cudnn", "large:32"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["runs"][0]["cudnn"] and summary["compile_speedup"] == {}


def test_too_few_steps_are_refused(capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--steps", "1"])
    assert "--steps must be >= 2" in capsys.readouterr().err


def test_foreach_and_autotune_runs_change_only_their_own_run():
    import torch._inductor.config as inductor

    from orchestrator.training import optim

    from types import SimpleNamespace

    fused_rule, tuned = optim.uses_fused_adamw, inductor.max_autotune
    on_gpu = [SimpleNamespace(is_cuda=True, is_floating_point=lambda: True)]  # as a GPU's
    assert fused_rule(on_gpu)
    run = gpu_check.parse_run("large:8:compiled:foreach:autotune")
    assert run.name == "bf16-large-compiled-foreach-autotune" and run.variant
    with gpu_check.run_options(run):
        assert not optim.uses_fused_adamw(on_gpu)
        assert inductor.max_autotune and inductor.coordinate_descent_tuning
    assert optim.uses_fused_adamw is fused_rule and inductor.max_autotune == tuned
    with gpu_check.run_options(gpu_check.parse_run("large:8:compiled")):
        assert optim.uses_fused_adamw is fused_rule and inductor.max_autotune == tuned
    # An autotune run's cost: the plain run's plus the allowance for tuning.
    plain = gpu_check.parse_run("large:8:compiled")
    assert run.cost_s == plain.cost_s + gpu_check.AUTOTUNE_EXTRA_S


def test_variant_runs_stay_out_of_the_compile_speedups(fake_gpu, capsys):
    gpu_check.main(["--budget-s", "2000", "--runs", "large:32:compiled:foreach",
                    "large:32:compiled:autotune", "large:32"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [row["variant"] for row in summary["runs"]] == [True, True, False]
    assert summary["compile_speedup"] == {}


# -- found by a review before the next lent GPU (2026-12-05) -----------------------------------

def test_the_budget_counts_from_the_process_start_and_a_retry_must_fit_it(fake_gpu, capsys,
                                                                          monkeypatch):
    # The shell's `timeout` counts from the start, the budget counted from after the imports;
    # an out-of-memory retry at half the batch was never weighed against it.
    import time
    from types import SimpleNamespace

    gpu_check.main(["--budget-s", "100", "--runs", "large:128:compiled"],
                   started=time.monotonic() - 90)
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["skipped"] == [
        "bf16-large-compiled"]
    clock = [1000.0]  # the first attempt takes 60 s of a 95 s budget, then runs out of memory
    monkeypatch.setattr(gpu_check, "time", SimpleNamespace(monotonic=lambda: clock[0],
                                                           perf_counter=time.perf_counter))
    failing = gpu_check.train_once

    def slow_failure(run, steps, batch):
        clock[0] += 60
        return failing(run, steps, batch)

    monkeypatch.setattr(gpu_check, "train_once", slow_failure)
    gpu_check.main(["--budget-s", "95", "--runs", "gpt2-medium:64"], started=clock[0])
    row = json.loads(capsys.readouterr().out.splitlines()[-1])["runs"][0]
    assert fake_gpu == [("bf16-gpt2-medium", 64)]  # costs 40 s: no retry at 32, it would overrun
    assert row["error"].endswith("no time left to retry at half the batch")
    # The retry's cost scales with --steps as a run's does (it was weighed at 20 steps)
    fake_gpu.clear()
    gpu_check.main(["--budget-s", "150", "--steps", "60", "--runs", "gpt2-medium:64"],
                   started=clock[0])  # costs 120 s at 60 steps; 90 s left after the first
    assert fake_gpu == [("bf16-gpt2-medium", 64)]


def test_a_sigterm_still_prints_the_summary_and_an_nvml_error_stops_nothing(
        fake_gpu, monkeypatch, capsys, tmp_path):
    import os
    import signal

    def nvml_fails():
        raise RuntimeError("NVML: driver/library version mismatch")

    def killed_by_timeout(run, steps, batch):
        fake_gpu.append((run.name, batch))
        if len(fake_gpu) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return {"mfu": 0.4, "tokens_per_s": 1000.0}

    monkeypatch.setattr(gpu_check, "probe_nvml", nvml_fails)
    monkeypatch.setattr(gpu_check, "train_once", killed_by_timeout)
    out = tmp_path / "check.json"
    assert gpu_check.main(["--budget-s", "1000", "--out", str(out), "--runs", "large:16",
                           "large:32", "large:64"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["nvml"] == [{"error": "RuntimeError: NVML: driver/library version mismatch"}]
    assert [r["batch"] for r in summary["runs"]] == [16]
    assert summary["terminated"].startswith("SIGTERM (the shell's timeout) during bf16-large:")
    assert json.loads(out.read_text()) == summary
    assert signal.getsignal(signal.SIGTERM) is not gpu_check._terminated


@pytest.mark.parametrize("steps", [20, 21, 5])
def test_the_figures_kept_time_the_last_half_of_the_steps(tmp_path, steps):
    # With log_every = steps // 2, 21 steps reported at 10, 20 and 21: the last report, the
    # one kept, timed one step.
    from orchestrator.training.session import LocalSession

    session = LocalSession(tmp_path, device=torch.device("cpu"))
    train(TrainConfig(model_size="tiny", seq_len=16, batch_size=2, max_steps=steps,
                      log_every=gpu_check.last_half(steps), checkpoint_every=10 * steps,
                      warmup_steps=1, eval_batches=1), session)
    assert session.reports[-1]["loss_steps"] >= steps // 2


# scripts/gpu_check.sh with `timeout`, `python3` and `nvidia-smi` stubbed on PATH: the stub
# `timeout` logs its arguments, "runs" the test tier by sleeping TIER_S and gpu_check.py by
# saving a summary and exiting with CHECK_RC (137: killed past SIGTERM's grace).
TIMEOUT_STUB = """#!/usr/bin/env bash
echo "$@" >> "$STUB_LOG"
case "$*" in
  *"-m pytest"*) sleep "$TIER_S"; exit 0 ;;
  *"-m scripts.gpu_check"*)
    while [ "$1" != --out ]; do shift; done
    echo '{"runs": [{"run": "bf16-large"}]}' > "$2"
    [ "$CHECK_RC" = 0 ] && echo '{"runs": [{"run": "bf16-large"}], "final": true}'
    exit "$CHECK_RC" ;;
esac
"""


def run_gpu_check_sh(tmp_path, total_s: int, tier_s: float = 0, check_rc: int = 0):
    import os
    import subprocess
    import sys
    from pathlib import Path

    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, text in (("timeout", TIMEOUT_STUB), ("nvidia-smi", "#!/bin/sh\n"),
                       ("python3", f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    log = tmp_path / "timeout.log"
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "STUB_LOG": str(log),
           "TIER_S": str(tier_s), "CHECK_RC": str(check_rc), "RESULTS_DIR": str(tmp_path),
           "GPU_CHECK_TOTAL_S": str(total_s)}
    script = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.sh"
    done = subprocess.run(["bash", str(script), "--budget-s", "380"], env=env,
                          capture_output=True, text=True, timeout=60)
    return done, [line.split() for line in log.read_text().splitlines()]


def seconds_and_grace(timeout_args: list[str]) -> tuple[int, int]:
    """(limit, kill grace) of a `timeout [-k GRACE] LIMIT ...` call."""
    if timeout_args[0] == "-k":
        return int(timeout_args[2]), int(timeout_args[1])
    return int(timeout_args[0]), 0


def test_the_shell_check_ends_inside_its_total_even_after_a_slow_test_tier(tmp_path):
    # The tier's 150 s and the check's fixed 420 s came to 570 s, over the planned 560 s
    # call: the call's limit killed the check before its final JSON line.
    done, calls = run_gpu_check_sh(tmp_path, total_s=20, tier_s=1)
    tier, check = calls
    assert "pytest" in tier and "scripts.gpu_check" in check, calls
    limit, grace = seconds_and_grace(check)
    assert grace > 0  # a check that ignores SIGTERM is still ended
    assert 1 <= limit and 1 + limit + grace <= 20
    assert json.loads(done.stdout.splitlines()[-1])["final"] is True


def test_the_shell_check_gets_a_positive_limit_when_no_time_is_left(tmp_path):
    _, calls = run_gpu_check_sh(tmp_path, total_s=5)
    assert seconds_and_grace(calls[-1])[0] == 1  # (`timeout 0` would mean no limit at all)


def test_a_check_killed_past_its_grace_still_ends_with_the_saved_figures(tmp_path):
    done, _ = run_gpu_check_sh(tmp_path, total_s=540, check_rc=137)
    last = json.loads(done.stdout.splitlines()[-1])
    assert last == {"runs": [{"run": "bf16-large"}], "killed": True}


@pytest.mark.parametrize("where", ["missing-dir/check.json", "."])
def test_an_out_file_that_cannot_be_written_is_refused_before_any_work(fake_gpu, tmp_path,
                                                                       capsys, where):
    # Accepted, then the first save (after the matmul peak's measurement) raised
    # FileNotFoundError / IsADirectoryError: a traceback, and no JSON line at all.
    out = tmp_path / where
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(["--out", str(out), "--runs", "large:128"])
    assert exit_.value.code == 2
    assert f"--out {out}" in capsys.readouterr().err
    assert fake_gpu == []  # nothing ran


def test_an_out_with_a_home_the_shell_left_unexpanded_is_read_as_home(fake_gpu, tmp_path,
                                                                    monkeypatch, capsys):
    # `--out=~/x.json` was refused as "~ is not a directory" before any work.
    monkeypatch.setenv("HOME", str(tmp_path))
    assert gpu_check.main(["--budget-s", "1000", "--out=~/x.json", "--runs", "large:128"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert json.loads((tmp_path / "x.json").read_text()) == summary
