"""Files the pipeline writes: atomic, checksummed, loadable without unpickling code.

Tensor files are `torch.save` of plain containers of tensors and numbers, with a `.sha256`
sidecar; they are read back with `torch.load(weights_only=True)` after the checksum matches
(the same contract as orchestrator/training/checkpoint.py). A stage's output directory is
built under a hidden temporary name and renamed into place when complete, so a crash or an
error never leaves a directory that looks finished.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

# One implementation of checksummed tensor files, shared with training checkpoints.
from orchestrator.training.checkpoint import (CheckpointError, load_tensors, save_tensors,
                                              sha256_file, write_atomically)

__all__ = ["CheckpointError", "save_tensors", "load_tensors", "write_json", "staged_dir",
           "sha256_file"]


def write_json(path: Path, data: Any) -> None:
    write_atomically(Path(path),
                     lambda f: f.write((json.dumps(data, indent=2) + "\n").encode()))


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
