"""Where the training loop runs: the few things that differ between Ray Train and a plain
process. The loop (`loop.train`) talks only to this interface, so there is one loop.
"""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch

from orchestrator.runs import append_metrics


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

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def directive(self) -> str | None:
        return None  # no scheduler: a plain process runs to the end

    def checkpoints(self) -> list[Path]:
        return sorted(p for p in self.run_dir.glob("checkpoint_*") if p.is_dir())

    @contextlib.contextmanager
    def checkpoint_dirs(self) -> Iterator[list[str]]:
        yield [str(p) for p in reversed(self.checkpoints())]

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        self.reports.append(dict(metrics))
        target = self.run_dir / f"checkpoint_{int(metrics['step']):08d}"
        self._keep_checkpoint(checkpoint_dir, target)
        append_metrics(self.run_dir, metrics, str(target) if checkpoint_dir else None)

    def _keep_checkpoint(self, checkpoint_dir: str | None, target: Path) -> None:
        if checkpoint_dir is None:
            return
        # Copy under a name `checkpoints()` ignores, then rename: a crash mid-copy never leaves
        # a half checkpoint that would be taken for the latest.
        staging = self.run_dir / f".staging_{target.name}"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(checkpoint_dir, staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
        for old in self.checkpoints()[:-self.keep]:
            shutil.rmtree(old)


class RayTrainSession:
    """Inside a Ray Train worker. Ray Train owns checkpoint storage and restarts."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.world_rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()
        # GPUs declared by node labels on a machine without CUDA (modelling a heterogeneous
        # cluster on CPUs): Ray hands out the logical GPU, the worker trains on the CPU.
        self.declared_gpu_only = self.device.type == "cuda" and not torch.cuda.is_available()
        if self.declared_gpu_only:
            self.device = torch.device("cpu")
        self.node_id = ray.get_runtime_context().get_node_id()
        self._worker_nodes: list[str] | None = None
        self._asking = None  # the scheduler's answer on its way (an ObjectRef)
        self._scheduler = None
        self._asked_at = float("-inf")
        self._last_checkpoint_at: float | None = None

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        if self.declared_gpu_only:  # Ray's prepare_model would move it to a CUDA device
            model = model.to(self.device)
            return torch.nn.parallel.DistributedDataParallel(model) \
                if self.world_size > 1 else model
        return ray.train.torch.prepare_model(model)

    @contextlib.contextmanager
    def checkpoint_dirs(self) -> Iterator[list[str]]:
        """Ray Train's latest checkpoint first, then, on local or shared-filesystem storage,
        the older ones it kept beside it (newest first). On remote storage (S3, GCS) only the
        latest is fetched."""
        import pyarrow.fs
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield []
            return
        if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
            latest = Path(checkpoint.path)
            yield [str(latest)] + [str(p) for p in older_checkpoints(latest)]
            return
        with checkpoint.as_directory() as directory:
            yield [directory]

    def worker_nodes(self) -> list[str]:
        """Node id of every worker, by rank, so the launcher can check workers landed where
        the scheduler placed them. Collective: every rank calls it (report() does)."""
        if self._worker_nodes is None:
            import torch.distributed as dist

            nodes: list[str | None] = [None] * self.world_size
            if dist.is_initialized():
                dist.all_gather_object(nodes, self.node_id)
            else:
                nodes = [self.node_id]
            self._worker_nodes = [str(n) for n in nodes]
        return self._worker_nodes

    def gpu_memory_shortfall(self, min_gpu_memory_gb: float) -> dict | None:
        """This worker's GPU when it lacks the free memory the job asks for (memory used
        outside Ray: Ray hands out GPU ids, not memory), else None."""
        if self.device.type != "cuda" or not min_gpu_memory_gb:
            return None
        import ray

        free_bytes, _ = torch.cuda.mem_get_info(self.device)
        return gpu_shortfall(free_bytes, min_gpu_memory_gb, self.node_id,
                             int(ray.get_gpu_ids()[0]))

    def directive(self) -> str | None:
        """Asks the scheduler at most once a second without waiting: the answer is read at a
        later step boundary. A run without a scheduler (plain Ray Train) never yields."""
        import time

        import ray
        import ray.train

        if self._asking is not None:
            ready, _ = ray.wait([self._asking], timeout=0)
            if not ready:
                return None
            try:
                answer = ray.get(self._asking)
            except ray.exceptions.RayError:  # the scheduler restarting: ask again later
                answer = None
            self._asking = None
            if answer:
                return f"{answer['kind']}: {answer['reason']}"
        if time.monotonic() - self._asked_at >= 1.0:
            self._asked_at = time.monotonic()
            self._scheduler = self._scheduler or _scheduler_or_none()
            if self._scheduler is not None:
                job = ray.train.get_context().get_experiment_name()
                self._asking = self._scheduler.directive.remote(job, self._last_checkpoint_at)
        return None

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        import time

        import ray.train

        from actors.telemetry import record_all
        from orchestrator.metrics import training_samples

        # Also to Prometheus (via Ray's metrics agent), per worker: loss, tokens/s, MFU, ...
        # The run is Ray Train's experiment name: the run directory's name.
        run = ray.train.get_context().get_experiment_name()
        record_all(training_samples(metrics, run, self.world_rank))
        metrics = {**metrics, "worker_nodes": self.worker_nodes()}
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)
        if checkpoint is not None:
            self._last_checkpoint_at = time.time()


def older_checkpoints(latest: Path) -> list[Path]:
    """The checkpoints beside `latest` that are older, newest first: where to fall back to.
    Ray names checkpoints by timestamp (name order is age order) and keeps its
    checkpoint_manager_snapshot.json beside them: directories only. A newer directory is a
    checkpoint a dying worker wrote that Ray Train never registered (seen in the chaos run):
    not a fallback."""
    return sorted((p for p in latest.parent.glob("checkpoint_*")
                   if p.is_dir() and p.name < latest.name), reverse=True)


def gpu_shortfall(free_bytes: int, min_gpu_memory_gb: float, node_id: str,
                  gpu_index: int) -> dict | None:
    """The report of a GPU with less free memory than asked, or None when it has enough."""
    if free_bytes >= min_gpu_memory_gb * 1024 ** 3:
        return None
    return {"node_id": node_id, "gpu_index": gpu_index,
            "free_gb": round(free_bytes / 1024 ** 3, 2), "needed_gb": min_gpu_memory_gb}


def _scheduler_or_none():
    import ray

    from actors.scheduler import NAMESPACE, SCHEDULER_NAME

    try:
        return ray.get_actor(SCHEDULER_NAME, namespace=NAMESPACE)
    except ValueError:
        return None
