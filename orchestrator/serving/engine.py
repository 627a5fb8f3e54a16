"""Continuous (iteration-level) batching: requests join and leave the running batch at every
decoding step (Orca, OSDI '22), over a paged KV cache (vLLM; paged.py).

Static batching (generation.py's BatchGeneration) forms a batch, decodes it to its longest
row's end and only then starts the next: a request arriving one step after a batch started
waits for the whole batch, rows that finished early leave their slot empty, and prompts are
left-padded to the longest. Here, at every `step()`:

1. requests that were cancelled (their client went away) leave, and their blocks are free;
2. waiting requests are admitted, first come first in, while a row is free (`max_rows`) and
   the pool has the blocks for the request's whole length (prompt + max_tokens - 1 positions
   fed). Blocks are taken at admission, so a running row never runs out of cache and nothing
   is ever evicted; a request that does not fit waits (never dropped) and the ones behind it
   wait too, so a long request is not starved by short ones. A request that could never fit
   (longer than the model's context or than the whole cache) is refused by `add`;
3. one forward pass runs over every running row's new tokens, packed without padding: the
   latest token of each decoding row, plus chunks of the prompts being prefilled, at most
   `prefill_chunk_tokens` prompt tokens per step (chunked prefill: a long prompt joining
   does not stall the rows already streaming for a whole prompt's pass);
4. every row whose context is fully fed samples its next token (same sampling and per-row
   generator as static batching: generation.Row); rows that finish leave and free their
   blocks at once, and so does a row whose logits are NaN or infinite: it ends with an
   error chunk (finish_reason "error"), the others go on (a row made NaN by reading a
   neighbour's overflow masked, on the matrix-product paths, is recomputed alone first).

A row's tokens depend only on its own request, up to float rounding: its attention reads only
its own blocks, and each row draws from its own seeded generator, so greedy and seeded output
are those of the request decoded alone (tests/unit/test_serving_engine.py), but for the last
bits of its logits, which the packed matrix products' row count changes (docs/serving.md).

The engine is single-threaded: one thread calls `add` / `cancel` between steps and `step`.
In serving that is the engine host's stepping thread, in a process of its own by default
(engine_host.py), which the replica (ray_layer/serve_model.py) drives by messages.
"""
from __future__ import annotations

import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import torch

from orchestrator.serving import decode_kernel
from orchestrator.serving.generation import (NON_FINITE, Chunk, GenerationRequest, Row,
                                             sample_tokens)
from orchestrator.serving.paged import (PagedKVCache, Segment, cache_slots, first_of_run,
                                        paged_forward)
from orchestrator.serving.protocol import CONTEXT_LENGTH_EXCEEDED, kv_cache_refusal
from orchestrator.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class CapacityError(ValueError):
    """A request that this engine can never run: it names the limit it exceeds."""

    def __init__(self, message: str, param: str = "max_tokens",
                 code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code  # code: the 400's (protocol.APIError's)


@dataclass(frozen=True)
class EngineLimits:
    """How much an engine runs at once: rows per step, the KV cache in blocks, and the prompt
    tokens prefilled per step."""

    max_rows: int = 32
    num_blocks: int = 256
    block_tokens: int = 16
    prefill_chunk_tokens: int = 256

    def __post_init__(self) -> None:
        for name in ("max_rows", "num_blocks", "block_tokens", "prefill_chunk_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

    @classmethod
    def sized_for(cls, max_rows: int, context: int, block_tokens: int,
                  prefill_chunk_tokens: int, cache_tokens: int = 0) -> "EngineLimits":
        """Limits with a cache of `cache_tokens` positions (rounded up to whole blocks), or,
        with 0, enough for `max_rows` rows of the whole context (a lane each: paged.py)."""
        if cache_tokens:
            blocks = -(-cache_tokens // block_tokens)
        else:
            blocks = max_rows * -(-context // block_tokens)
        return cls(max_rows, blocks, block_tokens, prefill_chunk_tokens)


def lane_blocks(context: int, limits: EngineLimits) -> int:
    """A lane holds the longest sequence (the model's context), so every row can start one."""
    return -(-context // limits.block_tokens)


def kv_cache_bytes(model: torch.nn.Module, limits: EngineLimits) -> int:
    """What the engine's KV cache takes once every layer has written: keys and values of each
    layer's attention width (per layer: pruned models differ) at every slot."""
    slots = cache_slots(limits.num_blocks, limits.block_tokens)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    widths = sum(block.attn.qkv.out_features // 3 for block in model.blocks)
    return 2 * widths * slots * torch.finfo(dtype).bits // 8


def positions_needed(request: GenerationRequest) -> int:
    """Positions a request feeds: its context, then every generated token but the last."""
    return len(request.context) + request.remaining - 1


def check_request(request: GenerationRequest, context: int, limits: EngineLimits,
                  token_ids: int) -> None:
    """Raise CapacityError when an engine of `limits` for a model of `context` positions and
    `token_ids` embedding rows can never run the request (what ContinuousEngine.add refuses,
    so one request never fails the others' step; the replica asks first, to answer 400
    before queueing)."""
    unfit = request.unfit_for(context, token_ids)
    if unfit:
        raise CapacityError(*unfit)
    capacity = limits.num_blocks * limits.block_tokens
    if positions_needed(request) > capacity:
        why, param = kv_cache_refusal(len(request.prompt), request.params.max_tokens,
                                      capacity, "prompt", "max_tokens")
        raise CapacityError(why + request.delivered_note(), param, CONTEXT_LENGTH_EXCEEDED)


@dataclass
class Sequence:
    """One admitted request: its decoding state, block table and what is left to feed."""

    key: object
    row: Row
    blocks: list[int]
    pending: list[int]  # tokens not fed yet: the context at first, then the latest token
    fed: int = 0  # positions whose keys and values are in the cache

    def __post_init__(self) -> None:
        self.block_table = tuple(self.blocks)
        self.first_block = first_of_run(self.blocks)


@dataclass
class EngineStats:
    """Counters of an engine's life (the replica's /health shows them)."""

    steps: int = 0
    admitted: int = 0
    finished: int = 0
    failed: int = 0  # ended by an error of their own (non-finite logits): not in finished
    cancelled: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    most_rows: int = 0
    rows_per_step: Counter = field(default_factory=Counter)


class ContinuousEngine:
    """Iteration-level batching over a paged KV cache for one model (see the module doc)."""

    def __init__(self, model: torch.nn.Module, context: int, tokenizer: Tokenizer,
                 limits: EngineLimits, device: torch.device | str | None = None) -> None:
        self.model, self.context, self.tokenizer, self.limits = model, context, tokenizer, limits
        device = device or next(model.parameters()).device
        self.cache = PagedKVCache(len(model.blocks), limits.num_blocks, limits.block_tokens,
                                  device, lane_blocks=lane_blocks(context, limits))
        self._warm_up_decode_kernel(model)
        self.waiting: deque[tuple[object, GenerationRequest, float]] = deque()
        self.running: list[Sequence] = []
        self.stats = EngineStats()
        self.queue_seconds: list[tuple[object, float]] = []  # admitted in the last step

    def _warm_up_decode_kernel(self, model: torch.nn.Module) -> None:
        """Compile the decode kernel now, not in the first request's step, where this cache
        will use it; if it cannot be compiled, decode through the matrix products."""
        dtype = model.tok_emb.weight.dtype
        if not (self.cache.use_decode_kernel
                and decode_kernel.supports(self.cache.device, dtype)):
            return
        try:
            decode_kernel.warm_up()
        except Exception as error:  # numba failing to compile or cache (a full disk, say)
            log.warning("decode kernel unavailable (%s: %s): decoding attention takes the "
                        "matrix-product paths", type(error).__name__, error)
            self.cache.use_decode_kernel = False

    # -- requests ---------------------------------------------------------------------------
    def check(self, request: GenerationRequest) -> None:
        """Raise CapacityError when the request can never run here."""
        check_request(request, self.context, self.limits, self.model.config.vocab_size)

    def add(self, key: object, request: GenerationRequest, now: float | None = None) -> None:
        """Queue a request under `key` (any hashable the caller uses to match chunks)."""
        self.check(request)
        self.waiting.append((key, request, time.monotonic() if now is None else now))

    def cancel(self, key: object) -> bool:
        """Drop a request, waiting or running; its blocks are free at once. Whether it was
        here."""
        for i, (waiting_key, _, _) in enumerate(self.waiting):
            if waiting_key == key:
                del self.waiting[i]
                self.stats.cancelled += 1
                return True
        for sequence in self.running:
            if sequence.key == key:
                if sequence.fed < len(sequence.row.request.context):
                    # Not sampled yet, its keys and values may hold an overflow of its prompt
                    # (a sampled row's are finite): zeroed, as a failed row's are
                    # (_sample), or rows reading them masked were recomputed every step.
                    self.cache.clear(sequence.blocks)
                self._leave(sequence)
                self.stats.cancelled += 1
                return True
        return False

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    @property
    def free_blocks(self) -> int:
        return self.cache.pool.free

    # -- stepping ---------------------------------------------------------------------------
    def step(self, now: float | None = None) -> list[tuple[object, Chunk]]:
        """Admit what fits, run one forward pass, sample: (key, chunk) for every row that
        produced a token."""
        self._admit(time.monotonic() if now is None else now)
        if not self.running:
            return []
        segments, sampling = self._plan()
        logits = paged_forward(self.model, self.cache, segments)
        self._recompute_unsampled_alone(logits, segments, sampling)
        # (before sampling: rows that finish in this step leave there, and still ran in it)
        self.stats.most_rows = max(self.stats.most_rows, len(self.running))
        out = self._sample(logits, sampling, segments)
        self.stats.steps += 1
        self.stats.rows_per_step[len(segments)] += 1
        return out

    def _admit(self, now: float) -> None:
        self.queue_seconds = []
        while self.waiting and len(self.running) < self.limits.max_rows:
            key, request, arrived = self.waiting[0]
            blocks = self.cache.blocks_for(positions_needed(request))
            if blocks > self.free_blocks:
                return  # waits for blocks; those behind it wait too (first come first in)
            self.waiting.popleft()
            self.running.append(Sequence(key, Row(request, self.tokenizer),
                                         self.cache.pool.allocate(blocks),
                                         list(request.context)))
            self.queue_seconds.append((key, now - arrived))
            self.stats.admitted += 1

    def _plan(self) -> tuple[list[Segment], list[int]]:
        """This step's segments (one per running row that feeds something) and, for each
        segment, the index of its row in self.running if it samples after this step, else
        -1 (a prompt chunk that does not end the prompt)."""
        segments, sampling = [], []
        budget = self.limits.prefill_chunk_tokens
        for index, sequence in enumerate(self.running):
            # (by what was fed, not by one token pending: a prompt's last chunk of one token
            # was counted as a decode token and fed past the prefill budget)
            decoding = sequence.fed >= len(sequence.row.request.context)
            if decoding:  # its latest token
                take = 1
                self.stats.decode_tokens += 1
            else:  # prefilling: the next chunk of its context, within the step's budget
                take = min(len(sequence.pending), budget)
                if take == 0:
                    continue
                budget -= take
                self.stats.prefill_tokens += take
            segments.append(Segment(sequence.block_table, sequence.fed,
                                    tuple(sequence.pending[:take]), sequence.first_block))
            sequence.pending = sequence.pending[take:]
            sequence.fed += take
            sampling.append(index if not sequence.pending else -1)
        return segments, sampling

    def _sample(self, logits: torch.Tensor, sampling: list[int], segments: list[Segment]
                ) -> list[tuple[object, Chunk]]:
        picks = [(s, index) for s, index in enumerate(sampling) if index >= 0]
        if not picks:
            return []
        rows = [self.running[index] for _, index in picks]
        params = [sequence.row.request.params for sequence in rows]
        device = logits.device
        how = (torch.tensor([p.temperature for p in params], device=device),
               torch.tensor([p.top_p for p in params], device=device),
               torch.tensor([sequence.row.draw() for sequence in rows], device=device))
        tokens = sample_tokens(logits[torch.tensor([s for s, _ in picks], device=device)],
                               *how, vocab=self.tokenizer.vocab_size).tolist()
        if NON_FINITE in tokens:  # (only then: a step where every row is finite pays nothing)
            self._resample_alone(tokens, [segments[s] for s, _ in picks], how)
        out = []
        for sequence, token in zip(rows, tokens):
            chunk = sequence.row.accept(token)
            out.append((sequence.key, chunk))
            if sequence.row.finished:
                if chunk.error is not None:  # (its keys and values hold the NaN: not reused)
                    self.cache.clear(sequence.blocks)
                self._leave(sequence)
                if chunk.error is None:
                    self.stats.finished += 1
                else:
                    self.stats.failed += 1
            else:
                sequence.pending = [token]
        return out

    def _resample_alone(self, tokens: list[int], segments: list[Segment],
                        how: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        """Recompute each decoding row whose logits were not finite alone, and sample it
        again from the same temperature, top_p and draw (`how`): in `tokens`, in place.

        On the matrix-product paths a decoding row reads its lane (or its group's padded
        blocks) up to the batch's longest row, the positions past its own masked, and a
        masked NaN there (another row's overflow, its keys and values written in this step)
        still makes its softmax NaN: 0 x NaN. Alone, a row reads only its own positions, so
        a row that is still not finite overflowed by itself, and fails; one that now is was
        failed by a neighbour, and goes on as if that one had not been there. Its keys and
        values at this position (NaN past the layer its attention read the NaN) are written
        again by the recompute, the same up to the last bits. A prompt chunk reads only its
        own positions: not recomputed."""
        for i, segment in enumerate(segments):
            if tokens[i] == NON_FINITE and len(segment.tokens) == 1:
                logits = paged_forward(self.model, self.cache, [segment])
                tokens[i] = int(sample_tokens(logits, *(t[i:i + 1] for t in how),
                                              vocab=self.tokenizer.vocab_size)[0])

    def _recompute_unsampled_alone(self, logits: torch.Tensor, segments: list[Segment],
                                   sampling: list[int]) -> None:
        """Recompute alone each prompt chunk of one token that does not end its prompt (the
        step's prefill budget had one token left, or prefill_chunk_tokens is 1) whose logits
        were not finite. Such a chunk takes the decoding rows' attention (paged.py), reading
        its lane masked up to the step's longest row, so a neighbour's NaN there made its keys
        and values past layer 0 NaN; not sampled, it was never recomputed by
        _resample_alone, and its row failed at its next sampled step, even alone. Only a
        step with such a chunk pays the check."""
        fed = [s for s, (segment, index) in enumerate(zip(segments, sampling))
               if index < 0 and len(segment.tokens) == 1]
        if not fed:
            return
        peaks = logits[torch.tensor(fed, device=logits.device)].max(dim=-1).values
        for s, finite in zip(fed, peaks.isfinite().tolist()):
            if not finite:  # (its own overflow stays: its row fails when it samples)
                paged_forward(self.model, self.cache, [segments[s]])

    def _leave(self, sequence: Sequence) -> None:
        self.running.remove(sequence)
        self.cache.pool.release(sequence.blocks)
        sequence.blocks = []


def run_to_completion(engine: ContinuousEngine, requests: list[GenerationRequest]
                      ) -> list[tuple[str, tuple[int, ...], str]]:
    """Add every request and step until all are done: (text, tokens, finish_reason) per
    request, as generation.generate returns. For tests, benchmarks and offline use."""
    texts, tokens, reasons = ([""] * len(requests), [()] * len(requests),
                              [""] * len(requests))
    for i, request in enumerate(requests):
        engine.add(i, request)
    while not engine.idle:
        for i, chunk in engine.step():
            texts[i] += chunk.text
            tokens[i] += chunk.tokens
            reasons[i] = chunk.finish_reason or reasons[i]
    return list(zip(texts, tokens, reasons))
