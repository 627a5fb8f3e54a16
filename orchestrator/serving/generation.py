"""Batched text generation with a KV cache: left padding, per-row sampling, early exit.

A batch of requests is decoded together. Prompts of different lengths are left-padded to a
common width, with `key_is_real` masking the padding out of attention and `positions`
counting from each row's first real token, so a row's logits equal those of its prompt run
alone (tests/unit/test_attention.py). The first step feeds the whole prompts (prefill); each
later step feeds one token per row and reuses the cached keys/values. A finished row (stop
sequence or max_tokens) leaves the batch and the cache at once.

Sampling is per row: temperature 0 is greedy; otherwise temperature and nucleus (top_p)
filtering, then one uniform draw from the row's own generator (seeded by the request's seed).
A row's tokens therefore never depend on which other requests share its batch, and a request
with a seed gives the same completion every time.
"""
from __future__ import annotations

import random
import secrets
from dataclasses import dataclass, replace

import torch

from orchestrator.serving.protocol import CONTEXT_LENGTH_EXCEEDED
from orchestrator.serving.text import TextStream
from orchestrator.tokenizer import ByteTokenizer, Tokenizer

FINISH_STOP, FINISH_LENGTH = "stop", "length"
# A row ended by a failure of its own (Chunk.error says which): the replica answers it as an
# error (500, or an error event in a stream), never as a finish_reason.
FINISH_ERROR = "error"
# The id sample_tokens gives a row whose logits hold a NaN or an infinity: no token can be
# drawn from them (the softmax is NaN, and argmax or the draw picked token 0 or garbage).
NON_FINITE = -1


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one completion: token budget, temperature (0 = greedy), top-p, stop
    sequences and seed."""

    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # A chat reply: no stop matches the leading space its content loses (text.TextStream).
    skip_leading_space: bool = False


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to complete. `generated` holds tokens already delivered by an earlier
    attempt (a replica died mid-stream): generation continues after them."""

    prompt: tuple[int, ...]
    params: SamplingParams
    generated: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.prompt:
            raise ValueError("a generation request needs at least one prompt token")
        if self.remaining < 1:
            raise ValueError(f"nothing left to generate: max_tokens {self.params.max_tokens}, "
                             f"{len(self.generated)} already generated")

    @property
    def context(self) -> tuple[int, ...]:
        return self.prompt + self.generated

    @property
    def remaining(self) -> int:
        return self.params.max_tokens - len(self.generated)

    def unfit_for(self, context: int, token_ids: int) -> tuple[str, str, str | None] | None:
        """(why, the request field at fault, the error's code: OpenAI's
        context_length_exceeded for a length) when a model of `context` positions whose
        embedding reads ids 0..token_ids-1 cannot run this request, else None. The ingress
        checks against the model it last asked about; after a hot reload to another context
        or vocabulary, a request may reach a model that cannot run it."""
        bad = next((t for t in self.context if not 0 <= t < token_ids), None)
        if bad is not None:
            return (f"token id {bad} is not one this model reads (ids 0-{token_ids - 1}); "
                    "the model served may have changed: retry", "prompt", None)
        needed = len(self.prompt) + self.params.max_tokens  # (= context + remaining)
        if needed > context:  # (a prompt that fills the context alone is the one at fault)
            return (f"This model's maximum context length is {context} tokens, however you "
                    f"requested {needed} tokens ({len(self.prompt)} in the prompt; "
                    f"{self.params.max_tokens} for the completion){self.delivered_note()}",
                    "prompt" if len(self.prompt) >= context else "max_tokens",
                    CONTEXT_LENGTH_EXCEEDED)
        return None

    def delivered_note(self) -> str:
        """What a refusal of a resumed request adds: its tokens already delivered, told apart
        from the client's prompt (they were counted as prompt: "323 in the prompt" to a
        client that sent 5)."""
        if not self.generated:
            return ""
        return (f"; {len(self.generated)} of the completion's tokens were already delivered "
                "before the replica streaming it was lost")

    def resumed_after(self, tokens: tuple[int, ...]) -> "GenerationRequest":
        """The request to send again after `tokens` more were delivered."""
        return replace(self, generated=self.generated + tuple(tokens))


@dataclass(frozen=True)
class Chunk:
    """What one decoding step produced for one request."""

    tokens: tuple[int, ...]
    text: str  # released text ("" while a character or a possible stop is incomplete)
    finish_reason: str | None = None  # "stop", "length", "error", or None while generating
    version: str = ""  # the model version that produced it (filled in by the deployment)
    error: str | None = None  # why the request failed (finish_reason "error"; no tokens)
    # On a request's first chunk only (filled in by the deployment): seconds from the
    # request's arrival at the model replica to it, on the replica's monotonic clock. The
    # ingress, on another machine maybe, compares it with its own wait (outside_replica_s).
    first_token_s: float | None = None


@dataclass(frozen=True)
class GenerationResult:
    """A whole completion of one request (the non-streaming answer)."""

    text: str
    completion_tokens: int
    finish_reason: str
    version: str
    # Seconds from the request's arrival at the model replica to its first token and to this
    # answer, on the replica's monotonic clock (None where not measured): what the ingress
    # needs to tell the time a client waited for the first token (first_token_after_s).
    first_token_s: float | None = None
    held_s: float | None = None


def collect(chunks: list[Chunk], held_s: float | None = None) -> GenerationResult:
    """The whole answer of `chunks`; `held_s`: how long the model replica held the request."""
    reason = next((c.finish_reason for c in reversed(chunks) if c.finish_reason), "")
    return GenerationResult("".join(c.text for c in chunks),
                            sum(len(c.tokens) for c in chunks), reason,
                            chunks[-1].version if chunks else "",
                            chunks[0].first_token_s if chunks else None, held_s)


# The ingress and a model replica can be on different machines: their clocks are never
# compared. Each side measures a monotonic duration from its own start (the ingress from its
# call, the replica from the call's arrival), and the difference of two durations that end
# at the same event is the time spent between them: in Serve's router, waiting for a replica
# with room, and in the hops there and back.
def outside_replica_s(waited_s: float, replica_s: float | None) -> float | None:
    """How long a model call that the ingress waited `waited_s` for (to its answer, or to its
    first chunk) spent outside the replica, which had it for `replica_s` of that (None: the
    replica did not say). Clamped at 0: two machines' clocks run at rates a few parts per
    million apart."""
    return None if replica_s is None else max(waited_s - replica_s, 0.0)


def first_token_after_s(answered_after_s: float, result: GenerationResult) -> float | None:
    """When a whole answer's first token was generated, counted from the same start as
    `answered_after_s` (when its answer reached the ingress): the answer came
    `held_s - first_token_s` after the first token, as the replica measured it (None: the
    replica did not say)."""
    if result.held_s is None or result.first_token_s is None:
        return None
    return max(answered_after_s - (result.held_s - result.first_token_s), 0.0)


# Tokens sorted first when sampling a vocabulary over 4x this: the most likely, by topk.
# Sorting a whole large vocabulary per row and step was most of a step on a CPU (64 rows x
# 32,000 tokens: torch's sort 0.6-0.8 s on 2 busy cores, the forward pass 0.1-0.15 s); only
# rows whose draw or nucleus reaches past these sort the rest.
SORTED_HEAD = 256


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                  uniform: torch.Tensor, vocab: int | None = None) -> torch.Tensor:
    """Next token per row: argmax where temperature is 0, else a draw from the tempered
    distribution cut to its top_p mass, by inverting its CDF, tokens sorted by probability,
    at `uniform` (B,) in [0, 1). Only the first `vocab` ids (the tokenizer's) are ever picked:
    a model with more rows than its tokenizer has tokens must not emit one no text stands for
    (its decoding failed, and with it every request of the batch). A row no token can be
    drawn from gets NON_FINITE: its logits hold a NaN or +inf, or are all -inf (a -inf among
    finite logits is a token of probability 0). Its greatest logit is then not finite (max
    propagates NaN), which the argmax's own pass finds; the flag rides on the ids' one
    transfer to the host."""
    if vocab is not None and logits.size(-1) > vocab:
        logits = logits[..., :vocab]
    peak, greedy = logits.max(dim=-1)
    unsampleable = ~peak.isfinite()
    sampling = temperature > 0
    if not bool(sampling.any()):
        return greedy.masked_fill(unsampleable, NON_FINITE)
    probs = torch.softmax(logits.float() / temperature.clamp(min=1e-6).unsqueeze(1), dim=-1)
    whole = probs.size(-1) <= 4 * SORTED_HEAD  # (the byte tokenizer's 257: a sort is quicker)
    head_probs, head_order = (probs.sort(dim=-1, descending=True) if whole
                              else probs.topk(SORTED_HEAD, dim=-1))
    # (one figure for a row's whole mass, the head's and a whole sort's alike: the sorted
    # running mass differed from it in the last bits, and so did the token a draw picked)
    mass = probs.sum(-1)
    pick, covered = _sorted_draw(head_probs, top_p, uniform, mass, whole)
    sampled = head_order.gather(-1, pick.unsqueeze(-1)).squeeze(-1)
    rest = (sampling & ~covered).nonzero().squeeze(1)
    if rest.numel():  # the draw (or nucleus) goes past the head: these rows sort it all
        sorted_probs, order = probs[rest].sort(dim=-1, descending=True)
        pick, _ = _sorted_draw(sorted_probs, top_p[rest], uniform[rest], mass[rest], True)
        sampled[rest] = order.gather(-1, pick.unsqueeze(-1)).squeeze(-1)
    return torch.where(sampling, sampled, greedy).masked_fill(unsampleable, NON_FINITE)


def _sorted_draw(sorted_probs: torch.Tensor, top_p: torch.Tensor, uniform: torch.Tensor,
                 mass: torch.Tensor, complete: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse CDF at `uniform` of each row's distribution cut to its top_p mass, over
    probabilities sorted in descending order: (index into sorted_probs, whether it is the
    draw). `mass`: each row's whole probability (probs.sum, the total a row with top_p >= 1
    draws against whether sorted_probs holds all its tokens or not); `complete`: it holds
    them all, else only the most likely, and a row whose draw, or nucleus, reaches past them
    is not covered."""
    # Keep the most likely tokens until their mass reaches top_p, the first one always: top_p
    # 0 (which OpenAI accepts) keeps it alone, so it is greedy. top_p >= 1 keeps every token:
    # over a large vocabulary the fp32 running mass reaches 1.0 hundreds of tokens early.
    # The mass before a token is the running mass one token earlier, not (its running mass -
    # its probability): that rounds either way, so a nucleus ending at the head's last token
    # (running mass == top_p) could keep the next token in a whole sort and not in the head.
    running = sorted_probs.cumsum(dim=-1)
    everything = top_p >= 1
    if bool(everything.all()):  # no nucleus to cut (the default): the running mass is the CDF
        cdf = running
    else:
        before = torch.nn.functional.pad(running[:, :-1], (1, 0))
        kept = (before < top_p.unsqueeze(1)) | everything.unsqueeze(1)
        kept[..., 0] = True
        cdf = (sorted_probs * kept).cumsum(dim=-1)
    # A nucleus is drawn from against its own mass; a row keeping every token, against its
    # whole mass. The nucleus ends among these tokens, or the draw falls among them.
    ends_here = ~everything & (running[:, -1] >= top_p)
    total = torch.where(everything, mass, cdf[:, -1] if complete else
                        torch.where(ends_here, cdf[:, -1], mass))
    covered = (torch.ones_like(everything) if complete
               else ends_here | (everything & (uniform * total <= cdf[:, -1])))
    target = (uniform * total).unsqueeze(1)
    # (a whole mass rounded above the running mass puts a draw near 1 past the end: the last
    # token of any probability then, never one whose softmax underflowed to 0)
    last = ((sorted_probs > 0).sum(-1, keepdim=True) - 1).clamp(min=0)
    pick = torch.minimum(torch.searchsorted(cdf, target), last)
    return pick.squeeze(-1), covered


class Row:
    """One request's decoding state: its text stream, random generator and token budget.
    The tokenizer turns tokens into text; its end-of-text token ends the row ("stop")."""

    def __init__(self, request: GenerationRequest, tokenizer: Tokenizer | None = None) -> None:
        self.request = request
        tokenizer = tokenizer or ByteTokenizer()
        self.eos_id = tokenizer.eos_id
        self.vocab = tokenizer.vocab_size
        self.text = TextStream(request.params.stop, tokenizer.token_bytes,
                               request.params.skip_leading_space)
        for token in request.generated:  # rebuild the stream state of what was delivered
            self.text.feed(token)
        self.rng: random.Random | None = None
        if request.params.temperature > 0:
            seed = request.params.seed
            # Python's Mersenne Twister, seeded with all 64 bits of the seed (as unsigned, so
            # that -1 is not 1): torch's CPU generator keeps only a seed's low 32 bits, and
            # seeds 1 and 2**32 + 1 drew the same numbers.
            self.rng = random.Random(secrets.randbits(64) if seed is None
                                     else seed % 2 ** 64)
            if seed is not None:
                # One draw per sampled token: skip those an earlier attempt used, so a resumed
                # seeded stream continues exactly as the uninterrupted one would have.
                for _ in request.generated:
                    self.rng.random()
        self.left = request.remaining
        self.finished = False

    def draw(self) -> float:
        return self.rng.random() if self.rng is not None else 0.0

    def accept(self, token: int) -> Chunk:
        """The chunk of the row's next token (sample_tokens's id); NON_FINITE fails the row."""
        if token == NON_FINITE:
            return self.fail()
        self.left -= 1
        text = self.text.feed(token)
        reason = None
        if token == self.eos_id:
            reason = FINISH_STOP
            text += self.text.finish()
        elif self.text.stopped:
            reason = FINISH_STOP
        elif self.left == 0:
            text += self.text.finish()
            # (the partial character's U+FFFD may complete a stop: the text is cut there)
            reason = FINISH_STOP if self.text.stopped else FINISH_LENGTH
        self.finished = reason is not None
        return Chunk((token,), text, reason)

    def fail(self) -> Chunk:
        """End the row for logits that are NaN or infinite: any token drawn from them would be
        garbage, and so would every one after it (its cache holds the overflow)."""
        self.finished = True
        fed = len(self.request.context) + self.request.remaining - self.left - 1
        return Chunk((), "", FINISH_ERROR,
                     error=f"the model's logits are NaN or infinite at position {fed} of this "
                           f"request (a numeric overflow): no token can be sampled")


def plan_groups(requests: list[GenerationRequest], block_size: int) -> list[list[int]]:
    """Split a batch into groups that fit the context together. Left padding makes every row
    of a group as long as its longest prompt, so a short prompt asking for many tokens next
    to a long prompt could overrun the model's block_size; grouping by length (longest
    first) also keeps padding small."""
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i].context))
    groups: list[list[int]] = []
    width = longest = 0
    for i in order:
        context, remaining = len(requests[i].context), requests[i].remaining
        # Positions fed in the end: the padded prompt plus every token but the last.
        if groups and width + max(longest, remaining) - 1 <= block_size:
            groups[-1].append(i)
            longest = max(longest, remaining)
        else:
            groups.append([i])
            width, longest = context, remaining
    return groups


class RowGroup:
    """Rows decoded in one forward pass per step, sharing one left-padded KV cache."""

    def __init__(self, model: torch.nn.Module, rows: list[tuple[int, Row]]) -> None:
        self.model, self.rows = model, rows
        device = next(model.parameters()).device
        contexts = [row.request.context for _, row in rows]
        width = max(len(c) for c in contexts)
        tokens = torch.zeros((len(rows), width), dtype=torch.long)
        real = torch.zeros((len(rows), width), dtype=torch.bool)
        for r, context in enumerate(contexts):
            tokens[r, width - len(context):] = torch.tensor(context)
            real[r, width - len(context):] = True
        self.padded = not bool(real.all())
        # Without padding the model's plain causal path applies (faster, same numbers).
        self.key_is_real = real.to(device) if self.padded else None
        self.positions = ((real.cumsum(1) - 1).clamp(min=0).to(device) if self.padded
                          else None)
        self.input = tokens.to(device)
        # Positions fed in the end: the padded prompt plus every token but the last.
        self.cache = model.new_cache(width + max(row.request.remaining for _, row in rows) - 1)
        params = [row.request.params for _, row in rows]
        self.temperature = torch.tensor([p.temperature for p in params], device=device)
        self.top_p = torch.tensor([p.top_p for p in params], device=device)

    @property
    def done(self) -> bool:
        return not self.rows

    def step(self) -> list[tuple[int, Chunk]]:
        """One forward pass; returns (request index, chunk) for every row still running."""
        logits, _ = self.model(self.input, cache=self.cache, key_is_real=self.key_is_real,
                               positions=self.positions, last_only=True)
        uniform = torch.tensor([row.draw() for _, row in self.rows], device=logits.device)
        tokens = sample_tokens(logits[:, -1, :], self.temperature, self.top_p, uniform,
                               vocab=self.rows[0][1].vocab)
        chunks = [(i, row.accept(t)) for (i, row), t in zip(self.rows, tokens.tolist())]
        self.input = tokens.unsqueeze(1)
        self._keep([r for r, (_, row) in enumerate(self.rows) if not row.finished])
        if self.padded and self.rows:
            ones = torch.ones((len(self.rows), 1), dtype=torch.bool, device=tokens.device)
            self.key_is_real = torch.cat([self.key_is_real, ones], dim=1)
            self.positions = self.positions[:, -1:] + 1
        return chunks

    def cancel(self, index: int) -> None:
        """The request at `index` is no longer wanted (its client left): its row stops
        before the next step instead of decoding to its end."""
        self._keep([r for r, (i, _) in enumerate(self.rows) if i != index])

    def _keep(self, alive: list[int]) -> None:
        """Keep only these rows (by position): the rest leave the cache and the next input."""
        if len(alive) == len(self.rows):
            return
        self.rows = [self.rows[r] for r in alive]
        if not alive:
            return
        keep = torch.tensor(alive, device=self.input.device)
        self.cache.select(keep)
        self.input, self.temperature, self.top_p = (
            self.input[keep], self.temperature[keep], self.top_p[keep])
        if self.padded:
            self.key_is_real, self.positions = self.key_is_real[keep], self.positions[keep]


class BatchGeneration:
    """Every request of one batch, stepped together until all are finished."""

    def __init__(self, model: torch.nn.Module, requests: list[GenerationRequest],
                 block_size: int, tokenizer: Tokenizer | None = None) -> None:
        rows = [Row(request, tokenizer) for request in requests]
        self.size = len(requests)
        self.groups = [RowGroup(model, [(i, rows[i]) for i in group])
                       for group in plan_groups(requests, block_size)]

    @property
    def done(self) -> bool:
        return not self.groups

    @torch.inference_mode()
    def step(self) -> list[Chunk | None]:
        """One decoding step of every unfinished row: a chunk per request index, None for
        requests that finished earlier."""
        out: list[Chunk | None] = [None] * self.size
        for group in self.groups:
            for i, chunk in group.step():
                out[i] = chunk
        self.groups = [group for group in self.groups if not group.done]
        return out

    def cancel(self, index: int) -> None:
        """Stop decoding request `index` (its client disconnected); the others go on."""
        for group in self.groups:
            group.cancel(index)
        self.groups = [group for group in self.groups if not group.done]


def generate(model: torch.nn.Module, requests: list[GenerationRequest], block_size: int,
             tokenizer: Tokenizer | None = None) -> list[tuple[str, tuple[int, ...], str]]:
    """Run a batch to the end: (text, tokens, finish_reason) per request. For tests and
    offline use; the server streams BatchGeneration.step instead."""
    batch = BatchGeneration(model, requests, block_size, tokenizer)
    texts = [""] * len(requests)
    tokens: list[tuple[int, ...]] = [()] * len(requests)
    reasons = [""] * len(requests)
    while not batch.done:
        for i, chunk in enumerate(batch.step()):
            if chunk is not None:
                texts[i] += chunk.text
                tokens[i] += chunk.tokens
                reasons[i] = chunk.finish_reason or reasons[i]
    return list(zip(texts, tokens, reasons))
