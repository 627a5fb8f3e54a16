"""orchestrator/autoscaling.py and the core's use of it: a job only nodes the autoscaler can
add would hold waits for them (and they are asked for) instead of being rejected."""
import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from orchestrator.autoscaling import (node_types_from_config, plan_bundles, resource_bundles,
                                      scale_up_parts, scale_up_plan, steering_resource)
from orchestrator.config import JobSpec
from orchestrator.placement import Placement, Queued, Rejection
from orchestrator.scheduler_core import SchedulerCore
from tests.unit.test_scheduler_core import T0, core_with, cpu_node, gpu_node

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def aws_types():
    return node_types_from_config(yaml.safe_load((ROOT / "cluster.yaml").read_text()))


def test_the_shipped_cluster_configs_node_types_are_read(aws_types):
    by_name = {t.name: t for t in aws_types}
    assert "head" not in by_name  # jobs never go to the head
    a100 = by_name["train_a100"]
    assert (a100.cpus, a100.gpus, a100.family, a100.accelerator_resource, a100.gpu_memory_gb,
            a100.network_gbps, a100.max_workers) == (96, 8, "A100", "accelerator_type:A100",
                                                     80.0, 50.0, 4)
    assert by_name["infer_t4"].family == "T4" and by_name["cpu_worker"].gpus == 0
    local = node_types_from_config(yaml.safe_load((ROOT / "cluster.local.yaml").read_text()))
    assert {t.family for t in local} >= {"A100", "T4"}


def test_a_plan_takes_the_fewest_nodes_of_a_type_that_holds_every_worker(aws_types):
    sixteen = JobSpec("j", num_workers=16, gpus_per_worker=1, accelerator_types=("A100",))
    node_type, nodes = scale_up_plan(sixteen, aws_types)
    assert (node_type.name, nodes) == ("train_a100", 2)
    assert resource_bundles(sixteen, node_type)[0] == {"CPU": 1.0, "GPU": 1,
                                                       "accelerator_type:A100": 0.001}
    # Any family: 4 GPUs on one T4 or L4 node (4 each) beat half an 8-GPU node.
    four = JobSpec("j", num_workers=4, gpus_per_worker=1)
    assert scale_up_plan(four, aws_types)[0].gpus == 4
    assert scale_up_plan(JobSpec("j", num_workers=40, gpus_per_worker=1,
                                 accelerator_types=("A100",)), aws_types) is None  # 4 x 8
    assert scale_up_plan(JobSpec("j", num_workers=1, gpus_per_worker=1,
                                 min_gpu_memory_gb=40, accelerator_types=("T4",)),
                         aws_types) is None  # a T4 has 15 GiB
    assert scale_up_plan(JobSpec("j", num_workers=16, gpus_per_worker=1, min_bandwidth_gbps=100,
                                 accelerator_types=("A100",)), aws_types) is None  # 50 GB/s
    assert scale_up_plan(JobSpec("j", num_workers=16, gpus_per_worker=1, min_bandwidth_gbps=100),
                         aws_types)[0].name == "train_h100"  # 400 GB/s between its nodes


def test_a_config_that_cannot_be_read_names_the_node_type():
    with pytest.raises(ValueError, match="no available_node_types"):
        node_types_from_config({})
    with pytest.raises(ValueError, match="node type 'w': .*'many'"):
        node_types_from_config({"available_node_types": {"w": {"resources": {"CPU": "many"}}}})


def test_a_job_only_new_nodes_can_hold_waits_asks_for_them_and_is_placed_when_they_join(
        aws_types):
    """A fresh `ray up cluster.yaml` (head and one CPU node): the A100 job was rejected at
    once and nothing asked the autoscaler for an A100 node."""
    core = core_with(cpu_node("cpu", cpus=16))
    spec = JobSpec("train", num_workers=8, gpus_per_worker=1, accelerator_types=("A100",))
    assert isinstance(core.submit(spec, "d", T0).decision, Rejection)  # no node types known
    core = core_with(cpu_node("cpu", cpus=16))
    core.node_types = aws_types
    waiting = core.submit(spec, "d", T0).decision
    assert isinstance(waiting, Queued), waiting
    assert "waiting for the autoscaler to add 1 x train_a100 node(s)" in waiting.reason
    a100 = next(t for t in aws_types if t.name == "train_a100")
    assert core.scale_up_requests(T0 + 1) == resource_bundles(spec, a100)  # 8 bundles
    # A CPU job behind it is not held up by it.
    assert isinstance(core.submit(JobSpec("cpu-job", num_workers=2), "d2", T0 + 2).decision,
                      Placement)
    # No node type can hold it: rejected at once, as before.
    never = JobSpec("huge", num_workers=64, gpus_per_worker=1, accelerator_types=("A100",))
    assert isinstance(core.submit(never, "d3", T0 + 3).decision, Rejection)
    # The A100 node joins and reports: placed at the next pass, and nothing is asked for.
    core.ray_nodes({"cpu", "a100"}, set(), T0 + 300)
    core.report(gpu_node("a100", gpus=8, family="A100"), T0 + 300)  # (a queue pass)
    placed = core.poll("train", "d", T0 + 302).decision
    assert isinstance(placed, Placement) and placed.worker_nodes == ("a100",) * 8, placed
    assert core.scale_up_requests(T0 + 303) == []


def test_a_job_that_lost_its_node_waits_for_a_replacement_the_autoscaler_can_add(aws_types):
    core = core_with(gpu_node("a100", gpus=8, family="A100"), cpu_node("cpu", cpus=16))
    core.node_types = aws_types
    spec = JobSpec("train", num_workers=8, gpus_per_worker=1, accelerator_types=("A100",))
    assert isinstance(core.submit(spec, "d", T0).decision, Placement)
    core.ray_nodes({"cpu"}, {"a100"}, T0 + 500)
    waiting = core.replace(spec, "d", ["a100"], T0 + 501).decision
    assert isinstance(waiting, Queued) and "autoscaler" in waiting.reason, waiting
    assert len(core.scale_up_requests(T0 + 502)) == 8


def test_a_cpu_job_plans_cpu_nodes_and_families_are_matched_whatever_their_case(aws_types):
    cpu_job = JobSpec("etl", num_workers=100, cpus_per_worker=1)
    assert scale_up_plan(cpu_job, aws_types)[0].name == "cpu_worker"  # not an H100 node
    lower = JobSpec("j", num_workers=8, gpus_per_worker=1, accelerator_types=("a100",))
    assert scale_up_plan(lower, aws_types)[0].name == "train_a100"
    # A GPU type that does not declare its accelerator_type resource cannot be asked for by
    # family (the autoscaler could meet {CPU, GPU} with another type): not planned for one.
    bare = node_types_from_config({"available_node_types": {"gpu": {
        "resources": {"CPU": 8, "GPU": 8}, "labels": {"orchestrator.io/accelerator-type": "A100"},
        "max_workers": 2}}})
    assert bare[0].family == "A100" and scale_up_plan(lower, bare) is None
    assert scale_up_plan(JobSpec("any", num_workers=8, gpus_per_worker=1), bare) is not None


def test_a_node_that_has_not_reported_yet_leaves_the_last_request_standing(aws_types):
    """A node joining (any node) withdrew the request until its agent reported; one that
    never reported kept anything from being asked."""
    core = core_with(cpu_node("cpu", cpus=16))
    core.node_types = aws_types
    spec = JobSpec("train", num_workers=8, gpus_per_worker=1, accelerator_types=("A100",))
    core.submit(spec, "d", T0)
    assert len(core.scale_up_requests(T0 + 1)) == 8
    asked = core.scale_up_requests(T0 + 1)
    core.ray_nodes({"cpu", "new"}, set(), T0 + 2)  # joined, its agent not reporting yet
    assert core.scale_up_requests(T0 + 3) == asked  # not planned again: the ask stands
    core.report(cpu_node("new", cpus=16), T0 + 4)
    assert len(core.scale_up_requests(T0 + 5)) == 8  # still only an A100 node would hold it


def test_the_shipped_labels_promise_no_more_gpu_memory_than_nvml_reports(aws_types):
    # Labelled with the datasheets' GB (T4 16, L4 24, H100 80), a job asking 16 GB had the
    # autoscaler add a T4 node that could never hold it (NVML: 15360 MiB).
    nvml_gib = {"A100": 81920 / 1024, "H100": 81559 / 1024, "T4": 15360 / 1024,
                "L4": 23034 / 1024}
    gpu_types = [t for t in aws_types if t.gpus]
    assert {t.family for t in gpu_types} == set(nvml_gib)
    assert all(t.gpu_memory_gb <= nvml_gib[t.family] for t in gpu_types), gpu_types


def test_nodes_that_join_but_do_not_hold_the_job_end_its_wait(aws_types):
    """An H100 labelled 80 GB (a hand-written cluster config) reports 79.6 GiB: a job asking
    80 GB waited, and kept asking for (and keeping up) H100 nodes, for ever."""
    from orchestrator.inventory import GIB, GpuInfo, NodeReport

    core = core_with(cpu_node("cpu", cpus=16), scale_up_timeout_s=600.0)
    core.node_types = [dataclasses.replace(t, gpu_memory_gb=80.0) if t.family == "H100" else t
                       for t in aws_types]
    spec = JobSpec("big", num_workers=8, gpus_per_worker=1, min_gpu_memory_gb=80,
                   accelerator_types=("H100",))
    assert isinstance(core.submit(spec, "d", T0).decision, Queued)
    h100 = NodeReport(node_id="h100", hostname="h100", ray_cpus=192, ray_gpus=8, cpu_count=192,
                      load_avg_1m=0.0, ram_total_bytes=64 * GIB, ram_available_bytes=64 * GIB,
                      gpus=tuple(GpuInfo(i, "NVIDIA H100 80GB HBM3", 81559 << 20, 81000 << 20)
                                 for i in range(8)))
    core.ray_nodes({"cpu", "h100"}, set(), T0 + 300)
    core.report(h100, T0 + 300)
    core.tick(T0 + 301)
    # The autoscaler counts the node up as holding the 8 bundles (GPUs by their
    # accelerator_type, not their memory): it adds no more, so the job is refused once the
    # node has reported (since 2026-12-07 (fourth session); it waited scale_up_timeout_s).
    gone = core.poll("big", "d", T0 + 302).decision
    assert isinstance(gone, Rejection), gone
    assert "0 of 8 have it (most free: 79.1 GiB)" in gone.message, gone.message
    assert core.scale_up_requests(T0 + 303) == []


def test_a_node_that_never_reports_does_not_hold_the_request_for_ever(aws_types):
    core = core_with(cpu_node("cpu", cpus=16), suspect_after_s=30.0)
    core.node_types = aws_types
    spec = JobSpec("train", num_workers=8, gpus_per_worker=1, accelerator_types=("A100",))
    core.submit(spec, "d", T0)
    core.ray_nodes({"cpu", "mute"}, set(), T0 + 10)  # joins, its agent never reports
    assert len(core.scale_up_requests(T0 + 11)) == 8  # just joined: the submit's ask stands
    core.cancel("train", "d", T0 + 12)
    assert core.scale_up_requests(T0 + 10 + 60) == []  # later: nothing held for it


def test_nodes_asked_for_a_waiting_job_stay_asked_for_until_it_leaves_the_queue(aws_types):
    """The request was withdrawn once the job would fit an idle cluster, though it still
    waited for a running job: the node that joined for it sat idle, the autoscaler removed it,
    the job no longer fitted and the request went out again (a loop paying for nodes that run
    nothing). And it asked for 2 A100 nodes where one beside the A100 node up does."""
    core = core_with(gpu_node("a1", gpus=8, family="A100", cpus=96), cpu_node("cpu", cpus=16))
    core.node_types = aws_types
    x = JobSpec("x", num_workers=8, gpus_per_worker=1, accelerator_types=("A100",))
    assert isinstance(core.submit(x, "dx", T0).decision, Placement)
    y = JobSpec("y", num_workers=16, gpus_per_worker=1, accelerator_types=("A100",))
    waiting = core.submit(y, "dy", T0 + 1).decision
    assert "waiting for the autoscaler to add 1 x train_a100 node(s)" in waiting.reason, waiting
    asked = core.scale_up_requests(T0 + 2)
    assert len(asked) == 16  # (a shape the whole cluster, a1 included, should hold)
    core.ray_nodes({"a1", "cpu", "a2"}, set(), T0 + 300)
    core.report(gpu_node("a2", gpus=8, family="A100", cpus=96), T0 + 300)
    core.tick(T0 + 301)
    assert isinstance(core.poll("y", "dy", T0 + 302).decision, Queued)  # x still holds a1
    assert core.scale_up_requests(T0 + 303) == asked  # a2 is not left for the autoscaler
    restarted = SchedulerCore(core.settings)  # a scheduler restart keeps asking
    restarted.restore(json.loads(json.dumps(core.to_dict())))
    restarted.node_types = aws_types
    restarted.ray_nodes({"a1", "cpu", "a2"}, set(), T0 + 304)
    for node in (gpu_node("a1", gpus=8, family="A100", cpus=96), cpu_node("cpu", cpus=16),
                 gpu_node("a2", gpus=8, family="A100", cpus=96)):
        restarted.report(node, T0 + 304)
    assert restarted.scale_up_requests(T0 + 305) == asked
    core.release("x", "dx", T0 + 400)
    placed = core.poll("y", "dy", T0 + 401).decision
    assert isinstance(placed, Placement) and "a2" in placed.worker_nodes, placed
    assert core.scale_up_requests(T0 + 402) == []
    # A job that leaves the queue unplaced (cancelled) takes its request with it.
    z = JobSpec("z", num_workers=8, gpus_per_worker=1, accelerator_types=("H100",))
    assert isinstance(core.submit(z, "dz", T0 + 500).decision, Queued)
    assert len(core.scale_up_requests(T0 + 501)) == 8
    core.cancel("z", "dz", T0 + 502)
    assert core.scale_up_requests(T0 + 503) == []


def test_a_job_submitted_again_under_its_name_asks_for_its_own_nodes(aws_types):
    """Cancelled and submitted again with another shape before a maintenance pass: the first
    job's A100 request stood (the first ask was kept by name), the H100 node the new job
    needs was never asked for, and it was rejected after scale_up_timeout_s."""
    core = core_with(cpu_node("cpu", cpus=16))
    core.node_types = aws_types
    core.submit(JobSpec("j", num_workers=8, gpus_per_worker=1, accelerator_types=("A100",)),
                "d", T0)
    core.cancel("j", "d", T0 + 1)
    core.submit(JobSpec("j", num_workers=1, gpus_per_worker=1, accelerator_types=("H100",)),
                "d", T0 + 2)
    asked = core.scale_up_requests(T0 + 3)
    h100 = next(t for t in aws_types if t.family == "H100")
    assert asked == resource_bundles(core.queue.waiting["j"].spec, h100)


def test_one_unreadable_saved_node_request_costs_that_job_alone(aws_types):
    # A bad bundle sent to request_resources failed every job's request on every pass, and
    # one unreadable entry dropped every job's.
    core = core_with(cpu_node("cpu", cpus=16))
    core.node_types = aws_types
    for name in ("a", "b"):
        core.submit(JobSpec(name, num_workers=8, gpus_per_worker=1, accelerator_types=("A100",)),
                    "d", T0)
    asked = core.scale_up_requests(T0 + 1)
    saved = json.loads(json.dumps(core.to_dict()))
    saved["nodes_asked"]["a"]["bundles"][0]["GPU"] = None
    again = SchedulerCore(core.settings)
    problems = again.restore(saved)
    assert problems == [f"cannot restore the nodes asked for 'a', skipping them: its bundles "
                        f"are {saved['nodes_asked']['a']['bundles']!r:.60}, not a list of "
                        "resource names to numbers >= 0"]
    assert list(again.nodes_asked) == ["b"] and again.nodes_asked["b"][1] == asked[8:]


def test_the_scale_up_clock_stops_while_the_job_only_waits_for_running_jobs(aws_types):
    """The scale_up_timeout_s clock kept counting while the job only waited for a running job
    (it fitted the idle cluster): when the node that joined for it was lost later, the job was
    rejected at once, "the nodes that joined do not hold it"."""
    core = core_with(gpu_node("a1", gpus=8, family="A100", cpus=96), cpu_node("cpu", cpus=16),
                     scale_up_timeout_s=600.0)
    core.node_types = aws_types
    core.submit(JobSpec("x", num_workers=8, gpus_per_worker=1, accelerator_types=("A100",)),
                "dx", T0)
    y = JobSpec("y", num_workers=16, gpus_per_worker=1, accelerator_types=("A100",))
    assert isinstance(core.submit(y, "dy", T0 + 1).decision, Queued)
    core.ray_nodes({"a1", "cpu", "a2"}, set(), T0 + 300)
    core.report(gpu_node("a2", gpus=8, family="A100", cpus=96), T0 + 300)
    core.tick(T0 + 301)  # y fits the cluster as it is now: it waits for x, not for nodes
    core.ray_nodes({"a1", "cpu"}, {"a2"}, T0 + 900)  # a2 lost: y waits for a node again
    core.tick(T0 + 901)
    still = core.poll("y", "dy", T0 + 902).decision
    assert isinstance(still, Queued) and "autoscaler" in still.reason, still
    core.tick(T0 + 900 + 601)  # its clock began when it needed nodes again
    assert isinstance(core.poll("y", "dy", T0 + 1502).decision, Rejection)


def test_the_clusters_max_workers_bounds_a_plan():
    """Only each node type's max_workers was read: a 32-GPU job planned 4 A100 nodes in a
    cluster of max_workers 2, waited scale_up_timeout_s for nodes Ray never launches and was
    then rejected blaming the nodes' labels."""
    a100 = {"resources": {"CPU": 96, "GPU": 8, "accelerator_type:A100": 1}, "max_workers": 10}
    types = node_types_from_config({"max_workers": 2, "available_node_types": {"a100": a100}})
    sixteen = JobSpec("j", num_workers=16, gpus_per_worker=1, accelerator_types=("A100",))
    assert scale_up_plan(sixteen, types)[1] == 2
    big = JobSpec("big", num_workers=32, gpus_per_worker=1, accelerator_types=("A100",))
    assert scale_up_plan(big, types) is None
    core = core_with(cpu_node("cpu", cpus=16))
    core.node_types = types
    refused = core.submit(big, "d", T0).decision
    assert isinstance(refused, Rejection), refused
    assert "4 x a100 node(s)" in refused.message and "max_workers is 2" in refused.message
    for bad in ("many", -1):
        with pytest.raises(ValueError, match="cluster config's max_workers"):
            node_types_from_config({"max_workers": bad, "available_node_types": {"a100": a100}})


def test_max_workers_left_out_takes_rays_defaults():
    """Ray 2.60 (ray-cluster-configuration: a node type's max_workers defaults to the
    cluster's, whose default is 2): a node type without max_workers read as 0, so no job was
    ever planned on it (rejected as if no type could hold it), and a config without the
    top-level one was read as unbounded."""
    a100 = {"resources": {"CPU": 96, "GPU": 8, "accelerator_type:A100": 1}}
    (read,) = node_types_from_config({"available_node_types": {"a100": a100}})
    assert (read.max_workers, read.cluster_max_workers) == (2, 2)
    (read,) = node_types_from_config({"max_workers": 6, "available_node_types": {"a100": a100}})
    assert (read.max_workers, read.cluster_max_workers) == (6, 6)
    types = node_types_from_config({"available_node_types": {
        "a100": a100, "t4": {"resources": {"CPU": 8, "GPU": 1, "accelerator_type:T4": 1},
                             "max_workers": 10}}})
    sixteen = JobSpec("j", num_workers=16, gpus_per_worker=1, accelerator_types=("A100",))
    assert scale_up_plan(sixteen, types) == (types[0], 2)
    core = core_with(cpu_node("cpu", cpus=16))
    core.node_types = types
    four_t4 = JobSpec("t4s", num_workers=4, gpus_per_worker=1, accelerator_types=("T4",))
    refused = core.submit(four_t4, "d", T0).decision
    assert isinstance(refused, Rejection), refused
    assert ("4 x t4 node(s) in all (any up included), but the cluster config's max_workers is "
            "2 (Ray's default: the "
            "config sets none)") in refused.message


def test_a_rejection_names_a_gpu_type_left_out_for_lack_of_a_memory_label():
    """A GPU type without the accelerator-memory-gb label is never planned for a job asking
    for GPU memory (how much its GPUs have is not known): the job was rejected naming only the
    nodes up, and nothing said the type was passed over, nor why."""
    t4 = {"resources": {"CPU": 8, "GPU": 1, "accelerator_type:T4": 1}, "max_workers": 4,
          "labels": {"orchestrator.io/accelerator-type": "T4"}}
    a10 = {"resources": {"CPU": 8, "GPU": 1, "accelerator_type:A10G": 1}, "max_workers": 4,
           "labels": {"orchestrator.io/accelerator-memory-gb": "8"}}
    types = node_types_from_config({"max_workers": 4, "available_node_types": {"t4": t4,
                                                                                "a10": a10}})
    core = core_with(cpu_node("cpu", cpus=16))
    core.node_types = types
    asks = JobSpec("j", num_workers=2, gpus_per_worker=1, min_gpu_memory_gb=12)
    refused = core.submit(asks, "d", T0).decision
    assert isinstance(refused, Rejection), refused
    assert ("node type 't4' (T4) would hold it but has no orchestrator.io/accelerator-memory-gb "
            "label: a job asking for GPU memory (min_gpu_memory_gb 12) is never planned on a "
            "type whose GPUs' memory is not declared") in refused.message
    assert "'a10'" not in refused.message  # (labelled 8 GiB: too small, rightly left out)
    plain = core.submit(JobSpec("k", num_workers=2, gpus_per_worker=1), "d", T0).decision
    assert isinstance(plain, Queued)  # (asking no memory, the type is planned as before)


@pytest.mark.parametrize("value", [2.7, True, "3", -1])
def test_a_cluster_max_workers_that_is_not_a_whole_number_is_named(value):
    with pytest.raises(ValueError, match="the cluster config's max_workers must be a whole "
                                         "number >= 0"):
        node_types_from_config({"max_workers": value, "available_node_types": {}})


@pytest.mark.parametrize("field", ["max_workers", "GPU"])
@pytest.mark.parametrize("value", [2.7, True, "3", -1])
def test_a_node_types_max_workers_or_gpus_that_is_not_a_whole_number_is_named(field, value):
    # int() read 2.7 as 2 and true as 1, and -1 was taken, as the cluster's max_workers no
    # longer is.
    node_type = {"resources": {"CPU": 8, "GPU": 1}, "max_workers": 2}
    if field == "GPU":
        node_type["resources"]["GPU"] = value
    else:
        node_type["max_workers"] = value
    with pytest.raises(ValueError, match=f"node type 'w': {field} must be a whole number >= 0, "
                                         f"not {value!r}"):
        node_types_from_config({"available_node_types": {"w": node_type}})


def test_whole_numbers_written_as_floats_are_read_as_ray_reads_them():
    """`GPU: 8.0`, `max_workers: 4.0` (YAML floats) pass Ray 2.60's launcher schema (draft-07:
    8.0 is an integer), so `ray up` takes the config; the scheduler refused it ("GPU must be a
    whole number >= 0, not 8.0"), did not use the autoscaler, and rejected jobs only new nodes
    would hold."""
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load((ROOT / "cluster.local.yaml").read_text())
    config["max_workers"] = 4.0
    a100 = config["available_node_types"]["train_a100"]
    a100["resources"].update(GPU=8.0, memory=float(64 * GIB))
    a100["max_workers"] = 1.0
    validate_config(config)  # Ray's own check of the config its autoscaler runs with
    by_name = {t.name: t for t in node_types_from_config(config)}
    read = by_name["train_a100"]
    assert (read.gpus, read.max_workers, read.cluster_max_workers, read.memory_gb) == \
        (8, 1, 4, 64.0)
    assert all(type(value) is int for value in (read.gpus, read.max_workers,
                                                read.cluster_max_workers))
    assert scale_up_plan(JobSpec("j", num_workers=2, gpus_per_worker=1,
                                 accelerator_types=("A100",)), (read,)) == (read, 1)


@pytest.mark.parametrize("labels, resources, named", [
    # The accelerator_type resource steers the autoscaler, the label decides the family the
    # plan matches: an A100 job asked for accelerator_type:H100, which the real H100 type
    # also declares, and waited scale_up_timeout_s on H100 nodes that never hold it.
    ({"orchestrator.io/accelerator-type": "A100-80GB"},
     {"CPU": 96, "GPU": 8, "accelerator_type:H100": 1}, "accelerator_type:H100"),
    # Without NVML (declared GPUs, cluster.local.yaml) the agent reports the label's count:
    # the plan counted 8 GPUs a node and under-asked for a 16-GPU job by half.
    ({"orchestrator.io/accelerator-type": "A100", "orchestrator.io/accelerator-count": "4"},
     {"CPU": 96, "GPU": 8, "accelerator_type:A100": 1}, "accelerator-count"),
    # float() read `0_8` as 8, agreeing; the agent reads the label strictly (no count)
    ({"orchestrator.io/accelerator-type": "A100", "orchestrator.io/accelerator-count": "0_8"},
     {"CPU": 96, "GPU": 8, "accelerator_type:A100": 1}, "accelerator-count"),
])
def test_a_node_type_whose_labels_contradict_its_resources_is_named(labels, resources, named):
    config = {"available_node_types": {
        "a100": {"resources": resources, "labels": labels, "max_workers": 2},
        "h100": {"resources": {"CPU": 96, "GPU": 8, "accelerator_type:H100": 1},
                 "labels": {"orchestrator.io/accelerator-type": "H100"}, "max_workers": 2}}}
    with pytest.raises(ValueError, match=f"node type 'a100': .*{named}"):
        node_types_from_config(config)


def test_labels_that_agree_with_the_resources_are_taken():
    # Ray's name for the 80 GB A100 and a count written as a decimal agree with the label.
    a100 = {"resources": {"CPU": 8, "GPU": 8, "accelerator_type:A100-80G": 1},
            "labels": {"orchestrator.io/accelerator-type": "A100-80GB",
                       "orchestrator.io/accelerator-count": "8.0"}, "max_workers": 1}
    (node_type,) = node_types_from_config({"available_node_types": {"a100": a100}})
    assert (node_type.family, node_type.gpus) == ("A100", 8)


GIB = 1024 ** 3
SMALL_AND_BIG_RAM = {"max_workers": 10, "available_node_types": {
    "small": {"resources": {"CPU": 16, "memory": 64 * GIB}, "max_workers": 5},
    "bigmem": {"resources": {"CPU": 16, "memory": 512 * GIB}, "max_workers": 5}}}


def test_a_plan_takes_only_node_types_whose_ram_holds_a_worker():
    """The planner counted CPUs and GPUs only: a CPU job whose workers need 100 GiB each was
    planned on (and the autoscaler asked for CPUs that it meets with) the 64 GiB type, which
    never holds it; it waited scale_up_timeout_s and was then refused."""
    small, big = node_types_from_config(SMALL_AND_BIG_RAM)
    assert (small.memory_gb, big.memory_gb) == (64.0, 512.0)  # resources' memory, in bytes
    assert scale_up_plan(JobSpec("few", num_workers=2, cpus_per_worker=4), (small, big)) \
        == (small, 1)
    fat = JobSpec("fat", num_workers=2, cpus_per_worker=4, min_host_memory_gb=100)
    assert scale_up_plan(fat, (small, big)) == (big, 1)
    # The bundles ask for the RAM too, so the autoscaler picks a type that holds it.
    assert resource_bundles(fat, big) == [{"CPU": 4, "memory": 100 * GIB}] * 2
    # RAM bounds the workers a node holds: 200 GiB each, 2 per 512 GiB node.
    assert scale_up_plan(JobSpec("f", num_workers=8, cpus_per_worker=1,
                                 min_host_memory_gb=200), (small, big)) == (big, 4)
    # A type whose RAM the config does not state holds any (as before); no memory is asked.
    (unknown,) = node_types_from_config({"available_node_types": {
        "cpu": {"resources": {"CPU": 16}, "max_workers": 5}}})
    assert unknown.memory_gb is None and scale_up_plan(fat, (unknown,)) == (unknown, 1)
    assert resource_bundles(fat, unknown) == [{"CPU": 4}] * 2


@pytest.mark.parametrize("value", [2.5, "64G", -1, True])
def test_a_node_types_memory_that_is_not_a_whole_number_of_bytes_is_named(value):
    with pytest.raises(ValueError, match="node type 'w': memory must be a whole number"):
        node_types_from_config({"available_node_types": {"w": {
            "resources": {"CPU": 4, "memory": value}}}})


def test_a_job_no_node_types_ram_holds_is_refused_at_once_naming_need_and_largest():
    """It waited scale_up_timeout_s (30 min) for nodes that could never hold it."""
    core = core_with(cpu_node("cpu", cpus=16))
    core.node_types = node_types_from_config(SMALL_AND_BIG_RAM)
    huge = JobSpec("huge", num_workers=2, cpus_per_worker=4, min_host_memory_gb=600)
    refused = core.submit(huge, "d", T0).decision
    assert isinstance(refused, Rejection), refused
    assert ("each worker needs 600 GiB of host RAM (min_host_memory_gb), and the node type "
            "with the most, 'bigmem', has 512.0 GiB (its resources.memory): 88.0 GiB short"
            ) in refused.message, refused.message  # (the figure short, the field: one line)
    assert core.scale_up_requests(T0 + 1) == []
    fits = core.submit(JobSpec("fits", num_workers=2, cpus_per_worker=4,
                               min_host_memory_gb=300), "d2", T0 + 2).decision
    assert isinstance(fits, Queued) and "2 x bigmem" in fits.reason, fits  # 1 a node
    # The shipped cluster.yaml states no RAM: such a job still waits for a node (unknown fits)
    # where the autoscaler would add one, its bundles (CPUs alone) more than the nodes up hold.
    core.node_types = node_types_from_config(yaml.safe_load((ROOT / "cluster.yaml").read_text()))
    waits = core.submit(JobSpec("w", num_workers=5, cpus_per_worker=4, min_host_memory_gb=600),
                        "d3", T0 + 3).decision
    assert isinstance(waits, Queued), waits
    # Where the node up holds them (16 CPUs, 2 x 4), it adds none: refused, saying why.
    refused = core.submit(JobSpec("v", num_workers=2, cpus_per_worker=4,
                                  min_host_memory_gb=600), "d4", T0 + 4).decision
    assert isinstance(refused, Rejection), refused
    assert "the autoscaler would add no node for it" in refused.message, refused.message


def test_a_rejection_names_the_node_type_whose_max_workers_is_too_small():
    """A type with the RAM (or GPUs) to hold every worker but a max_workers below the nodes the
    job needs was passed over without a word: the job was refused naming only the nodes up,
    and nothing said that raising that type's max_workers would do."""
    core = core_with(cpu_node("cpu", cpus=16))
    core.node_types = node_types_from_config({"max_workers": 10, "available_node_types": {
        "small": {"resources": {"CPU": 16, "memory": 64 * GIB}, "max_workers": 5},
        "bigmem": {"resources": {"CPU": 16, "memory": 512 * GIB}, "max_workers": 1}}})
    fat = JobSpec("fat", num_workers=4, cpus_per_worker=4, min_host_memory_gb=300)
    refused = core.submit(fat, "d", T0).decision
    assert isinstance(refused, Rejection), refused
    assert ("it needs 4 x bigmem node(s) in all (any up included), but node type 'bigmem' has "
            "max_workers 1: raise it to 4") in refused.message, refused.message
    core.node_types = node_types_from_config({"max_workers": 10, "available_node_types": {
        "a100": {"resources": {"CPU": 96, "GPU": 8, "accelerator_type:A100": 1},
                 "max_workers": 1}}})
    sixteen = JobSpec("g", num_workers=16, gpus_per_worker=1, accelerator_types=("A100",))
    refused = core.submit(sixteen, "d", T0).decision
    assert isinstance(refused, Rejection), refused
    assert ("2 x a100 node(s) in all (any up included), but node type 'a100' has max_workers 1: "
            "raise it to 2"
            ) in refused.message, refused.message
    # Both bounds short: both named, on one line.
    core.node_types = node_types_from_config({"max_workers": 1, "available_node_types": {
        "a100": {"resources": {"CPU": 96, "GPU": 8, "accelerator_type:A100": 1},
                 "max_workers": 1}}})
    refused = core.submit(sixteen, "d", T0).decision
    assert ("2 x a100 node(s) in all (any up included), but node type 'a100' has max_workers 1 "
            "and the cluster "
            "config's max_workers is 1: raise both to 2") in refused.message, refused.message


def test_status_json_shows_each_node_types_ram_gpus_cpus_and_max_workers():
    """`status --json`'s autoscaling listed the node types' names alone: a user could not see
    why a type was not chosen (too little RAM, too few GPUs, max_workers)."""
    import threading
    from types import SimpleNamespace

    from ray_layer import scheduler_actor

    actor_class = scheduler_actor.SchedulerActor.__ray_metadata__.modified_class
    actor = object.__new__(actor_class)
    actor.lock, actor.core = threading.RLock(), core_with(cpu_node("cpu", cpus=16))
    actor.core.node_types = node_types_from_config({"max_workers": 10, "available_node_types": {
        "bigmem": {"resources": {"CPU": 16, "memory": 512 * GIB}, "max_workers": 1},
        "a100": {"resources": {"CPU": 96, "GPU": 8, "accelerator_type:A100": 1},
                 "labels": {"orchestrator.io/accelerator-memory-gb": "80"}}}})
    actor.throughput = SimpleNamespace(reference=None, rows=lambda: [])
    actor._scale_up_asked, actor._autoscaling_problem = [{"CPU": 1.0}], None
    actor._scale_up_asked_by = [{"job": "j", "node_type": "bigmem", "nodes": 1, "workers": 1}]
    autoscaling = json.loads(json.dumps(actor.snapshot()["autoscaling"]))
    assert autoscaling == {
        "max_workers": 10, "asked_for": [{"CPU": 1.0}], "config_problem": None,
        "config_note": None, "autoscaler": "unknown",
        "asked_by_job": [{"job": "j", "node_type": "bigmem", "nodes": 1, "workers": 1}],
        "node_types": [
            {"name": "bigmem", "cpus": 16.0, "gpus": 0, "family": None, "gpu_memory_gb": None,
             "memory_gb": 512.0, "max_workers": 1, "network_gbps": None,
             "network_group": None},
            {"name": "a100", "cpus": 96.0, "gpus": 8, "family": "A100", "gpu_memory_gb": 80.0,
             "memory_gb": None, "max_workers": 10, "network_gbps": None,
             "network_group": None}]}


@pytest.mark.parametrize("value", [512, 64, 1])
def test_a_node_types_memory_written_in_gib_is_named_not_read_as_bytes(value):
    """Ray takes resources' memory in bytes (`ray up` fills it in so): `memory: 512` meant as
    GiB read as 512 bytes, and the type was passed over for every job stating
    min_host_memory_gb, the refusal saying it had 0.0 GiB."""
    with pytest.raises(ValueError, match=(
            rf"node type 'w': memory {value} is under 1 MiB: Ray takes it in bytes "
            rf"\({value} GiB is {value * GIB}\)")):
        node_types_from_config({"available_node_types": {"w": {
            "resources": {"CPU": 4, "memory": value}}}})
    (none,) = node_types_from_config({"available_node_types": {"w": {
        "resources": {"CPU": 4, "memory": 0}}}})  # (no RAM for Ray's tasks: taken as stated)
    assert none.memory_gb == 0


def test_a_max_workers_refusal_counts_the_nodes_of_the_type_already_up():
    """With one A100 node of the type up, a 24-GPU job was refused saying the autoscaler
    "would need to add 3 x a100 node(s)": it needs 3 in all, 2 of them new; max_workers
    counts the one up too, so the figure to raise it to is 3."""
    core = core_with(cpu_node("cpu", cpus=16), gpu_node("a1", gpus=8))
    core.node_types = node_types_from_config({"max_workers": 10, "available_node_types": {
        "a100": {"resources": {"CPU": 96, "GPU": 8, "accelerator_type:A100": 1},
                 "max_workers": 2}}})
    job = JobSpec("j", num_workers=24, gpus_per_worker=1, accelerator_types=("A100",))
    refused = core.submit(job, "d", T0).decision
    assert isinstance(refused, Rejection), refused
    assert "add 3 x" not in refused.message, refused.message
    assert ("it needs 3 x a100 node(s) in all (any up included), but node type 'a100' has "
            "max_workers 2: raise it to 3") in refused.message, refused.message


def test_an_unusable_autoscaling_config_is_named_in_status_json(monkeypatch, tmp_path):
    """A config refused when read (a node type's labels against its resources, `memory: 512`)
    was named in the scheduler actor's log alone: `status --json` showed no node types, and a
    user whose jobs were refused could not see why none waited for the autoscaler."""
    import inspect
    import threading
    from types import SimpleNamespace

    from ray_layer import scheduler_actor

    config = tmp_path / "ray_bootstrap_config.yaml"
    config.write_text(yaml.safe_dump({"available_node_types": {"w": {
        "resources": {"CPU": 4, "memory": 512}}}}))
    read = inspect.unwrap(scheduler_actor._autoscaler_node_types)
    monkeypatch.setitem(read.__globals__, "_autoscaling_config_path", lambda: config)
    types, problem = read()
    assert types == () and problem == (
        f"autoscaling config {config} not used: node type 'w': memory 512 is under 1 MiB: "
        f"Ray takes it in bytes (512 GiB is {512 * GIB})")
    monkeypatch.setitem(read.__globals__, "_autoscaling_config_path", lambda: None)
    assert read() == ((), None)  # (no autoscaler: nothing to name)
    actor_class = scheduler_actor.SchedulerActor.__ray_metadata__.modified_class
    actor = object.__new__(actor_class)
    actor.lock, actor.core = threading.RLock(), core_with(cpu_node("cpu", cpus=16))
    actor.throughput = SimpleNamespace(reference=None, rows=lambda: [])
    actor._scale_up_asked, actor._autoscaling_problem = None, problem
    actor._scale_up_asked_by = []
    assert actor.snapshot()["autoscaling"] == {"max_workers": None, "node_types": [],
                                               "asked_for": [], "asked_by_job": [],
                                               "config_problem": problem,
                                               "config_note": None,
                                               "autoscaler": "unknown"}


def test_a_type_short_of_max_workers_too_is_still_named_for_its_memory_label_or_ram():
    """A type passed over for a missing GPU-memory label (or too little RAM) and also too few
    max_workers: each note tried the type within its max_workers, found no plan, and the
    job was refused with no note at all."""
    core = core_with(cpu_node("cpu", cpus=16))
    core.node_types = node_types_from_config({"max_workers": 10, "available_node_types": {
        "t4": {"resources": {"CPU": 8, "GPU": 1, "accelerator_type:T4": 1}, "max_workers": 1,
               "labels": {"orchestrator.io/accelerator-type": "T4"}}}})
    asks = JobSpec("j", num_workers=2, gpus_per_worker=1, min_gpu_memory_gb=12)
    refused = core.submit(asks, "d", T0).decision
    assert isinstance(refused, Rejection), refused
    assert "node type 't4' (T4) would hold it but has no orchestrator.io/accelerator-memory-gb" \
        in refused.message, refused.message
    core.node_types = node_types_from_config({"max_workers": 10, "available_node_types": {
        "bigmem": {"resources": {"CPU": 16, "memory": 512 * GIB}, "max_workers": 1}}})
    huge = JobSpec("huge", num_workers=4, cpus_per_worker=4, min_host_memory_gb=600)
    refused = core.submit(huge, "d", T0).decision
    assert isinstance(refused, Rejection), refused
    assert ("each worker needs 600 GiB of host RAM (min_host_memory_gb), and the node type "
            "with the most, 'bigmem', has 512.0 GiB") in refused.message, refused.message


def test_a_job_of_several_families_asks_for_the_type_that_adds_fewest_nodes_beside_those_up():
    """A 16-GPU job taking A100 or H100, beside an idle 8-GPU H100 node (placement mixes the
    families): the plan took the A100 type (first of two that hold it with 2 nodes alone),
    counted no H100 node up toward it and asked for 16 A100 bundles: 2 A100 nodes added
    where 1 H100 node would do, one left idle."""
    core = core_with(gpu_node("h1", gpus=8, family="H100"))
    core.node_types = node_types_from_config({"max_workers": 10, "available_node_types": {
        "a100": {"resources": {"CPU": 96, "GPU": 8, "accelerator_type:A100": 1},
                 "max_workers": 4},
        "h100": {"resources": {"CPU": 96, "GPU": 8, "accelerator_type:H100": 1},
                 "max_workers": 4}}})
    job = JobSpec("j", num_workers=16, gpus_per_worker=1, accelerator_types=("A100", "H100"))
    waiting = core.submit(job, "d", T0).decision
    assert isinstance(waiting, Queued), waiting
    assert "add 1 x h100 node(s)" in waiting.reason, waiting.reason
    asked = core.scale_up_requests(T0 + 1)
    assert len(asked) == 16 and asked[0] == {"CPU": 1.0, "GPU": 1,
                                             "accelerator_type:H100": 0.001}
    # Nothing up of either family: the first type that holds it with the fewest nodes, as before.
    core = core_with(cpu_node("cpu", cpus=16))
    core.node_types = node_types_from_config({"max_workers": 10, "available_node_types": {
        "a100": {"resources": {"CPU": 96, "GPU": 8, "accelerator_type:A100": 1},
                 "max_workers": 4},
        "h100": {"resources": {"CPU": 96, "GPU": 8, "accelerator_type:H100": 1},
                 "max_workers": 4}}})
    assert "add 2 x a100 node(s)" in core.submit(job, "d", T0).decision.reason


@pytest.mark.parametrize("resources, labels, named", [
    ({"CPU": 8, "GPU": 1}, {"orchestrator.io/accelerator-memory-gb": "80GB"},
     "label orchestrator.io/accelerator-memory-gb must be a number >= 0, not '80GB'"),
    ({"CPU": 8, "GPU": 1}, {"orchestrator.io/accelerator-memory-gb": "nan"},
     "label orchestrator.io/accelerator-memory-gb must be a number >= 0, not 'nan'"),
    ({"CPU": 8, "GPU": 1}, {"orchestrator.io/accelerator-memory-gb": "-5"},
     "label orchestrator.io/accelerator-memory-gb must be a number >= 0, not '-5'"),
    ({"CPU": 8}, {"orchestrator.io/network-gbps": "fast"},
     "label orchestrator.io/network-gbps must be a number >= 0, not 'fast'"),
    # float() read these as 80 GB and 25 GB/s (validation.parse_number refuses them)
    ({"CPU": 8, "GPU": 1}, {"orchestrator.io/accelerator-memory-gb": "8_0"},
     "label orchestrator.io/accelerator-memory-gb must be a number >= 0, not '8_0'"),
    ({"CPU": 8}, {"orchestrator.io/network-gbps": "\u0662\u0665"},
     "label orchestrator.io/network-gbps must be a number >= 0, not '\u0662\u0665'"),
    ({"CPU": "eight"}, {}, "CPU must be a number >= 0, not 'eight'"),
    ({"CPU": -4}, {}, "CPU must be a number >= 0, not -4"),
    ({"CPU": float("inf")}, {}, "CPU must be a number >= 0, not inf"),
])
def test_a_node_types_cpus_or_number_label_that_is_no_number_is_named(resources, labels, named):
    """`could not convert string to float: '80GB'` named the type but not the field, and a
    negative, infinite or NaN figure was taken (the type then never planned, unsaid)."""
    with pytest.raises(ValueError) as raised:
        node_types_from_config({"available_node_types": {"w": {"resources": resources,
                                                               "labels": labels}}})
    assert str(raised.value) == f"node type 'w': {named}"


def test_a_rejection_names_a_type_of_the_family_without_its_accelerator_type_resource():
    """A type labelled A100 whose resources name no accelerator_type:A100 is never planned for
    a job naming A100 (the autoscaler, asked for GPUs, could add another family): the job
    was refused naming only the nodes up, and nothing said the type was passed over."""
    core = core_with(cpu_node("cpu", cpus=16))
    core.node_types = node_types_from_config({"max_workers": 10, "available_node_types": {
        "a100": {"resources": {"CPU": 96, "GPU": 8}, "max_workers": 1,
                 "labels": {"orchestrator.io/accelerator-type": "A100"}}}})
    job = JobSpec("j", num_workers=8, gpus_per_worker=1, accelerator_types=("A100",))
    refused = core.submit(job, "d", T0).decision
    assert isinstance(refused, Rejection), refused
    assert ("node type 'a100' (A100) would hold it but its resources name no "
            "accelerator_type:A100: a job naming accelerator_types is planned only on a type "
            "whose resources name the family (add \"accelerator_type:A100\": 1)"
            ) in refused.message, refused.message
    anyone = core.submit(JobSpec("k", num_workers=8, gpus_per_worker=1), "d2", T0).decision
    assert isinstance(anyone, Queued), anyone  # (naming no family, it is planned as before)


def test_a_gpu_job_no_node_type_has_the_gpus_for_says_so():
    """A GPU job with no node type of its family, or none with a worker's GPUs, or none with
    GPUs at all, was refused naming the nodes up alone: nothing said the autoscaler's node
    types were looked at, nor what they lack."""
    core = core_with(cpu_node("cpu", cpus=16))
    core.node_types = node_types_from_config({"max_workers": 10, "available_node_types": {
        "a100": {"resources": {"CPU": 96, "GPU": 8, "accelerator_type:A100": 1}},
        "cpu_worker": {"resources": {"CPU": 16}}}})

    def reason(spec):
        refused = core.submit(spec, spec.name, T0).decision
        assert isinstance(refused, Rejection), refused
        return refused.message.splitlines()[-1].strip()
    assert reason(JobSpec("h", num_workers=1, gpus_per_worker=1, accelerator_types=("H100",))) \
        == "no node type the autoscaler can add has H100 GPUs (its GPU types: 'a100' (A100))"
    assert reason(JobSpec("big", num_workers=1, gpus_per_worker=16)) == (
        "no node type the autoscaler can add has 16 GPU(s) for one worker (gpus_per_worker): "
        "the most is 8 ('a100')")
    core.node_types = node_types_from_config({"max_workers": 10, "available_node_types": {
        "cpu_worker": {"resources": {"CPU": 16}}}})
    assert reason(JobSpec("g", num_workers=1, gpus_per_worker=1)) == \
        "no node type the autoscaler can add has GPUs"
    core.node_types = ()  # (no autoscaling config: no such note)
    assert "node type" not in reason(JobSpec("g2", num_workers=1, gpus_per_worker=1))


def _two_eight_gpu_types(extra_labels=None, h100_group="efa", max_workers=1):
    labels = {"orchestrator.io/network-group": "efa", "orchestrator.io/network-gbps": "50",
              **(extra_labels or {})}
    return node_types_from_config({"max_workers": 10, "available_node_types": {
        "a100": {"resources": {"CPU": 96, "GPU": 8, "accelerator_type:A100": 1},
                 "labels": labels, "max_workers": max_workers},
        "h100": {"resources": {"CPU": 96, "GPU": 8, "accelerator_type:H100": 1},
                 "labels": {**labels, "orchestrator.io/network-group": h100_group},
                 "max_workers": max_workers}}})


def test_a_job_no_single_type_holds_is_planned_across_the_types_it_accepts():
    """A100 and H100 types at max_workers 1 each: a 16-GPU job taking either family (placement
    mixes them) was refused, `raise a100's max_workers to 2`, although one node of each holds
    it."""
    core = core_with(cpu_node("cpu", cpus=16))
    core.node_types = _two_eight_gpu_types()
    job = JobSpec("j", num_workers=16, gpus_per_worker=1, accelerator_types=("A100", "H100"))
    waiting = core.submit(job, "d", T0).decision
    assert isinstance(waiting, Queued), waiting
    assert "waiting for the autoscaler to add 1 x a100 + 1 x h100 node(s)" in waiting.reason
    asked = core.scale_up_requests(T0 + 1)  # 8 bundles steered to each type
    assert asked == [{"CPU": 1.0, "GPU": 1, "accelerator_type:A100": 0.001}] * 8 + \
        [{"CPU": 1.0, "GPU": 1, "accelerator_type:H100": 0.001}] * 8
    # An idle H100 node up holds its 8: one A100 node is added, 16 bundles still asked.
    core = core_with(gpu_node("h1", gpus=8, family="H100", cpus=96))
    core.node_types = _two_eight_gpu_types()
    waiting = core.submit(job, "d", T0).decision
    assert "waiting for the autoscaler to add 1 x a100 node(s)" in waiting.reason, waiting
    assert len(core.scale_up_requests(T0 + 1)) == 16
    # The nodes join: placed across both.
    core.ray_nodes({"h1", "a1"}, set(), T0 + 300)
    core.report(gpu_node("a1", gpus=8, family="A100", cpus=96), T0 + 300)
    placed = core.poll("j", "d", T0 + 301).decision
    assert isinstance(placed, Placement) and set(placed.worker_nodes) == {"h1", "a1"}, placed
    # More than both types' max_workers allow, or a family it does not take: refused.
    for refused in (JobSpec("k", num_workers=24, gpus_per_worker=1),
                    JobSpec("a", num_workers=16, gpus_per_worker=1, accelerator_types=("A100",))):
        assert isinstance(core_with(cpu_node("cpu", cpus=16)).submit(refused, "d", T0).decision,
                          Rejection)
        fresh = core_with(cpu_node("cpu", cpus=16))
        fresh.node_types = _two_eight_gpu_types()
        assert isinstance(fresh.submit(refused, "d", T0).decision, Rejection)
    # One type holds it: a single-type plan, as before.
    assert scale_up_parts(job, _two_eight_gpu_types(max_workers=2)) == (
        (_two_eight_gpu_types(max_workers=2)[0], 2, 16),)


def test_a_plan_across_types_keeps_the_bandwidth_floor_and_the_clusters_max_workers():
    """Nodes of two types are in one network group only when both are labelled with it (else
    the link is measured, or inter_group_gbps): a floor is met across types only so, as the
    single-type plan takes a type's network-gbps between its own nodes."""
    floor = JobSpec("j", num_workers=16, gpus_per_worker=1, min_bandwidth_gbps=40)
    (a100, h100) = same = _two_eight_gpu_types()
    assert scale_up_parts(floor, same) == ((a100, 1, 8), (h100, 1, 8))
    assert scale_up_parts(floor, _two_eight_gpu_types(h100_group="other")) is None
    assert scale_up_parts(dataclasses.replace(floor, min_bandwidth_gbps=60), same) is None
    assert scale_up_parts(dataclasses.replace(floor, min_bandwidth_gbps=0),
                          _two_eight_gpu_types(h100_group="other")) is not None
    one_node = [dataclasses.replace(t, cluster_max_workers=1) for t in same]
    assert scale_up_parts(dataclasses.replace(floor, min_bandwidth_gbps=0), one_node) is None
    # RAM: a type whose memory holds no worker is left out of the mix too.
    small = dataclasses.replace(h100, memory_gb=64.0)
    assert scale_up_parts(dataclasses.replace(floor, min_bandwidth_gbps=0,
                                              min_host_memory_gb=100), (a100, small)) is None


def test_the_head_node_type_is_planned_when_its_max_workers_lets_ray_launch_it_as_workers():
    """Ray 2.60 launches up to the head type's max_workers worker nodes of that type (its
    get_nodes_for counts the head itself beside them; unset, the head type's is 0, not the
    cluster's): the head type was always left out, so a job only such nodes hold was
    refused."""
    head = {"resources": {"CPU": 8, "GPU": 1, "accelerator_type:T4": 1}}
    config = {"max_workers": 4, "head_node_type": "head",
              "available_node_types": {"head": {**head, "max_workers": 2}}}
    (read,) = node_types_from_config(config)
    assert (read.name, read.max_workers, read.family) == ("head", 2, "T4")
    core = core_with(cpu_node("head", cpus=8))
    core.node_types = (read,)
    waiting = core.submit(JobSpec("j", num_workers=2, gpus_per_worker=1), "d", T0).decision
    assert isinstance(waiting, Queued), waiting
    assert "add 2 x head node(s)" in waiting.reason
    # Beside a head that holds a worker: 3 in all, the head and the 2 Ray may add; not 4.
    core = core_with(gpu_node("head", gpus=1, family="T4", cpus=8))
    core.node_types = (read,)
    three = core.submit(JobSpec("j", num_workers=3, gpus_per_worker=1), "d", T0).decision
    assert isinstance(three, Queued) and "add 2 x head node(s)" in three.reason, three
    four = core.submit(JobSpec("k", num_workers=4, gpus_per_worker=1), "d", T0).decision
    assert isinstance(four, Rejection), four
    assert ("it needs 4 x head node(s) in all (any up included), but node type 'head' has "
            "max_workers 2: raise it to 3 (the head is one of them)") in four.message
    # Across types, the head counts toward neither bound: 16 workers on 2 x a (the cluster's
    # max_workers) and 1 on the head, but not 18 (a third worker node). (Each type declares a
    # resource of its own, steering each part's bundles to it: without, the plan is refused,
    # as Ray, asked for GPUs alone, adds 2 x b, not the 2 x a planned.)
    def eight(own):
        return {"resources": {"CPU": 96, "GPU": 8, own: 1}, "max_workers": 3}
    steered = {"max_workers": 2, "head_node_type": "h", "available_node_types": {
        "h": {"resources": {"CPU": 8, "GPU": 1, "pool_h": 1}, "max_workers": 1},
        "a": eight("pool_a"), "b": eight("pool_b")}}
    mixed = node_types_from_config(steered)
    seventeen = JobSpec("j", num_workers=17, gpus_per_worker=1)
    assert scale_up_parts(seventeen, mixed) == ((mixed[1], 2, 16), (mixed[0], 1, 1))
    assert _ray_adds(steered, plan_bundles(seventeen, scale_up_parts(seventeen, mixed))) == {
        "a": 2}
    assert scale_up_parts(JobSpec("j", num_workers=18, gpus_per_worker=1), mixed) is None
    unsteered = {**steered, "available_node_types": {
        name: {**t, "resources": {k: v for k, v in t["resources"].items() if "pool" not in k}}
        for name, t in steered["available_node_types"].items()}}
    assert scale_up_parts(seventeen, node_types_from_config(unsteered)) is None
    # Unset, or 0: Ray launches none, and it stays out (its resources unread, as before).
    for unset in ({**head, "resources": {"CPU": "not read"}}, {**head, "max_workers": 0}):
        assert node_types_from_config({**config, "available_node_types": {"head": unset}}) == ()
    with pytest.raises(ValueError, match="node type 'head': max_workers must be a whole"):
        node_types_from_config({**config, "available_node_types": {
            "head": {**head, "max_workers": -1}}})


def test_nodes_up_count_toward_a_request_with_the_ram_ray_counts_for_them():
    """Ray's autoscaler fits request_resources' bundles onto the nodes up by their type's
    resources, whose memory `ray up` fills in at 70% of the instance's RAM (the object
    store's 30% left out); the bundles ask for RAM only where the type states it. The nodes
    up were counted at their whole probed RAM: beside a 512 GiB node, a job of 4 workers of
    200 GiB said `add 2 x bigmem` where the autoscaler adds 3 (the node up holds one bundle)."""
    big = dataclasses.replace(cpu_node("big", cpus=64), ram_total_bytes=512 * GIB,
                              ram_available_bytes=500 * GIB)
    core = core_with(big)
    core.node_types = node_types_from_config({"max_workers": 10, "available_node_types": {
        "bigmem": {"resources": {"CPU": 64, "memory": int(0.7 * 512 * GIB)},
                   "max_workers": 4}}})
    fat = JobSpec("fat", num_workers=4, cpus_per_worker=4, min_host_memory_gb=200)
    waiting = core.submit(fat, "d", T0).decision
    assert isinstance(waiting, Queued), waiting
    assert "add 3 x bigmem node(s)" in waiting.reason, waiting.reason



def test_a_job_the_autoscaler_would_add_no_node_for_is_refused_naming_why():
    """A type stating no memory: its bundles ask no RAM, and Ray counts the node up by its
    CPUs (16: all 4 workers), not by RAM (1 of 60 GiB in 100): it adds nothing. The job said
    `add 1 x w node(s)`, waited scale_up_timeout_s (30 min) for a node that never came, and
    was then refused asking whether labels promise too much."""
    up = dataclasses.replace(cpu_node("up", cpus=16), ram_total_bytes=100 * GIB,
                             ram_available_bytes=100 * GIB)
    core = core_with(up)
    types = node_types_from_config({"max_workers": 10, "available_node_types": {
        "w": {"resources": {"CPU": 8}, "max_workers": 4}}})
    core.node_types = types
    job = JobSpec("j", num_workers=4, cpus_per_worker=4, min_host_memory_gb=60)
    refused = core.submit(job, "d", T0).decision
    assert isinstance(refused, Rejection), refused
    assert ("the autoscaler would add no node for it: its workers' bundles ({'CPU': 4}) fit "
            "the nodes up as it counts them; node type 'w' states no memory (resources.memory), "
            "so the bundles ask for no RAM: state it, in bytes") in refused.message, \
        refused.message
    assert core.scale_up_requests(T0 + 1) == []
    # Stated, the bundles ask for the RAM: the node up holds one (70 GiB of Ray memory).
    core.node_types = node_types_from_config({"max_workers": 10, "available_node_types": {
        "w": {"resources": {"CPU": 8, "memory": 128 * GIB}, "max_workers": 4}}})
    waiting = core.submit(job, "d", T0 + 2).decision
    assert isinstance(waiting, Queued) and "add 2 x w node(s)" in waiting.reason, waiting
    # Of two types, the one the autoscaler would add is planned, not the one it adds none of.
    core = core_with(up)
    core.node_types = types + node_types_from_config({"max_workers": 10, "available_node_types": {
        "big": {"resources": {"CPU": 8, "memory": 128 * GIB}, "max_workers": 4}}})
    waiting = core.submit(job, "d", T0).decision
    assert isinstance(waiting, Queued) and "add 2 x big node(s)" in waiting.reason, waiting


def test_a_node_up_of_the_family_counts_toward_the_request_whatever_its_gpu_memory():
    """Ray names an A100 of 40 GB and one of 80 GB alike (accelerator_type:A100), and the
    autoscaler counts a bundle's GPU by that resource, not its memory: beside an 8-GPU A100
    40 GB node up, the bundles of 8 workers asking 60 GB fit it as it counts them, and it adds
    nothing. The job said `add 1 x a100_80` and waited scale_up_timeout_s (30 min)."""
    types = node_types_from_config({"max_workers": 10, "available_node_types": {
        "a100_80": {"resources": {"CPU": 96, "GPU": 8, "accelerator_type:A100": 1},
                    "labels": {"orchestrator.io/accelerator-memory-gb": "80"},
                    "max_workers": 4}}})
    core = core_with(gpu_node("a40", gpus=8, family="A100", memory_gb=40, cpus=96))
    core.node_types = types
    job = JobSpec("j", num_workers=8, gpus_per_worker=1, min_gpu_memory_gb=60,
                  accelerator_types=("A100",))
    refused = core.submit(job, "d", T0).decision
    assert isinstance(refused, Rejection), refused
    assert ("the autoscaler would add no node for it: its workers' bundles ({'CPU': 1.0, "
            "'GPU': 1, 'accelerator_type:A100': 0.001}) fit the nodes up as it counts them; "
            "it counts a GPU by its accelerator_type, not its memory (min_gpu_memory_gb)"
            ) in refused.message, refused.message
    assert core.scale_up_requests(T0 + 1) == []
    # 16 workers: the node up holds 8 of the bundles, one node is added for the rest, and the
    # job still waits (it times out, as a node whose labels promise too much does).
    waiting = core.submit(dataclasses.replace(job, name="k", num_workers=16), "d", T0).decision
    assert isinstance(waiting, Queued) and "add 1 x a100_80 node(s)" in waiting.reason, waiting


def test_a_type_within_its_max_workers_gets_no_max_workers_note():
    """A type that holds the job within its max_workers and the cluster's (the autoscaler
    adds none of it: the A100 40 GB node up holds the bundles as it counts them) was named
    all the same: `it needs 1 x a100_80 node(s) in all (any up included), but : raise both to
    1`."""
    from orchestrator.autoscaling import max_workers_note
    types = node_types_from_config({"max_workers": 10, "available_node_types": {
        "a100_80": {"resources": {"CPU": 96, "GPU": 8, "accelerator_type:A100": 1},
                    "labels": {"orchestrator.io/accelerator-memory-gb": "80"},
                    "max_workers": 4}}})
    job = JobSpec("j", num_workers=8, gpus_per_worker=1, min_gpu_memory_gb=60,
                  accelerator_types=("A100",))
    assert max_workers_note(job, types) is None
    core = core_with(gpu_node("a40", gpus=8, family="A100", memory_gb=40, cpus=96))
    core.node_types = types
    refused = core.submit(job, "d", T0).decision
    assert isinstance(refused, Rejection) and "max_workers" not in refused.message, refused
    assert "raise it to 5" in max_workers_note(dataclasses.replace(job, num_workers=40), types)


def test_every_rejection_path_carries_the_node_type_notes():
    """Refused by the queue pass (a job waiting for an A100 80 GB node when an A100 40 GB
    node joins: the autoscaler then adds none) or after losing its node (replace), the
    reason lacked the notes submit's rejection carries (adds_none_note, max_workers_note...)."""
    types = node_types_from_config({"max_workers": 10, "available_node_types": {
        "a100_80": {"resources": {"CPU": 96, "GPU": 8, "accelerator_type:A100": 1},
                    "labels": {"orchestrator.io/accelerator-memory-gb": "80"},
                    "max_workers": 4}}})
    core = core_with(cpu_node("cpu", cpus=16))
    core.node_types = types
    job = JobSpec("j", num_workers=8, gpus_per_worker=1, min_gpu_memory_gb=60,
                  accelerator_types=("A100",))
    assert isinstance(core.submit(job, "d", T0).decision, Queued)
    core.ray_nodes({"cpu", "a40"}, set(), T0 + 300)
    core.report(gpu_node("a40", gpus=8, family="A100", memory_gb=40, cpus=96), T0 + 300)
    dropped = core.poll("j", "d", T0 + 301).decision
    assert isinstance(dropped, Rejection), dropped
    fresh = core.submit(dataclasses.replace(job, name="k"), "d", T0 + 302).decision
    assert dropped.message == fresh.message.replace("'k'", "'j'")
    assert "the autoscaler would add no node for it" in dropped.message, dropped.message
    # A job that lost its node, which no type the autoscaler may add holds within max_workers.
    core = core_with(gpu_node("a1", gpus=8, family="A100", cpus=96), cpu_node("cpu", cpus=16))
    core.node_types = _two_eight_gpu_types(max_workers=0)
    spec = JobSpec("t", num_workers=8, gpus_per_worker=1, accelerator_types=("A100",))
    assert isinstance(core.submit(spec, "d", T0).decision, Placement)
    core.ray_nodes({"cpu"}, {"a1"}, T0 + 10)
    lost = core.replace(spec, "d", ["a1"], T0 + 11).decision
    assert isinstance(lost, Rejection), lost
    assert "node type 'a100' has max_workers 0: raise it to 1" in lost.message, lost.message


def test_a_scale_up_timeout_names_the_types_that_never_joined_and_those_that_fall_short():
    """A plan across two types of which one type's node joined and the other's never did:
    the timeout said `the nodes that joined do not hold it (do their labels promise more than
    they report?)`, although the missing type never joined."""
    from orchestrator.inventory import GIB, GpuInfo, NodeReport

    core = core_with(cpu_node("cpu", cpus=16), scale_up_timeout_s=600.0)
    core.node_types = _two_eight_gpu_types()
    job = JobSpec("j", num_workers=16, gpus_per_worker=1, accelerator_types=("A100", "H100"))
    assert isinstance(core.submit(job, "d", T0).decision, Queued)
    core.ray_nodes({"cpu", "h1"}, set(), T0 + 300)
    core.report(gpu_node("h1", gpus=8, family="H100", cpus=96), T0 + 300)
    core.tick(T0 + 700)
    gone = core.poll("j", "d", T0 + 701).decision
    assert isinstance(gone, Rejection), gone
    assert ("waited 700 s (scale_up_timeout_s) for the autoscaler's nodes: 1 x a100 never "
            "joined (the autoscaler did not add it") in gone.message, gone.message
    assert "labels promise" not in gone.message, gone.message
    # The H100 node that joined reports 79.6 GiB where its type's label says 80: it holds
    # none of the 8 workers the autoscaler counts it for, and is named for it.
    core = core_with(cpu_node("cpu", cpus=16), scale_up_timeout_s=600.0)
    core.node_types = _two_eight_gpu_types({"orchestrator.io/accelerator-memory-gb": "80"})
    big = dataclasses.replace(job, min_gpu_memory_gb=80)
    assert isinstance(core.submit(big, "d", T0).decision, Queued)
    h100 = NodeReport(node_id="h1", hostname="h1", ray_cpus=96, ray_gpus=8, cpu_count=96,
                      load_avg_1m=0.0, ram_total_bytes=64 * GIB, ram_available_bytes=64 * GIB,
                      gpus=tuple(GpuInfo(i, "NVIDIA H100 80GB HBM3", 81559 << 20, 81000 << 20)
                                 for i in range(8)))
    core.ray_nodes({"cpu", "h1"}, set(), T0 + 300)
    core.report(h100, T0 + 300)
    core.tick(T0 + 700)
    gone = core.poll("j", "d", T0 + 701).decision
    assert isinstance(gone, Rejection), gone
    assert "1 x a100 never joined" in gone.message, gone.message
    assert ("the H100 node(s) up (node type 'h100') hold 0 of the 8 workers the autoscaler "
            "counts them for (do their labels promise more than they report?)"
            ) in gone.message, gone.message


def test_a_job_submitted_again_under_its_name_waits_its_own_scale_up_timeout():
    """Cancelled after 500 s of waiting for nodes and submitted again before a maintenance
    pass: the new job inherited the first one's clock and was refused after 149 s of its own
    wait (`waited 650 s (scale_up_timeout_s)`)."""
    core = core_with(cpu_node("cpu", cpus=16), scale_up_timeout_s=600.0)
    core.node_types = _two_eight_gpu_types()
    job = JobSpec("j", num_workers=16, gpus_per_worker=1, accelerator_types=("A100", "H100"))
    assert isinstance(core.submit(job, "d", T0).decision, Queued)
    core.cancel("j", "d", T0 + 500)
    assert isinstance(core.submit(job, "d", T0 + 501).decision, Queued)
    core.tick(T0 + 650)
    assert isinstance(core.poll("j", "d", T0 + 651).decision, Queued)
    core.tick(T0 + 501 + 601)
    gone = core.poll("j", "d", T0 + 1103).decision
    assert isinstance(gone, Rejection) and "waited 601 s" in gone.message, gone


def test_a_job_no_node_type_has_the_gpu_memory_or_cpus_for_one_worker_says_so(aws_types):
    """Refused with what the nodes up lack alone: a T4 job asking 20 GiB a GPU (the T4 type's
    GPUs have 15), or a worker of 500 CPUs (the largest type has 192), named no type."""
    from orchestrator.autoscaling import cpu_note, gpu_note
    t4 = JobSpec("b", num_workers=1, gpus_per_worker=1, accelerator_types=("T4",),
                 min_gpu_memory_gb=20)
    wide = JobSpec("d", num_workers=2, cpus_per_worker=500)
    for job, note in ((t4, "no node type the autoscaler can add has T4 GPUs with 20 GiB "
                           "(min_gpu_memory_gb): the most is 15 GiB ('infer_t4')"),
                      (wide, "no node type the autoscaler can add has 500 CPUs for one worker "
                             "(cpus_per_worker): the most is 192 ('train_h100')")):
        core = core_with(cpu_node("cpu", cpus=16))
        core.node_types = aws_types
        refused = core.submit(job, "d", T0).decision
        assert isinstance(refused, Rejection) and note in refused.message, refused
    # Where a type has them, no such note.
    assert gpu_note(dataclasses.replace(t4, min_gpu_memory_gb=15), aws_types) is None
    assert cpu_note(dataclasses.replace(wide, cpus_per_worker=192), aws_types) is None
    # An 8-GPU worker of 100 CPUs: of the types with the GPUs, the A100's 96 fall short, but
    # the H100's 192 do not.
    eight = JobSpec("e", num_workers=1, gpus_per_worker=8, cpus_per_worker=100)
    assert cpu_note(eight, aws_types) is None
    assert "the most is 96 ('train_a100')" in cpu_note(
        dataclasses.replace(eight, accelerator_types=("A100",)), aws_types)


def test_a_job_placed_and_back_in_the_queue_before_a_pass_drops_its_old_request(aws_types):
    """Placed and preempted back into the queue with no maintenance pass between (nodes
    joining one after another kept scale_up_requests at None): its first stay's A100 request
    stood (kept by first submit time), though it now waits only for the H100 node it ran on,
    and the autoscaler added an A100 node for it."""
    core = core_with(cpu_node("cpu", cpus=16))
    core.node_types = aws_types
    y = JobSpec("y", num_workers=8, gpus_per_worker=1, accelerator_types=("A100", "H100"))
    core.submit(y, "dy", T0)
    asked = core.scale_up_requests(T0 + 1)
    assert len(asked) == 8 and "accelerator_type:A100" in asked[0]
    core.ray_nodes({"cpu", "h1"}, set(), T0 + 100)  # an H100 node joins (another job's)
    core.report(gpu_node("h1", gpus=8, family="H100", cpus=96), T0 + 100)
    assert isinstance(core.poll("y", "dy", T0 + 101).decision, Placement)
    z = JobSpec("z", num_workers=8, gpus_per_worker=1, accelerator_types=("H100",), priority=5)
    core.submit(z, "dz", T0 + 120)
    assert isinstance(core.yielded("y", "dy", T0 + 121).decision, Queued)
    assert core.scale_up_requests(T0 + 122) == []  # it waits for z on h1: nothing to add


def test_a_job_that_leaves_the_queue_while_a_node_has_not_reported_takes_its_request(
        aws_types):
    """Cancelled while a node that just joined had not reported: the whole last request stood
    (scale_up_requests said None) for up to suspect_after_s after the last node joined, the
    cancelled job's H100 node still asked for."""
    core = core_with(cpu_node("cpu", cpus=16), suspect_after_s=15.0)
    core.node_types = aws_types
    for name, family in (("a", "A100"), ("b", "H100")):
        core.submit(JobSpec(name, num_workers=8, gpus_per_worker=1,
                            accelerator_types=(family,)), "d", T0)
    asked = core.scale_up_requests(T0 + 1)
    assert len(asked) == 16
    core.ray_nodes({"cpu", "a1"}, set(), T0 + 100)  # joined, its agent not reporting yet
    assert core.scale_up_requests(T0 + 101) == asked  # a's and b's asks stand, not re-planned
    core.cancel("b", "d", T0 + 102)
    assert core.scale_up_requests(T0 + 103) == asked[:8]  # b's goes at once


def test_status_json_says_which_job_and_node_type_each_request_is_for(monkeypatch, aws_types):
    """`autoscaling.asked_for` was one flat list of bundles: an operator could not tell which
    job the cluster grew for, nor which node type."""
    import inspect
    import threading
    import time
    from types import SimpleNamespace

    import ray.autoscaler.sdk
    from ray_layer import scheduler_actor

    sent = []
    monkeypatch.setattr(ray.autoscaler.sdk, "request_resources",
                        lambda bundles: sent.append(bundles))
    actor_class = scheduler_actor.SchedulerActor.__ray_metadata__.modified_class
    actor = object.__new__(actor_class)
    actor.lock, actor.core = threading.RLock(), core_with(cpu_node("cpu", cpus=16))
    actor.core.node_types = aws_types
    actor.store = SimpleNamespace(save=lambda state: None)
    actor.throughput = SimpleNamespace(reference=None, rows=lambda: [], to_dict=lambda: {})
    actor._unsaved, actor._scale_up_asked, actor._autoscaling_problem = False, None, None
    actor._saved_at, actor._agent_silent_since = time.monotonic(), {}
    actor._agents_lock = threading.Lock()
    module = inspect.unwrap(actor_class.maintain).__globals__
    for name, value in (("record_all", lambda samples: None), ("wall_clock", lambda: T0 + 5),
                        ("_ray_nodes", lambda: ({"cpu"}, set(), set())),
                        ("_dead_drivers", lambda: set()), ("_ray_available", lambda: {})):
        monkeypatch.setitem(module, name, value)
    actor.core.submit(JobSpec("a", num_workers=8, gpus_per_worker=1,
                              accelerator_types=("A100",)), "d", T0)
    actor.core.submit(JobSpec("etl", num_workers=2, cpus_per_worker=12), "d", T0)
    actor.maintain()
    autoscaling = json.loads(json.dumps(actor.snapshot()["autoscaling"]))
    assert autoscaling["asked_for"] == sent[-1] and len(sent[-1]) == 10
    assert autoscaling["asked_by_job"] == [
        {"job": "a", "node_type": "train_a100", "nodes": 1, "workers": 8},
        {"job": "etl", "node_type": "cpu_worker", "nodes": 1, "workers": 2}]
    actor.core.cancel("a", "d", T0 + 6)
    actor.maintain()
    autoscaling = actor.snapshot()["autoscaling"]
    assert len(autoscaling["asked_for"]) == 2 and autoscaling["asked_by_job"] == [
        {"job": "etl", "node_type": "cpu_worker", "nodes": 1, "workers": 2}]
    # A saved state keeps it for a restart; one saved before it was kept has none
    saved = json.loads(json.dumps(actor.core.to_dict()))
    restored = SchedulerCore(actor.core.settings)
    assert not restored.restore(saved) and restored.scale_up_asked_by_job() == \
        autoscaling["asked_by_job"]
    del saved["nodes_asked"]["etl"]["node_types"]
    older = SchedulerCore(actor.core.settings)
    assert not older.restore(saved) and older.scale_up_asked_by_job() == []


def test_a_restarted_scheduler_keeps_a_job_waiting_for_new_nodes_when_nodes_report_at_once(
        aws_types):
    """The queue pass run at the first node's report, the others unknown, kept "the idle
    cluster may hold it" for that moment: at the last report of the same moment the job,
    still waiting for the autoscaler's node, was rejected as never fitting."""
    core = core_with(gpu_node("a1", gpus=8, family="A100", cpus=96), cpu_node("cpu", cpus=16))
    core.node_types = aws_types
    big = JobSpec("big", num_workers=16, gpus_per_worker=1, accelerator_types=("A100",))
    assert "autoscaler" in core.submit(big, "d", T0).decision.reason
    again = SchedulerCore(core.settings)
    again.node_types = aws_types
    assert again.restore(json.loads(json.dumps(core.to_dict()))) == []
    again.ray_nodes({"a1", "cpu"}, set(), T0 + 10)
    for report in (gpu_node("a1", gpus=8, family="A100", cpus=96), cpu_node("cpu", cpus=16)):
        again.report(report, T0 + 10)
    assert list(again.queue.waiting) == ["big"], again.queue.rejected
    assert len(again.scale_up_requests(T0 + 11)) == 16


def test_the_scale_up_clock_is_kept_across_scheduler_restarts(aws_types):
    """The clock a waiting job's scale_up_timeout_s counts from was not saved: each restart
    started it afresh, and a scheduler restarting every 300 s (a crash loop) let the job
    wait for ever (`since` was the last restart). A clock that cannot be read is named and
    skipped (the job waits, its clock started afresh); one from before the job's present
    stay in the queue (an earlier job of that name) is not inherited."""
    core = core_with(cpu_node("cpu", cpus=16), scale_up_timeout_s=600.0)
    core.node_types = aws_types
    spec = JobSpec("train", num_workers=8, gpus_per_worker=1, accelerator_types=("A100",))
    assert isinstance(core.submit(spec, "d", T0).decision, Queued)

    def restarted(saved, now):
        again = SchedulerCore(core.settings)
        again.node_types = aws_types
        problems = again.restore(json.loads(json.dumps(saved)))
        again.ray_nodes({"cpu"}, set(), now)
        again.report(cpu_node("cpu", cpus=16), now)
        again.tick(now + 1)
        return again, problems
    for t in (T0 + 300, T0 + 550):
        core, problems = restarted(core.to_dict(), t)
        assert problems == [] and core.awaiting_since == {"train": T0}
    core, _ = restarted(core.to_dict(), T0 + 650)
    gone = core.poll("train", "d", T0 + 652).decision
    assert isinstance(gone, Rejection) and "waited 650 s (scale_up_timeout_s)" in gone.message
    # An older state (no clock saved) restores as before; a bad clock is named, the job kept
    core = core_with(cpu_node("cpu", cpus=16), scale_up_timeout_s=600.0)
    core.node_types = aws_types
    core.submit(spec, "d", T0)
    saved = core.to_dict()
    assert saved["awaiting_since"] == {"train": T0}
    del saved["awaiting_since"]
    again, problems = restarted(saved, T0 + 300)
    assert problems == [] and again.awaiting_since == {"train": T0 + 300}
    saved["awaiting_since"] = {"train": "yesterday"}
    again, problems = restarted(saved, T0 + 300)
    assert problems == ["cannot restore the scale-up clock of 'train', skipping it: "
                        "'yesterday' is not a time (a number)"]
    assert list(again.queue.waiting) == ["train"] and again.awaiting_since == {"train": T0 + 300}
    saved["awaiting_since"] = {"train": T0 - 100}  # before its stay in the queue: not its own
    again, problems = restarted(saved, T0 + 300)
    assert problems == [] and again.awaiting_since == {"train": T0 + 300}


def test_a_saved_request_for_a_node_type_no_longer_in_the_config_is_named_and_dropped(
        aws_types):
    """The config changed across a restart (train_a100 renamed a100_new): the saved request
    for train_a100 was taken without a word and shown in status --json's asked_by_job until
    the next pass. It is named and dropped; the first pass asks for the type there now."""
    core = core_with(cpu_node("cpu", cpus=16))
    core.node_types = aws_types
    for name in ("a", "etl"):
        core.submit(JobSpec(name, num_workers=8, gpus_per_worker=1, accelerator_types=("A100",))
                    if name == "a" else JobSpec(name, num_workers=2, cpus_per_worker=12),
                    "d", T0)
    core.scale_up_requests(T0 + 1)
    saved = json.loads(json.dumps(core.to_dict()))
    renamed = tuple(dataclasses.replace(t, name="a100_new") if t.name == "train_a100" else t
                    for t in aws_types)
    again = SchedulerCore(core.settings)
    again.node_types = renamed
    assert again.restore(saved) == [
        "cannot restore the nodes asked for 'a', skipping them: node type 'train_a100' is not "
        "in the cluster's autoscaling config (changed since?): asked afresh at the next pass"]
    assert again.scale_up_asked_by_job() == [
        {"job": "etl", "node_type": "cpu_worker", "nodes": 1, "workers": 2}]
    again.ray_nodes({"cpu"}, set(), T0 + 10)
    again.report(cpu_node("cpu", cpus=16), T0 + 10)
    again.scale_up_requests(T0 + 11)
    assert [p["node_type"] for p in again.scale_up_asked_by_job()] == ["a100_new", "cpu_worker"]


def test_a_plan_beyond_the_cluster_max_with_worker_nodes_up_says_an_idle_node_must_go_first():
    """The cluster at max_workers 2, one idle T4 worker node up and a job needing 2 A100
    nodes: 2 x b were asked for and the job waited `add 2 x b`, though Ray adds 1 at most
    until the T4 node idles out (it counts every worker node up against max_workers). The
    head (the node the scheduler runs on) is no worker node."""
    core, big = _t4_up_a100_wanted()
    types = core.node_types
    waiting = core.submit(big, "d", T0).decision
    assert isinstance(waiting, Queued), waiting
    assert waiting.reason == (
        "waiting for the autoscaler to add 2 x b node(s): the cluster as it stands cannot hold "
        "it; the cluster has 1 worker node(s) up of its max_workers 2, so Ray adds 1 of them "
        "now (autoscaler v1; v2, ray up's default, none until all fit) and the rest only once "
        "idle worker node(s) go (its idle_timeout_minutes)")
    assert len(core.scale_up_requests(T0 + 1)) == 16  # (the whole shape, as before)
    # Room for both: said as before; the head unknown (not the live scheduler): as before
    for head, nodes in (("head", ("head",)), (None, ("head", "a1"))):
        core = core_with(*(cpu_node(n, cpus=8) if n == "head" else
                           gpu_node(n, gpus=4, family="T4") for n in nodes))
        core.node_types, core.head_node = types, head
        assert core.submit(big, "d", T0).decision.reason == (
            "waiting for the autoscaler to add 2 x b node(s): the cluster as it stands cannot "
            "hold it")
    # A job needing more nodes than max_workers at all is still refused at once
    core = core_with(cpu_node("head", cpus=8), gpu_node("a1", gpus=4, family="T4"))
    core.node_types, core.head_node = types, "head"
    huge = dataclasses.replace(big, num_workers=24)
    assert isinstance(core.submit(huge, "d", T0).decision, Rejection)


def _a100_h100_types(cluster_max):
    return node_types_from_config({"max_workers": cluster_max, "head_node_type": "head",
                                   "available_node_types": {
        "head": {"resources": {"CPU": 8}},
        "a100": {"resources": {"CPU": 96, "GPU": 8, "accelerator_type:A100": 1},
                 "max_workers": 2},
        "h100": {"resources": {"CPU": 96, "GPU": 8, "accelerator_type:H100": 1},
                 "max_workers": 2}}})


def _busy_h100_cluster(cluster_max):
    """The head and one H100 worker node up, running job 'busy'."""
    core = core_with(cpu_node("head", cpus=8), gpu_node("h1", gpus=8, family="H100"))
    core.node_types, core.head_node = _a100_h100_types(cluster_max), "head"
    busy = JobSpec("busy", num_workers=8, gpus_per_worker=1, accelerator_types=("H100",))
    assert isinstance(core.submit(busy, "d0", T0).decision, Placement)
    return core


def test_a_plan_beyond_the_room_busy_worker_nodes_leave_says_their_jobs_must_end():
    """Cluster max_workers 2, one H100 worker node up and busy, a job needing 2 A100 nodes:
    its reason said Ray adds the rest `once idle worker node(s) go`, though the only worker
    node up is busy and goes only once its job ends (the check counted no busy node of
    another type)."""
    core = _busy_h100_cluster(2)
    big = JobSpec("big", num_workers=16, gpus_per_worker=1, accelerator_types=("A100",))
    waiting = core.submit(big, "d", T0 + 1).decision
    assert isinstance(waiting, Queued), waiting
    assert waiting.reason == (
        "waiting for the autoscaler to add 2 x a100 node(s): the cluster as it stands cannot "
        "hold it; the cluster has 1 worker node(s) up of its max_workers 2, so Ray adds 1 of "
        "them now (autoscaler v1; v2, ray up's default, none until all fit) and the rest only "
        "once worker node(s) go, and 1 of them run jobs (h1: "
        "'busy'): they go only once those end (then idle for its idle_timeout_minutes)")


def test_the_busy_worker_nodes_a_reason_names_follow_the_reservations():
    """The busy worker nodes (from every reservation) are worked out once until the
    reservations change, not for each waiting job on each pass: a job that ends, or one
    placed, shows in the next reason."""
    core = _busy_h100_cluster(2)
    big = JobSpec("big", num_workers=16, gpus_per_worker=1, accelerator_types=("A100",))
    assert "run jobs (h1: 'busy')" in core.submit(big, "d", T0 + 1).decision.reason
    core.cancel("busy", "d0", T0 + 2)
    core.tick(T0 + 3)
    reason = core.poll("big", "d", T0 + 4).decision.reason
    assert "run jobs" not in reason and "once idle worker node(s) go" in reason, reason
    again = JobSpec("again", num_workers=8, gpus_per_worker=1, accelerator_types=("H100",))
    assert isinstance(core.submit(again, "d1", T0 + 5).decision, Placement)
    core.tick(T0 + 6)
    assert "run jobs (h1: 'again')" in core.poll("big", "d", T0 + 7).decision.reason


def test_a_scale_up_timeout_with_the_cluster_at_its_max_workers_says_so():
    """Cluster max_workers 1, its only worker node busy: the job needing an A100 node timed
    out saying `1 x a100 never joined (the autoscaler did not add it: its log, ...)`, not that
    Ray adds no node beyond max_workers, nor the figure to raise it to."""
    core = _busy_h100_cluster(1)
    job = JobSpec("a", num_workers=8, gpus_per_worker=1, accelerator_types=("A100",))
    assert isinstance(core.submit(job, "d", T0 + 1).decision, Queued)
    late = T0 + 1 + core.settings.scale_up_timeout_s + 10
    core.tick(late)
    refused = core.poll("a", "d", late + 1).decision
    assert isinstance(refused, Rejection), refused
    assert "its log" not in refused.message, refused.message
    assert ("1 x a100 never joined: the cluster has 1 worker node(s) up of its max_workers 1 "
            "(the cluster config's top-level max_workers), so Ray adds none of them (1 of the "
            "worker node(s) up run jobs: h1: 'busy'): raise it to 2, or submit the job again "
            "once those jobs end") in refused.message, refused.message


def test_a_scale_up_wait_with_room_under_max_workers_looks_at_no_busy_nodes():
    """The busy-node count behind a wait's room note (_nodes_that_may_go: every worker node
    up's GPU family, every reservation) ran for each job waiting for new nodes on each queue
    pass, the cluster's max_workers leaving room or not: 500 jobs submitted to 200 nodes took
    20 s, not 9 s. It runs only where the plan's nodes exceed the room, and the reason is
    unchanged."""
    core = _busy_h100_cluster(10)
    calls = []
    counted = core._nodes_that_may_go
    core._nodes_that_may_go = lambda *a: calls.append(a) or counted(*a)
    big = JobSpec("big", num_workers=16, gpus_per_worker=1, accelerator_types=("A100",))
    waiting = core.submit(big, "d", T0 + 1).decision
    core.tick(T0 + 2)
    assert waiting.reason == ("waiting for the autoscaler to add 2 x a100 node(s): the "
                              "cluster as it stands cannot hold it"), waiting
    assert calls == []
    late = T0 + 1 + core.settings.scale_up_timeout_s + 10
    core.tick(late)
    refused = core.poll("big", "d", late + 1).decision
    assert "its log" in refused.message and calls == [], refused.message


def _two_cpu_types(own=None):
    """CPU types `big` (8 CPUs, its memory stated, one node) and `small` (4 CPUs, two nodes),
    two worker nodes in all (`own`: type -> a resource of its own)."""
    own = own or {}
    resources = {"big": {"CPU": 8, "memory": 64 * 2 ** 30}, "small": {"CPU": 4}}
    return node_types_from_config({"max_workers": 2, "available_node_types": {
        name: {"resources": {**resources[name], **({own[name]: 1} if name in own else {})},
               "max_workers": 1 if name == "big" else 2} for name in ("big", "small")}})


def test_a_cpu_job_is_planned_across_types_only_where_each_declares_a_resource_to_steer_by():
    """A CPU job no one type holds was planned on 1 x big + 1 x small, asking for bundles of
    CPUs alone: Ray's autoscaler picks the types for them by its own scoring (2.60's
    get_nodes_for: a type stating memory scores low for bundles asking none), adds 2 x small
    for them, the cluster's max_workers, and one worker is never held."""
    job = JobSpec("etl", num_workers=5, cpus_per_worker=2)
    assert scale_up_parts(job, _two_cpu_types()) is None
    refused = _refused_on_a_cpu_node(job, _two_cpu_types())
    assert ("node types 'big', 'small' would hold it together, but a CPU job is planned across "
            "node types only where each declares a resource of its own to steer the "
            "autoscaler to it (none of them does: add one to each one's resources, e.g. "
            '"big": 1)') in refused.message, refused.message
    # Each declaring one: planned across them, each part's bundles steered to its type.
    types = _two_cpu_types({"big": "pool_big", "small": "pool_small"})
    big, small = types
    assert (big.own_resource, small.own_resource) == ("pool_big", "pool_small")
    core = core_with(cpu_node("cpu", cpus=1))
    core.node_types = types
    waiting = core.submit(job, "d", T0).decision
    assert isinstance(waiting, Queued) and "add 1 x big + 1 x small" in waiting.reason, waiting
    assert core.scale_up_requests(T0 + 1) == [{"CPU": 2.0, "pool_big": 0.001}] * 4 + \
        [{"CPU": 2.0, "pool_small": 0.001}]
    # A resource two types declare steers to neither: it is no type's own.
    shared = _two_cpu_types({"big": "pool", "small": "pool"})
    assert [t.own_resource for t in shared] == ["", ""]
    assert scale_up_parts(job, shared) is None
    # A GPU job's bundles are steered by accelerator_type, as before.
    gpu = JobSpec("g", num_workers=1, gpus_per_worker=1)
    eight = node_types_from_config({"available_node_types": {"g": {"resources": {
        "CPU": 8, "GPU": 8, "accelerator_type:A100": 1, "pool_g": 1}, "max_workers": 1}}})
    assert resource_bundles(gpu, eight[0]) == [{"CPU": 1.0, "GPU": 1,
                                                "accelerator_type:A100": 0.001}]


def test_a_busy_node_the_plan_keeps_is_not_named_among_those_that_must_go():
    """Cluster max_workers 2, an A100 node up running 'x' (the request keeps it: it holds
    half the job) and an H100 node up running 'y': the reason named both as nodes whose jobs
    must end for Ray to add the second A100 node; only the H100 node must go."""
    core = core_with(cpu_node("head", cpus=8), gpu_node("a1", gpus=8, family="A100"),
                     gpu_node("h1", gpus=8, family="H100"))
    core.node_types, core.head_node = _a100_h100_types(2), "head"
    for name, family in (("x", "A100"), ("y", "H100")):
        job = JobSpec(name, num_workers=8, gpus_per_worker=1, accelerator_types=(family,))
        assert isinstance(core.submit(job, "d0", T0).decision, Placement)
    big = JobSpec("big", num_workers=16, gpus_per_worker=1, accelerator_types=("A100",))
    waiting = core.submit(big, "d", T0 + 1).decision
    assert isinstance(waiting, Queued), waiting
    assert waiting.reason.endswith(
        "add 1 x a100 node(s): the cluster as it stands cannot hold it; the cluster has 2 "
        "worker node(s) up of its max_workers 2, so Ray adds 0 of them now and the rest only "
        "once worker node(s) go, and 1 of them run jobs (h1: 'y'): they go only once those "
        "end (then idle for its idle_timeout_minutes)"), waiting.reason


def _ray_adds(config, bundles, up=None):
    """The worker nodes Ray 2.60's v1 autoscaler adds for request_resources' `bundles` (its
    pure _add_min_workers_nodes, which fits them on the nodes up, `up`: type -> count, the
    head by default, then get_nodes_for), as {type: count}. Starts no Ray."""
    from functools import partial

    from ray.autoscaler._private import resource_demand_scheduler as ray_scheduler
    from ray.autoscaler._private.node_provider_availability_tracker import \
        NodeAvailabilitySummary
    head, cluster_max = config.get("head_node_type"), config.get("max_workers", 2)
    node_types = {name: {"resources": dict(t["resources"]), "min_workers": 0,
                         "max_workers": t.get("max_workers", 0 if name == head else cluster_max)}
                  for name, t in config["available_node_types"].items()}
    scorer = partial(ray_scheduler._default_utilization_scorer,
                     node_availability_summary=NodeAvailabilitySummary(node_availabilities={}))
    _, _, added = ray_scheduler._add_min_workers_nodes(
        [], dict(up or ({head: 1} if head else {})), node_types, cluster_max, head, bundles,
        scorer)
    return added


def _ray_v2_adds(config, bundles, up=None):
    """What Ray 2.60's autoscaler v2 (`ray up`'s default) adds for the same request: its
    pure ResourceDemandScheduler.schedule with `bundles` as the cluster resource constraint
    request_resources leaves, the nodes up (`up`, as for _ray_adds) pending with their type's
    resources, each type's max_workers as v2's config reads them (the head's type one more,
    for the head; the cluster's one more too). Starts no Ray."""
    from ray.autoscaler.v2.instance_manager.config import NodeTypeConfig
    from ray.autoscaler.v2.scheduler import ResourceDemandScheduler, SchedulingRequest
    from ray.autoscaler.v2.schema import AutoscalerInstance
    from ray.autoscaler.v2.utils import ResourceRequestUtil
    from ray.core.generated.autoscaler_pb2 import ClusterResourceConstraint
    from ray.core.generated.instance_manager_pb2 import Instance, NodeKind
    head, cluster_max = config.get("head_node_type"), config.get("max_workers", 2)
    configs = {name: NodeTypeConfig(
        name=name, min_worker_nodes=0, resources=dict(t["resources"]),
        max_worker_nodes=t.get("max_workers", 0 if name == head else cluster_max)
        + (name == head)) for name, t in config["available_node_types"].items()}
    instances = [AutoscalerInstance(im_instance=Instance(
        instance_id=f"{name}-{i}", instance_type=name, status=Instance.ALLOCATED,
        node_kind=NodeKind.HEAD if name == head and i == 0 else NodeKind.WORKER))
        for name, count in (up or ({head: 1} if head else {})).items() for i in range(count)]
    constraint = ClusterResourceConstraint(resource_requests=ResourceRequestUtil.group_by_count(
        [ResourceRequestUtil.make(bundle) for bundle in bundles]))
    reply = ResourceDemandScheduler().schedule(SchedulingRequest(
        disable_launch_config_check=True, node_type_configs=configs,
        max_num_nodes=cluster_max + 1, current_instances=instances,
        cluster_resource_constraints=[constraint]))
    return {launch.instance_type: launch.count for launch in reply.to_launch}


def _gpu_types_config(a=None, b=None, accelerator=None):
    """a: 8 GPUs (RAM stated, max_workers 1), b: 4 GPUs (max_workers 2), the cluster's
    max_workers 2; `a`/`b`: extra resources of each; `accelerator`: an accelerator_type
    resource both declare."""
    shared = {accelerator: 1} if accelerator else {}
    return {"max_workers": 2, "head_node_type": "head", "available_node_types": {
        "head": {"resources": {"CPU": 0}},
        "a": {"resources": {"CPU": 96, "GPU": 8, "memory": 512 * 2 ** 30, **shared, **(a or {})},
              "max_workers": 1},
        "b": {"resources": {"CPU": 8, "GPU": 4, **shared, **(b or {})}, "max_workers": 2}}}


def test_a_gpu_job_is_planned_across_types_only_where_each_has_a_resource_to_steer_by():
    """A GPU job naming no family, across types declaring no accelerator_type (or one both
    declare), was planned on 1 x a + 1 x b with bundles asking for GPUs alone: Ray's
    autoscaler, choosing types by its own scoring, adds 2 x b (the cluster's max_workers) and
    2 of the 10 workers are never held. Now it is refused naming the types and what to
    declare; declaring a resource of each type's own (or an accelerator_type no other type
    declares) steers each part's bundles to its type, and Ray adds the plan."""
    job = JobSpec("j", num_workers=10, gpus_per_worker=1)
    unsteered = _gpu_types_config()
    types = node_types_from_config(unsteered)
    assert _ray_adds(unsteered, plan_bundles(job, ((types[0], 1, 8), (types[1], 1, 2)))) == {
        "b": 2}  # (what the old plan's bundles got: 8 workers' room, not 10)
    for config in (unsteered, _gpu_types_config(accelerator="accelerator_type:A100")):
        assert scale_up_parts(job, node_types_from_config(config)) is None
        refused = _refused_on_a_cpu_node(job, node_types_from_config(config))
        assert ("node types 'a', 'b' would hold it together, but a GPU job is planned across "
                "node types only where each declares a resource of its own to steer the "
                "autoscaler to it (an accelerator_type no other type declares, or a custom one; "
                'none of them does: add one to each one\'s resources, e.g. "a": 1), or, '
                "steered by none, where any mix of the types its bundles fit that Ray's "
                "autoscaler may add holds it (types sharing one accelerator_type, say): a mix "
                "of these may hold too few workers") in refused.message, refused.message
    # The family job too: an accelerator_type two types declare steers to neither.
    a100 = dataclasses.replace(job, accelerator_types=("A100",))
    assert scale_up_parts(a100, node_types_from_config(
        _gpu_types_config(accelerator="accelerator_type:A100"))) is None
    for config, specs in (
            (_gpu_types_config({"pool_a": 1}, {"pool_b": 1}), (job,)),
            (_gpu_types_config({"accelerator_type:A100": 1}, {"accelerator_type:V100": 1}),
             (job,)),
            (_gpu_types_config({"pool_a": 1}, {"pool_b": 1}, accelerator="accelerator_type:A100"),
             (job, a100))):
        types = node_types_from_config(config)
        for spec in specs:
            plan = scale_up_parts(spec, types)
            assert [(t.name, n, w) for t, n, w in plan] == [("a", 1, 8), ("b", 1, 2)], config
            assert _ray_adds(config, plan_bundles(spec, plan)) == {"a": 1, "b": 1}, config
    core = core_with(cpu_node("cpu", cpus=1))
    core.node_types = node_types_from_config(_gpu_types_config({"pool_a": 1}, {"pool_b": 1}))
    waiting = core.submit(job, "d", T0).decision
    assert isinstance(waiting, Queued) and "add 1 x a + 1 x b" in waiting.reason, waiting
    assert core.scale_up_requests(T0 + 1) == [{"CPU": 1.0, "GPU": 1, "pool_a": 0.001}] * 8 + \
        [{"CPU": 1.0, "GPU": 1, "pool_b": 0.001}] * 2


def _refused_on_a_cpu_node(job: JobSpec, node_types) -> Rejection:
    """The job submitted to a scheduler of one 1-CPU node and these node types: refused."""
    core = core_with(cpu_node("cpu", cpus=1))
    core.node_types = node_types
    refused = core.submit(job, "d", T0).decision
    assert isinstance(refused, Rejection), refused
    return refused


def _refused_after_the_scale_up_timeout(job: JobSpec, node_types,
                                        autoscaler: str = "unknown") -> Rejection:
    """The job (named "j") queued for new nodes on a scheduler of a 1-CPU head and these node
    types (served by `autoscaler`), no node joining: its refusal once scale_up_timeout_s has
    passed."""
    core = core_with(cpu_node("head", cpus=1))
    core.node_types, core.head_node, core.autoscaler = node_types, "head", autoscaler
    assert isinstance(core.submit(job, "d", T0).decision, Queued)
    late = T0 + core.settings.scale_up_timeout_s + 10
    core.tick(late)
    refused = core.poll("j", "d", late + 1).decision
    assert isinstance(refused, Rejection), refused
    return refused


def test_every_multi_type_plan_is_what_rays_autoscaler_adds():
    """Over a grid of two-type configs (GPU and CPU types, RAM stated or not, steering
    resources or none), each plan across types, its bundles asked of Ray 2.60's own
    request_resources path, gets the plan's nodes: no other mix, from autoscaler v1 and v2
    (`ray up`'s default) alike; a plan of bundles steered by no resource of a type's own
    (_any_mix_holds), nodes holding all its workers."""
    import itertools
    checked = unsteered = 0
    for gpus_a, gpus_b, max_a, max_b, cluster_max, workers, ram, steer, gpu_job in \
            itertools.product((0, 8), (0, 4), (1, 2), (1, 2), (2, 3), (3, 7, 10, 13),
                              (False, True), ("", "pool", "accelerator"), (False, True)):
        if gpu_job and not (gpus_a and gpus_b):
            continue
        def resources(name, cpus, gpus):
            own = {} if not steer else {f"pool_{name}": 1} if steer == "pool" else \
                {f"accelerator_type:{name.upper()}100": 1} if gpus else {f"pool_{name}": 1}
            return {"CPU": cpus, "GPU": gpus, **own,
                    **({"memory": 256 * 2 ** 30} if ram and name == "a" else {})}
        config = {"max_workers": cluster_max, "head_node_type": "head",
                  "available_node_types": {"head": {"resources": {"CPU": 0}},
                      "a": {"resources": resources("a", 32, gpus_a), "max_workers": max_a},
                      "b": {"resources": resources("b", 8, gpus_b), "max_workers": max_b}}}
        spec = JobSpec("j", num_workers=workers, gpus_per_worker=1 if gpu_job else 0,
                       cpus_per_worker=1 if gpu_job else 4)
        plan = scale_up_parts(spec, node_types_from_config(config))
        if plan is None or len(plan) < 2:
            continue
        checked += 1
        steered = all(steering_resource(spec, t) for t, _, _ in plan)
        unsteered += not steered
        for adds in (_ray_adds, _ray_v2_adds):
            added = adds(config, plan_bundles(spec, plan))
            if steered:
                assert added == {t.name: n for t, n, _ in plan}, (adds, config, spec)
            else:
                per_node = {t.name: t.workers_per_node(spec) for t, _, _ in plan}
                assert sum(n * per_node.get(name, 0) for name, n in added.items()) >= \
                    workers, (adds, config, spec, added)
    assert checked >= 20 and unsteered >= 5


def _g5_config(cluster_max=24):
    """AWS g5.12xlarge (4 A10G) and g5.48xlarge (8 A10G), both with accelerator_type:A10G and
    memory, as Ray's AWS node provider fills them in (fillout_available_node_types_resources
    names an instance's GPUs so) in the head's bootstrap config."""
    def g5(cpus, gpus, ram_gib, max_workers):
        return {"resources": {"CPU": cpus, "GPU": gpus, "accelerator_type:A10G": 1,
                              "memory": int(ram_gib * 0.7 * 2 ** 30)},
                "labels": {"orchestrator.io/accelerator-type": "A10G",
                           "orchestrator.io/accelerator-memory-gb": "22"},
                "max_workers": max_workers}
    return {"max_workers": cluster_max, "head_node_type": "head", "available_node_types": {
        "head": {"resources": {"CPU": 8}}, "g5_12": g5(48, 4, 192, 4),
        "g5_48": g5(192, 8, 768, 2)}}


def test_a_gpu_job_across_two_sizes_of_one_gpu_is_planned_where_any_mix_ray_adds_holds_it():
    """Two g5 sizes both declare accelerator_type:A10G (Ray's AWS provider names both so):
    24 workers of 1 GPU were refused (`would hold it together, but ... none of them does`),
    though any mix Ray's autoscaler may add for the bundles, within the types' max_workers
    and the cluster's, holds them all (it added 2 x g5_48 + 2 x g5_12, the plan). Where a
    mix may hold fewer (the cluster's max_workers 4: 4 x g5_12 hold 16), still refused."""
    job = JobSpec("j", num_workers=24, gpus_per_worker=1, accelerator_types=("A10G",))
    config = _g5_config()
    plan = scale_up_parts(job, node_types_from_config(config))
    assert plan is not None and [(t.name, n) for t, n, _ in plan] == [("g5_48", 2), ("g5_12", 2)]
    assert _ray_adds(config, plan_bundles(job, plan)) == {"g5_48": 2, "g5_12": 2}
    assert scale_up_parts(job, node_types_from_config(_g5_config(cluster_max=4))) is None


def _two_a100_types_config(own=False):
    """p4d (A100 of 40 GiB) and p4de (A100 of 80 GiB), both declaring accelerator_type:A100
    (Ray names both so); `own`: each a resource of its own too."""
    def a100(memory, cpus, name):
        return {"resources": {"CPU": cpus, "GPU": 8, "accelerator_type:A100": 1,
                              **({f"pool_{name}": 1} if own else {})},
                "labels": {"orchestrator.io/accelerator-type": "A100",
                           "orchestrator.io/accelerator-memory-gb": str(memory)},
                "max_workers": 2}
    return {"max_workers": 4, "head_node_type": "head", "available_node_types": {
        "head": {"resources": {"CPU": 0}}, "p4d": a100(40, 96, "p4d"),
        "p4de": a100(80, 128, "p4de")}}


def test_a_job_asking_gpu_memory_is_not_planned_on_a_type_whose_bundles_ray_may_fit_on_less():
    """A job of 8 A100 workers asking 60 GiB each was planned on 1 x p4de (80 GiB), its
    bundles asking for GPUs and accelerator_type:A100: p4d (40 GiB) declares that too, and
    Ray 2.60's autoscaler, which sees no GPU memory, added 1 x p4d, where the job never fits.
    Now refused naming the types and what to declare; with a resource of p4de's own its
    bundles reach p4de alone."""
    job = JobSpec("j", num_workers=8, gpus_per_worker=1, accelerator_types=("A100",),
                  min_gpu_memory_gb=60)
    unsteered = _two_a100_types_config()
    assert scale_up_parts(job, node_types_from_config(unsteered)) is None
    refused = _refused_on_a_cpu_node(job, node_types_from_config(unsteered))
    assert ("node type 'p4de' would hold it, but its workers' bundles (GPUs, "
            "accelerator_type:A100) fit node type 'p4d' too, whose GPUs have less memory than "
            "min_gpu_memory_gb 60, or declare none (Ray's autoscaler sees no GPU memory): give "
            "'p4de' a resource of its own in its resources, e.g. \"p4de\": 1") in refused.message, refused.message
    steered = _two_a100_types_config(own=True)
    plan = scale_up_parts(job, node_types_from_config(steered))
    assert [(t.name, n) for t, n, _ in plan] == [("p4de", 1)]
    assert _ray_adds(steered, plan_bundles(job, plan)) == {"p4de": 1}
    # Where every type the bundles fit holds a worker, nothing changes: 40 GiB asked.
    fits_both = dataclasses.replace(job, min_gpu_memory_gb=40)
    assert scale_up_parts(fits_both, node_types_from_config(unsteered)) is not None


def test_the_short_gpus_note_tells_the_max_workers_the_type_holding_it_is_short_of():
    """24 A100 workers asking 60 GiB: p4de (80 GiB, max_workers 2) would hold them only with 3
    nodes. The note said p4de "would hold it" and asked for a resource of its own alone (no
    max_workers note: max_workers_note passes the type over as short_gpus_note does), and
    declaring that still got a refusal. It now says both what to declare and the figure."""
    job = JobSpec("j", num_workers=24, gpus_per_worker=1, accelerator_types=("A100",),
                  min_gpu_memory_gb=60)
    refused = _refused_on_a_cpu_node(job, node_types_from_config(_two_a100_types_config()))
    assert ("node type 'p4de' would hold it with 3 node(s) in all (any up included), but node "
            "type 'p4de' has max_workers 2: raise it to 3; and its workers' bundles (GPUs, "
            "accelerator_type:A100) fit node type 'p4d' too") in refused.message, refused.message
    assert "would hold it, but" not in refused.message, refused.message
    # Declared and raised, as the note says: planned.
    config = _two_a100_types_config(own=True)
    config["available_node_types"]["p4de"]["max_workers"] = 3
    plan = scale_up_parts(job, node_types_from_config(config))
    assert [(t.name, n) for t, n, _ in plan] == [("p4de", 3)]


def test_nodes_up_count_toward_bundles_steered_by_a_resource_of_their_types_own():
    """A 10-GPU job across a (8 GPUs) and b (4 GPUs), each steered by a resource of its own,
    beside a b node up: Ray counts that node toward b's bundles (it fits them on the nodes
    up by their type's resources) and adds only 1 x a. The scheduler could not tell a
    node's type, counted none, and said `add 1 x a + 1 x b` (and, at 14 workers, that Ray
    adds 2 of 3 now). The agent now reports the node's custom resources; from an agent that
    reports none, Ray's ray.io/node-group label names its type."""
    config = {**_gpu_types_config({"pool_a": 1}, {"pool_b": 1}), "max_workers": 3}
    for up in (dataclasses.replace(gpu_node("b1", gpus=4, family="T4", cpus=8),
                                   custom_resources={"pool_b": 1.0}),
               dataclasses.replace(gpu_node("b1", gpus=4, family="T4", cpus=8),
                                   labels={"ray.io/node-group": "b"})):
        for workers, said, ray_adds in ((10, "add 1 x a node(s)", {"a": 1}),
                                        (14, "add 1 x a + 1 x b node(s)", {"a": 1, "b": 1})):
            core = core_with(cpu_node("head", cpus=1), up)
            core.node_types, core.head_node = node_types_from_config(config), "head"
            waiting = core.submit(JobSpec("j", num_workers=workers, gpus_per_worker=1), "d",
                                  T0).decision
            assert isinstance(waiting, Queued) and said in waiting.reason, waiting
            assert "Ray adds" not in waiting.reason, waiting.reason
            bundles = core.scale_up_requests(T0 + 1)
            assert _ray_adds(config, bundles, {"head": 1, "b": 1}) == ray_adds
    # A node of a's type (its resource) does not count toward b's bundles.
    core = core_with(cpu_node("head", cpus=1), dataclasses.replace(
        gpu_node("b1", gpus=4, family="T4", cpus=8), custom_resources={"pool_a": 1.0}))
    core.node_types, core.head_node = node_types_from_config(config), "head"
    waiting = core.submit(JobSpec("j", num_workers=10, gpus_per_worker=1), "d", T0).decision
    assert "add 1 x a + 1 x b node(s)" in waiting.reason, waiting
    # An older agent's report (unpickled without the field) is taken, its resources not
    # known; a saved silent report keeps them, and one saved before reads as not known.
    from orchestrator.inventory import report_problem, saved_silent_report
    old = cpu_node("o")
    del old.__dict__["custom_resources"]
    assert report_problem(old) is None and old.custom_resources is None
    saved = dataclasses.asdict(dataclasses.replace(old, custom_resources={"pool_b": 1.0}))
    assert saved_silent_report("o", {"last_seen": 1.0, "report": saved})[0].custom_resources \
        == {"pool_b": 1.0}
    del saved["custom_resources"]
    assert saved_silent_report("o", {"last_seen": 1.0, "report": saved})[0].custom_resources \
        is None


def _cpu_pair_config(own=False):
    """big (32 CPUs, its memory stated) and small (8 CPUs), one node each: a CPU job's bundles
    planned on big ({"CPU": 1}) fit small too (`own`: each a resource of its own)."""
    def extra(name):
        return {f"pool_{name}": 1} if own else {}
    return {"max_workers": 2, "head_node_type": "head", "available_node_types": {
        "head": {"resources": {"CPU": 0}},
        "big": {"resources": {"CPU": 32, "memory": 256 * 2 ** 30, **extra("big")},
                "max_workers": 1},
        "small": {"resources": {"CPU": 8, **extra("small")}, "max_workers": 1}}}


def test_node_types_ray_cannot_tell_apart_are_named_at_load_and_in_a_timed_out_wait(
        monkeypatch, tmp_path, caplog):
    """A job planned on one type (1 x big) whose bundles fit another type (small) as Ray's
    autoscaler counts them: Ray, picking types by its own scoring, added 1 x small. Nothing
    said so: the config read silently and the job timed out blaming the autoscaler's log.
    Now the config's note names the types and what to declare (status --json's
    autoscaling.config_note, logged once when the config is read), and so does the timed-out
    job's reason; the shipped configs and types with resources of their own have none."""
    from orchestrator.autoscaling import autoscaling_summary, untold_types_note
    config = _cpu_pair_config()
    job = JobSpec("j", num_workers=1, cpus_per_worker=4)
    plan = scale_up_parts(job, node_types_from_config(config))
    assert [(t.name, n) for t, n, _ in plan] == [("big", 1)]
    assert _ray_adds(config, plan_bundles(job, plan)) == {"small": 1}  # (not the plan's)
    note = ("node types 'big', 'small' cannot be told apart by Ray's resources (bundles "
            "planned on 'big' fit 'small' too, and those on 'small' fit 'big': amounts aside, "
            "the CPU, GPU and accelerator_type they ask for), and Ray's autoscaler picks the "
            "type for bundles by its own scoring, so it may add another type than a job's plan "
            "names (or, autoscaler v2, none, where its pick leaves some bundles unheld): give each a resource of its own in its resources, e.g. \"big\": 1")
    types = node_types_from_config(config)
    assert untold_types_note(types) == note
    assert autoscaling_summary(types)["config_note"] == note
    for fine in (_cpu_pair_config(own=True), _gpu_types_config({"pool_a": 1}, {"pool_b": 1}),
                 yaml.safe_load((ROOT / "cluster.yaml").read_text()),
                 yaml.safe_load((ROOT / "cluster.local.yaml").read_text())):
        assert untold_types_note(node_types_from_config(fine)) is None, fine
    import inspect
    import logging

    from ray_layer import scheduler_actor
    path = tmp_path / "ray_bootstrap_config.yaml"
    path.write_text(yaml.safe_dump(config))
    read = inspect.unwrap(scheduler_actor._autoscaler_node_types)
    monkeypatch.setitem(read.__globals__, "_autoscaling_config_path", lambda: path)
    with caplog.at_level(logging.WARNING, logger=scheduler_actor.__name__):
        assert read() == (types, None)
    assert [r.getMessage() for r in caplog.records] == [f"autoscaling config {path}: {note}"]
    refused = _refused_after_the_scale_up_timeout(job, types)
    assert ("node type 'big' cannot be told apart from 'small' by Ray's resources: its "
            "bundles fit that type too, and Ray's autoscaler may have added it instead (or, "
            "autoscaler v2, none, where its pick leaves some bundles unheld) (give "
            "'big' a resource of its own in its resources, e.g. \"big\": 1)") \
        in refused.message, refused.message


def test_what_ray_adds_now_is_said_for_autoscaler_v2_too():
    """Ray 2.60's `ray up` runs autoscaler v2, which adds a request_resources request's nodes
    only once all of them fit (v1 adds those that fit). With the cluster at max_workers 2 and
    an idle T4 node up, a job needing 2 x b waited saying `Ray adds 1 of them now`: v1 does,
    v2 adds none until the T4 node idles out. And bundles Ray cannot tell apart may get no
    node from v2 rather than another type. The reasons and the config note now say so."""
    from orchestrator.autoscaling import untold_types_note
    config = {"max_workers": 2, "head_node_type": "head", "available_node_types": {
        "head": {"resources": {"CPU": 8}},
        "a": {"resources": {"CPU": 16, "GPU": 4, "accelerator_type:T4": 1}, "max_workers": 2},
        "b": {"resources": {"CPU": 96, "GPU": 8, "accelerator_type:A100": 1},
              "max_workers": 2}}}
    big = JobSpec("big", num_workers=16, gpus_per_worker=1, accelerator_types=("A100",))
    types = node_types_from_config(config)
    bundles = plan_bundles(big, scale_up_parts(big, types))
    assert _ray_adds(config, bundles, {"head": 1, "a": 1}) == {"b": 1}
    assert _ray_v2_adds(config, bundles, {"head": 1, "a": 1}) == {}
    assert _ray_v2_adds(config, bundles) == _ray_adds(config, bundles) == {"b": 2}
    core = core_with(cpu_node("head", cpus=8), gpu_node("a1", gpus=4, family="T4"))
    core.node_types, core.head_node = types, "head"
    waiting = core.submit(big, "d", T0).decision
    assert isinstance(waiting, Queued), waiting
    assert waiting.reason.endswith(
        "the cluster has 1 worker node(s) up of its max_workers 2, so Ray adds 1 of them now "
        "(autoscaler v1; v2, ray up's default, none until all fit) and the rest only once idle "
        "worker node(s) go (its idle_timeout_minutes)"), waiting.reason
    # Types Ray cannot tell apart: v1 adds 2 x small for 7 workers planned on 1 x big, v2 none
    pair = _cpu_pair_config()
    pair["available_node_types"]["small"]["max_workers"] = 2
    job = JobSpec("j", num_workers=7, cpus_per_worker=4)
    plan = scale_up_parts(job, node_types_from_config(pair))
    assert [(t.name, n) for t, n, _ in plan] == [("big", 1)]
    assert _ray_adds(pair, plan_bundles(job, plan)) == {"small": 2}
    assert _ray_v2_adds(pair, plan_bundles(job, plan)) == {}
    assert "may add another type than a job's plan names (or, autoscaler v2, none, where its " \
        "pick leaves some bundles unheld)" in untold_types_note(node_types_from_config(pair))
    refused = _refused_after_the_scale_up_timeout(job, node_types_from_config(pair))
    assert ("Ray's autoscaler may have added it instead (or, autoscaler v2, none, where its "
            "pick leaves some bundles unheld)") in refused.message, refused.message


def _t4_up_a100_wanted():
    """A scheduler of the head and an idle T4 worker node up under the cluster's max_workers
    2, and a job needing 2 x b (A100) nodes: Ray has room for 1 of them now."""
    types = node_types_from_config({"max_workers": 2, "head_node_type": "head",
                                    "available_node_types": {
        "head": {"resources": {"CPU": 8}},
        "a": {"resources": {"CPU": 16, "GPU": 4, "accelerator_type:T4": 1}, "max_workers": 2},
        "b": {"resources": {"CPU": 96, "GPU": 8, "accelerator_type:A100": 1},
              "max_workers": 2}}})
    core = core_with(cpu_node("head", cpus=8), gpu_node("a1", gpus=4, family="T4"))
    core.node_types, core.head_node = types, "head"
    return core, JobSpec("big", num_workers=16, gpus_per_worker=1, accelerator_types=("A100",))


def test_the_scale_up_notes_name_only_the_autoscaler_that_runs():
    """The live scheduler now knows which of Ray's autoscalers serves the cluster (Ray's GCS
    flag, ray_layer): its reasons named both, `Ray adds 1 of them now (autoscaler v1; v2,
    ray up's default, none until all fit)`, even where v1 runs (a head started by `ray start
    --autoscaling-config`, the fake_multinode test's), leaving the operator to find out
    which. Known, they say what that one does; "unknown" (tests, the simulator) names both."""
    from orchestrator.autoscaling import autoscaling_summary, untold_types_note
    room = ("the cluster has 1 worker node(s) up of its max_workers 2, so Ray adds {} and the "
            "rest only once idle worker node(s) go (its idle_timeout_minutes)")
    for autoscaler, adds in (
            ("v1", "1 of them now"),
            ("v2", "0 of them now (autoscaler v2 adds a request's nodes only once all fit)"),
            ("unknown", "1 of them now (autoscaler v1; v2, ray up's default, none until all "
                        "fit)")):
        core, big = _t4_up_a100_wanted()
        core.autoscaler = autoscaler
        waiting = core.submit(big, "d", T0).decision
        assert isinstance(waiting, Queued), waiting
        assert waiting.reason.endswith(room.format(adds)), (autoscaler, waiting.reason)
    pair = node_types_from_config(_cpu_pair_config())
    job = JobSpec("j", num_workers=1, cpus_per_worker=4)
    for autoscaler, unheld in (
            ("v1", ""),
            ("v2", " (or, as autoscaler v2 does, none where its pick leaves some bundles "
                   "unheld)"),
            ("unknown", " (or, autoscaler v2, none, where its pick leaves some bundles "
                        "unheld)")):
        note = untold_types_note(pair, autoscaler)
        assert f"may add another type than a job's plan names{unheld}: give each" in note, note
        assert autoscaling_summary(pair, autoscaler)["config_note"] == note
        assert autoscaling_summary(pair, autoscaler)["autoscaler"] == autoscaler
        refused = _refused_after_the_scale_up_timeout(job, pair, autoscaler).message
        assert f"may have added it instead{unheld} (give 'big'" in refused, (autoscaler, refused)


def test_a_timed_out_wait_at_the_cluster_max_names_only_the_autoscaler_that_runs():
    """cluster_max_note, the timed-out job's reason where the worker nodes up leave Ray room
    for fewer nodes than its plan adds, said `Ray adds 1 of them (autoscaler v1; v2, ...)`
    whichever ran."""
    from orchestrator.autoscaling import cluster_max_note, scale_up_parts
    core, big = _t4_up_a100_wanted()
    plan = scale_up_parts(big, core.node_types)
    for autoscaler, adds in (
            ("v1", "1 of them"),
            ("v2", "none of them (autoscaler v2 adds a request's nodes only once all fit)"),
            ("unknown", "1 of them (autoscaler v1; v2, ray up's default, none until all fit)")):
        assert cluster_max_note(plan, 1, {}, autoscaler) == (
            "2 x b never joined: the cluster has 1 worker node(s) up of its max_workers 2 (the "
            "cluster config's top-level max_workers), so Ray adds "
            f"{adds}: raise it to 3"), autoscaler


def test_an_autoscaler_neither_v1_v2_nor_unknown_is_refused_naming_the_field():
    from orchestrator.autoscaling import untold_types_note
    with pytest.raises(ValueError, match="^autoscaler must be 'v1', 'v2' or 'unknown', not "
                                         "'V2'$"):
        untold_types_note(node_types_from_config(_cpu_pair_config()), "V2")


def test_the_live_scheduler_reads_which_autoscaler_runs_from_rays_gcs(monkeypatch):
    """ray_layer asks Ray's GCS (the flag Ray's head picks its autoscaler's entrypoint by),
    not the scheduler's own RAY_enable_autoscaler_v2, which is_autoscaler_v2 without
    fetch_from_server answers from (and caches); unreadable: "unknown", both named."""
    import ray.autoscaler.v2.utils as v2_utils

    from ray_layer import scheduler_actor
    asked = []

    def flag(value):
        def is_autoscaler_v2(fetch_from_server=False, gcs_client=None):
            asked.append(fetch_from_server)
            if isinstance(value, Exception):
                raise value
            return value
        return is_autoscaler_v2
    for value, expected in ((True, "v2"), (False, "v1"),
                            (AssertionError("GCS client is not available"), "unknown")):
        monkeypatch.setattr(v2_utils, "is_autoscaler_v2", flag(value))
        assert scheduler_actor._running_autoscaler() == expected
    assert asked == [True, True, True]
