"""Strategies of the training loop: FSDP2 against DDP on two local gloo workers (CPU), sharded
checkpoints (torch.distributed.checkpoint), resume across strategies and worker counts.

The runs are shared by the tests (module fixture): each spawn of two workers costs seconds.
Every run has the learnable span, hierarchical accumulation (pending gradients at the
checkpoint of step 25), dropout and a vocabulary off the LM head's 64-row alignment (its
product padded in training), so FSDP's handling of all four is exercised."""
import shutil

import pytest
import torch

from orchestrator.config import ConfigError, TrainConfig
from orchestrator.training.checkpoint import (CheckpointError, DCP_METADATA_FILE,
                                              checkpoint_header, load_checkpoint,
                                              sharded_optimizer_names)
from orchestrator.training.local_workers import train_on_local_workers
from orchestrator.training.loop import train
from orchestrator.training.session import LocalSession

CPU = torch.device("cpu")
HALF = "checkpoint_00000025"


def config(**overrides) -> TrainConfig:
    base = dict(model_size="tiny", batch_size=4, seq_len=32, max_steps=50, warmup_steps=5,
                checkpoint_every=25, log_every=25, eval_batches=2, dropout=0.1,
                attention_span=True, span_ramp=8, span_penalty=1e-3, vocab_size=300,
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
    assert state["model"]["tok_emb.weight"].shape == (300, 64)
    assert state["pending_gradients"], "step 25 leaves the 'lower' group's gradients pending"


def test_serving_and_compression_take_a_sharded_checkpoint(runs):
    from orchestrator.compression.source import checkpoint_candidates
    from orchestrator.serving.loading import format_of

    checkpoint = runs["root"] / "fsdp" / HALF
    model, _, step, _ = format_of(checkpoint).load(checkpoint, CPU)
    assert step == 25
    whole = load_checkpoint(checkpoint)["model"]
    assert torch.equal(model.state_dict()["blocks.1.mlp.fc.weight"],
                       whole["blocks.1.mlp.fc.weight"])
    assert checkpoint_candidates(checkpoint) == ([checkpoint.resolve()], False)
    # Its config read alone (index and meta.pt) is the loaded model's, as a DDP run's is.
    from orchestrator.serving.loading import load_model, model_config
    assert model_config(checkpoint) == model.config
    ddp = runs["root"] / "ddp" / HALF
    assert model_config(ddp) == load_model(ddp).model.config == model.config


def test_fsdp_resume_is_bit_equal_at_the_same_worker_count(runs, tmp_path):
    run_dir = resume_from(runs["root"] / "fsdp", HALF, tmp_path / "resumed")
    outcome = train_on_local_workers(config(strategy="fsdp"), run_dir)
    resumed = outcome["metrics"]
    assert resumed["start_step"] == 25 and resumed["step"] == 50
    assert resumed["held_out_loss"] == runs["fsdp"]["held_out_loss"]
    a, b = final_model(runs["root"] / "fsdp"), final_model(run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_final_checkpoint_keeps_the_optimizer_state_of_every_parameter(runs):
    # The last step's held-out evaluation ran the sharded model forward without a backward,
    # which left the root's parameters (embeddings, final LayerNorm) gathered: the final
    # checkpoint lost their AdamW moments, and a finished run extended with a higher
    # --max-steps restarted them from zero (its held-out loss 3.82 where 3.36 was due).
    fsdp = runs["root"] / "fsdp"
    final = LocalSession(fsdp).checkpoints()[-1]
    assert load_checkpoint(final)["step"] == 50
    every = sharded_optimizer_names(fsdp / HALF)
    assert {"tok_emb.weight", "pos_emb.weight", "ln_f.weight", "ln_f.bias"} <= every
    assert sharded_optimizer_names(final) == every


def test_the_final_checkpoint_keeps_the_roots_pending_gradients(tmp_path, process_group):
    # A run ending mid-accumulation leaves its last micro-batches' gradients pending in the
    # final checkpoint, for a resume with a higher max_steps: under FSDP the embeddings' were
    # dropped, read off the root's parameters as the held-out evaluation had left them
    # (gathered, without gradients). (In this process, a group of one: the root is left
    # gathered there too, and two spawned workers cost seconds.)
    run = config(strategy="fsdp", max_steps=10, checkpoint_every=10, log_every=10,
                 attention_span=False, dropout=0.0, accumulation="embeddings=4")
    train(run, LocalSession(tmp_path / "fsdp", device=CPU))
    final = load_checkpoint(LocalSession(tmp_path / "fsdp").checkpoints()[-1])
    assert final["step"] == 10
    assert sorted(final["pending_gradients"]) == ["pos_emb.weight", "tok_emb.weight"]
    assert final["pending_gradients"]["tok_emb.weight"].abs().sum() > 0


def resume_both_ways(source, tmp_path, capsys):
    """One worker resumes `source`'s checkpoint of step 25 under FSDP and under DDP (in this
    process, a gloo group of one): (fsdp metrics, ddp metrics, final weights of each, what the
    loop said)."""
    out = {}
    for strategy in ("fsdp", "ddp"):
        run_dir = resume_from(source, HALF, tmp_path / strategy)
        out[strategy] = train(config(strategy=strategy), LocalSession(run_dir, device=CPU))
        out[strategy + "_model"] = final_model(run_dir)
    out["said"] = capsys.readouterr().out
    return out


def same_run(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Final weights equal up to rounding, the attention's key biases left out: their gradient
    is zero but for rounding (the softmax over keys ignores a shift common to all of them), and
    Adam scales that noise to steps, so their values follow the arithmetic's order of rounding."""
    def without_key_bias(name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight.view(3, -1)[[0, 2]] if name.endswith("attn.qkv.bias") else weight

    return all(torch.allclose(without_key_bias(k, a[k]), without_key_bias(k, b[k]), atol=1e-5)
               for k in a)


def test_a_ddp_checkpoint_resumes_under_fsdp_as_under_ddp(runs, tmp_path, capsys,
                                                          process_group):
    both = resume_both_ways(runs["root"] / "ddp", tmp_path, capsys)
    assert "a full (ddp) checkpoint converted, 2 -> 1 workers" in both["said"]
    assert both["fsdp"]["start_step"] == 25 and both["fsdp"]["step"] == 50
    # Converted weights, optimizer moments and pending gradients: the same run as DDP's.
    a, b = both["fsdp_model"], both["ddp_model"]
    assert same_run(a, b)
    assert both["fsdp"]["held_out_loss"] < runs["ddp"]["first_loss"] - 1.0


def test_an_fsdp_checkpoint_resumes_under_ddp_as_under_fsdp_on_another_worker_count(
        runs, tmp_path, capsys, process_group):
    # 2 sharded workers -> 1: resharded under FSDP, gathered whole under DDP; the two
    # continuations agree (not bit-equal to the 2-worker run: one worker sees other batches).
    both = resume_both_ways(runs["root"] / "fsdp", tmp_path, capsys)
    assert "a sharded (fsdp) checkpoint converted, 2 -> 1 workers" in both["said"]
    assert "a sharded (fsdp) checkpoint, 2 -> 1 workers" in both["said"]
    a, b = both["fsdp_model"], both["ddp_model"]
    assert same_run(a, b)
    assert both["ddp"]["held_out_loss"] < runs["fsdp"]["first_loss"] - 1.0
    ddp_files = {p.name for p in LocalSession(tmp_path / "ddp").checkpoints()[-1].iterdir()}
    fsdp_files = {p.name for p in LocalSession(tmp_path / "fsdp").checkpoints()[-1].iterdir()}
    assert "state.pt" in ddp_files and DCP_METADATA_FILE in fsdp_files


def test_a_sharded_checkpoint_without_its_index_is_refused_naming_it(runs, tmp_path):
    run_dir = resume_from(runs["root"] / "fsdp", HALF, tmp_path / "broken")
    (run_dir / HALF / DCP_METADATA_FILE).unlink()
    with pytest.raises(CheckpointError, match=rf"{HALF} has no \.metadata"):
        train(config(strategy="ddp"), LocalSession(run_dir, device=CPU))


def test_fsdp_in_a_plain_process_is_refused_with_the_reason(tmp_path):
    with pytest.raises(ValueError, match="strategy fsdp needs a process group"):
        train(config(strategy="fsdp", max_steps=2), LocalSession(tmp_path, device=CPU))


def test_fsdp_shards_on_the_models_device_where_a_gpu_is_visible(process_group, monkeypatch):
    """A CPU worker on a GPU node (Ray leaves the node's GPUs visible to a worker that asked
    for none): fully_shard's default mesh is the visible accelerator's, which moved the CPU
    model's shards onto a GPU (here, a CPU build: the CUDA mesh itself fails)."""
    from orchestrator.training.model import GPT, GPTConfig
    from orchestrator.training.precision import Precision
    from orchestrator.training.strategy import shard_model

    monkeypatch.setattr(torch._C, "_get_accelerator", lambda: torch.device("cuda"))
    model = GPT(GPTConfig.from_train_config(config(), vocab_size=300))
    shard_model(model, Precision("fp32", "cpu"))
    assert {(p.device.type, p.device_mesh.device_type) for p in model.parameters()
            if hasattr(p, "device_mesh")} == {("cpu", "cpu")}


def test_pretrain_flags_reach_the_config(tmp_path):
    from jobs import pretrain

    args = pretrain.parse_args(["--strategy", "fsdp", "--compile"])
    train_config, _ = pretrain.build_configs(args, tmp_path / "run")
    assert train_config.strategy == "fsdp" and train_config.compile is True
    default = pretrain.build_configs(pretrain.parse_args([]), tmp_path / "r")[0]
    assert default.strategy == "ddp" and default.compile is None
    off = pretrain.build_configs(pretrain.parse_args(["--no-compile"]), tmp_path / "o")[0]
    assert off.compile is False


def test_compile_by_default_on_cuda_only_and_not_with_the_learnt_span():
    # gpu_check measured compiled training 1.09-1.18x faster on an H200; on CPU compiling
    # costs minutes. An explicit choice wins on either.
    assert TrainConfig().compiles_on("cuda") and not TrainConfig().compiles_on("cpu")
    assert TrainConfig(compile=True).compiles_on("cpu")
    assert not TrainConfig(compile=False).compiles_on("cuda")
    # The learnt span's window recompiles the model each time it moves: not by default.
    assert not TrainConfig(attention_span=True).compiles_on("cuda")
    assert TrainConfig(attention_span=True, compile=True).compiles_on("cuda")


def test_strategy_and_compile_are_validated_naming_the_field():
    with pytest.raises(ConfigError, match="strategy must be one of ddp, fsdp, got 'zero3'"):
        TrainConfig(strategy="zero3")
    with pytest.raises(ConfigError, match="compile must be true, false or null"):
        TrainConfig(compile="yes")


@pytest.mark.parametrize("precision, strategy, allowed", [
    ("fp16", "fsdp", False), ("fp16", "ddp", True), ("bf16", "fsdp", True),
    ("fp32", "fsdp", True)])
def test_the_fused_optimizer_is_kept_only_from_fsdps_loss_scaler(precision, strategy, allowed):
    from orchestrator.training import strategy as strategies
    from orchestrator.training.precision import Precision

    assert strategies.fused_optimizer_allowed(Precision(precision, "cuda"), strategy) is allowed


def test_why_fsdps_loss_scaler_cannot_drive_the_fused_step(process_group):
    """pytorch/pytorch#140514, reproduced (the CPU fused kernel standing in for CUDA's): the
    overflow flag ShardedGradScaler hands the fused step has shape (1,), which the step
    counts (shape ()) cannot take. When a torch release fixes it, this fails, and
    `fused_optimizer_allowed` can let FSDP's fp16 runs use the fused step."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    model = fully_shard(torch.nn.Linear(8, 8))
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    scaler = ShardedGradScaler("cpu")
    scaler.scale(model(torch.randn(4, 8)).sum()).backward()
    scaler.unscale_(optimizer)
    with pytest.raises(RuntimeError, match=r"shape \[\] doesn't match the broadcast shape"):
        scaler.step(optimizer)


@pytest.mark.parametrize("saved_fused, resuming_fused", [(True, None), (None, True)])
@pytest.mark.parametrize("full", [False, True], ids=["sharded", "full"])
def test_fsdp_state_loads_with_the_resuming_optimizers_kernels(process_group, saved_fused,
                                                                resuming_fused, full):
    """apply_state (a sharded checkpoint, or a full one converted) keeps the resuming
    optimizer's fused choice (PyTorch's CPU fused kernel standing in for a GPU's), where
    set_state_dict alone takes the saved one."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    from torch.distributed.fsdp import fully_shard

    from orchestrator.training import strategy as strategies

    def stepped(fused, shard, steps):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
        if shard:
            fully_shard(model)
        optimizer = torch.optim.AdamW(model.parameters(), fused=fused)
        for _ in range(steps):
            model(torch.randn(2, 8)).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        return model, optimizer

    saved_model, saved_optimizer = stepped(saved_fused, shard=not full, steps=2)
    model_state, optimizer_state = get_state_dict(
        saved_model, saved_optimizer, options=StateDictOptions(full_state_dict=full))
    state = {"model": model_state, "optimizer": optimizer_state}
    model, optimizer = stepped(resuming_fused, shard=True, steps=1)
    strategies.apply_state(model, optimizer, state, full=full)
    assert [group["fused"] for group in optimizer.param_groups] == [resuming_fused]
    # the saved moments came in (the resuming optimizer's own had taken one step, not two)
    assert len(optimizer.state) == 4 and all(float(s["step"]) == 2.0
                                             for s in optimizer.state.values())


def test_an_fsdp_fp16_run_trains_where_the_fused_step_would_be_chosen(tmp_path, monkeypatch,
                                                                      process_group):
    """The loop keeps FSDP's fp16 runs off the fused step even where every parameter would
    take it (forced here: PyTorch's CPU fused kernel standing in for CUDA's); with it, the
    first step would raise (the test above)."""
    from orchestrator.training import optim

    monkeypatch.setattr(optim, "uses_fused_adamw", lambda params: True)
    metrics = train(TrainConfig(model_size="tiny", batch_size=2, seq_len=16, max_steps=2,
                                warmup_steps=1, checkpoint_every=2, log_every=2,
                                eval_batches=1, strategy="fsdp", precision="fp16"),
                    LocalSession(tmp_path / "run", device=CPU))
    assert metrics["step"] == 2 and metrics["precision"] == "fp16"


def test_an_fsdp_fp16_run_trains_the_learnable_span(tmp_path, process_group):
    """The spans stay unsharded (plain tensors beside DTensors): ShardedGradScaler's fused
    unscale refused the mixed list, "got mixed torch.Tensor and DTensor", at step 1."""
    metrics = train(TrainConfig(model_size="tiny", batch_size=2, seq_len=16, max_steps=2,
                                warmup_steps=1, checkpoint_every=2, log_every=2,
                                eval_batches=1, strategy="fsdp", precision="fp16",
                                attention_span=True, span_ramp=4),
                    LocalSession(tmp_path / "run", device=CPU))
    assert metrics["step"] == 2 and metrics["precision"] == "fp16"


def test_the_fsdp_fp16_scaler_finds_an_overflow_in_an_unsharded_gradient(process_group):
    # The plain gradients' overflow must skip the step as a sharded one's does.
    from torch.distributed.fsdp import fully_shard

    from orchestrator.training.precision import Precision
    from orchestrator.training.strategy import grad_scaler

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    plain = model[1].weight
    fully_shard(model, ignored_params={plain})
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scaler = grad_scaler(Precision("fp16", "cpu"), "fsdp")
    scaler.scale(model(torch.ones(2, 4)).sum()).backward()
    plain.grad[0, 0] = float("inf")
    before = plain.detach().clone()
    scaler.step(optimizer)
    scaler.update()
    assert torch.equal(plain.detach(), before) and scaler.get_scale() < 65536.0


def test_saving_a_sharded_checkpoint_leaves_the_live_optimizer_as_it_was(process_group):
    # get_state_dict gave a never-stepped AdamW a state (step 1, zero moments) by stepping
    # it: an fp16 run whose steps had all overflowed then took its first step as its second.
    from torch.distributed.fsdp import fully_shard

    from orchestrator.training.strategy import sharded_state

    model = fully_shard(torch.nn.Linear(4, 4))
    optimizer = torch.optim.AdamW(model.parameters())
    saved = sharded_state(model, optimizer)  # as a checkpoint's save calls it
    assert not optimizer.state and not saved["optimizer"]["state"]  # nor in the checkpoint
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    saved = sharded_state(model, optimizer)  # a stepped optimizer's state is all saved
    assert len(saved["optimizer"]["state"]) == 2 and len(optimizer.state) == 2


def test_a_sharded_checkpoint_missing_a_shard_falls_back_to_the_previous(runs, tmp_path, capsys,
                                                                         process_group):
    # DCP's failure is a BaseException (not an Exception): it escaped the wrapper and the
    # fallback, and every restart crashed on the same checkpoint.
    source = runs["root"] / "fsdp"
    run_dir = resume_from(source, HALF, tmp_path / "run")
    shutil.copytree(source / "checkpoint_00000050", run_dir / "checkpoint_00000050")
    (run_dir / "checkpoint_00000050" / "__1_0.distcp").unlink()
    metrics = train(config(strategy="fsdp"), LocalSession(run_dir, device=CPU))
    said = capsys.readouterr().out
    assert "checkpoint file missing" in said and "checkpoint_00000050/__1_0.distcp" in said
    assert "falling back" in said
    assert metrics["start_step"] == 25 and metrics["step"] == 50


def with_a_flipped_shard(runs, run_dir):
    """The FSDP run's two checkpoints in `run_dir`, the later one's __1_0.distcp with a byte
    flipped."""
    source = runs["root"] / "fsdp"
    resume_from(source, HALF, run_dir)
    shutil.copytree(source / "checkpoint_00000050", run_dir / "checkpoint_00000050")
    shard = run_dir / "checkpoint_00000050" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    return run_dir


def test_a_flipped_byte_in_a_shard_is_caught_and_the_previous_checkpoint_taken(runs, tmp_path,
                                                                               capsys):
    # Shards had no checksum: one flipped byte loaded silently (an exp_avg_sq of 1e31 in the
    # reviewer's run), where a damaged state.pt is refused.
    run_dir = with_a_flipped_shard(runs, tmp_path / "run")
    with pytest.raises(CheckpointError, match=r"__1_0\.distcp is corrupt"):
        load_checkpoint(run_dir / "checkpoint_00000050")
    metrics = train(config(strategy="ddp"), LocalSession(run_dir, device=CPU))
    assert metrics["start_step"] == 25 and "__1_0.distcp is corrupt" in capsys.readouterr().out


def test_an_altered_index_is_caught_and_the_previous_checkpoint_taken(runs, tmp_path, capsys):
    # Only the shards had digests: an index whose entries were swapped read each tensor's
    # bytes into another without complaint.
    source = runs["root"] / "fsdp"
    run_dir = resume_from(source, HALF, tmp_path / "run")
    shutil.copytree(source / "checkpoint_00000050", run_dir / "checkpoint_00000050")
    index = run_dir / "checkpoint_00000050" / DCP_METADATA_FILE
    index.write_bytes(index.read_bytes() + b"\0")
    with pytest.raises(CheckpointError, match=r"00000050/\.metadata is corrupt"):
        load_checkpoint(run_dir / "checkpoint_00000050")
    metrics = train(config(strategy="ddp"), LocalSession(run_dir, device=CPU))
    assert metrics["start_step"] == 25 and ".metadata is corrupt" in capsys.readouterr().out


def test_shards_without_rank_0s_files_are_named_a_sharded_checkpoint(runs, tmp_path):
    # Neither meta.pt nor the index arrived (rank 0's part), the other workers' shards did:
    # the error named a missing state.pt, the wrong kind of checkpoint.
    run_dir = resume_from(runs["root"] / "fsdp", HALF, tmp_path / "run")
    for name in ("meta.pt", "meta.pt.sha256", DCP_METADATA_FILE):
        (run_dir / HALF / name).unlink()
    with pytest.raises(CheckpointError, match=rf"sharded checkpoint .*{HALF} has no meta\.pt"):
        checkpoint_header(run_dir / HALF)


def test_a_shard_that_cannot_be_read_is_a_checkpoint_problem(runs, monkeypatch):
    # An OSError (EIO, ESTALE) escaped the workers' agreement: the worker hashing that shard
    # left, the others waited in the agreement's collective.
    from orchestrator.training import checkpoint

    def unreadable_shards(path):
        if path.suffix == ".distcp":
            raise OSError(5, "Input/output error")
        return real(path)
    real = checkpoint.sha256_file
    monkeypatch.setattr(checkpoint, "sha256_file", unreadable_shards)
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp cannot be read: Input/output"):
        checkpoint.checkpoint_header(runs["root"] / "fsdp" / HALF)


def test_workers_agree_to_pass_over_a_shard_only_one_of_them_checks(runs, tmp_path):
    # Each worker hashes its share of the shards (rank 1: __1_0.distcp): the other must fall
    # back with it, not go on alone into the checkpoint's collective load.
    run_dir = with_a_flipped_shard(runs, tmp_path / "run")
    outcome = train_on_local_workers(config(strategy="fsdp"), run_dir)
    assert "error" not in outcome, outcome
    assert outcome["metrics"]["start_step"] == 25 and outcome["metrics"]["step"] == 50


def test_a_sharded_save_that_fails_is_a_checkpoint_error_naming_the_cause(tmp_path,
                                                                          monkeypatch):
    # DCP's CheckpointException is no Exception: a full disk reached the user as every
    # rank's traceback, and the local workers' `except Exception` missed it.
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from orchestrator.training.checkpoint import save_sharded

    def full_disk(state, checkpoint_id):
        raise CheckpointException("save failed", {0: (OSError(28, "No space left on device"),
                                                      None)})

    monkeypatch.setattr(dcp, "save", full_disk)
    with pytest.raises(CheckpointError) as caught:
        save_sharded(tmp_path / "ckpt", {"model": {}}, {"step": 1}, rank=0)
    assert "cannot be written: OSError: [Errno 28] No space left on device (" in str(
        caught.value)
    assert not (tmp_path / "ckpt" / "meta.pt").exists()  # never taken for complete


def test_a_sharded_save_on_a_full_disk_says_the_free_space(tmp_path, monkeypatch):
    # torch's own cause of a full disk is "[enforce fail at inline_container.cc:672]", which
    # names none: a full checkpoint's failed save said the free space left, a sharded one's
    # did not.
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from orchestrator.training.checkpoint import free_space_note, save_sharded

    def full_disk(state, checkpoint_id):
        raise CheckpointException("save failed", {0: (RuntimeError(
            "[enforce fail at inline_container.cc:672] . unexpected pos 768 vs 662"), None)})

    monkeypatch.setattr(dcp, "save", full_disk)
    directory = tmp_path / "ckpt"
    with pytest.raises(CheckpointError) as caught:
        save_sharded(directory, {"model": {}}, {"step": 1}, rank=0)
    assert str(caught.value) == (f"sharded checkpoint {directory} cannot be written: "
                                 "RuntimeError: [enforce fail at inline_container.cc:672]."
                                 f"{free_space_note(directory)}")
    assert free_space_note(directory).endswith(" GiB free on its filesystem)")


@pytest.mark.parametrize("sharded", [False, True])
def test_a_checkpoint_directory_that_cannot_be_made_is_named(tmp_path, monkeypatch, sharded):
    # A read-only (or full) filesystem: mkdir's OSError was a traceback.
    import errno
    from pathlib import Path

    from orchestrator.training.checkpoint import save_checkpoint, save_sharded

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    directory = tmp_path / "out" / "ckpt"
    with pytest.raises(CheckpointError) as caught:
        if sharded:
            save_sharded(directory, {"model": {"w": torch.zeros(2)}}, {"step": 1}, rank=0)
        else:
            save_checkpoint(directory, {"model": {"w": torch.zeros(2)}, "step": 1})
    # (the parent does not exist either: no free space said)
    assert str(caught.value) == (f"{'sharded checkpoint' if sharded else 'checkpoint'} "
                                 f"{directory} cannot be written: Read-only file system")


def sharded_checkpoint_without_digests(tmp_path):
    """A sharded checkpoint of step 3 as written before shard digests were recorded (read
    unchecked)."""
    from orchestrator.training.checkpoint import (SHARD_DIGESTS, load_tensors, save_sharded,
                                                  save_tensors)

    directory = tmp_path / "checkpoint_00000003"
    save_sharded(directory, {"model": {"w": torch.randn(8, 8)},
                             "optimizer": {"state": {"w": {"exp_avg": torch.randn(8, 8)}}}},
                 {"step": 3}, rank=0)
    meta = load_tensors(directory / "meta.pt")
    del meta[SHARD_DIGESTS]  # as written before the digests
    save_tensors(directory / "meta.pt", meta)
    return directory


def test_a_damaged_shard_without_a_digest_is_refused_with_its_cause_in_one_line(tmp_path):
    # A checkpoint written before shard digests were recorded is read unchecked, so DCP's own
    # failure is the message: its last line was taken for the cause, and a shard of zeros
    # (never written: a power loss) was refused as "cannot be read: Check the documentation
    # of torch.load to learn more about types accepted by default with weights_only https://..."
    directory = sharded_checkpoint_without_digests(tmp_path)
    shard = directory / "__0_0.distcp"
    shard.write_bytes(bytes(shard.stat().st_size))
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(directory)
    assert str(caught.value) == (f"sharded checkpoint {directory} cannot be read: "
                                 "UnpicklingError: Weights only load failed.")


def test_a_truncated_index_without_a_digest_is_refused_without_dcp_tracebacks(tmp_path,
                                                                              caplog):
    # DCP tried the index (.metadata) twice, as the global one and as the rank's own
    # (__0.metadata), and logged a "Global metadata is not found" / "Rank local metadata is
    # not found" traceback for each on stderr before its AssertionError ("metadata is None;
    # global metadata read failed: ..."). The index is read first: one line, naming it.
    from orchestrator.training.checkpoint import DCP_METADATA_FILE, checkpoint_problem

    directory = sharded_checkpoint_without_digests(tmp_path)
    index = directory / DCP_METADATA_FILE
    index.write_bytes(index.read_bytes()[:index.stat().st_size // 2])
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(directory)
    said = [r.getMessage() for r in caplog.records]  # (DCP logs on the root logger)
    assert not [m for m in said if "metadata is not found" in m], said
    assert str(caught.value) == (f"sharded checkpoint index {index} cannot be read safely: "
                                 "pickle data was truncated")
    # A resume passes over it for the same reason (checked with its files, before DCP).
    assert checkpoint_problem(directory) == str(caught.value)


def test_a_checkpoint_before_a_groups_first_step_resumes_under_either_strategy(tmp_path,
                                                                              process_group):
    """'lower' steps every 8 micro-batches; the checkpoint of step 4 holds no optimizer state
    for it. Resumed under FSDP it failed to load ('Missing key in checkpoint state_dict'),
    converted DDP -> FSDP too; now every way ends as the uninterrupted run."""
    from tests.support import CrashingSession

    short = dict(max_steps=8, checkpoint_every=4, log_every=4, eval_batches=1,
                 accumulation="embeddings=1,lower=8,upper=1,head=1")
    final = {}
    for strategy in ("fsdp", "ddp"):
        train(config(strategy=strategy, **short), LocalSession(tmp_path / strategy, device=CPU))
        final[strategy] = final_model(tmp_path / strategy)
        with pytest.raises(RuntimeError, match="worker killed"):
            train(config(strategy=strategy, **short),
                  CrashingSession(tmp_path / f"{strategy}_crashed", crash_at=4))
    for written, resumed in (("fsdp", "fsdp"), ("ddp", "fsdp"), ("fsdp", "ddp")):
        run_dir = resume_from(tmp_path / f"{written}_crashed", "checkpoint_00000004",
                              tmp_path / f"{written}_to_{resumed}")
        metrics = train(config(strategy=resumed, **short), LocalSession(run_dir, device=CPU))
        assert metrics["start_step"] == 4 and metrics["step"] == 8
        if written == resumed:
            a, b = final[resumed], final_model(run_dir)
            assert all(torch.equal(a[k], b[k]) for k in a), (written, resumed)
        else:
            assert same_run(final_model(run_dir), final[resumed]), (written, resumed)


@pytest.mark.parametrize("grouped", [False, True])
def test_the_in_place_sharded_loader_refuses_what_is_no_sharded_checkpoint_in_one_line(
        tmp_path, caplog, grouped, request):
    # load_sharded_into on a directory without the index let DCP log a traceback for each of
    # its two tries at it (34 lines on stderr) before "AssertionError: metadata is None; ...",
    # and it loaded DCP's files without meta.pt (a save cut short) as a checkpoint.
    import torch.distributed.checkpoint as dcp

    from orchestrator.training.checkpoint import load_sharded_into, save_checkpoint

    if grouped:
        request.getfixturevalue("process_group")
    plain = tmp_path / "plain"  # DCP's files alone (plain torch.distributed.checkpoint.save)
    dcp.save({"model": {"w": torch.randn(8, 8)}}, checkpoint_id=str(plain))
    empty = tmp_path / "empty"
    empty.mkdir()
    full = tmp_path / "full"
    save_checkpoint(full, {"model": {"w": torch.randn(8, 8)}, "step": 1})
    truncated = sharded_checkpoint_without_digests(tmp_path)
    index = truncated / DCP_METADATA_FILE
    index.write_bytes(index.read_bytes()[:index.stat().st_size // 2])
    expected = {
        plain: f"sharded checkpoint {plain} has no meta.pt (written last, by rank 0): "
               "incomplete",
        empty: f"checkpoint file missing: {empty / 'meta.pt'}",
        tmp_path / "none": f"checkpoint file missing: {tmp_path / 'none' / 'meta.pt'}",
        full: f"checkpoint {full} is not sharded: it holds state.pt (a full checkpoint)",
        truncated: f"sharded checkpoint index {index} cannot be read safely: pickle data was "
                   "truncated"}
    for directory, message in expected.items():
        caplog.clear()
        with pytest.raises(CheckpointError) as caught:
            load_sharded_into(directory, {"model": {"w": torch.zeros(8, 8)}})
        assert str(caught.value) == message
        said = [r.getMessage() for r in caplog.records]  # (DCP logs on the root logger)
        assert not [m for m in said if "metadata is not found" in m], said


def test_the_in_place_sharded_loader_still_loads_a_sharded_checkpoint(tmp_path,
                                                                       process_group):
    from orchestrator.training.checkpoint import load_sharded_into, save_sharded

    saved = {"model": {"w": torch.randn(8, 8)}}
    save_sharded(tmp_path / "ckpt", saved, {"step": 1}, rank=0)
    tensors = {"model": {"w": torch.zeros(8, 8)}}
    load_sharded_into(tmp_path / "ckpt", tensors)
    assert torch.equal(tensors["model"]["w"], saved["model"]["w"])


@pytest.mark.parametrize("reader", ["checkpoint_header", "load_sharded_into"])
def test_a_checkpoint_file_whose_stat_fails_is_a_checkpoint_problem(tmp_path, monkeypatch,
                                                                    reader):
    # An EIO, ESTALE or EACCES on a worker's stat of meta.pt was an OSError traceback, not a
    # CheckpointError: not passed over for the previous checkpoint (the worker failed, the
    # run restarted), and on that worker alone it skipped the workers' agreement.
    import errno
    from pathlib import Path

    from orchestrator.training import checkpoint

    directory = sharded_checkpoint_without_digests(tmp_path)
    is_file = Path.is_file

    def failing(self):
        if self.name == "meta.pt":
            raise OSError(errno.EIO, "Input/output error", str(self))
        return is_file(self)

    monkeypatch.setattr(Path, "is_file", failing)
    with pytest.raises(CheckpointError) as caught:
        if reader == "checkpoint_header":
            checkpoint.checkpoint_header(directory)
        else:
            checkpoint.load_sharded_into(directory, {"model": {"w": torch.zeros(8, 8)}})
    assert str(caught.value) == (f"checkpoint file {directory / 'meta.pt'} cannot be read: "
                                 "Input/output error")


@pytest.mark.parametrize("entries, missing", [
    ({"model": {"w": torch.ones(2)}}, "optimizer"),
    ({"optimizer": {"state": {"w": {"exp_avg": torch.ones(2)}}}}, "model"),
])
def test_a_sharded_checkpoint_missing_an_entry_is_refused_naming_it(tmp_path, entries, missing):
    # Read whole (serving, export) it raised a bare KeyError: 'optimizer'.
    from orchestrator.training.checkpoint import save_sharded

    directory = tmp_path / "checkpoint_00000001"
    save_sharded(directory, entries, {"step": 1}, rank=0)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(directory)
    assert str(caught.value) == (f"sharded checkpoint {directory} holds no '{missing}' entry "
                                 "in its shards: not a training checkpoint")


def test_an_empty_shard_without_a_digest_is_named_as_empty(tmp_path):
    # Written before shard digests were recorded (read unchecked), an empty shard file (a
    # crash mid-write) read only "cannot be read: EOFError", naming no file.
    from orchestrator.training.checkpoint import checkpoint_problem

    directory = sharded_checkpoint_without_digests(tmp_path)
    shard = directory / "__0_0.distcp"
    shard.write_bytes(b"")
    said = f"checkpoint shard {shard} is empty (0 bytes)"
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(directory)
    assert str(caught.value) == said
    assert checkpoint_problem(directory) == said  # (a resume passes over it, saying so)
