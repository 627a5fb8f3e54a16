"""Tests on a private cluster.local.yaml cluster (private_ray.py), shared by this package's
modules and stopped when the package is done: starting one costs ~15-30 s of a shared CPU, and
keeping it up through the rest of the suite would double the load on a 2-core machine.
(A package, __init__.py included, so that "package" scope ends here.)"""
import pytest

from .private_ray import start_local_cluster


@pytest.fixture(scope="package")
def local_cluster():
    cluster = start_local_cluster()
    yield cluster
    cluster.stop()
