"""A benchmark's flags checked before any work: a refusal (argparse's, exit status 2) names the
flag and the value given, where a bad value otherwise surfaced minutes later as a traceback
naming neither."""
from __future__ import annotations

import argparse
from typing import Callable

from orchestrator.validation import flag_of


def require(parser: argparse.ArgumentParser, args: argparse.Namespace, names: tuple[str, ...],
            ok: Callable[[object], bool], rule: str) -> None:
    """Refuse the first of `names` (args' attributes) whose value is not `ok`:
    "--NAME RULE, got VALUE"."""
    for name in names:
        value = getattr(args, name)
        if not ok(value):
            parser.error(f"{flag_of(name)} {rule}, got {value}")


def require_at_least(parser: argparse.ArgumentParser, args: argparse.Namespace, least: float,
                     *names: str) -> None:
    """Refuse the first of `names` below `least` (NaN included)."""
    require(parser, args, names, lambda value: value >= least, f"must be >= {least}")
