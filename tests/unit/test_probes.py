from pathlib import Path

import pytest

from actors.probes import probe_gpus, probe_host, probe_nvml, run_probe
from orchestrator.inventory import (GIB, LABEL_ACCELERATOR_COUNT, LABEL_ACCELERATOR_MEMORY_GB,
                                    LABEL_ACCELERATOR_TYPE, declared_gpus)

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
])
def test_malformed_declaration_names_the_label(label, value):
    with pytest.raises(ValueError, match=label):
        declared_gpus({**T4_LABELS, label: value})


def test_a_failing_probe_is_recorded_and_others_go_on():
    errors = {}
    assert run_probe("broken", lambda: 1 / 0, "default", errors) == "default"
    assert "ZeroDivisionError" in errors["broken"]
    gpus = probe_gpus({LABEL_ACCELERATOR_TYPE: "T4", LABEL_ACCELERATOR_COUNT: "x"}, errors)
    assert gpus == () and LABEL_ACCELERATOR_COUNT in errors["declared"]
    assert len(probe_gpus(T4_LABELS, {})) == 4
