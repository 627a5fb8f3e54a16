"""What more than one test module needs, in one place: `from tests.support import ...`.

- `free_port()`: a free TCP port (the product's own, orchestrator/serving/settings.py, which
  the scripts use too);
- `wait_for(what, check, timeout_s, every_s, ignore)`: poll until `check()` is truthy, its
  value, or a TimeoutError naming `what` (the product's own, orchestrator/polling.py, which
  the chaos run and the serving benchmark use too);
- `run_summary(run_dir)`: the summary.json a `jobs/pretrain.py` run wrote;
- `one_thread()`: torch on one intra-op thread for the duration (tiny matmuls on a busy
  2-core machine only contend with a second thread);
- `CrashingSession(run_dir, crash_at, device)`: a LocalSession that dies right after the
  checkpoint of a given step, like a killed worker;
- `agreed_precision_worker(rank, choices, rendezvous, out)`: one process of a gloo group
  whose device resolves `auto` to `choices[rank]`; writes the job's precision to out/<rank>.
- `resave_without(checkpoint, name)`: a full training checkpoint written again by the project's
  own save without `name`, a field of its training config or else an entry of its state (a
  damaged or foreign file);
- `host_reads_from(monkeypatch, *files)`: the list that every `Tensor.item` / `tolist` called
  from code in those source files appends to (each is a host sync on a GPU).

Test-only helpers live here; anything the scripts also need belongs in the product (scripts
must not import tests/). Serve app configs are built by the product too:
`orchestrator.serving.settings.serve_app_config`.
"""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Iterator

import torch

from orchestrator.polling import wait_for
from orchestrator.serving.settings import free_port
from orchestrator.training.session import LocalSession

__all__ = ["CrashingSession", "free_port", "one_thread", "resave_without", "run_summary",
           "wait_for"]


def resave_without(checkpoint: str | Path, name: str) -> Path:
    """The full (state.pt) training checkpoint in `checkpoint` saved again, checksum and all,
    without `name`: removed from its training config where the config has it, else from the
    state itself. What a reader must refuse, naming the file and `name`."""
    from orchestrator.training.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(checkpoint)
    if name in state["config"]:
        del state["config"][name]
    else:
        del state[name]
    save_checkpoint(checkpoint, state)
    return Path(checkpoint)


class CrashingSession(LocalSession):
    """Dies right after the checkpoint of `crash_at` is saved, like a killed worker."""

    def __init__(self, run_dir, crash_at, device=torch.device("cpu")):
        super().__init__(run_dir, device=device)
        self.crash_at = crash_at

    def report(self, metrics, checkpoint_dir):
        super().report(metrics, checkpoint_dir)
        if metrics["step"] == self.crash_at:
            raise RuntimeError("worker killed")


def run_summary(run_dir: str | Path) -> dict[str, Any]:
    """The summary.json a finished `jobs/pretrain.py` run wrote in `run_dir`."""
    return json.loads((Path(run_dir) / "summary.json").read_text())


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread inside the block, as many as before after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def emulation_warning_worker(rank: int, warnings: list[str | None], rendezvous: str,
                             out: str) -> None:
    """A worker (torch.multiprocessing.spawn target) whose own device gives `warnings[rank]`
    for a precision asked for; writes what it said."""
    import datetime

    import torch.distributed as dist

    from orchestrator.training import loop

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=len(warnings), timeout=datetime.timedelta(seconds=60))
    said = []
    try:
        loop.emulation_warning = lambda requested, device: warnings[rank]
        loop.say = lambda line: said.append(line + "\n")
        loop.job_precision("bf16", torch.device("cpu"), rank)
        Path(out, str(rank)).write_text("".join(said))
    finally:
        dist.destroy_process_group()


def agreed_precision_worker(rank: int, choices: list[str], rendezvous: str, out: str) -> None:
    """A worker (torch.multiprocessing.spawn target) whose own device gives `choices[rank]`
    for `auto`, as an A100 and a T4 placed in one job do; writes what the job agreed on."""
    import datetime

    import torch.distributed as dist

    from orchestrator.training import loop

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=len(choices), timeout=datetime.timedelta(seconds=60))
    try:
        loop.resolve_precision = lambda requested, device: choices[rank]
        agreed = loop.job_precision("auto", torch.device("cpu"), rank)
        Path(out, str(rank)).write_text(agreed)
    finally:
        dist.destroy_process_group()


def sweep_when_first_locked(monkeypatch, module, sweep) -> list[bool]:
    """Make `module`'s first exclusive flock run `sweep()` just before it is taken (another
    process's sweep at that moment); the list returned holds True once it has run."""
    import fcntl as real_fcntl
    import types

    swept: list[bool] = []

    def flock(f, operation):
        if operation & real_fcntl.LOCK_EX and not swept:
            swept.append(True)
            sweep()
        return real_fcntl.flock(f, operation)

    monkeypatch.setattr(module, "fcntl", types.SimpleNamespace(
        **{name: getattr(real_fcntl, name) for name in dir(real_fcntl) if name.isupper()},
        flock=flock))
    return swept


def host_reads_from(monkeypatch, *files: str) -> list[int]:
    """The list that every `Tensor.item` / `Tensor.tolist` called from code in `files` (a
    module's `__file__`) appends 1 to: on a GPU each is a host sync draining its queue."""
    reads: list[int] = []

    def counting(original):
        def read(tensor):
            if sys._getframe(1).f_code.co_filename in files:
                reads.append(1)
            return original(tensor)
        return read

    for name in ("item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name)))
    return reads
