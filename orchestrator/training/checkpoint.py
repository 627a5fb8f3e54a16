"""Checkpoint files: written atomically with a checksum, read without unpickling code.

A checkpoint directory holds `state.pt` (a dict of tensors and plain values) and
`state.pt.sha256`. Loading verifies the checksum first and then uses
`torch.load(weights_only=True)`, which refuses any pickle that would construct arbitrary
objects, so a tampered file cannot run code.

A sharded checkpoint (strategy fsdp) holds `meta.pt` (+ `.sha256`: step, config, scaler, the
names of pending gradients, and the sha256 of every shard file; written by rank 0 after all
the shards) and `torch.distributed.checkpoint`'s files: `.metadata` and one
`__<rank>_0.distcp` per worker with its shards of the model, optimizer and pending gradients.
DCP itself reads its `.metadata` index with plain `pickle.load`; it is read here by an
unpickler that builds only DCP's own metadata types, torch dtypes, sizes, layouts and paths
(`_IndexUnpickler`), so a sharded checkpoint cannot run code either.
A shard that does not match its recorded sha256 makes the checkpoint unusable, as a corrupt
`state.pt` does (a flipped byte otherwise loaded silently as garbage optimizer state). Each
worker may write into its own directory; Ray Train merges the workers'
directories of one report into one. `load_checkpoint` reads either kind whole (serving, export
and compression take any run's checkpoint); `load_sharded_into` loads in place, resharding to
the current worker count.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import pickle
import re
import shutil
import socket
import tempfile
import uuid
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterator

import torch

from orchestrator.validation import finite_json

STATE_FILE = "state.pt"
CHECKSUM_FILE = STATE_FILE + ".sha256"
SHARDED_META_FILE = "meta.pt"
DCP_METADATA_FILE = ".metadata"  # torch.distributed.checkpoint's index of the shards
SHARD_DIGESTS = "shard_sha256"  # meta.pt's entry: {shard file name: sha256}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or unreadable; the message names the file."""


def _dcp_errors() -> tuple[type[BaseException], ...]:
    """What a torch.distributed.checkpoint load raises: its CheckpointException (every
    rank's failure gathered) derives from BaseException, not Exception."""
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


# A traceback's exception line ("module.Type: message"), at the start of a line: the frames'
# lines are indented, and a message's further lines rarely start with a name and ": ".
_RAISED_LINE = re.compile(r"(?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*): (\S.*)")


def _dcp_problem(e: BaseException) -> str:
    """The line that says what went wrong in a torch.distributed.checkpoint failure: its
    message holds every failed rank's whole traceback, whose last exception line is the cause
    ("Type: message", the type without its module, the message to its first sentence: torch's
    refusal to unpickle runs on for lines of advice, its last a link to its documentation);
    without one, the message's last line."""
    text = str(e)
    raised = [m for m in map(_RAISED_LINE.fullmatch, text.splitlines()) if m]
    if raised:
        return _first_sentence(*raised[-1].groups())
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__


def _first_sentence(kind: str, message: str) -> str:
    """"Type: message" to the message's first sentence (torch's run on for lines of advice)."""
    first, *rest = message.split(". ", 1)
    return f"{kind}: {first.strip()}{'.' if rest else ''}"


def _load_problem(path: Path, e: Exception) -> str:
    """What is wrong with a file torch.load refused, in one line: empty, not a file torch.save
    writes (a zip archive holding a data.pkl and a 'version' record that is a number), or
    torch's own cause (after "torch's legacy (pre-1.6) format" for such a file): "Type: first
    sentence" (past a C++ check's "[enforce fail at ...] ." prefix) and the paragraph naming
    what it refused, without its advice (to load with weights_only=False) and its link. Its
    messages said nothing for an empty file ("cannot be loaded safely: "), "101" (KeyError:
    the first byte) for a text file, "[enforce fail at inline_container.cc:180]." for a zip
    of other files, and to a memory-mapped load that it was saved without
    `_use_new_zipfile_serialization`. What it refused is its weights-only
    unpickler's error (the context of the one it raises), first sentence: torch puts it in
    a paragraph of its own, on the line of its advice (a global it does not allow: a numpy
    array's, a class of one's own) or after "Weights only load failed." (DTensors)."""
    legacy = ""
    try:
        if path.stat().st_size == 0:
            return "the file is empty (0 bytes)"
        if _legacy_format(path):
            legacy = ("torch's legacy (pre-1.6) format, which it could not read (load it and "
                      "save it again with a current torch): ")
        elif not zipfile.is_zipfile(path):
            with open(path, "rb") as f:
                begun = f.read(4) == b"PK\x03\x04"  # (a zip archive's start: torch.save's)
            return ("cut short: a zip archive (torch.save's) without its end" if begun
                    else "not a file torch.save writes (no zip archive)")
        else:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
                if not any(n.count("/") == 1 and n.endswith("/data.pkl") for n in names):
                    return "a zip archive, but not one torch.save writes (no data.pkl)"
                problem = _version_problem(archive)
                if problem:
                    return f"a zip archive holding a data.pkl, but {problem}"
    except (OSError, zipfile.BadZipFile, zlib.error, NotImplementedError) as error:
        return getattr(error, "strerror", None) or str(error)  # (a record it cannot unpack)
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", str(e)) if p.strip()]
    if not paragraphs:
        return type(e).__name__
    # (torch's C++ checks start "[enforce fail at inline_container.cc:230] . ", which the
    # first sentence would be alone: the message is what follows)
    first_line = _ENFORCE_PREFIX.sub("", paragraphs[0].splitlines()[0])
    said = _first_sentence(type(e).__name__, first_line)
    refused = e.__context__ if isinstance(e, pickle.UnpicklingError) and \
        e.__suppress_context__ else None  # (the weights-only unpickler's own error)
    if isinstance(refused, Exception) and str(refused).strip():
        detail = str(refused).strip().split(". ", 1)[0].removesuffix(".") + "."
    else:
        detail = next((p for p in paragraphs[1:]
                       if not p.startswith("Check the documentation")), None)
    return legacy + (f"{said} {' '.join(detail.split())}" if detail else said)


_ENFORCE_PREFIX = re.compile(r"^\[enforce fail at [^\]]*\]\s*\.\s*")


def _version_problem(archive: zipfile.ZipFile) -> str | None:
    """What is wrong with the 'version' record of a zip holding a data.pkl, or None. torch
    reads it from the folder of the archive's first entry (`<folder>/version` or
    `<folder>/.data/version`) and said only 'Expected hasRecord("version") to be true' where
    there is none (a zip built by hand), '[enforce fail at inline_container.cc:215].' where
    it is no number."""
    folder = archive.namelist()[0].split("/", 1)[0]
    records = [f"{folder}/.data/version", f"{folder}/version"]
    record = next((r for r in records if r in archive.namelist()), None)
    if record is None:
        return f"not one torch.save writes (no 'version' record in its folder {folder}/)"
    text = archive.read(record).decode("ascii", "replace").strip()
    if not text.isdigit():
        return f"its 'version' record {record} is no number: {text[:40]!r}"
    return None


def _legacy_format(path: Path) -> bool:
    """The file starts as torch.save's legacy (pre-1.6, `_use_new_zipfile_serialization=
    False`) format does: a pickle of its magic number. torch loads it, but not memory-mapped."""
    starts = [pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=p)
              for p in range(2, pickle.HIGHEST_PROTOCOL + 1)]
    try:
        with open(path, "rb") as f:
            head = f.read(max(map(len, starts)))
    except OSError:
        return False
    return any(head.startswith(start) for start in starts)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomically(path: Path, write, what: str = "checkpoint file") -> None:
    """Write to a temp file in the same directory, fsync, then rename over the target: a crash
    leaves either the old file or the new one, never half of one. A write that fails (a full
    disk: torch.save says only "unexpected pos") removes its temp file and raises
    CheckpointError naming the file (as `what`: any file, not only checkpoints, is written
    so) and the free space left. The temp file is this write's own, created new ("x": never
    through a file or link already there, never into another writer's temp file)."""
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"{what} {path} cannot be written: "
                              f"{_write_problem(e)}{free_space_note(path.parent)}") from e


def write_json(path: Path, data: Any) -> None:
    """`data` as indented JSON, written whole or not at all (write_atomically). Strict JSON:
    a NaN or infinity (a diverged loss) is written as null, never as the bare `NaN` that JSON
    parsers other than Python's reject; the file is still written."""
    text = json.dumps(finite_json(data), indent=2, allow_nan=False) + "\n"
    write_atomically(Path(path), lambda f: f.write(text.encode()), what="file")


def _write_problem(e: Exception) -> str:
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return f"{type(e).__name__}: {e}"


def free_space_note(directory: Path) -> str:
    """"; N GiB free on its filesystem" (a full disk is the usual cause), or nothing."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return ""
    return f" ({free / 1024 ** 3:.2f} GiB free on its filesystem)"


SAVE_FOLDER_PREFIX = "ckpt-"  # (then this host's name and process id: save_folder)
SAVE_LOCK_SUFFIX = ".lock"  # (beside the folder: inside, it would be copied as checkpoint)


@contextlib.contextmanager
def save_folder() -> Iterator[str]:
    """A folder in the temp directory for one checkpoint save until it is reported (copied
    into the run's storage), removed after. A worker killed mid-report (Ray stops the whole
    group on Ctrl-C or one worker's failure; the OOM killer) left its save there for good, a
    whole state.pt or under FSDP its shards, at every kill: each save first removes those
    no process holds. Held means an flock on the lock file beside the folder, which the
    kernel releases with the process: a process id could be another container's (one temp
    directory shared) or reused, and a live save taken for a dead one would be deleted."""
    _remove_saves_no_process_holds()
    prefix = f"{SAVE_FOLDER_PREFIX}{socket.gethostname()}-{os.getpid()}-"
    with tempfile.TemporaryDirectory(prefix=prefix) as folder, _held(folder):
        yield folder


@contextlib.contextmanager
def _held(folder: str) -> Iterator[None]:
    """`folder`'s lock file, created and held (flock) while the save is written and
    reported, removed after (POSIX; elsewhere nothing is held and nothing removed). A temp
    directory whose filesystem takes no flock (Lustre without -o flock: ENOSYS; NFS without
    its lock daemon: ENOLCK) holds nothing either: the save goes on, as before locks."""
    if os.name != "posix":
        yield
        return
    import fcntl

    lock = folder + SAVE_LOCK_SUFFIX
    with open(lock + ".new", "w") as held:
        # Locked before it takes the name a cleaner looks for: one that opened it in
        # between would have got the lock, and deleted this live save.
        try:
            fcntl.flock(held, fcntl.LOCK_EX)
        except OSError:  # (no lock file then: a cleaner leaves an unlocked folder alone)
            os.unlink(lock + ".new")
            yield
            return
        os.rename(lock + ".new", lock)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.unlink(lock)


def _remove_saves_no_process_holds() -> None:
    """Remove save_folder's folders (and lock files) whose lock no process holds: their
    writer died before removing them. A folder without a lock file is left (one being
    created this instant, or named so by something else), and so is another host's: a temp
    directory on NFS shared by several hosts may keep locks per host (`local_lock=flock`,
    `nolock`), where another host's live save looks unheld (its own next save cleans it)."""
    if os.name != "posix":
        return
    import fcntl

    named = re.compile(rf"{SAVE_FOLDER_PREFIX}{re.escape(socket.gethostname())}-\d+-\w+"
                       rf"{re.escape(SAVE_LOCK_SUFFIX)}")
    try:
        entries = list(os.scandir(tempfile.gettempdir()))
    except OSError:
        return
    for entry in entries:
        if not named.fullmatch(entry.name):
            continue
        try:
            with open(entry.path) as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # (raises while held)
                shutil.rmtree(entry.path[:-len(SAVE_LOCK_SUFFIX)], ignore_errors=True)
                os.unlink(entry.path)
        except OSError:  # held (a live save), or gone meanwhile
            continue


def sync_tree(directory: Path) -> None:
    """fsync every file under `directory`, then the directories themselves: a copied
    checkpoint is on disk before the older ones are pruned (after a power loss the copy could
    be empty, the only one left with keep=1)."""
    for root, _, files in os.walk(directory, topdown=False):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        sync_directory(Path(root))


def sync_directory(directory: Path) -> None:
    """fsync a directory: the entries renamed into it are on disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_tensors(path: str | os.PathLike, obj: Any) -> Path:
    """`torch.save` of plain containers of tensors and numbers, atomically, with a `.sha256`
    sidecar written after it."""
    path = Path(path)
    write_atomically(path, lambda f: torch.save(obj, f))
    checksum = sha256_file(path)
    write_atomically(path.with_name(path.name + ".sha256"), lambda f: f.write(checksum.encode()))
    return path


def verify_checksum(path: str | os.PathLike) -> None:
    """The file and its `.sha256` sidecar are there and agree (the file is whole); reads the
    file, unpickles nothing. CheckpointError naming the file otherwise."""
    path = Path(path)
    checksum_path = path.with_name(path.name + ".sha256")
    for p in (path, checksum_path):
        if not p.is_file():
            raise CheckpointError(f"checkpoint file missing: {p}")
    try:  # (a damaged sidecar must not stop the fallback to an older checkpoint)
        expected = checksum_path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "not a sha256"
        raise CheckpointError(f"checkpoint file {checksum_path} cannot be read: "
                              f"{reason}") from None
    _check_digest(path, expected)


def _check_digest(path: Path, expected: str) -> None:
    try:
        actual = sha256_file(path)
    except OSError as e:  # (EIO, ESTALE: a problem the workers agree on, as any other)
        raise _unreadable(path, e) from None
    if actual != expected:
        raise CheckpointError(f"checkpoint {path} is corrupt: sha256 {actual[:12]}... does not "
                              f"match the recorded {expected[:12]}...")


def load_tensors(path: str | os.PathLike, map_location: str = "cpu",
                 verified: bool = False) -> Any:
    """Verify the sidecar checksum (not when `verified`: hashed already, its file unchanged),
    then `torch.load(weights_only=True)`; CheckpointError naming the file otherwise."""
    path = Path(path)
    if not verified:
        verify_checksum(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for bad pickles
        raise CheckpointError(f"checkpoint {path} cannot be loaded safely: "
                              f"{_load_problem(path, e)}") from e


def save_checkpoint(directory: str | os.PathLike, state: dict[str, Any]) -> Path:
    directory = Path(directory)
    _make_directory(directory, "checkpoint")
    return save_tensors(directory / STATE_FILE, state)


def _make_directory(directory: Path, what: str) -> None:
    """mkdir -p, or CheckpointError naming it (a read-only or full filesystem: an OSError)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"{what} {directory} cannot be written: {_write_problem(e)}"
                              f"{free_space_note(directory.parent)}") from None


def is_sharded_checkpoint(directory: str | os.PathLike) -> bool:
    return (Path(directory) / SHARDED_META_FILE).is_file()


def recorded_sha256(directory: str | os.PathLike) -> str:
    """A checkpoint's identity: the recorded sha256 of its state.pt, or of a sharded
    checkpoint's meta.pt (its shards have no sidecar)."""
    name = SHARDED_META_FILE if is_sharded_checkpoint(directory) else STATE_FILE
    return (Path(directory) / f"{name}.sha256").read_text().strip()


def checkpoint_header(directory: str | os.PathLike, rank: int = 0,
                      world_size: int = 1, verified: bool = False) -> dict[str, Any]:
    """What the loop needs to choose a checkpoint to resume from (step, config, ...): a full
    checkpoint's whole state, a sharded one's meta.pt (its shards are read later, in place),
    with "sharded" saying which. CheckpointError naming the file when unusable. Worker `rank`
    of `world_size` hashes every world_size-th shard from its rank on: each shard once over
    all workers, not every shard on every worker (a 64-worker restart of a GPT-2 XL run read
    over a terabyte), so the verdict is only whole once the workers agree (the loop's).
    `verified`: the launcher hashed every file of it and none changed since (runs.
    verified_newest): nothing is hashed again. A file that cannot be looked at (EIO,
    ESTALE, EACCES) is a CheckpointError naming it too (_unreadable)."""
    directory = Path(directory)
    try:
        return _header(directory, rank, world_size, verified)
    except OSError as e:
        raise _unreadable(directory, e) from None


def _unreadable(directory: Path, error: OSError) -> CheckpointError:
    """A checkpoint's file whose stat or read failed (EIO, ESTALE, EACCES) as a problem of
    the checkpoint, which the workers agree on and resume passes over, as _check_digest
    names one: it was an OSError traceback, the worker's failure."""
    return CheckpointError(f"checkpoint file {error.filename or directory} cannot be read: "
                           f"{error.strerror or error}")


def _header(directory: Path, rank: int, world_size: int, verified: bool) -> dict[str, Any]:
    if not is_sharded_checkpoint(directory):
        _refuse_cut_short(directory)
        state = load_tensors(directory / STATE_FILE, verified=verified)
        _refuse_bad_step(state, directory / STATE_FILE)
        return {**state, "sharded": False}
    meta = load_tensors(directory / SHARDED_META_FILE, verified=verified)
    _refuse_bad_step(meta, directory / SHARDED_META_FILE)
    _refuse_without_index(directory)
    # (checkpoints written before shards had digests have none: their shards go unchecked)
    digests = sorted((meta.pop(SHARD_DIGESTS, None) or {}).items())
    for shard in () if digests else sorted(directory.glob("__*.distcp")):
        if shard.stat().st_size == 0:  # (DCP's own: "cannot be read: EOFError", no file)
            raise CheckpointError(f"checkpoint shard {shard} is empty (0 bytes)")
    for name, expected in () if verified else digests[rank::world_size]:
        if not (directory / name).is_file():
            raise CheckpointError(f"checkpoint file missing: {directory / name}")
        _check_digest(directory / name, expected)
    if DCP_METADATA_FILE not in dict(digests):
        _read_index(directory)  # (unchecked by a digest: read here, not first by DCP)
    return {**meta, "sharded": True}


def _refuse_bad_step(state: Any, where: Path) -> None:
    """CheckpointError naming `where` when the state's `step` is there and is no integer >= 0
    (passed on as it was before 2026-12-07: an export recorded 'step': 'x')."""
    step = state.get("step") if isinstance(state, dict) else None
    if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
        raise CheckpointError(f"{where}: its 'step' must be an integer >= 0, got {step!r}: "
                              "not a training checkpoint")


def _refuse_incomplete_config(state: dict, where: Path) -> None:
    """CheckpointError naming `where` when the state's training config lacks a field every
    checkpoint of this project records (config.ALWAYS_SAVED_TRAIN_FIELDS): filled with its
    default it described another model, refused as weights that do not fit "a 'small' GPT"
    without naming the field, or loaded as another run's config."""
    from orchestrator.config import saved_train_config_problem

    problem = saved_train_config_problem(state.get("config"))
    if problem:
        raise CheckpointError(f"{where}: {problem}")


# What a resume reads from a checkpoint's header besides its config, recorded by every
# version of the loop. Its "pending_gradients" and "lr_legs" came later and may be absent:
# nothing pending and one cosine leg to the saved max_steps are what those versions did.
RESUMED_ENTRIES = ("step", "tokens_seen", "scaler", "config")


def refuse_unresumable(header: dict, directory: str | os.PathLike) -> None:
    """CheckpointError naming the file (state.pt, or a sharded checkpoint's meta.pt) when a
    checkpoint_header lacks what a resume reads: an entry (a KeyError in the workers before)
    or a field of its training config (read as its default: a resume of a 'tiny' run with
    --model-size left out compared as 'small' and failed on the weights)."""
    where = _state_file(directory)
    missing = [entry for entry in RESUMED_ENTRIES if entry not in header]
    if missing:
        raise CheckpointError(f"{where} lacks {', '.join(map(repr, missing))}, which every "
                              "training checkpoint records: not a checkpoint to resume from")
    _refuse_incomplete_config(header, where)


def _state_file(directory: str | os.PathLike) -> Path:
    """The file holding a checkpoint's config and step: a sharded one's meta.pt, else
    state.pt (the file named in errors about them)."""
    return Path(directory) / (SHARDED_META_FILE if is_sharded_checkpoint(directory)
                              else STATE_FILE)


def _refuse_unless_sharded(directory: Path) -> None:
    """CheckpointError naming `directory` unless it holds a sharded checkpoint's meta.pt: a
    save cut short before it, a full checkpoint, or no checkpoint at all."""
    if is_sharded_checkpoint(directory):
        return
    if (directory / STATE_FILE).exists():
        raise CheckpointError(f"checkpoint {directory} is not sharded: it holds {STATE_FILE} "
                              "(a full checkpoint)")
    if _has_shards(directory):  # (DCP's files without meta.pt: a save cut short)
        _refuse_cut_short(directory)
    raise CheckpointError(f"checkpoint file missing: {directory / SHARDED_META_FILE}")


def _refuse_without_index(directory: Path) -> None:
    if not (directory / DCP_METADATA_FILE).is_file():
        raise CheckpointError(f"sharded checkpoint {directory} has no {DCP_METADATA_FILE} "
                              "(torch.distributed.checkpoint's index): incomplete")


def _has_shards(directory: Path) -> bool:
    """torch.distributed.checkpoint's files are there (its index or any worker's shards)."""
    return (directory / DCP_METADATA_FILE).is_file() or any(directory.glob("__*.distcp"))


def cut_short_problem(directory: str | os.PathLike) -> str | None:
    """Why the checkpoint `directory` holds no model file, its save cut short before writing
    it: a sharded one without rank 0's meta.pt (written last, after every worker's shards), a
    full one without state.pt. None when either is there. Training's resume, serving, export
    and compression all say this, for a checkpoint named and for one a run falls back past."""
    directory = Path(directory)
    if (directory / STATE_FILE).exists() or is_sharded_checkpoint(directory):
        return None
    if _has_shards(directory) or (directory / f"{SHARDED_META_FILE}.sha256").exists():
        return (f"sharded checkpoint {directory} has no {SHARDED_META_FILE} (written last, by "
                "rank 0): incomplete")
    return f"checkpoint file missing: {directory / STATE_FILE}"


def checkpoint_problem(directory: str | os.PathLike) -> str | None:
    """Why the checkpoint `directory` cannot be resumed from by its files (cut short, a file
    missing or not matching its recorded sha256: what the loop's checkpoint_header checks,
    every shard hashed here; nothing unpickled but a sharded checkpoint's meta.pt), or None."""
    directory = Path(directory)
    try:
        if is_sharded_checkpoint(directory):
            checkpoint_header(directory)
        else:
            _refuse_cut_short(directory)
            verify_checksum(directory / STATE_FILE)
    except CheckpointError as e:
        return str(e)
    return None


def _refuse_cut_short(directory: Path) -> None:
    problem = cut_short_problem(directory)
    if problem:
        raise CheckpointError(problem)


def holds_checkpoint_files(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds any file a training checkpoint's save writes (whole or cut
    short): a checkpoint directory, not a run directory or a directory of something else."""
    directory = Path(directory)
    return (any((directory / name).exists() for name in (
        STATE_FILE, CHECKSUM_FILE, SHARDED_META_FILE, f"{SHARDED_META_FILE}.sha256"))
        or _has_shards(directory))


def save_sharded(directory: str | os.PathLike, tensors: dict[str, Any], meta: dict[str, Any],
                 rank: int) -> None:
    """Every worker calls this (collective): its shards of `tensors` through
    torch.distributed.checkpoint into `directory` (its own or one shared by all), and rank 0
    the plain `meta` after them: a checkpoint without meta.pt is never taken for complete."""
    import torch.distributed.checkpoint as dcp

    directory = Path(directory)
    _make_directory(directory, "sharded checkpoint")
    try:
        dcp.save(tensors, checkpoint_id=str(directory))
    except _dcp_errors() as e:  # (its CheckpointException is no Exception: a traceback)
        # (the free space, as write_atomically says it: a full disk's cause from torch is
        # "[enforce fail at inline_container.cc:672]", which names none)
        raise CheckpointError(f"sharded checkpoint {directory} cannot be written: "
                              f"{_dcp_problem(e)}{free_space_note(directory)}") from e
    digests = _gathered({p.name: sha256_file(p)
                         for p in sorted(directory.glob(f"__{rank}_*.distcp"))})
    if rank == 0:
        # The index too (rank 0 writes it, last): an altered one reads the shards' bytes
        # into the wrong tensors without any shard's digest changing.
        digests[DCP_METADATA_FILE] = sha256_file(directory / DCP_METADATA_FILE)
        save_tensors(directory / SHARDED_META_FILE, {**meta, SHARD_DIGESTS: digests})


# What a DCP index (.metadata) pickle may name besides DCP's own metadata classes and torch
# dtypes: the checkpoint's path (StorageMeta), tensor sizes and layouts, the filesystem
# reader's per-item storage record.
_INDEX_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"),
                  ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
                  ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
                  ("collections", "OrderedDict"),
                  ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}
_INDEX_MODULE = "torch.distributed.checkpoint.metadata"


class _IndexUnpickler(pickle.Unpickler):
    """pickle.Unpickler that builds only what a DCP index holds (Python's documented way to
    restrict unpickling): any other global - a function to call - is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _INDEX_GLOBALS:
            return super().find_class(module, name)
        if module == _INDEX_MODULE:
            import torch.distributed.checkpoint.metadata as dcp_metadata

            found = getattr(dcp_metadata, name, None)
            if isinstance(found, type) and found.__module__ == _INDEX_MODULE:
                return found
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a checkpoint index type "
                                     "(refused: unpickling it could run code)")


@functools.cache
def _safe_reader_class() -> type:
    """torch.distributed.checkpoint's FileSystemReader, its index read by _IndexUnpickler."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        """FileSystemReader whose index (.metadata) is unpickled by _IndexUnpickler."""

        index_read = None  # (the index read already, by _safe_reader's caller)

        def read_metadata(self, *args: Any, **kwargs: Any):
            if self.index_read is not None and kwargs.get("rank") is None:
                metadata = self.index_read
            else:
                metadata = self._read_index_file(self._get_metadata_path(kwargs.get("rank")))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

        def _read_index_file(self, path):
            with self.fs.create_stream(path, "rb") as index:
                try:
                    return _IndexUnpickler(index).load()
                except Exception as e:
                    raise CheckpointError(f"sharded checkpoint index {path} cannot be read "
                                          f"safely: {e}") from None

    return SafeFileSystemReader


def _safe_reader(directory: str | os.PathLike, index=None):
    """A SafeFileSystemReader of `directory`; `index`: its index read already (not again)."""
    reader = _safe_reader_class()(str(directory))
    reader.index_read = index
    return reader


def _gathered(mine: dict[str, str]) -> dict[str, str]:
    """Every worker's {shard file: sha256} merged (collective when a process group is up)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return mine
    everyone: list[dict[str, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return {name: digest for part in everyone for name, digest in (part or {}).items()}


def load_sharded_into(directory: str | os.PathLike, tensors: dict[str, Any]) -> None:
    """Fill `tensors` (sharded or whole, as the current run holds them) in place from a sharded
    checkpoint: torch.distributed.checkpoint reshards to the current layout. Collective when a
    process group is up. A directory that is no sharded checkpoint of this project (no
    meta.pt: empty, a full checkpoint, DCP's files alone, a save cut short) or whose index is
    missing or unreadable is refused first, in one line naming it, every worker together:
    DCP logged a traceback for each of its two tries at the index before its own error."""
    import torch.distributed.checkpoint as dcp

    directory = Path(directory)
    problem, index = None, None
    try:
        _refuse_unless_sharded(directory)
        _refuse_without_index(directory)
        index = _read_index(directory)
    except CheckpointError as e:
        problem = str(e)
    except OSError as e:  # (a stat's EIO, ESTALE: a problem the workers agree on too)
        problem = str(_unreadable(directory, e))
    # (agreed: a worker refusing alone would leave the others waiting in DCP's collectives)
    problem = _gathered({"problem": problem} if problem else {}).get("problem")
    if problem:
        raise CheckpointError(problem)
    try:
        dcp.load(tensors, checkpoint_id=str(directory),
                 storage_reader=_safe_reader(directory, index))
    except _dcp_errors() as e:  # DCP wraps every rank's failure in its own exception types
        raise CheckpointError(f"sharded checkpoint {directory} cannot be loaded: "
                              f"{_dcp_problem(e)}") from e


def sharded_optimizer_names(directory: str | os.PathLike) -> set[str]:
    """The parameters a sharded checkpoint holds optimizer state for (its index's keys are
    'optimizer.state.<parameter>.<entry>'); CheckpointError naming it if unreadable."""
    prefix = "optimizer.state."
    keys = _read_index(directory).state_dict_metadata
    return {k[len(prefix):].rsplit(".", 1)[0] for k in keys if k.startswith(prefix)}


def _read_index(directory: str | os.PathLike):
    """A sharded checkpoint's index (.metadata), read safely; CheckpointError naming it when
    unreadable. checkpoint_header reads an index no digest checks, so that a bad one is
    refused (and passed over on resume, all workers agreeing) before DCP reads it: DCP,
    failing, tried it again as the rank's own (__0.metadata) and logged a traceback for
    each try on stderr before its error (a truncated index of a checkpoint without
    digests)."""
    try:
        return _safe_reader(directory).read_metadata()
    except CheckpointError:
        raise  # (the reader's own: names the index and what is wrong with it)
    except _dcp_errors() as e:
        raise CheckpointError(f"sharded checkpoint {directory}: its {DCP_METADATA_FILE} "
                              f"cannot be read: {_dcp_problem(e)}") from e


def _load_sharded_whole(directory: Path) -> dict[str, Any]:
    """A sharded checkpoint read whole in this process, no process group needed: the same
    entries as a full checkpoint's state (the optimizer's state keyed by parameter name)."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    meta = checkpoint_header(directory)
    tensors: dict[str, Any] = {}
    try:
        _load_state_dict(tensors, storage_reader=_safe_reader(directory),
                         planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    except _dcp_errors() as e:
        raise CheckpointError(f"sharded checkpoint {directory} cannot be read: "
                              f"{_dcp_problem(e)}") from e
    meta.pop("sharded")
    for entry in ("model", "optimizer"):  # (a bare KeyError before 2026-12-07)
        if entry not in tensors:
            raise CheckpointError(f"sharded checkpoint {directory} holds no '{entry}' entry "
                                  "in its shards: not a training checkpoint")
    return {**meta, "model": tensors["model"], "optimizer": tensors["optimizer"],
            "pending_gradients": tensors.get("pending", {})}


def load_checkpoint(directory: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's whole state, full or sharded (read whole here)."""
    if is_sharded_checkpoint(directory):
        return _load_sharded_whole(Path(directory))
    _refuse_cut_short(Path(directory))  # (not "state.pt missing" where shards were written)
    return load_tensors(Path(directory) / STATE_FILE)


def model_from_state(state: Any, directory: str | os.PathLike):
    """Rebuild the GPT a training checkpoint's state describes: (model in eval mode,
    TrainConfig). CheckpointError naming the file when the state is not a training checkpoint,
    its config is invalid, or the weights do not fit the model it describes."""
    model, train_config = _fitted_model(state, directory, torch.device("cpu"))
    return model.eval(), train_config


def _fitted_model(state: Any, directory: str | os.PathLike, device: torch.device):
    """(the GPT `state` describes, on `device`, its weights loaded, TrainConfig); on the meta
    device only their names and shapes are checked (nothing is read or allocated).
    CheckpointError naming the file where they do not fit it."""
    from orchestrator.training.model import GPT

    gpt_config, train_config, where = _described_model(state, directory)
    try:
        with device:
            model = GPT(gpt_config)
        # (assigned on the meta device: a copy into it is a no-op torch warns about)
        model.load_state_dict(state["model"], assign=device.type == "meta")
    except (RuntimeError, ValueError, AttributeError) as e:
        # One line: torch's own message has a line per weight (dozens for a whole model).
        raise CheckpointError(f"{where}: the weights do not fit a {train_config.model_size!r} "
                              f"GPT: {_weights_mismatch(state['model'], gpt_config, e)}"
                              ) from None
    return model, train_config


def _described_model(state: Any, directory: str | os.PathLike):
    """(GPTConfig, TrainConfig, the file named in errors) of the GPT a training checkpoint's
    state describes; only the shapes of its weights are read (`state["model"]` may hold
    tensors on the meta device, or memory-mapped ones never touched)."""
    from orchestrator.config import ConfigError, TrainConfig
    from orchestrator.training.model import GPTConfig, widths_from_state_dict

    where = _state_file(directory)
    if not isinstance(state, dict) or not {"model", "config"} <= set(state):
        raise CheckpointError(f"{where} is not a training checkpoint: it needs 'model' and "
                              "'config' entries")
    _refuse_bad_step(state, where)
    _refuse_incomplete_config(state, where)
    try:
        train_config = TrainConfig.from_dict(state["config"])
    except ConfigError as e:
        raise CheckpointError(f"{where}: its training config is invalid: {e}") from None
    # The vocabulary is the run's tokenizer's (256 bytes for runs from before it was
    # recorded: TrainConfig.vocab_size's default).
    gpt_config = GPTConfig.from_train_config(train_config, vocab_size=train_config.vocab_size)
    try:
        # A structurally pruned model's per-layer widths are read off its weights' shapes.
        gpt_config = dataclasses.replace(gpt_config, **widths_from_state_dict(state["model"],
                                                                              gpt_config))
    except (RuntimeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{where}: the weights do not fit a {train_config.model_size!r} "
                              f"GPT: {_weights_mismatch(state['model'], gpt_config, e)}"
                              ) from None
    return gpt_config, train_config, where


def checkpoint_model_config(directory: str | os.PathLike):
    """The GPTConfig of the model a training checkpoint holds (what model_from_state builds:
    context, shape, vocabulary, a pruned model's per-layer widths), read without its weights:
    a full checkpoint's state.pt is memory-mapped and only its pickle of names, config and
    tensor shapes is read (its tensors' bytes never are, nor hashed: the load that follows
    verifies them); a sharded one's meta.pt and its shards' index, not the shards. Weights
    that do not fit the GPT its config describes (names, shapes) are refused as
    model_from_state refuses them. CheckpointError naming the file when unusable."""
    directory = Path(directory)
    if is_sharded_checkpoint(directory):
        state = {**load_tensors(directory / SHARDED_META_FILE),  # (small: no weights)
                 "model": _sharded_model_shapes(directory)}
    else:
        _refuse_cut_short(directory)
        path = directory / STATE_FILE
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises several types for bad pickles
            if not _legacy_format(path):
                verify_checksum(path)  # (hashed only now: a damaged file is named as corrupt)
                raise CheckpointError(f"checkpoint {path} cannot be loaded safely: "
                                      f"{_load_problem(path, e)}") from e
            state = load_tensors(path)  # (torch memory-maps no legacy file: read it whole)
    # (the weights' names and shapes checked against that GPT's, as the full load checks them:
    # a config without seq_len read as the default context, though the weights held fewer)
    return _fitted_model(state, directory, torch.device("meta"))[0].config


def _sharded_model_shapes(directory: Path) -> dict[str, torch.Tensor]:
    """The model's weights in a sharded checkpoint as tensors on the meta device (shapes
    only), from torch.distributed.checkpoint's index."""
    prefix = "model."
    _refuse_without_index(directory)
    try:
        entries = _safe_reader(directory).read_metadata().state_dict_metadata
    except _dcp_errors() as e:
        raise CheckpointError(f"sharded checkpoint {directory}: its {DCP_METADATA_FILE} "
                              f"cannot be read: {_dcp_problem(e)}") from e
    return {name[len(prefix):]: torch.empty(tuple(entry.size), device="meta")
            for name, entry in entries.items()
            if name.startswith(prefix) and hasattr(entry, "size")}


def _weights_mismatch(weights: Any, gpt_config, error: Exception) -> str:
    """What of a state dict does not fit the GPT `gpt_config` describes, in one line: the
    missing, unexpected and other-shaped entries counted, the first of each named."""
    from orchestrator.training.model import GPT

    if not isinstance(weights, dict):
        return f"{type(weights).__name__} is not a state dict"
    try:
        with torch.device("meta"):  # shapes only, nothing allocated (a gpt2-xl config is GBs)
            expected = GPT(gpt_config).state_dict()
    except (RuntimeError, ValueError, AttributeError):  # widths read off the weights that
        return str(error).splitlines()[0]               # build no model: the error says why
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    reshaped = [k for k in expected if k in weights and hasattr(weights[k], "shape")
                and tuple(weights[k].shape) != tuple(expected[k].shape)]
    parts = [f"{len(names)} {what} (first {names[0]})"
             for names, what in ((missing, "missing"), (unexpected, "unexpected")) if names]
    if reshaped:
        k = reshaped[0]
        parts.append(f"{len(reshaped)} of another shape (first {k}: "
                     f"{list(weights[k].shape)} in the checkpoint, {list(expected[k].shape)} "
                     "in the model)")
    return "; ".join(parts) or str(error).splitlines()[0]


def first_that_loads(candidates: list[Path], is_run: bool, path: str | os.PathLike, load,
                     on_skip=None) -> tuple[Any, list[str]]:
    """(`load(directory)` of the first of `candidates` (newest first) that loads, the problems
    of those skipped). A run directory (`is_run`) falls back past a candidate whose load raises
    CheckpointError, telling `on_skip(error)`; a checkpoint named explicitly must itself load.
    Other errors from `load` (a candidate refused outright) propagate."""
    problems = []
    for directory in candidates:
        try:
            return load(directory), problems
        except CheckpointError as e:
            if not is_run:
                raise
            problems.append(str(e))
            if on_skip is not None:
                on_skip(e)
    # (expanded: '--checkpoint=~/run' reaches here with its tilde, and was named <cwd>/~/run)
    raise CheckpointError("no usable checkpoint in run directory "
                          f"{Path(path).expanduser().resolve()}: " + " | ".join(problems))


def newest_usable_checkpoint(candidates: list[Path], is_run: bool, path: str | os.PathLike,
                             on_skip=None, check=None):
    """(directory, state, model, train_config) of the first of `candidates` (newest first)
    that loads, as first_that_loads picks it. `check(directory)` may refuse a candidate
    outright (raise) before it is read."""
    def load(directory: Path):
        if check is not None:
            check(directory)
        state = load_checkpoint(directory)
        return (directory, state, *model_from_state(state, directory))

    found, _ = first_that_loads(candidates, is_run, path, load, on_skip)
    return found
