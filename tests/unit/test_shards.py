"""Reading the token shards (orchestrator/training/shards.py) as a training worker does."""
import contextlib
import errno
import fcntl
import glob
import json
import os
import shutil

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch

from orchestrator.training import data_plan, shards
from orchestrator.training.corpus import DataError, Document, SourceFile, expand_sources
from orchestrator.training.data import get_batch
from orchestrator.training.data_plan import plan_data, tokenize_in_process, tokenize_once
from orchestrator.training.shards import open_shards, read_manifest
from tests.unit.test_corpus import _PausingTokenizer  # calls a hook before each batch


def write_cache(directory, train_parts, held_out_parts, key="k"):
    """A finished cache of these token arrays (uint16), one shard per array, as a pass
    writes it: one train and usually one held-out shard per source file."""
    directory.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, parts in (("train", train_parts), ("held_out", held_out_parts)):
        splits[split] = []
        for i, part in enumerate(parts):
            name = f"{i:05d}-{split}-0000.bin"
            part.astype(np.uint16).tofile(directory / name)
            splits[split].append({"file": name, "split": split, "tokens": len(part)})
    manifest = {"version": shards.MANIFEST_VERSION, "key": key, "dtype": "uint16",
                "vocab_size": 300, "splits": splits}
    (directory / shards.MANIFEST_FILE).write_text(json.dumps(manifest))
    return manifest


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def open_files_limit(monkeypatch, soft, hard):
    """The process's open-files limit as the shards see it; what they set it to is kept in
    the returned list, not applied."""
    limits = [soft, hard]
    monkeypatch.setattr(shards.resource, "getrlimit", lambda which: tuple(limits))
    monkeypatch.setattr(shards.resource, "setrlimit",
                        lambda which, new: limits.__setitem__(slice(None), new))
    return limits


def test_open_files_stay_under_a_low_limit_whatever_the_number_of_shards(tmp_path,
                                                                         monkeypatch):
    """500 small files make ~1,000 shards. Every memory map holds a file descriptor, so
    mapping them all ran each worker out of its 1,024 (EMFILE), after the whole pass: under
    a limit too low for them all, at most half of it is mapped at once."""
    open_files_limit(monkeypatch, 256, 256)
    tokens = np.random.default_rng(0).integers(0, 300, 60_000).astype(np.uint16)
    train_parts = np.array_split(tokens, 400)
    write_cache(tmp_path, train_parts, np.array_split(tokens[:8000], 200))
    before = open_fds()
    train, held_out, _ = open_shards(str(tmp_path))
    assert train.arrays[0].files.max_open == 128
    in_memory = torch.from_numpy(tokens.astype(np.int64))
    for step in range(200):  # windows all over the 400 shards, the same as in memory
        a = get_batch(train, 8, 64, seed=1, rank=0, step=step)
        b = get_batch(in_memory, 8, 64, seed=1, rank=0, step=step)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert np.array_equal(train.window(0, len(train)), tokens)
    assert np.array_equal(held_out.window(0, len(held_out)), tokens[:8000])
    grown = open_fds() - before
    assert grown <= 128 + 2, f"{grown} files open for 600 shards"
    open_files_limit(monkeypatch, 40, 40)  # (64 at least: the LRU's own)
    assert open_shards(str(tmp_path))[0].arrays[0].files.max_open == shards.OPEN_MAPS_MAX


def test_every_shard_stays_mapped_when_the_open_files_limit_allows(tmp_path, monkeypatch):
    """A reader mapping at most 64 shards reopened one for nearly every window of a corpus of
    more (a batch 10x slower: 3.33 vs 0.31 ms over 500 shards, worse on NFS). The soft limit
    is raised to the hard one and sizes the maps kept: here every shard, each opened once."""
    limits = open_files_limit(monkeypatch, 1024, 8192)
    tokens = np.random.default_rng(0).integers(0, 300, 60_000).astype(np.uint16)
    write_cache(tmp_path, np.array_split(tokens, 400), np.array_split(tokens[:8000], 200))
    opened = []
    real_open = shards.ShardFiles._open
    monkeypatch.setattr(shards.ShardFiles, "_open",
                        lambda self, name, mode="rb": opened.append(name) or real_open(
                            self, name, mode))
    train, held_out, _ = open_shards(str(tmp_path))
    for step in range(200):
        get_batch(train, 8, 64, seed=1, rank=0, step=step)
        get_batch(held_out, 8, 64, seed=1, rank=0, step=step)
    train.window(0, len(train)), held_out.window(0, len(held_out))
    assert limits == [8192, 8192]
    shard_reads = [name for name in opened if name.endswith(".bin")]
    assert len(shard_reads) == 600 and len(set(shard_reads)) == 600
    assert len(train.arrays[0].files.maps) == 600


def small_corpus(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        (data / f"{i}.txt").write_text("\n\n".join(
            f"file {i} paragraph {j}: a short line of text." for j in range(60)))
    return str(data)


def retokenize(data, cache, said, hook=lambda: None):
    redo = plan_data([data], cache_root=cache, retokenize=True)
    redo.tokenizer = _PausingTokenizer(redo.tokenizer, lambda call: call == 1 and hook())
    return tokenize_once(redo, lambda p: tokenize_in_process(p, shard_tokens=500,
                                                             say=lambda _: None), said.append)


def test_retokenize_takes_no_shards_from_a_run_reading_them(tmp_path, monkeypatch):
    """--retokenize cleared the cache directory first: a run training on those shards lost
    them mid-run (a worker that reopens one, or restarts and opens the cache, found none).
    The pass now writes a fresh directory and swaps it in; the old one is removed once no
    process reads it."""
    monkeypatch.setattr(shards, "OPEN_MAPS_MAX", 1)  # every other shard read reopens a file
    open_files_limit(monkeypatch, 2, 2)
    data, cache = small_corpus(tmp_path), str(tmp_path / "cache")
    plan = plan_data([data], cache_root=cache)
    built = tokenize_in_process(plan, shard_tokens=500, say=lambda _: None)
    assert len(built["splits"]["train"]) > 3
    run = dict(zip(("train", "held_out"), open_shards(plan.cache_uri)))  # training on them
    expected = run["train"].window(0, len(run["train"]))
    mid_pass = {}

    def read_mid_pass():
        mid_pass["running run"] = run["train"].window(0, len(expected))
        mid_pass["restarted worker"] = open_shards(plan.cache_uri)[0].window(0, len(expected))

    said = []
    manifest = retokenize(data, cache, said, read_mid_pass)
    assert np.array_equal(mid_pass["running run"], expected)
    assert np.array_equal(mid_pass["restarted worker"], expected)
    assert np.array_equal(run["train"].window(0, len(expected)), expected)  # after the swap
    assert manifest["splits"] == built["splits"] and read_manifest(plan.cache_uri) == manifest
    kept = sorted(glob.glob(plan.cache_uri + ".*"))
    assert [os.path.basename(k).split("-")[0] for k in kept] == [
        os.path.basename(plan.cache_uri) + suffix for suffix in (".lock", ".replaced")], kept
    assert any("may still be read by a run" in line for line in said), said
    run.clear()  # the run ended
    retokenize(data, cache, said)  # no reader left: the next pass removes it
    assert glob.glob(plan.cache_uri + ".*") == [plan.cache_uri + ".lock"]
    assert np.array_equal(open_shards(plan.cache_uri)[0].window(0, len(expected)), expected)


def test_a_reader_opening_shards_as_they_are_removed_is_given_none_of_them(tmp_path,
                                                                           monkeypatch):
    """A reader that opened the cache directory just before a --retokenize swapped it out
    takes its readers lock while the replaced directory is removed: rmtree unlinked
    readers.lock before manifest.json, so the reader found no lock to wait on, then a
    manifest, then shards that vanished under it (a raw FileNotFoundError mid-run)."""
    data, cache = small_corpus(tmp_path), str(tmp_path / "cache")
    plan = plan_data([data], cache_root=cache)
    tokenize_in_process(plan, shard_tokens=500, say=lambda _: None)
    opened_before_the_swap = os.open(plan.cache_uri, os.O_RDONLY | os.O_DIRECTORY)
    real_rmtree, seen = shutil.rmtree, []

    def rmtree_reaching_the_lock_first(path, ignore_errors=False):
        lock = os.path.join(path, shards.READERS_FILE)
        if os.path.exists(lock):
            os.unlink(lock)
            try:  # the reader takes its lock now: there is none to wait on
                seen.append(open_shards(f"/proc/self/fd/{opened_before_the_swap}"))
            except DataError as e:
                seen.append(e)
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(shards.shutil, "rmtree", rmtree_reaching_the_lock_first)
    try:
        retokenize(data, cache, [])
    finally:
        os.close(opened_before_the_swap)
    assert len(seen) == 1 and isinstance(seen[0], DataError), seen  # it opens the cache again
    assert "no finished token shards" in str(seen[0])


def test_a_shard_that_cannot_be_read_is_named_with_its_directory(tmp_path, monkeypatch):
    """A shard removed (or gone stale on NFS) under a reader was a raw FileNotFoundError or
    OSError from a training worker, naming no cache."""
    write_cache(tmp_path, [np.arange(100)] * 3, [np.arange(50)])
    train, _, _ = open_shards(str(tmp_path))
    stale = OSError(errno.ESTALE, os.strerror(errno.ESTALE), shards.MANIFEST_FILE)
    real_read = shards.ShardFiles.read_manifest
    calls = []

    def stale_once(self, cache_uri):  # the directory swapped out as it was opened: again
        calls.append(cache_uri)
        if len(calls) == 1:
            raise stale
        return real_read(self, cache_uri)

    monkeypatch.setattr(shards.ShardFiles, "read_manifest", stale_once)
    assert len(open_shards(str(tmp_path))[1]) == 50 and len(calls) == 2
    monkeypatch.setattr(shards.ShardFiles, "read_manifest", lambda self, cache_uri: (
        _ for _ in ()).throw(PermissionError(errno.EACCES, "Permission denied", "manifest.json")))
    with pytest.raises(DataError, match=f"token shards at {tmp_path}: cannot read: .*Permission "
                                        "denied: 'manifest.json'"):
        open_shards(str(tmp_path))
    os.remove(tmp_path / "00001-train-0000.bin")
    with pytest.raises(DataError, match=f"token shard {tmp_path}/00001-train-0000.bin: cannot "
                                        "read: No such file"):
        train.window(0, 300)


def test_a_retokenize_killed_between_its_renames_is_finished_by_the_next_pass(tmp_path,
                                                                              monkeypatch):
    """Killed between swap_in's two renames, a --retokenize left no cache directory, its
    finished shards beside it and the replaced ones aside, for good: the next run tokenized
    everything again. The next pass now puts the finished shards in place and removes the
    rest (unread)."""
    data, cache = small_corpus(tmp_path), str(tmp_path / "cache")
    plan = plan_data([data], cache_root=cache)
    built = tokenize_in_process(plan, shard_tokens=500, say=lambda _: None)

    def killed_between_the_renames(fresh, cache_uri, say):
        os.rename(cache_uri, cache_uri + shards.REPLACED + "0")
        raise KeyboardInterrupt

    monkeypatch.setattr(data_plan, "swap_in", killed_between_the_renames)
    with pytest.raises(KeyboardInterrupt):
        retokenize(data, cache, [])
    monkeypatch.undo()
    assert not os.path.exists(plan.cache_uri)
    later = plan_data([data], cache_root=cache)
    passes, said = [], []
    assert tokenize_once(later, passes.append, said.append) == built and passes == []
    assert read_manifest(plan.cache_uri) == built
    assert glob.glob(plan.cache_uri + ".*") == [plan.cache_uri + ".lock"]
    assert any("take the cache's place" in line for line in said), said


def test_every_pass_removes_the_directories_of_killed_retokenize_passes(tmp_path,
                                                                        monkeypatch):
    """A killed --retokenize left <cache dir>.retokenize-<id> (as large as the cache) until
    another --retokenize: any pass into the cache now removes it, under the pass lock (no
    other pass writes one meanwhile); not where the lock cannot be held."""
    data, cache = small_corpus(tmp_path), str(tmp_path / "cache")
    plan = plan_data([data], cache_root=cache)
    killed = plan.cache_uri + shards.RETOKENIZING + "dead"
    os.makedirs(plan.cache_uri)  # an interrupted pass too: no manifest
    os.makedirs(killed)
    with open(os.path.join(killed, "00000-train-0000.bin"), "wb") as f:
        f.write(b"\0" * 1000)
    real_flock = fcntl.flock

    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with shards.pass_lock(plan.cache_uri, lambda _: None):
        pass
    assert os.path.isdir(killed)  # (another pass may be writing it)
    monkeypatch.setattr(fcntl, "flock", real_flock)
    tokenize_once(plan, lambda p: tokenize_in_process(p, shard_tokens=500,
                                                      say=lambda _: None), lambda _: None)
    assert not os.path.exists(killed) and read_manifest(plan.cache_uri) is not None


def test_retokenize_rebuilds_a_cache_whose_manifest_does_not_parse(tmp_path, monkeypatch):
    """The error of a manifest that does not parse says to pass --retokenize, and
    --retokenize raised that same error: the manifest was read first, also to be replaced."""
    data, cache = small_corpus(tmp_path), str(tmp_path / "cache")
    plan = plan_data([data], cache_root=cache)
    built = tokenize_in_process(plan, shard_tokens=500, say=lambda _: None)
    manifest = os.path.join(plan.cache_uri, shards.MANIFEST_FILE)
    with open(manifest, "w") as f:
        f.write('{"version": ')  # cut short
    with pytest.raises(DataError, match="manifest.json is unreadable: .*pass --retokenize"):
        plan_data([data], cache_root=cache)
    assert retokenize(data, cache, [])["splits"] == built["splits"]
    assert read_manifest(plan.cache_uri)["splits"] == built["splits"]
    # The same when the --retokenize run waited for another pass, which left it unreadable.
    with open(manifest, "w") as f:
        f.write('{"version": ')

    @contextlib.contextmanager
    def waited_for_another_pass(cache_uri, say):
        yield True

    monkeypatch.setattr(data_plan, "pass_lock", waited_for_another_pass)
    assert retokenize(data, cache, [])["splits"] == built["splits"]
    assert read_manifest(plan.cache_uri)["splits"] == built["splits"]


def test_retokenize_of_shards_on_object_storage_is_refused(tmp_path, monkeypatch):
    """Object storage has no rename of a directory nor a lock to tell who reads it: the
    shards a run may be reading cannot be replaced safely there."""
    data, cache = small_corpus(tmp_path), str(tmp_path / "cache")
    plan = plan_data([data], cache_root=cache)
    tokenize_in_process(plan, say=lambda _: None)
    remote = pafs.SubTreeFileSystem("/", pafs.LocalFileSystem())
    monkeypatch.setattr(shards, "storage_for", lambda uri: (remote, plan.cache_uri))
    with pytest.raises(DataError, match="--retokenize: the token shards at s3://bucket/cache/"
                                        ".* are on object storage"):
        plan_data([data], cache_root="s3://bucket/cache", retokenize=True)


def test_a_document_the_tokenizer_cannot_encode_is_named_with_file_and_line(tmp_path):
    """A WordLevel tokenizer without an unknown token raises a bare Exception on a word
    outside its vocabulary: it failed to load at all ("a" is outside it too), and a pass
    hitting such a word ended in a traceback naming neither file nor line."""
    from tokenizers import Tokenizer as RawTokenizer, models, pre_tokenizers

    raw = RawTokenizer(models.WordLevel({"hello": 0, "world": 1, "</s>": 2}))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.save(str(tmp_path / "tokenizer.json"))
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "hello world"}\n{"text": "hello there"}\n')
    plan = plan_data([str(corpus)], tokenizer=str(tmp_path / "tokenizer.json"),
                     cache_root=str(tmp_path / "cache"), say=lambda _: None)
    with pytest.raises(DataError, match=rf"^{corpus}:2: the tokenizer \(.*tokenizer.json\) "
                       r"cannot encode this document: .*Missing \[UNK\]"):
        tokenize_in_process(plan, say=lambda _: None)
    assert read_manifest(plan.cache_uri) is None  # nothing finished is left


def test_a_txt_document_the_tokenizer_cannot_encode_is_named_by_its_line(tmp_path):
    """A .txt document was named "(paragraph N)", N counting the pieces a long paragraph is
    cut into (a paragraph on line 3 after a long one read "(paragraph 7)"): now by the line it
    starts on, as a .jsonl line is."""
    from tokenizers import Tokenizer as RawTokenizer, models, pre_tokenizers

    from orchestrator.training.corpus import MAX_DOCUMENT_CHARS

    raw = RawTokenizer(models.WordLevel({"hello": 0, "world": 1, "</s>": 2}))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.save(str(tmp_path / "tokenizer.json"))
    corpus = tmp_path / "c.txt"
    long_lines = MAX_DOCUMENT_CHARS // 12 * 3  # a paragraph cut into about 3 pieces
    corpus.write_text("hello world\n" * long_lines + "\r\n" + "hello\nhello there\n\n")
    plan = plan_data([str(corpus)], tokenizer=str(tmp_path / "tokenizer.json"),
                     cache_root=str(tmp_path / "cache"), say=lambda _: None)
    with pytest.raises(DataError, match=rf"^{corpus}:{long_lines + 2}: the tokenizer "
                       r"\(.*tokenizer.json\) cannot encode this document"):
        tokenize_in_process(plan, say=lambda _: None)


class _FullDisk:
    """A local filesystem whose writes stop part way with ENOSPC (a full disk)."""

    def __init__(self):
        self.fs = pafs.LocalFileSystem()

    def open_output_stream(self, path):
        stream = self.fs.open_output_stream(path)

        class Stream:
            def __enter__(self):
                return self

            def write(self, data):
                stream.write(data[:10])
                raise OSError(errno.ENOSPC, "No space left on device")

            def __exit__(self, *exc):
                stream.close()
        return Stream()

    def __getattr__(self, name):
        return getattr(self.fs, name)


def test_a_failed_atomic_write_leaves_no_temporary_file(tmp_path):
    """A write into the data cache that failed (a full disk) left its half-written
    `NAME.tmp-<id>` behind: a trained tokenizer's or the bundled corpus's copy in the cache
    root, which no later pass clears. The error is raised as before, and the file already
    there is kept."""
    target = tmp_path / "tokenizers" / "bpe.json"
    target.parent.mkdir()
    target.write_bytes(b"old")
    with pytest.raises(OSError, match="No space left"):
        shards.write_atomically(_FullDisk(), str(target), b"x" * 1000)
    assert os.listdir(target.parent) == ["bpe.json"] and target.read_bytes() == b"old"


def test_a_finished_pass_leaves_no_half_written_shard_of_a_killed_worker(tmp_path):
    """A tokenizer worker killed while writing a shard (SIGKILL, the OOM killer) leaves its
    `NAME.tmp-<id>`; Ray Data restarts it and the file is tokenized again, and the pass
    finished with the half-written file in the cache for good (4 MiB of an 8 MiB shard, seen
    with a worker killed under Ray). The manifest is written once every file is done: no
    temporary file of the pass is live then, and none is left."""
    data, cache = small_corpus(tmp_path), str(tmp_path / "cache")
    plan = plan_data([data], cache_root=cache)
    killed = os.path.join(plan.cache_uri, "00000-train-0000.bin.tmp-" + "d" * 32)

    def killed_worker(call):
        if call == 1:
            with open(killed, "wb") as f:
                f.write(b"\0" * 1000)
    plan.tokenizer = _PausingTokenizer(plan.tokenizer, killed_worker)
    manifest = tokenize_once(plan, lambda p: tokenize_in_process(p, shard_tokens=500,
                                                                 say=lambda _: None),
                             lambda _: None)
    assert manifest["train_tokens"] > 0 and not os.path.exists(killed)
    assert not [n for n in os.listdir(plan.cache_uri) if ".tmp-" in n]
    open_shards(plan.cache_uri)  # (the finished cache reads as before)


def test_a_long_document_reaches_the_tokenizer_in_bounded_pieces(tmp_path, monkeypatch):
    """A .jsonl line (up to 256 MiB) was handed to the tokenizer whole: `tokenizers` holds
    ~500 bytes a token until the call returns, so a 20 MB line took 3 GB of memory. Each call
    now gets pieces of at most ENCODE_PIECE_CHARS characters, ENCODE_BATCH_CHARS in all, cut
    before a space, and a byte-level BPE gives the same ids as on the whole text."""
    from orchestrator.tokenizer import train_bpe

    monkeypatch.setattr(shards, "ENCODE_PIECE_CHARS", 500)
    monkeypatch.setattr(shards, "ENCODE_BATCH_CHARS", 2000)
    words = ["naïve", "café", "tokens", "日本語", "x" * 300, "a,b", "  two", "\nline"]
    long = " ".join(words[i * 7 % len(words)] for i in range(3000))
    texts = ["short one", long, "", long[:1700]]
    tok = train_bpe(texts * 3, 400)
    calls = []
    real = tok.encode_arrays
    monkeypatch.setattr(tok, "encode_arrays", lambda batch: calls.append(batch) or real(batch))
    source = SourceFile(str(tmp_path / "c.jsonl"), "jsonl", 1, 0)
    ids = shards.encode_documents(tok, source, [Document(t, i, True) for i, t in
                                                enumerate(texts)])
    assert all(len(t) <= 500 for batch in calls for t in batch)
    assert all(sum(map(len, batch)) <= 2000 or len(batch) == 1 for batch in calls)
    assert "".join(t for batch in calls for t in batch) == "".join(texts)
    assert [i.tolist() for i in ids] == [real([t])[0].tolist() for t in texts]
    assert all(i.dtype == np.uint16 for i in ids)
    calls.clear()  # text with no space to cut before (a minified dump): cut at the limit
    assert len(shards.encode_documents(tok, source, [Document("y" * 1200, 0, True)])[0])
    assert [len(t) for batch in calls for t in batch] == [500, 500, 200]


def test_a_long_document_trains_the_bpe_in_bounded_pieces(tmp_path, monkeypatch):
    """--train-tokenizer handed a long .jsonl line to `tokenizers`' trainer whole (a 20 MB
    line: 1.9 GB peak RSS); it gets the pass's pieces, and the same vocabulary."""
    from orchestrator.tokenizer import train_bpe

    monkeypatch.setattr(shards, "ENCODE_PIECE_CHARS", 500)
    long = " ".join(["naïve café", "日本語 tokens", "a,b", "  two", "\nline"][i % 5]
                    for i in range(2000))
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": long}) + "\n")
    seen = []

    def recording(texts, vocab_size):
        texts = list(texts)
        seen.extend(texts)
        return train_bpe(texts, vocab_size)

    monkeypatch.setattr(data_plan, "train_bpe", recording)
    tok = data_plan.trained_tokenizer(expand_sources([str(corpus)]), "text", False, 300,
                                      str(tmp_path / "cache"), say=lambda _: None)
    assert seen and max(map(len, seen)) <= 500 and "".join(seen) == long
    assert tok.to_json() == train_bpe([long], 300).to_json()
