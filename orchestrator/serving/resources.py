"""What a serving replica asks Ray for: an inference accelerator when the cluster has one,
else CPU. A pure function of the scheduler's view of the cluster (NodeReports, measured by
NVML or declared through node labels), returning Ray Serve `ray_actor_options`.

Inference-class accelerators (T4, L4, A10/A10G, L40S) are preferred: a small model serves
well on them, and the big training GPUs stay free for training jobs. Among inference families
the one with the most accelerators on healthy nodes wins (room for replicas to scale out),
then the faster. With none, replicas run on CPU ("auto"); a family can also be asked for by
name, which may then be a training one.

Pinning a replica to a family: Ray knows NVML-detected accelerators by the resource
`accelerator_type:<T4>` (the `accelerator_type` actor option); declared ones only by the node
label `orchestrator.io/accelerator-type`, so those replicas get a `label_selector` on it.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from orchestrator.config import ACCELERATOR_SPEED
from orchestrator.inventory import (LABEL_ACCELERATOR_TYPE, GpuInfo, NodeReport,
                                    accelerator_family, declared_gpus, gpu_families,
                                    node_family)

INFERENCE_FAMILIES = ("T4", "L4", "A10", "A10G", "L40S")


@dataclass(frozen=True)
class ReplicaResources:
    """What a model replica runs on: the accelerator family chosen (or CPU), the Ray actor
    options that pin it there, and why it was chosen."""

    accelerator: str  # family name, or "CPU"
    ray_actor_options: dict[str, Any]
    reason: str
    nodes: tuple[str, ...] = field(default=())  # node ids that hold the chosen accelerator


def _family_inventory(reports: list[NodeReport], healthy: set[str]
                      ) -> dict[str, dict[str, Any]]:
    """family -> {"gpus": usable count, "nodes": [...], "declared": {label values},
    "measured": count}, over healthy nodes whose Ray GPU count covers the accelerators."""
    inventory: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"gpus": 0, "nodes": [], "declared": set(), "measured": 0})
    for report in reports:
        if report.node_id not in healthy or report.ray_gpus < 1:
            continue
        # A node of several families (or an unknown one beside a known) promises none: Ray
        # labels it by its first GPU and hands a replica any of its GPUs. Pinned to the T4 of
        # an A100 + T4 node, a replica never started while A100s elsewhere sat idle.
        if not node_family(gpu_families(report.gpus)):
            continue
        by_family: dict[str, list] = defaultdict(list)
        for gpu in report.gpus:
            by_family[accelerator_family(gpu.name)].append(gpu)
        for family, gpus in by_family.items():
            entry = inventory[family]
            # Ray hands out only the GPUs it schedules: never count more than it has.
            entry["gpus"] += min(len(gpus), int(report.ray_gpus))
            entry["nodes"].append(report.node_id)
            for gpu in gpus:
                if gpu.source == "declared":
                    entry["declared"].add(report.labels.get(LABEL_ACCELERATOR_TYPE, gpu.name))
                else:
                    entry["measured"] += 1
    return inventory


def recommend_replica_resources(reports: list[NodeReport], healthy: set[str], *,
                                accelerator: str = "auto", cpus: float = 1.0,
                                gpus: float = 1.0) -> ReplicaResources:
    """Ray actor options for one model replica. `accelerator`: "auto", "cpu", or a family
    name (ValueError naming the field when that family is nowhere in the cluster)."""
    cpu_only = ReplicaResources("CPU", {"num_cpus": cpus}, "")
    wanted = accelerator.strip()
    if wanted.lower() == "cpu":
        return ReplicaResources("CPU", cpu_only.ray_actor_options, "accelerator=cpu asked for")
    inventory = _family_inventory(reports, healthy)
    if wanted.lower() == "auto":
        candidates = {f: e for f, e in inventory.items() if f in INFERENCE_FAMILIES}
        if not candidates:
            seen = ", ".join(sorted(inventory)) or "none"
            return ReplicaResources("CPU", cpu_only.ray_actor_options,
                                    f"no inference accelerator ({', '.join(INFERENCE_FAMILIES)})"
                                    f" on a healthy node (accelerators seen: {seen}): CPU")
    else:
        family = accelerator_family(wanted)
        if not family or family not in inventory:
            seen = ", ".join(sorted(inventory)) or "none"
            raise ValueError(f"accelerator: no healthy node has {wanted!r} accelerators Ray can "
                             f"schedule (seen: {seen}); use 'auto' or 'cpu'")
        candidates = {family: inventory[family]}
    family = max(candidates, key=lambda f: (candidates[f]["gpus"], ACCELERATOR_SPEED.get(f, 0)))
    entry = candidates[family]
    options: dict[str, Any] = {"num_cpus": cpus, "num_gpus": gpus}
    if entry["measured"] == 0:  # declared only: Ray knows them by the node label alone
        values = sorted(entry["declared"])
        options["label_selector"] = {
            LABEL_ACCELERATOR_TYPE: values[0] if len(values) == 1 else f"in({','.join(values)})"}
    else:
        options["accelerator_type"] = family
    return ReplicaResources(
        family, options,
        f"{entry['gpus']} {family} accelerator(s) on {len(entry['nodes'])} healthy node(s)",
        tuple(entry["nodes"]))


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
    detected = [key.split(":", 1)[1] for key in resources if key.startswith("accelerator_type:")]
    if not gpus and detected:
        gpus = tuple(GpuInfo(i, detected[0], 0, 0) for i in range(int(resources.get("GPU", 0))))
    cpus = float(resources.get("CPU", 0))
    return NodeReport(node["NodeID"], node.get("NodeManagerHostname", ""), cpus,
                      float(resources.get("GPU", 0)), int(cpus), 0.0, 0, 0, gpus, labels)
