"""Job traces for the simulator: the canonical CSV and the Philly trace.

Canonical CSV (header required, columns in any order):

    submit_time_s   seconds (float >= 0): since the trace start, or absolute (Unix time);
                    the replay's clock starts at the first submit (prepare)
    duration_s      run time on the reference GPU type, all GPUs on one server (float > 0)
    num_gpus        GPUs the job uses (integer >= 1)
    model_type      optional: a Gavel job type ("ResNet-50 (batch size 64)"); empty = by GPU-hours
    accelerator     optional: the GPU families the job may run on, separated by "|"
                    ("V100", "V100|A100"); empty = any family

The accelerator constraint is case-insensitive ("v100|a100" = "V100|A100"); whitespace around a
family is ignored, a repeated family counts once and the order written is kept. Each family is a
name: a letter or digit, then letters, digits, "_" or "-". An empty part ("V100|", "|A100",
"V100||A100") or a part that is not a name ("V100,A100" in a quoted field, "V100;A100",
"V 100") is malformed. A well-formed name that is not a known family
(orchestrator.config.ACCELERATOR_FAMILIES), e.g. "Z80", is NOT an error: it is kept in
TraceJob.accelerators and `unknown_families` names it, so the simulator can report the job as
never fitting rather than refuse the whole trace.

Times are in seconds, and milliseconds or microseconds are refused, naming the file, line and
field: a duration over MAX_SECONDS (1e9 s, 31 years), a submit time over MAX_UNIX_SECONDS (1e10
s: the year 2286 as Unix time; Unix time in ms is over 1e12), submit times spanning over
MAX_SECONDS (relative times in ms past 11.6 days, or Unix and relative times mixed); relative
times in ms spanning less, and durations in ms under MAX_SECONDS, read as seconds. num_gpus
is at most MAX_GPUS (JobSpec's num_workers limit). A leading UTF-8 byte-order mark and blank
lines before the header are skipped; a file with a header but no rows is an error, and so is a
gzip-compressed one.

Any other column, a missing required column, or a malformed row raises TraceError naming the
file and the line. Nothing is dropped: jobs that cannot fit the modelled cluster are counted and
reported by the simulator. `write_canonical` writes jobs back in this format (load_canonical
reads them back equal, apart from `line`).

Philly (`data/philly.csv`): timestamp, duration, num_gpus, gpu_time, cluster; submit times are
made relative to the first job; timestamps spanning over MAX_SECONDS (a typo in a year) are
refused naming the file, the line and both timestamps. `sniff_format` tells the two apart by
the header: Philly when a column is `timestamp`.
"""
from __future__ import annotations

import codecs
import csv
import io
import math
import re
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from orchestrator.cluster_model import GAVEL_JOB_TYPES
from orchestrator.config import ACCELERATOR_ALIASES, ACCELERATOR_FAMILIES, MAX_WORKERS
from orchestrator.validation import parse_number

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
PHILLY_CSV = DATA_DIR / "philly.csv"

CANONICAL_REQUIRED = ("submit_time_s", "duration_s", "num_gpus")
CANONICAL_OPTIONAL = ("model_type", "accelerator")
PHILLY_COLUMNS = ("timestamp", "duration", "num_gpus", "gpu_time", "cluster")
# (required, optional) columns of each format.
FORMAT_COLUMNS = {"canonical": (CANONICAL_REQUIRED, CANONICAL_OPTIONAL),
                  "philly": (PHILLY_COLUMNS[:3], PHILLY_COLUMNS[3:])}
# A column only that format has: how a header is recognised (sniff_format, error hints).
FORMAT_KEY_COLUMN = {"philly": "timestamp", "canonical": "submit_time_s"}
FORMAT_NAMES = {"philly": "Philly", "canonical": "canonical"}  # as the hints write them
# 31 years: a longer duration, or submit times spanning longer, is a unit mistake
# (milliseconds, microseconds), and its figures would come out as inf, nan or 300-digit numbers.
MAX_SECONDS = 1e9
# Submit times may be Unix times in seconds (the commonest export: prepare() starts the clock
# at the first); one over this, the year 2286 as Unix time, is in ms (1.5e12 now) or µs.
MAX_UNIX_SECONDS = 1e10
UNIT_HINT = "times are in seconds; was it written in ms or µs?"
# JobSpec's num_workers limit: a bigger job would fail there as a bare ConfigError, not as a
# line of the trace.
MAX_GPUS = MAX_WORKERS
GZIP_MAGIC = b"\x1f\x8b"
ACCELERATOR_SEPARATOR = "|"
# A family name: what the constraint syntax accepts, known family or not.
_FAMILY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


class TraceError(ValueError):
    """A trace file is malformed; the message names the file and line."""


@dataclass(frozen=True)
class TraceJob:
    """One job of a trace as loaded: submit time, duration on the reference GPU, GPU count and,
    when given, model type and the accelerator families it may run on."""

    job_id: int  # position in the file (0-based data row)
    submit_time_s: float
    duration_s: float  # on the reference GPU type, consolidated
    num_gpus: int
    model_type: str = ""  # "" = assign by GPU-hours bucket
    accelerators: tuple[str, ...] = ()  # upper-case family names; () = any family
    line: int = 0  # line in the source file (1 = header)

    def __post_init__(self) -> None:
        # A bare string would silently become a tuple of characters ("V100" -> "V", "1", ...).
        if isinstance(self.accelerators, list):
            object.__setattr__(self, "accelerators", tuple(self.accelerators))
        if not isinstance(self.accelerators, tuple) or \
                not all(isinstance(a, str) for a in self.accelerators):
            raise TypeError(f"TraceJob {self.job_id}: accelerators must be a tuple of family "
                            f"names, e.g. ('V100', 'A100'), got {self.accelerators!r}")


def parse_accelerators(text: str, where: str) -> tuple[str, ...]:
    """The families of an `accelerator` field ("v100 | A100" -> ("V100", "A100")): upper-cased,
    duplicates dropped, order kept; "" = () = any. Malformed syntax raises TraceError naming
    `where` ("file:line"); a well-formed but unknown family is kept (see unknown_families)."""
    if not text.strip():
        return ()
    families: list[str] = []
    for part in (p.strip() for p in text.split(ACCELERATOR_SEPARATOR)):
        if not part:
            raise TraceError(f"{where}: accelerator {text!r} has an empty part; write families "
                             f"separated by '{ACCELERATOR_SEPARATOR}', e.g. 'V100|A100'")
        if not _FAMILY_NAME.fullmatch(part):
            raise TraceError(f"{where}: accelerator {text!r}: {part!r} is not a family name "
                             f"(letters, digits, '_' or '-'); separate families with "
                             f"'{ACCELERATOR_SEPARATOR}', e.g. 'V100|A100'")
        if part.upper() not in families:
            families.append(part.upper())
    return tuple(families)


def unknown_families(accelerators: tuple[str, ...]) -> tuple[str, ...]:
    """The families in `accelerators` that orchestrator.config.ACCELERATOR_FAMILIES does not
    know (in order): a job allowed only these can never run."""
    return tuple(a for a in accelerators if a.upper() not in ACCELERATOR_FAMILIES)


def unknown_family_reason(unknown: tuple[str, ...]) -> str:
    """Why a job allowed only the `unknown` families never fits; an alias of a known family
    (config.ACCELERATOR_ALIASES: V100S, MI250X) is named with the family to write instead."""
    aliases = [f"{a} is an alias of {ACCELERATOR_ALIASES[a]}; write {ACCELERATOR_ALIASES[a]}"
               for a in unknown if a in ACCELERATOR_ALIASES]
    hint = f" ({'; '.join(aliases)})" if aliases else ""
    return f"unknown accelerator family {'|'.join(unknown)}{hint}"


def _number(value: str, name: str, where: str) -> float:
    """A field as written (validation.parse_number: `1_000` and non-ASCII digits, which
    float() takes, are refused), or a TraceError naming the file, line and column."""
    try:
        return parse_number(value)
    except ValueError as e:
        raise TraceError(f"{where}: {name} is not a number: {value!r}"
                         + (f" ({e})" if str(e) else "")) from None


def _float(value: str, name: str, where: str, minimum: float, strict: bool) -> float:
    x = _number(value, name, where)
    if not math.isfinite(x) or x < minimum or (strict and x == minimum):
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise TraceError(f"{where}: {name} must be a finite number {bound}, got {value!r}")
    return x


def _seconds(value: str, name: str, where: str, strict: bool, limit: float = MAX_SECONDS,
             limit_is: str = "31 years") -> float:
    """A time in seconds: >= 0 (> 0 if `strict`) and at most `limit`."""
    x = _float(value, name, where, 0, strict)
    if x > limit:
        raise TraceError(f"{where}: {name} {value!r} is over {limit:g} s ({limit_is}): "
                         f"{UNIT_HINT}")
    return x


def _check_span(path, stamps, name: str, tail: str):
    """The earliest of `stamps` ((seconds, line, as written) tuples, at least one);
    a TraceError naming the file, both lines and both times when they span over MAX_SECONDS
    (a canonical trace's in ms or µs, a Philly one's with a typo in a year): `tail` says
    which."""
    first, last = min(stamps, key=lambda s: s[0]), max(stamps, key=lambda s: s[0])
    span = last[0] - first[0]
    if span > MAX_SECONDS:
        raise TraceError(f"{path}:{last[1]}: {name} {last[2]} is {span:g} s "
                         f"({span / (365.25 * 86400):,.0f} years) after line {first[1]}'s "
                         f"{first[2]}{tail}")
    return first


def _int(value: str, name: str, where: str) -> int:
    x = _number(value, name, where)
    if not math.isfinite(x) or x != int(x) or not 1 <= x <= MAX_GPUS:
        raise TraceError(f"{where}: {name} must be an integer in [1, {MAX_GPUS}], "
                         f"got {value!r}")
    return int(x)


def _read(path: Path | str):
    path = Path(path)
    try:
        # Decoded whole here (traces are megabytes): a file that is not UTF-8 is named now,
        # not as a traceback from somewhere in the rows.
        data = path.read_bytes()
    except OSError as e:
        raise TraceError(f"{path}: cannot read: {e.strerror or e}") from None
    if data.startswith(GZIP_MAGIC):
        raise TraceError(f"{path}: gzip-compressed: gunzip it first")
    try:
        # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") is not part of the first column.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        # e.start is past the mark utf-8-sig took off; the line is what a user can find (an
        # Excel "CSV" export in Windows-1252 with one "café" among thousands of rows).
        at = e.start + (len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0)
        before = data[:at]  # line ends as the csv reader counts them: LF, CRLF, a lone CR
        line = before.count(b"\n") + before.count(b"\r") - before.count(b"\r\n") + 1
        raise TraceError(f"{path}:{line}: not UTF-8 text (byte {at}); save it as UTF-8 "
                         "CSV") from None
    return path, io.StringIO(text, newline="")


def _is_blank(row: list[str]) -> bool:
    return all(not c.strip() for c in row)


def _header(reader, rows) -> tuple[int, list[str] | None]:
    """(line, stripped column names) of the first non-blank row (blank lines before the
    header are skipped); (1, None) if the file has none."""
    for row in rows:
        if not _is_blank(row):
            return reader.line_num, [h.strip() for h in row]
    return 1, None


def _format_hint(header: list[str], fmt: str) -> str:
    """A hint such as ' (a Philly trace? pass --format philly)' when the header has another
    format's key column; '' if not."""
    for other, key in FORMAT_KEY_COLUMN.items():
        if other != fmt and key in header:
            return f" (a {FORMAT_NAMES[other]} trace? pass --format {other})"
    return ""


def _check_header(where: str, header: list[str] | None, fmt: str) -> None:
    required, optional = FORMAT_COLUMNS[fmt]
    if not header:
        raise TraceError(f"{where}: empty file (expected a header: {', '.join(required)})")
    empty = [i for i, c in enumerate(header, 1) if not c]
    if empty:  # as "unknown column(s) ''" it named nothing a user could find
        hint = "a trailing comma in the header?" if empty[-1] == len(header) else \
            f"column {empty[0]}"
        raise TraceError(f"{where}: an empty column name ({hint}); known: "
                         f"{', '.join(required + optional)}")
    unknown = [c for c in header if c not in required + optional]
    if unknown:
        raise TraceError(f"{where}: unknown column(s) {', '.join(map(repr, unknown))}; "
                         f"known: {', '.join(required + optional)}{_format_hint(header, fmt)}")
    missing = [c for c in required if c not in header]
    if missing:
        raise TraceError(f"{where}: missing column(s) {', '.join(missing)}"
                         f"{_format_hint(header, fmt)}")
    twice = _repeated_columns(header)
    if twice:
        raise TraceError(f"{where}: {twice}")


def _repeated_columns(header: list[str]) -> str:
    """'' or what names each column the header gives more than once and where ("column 'x' is
    given twice (columns 1 and 4)"): the whole header, as it was quoted, left that to find."""
    positions: dict[str, list[int]] = {}
    for i, name in enumerate(header, 1):
        positions.setdefault(name, []).append(i)
    repeated = {name: at for name, at in positions.items() if len(at) > 1}
    if not repeated:
        return ""

    def where(at: list[int]) -> str:
        return f"columns {', '.join(map(str, at[:-1]))} and {at[-1]}"

    if len(repeated) == 1:
        ((name, at),) = repeated.items()
        times = "twice" if len(at) == 2 else f"{len(at)} times"
        return f"column {name!r} is given {times} ({where(at)})"
    return (f"columns {', '.join(f'{name!r} ({where(at)})' for name, at in repeated.items())} "
            "are given more than once")


def _rows(path: Path | str, fmt: str):
    """(line number, "file:line", get(column) -> stripped text) for each non-blank data row,
    after checking the header (the first non-blank line) against `fmt`'s columns; a row with
    the wrong number of fields is an error, and so is a file with no rows."""
    path, handle = _read(path)
    with handle:
        reader = csv.reader(handle)
        rows = _parsed(reader, path)
        line, header = _header(reader, rows)
        _check_header(f"{path}:{line}", header, fmt)
        col = {name: i for i, name in enumerate(header)}
        count = 0
        for row in rows:
            where = f"{path}:{reader.line_num}"
            if _is_blank(row):
                continue
            if len(row) != len(header):
                raise TraceError(f"{where}: {len(row)} field(s), the header has {len(header)}")
            count += 1
            yield reader.line_num, where, \
                (lambda name, row=row: row[col[name]].strip() if name in col else "")
        if not count:  # a replay of nothing would print a table of dashes and exit 0
            raise TraceError(f"{path}: no jobs (only a header)")


def sniff_format(path: Path | str) -> str:
    """The format of a trace file: philly if a column of its header (the first non-blank line,
    read as CSV: quoted or in any order) is `timestamp`, else canonical."""
    path, handle = _read(path)
    with handle:
        reader = csv.reader(handle)
        _, header = _header(reader, _parsed(reader, path))
    return "philly" if FORMAT_KEY_COLUMN["philly"] in (header or ()) else "canonical"


def _parsed(reader, path: Path):
    """The reader's rows; a line the csv module cannot parse (a field over its size limit, a
    NUL byte) is a TraceError naming the file and line, not a bare csv.Error."""
    while True:
        try:
            yield next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise TraceError(f"{path}:{reader.line_num}: not readable as CSV: {e}") from None


def load_canonical(path: Path | str) -> list[TraceJob]:
    """Jobs from a canonical CSV (see the module docstring)."""
    jobs = []
    for line, where, get in _rows(path, "canonical"):
        model_type = get("model_type")
        if model_type and model_type not in GAVEL_JOB_TYPES:
            raise TraceError(f"{where}: unknown model_type {model_type!r}; known: "
                             f"{', '.join(sorted(GAVEL_JOB_TYPES))}")
        accelerators = parse_accelerators(get("accelerator"), where)
        jobs.append(TraceJob(
            job_id=len(jobs),
            submit_time_s=_seconds(get("submit_time_s"), "submit_time_s", where, False,
                                   MAX_UNIX_SECONDS, "the year 2286 as Unix time"),
            duration_s=_seconds(get("duration_s"), "duration_s", where, True),
            num_gpus=_int(get("num_gpus"), "num_gpus", where),
            model_type=model_type, accelerators=accelerators, line=line))
    if jobs:  # in ms or µs, or Unix and relative times mixed
        _check_span(Path(path), [(j.submit_time_s, j.line, f"{j.submit_time_s:g}")
                                 for j in jobs], "submit_time_s", f": {UNIT_HINT}")
    return jobs


def write_canonical(jobs: list[TraceJob], path: Path | str) -> None:
    """Write `jobs` as a canonical CSV (all five columns, in the order given) that
    load_canonical reads back equal apart from `line`. Floats are written as repr() (the
    shortest text that reads back to the same number), so equal jobs give identical bytes."""
    path = Path(path)
    for job in jobs:
        bad = [a for a in job.accelerators if not _FAMILY_NAME.fullmatch(a)]
        if bad:
            raise TraceError(f"{path}: job {job.job_id}: accelerators {bad} are not family "
                             f"names (letters, digits, '_' or '-'); they would not read back")
    try:
        with path.open("w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(CANONICAL_REQUIRED + CANONICAL_OPTIONAL)
            for job in jobs:
                writer.writerow((repr(float(job.submit_time_s)), repr(float(job.duration_s)),
                                 job.num_gpus, job.model_type,
                                 ACCELERATOR_SEPARATOR.join(job.accelerators)))
    except OSError as e:
        raise TraceError(f"{path}: cannot write: {e.strerror or e}") from None


def load_philly(path: Path | str = PHILLY_CSV) -> list[TraceJob]:
    """Jobs from the Philly trace as published with the Pollux artifact."""
    rows = []
    for line, where, get in _rows(path, "philly"):
        stamp = get("timestamp")
        try:
            if len(stamp) != 19 or stamp[10] != " ":
                raise ValueError(stamp)
            # Naive times read as UTC: no daylight-saving jumps inside the trace.
            submit = datetime.fromisoformat(stamp).replace(tzinfo=timezone.utc).timestamp()
        except ValueError:
            raise TraceError(f"{where}: timestamp is not 'YYYY-MM-DD HH:MM:SS': "
                             f"{stamp!r}") from None
        rows.append((submit, _seconds(get("duration"), "duration", where, True),
                     _int(get("num_gpus"), "num_gpus", where), line, stamp))
    if not rows:
        return []
    first = _check_span(path, [(r[0], r[3], repr(r[4])) for r in rows], "timestamp",
                        f", over {MAX_SECONDS:g} s (31 years): a typo in the year?")
    start = first[0]
    return [TraceJob(i, s - start, d, n, line=line) for i, (s, d, n, line, _) in enumerate(rows)]


def load_trace(path: Path | str, fmt: str = "canonical") -> list[TraceJob]:
    if fmt == "philly":
        return load_philly(path)
    if fmt == "canonical":
        return load_canonical(path)
    raise TraceError(f"unknown trace format {fmt!r}: use philly or canonical")


def prepare(jobs: list[TraceJob], max_jobs: int | None = None,
            load_scale: float = 1.0) -> list[TraceJob]:
    """Sort by submit time (stable: ties keep file order), keep the first `max_jobs`, start the
    clock at the first submit, and divide inter-arrival times by `load_scale` (> 1 = busier;
    a scale that would spread the submit times over MAX_SECONDS is refused, as a trace's own
    are). Job ids are renumbered 0..n-1 in submit order; `line` still points into the file."""
    if not (math.isfinite(load_scale) and load_scale > 0):
        raise TraceError(f"--load-scale must be a number > 0, got {load_scale}")
    if max_jobs is not None and max_jobs < 1:
        raise TraceError(f"--max-jobs must be >= 1, got {max_jobs}")
    ordered = sorted(jobs, key=lambda j: j.submit_time_s)[:max_jobs]
    if not ordered:
        return []
    t0 = ordered[0].submit_time_s
    span = ordered[-1].submit_time_s - t0
    # A tiny scale spreads the arrivals past MAX_SECONDS, as a trace's own submit times may not:
    # at 1e-300 a job's run is lost in its submit time's float rounding (JCTs of 0, a makespan
    # of 300 digits), and at 1e-307 the last submit time overflowed to inf (every figure nan).
    if not span / load_scale <= MAX_SECONDS:
        raise TraceError(f"--load-scale {load_scale:g}: the submit times span {span:g} s; "
                         f"divided by it they would span {span / load_scale:g} s, over "
                         f"{MAX_SECONDS:g} s (31 years)")
    return [replace(j, job_id=i, submit_time_s=(j.submit_time_s - t0) / load_scale)
            for i, j in enumerate(ordered)]
