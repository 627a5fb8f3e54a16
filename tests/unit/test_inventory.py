import pytest

from orchestrator.config import JobSpec
from orchestrator.inventory import DEAD, HEALTHY, SUSPECT, ClusterState, accelerator_family
from orchestrator.placement import place
from nodes import node


def state_with(*reports, now=0.0):
    state = ClusterState(suspect_after_s=15, dead_after_s=60)
    for r in reports:
        state.update(r, now)
    return state


def test_missed_heartbeats_make_a_node_suspect_then_dead():
    state = state_with(node("a"))
    assert state.health("a", now=10) == HEALTHY
    assert state.health("a", now=20) == SUSPECT
    assert state.health("a", now=61) == DEAD
    assert "suspect: no heartbeat for 20s (limit 15s)" == state.health_reason("a", now=20)


def test_a_dead_node_loses_its_reservations_and_a_report_revives_it():
    state = state_with(node("a", cpus=4), node("b", cpus=4))
    job = place(JobSpec("j", num_workers=6), state, 0.0)
    state.reserve("j", job.reservations())
    state.update(node("b", cpus=4), now=50)  # b keeps reporting, a goes silent
    assert state.expire(now=30) == ([], [])  # a is only suspect: reservations kept
    assert state.reserved_on("a") == (4, 0)
    assert state.expire(now=61) == (["a"], ["j"])
    assert state.reserved_on("a") == (0, 0) and state.reserved_on("b") == (2, 0)
    state.update(node("a", cpus=4), now=62)
    assert state.health("a", now=62) == HEALTHY
    # Only its heartbeat was gone: j's workers may still run there, so j holds it again
    # rather than the node being handed out twice.
    assert state.reserved_on("a") == (4, 0)


def test_a_released_job_is_not_revived_with_its_silent_node():
    state = state_with(node("a", cpus=4))
    state.reserve("j", place(JobSpec("j", num_workers=2), state, 0.0).reservations())
    state.expire(now=61)
    state.release("j")
    state.update(node("a", cpus=4), now=62)
    assert state.reserved_on("a") == (0, 0)


def test_pair_bandwidth_trusts_the_lower_of_two_disagreeing_labels():
    from orchestrator.inventory import LABEL_NETWORK_GBPS, LABEL_NETWORK_GROUP, NodeReport

    def labelled(name, gbps):
        return NodeReport(**{**node(name).__dict__, "labels": {
            LABEL_NETWORK_GROUP: "rack", LABEL_NETWORK_GBPS: str(gbps)}})
    state = state_with(labelled("a", 50), labelled("b", 5))
    assert state.pair_bandwidth_gbps("a", "b") == state.pair_bandwidth_gbps("b", "a") == 5


def test_ray_reporting_a_node_gone_marks_it_dead_at_once():
    state = state_with(node("a", cpus=4))
    state.reserve("j", place(JobSpec("j", num_workers=2), state, 0.0).reservations())
    assert state.mark_dead("a") == ["j"]
    assert state.health("a", now=1) == DEAD and state.reserved_on("a") == (0, 0)


def test_reservations_survive_a_round_trip_without_double_counting():
    state = state_with(node("a", cpus=8))
    state.reserve("j", place(JobSpec("j", num_workers=3, cpus_per_worker=2), state,
                             0.0, owner="01000000").reservations())
    saved = state.reservations_to_dict()
    restored = ClusterState()
    restored.restore_reservations(saved)  # before the node re-reports...
    restored.update(node("a", cpus=8), now=0)  # ...and after
    assert restored.reserved_on("a") == (6, 0)
    restored.restore_reservations(saved)  # restoring twice must not double-count
    assert restored.reserved_on("a") == (6, 0)
    assert restored.reservations["j"][0].owner == "01000000"


@pytest.mark.parametrize("name, family", [
    ("NVIDIA A100-SXM4-80GB", "A100"), ("NVIDIA A10G", "A10G"), ("Tesla T4", "T4"),
    ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA L4", "L4"), ("Some NPU v2", "NPU"),
    ("Mystery Accelerator", ""),
    # Whole tokens only: these matched a shorter family by substring.
    ("NVIDIA L40", "L40"), ("NVIDIA L40S", "L40S"), ("NVIDIA GH200 480GB", "GH200"),
    ("NVIDIA H200", "H200"), ("AMD Instinct MI300X", "MI300X"), ("a100", "A100"),
    # Aliases: a vendor's near-identical part is one family.
    ("AMD Instinct MI250X", "MI250"), ("Tesla V100S-PCIE-32GB", "V100"),
    ("Tesla K80", "K80"), ("Tesla P100-PCIE-16GB", "P100"), ("NVIDIA B200", "B200"),
])
def test_accelerator_family(name, family):
    assert accelerator_family(name) == family


def test_a_node_dead_by_silence_is_not_said_to_be_gone_by_ray():
    # The operator was pointed at Ray for what was a quiet agent.
    state = state_with(node("a"), node("b"))
    state.expire(now=61)
    assert state.health_reason("a", now=61) == "dead: no heartbeat for 61s (limit 60s)"
    state.mark_dead("b")
    assert state.health_reason("b", now=61) == "dead: Ray reports the node gone"
    state.update(node("a"), now=62)  # it reports again: alive, and dead later for silence
    assert state.health_reason("a", now=62) is None


def test_a_report_lacking_a_field_is_refused_before_anything_of_it_is_stored():
    # An agent of an older version pickled a NodeReport without bandwidth_gbps: it was
    # stored, then failed half-way (the node was called healthy, its restored reservations
    # were never counted, and its capacity could be handed out twice).
    from orchestrator.inventory import report_problem

    old = node("a", gpus=1)
    object.__delattr__(old, "bandwidth_gbps")
    object.__delattr__(old.gpus[0], "memory_free_bytes")
    problem = report_problem(old)
    assert problem and "bandwidth_gbps" in problem and "gpus[0].memory_free_bytes" in problem
    assert "another version" in problem
    assert report_problem(node("a", gpus=1)) is None


@pytest.mark.parametrize("measured, words", [
    ({"b": float("inf")}, "bandwidth_gbps['b'] is inf"),  # a job spanned a slow link on it
    ({"b": float("nan")}, "bandwidth_gbps['b'] is nan"),
    ({"b": -5.0}, "bandwidth_gbps['b'] is -5.0"),
    ({"b": "fast"}, "bandwidth_gbps['b'] is 'fast'"),  # failed every placement near it
    ({"b": True}, "bandwidth_gbps['b'] is True"),
])
def test_a_report_with_a_bandwidth_that_is_not_one_is_refused(measured, words):
    import dataclasses

    from orchestrator.inventory import report_problem
    problem = report_problem(dataclasses.replace(node("a"), bandwidth_gbps=measured))
    assert problem and problem.startswith(words), problem
    assert report_problem(dataclasses.replace(node("a"), bandwidth_gbps={"b": 12.5})) is None


def test_a_gpu_reporting_more_free_memory_than_it_holds_is_refused():
    from orchestrator.inventory import report_problem
    problem = report_problem(node("a", gpus=2, gpu_free_gb=90.0, gpu_total_gb=80))
    assert problem and "more free than it holds" in problem


def test_a_report_with_an_int_past_floats_range_is_refused_not_raised():
    # A figure of 400 digits (a saved state edited by hand; JSON holds any number of them):
    # math.isfinite raised OverflowError from report_problem and gpu_memory_problem, where
    # validation.is_number, which they now use, says it is no number.
    import dataclasses

    from orchestrator.inventory import GIB, GpuInfo, gpu_memory_problem, report_problem
    huge = 10 ** 400
    assert report_problem(dataclasses.replace(node("a"), ram_total_bytes=huge)) == (
        f"ram_total_bytes is {huge!r}: not a finite number >= 0")
    gpu = GpuInfo(0, "A100", huge, 0)
    assert report_problem(dataclasses.replace(node("a", gpus=1), gpus=(gpu,))).startswith(
        f"gpus[0]: its memory reads 0 bytes free of {huge}: not finite numbers >= 0")
    assert gpu_memory_problem(huge, 80 * GIB).startswith(f"its memory reads {huge} bytes")
    assert report_problem(dataclasses.replace(node("a"), bandwidth_gbps={"b": huge})) == (
        f"bandwidth_gbps['b'] is {huge!r:.40}: not a finite number > 0")


def test_forgetting_nodes_closes_up_the_table_and_keeps_every_row_as_its_node_left_it():
    import dataclasses

    import numpy as np

    from orchestrator.inventory import LABEL_NETWORK_GBPS, LABEL_NETWORK_GROUP, Reservation

    rack = {LABEL_NETWORK_GROUP: "rack", LABEL_NETWORK_GBPS: "25"}
    reports = [dataclasses.replace(node("a", gpus=2), labels=rack),
               dataclasses.replace(node("b"), bandwidth_gbps={"d": 3.0}),  # own group
               dataclasses.replace(node("c", gpus=4), labels=rack),
               dataclasses.replace(node("d"), bandwidth_gbps={"b": 2.0, "a": 5.0}),
               node("e")]
    state = state_with(*reports)
    state.reserve("j", [Reservation("j", "c", 2.0, 2, memory_gb=3.0),
                        Reservation("j", "d", 1.0, 0, memory_gb=1.5)])
    state.mark_suspect("e", "probe failed")
    state.mark_dead("b")
    state.forget({"b"})
    # the same as a table that never knew b
    fresh = state_with(*[r for r in reports if r.node_id != "b"])
    fresh.reserve("j", state.reservations["j"])
    fresh.mark_suspect("e", "probe failed")
    t, f = state.table, fresh.table
    assert t.ids == ["a", "c", "d", "e"] and t.index == {"a": 0, "c": 1, "d": 2, "e": 3}
    assert "b" not in state.reports and "b" not in state.dead and "node:b" not in t.groups
    # every per-row column (found, not listed: a column added later is checked too), the
    # group codes aside (never reused)
    columns = [name for name, value in vars(t).items() if isinstance(value, np.ndarray)
               and value.shape[:1] == t.cpus.shape and name != "group"]
    assert {"cpus", "reserved_memory_gib", "gpu_free_gib"} <= set(columns)
    for name in columns:
        assert np.array_equal(getattr(t, name)[:4], getattr(f, name)[:4]), name
    for a in "acde":
        for b in "acde":
            if a != b:
                assert state.pair_bandwidth_gbps(a, b) == fresh.pair_bandwidth_gbps(a, b)
    assert t.measuring == {t.index["a"], t.index["d"]}  # (d still names b: kept, unused)
    # a node joining later takes a clean row and a group code of its own
    state.update(node("f"), 1.0)
    row = t.index["f"]
    assert row == 4 and state.reserved_on("f") == (0.0, 0) and not t.suspect[row]
    assert t.group[row] not in t.group[:row]
    state.release("j")
    assert state.reserved_on("c") == (0.0, 0) and state.reserved_on("d") == (0.0, 0)
