"""Bring your own training loop, on the shared session cluster (conftest.py): the examples run
end to end through `python -m orchestrator submit JOB.yaml --address ...`, a user loop is
preempted through the scheduler and resumes from its own checkpoint, a loop that raises
ends with exit 4 naming the worker and its error, its reservation released, and a rank stuck in
its own code fails after stuck_timeout_s, named (also while the others wait in DDP's gradient
all-reduce).

Drivers are separate processes, as users run them (except where the test must itself be the
driver, below). Each job file is a copy of an example's in tmp_path, its run_dir and data
there. The loops report every step; Ray Train's controller takes one report per poll, which
launch() sets to 0.25 s (Ray's default is 2 s), so a 20-step example trains in seconds.
"""
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import ray
import yaml

from orchestrator import launch
from orchestrator.config import JobSpec
from orchestrator.entrypoints import load_entrypoint
from orchestrator.job_exit import run_job
from orchestrator.runs import read_metrics
from ray_layer.cluster import ensure_control_plane
from tests.support import wait_for

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def make_data(example: str, out: Path) -> Path:
    subprocess.run([sys.executable, str(EXAMPLES / example / "make_data.py"), "--out", str(out)],
                   check=True, capture_output=True, timeout=120)
    return out


def job_copy(tmp_path: Path, example: str, name: str, **config) -> Path:
    """examples/<example>/job.yaml, renamed, with its run_dir and data in tmp_path; the entry
    point stays the example's own train.py."""
    job = yaml.safe_load((EXAMPLES / example / "job.yaml").read_text())
    data = make_data(example, tmp_path / f"{name}-data")
    job.update(name=name, run_dir=str(tmp_path / name),
               entrypoint=f"{EXAMPLES / example / 'train.py'}:train_loop",
               config={**job["config"], "data_dir": str(data), **config})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def orchestrator(*args) -> subprocess.Popen:
    address = ray.get_runtime_context().gcs_address
    return subprocess.Popen([sys.executable, "-m", "orchestrator", *map(str, args),
                             "--address", address],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, timeout_s: float = 240) -> str:
    out, _ = process.communicate(timeout=timeout_s)
    assert process.returncode == 0, out[-4000:]
    return out


def held_by_scheduler(name: str) -> bool:
    scheduler, _ = ensure_control_plane()
    snapshot = ray.get(scheduler.snapshot.remote())
    # "jobs": every running or waiting job, with its state (orchestrator status shows them)
    return name in snapshot["reservations"] or any(j["job"] == name for j in snapshot["jobs"])


def mean(values):
    return sum(values) / len(values)


def assert_submit_ran_the_example_to_its_end(out: str, name: str, run_dir: Path, records,
                                             steps: int, attempts: int) -> None:
    """What a run of an example (2 workers, a checkpoint every 5 steps) through `submit` left:
    its checkpoints in its run directory, a falling loss, `attempts` placements by the
    scheduler, the CLI's summary, its reservation released and `logs` showing every report."""
    checkpointed = [r["step"] for r in records if r["checkpoint"]]
    assert checkpointed == list(range(4, steps, 5)), out[-3000:]
    assert all(Path(r["checkpoint"]).parent == run_dir for r in records if r["checkpoint"])
    losses = [r["loss"] for r in records]
    assert mean(losses[-3:]) < 0.6 * mean(losses[:3]), losses
    # Placed by the scheduler: two workers ("2 worker(s) on node ..., " or one per node).
    placed = [line for line in out.splitlines() if line.startswith(f"placement for {name}: ")]
    assert len(placed) == attempts, placed
    for line in placed:
        assert sum(int(n) for n in re.findall(r"(\d+) worker\(s\) on node", line)) == 2, line
    # The CLI's summary (stdout; Ray's log lines share the pipe): the final report and the
    # last checkpoint.
    lines = out.splitlines()
    (done,) = [line for line in lines if line.startswith(f"{name}: done on ")]
    assert done.startswith(f"{name}: done on 2 worker(s); last checkpointed report "
                           f"{{\"step\": {steps - 1}"), done
    assert lines[lines.index(done) + 1] == f"checkpoint: {records[-1]['checkpoint']}", out[-2000:]
    assert not held_by_scheduler(name)
    # `logs` prints the same history, one line per report.
    logs = subprocess.run([sys.executable, "-m", "orchestrator", "logs", name, "--run-dir",
                           str(run_dir)], capture_output=True, text=True, timeout=60)
    lines = logs.stdout.splitlines()
    assert logs.returncode == 0 and len(lines) == steps, logs.stdout[-2000:] + logs.stderr
    assert f" step {steps - 1}: " in lines[-1] and lines[-1].endswith("[checkpoint]")
    assert sum(line.endswith("[checkpoint]") for line in lines) == steps // 5


def test_the_image_cnn_example_runs_end_to_end_through_submit_and_its_loss_falls(cluster,
                                                                               tmp_path):
    # (The regression example's run through submit is the preemption test's below: its
    # claims are asserted there, on that run, rather than on a Ray Train run of their own.)
    name = "byol-lines-cnn"
    out = finish(orchestrator("submit", job_copy(tmp_path, "image_cnn", name)))
    records = read_metrics(tmp_path / name)
    # Every step once, in order (rank 0's reports), from one attempt.
    assert [r["step"] for r in records] == list(range(20)), out[-3000:]
    assert {r["start_step"] for r in records} == {0}
    assert records[-1]["test_accuracy"] > 0.6, records[-1]  # 4 classes: chance is 0.25
    assert_submit_ran_the_example_to_its_end(out, name, tmp_path / name, records, steps=20,
                                             attempts=1)


def test_the_regression_example_preempted_yields_after_a_checkpoint_resumes_and_completes(
        cluster, tmp_path):
    # Also the regression example's run end to end through submit: every claim the example
    # test makes of a finished run (checkpoints, a falling loss, placement, the CLI's summary,
    # `logs`) is asserted on this one rather than on a run of its own.
    # Steps pace at ~0.25-0.3 s (Ray Train's report poll): the operator's command (a fresh
    # process joining the cluster) lands ~10 steps after the first checkpoint here, so 90 steps
    # leave it several times that before the end on a slower machine.
    name, steps = "byol-preempted", 90
    run_dir = tmp_path / name
    driver = orchestrator("submit", job_copy(tmp_path, "regression", name, steps=steps))
    try:
        wait_for(f"{name} to report a checkpoint",
                 lambda: any(r["checkpoint"] for r in read_metrics(run_dir)), timeout_s=120)
        operator = subprocess.run(
            [sys.executable, "-m", "orchestrator", "preempt", name, "--address",
             ray.get_runtime_context().gcs_address], capture_output=True, text=True, timeout=120)
        assert operator.returncode == 0, operator.stderr
        assert f"preempt: {name}: it checkpoints at its next step boundary" in operator.stdout
        out = finish(driver)
    finally:
        driver.kill()

    records = read_metrics(run_dir)
    (at,) = [i for i, r in enumerate(records) if "yielded" in r]
    yielded, before, after = records[at], records[:at + 1], records[at + 1:]
    stop = yielded["step"]
    assert yielded["yielded"] == "preempt: preempted by an operator", out[-3000:]
    assert f"{name} stopped at step {stop} with a checkpoint: preempt:" in out, out[-3000:]
    assert "preempted or moved 1x" in out
    # It stopped at a report that carried a checkpoint (the yield is in that report), and
    # before the end.
    assert yielded["checkpoint"] and stop < steps - 1
    assert [r["step"] for r in before] == list(range(stop + 1))
    assert {r["start_step"] for r in before} == {0}
    # The second attempt resumed from that checkpoint: no step up to it trained again, every
    # later one once, and the weights were the checkpoint's (the loss carries on where it was,
    # far below the fresh model's).
    assert [r["step"] for r in after] == list(range(stop + 1, steps))
    assert {r["start_step"] for r in after} == {stop + 1}
    assert after[0]["loss"] < 0.5 * before[0]["loss"], (before[0], after[0])
    assert after[0]["time"] > yielded["time"]
    assert_submit_ran_the_example_to_its_end(out, name, run_dir, records, steps=steps,
                                             attempts=2)


FAILING_LOOP = """\
    import ray.train

    from orchestrator import launch


    def train_loop(config):
        rank = ray.train.get_context().get_world_rank()
        for step in range(config["steps"]):
            if rank == 1 and step == config["fail_at"]:
                raise ValueError(f"bad batch at step {step} on rank {rank}")
            launch.report({"step": step})
    """


def test_a_loop_that_raises_exits_4_naming_the_worker_and_its_error_and_releases(
        cluster, tmp_path, capsys):
    """This process is the driver (as `submit` is: the same entry point loader, fit and
    run_job), so a reservation gone afterwards was released by the launcher, not reclaimed
    from a dead driver."""
    (tmp_path / "failing.py").write_text(textwrap.dedent(FAILING_LOOP))
    entry = load_entrypoint("failing.py:train_loop", base_dir=tmp_path)
    name = "byol-failing"
    code, launched = run_job(lambda: launch.fit(
        entry.function, spec=JobSpec(name, num_workers=2), config={"steps": 6, "fail_at": 2},
        run_dir=tmp_path / name, max_failures=0, queue_timeout_s=120),
        on_interrupt="interrupted")
    err = capsys.readouterr().err
    assert code == 4 and launched is None
    assert ("error: training failed after 0 restart(s): worker rank 1: ValueError: bad batch "
            "at step 2 on rank 1 (failing.py line 10, in train_loop)") in err  # where, too
    # Step 1's report may be cut off by the failure as it is taken in (Ray Train's controller
    # polls reports): never a step past the failure, and what was logged is kept
    assert [r["step"] for r in read_metrics(tmp_path / name)] in ([0], [0, 1])
    assert not held_by_scheduler(name)


def run_two_rank_loop(source: str, file: str, name: str, config: dict, stuck_timeout_s: float,
                      tmp_path, capsys) -> tuple[int, object, str]:
    """(exit code, what launch.fit returned, stderr) of the loop `source` (written to `file`)
    run on 2 workers with no restart."""
    (tmp_path / file).write_text(textwrap.dedent(source))
    entry = load_entrypoint(f"{file}:train_loop", base_dir=tmp_path)
    code, launched = run_job(lambda: launch.fit(
        entry.function, spec=JobSpec(name, num_workers=2), config=config,
        run_dir=tmp_path / name, max_failures=0, queue_timeout_s=120,
        stuck_timeout_s=stuck_timeout_s), on_interrupt="interrupted")
    return code, launched, capsys.readouterr().err


STUCK_LOOP = """\
    import time

    import ray.train
    from orchestrator import launch

    def train_loop(config):
        rank = ray.train.get_context().get_world_rank()
        for step in range(config["steps"]):
            if rank == 1 and step == config["stuck_at"]:
                time.sleep(10**6)
            launch.report({"step": step})
    """


def test_a_rank_stuck_in_its_own_code_fails_after_stuck_timeout_naming_it(cluster, tmp_path,
                                                                          capsys):
    """Rank 1 sleeps while rank 0 waits in its report: the run failed only after the process
    group's 30-minute timeout, with no message."""
    name = "byol-stuck"
    code, launched, err = run_two_rank_loop(
        STUCK_LOOP, "stuck.py", name, {"steps": 6, "stuck_at": 2}, 5, tmp_path, capsys)
    assert code == 4 and launched is None
    assert ("error: training failed after 0 restart(s): worker rank 1: StuckRank: worker "
            "rank(s) 1 stuck in the loop's own code: neither called launch.report nor returned "
            "for 5s (stuck_timeout_s)") in err
    assert re.search(r"rank 1 last seen in its report 2 \(step 1\), \d+s ago, now at stuck\.py "
                     r"line 10, in train_loop; rank 0 waiting in its report 3 \(step 2\)", err)
    assert not held_by_scheduler(name)


DDP_STUCK_LOOP = """\
    import time

    import ray.train
    import ray.train.torch
    import torch
    from orchestrator import launch

    def train_loop(config):
        rank = ray.train.get_context().get_world_rank()
        model = ray.train.torch.prepare_model(torch.nn.Linear(4, 1))
        for step in range(config["steps"]):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            if rank == 1 and step == config["stuck_at"]:
                time.sleep(10**6)
            loss.backward()
            launch.report({"step": step})
    """


def test_a_rank_stuck_while_the_others_wait_in_ddps_all_reduce_is_named(cluster, tmp_path,
                                                                        capsys):
    """Rank 1 sleeps before its backward while rank 0 waits in DDP's gradient all-reduce in
    its own: both read as in their own code, and the run waited out gloo's 30 minutes."""
    name = "byol-ddp-stuck"
    code, launched, err = run_two_rank_loop(
        DDP_STUCK_LOOP, "ddp_stuck.py", name, {"steps": 6, "stuck_at": 2}, 5, tmp_path, capsys)
    assert code == 4 and launched is None
    assert re.search(r"worker rank 1: StuckRank: worker rank\(s\) 1 stuck in the loop's own "
                     r"code: .* now at ddp_stuck\.py line 14, in train_loop; rank 0 blocked in "
                     r"backward \(where DDP all-reduces the gradients\) for \d+s, at "
                     r"ddp_stuck\.py line 15, in train_loop\)", err)
    assert not held_by_scheduler(name)


SLOW_READER_LOOP = """\
    import time

    import ray.train
    import ray.train.torch
    import torch
    from orchestrator import launch

    def train_loop(config):
        rank = ray.train.get_context().get_world_rank()
        model = ray.train.torch.prepare_model(torch.nn.Linear(4, 1))
        for step in range(config["steps"]):
            time.sleep(0.4 if rank == 1 else 0)  # rank 1 reads its batches slowly
            model(torch.randn(8, 4)).pow(2).mean().backward()
        launch.report({"step": config["steps"] - 1})  # one report, at the end
    """


def test_a_healthy_ddp_loop_with_a_slow_reading_rank_is_not_named_stuck(cluster, tmp_path,
                                                                       capsys):
    """Rank 0 waits in backward's all-reduce at every step for rank 1, slow at reading its
    batches, with no report for longer than stuck_timeout_s: each step's backward frame took
    the last one's address, its wait counted from the first step's, and the healthy rank 1
    was named stuck."""
    name = "byol-slow-reader"
    code, launched, err = run_two_rank_loop(
        SLOW_READER_LOOP, "slow_reader.py", name, {"steps": 25}, 3, tmp_path, capsys)
    assert code == 0, err[-2000:]
    assert "StuckRank" not in err
