"""Data-parallel strategies of the training loop: DDP (every worker holds the whole model) or
FSDP2 (`torch.distributed.fsdp.fully_shard`: parameters, gradients and optimizer state sharded
over the workers, each transformer block's parameters gathered only while it runs).

FSDP specifics kept here, so the loop reads the same for both:
- sharding: each block, then the root (embeddings, final LayerNorm, the tied LM head), with a
  mixed-precision policy matching the run's precision: parameters gathered in bf16/fp16 for
  compute, gradients reduced in fp32; fp32 throughout on CPU.
- the learnable attention span's per-head parameters (a few floats per layer) stay whole on
  every worker (FSDP's `ignored_params`): the window they give is read on the host, and the
  span penalty joins the loss outside any block. Their gradients are averaged over the workers
  by a hook, as DDP would.
- checkpoints: the sharded state (model, optimizer, pending gradients) through
  `torch.distributed.checkpoint` (checkpoint.save_sharded / load_sharded_into), each worker
  writing its own shard; a checkpoint of the other strategy is converted on load.
"""
from __future__ import annotations

import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist

# torch.distributed.checkpoint and .tensor are imported where FSDP needs them: at module level
# they cost every process that trains (each Ray Train worker, DDP or not) 1.2 s of imports.
from orchestrator.training.optim import build_optimizer, load_optimizer_state, with_kernels_of
from orchestrator.training.precision import Precision


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def span_parameters(model: torch.nn.Module) -> set[torch.nn.Parameter]:
    """The learnable spans' parameters (none without --attention-span)."""
    return {p for name, p in model.named_parameters() if name.endswith("span_fraction")}


def shard_model(model: torch.nn.Module, precision: Precision) -> torch.nn.Module:
    """FSDP2 in place: each transformer block, then the root. Needs a process group; the
    optimizer must be built afterwards (the parameters become sharded DTensors)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("strategy fsdp needs a process group (run it with Ray Train or "
                         "several local workers); a single plain process has nothing to shard "
                         "over: use strategy ddp")
    low = None if precision.name == "fp32" else precision.dtype
    policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)
    ignored = span_parameters(model)
    mesh = workers_mesh(model)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, ignored_params=ignored or None)
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=ignored or None)
    _average_gradients_of(ignored)
    return model


def workers_mesh(model: torch.nn.Module):
    """The workers' one-dimensional device mesh, on the device type the model was placed on.
    fully_shard's own default is the accelerator torch sees, CUDA wherever a GPU is visible:
    a worker training on the CPU on a GPU node (Ray leaves a node's GPUs visible to a worker
    that asked for none; the local workers on a GPU machine) had its shards moved onto a GPU
    it was not given, beside its CPU batches and its gloo group."""
    from torch.distributed.device_mesh import init_device_mesh

    device_type = next(model.parameters()).device.type
    return init_device_mesh(device_type, (dist.get_world_size(),))


def _average_gradients_of(params: set[torch.nn.Parameter]) -> None:
    """Each backward's gradient of these (unsharded) parameters, averaged over the workers
    before it is accumulated: what DDP does for every parameter."""
    world = dist.get_world_size()

    def average(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad / world

    for p in params:
        p.register_hook(average)


def uses_sharded_scaler(precision: Precision, strategy: str) -> bool:
    return strategy == "fsdp" and precision.name == "fp16"


def grad_scaler(precision: Precision, strategy: str):
    """fp16 loss scaling; under FSDP the overflow check must agree across workers (each sees
    only its shard of the gradients): torch's ShardedGradScaler all-reduces it."""
    if uses_sharded_scaler(precision, strategy):
        return _mixed_sharded_grad_scaler(precision.device_type)
    return precision.grad_scaler()


def _mixed_sharded_grad_scaler(device_type: str):
    """torch's ShardedGradScaler, for a model whose learnable spans stay unsharded (plain
    tensors beside the DTensors; shard_model's ignored_params): it groups gradients by device
    and dtype only, and its fused unscale refuses a list mixing the two kinds, so an fp16 run
    with --attention-span under FSDP raised at its first step. The plain gradients are
    unscaled on their own, into the same overflow flags, which unscale_ then all-reduces."""
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    class MixedShardedGradScaler(ShardedGradScaler):
        """ShardedGradScaler that also unscales plain (unsharded) gradients."""

        def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16=True):
            params = [p for group in optimizer.param_groups for p in group["params"]
                      if p.grad is not None]
            whole = [p.grad for p in params if not is_sharded(p.grad)]
            sharded = SimpleNamespace(param_groups=[
                {"params": [p for p in params if is_sharded(p.grad)]}])
            flags = super()._unscale_grads_(sharded, inv_scale, found_inf, allow_fp16)
            groups: dict[tuple, list[torch.Tensor]] = {}
            for grad in whole:
                groups.setdefault((grad.device, grad.dtype), []).append(grad)
            with torch.no_grad():
                for (device, _), grads in groups.items():
                    if device not in flags:
                        flags[device] = found_inf.to(device)
                    torch._amp_foreach_non_finite_check_and_unscale_(
                        grads, flags[device], inv_scale.to(device))
            return flags

    return MixedShardedGradScaler(device_type)


def fused_optimizer_allowed(precision: Precision, strategy: str) -> bool:
    """AdamW's fused step, except beside ShardedGradScaler (FSDP in fp16): the overflow flag
    that scaler hands the fused step has shape (1,), which the step counts (shape ()) cannot
    take in place, so every step would raise after updating the weights
    (pytorch/pytorch#140514, open; reproduced with torch 2.13)."""
    return not uses_sharded_scaler(precision, strategy)


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float) -> None:
    """clip_grad_norm_ over a mix of sharded (DTensor) and whole parameters: the global norm
    of each kind, combined, then one scale for all (what clip_grad_norm_ does for one kind)."""
    sharded = [p for p in params if p.grad is not None and is_sharded(p.grad)]
    whole = [p for p in params if p.grad is not None and not is_sharded(p.grad)]
    if not sharded or not whole:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    norms = [torch.nn.utils.get_total_norm([p.grad for p in sharded]).full_tensor(),
             torch.nn.utils.get_total_norm([p.grad for p in whole])]
    total = torch.linalg.vector_norm(torch.stack([n.to(norms[1].device) for n in norms]))
    torch.nn.utils.clip_grads_with_norm_(sharded, max_norm, total)
    torch.nn.utils.clip_grads_with_norm_(whole, max_norm, total)


def sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  with_state: set[str] | None = None) -> dict[str, dict]:
    """The model's and optimizer's state keyed by parameter name (FSDP: each worker's shards),
    what torch.distributed.checkpoint saves and loads in place. `with_state`: keep optimizer
    state only for these parameters (what a checkpoint holds: a group that had not stepped
    when it was written has none, and get_state_dict gives a fresh optimizer state for all);
    None: those whose state the optimizer has."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    had_state = set(optimizer.state)
    if with_state is None:  # (a save: the state the optimizer has, no more)
        with_state = {name for name, p in model.named_parameters() if p in had_state}
    model_state, optimizer_state = get_state_dict(model, optimizer)
    # get_state_dict fills a missing optimizer state by a zero-lr step of the live optimizer:
    # an fp16 run whose steps so far all overflowed (skipped) then took its first real step as
    # its second (AdamW's bias correction of step 2), as did a run resumed from its checkpoint.
    # Taken back out of the live one, and out of what is saved.
    for param in [p for p in optimizer.state if p not in had_state]:
        del optimizer.state[param]
    optimizer_state = {**optimizer_state, "state": {
        name: v for name, v in optimizer_state["state"].items() if name in with_state}}
    return {"model": model_state, "optimizer": optimizer_state}


def register_shards(model: torch.nn.Module) -> None:
    """Put the sharded parameters (the optimizer's, holding the gradients) back on every FSDP
    module; nothing for a model that is not sharded. A forward without a backward (the held-out
    evaluation) leaves the root's parameters gathered, registered as plain tensors without
    gradients that the optimizer does not know: the final checkpoint, saved after it, lost the
    AdamW state and the pending gradients of the embeddings and the final LayerNorm."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is None:  # (never imported: nothing is sharded, and DDP runs skip its import)
        return
    for module in model.modules():
        if isinstance(module, fsdp.FSDPModule):
            module.reshard()


def apply_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                state: dict[str, dict], full: bool = False) -> None:
    """Load `sharded_state`-shaped state back; `full`: whole tensors on every worker (a DDP
    checkpoint converted), which FSDP slices to each worker's shard. A parameter without
    optimizer state in `state` (its group had not stepped: hierarchical accumulation) is left
    with none, so its first step is a first step, as in the run that wrote it."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         set_model_state_dict,
                                                         set_optimizer_state_dict)

    set_model_state_dict(model, state["model"], options=StateDictOptions(full_state_dict=full))
    set_optimizer_state_dict(model, optimizer, with_kernels_of(optimizer, state["optimizer"]),
                             options=StateDictOptions(full_state_dict=full, strict=False))
    saved = state["optimizer"]["state"]
    for name, param in model.named_parameters():
        if name not in saved:  # (get_state_dict's placeholder state, or the load's)
            optimizer.state.pop(param, None)


def convert_full_state(state: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       make_model, settings) -> dict[str, torch.Tensor]:
    """Load a full (DDP) checkpoint into an FSDP model: rebuild it whole on each worker to key
    the optimizer state by name, then let FSDP take each worker's shard. Pending gradients
    (hierarchical accumulation) are sliced the same way and returned, for the loop to put
    back."""
    from torch.distributed.tensor import distribute_tensor

    whole = make_model()
    whole.load_state_dict(state["model"])
    whole_optimizer = build_optimizer(whole, settings)
    load_optimizer_state(whole_optimizer, state["optimizer"])
    stepped = {name for name, p in whole.named_parameters() if whole_optimizer.state.get(p)}
    apply_state(model, optimizer, sharded_state(whole, whole_optimizer, stepped), full=True)
    params = dict(model.named_parameters())
    grads = {}
    for name, grad in state.get("pending_gradients", {}).items():
        if name in params and is_sharded(params[name]):
            p = params[name]
            grads[name] = distribute_tensor(grad.to(p.device_mesh.device_type), p.device_mesh,
                                            p.placements)
        else:
            grads[name] = grad
    return grads
