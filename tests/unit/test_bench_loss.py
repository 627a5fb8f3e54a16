"""scripts/bench_loss.py: both losses timed on the same logits, its last line the JSON the
docs quote, bad sizes refused."""
import itertools
import json

import pytest

from scripts import bench_loss


def test_the_speedup_is_the_reference_time_over_ours_median_of_the_rounds(monkeypatch,
                                                                             capsys):
    """With the timer faked (ours 1, 2, 4 s; the reference 3 s), the ratios are 3, 1.5 and
    0.75: the median 1.5, the spread [0.75, 3]; inverted, they would read 0.667."""
    # A warm-up and 3 rounds per case, every case alike.
    ours_times, theirs_times = itertools.cycle([9.0, 1.0, 2.0, 4.0]), itertools.repeat(3.0)

    def fake_time_once(loss, logits, targets, vocab):
        return next(ours_times if loss is bench_loss.token_cross_entropy else theirs_times)

    monkeypatch.setattr(bench_loss, "time_once", fake_time_once)
    assert bench_loss.main(["--tokens", "16", "--vocab", "32", "--rounds", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert list(summary["speedup"]) == ["cpu-fp32-16x32", "cpu-fp32-16x25-padded",
                                        "cpu-bf16-16x25-padded"]
    for case in summary["speedup"]:
        assert summary["speedup"][case] == 1.5 and summary["spread"][case] == [0.75, 3.0]
        assert summary["ours_ms"][case] == 2000.0 and summary["reference_ms"][case] == 3000.0


def test_the_two_losses_agree_on_what_they_time():
    import torch
    logits, targets = torch.randn(16, 40), torch.randint(0, 37, (16,))
    assert bench_loss.token_cross_entropy(logits, targets, 37).item() == pytest.approx(
        bench_loss.reference(logits, targets, 37).item(), rel=1e-6)


def test_sizes_below_one_are_refused_naming_the_flag_and_value(capsys):
    # (was "--tokens and --rounds must be >= 1" for either: scripts.flags, as the others)
    for flag in ("--tokens", "--rounds"):
        with pytest.raises(SystemExit):
            bench_loss.main([flag, "0"])
        assert f"{flag} must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_loss.main(["--vocab", "7"])
    assert "--vocab must be > 7 (the padded cases leave 7 columns out), got 7" in \
        capsys.readouterr().err


def test_each_loss_goes_first_in_turn(monkeypatch):
    # (scripts.rounds.rotated: the warm-up, then ours first in even rounds)
    order = []
    monkeypatch.setattr(bench_loss, "time_once", lambda loss, *_: order.append(
        "ours" if loss is bench_loss.token_cross_entropy else "reference") or 1.0)
    bench_loss.compare("case", bench_loss.token_cross_entropy, bench_loss.reference, None, None,
                       8, rounds=3)
    assert order == ["ours", "reference", "ours", "reference", "reference", "ours", "ours",
                     "reference"]


def test_logits_too_large_to_allocate_are_refused_naming_both_flags(monkeypatch, capsys):
    # --tokens 100000000 --vocab 100000 ended in the allocator's RuntimeError traceback
    # ("DefaultCPUAllocator: can't allocate memory: you tried to allocate 40000000000000
    # bytes"), naming no flag.
    def randn(*shape):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
                           "can't allocate memory: you tried to allocate 40000000000000 bytes.")

    monkeypatch.setattr(bench_loss.torch, "randn", randn)
    with pytest.raises(SystemExit) as exit_:
        bench_loss.main(["--tokens", "100000000", "--vocab", "100000"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "--tokens 100000000 x --vocab 100000: out of memory" in err and "Traceback" not in err
