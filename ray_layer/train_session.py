"""The training loop inside Ray Train: `train_under_ray` is TorchTrainer's per-worker entry
point and `RayTrainSession` the TrainSession (orchestrator/training/session.py) it trains with:
rank, device, checkpoints from Ray Train's storage, reports to Ray Train and Prometheus, and the
scheduler's directives (yield for preemption or migration) read at step boundaries.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import pyarrow.fs
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from orchestrator.config import TrainConfig
from orchestrator.metric_catalogue import training_samples
from orchestrator import throughput
from orchestrator.probes import nvml_index_and_process_bytes
from orchestrator.runs import append_metrics, checkpoint_dirs, checkpoint_name
from orchestrator.training.checkpoint import (CheckpointError, free_space_note,
                                              sync_directory, sync_tree)
from orchestrator.training.loop import TrainingDiverged, say, train
from orchestrator.training.session import gpu_shortfall
from ray_layer.scheduler_client import scheduler_or_none
from ray_layer.telemetry import record_all

# The key of train_under_ray's return value naming GPUs without the free memory asked: the
# launcher's own name, as a user's loop returns its own values (Result.return_value) too.
GPU_SHORTFALL = "orchestrator_gpu_too_small"
# The key of its return value saying why the run diverged (TrainingDiverged): returned, not
# raised, since Ray Train would restart the workers from the last checkpoint, and the same
# seeds would diverge the same way max_failures times over.
DIVERGED = "diverged"


def train_under_ray(config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train's per-worker entry point (TorchTrainer's train_loop_per_worker). `config`:
    {"train": TrainConfig as a dict, "min_gpu_memory_gb": what each worker's GPU must have
    free, "verified_checkpoint": a resume's newest checkpoint as its launcher hashed it
    (runs.verified_newest: loaded without hashing it again while unchanged)}. Every worker
    first checks the GPU it was given; if any lacks the memory, all stop before training
    and return {GPU_SHORTFALL: [...]}, so the job is placed again without it
    (ray_layer/placed_run.py); a resumed run whose checkpoint is already at --max-steps
    returns {"already_complete": True, "step": ...}; a run that diverged returns {DIVERGED:
    why}. Returned, not only reported: Ray Train's Result keeps the metrics of the latest
    report *with a checkpoint* (none here: None on a fresh run, an earlier attempt's on a
    resumed one), while `Result.return_value` is rank 0's return."""
    session = RayTrainSession()
    session.verified_checkpoint = config.get("verified_checkpoint")
    short = session.gpu_memory_shortfall(config.get("min_gpu_memory_gb", 0.0))
    found = [short]
    if dist.is_available() and dist.is_initialized():
        found = [None] * session.world_size
        dist.all_gather_object(found, short)
    found = [f for f in found if f]
    if found:
        if session.world_rank == 0:
            say("GPU(s) without the free memory asked: " + "; ".join(
                f"GPU {f['gpu_index']} of node {f['node_id'][:12]}: {f['free_gb']} GiB free, "
                f"{f['needed_gb']:g} needed" for f in found))
        # Not reported: no step ran, and a report's `step` (it needs one: metrics.jsonl's
        # readers, the step gauge) read as a step 0 the run took. The worker log (above) and
        # the driver (placed_run.PlacedRun) say it.
        return {GPU_SHORTFALL: found}
    try:
        metrics = train(TrainConfig.from_dict(config["train"]), session)
    except TrainingDiverged as e:  # (raised on every worker at the same report)
        return {DIVERGED: str(e)}
    if metrics.get("already_complete"):
        # Reported without a checkpoint, so Result.metrics are the checkpoint's report (a
        # step past --max-steps): the driver learns it from the return value.
        return {"already_complete": True, "step": metrics["step"]}
    return None


def quiet_ray_train_reports() -> None:
    """Ray Train logs every report's whole metrics dict at INFO from each worker ("Reporting
    training result N: TrainingReport(...)"): a screenful per report beside the loop's own
    one-line progress. Its logger is named by its file's path, so it is looked up that way.
    The module is Ray's internal one: if a Ray release moves it, the log stays as Ray makes it
    rather than training failing over a log line."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def declared_gpu_only(device: torch.device) -> bool:
    """GPUs declared by node labels on a machine without CUDA (modelling a heterogeneous
    cluster on CPUs): Ray hands out the logical GPU, the worker trains on the CPU."""
    return device.type == "cuda" and not torch.cuda.is_available()


def record_training(metrics: dict[str, Any], world_rank: int, device_type: str) -> None:
    """One report's training figures (metric_catalogue.TRAIN_REPORT_KEYS) to Prometheus via
    Ray's metrics agent, per worker: loss, tokens/s, MFU, ... The run is Ray Train's
    experiment name: the run directory's name. For RayTrainSession.report and a loop of the
    user's own (ray_layer/user_loop.report) alike."""
    run = ray.train.get_context().get_experiment_name()
    record_all(training_samples(metrics, run, world_rank, device_type))


class RayTrainSession:
    """Inside a Ray Train worker. Ray Train owns checkpoint storage and restarts."""

    # The resume's newest checkpoint as its launcher hashed it (runs.verified_newest; set by
    # train_under_ray): loaded without hashing it again while its files are unchanged.
    verified_checkpoint: dict[str, Any] | None = None

    def __init__(self) -> None:
        quiet_ray_train_reports()
        context = ray.train.get_context()
        self.world_rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.declared_gpu_only = declared_gpu_only(self.device)
        if self.declared_gpu_only:
            self.device = torch.device("cpu")
        self.node_id = ray.get_runtime_context().get_node_id()
        self._worker_nodes: list[str] | None = None
        self._watch = DirectiveWatch()

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.declared_gpu_only:  # Ray's prepare_model would move it to a CUDA device
            model = model.to(self.device)
            return torch.nn.parallel.DistributedDataParallel(model) \
                if self.world_size > 1 else model
        return ray.train.torch.prepare_model(model)

    @contextlib.contextmanager
    def checkpoint_dirs(self) -> Iterator[list[str]]:
        """Every checkpoint of the run, newest first (runs.checkpoint_dirs: by step): those
        Ray Train never registered too (a run stopped while it reported them; each is
        verified before use, as any other), and with no record at all (set aside unreadable:
        runs.repair_ray_record). Rank 0's listing, on every rank: on a shared filesystem
        (NFS caches listings) a rank could see a checkpoint another did not, and the two
        would resume from different steps."""
        storage = ray.train.get_context().get_storage()
        if not isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem):
            # (run directories are local or shared paths: runs.run_dir_uri_problem)
            raise ValueError(f"the run's storage {storage.storage_filesystem.type_name} is not "
                             "a local or shared filesystem")
        found = None
        if self.world_rank == 0:
            found = [str(p) for p in checkpoint_dirs(Path(storage.experiment_fs_path))]
        yield _rank_zeros(found)

    def passed_over(self, directory: str) -> None:
        """Nothing to do here: Ray Train's retention (keep_checkpoints) prunes by the order
        checkpoints were reported and cannot be told of one found unusable later; and a
        checkpoint renamed under it would fail its deletion (a missing path raises in Ray's
        controller). jobs/pretrain.py's resume sets corrupt ones aside before Ray Train reads
        its record (runs.set_aside_corrupt; docs/training.md, Checkpoints and recovery)."""

    def worker_nodes(self) -> list[str]:
        """Node id of every worker, by rank, so the launcher can check workers landed where
        the scheduler placed them. Collective: every rank calls it (report() does)."""
        if self._worker_nodes is None:
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
        free_bytes, _ = torch.cuda.mem_get_info(self.device)
        index, own_bytes = _nvml_index_and_own_bytes(self.device)
        # This process's own CUDA context is already out of `free` (creating it is what
        # mem_get_info did, if Ray's set_device had not): placement asked NVML before it
        # existed, and the need counts it (memory.RUNTIME_OVERHEAD_BYTES), so it is added
        # back; else a GPU placement found just enough was refused by its own worker.
        return gpu_shortfall(free_bytes + own_bytes, min_gpu_memory_gb, self.node_id, index)

    def directive(self) -> str | None:
        return self._watch.poll()

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        record_training(metrics, self.world_rank, self.device.type)
        if self.world_rank == 0:  # the scheduler learns the job's speed where it runs
            self._watch.throughput(throughput.per_worker_rate(metrics))
        metrics = {**metrics, "worker_nodes": self.worker_nodes()}
        # DDP: rank 0 alone attaches a directory. FSDP: every rank attaches its own (its
        # shard; rank 0's also holds the index and meta.pt) and Ray Train merges the
        # directories of one report into one checkpoint in storage (file names never clash:
        # torch.distributed.checkpoint names each rank's file by its rank).
        if not checkpoint_dir:
            self._log(metrics, None)
            ray.train.report(metrics)
            return

        def persisted_and_logged(checkpoint: ray.train.Checkpoint, name: str):
            persisted = persisted_to_disk(checkpoint, name)
            self._log(metrics, persisted.path)  # once it is there, before Ray Train takes it
            return persisted
        # Named by step (runs.checkpoint_name: Ray's default name is rank 0's local time,
        # whose order is not the training order once rank 0 moves to a node whose clock
        # differs); Ray Train gives every rank rank 0's name.
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir),
                         checkpoint_dir_name=checkpoint_name(metrics["step"], time.time()),
                         checkpoint_upload_fn=persisted_and_logged)
        self._watch.checkpointed()

    def _log(self, metrics: dict[str, Any], checkpoint: str | None) -> None:
        """Rank 0's report appended to the run's metrics.jsonl here, as it is made (the run
        directory is shared storage, as its checkpoints need). Ray Train's controller
        (train_callbacks.MetricsLog) lost the last ones of a Ctrl-C: it stops taking reports
        when it aborts, while the workers train on for up to 5 s (Ray Train's patience before
        it kills them) and report, and save a checkpoint, meanwhile."""
        if self.world_rank == 0:
            run_dir = Path(ray.train.get_context().get_storage().experiment_fs_path)
            append_metrics(run_dir, metrics, checkpoint)


def persisted_to_disk(checkpoint: ray.train.Checkpoint, name: str) -> ray.train.Checkpoint:
    """Ray Train's own copy of a checkpoint into the run's directory, then fsync'd (sync_tree):
    Ray registers it and deletes the oldest checkpoint right after this returns, and its copy
    is not synced, so after a power loss the only checkpoint left (keep_checkpoints=1) could
    be empty. LocalSession does the same. A copy that fails (a full disk) is removed and
    raised as a CheckpointError naming it and the free space."""
    storage = ray.train.get_context().get_storage()
    target = Path(storage.experiment_fs_path) / name
    try:
        persisted = storage.persist_current_checkpoint(checkpoint, name)
        sync_tree(target)
        sync_directory(target.parent)
    except OSError as e:
        # A full disk: pyarrow's bare OSError, and a partial directory Ray never registers
        # (so never prunes) left by every restart that retrained up to the same save.
        shutil.rmtree(target, ignore_errors=True)
        raise CheckpointError(f"checkpoint {target} cannot be written: {e.strerror or e}"
                              f"{free_space_note(target.parent)}") from None
    return persisted


def _rank_zeros(value: Any) -> Any:
    """Rank 0's `value` on every rank (collective when a process group is up)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class DirectiveWatch:
    """Whether the scheduler wants this job to yield (preempt, migrate, cancel). Asks at most
    once a second without waiting: the answer is read at a later call. The job is Ray Train's
    experiment name. A run without a scheduler (plain Ray Train) never yields.

    Each question also carries the job's latest per-worker throughput, if a report brought
    a new one since: the scheduler learns from it how fast the job's workload runs on the
    accelerator family it runs on (orchestrator/throughput.py)."""

    def __init__(self) -> None:
        self._asking = None  # the scheduler's answer on its way (an ObjectRef)
        self._scheduler = None
        self._asked_at = float("-inf")
        self._last_checkpoint_at: float | None = None  # victims are chosen by work at risk
        self._rate: float | None = None  # per-worker throughput not yet sent
        self._rates_seen = 0

    def checkpointed(self) -> None:
        self._last_checkpoint_at = time.time()

    def throughput(self, per_worker_rate: float | None) -> None:
        """The latest per-worker throughput (tokens/s per worker), sent with the next
        question. The first of a run (an attempt) is dropped: it includes the warm-up (CUDA
        context, allocator, first batches) and would make every family look slower. None
        (a report without the figure) leaves the pending one."""
        if per_worker_rate is None:
            return
        self._rates_seen += 1
        if self._rates_seen > 1:
            self._rate = per_worker_rate

    def poll(self) -> str | None:
        """The directive as "kind: reason" once the scheduler has said to yield, else None."""
        if self._asking is not None:
            ready, _ = ray.wait([self._asking], timeout=0)
            if not ready:
                return None
            try:
                answer = ray.get(self._asking)
            except ray.exceptions.RayError:  # restarting, or killed for good: ask again later,
                answer = None                # looked up anew (a replacement has another handle)
                self._scheduler = None
            self._asking = None
            if answer:
                return f"{answer['kind']}: {answer['reason']}"
        if time.monotonic() - self._asked_at >= 1.0:
            self._asked_at = time.monotonic()
            self._scheduler = self._scheduler or scheduler_or_none()
            if self._scheduler is not None:
                job = ray.train.get_context().get_experiment_name()
                self._asking = self._scheduler.directive.remote(
                    job, self._last_checkpoint_at, self._rate)
                self._rate = None  # each figure once: the scheduler smooths what it gets
        return None


def _nvml_index_and_own_bytes(device: torch.device) -> tuple[int | str, int]:
    """(the NVML index of this worker's GPU, the bytes this process holds on it:
    probes.nvml_index_and_process_bytes by the device's UUID). Where NVML cannot say, the
    index is Ray's GPU id (a UUID string when CUDA_VISIBLE_DEVICES named UUIDs, where int()
    failed every worker; the scheduler then avoids the whole node) and the bytes 0 (the
    check as it was)."""
    gpu_id = ray.get_gpu_ids()[0]
    fallback: int | str = int(gpu_id) if str(gpu_id).isdigit() else str(gpu_id)
    try:
        uuid = str(torch.cuda.get_device_properties(device).uuid)
    except Exception:  # (no CUDA device: nothing for NVML to find)
        return fallback, 0
    index, held = nvml_index_and_process_bytes(uuid, os.getpid())
    return (fallback if index is None else index), held
