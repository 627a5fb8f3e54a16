import pytest

from orchestrator.compression.config import CompressConfig
from orchestrator.compression.config import resume_conflicts as compress_resume_conflicts
from orchestrator.config import ConfigError, JobSpec, TrainConfig, resume_conflicts


@pytest.mark.parametrize("kwargs, field", [
    ({"num_workers": 0}, "num_workers"),
    ({"num_workers": 2.5}, "num_workers"),
    ({"cpus_per_worker": -1}, "cpus_per_worker"),
    ({"gpus_per_worker": -2}, "gpus_per_worker"),
    ({"min_gpu_memory_gb": -4}, "min_gpu_memory_gb"),
    ({"min_gpu_memory_gb": float("nan"), "gpus_per_worker": 1}, "min_gpu_memory_gb"),
    ({"min_gpu_memory_gb": 16}, "needs gpus_per_worker"),
    ({"name": ""}, "name"),
    ({"gpus_per_worker": 1, "accelerator_types": ("Z80",)}, "unknown type"),
    ({"accelerator_types": ("T4",)}, "needs gpus_per_worker"),
    ({"min_bandwidth_gbps": -1}, "min_bandwidth_gbps"),
    ({"priority": 1.5}, "priority"),
    ({"gpus_per_worker": 1, "accelerator_types": 5}, "accelerator_types must be a list"),
    ({"gpus_per_worker": 1, "accelerator_types": {"A100": 1}}, "accelerator_types must be a list"),
    ({"num_workers": 10**9}, "num_workers"),
])
def test_jobspec_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        JobSpec(**{"name": "job", **kwargs})


def test_jobspec_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as e:
        JobSpec(name="job", num_workers=0, cpus_per_worker=0)
    assert "num_workers" in str(e.value) and "cpus_per_worker" in str(e.value)


def test_jobspec_totals():
    spec = JobSpec(name="job", num_workers=4, cpus_per_worker=2, gpus_per_worker=1)
    assert spec.total_cpus == 8 and spec.total_gpus == 4


def test_unknown_key_gets_a_did_you_mean_hint():
    with pytest.raises(ConfigError, match=r"'num_worker' \(did you mean 'num_workers'\?\)"):
        JobSpec.from_dict({"name": "job", "num_worker": 2})


def test_missing_required_field_is_named():
    with pytest.raises(ConfigError, match="missing required field.*: name"):
        JobSpec.from_dict({"num_workers": 2})


def test_resume_conflicts_name_each_changed_field_but_allow_extending():
    saved = TrainConfig(model_size="tiny", max_steps=10).to_dict()
    assert resume_conflicts(saved, TrainConfig(model_size="tiny", max_steps=99)) == []
    assert resume_conflicts(saved, TrainConfig(model_size="small", seed=7)) == [
        "model_size: 'tiny' -> 'small'", "seed: 1337 -> 7"]


def test_non_mapping_is_refused():
    with pytest.raises(ConfigError, match="mapping"):
        TrainConfig.from_dict(["model_size", "tiny"])


@pytest.mark.parametrize("kwargs, field", [
    ({"model_size": "huge"}, "model_size"),
    ({"precision": "fp8"}, "precision"),
    ({"max_steps": 0}, "max_steps"),
    ({"batch_size": True}, "batch_size"),
    ({"lr": -1.0}, "lr"),
    ({"lr": 10 ** 400}, "lr"),  # past float's range: OverflowError, not a ConfigError
    ({"min_lr": 1.0, "lr": 0.1}, "min_lr"),
    ({"dropout": 1.0}, "dropout"),
    ({"model_size": ["tiny"]}, "model_size"),  # unhashable: a TypeError, naming nothing
    ({"model_size": {"n_layer": 2}}, "model_size"),
])
def test_trainconfig_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**kwargs)


def test_trainconfig_round_trips_through_a_dict():
    config = TrainConfig(model_size="tiny", max_steps=7)
    assert TrainConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("make, resume_conflicts_of, field, other", [
    (TrainConfig, resume_conflicts, "span_penalty", 1e-3),
    (CompressConfig, compress_resume_conflicts, "weight_bits", 8),
])
def test_a_field_missing_from_the_saved_config_counts_as_its_default(
        make, resume_conflicts_of, field, other):
    """A saved config written before `field` existed: that run behaved as the default does.
    Resuming with the default is no conflict (not 'None -> 7'); another value is, shown as
    'default -> new'. One rule for both configs (orchestrator/validation.py)."""
    saved = make().to_dict()
    default = saved.pop(field)
    assert resume_conflicts_of(saved, make()) == []
    assert resume_conflicts_of(saved, make(**{field: other})) == [
        f"{field}: {default!r} -> {other!r}"]


@pytest.mark.parametrize("kwargs, said", [
    # Each cross-field rule was checked only once every field passed: a second run named it.
    ({"max_steps": 0, "seq_len": 9000}, ["max_steps", "seq_len must be <= 8192"]),
    ({"batch_size": 0, "min_lr": 1.0, "lr": 0.1}, ["batch_size", "min_lr (1.0) must be <= lr"]),
    ({"dropout": 2.0, "model_size": "tiny", "seq_len": 9000}, ["dropout", "seq_len must be"]),
])
def test_trainconfig_names_its_cross_field_problems_beside_the_others(kwargs, said):
    with pytest.raises(ConfigError) as e:
        TrainConfig(**kwargs)
    assert all(words in str(e.value) for words in said), str(e.value)


@pytest.mark.parametrize("kwargs, said", [
    ({"num_workers": 0, "accelerator_types": ("T4",)},
     ["num_workers", "accelerator_types ['T4'] needs gpus_per_worker >= 1"]),
    ({"priority": 1.5, "min_gpu_memory_gb": 16},
     ["priority", "min_gpu_memory_gb 16 needs gpus_per_worker >= 1"]),
])
def test_jobspec_names_its_cross_field_problems_beside_the_others(kwargs, said):
    with pytest.raises(ConfigError) as e:
        JobSpec(name="job", **kwargs)
    assert all(words in str(e.value) for words in said), str(e.value)


def test_a_cross_field_rule_is_not_judged_on_a_field_already_refused():
    # "min_lr (0.5) must be <= lr ('x')" would say nothing the type error does not.
    with pytest.raises(ConfigError) as e:
        TrainConfig(lr="x", min_lr=0.5)
    assert "must be <=" not in str(e.value)
    with pytest.raises(ConfigError) as e:
        JobSpec(name="job", gpus_per_worker=-1, accelerator_types=("T4",))
    assert "needs gpus_per_worker" not in str(e.value)


@pytest.mark.parametrize("name", ["a\x1b[2Jb", "tab\there", "del\x7f", "csi\x9b31m"])
def test_a_jobspec_name_with_control_characters_is_refused(name):
    # `place --spec` (and jobs/pretrain.py, any driver) took a name holding an escape
    # sequence, and `status` printed it raw to every operator's terminal (ESC[2J: cleared it).
    with pytest.raises(ConfigError, match="name must not contain control characters") as e:
        JobSpec(name=name)
    assert str(e.value).startswith(f"invalid JobSpec {name!r}: ")  # escaped there too
    assert JobSpec(name="résumé-run 2").name == "résumé-run 2"  # printable: still a name
