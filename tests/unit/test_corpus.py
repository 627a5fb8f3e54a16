"""The user's corpus (orchestrator/training/corpus.py), the token-shard cache
(orchestrator/training/shards.py) and the data plan (data_plan.py), without Ray: the Ray Data
pass runs the same per-file function (tests/integration/test_data_ingest.py)."""
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from orchestrator.tokenizer import ByteTokenizer, TokenizerError
from orchestrator.training import corpus as corpus_module
from orchestrator.training import shards
from orchestrator.training.corpus import (MAX_DOCUMENT_CHARS, DataError, check_jsonl_head,
                                          check_text_head, expand_sources, is_held_out,
                                          iter_documents, split_uri_query, with_scheme)
from orchestrator.training.data import get_batch
from orchestrator.training.data_plan import check_trainable, plan_data, tokenize_in_process
from orchestrator.training.shards import TokenStream, open_shards, read_manifest, token_dtype


def paragraphs(n, tag):
    return "\n\n".join(f"{tag} paragraph {i}: naïve text, café {i * 7}." for i in range(n))


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (root / "book.txt").write_text(paragraphs(60, "book"))
    with open(root / "sub" / "docs.jsonl", "w") as f:
        for i in range(80):
            f.write(json.dumps({"text": f"json document {i} ünïcode", "id": i}) + "\n")
    # Terminated, so no row is a substring of another ("row 1" of "row 10"): the held-out
    # test checks membership by substring.
    pq.write_table(pa.table({"text": [f"parquet row {i}." for i in range(40)]}),
                   root / "rows.parquet")
    (root / "notes.md").write_text("not a corpus format")
    return root


def test_a_directory_a_glob_and_a_file_uri_name_the_same_files(corpus):
    in_dir = expand_sources([str(corpus)])
    assert [os.path.basename(s.uri) for s in in_dir] == ["book.txt", "rows.parquet",
                                                         "docs.jsonl"]
    assert [s.format for s in in_dir] == ["txt", "parquet", "jsonl"]
    globbed = expand_sources([f"{corpus}/**.jsonl", f"file://{corpus}/book.txt"])
    assert [s.uri for s in globbed] == sorted([f"file://{corpus}/book.txt",
                                               f"{corpus}/sub/docs.jsonl"])


def test_a_uri_glob_reads_question_marks_and_sets_as_a_glob(tmp_path):
    """pyarrow read a URI's `?` as a query: `file://DIR/?.jsonl` became DIR itself (every
    file in it and below, silently), and it refused `[a-b]`."""
    for name in ("a", "b", "zz"):
        (tmp_path / f"{name}.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.jsonl").write_text('{"text": "x"}\n')

    def names(spec):
        return [os.path.basename(s.uri) for s in expand_sources([spec])]
    assert names(f"file://{tmp_path}/?.jsonl") == ["a.jsonl", "b.jsonl"]
    assert names(f"file://{tmp_path}/[a-b].jsonl") == ["a.jsonl", "b.jsonl"]
    assert names(f"file://{tmp_path}/[!a].jsonl") == ["b.jsonl"]
    assert names(f"file://{tmp_path}/*/*.jsonl") == ["c.jsonl"]
    fs, path = corpus_module.filesystem_for("s3://bucket/dir/part-[0-4]?.jsonl?region=x-1")
    assert (path, fs.region) == ("bucket/dir/part-[0-4]?.jsonl", "x-1")  # its query kept


def test_a_uri_query_configuring_the_filesystem_stays_with_every_file_and_cache_dir():
    """`s3://b/d?endpoint_override=host:9000` (MinIO): the files listed under it were named
    without the query, and read from AWS; and the shard cache's key was appended to the
    query's value (`...?endpoint_override=host:9000/KEY`)."""
    from orchestrator.training.data_plan import cache_dir

    query = "?endpoint_override=localhost:9000&region=x-1"
    info = pafs.FileInfo("b/d/a.jsonl", pafs.FileType.File, size=3)
    assert corpus_module._source(f"s3://b/d{query}", info).uri == f"s3://b/d/a.jsonl{query}"
    assert corpus_module._source(f"s3://b/d/*.jsonl{query}", info).uri == \
        f"s3://b/d/a.jsonl{query}"
    cache = cache_dir(f"s3://b/cache{query}", "f" * 64)
    assert cache == f"s3://b/cache/{'f' * 24}{query}"
    fs, path = shards.storage_for(cache)
    assert (path, fs.region) == (f"b/cache/{'f' * 24}", "x-1")


@pytest.mark.parametrize("make, expected", [
    (lambda d: d / "missing", "no such file or directory"),
    (lambda d: (d / "empty.txt").write_text("") and None or d / "empty.txt", "is empty"),
    (lambda d: (d / "x.csv").write_text("a,b") and None or d / "x.csv", "unknown file type"),
    (lambda d: (d / "bad.parquet").write_bytes(b"PAR1 not really") and None
     or d / "bad.parquet", "not a readable parquet file"),
])
def test_unusable_paths_are_refused_naming_them(tmp_path, make, expected):
    path = make(tmp_path)
    with pytest.raises(DataError, match=expected) as error:
        expand_sources([str(path)])
    assert str(path) in str(error.value)


def _fifo(path):
    os.mkfifo(path)
    return path


def _socket(path):
    import socket
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()
    return path


@pytest.mark.parametrize("make, kind", [
    (lambda d: _fifo(d / "x.txt"), "a FIFO"),
    (lambda d: _socket(d / "s.jsonl"), "a socket"),
    (lambda d: "/dev/null", "a character device"),
])
def test_a_fifo_socket_or_device_is_refused_as_not_a_regular_file(tmp_path, make, kind):
    # A FIFO named x.txt was refused as 'file ... is empty' (/dev/null as of an unknown
    # type); nothing may open a FIFO (the open blocks until a writer comes).
    path = make(tmp_path)
    with pytest.raises(DataError) as error:
        expand_sources([str(path)])
    assert str(error.value) == f"--data {path}: {path} is not a regular file ({kind})"


class _FolderLockedFS:
    """The local filesystem, but one folder cannot be listed (as a mount's lost+found for
    anyone but root; the tests run as root, whom permissions do not stop)."""

    def __init__(self, locked):
        self.local, self.locked = pafs.LocalFileSystem(), str(locked)

    def get_file_info(self, what):
        if isinstance(what, pafs.FileSelector) and (
                what.base_dir == self.locked
                or what.recursive and self.locked.startswith(what.base_dir.rstrip("/") + "/")):
            raise PermissionError(13, f"Cannot list directory '{self.locked}'")
        return self.local.get_file_info(what)

    def __getattr__(self, name):
        return getattr(self.local, name)


def test_a_glob_lists_only_as_deep_as_it_reaches_and_a_folder_not_listable_is_named(
        tmp_path, monkeypatch):
    """`DIR/*.jsonl` listed DIR and everything below it: a folder the pattern never reaches
    that cannot be listed (lost+found on a mount) failed it with pyarrow's raw OSError."""
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n')
    (tmp_path / "lost+found").mkdir()
    fs = _FolderLockedFS(tmp_path / "lost+found")
    monkeypatch.setattr(corpus_module, "filesystem_for",
                        lambda uri: (fs, os.path.abspath(uri)))
    assert [s.uri for s in expand_sources([f"{tmp_path}/*.jsonl"])] == [
        str(tmp_path / "a.jsonl")]
    for spec in (str(tmp_path), f"{tmp_path}/**.jsonl", f"{tmp_path}/*/*.jsonl"):
        with pytest.raises(DataError, match=rf"^--data {re.escape(spec)}: cannot list the "
                           rf"files under {tmp_path}.*lost\+found"):
            expand_sources([spec])


def test_a_jsonl_line_without_the_text_field_is_named_or_skipped_and_counted(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "one"}\n{"body": "two"}\nnot json\n{"text": "four"}\n')
    source, = expand_sources([str(path)])
    with pytest.raises(DataError, match=f"{path}:2: no 'text' field .*--skip-bad-lines"):
        list(iter_documents(source))
    skipped = []
    docs = list(iter_documents(source, skip_bad_lines=True, skipped=skipped))
    assert [d.text for d in docs] == ["one", "four"]
    assert [s.split(": ", 1)[0] for s in skipped] == [f"{path}:2", f"{path}:3"]


def test_a_jsonl_value_of_the_wrong_type_is_named_by_its_json_type(tmp_path):
    """`{"text": null}` said "field 'text' is NoneType", a number "is int": Python's names,
    not the file's."""
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": null}\n{"text": 3}\n{"text": true}\n{"text": {"en": "x"}}\n'
                    'null\n2.5\n"text"\n')
    source, = expand_sources([str(path)])
    skipped = []
    assert not list(iter_documents(source, skip_bad_lines=True, skipped=skipped))
    assert [s.split(": ", 1)[1] for s in skipped] == [
        "field 'text' is null, not a string", "field 'text' is number, not a string",
        "field 'text' is boolean, not a string", "field 'text' is object, not a string",
        "a JSON null, not an object", "a JSON number, not an object",
        "a JSON string, not an object"]


def test_a_jsonl_line_json_cannot_parse_is_named_with_why_and_where(tmp_path):
    """A number of over 4300 digits (Python's int-string limit) was an AttributeError
    traceback and a line nested deeper than the recursion limit a RecursionError, neither
    skippable; a cut string said "(Unterminated string starting at)", no column."""
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "one"}\n{"text": "x", "n": ' + "9" * 5000 + '}\n'
                    + '{"a": ' * 5000 + "1" + "}" * 5000 + '\n{"text": "two"}\n{"text": "cut')
    source, = expand_sources([str(path)])
    skipped = []
    docs = list(iter_documents(source, skip_bad_lines=True, skipped=skipped))
    assert [d.text for d in docs] == ["one", "two"]
    assert skipped == [
        f"{path}:2: not valid JSON (Exceeds the limit (4300 digits) for integer string "
        "conversion: value has 5000 digits)",
        f"{path}:3: not valid JSON (nested too deeply)",
        f"{path}:5: not valid JSON (Unterminated string starting at column 10)"]
    lines = path.read_text().split("\n")
    for bad_line in (2, 3):  # refused in the driver's head check, one line naming it
        path.write_text('{"text": "one"}\n' * (bad_line - 1) + lines[bad_line - 1] + "\n")
        head, = expand_sources([str(path)])
        with pytest.raises(DataError, match=f"{path}:{bad_line}: not valid JSON"):
            check_jsonl_head(head, "text", False)


def test_a_jsonl_head_whose_first_line_is_over_64_kib_is_still_checked(tmp_path):
    """Only lines complete within the first 64 KiB were checked: books of 100 KB a line
    under a wrong --text-field passed, and every line was skipped after Ray started."""
    path = tmp_path / "books.jsonl"
    with open(path, "w") as f:
        for i in range(5):
            f.write(json.dumps({"content": f"book {i} " + "word " * 20_000}) + "\n")
    source, = expand_sources([str(path)])
    with pytest.raises(DataError, match=f"{path}:1: no 'text' field .*'content'"):
        check_jsonl_head(source, "text", False)
    with pytest.raises(DataError, match="none of its first 1 lines has the field"):
        check_jsonl_head(source, "text", True)
    check_jsonl_head(source, "content", False)


def test_the_jsonl_head_check_stops_at_the_end_of_the_line_the_64_kib_mark_cuts(tmp_path):
    # Reading on for the cut line took the whole next 64 KiB: lines far past the mark were
    # refused by the driver, which leaves them to the pass (and its --skip-bad-lines).
    good = '{"text": "a fine document of about sixty bytes, no more"}\n'
    lines = 2 * 64 * 1024 // len(good)
    path = tmp_path / "a.jsonl"
    path.write_text(good * lines + '{"txt": "typo"}\n')
    source, = expand_sources([str(path)])
    check_jsonl_head(source, "text", False)  # the typo is 64 KiB past the mark
    path.write_text(good * (64 * 1024 // len(good)) + '{"txt": "typo"}\n' + good * 10)
    source, = expand_sources([str(path)])
    with pytest.raises(DataError, match=f"{path}:{64 * 1024 // len(good) + 1}: no 'text'"):
        check_jsonl_head(source, "text", False)  # the line the mark cuts


def test_a_json_array_saved_as_jsonl_is_refused_by_its_head(tmp_path, monkeypatch):
    """A .json array (one line) passed the head check unread, and the pass then read the
    whole file as one line into memory."""
    path = tmp_path / "array.jsonl"
    path.write_text(json.dumps([{"text": f"document {i} " * 5} for i in range(3000)]))
    source, = expand_sources([str(path)])
    assert source.size > 64 * 1024
    with pytest.raises(DataError, match=f"{path}:1: a JSON list, not an object"):
        check_jsonl_head(source, "text", False)
    # a line past what the head check reads: named by how it starts
    monkeypatch.setattr(corpus_module, "JSONL_HEAD_MAX_BYTES", 128 * 1024)
    with pytest.raises(DataError, match=f"{path}:1: not a JSON object: a line of over "
                                        "0.125 MiB that starts with '\\['"):
        check_jsonl_head(source, "text", False)


def test_a_jsonl_line_over_the_line_cap_is_named_not_read_into_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_module, "JSONL_LINE_MAX_BYTES", 1 << 14)
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": "x" * 50_000})
                    + "\n" + json.dumps({"text": "after"}) + "\n")
    source, = expand_sources([str(path)])
    for skip in (False, True):
        read = []
        with pytest.raises(DataError, match=f"{path}:2: a line of over 0.015625 MiB: not "
                                            "JSON Lines"):
            for doc in iter_documents(source, skip_bad_lines=skip, skipped=[]):
                read.append(doc.text)
        assert read == ["fine"]


def test_a_corpus_emptied_by_skipped_lines_says_so_not_seq_len(tmp_path):
    path = tmp_path / "books.jsonl"
    with open(path, "w") as f:
        for i in range(20):
            f.write(json.dumps({"content": f"book {i} " + "word " * 100}) + "\n")
    source, = expand_sources([str(path)])
    result = shards.tokenize_source(source, 0, ByteTokenizer(), str(tmp_path),
                                    skip_bad_lines=True)
    manifest = shards.write_manifest(str(tmp_path), "k", ByteTokenizer(), [result], [source],
                                     "text")
    with pytest.raises(DataError) as error:
        check_trainable(manifest, 256, "here")
    message = str(error.value)
    assert "--skip-bad-lines skipped all 20 lines" in message and "--seq-len" not in message
    assert f"{path}:1: no 'text' field" in message and "--text-field" in message


def test_a_file_that_cannot_be_read_in_the_pass_is_named(tmp_path):
    """An OSError in the pass (a file removed since planning, an S3 or EIO read error) came
    out of it as a raw traceback (a Ray one on the cluster), naming no file."""
    writers = {"a.txt": lambda path: path.write_text(paragraphs(5, "p")),
               "b.jsonl": lambda path: path.write_text('{"text": "x"}\n'),
               "c.parquet": lambda path: pq.write_table(pa.table({"text": ["x"] * 10}), path)}
    for name, write in writers.items():  # (parquet's was "not a readable parquet file")
        write(tmp_path / name)
        source, = expand_sources([str(tmp_path / name)])
        os.remove(tmp_path / name)
        with pytest.raises(DataError, match=f"{tmp_path / name}: cannot read: .*No such file"):
            shards.tokenize_source(source, 0, ByteTokenizer(), str(tmp_path / "cache"))


def test_a_parquet_read_error_mid_file_is_named_as_such_not_as_corrupt_data(tmp_path,
                                                                           monkeypatch):
    """EIO (or a file gone stale) while reading a parquet file's rows was "corrupt parquet
    data after row N"; data that does not decode still is."""
    import errno

    pq.write_table(pa.table({"text": [f"row {i}" for i in range(3000)]}), tmp_path / "a.parquet")
    source, = expand_sources([str(tmp_path / "a.parquet")])
    real_batches = pq.ParquetFile.iter_batches

    def failing_after_one_batch(error):
        def iter_batches(self, *args, **kwargs):
            yield next(real_batches(self, *args, **kwargs))
            raise error
        return iter_batches

    for error, expected in ((OSError(errno.EIO, "Input/output error"),
                             "cannot read: \\[Errno 5\\] Input/output error"),
                            (pa.ArrowInvalid("bad page"),
                             "corrupt parquet data after row 1024: bad page"),
                            (OSError("Corrupt snappy compressed data"),  # (pyarrow's, no errno)
                             "corrupt parquet data after row 1024, or a storage read error: "
                             "Corrupt snappy")):
        monkeypatch.setattr(pq.ParquetFile, "iter_batches", failing_after_one_batch(error))
        with pytest.raises(DataError, match=f"{tmp_path / 'a.parquet'}: {expected}"):
            list(iter_documents(source))


def test_a_data_cache_that_cannot_be_written_in_the_pass_is_named(tmp_path, monkeypatch):
    """Disk full while writing a shard or the manifest: named as the data cache, not the
    file being read (nor a raw OSError)."""
    import errno

    (tmp_path / "a.txt").write_text(paragraphs(40, "p"))
    plan = plan_data([str(tmp_path / "a.txt")], cache_root=str(tmp_path / "cache"))

    def disk_full(fs, path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shards, "write_atomically", disk_full)
    with pytest.raises(DataError, match=f"the data cache {plan.cache_uri} \\(--data-cache\\): "
                                        "cannot write 00000-train-0000.bin: .*No space left"):
        tokenize_in_process(plan, say=lambda _: None)

    def read_only(path, on_busy=None):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(shards, "file_lock", read_only)
    with pytest.raises(DataError, match=f"the data cache {plan.cache_uri} .*: cannot write "
                                        "its lock file .*Read-only"):
        with shards.pass_lock(plan.cache_uri):
            pass


def test_the_ray_data_pass_returns_an_unreadable_file_as_an_error_naming_it(tmp_path):
    """The Ray Data task's callable (run here without Ray) returns the error to the driver,
    which raises it with its message intact, rather than raising it into Ray's retries."""
    from ray_layer.data_ingest import TokenizeFiles

    (tmp_path / "a.txt").write_text(paragraphs(5, "p"))
    source, = expand_sources([str(tmp_path / "a.txt")])
    os.remove(tmp_path / "a.txt")
    task = TokenizeFiles(ByteTokenizer().to_json(), str(tmp_path / "cache"), "text", False,
                         shards.SHARD_TOKENS)
    result, = task({"index": [3], "source": [source.to_dict()]})["result"]
    assert result["index"] == 3 and f"{tmp_path / 'a.txt'}: cannot read" in result["error"]


def test_a_parquet_file_without_the_text_column_is_refused_before_reading(tmp_path):
    pq.write_table(pa.table({"body": ["x" * 50]}), tmp_path / "a.parquet")
    with pytest.raises(DataError, match="no column 'text' \\(--text-field\\); columns: body"):
        plan_data([str(tmp_path)], cache_root=str(tmp_path / "cache"))


BINARY_HINT = "write the text as a string (UTF-8) column"


@pytest.mark.parametrize("values, kind, hint", [
    (pa.array([b"hello world"] * 3, pa.binary()), "binary", BINARY_HINT),
    (pa.array([b"hello world"] * 3, pa.large_binary()), "large_binary", BINARY_HINT),
    (pa.array([b"hello world"] * 3, pa.binary_view()), "binary_view", BINARY_HINT),
    (pa.array([b"hello world"] * 3, pa.binary(11)), "fixed_size_binary[11]", BINARY_HINT),
    (pa.array([b"hello", b"world", b"hello"]).dictionary_encode(),
     "dictionary<values=binary, indices=int32, ordered=0>", BINARY_HINT),
    (pa.array([["a", "b"]] * 3), "list<element: string>", "write one string per row"),
    (pa.array([1, 2, 3]), "int64", "give the column that holds the text"),
])
def test_a_parquet_text_column_that_is_not_strings_is_refused_before_ray(tmp_path, values,
                                                                        kind, hint):
    """A binary or list column passed the driver's check, then every row failed after Ray
    started, suggesting --skip-bad-lines, which skipped every row. Every kind of bytes gets
    the hint to write strings (a dictionary of binary, binary_view, fixed_size_binary got
    "give the column that holds the text")."""
    pq.write_table(pa.table({"text": values}), tmp_path / "a.parquet")
    with pytest.raises(DataError, match=f"{tmp_path / 'a.parquet'}: column 'text' "
                                        f"\\(--text-field\\) holds {re.escape(kind)}, not "
                                        f"strings; {re.escape(hint)}"):
        plan_data([str(tmp_path)], cache_root=str(tmp_path / "cache"))


def test_parquet_string_columns_of_every_kind_are_read(tmp_path):
    words = ["one", "two", "one"]
    for name, values in (("s", pa.array(words)), ("l", pa.array(words, pa.large_string())),
                         ("d", pa.array(words).dictionary_encode()),
                         ("v", pa.array(words, pa.string_view()))):
        pq.write_table(pa.table({"text": values}), tmp_path / f"{name}.parquet")
        source, = expand_sources([str(tmp_path / f"{name}.parquet")])
        assert [d.text for d in iter_documents(source)] == words, name
    plan_data([str(tmp_path)], cache_root=str(tmp_path / "cache"))


def test_txt_documents_are_paragraphs_that_join_back_to_the_file(tmp_path, monkeypatch):
    text = paragraphs(30, "p") + "\n\n\n  tail without newline"
    (tmp_path / "a.txt").write_text(text)
    monkeypatch.setattr("orchestrator.training.corpus.READ_CHUNK", 97)  # cuts mid-paragraph
    docs = list(iter_documents(expand_sources([str(tmp_path / "a.txt")])[0]))
    assert "".join(d.text for d in docs) == text
    assert len(docs) == 31 and [d.eos_after for d in docs] == [False] * 30 + [True]


def test_txt_without_blank_lines_is_cut_at_line_ends_the_same_whatever_the_chunks(
        tmp_path, monkeypatch):
    # One sentence per line (or code): a single paragraph, which would be one document:
    # nothing held out, and the whole file in memory at once.
    lines = [f"sentence {i}: one line of a book with no blank lines." for i in range(3000)]
    text = "\n".join(lines) + "\n\n" + "x" * 70_000 + "\n\n\n  tail"
    (tmp_path / "a.txt").write_text(text)
    source = expand_sources([str(tmp_path / "a.txt")])[0]
    docs = [d.text for d in iter_documents(source)]
    assert "".join(docs) == text
    assert len(docs) > 10 and max(map(len, docs)) <= 4 * MAX_DOCUMENT_CHARS
    assert all(d.endswith("\n") for d in docs[:5])  # cut at line ends, not mid-line
    for chunk in (1000, 4093):  # the chunks read do not move a cut
        monkeypatch.setattr("orchestrator.training.corpus.READ_CHUNK", chunk)
        assert [d.text for d in iter_documents(source)] == docs


def test_a_utf16_file_is_said_to_be_utf16(tmp_path):
    """What Windows Notepad saves as "Unicode" was "not UTF-8 text near byte 0", with no word
    of UTF-16 or of what to do."""
    text = tmp_path / "notes.txt"
    text.write_bytes("Hello\r\n\r\nworld\r\n".encode("utf-16"))
    lines = tmp_path / "notes.jsonl"
    lines.write_bytes('{"text": "Hello"}\n'.encode("utf-16"))
    utf16 = r"\(it starts with a UTF-16 byte-order mark: the file is UTF-16\); save it as UTF-8"
    source, = expand_sources([str(text)])
    with pytest.raises(DataError, match=f"^{text}:1: not UTF-8 text near byte 0 {utf16}$"):
        check_text_head(source)
    with pytest.raises(DataError, match=f"^{text}:1: not UTF-8 text near byte 0 {utf16}$"):
        list(iter_documents(source))
    source, = expand_sources([str(lines)])
    with pytest.raises(DataError,
                       match=f"^{lines}:1: not UTF-8 text .byte 1 of the line. {utf16}"):
        list(iter_documents(source))


def test_utf16_without_a_byte_order_mark_is_refused_not_read_as_nul_tokens(tmp_path):
    """UTF-16 saved without a byte-order mark (Python's "utf-16-le", many exporters): its
    ASCII is valid UTF-8 with a NUL after every letter, so the file was tokenized silently as
    "H\\0e\\0l\\0..." garbage. Refused in the driver's head check and in the pass, naming
    the file and the encoding; so is a file of NUL bytes (binary data)."""
    book = "Call me Ishmael. Some years ago.\n\nNever mind how long.\n" * 50
    le, be, nul = tmp_path / "le.txt", tmp_path / "be.txt", tmp_path / "nul.txt"
    le.write_bytes(book.encode("utf-16-le"))
    be.write_bytes(book.encode("utf-16-be"))
    nul.write_bytes(b"\0" * 4096)
    for path, said in ((le, "UTF-16-LE"), (be, "UTF-16-BE"), (nul, "binary")):
        source, = expand_sources([str(path)])
        with pytest.raises(DataError, match=rf"^{path}:1: not UTF-8 text near byte [01]: "
                           rf".*NUL bytes.*{said}.*save it as UTF-8"):
            check_text_head(source)
        with pytest.raises(DataError, match=rf"^{path}:1: not UTF-8 text near byte [01]: "
                           rf".*{said}"):
            list(iter_documents(source))
    # a UTF-16 file appended to a UTF-8 one (past the head check): the pass names its line
    mixed = tmp_path / "mixed.txt"
    mixed.write_bytes(b"plain text\n\n" * 8000 + book.encode("utf-16-le"))
    source, = expand_sources([str(mixed)])
    check_text_head(source)
    with pytest.raises(DataError, match=rf"^{mixed}:16001: not UTF-8 text near byte 96001: "
                       r"NUL bytes on every other byte: it reads as UTF-16 text"):
        list(iter_documents(source))
    lines = tmp_path / "le.jsonl"
    lines.write_bytes((json.dumps({"text": "hello"}) + "\n").encode("utf-16-le") * 3)
    source, = expand_sources([str(lines)])
    for skip in (False, True):
        with pytest.raises(DataError, match=rf"^{lines}:1: .*UTF-16-LE"):
            check_jsonl_head(source, "text", skip)
    with pytest.raises(DataError, match=rf"^{lines}:1: .*UTF-16-LE"):
        list(iter_documents(source))


def test_a_stray_nul_byte_near_the_end_is_text_and_a_bad_lines_nuls_only_that_line(tmp_path):
    """The NUL check weighs the 4 KiB from the first NUL: one in a file's (or an 8 MB
    chunk's) last bytes was most of a short window, refused as "UTF-16 text saved without a
    byte-order mark", where the same NUL earlier is kept. And a .jsonl file's head check
    refused a file whose later line is NUL bytes (a crash's zero-filled tail) even with
    --skip-bad-lines, which the pass skips: only a first line so says the whole file is."""
    stray = tmp_path / "stray.txt"
    stray.write_bytes(b"A paragraph of text.\n" * 100 + b"end\0\n")
    source, = expand_sources([str(stray)])
    check_text_head(source)
    assert len(list(iter_documents(source))) == 1
    crash = tmp_path / "crash.jsonl"
    crash.write_bytes(b"".join(json.dumps({"text": f"doc {i}"}).encode() + b"\n"
                               for i in range(5)) + b"\0" * 300)
    source, = expand_sources([str(crash)])
    check_jsonl_head(source, "text", True)
    skipped: list[str] = []
    assert len(list(iter_documents(source, "text", True, skipped))) == 5
    assert len(skipped) == 1 and skipped[0].startswith(f"{crash}:6: "), skipped


def test_compressed_data_under_a_text_files_name_is_said_to_be_compressed(tmp_path):
    """part-00000.jsonl holding gzip data was "not UTF-8 text (byte 2 of the line)"."""
    import gzip
    import lzma

    lines = tmp_path / "part-00000.jsonl"
    lines.write_bytes(gzip.compress(b'{"text": "hello"}\n' * 100))
    source, = expand_sources([str(lines)])
    with pytest.raises(DataError, match=rf"^{lines}:1: not UTF-8 text \(byte \d+ of the line\) "
                       r"\(it starts as gzip data: the file is compressed\); decompress it"):
        list(iter_documents(source))
    text = tmp_path / "book.txt"
    text.write_bytes(lzma.compress(b"Call me Ishmael.\n\n" * 100))
    source, = expand_sources([str(text)])
    hint = r"\(it starts as xz data: the file is compressed\); decompress it first$"
    with pytest.raises(DataError, match=rf"^{text}:\d+: not UTF-8 text near byte \d+ {hint}"):
        check_text_head(source)
    with pytest.raises(DataError, match=rf"^{text}:\d+: not UTF-8 text near byte \d+ {hint}"):
        list(iter_documents(source))


def test_a_jsonl_line_that_is_not_utf8_costs_that_line_alone(tmp_path):
    path = tmp_path / "a.jsonl"
    good = [json.dumps({"text": f"document {i}"}).encode() for i in range(3000)]
    lines = good[:4] + [b'{"text": "caf\xe9"}'] + good[4:]  # Latin-1, line 5
    path.write_bytes(b"\n".join(lines) + b"\n")
    source, = expand_sources([str(path)])
    with pytest.raises(DataError, match=f"{path}:5: not UTF-8 text"):
        list(iter_documents(source))
    skipped = []
    docs = list(iter_documents(source, skip_bad_lines=True, skipped=skipped))
    assert len(docs) == 3000 and [s.split(": ", 1)[0] for s in skipped] == [f"{path}:5"]
    assert docs[4].text == "document 4" and docs[4].line == 6


def test_a_lone_surrogate_escape_costs_that_line_alone(tmp_path):
    # JavaScript writes half an emoji as "\ud83d": valid JSON, not text.
    path = tmp_path / "a.jsonl"
    lines = [json.dumps({"text": f"document {i}"}) for i in range(4)]
    lines.insert(2, '{"text": "smile \\ud83d"}')
    path.write_text("\n".join(lines) + "\n")
    source, = expand_sources([str(path)])
    with pytest.raises(DataError, match=f"{path}:3: field 'text' is not valid Unicode"):
        list(iter_documents(source))
    skipped = []
    docs = list(iter_documents(source, skip_bad_lines=True, skipped=skipped))
    assert len(docs) == 4 and skipped[0].startswith(f"{path}:3:")


def test_one_file_named_twice_is_read_once(corpus, tmp_path):
    # Through a `latest -> data` link and as a file:// URI: one source, so no document is
    # both held out (one copy) and trained on (the other).
    (tmp_path / "latest").symlink_to(corpus)
    sources = expand_sources([str(corpus), str(tmp_path / "latest"),
                              f"file://{corpus}/book.txt"])
    assert sorted(os.path.basename(s.uri) for s in sources) == ["book.txt", "docs.jsonl",
                                                                "rows.parquet"]


def test_one_file_under_two_hard_links_is_read_once(tmp_path):
    """A snapshot tree of hard links (`cp -al`, rsnapshot, a dataset's `latest/` made with
    `ln`) named every file twice, and each was tokenized and trained on twice: one local file
    named twice is read once, as through a symlink; a copy (another file) is still read."""
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "a.txt").write_text("a paragraph\n\n")
    (tmp_path / "v2").mkdir()
    os.link(tmp_path / "v1" / "a.txt", tmp_path / "v2" / "a.txt")
    (tmp_path / "v2" / "b.txt").write_text("a paragraph\n\n")
    for specs in ([str(tmp_path)], [str(tmp_path / "v2"), str(tmp_path / "v1")]):
        assert [s.uri for s in expand_sources(specs)] == [
            str(tmp_path / "v1" / "a.txt"), str(tmp_path / "v2" / "b.txt")]


def test_a_filesystem_without_inode_numbers_keeps_every_file_and_symlinks_read_once(
        tmp_path, monkeypatch):
    # Some filesystems give every file inode 0 (some FUSE and network mounts): keyed by
    # (device, inode), one file of a whole folder was kept without a word.
    import types

    from orchestrator.training import corpus as corpus_module

    for name in ("a", "b", "c"):
        (tmp_path / "d" / f"{name}.txt").parent.mkdir(exist_ok=True)
        (tmp_path / "d" / f"{name}.txt").write_text(f"paragraph {name}\n\n")
    (tmp_path / "link.txt").symlink_to(tmp_path / "d" / "a.txt")
    real_stat = os.stat
    everything = [str(tmp_path / "d" / f"{n}.txt") for n in "abc"]

    def stat(path, *args, **kwargs):
        status = real_stat(path, *args, **kwargs)
        return types.SimpleNamespace(st_dev=status.st_dev, st_ino=0, st_mode=status.st_mode)
    monkeypatch.setattr(corpus_module.os, "stat", stat)
    assert [s.uri for s in expand_sources([str(tmp_path / "d")])] == everything
    assert [s.uri for s in expand_sources([str(tmp_path / "d"),
                                           str(tmp_path / "link.txt")])] == everything


def test_the_files_kept_and_the_cache_key_do_not_depend_on_the_order_of_data_values(
        corpus, tmp_path):
    # One file named twice was kept under the first name given: the cache key (which holds
    # it) changed with the order of --data values, and the corpus was tokenized again.
    from orchestrator.training.corpus import cache_key

    (tmp_path / "latest").symlink_to(corpus)
    one = expand_sources([str(corpus), str(tmp_path / "latest")])
    other = expand_sources([str(tmp_path / "latest"), str(corpus)])
    assert [s.uri for s in one] == [s.uri for s in other]
    assert cache_key(one, "text", False, "x") == cache_key(other, "text", False, "x")


def test_a_byte_order_mark_opening_a_file_is_not_text(tmp_path):
    # In .txt it opened the first document (trained on); in .jsonl, line 1 was "not valid
    # JSON" (refused, or silently skipped with --skip-bad-lines).
    (tmp_path / "bom.txt").write_bytes("\ufeffHello world.\n\nSecond.\n".encode())
    (tmp_path / "bom.jsonl").write_bytes(
        ("\ufeff" + json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n"
         ).encode())
    (txt,) = expand_sources([str(tmp_path / "bom.txt")])
    assert [d.text for d in iter_documents(txt)] == ["Hello world.\n\n", "Second.\n"]
    (jsonl,) = expand_sources([str(tmp_path / "bom.jsonl")])
    assert [d.text for d in iter_documents(jsonl)] == ["one", "two"]


def test_a_clear_cut_short_never_leaves_a_manifest_beside_missing_shards(corpus, tmp_path,
                                                                         monkeypatch):
    # A --retokenize clear killed part-way left manifest.json with shards gone: the next
    # run took the cache for finished, and its workers failed after Ray started.
    plan = plan_data([str(corpus)], cache_root=str(tmp_path / "cache"))
    tokenize_in_process(plan, say=lambda _: None)

    class CutShort:  # the local filesystem, whose clearing of a folder is killed
        def __init__(self, fs):
            self.fs = fs

        def __getattr__(self, name):
            return getattr(self.fs, name)

        def delete_dir_contents(self, path, **kwargs):
            raise OSError("killed")
    storage_for = shards.storage_for
    monkeypatch.setattr(shards, "storage_for",
                        lambda uri: (CutShort(storage_for(uri)[0]), storage_for(uri)[1]))
    with pytest.raises(DataError, match=f"data cache {plan.cache_uri} .*: killed"):
        shards.clear_cache_dir(plan.cache_uri)
    monkeypatch.undo()
    assert not plan_data([str(corpus)], cache_root=str(tmp_path / "cache")).cached


def test_the_held_out_split_is_by_text_wherever_the_files_are(tmp_path):
    texts = [f"document number {i} of the corpus" for i in range(400)]
    for where in ("a", "b"):
        (tmp_path / where).mkdir()
        (tmp_path / where / "c.txt").write_text("\n\n".join(texts))
    held = [{d.text for d in iter_documents(expand_sources([str(tmp_path / w)])[0])
             if is_held_out(d.text)} for w in ("a", "b")]
    assert held[0] == held[1] and 20 < len(held[0]) < 80  # ~10%, the same documents


def test_a_paragraph_falls_on_one_side_wherever_it_is_in_a_file(tmp_path):
    """The hash took in what a paragraph's cut leaves at its ends (the blank-line run after
    it, CRLF line ends, the next paragraph's indentation, none at the file's end): copies of
    one paragraph fell on both sides, a held-out one trained on."""
    texts = [f"Paragraph number {i} of some text." for i in range(200)]
    layouts = {"a.txt": "\n\n".join(texts) + "\n", "b.txt": "\n\n\n\n".join(texts),
               "c.txt": "\r\n\r\n".join(texts) + "\r\n", "d.txt": "\n\n    ".join(texts),
               "e.txt": "\n \n\t".join(reversed(texts)) + "\n\n"}
    for name, text in layouts.items():
        (tmp_path / name).write_bytes(text.encode())
    sides = {}
    for source in expand_sources([str(tmp_path)]):
        for doc in iter_documents(source):
            if doc.text.strip():  # (a file ending in a blank line ends with an empty one)
                sides.setdefault(doc.text.strip(), set()).add(is_held_out(doc.text))
    assert sorted(sides) == sorted(texts)
    assert all(len(side) == 1 for side in sides.values()), \
        [text for text, side in sides.items() if len(side) > 1]
    assert 5 < sum(side == {True} for side in sides.values()) < 40  # still ~10% held out


def test_a_long_paragraph_is_cut_at_the_same_lines_in_its_lf_and_crlf_copies(tmp_path,
                                                                          monkeypatch):
    """A paragraph over MAX_DOCUMENT_CHARS (a record per line, no blank lines) is cut at the
    first line end past it: counting the '\r' of CRLF line ends, a Windows copy was cut at
    other lines, so none of its pieces hashed as the LF copy's (0 of 74 matched) and the held-out
    lines of one copy were trained on through the other."""
    lines = [f"record {i}: " + "alpha beta gamma delta "[:3 + i % 19] for i in range(6000)]
    lines[3000] = "x" * (5 * MAX_DOCUMENT_CHARS)  # no line end: the hard cut, at 4x
    forms = {}
    for name, end in (("lf.txt", "\n"), ("crlf.txt", "\r\n")):
        text = end.join(lines) + end
        (tmp_path / name).write_bytes(text.encode())
        source, = expand_sources([str(tmp_path / name)])
        for chunk in (corpus_module.READ_CHUNK, 4093):  # (4093 cuts some CRLF in two)
            monkeypatch.setattr(corpus_module, "READ_CHUNK", chunk)
            docs = [d.text for d in iter_documents(source)]
            assert "".join(docs) == text
            forms.setdefault(name, [corpus_module._split_form(d) for d in docs])
            assert [corpus_module._split_form(d) for d in docs] == forms[name]
    assert len(forms["lf.txt"]) > 10 and forms["crlf.txt"] == forms["lf.txt"]


def split_streams(tmp_path, source):
    """Each split's tokens of one file tokenized with the byte tokenizer, as text with
    end-of-text written "|"."""
    result = shards.tokenize_source(source, 0, ByteTokenizer(), str(tmp_path / "shards"))
    streams = {}
    for split in shards.SPLITS:
        tokens = np.concatenate([np.fromfile(tmp_path / "shards" / s["file"], np.uint16)
                                 for s in result["shards"] if s["split"] == split])
        streams[split] = bytes(b if b < 256 else ord("|") for b in tokens).decode()
    return streams


def test_both_splits_join_a_txt_files_paragraphs_alike(tmp_path):
    """Held-out paragraphs each ended with end-of-text, training ones ran on with none to the
    file's end: the held-out loss was measured on text cut up as training never saw it. Both
    splits now read a file's text in runs of the paragraphs that follow each other in it,
    each run ending with end-of-text (where the file goes on in the other split, and at its
    end)."""
    (tmp_path / "shards").mkdir()
    texts = [f"Paragraph {i}, a line of a book." for i in range(600)]
    (tmp_path / "book.txt").write_text("\n\n".join(texts) + "\n")
    source, = expand_sources([str(tmp_path / "book.txt")])
    docs = list(iter_documents(source))
    expected = dict.fromkeys(shards.SPLITS, "")
    for i, doc in enumerate(docs):
        split = "held_out" if is_held_out(doc.text) else "train"
        last = i == len(docs) - 1 or is_held_out(docs[i + 1].text) != (split == "held_out")
        expected[split] += doc.text + ("|" if last else "")
    streams = split_streams(tmp_path, source)
    assert streams == expected
    # some of the file's held-out paragraphs follow each other, and read so
    pairs = [a.text + b.text for a, b in zip(docs, docs[1:])
             if is_held_out(a.text) and is_held_out(b.text)]
    assert pairs and all(pair in streams["held_out"] for pair in pairs)
    runs = [streams[split].count("|") for split in shards.SPLITS]  # they alternate
    assert abs(runs[0] - runs[1]) <= 1 and min(runs) > 40


def test_compressed_files_are_refused_by_name_not_passed_over(tmp_path):
    (tmp_path / "part-00000.jsonl.gz").write_bytes(b"\x1f\x8b")
    (tmp_path / "LICENSE.txt").write_text("license text " * 100)
    for spec in (str(tmp_path), f"{tmp_path}/*", f"{tmp_path}/**"):  # a folder or a glob
        with pytest.raises(DataError, match="compressed files are not read "
                                            r"\(part-00000.jsonl.gz\): decompress them"):
            expand_sources([spec])


def test_an_existing_path_with_glob_characters_is_itself(tmp_path):
    (tmp_path / "corpus[2024]").mkdir()
    (tmp_path / "corpus[2024]" / "a.txt").write_text(paragraphs(5, "p"))
    source, = expand_sources([str(tmp_path / "corpus[2024]")])
    assert source.uri == str(tmp_path / "corpus[2024]" / "a.txt")
    # a file literally named with a `?`: that file, not the others the glob would match
    # (glob.glob reads `data?v=2.txt` as a pattern: dataXv=2.txt too); none such: the glob
    (tmp_path / "data?v=2.txt").write_text("the literal name\n\n")
    (tmp_path / "dataXv=2.txt").write_text("another file\n\n")
    source, = expand_sources([str(tmp_path / "data?v=2.txt")])
    assert next(iter_documents(source)).text == "the literal name\n\n"
    source, = expand_sources([str(tmp_path / "dataX?=2.txt")])
    assert source.uri == str(tmp_path / "dataXv=2.txt")


def test_hidden_folders_are_skipped_and_a_glob_star_stays_in_its_folder(tmp_path):
    root = tmp_path / "corp"
    for name in ("a.txt", "sub/b.txt", ".hidden.txt", ".ipynb_checkpoints/a-checkpoint.txt",
                 "sub/.cache/c.txt"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("some text")
    names = lambda specs: [s.uri.split("corp/")[1] for s in expand_sources(specs)]
    assert names([str(root)]) == ["a.txt", "sub/b.txt"]
    assert names([f"{root}/*.txt"]) == ["a.txt"]
    assert names([f"{root}/**.txt"]) == ["a.txt", "sub/b.txt"]
    assert names([f"{root}/**/*.txt"]) == ["a.txt", "sub/b.txt"]
    assert names([f"{root}/sub/.cache/*.txt"]) == ["sub/.cache/c.txt"]  # asked for by name
    assert names([f"{root}/.h*.txt"]) == [".hidden.txt"]  # a dot in the pattern, as a shell
    assert names([f"{root}/[ab].txt"]) == ["a.txt"]
    assert names([f"{root}/[a-c].txt"]) == ["a.txt"]
    with pytest.raises(DataError, match=r"--data .*\[z-a\]\.txt: not a usable pattern"):
        expand_sources([f"{root}/[z-a].txt"])


def test_a_relative_cache_root_is_made_absolute_for_workers_elsewhere(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text(paragraphs(40, "p"))
    monkeypatch.chdir(tmp_path)
    plan = plan_data(["a.txt"], cache_root="relcache")
    assert plan.cache_uri.startswith(str(tmp_path / "relcache") + "/")


def test_held_out_documents_are_never_in_the_training_shards(corpus, tmp_path):
    plan = plan_data([str(corpus)], cache_root=str(tmp_path / "cache"))
    manifest = tokenize_in_process(plan, shard_tokens=500, say=lambda _: None)
    train, held_out, _ = open_shards(plan.cache_uri)
    assert manifest["held_out_documents"] > 0 and manifest["documents"] > 0
    assert len(train) == manifest["train_tokens"] and len(held_out) > 0
    train_text = ByteTokenizer().decode(train.window(0, len(train)).tolist())
    for source in plan.sources:
        for doc in iter_documents(source):
            if doc.text.strip():
                assert (doc.text in train_text) != is_held_out(doc.text), doc.text
    assert len(manifest["splits"]["train"]) > 3  # several shards: windows cross shard ends


def test_the_second_plan_finds_the_cache_and_a_changed_file_does_not(corpus, tmp_path):
    cache = str(tmp_path / "cache")
    first = plan_data([str(corpus)], cache_root=cache)
    assert not first.cached
    tokenize_in_process(first, say=lambda _: None)
    again = plan_data([str(corpus)], cache_root=cache)
    assert again.cached and again.key == first.key
    assert not plan_data([str(corpus)], cache_root=cache, retokenize=True).cached
    with open(corpus / "book.txt", "a") as f:
        f.write("\n\nanother paragraph")
    assert plan_data([str(corpus)], cache_root=cache).key != first.key


def test_a_pass_interrupted_before_its_manifest_is_redone_not_read(corpus, tmp_path):
    plan = plan_data([str(corpus)], cache_root=str(tmp_path / "cache"))
    manifest = tokenize_in_process(plan, say=lambda _: None)
    os.remove(os.path.join(plan.cache_uri, shards.MANIFEST_FILE))  # died before the manifest
    stale = os.path.join(plan.cache_uri, "00000-train-0000.bin")
    with open(stale, "wb") as f:
        f.write(b"\0" * 10)  # a half-written shard
    redo = plan_data([str(corpus)], cache_root=str(tmp_path / "cache"))
    assert not redo.cached
    assert tokenize_in_process(redo, say=lambda _: None)["train_tokens"] == \
        manifest["train_tokens"]
    assert os.path.getsize(stale) == 2 * manifest["splits"]["train"][0]["tokens"]


def test_batches_from_shards_equal_batches_from_the_same_tokens_in_memory(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 300, 10_000).astype(np.uint16)
    parts = np.split(tokens, [1000, 1001, 4000, 9000])
    stream = TokenStream(parts)
    in_memory = torch.from_numpy(tokens.astype(np.int64))
    for step in range(20):
        a = get_batch(stream, 8, 64, seed=3, rank=1, step=step)
        b = get_batch(in_memory, 8, 64, seed=3, rank=1, step=step)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(get_batch(stream, 8, 64, seed=3, rank=0, step=0)[0],
                           get_batch(stream, 8, 64, seed=3, rank=1, step=0)[0])
    assert token_dtype(257) == np.uint16 and token_dtype(70_000) == np.uint32


def private_rss_bytes():
    """The process's own resident memory (RssAnon). The mapped shards' resident pages count
    in RSS too (RssFile), but they are the kernel's page cache: shared by every worker on the
    node and dropped under memory pressure; on a filesystem with large folios one touched
    token maps in 2 MB of them. What must not grow with the corpus is the worker's own."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def test_worker_memory_does_not_grow_with_the_corpus(tmp_path):
    """64 MB of shards of 4 MB each: opening them and drawing 300 batches keeps the worker's
    own memory flat (reading the corpus in memory would not)."""
    shard_tokens, count = 2 << 20, 16
    names = []
    for i in range(count):
        name = f"00000-train-{i:04d}.bin"
        np.full(shard_tokens, i, dtype=np.uint16).tofile(tmp_path / name)
        names.append({"file": name, "split": "train", "tokens": shard_tokens})
    (tmp_path / "h.bin").write_bytes(np.zeros(1000, dtype=np.uint16).tobytes())
    manifest = {"version": shards.MANIFEST_VERSION, "key": "k", "dtype": "uint16",
                "vocab_size": 257, "splits": {"train": names, "held_out": [
                    {"file": "h.bin", "split": "held_out", "tokens": 1000}]}}
    (tmp_path / shards.MANIFEST_FILE).write_text(json.dumps(manifest))
    corpus_bytes = shard_tokens * count * 2
    get_batch(TokenStream([np.zeros(1000, np.uint16)]), 8, 128, seed=0, rank=0, step=0)
    before = private_rss_bytes()
    train, _, _ = open_shards(str(tmp_path))
    seen = set()
    for step in range(300):
        x, _ = get_batch(train, 8, 128, seed=0, rank=0, step=step)
        seen.update(x[:, 0].tolist())
    grown = private_rss_bytes() - before
    assert len(train) == shard_tokens * count and len(seen) == count  # every shard was read
    assert grown < corpus_bytes / 8, f"RssAnon grew {grown / 1e6:.1f} MB for a 64 MB corpus"
    # The control, the corpus read into memory from its own baseline and without temporaries:
    # freeing them let the allocator trim free heap counted in the baseline (RssAnon then grew
    # 52 MB for the 64 MB read).
    ahead = private_rss_bytes()
    loaded = np.empty(shard_tokens * count, dtype=np.uint16)
    for i, n in enumerate(names):
        with open(tmp_path / n["file"], "rb") as f:
            f.readinto(loaded[i * shard_tokens:(i + 1) * shard_tokens])
    assert private_rss_bytes() - ahead > corpus_bytes * 0.9  # the in-memory way does grow
    del loaded


def test_shards_on_remote_storage_are_copied_to_local_disk_first(corpus, tmp_path,
                                                                 monkeypatch):
    plan = plan_data([str(corpus)], cache_root=str(tmp_path / "cache"))
    tokenize_in_process(plan, shard_tokens=500, say=lambda _: None)
    local_train, _, _ = open_shards(plan.cache_uri)
    # A filesystem that is not the local one (as s3:// would be), over the same directory.
    remote = pafs.SubTreeFileSystem("/", pafs.LocalFileSystem())
    monkeypatch.setattr(shards, "storage_for", lambda uri: (remote, plan.cache_uri))
    train, held_out, _ = open_shards("s3://bucket/cache", local_dir=tmp_path / "copied")
    assert sorted(os.listdir(tmp_path / "copied")) == sorted(
        s["file"] for split in shards.SPLITS for s in plan.manifest["splits"][split])
    assert np.array_equal(train.window(0, len(train)), local_train.window(0, len(local_train)))
    assert str(tmp_path / "copied") in train.arrays[0].filename


def test_a_copy_left_by_a_killed_worker_is_swept_when_the_key_is_used_again(corpus, tmp_path,
                                                                          monkeypatch):
    plan = plan_data([str(corpus)], cache_root=str(tmp_path / "cache"))
    tokenize_in_process(plan, shard_tokens=500, say=lambda _: None)
    remote = pafs.SubTreeFileSystem("/", pafs.LocalFileSystem())
    monkeypatch.setattr(shards, "storage_for", lambda uri: (remote, plan.cache_uri))
    local = tmp_path / "copied"
    local.mkdir()
    first = plan.manifest["splits"]["train"][0]["file"]
    # A worker killed mid-copy (its pid gone) left its partial file; a live one's stays.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (local / f"{first}.tmp-{dead.pid}").write_bytes(b"partial")
    (local / f"{first}.tmp-{socket.gethostname()}-{dead.pid}").write_bytes(b"partial")
    (local / f"{first}.tmp-{socket.gethostname()}-{os.getppid()}").write_bytes(b"live")
    open_shards("s3://bucket/cache", local_dir=local)
    assert sorted(os.listdir(local)) == sorted(
        [s["file"] for split in shards.SPLITS for s in plan.manifest["splits"][split]]
        + [f"{first}.tmp-{socket.gethostname()}-{os.getppid()}"])


def test_a_copy_in_progress_whose_pid_this_host_cannot_see_is_not_swept(corpus, tmp_path,
                                                                         monkeypatch):
    # Two containers sharing the host's name (host networking) and the home directory have
    # pid namespaces of their own: a worker's live copy looked, from the other, like a dead
    # worker's, and was swept mid-copy (its rename then failed: FileNotFoundError).
    import threading

    plan = plan_data([str(corpus)], cache_root=str(tmp_path / "cache"))
    tokenize_in_process(plan, shard_tokens=500, say=lambda _: None)
    manifest = plan.manifest
    remote = pafs.SubTreeFileSystem("/", pafs.LocalFileSystem())
    local = tmp_path / "copied"
    started, go_on = threading.Event(), threading.Event()

    class SlowStream:  # the first chunk, then a wait (a slow object store)
        def __init__(self, stream):
            self.stream, self.chunks = stream, 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.stream.close()

        def read(self, n):
            self.chunks += 1
            if self.chunks == 2:
                started.set()
                go_on.wait(30)
            return self.stream.read(min(n, 64))

    class SlowFs:
        def open_input_stream(self, path):
            return SlowStream(remote.open_input_stream(path))

    failed = []

    def copy():
        try:
            shards._copy_to_local(SlowFs(), plan.cache_uri, local, manifest)
        except BaseException as e:  # noqa: BLE001 (the test's verdict)
            failed.append(e)
    copier = threading.Thread(target=copy)
    copier.start()
    assert started.wait(30)
    monkeypatch.setattr(shards, "process_alive", lambda pid: False)  # not seen from here
    shards._sweep_dead_copies(local)
    go_on.set()
    copier.join(60)
    assert failed == []
    assert sorted(os.listdir(local)) == sorted(
        s["file"] for split in shards.SPLITS for s in manifest["splits"][split])


def test_a_copy_is_never_swept_before_it_holds_its_flock(corpus, tmp_path, monkeypatch):
    # A sweep from a container sharing the host's name (this pid not seen there) between the
    # copy's creating its file and locking it: the file, unlocked, read as a dead worker's
    # and was removed under it (its rename then failed: FileNotFoundError).
    from orchestrator import file_lock
    from tests.support import sweep_when_first_locked

    plan = plan_data([str(corpus)], cache_root=str(tmp_path / "cache"))
    tokenize_in_process(plan, shard_tokens=500, say=lambda _: None)
    manifest = plan.manifest
    remote = pafs.SubTreeFileSystem("/", pafs.LocalFileSystem())
    local = tmp_path / "copied"
    # the other container's sweep, at that moment
    # (file_lock.created_locked takes the copy's flock)
    swept = sweep_when_first_locked(monkeypatch, file_lock,
                                    lambda: shards._sweep_dead_copies(local))
    monkeypatch.setattr(shards, "process_alive", lambda pid: False)  # not seen from there
    shards._copy_to_local(remote, plan.cache_uri, local, manifest)
    assert swept
    assert sorted(os.listdir(local)) == sorted(
        s["file"] for split in shards.SPLITS for s in manifest["splits"][split])


def test_a_corpus_too_short_for_the_sequence_length_names_the_flag(tmp_path):
    (tmp_path / "a.txt").write_text(paragraphs(40, "short"))
    plan = plan_data([str(tmp_path / "a.txt")], cache_root=str(tmp_path / "cache"))
    manifest = tokenize_in_process(plan, say=lambda _: None)
    check_trainable(manifest, 16, "here")
    with pytest.raises(DataError, match="--seq-len 4096: the corpus's training split has"):
        check_trainable(manifest, 4096, "here")
    fewest = min(manifest["train_tokens"], manifest["held_out_tokens"])
    check_trainable(manifest, fewest - 1, "here")  # one window each: enough (data.get_batch)
    with pytest.raises(DataError, match=f"--seq-len {fewest}: "):
        check_trainable(manifest, fewest, "here")


def test_a_split_no_document_fell_in_says_so_not_seq_len(tmp_path):
    """Three books as three .jsonl lines: none held out, and the refusal advised "a shorter
    --seq-len", which cannot fill a split no document is in."""
    path = tmp_path / "books.jsonl"
    path.write_text("".join(json.dumps({"text": f"book {i} " * 2000}) + "\n" for i in (0, 2, 4)))
    plan = plan_data([str(path)], cache_root=str(tmp_path / "cache"))
    manifest = tokenize_in_process(plan, say=lambda _: None)
    assert (manifest["documents"], manifest["held_out_documents"]) == (3, 0)
    with pytest.raises(DataError, match=r"^none of the corpus's 3 documents fell in the "
                       r"held-out split \(here\).*give more documents"):
        check_trainable(manifest, 16, "here")


def test_a_trained_tokenizer_is_kept_in_the_cache_and_reused(corpus, tmp_path):
    cache = str(tmp_path / "cache")
    first = plan_data([str(corpus)], cache_root=cache, train_tokenizer=300, say=lambda _: None)
    second = plan_data([str(corpus)], cache_root=cache, train_tokenizer=300,
                       say=lambda _: pytest.fail("trained again"))
    assert first.tokenizer.sha256 == second.tokenizer.sha256 and first.key == second.key
    with pytest.raises(TokenizerError, match="exclude each other"):
        plan_data([str(corpus)], cache_root=cache, train_tokenizer=300, tokenizer="x.json")


def test_a_cached_trained_tokenizer_that_cannot_be_read_is_named(corpus, tmp_path):
    cache = str(tmp_path / "cache")
    plan_data([str(corpus)], cache_root=cache, train_tokenizer=300, say=lambda _: None)
    (cached,) = (tmp_path / "cache" / "tokenizers").glob("*.json")
    cached.write_bytes(b"\xff\xfe garbage")  # not UTF-8
    with pytest.raises(TokenizerError, match=f"cannot read tokenizer file {cached}"):
        plan_data([str(corpus)], cache_root=cache, train_tokenizer=300, say=lambda _: None)


def test_two_runs_caching_the_same_trained_tokenizer_at_once_both_succeed(corpus, tmp_path,
                                                                         monkeypatch):
    """Another run caches the same trained tokenizer between this run's write and its move
    into place. Both wrote one fixed `<file>.tmp`: this run's move then failed (OSError)."""
    from orchestrator.training import data_plan

    storage_for, cache, pid = data_plan.storage_for, str(tmp_path / "cache"), os.getpid()

    class OtherRunMidway:
        """The cache's filesystem; before this run's first move, another run (the same code
        in a process of another id) trains and caches the same tokenizer."""

        def __init__(self, fs):
            self.fs, self.other_ran = fs, False

        def __getattr__(self, name):
            return getattr(self.fs, name)

        def move(self, src, dest):
            if not self.other_ran:
                self.other_ran = True
                with monkeypatch.context() as other_process:
                    other_process.setattr(data_plan, "storage_for", storage_for)
                    other_process.setattr(os, "getpid", lambda: pid + 1)
                    plan_data([str(corpus)], cache_root=cache, train_tokenizer=300,
                              say=lambda _: None)
            self.fs.move(src, dest)

    def storage_with_another_run(uri):
        fs, root = storage_for(uri)
        return OtherRunMidway(fs), root

    monkeypatch.setattr(data_plan, "storage_for", storage_with_another_run)
    first = plan_data([str(corpus)], cache_root=cache, train_tokenizer=300, say=lambda _: None)
    second = plan_data([str(corpus)], cache_root=cache, train_tokenizer=300,
                       say=lambda _: pytest.fail("trained again"))
    assert first.tokenizer.sha256 == second.tokenizer.sha256
    # one cached file, no temporary file left behind
    assert [p.suffix for p in (tmp_path / "cache" / "tokenizers").iterdir()] == [".json"]


class _PausingTokenizer:
    """The plan's tokenizer, calling `hook(call_number)` before each batch it encodes."""

    def __init__(self, inner, hook):
        self.inner, self.hook, self.calls = inner, hook, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode_arrays(self, texts):
        self.calls += 1
        self.hook(self.calls)
        return self.inner.encode_arrays(texts)


def test_two_runs_tokenizing_the_same_files_at_once_do_not_delete_each_others_shards(
        corpus, tmp_path):
    """Run B starts while run A is half-way through its pass. Without the pass lock B clears
    the directory (deleting A's first shards) and A's manifest then lists files that are gone;
    with it B waits, tokenizes nothing and uses A's shards."""
    import threading

    from orchestrator.training.data_plan import tokenize_once

    cache = str(tmp_path / "cache")
    a_midway, b_cleared, a_done = threading.Event(), threading.Event(), threading.Event()
    first, second = plan_data([str(corpus)], cache_root=cache), plan_data([str(corpus)],
                                                                          cache_root=cache)

    def a_hook(call):
        if call == 2:  # the first file's shards are written
            a_midway.set()
            b_cleared.wait(1.5)  # times out when B is (rightly) held at the lock

    def b_hook(call):
        b_cleared.set()  # B's pass has cleared the directory
        a_done.wait(5)

    first.tokenizer = _PausingTokenizer(first.tokenizer, a_hook)
    second.tokenizer = _PausingTokenizer(second.tokenizer, b_hook)
    said, outcome = [], {}

    def run_b():
        a_midway.wait(5)
        outcome["b"] = tokenize_once(
            second, lambda p: tokenize_in_process(p, shard_tokens=500, say=lambda _: None),
            said.append)

    b = threading.Thread(target=run_b)
    b.start()
    manifest = tokenize_once(
        first, lambda p: tokenize_in_process(p, shard_tokens=500, say=lambda _: None),
        lambda _: None)
    missing = [s["file"] for split in shards.SPLITS for s in manifest["splits"][split]
               if not os.path.exists(os.path.join(first.cache_uri, s["file"]))]
    a_done.set()
    b.join(10)
    assert not missing, f"run A's manifest lists deleted shards: {missing}"
    assert second.tokenizer.calls == 0 and outcome["b"] == manifest
    assert any("is tokenizing these files" in line and "waiting" in line for line in said)
    train, _, _ = open_shards(first.cache_uri)
    assert len(train) == manifest["train_tokens"]


def test_the_pass_lock_of_a_run_that_died_is_free_at_once(tmp_path):
    """A waiting run is told who holds the cache, and a holder killed with -9 (no cleanup
    ran) frees it: the waiter goes on at once."""
    import signal
    import subprocess
    import sys
    import threading

    cache = str(tmp_path / "cache" / "abc")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time\n"
         "from orchestrator.training.shards import pass_lock\n"
         f"with pass_lock({cache!r}):\n    print('held', flush=True)\n    time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    said, outcome = [], {}

    def wait_for_the_lock():
        with shards.pass_lock(cache, said.append) as waited:
            outcome["waited"] = waited

    try:
        assert holder.stdout.readline().strip() == "held"
        waiter = threading.Thread(target=wait_for_the_lock, daemon=True)
        waiter.start()
        waiter.join(1.0)
        assert waiter.is_alive() and not outcome, "the lock was free while its holder lived"
        assert said and f"pid {holder.pid} on " in said[0], said
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    waiter.join(5)
    assert outcome == {"waited": True}


def test_a_run_whose_plan_predates_anothers_finished_pass_uses_those_shards(corpus, tmp_path):
    """A planned (no manifest yet), B then tokenized and released the lock before A took it:
    A, not having waited, cleared B's fresh shards and redid them while B trained on them."""
    from orchestrator.training.data_plan import tokenize_once

    cache = str(tmp_path / "cache")
    late = plan_data([str(corpus)], cache_root=cache)
    first = plan_data([str(corpus)], cache_root=cache)
    built = tokenize_once(first, lambda p: tokenize_in_process(p, say=lambda _: None))
    passes = []
    assert tokenize_once(late, lambda p: passes.append(p) or {}, lambda _: None) == built
    assert passes == [] and late.manifest == built
    # --retokenize that did not wait for anyone: redone, as asked (into a fresh directory,
    # swapped in: tests/unit/test_shards.py).
    redo = plan_data([str(corpus)], cache_root=cache, retokenize=True)
    redone = tokenize_once(redo, lambda p: passes.append(p) or tokenize_in_process(
        p, say=lambda _: None), lambda _: None)
    assert len(passes) == 1 and passes[0].cache_uri.startswith(redo.cache_uri + ".retokenize-")
    assert redone == built and read_manifest(redo.cache_uri) == built


def test_a_filesystem_without_flock_tokenizes_unguarded_and_says_so(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    said = []
    with shards.pass_lock(str(tmp_path / "cache" / "k"), said.append) as waited:
        assert waited is False
    assert said and said[0].startswith("warning: cannot lock") and "No locks available" in said[0]


def test_a_pass_over_many_files_sums_its_progress_once_and_says_it_once_a_second():
    """The progress line re-summed every result at each finished file: 85 s of driver time
    over 20,000 files, and 20,000 lines."""
    from orchestrator.training.data_plan import PassProgress

    now, said = [0.0], []
    progress = PassProgress(20_000, said.append, clock=lambda: now[0])
    started = time.perf_counter()
    for _ in range(20_000):
        now[0] += 0.01  # a file every 10 ms: 200 s
        progress.add({"documents": 2, "held_out_documents": 1, "tokens": 100,
                      "held_out_tokens": 10, "bytes": 1000})
    assert time.perf_counter() - started < 3
    assert 190 <= len(said) <= 202, len(said)
    assert said[-1] == ("tokenized 20000/20000 files: 60,000 documents, 2,200,000 tokens, "
                        "20.0 MB at 0.10 MB/s")


def test_a_glob_that_matches_folders_reads_them_as_directory_values(tmp_path):
    """`DIR/*` or `DIR/part-*/` matching folders (a shell lists them; a folder given to --data
    is every file under it) was refused as "the pattern matches no .txt, .jsonl, .parquet
    files"."""
    root = tmp_path / "corp"
    for name in ("a/x.txt", "a/deep/y.jsonl", "a/.cache/z.txt", "b/w.txt", "top.txt",
                 "c/notes.md", ".hid/h.txt"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text('{"text": "t"}\n' if name.endswith(".jsonl") else "text")
    names = lambda spec: [s.uri.split("corp/")[1] for s in expand_sources([spec])]
    assert names(f"{root}/*") == ["a/deep/y.jsonl", "a/x.txt", "b/w.txt", "top.txt"]
    assert names(f"{root}/*/") == ["a/deep/y.jsonl", "a/x.txt", "b/w.txt"]
    assert names(f"{root}/[ab]") == ["a/deep/y.jsonl", "a/x.txt", "b/w.txt"]
    assert names(f"{root}/**") == ["a/deep/y.jsonl", "a/x.txt", "b/w.txt", "top.txt"]
    assert names(f"{root}/.h*") == [".hid/h.txt"]
    with pytest.raises(DataError, match=r"--data .*/c\*: the pattern matches no .*\(1 other"):
        expand_sources([f"{root}/c*"])


@pytest.mark.parametrize("chunk", [corpus_module.READ_CHUNK, 7, 4])
@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_a_txt_byte_that_is_not_utf8_is_named_by_line(tmp_path, monkeypatch, chunk, bom):
    """A .txt file's bad byte was named only as "near byte B" (0-based), no line: in a
    corpus file of millions of lines, nothing an editor shows. The line is said as for a
    .jsonl line (F:LINE:), and the byte counts the file's bytes, whatever the read size."""
    monkeypatch.setattr("orchestrator.training.corpus.READ_CHUNK", chunk)
    text = tmp_path / "book.txt"
    data = bom + "one\r\n\r\ntwo \u00e9\n\nthree caf".encode("utf-8") + b"\xe9 au lait\n"
    text.write_bytes(data)
    source, = expand_sources([str(text)])
    at = data.index(b"\xe9 au")
    message = rf"^{text}:5: not UTF-8 text near byte {at} ; save it as UTF-8$"
    with pytest.raises(DataError, match=message.replace(" ;", ";")):
        check_text_head(source)
    with pytest.raises(DataError, match=message.replace(" ;", ";")):
        list(iter_documents(source))


@pytest.mark.parametrize("chunk", [corpus_module.READ_CHUNK, 1, 2, 3, 7])
@pytest.mark.parametrize("bad", [b"\xe9 au lait\r", b"\0" * 64], ids=["latin1", "nul"])
def test_a_txt_bad_bytes_line_counts_lone_cr_line_ends(tmp_path, monkeypatch, chunk, bad):
    """A lone CR ends a .txt line (an old Mac file), as the reader cuts documents; the
    'not UTF-8' and NUL messages counted LF alone: line 1 in a CR-only file, whatever the
    line. A CRLF is one line end, also when a read cuts it between its CR and LF."""
    monkeypatch.setattr("orchestrator.training.corpus.READ_CHUNK", chunk)
    text = tmp_path / "mac.txt"
    data = b"one\r\rtwo\r\nthree\rfour caf" + bad
    text.write_bytes(data)
    source, = expand_sources([str(text)])
    at = data.index(bad[:1])
    message = rf"^{text}:5: not UTF-8 text near byte {at}[;:] "
    with pytest.raises(DataError, match=message):
        check_text_head(source)
    with pytest.raises(DataError, match=message):
        list(iter_documents(source))


def _rewritten_in_place(path, old: bytes, new: bytes) -> None:
    """`path` with `old` replaced by `new` (as long), its modification time put back, as
    `cp -p` of an edited copy or `rsync --times` leave it."""
    before = os.stat(path)
    data = path.read_bytes()
    assert len(old) == len(new) and old in data
    path.write_bytes(data.replace(old, new))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_a_file_rewritten_at_its_size_and_modification_time_is_tokenized_again(tmp_path):
    """The cache key held a file's size and modification time only: a file rewritten at the
    same size with its time put back (`touch -d`, `cp -p`, `rsync --times`) kept its key, and
    the run trained on the old text's shards. Its first and last 64 KiB are in the key now
    (a file up to 128 KiB: all of it); a change between them is still not seen."""
    small, large = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    small.write_text("".join(json.dumps({"text": f"old text {i:03d}"}) + "\n"
                             for i in range(200)))
    large.write_text("".join(json.dumps({"text": f"line {i:06d} " + "x" * 200}) + "\n"
                             for i in range(4000)))  # ~0.9 MB
    cache = str(tmp_path / "cache")
    plan = plan_data([str(small), str(large)], cache_root=cache)
    tokenize_in_process(plan, say=lambda _: None)
    assert plan_data([str(small), str(large)], cache_root=cache).cached
    _rewritten_in_place(small, b"old text 100", b"new text 100")
    again = plan_data([str(small), str(large)], cache_root=cache)
    assert again.key != plan.key and not again.cached
    tokenize_in_process(again, say=lambda _: None)
    _rewritten_in_place(large, b"line 003999", b"line 00399X")  # in its last 64 KiB
    assert not plan_data([str(small), str(large)], cache_root=cache).cached


def test_a_null_parquet_value_is_named_by_its_row(tmp_path):
    """A parquet row without text (a null, common in exported datasets) was named as
    `F:3:`, a line of a binary file; the tokenizer's errors name a row `F: row 3:`."""
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": ["one document.", "another.", None, "last."]}), path)
    with pytest.raises(DataError) as refused:
        plan = plan_data([str(path)], cache_root=str(tmp_path / "cache"))
        tokenize_in_process(plan, say=lambda _: None)
    assert str(refused.value) == (f"{path}: row 3: column 'text' is null, not a string (pass "
                                  "--skip-bad-lines to skip and count such rows)")
    plan = plan_data([str(path)], skip_bad_lines=True, cache_root=str(tmp_path / "cache"))
    manifest = tokenize_in_process(plan, say=lambda _: None)
    assert manifest["skipped_example"] == f"{path}: row 3: column 'text' is null, not a string"


def test_a_corpus_whose_every_document_is_empty_says_so_not_seq_len(tmp_path):
    """Every .jsonl line's text "" (an export whose text column was blanked, a wrong field
    holding empty strings): the refusal said the training split has 0 tokens and advised "a
    shorter --seq-len", which cannot help."""
    path = tmp_path / "empty.jsonl"
    path.write_text("".join(json.dumps({"text": "", "id": i}) + "\n" for i in range(30)))
    plan = plan_data([str(path)], cache_root=str(tmp_path / "cache"))
    manifest = tokenize_in_process(plan, say=lambda _: None)
    with pytest.raises(DataError) as error:
        check_trainable(manifest, 16, "here")
    message = str(error.value)
    assert message.startswith("the corpus holds no text: every document of its 1 file(s) is "
                              "empty or only spaces and line ends (here): "
                              f"{path}") and "--seq-len" not in message, message
    assert "--text-field 'text'" in message


def test_a_corpus_of_only_blank_text_holds_no_text_naming_its_files(tmp_path):
    """A .txt file of blank lines and spaces was one 9-token document, refused as too short
    for --seq-len (which cannot help), and a .jsonl line's text of spaces a document, while
    its text "" was none: one rule, a document of only spaces and line ends is no text, and
    the refusal names the files (a .txt-only corpus is not asked about --text-field)."""
    (tmp_path / "blank.txt").write_bytes(b"\n\n\n   \n\n")
    (tmp_path / "spaces.jsonl").write_text(json.dumps({"text": "  \n "}) + "\n"
                                           + json.dumps({"text": ""}) + "\n")
    for names, field_hint in ((["blank.txt"], False),
                              (["blank.txt", "spaces.jsonl"], True)):
        plan = plan_data([str(tmp_path / n) for n in names],
                         cache_root=str(tmp_path / "cache"))
        manifest = tokenize_in_process(plan, say=lambda _: None)
        assert manifest["documents"] + manifest["held_out_documents"] == 0
        with pytest.raises(DataError) as error:
            check_trainable(manifest, 4, "here")
        message = str(error.value)
        assert message.startswith(
            f"the corpus holds no text: every document of its {len(names)} file(s) is empty "
            "or only spaces and line ends (here): "
            + ", ".join(str(tmp_path / n) for n in names)), message
        assert "--seq-len" not in message and ("--text-field" in message) == field_hint
    # a blank run opening a file is no document of its own either
    (tmp_path / "lead.txt").write_text("\n\n\nA paragraph.\n")
    plan = plan_data([str(tmp_path / "lead.txt")], cache_root=str(tmp_path / "cache"))
    manifest = tokenize_in_process(plan, say=lambda _: None)
    assert manifest["documents"] + manifest["held_out_documents"] == 1


@pytest.mark.parametrize("spec", ["{d}", "{d}/*.txt", "{d}/**", "{d}/*/*.txt"])
def test_a_file_or_folder_name_that_is_not_utf8_is_named_not_a_traceback(tmp_path, spec):
    # A Latin-1 name (an old archive unpacked, a Windows share): pyarrow decodes a listed
    # name only when asked, and the UnicodeDecodeError ended the job as a traceback.
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "good.txt").write_text("a paragraph\n\n")
    (corpus / "sub" / "good.txt").write_text("a paragraph\n\n")
    bad = os.fsencode(corpus) + (b"/sub/caf\xe9.txt" if "*/" in spec else b"/caf\xe9.txt")
    with open(bad, "wb") as f:
        f.write(b"a paragraph\n\n")
    spec = spec.format(d=corpus)
    with pytest.raises(DataError) as refused:
        corpus_module.expand_sources([spec])
    assert str(refused.value) == (
        f"--data {spec}: the name of {bad.decode(errors='backslashreplace')} is not UTF-8 "
        "(byte 0xe9): rename it to UTF-8 (convmv -f latin1 -t utf8 --notest), or move it out "
        "of the way")
    os.remove(bad)  # a folder whose name is not UTF-8, with a corpus file in it
    os.mkdir(os.fsencode(corpus) + b"/d\xe9j\xe0")
    with open(os.fsencode(corpus) + b"/d\xe9j\xe0/in.txt", "wb") as f:
        f.write(b"a paragraph\n\n")
    with pytest.raises(DataError, match=r"the name of .*/d\\xe9j\\xe0(/in.txt)? is not UTF-8"):
        corpus_module.expand_sources([str(corpus)])


@pytest.mark.parametrize("spec", ["{d}", "{d}/", "{d}/*", "{d}/**", "{d}/*.txt",
                                  "{d}/s*/*.txt"])
def test_a_stray_file_whose_name_is_not_utf8_and_is_no_corpus_file_is_skipped(tmp_path, spec):
    """A `.bak`, an `Icon\\r`-like file or a folder of them, whose name is not UTF-8, refused
    the whole --data value although it would never be read (even under `*.txt`): it is
    skipped, named in a note where the value would have listed it; a hidden one (`._x`, a
    Mac's) silently, as any hidden file."""
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "good.txt").write_text("a paragraph\n\n")
    (corpus / "sub" / "good.txt").write_text("a paragraph\n\n")
    raw = os.fsencode(corpus)
    strays = [raw + b"/caf\xe9.bak", raw + b"/sub/Icon\xe9", raw + b"/x\xe9/notes.md"]
    os.mkdir(raw + b"/x\xe9")
    for stray in strays + [raw + b"/._caf\xe9.txt"]:
        with open(stray, "wb") as f:
            f.write(b"x")
    spec = spec.format(d=corpus)
    said = []
    if spec.endswith("/*"):  # x\xe9/ matched, a folder that cannot be listed: refused
        with pytest.raises(DataError, match=r"the name of .*/x\\xe9 is not UTF-8"):
            corpus_module.expand_sources([spec], say=said.append)
        return
    sources = corpus_module.expand_sources([spec], say=said.append)
    wanted = {"{d}/*.txt": ["good.txt"], "{d}/s*/*.txt": ["sub/good.txt"]}
    assert [s.uri[len(str(corpus)) + 1:] for s in sources] == \
        wanted.get(spec.replace(str(corpus), "{d}"), ["good.txt", "sub/good.txt"])
    shown = [p.decode(errors="backslashreplace") for p in strays]
    if spec.endswith(".txt"):  # (not listed: nothing to say)
        assert said == []
    else:
        assert said == [f"--data {spec}: skipped {len(shown)} file(s) whose name is not UTF-8 "
                        f"and that are no .txt, .jsonl, .parquet file: {', '.join(sorted(shown))}"]
    # a folder not UTF-8 that the pattern reaches cannot be listed: refused, naming it
    with pytest.raises(DataError, match=r"the name of .*/x\\xe9 is not UTF-8"):
        corpus_module.expand_sources([f"{corpus}/*/*.txt"], say=said.append)


@pytest.mark.parametrize("spec", ["{d}", "{d}/**.txt", "{d}/*"])
def test_a_symlink_to_a_folder_above_is_not_followed_round_and_round(tmp_path, monkeypatch,
                                                                     spec):
    """pyarrow's recursive listing follows a symlink to a folder above it (`up -> ..`) until
    the kernel's ELOOP, 40 levels: every file was listed and checked (read) 40 times, and two
    such links (`here -> .`) made it 2^40 listings, a --data run that never started. A folder
    already on the way down is not listed again; a folder reached by two names (`latest ->
    v3`) is listed once, under the first (its files were checked under both until the
    fourth session of 2026-12-07)."""
    corpus = tmp_path / "corpus"
    (corpus / "a" / "v3").mkdir(parents=True)
    (corpus / "a" / "v3" / "x.txt").write_text("a paragraph\n\n")
    (corpus / "a" / "latest").symlink_to("v3")
    (corpus / "a" / "up").symlink_to("..")
    checked = []
    real_checked = corpus_module._checked
    monkeypatch.setattr(corpus_module, "_checked",
                        lambda source, s: checked.append(source.uri) or real_checked(source, s))
    spec = spec.format(d=corpus)
    assert [s.uri for s in expand_sources([spec])] == [str(corpus / "a" / "latest" / "x.txt")]
    assert checked == [str(corpus / "a" / "latest" / "x.txt")]
    (corpus / "a" / "v3" / "here").symlink_to(".")
    assert [s.uri for s in expand_sources([spec])] == [str(corpus / "a" / "latest" / "x.txt")]


def test_a_corpus_file_in_a_symlink_loop_is_named_as_one_not_as_gone(tmp_path):
    # It said "a.txt is a symlink to b.txt, which does not exist (a mount that is not
    # mounted, a file moved or removed)" of two links to each other: b.txt is there.
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "ok.txt").write_text("a paragraph\n\n")
    (corpus / "a.txt").symlink_to("b.txt")
    (corpus / "b.txt").symlink_to("a.txt")
    with pytest.raises(DataError) as refused:
        expand_sources([str(corpus)])
    assert str(refused.value) in [
        f"--data {corpus}: {corpus / one} is a symlink to {corpus / other}, which leads round "
        "a loop of symlinks back to itself: point it at the file, or remove the link"
        for one, other in (("a.txt", "b.txt"), ("b.txt", "a.txt"))]


@pytest.mark.parametrize("spec", ["{d}", "{d}/**.txt", "{d}/*"])
def test_folders_linked_to_each_other_are_each_listed_once(tmp_path, monkeypatch, spec):
    """Only the folders on the way down were left out: sibling folders linked to each other
    (`see_also -> ../b`, `prev`/`next` links between versions) were listed once per path
    through the links, exponentially many: 7 folders each linked to the 6 others, 95,900
    entries and 18 s for 7 files (8 folders: minutes). A folder is listed once, under the
    first of its names in sorted order."""
    corpus = tmp_path / "corpus"
    names = [f"d{i}" for i in range(6)]
    for name in names:
        (corpus / name).mkdir(parents=True)
        (corpus / name / f"{name}.txt").write_text("a paragraph\n\n")
        for other in names:
            if other != name:
                (corpus / name / f"to_{other}").symlink_to(f"../{other}")
    listed = []
    real_folder = corpus_module._folder
    monkeypatch.setattr(corpus_module, "_folder",
                        lambda fs, folder: listed.append(folder) or real_folder(fs, folder))
    spec = spec.format(d=corpus)
    # (each file under its first name in sorted order, as before: d0/to_d1/to_d2/d2.txt)
    chain = [corpus / "d0"]
    for name in names[1:]:
        chain.append(chain[-1] / f"to_{name}")
    assert [s.uri for s in expand_sources([spec])] == [
        str(folder / f"{name}.txt") for folder, name in zip(chain, names)]
    # (`corpus/*` listed each folder it matches, and what that one links to, on its own:
    # n^2 listings, until the fourth session of 2026-12-07; now they share the rule)
    assert len(listed) <= len(names) + 1
    # A hidden folder is not what claims a folder's name: `data -> .store/data` is read.
    store = tmp_path / "other"
    (store / ".store" / "data").mkdir(parents=True)
    (store / ".store" / "data" / "x.txt").write_text("a paragraph\n\n")
    (store / "data").symlink_to(".store/data")
    spec = spec.replace(str(corpus), str(store))
    assert [s.uri for s in expand_sources([spec])] == [str(store / "data" / "x.txt")]


@pytest.mark.parametrize("spec", ["{d}", "{d}/*.txt", "{d}/**", "{d}/*"])
def test_a_corpus_file_linked_to_a_file_that_is_gone_is_named_not_passed_over(tmp_path,
                                                                              spec):
    """pyarrow's listing leaves out a symlink whose target does not exist: a corpus of links
    into a mount that was not mounted, or to files moved, trained on what was left without
    a word (a file given by path is `no such file or directory`). A corpus file so linked
    is refused, naming the link and its target; another (`notes.md`) is passed over."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "ok.txt").write_text("a paragraph\n\n")
    (corpus / "notes.md").symlink_to(tmp_path / "gone" / "notes.md")
    spec = spec.format(d=corpus)
    assert [s.uri for s in expand_sources([spec])] == [str(corpus / "ok.txt")]
    (corpus / "x.txt").symlink_to(tmp_path / "gone" / "x.txt")
    with pytest.raises(DataError) as refused:
        expand_sources([spec])
    assert str(refused.value) == (
        f"--data {spec}: {corpus / 'x.txt'} is a symlink to {tmp_path / 'gone' / 'x.txt'}, "
        "which does not exist (a mount that is not mounted, a file moved or removed): restore "
        "it, or remove the link")


@pytest.mark.parametrize("spec", ["{d}", "{d}/*", "{d}/**"])
def test_a_link_with_no_extension_whose_target_is_gone_is_named_not_passed_over(tmp_path,
                                                                                 spec):
    """A dangling link with no extension (`shard2 -> /mnt/gone`: a folder of the corpus on a
    mount that is not mounted) was passed over without a word, and the run trained on the
    rest. It is refused as a dangling corpus file is; a hidden one (`.cache`) is not read
    anyway and is still passed over."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("a paragraph\n\n")
    (corpus / ".cache").symlink_to(tmp_path / "gone" / "cache")
    spec = spec.format(d=corpus)
    assert [s.uri for s in expand_sources([spec])] == [str(corpus / "a.txt")]
    (corpus / "shard2").symlink_to(tmp_path / "gone")
    with pytest.raises(DataError) as refused:
        expand_sources([spec])
    assert str(refused.value) == (
        f"--data {spec}: {corpus / 'shard2'} is a symlink to {tmp_path / 'gone'}, which does "
        "not exist (a mount that is not mounted, a file moved or removed): restore it, or "
        "remove the link")


@pytest.mark.parametrize("spec", ["{d}", "{d}/*", "{d}/**"])
def test_a_link_of_another_type_whose_target_is_gone_is_skipped_and_named(tmp_path, spec):
    """A dangling link with a dot in its name that is no corpus file's (`wiki.en ->
    /mnt/gone`: a folder of the corpus, perhaps; `notes.md`) was passed over without a
    word, while one with no extension is refused: it is still skipped, as its file would
    be, but named in one line, as files whose names are not UTF-8 are; a hidden one
    silently. A corpus file so linked (`notes.v2.txt`) is refused."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("a paragraph\n\n")
    (corpus / "wiki.en").symlink_to(tmp_path / "gone" / "wiki.en")
    (corpus / "notes.md").symlink_to("missing.md")
    (corpus / ".hidden.b").symlink_to("missing")
    spec = spec.format(d=corpus)
    said = []
    assert [s.uri for s in expand_sources([spec], say=said.append)] == [str(corpus / "a.txt")]
    assert said == [f"--data {spec}: skipped 2 symlink(s) whose target does not exist and "
                    "that are no .txt, .jsonl, .parquet file (if one led to a folder of the "
                    f"corpus, restore it): {corpus / 'notes.md'} -> {corpus / 'missing.md'}, "
                    f"{corpus / 'wiki.en'} -> {tmp_path / 'gone' / 'wiki.en'}"]
    (corpus / "notes.v2.txt").symlink_to("missing")
    with pytest.raises(DataError, match=r"notes\.v2\.txt is a symlink to .*/missing, which "
                                        "does not exist"):
        expand_sources([spec], say=said.append)


@pytest.mark.parametrize("name", ["a.txt", "b.jsonl", "c.parquet"])
def test_a_file_gone_between_listing_and_the_head_checks_is_named(tmp_path, monkeypatch, name):
    """A file removed (a corpus being synced, rotated) or unreadable (EIO) after it was
    listed and before the driver's head checks read it: a .txt or .jsonl file's was a
    FileNotFoundError traceback from check_text_head / check_jsonl_head (a parquet file's
    was already `F: cannot read: ...`, as the pass says it)."""
    from orchestrator.training import data_plan

    path = tmp_path / "corpus" / name
    path.parent.mkdir()
    writers = {"a.txt": lambda: path.write_text(paragraphs(5, "p")),
               "b.jsonl": lambda: path.write_text('{"text": "x"}\n'),
               "c.parquet": lambda: pq.write_table(pa.table({"text": ["x"] * 10}), path)}
    writers[name]()
    real_expand = data_plan.expand_sources

    def expand_then_remove(*args, **kwargs):
        sources = real_expand(*args, **kwargs)
        os.remove(path)
        return sources
    monkeypatch.setattr(data_plan, "expand_sources", expand_then_remove)
    with pytest.raises(DataError, match=f"{path}: cannot read: .*No such file"):
        plan_data([str(path.parent)], cache_root=str(tmp_path / "cache"), train=False)


@pytest.mark.parametrize("spec", ["file://{d}", "file://{d}/*.txt", "file://{d}/**"])
def test_files_named_with_spaces_accents_or_percent_signs_are_read_through_a_uri(tmp_path,
                                                                                  spec):
    """A file found under a URI was named by its path pasted after the scheme: a name with a
    space or a letter that is not ASCII (`café.txt`, any s3:// key so named) was refused as
    `cannot open this URI: Cannot parse URI`, and one with `%` or `#` read another file or
    none (`a%20b.txt` as `a b.txt`, `x#1.txt` as `x`). Its URI is percent-encoded now."""
    corpus = tmp_path / "my corpus"
    corpus.mkdir()
    names = ["a b.txt", "a%20b.txt", "café.txt", "x#1.txt", "y [1].txt", "z%.txt"]
    for i, name in enumerate(names):
        (corpus / name).write_text(f"file {i}\n\n")
    (corpus / "x").write_text("not this one\n\n")
    spec = spec.format(d=urllib.parse.quote(str(corpus)))  # (my%20corpus)
    sources = expand_sources([spec])
    assert [next(iter_documents(s)).text for s in sources] == \
        [f"file {names.index(n)}\n\n" for n in sorted(names)]
    # the same files by path as through the URI: each read once
    assert len(expand_sources([spec, str(corpus)])) == len(names)


@pytest.mark.parametrize("spec", ["file://{d}", "file://{d}/*.txt", "file://{d}/data*",
                                  "file://{d}/data?v=?.txt"])
def test_a_file_named_like_a_uri_query_is_read_through_a_uri(tmp_path, spec):
    """A file found under a URI was named with its `?` as it is (kept for a glob's `?`), so
    `data?v=2.txt` read as the file `data` and the query `?v=2.txt`: another file, or none.
    A name found by listing has its `?` percent-encoded now; a `?` of the --data value is
    still a glob's."""
    (tmp_path / "data?v=2.txt").write_text("the query-like name\n\n")
    (tmp_path / "data").write_text("not this one\n\n")
    (tmp_path / "data?v=3.txt").write_text("the third\n\n")
    sources = expand_sources([spec.format(d=tmp_path)])
    assert [s.uri for s in sources] == [f"file://{tmp_path}/data%3Fv={v}.txt" for v in (2, 3)]
    assert [next(iter_documents(s)).text for s in sources] == \
        ["the query-like name\n\n", "the third\n\n"]
    assert len(expand_sources([spec.format(d=tmp_path), str(tmp_path)])) == 2
    # a plain name's URI (its cache key) is as it was; under s3:// the query stays last
    assert with_scheme(f"file://{tmp_path}/", f"{tmp_path}/a[1]-b.txt") == \
        f"file://{tmp_path}/a[1]-b.txt"
    uri = with_scheme("s3://b/d/?region=us-east-1", "b/d/data?v=2#1.txt")
    assert uri == "s3://b/d/data%3Fv=2%231.txt?region=us-east-1"
    assert split_uri_query(uri) == ("s3://b/d/data%3Fv=2%231.txt", "?region=us-east-1")


@pytest.mark.parametrize("spec, encoded", [
    ("file://{d}/data?v=2.txt", "file://{d}/data%3Fv=2.txt"),
    ("file://{d}/*.txt?v=2", "file://{d}/*.txt%3Fv=2"),
    ("file://{d}?region=us-east-1", "file://{d}%3Fregion=us-east-1")])
def test_a_file_uri_with_a_query_is_refused_naming_the_encoded_name(tmp_path, spec, encoded):
    """pyarrow's local filesystem takes no options and dropped a file:// URI's query without
    a word: `file://DIR/x.txt?v=2` read DIR/x.txt, `file://DIR/data?v=2.txt` (a file whose
    name holds `?`) the file `data`, or none."""
    (tmp_path / "data?v=2.txt").write_text("the query-like name\n\n")
    (tmp_path / "data").write_text("not this one\n\n")
    spec, encoded = spec.format(d=tmp_path), encoded.format(d=tmp_path)
    with pytest.raises(DataError, match=re.escape(
            f"--data {spec}: a file:// URI takes no query") + r".* %3F: " + re.escape(encoded)):
        expand_sources([spec])
    with pytest.raises(DataError, match=re.escape(f"--data-cache {spec}: a file:// URI")):
        plan_data([str(tmp_path / "data")], cache_root=spec)
    # the name it suggests is the file's
    source, = expand_sources([f"file://{tmp_path}/data%3Fv=2.txt"])
    assert next(iter_documents(source)).text == "the query-like name\n\n"


def test_an_unknown_query_of_an_object_store_uri_says_how_to_write_a_question_mark():
    """`s3://b/data?v=2.txt` (a key holding `?`) is refused by pyarrow as a query it does not
    know; the message now says how such a name is written."""
    for uri in ("s3://b/d/data?v=2.txt", "gs://b/d/data?v=2.txt"):
        with pytest.raises(DataError, match=re.escape(f"--data {uri}: cannot open this URI: ")
                           + r"Unexpected query parameter .*'v'.*written %3F"):
            expand_sources([uri])


@pytest.mark.parametrize("change", ["removed", "restored"])
def test_a_dangling_link_changed_while_its_folder_is_listed_is_named(tmp_path, monkeypatch,
                                                                     change):
    """A link whose target was gone when its folder was listed, removed or pointed at a file
    before it was named (a corpus being synced): os.readlink's FileNotFoundError or
    OSError(EINVAL) was a traceback."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("a paragraph\n\n")
    (corpus / "b.txt").symlink_to("gone.txt")
    real_listing = corpus_module._listing

    def listing_then_change(*args, **kwargs):
        found = real_listing(*args, **kwargs)
        (corpus / "b.txt").unlink()
        if change == "restored":
            (corpus / "b.txt").write_text("another paragraph\n\n")
        return found
    monkeypatch.setattr(corpus_module, "_listing", listing_then_change)
    with pytest.raises(DataError) as refused:
        expand_sources([str(corpus)])
    assert str(refused.value) == (
        f"--data {corpus}: {corpus / 'b.txt'}, a symlink whose target did not exist, changed "
        "while its folder was listed: run the command again")


@pytest.mark.parametrize("run", [" ", "\n", "\r\n", " \n", "\n \t"])
def test_a_long_run_of_spaces_or_blank_lines_is_not_held_in_memory_whole(tmp_path,
                                                                         monkeypatch, run):
    """A .txt file's run of spaces or line ends waited whole in memory for the next text
    (a cut is never placed before the text that follows: it could still move), and was
    stripped again at every read: 128 MiB of them held 577 MB (now 113 MB), and 2 MiB read
    4 KiB at a time took 0.28 s (now 0.06 s). Past a piece's hard cut (4 x MAX_DOCUMENT_CHARS) nothing that follows
    moves it: such pieces are given out as they come, at the same cuts whatever the reads."""
    size = 40 * MAX_DOCUMENT_CHARS
    text = ("a first line\nand a second\n" + run * (size // len(run)) + "then text\n\n"
            + "more\n" + run * (size // len(run)))
    (tmp_path / "a.txt").write_text(text, newline="")
    source, = expand_sources([str(tmp_path / "a.txt")])
    whole = [d.text for d in iter_documents(source)]  # (read at once: 8 MB reads)
    assert "".join(whole) == text and max(map(len, whole)) <= 8 * MAX_DOCUMENT_CHARS  # (CRLF)
    real_filesystem_for = corpus_module.filesystem_for
    read = [0]

    class Counted:
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.stream.close()

        def read(self, n):
            data = self.stream.read(n)
            read[0] += len(data)
            return data

    class CountingFs:
        def __init__(self, fs):
            self.fs = fs

        def open_input_stream(self, path):
            return Counted(self.fs.open_input_stream(path))

    monkeypatch.setattr(corpus_module, "filesystem_for",
                        lambda uri: (lambda fs, path: (CountingFs(fs), path))(
                            *real_filesystem_for(uri)))
    for chunk in (4096, 4093, 97):
        monkeypatch.setattr(corpus_module, "READ_CHUNK", chunk)
        read[0], given, docs = 0, 0, []
        for doc in iter_documents(source):
            docs.append(doc.text)
            given += len(doc.text.encode())
            assert read[0] - given <= 8 * MAX_DOCUMENT_CHARS + 2 * chunk  # (held back)
        assert docs == whole


@pytest.mark.parametrize("before,after", [("a paragraph\n\n", "then text\n"),
                                          ("a line\n", "\nthen text\n"),
                                          ("a line\r\n\t", "\r\nthen text\r\n")])
def test_a_blank_line_run_given_out_in_pieces_ends_its_paragraph_where_it_did(
        tmp_path, monkeypatch, before, after):
    """A run of spaces given out in pieces as read (the run after a blank line, or between two
    line ends) was read on from a piece's cut as if no line end came before it: the text
    after it ran on in the run's last piece, instead of opening a paragraph of its own as the
    whole text read at once has it (the document cuts, and so the held-out split, hung on the
    read size)."""
    text = before + " " * (40 * MAX_DOCUMENT_CHARS) + after
    (tmp_path / "a.txt").write_text(text, newline="")
    source, = expand_sources([str(tmp_path / "a.txt")])
    whole = [d.text for d in iter_documents(source)]
    assert "".join(whole) == text and [d for d in whole if "then" in d] == [after.lstrip()]
    for chunk in (4096, 4093, 97):
        monkeypatch.setattr(corpus_module, "READ_CHUNK", chunk)
        assert [d.text for d in iter_documents(source)] == whole


def test_an_old_mac_file_with_cr_line_ends_is_cut_as_its_lf_copy(tmp_path, monkeypatch):
    """A CR alone is a line end (as Python's universal newlines read it; a CRLF stays one):
    a .txt file with old-Mac CR line ends read as one paragraph, cut every 65,536 characters
    mid-word, each piece said to start on line 1."""
    (tmp_path / "x.txt").write_bytes(b"one\rtwo\r\rthree\r")
    source, = expand_sources([str(tmp_path / "x.txt")])
    for chunk in (corpus_module.READ_CHUNK, 1):
        monkeypatch.setattr(corpus_module, "READ_CHUNK", chunk)
        assert [(d.text, d.line) for d in iter_documents(source)] == [("one\rtwo\r\r", 1),
                                                                      ("three\r", 4)]
    lines = [f"record {i}: " + "alpha beta gamma delta "[:3 + i % 19] for i in range(6000)]
    lines[100] = lines[2000] = ""  # (blank lines: paragraph ends)
    lines[3000] = "x" * (5 * MAX_DOCUMENT_CHARS)  # no line end: the hard cut, at 4x
    docs = {}
    for name, end in (("lf.txt", "\n"), ("cr.txt", "\r"), ("crlf.txt", "\r\n")):
        text = end.join(lines) + end
        (tmp_path / name).write_bytes(text.encode())
        source, = expand_sources([str(tmp_path / name)])
        for chunk in (8 << 20, 4093):
            monkeypatch.setattr(corpus_module, "READ_CHUNK", chunk)
            got = [(d.text.replace(end, "\n"), d.line, d.eos_after, is_held_out(d.text))
                   for d in iter_documents(source)]
            assert got == docs.setdefault("lf", got), (name, chunk)
    assert len(docs["lf"]) > 10


@pytest.mark.parametrize("pattern", ["", "*", "*/*.txt"])
def test_a_folder_removed_while_data_is_listed_is_named(tmp_path, monkeypatch, pattern):
    """A folder removed (or replaced by a file) between its parent's listing and its own
    refused the whole --data value as `cannot list the files under BASE: [Errno 2] ...`, as a
    folder without permission is: it is named as changed while listed, as a dangling link
    that changed is (run the command again: the files it held are gone)."""
    corpus = tmp_path / "corpus"
    for name in ("a", "b"):
        (corpus / name).mkdir(parents=True)
        (corpus / name / f"{name}.txt").write_text("text\n")
    real_folder = corpus_module._folder

    def folder(fs, path):
        if path == str(corpus / "b"):
            (corpus / "b" / "b.txt").unlink()
            (corpus / "b").rmdir()
            if pattern == "*":
                (corpus / "b").write_text("now a file\n")
        return real_folder(fs, path)

    monkeypatch.setattr(corpus_module, "_folder", folder)
    spec = str(corpus / pattern) if pattern else str(corpus)
    with pytest.raises(DataError) as refused:
        expand_sources([spec])
    assert str(refused.value) == (
        f"--data {spec}: the folder {corpus / 'b'} was removed or replaced while --data was "
        "listed: run the command again")


def test_a_run_of_lone_crs_is_cut_in_linear_time(tmp_path):
    """A long paragraph is cut at the first line end past MAX_DOCUMENT_CHARS with text after
    it; that search looked past each line end over spaces, tabs and CRs, so in a run of CRs
    (blank lines of an old Mac file) each CR scanned the run to the window's end: 14 s for
    64 Ki of them, minutes for a few MB, where a run of LFs takes a millisecond."""
    text = "line\r" + "\r" * (4 * MAX_DOCUMENT_CHARS) + "next\r"
    (tmp_path / "a.txt").write_bytes(text.encode())
    source, = expand_sources([str(tmp_path / "a.txt")])
    started = time.monotonic()
    docs = [d.text for d in iter_documents(source)]
    assert time.monotonic() - started < 3  # (0.01 s; 14 s before)
    assert "".join(docs) == text and docs[-1] == "next\r"
