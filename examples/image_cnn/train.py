"""A plain PyTorch image classifier (a small CNN on 16x16 line patterns read from .npz
files), made placeable by the scheduler.

As in examples/regression, three lines are the launcher's (marked "launcher"): the import,
`launch.report(...)` in place of `ray.train.report(...)`, and the resume from
`ray.train.get_checkpoint()`. The model, the .npz reader, the batches and the checkpoint dict
are the user's own.

    python examples/image_cnn/make_data.py                       # the data, once
    python -m orchestrator submit examples/image_cnn/job.yaml

Config keys: data_dir (train-*.npz shards and test.npz; relative: to this file's folder,
then to the worker's working directory, which Ray Train sets to its own
/tmp/ray/session_*/artifacts/<job name>, not the folder `submit` ran in: give data written
elsewhere as an absolute path), steps, batch_size, checkpoint_every, lr, seed.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch
from torch import nn

from orchestrator import launch  # launcher

HERE = Path(__file__).resolve().parent
CLASSES = 4


class SmallCNN(nn.Module):
    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),       # 8x8
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))  # 4x4
        self.head = nn.Linear(channels * 4 * 4, CLASSES)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).flatten(1))


def find_data(data_dir: str) -> Path:
    path = Path(data_dir).expanduser()
    candidates = [path] if path.is_absolute() else [HERE / path, Path.cwd() / path]
    for candidate in candidates:
        if (candidate / "test.npz").is_file():
            return candidate
    raise FileNotFoundError(f"no train-*.npz/test.npz in {' or '.join(map(str, candidates))} "
                            "(write them with examples/image_cnn/make_data.py --out DIR)")


def load(paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for path in paths:
        with np.load(path) as f:
            images.append(f["images"])
            labels.append(f["labels"])
    x = torch.from_numpy(np.concatenate(images)).float().div_(255.0).unsqueeze(1)
    return x, torch.from_numpy(np.concatenate(labels))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def train_loop(config: dict) -> None:
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    folder = find_data(config.get("data_dir", "data"))
    shards = sorted(folder.glob("train-*.npz"))
    x, y = load(shards[rank::world] or shards)  # this worker's shards
    test_x, test_y = load([folder / "test.npz"])

    seed = config.get("seed", 0)
    torch.manual_seed(seed)
    model = SmallCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.get("lr", 0.01))
    start = 0
    checkpoint = ray.train.get_checkpoint()  # set after a restart or a preemption
    if checkpoint:
        with checkpoint.as_directory() as saved:
            state = torch.load(Path(saved) / "state.pt", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
    model = ray.train.torch.prepare_model(model)  # DDP across the workers

    steps, every = config.get("steps", 20), config.get("checkpoint_every", 5)
    batch_size = config.get("batch_size", 64)
    for step in range(start, steps):
        # The batch is a function of (seed, rank, step): a resumed run sees the same batches.
        pick = torch.randint(len(x), (batch_size,),
                             generator=torch.Generator().manual_seed(seed * 100003 + step * 1009
                                                                     + rank))
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x[pick]), y[pick])
        loss.backward()
        optimizer.step()
        metrics = {"step": step, "loss": loss.item(), "start_step": start,
                   "samples": batch_size * world}
        if rank == 0 and ((step + 1) % every == 0 or step + 1 == steps):
            plain = getattr(model, "module", model)
            metrics["test_accuracy"] = accuracy(plain, test_x, test_y)
            with tempfile.TemporaryDirectory() as saved:
                torch.save({"model": plain.state_dict(), "optimizer": optimizer.state_dict(),
                            "step": step + 1}, Path(saved) / "state.pt")
                checkpoint = ray.train.Checkpoint.from_directory(saved)
                launch.report(metrics, checkpoint=checkpoint)  # launcher
        else:
            launch.report(metrics)  # launcher
