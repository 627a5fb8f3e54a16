"""Where a machine's CPU goes, per process and per thread: the time each thread ran and the
time it waited, runnable, for a CPU (Linux /proc/<pid>/task/<tid>/schedstat).

A benchmark that runs several processes on few cores (Ray's daemons, Serve's proxy, an
ingress and a model replica; Ray Train's controller and workers) loses speed in two ways that
a plain CPU-usage figure does not tell apart: a thread that waits for a lock or for work, and
a thread that is ready to run but has no CPU. The second is the runqueue wait measured here:
scripts/bench_serve.py reports it for the model replica's generation thread, and
`python -m scripts.cpu_shares` prints it for anything running.

Linux only (schedstat needs CONFIG_SCHEDSTATS, on in common distribution kernels); elsewhere
`snapshot()` returns nothing and the figures are absent.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class ThreadTimes:
    """One thread's cumulative counters at one moment."""

    pid: int
    tid: int
    process: str  # the process's command line (Ray names actor processes ray::Class...)
    thread: str  # the thread's name (comm)
    run_ns: int  # time on a CPU
    wait_ns: int  # time runnable, waiting for a CPU


@dataclass(frozen=True)
class ThreadShare:
    """One thread over an interval, in percent of the interval (100 = one whole core)."""

    pid: int
    tid: int
    process: str
    thread: str
    cpu_pct: float
    runqueue_wait_pct: float


def snapshot(proc: Path = PROC) -> dict[tuple[int, int], ThreadTimes]:
    """Every thread's counters now, by (pid, tid); threads that vanish meanwhile are left
    out."""
    found: dict[tuple[int, int], ThreadTimes] = {}
    for entry in proc.iterdir() if proc.is_dir() else ():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            process = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace").strip()
            tasks = list((entry / "task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                run_ns, wait_ns = (int(x) for x in (task / "schedstat").read_text().split()[:2])
                thread = (task / "comm").read_text().strip()
            except (OSError, ValueError):
                continue
            found[(pid, int(task.name))] = ThreadTimes(pid, int(task.name), process, thread,
                                                       run_ns, wait_ns)
    return found


def shares(before: dict[tuple[int, int], ThreadTimes],
           after: dict[tuple[int, int], ThreadTimes], seconds: float) -> list[ThreadShare]:
    """Each thread alive at both moments, busiest first: its CPU time and runqueue wait over
    the `seconds` between them, in percent."""
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    scale = 100.0 / (seconds * 1e9)
    out = []
    for key, end in after.items():
        start = before.get(key)
        if start is None:
            continue
        out.append(ThreadShare(end.pid, end.tid, end.process, end.thread,
                               round((end.run_ns - start.run_ns) * scale, 1),
                               round((end.wait_ns - start.wait_ns) * scale, 1)))
    return sorted(out, key=lambda s: -s.cpu_pct)


def sample(seconds: float, proc: Path = PROC) -> list[ThreadShare]:
    """Shares over the next `seconds`."""
    before, began = snapshot(proc), time.monotonic()
    time.sleep(seconds)
    return shares(before, snapshot(proc), time.monotonic() - began)


def process_cpu(threads: list[ThreadShare]) -> dict[int, float]:
    """CPU percent per pid (the sum of its threads)."""
    total: dict[int, float] = {}
    for t in threads:
        total[t.pid] = total.get(t.pid, 0.0) + t.cpu_pct
    return {pid: round(pct, 1) for pid, pct in total.items()}


def of_process(threads: list[ThreadShare], marker: str) -> list[ThreadShare]:
    """The threads of processes whose command line contains `marker`, busiest first."""
    return [t for t in threads if marker in t.process]


def this_process(threads: list[ThreadShare]) -> list[ThreadShare]:
    return [t for t in threads if t.pid == os.getpid()]
