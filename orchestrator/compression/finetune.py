"""The one fine-tune loop of the pipeline: distillation, pruning and QAT stages all run it.

A step: (maybe) update pruning masks -> student forward -> distillation loss against the
frozen teacher -> backward -> masked gradients -> clip -> AdamW -> re-apply masks.
Batches are a pure function of (seed, stream, step) (orchestrator/training/data.get_batch),
so a stage resumed from its partial checkpoint sees exactly the batches the uninterrupted
stage would have seen.

Taken from the training loop: batches, AdamW and the warmup + cosine schedule (training/
optim.py), the optimizer step (clip, step, clear; training/accumulation.py) and `say`. The
fine-tune's own: the distillation loss, the pruning masks and QAT's fake-quantized model.
"""
from __future__ import annotations

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
from orchestrator.training.data import get_batch
from orchestrator.training.loop import say
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
    final sparsity. `partial` is where the stage's progress is checkpointed every
    `plan.checkpoint_every` steps and resumed from; the caller deletes it once the stage's
    output is safely written."""
    weights = prune.prunable_weights(student)
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
    resume = _read_partial(partial, plan.stage, log)
    if resume is not None:
        student.load_state_dict(resume["model"])
        load_optimizer_state(optimizer, resume["optimizer"])
        masks, step = resume["masks"], resume["step"]
        if scorer is not None:
            scorer.load_state_dict(resume.get("importance", {}))
        log(f"{plan.stage}: resumed at step {step}/{plan.steps} from {partial}")
    masks = {name: m.to(device) for name, m in masks.items()}
    if teacher is not None:
        teacher.eval()
    use_teacher = teacher is not None and plan.alpha < 1
    student.train()
    started, interval_start, interval_tokens = time.perf_counter(), time.perf_counter(), 0
    # None (null in stage.json) until a step is logged: a stage of 0 steps has no loss.
    last: dict[str, float | None] = {"loss": None, "ce": None, "kd": None}
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
        step += 1
        interval_tokens += x.numel()
        if step % plan.log_every == 0 or step == plan.steps:
            last = {"loss": loss.total.item(), "ce": loss.ce.item(), "kd": loss.kd.item()}
            elapsed = time.perf_counter() - interval_start
            line = (f"{plan.stage} step {step:>5}/{plan.steps} | loss {last['loss']:.4f} "
                    f"(ce {last['ce']:.4f}, kd {last['kd']:.4f}) | lr {plan.lr_at(step - 1):.2e}")
            if masks:
                line += f" | sparsity {prune.sparsity(weights):.1%}"
            log(line + f" | {interval_tokens / elapsed:,.0f} tok/s")
            interval_start, interval_tokens = time.perf_counter(), 0
        if partial is not None and step % plan.checkpoint_every == 0 and step < plan.steps:
            save_tensors(partial, {"model": student.state_dict(),
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


def _masks_at(student: nn.Module, weights: dict[str, torch.Tensor],
              scorer: "structured.Importance | None", sparsity: float, scope: str
              ) -> dict[str, torch.Tensor]:
    if scorer is None:
        return prune.compute_masks(weights, sparsity, scope)
    return structured.compute_masks(student, scorer, sparsity, scope)


def _read_partial(partial: Path | None, stage: str, log: Callable[[str], None]
                  ) -> dict[str, Any] | None:
    """The stage's progress checkpoint, or None to start the stage over (with a warning when
    one exists but cannot be used)."""
    if partial is None or not partial.is_file():
        return None
    try:
        state = load_tensors(partial)
        missing = {"model", "optimizer", "masks", "step"} - set(state)
        if missing:
            raise CheckpointError(f"{partial} lacks {', '.join(sorted(missing))}")
        return state
    except CheckpointError as e:
        log(f"warning: {stage}: cannot resume ({e}); starting the stage over")
        return None
