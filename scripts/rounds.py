"""How a benchmark orders its rounds: each side goes first in turn, and a ratio is the median
of the rounds' own ratios, so that the shared machine's drift falls on every side alike."""
from __future__ import annotations

import statistics
import time

# The one rotation: orchestrator/ may not import scripts/, and the compression report rotates
# its models the same way.
from orchestrator.rounds import rotated


def paired_rounds(first, second, rounds: int) -> dict:
    """Time `first` and `second` in `rounds` rounds, which of the two goes first alternating
    round by round (a fixed order lets the machine's drift decide: this ratio read 0.88x and
    1.53x on two days): the median of the per-round ratios first / second, their spread,
    and each side's median seconds."""
    first(), second()  # warm-up
    times: dict[str, list[float]] = {"first": [], "second": []}
    for round_ in range(rounds):
        for name, fn in rotated([("first", first), ("second", second)], round_):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {**median_ratio(times["first"], times["second"]),
            "first_s": statistics.median(times["first"]),
            "second_s": statistics.median(times["second"])}


WARM_UP = "warm-up"


def rounds_after_warm_up(sides: list, rounds: int):
    """(round, side) pairs in order: an untimed WARM_UP round of every side first (a process's
    first run of anything pays one-time costs, which fell on whichever side round 0 ran
    first), then `rounds` rounds, each side first in turn."""
    for round_ in (WARM_UP, *range(rounds)):
        for side in rotated(sides, 0 if round_ == WARM_UP else round_):
            yield round_, side


def median_ratio(tops: list[float], bottoms: list[float]) -> dict:
    """The rounds' own ratios top / bottom (round by round), their median and their spread
    [min, max]. Not a ratio of figures pooled or taken a median of over the rounds: those pair
    one round's top with another's bottom, and drift between rounds moves them."""
    ratios = [top / bottom for top, bottom in zip(tops, bottoms, strict=True)]
    return {"ratio": statistics.median(ratios), "spread": [min(ratios), max(ratios)],
            "rounds": ratios}
