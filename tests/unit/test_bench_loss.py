"""scripts/bench_loss.py: both losses timed on the same logits, its last line the JSON the
docs quote, bad sizes refused."""
import json

import pytest

from scripts import bench_loss


def test_the_last_line_holds_the_speedup_of_each_case(capsys):
    assert bench_loss.main(["--tokens", "16", "--vocab", "32", "--rounds", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    row, summary = json.loads(lines[0]), json.loads(lines[-1])
    assert row["case"] == "cpu-fp32-16x32"
    low, high = row["spread"]
    assert low <= row["speedup"] <= high
    assert summary["speedup"]["cpu-fp32-16x32"] == row["speedup"]


def test_the_two_losses_agree_on_what_they_time():
    import torch
    logits, targets = torch.randn(16, 40), torch.randint(0, 37, (16,))
    assert bench_loss.token_cross_entropy(logits, targets, 37).item() == pytest.approx(
        bench_loss.reference(logits, targets, 37).item(), rel=1e-6)


def test_sizes_below_one_are_refused(capsys):
    with pytest.raises(SystemExit):
        bench_loss.main(["--rounds", "0"])
    assert "--rounds must be >= 1" in capsys.readouterr().err
