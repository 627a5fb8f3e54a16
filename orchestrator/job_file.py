"""A job file: what `python -m orchestrator submit JOB.yaml` runs, and what `place --spec`
reads. One YAML mapping:

    name: mnist-mlp                  # the job's name, and its run directory's name
    entrypoint: examples/regression/train.py:train_loop   # or package.module:function
    config: {lr: 0.01, epochs: 3}    # handed to the loop (Ray Train's train_loop_config)
    num_workers: 2                   # ... and every other JobSpec field (docs/scheduler.md)
    cpus_per_worker: 1
    preemptible: true                # false when the loop reports no checkpoints
    runtime_env: {pip: [pandas]}     # Ray's runtime_env (local paths in it: beside the job
                                     # file, as run_dir; under `ray job submit`, a field
                                     # given there too is refused)
    run_dir: ~/orchestrator-runs/mnist-mlp         # default: the runs root / name; a
                                                   # relative one is beside the job file
    max_failures: 3
    queue_timeout_s: 600
    keep_checkpoints: 3              # how many Ray Train keeps; null: every one
    stuck_timeout_s: 300             # a rank neither reporting nor returning this long while
                                     # the others wait fails as stuck; null: no watch

The launcher's own keys are taken out; everything else is a JobSpec field, checked by JobSpec
(an unknown key gets a did-you-mean). Every error names the file.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.config import ConfigError, JobSpec, known_fields_problems, unknown_fields
from orchestrator.runs import in_rays_working_dir_copy, run_dir_uri_problem
from orchestrator.stuck_ranks import DEFAULT_STUCK_TIMEOUT_S, stuck_timeout_problem
from orchestrator.validation import expand_home, has_control_characters, is_int, is_number

DEFAULT_KEEP_CHECKPOINTS = 3  # checkpoints Ray Train keeps of a launched loop's run
MAX_JOB_FILE_BYTES = 16 << 20  # larger is no job file, and is refused unread
LAUNCHER_KEYS = ("entrypoint", "config", "runtime_env", "run_dir", "max_failures",
                 "queue_timeout_s", "keep_checkpoints", "stuck_timeout_s")


@dataclass(frozen=True)
class JobFile:
    """A job file, checked: the JobSpec and how to launch it."""

    spec: JobSpec
    entrypoint: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    runtime_env: dict[str, Any] | None = None
    run_dir: str | None = None
    max_failures: int = 3
    queue_timeout_s: float = 600.0
    keep_checkpoints: int | None = DEFAULT_KEEP_CHECKPOINTS  # None: every one
    stuck_timeout_s: float | None = DEFAULT_STUCK_TIMEOUT_S  # None: no watch
    path: Path | None = None  # the file it came from; scripts are found next to it


def load_job_file(path: str | Path) -> JobFile:
    """The job file at `path`; ConfigError naming the file and every bad field."""
    import yaml

    path = Path(path)
    try:
        with open(path, "rb") as f:  # (a cap: /dev/zero, or a checkpoint given by mistake)
            raw = f.read(MAX_JOB_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(raw) > MAX_JOB_FILE_BYTES:
        raise ConfigError(f"{path}: over {MAX_JOB_FILE_BYTES >> 20} MiB: a job file is a short "
                          "YAML mapping of fields (name, entrypoint, num_workers, ...); is "
                          "this the file meant?")
    try:
        data = yaml.load(raw.decode("utf-8"), Loader=_loader())
    except UnicodeDecodeError as e:  # e.g. UTF-16, what PowerShell's `>` writes
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(e)}") from None
    except RecursionError:  # PyYAML builds its node tree recursively: `[[[...]]]` 2,000 deep
        raise ConfigError(f"{path}: nested too deeply to read (lists or mappings hundreds of "
                          "levels inside each other); no field takes such a value") from None
    except ValueError as e:  # PyYAML's constructors: an impossible date, a huge integer
        if "digits" in str(e):  # (Python reads no integer of over 4,300 digits)
            raise ConfigError(f"{path}: holds a number of over 4,300 digits; no field takes "
                              "one (a typo?)") from None
        raise ConfigError(f"{path}: not valid YAML: {e} (quote a value that only looks like "
                          "a date or a number)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a job file is a mapping of fields (name, entrypoint, "
                          f"num_workers, ...), got {type(data).__name__}")
    # Unknown keys against the launcher's keys too: `entry_point` gets "did you mean
    # 'entrypoint'", and the known fields listed are all a job file may hold.
    unknown = unknown_fields(data, [*(f.name for f in dataclasses.fields(JobSpec)),
                                    *LAUNCHER_KEYS], "the job file")
    launcher = {k: data.pop(k) for k in LAUNCHER_KEYS if k in data}
    problems = launcher_problems(launcher)
    spec = None
    if unknown:  # with what the known fields' values are refused for: every mistake at once
        problems.append(unknown + known_fields_problems(
            JobSpec, data, [f.name for f in dataclasses.fields(JobSpec)]))
    else:
        try:
            spec = JobSpec.from_dict(data)
        except (ConfigError, TypeError) as e:
            problems.append(str(e))
        # (here, not only in launch.fit's run-directory check: there, no file was named)
        name_problem = run_name_problem(spec.name) if spec is not None else None
        if name_problem:
            problems.append(f"name {spec.name!r} {name_problem}: a job's name is its run "
                            "directory's")
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    if launcher.get("config") is None:  # `config:` left empty: no config
        launcher.pop("config", None)
    # Relative paths are the job file's, as its entrypoint script is, wherever `submit` runs.
    if "run_dir" in launcher:
        run_dir = expand_home(launcher["run_dir"], f"{path}: run_dir", ConfigError)
        if not run_dir.is_absolute() and in_rays_working_dir_copy(path.parent):
            # Under `ray job submit --working-dir`, the job file is in Ray's temporary copy of
            # the working dir: checkpoints there are lost to its cache cleanup, and a code
            # change (a new copy) makes --resume find none.
            raise ConfigError(f"{path}: run_dir {launcher['run_dir']!r} is relative to the job "
                              "file, which is in Ray's temporary copy of the working directory "
                              "(ray job submit --working-dir): give an absolute path, on "
                              "storage every node reaches")
        launcher["run_dir"] = str(path.parent / run_dir)
    if launcher.get("runtime_env"):
        launcher["runtime_env"] = _runtime_env_paths_rebased(launcher["runtime_env"],
                                                            path.parent, path)
    return JobFile(spec=spec, path=path, **launcher)


def _runtime_env_paths_rebased(runtime_env: dict[str, Any], folder: Path,
                               job_file: Path | None = None) -> dict[str, Any]:
    """The runtime_env with its local paths read from the job file's `folder`, as its
    entrypoint and run_dir are: working_dir, a requirements file (`pip` / `uv` as a string,
    or their `packages` as one), a conda environment file and py_modules entries (only
    working_dir was: the others were read from wherever `submit` ran, and refused there).
    URIs, package lists and conda environment names stay."""
    def local(value: Any) -> bool:
        return isinstance(value, str) and "://" not in value

    def rebased(value: str, key: str) -> str:  # (a ~user of no user: ConfigError naming it)
        where = f"{job_file}: runtime_env.{key}" if job_file else f"runtime_env.{key}"
        return str(folder / expand_home(value, where, ConfigError))

    env = dict(runtime_env)
    if local(env.get("working_dir")):
        env["working_dir"] = rebased(env["working_dir"], "working_dir")
    for key in ("pip", "uv"):  # Ray reads a string as a requirements file's path
        if local(env.get(key)):
            env[key] = rebased(env[key], key)
        elif isinstance(env.get(key), dict) and local(env[key].get("packages")):
            env[key] = {**env[key], "packages": rebased(env[key]["packages"],
                                                        f"{key}.packages")}
    if local(env.get("conda")) and env["conda"].endswith((".yml", ".yaml")):
        env["conda"] = rebased(env["conda"], "conda")
    if isinstance(env.get("py_modules"), list):
        env["py_modules"] = [rebased(m, "py_modules") if local(m) else m
                             for m in env["py_modules"]]
    return env


MERGE_TAG = "tag:yaml.org,2002:merge"
FLOAT_TAG = "tag:yaml.org,2002:float"
STR_TAG = "tag:yaml.org,2002:str"
NULL_TAG = "tag:yaml.org,2002:null"
# The floats YAML 1.2 reads and PyYAML's YAML 1.1 leaves as strings: an exponent without a
# dot (1e-3, -2E5) or without a sign (1.8e3). The loop got lr='1e-3', and
# `expected_duration_s: 1e4` was refused as not a number. Integers keep their own resolver
# (tried first), and a quoted "1e-3" stays a string.
EXPONENT_FLOAT = r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"
# The job file's keys whose value is a string, read as the text written (_typed_as_meant).
TEXT_FIELDS = ("entrypoint", "run_dir",
               *(name for name, hint in typing.get_type_hints(JobSpec).items() if hint is str))


def _loader():
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last
    silently: `num_workers: 8` ... `num_workers: 1` ran one worker), reading 1e-3 as the
    float it is (EXPONENT_FLOAT), and a value where a string is meant as its text
    (_typed_as_meant)."""
    import re

    import yaml

    class StrictLoader(yaml.SafeLoader):
        """SafeLoader with mapping_without_duplicates for every mapping, YAML 1.2's
        exponent floats, and strings where the job file takes strings."""

        def construct_document(self, node):
            _typed_as_meant(node)
            return super().construct_document(node)

    def mapping_without_duplicates(loader, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == MERGE_TAG:  # `<<: *defaults`: construct_mapping merges those,
                continue                   # and a key written here overrides them, as meant
            key = loader.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: construct_mapping names it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"found key {key!r} twice (a second one would silently win)",
                    key_node.start_mark)
            seen.add(key)
        return loader.construct_mapping(node, deep)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                                 mapping_without_duplicates)
    StrictLoader.add_implicit_resolver(FLOAT_TAG, re.compile(EXPONENT_FLOAT),
                                       list("-+0123456789."))
    return StrictLoader


def _typed_as_meant(root) -> None:
    """Retag the plain scalars of a job file's node tree, before it is built, where the
    field wants other than what the value looks like. Where a string is meant (TEXT_FIELDS,
    runtime_env's working_dir, env_vars' names and values: Ray takes only strings there) the
    value is the text written: `GIT_SHA: 8e91234` was inf, `NCCL_TIMEOUT_SCALE: 1e3` 1000.0,
    `OMP_NUM_THREADS: 1` an int, and Ray refused each; `name: 1e3` was refused. In `config`,
    numbers stay numbers (lr: 1e-3), except an exponent form too large for a float: a
    commit hash such as 8e91234 was inf."""
    for key, value, put in _entries(root):
        if key.value in TEXT_FIELDS:
            put(key, _as_text(value))
        elif key.value == "runtime_env":
            for env_key, env_value, put_env in _entries(value):
                if env_key.value == "working_dir":
                    put_env(env_key, _as_text(env_value))
                elif env_key.value == "env_vars":
                    for name, variable, put_variable in _entries(env_value):
                        put_variable(_as_text(name), _as_text(variable))
        elif key.value == "config":
            _unbounded_exponents_as_text(value, set())


def _entries(node):
    """(key node, value node, put) of a mapping node, those merged into it (`<<: *defaults`)
    included; none for any other node. put(key, value) replaces the pair in the mapping: a
    retagged node is a copy, since an anchored node is the same object wherever an alias
    names it (`epochs: &ep 3` read as text under env_vars made config's epochs '3' too), and
    a merged mapping is walked as a copy of its own for the same reason."""
    if node.id != "mapping":
        return
    for index, (key, value) in enumerate(node.value):
        if key.tag == MERGE_TAG:
            merged = copy.deepcopy(value)
            node.value[index] = (key, merged)
            for part in (merged.value if merged.id == "sequence" else [merged]):
                yield from _entries(part)
        else:
            def put(new_key, new_value, pairs=node.value, index=index):
                pairs[index] = (new_key, new_value)
            yield key, value, put


def _as_text(node):
    """A plain (unquoted) scalar read as the text written, not the number, boolean or date
    it looks like (a copy: the node may be an anchor used elsewhere); null stays null (a
    field left empty); anything else as it is."""
    if node.id == "scalar" and node.style is None and node.tag != NULL_TAG:
        text = copy.copy(node)
        text.tag = STR_TAG
        return text
    return node


def _unbounded_exponents_as_text(node, seen: set[int]) -> None:
    """The exponent-form numbers under `node` that no float holds (8e91234: inf) read as
    the text written. (`.inf` stays infinity: it says so.) `seen`: the nodes walked (an
    alias may make the tree a cycle)."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if node.id == "scalar":
        if node.tag == FLOAT_TAG and node.style is None and "e" in node.value.lower() \
                and not math.isfinite(float(node.value.replace("_", ""))):
            node.tag = STR_TAG
        return
    children = node.value if node.id == "sequence" else [n for pair in node.value for n in pair]
    for child in children:
        _unbounded_exponents_as_text(child, seen)


def _yaml_problem(error) -> str:
    """PyYAML's error in one line: the problem and where (its own text spans four lines)."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def run_name_problem(name: str) -> str | None:
    """Why a job's name cannot be a directory's name, or None."""
    if "/" in name or "\\" in name:
        return "must not contain a path separator"
    if name in (".", ".."):
        return "is not a directory name"
    if has_control_characters(name):
        return "must not contain control characters"
    if len(name.encode("utf-8", "surrogatepass")) > 255:
        return "is longer than a file name may be (255 bytes)"
    return None


EMPTY_RUN_DIR = ("run_dir is empty: give a path, or leave it out (the runs root / the "
                 "job's name)")


def launcher_problems(launcher: dict[str, Any]) -> list[str]:
    """What is wrong with the launcher's keys present in `launcher` (a job file's, or
    launch.fit's arguments)."""
    p = []
    if "entrypoint" in launcher and not isinstance(launcher["entrypoint"], str):
        p.append(f"entrypoint must be a string 'module:function' or 'script.py:function', "
                 f"got {launcher['entrypoint']!r}")
    for key in ("config", "runtime_env"):
        if key in launcher and launcher[key] is not None and not isinstance(launcher[key], dict):
            p.append(f"{key} must be a mapping, got {launcher[key]!r}")
    if "run_dir" in launcher and not isinstance(launcher["run_dir"], str):
        p.append(f"run_dir must be a path, got {launcher['run_dir']!r}")
    elif "run_dir" in launcher and not launcher["run_dir"].strip():
        p.append(EMPTY_RUN_DIR)  # ("" is the job file's folder, or fit's working directory)
    elif "run_dir" in launcher:
        uri_problem = run_dir_uri_problem(launcher["run_dir"])
        if uri_problem:
            p.append(f"run_dir: {uri_problem}")
    if "max_failures" in launcher and not (is_int(launcher["max_failures"])
                                           and launcher["max_failures"] >= 0):
        p.append(f"max_failures must be an integer >= 0, got {launcher['max_failures']!r}")
    if "queue_timeout_s" in launcher and not (is_number(launcher["queue_timeout_s"])
                                              and launcher["queue_timeout_s"] >= 0):
        p.append(f"queue_timeout_s must be a finite number >= 0, got "
                 f"{launcher['queue_timeout_s']!r}")
    if launcher.get("keep_checkpoints") is not None and not (
            is_int(launcher["keep_checkpoints"]) and launcher["keep_checkpoints"] >= 1):
        p.append(f"keep_checkpoints must be an integer >= 1 or null/None (keep every one), got "
                 f"{launcher['keep_checkpoints']!r}")
    stuck = launcher.get("stuck_timeout_s")
    if "stuck_timeout_s" in launcher and (why := stuck_timeout_problem(stuck)):
        p.append(why)
    return p
