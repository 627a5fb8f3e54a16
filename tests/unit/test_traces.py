"""The canonical trace's accelerator constraint (a set of families separated by '|'), its
line-numbered errors, write_canonical's round trip, and what the loaders make of files as
users hand them over (BOM, quoted headers, gzip, unit mistakes). Pure logic, no Ray."""
import pytest

import gzip

from orchestrator.config import ConfigError, JobSpec
from orchestrator.traces import (MAX_GPUS, TraceError, TraceJob, load_canonical, load_philly,
                                 load_trace, parse_accelerators, prepare, sniff_format,
                                 unknown_families, unknown_family_reason, write_canonical)

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


# -- files as users hand them over ----------------------------------------------------------

CANONICAL = "submit_time_s,duration_s,num_gpus\n"
PHILLY = "timestamp,duration,num_gpus\n"


def write(tmp_path, text: str, name: str = "t.csv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("fmt, text, message", [
    ("canonical", CANONICAL + "0,100,1\n1,100,100001\n", ":3: num_gpus must be an integer in "
     "[1, 100000], got '100001'"),
    ("canonical", CANONICAL + "0,100,1e18\n", ":2: num_gpus must be an integer in [1, 100000]"),
    ("philly", PHILLY + "2017-10-09 07:01:55,100,200000\n", ":2: num_gpus must be an integer"),
])
def test_more_gpus_than_a_jobspec_allows_is_a_trace_error_naming_the_line(tmp_path, fmt, text,
                                                                         message):
    # It used to pass here and end in a bare ConfigError traceback when the simulator made jobs.
    path = write(tmp_path, text)
    with pytest.raises(TraceError) as e:
        load_trace(path, fmt)
    assert str(e.value).startswith(str(path)) and message in str(e.value)


def test_the_gpu_bound_is_jobspecs_num_workers_limit():
    JobSpec("j", num_workers=MAX_GPUS, gpus_per_worker=1)
    with pytest.raises(ConfigError, match="num_workers"):
        JobSpec("j", num_workers=MAX_GPUS + 1, gpus_per_worker=1)


@pytest.mark.parametrize("fmt, text, message", [
    ("canonical", CANONICAL + "0,1.7e308,1\n", ":2: duration_s '1.7e308' is over 1e+09 s"),
    ("canonical", CANONICAL + "0,100,1\n5,1e12,1\n", ":3: duration_s '1e12' is over"),
    ("canonical", CANONICAL + "1e300,100,1\n", ":2: submit_time_s '1e300' is over"),
    # Unix time in ms: as seconds it is thousands of years ahead
    ("canonical", CANONICAL + "1507532515,100,1\n1507532600000,100,1\n",
     ":3: submit_time_s '1507532600000' is over"),
    ("philly", PHILLY + "2017-10-09 07:01:55,1e12,1\n", ":2: duration '1e12' is over"),
])
def test_times_over_31_years_are_refused_hinting_at_the_unit(tmp_path, fmt, text, message):
    # They replayed, printing inf, nan or 300-digit JCTs with exit 0.
    path = write(tmp_path, text)
    with pytest.raises(TraceError) as e:
        load_trace(path, fmt)
    assert str(e.value).startswith(str(path)) and message in str(e.value)
    assert "seconds; was it written in ms or µs?" in str(e.value)


def test_unix_epoch_submit_times_are_read_and_the_clock_starts_at_the_first(tmp_path):
    # The most common export (seconds since 1970); it was refused as "ms or µs?".
    path = write(tmp_path, CANONICAL + "1507532600,7200,2\n1507532515,3600,1\n")
    jobs = prepare(load_trace(path, "canonical"))
    assert [(j.submit_time_s, j.duration_s, j.line) for j in jobs] == [(0, 3600, 3),
                                                                       (85, 7200, 2)]


def test_submit_times_spanning_over_31_years_are_refused_naming_both_ends(tmp_path):
    # Relative times in ms (2e9 ms = 23 days), or relative and Unix times mixed: the span,
    # not the size of one time, gives the unit away.
    path = write(tmp_path, CANONICAL + "0,100,1\n7200000,100,1\n2000000000,100,1\n")
    with pytest.raises(TraceError) as e:
        load_trace(path, "canonical")
    assert str(e.value).startswith(f"{path}:4: submit_time_s") and "line 2" in str(e.value)
    assert "seconds; was it written in ms or µs?" in str(e.value)


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    canonical = write(tmp_path, "\ufeff" + CANONICAL + "0,100,2\n", "c.csv")
    philly = write(tmp_path, "\ufeff" + PHILLY + "2017-10-09 07:01:55,100,1\n", "p.csv")
    assert [(j.duration_s, j.num_gpus) for j in load_canonical(canonical)] == [(100, 2)]
    assert sniff_format(philly) == "philly"
    assert [j.duration_s for j in load_philly(philly)] == [100]


@pytest.mark.parametrize("header", ['"timestamp","duration","num_gpus"',
                                    "duration,timestamp,num_gpus",
                                    " timestamp , duration,num_gpus"])
def test_a_philly_header_is_recognised_quoted_or_reordered(tmp_path, header):
    path = write(tmp_path, f"{header}\n100,100,1\n")
    assert sniff_format(path) == "philly"
    assert sniff_format(write(tmp_path, '"submit_time_s",duration_s,num_gpus\n0,1,1\n',
                              "c.csv")) == "canonical"


def test_a_philly_file_read_as_canonical_says_to_pass_format_philly(tmp_path):
    path = write(tmp_path, "duration,timestamp,num_gpus\n100,2017-10-09 07:01:55,1\n", "p.csv")
    with pytest.raises(TraceError, match=r"p.csv:1: unknown column\(s\) 'duration', "
                       r"'timestamp'.* \(a Philly trace\? pass --format philly\)$"):
        load_canonical(path)


@pytest.mark.parametrize("fmt, header, message", [
    ("canonical", "submit_time_s,duration_s,num_gpus,submit_time_s",
     "column 'submit_time_s' is given twice (columns 1 and 4)"),
    ("philly", "timestamp,duration,num_gpus,duration,num_gpus",
     "columns 'duration' (columns 2 and 4), 'num_gpus' (columns 3 and 5) are given more than once"),
])
def test_a_column_given_twice_is_named_with_its_positions(tmp_path, fmt, header, message):
    # It read "duplicate column names in [...]", the whole header: which one was left to find.
    path = write(tmp_path, header + "\n")
    with pytest.raises(TraceError) as e:
        load_trace(path, fmt)
    assert str(e.value) == f"{path}:1: {message}"


@pytest.mark.parametrize("bom, end", [(b"", b"\n"), (b"\xef\xbb\xbf", b"\n"), (b"", b"\r\n"),
                                      (b"", b"\r")])
def test_a_file_not_in_utf8_is_refused_naming_the_line(tmp_path, bom, end):
    # An Excel "CSV" (Windows-1252) export with "café" in a row was "not UTF-8 text (byte 63)",
    # left to count bytes by hand in a file of thousands of lines.
    head = b"submit_time_s,duration_s,num_gpus,model_type" + end + b"0,10,1," + end
    path = tmp_path / "t.csv"
    path.write_bytes(bom + head + b"5,10,1,caf\xe9" + end)
    with pytest.raises(TraceError) as e:
        load_canonical(path)
    byte = len(bom + head) + len(b"5,10,1,caf")  # the file's own offset, a mark counted
    assert str(e.value) == f"{path}:3: not UTF-8 text (byte {byte}); save it as UTF-8 CSV"


def test_a_header_without_rows_is_an_error(tmp_path):
    path = write(tmp_path, CANONICAL + "\n")
    with pytest.raises(TraceError, match=f"^{path}: no jobs \\(only a header\\)$"):
        load_canonical(path)


def test_blank_lines_before_the_header_are_skipped(tmp_path):
    path = write(tmp_path, "\n \n" + CANONICAL + "0,100,1\n")
    (job,) = load_canonical(path)
    assert (job.duration_s, job.line) == (100, 4)
    with pytest.raises(TraceError, match=r"t.csv:3: unknown column\(s\) 'user'"):
        load_canonical(write(tmp_path, "\n\nsubmit_time_s,duration_s,num_gpus,user\n0,1,1,x\n"))


def test_a_gzip_file_is_named_as_such(tmp_path):
    path = tmp_path / "t.csv.gz"
    path.write_bytes(gzip.compress((CANONICAL + "0,100,1\n").encode()))
    for read in (load_canonical, sniff_format):
        with pytest.raises(TraceError, match=f"^{path}: gzip-compressed: gunzip it first$"):
            read(path)


def test_an_alias_of_a_known_family_is_named_with_the_family_to_write():
    assert unknown_family_reason(("V100S",)) == \
        "unknown accelerator family V100S (V100S is an alias of V100; write V100)"
    assert unknown_family_reason(("Z80", "MI250X")) == \
        "unknown accelerator family Z80|MI250X (MI250X is an alias of MI250; write MI250)"
    assert unknown_family_reason(("Z80",)) == "unknown accelerator family Z80"


def test_philly_timestamps_spanning_over_31_years_are_refused_naming_both_lines(tmp_path):
    # A typo in a year (2117 for 2017) replayed a century: a makespan of 36,524 days, exit 0.
    # A canonical trace's submit times spanning as long were refused; a Philly one's were not.
    path = write(tmp_path, PHILLY + "2017-10-09 07:01:55,100,1\n2117-10-09 07:01:55,100,1\n"
                                    "2017-10-10 07:01:55,100,1\n")
    with pytest.raises(TraceError) as e:
        load_trace(path, "philly")
    message = str(e.value)
    assert message.startswith(f"{path}:3: timestamp '2117-10-09 07:01:55'"), message
    assert "line 2's '2017-10-09 07:01:55'" in message and "year" in message
    assert "ms or µs" not in message  # (a date has no unit to get wrong)
    # Within 31 years: read.
    ok = write(tmp_path, PHILLY + "2017-10-09 07:01:55,100,1\n2047-10-09 07:01:55,100,1\n",
               "ok.csv")
    assert [j.submit_time_s for j in prepare(load_trace(ok, "philly"))][0] == 0


@pytest.mark.parametrize("fmt, row, column, why", [
    # float() and int() took these: `0,100,1_000` replayed as 1000 GPUs
    ("canonical", "0,100,1_0", "num_gpus", "'_'"),
    ("canonical", "0,1_00.5,1", "duration_s", "'_'"),
    ("canonical", "1_5,100,1", "submit_time_s", "'_'"),
    ("canonical", "0,100,\u0661\u0660", "num_gpus", "'\u0661'"),  # Arabic-Indic 10
    ("canonical", "0,\uff11\uff10,1", "duration_s", "'\uff11'"),  # full-width 10
    ("philly", "2017-10-09 07:01:55,100,1_0", "num_gpus", "'_'"),
    ("philly", "2017-10-09 07:01:55,\u0966\u0967,1", "duration", "'\u0966'"),  # Devanagari
])
def test_numbers_with_underscores_or_other_digits_are_refused_naming_line_and_column(
        tmp_path, fmt, row, column, why):
    path = write(tmp_path, (CANONICAL if fmt == "canonical" else PHILLY)
                 + ("0,100,1\n" if fmt == "canonical" else "2017-10-09 07:01:50,100,1\n")
                 + row + "\n")
    with pytest.raises(TraceError) as e:
        load_trace(path, fmt)
    message = str(e.value)
    assert message.startswith(f"{path}:3: {column} is not a number: "), message
    assert why in message, message


def test_plain_decimal_and_scientific_numbers_still_read(tmp_path):
    path = write(tmp_path, CANONICAL + "0,100,1\n.5,1e2,8.0\n+2.5E1, 7.25 ,2e0\n")
    assert [(j.submit_time_s, j.duration_s, j.num_gpus) for j in load_trace(path, "canonical")] \
        == [(0, 100, 1), (0.5, 100, 8), (25, 7.25, 2)]
