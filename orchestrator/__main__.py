"""Command line: `python -m orchestrator status|place|submit ...` against a Ray cluster, and
`simulate`, a trace-driven replay that needs no Ray at all.

    python -m orchestrator status [--json]
    python -m orchestrator submit JOB.yaml [--dry-run] [--resume]   # your own training loop
    python -m orchestrator logs NAME [--follow]
    python -m orchestrator preempt NAME | cancel NAME
    python -m orchestrator place --spec JOB.yaml --dry-run [--json]
    python -m orchestrator simulate --trace PATH --policy NAME|all --cluster SPEC --out DIR
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from orchestrator.config import ConfigError, JobSpec
from orchestrator.entrypoints import EntrypointError, load_entrypoint
from orchestrator.inventory import GIB, NodeReport
from orchestrator.file_lock import held_by_none, holder_gone
from orchestrator.job_exit import (CALL_TIMEOUT_S, EXIT_BAD_INPUT, EXIT_FAILED,
                                  EXIT_INTERRUPTED, EXIT_NOT_PLACEABLE, JobFailed,
                                  on_one_line, run_job)
from orchestrator.job_file import load_job_file
from orchestrator.placement import describe_decision
from orchestrator.runs import (DEFAULT_RUNS_ROOT, ENDED_FILE, METRICS_LOG, RUN_LOCK,
                               read_metrics, read_metrics_from, run_end)
from orchestrator.validation import expand_home, python_scalar


def _accelerators(report: NodeReport) -> str:
    if not report.gpus:
        return "-"
    names = sorted({g.name for g in report.gpus})
    sources = sorted({g.source for g in report.gpus})
    return f"{len(report.gpus)}x{'/'.join(names)} ({'/'.join(sources)})"


# A node Ray lists dead because it was removed on purpose (a scale-down, `ray stop`): not
# down (metrics do not count it either). `status` listed every one an autoscaling cluster had
# ever shed as dead; its table shows them as one count line.
RETIRED = "retired"


def status_rows(snapshot: dict[str, Any]) -> list[dict[str, Any]]:
    """One plain dict per node: what `status` prints, and what `status --json` emits."""
    held: dict[str, list[str]] = {}
    reserved: dict[str, tuple[float, int]] = {}
    for job, reservations in snapshot["reservations"].items():
        for r in reservations:
            held.setdefault(r.node_id, []).append(job)
            cpus, gpus = reserved.get(r.node_id, (0.0, 0))
            reserved[r.node_id] = (cpus + r.cpus, gpus + r.gpus)
    rows = []
    for node_id, report in sorted(snapshot["reports"].items()):
        bandwidth = [v for v in report.bandwidth_gbps.values() if math.isfinite(v)]
        host_measured = "host" not in report.probe_errors
        cpus_held, gpus_held = reserved.get(node_id, (0.0, 0))
        # Ray work the scheduler did not place (Serve replicas, other users' actors) holds
        # room too: free counted without it disagreed with `place` and the queue's reasons.
        cpus_outside, gpus_outside = snapshot.get("outside", {}).get(node_id, (0.0, 0))
        # A node that takes no work (dead, suspect, draining) has nothing free to add up.
        health = snapshot["health"][node_id]
        usable = health == "healthy"
        if health == "dead" and node_id in snapshot.get("retired", ()):
            health = RETIRED
        rows.append({
            "node_id": node_id,
            "hostname": report.hostname,
            "health": health,
            "heartbeat_age_s": round(snapshot["age_s"][node_id], 1),
            "accelerators": _accelerators(report),
            "gpus": int(report.ray_gpus),
            "gpus_free": max(int(report.ray_gpus) - gpus_held - gpus_outside, 0) if usable
            else 0,
            "gpus_outside": gpus_outside,
            "gpu_free_gib": [round(g.memory_free_bytes / GIB, 1) for g in report.gpus],
            "cpus": report.ray_cpus,
            "cpus_free": max(report.ray_cpus - cpus_held - cpus_outside, 0.0) if usable
            else 0.0,
            "cpus_outside": cpus_outside,
            # Null when the host probe failed: its stand-in (a load of 10^6 per CPU, no RAM:
            # probes.host_figures) is no measurement (the metrics leave it out too); and null
            # for an infinite load, as JSON has no infinity.
            "load_per_cpu": (round(report.load_per_cpu, 2) if host_measured
                             and math.isfinite(report.load_per_cpu) else None),
            "ram_available_gib": (round(report.ram_available_bytes / GIB, 1) if host_measured
                                  else None),
            "bandwidth_gbps_to_peers": {peer: round(v, 3) if math.isfinite(v) else None
                                        for peer, v in report.bandwidth_gbps.items()},
            "bandwidth_gbps_median": round(statistics.median(bandwidth), 3) if bandwidth else None,
            "reservations": sorted(held.get(node_id, [])),
            "probe_errors": report.probe_errors,
        })
    return rows


def format_jobs(jobs: list[dict[str, Any]]) -> list[str]:
    """One line per job: running, yielding (told to checkpoint and stop), placed (not
    started by its driver yet), preempted or waiting, with why."""
    lines = []
    for j in jobs:
        where = f" on {','.join(n[:12] for n in j['nodes'])}" if j["nodes"] else ""
        line = (f"{j['state']:<9} {j['job']} (priority {j['priority']}){where}, "
                f"{j['since_s']:.0f}s")
        if j.get("position"):
            line += f", #{j['position']} in line"
        if j["preemptions"]:
            line += f", preempted {j['preemptions']}x"
        lines.append(line + (f": {j['reason']}" if j["reason"] else ""))
    return lines


def format_throughput(table: dict[str, Any] | None, max_workloads: int = 10) -> list[str]:
    """The scheduler's learnt speeds, one line per workload (measured first, most samples
    first), each family with its speed relative to the reference family and its sample
    count; bootstrapped rows are only counted (`status --json` lists them all)."""
    if not table:
        return []  # a scheduler from before the table
    measured: dict[str, list[dict[str, Any]]] = {}
    for row in table["rows"]:
        if row["source"] == "measured":
            measured.setdefault(row["workload"], []).append(row)
    others = len(table["rows"]) - sum(len(r) for r in measured.values())
    order = sorted(measured, key=lambda w: (-sum(r["samples"] for r in measured[w]), w))
    lines = [f"throughput (speed relative to {table.get('reference', 'V100')}, samples):"]
    for workload in order[:max_workloads]:
        families = sorted(measured[workload], key=lambda r: -r["speed"])
        lines.append(f"  {workload}: " + ", ".join(
            f"{r['family']} {r['speed']:.2f}x ({r['samples']})" for r in families))
    if len(order) > max_workloads:
        lines.append(f"  ... {len(order) - max_workloads} more measured workload(s)")
    if others:
        lines.append(f"  {others} bootstrapped (workload, family) speed(s) not shown")
    if not measured:
        lines.append("  nothing measured yet: static speeds (config.ACCELERATOR_SPEED)")
    return lines


def format_status(rows: list[dict[str, Any]], jobs: list[dict[str, Any]],
                  throughput: dict[str, Any] | None = None) -> str:
    header = ("NODE", "HEALTH", "ACCELERATORS", "GPU FREE", "GPU MEM FREE GiB", "CPU FREE",
              "LOAD", "BW GB/s (median)", "RESERVED BY")
    table = [header]
    retired = [r for r in rows if r["health"] == RETIRED]
    for r in rows:
        if r["health"] == RETIRED:
            continue
        memory = (f"{min(r['gpu_free_gib']):.0f}-{max(r['gpu_free_gib']):.0f}"
                  if r["gpu_free_gib"] else "-")
        bandwidth = "-" if r["bandwidth_gbps_median"] is None else f"{r['bandwidth_gbps_median']:.2f}"
        load = "-" if r["load_per_cpu"] is None else f"{r['load_per_cpu']:.2f}"
        table.append((r["node_id"][:12], r["health"], r["accelerators"],
                      f"{r['gpus_free']}/{r['gpus']}", memory,
                      f"{r['cpus_free']:g}/{r['cpus']:g}", load, bandwidth,
                      _held_by(r)))
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in table]
    if retired:
        lines.append(f"(and {len(retired)} node(s) removed on purpose, by a scale-down or "
                     "`ray stop`: `status --json` lists them as retired)")
    lines += [""] + (format_jobs(jobs) if jobs else ["jobs: none running or waiting"])
    speeds = format_throughput(throughput)
    lines += [""] + speeds if speeds else []
    for r in rows:
        for probe, error in r["probe_errors"].items():
            lines.append(f"probe error on {r['node_id'][:12]}: {probe}: {error}")
    return "\n".join(lines)


def _held_by(row: dict[str, Any]) -> str:
    """The RESERVED BY column: the scheduler's jobs, and what Ray work outside it holds."""
    outside = [f"{n:g} {what}" for n, what in ((row["cpus_outside"], "CPU"),
                                              (row["gpus_outside"], "GPU")) if n]
    held = row["reservations"] + ([f"outside the scheduler: {', '.join(outside)}"]
                                  if outside else [])
    return ", ".join(held) or "-"


WAITING_STATES = ("waiting", "preempted")  # status rows of jobs in the queue (not running)


def refusal(command: str, name: str, row: dict[str, Any] | None) -> str:
    """Why `preempt NAME` or `cancel NAME` did nothing, from the job's `status` row. Its
    state first: a waiting job was told it was not preemptible (stop its driver), where a
    cancel drops it."""
    if command == "preempt" and row is not None and row.get("state") in WAITING_STATES:
        return (f"job {name!r} is waiting in the queue, not running: nothing to preempt "
                f"(`cancel {name}` drops it)")
    if command == "preempt" and row is not None and row.get("state") == "placed":
        return (f"job {name!r} is placed, its driver has not started it yet: preempt it once "
                f"it runs, or `cancel {name}`")
    if row is not None and not row.get("preemptible", True):
        return (f"job {name!r} is not preemptible (its JobSpec says preemptible: false): its "
                "loop never checkpoints on request, so it cannot be told to stop; stop its "
                "driver instead (`ray job stop`, or Ctrl-C)")
    if command == "preempt" and row is not None and row.get("reason", "").startswith("cancel"):
        return f"job {name!r} is being cancelled: it stops at its next step boundary"
    return f"no job named {name!r} is {'running' if command == 'preempt' else 'running or waiting'}"


def _connect(address: str | None, create_scheduler: bool):
    """(ray, the scheduler) of the running cluster, with a fresh report from every node's
    agent (ensure_control_plane: an agent is started on a node that has none); JobFailed
    saying why not (exit 2: no cluster there, or no scheduler on it yet; 3: its scheduler did
    not answer). Never starts a cluster. `create_scheduler`: create the scheduler where the
    cluster has none (`place`, as `submit --dry-run` does: planning a placement needs one);
    False (`status`, `preempt`, `cancel`): a cluster without one has no jobs to show or act
    on, and is left as it is."""
    import os

    import ray

    from ray_layer.cluster import ClusterConnectionError, connect, ensure_control_plane
    from ray_layer.scheduler_client import SchedulerNotRunning

    # Unlike a job, these commands look at an existing cluster: never start an embedded one
    # ("auto": the cluster started on this machine, when neither --address nor RAY_ADDRESS).
    given = address or os.environ.get("RAY_ADDRESS")
    try:  # (an empty --address, `--address "$UNSET"`, is connect's to refuse: not "not given")
        connect(address if address is not None else None if given else "auto", embedded=False)
    except ClusterConnectionError as e:
        message = on_one_line(str(e))
        if not given and "Could not find any running Ray instance" in message:
            message = ("no Ray cluster runs on this machine (and neither --address nor "
                       "RAY_ADDRESS names one): start one with `ray start --head`, or pass "
                       "--address HOST:6379")
        raise JobFailed(message, EXIT_BAD_INPUT) from None
    try:
        scheduler, _ = ensure_control_plane(create_scheduler=create_scheduler)
    except SchedulerNotRunning as e:  # its message names what creates one
        raise JobFailed(str(e), EXIT_BAD_INPUT) from None
    except (ray.exceptions.RayError, TimeoutError) as e:
        raise JobFailed(f"the scheduler did not come up: {on_one_line(str(e))}",
                        EXIT_NOT_PLACEABLE) from None
    return ray, scheduler


# status, place, preempt and cancel talk to a running cluster and never start one (place
# creates its scheduler where it has none: _connect).
CLUSTER_ADDRESS_HELP = ("the running Ray cluster (host:port); default: RAY_ADDRESS, else the "
                        "one `ray start` runs on this machine")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    status = sub.add_parser("status", help="nodes, accelerators, health, bandwidth, reservations")
    status.add_argument("--json", action="store_true", help="as JSON (docs/operations.md)")
    status.add_argument("--address", help=CLUSTER_ADDRESS_HELP)
    submitting = sub.add_parser("submit", help="run your own training loop where the scheduler "
                            "places it (a job file: JobSpec fields, entrypoint, config)")
    submitting.add_argument("job_file", help="job YAML (see orchestrator/job_file.py)")
    submitting.add_argument("--dry-run", action="store_true",
                        help="print the placement it would get now; run nothing")
    submitting.add_argument("--resume", action="store_true",
                        help="continue the run in its run_dir from its latest checkpoint")
    submitting.add_argument("--json", action="store_true", help="with --dry-run: as JSON")
    submitting.add_argument("--address", help="Ray cluster (host:port, or auto: the one `ray "
                            "start` runs here); default: RAY_ADDRESS, else an embedded Ray "
                            "of its own, which `status` and the others cannot see")
    reading_logs = sub.add_parser("logs", help="a run's reports, one line each (its metrics.jsonl)")
    reading_logs.add_argument("name", help="the job's name")
    reading_logs.add_argument("--run-dir", help=f"default: {DEFAULT_RUNS_ROOT}/NAME")
    reading_logs.add_argument("--follow", action="store_true", help="keep printing new reports")
    place = sub.add_parser("place", help="the placement a job would get, or why not")
    place.add_argument("--spec", required=True, help="JobSpec or job YAML file")
    place.add_argument("--dry-run", action="store_true", required=True,
                       help="required: this command never reserves; jobs reserve when they run")
    place.add_argument("--json", action="store_true", help="as JSON")
    place.add_argument("--address", help=CLUSTER_ADDRESS_HELP)
    for verb, what in (("preempt", "checkpoint a running job and put it back in the queue"),
                       ("cancel", "stop a job (a running one checkpoints first) and drop it")):
        operator = sub.add_parser(verb, help=what)
        operator.add_argument("name", help="the job's name (its run directory's name)")
        operator.add_argument("--address", help=CLUSTER_ADDRESS_HELP)
    simulate = sub.add_parser("simulate", help="replay a job trace on a modelled cluster "
                              "under each placement policy (no Ray)")
    from orchestrator.simulator import add_arguments

    add_arguments(simulate)
    args = parser.parse_args(argv)

    if args.command == "simulate":  # before _connect: the simulator never imports Ray
        from orchestrator.simulator import run_cli

        return run_cli(args)

    if args.command == "logs":
        return print_logs(args.name, args.run_dir, args.follow)
    if args.command in ("place", "submit"):
        try:
            if args.command == "place":
                spec = load_job_file(args.spec).spec
            else:  # checked whole, as submit runs it, with or without --dry-run
                job, entry = _runnable_job(args.job_file, args.dry_run, args.resume, args.json)
                if not args.dry_run:
                    return submit(job, entry, args.resume, args.address)
                return dry_run_submit(job, entry, args.address, args.json)
        except (ConfigError, EntrypointError) as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
    try:
        return _on_the_cluster(args, spec if args.command == "place" else None)
    except KeyboardInterrupt:  # (waiting on ray.init's retries or an answer: up to 60 s)
        print(interrupted_line(args.command), file=sys.stderr)
        return EXIT_INTERRUPTED


def interrupted_line(command: str) -> str:
    """What Ctrl-C during a cluster command says: a preempt or cancel may have reached the
    scheduler before its answer was waited for; the others change nothing."""
    if command in ("preempt", "cancel"):
        return (f"interrupted: {command} did not finish; it may have reached the scheduler: "
                "`status` shows whether the scheduler took it")
    return f"interrupted: {command} did not finish; nothing was changed"


def _on_the_cluster(args, spec: JobSpec | None) -> int:
    """status, place, preempt or cancel, run against the cluster; the exit code."""
    try:
        ray, scheduler = _connect(args.address, create_scheduler=args.command == "place")
    except JobFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    try:
        return _run_command(args, ray, scheduler, spec)
    except ray.exceptions.RayError as e:
        print(f"error: the scheduler did not answer: {on_one_line(str(e))}", file=sys.stderr)
        return EXIT_NOT_PLACEABLE


def _runnable_job(job_file: str, dry_run: bool, resume: bool, as_json: bool):
    """(the job file, its entry point imported and checked); ConfigError / EntrypointError
    naming what is wrong, the flags that do not go together included."""
    if as_json and not dry_run:
        raise ConfigError("--json goes with --dry-run (what is printed as JSON is the "
                          "placement)")
    if resume and dry_run:
        raise ConfigError("--resume and --dry-run do not go together: a dry run starts "
                          "nothing to resume")
    job = load_job_file(job_file)
    if job.entrypoint is None:
        raise ConfigError(f"{job_file}: entrypoint is missing: the training loop to run, "
                          "'package.module:function' or 'path/to/script.py:function'")
    try:
        return job, load_entrypoint(job.entrypoint, job.path.parent)
    except EntrypointError as e:  # named with the file, as every other job-file error is
        raise EntrypointError(f"{job_file}: {e}") from None


def submit(job, entry, resume: bool, address: str | None) -> int:
    """Run the job file's training loop through the launcher; the exit code says how it
    ended (0, or orchestrator/job_exit.py's codes)."""
    from orchestrator.launch import fit

    code, launched = run_job(
        lambda: fit(entry.function, spec=job.spec, config=job.config, run_dir=job.run_dir,
                    resume=resume, address=address, queue_timeout_s=job.queue_timeout_s,
                    max_failures=job.max_failures, runtime_env=job.runtime_env,
                    keep_checkpoints=job.keep_checkpoints, stuck_timeout_s=job.stuck_timeout_s),
        on_interrupt="interrupted; continue with submit --resume (or, before its first "
                     "checkpoint, submit it again)")
    if code == 0:
        print(done_line(job.spec.name, launched, job.run_dir))
    return code


def done_line(name: str, launched, run_dir: str | Path | None = None) -> str:
    """What a finished submit says: where it ran, its last checkpointed report and where
    that checkpoint is; a loop that saved none is told so, not shown `{}` and `None`, with
    the `logs` command that reads its reports (`--run-dir` for a job file's own run_dir), or
    that it reported nothing (its metrics log in `run_dir` holds no report)."""
    # A numpy number as the one it holds, a NaN too (json_figure's null for metrics.jsonl
    # read as a figure it cannot show: a diverged np.float32 loss was left out).
    figures = ((k, python_scalar(v)) for k, v in (launched.result.metrics or {}).items())
    metrics = {k: v for k, v in figures if isinstance(v, (int, float, str))}
    checkpoint = launched.result.checkpoint
    moved = f"; preempted or moved {len(launched.yields)}x" if launched.yields else ""
    head = f"{name}: done on {len(launched.placement.worker_nodes)} worker(s)"
    if checkpoint is None:
        directory = (Path(run_dir).expanduser() if run_dir is not None
                     else DEFAULT_RUNS_ROOT.expanduser() / name)
        if not read_metrics(directory):  # (`logs NAME` printed nothing)
            return (f"{head}{moved}; the loop saved no checkpoint and reported nothing (pass "
                    "metrics, and a checkpoint to make the run resumable, to launch.report)")
        return (f"{head}{moved}; the loop saved no checkpoint (pass one to launch.report to "
                f"make the run resumable; its reports are in `{logs_command(name, run_dir)}`)")
    return (f"{head}; last checkpointed report {json.dumps(metrics)}{moved}\n"
            f"checkpoint: {checkpoint.path}")


def logs_command(name: str, run_dir: str | Path | None) -> str:
    """`logs NAME`, with `--run-dir DIR` where the run is not the runs root's NAME (a job
    file's run_dir: `logs NAME` alone looked under the runs root, "no run directory")."""
    if run_dir is None or Path(run_dir).expanduser() == DEFAULT_RUNS_ROOT.expanduser() / name:
        return f"logs {name}"
    return f"logs {name} --run-dir {shlex.quote(str(run_dir))}"


# A run folder that no process holds may still be written to: a bench script's local train
# (scripts/bench_*.py, LocalSession) takes no lock. `logs --follow` follows it while its files
# change, and says it is not running once none has changed for this long (a report or a
# checkpoint a minute keeps such a run followed).
LOCKLESS_QUIET_S = 60.0


def print_logs(name: str, run_dir: str | None, follow: bool, every_s: float = 1.0,
               quiet_s: float = LOCKLESS_QUIET_S) -> int:
    """Each report of the run, oldest first, one line each; with `follow`, new ones as they
    come, until the run has ended (its run_end record: then the run's own exit code, and its
    error on stderr), its driver is gone from this host without one (killed outright: exit
    EXIT_FAILED), no process holds it and its files have not changed for `quiet_s` (exit
    EXIT_FAILED) or Ctrl-C."""
    from orchestrator.launch import run_name_problem

    if run_dir is not None and not run_dir.strip():  # (`--run-dir "$UNSET"`): not left out
        print("error: --run-dir is empty: give the run's directory, or leave it out (the "
              "runs root / NAME)", file=sys.stderr)
        return EXIT_BAD_INPUT
    # (a name no job can have: `logs ..` read the runs root's parent as if a run of no reports)
    problem = None if run_dir else "is empty" if not name else run_name_problem(name)
    if problem:
        print(f"error: job name {name!r} {problem}: `logs` reads the run directory of that "
              "name under the runs root (or the one --run-dir gives)", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        directory = (expand_home(run_dir, "--run-dir") if run_dir
                     else DEFAULT_RUNS_ROOT.expanduser() / name)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    # Only where the directory is the name's, under the runs root (a job file's run_dir may
    # be elsewhere): one given by --run-dir is simply not there.
    hint = "" if run_dir else "pass --run-dir if the job set run_dir"
    if not directory.is_dir() and not follow:
        print(f"error: no run directory {directory}" + (f" ({hint})" if hint else ""),
              file=sys.stderr)
        return EXIT_BAD_INPUT
    if not directory.is_dir():  # a job just submitted makes it when it is launched
        print(f"waiting for {directory} (the job's first report" + (f"; {hint})" if hint else ")"),
              file=sys.stderr, flush=True)
    # (each poll reads only what was appended since the last)
    offset, seen, free, quiet = 0, None, None, QuietTimer()
    try:
        while True:
            file = log_identity(directory)
            unchanged = seen is not None and file == seen
            if seen is not None and _replaced(seen, file):
                offset = 0  # a new history: shown from its start when it comes
                print(f"({directory / METRICS_LOG} was removed or replaced: a new run's "
                      "reports follow)", file=sys.stderr, flush=True)
            seen = file
            # (looked at before the reads: every report the run wrote is read after it; the
            # driver before its end: one that wrote its end and exited is not taken as killed)
            gone = holder_gone(directory / RUN_LOCK) if follow else None
            ended = run_end(directory) if follow else None
            # (reports but no writer: at two looks in a row, as a run starting in a folder of
            # reports takes its lock a moment after the folder is there, and nothing written
            # for quiet_s: a writer that takes no lock, bench_train's, runs while it writes)
            free_before, free = free, (held_by_none(directory / RUN_LOCK)
                                       if follow and file is not None and file[1] else None)
            quiet_for = quiet.look(newest_write(directory)) if free is not None else 0.0
            try:
                records, offset = read_metrics_from(directory, offset)
            except OSError as e:  # not its absence (no reports yet): unreadable
                print(f"error: cannot read {directory / METRICS_LOG}: {e.strerror or e}",
                      file=sys.stderr)
                return EXIT_BAD_INPUT
            for record in records:
                print(format_report(record), flush=True)
            if not follow:
                return 0
            if ended is not None:  # (its error on one line: an older ended.json has two)
                code = ended["exit_code"]
                print("(the run has ended: " + ("done" if code == 0 else
                      f"exit {code}" + (f": {on_one_line(str(ended['error']))}"
                                         if ended.get("error") else ""))
                      + ")", file=sys.stderr, flush=True)
                return code
            if gone is not None:
                print(f"(the run has ended: its driver, {gone}, is gone from this host without "
                      "recording how it ended (killed outright: kill -9, out of memory); "
                      "--resume continues it from its last checkpoint)", file=sys.stderr,
                      flush=True)
                return EXIT_FAILED
            if (free is not None and free_before is not None and unchanged
                    and quiet_for >= quiet_s):
                print(f"(the run is not running: no process holds its {RUN_LOCK} ({free}), "
                      f"it recorded no end ({ENDED_FILE}) and none of its files has changed "
                      f"for {quiet_s:g} s: a run that takes no lock (a bench script's) has "
                      "stopped, or a run from before runs were locked, or a copied folder; "
                      "--resume continues it from its last checkpoint)",
                      file=sys.stderr, flush=True)
                return EXIT_FAILED
            time.sleep(every_s)
    except KeyboardInterrupt:
        return 0


class QuietTimer:
    """How long a run folder's files have gone unchanged, by this host's clock: since their
    newest modification at the first look (or since that look, where the writer's clock is
    ahead of this one's), then since the look that last saw them change (a writer's clock
    behind this one's, or a file system's coarse times, never cut a live run short)."""

    def __init__(self) -> None:
        self.written: float | None = None  # newest_write at the last look
        self.since: float | None = None

    def look(self, written: float | None) -> float:
        """Seconds unchanged, given newest_write now (0 while there is nothing to judge)."""
        now = time.time()
        if written is not None and written != self.written:
            self.since = min(written, now) if self.written is None else now
            self.written = written
        return 0.0 if self.since is None else now - self.since


def newest_write(directory: Path) -> float | None:
    """The newest modification time of `directory` and of what lies directly in it (reports,
    checkpoint folders, a checkpoint's staging copy): when a writer that takes no lock last
    wrote there. None where the folder cannot be listed."""
    try:
        times = [directory.stat().st_mtime]
        with os.scandir(directory) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):  # (removed since listed: a pruned one)
                    times.append(entry.stat(follow_symlinks=False).st_mtime)
    except OSError:
        return None
    return max(times)


def _replaced(before: tuple, now: tuple | None) -> bool:
    """Whether metrics.jsonl is no longer the file it was: gone, another file, or shorter."""
    return now is None or now[0] != before[0] or now[1] < before[1]


def log_identity(directory: Path) -> tuple[tuple[int, int], int] | None:
    """((device, inode), size) of a run's metrics.jsonl, or None while there is none."""
    try:
        stat = (directory / METRICS_LOG).stat()
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino), stat.st_size


def format_report(record: dict[str, Any]) -> str:
    """One metrics.jsonl record as a line: time, step, the figures, and a checkpoint mark."""
    # Not LINE_FIELDS' "non_finite": read_metrics folds a line's back into its figures, and
    # an older line's is the loop's own figure (it is renamed `non_finite_` since).
    figures = " ".join(f"{k}={_clock(v) if k.endswith('_at') else _short(v)}"
                       for k, v in record.items()
                       if k not in ("time", "checkpoint", "step", "worker_nodes")
                       and isinstance(v, (int, float, str)) and not isinstance(v, bool))
    return (f"{_clock(record.get('time', 0))} step {record.get('step', '-')}: {figures}"
            + (" [checkpoint]" if record.get("checkpoint") else ""))


def _clock(unix_time: Any) -> str:
    """A Unix time as the local clock reads it (`started_at=1.797e+09` said nothing)."""
    try:
        return time.strftime("%H:%M:%S", time.localtime(unix_time))
    except (TypeError, ValueError, OverflowError, OSError):  # a hand-edited line's time
        return "--:--:--"


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _run_command(args, ray, scheduler, spec: JobSpec | None) -> int:
    def answer(ref):
        return ray.get(ref, timeout=CALL_TIMEOUT_S)

    if args.command == "status":
        snapshot = answer(scheduler.snapshot.remote())
        rows = status_rows(snapshot)
        if args.json:
            print(json.dumps({"time": time.time(), "nodes": rows, "jobs": snapshot["jobs"],
                              "queue": [q.__dict__ for q in snapshot["queue"]],
                              "throughput": snapshot.get("throughput"),
                              "autoscaling": snapshot.get("autoscaling")}, indent=2))
        else:
            print(format_status(rows, snapshot["jobs"], snapshot.get("throughput")))
        return 0
    if args.command in ("preempt", "cancel"):
        done = answer(getattr(scheduler, args.command).remote(args.name))
        if not done:
            jobs = {row["job"]: row for row in answer(scheduler.snapshot.remote())["jobs"]}
            print(f"error: {refusal(args.command, args.name, jobs.get(args.name))}",
                  file=sys.stderr)
            # The name is wrong for this command (no such job, or one that cannot be told to
            # stop): bad input, nothing was done. 3 would say the scheduler failed.
            return EXIT_BAD_INPUT
        print(f"{args.command}: {args.name}: " + (
            "it checkpoints at its next step boundary, then waits in the queue"
            if args.command == "preempt" else
            "dropped (a running job checkpoints at its next step boundary first)"))
        return 0
    return print_placement(answer(scheduler.place.remote(spec, "", True, True)), args.json)


def dry_run_submit(job, entry, address: str | None, as_json: bool) -> int:
    """Where `submit` would run the job, reserving nothing, after the checks `submit` makes
    before it starts anything (launch.prepare_fit: the run directory, the runtime_env, the
    loop reaching the workers), so that a dry run passes only what submit would run. On an
    embedded Ray when no cluster is given, as submit itself and `jobs/pretrain.py --dry-run`
    do (`place` uses a running cluster only)."""
    from orchestrator.launch import prepare_fit
    from orchestrator.runs import has_checkpoints
    from ray_layer.launch import dry_run_placement

    def check_and_place() -> int:
        _, directory = prepare_fit(
            entry.function, spec=job.spec, config=job.config, run_dir=job.run_dir,
            resume=None, queue_timeout_s=job.queue_timeout_s, max_failures=job.max_failures,
            runtime_env=job.runtime_env, keep_checkpoints=job.keep_checkpoints,
            stuck_timeout_s=job.stuck_timeout_s)
        if has_checkpoints(directory):  # to stderr: --json's output stays one JSON document
            print(f"note: run_dir {directory} holds checkpoints: submit it with --resume to "
                  "continue that run", file=sys.stderr)
        return print_placement(dry_run_placement(job.spec, address), as_json)

    code, placeable = run_job(check_and_place, on_interrupt="interrupted: nothing was placed")
    return code or placeable


def print_placement(decision, as_json: bool) -> int:
    """A dry run's answer, as text or JSON; the exit code says whether it is placeable now."""
    if as_json:
        fields = dict(decision.__dict__)
        if not math.isfinite(fields.get("bottleneck_gbps", 0)):
            fields["bottleneck_gbps"] = None  # single node: no network link (strict JSON)
        print(json.dumps(fields, indent=2, default=str))
    else:
        print(describe_decision(decision))
    return 0 if hasattr(decision, "worker_nodes") else EXIT_NOT_PLACEABLE


def main_piped(argv: list[str] | None = None) -> int:
    """main(), where a reader that stops early (`logs NAME | head`) ends the output quietly,
    as for any Unix tool, instead of a BrokenPipeError traceback."""
    import os

    try:
        code = main(argv)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # (stdout pointed at /dev/null: the interpreter's own flush at exit must not fail too)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main_piped())
