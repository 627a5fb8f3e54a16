"""Files the pipeline writes: atomic, checksummed, loadable without unpickling code.

Tensor files are `torch.save` of plain containers of tensors and numbers, with a `.sha256`
sidecar; they are read back with `torch.load(weights_only=True)` after the checksum matches
(the same contract as orchestrator/training/checkpoint.py). A stage's output directory is
built under a hidden temporary name and renamed into place when complete, so a crash or an
error never leaves a directory that looks finished.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch

from orchestrator.training.checkpoint import CheckpointError

__all__ = ["CheckpointError", "save_tensors", "load_tensors", "write_json", "staged_dir",
           "sha256_file"]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_tensors(path: Path, obj: Any) -> Path:
    path = Path(path)
    _atomic_write(path, lambda f: torch.save(obj, f))
    checksum = sha256_file(path)
    _atomic_write(path.with_name(path.name + ".sha256"), lambda f: f.write(checksum.encode()))
    return path


def load_tensors(path: Path, map_location: str = "cpu") -> Any:
    path = Path(path)
    checksum_path = path.with_name(path.name + ".sha256")
    for p in (path, checksum_path):
        if not p.is_file():
            raise CheckpointError(f"file missing: {p}")
    expected = checksum_path.read_text().strip()
    actual = sha256_file(path)
    if actual != expected:
        raise CheckpointError(f"{path} is corrupt: sha256 {actual[:12]}... does not match the "
                              f"recorded {expected[:12]}...")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for bad pickles
        raise CheckpointError(f"{path} cannot be loaded safely: {e}") from e


def write_json(path: Path, data: Any) -> None:
    _atomic_write(Path(path), lambda f: f.write((json.dumps(data, indent=2) + "\n").encode()))


@contextlib.contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Yield an empty hidden directory beside `final`; rename it to `final` on success,
    delete it on any error."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
