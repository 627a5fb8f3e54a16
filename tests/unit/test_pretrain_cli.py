"""Bad input to jobs/pretrain.py: one clear line naming the problem, non-zero exit, no traceback.
Each case fails before Ray starts, so these stay in the unit tier (run as real subprocesses)."""
import socket
import subprocess
import sys
from pathlib import Path

import pytest

PRETRAIN = Path(__file__).resolve().parents[2] / "jobs" / "pretrain.py"


def run_pretrain(*args, tmp_path, **extra_env):
    env = {"ORCHESTRATOR_RUNS_DIR": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
           **extra_env}
    return subprocess.run([sys.executable, str(PRETRAIN), *args], capture_output=True,
                          text=True, timeout=120, env=env)


def unused_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("args, expected", [
    (["--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
    (["--model-size", "huge"], "argument --model-size: invalid choice: 'huge'"),
    (["--num-workers", "0"], "num_workers must be an integer >= 1, got 0"),
    (["--max-steps", "-5"], "max_steps must be an integer >= 1, got -5"),
    (["--resume"], "--resume: no run with checkpoints under"),
    (["--resume", "--run-dir", "/nonexistent/run"], "no checkpoint in run dir /nonexistent/run"),
])
def test_bad_input_gets_one_clear_message(args, expected, tmp_path):
    result = run_pretrain(*args, tmp_path=tmp_path)
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_address_fails_fast_and_clearly(tmp_path):
    port = unused_port()
    result = run_pretrain("--address", f"127.0.0.1:{port}", tmp_path=tmp_path)
    assert result.returncode == 2
    assert f"cannot reach a Ray cluster at 127.0.0.1:{port} (--address)" in result.stderr
    assert "Traceback" not in result.stderr


def test_dashboard_url_in_ray_address_is_explained(tmp_path):
    result = run_pretrain(tmp_path=tmp_path, RAY_ADDRESS="http://127.0.0.1:8265")
    assert result.returncode == 2
    assert "RAY_ADDRESS 'http://127.0.0.1:8265' is a dashboard URL" in result.stderr
    assert "Traceback" not in result.stderr
