"""The one training loop. Ray Train workers, a plain process and the tests all call `train`.

Everything a step depends on is a function of (config, step): batches, dropout randomness,
learning rate. A checkpoint therefore needs only the weights, optimizer/scheduler/scaler state
and the step to continue exactly where the run left off.

Compression's fine-tune (orchestrator/compression/finetune.py) runs on the same pieces: `say`,
the optimizer and schedule (optim.py), batches (data.py) and the optimizer step
(accumulation.py).
"""
from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from typing import Any, Iterator

import torch
import torch.distributed as dist

from orchestrator.config import ConfigError, TrainConfig, resume_conflicts
from orchestrator.training.accumulation import (HierarchicalAccumulation, pending_gradients,
                                                restore_pending_gradients)
from orchestrator.training.checkpoint import (CheckpointError, checkpoint_header,
                                              load_sharded_into, refuse_unresumable,
                                              save_checkpoint, save_folder, save_sharded,
                                              sharded_optimizer_names)
from orchestrator.training.data import get_batch, load_corpus, split_corpus, stream_seed
from orchestrator.training.efficiency import (CommTimer, Thresholds, cpu_peak_flops,
                                           flops_per_token, gpu_peak_flops, mfu, peak_memory,
                                           warnings_for)
from orchestrator.training.memory import (GIB, LOWER_MEMORY, gpu_memory_needed_gb,
                                          parameters_label, sizing_flags, worker_memory)
from orchestrator.training.model import GPT, GPTConfig, parameter_groups
from orchestrator.training.optim import (build_optimizer, load_optimizer_state, set_lr,
                                        warmup_cosine_lr)
from orchestrator.training.precision import (Precision, emulation_warning, load_scaler_state,
                                             resolve_precision, saved_loss_scale)
from orchestrator.runs import still_verified
from orchestrator.training.session import TrainSession
from orchestrator.training import strategy as strategies

log = logging.getLogger(__name__)

DROPOUT_STREAM = 1  # distinguishes dropout's random stream from the data stream
# How often the workers ask whether the scheduler wants the job to yield (preempted, migrating,
# cancelled). Each check is one small all-reduce so that every rank stops at the same step.
DIRECTIVE_CHECK_EVERY = 5


# fp16's loss scale below which a run counts as diverged: its gradients overflow fp16 even
# unscaled, so every step is skipped for good (DeepSpeed's min_loss_scale, where it stops too).
MIN_LOSS_SCALE = 1.0


class TrainingDiverged(Exception):
    """The run can no longer learn: its loss or weights are NaN/inf, or fp16's loss scale
    collapsed. Raised on every worker at the same report, before that report's checkpoint is
    saved: the newest checkpoint stays the last good one."""


class WorkerOutOfMemory(Exception):
    """A worker ran out of memory building the model, in a step, in the held-out evaluation
    or saving a checkpoint (torch's allocator failed):
    one line naming the flags that size a worker's memory and the estimate of its need, where
    torch's own message (DefaultCPUAllocator's, CUDA's) names no flag. Raised, not returned as
    divergence is: the other workers may be waiting in a collective this one never joins, and
    only a raise makes Ray Train stop them (each restart fails the same way, then this line
    ends the run)."""


# What torch's allocators say when an allocation fails (a CUDA one raises
# torch.cuda.OutOfMemoryError, a RuntimeError, in torch 2.x; "CUDA out of memory" before).
OUT_OF_MEMORY_MARKS = ("DefaultCPUAllocator: can't allocate memory", "CUDA out of memory")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is torch failing to allocate memory (never any other RuntimeError)."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and any(mark in str(error)
                                                for mark in OUT_OF_MEMORY_MARKS))


def out_of_memory(config: TrainConfig, session: TrainSession, where: str,
                  precision: str) -> WorkerOutOfMemory:
    """The one-line reason a run ran out of memory `where` ("at step 3", "building the
    model"), with the estimate of what a worker needs (memory.py)."""
    device = session.device
    on_gpu = device.type == "cuda"
    need_gb = (gpu_memory_needed_gb(config, session.world_size) if on_gpu else
               worker_memory(config, session.world_size, on_gpu=False).total / GIB)
    more = ("use --strategy fsdp with more workers" if config.strategy != "fsdp" else
            "use more workers (FSDP shards the model over them)")
    return WorkerOutOfMemory(
        f"out of memory {where} on worker rank {session.world_rank} ({device}): this run needs "
        f"about {need_gb:,.1f} GiB per worker by the estimate ({sizing_flags(config)}, "
        f"precision {precision}); {LOWER_MEMORY}, or {more}")


@contextlib.contextmanager
def out_of_memory_named(config: TrainConfig, session: TrainSession, where: str,
                        precision: str) -> Iterator[None]:
    """Inside it, torch failing to allocate memory is raised as out_of_memory's
    WorkerOutOfMemory `where`; any other error as it is."""
    try:
        yield
    except RuntimeError as e:  # (torch.cuda.OutOfMemoryError is one)
        if is_out_of_memory(e):
            raise out_of_memory(config, session, where, precision) from e
        raise


def say(line: str) -> None:
    """Print a progress line once. Ray Train v2 patches `print` in workers to tee into its own
    logger as well, which shows every line twice on the driver; stdout.write is not patched."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def lr_at(step: int, config: TrainConfig, legs: list | None = None) -> float:
    """Linear warmup to `lr`, then the configured schedule: cosine decay to `min_lr` at
    `max_steps` (default), step decay (x0.1 every `lr_decay_every` steps), or constant.
    `legs`: the cosine's legs when a resume changed max_steps (cosine_legs)."""
    if step < config.warmup_steps or config.lr_schedule == "cosine":
        legs = legs or cosine_legs(None, config.max_steps, 0, config)
        start, peak, end = next((leg for leg in reversed(legs) if leg[0] <= step), legs[0])
        return warmup_cosine_lr(step, lr=peak, warmup_steps=start, total_steps=end,
                                min_lr=config.min_lr)
    if config.lr_schedule == "constant":
        return config.lr
    return config.lr * 0.1 ** ((step - config.warmup_steps) // config.lr_decay_every)


def cosine_legs(saved: list | None, saved_max_steps: int, step: int,
                config: TrainConfig) -> list[tuple[int, float, int]]:
    """The cosine's legs, (from step, lr there, end step), for a run at `step` whose
    checkpoint recorded `saved` (None: one leg, from the warmup's end at `lr` to the
    checkpoint's `saved_max_steps`). Resumed with another --max-steps, a new leg decays from
    the LR reached to `min_lr` at the new end: recomputing the cosine over the new horizon
    made the LR jump (3e-4 to 1.8e-3 when a finished run was extended). Training extended
    past its end stays at `min_lr`; resumed during warmup, the first leg ends at the new end."""
    legs = [tuple(leg) for leg in saved] if saved else \
        [(config.warmup_steps, config.lr, saved_max_steps)]
    if legs[-1][2] == config.max_steps or config.lr_schedule != "cosine":
        return legs
    if step <= config.warmup_steps:
        return [(legs[0][0], legs[0][1], config.max_steps)]
    return legs + [(step, lr_at(step, config, legs), config.max_steps)]


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU batch on the training device. To CUDA through pinned memory without waiting: a
    plain copy from pageable memory makes the host wait for every queued kernel each step,
    so it could not launch the next step while the GPU still runs this one."""
    if device.type != "cuda":
        return batch.to(device)
    return batch.pin_memory().to(device, non_blocking=True)


# `auto` precisions, weakest first: every worker must compute in the same one.
AUTO_ORDER = ("fp32", "fp16", "bf16")


def job_precision(requested: str, device: torch.device, rank: int = 0) -> str:
    """The precision the whole job trains in. `auto` resolves on each worker's own device,
    and a job placed on an A100 and a T4 got bf16 on one and fp16 with loss scaling on the
    other: DDP then averaged scaled with unscaled gradients (the copies drifted apart) and FSDP
    gathered parameters of two sizes (a collective mismatch). The workers agree on the weakest
    choice any of them made (one all-reduce at start). A precision asked for is each
    worker's as asked; rank 0 warns once where it is emulated (_say_emulated)."""
    local = resolve_precision(requested, device)
    if requested != "auto":
        _say_emulated(requested, device, rank)
        return local
    if not (dist.is_available() and dist.is_initialized()):
        return local
    code = AUTO_ORDER.index(local)
    bounds = torch.tensor([code, -code], dtype=torch.int64, device=device)
    dist.all_reduce(bounds, op=dist.ReduceOp.MIN)  # (weakest, -strongest)
    weakest, strongest = int(bounds[0]), -int(bounds[1])
    if rank == 0 and weakest != strongest:
        say(f"precision auto: {AUTO_ORDER[weakest]} on every worker ({AUTO_ORDER[strongest]} "
            f"is not available on all of them)")
    return AUTO_ORDER[weakest]


def _say_emulated(requested: str, device: torch.device, rank: int) -> None:
    """Rank 0 says, once for the job, that the precision asked for runs emulated where any
    worker's device emulates it: a forced bf16 on eight V100s said it eight times, and on an
    A100 and a T4 it is the T4's to say (the workers' warnings gathered)."""
    warning = emulation_warning(requested, device)
    if requested != "fp32" and dist.is_available() and dist.is_initialized():
        said: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(said, warning)
        warning = next((text for text in said if text is not None), None)
    if rank == 0 and warning:
        say(f"warning: {warning}")


def _mean_loss_across_workers(loss_sum, losses_summed, device: torch.device
                              ) -> tuple[float | None, float]:
    """(the mean of the losses summed on every worker, the steps per worker it averages):
    one all_reduce of both, so workers that summed different numbers of steps (fp16 leaves
    out a step whose loss overflowed) weigh by their steps. None when no worker summed any
    (NaN written to metrics.jsonl is not JSON)."""
    tensor = torch.tensor([float(loss_sum), float(losses_summed)], dtype=torch.float64,
                          device=device)
    workers = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
        workers = dist.get_world_size()
    total, count = tensor.tolist()
    return (total / count if count else None), count / workers


def _stop_if_diverged(step: int, interval_steps: int, interval_loss: float | None,
                      model: torch.nn.Module, scaler, config: TrainConfig,
                      checkpoint_due: bool, device: torch.device, saved_any: bool,
                      nonfinite_since: torch.Tensor | None = None) -> None:
    """Raise TrainingDiverged, on every worker alike, where any worker's run diverged by this
    report: its interval's loss is NaN/inf (bf16, fp32: fp16 leaves overflowed steps out), its
    loss scale fell below MIN_LOSS_SCALE, or (before a checkpoint, or once the loss scale
    collapsed) its weights hold NaN/inf, as a step can leave them under a finite loss; weights
    gone NaN also make every later fp16 step's loss NaN, which the scaler skips as overflows
    until its scale collapses, so that is not blamed on fp16. One small all-reduce per report.
    `saved_any`: the run has a checkpoint (else the message offers no --resume: it would be
    refused). `nonfinite_since`: the first step (0: none) of this worker's unbroken run of
    non-finite fp16 losses up to this one (_nonfinite_since)."""
    first = step - interval_steps + 1
    loss_diverged = divergence(interval_loss, first, step)
    why = 0  # 0 healthy, then the reasons below in the order they are checked
    if loss_diverged:
        why = 1
    elif scaler.is_enabled() and scaler.get_scale() < MIN_LOSS_SCALE:
        why = 3 if not weights_finite(model) else 2
    elif checkpoint_due and not weights_finite(model):
        why = 3
    # The earliest such step over the workers, negated for MAX: one all-reduce for both.
    since = int(nonfinite_since) if nonfinite_since is not None else 0
    if dist.is_available() and dist.is_initialized():
        flag = torch.tensor([why, -(since or step + 1)], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        why, since = int(flag[0].item()), -int(flag[1].item())
        since = 0 if since > step else since
    if not why:
        return
    what = {1: loss_diverged,
            2: (f"fp16's loss scale fell below {MIN_LOSS_SCALE:g} (every step's gradients "
                "overflowed fp16 even unscaled, and the step was skipped)"),
            3: (f"{WEIGHTS_NOT_FINITE} (every step's loss since step {since} was NaN or inf: "
                "fp16 loss scaling skipped those steps as overflows and left them out of the "
                "reported loss)" if since else WEIGHTS_DIVERGED)}[why]
    lower = (f"a new run with a lower learning rate (--lr, now {config.lr:g}) or a longer "
             f"warm-up (--warmup-steps, now {config.warmup_steps})")
    bf16 = "bf16 (--precision bf16, compute capability 8.0+) or fp32"
    advice = (f"Start {lower}" if why != 2 else
              f"--resume in {bf16} continues from it; or start {lower}" if saved_any else
              f"Start a new run in {bf16}, or {lower}")
    kept = "those saved before it are kept" if saved_any else "none was saved before it"
    raise TrainingDiverged(f"training diverged at step {step}: {what}; stopped before "
                           f"saving a checkpoint there ({kept}). {advice}")


WEIGHTS_NOT_FINITE = "the model's weights hold NaN or inf"
WEIGHTS_DIVERGED = f"{WEIGHTS_NOT_FINITE} (the loss was still finite)"


def divergence(interval_loss: float | None, first: int, step: int,
               model: torch.nn.Module | None = None) -> str | None:
    """The divergence rule, fp16's loss scale aside: what diverged by `step`, or None. The
    loss over steps first..step (`interval_loss`, None: not measured) is NaN or inf; or,
    `model` given (before a checkpoint: one is never saved with such weights), its weights
    hold NaN or inf though the loss was still finite (a step can leave them so). Pretraining
    (_stop_if_diverged, which adds fp16's scale and the workers' agreement) and the
    compression fine-tunes (compression/finetune.py) apply this one rule."""
    if interval_loss is not None and not math.isfinite(interval_loss):
        steps = f"step {step}" if first >= step else f"steps {first}-{step}"
        return f"the loss over {steps} was {interval_loss}"
    if model is not None and not weights_finite(model):
        return WEIGHTS_DIVERGED
    return None


def weights_finite(model: torch.nn.Module) -> bool:
    """Whether every parameter this worker holds is finite (its own shards under FSDP)."""
    checks = [torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()
              for p in model.parameters()]
    return bool(torch.stack(checks).all()) if checks else True


def _nonfinite_since(since: torch.Tensor, summed: torch.Tensor, step: int) -> torch.Tensor:
    """The first step of the unbroken run of non-finite losses up to this `step` (0: this
    step's loss was finite), on the device (no host sync): `summed` is _summed_loss's 0 for a
    step left out as non-finite."""
    return torch.where(summed > 0, torch.zeros_like(since),
                       torch.where(since > 0, since, torch.full_like(since, step)))


def _summed_loss(loss: torch.Tensor, skip_nonfinite: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(the loss to add to an interval's sum, 1 or 0 steps summed), on the device: under fp16
    loss scaling a non-finite loss is an overflow the scaler skips, left out (averaged in, a
    healthy run's interval read NaN); without a scaler (bf16, fp32) NaN is divergence, and is
    kept to be seen."""
    value = loss.detach().float()
    if not skip_nonfinite:
        return value, torch.ones((), device=value.device)
    finite = torch.isfinite(value)
    return torch.where(finite, value, torch.zeros_like(value)), finite.float()


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokens: torch.Tensor, config: TrainConfig,
             precision: Precision, device: torch.device) -> float:
    """Mean loss on held-out text the model never trained on (fixed batches: comparable runs)."""
    was_training = model.training
    model.eval()
    losses = []
    for i in range(config.eval_batches):
        x, y = get_batch(tokens, config.batch_size, config.seq_len, seed=config.seed,
                         rank=-1, step=i)
        with precision.autocast():
            _, loss = model(to_device(x, device), to_device(y, device),
                            return_logits=False)
        losses.append(loss.item())
    model.train(was_training)
    strategies.register_shards(model)  # (FSDP: the root's parameters were left gathered)
    return sum(losses) / len(losses)


def _checkpoint_meta(scaler, config: TrainConfig, step: int, tokens_seen: int,
                     world_size: int, legs: list) -> dict[str, Any]:
    """The plain (non-tensor) part of a checkpoint, the same for both strategies."""
    return {
        "lr_legs": [list(leg) for leg in legs],
        "scaler": scaler.state_dict(),
        "step": step,
        "data_position": step,  # batches are a function of step: this is the data cursor
        "tokens_seen": tokens_seen,
        "config": config.to_dict(),
        "world_size": world_size,
    }


def _checkpoint_state(model, optimizer, scaler, config: TrainConfig, step: int,
                      tokens_seen: int, world_size: int, legs: list) -> dict[str, Any]:
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        # Gradients of groups still accumulating (hierarchical accumulation), so a resumed
        # run steps them with the same mean an uninterrupted one would.
        "pending_gradients": pending_gradients(model),
        **_checkpoint_meta(scaler, config, step, tokens_seen, world_size, legs),
    }


def _save_sharded_checkpoint(directory: str, model, optimizer, scaler, config: TrainConfig,
                             step: int, tokens_seen: int, session: TrainSession,
                             legs: list) -> None:
    """FSDP: every worker writes its shards (model, optimizer, pending gradients) into
    `directory`; rank 0 adds the plain part (meta.pt) with the pending gradients' names."""
    pending = pending_gradients(model)
    meta = {**_checkpoint_meta(scaler, config, step, tokens_seen, session.world_size, legs),
            "pending_names": sorted(pending)}
    save_sharded(directory, {**strategies.sharded_state(model, optimizer), "pending": pending},
                 meta, session.world_rank)


def _new_training_state(config: TrainConfig, session: TrainSession, precision: Precision,
                        init_from: bool):
    """A fresh (model, optimizer, loss scaler); `init_from`: start from the Hugging Face
    weights the config names (fine-tuning; a resumed run has its own)."""
    model = _new_model(config, session.device)
    if init_from and config.init_from:
        from orchestrator.hf_import import load_hf_weights

        load_hf_weights(model, config.init_from)
    if config.strategy == "fsdp":  # before the optimizer: its parameters become shards
        strategies.shard_model(model, precision)
    optimizer = build_optimizer(
        model, config, fused_allowed=strategies.fused_optimizer_allowed(precision,
                                                                        config.strategy))
    return model, optimizer, strategies.grad_scaler(precision, config.strategy)


def _resumed_or_new(config: TrainConfig, session: TrainSession, precision: Precision,
                    checkpoint_dirs: list[str]):
    """(model, optimizer, scaler, step, tokens seen, the cosine's legs) from the newest
    checkpoint that loads, or new when the run has none.

    A checkpoint that cannot be used (a corrupt header, or shards that cannot be read: a
    missing or truncated file, which every rank sees as DCP's failure) is passed over for
    the previous one with a warning, and with fresh state, since a failed load may have
    filled part of it. Never a fresh start when the run has checkpoints but none loads; a
    checkpoint of another run config is an error, not something to skip."""
    problems = []
    # The checkpoint the launcher hashed (jobs/pretrain.py --resume: runs.verified_newest),
    # loaded without hashing it again while its files are unchanged; a session without one
    # (local runs, tests) hashes every checkpoint it reads.
    verified = getattr(session, "verified_checkpoint", None)

    def pass_over(directory: str, error: CheckpointError, others_left: bool) -> None:
        problems.append(str(error))
        session.passed_over(directory)  # (retention prunes it before any good one)
        if session.world_rank == 0 and others_left:  # (else the error below says it all)
            say(f"warning: {error}; falling back to the previous checkpoint")

    for position, directory in enumerate(checkpoint_dirs):
        others_left = position < len(checkpoint_dirs) - 1
        header, problem = None, None
        try:
            header = checkpoint_header(directory, session.world_rank, session.world_size,
                                       verified=still_verified(directory, verified))
            refuse_unresumable(header, directory)  # (passed over: a damaged file)
        except CheckpointError as e:
            problem = e
        problem = _any_workers_problem(problem)
        if problem is not None:
            pass_over(directory, problem, others_left)
            continue
        conflicts = resume_conflicts(header["config"], config)
        if conflicts:
            raise CheckpointError(f"checkpoint {directory} was written by a different run "
                                  f"config: {'; '.join(conflicts)}")
        model, optimizer, scaler = _new_training_state(config, session, precision,
                                                       init_from=False)
        try:
            return (model, optimizer, scaler,
                    *_restore((directory, header), session, config, model, optimizer, scaler))
        except CheckpointError as e:
            pass_over(directory, e, others_left)
    if problems:
        raise CheckpointError("no usable checkpoint to resume from: " + " | ".join(problems))
    model, optimizer, scaler = _new_training_state(config, session, precision, init_from=True)
    return model, optimizer, scaler, 0, 0, cosine_legs(None, config.max_steps, 0, config)


def _any_workers_problem(problem: CheckpointError | None) -> CheckpointError | None:
    """The first problem any worker found with a checkpoint, on every worker (collective):
    each checks its own part of it, and on remote storage reads its own copy. A worker passing
    over a checkpoint alone left the others waiting in its load's collectives until the
    timeout, or resumed them from another step."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return problem
    said: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(said, None if problem is None else str(problem))
    first = next((text for text in said if text is not None), None)
    return None if first is None else CheckpointError(first)


def _groups_holding_spans(accumulation: HierarchicalAccumulation, model: GPT) -> set[str]:
    """The accumulation groups holding a learnt attention span's parameter (none without
    --attention-span): the blocks' groups, each layer's span in its block's."""
    spans = {id(span.span_fraction) for span in model.spans()}
    return {name for name, params in accumulation.groups.items()
            if any(id(p) in spans for p in params)}


def _spans_moved(accumulation: HierarchicalAccumulation, span_groups: set[str],
                 step: int) -> bool:
    """Whether micro-batch `step`'s optimizer step may have moved a learnt span: one of
    `span_groups` stepped. Only then are the spans clamped and their windows read again, a
    host sync on a GPU: read after every micro-batch, --accumulation k made k syncs a step
    for windows that had not changed."""
    return not span_groups.isdisjoint(accumulation.due(step))


def _refuse_groups_that_never_step(config: TrainConfig, step: int) -> None:
    """ConfigError when training from `step` would happen with a group that never steps
    (TrainConfig.never_stepping_groups, which says when that is)."""
    if never_steps := config.never_stepping_groups(from_step=step):
        raise ConfigError(never_steps)


def train(config: TrainConfig, session: TrainSession) -> dict[str, Any]:
    """Train until `config.max_steps`, resuming from the session's latest checkpoint.

    Returns the final metrics (also the last report)."""
    # Wall-clock marks of this attempt (after a yield or a failure: the restart) for the
    # reports: its workers up (started_at), its checkpoint loaded (restored_at).
    started_at = time.time()
    device = session.device
    with session.checkpoint_dirs() as checkpoint_dirs:
        if not checkpoint_dirs:  # a new run: refused before any data or model is built
            _refuse_groups_that_never_step(config, step=0)
        precision = Precision(job_precision(config.precision, device, session.world_rank),
                              device.type)
        train_tokens, held_out_tokens = training_data(config)
        with out_of_memory_named(config, session, "building the model", precision.name):
            model, optimizer, scaler, step, tokens_seen, legs = _resumed_or_new(
                config, session, precision, checkpoint_dirs)
    _refuse_groups_that_never_step(config, step)  # a resumed run, its step known
    restored_at = time.time()
    with out_of_memory_named(config, session, "building the model", precision.name):
        parallel = model if config.strategy == "fsdp" else session.prepare_model(model)
    # Compiled, the wrapper is no longer a DDP module: no_sync and the all-reduce timer are
    # still set on the DDP module underneath (`parallel`).
    compiled = config.compiles_on(device.type)
    wrapped = torch.compile(parallel) if compiled else parallel
    accumulation = HierarchicalAccumulation(parameter_groups(model), config.accumulation_factors,
                                            start_step=step)
    span_groups = _groups_holding_spans(accumulation, model)
    # Every layer's window in one host read now, not one per layer in the first forward (the
    # clamp changes nothing: spans start, and are saved, within [0, 1]).
    model.clamp_spans_()
    efficiency = Efficiency(config, model, precision, device, parallel)
    tokens_per_step = config.batch_size * config.seq_len * session.world_size
    if session.world_rank == 0:
        say(f"training {config.model_size} GPT "
            f"({parameters_label(model.num_params(non_embedding=False))}) "
            f"in {precision.name} on {session.world_size} worker(s) ({config.strategy}"
            f"{', compiled' if compiled else ''}), "
            f"steps {step}->{config.max_steps}")

    start_step = step
    saved_any = bool(checkpoint_dirs)  # (a resumed run's; set below at each one saved)
    metrics: dict[str, Any] = {"step": step, "start_step": start_step,
                               "already_complete": step >= config.max_steps}
    if metrics["already_complete"]:
        session.report(metrics, None)
    # interval_steps: the steps the reported loss averages; timed_steps: those the rates time
    # (all of them, except a compiled model's first step).
    interval_start, interval_steps, timed_steps, loss_sum = time.perf_counter(), 0, 0, 0.0
    losses_summed = 0  # of interval_steps: fp16 leaves out a step the scaler skipped (below)
    run_tokens, run_seconds, skipped_steps = 0, 0.0, 0
    # fp16: the first step of the unbroken run of non-finite losses up to now (0: none).
    nonfinite_since = torch.zeros((), dtype=torch.int64, device=device)
    first_loss = None  # loss of this run's first step: the "before" of the loss curve
    first_step_at = None
    phase_started = None  # start of this attempt's first step: the training phase's clock
    while step < config.max_steps:
        if phase_started is None:
            phase_started = time.perf_counter()
        # Dropout randomness is a function of (seed, rank, step): resume replays it exactly.
        torch.manual_seed(stream_seed(config.seed, session.world_rank, step, DROPOUT_STREAM))
        set_lr(optimizer, lr_at(step, config, legs))
        # (torch names no flag when an allocation fails: out_of_memory does)
        with out_of_memory_named(config, session, f"at step {step}", precision.name):
            x, y = get_batch(train_tokens, config.batch_size, config.seq_len, seed=config.seed,
                             rank=session.world_rank, step=step)
            # Decided before the step: a checkpoint due now makes DDP sync the gradients.
            yielding = _agreed_directive(session, step, start_step, config, device)
            if yielding is not None:
                directive_seen_at = time.time()  # all ranks agreed to yield: the step, then save
            checkpoint_due = ((step + 1) % config.checkpoint_every == 0
                              or step + 1 == config.max_steps or yielding is not None)
            # Workers must agree on the gradients when a group steps, and when a checkpoint
            # (which holds rank 0's pending gradients) is written; otherwise DDP may skip the
            # all-reduce and let each worker accumulate locally.
            with accumulation.sync_context(parallel,
                                           bool(accumulation.due(step)) or checkpoint_due):
                with precision.autocast():
                    _, loss = wrapped(to_device(x, device), to_device(y, device),
                                      return_logits=False)
                objective = loss
                if config.attention_span:
                    # (Under FSDP the spans stay whole on every worker: strategy.py.)
                    objective = loss + config.span_penalty * model.span_penalty()
                scaler.scale(objective).backward()
            skipped_steps += accumulation.step(step, optimizer, scaler, config.grad_clip)
        if _spans_moved(accumulation, span_groups, step):
            model.clamp_spans_()  # (and their windows read again: a host sync)
        step += 1
        tokens_seen += tokens_per_step
        interval_steps += 1
        timed_steps += 1
        report_due = step % config.log_every == 0 or checkpoint_due
        # Accumulate on the device: .item() every step would stall a GPU on a host sync.
        step_loss, summed = _summed_loss(loss, skip_nonfinite=scaler.is_enabled())
        loss_sum += step_loss
        losses_summed += summed
        if scaler.is_enabled():
            nonfinite_since = _nonfinite_since(nonfinite_since, summed, step)
        if first_loss is None:  # (on every worker alike: the mean is a collective)
            # The first step's loss, or (its fp16 loss overflowed on every worker) the first
            # finite one's: the "before" of the loss curve, never NaN for a healthy run.
            first_loss = _mean_loss_across_workers(step_loss, summed, device)[0]
        if first_step_at is None:
            # Wall-clock time of the first step this attempt completed: after a failure,
            # (this - failure time) is the recovery time.
            first_step_at = time.time()
            if (compiled or device.type == "cuda") and not report_due:
                # That step compiled the model (15-65 s on an H200), or on a GPU paid the
                # lazy CUDA set-up (module loading, cuBLAS and SDPA initialisation, the
                # allocator's growth): timed, it would drag the first report's tokens/s and
                # MFU down and set off the low-MFU warning.
                interval_start, timed_steps = time.perf_counter(), 0
                efficiency.restart()

        if report_due:
            if device.type == "cuda":
                # The host runs ahead of the GPU (a bf16 step has no host sync): without this
                # the interval would end at the last kernel's launch, not its completion.
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - interval_start
            interval_loss, interval_loss_steps = _mean_loss_across_workers(
                loss_sum, losses_summed, device)
            try:
                _stop_if_diverged(step, interval_steps, interval_loss, model, scaler, config,
                                  checkpoint_due, device, saved_any,
                                  nonfinite_since if scaler.is_enabled() else None)
            except TrainingDiverged as e:
                # In the run's log too (metrics.jsonl, `logs NAME`): its reports stop, and why.
                # (Every rank reports, as for any report; no checkpoint.)
                session.report({"step": step, "start_step": start_step, "diverged": str(e)},
                               None)
                raise
            run_tokens += timed_steps * tokens_per_step
            run_seconds += elapsed
            metrics = {
                "step": step,
                "start_step": start_step,
                "started_at": started_at,
                "restored_at": restored_at,
                "first_step_at": first_step_at,
                "loss": interval_loss,
                # The steps (per worker) that loss averages: the interval since the last
                # report, shorter after a resume or a yield (runs compare their losses over
                # equal intervals), less fp16 steps whose loss overflowed (skipped_steps).
                "loss_steps": (int(interval_loss_steps) if interval_loss_steps.is_integer()
                               else round(interval_loss_steps, 2)),
                "first_loss": first_loss,
                "lr": _last_step_lr(accumulation, step, config, legs),
                "tokens_per_s": timed_steps * tokens_per_step / elapsed,
                "run_tokens_per_s": run_tokens / run_seconds,
                "tokens_seen": tokens_seen,
                "skipped_steps": int(skipped_steps),
                "world_size": session.world_size,
                "compiled": compiled,
                **_model_figures(model, precision, scaler, accumulation),
                **efficiency.measure(timed_steps * tokens_per_step / elapsed, elapsed,
                                     session.world_size),
            }
            if step == config.max_steps and (session.world_rank == 0
                                             or config.strategy == "fsdp"):
                # Only rank 0's metrics are kept; the unwrapped DDP model needs no collective,
                # a sharded one gathers each block's parameters: every worker evaluates.
                with out_of_memory_named(config, session,
                                         f"evaluating the held-out loss at step {step}",
                                         precision.name):
                    held_out_loss = evaluate(model, held_out_tokens, config, precision, device)
                if session.world_rank == 0:
                    metrics["held_out_loss"] = held_out_loss
            # Everything since the first step began (checkpoint saves, reports, evaluation),
            # where run_tokens_per_s counts the steps alone.
            metrics["phase_tokens_per_s"] = ((step - start_step) * tokens_per_step
                                             / (time.perf_counter() - phase_started))
            if session.world_rank == 0:
                efficiency.warn(metrics)
            if yielding is not None:
                metrics["yielded"] = yielding
                metrics["directive_seen_at"] = directive_seen_at
            # (a save gathers the state on the host: it can run out of memory too)
            with out_of_memory_named(config, session, f"saving the checkpoint of step {step}"
                                     if checkpoint_due else f"reporting step {step}",
                                     precision.name):
                if config.strategy == "fsdp":
                    _publish_sharded(session, metrics, checkpoint_due, lambda directory:
                                     _save_sharded_checkpoint(directory, model, optimizer,
                                                              scaler, config, step, tokens_seen,
                                                              session, legs))
                else:
                    _publish(session, metrics, checkpoint_due,
                             lambda: _checkpoint_state(model, optimizer, scaler, config, step,
                                                       tokens_seen, session.world_size, legs))
            saved_any = saved_any or checkpoint_due
            if yielding is not None:
                if session.world_rank == 0:
                    say(f"stopped at step {step} with a checkpoint: {yielding}")
                return metrics
            interval_start, interval_steps, timed_steps, loss_sum = time.perf_counter(), 0, 0, 0.0
            losses_summed = 0
    return metrics


def training_data(config: TrainConfig):
    """(train, held-out) tokens: the memory-mapped shards of `config.data_cache` (checked to
    be the data and tokenizer the run was configured with), else the bundled corpus."""
    if not config.data_cache:
        return split_corpus(load_corpus())
    from orchestrator.training.shards import open_shards

    train_tokens, held_out_tokens, manifest = open_shards(config.data_cache)
    if manifest["key"] != config.data_key or manifest["vocab_size"] != config.vocab_size:
        raise ValueError(f"the shards at {config.data_cache} are not the run's data (cache key "
                         f"{manifest['key'][:12]}..., vocabulary {manifest['vocab_size']}; the "
                         f"run expects {config.data_key[:12]}..., {config.vocab_size})")
    return train_tokens, held_out_tokens


def _new_model(config: TrainConfig, device: torch.device) -> GPT:
    torch.manual_seed(config.seed)  # same initial weights on every rank
    return GPT(GPTConfig.from_train_config(config, vocab_size=config.vocab_size)).to(device)


def _restore(found: tuple[str, dict[str, Any]], session: TrainSession, config: TrainConfig,
             model: GPT, optimizer, scaler) -> tuple[int, int]:
    """Load the checkpoint found into the model, optimizer and scaler (and the gradients
    accumulated but not yet applied), whichever strategy wrote it: a full (DDP) checkpoint
    into a sharded model is sliced to each worker's shards, a sharded one into a whole model
    gathered. Returns (step, tokens seen, the cosine's legs)."""
    checkpoint_dir, state = found
    fsdp = config.strategy == "fsdp"
    load_scaler_state(scaler, state["scaler"])
    # Pending gradients were saved at the loss scale of the run that wrote them (1 without
    # one): resumed in another precision (fp16 <-> bf16/fp32) they go to this run's scale.
    rescale = scaler.get_scale() / saved_loss_scale(state["scaler"])
    if state["sharded"]:
        # In place, in the current layout (sharded over this many workers, or whole).
        tensors = {**strategies.sharded_state(model, optimizer,
                                              sharded_optimizer_names(checkpoint_dir)),
                   "pending": {name: torch.zeros_like(p) for name, p in model.named_parameters()
                               if name in set(state["pending_names"])}}
        load_sharded_into(checkpoint_dir, tensors)
        strategies.apply_state(model, optimizer, tensors)
        pending = tensors["pending"]
    elif fsdp:
        pending = strategies.convert_full_state(
            state, model, optimizer, lambda: _new_model(config, session.device), config)
    else:
        model.load_state_dict(state["model"])
        load_optimizer_state(optimizer, state["optimizer"])
        pending = state.get("pending_gradients", {})
    restore_pending_gradients(model, pending, rescale)
    if session.world_rank == 0:
        written = "sharded (fsdp)" if state["sharded"] else "full (ddp)"
        converted = " converted" if state["sharded"] != fsdp else ""
        say(f"resumed from step {state['step']} ({checkpoint_dir}; a {written} checkpoint"
            f"{converted}, {state.get('world_size', '?')} -> {session.world_size} workers)")
    legs = cosine_legs(state.get("lr_legs"), state["config"]["max_steps"], state["step"], config)
    return state["step"], state["tokens_seen"], legs


def _last_step_lr(accumulation: HierarchicalAccumulation, step: int, config: TrainConfig,
                  legs: list) -> float | None:
    """The LR of the last optimizer step taken before `step` (any group's), what the weights
    last moved with; under accumulation the last micro-batch's LR is one no step may have
    used. None before the run's first step."""
    last = accumulation.last_step_before(step)
    return None if last is None else lr_at(last, config, legs)


def _model_figures(model: GPT, precision: Precision, scaler,
                   accumulation: HierarchicalAccumulation) -> dict[str, Any]:
    """The report's figures about the model's state: precision, loss scale, optimizer steps
    per parameter group, attention spans."""
    return {"precision": precision.name,
            # (None without loss scaling: no flat 1 on the fp16 loss-scale panel)
            "loss_scale": scaler.get_scale() if scaler.is_enabled() else None,
            "optimizer_steps": dict(accumulation.optimizer_steps),
            **_span_figures(model)}


def _agreed_directive(session: TrainSession, step: int, start_step: int, config: TrainConfig,
                      device: torch.device) -> str | None:
    """The scheduler's word for this job (why to checkpoint and stop), the same on every rank:
    rank 0 asks, all ranks agree through one all-reduce. Never on the first or last step."""
    if step == start_step or step + 1 >= config.max_steps or \
            (step - start_step) % DIRECTIVE_CHECK_EVERY:
        return None
    reason = session.directive() if session.world_rank == 0 else None
    if not (dist.is_available() and dist.is_initialized()):
        return reason
    flag = torch.tensor([1.0 if reason else 0.0], device=device)
    dist.all_reduce(flag)  # sum: > 0 when rank 0 was told
    if flag.item() == 0:
        return None
    return reason or "told by the scheduler"


def _span_figures(model: GPT) -> dict[str, Any]:
    """Learnt attention spans (tokens), per layer the mean over heads, and the widest window."""
    spans = model.spans()
    if not spans:
        return {}
    return {"attention_span_mean": [round(s.spans().mean().item(), 1) for s in spans],
            "attention_window": max(s.window() for s in spans)}


class Efficiency:
    """MFU, all-reduce shares (in flight, exposed) and peak memory per logging interval; warns
    (rank 0, once per kind per attempt) when a figure crosses its threshold (MFU on a GPU
    only)."""

    def __init__(self, config: TrainConfig, model: GPT, precision: Precision,
                 device: torch.device, wrapped: torch.nn.Module) -> None:
        c = model.config
        self.flops_per_token = flops_per_token(model.num_params(), c.n_layer, c.n_embd,
                                               config.seq_len)
        self.peak_flops = (gpu_peak_flops(torch.cuda.get_device_name(device), precision.name)
                           if device.type == "cuda" else cpu_peak_flops())
        self.device = device
        # 45% is a GPU figure: against a CPU's measured peak every run fell short and warned.
        self.thresholds = Thresholds(config.warn_min_mfu if device.type == "cuda" else 0.0,
                                     config.warn_max_comm_share,
                                     config.warn_max_memory_fraction)
        self.comm = None
        if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            self.comm = CommTimer()
            self.comm.attach(wrapped)
        self.warned: set[str] = set()

    def measure(self, tokens_per_s: float, elapsed_s: float, world_size: int) -> dict[str, Any]:
        used, capacity = peak_memory(self.device)
        comm = self.comm.take() if self.comm else None
        figures = {
            # Per device: each worker's share of the tokens over one device's peak.
            "mfu": (mfu(tokens_per_s / world_size, self.flops_per_token, self.peak_flops)
                    if self.peak_flops else None),
            "comm_share": comm.in_flight / elapsed_s if comm is not None else None,
            # The part steps wait for after backward: what the warning and the alert judge.
            "comm_exposed_share": comm.exposed / elapsed_s if comm is not None else None,
            "peak_memory_bytes": used,
            "memory_fraction": used / capacity,
        }
        return figures

    def restart(self) -> None:
        """Forget the all-reduce time so far: the interval's clock restarted."""
        if self.comm:
            self.comm.take()

    def warn(self, metrics: dict[str, Any]) -> None:
        for warning in warnings_for(metrics, self.thresholds):
            kind = warning.split()[0]
            if kind not in self.warned:
                self.warned.add(kind)
                # (this process's: a restarted or resumed worker group says it again)
                say(f"warning: {warning} (reported once per attempt)")


def _publish(session: TrainSession, metrics: dict[str, Any], checkpoint_due: bool,
             make_state) -> None:
    """Print the progress line (rank 0) and report; rank 0 attaches a checkpoint when due."""
    if session.world_rank == 0:
        _say_progress(metrics)
    if not (checkpoint_due and session.world_rank == 0):
        session.report(metrics, None)
        return
    with save_folder() as directory:
        save_checkpoint(directory, make_state())
        session.report(metrics, directory)


def _say_progress(metrics: dict[str, Any]) -> None:
    loss = "-" if metrics["loss"] is None else f"{metrics['loss']:.4f}"  # (all overflowed)
    lr = "-" if metrics["lr"] is None else f"{metrics['lr']:.2e}"  # (no step yet)
    line = (f"step {metrics['step']:>6} | loss {loss} | "
            f"lr {lr} | {metrics['tokens_per_s']:,.0f} tok/s")
    if metrics.get("mfu") is not None:
        line += f" | MFU {metrics['mfu']:.1%}"
    if metrics.get("comm_share") is not None:
        line += (f" | comm {metrics['comm_share']:.0%}"
                 f" (exposed {metrics['comm_exposed_share']:.0%})")
    if "held_out_loss" in metrics:
        line += f" | held-out loss {metrics['held_out_loss']:.4f}"
    say(line)


def _publish_sharded(session: TrainSession, metrics: dict[str, Any], checkpoint_due: bool,
                     save) -> None:
    """FSDP: as `_publish`, but when a checkpoint is due every worker saves its shards into a
    directory of its own and reports it; the session merges them into one checkpoint (Ray
    Train merges the workers' directories of one report)."""
    if not checkpoint_due:
        _publish(session, metrics, False, None)
        return
    if session.world_rank == 0:
        _say_progress(metrics)
    with save_folder() as directory:
        save(directory)
        session.report(metrics, directory)
