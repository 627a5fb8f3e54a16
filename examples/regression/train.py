"""A plain PyTorch regression loop (an MLP on CSV files), made placeable by the scheduler.

What makes it placeable is three lines, marked "launcher" below: import `launch`, call
`launch.report(...)` where a Ray Train loop calls `ray.train.report(...)`, and resume from
`ray.train.get_checkpoint()` (which a Ray Train loop does anyway). Everything else is the
user's own: the model, the CSV reader, the checkpoint dict.

    python -m orchestrator submit examples/regression/job.yaml     # see examples/README.md

Config keys (the job file's `config:`): data_dir (a folder of CSV files x0..xN,y; relative:
to this file's folder, then to the worker's working directory, which Ray Train sets to its
own /tmp/ray/session_*/artifacts/<job name>, not the folder `submit` ran in: give data
written elsewhere as an absolute path), steps, checkpoint_every, hidden, lr, seed.
"""
from __future__ import annotations

import csv
import tempfile
from pathlib import Path

import ray.train
import ray.train.torch
import torch
from torch import nn

from orchestrator import launch  # launcher

HERE = Path(__file__).resolve().parent


class MLP(nn.Module):
    def __init__(self, inputs: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(),
                                 nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


def find_data(data_dir: str) -> Path:
    path = Path(data_dir).expanduser()
    candidates = [path] if path.is_absolute() else [HERE / path, Path.cwd() / path]
    for candidate in candidates:
        if candidate.is_dir() and any(candidate.glob("*.csv")):
            return candidate
    raise FileNotFoundError(f"no CSV files in {' or '.join(map(str, candidates))} (write "
                            "some with examples/regression/make_data.py --out DIR)")


def load_rows(folder: Path, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This worker's rows (every world-th row of all CSV files, in file order)."""
    rows = []
    for path in sorted(folder.glob("*.csv")):
        with open(path, newline="") as f:
            reader = csv.reader(f)
            next(reader)  # header
            rows.extend([float(v) for v in row] for row in reader if row)
    table = torch.tensor(rows[rank::world], dtype=torch.float32)
    return table[:, :-1], table[:, -1]


def save_checkpoint(model: nn.Module, optimizer, next_step: int, folder: str):
    torch.save({"model": getattr(model, "module", model).state_dict(),
                "optimizer": optimizer.state_dict(), "step": next_step},
               Path(folder) / "state.pt")
    return ray.train.Checkpoint.from_directory(folder)


def train_loop(config: dict) -> None:
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    x, y = load_rows(find_data(config.get("data_dir", "data")), rank, world)

    torch.manual_seed(config.get("seed", 0))
    model = MLP(x.shape[1], config.get("hidden", 32))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.get("lr", 0.01))
    start = 0
    checkpoint = ray.train.get_checkpoint()  # set after a restart or a preemption
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / "state.pt", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
    model = ray.train.torch.prepare_model(model)  # DDP across the workers

    steps, every = config.get("steps", 20), config.get("checkpoint_every", 5)
    for step in range(start, steps):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)  # the whole shard: it is small
        loss.backward()
        optimizer.step()
        metrics = {"step": step, "loss": loss.item(), "start_step": start,
                   "samples": len(x) * world}
        if rank == 0 and ((step + 1) % every == 0 or step + 1 == steps):
            with tempfile.TemporaryDirectory() as folder:
                launch.report(metrics, checkpoint=save_checkpoint(model, optimizer, step + 1,
                                                                  folder))  # launcher
        else:
            launch.report(metrics)  # launcher
