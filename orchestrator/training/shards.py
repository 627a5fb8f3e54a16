"""Token shards: the tokenized corpus on storage every node reads, and how workers read it.

A cache directory (one per cache key: orchestrator/training/corpus.cache_key) holds
  <file>-train-<part>.bin, <file>-held_out-<part>.bin   raw token ids (uint16 when the
                                                        vocabulary fits, else uint32)
  manifest.json                                         every shard in order, with counts
Each shard is written under a temporary name and renamed; the manifest is written last, the
same way. A directory without a manifest is an interrupted pass: it is cleared and redone, never
read. With the manifest present, a second run tokenizes nothing. On a local or network
filesystem one pass at a time writes a cache directory (`pass_lock`): a second run starting on
the same files waits for the first and then reads its shards instead of clearing them.

Workers memory-map the shards (numpy.memmap) and read only the windows a batch needs, so a
worker's memory does not grow with the corpus; at most OPEN_MAPS_MAX shards are mapped at once
(each map holds a file descriptor), so neither do its open files. Shards on remote storage (s3://, gs://) are
first copied to local disk once. The training split is the concatenation of the train shards
in manifest order, so a batch stays a pure function of (seed, rank, step).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from orchestrator.file_lock import file_lock
from orchestrator.training.corpus import (DataError, Document, SourceFile, is_held_out,
                                          iter_documents)

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
SHARD_TOKENS = 16 << 20  # tokens per shard: 32 MiB of uint16
ENCODE_BATCH_DOCS = 256  # documents handed to the tokenizer at once
SPLITS = ("train", "held_out")
LOCAL_SHARD_CACHE = Path("~/.cache/hetero-orchestrator/shards")
OPEN_MAPS_MAX = 64  # shard files a reader keeps memory-mapped at once (ShardFiles)


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


def write_atomically(fs: pafs.FileSystem, path: str, data) -> None:
    """Write `path` whole or not at all: a temporary file of this writer's own (runs writing
    the same file at once must not write, and then move away, each other's; on shared
    storage, drivers in two containers can have the same pid), then a move."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


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
    `shard_tokens` tokens (a worker's memory is bounded by the shard size)."""

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
        texts = [d.text for d in pending]
        for doc, ids in zip(pending, tokenizer.encode_arrays(texts)):
            held_out = is_held_out(doc.text)
            split, other = ("held_out", "train") if held_out else ("train", "held_out")
            counts["held_out_documents" if held_out else "documents"] += bool(doc.text)
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


def read_manifest(cache_uri: str) -> dict[str, Any] | None:
    """The cache directory's manifest, or None when there is none (nothing or a partial
    pass); DataError naming the file when it does not parse."""
    fs, directory = storage_for(cache_uri)
    path = f"{directory}/{MANIFEST_FILE}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    try:
        with fs.open_input_stream(path) as f:
            manifest = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"shard manifest {cache_uri}/{MANIFEST_FILE} is unreadable: {e}; "
                        "pass --retokenize to rebuild it") from None
    if manifest.get("version") != MANIFEST_VERSION:
        return None  # written by another version: rebuilt
    return manifest


def clear_cache_dir(cache_uri: str) -> None:
    """Remove whatever an earlier, interrupted (or --retokenize'd) pass left, then recreate."""
    fs, directory = storage_for(cache_uri)
    with writing_cache(cache_uri, "its directory (clearing it)"):
        if fs.get_file_info(directory).type == pafs.FileType.Directory:
            # The manifest first: a clear cut short (killed, an I/O error) left it beside
            # missing shards, and the next run took the cache for finished.
            manifest = f"{directory}/{MANIFEST_FILE}"
            if fs.get_file_info(manifest).type == pafs.FileType.File:
                fs.delete_file(manifest)
            fs.delete_dir_contents(directory)
        fs.create_dir(directory, recursive=True)


@contextlib.contextmanager
def pass_lock(cache_uri: str, say=print):
    """Held around a tokenizing pass into `cache_uri`, so that two runs starting on the same
    files do not clear each other's shards: the second waits here until the first is done.
    Yields whether it waited (the cache may then hold the other run's finished shards). An
    exclusive flock on `<cache dir>.lock` beside the directory: released by the kernel when
    its holder dies, and honoured across NFS clients. Object storage (s3://, gs://) has no
    such lock, nor has a filesystem that refuses flock (some FUSE and Lustre mounts): there
    it yields False at once (said, for the latter) and the pass runs unguarded, as before."""
    fs, directory = storage_for(cache_uri)
    if not isinstance(fs, pafs.LocalFileSystem):
        yield False
        return
    path = Path(directory + ".lock")

    def wait_for(holder: str) -> None:
        say(f"{holder} is tokenizing these files into {cache_uri}; waiting for it to finish, "
            "then using its shards")
    with contextlib.ExitStack() as held:
        with writing_cache(cache_uri, f"its lock file {path}"):  # (not the pass's errors)
            state = held.enter_context(file_lock(path, on_busy=wait_for))
        if state.unsupported:
            say(f"warning: cannot lock {path} ({state.unsupported}): two runs tokenizing into "
                "this cache at once could clear each other's shards")
        yield state.waited


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
        write_atomically(fs, f"{directory}/{MANIFEST_FILE}",
                         (json.dumps(manifest, indent=1) + "\n").encode())
    return manifest


class ShardFiles:
    """The memory maps of one cache's shard files: mapped when a window first needs one, at
    most `max_open` at once, the least recently read unmapped first. Every map holds a file
    descriptor, and one per shard ran each worker out of them (EMFILE under the usual 1,024)
    on a corpus of ~500 small files (a train and a held-out shard each); a few large shards
    all stay mapped, and are read as before."""

    def __init__(self, directory: str, dtype: np.dtype, max_open: int = OPEN_MAPS_MAX) -> None:
        self.directory, self.dtype, self.max_open = directory, dtype, max_open
        self.maps: OrderedDict[str, np.memmap] = OrderedDict()

    def mapped(self, name: str) -> np.memmap:
        found = self.maps.get(name)
        if found is not None:
            self.maps.move_to_end(name)
            return found
        if len(self.maps) >= self.max_open:
            self.maps.popitem(last=False)  # unmapped (its descriptor closed) with it
        found = self.maps[name] = np.memmap(f"{self.directory}/{name}", dtype=self.dtype,
                                            mode="r")
        return found


class Shard:
    """One shard file as TokenStream reads it: its length from the manifest, its tokens from
    the map ShardFiles holds for it."""

    def __init__(self, files: ShardFiles, name: str, tokens: int) -> None:
        self.files, self.name, self.tokens = files, name, tokens
        self.filename = f"{files.directory}/{name}"

    def __len__(self) -> int:
        return self.tokens

    def __getitem__(self, index) -> np.ndarray:
        return self.files.mapped(self.name)[index]


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
    manifest = read_manifest(cache_uri)
    if manifest is None:
        raise DataError(f"no finished token shards at {cache_uri} (no {MANIFEST_FILE}); "
                        "run jobs/pretrain.py with --data to build them")
    fs, directory = storage_for(cache_uri)
    if not isinstance(fs, pafs.LocalFileSystem):
        local = Path(local_dir or LOCAL_SHARD_CACHE.expanduser() / manifest["key"])
        _copy_to_local(fs, directory, local, manifest)
        directory = str(local)
    dtype = np.dtype(manifest["dtype"])
    files = ShardFiles(directory, dtype)  # both splits: one bound on open files
    streams = []
    for split in SPLITS:
        arrays = []
        for shard in manifest["splits"][split]:
            path = f"{directory}/{shard['file']}"
            size = os.path.getsize(path) if os.path.exists(path) else -1
            if size != shard["tokens"] * dtype.itemsize:
                raise DataError(f"token shard {path} is missing or truncated ({size} bytes, "
                                f"expected {shard['tokens'] * dtype.itemsize}); pass "
                                "--retokenize to rebuild the cache")
            arrays.append(Shard(files, shard["file"], shard["tokens"]))
        streams.append(TokenStream(arrays))
    return streams[0], streams[1], manifest


def _copy_to_local(fs: pafs.FileSystem, directory: str, local: Path,
                   manifest: dict[str, Any]) -> None:
    local.mkdir(parents=True, exist_ok=True)
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for split in SPLITS:
        for shard in manifest["splits"][split]:
            target = local / shard["file"]
            if target.exists() and target.stat().st_size == shard["tokens"] * itemsize:
                continue  # copied by an earlier attempt on this node
            tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
            with fs.open_input_stream(f"{directory}/{shard['file']}") as src, \
                    open(tmp, "wb") as dst:
                while chunk := src.read(8 << 20):
                    dst.write(chunk)
            os.replace(tmp, target)
