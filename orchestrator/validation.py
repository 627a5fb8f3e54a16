"""Helpers every validation uses (TrainConfig and JobSpec in orchestrator/config.py,
CompressConfig in orchestrator/compression/config.py, serving requests in
orchestrator/serving/protocol.py): type checks that reject bools and non-finite numbers, and
the one rule for which settings a resumed run may not change.
"""
from __future__ import annotations

import argparse
import contextlib
import contextvars
import dataclasses
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping


def is_int(value: Any) -> bool:
    """An int, not a bool (True is an int in Python, never a valid count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def has_control_characters(text: str) -> bool:
    """Whether `text` holds a control character (C0, DEL or C1: a tab, ESC, CSI): one that
    never belongs in a name, and that a terminal acts on where the name is printed."""
    return any(ord(c) < 32 or 127 <= ord(c) < 160 for c in text)


def python_scalar(value: Any) -> Any:
    """A numpy number (np.float32, np.int64) or 0-d array as the Python number it holds
    (.item()); anything else as it is. A loop's report holds such values where it computed
    with numpy, and they are no int or float to isinstance."""
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):
        try:
            return value.item()
        except Exception:  # (an object that only looks like one)
            pass
    return value


def finite_json(data: Any, where: str = "data") -> Any:
    """`data` as strict JSON can hold it: every non-finite float (NaN, infinity: a diverged
    loss) as None (null), numpy numbers as Python's (python_scalar), through dicts, lists and
    tuples. json.dumps writes NaN as a bare `NaN`, which jq, JavaScript and most JSON readers
    other than Python's reject (the whole line or file). A list or dict that holds itself
    (`x.append(x)` in a loop's report) raises ValueError naming the entry, from `where`
    (`metrics['hist'][0] is metrics['hist'] itself: ...`): it recursed to a RecursionError."""
    try:
        return _finite_json(data, {})
    except _HoldsItself as e:
        path = e.path[::-1]  # (appended innermost first, as the recursion unwound)
        raise ValueError(f"{where}{''.join(path)} is {where}{''.join(path[:e.depth])} itself: "
                         "a list or dict that holds itself cannot be written as JSON") from None


class _HoldsItself(Exception):
    """An entry that is one of its own containers, `depth` levels down from the top; `path`:
    the entries' keys (`['hist']`, `[0]`) from it up, filled in as the recursion unwinds."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.depth, self.path = depth, []


def _finite_json(data: Any, open_containers: dict[int, int]) -> Any:
    """finite_json's walk; `open_containers`: {id: depth} of the dicts, lists and tuples
    that `data` is inside of (the same object side by side is fine: JSON writes it twice)."""
    data = python_scalar(data)
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if not isinstance(data, (dict, list, tuple)):
        return data
    if id(data) in open_containers:
        raise _HoldsItself(open_containers[id(data)])
    open_containers[id(data)] = len(open_containers)
    written = {}
    for key, value in data.items() if isinstance(data, dict) else enumerate(data):
        try:
            written[key] = _finite_json(value, open_containers)
        except _HoldsItself as e:
            e.path.append(f"[{key!r}]")
            raise
    del open_containers[id(data)]
    return written if isinstance(data, dict) else list(written.values())


def json_type(value: Any) -> str:
    """A value read from JSON, named as JSON names it: a message's "is null", "is a number",
    not Python's "NoneType" / "int"."""
    if isinstance(value, bool):  # (before int: a bool is an int)
        return "boolean"
    names = {dict: "object", list: "array", str: "string", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def json_parse_problem(error: Exception, with_line: bool = True) -> str:
    """Why json.loads refused a text, from what it raised: where a JSONDecodeError says it
    (`with_line=False`: the column alone, for one line of a file that names the line), a
    nesting past the recursion limit, or a number over Python's int-string limit (4300
    digits, a plain ValueError without JSONDecodeError's fields)."""
    if isinstance(error, RecursionError):
        return "nested too deeply"
    if not isinstance(error, json.JSONDecodeError):
        return str(error).split(";")[0]  # the limit and the digits, not the sys.* advice
    where = f"line {error.lineno} column {error.colno}" if with_line else f"column {error.colno}"
    # "Unterminated string starting at" is the one message that ends in its own "at"
    return f"{error.msg.removesuffix(' at')} at {where}"


def is_number(value: Any) -> bool:
    """A finite int or float, not a bool, that float() takes: an int past float's range
    (JSON and YAML hold any number of digits) is not one; math.isfinite raised OverflowError
    on it, a 500 from the serving API and a traceback from a job file."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, int):
        return abs(value) <= sys.float_info.max  # exact: Python compares int and float exactly
    return math.isfinite(value)


# A number as a person writes it in a file or a spec: ASCII digits, a sign, a point and an
# exponent (`100`, `2.5`, `.5`, `1e3`), or inf / nan (for the caller's own "finite" check).
# float() and int() also take `1_000` (1000), other scripts' digits (Arabic-Indic `١٠`, 10)
# and spaces around: a trace row `0,100,1_000` replayed as 1000 GPUs.
_DECIMAL = re.compile(r"[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?|inf|infinity|nan)",
                      re.ASCII | re.IGNORECASE)
_WHOLE = re.compile(r"[+-]?\d+", re.ASCII)


def parse_number(text: str, whole: bool = False) -> float | int:
    """`text` as a float (an int where `whole`) in plain decimal or scientific notation;
    ValueError otherwise, its message saying why where float()/int() would have taken it
    (an underscore, a digit other than 0-9, a space around it), else empty. (The traces'
    numbers, the simulator's --cluster spec.)"""
    if (_WHOLE if whole else _DECIMAL).fullmatch(text):
        return int(text) if whole else float(text)
    odd = next((c for c in text if not c.isascii() and (c.isdigit() or c.isnumeric())), None)
    if odd is not None:
        raise ValueError(f"{odd!r} (U+{ord(odd):04X}) is not a digit 0-9")
    if "_" in text:
        plain = text.replace("_", "")
        raise ValueError("'_' is not read as a digit separator" + (
            f": write {plain}" if (_WHOLE if whole else _DECIMAL).fullmatch(plain) else ""))
    if text != text.strip():
        raise ValueError("space around it")
    raise ValueError("")


def _strict(whole: bool):
    def read(text: str) -> float | int:
        try:
            return parse_number(text, whole)
        except ValueError as e:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'a whole number' if whole else 'a number'}"
                + (f" ({e})" if str(e) else "")) from None
    read.__name__ = "strict_int" if whole else "strict_float"
    return read


# argparse types of the number flags (for type=int / type=float): parse_number's forms, a
# refusal naming the flag (`argument --max-jobs: '1_0' is not a whole number ('_' is not
# read as a digit separator: write 10)`).
strict_int = _strict(whole=True)
strict_float = _strict(whole=False)


def expand_home(path: Any, what: str, error: type[Exception] = ValueError) -> Path:
    """Path(path) with a leading `~` or `~user` made the home directory, as a shell does;
    `error` naming `what` (a flag, a file's field) when `~user` names no user of this machine
    (Path.expanduser raised RuntimeError there: a traceback). The shell leaves `~bob/x` as
    written when there is no user bob, so a typo reaches here."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        home = str(path).split("/", 1)[0]
        raise error(f"{what} {str(path)!r}: {home} is the home directory of no user on this "
                    "machine (a typo? ~/ is your own)") from None


SEED_RULE = "must be an integer in [-2**63, 2**64)"

# The command-line flag of each field of the configs validated now (given_by_flags): none
# outside a command line (a job file, a saved config, a test), whose errors name fields only.
_FIELD_FLAGS: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar(
    "field_flags", default=None)


def flag_of(field: str) -> str:
    """The flag a command line gives a config field by: `batch_size` is `--batch-size`."""
    return "--" + field.replace("_", "-")


def field_with_flag(field: str, flag: str | None = None) -> str:
    """How an error names a config field: with the flag that gave it, `batch_size
    (--batch-size)` (`flag`, else the field's in given_by_flags), or alone where no flag did
    (a job file's field, a saved config's)."""
    flags = _FIELD_FLAGS.get()
    flag = flag or (flags or {}).get(field)
    return f"{field} ({flag})" if flag else field


@contextlib.contextmanager
def given_by_flags(flags: Mapping[str, str]) -> Iterator[None]:
    """Configs validated in the block name each field in `flags` (field -> its flag) with
    that flag: `jobs/pretrain.py --accelerator-type` was refused as `accelerator_types`."""
    token = _FIELD_FLAGS.set(flags)
    try:
        yield
    finally:
        _FIELD_FLAGS.reset(token)


def is_seed(value: Any) -> bool:
    """An integer torch.manual_seed takes: beyond its range a run failed where the seed was
    first used (every worker at start, or the compression report after every stage)."""
    return is_int(value) and -2 ** 63 <= value < 2 ** 64


# The most torch intra-op threads any flag or field may ask for (compression's --threads,
# serving's torch_threads, bench_compress and bench_serve): 100,000 was accepted, and libgomp,
# unable to make that many threads, killed the process with SIGSEGV at its first parallel op.
# A fixed number, not one scaled by this machine's CPUs: a config checked on one node runs on
# another (a replica, a resumed compression), and must mean the same on both. Past the CPUs
# there are, more threads only contend.
MAX_TORCH_THREADS = 1024
TORCH_THREADS_RULE = f"must be an integer in [1, {MAX_TORCH_THREADS}]"


def is_torch_threads(value: Any) -> bool:
    """A count of threads torch.set_num_threads may be given (TORCH_THREADS_RULE)."""
    return is_int(value) and 1 <= value <= MAX_TORCH_THREADS


class _NoDefault:
    def __repr__(self) -> str:
        return "(absent)"


def saved_fields_problem(saved: Any, always_saved: tuple[str, ...], what: str) -> str | None:
    """What makes `saved` (a config as a file of this project recorded it: a mapping of field
    names) no such record, in words to follow the file's name, or None: not a mapping, or
    lacking a field of `always_saved` (those every version wrote: without one the file is
    damaged or another program's, and the field's default would describe another model).
    Fields added later are left to their defaults, which behave as before they existed."""
    if not isinstance(saved, Mapping):
        return f"its {what} is no mapping of fields ({type(saved).__name__})"
    missing = [name for name in always_saved if name not in saved]
    if not missing:
        return None
    return (f"its {what} lacks {', '.join(map(repr, missing))}, which every config this "
            "project saves records: the file is damaged or not this project's")


def resume_conflicts(saved: Mapping[str, Any], config: Any,
                     resumable: frozenset[str]) -> list[str]:
    """'field: old -> new' for every field of the dataclass `config` (outside `resumable`)
    whose value differs from the `saved` config of the run being resumed.

    A field the saved config lacks was written by a version that predated the field; that
    version behaved as the field's default does (a new field's default keeps the old
    behaviour), so it counts as the default: no conflict when the current value is the
    default, a conflict shown as 'default -> new' otherwise. Counting every absent field as
    a conflict would refuse every old run after any field is added, even with unchanged
    settings; ignoring absent fields would let a non-default value of a new field reuse work
    that was done without it."""
    current = dataclasses.asdict(config)  # as saved: the saved side was written from this
    conflicts = []
    for field in dataclasses.fields(config):
        if field.name in resumable:
            continue
        value = current[field.name]
        old = saved[field.name] if field.name in saved else _default(field)
        if old != value:
            conflicts.append(f"{field.name}: {old!r} -> {value!r}")
    return conflicts


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return _NoDefault()  # a required field: there is no value the old run can be assumed to have
