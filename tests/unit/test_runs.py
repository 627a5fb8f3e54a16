import datetime as dt

import pytest

from orchestrator.runs import METRICS_LOG, RunDirError, append_metrics, read_metrics, resolve_run_dir

NOW = dt.datetime(2026, 1, 2, 3, 4, 5)


def make_run(path):
    (path / "checkpoint_2026-01-01_00-00-00.000000").mkdir(parents=True)
    return path


def test_new_run_gets_a_timestamped_dir(tmp_path):
    assert resolve_run_dir(None, False, tmp_path, "pretrain", NOW) == \
        tmp_path / "pretrain-20260102-030405"


def test_resume_without_run_dir_takes_the_latest_run(tmp_path):
    make_run(tmp_path / "pretrain-20260101-000000")
    latest = make_run(tmp_path / "pretrain-20260102-000000")
    (tmp_path / "pretrain-20260103-000000").mkdir()  # no checkpoint yet
    import os
    os.utime(tmp_path / "pretrain-20260101-000000", (0, 0))
    assert resolve_run_dir(None, True, tmp_path, "pretrain", NOW) == latest
    # A newer run of a job file (~/orchestrator-runs/<job name>) under the same root is not
    # pretrain's to continue: --resume wrote into it.
    make_run(tmp_path / "regression")
    assert resolve_run_dir(None, True, tmp_path, "pretrain", NOW) == latest


def test_looking_at_an_older_run_does_not_make_it_the_latest(tmp_path):
    # The latest run was the run directory changed last: `pretrain.py --dry-run --resume
    # --run-dir OLD` (its write check puts a file in OLD and takes it out again), a refused
    # run there (its lock file), `touch`, made OLD the run a plain --resume continued and
    # `serve run` served. The latest is the one whose newest checkpoint was written last.
    import os
    old = make_run(tmp_path / "pretrain-20260101-000000")
    latest = make_run(tmp_path / "pretrain-20260102-000000")
    for checkpoint, when in ((old / "checkpoint_2026-01-01_00-00-00.000000", 1_000),
                             (latest / "checkpoint_2026-01-01_00-00-00.000000", 2_000)):
        os.utime(checkpoint, (when, when))
    os.utime(old, (1_000, 1_000))
    os.utime(latest, (2_000, 2_000))
    assert resolve_run_dir(str(old), True, tmp_path, "pretrain", NOW) == old  # a look at it
    assert old.stat().st_mtime > 2_000  # (the write check changed it)
    assert resolve_run_dir(None, True, tmp_path, "pretrain", NOW) == latest
    (old / "checkpoint_00000020").mkdir()  # trained on since: now the latest
    assert resolve_run_dir(None, True, tmp_path, "pretrain", NOW) == old


def test_a_copy_of_an_older_run_is_not_the_latest(tmp_path):
    # A safety copy of an older run (`cp -r pretrain-A pretrain-A-kept`), or one restored from
    # a backup: its checkpoint directories have the copy's times, and a plain --resume went on
    # with the copy, `serve run` served its older model, not the run that trained last. The
    # time Ray Train's checkpoints carry in their names (runs.checkpoint_name) is the write's.
    import os
    import subprocess

    from orchestrator.runs import checkpoint_name
    older, latest = tmp_path / "pretrain-20260101-000000", tmp_path / "pretrain-20260102-000000"
    (older / checkpoint_name(10, 1_000)).mkdir(parents=True)
    (latest / checkpoint_name(10, 2_000)).mkdir(parents=True)
    for run, when in ((older, 1_000), (latest, 2_000)):
        for checkpoint in run.iterdir():
            os.utime(checkpoint, (when, when))
    copy = tmp_path / "pretrain-20260101-000000-kept"
    subprocess.run(["cp", "-r", str(older), str(copy)], check=True)  # (times: the copy's)
    assert resolve_run_dir(None, True, tmp_path, "pretrain", NOW) == latest
    (copy / checkpoint_name(20, 3_000)).mkdir()  # the copy trained on since: now the latest
    assert resolve_run_dir(None, True, tmp_path, "pretrain", NOW) == copy


def test_resume_with_nothing_to_resume_names_the_place(tmp_path):
    make_run(tmp_path / "a-job-files-run")
    with pytest.raises(RunDirError, match=f"no pretrain-\\* run with checkpoints under {tmp_path}"):
        resolve_run_dir(None, True, tmp_path, "pretrain", NOW)
    with pytest.raises(RunDirError, match="no checkpoint in run dir .*nothing"):
        resolve_run_dir(str(tmp_path / "nothing"), True, tmp_path, "pretrain", NOW)


def test_an_old_run_is_never_continued_silently(tmp_path):
    run = make_run(tmp_path / "run")
    with pytest.raises(RunDirError, match="pass --resume"):
        resolve_run_dir(str(run), False, tmp_path, "pretrain", NOW)
    assert resolve_run_dir(str(run), True, tmp_path, "pretrain", NOW) == run


def test_two_new_runs_in_the_same_second_get_distinct_dirs(tmp_path):
    first = resolve_run_dir(None, False, tmp_path, "pretrain", NOW)
    first.mkdir()
    assert resolve_run_dir(None, False, tmp_path, "pretrain", NOW).name == \
        "pretrain-20260102-030405-2"


def test_metrics_log_keeps_every_report_and_skips_a_torn_last_line(tmp_path):
    run_dir = tmp_path / "run"
    append_metrics(run_dir, {"step": 1, "loss": 2.5}, None)
    append_metrics(run_dir, {"step": 2, "loss": 2.4}, "/runs/x/checkpoint_2")
    append_metrics(run_dir, {"step": 2, "already_complete": True}, None)  # trained nothing
    with open(run_dir / METRICS_LOG, "a") as f:
        f.write('{"step": 3, "lo')  # the process died mid-write
    records = read_metrics(run_dir)
    assert [(r["step"], r["checkpoint"]) for r in records] == [(1, None),
                                                               (2, "/runs/x/checkpoint_2")]
    assert all(r["time"] > 0 for r in records)
    assert read_metrics(tmp_path / "absent") == []


def test_a_report_after_a_torn_line_is_kept_and_a_reports_own_time_too(tmp_path):
    # Appended to a torn line (a crash mid-write), the next report was lost with it; a
    # report's own "time" was overwritten by the line's.
    from orchestrator.runs import append_metrics, read_metrics

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.9}\n{"step": 2, "lo')
    append_metrics(tmp_path, {"step": 3, "loss": 0.7, "time": 12.5, "time_": 1.0}, None)
    append_metrics(tmp_path, {"step": 4, "loss": 0.6}, "/ckpt")
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 3, 4]
    assert records[1]["time__"] == 12.5 and records[1]["time_"] == 1.0
    assert records[1]["time"] > 1e9
    assert records[2]["checkpoint"] == "/ckpt"


def test_a_reports_numpy_numbers_are_numbers_in_the_metrics_log(tmp_path):
    # A user's loop reporting numpy figures (np.int64 steps, an np.float32 loss, a 0-d
    # array) had them written as text: "step": "5", "loss": "0.12345679".
    import numpy as np

    append_metrics(tmp_path, {"step": np.int64(5), "loss": np.float32(0.5),
                              "acc": np.array(0.25), "ok": np.bool_(True),
                              "hist": np.array([1, 2]), "when": dt.date(2026, 1, 2)}, None)
    record = read_metrics(tmp_path)[0]
    assert record["step"] == 5 and type(record["step"]) is int
    assert record["loss"] == 0.5 and record["acc"] == 0.25 and record["ok"] is True
    # an array, and what JSON has no number for: still its text
    assert record["hist"] == "[1 2]" and record["when"] == "2026-01-02"


def _strict_json(line):
    """json.loads as jq, JavaScript and other strict JSON readers parse: bare NaN/Infinity
    are refused."""
    import json

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(line, parse_constant=refuse)


def test_a_non_finite_figure_is_written_as_strict_json_and_read_back_as_it_was(tmp_path):
    # A NaN or infinite loss was written as bare NaN / Infinity: jq and JavaScript rejected
    # the line. It is written as null, its value kept beside it, and read back as the float.
    import math

    import numpy as np

    from orchestrator.__main__ import format_report

    append_metrics(tmp_path, {"step": 1, "loss": float("nan"), "grad": float("inf"),
                              "low": -math.inf, "acc": np.float32("nan"),
                              "hist": [1.0, float("nan")], "lr": 0.5}, None)
    line = (tmp_path / METRICS_LOG).read_text().splitlines()[0]
    written = _strict_json(line)
    assert written["loss"] is None and written["grad"] is None and written["acc"] is None
    assert written["hist"] == [1.0, None] and written["lr"] == 0.5
    record = read_metrics(tmp_path)[0]
    assert math.isnan(record["loss"]) and math.isnan(record["acc"])
    assert record["grad"] == math.inf and record["low"] == -math.inf
    assert record["lr"] == 0.5 and "non_finite" not in record
    shown = format_report(record)
    assert "loss=nan" in shown and "grad=inf" in shown and "low=-inf" in shown


def test_a_list_or_dict_holding_itself_is_refused_naming_it_not_a_recursion_error():
    # A loop's report `{"hist": x}` after `x.append(x)`: finite_json recursed until Python's
    # RecursionError, deep inside. The same object twice side by side (not holding itself)
    # is written twice, as json.dumps does.
    from orchestrator.validation import finite_json

    x = []
    x.append(x)
    with pytest.raises(ValueError, match=r"^metrics\['hist'\]\[0\] is metrics\['hist'\] "
                       r"itself: a list or dict that holds itself cannot be written as JSON$"):
        finite_json({"step": 1, "hist": x}, "metrics")
    d = {"a": [1.0]}
    d["a"].append({"up": d})
    with pytest.raises(ValueError, match=r"^data\['a'\]\[1\]\['up'\] is data itself"):
        finite_json(d)
    shared = [float("nan")]
    assert finite_json({"a": shared, "b": (shared, shared)}) == {"a": [None],
                                                                  "b": [[None], [None]]}


def test_a_metrics_log_with_bare_nan_from_before_stays_readable(tmp_path):
    import math

    from orchestrator.__main__ import format_report

    (tmp_path / METRICS_LOG).write_text(
        '{"step": 1, "loss": NaN, "grad": Infinity, "time": 1.0, "checkpoint": null}\n')
    record = read_metrics(tmp_path)[0]
    assert math.isnan(record["loss"]) and record["grad"] == math.inf
    assert "loss=nan" in format_report(record) and "grad=inf" in format_report(record)


def test_logs_shows_a_loops_own_non_finite_figure_from_before_and_after_the_rename(tmp_path):
    # A loop's own `non_finite` (a count of bad steps) written before 2026-12-07 as it was:
    # `logs` left it out with the line's bookkeeping fields, where a new line's is renamed.
    from orchestrator.__main__ import format_report

    (tmp_path / METRICS_LOG).write_text(
        '{"step": 1, "non_finite": 3, "time": 1.0, "checkpoint": null}\n')
    append_metrics(tmp_path, {"step": 2, "non_finite": 4, "loss": float("nan")}, None)
    old, new = (format_report(record) for record in read_metrics(tmp_path))
    assert "non_finite=3" in old
    assert "non_finite_=4" in new and "loss=nan" in new and "non_finite=" not in new


def test_a_metrics_line_nested_thousands_deep_is_skipped_not_a_recursion_error(tmp_path):
    # json.loads raises RecursionError (not a ValueError) on `[[[...]]]` 100,000 deep: one
    # such line (edited by hand, or garbage) made `logs NAME` and --resume a traceback
    from orchestrator.runs import resume_point

    (tmp_path / METRICS_LOG).write_text('{"step": 1, "checkpoint": null}\n'
                                        + "[" * 100_000 + "]" * 100_000 + "\n"
                                        + '{"step": 2, "checkpoint": null}\n')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert resume_point(tmp_path).step == 0


def test_checkpoints_ray_train_never_registered_are_named(tmp_path):
    # Ctrl-C as workers reported: checkpoints on disk that Ray Train never registered; a
    # resume passed over them without a word, and started from step 0 when it had none.
    import json

    from orchestrator.runs import unregistered_checkpoints_warning

    assert unregistered_checkpoints_warning(tmp_path, True) is None  # no checkpoints
    for name in ("checkpoint_2026-12-05_18-51-01", "checkpoint_2026-12-05_18-51-02",
                 "checkpoint_00000030_2026-12-05_18-51-03"):
        (tmp_path / name).mkdir()
    assert unregistered_checkpoints_warning(tmp_path, True) == (
        "3 checkpoint(s) not in Ray Train's record (a run stopped while it reported them: "
        "checkpoint_00000030_2026-12-05_18-51-03, checkpoint_2026-12-05_18-51-02, "
        "checkpoint_2026-12-05_18-51-01): the resume takes the newest checkpoint that "
        "verifies, listed or not; each is deleted once keep_checkpoints listed ones are "
        "newer, at the end of a run (never where keep_checkpoints is null/None: every one "
        "is kept)")  # (a job file's null: prune_unlisted_checkpoints deletes none)
    # A user's loop resumes from what the record lists
    assert "the resume starts from the newest it lists (ray.train.get_checkpoint()), or " \
        "from scratch when it lists none" in unregistered_checkpoints_warning(tmp_path, False)
    snapshot = tmp_path / "checkpoint_manager_snapshot.json"
    snapshot.write_text(json.dumps({"checkpoint_results": [
        {"checkpoint_dir_name": "checkpoint_2026-12-05_18-51-01"},
        {"checkpoint_dir_name": "checkpoint_2026-12-05_18-51-02"}]}))
    assert unregistered_checkpoints_warning(tmp_path, True).startswith(
        "1 checkpoint(s) not in Ray Train's record (a run stopped while it reported them: "
        "checkpoint_00000030_2026-12-05_18-51-03)")
    snapshot.write_text(json.dumps({"checkpoint_results": [
        {"checkpoint_dir_name": p.name} for p in tmp_path.iterdir() if p.is_dir()]}))
    assert unregistered_checkpoints_warning(tmp_path, True) is None  # all registered
    snapshot.write_text("{torn")
    assert unregistered_checkpoints_warning(tmp_path, True) is None  # repair_ray_record says it


def test_a_run_dir_that_cannot_be_looked_at_is_named_not_a_traceback(tmp_path, monkeypatch):
    from pathlib import Path

    from orchestrator.runs import writable_dir_problem

    a_file = tmp_path / "afile"
    a_file.write_text("x")
    assert writable_dir_problem(a_file) == "it is a file, not a directory"
    assert ".write-check" not in (writable_dir_problem(a_file / "run") or "x.write-check")
    real_exists = Path.exists

    def no_search(self, *args, **kwargs):  # a parent this user cannot search (EACCES)
        if str(self).startswith(str(tmp_path / "locked")):
            raise PermissionError(13, "Permission denied", str(self))
        return real_exists(self, *args, **kwargs)
    monkeypatch.setattr(Path, "exists", no_search)
    assert "Permission denied" in writable_dir_problem(tmp_path / "locked" / "run")


def test_a_new_run_sets_aside_the_history_of_one_that_stopped_before_any_checkpoint(tmp_path):
    # The new run's reports were appended to the old run's: `logs` showed steps 1.. twice.
    from orchestrator.runs import SUMMARY_FILE, set_aside_earlier_history

    assert set_aside_earlier_history(tmp_path) == []  # nothing earlier: nothing moved
    (tmp_path / "config.json").write_text("{}")  # a config alone is the new run's to replace
    assert set_aside_earlier_history(tmp_path) == []
    append_metrics(tmp_path, {"step": 1, "loss": 5.0}, None)
    (tmp_path / SUMMARY_FILE).write_text('{"steps": 1}\n')
    moved = set_aside_earlier_history(tmp_path)
    assert [p.name.split(".before-")[0] for p in moved] == ["metrics", "summary", "config"]
    assert read_metrics(tmp_path) == [] and not (tmp_path / SUMMARY_FILE).exists()
    assert '"loss": 5.0' in moved[0].read_text()  # kept, not lost
    append_metrics(tmp_path, {"step": 1, "loss": 4.0}, None)  # a third run, same second
    again = set_aside_earlier_history(tmp_path)
    assert len(again) == 1 and again[0] != moved[0] and moved[0].exists()


def test_a_second_run_in_a_run_dir_in_use_is_refused_naming_the_holder(tmp_path):
    # Two launches without --address (two embedded Rays) trained into one directory.
    import os

    from orchestrator.runs import run_dir_held

    run_dir = tmp_path / "job"
    with run_dir_held(run_dir, new_run=True):
        with pytest.raises(RunDirError, match=f"in use by another run \\(pid {os.getpid()} on "):
            with run_dir_held(run_dir, new_run=True):
                pass
    with run_dir_held(run_dir, new_run=True):  # released when the first run ended
        pass


def test_a_refused_run_takes_away_the_run_dir_it_made_and_nothing_else(tmp_path):
    from orchestrator.job_exit import EXIT_FAILED, EXIT_NOT_PLACEABLE, JobFailed
    from orchestrator.runs import run_dir_held

    made = tmp_path / "new"
    with pytest.raises(JobFailed):
        with run_dir_held(made, new_run=True, written={"config.json"}):
            (made / "config.json").write_text("{}")
            raise JobFailed("not placeable", EXIT_NOT_PLACEABLE)
    assert not made.exists()
    with pytest.raises(JobFailed):  # training failed: what it wrote stays
        with run_dir_held(made, new_run=True, written={"config.json"}):
            (made / "config.json").write_text("{}")
            raise JobFailed("training failed", EXIT_FAILED)
    assert (made / "config.json").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(JobFailed):  # it was there before: left as it was
        with run_dir_held(kept, new_run=True):
            raise JobFailed("not placeable", EXIT_NOT_PLACEABLE)
    assert kept.exists()


def test_a_run_dir_on_a_filesystem_without_flock_runs_unguarded_and_says_so(
        tmp_path, monkeypatch, capsys):
    # ENOLCK (NFS without lockd) was a traceback, not a run.
    import errno

    from orchestrator import file_lock
    from orchestrator.runs import run_dir_held

    def no_flock(*args):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(file_lock.fcntl, "flock", no_flock)
    with run_dir_held(tmp_path / "job", new_run=True):
        ran = True
    assert ran and "cannot lock run dir" in capsys.readouterr().err


def test_a_refused_runs_cleanup_that_fails_leaves_the_jobs_own_error(tmp_path, monkeypatch):
    # On NFS the lock's open file left a .nfsXXXX behind: rmdir's OSError replaced the
    # JobFailed (a traceback, exit 1, instead of exit 3 and its reason).
    from pathlib import Path

    from orchestrator.job_exit import EXIT_NOT_PLACEABLE, JobFailed
    from orchestrator.runs import run_dir_held

    def not_empty(self):
        raise OSError(39, "Directory not empty")
    monkeypatch.setattr(Path, "rmdir", not_empty)
    with pytest.raises(JobFailed, match="not placeable"):
        with run_dir_held(tmp_path / "new", new_run=True):
            raise JobFailed("not placeable", EXIT_NOT_PLACEABLE)


def test_a_uri_run_dir_is_refused_not_made_a_local_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RunDirError, match="--run-dir s3://bucket/runs/a is a URI"):
        resolve_run_dir("s3://bucket/runs/a", False, tmp_path, "pretrain", NOW)
    assert not (tmp_path / "s3:").exists()


def test_a_relative_run_dir_inside_rays_copy_of_the_working_dir_is_refused(tmp_path,
                                                                          monkeypatch):
    # `ray job submit --working-dir . -- python jobs/pretrain.py --run-dir runs/x`: the
    # checkpoints went into Ray's package cache.
    copy = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_ab12"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    with pytest.raises(RunDirError, match="--run-dir runs/x is relative to the working "
                                          "directory, which is Ray's temporary copy"):
        resolve_run_dir("runs/x", False, tmp_path, "pretrain", NOW)
    assert resolve_run_dir(str(tmp_path / "runs" / "x"), False, tmp_path, "pretrain", NOW) \
        == tmp_path / "runs" / "x"


def test_a_refused_run_in_a_folder_that_was_there_takes_back_only_what_it_added(tmp_path):
    # The folder stayed, and so did the refused run's .run.lock and config.json in it.
    from orchestrator.job_exit import EXIT_BAD_INPUT, EXIT_FAILED, JobFailed
    from orchestrator.runs import run_dir_held

    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    with pytest.raises(JobFailed):
        with run_dir_held(kept, new_run=True, written={"config.json", "tokenizer.json"}):
            (kept / "config.json").write_text("{}")
            raise JobFailed("no cluster there", EXIT_BAD_INPUT)
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt"]
    with pytest.raises(JobFailed):  # training failed: the run's files stay
        with run_dir_held(kept, new_run=True, written={"config.json"}):
            (kept / "config.json").write_text("{}")
            raise JobFailed("training failed", EXIT_FAILED)
    assert (kept / "config.json").exists() and (kept / ".run.lock").exists()


def test_a_run_that_trained_then_was_refused_keeps_its_files(tmp_path):
    # Exit 3 after training (an operator's cancel, a lost node without room) took back the
    # run's config.json and tokenizer.json from a folder made beforehand: --resume then ran
    # with the defaults, and serving found no tokenizer beside the checkpoints.
    from orchestrator.job_exit import EXIT_NOT_PLACEABLE, JobFailed
    from orchestrator.runs import run_dir_held

    for ran in (True, False):  # (False: the checkpoint alone says it trained)
        run = tmp_path / f"made-before-{ran}"
        run.mkdir()
        with pytest.raises(JobFailed):
            with run_dir_held(run, new_run=True, written={"config.json", "tokenizer.json"}):
                (run / "config.json").write_text('{"train": {}, "job": {}}')
                (run / "tokenizer.json").write_text("{}")
                (run / "checkpoint_00000500").mkdir()
                raise JobFailed("job 'x' was cancelled", EXIT_NOT_PLACEABLE, ran=ran)
        assert {"config.json", "tokenizer.json", "checkpoint_00000500"} <= {
            p.name for p in run.iterdir()}
    run = tmp_path / "ran-no-checkpoint"
    run.mkdir()
    with pytest.raises(JobFailed):
        with run_dir_held(run, new_run=True, written={"config.json"}):
            (run / "config.json").write_text('{"train": {}, "job": {}}')
            raise JobFailed("job 'x' was cancelled", EXIT_NOT_PLACEABLE, ran=True)
    assert (run / "config.json").exists()


def test_a_refused_resume_leaves_the_runs_config_as_it_was(tmp_path):
    # The refused flags (--num-workers 64) stayed in config.json, and the next plain --resume
    # inherited them and was refused again.
    from orchestrator.job_exit import EXIT_NOT_PLACEABLE, JobFailed
    from orchestrator.runs import run_dir_held

    run = tmp_path / "run"
    (run / "checkpoint_00000010").mkdir(parents=True)
    (run / "config.json").write_text('{"train": {"num_workers": 2}, "job": {}}')
    with pytest.raises(JobFailed):
        with run_dir_held(run, new_run=False, written={"config.json", "tokenizer.json"}):
            (run / "config.json").write_text('{"train": {"num_workers": 64}, "job": {}}')
            raise JobFailed("no room for 64 workers", EXIT_NOT_PLACEABLE)
    assert (run / "config.json").read_text() == '{"train": {"num_workers": 2}, "job": {}}'
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint_00000010", "config.json"]


def test_a_refused_resume_of_a_run_that_had_ended_puts_back_its_end_and_config(tmp_path):
    # run_dir_held removes the earlier run's ended.json as the run starts; put back after a
    # refusal, its absence made the first read fail, which ended the putting back: ended.json
    # stayed gone (`logs --follow` then waited for an end) and, iterated after it, the
    # refused flags stayed in config.json. Seen with `jobs/pretrain.py --resume --address`
    # of a cluster that is not there.
    from orchestrator.job_exit import EXIT_BAD_INPUT, JobFailed
    from orchestrator.runs import ENDED_FILE, run_dir_held

    run = tmp_path / "run"
    (run / "checkpoint_00000010").mkdir(parents=True)
    ended = '{"exit_code": 0, "error": null, "time": 1.0}'
    (run / ENDED_FILE).write_text(ended)
    (run / "config.json").write_text('{"train": {"num_workers": 2}, "job": {}}')
    with pytest.raises(JobFailed):
        with run_dir_held(run, new_run=False, written={"config.json", "tokenizer.json"}):
            (run / "config.json").write_text('{"train": {"num_workers": 64}, "job": {}}')
            raise JobFailed("cannot reach a Ray cluster at 127.0.0.1:9", EXIT_BAD_INPUT)
    assert (run / ENDED_FILE).read_text() == ended
    assert (run / "config.json").read_text() == '{"train": {"num_workers": 2}, "job": {}}'


def test_a_write_that_fails_in_the_block_takes_back_what_was_written(tmp_path):
    # tokenizer.json written, config.json's write failed (a full disk): the folder kept
    # tokenizer.json and .run.lock, and the next attempt refused it as another job's folder.
    from orchestrator.runs import RunDirError, not_a_run_dirs_files, run_dir_held

    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(RunDirError):
        with run_dir_held(run, new_run=True, written={"config.json", "tokenizer.json"}):
            (run / "tokenizer.json").write_text("{}")
            raise RunDirError(f"cannot write to run dir {run}: No space left on device")
    assert list(run.iterdir()) == []
    # and a folder a run left that way is still taken for a run's
    (run / "tokenizer.json").write_text("{}")
    (run / ".run.lock").write_text("")
    assert not_a_run_dirs_files(run) == []


def test_a_run_directory_of_the_first_layout_is_still_a_run_directory(tmp_path):
    # Its config.json is a flat TrainConfig (no train/job sections): --resume was refused
    # as "not a run directory ... give a new or empty folder".
    from orchestrator.runs import not_a_run_dirs_files

    (tmp_path / "checkpoint_00000010").mkdir()
    (tmp_path / "config.json").write_text('{"model_size": "tiny"}')
    assert not_a_run_dirs_files(tmp_path) == []
    (tmp_path / "model.safetensors").write_text("")
    assert not_a_run_dirs_files(tmp_path) == ["model.safetensors (a Hugging Face model's weights)"]


def test_what_a_refusal_puts_back_is_the_folder_under_the_lock_and_unguarded_nothing(
        tmp_path, monkeypatch):
    import errno

    from orchestrator import file_lock
    from orchestrator.job_exit import EXIT_NOT_PLACEABLE, JobFailed
    from orchestrator.runs import run_dir_held

    # A new run where an earlier one stopped before its first checkpoint: its history set
    # aside (kept), then refused: the set-aside counted as new and nothing was taken back,
    # not even the lock.
    run = tmp_path / "history"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(JobFailed):
        with run_dir_held(run, new_run=True, written={"config.json"}):
            (run / "config.json").write_text('{"train": {}, "job": {}}')
            raise JobFailed("not placeable", EXIT_NOT_PLACEABLE)
    assert [p.name.split(".before-")[0] for p in run.iterdir()] == ["metrics"]
    # Ctrl-C while the job waited in the queue (its workers never started): refused too
    (run / "config.json").write_text('{"train": {"num_workers": 2}, "job": {}}')
    (run / "checkpoint_00000010").mkdir()
    interrupt = KeyboardInterrupt()
    interrupt.ran = False
    with pytest.raises(KeyboardInterrupt):
        with run_dir_held(run, new_run=False, written={"config.json"}):
            (run / "config.json").write_text('{"train": {"num_workers": 64}, "job": {}}')
            raise interrupt
    assert "64" not in (run / "config.json").read_text()
    # Without flock another run's files could be there: nothing is taken back
    monkeypatch.setattr(file_lock.fcntl, "flock", lambda *args: (_ for _ in ()).throw(
        OSError(errno.ENOLCK, "No locks available")))
    with pytest.raises(JobFailed):
        with run_dir_held(tmp_path / "unguarded", new_run=True, written={"config.json"}):
            (tmp_path / "unguarded" / "config.json").write_text("{}")
            raise JobFailed("not placeable", EXIT_NOT_PLACEABLE)
    assert (tmp_path / "unguarded" / "config.json").exists()


def _logged_run(run_dir, steps):
    from orchestrator.training.checkpoint import save_checkpoint

    for step in steps:
        checkpoint = save_checkpoint(run_dir / f"checkpoint_{step:08d}", {"step": step}).parent
        append_metrics(run_dir, {"step": step}, str(checkpoint))
    return run_dir


def test_a_moved_run_dir_resumes_from_the_checkpoints_it_holds(tmp_path):
    """The metrics log names each checkpoint by its absolute path: once the run directory was
    moved (or its share mounted elsewhere), none was found, so `--resume` at the same
    --max-steps placed and started the job for nothing, and its checks counted from step 0."""
    from orchestrator.runs import resume_point

    old = _logged_run(tmp_path / "old" / "run", (5, 10))
    (tmp_path / "new").mkdir()
    new = old.rename(tmp_path / "new" / "run")
    assert resume_point(new) == (10, ())
    import shutil
    shutil.rmtree(new / "checkpoint_00000010")  # rolled back by hand: not counted
    assert resume_point(new) == (5, ())


def test_a_copied_run_dir_rolled_back_does_not_count_its_originals_checkpoints(tmp_path):
    """Checkpoints live in the run directory (Ray Train's storage is its parent, its name the
    run's): a logged one missing there is gone, even where the logged absolute path still
    holds one, the original's of a copied run. Counted, `--resume --max-steps 10` of the copy
    rolled back to step 5 said "nothing to do: already at step 10" for good."""
    import shutil

    from orchestrator.runs import resume_point

    original = _logged_run(tmp_path / "a" / "run", (5, 10))
    copy = shutil.copytree(original, tmp_path / "b" / "run")
    shutil.rmtree(copy / "checkpoint_00000010")  # the copy rolled back by hand
    assert resume_point(copy) == (5, ())
    assert resume_point(original) == (10, ())  # the original's own still counts


def test_a_damaged_final_checkpoint_is_not_taken_for_a_finished_run(tmp_path):
    """--resume at the same --max-steps said "nothing to do" when the final checkpoint the
    metrics log lists was damaged on disk: the run could never be completed again."""
    from orchestrator.runs import resume_point

    run_dir = _logged_run(tmp_path / "run", (5, 10))
    assert resume_point(run_dir) == (10, ())
    state = run_dir / "checkpoint_00000010" / "state.pt"
    state.write_bytes(state.read_bytes()[:-1] + b"x")  # one byte changed
    point = resume_point(run_dir)
    assert point.step == 5
    [(step, problem)] = point.unusable
    assert step == 10 and f"checkpoint {state} is corrupt" in problem
    (run_dir / "checkpoint_00000005" / "state.pt.sha256").unlink()
    point = resume_point(run_dir)
    assert point.step == 0 and [s for s, _ in point.unusable] == [10, 5]
    assert "checkpoint file missing" in point.unusable[1][1]


def test_a_run_dir_in_the_home_of_no_user_is_refused_naming_the_flag(tmp_path):
    with pytest.raises(RunDirError, match="--run-dir '~nosuchuser-s55/r': ~nosuchuser-s55 is "
                                          "the home directory of no user"):
        resolve_run_dir("~nosuchuser-s55/r", False, tmp_path, "pretrain", NOW)


def test_a_resume_sets_aside_a_corrupt_newest_checkpoint_so_retention_never_keeps_it(
        tmp_path, capsys):
    """A resume past a corrupt newest checkpoint fell back to the previous one, but Ray Train's
    retention (the order checkpoints were reported) still counted the corrupt one: it pruned
    the good checkpoint the run resumed from and kept the corrupt one. The corrupt one is
    set aside (renamed, named in the warning) and dropped from Ray Train's record before the
    run starts; the checkpoints before the newest good one are not read."""
    import json
    from importlib.metadata import version

    from orchestrator.runs import checkpoint_dirs, run_dir_held

    run_dir = _logged_run(tmp_path / "run", (5, 10, 20))
    state = run_dir / "checkpoint_00000020" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])  # cut short
    old = run_dir / "checkpoint_00000005" / "state.pt"
    old.write_bytes(old.read_bytes()[:-1] + b"x")  # older than the good one: left as it is
    results = [{"checkpoint_dir_name": f"checkpoint_{s:08d}"} for s in (5, 10, 20)]
    (run_dir / "checkpoint_manager_snapshot.json").write_text(json.dumps({
        "ray_version": version("ray"), "checkpoint_results": results,
        "checkpoint_report_indices": [0, 1, 2], "latest_checkpoint_result": results[-1],
        "pending_training_results": [], "pending_validation_specs": []}))
    with run_dir_held(run_dir, new_run=False, any_checkpoint=True):
        pass
    assert [p.name for p in checkpoint_dirs(run_dir)] == ["checkpoint_00000010",
                                                           "checkpoint_00000005"]
    [aside] = run_dir.glob("checkpoint_00000020.corrupt-*")
    assert (aside / "state.pt").stat().st_size == 100  # kept, not deleted
    err = capsys.readouterr().err
    assert f"checkpoint {state} is corrupt" in err and aside.name in err
    record = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    assert [r["checkpoint_dir_name"] for r in record["checkpoint_results"]] == [
        "checkpoint_00000005", "checkpoint_00000010"]
    # A user's loop (no any_checkpoint) resumes from what Ray Train lists: nothing is hashed.
    state = run_dir / "checkpoint_00000010" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with run_dir_held(run_dir, new_run=False, any_checkpoint=False):
        pass
    assert (run_dir / "checkpoint_00000010").is_dir()
    # None verifies: none is set aside, so the loop refuses rather than start from scratch.
    with run_dir_held(run_dir, new_run=False, any_checkpoint=True):
        pass
    assert len(checkpoint_dirs(run_dir)) == 2


def test_a_resumes_launcher_hashes_each_checkpoint_once(tmp_path, monkeypatch):
    """jobs/pretrain.py's resume hashed the newest checkpoints once for the step it resumes
    from (resume_point) and again for the corrupt ones it sets aside (set_aside_corrupt):
    ~18 GiB read twice for gpt2-xl. Inside checkpoint_verdicts_kept each is hashed once while
    its files are unchanged; a file changed since is hashed again."""
    from orchestrator.runs import checkpoint_verdicts_kept, resume_point, set_aside_corrupt
    from orchestrator.training import checkpoint

    run_dir = _logged_run(tmp_path / "run", (10, 20))
    state = run_dir / "checkpoint_00000020" / "state.pt"
    state.write_bytes(state.read_bytes()[:50])  # cut short
    hashed = []
    real = checkpoint.checkpoint_problem
    monkeypatch.setattr(checkpoint, "checkpoint_problem",
                        lambda d: hashed.append(str(d).rsplit("/", 1)[-1]) or real(d))
    with checkpoint_verdicts_kept():
        assert resume_point(run_dir).step == 10
        [line] = set_aside_corrupt(run_dir)
        assert "checkpoint_00000020" in line and "set aside as" in line
        assert hashed == ["checkpoint_00000020", "checkpoint_00000010"]
        old = run_dir / "checkpoint_00000010" / "state.pt"
        old.write_bytes(old.read_bytes()[:50])  # changed since: hashed again
        assert resume_point(run_dir).step == 0
        assert hashed[2:] == ["checkpoint_00000010"]
    resume_point(run_dir)  # outside: nothing kept
    assert hashed[3:] == ["checkpoint_00000010"]


def test_a_resumes_workers_load_the_checkpoint_its_launcher_verified_without_hashing_it(
        tmp_path, monkeypatch):
    """The launcher hashed the newest checkpoint (setting corrupt ones aside) and the loop's
    workers hashed it again before loading it: ~18 GiB read twice for gpt2-xl. The launcher
    passes the one it verified (verified_newest: name and files' identity); a worker loads
    that one, unchanged, without hashing it, and hashes any other or any changed since."""
    from orchestrator.runs import (checkpoint_verdicts_kept, resume_point, still_verified,
                                   verified_newest)
    from orchestrator.training import checkpoint

    run_dir = _logged_run(tmp_path / "run", (10, 20))
    state = run_dir / "checkpoint_00000020" / "state.pt"
    state.write_bytes(state.read_bytes()[:50])  # cut short: set aside, not named
    assert verified_newest(run_dir) is None  # (nothing verified outside a launch)
    with checkpoint_verdicts_kept():
        assert resume_point(run_dir).step == 10
        assert verified_newest(run_dir) is None  # the newest is the corrupt one
        (run_dir / "checkpoint_00000020").rename(run_dir / "aside")
        verified = verified_newest(run_dir)
    good = run_dir / "checkpoint_00000010"
    assert verified["name"] == good.name and still_verified(good, verified)
    hashed = []
    real = checkpoint.sha256_file
    monkeypatch.setattr(checkpoint, "sha256_file", lambda p: hashed.append(p) or real(p))
    assert checkpoint.checkpoint_header(good, verified=still_verified(good, verified))[
        "step"] == 10
    assert hashed == []
    assert not still_verified(run_dir / "aside", verified)
    (good / "state.pt").write_bytes((good / "state.pt").read_bytes())  # rewritten since
    assert not still_verified(good, verified)
    checkpoint.checkpoint_header(good, verified=still_verified(good, verified))
    assert hashed == [good / "state.pt"]
