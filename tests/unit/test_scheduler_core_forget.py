"""The core forgets nodes dead past a retention that nothing refers to: on a long-lived
autoscaling cluster every node that ever joined stayed in the reports, the node table and the
saved state, and made each pass slower."""
import json

from orchestrator import metric_catalogue as m
from orchestrator.config import JobSpec
from orchestrator.inventory import GIB, GpuInfo, NodeReport, Reservation
from orchestrator.placement import Placement
from orchestrator.scheduler_core import DEAD_NODE_RETENTION_S, SchedulerCore
from orchestrator.scheduler_types import SchedulerSettings

T0 = 1_000.0


def gpu_node(node_id, gpus=4):
    return NodeReport(node_id=node_id, hostname=node_id, ray_cpus=16, ray_gpus=gpus,
                      cpu_count=16, load_avg_1m=0.0, ram_total_bytes=64 * GIB,
                      ram_available_bytes=64 * GIB,
                      gpus=tuple(GpuInfo(i, "NVIDIA A100-SXM4-80GB", 80 * GIB, 80 * GIB,
                                         source="declared") for i in range(gpus)))


def dead_gauge(outcome):
    return {t["health"]: v for spec, v, t in outcome.samples
            if spec is m.SCHEDULER_NODES}["dead"]


def churned_core(n=40):
    """Live node 'a'; n nodes joined and died: the first half Ray lists dead, the second half
    went silent past dead_after_s (the first holding part of job j aside) and then Ray's GCS
    stopped listing them at all (it keeps its last 1000 dead nodes); the second half Ray
    lists dead."""
    core = SchedulerCore(SchedulerSettings())  # heartbeat limits 15 s / 60 s
    gone = [f"n{i:03d}" for i in range(n)]
    core.ray_nodes({"a", *gone}, set(), T0)
    for node in ["a", *gone]:
        core.report(gpu_node(node), T0)
    placed = core.submit(JobSpec("j", num_workers=8, gpus_per_worker=1), "d", T0).decision
    assert isinstance(placed, Placement) and placed.nodes == ["a", gone[0]]
    core.report(gpu_node("a"), T0 + 100)
    core.tick(T0 + 100)  # every node but a silent past dead_after_s
    assert core.state.silent == set(gone)
    # (as a version that kept them silent for good saved it)
    core.saved_while_silent = json.loads(json.dumps(core.to_dict()))
    core.ray_nodes({"a"}, set(gone[n // 2:]), T0 + 101)
    return core, gone, placed


def test_nodes_dead_past_the_retention_are_forgotten_and_the_dead_gauge_only_falls():
    core, gone, placed = churned_core()
    # A silent node Ray no longer lists has left: what it kept aside goes, it is not silent
    assert core.state.silent == set() and core.state.silent_reservations == {}
    core.release("j", "d", T0 + 102)  # nothing refers to any dead node now
    now = T0 + 103
    core.report(gpu_node("a"), now)
    before = dead_gauge(core.tick(now))
    assert before == len(gone)  # recent deaths still shown
    assert set(core.state.reports) == {"a", *gone}
    gauges = [before]
    for now in (T0 + DEAD_NODE_RETENTION_S, T0 + 200 + DEAD_NODE_RETENTION_S,
                T0 + 400 + DEAD_NODE_RETENTION_S):
        core.report(gpu_node("a"), now)
        gauges.append(dead_gauge(core.tick(now)))
    assert gauges == sorted(gauges, reverse=True) and gauges[-1] == 0, gauges
    state = core.state
    assert set(state.reports) == set(state.last_seen) == {"a"}
    assert state.dead == set() and state.silent == set() and not state.suspected
    assert state.table.ids == ["a"] and state.table.index == {"a": 0}
    assert len(state.table) == 1
    saved = core.to_dict()
    assert saved["silent_nodes"] == {} and saved["silent_node_reports"] == {}
    # what remains places as before: the live node's row is whole
    assert isinstance(core.submit(JobSpec("k", num_workers=4, gpus_per_worker=1), "d",
                                  now).decision, Placement)
    assert core.state.reserved_on("a") == (4.0, 4)


def test_a_dead_node_still_referred_to_is_kept_until_released():
    core = SchedulerCore(SchedulerSettings())
    core.ray_nodes({"a", "b", "c"}, set(), T0)
    for node in "abc":
        core.report(gpu_node(node), T0)
    placed = core.submit(JobSpec("j", num_workers=8, gpus_per_worker=1), "d", T0).decision
    assert isinstance(placed, Placement) and set(placed.nodes) == {"a", "b"}
    core.ray_nodes({"a"}, {"b", "c"}, T0 + 1)  # b (under j) and c die
    core.tick(T0 + 2)
    # a reservation on a dead node (as a restore may leave one until Ray's next word)
    core.state.reserve("x", [Reservation("x", "c", 1.0, 1)])
    now = T0 + 2 * DEAD_NODE_RETENTION_S
    core.report(gpu_node("a"), now)
    core.tick(now)
    assert {"b", "c"} <= set(core.state.reports)  # j's placement names b; x holds c
    core.state.release("x")
    core.release("j", "d", now + 1)
    core.report(gpu_node("a"), now + 2)
    core.tick(now + 2)
    assert set(core.state.reports) == {"a"} and core.state.table.ids == ["a"]


def test_state_saved_after_forgetting_restores_and_older_state_still_does():
    core, gone, _ = churned_core()
    older = core.saved_while_silent
    now = T0 + 200 + DEAD_NODE_RETENTION_S
    core.report(gpu_node("a"), now)
    core.tick(now)
    # j, whose driver has not yet been told, still names n000 in its placement: kept
    assert set(core.state.reports) == {"a", gone[0]} and "j" in core.running
    saved = json.loads(json.dumps(core.to_dict()))
    again = SchedulerCore(core.settings)
    assert again.restore(saved) == []
    again.ray_nodes({"a"}, set(), now + 1)
    again.report(gpu_node("a"), now + 1)
    again.tick(now + 1)
    assert set(again.running) == {"j"} and set(again.state.reports) == {"a"}
    assert again.state.reserved_on("a") == core.state.reserved_on("a") != (0.0, 0)
    # a state saved with the silent nodes Ray no longer lists: restored, then forgotten too
    old = SchedulerCore(core.settings)
    assert old.restore(older) == []
    assert set(old.state.silent) == set(gone)
    old.ray_nodes({"a"}, set(), now + 1)
    assert old.state.silent == set() and old.state.silent_reservations == {}
    for t in (now + 1, now + 2 + DEAD_NODE_RETENTION_S):
        old.report(gpu_node("a"), t)
        old.tick(t)
    assert set(old.state.reports) == {"a", gone[0]}  # (j's placement names it)
    assert old.to_dict()["silent_node_reports"] == {}
    old.release("j", "d", t)
    old.tick(t + 1)
    assert set(old.state.reports) == {"a"} and old.state.dead == set()


def test_refusals_of_nodes_never_taken_are_forgotten_after_the_retention():
    """refused_nodes (and malformed_at) kept every node id whose reports were refused and
    never taken for good: stale agents of nodes forgotten long ago, mistyped ids, a node sent
    only malformed reports before it died. They now go once their last refusal is older than
    DEAD_NODE_RETENTION_S; one still refused stays (its run of refusals is logged once), as
    does a known node's (forgotten with the node)."""
    import dataclasses

    core = SchedulerCore(SchedulerSettings())
    core.ray_nodes({"a", "m"}, set(), T0)
    core.report(gpu_node("a"), T0)
    for i in range(100):
        assert core.report(gpu_node(f"ghost{i}"), T0).decision == "unknown_node"
    nan_load = dataclasses.replace(gpu_node("m"), load_avg_1m=float("nan"))
    assert core.report(nan_load, T0).decision.startswith("malformed")
    assert core.report(nan_load, T0).decision.startswith("malformed")
    core.ray_nodes({"a"}, {"m"}, T0 + 1)  # m dies having never been taken
    malformed_a = dataclasses.replace(gpu_node("a"), ram_available_bytes=-1)
    assert core.report(malformed_a, T0 + 2).decision.startswith("malformed")
    core.tick(T0 + DEAD_NODE_RETENTION_S)
    assert len(core.refused_nodes) == 102  # within the retention: kept
    late = T0 + DEAD_NODE_RETENTION_S + 10
    assert core.report(gpu_node("ghost7"), late).decision == "unknown_node"  # still sending
    core.tick(late)
    assert set(core.refused_nodes) == {"ghost7", "a"} and set(core.malformed_at) == {"a"}
    core.tick(late + DEAD_NODE_RETENTION_S + 1)
    assert set(core.refused_nodes) == {"a"}  # a, known, goes with its node or a taken report
