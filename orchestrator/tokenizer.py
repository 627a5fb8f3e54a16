"""Text <-> token ids: the one seam training, serving, compression and export go through.

Every consumer takes a `Tokenizer` (the protocol below) instead of assuming one byte per
token, so a run trained with another vocabulary is served, compressed and exported with the
tokenizer it was trained with. `ByteTokenizer` is the default: every UTF-8 byte is a token
(ids 0-255) and id 256 is the end-of-text token, so any text round-trips exactly and nothing
has to be trained or shipped.

`token_bytes(id)` is what a streaming decoder needs: the raw bytes a token stands for, so a
character split over several tokens (a byte token, or a byte-level BPE token ending inside a
multi-byte character) is released only once it is complete.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

BYTE_VOCAB = 256  # the byte values
BYTE_EOT_ID = BYTE_VOCAB  # the byte tokenizer's end-of-text token


@runtime_checkable
class Tokenizer(Protocol):
    """What every consumer of token ids needs from a tokenizer."""

    name: str  # "bytes", or the path / hash a trained tokenizer was loaded from
    vocab_size: int  # ids are 0 .. vocab_size - 1; the model's embedding follows it
    eos_id: int | None  # end-of-text id, or None when the tokenizer has none

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def token_bytes(self, token_id: int) -> bytes: ...


class ByteTokenizer:
    """Every UTF-8 byte is a token; id 256 is end-of-text (never produced by `encode`)."""

    name = "bytes"
    vocab_size = BYTE_VOCAB + 1
    eos_id: int | None = BYTE_EOT_ID

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.token_bytes(int(i)) for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the byte tokenizer's "
                             f"0-{self.vocab_size - 1}")
        return b"" if token_id == BYTE_EOT_ID else bytes((token_id,))
