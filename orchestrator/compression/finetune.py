"""The one fine-tune loop of the pipeline: distillation, pruning and QAT stages all run it.

A step: (maybe) update pruning masks -> student forward -> distillation loss against the
frozen teacher -> backward -> masked gradients -> clip -> AdamW -> re-apply masks -> clamp
learnt attention spans into [0, 1] (as training does).
Batches are a pure function of (seed, stream, step) (orchestrator/training/data.get_batch),
so a stage resumed from its partial checkpoint sees exactly the batches the uninterrupted
stage would have seen.

Taken from the training loop: batches, AdamW and the warmup + cosine schedule (training/
optim.py), the optimizer step (clip, step, clear; training/accumulation.py) and `say`. The
fine-tune's own: the distillation loss, the pruning masks and QAT's fake-quantized model.
"""
from __future__ import annotations

import glob
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from orchestrator.compression import prune, structured
from orchestrator.compression.artifacts import CheckpointError, load_tensors, save_tensors
from orchestrator.compression.distill import distillation_loss
from orchestrator.training.accumulation import HierarchicalAccumulation
from orchestrator.training.checkpoint import sync_directory
from orchestrator.training.data import get_batch
from orchestrator.training.loop import TrainingDiverged, divergence, say, weights_finite
from orchestrator.training.optim import (build_optimizer, load_optimizer_state, set_lr,
                                        warmup_cosine_lr)
from orchestrator.training.precision import Precision

# A fine-tune starts from a trained model: its cosine ends at a tenth of the peak lr.
MIN_LR_FRACTION = 0.1


@dataclass(frozen=True)
class Plan:
    """What one fine-tune does (built from CompressConfig by the pipeline)."""

    stage: str
    steps: int
    stream: int  # data stream id: each stage draws its own batches
    lr: float
    warmup_steps: int
    weight_decay: float
    grad_clip: float
    batch_size: int
    seq_len: int
    seed: int
    alpha: float
    temperature: float
    log_every: int
    checkpoint_every: int

    def lr_at(self, step: int) -> float:
        """Linear warmup, then cosine to a tenth of the peak: a fine-tune starts from a trained
        model, so a short warmup avoids knocking it off its minimum with a cold AdamW."""
        return warmup_cosine_lr(step, lr=self.lr, warmup_steps=self.warmup_steps,
                                total_steps=self.steps, min_lr_fraction=MIN_LR_FRACTION)


@dataclass(frozen=True)
class PruneSchedule:
    """When and how far a fine-tune prunes: the final sparsity, its scope, the steps over which
    it ramps up, and how often the masks are updated meanwhile."""

    final: float
    scope: str
    ramp_steps: int
    every: int
    structure: str = "unstructured"  # or whole units: structured.STRUCTURES
    importance: str = "magnitude"  # structured pruning's unit scores: structured.IMPORTANCE

    def target_at(self, step: int) -> float | None:
        """The sparsity to prune to before `step`, or None when the masks stay as they are."""
        if step == 0 or step > self.ramp_steps:
            return None
        if step % self.every == 0 or step == self.ramp_steps:
            return prune.scheduled_sparsity(step, self.ramp_steps, self.final)
        return None


def finetune(student: nn.Module, teacher: nn.Module | None, train_tokens: torch.Tensor,
             plan: Plan, device: torch.device, *, masks: dict[str, torch.Tensor] | None = None,
             schedule: PruneSchedule | None = None, partial: Path | None = None,
             log: Callable[[str], None] = say) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Fine-tune `student` in place; returns (masks, metrics).

    `masks` are kept fixed; with a `schedule` they are recomputed as it says and end at its
    final sparsity. `partial` names the stage's progress checkpoints (progress_checkpoints),
    saved every `plan.checkpoint_every` steps and resumed from; the caller deletes them
    (remove_progress) once the stage's output is safely written."""
    weights = prune.prunable_weights(student)
    dense = student.config  # what sparsity counts against: the fine-tune's model is not shrunk
    masks = dict(masks or {})
    optimizer = build_optimizer(student, plan)
    # The training loop's optimizer step (unscale, clip, step, clear the gradients): one group
    # of every parameter, stepping every batch; fp32's loss scaler passes everything through.
    stepper = HierarchicalAccumulation({"student": list(student.parameters())}, {"student": 1})
    scaler = Precision("fp32", device.type).grad_scaler()
    step = 0
    # Structured pruning scores whole heads and channels (and may learn their importance from
    # the gradients of every step); unstructured pruning thresholds single weights.
    scorer = (structured.Importance(student, schedule.importance, schedule.structure)
              if schedule is not None and schedule.structure != "unstructured" else None)
    resume = _read_progress(partial, plan.stage, log)
    if resume is not None:
        resume_path, resume = resume
        student.load_state_dict(resume["model"])
        load_optimizer_state(optimizer, resume["optimizer"])
        masks, step = resume["masks"], resume["step"]
        if scorer is not None:
            scorer.load_state_dict(resume.get("importance", {}))
        log(f"{plan.stage}: resumed at step {step}/{plan.steps} from {resume_path}")
    masks = {name: m.to(device) for name, m in masks.items()}
    if teacher is not None:
        teacher.eval()
    use_teacher = teacher is not None and plan.alpha < 1
    student.train()
    started, interval_start, interval_tokens = time.perf_counter(), time.perf_counter(), 0
    # None (null in stage.json) until a step is logged: a stage of 0 steps has no loss.
    last: dict[str, float | None] = {"loss": None, "ce": None, "kd": None}
    # The losses since the last check, summed on the device (no host sync per step): a NaN or
    # inf stays in the sum, and the stage stops at the next check (_stop_if_diverged).
    checked, loss_sum = step, torch.zeros((), device=device)
    while step < plan.steps:
        target = schedule.target_at(step) if schedule else None
        if target is not None:
            masks = _masks_at(student, weights, scorer, target, schedule.scope)
            prune.apply_masks(weights, masks)
        set_lr(optimizer, plan.lr_at(step))
        x, y = get_batch(train_tokens, plan.batch_size, plan.seq_len, seed=plan.seed,
                         rank=plan.stream, step=step)
        x, y = x.to(device), y.to(device)
        teacher_logits = None
        if use_teacher:
            with torch.no_grad():
                teacher_logits, _ = teacher(x)
        student_logits, _ = student(x)
        loss = distillation_loss(student_logits, teacher_logits, y, plan.alpha, plan.temperature)
        scaler.scale(loss.total).backward()
        if scorer is not None:
            scorer.observe(student)
        prune.mask_gradients(weights, masks)
        stepper.step(step, optimizer, scaler, plan.grad_clip)
        prune.apply_masks(weights, masks)  # AdamW's momentum and decay move pruned weights
        # Learnt attention spans back into [0, 1], as the training loop does: one left past a
        # bound gets no gradient through the clamp in `spans` and would be frozen there.
        student.clamp_spans_()
        step += 1
        interval_tokens += x.numel()
        loss_sum += loss.total.detach().float()
        report = step % plan.log_every == 0 or step == plan.steps
        save = partial is not None and step % plan.checkpoint_every == 0 and step < plan.steps
        if report or save:
            # Before the progress line, a progress checkpoint and the stage's end: neither is
            # saved with a diverged model (the one before stays, for a rerun to resume).
            _stop_if_diverged(plan, step, float(loss_sum) / (step - checked), checked + 1,
                              student if save or step == plan.steps else None, teacher)
            checked, loss_sum = step, torch.zeros((), device=device)
        if report:
            last = {"loss": loss.total.item(), "ce": loss.ce.item(), "kd": loss.kd.item()}
            elapsed = time.perf_counter() - interval_start
            line = (f"{plan.stage} step {step:>5}/{plan.steps} | loss {last['loss']:.4f} "
                    f"(ce {last['ce']:.4f}, kd {last['kd']:.4f}) | lr {plan.lr_at(step - 1):.2e}")
            if masks:  # the report's sparsity (a masked unit counts as cut out)
                removed = structured.block_sparsity(student, dense, masks if scorer else None)
                line += f" | sparsity {removed:.1%}"
            log(line + f" | {interval_tokens / elapsed:,.0f} tok/s")
            interval_start, interval_tokens = time.perf_counter(), 0
        if save:
            _save_progress(partial, step, {"model": student.state_dict(),
                                           "optimizer": optimizer.state_dict(),
                                           "masks": {n: m.cpu() for n, m in masks.items()},
                                           "importance": scorer.state_dict() if scorer else {},
                                           "step": step})
    if schedule is not None:
        # Land exactly on the target whether the ramp ended early (then this recomputes the
        # same masks: the pruned weights are the zeros) or on the last step.
        masks = _masks_at(student, weights, scorer, schedule.final, schedule.scope)
        prune.apply_masks(weights, masks)
    student.eval()
    metrics = {"steps": plan.steps, "seconds": round(time.perf_counter() - started, 2),
               **{f"final_{k}": v for k, v in last.items()}}
    if masks:
        # Zeros among the block Linear weights (what unstructured --prune-sparsity counts).
        # Not "sparsity": in the report that is the block parameters removed (the pipeline
        # records it for the pruning stage).
        metrics["linear_weight_sparsity"] = prune.sparsity(weights)
    return {n: m.cpu() for n, m in masks.items()}, metrics


def _stop_if_diverged(plan: Plan, step: int, loss: float, first: int,
                      student: nn.Module | None, teacher: nn.Module | None) -> None:
    """TrainingDiverged, in one line naming the stage, the steps and the flags to change,
    where the divergence rule pretraining applies (training.loop.divergence) finds the mean
    `loss` over steps first..step NaN or inf, or, `student` given (before its progress is
    saved or the stage published), its weights so. A diverged teacher is named as the cause
    (its logits were NaN from the first step), not the learning rate."""
    what = divergence(loss, first, step, student)
    if what is None:
        return
    again = (f"; rerun with other values: the stages already finished are kept and "
             f"{plan.stage} starts over from step 0 with them (with the same values a rerun "
             "resumes from the progress saved)")
    if teacher is not None and not weights_finite(teacher):
        cause = ("the teacher's weights hold NaN or inf: compress a checkpoint saved before "
                 "its run diverged")
    elif plan.lr * plan.weight_decay >= 1:
        cause = (f"--weight-decay {plan.weight_decay:g} x --lr {plan.lr:g} is >= 1: AdamW's "
                 "decay (w -= lr x weight_decay x w) flips or grows the weights every step; "
                 f"lower them{again}")
    else:
        cause = (f"likely a learning rate too high (--lr {plan.lr:g}) or a warm-up too short "
                 f"(--warmup-steps: {plan.warmup_steps} step(s) in this stage), "
                 f"or an extreme --temperature {plan.temperature:g}{again}")
    raise TrainingDiverged(f"{plan.stage} diverged at step {step}: {what}; stopped before "
                           "saving progress there (the progress saved before it and the "
                           f"stages already finished are kept): {cause}")


def _masks_at(student: nn.Module, weights: dict[str, torch.Tensor],
              scorer: "structured.Importance | None", sparsity: float, scope: str
              ) -> dict[str, torch.Tensor]:
    if scorer is None:
        return prune.compute_masks(weights, sparsity, scope)
    return structured.compute_masks(student, scorer, sparsity, scope)


def progress_checkpoints(partial: Path) -> list[Path]:
    """The stage's progress checkpoints, newest first: `<stem>.step<N><suffix>` beside
    `partial`, one per saved step while the next is being written, then `partial` itself (the
    single file earlier versions overwrote in place), if there."""
    pattern = re.compile(re.escape(partial.stem) + r"\.step(\d+)" + re.escape(partial.suffix))
    numbered = sorted(((int(m.group(1)), path) for path in progress_files(partial)
                       if (m := pattern.fullmatch(path.name))), reverse=True)
    return [path for _, path in numbered] + ([partial] if partial.is_file() else [])


def remove_progress(partial: Path, keep: Path | None = None) -> list[str]:
    """Delete the stage's progress checkpoints, their sidecars and any unfinished temporary
    file, all but `keep` (and its sidecar); returns the names deleted."""
    kept = {keep.name, keep.name + ".sha256"} if keep is not None else set()
    removed = sorted(path.name for path in progress_files(partial) if path.name not in kept)
    for name in removed:
        (partial.parent / name).unlink(missing_ok=True)
    return removed


def progress_files(partial: Path) -> list[Path]:
    """Every file of the stage's progress: checkpoints, sidecars, one being written."""
    return list(partial.parent.glob(glob.escape(partial.stem) + ".*"))


def _save_progress(partial: Path, step: int, state: dict[str, Any]) -> None:
    """Checkpoint the stage's progress under a name of its own, then delete the earlier ones.
    Overwriting one file would not do: a stop after the new data is in place but before its
    checksum is (seconds for a big model) left a file that no longer verifies, and the stage
    started over from step 0."""
    path = partial.with_name(f"{partial.stem}.step{step:08d}{partial.suffix}")
    save_tensors(path, state)
    sync_directory(path.parent)  # both renames are on disk before the older files go
    remove_progress(partial, keep=path)


def _read_progress(partial: Path | None, stage: str, log: Callable[[str], None]
                   ) -> tuple[Path, dict[str, Any]] | None:
    """(path, state) of the newest progress checkpoint that verifies, falling back to the one
    before it (said); None to start the stage over."""
    if partial is None:
        return None
    candidates = progress_checkpoints(partial)
    for i, path in enumerate(candidates):
        try:
            state = load_tensors(path)
            missing = {"model", "optimizer", "masks", "step"} - set(state)
            if missing:
                raise CheckpointError(f"{path} lacks {', '.join(sorted(missing))}")
            return path, state
        except CheckpointError as e:
            then = ("trying the previous progress checkpoint" if i + 1 < len(candidates)
                    else "starting the stage over")
            log(f"warning: {stage}: cannot resume from {path.name} ({e}); {then}")
    return None
