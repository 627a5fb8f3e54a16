"""The order of the sides a measurement times in rounds: each goes first in turn, so that the
shared machine's drift falls on every side alike (the benchmarks' scripts/rounds.py and the
compression report's latencies, orchestrator/compression/measure.py)."""
from __future__ import annotations


def rotated(sides: list, round_: int) -> list:
    """The sides in round `round_`'s order: each goes first in turn (a fixed order put the
    same side first every round, in the machine's drift)."""
    shift = round_ % len(sides)
    return sides[shift:] + sides[:shift]
