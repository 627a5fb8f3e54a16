"""Run directories: where a run's checkpoints, resolved config and summary live.

Layout (Ray Train's, which owns checkpoint storage): <run_dir>/checkpoint_<timestamp>/ and
<run_dir>/checkpoint_manager_snapshot.json; this project adds config.json and summary.json.
"""
from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

DEFAULT_RUNS_ROOT = Path(os.environ.get("ORCHESTRATOR_RUNS_DIR", "~/orchestrator-runs"))


class RunDirError(ValueError):
    """The run directory cannot be used as asked; the message names it."""


def has_checkpoints(run_dir: Path) -> bool:
    return run_dir.is_dir() and any(p.is_dir() for p in run_dir.glob("checkpoint_*"))


def new_run_dir(root: Path, prefix: str, now: dt.datetime) -> Path:
    """A run directory that does not exist yet (two runs in the same second get -2, -3...)."""
    base = root.expanduser().resolve() / f"{prefix}-{now:%Y%m%d-%H%M%S}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def latest_run_with_checkpoints(root: Path) -> Path | None:
    root = root.expanduser()
    runs = [p for p in root.glob("*") if has_checkpoints(p)] if root.is_dir() else []
    return max(runs, key=lambda p: p.stat().st_mtime).resolve() if runs else None


def resolve_run_dir(run_dir: str | None, resume: bool, root: Path, prefix: str,
                    now: dt.datetime) -> Path:
    """The run directory to use, refusing combinations that would lose or mix up work:
    resuming where there is nothing to resume, or silently continuing an old run."""
    if run_dir is None:
        if not resume:
            return new_run_dir(root, prefix, now)
        latest = latest_run_with_checkpoints(root)
        if latest is None:
            raise RunDirError(f"--resume: no run with checkpoints under {root.expanduser()}; "
                              "pass --run-dir of the run to continue")
        return latest
    path = Path(run_dir).expanduser().resolve()
    if resume and not has_checkpoints(path):
        raise RunDirError(f"--resume: no checkpoint in run dir {path}")
    if not resume and has_checkpoints(path):
        raise RunDirError(f"run dir {path} already holds checkpoints from an earlier run; "
                          "pass --resume to continue it, or choose another --run-dir")
    return path
