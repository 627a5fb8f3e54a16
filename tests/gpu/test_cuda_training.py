"""GPU tier: runs only where CUDA is present (skipped on CPU-only machines and in CI)."""
import pytest
import torch

from orchestrator.probes import probe_nvml
from orchestrator.config import TrainConfig
from orchestrator.training.loop import train
from orchestrator.training.precision import resolve_precision
from orchestrator.training.session import LocalSession
from tests.support import CrashingSession

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_nvml_measures_the_gpus_torch_sees():
    gpus = probe_nvml()
    assert len(gpus) == torch.cuda.device_count()
    assert all(g.source == "nvml" and g.memory_total_bytes > 0 for g in gpus)


def test_auto_precision_picks_bf16_or_fp16_on_gpu():
    # Independent of the code under test (which asks torch): native bf16 arithmetic came with
    # compute capability 8.0 (Ampere: A100, A10, L4, H100...); older GPUs (V100 7.0, T4 7.5)
    # only emulate it, slowly, so they must get fp16 with loss scaling.
    major, minor = torch.cuda.get_device_capability()
    expected = "bf16" if (major, minor) >= (8, 0) else "fp16"
    assert resolve_precision("auto", torch.device("cuda")) == expected, (
        f"{torch.cuda.get_device_name()} (compute capability {major}.{minor})")


# Compiled is the CUDA default; eager is --no-compile's path and the learnt span's default.
@pytest.mark.parametrize("precision, compile_", [("bf16", None), ("bf16", False),
                                                 ("fp16", None), ("fp32", False)])
def test_training_runs_on_gpu(tmp_path, precision, compile_):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("GPU has no bf16")
    config = TrainConfig(model_size="tiny", max_steps=20, batch_size=8, seq_len=64,
                         precision=precision, log_every=10, checkpoint_every=20,
                         compile=compile_)
    metrics = train(config, LocalSession(tmp_path, device=torch.device("cuda")))
    assert metrics["precision"] == precision
    assert metrics["compiled"] is (compile_ is None)
    assert metrics["loss"] < metrics["first_loss"]


def test_comm_timer_sees_nccl_all_reduce_time(monkeypatch, tmp_path):
    """NCCL completes the hook's future when the kernel is enqueued, so host clocks around it
    read ~0. Each all-reduce here is made to wait behind a sleep kernel on the compute stream,
    timed on its own with CUDA events: the timer must see that time, not the enqueue. (A
    fixed target from a cycles-per-ms calibration failed on the H200: the calibration ran at
    a lower clock than the sleep, which lasted 23 ms, not the 50 planned.)"""
    import torch.distributed as dist

    from orchestrator.training.efficiency import CommTimer

    if not dist.is_nccl_available():
        pytest.skip("this torch has no NCCL")
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        real_all_reduce = dist.all_reduce
        sleeps = []

        def slow_all_reduce(tensor, async_op=False):
            start, end = (torch.cuda.Event(enable_timing=True),
                          torch.cuda.Event(enable_timing=True))
            start.record()
            torch.cuda._sleep(50_000_000)  # the all-reduce waits for it, as for a late gradient
            end.record()
            sleeps.append((start, end))
            return real_all_reduce(tensor, async_op=async_op)

        monkeypatch.setattr(dist, "all_reduce", slow_all_reduce)
        model = torch.nn.Linear(64, 64).cuda()
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[0])
        timer = CommTimer()
        timer.attach(ddp)
        ddp(torch.randn(8, 64, device="cuda")).sum().backward()
        torch.cuda.synchronize()
        slept = sum(start.elapsed_time(end) for start, end in sleeps) / 1e3
        assert len(sleeps) == 1 and slept >= 0.005  # one bucket; long enough to tell apart
        taken = timer.take()
        # One bucket, the last: all of its all-reduce comes after backward, so exposed too.
        assert taken.in_flight >= 0.9 * slept and taken.exposed >= 0.9 * slept
    finally:
        dist.destroy_process_group()


def test_the_optimizer_is_fused_on_gpu_steps_as_foreach_does_and_its_state_loads_on_cpu(
        monkeypatch):
    import copy
    import io
    from types import SimpleNamespace

    from orchestrator.training import optim

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    settings = SimpleNamespace(lr=1e-2, weight_decay=0.1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64)).cuda()
    reference = copy.deepcopy(model)
    fused = optim.build_optimizer(model, settings)
    with monkeypatch.context() as patch:
        patch.setattr(optim, "uses_fused_adamw", lambda params: False)
        foreach = optim.build_optimizer(reference, settings)
    assert fused.defaults["fused"] is True and foreach.defaults["fused"] is None

    def step(net, optimizer, seed):
        # The same batch on either device (drawn on the CPU), fp32 products without TF32.
        batch = torch.randn(16, 64, generator=torch.Generator().manual_seed(seed))
        net(batch.to(next(net.parameters()).device)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    def weights(net):
        return torch.cat([p.detach().cpu().flatten() for p in net.parameters()])

    def gap(moved, expected, start):
        """How far two runs' updates from `start` differ, relative to the expected update:
        the two kernels' rounding gave 3e-5 on a CPU (fused forced there); one side without
        weight decay, 1.6e-2."""
        return ((moved - expected).norm() / (expected - start).norm()).item()

    start = weights(model)
    for seed in range(5):
        step(model, fused, seed)
        step(reference, foreach, seed)
    assert gap(weights(model), weights(reference), start) < 1e-3

    # The fused state (its step count a CUDA tensor) loads into a CPU run's optimizer as the
    # loop loads a checkpoint (map_location="cpu"), keeping the CPU's own step, and the next
    # step agrees with the GPU's.
    buffer = io.BytesIO()
    torch.save(fused.state_dict(), buffer)
    buffer.seek(0)
    on_cpu = copy.deepcopy(model).cpu()
    cpu_optimizer = optim.build_optimizer(on_cpu, settings)
    optim.load_optimizer_state(cpu_optimizer,
                               torch.load(buffer, map_location="cpu", weights_only=True))
    assert all(group["fused"] is None for group in cpu_optimizer.param_groups)
    start = weights(model)
    step(model, fused, 5)
    step(on_cpu, cpu_optimizer, 5)
    assert gap(weights(on_cpu), weights(model), start) < 1e-3


def fsdp_run(run_dir, precision, crash_at=None):
    """One worker's FSDP2 run of 8 steps on the GPU (a checkpoint every 4), killed right
    after the checkpoint of `crash_at` when given. Needs a process group."""
    config = TrainConfig(model_size="tiny", max_steps=8, batch_size=8, seq_len=64,
                         precision=precision, log_every=4, checkpoint_every=4,
                         strategy="fsdp", compile=False, eval_batches=1)
    return train(config, CrashingSession(run_dir, crash_at, device=torch.device("cuda")))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_fsdp_trains_checkpoints_and_resumes_on_a_gpu(tmp_path, precision):
    """FSDP2 on CUDA (one GPU, NCCL): its mixed precision, the optimizer step chosen for it
    (fused in bf16; foreach in fp16, beside ShardedGradScaler), a sharded checkpoint and a
    resume from it. (Bit-equal resume is the CPU tests' claim: on a GPU, attention's
    backward may add in another order.)"""
    import torch.distributed as dist

    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("GPU has no bf16")
    if not dist.is_nccl_available():
        pytest.skip("this torch has no NCCL")
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        straight = fsdp_run(tmp_path / "straight", precision)
        with pytest.raises(RuntimeError, match="worker killed"):
            fsdp_run(tmp_path / "resumed", precision, crash_at=4)
        resumed = fsdp_run(tmp_path / "resumed", precision)
    finally:
        dist.destroy_process_group()
    assert resumed["start_step"] == 4 and resumed["step"] == 8
    assert straight["loss"] < straight["first_loss"]
    assert resumed["loss"] == pytest.approx(straight["loss"], rel=1e-2)
