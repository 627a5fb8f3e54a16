"""Reading the token shards (orchestrator/training/shards.py) as a training worker does."""
import json
import os

import numpy as np
import torch

from orchestrator.training import shards
from orchestrator.training.data import get_batch
from orchestrator.training.shards import open_shards


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


def test_open_files_do_not_grow_with_the_number_of_shards(tmp_path):
    """500 small files make ~1,000 shards. Every memory map holds a file descriptor, so
    mapping them all ran each worker out of its 1,024 (EMFILE), after the whole pass."""
    tokens = np.random.default_rng(0).integers(0, 300, 60_000).astype(np.uint16)
    train_parts = np.array_split(tokens, 400)
    write_cache(tmp_path, train_parts, np.array_split(tokens[:8000], 200))
    before = open_fds()
    train, held_out, _ = open_shards(str(tmp_path))
    in_memory = torch.from_numpy(tokens.astype(np.int64))
    for step in range(200):  # windows all over the 400 shards, the same as in memory
        a = get_batch(train, 8, 64, seed=1, rank=0, step=step)
        b = get_batch(in_memory, 8, 64, seed=1, rank=0, step=step)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert np.array_equal(train.window(0, len(train)), tokens)
    assert np.array_equal(held_out.window(0, len(held_out)), tokens[:8000])
    grown = open_fds() - before
    assert grown <= shards.OPEN_MAPS_MAX + 2, f"{grown} files open for 600 shards"
