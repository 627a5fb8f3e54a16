"""Token shards: the tokenized corpus on storage every node reads, and how workers read it.

A cache directory (one per cache key: orchestrator/training/corpus.cache_key) holds
  <file>-train-<part>.bin, <file>-held_out-<part>.bin   raw token ids (uint16 when the
                                                        vocabulary fits, else uint32)
  manifest.json                                         every shard in order, with counts
  readers.lock                                          held shared by every process reading
                                                        the shards (local filesystems)
Each shard is written under a temporary name and renamed; the manifest is written last, the
same way. A directory without a manifest is an interrupted pass: it is cleared and redone, never
read. With the manifest present, a second run tokenizes nothing. On a local or network
filesystem one pass at a time writes a cache directory (`pass_lock`): a second run starting on
the same files waits for the first and then reads its shards instead of clearing them. A
--retokenize over finished shards writes a fresh directory beside the cache's and swaps it in
(`swap_in`); the replaced one is removed once no process holds its readers lock. What a
killed pass leaves beside the cache is settled by the next pass (`settle_leftovers`).

Workers memory-map the shards (numpy.memmap) and read only the windows a batch needs, so a
worker's memory does not grow with the corpus; every shard stays mapped where the open-files
limit allows (each map holds a file descriptor), else at most half that limit at once
(OPEN_MAPS_MAX at least), so a worker does not run out of files. Shards on remote storage
(s3://, gs://) are first copied to local disk once. The training split is the concatenation of
the train shards in manifest order, so a batch stays a pure function of (seed, rank, step).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import re
import resource
import shutil
import socket
import time
import uuid
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from orchestrator.file_lock import created_locked, file_lock, flock_held, process_alive
from orchestrator.training.corpus import (DataError, Document, SourceFile, is_held_out,
                                          iter_documents, place)

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
SHARD_TOKENS = 16 << 20  # tokens per shard: 32 MiB of uint16
ENCODE_BATCH_DOCS = 256  # documents handed to the tokenizer at once
# A document is handed to the tokenizer in pieces of at most this many characters, and a call
# gets at most ENCODE_BATCH_CHARS of them: `tokenizers` keeps ~500 bytes a token until a
# call returns (offsets, token strings), so one 20 MB .jsonl line took 3 GB (a 256 MiB one,
# which the reader accepts, would take ~40 GB) and a batch of 256 long documents as much.
ENCODE_PIECE_CHARS = 64 << 10
ENCODE_BATCH_CHARS = 1 << 20
# Where a long document is cut: a single space between two non-spaces, the last in the
# piece, so a byte-level BPE (GPT-2's pre-tokenizer: " word" is one unit) reads the pieces
# as it reads the whole; a piece with no such space is cut at its length.
_PIECE_CUT = re.compile(r".*\S(?= \S)", re.S)
SPLITS = ("train", "held_out")
LOCAL_SHARD_CACHE = Path("~/.cache/hetero-orchestrator/shards")
OPEN_MAPS_MAX = 64  # shard maps a reader keeps at least, whatever the open-files limit
READERS_FILE = "readers.lock"  # held shared by every process reading the directory's shards
RETOKENIZING = ".retokenize-"  # <cache dir>.retokenize-<id>: a --retokenize pass's directory
REPLACED = ".replaced-"  # <cache dir>.replaced-<id>: shards a --retokenize replaced


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def storage_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) of a cache location: a local path or a URI pyarrow knows."""
    if "://" in uri:
        try:
            return pafs.FileSystem.from_uri(uri)
        except Exception as e:
            raise DataError(f"--data-cache {uri}: cannot open this URI: {e}") from None
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def on_local_storage(cache_uri: str) -> bool:
    """Whether a cache is on a local (or network) filesystem, where directories are renamed
    and files locked; not object storage."""
    return isinstance(storage_for(cache_uri)[0], pafs.LocalFileSystem)


def write_atomically(fs: pafs.FileSystem, path: str, data) -> None:
    """Write `path` whole or not at all: a temporary file of this writer's own (runs writing
    the same file at once must not write, and then move away, each other's; on shared
    storage, drivers in two containers can have the same pid), then a move. A write that
    fails (a full disk) removes its temporary file: half of one was left in the cache root
    (a trained tokenizer's, the bundled corpus's), where no later pass clears it."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):  # (never written, or the storage refuses)
            fs.delete_file(tmp)
        raise


@contextlib.contextmanager
def writing_cache(cache_uri: str, what: str):
    """An I/O error writing `what` into the cache (disk full, read-only, a storage error) as
    a DataError naming the cache: it left the tokenizing pass as a raw (Ray) traceback."""
    try:
        yield
    except OSError as e:
        raise DataError(f"the data cache {cache_uri} (--data-cache): cannot write {what}: "
                        f"{e}") from None


class ShardWriter:
    """Buffers one file's token ids per split and writes a shard whenever a split holds
    `shard_tokens` tokens (a worker's memory is bounded by the shard size): after the document
    whose tokens reach it, so the end-of-text added after them may open the next shard."""

    def __init__(self, cache_uri: str, prefix: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.cache_uri = cache_uri
        self.fs, self.directory = storage_for(cache_uri)
        self.prefix, self.dtype, self.shard_tokens = prefix, dtype, shard_tokens
        self.buffers: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
        self.buffered = dict.fromkeys(SPLITS, 0)
        self.shards: list[dict[str, Any]] = []

    def add(self, split: str, ids: np.ndarray) -> None:
        self.buffers[split].append(ids.astype(self.dtype, copy=False))
        self.buffered[split] += len(ids)
        if self.buffered[split] >= self.shard_tokens:
            self._flush(split)

    def _flush(self, split: str) -> None:
        if not self.buffered[split]:
            return
        tokens = np.concatenate(self.buffers[split])
        part = sum(1 for s in self.shards if s["split"] == split)
        name = f"{self.prefix}-{split}-{part:04d}.bin"
        with writing_cache(self.cache_uri, name):
            write_atomically(self.fs, f"{self.directory}/{name}", tokens.tobytes())
        self.shards.append({"file": name, "split": split, "tokens": int(len(tokens))})
        self.buffers[split], self.buffered[split] = [], 0

    def close(self) -> list[dict[str, Any]]:
        for split in SPLITS:
            self._flush(split)
        return self.shards


def tokenize_source(source: SourceFile, file_index: int, tokenizer, cache_uri: str, *,
                    text_field: str = "text", skip_bad_lines: bool = False,
                    shard_tokens: int = SHARD_TOKENS) -> dict[str, Any]:
    """Tokenize one file into shards in `cache_uri`: documents go to the train or held-out
    split by corpus.is_held_out. Each split gets the file's text in runs, each followed by
    the end-of-text token: a run is a .jsonl line's or parquet row's document, or the .txt
    paragraphs that follow each other in the file (a book's text runs on across paragraphs,
    and ends where the file goes on in the other split, or ends); the same rule for both
    splits, so held-out text reads as training text does. Returns the file's shard records
    and counts (documents, tokens, bytes, skipped lines, seconds)."""
    started = time.perf_counter()
    writer = ShardWriter(cache_uri, f"{file_index:05d}", token_dtype(tokenizer.vocab_size),
                         shard_tokens)
    eos = (np.asarray([tokenizer.eos_id], dtype=writer.dtype)
           if tokenizer.eos_id is not None else None)
    skipped: list[str] = []
    counts = {"documents": 0, "held_out_documents": 0}
    pending: list[Document] = []
    run_open = dict.fromkeys(SPLITS, False)  # tokens written since the split's last end-of-text

    def end_run(split: str) -> None:
        if run_open[split] and eos is not None:
            writer.add(split, eos)
        run_open[split] = False

    def encode_pending() -> None:
        for doc, ids in zip(pending, encode_documents(tokenizer, source, pending)):
            held_out = is_held_out(doc.text)
            split, other = ("held_out", "train") if held_out else ("train", "held_out")
            # (a document of only spaces and line ends, a .txt file's blank lines or a
            # .jsonl text of spaces, counts as no text, as "" does: check_trainable)
            counts["held_out_documents" if held_out else "documents"] += bool(doc.text.strip())
            if len(ids):
                end_run(other)  # the file's text goes on in this split
                writer.add(split, ids)
                run_open[split] = True
            if doc.eos_after:  # the document (or a .txt file) ends
                for either in SPLITS:
                    end_run(either)
        pending.clear()

    for doc in iter_documents(source, text_field, skip_bad_lines, skipped):
        pending.append(doc)
        if len(pending) >= ENCODE_BATCH_DOCS:
            encode_pending()
    encode_pending()
    shards = writer.close()
    return {"index": file_index, "uri": source.uri, "bytes": source.size,
            "documents": counts["documents"], "held_out_documents": counts["held_out_documents"],
            "tokens": sum(s["tokens"] for s in shards if s["split"] == "train"),
            "held_out_tokens": sum(s["tokens"] for s in shards if s["split"] == "held_out"),
            "skipped": skipped[:20], "skipped_count": len(skipped), "shards": shards,
            "seconds": time.perf_counter() - started}


def encode_documents(tokenizer, source: SourceFile, docs: list[Document]) -> list[np.ndarray]:
    """The token ids of `docs`; DataError naming the file and the first document the tokenizer
    cannot encode (a WordLevel vocabulary without an unknown token meeting a word outside it:
    `tokenizers` raises a bare Exception, which left the pass as a traceback naming nothing)."""
    try:
        return encode_bounded(tokenizer, [d.text for d in docs])
    except Exception as batch_error:  # tokenizers raises its own Exception type
        for doc in docs:  # which one: encoded alone
            try:
                encode_bounded(tokenizer, [doc.text])
            except Exception as e:
                raise DataError(f"{place(source, doc.line)}: the tokenizer ({tokenizer.name}) "
                                f"cannot encode this document: {str(e).splitlines()[0]}"
                                ) from None
        raise DataError(f"{source.uri}: the tokenizer ({tokenizer.name}) cannot encode "
                        f"its documents: {str(batch_error).splitlines()[0]}") from None


def encode_bounded(tokenizer, texts: list[str]) -> list[np.ndarray]:
    """tokenizer.encode_arrays(texts), each text in pieces of at most ENCODE_PIECE_CHARS
    characters (text_pieces) and at most ENCODE_BATCH_CHARS characters a call, so the
    tokenizer's memory is bounded whatever the length of a document."""
    pieces = [(i, piece) for i, text in enumerate(texts) for piece in text_pieces(text)]
    parts: list[list[np.ndarray]] = [[] for _ in texts]
    start = 0
    while start < len(pieces):
        end, chars = start, 0
        while end < len(pieces) and (end == start or chars + len(pieces[end][1])
                                     <= ENCODE_BATCH_CHARS):
            chars += len(pieces[end][1])
            end += 1
        batch = pieces[start:end]
        for (i, _), ids in zip(batch, tokenizer.encode_arrays([p for _, p in batch])):
            parts[i].append(ids)
        start = end
    return [p[0] if len(p) == 1 else np.concatenate(p) for p in parts]


def text_pieces(text: str) -> list[str]:
    """`text` in pieces of at most ENCODE_PIECE_CHARS characters that join back to it, each
    cut before the last single space between non-spaces in it (_PIECE_CUT)."""
    pieces, start = [], 0
    while len(text) - start > ENCODE_PIECE_CHARS:
        limit = start + ENCODE_PIECE_CHARS
        cut = _PIECE_CUT.match(text, start, limit)
        end = cut.end() if cut else limit
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return pieces


class UnreadableManifest(DataError):
    """A manifest that does not parse or cannot be read: --retokenize replaces it."""


def has_manifest_file(cache_uri: str) -> bool:
    """Whether the cache directory holds a manifest file, whatever is in it."""
    fs, directory = storage_for(cache_uri)
    return fs.get_file_info(f"{directory}/{MANIFEST_FILE}").type == pafs.FileType.File


def read_manifest(cache_uri: str) -> dict[str, Any] | None:
    """The cache directory's manifest, or None when there is none (nothing or a partial
    pass); UnreadableManifest naming the file when it does not parse."""
    if not has_manifest_file(cache_uri):
        return None
    fs, directory = storage_for(cache_uri)
    path = f"{directory}/{MANIFEST_FILE}"
    try:
        with fs.open_input_stream(path) as f:
            raw = f.read()
    except OSError as e:
        raise _unreadable(cache_uri, e) from None
    return parse_manifest(raw, cache_uri)


def parse_manifest(raw: bytes, cache_uri: str) -> dict[str, Any] | None:
    """A manifest's contents; None when another version wrote it (it is rebuilt)."""
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except ValueError as e:
        raise _unreadable(cache_uri, e) from None
    if manifest.get("version") != MANIFEST_VERSION:
        return None
    return manifest


def _unreadable(cache_uri: str, error: Exception) -> UnreadableManifest:
    return UnreadableManifest(f"shard manifest {cache_uri}/{MANIFEST_FILE} is unreadable: "
                              f"{error}; pass --retokenize to rebuild it")


def clear_cache_dir(cache_uri: str) -> None:
    """Remove whatever an earlier, interrupted (or --retokenize'd) pass left, then recreate."""
    fs, directory = storage_for(cache_uri)
    with writing_cache(cache_uri, "its directory (clearing it)"):
        if fs.get_file_info(directory).type == pafs.FileType.Directory:
            _delete_manifest(fs, directory)
            fs.delete_dir_contents(directory)
        fs.create_dir(directory, recursive=True)
        if on_local_storage(cache_uri):  # (object storage has no locks)
            fs.open_output_stream(f"{directory}/{READERS_FILE}").close()  # empty


def _delete_manifest(fs: pafs.FileSystem, directory: str) -> None:
    """The first step of removing a cache directory: a removal cut short (killed, an I/O
    error) left the manifest beside missing shards, and the next run took them for finished;
    and a reader finds no manifest, so never maps shards being removed (_remove_unread)."""
    manifest = f"{directory}/{MANIFEST_FILE}"
    if fs.get_file_info(manifest).type == pafs.FileType.File:
        fs.delete_file(manifest)


@contextlib.contextmanager
def pass_lock(cache_uri: str, say=print):
    """Held around a tokenizing pass into `cache_uri`, so that two runs starting on the same
    files do not clear each other's shards: the second waits here until the first is done.
    Yields whether it waited (the cache may then hold the other run's finished shards). An
    exclusive flock on `<cache dir>.lock` beside the directory: released by the kernel when
    its holder dies, and honoured across NFS clients. Object storage (s3://, gs://) has no
    such lock, nor has a filesystem that refuses flock (some FUSE and Lustre mounts): there
    it yields False at once (said, for the latter) and the pass runs unguarded, as before.
    Held, it first settles what earlier passes left beside the cache (settle_leftovers)."""
    if not on_local_storage(cache_uri):
        yield False
        return
    path = Path(storage_for(cache_uri)[1] + ".lock")

    def wait_for(holder: str) -> None:
        say(f"{holder} is tokenizing these files into {cache_uri}; waiting for it to finish, "
            "then using its shards")
    with contextlib.ExitStack() as held:
        with writing_cache(cache_uri, f"its lock file {path}"):  # (not the pass's errors)
            state = held.enter_context(file_lock(path, on_busy=wait_for))
        if state.unsupported:
            say(f"warning: cannot lock {path} ({state.unsupported}): two runs tokenizing into "
                "this cache at once could clear each other's shards")
        else:
            settle_leftovers(cache_uri, say)
        yield state.waited


def fresh_dir_beside(cache_uri: str) -> str:
    """Where a --retokenize pass writes, to be swapped in when finished (swap_in)."""
    return f"{cache_uri}{RETOKENIZING}{uuid.uuid4().hex[:12]}"


def swap_in(fresh: str, cache_uri: str, say=print) -> None:
    """Put the finished pass in `fresh` (a directory beside the cache's, as fresh_dir_beside
    names it) in the cache directory's place: the cache directory is renamed aside, then
    `fresh` renamed to it (a run opening the shards in between tries again: open_shards).
    Then the replaced directories are removed, those no process reads; a run training on the
    shards keeps them, by its descriptor of their directory, until it ends. Local or network
    filesystems only (plan_data refuses --retokenize on object storage)."""
    _, directory = storage_for(cache_uri)
    _, fresh_dir = storage_for(fresh)
    replaced = f"{directory}{REPLACED}{uuid.uuid4().hex[:12]}"
    with writing_cache(cache_uri, "its directory (replacing it)"):
        os.rename(directory, replaced)
        try:
            os.rename(fresh_dir, directory)
        except OSError:
            os.rename(replaced, directory)
            raise
    remove_replaced(cache_uri, say)


def settle_leftovers(cache_uri: str, say=print) -> None:
    """What earlier passes into this cache left beside it, settled as a pass starts, under
    the pass lock (every pass into the cache holds it, so none writes beside it now): a
    finished --retokenize directory takes the cache's place where a pass killed between
    swap_in's renames left none (it was tokenized again); the other --retokenize directories,
    of passes that died, are removed (each as large as the cache), and so are the replaced
    ones no process reads."""
    _, directory = storage_for(cache_uri)
    fresh = sorted(glob.glob(glob.escape(directory) + RETOKENIZING + "*"))
    finished = [path for path in fresh if _finished(path)]
    if finished and not os.path.exists(directory):
        newest = max(finished, key=lambda path: os.stat(f"{path}/{MANIFEST_FILE}").st_mtime_ns)
        with writing_cache(cache_uri, "its directory (putting finished shards in place)"):
            os.rename(newest, directory)
        say(f"the finished token shards of a --retokenize killed before its swap take the "
            f"cache's place: {newest} -> {cache_uri}")
    for path in fresh:
        shutil.rmtree(path, ignore_errors=True)
    remove_replaced(cache_uri, say)


def _finished(directory: str) -> bool:
    """Whether a --retokenize directory holds a finished pass (its manifest, written last)."""
    try:
        return read_manifest(directory) is not None
    except DataError:
        return False


def remove_replaced(cache_uri: str, say=print) -> None:
    """Remove the directories that --retokenize replaced beside this cache, once no process
    reads them (they are said to be kept otherwise). Called under the cache's pass lock."""
    _, directory = storage_for(cache_uri)
    for path in sorted(glob.glob(glob.escape(directory) + REPLACED + "*")):
        if not _remove_unread(path):
            say(f"the token shards --retokenize replaced may still be read by a run training "
                f"on them: left at {path}; a later pass into this cache (--retokenize) "
                "removes them once none does")


def _remove_unread(directory: str) -> bool:
    """Remove a directory unless a process holds its readers lock (ShardFiles); False when it
    is kept: read now, or on a filesystem without flock, where that cannot be told."""
    try:
        lock = open(os.path.join(directory, READERS_FILE), "r+b")
    except FileNotFoundError:
        lock = None  # no reader can hold it
    except OSError:  # not ours to lock (read-only): whether it is read cannot be told
        return False
    try:
        if lock is not None:
            # Held while removing: a reader opening the directory meanwhile waits, then finds
            # it removed and opens the cache path again (ShardFiles.removed).
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # BlockingIOError: read now
                return False
        # The manifest first: rmtree may unlink the lock file before it, and a reader then
        # finding no lock to wait on read the manifest and mapped shards that vanished.
        try:
            _delete_manifest(pafs.LocalFileSystem(), directory)
        except OSError:
            return False
        shutil.rmtree(directory, ignore_errors=True)
        return True
    finally:
        if lock is not None:
            lock.close()


def write_manifest(cache_uri: str, key: str, tokenizer, results: list[dict[str, Any]],
                   sources: list[SourceFile], text_field: str) -> dict[str, Any]:
    """The manifest of a finished pass, written last (atomically): shards in file order."""
    results = sorted(results, key=lambda r: r["index"])
    manifest = {
        "version": MANIFEST_VERSION, "key": key,
        "tokenizer_sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id, "dtype": token_dtype(tokenizer.vocab_size).name,
        "text_field": text_field, "sources": [s.to_dict() for s in sources],
        "documents": sum(r["documents"] for r in results),
        "held_out_documents": sum(r["held_out_documents"] for r in results),
        "skipped_lines": sum(r["skipped_count"] for r in results),
        "skipped_example": next((line for r in results for line in r["skipped"]), None),
        "splits": {split: [s for r in results for s in r["shards"] if s["split"] == split]
                   for split in SPLITS},
    }
    for split in SPLITS:
        manifest[f"{split}_tokens"] = sum(s["tokens"] for s in manifest["splits"][split])
    fs, directory = storage_for(cache_uri)
    with writing_cache(cache_uri, MANIFEST_FILE):
        _remove_unfinished_writes(fs, directory)
        write_atomically(fs, f"{directory}/{MANIFEST_FILE}",
                         (json.dumps(manifest, indent=1) + "\n").encode())
    return manifest


def _remove_unfinished_writes(fs: pafs.FileSystem, directory: str) -> None:
    """Remove the temporary files (write_atomically's `NAME.tmp-<id>`) of writers killed in
    the pass: a tokenizer worker killed mid-write (SIGKILL, the OOM killer) is restarted by
    Ray Data and its file tokenized again, and its half-written shard stayed in the finished
    cache. Called once every file is done, before the manifest: no writer of the pass is
    live."""
    for info in fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True)):
        if info.type == pafs.FileType.File and ".tmp-" in info.base_name:
            fs.delete_file(info.path)


class ShardFiles:
    """A cache directory's shard files, read as a training worker reads them.

    The directory is held by a descriptor, and its readers lock (READERS_FILE) shared while
    this reader lives: a --retokenize swaps a fresh directory in and renames this one aside,
    and removes it only once no process holds that lock (swap_in), so the shards stay this
    reader's to the end of its run. They are memory-mapped when a window first needs one, at
    most `max_open` at once (open_shards sizes it from the open-files limit: maps_to_keep),
    the least recently read unmapped first: every map holds a file descriptor, and one per
    shard ran each worker out of them (EMFILE under the usual 1,024) on a corpus of ~500
    small files (a train and a held-out shard each)."""

    def __init__(self, directory: str, max_open: int | None = None) -> None:
        self.directory, self.max_open = directory, max_open or OPEN_MAPS_MAX
        self.dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        weakref.finalize(self, os.close, self.dir_fd)
        self.readers = self._hold_readers_lock()
        self.maps: OrderedDict[str, np.memmap] = OrderedDict()

    def _open(self, name: str, mode: str = "rb"):
        return open(name, mode, opener=lambda path, flags: os.open(path, flags,
                                                                   dir_fd=self.dir_fd))

    def _hold_readers_lock(self):
        """The readers lock, held shared (None where there is none: a local copy of remote
        shards, or a filesystem without flock)."""
        try:
            lock = self._open(READERS_FILE)
        except FileNotFoundError:
            return None
        try:  # waits only while a --retokenize removes this directory (see removed)
            fcntl.flock(lock, fcntl.LOCK_SH)
        except OSError:
            lock.close()
            return None
        return lock

    @property
    def removed(self) -> bool:
        """Whether the directory was removed between its opening and the lock (the lock file
        is then unlinked): the cache path holds the shards that replaced it."""
        return self.readers is not None and os.fstat(self.readers.fileno()).st_nlink == 0

    def read_manifest(self, cache_uri: str) -> dict[str, Any] | None:
        try:
            with self._open(MANIFEST_FILE) as f:
                return parse_manifest(f.read(), cache_uri)
        except FileNotFoundError:
            return None

    def size(self, name: str) -> int:
        """The size of a shard file in bytes, -1 when it is missing."""
        try:
            return os.stat(name, dir_fd=self.dir_fd).st_size
        except FileNotFoundError:
            return -1
        except OSError as e:
            raise self._cannot_read(name, e) from None

    def mapped(self, name: str, dtype: np.dtype) -> np.memmap:
        found = self.maps.get(name)
        if found is not None:
            self.maps.move_to_end(name)
            return found
        if len(self.maps) >= self.max_open:
            self.maps.popitem(last=False)  # unmapped (its descriptor closed) with it
        try:
            with self._open(name) as f:
                found = self.maps[name] = np.memmap(f, dtype=dtype, mode="r")
        except OSError as e:  # removed under this reader, ESTALE on NFS, EIO
            raise self._cannot_read(name, e) from None
        return found

    def _cannot_read(self, name: str, error: OSError) -> DataError:
        """A training worker's read of a shard failed: named, not a raw OSError."""
        return DataError(f"token shard {self.directory}/{name}: cannot read: "
                         f"{error.strerror or error}")


class Shard:
    """One shard file as TokenStream reads it: its length from the manifest, its tokens from
    the map ShardFiles holds for it."""

    def __init__(self, files: ShardFiles, name: str, tokens: int, dtype: np.dtype) -> None:
        self.files, self.name, self.tokens, self.dtype = files, name, tokens, dtype
        self.filename = f"{files.directory}/{name}"

    def __len__(self) -> int:
        return self.tokens

    def __getitem__(self, index) -> np.ndarray:
        return self.files.mapped(self.name, self.dtype)[index]


class TokenStream:
    """The concatenation of shards (Shard, or arrays in memory), read by windows (only the
    pages a batch touches are ever resident)."""

    def __init__(self, arrays: list) -> None:
        self.arrays = [a for a in arrays if len(a)]
        self.ends = np.cumsum([len(a) for a in self.arrays], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64 (a window may span two shards)."""
        out = np.empty(length, dtype=np.int64)
        filled = 0
        shard = int(np.searchsorted(self.ends, start, side="right"))
        offset = start - (int(self.ends[shard - 1]) if shard else 0)
        while filled < length:
            piece = self.arrays[shard][offset:offset + length - filled]
            out[filled:filled + len(piece)] = piece
            filled += len(piece)
            shard, offset = shard + 1, 0
        return out

    def windows(self, starts, length: int) -> np.ndarray:
        return np.stack([self.window(int(s), length) for s in starts])


def open_shards(cache_uri: str, local_dir: str | os.PathLike | None = None
                ) -> tuple[TokenStream, TokenStream, dict[str, Any]]:
    """(train, held-out, manifest) of a finished cache; remote shards are copied to local disk
    first (`local_dir`, default ~/.cache/hetero-orchestrator/shards/<key>)."""
    fs, directory = storage_for(cache_uri)
    if isinstance(fs, pafs.LocalFileSystem):
        files, manifest = _open_local(directory, cache_uri)
    else:
        manifest = read_manifest(cache_uri)
        if manifest is None:
            raise _not_finished(cache_uri)
        local = Path(local_dir or LOCAL_SHARD_CACHE.expanduser() / manifest["key"])
        _copy_to_local(fs, directory, local, manifest)
        files = ShardFiles(str(local))
    files.max_open = maps_to_keep(sum(len(manifest["splits"][split]) for split in SPLITS))
    dtype = np.dtype(manifest["dtype"])
    streams = []
    for split in SPLITS:  # both splits in one ShardFiles: one bound on open files
        arrays = []
        for shard in manifest["splits"][split]:
            size = files.size(shard["file"])
            if size != shard["tokens"] * dtype.itemsize:
                raise DataError(f"token shard {files.directory}/{shard['file']} is missing or "
                                f"truncated ({size} bytes, expected "
                                f"{shard['tokens'] * dtype.itemsize}); pass --retokenize to "
                                "rebuild the cache")
            arrays.append(Shard(files, shard["file"], shard["tokens"], dtype))
        streams.append(TokenStream(arrays))
    return streams[0], streams[1], manifest


def maps_to_keep(shard_count: int) -> int:
    """How many shards a reader keeps mapped (ShardFiles.max_open): all of them where half
    the open-files limit, raised to its hard limit first, holds them (mapping at most 64,
    a corpus of 500 shards reopened one for nearly every window: batches 10x slower, more so
    on NFS); half, as the process has files of its own (sockets, checkpoints, libraries).
    Under a low limit the LRU of OPEN_MAPS_MAX maps is the fallback."""
    return max(OPEN_MAPS_MAX, min(shard_count, raised_open_files_limit() // 2))


def raised_open_files_limit() -> int:
    """The soft limit on open files (RLIMIT_NOFILE), raised to the hard limit where that is
    higher (best effort, as `ulimit -n` would; a worker starts with the soft one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 62
    if soft < hard and hard != resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass  # the soft limit stays: fewer maps
    return soft


def _open_local(directory: str, cache_uri: str) -> tuple[ShardFiles, dict[str, Any]]:
    """The cache directory held for reading, and its manifest (read through the same
    descriptor: the manifest and the shards are one pass's). Tried again a few times: a
    --retokenize swapping its fresh directory in leaves the path empty for an instant."""
    for attempt in range(4):
        try:
            files = ShardFiles(directory)
            manifest = files.read_manifest(cache_uri) if not files.removed else None
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ESTALE):  # (gone: opened again)
                raise DataError(f"token shards at {directory}: cannot read: {e}") from None
            manifest = None
        if manifest is not None:
            return files, manifest
        time.sleep(0.05 * (attempt + 1))
    raise _not_finished(cache_uri)


def _not_finished(cache_uri: str) -> DataError:
    return DataError(f"no finished token shards at {cache_uri} (no {MANIFEST_FILE}); "
                     "run jobs/pretrain.py with --data to build them")


def _copy_to_local(fs: pafs.FileSystem, directory: str, local: Path,
                   manifest: dict[str, Any]) -> None:
    local.mkdir(parents=True, exist_ok=True)
    _sweep_dead_copies(local)
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for split in SPLITS:
        for shard in manifest["splits"][split]:
            target = local / shard["file"]
            if target.exists() and target.stat().st_size == shard["tokens"] * itemsize:
                continue  # copied by an earlier attempt on this node
            tmp = target.with_name(f"{target.name}.tmp-{socket.gethostname()}-{os.getpid()}")
            try:
                # locked until renamed: a sweep that cannot see this pid leaves it alone
                with fs.open_input_stream(f"{directory}/{shard['file']}") as src, \
                        created_locked(tmp, "wb") as dst:
                    while chunk := src.read(8 << 20):
                        dst.write(chunk)
                    dst.flush()
                    os.replace(tmp, target)
            except BaseException:
                tmp.unlink(missing_ok=True)  # (a failed read, a full disk: not left behind)
                raise


_COPYING = re.compile(r"\.tmp-(?:(.+)-)?(\d+)$")  # <shard>.tmp-<host>-<pid> (or -<pid>)


def _sweep_dead_copies(local: Path) -> None:
    """Remove the partial copies (`<shard>.tmp-<host>-<pid>`) of workers on this host that
    died mid-copy (killed: nothing removed them), which stayed in the node's cache for
    ever. A live process's copy, or another host's (a shared home), is left alone; so is one
    whose writer still holds its flock (a container sharing this host's name and the home
    directory has pids of its own: a live copy there looked dead from here)."""
    for path in local.glob("*.tmp-*"):
        copying = _COPYING.search(path.name)
        if copying is None or copying.group(1) not in (None, socket.gethostname()):
            continue
        if not process_alive(int(copying.group(2))):
            with contextlib.suppress(OSError), open(path, "rb") as copy:
                if flock_held(copy):  # being written (None: no flock here, the pid's word)
                    continue
                path.unlink()
