"""A KV cache in fixed-size blocks (paged), and the model's forward pass over it.

Continuous batching (engine.py) changes the running batch at every step: rows join and leave,
and their lengths differ. A cache with one (rows, heads, length, dim) tensor per layer would
have to be reallocated or copied at every change (left-padded to the longest row, too). Here
every layer's keys and values live in one pool of `num_blocks` blocks of `block_tokens`
positions (vLLM's PagedAttention layout); a sequence owns a list of blocks (its block table),
taken from the pool when it is admitted and given back when it leaves. Nothing that stays is
ever moved.

`paged_forward` runs the GPT over one step's work, packed without padding: for each
sequence, the new tokens it feeds (a chunk of its prompt, or its one latest token). The
per-token parts of a block (layer norms, the attention's projections, the MLP) run once over
all the step's tokens together; attention reads each sequence's keys through its block
table. Decoding rows (one query each) go, on a CPU with a float32 cache, through
decode_kernel.py, each row reading exactly its own positions; elsewhere through batched
matrix products (rows at lane starts together over a view of the lanes, other runs in
place, scattered rows gathered in groups of similar length). Each prefill chunk is one
unpadded call. It uses the model's own modules and weights (embeddings, each block's ln1,
attn.qkv, attn.proj, attn.span, ln2, mlp, then ln_f and lm_head), so fp32, INT8 and
learnt-span models are served alike; the width and head count of each layer's attention are
read off its projection, so layers may differ.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from orchestrator.serving import decode_kernel
from orchestrator.training.attention import biased_attention, span_bias


class BlockPool:
    """The free blocks of a paged cache: `allocate` takes blocks, `release` gives them back.

    A request's blocks are taken at once: at the start of a lane (every `lane_blocks`-th
    block) when one has the run free, else as one run of adjacent blocks anywhere (first
    fit), else whichever are free. On the matrix-product paths (CUDA, half precision) rows
    at lane starts are attended together over one view of the pool, rows in other runs in
    place one by one, both without copying their keys (paged_forward); the CPU's decode
    kernel reads any placement alike. Any free blocks still serve a request when the pool
    is fragmented."""

    def __init__(self, num_blocks: int, lane_blocks: int | None = None) -> None:
        if num_blocks < 1:
            raise ValueError(f"a paged KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.lane_blocks = lane_blocks
        self._free_map = bytearray(b"\x01" * num_blocks)  # 1 = free; find() runs in C
        self._free = num_blocks

    @property
    def free(self) -> int:
        return self._free

    def allocate(self, count: int) -> list[int]:
        if count > self._free:
            raise MemoryError(f"{count} KV blocks wanted, {self._free} free")
        start = self._free_lane_start(count)
        if start < 0:
            start = self._free_map.find(b"\x01" * count)
        if start >= 0:
            blocks = list(range(start, start + count))
        else:  # fragmented: the lowest free blocks
            blocks, at = [], -1
            while len(blocks) < count:
                at = self._free_map.find(1, at + 1)
                blocks.append(at)
        for block in blocks:
            self._free_map[block] = 0
        self._free -= count
        return blocks

    def _free_lane_start(self, count: int) -> int:
        """The first lane start with `count` free blocks from there, else -1 (whole lanes
        only: blocks past the last whole lane are no lane)."""
        if not self.lane_blocks or count > self.lane_blocks:
            return -1
        run = b"\x01" * count
        whole = self.num_blocks // self.lane_blocks * self.lane_blocks
        for start in range(0, whole - count + 1, self.lane_blocks):
            if self._free_map.startswith(run, start):
                return start
        return -1

    def release(self, blocks: list[int]) -> None:
        for block in blocks:
            self._free_map[block] = 1
        self._free += len(blocks)


def cache_slots(num_blocks: int, block_tokens: int) -> int:
    """Positions a PagedKVCache's tensors hold: exactly its blocks'. (Rounded up to whole
    lanes, a cache set to 64 positions for a 1,024-position model allocated 1,024, and never
    handed out the padding.)"""
    return num_blocks * block_tokens


def first_of_run(blocks: tuple[int, ...] | list[int]) -> int | None:
    """The first block when the blocks are one run of adjacent blocks, else None."""
    if blocks and blocks[-1] - blocks[0] == len(blocks) - 1 and all(
            b - a == 1 for a, b in zip(blocks, blocks[1:])):
        return blocks[0]
    return None


class PagedKVCache:
    """Keys and values of every layer in `num_blocks` blocks of `block_tokens` positions:
    layer l's tensor is (2, heads, slots, head_dim), keys at [0] and values at [1], each
    head's positions (slots: num_blocks * block_tokens) in order.
    Head-major, so a sequence's keys
    in a run of adjacent blocks are, for every head, one contiguous (positions, head_dim)
    matrix: the decode kernel streams it, and on the matrix-product paths a decoding row's
    attention is two batched matrix products over a view, with no copy (paged_forward). It
    is allocated at the layer's first write, shaped by what that layer's attention
    produces."""

    def __init__(self, num_layers: int, num_blocks: int, block_tokens: int,
                 device: torch.device | str = "cpu", lane_blocks: int | None = None,
                 use_decode_kernel: bool = True) -> None:
        """`use_decode_kernel`: decoding rows attend through decode_kernel.py where it can
        read the cache (float32 on the CPU); False keeps them on the matrix-product paths."""
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
        self.pool = BlockPool(num_blocks, lane_blocks)
        self.block_tokens = block_tokens
        self.device = torch.device(device)
        self.use_decode_kernel = use_decode_kernel
        self.layers: list[torch.Tensor | None] = [None] * num_layers
        # Lanes: the pool's whole runs of lane_blocks blocks (a sequence's longest), each a
        # row of a (heads, lanes, lane positions) view; blocks past the last whole lane are
        # handed out as any others, never attended as a lane.
        self.lane_blocks = lane_blocks or num_blocks
        self.lanes = num_blocks // self.lane_blocks
        self.slots = cache_slots(num_blocks, block_tokens)

    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_blocks * self.block_tokens

    def blocks_for(self, positions: int) -> int:
        return math.ceil(positions / self.block_tokens)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: (tokens, heads, head_dim) for the slots (tokens,); slot = block *
        block_tokens + offset."""
        if self.layers[layer] is None:
            heads, head_dim = k.shape[1:]
            self.layers[layer] = torch.zeros(
                (2, heads, self.slots, head_dim), dtype=k.dtype, device=self.device)
        self.layers[layer][:, :, slots] = torch.stack((k, v)).transpose(1, 2)

    @torch.inference_mode()  # (the pool is written in inference mode: paged_forward)
    def clear(self, blocks: list[int]) -> None:
        """Zero the keys and values of `blocks` in every layer. For the blocks of a row whose
        logits went NaN: the matrix-product paths attend a row over unwritten positions too,
        masked, and a masked NaN still makes the softmax NaN, so the next request given those
        blocks failed as well."""
        slots = torch.tensor(blocks, device=self.device).unsqueeze(1) * self.block_tokens \
            + torch.arange(self.block_tokens, device=self.device)
        for pool in self.layers:
            if pool is not None:
                pool[:, :, slots.reshape(-1)] = 0

    def gather(self, layer: int, table: torch.Tensor) -> torch.Tensor:
        """The blocks of `table` (rows, blocks) as (2, heads, rows, blocks * block_tokens,
        head_dim): each row's positions in order (a copy; the pool is not touched)."""
        pool = self.layers[layer]
        kv, heads, _, head_dim = pool.shape
        rows, width = table.shape
        blocks = pool.view(kv, heads, -1, self.block_tokens, head_dim)
        return blocks.index_select(2, table.reshape(-1)).view(
            kv, heads, rows, width * self.block_tokens, head_dim)

    def run_view(self, layer: int, first_block: int, positions: int) -> torch.Tensor:
        """Positions 0..positions-1 of a sequence whose blocks are one run starting at
        `first_block`, as (2, heads, positions, head_dim): a view, nothing copied."""
        start = first_block * self.block_tokens
        return self.layers[layer][:, :, start:start + positions]

    def lane_of(self, first_block: int | None) -> int | None:
        """The lane a sequence's run of blocks starts, or None (not a run, or not at a lane
        start)."""
        if first_block is None or first_block % self.lane_blocks \
                or first_block // self.lane_blocks >= self.lanes:
            return None
        return first_block // self.lane_blocks

    def lane_view(self, layer: int, positions: int) -> torch.Tensor:
        """Positions 0..positions-1 of every lane as (2, heads, lanes, positions, head_dim):
        a view, nothing copied."""
        lane_positions = self.lane_blocks * self.block_tokens
        whole = self.layers[layer][:, :, :self.lanes * lane_positions]
        return whole.unflatten(2, (self.lanes, lane_positions))[:, :, :, :positions]

    def slot(self, blocks: tuple[int, ...], position: int) -> int:
        return blocks[position // self.block_tokens] * self.block_tokens \
            + position % self.block_tokens


@dataclass(frozen=True)
class Segment:
    """One sequence's work in a step: the tokens it feeds, at positions start.. (the
    positions before are in the cache), and its block table."""

    blocks: tuple[int, ...]
    start: int
    tokens: tuple[int, ...]
    first_block: int | None = None  # set when the blocks are one run (first_of_run)


def _one_query_masks(lengths: torch.Tensor, longest: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows of one query (their last position) over keys padded to `longest`: which keys
    are real, and each key's distance from the query, both (rows, 1 query, longest)."""
    key_positions = torch.arange(longest, device=lengths.device)
    allowed = (key_positions < lengths.unsqueeze(1)).unsqueeze(1)
    distance = ((lengths - 1).unsqueeze(1) - key_positions).unsqueeze(1)
    return allowed, distance


class _DecodeGroup:
    """Decoding rows (one new token each) of similar length, attended together: which packed
    token is each row's query, its block table padded to the group's longest row, and the
    mask of real keys. Built once per step and used by every layer."""

    def __init__(self, cache: PagedKVCache, segments: list[Segment], token_index: list[int],
                 device: torch.device) -> None:
        lengths = torch.tensor([s.start + 1 for s in segments])
        longest = int(lengths.max())
        width = cache.blocks_for(longest)
        self.table = torch.tensor([list(s.blocks[:width]) + [0] * (width - len(s.blocks[:width]))
                                   for s in segments], dtype=torch.long, device=device)
        self.longest = longest
        self.allowed, self.distance = _one_query_masks(lengths.to(device), longest)
        self.token_index = torch.tensor(token_index, device=device)


class _LaneBatch:
    """Decoding rows whose blocks start a lane, attended together over a view of every lane
    (PagedKVCache.lane_view) up to the longest row: which lane and which packed token each
    row is, and the bias that keeps each lane to its row's keys (a lane without a decoding
    row attends its first position, and its output is dropped). Built once per step and
    used by every layer."""

    def __init__(self, cache: PagedKVCache, segments: list[Segment], token_index: list[int],
                 device: torch.device) -> None:
        self.lane = torch.tensor([cache.lane_of(s.first_block) for s in segments],
                                 dtype=torch.long, device=device)
        lengths = torch.ones(cache.lanes, dtype=torch.long, device=device)
        lengths[self.lane] = torch.tensor([s.start + 1 for s in segments], device=device)
        self.longest = max(s.start + 1 for s in segments)
        self.allowed, self.distance = _one_query_masks(lengths, self.longest)  # (lanes, 1, L)
        self.bias = torch.zeros(self.allowed.shape, device=device).masked_fill(
            ~self.allowed, float("-inf"))
        self.token_index = torch.tensor(token_index, device=device)


def _lane_attention(cache: PagedKVCache, layer: int, batch: _LaneBatch, q: torch.Tensor,
                    span) -> torch.Tensor:
    """The lane rows' attention (their queries taken from q: tokens, heads, head_dim):
    (rows, heads, head_dim). Two matrix products over every lane at once, batched over heads
    and lanes: a few large operations per layer instead of a few small ones per row, which
    on a CPU also means far fewer hand-overs of Python's GIL to the replica's other threads
    than a call per row."""
    heads, dim = q.shape[1:]
    kv = cache.lane_view(layer, batch.longest)
    query = q.new_zeros(heads, cache.lanes, 1, dim)
    query[:, batch.lane, 0] = q[batch.token_index].transpose(0, 1)
    bias = batch.bias if span is None else span_bias(span, batch.distance, batch.allowed)
    out = biased_attention(query, kv[0], kv[1], bias, 0.0)  # (H, lanes, 1, D)
    return out[:, batch.lane, 0].transpose(0, 1)


def decode_groups(lengths: list[int], spread: float = 1.25) -> list[list[int]]:
    """Indices of rows split into groups of similar length (longest first), a group's longest
    at most `spread` times its shortest: every row of a group is padded to its longest, and
    the padding costs copies and attention work for nothing."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[groups[-1][0]] <= spread * max(lengths[i], 1):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
            distance: torch.Tensor, span) -> torch.Tensor:
    """q (B, H, Tq, D), k/v (B, H, L, D), allowed/distance (B, Tq, L): attention output."""
    if span is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed.unsqueeze(1))
    bias = span_bias(span, distance, allowed).transpose(0, 1)  # (H, B, ..) -> (B, H, ..)
    return biased_attention(q, k, v, bias, 0.0)


class _KernelDecode:
    """Decoding rows through the CPU's decode kernel: each row walks its own block table
    and reads exactly its positions (decode_kernel.py)."""

    def __init__(self, cache: PagedKVCache, segments: list[Segment], token_index: list[int]
                 ) -> None:
        self.rows = decode_kernel.DecodeRows([s.blocks for s in segments],
                                             [s.start + 1 for s in segments],
                                             cache.block_tokens, token_index)

    def attend(self, cache: PagedKVCache, layer: int, q: torch.Tensor, span,
               y: torch.Tensor) -> None:
        index = self.rows.token_index
        y[index] = decode_kernel.attend(cache.layers[layer], self.rows, q[index],
                                        _distance_bias(span, self.rows.longest, cache.device))


class _MatmulDecode:
    """Decoding rows through batched matrix products (CUDA, half precision, or the kernel
    turned off): rows at lane starts together over a view of the lanes; rows in other runs
    of blocks in place, one by one; the others in groups of similar length, through a
    gather of their blocks."""

    def __init__(self, cache: PagedKVCache, segments: list[Segment], token_index: list[int]
                 ) -> None:
        device = cache.device
        rows = list(zip(segments, token_index))
        in_lane = [(s, t) for s, t in rows if cache.lane_of(s.first_block) is not None]
        self.lanes = (_LaneBatch(cache, *map(list, zip(*in_lane)), device) if in_lane
                      else None)
        self.in_place = [(s, t) for s, t in rows if s.first_block is not None
                         and cache.lane_of(s.first_block) is None]
        self.in_place_index = torch.tensor([t for _, t in self.in_place], dtype=torch.long,
                                           device=device)
        scattered = [(s, t) for s, t in rows if s.first_block is None]
        self.groups = [_DecodeGroup(cache, [scattered[j][0] for j in group],
                                    [scattered[j][1] for j in group], device)
                       for group in decode_groups([s.start + 1 for s, _ in scattered])]

    def attend(self, cache: PagedKVCache, layer: int, q: torch.Tensor, span,
               y: torch.Tensor) -> None:
        if self.lanes is not None:
            y[self.lanes.token_index] = _lane_attention(cache, layer, self.lanes, q, span)
        if self.in_place:
            y[self.in_place_index] = _in_place_attention(
                cache, layer, [s for s, _ in self.in_place], q[self.in_place_index], span,
                cache.device)
        for group in self.groups:
            kv = cache.gather(layer, group.table)[..., :group.longest, :]  # (2, H, B, L, D)
            keys, values = kv[0].transpose(0, 1), kv[1].transpose(0, 1)  # (B, H, L, D)
            query = q[group.token_index].unsqueeze(2)  # (B, H, 1, D)
            out = _attend(query, keys, values, group.allowed, group.distance, span)
            y[group.token_index] = out.squeeze(2)


def _decode_plan(cache: PagedKVCache, segments: list[Segment], ends: list[int],
                 dtype: torch.dtype) -> _KernelDecode | _MatmulDecode | None:
    """How this step's decoding rows (one new token each) attend: the kernel where it can
    read the cache, else the matrix-product paths; None without decoding rows."""
    decoding = [i for i, s in enumerate(segments) if len(s.tokens) == 1]
    if not decoding:
        return None
    plan = (_KernelDecode if cache.use_decode_kernel
            and decode_kernel.supports(cache.device, dtype) else _MatmulDecode)
    return plan(cache, [segments[i] for i in decoding], [ends[i] - 1 for i in decoding])


@torch.inference_mode()
def paged_forward(model: torch.nn.Module, cache: PagedKVCache,
                  segments: list[Segment]) -> torch.Tensor:
    """Feed every segment's tokens, write their keys/values into the cache, and return the
    logits (segments, vocab) at each segment's last token."""
    device = cache.device
    tokens = torch.tensor([t for s in segments for t in s.tokens], device=device)
    positions = torch.tensor([p for s in segments
                              for p in range(s.start, s.start + len(s.tokens))], device=device)
    slots = torch.tensor([cache.slot(s.blocks, p) for s in segments
                          for p in range(s.start, s.start + len(s.tokens))], device=device)
    ends = list(itertools.accumulate(len(s.tokens) for s in segments))
    x = model.drop(model.tok_emb(tokens) + model.pos_emb(positions))
    decode = _decode_plan(cache, segments, ends, x.dtype)
    prefills = [(s, ends[i] - len(s.tokens)) for i, s in enumerate(segments)
                if len(s.tokens) > 1]
    count = x.size(0)
    for layer, block in enumerate(model.blocks):
        attn = block.attn
        qkv = attn.qkv(block.ln1(x))
        width = qkv.size(-1) // 3
        heads = attn.n_head
        q, k, v = qkv.view(count, 3, heads, width // heads).unbind(1)  # (N, H, D) each
        cache.write(layer, slots, k, v)
        y = torch.empty_like(q)
        if decode is not None:
            decode.attend(cache, layer, q, attn.span, y)
        for segment, first in prefills:
            end = first + len(segment.tokens)
            y[first:end] = _prefill_attention(cache, layer, segment, q[first:end],
                                              k[first:end], v[first:end], attn.span, device)
        x = x + attn.proj(y.reshape(count, width))
        x = x + block.mlp(block.ln2(x))
    last = torch.tensor([e - 1 for e in ends], device=device)
    return model.lm_head(model.ln_f(x[last]))


def _distance_bias(span, longest: int, device) -> torch.Tensor | None:
    """A learnt span's bias by distance from the query, (heads, longest), for the decode
    kernel; None without a span."""
    if span is None:
        return None
    distance = torch.arange(longest, device=device)
    return span_bias(span, distance, torch.ones(longest, dtype=torch.bool, device=device))


def _in_place_attention(cache: PagedKVCache, layer: int, segments: list[Segment],
                        queries: torch.Tensor, span, device) -> torch.Tensor:
    """Decoding rows whose blocks are one run (queries: rows, heads, head_dim), each over its
    keys read in place: (rows, heads, head_dim). A row is two matrix products batched over
    its heads, on views of the head-major pool: one query needs no attention kernel, and a
    call per row costs less than copying the rows' keys into one padded batch (the copy,
    not the arithmetic, is what a decoding step's attention spends on a CPU)."""
    if span is not None:
        return torch.cat([_in_place_span_attention(cache, layer, segment, query, span, device)
                          for segment, query in zip(segments, queries)])
    pool = cache.layers[layer]
    keys_t, values = pool[0].transpose(1, 2), pool[1]  # (H, D, slots), (H, slots, D)
    scaled = (queries * queries.size(-1) ** -0.5).unsqueeze(2).unbind(0)  # rows x (H, 1, D)
    out = []
    for segment, query in zip(segments, scaled):
        start = segment.first_block * cache.block_tokens
        end = start + segment.start + 1
        weights = torch.bmm(query, keys_t[:, :, start:end]).softmax(-1, dtype=torch.float32)
        out.append(torch.bmm(weights.to(values.dtype), values[:, start:end]))
    return torch.stack(out).squeeze(2)


def _in_place_span_attention(cache: PagedKVCache, layer: int, segment: Segment,
                             query: torch.Tensor, span, device) -> torch.Tensor:
    """One decoding row of a learnt-span model (query: heads, head_dim) over its keys read
    in place, its span's ramp as a bias: (1, heads, head_dim)."""
    length = segment.start + 1
    kv = cache.run_view(layer, segment.first_block, length).unsqueeze(1)  # (2, 1, H, L, D)
    distance = (length - 1 - torch.arange(length, device=device)).view(1, 1, length)
    return _attend(query.view(1, -1, 1, query.size(-1)), kv[0], kv[1], distance >= 0,
                   distance, span)[:, :, 0]


def _prefill_attention(cache: PagedKVCache, layer: int, segment: Segment, q: torch.Tensor,
                       k: torch.Tensor, v: torch.Tensor, span, device) -> torch.Tensor:
    """Causal attention of one prompt chunk (T, H, D) over its sequence so far: the chunk's
    own keys when it starts the sequence, else the cached ones up to its end."""
    time, start = q.size(0), segment.start
    q = q.transpose(0, 1).unsqueeze(0)  # (1, H, T, D)
    if not start:
        k, v = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
    elif segment.first_block is not None:
        kv = cache.run_view(layer, segment.first_block, start + time).unsqueeze(1)
        k, v = kv[0], kv[1]  # (1, H, L, D)
    else:
        width = cache.blocks_for(start + time)
        table = torch.tensor([segment.blocks[:width]], dtype=torch.long, device=device)
        kv = cache.gather(layer, table)[..., :start + time, :]  # (2, H, 1, L, D)
        k, v = kv[0].transpose(0, 1), kv[1].transpose(0, 1)
    if span is None and not start:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)[0].transpose(0, 1)
    q_positions = torch.arange(start, start + time, device=device).unsqueeze(1)
    distance = q_positions - torch.arange(start + time, device=device).unsqueeze(0)
    out = _attend(q, k, v, (distance >= 0).unsqueeze(0), distance.unsqueeze(0), span)
    return out[0].transpose(0, 1)
