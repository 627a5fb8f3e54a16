"""orchestrator/cpu_shares.py: per-thread CPU time and runqueue wait from /proc schedstat."""
import pytest

from orchestrator import cpu_shares


def fake_proc(root, threads):
    """A /proc with threads {(pid, tid): (cmdline, comm, run_ns, wait_ns)}."""
    for (pid, tid), (cmdline, comm, run_ns, wait_ns) in threads.items():
        task = root / str(pid) / "task" / str(tid)
        task.mkdir(parents=True, exist_ok=True)
        (root / str(pid) / "cmdline").write_bytes(cmdline.replace(" ", "\0").encode() + b"\0")
        (task / "comm").write_text(comm + "\n")
        (task / "schedstat").write_text(f"{run_ns} {wait_ns} 42\n")
    (root / "self").mkdir(exist_ok=True)  # not a pid: skipped
    return root


def test_shares_are_percent_of_one_core_over_the_interval(tmp_path):
    before = cpu_shares.snapshot(fake_proc(tmp_path / "a", {
        (10, 10): ("ray::GPTModel", "main", 0, 0),
        (10, 11): ("ray::GPTModel", "generate", 1_000_000_000, 0),
        (20, 20): ("ray::Ingress", "main", 0, 0),
        (30, 30): ("gone", "x", 0, 0)}))
    after = cpu_shares.snapshot(fake_proc(tmp_path / "b", {
        (10, 10): ("ray::GPTModel", "main", 100_000_000, 0),
        (10, 11): ("ray::GPTModel", "generate", 7_000_000_000, 3_000_000_000),
        (20, 20): ("ray::Ingress", "main", 1_500_000_000, 4_000_000_000),
        (40, 40): ("new", "y", 5, 5)}))
    threads = cpu_shares.shares(before, after, seconds=10.0)
    # Busiest first; threads at only one of the moments are left out.
    assert [(t.pid, t.tid, t.thread, t.cpu_pct, t.runqueue_wait_pct) for t in threads] == [
        (10, 11, "generate", 60.0, 30.0), (20, 20, "main", 15.0, 40.0), (10, 10, "main", 1.0, 0.0)]
    assert threads[0].process == "ray::GPTModel"
    assert cpu_shares.process_cpu(threads) == {10: 61.0, 20: 15.0}
    assert [t.tid for t in cpu_shares.of_process(threads, "Ingress")] == [20]
    with pytest.raises(ValueError, match="seconds"):
        cpu_shares.shares(before, after, seconds=0)


def test_no_proc_gives_no_threads(tmp_path):
    assert cpu_shares.snapshot(tmp_path / "absent") == {}


def test_this_machine_sampled_for_real_shows_a_busy_process():
    import subprocess
    import sys

    # A separate process, not a thread: a spinning thread holds this process's GIL, and each
    # of the snapshot's small reads then waits for it (seconds instead of milliseconds).
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        threads = cpu_shares.sample(0.5)
    finally:
        spinner.kill()
        spinner.wait()
    busy = [t for t in threads if t.pid == spinner.pid]
    assert busy and busy[0].cpu_pct > 20, threads[:5]  # it ran for much of the interval
    assert busy[0].runqueue_wait_pct >= 0 and "while True" in busy[0].process


def test_the_sampler_does_not_match_itself():
    # Its own command line holds the --match text: it always found "one process" (itself).
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "scripts.cpu_shares", "--seconds", "0.2",
                             "--match", "no-such-process-xyz"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1, result.stdout
    assert "no process but this one matches --match 'no-such-process-xyz'" in result.stderr


@pytest.mark.parametrize("argv, words", [(["--seconds", "nan"], "--seconds must be"),
                                         (["--seconds", "inf"], "--seconds must be"),
                                         (["--top", "-1"], "--top must be >= 1"),
                                         (["--min-pct", "nan"], "--min-pct must be")])
def test_the_samplers_bad_flags_are_refused_naming_the_flag(argv, words, capsys):
    # NaN and inf seconds passed the check and ended in a traceback; --top -1 dropped one.
    from scripts.cpu_shares import parse_args
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2 and words in capsys.readouterr().err
