"""Number flags of the commands and benchmarks are read by one strict argparse type
(validation.strict_int / strict_float, on parse_number): Python's int()/float() also took
`1_0` (10), other scripts' digits (`١`, 1), spaces around and, for int(), nothing else; the
run went on with the number the user did not mean."""
import argparse

import pytest

from jobs import compress as compress_job
from jobs import pretrain
from orchestrator.simulator import add_arguments as add_simulate_arguments
from scripts import bench_simulator


def simulate_args(argv):
    parser = argparse.ArgumentParser()
    add_simulate_arguments(parser)
    return parser.parse_args(["--out", "o", *argv])


COMMANDS = {
    "pretrain": pretrain.parse_args,
    "compress": lambda argv: compress_job.parse_args(["--checkpoint", "c", "--out", "o", *argv]),
    "simulate": simulate_args,
    "bench_simulator": bench_simulator.main,
}


@pytest.mark.parametrize("command,flag,value,why", [
    ("pretrain", "--max-steps", "1_0", "'_' is not read as a digit separator: write 10"),
    ("pretrain", "--lr", "1_0e-3", "'_' is not read as a digit separator: write 10e-3"),
    ("pretrain", "--num-workers", "\u0661", "is not a digit 0-9"),
    ("compress", "--qat-steps", " 5", "space around it"),
    ("compress", "--temperature", "0x10", "not a number"),
    ("simulate", "--max-jobs", "\u0661", "is not a digit 0-9"),
    ("simulate", "--load-scale", "1_0", "write 10"),
    ("simulate", "--restart-s", "5 ", "space around it"),
    ("bench_simulator", "--jobs", "0x10", "not a whole number"),
    ("bench_simulator", "--load-scale", "\u0663", "is not a digit 0-9"),
    # --sweep's scales were read by float(): `1_0` replayed at 10x, `\u0662` at 2x
    ("bench_simulator", "--sweep", "1_0", "write 10"),
    ("bench_simulator", "--sweep", "\u0662", "is not a digit 0-9"),
    ("bench_simulator", "--sweep", "0x10", "is not a number"),
    ("bench_simulator", "--sweep", "nan", "is not a load scale > 0"),
    ("bench_simulator", "--sweep", "1e999", "is not a load scale > 0"),
    ("bench_simulator", "--sweep", "-2", "is not a load scale > 0"),
    ("bench_simulator", "--sweep", "0", "is not a load scale > 0"),
])
def test_lax_numbers_are_refused_naming_the_flag(capsys, monkeypatch, command, flag, value, why):
    def parsed(args):  # the benchmark would run its replays
        raise AssertionError(f"{flag} {value!r} was taken")
    monkeypatch.setattr(bench_simulator, "argument_problems", parsed)
    with pytest.raises(SystemExit) as exit_:
        COMMANDS[command]([flag, value])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert f"argument {flag}: {value!r}" in err and why in err, err


@pytest.mark.parametrize("command,flag,value,expected", [
    ("pretrain", "--max-steps", "10", 10),
    ("pretrain", "--lr", "1e-3", 1e-3),
    ("pretrain", "--lr", ".5", 0.5),
    ("pretrain", "--cpus-per-worker", "2", 2.0),
    ("pretrain", "--seed", "-1", -1),  # refused later by the range check, as before
    ("compress", "--qat-steps", "+7", 7),
    ("compress", "--temperature", "1E2", 100.0),
    ("simulate", "--max-jobs", "10", 10),
    ("simulate", "--load-scale", "nan", None),  # the run's own check refuses it
    ("simulate", "--notice-s", "-1", -1.0),
])
def test_plain_numbers_read_as_before(command, flag, value, expected):
    args = COMMANDS[command]([flag, value])
    got = getattr(args, flag[2:].replace("-", "_"))
    if expected is None:
        assert got != got
    else:
        assert got == expected and type(got) is type(expected)


def test_the_bad_sweep_scale_is_named_in_a_list(capsys, monkeypatch):
    monkeypatch.setattr(bench_simulator, "argument_problems",
                        lambda args: pytest.fail("--sweep 0.5,1_0 was taken"))
    with pytest.raises(SystemExit):
        bench_simulator.main(["--sweep", "0.5,1_0"])
    assert "argument --sweep: '1_0' is not a number" in capsys.readouterr().err


@pytest.mark.parametrize("value,expected", [
    ("0.5,1,2", [0.5, 1.0, 2.0]),
    ("0.5, 2,", [0.5, 2.0]),  # spaces after commas and a trailing comma, as --policies'
    ("2,2.0,1", [2.0, 1.0]),  # a scale named twice is replayed once
    ("", []),
])
def test_sweep_scales_read_as_before(monkeypatch, value, expected):
    seen = []
    monkeypatch.setattr(bench_simulator, "argument_problems",
                        lambda args: seen.append(args.sweep) or ["stop"])
    with pytest.raises(SystemExit):
        bench_simulator.main(["--sweep", value])
    assert seen == [expected]
