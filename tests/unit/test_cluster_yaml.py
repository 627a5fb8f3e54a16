"""cluster.yaml passes Ray's own launcher validation and declares what the scheduler reads."""
from pathlib import Path

import yaml

from orchestrator.inventory import declared_gpus

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "cluster.yaml"


def test_cluster_yaml_passes_rays_launcher_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load(CLUSTER_YAML.read_text()))  # what `ray up` runs
    validate_config(config)
    assert config["head_node_type"] in config["available_node_types"]


def test_declared_accelerators_match_each_node_types_gpu_resources():
    node_types = yaml.safe_load(CLUSTER_YAML.read_text())["available_node_types"]
    for name, node_type in node_types.items():
        gpus = declared_gpus(node_type.get("labels", {}))
        assert len(gpus) == node_type["resources"].get("GPU", 0), name
