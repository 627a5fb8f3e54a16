"""The one training loop, run in a plain process (LocalSession)."""
import dataclasses
import datetime as dt
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from orchestrator.config import TrainConfig
from orchestrator.training.checkpoint import (CheckpointError, load_checkpoint,
                                              save_checkpoint)
from orchestrator.training.loop import train
from orchestrator.training.precision import Precision, resolve_precision
from orchestrator.training.session import LocalSession
from tests.support import CrashingSession, resave_without

CPU = torch.device("cpu")


def tiny(**overrides):
    base = dict(model_size="tiny", batch_size=4, seq_len=32, max_steps=30, warmup_steps=2,
                checkpoint_every=10, log_every=10, eval_batches=2)
    return TrainConfig(**{**base, **overrides})


def test_loss_falls(tmp_path, capsys):
    session = LocalSession(tmp_path, device=CPU)
    metrics = train(tiny(max_steps=40), session)
    # MFU is a GPU figure: against a CPU's peak every run warned of it.
    assert metrics["mfu"] < 0.45 and "warning: MFU" not in capsys.readouterr().out
    assert metrics["step"] == 40
    assert metrics["loss"] < metrics["first_loss"] - 1.0
    assert metrics["precision"] == "fp32"
    assert [r["step"] for r in session.reports] == [10, 20, 30, 40]
    assert 0 < metrics["mfu"] < 1 and 0 < metrics["memory_fraction"] < 1
    assert metrics["comm_share"] is None  # one process: no all-reduce
    assert metrics["comm_exposed_share"] is None


@pytest.mark.parametrize("choices, agreed", [(["bf16", "fp16"], "fp16"),
                                              (["bf16", "bf16", "fp32"], "fp32")])
def test_auto_precision_is_one_choice_for_the_whole_job(tmp_path, choices, agreed):
    # An A100 (bf16) and a T4 (fp16 with loss scaling) in one job: each worker chose its own,
    # and DDP averaged scaled with unscaled gradients (FSDP: a collective size mismatch).
    import torch.multiprocessing as mp

    from tests.support import agreed_precision_worker

    mp.spawn(agreed_precision_worker, nprocs=len(choices),
             args=(choices, str(tmp_path / "rendezvous"), str(tmp_path)))
    assert [(tmp_path / str(r)).read_text() for r in range(len(choices))] == \
        [agreed] * len(choices)


def test_learnable_span_trains_and_reports_its_spans(tmp_path):
    metrics = train(tiny(max_steps=20, seq_len=64, attention_span=True, span_ramp=8,
                         span_penalty=1e-3), LocalSession(tmp_path, device=CPU))
    assert metrics["loss"] < metrics["first_loss"] - 0.5
    assert len(metrics["attention_span_mean"]) == 2  # one figure per layer
    assert all(0 <= span <= 64 for span in metrics["attention_span_mean"])
    assert 8 <= metrics["attention_window"] <= 64


def test_checkpoints_keep_the_last_k(tmp_path):
    session = LocalSession(tmp_path, keep=2, device=CPU)
    train(tiny(), session)
    assert [p.name for p in session.checkpoints()] == ["checkpoint_00000020",
                                                       "checkpoint_00000030"]


def test_retention_never_prunes_the_checkpoint_just_written(tmp_path):
    # After a fallback past a corrupt checkpoint of a higher step, that step outranked the
    # good one just written, which was pruned at once: a kill then lost everything since.
    stale = tmp_path / "checkpoint_00000010"
    stale.mkdir()
    (stale / "state.pt").write_bytes(b"corrupt")
    os.utime(stale, (time.time() - 60, time.time() - 60))
    session = LocalSession(tmp_path, keep=1, device=CPU)
    written = tmp_path / "source"
    written.mkdir()
    (written / "state.pt").write_bytes(b"good")
    session.report({"step": 6, "loss": 1.0}, str(written))
    assert [p.name for p in session.checkpoints()] == ["checkpoint_00000006"]


def test_retention_prunes_by_step_not_by_the_directories_times(tmp_path):
    # A run copied with `cp -r` or restored from a backup: the checkpoint directories' times
    # are those of the copy, in whatever order it made them. Pruned by write time, a resume
    # from step 6 that saved step 8 deleted step 6 (the one it resumed from, copied first)
    # and kept steps 2 and 4.
    for age, step in enumerate((6, 2, 4)):  # copied in this order: step 6 the oldest
        checkpoint = tmp_path / f"checkpoint_{step:08d}"
        checkpoint.mkdir()
        (checkpoint / "state.pt").write_bytes(b"good")
        os.utime(checkpoint, (time.time() - 60 + age, time.time() - 60 + age))
    session = LocalSession(tmp_path, keep=3, device=CPU)
    written = tmp_path / "source"
    written.mkdir()
    (written / "state.pt").write_bytes(b"good")
    session.report({"step": 8, "loss": 1.0}, str(written))
    assert [p.name for p in session.checkpoints()] == [
        "checkpoint_00000004", "checkpoint_00000006", "checkpoint_00000008"]


def test_a_copied_checkpoint_is_on_disk_before_the_older_one_is_pruned(tmp_path, monkeypatch):
    # With keep=1, a power loss after the prune could leave only an empty or cut copy.
    from orchestrator.training import session as session_module

    events = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(
        ("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or real_fsync(fd))
    real_rmtree = session_module.shutil.rmtree
    monkeypatch.setattr(session_module.shutil, "rmtree", lambda path, *a, **k: events.append(
        ("remove", str(path))) or real_rmtree(path, *a, **k))
    session = LocalSession(tmp_path / "run", keep=1, device=CPU)
    for step in (1, 2):
        source = tmp_path / f"source{step}"
        source.mkdir()
        (source / "state.pt").write_bytes(b"weights")
        session.report({"step": step, "loss": 1.0}, str(source))
    removed = events.index(("remove", str(tmp_path / "run" / "checkpoint_00000001")))
    synced = [path for kind, path in events[:removed] if kind == "fsync"]
    assert any(p.endswith("checkpoint_00000002/state.pt") for p in synced), events
    assert str(tmp_path / "run") in synced  # the rename itself


class SlowReportingSession(LocalSession):
    """Every report (and its checkpoint) takes 0.4 s longer, like a slow storage upload."""

    def report(self, metrics, checkpoint_dir):
        time.sleep(0.4)
        super().report(metrics, checkpoint_dir)


def test_the_phase_rate_counts_reports_and_saves_that_the_step_rate_leaves_out(tmp_path):
    metrics = train(tiny(max_steps=40), SlowReportingSession(tmp_path, device=CPU))
    tokens = 40 * 4 * 32
    steps_s, phase_s = tokens / metrics["run_tokens_per_s"], tokens / metrics["phase_tokens_per_s"]
    # The reports of steps 10, 20 and 30 fall inside the phase (the last one comes after its
    # figures are taken): 1.2 s that the step-only rate does not see.
    assert phase_s - steps_s >= 1.2, (phase_s, steps_s)


RESUME_IN_ANOTHER_PROCESS = """
import json, sys, torch
from orchestrator.config import TrainConfig
from orchestrator.training.loop import train
from orchestrator.training.session import LocalSession
metrics = train(TrainConfig(**json.loads(sys.argv[1])), LocalSession(sys.argv[2], device=torch.device("cpu")))
print(json.dumps(metrics))
"""


def test_resume_continues_exactly_where_it_stopped(tmp_path):
    # Dropout on, and the resumed half in a new process with another hash seed: any
    # randomness that is not a function of (seed, rank, step) would show up here.
    config = tiny(max_steps=20, dropout=0.1)
    uninterrupted = LocalSession(tmp_path / "a", device=CPU)
    full = train(config, uninterrupted)

    with pytest.raises(RuntimeError, match="worker killed"):
        train(config, CrashingSession(tmp_path / "b", crash_at=10))
    result = subprocess.run(
        [sys.executable, "-c", RESUME_IN_ANOTHER_PROCESS, json.dumps(config.to_dict()),
         str(tmp_path / "b")], capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert result.returncode == 0, result.stderr
    resumed = json.loads(result.stdout.strip().splitlines()[-1])

    assert resumed["start_step"] == 10 and resumed["step"] == 20
    assert resumed["loss"] == pytest.approx(full["loss"], abs=1e-6)
    a = load_checkpoint(uninterrupted.checkpoints()[-1])["model"]
    b = load_checkpoint(LocalSession(tmp_path / "b").checkpoints()[-1])["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


class YieldingSession(LocalSession):
    """The scheduler tells the job to yield the `on_call`-th time it is asked."""

    def __init__(self, run_dir, on_call):
        super().__init__(run_dir, device=CPU)
        self.calls, self.on_call = 0, on_call

    def directive(self):
        self.calls += 1
        return "preempt: for a job of higher priority" if self.calls == self.on_call else None


def test_a_yield_checkpoints_at_the_step_boundary_and_resumes_to_the_same_weights(tmp_path):
    # Hierarchical accumulation: stopping at step 11 leaves gradients pending in two groups.
    config = tiny(max_steps=20, dropout=0.1, accumulation="embeddings=1,lower=2,upper=4,head=1")
    full = train(config, LocalSession(tmp_path / "a", device=CPU))
    told = YieldingSession(tmp_path / "b", on_call=2)  # asked at steps 5 and 10
    stopped = train(config, told)
    assert stopped["step"] == 11 and stopped["yielded"].startswith("preempt: ")
    assert told.reports[-1]["yielded"] and told.checkpoints()[-1].name == "checkpoint_00000011"
    resumed = train(config, LocalSession(tmp_path / "b", device=CPU))
    assert resumed["start_step"] == 11 and resumed["step"] == 20
    assert resumed["held_out_loss"] == full["held_out_loss"]
    a = load_checkpoint(LocalSession(tmp_path / "a").checkpoints()[-1])["model"]
    b = load_checkpoint(LocalSession(tmp_path / "b").checkpoints()[-1])["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_another_model_shape_or_lr_is_refused(tmp_path):
    session = LocalSession(tmp_path, device=CPU)
    train(tiny(max_steps=10), session)
    with pytest.raises(CheckpointError, match=r"seq_len: 32 -> 64; lr: 0.003 -> 0.01"):
        train(tiny(max_steps=20, seq_len=64, lr=0.01), session)


def test_already_complete_run_does_nothing(tmp_path):
    session = LocalSession(tmp_path, device=CPU)
    train(tiny(max_steps=10), session)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    metrics = train(tiny(max_steps=10), session)
    assert metrics["already_complete"] and metrics["step"] == 10
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before  # nothing rewritten


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_paths_run_on_tiny_tensors(tmp_path, precision):
    config = tiny(max_steps=3, precision=precision, seq_len=16, log_every=1)
    metrics = train(config, LocalSession(tmp_path / precision, device=CPU))
    assert metrics["precision"] == precision
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    # Computed in the low precision, not only labelled so: the same seeded run in fp32 ends
    # on another loss. Only fp16 scales its loss.
    fp32 = train(dataclasses.replace(config, precision="fp32"),
                 LocalSession(tmp_path / "fp32", device=CPU))
    assert metrics["loss"] != fp32["loss"]
    assert (metrics["loss_scale"] is not None) == (precision == "fp16")


@pytest.mark.parametrize("saved, resumed", [("fp32", "fp16"), ("bf16", "fp16"),
                                             ("fp16", "fp32")])
def test_a_run_resumes_in_another_precision(tmp_path, saved, resumed):
    # A bf16 run on an A100 moved to a T4 resumes in fp16: the checkpoint has no loss-scaler
    # state (an empty one), and the fp16 scaler starts afresh.
    config = tiny(max_steps=4, seq_len=16, checkpoint_every=2, log_every=2)
    with pytest.raises(RuntimeError, match="worker killed"):
        train(dataclasses.replace(config, precision=saved), CrashingSession(tmp_path, crash_at=2))
    metrics = train(dataclasses.replace(config, precision=resumed),
                    LocalSession(tmp_path, device=CPU))
    assert metrics["start_step"] == 2 and metrics["step"] == 4
    assert metrics["precision"] == resumed and torch.isfinite(torch.tensor(metrics["loss"]))


def test_the_loss_scale_is_reported_only_where_loss_scaling_runs(tmp_path):
    # (the fp16 run's: test_fp16_overflow_inside_the_loop_...; fp32 has none, not a flat 1)
    metrics = train(tiny(max_steps=2, seq_len=16, log_every=2, checkpoint_every=2),
                    LocalSession(tmp_path, device=CPU))
    assert metrics["loss_scale"] is None


def test_auto_precision_is_fp32_on_cpu():
    assert resolve_precision("auto", CPU) == "fp32"


@pytest.mark.parametrize("native_bf16, expected", [(False, "fp16"), (True, "bf16")])
def test_auto_precision_on_a_gpu_takes_bf16_only_where_it_is_native(monkeypatch, native_bf16,
                                                                    expected):
    """A T4 or V100 emulates bf16 (torch counts it as supported by default): it gets fp16."""
    def is_bf16_supported(including_emulation=True):
        return native_bf16 or including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert resolve_precision("auto", torch.device("cuda")) == expected


@pytest.mark.parametrize("native_bf16, warned", [(False, True), (True, False)])
def test_bf16_asked_of_a_gpu_without_native_bf16_warns_suggesting_fp16_once(
        monkeypatch, capsys, native_bf16, warned):
    """An explicit --precision bf16 on a T4 or V100 ran emulated bf16, far slower, unsaid
    (auto avoids it); it still runs as asked. Said by rank 0 alone (eight V100s said it
    eight times), naming the field and its flag (train() also takes a TrainConfig made in
    code: "use --precision fp16" named only the flag)."""
    from orchestrator.training.loop import job_precision

    def is_bf16_supported(including_emulation=True):
        return native_bf16 or including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    cuda = torch.device("cuda")
    assert job_precision("bf16", cuda, rank=1) == "bf16"
    assert capsys.readouterr().out == ""
    assert job_precision("bf16", cuda, rank=0) == "bf16"
    said = capsys.readouterr().out
    assert said.count("\n") == int(warned)
    assert ("warning: precision bf16 on a GPU without native bf16" in said) == warned
    assert ("use precision fp16 (--precision fp16), with loss scaling" in said) == warned


def test_a_precision_emulated_on_any_worker_is_said_once_by_rank_0(tmp_path):
    # An A100 (rank 0, native bf16) and a T4 (rank 1, emulated) asked for bf16: the T4's
    # warning, said by rank 0 alone.
    import torch.multiprocessing as mp

    from tests.support import emulation_warning_worker

    mp.spawn(emulation_warning_worker, nprocs=2,
             args=([None, "precision bf16 on a GPU without native bf16 ..."],
                   str(tmp_path / "rendezvous"), str(tmp_path)))
    assert (tmp_path / "0").read_text() == \
        "warning: precision bf16 on a GPU without native bf16 ...\n"
    assert (tmp_path / "1").read_text() == ""


def test_fp16_scaler_skips_an_overflowing_step():
    precision = Precision("fp16", "cpu")
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scaler = precision.grad_scaler()
    scale = scaler.get_scale()
    scaler.scale(weight.sum() * float("inf")).backward()
    scaler.step(optimizer)
    scaler.update()
    assert torch.equal(weight.detach(), torch.ones(2))  # step skipped
    assert scaler.get_scale() < scale  # and the scale backed off


def _breaks_from_call(first_broken: int, how: float, last_broken: float = math.inf):
    """A GPT class whose training loss is multiplied by `how` (nan, inf) on the
    `first_broken`-th to `last_broken`-th training forwards (by default, every one on)."""
    from orchestrator.training import loop

    class Breaks(loop.GPT):
        calls = 0

        def forward(self, idx, targets=None, **kwargs):
            logits, loss = super().forward(idx, targets, **kwargs)
            if targets is not None and self.training:
                Breaks.calls += 1
                if first_broken <= Breaks.calls <= last_broken:
                    loss = loss * how
            return logits, loss
    return Breaks


@pytest.mark.parametrize("overflowing_call, log_every", [(3, 5), (1, 1)])
def test_fp16_overflow_inside_the_loop_is_skipped_counted_and_backs_off(
        tmp_path, monkeypatch, overflowing_call, log_every):
    """An infinite loss on one step (as a real fp16 overflow would give) goes through the whole
    loop: that step is skipped, counted, the scale halves, and the weights stay finite. (The
    first step too, reported on its own.)"""
    from orchestrator.training import loop

    monkeypatch.setattr(loop, "GPT", _breaks_from_call(overflowing_call, float("inf"),
                                                       last_broken=overflowing_call))
    session = LocalSession(tmp_path, device=CPU)
    metrics = train(tiny(max_steps=5, precision="fp16", seq_len=16, log_every=log_every,
                         checkpoint_every=5), session)
    assert metrics["skipped_steps"] == 1
    assert metrics["loss_scale"] == 2.0 ** 16 / 2  # GradScaler's initial scale, backed off once
    # The interval's loss leaves the overflowed step out: averaged in, a healthy run's
    # report (and its metrics.jsonl line, not strict JSON then) read NaN.
    # (one interval of 5, one step left out; or the last of five 1-step intervals)
    assert math.isfinite(metrics["loss"]) and metrics["loss_steps"] == (4 if log_every == 5
                                                                        else 1)
    assert math.isfinite(metrics["first_loss"])  # the first step's, or the first finite one's
    state = load_checkpoint(session.checkpoints()[-1])
    assert all(torch.isfinite(t).all() for t in state["model"].values())




def _stopped_at_20_keeping_step_10(session, error) -> None:
    """The run reported step 10 with its checkpoint, then at step 20 only why it stopped
    (metrics.jsonl, `logs`), and holds no checkpoint past step 10."""
    assert [r["step"] for r in session.reports] == [10, 20]
    assert session.reports[-1]["diverged"] == str(error.value)
    assert [load_checkpoint(c)["step"] for c in session.checkpoints()] == [10]


def test_a_diverged_run_stops_before_saving_its_nan_weights(tmp_path, monkeypatch):
    # fp32: the loss turns NaN at step 13 and the weights with it. The run must stop at the
    # next report, saying why, and leave step 10's checkpoint the newest: saved, NaN weights
    # replaced the good checkpoints one by one (retention keeps 3) and every retry resumed NaN.
    from orchestrator.training import loop

    monkeypatch.setattr(loop, "GPT", _breaks_from_call(13, float("nan")))
    session = LocalSession(tmp_path, device=CPU)
    with pytest.raises(loop.TrainingDiverged) as e:
        train(tiny(max_steps=40), session)
    assert "step 20" in str(e.value) and "loss" in str(e.value) and "--lr" in str(e.value)
    _stopped_at_20_keeping_step_10(session, e)
    state = load_checkpoint(session.checkpoints()[-1])
    assert state["step"] == 10
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_an_fp16_run_whose_every_step_overflows_stops_once_its_loss_scale_collapses(
        tmp_path, monkeypatch):
    # Every step from the 3rd overflows: the scaler skips them all and halves the scale each
    # time (2^16 -> 2^-2 by step 20). It ran to the end saying nothing, checkpointing the
    # untrained weights as if trained.
    from orchestrator.training import loop

    monkeypatch.setattr(loop, "GPT", _breaks_from_call(3, float("inf")))
    session = LocalSession(tmp_path, device=CPU)
    with pytest.raises(loop.TrainingDiverged) as e:
        train(tiny(max_steps=40, precision="fp16", seq_len=16), session)
    assert "loss scale" in str(e.value) and "step 20" in str(e.value)
    assert "--precision" in str(e.value)
    _stopped_at_20_keeping_step_10(session, e)
    assert "--resume" in str(e.value) and "those saved before it are kept" in str(e.value)


def test_a_run_diverged_before_its_first_checkpoint_is_not_told_to_resume(tmp_path,
                                                                          monkeypatch):
    # Diverged at the report of step 20, the first checkpoint due at 50 (the default): there
    # is nothing to --resume (it is refused: no checkpoint), and none was kept.
    from orchestrator.training import loop

    monkeypatch.setattr(loop, "GPT", _breaks_from_call(3, float("inf")))
    session = LocalSession(tmp_path, device=CPU)
    with pytest.raises(loop.TrainingDiverged) as e:
        train(tiny(max_steps=40, precision="fp16", seq_len=16, checkpoint_every=50), session)
    assert session.checkpoints() == [] and "step 20" in str(e.value)
    assert "--resume" not in str(e.value) and "kept" not in str(e.value), str(e.value)
    assert "none was saved" in str(e.value) and "--precision bf16" in str(e.value)


def _weights_nan_after(monkeypatch, step: int) -> None:
    """The first weight tensor filled with NaN right after the optimizer step of micro-batch
    `step` (0-based), as a step that went wrong would leave it."""
    from orchestrator.training import loop

    real_step = loop.HierarchicalAccumulation.step

    def poisons(self, at, optimizer, scaler, grad_clip):
        skipped = real_step(self, at, optimizer, scaler, grad_clip)
        if at == step:
            with torch.no_grad():
                next(p for g in optimizer.param_groups for p in g["params"]).fill_(float("nan"))
        return skipped

    monkeypatch.setattr(loop.HierarchicalAccumulation, "step", poisons)


def test_weights_turned_nan_under_a_finite_loss_are_not_checkpointed(tmp_path, monkeypatch):
    # The step before a checkpoint can leave NaN weights with its own loss still finite (an
    # infinite gradient norm clipped to NaN): the weights are checked before each save.
    from orchestrator.training import loop

    _weights_nan_after(monkeypatch, step=19)
    session = LocalSession(tmp_path, device=CPU)
    with pytest.raises(loop.TrainingDiverged) as e:
        train(tiny(max_steps=40), session)
    assert "weights" in str(e.value) and "step 20" in str(e.value)
    _stopped_at_20_keeping_step_10(session, e)


@pytest.mark.parametrize("checkpoint_every", [10, 50])
def test_fp16_weights_gone_nan_are_named_with_the_nan_losses_since(tmp_path, monkeypatch,
                                                                   checkpoint_every):
    # fp16, the weights NaN after step 5: every later loss is NaN, skipped as an overflow.
    # With a checkpoint due (step 10) it said "(the loss was still finite)"; with none due
    # the scale collapsed by step 30 and it blamed fp16 overflow, advising bf16.
    from orchestrator.training import loop

    _weights_nan_after(monkeypatch, step=4)
    session = LocalSession(tmp_path, device=CPU)
    with pytest.raises(loop.TrainingDiverged) as e:
        train(tiny(max_steps=40, precision="fp16", seq_len=16,
                   checkpoint_every=checkpoint_every), session)
    message = str(e.value)
    assert "weights hold NaN or inf" in message and "since step 6 was NaN or inf" in message
    assert "still finite" not in message and "bf16" not in message, message
    assert ("step 10" if checkpoint_every == 10 else "step 30") in message, message


def test_corrupt_checkpoint_is_refused_naming_the_file(tmp_path):
    save_checkpoint(tmp_path, {"step": 3, "w": torch.ones(2)})
    assert load_checkpoint(tmp_path)["step"] == 3
    state = tmp_path / "state.pt"
    state.write_bytes(state.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="state.pt is corrupt"):
        load_checkpoint(tmp_path)


def test_checkpoint_carrying_code_is_never_unpickled(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pwned')",))

    save_checkpoint(tmp_path, {"step": 1, "payload": Evil()})  # checksum matches the payload
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_checkpoint(tmp_path)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_sharded_checkpoints_index_carrying_code_is_never_unpickled(tmp_path):
    # torch.distributed.checkpoint reads its .metadata index with plain pickle.load: a
    # sharded checkpoint from elsewhere ran code on load, though its meta.pt is weights_only
    # (whoever writes .metadata also writes the digest meta.pt records for it).
    import pickle

    from orchestrator.training.checkpoint import (DCP_METADATA_FILE, SHARD_DIGESTS,
                                                  save_sharded, save_tensors, sha256_file,
                                                  sharded_optimizer_names)

    directory = tmp_path / "checkpoint_00000001"
    save_sharded(directory, {"model": {"w": torch.ones(2)}, "pending": {},
                             "optimizer": {"state": {}, "param_groups": []}},
                 {"step": 1}, rank=0)
    assert load_checkpoint(directory)["model"]["w"].tolist() == [1.0, 1.0]  # a real one loads
    assert sharded_optimizer_names(directory) == set()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    index = directory / DCP_METADATA_FILE
    index.write_bytes(pickle.dumps(Evil()))
    meta = torch.load(directory / "meta.pt", weights_only=True)
    meta[SHARD_DIGESTS][DCP_METADATA_FILE] = sha256_file(index)  # consistent, as a forger's
    save_tensors(directory / "meta.pt", meta)
    for read in (load_checkpoint, sharded_optimizer_names):
        with pytest.raises(CheckpointError, match=f"{DCP_METADATA_FILE}.*(posix|os).mkdir"):
            read(directory)
        assert not marker.exists()


EVERY_2 = dict(checkpoint_every=2, log_every=2)  # checkpoints to fall back on, in few steps


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_good_one(tmp_path, capsys):
    session = LocalSession(tmp_path, keep=3, device=CPU)
    train(tiny(max_steps=4, **EVERY_2), session)  # checkpoints at 2 and 4
    latest = session.checkpoints()[-1] / "state.pt"
    latest.write_bytes(latest.read_bytes()[:100])  # truncated, like a crash mid-copy
    metrics = train(tiny(max_steps=6, **EVERY_2), session)
    assert metrics["start_step"] == 2 and metrics["step"] == 6
    assert "state.pt is corrupt" in capsys.readouterr().out


def test_retention_prunes_checkpoints_found_corrupt_before_the_good_one_resumed_from(
        tmp_path, capsys):
    # keep=3 with the two newest corrupt: the resume fell back to step 10, and the next save
    # pruned step 10 (the oldest written) and kept both corrupt ones; once the new checkpoint
    # was damaged too (the same disk), a resume found only corrupt checkpoints.
    # (at 1/5 of the steps: checkpoints every 2 steps, not 10, tell the same story)
    session = LocalSession(tmp_path, keep=3, device=CPU)
    train(tiny(max_steps=6, **EVERY_2), session)  # checkpoints at 2, 4 and 6
    for step in (4, 6):
        state = tmp_path / f"checkpoint_{step:08d}" / "state.pt"
        state.write_bytes(state.read_bytes()[:100])
    capsys.readouterr()
    metrics = train(tiny(max_steps=3, checkpoint_every=1, log_every=1), session)
    assert metrics["start_step"] == 2
    said = capsys.readouterr().out
    for step in (4, 6):  # each skipped checkpoint named, with why
        assert f"checkpoint_{step:08d}/state.pt is corrupt" in said
    assert [p.name for p in session.checkpoints()] == [
        "checkpoint_00000002", "checkpoint_00000003", "checkpoint_00000006"]
    newest = tmp_path / "checkpoint_00000003" / "state.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    metrics = train(tiny(max_steps=4, checkpoint_every=1, log_every=1),
                    LocalSession(tmp_path, device=CPU))
    assert metrics["start_step"] == 2 and metrics["step"] == 4


@pytest.mark.parametrize("name", ["model_size", "tokens_seen"])
def test_a_checkpoint_lacking_what_a_resume_reads_falls_back_naming_it(tmp_path, capsys, name):
    # Without model_size the saved config counted as the default 'small': the resume was
    # refused as "written by a different run config: model_size: 'small' -> 'tiny'"; without
    # tokens_seen it died on a KeyError. A damaged file: passed over, as a corrupt one is.
    session = LocalSession(tmp_path, keep=3, device=CPU)
    train(tiny(max_steps=4, **EVERY_2), session)  # checkpoints at 2 and 4
    latest = resave_without(session.checkpoints()[-1], name)
    capsys.readouterr()
    metrics = train(tiny(max_steps=6, **EVERY_2), session)
    assert metrics["start_step"] == 2 and metrics["step"] == 6
    said = capsys.readouterr().out
    assert f"{latest / 'state.pt'}" in said and f"lacks '{name}'" in said, said


def test_when_every_checkpoint_is_corrupt_training_refuses_to_start_over(tmp_path, capsys):
    session = LocalSession(tmp_path, device=CPU)
    train(tiny(max_steps=10), session)
    for checkpoint in session.checkpoints():
        (checkpoint / "state.pt").write_bytes(b"garbage")
    capsys.readouterr()
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        train(tiny(max_steps=20), session)
    # No fallback announced where there is nothing to fall back to
    assert "falling back" not in capsys.readouterr().out


def test_a_damaged_checksum_file_falls_back_to_the_previous_checkpoint(tmp_path, capsys):
    # A non-UTF-8 byte in the sidecar raised UnicodeDecodeError, no CheckpointError: no
    # fallback, and every restart failed on it while a good checkpoint lay beside it.
    session = LocalSession(tmp_path, keep=3, device=CPU)
    train(tiny(max_steps=4, **EVERY_2), session)
    sidecar = session.checkpoints()[-1] / "state.pt.sha256"
    data = bytearray(sidecar.read_bytes())
    data[3] |= 0x80
    sidecar.write_bytes(bytes(data))
    metrics = train(tiny(max_steps=6, **EVERY_2), session)
    assert metrics["start_step"] == 2 and metrics["step"] == 6
    said = capsys.readouterr().out
    assert "state.pt.sha256 cannot be read: not a sha256" in said and "falling back" in said


def test_a_save_on_a_full_disk_names_the_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    # torch.save on a full disk says "[enforce fail at inline_container.cc] unexpected pos":
    # no file, no cause; and its half-written .tmp stayed, holding the space.
    from orchestrator.training import checkpoint

    def full_disk(obj, f):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 768")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(CheckpointError) as caught:
        save_checkpoint(tmp_path / "ckpt", {"step": 1})
    message = str(caught.value)
    assert message.startswith(f"checkpoint file {tmp_path / 'ckpt' / 'state.pt'} cannot be "
                              "written: RuntimeError: [enforce fail")
    assert "GiB free on its filesystem" in message
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == []


def test_a_copy_into_a_full_run_directory_names_it_and_keeps_the_checkpoints_before(
        tmp_path, monkeypatch):
    # The checkpoint is saved in a temporary folder, then copied into the run directory: on a
    # full disk there, copytree raised shutil.Error with a list of (src, dst, why) triples,
    # and its partial .staging_ copy stayed, holding the space.
    import errno
    import shutil

    session = LocalSession(tmp_path / "run", keep=2, device=CPU)
    source = tmp_path / "source"
    source.mkdir()
    (source / "state.pt").write_bytes(b"weights")
    session.report({"step": 1, "loss": 1.0}, str(source))
    real_copy = shutil.copyfile

    def full_disk(src, dst, *args, **kwargs):
        real_copy(src, dst, *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", full_disk)
    with pytest.raises(CheckpointError) as caught:
        session.report({"step": 2, "loss": 1.0}, str(source))
    message = str(caught.value)
    assert message.startswith(f"checkpoint {tmp_path / 'run' / 'checkpoint_00000002'} cannot "
                              "be written: No space left on device ("), message
    assert "GiB free on its filesystem" in message
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint_00000001",
                                                                    "metrics.jsonl"]
    assert (tmp_path / "run" / "checkpoint_00000001" / "state.pt").read_bytes() == b"weights"


KILLED_MID_REPORT = """
import json, os, signal, sys, torch
from orchestrator.config import TrainConfig
from orchestrator.training.loop import train
from orchestrator.training.session import LocalSession

class KilledMidReport(LocalSession):  # SIGKILLed while its checkpoint is copied to storage
    def report(self, metrics, checkpoint_dir):
        if checkpoint_dir:
            os.kill(os.getpid(), signal.SIGKILL)
        super().report(metrics, checkpoint_dir)

train(TrainConfig(**json.loads(sys.argv[1])), KilledMidReport(sys.argv[2], device=torch.device("cpu")))
"""


def test_a_save_left_by_a_worker_killed_mid_report_is_removed_by_the_next_save(tmp_path,
                                                                                monkeypatch):
    # Each save is written into a temporary folder, then reported (copied into the run's
    # storage). A worker killed meanwhile (Ray stops the whole group on Ctrl-C or one
    # worker's failure; the OOM killer) left that folder in the node's temp directory for
    # good: a whole state.pt, or under FSDP each worker's shards, for every kill.
    import signal
    import tempfile

    temp = tmp_path / "tmp"
    temp.mkdir()
    config = tiny(max_steps=2, checkpoint_every=1, log_every=1, eval_batches=1)
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_MID_REPORT, json.dumps(config.to_dict()),
         str(tmp_path / "killed")], capture_output=True, text=True, timeout=300,
        env={**os.environ, "TMPDIR": str(temp)})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = [p for p in temp.iterdir() if (p / "state.pt").is_file()]
    assert len(left) == 1, list(temp.iterdir())  # (the killed worker's save)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    train(config, LocalSession(tmp_path / "next", device=CPU))
    assert not left[0].exists()
    assert not list(temp.glob("*/state.pt"))  # (the next run's own saves removed as before)
    assert not list(temp.glob("ckpt-*"))  # (their lock files too)


def test_a_save_in_progress_is_not_removed_by_another_saves_cleanup(tmp_path, monkeypatch):
    # A process id says nothing of a save in another container sharing the temp directory
    # (or a reused id): the lock its writer holds does.
    import tempfile

    from orchestrator.training import checkpoint

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with monkeypatch.context() as other_container:  # (its id: no process here has it)
        other_container.setattr(os, "getpid", lambda: 4_194_304 + 1)
        live_save = checkpoint.save_folder()
        live = live_save.__enter__()
    (Path(live) / "state.pt").write_bytes(b"weights")
    with checkpoint.save_folder():  # (its cleanup runs first)
        pass
    assert (Path(live) / "state.pt").read_bytes() == b"weights"
    live_save.__exit__(None, None, None)
    other_host = tmp_path / "ckpt-elsewhere-4194305-abcd1234"  # (its lock kept per host)
    other_host.mkdir()
    Path(f"{other_host}.lock").touch()
    with checkpoint.save_folder():
        pass
    assert other_host.is_dir()
    other_host.rmdir()
    Path(f"{other_host}.lock").unlink()
    assert not list(tmp_path.glob("ckpt-*"))


def test_a_save_goes_on_unheld_where_the_temp_filesystem_takes_no_flock(tmp_path,
                                                                        monkeypatch):
    # Lustre mounted without -o flock says ENOSYS, NFS without its lock daemon ENOLCK: the
    # lock beside the save is only for the cleanup of dead saves, and every checkpoint save
    # failed with that OSError (leaving its lock file behind).
    import errno
    import fcntl
    import tempfile

    from orchestrator.training import checkpoint

    def no_flock(*args):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(fcntl, "flock", no_flock)
    with checkpoint.save_folder() as folder:
        (Path(folder) / "state.pt").write_bytes(b"weights")
        assert (Path(folder) / "state.pt").read_bytes() == b"weights"
    assert not list(tmp_path.iterdir())


def test_a_save_never_writes_through_a_file_left_at_a_temp_name(tmp_path):
    """A temp file of a fixed name (state.pt.tmp), opened to truncate, wrote through a link
    planted there (into whatever it named), then moved the link over the checkpoint; two
    writers of one file also wrote into each other's. Each save makes a temp file of its own."""
    from orchestrator.training.checkpoint import write_atomically

    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    target = tmp_path / "ckpt" / "state.pt"
    target.parent.mkdir()
    (target.parent / "state.pt.tmp").symlink_to(victim)
    write_atomically(target, lambda f: f.write(b"new"))
    assert victim.read_bytes() == b"keep"
    assert not target.is_symlink() and target.read_bytes() == b"new"


@pytest.mark.parametrize("schedule, expected", [
    # warmup 2 steps to lr=1.0, then per schedule; max_steps 12, min_lr 0.1, decay every 4
    ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ("step", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.1]),
])
def test_lr_schedules(schedule, expected):
    from orchestrator.training.loop import lr_at

    config = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=2, max_steps=12,
                         lr_schedule=schedule, lr_decay_every=4)
    assert [round(lr_at(s, config), 6) for s in range(7)] == expected


def test_cosine_schedule_ends_at_min_lr():
    from orchestrator.training.loop import lr_at

    config = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=2, max_steps=12)
    assert lr_at(1, config) == 1.0 and lr_at(2, config) == 1.0
    assert lr_at(12, config) == pytest.approx(0.1)
    lrs = [lr_at(s, config) for s in range(2, 13)]
    assert lrs == sorted(lrs, reverse=True)  # monotone decay


def test_a_gpu_with_less_free_memory_than_asked_is_reported_with_its_node_and_index():
    from orchestrator.training.session import gpu_shortfall

    gib = 1024 ** 3
    assert gpu_shortfall(40 * gib, 40.0, "node-a", 3) is None
    short = gpu_shortfall(int(12.5 * gib), 40.0, "node-a", 3)
    assert short == {"node_id": "node-a", "gpu_index": 3, "free_gb": 12.5, "needed_gb": 40.0}


def test_checkpoints_are_ordered_by_step_whatever_the_clock_said(tmp_path):
    # Ray named checkpoints by rank 0's local time: rank 0 re-placed on a node two hours
    # behind made step 150 look newer than step 200 (served, exported, compressed, resumed
    # from). Checkpoints from before steps led the name come first.
    from orchestrator.runs import checkpoint_dirs, checkpoint_name

    utc = dt.datetime(2026, 12, 6, 12, tzinfo=dt.timezone.utc).timestamp()
    names = ["checkpoint_2026-12-06_09-00-00.000000",  # a run's first, before the upgrade
             checkpoint_name(100, utc + 3600),
             checkpoint_name(150, utc + 7200),
             checkpoint_name(200, utc + 10800 - 7200)]  # clock two hours behind
    assert names[1] == "checkpoint_00000100_2026-12-06_13-00-00.000000"
    for name in names:
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray's, not one
    assert [p.name for p in checkpoint_dirs(tmp_path)] == names[::-1]
    assert [p.name for p in LocalSession(tmp_path).checkpoints()] == names


def test_a_resumed_run_steps_with_its_own_optimizer_kernels(tmp_path, monkeypatch):
    """A checkpoint of a run whose AdamW was fused (a GPU run's; forced here, PyTorch's CPU
    fused kernel standing in) resumes on the CPU with the CPU's default step, as its next
    checkpoint records; optimizer.load_state_dict alone would have taken the saved choice."""
    from orchestrator.training import optim

    config = tiny(max_steps=4, checkpoint_every=2, log_every=2)
    with monkeypatch.context() as patch:
        patch.setattr(optim, "uses_fused_adamw", lambda params: True)
        with pytest.raises(RuntimeError, match="worker killed"):
            train(config, CrashingSession(tmp_path, crash_at=2))
    groups = load_checkpoint(LocalSession(tmp_path).checkpoints()[-1])["optimizer"]["param_groups"]
    assert all(group["fused"] for group in groups)
    resumed = train(config, LocalSession(tmp_path, device=CPU))
    assert resumed["start_step"] == 2 and resumed["step"] == 4
    groups = load_checkpoint(LocalSession(tmp_path).checkpoints()[-1])["optimizer"]["param_groups"]
    assert all(group["fused"] is None for group in groups)


def test_the_cosine_floor_is_a_tenth_of_lr_unless_given_and_a_resume_keeps_its_own(tmp_path):
    import json

    from jobs import pretrain
    from orchestrator.training.loop import lr_at

    def configured(*flags, run="run"):
        return pretrain.build_configs(pretrain.parse_args(list(flags)), tmp_path / run)[0]

    fine_tune = configured("--lr", "1e-4", "--max-steps", "1000")
    # min(3e-4, lr) made a fine-tuning rate's cosine flat: 1e-4 at step 999 as at step 20
    assert fine_tune.min_lr == pytest.approx(1e-5)
    assert lr_at(999, fine_tune) < 0.2 * lr_at(20, fine_tune)
    assert configured().min_lr == TrainConfig.min_lr  # the defaults' floor, unchanged
    assert configured("--lr", "1e-4", "--min-lr", "0").min_lr == 0
    (tmp_path / "old").mkdir()  # a run begun with the old rule resumes with its floor
    old_run = TrainConfig(lr=1e-4, min_lr=1e-4).to_dict()  # (whole, as pretrain.py writes it)
    (tmp_path / "old" / "config.json").write_text(json.dumps({"train": old_run}))
    assert configured("--lr", "1e-4", "--resume", run="old").min_lr == 1e-4


def test_raising_max_steps_on_resume_continues_the_cosine_without_a_jump():
    from orchestrator.training.loop import cosine_legs, lr_at

    first = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=2, max_steps=12)
    longer = dataclasses.replace(first, max_steps=30)
    legs = cosine_legs(None, 12, 6, longer)  # resumed mid-way, now to step 30
    assert lr_at(6, longer, legs) == lr_at(6, first)  # was 1.0 -> 0.87 recomputed over 30
    assert lr_at(6, longer) > lr_at(6, first) + 0.2  # (the jump, without the legs)
    lrs = [lr_at(s, longer, legs) for s in range(6, 31)]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] == pytest.approx(0.1)
    assert lr_at(3, longer, legs) == lr_at(3, first)  # the steps before are unchanged
    # Extended after its end: it stays at min_lr. Resumed again, the legs are kept as saved.
    done = cosine_legs(None, 12, 12, longer)
    assert [lr_at(s, longer, done) for s in (12, 20)] == pytest.approx([0.1, 0.1])
    assert cosine_legs(legs, 12, 20, longer) == legs
    # During warmup the first leg simply ends later.
    assert cosine_legs(None, 12, 1, longer) == [(2, 1.0, 30)]


def test_a_run_extended_on_resume_reports_no_lr_jump(tmp_path):
    # (a finished run extended: the cosine had reached min_lr and stays there; recomputed
    # over the new horizon the LR went back up)
    config = tiny(max_steps=20, log_every=5, checkpoint_every=10)
    train(config, LocalSession(tmp_path, device=CPU))
    metrics = train(dataclasses.replace(config, max_steps=30), LocalSession(tmp_path, device=CPU))
    assert metrics["start_step"] == 20
    lr = {m["step"]: m["lr"] for m in map(json.loads,
                                          (tmp_path / "metrics.jsonl").read_text().splitlines())
          if "lr" in m}
    assert lr[25] == lr[30] == config.min_lr < lr[20]  # (recomputed: 1.9x lr[20] at 25)


def _one_rank_overflows_first(rank: int, run_dir: str, store: str, out: str) -> None:
    """A gloo worker of test_an_overflow_on_one_rank_only_...: rank 1's first loss is inf."""
    import datetime

    import torch.distributed as dist

    from orchestrator.training import loop
    from orchestrator.training.local_workers import WorkerSession

    class OverflowsOnRankOne(loop.GPT):
        calls = 0

        def forward(self, idx, targets=None, **kwargs):
            logits, loss = super().forward(idx, targets, **kwargs)
            if targets is not None and self.training:
                OverflowsOnRankOne.calls += 1
                if OverflowsOnRankOne.calls == 1 and dist.get_rank() == 1:
                    loss = loss * float("inf")
            return logits, loss

    loop.GPT = OverflowsOnRankOne
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        metrics = loop.train(tiny(max_steps=4, precision="fp16", seq_len=16, log_every=2,
                                  checkpoint_every=4), WorkerSession(run_dir, rank, 2))
        with open(f"{out}.{rank}", "w") as f:
            json.dump({k: metrics[k] for k in ("first_loss", "loss", "loss_steps", "step")}, f)
    finally:
        dist.destroy_process_group()


def test_an_overflow_on_one_rank_only_neither_hangs_nor_reports_nan(tmp_path):
    # The first loss's mean was a collective only the ranks with a finite loss called: the
    # others went on, and the group hung (gloo timed out; NCCL waits its own timeout).
    import torch.multiprocessing as mp

    mp.spawn(_one_rank_overflows_first, args=(str(tmp_path / "run"), str(tmp_path / "store"),
                                               str(tmp_path / "metrics")), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"metrics.{r}").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] and ranks[0]["step"] == 4
    assert math.isfinite(ranks[0]["first_loss"]) and math.isfinite(ranks[0]["loss"])


CPU_OOM = ("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
           "memory: you tried to allocate 102400000000 bytes. Error code 12")


def _forward_raising(error: BaseException, on_call: int):
    from orchestrator.training import loop

    class Raises(loop.GPT):
        calls = 0

        def forward(self, idx, targets=None, **kwargs):
            if targets is not None and self.training:
                Raises.calls += 1
                if Raises.calls == on_call:
                    raise error
            return super().forward(idx, targets, **kwargs)
    return Raises


@pytest.mark.parametrize("error", [RuntimeError(CPU_OOM),
                                   RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"),
                                   torch.cuda.OutOfMemoryError("Tried to allocate 2.00 GiB")])
def test_running_out_of_memory_in_a_step_names_the_flags_and_the_estimate(tmp_path, monkeypatch,
                                                                          error):
    from orchestrator.training import loop

    monkeypatch.setattr(loop, "GPT", _forward_raising(error, on_call=3))
    with pytest.raises(loop.WorkerOutOfMemory) as e:
        train(tiny(max_steps=5), LocalSession(tmp_path, device=CPU))
    said = str(e.value)
    assert "\n" not in said and e.value.__cause__ is error
    assert said.startswith("out of memory at step 2 on worker rank 0 (cpu): this run needs "
                           "about ")
    assert ("GiB per worker by the estimate (--model-size tiny, --batch-size 4 x --seq-len 32 "
            "per worker, --strategy ddp, precision fp32); lower --batch-size or --seq-len "
            "(--accumulation keeps the tokens per optimizer step) or --model-size, or use "
            "--strategy fsdp with more workers") in said


def test_running_out_of_memory_building_the_model_says_so(tmp_path, monkeypatch):
    from orchestrator.training import loop

    def build(config, device):
        raise RuntimeError(CPU_OOM)
    monkeypatch.setattr(loop, "_new_model", build)
    with pytest.raises(loop.WorkerOutOfMemory,
                       match=r"^out of memory building the model on worker rank 0 \(cpu\): "
                             r"this run needs about [\d.]+ GiB per worker"):
        train(tiny(max_steps=5), LocalSession(tmp_path, device=CPU))


def test_running_out_of_memory_in_the_final_evaluation_says_so(tmp_path, monkeypatch):
    # The held-out evaluation after the last step (torch's own message got through, a
    # traceback naming no flag)
    from orchestrator.training import loop

    def evaluate(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("Tried to allocate 2.00 GiB")
    monkeypatch.setattr(loop, "evaluate", evaluate)
    with pytest.raises(loop.WorkerOutOfMemory,
                       match=r"^out of memory evaluating the held-out loss at step 5 on worker "
                             r"rank 0 \(cpu\): this run needs about [\d.]+ GiB per worker by "
                             r"the estimate \(--model-size tiny, --batch-size 4 x --seq-len 32 "):
        train(tiny(max_steps=5), LocalSession(tmp_path, device=CPU))


def test_running_out_of_memory_saving_a_checkpoint_says_so(tmp_path, monkeypatch):
    from orchestrator.training import loop

    def save(*args, **kwargs):
        raise RuntimeError(CPU_OOM)
    monkeypatch.setattr(loop, "save_checkpoint", save)
    with pytest.raises(loop.WorkerOutOfMemory,
                       match=r"^out of memory saving the checkpoint of step 5 on worker rank 0 "
                             r"\(cpu\): this run needs about [\d.]+ GiB per worker") as e:
        train(tiny(max_steps=5), LocalSession(tmp_path, device=CPU))
    assert "\n" not in str(e.value)


def test_other_runtime_errors_in_a_step_propagate_unchanged(tmp_path, monkeypatch):
    from orchestrator.training import loop

    error = RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 16x8)")
    monkeypatch.setattr(loop, "GPT", _forward_raising(error, on_call=2))
    with pytest.raises(RuntimeError) as e:
        train(tiny(max_steps=5), LocalSession(tmp_path, device=CPU))
    assert e.value is error


def test_a_resume_loads_the_checkpoint_its_launcher_verified_without_hashing_it(
        tmp_path, monkeypatch):
    """The session's verified_checkpoint (jobs/pretrain.py's launcher hashed it:
    runs.verified_newest) is loaded without hashing it again; any other is hashed."""
    from orchestrator.runs import checkpoint_identity
    from orchestrator.training import checkpoint

    session = LocalSession(tmp_path, device=CPU)
    train(tiny(max_steps=10), session)
    [newest] = session.checkpoints()
    hashed = []
    real = checkpoint.sha256_file
    monkeypatch.setattr(checkpoint, "sha256_file", lambda p: hashed.append(p) or real(p))
    session.verified_checkpoint = {"name": newest.name, "identity": [
        list(f) for f in checkpoint_identity(newest)]}
    assert train(tiny(max_steps=10), session)["already_complete"]
    assert hashed == []
    session.verified_checkpoint = None
    assert train(tiny(max_steps=10), session)["already_complete"]
    assert hashed == [newest / "state.pt"]
