"""Host RAM as a placement resource (JobSpec.min_host_memory_gb): a CPU job whose workers each
need more RAM than a node has was placed there by CPU count alone, on a cluster, and killed by
the kernel's OOM killer mid-run."""
import dataclasses
import json
import math
from pathlib import Path

import pytest

from orchestrator.config import ConfigError, JobSpec, TrainConfig
from orchestrator.inventory import GIB
from orchestrator.placement import Placement, PlacementError, Queued, Rejection, place
from orchestrator.scheduler_core import SchedulerCore
from orchestrator.scheduler_types import SchedulerSettings
from tests.unit.nodes import NOW, cluster, node

T0 = 1_000.0


def ram_node(node_id, cpus=8, total_gb=64, available_gb=None):
    return dataclasses.replace(node(node_id, cpus=cpus), ram_total_bytes=int(total_gb * GIB),
                               ram_available_bytes=int((available_gb if available_gb is not None
                                                        else total_gb) * GIB))


def core_with(*reports):
    core = SchedulerCore(SchedulerSettings(suspect_after_s=1e4, dead_after_s=1e5))
    core.ray_nodes({r.node_id for r in reports}, set(), T0)
    for r in reports:
        assert core.report(r, T0).decision is True
    return core


def test_the_field_is_validated_naming_it():
    assert JobSpec("j").min_host_memory_gb == 0
    assert JobSpec("j", min_host_memory_gb=12.5).min_host_memory_gb == 12.5
    for bad in (-1, float("nan"), float("inf"), True, "8", 10**7):
        with pytest.raises(ConfigError, match=r"min_host_memory_gb must be a number of GiB in "
                                              r"\[0, 100000\], got"):
            JobSpec("j", min_host_memory_gb=bad)


def test_a_job_file_sets_it(tmp_path):
    from orchestrator.job_file import load_job_file

    path = tmp_path / "job.yaml"
    path.write_text("name: j\nentrypoint: train.py:loop\nmin_host_memory_gb: 24\n")
    assert load_job_file(path).spec.min_host_memory_gb == 24
    path.write_text("name: j\nentrypoint: train.py:loop\nmin_host_memory_gb: -3\n")
    with pytest.raises(ConfigError, match="job.yaml: .*min_host_memory_gb must be a number"):
        load_job_file(path)


def test_a_worker_goes_only_to_a_node_whose_ram_holds_it():
    # "small" is the tighter fit by CPUs (and first by load): by CPUs alone it went there.
    state = cluster(ram_node("small", cpus=4, total_gb=16, available_gb=12),
                    ram_node("big", cpus=16, total_gb=128, available_gb=100))
    spec = JobSpec("j", num_workers=2, min_host_memory_gb=20)
    placement = place(spec, state, NOW)
    assert placement.worker_nodes == ("big", "big")
    assert placement.host_memory_gb_per_worker == 20
    assert "needs 20 GiB of host RAM per worker, has 12.0 GiB available" in \
        placement.node_reasons["small"]
    # Without the field, CPUs alone count (the simulator's and every old job's case).
    assert place(JobSpec("k", num_workers=2), state, NOW).worker_nodes == ("small", "small")


def test_what_placed_workers_asked_for_is_not_handed_out_again():
    state = cluster(ram_node("a", cpus=16, total_gb=64, available_gb=60))
    first = place(JobSpec("first", num_workers=2, min_host_memory_gb=20), state, NOW)
    state.reserve("first", first.reservations())
    assert state.reserved_memory_on("a") == 40
    with pytest.raises(PlacementError) as refused:  # 60 - 40 = 20 left, 25 asked
        place(JobSpec("second", min_host_memory_gb=25), state, NOW)
    assert refused.value.rejection.fits_when_free  # it waits: the node holds it once idle
    assert "25 GiB of host RAM per worker, has 20.0 GiB available (64.0 GiB total, 40 GiB " \
        "reserved, 4.0 GiB in use outside them)" in \
        refused.value.rejection.node_reasons["a"]
    assert place(JobSpec("third", min_host_memory_gb=20), state, NOW).worker_nodes == ("a",)
    state.release("first")
    assert state.reserved_memory_on("a") == 0
    assert place(JobSpec("second", min_host_memory_gb=25), state, NOW).worker_nodes == ("a",)


def test_a_job_no_node_could_ever_hold_is_refused_naming_its_need_and_the_largest_node():
    state = cluster(ram_node("a", total_gb=16), ram_node("b", total_gb=32, available_gb=30))
    with pytest.raises(PlacementError) as refused:
        place(JobSpec("huge", num_workers=1, min_host_memory_gb=48), state, NOW)
    rejection = refused.value.rejection
    assert not rejection.fits_when_free
    headline = rejection.message.splitlines()[0]
    assert "each worker needs 48 GiB of host RAM (min_host_memory_gb), and the largest " \
        "node has 32.0 GiB" in headline, headline


def test_the_core_refuses_what_never_fits_and_queues_what_fits_later():
    core = core_with(ram_node("small", cpus=8, total_gb=16),
                     ram_node("big", cpus=8, total_gb=64, available_gb=60))
    never = core.submit(JobSpec("huge", min_host_memory_gb=100), "d", T0).decision
    assert isinstance(never, Rejection) and not never.fits_when_free
    assert "needs 100 GiB of host RAM" in never.message and not len(core.queue)
    placed = core.submit(JobSpec("a", num_workers=2, min_host_memory_gb=24), "d", T0).decision
    assert isinstance(placed, Placement) and placed.nodes == ["big"]
    waits = core.submit(JobSpec("b", min_host_memory_gb=24), "d", T0 + 1).decision
    assert isinstance(waits, Queued)  # 60 - 48 = 12 left on big, small has 16
    core.release("a", "d", T0 + 2)
    later = core.poll("b", "d", T0 + 3).decision
    assert isinstance(later, Placement) and later.nodes == ["big"]


def test_saved_state_keeps_the_reserved_ram_and_old_state_without_it_restores():
    core = core_with(ram_node("a", cpus=8, total_gb=64, available_gb=60))
    core.submit(JobSpec("a", num_workers=2, min_host_memory_gb=24), "d", T0)
    saved = json.loads(json.dumps(core.to_dict()))
    again = SchedulerCore(core.settings)
    assert again.restore(saved) == []
    again.ray_nodes({"a"}, set(), T0 + 1)
    again.report(ram_node("a", cpus=8, total_gb=64, available_gb=60), T0 + 1)
    assert again.state.reserved_memory_on("a") == 48
    assert isinstance(again.submit(JobSpec("b", min_host_memory_gb=24), "d", T0 + 2).decision,
                      Queued)
    # A state saved before the field: no RAM asked, none reserved, nothing refused.
    old = json.loads(json.dumps(saved))

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items()
                    if k not in ("min_host_memory_gb", "memory_gb", "host_memory_gb_per_worker")}
        return [strip(v) for v in value] if isinstance(value, list) else value
    old = strip(old)
    assert "min_host_memory_gb" not in json.dumps(old)
    restored = SchedulerCore(core.settings)
    assert restored.restore(old) == []
    assert restored.running["a"].spec.min_host_memory_gb == 0
    assert restored.running["a"].placement.host_memory_gb_per_worker == 0


def test_pretrain_asks_a_cpu_run_the_estimate_and_the_embedded_refusal_uses_it():
    from jobs.pretrain import build_configs, parse_args
    from orchestrator.training.memory import cpu_memory_needed_gb, cpu_memory_refusal

    args = ["--model-size", "gpt2-xl", "--batch-size", "8", "--seq-len", "1024"]
    cpu = build_configs(parse_args(args), Path("/tmp/run"))
    need = cpu_memory_needed_gb(cpu[0], 2)
    assert 60 < need < 70 and cpu[1].min_host_memory_gb == need
    # GPU runs: their workers' host RAM is not what the estimate counts (it is GPU memory).
    gpu = build_configs(parse_args([*args, "--gpus-per-worker", "1"]), Path("/tmp/run"))[1]
    assert gpu.min_host_memory_gb == 0
    # The embedded Ray's refusal: the same per-worker figure, times the workers.
    assert cpu_memory_refusal(cpu[0], need, 2, math.ceil(2 * need * GIB), "here") is None
    refusal = cpu_memory_refusal(cpu[0], need, 2, math.ceil(2 * need * GIB) - 1, "here")
    assert f"{need:,.1f} GiB per worker" in refusal and f"{2 * need:,.1f} GiB" in refusal
    assert cpu_memory_needed_gb(TrainConfig(model_size="tiny"), 2) >= 0.1


def test_the_embedded_refusal_takes_the_figure_placement_is_asked_for(monkeypatch):
    # refuse_a_cpu_run_past_this_machine worked the estimate out again (cpu_memory_refusal
    # called cpu_memory_needed_gb) where the job's spec already held it (min_host_memory_gb).
    from jobs.pretrain import build_configs, parse_args
    from orchestrator import launch, probes
    from orchestrator.job_exit import JobFailed
    from orchestrator.training import memory

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(launch, "runs_on_embedded_ray", lambda address: True)
    train_config, spec = build_configs(parse_args(["--model-size", "gpt2-xl"]),
                                       Path("/tmp/run"))
    monkeypatch.setattr(probes, "memory_within_cgroup", lambda: (64 * GIB, 40 * GIB))

    def estimated_again(*args, **kwargs):
        raise AssertionError("the estimate worked out again")
    monkeypatch.setattr(memory, "worker_memory", estimated_again)
    launch.refuse_a_cpu_run_past_this_machine(train_config, dataclasses.replace(
        spec, min_host_memory_gb=19.9), None)  # 2 x 19.9 GiB fit in 40
    with pytest.raises(JobFailed) as refused:
        launch.refuse_a_cpu_run_past_this_machine(train_config, dataclasses.replace(
            spec, min_host_memory_gb=20.1), None)
    assert "about 40.2 GiB of RAM" in str(refused.value)
    assert "20.1 GiB per worker" in str(refused.value)


def test_backfill_does_not_take_the_ram_the_waiting_head_needs_when_the_running_job_ends():
    # 60 GiB available: "running" holds 40 until it ends (in 100 s); the head needs 50 then.
    # By CPUs alone the head's room was there already, and "filler" (15 GiB, no end known)
    # backfilled into the RAM the head needed at its start: 60 - 15 < 50, delayed for ever.
    core = core_with(ram_node("a", cpus=8, total_gb=64, available_gb=60))
    core.submit(JobSpec("running", min_host_memory_gb=40, expected_duration_s=100), "d", T0)
    assert isinstance(core.submit(JobSpec("head", min_host_memory_gb=50), "d", T0).decision,
                      Queued)
    filler = core.submit(JobSpec("filler", min_host_memory_gb=15), "d", T0 + 1).decision
    assert isinstance(filler, Queued), filler
    # One that ends before the head could start may go.
    short = core.submit(JobSpec("short", min_host_memory_gb=15, expected_duration_s=50), "d",
                        T0 + 2).decision
    assert isinstance(short, Placement), short


def test_a_node_whose_host_probe_failed_takes_no_such_worker_and_refuses_no_job():
    # Its agent's stand-in reports no RAM (probes.host_figures): not a node of 0 GiB, which
    # would have refused as never fitting a job only it could hold.
    failed = dataclasses.replace(ram_node("blind", total_gb=0, available_gb=0),
                                 probe_errors={"host": "psutil: boom"})
    state = cluster(failed, ram_node("small", total_gb=8))
    with pytest.raises(PlacementError) as refused:
        place(JobSpec("j", min_host_memory_gb=16), state, NOW)
    rejection = refused.value.rejection
    assert rejection.fits_when_free  # it waits for the probe, not refused
    assert "unknown until its host probe works again: psutil: boom" in \
        rejection.node_reasons["blind"]


def test_an_estimate_past_any_nodes_ram_is_refused_naming_the_flags_not_the_field():
    from jobs.pretrain import build_configs, parse_args

    args = parse_args(["--model-size", "gpt2-xl", "--batch-size", "8192", "--seq-len", "8192"])
    with pytest.raises(ConfigError) as refused:
        build_configs(args, Path("/tmp/run"))
    message = str(refused.value)
    assert "GiB of RAM on each CPU worker (--model-size gpt2-xl, --batch-size 8192 x --seq-len " \
        "8192 per worker" in message and "over 100,000 GiB" in message, message
    assert "min_host_memory_gb" not in message


def test_a_job_stating_host_ram_preempts_one_whose_workers_fill_that_ram():
    # The node's agent reports the victim's own use: available 20 of 64 while "low" (40 GiB
    # asked) runs. In thought the victim's reservation was freed but not its use, so 20 < 50
    # and "high" never preempted it (GPU memory is shown free as a victim yields; RAM was not).
    core = SchedulerCore(SchedulerSettings(suspect_after_s=1e4, dead_after_s=1e5, min_run_s=10))
    core.ray_nodes({"a"}, set(), T0)
    core.report(ram_node("a", cpus=8, total_gb=64, available_gb=60), T0)
    assert isinstance(core.submit(JobSpec("low", min_host_memory_gb=40), "d", T0).decision,
                      Placement)
    core.report(ram_node("a", cpus=8, total_gb=64, available_gb=20), T0 + 50)
    high = core.submit(JobSpec("high", min_host_memory_gb=50, priority=10), "d", T0 + 60)
    assert isinstance(high.decision, Queued) and "preempting low" in high.decision.reason
    # the search put the node's figures back as they were
    assert core.state.table.ram_available_gib[0] == 20 and core.state.reserved_memory_on("a") == 40
    # Nothing to gain where the node's RAM would not hold it even with the victim gone.
    core2 = SchedulerCore(core.settings)
    core2.ray_nodes({"a"}, set(), T0)
    core2.report(ram_node("a", cpus=8, total_gb=64, available_gb=60), T0)
    core2.submit(JobSpec("low", min_host_memory_gb=40), "d", T0)
    core2.report(ram_node("a", cpus=8, total_gb=64, available_gb=20), T0 + 50)
    assert not [e for e in core2.submit(JobSpec("high", min_host_memory_gb=62, priority=10), "d",
                                        T0 + 60).effects if type(e).__name__ == "Yield"]


def test_the_backfill_plan_gives_back_a_running_jobs_ram_use_as_well_as_its_reservation():
    # 128 GiB; "running" asked 40 and uses them: its agent reports 84 available, so 44 is free
    # now (its use counted beside its reservation). At its end the plan gave back only the 40
    # reserved (84 < the head's 100): the head never fitted in the plan, and every job asking
    # RAM waited, a filler of 15 GiB too (124 - 15 = 109 would still hold the head).
    core = core_with(ram_node("a", cpus=8, total_gb=128, available_gb=124))
    core.submit(JobSpec("running", min_host_memory_gb=40, expected_duration_s=100), "d", T0)
    core.report(ram_node("a", cpus=8, total_gb=128, available_gb=84), T0 + 0.5)
    assert isinstance(core.submit(JobSpec("head", min_host_memory_gb=100), "d", T0).decision,
                      Queued)
    filler = core.submit(JobSpec("filler", min_host_memory_gb=15), "d", T0 + 1).decision
    assert isinstance(filler, Placement), filler
    # one that would leave the head short at the running job's end still waits
    big = core.submit(JobSpec("big", min_host_memory_gb=20), "d", T0 + 2).decision
    assert isinstance(big, Queued) and "would delay 'head'" in big.reason, big


def test_a_placement_refused_for_host_ram_names_the_flags_that_sized_it():
    # jobs/pretrain.py asks the estimate (no flag of its own): the refusal named only the
    # JobSpec field, min_host_memory_gb, which no flag of pretrain's sets.
    from orchestrator.job_exit import EXIT_FAILED, EXIT_NOT_PLACEABLE, JobFailed
    from orchestrator.launch import host_memory_refusal_named

    config = TrainConfig(model_size="tiny", batch_size=100_000_000, seq_len=32)
    spec = JobSpec("oom", num_workers=2, min_host_memory_gb=32067.4)
    with pytest.raises(PlacementError) as refused:
        place(spec, cluster(ram_node("a", total_gb=24)), NOW)
    reason = refused.value.rejection.message.splitlines()[0]
    named = host_memory_refusal_named(JobFailed(f"cannot place job 'oom': {reason}",
                                                EXIT_NOT_PLACEABLE, ran=False), config, spec)
    assert named.exit_code == EXIT_NOT_PLACEABLE and not named.ran
    assert "--batch-size 100000000 x --seq-len 32" in str(named)
    assert "lower --batch-size" in str(named)
    # anything else passes as it is
    for other in (JobFailed("cannot place job 'oom': needs 2 GPUs", EXIT_NOT_PLACEABLE),
                  JobFailed(f"x {reason}", EXIT_FAILED)):
        assert host_memory_refusal_named(other, config, spec) is other


def test_a_running_jobs_own_ram_use_is_not_counted_beside_its_reservation():
    # 64 GiB, nothing else in use. "running" asked 20 and uses them: its agent reports 44
    # available. Free was 44 - 20 = 24 (its 20 counted twice: in the measured figure and as
    # reserved), so a job asking 40 waited on a node that holds it: 64 - 20 = 44.
    core = core_with(ram_node("a", cpus=8, total_gb=64))
    core.submit(JobSpec("running", min_host_memory_gb=20), "d", T0)
    core.report(ram_node("a", cpus=8, total_gb=64, available_gb=44), T0 + 1)
    placed = core.submit(JobSpec("big", min_host_memory_gb=40), "d", T0 + 2).decision
    assert isinstance(placed, Placement) and placed.nodes == ["a"], placed
    # Never handed out twice: 4 GiB are left, and the reason says why.
    with pytest.raises(PlacementError) as refused:
        place(JobSpec("more", min_host_memory_gb=5), core.state, T0 + 3)
    assert "needs 5 GiB of host RAM per worker, has 4.0 GiB available (64.0 GiB total, " \
        "60 GiB reserved)" in refused.value.rejection.node_reasons["a"]


def test_ram_in_use_outside_the_reservations_still_counts():
    # 4 GiB in use before any job (the system's own): "first" (40) was just placed and its
    # workers use nothing yet, so the measured figure still reads 60. Taking min(available,
    # total - reserved) = 24 would hand the system's 4 GiB to a job of 22: 20 is free.
    core = core_with(ram_node("a", cpus=8, total_gb=64, available_gb=60))
    core.submit(JobSpec("first", min_host_memory_gb=40), "d", T0)
    core.report(ram_node("a", cpus=8, total_gb=64, available_gb=60), T0 + 1)
    with pytest.raises(PlacementError) as refused:
        place(JobSpec("second", min_host_memory_gb=22), core.state, T0 + 2)
    assert "has 20.0 GiB available (64.0 GiB total, 40 GiB reserved, 4.0 GiB in use " \
        "outside them)" in refused.value.rejection.node_reasons["a"]
    # Its workers start using their 40: still 20 free, not 20 - 40.
    core.report(ram_node("a", cpus=8, total_gb=64, available_gb=20), T0 + 3)
    assert place(JobSpec("third", min_host_memory_gb=20), core.state, T0 + 4).nodes == ["a"]
    # Use outside the reservations grows by 8 (workers at their 40): 12 left.
    core.report(ram_node("a", cpus=8, total_gb=64, available_gb=12), T0 + 5)
    with pytest.raises(PlacementError) as refused:
        place(JobSpec("third", min_host_memory_gb=13), core.state, T0 + 6)
    assert "has 12.0 GiB available (64.0 GiB total, 40 GiB reserved, 12.0 GiB in use " \
        "outside them)" in refused.value.rejection.node_reasons["a"]


def test_the_backfill_plan_gives_back_a_running_jobs_ram_once():
    # 64 GiB; "running" asked 20 and uses them (44 available, all free now); the head needs 50,
    # which the node holds once "running" ends: 64. A filler of 30 taking RAM for ever leaves
    # 34 then: it would delay the head. One of 14 leaves 50: it may go.
    core = core_with(ram_node("a", cpus=8, total_gb=64))
    core.submit(JobSpec("running", min_host_memory_gb=20, expected_duration_s=100), "d", T0)
    core.report(ram_node("a", cpus=8, total_gb=64, available_gb=44), T0 + 0.5)
    assert isinstance(core.submit(JobSpec("head", min_host_memory_gb=50), "d", T0).decision,
                      Queued)
    big = core.submit(JobSpec("filler30", min_host_memory_gb=30), "d", T0 + 1).decision
    assert isinstance(big, Queued) and "would delay 'head'" in big.reason, big
    small = core.submit(JobSpec("filler14", min_host_memory_gb=14), "d", T0 + 2).decision
    assert isinstance(small, Placement), small


def test_preemption_yields_only_the_victims_whose_ram_is_needed():
    # 64 GiB; "low1" and "low2" asked 20 each and use them (24 available). "high" needs 40:
    # one victim gone leaves 44. Counted twice (24 - 40 reserved, then 44 - 20), it took both.
    core = SchedulerCore(SchedulerSettings(suspect_after_s=1e4, dead_after_s=1e5, min_run_s=10))
    core.ray_nodes({"a"}, set(), T0)
    core.report(ram_node("a", cpus=8, total_gb=64), T0)
    for name in ("low1", "low2"):
        assert isinstance(core.submit(JobSpec(name, min_host_memory_gb=20), "d", T0).decision,
                          Placement)
    core.report(ram_node("a", cpus=8, total_gb=64, available_gb=24), T0 + 50)
    high = core.submit(JobSpec("high", min_host_memory_gb=40, priority=10), "d", T0 + 60)
    assert [e.job_name for e in high.effects if type(e).__name__ == "Yield"] == ["low1"]
    t = core.state.table  # the search put the node's figures back
    assert (t.ram_available_gib[0], t.reserved_memory_gib[0], t.ram_outside_gib[0]) == (24, 40, 0)
    # Saved and restored: the estimate of the use outside the reservations with it (none here).
    again = SchedulerCore(core.settings)
    assert again.restore(json.loads(json.dumps(core.to_dict()))) == []
    again.ray_nodes({"a"}, set(), T0 + 61)
    again.report(ram_node("a", cpus=8, total_gb=64, available_gb=24), T0 + 61)
    assert again.state.reserved_memory_on("a") == 40 and again.state.table.ram_outside_gib[0] == 0


def test_a_released_jobs_ram_still_in_use_for_a_report_is_not_taken_as_use_outside():
    # 64 GiB, 4 in use before any job. "a" (30) ran and used its 30; released, its workers'
    # RAM still shows in use at the next report (34). That report, nothing reserved, set the
    # use outside the reservations to 34, "b" (30) was placed, and its use kept the estimate
    # at 34 while it ran: free 64 - 30 - 34 = 0, and "c" (20) waited beside 30 GiB free.
    core = core_with(ram_node("n", cpus=16, total_gb=64, available_gb=60))
    assert isinstance(core.submit(JobSpec("a", min_host_memory_gb=30), "d", T0).decision,
                      Placement)
    core.report(ram_node("n", cpus=16, total_gb=64, available_gb=30), T0 + 5)
    assert core.release("a", "d", T0 + 8).decision is True
    core.report(ram_node("n", cpus=16, total_gb=64, available_gb=30), T0 + 10)  # not freed yet
    assert isinstance(core.submit(JobSpec("b", min_host_memory_gb=30), "d", T0 + 11).decision,
                      Placement)
    core.report(ram_node("n", cpus=16, total_gb=64, available_gb=30), T0 + 15)  # b's 30 now
    placed = core.submit(JobSpec("c", min_host_memory_gb=20), "d", T0 + 16).decision
    assert isinstance(placed, Placement), placed
    assert core.state.table.ram_outside_gib[0] == 4
    # The estimate still follows use outside once a report or two have passed: with nothing
    # reserved, a third report after a release takes the use as it is.
    for name in ("b", "c"):
        core.release(name, "d", T0 + 20)
    for t in (21, 26):
        core.report(ram_node("n", cpus=16, total_gb=64, available_gb=50), T0 + t)
    assert core.state.table.ram_outside_gib[0] == 4
    core.report(ram_node("n", cpus=16, total_gb=64, available_gb=50), T0 + 31)
    assert core.state.table.ram_outside_gib[0] == 14


def test_the_estimate_of_ram_in_use_outside_the_reservations_survives_a_restart():
    # 64 GiB, 4 in use by the system; "first" (40) was just placed, its workers use nothing
    # yet (60 available). A restarted scheduler, seeing the node first with reservations,
    # started the estimate from none: free min(64 - 40, 60) = 24, and a job of 22 was handed
    # the system's 4 GiB (20 are free).
    core = core_with(ram_node("a", cpus=8, total_gb=64, available_gb=60))
    assert isinstance(core.submit(JobSpec("first", min_host_memory_gb=40), "d", T0).decision,
                      Placement)
    again = SchedulerCore(core.settings)
    assert again.restore(json.loads(json.dumps(core.to_dict()))) == []
    again.ray_nodes({"a"}, set(), T0 + 1)
    again.report(ram_node("a", cpus=8, total_gb=64, available_gb=60), T0 + 1)
    assert again.state.table.ram_outside_gib[0] == 4
    waiting = again.submit(JobSpec("second", min_host_memory_gb=22), "d", T0 + 2).decision
    assert isinstance(waiting, Queued), waiting
    # Still lowered to the whole use where that is less, as any estimate.
    again.report(ram_node("a", cpus=8, total_gb=64, available_gb=62), T0 + 3)
    assert again.state.table.ram_outside_gib[0] == 2
    # One that cannot be read costs that node's alone; a state saved without it restores.
    saved = json.loads(json.dumps(core.to_dict()))
    saved["ram_outside"]["a"]["gib"] = -1
    other = SchedulerCore(core.settings)
    assert other.restore(saved) == ["cannot restore the RAM in use outside the reservations "
                                    "of node 'a', skipping it: its gib is -1, not a number >= 0"]
    del saved["ram_outside"]
    assert SchedulerCore(core.settings).restore(saved) == []


def test_a_silent_nodes_ram_estimate_survives_restarts_while_it_is_silent():
    # 64 GiB nodes, 4 in use by the system; "j" has a 40 GiB worker on each, using it (20
    # available). "s" goes silent: its reservation kept aside. Each restart counted its
    # restored last report as a new one (settling 2, 1, 0), and once settled it was no longer
    # saved (its RAM is aside, not reserved): the third restarted scheduler took the last
    # report's use, its worker's 40 included, for use outside (44), and once "s" came back
    # with its worker a job of 16 a node did not fit its 20 free GiB.
    settings = SchedulerSettings(suspect_after_s=30, dead_after_s=60)
    core = SchedulerCore(settings)
    core.ray_nodes({"r", "s"}, set(), T0)
    for name in ("r", "s"):
        core.report(ram_node(name, total_gb=64, available_gb=60), T0)
    assert isinstance(core.submit(JobSpec("j", num_workers=2, min_host_memory_gb=40), "d",
                                  T0).decision, Placement)
    for t in (10, 20, 30):
        for name in ("r", "s"):
            core.report(ram_node(name, total_gb=64, available_gb=20), T0 + t)
    core.tick(T0 + 80)
    core.report(ram_node("r", total_gb=64, available_gb=20), T0 + 80)
    core.tick(T0 + 100)
    assert core.state.silent == {"s"}
    saved = json.loads(json.dumps(core.to_dict()))
    for i in range(3):
        core = SchedulerCore(settings)
        assert core.restore(saved) == []
        again = json.loads(json.dumps(core.to_dict()))
        assert again == saved  # the same state, restart after restart
        core.ray_nodes({"r", "s"}, set(), T0 + 101 + i)
        core.report(ram_node("r", total_gb=64, available_gb=20), T0 + 101 + i)
        saved = json.loads(json.dumps(core.to_dict()))
    assert saved["ram_outside"]["s"]["gib"] == 4
    core.report(ram_node("s", total_gb=64, available_gb=20), T0 + 110)  # back, j's worker on
    assert core.state.table.ram_outside_gib[core.state.table.index["s"]] == 4
    placed = core.submit(JobSpec("k", num_workers=2, min_host_memory_gb=16), "d",
                         T0 + 111).decision  # (20 free on each node)
    assert isinstance(placed, Placement) and sorted(placed.worker_nodes) == ["r", "s"], placed
