"""The user's corpus: which files `--data` names, whether they are usable, and their documents.

Pure logic (no Ray): jobs/pretrain.py checks every source here before anything starts, and
Ray Data's tokenizing tasks (ray_layer/data_ingest.py) read the documents with the same code.

A `--data` value is a file, a directory (every .txt, .jsonl and .parquet file under it), or a
glob, local or any URI pyarrow's filesystems read (`s3://bucket/prefix/*.jsonl`, `gs://`,
`file://`). Documents:
  - `.txt`: the file's paragraphs (text up to and including a blank line), so a held-out
    split by document works on a single book as on a folder of files; in each split the
    paragraphs that follow each other in the file run on, with no end-of-text between them;
  - `.jsonl`: one document per line, the string in `--text-field` (default "text");
  - `.parquet`: one document per row, the string column `--text-field`.
A bad line or row is an error naming the file and line (`--skip-bad-lines` skips and counts).

Held-out documents are chosen by a hash of their text (without the spaces and line ends
around it): about one in ten, the same on every machine and every run, every copy of a
document on the same side, and never trained on.
"""
from __future__ import annotations

import codecs
import errno
import hashlib
import heapq
import io
import json
import os
import re
import stat
import urllib.parse
from dataclasses import asdict, dataclass, replace
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.fs as pafs

from orchestrator.validation import json_parse_problem, json_type

FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}
HELD_OUT_FRACTION = 0.1
READ_CHUNK = 8 << 20  # bytes read at a time from a .txt file
PARQUET_BATCH_ROWS = 1024
# A line end is LF, CRLF, or a CR alone (an old Mac file's), as Python's universal newlines.
_LINE_END = r"(?:\r\n|\r(?!\n)|\n)"  # (the CR of a CRLF is no line end of its own)
_PARAGRAPH_END = re.compile(_LINE_END + r"[ \t]*" + _LINE_END + r"\s*")  # blank line(s)
# The same where every CR is a CRLF's (most text: 3x faster; the CRs are then spaces to it).
_LF_PARAGRAPH_END, _LONE_CR = re.compile(r"\n[ \t\r]*\n\s*"), re.compile(r"\r(?!\n)")
# A paragraph longer than this (text with no blank lines: one sentence or record per line,
# code) is cut after the first line end past it, and at 4x where no line ends: documents stay
# many enough for the held-out split and small enough to stream.
MAX_DOCUMENT_CHARS = 16 << 10  # characters (not bytes)
# A line end where a long paragraph may be cut: the next line has text, so the cut is never
# inside the blank-line run that ends a paragraph, and stays where it is when more is read.
# (Spaces and tabs alone before the text: a CR there would make a blank line, and each CR of
# a run of them scanned the run to its end, 2 G steps per 64 Ki characters of CRs.)
_LINE_CUT = re.compile(r"(?:\n|\r(?!\n))(?=[ \t]*\S)")


class DataError(ValueError):
    """The corpus cannot be used as given; the message names the file (and line) or flag."""


@dataclass(frozen=True)
class SourceFile:
    """One input file: where it is, its format, and what identifies this version of it."""

    uri: str  # local absolute path, or the URI with its scheme
    format: str  # "txt" | "jsonl" | "parquet"
    size: int
    mtime_ns: int  # modification time: a changed file gets a new cache key
    # sha256 of a local file's first and last FINGERPRINT_BYTES (content_fingerprint); ""
    # for a remote one (and in manifests from before 2026-12-07)
    fingerprint: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SourceFile":
        return cls(**data)


@dataclass(frozen=True)
class Document:
    """One document of a source file: its text and where it is in the file."""

    text: str
    index: int  # position in its file (paragraph, line or row)
    eos_after: bool  # the text runs on no further (every document but a .txt paragraph
    # before the file's last): end-of-text follows it in its split (shards.tokenize_source)
    line: int = 0  # 1-based line or row, for messages


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI pyarrow knows."""
    if "://" in uri:
        try:
            return _uri_filesystem(uri)
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError for unknown schemes
            raise DataError(f"--data {uri}: cannot open this URI: {e}"
                            f"{_QUESTION_MARK_HINT if 'query parameter' in str(e) else ''}"
                            ) from None
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


# A URI's query (`?region=us-east-1&scheme=http`): `name=value` pairs, never a glob's `?`.
_URI_QUERY = re.compile(r"\?[A-Za-z_]\w*=[^/?]*(?:&[A-Za-z_]\w*=[^/?]*)*\Z")
# What a URI's path keeps as it is when percent-encoded (with_scheme): `[`, `]`, `*` are read
# as they are (_uri_filesystem), so a plain name's URI, its cache key, is as it was.
_URI_PATH_SAFE = "/!$&'()*+,;=:@[]"
# (s3:// and gs:// refuse a query they do not know: `s3://b/data?v=2.txt`, a key with `?`)
_QUESTION_MARK_HINT = "; a '?' in a file's name is written %3F"


def _uri_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow's FileSystem.from_uri, with a glob's wildcards kept in the path: it read a `?`
    as the start of a query (`file:///data/part-?.jsonl` became the folder /data, every file
    in it; `s3://` refused it) and refused a `[` (`part-[0-4].jsonl`). The part before the
    first wildcard's folder is the URI pyarrow parses; the rest is appended to its path."""
    body, query = split_uri_query(uri)
    after_scheme = body.index("://") + 3
    wildcards = [i for i, ch in enumerate(body) if ch in "*?[" and i >= after_scheme]
    head = body[:wildcards[0]].rsplit("/", 1)[0] if wildcards else body
    if not wildcards or len(head) <= after_scheme:  # none, or in the bucket or host name
        return pafs.FileSystem.from_uri(uri)
    fs, base = pafs.FileSystem.from_uri(head + query)
    return fs, base.rstrip("/") + urllib.parse.unquote(body[len(head):])  # (as from_uri
    # decodes: a file's URI is percent-encoded, with_scheme)


def split_uri_query(uri: str) -> tuple[str, str]:
    """(the URI without its query, the query with its "?", or "") of a URI whose query is
    `name=value` pairs (`s3://bucket/data?endpoint_override=host:9000`); a glob's `?` is not
    one."""
    query = _URI_QUERY.search(uri) if "://" in uri else None
    return (uri[:query.start()], query.group(0)) if query else (uri, "")


def refuse_file_uri_query(value: str, flag: str) -> None:
    """Refuse a file:// URI with a query (`file:///d/x.txt?v=2`): pyarrow's local filesystem
    takes no options and dropped it without a word (reading /d/x.txt), and a name holding
    `?` typed as it is (`file:///d/data?v=2.txt`) read the file `data`, or none. The message
    gives the URI with the query's `?` percent-encoded, the name such a file has."""
    body, query = split_uri_query(value)
    if query and value.startswith("file://"):
        raise DataError(f"{flag} {value}: a file:// URI takes no query ({query}: the local "
                        f"filesystem has no options){_QUESTION_MARK_HINT}: "
                        f"{body}{urllib.parse.quote(query, safe=_URI_PATH_SAFE)}")


def with_scheme(original: str, path: str) -> str:
    """The URI of `path` on the same filesystem as `original` (keeps s3://, file://, ..., and
    the query that configures it: a file under `s3://b/d?endpoint_override=...` was named
    without it, and read from AWS's endpoint). The path is percent-encoded, but for `[`,
    `]`, `*` (_uri_filesystem reads them as they are: a plain name's URI, its cache key, is
    as it was), so that the URI parses back to it: a name with a space or a letter that is
    not ASCII (`café.txt`) was refused as a URI that does not parse, one with `%`, `#` or
    `?` read another file (`data?v=2.txt` as `data` and a query)."""
    if "://" not in original:
        return path
    scheme = original.split("://", 1)[0]
    path = urllib.parse.quote(path, safe=_URI_PATH_SAFE)
    return f"{scheme}://{path}{split_uri_query(original)[1]}" if scheme != "file" \
        else f"file://{path}"


def _format_of(path: str) -> str | None:
    return FORMATS.get(os.path.splitext(path)[1].lower())


def expand_sources(specs: list[str], say: Callable[[str], None] = print
                   ) -> list[SourceFile]:
    """Every file the `--data` values name, sorted and without duplicates; DataError naming the
    value at fault when one names nothing usable (missing, empty, unknown format). `say`
    names the files skipped because their names are not UTF-8 (_usable_files)."""
    found: dict[str | tuple[int, int], SourceFile] = {}
    for spec in specs:
        if not isinstance(spec, str) or not spec.strip():
            raise DataError(f"--data must be a path, directory, glob or URI, got {spec!r}")
        refuse_non_utf8_path(spec, "--data")
        refuse_file_uri_query(spec, "--data")
        for source in _expand_one(spec, say):
            # One file named twice is kept under its first name in sorted order, whatever
            # the order of the --data values (the cache key holds the name).
            real = _real_location(source.uri)
            if real not in found or source.uri < found[real].uri:
                found[real] = source
    return sorted(found.values(), key=lambda s: s.uri)


def _real_location(uri: str) -> str | tuple[int, int]:
    """What a file is, however it was named: a local file's device and inode (through
    symlinks, hard links and file://), so one file named twice (a `latest -> v3` link, a
    snapshot tree of hard links, a path and its URI) is read once; hard links were read
    once each. Its real path where the filesystem gives no inode numbers (0: some FUSE and
    network mounts), where (device, 0) made every file one."""
    if "://" in uri and not uri.startswith("file://"):
        return uri
    path = urllib.parse.unquote(uri.removeprefix("file://"))  # (with_scheme's encoding)
    try:
        status = os.stat(path)
    except OSError:  # (gone since listed: named by the checks)
        return os.path.realpath(path)
    return (status.st_dev, status.st_ino) if status.st_ino else os.path.realpath(path)


def _expand_one(spec: str, say: Callable[[str], None]) -> list[SourceFile]:
    fs, path = filesystem_for(spec)
    info = _file_info(fs, path, spec)
    # A path that exists is itself even with glob characters in its name ("corpus[2024]").
    if info.type == pafs.FileType.NotFound and any(ch in path for ch in "*?["):
        return _expand_glob(spec, fs, path, say)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"--data {spec}: no such file or directory")
    if info.type == pafs.FileType.Directory:
        infos = _usable_files(spec, [i for i in _listing(fs, path, spec)
                                     if i.type == pafs.FileType.File
                                     and not _hidden_below(path, i.path)], say)
        _refuse_compressed(spec, [i.path for i in infos])
        sources = [_source(spec, i) for i in sorted(infos, key=lambda i: i.path)
                   if _format_of(i.path)]
        if not sources:
            raise DataError(f"--data {spec}: the directory holds no "
                            f"{', '.join(FORMATS)} files")
        return [_checked(s, spec) for s in sources]
    if info.type != pafs.FileType.File:
        raise DataError(f"--data {spec}: {path} is not a regular file{_special_kind(fs, path)}")
    _refuse_compressed(spec, [path])
    if _format_of(path) is None:
        raise DataError(f"--data {spec}: unknown file type; expected one of "
                        f"{', '.join(FORMATS)}")
    return [_checked(_source(spec, info), spec)]


def _special_kind(fs: pafs.FileSystem, path: str) -> str:
    """What a local path that is not a regular file is, as " (a FIFO)", from its status
    alone (opening a FIFO blocks until a writer comes); "" when not told."""
    if not isinstance(fs, pafs.LocalFileSystem):
        return ""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return ""
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return next((f" ({name})" for test, name in kinds if test(mode)), "")


COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".zip")


def _refuse_compressed(spec: str, paths: list[str]) -> None:
    """Compressed corpus files (part-00000.jsonl.gz) are not read: refused by name rather
    than passed over, which left a folder's LICENSE.txt as the whole corpus."""
    compressed = sorted(p for p in paths if _compressed_corpus(p))
    if compressed:
        names = ", ".join(os.path.basename(p) for p in compressed[:3])
        more = f" and {len(compressed) - 3} more" if len(compressed) > 3 else ""
        raise DataError(f"--data {spec}: compressed files are not read ({names}{more}): "
                        f"decompress them to {', '.join(FORMATS)} first")


def _compressed_corpus(path: str) -> bool:
    """Whether a file is a corpus file compressed (`part-00000.jsonl.gz`)."""
    return path.lower().endswith(COMPRESSED) and bool(_format_of(os.path.splitext(path)[0]))


def _hidden_below(base: str, path: str) -> bool:
    """Whether a file or folder below `base` on the way to `path` is hidden (a name starting
    with "."): editors' and notebooks' copies (.ipynb_checkpoints/) are not the corpus."""
    below = path[len(base.rstrip("/")) + 1:] if path.startswith(base.rstrip("/") + "/") else path
    return any(part.startswith(".") for part in below.split("/"))


def _glob_regex(pattern: str) -> re.Pattern:
    """A glob as a shell reads it: `*` and `?` stay within a folder, `**` crosses folders
    (`**/` also matches none), `[...]` / `[!...]` a set of characters other than `/` (a `]`
    first in it is one of them). ValueError for a pattern that is not a glob."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] in "*?":
            out.append("[^/]*" if pattern[i] == "*" else "[^/]")
            i += 1
        elif pattern[i] == "[" and (end := _class_end(pattern, i)) is not None:
            body = pattern[i + 1:end]
            negate = body[:1] in ("!", "^")
            # Ranges (a-z) stay ranges; what else regex reads in a set is a plain character.
            chars = "".join("\\" + c if c in "\\[]^&~|" else c for c in body[negate:]
                            if c != "/")
            out.append("[^/" + chars + "]" if negate else f"[{chars}]" if chars else "(?!)")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    try:
        return re.compile("".join(out) + r"\Z")
    except re.error as e:
        raise ValueError(str(e)) from None


def _class_end(pattern: str, start: int) -> int | None:
    """Where the character class opened at `start` closes (None: `[` is a plain character)."""
    j = start + 1
    if pattern[j:j + 1] in ("!", "^"):
        j += 1
    if pattern[j:j + 1] == "]":
        j += 1
    end = pattern.find("]", j)
    return None if end == -1 else end


def _names_hidden(pattern: str) -> bool:
    """Whether a glob asks for dot-names itself (a part starting with "."), as a shell's does."""
    return any(part.startswith((".", "[.")) for part in pattern.split("/")
               if part not in (".", ".."))


def _expand_glob(spec: str, fs: pafs.FileSystem, pattern: str, say: Callable[[str], None]
                 ) -> list[SourceFile]:
    # The directory above the first wildcard is listed; the pattern is matched on full paths.
    base = pattern[:min(pattern.index(ch) for ch in "*?[" if ch in pattern)].rsplit("/", 1)[0]
    base = base or "/"
    if _file_info(fs, base, spec).type != pafs.FileType.Directory:
        raise DataError(f"--data {spec}: no such directory {base}")
    below = pattern[len(base):].strip("/")
    try:
        matches = _glob_regex(pattern.rstrip("/")).match
        # (a folder whose name is not UTF-8 cannot be listed: refused where the pattern
        # reaches into it, its first parts match it)
        reaches = [_glob_regex("/".join([base.rstrip("/")] + below.split("/")[:level + 1]))
                   .match for level in range(below.count("/"))]
    except ValueError as e:
        raise DataError(f"--data {spec}: not a usable pattern ({e})") from None
    # Only as deep as the pattern reaches: `data/*.jsonl` listed all of data/ and below
    # (minutes over a home directory), and failed on a folder it never needed (a mount's
    # lost+found that only root reads).
    recursive = "**" in below
    infos = _listing(fs, base, spec, None if recursive else below.count("/") + 1,
                     lambda folder, level: bool(reaches[level](folder)))
    hidden_too = _names_hidden(pattern[len(base):])
    # `data/part-*/`: folders only, as a shell reads it (a local path lost its "/" above)
    folders_only = split_uri_query(spec)[0].endswith("/")
    found = {i.path: i for i in infos
             if i.type in (pafs.FileType.File, pafs.FileType.Directory)
             and matches(i.path)
             and (i.type == pafs.FileType.Directory or not folders_only)
             and (hidden_too or not _hidden_below(base, i.path))}
    # A folder the pattern matches is read as a directory value: every file under it (its
    # hidden ones skipped). It was passed over: `data/*` over folders matched "no files".
    # The folders are listed together, each real folder once (_tree): folders linked to
    # each other were listed once per folder matched (n^2 listings for n such folders).
    folders = sorted(i.path for i in found.values() if i.type == pafs.FileType.Directory)
    for folder in found.values():
        if isinstance(folder, _Unnamed) and folder.type == pafs.FileType.Directory \
                and not recursive:
            raise folder.refusal(spec)  # (cannot be listed)
    under = infos if recursive or not folders else _listing(fs, folders, spec)
    for folder in folders:
        found.update((i.path, i) for i in under if i.path.startswith(folder + "/")
                     and not _hidden_below(folder, i.path))
    matched = _usable_files(spec, [i for _, i in sorted(found.items())
                                   if i.type == pafs.FileType.File], say)
    _refuse_compressed(spec, [i.path for i in matched])
    usable = [i for i in matched if _format_of(i.path)]
    if not usable:
        raise DataError(f"--data {spec}: the pattern matches no {', '.join(FORMATS)} files"
                        + (f" ({len(matched)} other file(s))" if matched else ""))
    return [_checked(_source(with_scheme(spec, i.path), i), spec) for i in usable]


def _listing(fs: pafs.FileSystem, base: str | list[str], spec: str, depth: int | None = None,
             into: Callable[[str, int], bool] = lambda folder, level: True) -> list:
    """What is under the folder `base`: everything (depth None), or `depth` levels of it
    (1: its own entries), a name that is not UTF-8 as an _Unnamed entry (_named); everything
    under each of a list of folders (listed together: _tree). DataError
    naming --data when a folder cannot be listed (no permission): pyarrow's OSError left the
    job as a traceback; or when a folder to list has a name that is not UTF-8 (pyarrow takes
    UTF-8 paths only): one that `into(folder, level)` (level 0: `base`'s own) says is not
    needed is passed over."""
    try:
        if depth is None:
            return _tree(fs, [base] if isinstance(base, str) else base)
        found, folders = [], [base]
        for level_no in range(depth):
            level = [i for folder in folders for i in _folder(fs, folder)]
            found += level
            folders = [i.path for i in level if i.type == pafs.FileType.Directory]
            for i in level:
                if isinstance(i, _Unnamed) and i.type == pafs.FileType.Directory:
                    folders.remove(i.path)
                    if level_no + 1 < depth and into(i.path, level_no):
                        raise i.refusal(spec)
        return found
    except OSError as e:
        if isinstance(e, (FileNotFoundError, NotADirectoryError)) and e.filename:  # (_folder)
            raise DataError(f"--data {spec}: the folder {e.filename} was removed or replaced "
                            "while --data was listed: run the command again") from None
        where = base if isinstance(base, str) else os.path.commonpath(base)
        raise DataError(f"--data {spec}: cannot list the files under {where}: {e}") from None


def _tree(fs: pafs.FileSystem, bases: list[str]) -> list:
    """Everything under the folders `bases` (_listing). pyarrow's recursive listing follows a
    symlink to a folder above it (`up -> ..`) until the kernel's ELOOP, 40 levels deep: every
    file listed 40 times, and with two such links 2^40 listings (a run that never started).
    On a local disk the folders are listed one by one instead, in sorted order of their
    paths (the hidden ones last), and each real folder once: under the first of its names
    (`latest -> v3`: as latest/), a folder reached again through a symlink (`up -> ..`,
    sibling folders linked to each other, which were listed once per path through the
    links: exponentially many) is not listed again; its files, the same files, are kept
    under the first name anyway (expand_sources). Several folders (those a glob matches)
    are listed as one: a real folder under two of them is listed once too. Object storage
    has no links, and one request lists each folder."""
    if fs.type_name != "local":
        return [i for base in bases
                for i in _named(fs.get_file_info(pafs.FileSelector(base, recursive=True)))]
    # ((hidden, path), its real path or None, the folder: its path, or its name's bytes): a
    # folder's contents sort after it, so the folders come out in sorted order, the hidden
    # ones last (`data -> .store/data` is listed as data/: the hidden name is passed over);
    # and the folder of `bases` it is under, which says what is hidden
    found, listed = [], set()
    pending = [((False, base), os.path.realpath(base), base, base) for base in bases]
    heapq.heapify(pending)
    while pending:
        _, real, folder, base = heapq.heappop(pending)
        if real in listed:
            continue
        if real is not None:
            listed.add(real)
        level = _folder(fs, folder) if isinstance(folder, str) else _unnamed_tree(folder)
        found += level
        for info in level:
            if info.type != pafs.FileType.Directory:
                continue
            key = (_hidden_below(base, info.path), info.path)
            if isinstance(info, pafs.FileInfo):
                heapq.heappush(pending, (key, os.path.realpath(info.path), info.path, base))
            elif isinstance(folder, str):  # (pyarrow takes UTF-8 paths only)
                heapq.heappush(pending, (key, None, info.raw, base))
    return found


def _folder(fs: pafs.FileSystem, folder: str) -> list:
    """A folder's own entries (_named) and, on a local disk, each symlink in it whose target
    does not exist, as a _Dangling entry: pyarrow's listing leaves those out, and a corpus of
    links into a mount that was not mounted trained on what was left without a word. A
    folder gone since it was found raises pyarrow's error with `filename` set (_listing)."""
    try:
        listed = _named(fs.get_file_info(pafs.FileSelector(folder)))
    except (FileNotFoundError, NotADirectoryError) as e:  # (removed since it was found)
        e.filename = folder  # (pyarrow's names it in its text alone)
        raise
    if fs.type_name != "local":
        return listed
    try:
        with os.scandir(folder) as entries:
            gone = [e.path for e in entries if e.is_symlink() and not os.path.exists(e.path)]
    except OSError:  # (listed above: gone since)
        return listed
    return listed + [_Dangling(path) for path in gone if _is_utf8(path)]  # (a name that is
    # not UTF-8 is left to pyarrow's listing: _Unnamed)


def _is_utf8(path: str) -> bool:
    """Whether a path os.scandir gave holds no bytes that are not UTF-8 (surrogate escapes)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class _Dangling:
    """A local symlink whose target cannot be reached (_folder): gone, a loop of links."""

    path: str
    type: pafs.FileType = pafs.FileType.File

    @property
    def target(self) -> str | None:
        """Where the link leads; None where it is no link any more (removed, or replaced by
        a file, since its folder was listed: os.readlink's error was a traceback)."""
        try:
            return os.path.normpath(os.path.join(os.path.dirname(self.path),
                                                 os.readlink(self.path)))
        except OSError:
            return None

    def refusal(self, spec: str) -> DataError:
        if self.target is None:
            return DataError(f"--data {spec}: {self.path}, a symlink whose target did not "
                             "exist, changed while its folder was listed: run the command "
                             "again")
        why = ("does not exist (a mount that is not mounted, a file moved or removed): restore "
               "it, or remove the link")
        try:
            os.stat(self.path)
        except OSError as e:  # (links to each other: "does not exist" named one that does)
            if e.errno == errno.ELOOP:
                why = ("leads round a loop of symlinks back to itself: point it at the file, "
                       "or remove the link")
            elif e.errno != errno.ENOENT:
                why = f"cannot be reached ({e.strerror}): make it readable, or remove the link"
        return DataError(f"--data {spec}: {self.path} is a symlink to {self.target}, "
                         f"which {why}")


def _unnamed_tree(raw: bytes) -> list:
    """The files under a local folder whose name is not UTF-8 (pyarrow cannot list it), as
    _Unnamed entries (every path below it holds its name); symlinks to folders in it are not
    followed."""
    files = [os.path.join(folder, name) for folder, _, names in os.walk(raw) for name in names]
    return [_Unnamed(path, _first_bad_byte(path), pafs.FileType.File) for path in files]


def _first_bad_byte(raw: bytes) -> int:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start
    return 0


@dataclass(frozen=True)
class _Unnamed:
    """A listed file or folder whose name is not UTF-8 (a Latin-1 name from an old archive or
    a Windows share): pyarrow decodes a listed name only when asked, and the
    UnicodeDecodeError was a traceback wherever it was first asked. `path` holds the bytes
    that are not UTF-8 as surrogate escapes, so that extensions, hidden names and globs read
    it as any other."""

    raw: bytes
    bad: int  # the first byte that is not UTF-8
    type: pafs.FileType

    @property
    def path(self) -> str:
        return self.raw.decode("utf-8", errors="surrogateescape")

    @property
    def shown(self) -> str:
        return self.raw.decode("utf-8", errors="backslashreplace")

    def refusal(self, spec: str) -> DataError:
        return DataError(f"--data {spec}: the name of {_not_utf8(self.raw, self.bad)}, or "
                         "move it out of the way")


def _named(infos: list[pafs.FileInfo]) -> list:
    """`infos`, each whose name is not UTF-8 as an _Unnamed entry."""
    named = []
    for info in infos:
        try:
            info.path
            named.append(info)
        except UnicodeDecodeError as e:
            named.append(_Unnamed(bytes(e.object), e.start, info.type))
    return named


def _usable_files(spec: str, files: list, say: Callable[[str], None]) -> list:
    """`files` (those a --data value lists) without the ones whose names are not UTF-8 and
    the symlinks whose targets are gone: DataError naming the first that is a corpus file
    (compressed too: it would be read, or refused), or a link whose target is gone that has
    no extension and is not hidden (`shard2 -> /mnt/gone`: a folder of the corpus, perhaps;
    passed over without a word until the fourth session of 2026-12-07); those whose names
    are not UTF-8 skipped
    are named through `say` (a stray one, `caf\xe9.bak`, refused the whole value until
    2026-12-07, even a glob that would not read it), and so are the other links whose
    targets are gone (`wiki.en -> /mnt/gone`, perhaps a folder of the corpus; passed over
    without a word until the fifth session of 2026-12-07), hidden ones silently."""
    for f in files:
        if isinstance(f, (_Unnamed, _Dangling)) and (_format_of(f.path)
                                                     or _compressed_corpus(f.path)):
            raise f.refusal(spec)
        if isinstance(f, _Dangling) and not os.path.splitext(f.path)[1] \
                and not os.path.basename(f.path).startswith("."):
            raise f.refusal(spec)
    unnamed = [f for f in files if isinstance(f, _Unnamed)]
    if unnamed:
        names = sorted(f.shown for f in unnamed)
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        say(f"--data {spec}: skipped {len(unnamed)} file(s) whose name is not UTF-8 and that "
            f"are no {', '.join(FORMATS)} file: {', '.join(names[:3])}{more}")
    gone = [f for f in files if isinstance(f, _Dangling)
            and not os.path.basename(f.path).startswith(".")]
    if gone:
        links = sorted(f"{f.path} -> {f.target or '?'}" for f in gone)
        more = f" and {len(links) - 3} more" if len(links) > 3 else ""
        say(f"--data {spec}: skipped {len(gone)} symlink(s) whose target does not exist and "
            f"that are no {', '.join(FORMATS)} file (if one led to a folder of the corpus, "
            f"restore it): {', '.join(links[:3])}{more}")
    return [f for f in files if isinstance(f, pafs.FileInfo)]


def refuse_non_utf8_path(value: str, flag: str) -> None:
    """DataError naming `flag` when the path given is not UTF-8 (a Latin-1 name, which
    Python's argv keeps as surrogate escapes): pyarrow, which reads --data and --data-cache,
    takes UTF-8 paths only, and its UnicodeEncodeError was a traceback."""
    raw = os.fsencode(value)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{flag}: the name of {_not_utf8(raw, e.start)}") from None


def _not_utf8(raw: bytes, bad: int) -> str:
    """A path whose byte `bad` is not UTF-8, shown, and what to do."""
    return (f"{raw.decode('utf-8', errors='backslashreplace')} is not UTF-8 (byte "
            f"0x{raw[bad]:02x}): rename it to UTF-8 (convmv -f latin1 -t utf8 --notest)")


def _file_info(fs: pafs.FileSystem, path: str, spec: str) -> pafs.FileInfo:
    try:
        return fs.get_file_info(path)
    except OSError as e:
        raise DataError(f"--data {spec}: cannot read: {e}") from None


def _source(spec_or_uri: str, info: pafs.FileInfo) -> SourceFile:
    uri = with_scheme(spec_or_uri, info.path) if "://" in spec_or_uri else info.path
    return SourceFile(uri=uri, format=_format_of(info.path), size=int(info.size or 0),
                      mtime_ns=int(info.mtime_ns or 0))


def _checked(source: SourceFile, spec: str) -> SourceFile:
    """Refuse an empty or unreadable file, or a parquet file whose footer does not parse;
    a local file is returned with its content fingerprint."""
    if source.size == 0:
        raise DataError(f"--data {spec}: file {source.uri} is empty")
    fs, path = filesystem_for(source.uri)
    try:
        if _is_local(source):
            source = replace(source, fingerprint=content_fingerprint(fs, path, source.size))
        else:
            with fs.open_input_stream(path) as f:
                f.read(1)
    except OSError as e:
        raise DataError(f"--data {spec}: cannot read file {source.uri}: {e}") from None
    if source.format == "parquet":
        _parquet_file(source)
    return source


# A local file's first and last this many bytes are hashed into the cache key: a file
# rewritten at the same size with its modification time put back (`cp -p`, `rsync --times`,
# `touch -d`) kept its key and its old shards. Two reads per file (planning a cache hit of a
# 1 GB corpus of 32 files: 0.027 s, was 0.022 s); a change between them is still not seen.
FINGERPRINT_BYTES = 64 << 10


def content_fingerprint(fs: pafs.FileSystem, path: str, size: int) -> str:
    """sha256 (hex) of the file's first and last FINGERPRINT_BYTES (all of a file up to
    twice that), with its size."""
    digest = hashlib.sha256(str(size).encode())
    with fs.open_input_file(path) as f:
        digest.update(f.read(min(size, FINGERPRINT_BYTES)))
        tail = max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES)
        if tail < size:
            f.seek(tail)
            digest.update(f.read(size - tail))
    return digest.hexdigest()


def _parquet_file(source: SourceFile):
    import pyarrow.parquet as pq

    fs, path = filesystem_for(source.uri)
    try:
        handle = fs.open_input_file(path)
    except OSError as e:  # removed since planning, no access, a storage error
        raise _cannot_read(source, e) from None
    try:
        return pq.ParquetFile(handle)
    except Exception as e:  # ArrowInvalid: no parquet footer
        raise _parquet_error(source, e, "not a readable parquet file") from None


def _parquet_error(source: SourceFile, error: Exception, what: str) -> DataError:
    """A parquet read's error as `what` (not parquet, corrupt data), or as the other formats'
    "cannot read" for an I/O error of the system (errno: removed, EIO, ESTALE): those were
    reported as corrupt data. pyarrow raises OSError without errno both for data that does
    not decode ("Couldn't deserialize thrift") and for object storage errors: said so."""
    if isinstance(error, OSError) and error.errno is not None:
        return _cannot_read(source, error)
    if isinstance(error, OSError):
        what += ", or a storage read error"
    return DataError(f"{source.uri}: {what}: {error}")


def check_text_column(source: SourceFile, text_field: str) -> None:
    """A parquet file must have the text column, of strings (checked from its footer, nothing
    read): a binary or list column passed, and then every row failed after Ray started."""
    schema = _parquet_file(source).schema_arrow
    if text_field not in schema.names:
        raise DataError(f"{source.uri}: no column {text_field!r} (--text-field); columns: "
                        f"{', '.join(schema.names[:20])}")
    kind = schema.field(schema.names.index(text_field)).type
    if not _holds_strings(kind):
        hint = ("write the text as a string (UTF-8) column" if _holds_bytes(kind) else
                "write one string per row (join the list)" if pa.types.is_list(kind)
                or pa.types.is_large_list(kind) else "give the column that holds the text")
        raise DataError(f"{source.uri}: column {text_field!r} (--text-field) holds {kind}, "
                        f"not strings; {hint}")


def _values(kind: pa.DataType) -> pa.DataType:
    """The type of a column's values: a dictionary's are its value type's."""
    return kind.value_type if pa.types.is_dictionary(kind) else kind


def _holds_strings(kind: pa.DataType) -> bool:
    """Whether an Arrow type reads as Python strings: string, large_string, string_view, or
    a dictionary of those."""
    kind = _values(kind)
    return (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_string_view(kind))


def _holds_bytes(kind: pa.DataType) -> bool:
    """Whether an Arrow type holds bytes (text written without its encoding): binary,
    large_binary, binary_view, fixed_size_binary, or a dictionary of those."""
    kind = _values(kind)
    return (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
            or pa.types.is_binary_view(kind) or pa.types.is_fixed_size_binary(kind))


TEXT_HEAD_BYTES = 64 * 1024  # what check_text_head reads of a local text file
# check_jsonl_head reads on to the end of the line the 64 KiB mark cuts, up to this much: a
# first line longer than 64 KiB (a book a line) was not checked at all.
JSONL_HEAD_MAX_BYTES = 16 << 20
# A .jsonl line longer than this is refused, not read: a .json file (one array on one line,
# or an object over many) saved as .jsonl was read whole into memory as one line.
JSONL_LINE_MAX_BYTES = 256 << 20


def _is_local(source: SourceFile) -> bool:
    """Whether a file is read here without a request (the head checks skip remote files: a
    request per file in the driver; the tokenizing pass names their problems)."""
    return "://" not in source.uri or source.uri.startswith("file://")


def _read_head(source: SourceFile) -> bytes:
    fs, path = filesystem_for(source.uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read(TEXT_HEAD_BYTES)
    except OSError as e:  # removed since listed, EIO: was a traceback from the driver
        raise _cannot_read(source, e) from None


def _cannot_read(source: SourceFile, error: OSError) -> DataError:
    """A file that could not be read (removed since it was listed, no access, EIO), named."""
    return DataError(f"{source.uri}: cannot read: {error}")


def check_text_head(source: SourceFile) -> None:
    """A local text file must start as UTF-8 (its first 64 KiB, read in the driver): a binary
    or Latin-1 file was named only by a tokenizing task, after Ray had started."""
    if source.format != "txt" or not _is_local(source):
        return
    head = _read_head(source)
    if _known_start(head[:MAGIC_BYTES]) is None:  # (UTF-16 with its mark, compressed: below)
        _refuse_nul(source, head, 0, 0)
    try:  # not final: a character cut at the 64 KiB mark is not an error
        codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < TEXT_HEAD_BYTES)
    except UnicodeDecodeError as e:
        line = _txt_line_ends(head, e.start) + 1
        raise DataError(f"{source.uri}:{line}: not UTF-8 text near byte {e.start}"
                        f"{_encoding_hint(head)}") from None


# How a file that is not text starts: compressed data under a text file's name
# (part-00000.jsonl holding gzip), which read as "not UTF-8 near byte 1", naming neither.
COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd", b"BZh": "bzip2",
                    b"\xfd7zXZ\x00": "xz", b"\x04\x22\x4d\x18": "lz4", b"PK\x03\x04": "zip"}
MAGIC_BYTES = 6  # the longest of them


def _known_start(start: bytes) -> str | None:
    """The hint for a file starting as UTF-16 or compressed data, or None."""
    if start.startswith((b"\xff\xfe", b"\xfe\xff")):
        return " (it starts with a UTF-16 byte-order mark: the file is UTF-16); save it as UTF-8"
    kind = next((k for magic, k in COMPRESSED_MAGIC.items() if start.startswith(magic)), None)
    return None if kind is None else (f" (it starts as {kind} data: the file is compressed); "
                                      "decompress it first")


def _nul_problem(data: bytes, file_start: bool) -> tuple[int, str] | None:
    """(where the first NUL byte is, what the bytes are) when NUL bytes are 1% or more of the
    4 KiB from the first one in `data` (a file's start when `file_start`, or a chunk of it);
    None otherwise. Text holds no NUL bytes, but they are valid UTF-8: UTF-16 saved without
    a byte-order mark (Python's "utf-16-le", many exporters) read as UTF-8 as a NUL after
    every ASCII letter, and was tokenized silently as garbage. A NUL on every other byte is
    UTF-16 (little-endian when the file's first byte is text and its second a NUL,
    big-endian the other way round); anything else, binary data."""
    at = data.find(0)
    if at < 0:
        return None
    # 4 KiB from the first NUL, or, short of them past it, the data's last 4 KiB from an even
    # distance before it (one NUL in a file's last bytes was most of a window of a few)
    short = at + 4096 - len(data)
    begin = at if short <= 0 else max(at % 2, at - short // 2 * 2)
    window = data[begin:begin + 4096]
    nul = window.count(0)
    if nul * 100 < len(window):
        return None
    if window[0::2].count(0) * 10 >= len(window) * 3 // 2 and window[1::2].count(0) * 10 <= nul:
        name = ("UTF-16-LE" if at == 1 else "UTF-16-BE" if at == 0 else "UTF-16") \
            if file_start else "UTF-16"
        return at, (f"NUL bytes on every other byte: it reads as {name} text saved without a "
                    "byte-order mark; save it as UTF-8")
    return at, (f"{nul:,} NUL bytes in {len(window):,}: binary data, not text (or text in "
                "UTF-16 or UTF-32): save it as UTF-8")


def _refuse_nul(source: SourceFile, data: bytes, lines_before: int, bytes_before: int,
                cr_before: bool = False) -> None:
    """DataError naming the file, the line and the byte of `data` (a file's head or one of
    its chunks, after `lines_before` line ends and `bytes_before` bytes, the last a CR not
    counted yet when `cr_before`) where NUL bytes say the text is not UTF-8 (_nul_problem).
    Lines are counted as the file's reader cuts them: a lone CR ends a .txt line too."""
    problem = _nul_problem(data, file_start=not bytes_before)
    if problem is not None:
        at, why = problem
        line = lines_before + 1 + (_txt_line_ends(data, at, cr_before)
                                   if source.format == "txt" else data.count(b"\n", 0, at))
        raise DataError(f"{source.uri}:{line}: not UTF-8 text near byte {bytes_before + at}: "
                        f"{why}")


def _encoding_hint(start: bytes) -> str:
    """What to do about text that is not UTF-8, from how the file starts: a UTF-16 file (what
    Windows Notepad saves as "Unicode") was "not UTF-8 near byte 0", which says nothing of it."""
    return _known_start(start) or "; save it as UTF-8"


def _read_jsonl_head(source: SourceFile) -> tuple[list[bytes], bytes]:
    """(the complete lines, what follows them unfinished) of a .jsonl file's first 64 KiB and
    on to the end of the line that mark cuts, reading JSONL_HEAD_MAX_BYTES at most."""
    try:
        return _jsonl_head(source)
    except OSError as e:  # removed since listed, EIO: was a traceback from the driver
        raise _cannot_read(source, e) from None


def _jsonl_head(source: SourceFile) -> tuple[list[bytes], bytes]:
    fs, path = filesystem_for(source.uri)
    with fs.open_input_stream(path) as f:
        head = bytearray(f.read(TEXT_HEAD_BYTES))
        while (len(head) >= TEXT_HEAD_BYTES and len(head) < JSONL_HEAD_MAX_BYTES
               and b"\n" not in head[TEXT_HEAD_BYTES - 1:]):
            chunk = f.read(min(TEXT_HEAD_BYTES, JSONL_HEAD_MAX_BYTES - len(head)))
            if not chunk:
                break
            head += chunk
        # Up to the end of the line the 64 KiB mark cuts, not the whole chunk read past it:
        # the lines after are the tokenizing pass's to check, as before.
        cut = head.find(b"\n", TEXT_HEAD_BYTES - 1)
        beyond = cut >= 0 and cut + 1 < len(head)
        if cut >= 0:
            del head[cut + 1:]
        more = beyond or bool(f.read(1))
    lines = bytes(head).split(b"\n")
    return (lines[:-1], lines[-1]) if more else (lines, b"")


def _unfinished_first_line(source: SourceFile, start: bytes) -> None:
    """A first line longer than the head check reads: what its first character says (a .json
    file's array, "[", is no JSON Lines object)."""
    first = start.removeprefix(b"\xef\xbb\xbf").lstrip()[:1]
    if first and first != b"{":
        _bad(source, 1, f"not a JSON object: a line of over {_mib(JSONL_HEAD_MAX_BYTES)} that "
             f"starts with {first.decode('latin-1')!r}", skip=False, skipped=[])


def _mib(size: int) -> str:
    return f"{size / 2**20:g} MiB"


def check_jsonl_head(source: SourceFile, text_field: str, skip_bad_lines: bool) -> None:
    """A local .jsonl file's complete lines within its first 64 KiB (and the line that mark
    cuts), checked in the driver as the tokenizing pass checks every line, so that a wrong
    --text-field is named before Ray starts: without --skip-bad-lines the first bad line there
    is refused; with it, a head in which every line is an object without the field (a wrong
    --text-field: it would skip the whole file). Other bad lines are what --skip-bad-lines is
    for, even a head of them."""
    if source.format != "jsonl" or not _is_local(source):
        return
    lines, unfinished = _read_jsonl_head(source)
    first = lines[0] if lines else unfinished  # (as the pass: a later line's NULs are that
    if _known_start(first[:MAGIC_BYTES]) is None:  # line's; the first's, a whole file so)
        _refuse_nul(source, first, 0, 0)
    if not lines and not skip_bad_lines:
        _unfinished_first_line(source, unfinished)
    lacking, others = [], 0
    for line_no, data in enumerate(lines, start=1):
        text, problem = _jsonl_record(data, text_field)
        if problem and not skip_bad_lines:
            _bad(source, line_no, problem, skip=False, skipped=[])
        if isinstance(problem, MissingField):
            lacking.append(f"line {line_no}: {problem}")
        elif problem or text is not None:
            others += 1
    if lacking and not others:
        raise DataError(f"{source.uri}: none of its first {len(lacking)} lines has the field, "
                        f"so --skip-bad-lines would skip them all ({lacking[0]})")


def iter_documents(source: SourceFile, text_field: str = "text",
                   skip_bad_lines: bool = False, skipped: list[str] | None = None
                   ) -> Iterator[Document]:
    """The documents of one file, streamed (memory does not grow with the file). A bad line
    or row raises DataError naming file and line, or, with `skip_bad_lines`, is appended to
    `skipped` (as "file:line: why") and skipped; a file that cannot be read, DataError
    naming it."""
    reader = {"txt": _txt_documents, "jsonl": _jsonl_documents,
              "parquet": _parquet_documents}[source.format]
    try:
        yield from reader(source, text_field, skip_bad_lines,
                          skipped if skipped is not None else [])
    except OSError as e:  # removed since planning, a storage read error, EIO: name the file
        raise _cannot_read(source, e) from None


def _txt_documents(source: SourceFile, _field: str, _skip: bool, _skipped: list[str]
                   ) -> Iterator[Document]:
    fs, path = filesystem_for(source.uri)
    # utf-8-sig: a byte-order mark (Windows editors write one) opened the first document.
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    buffer, index, consumed, start = "", 0, 0, b""
    before = ""  # the line ends a run of spaces given out in pieces left open (_open_run)
    lines = 0  # line ends in the bytes decoded so far (the bad byte's line, for messages)
    cr = False  # whether those bytes end with a CR, not counted in `lines` yet
    first_line = 1  # the next piece's
    with fs.open_input_stream(path) as f:
        while True:
            chunk = f.read(READ_CHUNK)
            start = start or chunk[:MAGIC_BYTES]
            if _known_start(start) is None:  # (UTF-16 with its mark, compressed: said below)
                _refuse_nul(source, chunk, lines, consumed, cr)
            try:
                buffer += decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                # e.start counts in e.object: the chunk, after the last chunk's unfinished
                # character and without a byte-order mark (neither holds a line end)
                line = lines + _txt_line_ends(e.object, e.start, cr) + 1
                raise DataError(f"{source.uri}:{line}: not UTF-8 text near byte "
                                f"{consumed + len(chunk) - len(e.object) + e.start}"
                                f"{_encoding_hint(start)}") from None
            consumed += len(chunk)
            # (a CR ending the chunk waits: the next chunk's LF may make it a CRLF)
            lines += _txt_line_ends(chunk, len(chunk) - chunk.endswith(b"\r"), cr)
            cr = chunk.endswith(b"\r")
            lone_cr = _lone_cr(buffer)  # (most text holds none: the faster search)
            # Before the end, only text up to the buffer's last non-space is cut, and its
            # last piece waits for more: every cut is then where it falls in the whole text,
            # whatever the chunks (a blank-line run may go on in the next chunk).
            pieces = _paragraphs(buffer if not chunk else buffer.rstrip(), before, lone_cr)
            if chunk:
                pieces.pop()
                buffer = buffer[sum(map(len, pieces)):]
            if pieces:  # (the buffer starts after text, or a line end with text after it)
                before = ""
            if chunk and len(buffer) > 8 * MAX_DOCUMENT_CHARS + 1:  # (a run of spaces)
                settled = _settled(buffer)
                if settled:
                    before = _open_run(before + "".join(settled))
                pieces += settled
                buffer = buffer[sum(map(len, settled)):]
            for i, piece in enumerate(pieces):
                last = not chunk and i == len(pieces) - 1  # end-of-text after the file
                # (line: where the piece starts; its index counted the pieces a long
                # paragraph is cut into, which messages named as paragraphs)
                yield Document(piece, index, eos_after=last, line=first_line)
                index += 1
                first_line += _line_ends(piece) if lone_cr else piece.count("\n")
            if not chunk:
                return


def _paragraphs(text: str, before: str = "", lone_cr: bool | None = None) -> list[str]:
    """Cut after each blank-line run, and long paragraphs at line ends (_cut_long); the
    pieces concatenate back to `text` exactly. `before`: what of a run of spaces given out
    before `text` can still make or continue a blank line ("\n" or "\n\n", _open_run).
    `lone_cr`: whether `text` holds a CR that is no CRLF's (_lone_cr), where known."""
    pieces, start = [], 0
    lone_cr = _lone_cr(text) if lone_cr is None else lone_cr
    paragraph_end = _PARAGRAPH_END if lone_cr else _LF_PARAGRAPH_END
    for match in paragraph_end.finditer(before + text):
        end = match.end() - len(before) if before else match.end()
        if end > start:  # (not the end of a blank-line run given out already)
            pieces += _cut_long(text[start:end])
            start = end
    pieces += _cut_long(text[start:])
    return pieces


def _cut_long(paragraph: str) -> list[str]:
    """A paragraph in pieces of about MAX_DOCUMENT_CHARS: each ends at the first line end past
    that (with text after it), or at 4x that where none is. Lengths count a CRLF as one
    character, as the split reads the text (_split_form): counting its '\r', a Windows copy
    was cut at other lines than the LF copy, and no piece of one hashed as the other's."""
    pieces, start = [], 0
    while (soft := _past(paragraph, start, MAX_DOCUMENT_CHARS)) < len(paragraph):
        hard = _past(paragraph, start, 4 * MAX_DOCUMENT_CHARS)
        cut = _LINE_CUT.search(paragraph, soft - 1, hard)
        if cut is None and hard >= len(paragraph):
            break
        end = cut.end() if cut is not None else hard
        pieces.append(paragraph[start:end])
        start = end
    pieces.append(paragraph[start:])
    return pieces


def _settled(buffer: str) -> list[str]:
    """The first pieces of `buffer` (text from a piece's start on, with more to come: a run
    of spaces or line ends that has not ended, which waited whole in memory for the next
    text, and was stripped again at every read) that nothing after it can move: those whose
    hard cut (_cut_long) falls before its last character. What places such a cut lies in the
    buffer, and the paragraph goes on at least to its end (only spaces and line ends wait)."""
    settled, start = [], 0
    for piece in _cut_long(buffer):
        if _past(buffer, start, 4 * MAX_DOCUMENT_CHARS) + 1 >= len(buffer):
            break
        settled.append(piece)
        start += len(piece)
    return settled


def _open_run(given: str) -> str:
    """What a paragraph-end search must see before the rest of a run of spaces whose start,
    `given`, was given out (_settled): "\n\n" where `given` holds a blank line (the run
    ends the paragraph wherever it ends), "\n" where its last line end has only spaces or
    tabs after it (a line end in the rest makes a blank line), else ""."""
    run = given[len(given.rstrip()):]
    if _PARAGRAPH_END.search(run):
        return "\n\n"
    return "\n" if re.search(r"[\r\n][ \t]*\Z", run) else ""


def _lone_cr(text: str) -> bool:
    """Whether `text` holds a CR that is no CRLF's (most text holds no CR at all)."""
    return "\r" in text and _LONE_CR.search(text) is not None


def _txt_line_ends(data: bytes, end: int, cr_before: bool = False) -> int:
    """_line_ends of .txt bytes `data[:end]` (a CR at `end` - 1 counts: the byte at `end`, a
    bad one, is no LF), after bytes ending in a CR not counted yet when `cr_before` (a line
    end unless `data` starts with its LF)."""
    return (data.count(b"\n", 0, end) + data.count(b"\r", 0, end)
            - data.count(b"\r\n", 0, end) + (cr_before and not data.startswith(b"\n")))


def _line_ends(text: str) -> int:
    """LF, CRLF and lone CR line ends in `text` (a piece never parts a CRLF)."""
    return text.count("\n") + len(_LONE_CR.findall(text))


def _past(text: str, start: int, chars: int) -> int:
    """Where `chars` characters of `text` from `start` end, a CRLF counted as one (never
    between its '\r' and '\n'); len(text) when fewer are left."""
    end = start + chars
    while end < len(text):
        short = chars - (end - start - text.count("\r\n", start, end))
        if not short:
            break
        end += short  # (each step adds at most half as many CRLF: a few steps)
    if end < len(text) and text[end - 1:end + 1] == "\r\n":
        end += 1
    return min(end, len(text))


def _jsonl_documents(source: SourceFile, field: str, skip: bool, skipped: list[str]
                     ) -> Iterator[Document]:
    fs, path = filesystem_for(source.uri)
    with fs.open_input_stream(path) as raw:
        # Lines are read as bytes and decoded one by one: a text reader decodes blocks of
        # 8 KB, so one bad byte would cost every line of its block and the line count.
        lines = io.BufferedReader(raw)
        index = 0
        line_no = 0
        first = b""  # the first line's start: what a NUL byte in a bad line says
        while True:
            data = lines.readline(JSONL_LINE_MAX_BYTES + 1)
            if not data:
                break
            line_no += 1
            if len(data) > JSONL_LINE_MAX_BYTES and not data.endswith(b"\n"):
                raise DataError(f"{source.uri}:{line_no}: a line of over "
                                f"{_mib(JSONL_LINE_MAX_BYTES)}: not JSON Lines (one JSON "
                                "object per line; a .json file holding one array or an "
                                "object over many lines is not read)")
            first = first if line_no > 1 else data[:TEXT_HEAD_BYTES]
            text, problem = _jsonl_record(data, field)
            # (UTF-16 with its byte-order mark, compressed data: said so by _jsonl_record)
            nul_said = problem and b"\0" in data and _known_start(first[:MAGIC_BYTES]) is None
            if nul_said and line_no == 1:  # the whole file is so
                _refuse_nul(source, first, 0, 0)
            if nul_said and (nul := _nul_problem(first, True)) is not None:
                problem += f" ({nul[1]})"  # (what the file's start says: a line's NULs
                # fall at either offset in UTF-16)
            if problem:
                _bad(source, line_no, problem, skip, skipped)
                continue
            if text is None:  # a blank line
                continue
            yield Document(text, index, eos_after=True, line=line_no)
            index += 1


class MissingField(str):
    """The problem of a .jsonl line that lacks the text field (check_jsonl_head tells a wrong
    --text-field from other bad lines by it)."""


def _jsonl_record(data: bytes, field: str) -> tuple[str | None, str | None]:
    """(the document's text, None) for a good .jsonl line, (None, why) for a bad one, and
    (None, None) for a blank one."""
    try:
        # (a byte-order mark opening the file made its first line "not valid JSON")
        line = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        return None, (f"not UTF-8 text (byte {e.start + 1} of the line)"
                      + (_known_start(data[:MAGIC_BYTES]) or ""))
    if not line.strip():
        return None, None
    if line.lstrip().startswith("["):  # not parsed: a .json file's array, hundreds of MB
        return None, "a JSON list, not an object"
    try:
        record = json.loads(line)
    except (ValueError, RecursionError) as e:  # (a line nested thousands deep, a long int)
        return None, f"not valid JSON ({json_parse_problem(e, with_line=False)})"
    if not isinstance(record, dict):
        return None, f"a JSON {json_type(record)}, not an object"
    if field not in record:
        fields = ", ".join(repr(name) for name in list(record)[:10])
        return None, MissingField(f"no {field!r} field (--text-field); its fields: "
                                  f"{fields or 'none'}{', ...' if len(record) > 10 else ''}")
    if not isinstance(record[field], str):
        return None, f"field {field!r} is {json_type(record[field])}, not a string"
    problem = _not_unicode(record[field], field)
    return (None, problem) if problem else (record[field], None)


def _not_unicode(text: str, field: str) -> str | None:
    """Why a JSON string is not text (a lone surrogate escape such as "\\ud83d", which
    JavaScript writes for half an emoji), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"field {field!r} is not valid Unicode: character {e.start + 1} is a lone "
                f"surrogate ({ascii(text[e.start])})")
    return None


def _parquet_documents(source: SourceFile, field: str, skip: bool, skipped: list[str]
                       ) -> Iterator[Document]:
    check_text_column(source, field)
    parquet = _parquet_file(source)
    row = 0
    try:
        for batch in parquet.iter_batches(columns=[field], batch_size=PARQUET_BATCH_ROWS):
            for value in batch.column(0).to_pylist():
                row += 1
                if not isinstance(value, str):
                    _bad(source, row, f"column {field!r} is "
                         f"{'null' if value is None else type(value).__name__}, not a string",
                         skip, skipped, what="row")
                    continue
                yield Document(value, row - 1, eos_after=True, line=row)
    except DataError:
        raise
    except Exception as e:  # ArrowInvalid on a damaged page, OSError
        raise _parquet_error(source, e, f"corrupt parquet data after row {row}") from None


def place(source: SourceFile, line: int) -> str:
    """Where in its file a document or bad line is, for messages: `F:LINE` (the line a .jsonl
    document or a .txt paragraph starts on), or a parquet file's `F: row N`."""
    return f"{source.uri}: row {line}" if source.format == "parquet" else \
        f"{source.uri}:{line}"


def _bad(source: SourceFile, line: int, problem: str, skip: bool, skipped: list[str],
         what: str = "line") -> None:
    message = f"{place(source, line)}: {problem}"
    if not skip:
        raise DataError(f"{message} (pass --skip-bad-lines to skip and count such {what}s)")
    skipped.append(message)


def is_held_out(text: str, fraction: float = HELD_OUT_FRACTION) -> bool:
    """Whether a document belongs to the held-out split: a hash of its text, so the same on
    every machine and run wherever the files are mounted, independent of how files are
    spread over workers, and one split for every copy of a document (a file read twice, a
    paragraph repeated across files): nothing held out is also trained on. The text is
    hashed without what surrounds it (_split_form): a .txt paragraph carries the blank-line
    run after it, and the next paragraph's indentation, which differ copy by copy."""
    digest = hashlib.sha256(_split_form(text).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2 ** 64


def _split_form(text: str) -> str:
    """A document as the split sees it: CRLF and CR line ends read as LF, spaces and line
    ends around it dropped (one paragraph mid-file, at the file's end, in a Windows or an
    old Mac copy)."""
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


# version 4: a local file's content fingerprint is in the key too (the same shards as 3);
# version 3: the split hashes the text without its surrounding spaces and line ends, and a
# .txt file's held-out paragraphs run on as its training ones do (2: hashed with them, an
# end-of-text after each held-out paragraph; 1: split by file path and position)
CACHE_KEY_VERSION = 4
FINGERPRINT_KEY_VERSION = 4  # the first key version holding local files' content fingerprints


def cache_key(sources: list[SourceFile], text_field: str, skip_bad_lines: bool,
              tokenizer_sha256: str, held_out_fraction: float = HELD_OUT_FRACTION,
              version: int = CACHE_KEY_VERSION) -> str:
    """What the token shards depend on: the files (path, size, modification time and, for a
    local file, content fingerprint), how they are read, the tokenizer and the split. Same
    key = same shards: nothing to tokenize. `version`: an earlier one gives the key runs of
    that version recorded."""
    files = [[s.uri, s.size, s.mtime_ns] + ([s.fingerprint] if version >= 4 else [])
             for s in sources]
    identity = {"version": version, "files": files,
                "text_field": text_field, "skip_bad_lines": skip_bad_lines,
                "tokenizer": tokenizer_sha256, "held_out_fraction": held_out_fraction}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def iter_texts(sources: list[SourceFile], text_field: str, skip_bad_lines: bool
               ) -> Iterator[str]:
    """Every training document's text (held-out ones excluded): what a tokenizer is trained
    on, so held-out text never shapes the vocabulary either."""
    for source in sources:
        for doc in iter_documents(source, text_field, skip_bad_lines):
            if doc.text and not is_held_out(doc.text):
                yield doc.text
