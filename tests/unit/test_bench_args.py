"""Benchmarks refuse flags that give no figure, naming the flag, before any work."""
import subprocess
import sys

import pytest


@pytest.mark.parametrize("script, args, message", [
    ("bench_train", ["--rounds", "0"], "--rounds must be >= 1, got 0"),
    ("bench_fsdp", ["--rounds", "0"], "--rounds must be >= 1, got 0"),
    ("bench_fsdp", ["--steps", "0"], "--steps must be >= 1, got 0"),
])
def test_no_rounds_is_refused_naming_the_flag(script, args, message):
    # It died at the end with "StatisticsError: no median for empty data".
    result = subprocess.run([sys.executable, "-m", f"scripts.{script}", *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr
