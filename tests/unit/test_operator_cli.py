"""`python -m orchestrator status | preempt | cancel`: what an operator sees and types, against
the scheduling core's own data (a stand-in for the actor handle; no Ray)."""
import argparse
from pathlib import Path
from types import SimpleNamespace

from orchestrator.__main__ import _run_command, format_jobs, refusal
from orchestrator.config import JobSpec
from orchestrator.inventory import GIB, NodeReport
from orchestrator.scheduler_core import SchedulerCore
from orchestrator.scheduler_types import SchedulerSettings

T0 = 1_000.0


def busy_core():
    core = SchedulerCore(SchedulerSettings(min_run_s=0.0, suspect_after_s=1e4,
                                           dead_after_s=1e5))
    core.ray_nodes({"n"}, set(), T0)
    core.report(NodeReport("n", "n", 2, 0, 2, 0.0, GIB, GIB), T0)
    core.submit(JobSpec("low", num_workers=2), "d", T0)
    core.submit(JobSpec("high", num_workers=2, priority=5), "d", T0 + 1)
    core.submit(JobSpec("later", num_workers=1), "d", T0 + 2)
    return core


def test_status_lists_running_yielding_and_waiting_jobs_with_reasons():
    lines = format_jobs(busy_core().jobs(T0 + 3))
    assert lines[0].startswith("yielding  low (priority 0) on n, 3s: preempt: preempted for "
                               "job 'high' (priority 5 > 0)")
    assert lines[1].startswith("waiting   high (priority 5), 2s, #1 in line: preempting low")
    assert lines[2].startswith("waiting   later (priority 0), 1s, #2 in line")


def test_a_job_told_to_yield_that_never_checkpoints_is_named_to_the_operator_and_the_waiter():
    """A preemptible loop that never passes a checkpoint to launch.report cannot stop: status
    said "yielding ... preempted for job 'high'" and high's driver "preempting low: starts when
    they have checkpointed and yielded", for good, nothing saying why it never happens."""
    core = busy_core()
    assert core.directive("low", T0 + 3).decision.kind == "preempt"  # read: no checkpoint yet
    note = ("read its directive 37s ago and has reported no checkpoint since it started 40s "
            "ago: it stops at its next checkpoint, and a loop that never passes one to "
            "launch.report never stops (stop its driver; declare such a loop preemptible: "
            "false)")
    row = core.jobs(T0 + 40)[0]
    assert row["state"] == "yielding" and row["reason"].endswith(f" (it {note})")
    assert core.poll("high", "d", T0 + 40).decision.reason.endswith(f"; 'low' {note}")
    # Once it has reported a checkpoint, it is on its way: nothing more is said.
    core.directive("low", T0 + 41, last_checkpoint_at=T0 + 41)
    assert "checkpoint" not in core.jobs(T0 + 42)[0]["reason"]
    assert "'low' read" not in core.poll("high", "d", T0 + 42).decision.reason
    # Nor before it has read its directive.
    fresh = busy_core()
    assert "checkpoint" not in fresh.jobs(T0 + 40)[0]["reason"]
    assert "'low' read" not in fresh.poll("high", "d", T0 + 40).decision.reason


class FakeHandle:
    """An actor handle whose `.method.remote(...)` calls the core now."""

    def __init__(self, core):
        self.core = core

    def __getattr__(self, verb):
        call = {"preempt": lambda name: self.core.preempt(name, T0 + 5).decision,
                "cancel": lambda name: self.core.cancel(name, "", T0 + 5).decision,
                "snapshot": lambda: {"jobs": self.core.jobs(T0 + 5)},
                "place": lambda spec, owner, dry_run, explain: self.core.place_now(
                    spec, owner, T0 + 5, dry_run, explain).decision}[verb]
        return SimpleNamespace(remote=call)


def bounded_get(value, timeout=None):
    """ray.get as the commands must call it: with a timeout (a scheduler restarting for good
    hung `status`, where exit 3 is promised)."""
    from orchestrator.__main__ import CALL_TIMEOUT_S

    assert timeout == CALL_TIMEOUT_S, timeout
    return value


def run(verb, name, core, capsys):
    fake_ray = SimpleNamespace(get=bounded_get)
    code = _run_command(argparse.Namespace(command=verb, name=name), fake_ray,
                        FakeHandle(core), None)
    return code, capsys.readouterr()


def test_operator_preempt_and_cancel_say_what_happens_and_refuse_unknown_jobs(capsys):
    core = busy_core()
    code, out = run("cancel", "later", core, capsys)
    assert code == 0 and "cancel: later: dropped" in out.out
    assert "later" not in core.queue.waiting
    code, out = run("preempt", "nope", core, capsys)  # a name naming no job: bad input
    assert code == 2 and "no job named 'nope' is running" in out.err
    code, out = run("cancel", "nope", core, capsys)
    assert code == 2 and "no job named 'nope' is running or waiting" in out.err
    code, out = run("cancel", "low", core, capsys)  # running: checkpoints first
    assert code == 0 and core.directive("low", T0 + 6).decision.kind == "cancel"
    code, out = run("preempt", "low", core, capsys)  # a cancel is not undone
    assert code == 2 and "'low' is being cancelled" in out.err
    assert core.directive("low", T0 + 7).decision.kind == "cancel"


def test_a_job_placed_but_not_started_by_its_driver_is_shown_placed_and_preempt_says_so(
        capsys):
    # `status` showed it running while `preempt` said "no job named 'b' is running".
    core = SchedulerCore(SchedulerSettings(min_run_s=0.0, suspect_after_s=1e4,
                                           dead_after_s=1e5))
    core.ray_nodes({"n"}, set(), T0)
    core.report(NodeReport("n", "n", 2, 0, 2, 0.0, GIB, GIB), T0)
    core.submit(JobSpec("a", num_workers=2), "d1", T0)
    core.submit(JobSpec("b", num_workers=2), "d2", T0 + 1)
    core.release("a", "d1", T0 + 2)  # b is placed from the queue; its driver polls next
    assert format_jobs(core.jobs(T0 + 3)) == ["placed    b (priority 0) on n, 1s"]
    code, out = run("preempt", "b", core, capsys)
    assert code == 2 and out.err.strip() == (
        "error: job 'b' is placed, its driver has not started it yet: preempt it once it "
        "runs, or `cancel b`")
    assert core.poll("b", "d2", T0 + 4).decision.nodes == ["n"]  # collected: now running
    assert format_jobs(core.jobs(T0 + 5))[0].startswith("running   b")


def test_a_job_that_is_not_preemptible_is_never_told_to_stop_and_the_operator_hears_why(capsys):
    core = SchedulerCore(SchedulerSettings(min_run_s=0.0, suspect_after_s=1e4,
                                           dead_after_s=1e5))
    core.ray_nodes({"n"}, set(), T0)
    core.report(NodeReport("n", "n", 2, 0, 2, 0.0, GIB, GIB), T0)
    core.submit(JobSpec("own-loop", num_workers=2, preemptible=False), "d", T0)
    core.submit(JobSpec("urgent", num_workers=2, priority=5), "d", T0 + 1)
    assert core.directive("own-loop", T0 + 2).decision is None  # no room made by preempting it
    assert core.jobs(T0 + 2)[1]["reason"] != "" and "preempting" not in core.jobs(T0 + 2)[1][
        "reason"]
    for verb in ("preempt", "cancel"):
        code, out = run(verb, "own-loop", core, capsys)
        assert code == 2 and "'own-loop' is not preemptible" in out.err  # refused: nothing done
    assert core.directive("own-loop", T0 + 6).decision is None


def test_status_json_is_strict_json_when_a_nodes_host_probe_failed():
    import json
    import math

    from orchestrator.__main__ import format_status, status_rows

    report = NodeReport("n", "n", 2, 0, 2, math.inf, GIB, GIB,  # the agent's failed probe
                        bandwidth_gbps={"m": math.inf})
    snapshot = {"reservations": {}, "reports": {"n": report}, "health": {"n": "healthy"},
                "age_s": {"n": 1.0}}
    rows = status_rows(snapshot)
    text = json.dumps(rows, allow_nan=False)  # raises on Infinity
    assert json.loads(text)[0]["load_per_cpu"] is None
    assert "n " in format_status(rows, [], None)
    # An idle cluster says so: the jobs section was left out, as if status had failed to ask
    assert "jobs: none running or waiting" in format_status(rows, [], None)


def test_status_counts_work_outside_the_scheduler_and_nothing_free_on_a_dead_node():
    # Free counted only the scheduler's reservations: 4/4 CPUs free while a Serve replica
    # held 3, where `place` and the queue said 1 (and blamed "running jobs"); a dead node kept
    # its last free figures, which a script adding up `gpus_free` counted.
    from orchestrator.__main__ import format_status, status_rows

    busy = NodeReport("busy", "busy", 4, 0, 4, 0.0, GIB, GIB)
    gone = NodeReport("gone", "gone", 2, 1, 2, 0.0, GIB, GIB)
    snapshot = {"reservations": {}, "reports": {"busy": busy, "gone": gone},
                "health": {"busy": "healthy", "gone": "dead"},
                "age_s": {"busy": 1.0, "gone": 900.0},
                "outside": {"busy": (3.0, 0), "gone": (0.0, 0)}}
    rows = {r["node_id"]: r for r in status_rows(snapshot)}
    assert rows["busy"]["cpus_free"] == 1.0 and rows["busy"]["cpus_outside"] == 3.0
    assert (rows["gone"]["cpus_free"], rows["gone"]["gpus_free"]) == (0.0, 0)
    assert "outside the scheduler: 3 CPU" in format_status(list(rows.values()), [], None)


def test_place_exits_0_with_a_placement_and_3_when_the_job_cannot_be_placed(capsys):
    import json

    core = SchedulerCore(SchedulerSettings())
    core.ray_nodes({"n"}, set(), T0)
    core.report(NodeReport("n", "n", 2, 0, 2, 0.0, GIB, GIB), T0)
    fake_ray = SimpleNamespace(get=bounded_get)
    for spec, as_json, want in ((JobSpec("fits", num_workers=2), True, 0),
                                (JobSpec("too-big", num_workers=8), True, 3),
                                (JobSpec("too-big", num_workers=8), False, 3)):
        code = _run_command(argparse.Namespace(command="place", json=as_json), fake_ray,
                            FakeHandle(core), spec)
        out = capsys.readouterr().out
        assert code == want, out
        if as_json:
            assert ("worker_nodes" in json.loads(out)) == (want == 0)
    assert core.jobs(T0 + 6) == []  # a dry run reserves and queues nothing


def test_a_finished_submit_says_when_the_loop_saved_no_checkpoint(tmp_path, monkeypatch):
    from orchestrator.__main__ import done_line
    from orchestrator.runs import append_metrics

    monkeypatch.setattr("orchestrator.__main__.DEFAULT_RUNS_ROOT", tmp_path)
    append_metrics(tmp_path / "j", {"step": 0}, None)  # it reported
    placement = SimpleNamespace(worker_nodes=["a", "b"])
    none = SimpleNamespace(result=SimpleNamespace(metrics={}, checkpoint=None),
                           placement=placement, yields=[])
    assert done_line("j", none) == ("j: done on 2 worker(s); the loop saved no checkpoint "
                                    "(pass one to launch.report to make the run resumable; "
                                    "its reports are in `logs j`)")
    saved = SimpleNamespace(result=SimpleNamespace(metrics={"step": 4, "loss": 0.5, "x": [1]},
                                                   checkpoint=SimpleNamespace(path="/r/c")),
                            placement=placement, yields=[{}])
    assert done_line("j", saved) == ('j: done on 2 worker(s); last checkpointed report '
                                     '{"step": 4, "loss": 0.5}; preempted or moved 1x\n'
                                     'checkpoint: /r/c')


def test_a_finished_submit_points_logs_at_the_job_files_own_run_dir(tmp_path, capsys,
                                                                   monkeypatch):
    # A job file's run_dir: the printed `logs NAME` looked under the runs root instead and
    # failed, "error: no run directory ~/orchestrator-runs/NAME" (exit 2).
    from orchestrator.__main__ import done_line, print_logs
    from orchestrator.runs import append_metrics

    placement = SimpleNamespace(worker_nodes=["a"])
    none = SimpleNamespace(result=SimpleNamespace(metrics={}, checkpoint=None),
                           placement=placement, yields=[])
    run_dir = tmp_path / "my runs" / "j"
    append_metrics(run_dir, {"step": 0}, None)
    line = done_line("j", none, run_dir)
    assert line.endswith(f"its reports are in `logs j --run-dir '{run_dir}'`)")
    assert print_logs("j", str(run_dir), follow=False) == 0
    assert "step" in capsys.readouterr().out
    # the runs root's own directory for the name needs no --run-dir
    monkeypatch.setattr("orchestrator.__main__.DEFAULT_RUNS_ROOT", tmp_path / "root")
    append_metrics(tmp_path / "root" / "j", {"step": 0}, None)
    default = tmp_path / "root" / "j"
    assert done_line("j", none, default).endswith("its reports are in `logs j`)")
    assert done_line("j", none, None).endswith("its reports are in `logs j`)")


def test_a_finished_submit_of_a_loop_that_never_reported_says_so(tmp_path, monkeypatch):
    # It pointed at `logs NAME` for the loop's reports, which printed nothing: there were none.
    from orchestrator.__main__ import done_line
    from orchestrator.runs import append_metrics

    placement = SimpleNamespace(worker_nodes=["a", "b"])
    none = SimpleNamespace(result=SimpleNamespace(metrics={}, checkpoint=None),
                           placement=placement, yields=[])
    run_dir = tmp_path / "j"
    run_dir.mkdir()
    assert done_line("j", none, run_dir) == (
        "j: done on 2 worker(s); the loop saved no checkpoint and reported nothing (pass "
        "metrics, and a checkpoint to make the run resumable, to launch.report)")
    monkeypatch.setattr("orchestrator.__main__.DEFAULT_RUNS_ROOT", tmp_path)  # (no run_dir)
    assert done_line("j", none).endswith("reported nothing (pass metrics, and a checkpoint "
                                         "to make the run resumable, to launch.report)")
    append_metrics(run_dir, {"step": 0}, None)
    assert done_line("j", none).endswith("its reports are in `logs j`)")


def test_a_finished_submit_shows_a_reports_numpy_figures(tmp_path):
    # A loop's np.float32 loss and np.int64 step were left out of the line ({}).
    import numpy as np

    from orchestrator.__main__ import done_line

    saved = SimpleNamespace(result=SimpleNamespace(
        metrics={"step": np.int64(4), "loss": np.float32(0.5), "x": np.array([1, 2])},
        checkpoint=SimpleNamespace(path="/r/c")),
        placement=SimpleNamespace(worker_nodes=["a"]), yields=[])
    assert done_line("j", saved).splitlines()[0] == (
        'j: done on 1 worker(s); last checkpointed report {"step": 4, "loss": 0.5}')


def test_a_finished_submit_shows_a_diverged_numpy_loss_as_a_python_one(tmp_path):
    # json_figure writes a NaN as null for metrics.jsonl (None): the line took that for a
    # figure it cannot show and left an np.float32 NaN loss out, a Python NaN loss in.
    import numpy as np

    from orchestrator.__main__ import done_line

    saved = SimpleNamespace(result=SimpleNamespace(
        metrics={"step": 4, "loss": np.float32("nan"), "lr": float("nan")},
        checkpoint=SimpleNamespace(path="/r/c")),
        placement=SimpleNamespace(worker_nodes=["a"]), yields=[])
    assert done_line("j", saved).splitlines()[0] == (
        'j: done on 1 worker(s); last checkpointed report {"step": 4, "loss": NaN, "lr": NaN}')


def test_nodes_removed_on_purpose_are_retired_not_dead_and_the_table_counts_them(capsys):
    # An autoscaling cluster piled up a `dead` row for every worker it had ever scaled down.
    from orchestrator.__main__ import format_status, status_rows

    up = NodeReport("up", "up", 4, 0, 4, 0.0, GIB, GIB)
    shed = [NodeReport(f"scaled{i}", f"scaled{i}", 4, 0, 4, 0.0, GIB, GIB) for i in range(3)]
    crashed = NodeReport("crashed", "crashed", 4, 0, 4, 0.0, GIB, GIB)
    nodes = [up, *shed, crashed]
    snapshot = {"reservations": {}, "reports": {n.node_id: n for n in nodes},
                "health": {"up": "healthy", **{n.node_id: "dead" for n in nodes[1:]}},
                "age_s": {n.node_id: 1.0 for n in nodes},
                "retired": [n.node_id for n in shed]}
    rows = {r["node_id"]: r["health"] for r in status_rows(snapshot)}
    assert rows == {"up": "healthy", "scaled0": "retired", "scaled1": "retired",
                    "scaled2": "retired", "crashed": "dead"}
    text = format_status(status_rows(snapshot), [], None)
    assert "scaled" not in text and "crashed" in text
    assert "(and 3 node(s) removed on purpose" in text


def test_the_operator_commands_create_no_scheduler_on_a_cluster_without_one(monkeypatch,
                                                                             capsys, tmp_path):
    # `status` on a fresh cluster created the scheduler (with the default settings, for good:
    # an existing one keeps those it was created with) and an agent on every node.
    import ray

    from orchestrator.__main__ import main
    from ray_layer import cluster

    def created(*args, **kwargs):
        raise AssertionError("the scheduler was created")
    monkeypatch.setattr(cluster, "connect", lambda *args, **kwargs: False)
    monkeypatch.setattr(cluster, "ensure_scheduler", created)
    monkeypatch.setattr(cluster, "ensure_agent", created)

    def no_such_actor(name, namespace=None):
        raise ValueError(f"Failed to look up actor with name '{name}'")
    monkeypatch.setattr(ray, "get_actor", no_such_actor)
    for argv in (["status"], ["status", "--json"], ["preempt", "a"], ["cancel", "a"]):
        assert main([*argv, "--address", "127.0.0.1:1"]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: no scheduler on this cluster yet: it is created by the "
                              "first job run on it (`python -m orchestrator submit`, also "
                              "with --dry-run, or jobs/pretrain.py, with --address) or by "
                              "`python -m orchestrator place --spec JOB.yaml --dry-run`"), err
        assert err.count("\n") == 1


def test_an_empty_address_is_refused_not_taken_for_the_local_cluster(monkeypatch, capsys):
    # `cancel NAME --address "$HEAD"` with HEAD unset acted on RAY_ADDRESS's cluster, or on
    # the one `ray start` runs on this machine: "" was taken for no --address (submit and
    # jobs/pretrain.py refuse it).
    from orchestrator.__main__ import main
    from ray_layer import cluster

    real_connect, asked = cluster.connect, []

    def connect(address, *args, **kwargs):  # never a real cluster: only the empty check
        asked.append(address)
        if address is not None and not address.strip():
            return real_connect(address, *args, **kwargs)
        raise cluster.ClusterConnectionError(f"would connect to {address!r}")
    monkeypatch.setattr(cluster, "connect", connect)
    for environ in ({"RAY_ADDRESS": "10.0.0.9:6379"}, {}):
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        for key, value in environ.items():
            monkeypatch.setenv(key, value)
        for argv in (["cancel", "a"], ["preempt", "a"], ["status"]):
            for empty in ("", " "):
                assert main([*argv, "--address", empty]) == 2, argv
                err = capsys.readouterr().err
                assert err.startswith("error: --address is empty: give host:port or auto, or "
                                      "leave it out (RAY_ADDRESS, else the Ray cluster `ray "
                                      "start` runs on this machine)"), err
    assert asked == ["", " "] * 6


def test_place_plans_on_a_fresh_cluster_creating_the_scheduler_as_submit_dry_run_does(
        monkeypatch, capsys, tmp_path):
    # `place --dry-run` was refused on a cluster where no job had run yet, where `submit
    # --dry-run` of the same job file answered.
    import ray

    from orchestrator.__main__ import main
    from ray_layer import cluster
    from ray_layer.scheduler_client import SchedulerNotRunning

    core = SchedulerCore(SchedulerSettings(min_run_s=0.0, suspect_after_s=1e4,
                                           dead_after_s=1e5))
    core.ray_nodes({"n"}, set(), T0)
    core.report(NodeReport("n", "n", 2, 0, 2, 0.0, GIB, GIB), T0)

    def control_plane(create_scheduler=True, **kwargs):  # a cluster with no scheduler yet
        if not create_scheduler:
            raise SchedulerNotRunning("no scheduler on this cluster yet")
        return FakeHandle(core), {}
    monkeypatch.setattr(cluster, "connect", lambda *args, **kwargs: False)
    monkeypatch.setattr(cluster, "ensure_control_plane", control_plane)
    monkeypatch.setattr(ray, "get", bounded_get)
    job = tmp_path / "job.yaml"
    job.write_text("name: a\n")
    assert main(["place", "--spec", str(job), "--dry-run", "--address", "127.0.0.1:1"]) == 0
    assert capsys.readouterr().out == "would place 'a': worker 0 -> node n\n"
    assert main(["status", "--address", "127.0.0.1:1"]) == 2  # looks, creates nothing


def test_preempt_of_a_waiting_job_says_it_is_not_running_and_how_to_drop_it(capsys):
    # A waiting job that is not preemptible was called "not preemptible ... stop its driver
    # instead", and a preemptible one "no job named ... is running", as if unknown.
    core = SchedulerCore(SchedulerSettings(min_run_s=0.0, suspect_after_s=1e4,
                                           dead_after_s=1e5))
    core.ray_nodes({"n"}, set(), T0)
    core.report(NodeReport("n", "n", 2, 0, 2, 0.0, GIB, GIB), T0)
    core.submit(JobSpec("running", num_workers=2), "d", T0)
    core.submit(JobSpec("own-loop", num_workers=2, preemptible=False), "d", T0 + 1)
    core.submit(JobSpec("plain", num_workers=2), "d", T0 + 2)
    for name in ("own-loop", "plain"):
        code, out = run("preempt", name, core, capsys)
        assert code == 2
        assert out.err == (f"error: job {name!r} is waiting in the queue, not running: nothing "
                           f"to preempt (`cancel {name}` drops it)\n")
    code, out = run("cancel", "own-loop", core, capsys)  # what the refusal advised
    assert code == 0 and "own-loop" not in core.queue.waiting


def test_operations_docs_name_every_refusal_of_preempt_and_cancel():
    # docs/operations.md's exit-code table is where an operator looks up an `error:` line;
    # the placed-not-started and being-cancelled refusals were missing from it.
    doc = " ".join((Path(__file__).resolve().parents[2] / "docs" / "operations.md")
                   .read_text().split())
    cases = [("preempt", {"state": "waiting"}), ("preempt", {"state": "placed"}),
             ("cancel", {"state": "running", "preemptible": False}),
             ("preempt", {"state": "running", "reason": "cancelled by an operator"}),
             ("preempt", None), ("cancel", None)]
    undocumented = []
    for command, row in cases:
        opening = " ".join(refusal(command, "NAME", row).split()[:5])
        if opening not in doc:
            undocumented.append(opening)
    assert undocumented == []


def test_status_shows_no_load_or_memory_for_a_node_whose_host_probe_failed(monkeypatch):
    # The agent's stand-in (a load of 10^6 per CPU, no RAM: probes.host_figures) was shown as
    # the node's measured load and memory ("LOAD 1000000.00"); the metrics leave them out.
    from orchestrator import probes
    from orchestrator.__main__ import format_status, status_rows

    def no_psutil():
        raise ImportError("No module named 'psutil'")

    monkeypatch.setattr(probes, "probe_host", no_psutil)
    errors = {}
    report = NodeReport(node_id="n", ray_cpus=8, ray_gpus=0, probe_errors=errors,
                        **probes.host_figures(errors))
    snapshot = {"reservations": {}, "reports": {"n": report}, "health": {"n": "healthy"},
                "age_s": {"n": 1.0}}
    row, = status_rows(snapshot)
    assert row["load_per_cpu"] is None and row["ram_available_gib"] is None
    assert "1000000" not in format_status([row], [], None)


def test_ctrl_c_while_a_cluster_command_waits_ends_in_one_line_and_exit_130(monkeypatch,
                                                                           capsys):
    # Ctrl-C while `status` (or preempt, cancel, place) waited on the cluster (ray.init's
    # retries, the scheduler's answer, up to 60 s) ended in a KeyboardInterrupt traceback.
    import orchestrator.__main__ as cli
    from orchestrator.job_exit import EXIT_INTERRUPTED

    def waiting(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "_connect", waiting)
    for argv, said in ((["status"], "nothing was changed"),
                       (["cancel", "a"], "`status` shows whether the scheduler took it")):
        assert cli.main_piped(argv) == EXIT_INTERRUPTED, argv
        err = capsys.readouterr().err
        assert err.startswith(f"interrupted: {argv[0]} did not finish") and said in err, err
        assert err.count("\n") == 1
