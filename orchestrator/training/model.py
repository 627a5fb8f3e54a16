"""A small GPT-style decoder, read top to bottom.

Token + position embeddings, a stack of pre-norm transformer blocks (causal self-attention,
then an MLP), a final LayerNorm, and a language-model head tied to the token embedding.
The shape follows GPT-2 (and nanoGPT's model.py) because it is the best-understood baseline:
when something goes wrong, there is a large body of known-good numbers to compare against.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from orchestrator.config import TrainConfig
from orchestrator.training.attention import (AdaptiveSpan, CausalSelfAttention, KVCache,
                                             clamp_spans_)
from orchestrator.training.loss import token_cross_entropy
from orchestrator.validation import saved_fields_problem

# The LM head's product in training runs on a vocabulary padded to a multiple of this:
# GPT-2's 50,257 rows (odd) leave the logits' rows misaligned for the GPU's matrix kernels.
# On an H200, GPT-2 small's compiled bf16 training went from 466,968 to 504,151 tokens/s
# with the padding and a rewrite of the loss together, where a vocabulary of 50,304, which
# the padding leaves alone and the rewrite did not, moved +1.7% between the two calls: the
# gain is the padding's by that comparison, not by a run of each (docs/benchmarks.md).
VOCAB_ALIGNMENT = 64


# The GPTConfig fields every saved one holds (compression's weights.pt and int8 exports,
# written whole since the first): those of the first compression. mlp_hidden and
# n_heads_per_layer came later; None (uniform widths) is every model saved before them.
ALWAYS_SAVED_GPT_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd",
                           "dropout", "attention_span", "span_ramp", "span_init")


@dataclass(frozen=True)
class GPTConfig:
    """The GPT's shape and options (vocabulary, context, layers, heads, width, dropout,
    learnable attention span), built from a TrainConfig."""

    vocab_size: int = 256  # byte-level tokenizer: every byte is a token
    block_size: int = 128  # longest context the position embedding covers
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    # Learnable attention span (attention.py): off = standard causal attention via SDPA.
    attention_span: bool = False
    span_ramp: int = 32  # R: width of the soft edge of each head's span, in tokens
    span_init: float = 0.0  # initial span as a fraction of block_size (the paper starts at 0)
    # Per-layer widths of a structurally pruned model (orchestrator/compression/structured.py):
    # MLP hidden units and attention heads of each block. None = uniform, 4 * n_embd hidden
    # units and n_head heads in every block (the shapes of every unpruned model). A head keeps
    # its width n_embd // n_head whatever the layer's head count.
    mlp_hidden: tuple[int, ...] | None = None
    n_heads_per_layer: tuple[int, ...] | None = None

    @classmethod
    def from_saved(cls, saved: Any) -> "GPTConfig":
        """The GPTConfig a file of this project recorded (a compress stage's weights.pt, an
        int8 export): ValueError saying which field it lacks of ALWAYS_SAVED_GPT_FIELDS
        (filled with its default, a 2-layer model's weights were refused as not fitting 4)."""
        problem = saved_fields_problem(saved, ALWAYS_SAVED_GPT_FIELDS, "model config")
        if problem:
            raise ValueError(problem)
        return cls(**saved)

    def __post_init__(self) -> None:
        for name in ("mlp_hidden", "n_heads_per_layer"):
            widths = getattr(self, name)
            if widths is None:
                continue
            # JSON round trips turn tuples into lists: keep the config hashable and comparable.
            widths = tuple(widths)
            object.__setattr__(self, name, widths)
            if len(widths) != self.n_layer or not all(
                    isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths):
                raise ValueError(f"GPTConfig.{name} must hold one integer >= 1 per layer "
                                 f"({self.n_layer}), got {widths!r}")
        if self.n_heads_per_layer is not None and any(
                h > self.n_head for h in self.n_heads_per_layer):
            raise ValueError(f"GPTConfig.n_heads_per_layer {self.n_heads_per_layer!r} has more "
                             f"heads than n_head {self.n_head} in a layer")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def layer_mlp_hidden(self, layer: int) -> int:
        return 4 * self.n_embd if self.mlp_hidden is None else self.mlp_hidden[layer]

    def layer_heads(self, layer: int) -> int:
        return self.n_head if self.n_heads_per_layer is None else self.n_heads_per_layer[layer]

    @classmethod
    def from_train_config(cls, config: TrainConfig, vocab_size: int = 256) -> "GPTConfig":
        preset = config.model_preset
        return cls(vocab_size=vocab_size, block_size=config.seq_len, dropout=config.dropout,
                   attention_span=config.attention_span, span_ramp=config.span_ramp,
                   span_init=config.span_init, **preset,
                   mlp_hidden=None if config.mlp_hidden is None
                   else (config.mlp_hidden,) * preset["n_layer"])


class MLP(nn.Module):
    """The feed-forward sub-layer of a block: widen (4x unless pruned), GELU, project back."""

    def __init__(self, config: GPTConfig, hidden: int | None = None) -> None:
        super().__init__()
        hidden = 4 * config.n_embd if hidden is None else hidden
        self.fc = nn.Linear(config.n_embd, hidden)
        self.proj = nn.Linear(hidden, config.n_embd)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm residual block: normalising before each sub-layer keeps deep stacks stable."""

    def __init__(self, config: GPTConfig, layer: int = 0) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd)
        heads = config.layer_heads(layer)
        span = (AdaptiveSpan(heads, config.block_size, config.span_ramp,
                             config.span_init) if config.attention_span else None)
        # A pruned layer keeps the head width with fewer heads; a full one is built exactly as
        # before per-layer widths existed (same calls, same initialisation).
        self.attn = (CausalSelfAttention(config.n_embd, config.n_head, config.dropout, span)
                     if heads == config.n_head else
                     CausalSelfAttention(config.n_embd, heads, config.dropout, span,
                                         head_dim=config.head_dim))
        self.ln2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config, config.layer_mlp_hidden(layer))

    def forward(self, x: torch.Tensor, cache=None, key_is_real=None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache, key_is_real)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """The GPT-style decoder trained, compressed and served by this project: embeddings, a stack
    of pre-norm blocks and an LM head tied to the token embedding."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying: input and output embeddings share one matrix (fewer parameters,
        # and it trains better at small scale).
        self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        # GPT-2: scale residual projections by 1/sqrt(2 * layers) so the residual stream's
        # variance does not grow with depth.
        for name, param in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = True) -> int:
        total = sum(p.numel() for p in self.parameters())
        return total - self.pos_emb.weight.numel() if non_embedding else total

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None, key_is_real: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, return_logits: bool = True,
                last_only: bool = False
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx: (B, T) token ids. Returns logits (B, T, vocab) and, given targets, the mean loss.
        Training passes return_logits=False (logits None): compiled, a logits output that
        requires a gradient gets one in the backward, a tensor of zeros as large as the
        logits that the compiled backward makes and adds (on an H200, ~2% of GPT-2 small's
        step with GPT-2's vocabulary).

        Incremental decoding passes a KVCache (idx then holds only the new tokens). Batches of
        left-padded prompts pass key_is_real (B, all positions fed so far; False = padding) and
        positions (B, T), each row counting from its first real token. last_only (without
        targets): logits of each row's last position only, (B, 1, vocab), as decoding reads
        them; over a prompt the LM head of every position cost more than the blocks with a
        large vocabulary."""
        _, time = idx.shape
        start = cache.length if cache is not None else 0
        if start + time > self.config.block_size:
            raise ValueError(f"sequence length {start + time} exceeds the model's block_size "
                             f"{self.config.block_size}")
        if positions is None:
            positions = torch.arange(start, start + time, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(positions))
        for i, block in enumerate(self.blocks):
            x = block(x, cache.layers[i] if cache is not None else None, key_is_real)
        if cache is not None:
            cache.length += time
        if targets is None:
            return self.lm_head(self.ln_f(x[:, -1:] if last_only else x)), None
        vocab = self.lm_head.weight.size(0)
        logits = self._padded_head(self.ln_f(x))
        # The loss reads the padded logits whole (their slice's backward would copy them).
        loss = token_cross_entropy(logits, targets, vocab)
        return (logits[..., :vocab] if return_logits else None), loss

    def _padded_head(self, x: torch.Tensor) -> torch.Tensor:
        """The LM head with its rows padded with zeros to a multiple of VOCAB_ALIGNMENT: the
        padding's columns of the logits are zeros. Training and evaluation only: decoding,
        one token at a time, would pay the weight's copy per token."""
        weight = self.lm_head.weight
        padding = -weight.size(0) % VOCAB_ALIGNMENT
        if not padding:
            return self.lm_head(x)
        return F.linear(x, F.pad(weight, (0, 0, 0, padding)))

    def new_cache(self, capacity: int | None = None) -> KVCache:
        """A KV cache; `capacity` (positions the decoding can reach, capped at block_size)
        preallocates it, so each step writes in place instead of copying it whole."""
        return KVCache(self.config.n_layer, None if capacity is None
                       else min(capacity, self.config.block_size))

    def spans(self) -> list[AdaptiveSpan]:
        return [block.attn.span for block in self.blocks if block.attn.span is not None]

    def span_penalty(self) -> torch.Tensor:
        """Sum over layers of each layer's mean span (tokens); 0 without learnable spans."""
        spans = self.spans()
        return torch.stack([s.penalty() for s in spans]).sum() if spans else torch.zeros(())

    def clamp_spans_(self) -> None:
        """Every span's clamp after a step, their windows read in one host read."""
        clamp_spans_(self.spans())


def widths_from_state_dict(state: dict[str, torch.Tensor], config: GPTConfig
                           ) -> dict[str, tuple[int, ...] | None]:
    """The per-layer widths (GPTConfig.mlp_hidden / n_heads_per_layer) that a GPT state dict's
    weight shapes imply, None where they are the uniform default: lets a loader rebuild a
    structurally pruned model from a checkpoint that records only its training config."""
    mlp, heads = [], []
    for i in range(config.n_layer):
        fc, qkv = state.get(f"blocks.{i}.mlp.fc.weight"), state.get(f"blocks.{i}.attn.qkv.weight")
        mlp.append(4 * config.n_embd if fc is None else int(fc.shape[0]))
        heads.append(config.n_head if qkv is None else int(qkv.shape[0]) // (3 * config.head_dim))
    return {"mlp_hidden": None if all(m == 4 * config.n_embd for m in mlp) else tuple(mlp),
            "n_heads_per_layer": None if all(h == config.n_head for h in heads)
            else tuple(heads)}


def parameter_groups(model: GPT) -> dict[str, list[nn.Parameter]]:
    """The model's parameters by accumulation group (config.ACCUMULATION_GROUPS), input to
    output. The LM head is tied to the token embedding, so it belongs to "embeddings"."""
    half = len(model.blocks) // 2
    groups = {
        "embeddings": [model.tok_emb.weight, model.pos_emb.weight],
        "lower": [p for block in model.blocks[:half] for p in block.parameters()],
        "upper": [p for block in model.blocks[half:] for p in block.parameters()],
        "head": list(model.ln_f.parameters()),
    }
    grouped = {id(p) for params in groups.values() for p in params}
    assert grouped == {id(p) for p in model.parameters()}, "a parameter is in no group"
    return groups
