"""Decoding attention on a CPU, each row reading only its own keys and values (a paged
attention kernel, compiled by numba).

A continuous batch's decoding rows have different lengths. Batched matrix products need
one shape, so the lane path of paged.py reads every lane up to the longest row: on the
served load, half of what it reads is padding (docs/benchmarks.md, 2026-12-04), and that
attention is half of a step. This kernel walks each row's block table instead and reads
exactly its positions: for each row and head, the query's scores against the row's keys,
a softmax, and the weighted sum of its values, in one pass, with a per-head bias by
distance for learnt-span models. Measured against the lane path on the bench's load, in the entry of
docs/benchmarks.md that introduces it.

It runs on float32 caches on the CPU; everything else (CUDA, half precision) takes
paged.py's matrix-product paths. The compiled code is cached on disk (numba's cache), and
`warm_up` compiles it before the first request instead of during it.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit

# numba's fastmath without `nnan`/`ninf`: a learnt span's bias is -inf where its ramp is 0,
# and those flags would let the compiler assume no infinity ever appears.
_FAST = {"reassoc", "contract", "nsz", "arcp"}


def _compiled(function):
    """`function` compiled by numba, the machine code cached on disk (next to this module,
    else in the user's cache directory). Where neither can be written, numba refuses the
    cache; the kernel is then compiled in each process (~1-2 s) rather than not at all."""
    try:
        return njit(fastmath=_FAST, nogil=True, cache=True)(function)
    except RuntimeError:
        return njit(fastmath=_FAST, nogil=True)(function)


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernel can read a cache on this device, of this dtype."""
    return device.type == "cpu" and dtype == torch.float32


@_compiled
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


@_compiled
def _attend_rows(keys, values, tables, lengths, block_tokens, queries, bias, out):
    """keys, values: (heads, slots, dim); tables: (rows, blocks); lengths: (rows,) positions
    each row attends (its query is the last); queries: (rows, heads, dim); bias: (heads, >=
    longest) added to the score of the key at each distance from the query; out: (rows,
    heads, dim).

    One pass over each row's keys and values together, the softmax kept online (a running
    maximum, the sum and the weighted values rescaled when the maximum grows): each cache
    line is read once, and the output accumulates in registers. Measured 1.4x faster than
    a pass for the scores and another for the values."""
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
    _attend_rows(pool[0].numpy(), pool[1].numpy(), rows.tables, rows.lengths, rows.block_tokens,
                 queries.detach().contiguous().numpy(),
                 bias.detach().float().contiguous().numpy(), out.numpy())
    return out


def warm_up() -> None:
    """Compile (or load from numba's cache) the kernel now, on a tiny cache, so that the
    first request does not wait for it."""
    pool = torch.zeros(2, 1, 4, 2)
    attend(pool, DecodeRows([(0, 1)], [3], 2, [0]), torch.zeros(1, 1, 2), None)
