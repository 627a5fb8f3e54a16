"""Replica resources from the cluster's accelerators: inference GPUs first, else CPU."""
import pytest

from orchestrator.inventory import (LABEL_ACCELERATOR_TYPE, GpuInfo, NodeReport,
                                    declared_gpus)
from orchestrator.serving.resources import recommend_replica_resources, report_from_ray_node

GIB = 1024 ** 3


def node(node_id, gpus=(), ray_gpus=None, labels=None):
    return NodeReport(node_id, node_id, 8, len(gpus) if ray_gpus is None else ray_gpus, 8, 0.0,
                      64 * GIB, 64 * GIB, tuple(gpus), labels or {})


def measured(name, count):
    return [GpuInfo(i, name, 16 * GIB, 16 * GIB) for i in range(count)]


def declared(name, count):
    labels = {LABEL_ACCELERATOR_TYPE: name, "orchestrator.io/accelerator-count": str(count),
              "orchestrator.io/accelerator-memory-gb": "16"}
    return declared_gpus(labels), labels


def recommend(nodes, healthy=None, **kwargs):
    healthy = {n.node_id for n in nodes} if healthy is None else healthy
    return recommend_replica_resources(nodes, healthy, **kwargs)


def test_declared_inference_gpus_are_selected_by_their_node_label():
    gpus, labels = declared("T4", 2)
    result = recommend([node("cpu"), node("t4", gpus, labels=labels),
                        node("a100", measured("NVIDIA A100-SXM4-80GB", 8))], cpus=0.5, gpus=1)
    assert result.accelerator == "T4" and result.nodes == ("t4",)
    assert result.ray_actor_options == {"num_cpus": 0.5, "num_gpus": 1,
                                        "label_selector": {LABEL_ACCELERATOR_TYPE: "T4"}}


def test_measured_gpus_use_rays_accelerator_type():
    result = recommend([node("l4", measured("NVIDIA L4", 4))])
    assert result.ray_actor_options == {"num_cpus": 1.0, "num_gpus": 1.0,
                                        "accelerator_type": "L4"}


def test_the_family_with_most_gpus_wins_then_the_faster():
    nodes = [node("t4", measured("Tesla T4", 4)), node("l4a", measured("NVIDIA L4", 2)),
             node("l4b", measured("NVIDIA L4", 4))]
    assert recommend(nodes).accelerator == "L4"  # 6 L4 against 4 T4
    nodes = [node("t4", measured("Tesla T4", 2)), node("l4", measured("NVIDIA L4", 2))]
    assert recommend(nodes).accelerator == "L4"  # a tie: L4 is faster


def test_training_gpus_only_or_none_falls_back_to_cpu():
    result = recommend([node("a100", measured("NVIDIA A100-SXM4-80GB", 8)), node("cpu")])
    assert result.accelerator == "CPU" and result.ray_actor_options["num_cpus"] == 1.0
    assert "A100" in result.reason and "CPU" in result.reason
    assert recommend([node("cpu")]).accelerator == "CPU"


def test_unhealthy_nodes_and_gpus_ray_cannot_schedule_do_not_count():
    t4 = node("t4", measured("Tesla T4", 2))
    assert recommend([t4], healthy=set()).accelerator == "CPU"
    declared_only, labels = declared("T4", 2)
    # Declared by label but Ray was started without --num-gpus: nothing to hand out.
    assert recommend([node("t4", declared_only, ray_gpus=0, labels=labels)]).accelerator == "CPU"


def test_a_named_family_is_used_even_for_training_gpus_and_must_exist():
    a100 = node("a100", measured("NVIDIA A100-SXM4-80GB", 8))
    assert recommend([a100], accelerator="A100").ray_actor_options["accelerator_type"] == "A100"
    with pytest.raises(ValueError, match="accelerator: no healthy node has 'H100'"):
        recommend([a100], accelerator="H100")
    assert recommend([a100], accelerator="cpu").accelerator == "CPU"


def test_several_declared_names_of_one_family_are_all_allowed():
    a, la = declared("T4", 1)
    b, lb = declared("T4-16GB", 1)
    result = recommend([node("x", a, labels=la), node("y", b, labels=lb)])
    assert result.ray_actor_options["label_selector"] == {
        LABEL_ACCELERATOR_TYPE: "in(T4,T4-16GB)"}


def test_rays_node_table_stands_in_when_there_is_no_scheduler():
    _, labels = declared("T4", 2)
    t4 = report_from_ray_node({"NodeID": "t4", "Labels": labels,
                               "Resources": {"CPU": 2.0, "GPU": 2.0}})
    l4 = report_from_ray_node({"NodeID": "l4", "Labels": {},
                               "Resources": {"CPU": 8.0, "GPU": 4.0, "accelerator_type:L4": 1.0}})
    cpu = report_from_ray_node({"NodeID": "cpu", "Resources": {"CPU": 4.0}})
    assert [g.source for g in t4.gpus] == ["declared"] * 2
    assert [g.name for g in l4.gpus] == ["L4"] * 4 and l4.gpus[0].source == "nvml"
    assert cpu.gpus == () and cpu.ray_cpus == 4.0
    assert recommend([t4, l4, cpu]).accelerator == "L4"
    # A declared type without a count label: as many as Ray was given, not one.
    del labels["orchestrator.io/accelerator-count"]
    t4 = report_from_ray_node({"NodeID": "t4", "Labels": labels,
                               "Resources": {"CPU": 2.0, "GPU": 2.0}})
    assert len(t4.gpus) == 2


def test_a_node_of_several_families_promises_none_of_them():
    # Ray labels a node by its first GPU and hands a replica any of its GPUs: pinned to the T4
    # of an A100 + T4 node, the replica never started while four A100s elsewhere sat idle.
    mixed = node("mixed", measured("NVIDIA A100-SXM4-80GB", 1) + measured("Tesla T4", 1))
    a100s = node("a100", measured("NVIDIA A100-SXM4-80GB", 4))
    assert recommend([mixed, a100s]).accelerator == "CPU"  # no inference family promised
    named = recommend([mixed, a100s], accelerator="A100")
    assert named.nodes == ("a100",) and named.ray_actor_options["accelerator_type"] == "A100"
    with pytest.raises(ValueError, match="no healthy node has 'T4'"):
        recommend([mixed, a100s], accelerator="T4")


def sized(node_id, gpus, cpus, labels=None):
    return NodeReport(node_id, node_id, cpus, len(gpus), cpus, 0.0, 64 * GIB, 64 * GIB,
                      tuple(gpus), labels or {})


def test_a_family_counts_only_on_nodes_that_can_hold_a_whole_replica():
    # Three 1xT4 nodes outnumber one 2xL4 node, but a replica asking for 2 GPUs (or more
    # CPUs than a T4 node has) fits none of them: it was pinned to T4 and stayed pending.
    nodes = [sized(f"t4-{i}", measured("Tesla T4", 1), cpus=4) for i in range(3)]
    nodes.append(sized("l4", measured("NVIDIA L4", 2), cpus=16))
    assert recommend(nodes).accelerator == "T4"  # (one GPU: the most GPUs win)
    for wanted in ({"gpus": 2}, {"cpus": 8}):
        result = recommend(nodes, **wanted)
        assert result.accelerator == "L4" and result.nodes == ("l4",), wanted
    with pytest.raises(ValueError, match="cpus_per_replica=8.*T4"):
        recommend(nodes, accelerator="T4", cpus=8)
    only_t4 = nodes[:3]
    result = recommend(only_t4, gpus=2)
    assert result.accelerator == "CPU" and "2 GPU" in result.reason


def test_cpu_replicas_stay_off_training_nodes():
    # A CPU replica could land on an A100/H100 training node (CPUs free there) and keep the
    # autoscaler from removing it. cluster.yaml labels those node types "train".
    import yaml
    from pathlib import Path

    from orchestrator.metric_catalogue import LABEL_NODE_TYPE
    from orchestrator.serving.resources import TRAINING_NODE_TYPES

    for cpu in (recommend([node("cpu")]), recommend([node("t4", measured("Tesla T4", 1))],
                                                    accelerator="cpu")):
        assert cpu.ray_actor_options == {"num_cpus": 1.0,
                                         "label_selector": {LABEL_NODE_TYPE: "!train"}}
    from ray._private.label_utils import validate_label_selector
    assert validate_label_selector(cpu.ray_actor_options["label_selector"]) is None
    repo = Path(__file__).resolve().parents[2]
    for name in ("cluster.yaml", "cluster.local.yaml"):
        types = yaml.safe_load((repo / name).read_text())["available_node_types"]
        for type_name, node_type in types.items():
            trains = any(str(key) in ("accelerator_type:A100", "accelerator_type:H100")
                         for key in node_type.get("resources", {}))
            role = node_type.get("labels", {}).get(LABEL_NODE_TYPE)
            assert (role in TRAINING_NODE_TYPES) == trains, (name, type_name)


def test_declared_gpus_ray_also_lists_by_accelerator_type_are_pinned_by_it():
    # cluster.yaml's nodes declare their GPUs by label and list accelerator_type:<family>:
    # pinned by label_selector, which Ray 2.60's v1 autoscaler ignores (it could launch
    # another family's node for the replica).
    gpus, labels = declared("T4", 4)
    typed = {"t4": {"T4"}}
    result = recommend([node("t4", gpus, labels=labels)], accelerator_types=typed)
    assert result.ray_actor_options == {"num_cpus": 1.0, "num_gpus": 1.0,
                                        "accelerator_type": "T4"}
    # Some nodes of the family list it, some only declare it: the option reaches the former.
    other_gpus, other_labels = declared("T4", 4)
    both = [node("t4", gpus, labels=labels), node("t4-bare", other_gpus, labels=other_labels)]
    result = recommend(both, accelerator_types={"t4": {"T4"}, "t4-bare": set()})
    assert result.ray_actor_options["accelerator_type"] == "T4" and result.nodes == ("t4",)
    # Ray lists none: the label, as before.
    result = recommend(both, accelerator_types={"t4": set(), "t4-bare": set()})
    assert result.ray_actor_options["label_selector"] == {LABEL_ACCELERATOR_TYPE: "T4"}
