"""How a job command ends: on failure, one line on stderr naming what went wrong and an exit
code a script can branch on, never a traceback. jobs/pretrain.py and jobs/compress.py share it.
"""
from __future__ import annotations

import re
import sys
from typing import Callable, TypeVar

EXIT_BAD_INPUT = 2       # a flag, a file or a run directory is wrong: nothing was started
EXIT_NOT_PLACEABLE = 3   # the cluster cannot run the job (rejected, queue timeout, cancelled)
EXIT_FAILED = 4          # the work itself failed (training after its restarts, an export)
EXIT_INTERRUPTED = 130   # Ctrl-C

# How long a caller waits for one answer of the scheduler before it counts as not answering
# (exit 3): its actor retries calls for good, so one restarting or hung held `status`, a
# dry run or a queued driver for ever where exit 3 is promised.
CALL_TIMEOUT_S = 60.0

T = TypeVar("T")


# A traceback's top-level `Name: message` line (Ray's errors carry the remote traceback).
EXCEPTION_LINE = re.compile(r"[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b[^:]*:")
_COLOUR = re.compile(r"\x1b\[[0-9;]*m")


def without_colour(text: str) -> str:
    """`text` without terminal colour codes (Ray's and torch.export's messages carry them)."""
    return _COLOUR.sub("", text)


def last_exception(text: str) -> str | None:
    """The last top-level `Name: message` line in `text`, or the unindented line ending a
    traceback's frames (an exception without a message: 'AssertionError', 'pkg.Lost'), and
    what follows it, as one line (what went wrong, at the end of a traceback), colour codes
    removed; None if it has none."""
    lines = without_colour(text).splitlines()
    starts, in_frames = [], False
    for i, line in enumerate(lines):
        if EXCEPTION_LINE.match(line) or (in_frames and line[:1] not in ("", " ", "\t")):
            starts.append(i)
        in_frames = line.startswith('  File "') or (in_frames and line[:1] in (" ", "\t"))
    if not starts:
        return None
    return " ".join(line.strip() for line in lines[starts[-1]:] if line.strip())


def on_one_line(text: str) -> str:
    """`text` with its lines (and runs of spaces) joined by single spaces."""
    return " ".join(text.split())


def one_line_error(text: str) -> str:
    """An error message that carries a traceback (Serve's for replicas that failed to start:
    some KB of it) as its first line and the traceback's last exception (last_exception: one
    without a message too), on one line, or its first line alone where the traceback was cut
    before its exception; any other message as it is, colour codes removed."""
    plain = without_colour(text).strip()
    tail = last_exception(plain)
    if '\n  File "' not in plain:
        return plain
    first = plain.splitlines()[0].strip()
    if tail is None:  # (a traceback cut before its exception: not its frames)
        return first
    if first.startswith("Traceback") or EXCEPTION_LINE.match(first):
        return tail
    return f"{first} {tail}"


class JobFailed(Exception):
    """Ends the job with one clear message and an exit code; no traceback. `ran`: the job's
    workers were started before it failed (a run directory then keeps what it holds, exit 3
    included: a cancel, a lost node without room)."""

    def __init__(self, message: str, exit_code: int, ran: bool = False) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.ran = ran


def run_job(work: Callable[[], T], on_interrupt: str | Callable[[], str]
            ) -> tuple[int, T | None]:
    """Run `work`; (0, its result), or (the exit code, None) after saying why on stderr.
    `on_interrupt` tells the user how to carry on after Ctrl-C (what is saved is kept); a
    callable is asked then (what to say may depend on how far `work` got)."""
    try:
        return 0, work()
    except JobFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code, None
    except KeyboardInterrupt:
        print(on_interrupt() if callable(on_interrupt) else on_interrupt, file=sys.stderr)
        return EXIT_INTERRUPTED, None
