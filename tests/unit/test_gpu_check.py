"""scripts/gpu_check.py's bookkeeping, with the GPU faked: a lent machine's minutes are too
few to find there that a failed run stopped the check or that the budget was ignored."""
import argparse
import json

import pytest
import torch

from scripts import gpu_check


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(gpu_check, "measure_matmul_tflops", lambda: 791.0)
    monkeypatch.setattr(gpu_check, "probe_nvml", lambda: [])
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
    assert summary["compile_speedup"] == {"large-bf16": 1.3}
    assert summary["measured_matmul_bf16_tflops"] == 791.0


def test_runs_that_cannot_finish_in_the_budget_are_skipped_by_name(fake_gpu, capsys):
    # large (compiled) costs 55 s, fp16 large 10 s: a 30 s budget runs only the second.
    gpu_check.main(["--budget-s", "30", "--runs", "large:128:compiled", "large:16:fp16"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["skipped"] == ["bf16-large-compiled"]
    assert [row["run"] for row in summary["runs"]] == ["fp16-large"]


def test_a_bad_run_spec_is_refused_naming_it():
    with pytest.raises(argparse.ArgumentTypeError, match="bad run 'large:many'"):
        gpu_check.parse_run("large:many")
    with pytest.raises(argparse.ArgumentTypeError, match="bad run 'large:8:fast'"):
        gpu_check.parse_run("large:8:fast")
