"""Unit tier: pure logic, no Ray. Any attempt to start Ray is a bug in the test or the code."""
import pytest


@pytest.fixture(autouse=True)
def forbid_ray(monkeypatch):
    import ray

    def refuse(*args, **kwargs):
        raise RuntimeError("unit tests must not start Ray; move this test to tests/integration")

    monkeypatch.setattr(ray, "init", refuse)
