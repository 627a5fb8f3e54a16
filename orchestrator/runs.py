"""Run directories: where a run's checkpoints, resolved config and summary live.

Layout (Ray Train's, which owns checkpoint storage): <run_dir>/checkpoint_<step>_<UTC time>/
(checkpoint_name) and <run_dir>/checkpoint_manager_snapshot.json; this project adds
config.json, summary.json and metrics.jsonl (every report of rank 0, appended as it
happens: a run's history survives its restarts, where Ray Train's result keeps only the last
report).
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple

from orchestrator.file_lock import claimed
from orchestrator.hf_files import INDEX_FILE, PICKLED_FILE, SAFETENSORS_FILE
from orchestrator.job_exit import (EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED,
                                   EXIT_NOT_PLACEABLE, JobFailed, on_one_line)
from orchestrator.tokenizer import TOKENIZER_FILE
from orchestrator.validation import expand_home, finite_json, python_scalar

METRICS_LOG = "metrics.jsonl"
SUMMARY_FILE = "summary.json"  # jobs/pretrain.py's, at the end of a run
CONFIG_FILE = "config.json"  # jobs/pretrain.py's resolved configs
# How the run's process ended (run_dir_held's, both jobs/pretrain.py and `submit`): its exit
# code and error line; what `logs --follow` stops at. Removed when a run starts in the folder.
ENDED_FILE = "ended.json"

DEFAULT_RUNS_ROOT = Path(os.environ.get("ORCHESTRATOR_RUNS_DIR", "~/orchestrator-runs"))


class RunDirError(ValueError):
    """The run directory cannot be used as asked; the message names it."""


# What append_metrics adds to each report; "non_finite" only to one with a NaN or infinite
# figure, written as null (strict JSON): {name: "nan" | "inf" | "-inf"}, for read_metrics.
LINE_FIELDS = ("time", "checkpoint", "non_finite")


def append_metrics(run_dir: Path, metrics: dict[str, Any], checkpoint: str | None) -> None:
    """One line of metrics.jsonl: the report, when it was written and the checkpoint saved
    with it (None for a metrics-only report). A report's own `time` or `checkpoint` is
    kept as `time_` / `checkpoint_` (it was overwritten; `time__` if it has a `time_` too).
    A run found already complete trained nothing: its report adds nothing to the history.
    The line is strict JSON: a NaN or infinite figure is written as null, and its value
    ("nan", "inf", "-inf") under "non_finite" (a bare NaN made jq and JavaScript reject the
    line); nested in a list or dict, as null alone."""
    if metrics.get("already_complete"):
        return
    line = {key: value for key, value in metrics.items() if key not in LINE_FIELDS}
    for key in LINE_FIELDS:
        if key in metrics:
            renamed = f"{key}_"
            while renamed in line:  # the report's own `time_` keeps its name
                renamed += "_"
            line[renamed] = metrics[key]
    line.update(time=time.time(), checkpoint=checkpoint)
    non_finite = non_finite_figures(line)
    if non_finite:
        line["non_finite"] = non_finite
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(run_dir) / METRICS_LOG, "a+b") as f:  # appends go to the end, seeks or not
        size, torn = f.seek(0, os.SEEK_END), False
        if size:
            f.seek(size - 1)
            torn = f.read(1) != b"\n"
        # After a torn last line (a crash mid-write), a line of its own: appended to the torn
        # one, this report was lost with it.
        text = json.dumps(finite_json(line), default=json_figure, allow_nan=False)
        f.write((b"\n" if torn else b"") + (text + "\n").encode())


def non_finite_figures(line: dict[str, Any]) -> dict[str, str]:
    """{name: "nan" | "inf" | "-inf"} for each of the line's NaN or infinite figures (numpy's
    too), which strict JSON has no number for."""
    figures = ((key, python_scalar(value)) for key, value in line.items())
    return {key: repr(value) for key, value in figures
            if isinstance(value, float) and not math.isfinite(value)}


def json_figure(value: Any) -> Any:
    """json.dumps's fallback for a report's value: a numpy number (or 0-d array) as the number
    it is (an np.int64 step, an np.float32 loss were written as text, "5"), anything else as
    its text."""
    scalar = python_scalar(value)
    return str(value) if scalar is value else finite_json(scalar)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's reports, oldest first; a torn line (a crash mid-write) and a line
    that is not a JSON object (edited by hand, or nested too deeply to decode) are skipped."""
    return read_metrics_from(run_dir, 0)[0]


def read_metrics_from(run_dir: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """The reports metrics.jsonl holds from byte `offset` on (read_metrics's), and the offset
    to read on from next time (`logs --follow`, which re-read the whole file every second):
    past its last whole line, or past a last line not yet ended that already is a report;
    one that is not (mid-write) is read again then. The offset stays where there is no
    file."""
    try:
        with open(Path(run_dir) / METRICS_LOG, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    records, tail = _reports(data[:end]), _reports(data[end:])
    return records + tail, offset + (len(data) if tail else end)


def _reports(data: bytes) -> list[dict[str, Any]]:
    records = []
    for line in data.decode(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # (RecursionError: `[[[...]]]` thousands deep)
            continue
        if isinstance(record, dict):
            records.append(with_non_finite_figures(record))
    return records


def with_non_finite_figures(record: dict[str, Any]) -> dict[str, Any]:
    """A metrics.jsonl record with the figures append_metrics wrote as null (its
    "non_finite") as the floats they were (NaN, inf), as a line from before (a bare NaN,
    which Python's json reads) reads; a hand-edited "non_finite" that is not one is left."""
    noted = record.get("non_finite")
    if not isinstance(noted, dict):
        return record
    try:
        figures = {key: float(text) for key, text in noted.items()
                   if record.get(key) is None and isinstance(text, str)}
    except ValueError:
        return record
    return {key: figures.get(key, value) for key, value in record.items()
            if key != "non_finite"}


class ResumePoint(NamedTuple):
    """Where a --resume of a run goes on from: `step` (0: from no checkpoint the metrics log
    lists that verifies), and (step, why) of each newer logged checkpoint passed over as
    unusable (set aside before the run starts: set_aside_corrupt)."""

    step: int
    unusable: tuple[tuple[int, str], ...] = ()


def checkpoint_identity(directory: str | Path) -> tuple:
    """The files of checkpoint `directory` as they are now: (name, inode, size, mtime_ns) of
    each, by name (() when it cannot be listed). The same identity, the same bytes for all a
    resume's checks are concerned: a file rewritten, cut or replaced changes one of them."""
    try:
        with os.scandir(directory) as entries:
            return tuple(sorted((e.name, e.inode(), e.stat().st_size, e.stat().st_mtime_ns)
                                for e in entries if e.is_file()))
    except OSError:
        return ()


# _checkpoint_problem's verdicts, by directory: (identity, problem or None); kept only inside
# checkpoint_verdicts_kept (one launch's checks), else None.
_VERDICTS: dict[str, tuple[tuple, str | None]] | None = None


@contextlib.contextmanager
def checkpoint_verdicts_kept() -> Iterator[None]:
    """Within it each checkpoint is hashed once while its files keep their identity
    (checkpoint_identity): a resume's launcher asks for the same checkpoints twice (the step
    it resumes from: resume_point; the corrupt ones it sets aside: set_aside_corrupt), which
    read ~18 GiB each time for a gpt2-xl checkpoint."""
    global _VERDICTS
    outer = _VERDICTS
    _VERDICTS = {} if outer is None else outer
    try:
        yield
    finally:
        _VERDICTS = outer


def _checkpoint_problem(directory: str | Path) -> str | None:
    """checkpoint_problem, said again without hashing inside checkpoint_verdicts_kept for a
    checkpoint whose files have not changed since."""
    from orchestrator.training.checkpoint import checkpoint_problem  # (torch: imported late)

    if _VERDICTS is None:
        return checkpoint_problem(directory)
    identity = checkpoint_identity(directory)
    known = _VERDICTS.get(str(directory))
    if identity and known is not None and known[0] == identity:
        return known[1]
    problem = checkpoint_problem(directory)
    if identity:
        _VERDICTS[str(directory)] = (identity, problem)
    return problem


def verified_newest(run_dir: Path) -> dict[str, Any] | None:
    """The run's newest checkpoint when checkpoint_verdicts_kept found its files whole and
    they are unchanged: {"name", "identity"} (checkpoint_identity, as lists), what the
    resume's workers pass to still_verified to load it without hashing it again; else None."""
    newest = checkpoint_dirs(run_dir)[:1]
    known = _VERDICTS.get(str(newest[0])) if newest and _VERDICTS is not None else None
    if known is None or known[1] is not None or known[0] != checkpoint_identity(newest[0]):
        return None
    return {"name": newest[0].name, "identity": [list(f) for f in known[0]]}


def still_verified(directory: str | Path, verified: dict[str, Any] | None) -> bool:
    """Whether `directory` is the checkpoint verified_newest named, its files unchanged."""
    return (isinstance(verified, dict) and Path(directory).name == verified.get("name")
            and [list(f) for f in checkpoint_identity(directory)] == verified.get("identity"))


def resume_point(run_dir: Path) -> ResumePoint:
    """The step a --resume of the run goes on from: its metrics log's last checkpoint that
    is still there (a run stopped before its end; one an operator deleted to roll back does
    not count) and whose files verify (checkpoint_problem: the loop falls back past a
    damaged one, and the launcher sets it aside), or, where the log records no checkpoint,
    its summary's. Within checkpoint_verdicts_kept, set_aside_corrupt then finds the same
    verdicts without hashing them again."""
    logged = [r for r in read_metrics(run_dir) if isinstance(r.get("checkpoint"), str)]
    if not logged:
        summary = Path(run_dir) / SUMMARY_FILE
        try:
            steps = json.loads(summary.read_text()).get("steps")
        except FileNotFoundError:
            return ResumePoint(0)
        except (OSError, ValueError, AttributeError) as e:
            raise RunDirError(f"cannot read {summary}: {e}") from None
        return ResumePoint(steps if isinstance(steps, int) and not isinstance(steps, bool)
                           else 0)
    # (the checkpoints still there: a finished run rolled back trains again)
    there = sorted({(r["step"], str(path)) for r in logged
                    if isinstance(r.get("step"), int) and not isinstance(r["step"], bool)
                    and (path := _logged_checkpoint(run_dir, r["checkpoint"])) is not None
                    and path.exists()},
                   reverse=True)
    unusable: list[tuple[int, str]] = []
    for step, checkpoint in there:
        problem = _checkpoint_problem(checkpoint)
        if problem is None:
            return ResumePoint(step, tuple(unusable))
        unusable.append((step, problem))
    return ResumePoint(0, tuple(unusable))


def _logged_checkpoint(run_dir: Path, logged: str) -> Path | None:
    """Where a checkpoint the metrics log names is now: the run directory's own of that name
    (None where the log names none). The log holds absolute paths, and the run directory may
    have been moved, or its share mounted elsewhere, since; every checkpoint of a run is in
    its run directory (Ray Train's storage is the directory's parent, the run's name its
    own), so one gone from there is gone, whatever the logged path still holds (a copied
    run's original, or a new run where the moved one was)."""
    name = Path(logged).name  # ("" for "" or "/": no name to look for)
    return Path(run_dir) / name if name else None


def has_checkpoints(run_dir: Path) -> bool:
    return bool(checkpoint_dirs(run_dir))  # none in a missing directory or a file


CHECKPOINT_PREFIX = "checkpoint_"
_STEP_NAMED = re.compile(rf"{CHECKPOINT_PREFIX}(\d+)(?:_(.*))?$")
CHECKPOINT_TIME = "%Y-%m-%d_%H-%M-%S.%f"  # (UTC) in checkpoint_name, read by checkpoint_written


def checkpoint_name(step: int, written_at: float | None = None) -> str:
    """A checkpoint directory's name: checkpoint_<step:08d>, and for Ray Train's (which may
    write a step twice: a resume before an unregistered checkpoint of a later step) the UTC
    time after it. The step leads so that name order is training order whatever the clocks
    of the nodes rank 0 ran on (Ray's own checkpoint_<local time> went back when rank 0 moved
    to a node in another time zone, or the clock was stepped back)."""
    name = f"{CHECKPOINT_PREFIX}{int(step):08d}"
    if written_at is None:
        return name
    stamp = dt.datetime.fromtimestamp(written_at, dt.timezone.utc)
    return f"{name}_{stamp.strftime(CHECKPOINT_TIME)}"


def checkpoint_age(path: str | Path) -> tuple:
    """Sort key, oldest first: by step, then by the time in the name (checkpoint_name's),
    after every checkpoint named by Ray Train's default checkpoint_<local time> (runs from
    before steps led the name: older than any step-named one in the same run, and in name
    order among themselves)."""
    name = Path(path).name
    step_named = _STEP_NAMED.match(name)
    if step_named is None:
        return (0, 0, name)
    return (1, int(step_named.group(1)), step_named.group(2) or "")


CORRUPT = "corrupt"  # checkpoint_<...>.corrupt-<time>: one a resume set aside (set_aside_corrupt)


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """A run directory's checkpoint_* directories, newest first (checkpoint_age); not those
    set aside as corrupt."""
    return sorted((p for p in Path(run_dir).glob(f"{CHECKPOINT_PREFIX}*")
                   if f".{CORRUPT}-" not in p.name and p.is_dir()),
                  key=checkpoint_age, reverse=True)


def set_aside_corrupt(run_dir: Path) -> list[str]:
    """Before a resume of pretrain's loop: each checkpoint newer than the newest one whose
    files verify (checkpoint_problem) renamed `<name>.corrupt-<time>` beside it (kept, not
    deleted), and a line naming each. The loop would fall back past it, but Ray Train's
    retention counts checkpoints in the order they were reported: a corrupt one stayed, and
    the good one the run resumed from was pruned in its place. Those older than the newest
    good one are not read. With none that verifies nothing is renamed: the loop refuses to
    start over (no usable checkpoint), naming them, where set aside it would have started
    from scratch."""
    corrupt = []
    for directory in checkpoint_dirs(run_dir):
        problem = _checkpoint_problem(directory)
        if problem is None:
            break
        corrupt.append((directory, problem))
    else:
        return []
    return [f"{problem}: set aside as {_kept_beside(directory, CORRUPT).name} "
            "(keep_checkpoints never keeps it in place of a good one; delete it once looked "
            "at)" for directory, problem in corrupt]


RAY_CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"


def unregistered_checkpoints_warning(run_dir: Path, any_checkpoint: bool) -> str | None:
    """Checkpoints of `run_dir` that Ray Train's record does not list, or None. A run stopped
    (Ctrl-C) while its workers reported writes checkpoints Ray Train never registers, which
    its keep_checkpoints never prunes. `any_checkpoint`: the resume takes the newest that
    verifies, listed or not (pretrain's loop); else ray.train.get_checkpoint() gives the
    newest listed (a user's loop). None too when the record cannot be read
    (repair_ray_record says so)."""
    written = checkpoint_dirs(run_dir)
    if not written:
        return None
    registered = _registered_checkpoints(run_dir)
    if registered is None:
        return None
    unregistered = [d.name for d in written if d.name not in registered]
    if not unregistered:
        return None
    resume = ("the resume takes the newest checkpoint that verifies, listed or not"
              if any_checkpoint else
              "the resume starts from the newest it lists (ray.train.get_checkpoint()), "
              "or from scratch when it lists none")
    return (f"{len(unregistered)} checkpoint(s) not in Ray Train's record (a run stopped "
            f"while it reported them: {', '.join(unregistered)}): {resume}; each is deleted "
            "once keep_checkpoints listed ones are newer, at the end of a run (never where "
            "keep_checkpoints is null/None: every one is kept)")  # (the warning cannot know it)


def remove_failed_uploads(run_dir: Path) -> list[str]:
    """Remove the run's empty checkpoint directories that Ray Train's record does not list,
    and return their names: an upload that failed (the loop's folder removed before its
    report: Ray Train made the folder, copied nothing and never registered it). Left, it was
    taken for a checkpoint: the error said "checkpoints so far are in <run dir>", submitting
    the job again was refused as holding checkpoints, and --resume started from scratch. One
    the record lists stays (a loop may save an empty folder); nothing is removed when the
    record cannot be read."""
    registered = _registered_checkpoints(Path(run_dir))
    removed = []
    for directory in checkpoint_dirs(run_dir) if registered is not None else ():
        if directory.name not in registered:
            try:
                directory.rmdir()  # (only when empty)
                removed.append(directory.name)
            except OSError:
                pass
    return removed


def prune_unlisted_checkpoints(run_dir: Path, keep: int | None) -> list[str]:
    """Remove each checkpoint Ray Train's record does not list (a run stopped by Ctrl-C as
    its workers saved it) that has at least `keep` listed checkpoints newer than it, and
    return their names: listed, Ray Train's keep_checkpoints would have pruned it, and
    unlisted it was never pruned (one more to delete by hand per Ctrl-C). One newer than
    those (what a resume takes) stays; nothing goes for `keep` None (keep every one) or
    when the record cannot be read."""
    registered = _registered_checkpoints(Path(run_dir))
    if keep is None or not registered:
        return []
    removed, listed_newer = [], 0
    for directory in checkpoint_dirs(run_dir):  # newest first
        if directory.name in registered:
            listed_newer += 1
        elif listed_newer >= keep:
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(directory.name)
    return removed


def _registered_checkpoints(run_dir: Path) -> set[str] | None:
    """The checkpoint names Ray Train's record of the run lists (none when it has no record:
    stopped before Ray Train recorded any checkpoint); None when it cannot be read."""
    try:
        snapshot = json.loads((run_dir / RAY_CHECKPOINT_SNAPSHOT).read_text())
        return {r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]}
    except FileNotFoundError:
        return set()
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None


def repair_ray_record(run_dir: Path, any_checkpoint: bool) -> str | None:
    """Before a resume: Ray Train's record of the run's checkpoints
    (checkpoint_manager_snapshot.json) made to agree with the checkpoint directories, and
    what was done (None: nothing to do). Ray Train's controller refuses a record naming a
    checkpoint that is gone (an operator deleted the newest to roll back), one it cannot
    parse (a crash or a full disk mid-write: Ray writes it in place) or one another Ray
    version wrote, and only after the job was placed, as a failure with restarts that never
    happened. Names of checkpoints that are gone are dropped from it, the original kept beside
    it. A record Ray cannot read is set aside when the resume does not need it
    (`any_checkpoint`: pretrain's loop takes the newest checkpoint that verifies); a user's
    loop resumes from what it lists, so there RunDirError names it."""
    path = Path(run_dir) / RAY_CHECKPOINT_SNAPSHOT
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        problem = _other_ray_version(record)
        if problem is None:
            # Ray's own test (_assert_checkpoints_exist): the name exists in the directory,
            # whatever it is called (a user's loop may name its checkpoints as it likes)
            repaired, gone = _without_checkpoints_gone(
                record, lambda name: (Path(run_dir) / name).exists())
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        problem = f"cannot be read ({type(e).__name__}: {e})"
    if problem is not None:
        if not any_checkpoint:
            raise RunDirError(f"Ray Train's record of the run's checkpoints {path} {problem}: "
                              "your loop resumes from what it lists (ray.train.get_checkpoint"
                              "()); restore it, or move it aside to start the loop from "
                              "scratch")
        kept = _kept_beside(path, "unreadable")
        return (f"Ray Train's record {path} {problem}: set aside as {kept.name}; the run "
                "resumes from its newest checkpoint that verifies, and keep_checkpoints no "
                "longer prunes the checkpoints before it")
    if not gone:
        return None
    kept = _kept_beside(path, "before-repair", copy=True)
    from orchestrator.training.checkpoint import write_atomically
    write_atomically(path, lambda f: f.write(json.dumps(repaired).encode()),
                     what="Ray Train's record")
    return (f"Ray Train's record {path} named checkpoint(s) no longer there "
            f"({', '.join(gone)}): dropped from it (the original kept as {kept.name})")


def _other_ray_version(record: dict) -> str | None:
    """Why Ray Train would refuse a record written by another Ray version, or None."""
    from importlib.metadata import version

    written_by, installed = record.get("ray_version"), version("ray")
    if written_by == installed:
        return None
    return f"was written by Ray {written_by}, which Ray {installed} refuses"


def _without_checkpoints_gone(record: dict, present: Callable[[str], bool]
                              ) -> tuple[dict, list[str]]:
    """Ray Train 2.60's record (CheckpointManager._save_state) without the checkpoints whose
    name is not `present`, and their names. Its parallel lists stay parallel; the latest
    becomes the remaining checkpoint reported last."""
    def kept(state: dict) -> bool:
        return present(state["checkpoint_dir_name"])

    results = list(zip(record["checkpoint_results"], record["checkpoint_report_indices"],
                       strict=True))
    gone = [r["checkpoint_dir_name"] for r, _ in results if not kept(r)]
    pending = list(zip(record["pending_training_results"], record["pending_validation_specs"],
                       strict=True))
    if not gone and all(kept(r) for r, _ in pending):
        return record, []
    results = [(r, i) for r, i in results if kept(r)]
    pending = [(r, spec) for r, spec in pending if kept(r)]
    latest = record.get("latest_checkpoint_result")
    if latest is not None and not kept(latest):
        latest = max(results, key=lambda pair: pair[1])[0] if results else None
    repaired = {**record,
                "checkpoint_results": [r for r, _ in results],
                "checkpoint_report_indices": [i for _, i in results],
                "latest_checkpoint_result": latest,
                "pending_training_results": [r for r, _ in pending],
                "pending_validation_specs": [spec for _, spec in pending]}
    for field in ("validated_checkpoint_dir_names", "timed_out_validation_checkpoint_dir_names",
                  "failed_validation_checkpoint_dir_names"):
        if field in record:
            repaired[field] = [name for name in record[field] if present(name)]
    return repaired, gone


def _kept_beside(path: Path, why: str, copy: bool = False) -> Path:
    """`path` renamed (or copied) to `<name>.<why>-<time>` beside it; RunDirError naming it
    when that fails."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    target, n = path.with_name(f"{path.name}.{why}-{stamp}"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.{why}-{stamp}-{n}")
    try:
        if copy:
            target.write_bytes(path.read_bytes())
        else:
            path.rename(target)
    except OSError as e:
        raise RunDirError(f"cannot keep {path} as {target.name}: {e.strerror or e}") from None
    return target


def set_aside_earlier_history(run_dir: Path) -> list[Path]:
    """Before a new run (not a resume) in `run_dir`: an earlier run's metrics.jsonl and
    summary.json, left by a run that stopped before its first checkpoint (one with checkpoints
    is refused), renamed `<name>.before-<its time>.<ext>`, with the config.json and
    tokenizer.json they belong to (the new run writes its own). The new run's reports were
    appended to that history: `logs` showed two runs as one, steps 1.. twice. Ray Train's
    record of the earlier run's checkpoints goes too: one naming checkpoints that are gone
    stopped the new run's controller from starting. Returns the new names."""
    if not any((run_dir / name).is_file()
               for name in (METRICS_LOG, SUMMARY_FILE, RAY_CHECKPOINT_SNAPSHOT)):
        return []  # no history: a config.json alone is only replaced
    moved = []
    for name in (METRICS_LOG, SUMMARY_FILE, ENDED_FILE, CONFIG_FILE, TOKENIZER_FILE,
                 RAY_CHECKPOINT_SNAPSHOT):
        path = run_dir / name
        if not path.is_file():
            continue
        stamp = dt.datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y%m%d-%H%M%S")
        target, n = path.with_name(f"{path.stem}.before-{stamp}{path.suffix}"), 1
        while target.exists():
            n += 1
            target = path.with_name(f"{path.stem}.before-{stamp}-{n}{path.suffix}")
        try:
            path.rename(target)
        except OSError as e:
            raise RunDirError(f"cannot set aside the earlier run's {path} before a new run "
                              f"in {run_dir}: {e.strerror or e}") from None
        moved.append(target)
    return moved


RUN_LOCK = ".run.lock"  # held (file_lock) by the process running a run, for the run's life


@contextlib.contextmanager
def run_dir_held(run_dir: Path, new_run: bool, written: Iterable[str] = (),
                 any_checkpoint: bool = False) -> Iterator[None]:
    """This process's claim on `run_dir` while its run runs: a second run started in the same
    directory meanwhile is refused (RunDirError naming the holder). Two launches without
    --address start two embedded Rays, whose schedulers know nothing of each other: both
    trained into one directory. On a filesystem without flock the run goes on unguarded
    (said). `new_run` (not a resume): an earlier run's history is set aside first, and said
    (set_aside_earlier_history); a resume repairs Ray Train's record of the checkpoints and
    says which it does not list (repair_ray_record, unregistered_checkpoints_warning;
    `any_checkpoint`: the run's loop resumes from any checkpoint that verifies). When the
    block ends in a refusal that started nothing (a JobFailed of bad input or not placeable
    whose job never ran, or a RunDirError: a write of the caller's failed), the folder is put
    back as it was (FolderClaim): a refused run leaves nothing behind and changes
    nothing it found."""
    with folder_claimed(run_dir, RUN_LOCK,
                        busy=lambda holder: RunDirError(
                            f"run dir {run_dir} is in use by another run ({holder}); wait "
                            "for it to end, or use another run dir or job name"),
                        cannot=lambda why: RunDirError(f"cannot lock run dir {run_dir}: {why}")
                        ) as claim:
        if claim.unguarded:
            print(f"warning: cannot lock run dir {run_dir} ({claim.unguarded}): a second run "
                  "started in it meanwhile would not be refused, and a refused run leaves "
                  "what it wrote (another run's files could be among them)", file=sys.stderr)
        if new_run:
            _say_set_aside(set_aside_earlier_history(run_dir))
        else:  # (under the lock: never the record of a run training there now)
            _say_before_resume(run_dir, any_checkpoint)
        # What a refusal puts back: the folder as it is now, its history set aside or its
        # record repaired (expected, kept), under the lock (no other run's files in it).
        claim.snapshot({*written, ENDED_FILE})  # (an earlier run's end: put back if refused)
        (run_dir / ENDED_FILE).unlink(missing_ok=True)  # this run has not ended
        ended: tuple[int, str | None] = (EXIT_FAILED, None)
        try:
            yield
            ended = (0, None)
        except JobFailed as e:
            claim.refused = (e.exit_code in (EXIT_BAD_INPUT, EXIT_NOT_PLACEABLE)
                             and not getattr(e, "ran", False))
            # (one line, as the docs promise: a failed training's message is two, what
            # failed and where its checkpoints are, and `logs --follow` split it)
            ended = (e.exit_code, on_one_line(str(e)))
            raise
        except RunDirError:
            claim.refused = True
            raise
        except KeyboardInterrupt as e:  # Ctrl-C in the queue: as refused, unless it ran
            claim.refused = not getattr(e, "ran", True)
            ended = (EXIT_INTERRUPTED, "interrupted (Ctrl-C)")
            raise
        except BaseException as e:  # (a traceback: exit 1)
            ended = (1, f"{type(e).__name__}: {on_one_line(str(e))}")
            raise
        finally:
            if not claim.refused:
                _write_run_end(run_dir, *ended)


def _write_run_end(run_dir: Path, exit_code: int, error: str | None) -> None:
    """ENDED_FILE, best effort (the job's own outcome is what its user must see)."""
    from orchestrator.training.checkpoint import CheckpointError, write_json

    try:
        write_json(run_dir / ENDED_FILE, {"exit_code": exit_code, "error": error,
                                          "time": time.time()})
    except (CheckpointError, OSError):
        pass


def run_end(run_dir: Path) -> dict[str, Any] | None:
    """How the run in `run_dir` ended ({"exit_code", "error", "time"}), or None while it has
    not (running, not started, or a process killed outright: no record then)."""
    try:
        record = json.loads((Path(run_dir) / ENDED_FILE).read_text())
    except (OSError, ValueError):
        return None
    code = record.get("exit_code") if isinstance(record, dict) else None
    if not isinstance(code, int) or isinstance(code, bool):
        return None
    return record


def remove_dir_if_only(run_dir: Path, names: set[str]) -> None:
    """Remove `run_dir` if it holds nothing but `names` (the lock's file too: its holder is
    this process, which is done with it). Best effort: the job's own error is what the user
    must see, not a cleanup's. (Also the compression pipeline's, for its --out.)"""
    try:
        if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= names:
            for name in names:
                (run_dir / name).unlink(missing_ok=True)
            run_dir.rmdir()
    except OSError:
        pass


def _say_before_resume(run_dir: Path, any_checkpoint: bool) -> None:
    """Repair Ray Train's record of the checkpoints and say what the resume will find (once
    the record is set aside, no checkpoint is listed: nothing more worth saying). For
    pretrain's loop (`any_checkpoint`) corrupt newest checkpoints are set aside first
    (set_aside_corrupt), so the repair drops them from the record."""
    for line in set_aside_corrupt(run_dir) if any_checkpoint else ():
        print(f"warning: resume: {line}", file=sys.stderr)
    repaired = repair_ray_record(run_dir, any_checkpoint)
    if repaired:
        print(f"warning: resume: {repaired}", file=sys.stderr)
    unlisted = ((run_dir / RAY_CHECKPOINT_SNAPSHOT).is_file() or not repaired) and \
        unregistered_checkpoints_warning(run_dir, any_checkpoint)
    if unlisted:
        print(f"warning: resume: {unlisted}", file=sys.stderr)


def _say_set_aside(moved: list[Path]) -> None:
    """Tell the user where set_aside_earlier_history put the earlier run's files."""
    if moved:
        print(f"note: a new run in {moved[0].parent}: the earlier run's "
              f"{', '.join(p.name for p in moved)} kept beside it (it stopped before its first "
              "checkpoint)", file=sys.stderr)


def new_run_dir(root: Path, prefix: str, now: dt.datetime) -> Path:
    """A run directory that does not exist yet (two runs in the same second get -2, -3...)."""
    base = root.expanduser().resolve() / f"{prefix}-{now:%Y%m%d-%H%M%S}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def latest_run_with_checkpoints(root: Path, prefix: str = "") -> Path | None:
    """The directory under `root` whose newest checkpoint was written last (checkpoint_written;
    then by name); with `prefix`, only runs named `<prefix>-...` (what `new_run_dir` names
    them): `pretrain --resume` went on with a job file's run (~/orchestrator-runs/<job name>)
    it had never written. Not the run directory's own time: anything that adds or removes a
    file there changes it (a refused run's lock, a --dry-run's write check), and so made an
    older run the one --resume continued and `serve run` served."""
    root = root.expanduser()
    runs = [(max(checkpoint_written(c) for c in checkpoints), p.name, p)
            for p in (root.glob(f"{prefix}-*" if prefix else "*") if root.is_dir() else ())
            if (checkpoints := checkpoint_dirs(p))]
    return max(runs, key=lambda run: run[:2])[2].resolve() if runs else None


def checkpoint_written(path: Path) -> float:
    """When checkpoint `path` was written: the UTC time in its name (Ray Train's,
    checkpoint_name), else its directory's time. The name's first: a run copied with `cp -r`
    or restored from a backup has the copy's directory times, and such a copy of an older
    run was taken for the run that trained last."""
    step_named = _STEP_NAMED.match(path.name)
    if step_named and step_named.group(2):
        try:
            return dt.datetime.strptime(step_named.group(2), CHECKPOINT_TIME).replace(
                tzinfo=dt.timezone.utc).timestamp()
        except ValueError:  # (not checkpoint_name's: the directory's time, then)
            pass
    try:
        return path.stat().st_mtime
    except OSError:  # (removed since it was listed: a run pruning it)
        return 0.0


def writable_dir_problem(path: Path) -> str | None:
    """Why a file cannot be written in directory `path` (made if missing, then removed
    again with the parents made for it), or None. Asked before Ray starts: a run dir or
    data cache under /proc, or a file where a directory belongs, failed as a traceback once
    the data had been tokenized."""
    made: list[Path] = []
    probe = path / f".write-check-{os.getpid()}"
    try:
        parent = path
        while not parent.exists() and parent != parent.parent:
            made.append(parent)
            parent = parent.parent
        if path.exists() and not path.is_dir():
            return "it is a file, not a directory"
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        named = e.filename and str(e.filename) not in (str(path), str(probe))
        return f"{e.strerror or e}" + (f" ({e.filename})" if named else "")
    finally:
        for directory in made:  # deepest first: only what this check made
            try:
                directory.rmdir()
            except OSError:
                pass
    return None


def out_file(value: str | Path, flag: str) -> tuple[Path, str | None]:
    """A file flag's path, a leading `~` read as home (`--out=~/x.json`: the shell leaves
    that ~ as written), and why it cannot be written (writable_file_problem), or None."""
    try:
        path = expand_home(value, flag)
    except ValueError as e:
        return Path(value), str(e)
    return path, writable_file_problem(path)


def writable_file_problem(path: Path) -> str | None:
    """Why file `path` cannot be written (its directory is not made), or None. Asked before
    the work whose figures it would hold: a benchmark's --out naming a directory, or a
    missing one, failed as a traceback (or a line naming no flag) once the work was done."""
    if path.is_dir():
        return "it is a directory"
    if not path.parent.is_dir():
        return f"{path.parent} is not a directory"
    return writable_dir_problem(path.parent)


def in_rays_working_dir_copy(path: Path) -> bool:
    """Whether `path` lies in Ray's temporary copy of a job's working directory
    (`.../runtime_resources/working_dir_files/_ray_pkg_<hash>/`, under `ray job submit
    --working-dir`): run directories there are lost to Ray's package cache cleanup, and a code
    change (a new copy) leaves --resume nothing to find."""
    parts = Path(path).resolve().parts
    return any(a == "runtime_resources" and b == "working_dir_files" and c.startswith("_ray_pkg_")
               for a, b, c in zip(parts, parts[1:], parts[2:]))


def run_dir_uri_problem(run_dir: str) -> str | None:
    """Why `run_dir` cannot be a run directory when it is a URI (s3://, gs://): runs write
    their config, metrics, lock and checkpoints with local file operations, so it became a
    directory named `s3:` under the working directory, which a submitted job's is temporary."""
    if "://" in run_dir:
        return (f"{run_dir} is a URI; a run directory must be a path every node can reach "
                "(shared storage mounted on each, such as NFS)")
    return None


def resolve_run_dir(run_dir: str | None, resume: bool, root: Path, prefix: str,
                    now: dt.datetime) -> Path:
    """The run directory to use, refusing combinations that would lose or mix up work:
    resuming where there is nothing to resume, or silently continuing an old run."""
    if run_dir is None:
        if not resume:
            path = new_run_dir(root, prefix, now)
            problem = writable_dir_problem(path)
            if problem:
                raise RunDirError(f"cannot write to run dir {path} (under the runs root, "
                                  f"ORCHESTRATOR_RUNS_DIR): {problem}")
            return path
        latest = latest_run_with_checkpoints(root, prefix)
        if latest is None:
            raise RunDirError(f"--resume: no {prefix}-* run with checkpoints under "
                              f"{root.expanduser()}; pass --run-dir of the run to continue")
        return latest
    if not str(run_dir).strip():  # Path("") is the current directory: the run went there
        raise RunDirError("--run-dir is empty: give a path, or leave the flag out (a new run "
                          "under the runs root)")
    uri_problem = run_dir_uri_problem(str(run_dir))
    if uri_problem:
        raise RunDirError(f"--run-dir {uri_problem}")
    given = expand_home(run_dir, "--run-dir", RunDirError)
    if not given.is_absolute() and in_rays_working_dir_copy(Path.cwd()):
        raise RunDirError(f"--run-dir {run_dir} is relative to the working directory, which is "
                          "Ray's temporary copy of it (ray job submit --working-dir): give an "
                          "absolute path, on storage every node reaches")
    path = given.resolve()
    problem = writable_dir_problem(path)  # first: a file, or a path it cannot even look at
    if problem:
        raise RunDirError(f"cannot write to run dir {path}: {problem}")
    if resume and not has_checkpoints(path):
        raise RunDirError(f"--resume: no checkpoint in run dir {path}")
    if not resume and has_checkpoints(path):
        raise RunDirError(f"run dir {path} already holds checkpoints from an earlier run; "
                          "pass --resume to continue it, or choose another --run-dir")
    return path


class FolderClaim:
    """A folder a run claims by its lock file (a run's run dir, a compression's --out), and
    what to put back if the run is refused (`refused`, set by the claimant). snapshot(written)
    records what the folder holds once the claimant has done its own preparations (an earlier
    run's history set aside: kept); after a refusal the names the run added of the lock and
    `written` are removed, the files of those it replaced written back (a refused --resume's
    config.json, with the refused flags the next --resume would inherit), and the folder
    removed where the run made it. Only while the folder holds nothing else new: a run that
    got as far as checkpoints or metrics (exit 3 after training: a cancel, a lost node
    without room) keeps all it wrote. Nothing is put back where flock is refused
    (`unguarded`: another run's files could be among them). Best effort, as
    remove_dir_if_only: the job's own error is what the user must see."""

    def __init__(self, folder: Path, lock: str) -> None:
        self.folder, self.lock = folder, lock
        self.made, self.lock_added = not folder.exists(), not (folder / lock).exists()
        self.unguarded: str | None = None  # why flock is refused, once claimed
        self.refused = False
        self._names: set[str] | None = None  # None: no snapshot, nothing to put back

    def snapshot(self, written: Iterable[str]) -> None:
        if self.unguarded:
            return
        new = {self.lock} if self.lock_added else set()
        self._names = {self.lock, *written}
        self._before = {p.name for p in self.folder.iterdir()} - new
        self._contents = {name: (self.folder / name).read_bytes()
                          for name in self._names - new if (self.folder / name).is_file()}

    def put_back(self) -> None:
        if not self.refused or self._names is None:
            return
        try:
            now = {p.name for p in self.folder.iterdir()} if self.folder.is_dir() else set()
            if not now <= self._before | self._names:
                return  # the run produced more than its caller's files: it is kept
            if self.made:
                remove_dir_if_only(self.folder, self._names)
                return
            for name in self._names - self._before:
                (self.folder / name).unlink(missing_ok=True)
            for name, data in self._contents.items():
                # (one the run removed, an earlier run's ended.json, is written back too:
                # its read failed, and ended the putting back of the rest)
                path = self.folder / name
                if not path.is_file() or path.read_bytes() != data:
                    path.write_bytes(data)
        except OSError:
            pass


@contextlib.contextmanager
def folder_claimed(folder: Path, lock: str, busy: Callable[[str], Exception],
                   cannot: Callable[[str], Exception]) -> Iterator[FolderClaim]:
    """The flock on `folder`/`lock` for the block (file_lock.claimed: busy(holder),
    cannot(reason) as the caller's errors), with the FolderClaim whose put_back runs once
    the lock's file is closed (NFS keeps an open one as .nfsXXXX)."""
    claim = FolderClaim(folder, lock)
    try:
        with claimed(folder / lock, busy=busy, cannot=cannot) as state:
            claim.unguarded = state.unsupported
            yield claim
    finally:
        claim.put_back()


# What other jobs leave in a folder, which a run there would overwrite or mix its files with
# (the config.json beside them, a run's tokenizer.json): a Hugging Face model (jobs/export.py's,
# or one downloaded), a compression's --out (orchestrator/compression/pipeline.py's
# CONFIG_FILE).
COMPRESS_CONFIG_FILE = "compress_config.json"  # (compression.pipeline.CONFIG_FILE)
OTHER_JOBS_FILES = {SAFETENSORS_FILE: "a Hugging Face model's weights",
                    INDEX_FILE: "a Hugging Face model's shard index",
                    PICKLED_FILE: "a Hugging Face model's weights",
                    COMPRESS_CONFIG_FILE: "a jobs/compress.py --out's settings"}
# What each finished jobs/compress.py stage folder (original/, distilled/, pruned/, qat/)
# holds (compression.pipeline's WEIGHTS_FILE, STAGE_FILE).
COMPRESS_WEIGHTS_FILE, COMPRESS_STAGE_FILE = "weights.pt", "stage.json"


def compress_stage(directory: Path) -> tuple[Path, str] | None:
    """Where `directory` is a jobs/compress.py stage folder (its weights.pt and stage.json,
    not a checkpoint any job loads): (the compress --out it lies in, the training checkpoint
    that output was compressed from, as its compress_config.json records it, or words saying
    where to find it); else None."""
    if not ((directory / COMPRESS_WEIGHTS_FILE).is_file()
            and (directory / COMPRESS_STAGE_FILE).is_file()):
        return None
    return directory.parent, compressed_from(directory.parent)


def compressed_from(out: Path) -> str:
    """The training checkpoint the compress --out `out` was compressed from, as its
    compress_config.json records it, or words saying where to find it."""
    try:
        source = json.loads((out / COMPRESS_CONFIG_FILE).read_text())["source"]["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        source = None
    return (str(source) if isinstance(source, str) and source
            else f"the one {out / COMPRESS_CONFIG_FILE} records under source")


def compress_stage_problem(directory: Path, label: str, advice: str) -> str | None:
    """What `directory` (`label` names its flag) is, where it is a compress stage folder, with
    `advice`, formatted with {out} (the compress --out) and {source} (its teacher checkpoint);
    None where it is not one."""
    stage = compress_stage(directory)
    if stage is None:
        return None
    out, source = stage
    return (f"{label} {directory} is a jobs/compress.py stage folder ({directory.name}/: "
            f"{COMPRESS_WEIGHTS_FILE}, {COMPRESS_STAGE_FILE}), not a model checkpoint: "
            + advice.format(out=out, source=source))


RUN_CONFIG_SECTIONS = ("train", "job")  # what jobs/pretrain.py writes in a run's config.json
# What a config.json of another kind says it is (jobs/export.py's, a compression's export).
CONFIG_MARKS = ("exported_by", "model_type", "format")


def not_a_run_dirs_files(run_dir: Path) -> list[str]:
    """What an existing `run_dir` holds that no run put there and a new run would overwrite
    or mix with, each with what it is; [] for a run directory, an empty or missing folder.
    `pretrain.py --run-dir` at a Hugging Face export (meant --init-from) replaced its
    config.json and tokenizer.json with the run's, even when the run was then refused."""
    if not run_dir.is_dir():
        return []
    found = []
    # A folder with checkpoints or a run's lock is a run's, whatever its config.json (the
    # first layout's had no sections; a write that failed left tokenizer.json alone).
    ours = has_checkpoints(run_dir) or (run_dir / RUN_LOCK).exists()
    config = None if ours else _not_a_runs_config(run_dir / CONFIG_FILE)
    if config:
        found.append(config)
    elif (not ours and not (run_dir / CONFIG_FILE).exists()
          and (run_dir / TOKENIZER_FILE).exists()):
        found.append(f"{TOKENIZER_FILE} without a run's {CONFIG_FILE}")
    found += [f"{name} ({what})" for name, what in OTHER_JOBS_FILES.items()
              if (run_dir / name).exists()]
    return found


def _not_a_runs_config(path: Path) -> str | None:
    """`path` (a config.json) described, when it is not a run's: one without the train and
    job sections jobs/pretrain.py writes, with what it says it is. None when it is a run's,
    or there is none."""
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        return f"{CONFIG_FILE} that is not a run's (unreadable: {e})"
    if isinstance(saved, dict) and any(section in saved for section in RUN_CONFIG_SECTIONS):
        return None
    marks = [f"{key} {saved[key]!r}" for key in CONFIG_MARKS
             if isinstance(saved, dict) and key in saved]
    return (f"{CONFIG_FILE} without a run's train and job sections"
            + (f" ({', '.join(marks)})" if marks else ""))
