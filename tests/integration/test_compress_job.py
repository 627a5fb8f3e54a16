"""jobs/compress.py end to end, as a user runs it: a real (tiny) pretrain run directory in,
pruned + QAT + int8 artifacts and a report out; a rerun resumes instead of redoing.
(Refusing a rerun with other settings: tests/unit/test_compression_job.py.)"""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from orchestrator.compression.export import load_int8_model, load_onnx_model
from orchestrator.config import TrainConfig
from orchestrator.training.loop import train
from orchestrator.training.session import LocalSession

ROOT = Path(__file__).resolve().parents[2]


def compress(*args, timeout=900):
    # One thread: the tiny model gains nothing from two, and the machine is shared.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "jobs/compress.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_compress_job_end_to_end_and_resume(tmp_path):
    run = tmp_path / "run"
    train(TrainConfig(model_size="tiny", seq_len=32, batch_size=4, max_steps=4,
                      checkpoint_every=2, log_every=2, warmup_steps=1, precision="fp32"),
          LocalSession(run, device=torch.device("cpu")))
    out = tmp_path / "out"
    args = ["--checkpoint", str(run), "--out", str(out), "--prune-steps", "6",
            "--prune-every", "2", "--qat-steps", "4", "--batch-size", "4", "--log-every", "2",
            "--eval-tokens", "2048", "--latency-repeats", "3", "--threads", "1"]
    first = compress(*args)
    assert first.returncode == 0, first.stdout + first.stderr
    stdout = first.stdout
    assert "teacher: tiny GPT" in stdout and "checkpoint_00000004" in stdout  # newest
    assert "prune step     6/6" in stdout and "whole attention heads and MLP channels" in stdout
    assert "block parameters left" in stdout  # structured by default: the matrices shrank
    assert "qat step     4/4" in stdout
    assert "MODEL" in stdout and "PERPLEXITY" in stdout

    report = json.loads((out / "report.json").read_text())
    rows = {r["model"]: r for r in report["rows"]}
    assert {"original", "pruned", "int8", "int8-torch", "original-onnx",
            "int8-static"} <= set(rows)
    assert rows["pruned"]["sparsity"] >= 0.30 and rows["int8"]["sparsity"] >= 0.30
    assert rows["int8"]["size_bytes"] < rows["original"]["size_bytes"]
    for row in rows.values():
        assert row["latency_ms"] > 0 and row["size_bytes"] > 0
    for name in ("original", "pruned", "int8"):
        assert 1 < rows[name]["perplexity"] < 300
    assert report["summary"]["size_ratio"] > 1
    assert report["summary"]["sparsity"] >= 0.30
    assert set(report["summary"]["latency_ratio_vs_onnx_fp32_by_shape"]) == {
        "1x32", "16x32", "decode1@32", "decode16@32"}

    x = torch.randint(0, 256, (2, 32))
    onnx_logits, _ = load_onnx_model(out / "int8", threads=1)(x)
    with torch.no_grad():
        torch_logits, _ = load_int8_model(out / "int8")(x)
    assert onnx_logits.shape == torch_logits.shape == (2, 32, 256)

    # Rerun: every stage is found finished; only the report is measured again (a report-only
    # setting may change).
    second = compress(*args, "--no-onnx-baseline", "--no-int8-static")
    assert second.returncode == 0, second.stdout + second.stderr
    for stage in ("original", "pruned", "qat", "int8"):
        assert f"{stage}: already done" in second.stdout
    assert "prune step" not in second.stdout and "qat step" not in second.stdout
    assert json.loads((out / "report.json").read_text())["rows"][0]["model"] == "original"
