"""Integration tier: one local multi-node Ray cluster for the whole session.

Three raylets on this machine (ray.cluster_utils.Cluster), each with its own node id:
  head  - 2 CPUs
  cpu   - 2 CPUs
  t4    - 2 CPUs + 2 GPUs declared as T4-16GB through node labels
  a100  - 2 CPUs + 8 GPUs declared as A100-80GB
Declared GPUs are not real: they serve placement decisions, never CUDA code.
"""
import pytest

from orchestrator.inventory import (LABEL_ACCELERATOR_COUNT, LABEL_ACCELERATOR_MEMORY_GB,
                                    LABEL_ACCELERATOR_TYPE)

T4_LABELS = {LABEL_ACCELERATOR_TYPE: "T4", LABEL_ACCELERATOR_COUNT: "2",
             LABEL_ACCELERATOR_MEMORY_GB: "16"}
A100_LABELS = {LABEL_ACCELERATOR_TYPE: "A100-80GB", LABEL_ACCELERATOR_COUNT: "8",
               LABEL_ACCELERATOR_MEMORY_GB: "80"}


class Nodes(dict):
    """Node name -> node id; `.cluster` is the ray.cluster_utils.Cluster (to add/remove nodes)."""

    cluster = None


@pytest.fixture(scope="session")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    nodes = {"head": c.head_node,
             "cpu": c.add_node(num_cpus=2),
             "t4": c.add_node(num_cpus=2, num_gpus=2, labels=T4_LABELS),
             "a100": c.add_node(num_cpus=2, num_gpus=8, labels=A100_LABELS)}
    c.wait_for_nodes()
    ray.init(address=c.address)
    # The cluster's scheduler, with the waits a preemption or migration test can afford:
    # a job may be preempted or moved after 2 s of running, a move costs 5 s.
    from ray_layer.cluster import ensure_scheduler

    ensure_scheduler(min_run_s=2.0, restart_cost_s=5.0)
    ids = Nodes({name: node.node_id for name, node in nodes.items()})
    ids.cluster = c
    yield ids
    ray.shutdown()
    c.shutdown()
