"""Hierarchical gradient accumulation: each parameter group steps every k_g micro-batches.

A group with factor k_g accumulates its gradient over k_g micro-batches and then takes one
optimizer step with the mean. Lower layers and embeddings often tolerate (or benefit from) a
larger effective batch than the layers near the output; this lets them step less often.

One optimizer serves every group: PyTorch optimizers skip parameters whose `.grad` is None, so
the groups not due this micro-batch have their pending gradients set aside during the step and
put back afterwards. With every k_g equal this is exactly ordinary gradient accumulation.

fp16 loss scaling: pending gradients were accumulated at the current loss scale. When the
scaler changes the scale (after an overflow or a growth interval) they are rescaled by
new/old, so every gradient in `.grad` is always at one scale. (Scales are powers of two: exact.)
An overflow poisons the pending gradients of the waiting groups too: each of those groups drops
its window at its next step (its weights stay, as a plain fp16 step skipped for the overflow
would leave them), while the groups stepping with it step as usual. That inf handed to the
scaler made it skip every group stepping then and halve the scale again: one overflow, several
skips. A window found poisoned in a checkpoint's pending gradients (an fp16 run stopped between
the overflow and the group's step) is dropped as well, whatever precision resumes it.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from orchestrator.training.strategy import clip_gradients


class HierarchicalAccumulation:
    """Per-group gradient accumulation for the training loop: says which parameter groups step
    on a micro-batch, sets the others' pending gradients aside during the step, and counts
    each group's optimizer steps."""

    def __init__(self, groups: dict[str, list[torch.nn.Parameter]],
                 factors: dict[str, int], start_step: int = 0) -> None:
        """`start_step`: micro-batches already trained (a resumed run): the step counts go on
        from there (a group with factor k has stepped start_step // k times) instead of
        restarting at 0 on every resume."""
        self.groups = {name: params for name, params in groups.items() if params}
        self.factors = {name: factors[name] for name in self.groups}
        self.optimizer_steps = {name: start_step // k for name, k in self.factors.items()}
        # Groups whose pending gradient an fp16 overflow made non-finite: their window is
        # dropped at their next step. A resumed run's restored gradients are looked at once.
        self.overflowed = self._non_finite(list(self.groups))

    def due(self, step: int) -> list[str]:
        """Groups whose optimizer step falls on micro-batch `step` (0-based)."""
        return [name for name, k in self.factors.items() if (step + 1) % k == 0]

    def last_step_before(self, step: int) -> int | None:
        """The latest micro-batch before `step` on which any group stepped (its LR is the
        one the weights last moved with), or None before the run's first step."""
        latest = max((step // k) * k - 1 for k in self.factors.values())
        return latest if latest >= 0 else None

    def sync_context(self, wrapped: torch.nn.Module, must_sync: bool):
        """DDP's no_sync on micro-batches where no gradient is needed across workers yet."""
        if must_sync or not isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return wrapped.no_sync()

    def step(self, step: int, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
             grad_clip: float) -> "bool | torch.Tensor":
        """Step the groups due at `step`; whether the loss scaler skipped it for overflow: a
        device tensor under fp16 (read as a float, the scale was two host syncs a step, each
        a stall of the GPU's queue; the loop sums it and reads it at a report), else False."""
        due = self.due(step)
        if not due:
            return False
        for name in self.overflowed.intersection(due):  # (a window that overflowed: dropped)
            self.overflowed.discard(name)
            for p in self.groups[name]:
                p.grad = None
        stepping = [p for name in due for p in self.groups[name]]
        if not any(p.grad is not None for p in stepping):  # every window due was dropped
            for name in due:
                self.optimizer_steps[name] += 1
            return False  # (the scaler's growth count takes no step for a good one)
        scaled = scaler.is_enabled()
        fresh_overflow = self._fresh_overflow(due) if scaled else None
        waiting = {p: p.grad for name in self.groups if name not in due
                   for p in self.groups[name] if p.grad is not None}
        for p in waiting:
            p.grad = None  # the optimizer skips parameters without a gradient
        scaler.unscale_(optimizer)  # clip and average the true gradient, not the scaled one
        if fresh_overflow is not None:
            # An overflow that reached only waiting groups is this step's overflow too: the
            # scaler skips the groups due and halves the scale now (below, the waiting window
            # is marked to be dropped). Found only at the window's own step, it skipped the
            # groups due then, and a run resumed in between (the window found poisoned in the
            # checkpoint, dropped) did not: the resume was not exact.
            for found in scaler._found_inf_per_device(optimizer).values():
                torch.maximum(found, fresh_overflow.to(found.device), out=found)
        for name in due:
            if self.factors[name] > 1:
                for p in self.groups[name]:
                    if p.grad is not None:
                        p.grad.div_(self.factors[name])
        if grad_clip:
            clip_gradients(stepping, grad_clip)  # sharded (FSDP) and whole alike
        scale_before = scaler._get_scale_async().clone() if scaled else None
        scaler.step(optimizer)  # skipped by the scaler if gradients overflowed
        scaler.update()
        for p in stepping:
            p.grad = None
        if waiting and scaled:  # (only then the scale is read on the host: their rescale)
            ratio = float(scaler._get_scale_async() / scale_before)
            for p, grad in waiting.items():
                p.grad = grad.mul_(ratio) if ratio != 1.0 else grad
            if ratio < 1.0:  # this step overflowed: which waiting windows it reached
                self.overflowed |= self._non_finite([name for name in self.groups
                                                     if name not in due])
        else:
            for p, grad in waiting.items():
                p.grad = grad
        for name in due:
            self.optimizer_steps[name] += 1
        return scaler._get_scale_async() < scale_before if scaled else False

    def _fresh_overflow(self, due: list[str]) -> torch.Tensor | None:
        """fp16: 1 where the pending gradient of a group not due now, and not already known
        to have overflowed, holds inf or NaN, else 0; a device flag (no host read), the same on
        every worker (under FSDP each sees its own shards). None: no such gradient."""
        grads = [p.grad for name in self.groups
                 if name not in due and name not in self.overflowed
                 for p in self.groups[name] if p.grad is not None]
        if not grads:
            return None
        sharded = any(hasattr(g, "to_local") for g in grads)
        flag = _any_non_finite(grads).float()
        if sharded and dist.is_available() and dist.is_initialized() and \
                dist.get_world_size() > 1:  # (DDP's were all-reduced in this backward)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag

    def _non_finite(self, names: list[str]) -> set[str]:
        """Those of the groups `names` with a pending gradient holding inf or NaN, on every
        worker alike (under FSDP each sees its own shards). Nothing to look at (no pending
        gradient, as on a fresh run's start): no device read, no collective."""
        grads = {name: [p.grad for p in self.groups[name] if p.grad is not None]
                 for name in names}
        grads = {name: found for name, found in grads.items() if found}
        if not grads:
            return set()
        flags = torch.stack([_any_non_finite(found) for found in grads.values()]
                            ).to(torch.int32)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return {name for name, flag in zip(grads, flags.tolist()) if flag}


def _any_non_finite(grads: list[torch.Tensor]) -> torch.Tensor:
    """A device flag (no host read): whether any of `grads` holds inf or NaN; of a sharded
    (FSDP) gradient, this worker's shard."""
    return torch.stack([~torch.isfinite(g.to_local() if hasattr(g, "to_local") else g).all()
                        for g in grads]).any()


def pending_gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Gradients accumulated but not yet stepped (part of the checkpoint: exact resume)."""
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()
            if p.grad is not None}


def restore_pending_gradients(model: torch.nn.Module, grads: dict[str, torch.Tensor],
                              rescale: float = 1.0) -> None:
    """Put a checkpoint's pending gradients back; `rescale`: this run's loss scale over the one
    they were saved at (the precision changed on resume)."""
    params = dict(model.named_parameters())
    unknown = sorted(set(grads) - set(params))
    if unknown:
        raise ValueError(f"checkpoint has pending gradients for unknown parameters {unknown}")
    for name, grad in grads.items():
        grad = grad.to(params[name].device)
        params[name].grad = grad.mul_(rescale) if rescale != 1.0 else grad
