"""Causal self-attention: standard (SDPA) or with a learnable per-head span, plus a KV cache.

Adaptive attention span (Sukhbaatar et al. 2019, "Adaptive Attention Span in Transformers"):
each head h learns a span z_h; its attention weight on a key at distance x is multiplied by the
soft ramp m(x) = clamp((R + z_h − x) / R, 0, 1) and renormalised, and an L1 penalty on the
spans joins the loss. The ramp makes z differentiable; the penalty makes heads that do not need
long context give it up.

The point is speed, not only a mask: a key farther than max_h(z_h) + R has weight exactly 0, so
it is never computed. Long sequences are split into blocks of that window; each block of
queries attends only to its own block and the one before (cost 2·T·W instead of T²), which is
exact because no query needs keys further back than W. The KV cache keeps only the last W keys.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class AdaptiveSpan(nn.Module):
    """Per-head learnt span z_h = span_fraction_h · max_span, with a soft ramp of width R."""

    def __init__(self, n_head: int, max_span: int, ramp: int, init_fraction: float) -> None:
        super().__init__()
        self.max_span, self.ramp = max_span, ramp
        self.span_fraction = nn.Parameter(torch.full((n_head,), float(init_fraction)))
        # (parameter version, window): the window is a host value, and reading it from the
        # device is a sync that drains a GPU's queue. The spans only change when the optimizer
        # steps (or a checkpoint loads), so it is read once per change, not per forward.
        self._window_cache: tuple[int, int] | None = None

    def spans(self) -> torch.Tensor:
        """z per head, in tokens."""
        return self.span_fraction.clamp(0, 1) * self.max_span

    def window(self) -> int:
        """Keys a query can see with non-zero weight, itself included: distances < max z + R.

        Cached by the parameter's version counter, which in-place writes bump (`clamp_`,
        `load_state_dict`, the foreach and single-tensor AdamW steps; not the fused AdamW step,
        CUDA's default: the clamp after every step, `clamp_spans_`, is what marks the spans
        changed), so a forward pass never syncs with the device unless the spans changed since
        the last read. (A write through `.data` bypasses the counter: none is made here.)"""
        version = self.span_fraction._version
        if self._window_cache is None or self._window_cache[0] != version:
            with torch.no_grad():
                self._cache_window(self.spans().max().item())
        return self._window_cache[1]

    def _cache_window(self, widest: float) -> None:
        """Cache the window of spans whose widest is `widest` tokens, at the current version."""
        window = min(math.ceil(widest + self.ramp), self.max_span)
        self._window_cache = (self.span_fraction._version, window)

    def ramp_mask(self, distance: torch.Tensor) -> torch.Tensor:
        """m(x) for each head: distance (..., Tq, Tk) -> (heads, ..., Tq, Tk) in [0, 1]."""
        z = self.spans().view(-1, *([1] * distance.dim()))
        return ((self.ramp + z - distance) / self.ramp).clamp(0, 1)

    def penalty(self) -> torch.Tensor:
        """Mean span in tokens: the L1 term that pulls unused context in."""
        return self.spans().mean()

    def clamp_(self) -> None:
        """Keep the raw parameter in [0, 1] after each optimizer step (as the paper does): once
        outside, the clamp in `spans` would cut its gradient and freeze it there."""
        clamp_spans_([self])


@torch.no_grad()
def clamp_spans_(spans: list[AdaptiveSpan]) -> None:
    """AdaptiveSpan.clamp_ for every layer's span, and their new windows read here, outside any
    forward pass, in one host read for all of them (a read per layer was a device sync per
    layer per micro-batch)."""
    if not spans:
        return
    for span in spans:
        span.span_fraction.clamp_(0, 1)
    widest = torch.stack([span.spans().max() for span in spans]).tolist()
    for span, tokens in zip(spans, widest):
        span._cache_window(tokens)


class LayerCache:
    """One layer's cached keys and values, (B, heads, L, head_dim), trimmed to a window.

    With a capacity (positions the cache can reach; `GPT.new_cache(capacity)`), keys and values
    live in buffers of that many positions, allocated at the first `extend`, and each step writes
    its new positions in place: `keys` / `values` are views of the buffers. Without one, each
    step concatenates, a copy of the whole cache per step (14-17% of a 64-row static batch's
    decode on a CPU). It also does so when a step would overrun the capacity, when a caller
    replaced `keys` / `values` (a decode-step export, a benchmark restoring a saved cache) and
    with a learnt span's window (it keeps only the window). Decoding only (no_grad /
    inference_mode): the writes are in place."""

    def __init__(self, capacity: int | None = None) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.capacity = capacity
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self._end = 0  # positions written into the buffers
        self._kept: tuple[torch.Tensor, torch.Tensor] | None = None  # views `keep` stored

    def _in_buffers(self) -> bool:
        """Whether keys/values are still the buffers' views this cache stored."""
        return (self._buffers is not None and self._kept is not None
                and self.keys is self._kept[0] and self.values is self._kept[1])

    def extend(self, k: torch.Tensor, v: torch.Tensor, window: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values the new positions attend to: the kept ones, then k / v.
        `window` (a learnt span's): the cache keeps only that many, by copies as before, not
        buffers of the whole capacity (a copy of the window per step costs little)."""
        time = k.size(2)
        if self.keys is None:
            self._buffers = self._kept = None
            if self.capacity is not None and window is None and time <= self.capacity:
                shape = (*k.shape[:2], self.capacity, k.size(3))
                self._buffers = (k.new_empty(shape), v.new_empty(shape))
                self._buffers[0][:, :, :time], self._buffers[1][:, :, :time] = k, v
                self._end = time
            return k, v  # attention reads the new keys as they are, exactly as without buffers
        if self._in_buffers() and self._end + time <= self.capacity:
            keys, values = self._buffers
            start, end = self._end - self.keys.size(2), self._end + time
            keys[:, :, self._end:end], values[:, :, self._end:end] = k, v
            self._end = end
            return keys[:, :, start:end], values[:, :, start:end]
        self._buffers = self._kept = None
        return torch.cat([self.keys, k], dim=2), torch.cat([self.values, v], dim=2)

    def keep(self, k: torch.Tensor, v: torch.Tensor, window: int | None) -> None:
        """Store what the next query can still see: the last `window` keys (all without span)."""
        if window is not None and k.size(2) > window:
            k, v = k[:, :, -window:], v[:, :, -window:]
        if self._buffers is not None:
            # The first step's keys are the projection's own: the buffers' copy of them instead.
            length = k.size(2)
            k = self._buffers[0][:, :, self._end - length:self._end]
            v = self._buffers[1][:, :, self._end - length:self._end]
            self._kept = (k, v)
        self.keys, self.values = k, v

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows."""
        if self.keys is None:
            return
        if self._in_buffers():
            start = self._end - self.keys.size(2)
            keys, values = self._buffers = (self._buffers[0][rows], self._buffers[1][rows])
            self.keys, self.values = self._kept = (keys[:, :, start:self._end],
                                                   values[:, :, start:self._end])
        else:
            self.keys, self.values = self.keys[rows], self.values[rows]


class KVCache:
    """Keys/values of every layer for incremental decoding, and how many positions were fed.
    `capacity`: the positions it can reach, preallocated (LayerCache); None grows by copies."""

    def __init__(self, n_layer: int, capacity: int | None = None) -> None:
        self.layers = [LayerCache(capacity) for _ in range(n_layer)]
        self.length = 0

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (e.g. drop finished sequences)."""
        for layer in self.layers:
            layer.select(rows)


def allowed_keys(query_count: int, key_count: int, key_is_real: torch.Tensor | None,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Which keys each query may attend to, and the query-key distances.

    The queries are the last `query_count` of `key_count` positions. Causal; padding keys are
    excluded except a query's own position, so a padding query still attends to something and
    never produces NaN (0 · NaN would leak into real rows through the values)."""
    q_index = torch.arange(key_count - query_count, key_count, device=device).unsqueeze(1)
    k_index = torch.arange(key_count, device=device).unsqueeze(0)
    distance = q_index - k_index  # (Tq, Tk)
    allowed = distance >= 0
    if key_is_real is not None:
        # (B, Tk) -> (B, 1, Tq, Tk): broadcast over heads.
        allowed = allowed & (key_is_real[:, None, None, :] | (distance == 0))
    return allowed, distance


def span_bias(span: AdaptiveSpan, distance: torch.Tensor, allowed: torch.Tensor
              ) -> torch.Tensor:
    """log m(x) where a key is allowed and its ramp is non-zero, −inf elsewhere.

    softmax(scores + log m) = e^s·m / Σ e^s·m: exactly the paper's softmax, times the ramp,
    renormalised, in one fused pass (several times faster than masking after the softmax on a
    CPU). The −inf branch is taken by `where`, so no gradient flows through log 0; every query
    keeps its own position (m(0) ≥ 1), so no row is all −inf."""
    ramp = span.ramp_mask(distance.float())
    keep = allowed & (ramp > 0)
    return torch.where(keep, ramp.clamp_min(1e-30).log(), float("-inf"))


def biased_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                     dropout_p: float) -> torch.Tensor:
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
    weights = torch.softmax(scores.float() + bias, dim=-1)
    weights = F.dropout(weights, dropout_p) if dropout_p else weights
    return weights.to(v.dtype) @ v


def blocked_span_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           span: AdaptiveSpan, window: int, dropout_p: float) -> torch.Tensor:
    """Exact span attention in O(T·W): query block b sees key blocks b−1 and b only."""
    batch, heads, time, dim = q.shape
    blocks = math.ceil(time / window)
    pad = blocks * window - time
    q = (F.pad(q, (0, 0, 0, pad)) if pad else q).view(batch, heads, blocks, window, dim)

    def neighbours(t: torch.Tensor) -> torch.Tensor:
        # Prepend one empty block, then pair each block with the one before it.
        t = F.pad(t, (0, 0, window, pad)).view(batch, heads, blocks + 1, window, dim)
        return torch.cat([t[:, :, :-1], t[:, :, 1:]], dim=3)  # (B, H, blocks, 2W, dim)

    k, v = neighbours(k), neighbours(v)
    local_q = torch.arange(window, device=q.device).view(window, 1)
    local_k = torch.arange(2 * window, device=q.device).view(1, 2 * window)
    distance = window + local_q - local_k  # (W, 2W), the same for every block
    block = torch.arange(blocks, device=q.device).view(blocks, 1, 1)
    key_exists = (block - 1) * window + local_k >= 0  # block 0 has no block before it
    allowed = (distance >= 0) & key_exists  # (blocks, W, 2W)
    bias = span_bias(span, distance.unsqueeze(0), allowed)  # (H, blocks, W, 2W)
    out = biased_attention(q, k, v, bias, dropout_p)  # (B, H, blocks, W, dim)
    return out.reshape(batch, heads, blocks * window, dim)[:, :, :time]


def dense_span_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, span: AdaptiveSpan,
                         allowed: torch.Tensor, distance: torch.Tensor,
                         dropout_p: float) -> torch.Tensor:
    return biased_attention(q, k, v, span_bias(span, distance, allowed), dropout_p)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: PyTorch's SDPA, or the learnable-span path when
    `span` is given; decodes incrementally with a KV cache."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, span: AdaptiveSpan | None,
                 head_dim: int | None = None) -> None:
        """`head_dim` defaults to n_embd // n_head (heads fill the residual stream); a
        structurally pruned layer keeps the head width with fewer heads."""
        super().__init__()
        if head_dim is None:
            assert n_embd % n_head == 0
            head_dim = n_embd // n_head
        self.n_head, self.head_dim = n_head, head_dim
        inner = n_head * head_dim
        # One projection for query, key and value: one matmul instead of three.
        self.qkv = nn.Linear(n_embd, 3 * inner)
        self.proj = nn.Linear(inner, n_embd)
        self.dropout = dropout
        self.span = span

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None,
                key_is_real: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, C). With a cache, x holds only the new positions; key_is_real (B, L) marks
        the real (non-padding) tokens of everything fed so far."""
        batch, time, _ = x.shape
        inner = self.n_head * self.head_dim
        q, k, v = self.qkv(x).split(inner, dim=2)
        # (B, T, inner) -> (B, heads, T, head_dim): attention runs per head.
        q, k, v = (t.view(batch, time, self.n_head, self.head_dim).transpose(1, 2)
                   for t in (q, k, v))
        dropout_p = self.dropout if self.training else 0.0
        # The window is read off the learnt spans (a host value); torch.export (ONNX export
        # of compressed models) cannot branch on it, so exporting takes the dense span path,
        # which is exact for any window.
        exporting = torch.compiler.is_exporting()
        window = self.span.window() if self.span is not None and not exporting else None
        if cache is not None:
            k, v = cache.extend(k, v, window)
        if key_is_real is not None:
            key_is_real = key_is_real[:, -k.size(2):]  # the cache may hold only a window
        if self.span is None and cache is None and key_is_real is None:
            # SDPA picks the fastest kernel available (flash / memory-efficient / math).
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        elif (window is not None and cache is None and key_is_real is None
              and time > 2 * window):
            y = blocked_span_attention(q, k, v, self.span, window, dropout_p)
        else:
            allowed, distance = allowed_keys(time, k.size(2), key_is_real, x.device)
            if self.span is None:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                                   dropout_p=dropout_p)
            else:
                y = dense_span_attention(q, k, v, self.span, allowed, distance, dropout_p)
        if cache is not None:
            cache.keep(k, v, window)
        y = y.transpose(1, 2).contiguous().view(batch, time, inner)
        return self.proj(y)
