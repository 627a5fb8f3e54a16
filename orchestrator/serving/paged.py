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
table: one padded gather for the decoding rows (one query each), and one unpadded call per
prefill chunk. It uses the model's own modules and weights (embeddings, each block's ln1,
attn.qkv, attn.proj, attn.span, ln2, mlp, then ln_f and lm_head), so fp32, INT8 and
learnt-span models are served alike; the width and head count of each layer's attention are
read off its projection, so layers may differ.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from orchestrator.training.attention import biased_attention, span_bias


class BlockPool:
    """The free blocks of a paged cache: `allocate` takes blocks, `release` gives them back."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a paged KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first

    @property
    def free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise MemoryError(f"{count} KV blocks wanted, {len(self._free)} free")
        return [self._free.pop() for _ in range(count)]

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


class PagedKVCache:
    """Keys and values of every layer in `num_blocks` x `block_tokens` slots; slot
    `b * block_tokens + i` is position i of block b. A layer's tensors are allocated at its
    first write, shaped by what that layer's attention produces (heads, head_dim)."""

    def __init__(self, num_layers: int, num_blocks: int, block_tokens: int,
                 device: torch.device | str = "cpu") -> None:
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
        self.pool = BlockPool(num_blocks)
        self.block_tokens = block_tokens
        self.device = torch.device(device)
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_blocks * self.block_tokens

    def blocks_for(self, positions: int) -> int:
        return math.ceil(positions / self.block_tokens)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: (tokens, heads, head_dim) for the slots (tokens,)."""
        if self.keys[layer] is None:
            shape = (self.capacity_tokens, *k.shape[1:])
            self.keys[layer] = torch.zeros(shape, dtype=k.dtype, device=self.device)
            self.values[layer] = torch.zeros(shape, dtype=v.dtype, device=self.device)
        self.keys[layer][slots] = k
        self.values[layer][slots] = v

    def slots(self, blocks: list[int], start: int, stop: int) -> torch.Tensor:
        """The slots of positions start..stop-1 of a sequence with this block table."""
        positions = torch.arange(start, stop)
        table = torch.tensor(blocks, dtype=torch.long)
        return table[positions // self.block_tokens] * self.block_tokens \
            + positions % self.block_tokens


@dataclass(frozen=True)
class Segment:
    """One sequence's work in a step: the tokens it feeds, at positions start.. (the
    positions before are in the cache), and its block table."""

    blocks: tuple[int, ...]
    start: int
    tokens: tuple[int, ...]


class _DecodeGroup:
    """Index tensors of the decoding rows (one new token each), built once per step and used
    by every layer: which packed token is each row's query, and the slots of its keys padded
    to the longest row, with a mask of the real ones."""

    def __init__(self, cache: PagedKVCache, segments: list[Segment], token_index: list[int],
                 device: torch.device) -> None:
        bt = cache.block_tokens
        lengths = torch.tensor([s.start + 1 for s in segments])
        longest = int(lengths.max())
        width = math.ceil(longest / bt)
        table = torch.zeros((len(segments), width), dtype=torch.long)
        for r, s in enumerate(segments):
            table[r, :len(s.blocks[:width])] = torch.tensor(s.blocks[:width], dtype=torch.long)
        slots = (table.unsqueeze(2) * bt + torch.arange(bt)).view(len(segments), -1)
        self.key_slots = slots[:, :longest].to(device)
        key_positions = torch.arange(longest)
        self.valid = (key_positions.unsqueeze(0) < lengths.unsqueeze(1)).to(device)  # (B, L)
        self.distance = ((lengths - 1).unsqueeze(1) - key_positions).unsqueeze(1).to(device)
        self.token_index = torch.tensor(token_index, device=device)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
            distance: torch.Tensor, span) -> torch.Tensor:
    """q (B, H, Tq, D), k/v (B, H, L, D), allowed/distance (B, Tq, L): attention output."""
    if span is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed.unsqueeze(1))
    bias = span_bias(span, distance, allowed).transpose(0, 1)  # (H, B, ..) -> (B, H, ..)
    return biased_attention(q, k, v, bias, 0.0)


@torch.inference_mode()
def paged_forward(model: torch.nn.Module, cache: PagedKVCache,
                  segments: list[Segment]) -> torch.Tensor:
    """Feed every segment's tokens, write their keys/values into the cache, and return the
    logits (segments, vocab) at each segment's last token."""
    device = cache.device
    tokens = torch.tensor([t for s in segments for t in s.tokens], device=device)
    positions = torch.cat([torch.arange(s.start, s.start + len(s.tokens)) for s in segments])
    slots = torch.cat([cache.slots(list(s.blocks), s.start, s.start + len(s.tokens))
                       for s in segments]).to(device)
    ends = torch.tensor([len(s.tokens) for s in segments]).cumsum(0)
    decoding = [i for i, s in enumerate(segments) if len(s.tokens) == 1]
    decode = (_DecodeGroup(cache, [segments[i] for i in decoding],
                           [int(ends[i]) - 1 for i in decoding], device) if decoding else None)
    prefills = [(s, int(ends[i]) - len(s.tokens)) for i, s in enumerate(segments)
                if len(s.tokens) > 1]
    x = model.drop(model.tok_emb(tokens) + model.pos_emb(positions.to(device)))
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
            keys = cache.keys[layer][decode.key_slots].transpose(1, 2)  # (B, H, L, D)
            values = cache.values[layer][decode.key_slots].transpose(1, 2)
            query = q[decode.token_index].unsqueeze(2)  # (B, H, 1, D)
            out = _attend(query, keys, values, decode.valid.unsqueeze(1), decode.distance,
                          attn.span)
            y[decode.token_index] = out.squeeze(2)
        for segment, first in prefills:
            y[first:first + len(segment.tokens)] = _prefill_attention(
                cache, layer, segment, q[first:first + len(segment.tokens)],
                k[first:first + len(segment.tokens)], v[first:first + len(segment.tokens)],
                attn.span, device)
        x = x + attn.proj(y.reshape(count, width))
        x = x + block.mlp(block.ln2(x))
    last = (ends - 1).to(device)
    return model.lm_head(model.ln_f(x[last]))


def _prefill_attention(cache: PagedKVCache, layer: int, segment: Segment, q: torch.Tensor,
                       k: torch.Tensor, v: torch.Tensor, span, device) -> torch.Tensor:
    """Causal attention of one prompt chunk (T, H, D) over its sequence so far: the chunk's
    own keys when it starts the sequence, else the cached ones up to its end."""
    time, start = q.size(0), segment.start
    if start:
        key_slots = cache.slots(list(segment.blocks), 0, start + time).to(device)
        k, v = cache.keys[layer][key_slots], cache.values[layer][key_slots]
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, H, T|L, D)
    if span is None and not start:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)[0].transpose(0, 1)
    q_positions = torch.arange(start, start + time, device=device).unsqueeze(1)
    distance = q_positions - torch.arange(start + time, device=device).unsqueeze(0)
    out = _attend(q, k, v, (distance >= 0).unsqueeze(0), distance.unsqueeze(0), span)
    return out[0].transpose(0, 1)
