"""What a training run reads and how it is tokenized, decided before anything starts.

`plan_data` turns the flags (`--data`, `--text-field`, `--skip-bad-lines`, `--tokenizer`,
`--train-tokenizer`, `--data-cache`, `--retokenize`) into a `DataPlan`: the checked source
files, the tokenizer, the cache key and directory, and whether the cache already holds the
shards. Every bad input is a DataError or TokenizerError naming the file or flag, raised here,
before Ray or any worker starts. The tokenizing pass itself runs on Ray Data
(ray_layer/data_ingest.py), or in this process for the small bundled corpus
(`tokenize_in_process`, also the single-process baseline of scripts/bench_data.py).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from orchestrator.runs import writable_dir_problem
from orchestrator.tokenizer import (EOS_NAMES, Tokenizer, TokenizerError, load_tokenizer,
                                    tokenizer_from_json, tokenizer_of_run, tokenizer_text,
                                    train_bpe)
from orchestrator.training.corpus import (CACHE_KEY_VERSION, FINGERPRINT_KEY_VERSION, DataError,
                                          SourceFile, cache_key,
                                          check_jsonl_head, check_text_column, check_text_head,
                                          expand_sources, iter_texts, refuse_file_uri_query,
                                          refuse_non_utf8_path, split_uri_query,
                                          with_scheme)
from orchestrator.training.shards import (SHARD_TOKENS, UnreadableManifest, clear_cache_dir,
                                          fresh_dir_beside, has_manifest_file,
                                          on_local_storage, pass_lock, read_manifest,
                                          storage_for, swap_in, text_pieces,
                                          tokenize_source, write_atomically, write_manifest,
                                          writing_cache)
from orchestrator.validation import expand_home

BUNDLED_FILE = "pydoc_topics.txt"  # the bundled corpus as a source, for non-byte tokenizers


@dataclass
class DataPlan:
    """The checked inputs of a run's data: sources, tokenizer, where the shards go."""

    sources: list[SourceFile]
    text_field: str
    skip_bad_lines: bool
    tokenizer: Tokenizer
    key: str  # corpus.cache_key
    cache_uri: str  # <cache root>/<key prefix>: the shards and their manifest
    manifest: dict[str, Any] | None  # the finished cache's manifest; None = to tokenize
    retokenize: bool = False  # --retokenize: a pass even over finished shards

    @property
    def cached(self) -> bool:
        return self.manifest is not None


def default_cache_root(run_dir: Path) -> str:
    """Beside the run directories: on a cluster the run dir is on shared storage, so every
    node reads the shards there too."""
    return str(run_dir.parent / "data-cache")


def bundled_source(cache_root: str) -> list[SourceFile]:
    """The bundled corpus written once as a .txt file in the cache root, so a non-byte
    tokenizer reads it through the same path as the user's files."""
    from orchestrator.training.data import load_corpus

    fs, root = storage_for(cache_root)
    path = f"{root}/{BUNDLED_FILE}"
    data = load_corpus()
    # (a cache that cannot be written, named: it was a raw OSError, a traceback)
    with writing_cache(cache_root, BUNDLED_FILE):
        if fs.get_file_info(path).size != len(data):
            fs.create_dir(root, recursive=True)
            # A temporary file of this writer's own: runs starting at once moved each other's
            # half-written one into place (a run refused: "the file is empty").
            write_atomically(fs, path, data)
    return expand_sources([with_scheme(cache_root, path)])


def absolute_cache_root(cache_root: str) -> str:
    """A local --data-cache made absolute: the workers run in directories of their own
    (Ray's), where a path relative to where the driver was started would name nothing."""
    refuse_non_utf8_path(cache_root, "--data-cache")
    refuse_file_uri_query(cache_root, "--data-cache")
    if "://" in cache_root:
        return cache_root
    # (a ~user of no user: refused, not a folder named "~user" under the working directory)
    return os.path.abspath(expand_home(cache_root, "--data-cache", DataError))


def cache_dir(cache_root: str, key: str) -> str:
    """Where the token shards of cache key `key` are under `cache_root` (before its query,
    `s3://b/cache?endpoint_override=...`: appended after it, the key became part of the
    query's value)."""
    root, query = split_uri_query(cache_root)
    return f"{root.rstrip('/')}/{key[:24]}{query}"


def plan_data(data: list[str], *, text_field: str = "text", skip_bad_lines: bool = False,
              tokenizer: str = "bytes", train_tokenizer: int | None = None,
              cache_root: str, retokenize: bool = False,
              say: Callable[[str], None] = print, train: bool = True,
              before_training: Callable[[], None] = lambda: None) -> DataPlan | None:
    """Check the sources and the tokenizer and find (or choose) the cache directory.
    `train=False` (a dry run): a --train-tokenizer BPE not in the cache yet is not trained,
    and None is returned once the sources are checked. `before_training()` is called when
    such a BPE is not in the cache (before it is trained, or with `train=False`)."""
    cache_root = absolute_cache_root(cache_root)
    if not isinstance(text_field, str) or not text_field:
        raise DataError(f"--text-field must be a non-empty field name, got {text_field!r}")
    if train_tokenizer is not None and tokenizer != "bytes":
        raise TokenizerError("--tokenizer and --train-tokenizer exclude each other: give one")
    tok = load_tokenizer(tokenizer) if train_tokenizer is None else None
    sources = expand_sources(data, say) if data else bundled_source(cache_root)
    for source in sources:
        if source.format == "parquet":
            check_text_column(source, text_field)
        check_text_head(source)
        check_jsonl_head(source, text_field, skip_bad_lines)
    if not reads_records(sources):  # (.txt alone: the same shards whatever they say, so
        text_field, skip_bad_lines = "text", False  # the defaults' cache key and BPE)
    if tok is None:
        tok = trained_tokenizer(sources, text_field, skip_bad_lines, train_tokenizer,
                                cache_root, say, train=train, before_training=before_training)
        if tok is None:
            return None
    key = cache_key(sources, text_field, skip_bad_lines, tok.sha256)
    cache_uri = cache_dir(cache_root, key)
    manifest = _manifest_unless_replaced(cache_uri, retokenize)
    if retokenize and manifest is not None:
        _check_replaceable(cache_uri)
        manifest = None
    if manifest is not None and manifest.get("key") != key:
        manifest = None
    return DataPlan(sources, text_field, skip_bad_lines, tok, key, cache_uri, manifest,
                    retokenize)


# The flags that read .jsonl records and parquet rows: on .txt files they change nothing.
RECORD_FLAGS = ("--text-field", "--skip-bad-lines")


def reads_records(sources: list[SourceFile]) -> bool:
    """Whether any source is read by record (.jsonl, .parquet), where --text-field and
    --skip-bad-lines apply."""
    return any(source.format != "txt" for source in sources)


def _manifest_unless_replaced(cache_uri: str, retokenize: bool) -> dict[str, Any] | None:
    """The cache's manifest (read_manifest), or None under --retokenize when it cannot be
    read: what --retokenize is for (the error says to pass it), so the directory is replaced
    as any other, not refused again with that error."""
    try:
        return read_manifest(cache_uri)
    except UnreadableManifest:
        if not retokenize:
            raise
        return None


def _check_replaceable(cache_uri: str) -> None:
    """--retokenize replaces finished shards by a swap of directories (shards.swap_in), which
    object storage cannot do, nor can it tell whether a run is reading them."""
    if not on_local_storage(cache_uri):
        raise DataError(f"--retokenize: the token shards at {cache_uri} are on object storage, "
                        "where they cannot be replaced while a run may be reading them; "
                        "delete that directory once no run uses it (the next run tokenizes "
                        "again), or give another --data-cache")


def trained_tokenizer(sources: list[SourceFile], text_field: str, skip_bad_lines: bool,
                      vocab_size: int, cache_root: str, say: Callable[[str], None],
                      train: bool = True, before_training: Callable[[], None] = lambda: None):
    """`--train-tokenizer`: a byte-level BPE trained on the training documents, kept in the
    cache (keyed by the data and the size) so a second run on the same data reuses it.
    `train=False`: the cached one, or None where there is none (nothing trained)."""
    if not isinstance(vocab_size, int) or not 257 <= vocab_size <= 1 << 20:
        raise TokenizerError(f"--train-tokenizer must be a vocabulary size in [257, 1048576], "
                             f"got {vocab_size!r}")
    # (keyed without the files' content fingerprints, as before version 4: the BPE trained
    # on them is not trained again, minutes over a large corpus, for the same files)
    key = cache_key(sources, text_field, skip_bad_lines, f"train-bpe-{vocab_size}",
                    version=FINGERPRINT_KEY_VERSION - 1)
    fs, root = storage_for(cache_root)
    name = f"tokenizers/bpe-{vocab_size}-{key[:24]}.json"
    path = f"{root}/{name}"
    if fs.get_file_info(path).type.name == "File":
        try:
            return tokenizer_from_json(tokenizer_text(_read_cached(fs, path), path), path)
        except TokenizerError as e:
            raise TokenizerError(f"{e} (the cached --train-tokenizer result: remove it and "
                                 f"the tokenizer is trained again)") from None
    before_training()  # (the cache checked: it is written once the BPE is trained)
    if not train:
        return None
    started = time.perf_counter()
    # In the pieces the pass encodes (cut before a space, where byte-level BPE's pre-tokenizer
    # cuts too: the same word counts): a 20 MB .jsonl line given whole took 1.9 GB.
    tok = train_bpe((piece for text in iter_texts(sources, text_field, skip_bad_lines)
                     for piece in text_pieces(text)), vocab_size)
    say(f"trained a byte-level BPE tokenizer of {tok.vocab_size} tokens on "
        f"{len(sources)} file(s) in {time.perf_counter() - started:.1f} s")
    # (named: configure_data checks a local cache first, but not one on object storage)
    with writing_cache(cache_root, name):
        fs.create_dir(f"{root}/tokenizers", recursive=True)
        write_atomically(fs, path, tok.to_json().encode("utf-8"))
    return tok


def _read_cached(fs, path: str) -> bytes:
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except OSError as e:
        raise TokenizerError(f"cannot read tokenizer file {path}: {e}") from None


def check_trainable(manifest: dict[str, Any], seq_len: int, where: str) -> None:
    """Both splits must hold a sequence; DataError naming --seq-len otherwise, or
    --skip-bad-lines when it skipped every line (a wrong --text-field, not a short corpus)."""
    skipped = manifest.get("skipped_lines", 0)
    if skipped and not manifest["documents"] + manifest["held_out_documents"]:
        example = manifest.get("skipped_example")
        raise DataError(f"--skip-bad-lines skipped all {skipped:,} lines (or rows) of the "
                        f"corpus that were not blank, leaving nothing to train on ({where})"
                        + (f"; the first: {example}" if example else "")
                        + f"; is --text-field {manifest.get('text_field', 'text')!r} the field "
                        "that holds the text?")
    if not manifest["documents"] + manifest["held_out_documents"]:
        # (every line's or row's text "" or spaces, a .txt file of blank lines: "a shorter
        # --seq-len" was said, which cannot help)
        sources = manifest.get("sources", [])
        names = ", ".join(s["uri"] for s in sources[:3]) \
            + (f" and {len(sources) - 3} more" if len(sources) > 3 else "")
        records = any(s.get("format") != "txt" for s in sources)
        raise DataError(f"the corpus holds no text: every document of its {len(sources)} "
                        f"file(s) is empty or only spaces and line ends ({where}): {names}"
                        + (f"; is --text-field {manifest.get('text_field', 'text')!r} the "
                           "field that holds the text?" if records else ""))
    for split, what in (("train", "training"), ("held_out", "held-out")):
        tokens = manifest[f"{split}_tokens"]
        documents = manifest["documents" if split == "train" else "held_out_documents"]
        if not documents and manifest["documents"] + manifest["held_out_documents"]:
            raise _no_document_in(what, manifest, where)
        if tokens < seq_len + 1:  # (data.get_batch's rule)
            raise DataError(f"--seq-len {seq_len}: the corpus's {what} split has {tokens} "
                            f"tokens ({documents} documents; {where}), too short for one "
                            f"sequence of {seq_len + 1}; give more data or a shorter --seq-len"
                            + (" (about one document in ten is held out)"
                               if split == "held_out" else "")
                            + (f" (--skip-bad-lines skipped {skipped:,} bad lines)"
                               if skipped else ""))


def _no_document_in(what: str, manifest: dict[str, Any], where: str) -> DataError:
    """A split that no document fell in: too few documents (a few books as .jsonl lines),
    whatever --seq-len; "give a shorter --seq-len" was said, which cannot help."""
    total = manifest["documents"] + manifest["held_out_documents"]
    return DataError(f"none of the corpus's {total:,} documents fell in the {what} split "
                     f"({where}): a document goes to the held-out split by a hash of its "
                     "text, about one in ten, so a handful of documents can leave a split "
                     "empty; give more documents (cut long ones: a .txt file is read by "
                     "paragraph, a .jsonl file by line)")


class PassProgress:
    """A tokenizing pass's progress line ("tokenized 3/20 files: ... MB/s"), from running
    totals (summing every result again per finished file took the driver 85 s over 20,000
    files), said at most once every `every_s` seconds, and for the last file."""

    def __init__(self, total_files: int, say: Callable[[str], None], every_s: float = 1.0,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.total_files, self.say, self.every_s, self.clock = total_files, say, every_s, clock
        self.started, self.said_at = clock(), None
        self.files = self.documents = self.tokens = self.bytes = 0

    def add(self, result: dict[str, Any]) -> None:
        """Count one finished file's result (shards.tokenize_source's)."""
        self.files += 1
        self.documents += result["documents"] + result["held_out_documents"]
        self.tokens += result["tokens"] + result["held_out_tokens"]
        self.bytes += result["bytes"]
        now = self.clock()
        if (self.files == self.total_files or self.said_at is None
                or now - self.said_at >= self.every_s):
            self.said_at = now
            self.say(self.line(now - self.started))

    def line(self, seconds: float) -> str:
        megabytes = self.bytes / 1e6
        return (f"tokenized {self.files}/{self.total_files} files: {self.documents:,} "
                f"documents, {self.tokens:,} tokens, {megabytes:.1f} MB at "
                f"{megabytes / max(seconds, 1e-9):.2f} MB/s")


def tokenize_in_process(plan: DataPlan, shard_tokens: int = SHARD_TOKENS,
                        say: Callable[[str], None] = print) -> dict[str, Any]:
    """The tokenizing pass in this process, file after file (the bundled corpus; the
    single-process baseline of the benchmark). Same shards and manifest as the Ray Data pass."""
    clear_cache_dir(plan.cache_uri)
    progress, results = PassProgress(len(plan.sources), say), []
    for index, source in enumerate(plan.sources):
        results.append(tokenize_source(source, index, plan.tokenizer, plan.cache_uri,
                                       text_field=plan.text_field,
                                       skip_bad_lines=plan.skip_bad_lines,
                                       shard_tokens=shard_tokens))
        progress.add(results[-1])
    return finish(plan, results)


def tokenize_once(plan: DataPlan, run_pass: Callable[[DataPlan], dict[str, Any]],
                  say: Callable[[str], None] = print) -> dict[str, Any]:
    """`run_pass(plan)` (a tokenizing pass that writes the plan's cache) under the cache's
    pass lock. The manifest is read again once the lock is held: another run may have
    finished the shards since this one planned (while it waited, or just before), and they
    are used, not cleared and redone; a --retokenize run redoes them unless they were built
    while it waited (from the same files, just now)."""
    with pass_lock(plan.cache_uri, say) as waited:
        if waited or not plan.retokenize:
            manifest = _manifest_unless_replaced(plan.cache_uri, plan.retokenize)
            if manifest is not None and manifest.get("key") == plan.key:
                say(f"token shards cached at {plan.cache_uri} by another run: "
                    f"{manifest['train_tokens']:,} training and "
                    f"{manifest['held_out_tokens']:,} held-out tokens")
                plan.manifest = manifest
                return manifest
        # Finished shards (or ones whose manifest cannot be read) a run may be reading are
        # swapped out; object storage can only clear them in place (no reader opens shards
        # whose manifest does not parse; plan_data refused --retokenize over readable ones).
        if plan.retokenize and has_manifest_file(plan.cache_uri) \
                and on_local_storage(plan.cache_uri):
            return _replace_shards(plan, run_pass, say)
        return run_pass(plan)


def _replace_shards(plan: DataPlan, run_pass: Callable[[DataPlan], dict[str, Any]],
                    say: Callable[[str], None]) -> dict[str, Any]:
    """--retokenize over finished shards: the pass writes a fresh directory, swapped in for
    the cache's once finished (shards.swap_in). Clearing the cache first, as before, took the
    shards from a run training on them (and from its workers restarting)."""
    fresh = replace(plan, cache_uri=fresh_dir_beside(plan.cache_uri))
    manifest = run_pass(fresh)
    swap_in(fresh.cache_uri, plan.cache_uri, say)
    plan.manifest = manifest
    return manifest


def finish(plan: DataPlan, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Write the manifest (last) and keep it in the plan."""
    plan.manifest = write_manifest(plan.cache_uri, plan.key, plan.tokenizer, results,
                                   plan.sources, plan.text_field)
    return plan.manifest


def uses_bundled_bytes(data: list[str], tokenizer: str, train_tokenizer: int | None) -> bool:
    """The default: the bundled corpus with the byte tokenizer, read in memory by every worker
    (no cache, no Ray Data): the two-command quickstart stays offline and instant."""
    return not data and tokenizer == "bytes" and train_tokenizer is None



@dataclass
class DataSetup:
    """What the data and tokenizer flags resolve to: the TrainConfig fields they set, the
    tokenizer to record in the run directory, and the plan of the tokenizing pass (None for
    the bundled corpus in bytes, read in memory)."""

    fields: dict[str, Any]
    tokenizer: Tokenizer | None  # None: a dry run's --train-tokenizer, not trained
    plan: DataPlan | None
    notes: list[str]


def _check_cache_writable(cache_root: str, given: bool) -> None:
    """DataError naming the flag when a local cache root cannot take the shards (checked
    before Ray starts: it failed as a traceback after tokenizing). URIs are left to their
    file system."""
    if "://" in cache_root:
        return
    problem = writable_dir_problem(Path(absolute_cache_root(cache_root)))
    if problem:
        where = "--data-cache" if given else "the data cache beside the run dir (--data-cache " \
            "to choose another)"
        raise DataError(f"{where} {cache_root}: cannot write there: {problem}")


# The data flags that act only on a tokenizing pass over --data files on Ray Data (not on
# the bundled corpus, tokenized in process, nor on a resumed run's shards).
TOKENIZING_PASS_FLAGS = ("--text-field", "--skip-bad-lines", "--ingest-workers")


def configure_data(*, data: list[str], text_field: str, skip_bad_lines: bool, tokenizer: str,
                   train_tokenizer: int | None, cache_root: str, retokenize: bool,
                   init_from: str | None, saved: dict[str, Any] | None,
                   run_dir: Path | None = None, data_flags: tuple[str, ...] = (),
                   say: Callable[[str], None] = print, dry_run: bool = False) -> DataSetup:
    """Resolve the data, tokenizer and --init-from flags (`saved`: the train config of the run
    being resumed, in `run_dir`, or None). `data_flags`: those of --data-cache, --retokenize,
    --text-field, --skip-bad-lines, --ingest-workers the user gave (they apply to --data files
    only). `dry_run`: every check, but a --train-tokenizer BPE not yet in the cache is not
    trained (minutes over a large corpus, for a plan): its size stands for its vocabulary,
    and the setup has no tokenizer and no plan.
    DataError / TokenizerError / ExportError name the flag."""
    fields: dict[str, Any] = {}
    notes: list[str] = []
    if saved and saved.get("data_key") and not init_from \
            and uses_bundled_bytes(data, tokenizer, train_tokenizer) and run_dir is not None:
        return recorded_data(saved, run_dir,
                             cache_root if "--data-cache" in data_flags else None, data_flags)
    if init_from:
        from orchestrator.hf_export import (check_hf_weights, init_warnings, mlp_hidden_of,
                                            model_size_of, read_hf_config)

        hf = read_hf_config(init_from)
        fields["model_size"] = model_size_of(hf, init_from)
        fields["mlp_hidden"] = mlp_hidden_of(hf)
        check_hf_weights(init_from, hf)  # here, not in every worker after Ray started
        fields["init_from"] = str(Path(init_from).expanduser().resolve())
        # A learnable span starts covering the whole context, so the model starts as the one
        # imported (spans from 0 would first cut a pretrained model's context to ~32 tokens).
        fields["span_init"] = 1.0
        notes += [f"--init-from: {w}" for w in init_warnings(hf)]
        if tokenizer == "bytes" and train_tokenizer is None:
            tokenizer = str(Path(init_from).expanduser() / "tokenizer.json")
            if not Path(tokenizer).is_file():
                raise TokenizerError(f"--init-from {init_from}: no tokenizer.json beside the "
                                     "model; pass the model's tokenizer with --tokenizer")
    if uses_bundled_bytes(data, tokenizer, train_tokenizer):
        if data_flags:
            notes.append(f"{', '.join(data_flags)} ignored: they apply to --data files, and "
                         "this run trains on the bundled corpus, read in memory")
        tok = load_tokenizer("bytes")
        legacy = saved is not None and not saved.get("tokenizer_sha256")
        # A run from before tokenizers were recorded continues as it began: 256 byte ids.
        fields.update(vocab_size=256 if legacy else tok.vocab_size,
                      tokenizer_sha256="" if legacy else tok.sha256)
        return DataSetup(fields, tok, None, notes)
    unused = [f for f in data_flags
              if f in TOKENIZING_PASS_FLAGS]
    if not data and unused:  # (a tokenizer of its own: the cache and --retokenize apply)
        notes.append(f"{', '.join(unused)} ignored: the bundled corpus is tokenized in this "
                     "process (prepare_shards), a text file of its own")
    cache_given = "--data-cache" in data_flags
    plan = plan_data(data, text_field=text_field, skip_bad_lines=skip_bad_lines,
                     tokenizer=tokenizer, train_tokenizer=train_tokenizer,
                     cache_root=cache_root, retokenize=retokenize, say=say,
                     train=not dry_run,
                     # A BPE not in the cache yet is trained into it, before the shards: a
                     # cache that cannot take it is named before minutes of training (one
                     # that holds it and the shards, read-only, is read as it is).
                     before_training=lambda: _check_cache_writable(cache_root, cache_given))
    if plan is None:  # a dry run: the sources checked, the tokenizer not trained
        if init_from and hf["vocab_size"] > train_tokenizer:  # (a run would refuse it)
            raise TokenizerError(f"--init-from {init_from}: the model has {hf['vocab_size']} "
                                 f"token ids but the tokenizer (--train-tokenizer) at most "
                                 f"{train_tokenizer}; use the model's own tokenizer")
        notes.append(f"--dry-run: the --train-tokenizer BPE is not trained (a real run trains "
                     f"it first); the estimate takes its full {train_tokenizer:,} tokens")
        fields["vocab_size"] = train_tokenizer
        return DataSetup(fields, None, None, notes)
    ignored = [f for f in data_flags if f in RECORD_FLAGS]
    if data and ignored and not reads_records(plan.sources):
        notes.append(f"{', '.join(ignored)} ignored: "
                     f"{'they apply' if len(ignored) > 1 else 'it applies'} to .jsonl and "
                     ".parquet files, and the --data files are .txt")
    if not plan.cached:  # shards to write (a read-only cache that holds them is fine)
        _check_cache_writable(cache_root, cache_given)
    if init_from:
        model_dir = Path(init_from).expanduser().resolve()
        _check_init_vocab(init_from, hf["vocab_size"], plan.tokenizer,
                          own=Path(tokenizer).expanduser().resolve()
                          in (model_dir, model_dir / "tokenizer.json"))
    if plan.tokenizer.eos_id is None:
        notes.append(f"the tokenizer ({plan.tokenizer.name}) has no end-of-text token (none "
                     f"of {', '.join(EOS_NAMES)}): documents are joined with no separator")
    fields.update(data_cache=plan.cache_uri, data_key=plan.key,
                  vocab_size=plan.tokenizer.vocab_size, tokenizer_sha256=plan.tokenizer.sha256)
    return DataSetup(fields, plan.tokenizer, plan, notes)


def recorded_data(saved: dict[str, Any], run_dir: Path, cache_root: str | None = None,
                  data_flags: tuple[str, ...] = ()) -> DataSetup:
    """`--resume` with no data or tokenizer flags, of a run trained on --data: its own token
    shards (config.json's data_cache, or where they are in `cache_root` when --data-cache
    says they moved; checked against its data_key) and tokenizer, as recorded. DataError when
    the shards are gone (then --data again tokenizes them)."""
    if "--retokenize" in data_flags:
        raise DataError("--resume --retokenize: tokenizing again needs the files: pass the "
                        "run's --data (and --tokenizer or --train-tokenizer) too")
    if cache_root is not None:
        cache = cache_dir(absolute_cache_root(cache_root), saved["data_key"])
    else:
        cache = saved.get("data_cache", "")
    manifest = read_manifest(cache) if cache else None
    if manifest is None or manifest.get("key") != saved["data_key"]:
        raise DataError(f"--resume: the run was trained on --data, and its token shards "
                        f"({cache or 'no data_cache recorded'}) are gone or were rebuilt "
                        "from other files; pass its --data (and --tokenizer or "
                        "--train-tokenizer) again to tokenize them, or --data-cache where "
                        "they moved")
    names = ["data_key", "vocab_size", "tokenizer_sha256"]
    if saved.get("init_from"):  # the run took its size from the model it started from
        names += ["init_from", "model_size"]
    fields = {"data_cache": cache, **{name: saved[name] for name in names if name in saved}}
    unused = [f for f in data_flags
              if f in TOKENIZING_PASS_FLAGS]
    notes = [f"{', '.join(unused)} ignored: the run goes on with the shards it was "
             "tokenized into"] if unused else []
    return DataSetup(fields, tokenizer_of_run(run_dir, saved.get("tokenizer_sha256", "")),
                     None, notes)


def _check_init_vocab(init_from: str, vocab: int, tokenizer: Tokenizer, own: bool) -> None:
    """The model's embedding rows (`vocab`, its config.json's) must be the tokenizer's ids.
    `own`: the tokenizer is the tokenizer.json beside the model."""
    if vocab == tokenizer.vocab_size:
        return
    if own:  # e.g. an embedding table padded to a multiple of 64 past its tokenizer
        raise TokenizerError(f"--init-from {init_from}: the model has {vocab} token ids and "
                             f"its own tokenizer.json {tokenizer.vocab_size}; ours needs them "
                             "equal, so a model whose vocabulary is padded past its "
                             "tokenizer cannot be imported")
    raise TokenizerError(f"--init-from {init_from}: the model has {vocab} token ids but the "
                         f"tokenizer ({tokenizer.name}) {tokenizer.vocab_size}; use the "
                         "model's own tokenizer")


def resume_data_conflicts(saved: dict[str, Any], fields: dict[str, Any],
                          plan: DataPlan | None = None) -> list[str]:
    """Why resuming `saved` with these data fields (and `plan`, of its --data) would train
    another run, in words."""
    problems = []
    if saved.get("tokenizer_sha256", "") != fields.get("tokenizer_sha256", ""):
        problems.append("it was trained with another tokenizer (tokenizer_sha256 "
                        f"{saved.get('tokenizer_sha256', '')[:12] or 'bytes'} -> "
                        f"{fields.get('tokenizer_sha256', '')[:12] or 'bytes'}); pass the "
                        "run's tokenizer.json with --tokenizer")
    version = _earlier_key_version(saved, plan)
    if version is not None and version >= FINGERPRINT_KEY_VERSION - 1:
        # (the same shards, under a key without the files' content fingerprints: the run's
        # config.json names that key, which its own shards carry)
        problems.append(f"its shards were tokenized from these files under an earlier cache "
                        f"key (version {version}, now {CACHE_KEY_VERSION}: local files' content "
                        "fingerprints were added to it since; the shards are the same); resume "
                        "without --data to go on with the run's own")
    elif version is not None:
        problems.append(f"its shards were tokenized from these files under an earlier rule "
                        f"(cache key version {version}, now {CACHE_KEY_VERSION}: the held-out "
                        "split and .txt documents changed since), so they would tokenize into "
                        "other shards; resume without --data to go on with the run's own")
    elif saved.get("data_key", "") != fields.get("data_key", ""):
        problems.append("it was trained on other data (the --data files, their sizes, "
                        "modification times or contents, --text-field or --skip-bad-lines "
                        "differ; "
                        "files copied or touched since count too); resume without --data to "
                        "go on with the shards it was trained on")
    return problems


def _earlier_key_version(saved: dict[str, Any], plan: DataPlan | None) -> int | None:
    """The earlier cache-key version under which `plan`'s files, read as it reads them with
    the run's tokenizer, give the run's recorded data_key; None when none does."""
    if plan is None or not saved.get("data_key"):
        return None
    tokenizer = saved.get("tokenizer_sha256") or plan.tokenizer.sha256
    for version in range(1, CACHE_KEY_VERSION):
        if cache_key(plan.sources, plan.text_field, plan.skip_bad_lines, tokenizer,
                     version=version) == saved["data_key"]:
            return version
    return None
