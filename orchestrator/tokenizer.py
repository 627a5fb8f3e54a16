"""Text <-> token ids: the one seam training, serving, compression and export go through.

Every consumer takes a `Tokenizer` (the protocol below) instead of assuming one byte per
token, so a run trained with another vocabulary is served, compressed and exported with the
tokenizer it was trained with. `ByteTokenizer` is the default: every UTF-8 byte is a token
(ids 0-255) and id 256 is the end-of-text token, so any text round-trips exactly and nothing
has to be trained or shipped. `HFTokenizer` is any Hugging Face `tokenizers` file
(tokenizer.json); `train_bpe` trains a byte-level BPE one on the user's text.

Every run writes its tokenizer as `tokenizer.json` in the run directory (the byte tokenizer
too: 256 byte tokens plus `<|endoftext|>`, in the same byte-level form GPT-2 uses), so every
run is served, compressed and exported the same way. `sha256` identifies a tokenizer: the
shard cache and a resumed run check it.

`token_bytes(id)` is what a streaming decoder needs: the raw bytes a token stands for, so a
character split over several tokens (a byte token, or a byte-level BPE token ending inside a
multi-byte character) is released only once it is complete.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterable, Protocol, runtime_checkable

import numpy as np

BYTE_VOCAB = 256  # the byte values
BYTE_EOT_ID = BYTE_VOCAB  # the byte tokenizer's end-of-text token
EOT_TOKEN = "<|endoftext|>"  # GPT-2's end-of-text token; ours in every tokenizer we write
TOKENIZER_FILE = "tokenizer.json"


class TokenizerError(ValueError):
    """A tokenizer cannot be loaded, parsed or trained; the message names the file or flag."""


@runtime_checkable
class Tokenizer(Protocol):
    """What every consumer of token ids needs from a tokenizer."""

    name: str  # "bytes", or the path / hash a trained tokenizer was loaded from
    vocab_size: int  # ids are 0 .. vocab_size - 1; the model's embedding follows it
    eos_id: int | None  # end-of-text id, or None when the tokenizer has none
    eos_token: str | None  # its spelling in the vocabulary ("<|endoftext|>", "</s>", ...)

    def encode(self, text: str) -> list[int]: ...

    def encode_as_text(self, text: str) -> list[int]:
        """`encode`, with a special token's spelling ("<|endoftext|>") read as plain text:
        a client's text must not forge the tokens a template puts between messages."""
        ...

    def decode(self, ids: list[int]) -> str: ...

    def token_bytes(self, token_id: int) -> bytes: ...


class ByteTokenizer:
    """Every UTF-8 byte is a token; id 256 is end-of-text (never produced by `encode`)."""

    name = "bytes"
    vocab_size = BYTE_VOCAB + 1
    eos_id: int | None = BYTE_EOT_ID
    eos_token: str | None = EOT_TOKEN

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    encode_as_text = encode  # (bytes never spell end-of-text)

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.token_bytes(int(i)) for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the byte tokenizer's "
                             f"0-{self.vocab_size - 1}")
        return b"" if token_id == BYTE_EOT_ID else bytes((token_id,))

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each text as uint8 arrays (no Python list per byte: ingest speed)."""
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def to_json(self) -> str:
        """The same tokenizer as a Hugging Face tokenizer.json (ids = byte values, 256 =
        end-of-text), so byte-level runs export and load like any other."""
        return _byte_level_hf_tokenizer().to_str()

    @functools.cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()


class LegacyByteTokenizer(ByteTokenizer):
    """The bytes of a run from before tokenizers were recorded: 256 ids, no end-of-text (its
    model's vocabulary is 256). What such a run is exported with."""

    vocab_size = BYTE_VOCAB
    eos_id: int | None = None
    eos_token: str | None = None

    def to_json(self) -> str:
        return _byte_level_hf_tokenizer(with_eos=False).to_str()


def tokenizer_for_model(tokenizer: Tokenizer, model_vocab: int) -> Tokenizer:
    """The tokenizer to ship with a model of `model_vocab` ids: itself, or for an old
    256-token byte model the bytes without end-of-text. TokenizerError when they disagree."""
    if isinstance(tokenizer, ByteTokenizer) and model_vocab == BYTE_VOCAB:
        return LegacyByteTokenizer()
    if tokenizer.vocab_size != model_vocab:
        raise TokenizerError(f"the tokenizer ({tokenizer.name}) has {tokenizer.vocab_size} "
                             f"tokens but the model {model_vocab}: not the model's tokenizer")
    return tokenizer


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer (any tokenizer.json).

    Text is encoded as it is: the file's own truncation, padding and post-processor (a BOS
    or EOS token added to each text) are left out, since documents are joined into one token
    stream with the end-of-text token between them; `to_json` and `sha256` are still the
    file's own."""

    def __init__(self, tokenizer, name: str) -> None:
        self._json = tokenizer.to_str()
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tok = tokenizer
        self._as_text = None  # encode_as_text's copy, made on first use
        self.name = name
        # The largest id + 1, not the token count: a vocabulary may skip ids.
        self.vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
        self.eos_id = _find_eos(tokenizer)
        self.eos_token = None if self.eos_id is None else tokenizer.id_to_token(self.eos_id)
        spec = json.loads(self._json)
        # Byte-level tokenizers (GPT-2's kind, ours) spell each token in a printable alias of
        # its bytes; others are decoded in context (see _piece_bytes).
        decoders = _types_of(spec.get("decoder"))
        self._byte_level = "ByteLevel" in decoders
        self._byte_fallback = "ByteFallback" in decoders
        # Tokens without text: special added tokens, and end-of-text even when it is a plain
        # vocabulary entry (a WordLevel "</s>"), so its spelling never reaches a client.
        self._textless = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
        if self.eos_id is not None:
            self._textless.add(self.eos_id)
        self._anchor = _anchor_of(tokenizer)
        self._pieces: dict[int, bytes] = {}

    # (encode_batch of one text, not encode: the same ids, but encode holds the GIL throughout,
    # so a serving ingress encoding a large prompt in a worker thread still stalled its event
    # loop; encode_batch releases it. A few tenths of a microsecond more on a short text.)
    def encode(self, text: str) -> list[int]:
        return self._tok.encode_batch([text], add_special_tokens=False)[0].ids

    def encode_as_text(self, text: str) -> list[int]:
        return self._special_as_text().encode_batch([text], add_special_tokens=False)[0].ids

    def _special_as_text(self):
        """A copy of the tokenizer that reads a special token's spelling as plain text."""
        if self._as_text is None:  # a second instance: the setting is the tokenizer's own
            from tokenizers import Tokenizer as HFTok

            self._as_text = HFTok.from_str(self._tok.to_str())
        # (set every time: a pickled copy, as Ray ships one, comes back without it)
        self._as_text.encode_special_tokens = True
        return self._as_text

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        """Training documents, with any special token's spelling in them as plain text: a
        document mentioning "<|endoftext|>" was cut into two there (the byte tokenizer keeps
        it as text); documents are separated by the real end-of-text token alone."""
        dtype = np.uint16 if self.vocab_size <= 1 << 16 else np.uint32
        return [np.asarray(e.ids, dtype=dtype) for e in
                self._special_as_text().encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.token_bytes(int(i)) for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the tokenizer's "
                             f"0-{self.vocab_size - 1} ({self.name})")
        if token_id in self._textless:
            return b""
        piece = self._pieces.get(token_id)
        if piece is None:
            piece = self._pieces[token_id] = self._piece_bytes(token_id)
        return piece

    def _piece_bytes(self, token_id: int) -> bytes:
        """The bytes a token adds to text before it. Decoding it alone is wrong for most
        non-byte-level tokenizers: a SentencePiece word start ("▁world") or a WordPiece word
        loses its space, and a byte-fallback token (<0xC3>) half of a character becomes
        U+FFFD. So: a byte-fallback token is its byte; any other is decoded after an anchor
        token, less the anchor's own text."""
        piece = self._tok.id_to_token(token_id)
        if piece is None:  # a hole in the vocabulary
            return b""
        if self._byte_level:
            table = _unicode_to_byte()
            if all(ch in table for ch in piece):
                return bytes(table[ch] for ch in piece)
        if self._byte_fallback and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            return bytes.fromhex(piece[3:5])
        if self._anchor:
            before = self._tok.decode(self._anchor, skip_special_tokens=False)
            both = self._tok.decode(self._anchor + [token_id], skip_special_tokens=False)
            if both.startswith(before):
                return both[len(before):].encode("utf-8")
        return self._tok.decode([token_id]).encode("utf-8")

    def to_json(self) -> str:
        return self._json

    @functools.cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()


def _anchor_of(tokenizer) -> list[int]:
    """The token of "a" that _piece_bytes decodes other tokens after, or none: a tokenizer
    that cannot encode "a" (a WordLevel vocabulary without an unknown token raises) still
    loads, decoding each token alone; it raised a bare Exception from `tokenizers` instead."""
    try:
        anchor = tokenizer.encode("a", add_special_tokens=False).ids
    except Exception:  # tokenizers raises its own Exception type
        return []
    return anchor[-1:] if anchor else []


def _types_of(component: dict | None, inner_key: str = "decoders") -> set[str]:
    """The types of a tokenizer.json decoder (or pre-tokenizer, `inner_key` "pretokenizers"),
    through Sequences."""
    if not component:
        return set()
    types = {component.get("type")}
    for inner in component.get(inner_key) or ():
        types |= _types_of(inner, inner_key)
    return types


# End-of-text tokens by name: GPT-2's (ours, Qwen's, Phi's), Llama 3's, DeepSeek's,
# SentencePiece's (Llama 2, Mistral, T5), Gemma's, BERT's. By name only, so the id is a
# function of tokenizer.json alone: training, its tokenizer workers, serving and export agree.
EOS_NAMES = (EOT_TOKEN, "<|end_of_text|>", "<｜end▁of▁sentence｜>", "</s>", "<eos>", "[SEP]")


def _find_eos(tokenizer) -> int | None:
    for candidate in EOS_NAMES:
        token_id = tokenizer.token_to_id(candidate)
        if token_id is not None:
            return token_id
    return None


@functools.lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable alias of each byte (what byte-level BPE tokens are spelt with)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@functools.lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    return {ch: b for b, ch in _byte_to_unicode().items()}


def _byte_level_hf_tokenizer(with_eos: bool = True):
    """ByteTokenizer as a `tokenizers` object: a BPE with the 256 bytes as its vocabulary
    (id = byte value) and no merges, then <|endoftext|> as id 256."""
    from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in _byte_to_unicode().items()}
    tok = HFTok(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    if with_eos:
        tok.add_special_tokens([EOT_TOKEN])
    return tok


def load_tokenizer_file(path: str | os.PathLike, flag: str = "--tokenizer") -> HFTokenizer:
    """A tokenizer.json (or a directory holding one); TokenizerError naming the file."""
    from orchestrator.validation import expand_home

    path = expand_home(path, flag, TokenizerError)
    folder = path if path.is_dir() else None
    if folder is not None:
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise TokenizerError(f"{flag}: tokenizer file {path} does not exist"
                             + (_other_tokenizer_files(folder) if folder else ""))
    from tokenizers import Tokenizer as HFTok

    try:
        text = path.read_text(encoding="utf-8")
        tok = HFTok.from_str(text)
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{flag}: cannot read tokenizer file {path}: {e}") from None
    except Exception as e:  # tokenizers raises its own Exception for bad JSON / schema
        raise TokenizerError(f"{flag}: {path} is not a Hugging Face tokenizers file: "
                             f"{_tokenizer_file_problem(path, e)}") from None
    if tok.get_vocab_size(with_added_tokens=True) < 1:
        raise TokenizerError(f"{flag}: tokenizer file {path} has an empty vocabulary")
    _check_vocabulary(tok, f"{flag}: tokenizer file {path}")
    _check_lossless(tok, json.loads(text), f"{flag}: tokenizer file {path}")
    return HFTokenizer(tok, str(path))


def _check_vocabulary(tok, where: str, trained: bool = False) -> None:
    """TokenizerError (`where` names the flag and file) for a tokenizer a run cannot train
    with: one whose tokens are all special (end-of-text alone: every text encoded to []), or
    one whose largest id is far past its tokens (the model's vocabulary is that id + 1).
    Checked on the `tokenizers` object, before HFTokenizer: its to_str of a file with an id
    of 4e9 takes half a minute. A `trained` run's own tokenizer is held to RUN_IDS_LIMIT
    instead: runs trained before the --tokenizer check with sparser ids resume and serve."""
    vocab = tok.get_vocab(with_added_tokens=True)
    textless = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    if not set(vocab.values()) - textless - {_find_eos(tok)}:
        special = ", ".join(repr(t) for t, _ in sorted(vocab.items(), key=lambda e: e[1]))
        raise TokenizerError(f"{where} holds no token but its special ones ({special}): "
                             "it encodes every text to nothing")
    token = max(vocab, key=vocab.__getitem__)
    if trained and vocab[token] + 1 > RUN_IDS_LIMIT:
        raise TokenizerError(f"{where}: token {token!r} has id {vocab[token]:,}, past "
                             f"{RUN_IDS_LIMIT:,} ids, more than any model trains with (a file "
                             "edited by hand?)")
    if not trained and vocab[token] + 1 > max(2 * len(vocab), SPARSE_IDS_FROM):
        raise TokenizerError(f"{where}: token {token!r} has id {vocab[token]:,}, past twice "
                             f"its {len(vocab):,} tokens (the model's vocabulary would be "
                             f"{vocab[token] + 1:,} ids, nearly all unused): number its "
                             "tokens from 0 without large gaps")


def _check_lossless(tok, spec: dict, where: str) -> None:
    """TokenizerError for a BPE that drops a character outside its vocabulary without a
    trace: one with no unknown token and no byte fallback, unless it is byte-level with all
    256 byte tokens (trained on "hello world", "hello zebra é world" encoded as
    'helloerworld', and a run trained on what was left). Other models raise on such text
    (the tokenizing pass names the document) or have an unknown token."""
    from tokenizers import models

    model = tok.model
    if not isinstance(model, models.BPE) or model.unk_token or model.byte_fallback:
        return
    fix = ("give it an unknown token (model.unk_token, in its vocabulary), or byte fallback "
           "with the <0x00>..<0xFF> tokens, or train a byte-level BPE (--train-tokenizer N)")
    if "ByteLevel" in _types_of(spec.get("pre_tokenizer"), "pretokenizers"):
        vocab, table = tok.get_vocab(with_added_tokens=False), _byte_to_unicode()
        lacking = [b for b in range(BYTE_VOCAB) if table[b] not in vocab]
        if lacking:
            raise TokenizerError(f"{where}: its byte-level vocabulary lacks {len(lacking)} of "
                                 f"the 256 byte tokens (byte 0x{lacking[0]:02X}"
                                 f"{' and others' if len(lacking) > 1 else ''}) and it has "
                                 "no unknown token: text holding those bytes loses them "
                                 f"silently; {fix}")
        return
    raise TokenizerError(f"{where}: its BPE has no unknown token (model.unk_token) and no "
                         "byte fallback (model.byte_fallback): a character outside its "
                         f"{tok.get_vocab_size():,} tokens is dropped from the text without "
                         f"a trace; {fix}")


# Ids below this are never refused as far past the tokens: a small embedding, whatever gaps.
SPARSE_IDS_FROM = 1 << 16
# The largest id a run's own tokenizer.json may hold (a model of 16.7M ids: its embedding
# alone 64 GiB at GPT-2 small's width). Looser than a --tokenizer's bound, which came later:
# a run trained with sparser ids before it still resumes and serves.
RUN_IDS_LIMIT = 1 << 24


# What a model folder holds instead of tokenizer.json: a slow transformers tokenizer's files.
OTHER_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
                         "sentencepiece.bpe.model", "vocab.txt")


def _other_tokenizer_files(folder: Path) -> str:
    """A hint for a folder without tokenizer.json that holds another form of tokenizer (GPT-2's
    vocab.json + merges.txt, a SentencePiece model): only tokenizer.json is read."""
    found = [name for name in OTHER_TOKENIZER_FILES if (folder / name).is_file()]
    if not found:
        return ""
    return (f"; the folder holds {', '.join(found)}, which are not read: only a Hugging Face "
            "tokenizers file is (transformers writes one: AutoTokenizer.from_pretrained(DIR)"
            ".save_pretrained(DIR), for a tokenizer it loads as a fast one)")


def _tokenizer_file_problem(path: Path, error: Exception) -> str:
    """Why the file is not a tokenizer, said plainly: the Rust parser's message reads like a
    JSON syntax error ("expected `,` or `}`") also for valid JSON of another shape."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # (nested thousands deep: no tokenizer either)
        return f"not valid JSON ({type(e).__name__}: {str(e)[:200]})"
    if not isinstance(data, dict) or "model" not in data:
        return ("valid JSON, but not a tokenizer: it has no 'model' (a tokenizer.json as "
                "`tokenizers` or `transformers` saves it is expected)")
    return str(error).splitlines()[0][:200]


def tokenizer_from_json(text: str, name: str) -> Tokenizer:
    """A tokenizer from its tokenizer.json text: the byte tokenizer when it is ours.
    TokenizerError naming `name` for one of special tokens only or an id past RUN_IDS_LIMIT
    (a run's own tokenizer.json edited by hand to an id of 4e9 took half a minute and more
    to load)."""
    if hashlib.sha256(text.encode()).hexdigest() == ByteTokenizer().sha256:
        return ByteTokenizer()
    from tokenizers import Tokenizer as HFTok

    try:
        tok = HFTok.from_str(text)
    except Exception as e:
        raise TokenizerError(f"{name} is not a Hugging Face tokenizers file: "
                             f"{str(e).splitlines()[0][:200]}") from None
    _check_vocabulary(tok, name, trained=True)  # (before HFTokenizer: its to_str is slow)
    return HFTokenizer(tok, name)


def _read_tokenizer_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise TokenizerError(f"cannot read tokenizer file {path}: {e}") from None


def tokenizer_text(data: bytes, path: str | os.PathLike) -> str:
    """The text of the tokenizer file `path` whose bytes are `data` (hashed as they are
    before this); TokenizerError naming the file when they are not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerError(f"cannot read tokenizer file {path}: not UTF-8 text ({e})") from None


def load_tokenizer(spec: str) -> Tokenizer:
    """`--tokenizer`: "bytes" or the path of a tokenizer.json (or of a directory with one)."""
    if spec == "bytes":
        return ByteTokenizer()
    tok = load_tokenizer_file(spec)
    return ByteTokenizer() if tok.sha256 == ByteTokenizer().sha256 else tok


def train_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    """A byte-level BPE (GPT-2's kind) trained on `texts` with the `tokenizers` library:
    `vocab_size` ids including the 256 byte tokens and <|endoftext|>."""
    if not isinstance(vocab_size, int) or not 257 <= vocab_size <= 1 << 20:
        raise TokenizerError(f"--train-tokenizer must be a vocabulary size in [257, 1048576], "
                             f"got {vocab_size!r}")
    from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers, trainers

    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(tok, f"bpe-{vocab_size}")


def save_tokenizer(tokenizer: Tokenizer, directory: str | os.PathLike) -> Path:
    """Write `tokenizer.json` into `directory` whole or not at all (write_atomically, as
    config.json beside it: a failed write, a full disk, left `tokenizer.json.tmp` in the run
    directory); CheckpointError naming the file when it cannot be written."""
    from orchestrator.training.checkpoint import write_atomically

    path = Path(directory) / TOKENIZER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    text = tokenizer.to_json().encode("utf-8")
    write_atomically(path, lambda f: f.write(text), what="file")
    return path


def tokenizer_of_run(directory: str | os.PathLike, expected_sha256: str = "") -> Tokenizer:
    """The tokenizer a run (or one of its checkpoints) was trained with: the tokenizer.json in
    `directory` or its parent (a run directory holds checkpoint_* directories). A run from
    before tokenizers were recorded has none: bytes. TokenizerError when the file found is not
    the one the checkpoint recorded (`expected_sha256`)."""
    directory = Path(directory)
    for candidate in (directory / TOKENIZER_FILE, directory.parent / TOKENIZER_FILE):
        if candidate.is_file():
            data = _read_tokenizer_bytes(candidate)
            digest = hashlib.sha256(data).hexdigest()
            if expected_sha256 and digest != expected_sha256:
                raise TokenizerError(f"{candidate} is not the tokenizer this model was trained "
                                     f"with (sha256 {digest[:12]}..., recorded "
                                     f"{expected_sha256[:12]}...)")
            return tokenizer_from_json(tokenizer_text(data, candidate), str(candidate))
    if expected_sha256 and expected_sha256 != ByteTokenizer().sha256:
        raise TokenizerError(f"{directory}: the model was trained with tokenizer "
                             f"{expected_sha256[:12]}... but no {TOKENIZER_FILE} is beside it")
    return ByteTokenizer()
