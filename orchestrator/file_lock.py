"""An exclusive lock on a local (or NFS) file for the length of a `with` block: flock, released
by the kernel when its holder exits however it exits, honoured across NFS clients, with the
holder's pid, host and start time written in the file for whoever finds it busy. Used around a
tokenizing pass into a data cache (training/shards.py), around a run in its run directory
(runs.py) and around a compression in its --out (compression/pipeline.py)."""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterator


class LockBusy(Exception):
    """Another process holds the lock; `holder` is what it wrote in the file."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


@dataclass(frozen=True)
class LockState:
    """What file_lock's block runs under: held (after waiting or not), or unguarded."""

    waited: bool = False  # it was busy and this process waited for it
    # Why the filesystem refuses flock (some FUSE and Lustre mounts: ENOLCK, EOPNOTSUPP):
    # the block then runs unguarded, for the caller to say so. None: held.
    unsupported: str | None = None


@contextlib.contextmanager
def file_lock(path: Path, on_busy: Callable[[str], None] | None = None) -> Iterator[LockState]:
    """Hold an exclusive flock on `path` (made, with its folder, if missing) for the block.
    Busy: without `on_busy`, LockBusy(holder) at once; with it, on_busy(holder) is called and
    the lock waited for. OSError if the file cannot be opened."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as lock:
        waited, unsupported = False, None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            if on_busy is None:
                raise LockBusy(holder) from None
            on_busy(holder)
            fcntl.flock(lock, fcntl.LOCK_EX)
            waited = True
        except OSError as e:
            unsupported = e.strerror or str(e)
        if unsupported is not None:  # (yielded outside the handler: the block's own errors
            yield LockState(unsupported=unsupported)  # are not "during handling" of this one)
            return
        try:
            lock.seek(0)
            lock.truncate()
            lock.write(f"pid {os.getpid()} on {socket.gethostname()} (since "  # (_HOLDER's)
                       f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n")
            lock.flush()
            yield LockState(waited=waited)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


_HOLDER = re.compile(r"pid (\d+) on (\S+) \(since ")  # what file_lock writes in the file


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (someone else's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's: alive
        return True
    return True


def holder_gone(path: Path) -> str | None:
    """What the lock file `path` says of its holder ("pid N on HOST (since ...)"), where that
    process is gone from this host (killed outright: kill -9 releases the lock, but leaves
    the text); None while it may still run: the lock held, on another host (whether it runs
    cannot be asked from here), or no holder named (no file, none written yet). Judged by the
    lock itself (taken shared for a moment, never waited for), its pid only where the
    filesystem has no flock: a holder in a container sharing this host's name has pids of
    its own (alive, it looked gone), and a killed holder's pid may run another process."""
    try:
        with open(path, errors="replace") as f:
            text = f.read().strip()
            holder = _HOLDER.match(text)
            if holder is None or holder.group(2) != socket.gethostname():
                return None
            held = flock_held(f)
            if held is None:  # (no flock on this filesystem)
                return None if process_alive(int(holder.group(1))) else text
            return None if held else text  # held: alive, whatever its pid says here
    except OSError:
        return None


def held_by_none(path: Path) -> str | None:
    """Why no process holds the lock file `path` nor is named by it: "there is none", or
    "which names no holder" (made by hand, or file_lock's a moment before its flock); None
    while one may: held (its holder's line written or not yet), a holder named (holder_gone
    judges it), or no flock on the filesystem to ask. A run folder with reports and such a
    lock has no writer (a run from before the lock, a copied folder)."""
    try:
        with open(path, errors="replace") as f:
            if _HOLDER.match(f.read().strip()):
                return None
            return "which names no holder" if flock_held(f) is False else None
    except FileNotFoundError:
        return "there is none"
    except OSError:
        return None


def flock_held(f: IO) -> bool | None:
    """Whether some process holds an flock on open file `f`, asked by taking it shared for a
    moment (never waited for); None where its filesystem has no flock. The word on whether a
    file's writer still runs that a pid cannot give: a process in a container sharing this
    host's name has pids of its own, and a dead one's pid may run another process."""
    try:
        fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    fcntl.flock(f, fcntl.LOCK_UN)
    return False


@contextlib.contextmanager
def created_locked(path: Path, mode: str = "w") -> Iterator[IO]:
    """`path` created and opened, its flock held (flock_held: a sweep leaves it alone even
    where the writer's pid means nothing to it, a container sharing this host's name) before
    it bears its name: created as `<path>.new` and renamed once locked, since a sweep between
    a creation and its lock took the file, unlocked, for a dead writer's and removed it.
    Without flock on the filesystem, only the name is given (the pid then decides)."""
    unnamed = path.with_name(f"{path.name}.new")  # (no name a sweep looks for)
    try:
        with open(unnamed, mode) as f:
            with contextlib.suppress(OSError):  # (a filesystem without flock)
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.replace(unnamed, path)
            yield f
    finally:
        unnamed.unlink(missing_ok=True)  # (a failure before the rename: not left behind)


@contextlib.contextmanager
def claimed(path: Path, busy: Callable[[str], Exception],
            cannot: Callable[[str], Exception]) -> Iterator[LockState]:
    """file_lock(path) for the block (a run directory's, a compression --out's), its refusals
    raised as the caller's own errors: busy(holder) when another process holds it,
    cannot(reason) when the lock's file cannot be opened. Errors of the block itself pass as
    they are."""
    entered = False
    try:
        with file_lock(path) as state:
            entered = True
            yield state
    except LockBusy as e:
        if entered:
            raise
        raise busy(e.holder) from None
    except OSError as e:
        if entered:
            raise
        raise cannot(e.strerror or str(e)) from None
