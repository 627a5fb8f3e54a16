"""The optimizer's set-up: AdamW's fused kernel only where every parameter is on a GPU (the
GPU tier checks that it is chosen there, steps as the foreach one does, and that its state
loads on a CPU), and a saved state loads with the loading optimizer's kernels."""
import io
from types import SimpleNamespace

import pytest
import torch

from orchestrator.training import optim
from orchestrator.training.optim import build_optimizer, load_optimizer_state, uses_fused_adamw

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


def trained(fused: bool, monkeypatch, steps: int = 2):
    """A model and its AdamW after `steps` steps, fused (forced: PyTorch has a CPU fused
    kernel, standing in for a GPU run's) or PyTorch's default; the optimizer's state as a
    checkpoint holds it (saved, loaded to the CPU)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    with monkeypatch.context() as patch:
        patch.setattr(optim, "uses_fused_adamw", lambda params: fused)
        optimizer = build_optimizer(model, SETTINGS)
    for seed in range(steps):
        step(model, optimizer, seed)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    return model, optimizer, torch.load(buffer, map_location="cpu", weights_only=True)


def step(model, optimizer, seed, scaler=None):
    batch = torch.randn(4, 8, generator=torch.Generator().manual_seed(seed))
    loss = model(batch).square().mean()
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:  # as the loop steps with loss scaling: unscale, (clip,) step, update
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad()


def test_a_gpu_runs_state_resumes_on_cpu_with_the_cpus_own_step(monkeypatch):
    model, _, state = trained(True, monkeypatch)
    resumed = build_optimizer(model, SETTINGS)
    # load_state_dict alone would adopt the saved fused choice, and the CPU results with it.
    plain = build_optimizer(model, SETTINGS)
    plain.load_state_dict(state)
    assert all(group["fused"] for group in plain.param_groups)
    load_optimizer_state(resumed, state)
    assert all(group["fused"] is None for group in resumed.param_groups)
    # The arithmetic settings and the moments are the saved ones.
    assert [g["lr"] for g in resumed.param_groups] == [g["lr"] for g in state["param_groups"]]
    for p, saved in zip(model.parameters(), state["state"].values()):
        assert torch.equal(resumed.state[p]["exp_avg"], saved["exp_avg"])


def test_a_cpu_runs_state_resumes_on_gpu_with_the_fused_step_and_loss_scaling(monkeypatch):
    model, _, state = trained(False, monkeypatch)
    monkeypatch.setattr(optim, "uses_fused_adamw", lambda params: True)
    scaler = torch.amp.GradScaler("cpu")
    # load_state_dict alone would put the default step back under a scaler that treats the
    # optimizer as fused: the step refuses the scaler's arguments.
    plain = build_optimizer(model, SETTINGS)
    plain.load_state_dict(state)
    with pytest.raises(AssertionError, match="grad_scale and found_inf"):
        step(model, plain, 5, scaler)
    resumed = build_optimizer(model, SETTINGS)
    load_optimizer_state(resumed, state)
    assert all(group["fused"] for group in resumed.param_groups)
    before = [p.detach().clone() for p in model.parameters()]
    step(model, resumed, 5, torch.amp.GradScaler("cpu"))
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_state_of_other_groups_is_left_for_load_state_dict_to_refuse(monkeypatch):
    _, _, state = trained(False, monkeypatch)
    one_group = torch.optim.AdamW(torch.nn.Linear(8, 8).parameters())
    with pytest.raises(ValueError, match="different number of parameter groups"):
        load_optimizer_state(one_group, state)
