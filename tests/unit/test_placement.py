import dataclasses

import numpy as np
import pytest

from orchestrator.config import ACCELERATOR_SPEED, ConfigError, JobSpec
from orchestrator.inventory import GIB, ClusterState, GpuInfo, NodeReport, Reservation
from orchestrator.placement import (PlacementError, bottleneck_gbps, place, worker_capacity,
                                    workers_by_count)

from nodes import NOW, cluster, node


def test_single_node_job_goes_to_the_tightest_fitting_node():
    state = cluster(node("big", cpus=64), node("small", cpus=4), node("mid", cpus=16))
    placement = place(JobSpec("j", num_workers=4), state, NOW)
    assert placement.worker_nodes == ("small",) * 4
    assert "not needed" in placement.node_reasons["big"]


def test_job_too_big_for_one_node_spans_the_fewest_nodes_best_fitting_the_rest():
    state = cluster(node("a", cpus=2), node("b", cpus=8), node("c", cpus=4))
    placement = place(JobSpec("j", num_workers=10), state, NOW)
    # 8 on the largest node; the remaining 2 fill node a exactly instead of breaking into c.
    assert placement.worker_nodes == ("b",) * 8 + ("a",) * 2
    placement = place(JobSpec("j", num_workers=13), state, NOW)
    assert sorted(placement.nodes) == ["a", "b", "c"]


def test_a_job_name_cannot_be_placed_twice():
    state = cluster(node("a", cpus=8))
    state.reserve("j", place(JobSpec("j", num_workers=1), state, NOW).reservations())
    with pytest.raises(PlacementError, match="already holds a reservation"):
        place(JobSpec("j", num_workers=1), state, NOW)


def test_reservations_of_dead_drivers_are_reclaimed():
    state = cluster(node("a", cpus=2))
    state.reserve("crashed", place(JobSpec("crashed", num_workers=2), state, NOW,
                                   owner="job-1").reservations())
    state.reserve("unknown-owner", ())
    assert state.reserved_on("a") == (2, 0)
    assert state.release_orphans({"job-1", "job-9"}) == ["crashed"]
    assert state.reserved_on("a") == (0, 0) and "unknown-owner" in state.reservations


def test_load_breaks_ties():
    state = cluster(node("busy", cpus=4, load=3.0), node("idle", cpus=4, load=0.1))
    assert place(JobSpec("j", num_workers=2), state, NOW).nodes == ["idle"]


def test_gpu_memory_and_count_filter_nodes_with_reasons():
    state = cluster(node("cpu-only", cpus=32), node("full", gpus=8, gpu_free_gb=4.0),
                    node("free", gpus=4, gpu_free_gb=70.0))
    placement = place(JobSpec("j", num_workers=2, gpus_per_worker=1, min_gpu_memory_gb=40),
                      state, NOW)
    assert placement.nodes == ["free"]
    assert "no GPUs" in placement.node_reasons["cpu-only"]
    assert "40 GiB free" in placement.node_reasons["full"]


def test_stale_node_is_excluded():
    state = cluster(node("fresh", cpus=2))
    state.update(node("silent", cpus=64), now=NOW - 120)
    placement = place(JobSpec("j", num_workers=2), state, NOW)
    assert placement.nodes == ["fresh"]
    assert "no heartbeat for 120s" in placement.node_reasons["silent"]


def test_reservations_prevent_double_booking():
    state = cluster(node("a", gpus=4), node("b", gpus=4))
    first = place(JobSpec("first", num_workers=4, gpus_per_worker=1), state, NOW)
    state.reserve("first", first.reservations())
    second = place(JobSpec("second", num_workers=4, gpus_per_worker=1), state, NOW)
    assert set(first.nodes).isdisjoint(second.nodes)
    state.reserve("second", second.reservations())
    with pytest.raises(PlacementError, match="room for 0 worker"):
        place(JobSpec("third", num_workers=1, gpus_per_worker=1), state, NOW)
    assert state.release("first")
    assert place(JobSpec("third", num_workers=1, gpus_per_worker=1), state, NOW).nodes == first.nodes


def test_unplaceable_job_explains_every_factor():
    state = cluster(node("a", cpus=2), node("b", cpus=2))
    with pytest.raises(PlacementError) as e:
        place(JobSpec("huge", num_workers=8, cpus_per_worker=1), state, NOW)
    message = str(e.value)
    assert "8 worker(s) x (1 CPU) = 8 CPUs" in message
    assert "room for 4 worker(s)" in message and "4 CPUs" in message


def test_empty_cluster_says_no_agents_reported():
    with pytest.raises(PlacementError, match="no node has reported"):
        place(JobSpec("j"), ClusterState(), NOW)


def test_label_selectors_pin_each_worker():
    state = cluster(node("a", cpus=1), node("b", cpus=1))
    placement = place(JobSpec("j", num_workers=2), state, NOW)
    assert placement.label_selectors() == [{"ray.io/node-id": "a"}, {"ray.io/node-id": "b"}]


def test_gpus_busy_with_a_reserved_job_are_not_subtracted_twice():
    # 4 GPUs, 2 reserved and busy (no free memory): 2 remain, not 0.
    report = node("a", gpus=4)
    busy = tuple(g if g.index >= 2 else GpuInfo(g.index, g.name, g.memory_total_bytes, 0,
                                                source="declared") for g in report.gpus)
    state = cluster(NodeReport(**{**report.__dict__, "gpus": busy}))
    state.reserve("running", [Reservation("running", "a", 2, 2)])
    spec = JobSpec("j", num_workers=2, gpus_per_worker=1, min_gpu_memory_gb=40)
    assert place(spec, state, NOW).worker_nodes == ("a", "a")


def test_a_node_whose_gpu_probe_failed_says_so():
    report = node("a", cpus=8)
    state = cluster(NodeReport(**{**report.__dict__, "ray_gpus": 8,
                                  "probe_errors": {"nvml": "NVMLError: driver mismatch"}}))
    with pytest.raises(PlacementError, match="driver mismatch"):
        place(JobSpec("j", gpus_per_worker=1), state, NOW)


def in_group(report, group, gbps):
    return NodeReport(**{**report.__dict__, "labels": {
        "orchestrator.io/network-group": group, "orchestrator.io/network-gbps": str(gbps)}})


def typed(report, gpu_name):
    gpus = tuple(GpuInfo(g.index, gpu_name, g.memory_total_bytes, g.memory_free_bytes,
                         source="declared") for g in report.gpus)
    return NodeReport(**{**report.__dict__, "gpus": gpus})


def test_accelerator_type_filter():
    state = cluster(typed(node("t4", gpus=4, gpu_free_gb=15), "T4"),
                    typed(node("a100", gpus=8), "NVIDIA A100-SXM4-80GB"))
    spec = JobSpec("j", num_workers=2, gpus_per_worker=1, accelerator_types=("A100",))
    placement = place(spec, state, NOW)
    assert placement.nodes == ["a100"]
    assert "T4 (T4) is not one of A100" in placement.node_reasons["t4"]


def test_multi_node_job_stays_in_the_best_connected_group():
    state = cluster(*[in_group(node(f"slow{i}", gpus=8), "rack-slow", 12.5) for i in range(2)],
                    *[in_group(node(f"fast{i}", gpus=8), "rack-fast", 50) for i in range(3)])
    placement = place(JobSpec("j", num_workers=16, gpus_per_worker=1), state, NOW)
    assert set(placement.nodes) <= {"fast0", "fast1", "fast2"} and len(placement.nodes) == 2
    assert placement.bottleneck_gbps == 50


def test_bandwidth_floor_is_met_between_every_pair_or_the_job_waits():
    state = cluster(*[in_group(node(f"r{i}", gpus=8), f"rack{i}", 50) for i in range(2)])
    # Two racks of one node each: crossing them costs the 1.25 GB/s inter-group link.
    spec = JobSpec("j", num_workers=16, gpus_per_worker=1, min_bandwidth_gbps=10)
    with pytest.raises(PlacementError, match=">= 10 GB/s between every pair"):
        place(spec, state, NOW)
    ok = place(JobSpec("j", num_workers=16, gpus_per_worker=1, min_bandwidth_gbps=1), state, NOW)
    assert ok.bottleneck_gbps == 1.25


def test_measured_bandwidth_fills_in_where_nothing_is_declared():
    a, b, c = node("a", gpus=8), node("b", gpus=8), node("c", gpus=8)
    a = NodeReport(**{**a.__dict__, "bandwidth_gbps": {"b": 3.0, "c": 0.5}})
    b = NodeReport(**{**b.__dict__, "bandwidth_gbps": {"a": 2.5}})
    state = cluster(a, b, c)
    assert state.pair_bandwidth_gbps("a", "b") == 2.5  # the slower direction
    assert state.pair_bandwidth_gbps("b", "c") == state.inter_group_gbps  # never measured
    placement = place(JobSpec("j", num_workers=16, gpus_per_worker=1, min_bandwidth_gbps=2),
                      state, NOW)
    assert sorted(placement.nodes) == ["a", "b"] and placement.bottleneck_gbps == 2.5


def test_a_declared_tier_wins_over_object_store_measurements():
    a, b = (in_group(node(n, gpus=8), "rack", 50) for n in ("a", "b"))
    state = cluster(NodeReport(**{**a.__dict__, "bandwidth_gbps": {"b": 0.3}}), b)
    assert state.pair_bandwidth_gbps("a", "b") == 50


def test_single_node_placement_has_no_network_bottleneck():
    placement = place(JobSpec("j", num_workers=2), cluster(node("a", cpus=4)), NOW)
    assert placement.bottleneck_gbps == float("inf")


def test_a_job_that_fits_once_others_release_says_so():
    state = cluster(node("a", cpus=2))
    state.reserve("first", place(JobSpec("first", num_workers=2), state, NOW).reservations())
    with pytest.raises(PlacementError) as waiting:
        place(JobSpec("second", num_workers=2), state, NOW)
    assert waiting.value.rejection.fits_when_free
    assert "fits once running jobs (or Ray work outside the scheduler" in str(waiting.value)
    with pytest.raises(PlacementError) as never:
        place(JobSpec("huge", num_workers=3), state, NOW)
    assert not never.value.rejection.fits_when_free


def test_overloaded_nodes_are_filtered_when_a_limit_is_set():
    state = cluster(node("busy", cpus=8, load=40.0), node("calm", cpus=8, load=1.0))
    state.max_load_per_cpu = 2.0
    placement = place(JobSpec("j", num_workers=2), state, NOW)
    assert placement.nodes == ["calm"]
    assert placement.node_reasons["busy"] == "overloaded: load 5.00 per CPU > 2"


def test_an_unmeetable_bandwidth_floor_is_rejected_not_queued():
    state = cluster(node("a", gpus=8), node("b", gpus=8))  # no group: 1.25 GB/s between them
    with pytest.raises(PlacementError) as e:
        place(JobSpec("j", num_workers=16, gpus_per_worker=1, min_bandwidth_gbps=25), state, NOW)
    assert not e.value.rejection.fits_when_free


def test_a_memory_floor_blocked_by_busy_gpus_waits_rather_than_fails():
    busy = node("a", gpus=8, gpu_free_gb=10)  # a running job uses 70 of each GPU's 80 GiB
    state = cluster(busy)
    state.reserve("running", [Reservation("running", "a", 8, 8)])
    with pytest.raises(PlacementError) as e:
        place(JobSpec("j", gpus_per_worker=1, min_gpu_memory_gb=40), state, NOW)
    assert e.value.rejection.fits_when_free


def test_a_tiny_cpu_request_is_refused_not_overflowed():
    with pytest.raises(ConfigError, match="cpus_per_worker"):
        JobSpec("j", cpus_per_worker=1e-300)


def test_gpu_jobs_prefer_faster_accelerators_cpu_jobs_avoid_gpu_nodes():
    state = cluster(typed(node("k80", cpus=8, gpus=4), "Tesla K80"),
                    typed(node("v100", cpus=8, gpus=8), "Tesla V100-SXM2-32GB"),
                    node("cpu", cpus=8))
    # Best fit alone would pick the 4-GPU K80 node; the V100 is ~4x faster.
    assert place(JobSpec("g", gpus_per_worker=1), state, NOW).nodes == ["v100"]
    assert place(JobSpec("c", num_workers=2), state, NOW).nodes == ["cpu"]


# -- bandwidth steers the choice ---------------------------------------------------------------

def measured(report, **gbps):
    return NodeReport(**{**report.__dict__, "bandwidth_gbps": gbps})


@pytest.mark.parametrize("order", ["abc", "acb", "cab", "cba"])
def test_a_two_node_job_takes_the_faster_measured_link_whatever_the_table_order(order):
    # a-b measured 2.5 GB/s, a-c 0.5 GB/s, b-c never measured (inter_group_gbps, 1.25): no
    # floor, so only the search for the best link keeps the job off a+c.
    reports = {"a": measured(node("a", gpus=8), b=2.5, c=0.5), "b": node("b", gpus=8),
               "c": node("c", gpus=8)}
    state = cluster(*(reports[n] for n in order))
    placement = place(JobSpec("j", num_workers=16, gpus_per_worker=1), state, NOW)
    assert sorted(placement.nodes) == ["a", "b"] and placement.bottleneck_gbps == 2.5


def test_bandwidth_beats_raw_capacity_order():
    # Capacity order alone would start on a 6-GPU node; the two 4-GPU nodes share a 20 GB/s
    # link, the big ones only a 0.5 GB/s one (and the default 1.25 to the small ones).
    state = cluster(measured(node("big1", gpus=6), big2=0.5), node("big2", gpus=6),
                    measured(node("small1", gpus=4), small2=20.0), node("small2", gpus=4))
    placement = place(JobSpec("j", num_workers=8, gpus_per_worker=1), state, NOW)
    assert sorted(placement.nodes) == ["small1", "small2"] and placement.bottleneck_gbps == 20


def test_as_well_connected_sets_prefer_fewer_nodes():
    # From s, the fastest links lead to two 2-GPU nodes; c (8 GPUs) is slower to s but every
    # link in {s, a, b, c} is >= 15 GB/s, so s + c holds the 12 workers at 15 GB/s on 2 nodes
    # where pure maximin growth from s would use all 4. (z, the largest node, has no fast link.)
    state = cluster(measured(node("s", gpus=4), a=20.0, b=19.0, c=15.0),
                    measured(node("a", gpus=2), b=20.0, c=15.0),
                    measured(node("b", gpus=2), c=15.0), node("c", gpus=8),
                    node("z", cpus=16, gpus=10))
    placement = place(JobSpec("j", num_workers=12, gpus_per_worker=1), state, NOW)
    assert sorted(placement.nodes) == ["c", "s"] and placement.bottleneck_gbps == 15


def test_the_floor_is_met_by_the_best_set_found():
    # Two racks declared at 50 GB/s; the job needs both nodes of one rack.
    state = cluster(*[in_group(node(f"r{i}n{j}", gpus=8), f"rack{i}", 50)
                      for i in range(2) for j in range(2)])
    placement = place(JobSpec("j", num_workers=16, gpus_per_worker=1, min_bandwidth_gbps=40),
                      state, NOW)
    assert placement.bottleneck_gbps == 50
    assert placement.nodes[0][:2] == placement.nodes[1][:2]  # one rack


def test_a_floor_above_the_best_set_says_what_was_searched():
    state = cluster(measured(node("a", gpus=8), b=2.5, c=0.5), node("b", gpus=8),
                    node("c", gpus=8))
    with pytest.raises(PlacementError) as e:
        place(JobSpec("j", num_workers=16, gpus_per_worker=1, min_bandwidth_gbps=3), state, NOW)
    headline = str(e.value).splitlines()[0]
    assert ">= 3 GB/s between every pair" in headline
    assert "the best, 2 node(s), has 2.5 GB/s" in headline
    assert "seed node(s)" in headline and not e.value.rejection.fits_when_free


def test_a_set_meeting_the_floor_is_found_where_the_fastest_links_dead_end():
    # From a, the fastest link leads to b (1 GPU): the maximin growth then needs a third
    # node at 1.25 GB/s; from c likewise through d. a + c hold the job at 8 GB/s: refusing it
    # as never fitting (it was, and not queued) would be wrong.
    state = cluster(measured(node("a", gpus=4), b=20.0, c=8.0), node("b", gpus=1),
                    measured(node("c", gpus=4), d=12.5), node("d", gpus=1))
    placement = place(JobSpec("j", num_workers=8, gpus_per_worker=1, min_bandwidth_gbps=2),
                      state, NOW)
    assert sorted(placement.nodes) == ["a", "c"] and placement.bottleneck_gbps == 8


def test_a_cpu_job_uses_a_gpu_node_when_only_it_meets_the_floor():
    # The GPU-less nodes hold the 6 workers only across a 1.25 GB/s link; the GPU node alone
    # holds them with no network at all. Refused before (confined to the GPU-less nodes).
    state = cluster(node("cpu-1", cpus=4), node("cpu-2", cpus=4), node("gpu-1", cpus=32, gpus=4))
    placement = place(JobSpec("j", num_workers=6, min_bandwidth_gbps=5), state, NOW)
    assert placement.nodes == ["gpu-1"]
    # Without a floor the GPU-less nodes are still preferred.
    assert sorted(place(JobSpec("j", num_workers=6), state, NOW).nodes) == ["cpu-1", "cpu-2"]


# -- bottleneck_gbps: the one bandwidth figure of a node set -----------------------------------

def test_bottleneck_uses_measured_pairs_not_group_representatives():
    # One declared rack (no bandwidth declared) whose members measured each other: the slow
    # pair is c-d, which a one-representative-per-group shortcut would never look at.
    rack = [in_group(node(n, gpus=8), "rack", 0) for n in "abcd"]
    rack[0] = measured(rack[0], b=20.0, c=20.0, d=20.0)
    rack[1] = measured(rack[1], c=20.0, d=20.0)
    rack[2] = measured(rack[2], d=0.7)
    state = cluster(*rack)
    assert bottleneck_gbps(state, ["a", "b", "c", "d"]) == 0.7
    assert bottleneck_gbps(state, ["a", "b", "c"]) == 20
    assert bottleneck_gbps(state, ["a"]) == float("inf")


def test_bottleneck_without_measurements_takes_the_lower_declared_figure():
    state = cluster(in_group(node("a"), "rack", 50), in_group(node("b"), "rack", 50),
                    in_group(node("c"), "rack", 12.5), in_group(node("d"), "other", 50))
    assert bottleneck_gbps(state, ["a", "b"]) == 50
    assert bottleneck_gbps(state, ["a", "b", "c"]) == 12.5
    assert bottleneck_gbps(state, ["a", "d"]) == state.inter_group_gbps


# -- GPUs a job must not get ----------------------------------------------------------------

def test_excluded_gpus_do_not_count_for_that_call():
    state = cluster(node("a", gpus=4), node("b", gpus=2))
    spec = JobSpec("j", num_workers=4, gpus_per_worker=1)
    assert list(worker_capacity(spec, state, NOW)) == [4, 2]
    excluded = frozenset({("a", 0), ("a", 3), ("b", 7), ("ghost", 0)})  # b has no GPU 7
    assert list(worker_capacity(spec, state, NOW, excluded_gpus=excluded)) == [2, 2]
    assert place(spec, state, NOW).nodes == ["a"]
    placement = place(spec, state, NOW, excluded_gpus=excluded)
    assert sorted(placement.nodes) == ["a", "b"]


def test_an_excluded_gpu_that_already_lacked_memory_is_not_subtracted_twice():
    report = node("a", gpus=4)
    gpus = tuple(g if g.index else GpuInfo(0, g.name, g.memory_total_bytes, 0, source="declared")
                 for g in report.gpus)  # GPU 0 full
    state = cluster(NodeReport(**{**report.__dict__, "gpus": gpus}))
    spec = JobSpec("j", num_workers=1, gpus_per_worker=1, min_gpu_memory_gb=40)
    assert worker_capacity(spec, state, NOW, excluded_gpus=frozenset({("a", 0)}))[0] == 3
    assert worker_capacity(spec, state, NOW, excluded_gpus=frozenset({("a", 1)}))[0] == 2


def test_a_rejection_names_gpus_excluded_for_the_job():
    state = cluster(node("a", gpus=1))
    with pytest.raises(PlacementError, match="1 excluded for this job"):
        place(JobSpec("j", gpus_per_worker=1), state, NOW, excluded_gpus=frozenset({("a", 0)}))


def test_links_follow_new_measurements_and_late_peers():
    # a measures b before b has ever reported; later a re-measures b slower, then stops.
    state = cluster(measured(node("a"), b=20.0))
    state.update(node("b"), now=NOW)
    assert bottleneck_gbps(state, ["a", "b"]) == 20
    state.update(measured(node("a"), b=0.5), now=NOW)
    assert bottleneck_gbps(state, ["a", "b"]) == 0.5
    state.update(node("a"), now=NOW)
    assert bottleneck_gbps(state, ["a", "b"]) == state.inter_group_gbps


def test_a_cpu_job_stays_off_gpu_nodes_while_others_hold_it_whatever_the_links():
    # The GPU nodes share a 25 GB/s link, the CPU-only ones nothing measured (1.25 GB/s):
    # bandwidth alone would send the CPU job to the GPU nodes, whose CPUs feed GPU work.
    state = cluster(measured(node("g1", cpus=8, gpus=8), g2=25.0), node("g2", cpus=8, gpus=8),
                    node("c1", cpus=8), node("c2", cpus=8))
    assert sorted(place(JobSpec("j", num_workers=16), state, NOW).nodes) == ["c1", "c2"]
    assert sorted(place(JobSpec("big", num_workers=24), state, NOW).nodes)[:2] == ["c1", "c2"]


@pytest.mark.parametrize("held, gpus, whole_free", [(0.5, 1, 0), (2.5, 3, 0), (1.5, 3, 1)])
def test_a_gpu_partly_held_outside_the_scheduler_is_not_handed_to_a_worker(held, gpus,
                                                                           whole_free):
    # A Serve replica on half a GPU: Ray cannot start a whole-GPU worker on that GPU
    # (rounding 0.5 -> 0 and 2.5 -> 2 handed it out).
    state = cluster(node("g", cpus=16, gpus=gpus))
    state.set_ray_usage("g", used_cpus=1.0, used_gpus=held)
    assert state.outside_on("g")[1] == gpus - whole_free
    fits = JobSpec("fits", num_workers=whole_free, gpus_per_worker=1) if whole_free else None
    if fits:
        assert place(fits, state, NOW).worker_nodes == ("g",) * whole_free
    with pytest.raises(PlacementError):
        place(JobSpec("over", num_workers=whole_free + 1, gpus_per_worker=1), state, NOW)


def test_a_node_with_two_gpu_families_takes_only_jobs_naming_none():
    # Ray hands a worker any of the node's GPUs: an A100-only job may get the T4. Filed under
    # its first GPU's family, the node took T4-only jobs.
    gpus = (GpuInfo(0, "Tesla T4", 16 * GIB, 15 * GIB),
            GpuInfo(1, "NVIDIA A100-SXM4-80GB", 80 * GIB, 79 * GIB))
    state = cluster(NodeReport("mixed", "mixed", 16, 2, 16, 0.0, 64 * GIB, 32 * GIB, gpus))
    for named in (("T4",), ("A100",), ("T4", "A100")):
        with pytest.raises(PlacementError) as e:
            place(JobSpec("j", num_workers=1, gpus_per_worker=1, accelerator_types=named),
                  state, NOW)
        assert "GPUs of several families (A100, T4): Ray may hand a worker any" in str(e.value)
    assert place(JobSpec("any", num_workers=2, gpus_per_worker=1), state, NOW).worker_nodes \
        == ("mixed", "mixed")
    # Its pace is the slower family's.
    assert state.table.speed[state.table.index["mixed"]] == ACCELERATOR_SPEED["T4"]


def test_a_node_whose_gpus_ray_does_not_schedule_says_so():
    # GPUs seen (NVML or labels) but `ray start` without --num-gpus: "0 free (0 reserved)"
    # did not say why.
    report = NodeReport("g", "g", 16, 0, 16, 0.0, 64 * GIB, 32 * GIB,
                        (GpuInfo(0, "Tesla T4", 16 * GIB, 15 * GIB),) * 4)
    with pytest.raises(PlacementError) as e:
        place(JobSpec("j", num_workers=1, gpus_per_worker=1), cluster(report), NOW)
    assert "Ray schedules 0 GPU(s) on this node, which has 4" in str(e.value)
    assert "--num-gpus=4" in str(e.value)
    # Ray schedules all 4: a job wanting 8 per worker is told about GPUs, not Ray's setup.
    with pytest.raises(PlacementError) as e:
        place(JobSpec("j", num_workers=1, gpus_per_worker=8),
              cluster(dataclasses.replace(report, ray_gpus=4)), NOW)
    assert "Ray schedules" not in str(e.value)


def test_a_placement_says_whether_its_gpus_were_measured_and_nccl_needs_them(monkeypatch):
    # A CUDA build of torch has NCCL without any GPU: label-declared GPUs (a machine modelling
    # a GPU cluster) got it, and ProcessGroupNCCL refused to start with no GPU found.
    import dataclasses

    import torch.distributed as dist

    from ray_layer.launch import collective_backend

    declared = node("d", gpus=2)  # (nodes.py declares its GPUs)
    measured = NodeReport(**{**node("m", gpus=2).__dict__, "gpus": tuple(
        dataclasses.replace(g, source="nvml") for g in node("m", gpus=2).gpus)})
    spec = JobSpec("j", num_workers=2, gpus_per_worker=1)
    on_declared = place(spec, cluster(declared), NOW)
    on_measured = place(spec, cluster(measured), NOW)
    assert (on_declared.gpus_measured, on_measured.gpus_measured) == (False, True)
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)  # a CUDA build's answer
    assert collective_backend(on_declared) == "gloo"
    assert collective_backend(on_measured) == "nccl"


def test_workers_by_count_answers_alike_for_one_node_and_for_many():
    # One node's plain numbers take Python's arithmetic (the head's plan, node by node), a
    # table's columns numpy's: the same count either way, rounding at the edges included.
    cpus = [0.0, 0.29999999999999993, 0.3, 0.9, 3.0, 7.5, 12.0, 64.0]
    gpus = [0, 1, 2, 3, 4, 8, 8, 8]
    for spec in (JobSpec("c", cpus_per_worker=0.1), JobSpec("g", gpus_per_worker=2,
                                                             cpus_per_worker=1.5)):
        many = workers_by_count(spec, np.array(cpus), np.array(gpus))
        assert [workers_by_count(spec, c, g) for c, g in zip(cpus, gpus)] == many.tolist()


def test_a_trial_rejection_decides_alike_without_reasons_or_verdict(monkeypatch):
    # 4 GPUs held on b: a 3 x 1-GPU job fits only once they are freed (the verdict is what
    # keeps it waiting rather than failing), and one needing a GPU-less worker never fits.
    from orchestrator import placement
    state = cluster(node("a", gpus=2), node("b", gpus=4))
    state.reserve("held", [Reservation("held", "b", 4, 4)])
    for spec, verdict in ((JobSpec("j", num_workers=3, gpus_per_worker=1), True),
                          (JobSpec("j", num_workers=9, gpus_per_worker=1), False)):
        with pytest.raises(PlacementError) as full:
            place(spec, state, NOW)
        assert full.value.rejection.fits_when_free is verdict
        assert ("it fits once running jobs" in full.value.rejection.message) is verdict
        assert set(full.value.rejection.node_reasons) == {"a", "b"}
        with pytest.raises(PlacementError) as headline:
            place(spec, state, NOW, reasons=False)
        assert headline.value.rejection.node_reasons == {}
        assert headline.value.rejection.message == \
            full.value.rejection.message.splitlines()[0]
        assert headline.value.rejection.fits_when_free is verdict
        # A trial rejects alike, computing neither the verdict (a _choose on the idle
        # cluster) nor any reason
        calls = []
        monkeypatch.setattr(placement, "_choose", lambda *a: calls.append(a) or None)
        monkeypatch.setattr(placement, "_node_reason", lambda *a: calls.append(a) or "")
        with pytest.raises(PlacementError) as trial:
            place(spec, state, NOW, trial=True)
        monkeypatch.undo()
        assert calls == []
        assert trial.value.rejection.node_reasons == {}
        assert "\n" not in trial.value.rejection.message
    fits = JobSpec("k", num_workers=2)  # a placement is the same, reasons included
    assert place(fits, state, NOW, trial=True) == place(fits, state, NOW)


def test_a_mig_board_with_no_slices_takes_no_gpu_job():
    # The probe reports a MIG-enabled board with no slices created as measured with 0 bytes
    # (nothing CUDA can run on); a job stating no GPU memory fitted on it (0 >= 0) and was
    # placed there. A declared GPU without a memory label (0 GiB too) still takes one.
    empty = tuple(GpuInfo(i, "NVIDIA A100-SXM4-80GB MIG (no instances)", 0, 0, source="nvml")
                  for i in range(2))
    mig = NodeReport(**{**node("mig", gpus=2).__dict__, "gpus": empty})
    spec = JobSpec("j", num_workers=1, gpus_per_worker=1)
    with pytest.raises(PlacementError) as refused:
        place(spec, cluster(mig), NOW)
    assert not refused.value.rejection.fits_when_free
    reason = refused.value.rejection.node_reasons["mig"]
    assert "0 free" in reason and "2 with MIG on and no slices" in reason, reason
    assert worker_capacity(spec, cluster(mig), NOW, ignore_reservations=True).tolist() == [0]
    declared = node("declared", gpus=2, gpu_free_gb=0, gpu_total_gb=0)
    assert place(spec, cluster(mig, declared), NOW).nodes == ["declared"]
