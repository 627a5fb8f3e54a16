"""The scheduling core's rules, driven by events with explicit times: no Ray, no sleeping."""
import dataclasses
import json
import time

import pytest

from orchestrator.config import JobSpec
from orchestrator.inventory import GIB, GpuInfo, NodeReport
from orchestrator.placement import Placement, Queued, Rejection
from orchestrator.queue import JobQueue, QueuedJob
from orchestrator.scheduler_core import CLAIM_SUFFIX, SchedulerCore
from orchestrator.scheduler_types import (CANCEL, MIGRATE, PREEMPT, RunningJob, SaveSoon,
                                          SchedulerSettings, StartAgent, Yield)

T0 = 1_000.0


def gpu_node(node_id, gpus=4, family="A100", memory_gb=80.0, cpus=16, free_gb=None):
    names = {"A100": "NVIDIA A100-SXM4-80GB", "T4": "Tesla T4", "H100": "NVIDIA H100 80GB HBM3"}
    free = [memory_gb] * gpus if free_gb is None else free_gb
    return NodeReport(node_id=node_id, hostname=node_id, ray_cpus=cpus, ray_gpus=gpus,
                      cpu_count=cpus, load_avg_1m=0.0, ram_total_bytes=64 * GIB,
                      ram_available_bytes=64 * GIB,
                      gpus=tuple(GpuInfo(i, names[family], int(memory_gb * GIB),
                                         int(free[i] * GIB), source="declared")
                                 for i in range(gpus)))


def cpu_node(node_id, cpus=4):
    return NodeReport(node_id=node_id, hostname=node_id, ray_cpus=cpus, ray_gpus=0,
                      cpu_count=cpus, load_avg_1m=0.0, ram_total_bytes=8 * GIB,
                      ram_available_bytes=8 * GIB)


def core_with(*reports, **settings):
    # Heartbeat limits far beyond the test times: nodes stay healthy without re-reporting.
    core = SchedulerCore(SchedulerSettings(**{"min_run_s": 10.0, "restart_cost_s": 30.0,
                                              "suspect_after_s": 1e4, "dead_after_s": 1e5,
                                              **settings}))
    core.ray_nodes({r.node_id for r in reports}, set(), T0)
    for r in reports:
        assert core.report(r, T0).decision is True
    return core


def gpus(name, n, **kw):
    return JobSpec(name, num_workers=n, gpus_per_worker=1, **kw)


def cpus(name, n, **kw):
    return JobSpec(name, num_workers=n, cpus_per_worker=1.0, **kw)


def yields(outcome):
    return {e.job_name: e for e in outcome.effects if isinstance(e, Yield)}


# -- queue -------------------------------------------------------------------------------------

def test_queue_orders_by_priority_then_submit_time_and_round_trips():
    q = JobQueue()
    q.add(QueuedJob(cpus("late-high", 1, priority=5), "o", 30.0))
    q.add(QueuedJob(cpus("early-low", 1), "o", 10.0))
    q.add(QueuedJob(cpus("early-high", 1, priority=5), "o", 20.0))
    assert [j.spec.name for j in q.ordered()] == ["early-high", "late-high", "early-low"]
    assert q.position("early-low") == 3 and q.status("late-high").position == 2
    q.remove("early-high")
    assert q.position("late-high") == 1
    with pytest.raises(ValueError, match="already waiting"):
        q.add(QueuedJob(cpus("early-low", 1), "o", 40.0))
    again = JobQueue.from_dict(json.loads(json.dumps(q.to_dict())))
    assert [j.spec.name for j in again.ordered()] == ["late-high", "early-low"]
    assert again.drop_owners({"o"}) == ["late-high", "early-low"] and not len(again)


# -- submit, queue, release ------------------------------------------------------------------------

def test_a_job_that_fits_is_placed_and_a_retry_gets_the_same_answer():
    core = core_with(cpu_node("a"))
    first = core.submit(cpus("j", 2), "driver-1", T0)
    assert isinstance(first.decision, Placement) and first.persist
    assert core.submit(cpus("j", 2), "driver-1", T0 + 1).decision == first.decision
    other = core.submit(cpus("j", 1), "driver-2", T0 + 2).decision
    assert isinstance(other, Rejection) and "already holds" in other.message


def test_a_job_waits_until_capacity_is_released_then_its_poll_gets_the_placement():
    core = core_with(cpu_node("a", cpus=4))
    core.submit(cpus("holder", 4), "d1", T0)
    waiting = core.submit(cpus("waiter", 2), "d2", T0 + 1).decision
    assert isinstance(waiting, Queued) and waiting.position == 1
    assert "fits once running jobs (or Ray work outside the scheduler" in waiting.reason
    assert isinstance(core.poll("waiter", "d2", T0 + 2).decision, Queued)
    assert core.release("holder", "d2", T0 + 3).decision is False  # not d2's to free
    assert core.release("holder", "d1", T0 + 3).decision is True
    placed = core.poll("waiter", "d2", T0 + 4).decision
    assert isinstance(placed, Placement) and placed.nodes == ["a"]


def test_a_job_larger_than_the_cluster_is_rejected_not_queued():
    core = core_with(cpu_node("a", cpus=4))
    never = core.submit(cpus("huge", 5), "d", T0).decision
    assert isinstance(never, Rejection) and not never.fits_when_free
    assert not len(core.queue)


def test_a_waiting_job_that_can_never_fit_after_a_node_dies_is_rejected_with_the_reason():
    core = core_with(cpu_node("a", cpus=4), cpu_node("b", cpus=4))
    core.submit(cpus("holder", 4), "d1", T0)
    core.submit(cpus("holder2", 4), "d1", T0)
    assert isinstance(core.submit(cpus("big", 8), "d2", T0).decision, Queued)
    core.ray_nodes({"a"}, {"b"}, T0 + 5)  # Ray says b is gone
    dropped = core.poll("big", "d2", T0 + 6).decision
    assert isinstance(dropped, Rejection) and "needs 8 worker(s)" in dropped.message


# -- EASY backfill -----------------------------------------------------------------------------

def test_backfill_only_into_a_gap_that_ends_before_the_head_can_start():
    core = core_with(gpu_node("n", gpus=8))
    core.submit(gpus("running", 6, expected_duration_s=100), "d", T0)  # 2 GPUs free
    head = core.submit(gpus("head", 8), "d", T0 + 1).decision  # starts at T0 + 100
    assert isinstance(head, Queued)
    long = core.submit(gpus("long", 2, expected_duration_s=500), "d", T0 + 2).decision
    assert isinstance(long, Queued) and "would delay 'head'" in long.reason
    unknown = core.submit(gpus("unknown", 2), "d", T0 + 3).decision
    assert isinstance(unknown, Queued)  # no estimate: may only use what head cannot
    short = core.submit(gpus("short", 2, expected_duration_s=50), "d", T0 + 4).decision
    assert isinstance(short, Placement)  # ends at T0 + 54, before the head's start


def test_without_estimates_a_job_backfills_onto_capacity_the_head_cannot_use():
    core = core_with(gpu_node("a100", gpus=4), gpu_node("t4", gpus=2, family="T4"))
    core.submit(gpus("running", 3, accelerator_types=("A100",)), "d", T0)
    assert isinstance(core.submit(gpus("head", 4, accelerator_types=("A100",)), "d", T0)
                      .decision, Queued)
    on_a100 = core.submit(gpus("on-a100", 1, accelerator_types=("A100",)), "d", T0).decision
    assert isinstance(on_a100, Queued)  # the head's capacity: would delay it
    on_t4 = core.submit(gpus("on-t4", 2, accelerator_types=("T4",)), "d", T0).decision
    assert isinstance(on_t4, Placement) and on_t4.nodes == ["t4"]


# -- preemption ------------------------------------------------------------------------------------

def test_a_higher_priority_job_preempts_and_the_victim_resumes_after_it():
    core = core_with(cpu_node("a", cpus=4))
    low = core.submit(cpus("low", 4), "d-low", T0).decision
    assert isinstance(low, Placement)
    high = core.submit(cpus("high", 4, priority=10), "d-high", T0 + 60)
    assert isinstance(high.decision, Queued) and "preempting low" in high.decision.reason
    told = yields(high)["low"]
    assert told.kind == PREEMPT and "priority 10 > 0" in told.reason
    assert core.directive("low", T0 + 61).decision.kind == PREEMPT
    # Until the victim yields, nothing is double-booked: it still holds its CPUs.
    assert core.state.reserved_on("a") == (4.0, 0)
    back = core.yielded("low", "d-low", T0 + 65).decision
    assert isinstance(back, Queued) and back.position == 1
    assert isinstance(core.poll("high", "d-high", T0 + 66).decision, Placement)
    core.release("high", "d-high", T0 + 100)
    again = core.poll("low", "d-low", T0 + 101).decision
    assert isinstance(again, Placement)
    assert core.running["low"].preemptions == 1


def test_an_operators_preemption_makes_room_for_the_job_waiting_behind():
    # The preempted job kept its first submit time, was first in line again and was placed
    # at once, ahead of the job it was preempted for.
    core = core_with(cpu_node("a", cpus=4))
    assert isinstance(core.submit(cpus("b", 2), "d-b", T0).decision, Placement)
    waiting = core.submit(cpus("c", 3), "d-c", T0 + 5).decision
    assert isinstance(waiting, Queued)
    assert core.preempt("b", T0 + 30).decision is True
    back = core.yielded("b", "d-b", T0 + 31).decision
    assert isinstance(back, Queued) and back.position == 1
    assert isinstance(core.poll("c", "d-c", T0 + 32).decision, Placement)
    rows = {r["job"]: r for r in core.jobs(T0 + 40)}
    assert rows["b"]["state"] == "preempted" and rows["b"]["since_s"] == 9.0  # since T0 + 31


def test_a_job_behind_one_of_the_same_shape_says_so():
    # It kept the reason "submitted" while it waited, and its timeout error repeated it.
    core = core_with(cpu_node("a", cpus=4))
    core.submit(cpus("big", 4), "d", T0)
    core.submit(cpus("j", 2), "d", T0 + 1)
    core.submit(cpus("i", 2), "d", T0 + 2)
    reasons = {r["job"]: r["reason"] for r in core.jobs(T0 + 3)}
    assert "needs 2 CPUs" in reasons["j"]
    assert reasons["i"] == "as 'j' ahead of it (the same shape)"


def test_victims_lowest_priority_first_then_least_work_lost_and_no_more_than_needed():
    core = core_with(cpu_node("a", cpus=2), cpu_node("b", cpus=2), cpu_node("c", cpus=2))
    core.submit(cpus("p1-old-checkpoint", 2, priority=1), "d", T0)
    core.submit(cpus("p1-fresh-checkpoint", 2, priority=1), "d", T0)
    core.submit(cpus("p2", 2, priority=2), "d", T0)
    core.directive("p1-old-checkpoint", T0 + 50, last_checkpoint_at=T0 + 5)
    core.directive("p1-fresh-checkpoint", T0 + 50, last_checkpoint_at=T0 + 49)
    out = core.submit(cpus("urgent", 2, priority=9), "d", T0 + 50)
    assert set(yields(out)) == {"p1-fresh-checkpoint"}


def test_no_preemption_before_min_run_time_nor_by_las_after_max_preemptions():
    core = core_with(cpu_node("a", cpus=2), min_run_s=30.0, max_preemptions=1,
                     las_thresholds_gpu_s=(50.0,))
    core.submit(cpus("low", 2), "d", T0)
    early = core.submit(cpus("high", 2, priority=5), "d", T0 + 5)
    assert not yields(early)  # low has run only 5 s
    assert yields(core.tick(T0 + 31))["low"].kind == PREEMPT  # the tick tries again
    core.yielded("low", "d", T0 + 32)
    core.release("high", "d", T0 + 40)  # low resumes
    assert isinstance(core.poll("low", "d", T0 + 41).decision, Placement)
    # low has run 91 s x 2 workers: level 1, above a new job of its priority
    aged = core.submit(cpus("new", 2), "d", T0 + 100)
    assert not yields(aged)  # preempted once already: ageing protects it from LAS
    assert isinstance(aged.decision, Queued)


def test_max_preemptions_protects_a_job_from_its_own_priority_only():
    # Ageing bounds LAS (jobs of its own priority) alone: an urgent job of a higher priority
    # waited for a low one that had been preempted max_preemptions times (an operator's
    # preemptions count too), with no end.
    core = core_with(gpu_node("a", gpus=2), max_preemptions=1, las_thresholds_gpu_s=(100.0,))
    core.submit(gpus("low", 2), "d", T0)
    core.preempt("low", T0 + 100)
    assert isinstance(core.yielded("low", "d", T0 + 100).decision, Placement)  # at once
    assert core.running["low"].preemptions == 1
    # 300 s x 2 GPUs: level 1, a new job is at level 0; LAS alone would preempt it
    same = core.submit(gpus("same", 2), "d", T0 + 200)
    assert not yields(same) and isinstance(same.decision, Queued)
    core.cancel("same", "d", T0 + 200)
    urgent = core.submit(gpus("urgent", 2, priority=10), "d", T0 + 201)
    assert "priority 10 > 0" in yields(urgent)["low"].reason
    core.yielded("low", "d", T0 + 202)
    assert isinstance(core.poll("urgent", "d", T0 + 203).decision, Placement)


def test_las_preempts_below_an_aged_job_that_has_received_more_service():
    # The pass says "outranks nobody" from each priority's top level among the jobs LAS may
    # preempt, read from the one with the most service (_top_levels): the job with the most
    # here is aged (max_preemptions), and it must not hide the one below it from LAS.
    core = core_with(gpu_node("a", gpus=4), max_preemptions=1,
                     las_thresholds_gpu_s=(100.0, 1000.0))
    core.submit(gpus("aged", 2), "d", T0)
    core.preempt("aged", T0 + 1)
    assert isinstance(core.yielded("aged", "d", T0 + 1).decision, Placement)  # at once
    core.submit(gpus("fresh", 2), "d", T0 + 300)
    # At T0 + 600: 'aged' 1,200 GPU-s (level 2, preempted once), 'fresh' 600 (level 1)
    out = core.submit(gpus("new", 2), "d", T0 + 600)
    assert set(yields(out)) == {"fresh"}


def test_no_victims_for_a_family_the_queue_pass_keeps_the_preemptor_off():
    # 'any' preempted 'v' on the A100s, which 'a100-only' (waiting, of the same priority,
    # at LAS level 1 as 'v': it cannot preempt 'v' itself) has first call on: the pass kept
    # 'any' off them and started 'a100-only', which 'any' preempted, which then waited for
    # the A100s again, and so on every min_run_s: 'any' never ran.
    core = core_with(gpu_node("a100", gpus=4), gpu_node("t4", gpus=4, family="T4"),
                     las_thresholds_gpu_s=(100.0,))
    core.submit(gpus("t4-only", 4, accelerator_types=("T4",), preemptible=False), "d", T0)
    core.submit(gpus("v", 4), "d", T0)
    core.submit(gpus("a100-only", 4, accelerator_types=("A100",)), "d", T0 + 1)
    saved = json.loads(json.dumps(core.to_dict()))
    saved["queue"]["waiting"][0]["ran_s"] = 50.0  # it ran before: 200 GPU-s, level 1
    core = SchedulerCore(core.settings)
    assert core.restore(saved) == []
    core.ray_nodes({"a100", "t4"}, set(), T0 + 2)
    core.report(gpu_node("a100", gpus=4), T0 + 2)
    core.report(gpu_node("t4", gpus=4, family="T4"), T0 + 2)
    assert set(core.running) == {"t4-only", "v"}
    out = core.submit(gpus("any", 4), "d", T0 + 500)  # level 0; 'v' is at level 1
    assert not yields(out)
    now = T0 + 500
    for _ in range(20):
        now += 5
        assert not yields(core.tick(now))
    # The searches put back what they released and re-queued in thought.
    assert core.queue.gpus_by_allowed == {("A100",): 4, (): 4}
    assert core.pinned_running == {"T4": 4}
    assert core.state.reserved_on("a100")[1] == 4 and set(core.state.reservations) == {
        "t4-only", "v"}
    # Once nobody has first call on the A100s, 'any' preempts 'v' and starts there.
    out = core.cancel("a100-only", "d", now)
    assert yields(out)["v"].kind == PREEMPT
    core.yielded("v", "d", now + 2)
    assert core.poll("any", "d", now + 3).decision.nodes == ["a100"]


def test_a_lower_priority_job_allowed_one_family_does_not_keep_a_higher_one_off_it():
    # 'lo' (priority 0, A100 only) had first call on the A100s against 'hi' (priority 10, any
    # family): once they freed, 'lo' started and 'hi' waited behind it, never preempting.
    core = core_with(gpu_node("a100", gpus=4), gpu_node("t4", gpus=4, family="T4"))
    core.submit(gpus("t4-job", 4, accelerator_types=("T4",), preemptible=False), "d", T0)
    core.submit(gpus("r", 4, preemptible=False), "d", T0)  # holds the A100s
    core.submit(gpus("hi", 4, priority=10), "d", T0 + 1)
    core.submit(gpus("lo", 4, accelerator_types=("A100",)), "d", T0 + 2)
    core.release("r", "d", T0 + 100)
    assert set(core.running) == {"t4-job", "hi"}, core.jobs(T0 + 101)
    # ... and, 'lo' started first, 'hi' preempts it rather than wait behind it for good.
    core = core_with(gpu_node("a100", gpus=4), gpu_node("t4", gpus=4, family="T4"))
    core.submit(gpus("t4-job", 4, accelerator_types=("T4",), preemptible=False), "d", T0)
    core.submit(gpus("lo", 4, accelerator_types=("A100",)), "d", T0)
    outcome = core.submit(gpus("hi", 4, priority=10), "d", T0 + 100)
    assert set(yields(outcome)) == {"lo"}


def test_a_job_behind_the_head_preempts_only_for_a_start_that_would_not_delay_the_head():
    # 'small' preempted 'v1' though the backfill rule then refused it ("would delay 'head'"):
    # 'v1' lost its run and its GPU idled, with no end.
    core = core_with(gpu_node("a", gpus=4), gpu_node("t4", gpus=1, family="T4"),
                     las_thresholds_gpu_s=(100.0,))
    core.submit(gpus("u", 2, preemptible=False), "d", T0)
    core.submit(gpus("v1", 1, accelerator_types=("A100",)), "d", T0)
    core.submit(gpus("v2", 1, accelerator_types=("A100",)), "d", T0)
    core.submit(gpus("w", 1, accelerator_types=("T4",)), "d", T0)
    # The head cannot preempt (it needs 'u''s GPUs too): it waits without a shadow time.
    assert isinstance(core.submit(gpus("head", 4, accelerator_types=("A100",)), "d",
                                  T0 + 1000).decision, Queued)
    out = core.submit(gpus("small", 1, accelerator_types=("A100",)), "d", T0 + 1001)
    assert not yields(out) and set(core.running) == {"u", "v1", "v2", "w"}
    # On GPUs the head cannot use, a job behind it may preempt, and starts.
    out = core.submit(gpus("small-t4", 1, accelerator_types=("T4",)), "d", T0 + 1002)
    assert set(yields(out)) == {"w"}
    core.yielded("w", "d", T0 + 1003)
    assert isinstance(core.poll("small-t4", "d", T0 + 1004).decision, Placement)


def test_a_job_behind_the_head_preempts_only_for_a_start_no_blocked_jobs_plan_refuses():
    # 'X' (4 A100s, behind the T4 head 'H') has its own EASY plan on the A100s; 'small'
    # preempted 'v1' judged against the head's plan alone, and the pass then refused it
    # ("would delay 'X'"): v1 lost its run and its GPU idled.
    a100, t4 = ("A100",), ("T4",)
    core = core_with(gpu_node("a", gpus=4), gpu_node("t", gpus=1, family="T4"),
                     las_thresholds_gpu_s=(100.0,))
    core.submit(gpus("long", 1, accelerator_types=t4, preemptible=False), "d", T0)
    core.submit(gpus("u", 2, accelerator_types=a100, preemptible=False), "d", T0)
    for name in ("v1", "v2"):
        core.submit(gpus(name, 1, accelerator_types=a100), "d", T0)
    core.submit(gpus("H", 1, accelerator_types=t4), "d", T0 + 1000)
    core.submit(gpus("X", 4, accelerator_types=a100), "d", T0 + 1000.5)
    out = core.submit(gpus("small", 1, accelerator_types=a100), "d", T0 + 1001)
    assert not yields(out) and not core.preempting.get("small")
    assert {"v1", "v2"} <= set(core.running)


def test_the_room_a_job_behind_the_head_preempts_for_is_not_taken_by_a_job_behind_it():
    # 'B' (behind the head 'H', on its family: no plan of its own) preempted v1 and v2; 'C',
    # submitted after B, took the GPU v1 freed (it ends before H's shadow time), and B, its
    # victims gone, still waited for C.
    a100 = ("A100",)
    core = core_with(gpu_node("a", gpus=4), gpu_node("b", gpus=4), las_thresholds_gpu_s=(100.0,))
    core.submit(gpus("u", 4, accelerator_types=a100, preemptible=False,
                     expected_duration_s=10000), "d", T0)
    core.submit(gpus("w", 2, accelerator_types=a100, preemptible=False,
                     expected_duration_s=20000), "d", T0)
    for name in ("v1", "v2"):
        core.submit(gpus(name, 1, accelerator_types=a100), "d", T0)
    core.submit(gpus("H", 8, accelerator_types=a100), "d", T0 + 1000)
    out = core.submit(gpus("B", 2, accelerator_types=a100, expected_duration_s=1000), "d",
                      T0 + 1001)
    assert set(yields(out)) == {"v1", "v2"}
    core.yielded("v1", "d", T0 + 1002)
    late = core.submit(gpus("C", 1, accelerator_types=a100, expected_duration_s=500), "d",
                       T0 + 1003).decision
    assert isinstance(late, Queued) and "would delay 'B'" in late.reason
    core.yielded("v2", "d", T0 + 1004)
    assert isinstance(core.poll("B", "d", T0 + 1005).decision, Placement)


def test_a_preemption_the_victim_has_read_stays_when_its_preemptor_starts_elsewhere():
    # The victim had read its directive (it was checkpointing to yield) when the preemptor
    # started on room freed elsewhere: the directive was withdrawn, and the yield that
    # followed was a restart the victim's preemptions never counted (ageing never came).
    core = core_with(gpu_node("a", gpus=2), gpu_node("b", gpus=2), las_thresholds_gpu_s=(100.0,))
    core.submit(gpus("v", 2), "d", T0)
    core.submit(gpus("w", 2, expected_duration_s=1e6), "d", T0 + 1)
    out = core.submit(gpus("p", 2), "d", T0 + 500)
    (victim,) = yields(out)
    other = ({"v", "w"} - {victim}).pop()
    unread = core.submit(gpus("q", 2, priority=1), "d", T0 + 500)  # preempts the other
    assert set(yields(unread)) == {other}
    assert core.directive(victim, T0 + 501).decision.kind == PREEMPT
    core.cancel("q", "d", T0 + 502)  # the other's directive, unread, is withdrawn
    assert core.running[other].directive is None
    core.release(other, "d", T0 + 503)  # the other job ends: 'p' starts in its room
    assert isinstance(core.poll("p", "d", T0 + 503).decision, Placement)
    assert core.running[victim].directive.kind == PREEMPT  # read: it is yielding
    core.yielded(victim, "d", T0 + 530)
    assert core.running[victim].preemptions == 1  # placed again at once, counted


def test_a_victim_that_finishes_instead_of_yielding_frees_the_room_all_the_same():
    core = core_with(cpu_node("a", cpus=2))
    core.submit(cpus("low", 2), "d", T0)
    core.submit(cpus("high", 2, priority=5), "d", T0 + 20)
    core.release("low", "d", T0 + 21)  # ended before its next step boundary
    assert isinstance(core.poll("high", "d", T0 + 22).decision, Placement)
    assert not core.preempting


# -- migration ---------------------------------------------------------------------------------------

def test_a_migration_claim_lost_to_a_silent_node_is_not_revived_into_a_later_claim():
    # job migrates to a1, whose agent then falls silent (Ray lists it alive): the claim's
    # reservation there is kept aside. The move fails (part of its claim is lost) and job runs
    # on the T4 again. Later it migrates to a2, and a1 reports again: the old claim's aside
    # came back into the new claim, which held a1 idle against a waiting A100 job and, two
    # reservations for a one-node target, made the move fail again.
    core = core_with(gpu_node("t4", gpus=2, family="T4"), gpu_node("a1", gpus=2),
                     gpu_node("a2", gpus=2), suspect_after_s=15, dead_after_s=60)

    def beat(t, *nodes):
        for n in nodes:
            core.report(gpu_node(n, gpus=2, family="T4" if n == "t4" else "A100"), t)

    core.submit(gpus("b1", 2, accelerator_types=("A100",)), "d", T0)
    core.submit(gpus("b2", 2, accelerator_types=("A100",)), "d", T0)
    assert core.submit(gpus("job", 2, expected_duration_s=36000), "d", T0).decision.nodes \
        == ["t4"]
    assert [core.running[b].placement.nodes for b in ("b1", "b2")] == [["a1"], ["a2"]]
    beat(T0 + 50, "t4", "a1", "a2")
    assert yields(core.release("b1", "d", T0 + 55))["job"].target_nodes == ("a1", "a1")
    assert core.directive("job", T0 + 56).decision.kind == MIGRATE  # read: carried out
    beat(T0 + 110, "t4", "a2")
    assert core.tick(T0 + 116).decision["expired"] == ["a1"]  # silent: its claim kept aside
    assert core.yielded("job", "d", T0 + 117).decision.nodes == ["t4"]  # the move failed
    assert core.state.silent_reservations == {}  # (the claim is gone with the move)
    beat(T0 + 140, "t4", "a2")
    assert yields(core.release("b2", "d", T0 + 140))["job"].target_nodes == ("a2", "a2")
    beat(T0 + 145, "t4", "a2", "a1")  # a1 answers again
    assert [r.node_id for r in core.state.reservations["job" + CLAIM_SUFFIX]] == ["a2"]
    waiting = core.submit(gpus("w", 2, accelerator_types=("A100",)), "d", T0 + 146).decision
    assert isinstance(waiting, Placement) and waiting.nodes == ["a1"]
    moved = core.yielded("job", "d", T0 + 147).decision
    assert isinstance(moved, Placement) and moved.nodes == ["a2"]  # the move it was told


def test_a_job_migrates_to_a_faster_family_when_it_frees_and_the_gain_beats_restart_cost():
    core = core_with(gpu_node("t4", gpus=2, family="T4"), gpu_node("a100", gpus=2))
    core.submit(gpus("blocker", 2, accelerator_types=("A100",)), "d", T0)
    job = core.submit(gpus("job", 2, expected_duration_s=3600), "d", T0).decision
    assert job.nodes == ["t4"]
    out = core.release("blocker", "d", T0 + 60)  # the A100s free
    told = yields(out)["job"]
    assert told.kind == MIGRATE and told.target_nodes == ("a100", "a100")
    assert "from T4 to A100" in told.reason
    # The target is claimed: nobody else can take it meanwhile.
    assert isinstance(core.submit(gpus("thief", 1, accelerator_types=("A100",)), "d",
                                  T0 + 61).decision, Queued)
    moved = core.yielded("job", "d", T0 + 70).decision
    assert isinstance(moved, Placement) and moved.nodes == ["a100"]
    assert "job" + CLAIM_SUFFIX not in core.state.reservations
    assert core.running["job"].ran_s == pytest.approx(70)
    assert isinstance(core.poll("thief", "d", T0 + 71).decision, Queued)  # A100s are taken


def test_no_migration_onto_gpus_the_head_of_the_queue_is_gathering():
    # 'w' (8 A100s) waits at the head; 4 A100s free: 'm' migrated onto them, and 'w' waited
    # for 'm''s whole 10-hour run instead of 'r''s 200 s.
    core = core_with(gpu_node("a100", gpus=8), gpu_node("t4", gpus=4, family="T4"),
                     queue_order="fifo")
    core.submit(gpus("x", 4, accelerator_types=("A100",), expected_duration_s=60), "d", T0)
    core.submit(gpus("r", 4, accelerator_types=("A100",), expected_duration_s=200), "d", T0)
    core.submit(gpus("m", 4, expected_duration_s=36000), "d", T0)  # on the T4s
    core.submit(gpus("w", 8, accelerator_types=("A100",)), "d", T0 + 1)
    assert not yields(core.release("x", "d", T0 + 60))
    core.release("r", "d", T0 + 200)
    assert "w" in core.running


def test_no_migration_onto_the_room_a_preemption_is_making():
    # 'low' was preempted for 'p' (8 A100s) and in the same pass 'm' claimed the 4 A100s
    # 'p' counted on: 'low' lost its run for nothing and 'm' was preempted in turn.
    core = core_with(gpu_node("a100", gpus=8), gpu_node("t4", gpus=4, family="T4"))
    core.submit(gpus("low", 4, accelerator_types=("A100",)), "d", T0)
    core.submit(gpus("x", 4, accelerator_types=("A100",), preemptible=False, priority=9),
                "d", T0)
    core.submit(gpus("m", 4, expected_duration_s=36000), "d", T0)  # on the T4s
    core.submit(gpus("p", 8, accelerator_types=("A100",), priority=5), "d", T0 + 50)
    assert {n: y.kind for n, y in yields(core.release("x", "d", T0 + 100)).items()} == {
        "low": PREEMPT}
    core.yielded("low", "d", T0 + 110)
    assert "p" in core.running


def test_no_migration_when_the_gain_is_below_the_restart_cost_or_unknown():
    core = core_with(gpu_node("t4", gpus=2, family="T4"), gpu_node("a100", gpus=2),
                     restart_cost_s=600.0)
    core.submit(gpus("blocker", 2, accelerator_types=("A100",)), "d", T0)
    core.submit(gpus("short", 1, expected_duration_s=400), "d", T0)  # gain < 600 s
    core.submit(gpus("unknown", 1), "d", T0)
    assert not yields(core.release("blocker", "d", T0 + 60))


def test_no_migration_that_spreads_a_job_over_a_slower_network_for_a_faster_family():
    # 'j' runs on one T4 node; then 2 A100s are free on each of two nodes, 1.25 GB/s apart:
    # it moved there for the A100s' speed alone (the gain counts no network), where a
    # data-parallel job's gradients cross 10 GbE every step (the simulator's model: 5-10x
    # slower than on one server).
    core = core_with(gpu_node("t4", gpus=4, family="T4"), gpu_node("a1", gpus=8),
                     gpu_node("a2", gpus=8))
    for name in ("h1", "h2"):
        core.submit(gpus(name, 8, accelerator_types=("A100",)), "d", T0)
    assert core.submit(gpus("j", 4, expected_duration_s=36000), "d", T0).decision.nodes == [
        "t4"]
    for i, (old, new) in enumerate((("h1", "h3"), ("h2", "h4")), start=1):
        core.release(old, "d", T0 + i)  # (within min_run_s of j's start: no move yet)
        core.submit(gpus(new, 6, accelerator_types=("A100",)), "d", T0 + i)
    assert core.state.table.gpus.sum() - core.state.table.reserved_gpus.sum() == 4
    assert not yields(core.tick(T0 + 100))
    told = yields(core.release("h3", "d", T0 + 200))["j"]  # a whole node's worth frees
    assert told.kind == MIGRATE and set(told.target_nodes) == {"a1"}


# -- operators, owners, nodes --------------------------------------------------------------------

def test_an_operator_cancel_of_a_running_job_lets_it_checkpoint_then_drops_it():
    core = core_with(cpu_node("a", cpus=2))
    core.submit(cpus("job", 2), "d", T0)
    assert core.cancel("job", "", T0 + 1).decision is True
    assert core.directive("job", T0 + 2).decision.kind == CANCEL
    gone = core.yielded("job", "d", T0 + 3).decision
    assert isinstance(gone, Rejection) and "cancelled" in gone.message
    assert not core.state.reservations and not len(core.queue)


def test_an_operators_cancel_said_again_tells_the_job_once():
    """`cancel NAME` run twice before the job reached a step boundary: accepted, the job
    told once (yields_total{kind="cancel"} counted each, the scheduler's log said it again,
    and the directive the job had read was replaced by one it had not)."""
    core = core_with(cpu_node("a", cpus=2))
    core.submit(cpus("job", 2), "d", T0)
    assert yields(core.cancel("job", "", T0 + 1))["job"].kind == CANCEL
    read = core.directive("job", T0 + 2).decision
    again = core.cancel("job", "", T0 + 3)
    assert again.decision is True and not yields(again)
    assert core.running["job"].directive == read and read.read_at == T0 + 2


def test_an_operator_preempt_requeues_the_job():
    core = core_with(cpu_node("a", cpus=2))
    core.submit(cpus("job", 2), "d", T0)
    assert core.preempt("job", T0 + 1).decision is True
    assert core.preempt("nope", T0 + 1).decision is False
    again = core.yielded("job", "d", T0 + 2).decision  # nothing else waits: placed at once
    assert isinstance(again, Placement)


def test_dead_drivers_lose_their_jobs_waiting_or_running():
    core = core_with(cpu_node("a", cpus=2))
    core.submit(cpus("run", 2), "dead-driver", T0)
    core.submit(cpus("wait", 2), "dead-driver", T0)
    core.submit(cpus("other", 2), "alive", T0)
    released, dropped = core.owners_dead({"dead-driver"}, T0 + 5).decision
    assert released == ["run"] and dropped == ["wait"]
    assert isinstance(core.poll("other", "alive", T0 + 6).decision, Placement)


def test_an_unreachable_node_is_suspect_not_dead_and_recovers_with_its_next_report():
    core = core_with(cpu_node("a", cpus=2), cpu_node("b", cpus=2))
    core.submit(cpus("on-a", 2), "d", T0)
    assert core.node_unreachable("a", "probe failed", T0 + 1)
    assert core.state.health("a", T0 + 1) == "suspect"
    assert "on-a" in core.state.reservations and core.state.reservations["on-a"]
    # No new work on a suspect node, but it still counts for what fits when free.
    assert isinstance(core.submit(cpus("new", 2), "d", T0 + 2).decision, Placement)
    assert isinstance(core.submit(cpus("fits-later", 4), "d", T0 + 2).decision, Queued)
    core.report(cpu_node("a", cpus=2), T0 + 3)
    assert core.state.health("a", T0 + 3) == "healthy"
    core.ray_nodes({"b"}, {"a"}, T0 + 4)  # Ray says it is gone: now it is dead
    assert core.state.health("a", T0 + 4) == "dead"


def test_reports_for_nodes_ray_does_not_list_alive_are_refused_unless_synthetic():
    core = core_with(cpu_node("a"))
    assert core.report(cpu_node("forged"), T0).decision == "unknown_node"
    core.ray_nodes(set(), {"a"}, T0)
    assert core.report(cpu_node("a"), T0).decision == "dead_node"
    synthetic = SchedulerCore(SchedulerSettings(synthetic_nodes=True))
    assert synthetic.report(cpu_node("x"), T0).decision is True
    assert synthetic.agents_needed({"x", "y"}, T0) == []
    assert core_with(cpu_node("a")).agents_needed({"a", "new"}, T0) == [StartAgent("new")]


def test_an_agent_sending_malformed_reports_is_not_restarted_in_a_loop():
    # Its reports are refused (NaN load), so its node never turns healthy: it was killed and
    # restarted every suspect_after_s, for ever, although it reports every 5 s.
    import dataclasses

    core = core_with(cpu_node("a"))
    core.ray_nodes({"a", "b"}, set(), T0)
    bad = dataclasses.replace(cpu_node("b"), load_avg_1m=float("nan"))
    assert core.report(bad, T0).decision.startswith("malformed")
    assert core.agents_needed({"a", "b"}, T0 + 1) == []
    silent_since = T0 + 1 + core.settings.suspect_after_s  # it stopped sending anything
    assert StartAgent("b") in core.agents_needed({"a", "b"}, silent_since)


def test_each_run_of_refused_reports_is_new_after_an_accepted_one():
    # A node once refused stayed in refused_nodes for good: a later refusal, for another
    # reason, was never logged while its agent pointed to the scheduler's log.
    import dataclasses

    core = core_with(cpu_node("a"))
    nan_load = dataclasses.replace(cpu_node("a"), load_avg_1m=float("nan"))
    assert core.report(nan_load, T0 + 1).decision.startswith("malformed")
    assert "a" in core.refused_nodes
    assert core.report(cpu_node("a"), T0 + 2).decision is True
    assert "a" not in core.refused_nodes and "a" not in core.malformed_at
    negative_ram = dataclasses.replace(cpu_node("a"), ram_available_bytes=-1)
    assert "a" not in core.refused_nodes  # (the actor logs when it is not: a new run)
    assert core.report(negative_ram, T0 + 3600).decision.startswith("malformed")
    # A run whose kind changes is said again (the actor logs on a change of kind).
    core.ray_nodes(set(), {"a"}, T0 + 3601)
    assert core.report(cpu_node("a"), T0 + 3602).decision == "dead_node"
    assert core.refused_nodes["a"] == "dead_node"


def test_state_survives_a_restart_with_preempted_jobs_and_directives():
    core = core_with(cpu_node("a", cpus=2), cpu_node("b", cpus=2))
    core.submit(cpus("low", 2), "d", T0)
    core.submit(cpus("low2", 2), "d", T0)
    core.submit(cpus("high", 2, priority=3), "d", T0 + 30)
    core.yielded(next(iter(core.preempting["high"])), "d", T0 + 31)
    core.submit(cpus("higher", 2, priority=9), "d", T0 + 40)  # preempts the other
    saved = json.loads(json.dumps(core.to_dict()))
    again = SchedulerCore(core.settings)
    assert again.restore(saved) == []
    assert again.to_dict() == core.to_dict()
    assert [r["state"] for r in again.jobs(T0 + 41)] == [r["state"] for r in core.jobs(T0 + 41)]
    assert {r["state"] for r in again.jobs(T0 + 41)} >= {"yielding", "preempted"}
    assert again.restore({"queue": {"waiting": [{"bad": 1}]}})[0].startswith(
        "cannot restore queued job 0, skipping it")


@pytest.mark.parametrize("queue_order", ["fifo", "las"])
def test_a_scheduler_restarted_mid_queue_decides_what_the_one_before_would_have(queue_order):
    # Saved state compared equal already; this holds what is rebuilt from it (planned ends,
    # priorities running, LAS levels) to the same decisions, event by event.
    nodes = [cpu_node("a", cpus=2), cpu_node("b", cpus=2), gpu_node("g", gpus=2, cpus=4)]
    core = core_with(*nodes, queue_order=queue_order)
    core.submit(gpus("gpu", 2, expected_duration_s=900), "e", T0)
    core.submit(cpus("low", 2, expected_duration_s=500), "d", T0)
    core.submit(cpus("low2", 2), "d", T0)
    core.submit(cpus("fill", 2), "d", T0)
    core.submit(cpus("high", 2, priority=3), "d", T0 + 30)
    (victim,) = core.preempting["high"]
    core.directive(victim, T0 + 30.5)
    core.yielded(victim, "d", T0 + 31)  # preempted, waiting to resume
    core.submit(cpus("higher", 2, priority=9), "d", T0 + 40)  # its victims told, not yet gone
    core.submit(gpus("gpu-low", 2, priority=-2), "e", T0 + 42)
    again = SchedulerCore(core.settings)
    assert again.restore(json.loads(json.dumps(core.to_dict()))) == []
    for scheduler in (core, again):  # the nodes report again to the restarted one
        scheduler.ray_nodes({n.node_id for n in nodes}, set(), T0 + 45)
        for n in nodes:
            scheduler.report(n, T0 + 45)

    def decisions(c):
        made = [c.tick(T0 + 60).decision]
        for victim in sorted(c.preempting.get("higher", ())):
            made += [c.directive(victim, T0 + 61).decision,
                     c.yielded(victim, "d", T0 + 62).decision]
        made += [c.release("gpu", "e", T0 + 70).decision, c.tick(T0 + 200).decision,
                 c.release("higher", "d", T0 + 300).decision, c.tick(T0 + 400).decision]
        return made + [c.jobs(T0 + 400), c.to_dict()]

    assert decisions(again) == decisions(core)


def test_a_restarted_scheduler_chooses_the_victims_the_one_before_would_have():
    # The typical job's speeds (which order victims by comparative advantage) were not saved:
    # the restored scheduler preempted the job on the T4s, the one before the job on A100s.
    nodes = [gpu_node("a100", gpus=4), gpu_node("t4", gpus=4, family="T4")]
    core = core_with(*nodes)
    core.submit(gpus("v1", 4), "d", T0)  # flexible: the A100s
    core.submit(gpus("v2", 4), "d", T0)  # flexible: the T4s
    core.submit(gpus("p", 4, priority=5), "d", T0 + 5)  # victims still within min_run_s
    core.directive("v1", T0 + 8, last_checkpoint_at=T0 + 2)
    core.directive("v2", T0 + 8, last_checkpoint_at=T0 + 7)
    again = SchedulerCore(core.settings)
    assert again.restore(json.loads(json.dumps(core.to_dict()))) == []
    again.restored_at = T0 + 9
    again.ray_nodes({n.node_id for n in nodes}, set(), T0 + 9)
    for n in nodes:
        again.report(n, T0 + 9)
    expected = set(yields(core.tick(T0 + 30)))
    assert expected and set(yields(again.tick(T0 + 30))) == expected
    bad = json.loads(json.dumps(core.to_dict()))
    bad["typical"]["speed"]["A100"] = "fast"
    assert any("cannot restore scheduler typical" in p
               for p in SchedulerCore(core.settings).restore(bad))


def test_a_saved_typical_count_past_floats_range_is_named_not_taken():
    # Taken as read (an integer >= 0): 1.0 / count raised OverflowError in every GPU job's
    # submit, the restarted scheduler's included (saved again as read): none could start.
    core = core_with(gpu_node("a100"))
    core.submit(gpus("j", 1), "d", T0)
    saved = json.loads(json.dumps(core.to_dict()))
    saved["typical"]["count"] = 10**400
    again = core_with(gpu_node("a100"))
    problems = again.restore(saved)
    assert any("cannot restore scheduler typical" in p and "its count is 1000" in p
               for p in problems), problems
    assert isinstance(again.submit(gpus("k", 1), "d", T0 + 1).decision, Placement)


def test_a_refused_submission_leaves_the_saved_state_as_it_was():
    # A GPU job refused outright (more GPUs than the cluster has, a family it lacks) was
    # folded into the typical job's speeds, which order preemption victims, and saved: a
    # user retrying a wrong request moved the yardstick every running job is judged by.
    core = core_with(gpu_node("a100", gpus=4), gpu_node("t4", gpus=4, family="T4"))
    core.speed = lambda spec, family: {"A100": 1.0, "T4": 0.5 if spec.workload else 0.2}[
        family]
    core.submit(gpus("running", 2), "d", T0)
    saved = json.loads(json.dumps(core.to_dict()))
    for refused in (gpus("too-big", 20, workload="w"),
                    gpus("no-h100", 1, accelerator_types=("H100",), workload="w"),
                    gpus("running", 1, workload="w")):  # a name in use, another driver's
        assert isinstance(core.submit(refused, "e", T0 + 1).decision, Rejection)
    assert json.loads(json.dumps(core.to_dict())) == saved


def test_a_dropped_jobs_reason_is_told_to_its_own_driver_not_taken_by_another():
    core = core_with(cpu_node("a", cpus=2), cpu_node("b", cpus=2))
    core.submit(cpus("run", 2), "driverA", T0)
    core.submit(cpus("run2", 2), "driverA", T0)
    assert isinstance(core.submit(cpus("big", 4), "driverA", T0).decision, Queued)
    core.ray_nodes({"a"}, {"b"}, T0 + 5)  # node b gone: 'big' can never fit, dropped
    assert "not in the queue" in core.poll("big", "driverB", T0 + 6).decision.message
    # ... kept across a restart, for its own driver
    again = core_with(cpu_node("a", cpus=2))
    again.restore(json.loads(json.dumps(core.to_dict())))
    told = again.poll("big", "driverA", T0 + 7).decision
    assert isinstance(told, Rejection) and told.message.startswith("cannot place job 'big'")


def test_one_unreadable_entry_of_saved_state_costs_that_entry_alone():
    # Three running jobs and two queued; one record of each kind damaged (or from a newer
    # version). The rest comes back; nothing double-books; no capacity is held for ever.
    core = core_with(cpu_node("a", cpus=4))
    for name in ("j1", "j2", "j3"):
        core.submit(cpus(name, 1), "d", T0)
    core.submit(cpus("w1", 2), "d", T0)
    core.submit(cpus("w2", 2), "d", T0)
    saved = json.loads(json.dumps(core.to_dict()))
    saved["reservations"]["j1"][0]["added_by_a_newer_version"] = 1  # ignored, not fatal
    del saved["running"]["j2"]["placement"]  # j2 unreadable: its reservation released
    saved["queue"]["waiting"][0]["spec"]["num_workers"] = -1
    again = core_with(cpu_node("a", cpus=4))
    problems = again.restore(saved)
    assert sorted(again.running) == ["j1", "j3"] and sorted(again.state.reservations) == \
        ["j1", "j3"]
    assert len(again.queue) == 1
    assert any("running job 'j2'" in p for p in problems)
    assert any("released the reservation of 'j2'" in p for p in problems)
    # a and its 4 CPUs: j1 and j3 hold 2, so a 3-CPU job waits rather than double-books
    assert not isinstance(again.submit(cpus("big", 3), "d", T0 + 1).decision, Placement)


@pytest.mark.parametrize("part, value, kind", [
    ("excluded_gpus", None, "null"), ("nodes_asked", "x", "string"), ("typical", None, "null"),
    ("typical", [1.0], "array")])
def test_a_saved_part_that_is_not_an_object_is_named_and_the_rest_restored(part, value, kind):
    # It was skipped as "'NoneType' object has no attribute 'items'" (Python's words, not
    # what is wrong with the state); a null or a list for the typical job's speeds, without
    # a word: the yardstick that orders victims learnt afresh.
    core = core_with(cpu_node("a", cpus=2), cpu_node("b", cpus=2))
    core.submit(cpus("low", 2), "d", T0)
    core.submit(cpus("low2", 2), "d", T0)
    core.submit(cpus("high", 2, priority=3), "d", T0 + 30)
    saved = json.loads(json.dumps(core.to_dict()))
    saved[part] = value
    again = SchedulerCore(core.settings)
    assert again.restore(saved) == [
        f"cannot restore scheduler {part}, skipping it: a JSON {kind}, not an object"]
    assert sorted(again.running) == ["low", "low2"] and list(again.queue.waiting) == ["high"]
    assert sorted(again.preempting) == ["high"]


def test_a_mistyped_saved_field_costs_its_record_and_the_restored_scheduler_runs_on():
    # A `started_at` of null passed restore, then failed in ray_usage's arithmetic on every
    # pass (a restarted actor crash-looped); a corrupt rejected_owners lost the whole queue.
    core = core_with(cpu_node("a", cpus=8))
    for name in ("j1", "j2", "j3"):
        core.submit(cpus(name, 1, expected_duration_s=600), "d", T0)
    core.submit(cpus("w1", 8), "d", T0)
    core.submit(cpus("w2", 8), "d", T0)
    core.cancel("w2", "", T0 + 1)  # a rejection (and its owner) kept for w2's driver
    saved = json.loads(json.dumps(core.to_dict()))
    saved["running"]["j1"]["started_at"] = None
    saved["running"]["j2"]["placement"]["cpus_per_worker"] = "1"
    saved["queue"]["rejected_owners"] = ["not", "a", "mapping"]
    saved["silent_nodes"] = {"gone": [{"job_name": "j3", "node_id": "gone", "cpus": None,
                                       "gpus": 0}]}
    again = core_with(cpu_node("a", cpus=8))
    problems = again.restore(saved)
    assert sorted(again.running) == ["j3"] and sorted(again.state.reservations) == ["j3"]
    assert list(again.queue.waiting) == ["w1"]
    assert any("running job 'j1'" in p and "started_at is None, not a number" in p
               for p in problems)
    assert any("running job 'j2'" in p and "cpus_per_worker is '1'" in p for p in problems)
    assert any("rejected_owners" in p for p in problems)
    assert any("silent node 'gone'" in p for p in problems)
    again.ray_usage({"a": {"CPU": 7.0}}, T0 + 2)  # raised TypeError with j1 restored
    again.tick(T0 + 3)
    assert {row["job"] for row in again.jobs(T0 + 3)} >= {"j3", "w1"}


def test_a_saved_number_past_floats_range_is_named_with_its_field():
    # (JSON holds any number of digits) The record was skipped as "OverflowError: int too
    # large to convert to float": which field of it, not said.
    core = core_with(cpu_node("a", cpus=8))
    core.submit(cpus("j1", 1), "d", T0)
    core.submit(cpus("w1", 8), "d", T0)
    saved = json.loads(json.dumps(core.to_dict()))
    saved["running"]["j1"]["started_at"] = 10**400
    saved["queue"]["waiting"][0]["enqueued_at"] = -10**400
    problems = core_with(cpu_node("a", cpus=8)).restore(saved)
    assert any("running job 'j1'" in p and "started_at is 1000" in p and "not a number" in p
               for p in problems), problems
    assert any("queued job 'w1'" in p and "enqueued_at is -1000" in p for p in problems)


@pytest.mark.parametrize("field, value", [("cpus", -2.0), ("cpus", float("inf")),
                                          ("gpus", -1), ("gpus", 10**400)])
def test_a_saved_reservation_of_a_negative_or_infinite_amount_is_named_not_taken(field, value):
    # Taken as read: -2 CPUs handed out the two CPUs j1's workers hold (a job placed beside
    # it on a full node); infinite CPUs held the node for ever.
    core = core_with(cpu_node("a", cpus=4))
    core.submit(cpus("j1", 2), "d", T0)
    saved = json.loads(json.dumps(core.to_dict()))
    saved["reservations"]["j1"][0][field] = value
    again = core_with(cpu_node("a", cpus=4))
    problems = again.restore(saved)
    assert any("reservations of 'j1'" in p and f"{field} is {value!r}" in p
               for p in problems), problems
    # j1 holds its placement again (from its running record): 2 CPUs, no more, no less
    assert again.state.reservations["j1"] == core.state.reservations["j1"]
    again.report(cpu_node("a", cpus=4), T0 + 1)
    assert not isinstance(again.submit(cpus("big", 3), "e", T0 + 2).decision, Placement)


def test_a_state_saved_by_a_newer_version_is_read_without_what_it_added():
    # Rolled back after an upgrade: every JobSpec, Placement and Rejection had a field this
    # version lacks. Each record came back skipped, and their reservations were released.
    core = core_with(cpu_node("a", cpus=4))
    core.submit(cpus("run", 2), "d", T0)
    core.submit(cpus("wait", 4), "d", T0)
    core.submit(cpus("gone", 4), "d", T0)
    core.cancel("gone", "", T0 + 1)
    saved = json.loads(json.dumps(core.to_dict()))
    saved["version"] += 1
    saved["running"]["run"]["spec"]["new_field"] = 1
    saved["running"]["run"]["placement"]["new_field"] = 1
    saved["running"]["run"]["new_field"] = 1
    saved["queue"]["waiting"][0]["spec"]["new_field"] = 1
    saved["queue"]["rejected"]["gone"]["new_field"] = 1
    again = SchedulerCore(core.settings)
    problems = again.restore(saved)
    assert len(problems) == 1 and "saved by a newer version" in problems[0]
    assert again.to_dict() == core.to_dict()
    # its own: no problem (restored as the actor does, into a new scheduler: restored over
    # the first, each running job would be started a second time)
    assert SchedulerCore(core.settings).restore(json.loads(json.dumps(core.to_dict()))) == []


@pytest.mark.parametrize("version", ["1", None, 1.5])
def test_a_saved_version_that_is_not_an_integer_is_named_as_such(version):
    # It read "saved in format '1', this scheduler reads format 1 (saved by a newer
    # version?)": a corrupt field taken for an upgrade.
    core = core_with(cpu_node("a", cpus=4))
    core.submit(cpus("run", 2), "d", T0)
    saved = json.loads(json.dumps(core.to_dict()))
    saved["version"] = version
    again = SchedulerCore(core.settings)
    assert again.restore(saved) == [
        f"scheduler state's version is {version!r}, not an integer: read as format 1, what "
        "this scheduler does not know left out"]
    assert again.to_dict() == core.to_dict()


def test_a_running_job_whose_reservation_record_was_lost_holds_its_placement_again():
    core = core_with(cpu_node("a", cpus=4))
    core.submit(cpus("j1", 3), "d", T0)
    saved = json.loads(json.dumps(core.to_dict()))
    saved["reservations"] = {"j1": "not a list of records"}
    again = core_with(cpu_node("a", cpus=4))
    again.restore(saved)
    assert "j1" in again.running and "j1" in again.state.reservations
    assert not isinstance(again.submit(cpus("next", 2), "d", T0 + 1).decision, Placement)


@pytest.mark.parametrize("field, value", [("ray_cpus", float("nan")), ("ray_gpus", -1),
                                          ("ram_available_bytes", float("inf"))])
def test_a_malformed_node_report_is_refused_before_it_changes_anything(field, value):
    core = core_with(cpu_node("good", cpus=8))
    core.ray_alive.add("bad")  # a node Ray lists alive: its agent's report is the problem
    bad = dataclasses.replace(cpu_node("bad"), **{field: value})
    outcome = core.report(bad, T0)
    assert isinstance(outcome.decision, str) and outcome.decision.startswith(
        f"malformed: {field} is")
    assert "bad" not in core.state.reports and "bad" not in core.state.table.index
    assert isinstance(core.submit(cpus("job", 4), "d", T0).decision, Placement)


def test_settings_name_the_bad_field():
    with pytest.raises(ValueError, match="max_preemptions"):
        SchedulerSettings(max_preemptions=-1)
    with pytest.raises(ValueError, match="min_run_s"):
        SchedulerSettings(min_run_s="soon")


def test_a_gpu_found_without_the_memory_asked_is_excluded_and_the_job_placed_again():
    core = core_with(gpu_node("a", gpus=1), gpu_node("b", gpus=1))
    spec = gpus("job", 1, min_gpu_memory_gb=40)
    first = core.submit(spec, "d", T0).decision
    node = first.nodes[0]
    other = "b" if node == "a" else "a"
    again = core.gpu_too_small("job", "d", [(node, 0)], T0 + 5).decision
    assert isinstance(again, Placement) and again.nodes == [other]
    assert json.loads(json.dumps(core.to_dict()))["excluded_gpus"] == {"job": [[node, 0]]}
    # Both GPUs ruled out: no GPU can give it the memory asked, the driver is told why.
    dropped = core.gpu_too_small("job", "d", [(other, 0)], T0 + 6).decision
    assert isinstance(dropped, Rejection) and "1 excluded for this job" in dropped.message
    core.cancel("job", "d", T0 + 7)
    assert not core.excluded_gpus and not core.state.reservations


def test_a_retried_gpu_too_small_is_answered_not_carried_out_twice():
    # The reply to the first call was lost (the actor died after its save; Ray retries the
    # call, or the driver's link sends it again): the retry took the GPU already excluded
    # for "Ray picked it again", ruled out the whole node and rejected a job GPU 1 could hold.
    core = core_with(gpu_node("n", gpus=2))
    core.submit(gpus("job", 1, min_gpu_memory_gb=40), "d", T0)
    first = core.gpu_too_small("job", "d", [("n", 0)], T0 + 5, given_back=0).decision
    retried = core.gpu_too_small("job", "d", [("n", 0)], T0 + 6, given_back=0)
    assert isinstance(first, Placement) and retried.decision == first
    assert core.excluded_gpus["job"] == {("n", 0)}
    assert core.running["job"].started_at == T0 + 5 and not retried.persist
    # The driver's next report (its second give-back) is a new one: Ray picked GPU 0 again.
    again = core.gpu_too_small("job", "d", [("n", 0)], T0 + 7, given_back=1).decision
    assert isinstance(again, Rejection) and "2 excluded for this job" in again.message


def test_a_retried_yielded_does_not_stop_the_placement_the_first_call_made():
    # After an operator's preemption the first yielded placed the job again; its retry
    # stopped that placement and placed the job once more (its room, on a busy cluster, or a
    # migration's target could be lost to another job in between).
    core = core_with(cpu_node("n", cpus=4))
    core.submit(cpus("job", 2), "d", T0)
    core.preempt("job", T0 + 10)
    core.directive("job", T0 + 11)
    first = core.yielded("job", "d", T0 + 12, given_back=0).decision
    retried = core.yielded("job", "d", T0 + 13, given_back=0)
    assert isinstance(first, Placement) and retried.decision == first
    assert core.running["job"].started_at == T0 + 12 and core.running["job"].preemptions == 1
    assert core.placements_given_back == {"job": 1}
    # Saved with the state: a scheduler restarted between the two calls answers alike.
    restored = SchedulerCore(core.settings)
    assert not restored.restore(json.loads(json.dumps(core.to_dict())))
    assert restored.yielded("job", "d", T0 + 14, given_back=0).decision == first
    assert restored.running["job"].started_at == T0 + 12


def test_a_retried_yielded_of_a_cancelled_job_is_told_the_cancel_again():
    # The retry was told "job 'job' is not in the queue" (the rejection was handed over once),
    # so the driver's exit 3 did not say that an operator had cancelled it.
    core = core_with(cpu_node("n", cpus=4))
    core.submit(cpus("job", 2), "d", T0)
    core.cancel("job", "", T0 + 20)
    core.directive("job", T0 + 21)
    first = core.yielded("job", "d", T0 + 22, given_back=0).decision
    retried = core.yielded("job", "d", T0 + 23, given_back=0).decision
    assert first.cancelled and retried == first and "was cancelled" in retried.message
    assert core.release("job", "d", T0 + 24).decision is False  # its driver is done with it
    assert "job" not in core.queue.rejected and not core.placements_given_back


def test_a_poll_sent_again_is_told_the_cancel_again_until_the_driver_releases_the_job():
    # The driver's link resends a poll that timed out; Ray still runs the first one
    # (max_task_retries=-1), which took the operator's cancel: the resend was told "job 'b' is
    # not in the queue" and the driver exited 3 without saying it was cancelled.
    core = core_with(gpu_node("n1"))
    core.submit(gpus("a", 4), "d0", T0)
    core.submit(gpus("b", 2), "d", T0 + 1)
    core.cancel("b", "", T0 + 2)
    first = core.poll("b", "d", T0 + 3).decision
    resent = core.poll("b", "d", T0 + 4).decision
    assert first.cancelled and resent == first and "cancelled by an operator" in resent.message
    assert "not in the queue" in core.poll("b", "other", T0 + 5).decision.message
    assert core.poll("b", "", T0 + 5).decision == first  # an operator's look takes nothing
    assert core.release("b", "d", T0 + 6).decision is False  # its driver is done with it
    assert "b" not in core.queue.rejected
    # A driver that exits instead: forgotten with the others kept for dead drivers.
    core.submit(gpus("c", 2), "d2", T0 + 7)
    core.cancel("c", "", T0 + 8)
    assert core.poll("c", "d2", T0 + 9).decision.cancelled
    core.owners_dead({"d2"}, T0 + 10)
    assert "c" not in core.queue.rejected


def test_each_decision_is_counted_once():
    core = core_with(cpu_node("a", cpus=2))
    placed = core.submit(cpus("one", 2), "d", T0)
    queued = core.submit(cpus("two", 2), "d", T0)
    outcomes = [s[2]["outcome"] for s in placed.samples + queued.samples
                if s[0].name == "orchestrator_scheduler_placement_decisions"]
    assert outcomes == ["placed", "queued"]


def test_a_submitted_job_the_cluster_can_never_hold_is_counted_once_by_its_reason():
    """Refused at submission by the queue pass (a GPU with more memory than any has, a
    bandwidth floor no node set meets): counted once, by what stood in the way. The pass
    counted it as cluster_shrank (a job that waited, refused as nodes left), and submit's
    own check again as capacity: two rejections of one job, neither ever bandwidth."""
    from orchestrator import metric_catalogue as m

    def counted(outcome):
        return [(spec.name, tags) for spec, _, tags in outcome.samples
                if spec in (m.SCHEDULER_PLACEMENTS, m.SCHEDULER_REJECTIONS)]

    rejected = [(m.SCHEDULER_PLACEMENTS.name, {"outcome": "rejected"})]
    core = core_with(gpu_node("a"), gpu_node("b"))
    memory = core.submit(gpus("memory", 1, min_gpu_memory_gb=200), "d", T0)
    assert isinstance(memory.decision, Rejection), memory.decision
    assert counted(memory) == rejected + [(m.SCHEDULER_REJECTIONS.name,
                                           {"reason": m.REJECT_CAPACITY})]
    network = core.submit(gpus("network", 8, min_bandwidth_gbps=1000), "d", T0)
    assert isinstance(network.decision, Rejection), network.decision
    assert counted(network) == rejected + [(m.SCHEDULER_REJECTIONS.name,
                                            {"reason": m.REJECT_BANDWIDTH})]


def test_a_gpu_reported_short_twice_rules_out_its_whole_node_for_the_job():
    core = core_with(gpu_node("a", gpus=4), gpu_node("b", gpus=4))
    spec = gpus("job", 1, min_gpu_memory_gb=40)
    node = core.submit(spec, "d", T0).decision.nodes[0]
    other = "b" if node == "a" else "a"
    # Its 3 other GPUs are now the tightest fit, but Ray picks the GPU id and may pick the
    # same short one again: the second report rules the node out for this job.
    assert core.gpu_too_small("job", "d", [(node, 2)], T0 + 1).decision.nodes == [node]
    assert core.gpu_too_small("job", "d", [(node, 2)], T0 + 2).decision.nodes == [other]


def test_cpus_ray_work_not_placed_here_holds_are_not_free():
    core = core_with(cpu_node("a", cpus=4), cpu_node("b", cpus=4))
    core.submit(cpus("ours", 2), "d", T0)  # on a or b; Ray shows it using 2 CPUs there
    mine = core.running["ours"].placement.nodes[0]
    other = "b" if mine == "a" else "a"
    # Ray: our job's 2 CPUs in use, and 3 of the other node's CPUs held by a Serve replica.
    core.ray_usage({mine: {"CPU": 2.0}, other: {"CPU": 1.0}}, T0 + 1)
    assert core.state.outside_on(mine) == (0.0, 0) and core.state.outside_on(other) == (3.0, 0)
    big = JobSpec("big", num_workers=2, cpus_per_worker=2.0)
    waiting = core.submit(big, "d", T0 + 2).decision
    assert isinstance(waiting, Queued)  # room for one 2-CPU worker, not two
    assert "used by Ray work not placed here" in core.place_now(big, "", T0 + 2, dry_run=True,
                                                               explain=True).decision.message
    core.ray_usage({mine: {"CPU": 2.0}, other: {"CPU": 4.0}}, T0 + 3)  # the replica left
    assert core.poll("big", "d", T0 + 4).decision.nodes == [other]  # all 4 free there now


def test_a_gpu_held_outside_stays_held_while_a_new_job_starts_beside_it():
    # A Serve replica holds 1 of n's 2 GPUs. j1 takes the other; before j1's worker runs, Ray
    # still shows 1 GPU used: netted against j1's reservation, the replica's GPU looked free
    # and j2 was placed on it (3 GPUs promised on a 2-GPU node).
    core = core_with(gpu_node("n", gpus=2))
    core.ray_usage({"n": {"CPU": 16.0, "GPU": 1.0}}, T0 + 1)
    assert core.submit(gpus("j1", 1), "d1", T0 + 2).decision.nodes == ["n"]
    core.ray_usage({"n": {"CPU": 16.0, "GPU": 1.0}}, T0 + 5)  # j1 not started yet
    assert core.state.outside_on("n") == (0.0, 1)
    assert isinstance(core.submit(gpus("j2", 1), "d2", T0 + 6).decision, Queued)
    # Past the grace, Ray's figure counts again (here: the replica left, j1 runs).
    grace = core.settings.worker_start_grace_s
    core.ray_usage({"n": {"CPU": 15.0, "GPU": 1.0}}, T0 + 2 + grace)
    assert core.state.outside_on("n") == (0.0, 0)
    assert core.poll("j2", "d2", T0 + 3 + grace).decision.nodes == ["n"]


def test_a_migration_claim_does_not_hide_a_gpu_held_outside():
    # A replica holds 1 of the A100 node's 3 GPUs; a job is claiming the other 2 to move
    # there (nothing runs on them yet): netted against the claim, the replica's GPU looked
    # free and an A100 job was placed on it (4 GPUs promised on a 3-GPU node).
    core = core_with(gpu_node("t4", gpus=2, family="T4"), gpu_node("a100", gpus=3))
    core.ray_usage({"a100": {"CPU": 16.0, "GPU": 2.0}, "t4": {"CPU": 16.0, "GPU": 2.0}}, T0)
    core.submit(gpus("blocker", 2, accelerator_types=("A100",)), "d", T0 + 1)
    assert core.submit(gpus("job", 2, expected_duration_s=36000), "d", T0 + 1).decision.nodes \
        == ["t4"]
    later = T0 + 500
    core.ray_usage({"a100": {"CPU": 16.0, "GPU": 0.0}, "t4": {"CPU": 16.0, "GPU": 0.0}}, later)
    assert yields(core.release("blocker", "d", later))["job"].kind == MIGRATE
    core.ray_usage({"a100": {"CPU": 16.0, "GPU": 2.0}, "t4": {"CPU": 16.0, "GPU": 0.0}}, later + 5)
    assert core.state.outside_on("a100") == (0.0, 1)
    assert isinstance(core.submit(gpus("thief", 1, accelerator_types=("A100",)), "d2",
                                  later + 6).decision, Queued)


def test_a_job_on_a_node_of_two_families_runs_at_the_slower_ones_pace():
    # Its family read as "" (speed 1.0): a job on an H100 + A100 node was told to migrate to
    # an A100 node for nothing ("from  to A100 ... at 1x, 2.2x there").
    import dataclasses

    h100, a100 = gpu_node("x", gpus=2, family="H100"), gpu_node("y", gpus=2, family="A100")
    mixed = dataclasses.replace(h100, node_id="mixed", hostname="mixed", gpus=(
        h100.gpus[0], dataclasses.replace(a100.gpus[0], index=1)))
    core = core_with(mixed, gpu_node("a100", gpus=2))
    core.submit(gpus("blocker", 2, accelerator_types=("A100",)), "d", T0)
    assert core.submit(gpus("job", 2, expected_duration_s=36000), "d", T0).decision.nodes \
        == ["mixed"]
    assert core.running_family("job") == "A100"
    assert yields(core.release("blocker", "d", T0 + 600)) == {}


def test_a_restarted_scheduler_waits_for_unreported_nodes_before_calling_a_job_unfittable():
    core = core_with(cpu_node("a", cpus=2))
    again = SchedulerCore(core.settings)  # restarted: Ray lists a and b, neither reported yet
    again.ray_nodes({"a", "b"}, set(), T0)
    after_loss = again.place_now(cpus("job", 2), "d", T0).decision
    assert after_loss.fits_when_free and "have not reported yet" in after_loss.message
    assert isinstance(again.submit(cpus("waits", 2), "d", T0).decision, Queued)
    again.report(cpu_node("a", cpus=2), T0 + 1)
    again.report(cpu_node("b", cpus=2), T0 + 1)
    assert isinstance(again.poll("waits", "d", T0 + 2).decision, Placement)
    never = again.submit(cpus("too-big", 5), "d", T0 + 3).decision  # all reported: final
    assert isinstance(never, Rejection) and not never.fits_when_free


def test_after_a_restart_the_queue_places_nothing_until_the_alive_nodes_have_reported():
    core = core_with(cpu_node("a", cpus=2), gpu_node("gpu", gpus=2, cpus=2))
    again = SchedulerCore(core.settings)
    again.restore(core.to_dict())
    again.restored_at = T0
    again.ray_nodes({"a", "gpu"}, set(), T0)
    again.report(gpu_node("gpu", gpus=2, cpus=2), T0 + 1)  # "a" has not reported yet
    waiting = again.submit(cpus("cpu-job", 2), "d", T0 + 1).decision
    assert isinstance(waiting, Queued)  # not on the GPU node just because it reported first
    again.report(cpu_node("a", cpus=2), T0 + 2)
    assert again.poll("cpu-job", "d", T0 + 3).decision.nodes == ["a"]


# -- least attained service, and placement that weighs the queue ------------------------------------

def test_las_a_new_job_preempts_a_same_priority_job_that_has_run_past_a_level():
    core = core_with(gpu_node("a", gpus=2))
    core.submit(gpus("long", 2), "d", T0)
    # 2 GPUs x 3,000 s = 6,000 GPU-s: still level 0 (< 7,200), as the new job; it waits.
    assert not yields(core.submit(gpus("early", 2), "d", T0 + 3000))
    core.cancel("early", "d", T0 + 3000)
    # 2 GPUs x 3,601 s = 7,202 GPU-s: level 1 now; the new job at level 0 outranks it.
    out = core.submit(gpus("new", 2), "d", T0 + 3601)
    assert "least attained service" in yields(out)["long"].reason
    core.yielded("long", "d", T0 + 3602)
    assert isinstance(core.poll("new", "d", T0 + 3603).decision, Placement)
    # A later fresh job goes ahead of the preempted one, though submitted after it.
    core.submit(gpus("newer", 1), "d", T0 + 3604)
    assert [j.spec.name for j in core.queue.ordered()] == ["newer", "long"]


def test_starvation_guard_puts_a_long_waiting_job_back_at_level_0():
    """Tiresias' promotion: a job preempted after running 100 s (level 1 here) that has
    waited twice that goes back to level 0, ahead of later level-0 jobs; a stale due time
    (it left the queue and came back) promotes nothing early; the flag survives a restart."""
    level = lambda attained: int(attained >= 50)  # noqa: E731 - level 1 from 50 GPU-s
    q = JobQueue(level, promote_after=lambda job: 2 * job.ran_s)
    q.add(QueuedJob(gpus("old", 1), "o", 10.0, ran_s=100.0, queued_at=500.0))
    q.add(QueuedJob(gpus("fresh", 1), "o", 600.0))
    assert [j.spec.name for j in q.ordered()] == ["fresh", "old"]
    assert q.promote_due(699.0) == []  # due at 500 + 2 x 100
    assert q.promote_due(700.0) == ["old"]
    assert [j.spec.name for j in q.ordered()] == ["old", "fresh"]  # submitted first
    again = JobQueue.from_dict(json.loads(json.dumps(q.to_dict())), level,
                               promote_after=lambda job: 2 * job.ran_s)
    assert [j.spec.name for j in again.ordered()] == ["old", "fresh"]
    # Requeued later (it ran again and was preempted): the earlier due time is stale.
    q.remove("old")
    q.add(QueuedJob(gpus("old", 1), "o", 10.0, ran_s=150.0, queued_at=1000.0))
    q.add(QueuedJob(gpus("other", 1), "o", 20.0, ran_s=100.0, queued_at=0.0))
    assert q.promote_due(1200.0) == ["other"]  # "old" is due at 1300, not at its old 700
    assert q.promote_due(1300.0) == ["old"]


def test_the_core_promotes_only_when_starvation_factor_is_set():
    def scene(**settings):
        core = core_with(gpu_node("a", gpus=2), **settings)
        core.submit(gpus("long", 2), "d", T0)
        core.submit(gpus("new", 2), "d", T0 + 3601)  # preempts "long" (level 1 by then)
        core.yielded("long", "d", T0 + 3602)
        core.submit(gpus("newer", 2), "d", T0 + 3603)
        # "long" ran 3,602 s; with a factor of 1 it is due back at level 0 at T0 + 7,204.
        core.cancel("newer", "d", T0 + 7204)
        core.submit(gpus("newest", 2), "d", T0 + 7205)
        return [j.spec.name for j in core.queue.ordered()]
    assert scene(starvation_factor=1.0) == ["long", "newest"]
    assert scene() == ["newest", "long"]


def test_a_promoted_job_keeps_level_0_once_it_runs_and_across_a_restart():
    # Tiresias resets a promoted job's attained service. Here 'long', put back at level 0 by
    # the starvation guard, was ranked by all it had ever run once it started again, and
    # the next new job preempted it as soon as min_run_s had passed, each time.
    core = core_with(gpu_node("a", gpus=2), min_run_s=120.0, starvation_factor=1.0)
    core.submit(gpus("long", 2), "d", T0)
    core.submit(gpus("new", 2), "d", T0 + 4000)  # 'long' has 8,000 GPU-s: level 1
    core.yielded("long", "d", T0 + 4001)
    core.poll("new", "d", T0 + 4001)
    # Waited as long as it ran: back at level 0, it preempts 'new' (level 1 by then).
    assert set(yields(core.tick(T0 + 8002))) == {"new"}
    core.yielded("new", "d", T0 + 8003)
    assert isinstance(core.poll("long", "d", T0 + 8003).decision, Placement)
    again = core_with(gpu_node("a", gpus=2), min_run_s=120.0, starvation_factor=1.0)
    assert again.restore(json.loads(json.dumps(core.to_dict()))) == []
    for c in (core, again):
        out = c.submit(gpus("newest", 2), "d", T0 + 8200)
        assert not yields(out) and isinstance(out.decision, Queued)
    # What it ran in all is still reported as such.
    assert core.running["long"].attained_s(T0 + 8200) == pytest.approx((4001 + 197) * 2)
    # A running job saved before the baseline existed loads, unpromoted.
    saved = core.running["long"].to_dict()
    del saved["las_baseline_s"]
    assert RunningJob.from_dict(saved).las_baseline_s == 0.0
    # A promoted waiting job saved before it: its promotion cleared all it had run.
    waiting = QueuedJob(gpus("old", 2), "d", T0, ran_s=50.0, promoted=True).to_dict()
    del waiting["las_baseline_s"]
    assert QueuedJob.from_dict(waiting).las_baseline_s == 50.0


def test_fifo_queue_order_never_preempts_within_a_priority_class():
    core = core_with(gpu_node("a", gpus=2), queue_order="fifo")
    core.submit(gpus("long", 2), "d", T0)
    out = core.submit(gpus("new", 2), "d", T0 + 100_000)
    assert not yields(out) and isinstance(out.decision, Queued)
    core.submit(gpus("newer", 1), "d", T0 + 100_001)
    assert [j.spec.name for j in core.queue.ordered()] == ["new", "newer"]


def test_a_flexible_job_keeps_off_the_family_a_single_family_job_waits_for():
    def scene(**settings):
        core = core_with(gpu_node("a100", gpus=8), gpu_node("t4", gpus=8, family="T4"),
                         **settings)
        core.submit(gpus("small", 1, accelerator_types=("A100",)), "d", T0)
        gang = core.submit(gpus("gang", 8, accelerator_types=("A100",)), "d", T0 + 1)
        assert isinstance(gang.decision, Queued)
        return core.submit(gpus("flex", 1), "d", T0 + 2).decision

    flex = scene()
    assert isinstance(flex, Placement) and flex.nodes == ["t4"]  # A100 is the faster family
    # Without weighing the queue the flexible job wants an A100, which the waiting gang job's
    # reservation forbids; it waited while eight T4s idled, and is now asked again without
    # the A100s (SchedulerCore._backfill_elsewhere).
    flex = scene(comparative_advantage=False)
    assert isinstance(flex, Placement) and flex.nodes == ["t4"]



def test_a_job_refused_as_backfill_starts_on_the_pass_after_a_later_job_took_its_gpus():
    # Node a (4 A100s) runs r1 (3 GPUs, 100 s); the 4-GPU head waits for a (b has 2 GPUs).
    # x (1 GPU, no estimate) is placed on a's free GPU, tightest first, and refused: it
    # would delay the head. Its other option is b, of the same family, so being asked again
    # on its other families (_backfill_elsewhere) finds nothing. y (1 GPU, 50 s) then takes
    # a's GPU: it ends before the head starts. x now fits only on b, which the head cannot
    # use: the core asks for a pass just after (next_wakeup, _repass_due), as the live
    # actor's next tick makes one, and that pass starts x on b. Without it a driver that
    # calls the core only on events (the simulator) left x waiting until the next one.
    core = core_with(gpu_node("a", gpus=4), gpu_node("b", gpus=2))
    core.submit(JobSpec("r1", num_workers=1, gpus_per_worker=3, expected_duration_s=100),
                "d", T0)
    assert isinstance(core.submit(JobSpec("head", num_workers=1, gpus_per_worker=4), "d",
                                  T0 + 1).decision, Queued)
    assert isinstance(core.submit(gpus("x", 1), "d", T0 + 2).decision, Queued)
    assert "would delay 'head'" in core.queue.waiting["x"].reason
    y = core.submit(gpus("y", 1, expected_duration_s=50), "d", T0 + 3).decision
    assert isinstance(y, Placement) and y.nodes == ["a"]
    assert "x" not in core.running
    wake = core.next_wakeup(T0 + 3, T0 + 1000)
    assert wake is not None and wake < T0 + 4
    core.tick(wake)
    assert core.running["x"].placement.nodes == ["b"]
    assert core.next_wakeup(wake, T0 + 1000) is None  # (asked once)

def a100_and_t4_core(gain, gpus, **settings):
    """A core over one A100 and one T4 node of `gpus` GPUs each, where job NAME runs
    gain[NAME] times faster on the A100."""
    core = SchedulerCore(SchedulerSettings(suspect_after_s=1e4, dead_after_s=1e5, **settings),
                         speed=lambda spec, family: gain[spec.name] if family == "A100" else 1.0)
    nodes = (gpu_node("a100", gpus=gpus), gpu_node("t4", gpus=gpus, family="T4"))
    core.ray_nodes({n.node_id for n in nodes}, set(), T0)
    for n in nodes:
        core.report(n, T0)
    return core


def test_under_contention_the_job_that_gains_least_from_the_fast_family_takes_the_slow_one():
    gain = {"lm": 1.2, "cnn": 4.0, "tail": 4.0, "hold": 1.0}  # speed on A100 over T4

    def scene(**settings):
        core = a100_and_t4_core(gain, 1, **settings)
        core.submit(gpus("hold", 2), "d", T0)  # holds both GPUs
        for i, name in enumerate(("lm", "cnn", "tail")):  # in this order in line
            assert isinstance(core.submit(gpus(name, 1), "d", T0 + 1 + i).decision, Queued)
        core.release("hold", "d", T0 + 5)  # both free at once: lm is first in line
        return {name: core.running[name].placement.nodes[0] for name in ("lm", "cnn")}

    # lm gains 1.2x on the A100, a typical job here ~2.5x: it takes the T4 and leaves the A100
    # to cnn, which gains 4x. Fastest-first gives lm (first in line) the A100.
    assert scene() == {"lm": "t4", "cnn": "a100"}
    assert scene(comparative_advantage=False) == {"lm": "a100", "cnn": "t4"}


def test_queue_counts_waiting_gpus_by_allowed_families():
    q = JobQueue()
    q.add(QueuedJob(gpus("a", 8, accelerator_types=("a100",)), "o", 1.0))
    q.add(QueuedJob(gpus("b", 2), "o", 2.0))
    q.add(QueuedJob(gpus("c", 1, accelerator_types=("V100", "A100")), "o", 3.0))
    assert q.gpus_by_allowed == {("A100",): 8, (): 2, ("A100", "V100"): 1}
    q.remove("a")
    q.remove("b")
    assert q.gpus_by_allowed == {("A100", "V100"): 1}
    assert q.sizes_by_allowed == {(("A100", "V100"), 1): 1}


@pytest.mark.parametrize("bad, field", [({"queue_order": "sjf"}, "queue_order"),
                                        ({"starvation_factor": -1}, "starvation_factor"),
                                        ({"las_thresholds_gpu_s": (10, 5)}, "las_thresholds"),
                                        ({"protect_share": 0}, "protect_share"),
                                        ({"preemption_searches_per_pass": 0},
                                         "preemption_searches_per_pass")])
def test_bad_policy_settings_name_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        SchedulerSettings(**bad)


def test_a_shielded_family_is_kept_for_the_jobs_that_can_run_only_there():
    gain = {"pinned": 1.2, "big": 1.2, "flex": 4.0}  # speed on A100 over T4

    def scene(**settings):
        core = a100_and_t4_core(gain, 8, **settings)
        # A100-only jobs hold half the A100s; a 13-GPU job waits for them to end (T0 + 100).
        core.submit(gpus("pinned", 4, accelerator_types=("A100",), expected_duration_s=100),
                    "d", T0)
        assert isinstance(core.submit(gpus("big", 13), "d", T0 + 1).decision, Queued)
        # A short job that may run anywhere, and gains 4x on an A100, ends before big starts.
        flex = core.submit(gpus("flex", 1, expected_duration_s=50), "d", T0 + 2).decision
        return flex.nodes[0]

    assert scene(protect_share=0.5) == "t4"  # single-family jobs hold half: shielded
    assert scene() == "a100"  # the default shields only a family they fill


# -- found by a review (2026-12-05) ------------------------------------------------------------

def unknown_family_node(node_id, gpus=4):
    """A card the family table does not know (an RTX A6000): family ""."""
    return NodeReport(node_id=node_id, hostname=node_id, ray_cpus=16, ray_gpus=gpus,
                      cpu_count=16, load_avg_1m=0.0, ram_total_bytes=64 * GIB,
                      ram_available_bytes=64 * GIB,
                      gpus=tuple(GpuInfo(i, "NVIDIA RTX A6000", 48 * GIB, 48 * GIB)
                                 for i in range(gpus)))


def test_gpus_of_no_known_family_serve_the_jobs_that_name_none():
    core = core_with(unknown_family_node("rtx"))
    assert core.submit(gpus("alone", 2), "o", T0).decision.worker_nodes == ("rtx", "rtx")
    # Beside two known families (comparative advantage chooses among them), once those are
    # full: the unknown cards, not the queue; a job that names a family never goes there.
    core = core_with(gpu_node("a100", gpus=2), gpu_node("t4", gpus=2, family="T4"),
                     unknown_family_node("rtx"))
    core.submit(gpus("fills-a100", 2, accelerator_types=("A100",)), "o", T0)
    core.submit(gpus("fills-t4", 2, accelerator_types=("T4",)), "o", T0)
    assert core.submit(gpus("any", 2), "o", T0 + 1).decision.worker_nodes == ("rtx", "rtx")
    assert isinstance(core.submit(gpus("a100-only", 2, accelerator_types=("A100",)), "o",
                                  T0 + 2).decision, Queued)


def test_a_node_with_two_gpu_families_serves_the_jobs_that_name_none():
    # Its GPUs counted for no family ("A100+T4" as a family of its own): a job naming none
    # waited in the queue for ever beside a free node, "room for 0 worker(s)".
    import dataclasses

    t4 = gpu_node("x", gpus=2, family="T4")
    mixed = dataclasses.replace(t4, node_id="mixed", hostname="mixed", gpus=(
        t4.gpus[0], dataclasses.replace(gpu_node("y", gpus=1).gpus[0], index=1)))
    core = core_with(gpu_node("a100", gpus=2), mixed)
    core.submit(gpus("fills-a100", 2, accelerator_types=("A100",)), "o", T0)
    assert core.submit(gpus("any", 2), "o", T0 + 1).decision.worker_nodes == ("mixed", "mixed")
    assert isinstance(core.submit(gpus("a100-only", 1, accelerator_types=("A100",)), "o",
                                  T0 + 2).decision, Queued)


def test_a_job_taking_no_gpus_leaves_the_cpus_a_waiting_gpu_job_needs():
    # One node, 4 GPUs, 8 CPUs. The head H needs all 4 GPUs with 2 CPUs each; a long CPU job
    # would take 6 CPUs beside the GPUs and hold H back for good.
    core = core_with(gpu_node("n1", gpus=4, cpus=8), preemption=False)
    core.submit(JobSpec("A", num_workers=2, gpus_per_worker=1, expected_duration_s=1000),
                "a", T0)
    head = core.submit(JobSpec("H", num_workers=4, gpus_per_worker=1, cpus_per_worker=2,
                               expected_duration_s=1000), "h", T0 + 1).decision
    assert isinstance(head, Queued) and "8 CPUs, 2 GPU(s) and 6 CPUs free now" in head.reason
    cpu_job = core.submit(JobSpec("C", num_workers=6, cpus_per_worker=1,
                                  expected_duration_s=50_000), "c", T0 + 2).decision
    assert isinstance(cpu_job, Queued) and "would delay 'H'" in cpu_job.reason
    core.release("A", "a", T0 + 1000)
    assert isinstance(core.poll("H", "h", T0 + 1001).decision, Placement)
    # A CPU job of lower priority already running there is preempted for a GPU job.
    core = core_with(gpu_node("n1", gpus=4, cpus=8))
    core.submit(JobSpec("C", num_workers=6, cpus_per_worker=1), "c", T0)
    core.submit(JobSpec("H", num_workers=4, gpus_per_worker=1, cpus_per_worker=2, priority=5),
                "h", T0 + 1)
    outcome = core.tick(T0 + 100)
    assert core.running["C"].directive.kind == PREEMPT and "C" in yields(outcome)


def test_a_restarted_scheduler_gives_back_a_silent_nodes_reservations_when_it_reports():
    settings = dict(suspect_after_s=15, dead_after_s=60)
    core = core_with(gpu_node("n1"), gpu_node("n2"), **settings)
    core.submit(gpus("big", 8), "o1", T0)
    core.report(gpu_node("n1"), T0 + 50)
    assert core.tick(T0 + 61).decision["expired"] == ["n2"]  # quiet: its workers may still run
    again = SchedulerCore(core.settings)
    again.ray_nodes({"n1", "n2"}, set(), T0 + 62)
    assert again.restore(json.loads(json.dumps(core.to_dict()))) == []
    again.report(gpu_node("n1"), T0 + 62)
    again.report(gpu_node("n2"), T0 + 63)  # it answers again: big still runs there
    assert again.state.reserved_on("n2") == (4.0, 4)  # once, not twice, not none
    assert isinstance(again.submit(gpus("other", 4), "o2", T0 + 64).decision, Queued)


def big_on_two_nodes_the_second_silent() -> tuple[SchedulerCore, dict]:
    """Job big (8 GPUs) on n1 and n2, n2 silent past dead_after_s (its part kept aside), and
    the core's saved state then."""
    core = core_with(gpu_node("n1"), gpu_node("n2"), suspect_after_s=15, dead_after_s=60)
    core.submit(gpus("big", 8), "o1", T0)
    core.report(gpu_node("n1"), T0 + 50)
    assert core.tick(T0 + 61).decision["expired"] == ["n2"]
    return core, json.loads(json.dumps(core.to_dict()))


def test_a_silent_nodes_reservation_of_a_job_not_restored_never_goes_to_a_later_namesake():
    # big runs on n1 and n2; n2 falls silent (its part kept aside). The scheduler restarts and
    # cannot read big's record: big's reservations are released, but the part kept aside
    # stayed, and went to the next job named big (on n1 alone) once n2 reported again: n2's
    # GPUs held by nobody's workers for as long as that job ran.
    core, saved = big_on_two_nodes_the_second_silent()
    saved["running"]["big"]["placement"] = "garbage"
    again = SchedulerCore(core.settings)
    again.ray_nodes({"n1", "n2"}, set(), T0 + 62)
    problems = again.restore(saved)
    assert any("cannot restore running job 'big'" in p for p in problems)
    again.report(gpu_node("n1"), T0 + 62)
    assert again.submit(gpus("big", 4), "o2", T0 + 63).decision.nodes == ["n1"]
    again.report(gpu_node("n2"), T0 + 64)  # it answers again
    assert again.state.reserved_on("n2") == (0.0, 0)
    assert again.submit(gpus("other", 4), "o3", T0 + 65).decision.nodes == ["n2"]


def test_a_new_job_is_not_answered_with_an_earlier_jobs_rejection():
    core = core_with(gpu_node("n1"))
    core.submit(gpus("blocker", 4), "d0", T0)
    core.submit(gpus("x", 2), "d1", T0 + 1)
    assert core.cancel("x", "", T0 + 2).decision  # an operator; d1 never polls again
    again = core.submit(gpus("x", 2), "d2", T0 + 100).decision
    assert isinstance(again, Queued) and core.owner_of("x") == "d2"


def test_releasing_a_waiting_job_takes_it_out_of_the_queue():
    # A driver interrupted while its job waits (launch's finally releases it).
    core = core_with(gpu_node("n1"))
    core.submit(gpus("blocker", 4), "d0", T0)
    core.submit(gpus("x", 2), "d1", T0 + 1)
    assert core.release("x", "d1", T0 + 2).decision and "x" not in core.queue.waiting
    core.release("blocker", "d0", T0 + 100)
    assert not core.running and core.state.reserved_on("n1") == (0.0, 0)


def test_a_job_placed_again_after_a_lost_node_keeps_the_service_it_had():
    core = core_with(gpu_node("n1"), gpu_node("n2"))
    spec = gpus("long", 4, expected_duration_s=100_000)
    core.submit(spec, "o", T0)
    t = T0 + 20_000
    before = core.running["long"]
    attained, end = before.attained_s(t), before.planned_end
    core.report(gpu_node("n1"), t)
    core.report(gpu_node("n2"), t)
    core.replace(spec, "o", list(before.placement.nodes), t)
    after = core.running["long"]
    assert after.placement.nodes != before.placement.nodes
    assert after.attained_s(t) == pytest.approx(attained) and after.planned_end == end


def _t4_head_over_busy_a100s() -> SchedulerCore:
    """An 8-GPU A100 node held by 's0' and 's1' (4 each), a 4-GPU T4 node held by 'long',
    and 'H' (4 T4s) waiting first in line."""
    core = core_with(gpu_node("a", gpus=8), gpu_node("t", gpus=4, family="T4"))
    core.submit(gpus("long", 4, accelerator_types=("T4",)), "d", T0)
    for name in ("s0", "s1"):
        core.submit(gpus(name, 4, accelerator_types=("A100",)), "d", T0)
    assert isinstance(core.submit(gpus("H", 4, accelerator_types=("T4",)), "d",
                                  T0 + 1).decision, Queued)
    return core


def test_the_first_job_blocked_on_gpus_the_head_cannot_use_is_not_starved_by_later_ones():
    # 'H' (T4 only) heads the queue; 'X' (8 A100s) waits behind it. EASY protected the head
    # alone: every 4-GPU A100 job submitted after X took the A100s as they freed, so X never
    # found 8 free at once, for as long as such jobs came (LAS: all level 0, no preemption).
    core = _t4_head_over_busy_a100s()
    assert isinstance(core.submit(gpus("X", 8, accelerator_types=("A100",)), "d",
                                  T0 + 2).decision, Queued)
    core.release("s0", "d", T0 + 500)
    late = core.submit(gpus("s2", 4, accelerator_types=("A100",)), "d", T0 + 501).decision
    assert isinstance(late, Queued) and "would delay 'X'" in core.queue.waiting["s2"].reason
    core.release("s1", "d", T0 + 1000)
    assert isinstance(core.poll("X", "d", T0 + 1001).decision, Placement)
    # A job on capacity neither blocked job can use still starts (nothing idles for them)
    core.ray_nodes({"a", "t", "c"}, set(), T0 + 1002)
    core.report(cpu_node("c", cpus=4), T0 + 1002)
    assert isinstance(core.submit(cpus("cpu", 2), "d", T0 + 1003).decision, Placement)


def test_a_blocked_job_naming_the_heads_family_but_unable_to_use_it_gets_its_own_plan():
    # 'X' may run on A100 or T4, but its 8-GPU worker fits no 4-GPU T4 node: its nodes are
    # all ones the T4-only head cannot use. Its naming T4 alone cost it its reservation, and
    # every 4-GPU job after it allowed A100 (and T4, as X: no first call on the A100s) took
    # the A100s as they freed.
    core = _t4_head_over_busy_a100s()
    core.submit(JobSpec("X", num_workers=1, gpus_per_worker=8, accelerator_types=("A100", "T4")),
                "d", T0 + 2)
    core.release("s0", "d", T0 + 500)
    late = core.submit(gpus("s2", 4, accelerator_types=("A100", "T4")), "d", T0 + 501).decision
    assert isinstance(late, Queued) and "would delay 'X'" in late.reason
    core.release("s1", "d", T0 + 1000)
    assert isinstance(core.poll("X", "d", T0 + 1001).decision, Placement)


def test_no_migration_onto_the_room_of_a_blocked_job_behind_the_head():
    # 'X' (8 A100s) waits behind the T4-only head 'H'; 4 A100s free: 'M' moved from the T4s
    # onto them (the head's test alone passed it), and X waited for M's 10-hour run.
    a100, t4 = ("A100",), ("T4",)
    core = core_with(gpu_node("a", gpus=8), gpu_node("t", gpus=8, family="T4"))
    core.submit(gpus("long", 4, accelerator_types=t4), "d", T0)
    for name in ("s0", "s1"):
        core.submit(gpus(name, 4, accelerator_types=a100, expected_duration_s=1000), "d", T0)
    assert core.submit(gpus("M", 4, expected_duration_s=36000), "d", T0).decision.nodes == ["t"]
    core.submit(gpus("H", 8, accelerator_types=t4), "d", T0 + 1)
    core.submit(gpus("X", 8, accelerator_types=a100), "d", T0 + 2)
    assert not yields(core.release("s1", "d", T0 + 500))
    core.release("s0", "d", T0 + 900)
    assert "X" in core.running


def test_a_gpu_head_held_by_running_jobs_still_lets_jobs_elsewhere_backfill():
    # The head's node is full (its CPUs too): its spare CPUs are none, not fewer than none.
    core = core_with(gpu_node("g", gpus=4, cpus=8), cpu_node("c", cpus=4),
                     gpu_node("t4", gpus=2, family="T4"))
    core.submit(JobSpec("R", num_workers=4, gpus_per_worker=1, cpus_per_worker=2), "r", T0)
    head = core.submit(gpus("H", 4, accelerator_types=("A100",)), "h", T0 + 1).decision
    assert isinstance(head, Queued)
    assert core.submit(cpus("cpu-job", 4), "c", T0 + 2).decision.worker_nodes == ("c",) * 4
    assert core.submit(gpus("t4-job", 2, accelerator_types=("T4",)), "t", T0 + 3
                       ).decision.worker_nodes == ("t4", "t4")


def test_gpus_of_no_known_family_come_after_the_known_ones_with_room():
    core = core_with(gpu_node("t4", gpus=2, family="T4"), unknown_family_node("rtx"))
    assert core.submit(gpus("first", 2), "o", T0).decision.worker_nodes == ("t4", "t4")
    # Under contention (a T4-only job waits) too, while the A100s have room.
    core = core_with(gpu_node("a100", gpus=2), gpu_node("t4", gpus=1, family="T4"),
                     unknown_family_node("rtx"))
    core.submit(gpus("t4-busy", 1, accelerator_types=("T4",)), "o", T0)
    core.submit(gpus("t4-waits", 1, accelerator_types=("T4",)), "o", T0 + 1)
    assert core.submit(gpus("any", 2), "o", T0 + 2).decision.worker_nodes == ("a100", "a100")


def test_an_earlier_jobs_rejection_goes_to_its_own_driver_not_the_new_one():
    core = core_with(gpu_node("n1"))
    core.submit(gpus("blocker", 4), "d0", T0)
    core.submit(gpus("x", 2), "d1", T0 + 1)
    core.cancel("x", "", T0 + 2)  # an operator, while d1 is away
    core.submit(gpus("x", 2), "d2", T0 + 3)
    assert isinstance(core.poll("x", "d2", T0 + 4).decision, Queued)
    told = core.poll("x", "d1", T0 + 5).decision
    assert isinstance(told, Rejection) and "cancelled by an operator" in told.message


def test_only_cpu_jobs_beside_usable_gpus_are_victims_for_a_gpu_job():
    # 70 CPU jobs elsewhere come first in victim order (the lowest priority): none of them
    # can help; the one holding the CPUs beside the free GPUs is the victim (taking every CPU
    # job, the search gave up after 64 placement tries).
    core = core_with(gpu_node("g", gpus=4, cpus=8), cpu_node("c", cpus=70))
    for i in range(70):
        core.submit(cpus(f"elsewhere-{i}", 1, priority=-1), "o", T0)
    core.submit(cpus("beside", 6), "o", T0 + 10)
    assert set(core.running["beside"].placement.worker_nodes) == {"g"}
    core.submit(JobSpec("H", num_workers=4, gpus_per_worker=1, cpus_per_worker=2, priority=5),
                "h", T0 + 160)
    core.tick(T0 + 200)
    assert [n for n, j in core.running.items() if j.directive is not None] == ["beside"]


def test_a_dropped_jobs_reason_survives_a_scheduler_restart():
    # An operator cancels a waiting job; the scheduler restarts before its driver polls: the
    # driver is still told why (it was told only "not in the queue").
    core = core_with(gpu_node("n1"))
    core.submit(gpus("blocker", 4), "d0", T0)
    core.submit(gpus("x", 2), "d1", T0 + 1)
    assert core.cancel("x", "", T0 + 2).persist
    again = SchedulerCore(core.settings)
    assert again.restore(json.loads(json.dumps(core.to_dict()))) == []
    assert "cancelled" in again.poll("x", "d1", T0 + 3).decision.message


def test_a_job_that_lost_a_node_and_finds_no_room_waits_in_the_queue_and_preempts():
    # It was neither running nor queued while its driver retried: it never preempted, a
    # lower-priority waiting job took the first capacity freed, and it vanished from status.
    core = core_with(gpu_node("n1"), gpu_node("n2"), gpu_node("n3"))
    high = gpus("H", 4, priority=10)
    core.submit(high, "dH", T0)
    core.submit(gpus("L1", 4), "d1", T0 + 1)
    core.submit(gpus("L2", 4), "d2", T0 + 2)
    core.submit(gpus("L3", 4), "d3", T0 + 3)  # low priority, waits
    lost = core.running["H"].placement.nodes
    core.ray_nodes({"n1", "n2", "n3"} - set(lost), set(lost), T0 + 500)
    outcome = core.replace(high, "dH", lost, T0 + 501)
    assert isinstance(outcome.decision, Queued) and outcome.decision.position == 1
    assert [e.kind for e in outcome.effects if isinstance(e, Yield)] == [PREEMPT]
    assert {r["job"]: r["state"] for r in core.jobs(T0 + 502)}["H"] == "waiting"
    assert isinstance(core.replace(high, "dH", lost, T0 + 503).decision, Queued)  # a retry
    victim = next(n for n, j in core.running.items() if j.directive is not None)
    placed = core.yielded(victim, core.running[victim].placement.owner, T0 + 510)
    assert isinstance(core.poll("H", "dH", T0 + 511).decision, Placement), placed
    assert core.running["H"].enqueued_at == T0  # its submit time (and service) kept


def test_a_job_with_a_memory_floor_preempts_jobs_whose_training_fills_their_gpus():
    # The victims' GPUs showed the memory their training uses: a job with a floor (every GPU
    # job pretrain.py submits) never fitted in thought and never preempted anyone.
    core = core_with(gpu_node("a", gpus=4), gpu_node("b", gpus=2))
    core.submit(gpus("low", 4), "d", T0)
    core.submit(gpus("other", 2), "d", T0)
    # The agents' next reports: the jobs' training fills their GPUs; GPU 0 of b stays free.
    core.report(gpu_node("a", gpus=4, free_gb=[2.0] * 4), T0 + 5)
    core.report(gpu_node("b", gpus=2, free_gb=[80.0, 3.0]), T0 + 5)
    table = core.state.table
    measured = table.gpu_free_gib.copy()
    outcome = core.submit(gpus("urgent", 4, priority=10, min_gpu_memory_gb=40.0), "d", T0 + 60)
    assert set(yields(outcome)) == {"low"}, outcome
    assert (table.gpu_free_gib == measured).all()  # the thought experiment left no trace


def test_a_victim_spread_over_two_families_is_in_reach_of_a_job_for_either():
    # Judged by its slowest family alone (T4), the A100-only job never preempted it.
    for family in ("A100", "T4"):
        core = core_with(gpu_node("a100", gpus=4), gpu_node("t4", gpus=4, family="T4"))
        core.submit(gpus("low", 8), "d", T0)
        outcome = core.submit(gpus("high", 4, priority=10, accelerator_types=(family,)), "d",
                              T0 + 60)
        assert set(yields(outcome)) == {"low"}, family


def test_a_running_jobs_family_is_not_fixed_before_its_nodes_have_reported():
    # After a restart, a pass before a slow agent's first report cached "" for the job on
    # its node, for good: no job of that family could preempt it after.
    core = core_with(gpu_node("a1"), gpu_node("t4", family="T4"))
    core.submit(gpus("low", 4, accelerator_types=("A100",)), "d", T0)
    again = SchedulerCore(core.settings)
    assert again.restore(json.loads(json.dumps(core.to_dict()))) == []
    again.ray_nodes({"a1", "t4"}, set(), T0 + 1)
    assert again.running_family("low") == ""  # a1 has not reported to this scheduler yet
    assert again.report(gpu_node("a1"), T0 + 20).decision is True
    assert again.running_family("low") == "A100"


def test_victims_sharing_a_node_are_shown_free_on_slots_of_their_own_and_all_put_back():
    # The second victim took the slot already shown free for the first and, restored
    # first, wrote that shown figure over the measured one: GPU 0 stayed "80 GiB free".
    from orchestrator.scheduler_core import _AsIfYielded

    core = core_with(gpu_node("a", gpus=4))
    core.submit(gpus("v1", 2), "d", T0)
    core.submit(gpus("v2", 2), "d", T0)
    core.report(gpu_node("a", gpus=4, free_gb=[2.0, 80.0, 80.0, 80.0]), T0 + 5)
    table = core.state.table
    measured = table.gpu_free_gib.copy()
    with _AsIfYielded(core, ["v1", "v2"]) as thought:
        slots = [set(s.tolist()) for v in ("v1", "v2") for _, s, _ in thought.memory[v]]
        assert not slots[0] & slots[1]
        thought.take_back("v1")
    assert (table.gpu_free_gib == measured).all()


def test_a_victim_taken_back_and_added_again_avoids_the_slots_still_shown_for_another():
    # _AsIfYielded counts the slots shown free per node row to skip the slot-by-slot filter
    # on rows with none: a count gone stale on take_back gave v2 again v1's slots (0, 1 come
    # first among equals), and restoring one of them wrote a shown figure over the measured.
    from orchestrator.scheduler_core import _AsIfYielded

    core = core_with(gpu_node("a", gpus=4))
    core.submit(gpus("v1", 2), "d", T0)
    core.submit(gpus("v2", 2), "d", T0)
    table = core.state.table
    measured = table.gpu_free_gib.copy()
    with _AsIfYielded(core, ["v1", "v2"]) as thought:
        first = {int(s) for _, slots, _ in thought.memory["v1"] for s in slots}
        thought.take_back("v2")
        thought.add("v2")
        again = {int(s) for _, slots, _ in thought.memory["v2"] for s in slots}
        assert len(again) == 2 and not first & again, (first, again)
        thought.take_back("v1")
        thought.add("v1")  # the row still holds v2's two slots
        assert not {int(s) for _, slots, _ in thought.memory["v1"] for s in slots} & again
    assert (table.gpu_free_gib == measured).all()


def test_a_retried_replace_of_a_cancelled_job_gets_the_cancel_not_a_placement():
    # The answer to the first call was lost (a scheduler past the caller's timeout): the
    # retry found no such job and placed the cancelled job afresh.
    core = core_with(gpu_node("n1"), gpu_node("n2"))
    core.submit(gpus("j", 4), "d", T0)
    lost = list(core.running["j"].placement.nodes)
    core.cancel("j", "", T0 + 1)
    first = core.replace(gpus("j", 4), "d", lost, T0 + 2).decision
    retry = core.replace(gpus("j", 4), "d", lost, T0 + 3).decision
    assert isinstance(first, Rejection) and first.cancelled
    assert isinstance(retry, Rejection) and retry.cancelled and "j" not in core.running
    core.replace(gpus("j", 4), "d", lost, T0 + 4)  # (a third: nothing kept, placed afresh)
    core.release("j", "d", T0 + 5)
    assert "j" not in core.queue.rejected  # its driver released it: nothing left behind


def test_a_node_lost_after_an_operators_cancel_or_preempt_still_honours_it():
    # Placed afresh after the loss, the job's directive was dropped: a cancelled job trained
    # to its end (exit 0), and a preempted one took its room straight back.
    for kind in ("cancel", "preempt"):
        core = core_with(gpu_node("n1"), gpu_node("n2"))
        core.submit(gpus("j", 4), "d", T0)
        core.submit(gpus("blocker", 4), "d1", T0 + 0.5)
        core.submit(gpus("next", 4), "d2", T0 + 1)  # waits for room
        lost = list(core.running["j"].placement.nodes)
        core.cancel("j", "", T0 + 2) if kind == "cancel" else core.preempt("j", T0 + 2)
        assert core.running["j"].directive is not None
        core.ray_nodes({"n1", "n2"} - set(lost), set(lost), T0 + 3)
        decision = core.replace(gpus("j", 4), "d", lost, T0 + 4).decision
        if kind == "cancel":
            assert isinstance(decision, Rejection) and decision.cancelled, decision
            assert "j" not in core.running and not core.queue.holds("j")
        else:  # back in line behind the job it made room for, not first again; its driver
            # waits for it without --queue-timeout, as for any preemption
            assert isinstance(decision, Queued) and decision.position == 2, decision
            assert decision.preempted


def test_next_promotion_looks_past_one_already_due_and_the_live_core_notes_no_wakeups():
    q = JobQueue(level=lambda s: 0 if s < 100 else 1, promote_after=lambda j: 2 * j.ran_s)
    for name, ran in (("a", 500.0), ("b", 1000.0)):  # promotions due at 1000 s and 2000 s
        q.add(QueuedJob(gpus(name, 1), "", 0.0, ran_s=ran, queued_at=0.0))
    assert q.next_promotion(after=500) == 1000
    assert q.next_promotion(after=1500) == 2000  # a's (due, not yet promoted) hid b's
    # The live actor ticks every 5 s: a core not asked for wake-ups keeps none (they grew by
    # four per job start, for ever).
    core = core_with(gpu_node("n1"))
    core.submit(gpus("x", 1), "d", T0)
    assert core._wakeups is None and core.next_wakeup(T0, T0 + 1e9) is None


def test_a_relaunch_right_after_its_driver_was_killed_is_not_a_second_launch(monkeypatch):
    # Killed before its `finally` released the job (SIGKILL, a closed SSH session), then
    # resumed within one maintenance pass: refused as "two launches of the same run?".
    import inspect
    import threading
    from types import SimpleNamespace

    from ray_layer import scheduler_actor

    actor_class = scheduler_actor.SchedulerActor.__ray_metadata__.modified_class
    actor = object.__new__(actor_class)
    actor.lock, actor.core = threading.RLock(), core_with(cpu_node("a", cpus=4))
    actor.store = SimpleNamespace(save=lambda state: None)
    actor.throughput = SimpleNamespace(to_dict=lambda: {})
    # The methods' own module globals: after a live Ray in this process loaded the actor
    # class, they need not be the `scheduler_actor` module object imported here.
    module = inspect.unwrap(actor_class.reclaim_orphans).__globals__
    monkeypatch.setitem(module, "record_all", lambda samples: None)
    monkeypatch.setitem(module, "wall_clock", lambda: T0 + 1)  # the nodes' clock
    monkeypatch.setitem(module, "_dead_drivers", lambda: {"killed-driver"})
    assert isinstance(actor.submit(cpus("run", 2), "killed-driver"), Placement)
    assert isinstance(actor.submit(cpus("run", 2), "new-driver"), Placement)
    assert actor.core.owner_of("run") == "new-driver"
    monkeypatch.setitem(module, "_dead_drivers", lambda: set())  # the other driver lives
    assert isinstance(actor.submit(cpus("run", 2), "third-driver"), Rejection)


class _FlakyStore:
    """The scheduler's GCS document: `loads` answered in turn (an exception raised)."""

    def __init__(self, *loads, set_aside_fails=False):
        self.loads, self.set_aside_fails, self.kept = list(loads), set_aside_fails, 0

    def load(self):
        answer = self.loads.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def set_aside(self):
        if self.set_aside_fails:
            raise ConnectionError("GCS unavailable")
        self.kept += 1
        return "scheduler-state.unreadable.1"


def _bare_scheduler_actor(monkeypatch, store):
    """The scheduler actor's class without Ray: its state loading and restoring alone."""
    import inspect

    from ray_layer import scheduler_actor
    from orchestrator.throughput import ThroughputTable

    actor_class = scheduler_actor.SchedulerActor.__ray_metadata__.modified_class
    actor = object.__new__(actor_class)
    actor.store, actor.throughput = store, ThroughputTable()
    actor.core = SchedulerCore(SchedulerSettings())
    sleeps = []
    module = inspect.unwrap(actor_class._load_state).__globals__
    monkeypatch.setattr(module["time"], "sleep", sleeps.append)
    return actor, sleeps


def test_a_failed_read_of_the_saved_state_is_tried_again_never_taken_for_no_state(monkeypatch):
    # The GCS failing over while Ray restarted the scheduler: the read's error was taken for
    # an unreadable state, the actor started empty and its first save replaced everything.
    saved = {"queue": {"waiting": []}}
    actor, sleeps = _bare_scheduler_actor(
        monkeypatch, _FlakyStore(ConnectionError("down"), ConnectionError("down"), saved))
    assert actor._load_state() == (saved, None) and sleeps == [1.0, 2.0]
    actor, sleeps = _bare_scheduler_actor(monkeypatch, _FlakyStore(*[TimeoutError()] * 6))
    with pytest.raises(RuntimeError, match="not starting empty"):
        actor._load_state()
    assert sum(sleeps) == 31.0
    actor, _ = _bare_scheduler_actor(monkeypatch, _FlakyStore(ValueError("bad JSON")))
    state, unreadable = actor._load_state()  # undecodable: unreadable, not retried
    assert state == {} and isinstance(unreadable, ValueError)


def test_a_saved_state_read_in_part_is_kept_aside_before_a_save_replaces_it(monkeypatch):
    # A skipped record survived only as a log line: the next save overwrote it.
    core = core_with(cpu_node("a", cpus=4))
    core.submit(cpus("run", 2), "d", T0)
    good = json.loads(json.dumps(core.to_dict()))
    damaged = json.loads(json.dumps(good))
    damaged["running"]["run"]["started_at"] = "yesterday"
    actor, _ = _bare_scheduler_actor(monkeypatch, _FlakyStore())
    actor._restore(good, None, "", False)
    assert actor.store.kept == 0 and "run" in actor.core.running
    actor, _ = _bare_scheduler_actor(monkeypatch, _FlakyStore())
    actor._restore(damaged, None, "", False)
    assert actor.store.kept == 1 and not actor.core.running
    actor, _ = _bare_scheduler_actor(monkeypatch, _FlakyStore())
    actor._restore(good, None, "saved scheduler settings unreadable", False)
    assert actor.store.kept == 1
    actor, _ = _bare_scheduler_actor(monkeypatch, _FlakyStore(set_aside_fails=True))
    with pytest.raises(RuntimeError, match="not starting"):  # no copy: it must not replace it
        actor._restore(damaged, None, "", False)


def test_a_directive_read_is_saved_at_once_and_a_new_checkpoint_time_soon():
    # Neither was saved: a scheduler restarted after a victim read its preemption restored it
    # unread, so its preemptor giving up withdrew it and the yield went uncounted toward
    # max_preemptions; victims were ordered by stale checkpoint times.
    core = core_with(cpu_node("a", cpus=2))
    core.submit(cpus("job", 2), "d", T0)
    core.preempt("job", T0 + 1)
    first = core.directive("job", T0 + 2, last_checkpoint_at=T0 + 1)
    again = core.directive("job", T0 + 3, last_checkpoint_at=T0 + 1)
    assert first.decision.kind == PREEMPT and first.persist and not again.persist  # once
    assert not any(isinstance(e, SaveSoon) for e in again.effects)  # nothing new
    newer = core.directive("job", T0 + 4, last_checkpoint_at=T0 + 3)
    assert not newer.persist and any(isinstance(e, SaveSoon) for e in newer.effects)
    restored = SchedulerCore(core.settings)
    assert not restored.restore(json.loads(json.dumps(core.to_dict())))
    job = restored.running["job"]
    assert job.directive.read_at == T0 + 2 and job.last_checkpoint_at == T0 + 3


def test_the_scheduler_actor_saves_a_read_directive_at_once_and_checkpoint_times_per_pass(
        monkeypatch):
    import inspect
    import threading

    from ray_layer import scheduler_actor

    saves = []
    actor_class = scheduler_actor.SchedulerActor.__ray_metadata__.modified_class
    actor = object.__new__(actor_class)
    actor.lock, actor.core = threading.RLock(), core_with(cpu_node("a", cpus=4))
    actor.store = type("Store", (), {"save": lambda self, state: saves.append(state)})()
    actor.throughput = type("Table", (), {"to_dict": lambda self: {}})()
    actor._unsaved, actor._scale_up_asked = False, []
    actor._saved_at = time.monotonic()
    actor._agents_lock, actor._agent_silent_since = threading.Lock(), {}
    module = inspect.unwrap(actor_class.directive).__globals__
    for name, value in (("record_all", lambda samples: None), ("wall_clock", lambda: T0 + 5),
                        ("_ray_nodes", lambda: ({"a"}, set(), set())),
                        ("_dead_drivers", lambda: set()), ("_ray_available", lambda: {})):
        monkeypatch.setitem(module, name, value)
    actor.core.submit(cpus("job", 2), "d", T0)
    actor.core.preempt("job", T0 + 1)
    assert actor.directive("job")["kind"] == PREEMPT and len(saves) == 1  # read: saved
    assert actor.directive("job") is not None and len(saves) == 1
    actor.directive("job", last_checkpoint_at=time.time() - 2)  # a newer checkpoint
    assert len(saves) == 1 and actor._unsaved  # not a write per step boundary...
    actor.maintain()
    assert len(saves) == 2 and not actor._unsaved  # ...but by the next maintenance pass
    assert saves[-1]["running"]["job"]["last_checkpoint_at"] == pytest.approx(T0 + 3, abs=1)
    actor.maintain()
    assert len(saves) == 2  # nothing changed: nothing saved
    # The clock pair is only as fresh as the last save (a host clock step after it shifts a
    # restarted scheduler's times): an idle scheduler saves it every CLOCK_RESAVE_S anyway.
    actor._saved_at -= scheduler_actor.CLOCK_RESAVE_S + 1
    actor.maintain()
    assert len(saves) == 3 and saves[-1]["clock"]["clock"] == T0 + 5


def test_a_restarted_scheduler_continues_its_predecessors_clock_across_a_host_clock_step():
    # The scheduler's clock is monotonic, anchored to the host's clock at its start. The
    # host's clock stepped an hour forward during one incarnation; the next anchored afresh,
    # and every saved time read an hour older: a job placed 25 s before had run 3625 s (its
    # LAS level), and after a step back, times lay in the future.
    from orchestrator.saved_records import continued_clock

    started_at = 1_005.0  # a job's start, in the first incarnation's clock (host: 1000 at 0)
    saved = {"time": 1_000.0 + 20 + 3_600, "clock": 1_020.0}  # saved 20 s in, after the step
    start, problem = continued_clock(saved, time_now=4_630.0)  # 10 s later, the host's clock
    assert problem is None and start - started_at == 25.0
    back = {"time": 1_000.0 + 20 - 3_600, "clock": 1_020.0}  # the host's clock stepped back
    start, _ = continued_clock(back, time_now=1_000.0 + 30 - 3_600)
    assert start - started_at == 25.0  # not -3575: never a start in the future
    assert continued_clock(None, 4_630.0) == (4_630.0, None)  # nothing saved: the host's
    start, problem = continued_clock({"time": "noon"}, 4_630.0)
    assert start == 4_630.0 and "not two numbers" in problem


def test_the_scheduler_actor_saves_its_clock_and_a_successor_continues_it(monkeypatch):

    from ray_layer import scheduler_actor

    actor_class = scheduler_actor.SchedulerActor.__ray_metadata__.modified_class
    # The module itself: once Ray has created an actor of the class in this process (the
    # integration tier, run first), its methods are Ray's wrappers with other globals.
    module = vars(scheduler_actor)
    for name in ("_WALL_AT_START", "_MONOTONIC_AT_START"):  # put back after the test
        monkeypatch.setitem(module, name, module[name])
    saves = []
    actor = object.__new__(actor_class)
    actor.core, actor.throughput = core_with(cpu_node("a")), type(
        "Table", (), {"to_dict": lambda self: {}})()
    actor.store = type("Store", (), {"save": lambda self, state: saves.append(state)})()
    actor._save()
    clock = saves[-1][scheduler_actor.CLOCK_KEY]
    assert clock["clock"] == pytest.approx(module["wall_clock"](), abs=1)
    assert clock["time"] == pytest.approx(time.time(), abs=1)
    # A successor reading it starts where this clock stands, an hour off the host's clock.
    actor._continue_clock({scheduler_actor.CLOCK_KEY: {"time": time.time(),
                                                       "clock": time.time() - 3_600}})
    assert module["wall_clock"]() == pytest.approx(time.time() - 3_600, abs=1)


def test_a_drivers_ctrl_c_withdraws_a_waiting_job_and_leaves_a_running_one_held():
    """Ctrl-C's withdraw freed a running job's devices at once: the next job was placed
    while its workers were still aborting on them."""
    core = core_with(cpu_node("a", cpus=2))
    core.submit(cpus("train", 2), "d", T0)
    core.submit(cpus("next", 2), "d2", T0 + 1)  # waits for train's CPUs
    assert core.cancel("train", "d", T0 + 2, waiting_only=True).decision is False
    assert set(core.running) == {"train"} and "next" in core.queue.waiting
    assert core.cancel("next", "d2", T0 + 3, waiting_only=True).decision is True
    assert "next" not in core.queue.waiting and set(core.running) == {"train"}


# -- found by a review of the core under random event sequences (2026-12-05) ----------------------

def ticked(core, since, seconds, step=5.0):
    now = since
    while now < since + seconds:
        now += step
        core.tick(now, gauges=False)
    return now


def test_a_flexible_head_kept_off_a_family_lets_the_jobs_with_first_call_there_start():
    # 'any' is kept off the A100s because 'a100-only' has first call on them, and the rest
    # cannot hold it; 'a100-only' was refused as backfill for delaying 'any' on those same
    # A100s: both waited for ever on an idle cluster.
    core = core_with(gpu_node("a100", gpus=4), gpu_node("h100", gpus=1, family="H100"),
                     gpu_node("t4", gpus=1, family="T4"))
    core.submit(gpus("blocker", 4, accelerator_types=("A100",)), "d", T0)
    assert isinstance(core.submit(gpus("any", 4), "d", T0 + 1).decision, Queued)
    assert isinstance(core.submit(gpus("a100-only", 4, accelerator_types=("A100",)), "d",
                                  T0 + 2).decision, Queued)
    core.release("blocker", "d", T0 + 3)
    ticked(core, T0 + 3, 60)
    assert set(core.running) == {"a100-only"}
    core.release("a100-only", "d", T0 + 100)  # then the A100s are the flexible job's
    assert set(core.running) == {"any"}


def test_a_job_that_never_fits_is_rejected_once_the_unreported_nodes_report():
    # Submitted while a node Ray lists alive had not reported ("not known yet"), it was then
    # never judged again: queued for ever, "fits once running jobs release their reservations".
    core = SchedulerCore(SchedulerSettings(suspect_after_s=15, dead_after_s=60))
    core.ray_nodes({"t4-a", "t4-b"}, set(), T0)
    core.report(gpu_node("t4-a", family="T4"), T0)
    a100_job = gpus("needs-a100", 1, accelerator_types=("A100",))
    assert isinstance(core.submit(a100_job, "d", T0).decision, Queued)
    core.report(gpu_node("t4-b", family="T4"), T0 + 1)
    rejection = core.poll("needs-a100", "d", T0 + 1).decision
    assert isinstance(rejection, Rejection) and "not one of A100" in rejection.message


def test_a_node_that_never_reports_is_not_waited_for_past_suspect_after_s():
    core = SchedulerCore(SchedulerSettings(suspect_after_s=15, dead_after_s=60))
    core.ray_nodes({"t4-a", "silent"}, set(), T0)
    core.report(gpu_node("t4-a", family="T4"), T0)
    assert isinstance(core.submit(gpus("huge", 100, accelerator_types=("A100",)), "d",
                                  T0).decision, Queued)  # the silent node might hold it
    for now in (T0 + 5, T0 + 10, T0 + 20):
        core.report(gpu_node("t4-a", family="T4"), now)
        core.tick(now, gauges=False)
    assert isinstance(core.poll("huge", "d", T0 + 20).decision, Rejection)
    assert isinstance(core.submit(gpus("huge2", 100), "d", T0 + 21).decision, Rejection)


def test_a_placement_whose_record_is_not_restored_is_withdrawn_not_handed_out():
    # Placed from the queue, not yet collected, its running record unreadable after a
    # restart: its reservation was released but its placement still handed to its driver,
    # and the same GPUs were then given to another job as well.
    core = core_with(gpu_node("a", gpus=4))
    core.submit(gpus("big", 4), "d1", T0)
    core.submit(gpus("j", 4), "d2", T0)
    core.release("big", "d1", T0 + 1)
    assert "j" in core.queue.ready
    saved = json.loads(json.dumps(core.to_dict()))
    saved["running"]["j"]["spec"]["num_workers"] = "4"  # that one record unreadable
    restored = SchedulerCore(core.settings)
    problems = restored.restore(saved)
    assert any("withdrew the placement of 'j'" in p for p in problems)
    restored.ray_nodes({"a"}, set(), T0 + 2)
    restored.report(gpu_node("a", gpus=4), T0 + 2)
    told = restored.poll("j", "d2", T0 + 3).decision
    assert isinstance(told, Rejection) and "submit it again" in told.message
    assert isinstance(restored.submit(gpus("other", 4), "d3", T0 + 4).decision, Placement)


def test_an_operators_preempt_does_not_undo_a_cancel():
    core = core_with(gpu_node("a", gpus=4))
    core.submit(gpus("job", 4), "d", T0)
    assert core.cancel("job", "", T0 + 1).decision is True
    assert core.preempt("job", T0 + 2).decision is False  # it was put back in the queue
    assert isinstance(core.yielded("job", "d", T0 + 3).decision, Rejection)
    assert "job" not in core.running and "job" not in core.queue.waiting


def test_a_victim_told_something_else_is_no_longer_waited_on_by_its_preemptor():
    # v1 was preempted for x, then cancelled by an operator: x kept waiting for v1 in
    # `preempting` for ever and never looked for another victim while v2 ran on.
    core = core_with(gpu_node("a", gpus=4), gpu_node("b", gpus=4))
    core.submit(gpus("v1", 4), "d", T0)
    core.submit(gpus("v2", 4), "d", T0)
    core.submit(gpus("x", 8, priority=1), "dx", T0 + 100)
    assert core.preempting["x"] == {"v1", "v2"}
    core.cancel("v1", "", T0 + 101)
    # (still waited on until it has yielded: it frees the room x waits for all the same)
    assert core.preempting["x"] == {"v1", "v2"}
    assert core.running["v1"].directive.kind == CANCEL
    assert core.preempt("v2", T0 + 102).decision is True  # already yielding: left as it is
    assert core.running["v2"].directive.for_job == "x"
    assert isinstance(core.yielded("v1", "d", T0 + 103).decision, Rejection)
    assert core.preempting["x"] == {"v2"}


def test_a_victim_cancelled_mid_preemption_makes_its_preemptor_preempt_nobody_else():
    # high preempted low1; an operator cancelled low1 before it yielded. high stopped waiting
    # on it and at once preempted low2 as well, although low1's cancel frees the room it
    # needs: low2 checkpointed and restarted for nothing.
    core = core_with(cpu_node("a", cpus=2), cpu_node("b", cpus=2))
    core.submit(cpus("low1", 2), "d", T0)
    core.submit(cpus("low2", 2), "d", T0)
    core.submit(cpus("high", 2, priority=3), "d", T0 + 30)
    assert core.preempting == {"high": {"low1"}}
    assert set(yields(core.cancel("low1", "", T0 + 31))) == {"low1"}
    assert not yields(core.tick(T0 + 32))
    assert core.running["low2"].directive is None
    assert isinstance(core.yielded("low1", "d", T0 + 33).decision, Rejection)
    assert isinstance(core.poll("high", "d", T0 + 34).decision, Placement)
    assert core.preempting == {} and core.running["low2"].directive is None


def test_excluded_gpus_die_with_their_job_and_never_leave_it_waiting_for_ever():
    core = core_with(gpu_node("a", gpus=4), gpu_node("b", gpus=4))
    run1 = gpus("run1", 1, min_gpu_memory_gb=40)
    node = core.submit(run1, "d1", T0).decision.worker_nodes[0]
    core.gpu_too_small("run1", "d1", [(node, 0)], T0 + 1)
    node = core.poll("run1", "d1", T0 + 2).decision.worker_nodes[0]
    core.gpu_too_small("run1", "d1", [(node, 0)], T0 + 3)  # again: the whole node excluded
    core.owners_dead({"d1"}, T0 + 4)  # its driver killed; the run resubmitted, same name
    assert isinstance(core.submit(gpus("run1", 8), "d2", T0 + 5).decision, Placement)
    # A job allowed two families, excluded from a GPU the idle cluster cannot do without:
    # rejected, not queued for ever ("room for 2 worker(s)").
    core = core_with(gpu_node("a", gpus=2), gpu_node("t", gpus=1, family="T4"))
    core.submit(gpus("m", 3, accelerator_types=("A100", "T4")), "d", T0)
    told = core.gpu_too_small("m", "d", [("t", 0)], T0 + 1).decision
    assert isinstance(told, Rejection) and "1 excluded for this job" in told.message


def test_a_jobs_own_excluded_gpus_do_not_hold_back_same_shaped_jobs_behind_it():
    core = core_with(gpu_node("a", gpus=4), gpu_node("c", gpus=2))
    for name, n in (("L", 2), ("b", 1), ("x", 2)):
        core.submit(gpus(name, n), "d", T0)
    core.submit(gpus("y", 2), "d", T0)  # waits: 1 GPU free
    core.gpu_too_small("x", "d", [("a", 0), ("a", 1)], T0 + 1)
    core.gpu_too_small("x", "d", [("a", 2)], T0 + 2)  # x waits; 3 GPUs free on a
    ticked(core, T0 + 2, 20)
    row = {r["job"]: r for r in core.jobs(T0 + 30)}["y"]
    assert "1 free now" not in row["reason"]  # its reason was x's shape's, and stale


@pytest.mark.parametrize("bad, field", [({"backfill": "false"}, "backfill"),
                                        ({"preemption": 0}, "preemption"),
                                        ({"min_run_s": True}, "min_run_s"),
                                        ({"inter_group_gbps": float("nan")}, "inter_group_gbps"),
                                        ({"max_load_per_cpu": -1}, "max_load_per_cpu"),
                                        ({"suspect_after_s": "15"}, "suspect_after_s"),
                                        ({"protect_share": True}, "protect_share"),
                                        ({"las_thresholds_gpu_s": (True,)}, "las_thresholds"),
                                        # (past float's range: OverflowError, not named)
                                        ({"dead_after_s": 10**400}, "dead_after_s"),
                                        ({"min_run_s": 10**400}, "min_run_s")])
def test_every_scheduler_setting_is_checked_and_named(bad, field):
    # "false" in a settings file left backfill on; a string duration failed with a TypeError
    # deep in the core.
    with pytest.raises(ValueError, match=field):
        SchedulerSettings(**bad)


def test_a_scheduler_recreated_without_settings_runs_with_its_predecessors():
    # ensure_scheduler() with no settings after the scheduler was lost (not restarted by
    # Ray, which keeps them) quietly went back to the defaults.
    from orchestrator.scheduler_types import settings_to_run_with

    core = core_with(gpu_node("a"), min_run_s=7.0, las_thresholds_gpu_s=(10.0, 20.0),
                     backfill=False)
    saved = json.loads(json.dumps(core.to_dict()))
    settings, problem = settings_to_run_with({}, saved)
    assert settings == core.settings and problem == ""
    assert settings_to_run_with({"min_run_s": 3.0}, saved)[0].min_run_s == 3.0  # given wins
    saved["settings"]["backfill"] = "no"
    settings, problem = settings_to_run_with({}, saved)
    # (the others kept: every saved setting went back to its default, preemption switched
    # back on, the LAS thresholds reset, for one hand-edited value)
    assert settings == dataclasses.replace(core.settings, backfill=True)
    assert "backfill must be true or false" in problem and "its default" in problem
    # Each saved value fine alone, together not: every new scheduler failed in SchedulerCore
    # (ClusterState's check), never starting, the saved document never set aside.
    # (now the pair alone at their defaults, the others as saved)
    saved["settings"].update(backfill=False, suspect_after_s=100.0, dead_after_s=30.0)
    settings, problem = settings_to_run_with({}, saved)
    assert settings == dataclasses.replace(core.settings, suspect_after_s=15.0,
                                           dead_after_s=60.0)
    assert "must be <= dead_after_s" in problem
    SchedulerCore(settings)
    # A saved duration past float's range (JSON holds any number of digits): OverflowError
    # out of every new scheduler's constructor, a crash loop, the document never set aside.
    saved["settings"].update(suspect_after_s=15.0, dead_after_s=10**400)
    settings, problem = settings_to_run_with({}, saved)
    assert settings == dataclasses.replace(core.settings, suspect_after_s=15.0,
                                           dead_after_s=60.0)
    assert "dead_after_s must be a number > 0" in problem
    SchedulerCore(settings)


def test_a_restored_queue_is_judged_again_against_the_nodes_that_report():
    # The only A100 node went while no scheduler ran, holding nothing of this scheduler's
    # (Ray work of its own held its GPUs): the A100 job waited for ever after the restart.
    core = core_with(gpu_node("a100", gpus=4), gpu_node("t4", gpus=4, family="T4"))
    core.ray_usage({"a100": {"CPU": 16.0, "GPU": 0.0}, "t4": {"CPU": 16.0, "GPU": 4.0}}, T0)
    assert isinstance(core.submit(gpus("a100-job", 4, accelerator_types=("A100",)), "d",
                                  T0 + 1).decision, Queued)
    restored = SchedulerCore(core.settings)
    restored.restore(json.loads(json.dumps(core.to_dict())))
    restored.ray_nodes({"t4"}, {"a100"}, T0 + 2)
    restored.report(gpu_node("t4", gpus=4, family="T4"), T0 + 2)
    ticked(restored, T0 + 2, 10)
    told = restored.poll("a100-job", "d", T0 + 20).decision
    assert isinstance(told, Rejection) and "not one of A100" in told.message


def test_one_jobs_excluded_gpus_never_decide_for_a_same_shaped_job():
    # Its shape was the memo's and the victim search's key, exclusions left out: the job
    # behind it waited for the autoscaler beside an idle node that holds it, or never looked
    # for victims.
    from pathlib import Path

    import yaml

    from orchestrator.autoscaling import node_types_from_config

    core = core_with(gpu_node("a", gpus=4))
    core.node_types = node_types_from_config(yaml.safe_load(
        (Path(__file__).resolve().parents[2] / "cluster.yaml").read_text()))
    core.submit(gpus("A", 4, accelerator_types=("A100",)), "d1", T0)
    core.gpu_too_small("A", "d1", [("a", 0)], T0 + 1)  # A now needs a new node
    assert isinstance(core.submit(gpus("B", 4, accelerator_types=("A100",)), "d2",
                                  T0 + 2).decision, Placement)

    core = core_with(gpu_node("a", gpus=4), gpu_node("b", gpus=4))
    victim = core.submit(gpus("La", 4), "d", T0).decision.worker_nodes[0]
    core.submit(gpus("Lb", 4, priority=5), "d", T0)
    core.submit(gpus("X", 4, priority=1), "dx", T0 + 1)
    core.excluded_gpus["X"] = {(victim, i) for i in range(4)}  # as two gpu_too_small reports
    core.submit(gpus("B", 4, priority=1), "db", T0 + 2)
    ticked(core, T0 + 20, 20)  # past min_run_s: La may be preempted, for B (not for X)
    assert core.running["La"].directive.for_job == "B"


def test_the_live_schedulers_clock_does_not_jump_with_the_hosts(monkeypatch):
    # A step of the host's clock (NTP, a resumed VM) aged every heartbeat at once: every node
    # was declared dead and the queued jobs rejected for good.
    from ray_layer import scheduler_actor

    before = scheduler_actor.wall_clock()
    monkeypatch.setattr(scheduler_actor.time, "time", lambda: before + 90.0)
    assert scheduler_actor.wall_clock() - before < 5.0


def test_a_silent_node_ray_then_reports_dead_is_said_to_be_gone_by_ray():
    core = core_with(cpu_node("a", cpus=4), suspect_after_s=15.0, dead_after_s=60.0)
    core.state.expire(T0 + 100)
    assert "no heartbeat" in core.state.health_reason("a", T0 + 100)
    core.ray_nodes(set(), {"a"}, T0 + 101)
    assert core.state.health_reason("a", T0 + 101) == "dead: Ray reports the node gone"


def test_a_drivers_checkpoint_time_is_read_in_the_schedulers_clock(monkeypatch):
    # Drivers send time.time(); the scheduler's clock is its own (wall_clock): the age counts.
    from ray_layer import scheduler_actor

    monkeypatch.setattr(scheduler_actor.time, "time", lambda: 5_000.0)
    assert scheduler_actor._in_scheduler_clock(4_990.0, now=100.0) == 90.0
    assert scheduler_actor._in_scheduler_clock(None, now=100.0) is None
    assert scheduler_actor._in_scheduler_clock(6_000.0, now=100.0) == 100.0  # not in the future


def test_the_oldest_wait_gauge_counts_from_a_preempted_jobs_return_to_the_queue():
    """A job that ran an hour and was just preempted has waited seconds, not an hour: the
    gauge read its first submission and paged SchedulerQueueStuck (threshold 20 min, no
    `for:`) at once, while `status` said 5 s."""
    from orchestrator import metric_catalogue as m

    core = core_with(cpu_node("a", cpus=4))
    core.submit(cpus("low", 4), "d-low", T0)
    core.submit(cpus("high", 4, priority=10), "d-high", T0 + 3600)  # preempts low
    core.yielded("low", "d-low", T0 + 3605)
    now = T0 + 3610
    gauge = {spec.name: value for spec, value, _ in core.tick(now).samples}
    assert gauge[m.SCHEDULER_QUEUE_OLDEST_WAIT.name] == pytest.approx(5.0)
    assert [(j["job"], j["since_s"]) for j in core.jobs(now) if j["state"] == "preempted"] \
        == [("low", pytest.approx(5.0))]


def test_a_placement_after_a_lost_node_is_counted_as_a_decision():
    """A job placed again, or refused, after losing a node: in neither
    placement_decisions_total nor rejections_total."""
    from orchestrator import metric_catalogue as m

    def counted(outcome):
        return [(spec.name, tags) for spec, _, tags in outcome.samples
                if spec in (m.SCHEDULER_PLACEMENTS, m.SCHEDULER_REJECTIONS)]

    core = core_with(gpu_node("n1"), gpu_node("n2"))
    spec = gpus("job", 4)
    core.submit(spec, "o", T0)
    lost = list(core.running["job"].placement.nodes)
    assert counted(core.replace(spec, "o", lost, T0 + 10)) == [
        (m.SCHEDULER_PLACEMENTS.name, {"outcome": "placed"})]
    core.ray_nodes(set(), {"n1", "n2"}, T0 + 20)  # the whole cluster gone: it can never fit
    refused = core.replace(spec, "o", list(core.running["job"].placement.nodes), T0 + 21)
    assert isinstance(refused.decision, Rejection), refused.decision
    assert (m.SCHEDULER_PLACEMENTS.name, {"outcome": "rejected"}) in counted(refused)
    assert [t for name, t in counted(refused) if name == m.SCHEDULER_REJECTIONS.name] == [
        {"reason": m.REJECT_CAPACITY}]


def test_a_gpu_the_worker_names_by_uuid_avoids_the_node_not_the_scheduler():
    # A MIG slice NVML could not map: the worker sent Ray's id, a UUID string, and int() of
    # it raised in the scheduler, failing the job instead of placing it elsewhere.
    core = core_with(gpu_node("n1"), gpu_node("n2"))
    spec = gpus("job", 4, min_gpu_memory_gb=10.0)
    core.submit(spec, "d", T0)
    first = core.running["job"].placement.worker_nodes[0]
    outcome = core.gpu_too_small("job", "d", [(first, "MIG-5e1c0a7f-0000")], T0 + 1)
    assert {n for n, _ in core.excluded_gpus["job"]} == {first}
    assert len(core.excluded_gpus["job"]) == 4  # every GPU of that node
    placed = outcome.decision
    assert getattr(placed, "worker_nodes", None) and first not in placed.worker_nodes, placed


# -- found by a review of the pure scheduling core --------------------------------------------------

def test_a_victim_search_keeps_the_reservation_of_a_job_whole_on_a_silent_node():
    # J's node went silent: its reservation was set aside (J kept an empty one). A victim
    # search then released J in thought and, the empty one being falsy, never put it back:
    # when the node reported again J's GPUs were not given back, and X was placed on them.
    core = SchedulerCore(SchedulerSettings())  # heartbeat limits 15 s / 60 s
    core.ray_nodes({"N", "M"}, set(), T0)
    core.report(gpu_node("N", gpus=4, cpus=16), T0)
    core.report(cpu_node("M", 4), T0)
    assert core.submit(gpus("J", 4), "dj", T0).decision.nodes == ["N"]
    assert core.submit(cpus("K", 4, preemptible=False), "dk", T0).decision.nodes == ["M"]
    now = T0 + 195
    for now in range(int(T0) + 125, int(T0) + 200, 5):  # N's agent is quiet for 75 s
        core.report(cpu_node("M", 4), now)
    assert core.tick(now).decision["lost_reservations"] == ["J"]
    # A higher-priority job looks for victims: J (on the silent node) is the only candidate
    assert isinstance(core.submit(cpus("W", 2, priority=1), "dw", now).decision, Queued)
    assert core.state.reservations["J"] == ()
    core.report(gpu_node("N", gpus=4, cpus=16), now + 5)  # back: J never stopped there
    assert core.state.reserved_on("N")[1] == 4  # J's GPUs are held again
    x = core.submit(gpus("X", 4), "dx", now + 6).decision
    assert isinstance(x, Queued), x


def test_a_running_job_is_never_started_a_second_time_under_its_name():
    core = core_with(gpu_node("n1"), gpu_node("n2"))
    core.submit(gpus("J", 4), "dj", T0)
    core.state.release("J")  # a reservation lost by a bug: the running record must still hold
    again = core.place_now(gpus("J", 4), "other", T0 + 1).decision
    assert isinstance(again, Rejection) and "a job of that name is running (held by dj)" \
        in again.message
    assert core.running["J"].placement.owner == "dj"
    with pytest.raises(ValueError, match="'J' is already running"):
        core._track_running(core.running["J"])


def test_a_lost_reservation_record_of_a_job_partly_on_a_silent_node_is_rebuilt():
    # Its record unreadable after a restart, a job with a share kept aside for a silent node
    # got no reservation at all: neither on the node still reporting nor, once the silent
    # one reported again, there (only a job holding a reservation gets its share back).
    core, saved = big_on_two_nodes_the_second_silent()
    saved["reservations"]["big"] = "not a list of records"
    again = SchedulerCore(core.settings)
    again.ray_nodes({"n1", "n2"}, set(), T0 + 62)
    again.restore(saved)
    again.report(gpu_node("n1"), T0 + 62)
    assert again.state.reserved_on("n1") == (4.0, 4)
    again.report(gpu_node("n2"), T0 + 63)
    assert again.state.reserved_on("n2") == (4.0, 4)
    assert isinstance(again.submit(gpus("other", 4), "o2", T0 + 64).decision, Queued)


def test_a_node_only_silent_is_not_taken_for_gone_when_judging_if_a_job_can_ever_fit():
    # b's agent was quiet for 65 s while Ray still listed b alive: 'big' (8 GPUs, both nodes)
    # was dropped as never fitting, and its driver stopped for good.
    core = SchedulerCore(SchedulerSettings())  # heartbeat limits 15 s / 60 s
    core.ray_nodes({"a", "b"}, set(), T0)
    core.report(gpu_node("a"), T0)
    core.report(gpu_node("b"), T0)
    core.submit(gpus("small", 1), "d1", T0)
    assert isinstance(core.submit(gpus("big", 8), "d2", T0 + 1).decision, Queued)
    now = T0
    for now in range(int(T0) + 5, int(T0) + 66, 5):
        core.report(gpu_node("a", free_gb=[0, 80, 80, 80]), now)
        core.tick(now)
    assert "b" in core.state.silent
    assert isinstance(core.poll("big", "d2", now + 1).decision, Queued)
    # a job submitted meanwhile that only the silent node makes possible waits too
    assert isinstance(core.submit(gpus("big2", 8), "d3", now + 1).decision, Queued)
    core.report(gpu_node("b"), now + 5)  # its agent is back
    core.release("small", "d1", now + 6)
    assert isinstance(core.poll("big", "d2", now + 7).decision, Placement)
    assert isinstance(core.poll("big2", "d3", now + 7).decision, Queued)


def test_a_silent_node_ray_then_lists_dead_drops_the_jobs_only_it_made_possible():
    core = SchedulerCore(SchedulerSettings())
    core.ray_nodes({"a", "b"}, set(), T0)
    core.report(gpu_node("a"), T0)
    core.report(gpu_node("b"), T0)
    core.submit(gpus("small", 1), "d1", T0)
    core.submit(gpus("big", 8), "d2", T0 + 1)
    for now in range(int(T0) + 5, int(T0) + 66, 5):
        core.report(gpu_node("a"), now)
        core.tick(now)
    assert isinstance(core.poll("big", "d2", T0 + 66).decision, Queued)
    core.ray_nodes({"a"}, {"b"}, T0 + 70)  # now b has left
    gone = core.poll("big", "d2", T0 + 71).decision
    assert isinstance(gone, Rejection) and "needs 8 worker(s)" in gone.message


def test_a_resumed_job_backfills_by_the_time_it_has_left_not_its_whole_estimate():
    # P was preempted after 901 of its 1000 s: 99 s left would end long before the head's
    # start (T0 + 1500), but its whole 1000 s were counted and 2 GPUs idled for 600 s.
    core = core_with(gpu_node("n", gpus=4))
    core.submit(JobSpec("R", num_workers=2, gpus_per_worker=1, expected_duration_s=1500),
                "d", T0)
    core.submit(JobSpec("P", num_workers=2, gpus_per_worker=1, expected_duration_s=1000),
                "d", T0)
    assert isinstance(core.submit(gpus("H", 4), "d", T0 + 890).decision, Queued)
    core.preempt("P", T0 + 900)
    resumed = core.yielded("P", "d", T0 + 901).decision
    assert isinstance(resumed, Placement), resumed
    assert core.running["P"].planned_end == pytest.approx(T0 + 1000)


def test_a_migration_behind_the_head_counts_the_time_the_job_has_left():
    # 'm' (3000 s, 1000 s left at T0 + 2000) moving onto the A100s ends at T0 + 3000, before
    # 'w' can start (T0 + 4500, when 'r' ends); counted whole it ended at T0 + 5000.
    core = core_with(gpu_node("a100", gpus=8), gpu_node("t4", gpus=4, family="T4"),
                     queue_order="fifo")
    core.submit(gpus("x", 4, accelerator_types=("A100",)), "d", T0)
    core.submit(gpus("r", 4, accelerator_types=("A100",), expected_duration_s=4500), "d", T0)
    core.submit(gpus("m", 4, expected_duration_s=3000), "d", T0)  # on the T4s
    assert core.running["m"].placement.nodes == ["t4"]
    core.submit(gpus("w", 8, accelerator_types=("A100",)), "d", T0 + 1)
    told = yields(core.release("x", "d", T0 + 2000))
    assert told and told["m"].kind == MIGRATE


def test_under_las_an_operators_preemption_puts_the_job_behind_those_waiting_at_its_priority():
    # V (level 0) preempted W (level 1); an operator preempts V to let W run. With a fresh
    # submit time but level 0, V went straight back ahead of W and was placed again at once.
    core = core_with(gpu_node("n", gpus=4), las_thresholds_gpu_s=(100.0, 1000.0))
    core.submit(gpus("W", 4), "dw", T0)
    core.submit(gpus("V", 4), "dv", T0 + 50)
    core.tick(T0 + 60)  # W has run 240 GPU-s: level 1, preempted for V
    assert isinstance(core.yielded("W", "dw", T0 + 61).decision, Queued)
    assert isinstance(core.poll("V", "dv", T0 + 61).decision, Placement)
    assert core.queue.level_of("W") == 1
    assert core.preempt("V", T0 + 80).decision is True
    back = core.yielded("V", "dv", T0 + 81).decision  # V has run 76 GPU-s: level 0
    assert isinstance(back, Queued) and back.position == 1, back
    assert isinstance(core.poll("W", "dw", T0 + 82).decision, Placement)
    assert core.queue.level_of("V") == 1  # it waits at W's level, after W
    assert not yields(core.tick(T0 + 200))  # and does not preempt W straight back
    again = SchedulerCore(core.settings)
    again.ray_nodes({"n"}, set(), T0 + 201)
    assert again.restore(json.loads(json.dumps(core.to_dict()))) == []
    assert again.queue.level_of("V") == 1


def test_a_queued_job_saved_before_level_floors_restores_at_its_own_level():
    q = JobQueue(level=lambda s: int(s >= 100))
    q.add(QueuedJob(gpus("a", 1), "o", 10.0, ran_s=500.0))
    saved = json.loads(json.dumps(q.to_dict()))
    for job in saved["waiting"]:
        job.pop("level_floor", None)
    again = JobQueue.from_dict(saved, level=lambda s: int(s >= 100))
    assert again.level_of("a") == 1 and again.waiting["a"].level_floor == 0


def test_rejections_kept_for_drivers_that_have_exited_are_dropped():
    # Nobody will poll for them: kept for ever, they grew the state saved on every change.
    core = core_with(cpu_node("a", cpus=4), cpu_node("b", cpus=4))
    core.submit(cpus("hold", 4), "d0", T0)
    for k in range(3):
        assert isinstance(core.submit(cpus(f"big{k}", 8), f"driver{k}", T0).decision, Queued)
    core.ray_nodes({"a"}, {"b"}, T0 + 1)  # they can never fit now
    assert set(core.queue.rejected) == {"big0", "big1", "big2"}
    outcome = core.owners_dead({"driver0", "driver1"}, T0 + 2)
    assert set(core.queue.rejected) == {"big2"} and outcome.persist
    assert set(core.queue.rejected_owners) == {"big2"}
    assert "big0" not in core.to_dict()["queue"]["rejected"]
    dropped = core.poll("big2", "driver2", T0 + 3).decision  # a live driver still learns why
    assert isinstance(dropped, Rejection) and "needs 8 worker(s)" in dropped.message


def test_the_heads_start_counts_whole_workers_per_node_not_gpus_summed_over_nodes():
    # 'head' needs a whole 4-GPU node; 2 GPUs are free on each of two nodes until T0 + 3600
    # (r1 ends; r2 an hour later). Summed, 4 free GPUs made its start "now": every backfill
    # touching those nodes was refused while their GPUs idled for an hour.
    core = core_with(gpu_node("a"), gpu_node("b"))
    for name, hours in (("r1", 1), ("filler", 1), ("r2", 2)):
        core.submit(JobSpec(name, num_workers=1, gpus_per_worker=2,
                            expected_duration_s=3600 * hours), "d", T0)
    core.release("filler", "d", T0)
    assert {n: j.placement.nodes for n, j in core.running.items()} == {"r1": ["a"],
                                                                      "r2": ["b"]}
    assert isinstance(core.submit(JobSpec("head", num_workers=1, gpus_per_worker=4), "d",
                                  T0 + 1).decision, Queued)
    short = core.submit(JobSpec("short", num_workers=1, gpus_per_worker=1,
                                expected_duration_s=60), "d", T0 + 2).decision
    assert isinstance(short, Placement), short
    long = core.submit(JobSpec("long", num_workers=1, gpus_per_worker=1,
                               expected_duration_s=7200), "d", T0 + 3).decision
    assert isinstance(long, Queued) and "would delay 'head'" in long.reason


def test_the_heads_start_counts_the_cpus_its_workers_need_beside_their_gpus():
    # 'head' needs 8 CPUs beside its 4 GPUs; 'prep' holds 14 of the node's 16 CPUs until
    # T0 + 3600. Counted by GPUs alone the head could start "now", and nothing backfilled.
    core = core_with(gpu_node("g", gpus=4, cpus=16))
    core.submit(JobSpec("prep", num_workers=14, cpus_per_worker=1, expected_duration_s=3600),
                "d", T0)
    assert isinstance(core.submit(JobSpec("head", num_workers=1, gpus_per_worker=4,
                                          cpus_per_worker=8), "d", T0 + 1).decision, Queued)
    short = core.submit(JobSpec("short", num_workers=1, gpus_per_worker=1, cpus_per_worker=1,
                                expected_duration_s=60), "d", T0 + 2).decision
    assert isinstance(short, Placement), short


def test_a_backfill_into_the_heads_spare_room_must_leave_its_workers_whole_per_node():
    # At the head's start (T0 + 100) 3 + 2 GPUs are free for its 2 workers of 2 GPUs: one
    # GPU spare in all, but a job taking one of b's would leave b with a single GPU, no
    # room for a worker, and the head waiting for 's' (10 hours) instead.
    core = core_with(gpu_node("a", gpus=3, memory_gb=40), gpu_node("b", gpus=3))
    core.submit(JobSpec("r", num_workers=1, gpus_per_worker=2, expected_duration_s=100,
                        accelerator_types=("A100",), min_gpu_memory_gb=30), "d", T0)
    core.submit(JobSpec("s", num_workers=1, gpus_per_worker=1, min_gpu_memory_gb=60,
                        expected_duration_s=36000), "d", T0)
    assert core.running["r"].placement.nodes == ["a"] and \
        core.running["s"].placement.nodes == ["b"]
    assert isinstance(core.submit(JobSpec("head", num_workers=2, gpus_per_worker=2), "d",
                                  T0 + 1).decision, Queued)
    on_b = core.submit(JobSpec("on-b", num_workers=1, gpus_per_worker=1,
                               min_gpu_memory_gb=60), "d", T0 + 2).decision
    assert isinstance(on_b, Queued) and "would delay 'head'" in on_b.reason
    on_a = core.submit(JobSpec("on-a", num_workers=1, gpus_per_worker=1), "d", T0 + 3)
    assert isinstance(on_a.decision, Placement) and on_a.decision.nodes == ["a"]


def test_a_job_only_a_silent_node_makes_possible_waits_out_of_line():
    # 'big' (8 GPUs) fits only with b, whose agent is silent. Kept as the blocked head, its
    # start was unknown (b is not counted as capacity): every job behind it that would use
    # a's GPUs was refused, and 3 of them idled for as long as b's agent was silent.
    core = SchedulerCore(SchedulerSettings())  # heartbeat limits 15 s / 60 s
    core.ray_nodes({"a", "b"}, set(), T0)
    core.report(gpu_node("a"), T0)
    core.report(gpu_node("b"), T0)
    assert core.submit(gpus("small", 1), "d1", T0).decision.nodes == ["a"]
    assert isinstance(core.submit(gpus("big", 8), "d2", T0 + 1).decision, Queued)
    now = T0
    for now in range(int(T0) + 5, int(T0) + 71, 5):
        core.report(gpu_node("a"), now)
        core.tick(now)
    assert "b" in core.state.silent
    waiting = core.poll("big", "d2", now).decision
    assert isinstance(waiting, Queued) and "silent node(s) b" in waiting.reason, waiting
    short = core.submit(gpus("short", 1), "d3", now).decision  # no estimate: ends "never"
    assert isinstance(short, Placement) and short.nodes == ["a"], short
    # a job submitted meanwhile that only b makes possible is told so (not "3 free now")
    big2 = core.submit(gpus("big2", 6), "d4", now).decision
    assert isinstance(big2, Queued) and "silent node(s) b" in big2.reason, big2
    core.report(gpu_node("b"), now + 5)  # b's agent is back: 'big' is in line again
    assert "would delay 'big'" in core.submit(gpus("late", 1), "d5", now + 6).decision.reason


def test_a_job_waiting_for_a_silent_node_does_not_hold_back_a_migration_as_the_head():
    # 'big' (8 H100s) fits only with b, whose agent is silent: a's 4 H100s freed, 'm' (on
    # the T4s, hours left) may move there. Taken for the blocked head (its start unknown),
    # 'big' refused the move, and a's H100s idled until b reported again.
    core = SchedulerCore(SchedulerSettings(min_run_s=10.0, restart_cost_s=30.0))
    core.ray_nodes({"a", "b", "t"}, set(), T0)
    for report in (gpu_node("a", family="H100"), gpu_node("b", family="H100"),
                   gpu_node("t", family="T4")):
        core.report(report, T0)
    for name in ("f1", "f2"):
        core.submit(gpus(name, 4, accelerator_types=("H100",)), "d", T0)
    core.submit(gpus("m", 4, expected_duration_s=36000), "d", T0)
    assert core.running["m"].placement.nodes == ["t"]
    now = T0
    for now in range(int(T0) + 5, int(T0) + 71, 5):
        core.report(gpu_node("a", family="H100"), now)
        core.report(gpu_node("t", family="T4"), now)
        core.tick(now)
    assert "b" in core.state.silent
    assert isinstance(core.submit(gpus("big", 8, accelerator_types=("H100",)), "d2",
                                  now).decision, Queued)
    told = yields(core.release("f1", "d", now + 1))
    assert "m" in told and told["m"].kind == MIGRATE, told


def test_jobs_ending_at_the_heads_start_all_count_in_its_room_then():
    # s1 and s2 (a sweep: one estimate) end together at T0 + 36000, the head's start. Only
    # s1's GPU counted in its room there (the walk stopped at the first end that made it
    # fit): 'b', leaving the head its 3 GPUs beside it then, was refused and a GPU idled.
    core = core_with(gpu_node("a", gpus=8))
    core.submit(JobSpec("r", num_workers=1, gpus_per_worker=4), "d", T0)  # no estimate
    for name in ("s1", "s2"):
        core.submit(JobSpec(name, num_workers=1, gpus_per_worker=1, expected_duration_s=36000),
                    "d", T0)
    assert isinstance(core.submit(JobSpec("head", num_workers=1, gpus_per_worker=3), "d",
                                  T0 + 1).decision, Queued)
    b = core.submit(JobSpec("b", num_workers=1, gpus_per_worker=1, expected_duration_s=72000),
                    "d", T0 + 2).decision
    assert isinstance(b, Placement), b
    # and no more than that: a second one would leave the head 2 GPUs at its start
    c = core.submit(JobSpec("c", num_workers=1, gpus_per_worker=1), "d", T0 + 3).decision
    assert isinstance(c, Queued) and "would delay 'head'" in c.reason, c


def test_a_cpu_backfill_on_the_heads_node_leaves_its_workers_room_at_its_start():
    # The head needs 3 GPUs and 12 CPUs of g, at T0 + 1000 (R ends). In one pass 'C' took 3
    # CPUs (the head's spare CPUs now, summed) and 'G' then the same CPUs from the head's
    # room at its start: at T0 + 1000 only 9 CPUs were left beside the GPUs for the head.
    core = core_with(gpu_node("g", gpus=4, cpus=16))
    core.submit(JobSpec("R", num_workers=1, gpus_per_worker=2, expected_duration_s=1000),
                "d", T0)
    core.submit(JobSpec("X", num_workers=1, gpus_per_worker=2, expected_duration_s=10),
                "d", T0)
    assert isinstance(core.submit(JobSpec("head", num_workers=1, gpus_per_worker=3,
                                          cpus_per_worker=12), "d", T0 + 1).decision, Queued)
    core.queue.add(QueuedJob(JobSpec("C", num_workers=1, cpus_per_worker=3,
                                     expected_duration_s=1e5), "d", T0 + 2))
    core.queue.add(QueuedJob(JobSpec("G", num_workers=1, gpus_per_worker=1, cpus_per_worker=4,
                                     expected_duration_s=1e5), "d", T0 + 3))
    core.release("X", "d", T0 + 10)  # one pass looks at C and G behind the blocked head
    assert "C" in core.running and "G" not in core.running
    assert "would delay 'head'" in core.queue.waiting["G"].reason
    core.release("R", "d", T0 + 1000)  # R ends as expected: the head starts
    assert isinstance(core.poll("head", "d", T0 + 1000).decision, Placement)


def test_a_cpu_backfill_is_judged_by_the_heads_room_at_its_start_not_by_cpus_free_now():
    # The head needs 3 GPUs and 12 CPUs of g, at T0 + 1000 (R ends); 'P' frees 9 CPUs at
    # T0 + 100. Of the 6 CPUs free now none is spare (summed), so 'C' (3 CPUs) was refused,
    # although at the head's start 16 CPUs are free there, 13 of them beside 'C'.
    core = core_with(gpu_node("g", gpus=4, cpus=16))
    core.submit(JobSpec("R", num_workers=1, gpus_per_worker=2, expected_duration_s=1000),
                "d", T0)
    core.submit(JobSpec("P", num_workers=1, cpus_per_worker=9, expected_duration_s=100),
                "d", T0)
    assert isinstance(core.submit(JobSpec("head", num_workers=1, gpus_per_worker=3,
                                          cpus_per_worker=12), "d", T0 + 1).decision, Queued)
    c = core.submit(JobSpec("C", num_workers=1, cpus_per_worker=3, expected_duration_s=1e5),
                    "d", T0 + 2).decision
    assert isinstance(c, Placement), c
    # one more would leave the head 10 CPUs beside its GPUs then
    more = core.submit(JobSpec("C2", num_workers=1, cpus_per_worker=3), "d", T0 + 3).decision
    assert isinstance(more, Queued) and "would delay 'head'" in more.reason, more


def test_a_restarted_scheduler_still_counts_a_node_only_silent_for_the_jobs_it_makes_possible():
    # b's agent was silent past dead_after_s, Ray still listing b alive: 'big' waited for it.
    # A restarted scheduler knew nothing of b's capacity (no report since) and dropped 'big'
    # as never fitting once suspect_after_s had passed, b still alive in Ray's eyes.
    core = SchedulerCore(SchedulerSettings())  # heartbeat limits 15 s / 60 s
    core.ray_nodes({"a", "b"}, set(), T0)
    core.report(gpu_node("a"), T0)
    core.report(gpu_node("b"), T0)
    core.submit(gpus("small", 1), "d1", T0)
    core.submit(gpus("big", 8), "d2", T0 + 1)
    now = T0
    for now in range(int(T0) + 5, int(T0) + 71, 5):
        core.report(gpu_node("a"), now)
        core.tick(now)
    assert "b" in core.state.silent
    saved = json.loads(json.dumps(core.to_dict()))
    again = SchedulerCore(core.settings)
    assert again.restore(saved) == []
    again.restored_at = now
    again.ray_nodes({"a", "b"}, set(), now)  # Ray still lists b alive
    for now in range(now + 5, now + 41, 5):
        again.report(gpu_node("a"), now)
        again.tick(now)
    waiting = again.poll("big", "d2", now).decision
    assert isinstance(waiting, Queued) and "silent node(s) b" in waiting.reason, waiting
    again.report(gpu_node("b"), now + 1)  # b's agent is back
    again.release("small", "d1", now + 2)
    assert isinstance(again.poll("big", "d2", now + 3).decision, Placement)
    # a state saved before silent nodes' reports were kept restores as it did
    older = dict(saved)
    del older["silent_node_reports"]
    assert SchedulerCore(core.settings).restore(older) == []
    # and a record that cannot be read is named and skipped
    saved["silent_node_reports"]["b"]["report"]["ray_gpus"] = -4
    problems = SchedulerCore(core.settings).restore(saved)
    assert len(problems) == 1 and "silent node 'b'" in problems[0] and "ray_gpus" in problems[0]


def test_the_starvation_guard_does_not_lift_a_level_floor_alone():
    # V (own level 0) waits at W's level 1 after an operator preempted it. Its promotion was
    # planned as for a level-1 job (after factor x its 19 s run) and lifted the floor at
    # T0 + 99: V went back ahead of W, the job it was preempted to let run.
    q = JobQueue(level=lambda s: int(s >= 100),
                 promote_after=lambda job: 1.0 * job.ran_s if job.ran_s > 0 else None)
    q.add(QueuedJob(gpus("W", 4), "w", T0, ran_s=50.0, queued_at=T0 + 60))  # 200 GPU-s
    q.add(QueuedJob(gpus("V", 4), "v", T0 + 80, ran_s=19.0, queued_at=T0 + 80,
                    level_floor=1))  # 76 GPU-s: level 0 of its own
    assert [j.spec.name for j in q.ordered()] == ["W", "V"]
    assert q.next_promotion(after=T0 + 81) == T0 + 110  # W's, after 50 s of waiting
    q.promote_due(T0 + 100)
    assert [j.spec.name for j in q.ordered()] == ["W", "V"] and not q.waiting["V"].promoted


def test_a_saved_state_with_a_job_both_running_and_waiting_keeps_it_running_and_says_so():
    # A hand-edited (or corrupt) state: 'J' both runs and waits. The waiting copy was kept
    # beside the running one, and the first queue pass dropped it without a word.
    core = core_with(gpu_node("a"), gpu_node("b"))
    core.submit(gpus("J", 4), "dj", T0)
    core.submit(gpus("W", 6), "dw", T0)  # waits
    saved = json.loads(json.dumps(core.to_dict()))
    saved["queue"]["waiting"].append(QueuedJob(gpus("J", 4), "dj", T0).to_dict())
    again = SchedulerCore(core.settings)
    problems = again.restore(saved)
    assert len(problems) == 1 and "'J'" in problems[0] and "running" in problems[0], problems
    assert "J" in again.running and list(again.queue.waiting) == ["W"]
    assert again.queue.gpus_by_allowed[()] == 6  # the waiting GPUs counted once, W's


# -- the silent-node check's cost in a queue pass (2026-12-06, night) ------------------------------

def silent_cluster(seed: int):
    """A random cluster of 12 GPU nodes, 2 of them silent (their agents stopped reporting)
    but listed alive by Ray; the moment after."""
    import random

    rng = random.Random(seed)
    nodes = [gpu_node(f"n{i}", gpus=rng.randint(1, 8), cpus=rng.choice((8, 16, 32, 64)),
                      **rng.choice(({"family": "A100", "memory_gb": 80.0},
                                    {"family": "A100", "memory_gb": 40.0},
                                    {"family": "H100", "memory_gb": 80.0},
                                    {"family": "T4", "memory_gb": 16.0})))
             for i in range(12)]
    core = SchedulerCore(SchedulerSettings())  # heartbeat limits 15 s / 60 s
    core.ray_nodes({n.node_id for n in nodes}, set(), T0)
    for n in nodes:
        core.report(n, T0)
    now = T0
    for now in range(int(T0) + 5, int(T0) + 71, 5):
        for n in nodes[2:]:
            core.report(n, now)
        core.tick(now)
    assert core.state.silent == {"n0", "n1"}
    return core, nodes, rng, float(now)


def random_specs(rng, nodes, count: int) -> list[JobSpec]:
    specs = []
    for i in range(count):
        gpus_each = rng.choice((0, 1, 1, 2))
        specs.append(JobSpec(
            f"j{i}", num_workers=rng.randint(1, 60), gpus_per_worker=gpus_each,
            cpus_per_worker=rng.choice((1.0, 2.0, 4.0)),
            min_gpu_memory_gb=rng.choice((0.0, 20.0, 40.0)) if gpus_each else 0.0,
            accelerator_types=rng.choice(((), ("A100",), ("H100",), ("A100", "H100"), ("T4",)))
            if gpus_each else ()))
    return specs


@pytest.mark.parametrize("seed", range(5))
def test_silent_nodes_needed_answers_alike_when_shared_across_a_pass(seed):
    # The queue pass asks every waiting job which silent nodes it needs; the answer is now
    # shared by jobs of one kind of worker, whatever their worker count. Shared in one moment,
    # each job's answer is the one it gets asked alone (a moment of its own, nothing shared),
    # its own excluded GPUs (a GPU found short of memory) included.
    core, nodes, rng, now = silent_cluster(seed)
    specs = random_specs(rng, nodes, 300)
    for spec in rng.sample(specs, 60):
        node = rng.choice(nodes)
        core.excluded_gpus[spec.name] = {(node.node_id, g.index) for g in node.gpus
                                         if rng.random() < 0.5}
    shared = [core._silent_nodes_needed(spec, now + 1) for spec in specs]
    alone = [core._silent_nodes_needed(spec, now + 2 + i / 1000) for i, spec in enumerate(specs)]
    assert shared == alone
    assert any(shared) and not all(shared)  # (jobs that need silent nodes, and others)


def test_the_silent_node_check_counts_the_cluster_once_per_kind_of_worker(monkeypatch):
    # With one node silent, a queue pass of 700 waiting job shapes at 500 nodes cost ~14 ms
    # more: the idle cluster's room was counted over every node for each job shape, though
    # the worker count (what mostly makes shapes differ) does not change the count.
    from orchestrator import scheduler_core
    from orchestrator.placement import capacity_shape

    core, nodes, rng, now = silent_cluster(0)
    specs = random_specs(rng, nodes, 300)
    counted = []

    real = scheduler_core.worker_capacity

    def counting(spec, *args, **kwargs):
        counted.append(spec.name)
        return real(spec, *args, **kwargs)
    monkeypatch.setattr(scheduler_core, "worker_capacity", counting)
    for spec in specs:
        core._silent_nodes_needed(spec, now + 1)
    kinds = {capacity_shape(spec) for spec in specs}
    assert len(counted) == len(kinds) < len({scheduler_core._shape(s) for s in specs}) / 2


# -- trial placements (the victim search's "would it fit?") ----------------------------------

def test_trial_placements_explain_no_node_but_users_still_get_reasons(monkeypatch):
    # 8 GPUs free (enough to try), on 2-GPU nodes: a job of 4 GPUs per worker fits none.
    from orchestrator import placement
    calls = []
    real = placement._node_reason
    monkeypatch.setattr(placement, "_node_reason",
                        lambda *a, **k: calls.append(a[2].node_id) or real(*a, **k))
    core = core_with(*[gpu_node(f"a{i}", gpus=2) for i in range(2)],
                     *[gpu_node(f"t{i}", gpus=2, family="T4") for i in range(2)])
    for families in (("A100",), ("A100", "T4")):
        spec = JobSpec("big", num_workers=2, gpus_per_worker=4, accelerator_types=families)
        assert core._would_place(spec, T0 + 1) is False
    assert calls == []  # every trial rejection was thrown away unexplained
    spec = JobSpec("big", num_workers=2, gpus_per_worker=4, accelerator_types=("A100",))
    rejection = core.place_now(spec, "d", T0 + 1, dry_run=True).decision
    assert isinstance(rejection, Rejection)
    assert sorted(calls) == ["a0", "a1", "t0", "t1"]
    assert rejection.node_reasons["a0"] == "needs 4 GPU per worker, 2 free (0 reserved)"
    assert "  node a0: needs 4 GPU per worker, 2 free (0 reserved)" in rejection.message


def test_a_trial_placement_decides_as_the_real_one_without_the_verdict(monkeypatch):
    # One GPU free on each of an A100 and a T4 node: a 2-GPU worker allowed either family is
    # worth trying (2 GPUs free) but fits nowhere until a running job leaves; the verdict
    # ("it fits once running jobs release their room") is what keeps it waiting.
    from orchestrator import placement
    core = core_with(gpu_node("a0", gpus=2), gpu_node("t0", gpus=2, family="T4"))
    for name, family in (("ra", "A100"), ("rt", "T4")):
        assert isinstance(core.submit(gpus(name, 1, accelerator_types=(family,)), "d",
                                      T0).decision, Placement)
    spec = JobSpec("w", num_workers=1, gpus_per_worker=2, accelerator_types=("A100", "T4"))
    assert core._family_choice(spec, core._free_units(T0 + 1)[0]) is not None
    chosen = []
    real_choose = placement._choose
    monkeypatch.setattr(placement, "_choose", lambda *a: chosen.append(a) or real_choose(*a))
    assert core._would_place(spec, T0 + 1) is False
    assert chosen == []  # no verdict computed: no search of the idle cluster
    waiting = core.submit(spec, "d", T0 + 1).decision
    assert isinstance(waiting, Queued)  # the real one: waits, and says why
    assert waiting.reason.startswith("cannot place job 'w': it needs 1 worker(s)")
    assert placement.FITS_WHEN_FREED in waiting.reason
    assert chosen  # (the verdict, for the user's reason)
    core.release("ra", "d", T0 + 2)  # room on a0 now: both place it, alike
    assert "w" in core.queue.ready
    assert core.queue.ready["w"].nodes == ["a0"]


# -- the scheduler actor's recovery (2026-12-07, second session) -------------------------------------

def test_a_preemption_for_a_waiting_job_not_restored_is_withdrawn_from_its_victims():
    # 'high' preempts 'low'; the restarted scheduler cannot read high's queue record. low was
    # still told to preempt (for a job no longer there) and restarted for nothing; a cancel of
    # high before the restart withdraws an unread directive (_forget_preemption).
    core = core_with(cpu_node("a", cpus=2), cpu_node("b", cpus=2))
    core.submit(cpus("low", 2), "d", T0)
    core.submit(cpus("low2", 2), "d", T0)
    core.submit(cpus("high", 2, priority=3), "d", T0 + 30)
    assert core.preempting == {"high": {"low"}}
    saved = json.loads(json.dumps(core.to_dict()))
    saved["queue"]["waiting"][0]["enqueued_at"] = "x"
    again = core_with(cpu_node("a", cpus=2), cpu_node("b", cpus=2))
    problems = again.restore(saved)
    assert any("queued job 'high'" in p for p in problems), problems
    assert any("'high'" in p and "withdrew" in p and "'low'" in p for p in problems), problems
    assert again.preempting == {} and again.running["low"].directive is None
    assert again.directive("low", T0 + 41).decision is None



def test_an_unread_migration_whose_target_node_died_is_withdrawn():
    # The A100 node of job's migration target died (Ray lists it dead) before job read its
    # directive: job was still told to migrate, checkpointed, restarted, and was placed
    # again on the T4s it had left. Withdrawn, it trains on undisturbed.
    core = core_with(gpu_node("t4", gpus=2, family="T4"), gpu_node("a100", gpus=2))
    core.submit(gpus("blocker", 2, accelerator_types=("A100",)), "d", T0)
    core.submit(gpus("job", 2, expected_duration_s=3600), "d", T0)
    assert yields(core.release("blocker", "d", T0 + 60))["job"].kind == MIGRATE
    assert core.ray_nodes({"t4"}, {"a100"}, T0 + 65).persist
    assert core.running["job"].directive is None
    assert "job" + CLAIM_SUFFIX not in core.state.reservations
    assert core.directive("job", T0 + 66).decision is None
    # one already read is carried out: the job yields and is placed afresh
    core.ray_nodes({"t4", "a100"}, set(), T0 + 70)
    core.report(gpu_node("a100", gpus=2), T0 + 70)
    assert yields(core.tick(T0 + 200))["job"].kind == MIGRATE
    assert core.directive("job", T0 + 201).decision.kind == MIGRATE
    core.ray_nodes({"t4"}, {"a100"}, T0 + 202)
    assert core.running["job"].directive.kind == MIGRATE
    assert core.yielded("job", "d", T0 + 210).decision.nodes == ["t4"]


def test_an_unread_migration_whose_target_node_went_silent_then_dead_is_withdrawn():
    # Silent past dead_after_s, the claim's reservation there is kept aside (the node may
    # report again, and the move be made); once Ray lists the node dead it is not coming back
    # and the move is withdrawn as above.
    core = core_with(gpu_node("t4", gpus=2, family="T4"), gpu_node("a100", gpus=2),
                     suspect_after_s=15, dead_after_s=60)
    core.submit(gpus("blocker", 2, accelerator_types=("A100",)), "d", T0)
    core.submit(gpus("job", 2, expected_duration_s=3600), "d", T0)
    for node in (gpu_node("t4", gpus=2, family="T4"), gpu_node("a100", gpus=2)):
        core.report(node, T0 + 55)
    assert yields(core.release("blocker", "d", T0 + 60))["job"].kind == MIGRATE
    core.report(gpu_node("t4", gpus=2, family="T4"), T0 + 110)
    assert core.tick(T0 + 116).decision["lost_reservations"] == ["job" + CLAIM_SUFFIX]
    assert core.running["job"].directive is None  # withdrawn at once (next test)
    core.ray_nodes({"t4"}, {"a100"}, T0 + 120)
    assert core.running["job"].directive is None
    assert "job" + CLAIM_SUFFIX not in core.state.reservations


def test_an_unread_migration_whose_target_node_went_silent_is_withdrawn_and_made_again():
    # Its target's agent silent past dead_after_s (Ray still listing the node alive), job's
    # claim there was kept aside and the directive kept: job read it, checkpointed, restarted,
    # and (part of its claim lost) was placed again on the T4s it had left. Withdrawn, it
    # trains on; once the node reports again the move is made afresh.
    core = core_with(gpu_node("t4", gpus=2, family="T4"), gpu_node("a100", gpus=2),
                     suspect_after_s=15, dead_after_s=60)
    t4, a100 = gpu_node("t4", gpus=2, family="T4"), gpu_node("a100", gpus=2)
    core.submit(gpus("blocker", 2, accelerator_types=("A100",)), "d", T0)
    core.submit(gpus("job", 2, expected_duration_s=3600), "d", T0)
    core.report(t4, T0 + 55)
    core.report(a100, T0 + 55)
    assert yields(core.release("blocker", "d", T0 + 60))["job"].kind == MIGRATE
    core.report(t4, T0 + 110)
    assert core.tick(T0 + 116).decision["expired"] == ["a100"]
    assert core.directive("job", T0 + 117).decision is None
    assert "job" + CLAIM_SUFFIX not in core.state.reservations
    assert core.state.silent_reservations == {}  # nothing kept aside for a withdrawn claim
    assert core.running["job"].placement.nodes == ["t4"]
    core.report(t4, T0 + 150)
    core.report(a100, T0 + 150)  # a100 answers again: free, the move is made afresh
    told = yields(core.tick(T0 + 151))["job"]
    assert told.kind == MIGRATE and told.target_nodes == ("a100", "a100")
    assert [r.node_id for r in core.state.reservations["job" + CLAIM_SUFFIX]] == ["a100"]


def test_one_bad_entry_of_preempting_excluded_gpus_or_given_back_costs_that_entry_alone():
    # Each of these parts was restored whole: one malformed entry (named only by its value)
    # cost every job's. With high1's preemption record lost, high1 preempted a second victim
    # (low2) beside low1, which was already yielding for it; the other counts and exclusions
    # were lost with it (a resent yielded carried out twice, a too-small GPU handed out again).
    nodes = [cpu_node(n, cpus=2) for n in "abc"]
    core = core_with(*nodes)
    for name in ("low1", "low2", "low3"):
        core.submit(cpus(name, 2), "d", T0)
    core.submit(cpus("high1", 2, priority=3), "d", T0 + 30)
    assert core.preempting == {"high1": {"low1"}}
    saved = json.loads(json.dumps(core.to_dict()))
    saved["preempting"]["gone"] = "low2"
    saved["excluded_gpus"] = {"low2": [["a", 0]], "low3": [["b", "zero"]]}
    saved["placements_given_back"] = {"low1": 1, "low3": "2"}
    again = SchedulerCore(core.settings)
    problems = again.restore(saved)
    assert again.preempting == {"high1": {"low1"}}
    assert again.excluded_gpus == {"low2": {("a", 0)}}
    assert again.placements_given_back == {"low1": 1}
    for part, name in (("preemption", "gone"), ("excluded GPUs", "low3"),
                       ("placements given back", "low3")):
        assert any(part in p and repr(name) in p for p in problems), (part, problems)
    again.ray_nodes({n.node_id for n in nodes}, set(), T0 + 40)
    for n in nodes:
        again.report(n, T0 + 40)
    again.tick(T0 + 41)
    assert {n: j.directive.for_job for n, j in again.running.items() if j.directive} == \
        {"low1": "high1"}


def test_an_unread_migration_whose_claim_record_is_not_restored_is_withdrawn():
    # The claim's reservation record could not be read: the restored job was still told to
    # migrate, checkpointed, restarted, and (no claim to hand over) was placed again where it
    # had been.
    core = core_with(gpu_node("t4", gpus=2, family="T4"), gpu_node("a100", gpus=2))
    core.submit(gpus("blocker", 2, accelerator_types=("A100",)), "d", T0)
    core.submit(gpus("job", 2, expected_duration_s=3600), "d", T0)
    assert yields(core.release("blocker", "d", T0 + 60))["job"].kind == MIGRATE
    saved = json.loads(json.dumps(core.to_dict()))
    saved["reservations"]["job" + CLAIM_SUFFIX][0]["gpus"] = -1
    again = core_with(gpu_node("t4", gpus=2, family="T4"), gpu_node("a100", gpus=2))
    problems = again.restore(saved)
    assert any("withdrew the migration of 'job'" in p for p in problems), problems
    assert again.running["job"].directive is None
    assert again.directive("job", T0 + 61).decision is None


def test_a_bad_saved_heartbeat_limit_beside_its_partner_costs_the_pair_alone():
    # dead_after_s hand-edited to a string beside a saved suspect_after_s above the default
    # dead_after_s: the suspect limit alone beside the default failed, and every saved
    # setting went back to its default (preemption switched back on).
    from orchestrator.scheduler_types import settings_to_run_with

    core = core_with(gpu_node("a"), suspect_after_s=100.0, dead_after_s=300.0,
                     preemption=False, min_run_s=7.0)
    saved = json.loads(json.dumps(core.to_dict()))
    saved["settings"]["dead_after_s"] = "5min"
    settings, problem = settings_to_run_with({}, saved)
    assert settings == dataclasses.replace(core.settings, suspect_after_s=15.0,
                                           dead_after_s=60.0)
    assert "dead_after_s must be a number > 0" in problem
    assert "dead_after_s, suspect_after_s at their defaults" in problem
    # (the same beside a bad suspect_after_s, a saved dead_after_s below its default)
    saved["settings"].update(suspect_after_s=0, dead_after_s=10.0)
    settings, problem = settings_to_run_with({}, saved)
    assert settings == dataclasses.replace(core.settings, suspect_after_s=15.0,
                                           dead_after_s=60.0)
    SchedulerCore(settings)


def test_a_backfill_refused_over_two_families_is_asked_again_without_only_the_delayed_ones():
    # A policy's placement over two families (first-fit in table order: the T4 node's one free
    # GPU, then three A100s) is refused as backfill: its T4 GPU would delay the T4-only head.
    # It was asked again without both families it used, so none was left and x waited beside
    # eight idle A100s the head cannot use (the simulator's random and type-blind policies,
    # constrained trace). Only the families where it would delay a plan are left out now.
    from orchestrator.policies import first_fit
    reports = (gpu_node("t4", family="T4"), gpu_node("a1"), gpu_node("a2"))
    core = SchedulerCore(SchedulerSettings(min_run_s=10.0, suspect_after_s=1e4,
                                           dead_after_s=1e5, queue_order="fifo"),
                         policy=first_fit)
    core.ray_nodes({r.node_id for r in reports}, set(), T0)
    for r in reports:
        assert core.report(r, T0).decision is True
    first = core.submit(gpus("r1", 3, accelerator_types=("T4",), expected_duration_s=1000),
                        "d", T0).decision
    assert isinstance(first, Placement) and first.nodes == ["t4"]
    assert isinstance(core.submit(gpus("head", 4, accelerator_types=("T4",)), "d",
                                  T0 + 1).decision, Queued)
    x = core.submit(gpus("x", 4, accelerator_types=("A100", "T4")), "d", T0 + 2).decision
    assert isinstance(x, Placement) and set(x.nodes) <= {"a1", "a2"}


def test_a_retired_node_is_not_counted_dead_once_ray_drops_it_from_its_dead_list():
    # Ray's GCS keeps the last maximum_gcs_dead_node_cached_count (1000) dead nodes and
    # evicts the oldest: on a long-lived autoscaling cluster a node scaled down on purpose
    # dropped out of ray.nodes(), so out of the retired set, and the scheduler (which still
    # knew it) counted it dead: the dead gauge rose at each later scale-down and NodeDown
    # paged; `status` showed it dead, not retired.
    from orchestrator import metric_catalogue as m

    core = core_with(cpu_node("up"), cpu_node("scaled"), cpu_node("crashed"))

    def dead_gauge(retired, now):
        samples = core.tick(now, retired=retired).samples
        return {t["health"]: v for spec, v, t in samples if spec is m.SCHEDULER_NODES}["dead"]

    core.ray_nodes({"up"}, {"scaled", "crashed"}, T0 + 10)
    assert dead_gauge({"scaled"}, T0 + 10) == 1  # crashed only
    core.ray_nodes({"up"}, {"crashed"}, T0 + 20)  # Ray evicted scaled's entry
    assert dead_gauge(set(), T0 + 20) == 1  # (was 2)
    assert core.retired == {"scaled"}  # still retired (what `status` shows)


def test_a_restored_unread_migration_with_part_of_its_claim_on_a_silent_node_is_withdrawn():
    # A state saved before silence withdrew such a migration (or by a scheduler stopped between
    # the expiry and its tick's end) has the claim's part on the silent node kept aside: the
    # restored job was still told to migrate, restarted, and was placed again where it was.
    core = core_with(gpu_node("t4", gpus=2, family="T4"), gpu_node("a100", gpus=2),
                     suspect_after_s=15, dead_after_s=60)
    core.submit(gpus("blocker", 2, accelerator_types=("A100",)), "d", T0)
    core.submit(gpus("job", 2, expected_duration_s=3600), "d", T0)
    core.report(gpu_node("t4", gpus=2, family="T4"), T0 + 55)
    core.report(gpu_node("a100", gpus=2), T0 + 55)
    assert yields(core.release("blocker", "d", T0 + 60))["job"].kind == MIGRATE
    core.report(gpu_node("t4", gpus=2, family="T4"), T0 + 110)
    assert core.state.expire(T0 + 116) == (["a100"], ["job" + CLAIM_SUFFIX])  # as it was saved
    saved = json.loads(json.dumps(core.to_dict()))
    assert saved["reservations"]["job" + CLAIM_SUFFIX] == []
    again = SchedulerCore(core.settings)
    problems = again.restore(saved)
    assert any("withdrew the migration of 'job'" in p for p in problems), problems
    assert again.running["job"].directive is None
    assert "job" + CLAIM_SUFFIX not in again.state.reservations
    assert again.state.silent_reservations == {}


@pytest.mark.parametrize("stop", ["preempt", "cancel"])
def test_an_operators_preempt_or_cancel_of_a_migrating_job_frees_its_claimed_target(stop):
    # job was told to migrate onto the A100s (claimed); an operator then preempted or
    # cancelled it: it will not move, but the claim held the A100s until it had checkpointed
    # and yielded, and an A100 job submitted meanwhile waited for them.
    core = core_with(gpu_node("t4", gpus=2, family="T4"), gpu_node("a100", gpus=2))
    core.submit(gpus("blocker", 2, accelerator_types=("A100",)), "d", T0)
    core.submit(gpus("job", 2, expected_duration_s=3600), "d", T0)
    assert yields(core.release("blocker", "d", T0 + 60))["job"].kind == MIGRATE
    assert getattr(core, stop)("job", now=T0 + 61, **({"owner": ""} if stop == "cancel"
                                                     else {})).decision is True
    assert "job" + CLAIM_SUFFIX not in core.state.reservations
    assert core.running["job"].directive.kind == (PREEMPT if stop == "preempt" else CANCEL)
    waiting = core.submit(gpus("w", 2, accelerator_types=("A100",)), "d", T0 + 62).decision
    assert isinstance(waiting, Placement) and waiting.nodes == ["a100"]
    after = core.yielded("job", "d", T0 + 70).decision
    assert isinstance(after, Rejection if stop == "cancel" else Placement), after


def test_a_preempted_job_that_the_shrunk_cluster_can_no_longer_hold_is_refused_as_it_yields():
    # low ran on a and x (8 GPUs); high preempted it; x died while low checkpointed. Requeued
    # as it yielded, it waited for ever ("it fits once running jobs ... release their room")
    # on a cluster of 4 GPUs: nodes leaving refuse only the jobs waiting at that moment.
    core = core_with(gpu_node("a"), gpu_node("x"))
    assert core.submit(gpus("low", 8), "dl", T0).decision.nodes == ["a", "x"]
    assert "preempting low" in core.submit(gpus("high", 4, priority=5), "dh", T0 + 60
                                           ).decision.reason
    core.ray_nodes({"a"}, {"x"}, T0 + 61)
    told = core.yielded("low", "dl", T0 + 62).decision
    assert isinstance(told, Rejection) and not told.fits_when_free, told
    assert "room for 4 worker(s)" in told.message
    assert core.poll("low", "dl", T0 + 63).decision == told  # kept for its driver
    assert isinstance(core.poll("high", "dh", T0 + 63).decision, Placement)
    assert "low" not in core.preempting.get("high", set())


def test_a_passes_plans_are_looked_up_once_per_kind_of_blocked_job(monkeypatch):
    # Behind a plan on the A100s, every blocked job alike re-did the family look-up on every
    # pass: 6.2M _plan_blocked calls replaying 8,000 Philly jobs under Gavel-style.
    import orchestrator.scheduler_core as sc

    core = core_with(gpu_node("a", gpus=4))
    core.submit(gpus("running", 4), "d", T0)
    for i in range(40):
        core.submit(gpus(f"w{i}", 1 + i % 2), "d", T0 + 1 + i)
    blocked = list(core.queue.ordered())
    calls = []
    real = sc.allowed_families
    monkeypatch.setattr(sc, "allowed_families", lambda spec: calls.append(spec) or real(spec))
    plans = core._plans_for(blocked, T0 + 100, core._free_units(T0 + 100)[0])
    assert [p.job for p in plans] == ["w0"]
    assert len(calls) <= 4, len(calls)  # (one per kind of job, not per job: was 39)


def test_victims_shown_free_are_kept_as_one_set_as_they_come_and_go():
    # The slots shown free were gathered from every victim's entries again on each add:
    # quadratic in the victims of one search.
    from orchestrator.scheduler_core import _AsIfYielded

    core = core_with(gpu_node("a", gpus=8), gpu_node("b", gpus=8))
    for i in range(8):
        core.submit(gpus(f"v{i}", 2), "d", T0)
    names = [f"v{i}" for i in range(8)]
    with _AsIfYielded(core, names) as thought:
        def gathered():
            return {(row, int(s)) for entries in thought.memory.values()
                    for row, slots, _ in entries for s in slots}
        assert thought.shown == gathered() and len(thought.shown) == 16
        for name, left in (("v3", 14), ("v0", 12)):
            thought.take_back(name)
            assert thought.shown == gathered() and len(thought.shown) == left
        thought.add("v3")
        assert thought.shown == gathered() and len(thought.shown) == 14
