"""Benchmarks refuse flags that give no figure, naming the flag, before any work."""
import importlib
import subprocess
import sys

import pytest


@pytest.mark.parametrize("script, args, message", [
    ("bench_train", ["--rounds", "0"], "--rounds must be >= 1, got 0"),
    ("bench_fsdp", ["--rounds", "0"], "--rounds must be >= 1, got 0"),
    ("bench_fsdp", ["--steps", "0"], "--steps must be >= 1, got 0"),
    # (bench_compress found these after the teacher's minutes of training, or the whole
    # pipeline's, as tracebacks; its temporary work deleted)
    ("bench_compress", ["--prune-steps", "0"], "prune_steps (--prune-steps) must be"),
    ("bench_compress", ["--student-size", "huge"], "--student-size must be one of"),
    ("bench_compress", ["--threads", "0"], "--threads must be an integer in [1, 1024], got 0"),
    ("bench_serve", ["--rounds", "0"], "--rounds must be >= 1, got 0"),  # (after Serve: 1/0)
    ("bench_serve", ["--duration", "0"], "--duration must be > 0"),
    ("bench_launch", ["--seconds-per-report", "nan"],
     "--seconds-per-report must be > 0, got nan"),
    # (bench_launch and bench_yield named every rule at once, not the flag at fault)
    ("bench_launch", ["--reports", "1"], "--reports must be >= 2, got 1"),
    ("bench_launch", ["--settle-s", "-1"], "--settle-s must be >= 0, got -1.0"),
    ("bench_yield", ["--log-every", "0"], "--log-every must be >= 1, got 0"),
    ("bench_yield", ["--log-every", "40"],
     "--segment-steps must be >= 4 x --log-every (160: two steady reports after each resume), "
     "got 120"),
    ("bench_yield", ["--timeout-s", "nan"], "--timeout-s must be > 0, got nan"),
    ("bench_placement", ["--actor-jobs", "-5"], "--actor-jobs must be >= 1"),
    # (numpy's "expected non-negative integer" traceback, naming no flag)
    ("bench_placement", ["--seed", "-1", "--no-actor", "--nodes", "16", "--jobs", "1"],
     "--seed must be >= 0, got -1"),
    ("bench_fsdp", ["--ckpt-size", "huge"], "invalid choice: 'huge'"),
    ("gpu_check", ["--budget-s", "nan"], "--budget-s must be a number > 0, got nan"),
])
def test_no_rounds_is_refused_naming_the_flag(script, args, message, monkeypatch, capsys):
    # It died at the end with "StatisticsError: no median for empty data".
    # In this process, as `python -m scripts.X ARGS` runs it (main() reading sys.argv; two of
    # the mains take no argv): a subprocess each cost 1.5-4 s of interpreter and torch start.
    main = importlib.import_module(f"scripts.{script}").main
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_a_refusal_reaches_the_shell_as_exit_2_on_stderr():
    # The cases above run main() in this process; the module run as a command gets the same.
    # (--no-actor: were the flag ever accepted, this run would start no Ray)
    result = subprocess.run([sys.executable, "-m", "scripts.bench_placement", "--seed", "-1",
                             "--no-actor", "--nodes", "16", "--jobs", "1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--seed must be >= 0, got -1" in result.stderr


@pytest.mark.parametrize("args, message", [
    # Accepted, then refused by AdamW as the teacher's training began: "Invalid learning rate".
    (["--teacher-lr", "nan"], "--teacher-lr must be a number in (0, 1), got nan"),
    (["--teacher-lr", "-1"], "--teacher-lr must be a number in (0, 1), got -1.0"),
    # A bare AssertionError from the attention layer, naming neither flag.
    (["--n-embd", "100", "--n-head", "8"], "--n-embd must divide by --n-head, got 100 and 8"),
    # Found by the pipeline only after the teacher's training and the whole first pipeline
    # (the student's runs second), as a traceback.
    (["--student-size", "large"], "student_size (--student-size) must be a smaller model than "
                                  "the teacher"),
    (["--eval-tokens", "10"], "eval_tokens (--eval-tokens) 10 is shorter than one evaluation "
                              "window"),
    # (accepted: the teacher's training died of SIGSEGV, libgomp unable to make the threads)
    (["--threads", "100000"], "--threads must be an integer in [1, 1024], got 100000"),
])
def test_bench_compress_refuses_a_teacher_it_cannot_train_naming_the_flag(args, message,
                                                                          capsys):
    from scripts import bench_compress

    with pytest.raises(SystemExit) as exit_:
        bench_compress.parse_args(args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_bench_compress_names_a_refusal_of_the_pipeline_in_one_line(monkeypatch, tmp_path,
                                                                    capsys):
    """A rerun on the same --work with another --prune-steps is refused by the pipeline
    (its --out holds other settings): that ConfigError came out as a traceback."""
    from orchestrator.config import ConfigError
    from orchestrator.training.model import GPT, GPTConfig
    from scripts import bench_compress

    def refuse(*args, **kwargs):
        raise ConfigError(f"--out {tmp_path}/compressed was made with other settings")

    monkeypatch.setattr(bench_compress, "teacher_model", lambda args, work: GPT(
        GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32)))
    monkeypatch.setattr(bench_compress, "run_pipeline", refuse)
    # main() sets this process's torch threads (--threads, 1): left so, a later test's run
    # here stopped being bit-equal to its twin in a subprocess (test_resume_continues_...).
    import torch
    monkeypatch.setattr(torch, "set_num_threads", lambda threads: None)
    assert bench_compress.main(["--work", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --out {tmp_path}/compressed was made with other settings\n", err


def test_only_this_sessions_train_workers_are_candidates_to_kill():
    # Every "RayTrainWorker" process of the machine was: another session's could be killed,
    # and the benchmark's own run then reported a negative recovery time.
    import subprocess
    import sys
    import time

    from scripts.bench_train import ray_train_workers

    sleeper = "import time; time.sleep(30)"
    ours = subprocess.Popen([sys.executable, "-c", sleeper, "RayTrainWorker"])
    # Another session's: not a descendant of this process (its parent exits: reparented).
    subprocess.run([sys.executable, "-c",
                    "import subprocess, sys; subprocess.Popen([sys.executable, '-c', "
                    f"{sleeper!r}, 'RayTrainWorker', 'elsewhere'])"], check=True)
    try:
        deadline = time.monotonic() + 10
        while ours.pid not in {p.pid for p in ray_train_workers()} and \
                time.monotonic() < deadline:
            time.sleep(0.05)
        found = ray_train_workers()
        assert [p.pid for p in found] == [ours.pid]
    finally:
        ours.kill()
        import psutil

        for p in psutil.process_iter(["cmdline"]):
            if "elsewhere" in (p.info["cmdline"] or []):
                p.kill()


def test_a_cached_teacher_trained_otherwise_is_not_reused(tmp_path):
    # It was reused whatever the flags said (--n-head changes no shape), and the JSON
    # reported the new flags.
    from scripts import bench_compress

    small = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "16",
             "--teacher-steps", "1", "--batch-size", "2"]
    bench_compress.teacher_model(bench_compress.parse_args(small), tmp_path)
    bench_compress.teacher_model(bench_compress.parse_args(small), tmp_path)  # reused
    other = bench_compress.parse_args([*small[:4], "--n-head", "4", *small[6:]])
    with pytest.raises(SystemExit, match="teacher.pt was trained with .*'n_head': 2"):
        bench_compress.teacher_model(other, tmp_path)


def test_span_timings_alternate_which_model_goes_first():
    # Full attention always went first (five of it, then five of the span model), and the
    # training ratio came from two runs minutes apart: 0.88x one day, 1.53x another.
    from scripts.rounds import paired_rounds

    calls = []
    result = paired_rounds(lambda: calls.append("full"), lambda: calls.append("span"), 4)
    assert calls[2:] == ["full", "span", "span", "full", "full", "span", "span", "full"]
    assert len(result["spread"]) == 2 and result["ratio"] > 0


def test_bench_compress_work_under_the_home_of_no_user_is_refused_naming_the_flag(capsys):
    # Path.expanduser raised RuntimeError on `~nosuchuser-s55/x` (the shell leaves it as
    # written): a traceback after the flags were all accepted.
    from scripts import bench_compress

    with pytest.raises(SystemExit) as exit_:
        bench_compress.parse_args(["--work", "~nosuchuser-s55/x"])
    assert exit_.value.code == 2
    assert ("--work '~nosuchuser-s55/x': ~nosuchuser-s55 is the home directory of no user"
            in capsys.readouterr().err)


@pytest.mark.parametrize("below", ["", "sub"])
def test_bench_compress_work_on_a_file_is_refused_naming_the_flag(below, tmp_path, capsys):
    # Accepted, then Path.mkdir raised FileExistsError / NotADirectoryError in main(): a
    # traceback naming no flag.
    from scripts import bench_compress

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exit_:
        bench_compress.parse_args(["--work", str(blocker / below) if below else str(blocker)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--work" in err and str(blocker) in err and "Traceback" not in err
