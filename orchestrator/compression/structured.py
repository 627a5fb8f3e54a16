"""Structured pruning: remove whole attention heads and MLP channels, then shrink the matrices.

Dense kernels (fp32 or int8) skip nothing for scattered zeros; they are faster only when the
matrices are smaller. A *unit* here is what can be cut out of a block as a whole:

    head h of layer i      3 * head_dim rows of attn.qkv (its q, k, v) + bias, and head_dim
                           input columns of attn.proj
    channel j of layer i   row j of mlp.fc + bias, and input column j of mlp.proj

While the fine-tune ramps the amount up, a removed unit is a mask (the finetune loop's boolean
masks, zeros in those rows and columns); afterwards `shrink` builds a GPT whose per-layer
widths (GPTConfig.mlp_hidden / n_heads_per_layer) leave the removed units out. Zeroing a
unit's consumer columns (attn.proj / mlp.proj) already removes its contribution exactly, so the
masked model and the shrunk one compute the same function (tested).

Importance (which units go):
    taylor     first-order Taylor estimate of the loss change when the unit is removed
               (Molchanov et al. 2019): (sum over the unit's parameters of w * dL/dw)^2,
               summed over the fine-tune's batches so far
    magnitude  the sum of squares of the unit's weights
Units are ranked by importance per parameter they hold (a head costs 4 * head_dim * n_embd
parameters, a channel 2 * n_embd), globally or within each layer, and removed until the
amount is reached; a unit already removed stays removed. The last head and the last channel of
a layer are never removed: an amount that needs them is refused, naming the layer.

`sparsity` (the report's) is the fraction of the block parameters removed (or zero), against
the model before pruning.
"""
from __future__ import annotations

import dataclasses
import math
import torch
import torch.nn as nn

from orchestrator.config import ConfigError
from orchestrator.training.model import GPT, GPTConfig

STRUCTURES = ("both", "heads", "channels", "unstructured")
IMPORTANCE = ("taylor", "magnitude")
KINDS = {"both": ("head", "channel"), "heads": ("head",), "channels": ("channel",),
         "unstructured": ()}
KIND_NAMES = {"head": ("attention head", "attn"), "channel": ("MLP channel", "mlp")}


def unit_cost(config: GPTConfig, kind: str) -> int:
    """Parameters one unit holds (weights and biases; a span parameter per head)."""
    c, d = config.n_embd, config.head_dim
    if kind == "head":
        return 3 * d * (c + 1) + d * c + (1 if config.attention_span else 0)
    return (c + 1) + c


def unit_counts(config: GPTConfig, layer: int) -> dict[str, int]:
    return {"head": config.layer_heads(layer), "channel": config.layer_mlp_hidden(layer)}


def block_params(config: GPTConfig) -> int:
    """Parameters in the transformer blocks of a GPT of this shape (built on the meta device:
    no memory, no initialisation)."""
    with torch.device("meta"):
        model = GPT(config)
    return sum(p.numel() for p in model.blocks.parameters())


def block_sparsity(model: nn.Module, dense_config: GPTConfig,
                   masks: dict[str, torch.Tensor] | None = None) -> float:
    """`sparsity` wherever it appears (the report's rows and summary, the pruning stage's
    metrics, the fine-tune's progress line): the fraction of the block parameters of the dense
    model (`dense_config`, before pruning) that are gone, cut out by structured pruning or
    zero (unstructured). `masks`: a structured fine-tune's, while its units are masked and
    not yet cut out: each unit they remove counts as gone whole, biases and span included
    (no mask zeroes those), as `shrink` will cut it out."""
    return 1 - nonzero_block_params(model, masks) / block_params(dense_config)


@torch.no_grad()
def nonzero_block_params(model: nn.Module, masks: dict[str, torch.Tensor] | None = None
                         ) -> int:
    """Nonzero parameters in the blocks; with structured `masks`, less those of the units
    they remove (block_sparsity)."""
    count = sum((p != 0).sum() for p in model.blocks.parameters())
    for i, (heads, channels) in enumerate(_kept_units(model, masks) if masks else []):
        attn, mlp = model.blocks[i].attn, model.blocks[i].mlp
        gone = ~heads.to(attn.proj.weight.device)
        columns = gone.repeat_interleave(model.config.head_dim)
        rows = columns.repeat(3)  # qkv rows: q, k, v, each head after head
        count = count - (attn.qkv.weight[rows] != 0).sum() - (attn.qkv.bias[rows] != 0).sum() \
            - (attn.proj.weight[:, columns] != 0).sum()
        if getattr(attn, "span", None) is not None:
            count = count - (attn.span.span_fraction[gone] != 0).sum()
        gone = ~channels.to(mlp.proj.weight.device)
        count = count - (mlp.fc.weight[gone] != 0).sum() - (mlp.fc.bias[gone] != 0).sum() \
            - (mlp.proj.weight[:, gone] != 0).sum()
    return int(count)


def _groups(config: GPTConfig, scope: str) -> list[list[int]]:
    layers = list(range(config.n_layer))
    return [layers] if scope == "global" else [[i] for i in layers]


def layer_params(config: GPTConfig) -> list[int]:
    """Parameters of each block (built on the meta device)."""
    with torch.device("meta"):
        model = GPT(config)
    return [sum(p.numel() for p in block.parameters()) for block in model.blocks]


def check_amount(config: GPTConfig, sparsity: float, structure: str, scope: str) -> None:
    """ConfigError naming the layer when removing `sparsity` of the block parameters (of the
    whole stack with scope global, of each layer with per_layer) would take every head or
    every channel of a layer."""
    kinds = KINDS[structure]
    if not kinds:
        return
    per_layer = layer_params(config)
    for layers in _groups(config, scope):
        params = sum(per_layer[i] for i in layers)
        budget = math.ceil(sparsity * params)
        removable = sum((unit_counts(config, i)[k] - 1) * unit_cost(config, k)
                        for i in layers for k in kinds)
        if budget > removable:
            if len(kinds) == 1:
                what, module = KIND_NAMES[kinds[0]]
                taken, module = f"remove every {what}", f".{module}"
            else:  # the budget runs past all of both kinds, not the heads alone
                taken = ("need more than every removable "
                         + " and ".join(KIND_NAMES[k][0] for k in kinds))
                module = ""
            where = (f"layer {layers[0]} (blocks.{layers[0]}{module})" if len(layers) == 1 else
                     f"layer 0 (blocks.0{module}) and every other layer")
            raise ConfigError(
                f"prune_sparsity (--prune-sparsity) {sparsity} with --prune-structure "
                f"{structure} would {taken} of {where}: at most "
                f"{removable / params:.1%} of "
                f"{'its' if len(layers) == 1 else 'the block'} parameters can go while each "
                f"layer keeps one {', one '.join(KIND_NAMES[k][0] for k in kinds)}")


# ---- importance -----------------------------------------------------------------------------

def _head_rows(heads: int, head_dim: int, h: int) -> list[slice]:
    inner = heads * head_dim
    return [slice(part * inner + h * head_dim, part * inner + (h + 1) * head_dim)
            for part in range(3)]


def _per_unit(model: GPT, layer: int, kind: str, values) -> torch.Tensor:
    """Sum a per-parameter quantity `values(param)` (same shape as the parameter) over each
    unit's parameters: (n_units,)."""
    block = model.blocks[layer]
    if kind == "channel":
        fc, proj = block.mlp.fc, block.mlp.proj
        total = values(fc.weight).sum(dim=1) + values(proj.weight).sum(dim=0)
        return total + values(fc.bias) if fc.bias is not None else total
    attn, d = block.attn, model.config.head_dim
    heads = attn.n_head
    qkv_rows = values(attn.qkv.weight).sum(dim=1)
    if attn.qkv.bias is not None:
        qkv_rows = qkv_rows + values(attn.qkv.bias)
    qkv = qkv_rows.view(3, heads, d).sum(dim=(0, 2))
    return qkv + values(attn.proj.weight).sum(dim=0).view(heads, d).sum(dim=1)


def _removed(model: GPT, layer: int, kind: str) -> torch.Tensor:
    """Units whose consumer columns are all zero: already removed."""
    block = model.blocks[layer]
    if kind == "channel":
        columns = block.mlp.proj.weight.detach().abs().sum(dim=0)
    else:
        columns = block.attn.proj.weight.detach().abs().sum(dim=0).view(
            block.attn.n_head, model.config.head_dim).sum(dim=1)
    return columns == 0


class Importance:
    """Per-unit importance scores of a model, by kind and layer."""

    def __init__(self, model: GPT, method: str, structure: str) -> None:
        if method not in IMPORTANCE:
            raise ValueError(f"importance must be one of {', '.join(IMPORTANCE)}, got {method!r}")
        self.method, self.structure, self.kinds = method, structure, KINDS[structure]
        self.taylor: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def observe(self, model: GPT) -> None:
        """Add this batch's Taylor terms (call after backward, before the optimizer step)."""
        if self.method != "taylor":
            return
        for i in range(model.config.n_layer):
            for kind in self.kinds:
                def w_times_g(p):
                    return (p.detach() * p.grad).float() if p.grad is not None else \
                        torch.zeros_like(p, dtype=torch.float32)
                term = _per_unit(model, i, kind, w_times_g) ** 2
                key = f"{i}.{kind}"
                self.taylor[key] = self.taylor.get(key, 0) + term.cpu()

    @torch.no_grad()
    def scores(self, model: GPT, layer: int, kind: str) -> torch.Tensor:
        if self.method == "taylor" and f"{layer}.{kind}" in self.taylor:
            return self.taylor[f"{layer}.{kind}"].clone()
        return _per_unit(model, layer, kind, lambda p: p.detach().float() ** 2).cpu()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.taylor.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.taylor = {k: v.clone() for k, v in state.items()}


def choose_units(model: GPT, importance: Importance, sparsity: float, scope: str
                 ) -> dict[tuple[int, str], list[int]]:
    """(layer, kind) -> indices of the units to remove: lowest importance per parameter first,
    already removed units before any other, never a layer's last unit of a kind."""
    config = model.config
    check_amount(config, sparsity, importance.structure, scope)
    per_layer = layer_params(config)
    chosen: dict[tuple[int, str], list[int]] = {}
    for layers in _groups(config, scope):
        budget = math.ceil(sparsity * sum(per_layer[i] for i in layers))
        candidates = []
        for i in layers:
            for kind in importance.kinds:
                per_param = importance.scores(model, i, kind) / unit_cost(config, kind)
                # Scores are kept on the CPU; the mask comes from weights on the model's device.
                per_param[_removed(model, i, kind).cpu()] = -1.0
                candidates += [(float(s), i, kind, j) for j, s in enumerate(per_param)]
        candidates.sort()
        left = {(i, k): unit_counts(config, i)[k] for i in layers for k in importance.kinds}
        removed = 0
        for score, i, kind, j in candidates:
            # Units removed earlier all stay removed, even past the budget: their weights are
            # zeros, and keeping one would leave a dead unit in the shrunk model.
            if removed >= budget and score >= 0:
                break
            if left[(i, kind)] == 1:
                continue
            chosen.setdefault((i, kind), []).append(j)
            left[(i, kind)] -= 1
            removed += unit_cost(config, kind)
    return chosen


def masks_for(model: GPT, chosen: dict[tuple[int, str], list[int]]
              ) -> dict[str, torch.Tensor]:
    """The finetune loop's boolean masks (True = kept) for every prunable block Linear."""
    config = model.config
    masks = {}
    for i, block in enumerate(model.blocks):
        heads, d = block.attn.n_head, config.head_dim
        qkv = torch.ones_like(block.attn.qkv.weight, dtype=torch.bool)
        attn_proj = torch.ones_like(block.attn.proj.weight, dtype=torch.bool)
        for h in chosen.get((i, "head"), []):
            for rows in _head_rows(heads, d, h):
                qkv[rows] = False
            attn_proj[:, h * d:(h + 1) * d] = False
        fc = torch.ones_like(block.mlp.fc.weight, dtype=torch.bool)
        mlp_proj = torch.ones_like(block.mlp.proj.weight, dtype=torch.bool)
        channels = chosen.get((i, "channel"), [])
        fc[channels] = False
        mlp_proj[:, channels] = False
        masks.update({f"blocks.{i}.attn.qkv": qkv, f"blocks.{i}.attn.proj": attn_proj,
                      f"blocks.{i}.mlp.fc": fc, f"blocks.{i}.mlp.proj": mlp_proj})
    return masks


def compute_masks(model: GPT, importance: Importance, sparsity: float, scope: str
                  ) -> dict[str, torch.Tensor]:
    return masks_for(model, choose_units(model, importance, sparsity, scope))


# ---- shrinking ------------------------------------------------------------------------------

def _kept_units(model: GPT, masks: dict[str, torch.Tensor]
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, (heads kept, channels kept) as boolean vectors: a unit is kept when any of
    its consumer columns (attn.proj / mlp.proj) is."""
    kept = []
    for i, block in enumerate(model.blocks):
        attn_cols = masks[f"blocks.{i}.attn.proj"].view(
            model.config.n_embd, block.attn.n_head, model.config.head_dim)
        kept.append((attn_cols.any(dim=0).any(dim=1),
                     masks[f"blocks.{i}.mlp.proj"].any(dim=0)))
    return kept


@torch.no_grad()
def shrink(model: GPT, masks: dict[str, torch.Tensor]) -> GPT:
    """A new GPT without the units the masks remove (a unit is kept when any of its consumer
    columns is kept), per-layer widths in its config, the same function as the masked model."""
    config = model.config
    d = config.head_dim
    kept = _kept_units(model, masks)
    keep_heads = [heads.nonzero().flatten() for heads, _ in kept]
    keep_channels = [channels.nonzero().flatten() for _, channels in kept]
    heads = tuple(len(k) for k in keep_heads)
    hidden = tuple(len(k) for k in keep_channels)
    new_config = dataclasses.replace(
        config, n_heads_per_layer=None if all(h == config.n_head for h in heads) else heads,
        mlp_hidden=None if all(m == 4 * config.n_embd for m in hidden) else hidden)
    with torch.device("meta"):
        small = GPT(new_config)
    small = small.to_empty(device=model.tok_emb.weight.device)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for i, block in enumerate(model.blocks):
        old_heads = block.attn.n_head
        rows = torch.cat([torch.arange(p * old_heads * d + h * d, p * old_heads * d + (h + 1) * d)
                          for p in range(3) for h in keep_heads[i].tolist()]).long() \
            if len(keep_heads[i]) else torch.zeros(0, dtype=torch.long)
        cols = torch.cat([torch.arange(h * d, (h + 1) * d) for h in keep_heads[i].tolist()])
        p = f"blocks.{i}."
        state[p + "attn.qkv.weight"] = state[p + "attn.qkv.weight"][rows]
        state[p + "attn.qkv.bias"] = state[p + "attn.qkv.bias"][rows]
        state[p + "attn.proj.weight"] = state[p + "attn.proj.weight"][:, cols]
        if p + "attn.span.span_fraction" in state:
            state[p + "attn.span.span_fraction"] = state[p + "attn.span.span_fraction"][
                keep_heads[i]]
        ch = keep_channels[i]
        state[p + "mlp.fc.weight"] = state[p + "mlp.fc.weight"][ch]
        state[p + "mlp.fc.bias"] = state[p + "mlp.fc.bias"][ch]
        state[p + "mlp.proj.weight"] = state[p + "mlp.proj.weight"][:, ch]
    small.load_state_dict(state)
    small.lm_head.weight = small.tok_emb.weight  # to_empty broke the tie; restore it
    return small.train(model.training)
