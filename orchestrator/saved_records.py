"""Records read back from the scheduler's saved state (a JSON document in the GCS): each field
checked against its dataclass's type before the scheduler relies on it, so that one corrupt
value costs its own record (named, skipped) rather than an exception later, in arithmetic the
scheduler runs on every pass (a `started_at` of null crash-looped a restarted scheduler).
Fields a newer version added are left out: a scheduler rolled back after an upgrade still
reads what the newer one saved."""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any

from orchestrator.config import JobSpec
from orchestrator.validation import is_number

# The scheduler state's format (SchedulerCore.to_dict). Raised when a change means an older
# scheduler would misread the state; an older one meeting a newer version says so and keeps
# the document aside (ray_layer/scheduler_actor.py) before its first save replaces it.
SAVED_STATE_VERSION = 1


def saved_fields(cls: type, data: Any, what: str,
                 names: typing.Iterable[str] | None = None) -> dict[str, Any]:
    """The fields of dataclass `cls` found in `data` (only `names` when given), each checked
    against its declared type; ValueError naming `what` and the field otherwise. Unknown keys
    are left out. Fields typed as other dataclasses are not checked: the caller rebuilds them."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{what} is a JSON {type(data).__name__}, not an object")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    wanted = set(fields) if names is None else set(names)
    hints = typing.get_type_hints(cls)
    values = {name: value for name, value in data.items() if name in wanted}
    missing = [name for name in fields if name in wanted and name not in values
               and fields[name].default is dataclasses.MISSING
               and fields[name].default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{what} lacks {', '.join(missing)}")
    for name, value in values.items():
        checked, problem = _as_type(hints[name], value)
        if problem:
            raise ValueError(f"{what}'s {name} is {_short(value)}, not {problem}")
        values[name] = checked
    return values


def continued_clock(saved: Any, time_now: float) -> tuple[float, str | None]:
    """Where a restarted scheduler's clock starts (wall-clock seconds, as its `now`): the
    host's clock (`time_now`, time.time()) moved by how far its predecessor's clock stood
    from the host's at its last save (`saved`: {"time": time.time(), "clock": its clock},
    read together). The scheduler's clock never jumps with the host's (a step would age every
    heartbeat at once), so after a step it stands apart from it; a successor starting afresh
    at the host's time shifted every saved time (a job's start, its wait, a silent node's
    last report) by the step: run times inflated by it (LAS levels), or times in the future.
    Nothing saved (a first scheduler, a state saved before the clock was): the host's clock.
    (start, None), or (the host's clock, why the saved clock was not used)."""
    if saved is None:
        return time_now, None
    host, clock = (saved.get("time"), saved.get("clock")) if isinstance(saved, Mapping) \
        else (None, None)
    if not (is_number(host) and is_number(clock)):
        return time_now, (f"the saved clock {_short(saved)} is not two numbers (time, clock): "
                          "the scheduler's clock starts at the host's, and times saved before "
                          "a step of the host's clock are off by that step")
    return time_now + (clock - host), None


def saved_spec(data: Any, what: str) -> JobSpec:
    """A JobSpec from saved state: fields a newer version added left out, the rest validated
    as any JobSpec (a user's job file is refused for unknown fields; saved state is not)."""
    if data is None:
        raise ValueError(f"{what} lacks spec")
    if not isinstance(data, Mapping):
        raise ValueError(f"{what}'s spec is a JSON {type(data).__name__}, not an object")
    known = {f.name for f in dataclasses.fields(JobSpec)}
    return JobSpec.from_dict({k: v for k, v in data.items() if k in known})


def _as_type(hint: Any, value: Any) -> tuple[Any, str | None]:
    """(value, None) when `value` is a `hint` (JSON lists become tuples for tuple fields), or
    (value, what it should have been)."""
    options = typing.get_args(hint) if _is_union(hint) else ()
    if options:
        if value is None and type(None) in options:
            return value, None
        problems = []
        for option in (o for o in options if o is not type(None)):
            checked, problem = _as_type(option, value)
            if problem is None:
                return checked, None
            problems.append(problem)
        return value, " or ".join(problems + (["null"] if type(None) in options else []))
    origin = typing.get_origin(hint)
    if hint is bool:
        return value, None if isinstance(value, bool) else "true or false"
    if hint is int:
        return value, None if isinstance(value, int) and not isinstance(value, bool) \
            else "an integer"
    if hint is float:  # infinity is a value some fields hold (a single node's bandwidth)
        # (is_number: an int past float's range, which JSON may hold, raised OverflowError)
        number = is_number(value) or isinstance(value, float) and math.isinf(value)
        return value, None if number else "a number"
    if hint is str:
        return value, None if isinstance(value, str) else "a string"
    if origin is tuple and typing.get_args(hint)[1:] == (Ellipsis,):
        item = typing.get_args(hint)[0]
        if not isinstance(value, (list, tuple)) or any(_as_type(item, v)[1] for v in value):
            return value, f"a list of {_type_name(item)}s"
        return tuple(value), None
    if origin is dict:
        key, item = typing.get_args(hint)
        if not isinstance(value, Mapping) or any(
                _as_type(key, k)[1] or _as_type(item, v)[1] for k, v in value.items()):
            return value, f"an object of {_type_name(item)}s"
        return dict(value), None
    return value, None  # a nested dataclass or an untyped field: the caller's to check


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _type_name(hint: Any) -> str:
    return {str: "string", int: "integer", float: "number", bool: "boolean"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
