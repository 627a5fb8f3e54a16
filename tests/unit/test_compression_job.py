"""jobs/compress.py on bad input: a clear error naming the file or field, a non-zero exit,
and nothing written under --out. (The whole pipeline end to end: tests/integration.)"""
import dataclasses
import pickle
from pathlib import Path

import pytest
import torch

from jobs import compress as JOB  # noqa: N812 - the job under test
from orchestrator.compression.config import CompressConfig
from orchestrator.compression.pipeline import prepare_out
from orchestrator.compression.source import load_teacher
from orchestrator.config import ConfigError, TrainConfig
from orchestrator.training.checkpoint import STATE_FILE, save_checkpoint
from orchestrator.training.model import GPT, GPTConfig
from tests.support import resave_without


def make_checkpoint(directory: Path, step: int = 3, seed: int = 0) -> Path:
    config = TrainConfig(model_size="tiny", seq_len=16)
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_train_config(config))
    save_checkpoint(directory, {"model": model.state_dict(), "config": config.to_dict(),
                                "step": step})
    return directory


@pytest.fixture(scope="module")
def _teacher_exports():
    return {}


@pytest.fixture
def teacher_exported_once(monkeypatch, _teacher_exports):
    """The pipeline's up-front export check (torch.onnx.export of the teacher: seconds even
    for the tiny model, most of a short run's time) done for real once per teacher in this
    module, its ONNX file copied for every later run. For the tests whose claim is what a
    run or a rerun keeps, fails or says, not the export (whose failure has its own test,
    test_a_model_that_cannot_be_exported_fails_before_any_fine_tuning, left alone). A teacher
    of other weights or shape, or another `what`, is exported afresh."""
    import hashlib

    from orchestrator.compression import export

    real_export = export.export_fp32_onnx

    def export_once(model, path, what="model"):
        digest = hashlib.sha256(repr(model.config).encode())
        for name, tensor in model.state_dict().items():
            digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
        key = (what, digest.hexdigest())
        if key not in _teacher_exports:
            real_export(model, path, what)
            _teacher_exports[key] = Path(path).read_bytes()
        else:
            Path(path).write_bytes(_teacher_exports[key])
        return path

    monkeypatch.setattr(export, "export_fp32_onnx", export_once)


def corrupt(checkpoint: Path) -> None:
    data = bytearray((checkpoint / STATE_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (checkpoint / STATE_FILE).write_bytes(bytes(data))


def run_job(capsys, *args):
    code = JOB.main(list(args))
    return code, capsys.readouterr().err


def test_missing_checkpoint_is_named_and_nothing_is_written(tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_job(capsys, "--checkpoint", str(tmp_path / "nope"), "--out", str(out))
    assert code == 2
    assert f"checkpoint not found: {tmp_path / 'nope'}" in err
    assert not out.exists()


def test_a_file_given_as_the_checkpoint_names_the_directory_to_pass(tmp_path, capsys):
    # Was: "<dir>/state.pt is neither a checkpoint directory (no state.pt) nor a run directory"
    checkpoint = make_checkpoint(tmp_path / "run" / "checkpoint_00000003")
    out = tmp_path / "out"
    for name in (STATE_FILE, STATE_FILE + ".sha256"):
        code, err = run_job(capsys, "--checkpoint", str(checkpoint / name), "--out", str(out))
        assert code == 2, err
        assert (f"--checkpoint {checkpoint / name} is a file: pass the checkpoint directory "
                f"that holds it, {checkpoint}") in err, err
        assert "neither" not in err and not out.exists()
    # A file in no checkpoint directory (an int8 export's weights): what --checkpoint takes.
    (tmp_path / "int8").mkdir()
    (tmp_path / "int8" / "weights.int8.pt").write_bytes(b"int8")
    code, err = run_job(capsys, "--checkpoint", str(tmp_path / "int8" / "weights.int8.pt"),
                        "--out", str(out))
    assert code == 2 and "weights.int8.pt is a file, not a pretrain checkpoint directory" in err
    assert not out.exists()


def test_a_hugging_face_export_given_as_the_teacher_is_named_as_one(tmp_path, capsys):
    # Was: "<dir> is neither a checkpoint directory (no state.pt) nor a run directory",
    # where serving and jobs/export.py say what it is and what to pass instead.
    from orchestrator.hf_export import export_checkpoint

    make_checkpoint(tmp_path / "run" / "checkpoint_00000003")
    export_checkpoint(tmp_path / "run", tmp_path / "hf")
    out = tmp_path / "out"
    code, err = run_job(capsys, "--checkpoint", str(tmp_path / "hf"), "--out", str(out))
    assert code == 2 and f"--checkpoint {tmp_path / 'hf'} is a Hugging Face model " \
                         "(jobs/export.py writes those)" in err, err
    assert "the training checkpoint it came from" in err and not out.exists()


def test_a_compress_output_or_its_int8_given_as_the_teacher_is_named_as_one(tmp_path, capsys):
    # Was: "<dir> is neither a checkpoint directory (no state.pt) nor a run directory", where
    # a stage folder of the same output is named, with the checkpoint to compress instead.
    import json

    teacher = make_checkpoint(tmp_path / "run" / "checkpoint_00000003")
    compressed = tmp_path / "compressed"
    (compressed / "int8").mkdir(parents=True)
    (compressed / "int8" / "weights.int8.pt").write_bytes(b"int8")
    (compressed / "compress_config.json").write_text(json.dumps(
        {"compress": {}, "source": {"checkpoint": str(teacher)}}))
    out = tmp_path / "out"
    for given, what in ((compressed, "a jobs/compress.py output (compress_config.json)"),
                        (compressed / "int8", "an INT8 export (weights.int8.pt)")):
        code, err = run_job(capsys, "--checkpoint", str(given), "--out", str(out))
        assert code == 2 and f"--checkpoint {given} is {what}, not a training checkpoint: " \
                             f"compress the training checkpoint it was compressed from, " \
                             f"{teacher}" in err, err
        assert not out.exists()


def test_corrupt_checkpoint_is_named_and_nothing_is_written(tmp_path, capsys):
    checkpoint = make_checkpoint(tmp_path / "run" / "checkpoint_00000003")
    corrupt(checkpoint)
    out = tmp_path / "out"
    code, err = run_job(capsys, "--checkpoint", str(checkpoint), "--out", str(out))
    assert code == 2
    assert f"{checkpoint / STATE_FILE} is corrupt" in err
    assert not out.exists()
    # The same through the run directory: no usable checkpoint left to fall back to.
    code, err = run_job(capsys, "--checkpoint", str(tmp_path / "run"), "--out", str(out))
    assert code == 2 and "no usable checkpoint in run directory" in err and not out.exists()


def test_a_teacher_whose_config_lacks_model_size_is_named_and_nothing_is_written(
        tmp_path, capsys):
    # Read as the default 'small' GPT: "the weights do not fit a 'small' GPT", no field named.
    checkpoint = resave_without(make_checkpoint(tmp_path / "ckpt"), "model_size")
    out = tmp_path / "out"
    code, err = run_job(capsys, "--checkpoint", str(checkpoint), "--out", str(out))
    assert code == 2 and not out.exists()
    assert f"{checkpoint / STATE_FILE}: its training config lacks 'model_size'" in err, err


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_checkpoint_carrying_code_is_refused(tmp_path, capsys):
    checkpoint = make_checkpoint(tmp_path / "ckpt")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (checkpoint / STATE_FILE).write_bytes(pickle.dumps({"model": Evil(), "config": {}}))
    import hashlib
    digest = hashlib.sha256((checkpoint / STATE_FILE).read_bytes()).hexdigest()
    (checkpoint / (STATE_FILE + ".sha256")).write_text(digest)
    code, err = run_job(capsys, "--checkpoint", str(checkpoint), "--out", str(tmp_path / "o"))
    assert code == 2 and "cannot be loaded safely" in err and "pwned" not in err
    assert not (tmp_path / "o").exists()


def test_weights_that_do_not_fit_their_config_are_refused(tmp_path, capsys):
    checkpoint = tmp_path / "ckpt"
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32))
    save_checkpoint(checkpoint, {"model": model.state_dict(),
                                 "config": TrainConfig(model_size="tiny", seq_len=16).to_dict()})
    code, err = run_job(capsys, "--checkpoint", str(checkpoint), "--out", str(tmp_path / "o"))
    assert code == 2 and "weights do not fit a 'tiny' GPT" in err
    assert str(checkpoint / STATE_FILE) in err


def test_weights_of_another_model_size_are_refused_in_one_line(tmp_path, capsys):
    """A checkpoint whose config says 'small' holding a 'tiny' model's weights: torch's
    load_state_dict message (a line per weight, 50 here, printed twice) came through whole."""
    tiny = GPT(GPTConfig.from_train_config(TrainConfig(model_size="tiny", seq_len=16)))
    checkpoint = tmp_path / "ckpt"
    save_checkpoint(checkpoint, {"model": tiny.state_dict(),
                                 "config": TrainConfig(model_size="small", seq_len=16).to_dict()})
    code, err = run_job(capsys, "--checkpoint", str(checkpoint), "--out", str(tmp_path / "o"))
    assert code == 2 and err.count("\n") == 1, err
    assert f"{checkpoint / STATE_FILE}: the weights do not fit a 'small' GPT" in err
    # What does not fit, counted, with the first of each kind named.
    assert "24 missing (first blocks.2.ln1.weight)" in err, err
    assert ("of another shape (first tok_emb.weight: [256, 64] in the checkpoint, "
            "[256, 128] in the model)") in err, err
    assert not (tmp_path / "o").exists()


def test_a_run_directory_given_with_a_tilde_is_named_expanded(tmp_path, capsys, monkeypatch):
    """--checkpoint=~/run (no shell expands a tilde after '='): the refusal named
    <cwd>/~/run, a directory that does not exist."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    corrupt(make_checkpoint(tmp_path / "run" / "checkpoint_00000003"))
    code, err = run_job(capsys, "--checkpoint", "~/run", "--out", str(tmp_path / "o"))
    assert code == 2 and f"no usable checkpoint in run directory {tmp_path / 'run'}:" in err, err


def test_run_directory_falls_back_past_a_corrupt_newest_checkpoint(tmp_path):
    run = tmp_path / "run"
    make_checkpoint(run / "checkpoint_00000010", step=10)
    corrupt(make_checkpoint(run / "checkpoint_00000020", step=20))
    said = []
    _, source = load_teacher(run, log=said.append)
    assert source["step"] == 10 and source["checkpoint"].endswith("checkpoint_00000010")
    assert any("checkpoint_00000020" in line and "corrupt" in line for line in said)


@pytest.mark.parametrize("flag,value,field", [
    ("--alpha", "2", "alpha (--alpha)"),
    ("--prune-sparsity", "0", "prune_sparsity (--prune-sparsity)"),
    ("--temperature", "-1", "temperature (--temperature)"),
    # The softened logits overflow fp32 (was: accepted, every loss NaN, exit 0)
    ("--temperature", "1e-40", "temperature (--temperature) must be a number in "
                               "[1.08e-19, 100]"),
    ("--latency-repeats", "0", "latency_repeats (--latency-repeats)"),
    # torch's range (was: accepted, then a traceback from the report after every stage)
    ("--seed", str(2 ** 64), "seed (--seed) must be an integer in [-2**63, 2**64)"),
    # The decode latency needs one cached position (was: a traceback after every stage)
    ("--latency-seq", "1", "latency_seq (--latency-seq) must be an integer >= 2"),
    ("--seq-len", "999", "seq_len (--seq-len) must be <= the teacher's context length 16"),
    # Checked before the fine-tunes (was: a traceback after them, from the report)
    ("--eval-tokens", "10", "eval_tokens (--eval-tokens) 10 is shorter than one evaluation "
                            "window of seq_len (--seq-len, else the teacher's context) 16"),
    ("--student-size", "medium", "student_size (--student-size) must be a smaller model than "
                                 "the teacher"),
])
def test_invalid_values_name_the_field_and_write_nothing(tmp_path, capsys, flag, value, field):
    checkpoint = make_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "out"
    code, err = run_job(capsys, "--checkpoint", str(checkpoint), "--out", str(out), flag, value)
    assert code == 2 and field in err, err
    assert not out.exists()


def test_a_student_no_smaller_is_refused_naming_both_counts_as_training_does(tmp_path, capsys):
    # Every weight, the position table too (the banner's and --dry-run's count): the refusal
    # gave GPT.num_params(), FLOPs' count, 4.80M for this medium student against 4.81M.
    from orchestrator.training.memory import parameters_label

    checkpoint = make_checkpoint(tmp_path / "ckpt")
    code, err = run_job(capsys, "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"),
                        "--student-size", "medium")
    teacher = GPT(GPTConfig.from_train_config(TrainConfig(model_size="tiny", seq_len=16)))
    student = GPT(GPTConfig.from_train_config(TrainConfig(model_size="medium", seq_len=16)))
    every_weight = [sum(p.numel() for p in m.parameters()) for m in (teacher, student)]
    assert code == 2
    assert (f"the teacher ({parameters_label(every_weight[0])}), got 'medium' "
            f"({parameters_label(every_weight[1])})") in err
    assert "4.81M parameters" in err


@pytest.mark.parametrize("args,layer", [
    (("--prune-structure", "heads", "--prune-sparsity", "0.5"), "blocks.0.attn"),
    (("--prune-structure", "channels", "--prune-scope", "per_layer", "--prune-sparsity",
      "0.8"), "layer 0 (blocks.0.mlp)"),
])
def test_a_structured_amount_that_empties_a_layer_is_refused_naming_it(tmp_path, capsys, args,
                                                                       layer):
    checkpoint = make_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "out"
    code, err = run_job(capsys, "--checkpoint", str(checkpoint), "--out", str(out), *args)
    assert code == 2 and layer in err and "would remove every" in err, err
    assert not out.exists()
    # The same amount with room in every layer passes the check (and is not refused).
    from orchestrator.compression.structured import check_amount
    from orchestrator.training.model import GPTConfig as Shape
    check_amount(Shape(block_size=16, n_layer=2, n_head=2, n_embd=64), 0.1, args[1],
                 "per_layer")


def test_out_holding_something_else_is_left_alone(tmp_path, capsys):
    checkpoint = make_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, err = run_job(capsys, "--checkpoint", str(checkpoint), "--out", str(out))
    assert code == 2 and "is not empty and holds no compression run" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_resuming_with_other_settings_or_another_teacher_is_refused(tmp_path):
    out = tmp_path / "out"
    source = {"checkpoint": "a", "sha256": "abc"}
    prepare_out(out, CompressConfig(), source)
    prepare_out(out, CompressConfig(latency_repeats=3), source)  # report-only change: fine
    with pytest.raises(ConfigError, match="prune_scope: 'global' -> 'per_layer'"):
        prepare_out(out, CompressConfig(prune_scope="per_layer"), source)
    with pytest.raises(ConfigError, match="another teacher"):
        prepare_out(out, CompressConfig(), {"checkpoint": "b", "sha256": "def"})
    assert sorted(p.name for p in out.iterdir()) == ["compress_config.json"]


def test_a_rerun_after_the_teacher_run_saved_a_newer_checkpoint_says_how_to_resume(
        tmp_path, capsys):
    """--checkpoint RUN picks the newest checkpoint: once the pretrain run has saved another,
    the same command is refused; the refusal names the recorded checkpoint to pass."""
    run = tmp_path / "run"
    make_checkpoint(run / "checkpoint_00000002", step=2)
    _, source = load_teacher(run, log=print)
    out = tmp_path / "out"
    prepare_out(out, CompressConfig(), source)  # the earlier run, its teacher step 2
    before = (out / "compress_config.json").read_bytes()
    make_checkpoint(run / "checkpoint_00000004", step=4, seed=1)
    code, err = run_job(capsys, "--checkpoint", str(run), "--out", str(out))
    assert code == 2, err
    assert f"to resume it, pass --checkpoint {run / 'checkpoint_00000002'}" in err, err
    assert "to compress checkpoint_00000004 instead, use a new --out" in err
    assert (out / "compress_config.json").read_bytes() == before
    # Gone from the run (pruned by keep=N): nothing to resume from there, a new --out.
    import shutil
    shutil.rmtree(run / "checkpoint_00000002")
    code, err = run_job(capsys, "--checkpoint", str(run), "--out", str(out))
    assert code == 2 and "another teacher" in err and "use a new --out" in err, err
    assert "to resume" not in err


def test_a_resume_clears_what_a_killed_run_left_behind(tmp_path):
    """A crash between publishing a stage and deleting its progress checkpoint left a
    multi-GB file for good; a SIGKILL during the report, its scratch folder. Only what no
    unfinished stage needs goes."""
    out = tmp_path / "out"
    source = {"checkpoint": "a", "sha256": "abc"}
    prepare_out(out, CompressConfig(), source)
    (out / "pruned").mkdir()  # finished: its progress is left over
    leftovers = [".prune.partial.step00000004.pt", ".prune.partial.step00000004.pt.sha256",
                 ".prune.partial.pt", ".prune.partial.pt.sha256"]
    kept = [".qat.partial.step00000002.pt", ".qat.partial.step00000002.pt.sha256"]
    for name in leftovers + kept:  # (qat is not finished: its progress is resumed)
        (out / name).write_bytes(b"x")
    (out / ".report-k1ll3d").mkdir()
    (out / ".report-k1ll3d" / "int8.decode.onnx").write_bytes(b"x")
    said = []
    prepare_out(out, CompressConfig(), source, log=said.append)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["compress_config.json", "pruned", *kept])
    assert any(".prune.partial.step00000004.pt" in line and "pruned" in line for line in said)
    assert any(".report-k1ll3d" in line for line in said)


def test_a_second_run_on_a_busy_out_is_refused_naming_the_holder(tmp_path, capsys):
    """Two runs on one --out used the same progress files and temporary folders."""
    import os

    from orchestrator.compression.pipeline import OUT_LOCK, out_held

    checkpoint = make_checkpoint(tmp_path / "ckpt")
    _, source = load_teacher(checkpoint, log=print)
    for resumed in (False, True):
        out = tmp_path / f"out-{resumed}"
        if resumed:
            prepare_out(out, CompressConfig(), source)
        before = sorted(p.name for p in out.iterdir()) if resumed else []
        with out_held(out, print):  # another run, running
            code, err = run_job(capsys, "--checkpoint", str(checkpoint), "--out", str(out))
        assert code == 2, err
        assert (f"--out {out} is in use by another compression run (pid {os.getpid()} on "
                in err), err
        assert sorted(p.name for p in out.iterdir()) == sorted([*before, OUT_LOCK])
    # A run refused while it held --out takes a directory it made away again, lock and all.
    out = tmp_path / "made"
    code, err = run_job(capsys, "--checkpoint", str(checkpoint), "--out", str(out),
                        "--eval-tokens", "10")  # refused once the teacher's data is read
    assert code == 2 and "--eval-tokens" in err and not out.exists()


def test_a_refused_run_takes_its_lock_file_back_from_an_out_that_was_there(tmp_path, capsys):
    """.compress.lock stayed in an existing --out (empty, or a run's to resume) after a run
    refused there: a refused run leaves --out as it was."""
    checkpoint = make_checkpoint(tmp_path / "ckpt")
    _, source = load_teacher(checkpoint, log=print)
    empty, resumed = tmp_path / "empty", tmp_path / "resumed"
    empty.mkdir()
    prepare_out(resumed, CompressConfig(eval_tokens=10), source)
    for out in (empty, resumed):
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        code, err = run_job(capsys, "--checkpoint", str(checkpoint), "--out", str(out),
                            "--eval-tokens", "10")  # refused once the teacher's data is read
        assert code == 2 and "--eval-tokens" in err, err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_run_that_cannot_lock_out_deletes_nothing_as_leftovers(tmp_path, monkeypatch):
    """Where flock is refused the run goes on unguarded: another run may be using --out now,
    and its progress files and the report's .report-* folder were deleted as leftovers."""
    import errno
    import fcntl

    from orchestrator.compression import export, pipeline

    checkpoint = make_checkpoint(tmp_path / "ckpt")
    teacher, source = load_teacher(checkpoint, log=print)
    out = tmp_path / "out"
    prepare_out(out, CompressConfig(), source)
    (out / "pruned").mkdir()
    (out / ".prune.partial.step00000004.pt").write_bytes(b"x")
    (out / ".report-l1ve").mkdir()
    (out / "int8").mkdir()  # (no export check)
    (out / "int8" / export.ONNX_FILE).write_bytes(b"x")
    before = sorted(p.name for p in out.iterdir())

    def no_flock(*args):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_flock)
    monkeypatch.setattr(pipeline, "_run_stages", lambda *args: {})
    said = []
    pipeline.run_pipeline(teacher, source, CompressConfig(), out, log=said.append)
    assert sorted(p.name for p in out.iterdir()) == sorted([*before, pipeline.OUT_LOCK])
    assert any("cannot lock --out" in line and "kept" in line for line in said), said


def test_a_model_that_cannot_be_exported_fails_before_any_fine_tuning(tmp_path, monkeypatch):
    from orchestrator.compression.export import ExportError
    from orchestrator.compression.pipeline import run_pipeline

    def refuse(*args, **kwargs):
        raise RuntimeError("data-dependent control flow\n(pages of detail)")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    lines = []
    teacher = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32))
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="export of the teacher .* RuntimeError: "
                                          "data-dependent control flow$"):
        run_pipeline(teacher, {"sha256": "x"}, CompressConfig(), out, log=lines.append)
    assert not out.exists() and not any("step" in line for line in lines)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process saves
def test_a_sharded_checkpoint_is_a_teacher_named_by_its_meta_checksum(tmp_path):
    """--strategy fsdp's checkpoint: meta.pt (+ sha256) and shards, no state.pt."""
    from orchestrator.training.checkpoint import SHARDED_META_FILE, save_sharded

    config = TrainConfig(model_size="tiny", seq_len=16)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_train_config(config))
    checkpoint = tmp_path / "run" / "checkpoint_00000003"
    save_sharded(checkpoint, {"model": model.state_dict(),
                              "optimizer": {"state": {"step": torch.zeros(1)}}},
                 {"config": config.to_dict(), "step": 3, "world_size": 1}, rank=0)
    teacher, source = load_teacher(tmp_path / "run", log=print)
    assert source["sha256"] == (checkpoint / (SHARDED_META_FILE + ".sha256")).read_text()
    assert source["step"] == 3 and torch.equal(teacher.tok_emb.weight, model.tok_emb.weight)


def test_an_out_that_cannot_be_a_directory_is_refused_before_the_teacher_is_read(tmp_path,
                                                                                  capsys):
    (tmp_path / "file").write_text("mine")
    for out, why in ((tmp_path / "file", "exists and is not a directory"),
                     (tmp_path / "file" / "out", f"cannot be created: {tmp_path / 'file'} is "
                                                 "a file"),
                     # Found after the teacher's ONNX export, as a traceback.
                     (Path("/proc/compress-out"), "cannot be written: ")):
        # No checkpoint there either: --out is named first, before anything is loaded.
        code, err = run_job(capsys, "--checkpoint", str(tmp_path / "nope"), "--out", str(out))
        assert code == 2 and f"--out {out} {why}" in err and "Traceback" not in err, err
    assert (tmp_path / "file").read_text() == "mine"


def test_a_refused_rerun_leaves_compress_config_as_it_was(tmp_path, capsys):
    """Report-only settings are checked with the rest, before compress_config.json is
    rewritten: a failed rerun must not leave it disagreeing with the report."""
    checkpoint = make_checkpoint(tmp_path / "ckpt")
    _, source = load_teacher(checkpoint, log=print)
    out = tmp_path / "out"
    prepare_out(out, CompressConfig(), source)  # an earlier run's settings
    before = (out / "compress_config.json").read_bytes()
    code, err = run_job(capsys, "--checkpoint", str(checkpoint), "--out", str(out),
                        "--latency-seq", "1")
    assert code == 2 and "--latency-seq" in err
    assert (out / "compress_config.json").read_bytes() == before
    # A context too short for the decode latency is refused the same way, naming the flag.
    from orchestrator.compression.pipeline import run_pipeline
    teacher = GPT(GPTConfig(block_size=1, n_layer=1, n_head=2, n_embd=32))
    with pytest.raises(ConfigError, match=r"latency_seq \(--latency-seq\) 64, capped by the "
                                          "model's context length 1, is 1"):
        run_pipeline(teacher, source, CompressConfig(), out, log=print)
    assert (out / "compress_config.json").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["compress_config.json"]


def help_entries(capsys) -> dict[str, str]:
    """--help's options section: each flag -> its help text on one line."""
    with pytest.raises(SystemExit):
        JOB.parse_args(["--help"])
    options = capsys.readouterr().out.split("\noptions:\n", 1)[1]
    entries: dict[str, str] = {}
    for line in options.splitlines():
        if line.startswith("  -"):  # a flag's first line; its help may follow on it
            flag, _, text = line.strip().partition("  ")
            current = flag.split()[0].rstrip(",")
            entries[current] = text.strip()
        elif line.strip():
            entries[current] += " " + line.strip()
    return entries


def test_help_shows_every_settings_default_and_what_the_no_flags_skip(capsys):
    entries = help_entries(capsys)
    settings = {flag: text for flag, text in entries.items()
                if flag not in ("-h", "--checkpoint", "--out")}
    assert len(settings) == len(dataclasses.fields(CompressConfig))
    for flag, text in settings.items():
        assert "(default: " in text, f"{flag} shows no default: {text!r}"
        # A --no-* flag's default is True ("on"): argparse's "(default: True)" reads as skipped.
        assert "(default: True)" not in text and "(default: False)" not in text, flag
    assert settings["--no-onnx-baseline"].endswith("(default: timed)")
    assert settings["--prune-scope"].endswith("(default: global)")


@pytest.mark.parametrize("damage", ["source", "compress", "whole"])
def test_an_out_whose_saved_settings_are_not_mappings_is_named_not_a_traceback(
        tmp_path, capsys, damage):
    # A damaged compress_config.json: a "source" that is not a mapping was an AttributeError
    # traceback; a "compress" that is not one was read as all defaults (no conflicts).
    import json

    run = tmp_path / "run"
    make_checkpoint(run / "checkpoint_00000002", step=2)
    _, source = load_teacher(run, log=print)
    saved = {"source": {"compress": {}, "source": ["not", "a", "mapping"]},
             "compress": {"compress": [], "source": source},
             "whole": ["a", "list"]}[damage]
    out = tmp_path / "out"
    out.mkdir()
    (out / "compress_config.json").write_text(json.dumps(saved))
    code, err = run_job(capsys, "--checkpoint", str(run), "--out", str(out))
    assert code == 2, err
    assert f"cannot read {out / 'compress_config.json'}" in err, err
    assert json.loads((out / "compress_config.json").read_text()) == saved  # kept as it was


@pytest.mark.parametrize("flag", ["--checkpoint", "--out"])
def test_a_home_of_no_user_is_named_by_its_flag_and_nothing_is_written(tmp_path, capsys, flag):
    """`~bob/x` of no user bob reaches us as written (the shell leaves it): Path.expanduser's
    RuntimeError was a traceback."""
    paths = {"--checkpoint": str(make_checkpoint(tmp_path / "ckpt")),
             "--out": str(tmp_path / "out")}
    paths[flag] = "~nosuchuser-s55/x"
    code, err = run_job(capsys, "--checkpoint", paths["--checkpoint"], "--out", paths["--out"])
    assert code == 2
    assert f"{flag} '~nosuchuser-s55/x': ~nosuchuser-s55 is the home directory of no user" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--checkpoint", "--out"])
@pytest.mark.parametrize("value", ["", " "])
def test_an_empty_path_flag_is_refused_not_read_as_the_current_directory(
        tmp_path, capsys, monkeypatch, flag, value):
    """`--out "$OUT"` with OUT unset: Path("") is the current directory, so the compression
    was written into it (an empty one), and `--checkpoint ""` run from a pretrain run's
    folder compressed that run. Refused naming the flag, as jobs/export.py and pretrain do."""
    cwd = tmp_path / "cwd"
    make_checkpoint(cwd / "checkpoint_00000003")  # a run directory as the current one
    monkeypatch.chdir(cwd)
    before = sorted(p.name for p in cwd.iterdir())
    paths = {"--checkpoint": str(cwd), "--out": str(tmp_path / "out")}
    paths[flag] = value
    code, err = run_job(capsys, "--checkpoint", paths["--checkpoint"], "--out", paths["--out"])
    assert code == 2, err
    assert f"{flag} is empty" in err, err
    assert sorted(p.name for p in cwd.iterdir()) == before
    assert not (tmp_path / "out").exists()


@pytest.mark.usefixtures("teacher_exported_once")
def test_running_out_of_memory_is_one_line_naming_the_flags_that_size_it(tmp_path, capsys,
                                                                           monkeypatch):
    """`--batch-size 10000000` on a CPU ended in torch's traceback (`DefaultCPUAllocator:
    can't allocate memory: you tried to allocate 40960000000 bytes`), exit 1, naming no
    flag; a CUDA device's OutOfMemoryError likewise. Now one line and exit 4, saying which
    flags size the memory and that the fine-tune's need a new --out."""
    from orchestrator.compression import pipeline

    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
                           "can't allocate memory: you tried to allocate 40960000000 bytes. "
                           "Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(pipeline, "finetune", no_memory)
    out = tmp_path / "out"
    code, err = run_job(capsys, "--checkpoint", str(make_checkpoint(tmp_path / "ckpt")),
                        "--out", str(out), "--batch-size", "10000000", "--no-onnx-baseline",
                        "--no-int8-static")
    assert code == 4, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "out of memory: DefaultCPUAllocator: can't allocate memory: you tried to allocate" in err
    assert "--batch-size 10000000 x --seq-len 16" in err and "a rerun of this --out" in err, err
    assert (out / "original").is_dir()  # what was saved is kept


@pytest.mark.usefixtures("teacher_exported_once")
def test_an_error_that_is_not_out_of_memory_is_not_reworded(tmp_path, monkeypatch):
    from orchestrator.compression import pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("some other failure")

    monkeypatch.setattr(pipeline, "finetune", broken)
    with pytest.raises(RuntimeError, match="^some other failure$"):
        JOB.main(["--checkpoint", str(make_checkpoint(tmp_path / "ckpt")),
                  "--out", str(tmp_path / "out"), "--no-onnx-baseline", "--no-int8-static"])


@pytest.mark.usefixtures("teacher_exported_once")
def test_a_diverged_fine_tune_fails_in_one_line_keeping_what_was_saved(tmp_path, capsys,
                                                                      monkeypatch):
    """A fine-tune whose loss went NaN published its stage and the run exited 0 (perplexity
    nan). Now exit 4 (a failed run, as a diverged pretrain), one line naming the stage, the
    step and the flags, the stage unpublished and the progress before it kept."""
    from test_compression import nan_from_step

    nan_from_step(monkeypatch, 3)
    out = tmp_path / "out"
    code, err = run_job(capsys, "--checkpoint", str(make_checkpoint(tmp_path / "ckpt")),
                        "--out", str(out), "--prune-steps", "6", "--batch-size", "2",
                        "--log-every", "4", "--checkpoint-every", "2", "--no-onnx-baseline",
                        "--no-int8-static")
    assert code == 4, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "prune diverged at step 4: the loss over steps 3-4 was nan" in err, err
    assert (out / "original").is_dir() and not (out / "pruned").exists()
    assert (out / ".prune.partial.step00000002.pt").is_file()


def test_a_diverged_teacher_is_refused_before_anything_is_written(tmp_path, capsys):
    """A checkpoint whose weights hold NaN (an older run's, or one saved by hand) was taken
    as the teacher: the export check passed, original/ was written and every stage's loss was
    NaN. Now refused up front (exit 2) by serving's load probe, as jobs/export.py refuses
    one, naming the checkpoint. The NaN is in position 10's embedding, which the one-token
    forward probe (position 0) does not read: the weights themselves are checked."""
    config = TrainConfig(model_size="tiny", seq_len=16)
    model = GPT(GPTConfig.from_train_config(config))
    with torch.no_grad():
        model.pos_emb.weight[10] = float("nan")
    checkpoint = tmp_path / "ckpt"
    save_checkpoint(checkpoint, {"model": model.state_dict(), "config": config.to_dict(),
                                 "step": 3})
    out = tmp_path / "out"
    code, err = run_job(capsys, "--checkpoint", str(checkpoint), "--out", str(out))
    assert code == 2, err
    assert f"model {checkpoint} has non-finite weights (64 of 1024 values of pos_emb.weight " \
           "are NaN or infinite) (its weights diverged)" in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def qat_nan_above_lr(monkeypatch, lr: float, first_bad: int = 3) -> None:
    """QAT's loss NaN from its `first_bad`-th step on where --lr is above `lr` (a QAT that a
    high learning rate makes diverge; the tiny model does not on its own)."""
    from orchestrator.compression import finetune as finetune_module
    from orchestrator.compression import pipeline
    from orchestrator.compression.distill import DistillLoss

    real_finetune, real_loss = pipeline.finetune, finetune_module.distillation_loss

    def finetune(student, teacher, tokens, plan, *args, **kwargs):
        calls = []

        def loss(*a, **k):
            calls.append(1)
            part = real_loss(*a, **k)
            return part if len(calls) < first_bad else DistillLoss(*(p * float("nan")
                                                                     for p in part))
        if plan.stage == "qat" and plan.lr > lr:
            monkeypatch.setattr(finetune_module, "distillation_loss", loss)
        try:
            return real_finetune(student, teacher, tokens, plan, *args, **kwargs)
        finally:
            monkeypatch.setattr(finetune_module, "distillation_loss", real_loss)

    monkeypatch.setattr(pipeline, "finetune", finetune)


@pytest.mark.usefixtures("teacher_exported_once")
def test_a_rerun_with_another_lr_keeps_the_finished_stages_and_restarts_the_diverged_one(
        tmp_path, capsys, monkeypatch):
    """QAT diverged (--lr too high) after pruning had finished; the message said fine-tune
    settings cannot change on a rerun, and a rerun with a lower --lr was refused (`made with
    other settings: lr: 0.05 -> 0.001`): the user had to start again with a new --out, losing
    the pruned stage. Now the rerun keeps pruned/ as it was made, says so in one line, and
    runs QAT from step 0 with the new lr (not from its progress checkpoint, made with the old
    one). Settings that change a finished stage still refuse, as does one every fine-tune of
    which is finished."""
    import json

    qat_nan_above_lr(monkeypatch, 0.01)
    checkpoint = make_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "out"
    command = ["--checkpoint", str(checkpoint), "--out", str(out), "--prune-steps", "2",
               "--qat-steps", "6", "--batch-size", "2", "--log-every", "4",
               "--checkpoint-every", "2", "--no-onnx-baseline", "--no-int8-static",
               "--latency-repeats", "1", "--latency-batched", "1", "--eval-tokens", "64"]
    code, err = run_job(capsys, *command, "--lr", "0.05")
    assert code == 4 and "qat diverged at step 4" in err, err
    assert "rerun with other values: the stages already finished are kept and qat starts " \
           "over from step 0" in err, err
    pruned = (out / "pruned" / "weights.pt").read_bytes()
    assert (out / ".qat.partial.step00000002.pt").is_file()
    # A setting of the finished pruning stage: refused as before, nothing touched.
    code, err = run_job(capsys, *command, "--lr", "0.001", "--prune-sparsity", "0.5")
    assert code == 2 and "prune_sparsity: 0.3 -> 0.5" in err, err
    assert (out / ".qat.partial.step00000002.pt").is_file()

    # A stage finished by a version that did not record its settings gets them now.
    stage_json = out / "pruned" / "stage.json"
    stage_json.write_text(json.dumps({k: v for k, v in json.loads(stage_json.read_text()).items()
                                      if k != "settings"}))
    code = JOB.main([*command, "--lr", "0.001"])
    said = capsys.readouterr()
    assert code == 0, said.err
    lines = [line for line in said.out.splitlines() if "lr: 0.05 -> 0.001" in line]
    assert len(lines) == 1, said.out
    assert "pruned/ kept as made" in lines[0] and "qat starts over from step 0" in lines[0] \
        and ".qat.partial.step00000002.pt" in lines[0], lines[0]
    assert "qat: resumed" not in said.out, said.out
    assert (out / "pruned" / "weights.pt").read_bytes() == pruned
    made_with = {stage: json.loads((out / stage / "stage.json").read_text())["settings"]
                 for stage in ("pruned", "qat")}
    assert made_with["pruned"]["lr"] == 0.05 and made_with["qat"]["lr"] == 0.001, made_with
    report = json.loads((out / "report.json").read_text())
    assert report["stages"]["prune"]["settings"]["lr"] == 0.05
    assert report["config"]["lr"] == 0.001
    # Every fine-tune finished: another lr would change none of them, refused.
    code, err = run_job(capsys, *command, "--lr", "0.002")
    assert code == 2 and "lr: 0.001 -> 0.002" in err and "new --out" in err, err


@pytest.mark.usefixtures("teacher_exported_once")
def test_after_running_out_of_memory_a_rerun_may_lower_the_batch_keeping_finished_stages(
        tmp_path, capsys, monkeypatch):
    """QAT ran out of memory after pruning had finished; the message said lowering
    --batch-size x --seq-len needs a new --out (the rerun was refused: `batch_size: 4 -> 2`),
    losing the pruned stage. Now the rerun keeps pruned/ and runs QAT with the smaller batch;
    `--seq-len` given as the teacher's context is no change and restarts nothing."""
    import json

    from orchestrator.compression import pipeline

    real_finetune = pipeline.finetune

    def finetune(student, teacher, tokens, plan, *args, **kwargs):
        if plan.stage == "qat" and plan.batch_size > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_finetune(student, teacher, tokens, plan, *args, **kwargs)

    monkeypatch.setattr(pipeline, "finetune", finetune)
    out = tmp_path / "out"
    command = ["--checkpoint", str(make_checkpoint(tmp_path / "ckpt")), "--out", str(out),
               "--prune-steps", "2", "--qat-steps", "2", "--no-onnx-baseline",
               "--no-int8-static", "--latency-repeats", "1", "--latency-batched", "1",
               "--eval-tokens", "64"]
    code, err = run_job(capsys, *command, "--batch-size", "4")
    assert code == 4 and "out of memory" in err, err
    assert "lower them on a rerun of this --out" in err and "a new --out" not in err, err
    pruned = (out / "pruned" / "weights.pt").read_bytes()
    code = JOB.main([*command, "--batch-size", "2", "--seq-len", "16"])
    said = capsys.readouterr()
    assert code == 0, said.err
    assert "fine-tune settings changed (batch_size: 4 -> 2): pruned/ kept" in said.out, said.out
    assert "seq_len" not in said.out
    assert (out / "pruned" / "weights.pt").read_bytes() == pruned
    stages = json.loads((out / "report.json").read_text())["stages"]
    assert stages["prune"]["settings"]["batch_size"] == 4
    assert stages["qat"]["settings"]["batch_size"] == 2


@pytest.mark.usefixtures("teacher_exported_once")
def test_out_of_memory_in_the_report_names_only_what_a_rerun_of_this_out_may_change(
        tmp_path, capsys, monkeypatch):
    """The report ran out of memory after qat/ had finished; the line said lower --batch-size
    x --seq-len on a rerun of this --out, and that rerun was refused (`its fine-tunes are
    all finished`). Now it names the report's flags for a rerun of this --out, and a new
    --out for the fine-tunes'; a rerun with a smaller --eval-batch-size finishes."""
    from orchestrator.compression import pipeline

    real_report = pipeline.build_report

    def build_report(*args, config, **kwargs):
        if config.eval_batch_size > 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_report(*args, config=config, **kwargs)

    monkeypatch.setattr(pipeline, "build_report", build_report)
    out = tmp_path / "out"
    command = ["--checkpoint", str(make_checkpoint(tmp_path / "ckpt")), "--out", str(out),
               "--prune-steps", "2", "--qat-steps", "2", "--no-onnx-baseline",
               "--no-int8-static", "--latency-repeats", "1", "--latency-batched", "1",
               "--eval-tokens", "64", "--batch-size", "4"]
    code, err = run_job(capsys, *command, "--eval-batch-size", "2")
    assert code == 4 and len(err.strip().splitlines()) == 1, err
    assert "--eval-batch-size 2 windows and --latency-batched 1 rows at a time (lower them " \
        "on a rerun of this --out)" in err, err
    assert "--batch-size 4 x --seq-len 16 tokens a step" in err, err
    assert "are all finished: to change them, use a new --out" in err, err
    assert "lower them on a rerun of this --out: the stages" not in err, err
    # what the line says holds: the fine-tunes' flags are refused on this --out ...
    code, err = run_job(capsys, *command[:-1], "2", "--eval-batch-size", "2")
    assert code == 2 and "its fine-tunes are all finished" in err, err
    # ... and the report's may change
    code = JOB.main([*command, "--eval-batch-size", "1"])
    assert code == 0, capsys.readouterr().err


@pytest.mark.usefixtures("teacher_exported_once")
def test_a_restarted_fine_tune_that_fails_keeps_the_new_settings_with_its_progress(
        tmp_path, capsys, monkeypatch):
    """A rerun with another --lr deleted QAT's progress made with the old one, saved its own
    under the same name (.qat.partial.step00000002.pt) and then diverged: the failed run's
    put-back (out_held) wrote the old compress_config.json back, as if nothing had changed.
    The next rerun with the same (new) --lr then called it a change and deleted the progress
    made with it; one with the old --lr resumed from progress made with the new."""
    import json

    qat_nan_above_lr(monkeypatch, 0.01)
    out = tmp_path / "out"
    command = ["--checkpoint", str(make_checkpoint(tmp_path / "ckpt")), "--out", str(out),
               "--prune-steps", "2", "--qat-steps", "6", "--batch-size", "2",
               "--log-every", "4", "--checkpoint-every", "2", "--no-onnx-baseline",
               "--no-int8-static", "--latency-repeats", "1", "--latency-batched", "1",
               "--eval-tokens", "64"]
    code, err = run_job(capsys, *command, "--lr", "0.05")
    assert code == 4 and "qat diverged at step 4" in err, err
    code, err = run_job(capsys, *command, "--lr", "0.02")
    assert code == 4 and "qat diverged at step 4" in err, err
    assert (out / ".qat.partial.step00000002.pt").is_file()
    saved = json.loads((out / "compress_config.json").read_text())["compress"]
    assert saved["lr"] == 0.02, saved["lr"]
    # the same values resume from the progress saved, as the divergence line says
    code = JOB.main([*command, "--lr", "0.02"])
    said = capsys.readouterr()
    assert code == 4 and "qat: resumed at step 2/6" in said.out, said.out
    assert "fine-tune settings changed" not in said.out, said.out


def test_an_unlocked_rerun_changing_settings_deletes_no_progress(tmp_path):
    """Where flock is refused (another run may be using --out unseen), a rerun changing --lr
    deleted the unfinished QAT's progress checkpoints anyway (restart_stages), another run's
    included, though nothing else is removed there. Now refused, naming the files to delete
    by hand once no run uses --out; --out is left as it was. With no progress to delete the
    change goes through."""
    import json

    checkpoint = make_checkpoint(tmp_path / "ckpt")
    _, source = load_teacher(checkpoint, log=print)
    out = tmp_path / "out"
    prepare_out(out, CompressConfig(lr=0.05), source)
    (out / "pruned").mkdir()
    for name in (".qat.partial.step00000002.pt", ".qat.partial.step00000002.pt.sha256"):
        (out / name).write_bytes(b"x")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match="cannot be locked.*lr: 0.05 -> 0.001.*delete "
                                          r"\.qat\.partial\.step00000002\.pt"):
        prepare_out(out, CompressConfig(lr=0.001), source, guarded=False)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    for name in before:
        if name.startswith(".qat"):
            (out / name).unlink()
    prepare_out(out, CompressConfig(lr=0.001), source, guarded=False)
    assert json.loads((out / "compress_config.json").read_text())["compress"]["lr"] == 0.001
