"""The CPU decode kernel (orchestrator/serving/decode_kernel.py): each row's attention over
its own blocks equals attention over its keys gathered in order, with or without a learnt
span's bias, and reads nothing past the row's length."""
import math

import pytest
import torch

from orchestrator.serving import decode_kernel
from orchestrator.serving.paged import _distance_bias
from orchestrator.training.attention import AdaptiveSpan, biased_attention

HEADS, DIM, BLOCK_TOKENS, BLOCKS = 3, 8, 4, 40


def reference(pool, table, length, query, bias):
    """One row the obvious way: its positions gathered in order, softmax attention."""
    slots = torch.tensor([table[p // BLOCK_TOKENS] * BLOCK_TOKENS + p % BLOCK_TOKENS
                          for p in range(length)])
    keys, values = pool[0][:, slots], pool[1][:, slots]  # (H, L, D)
    distance = length - 1 - torch.arange(length)
    row_bias = torch.zeros(HEADS, 1, length) if bias is None else bias[:, distance].unsqueeze(1)
    return biased_attention(query.unsqueeze(1), keys, values, row_bias, 0.0)[:, 0]  # (H, D)


def rows_and_tables():
    """Rows of every placement: one position, a block's worth exactly, a run of adjacent
    blocks, blocks out of order and scattered, a partly filled last block, and blocks held
    for positions not yet written (an engine's row holds its whole request's blocks)."""
    tables = [(7,), (3,), (10, 11, 12), (30, 2, 17), (20, 21, 25, 26, 27), (0, 1),
              (33, 34, 35, 36)]
    lengths = [1, 4, 11, 12, 18, 5, 6]
    return tables, lengths


@pytest.mark.parametrize("with_span", [False, True])
def test_kernel_equals_attention_over_the_rows_gathered_keys(with_span):
    torch.manual_seed(0)
    pool = torch.randn(2, HEADS, BLOCKS * BLOCK_TOKENS, DIM)
    tables, lengths = rows_and_tables()
    queries = torch.randn(len(tables), HEADS, DIM)
    rows = decode_kernel.DecodeRows(tables, lengths, BLOCK_TOKENS, list(range(len(tables))))
    bias = None
    if with_span:  # short spans, so that distant keys get a bias of -inf
        span = AdaptiveSpan(HEADS, max_span=16, ramp=2, init_fraction=0.25)
        bias = _distance_bias(span, rows.longest, torch.device("cpu"))
        assert torch.isinf(bias).any()
    out = decode_kernel.attend(pool, rows, queries, bias)
    for r, (table, length) in enumerate(zip(tables, lengths)):
        expected = reference(pool, table, length, queries[r], bias)
        torch.testing.assert_close(out[r], expected, rtol=1e-5, atol=1e-6)


def test_kernel_reads_nothing_past_a_rows_length():
    # Every position a row does not own is NaN: one read of it would make the output NaN.
    torch.manual_seed(1)
    pool = torch.full((2, HEADS, BLOCKS * BLOCK_TOKENS, DIM), math.nan)
    tables, lengths = rows_and_tables()
    for table, length in zip(tables, lengths):
        for p in range(length):
            slot = table[p // BLOCK_TOKENS] * BLOCK_TOKENS + p % BLOCK_TOKENS
            pool[:, :, slot] = torch.randn(2, HEADS, DIM)
    queries = torch.randn(len(tables), HEADS, DIM)
    rows = decode_kernel.DecodeRows(tables, lengths, BLOCK_TOKENS, list(range(len(tables))))
    out = decode_kernel.attend(pool, rows, queries, None)
    assert torch.isfinite(out).all()
    for r, (table, length) in enumerate(zip(tables, lengths)):
        torch.testing.assert_close(out[r], reference(pool, table, length, queries[r], None),
                                   rtol=1e-5, atol=1e-6)


def test_kernel_only_claims_float32_caches_on_the_cpu_at_few_threads(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert decode_kernel.supports(cpu, torch.float32)
    assert not decode_kernel.supports(cpu, torch.bfloat16)
    assert not decode_kernel.supports(cuda, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(decode_kernel.MAX_THREADS + 1)
        assert not decode_kernel.supports(cpu, torch.float32)
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(decode_kernel, "available", lambda: False)  # numba does not import
    assert not decode_kernel.supports(cpu, torch.float32)


@pytest.mark.parametrize("table, length", [((3,), 0), ((3,), 5), ((3, 4), 9)])
def test_rows_the_kernel_would_misread_are_refused(table, length):
    # The compiled kernel checks no bounds: a row longer than its blocks would read another
    # row's keys, and an empty row would divide by zero.
    with pytest.raises(ValueError, match="decode row 0"):
        decode_kernel.DecodeRows([table], [length], BLOCK_TOKENS, [0])


def test_the_kernel_compiles_where_numba_has_nowhere_to_cache_it():
    # A function with no source file: numba refuses cache=True for it, as it does where
    # neither this package's directory nor the user's cache directory can be written.
    namespace: dict = {}
    exec("def double(x):\n    return 2 * x\n", namespace)
    assert decode_kernel._compiled(namespace["double"])(21) == 42
