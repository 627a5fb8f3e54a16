"""The canonical trace's accelerator constraint (a set of families separated by '|'), its
line-numbered errors, and write_canonical's round trip. Pure logic, no Ray."""
import pytest

from orchestrator.traces import (TraceError, TraceJob, load_canonical, parse_accelerators,
                                 unknown_families, write_canonical)

HEADER = "submit_time_s,duration_s,num_gpus,accelerator\n"


def load_one(tmp_path, field: str) -> TraceJob:
    path = tmp_path / "t.csv"
    path.write_text(HEADER + f"0,10,1,{field}\n")
    (job,) = load_canonical(path)
    return job


@pytest.mark.parametrize("field, families", [
    ("", ()),
    ("V100", ("V100",)),
    ("V100|A100", ("V100", "A100")),
    ("a100|v100", ("A100", "V100")),  # order as written, upper-cased
    (" v100 | A100 ", ("V100", "A100")),  # whitespace around parts
    ('" v100 | A100 "', ("V100", "A100")),  # quoted field, spaces inside
    ("V100|v100|A100|V100", ("V100", "A100")),  # duplicates dropped, first place kept
    ("P100|K80|V100|A100", ("P100", "K80", "V100", "A100")),
])
def test_accelerator_column_reads_a_set_of_families(tmp_path, field, families):
    assert load_one(tmp_path, field).accelerators == families


def test_an_unknown_but_well_formed_family_is_kept_and_named(tmp_path):
    job = load_one(tmp_path, "Z80|v100|tpu-v9")
    assert job.accelerators == ("Z80", "V100", "TPU-V9")
    assert unknown_families(job.accelerators) == ("Z80", "TPU-V9")
    assert unknown_families(("V100", "A100")) == () and unknown_families(()) == ()


@pytest.mark.parametrize("field, message", [
    ("V100|", "accelerator 'V100|' has an empty part"),
    ("|A100", "accelerator '|A100' has an empty part"),
    ("V100||A100", "accelerator 'V100||A100' has an empty part"),
    ("V100| |A100", "has an empty part"),
    ('"V100,A100"', "'V100,A100' is not a family name"),
    ("V100;A100", "'V100;A100' is not a family name"),
    ("V 100", "'V 100' is not a family name"),
    ("V100|-A100", "'-A100' is not a family name"),
    ("V100|A100!", "'A100!' is not a family name"),
])
def test_malformed_constraint_is_an_error_naming_file_and_line(tmp_path, field, message):
    path = tmp_path / "bad.csv"
    path.write_text(HEADER + "0,10,1,V100\n" + f"5,10,2,{field}\n")
    with pytest.raises(TraceError) as e:
        load_canonical(path)
    assert str(e.value).startswith(f"{path}:3: ") and message in str(e.value)


def test_parse_accelerators_names_where_and_keeps_order():
    assert parse_accelerators("k80|P100|k80", "f:9") == ("K80", "P100")
    with pytest.raises(TraceError, match=r"^f:9: accelerator 'K80\|' has an empty part"):
        parse_accelerators("K80|", "f:9")


def test_trace_job_refuses_a_bare_string_of_families():
    # A str would otherwise become ('V', '1', '0', '0').
    with pytest.raises(TypeError, match="accelerators must be a tuple"):
        TraceJob(0, 0.0, 1.0, 1, "", "V100")
    assert TraceJob(0, 0.0, 1.0, 1, "", ["V100"]).accelerators == ("V100",)


def test_write_canonical_round_trips(tmp_path):
    jobs = [TraceJob(0, 0.0, 100.0, 1),
            TraceJob(1, 0.1 + 0.2, 1 / 3, 8, "ResNet-50 (batch size 64)", ("A100",)),
            TraceJob(2, 12345.678901234567, 7e-5, 4, "LM (batch size 20)", ("V100", "A100")),
            TraceJob(3, 1e9, 86400.5, 64, "", ("Z80", "P100"))]
    path = tmp_path / "rt.csv"
    write_canonical(jobs, path)
    back = load_canonical(path)
    assert [(j.job_id, j.submit_time_s, j.duration_s, j.num_gpus, j.model_type, j.accelerators)
            for j in back] == [(j.job_id, j.submit_time_s, j.duration_s, j.num_gpus,
                                j.model_type, j.accelerators) for j in jobs]
    assert [j.line for j in back] == [2, 3, 4, 5]
    assert path.read_text().splitlines()[0] == \
        "submit_time_s,duration_s,num_gpus,model_type,accelerator"
    first = path.read_bytes()
    write_canonical(back, path)
    assert path.read_bytes() == first  # same jobs, same bytes


def test_write_canonical_refuses_a_family_that_would_not_read_back(tmp_path):
    path = tmp_path / "x.csv"
    with pytest.raises(TraceError, match=r"x.csv: job 7: accelerators \['V100\|A100'\]"):
        write_canonical([TraceJob(7, 0.0, 1.0, 1, "", ("V100|A100",))], path)
