"""Files the pipeline writes: atomic, checksummed, loadable without unpickling code.

Tensor files are `torch.save` of plain containers of tensors and numbers, with a `.sha256`
sidecar; they are read back with `torch.load(weights_only=True)` after the checksum matches
(the same contract as orchestrator/training/checkpoint.py). A stage's output directory is
built under a hidden temporary name and renamed into place when complete, so a crash or an
error never leaves a directory that looks finished.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

import torch

# One implementation of checksummed tensor files and atomic JSON, shared with training.
from orchestrator.training.checkpoint import (CheckpointError, load_tensors, save_tensors,
                                              sha256_file, write_json)

__all__ = ["CheckpointError", "save_tensors", "load_tensors", "write_json", "staged_dir",
           "sha256_file", "cpu_state_dict", "file_in_the_way", "onnx_files", "remove_onnx"]


def cpu_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copies of `model.state_dict()` in which entries that are one tensor in the
    model (the token embedding and the LM head tied to it) are still one tensor, so
    torch.save writes it once. Copying entry by entry would not: `.cpu()` of a CUDA tensor,
    or `.clone()` of any, makes a copy per entry, and the file would hold the embedding
    twice. Each entry is its own tensor object over the shared copy, as in state_dict(): a
    CPU model's copy then serializes to the very bytes its own state does."""
    copies: dict[tuple, torch.Tensor] = {}
    state = {}
    for name, tensor in model.state_dict().items():
        same = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape),
                tensor.stride())
        if same not in copies:
            copies[same] = tensor.detach().cpu().clone()
        state[name] = copies[same].detach()
    return state


def file_in_the_way(directory: Path) -> Path | None:
    """The file that keeps `directory` from being used or created as a directory: the path
    itself, or its nearest existing ancestor, when that is not a directory. None when there is
    none (checked before any work, so an unusable output path fails at once, named)."""
    directory = Path(directory)
    for path in (directory, *directory.parents):
        if path.exists():
            return None if path.is_dir() else path
    return None


def onnx_files(path: Path) -> list[Path]:
    """An ONNX graph file and, when there, the `<file>.data` beside it that holds its weights:
    torch.onnx writes one once a model's weights pass 1.5 GiB, whatever external_data=False
    says."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return [path, data] if data.is_file() else [path]


def remove_onnx(path: Path) -> None:
    """Delete an ONNX file and its weights file, if any (onnx_files)."""
    for file in onnx_files(path):
        file.unlink(missing_ok=True)


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
