"""Generated tokens to text, one token at a time, with stop sequences.

Two things make this more than `tokenizer.decode`: a token stands for some bytes (one byte
with the byte tokenizer, several with a trained one, possibly ending inside a character), so
a character may arrive over several tokens (the incremental UTF-8 decoder holds the
incomplete bytes until the rest comes), and a stop sequence may
arrive split over tokens (text that could still turn into one is held back until it either
completes the stop, which is then cut off, or cannot any more). The state is a function of
the bytes fed alone, so feeding the same bytes again rebuilds it exactly: a retried stream
resumes by replaying what was already sent (generation.py).

A chat reply's content loses the template's space, the text's first character when it is one
(protocol.ChatReply): with `skip_leading_space` no stop sequence is matched against that
space, so stops apply to the content the client gets (stop " " ended a reply " Hi there"
empty at once, where the content "Hi there" stops after "Hi").
"""
from __future__ import annotations

import codecs
from typing import Callable


def byte_token(token: int) -> bytes:
    """The byte tokenizer's token_bytes for ids 0-255 (the default of TextStream)."""
    return bytes((token,))


class TextStream:
    """Turns generated tokens into text incrementally: holds back incomplete UTF-8
    characters and possible starts of a stop sequence, and stops at a stop sequence.
    `token_bytes` is the tokenizer's (orchestrator/tokenizer.py)."""

    def __init__(self, stop: tuple[str, ...] = (),
                 token_bytes: Callable[[int], bytes] = byte_token,
                 skip_leading_space: bool = False) -> None:
        self.stop = stop
        self._skip_leading_space = skip_leading_space
        self._released = 0  # characters released so far: the text's index of _held[0]
        self._unmatched: int | None = None  # leading characters no stop may start at
        self._token_bytes = token_bytes
        # Invalid UTF-8 from the model becomes U+FFFD, as any client would show it.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""  # decoded text not released yet: it may be the start of a stop
        self.stopped = False

    def feed(self, token: int) -> str:
        """Text released by one more token ("" while a character or a stop is incomplete).
        After a stop sequence completes, `stopped` is set and later tokens are ignored."""
        if self.stopped:
            return ""
        self._held += self._decoder.decode(self._token_bytes(token))
        if self._unmatched is None and self._held:  # the text's first character is in
            self._unmatched = int(self._skip_leading_space and self._held[0] == " ")
        cut = self._first_stop()
        if cut is not None:
            self.stopped = True
            released, self._held = self._held[:cut], ""
            return released
        keep = self._possible_stop_start()
        released, self._held = self._held[:keep], self._held[keep:]
        self._released += keep
        return released

    def finish(self) -> str:
        """The rest, at the end of generation: a partial character becomes U+FFFD, and text
        held back for a stop that never completed is released - up to a stop that the
        U+FFFD completes (`stopped` is then set)."""
        if self.stopped:
            return ""
        self._held += self._decoder.decode(b"", final=True)
        cut = self._first_stop()
        self.stopped = cut is not None
        rest, self._held = self._held[:cut], ""
        return rest

    def _matchable(self) -> int:
        """The first index of the held text a stop sequence may start at."""
        return max(0, (self._unmatched or 0) - self._released)

    def _first_stop(self) -> int | None:
        start = self._matchable()
        hits = [i for i in (self._held.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _possible_stop_start(self) -> int:
        """Index from which the held text could still begin a stop sequence (len if none)."""
        for start in range(self._matchable(), len(self._held)):
            tail = self._held[start:]
            if any(s.startswith(tail) for s in self.stop):
                return start
        return len(self._held)
