"""A small GPT-style decoder, read top to bottom.

Token + position embeddings, a stack of pre-norm transformer blocks (causal self-attention,
then an MLP), a final LayerNorm, and a language-model head tied to the token embedding.
The shape follows GPT-2 (and nanoGPT's model.py) because it is the best-understood baseline:
when something goes wrong, there is a large body of known-good numbers to compare against.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from orchestrator.config import TrainConfig
from orchestrator.training.attention import AdaptiveSpan, CausalSelfAttention, KVCache


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

    @classmethod
    def from_train_config(cls, config: TrainConfig, vocab_size: int = 256) -> "GPTConfig":
        return cls(vocab_size=vocab_size, block_size=config.seq_len, dropout=config.dropout,
                   attention_span=config.attention_span, span_ramp=config.span_ramp,
                   span_init=config.span_init, **config.model_preset)


class MLP(nn.Module):
    """The feed-forward sub-layer of a block: widen 4x, GELU, project back."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm residual block: normalising before each sub-layer keeps deep stacks stable."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd)
        span = (AdaptiveSpan(config.n_head, config.block_size, config.span_ramp,
                             config.span_init) if config.attention_span else None)
        self.attn = CausalSelfAttention(config.n_embd, config.n_head, config.dropout, span)
        self.ln2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

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
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
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
                positions: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx: (B, T) token ids. Returns logits (B, T, vocab) and, given targets, the mean loss.

        Incremental decoding passes a KVCache (idx then holds only the new tokens). Batches of
        left-padded prompts pass key_is_real (B, all positions fed so far; False = padding) and
        positions (B, T), each row counting from its first real token."""
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
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            # Cross-entropy in fp32 whatever the autocast dtype: low-precision log-softmax
            # over the vocabulary loses accuracy the optimizer then chases.
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss

    def new_cache(self) -> KVCache:
        return KVCache(self.config.n_layer)

    def spans(self) -> list[AdaptiveSpan]:
        return [block.attn.span for block in self.blocks if block.attn.span is not None]

    def span_penalty(self) -> torch.Tensor:
        """Sum over layers of each layer's mean span (tokens); 0 without learnable spans."""
        spans = self.spans()
        return torch.stack([s.penalty() for s in spans]).sum() if spans else torch.zeros(())

    def clamp_spans_(self) -> None:
        for span in self.spans():
            span.clamp_()


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
