import ctypes
import math
import random
import sys
import types
from pathlib import Path

import pytest

from orchestrator import probes
from orchestrator.probes import (BANDWIDTH_DEFAULT_BYTES, BANDWIDTH_MAX_BYTES,
                                 BANDWIDTH_MIN_FIT_DIFF_S, BANDWIDTH_MIN_FIT_SHARE, MIB,
                                 bandwidth_gbps, bandwidth_max_age_s, bandwidth_pause_s,
                                 bandwidth_probe_bytes,
                                 bandwidth_probe_sizes, current_bandwidth, peers_to_measure,
                                 probe_gpus, probe_host, probe_nvml, record_bandwidth, run_probe)
from orchestrator.inventory import (GIB, LABEL_ACCELERATOR_COUNT, LABEL_ACCELERATOR_MEMORY_GB,
                                    LABEL_ACCELERATOR_TYPE, MAX_DECLARED_ACCELERATORS, GpuInfo,
                                    declared_gpus)

T4_LABELS = {LABEL_ACCELERATOR_TYPE: "T4", LABEL_ACCELERATOR_COUNT: "4",
             LABEL_ACCELERATOR_MEMORY_GB: "16"}


def test_host_probe_measures_this_machine():
    host = probe_host()
    assert host["cpu_count"] >= 1 and host["ram_total_bytes"] > host["ram_available_bytes"] > 0


@pytest.mark.skipif(Path("/proc/driver/nvidia").exists(), reason="an NVIDIA driver is present")
def test_nvml_without_a_gpu_reports_none_quietly():
    # No NVIDIA driver here: zero GPUs, no exception.
    assert probe_nvml() == ()


def test_declared_accelerators_are_marked_declared():
    gpus = declared_gpus(T4_LABELS)
    assert len(gpus) == 4
    assert {g.name for g in gpus} == {"T4"} and {g.source for g in gpus} == {"declared"}
    assert gpus[0].memory_total_bytes == 16 * GIB


@pytest.mark.parametrize("label, value", [
    (LABEL_ACCELERATOR_COUNT, "four"), (LABEL_ACCELERATOR_COUNT, "1000000000"),
    (LABEL_ACCELERATOR_COUNT, "-1"), (LABEL_ACCELERATOR_MEMORY_GB, "nan"),
    (LABEL_ACCELERATOR_MEMORY_GB, "inf"), (LABEL_ACCELERATOR_MEMORY_GB, "-16"),
    # float() read these as 10 GPUs, 8 GPUs and 16 GB (validation.parse_number refuses them)
    (LABEL_ACCELERATOR_COUNT, "1_0"), (LABEL_ACCELERATOR_COUNT, "\u0668"),
    (LABEL_ACCELERATOR_MEMORY_GB, " 16"),
])
def test_malformed_declaration_names_the_label(label, value):
    with pytest.raises(ValueError, match=label):
        declared_gpus({**T4_LABELS, label: value})


@pytest.mark.parametrize("label, value, other", [
    (LABEL_ACCELERATOR_COUNT, "four", LABEL_ACCELERATOR_MEMORY_GB),
    (LABEL_ACCELERATOR_COUNT, "4.5", LABEL_ACCELERATOR_MEMORY_GB),
    (LABEL_ACCELERATOR_MEMORY_GB, "16GB", LABEL_ACCELERATOR_COUNT),
])
def test_a_malformed_label_is_named_alone_with_its_value(label, value, other):
    # Both labels were named for either one's fault ("... count or ... memory-gb is not a
    # number"), and the value only in Python's words.
    with pytest.raises(ValueError) as caught:
        declared_gpus({**T4_LABELS, label: value})
    assert f"{label}={value!r}" in str(caught.value) and other not in str(caught.value)


def test_a_whole_count_written_as_a_decimal_is_accepted():
    assert len(declared_gpus({**T4_LABELS, LABEL_ACCELERATOR_COUNT: "4.0"})) == 4


def test_a_failing_probe_is_recorded_and_others_go_on():
    errors = {}
    assert run_probe("broken", lambda: 1 / 0, "default", errors) == "default"
    assert "ZeroDivisionError" in errors["broken"]
    gpus = probe_gpus({LABEL_ACCELERATOR_TYPE: "T4", LABEL_ACCELERATOR_COUNT: "x"}, errors)
    assert gpus == () and LABEL_ACCELERATOR_COUNT in errors["declared"]
    assert len(probe_gpus(T4_LABELS, {})) == 4


# --- NVML through a fake pynvml (no GPU here) ------------------------------------------------

class FakeNVMLError(Exception):
    pass


class FakeNotSupported(FakeNVMLError):
    pass


class FakeInvalidArgument(FakeNVMLError):
    pass


def fake_pynvml(gpus: list[dict]) -> types.ModuleType:
    """A stand-in for nvidia-ml-py with the calls probe_nvml makes. Each GPU is a dict; a
    value that is an exception class is raised by the matching query, as NVML does."""
    nvml = types.ModuleType("pynvml")
    nvml.NVMLError, nvml.NVML_FEATURE_ENABLED, nvml.NVML_NVLINK_MAX_LINKS = FakeNVMLError, 1, 18
    nvml.calls = []

    def answer(handle, key, *args):
        value = gpus[handle][key]
        if isinstance(value, type) and issubclass(value, Exception):
            raise value(key)
        return value(*args) if callable(value) else value

    nvml.nvmlInit = lambda: nvml.calls.append("init")
    nvml.nvmlShutdown = lambda: nvml.calls.append("shutdown")
    nvml.nvmlDeviceGetCount = lambda: len(gpus)
    nvml.nvmlDeviceGetHandleByIndex = lambda index: index
    nvml.nvmlDeviceGetName = lambda h: answer(h, "name")
    nvml.nvmlDeviceGetUUID = lambda h: answer(h, "uuid")
    nvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(
        total=80 * GIB, free=60 * GIB, used=20 * GIB)
    nvml.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=answer(h, "util"))
    nvml.nvmlDeviceGetNvLinkState = lambda h, link: answer(h, "nvlink", link)
    nvml.nvmlDeviceGetCurrPcieLinkGeneration = lambda h: answer(h, "pcie_gen")
    nvml.nvmlDeviceGetCurrPcieLinkWidth = lambda h: answer(h, "pcie_width")
    return nvml


def a100_nvlink_state(link: int) -> int:
    # 12 links on the device, the first 4 up; NVML rejects link numbers past the device's own.
    if link >= 12:
        raise FakeInvalidArgument(f"link {link}")
    return 1 if link < 4 else 0


A100 = {"name": b"NVIDIA A100-SXM4-80GB", "uuid": b"GPU-a100", "util": 37,
        "nvlink": a100_nvlink_state, "pcie_gen": 4, "pcie_width": 16}
# A card without NVLink whose driver also hides the PCIe generation and utilization.
T4 = {"name": "Tesla T4", "uuid": "GPU-t4", "util": FakeNotSupported,
      "nvlink": FakeNotSupported, "pcie_gen": FakeNotSupported, "pcie_width": 8}


def test_nvml_fills_memory_nvlink_and_pcie(monkeypatch):
    nvml = fake_pynvml([A100, T4])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    a100, t4 = probe_nvml()
    assert (a100.name, a100.uuid, a100.source) == ("NVIDIA A100-SXM4-80GB", "GPU-a100", "nvml")
    assert (a100.memory_total_bytes, a100.memory_free_bytes, a100.memory_used_bytes) == (
        80 * GIB, 60 * GIB, 20 * GIB)
    assert (a100.utilization_pct, a100.nvlink_links, a100.pcie_gen, a100.pcie_width) == (
        37.0, 4, 4, 16)
    assert nvml.calls == ["init", "shutdown"]


def test_nvml_unsupported_queries_become_none_not_errors(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([T4]))
    errors = {}
    (t4,) = probe_gpus({}, errors)
    assert not errors  # NotSupported is normal for these fields: the probe did not fail
    assert (t4.name, t4.memory_used_bytes, t4.pcie_width) == ("Tesla T4", 20 * GIB, 8)
    assert t4.nvlink_links is None and t4.pcie_gen is None and t4.utilization_pct is None


def test_nvml_gpu_with_nvlink_all_down_reports_zero_links(monkeypatch):
    # Zero active links is a fact worth reporting, unlike "NVLink not supported" (None).
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([{**A100, "nvlink": 0}]))
    assert probe_nvml()[0].nvlink_links == 0


def test_nvml_required_query_failing_is_a_probe_error_and_shuts_down(monkeypatch):
    nvml = fake_pynvml([{**A100, "name": FakeNVMLError}])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    errors = {}
    # Left out, as among others: not replaced by the labels' (test_every_gpu_lost_...).
    assert probe_gpus(T4_LABELS, errors) == ()
    assert "FakeNVMLError" in errors["nvml"] and nvml.calls == ["init", "shutdown"]


def test_a_label_declaring_another_accelerator_than_nvml_measures_is_a_probe_error(monkeypatch):
    # cluster.local.yaml's fake train_a100 node on a workstation with a T4: NVML's T4 replaced
    # the declared A100s without a word, and the A100 job the autoscaler added the node for
    # never fitted there.
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([T4]))
    labels = {LABEL_ACCELERATOR_TYPE: "A100-80GB", LABEL_ACCELERATOR_COUNT: "8"}
    errors = {}
    (t4,) = probe_gpus(labels, errors, ray_gpus=8.0)
    assert t4.source == "nvml"  # measured still wins: the figures are real
    assert f"{LABEL_ACCELERATOR_TYPE}='A100-80GB'" in errors["declared"]
    assert "1 x Tesla T4" in errors["declared"] and "label ignored" in errors["declared"]
    # A label naming what NVML measures, in its own spelling, is no problem.
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([A100, A100]))
    errors = {}
    probe_gpus({LABEL_ACCELERATOR_TYPE: "A100-80GB"}, errors, ray_gpus=2.0)
    assert errors == {}


def failing_init(value: int):
    def init():
        error = FakeNVMLError(f"nvmlInit failed ({value})")
        error.value = value  # pynvml's NVMLError carries NVML's return code
        raise error
    return init


@pytest.mark.parametrize("code", [9, 12])  # driver not loaded, library not found
def test_nvml_absent_means_no_gpus_quietly(monkeypatch, code):
    nvml = fake_pynvml([A100])
    nvml.nvmlInit = failing_init(code)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    errors = {}
    assert probe_gpus({}, errors) == () and not errors


@pytest.mark.parametrize("code", [4, 18])  # no permission, driver/library version mismatch
def test_nvml_failing_to_start_on_a_gpu_node_is_a_probe_error(monkeypatch, code):
    # Quietly reading as a CPU node hid a broken driver after an upgrade.
    nvml = fake_pynvml([A100])
    nvml.nvmlInit = failing_init(code)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    errors = {}
    assert probe_gpus({}, errors) == ()
    assert f"nvmlInit failed ({code})" in errors["nvml"]
    # Nor do a labelled node's declared GPUs stand in for the ones NVML cannot reach: they
    # read as free GPUs on a node whose driver is broken.
    errors = {}
    assert probe_gpus(T4_LABELS, errors) == () and "nvml" in errors


def test_one_lost_gpu_leaves_the_others_reported(monkeypatch):
    class FakeGpuIsLost(FakeNVMLError):
        pass

    nvml = fake_pynvml([A100] * 3 + [{**A100, "name": FakeGpuIsLost}] + [A100] * 4)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    errors = {}
    gpus = probe_gpus({}, errors)
    assert [g.index for g in gpus] == [0, 1, 2, 4, 5, 6, 7]
    assert errors["nvml"].startswith("GPU 3: FakeGpuIsLost") and nvml.calls[-1] == "shutdown"


def test_a_hung_nvml_call_costs_the_gpus_not_the_nodes_report(monkeypatch):
    """An NVML call that never returns (a GPU fallen off the bus, a wedged driver: nvidia-smi
    hangs alike) held the agent's collect() with it: the node stopped reporting, its agent
    was killed and restarted into the same hang, and its running jobs' reservations were set
    aside as of a dead node. Now the GPUs are left out with an nvml error saying so, a second
    report does not start (or wait on) a second call, and NVML answering again is seen."""
    import threading

    nvml = fake_pynvml([A100])
    answer = threading.Event()
    nvml.nvmlDeviceGetCount = lambda: answer.wait() and 1
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setattr(probes, "NVML_TIMEOUT_S", 0.2, raising=False)

    def probe_in_thread() -> dict:
        out = {"errors": {}}
        thread = threading.Thread(
            target=lambda: out.update(gpus=probe_gpus(T4_LABELS, out["errors"], 1.0)),
            daemon=True)
        thread.start()
        thread.join(5)
        return out

    try:
        for _ in range(2):
            out = probe_in_thread()
            assert out.get("gpus") == (), out  # returned, and not the labels' GPUs either
            assert "NVML has not answered for" in out["errors"]["nvml"], out
        assert nvml.calls == ["init"]  # one call hung, no second one piled on
    finally:
        answer.set()
    for _ in range(50):  # (the hung call returning takes a moment: its thread must run)
        out = probe_in_thread()
        if out["gpus"]:
            break
    assert [g.name for g in out["gpus"]] == ["NVIDIA A100-SXM4-80GB"]
    assert "nvml" not in out["errors"]


def test_a_call_answering_as_its_waiter_gives_up_is_not_handed_to_the_next_caller(monkeypatch):
    """A waiter giving up at the deadline just as the call answered in time (after its check,
    before anyone cleared the call) left that call stored, and the next report joined it and
    got its value, read a heartbeat earlier. A finished call is never joined: the next caller
    reads afresh. The clock is frozen at 0 so that the answer counts as in time."""
    import threading

    monkeypatch.setattr(probes, "time", types.SimpleNamespace(monotonic=lambda: 0.0))
    release, readings = threading.Event(), []

    def probe(errors):
        release.wait(5)
        readings.append(f"reading {len(readings) + 1}")
        return readings[-1]

    bounded = probes.BoundedProbe()
    with pytest.raises(TimeoutError, match="NVML has not answered"):
        bounded.run(probe, 0.05, {})  # (waits 0.05 s for real: the clock stands still)
    release.set()  # the answer lands after the waiter's check, "in time" by the clock
    assert bounded._call.done.wait(5)
    assert bounded.run(probe, 0.05, {}) == "reading 2"


@pytest.mark.parametrize("free, total", [(2 ** 64 - 1, 80 * GIB), (-1, 80 * GIB),
                                         (0, -80 * GIB)])
def test_a_gpu_whose_memory_is_no_reading_is_left_out_not_the_nodes_report(monkeypatch, free,
                                                                            total):
    # An unsigned underflow in a driver (free = 2**64 - 1) went into the report, and the
    # scheduler refuses a report with a GPU holding more free than it has: the whole node went
    # silent for one GPU (its agent restarted, its jobs' reservations set aside).
    from orchestrator.inventory import NodeReport, report_problem

    nvml = fake_pynvml([A100, A100])
    read = nvml.nvmlDeviceGetMemoryInfo
    nvml.nvmlDeviceGetMemoryInfo = lambda h: (
        types.SimpleNamespace(total=total, free=free, used=0) if h == 1 else read(h))
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    errors = {}
    gpus = probe_gpus({}, errors, 2.0)
    assert [g.index for g in gpus] == [0]
    assert errors["nvml"].startswith(f"GPU 1: its memory reads {free} bytes free of {total}: ")
    report = NodeReport(node_id="n", hostname="h", ray_cpus=8, ray_gpus=2, cpu_count=8,
                        load_avg_1m=0.1, ram_total_bytes=64 * GIB, ram_available_bytes=GIB,
                        gpus=gpus, probe_errors=errors)
    assert report_problem(report) is None


def test_a_failing_nvml_shutdown_keeps_the_readings(monkeypatch):
    # The error nvmlShutdown raised in probe_nvml's `finally` replaced its return value: every
    # GPU of the node was lost for the heartbeat, over a call made after they were all read.
    nvml = fake_pynvml([A100, T4])

    def shutdown():
        raise FakeNVMLError("nvmlShutdown failed")

    nvml.nvmlShutdown = shutdown
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    errors = {}
    assert [g.name for g in probe_gpus({}, errors)] == ["NVIDIA A100-SXM4-80GB", "Tesla T4"]
    assert "nvmlShutdown" in errors["nvml"] and "readings kept" in errors["nvml"]
    assert [g.name for g in probe_nvml()] == ["NVIDIA A100-SXM4-80GB", "Tesla T4"]


def test_a_gpu_name_that_is_not_utf8_costs_only_that_gpus_family(monkeypatch):
    # A UnicodeDecodeError from one board's name is not an NVMLError: it lost every GPU.
    from orchestrator.inventory import accelerator_family

    bad = {**A100, "name": b"NVIDIA A100-SXM4-80GB\xff", "uuid": b"GPU-bad"}
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([A100, bad, T4]))
    errors = {}
    a100, unknown, t4 = probe_gpus({}, errors)
    assert (a100.name, t4.name) == ("NVIDIA A100-SXM4-80GB", "Tesla T4")
    assert (unknown.uuid, unknown.memory_total_bytes, unknown.nvlink_links) == (
        "GPU-bad", 80 * GIB, 4)
    assert accelerator_family(unknown.name) == ""  # no family: no MFU, no family's jobs
    assert errors["nvml"].startswith("GPU 1: name b'NVIDIA A100-SXM4-80GB\\xff' is not UTF-8")


def test_serving_sizes_for_this_machine_on_its_gpus_left_after_one_is_lost(monkeypatch):
    # Before Ray is up, `serve` sizes replicas for this machine: one lost GPU of eight made
    # the probe raise, and all eight read as none.
    from ray_layer.serve_app import _this_machine

    class FakeGpuIsLost(FakeNVMLError):
        pass

    nvml = fake_pynvml([A100] * 3 + [{**A100, "name": FakeGpuIsLost}] + [A100] * 4)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    (report,), _ = _this_machine()
    assert report.ray_gpus == 7 and [g.index for g in report.gpus] == [0, 1, 2, 4, 5, 6, 7]


def test_serving_sizes_for_this_machine_without_waiting_on_a_hung_nvml(monkeypatch, caplog):
    # `serve run`'s app build probed NVML unbounded: a hung call (a GPU fallen off the bus)
    # hung the build with it. Now it is bounded as the node agent's probe is, and said.
    import threading

    from ray_layer import serve_app

    nvml, answer = fake_pynvml([A100]), threading.Event()
    nvml.nvmlDeviceGetCount = lambda: answer.wait() and 1
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setattr(probes, "NVML_TIMEOUT_S", 0.2)
    monkeypatch.setattr(probes, "_NVML", probes.BoundedProbe())  # (its hung call stays its own)
    out = {}
    builder = threading.Thread(target=lambda: out.update(machine=serve_app._this_machine()),
                               daemon=True)
    serve_app.log.addHandler(caplog.handler)  # (Ray's "ray.serve" logger does not propagate)
    try:
        with caplog.at_level("WARNING", logger="ray.serve"):
            builder.start()
            builder.join(5)
    finally:
        answer.set()
        serve_app.log.removeHandler(caplog.handler)
    assert "machine" in out, "the build waited on the hung NVML call"
    (report,), _ = out["machine"]
    assert report.ray_gpus == 0 and report.gpus == ()
    (warning,) = [r.getMessage() for r in caplog.records if "NVML" in r.getMessage()]
    assert "NVML has not answered for" in warning and "\n" not in warning


def test_a_failing_host_probe_leaves_the_node_in_the_cluster(monkeypatch):
    # The stand-in must pass the scheduler's report check: an infinite load was refused as
    # malformed, and the node then went dead with its running job's reservation released.
    import orchestrator.probes as probes
    from orchestrator.inventory import NodeReport, report_problem

    def no_psutil():
        raise ImportError("No module named 'psutil'")

    monkeypatch.setattr(probes, "probe_host", no_psutil)
    errors = {}
    host = probes.host_figures(errors)
    assert "psutil" in errors["host"]
    report = NodeReport(node_id="n", ray_cpus=8, ray_gpus=0, gpus=(), **host)
    assert report_problem(report) is None
    assert report.load_per_cpu >= probes.HOST_PROBE_FAILED_LOAD  # loses every tie-break


def _history(**figures):
    """A bandwidth history with one measurement per peer, taken at time 0."""
    return {node: ((0.0, gbps),) for node, gbps in figures.items()}


def test_a_peer_whose_transfer_failed_loses_its_old_figure():
    # b sampled and measured again, c sampled but timed out, d not sampled this round, "gone"
    # left the cluster.
    history = record_bandwidth(_history(b=2.0, c=3.0, d=4.0, gone=9.0), {"b": 2.5}, {"b", "c"},
                               alive={"b", "c", "d"}, now=1.0)
    assert current_bandwidth(history, now=1.0, max_age_s=60) == {"b": 2.25, "d": 4.0}


def test_one_slow_round_does_not_replace_a_steady_figure_but_two_do():
    history = _history(b=2.0)
    history = record_bandwidth(history, {"b": 2.0}, {"b"}, {"b"}, now=1.0)
    history = record_bandwidth(history, {"b": 0.1}, {"b"}, {"b"}, now=2.0)  # one burst
    assert current_bandwidth(history, now=2.0, max_age_s=60) == {"b": 2.0}
    history = record_bandwidth(history, {"b": 0.1}, {"b"}, {"b"}, now=3.0)  # degraded for real
    assert current_bandwidth(history, now=3.0, max_age_s=60) == {"b": 0.1}
    assert len(history["b"]) == probes.BANDWIDTH_HISTORY


def test_figures_older_than_the_age_limit_are_not_reported():
    history = record_bandwidth(_history(b=2.0, c=3.0), {"c": 1.0}, {"c"}, {"b", "c"}, now=100.0)
    # b was last measured at 0, c at 0 and 100: at 150 with a 120 s limit only c's recent
    # figure counts.
    assert current_bandwidth(history, now=150.0, max_age_s=120) == {"c": 1.0}


def test_the_age_limit_covers_a_full_pass_over_the_peers():
    # 20 peers at 8 per period take 3 periods, plus the slack.
    assert bandwidth_max_age_s(20, 8, 100.0) == (3 + probes.BANDWIDTH_STALE_PERIODS) * 100.0
    assert bandwidth_max_age_s(3, 8, 100.0) == (1 + probes.BANDWIDTH_STALE_PERIODS) * 100.0
    assert bandwidth_max_age_s(20, 8, 0.0) == math.inf  # no timer: only explicit refreshes


def test_successive_refreshes_reach_every_peer_in_one_pass():
    peers = {f"n{i:02d}" for i in range(20)}
    rng = random.Random(0)
    last_tried: dict[str, float] = {}
    reached = []
    for now in range(3):  # ceil(20 / 8) = 3 refreshes
        chosen = peers_to_measure(peers, last_tried, 8, rng)
        last_tried |= dict.fromkeys(chosen, float(now))
        reached += chosen
    assert set(reached) == peers
    # Later refreshes go back to those tried longest ago, not at random.
    chosen = peers_to_measure(peers, last_tried, 8, rng)
    assert max(last_tried[n] for n in chosen) <= min(last_tried[n] for n in peers - set(chosen))
    assert min(last_tried[n] for n in peers - set(chosen)) > 0


def test_agents_starting_together_do_not_all_pick_the_same_peers():
    peers = {f"n{i:02d}" for i in range(50)}
    firsts = {tuple(peers_to_measure(peers, {}, 4, random.Random(seed))) for seed in range(10)}
    assert len(firsts) > 1


def test_agents_starting_together_drift_apart_in_when_they_measure():
    # Agents started together kept one 60 s period and measured at the same moments, several
    # pulling from one node at once, each under-measuring that link. Over 100 periods at most
    # 15 of one agent's measurements may start within 2 s of another's (lockstep: all 100;
    # independent random times: about 7, 4 s in each 60).
    def schedule(seed):
        rng, at, times = random.Random(seed), 0.0, []
        for _ in range(100):
            pause = bandwidth_pause_s(60.0, rng)
            assert 60.0 * (1 - probes.BANDWIDTH_JITTER) <= pause <= \
                60.0 * (1 + probes.BANDWIDTH_JITTER)  # (what the age limit counts on)
            at += pause
            times.append(at)
        return times

    first, second = schedule(1), schedule(2)
    together = [t for t in first if any(abs(t - u) < 2.0 for u in second)]
    assert len(together) <= 15, together


# --- bandwidth arithmetic --------------------------------------------------------------------

def test_bandwidth_is_bytes_over_the_fastest_round():
    # 8 MB in 0.004 s = 2 GB/s; the slow first round (setup) is ignored.
    assert bandwidth_gbps({8_000_000: [0.5, 0.004]}) == pytest.approx(2.0)
    assert bandwidth_gbps({1_000_000_000: [1.0]}) == pytest.approx(1.0)


@pytest.mark.parametrize("seconds", [[], [None], [None, None], [0.0], [-1.0], [math.inf],
                                     [math.nan]])
def test_bandwidth_without_a_usable_round_is_none(seconds):
    assert bandwidth_gbps({8_000_000: seconds}) is None
    assert bandwidth_gbps({1_000_000: seconds, 8_000_000: seconds}) is None


def test_a_link_too_slow_for_the_larger_transfer_keeps_the_smallers_rate():
    # The larger transfer timed out: the smaller's own rate (overhead counted, so at most the
    # link's), not no figure, which left the link at the 1.25 GB/s assumed for pairs never
    # measured.
    assert bandwidth_gbps({MIB: [0.5], 8 * MIB: [None]}) == pytest.approx(MIB / 0.5 / 1e9)


def test_bandwidth_skips_failed_rounds():
    assert bandwidth_gbps({2_000_000: [None, 0.001, math.nan]}) == pytest.approx(2.0)
    assert bandwidth_gbps({0: [0.001]}) is None


def transfer_s(nbytes: int, gbps: float, overhead_s: float) -> float:
    return overhead_s + nbytes / (gbps * 1e9)


@pytest.mark.parametrize("gbps", [0.125, 1.25, 5.0])
def test_bandwidth_fits_out_the_per_transfer_overhead(gbps):
    # Ray's ~25 ms per transfer made an 8 MiB measurement of any link 0.19-0.35 GB/s; the
    # fit through the two sizes' fastest rounds gives the link's own rate back.
    sizes = bandwidth_probe_sizes(BANDWIDTH_DEFAULT_BYTES)
    assert sizes == (8 * MIB, 64 * MIB)
    seconds = {n: [2 * transfer_s(n, gbps, 0.025), transfer_s(n, gbps, 0.025)] for n in sizes}
    assert bandwidth_gbps(seconds) == pytest.approx(gbps)


def test_bandwidth_fit_is_bounded_by_the_larger_transfers_own_rate():
    small, large = 8 * MIB, 64 * MIB
    plain = large / 0.1 / 1e9
    # The smaller size faster per byte than the larger (noise: no overhead would be left),
    # the fit would be below what the larger transfer did: the larger's own rate.
    assert bandwidth_gbps({small: [0.005], large: [0.1]}) == pytest.approx(plain)
    # The larger no slower than the smaller: nothing to fit, its own rate.
    assert bandwidth_gbps({small: [0.1], large: [0.1]}) == pytest.approx(plain)
    # Times a hair apart would fit any rate: the larger's own rate (a lower bound).
    assert bandwidth_gbps({small: [0.0999], large: [0.1]}) == pytest.approx(plain)
    # The smaller's transfers failed: the larger's own rate, as with one size.
    assert bandwidth_gbps({small: [None], large: [0.1]}) == pytest.approx(plain)


@pytest.mark.parametrize("t_small, t_large", [(0.0310, 0.0320), (0.0300, 0.0301)])
def test_times_within_noise_of_each_other_give_the_larger_transfers_own_rate(t_small, t_large):
    # The per-transfer overhead dominating, the two times differed by 1 ms or 0.1 ms: the fit
    # claimed 16.8 and 17.8 GB/s (its cap) for a link whose 64 MiB transfer ran at 2.1.
    small, large = 8 * MIB, 64 * MIB
    assert bandwidth_gbps({small: [t_small], large: [t_large]}) == pytest.approx(
        large / t_large / 1e9)


def test_the_fit_is_used_only_where_the_sizes_times_differ_clearly():
    small, large = 8 * MIB, 64 * MIB
    plain = large / 0.040 / 1e9
    # 10 ms apart (25% of the larger's 40 ms): the fit, (56 MiB / 10 ms).
    assert bandwidth_gbps({small: [0.030], large: [0.040]}) == pytest.approx(
        (large - small) / 0.010 / 1e9)
    # 9 ms apart: under a quarter of 40 ms, the larger's own rate.
    assert bandwidth_gbps({small: [0.031], large: [0.040]}) == pytest.approx(plain)
    # A quarter of a fast transfer but under BANDWIDTH_MIN_FIT_DIFF_S: timing noise.
    fast = large / 0.008 / 1e9
    assert BANDWIDTH_MIN_FIT_DIFF_S > 0.002
    assert bandwidth_gbps({small: [0.006], large: [0.008]}) == pytest.approx(fast)
    # Whatever the times, the figure is at most 1 / BANDWIDTH_MIN_FIT_SHARE times the larger's
    # own rate (the cap the rule implies).
    for t_small in (0.0, 0.001, 0.02, 0.029, 0.03, 0.0399):
        measured = bandwidth_gbps({small: [t_small or None], large: [0.040]})
        assert plain <= measured <= plain / BANDWIDTH_MIN_FIT_SHARE + 1e-9


def test_a_measured_link_is_not_placed_below_the_same_link_unmeasured():
    # Two 4-CPU nodes, 8 workers, a 1 GB/s floor. Unmeasured, the pair is assumed 10 GbE
    # (1.25 GB/s) and the job placed; measured through Ray over that very link, the 8 MiB
    # figure (0.28 GB/s) refused it.
    from orchestrator.config import JobSpec
    from orchestrator.inventory import ClusterState, NodeReport
    from orchestrator.placement import Placement, place

    def report(node, peer=None, gbps=None):
        return NodeReport(node, node, 4, 0, 4, 0.0, GIB, GIB,
                          bandwidth_gbps={peer: gbps} if peer else {})

    sizes = bandwidth_probe_sizes(BANDWIDTH_DEFAULT_BYTES)
    measured = bandwidth_gbps({n: [transfer_s(n, 1.25, 0.025)] for n in sizes})
    spec = JobSpec(name="j", num_workers=8, cpus_per_worker=1, min_bandwidth_gbps=1.0)
    for a, b in ((report("A"), report("B")),
                 (report("A", "B", measured), report("B", "A", measured))):
        state = ClusterState()
        state.update(a, 0.0)
        state.update(b, 0.0)
        decision = place(spec, state, 0.0)
        assert isinstance(decision, Placement), decision
        assert decision.bottleneck_gbps == pytest.approx(state.inter_group_gbps)


def test_bandwidth_payload_is_bounded():
    assert bandwidth_probe_bytes(8 * 1024 ** 2) == 8 * 1024 ** 2
    assert bandwidth_probe_bytes(10 ** 12) == BANDWIDTH_MAX_BYTES == 256 * 1024 ** 2
    assert bandwidth_probe_bytes(0) == bandwidth_probe_bytes(-5) == 1
    assert bandwidth_probe_sizes(10 ** 12) == (32 * MIB, 256 * MIB)
    assert bandwidth_probe_sizes(1) == (1,)


def test_a_malformed_network_bandwidth_label_is_named():
    from orchestrator.inventory import LABEL_NETWORK_GBPS, check_network_labels

    check_network_labels({LABEL_NETWORK_GBPS: "50"})
    for bad in ("fast", "-5", "nan", "5_0", "\u0665"):  # float() read 50 and 5
        with pytest.raises(ValueError, match=LABEL_NETWORK_GBPS):
            check_network_labels({LABEL_NETWORK_GBPS: bad})


def test_a_mig_enabled_gpu_reports_its_smallest_slice_not_the_board(monkeypatch):
    """Ray hands out the board by index and a worker on it runs on one slice: the board's
    80 GB let placement send a 40 GB worker to a 10 GB slice, and its family an A100 job."""
    from orchestrator.inventory import accelerator_family, gpu_families

    slices = {("mig", 0, 0): ("NVIDIA A100-SXM4-80GB MIG 3g.40gb", 40),
              ("mig", 0, 2): ("NVIDIA A100-SXM4-80GB MIG 1g.10gb", 10)}

    class FakeNotFound(FakeNVMLError):
        pass

    def mig_handle(handle, slot):
        if (("mig", handle, slot)) not in slices:
            raise FakeNotFound(f"slot {slot}")
        return ("mig", handle, slot)

    nvml = fake_pynvml([A100, A100, A100])
    board_memory = nvml.nvmlDeviceGetMemoryInfo
    names = nvml.nvmlDeviceGetName
    nvml.NVML_DEVICE_MIG_ENABLE = 1
    # GPU 0 is split in two slices, GPU 1 has MIG on and no slice, GPU 2 cannot do MIG
    # (NotSupported, as on every card before the A100).

    def mig_mode(h):
        if h == 2:
            raise FakeNotSupported("mig mode")
        return (1, 1)

    nvml.nvmlDeviceGetMigMode = mig_mode
    nvml.nvmlDeviceGetMaxMigDeviceCount = lambda h: 7
    nvml.nvmlDeviceGetMigDeviceHandleByIndex = mig_handle
    nvml.nvmlDeviceGetName = lambda h: slices[h][0] if isinstance(h, tuple) else names(h)
    nvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(
        total=slices[h][1] * GIB, free=slices[h][1] * GIB - GIB, used=GIB) \
        if isinstance(h, tuple) else board_memory(h)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    split, empty, whole = probe_nvml()
    assert (split.name, split.memory_total_bytes, split.memory_free_bytes) == (
        "NVIDIA A100-SXM4-80GB MIG 1g.10gb", 10 * GIB, 9 * GIB)
    assert (empty.name, empty.memory_total_bytes) == ("NVIDIA A100-SXM4-80GB MIG (no instances)",
                                                      0)
    assert (whole.name, whole.memory_total_bytes) == ("NVIDIA A100-SXM4-80GB", 80 * GIB)
    assert accelerator_family(split.name) == "" and gpu_families([whole]) == ["A100"]
    assert gpu_families([split, whole]) == ["", "A100"]  # a mixed node: no family


def test_a_mig_board_whose_slot_count_fails_is_unknown_not_empty(monkeypatch):
    # nvmlDeviceGetMaxMigDeviceCount failing read as "MIG (no instances)", 0 bytes, though
    # slices exist: jobs asking GPU memory were rejected as never fitting, and the name told
    # the operator to create slices that were there.
    nvml = fake_pynvml([A100, A100])
    nvml.NVML_DEVICE_MIG_ENABLE = 1
    nvml.nvmlDeviceGetMigMode = lambda h: (1, 1) if h == 1 else (0, 0)

    def slot_count(handle):
        raise FakeNVMLError("Unknown Error")

    nvml.nvmlDeviceGetMaxMigDeviceCount = slot_count
    nvml.nvmlDeviceGetMigDeviceHandleByIndex = lambda handle, slot: ("mig", handle, slot)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    errors = {}
    (whole,) = probe_gpus({}, errors, ray_gpus=2.0)  # left out, as a lost GPU is
    assert (whole.index, whole.memory_total_bytes) == (0, 80 * GIB)
    assert errors["nvml"] == ("GPU 1: MIG is on and its slices cannot be counted "
                              "(nvmlDeviceGetMaxMigDeviceCount: FakeNVMLError: Unknown Error)")


def test_declared_accelerators_without_a_count_are_as_many_as_ray_was_given():
    # A type and memory labelled, the count forgotten, Ray given 4 GPUs: one accelerator was
    # declared, and a 2-GPU worker was refused "needs 2 GPU per worker, 1 free".
    from orchestrator.config import JobSpec
    from orchestrator.inventory import ClusterState, NodeReport
    from orchestrator.placement import Placement, place
    from orchestrator.probes import gpu_count_problem

    labels = {LABEL_ACCELERATOR_TYPE: "T4", LABEL_ACCELERATOR_MEMORY_GB: "15"}
    errors = {}
    gpus = probe_gpus(labels, errors, ray_gpus=4.0)
    assert len(gpus) == 4 and errors == {} and gpu_count_problem(gpus, 4.0, labels) is None
    assert len(declared_gpus(labels)) == 1  # Ray counts none (or not asked): one
    state = ClusterState()
    state.update(NodeReport("n", "n", 16, 4, 16, 0.0, GIB, GIB, gpus, labels), 0.0)
    assert isinstance(place(JobSpec(name="j", num_workers=1, gpus_per_worker=2), state, 0.0),
                      Placement)


def test_fewer_gpus_probed_than_ray_was_given_is_said_naming_the_count_label():
    from orchestrator.probes import gpu_count_problem

    labels = {**T4_LABELS, LABEL_ACCELERATOR_COUNT: "1"}
    problem = gpu_count_problem(declared_gpus(labels), 4.0, labels)
    assert problem and f"{LABEL_ACCELERATOR_COUNT} declares 1" in problem
    assert "Ray was given 4" in problem and "--num-gpus" in problem
    measured = tuple(GpuInfo(i, "NVIDIA L4", 22 * GIB, 22 * GIB) for i in range(2))
    assert "NVML sees 2 GPU(s), Ray was given 4" in gpu_count_problem(measured, 4.0, {})


def test_a_gpu_count_problem_of_declared_accelerators_names_the_label_not_nvml():
    # Eight NPUs declared by label on a node Ray gave four read "NVML sees 8 GPUs"; a label
    # declaring 0 read "no labels declare them".
    from orchestrator.probes import gpu_count_problem

    labels = {**T4_LABELS, LABEL_ACCELERATOR_COUNT: "8"}
    problem = gpu_count_problem(declared_gpus(labels), 4.0, labels)
    assert "NVML" not in problem and f"{LABEL_ACCELERATOR_COUNT} declares 8" in problem
    assert "--num-gpus" in problem
    labels = {**T4_LABELS, LABEL_ACCELERATOR_COUNT: "0"}
    problem = gpu_count_problem(declared_gpus(labels), 4.0, labels)
    assert "no labels declare them" not in problem and f"{LABEL_ACCELERATOR_COUNT}=0" in problem


@pytest.mark.parametrize("count, declared", [(None, 1), ("4", 4)])
def test_declared_accelerators_where_ray_counts_no_gpu_are_a_gpu_count_problem(count, declared):
    # NPUs declared by label on a node started without --num-gpus: no probe error, though
    # placement hands none of them out (and refused the node only when a job asked for GPUs).
    from orchestrator.probes import gpu_count_problem

    labels = {LABEL_ACCELERATOR_TYPE: "NPU910", **({LABEL_ACCELERATOR_COUNT: count} if count
                                                   else {})}
    gpus = declared_gpus(labels, 0.0)
    assert len(gpus) == declared
    problem = gpu_count_problem(gpus, 0.0, labels)
    assert problem and "Ray was given 0 GPU(s) here (--num-gpus missing?)" in problem
    assert "placement hands out none of them" in problem


def test_without_a_count_label_no_count_label_value_is_quoted():
    # The count is Ray's (its whole GPUs, at least one): messages quoted a label value nobody
    # wrote, "accelerator-count declares 1" for Ray's 0.5, and Ray's 100 GPUs raised
    # "accelerator-count='100': must be a whole number ..." and then "labels declare none".
    from orchestrator.probes import gpu_count_problem

    labels = {LABEL_ACCELERATOR_TYPE: "T4"}
    half = declared_gpus(labels, 0.5)
    assert len(half) == 1
    problem = gpu_count_problem(half, 0.5, labels)
    assert problem and f"{LABEL_ACCELERATOR_COUNT} declares" not in problem
    assert f"no {LABEL_ACCELERATOR_COUNT} label" in problem and "Ray was given 0.5" in problem
    many = declared_gpus(labels, 100.0)
    assert len(many) == MAX_DECLARED_ACCELERATORS
    problem = gpu_count_problem(many, 100.0, labels)
    assert problem and f"{LABEL_ACCELERATOR_COUNT}=" not in problem and "declare none" not in problem
    assert "Ray was given 100" in problem and f"only {MAX_DECLARED_ACCELERATORS}" in problem
    # Whole GPUs, as placement hands them out: 4.5 of Ray's are 4 accelerators, no problem.
    assert len(declared_gpus(labels, 4.5)) == 4
    assert gpu_count_problem(declared_gpus(labels, 4.5), 4.5, labels) is None


def test_gpus_probed_and_gpus_ray_was_given_disagreeing_is_said():
    from orchestrator.inventory import GpuInfo
    from orchestrator.probes import gpu_count_problem

    a100s = tuple(GpuInfo(i, "NVIDIA A100-SXM4-80GB", 80 << 30, 80 << 30) for i in range(5))
    # CUDA_VISIBLE_DEVICES hid one of five from Ray: NVML still counts it.
    assert "NVML sees 5 GPU(s), Ray was given 4" in gpu_count_problem(a100s, 4.0, {})
    assert "NVML found none" in gpu_count_problem((), 8.0, {})  # no NVML library, no labels
    assert gpu_count_problem(a100s, 5.0, {}) is None and gpu_count_problem((), 0.0, {}) is None


def write_cgroup(tmp_path, proc: str, files: dict[str, str]) -> tuple[int, int] | None:
    from orchestrator.probes import cgroup_memory_limit

    (tmp_path / "proc").write_text(proc)
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return cgroup_memory_limit(str(tmp_path / "proc"), str(tmp_path))


def test_the_memory_a_cgroup_leaves_is_read_from_v2_or_v1(tmp_path):
    from orchestrator.probes import cgroup_memory_limit

    def cgroup(lines: str, files: dict[str, str]) -> int | None:
        limit = write_cgroup(tmp_path, lines, files)
        return None if limit is None else limit[0] - limit[1]

    assert cgroup("0::/job\n", {"job/memory.max": "1000\n", "job/memory.current": "400\n"}) == 600
    assert cgroup("0::/free\n", {"free/memory.max": "max\n", "free/memory.current": "1\n"}) is None
    v1 = "4:memory:/ray/x\n0::/\n"
    assert cgroup(v1, {"memory/ray/x/memory.limit_in_bytes": "5000",
                       "memory/ray/x/memory.usage_in_bytes": "7000"}) == 0  # over: none left
    assert cgroup("4:memory:/ray/y\n", {"memory/ray/y/memory.limit_in_bytes":
                                          "9223372036854771712",
                                          "memory/ray/y/memory.usage_in_bytes": "1"}) is None
    assert cgroup_memory_limit(str(tmp_path / "absent"), str(tmp_path)) is None
    # Page cache the kernel reclaims first is not in use (a container that had read its
    # data once looked nearly full).
    assert cgroup("0::/cache\n", {"cache/memory.max": "4000\n", "cache/memory.current": "3000\n",
                                  "cache/memory.stat": "anon 500\ninactive_file 2500\n"}) == 3500


def test_a_v1_container_sharing_the_hosts_cgroup_namespace_finds_its_limit_at_the_root(
        tmp_path):
    # /proc/self/cgroup names the host's path; the container's own cgroup is mounted at the
    # root of the controller: its limit was never found, and the host's RAM reported.
    from orchestrator.probes import cgroup_memory_limit

    (tmp_path / "proc").write_text("12:memory:/kubepods/burstable/pod1/abc\n")
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("4096\n")
    (tmp_path / "memory" / "memory.usage_in_bytes").write_text("1024\n")
    (tmp_path / "memory" / "memory.stat").write_text("cache 600\ntotal_inactive_file 512\n")
    assert cgroup_memory_limit(str(tmp_path / "proc"), str(tmp_path)) == (4096, 512)


def test_a_limit_set_above_the_processs_own_cgroup_is_found(tmp_path):
    # The container's 8 GiB at the root of its cgroup namespace, the process in a child
    # cgroup without a limit of its own: "max" there read as no limit, and the host's RAM
    # was reported (a KV cache sized to it was OOM-killed).
    assert write_cgroup(tmp_path, "0::/ray/workers\n", {
        "memory.max": f"{8 << 30}\n", "memory.current": f"{3 << 30}\n",
        "ray/memory.max": "max\n", "ray/memory.current": f"{2 << 30}\n",
        "ray/workers/memory.max": "max\n", "ray/workers/memory.current": f"{1 << 30}\n",
    }) == (8 << 30, 3 << 30)


def test_the_tightest_level_of_the_cgroup_tree_bounds_the_memory(tmp_path):
    # Own limit 4000 with 1000 used; its parent's 6000 nearly all used by siblings: 500 left
    # for this process, within a limit of 4000.
    assert write_cgroup(tmp_path, "0::/pod/job\n", {
        "pod/memory.max": "6000\n", "pod/memory.current": "5500\n",
        "pod/job/memory.max": "4000\n", "pod/job/memory.current": "1000\n",
    }) == (4000, 3500)


def test_a_v1_cgroup_reads_its_hierarchical_limit(tmp_path):
    # v1: memory.limit_in_bytes is the cgroup's own; memory.stat's hierarchical_memory_limit
    # counts its ancestors', also those outside the container's view.
    assert write_cgroup(tmp_path, "4:memory:/\n", {
        "memory/memory.limit_in_bytes": "9223372036854771712\n",
        "memory/memory.usage_in_bytes": "1000\n",
        "memory/memory.stat": "hierarchical_memory_limit 5000\ntotal_inactive_file 200\n",
    }) == (5000, 800)


def test_the_host_probe_reports_memory_within_the_processs_cgroup(monkeypatch):
    # In a container the agent reported the host's 22.8 GiB available where its cgroup left
    # 1 GiB.
    from orchestrator import probes

    monkeypatch.setattr(probes, "cgroup_memory_limit", lambda: (4 << 30, 3 << 30))
    figures = probes.probe_host()
    assert figures["ram_total_bytes"] <= 4 << 30 and figures["ram_available_bytes"] <= 1 << 30


def test_the_host_probe_divides_the_hosts_load_by_the_hosts_cpus(monkeypatch):
    # A container's affinity CPUs beside the whole host's load average made a pinned node look
    # loaded and lose every load tie-break. Without a CPU quota the load per CPU stays the
    # host's (32 over 64 CPUs), whatever CPUs the node counts.
    from orchestrator import probes

    monkeypatch.setattr(probes.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setattr(probes.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(probes.os, "getloadavg", lambda: (32.0, 0.0, 0.0))
    monkeypatch.setattr(probes, "cgroup_cpu_limit", lambda *paths: None)
    host = probes.probe_host()
    assert host["load_avg_1m"] / host["cpu_count"] == pytest.approx(0.5)


class FakeClock:
    """A monotonic clock the test moves; `sleep` moves it too (a first reading's sample)."""

    def __init__(self, during_sleep=lambda seconds: None) -> None:
        self.now = 1000.0
        self.during_sleep = during_sleep  # what the cgroup does meanwhile

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.during_sleep(seconds)


def cpu_figures(tmp_path, proc: str, files: dict[str, str], clock: FakeClock | None = None,
                load=None, affinity: int = 64) -> tuple[int, float]:
    """(cpu_count, load_avg_1m) as the host probe reports them from a fake cgroup tree under
    tmp_path, on a 64-CPU host whose load average is 48 and `affinity` CPUs this process's."""
    from orchestrator.probes import CgroupCpuLoad, host_cpu_figures

    (tmp_path / "proc").write_text(proc)
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    clock = clock or FakeClock()
    return host_cpu_figures(str(tmp_path / "proc"), str(tmp_path), load or CgroupCpuLoad(),
                            clock, clock.sleep, affinity=lambda: affinity,
                            host_cpus=lambda: 64, host_load=lambda: 48.0)


def test_a_pod_limited_to_4_cpus_counts_4_and_its_own_load(tmp_path):
    # A pod of 4 CPUs (cgroup v2 cpu.max) on a 64-core host reported 64 CPUs and the host's
    # load: 48 / 64 = 0.75 per CPU whatever the pod did. Its own usage is 2 CPUs' worth (2 s of
    # CPU over 1 s) and a task waits for a CPU half the time (PSI): 2.5 over 4 CPUs.
    from orchestrator.probes import CgroupCpuLoad

    clock, load = FakeClock(), CgroupCpuLoad()
    v2 = {"pod/cpu.max": "400000 100000\n", "pod/cpu.stat": "usage_usec 5000000\n",
          "pod/cpu.pressure": "some avg10=80.00 avg60=50.00 avg300=10.00 total=1\n"
                              "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"}
    assert cpu_figures(tmp_path, "0::/pod\n", v2, clock, load) == (4, pytest.approx(0.5))
    clock.now += 1.0
    v2["pod/cpu.stat"] = "usage_usec 7000000\nnr_throttled 0\n"
    count, load_1m = cpu_figures(tmp_path, "0::/pod\n", v2, clock, load)
    # (smoothed as the kernel's 1-minute load average: one second moves it 1/60 of the way)
    assert count == 4 and load_1m == pytest.approx(0.5 + 2 * (1 - math.exp(-1 / 60)))


def test_a_v1_cfs_quota_bounds_the_cpus_and_cpuacct_gives_the_usage(tmp_path):
    from orchestrator.probes import CgroupCpuLoad

    clock, load = FakeClock(), CgroupCpuLoad()
    v1 = {"cpu/kube/pod/cpu.cfs_quota_us": "300000\n", "cpu/kube/pod/cpu.cfs_period_us": "100000\n",
          "cpuacct/kube/pod/cpuacct.usage": f"{10 ** 9}\n"}
    proc = "4:cpu:/kube/pod\n3:cpuacct:/kube/pod\n0::/\n"
    assert cpu_figures(tmp_path, proc, v1, clock, load) == (3, 0.0)
    clock.now += 2.0
    v1["cpu/kube/pod/cpu.cfs_quota_us"] = "-1\n"  # the quota lifted: the host's figures
    assert cpu_figures(tmp_path, proc, v1, clock, load)[0] == 64  # -1: no quota any more


def test_without_a_cpu_quota_the_hosts_load_per_cpu_stands(tmp_path):
    # v2's "max" is no quota; no cgroups at all, neither: the affinity's CPUs, with the load
    # scaled so that the load per CPU is the host's (48 / 64).
    for proc, files in [("0::/free\n", {"free/cpu.max": "max 100000\n",
                                         "free/cpu.stat": "usage_usec 1\n"}),
                        ("", {})]:
        count, load_1m = cpu_figures(tmp_path, proc, files, affinity=8)
        assert count == 8 and load_1m / count == pytest.approx(48 / 64)


def test_a_cpu_quota_set_on_a_parent_cgroup_binds_and_its_usage_is_read(tmp_path):
    # The pod's 2 CPUs set above the agent's own cgroup (Ray's workers in a child cgroup):
    # its own "max" read as no limit. The tighter of two levels wins.
    from orchestrator.probes import CgroupCpuLoad

    clock, load = FakeClock(), CgroupCpuLoad()
    tree = {"pod/cpu.max": "200000 100000\n", "pod/cpu.stat": "usage_usec 0\n",
            "pod/ray/cpu.max": "max 100000\n", "pod/ray/cpu.stat": "usage_usec 0\n"}
    assert cpu_figures(tmp_path, "0::/pod/ray\n", tree, clock, load) == (2, 0.0)
    clock.now += 1.0
    tree["pod/cpu.stat"] = "usage_usec 1000000\n"  # the pod's: its other processes count
    assert cpu_figures(tmp_path, "0::/pod/ray\n", tree, clock, load) == (
        2, pytest.approx(1 - math.exp(-1 / 60)))
    tree["pod/ray/cpu.max"] = "100000 100000\n"
    assert cpu_figures(tmp_path, "0::/pod/ray\n", tree)[0] == 1


def test_an_affinity_smaller_than_the_quota_bounds_the_cpus(tmp_path):
    # 8 CPUs of quota, pinned to 2: 2 CPUs, and the usage divided by them.
    from orchestrator.probes import CgroupCpuLoad

    clock, load = FakeClock(), CgroupCpuLoad()
    tree = {"pod/cpu.max": "800000 100000\n", "pod/cpu.stat": "usage_usec 0\n"}
    assert cpu_figures(tmp_path, "0::/pod\n", tree, clock, load, affinity=2) == (2, 0.0)


def test_a_fractional_quota_counts_whole_cpus_with_the_load_per_cpu_kept(tmp_path):
    # 1.5 CPUs used in full: 2 CPUs (the report's count is whole) and a load of 1 per CPU, not
    # the 0.75 that 1.5 over 2 would read. The first reading samples the counter over a short
    # pause, during which the pod uses its 1.5 CPUs.
    tree = {"pod/cpu.max": "150000 100000\n", "pod/cpu.stat": "usage_usec 0\n"}

    def pod_runs(seconds: float) -> None:
        (tmp_path / "pod" / "cpu.stat").write_text(f"usage_usec {round(1.5e6 * seconds)}\n")

    count, load_1m = cpu_figures(tmp_path, "0::/pod\n", tree, FakeClock(pod_runs))
    assert count == 2 and load_1m / count == pytest.approx(1.0)



def test_a_workers_gpu_is_found_by_torchs_bare_uuid_and_its_own_bytes_counted(monkeypatch):
    # torch names a device by its bare UUID; NVML wants the "GPU-"/"MIG-" prefix. The process
    # list may be unsupported (MIG, vGPU, WSL): the index still stands, and NVML is shut down.
    from orchestrator.probes import nvml_index_and_process_bytes

    nvml = fake_pynvml([A100, T4])
    devices = {"GPU-a100": 0, "MIG-t4": 1}

    def by_uuid(uuid):
        if uuid not in devices:
            raise FakeNVMLError(uuid)
        return devices[uuid]

    def processes(handle):
        if handle == 1:
            raise FakeNotSupported("processes")
        return [types.SimpleNamespace(pid=7, usedGpuMemory=512), types.SimpleNamespace(
            pid=8, usedGpuMemory=None), types.SimpleNamespace(pid=9, usedGpuMemory=4096)]

    nvml.nvmlDeviceGetHandleByUUID = by_uuid
    nvml.nvmlDeviceGetIndex = lambda handle: handle
    nvml.nvmlDeviceGetComputeRunningProcesses = processes
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert nvml_index_and_process_bytes("a100", pid=7) == (0, 512)
    assert nvml_index_and_process_bytes("t4", pid=7) == (1, 0)  # a MIG slice, no process list
    assert nvml_index_and_process_bytes("gone", pid=7) == (None, 0)
    assert nvml.calls.count("init") == nvml.calls.count("shutdown") == 3


    def shutdown():  # (its error escaped the function, documented to fall back on its own)
        raise FakeNVMLError("nvmlShutdown failed")

    nvml.nvmlShutdown = shutdown
    assert nvml_index_and_process_bytes("a100", pid=7) == (0, 512)


def test_a_peer_whose_larger_transfer_failed_keeps_only_this_rounds_lower_bound():
    # Two healthy rounds, then the 64 MiB transfer times out and the 8 MiB one is slow: its
    # rate was appended beside the two fast figures, and the median kept reporting 7.3 GB/s
    # for a link that could not move 64 MiB in 10 s.
    history = record_bandwidth({}, {"b": 7.3}, {"b"}, {"b"}, now=1.0)
    history = record_bandwidth(history, {"b": 7.3}, {"b"}, {"b"}, now=2.0)
    history = record_bandwidth(history, {"b": 0.0056}, {"b"}, {"b"}, now=3.0, failed={"b"})
    assert current_bandwidth(history, now=3.0, max_age_s=100.0) == {"b": 0.0056}


def nvml_error(code: int, text: str) -> FakeNVMLError:
    error = FakeNVMLError(text)
    error.value = code  # pynvml's NVMLError carries NVML's return code
    return error


def test_a_mig_query_failing_other_than_absent_leaves_the_gpu_out_not_a_larger_slice(
        monkeypatch):
    """Only NotFound means "no slice in this slot" and only NotSupported "no MIG": a slot
    query that failed otherwise (GPU lost) dropped that slice, and the board read as its
    larger 40 GB slice where a worker may get the 10 GB one; a MIG mode query failing so read
    as MIG off, the board's 80 GB. Neither said a word in the nvml error."""
    slices = {("mig", 0, 0): ("NVIDIA A100-SXM4-80GB MIG 3g.40gb", 40),
              ("mig", 0, 2): ("NVIDIA A100-SXM4-80GB MIG 1g.10gb", 10)}

    def mig_handle(handle, slot):
        if handle == 0 and slot == 2:
            raise nvml_error(15, "GPU is lost")
        if ("mig", handle, slot) not in slices:
            raise nvml_error(6, "Not Found")
        return ("mig", handle, slot)

    def mig_mode(handle):
        if handle == 1:
            raise nvml_error(15, "GPU is lost")
        if handle == 2:
            raise nvml_error(3, "Not Supported")  # a card without MIG: normal
        return [1, 1]

    nvml = fake_pynvml([A100, A100, A100])
    board_memory, names = nvml.nvmlDeviceGetMemoryInfo, nvml.nvmlDeviceGetName
    nvml.NVML_DEVICE_MIG_ENABLE = 1
    nvml.nvmlDeviceGetMigMode = mig_mode
    nvml.nvmlDeviceGetMaxMigDeviceCount = lambda h: 7
    nvml.nvmlDeviceGetMigDeviceHandleByIndex = mig_handle
    nvml.nvmlDeviceGetName = lambda h: slices[h][0] if isinstance(h, tuple) else names(h)
    nvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(
        total=slices[h][1] * GIB, free=slices[h][1] * GIB, used=0) \
        if isinstance(h, tuple) else board_memory(h)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    errors = {}
    (whole,) = probe_gpus({}, errors, ray_gpus=3.0)
    assert (whole.index, whole.name, whole.memory_total_bytes) == (
        2, "NVIDIA A100-SXM4-80GB", 80 * GIB)
    assert errors["nvml"] == (
        "GPU 0: MIG is on and its slice in slot 2 cannot be read "
        "(nvmlDeviceGetMigDeviceHandleByIndex: FakeNVMLError: GPU is lost); "
        "GPU 1: its MIG mode cannot be read (nvmlDeviceGetMigMode: FakeNVMLError: GPU is lost)")


def test_every_gpu_lost_is_not_replaced_by_the_gpus_the_labels_declare(monkeypatch):
    # A T4 node of cluster.yaml (labels declare 4 T4s) whose 4 GPUs NVML counts and finds lost:
    # the labels stood in for them, 4 T4s with all their memory free, placed as healthy,
    # while losing 3 of the 4 left 1 placeable.
    from orchestrator.probes import gpu_count_problem

    class FakeGpuIsLost(FakeNVMLError):
        pass

    labels = {LABEL_ACCELERATOR_TYPE: "T4", LABEL_ACCELERATOR_COUNT: "4",
              LABEL_ACCELERATOR_MEMORY_GB: "15"}
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([{**T4, "name": FakeGpuIsLost}] * 4))
    errors = {}
    assert probe_gpus(labels, errors, 4.0) == ()
    assert errors["nvml"].count("FakeGpuIsLost") == 4 and "declared" not in errors
    problem = gpu_count_problem((), 4.0, labels)
    assert "Ray counts 4 GPU(s)" in problem and "nvml probe error" in problem
    # The labels do declare 4: the operator is told they are not taken in the lost GPUs'
    # stead, not sent to look for a missing label ("no node label declares any ...=0?").
    assert "no node label declares" not in problem and "=0?" not in problem, problem
    assert "4 the node's labels declare" in problem, problem
    # Without labels, the hint at a missing label stays.
    assert "no node label declares any" in gpu_count_problem((), 4.0, {})
    # NVML absent (no GPU counted): the labels still declare the node's accelerators.
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([]))
    assert [g.source for g in probe_gpus(labels, {}, 4.0)] == ["declared"] * 4


def test_a_node_whose_host_probe_fails_is_not_said_to_be_overloaded(monkeypatch):
    # Under a load limit, the stand-in load kept it out with "overloaded: load 1000000.00 per
    # CPU", a figure nobody measured; the reason now names the failing probe.
    import orchestrator.probes as probes
    from orchestrator.config import JobSpec
    from orchestrator.inventory import ClusterState, NodeReport
    from orchestrator.placement import place

    def no_psutil():
        raise ImportError("No module named 'psutil'")

    state = ClusterState(max_load_per_cpu=2.0)
    state.update(NodeReport("calm", "calm", 8, 0, 8, 1.0, GIB, GIB), 0.0)
    monkeypatch.setattr(probes, "probe_host", no_psutil)
    errors = {}
    state.update(NodeReport(node_id="blind", ray_cpus=8, ray_gpus=0, probe_errors=errors,
                            **probes.host_figures(errors)), 0.0)
    reason = place(JobSpec("j", num_workers=1), state, 1.0, explain=True).node_reasons["blind"]
    assert "1000000" not in reason and "host probe" in reason and "psutil" in reason


def test_a_workers_mig_slice_is_named_by_its_boards_index_not_its_slot(monkeypatch):
    """NVML's index of a MIG device handle is its slot on its board (what
    nvmlDeviceGetMigDeviceHandleByIndex takes), not the board's index: a worker on board 2's
    slice 0 reported GPU 0 short of memory, and placement excluded board 0 instead of 2."""
    from orchestrator.probes import nvml_index_and_process_bytes

    nvml = fake_pynvml([A100, A100, A100])
    slices = {"MIG-slice": ("mig", 2, 0), "GPU-board": 1}  # board 2's slot 0; board 1

    def by_uuid(uuid):
        if uuid not in slices:
            raise FakeNVMLError(uuid)
        return slices[uuid]

    nvml.nvmlDeviceGetHandleByUUID = by_uuid
    # (pynvml answers with a ctypes c_uint, as here)
    nvml.nvmlDeviceIsMigDeviceHandle = lambda handle: ctypes.c_uint(isinstance(handle, tuple))
    nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle = lambda handle: handle[1]
    # As NVML documents it: a MIG handle's index is its slot within its board.
    nvml.nvmlDeviceGetIndex = lambda handle: handle[2] if isinstance(handle, tuple) else handle
    nvml.nvmlDeviceGetComputeRunningProcesses = lambda handle: [
        types.SimpleNamespace(pid=7, usedGpuMemory=256 if handle == ("mig", 2, 0) else 1)]
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert nvml_index_and_process_bytes("slice", pid=7) == (2, 256)
    assert nvml_index_and_process_bytes("board", pid=7) == (1, 1)
    assert nvml.calls.count("init") == nvml.calls.count("shutdown") == 2


@pytest.mark.parametrize("query", ["nvlink", "pcie_gen", "pcie_width", "util"])
def test_an_optional_query_saying_the_gpu_is_lost_leaves_it_out_named(monkeypatch, query):
    """NotSupported from an NVLink, PCIe or utilization query is normal (no such figure), but
    GPU_IS_LOST (15) is not: the lost GPU read as one without NVLink or a PCIe figure, placed
    with no word in the nvml error, where a failing memory or MIG query leaves it out."""
    def lost(*args):
        raise nvml_error(15, "GPU is lost")

    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([A100, {**A100, query: lost}, T4]))
    errors = {}
    gpus = probe_gpus({}, errors, ray_gpus=3.0)
    assert [g.index for g in gpus] == [0, 2]
    assert errors["nvml"] == "GPU 1: FakeNVMLError: GPU is lost"
    assert gpus[1].nvlink_links is None and gpus[1].pcie_gen is None  # (T4's NotSupported)


def test_every_mig_query_failing_names_the_query_and_the_slot(monkeypatch):
    """One helper runs every MIG query (mode, slot count, slot handle, a slice's name and
    memory): any failure other than the absence each expects leaves the board out, named
    with the query. A slice whose name or memory query failed was named only by NVML's error
    ("GPU 0: FakeNVMLError: GPU is lost"), saying nothing of MIG or the slot."""
    def mig_handle(handle, slot):
        if slot != 1:
            raise nvml_error(6, "Not Found")
        return ("mig", handle, slot)

    def slice_memory(h):
        if isinstance(h, tuple):
            raise nvml_error(15, "GPU is lost")
        return board_memory(h)

    nvml = fake_pynvml([A100, A100])
    board_memory, names = nvml.nvmlDeviceGetMemoryInfo, nvml.nvmlDeviceGetName
    nvml.NVML_DEVICE_MIG_ENABLE = 1
    nvml.nvmlDeviceGetMigMode = lambda h: [1, 1] if h == 0 else [0, 0]
    nvml.nvmlDeviceGetMaxMigDeviceCount = lambda h: 7
    nvml.nvmlDeviceGetMigDeviceHandleByIndex = mig_handle
    nvml.nvmlDeviceGetName = lambda h: "A100 MIG 1g.10gb" if isinstance(h, tuple) else names(h)
    nvml.nvmlDeviceGetMemoryInfo = slice_memory
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    errors = {}
    assert [g.index for g in probe_gpus({}, errors, ray_gpus=2.0)] == [1]
    assert errors["nvml"] == ("GPU 0: MIG is on and its slice in slot 1 cannot be read "
                              "(nvmlDeviceGetMemoryInfo: FakeNVMLError: GPU is lost)")


def test_a_frozen_peer_pins_one_object_at_most_not_one_per_refresh(monkeypatch):
    """A pull a frozen peer agent never answers holds its 8 MiB object in this node's object
    store until the peer resumes (the task's argument; ray.cancel of a running or queued
    actor task frees nothing): each refresh timed out on it afresh and pinned 8 MiB more (6
    refreshes: 48 MiB, 6 objects, on a one-node Ray). One unanswered pull per peer now: until
    it is answered the peer is not sent another, and counts as failed."""
    import inspect
    import threading

    import ray

    from ray_layer import node_agent

    agent_class = node_agent.NodeAgent.__ray_metadata__.modified_class
    module = inspect.unwrap(agent_class._time_pull).__globals__
    put, answered = [], set()

    class Pulls:  # the peer's `pull` method: a frozen peer answers nothing it is sent
        sent = []

        def remote(self, refs, timeout_s):
            self.sent.append(refs[0])
            return ("pull", len(self.sent))

    def get(ref, timeout=None):
        if ref not in answered:
            raise ray.exceptions.GetTimeoutError("Get timed out")
        return 0.01

    fake_ray = types.SimpleNamespace(
        put=lambda value: put.append(value.nbytes) or ("object", len(put)), get=get,
        wait=lambda refs, timeout=None: ([r for r in refs if r in answered],
                                         [r for r in refs if r not in answered]),
        exceptions=ray.exceptions)
    monkeypatch.setitem(module, "ray", fake_ray)
    agent = object.__new__(agent_class)
    agent.node_id, agent._bandwidth_lock = "self", threading.RLock()
    agent._failing_peers, agent._failed_peers_last, agent._unanswered = set(), set(), {}
    peer = types.SimpleNamespace(pull=Pulls())
    for _ in range(6):
        assert agent.measure_bandwidth({"frozen": peer}, 64 * MIB, 1.0) == {}
    assert put == [8 * MIB] and len(Pulls.sent) == 1  # one object pinned, not six
    assert agent._failed_peers_last == {"frozen"}
    answered.update([("pull", 1), ("pull", 2), ("pull", 3), ("pull", 4), ("pull", 5)])
    assert set(agent.measure_bandwidth({"frozen": peer}, 64 * MIB, 1.0)) == {"frozen"}
    assert agent._unanswered == {}  # (answered: measured again, nothing held)
