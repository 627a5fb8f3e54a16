"""Decoding attention on a CPU, each row reading only its own keys and values (a paged
attention kernel, compiled by numba).

A continuous batch's decoding rows have different lengths. Batched matrix products need
one shape, so the lane path of paged.py reads every lane up to the longest row: on the
served load, half of what it reads is padding (docs/benchmarks.md, 2026-12-04), and that
attention is half of a step. This kernel walks each row's block table instead and reads
exactly its positions: for each row and head, the query's scores against the row's keys,
a softmax, and the weighted sum of its values, in one pass, with a per-head bias by
distance for learnt-span models. Measured against the lane path on the bench's load in
docs/benchmarks.md (2026-12-04, "a CPU decode kernel").

It runs on float32 caches on the CPU with at most two torch threads (it runs on one: faster
than the matrix products at one and two threads, not measured beyond); everything else
(CUDA, half precision, more threads, numba missing) takes paged.py's matrix-product paths.
numba is imported and the kernel compiled on first use: `warm_up` does it when an engine
opens, not in the first request's step, and numba's disk cache makes it quick after the
first process.
"""
from __future__ import annotations

import functools
import logging
import math

import numpy as np
import torch

log = logging.getLogger(__name__)

# numba's fastmath without `nnan`/`ninf`: a learnt span's bias is -inf where its ramp is 0,
# and those flags would let the compiler assume no infinity ever appears.
_FAST = {"reassoc", "contract", "nsz", "arcp"}
MAX_THREADS = 2  # torch threads up to which the one-thread kernel was measured faster


@functools.cache
def available() -> bool:
    """Whether numba imports here (it is a dependency; a broken install falls back)."""
    try:
        import numba  # noqa: F401
    except Exception as error:  # ImportError, or a numba/numpy version mismatch
        log.warning("numba does not import (%s): decoding attention takes the matrix-product "
                    "paths", error)
        return False
    return True


def _compiled(function):
    """`function` compiled by numba, the machine code cached on disk (next to this module,
    else in the user's cache directory). Where neither can be written, numba refuses the
    cache; the kernel is then compiled in each process (~1-2 s) rather than not at all."""
    from numba import njit

    try:
        return njit(fastmath=_FAST, nogil=True, cache=True)(function)
    except RuntimeError:
        return njit(fastmath=_FAST, nogil=True)(function)


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernel serves a cache on this device, of this dtype, at this process's
    torch thread count."""
    return (device.type == "cpu" and dtype == torch.float32
            and torch.get_num_threads() <= MAX_THREADS and available())


def _runs(table, positions, block_tokens, starts, counts):
    """A row's positions as runs of adjacent slots: (first slot, length) into starts and
    counts; returns how many. Adjacent blocks (the usual case) make one run."""
    runs, block, done = 0, 0, 0
    while done < positions:
        first = table[block]
        span = 1
        while (block + span) * block_tokens < positions and table[block + span] == first + span:
            span += 1
        length = min(span * block_tokens, positions - done)
        starts[runs] = first * block_tokens
        counts[runs] = length
        runs += 1
        block += span
        done += length
    return runs


def _attend_rows(keys, values, tables, lengths, block_tokens, queries, bias, out):
    """keys, values: (heads, slots, dim); tables: (rows, blocks); lengths: (rows,) positions
    each row attends (its query is the last); queries: (rows, heads, dim); bias: (heads, >=
    longest) added to the score of the key at each distance from the query; out: (rows,
    heads, dim).

    One pass over each row's keys and values together, the softmax kept online (a running
    maximum, the sum and the weighted values rescaled when the maximum grows): each cache
    line is read once, and the output accumulates in registers. Faster than a pass for the
    scores and another for the values (docs/benchmarks.md)."""
    rows, heads, dim = queries.shape
    scale = np.float32(1.0 / math.sqrt(dim))
    acc = np.empty(dim, dtype=np.float32)
    starts = np.empty(tables.shape[1], dtype=np.int64)
    counts = np.empty(tables.shape[1], dtype=np.int64)
    for r in range(rows):
        n = lengths[r]
        runs = _runs(tables[r], n, block_tokens, starts, counts)
        for h in range(heads):
            q, head_keys, head_values, head_bias = queries[r, h], keys[h], values[h], bias[h]
            top = np.float32(-1e30)  # finite: exp(top - s) is then 0, not nan, at first
            total = np.float32(0.0)
            acc[:] = 0.0
            p = 0
            for run in range(runs):
                for slot in range(starts[run], starts[run] + counts[run]):
                    key = head_keys[slot]
                    s = np.float32(0.0)
                    for d in range(dim):
                        s += q[d] * key[d]
                    s = s * scale + head_bias[n - 1 - p]
                    if s > top:  # a new maximum: rescale what is summed so far
                        shrink = np.exp(top - s)
                        total *= shrink
                        for d in range(dim):
                            acc[d] *= shrink
                        top = s
                    weight = np.exp(s - top)
                    total += weight
                    value = head_values[slot]
                    for d in range(dim):
                        acc[d] += weight * value[d]
                    p += 1
            inverse = np.float32(1.0) / total
            for d in range(dim):
                out[r, h, d] = acc[d] * inverse


class DecodeRows:
    """One step's decoding rows as the kernel reads them: block tables padded to the widest
    (the padding is never read: each row stops at its length), lengths, and which packed
    token is each row's query. Built once per step, used by every layer."""

    def __init__(self, tables: list[tuple[int, ...]], lengths: list[int], block_tokens: int,
                 token_index: list[int]) -> None:
        for row, (table, length) in enumerate(zip(tables, lengths)):
            if not 1 <= length <= len(table) * block_tokens:  # the kernel checks no bounds
                raise ValueError(f"decode row {row}: {length} positions, {len(table)} blocks "
                                 f"of {block_tokens}")
        width = max(len(t) for t in tables)
        self.tables = np.zeros((len(tables), width), dtype=np.int64)
        for row, table in enumerate(tables):
            self.tables[row, :len(table)] = table
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.longest = int(self.lengths.max())
        self.block_tokens = block_tokens
        self.token_index = torch.tensor(token_index, dtype=torch.long)


def attend(pool: torch.Tensor, rows: DecodeRows, queries: torch.Tensor,
           bias: torch.Tensor | None) -> torch.Tensor:
    """The rows' attention over one layer's cache `pool` (2, heads, slots, dim); queries
    (rows, heads, dim); bias (heads, >= rows.longest) by distance, or None: (rows, heads,
    dim)."""
    heads = pool.size(1)
    if bias is None:
        bias = torch.zeros(heads, rows.longest)
    out = torch.empty(queries.shape, dtype=torch.float32)
    _kernel()(pool[0].numpy(), pool[1].numpy(), rows.tables, rows.lengths, rows.block_tokens,
              queries.detach().contiguous().numpy(), bias.detach().float().contiguous().numpy(),
              out.numpy())
    return out


@functools.cache
def _kernel():
    """_attend_rows compiled (and _runs, which it calls by its global name, first)."""
    global _runs
    # py_func: after a failed compile (not cached here) a retry finds _runs compiled already.
    _runs = _compiled(getattr(_runs, "py_func", _runs))
    return _compiled(_attend_rows)


def warm_up() -> None:
    """Compile (or load from numba's cache) the kernel now, on a tiny cache, so that the
    first request does not wait for it."""
    pool = torch.zeros(2, 1, 4, 2)
    attend(pool, DecodeRows([(0, 1)], [3], 2, [0]), torch.zeros(1, 1, 2), None)
