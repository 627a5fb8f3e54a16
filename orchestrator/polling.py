"""Waiting for a condition by polling: the one loop the scripts (the chaos run, the serving
benchmark) and the tests use to wait for something that happens elsewhere (a node joins, an
actor restarts, a replica serves a new checkpoint).

Pure: no Ray import; what is polled is the caller's `check`.
"""
from __future__ import annotations

import time
from typing import Callable, TypeVar

from orchestrator.validation import is_number

T = TypeVar("T")


def wait_for(what: str, check: Callable[[], T], timeout_s: float = 60.0, every_s: float = 0.5,
             ignore: tuple[type[BaseException], ...] = ()) -> T:
    """Call `check()` every `every_s` seconds until it returns something truthy; that value.

    After `timeout_s` without one: TimeoutError naming `what` (and the last exception ignored,
    if any). An exception of one of the `ignore` types counts as "not yet" (the thing checked
    may be restarting); any other propagates at once. `check` runs at least once, even with a
    timeout of 0. ValueError for a timeout or interval that is not a finite number >= 0 (a
    NaN timeout never ended)."""
    for name, value in (("timeout_s", timeout_s), ("every_s", every_s)):
        if not (is_number(value) and value >= 0):
            raise ValueError(f"wait_for({what!r}): {name} must be a finite number >= 0, "
                             f"got {value!r}")
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while True:
        try:
            value = check()
            if value:
                return value
        except ignore as e:
            last_error = e
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(every_s, left))  # no full interval past the deadline
    why = f" (last error: {type(last_error).__name__}: {last_error})" if last_error else ""
    raise TimeoutError(f"{what}: not within {timeout_s:g}s{why}")
