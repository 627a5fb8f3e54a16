"""Strategies of the training loop: FSDP2 against DDP on two local gloo workers (CPU), sharded
checkpoints (torch.distributed.checkpoint), resume across strategies and worker counts.

The runs are shared by the tests (module fixture): each spawn of two workers costs seconds.
Every run has the learnable span, hierarchical accumulation (pending gradients at the
checkpoint of step 25) and dropout, so FSDP's handling of all three is exercised."""
import shutil

import pytest
import torch

from orchestrator.config import ConfigError, TrainConfig
from orchestrator.training.checkpoint import (CheckpointError, DCP_METADATA_FILE,
                                              load_checkpoint)
from orchestrator.training.local_workers import train_on_local_workers
from orchestrator.training.loop import train
from orchestrator.training.session import LocalSession

CPU = torch.device("cpu")
HALF = "checkpoint_00000025"


def config(**overrides) -> TrainConfig:
    base = dict(model_size="tiny", batch_size=4, seq_len=32, max_steps=50, warmup_steps=5,
                checkpoint_every=25, log_every=25, eval_batches=2, dropout=0.1,
                attention_span=True, span_ramp=8, span_penalty=1e-3,
                accumulation="embeddings=1,lower=2,upper=1,head=1")
    return TrainConfig(**{**base, **overrides})


def resume_from(source, name, run_dir):
    """A run directory holding only `source`'s checkpoint `name`: what a crash there leaves."""
    run_dir.mkdir(parents=True)
    shutil.copytree(source / name, run_dir / name)
    return run_dir


def final_model(run_dir):
    return load_checkpoint(LocalSession(run_dir).checkpoints()[-1])["model"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("strategies")
    out = {"root": root}
    for strategy in ("fsdp", "ddp"):
        outcome = train_on_local_workers(config(strategy=strategy), root / strategy)
        assert "error" not in outcome, outcome
        out[strategy] = outcome["metrics"]
    return out


def test_fsdp_loss_matches_ddp_after_50_steps(runs):
    fsdp, ddp = runs["fsdp"], runs["ddp"]
    assert fsdp["step"] == ddp["step"] == 50
    assert fsdp["loss"] < fsdp["first_loss"] - 1.0  # it trained
    assert fsdp["loss"] == pytest.approx(ddp["loss"], rel=0.01)
    assert fsdp["held_out_loss"] == pytest.approx(ddp["held_out_loss"], rel=0.01)
    assert fsdp["attention_span_mean"] == pytest.approx(ddp["attention_span_mean"], abs=0.2)


def test_fsdp_checkpoints_are_sharded_one_file_per_worker(runs):
    checkpoint = runs["root"] / "fsdp" / HALF
    assert sorted(p.name for p in checkpoint.glob("*.distcp")) == ["__0_0.distcp",
                                                                  "__1_0.distcp"]
    state = load_checkpoint(checkpoint)  # read whole, as serving and export do
    assert state["step"] == 25 and state["world_size"] == 2
    assert state["model"]["tok_emb.weight"].shape == (256, 64)
    assert state["pending_gradients"], "step 25 leaves the 'lower' group's gradients pending"


def test_fsdp_resume_is_bit_equal_at_the_same_worker_count(runs, tmp_path):
    run_dir = resume_from(runs["root"] / "fsdp", HALF, tmp_path / "resumed")
    outcome = train_on_local_workers(config(strategy="fsdp"), run_dir)
    resumed = outcome["metrics"]
    assert resumed["start_step"] == 25 and resumed["step"] == 50
    assert resumed["held_out_loss"] == runs["fsdp"]["held_out_loss"]
    a, b = final_model(runs["root"] / "fsdp"), final_model(run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_ddp_checkpoint_resumes_under_fsdp(runs, tmp_path):
    run_dir = resume_from(runs["root"] / "ddp", HALF, tmp_path / "to_fsdp")
    resumed = train_on_local_workers(config(strategy="fsdp"), run_dir)["metrics"]
    assert resumed["start_step"] == 25
    assert resumed["loss"] == pytest.approx(runs["ddp"]["loss"], rel=0.01)
    a, b = final_model(runs["root"] / "ddp"), final_model(run_dir)
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_an_fsdp_checkpoint_resumes_under_ddp_on_one_worker(runs, tmp_path, capsys):
    # 2 sharded workers -> one plain process: converted and resharded (other data order for
    # one worker, so only the run continuing sensibly is asserted, not equality).
    run_dir = resume_from(runs["root"] / "fsdp", HALF, tmp_path / "to_ddp")
    resumed = train(config(strategy="ddp"), LocalSession(run_dir, device=CPU))
    assert resumed["start_step"] == 25 and resumed["step"] == 50
    assert "a sharded (fsdp) checkpoint converted, 2 -> 1 workers" in capsys.readouterr().out
    assert resumed["held_out_loss"] < runs["fsdp"]["first_loss"] - 1.0
    assert "state.pt" in {p.name for p in LocalSession(run_dir).checkpoints()[-1].iterdir()}


def test_an_fsdp_checkpoint_resumes_under_fsdp_on_another_worker_count(runs, tmp_path,
                                                                        process_group):
    run_dir = resume_from(runs["root"] / "fsdp", HALF, tmp_path / "one_worker")
    resumed = train(config(strategy="fsdp"), LocalSession(run_dir, device=CPU))
    assert resumed["start_step"] == 25 and resumed["step"] == 50
    assert resumed["held_out_loss"] < runs["fsdp"]["first_loss"] - 1.0
    assert DCP_METADATA_FILE in {p.name for p in
                                 LocalSession(run_dir).checkpoints()[-1].iterdir()}


def test_a_sharded_checkpoint_without_its_index_is_refused_naming_it(runs, tmp_path):
    run_dir = resume_from(runs["root"] / "fsdp", HALF, tmp_path / "broken")
    (run_dir / HALF / DCP_METADATA_FILE).unlink()
    with pytest.raises(CheckpointError, match=rf"{HALF} has no \.metadata"):
        train(config(strategy="ddp"), LocalSession(run_dir, device=CPU))


def test_fsdp_in_a_plain_process_is_refused_with_the_reason(tmp_path):
    with pytest.raises(ValueError, match="strategy fsdp needs a process group"):
        train(config(strategy="fsdp", max_steps=2), LocalSession(tmp_path, device=CPU))


def test_strategy_and_compile_are_validated_naming_the_field():
    with pytest.raises(ConfigError, match="strategy must be one of ddp, fsdp, got 'zero3'"):
        TrainConfig(strategy="zero3")
    with pytest.raises(ConfigError, match="compile must be true or false"):
        TrainConfig(compile="yes")
