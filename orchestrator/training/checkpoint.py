"""Checkpoint files: written atomically with a checksum, read without unpickling code.

A checkpoint directory holds `state.pt` (a dict of tensors and plain values) and
`state.pt.sha256`. Loading verifies the checksum first and then uses
`torch.load(weights_only=True)`, which refuses any pickle that would construct arbitrary
objects, so a tampered file cannot run code.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"
CHECKSUM_FILE = STATE_FILE + ".sha256"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or unreadable; the message names the file."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_atomically(path: Path, write) -> None:
    """Write to a temp file in the same directory, fsync, then rename over the target: a crash
    leaves either the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(directory: str | os.PathLike, state: dict[str, Any]) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state_path = directory / STATE_FILE
    _write_atomically(state_path, lambda f: torch.save(state, f))
    checksum = _sha256(state_path)
    _write_atomically(directory / CHECKSUM_FILE, lambda f: f.write(checksum.encode()))
    return state_path


def load_checkpoint(directory: str | os.PathLike) -> dict[str, Any]:
    directory = Path(directory)
    state_path, checksum_path = directory / STATE_FILE, directory / CHECKSUM_FILE
    for path in (state_path, checksum_path):
        if not path.is_file():
            raise CheckpointError(f"checkpoint file missing: {path}")
    expected = checksum_path.read_text().strip()
    actual = _sha256(state_path)
    if actual != expected:
        raise CheckpointError(f"checkpoint {state_path} is corrupt: sha256 {actual[:12]}... "
                              f"does not match the recorded {expected[:12]}...")
    try:
        return torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for bad pickles
        raise CheckpointError(f"checkpoint {state_path} cannot be loaded safely: {e}") from e
