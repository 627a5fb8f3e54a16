"""The optimizer's set-up: AdamW's fused kernel only where every parameter is on a GPU (the
GPU tier checks that it is chosen there, steps as the foreach one does, and that its state
loads on a CPU)."""
from types import SimpleNamespace

import torch

from orchestrator.training.optim import build_optimizer, uses_fused_adamw

SETTINGS = SimpleNamespace(lr=1e-3, weight_decay=0.1)


def test_on_cpu_the_default_step_stays_so_results_do_not_change():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    optimizer = build_optimizer(model, SETTINGS)
    assert not uses_fused_adamw(list(model.parameters()))
    assert optimizer.defaults["fused"] is None
    # Weight decay on matrices only, as in GPT-2.
    decay, no_decay = optimizer.param_groups
    assert [p.dim() for p in decay["params"]] == [2] and decay["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0


def test_fused_needs_every_parameter_floating_on_a_gpu():
    def on_gpu(floating=True):  # what the rule reads of a CUDA tensor
        return SimpleNamespace(is_cuda=True, is_floating_point=lambda: floating)

    assert uses_fused_adamw([on_gpu(), on_gpu()])
    assert not uses_fused_adamw([on_gpu(), torch.zeros(2)])  # one left on the CPU
    assert not uses_fused_adamw([on_gpu(floating=False)])
    assert not uses_fused_adamw([torch.zeros(2, device="meta")])
    assert not uses_fused_adamw([])
