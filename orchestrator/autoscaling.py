"""The node types an autoscaling Ray cluster can add, and what a job would need of them.

A job that the cluster as it stands can never hold (no A100 node is up yet on a fresh
`ray up cluster.yaml`) was rejected at once, and nothing asked the autoscaler for the nodes it
names. When the cluster's autoscaling config is known (the head's `ray_bootstrap_config.yaml`,
or the `--autoscaling-config` its autoscaler runs with), such a job waits in the queue
instead, and the scheduler asks the autoscaler for its workers' resources
(`ray.autoscaler.sdk.request_resources`); once the nodes join and their agents report, the
queue places it as any other. A job no node type can hold either is still rejected at once.

    types = node_types_from_config(yaml.safe_load(open("cluster.yaml")))
    plan = scale_up_plan(JobSpec("j", num_workers=16, gpus_per_worker=1,
                                 accelerator_types=("A100",)), types)   # (train_a100, 2 nodes)
    bundles = resource_bundles(spec, plan[0])   # what request_resources is asked for

Pure: no Ray. The live scheduler (ray_layer/scheduler_actor.py) reads the config and makes
the request; the core (scheduler_core.py) decides which waiting jobs need one.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

from orchestrator.config import JobSpec
from orchestrator.inventory import (LABEL_ACCELERATOR_COUNT, LABEL_ACCELERATOR_MEMORY_GB,
                                    LABEL_ACCELERATOR_TYPE, LABEL_NETWORK_GBPS,
                                    LABEL_NETWORK_GROUP, GIB,
                                    accelerator_family)
from orchestrator.validation import is_int, is_number, parse_number

ACCELERATOR_RESOURCE_PREFIX = "accelerator_type:"  # Ray's resource per accelerator type
# A tiny amount of the type's accelerator_type resource in each bundle steers the autoscaler
# to the types declaring it (as Ray's own accelerator_type option does) without using it up;
# so does one of a resource of the type's own (steering_resource) to that type alone.
ACCELERATOR_RESOURCE_SHARE = 0.001
# Resources Ray gives every node (or a GPU node): no one node type's own.
RAY_NODE_RESOURCES = frozenset({"CPU", "GPU", "memory", "object_store_memory"})
# Ray's label naming a node's type (its node group): Ray 2.60 sets it on the nodes its
# autoscaler v2 launches (`ray up`'s default since 2.50) and on the head.
NODE_GROUP_LABEL = "ray.io/node-group"
# nodes_up_key's prefix of a resource of one type's own: nodes up count only where they have it
RESOURCE_KEY_PREFIX = "resource:"
# The cluster's max_workers when the config sets none: Ray's documented default (2.60's
# ray-cluster-configuration, and the AWS, GCP and Azure providers' defaults.yaml). A node type
# without its own max_workers takes the cluster's (Ray's fill_node_type_min_max_workers).
RAY_DEFAULT_MAX_WORKERS = 2
# Ray's memory resource, of a node's RAM: the object store takes the rest (Ray 2.60's
# DEFAULT_OBJECT_STORE_MEMORY_PROPORTION, 0.3). `ray up` fills in a worker type's memory so
# (the AWS provider: 70% of the instance's RAM), and the autoscaler fits request_resources'
# bundles onto the nodes up by their type's resources: a node up holds a bundle's memory
# against this share of its RAM, not all of it.
RAY_MEMORY_SHARE = 0.7


@dataclass(frozen=True)
class NodeType:
    """One of the cluster config's available_node_types, as placement sees it."""

    name: str
    cpus: float
    gpus: int
    family: str  # accelerator family ("" for none or unknown)
    accelerator_resource: str  # "accelerator_type:A100", or "" when the type declares none
    gpu_memory_gb: float | None
    network_gbps: float | None  # between nodes of this type (its network-gbps label)
    max_workers: int
    # Host RAM (GiB): its resources' memory (bytes, as Ray takes it; `ray up` on AWS fills it
    # in from the instance type). None where the config states none: any worker fits.
    memory_gb: float | None = None
    # The config's top-level max_workers: Ray launches no more worker nodes than this, of all
    # types together (RAY_DEFAULT_MAX_WORKERS where the config sets none; None: no bound)
    cluster_max_workers: int | None = None
    cluster_max_workers_set: bool = True  # False: RAY_DEFAULT_MAX_WORKERS, the config sets none
    # Its network-group label ("" for none): nodes of two types share a fabric (their
    # network-gbps between them) only when both name one group, as placement counts links.
    network_group: str = ""
    # The head's type (planned where its max_workers is above 0): its nodes are the head, up
    # already, and up to max_workers worker nodes Ray launches beside it.
    head: bool = False
    # A custom resource (>= 1) in its resources that no other type of the config declares:
    # what steers the autoscaler to it for a job's bundles where its accelerator_type does
    # not (steering_resource; "" for none). Ray 2.60's autoscaler picks the types for
    # bundles by its own scoring (get_nodes_for); the bundle_label_selectors of
    # request_resources reach autoscaler v2 only.
    own_resource: str = ""
    # Its accelerator_type resource is one no other type of those it launches declares: a GPU
    # job's bundles naming it reach this type alone (of two A100 types, either).
    accelerator_own: bool = False
    # The names of the resources it declares above 0 (amounts aside): which types Ray's
    # autoscaler may add for a bundle (untold_types)
    resource_keys: frozenset[str] = frozenset()

    def summary(self) -> dict[str, Any]:
        """What placement reads of the type, as status --json shows it (null: not stated)."""
        return {"name": self.name, "cpus": self.cpus, "gpus": self.gpus,
                "family": self.family or None, "gpu_memory_gb": self.gpu_memory_gb,
                "memory_gb": self.memory_gb, "max_workers": self.max_workers,
                "network_gbps": self.network_gbps, "network_group": self.network_group or None}

    def workers_per_node(self, spec: JobSpec) -> int:
        by_cpu = math.floor(self.cpus / spec.cpus_per_worker + 1e-9) \
            if spec.cpus_per_worker else math.inf
        by_gpu = self.gpus // math.ceil(spec.gpus_per_worker) \
            if spec.gpus_per_worker else math.inf
        by_ram = math.floor(self.memory_gb / spec.min_host_memory_gb + 1e-9) \
            if spec.min_host_memory_gb and self.memory_gb is not None else math.inf
        count = min(by_cpu, by_gpu, by_ram)
        return 0 if count == math.inf else int(count)


def node_types_from_config(config: dict[str, Any]) -> tuple[NodeType, ...]:
    """The node types of a Ray cluster config (`ray up`'s YAML, parsed) that its autoscaler
    launches as worker nodes: the head's only where its max_workers is above 0 (Ray 2.60's
    fill_node_type_min_max_workers gives the head type 0 when unset, and its get_nodes_for
    launches up to max_workers worker nodes of it beside the head). ValueError naming the
    node type and field when one cannot be read."""
    types = config.get("available_node_types") if isinstance(config, dict) else None
    if not isinstance(types, dict):
        raise ValueError("the cluster config has no available_node_types mapping")
    head = config.get("head_node_type")
    cluster_max = _cluster_max_workers(config)
    given = config.get("max_workers") is not None
    custom = {name: _custom_resources(t) for name, t in types.items()}
    # (a type without max_workers takes the cluster's, as Ray does: it read as 0, never scaled)
    read = tuple(dataclasses.replace(_node_type(name, t, 0 if name == head else cluster_max),
                                     cluster_max_workers=cluster_max,
                                     cluster_max_workers_set=given, head=name == head,
                                     own_resource=_own_resource(name, custom))
                 for name, t in types.items() if name != head or _head_max_workers(name, t))
    return tuple(dataclasses.replace(t, accelerator_own=_accelerator_own(t, read)) for t in read)


def _custom_resources(raw: Any) -> dict[str, Any]:
    """A node type's custom resources (custom_resources of its resources)."""
    resources = raw.get("resources") if isinstance(raw, dict) else None
    return custom_resources(resources) if isinstance(resources, dict) else {}


def custom_resources(resources: dict[str, Any]) -> dict[str, Any]:
    """Of a node type's or a node's Ray resources, those other than Ray gives every node
    (RAY_NODE_RESOURCES, a node's `node:<ip>`) and accelerator_type: the custom ones, which
    Ray's node takes from its type's resources (what a node agent reports)."""
    return {key: value for key, value in resources.items()
            if isinstance(key, str) and key not in RAY_NODE_RESOURCES
            and not key.startswith((ACCELERATOR_RESOURCE_PREFIX, "node:"))}


def node_has_resource(resources: dict[str, Any] | None, labels: dict[str, str],
                      resource: str, node_types: tuple[NodeType, ...]) -> bool:
    """A node up has `resource` (a type's own, that bundles carry: nodes_up_key), as the
    autoscaler counts it by its type's resources: its custom resources name it (`resources`,
    as its agent reports them), or, from an agent reporting none (None: an older version),
    Ray's NODE_GROUP_LABEL names the type declaring it."""
    if resources is not None:
        return resource in resources
    group = labels.get(NODE_GROUP_LABEL)
    return any(t.name == group and t.own_resource == resource for t in node_types)


def _own_resource(name: str, custom: dict[str, dict[str, Any]]) -> str:
    """The first (by name) custom resource of at least 1 that type `name` alone declares."""
    others = {key for other, resources in custom.items() if other != name for key in resources}
    return next((key for key, value in sorted(custom[name].items())
                 if key not in others and is_number(value) and value >= 1), "")


def _accelerator_own(node_type: NodeType, types: tuple[NodeType, ...]) -> bool:
    """The type declares an accelerator_type resource no other type declares."""
    return bool(node_type.accelerator_resource) and sum(
        t.accelerator_resource == node_type.accelerator_resource for t in types) == 1


def _head_max_workers(name: str, raw: Any) -> int:
    """The head type's max_workers (0 when unset, as Ray reads it): the worker nodes of that
    type Ray may launch."""
    return _whole_number(raw.get("max_workers", 0) if isinstance(raw, dict) else 0,
                         f"node type {name!r}: max_workers")


def _cluster_max_workers(config: dict[str, Any]) -> int:
    """The config's top-level max_workers (Ray's default when absent); ValueError naming it."""
    raw = config.get("max_workers")
    return RAY_DEFAULT_MAX_WORKERS if raw is None else _whole_number(
        raw, "the cluster config's max_workers")


def _whole_number(raw: Any, what: str) -> int:
    """`raw` as an int when it is a whole number >= 0, else ValueError naming `what` (int()
    read 2.7 as 2, true as 1, and took -1). A float of a whole number (YAML's `8.0`) is one:
    Ray 2.60's launcher schema (JSON Schema draft-07) takes it as an integer, so `ray up`
    runs such a config, and refusing it here left the autoscaler unused."""
    if is_number(raw) and isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    if not (is_int(raw) and raw >= 0):
        raise ValueError(f"{what} must be a whole number >= 0, not {raw!r}")
    return raw


def _memory_bytes(raw: Any, what: str) -> int:
    """A resources' memory, in bytes as Ray takes it; ValueError naming `what` when it is not
    a whole number, or is one no node has in bytes (`memory: 512` meant as GiB: 512 bytes)."""
    memory = _whole_number(raw, what)
    if 0 < memory < 1024 ** 2:
        raise ValueError(f"{what} {memory} is under 1 MiB: Ray takes it in bytes "
                         f"({memory} GiB is {memory * GIB})")
    return memory


def _node_type(name: str, raw: Any, default_max: Any) -> NodeType:
    if not isinstance(raw, dict):
        raise ValueError(f"node type {name!r}: not a mapping")
    resources, labels = raw.get("resources") or {}, raw.get("labels") or {}
    if not isinstance(resources, dict) or not isinstance(labels, dict):
        raise ValueError(f"node type {name!r}: resources and labels must be mappings")
    accelerator = next((key for key in resources
                        if str(key).startswith(ACCELERATOR_RESOURCE_PREFIX)), "")
    family = accelerator_family(str(labels.get(LABEL_ACCELERATOR_TYPE, "")) or
                                accelerator.removeprefix(ACCELERATOR_RESOURCE_PREFIX))
    gpus = _whole_number(resources.get("GPU", 0), f"node type {name!r}: GPU")
    _check_labels_agree(name, labels, accelerator, gpus)
    max_workers = _whole_number(raw.get("max_workers", default_max),
                                f"node type {name!r}: max_workers")
    memory = resources.get("memory")  # (bytes: Ray's schema takes whole numbers only)
    memory_gb = None if memory is None else \
        _memory_bytes(memory, f"node type {name!r}: memory") / GIB
    return NodeType(
        name=name, cpus=_number(resources.get("CPU", 0), f"node type {name!r}: CPU"),
        gpus=gpus, family=family, accelerator_resource=accelerator,
        gpu_memory_gb=_label_number(name, labels, LABEL_ACCELERATOR_MEMORY_GB),
        network_gbps=_label_number(name, labels, LABEL_NETWORK_GBPS),
        max_workers=max_workers, memory_gb=memory_gb,
        network_group=str(labels.get(LABEL_NETWORK_GROUP) or ""),
        resource_keys=frozenset(str(key) for key, value in resources.items()
                                if is_number(value) and value > 0))


def _check_labels_agree(name: str, labels: dict, accelerator: str, gpus: int) -> None:
    """ValueError naming the node type when its labels contradict its resources: the
    accelerator_type resource steers the autoscaler while the label's family is what plans
    match (an A100 job asked for another family's nodes), and an agent without NVML reports
    the accelerator-count label's GPUs, not the GPU resource the plan counted."""
    label_family = accelerator_family(str(labels.get(LABEL_ACCELERATOR_TYPE, "")))
    resource_family = accelerator_family(accelerator.removeprefix(ACCELERATOR_RESOURCE_PREFIX))
    if label_family and accelerator and label_family != resource_family:
        raise ValueError(
            f"node type {name!r}: label {LABEL_ACCELERATOR_TYPE}="
            f"{labels[LABEL_ACCELERATOR_TYPE]!r} (family {label_family}) but resource "
            f"{accelerator} (family {resource_family or 'none'}): make them name one family")
    count = labels.get(LABEL_ACCELERATOR_COUNT)
    if count is None or not labels.get(LABEL_ACCELERATOR_TYPE):
        return  # (the count label counts only beside the type label, as on the node)
    if not _as_number(count) == gpus:
        raise ValueError(
            f"node type {name!r}: label {LABEL_ACCELERATOR_COUNT}={count!r} but resources "
            f"GPU: {gpus}: make them agree (an agent that cannot see the GPUs reports the "
            "label's count)")


def _number(raw: Any, what: str) -> float:
    """`raw` (a number, or a label's string) as a float when finite and >= 0, else ValueError
    naming `what` (float() named neither the field nor took only such figures: -4, inf, nan)."""
    value = _as_number(raw)
    if not (is_number(value) and value >= 0):
        raise ValueError(f"{what} must be a number >= 0, not {raw!r}")
    return float(value)


def _as_number(raw: Any) -> Any:
    """A label's string as the number it writes (validation.parse_number, as the node agent
    reads its labels: float() took `1_0` as 10), None when it writes none; other values as
    they are (a YAML number)."""
    if not isinstance(raw, str):
        return raw
    try:
        return parse_number(raw)
    except ValueError:
        return None


def _label_number(name: str, labels: dict, key: str) -> float | None:
    """A number label of node type `name` (None when it has none)."""
    value = labels.get(key)
    return None if value in (None, "") else _number(value, f"node type {name!r}: label {key}")


def scale_up_plan(spec: JobSpec, node_types: tuple[NodeType, ...],
                  held_up: Callable[[NodeType], int] | None = None
                  ) -> tuple[NodeType, int] | None:
    """The node type, and how many nodes of it, that would hold all of `spec`'s workers on
    their own (families, GPU count and memory, CPUs, host RAM where the type states it, the
    bandwidth floor between nodes of one type, its max_workers and the cluster's); for a CPU
    job a type without GPUs first, then the fewest nodes to add (`held_up`: how many of the
    workers the nodes up would hold beside nodes of that type, as the autoscaler counts;
    none without it), then the fewest nodes, then the fewest idle GPUs. A type of which,
    so counted, none would be added is passed over (the autoscaler adds none: the nodes up
    hold its bundles). None when no type can alone (scale_up_parts then tries several)."""
    best = None
    for node_type in node_types:
        per_node = _workers_per_node(spec, node_type)
        if not per_node:
            continue
        nodes = math.ceil(spec.num_workers / per_node)
        if nodes > _nodes_allowed(node_type) or _beyond_cluster_max(node_type, nodes):
            continue
        if nodes > 1 and spec.min_bandwidth_gbps and not _meets_floor(spec, node_type):
            continue
        if _short_gpus_fitting(spec, node_type, node_types):
            continue  # (the autoscaler may add those for its bundles: short_gpus_note)
        idle_gpus = nodes * node_type.gpus - spec.num_workers * math.ceil(spec.gpus_per_worker)
        to_add = nodes if held_up is None else _to_add(spec, node_type, nodes,
                                                       spec.num_workers, held_up(node_type))
        if not to_add:
            continue  # (the nodes up hold its bundles as the autoscaler counts: it adds none)
        key = (_gpus_for_cpu_job(spec, node_type), to_add, nodes, idle_gpus)
        if best is None or key < best[0]:
            best = (key, node_type, nodes)
    return None if best is None else (best[1], best[2])


# One type's share of a plan: (node type, nodes of it, the job's workers they hold). Of a plan
# made by scale_up_parts the nodes are those needed in all (any up included); of one made by
# parts_to_add, those the autoscaler adds.
PlanPart = tuple[NodeType, int, int]


def scale_up_parts(spec: JobSpec, node_types: tuple[NodeType, ...],
                   held_up: Callable[[NodeType], int] | None = None
                   ) -> tuple[PlanPart, ...] | None:
    """The nodes that would hold all of `spec`'s workers: one type's (scale_up_plan) when one
    holds them alone; else nodes of several types, as placement mixes them (a 16-GPU job
    taking A100 or H100 with each type's max_workers 1: one node of each). Across types:
    the types that would hold a worker, the largest (most workers a node) first, each up to
    its max_workers, all within the cluster's; where the job states a bandwidth floor, only
    types of one network group whose network-gbps meets it (nodes of two types share a
    fabric only so). Of several such groups, the plan adding fewest nodes (`held_up`, as
    scale_up_plan, which passes over a plan adding none), then the fewest nodes. None when
    none holds it: it can never run here, autoscaling or not (given `held_up`: nor would the
    autoscaler add the nodes)."""
    single = scale_up_plan(spec, node_types, held_up)
    if single is not None:
        return ((*single, spec.num_workers),)
    # (a job's bundles are steered to a type only by a resource of its own: without, the
    # autoscaler picks the types for them by its own scoring, another mix, maybe too few)
    holding = [t for t in node_types if _workers_per_node(spec, t) and t.max_workers
               and (steering_resource(spec, t) or _unsteered_pool(spec, t, node_types))]
    if spec.min_bandwidth_gbps:
        groups = {t.network_group for t in holding if t.network_group}
        pools = [[t for t in holding if t.network_group == group and _meets_floor(spec, t)]
                 for group in sorted(groups)]
    else:
        pools = [holding]
    best = None
    for pool in pools:
        parts = _fill_across(spec, pool, held_up)
        if parts is None or not _any_mix_holds(spec, parts, node_types):
            continue
        added = sum(nodes for _, nodes, _ in parts_to_add(spec, parts, held_up or _none_up))
        if not added:
            continue  # (as scale_up_plan: the autoscaler would add none)
        key = (added, sum(nodes for _, nodes, _ in parts))
        if best is None or key < best[0]:
            best = (key, parts)
    return None if best is None else best[1]


def _fill_across(spec: JobSpec, pool: list[NodeType],
                 held_up: Callable[[NodeType], int] | None) -> tuple[PlanPart, ...] | None:
    """Greedy: the workers on the types of `pool` with the most workers a node first (the
    fewest nodes; for a CPU job, types without GPUs first; of equals, the one whose nodes
    up hold more), each type up to its max_workers, all within the cluster's."""
    order = sorted(pool, key=lambda t: (_gpus_for_cpu_job(spec, t),
                                        -_workers_per_node(spec, t),
                                        -(held_up(t) if held_up else 0)))
    room = min((t.cluster_max_workers for t in pool if t.cluster_max_workers is not None),
               default=math.inf)  # (worker nodes: the head, of the head's type, is none)
    left, parts = spec.num_workers, []
    for node_type in order:
        per_node = _workers_per_node(spec, node_type)
        nodes = min(_nodes_allowed(node_type), room + node_type.head,
                    math.ceil(left / per_node))
        if nodes < 1:
            continue
        parts.append((node_type, nodes, min(left, nodes * per_node)))
        left, room = left - parts[-1][2], room - (nodes - node_type.head)
        if left <= 0:
            return tuple(parts)
    return None


def parts_to_add(spec: JobSpec, parts: tuple[PlanPart, ...],
                 held_up: Callable[[NodeType], int]) -> tuple[PlanPart, ...]:
    """A plan's parts with the nodes the autoscaler adds in place of those needed in all:
    each type's workers less those the nodes up would hold for its bundles (`held_up`; the
    nodes up of one family counted once, for the first type of it). None in all where the
    nodes up hold every part's workers so: scale_up_parts given `held_up` makes no such
    plan."""
    held_left: dict[str, int] = {}
    out = []
    for node_type, nodes, workers in parts:
        key = nodes_up_key(spec, node_type)
        held = min(workers, held_left.setdefault(key, held_up(node_type)))
        held_left[key] -= held
        out.append((node_type, _to_add(spec, node_type, nodes, workers, held), workers))
    return tuple(out)


def steering_resource(spec: JobSpec, node_type: NodeType) -> str:
    """The resource of the type's own that `spec`'s bundles carry to steer the autoscaler to
    it alone (resource_bundles): for a GPU job its accelerator_type where no other type
    declares that, else its own custom resource; "" for none (the autoscaler, choosing
    types by its own scoring, may add another type for them)."""
    if spec.gpus_per_worker and node_type.accelerator_own:
        return node_type.accelerator_resource
    return node_type.own_resource


def nodes_up_key(spec: JobSpec, node_type: NodeType) -> str:
    """The family of the nodes up that the autoscaler counts toward bundles asked of a node
    type (bundles naming its accelerator_type resource), "" where all nodes up count, and
    `resource:NAME` where only nodes having that custom resource of the type's own count
    (node_has_resource)."""
    steer = steering_resource(spec, node_type)
    if steer and steer != node_type.accelerator_resource:
        return RESOURCE_KEY_PREFIX + steer
    return node_type.family if spec.gpus_per_worker and node_type.accelerator_resource else ""


def plan_bundles(spec: JobSpec, parts: tuple[PlanPart, ...]) -> list[dict[str, float]]:
    """What request_resources is asked for: each part's workers' bundles, steered to its type
    (resource_bundles)."""
    return [bundle for node_type, _, workers in parts
            for bundle in resource_bundles(spec, node_type, workers)]


def plan_named(parts: tuple[PlanPart, ...]) -> str:
    """`1 x a100 + 1 x h100`: the nodes of each part (parts with none left out)."""
    return " + ".join(f"{nodes} x {node_type.name}" for node_type, nodes, _ in parts if nodes)


def _none_up(node_type: NodeType) -> int:
    return 0


def _workers_per_node(spec: JobSpec, node_type: NodeType) -> int:
    """Workers of `spec` a node of the type holds, 0 where the type cannot be planned for it:
    not of its families, or without the accelerator_type resource for them (the autoscaler
    could meet the request with another family), or GPUs of undeclared or too little
    memory for a job asking for GPU memory."""
    families = {f.upper() for f in spec.accelerator_types}
    if families and (node_type.family not in families or not node_type.accelerator_resource):
        return 0
    if spec.gpus_per_worker and spec.min_gpu_memory_gb and (
            node_type.gpu_memory_gb is None
            or node_type.gpu_memory_gb < spec.min_gpu_memory_gb):
        return 0
    return node_type.workers_per_node(spec)


def _bundle_fits(bundle: dict[str, float], node_type: NodeType) -> bool:
    """One bundle fits a node of the type, as Ray's autoscaler sees its resources (GPUs,
    CPUs, memory where asked, the accelerator_type named)."""
    return node_type.gpus >= bundle.get("GPU", 0) and node_type.cpus + 1e-9 >= bundle["CPU"] \
        and all(node_type.accelerator_resource == key for key in bundle
                if key.startswith(ACCELERATOR_RESOURCE_PREFIX)) \
        and ("memory" not in bundle or (node_type.memory_gb is not None and
                                        node_type.memory_gb * GIB >= bundle["memory"]))


def _unsteered_pool(spec: JobSpec, node_type: NodeType,
                    node_types: tuple[NodeType, ...]) -> tuple[NodeType, ...]:
    """The types the autoscaler may add for the type's bundles where no resource of its own
    steers them to it (those they fit), where each holds workers of the job, asks the same
    bundles and is steered by none (two g5 sizes both declaring accelerator_type:A10G, as
    Ray's AWS provider names them): a plan may use them as one pool (_any_mix_holds);
    else () (the type is planned beside others only if steered). A GPU job's only: for
    CPU-only bundles Ray's scoring passes over some types with room (one stating memory
    the bundles do not ask, GPU types), and a mix may hold fewer."""
    if spec.min_bandwidth_gbps or not spec.gpus_per_worker:
        return ()
    bundle = resource_bundles(spec, node_type, 1)[0]
    fitting = tuple(t for t in node_types if t.max_workers and _bundle_fits(bundle, t))
    return () if any(steering_resource(spec, t) or not _workers_per_node(spec, t)
                     or resource_bundles(spec, t, 1)[0] != bundle for t in fitting) \
        else fitting


def _any_mix_holds(spec: JobSpec, parts: tuple[PlanPart, ...],
                   node_types: tuple[NodeType, ...]) -> bool:
    """Each pool of unsteered types in a plan across types (_unsteered_pool) holds the
    workers planned on it in whatever mix the autoscaler's scoring adds, within the types'
    max_workers and the cluster's beside the plan's other nodes: filled the fewest workers
    a node first (the most nodes). Ray 2.60 asked for 10 workers' bundles fitting a (8 GPUs,
    max_workers 1) and b (4 GPUs, 2), the cluster's max_workers 2, added 2 x b."""
    pools = {_unsteered_pool(spec, t, node_types) for t, _, _ in parts
             if not steering_resource(spec, t)}
    for pool in pools:
        left = sum(workers for t, _, workers in parts if t in pool)
        cluster_max = parts[0][0].cluster_max_workers
        room = math.inf if cluster_max is None else \
            cluster_max - sum(nodes for t, nodes, _ in parts if t not in pool)
        for t in sorted(pool, key=lambda t: _workers_per_node(spec, t)):
            nodes = max(0, min(t.max_workers, room,
                               math.ceil(left / _workers_per_node(spec, t))))
            left, room = left - nodes * _workers_per_node(spec, t), room - nodes
        if left > 0:
            return False
    return True


def _short_gpus_fitting(spec: JobSpec, node_type: NodeType,
                        node_types: tuple[NodeType, ...]) -> list[NodeType]:
    """Of the other types the autoscaler may launch, those the job's bundles asked of
    `node_type` fit (resource_bundles: not steered to it alone) whose GPUs lack the memory
    the job asks (less, or not declared): Ray's autoscaler sees no GPU memory, and may add
    one of them, where the job never fits. Empty where the job asks none."""
    if not (spec.gpus_per_worker and spec.min_gpu_memory_gb) or \
            steering_resource(spec, node_type):
        return []
    bundle = resource_bundles(spec, node_type, 1)[0]
    return [t for t in node_types if t is not node_type and t.max_workers
            and (t.gpu_memory_gb is None or t.gpu_memory_gb < spec.min_gpu_memory_gb)
            and _bundle_fits(bundle, t)]


def _meets_floor(spec: JobSpec, node_type: NodeType) -> bool:
    """The type's declared bandwidth between its nodes meets the job's floor."""
    return node_type.network_gbps is not None and \
        node_type.network_gbps >= spec.min_bandwidth_gbps


def _gpus_for_cpu_job(spec: JobSpec, node_type: NodeType) -> bool:
    """A CPU job on a type with GPUs: last (the autoscaler, asked for CPUs, picks so too)."""
    return not spec.gpus_per_worker and node_type.gpus > 0


def _to_add(spec: JobSpec, node_type: NodeType, nodes: int, workers: int, held_up: int) -> int:
    """Of `nodes` of the type planned for `workers`, those added beside nodes up holding
    `held_up` of them."""
    missing = max(0, workers - held_up)
    return min(nodes, math.ceil(missing / node_type.workers_per_node(spec)))


def _nodes_allowed(node_type: NodeType) -> int:
    """The nodes of the type there may be in all: its max_workers, and the head for its type
    (Ray's get_nodes_for counts it beside them)."""
    return node_type.max_workers + node_type.head


def _beyond_cluster_max(node_type: NodeType, nodes: int) -> bool:
    # (Never within it, even with no other worker node up. Worker nodes up, of any type,
    # count against it too, but may idle out: cluster_room_note tells of them. The head, of
    # the head's type, does not: it is no worker node.)
    return node_type.cluster_max_workers is not None and \
        nodes > node_type.cluster_max_workers + node_type.head


# What Ray 2.60's autoscaler v2 (`ray up`'s default; RAY_UP_enable_autoscaler_v2=0 for v1)
# does unlike v1: it adds a request_resources request's nodes only once all of them fit
# (v2/scheduler.py _enforce_resource_constraints), where v1 adds those that fit.
V2_NONE_UNTIL_ALL_FIT = "autoscaler v1; v2, ray up's default, none until all fit"
V2_NONE_WHERE_UNHELD = "(or, autoscaler v2, none, where its pick leaves some bundles unheld)"
# Which of them serves the cluster: "v1" or "v2" as the live scheduler reads it from Ray's
# GCS (ray_layer.scheduler_actor._running_autoscaler); "unknown" (tests, the simulator, a
# flag it cannot read) names both where they differ.
AUTOSCALERS = ("v1", "v2", "unknown")


def _by_autoscaler(autoscaler: str, **said: Any) -> Any:
    """What `said` gives for the autoscaler that runs (keyword v1, v2 or unknown)."""
    if autoscaler not in AUTOSCALERS:
        raise ValueError(f"autoscaler must be 'v1', 'v2' or 'unknown', not {autoscaler!r}")
    return said[autoscaler]


def ray_adds_now(room: int, autoscaler: str) -> tuple[int, str]:
    """(how many of a plan's nodes Ray adds now, what says why, "" for nothing) where the
    worker nodes up leave room for only `room` of them under the cluster's max_workers: v1
    adds those that fit, v2 none until all fit; where not known, the room's, naming both."""
    said = _by_autoscaler(  # (first: a bad value is refused, room or not)
        autoscaler, v1=(room, ""), unknown=(room, f" ({V2_NONE_UNTIL_ALL_FIT})"),
        v2=(0, " (autoscaler v2 adds a request's nodes only once all fit)"))
    return said if room else (0, "")


def none_where_unheld(autoscaler: str) -> str:
    """What Ray adds for bundles it cannot tell apart beside another type: v2 may add none
    where its pick leaves some unheld (said after "another type"); v1 adds that type."""
    return _by_autoscaler(autoscaler, v1="", unknown=f" {V2_NONE_WHERE_UNHELD}",
                          v2=" (or, as autoscaler v2 does, none where its pick leaves some "
                             "bundles unheld)")


def cluster_room(parts: tuple[PlanPart, ...], workers_up: int | None
                 ) -> tuple[int, int, int] | None:
    """(room, nodes to add, the cluster's max_workers) where a plan's nodes to add (`parts`:
    parts_to_add's) exceed the room the worker nodes up (`workers_up`, of any type; None:
    not known) leave under the cluster's max_workers: Ray launches no worker node beyond it.
    None when they fit, or with no such bound."""
    cluster_max = next((t.cluster_max_workers for t, _, _ in parts), None)
    if workers_up is None or cluster_max is None:
        return None
    room, added = max(0, cluster_max - workers_up), sum(nodes for _, nodes, _ in parts)
    return None if added <= room else (room, added, cluster_max)


def busy_named(busy: dict[str, list[str]]) -> str:
    """`h1: 'train'; h2: 'a', 'b'`: worker nodes up (node id -> the jobs on them)."""
    named = "; ".join(f"{node[:12]}: " + ", ".join(repr(job) for job in jobs)
                      for node, jobs in sorted(busy.items())[:8])
    return named + ("; ..." if len(busy) > 8 else "")


def cluster_room_note(parts: tuple[PlanPart, ...], workers_up: int | None,
                      idle: int | None = None,
                      busy: dict[str, list[str]] | None = None,
                      autoscaler: str = "unknown") -> str | None:
    """Why Ray adds only some of a plan's nodes now (`parts`: those to add, parts_to_add):
    the worker nodes up (`workers_up`, of any type; None: not known) leave less room under
    the cluster's max_workers, and Ray launches the rest only once idle ones are removed
    (its idle_timeout_minutes), and where those that may go idle (`idle`, of the worker
    nodes up; all but the busy ones where not given) are too few, once the jobs on the busy
    ones that may go (`busy`: node id -> jobs) end. None when they fit, or with no such
    bound. What Ray adds now is the `autoscaler`'s (ray_adds_now)."""
    short = cluster_room(parts, workers_up)
    if short is None:
        return None
    room, added, cluster_max = short
    now, why = ray_adds_now(room, autoscaler)
    said = (f"the cluster has {workers_up} worker node(s) up of its max_workers {cluster_max}, "
            f"so Ray adds {now} of them now{why} and the rest only once ")
    busy = busy or {}
    idle = workers_up - len(busy) if idle is None else idle
    if added - room <= idle or not busy:  # (the idle ones make room enough)
        return said + "idle worker node(s) go (its idle_timeout_minutes)"
    return (said + f"worker node(s) go, and {len(busy)} of them run jobs ({busy_named(busy)}): "
            "they go only once those end (then idle for its idle_timeout_minutes)")


def cluster_max_note(parts: tuple[PlanPart, ...], workers_up: int | None,
                     busy: dict[str, list[str]], autoscaler: str = "unknown") -> str | None:
    """Why a plan's nodes never joined (`parts`: those still to add) when the worker nodes
    up leave Ray no room for them under the cluster's max_workers: the figures, the nodes up
    running jobs (`busy`) and the figure to raise it to; None when they fit, or with no such
    bound (the autoscaler's log then says why). What Ray adds is the `autoscaler`'s
    (ray_adds_now)."""
    short = cluster_room(parts, workers_up)
    if short is None:
        return None
    room, added, cluster_max = short
    now, why = ray_adds_now(room, autoscaler)
    return (f"{plan_named(parts)} never joined: the cluster has {workers_up} worker node(s) up "
            f"of its max_workers {cluster_max} (the cluster config's top-level max_workers), "
            f"so Ray adds {now or 'none'} of them{why}"
            + (f" ({len(busy)} of the worker node(s) up run jobs: {busy_named(busy)})"
               if busy else "")
            + f": raise it to {workers_up + added}"
            + (", or submit the job again once those jobs end" if busy else ""))


def ray_memory_gib(ram_gib):
    """A node's Ray memory resource (GiB) as the autoscaler counts it, from its RAM (GiB; a
    number or an array): RAY_MEMORY_SHARE of it."""
    return ram_gib * RAY_MEMORY_SHARE


def autoscaling_summary(node_types: tuple[NodeType, ...],
                        autoscaler: str = "unknown") -> dict[str, Any]:
    """The node types as status --json shows them, the cluster's max_workers (null: no
    node types known) and which autoscaler runs (AUTOSCALERS)."""
    return {"max_workers": next((t.cluster_max_workers for t in node_types), None),
            "node_types": [t.summary() for t in node_types],
            "config_note": untold_types_note(node_types, autoscaler),
            "autoscaler": autoscaler}


def untold_types(node_type: NodeType, node_types: tuple[NodeType, ...],
                 spec: JobSpec | None = None) -> list[NodeType]:
    """The other types (those Ray launches) that bundles planned on `node_type` fit too as
    Ray's autoscaler counts them, amounts and RAM aside: they declare the CPU, and for
    bundles asking GPUs (`spec`'s; without it a GPU type's are taken to) the GPU and the
    type's accelerator_type, those bundles ask for; of bundles asking no GPU planned on a
    type without GPUs, only types without (Ray's scorer keeps such bundles off GPU types
    while others fit: on a GPU type, it prefers those). Ray picks the type for such bundles
    by its own scoring, so it may add one of those instead. Empty where the bundles carry a
    resource of the type's own (steering_resource; without `spec`, its own_resource)."""
    if (steering_resource(spec, node_type) if spec else node_type.own_resource):
        return []
    asks_gpus = bool(node_type.gpus) and (spec is None or bool(spec.gpus_per_worker))
    asked = {"CPU"} | ({"GPU", node_type.accelerator_resource} - {""} if asks_gpus else set())
    return [t for t in node_types if t.name != node_type.name and t.max_workers
            and asked <= t.resource_keys and (asks_gpus or node_type.gpus or not t.gpus)]


def untold_types_note(node_types: tuple[NodeType, ...],
                      autoscaler: str = "unknown") -> str | None:
    """The config's types that Ray's resources cannot tell apart (untold_types), naming
    them and what to declare (and what the `autoscaler` does then, none_where_unheld); None
    where there are none (status --json's autoscaling.config_note; logged when the config
    is read)."""
    unheld = none_where_unheld(autoscaler)  # (first: a bad value is refused, types or not)
    untold = [(t, others) for t in node_types for others in [untold_types(t, node_types)]
              if others]
    if not untold:
        return None
    named = sorted({t.name for t, others in untold for t in (t, *others)})
    fits = ", and ".join(
        f"{'bundles planned on' if i == 0 else 'those on'} {t.name!r} fit "
        f"{', '.join(repr(o.name) for o in others)}" + (" too" if i == 0 else "")
        for i, (t, others) in enumerate(untold))
    return (f"node types {', '.join(repr(name) for name in named)} cannot be told apart by "
            f"Ray's resources ({fits}: amounts aside, the CPU, GPU and accelerator_type they "
            "ask for), and Ray's autoscaler picks the type for bundles by its own scoring, so "
            f"it may add another type than a job's plan names{unheld}: give "
            f"each a resource of its own in its resources, e.g. \"{untold[0][0].name}\": 1")


def untold_plan_note(spec: JobSpec, parts: tuple[PlanPart, ...],
                     node_types: tuple[NodeType, ...],
                     autoscaler: str = "unknown") -> str | None:
    """Why a plan's nodes may never have joined (`parts`: those still to add) when its
    bundles, steered by no resource of their type's own, fit other types too
    (untold_types): Ray's autoscaler may have added one of those instead (the
    `autoscaler`'s way, none_where_unheld); None else."""
    unheld, said = none_where_unheld(autoscaler), []
    for node_type, nodes, _ in parts:
        others = untold_types(node_type, node_types, spec) if nodes else []
        if others:
            one = len(others) == 1
            said.append(
                f"node type {node_type.name!r} cannot be told apart from "
                f"{', '.join(repr(t.name) for t in others)} by Ray's resources: its bundles "
                f"fit {'that type' if one else 'those types'} too, and Ray's autoscaler may "
                f"have added {'it' if one else 'one of them'} instead{unheld} (give "
                f"{node_type.name!r} a resource of its own in its resources, e.g. "
                f"\"{node_type.name}\": 1)")
    return "; ".join(said) or None


def _uncapped(node_type: NodeType) -> NodeType:
    """The type without its max_workers or the cluster's: the notes below ask what else stands
    in the way (each names one thing, max_workers_note the bounds)."""
    return dataclasses.replace(node_type, max_workers=math.inf, cluster_max_workers=None)


def max_workers_note(spec: JobSpec, node_types: tuple[NodeType, ...]) -> str | None:
    """Why no plan holds `spec` when only max_workers stands in the way (a type would hold it
    with more nodes than its own max_workers, or the cluster's, lets Ray launch), naming the
    type, the bound(s) short and the figure to raise them to; else None (also where the
    type holds it within both: the autoscaler adding none of it, say, which
    adds_none_note tells)."""
    uncapped = tuple(_uncapped(t) for t in node_types)
    plan = scale_up_plan(spec, uncapped)
    if plan is None:
        return None
    uncapped_type, nodes = plan
    node_type = node_types[uncapped.index(uncapped_type)]
    short = _max_workers_short(node_type, nodes)
    if not short:  # (it holds the job within both: something else stands in the way)
        return None
    return f"it needs {nodes} x {node_type.name} node(s) in all (any up included), but {short}"


def _max_workers_short(node_type: NodeType, nodes: int) -> str | None:
    """Where `nodes` of the type are more than its max_workers or the cluster's lets Ray
    launch: which bound(s) and the figure to raise them to (max_workers_note,
    short_gpus_note); else None."""
    short = []
    if nodes > _nodes_allowed(node_type):
        short.append(f"node type {node_type.name!r} has max_workers {node_type.max_workers}")
    if _beyond_cluster_max(node_type, nodes):
        short.append(f"the cluster config's max_workers is {node_type.cluster_max_workers}"
                     + ("" if node_type.cluster_max_workers_set
                        else " (Ray's default: the config sets none)"))
    if not short:
        return None
    return (f"{' and '.join(short)}: raise {'it' if len(short) == 1 else 'both'} to "
            f"{nodes - node_type.head}" + (" (the head is one of them)" if node_type.head else ""))


def unlabelled_memory_note(spec: JobSpec, node_types: tuple[NodeType, ...]) -> str | None:
    """Why no plan holds `spec` when it asks for GPU memory and a GPU type that would hold it
    declares none (no LABEL_ACCELERATOR_MEMORY_GB: scale_up_plan passes it over, its GPUs'
    memory not known), naming each such type (also one whose max_workers is short too); else
    None."""
    if not (spec.gpus_per_worker and spec.min_gpu_memory_gb):
        return None
    passed_over = [t for t in node_types if t.gpus and t.gpu_memory_gb is None and scale_up_plan(
        spec, (dataclasses.replace(_uncapped(t), gpu_memory_gb=math.inf),))]
    if not passed_over:
        return None
    named = ", ".join(f"{t.name!r} ({t.family or 'GPU'})" for t in passed_over)
    one = len(passed_over) == 1
    return (f"node type{'' if one else 's'} {named} would hold it but "
            f"{'has' if one else 'have'} no {LABEL_ACCELERATOR_MEMORY_GB} label: a job asking "
            f"for GPU memory (min_gpu_memory_gb {spec.min_gpu_memory_gb:g}) is never planned "
            f"on a type whose GPUs' memory is not declared (label {'it' if one else 'them'} "
            "with it, in GiB as NVML reports it)")


def gpu_note(spec: JobSpec, node_types: tuple[NodeType, ...]) -> str | None:
    """Why no plan holds a GPU job when no node type (of its families, where it names any)
    has the GPUs for one worker, or GPUs of the memory it asks (of the types declaring it:
    unlabelled_memory_note tells of the others), naming what the types have; else None
    (also with no types: no autoscaling config)."""
    if not (spec.gpus_per_worker and node_types):
        return None
    families = [f.upper() for f in spec.accelerator_types]
    gpu_types = [t for t in node_types if t.gpus]
    of_family = [t for t in gpu_types if not families or t.family in families]
    lead = "no node type the autoscaler can add has"
    if not gpu_types:
        return f"{lead} GPUs"
    if not of_family:
        listed = ", ".join(f"{t.name!r} ({t.family or 'no family'})" for t in gpu_types)
        return f"{lead} {'/'.join(families)} GPUs (its GPU types: {listed})"
    most = max(of_family, key=lambda t: t.gpus)
    need = math.ceil(spec.gpus_per_worker)
    named = '/'.join(families) + ' ' if families else ''
    if most.gpus < need:
        return (f"{lead} {need} {named}GPU(s) for one worker (gpus_per_worker): the most is "
                f"{most.gpus} ({most.name!r})")
    enough = [t for t in of_family if t.gpus >= need]
    if not spec.min_gpu_memory_gb or any(t.gpu_memory_gb is None for t in enough):
        return None
    largest = max(enough, key=lambda t: t.gpu_memory_gb)
    if largest.gpu_memory_gb >= spec.min_gpu_memory_gb:
        return None
    return (f"{lead} {named}GPUs with {spec.min_gpu_memory_gb:g} GiB (min_gpu_memory_gb): "
            f"the most is {largest.gpu_memory_gb:g} GiB ({largest.name!r})")


def cpu_note(spec: JobSpec, node_types: tuple[NodeType, ...]) -> str | None:
    """Why no plan holds a job when no node type that has the GPUs for one of its workers
    (of its families; any type for a CPU job) has the CPUs for one, naming the most; else
    None (gpu_note tells of a GPU job no type has the GPUs for)."""
    families = {f.upper() for f in spec.accelerator_types}
    need = math.ceil(spec.gpus_per_worker)
    holding = [t for t in node_types if not need or (
        t.gpus >= need and (not families or t.family in families))]
    if not (holding and spec.cpus_per_worker):
        return None
    most = max(holding, key=lambda t: t.cpus)
    if most.cpus + 1e-9 >= spec.cpus_per_worker:
        return None
    return (f"no node type the autoscaler can add has {spec.cpus_per_worker:g} CPUs for one "
            f"worker (cpus_per_worker): the most is {most.cpus:g} ({most.name!r})")


def accelerator_resource_note(spec: JobSpec, node_types: tuple[NodeType, ...]) -> str | None:
    """Why no plan holds `spec` when it names accelerator families and a type of one that
    would hold it has no accelerator_type resource (scale_up_plan passes it over: asked for
    GPUs alone, the autoscaler could add another family), naming each; else None."""
    families = {f.upper() for f in spec.accelerator_types}

    def with_resource(t: NodeType) -> NodeType:
        return dataclasses.replace(_uncapped(t),
                                   accelerator_resource=ACCELERATOR_RESOURCE_PREFIX + t.family)
    passed_over = [t for t in node_types if t.family in families and not t.accelerator_resource
                   and scale_up_plan(spec, (with_resource(t),))]
    if not passed_over:
        return None
    named = ", ".join(f"{t.name!r} ({t.family})" for t in passed_over)
    missing = sorted({ACCELERATOR_RESOURCE_PREFIX + t.family for t in passed_over})
    add = ", ".join('"%s": 1' % resource for resource in missing)
    one = len(passed_over) == 1
    return (f"node type{'' if one else 's'} {named} would hold it but "
            f"{'its' if one else 'their'} resources name no {', '.join(missing)}: a job "
            "naming accelerator_types is planned only on a type whose resources name the "
            f"family (add {add})")


def steering_note(spec: JobSpec, node_types: tuple[NodeType, ...]) -> str | None:
    """Why no plan holds a job when types would hold it together but not each declares a
    resource of its own to steer the autoscaler by (scale_up_parts plans a job across types
    only so, or a GPU job's across unsteered types where any mix of them Ray may add holds
    it: _any_mix_holds), naming them and what to add; else None."""
    if scale_up_parts(spec, node_types) is not None:
        return None
    steered = tuple(t if steering_resource(spec, t) else
                    dataclasses.replace(t, own_resource=t.name) for t in node_types)
    parts = scale_up_parts(spec, steered)
    if parts is None or len(parts) < 2:
        return None
    names = [t.name for t, _, _ in parts]
    lacking = [t.name for t, _, _ in parts
               if not steering_resource(spec, node_types[steered.index(t)])]
    named = ", ".join(repr(name) for name in lacking)
    gpu = bool(spec.gpus_per_worker)
    return (f"node types {', '.join(repr(name) for name in names)} would hold it together, but "
            f"a {'GPU' if gpu else 'CPU'} job is planned across node types only where each "
            "declares a resource of its own to steer the autoscaler to it ("
            + ("an accelerator_type no other type declares, or a custom one; " if gpu else "")
            + ("none of them does" if len(lacking) == len(names) else
               f"{named} {'does' if len(lacking) == 1 else 'do'} not")
            + f": add one to each one's resources, e.g. \"{lacking[0]}\": 1)"
            + (", or, steered by none, where any mix of the types its bundles fit that Ray's "
               "autoscaler may add holds it (types sharing one accelerator_type, say): a mix "
               "of these may hold too few workers" if gpu else ""))


def short_gpus_note(spec: JobSpec, node_types: tuple[NodeType, ...]) -> str | None:
    """Why no plan holds a job asking for GPU memory when a type would hold it but its
    bundles fit another type too whose GPUs lack that memory (_short_gpus_fitting:
    scale_up_plan passes it over), naming them and what to declare; else None."""
    if scale_up_parts(spec, node_types) is not None:
        return None
    for node_type in node_types:
        short = _short_gpus_fitting(spec, node_type, node_types)
        plan = scale_up_plan(spec, (_uncapped(node_type),)) if short else None
        if plan:
            bundle = resource_bundles(spec, node_type, 1)[0]
            asked = ", ".join(["GPUs"] + [k for k in bundle if k.startswith(
                ACCELERATOR_RESOURCE_PREFIX)])
            others = ", ".join(repr(t.name) for t in short)
            # (max_workers_note passes the type over too: the bounds are told here)
            bounds = _max_workers_short(node_type, plan[1])
            return (f"node type {node_type.name!r} would hold it"
                    + (f" with {plan[1]} node(s) in all (any up included), but {bounds}; and"
                       if bounds else ", but")
                    + f" its workers' bundles "
                    f"({asked}) fit node type{'s' if len(short) > 1 else ''} {others} too, "
                    f"whose GPUs have less memory than min_gpu_memory_gb "
                    f"{spec.min_gpu_memory_gb:g}, or declare none (Ray's autoscaler sees no "
                    "GPU memory): "
                    f"give {node_type.name!r} a resource of its own in its resources, e.g. "
                    f"\"{node_type.name}\": 1")
    return None


def host_memory_note(spec: JobSpec, node_types: tuple[NodeType, ...]) -> str | None:
    """Why no plan holds `spec` when no node type that would otherwise hold it has the RAM
    for one of its workers (min_host_memory_gb; its max_workers aside), naming the need, the
    largest such type's RAM and how far short it falls; else None."""
    if not spec.min_host_memory_gb:
        return None
    passed_over = [t for t in node_types if t.memory_gb is not None
                   and scale_up_plan(spec, (dataclasses.replace(_uncapped(t), memory_gb=None),))]
    if not passed_over:
        return None
    largest = max(passed_over, key=lambda t: t.memory_gb)
    if largest.memory_gb + 1e-9 >= spec.min_host_memory_gb:
        return None  # (one holds a worker: too few a node, which max_workers_note tells)
    return (f"each worker needs {spec.min_host_memory_gb:g} GiB of host RAM "
            f"(min_host_memory_gb), and the node type with the most, {largest.name!r}, has "
            f"{largest.memory_gb:.1f} GiB (its resources.memory): "
            f"{spec.min_host_memory_gb - largest.memory_gb:.1f} GiB short")


def adds_none_note(spec: JobSpec, node_types: tuple[NodeType, ...],
                   held_up: Callable[[NodeType], int]) -> str | None:
    """Why no plan holds `spec` when a type would hold it but the autoscaler would add none
    of it (scale_up_parts given `held_up` passes it over: the nodes up hold its workers'
    bundles as the autoscaler counts them, say a type stating no memory, its bundles asking
    for CPUs alone, or GPUs of the family up with less memory than the job asks), naming the
    bundle and the types that state no memory; else None."""
    plan = scale_up_parts(spec, node_types)
    if plan is None or scale_up_parts(spec, node_types, held_up) is not None:
        return None
    no_memory = [t.name for t in node_types if t.memory_gb is None
                 and _workers_per_node(spec, t)] if spec.min_host_memory_gb else []
    named = ", ".join(repr(name) for name in no_memory)
    return ("the autoscaler would add no node for it: its workers' bundles "
            f"({resource_bundles(spec, plan[0][0], 1)[0]}) fit the nodes up as it counts "
            "them" + (f"; node type{'s' if len(no_memory) > 1 else ''} {named} "
                      f"state{'' if len(no_memory) > 1 else 's'} no memory (resources.memory), "
                      "so the bundles ask for no RAM: state it, in bytes" if no_memory else "")
            + ("; it counts a GPU by its accelerator_type, not its memory "
               "(min_gpu_memory_gb)" if spec.gpus_per_worker and spec.min_gpu_memory_gb
               else ""))


def resource_bundles(spec: JobSpec, node_type: NodeType,
                     workers: int | None = None) -> list[dict[str, float]]:
    """One bundle per worker (`workers` of them, all the job's by default), in the resources
    the node type declares: what
    request_resources is asked for so the autoscaler adds nodes of that type (the worker's
    host RAM too, in bytes, where the type states its memory: asked for CPUs alone, the
    autoscaler may add a type too small in RAM); a GPU job's by its accelerator_type (its
    family), and any job's to the type alone by steering_resource where it has one."""
    bundle: dict[str, float] = {"CPU": spec.cpus_per_worker}
    if spec.min_host_memory_gb and node_type.memory_gb is not None:
        bundle["memory"] = math.ceil(spec.min_host_memory_gb * GIB)
    if spec.gpus_per_worker:
        bundle["GPU"] = math.ceil(spec.gpus_per_worker)
        if node_type.accelerator_resource:
            bundle[node_type.accelerator_resource] = ACCELERATOR_RESOURCE_SHARE
    steer = steering_resource(spec, node_type)
    if steer:
        bundle[steer] = ACCELERATOR_RESOURCE_SHARE
    return [dict(bundle) for _ in range(spec.num_workers if workers is None else workers)]
