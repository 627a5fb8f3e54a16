"""Training text and batches.

The default corpus is real English shipped with every CPython: the standard library's help
topics (`pydoc_data.topics`, ~460 KB of prose and code examples), read in memory as bytes. It
needs no download, so a fresh machine or an air-gapped cluster trains out of the box. The
user's own corpus (`--data`) arrives as memory-mapped token shards (shards.TokenStream), read
by the same `get_batch`.

Batches are a pure function of (seed, rank, step): a resumed run, or a worker restarted on
another node, draws exactly the batches the uninterrupted run would have drawn.
"""
from __future__ import annotations

import torch

VOCAB_SIZE = 256  # the byte values: the vocabulary of runs from before tokenizers were recorded
HELD_OUT_FRACTION = 0.1


def load_corpus() -> bytes:
    """The standard library's help topics, in a fixed order, as UTF-8 bytes."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")


def encode(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(tokens: torch.Tensor | list[int]) -> str:
    return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


def split_corpus(data: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) token tensors; the held-out tail is never trained on."""
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    cut = int(len(tokens) * (1 - HELD_OUT_FRACTION))
    return tokens[:cut], tokens[cut:]


def get_batch(tokens: torch.Tensor, batch_size: int, seq_len: int, *, seed: int, rank: int,
              step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of `seq_len` tokens (inputs) and the same shifted by one (targets).
    `tokens`: a tensor in memory, or a TokenStream of memory-mapped shards (only the windows
    drawn are read); the same starts are drawn for both."""
    if len(tokens) < seq_len + 1:  # a window is seq_len inputs and the target after them
        raise ValueError(f"corpus of {len(tokens)} tokens is too short for seq_len {seq_len}")
    generator = torch.Generator().manual_seed(stream_seed(seed, rank, step))
    # (high is exclusive: every start whose window fits, the last token a target too)
    starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=generator)
    if not isinstance(tokens, torch.Tensor):
        windows = torch.from_numpy(tokens.windows(starts.tolist(), seq_len + 1))
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
    offsets = torch.arange(seq_len)
    x = tokens[starts[:, None] + offsets]
    y = tokens[starts[:, None] + offsets + 1]
    return x, y


def stream_seed(*parts: int) -> int:
    """A 63-bit seed from integers. Python salts str hashes per process but not int hashes, so
    every worker, restart and resumed run computes the same value (ints only, never strings)."""
    if not all(isinstance(p, int) for p in parts):
        raise TypeError(f"stream_seed takes integers only, got {parts!r}")
    return hash(parts) % (2 ** 63)
