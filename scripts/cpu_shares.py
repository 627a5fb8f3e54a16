"""Where this machine's CPU goes now: per process and per thread, the CPU time and the time
spent runnable but waiting for a CPU, over a few seconds (orchestrator/cpu_shares.py). Run it
beside a benchmark or a training job to see what shares the cores with it.

    python -m scripts.cpu_shares                  # 10 s, every process
    python -m scripts.cpu_shares --seconds 5 --match ray::

Percent of one core (a busy 2-core machine sums to 200). The last line printed is one JSON
object: the processes and their busiest threads.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

from orchestrator import cpu_shares
from orchestrator.validation import strict_float, strict_int


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=strict_float, default=10.0, help="how long to sample")
    p.add_argument("--match", default="", help="only processes whose command line has this")
    p.add_argument("--top", type=strict_int, default=12, help="processes to show")
    p.add_argument("--min-pct", type=strict_float, default=0.5,
                   help="leave out threads below this percent of a core")
    args = p.parse_args(argv)
    # A day at most: NaN and inf passed a `<= 0` check and ended in a traceback.
    if not 0 < args.seconds <= 86400:
        p.error(f"--seconds must be a number in (0, 86400], got {args.seconds:g}")
    if args.top < 1:
        p.error(f"--top must be >= 1, got {args.top}")
    if not math.isfinite(args.min_pct) or args.min_pct < 0:
        p.error(f"--min-pct must be a number >= 0, got {args.min_pct:g}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sampled = cpu_shares.sample(args.seconds)
    if not sampled:
        print("error: no thread counters to read (/proc/<pid>/task/<tid>/schedstat: Linux "
              "with schedstats only)", file=sys.stderr)
        return 1
    # Not this sampler itself: its own command line holds the --match text.
    threads = [t for t in sampled if args.match in t.process and t.pid != os.getpid()]
    if not threads:
        print(f"error: no process but this one matches --match {args.match!r}",
              file=sys.stderr)
        return 1
    totals = cpu_shares.process_cpu(threads)
    names = {t.pid: t.process for t in threads}
    rows = []
    for pid in sorted(totals, key=lambda p: -totals[p])[:args.top]:
        busy = [t for t in threads if t.pid == pid and t.cpu_pct >= args.min_pct]
        rows.append({"pid": pid, "process": names[pid][:80], "cpu_pct": totals[pid],
                     "threads": [{"tid": t.tid, "name": t.thread, "cpu_pct": t.cpu_pct,
                                  "runqueue_wait_pct": t.runqueue_wait_pct} for t in busy]})
        print(f"{totals[pid]:6.1f}%  {pid:>7}  {names[pid][:70]}")
        for t in busy:
            print(f"        {t.cpu_pct:6.1f}% ran, {t.runqueue_wait_pct:6.1f}% waited for a CPU"
                  f"  thread {t.tid} {t.thread}")
    print(json.dumps({"seconds": args.seconds, "cpu_pct_all": round(sum(totals.values()), 1),
                      "processes": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
