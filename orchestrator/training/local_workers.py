"""Several training workers as local processes, without Ray: a gloo process group over
torch.multiprocessing. Used by the tests and benchmarks of the strategies (DDP, FSDP) on a CPU
machine; Ray Train is the product path (ray_layer/train_session.py).

The session merges every worker's checkpoint directory of one report into
`run_dir/checkpoint_<step>`, as Ray Train merges them in its storage.
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from orchestrator.runs import append_metrics, checkpoint_name
from orchestrator.training.checkpoint import sync_directory, sync_tree
from orchestrator.training.session import LocalSession

RESULT_FILE = "worker_result.json"


class WorkerSession(LocalSession):
    """One of `world_size` local worker processes in an initialised process group."""

    def __init__(self, run_dir: str | Path, rank: int, world_size: int, keep: int = 3,
                 crash_at: int | None = None) -> None:
        super().__init__(run_dir, keep=keep, device=torch.device("cpu"))
        self.world_rank, self.world_size = rank, world_size
        self.crash_at = crash_at  # die after this step's report, like a killed worker

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        return torch.nn.parallel.DistributedDataParallel(model) if self.world_size > 1 else model

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        target = self.run_dir / checkpoint_name(metrics["step"])
        staging = self.run_dir / f".staging_{target.name}"
        if self.world_rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        dist.barrier()
        if checkpoint_dir is not None:  # every worker's files into one directory
            shutil.copytree(checkpoint_dir, staging, dirs_exist_ok=True)
        dist.barrier()
        if self.world_rank == 0:
            self.reports.append(dict(metrics))
            saved = staging.exists()
            if saved:
                sync_tree(staging)  # every worker's files (the barrier above: all copied)
                if target.exists():
                    shutil.rmtree(target)
                staging.rename(target)
                sync_directory(self.run_dir)
                self._prune_checkpoints(target)
            append_metrics(self.run_dir, metrics, str(target) if saved else None)
        dist.barrier()
        if self.crash_at is not None and metrics["step"] == self.crash_at:
            raise RuntimeError("worker killed")


def _worker(rank: int, world_size: int, config: dict, run_dir: str, rendezvous: str,
            crash_at: int | None, threads: int) -> None:
    from orchestrator.config import TrainConfig
    from orchestrator.training.loop import train

    torch.set_num_threads(threads)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # no host-name lookup on the loopback
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=120))
    try:
        train_config = TrainConfig.from_dict(config)
        session = WorkerSession(run_dir, rank, world_size, keep=train_config.keep_checkpoints,
                                crash_at=crash_at)
        try:
            metrics = train(train_config, session)
            outcome = {"metrics": metrics}
        except Exception as e:  # reported to the caller as the error line, not a traceback
            outcome = {"error": f"{type(e).__name__}: {e}"}
        if rank == 0:
            (Path(run_dir) / RESULT_FILE).write_text(json.dumps(outcome, default=str))
    finally:
        dist.destroy_process_group()


def train_on_local_workers(config, run_dir: str | Path, world_size: int = 2,
                           crash_at: int | None = None, threads: int = 1) -> dict[str, Any]:
    """Train `config` (a TrainConfig) on `world_size` local processes; rank 0's outcome:
    {"metrics": ...} or {"error": "Type: message"}."""
    import torch.multiprocessing as mp

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RESULT_FILE).unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="rendezvous-") as tmp:
        mp.spawn(_worker, args=(world_size, config.to_dict(), str(run_dir),
                                os.path.join(tmp, "store"), crash_at, threads),
                 nprocs=world_size, join=True)
    return json.loads((run_dir / RESULT_FILE).read_text())
