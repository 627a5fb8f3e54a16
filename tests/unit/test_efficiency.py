import pytest
import torch

from orchestrator.config import ACCELERATOR_FAMILIES
from orchestrator.training.efficiency import (GPU_PEAK_TFLOPS, BucketMark, CommTimer,
                                           Thresholds, exposed_seconds, flops_per_token,
                                           gpu_peak_flops, measure_cpu_peak_flops, mfu,
                                           peak_memory, union_seconds, warnings_for)


def test_palm_flops_per_token():
    # 6N + 12 * L * width * T
    assert flops_per_token(1_000_000, n_layer=4, n_embd=128, context=256) == \
        6_000_000 + 12 * 4 * 128 * 256


@pytest.mark.parametrize("name, precision, tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989), ("NVIDIA H200", "bf16", 989),
    ("NVIDIA A100-SXM4-80GB", "fp32", 19.5), ("Tesla T4", "fp16", 65),
    # Board variants of one family have different peaks.
    ("NVIDIA H100 PCIe", "bf16", 756), ("NVIDIA H100 NVL", "bf16", 835),
    ("NVIDIA H200 NVL", "bf16", 835), ("NVIDIA GH200 480GB", "bf16", 989),
    ("Tesla V100-SXM2-16GB", "fp16", 125), ("Tesla V100-PCIE-32GB", "fp16", 112),
    ("Tesla P100-PCIE-16GB", "fp16", 18.7), ("AMD Instinct MI250X", "bf16", 191.5),
    # (per GCD: the module's 383 / 362.1 are two GPUs' worth, halving every MFU)
    ("AMD Instinct MI250", "bf16", 181.05), ("AMD Instinct MI300X", "bf16", 1307.4),
    ("NVIDIA L40", "bf16", 181), ("NVIDIA L40S", "bf16", 362), ("NVIDIA L4", "bf16", 121),
    ("NVIDIA A10", "bf16", 125), ("NVIDIA B200", "bf16", 2250), ("Tesla K80", "fp32", 4.37),
    # (HGX B200's datasheet: 75 FP32 TFLOPS per GPU; fp32 training got no MFU)
    ("NVIDIA B200", "fp32", 75),
])
def test_gpu_peaks_by_name_and_precision(name, precision, tflops):
    assert gpu_peak_flops(name, precision) == tflops * 1e12


def test_unknown_gpu_or_precision_has_no_peak():
    assert gpu_peak_flops("Mystery GPU", "bf16") is None
    assert gpu_peak_flops("Tesla T4", "bf16") is None  # T4 has no bf16 tensor cores
    # A name that does not say which board it is gets no peak, not the fastest board's.
    assert gpu_peak_flops("NVIDIA H100", "bf16") is None
    assert gpu_peak_flops("Tesla V100", "fp16") is None
    # ROCm names device 0x740c, an MI250 or an MI250X board, by both: neither board's peak.
    assert gpu_peak_flops("AMD Instinct MI250X / MI250", "bf16") is None
    # A MIG slice has a fraction of the board's compute: no peak, not the whole board's.
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB", "bf16") is not None
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB MIG 1g.10gb", "bf16") is None
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3 MIG 3g.40gb", "bf16") is None
    # No fast path, no peak: V100 and K80 have no bf16, K80 no fp16 tensor cores.
    assert gpu_peak_flops("Tesla V100-SXM2-16GB", "bf16") is None
    assert gpu_peak_flops("Tesla K80", "fp16") is None


def test_every_family_with_peaks_is_known_to_the_scheduler():
    """The peak table and the scheduler's families are one vocabulary: a peak row for a family
    accelerator_family() never returns could never be used."""
    assert {family for family, _ in GPU_PEAK_TFLOPS} <= set(ACCELERATOR_FAMILIES)


def test_cpu_peak_is_measured_and_mfu_is_a_ratio():
    # The best of 0.2 s of matmuls, not of two: under a loaded machine (the suite beside
    # other work) two 128-matmuls both ran preempted, at 59 MFLOP/s, below the bound.
    peak = measure_cpu_peak_flops(size=128, repeats=2, min_seconds=0.2)
    assert 1e8 < peak < 1e14
    assert mfu(tokens_per_s=1000, flops_per_token_=peak / 1000,
               peak_flops=peak) == pytest.approx(1.0)
    # Half the tokens at the same cost: half the peak used (at exactly the peak, an MFU
    # turned upside down, peak over achieved, gave 1.0 as well).
    assert mfu(tokens_per_s=500, flops_per_token_=peak / 1000,
               peak_flops=peak) == pytest.approx(0.5)


def test_warnings_name_each_crossed_threshold():
    thresholds = Thresholds(min_mfu=0.45, max_comm_share=0.15, max_memory_fraction=0.9)
    fine = {"mfu": 0.5, "comm_share": 0.1, "comm_exposed_share": 0.1, "memory_fraction": 0.5}
    assert warnings_for(fine, thresholds) == []
    mfu_low = "MFU 20.0% is below 45%"
    comm_high = ("exposed gradient all-reduce (steps waiting on it after backward) takes 30.0% "
                 "of step time (> 15%)")
    memory_high = "memory at 95.0% of capacity (> 90%)"
    assert warnings_for({"mfu": 0.2, "comm_share": 0.3, "comm_exposed_share": 0.3,
                         "memory_fraction": 0.95}, thresholds) == [mfu_low, comm_high, memory_high]
    # Each figure alone crosses only its own threshold: a check reading another figure (or
    # comparing against another threshold) would pass when all three are crossed at once.
    assert warnings_for({**fine, "mfu": 0.2}, thresholds) == [mfu_low]
    assert warnings_for({**fine, "comm_exposed_share": 0.3}, thresholds) == [comm_high]
    assert warnings_for({**fine, "memory_fraction": 0.95}, thresholds) == [memory_high]
    # All-reduce in flight for 90% of the step, hidden behind backward: nothing to warn of.
    assert warnings_for({**fine, "comm_share": 0.9}, thresholds) == []
    assert warnings_for({"mfu": None, "comm_share": None, "comm_exposed_share": None},
                        thresholds) == []


def test_peak_memory_on_cpu_is_this_process_against_the_machine():
    used, capacity = peak_memory(torch.device("cpu"))
    assert 0 < used < capacity


def test_peak_memory_on_cpu_is_against_the_containers_limit(monkeypatch):
    # Against the host's RAM (24 GiB here) in a 4 GiB container, the 90% warning could never
    # come before the OOM kill.
    from orchestrator import probes

    monkeypatch.setattr(probes, "cgroup_memory_limit", lambda: (4 * 1024 ** 3, 1024 ** 3))
    assert peak_memory(torch.device("cpu"))[1] == min(4 * 1024 ** 3,
                                                       probes.memory_within_cgroup()[0])
    assert peak_memory(torch.device("cpu"))[1] <= 4 * 1024 ** 3


def test_comm_timer_times_all_reduce_and_keeps_gradients_exact(process_group):
    torch.manual_seed(0)
    plain = torch.nn.Linear(8, 4)
    ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 4))
    ddp.module.load_state_dict(plain.state_dict())
    timer = CommTimer()
    timer.attach(ddp)
    x = torch.randn(16, 8)
    plain(x).square().sum().backward()
    ddp(x).square().sum().backward()
    assert torch.allclose(plain.weight.grad, ddp.module.weight.grad)
    assert timer.take().in_flight > 0 and timer.take() == (0, 0)  # take() resets


def test_exposed_comm_is_the_wait_after_the_last_bucket_is_launched():
    """Exposed = per step, the last bucket's launch (every gradient computed then) to the
    latest end of that step's all-reduces; in-flight time hidden behind backward is not."""
    hidden = [BucketMark(0.0, 1.0, step=0, last=False), BucketMark(2.0, 2.0, step=0, last=True)]
    assert union_seconds([(m.start, m.end) for m in hidden]) == 1.0
    assert exposed_seconds(hidden) == 0.0
    # An earlier bucket still in flight past the last launch: the tail is what the step waits.
    tail = [BucketMark(0.0, 3.5, step=1, last=False), BucketMark(0.5, 1.0, step=1, last=False),
            BucketMark(2.0, 2.5, step=1, last=True)]
    assert exposed_seconds(tail) == 1.5
    # Steps are summed, each against its own last launch, in whatever order they completed.
    assert exposed_seconds(tail[::-1] + hidden) == 1.5
    assert exposed_seconds(tail + [BucketMark(4.0, 4.25, step=2, last=True)]) == 1.75
    assert exposed_seconds([]) == 0.0


def test_comm_timer_tells_all_reduce_hidden_behind_backward_from_the_wait_after_it(
        process_group, monkeypatch):
    """Two buckets under gloo (the layers' own), with 0.3 s of backward compute between them.
    An all-reduce of the first bucket held 0.1 s is in flight as long but hidden; the last
    bucket's held 0.1 s is all exposed: the step waits for it after backward."""
    import threading
    import time
    from types import SimpleNamespace

    import torch.distributed as dist

    class SlowBackward(torch.autograd.Function):
        forward = staticmethod(lambda ctx, x: x.clone())

        @staticmethod
        def backward(ctx, grad):
            time.sleep(0.3)  # compute the first bucket's all-reduce can hide behind
            return grad

    class TwoLayers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(512, 512), torch.nn.Linear(512, 512)

        def forward(self, x):
            return self.b(SlowBackward.apply(self.a(x)))

    real_all_reduce, held = dist.all_reduce, {}

    def held_all_reduce(tensor, async_op=False):
        """The real all-reduce, its future completed `held[bucket number]` seconds late."""
        work, future = real_all_reduce(tensor, async_op=True), torch.futures.Future()
        delay = held.pop(len(launched), 0.0)
        launched.append(tensor.numel())

        def complete():
            work.wait()
            time.sleep(delay)
            future.set_result([tensor])

        threading.Thread(target=complete).start()
        return SimpleNamespace(get_future=lambda: future)

    monkeypatch.setattr(dist, "all_reduce", held_all_reduce)
    ddp = torch.nn.parallel.DistributedDataParallel(TwoLayers(), bucket_cap_mb=1)
    timer = CommTimer()
    timer.attach(ddp)
    x = torch.randn(4, 512)

    def step(hold_bucket: int):
        launched.clear()
        held[hold_bucket] = 0.1
        ddp(x).sum().backward()
        assert len(launched) == 2  # one bucket per layer (from the second step: DDP rebuilds)
        return timer.take()

    launched = []
    ddp(x).sum().backward()  # the first step's buckets are DDP's initial ones
    timer.take()
    hidden = step(hold_bucket=0)
    assert hidden.in_flight >= 0.1 and hidden.exposed < 0.05
    waited = step(hold_bucket=1)
    assert waited.exposed >= 0.1 and waited.in_flight >= waited.exposed


def test_comm_time_counts_overlapping_buckets_once():
    assert union_seconds([]) == 0
    assert union_seconds([(0.0, 1.0), (2.0, 3.0)]) == 2.0
    assert union_seconds([(0.0, 2.0), (1.0, 3.0), (1.5, 2.5)]) == 3.0  # overlaps once
    assert union_seconds([(5.0, 6.0), (0.0, 10.0)]) == 10.0  # order does not matter


def test_cpu_peak_is_the_best_measured_on_this_machine(tmp_path, monkeypatch):
    """A peak timed under load comes out low and would inflate MFU: the best figure this
    CPU model and thread count ever gave is kept and used."""
    from orchestrator.training import efficiency

    cache = tmp_path / "peaks.json"
    readings = iter([50e9, 120e9, 80e9])
    monkeypatch.setattr(efficiency, "measure_cpu_peak_flops", lambda: next(readings))
    assert efficiency.cpu_peak_flops(cache) == 50e9
    assert efficiency.cpu_peak_flops(cache) == 120e9
    assert efficiency.cpu_peak_flops(cache) == 120e9  # measured under load: the best is kept
    cache.write_text("not json")
    monkeypatch.setattr(efficiency, "measure_cpu_peak_flops", lambda: 70e9)
    assert efficiency.cpu_peak_flops(cache) == 70e9  # a damaged cache is only a lost cache
