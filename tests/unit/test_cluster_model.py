"""The --cluster SPEC with servers of one GPU type in groups of different sizes
("v100:8x24,v100:4x48,a100:8x12;rack=16"): totals, node names, racks, and that the simulator
counts every GPU of the type. Pure logic, no Ray."""
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from orchestrator import cluster_model
from orchestrator.cluster_model import ServerGroup, build_state, parse_cluster_spec
from orchestrator.simulator import DEFAULT_CLUSTER, FINISHED, NEVER_FITS, simulate
from orchestrator.traces import TraceJob, prepare

MIXED = "v100:8x24,v100:4x48,a100:8x12;rack=16"


@pytest.fixture(scope="module")
def nodes():
    """node id -> (GPUs, rack code) of the built MIXED cluster."""
    table = build_state(parse_cluster_spec(MIXED)).table
    return {node: (int(table.gpus[row]), int(table.group[row]))
            for node, row in table.index.items()}


def test_one_type_in_two_groups_keeps_both_and_sums_per_type():
    spec = parse_cluster_spec(MIXED)
    assert spec.groups == (ServerGroup("v100", 8, 24), ServerGroup("v100", 4, 48),
                           ServerGroup("a100", 8, 12))
    assert spec.gpus_by_type() == {"v100": 8 * 24 + 4 * 48, "a100": 96}
    assert spec.total_gpus == 480 and spec.servers == 84


def test_node_ids_are_unique_and_numbered_per_type_across_groups(nodes):
    assert len(nodes) == 84  # a clash would overwrite a row and lose servers
    expected = {**{f"v100-{i:04d}": 8 for i in range(24)},
                **{f"v100-{i:04d}": 4 for i in range(24, 72)},
                **{f"a100-{i:04d}": 8 for i in range(12)}}
    assert {node: gpus for node, (gpus, _) in nodes.items()} == expected


def test_a_rack_holds_servers_of_one_group(nodes):
    racks = defaultdict(list)
    for node, (gpus, rack) in nodes.items():
        racks[rack].append((node.rsplit("-", 1)[0], gpus))
    shapes = Counter((*set(members), len(members)) for members in racks.values()
                     if len(set(members)) == 1)
    assert len(racks) == 6 and sum(shapes.values()) == 6  # no rack mixes groups
    assert shapes == Counter({(("v100", 8), 16): 1, (("v100", 8), 8): 1,
                              (("v100", 4), 16): 3, (("a100", 8), 12): 1})


def test_the_simulator_counts_every_gpu_of_a_type_split_over_groups():
    # 8 + 2 x 4 = 16 V100: a 16-GPU V100 job fits (spread), a 17-GPU one never does.
    jobs = prepare([TraceJob(0, 0.0, 100.0, 16, "", ("V100",)),
                    TraceJob(1, 0.0, 100.0, 17, "", ("V100",)),
                    TraceJob(2, 0.0, 100.0, 4, "", ("V100",))])
    result = simulate(jobs, "v100:8x1,v100:4x2,p100:8x1;rack=4", "hetero-las", check=True)
    assert [j.status for j in result.jobs] == [FINISHED, NEVER_FITS, FINISHED]
    assert result.jobs[0].n_nodes == 3 and result.jobs[0].gpu_types == "v100"


def test_simulator_docs_describe_the_spec_grammar_with_the_codes_defaults():
    # docs/simulator.md had no word on the SPEC's options (rack, rack_gbps, inter_gbps) or
    # its GPU types, which only `--help` and this module's docstring gave.
    doc = (Path(__file__).resolve().parents[2] / "docs" / "simulator.md").read_text()
    section = " ".join(doc.split("\n## Cluster SPEC\n", 1)[1].split("\n## ", 1)[0].split())
    assert sorted(re.findall(r"`([a-z0-9]+)`", section.split(" is one of ", 1)[1])[:7]) == \
        sorted(cluster_model.GPU_TYPES)
    for key, default in (("rack", cluster_model.DEFAULT_RACK),
                         ("rack_gbps", cluster_model.DEFAULT_RACK_GBPS),
                         ("inter_gbps", cluster_model.DEFAULT_INTER_GBPS)):
        assert f"`{key}`" in section and f"(default {default:g}" in section, key
    assert f"`{DEFAULT_CLUSTER}`" in section
