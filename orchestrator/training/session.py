"""Where the training loop runs: the few things that differ between Ray Train and a plain
process. The loop (`loop.train`) talks only to this interface, so there is one loop; the Ray
Train side of it is ray_layer/train_session.py.
"""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch

from orchestrator.runs import append_metrics, checkpoint_dirs, checkpoint_name
from orchestrator.training.checkpoint import (CheckpointError, free_space_note, sync_directory,
                                              sync_tree)


class TrainSession(Protocol):
    """What the training loop needs from where it runs (rank, world size, device, model
    wrapping, checkpoints to resume from, reporting), so one loop runs under Ray Train, in a
    plain process and in tests."""

    world_rank: int
    world_size: int
    device: torch.device

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move to the device and wrap for data parallelism when there are several workers."""

    def checkpoint_dirs(self) -> contextlib.AbstractContextManager[list[str]]:
        """Directories of the checkpoints to resume from, newest first ([] = fresh start).
        Older ones are there so a corrupt newest checkpoint can fall back to a good one."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        """Publish metrics (every rank calls this); rank 0 may attach a checkpoint directory."""

    def passed_over(self, directory: str) -> None:
        """The loop found this checkpoint unusable (corrupt, cut, unreadable) and resumed from
        an older one: retention must not keep it in place of a good one."""

    def directive(self) -> str | None:
        """Rank 0 only, at step boundaries: why the job should checkpoint and stop now (the
        scheduler preempts, migrates or cancels it), or None to go on. Must not block."""


class LocalSession:
    """One process, no Ray: checkpoints go to `run_dir/checkpoint_<step>`, last `keep` kept."""

    world_rank = 0
    world_size = 1

    def __init__(self, run_dir: str | Path, keep: int = 3,
                 device: torch.device | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.keep = keep
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.reports: list[dict[str, Any]] = []
        self.unusable: set[Path] = set()  # checkpoints the loop passed over as unusable

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def directive(self) -> str | None:
        return None  # no scheduler: a plain process runs to the end

    def checkpoints(self) -> list[Path]:
        return checkpoint_dirs(self.run_dir)[::-1]

    @contextlib.contextmanager
    def checkpoint_dirs(self) -> Iterator[list[str]]:
        yield [str(p) for p in reversed(self.checkpoints())]

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        self.reports.append(dict(metrics))
        target = self.run_dir / checkpoint_name(metrics["step"])
        self._keep_checkpoint(checkpoint_dir, target)
        append_metrics(self.run_dir, metrics, str(target) if checkpoint_dir else None)

    def _keep_checkpoint(self, checkpoint_dir: str | None, target: Path) -> None:
        if checkpoint_dir is None:
            return
        # Copy under a name `checkpoints()` ignores, then rename: a crash mid-copy never leaves
        # a half checkpoint that would be taken for the latest.
        staging = self.run_dir / f".staging_{target.name}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            shutil.copytree(checkpoint_dir, staging)
            sync_tree(staging)
        except OSError as e:  # (a full disk; shutil.Error too: a list of (src, dst, why))
            # Nothing before it is touched; the partial copy would hold the space.
            shutil.rmtree(staging, ignore_errors=True)
            raise CheckpointError(f"checkpoint {target} cannot be written: {_copy_problem(e)}"
                                  f"{free_space_note(self.run_dir)}") from None
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
        sync_directory(self.run_dir)  # the rename, before older checkpoints go
        self._prune_checkpoints(target)

    def passed_over(self, directory: str) -> None:
        self.unusable.add(Path(directory))

    def _prune_checkpoints(self, written: Path) -> None:
        """Keep `keep` checkpoints: the one just written and the newest by step of the rest
        (runs.checkpoint_age, the order a resume takes them in), those the loop passed over as
        unusable pruned first: after a fallback past a corrupt newer checkpoint, its higher
        step never outranks the good one resumed from. Not by the directories' times: a run
        copied with `cp -r` or restored from a backup has the copy's, in its order, and a
        resume that saved once pruned the checkpoint it had resumed from."""
        self.unusable.discard(written)  # (a step written again replaced the unusable one)
        others = sorted((p for p in self.checkpoints() if p != written),  # (oldest first)
                        key=lambda p: p not in self.unusable)
        for old in others[:max(len(others) - (self.keep - 1), 0)]:
            shutil.rmtree(old)
            self.unusable.discard(old)


def _copy_problem(error: OSError) -> str:
    """What went wrong in a copy: shutil.Error gathers (source, target, why) of each file."""
    if isinstance(error, shutil.Error) and error.args and isinstance(error.args[0], list):
        reasons = [entry[2] for entry in error.args[0]
                   if isinstance(entry, tuple) and len(entry) == 3]
        if reasons:
            why = str(reasons[0])
            return why.split("] ", 1)[1] if why.startswith("[Errno") and "] " in why else why
    return error.strerror or str(error)


def gpu_shortfall(free_bytes: int, min_gpu_memory_gb: float, node_id: str,
                  gpu_index: int) -> dict | None:
    """The report of a GPU with less free memory than asked, or None when it has enough."""
    if free_bytes >= min_gpu_memory_gb * 1024 ** 3:
        return None
    return {"node_id": node_id, "gpu_index": gpu_index,
            "free_gb": round(free_bytes / 1024 ** 3, 2), "needed_gb": min_gpu_memory_gb}
