"""Unit tier: pure logic, no Ray. Any attempt to start Ray is a bug in the test or the code."""
import pytest


@pytest.fixture(autouse=True)
def forbid_ray(monkeypatch):
    import ray

    def refuse(*args, **kwargs):
        raise RuntimeError("unit tests must not start Ray; move this test to tests/integration")

    monkeypatch.setattr(ray, "init", refuse)


@pytest.fixture
def process_group(tmp_path, monkeypatch):
    """A gloo process group of one (this process), for code that runs under DDP."""
    import datetime

    import torch.distributed as dist

    # Loopback by name: gloo otherwise resolves the host name, which can block for long on a
    # machine without DNS; and a timeout, so a stuck store fails the test instead of hanging.
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=60))
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="session")
def _cpu_peak_measured_once():
    from orchestrator.training import efficiency

    return efficiency.measure_cpu_peak_flops()


@pytest.fixture(autouse=True)
def cpu_peak_measured_once_per_session(_cpu_peak_measured_once, monkeypatch):
    """Every train() on a CPU times matmuls for at least a second to find the CPU's peak (for
    MFU): over the ~100 runs here, minutes of the tier's time. The first measurement, a real
    one, stands for the rest; cpu_peak_flops() still keeps the best in its cache file."""
    from orchestrator.training import efficiency

    monkeypatch.setattr(efficiency, "measure_cpu_peak_flops",
                        lambda *args, **kwargs: _cpu_peak_measured_once)
