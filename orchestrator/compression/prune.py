"""Magnitude pruning: which weights are prunable, masks, and the gradual sparsity schedule.

Prunable: the weight matrices of the Linear layers inside the transformer blocks (attention
qkv and output projection, MLP fc and projection): at any useful size they hold almost all
of the parameters. Not pruned: the token embedding, which is tied to the LM head (each of its
rows is one token's vector both in and out, so a zeroed entry degrades every occurrence of
that token and every output distribution; with the byte tokenizer it is < 1% of a 20M model), the position
embedding, LayerNorms and biases (tiny, and pruning them buys nothing).

Masks are boolean tensors (True = kept). Once the schedule reaches its final sparsity they are
fixed: the fine-tune loops zero masked gradients and re-apply the masks after every optimizer
step (AdamW's momentum and weight decay would otherwise revive pruned weights).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

SCOPES = ("global", "per_layer")


def prunable_names(model: nn.Module) -> list[str]:
    """Names of the Linear layers (plain or fake-quantized) inside `model.blocks` whose weight
    is a matrix of its own (not tied to an embedding)."""
    from orchestrator.compression.qat import FakeQuantLinear

    tied = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    return [name for name, module in model.named_modules()
            if name.startswith("blocks.") and isinstance(module, (nn.Linear, FakeQuantLinear))
            and id(module.weight) not in tied]


def prunable_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: model.get_submodule(name).weight for name in prunable_names(model)}


def compute_masks(weights: dict[str, torch.Tensor], sparsity: float, scope: str
                  ) -> dict[str, torch.Tensor]:
    """Keep the largest-magnitude weights: globally (one threshold across all layers, so
    layers that matter less give up more) or per layer (each layer at `sparsity`).

    At least ceil(sparsity * n) weights are pruned; ties at the threshold (exact zeros from an
    earlier round) are pruned too, so the result never falls short of the target."""
    if scope not in SCOPES:
        raise ValueError(f"prune scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    groups = [list(weights)] if scope == "global" else [[name] for name in weights]
    masks = {}
    for names in groups:
        scores = torch.cat([weights[n].detach().abs().flatten().float() for n in names])
        k = math.ceil(sparsity * scores.numel())
        if k == 0:
            threshold = None
        else:
            threshold = torch.kthvalue(scores.cpu(), k).values.to(scores.device)
        for n in names:
            magnitude = weights[n].detach().abs().float()
            masks[n] = (torch.ones_like(magnitude, dtype=torch.bool) if threshold is None
                        else magnitude > threshold)
    return masks


@torch.no_grad()
def apply_masks(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> None:
    for name, mask in masks.items():
        weights[name].mul_(mask)


@torch.no_grad()
def mask_gradients(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> None:
    for name, mask in masks.items():
        if weights[name].grad is not None:
            weights[name].grad.mul_(mask)


def sparsity(weights: dict[str, torch.Tensor]) -> float:
    """Fraction of exact zeros over all the given tensors (int8 or float)."""
    total = sum(w.numel() for w in weights.values())
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    return zeros / total if total else 0.0


def scheduled_sparsity(step: int, ramp_steps: int, final: float) -> float:
    """Zhu & Gupta's cubic schedule (2017): prune fast while many weights are redundant, slowly
    near the target, reaching `final` at `ramp_steps`."""
    progress = min(max(step / max(ramp_steps, 1), 0.0), 1.0)
    return final * (1 - (1 - progress) ** 3)
