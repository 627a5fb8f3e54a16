"""Job traces for the simulator: the canonical CSV and the Philly trace.

Canonical CSV (header required, columns in any order):

    submit_time_s   seconds since the trace start (float >= 0)
    duration_s      run time on the reference GPU type, all GPUs on one server (float > 0)
    num_gpus        GPUs the job uses (integer >= 1)
    model_type      optional: a Gavel job type ("ResNet-50 (batch size 64)"); empty = by GPU-hours
    accelerator     optional: the only GPU family the job may run on ("V100"); empty = any

Any other column, a missing required column, or a malformed row raises TraceError naming the
file and the line. Nothing is dropped: jobs that cannot fit the modelled cluster are counted and
reported by the simulator.

Philly (`data/philly.csv`): timestamp, duration, num_gpus, gpu_time, cluster; submit times are
made relative to the first job.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from orchestrator.cluster_model import GAVEL_JOB_TYPES
from orchestrator.config import ACCELERATOR_FAMILIES

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
PHILLY_CSV = DATA_DIR / "philly.csv"

CANONICAL_REQUIRED = ("submit_time_s", "duration_s", "num_gpus")
CANONICAL_OPTIONAL = ("model_type", "accelerator")
PHILLY_COLUMNS = ("timestamp", "duration", "num_gpus", "gpu_time", "cluster")


class TraceError(ValueError):
    """A trace file is malformed; the message names the file and line."""


@dataclass(frozen=True)
class TraceJob:
    """One job of a trace as loaded: submit time, duration on the reference GPU, GPU count and,
    when given, model type and allowed accelerator family."""

    job_id: int  # position in the file (0-based data row)
    submit_time_s: float
    duration_s: float  # on the reference GPU type, consolidated
    num_gpus: int
    model_type: str = ""  # "" = assign by GPU-hours bucket
    accelerator: str = ""  # "" = any family
    line: int = 0  # line in the source file (1 = header)


def _float(value: str, name: str, where: str, minimum: float, strict: bool) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise TraceError(f"{where}: {name} is not a number: {value!r}") from None
    if not math.isfinite(x) or x < minimum or (strict and x == minimum):
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise TraceError(f"{where}: {name} must be a finite number {bound}, got {value!r}")
    return x


def _int(value: str, name: str, where: str) -> int:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise TraceError(f"{where}: {name} is not a number: {value!r}") from None
    if not math.isfinite(x) or x != int(x) or x < 1:
        raise TraceError(f"{where}: {name} must be an integer >= 1, got {value!r}")
    return int(x)


def _read(path: Path | str):
    path = Path(path)
    try:
        handle = path.open(newline="")
    except OSError as e:
        raise TraceError(f"{path}: cannot read: {e.strerror or e}") from None
    return path, handle


def _check_header(path: Path, header: list[str] | None, required: tuple[str, ...],
                  optional: tuple[str, ...]) -> None:
    if not header:
        raise TraceError(f"{path}:1: empty file (expected a header: {', '.join(required)})")
    unknown = [c for c in header if c not in required + optional]
    if unknown:
        raise TraceError(f"{path}:1: unknown column(s) {', '.join(map(repr, unknown))}; "
                         f"known: {', '.join(required + optional)}")
    missing = [c for c in required if c not in header]
    if missing:
        raise TraceError(f"{path}:1: missing column(s) {', '.join(missing)}")
    if len(set(header)) != len(header):
        raise TraceError(f"{path}:1: duplicate column names in {header}")


def _rows(path: Path | str, required: tuple[str, ...], optional: tuple[str, ...]):
    """(line number, "file:line", get(column) -> stripped text) for each non-blank data row,
    after checking the header; a row with the wrong number of fields is an error."""
    path, handle = _read(path)
    with handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        header = [h.strip() for h in header] if header else header
        _check_header(path, header, required, optional)
        col = {name: i for i, name in enumerate(header)}
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if not row or all(not c.strip() for c in row):
                continue  # blank line
            if len(row) != len(header):
                raise TraceError(f"{where}: {len(row)} field(s), the header has {len(header)}")
            yield reader.line_num, where, \
                (lambda name, row=row: row[col[name]].strip() if name in col else "")


def load_canonical(path: Path | str) -> list[TraceJob]:
    """Jobs from a canonical CSV (see the module docstring)."""
    jobs = []
    for line, where, get in _rows(path, CANONICAL_REQUIRED, CANONICAL_OPTIONAL):
        model_type = get("model_type")
        if model_type and model_type not in GAVEL_JOB_TYPES:
            raise TraceError(f"{where}: unknown model_type {model_type!r}; known: "
                             f"{', '.join(sorted(GAVEL_JOB_TYPES))}")
        accelerator = get("accelerator").upper()
        if accelerator and accelerator not in ACCELERATOR_FAMILIES:
            raise TraceError(f"{where}: unknown accelerator {get('accelerator')!r}; known: "
                             f"{', '.join(ACCELERATOR_FAMILIES)}")
        jobs.append(TraceJob(
            job_id=len(jobs),
            submit_time_s=_float(get("submit_time_s"), "submit_time_s", where, 0, False),
            duration_s=_float(get("duration_s"), "duration_s", where, 0, True),
            num_gpus=_int(get("num_gpus"), "num_gpus", where),
            model_type=model_type, accelerator=accelerator, line=line))
    return jobs


def load_philly(path: Path | str = PHILLY_CSV) -> list[TraceJob]:
    """Jobs from the Philly trace as published with the Pollux artifact."""
    rows = []
    for line, where, get in _rows(path, PHILLY_COLUMNS[:3], PHILLY_COLUMNS[3:]):
        stamp = get("timestamp")
        try:
            if len(stamp) != 19 or stamp[10] != " ":
                raise ValueError(stamp)
            # Naive times read as UTC: no daylight-saving jumps inside the trace.
            submit = datetime.fromisoformat(stamp).replace(tzinfo=timezone.utc).timestamp()
        except ValueError:
            raise TraceError(f"{where}: timestamp is not 'YYYY-MM-DD HH:MM:SS': "
                             f"{stamp!r}") from None
        rows.append((submit, _float(get("duration"), "duration", where, 0, True),
                     _int(get("num_gpus"), "num_gpus", where), line))
    if not rows:
        return []
    start = min(r[0] for r in rows)
    return [TraceJob(i, s - start, d, n, line=line) for i, (s, d, n, line) in enumerate(rows)]


def load_trace(path: Path | str, fmt: str = "canonical") -> list[TraceJob]:
    if fmt == "philly":
        return load_philly(path)
    if fmt == "canonical":
        return load_canonical(path)
    raise TraceError(f"unknown trace format {fmt!r}: use philly or canonical")


def prepare(jobs: list[TraceJob], max_jobs: int | None = None,
            load_scale: float = 1.0) -> list[TraceJob]:
    """Sort by submit time (stable: ties keep file order), keep the first `max_jobs`, start the
    clock at the first submit, and divide inter-arrival times by `load_scale` (> 1 = busier).
    Job ids are renumbered 0..n-1 in submit order; `line` still points into the file."""
    if not (math.isfinite(load_scale) and load_scale > 0):
        raise TraceError(f"--load-scale must be a number > 0, got {load_scale}")
    if max_jobs is not None and max_jobs < 1:
        raise TraceError(f"--max-jobs must be >= 1, got {max_jobs}")
    ordered = sorted(jobs, key=lambda j: j.submit_time_s)[:max_jobs]
    if not ordered:
        return []
    t0 = ordered[0].submit_time_s
    return [replace(j, job_id=i, submit_time_s=(j.submit_time_s - t0) / load_scale)
            for i, j in enumerate(ordered)]
