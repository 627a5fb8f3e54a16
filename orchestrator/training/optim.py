"""The optimizer and learning-rate pieces of the training loop, shared with compression's
fine-tune (orchestrator/compression/finetune.py): one AdamW set-up, one warmup + cosine
schedule, one way to set the learning rate of a step.
"""
from __future__ import annotations

import math
from typing import Protocol

import torch


class OptimizerSettings(Protocol):
    """What `build_optimizer` reads: TrainConfig and the fine-tune's Plan both have it."""

    lr: float
    weight_decay: float


# The settings of a param group that choose AdamW's kernels, not its arithmetic.
KERNEL_SETTINGS = ("fused", "foreach")


def build_optimizer(model: torch.nn.Module, settings: OptimizerSettings, *,
                    fused_allowed: bool = True) -> torch.optim.AdamW:
    """AdamW; weight decay only on matrices (not biases, LayerNorm gains or embeddings'
    1-D params), as in GPT-2. Its fused kernel where every parameter is on a GPU
    (`uses_fused_adamw`) unless `fused_allowed` is False (strategy.fused_optimizer_allowed)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": settings.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = fused_allowed and uses_fused_adamw(decay + no_decay)
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95), fused=fused or None)


def uses_fused_adamw(params: list[torch.Tensor]) -> bool:
    """True when every parameter is a floating-point CUDA tensor (FSDP's DTensor shards
    included). PyTorch's default there is the foreach step, several kernels over all the
    state; the fused one reads and writes each tensor once (torchtitan measured 1.6-3.6% more
    throughput and made it its default). Elsewhere the default stays, so CPU runs keep their
    exact results."""
    return bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """optimizer.load_state_dict(state), keeping this optimizer's kernels (`with_kernels_of`)."""
    optimizer.load_state_dict(with_kernels_of(optimizer, state))


def with_kernels_of(optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """A saved optimizer state whose groups take `optimizer`'s kernel choice (fused or
    foreach). load_state_dict takes a saved group's settings whole, so a state saved by a GPU
    run would bring the fused step into a CPU run (whose results would then change), and one
    saved on a CPU would take it out of a GPU run whose loss scaler was set up for it (the
    scaler then hands the foreach step arguments it refuses). With the choice kept, the step
    counts land where this optimizer's kernels want them. Group counts that differ are left
    for load_state_dict to refuse."""
    saved = state["param_groups"]
    if len(saved) != len(optimizer.param_groups):
        return state
    groups = [{**group, **{key: mine[key] for key in KERNEL_SETTINGS if key in mine}}
              for group, mine in zip(saved, optimizer.param_groups)]
    return {**state, "param_groups": groups}


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def warmup_cosine_lr(step: int, *, lr: float, warmup_steps: int, total_steps: int,
                     min_lr: float = 0.0, min_lr_fraction: float | None = None) -> float:
    """Linear warmup to `lr` over `warmup_steps`, then cosine decay to the floor at
    `total_steps`, and the floor after it.

    The floor is `min_lr`, or `min_lr_fraction` of `lr` (a fine-tune's floor is relative to
    its peak). The two are computed as `min_lr + (lr - min_lr) * c` and
    `lr * (fraction + (1 - fraction) * c)` (c: cosine from 1 to 0), each the arithmetic its
    caller always used, so results are bit for bit what they were."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    if min_lr_fraction is not None:
        return lr * (min_lr_fraction + (1 - min_lr_fraction) * cosine)
    return min_lr + (lr - min_lr) * cosine
