"""What a serving replica asks Ray for: an inference accelerator when the cluster has one,
else CPU. A pure function of the scheduler's view of the cluster (NodeReports, measured by
NVML or declared through node labels), returning Ray Serve `ray_actor_options`.

Inference-class accelerators (T4, L4, A10/A10G, L40S) are preferred: a small model serves
well on them, and the big training GPUs stay free for training jobs. Among inference families
the one with the most accelerators on healthy nodes that can hold a replica wins (room for
replicas to scale out), then the faster. Ray places a replica on one node: a node counts only
with the replica's CPUs and GPUs (of that family) on it. With none, replicas run on CPU
("auto"), kept off training nodes; a family can also be asked for by name, which may then be a
training one.

Pinning a replica to a family: by the `accelerator_type` actor option (the resource
`accelerator_type:<T4>`, which Ray lists for NVML-detected accelerators and cluster.yaml's
node types declare) wherever a node of the family lists it: Ray 2.60's v1 autoscaler reads
resources, not label selectors, when it picks a node type to launch. A family only declared
by the node label `orchestrator.io/accelerator-type` (no such resource anywhere) gets a
`label_selector` on it.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from orchestrator.autoscaling import ACCELERATOR_RESOURCE_PREFIX
from orchestrator.config import ACCELERATOR_SPEED
from orchestrator.inventory import (LABEL_ACCELERATOR_TYPE, GpuInfo, NodeReport,
                                    accelerator_family, declared_gpus, gpu_families,
                                    node_family)
from orchestrator.metric_catalogue import LABEL_NODE_TYPE

INFERENCE_FAMILIES = ("T4", "L4", "A10", "A10G", "L40S")
# Node roles (the orchestrator.io/node-type label, cluster.yaml) a CPU replica must not take:
# it would hold a training node's CPUs, and keep the autoscaler from removing it when idle.
TRAINING_NODE_TYPES = ("train",)


@dataclass(frozen=True)
class ReplicaResources:
    """What a model replica runs on: the accelerator family chosen (or CPU), the Ray actor
    options that pin it there, and why it was chosen."""

    accelerator: str  # family name, or "CPU"
    ray_actor_options: dict[str, Any]
    reason: str
    nodes: tuple[str, ...] = field(default=())  # node ids that hold the chosen accelerator


class _Holder(NamedTuple):
    """A healthy node that can hold a replica of its family, as a pin sees it."""

    node_id: str
    gpus: int  # those Ray hands out
    typed: bool  # Ray lists accelerator_type:<family> on it
    declared: str | None  # its orchestrator.io/accelerator-type label, for declared GPUs


def _family_inventory(reports: list[NodeReport], healthy: set[str], cpus: float, gpus: float,
                      accelerator_types: Mapping[str, Collection[str]]
                      ) -> tuple[dict[str, dict[str, Any]], set[str]]:
    """(family -> {"gpus": usable count, "nodes": [...], "pin": actor options that reach
    them}; every family seen on a healthy node). Counted: healthy nodes that can hold a
    replica (`cpus`, and `gpus` of the family, on the node), and of those only the nodes the
    family's pin reaches (_pin)."""
    found: dict[str, list[_Holder]] = defaultdict(list)
    seen: set[str] = set()
    for report in reports:
        if report.node_id not in healthy or report.ray_gpus < 1:
            continue
        # A node of several families (or an unknown one beside a known) promises none: Ray
        # labels it by its first GPU and hands a replica any of its GPUs. Pinned to the T4 of
        # an A100 + T4 node, a replica never started while A100s elsewhere sat idle.
        family = node_family(gpu_families(report.gpus))
        if not family:
            continue
        seen.add(family)
        usable = min(len(report.gpus), int(report.ray_gpus))  # Ray hands out only these
        if usable < gpus or report.ray_cpus < cpus:
            continue
        listed = accelerator_types.get(report.node_id)
        typed = (family in listed if listed is not None
                 else any(g.source != "declared" for g in report.gpus))  # (Ray detected them)
        declared = next((report.labels.get(LABEL_ACCELERATOR_TYPE, g.name)
                         for g in report.gpus if g.source == "declared"), None)
        found[family].append(_Holder(report.node_id, usable, typed, declared))
    inventory = {}
    for family, holders in found.items():
        pin, reached = _pin(family, holders)
        if reached:
            inventory[family] = {"gpus": sum(h.gpus for h in reached), "pin": pin,
                                 "nodes": [h.node_id for h in reached]}
    return inventory, seen


def _pin(family: str, holders: list[_Holder]) -> tuple[dict[str, Any], list[_Holder]]:
    """The actor option that pins a replica to `family`, and the nodes it reaches: the
    `accelerator_type` wherever a node lists the resource (the autoscaler reads it);
    else a label_selector on the declared names."""
    typed = [h for h in holders if h.typed]
    if typed:
        return {"accelerator_type": family}, typed
    declared = [h for h in holders if h.declared]
    values = sorted({h.declared for h in declared})
    return {"label_selector": {LABEL_ACCELERATOR_TYPE: values[0] if len(values) == 1
                               else f"in({','.join(values)})"}}, declared


def cpu_replica_options(cpus: float) -> dict[str, Any]:
    """A CPU replica's actor options: its CPUs, on any node but a training one (a node
    without the role label too)."""
    roles = TRAINING_NODE_TYPES
    return {"num_cpus": cpus, "label_selector": {
        LABEL_NODE_TYPE: f"!{roles[0]}" if len(roles) == 1 else f"!in({','.join(roles)})"}}


def recommend_replica_resources(reports: list[NodeReport], healthy: set[str], *,
                                accelerator: str = "auto", cpus: float = 1.0,
                                gpus: float = 1.0,
                                accelerator_types: Mapping[str, Collection[str]] | None = None
                                ) -> ReplicaResources:
    """Ray actor options for one model replica. `accelerator`: "auto", "cpu", or a family
    name (ValueError naming the fields when no healthy node with that family can hold a
    replica). `accelerator_types`: node id -> the accelerator types Ray lists on it (its
    `accelerator_type:<X>` resources); a node left out is taken to list its measured GPUs'."""
    wanted = accelerator.strip()
    if wanted.lower() == "cpu":
        return ReplicaResources("CPU", cpu_replica_options(cpus), "accelerator=cpu asked for")
    inventory, seen = _family_inventory(reports, healthy, cpus, gpus, accelerator_types or {})
    room = f"cpus_per_replica={cpus:g} and gpus_per_replica={gpus:g} on one node"
    if wanted.lower() == "auto":
        candidates = {f: e for f, e in inventory.items() if f in INFERENCE_FAMILIES}
        if not candidates:
            return ReplicaResources(
                "CPU", cpu_replica_options(cpus),
                f"no inference accelerator ({', '.join(INFERENCE_FAMILIES)}) on a healthy node "
                f"with room for a replica ({cpus:g} CPU, {gpus:g} GPU) (accelerators seen: "
                f"{', '.join(sorted(seen)) or 'none'}): CPU")
    else:
        family = accelerator_family(wanted)
        if not family or family not in inventory:
            raise ValueError(f"accelerator: no healthy node has {wanted!r} accelerators Ray can "
                             f"schedule with {room} (seen: {', '.join(sorted(seen)) or 'none'})"
                             f"; use 'auto' or 'cpu', or ask for less")
        candidates = {family: inventory[family]}
    family = max(candidates, key=lambda f: (candidates[f]["gpus"], ACCELERATOR_SPEED.get(f, 0)))
    entry = candidates[family]
    return ReplicaResources(
        family, {"num_cpus": cpus, "num_gpus": gpus, **entry["pin"]},
        f"{entry['gpus']} {family} accelerator(s) on {len(entry['nodes'])} healthy node(s) "
        f"with room for a replica", tuple(entry["nodes"]))


def listed_accelerator_types(resources: Mapping[str, Any]) -> set[str]:
    """The accelerator types a Ray node lists (its `accelerator_type:<X>` resources)."""
    return {str(key).removeprefix(ACCELERATOR_RESOURCE_PREFIX) for key in resources
            if str(key).startswith(ACCELERATOR_RESOURCE_PREFIX)}


def report_from_ray_node(node: dict[str, Any]) -> NodeReport:
    """A NodeReport from one `ray.nodes()` entry, for clusters without the scheduler: declared
    accelerators from the node labels, else those Ray detected itself (NVML), which it lists as
    an `accelerator_type:<name>` resource. Nothing is measured, so memory and load are 0."""
    labels = dict(node.get("Labels") or {})
    resources = node.get("Resources") or {}
    try:
        gpus = declared_gpus(labels, float(resources.get("GPU", 0)))
    except ValueError:  # a malformed label: the node agent reports it; count no accelerators
        gpus = ()
    detected = sorted(listed_accelerator_types(resources))
    if not gpus and detected:
        gpus = tuple(GpuInfo(i, detected[0], 0, 0) for i in range(int(resources.get("GPU", 0))))
    cpus = float(resources.get("CPU", 0))
    return NodeReport(node["NodeID"], node.get("NodeManagerHostname", ""), cpus,
                      float(resources.get("GPU", 0)), int(cpus), 0.0, 0, 0, gpus, labels)
