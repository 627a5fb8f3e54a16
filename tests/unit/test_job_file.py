"""Bring-your-own-loop input, checked before anything starts (no Ray): job files
(orchestrator/job_file.py), entry points (orchestrator/entrypoints.py), the run directory
`fit` uses (orchestrator.launch.resolve_fit_run_dir), `fit`'s own argument checks, and
`python -m orchestrator submit` on bad input (real subprocesses: exit 2, one `error:` line)."""
import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from orchestrator import launch
from orchestrator.config import ConfigError, JobSpec
from orchestrator.entrypoints import EntrypointError, accepts_config, load_entrypoint
from orchestrator.job_exit import EXIT_BAD_INPUT, JobFailed
from orchestrator.job_file import LAUNCHER_KEYS, load_job_file

REPO = Path(__file__).resolve().parents[2]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


# --- job files ---------------------------------------------------------------------------

def test_launcher_keys_are_taken_out_and_every_other_key_is_a_jobspec_field(tmp_path):
    path = write(tmp_path / "job.yaml", """\
        name: my-run
        entrypoint: train.py:train_loop
        config: {lr: 0.5, data_dir: /data}
        runtime_env: {env_vars: {A: "1"}}
        run_dir: /runs/my-run
        max_failures: 0
        queue_timeout_s: 12.5
        num_workers: 3
        cpus_per_worker: 2
        priority: 7
        preemptible: false
        """)
    job = load_job_file(path)
    assert job.spec == JobSpec("my-run", num_workers=3, cpus_per_worker=2, priority=7,
                               preemptible=False)
    assert (job.entrypoint, job.config, job.runtime_env, job.run_dir) == (
        "train.py:train_loop", {"lr": 0.5, "data_dir": "/data"}, {"env_vars": {"A": "1"}},
        "/runs/my-run")
    assert (job.max_failures, job.queue_timeout_s, job.path) == (0, 12.5, path)


def test_a_job_file_with_only_jobspec_fields_gets_the_launcher_defaults(tmp_path):
    job = load_job_file(write(tmp_path / "job.yaml", "name: bare\n"))
    assert job.spec == JobSpec("bare")
    assert (job.entrypoint, job.config, job.runtime_env, job.run_dir, job.max_failures,
            job.queue_timeout_s) == (None, {}, None, None, 3, 600.0)


def test_an_unknown_key_gets_jobspecs_did_you_mean_and_names_the_file(tmp_path):
    path = write(tmp_path / "job.yaml", "name: a\nnum_worker: 2\nentrypoint: m:f\n")
    with pytest.raises(ConfigError) as e:
        load_job_file(path)
    assert str(e.value).startswith(f"{path}: ")
    assert "'num_worker' (did you mean 'num_workers'?)" in str(e.value)


def test_a_job_file_that_is_not_utf8_or_names_a_migration_claim_is_named(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("name: a\nentrypoint: m:f\n", encoding="utf-16")  # PowerShell's `>`
    with pytest.raises(ConfigError, match=f"{path}: not UTF-8 text .*save it as UTF-8"):
        load_job_file(path)
    write(path, "name: train#migration\nentrypoint: m:f\n")
    with pytest.raises(ConfigError, match="name must not end in '#migration'"):
        load_job_file(path)
    from orchestrator.launch import resolve_fit_run_dir
    with pytest.raises(ConfigError, match="name 'my/run' must not contain a path separator"):
        resolve_fit_run_dir(JobSpec("my/run"), None, False)
    with pytest.raises(ConfigError, match="run_dir '~nosuchuser-s55/a': ~nosuchuser-s55 is the "
                                          "home directory of no user"):  # launch.fit's own
        resolve_fit_run_dir(JobSpec("a"), "~nosuchuser-s55/a", False)


@pytest.mark.parametrize("name, problem", [("../x", "must not contain a path separator"),
                                           ("a\\b", "must not contain a path separator"),
                                           ("'..'", "is not a directory name")])
def test_a_job_file_whose_name_is_no_directory_name_is_refused_naming_the_file(
        tmp_path, monkeypatch, capsys, name, problem):
    # `name: ../x` passed load_job_file and was refused by launch.fit's run-directory check
    # alone, as "error: name '../x' must not contain a path separator: ...", no file named.
    from orchestrator.__main__ import main

    path = write(tmp_path / "job.yaml", f"name: {name}\nentrypoint: train.py:loop\n")
    with pytest.raises(ConfigError) as e:
        load_job_file(path)
    assert str(e.value).startswith(f"{path}: name ") and problem in str(e.value), str(e.value)
    # What `submit` (--dry-run here, refused before Ray) prints.
    write(tmp_path / "train.py", "def loop(config):\n    pass\n")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")  # (no Ray, should a check let it through)
    assert main(["submit", str(path), "--dry-run"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: name ") and problem in err, err


def test_a_job_file_nested_thousands_of_levels_deep_is_named_not_a_recursion_error(tmp_path):
    # PyYAML composes a node tree recursively: `config: [[[...]]]` 2,000 levels deep (or the
    # whole file so) raised RecursionError, a traceback, from place --spec and submit
    path = tmp_path / "job.yaml"
    for text in ("name: a\nentrypoint: m:f\nconfig: {c: " + "[" * 2000 + "]" * 2000 + "}\n",
                 "[" * 2000 + "]" * 2000 + "\n",
                 "name: a\nconfig:\n" + "".join(" " * i + f"k{i}:\n" for i in range(1, 2000))):
        write(path, text)
        with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: nested too deeply"):
            load_job_file(path)
    write(path, "name: a\nentrypoint: m:f\nconfig: {c: " + "[" * 50 + "]" * 50 + "}\n")
    assert load_job_file(path).config["c"] == eval("[" * 50 + "]" * 50)  # still read


def test_a_job_file_far_larger_than_any_is_refused_before_it_is_read_whole(tmp_path):
    # `place --spec /dev/zero` (or a job.yaml linked to it) ended in MemoryError, a traceback,
    # after filling memory; a checkpoint passed by mistake was read whole, then parsed
    from orchestrator.job_file import MAX_JOB_FILE_BYTES

    path = tmp_path / "job.yaml"
    path.write_text("name: a\n" + "#" * MAX_JOB_FILE_BYTES + "\n")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: over 16 MiB: a job file"):
        load_job_file(path)
    if Path("/dev/zero").exists():
        link = tmp_path / "zero.yaml"
        link.symlink_to("/dev/zero")
        with pytest.raises(ConfigError, match="over 16 MiB"):
            load_job_file(link)


def test_a_number_too_long_to_print_is_named_not_a_traceback(tmp_path):
    # Python will not read or print an int of over 4,300 digits: a ValueError escaped
    path = tmp_path / "job.yaml"
    write(path, "name: a\nentrypoint: m:f\npriority: " + "9" * 5000 + "\n")
    with pytest.raises(ConfigError, match=f"{path}: holds a number of over 4,300 digits"):
        load_job_file(path)
    write(path, "name: a\nentrypoint: m:f\nconfig: {day: 2026-13-45}\n")  # no such date
    with pytest.raises(ConfigError, match="not valid YAML: .*month must be in 1..12 .*quote"):
        load_job_file(path)
    write(path, "name: a\nentrypoint: m:f\nrun_dir: 2026-13-45\n")  # a path: its text
    assert load_job_file(path).run_dir == str(tmp_path / "2026-13-45")
    with pytest.raises(ConfigError, match="priority must be far smaller"):
        JobSpec("a", priority=10**5000)
    with pytest.raises(ConfigError, match=r"priority must be an integer in \[-2147483648"):
        JobSpec("a", priority=2**40)


@pytest.mark.parametrize("line, expected", [
    ("max_failures: -1", "max_failures must be an integer >= 0, got -1"),
    ("max_failures: '3'", "max_failures must be an integer >= 0, got '3'"),
    ("max_failures: true", "max_failures must be an integer >= 0, got True"),
    ("max_failures: 1.5", "max_failures must be an integer >= 0, got 1.5"),
    ("queue_timeout_s: -5", "queue_timeout_s must be a finite number >= 0, got -5"),
    ("queue_timeout_s: soon", "queue_timeout_s must be a finite number >= 0, got 'soon'"),
    ("queue_timeout_s: .inf", "queue_timeout_s must be a finite number >= 0, got inf"),
    ("queue_timeout_s: 1" + "0" * 400, "queue_timeout_s must be a finite number >= 0, got 1000"),
    ("config: [1, 2]", "config must be a mapping, got [1, 2]"),
    ("config: lr=0.1", "config must be a mapping, got 'lr=0.1'"),
    ("runtime_env: working_dir", "runtime_env must be a mapping, got 'working_dir'"),
    # (a number there is read as its text: `entrypoint: 42` is then no module:function)
    ("entrypoint: [train.py]", "entrypoint must be a string"),
    ("run_dir: {a: 5}", "run_dir must be a path, got {'a': 5}"),
    ("keep_checkpoints: 0", "keep_checkpoints must be an integer >= 1 or null"),
    ("stuck_timeout_s: 0", "stuck_timeout_s must be a finite number > 0 (seconds) or null"),
    ("stuck_timeout_s: soon", "stuck_timeout_s must be a finite number > 0 (seconds) or null/None"
     " (no watch), got 'soon'"),
    ("stuck_timeout_s: .inf", "stuck_timeout_s must be a finite number > 0"),
    # (it became a directory `s3:` beside the job file)
    ("run_dir: s3://bucket/runs/a", "run_dir: s3://bucket/runs/a is a URI; a run directory "
     "must be a path every node can reach"),
    # (it was the job file's own folder: the run went in beside its scripts, where that
    # folder bears the job's name, as examples/regression/ does)
    ("run_dir: ''", "run_dir is empty: give a path, or leave it out"),
    ("run_dir: '  '", "run_dir is empty: give a path, or leave it out"),
])
def test_a_bad_launcher_value_is_named_with_the_file(tmp_path, line, expected):
    path = write(tmp_path / "job.yaml", f"name: a\n{line}\n")
    with pytest.raises(ConfigError) as e:
        load_job_file(path)
    assert str(e.value).startswith(f"{path}: ")
    assert expected in str(e.value)


def test_every_problem_is_named_at_once_launcher_and_jobspec_alike(tmp_path):
    path = write(tmp_path / "job.yaml",
                 "name: a\nmax_failures: -1\nqueue_timeout_s: x\nnum_workers: 0\n")
    with pytest.raises(ConfigError) as e:
        load_job_file(path)
    message = str(e.value)
    for expected in ("max_failures must be", "queue_timeout_s must be",
                     "num_workers must be an integer in [1, 100000], got 0"):
        assert expected in message


def test_config_null_counts_as_no_config(tmp_path):
    assert load_job_file(write(tmp_path / "job.yaml", "name: a\nconfig:\n")).config == {}


@pytest.mark.parametrize("text, expected", [
    ("- name: a\n- name: b\n", "a job file is a mapping of fields (name, entrypoint, "
                               "num_workers, ...), got list"),
    ("just a string\n", "a job file is a mapping of fields (name, entrypoint, num_workers, "
                        "...), got str"),
    ("", "got NoneType"),
    ("name: [unclosed\n", "not valid YAML"),
])
def test_a_file_that_is_not_a_yaml_mapping_is_refused_naming_it(tmp_path, text, expected):
    path = write(tmp_path / "job.yaml", text)
    with pytest.raises(ConfigError) as e:
        load_job_file(path)
    assert str(e.value).startswith(f"{path}: ")
    assert expected in str(e.value)


def test_a_missing_job_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read: No such file"):
        load_job_file(tmp_path / "nope.yaml")


def test_the_shipped_examples_parse_and_their_entry_points_load():
    for example, name in (("regression", "regression"), ("image_cnn", "lines-cnn")):
        job = load_job_file(REPO / "examples" / example / "job.yaml")
        assert job.spec.name == name and job.spec.num_workers == 2 and job.spec.preemptible
        entry = load_entrypoint(job.entrypoint, job.path.parent)
        assert entry.from_file and entry.function.__name__ == "train_loop"
        assert accepts_config(entry.function)
        assert Path(entry.module.__file__) == REPO / "examples" / example / "train.py"


# --- entry points --------------------------------------------------------------------------

def test_module_colon_function_is_imported_by_name(tmp_path, monkeypatch):
    write(tmp_path / "pkg_loops_a1" / "__init__.py", "")
    write(tmp_path / "pkg_loops_a1" / "loops.py", """\
        def train_loop(config):
            return config["x"] * 2
        """)
    monkeypatch.syspath_prepend(str(tmp_path))
    entry = load_entrypoint("pkg_loops_a1.loops:train_loop")
    assert entry.from_file is False
    assert entry.module.__name__ == "pkg_loops_a1.loops"
    assert entry.function({"x": 21}) == 42


def test_a_script_path_is_read_relative_to_the_job_files_folder(tmp_path, monkeypatch):
    jobs = tmp_path / "jobs"
    write(jobs / "loops" / "train.py", "def train_loop():\n    return 'from the job folder'\n")
    write(tmp_path / "loops" / "train.py", "def train_loop():\n    return 'from the cwd'\n")
    monkeypatch.chdir(tmp_path)  # the same relative path exists here too: the job's wins
    entry = load_entrypoint("loops/train.py:train_loop", base_dir=jobs)
    assert entry.from_file is True
    assert entry.function() == "from the job folder"
    assert Path(entry.module.__file__) == (jobs / "loops" / "train.py").resolve()
    # ... and without a job folder, from the current directory.
    assert load_entrypoint("loops/train.py:train_loop").function() == "from the cwd"


def test_a_script_imports_the_files_beside_it_from_any_folder_and_they_travel_with_it(
        tmp_path, monkeypatch):
    import torch  # noqa: F401 (the script imports it: torch's first import fails in a copy
    # of sys.modules, so it is imported before the copy, as the whole file's run would)
    from orchestrator.entrypoints import local_modules

    monkeypatch.setattr(sys, "path", list(sys.path))  # the load adds the script's folder
    monkeypatch.setattr(sys, "modules", dict(sys.modules))
    write(tmp_path / "job" / "helper_e5.py", "def loss():\n    return 'helped'\n")
    write(tmp_path / "job" / "train.py", "import json\nimport torch\nfrom helper_e5 import loss\n"
          "def train_loop():\n    return loss()\n")
    monkeypatch.chdir(tmp_path)  # not the script's folder: `submit job/job.yaml` from here
    entry = load_entrypoint("job/train.py:train_loop")
    assert entry.function() == "helped"
    # Sent by value to the workers with the script: its helper, never an installed package.
    assert [m.__name__ for m in local_modules(entry.module)] == ["helper_e5"]


def test_two_scripts_of_the_same_name_do_not_share_a_module(tmp_path):
    first = write(tmp_path / "a" / "train.py", "def train_loop():\n    return 'a'\n")
    second = write(tmp_path / "b" / "train.py", "def train_loop():\n    return 'b'\n")
    loaded = [load_entrypoint(f"{p}:train_loop") for p in (first, second)]
    assert [e.function() for e in loaded] == ["a", "b"]
    assert loaded[0].module.__name__ != loaded[1].module.__name__


def test_a_missing_script_is_named_with_where_it_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(EntrypointError) as e:
        load_entrypoint("nope.py:train_loop", base_dir=tmp_path / "jobs")
    assert "entrypoint script 'nope.py' not found" in str(e.value)
    assert str(tmp_path / "jobs") in str(e.value)


def test_a_missing_script_names_each_folder_it_looked_in_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the job file's folder is the working directory
    with pytest.raises(EntrypointError) as e:
        load_entrypoint("train.py:train_loop", base_dir=tmp_path)
    assert str(e.value).endswith(f"(looked in {tmp_path.resolve()})")


def test_a_script_that_raises_on_import_is_named_with_its_error(tmp_path):
    script = write(tmp_path / "broken.py", "raise RuntimeError('no GPU on this laptop')\n")
    with pytest.raises(EntrypointError) as e:
        load_entrypoint("broken.py:train_loop", base_dir=tmp_path)
    # Where in the user's own files (the traceback is not shown): it named the error alone.
    assert str(e.value) == (f"entrypoint script {script} failed to import: "
                            "RuntimeError: no GPU on this laptop (broken.py line 1, in <module>)")
    # The half-imported module is not left behind for a later import to find.
    assert not [m for m in sys.modules if m.startswith("orchestrator_entry_broken_")]


def test_a_module_that_raises_on_import_is_named_with_its_error(tmp_path, monkeypatch):
    write(tmp_path / "raising_loops_b2.py", "x = 1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(EntrypointError) as e:
        load_entrypoint("raising_loops_b2:train_loop")
    assert str(e.value) == ("entrypoint module 'raising_loops_b2' failed to import: "
                            "ZeroDivisionError: division by zero (raising_loops_b2.py line 1, "
                            "in <module>)")


def test_an_import_error_names_the_innermost_line_of_the_users_own_files(tmp_path):
    # Raised in a library the script calls as it is imported (json here), or in a helper
    # beside it: the line named is the user's own, the innermost.
    write(tmp_path / "settings_q7.py", "import json\n\n"
          "def load():\n    return json.loads('{not json')\n")
    script = write(tmp_path / "train_q7.py", "import settings_q7\n\n"
                   "SETTINGS = settings_q7.load()\n\n"
                   "def train_loop(config):\n    pass\n")
    with pytest.raises(EntrypointError) as e:
        load_entrypoint("train_q7.py:train_loop", base_dir=tmp_path)
    assert str(e.value) == (f"entrypoint script {script} failed to import: JSONDecodeError: "
                            "Expecting property name enclosed in double quotes: line 1 column "
                            "2 (char 1) (settings_q7.py line 4, in load)")


def test_a_script_or_module_that_exits_on_import_is_refused_not_obeyed(tmp_path, monkeypatch):
    # A script parsing its arguments at import ended `submit` silently with the script's exit
    # code (0 read as success; argparse's usage line named "__main__.py").
    script = write(tmp_path / "cli_train.py", "import argparse\n"
                   "argparse.ArgumentParser().parse_args(['--lr'])\n"
                   "def train_loop(config):\n    pass\n")
    with pytest.raises(EntrypointError) as e:
        load_entrypoint("cli_train.py:train_loop", base_dir=tmp_path)
    assert str(e.value).startswith(f"entrypoint script {script} exited (sys.exit(2)) as it "
                                   "was imported: code that runs the script"), e.value
    assert 'if __name__ == "__main__":' in str(e.value)
    assert not [m for m in sys.modules if m.startswith("orchestrator_entry_cli_train_")]
    write(tmp_path / "exiting_loops_e5.py", "import sys\nsys.exit(0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(EntrypointError, match=r"entrypoint module 'exiting_loops_e5' exited "
                                              r"\(sys.exit\(0\)\)"):
        load_entrypoint("exiting_loops_e5:train_loop")


def test_a_script_or_module_that_starts_ray_on_import_is_refused(tmp_path, monkeypatch):
    """A plain Ray Train script (`trainer.fit()` at its top level) trained as it was imported,
    outside the scheduler, and `submit` then ran the job on the Ray that started, passing
    over --address and the job file's runtime_env (refused as if given beside ray.init())."""
    import ray

    started = []
    monkeypatch.setattr(ray, "init", lambda *a, **k: started.append(True))  # (no real Ray)
    monkeypatch.setattr(ray, "is_initialized", lambda: bool(started))
    monkeypatch.setattr(ray, "shutdown", started.clear)
    script = write(tmp_path / "ray_script_r7.py", "import ray\nray.init()\n"
                   "def train_loop(config):\n    pass\n")
    with pytest.raises(EntrypointError) as e:
        load_entrypoint("ray_script_r7.py:train_loop", base_dir=tmp_path)
    assert str(e.value).startswith(f"entrypoint script {script} initialized Ray as it was "
                                   "imported"), e.value
    assert 'if __name__ == "__main__":' in str(e.value)
    assert not started  # what it started is stopped
    assert not [m for m in sys.modules if m.startswith("orchestrator_entry_ray_script_r7_")]
    write(tmp_path / "ray_module_r7.py", "import ray\nray.init()\ndef train_loop(): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(EntrypointError, match="entrypoint module 'ray_module_r7' initialized Ray"):
        load_entrypoint("ray_module_r7:train_loop")
    # A Ray this process had started before is none of the entry point's doing.
    started.append(True)
    write(tmp_path / "plain_r7.py", "def train_loop(config):\n    pass\n")
    assert load_entrypoint("plain_r7.py:train_loop", base_dir=tmp_path).function.__name__ \
        == "train_loop"


def test_a_module_missing_a_dependency_is_not_called_missing_itself(tmp_path, monkeypatch):
    write(tmp_path / "needs_dep_c3.py", "import not_installed_anywhere_c3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(EntrypointError) as e:
        load_entrypoint("needs_dep_c3:train_loop")
    assert "entrypoint module 'needs_dep_c3' failed to import: ModuleNotFoundError" \
        in str(e.value)
    assert "not_installed_anywhere_c3" in str(e.value)
    with pytest.raises(EntrypointError, match="entrypoint module 'absent_module_d4' not found"):
        load_entrypoint("absent_module_d4:train_loop")
    with pytest.raises(EntrypointError, match="entrypoint module 'absent_pkg_d4.loops' not "
                                              "found"):
        load_entrypoint("absent_pkg_d4.loops:train_loop")


def test_a_missing_dependency_whose_name_starts_the_modules_is_still_the_dependency(
        tmp_path, monkeypatch):
    # dep_f6_loops imports dep_f6, which is not there: the module itself was found.
    write(tmp_path / "dep_f6_loops.py", "import dep_f6\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(EntrypointError) as e:
        load_entrypoint("dep_f6_loops:train_loop")
    assert str(e.value) == ("entrypoint module 'dep_f6_loops' failed to import: "
                            "ModuleNotFoundError: No module named 'dep_f6'")


def test_a_missing_or_non_function_attribute_is_named(tmp_path):
    write(tmp_path / "loops.py", "def other(config):\n    pass\ntrain_loop = 3\n")
    with pytest.raises(EntrypointError) as e:
        load_entrypoint("loops.py:train_lop", base_dir=tmp_path)
    assert str(e.value) == "entrypoint 'loops.py:train_lop': loops.py has no function 'train_lop'"
    with pytest.raises(EntrypointError, match="train_loop is a int, not a function"):
        load_entrypoint("loops.py:train_loop", base_dir=tmp_path)


@pytest.mark.parametrize("ref", ["train.py", "train.py:", ":train_loop", "a:b:c", ""])
def test_a_malformed_reference_says_what_one_looks_like(ref):
    with pytest.raises(EntrypointError, match="entrypoint must be 'package.module:function' or "
                                              "'path/to/script.py:function'"):
        load_entrypoint(ref)


@pytest.mark.parametrize("source", [
    "def train_loop(config, other):\n    pass\n",
    "def train_loop(config, *, rank):\n    pass\n",
    "def train_loop(*, config):\n    pass\n",
])
def test_a_loop_needing_more_than_one_argument_is_refused(tmp_path, source):
    write(tmp_path / "loops.py", source)
    with pytest.raises(EntrypointError) as e:
        load_entrypoint("loops.py:train_loop", base_dir=tmp_path)
    assert str(e.value).startswith("entrypoint 'loops.py:train_loop': train_loop(")
    assert "needs more than one argument; a training loop takes its config dict, or nothing" \
        in str(e.value)


@pytest.mark.parametrize("source, takes_config", [
    ("def train_loop():\n    pass\n", False),
    ("def train_loop(config):\n    pass\n", True),
    ("def train_loop(config=None):\n    pass\n", True),
    ("def train_loop(config, verbose=False):\n    pass\n", True),
    ("def train_loop(*args):\n    pass\n", True),
    ("def train_loop(**options):\n    pass\n", False),
])
def test_a_loop_taking_its_config_or_nothing_is_accepted(tmp_path, source, takes_config):
    write(tmp_path / "loops.py", source)
    entry = load_entrypoint("loops.py:train_loop", base_dir=tmp_path)
    assert accepts_config(entry.function) is takes_config


def test_accepts_config_on_builtins_and_callables():
    class Loop:
        def __call__(self, config):
            pass

    assert accepts_config(Loop()) is True
    with pytest.raises(TypeError, match="needs more than one argument"):
        accepts_config(lambda a, b: None)


# --- fit's run directory and its own checks ------------------------------------------------

def test_the_default_run_dir_is_the_runs_root_and_the_jobs_name(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "DEFAULT_RUNS_ROOT", tmp_path / "runs")
    assert launch.resolve_fit_run_dir(JobSpec("alpha"), None, False) == tmp_path / "runs" / "alpha"


def test_a_run_dir_must_end_with_the_jobs_name(tmp_path):
    assert launch.resolve_fit_run_dir(JobSpec("alpha"), tmp_path / "alpha", False) == \
        (tmp_path / "alpha").resolve()
    assert launch.resolve_fit_run_dir(JobSpec("alpha"), f"{tmp_path}/x/../alpha/", False) == \
        (tmp_path / "alpha").resolve()
    with pytest.raises(ConfigError) as e:
        launch.resolve_fit_run_dir(JobSpec("alpha"), tmp_path / "beta", False)
    assert f"run_dir {(tmp_path / 'beta').resolve()} must end in the job's name 'alpha'" \
        in str(e.value)


def test_a_run_dir_holding_checkpoints_is_refused_without_resume_and_used_with_it(tmp_path):
    run_dir = tmp_path / "alpha"
    (run_dir / "metrics.jsonl").parent.mkdir()
    (run_dir / "metrics.jsonl").write_text("{}\n")  # a run without checkpoints: not refused
    assert launch.resolve_fit_run_dir(JobSpec("alpha"), run_dir, False) == run_dir.resolve()
    (run_dir / "checkpoint_2026-12-02_10-00-00.000000").mkdir()
    with pytest.raises(ConfigError, match="already holds checkpoints of a run: resume it"):
        launch.resolve_fit_run_dir(JobSpec("alpha"), run_dir, False)
    assert launch.resolve_fit_run_dir(JobSpec("alpha"), run_dir, True) == run_dir.resolve()


def test_a_script_calling_fit_sends_the_files_beside_it_to_the_workers(tmp_path):
    # `python train.py` (the loop in __main__) importing helpers.py beside it: a worker on
    # another node has neither file, so the helper must travel by value with the loop.
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "helpers_m7.py").write_text("def steps(config):\n    return 3\n")
    (proj / "train.py").write_text(textwrap.dedent(f"""
        import ray.cloudpickle
        import ray_layer.launch
        from orchestrator import launch
        from orchestrator.config import JobSpec
        from helpers_m7 import steps

        def train_loop(config):
            return steps(config)

        sent = {{}}
        ray_layer.launch.launch = lambda fn, *a, **k: sent.setdefault("fn", fn)  # no Ray
        launch.fit(train_loop, spec=JobSpec("m7", num_workers=1),
                   run_dir={str(tmp_path / "runs" / "m7")!r})
        open({str(tmp_path / "fn.pkl")!r}, "wb").write(ray.cloudpickle.dumps(sent["fn"]))
    """))
    repo = str(Path(__file__).resolve().parents[2])
    made = subprocess.run([sys.executable, "train.py"], cwd=proj, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": repo})
    assert made.returncode == 0, made.stderr
    worker = subprocess.run(
        [sys.executable, "-c", "import ray.cloudpickle, sys; "
         f"fn = ray.cloudpickle.loads(open({str(tmp_path / 'fn.pkl')!r}, 'rb').read()); "
         "print('loaded')"],
        cwd="/", capture_output=True, text=True, env={**os.environ, "PYTHONPATH": repo})
    assert worker.returncode == 0 and "loaded" in worker.stdout, worker.stderr


def test_this_projects_packages_never_travel_by_value_a_users_of_the_same_name_do(tmp_path):
    import orchestrator.config
    from orchestrator.entrypoints import _ours

    users = SimpleNamespace(__name__="orchestrator.helpers",
                            __file__=str(tmp_path / "orchestrator" / "helpers.py"))
    assert _ours(orchestrator.config) and not _ours(users)


def test_resume_with_no_checkpoint_is_refused_not_a_fresh_start(tmp_path):
    with pytest.raises(ConfigError, match="resume: no checkpoint in run_dir .*alpha"):
        launch.resolve_fit_run_dir(JobSpec("alpha"), tmp_path / "alpha", True)


def test_a_relative_run_dir_in_a_job_file_is_beside_the_file(tmp_path, monkeypatch):
    # As its entrypoint's script is: `submit --resume` from another folder found nothing
    # there and started afresh.
    (tmp_path / "proj").mkdir()
    job = tmp_path / "proj" / "job.yaml"
    job.write_text("name: alpha\nentrypoint: train.py:loop\nrun_dir: runs/alpha\n"
                   "runtime_env: {working_dir: ., pip: [pandas]}\n")
    monkeypatch.chdir(tmp_path)
    loaded = load_job_file(job)
    assert loaded.run_dir == str(tmp_path / "proj" / "runs" / "alpha")
    assert loaded.runtime_env == {"working_dir": str(tmp_path / "proj"), "pip": ["pandas"]}
    # So are the runtime_env's other files beside it (read from the current directory, they
    # were refused: "runtime_env.pip: requirements.txt is not a valid file").
    (tmp_path / "proj" / "requirements.txt").write_text("pandas\n")
    (tmp_path / "proj" / "lib").mkdir()
    job.write_text("name: alpha\nentrypoint: train.py:loop\n"
                   "runtime_env: {pip: requirements.txt, conda: env.yaml, "
                   "py_modules: [lib, s3://bucket/m.zip], "
                   "uv: {packages: requirements.txt, uv_check: false}}\n")
    assert load_job_file(job).runtime_env == {
        "pip": str(tmp_path / "proj" / "requirements.txt"),
        "conda": str(tmp_path / "proj" / "env.yaml"),
        "py_modules": [str(tmp_path / "proj" / "lib"), "s3://bucket/m.zip"],
        "uv": {"packages": str(tmp_path / "proj" / "requirements.txt"), "uv_check": False}}
    job.write_text("name: alpha\nruntime_env: {pip: [pandas], conda: my-env}\n")  # names
    assert load_job_file(job).runtime_env == {"pip": ["pandas"], "conda": "my-env"}


@pytest.mark.parametrize("kwargs, expected", [
    ({"spec": {"name": "alpha"}}, "spec must be an orchestrator.config.JobSpec"),
    ({"spec": JobSpec("alpha"), "train_loop": lambda a, b: None},
     "needs more than one argument"),
    ({"spec": JobSpec("alpha"), "run_dir": "/tmp/beta"}, "must end in the job's name 'alpha'"),
    # ("" was the working directory: a run into it where that bears the job's name)
    ({"spec": JobSpec("alpha"), "run_dir": ""}, "run_dir is empty: give a path, or leave it out"),
    ({"spec": JobSpec("alpha"), "config": [1]}, "config must be a mapping, got [1]"),
    # launch.fit's own launcher arguments: Ray Train refused keep_checkpoints=0 with a
    # traceback once the job was placed; a string timeout failed while queued.
    ({"spec": JobSpec("alpha"), "keep_checkpoints": 0, "max_failures": "3",
      "queue_timeout_s": "600"}, "max_failures must be an integer >= 0, got '3'; "
     "queue_timeout_s must be a finite number >= 0, got '600'; keep_checkpoints must be an integer "
     ">= 1 or null/None (keep every one), got 0"),
    ({"spec": JobSpec("alpha"), "stuck_timeout_s": -1}, "stuck_timeout_s must be a finite "
     "number > 0 (seconds) or null/None (no watch), got -1"),
    ({"spec": JobSpec("..")}, "name '..' is not a directory name"),
    # (a name with control characters: JobSpec's own refusal, test_config.py)
    ({"spec": JobSpec("x" * 300)}, "is longer than a file name may be (255 bytes)"),
    ({"spec": JobSpec("alpha"), "runtime_env": {"env_vars": {"OMP_NUM_THREADS": 1}}},
     "runtime_env.env_vars: runtime_env['env_vars'] must be of type Dict[str, str]"),
    # Ray takes them, then every worker process it starts with them dies setting them
    # ("ValueError: illegal environment variable name" in the raylet's log): the job hung
    # once placed, waiting for its workers.
    ({"spec": JobSpec("alpha"), "runtime_env": {"env_vars": {"A=B": "x"}}},
     "runtime_env.env_vars: 'A=B' cannot name an environment variable (not empty, no '=' "
     "nor NUL in it)"),
    ({"spec": JobSpec("alpha"), "runtime_env": {"env_vars": {"": "x"}}},
     "runtime_env.env_vars: '' cannot name an environment variable"),
    ({"spec": JobSpec("alpha"), "runtime_env": {"env_vars": {"TOKEN": "a\0b"}}},
     "runtime_env.env_vars: the value of 'TOKEN' holds a NUL character, which an environment "
     "variable cannot"),
])
def test_fit_refuses_bad_input_as_exit_2_before_ray(tmp_path, monkeypatch, kwargs, expected):
    monkeypatch.setattr(launch, "DEFAULT_RUNS_ROOT", tmp_path)
    kwargs = {"train_loop": lambda config: None, **kwargs}
    loop = kwargs.pop("train_loop")
    with pytest.raises(JobFailed) as e:  # (Ray would refuse to start here: conftest.py)
        launch.fit(loop, **kwargs)
    assert e.value.exit_code == EXIT_BAD_INPUT
    assert expected in str(e.value)


def test_a_config_that_cannot_be_sent_to_the_workers_is_bad_input_naming_its_entry(
        tmp_path, monkeypatch):
    """Ray Train pickles the config only once the job is placed: a lock in it failed the job
    as "training failed after 3 restart(s): TypeError: Could not serialize ..." (exit 4).
    (A generator here: a lock pickles, as a new lock, in a process where Ray Serve has
    registered its lock serializer with cloudpickle, as the serving tests do.)"""
    import ray

    monkeypatch.setattr(launch, "DEFAULT_RUNS_ROOT", tmp_path)
    config = {"lr": 0.1, "data": {"paths": ["a", "b"], "rows": (row for row in "ab")}}
    with pytest.raises(JobFailed) as e:
        launch.fit(lambda config: None, spec=JobSpec("alpha"), config=config)
    assert e.value.exit_code == EXIT_BAD_INPUT
    assert str(e.value).startswith("config['data']['rows'] cannot be sent to the workers "
                                   "(TypeError: cannot pickle 'generator' object)")
    assert not (tmp_path / "alpha").exists()  # refused before anything was made
    # What Ray sends itself (an object reference: pinned for good if pickled here) and what
    # cloudpickle sends (a function) are no problem.
    from ray_layer.user_loop import config_pickling_problem

    assert config_pickling_problem({"table": ray.ObjectRef(b"\1" * 28),
                                    "scale": lambda x: 2 * x, "rows": [1, 2]}) is None


# --- launch.report's yield (ray_layer/user_loop.py), with Ray Train's calls stubbed -----------

class FakeWatch:
    """The scheduler's directive as rank 0's DirectiveWatch sees it: `answers`, one per poll."""

    def __init__(self, *answers):
        self.answers, self.checkpoints = list(answers), 0

    def poll(self):
        return self.answers.pop(0) if self.answers else None

    def checkpointed(self):
        self.checkpoints += 1


def saved(folder: str):
    """A checkpoint of `folder` (never read: Ray Train's report is stubbed)."""
    import ray.train

    return ray.train.Checkpoint.from_directory(folder)


def _rank0_reports(monkeypatch, directive: str | None = None) -> list:
    """The steps rank 0's loop reports to (a faked) Ray Train, its directive watch faked
    (`directive`: what the scheduler told the job, e.g. "cancel: ..."), nothing pending."""
    import ray.train

    from ray_layer import user_loop

    reports: list = []
    monkeypatch.setattr(ray.train, "report", lambda metrics, checkpoint=None:
                        reports.append(metrics["step"]))
    monkeypatch.setattr(ray.train, "get_context",
                        lambda: SimpleNamespace(get_world_rank=lambda: 0))
    monkeypatch.setattr(user_loop, "_watch", FakeWatch(*([directive] if directive else [])))
    monkeypatch.setattr(user_loop, "_pending", None)
    return reports


def test_a_yield_waits_for_a_checkpoint_and_rides_on_that_report(monkeypatch):
    """Ray Train's result keeps only the metrics of the latest checkpoint's report: "yielded"
    must be in that very report, or the driver never learns that the loop stopped early."""
    import ray.train

    from ray_layer import user_loop

    reports = []
    monkeypatch.setattr(ray.train, "report", lambda metrics, checkpoint=None:
                        reports.append((metrics, checkpoint and checkpoint.path)))
    monkeypatch.setattr(ray.train, "get_context",
                        lambda: SimpleNamespace(get_world_rank=lambda: 0))
    watch = FakeWatch(None, "preempt: by an operator")
    monkeypatch.setattr(user_loop, "_watch", watch)
    monkeypatch.setattr(user_loop, "_pending", None)

    def loop(config):
        for step in range(config["steps"]):
            user_loop.report({"step": step}, checkpoint=saved(f"ckpt-{step}") if step % 3 == 2 else None)

    user_loop.yielding(loop)({"steps": 10})  # ends normally at the yield
    assert reports == [({"step": 0}, None),
                       ({"step": 1}, None),  # told to yield here: no checkpoint, keep going
                       ({"step": 2, "yielded": "preempt: by an operator"}, "ckpt-2")]
    assert watch.checkpoints == 1


class TwoRanks:
    """torch.distributed as worker `rank` of two sees it, the other worker's side of each
    collective given by `peer(call)` (call: 0, 1, ... per collective)."""

    def __init__(self, peer, rank=0):
        self.peer, self.rank, self.calls = peer, rank, 0

    def is_available(self):
        return True

    def is_initialized(self):
        return True

    def get_world_size(self):
        return 2

    def all_gather_object(self, out, mine):
        out[self.rank], out[1 - self.rank] = mine, self.peer(self.calls)
        self.calls += 1


def test_a_yield_rides_on_a_checkpoint_that_only_another_rank_passes(monkeypatch):
    """A loop whose rank 1 saved the checkpoints (rank 0 passing none) never yielded: rank 0
    waited for a checkpoint of its own, and the scheduler's preemption waited for good. Ray
    Train keeps a checkpoint whichever rank passes it, with rank 0's metrics."""
    import ray.train

    from ray_layer import user_loop

    reports = []
    monkeypatch.setattr(ray.train, "report", lambda metrics, checkpoint=None:
                        reports.append((metrics, checkpoint and checkpoint.path)))
    monkeypatch.setattr(ray.train, "get_context",
                        lambda: SimpleNamespace(get_world_rank=lambda: 0))
    watch = FakeWatch("preempt: by an operator")
    monkeypatch.setattr(user_loop, "_watch", watch)
    monkeypatch.setattr(user_loop, "_pending", None)
    # rank 1 passes a checkpoint at reports 2 and 5
    monkeypatch.setattr(user_loop, "dist", TwoRanks(lambda call: (None, call in (2, 5))))

    def loop(config):
        for step in range(config["steps"]):
            user_loop.report({"step": step})

    user_loop.yielding(loop)({"steps": 10})
    assert reports == [({"step": 0}, None), ({"step": 1}, None),
                       ({"step": 2, "yielded": "preempt: by an operator"}, None)]
    assert watch.checkpoints == 1  # the scheduler hears of the checkpoint (work at risk)
    # Rank 1's side: it passes the checkpoint, rank 0 holds the directive; both stop there.
    reports.clear()
    monkeypatch.setattr(ray.train, "get_context",
                        lambda: SimpleNamespace(get_world_rank=lambda: 1))
    monkeypatch.setattr(user_loop, "dist",
                        TwoRanks(lambda call: ("preempt: by an operator", False), rank=1))
    user_loop.yielding(lambda: [user_loop.report({"step": s}, checkpoint=saved("c"))
                                for s in range(3)])({})
    assert reports == [({"step": 0, "yielded": "preempt: by an operator"}, "c")]


def test_a_report_that_another_rank_never_makes_fails_at_once_naming_that_rank(monkeypatch):
    """Two workers, only rank 0 calling report: rank 0 waited in the agreement gather for
    gloo's 30-minute timeout, with no message. A rank that returns from the loop says so
    into that gather, and the report fails naming it."""
    import ray.train

    from ray_layer import user_loop

    reports = _rank0_reports(monkeypatch)

    def loop():
        for step in range(3):
            user_loop.report({"step": step})

    # Rank 1's loop reports nothing: its return is said into the gather rank 0 is in.
    monkeypatch.setattr(ray.train, "get_context",
                        lambda: SimpleNamespace(get_world_rank=lambda: 1))
    rank_one = TwoRanks(lambda call: (None, False), rank=1)  # rank 0 in its first report
    monkeypatch.setattr(user_loop, "dist", rank_one)
    sent = []
    real = user_loop._gathered
    monkeypatch.setattr(user_loop, "_gathered", lambda mine: sent.append(mine) or real(mine))
    user_loop.yielding(lambda: None)({})  # rank 1 itself returns normally
    assert sent == [(user_loop._RETURNED, 0)] and rank_one.calls == 1
    # Rank 0's first report gets that: it fails at once, naming rank 1.
    monkeypatch.setattr(ray.train, "get_context",
                        lambda: SimpleNamespace(get_world_rank=lambda: 0))
    monkeypatch.setattr(user_loop, "dist", TwoRanks(lambda call: sent[0]))
    with pytest.raises(RuntimeError, match=r"launch.report at step 0 \(this rank's report 1\): "
                       r"worker rank\(s\) 1 had already returned from the training loop, "
                       r"after 0 report\(s\): every rank must call launch.report the same "
                       r"number of times"):
        user_loop.yielding(loop)({})
    assert reports == []
    # Rank 1 reported twice, then returned: rank 0's third report fails.
    monkeypatch.setattr(user_loop, "dist", TwoRanks(
        lambda call: (None, False) if call < 2 else (user_loop._RETURNED, 2)))
    with pytest.raises(RuntimeError, match=r"at step 2 \(this rank's report 3\): worker "
                       r"rank\(s\) 1 had already returned .* after 2 report"):
        user_loop.yielding(loop)({})
    assert reports == [0, 1]
    # Both report three times and return: nothing said, one gather per report and the end.
    reports.clear()
    both = TwoRanks(lambda call: (None, False) if call < 3 else (user_loop._RETURNED, 3))
    monkeypatch.setattr(user_loop, "dist", both)
    user_loop.yielding(loop)({})
    assert reports == [0, 1, 2] and both.calls == 4


def test_a_report_refused_ends_every_rank_without_a_restart_and_rank_0_returns_why(
        monkeypatch):
    """launch.report's own refusal (a tensor metric) raised on the worker: Ray Train
    restarted the loop max_failures times, each try failing the same report. The loop now
    ends on every rank at that report, and rank 0 returns the refusal for the driver."""
    import ray.train

    from ray_layer import user_loop

    reports = []
    monkeypatch.setattr(ray.train, "report", lambda metrics, checkpoint=None:
                        reports.append(metrics["step"]))
    monkeypatch.setattr(user_loop, "_watch", FakeWatch())
    monkeypatch.setattr(user_loop, "_pending", None)

    def loop():
        for step in range(3):
            loss = torch.tensor(2.5)
            user_loop.report({"step": step, "loss": loss if step == 1 else loss.item()})

    # Rank 1 refuses at its second report and says so into the gather rank 0 is in.
    monkeypatch.setattr(ray.train, "get_context",
                        lambda: SimpleNamespace(get_world_rank=lambda: 1))
    sent = []
    rank_one = TwoRanks(lambda call: (None, False), rank=1)
    monkeypatch.setattr(user_loop, "dist", rank_one)
    real = user_loop._gathered
    monkeypatch.setattr(user_loop, "_gathered", lambda mine: sent.append(mine) or real(mine))
    assert user_loop.yielding(loop)({}) is None  # returned, not raised: no restart
    said = sent[-1][1]
    assert sent[-1][0] == user_loop._REFUSED and rank_one.calls == 2
    assert said.startswith("worker rank 1: TypeError: launch.report: metrics['loss'] is a "
                           "torch tensor (tensor(2.5000))")
    assert said.endswith("(test_job_file.py line " + said.rsplit("line ", 1)[1])
    # Rank 0 hears it in its second report's gather: it ends there too, returning it.
    reports.clear()
    monkeypatch.setattr(ray.train, "get_context",
                        lambda: SimpleNamespace(get_world_rank=lambda: 0))
    heard = sent[-1]
    monkeypatch.setattr(user_loop, "dist",
                        TwoRanks(lambda call: (None, False) if call < 1 else heard))
    sent.clear()
    fine = lambda: [user_loop.report({"step": s}) for s in range(3)]  # noqa: E731
    assert user_loop.yielding(fine)({}) == {user_loop.REPORT_REFUSED: said}
    assert reports == [0] and len(sent) == 2  # no announcement of its own after it
    # One worker alone: its own refusal comes back.
    monkeypatch.setattr(user_loop, "dist", SimpleNamespace(is_available=lambda: False))
    refused = user_loop.yielding(loop)({})[user_loop.REPORT_REFUSED]
    assert refused.startswith("worker rank 0: TypeError: launch.report: metrics['loss'] is")


def test_a_returned_ranks_announcement_that_fails_costs_nothing_but_a_warning(monkeypatch,
                                                                             capsys):
    """The announcement waits for the other ranks: one whose work after its last report
    outlasts the process group's timeout (a long export on rank 0) made it raise, and a loop
    that had finished failed the run."""
    import ray.train

    from ray_layer import user_loop

    monkeypatch.setattr(ray.train, "get_context",
                        lambda: SimpleNamespace(get_world_rank=lambda: 1))

    def timed_out(call):
        raise RuntimeError("[gloo] Timed out waiting 1800000ms for recv operation")

    monkeypatch.setattr(user_loop, "dist", TwoRanks(timed_out, rank=1))
    assert user_loop.yielding(lambda: 7)({}) is None  # (rank 1: rank 0's value is the result)
    assert "telling the other ranks failed (RuntimeError: [gloo] Timed out" in \
        capsys.readouterr().err


def test_a_loops_own_except_exception_does_not_swallow_a_yield(monkeypatch):
    from ray_layer import user_loop

    reports = _rank0_reports(monkeypatch, "cancel: by an operator")

    def loop():
        for step in range(5):
            try:  # a loop that logs a failed step and goes on
                user_loop.report({"step": step}, checkpoint=saved("c"))
            except Exception:
                pass

    user_loop.yielding(loop)({})
    assert reports == [0]  # stopped at the first checkpointed report after the directive


def test_a_loops_own_except_exception_does_not_swallow_a_refused_report(monkeypatch):
    """A loop logging a failed step and going on (`except Exception:` around it) swallowed
    launch.report's refusal: the run trained on to its end, that report lost, and
    succeeded. The refusal ends the loop at that report on every rank, as unswallowed."""
    from ray_layer import user_loop

    reports = _rank0_reports(monkeypatch)

    def loop():
        for step in range(3):
            try:
                loss = torch.tensor(2.5)
                user_loop.report({"step": step, "loss": loss if step == 1 else loss.item()})
            except Exception:
                pass

    # One worker alone: its own refusal, at its second report, fails the run.
    monkeypatch.setattr(user_loop, "dist", SimpleNamespace(is_available=lambda: False))
    refused = user_loop.yielding(loop)({})[user_loop.REPORT_REFUSED]
    assert refused.startswith("worker rank 0: TypeError: launch.report: metrics['loss'] is a "
                              "torch tensor (tensor(2.5000))")
    assert reports == [0]
    # Rank 0 of two hears rank 1's refusal in its second report's gather: it ends there too.
    reports.clear()
    heard = (user_loop._REFUSED, "worker rank 1: TypeError: launch.report: ...")
    monkeypatch.setattr(user_loop, "dist",
                        TwoRanks(lambda call: (None, False) if call < 1 else heard))
    fine = lambda: [_swallowing(user_loop.report, {"step": s}) for s in range(3)]  # noqa: E731
    assert user_loop.yielding(fine)({}) == {user_loop.REPORT_REFUSED: heard[1]}
    assert reports == [0]


def _swallowing(call, *args):
    """`call(*args)` as a loop that logs a failed step and goes on runs it."""
    try:
        call(*args)
    except Exception:
        pass


def test_a_loop_taking_nothing_runs_and_without_a_directive_never_yields(monkeypatch):
    import ray.train

    from ray_layer import user_loop

    reports = []
    monkeypatch.setattr(ray.train, "report", lambda metrics, checkpoint=None:
                        reports.append((metrics, checkpoint and checkpoint.path)))
    monkeypatch.setattr(ray.train, "get_context",
                        lambda: SimpleNamespace(get_world_rank=lambda: 0))
    monkeypatch.setattr(user_loop, "_watch", FakeWatch())
    monkeypatch.setattr(user_loop, "_pending", None)
    user_loop.yielding(lambda: [user_loop.report({"step": s}, checkpoint=saved("c")) for s in range(3)])(
        {"ignored": True})
    assert reports == [({"step": s}, "c") for s in range(3)]
    # Ray Train calls the function it runs with the config only when it counts a required
    # parameter, through __wrapped__: the wrapper must show its own, whatever the loop takes.
    from ray.train._internal.utils import count_required_parameters

    def optional(config=None):
        pass
    assert [count_required_parameters(user_loop.yielding(f)) for f in (lambda: None, optional)
            ] == [1, 1]


# --- python -m orchestrator submit, on bad input ---------------------------------------------

def submit(*args, tmp_path):
    # An unreachable RAY_ADDRESS: should a check ever let bad input through, the command
    # fails on connecting (with another message) instead of starting an embedded Ray.
    env = {"ORCHESTRATOR_RUNS_DIR": str(tmp_path / "runs"), "PATH": "/usr/bin:/bin",
           "HOME": str(tmp_path), "RAY_ADDRESS": "127.0.0.1:9"}
    return subprocess.run([sys.executable, "-m", "orchestrator", "submit", *map(str, args)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)


@pytest.mark.parametrize("job, files, expected", [
    ("name: a\nnum_worker: 2\nentrypoint: train.py:train_loop\n", {},
     "'num_worker' (did you mean 'num_workers'?)"),
    ("name: a\nmax_failures: -2\nentrypoint: train.py:train_loop\n", {},
     "max_failures must be an integer >= 0, got -2"),
    ("name: a\nnum_workers: 2\n", {}, "entrypoint is missing"),
    ("name: a\nentrypoint: missing.py:train_loop\n", {},
     "entrypoint script 'missing.py' not found"),
    ("name: a\nentrypoint: train.py:train_loop\n",
     {"train.py": "raise ImportError('needs pandas>=9')\n"},
     "failed to import: ImportError: needs pandas>=9"),
    ("name: a\nentrypoint: train.py:train_lop\n", {"train.py": "def train_loop(c): pass\n"},
     "has no function 'train_lop'"),
    ("name: a\nentrypoint: train.py:train_loop\n", {"train.py": "def train_loop(a, b): pass\n"},
     "needs more than one argument"),
    ("name: a\nentrypoint: train.py:train_loop\nrun_dir: /tmp/elsewhere\n",
     {"train.py": "def train_loop(): pass\n"}, "must end in the job's name 'a'"),
    ("- a list\n", {}, "a job file is a mapping of fields"),
    ("name: a\nnum_workers: [1,\n", {}, "not valid YAML: expected the node content, but "
                                         "found '<stream end>' at line 3, column 1"),
    ("name: a\nnum_workers: 8\nentrypoint: train.py:train_loop\nnum_workers: 1\n", {},
     "found key 'num_workers' twice (a second one would silently win) at line 4"),
    ("name: a\nnum_worker: 2\ncpus_per_worker: -1\n", {},  # a typo and a bad value at once
     "'num_worker' (did you mean 'num_workers'?)"),
])
def test_submit_of_bad_input_exits_2_naming_the_problem(tmp_path, job, files, expected):
    folder = tmp_path / "job"
    for name, text in files.items():
        write(folder / name, text)
    path = write(folder / "job.yaml", job)
    result = submit(path, tmp_path=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
def test_an_entry_point_that_does_not_load_is_named_with_the_job_file(tmp_path, monkeypatch,
                                                                      capsys, dry_run):
    # Every other job-file error starts with the file's path; the entry point's did not.
    from orchestrator.__main__ import main

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")  # (should it get that far: no Ray)
    path = write(tmp_path / "job" / "job.yaml", "name: a\nentrypoint: missing.py:loop\n")
    assert main(["submit", str(path), *dry_run]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: entrypoint script 'missing.py' not found"), err


def test_yaml_merge_keys_still_work_and_a_key_written_twice_is_refused(tmp_path):
    # The duplicate-key check first built every key itself, so `<<: *defaults` failed with
    # "could not determine a constructor for the tag ...merge".
    path = write(tmp_path / "job.yaml", """\
        defaults: &defaults {num_workers: 2, cpus_per_worker: 1}
        name: a
        <<: *defaults
        num_workers: 3
        """)
    with pytest.raises(ConfigError, match="unknown field.*'defaults'"):
        load_job_file(path)  # (an anchor needs a home: here an unknown key, as meant)
    path = write(tmp_path / "job.yaml", """\
        name: a
        <<: {num_workers: 2, cpus_per_worker: 1}
        num_workers: 3
        """)
    job = load_job_file(path)
    assert (job.spec.num_workers, job.spec.cpus_per_worker) == (3, 1)  # written here wins


def test_numbers_in_exponent_form_are_numbers_as_yaml_1_2_reads_them(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-3 and 1.8e3 as strings: the loop got lr='1e-3', and
    # `expected_duration_s: 1e4` was refused as "must be a number".
    path = write(tmp_path / "job.yaml", """\
        name: a
        expected_duration_s: 1e4
        min_bandwidth_gbps: 1.25E+1
        config: {lr: 1e-3, wd: 3e-4, scale: 1.8e3, neg: -2E5, dot: .5e1,
                 steps: 100, big: 1_000, hex: 0x10, quoted: "1e-3", plain: 1e, word: e5,
                 ver: 1.2.3}
        """)
    job = load_job_file(path)
    assert job.spec.expected_duration_s == 1e4 and job.spec.min_bandwidth_gbps == 12.5
    assert job.config == {"lr": 1e-3, "wd": 3e-4, "scale": 1800.0, "neg": -2e5, "dot": 5.0,
                          "steps": 100, "big": 1000, "hex": 16, "quoted": "1e-3",
                          "plain": "1e", "word": "e5", "ver": "1.2.3"}
    assert all(type(job.config[k]) is float for k in ("lr", "wd", "scale", "neg", "dot"))
    assert all(type(job.config[k]) is int for k in ("steps", "big", "hex"))


def test_an_anchor_read_as_text_under_env_vars_stays_a_value_elsewhere(tmp_path):
    # The retagging changed the anchored node itself: config's use_amp became the truthy
    # 'false', epochs '3', and num_workers '4' was refused.
    path = write(tmp_path / "job.yaml", """\
        name: ws
        entrypoint: train.py:train_loop
        num_workers: &nw 4
        config: {use_amp: &amp false, epochs: &ep 3, lr: &lr 0.001}
        runtime_env: {env_vars: {USE_AMP: *amp, EPOCHS: *ep, WORLD_SIZE: *nw, LR: *lr}}
        """)
    job = load_job_file(path)
    assert job.config == {"use_amp": False, "epochs": 3, "lr": 0.001}
    assert job.spec.num_workers == 4
    assert job.runtime_env["env_vars"] == {"USE_AMP": "false", "EPOCHS": "3",
                                           "WORLD_SIZE": "4", "LR": "0.001"}


def test_a_field_that_takes_a_string_gets_the_text_written_not_a_number(tmp_path):
    # The exponent floats applied to the whole file: `GIT_SHA: 8e91234` reached Ray as inf,
    # `NCCL_TIMEOUT_SCALE: 1e3` as 1000.0 (Ray refuses both: env_vars are strings), `name:
    # 1e3` was refused, and a config value like a commit hash became inf.
    path = write(tmp_path / "job.yaml", """\
        name: envjob
        entrypoint: train.py:train_loop
        num_workers: 1
        config: {build: 20240101e1}
        runtime_env:
          env_vars: {NCCL_TIMEOUT_SCALE: 1e3, GIT_SHA: 8e91234}
        """)  # the review's job_env.yaml
    job = load_job_file(path)
    assert job.runtime_env == {"env_vars": {"NCCL_TIMEOUT_SCALE": "1e3", "GIT_SHA": "8e91234"}}
    assert job.config == {"build": 202401010.0}  # a number where one fits (docs/training.md)
    path = write(tmp_path / "job.yaml", """\
        name: 1e3
        <<: {workload: 2.5}
        entrypoint: 1e5
        run_dir: 1e3
        expected_duration_s: 1e4
        config: {sha: 8e91234, big: -1E999, lr: 1e-3, inf: .inf, steps: 10}
        runtime_env:
          working_dir: 1e2
          env_vars: {OMP_NUM_THREADS: 1, RATIO: 0.5, DEBUG: true, 1e3: x, EMPTY: null}
        """)
    job = load_job_file(path)
    assert (job.spec.name, job.spec.workload, job.entrypoint) == ("1e3", "2.5", "1e5")
    assert job.run_dir == str(tmp_path / "1e3") and job.spec.expected_duration_s == 1e4
    assert job.config == {"sha": "8e91234", "big": "-1E999", "lr": 1e-3, "inf": float("inf"),
                          "steps": 10}
    assert job.runtime_env == {"working_dir": str(tmp_path / "1e2"), "env_vars": {
        "OMP_NUM_THREADS": "1", "RATIO": "0.5", "DEBUG": "true", "1e3": "x", "EMPTY": None}}


def test_a_runtime_env_key_close_to_rays_is_warned_of_not_refused():
    from ray_layer.cluster import runtime_env_problem, runtime_env_warnings

    assert runtime_env_problem({"workdir": "."}) is None  # a plugin may take any key
    assert runtime_env_warnings({"workdir": ".", "env_vars": {}}) == [
        "runtime_env: Ray does not know the key 'workdir' (did you mean 'working_dir'?); it "
        "is ignored unless a plugin takes it"]


def test_a_runtime_env_field_ray_job_submit_also_gives_is_refused_naming_it(monkeypatch,
                                                                             tmp_path):
    """`ray job submit --working-dir . -- python -m orchestrator submit job.yaml` with the job
    file's `runtime_env: {working_dir: .}`: Ray refused the merge in ray.init, read as "cannot
    start or connect to Ray", and a dry run (connecting without it) said placeable."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    from ray_layer.cluster import submitted_runtime_env_conflict

    submitted = {RAY_JOB_CONFIG_JSON_ENV_VAR: json.dumps({"runtime_env": {
        "working_dir": "gcs://_ray_pkg_abc.zip", "env_vars": {"A": "1"}}})}
    assert submitted_runtime_env_conflict({"pip": ["pandas"], "env_vars": {"B": "2"}},
                                          submitted) is None
    problem = submitted_runtime_env_conflict({"working_dir": ".", "env_vars": {"A": "2"}},
                                             submitted)
    assert problem.startswith("runtime_env: working_dir, env_vars.A also given by `ray job "
                              "submit`"), problem
    assert submitted_runtime_env_conflict({"working_dir": "."}, {
        **submitted, "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}) is None
    assert submitted_runtime_env_conflict({"working_dir": "."}, {}) is None  # not submitted
    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, submitted[RAY_JOB_CONFIG_JSON_ENV_VAR])
    monkeypatch.setattr(launch, "DEFAULT_RUNS_ROOT", tmp_path)
    with pytest.raises(JobFailed, match="working_dir also given by `ray job submit`") as e:
        launch.prepare_fit(lambda: None, spec=JobSpec("alpha"), config=None, run_dir=None,
                           resume=None, queue_timeout_s=0.0, max_failures=0,
                           runtime_env={"working_dir": str(tmp_path)})
    assert e.value.exit_code == EXIT_BAD_INPUT


def test_a_run_dir_that_cannot_be_written_is_refused_before_placing(tmp_path):
    # Ray Train found it only once the job was placed: "training failed after 3 restart(s)".
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match=f"cannot write to run_dir {tmp_path}/afile/alpha: "):
        launch.resolve_fit_run_dir(JobSpec("alpha"), tmp_path / "afile" / "alpha", False)


# (A dry run checked the job file and the entry point only, and said "placeable" (exit 0) for
# jobs submit then refused.) The last case runs as the command itself; the others in this
# process, through the same main(): a subprocess importing torch and Ray afresh took 3-5 s each.
DRY_RUN_REFUSALS = [
    ("name: a/b\nentrypoint: train.py:train_loop\n", {},
     "name 'a/b' must not contain a path separator"),
    ("name: a\nentrypoint: train.py:train_loop\nruntime_env: {env_vars: {OMP_NUM_THREADS: [1]}}\n",
     {}, "values are strings"),
    ("name: a\nentrypoint: train.py:train_loop\nrun_dir: afile/a\n", {"afile": "x"},
     "cannot write to run_dir"),
    ("name: a\nentrypoint: train.py:train_loop\n",
     {"train.py": "import threading\nLOCK = threading.Lock()\n"
                  "def train_loop(config):\n    with LOCK:\n        pass\n"},
     "cannot be sent to the workers"),
]


def dry_run_job(folder: Path, job: str, files: dict[str, str]) -> Path:
    """A job file `job` in `folder` beside `files` (a train.py with a plain loop by default)."""
    for name, text in {"train.py": "def train_loop(config):\n    pass\n", **files}.items():
        write(folder / name, text)
    return write(folder / "job.yaml", job)


@pytest.mark.parametrize("job, files, expected", DRY_RUN_REFUSALS[:-1])
def test_a_dry_run_refuses_what_submit_would(tmp_path, monkeypatch, capsys, job, files,
                                             expected):
    from orchestrator.__main__ import main

    # As submit() below runs the command: should a check let the job through, no Ray.
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")
    monkeypatch.setattr(launch, "DEFAULT_RUNS_ROOT", tmp_path / "runs")
    monkeypatch.chdir(tmp_path)
    assert main(["submit", str(dry_run_job(tmp_path / "job", job, files)), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err, err


def test_a_dry_run_refusal_of_the_command_itself_is_exit_2(tmp_path):
    job, files, expected = DRY_RUN_REFUSALS[-1]
    result = submit(dry_run_job(tmp_path / "job", job, files), "--dry-run", tmp_path=tmp_path)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_a_dry_run_of_a_run_with_checkpoints_says_submit_needs_resume(tmp_path, monkeypatch,
                                                                     capsys):
    from orchestrator.__main__ import main
    from orchestrator.placement import Rejection
    from ray_layer import launch as ray_launch

    monkeypatch.setattr(launch, "DEFAULT_RUNS_ROOT", tmp_path / "runs")
    (tmp_path / "runs" / "a" / "checkpoint_2026-12-05_18-51-01").mkdir(parents=True)
    write(tmp_path / "train.py", "def train_loop(config):\n    pass\n")
    job = write(tmp_path / "job.yaml", "name: a\nentrypoint: train.py:train_loop\n")
    monkeypatch.setattr(ray_launch, "dry_run_placement", lambda spec, address: Rejection(
        spec.name, "no cluster in this test"))
    assert main(["submit", str(job), "--dry-run"]) == 3  # not placeable (the stub), not refused
    out, err = capsys.readouterr()
    assert "no cluster in this test" in out
    assert f"note: run_dir {tmp_path}/runs/a holds checkpoints: submit it with --resume" in err


def test_a_dry_run_checks_the_entry_point_as_submit_does(tmp_path):
    # Before connecting (RAY_ADDRESS is unreachable here): it used to read the spec alone.
    path = write(tmp_path / "job" / "job.yaml", "name: a\nentrypoint: missing.py:loop\n")
    result = submit(path, "--dry-run", tmp_path=tmp_path)
    assert result.returncode == 2
    assert "entrypoint script 'missing.py' not found" in result.stderr


def test_cluster_commands_without_a_cluster_exit_2_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "orchestrator", "status", "--address",
                             "127.0.0.1:9"], capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert result.returncode == 2  # was 1, a code the docs give no meaning
    assert result.stderr.count("\n") == 1 and "cannot reach a Ray cluster at 127.0.0.1:9" \
        in result.stderr


def test_logs_follow_waits_for_a_run_directory_not_made_yet(tmp_path, monkeypatch, capsys):
    from orchestrator import __main__ as cli

    run_dir = tmp_path / "alpha"
    sleeps = []

    def sleep(seconds):  # the job's first report lands during the first wait
        sleeps.append(seconds)
        if len(sleeps) == 1:
            run_dir.mkdir()
            (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 5, "loss": 2.0}) + "\n")
        else:
            raise KeyboardInterrupt  # Ctrl-C
    monkeypatch.setattr(cli.time, "sleep", sleep)
    assert cli.print_logs("alpha", str(run_dir), follow=True) == 0
    out = capsys.readouterr()
    assert "waiting for" in out.err and "step 5: loss=2" in out.out
    assert cli.print_logs("alpha", str(tmp_path / "beta"), follow=False) == 2
    capsys.readouterr()
    assert cli.print_logs("alpha", "~nosuchuser-s55/alpha", follow=True) == 2  # not a traceback
    assert "--run-dir '~nosuchuser-s55/alpha': ~nosuchuser-s55 is the home directory of no " \
           "user" in capsys.readouterr().err


def test_logs_follow_starts_again_when_the_run_is_started_afresh(tmp_path, monkeypatch,
                                                                capsys):
    # The cursor was a line count: after the run dir was removed and a new run wrote its
    # first reports, nothing more was shown.
    from orchestrator import __main__ as cli

    run_dir = tmp_path / "alpha"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(
        json.dumps({"step": step, "loss": 3.0}) + "\n" for step in (1, 2, 3)))
    sleeps = []

    def sleep(seconds):
        sleeps.append(seconds)
        if len(sleeps) == 1:  # removed and started again: one report so far
            (run_dir / "metrics.jsonl").unlink()
            (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")
        else:
            raise KeyboardInterrupt
    monkeypatch.setattr(cli.time, "sleep", sleep)
    assert cli.print_logs("alpha", str(run_dir), follow=True) == 0
    out = capsys.readouterr()
    assert "step 1: loss=9" in out.out, out.out
    assert "was removed or replaced" in out.err


def test_logs_follow_reads_only_what_was_appended_since_its_last_look(tmp_path, monkeypatch,
                                                                     capsys):
    # Every second --follow read and parsed the whole metrics.jsonl again to print its new
    # lines: a run of 300,000 reports cost ~1 s of CPU a poll, for ever. A report written in
    # two pieces (seen torn, then whole) is shown once, whole.
    from orchestrator import __main__ as cli
    from orchestrator import runs

    log = tmp_path / "alpha" / "metrics.jsonl"
    log.parent.mkdir()
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1000)))
    parsed = []
    loads = runs.json.loads
    monkeypatch.setattr(runs.json, "loads", lambda text: parsed.append(text) or loads(text))
    sleeps = []

    def sleep(seconds):
        sleeps.append(seconds)
        with open(log, "a") as f:
            if len(sleeps) == 1:
                f.write('{"step": 1000, "lo')  # mid-write
            elif len(sleeps) == 2:
                f.write('ss": 2.0}\n{"step": 1001, "loss": 3.0}\n')
            else:
                raise KeyboardInterrupt
    monkeypatch.setattr(cli.time, "sleep", sleep)
    assert cli.print_logs("alpha", str(log.parent), follow=True) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":", 3)[-1] for line in out[-3:]] == [" loss=1", " loss=2", " loss=3"]
    assert len(out) == 1002 and len(parsed) < 1010, len(parsed)


def test_logs_of_a_name_no_job_can_have_is_refused_not_an_empty_listing(tmp_path, monkeypatch,
                                                                        capsys):
    # `logs ""`, `logs .` and `logs ..` read the runs root itself (or its parent) as a run
    # directory: nothing printed, exit 0, as for a run with no reports yet; `logs a/b`
    # another folder's metrics.jsonl.
    from orchestrator import __main__ as cli

    monkeypatch.setattr(cli, "DEFAULT_RUNS_ROOT", tmp_path / "runs")
    (tmp_path / "runs" / "a" / "b").mkdir(parents=True)
    for name, problem in (("", "is empty"), (".", "is not a directory name"),
                          ("..", "is not a directory name"),
                          ("a/b", "must not contain a path separator")):
        assert cli.print_logs(name, None, follow=False) == EXIT_BAD_INPUT
        err = capsys.readouterr().err
        assert err.startswith(f"error: job name {name!r} {problem}"), err
        assert err.count("\n") == 1
    assert cli.print_logs("..", str(tmp_path / "runs" / "a"), follow=False) == 0  # --run-dir's
    # `--run-dir "$DIR"` with DIR unset read the runs root's run of that name instead
    (tmp_path / "runs" / "b").mkdir()
    for empty in ("", "  "):
        assert cli.print_logs("b", empty, follow=False) == EXIT_BAD_INPUT
        assert capsys.readouterr().err.startswith("error: --run-dir is empty: give the run's "
                                                  "directory, or leave it out")


def test_logs_skip_lines_that_are_not_reports(tmp_path, capsys):
    from orchestrator import __main__ as cli

    (tmp_path / "alpha").mkdir()
    (tmp_path / "alpha" / "metrics.jsonl").write_text(
        '[1, 2]\n{"step": 1, "time": 1e300, "loss": 2.0}\n{"step": 2, "time": "noon"}\n')
    assert cli.print_logs("alpha", str(tmp_path / "alpha"), follow=False) == 0
    out = capsys.readouterr().out
    assert "--:--:-- step 1: loss=2" in out and "--:--:-- step 2" in out
    # Times a report carries (started_at, restored_at, ...) read as clock times.
    from orchestrator.__main__ import format_report

    line = format_report({"step": 3, "time": 0.0, "started_at": 3600.0 * 7})
    assert "started_at=" + time.strftime("%H:%M:%S", time.localtime(3600.0 * 7)) in line


def test_logs_of_a_metrics_log_that_cannot_be_read_is_an_error_line_not_a_traceback(
        tmp_path, capsys):
    # A metrics.jsonl that cannot be opened (another user's run dir on shared storage: no
    # read permission; here a folder in its place) ended `logs` with a traceback, exit 1.
    from orchestrator import __main__ as cli

    (tmp_path / "alpha" / "metrics.jsonl").mkdir(parents=True)
    assert cli.print_logs("alpha", str(tmp_path / "alpha"), follow=False) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot read {tmp_path / 'alpha' / 'metrics.jsonl'}: ")
    assert err.count("\n") == 1


def test_submit_of_a_used_run_dir_without_resume_exits_2(tmp_path):
    folder = tmp_path / "job"
    write(folder / "train.py", "def train_loop(config): pass\n")
    (tmp_path / "runs" / "used" / "checkpoint_2026-12-02_10-00-00.000000").mkdir(parents=True)
    result = submit(write(folder / "job.yaml", "name: used\nentrypoint: train.py:train_loop\n"),
                    tmp_path=tmp_path)
    assert result.returncode == 2
    assert f"run_dir {tmp_path / 'runs' / 'used'} already holds checkpoints of a run" \
        in result.stderr


def test_submit_of_a_missing_job_file_exits_2(tmp_path):
    result = submit(tmp_path / "absent.yaml", tmp_path=tmp_path)
    assert result.returncode == 2
    assert f"error: {tmp_path / 'absent.yaml'}: cannot read" in result.stderr


def test_logs_of_a_run_that_is_not_there_exits_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "orchestrator", "logs", "ghost", "--run-dir",
                             str(tmp_path / "ghost")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert f"error: no run directory {tmp_path / 'ghost'}" in result.stderr


def test_logs_of_a_missing_run_dir_given_by_flag_does_not_ask_for_the_flag(
        tmp_path, monkeypatch, capsys):
    # "(pass --run-dir if the job set run_dir)", to someone who had passed it.
    from orchestrator import __main__ as cli

    ghost = tmp_path / "ghost"
    assert cli.print_logs("ghost", str(ghost), follow=False) == 2
    err = capsys.readouterr().err
    assert err == f"error: no run directory {ghost}\n"

    def interrupted(seconds):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli.time, "sleep", interrupted)
    assert cli.print_logs("ghost", str(ghost), follow=True) == 0
    err = capsys.readouterr().err
    assert f"waiting for {ghost}" in err and "--run-dir" not in err
    monkeypatch.setattr(cli, "DEFAULT_RUNS_ROOT", tmp_path)  # the name's: the hint is due
    assert cli.print_logs("ghost", None, follow=False) == 2
    assert "(pass --run-dir if the job set run_dir)" in capsys.readouterr().err


def test_a_run_resumed_after_a_yield_that_saves_no_checkpoint_since_is_done(monkeypatch):
    """Ray Train's result keeps the metrics of the latest checkpoint's report: a loop resumed
    after its yield that reports no newer checkpoint still shows "yielded". The driver must
    take the run as finished, not yield (and rerun the same steps) for ever."""
    import ray

    from orchestrator.placement import Placement
    from ray_layer import placed_run

    placement = Placement("yl", ("n1",), 1.0, 0)
    remote = lambda value: SimpleNamespace(remote=lambda *args: value)  # noqa: E731
    scheduler = SimpleNamespace(submit=remote(placement), yielded=remote(placement))
    monkeypatch.setattr(ray, "get", lambda value, timeout=None: value)
    monkeypatch.setattr(placed_run, "driver_id", lambda: "driver")

    def result(step, checkpoint, yielded="preempt: by an operator"):
        return SimpleNamespace(metrics={"step": step, "yielded": yielded},
                               checkpoint=SimpleNamespace(path=checkpoint))
    fits = [result(7, "/run/checkpoint_7"),  # told to yield: stops at its step-7 checkpoint
            result(7, "/run/checkpoint_7"),  # resumed, ran to its end, no checkpoint since
            ]
    driver = placed_run.PlacedRun(scheduler, JobSpec("yl"), 60.0, say=lambda line: None)
    final, _ = driver.run(lambda placement: fits.pop(0))
    assert not fits and len(driver.yields) == 1 and final.metrics["step"] == 7
    # A second yield, from a newer checkpoint, is one.
    fits[:] = [result(3, "/run/checkpoint_3"), result(6, "/run/checkpoint_6"),
               result(9, "/run/checkpoint_9", yielded=None)]
    driver = placed_run.PlacedRun(scheduler, JobSpec("yl"), 60.0, say=lambda line: None)
    assert driver.run(lambda placement: fits.pop(0))[0].metrics["step"] == 9
    assert len(driver.yields) == 2


def test_a_helper_named_like_a_folder_of_the_working_directory_still_travels(tmp_path,
                                                                               monkeypatch):
    """`submit` from a folder holding `data/` (a namespace package to Python): the script's
    own data.py counted as "installed", did not travel, and the workers imported the folder
    (AttributeError: module 'data' has no attribute 'rows')."""
    import torch  # noqa: F401 (see test_a_script_imports_the_files_beside_it...)
    from orchestrator.entrypoints import local_modules

    monkeypatch.setattr(sys, "modules", dict(sys.modules))
    (tmp_path / "data_q4").mkdir()  # the working directory's folder of that name
    write(tmp_path / "job" / "data_q4.py", "def rows():\n    return 3\n")
    write(tmp_path / "job" / "train.py", "import data_q4\ndef train_loop():\n"
          "    return data_q4.rows()\n")
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])  # as `python -m` from there
    monkeypatch.chdir(tmp_path)
    entry = load_entrypoint("job/train.py:train_loop")
    assert entry.function() == 3
    assert [m.__name__ for m in local_modules(entry.module)] == ["data_q4"]


def test_a_loop_that_cannot_be_pickled_is_bad_input_naming_what_before_placing(tmp_path,
                                                                             monkeypatch):
    """It was placed, then failed as a training failure (exit 4) with Ray's 30-line dump.
    (A generator, not a lock: a process that ran Ray Serve's FastAPI ingress, as this test
    session may have, pickles locks as fresh ones.)"""
    monkeypatch.setattr(launch, "DEFAULT_RUNS_ROOT", tmp_path)
    rows = (i for i in range(3))

    def streaming_loop(config):
        return next(rows)

    with pytest.raises(JobFailed) as e:  # (Ray would refuse to start here: conftest.py)
        launch.fit(streaming_loop, spec=JobSpec("alpha"))
    assert e.value.exit_code == EXIT_BAD_INPUT
    assert "the training loop" in str(e.value) and \
        "streaming_loop cannot be sent to the workers" in str(e.value)
    assert "streaming_loop -> rows" in str(e.value) and "inside the loop" in str(e.value)


def test_a_loops_exception_that_cannot_be_pickled_still_names_itself():
    """Ray reported a failed worker health check instead of the user's error."""
    import ray.cloudpickle

    from ray_layer import user_loop

    class Unpicklable(Exception):
        def __init__(self, message):
            super().__init__(message)
            self.rows = (i for i in range(3))  # (see the test above: not a lock)

    def loop(config):
        raise Unpicklable("holding a generator")

    with pytest.raises(RuntimeError) as e:
        user_loop.yielding(loop)({})
    assert str(e.value).startswith(
        "test_a_loops_exception_that_cannot_be_pickled_still_names_itself.<locals>."
        "Unpicklable: holding a generator (the exception itself cannot be sent")
    ray.cloudpickle.loads(ray.cloudpickle.dumps(e.value))  # it reaches the driver

    class BadBatch(Exception):  # pickles, but cannot be rebuilt from its args
        def __init__(self, step, reason):
            super().__init__(f"step {step}: {reason}")

    def bad_batch(config):
        raise BadBatch(3, "nan")

    with pytest.raises(RuntimeError, match="BadBatch: step 3: nan .*cannot be sent"):
        user_loop.yielding(bad_batch)({})

    def chained(config):  # one that travels is left as it is, its cause with it
        try:
            raise KeyError("x")
        except KeyError as cause:
            raise ValueError("bad batch") from cause

    with pytest.raises(ValueError, match="bad batch") as e:
        user_loop.yielding(chained)({})
    assert isinstance(e.value.__cause__, KeyError)


def test_a_helper_the_loop_imports_only_when_it_runs_is_found_on_the_worker(tmp_path,
                                                                           monkeypatch):
    from ray_layer import user_loop

    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "modules", dict(sys.modules))
    write(tmp_path / "job" / "lazy_k2.py", "SIZE = 5\n")

    def loop(config):
        from lazy_k2 import SIZE
        return SIZE

    with pytest.raises(ModuleNotFoundError):
        user_loop.yielding(loop)({})
    user_loop.yielding(loop, (str(tmp_path / "job"),))({})  # as fit passes the script's folder
    assert sys.path[0] == str(tmp_path / "job")


def test_a_misspelt_launcher_key_gets_a_did_you_mean_too(tmp_path):
    path = write(tmp_path / "job.yaml", "name: a\nentry_point: m:f\nmax_failure: 2\n")
    with pytest.raises(ConfigError) as e:
        load_job_file(path)
    message = str(e.value)
    assert "'entry_point' (did you mean 'entrypoint'?)" in message
    assert "'max_failure' (did you mean 'max_failures'?)" in message
    assert "queue_timeout_s" in message.split("known fields:")[1]


def test_logs_read_by_a_reader_that_stops_early_end_quietly(tmp_path):
    # `logs NAME | head`: a BrokenPipeError traceback and exit 1
    run_dir = tmp_path / "runs" / "long"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(
        json.dumps({"step": i, "loss": 1.0}) + "\n" for i in range(20_000)))
    reader = subprocess.Popen([sys.executable, "-m", "orchestrator", "logs", "long"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "ORCHESTRATOR_RUNS_DIR": str(tmp_path / "runs")})
    assert reader.stdout.readline().strip().endswith("step 0: loss=1")
    reader.stdout.close()  # what `head` does once it has its lines
    assert reader.wait(timeout=60) == 0
    assert "Traceback" not in reader.stderr.read()


def test_a_job_larger_than_this_machine_is_refused_before_an_embedded_ray_starts(monkeypatch):
    # Refused only once Ray and the node agents had started, some seconds on.
    from orchestrator.job_exit import EXIT_NOT_PLACEABLE, JobFailed
    from orchestrator.launch import refuse_what_embedded_ray_cannot_hold

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    # (the whole suite runs this after the integration tier's Ray started in this process)
    ray_here = SimpleNamespace(initialized=False)
    monkeypatch.setitem(sys.modules, "ray", SimpleNamespace(
        is_initialized=lambda: ray_here.initialized))
    big = JobSpec("big", num_workers=3, cpus_per_worker=2)
    with pytest.raises(JobFailed) as refused:
        refuse_what_embedded_ray_cannot_hold(big, None)
    assert refused.value.exit_code == EXIT_NOT_PLACEABLE
    assert "3 worker(s) x 2 CPUs = 6 CPUs, and this machine has 4" in str(refused.value)
    refuse_what_embedded_ray_cannot_hold(JobSpec("fits", num_workers=2, cpus_per_worker=2), None)
    refuse_what_embedded_ray_cannot_hold(big, "10.0.0.1:6379")  # a cluster: its scheduler's
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    refuse_what_embedded_ray_cannot_hold(big, None)
    monkeypatch.delenv("RAY_ADDRESS")
    ray_here.initialized = True  # Ray started here already: its own cluster, not this machine
    refuse_what_embedded_ray_cannot_hold(big, None)


def test_a_helper_folder_without_init_travels_with_the_loop(tmp_path, monkeypatch):
    """`from nsmods.helper import f` where nsmods/ beside the script has no __init__.py (a
    namespace package: no __file__): it did not travel, every check passed, and the workers
    failed to unpickle the loop (ModuleNotFoundError) after the job was placed."""
    import torch  # noqa: F401 (see test_a_script_imports_the_files_beside_it...)
    from orchestrator.entrypoints import local_modules

    monkeypatch.setattr(sys, "modules", dict(sys.modules))
    monkeypatch.setattr(sys, "path", list(sys.path))
    write(tmp_path / "job" / "nsmods_q5" / "helper.py", "def width():\n    return 7\n")
    # Another part of the same namespace installed elsewhere: by name, not by value.
    write(tmp_path / "site" / "nsmods_q5" / "installed.py", "def height():\n    return 2\n")
    sys.path.append(str(tmp_path / "site"))
    write(tmp_path / "job" / "train.py", "from nsmods_q5.helper import width\n"
          "from nsmods_q5.installed import height\n"
          "def train_loop():\n    return width() * height()\n")
    entry = load_entrypoint(str(tmp_path / "job" / "train.py") + ":train_loop")
    assert entry.function() == 14
    assert [m.__name__ for m in local_modules(entry.module)] == ["nsmods_q5.helper"]


def test_the_loops_return_value_comes_back_and_reserved_report_names_are_refused():
    from ray_layer import user_loop

    # Rank 0's return value is the result's return_value: per_worker dropped it. One that
    # cannot travel is replaced by None (Ray Train failed the finished run on it).
    assert user_loop.yielding(lambda config: {"accuracy": 0.9})({}) == {"accuracy": 0.9}
    assert user_loop.yielding(lambda config: (i for i in range(3)))({}) is None
    # A loop's own "yielded" was read as a preemption (the job re-queued for nothing); the
    # refusal is a ReportRefused, ending the loop on every rank without restarts (it was a
    # ValueError, restarted max_failures times over).
    for name in ("yielded", "already_complete"):
        with pytest.raises(user_loop.ReportRefused,
                           match=f"^launch.report: metric name.*'{name}'.* are the launcher's own"):
            user_loop.report({"loss": 1.0, name: True})


def _holding_itself():
    x = []
    x.append(x)
    return x


def _nested(depth):
    value = 1.0
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("metrics, checkpoint, expected", [
    (0.25, None, "metrics must be a dict of metric names to values, got float 0.25"),
    ([("loss", 0.25)], None, "metrics must be a dict of metric names to values, got list "
     "[('loss', 0.25)]"),
    ({("loss", "train"): 0.25}, None, "metric names must be strings, got ('loss', 'train') "
     "(tuple)"),
    ({"loss": 0.25}, "/tmp/ckpt", "checkpoint must be a ray.train.Checkpoint "
     "(ray.train.Checkpoint.from_directory(folder)) or None, got str '/tmp/ckpt'"),
    # Ray Train failed it in its controller's health check: a 27-line "error:" naming
    # neither the metric nor the loop's line (WorkerHealthCheckFailedError). (A generator,
    # not the threading.Lock reproduced with: Ray Serve registers a lock serializer in
    # cloudpickle, process-wide, once a test of this process has built a Serve app.)
    ({"step": 1, "extra": {"rows": (i for i in range(3))}}, None, "metrics['extra']['rows'] "
     "cannot be sent to Ray Train's controller (TypeError: cannot pickle 'generator' "
     "object): report numbers and text (loss.item()), and save objects in the checkpoint"),
    # Ray Train refused it in the report with a ValueError naming no metric, and restarted
    # the loop max_failures times over for it.
    ({"step": 1, "loss": torch.tensor(2.5)}, None, "metrics['loss'] is a torch tensor "
     "(tensor(2.5000)), which Ray Train does not take as a metric: report its number "
     "(loss.item()), and save tensors in the checkpoint"),
    ({"step": 1, "extra": {"probs": [0.5, torch.tensor([0.5])]}}, None,
     "metrics['extra']['probs'][1] is a torch tensor (tensor([0.5000])), which Ray Train "
     "does not take as a metric: report its number (loss.item()), and save tensors in the "
     "checkpoint"),
    ({"head": torch.nn.Identity()}, None, "metrics['head'] is a torch module (Identity()), "
     "which Ray Train does not take as a metric: report its number (loss.item()), and save "
     "tensors in the checkpoint"),
    # (Ray Train looks at keys too: a tensor keying a nested dict was restarted as before)
    ({"step": 1, "extra": {torch.tensor(3): 0.5}}, None, "metrics['extra'] key tensor(3) is a "
     "torch tensor (tensor(3)), which Ray Train does not take as a metric: report its number "
     "(loss.item()), and save tensors in the checkpoint"),
    # A list holding itself passed every check and failed writing metrics.jsonl, in Ray
    # Train's controller, as a RecursionError; nested thousands deep, the tensor check's own
    # RecursionError was raised into the loop (and restarted max_failures times over).
    ({"step": 1, "hist": _holding_itself()}, None, "metrics['hist'][0] is metrics['hist'] "
     "itself: a list or dict that holds itself cannot be written as JSON (the run's "
     "metrics.jsonl): report numbers and text"),
    ({"step": 1, "deep": _nested(5000)}, None, "metrics are nested too deeply to be written "
     "as JSON (the run's metrics.jsonl): report numbers and text"),
    # A nested dict keyed by what JSON takes no key of (numpy's labels from np.unique, a
    # pair) passed every check and failed writing metrics.jsonl, in Ray Train's controller,
    # as "TypeError: keys must be str, int, float, bool or None", naming no metric.
    ({"step": 1, "acc": {"per_class": {np.int64(3): 0.5}}}, None, "metrics['acc']"
     "['per_class'] key np.int64(3) (int64) cannot be written as JSON (the run's "
     "metrics.jsonl): key nested metrics by strings or numbers"),
    ({"step": 1, "conf": [{("cat", "dog"): 2}]}, None, "metrics['conf'][0] key ('cat', 'dog') "
     "(tuple) cannot be written as JSON (the run's metrics.jsonl): key nested metrics by "
     "strings or numbers"),
])
def test_report_names_a_bad_argument_before_ray_train_sees_it(metrics, checkpoint, expected):
    """Ray Train checks neither: they failed after the restarts as "'float' object is not
    iterable" or "'str' object has no attribute 'path'", or later, never naming report."""
    from ray_layer import user_loop

    with pytest.raises(user_loop.ReportRefused) as e:
        user_loop.report(metrics, checkpoint)
    assert str(e.value) == f"launch.report: {expected}"


def test_an_async_or_generator_loop_is_refused_it_would_run_nothing(tmp_path):
    # Called, it returns a coroutine or generator: the job "succeeded" without training.
    write(tmp_path / "loops.py", "async def a(config):\n    pass\n"
          "def g(config):\n    yield 1\n")
    for name, kind in (("a", "an async function"), ("g", "a generator")):
        with pytest.raises(EntrypointError, match=f"{name} is {kind}"):
            load_entrypoint(f"{tmp_path / 'loops.py'}:{name}")


def test_a_class_named_as_the_loop_is_refused_it_would_only_be_instantiated(tmp_path):
    # Ray Train calls the loop: a class (a Tune Trainable, one with __call__) only made an
    # instance, and the job "succeeded" without training. An instance with __call__ runs.
    write(tmp_path / "classes.py", "class Loop:\n    def __call__(self, config):\n"
          "        pass\nloop = Loop()\n")
    with pytest.raises(EntrypointError, match="'.*:Loop': Loop is a class: called, it only "
                                              "makes an instance"):
        load_entrypoint(f"{tmp_path / 'classes.py'}:Loop")
    assert accepts_config(load_entrypoint(f"{tmp_path / 'classes.py'}:loop").function)


def test_a_script_path_with_a_tilde_is_the_home_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(sys, "modules", dict(sys.modules))
    monkeypatch.setattr(sys, "path", list(sys.path))
    write(tmp_path / "tilde_q6.py", "def loop():\n    return 1\n")
    assert load_entrypoint("~/tilde_q6.py:loop").function() == 1


def test_a_job_file_sets_how_many_checkpoints_are_kept(tmp_path):
    # `keep_checkpoints: 5` was an unknown field: submit always kept 3.
    job = load_job_file(write(tmp_path / "job.yaml", "name: a\nkeep_checkpoints: 5\n"))
    assert job.keep_checkpoints == 5
    assert load_job_file(write(tmp_path / "all.yaml",
                               "name: a\nkeep_checkpoints: null\n")).keep_checkpoints is None
    assert load_job_file(write(tmp_path / "default.yaml", "name: a\n")).keep_checkpoints == 3


def test_stuck_timeout_s_is_read_from_the_job_file_and_null_turns_the_watch_off(tmp_path):
    assert load_job_file(write(tmp_path / "job.yaml",
                               "name: a\nstuck_timeout_s: 60\n")).stuck_timeout_s == 60
    assert load_job_file(write(tmp_path / "off.yaml",
                               "name: a\nstuck_timeout_s: null\n")).stuck_timeout_s is None
    assert load_job_file(write(tmp_path / "default.yaml", "name: a\n")).stuck_timeout_s == 300


def test_a_relative_run_dir_in_rays_copy_of_the_working_dir_is_refused(tmp_path):
    # Under `ray job submit --working-dir .` the job file lies in Ray's package cache: its
    # checkpoints landed there, lost to the cache's cleanup and to --resume after a code edit.
    copy = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_ab"
    job = write(copy / "job.yaml", "name: alpha\nrun_dir: runs/alpha\n")
    with pytest.raises(ConfigError, match="run_dir 'runs/alpha' is relative to the job file, "
                                          "which is in Ray's temporary copy"):
        load_job_file(job)
    write(job, f"name: alpha\nrun_dir: {tmp_path / 'runs' / 'alpha'}\n")
    assert load_job_file(job).run_dir == str(tmp_path / "runs" / "alpha")
    # A folder of one's own named runtime_resources is not Ray's copy.
    mine = write(tmp_path / "runtime_resources" / "proj" / "job.yaml",
                 "name: alpha\nrun_dir: runs/alpha\n")
    assert load_job_file(mine).run_dir == str(mine.parent / "runs" / "alpha")


def test_training_docs_name_every_job_file_key():
    # docs/training.md's paragraph on job files lists the launcher's keys, then "every other
    # key is a `JobSpec` field (...)": both lists are what a job file accepts, so a field
    # the code takes and the list leaves out (JobSpec.workload once) is one a reader of the
    # docs would think refused.
    text = " ".join((REPO / "docs" / "training.md").read_text().split())
    paragraph = text.split("**A job file**", 1)[1].split("checked by `JobSpec`", 1)[0]
    launcher_part, spec_part = paragraph.split("every other key is a `JobSpec` field", 1)
    launcher_named = set(re.findall(r"`(\w+)`", launcher_part.split("the launcher's keys", 1)[1]))
    spec_named = set(re.findall(r"`(\w+)`", spec_part))
    assert launcher_named == set(LAUNCHER_KEYS)
    assert spec_named == {f.name for f in dataclasses.fields(JobSpec)}


@pytest.mark.parametrize("text,field", [
    ("run_dir: ~nosuchuser-hf55/runs/x\n", "run_dir"),
    ("runtime_env: {working_dir: ~nosuchuser-hf55/code}\n", "runtime_env.working_dir"),
    ("runtime_env: {pip: ~nosuchuser-hf55/requirements.txt}\n", "runtime_env.pip"),
    ("runtime_env: {py_modules: [~nosuchuser-hf55/mod]}\n", "runtime_env.py_modules"),
])
def test_a_home_of_no_user_is_refused_naming_the_file_and_field(tmp_path, text, field):
    # `~bob/...` with no user bob: Path.expanduser raised RuntimeError, a traceback.
    path = write(tmp_path / "job.yaml", "name: x\nentrypoint: train.py:loop\n" + text)
    with pytest.raises(ConfigError) as e:
        load_job_file(path)
    assert str(path) in str(e.value) and field in str(e.value) and \
        "~nosuchuser-hf55" in str(e.value), str(e.value)


def test_an_entrypoint_script_under_a_home_of_no_user_is_an_entrypoint_error(tmp_path):
    with pytest.raises(EntrypointError, match="~nosuchuser-hf55"):
        load_entrypoint("~nosuchuser-hf55/train.py:loop", base_dir=tmp_path)


def test_logs_follow_exits_once_the_run_has_ended(tmp_path, monkeypatch, capsys):
    # `logs NAME --follow` polled for ever after the run ended (done or failed): unlike
    # `kubectl logs -f` / `ray job logs --follow`, a script following a run never got back.
    # Now it prints the last reports and exits with the run's own exit code.
    from orchestrator import __main__ as cli
    from orchestrator.job_exit import EXIT_FAILED, JobFailed
    from orchestrator.runs import append_metrics, run_dir_held

    run_dir = tmp_path / "alpha"
    sleeps = []

    def run(fail):
        try:
            with run_dir_held(run_dir, new_run=not run_dir.exists()):
                append_metrics(run_dir, {"step": len(sleeps), "loss": 2.0}, None)
                if fail:
                    raise JobFailed("worker 0 failed: boom", EXIT_FAILED, ran=True)
        except JobFailed:
            pass

    def sleep(seconds, fail=True):
        sleeps.append(seconds)
        if len(sleeps) == 1:  # the run starts, reports and fails between two polls
            run(fail)
        elif len(sleeps) > 3:
            raise KeyboardInterrupt  # (before the fix: it never stopped on its own)
    monkeypatch.setattr(cli.time, "sleep", sleep)
    assert cli.print_logs("alpha", str(run_dir), follow=True, every_s=0.01) == EXIT_FAILED
    out = capsys.readouterr()
    assert "step 1: loss=2" in out.out, out
    assert "worker 0 failed: boom" in out.err and len(sleeps) == 1, (out.err, sleeps)

    # Resumed and finished: exit 0; the earlier run's end is not taken for this one's.
    sleeps.clear()
    monkeypatch.setattr(cli.time, "sleep", lambda s: sleep(s, fail=False))
    with run_dir_held(run_dir, new_run=False):
        append_metrics(run_dir, {"step": 0, "loss": 3.0}, None)
        monkeypatch.setattr(cli.time, "sleep", lambda s: (sleeps.append(s), None)[1]
                            if len(sleeps) < 2 else (_ for _ in ()).throw(KeyboardInterrupt))
        assert cli.print_logs("alpha", str(run_dir), follow=True, every_s=0.01) == 0
        assert len(sleeps) == 2  # still running: followed until Ctrl-C
    capsys.readouterr()
    sleeps.clear()
    monkeypatch.setattr(cli.time, "sleep", lambda s: sleep(s, fail=False))
    assert cli.print_logs("alpha", str(run_dir), follow=True, every_s=0.01) == 0
    out = capsys.readouterr()
    assert "step 0: loss=3" in out.out and sleeps == [] and "ended" in out.err, (out, sleeps)


def test_logs_follow_shows_a_failed_runs_error_once_on_one_line(tmp_path, capsys):
    # A failed training's JobFailed is two lines (ray_layer/launch.py's _failure: what failed,
    # then where the checkpoints are): ended.json kept both and `logs --follow` printed
    # "(the run has ended: exit 4: training failed ...", its second line on a line of its own.
    import json

    from orchestrator import __main__ as cli
    from orchestrator.job_exit import EXIT_FAILED, JobFailed
    from orchestrator.runs import ENDED_FILE, append_metrics, run_dir_held

    run_dir = tmp_path / "alpha"
    error = ("training failed after 0 restart(s): ValueError: boom\n(full traceback in the "
             f"worker log above; no checkpoint was saved in {run_dir})")
    with pytest.raises(JobFailed):
        with run_dir_held(run_dir, new_run=True):
            append_metrics(run_dir, {"step": 1, "loss": 2.0}, None)
            raise JobFailed(error, EXIT_FAILED, ran=True)
    one_line = error.replace("\n", " ")
    assert json.loads((run_dir / ENDED_FILE).read_text())["error"] == one_line
    assert cli.print_logs("alpha", str(run_dir), follow=True, every_s=0.01) == EXIT_FAILED
    err = capsys.readouterr().err
    assert err == f"(the run has ended: exit {EXIT_FAILED}: {one_line})\n", err
    # An ended.json written before (its error on two lines): shown on one line too.
    (run_dir / ENDED_FILE).write_text(json.dumps({"exit_code": EXIT_FAILED, "error": error}))
    assert cli.print_logs("alpha", str(run_dir), follow=True, every_s=0.01) == EXIT_FAILED
    assert capsys.readouterr().err == err


def test_logs_follow_stops_on_a_run_no_process_holds_and_follows_one_starting(
        tmp_path, monkeypatch, capsys):
    # A run folder with reports but no .run.lock (a run from before the lock, a copied
    # folder) and no end was followed for ever: no writer can add to it. It is now said not
    # to be running, after a second look (a run starting there takes the lock a moment after
    # its folder is there); a lock held, even before its holder's line is written, or taken
    # between the two looks, is followed.
    import fcntl

    from orchestrator import __main__ as cli
    from orchestrator.job_exit import EXIT_FAILED
    from orchestrator.runs import RUN_LOCK, append_metrics

    run_dir = tmp_path / "alpha"
    append_metrics(run_dir, {"step": 7, "loss": 2.0}, None)
    _written_an_hour_ago(run_dir)  # (files changed within LOCKLESS_QUIET_S: still followed)
    sleeps = []

    def sleep(seconds, then=None):
        sleeps.append(seconds)
        if then is not None and len(sleeps) == 1:
            then()
        if len(sleeps) > 4:
            raise KeyboardInterrupt  # (before the fix: it never stopped on its own)
    monkeypatch.setattr(cli.time, "sleep", sleep)
    assert cli.print_logs("alpha", str(run_dir), follow=True, every_s=0.01) == EXIT_FAILED
    out = capsys.readouterr()
    assert "step 7: loss=2" in out.out and len(sleeps) == 1, (out, sleeps)
    assert "the run is not running" in out.err and RUN_LOCK in out.err, out.err
    # A lock file no process holds and that names no holder (made by hand): the same.
    (run_dir / RUN_LOCK).write_text("")
    _written_an_hour_ago(run_dir)
    sleeps.clear()
    assert cli.print_logs("alpha", str(run_dir), follow=True, every_s=0.01) == EXIT_FAILED
    assert "not running" in capsys.readouterr().err and len(sleeps) == 1
    # Held, its holder's line not written yet (file_lock between its flock and its write):
    # followed until Ctrl-C.
    with open(run_dir / RUN_LOCK, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        sleeps.clear()
        assert cli.print_logs("alpha", str(run_dir), follow=True, every_s=0.01) == 0
        assert len(sleeps) == 5 and "not running" not in capsys.readouterr().err
    # No lock at the first look; a run starting takes it before the second: followed.
    (run_dir / RUN_LOCK).unlink()
    taken = []

    def start():
        taken.append(open(run_dir / RUN_LOCK, "a+"))
        fcntl.flock(taken[0], fcntl.LOCK_EX)
    sleeps.clear()
    monkeypatch.setattr(cli.time, "sleep", lambda s: sleep(s, then=start))
    try:
        assert cli.print_logs("alpha", str(run_dir), follow=True, every_s=0.01) == 0
        assert len(sleeps) == 5 and "not running" not in capsys.readouterr().err
    finally:
        taken[0].close()
    # A folder with no reports yet and no lock (made before its run takes the lock):
    # waited on.
    (tmp_path / "beta").mkdir()
    sleeps.clear()
    monkeypatch.setattr(cli.time, "sleep", sleep)
    assert cli.print_logs("beta", str(tmp_path / "beta"), follow=True, every_s=0.01) == 0
    assert len(sleeps) == 5


def _written_an_hour_ago(directory: Path) -> None:
    """The folder and what lies in it last modified an hour ago (a run long stopped)."""
    an_hour_ago = time.time() - 3600
    for path in [*directory.iterdir(), directory]:
        os.utime(path, (an_hour_ago, an_hour_ago))


def test_logs_follow_follows_a_lockless_run_while_it_writes_and_stops_once_quiet(
        tmp_path, monkeypatch, capsys):
    # A bench script's local train (LocalSession) takes no lock: `logs --follow` said it was
    # not running at its second look with nothing new (a second later) while it still wrote
    # a report every few seconds. It is followed while its files change, and said not to be
    # running once none has changed for LOCKLESS_QUIET_S. (A fake clock: no real waits.)
    from orchestrator import __main__ as cli
    from orchestrator.job_exit import EXIT_FAILED
    from orchestrator.runs import METRICS_LOG, append_metrics

    run_dir = tmp_path / "bench"
    clock = [time.time()]

    def report(step):
        append_metrics(run_dir, {"step": step, "loss": 3.0 - step / 10}, None)
        os.utime(run_dir / METRICS_LOG, (clock[0], clock[0]))  # (written at the fake time)
    report(0)
    reported, last_report = [0], [clock[0]]

    def sleep(seconds):
        clock[0] += seconds
        if clock[0] - last_report[0] >= 5 and reported[0] < 4:  # a report every 5 s, 4 more
            reported[0] += 1
            report(reported[0])
            last_report[0] = clock[0]
        if clock[0] - last_report[0] > 10 * cli.LOCKLESS_QUIET_S:
            raise KeyboardInterrupt  # (never stopped on its own)
    monkeypatch.setattr(cli.time, "sleep", sleep)
    monkeypatch.setattr(cli.time, "time", lambda: clock[0])
    assert cli.print_logs("bench", str(run_dir), follow=True, every_s=1.0) == EXIT_FAILED
    out = capsys.readouterr()
    assert [line.split(": ")[0][9:] for line in out.out.splitlines()] == [
        f"step {step}" for step in range(5)], out.out
    quiet_for = clock[0] - last_report[0]
    assert cli.LOCKLESS_QUIET_S <= quiet_for < cli.LOCKLESS_QUIET_S + 1.0, quiet_for
    assert out.err.count("\n") == 1 and "the run is not running" in out.err, out.err
    assert f"none of its files has changed for {cli.LOCKLESS_QUIET_S:g} s" in out.err


def test_a_run_lock_held_is_never_taken_for_a_gone_driver_nor_a_free_one_for_a_live_one(
        tmp_path):
    # holder_gone judged by the pid alone: a driver in a container sharing this host's name
    # (its own pids) holding the lock was declared gone (logs --follow stopped, exit 4); a
    # killed driver's pid taken by another process was followed for ever.
    import socket

    from orchestrator.file_lock import file_lock, holder_gone

    lock = tmp_path / ".run.lock"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    named_dead = f"pid {dead.pid} on {socket.gethostname()} (since 2026-12-07 02:00:00)"
    with file_lock(lock):  # held by a live process whose pid is not this host's to see
        lock.write_text(named_dead + "\n")
        assert holder_gone(lock) is None
    # Nobody holds it, and the pid it names runs (reused by another process): gone.
    lock.write_text(f"pid {os.getpid()} on {socket.gethostname()} (since 2026-12-07)\n")
    assert holder_gone(lock) is not None
    lock.write_text(named_dead + "\n")
    assert holder_gone(lock) == named_dead


def test_logs_follow_stops_when_the_runs_driver_on_this_host_is_gone(tmp_path, monkeypatch,
                                                                     capsys):
    # A driver killed outright (kill -9) writes no ended.json: `logs --follow` polled for
    # ever. The run's lock names its holder (pid on host): gone from this host, follow stops
    # with a line saying so; a holder on another host is never declared gone from here.
    import signal
    import socket

    from orchestrator import __main__ as cli
    from orchestrator.job_exit import EXIT_FAILED
    from orchestrator.runs import RUN_LOCK

    run_dir = tmp_path / "alpha"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""\
            import sys, time
            from pathlib import Path
            from orchestrator.runs import append_metrics, run_dir_held
            with run_dir_held(Path({str(run_dir)!r}), new_run=True):
                append_metrics(Path({str(run_dir)!r}), {{"step": 1, "loss": 3.0}}, None)
                print("ready", flush=True)
                time.sleep(120)
            """)], cwd=REPO, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline() == "ready\n"
        sleeps = []

        def sleep(seconds):
            sleeps.append(seconds)
            if len(sleeps) == 1:  # alive at the first look: followed
                os.kill(holder.pid, signal.SIGKILL)
                holder.wait()
            elif len(sleeps) > 3:
                raise KeyboardInterrupt  # (before the fix: it never stopped on its own)
        monkeypatch.setattr(cli.time, "sleep", sleep)
        assert cli.print_logs("alpha", str(run_dir), follow=True, every_s=0.01) == EXIT_FAILED
        out = capsys.readouterr()
        assert "step 1: loss=3" in out.out and len(sleeps) == 1, (out, sleeps)
        assert f"its driver, pid {holder.pid} on {socket.gethostname()} (since" in out.err, out.err
        assert "is gone" in out.err and "--resume" in out.err, out.err
    finally:
        holder.kill()
        holder.wait()

    # The same dead pid named on another host: followed until Ctrl-C.
    (run_dir / RUN_LOCK).write_text(f"pid {holder.pid} on not-{socket.gethostname()} "
                                    "(since 2026-12-07 02:00:00)\n")
    sleeps.clear()
    monkeypatch.setattr(cli.time, "sleep", lambda s: (sleeps.append(s), None)[1]
                        if len(sleeps) < 3 else (_ for _ in ()).throw(KeyboardInterrupt))
    assert cli.print_logs("alpha", str(run_dir), follow=True, every_s=0.01) == 0
    assert len(sleeps) == 3 and "gone" not in capsys.readouterr().err
