"""cluster.yaml (AWS) and cluster.local.yaml (fake_multinode) pass Ray's own launcher
validation, declare what the scheduler reads, and keep the security promises they make."""
import re
from pathlib import Path

import pytest
import yaml

from orchestrator.config import ACCELERATOR_FAMILIES
from orchestrator.inventory import (LABEL_ACCELERATOR_MEMORY_GB, LABEL_ACCELERATOR_TYPE,
                                    accelerator_family, check_network_labels, declared_gpus)
from orchestrator.metric_catalogue import LABEL_NODE_TYPE

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "cluster.yaml"
LOCAL_YAML = REPO / "cluster.local.yaml"
NODE_ROLES = {"head", "train", "inference", "cpu"}
# AWS's published shapes (vCPUs, NVIDIA GPUs) of the instance types cluster.yaml uses: what a
# node type declares to Ray must be what the machine has.
INSTANCE_SHAPES = {"m6i.2xlarge": (8, 0), "m6i.4xlarge": (16, 0), "p4de.24xlarge": (96, 8),
                   "p5.48xlarge": (192, 8), "g4dn.12xlarge": (48, 4), "g6.12xlarge": (48, 4)}


def load(path):
    return yaml.safe_load(path.read_text())


def worker_types(config):
    return {name: t for name, t in config["available_node_types"].items()
            if name != config["head_node_type"]}


# -- Ray's own validation ----------------------------------------------------------------------

def test_cluster_yaml_passes_rays_launcher_validation_and_default_filling():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(load(CLUSTER_YAML))  # what `ray up` runs before talking to AWS
    validate_config(config)
    assert config["head_node_type"] in config["available_node_types"]
    for name, node_type in config["available_node_types"].items():
        assert node_type["min_workers"] <= node_type["max_workers"], name


def test_cluster_local_yaml_passes_the_validation_ray_start_applies():
    # `ray start --autoscaling-config` (the monitor) validates; it does not fill defaults,
    # which for this provider would need the example.yaml the PyPI wheel lacks.
    from ray.autoscaler._private.util import validate_config

    config = load(LOCAL_YAML)
    validate_config(config)
    assert config["provider"]["type"] == "fake_multinode"
    # The provider tags the head node with this type name; any other name breaks scaling.
    assert config["head_node_type"] == "ray.head.default"


# -- what the scheduler reads --------------------------------------------------------------------

@pytest.mark.parametrize("path", [CLUSTER_YAML, LOCAL_YAML], ids=lambda p: p.name)
def test_each_node_type_declares_what_the_scheduler_expects(path):
    for name, node_type in load(path)["available_node_types"].items():
        labels, resources = node_type.get("labels", {}), node_type["resources"]
        assert labels.get(LABEL_NODE_TYPE) in NODE_ROLES, name
        gpus = declared_gpus(labels)  # raises, naming the label, on a malformed value
        # Placement hands out only GPUs Ray schedules: Ray's count must be the declared one.
        assert len(gpus) == resources.get("GPU", 0), name
        check_network_labels(labels)
        accelerator_types = [k.split(":", 1)[1] for k in resources
                             if k.startswith("accelerator_type:")]
        if gpus:
            family = accelerator_family(gpus[0].name)
            assert family in ACCELERATOR_FAMILIES and float(labels[LABEL_ACCELERATOR_MEMORY_GB]) > 0
            # Ray's own accelerator_type:<family> resource (what Ray sets on real GPUs, and
            # what a task's accelerator_type= asks for) names the same family as the label.
            assert [accelerator_family(t) for t in accelerator_types] == [family], name
            assert resources[f"accelerator_type:{accelerator_types[0]}"] == 1, name
            assert labels[LABEL_NODE_TYPE] in {"train", "inference"}, name
        else:
            assert not accelerator_types and LABEL_ACCELERATOR_TYPE not in labels, name


def test_accelerator_resources_use_rays_accelerator_names():
    import ray.util.accelerators as accelerators

    ray_names = {v for k, v in vars(accelerators).items() if k.isupper() and isinstance(v, str)}
    for path in (CLUSTER_YAML, LOCAL_YAML):
        for name, node_type in load(path)["available_node_types"].items():
            for key in node_type["resources"]:
                if key.startswith("accelerator_type:"):
                    assert key.split(":", 1)[1] in ray_names, (path.name, name, key)


def test_cloud_resources_match_the_instance_types():
    for name, node_type in load(CLUSTER_YAML)["available_node_types"].items():
        cpus, gpus = INSTANCE_SHAPES[node_type["node_config"]["InstanceType"]]
        resources = node_type["resources"]
        assert resources.get("GPU", 0) == gpus, name
        # The head keeps CPU 0 on purpose (it schedules, it does not train).
        assert resources["CPU"] == (0 if name == "head" else cpus), name


# What NVML names each instance type's GPUs (nvidia-smi on p4de, p5, g4dn, g6).
INSTANCE_GPU_NAMES = {"p4de.24xlarge": "NVIDIA A100-SXM4-80GB",
                      "p5.48xlarge": "NVIDIA H100 80GB HBM3", "g4dn.12xlarge": "Tesla T4",
                      "g6.12xlarge": "NVIDIA L4"}


def test_accelerator_labels_name_what_nvml_measures_on_the_instance():
    # Measured GPUs replace declared ones: a label of another family is ignored on the node,
    # while the autoscaler still adds the type for jobs of the labelled family.
    from orchestrator.inventory import GpuInfo
    from orchestrator.probes import declared_family_problem

    for name, node_type in load(CLUSTER_YAML)["available_node_types"].items():
        gpu_name = INSTANCE_GPU_NAMES.get(node_type["node_config"]["InstanceType"])
        if gpu_name is None:
            assert LABEL_ACCELERATOR_TYPE not in node_type["labels"], name
            continue
        measured = tuple(GpuInfo(i, gpu_name, 80 << 30, 80 << 30)
                         for i in range(node_type["resources"]["GPU"]))
        assert declared_family_problem(measured, node_type["labels"]) is None, name


def test_local_cluster_has_the_cloud_node_types():
    cloud, local = load(CLUSTER_YAML), load(LOCAL_YAML)
    assert set(worker_types(cloud)) == set(worker_types(local))
    for name, node_type in worker_types(cloud).items():
        twin = local["available_node_types"][name]
        assert twin["labels"] == node_type["labels"], name
        for key in ("GPU", *[k for k in node_type["resources"] if k.startswith("accelerator")]):
            assert twin["resources"].get(key) == node_type["resources"].get(key), (name, key)
    assert local["available_node_types"]["ray.head.default"]["labels"] == \
        cloud["available_node_types"]["head"]["labels"]


def test_training_node_types_use_high_bandwidth_networking():
    for name, node_type in load(CLUSTER_YAML)["available_node_types"].items():
        if node_type["labels"][LABEL_NODE_TYPE] != "train":
            continue
        node_config = node_type["node_config"]
        assert node_config["Placement"]["GroupName"], name  # cluster placement group
        assert node_config["LaunchTemplate"]["LaunchTemplateName"], name  # EFA interfaces
        assert node_type["labels"]["orchestrator.io/network-group"], name


# -- security ------------------------------------------------------------------------------------

def start_commands(config):
    return config["head_start_ray_commands"] + config["worker_start_ray_commands"]


def test_only_ssh_is_open_to_the_outside():
    from ray.autoscaler._private.aws.config import _create_default_inbound_rules

    config = load(CLUSTER_YAML)
    extra = config["provider"].get("security_group", {}).get("IpPermissions", [])
    rules = _create_default_inbound_rules({"sg-cluster"}, extra)  # what Ray applies
    public = [r for r in rules if r.get("IpRanges") or r.get("Ipv6Ranges")]
    assert [(r["FromPort"], r["ToPort"]) for r in public] == [(22, 22)]
    assert all(not r.get("IpRanges") for r in rules if r["FromPort"] != 22)
    assert not any("SecurityGroupIds" in t["node_config"]
                   for t in config["available_node_types"].values())  # no group of ours
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head


def test_token_auth_on_every_node_and_no_secret_in_the_files():
    config = load(CLUSTER_YAML)
    starts = [c for c in start_commands(config) if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token ray start" in c for c in starts)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for path in (CLUSTER_YAML, LOCAL_YAML):
        text = path.read_text()
        assert "RAY_AUTH_TOKEN=" not in text and not re.search(r"AKIA[0-9A-Z]{16}", text)
        assert not re.search(r"(?i)aws_secret_access_key|password\s*:", text), path.name


def test_head_brings_up_the_control_plane_that_starts_agents_on_joining_nodes():
    from ray_layer.cluster import ensure_control_plane  # noqa: F401 - what the command imports

    head = load(CLUSTER_YAML)["head_start_ray_commands"]
    assert any("ensure_control_plane()" in c for c in head[head.index(next(
        c for c in head if "ray start --head" in c)):])


def test_the_head_can_launch_workers_and_nodes_get_only_what_git_tracks():
    # head_setup_commands replaces Ray's AWS default, which installs boto3: without it the
    # head's autoscaler could not import its AWS provider, and no worker ever started. The
    # head runs Ray from ~/venv, so boto3 must go there.
    from ray.autoscaler._private.util import prepare_config

    config = prepare_config(load(CLUSTER_YAML))
    installs = " ".join(config["head_setup_commands"])
    assert "~/venv/bin/pip install" in installs and "boto3" in installs
    # Ray copies the file mounts whole unless filtered: a local .venv or runs/ went to every
    # node.
    assert ".gitignore" in config["rsync_filter"]
