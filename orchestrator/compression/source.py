"""The teacher: a pretrain checkpoint, given as a run directory or a checkpoint directory."""
from __future__ import annotations

import io
import hashlib
from pathlib import Path
from typing import Any, Callable

import torch

from orchestrator.compression.artifacts import cpu_state_dict
from orchestrator.hf_files import holds_hf_model
from orchestrator.runs import (COMPRESS_CONFIG_FILE, checkpoint_dirs, compress_stage_problem,
                               compressed_from)
from orchestrator.tokenizer import ByteTokenizer, Tokenizer, TokenizerError, tokenizer_of_run
from orchestrator.training.checkpoint import (SHARDED_META_FILE, STATE_FILE, CheckpointError,
                                              holds_checkpoint_files,
                                              newest_usable_checkpoint, recorded_sha256)
from orchestrator.training.model import GPT
from orchestrator.validation import expand_home


def checkpoint_candidates(path: str | Path) -> tuple[list[Path], bool]:
    """(checkpoint directories newest first, whether `path` was a run directory)."""
    p = expand_home(path, "--checkpoint", CheckpointError).resolve()
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if p.is_file():
        raise CheckpointError(_file_given(p))
    if holds_checkpoint_files(p):  # (one whose save was cut short says so as it loads)
        return [p], False
    inside = checkpoint_dirs(p)
    if inside:
        return inside, True
    if holds_hf_model(p):  # (as serving and jobs/export.py name one)
        raise CheckpointError(f"--checkpoint {p} is a Hugging Face model (jobs/export.py "
                              "writes those): compress the training checkpoint it came from")
    stage = compress_stage_problem(p, "--checkpoint", "compress the training checkpoint it "
                                   "was compressed from, {source}")
    if stage:
        raise CheckpointError(stage)
    compressed = _compress_output_problem(p)
    if compressed:
        raise CheckpointError(compressed)
    raise CheckpointError(f"{p} is neither a checkpoint directory (no {STATE_FILE}) nor a run "
                          "directory (no checkpoint_* inside)")


def _compress_output_problem(p: Path) -> str | None:
    """What `p` is where it is a jobs/compress.py output or an INT8 export (not a teacher),
    with the training checkpoint to compress instead; None otherwise."""
    from orchestrator.compression.export import TORCH_FILE

    if (p / COMPRESS_CONFIG_FILE).is_file():
        what, output = f"a jobs/compress.py output ({COMPRESS_CONFIG_FILE})", p
    elif (p / TORCH_FILE).is_file():
        what, output = f"an INT8 export ({TORCH_FILE})", p.parent
    else:
        return None
    instead = (f"compress the training checkpoint it was compressed from, "
               f"{compressed_from(output)}" if (output / COMPRESS_CONFIG_FILE).is_file()
               else "compress the training checkpoint it came from")
    return f"--checkpoint {p} is {what}, not a training checkpoint: {instead}"


def _file_given(p: Path) -> str:
    """--checkpoint names a file (state.pt itself, say): the directory to pass instead."""
    if holds_checkpoint_files(p.parent):
        return (f"--checkpoint {p} is a file: pass the checkpoint directory that holds it, "
                f"{p.parent}")
    return (f"--checkpoint {p} is a file, not a pretrain checkpoint directory (holding "
            f"{STATE_FILE}, or a sharded checkpoint's {SHARDED_META_FILE}) or a run directory")


def load_teacher(path: str | Path, log: Callable[[str], None]
                 ) -> tuple[GPT, dict[str, Any]]:
    """The teacher model and a description of where it came from (for compress_config.json).
    A run directory falls back past corrupt checkpoints to the newest usable one, with a
    warning; a checkpoint directory given explicitly must itself be usable. One whose
    logits are not finite (its weights diverged) is refused (CheckpointError)."""
    from orchestrator.serving.loading import loaded_model_problem

    candidates, is_run = checkpoint_candidates(path)
    directory, state, model, train_config = newest_usable_checkpoint(
        candidates, is_run, path,
        on_skip=lambda e: log(f"warning: {e}; trying the previous checkpoint"))
    # Serving's forward probe, as jobs/export.py asks it: a diverged teacher made every
    # fine-tune's loss NaN, found only once --out had been written.
    problem = loaded_model_problem(model, str(directory), "cpu")
    if problem:
        raise CheckpointError(f"{problem} (its weights diverged): it cannot teach; compress a "
                              "checkpoint saved before its run diverged")
    source = {"checkpoint": str(directory), "sha256": recorded_sha256(directory),
              "step": state.get("step"), "model_size": train_config.model_size,
              "params": sum(p.numel() for p in model.parameters()),
              # What it was trained on and with which tokenizer: the fine-tunes use the
              # same data in the same tokens (teacher_data).
              "train": train_config.to_dict()}
    return model, source


def teacher_tokenizer(source: dict[str, Any]) -> Tokenizer:
    """The tokenizer the teacher was trained with (its run's tokenizer.json, checked against
    the checkpoint's record); bytes for a teacher without a run (the benchmark's, in process)
    and for runs from before tokenizers were recorded. The int8 export carries it: without
    it a BPE-trained model was served with the byte tokenizer. CheckpointError when the
    recorded one is missing or altered."""
    if "train" not in source:
        return ByteTokenizer()
    try:
        return tokenizer_of_run(source["checkpoint"],
                                source["train"].get("tokenizer_sha256") or "")
    except TokenizerError as e:
        raise CheckpointError(f"the teacher's tokenizer: {e}") from None


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of a model's serialized weights: identifies a teacher that has no checkpoint
    file (the benchmark's in-process teacher)."""
    buffer = io.BytesIO()
    torch.save(cpu_state_dict(model), buffer)  # the same bytes from a CUDA model
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def teacher_data(source: dict[str, Any], eval_tokens: int) -> tuple[Any, torch.Tensor]:
    """(training tokens, held-out tokens) for the fine-tunes and the perplexity: the teacher
    run's own data in its own tokens (its memory-mapped shard cache, or the bundled corpus in
    bytes), so a run trained with a BPE tokenizer is compressed on the ids it knows and scored
    on text it never trained on. A teacher without a run (the benchmark's, in process) gets
    the bundled corpus. The held-out part is the first `eval_tokens` + 1 tokens, in memory."""
    from orchestrator.config import TrainConfig
    from orchestrator.training.data import load_corpus, split_corpus
    from orchestrator.training.loop import training_data

    if "train" not in source:
        return split_corpus(load_corpus())
    try:
        train, held_out = training_data(TrainConfig.from_dict(source["train"]))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"the teacher's training data (recorded in "
                              f"{source['checkpoint']}) cannot be read: {e}") from None
    if not isinstance(held_out, torch.Tensor):  # memory-mapped shards
        count = min(len(held_out), eval_tokens + 1)
        held_out = torch.from_numpy(held_out.window(0, count).astype("int64"))
    return train, held_out
