"""Bad input to jobs/pretrain.py: one clear line naming the problem, non-zero exit, no traceback.
Each case fails before Ray starts, so these stay in the unit tier (run as real subprocesses)."""
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.config import RESUMABLE_CHANGES, TrainConfig
from orchestrator.training.checkpoint import save_checkpoint

PRETRAIN = Path(__file__).resolve().parents[2] / "jobs" / "pretrain.py"
# This checkout's orchestrator package, not the one installed: a worktree's jobs/pretrain.py
# ran against another checkout's.
CHECKOUT = {"PYTHONPATH": str(PRETRAIN.parents[1])}


def run_pretrain(*args, tmp_path, **extra_env):
    env = {"ORCHESTRATOR_RUNS_DIR": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
           **CHECKOUT, **extra_env}
    return subprocess.run([sys.executable, str(PRETRAIN), *args], capture_output=True,
                          text=True, timeout=120, env=env)


def unused_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("args, expected", [
    (["--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
    (["--model-size", "huge"], "argument --model-size: invalid choice: 'huge'"),
    (["--num-workers", "0"],
     "num_workers (--num-workers) must be an integer in [1, 100000], got 0"),
    (["--max-steps", "-5"], "max_steps (--max-steps) must be an integer >= 1, got -5"),
    (["--resume"], "--resume: no pretrain-* run with checkpoints under"),
    (["--resume", "--run-dir", "/nonexistent/run"], "no checkpoint in run dir /nonexistent/run"),
    (["--max-failures", "-1"], "--max-failures must be >= 0, got -1"),
    (["--accumulation", "lower=0"],
     "accumulation (--accumulation): the factor of 'lower' must be an integer"),
    (["--max-steps", "5", "--accumulation", "embeddings=8"],
     "accumulation (--accumulation) 'embeddings=8': embeddings (factor 8) would never take an "
     "optimizer step in max_steps (--max-steps) 5 micro-batches"),
    (["--attention-span", "--span-ramp", "0"],
     "span_ramp (--span-ramp) must be an integer >= 1, got 0"),
    (["--strategy", "fsdp", "--num-workers", "0", "--gpus-per-worker", "1"],  # not a
     "num_workers (--num-workers) must be an integer in [1, 100000], got 0"),  # ZeroDivisionError
    (["--num-workers", "2", "--gpus-per-worker", "4"],
     "--gpus-per-worker 4: pretraining runs one GPU per worker (DDP and FSDP alike), so the "
     "other 3 would sit idle. Use --num-workers 8 --gpus-per-worker 1"),
    # (the command suggested was --num-workers 0, itself refused)
    (["--num-workers", "0", "--gpus-per-worker", "2", "--strategy", "fsdp"],
     "Use --num-workers 2 --gpus-per-worker 1"),
])
def test_bad_input_gets_one_clear_message(args, expected, tmp_path):
    result = run_pretrain(*args, tmp_path=tmp_path)
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_a_bad_lr_is_named_without_the_floor_derived_from_it(tmp_path):
    # "lr must be ..., got -1.0; min_lr must be ..., got -0.09999999999999999": a field
    # nobody gave, with float noise
    for lr in ("-1", "150", "nan"):
        result = run_pretrain("--lr", lr, tmp_path=tmp_path)
        assert result.returncode == 2 and "lr (--lr) must be a number in [0, 10), got" in \
            result.stderr
        assert "min_lr" not in result.stderr, lr


def test_every_bad_flag_is_named_at_once(tmp_path):
    # The JobSpec's and the launcher's flags too, not only the first TrainConfig error.
    result = run_pretrain("--num-workers", "0", "--max-steps", "-5", "--ingest-workers", "-3",
                          tmp_path=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    for words in ("max_steps (--max-steps) must be an integer >= 1, got -5",
                  "num_workers (--num-workers) must be an integer in [1, 100000], got 0",
                  "--ingest-workers must be >= 0"):
        assert words in result.stderr


def pretrain_help() -> str:
    """`jobs/pretrain.py --help`, its whitespace runs as single spaces."""
    result = subprocess.run([sys.executable, str(PRETRAIN), "--help"], capture_output=True,
                            text=True, timeout=60, env={**os.environ, **CHECKOUT})
    return " ".join(result.stdout.split())


def test_help_says_each_default_once():
    help_text = pretrain_help()
    assert "(default: None)" not in help_text and "(default: [])" not in help_text
    assert "--max-steps MAX_STEPS optimizer steps" in help_text and "(default: 200)" in help_text
    assert "lower priority, which checkpoint, wait and resume (default: 0)" in help_text


def test_compile_help_says_the_flag_forces_it_on_cpu():
    # --help said "never on CPU", while --compile compiles there too (docs/training.md).
    assert TrainConfig(compile=True).compiles_on("cpu")
    assert not TrainConfig().compiles_on("cpu")
    assert "--attention-span, off on CPU unless --compile;" in pretrain_help()


def test_unreachable_address_fails_fast_and_clearly_leaving_no_run_directory(tmp_path):
    port = unused_port()
    result = run_pretrain("--address", f"127.0.0.1:{port}", tmp_path=tmp_path)
    assert result.returncode == 2
    assert f"cannot reach a Ray cluster at 127.0.0.1:{port} (--address)" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("pretrain-*"))  # the run's config.json was written first


def test_dashboard_url_in_ray_address_is_explained(tmp_path):
    result = run_pretrain(tmp_path=tmp_path, RAY_ADDRESS="http://127.0.0.1:8265")
    assert result.returncode == 2
    assert "RAY_ADDRESS 'http://127.0.0.1:8265' is a dashboard URL" in result.stderr
    assert "Unset it to use an embedded Ray" in result.stderr  # a job would start one
    assert "Traceback" not in result.stderr


def fake_finished_run(run_dir, steps, **train):
    (run_dir / "checkpoint_2026-01-01_00-00-00.000000").mkdir(parents=True)
    config = {**TrainConfig().to_dict(), **train}
    (run_dir / "config.json").write_text(json.dumps({"train": config}))
    (run_dir / "summary.json").write_text(json.dumps({"steps": steps}))
    return run_dir


def test_resume_with_other_settings_is_refused_before_anything_starts(tmp_path):
    run_dir = fake_finished_run(tmp_path / "run", steps=50, seq_len=64, batch_size=4)
    result = run_pretrain("--resume", "--run-dir", str(run_dir), "--max-steps", "100",
                          "--seq-len", "128", tmp_path=tmp_path)
    assert result.returncode == 2
    assert "was trained with other settings: seq_len: 64 -> 128" in result.stderr
    assert "going on with the run's own" not in result.stdout  # (it said so, then refused)


def test_resume_alone_goes_on_with_the_runs_own_settings(tmp_path):
    """`pretrain.py --resume` after a run started with --model-size tiny --seq-len 64 ...:
    the flags left out were the defaults, and the resume was refused as another run."""
    run_dir = fake_finished_run(tmp_path / "run", steps=0, model_size="tiny", seq_len=64,
                                batch_size=4, lr=1e-3, min_lr=2e-5, max_steps=600)
    config = json.loads((run_dir / "config.json").read_text())
    config["job"] = {"num_workers": 3, "cpus_per_worker": 0.5, "priority": 4}
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "summary.json").write_text(json.dumps({"steps": 600}))
    result = run_pretrain("--resume", "--run-dir", str(run_dir), tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "nothing to do" in result.stdout and "already at step 600" in result.stdout
    said = next(line for line in result.stdout.splitlines() if line.startswith("--resume:"))
    for setting in ("model_size tiny", "seq_len 64", "batch_size 4", "lr 0.001",
                    "min_lr 2e-05", "max_steps 600", "num_workers 3", "cpus_per_worker 0.5",
                    "priority 4"):
        assert setting in said, said


def test_flags_given_on_resume_override_the_runs_settings_they_may_change(tmp_path):
    from jobs import pretrain

    run_dir = fake_finished_run(tmp_path / "run", steps=0, model_size="tiny", max_steps=600,
                                log_every=7)
    args = pretrain.parse_args(["--resume", "--max-steps", "900", "--run-dir", str(run_dir)])
    pretrain.inherit_run_settings(args, run_dir)
    assert (args.model_size, args.max_steps, args.log_every) == ("tiny", 900, 7)


def test_resuming_a_finished_run_does_nothing_and_keeps_its_summary(tmp_path):
    run_dir = fake_finished_run(tmp_path / "run", steps=200)
    before = (run_dir / "summary.json").read_text()
    result = run_pretrain("--resume", "--run-dir", str(run_dir), tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "nothing to do" in result.stdout and "already at step 200" in result.stdout
    assert (run_dir / "summary.json").read_text() == before


def test_resuming_below_the_last_checkpoint_does_nothing(tmp_path):
    # Stopped at step 600 of 1000 (no summary yet), resumed with --max-steps 500: the workers
    # started, found nothing to train, and a summary of the checkpoint's report was written
    # (then a traceback on its missing held-out loss).
    run_dir = fake_finished_run(tmp_path / "run", steps=0, max_steps=1000)
    (run_dir / "summary.json").unlink()
    (run_dir / "metrics.jsonl").write_text("".join(
        json.dumps({"step": step, "time": 0, "checkpoint": f"{run_dir}/ckpt_{step}"}) + "\n"
        for step in (300, 600, 900)))
    for step in (300, 600):  # 900's was deleted (rolled back): it does not count
        save_checkpoint(run_dir / f"ckpt_{step}", {"step": step})  # (600's is verified)
    result = run_pretrain("--resume", "--run-dir", str(run_dir), "--max-steps", "500",
                          tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "nothing to do" in result.stdout and "already at step 600" in result.stdout
    assert not (run_dir / "summary.json").exists()


def test_a_checkpoint_past_the_end_found_by_the_workers_writes_no_summary(tmp_path, capsys):
    # Ray Train's Result.metrics are the checkpoint's report (step 10); the workers' return
    # value says they trained nothing.
    from types import SimpleNamespace

    from jobs.pretrain import _write_summary

    result = SimpleNamespace(metrics={"step": 10, "loss": 3.0}, checkpoint=None,
                             return_value={"already_complete": True, "step": 10})
    placement = SimpleNamespace(worker_nodes=("n",), bottleneck_gbps=float("inf"))
    assert _write_summary(result, TrainConfig(max_steps=5), placement, tmp_path, 1.0, []) is None
    assert "already at step 10" in capsys.readouterr().out
    assert not (tmp_path / "summary.json").exists()


def test_a_diverged_run_fails_with_exit_4_and_one_line_naming_its_checkpoints(tmp_path):
    # The workers return why (train_session.DIVERGED); Result.metrics are the last good
    # checkpoint's report. The error is one line, as every other `error:` is.
    from types import SimpleNamespace

    from jobs.pretrain import _write_summary
    from orchestrator.job_exit import EXIT_FAILED, JobFailed
    from ray_layer.train_session import DIVERGED

    why = "training diverged at step 20: the loss over steps 11-20 was nan; stopped ..."
    result = SimpleNamespace(metrics={"step": 10, "loss": 3.0}, checkpoint=None,
                             return_value={DIVERGED: why})
    placement = SimpleNamespace(worker_nodes=("n",), bottleneck_gbps=float("inf"))
    with pytest.raises(JobFailed) as e:
        _write_summary(result, TrainConfig(max_steps=40), placement, tmp_path, 1.0, [])
    assert e.value.exit_code == EXIT_FAILED
    assert str(e.value).startswith(why) and str(tmp_path) in str(e.value)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "summary.json").exists()


def test_a_summary_missing_figures_is_still_printed(tmp_path, capsys):
    from types import SimpleNamespace

    from jobs.pretrain import _write_summary

    result = SimpleNamespace(metrics={"step": 5}, checkpoint=None, return_value=None)
    placement = SimpleNamespace(worker_nodes=("n",), bottleneck_gbps=float("inf"))
    summary = _write_summary(result, TrainConfig(max_steps=5), placement, tmp_path, 1.0, [])
    assert summary["held_out_loss"] is None and (tmp_path / "summary.json").exists()
    assert "loss - -> - (held-out -), - tokens/s" in capsys.readouterr().out


def test_a_resumed_runs_summary_says_which_steps_its_figures_cover(tmp_path, capsys):
    # "trained 30 steps ... loss 3.113 -> 2.906" for a leg of 10 steps from step 20, whose
    # first loss is step 20's
    from types import SimpleNamespace

    from jobs.pretrain import _write_summary

    result = SimpleNamespace(metrics={"step": 30, "start_step": 20, "first_loss": 3.1,
                                      "loss": 2.9}, checkpoint=None, return_value=None)
    placement = SimpleNamespace(worker_nodes=("n",), bottleneck_gbps=float("inf"))
    _write_summary(result, TrainConfig(max_steps=30), placement, tmp_path, 1.0, [])
    assert "trained steps 20 -> 30 (resumed) in" in capsys.readouterr().out


SAVED_TRAIN = TrainConfig().to_dict()  # a train section as pretrain.py writes it


@pytest.mark.parametrize("train, job, said", [
    (None, {}, "is not a run's config (its train and job sections must be mappings)"),
    ({}, "x", "is not a run's config (its train and job sections must be mappings)"),
    ({**SAVED_TRAIN, "lr": "fast"}, {}, "train.lr is 'fast', which no --lr could have given"),
    (SAVED_TRAIN, {"accelerator_types": "A100"}, "job.accelerator_types is 'A100', which no "
                                                 "--accelerator-type could have given"),
    # Without model_size the resume went on as the default 'small' (the flag's default), and
    # its workers refused the 'tiny' checkpoint after placement, config.json never named.
    ({k: v for k, v in SAVED_TRAIN.items() if k != "model_size"}, {},
     "config.json: its training config lacks 'model_size', which every config this project "
     "saves records: the file is damaged or not this project's"),
])
def test_resume_names_a_config_json_it_cannot_inherit_from(tmp_path, train, job, said):
    from jobs import pretrain
    from orchestrator.config import ConfigError

    run_dir = tmp_path / "run"
    (run_dir / "checkpoint_1").mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"train": train, "job": job}))
    args = pretrain.parse_args(["--resume", "--run-dir", str(run_dir)])
    with pytest.raises(ConfigError, match=re.escape(said)):
        pretrain.inherit_run_settings(args, run_dir)


@pytest.mark.parametrize("config", [{"train": [1], "job": {}}, [1]])
def test_resume_names_a_config_json_it_cannot_read_before_the_data_flags(tmp_path, capsys,
                                                                         config):
    # The data flags read config.json's train section first: a list there was an
    # AttributeError traceback, not the line inherit_run_settings has for it.
    from jobs import pretrain

    run_dir = tmp_path / "run"
    (run_dir / "checkpoint_1").mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(config))
    assert pretrain.main(["--resume", "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert f"--resume: {run_dir / 'config.json'} is not a run's config (its train and job " \
        "sections must be mappings)" in err and "Traceback" not in err


def test_ctrl_c_names_the_run_dir_to_resume(tmp_path, monkeypatch, capsys):
    # `--resume` alone continues the latest run under the runs root: not this one when its
    # --run-dir is elsewhere.
    from jobs import pretrain

    monkeypatch.setenv("ORCHESTRATOR_RUNS_DIR", str(tmp_path / "runs"))

    def interrupted(args):
        args.resolved_run_dir = tmp_path / "my run"
        raise KeyboardInterrupt
    monkeypatch.setattr(pretrain, "run", interrupted)
    # Before its first checkpoint (waiting in the queue, say) there is nothing to resume:
    # the hint's --resume was refused, "no checkpoint in run dir".
    assert pretrain.main(["--run-dir", str(tmp_path / "my run")]) == 130
    assert "before the run's first checkpoint: nothing to resume; run the same command " \
        "again" in capsys.readouterr().err
    (tmp_path / "my run" / "checkpoint_2026-12-05_18-51-01").mkdir(parents=True)
    assert pretrain.main(["--run-dir", str(tmp_path / "my run")]) == 130
    assert f"resume with --resume --run-dir '{tmp_path / 'my run'}'" in capsys.readouterr().err


def hf_export_folder(folder):
    """What jobs/export.py writes (the files that matter here)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "exported_by": "hetero-orchestrator jobs/export.py"}))
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "tokenizer.json").write_text('{"model": "theirs"}')
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.fixture
def launch_refuses(monkeypatch):
    """ray_layer.launch.launch replaced by one that refuses as not placeable: a run that got
    past its checks ends there, never starting Ray."""
    import types

    from orchestrator.job_exit import EXIT_NOT_PLACEABLE, JobFailed

    def launch(*args, **kwargs):
        raise JobFailed("stub: not placeable now", EXIT_NOT_PLACEABLE)
    monkeypatch.setitem(sys.modules, "ray_layer.launch",
                        types.SimpleNamespace(launch=launch, dry_run_placement=launch))


def test_a_run_dir_holding_a_hugging_face_model_is_refused_and_left_as_it_was(
        tmp_path, capsys, launch_refuses):
    # --run-dir at an export (meant --init-from): its config.json and tokenizer.json were
    # replaced by the run's, even when the run was then refused, and a .run.lock left there.
    from jobs import pretrain

    model = tmp_path / "my-model"
    before = hf_export_folder(model)
    code = pretrain.main(["--run-dir", str(model), "--address", "127.0.0.1:1",
                          "--max-steps", "5"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    assert f"--run-dir {model} is not a run directory" in err
    assert "config.json without a run's train and job sections (exported_by " \
        "'hetero-orchestrator jobs/export.py', model_type 'gpt2')" in err
    assert "model.safetensors" in err and "--init-from" in err


def test_a_run_dir_holding_a_compression_is_refused(tmp_path, capsys, launch_refuses):
    from jobs import pretrain

    out = tmp_path / "compressed"
    out.mkdir()
    (out / "compress_config.json").write_text("{}")
    assert pretrain.main(["--run-dir", str(out), "--address", "127.0.0.1:1"]) == 2
    assert "compress_config.json" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["compress_config.json"]


def test_a_refused_run_in_an_existing_empty_folder_leaves_it_empty(tmp_path, capsys,
                                                                    launch_refuses):
    # Refused after its checks (not placeable): its config.json and .run.lock stayed behind.
    from jobs import pretrain

    folder = tmp_path / "mine"
    folder.mkdir()
    assert pretrain.main(["--run-dir", str(folder), "--address", "127.0.0.1:1"]) == 3
    assert "stub: not placeable now" in capsys.readouterr().err
    assert list(folder.iterdir()) == []


def test_a_warmup_longer_than_the_run_is_said_naming_both_flags_not_refused(tmp_path, capsys):
    # The learning rate rose the whole run and never reached --lr, and nothing said so; then
    # it was refused, though a first leg to be extended by `--resume --max-steps N` is
    # legitimate (the cosine's legs resume during the warmup: loop.cosine_legs).
    from jobs import pretrain

    args = pretrain.parse_args(["--warmup-steps", "50", "--max-steps", "10"])
    train, _ = pretrain.build_configs(args, tmp_path / "run")
    assert (train.warmup_steps, train.max_steps) == (50, 10)
    assert capsys.readouterr().err == (
        "warning: --warmup-steps 50 is more than --max-steps 10: the learning rate rises over "
        "the whole run and ends at 10/50 of --lr (pass --warmup-steps <= --max-steps to reach "
        "it, or extend the run later with --resume --max-steps >= 50)\n")


def test_the_default_warmup_past_a_short_runs_end_is_said_not_refused(tmp_path, capsys):
    # `--max-steps 4` smoke runs (and the tests') keep working; the quickstart's
    # `--max-steps 20` reaches --lr at its last step: nothing to say.
    from jobs import pretrain

    train, _ = pretrain.build_configs(pretrain.parse_args(["--max-steps", "4"]), tmp_path / "a")
    assert train.warmup_steps == 20
    assert "warning: --warmup-steps 20 (its default) is more than --max-steps 4" in \
        capsys.readouterr().err
    for argv in (["--max-steps", "20"], []):
        pretrain.build_configs(pretrain.parse_args(argv), tmp_path / "b")
        assert "warmup" not in capsys.readouterr().err


def test_a_resume_past_the_warmup_rule_is_not_refused(tmp_path, capsys):
    # The run's own warmup: refusing its resume would strand it.
    from jobs import pretrain

    run_dir = fake_finished_run(tmp_path / "run", steps=5, warmup_steps=50, max_steps=5)
    args = pretrain.parse_args(["--resume", "--run-dir", str(run_dir), "--max-steps", "10"])
    train, _ = pretrain.build_configs(args, run_dir)
    assert (train.warmup_steps, train.max_steps) == (50, 10)
    assert "warmup" not in capsys.readouterr().err


def test_a_run_ending_mid_accumulation_is_said_in_one_line_naming_the_flags(tmp_path, capsys):
    # The last 2 micro-batches' gradients were dropped from the run without a word (they stay
    # in the final checkpoint); said, not refused: a first leg to extend is legitimate.
    from jobs import pretrain

    args = pretrain.parse_args(["--max-steps", "10", "--accumulation", "4",
                                "--warmup-steps", "2"])
    train, _ = pretrain.build_configs(args, tmp_path / "run")
    assert train.max_steps == 10
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "warning: max_steps (--max-steps) 10 ends mid-accumulation (accumulation "
        "(--accumulation) '4'): the gradients of the last 2 micro-batches (embeddings, lower, "
        "upper, head) are never applied in this run")
    args = pretrain.parse_args(["--max-steps", "12", "--accumulation", "4",
                                "--warmup-steps", "2"])
    pretrain.build_configs(args, tmp_path / "run")
    assert capsys.readouterr().err == ""


def test_a_finished_run_resumed_with_nothing_to_do_gets_no_accumulation_warning(tmp_path,
                                                                                capsys):
    # A 10-step run at --accumulation 4, finished: its resume printed "the gradients of the
    # last 2 micro-batches ... are never applied in this run", suggested --max-steps 8
    # (below its step), then said "nothing to do".
    from jobs import pretrain

    run_dir = fake_finished_run(tmp_path / "run", steps=10, max_steps=10, accumulation="4",
                                warmup_steps=2)
    args = pretrain.parse_args(["--resume", "--run-dir", str(run_dir)])
    assert pretrain.run(args) is None
    out, err = capsys.readouterr()
    assert "already at step 10" in out
    assert err == ""
    # Resumed to 14: the suggested ends lie past the run's step 10.
    args = pretrain.parse_args(["--resume", "--run-dir", str(run_dir), "--max-steps", "14"])
    pretrain.build_configs(args, run_dir)
    assert capsys.readouterr().err.endswith(
        "; max_steps 12 or 16 ends on a step of every group\n")
    args = pretrain.parse_args(["--resume", "--run-dir", str(run_dir), "--max-steps", "11"])
    pretrain.build_configs(args, run_dir)
    assert capsys.readouterr().err.endswith("; max_steps 12 ends on a step of every group\n")


def test_a_finished_run_whose_factor_exceeds_max_steps_resumes_to_nothing_to_do(tmp_path):
    # Saved before a factor above max_steps was refused, and finished: its resume exited 2
    # on a rule about training, where nothing is left to train. Resumed to train more (and
    # still below the factor) it is refused.
    run_dir = fake_finished_run(tmp_path / "run", steps=5, max_steps=5,
                                accumulation="embeddings=8")
    result = run_pretrain("--resume", "--run-dir", str(run_dir), tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "nothing to do" in result.stdout and "already at step 5" in result.stdout
    result = run_pretrain("--resume", "--run-dir", str(run_dir), "--max-steps", "7",
                          tmp_path=tmp_path)
    assert result.returncode == 2
    assert ("embeddings (factor 8) would never take an optimizer step in max_steps "
            "(--max-steps) 7 micro-batches") in result.stderr


def test_config_problems_name_the_flag_that_gave_each_field(tmp_path):
    # "accelerator_types=['A100'] needs gpus_per_worker >= 1": no such flag as either; and
    # named only once every other field passed.
    from jobs import pretrain
    from orchestrator.config import ConfigError

    args = pretrain.parse_args(["--accelerator-type", "A100", "--num-workers", "0",
                                "--seq-len", "9000", "--max-steps", "0"])
    with pytest.raises(ConfigError) as e:
        pretrain.build_configs(args, tmp_path / "run")
    for words in ("accelerator_types (--accelerator-type) ['A100'] needs gpus_per_worker "
                  "(--gpus-per-worker) >= 1",
                  "seq_len (--seq-len) must be <= 8192",
                  "num_workers (--num-workers) must be an integer in [1, 100000], got 0",
                  "max_steps (--max-steps) must be an integer >= 1, got 0"):
        assert words in str(e.value)


def test_a_config_built_outside_pretrain_names_no_flag():
    from orchestrator.config import ConfigError, JobSpec

    with pytest.raises(ConfigError, match=r"num_workers must be an integer"):
        JobSpec(name="job", num_workers=0)


def test_training_docs_name_every_flag_a_resume_may_change():
    # docs/training.md's --resume bullet said only --max-steps, --precision and the cadence
    # may change; the code also takes --strategy, --compile and --data-cache
    # (RESUMABLE_CHANGES), which a reader would have thought refused. (init_from is there so
    # that a saved config's path does not conflict; --init-from given to a resume starts the
    # data setup afresh, so it is no change to document.)
    doc = " ".join((PRETRAIN.parents[1] / "docs" / "training.md").read_text().split())
    bullet = doc.split("- `--resume` continues a run with its own settings", 1)[1]
    bullet = bullet.split(" - When the scheduler tells a job to yield", 1)[0]
    source = PRETRAIN.read_text()
    flags = [f"--{field.replace('_', '-')}"
             for field in sorted(RESUMABLE_CHANGES - {"init_from"})]
    unnamed = [flag for flag in flags if f'"{flag}"' in source and f"`{flag}`" not in bullet]
    assert unnamed == []


def test_resume_of_a_run_whose_final_checkpoint_is_damaged_trains_again(tmp_path, capsys):
    # The metrics log lists the final checkpoint, so --resume at the same --max-steps said
    # "nothing to do" however damaged it was on disk. (Checked before Ray: no run here.)
    from jobs import pretrain
    from orchestrator.runs import append_metrics, resume_point

    run_dir = tmp_path / "run"
    for step in (5, 10):
        checkpoint = save_checkpoint(run_dir / f"checkpoint_{step:08d}", {"step": step}).parent
        append_metrics(run_dir, {"step": step}, str(checkpoint))
    assert pretrain._already_complete(run_dir, TrainConfig(max_steps=10), resume_point(run_dir))
    assert "nothing to do" in capsys.readouterr().out
    state = run_dir / "checkpoint_00000010" / "state.pt"
    state.write_bytes(b"damaged")
    assert not pretrain._already_complete(run_dir, TrainConfig(max_steps=10),
                                          resume_point(run_dir))
    out, err = capsys.readouterr()
    assert "nothing to do" not in out
    assert f"checkpoint {state} is corrupt" in err and "step 10" in err
    assert "resumes from step 5" in err, err


def test_an_estimated_need_past_any_gpu_is_named_by_the_flags_given(tmp_path):
    # Without --min-gpu-memory-gb the GPU memory asked is the run's estimate; past JobSpec's
    # bound it was refused as "min_gpu_memory_gb (--min-gpu-memory-gb) must be a number in
    # [0, 10000], got 20435.6": a flag not given, and --dry-run could not show the estimate.
    from jobs import pretrain
    from orchestrator.config import ConfigError

    args = pretrain.parse_args(["--model-size", "gpt2-xl", "--seq-len", "8192",
                                "--batch-size", "1024", "--gpus-per-worker", "1"])
    with pytest.raises(ConfigError) as e:
        pretrain.build_configs(args, tmp_path / "run")
    said = str(e.value)
    assert "must be a number in [0, 10000]" not in said
    assert re.search(r"estimated need of [\d.]+ GiB on each worker's GPU", said), said
    for flag in ("--batch-size 1024", "--seq-len 8192", "--model-size gpt2-xl"):
        assert flag in said
    # Given, the bound is the flag's own, named as before.
    args = pretrain.parse_args(["--gpus-per-worker", "1", "--min-gpu-memory-gb", "20000"])
    with pytest.raises(ConfigError, match=re.escape(
            "min_gpu_memory_gb (--min-gpu-memory-gb) must be a number in [0, 10000]")):
        pretrain.build_configs(args, tmp_path / "run")


@pytest.mark.parametrize("argv, said", [
    (["--span-penalty", "1e-4", "--span-ramp", "16"],
     "--span-ramp, --span-penalty ignored: they apply with --attention-span"),
    (["--lr-decay-every", "50"], "--lr-decay-every ignored: it applies with --lr-schedule step"),
    (["--lr-schedule", "constant", "--min-lr", "1e-4"],
     "--min-lr ignored: it applies with --lr-schedule cosine"),
])
def test_a_flag_its_feature_is_off_for_is_said_to_be_ignored(tmp_path, capsys, argv, said):
    # `--span-penalty 1e-4` without --attention-span trained standard attention, silently.
    from jobs import pretrain

    pretrain.build_configs(pretrain.parse_args(argv), tmp_path / "run")
    assert f"warning: {said}" in capsys.readouterr().err
    on = {"--span-penalty": ["--attention-span"], "--lr-decay-every": ["--lr-schedule", "step"],
          "--lr-schedule": ["--lr-schedule", "cosine"]}[argv[0]]
    pretrain.build_configs(pretrain.parse_args(argv + on), tmp_path / "run")
    assert "ignored" not in capsys.readouterr().err


def test_a_gpu_run_resumed_on_cpu_workers_leaves_its_accelerator_types_behind(tmp_path):
    # Refused as "accelerator_types (--accelerator-type) ['A100'] needs gpus_per_worker
    # (--gpus-per-worker) >= 1": a flag not given, and no flag could clear the run's own.
    from jobs import pretrain

    run_dir = fake_finished_run(tmp_path / "run", steps=0)
    config = json.loads((run_dir / "config.json").read_text())
    config["job"] = {"gpus_per_worker": 1, "accelerator_types": ["A100"]}
    (run_dir / "config.json").write_text(json.dumps(config))
    resume = ["--resume", "--run-dir", str(run_dir)]
    _, spec = pretrain.build_configs(pretrain.parse_args(resume + ["--gpus-per-worker", "0"]),
                                     run_dir)
    assert (spec.gpus_per_worker, spec.accelerator_types) == (0, ())
    _, spec = pretrain.build_configs(pretrain.parse_args(resume), run_dir)  # on GPUs: its own
    assert (spec.gpus_per_worker, spec.accelerator_types) == (1, ("A100",))


@pytest.mark.parametrize("address", ["", " "])
def test_an_empty_address_is_refused_not_read_as_none(tmp_path, address):
    # `--address "$RAY_HEAD"` with the variable unset started an embedded local Ray and
    # trained on this machine instead of the cluster (as an empty --tokenizer is refused).
    from jobs import pretrain
    from orchestrator.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape("--address is empty")):
        pretrain.build_configs(pretrain.parse_args(["--address", address]), tmp_path / "run")


def test_a_failed_write_of_config_or_summary_keeps_the_files_there_and_is_said(tmp_path):
    """config.json and summary.json were written in place: a write that failed part way (a
    full disk; here a file-size limit, EFBIG) left the run's config.json half written, which
    --resume, serving and export then could not read, and a summary's failure was a
    traceback after the whole run. Now a temporary file takes the failure: the files already
    there are kept, and the error names the file."""
    import subprocess
    import sys
    import textwrap

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text('{"train": {}, "job": {}}\n')
    (run_dir / "summary.json").write_text('{"steps": 5}\n')
    script = textwrap.dedent(f"""
        import resource, signal, sys
        from pathlib import Path
        from types import SimpleNamespace
        from jobs import pretrain
        from orchestrator.config import JobSpec, TrainConfig
        from orchestrator.job_exit import JobFailed
        from orchestrator.runs import RunDirError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (300, resource.RLIM_INFINITY))
        run_dir = Path({str(run_dir)!r})
        try:
            pretrain._write_resolved_config(run_dir, TrainConfig(tokenizer_sha256=""),
                                            JobSpec(name=run_dir.name), None)
        except RunDirError as e:
            print("config:", e)
        result = SimpleNamespace(metrics={{"step": 5}}, checkpoint=None, return_value=None)
        placement = SimpleNamespace(worker_nodes=("n",), bottleneck_gbps=float("inf"))
        try:
            pretrain._write_summary(result, TrainConfig(max_steps=5), placement, run_dir,
                                    1.0, [])
        except JobFailed as e:
            print("summary:", e, e.exit_code)
        """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert done.returncode == 0, done.stderr
    assert (run_dir / "config.json").read_text() == '{"train": {}, "job": {}}\n'
    assert (run_dir / "summary.json").read_text() == '{"steps": 5}\n'
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json", "summary.json"]
    assert f"config: cannot write to run dir {run_dir}: file {run_dir / 'config.json'} " \
        "cannot be written: File too large" in done.stdout
    assert f"summary: file {run_dir / 'summary.json'} cannot be written: File too large" \
        in done.stdout and f"the run finished: its checkpoints are in {run_dir} 4" in done.stdout


def test_a_cpu_run_past_this_machines_memory_is_refused_before_ray_starts(
        tmp_path, monkeypatch, capsys):
    """gpt2-xl at 8 x 1024 on CPUs (about 67 GiB per worker by the estimate, fp32) on an
    embedded Ray: the dry run said it would be placed, and a run was killed by the kernel's OOM
    killer mid-run (a Ray worker-died message). Refused before Ray starts, in one line naming
    the flags that size it and the need vs what this machine has available."""
    from orchestrator import probes
    import ray_layer.launch as ray_launch
    from jobs import pretrain

    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # (an embedded Ray: not one an earlier test in this process started, as in the full suite)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(probes, "memory_within_cgroup", lambda: (24 * 2**30, 17 * 2**30))

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was reached")
    monkeypatch.setattr(ray_launch, "dry_run_placement", no_ray)
    monkeypatch.setattr(ray_launch, "launch", no_ray)
    big = ["--model-size", "gpt2-xl", "--batch-size", "8", "--seq-len", "1024"]
    for extra in (["--dry-run"], []):
        code = pretrain.main([*big, *extra, "--run-dir", str(tmp_path / "xl")])
        err = capsys.readouterr().err
        assert code == 3, err
        line = err.strip().splitlines()[-1]
        assert "--model-size gpt2-xl, --batch-size 8 x --seq-len 1024 per worker" in line
        assert "x 2 worker(s) (--num-workers 2" in line
        assert "17.0 GiB available" in line and "134.8 GiB" in line, line
    assert not (tmp_path / "xl").exists()
    # A run that fits is not refused here (the placement is asked, as before).
    monkeypatch.setattr(ray_launch, "dry_run_placement", lambda spec, address: (_ for _ in ()
                                                                                ).throw(KeyError))
    with pytest.raises(KeyError):
        pretrain.run(pretrain.parse_args(["--model-size", "tiny", "--dry-run",
                                          "--run-dir", str(tmp_path / "tiny")]))


def test_a_resume_past_a_corrupt_newest_checkpoint_names_the_step_it_resumes_from(
        tmp_path, capsys):
    """The launcher worked out the resume's step from the metrics log's newest checkpoint
    before the corrupt ones were set aside (set_aside_corrupt, under the run-dir lock): with
    checkpoint 20 cut short, `--resume --max-steps 30` of a run at --accumulation 16 named
    step 20 (suggesting only --max-steps 32) while the loop went on from step 10."""
    from jobs import pretrain
    from orchestrator.runs import append_metrics, resume_point

    run_dir = tmp_path / "run"
    for step in (10, 20):
        append_metrics(run_dir, {"step": step}, str(save_checkpoint(
            run_dir / f"checkpoint_{step:08d}", {"step": step}).parent))
    config = {**TrainConfig().to_dict(), "max_steps": 20, "accumulation": "16",
              "warmup_steps": 2}
    (run_dir / "config.json").write_text(json.dumps({"train": config}))
    state = run_dir / "checkpoint_00000020" / "state.pt"
    state.write_bytes(state.read_bytes()[:50])  # cut short
    point = resume_point(run_dir)
    assert point.step == 10 and [s for s, _ in point.unusable] == [20]
    args = pretrain.parse_args(["--resume", "--run-dir", str(run_dir), "--max-steps", "30"])
    pretrain.build_configs(args, run_dir)
    assert capsys.readouterr().err.endswith("; max_steps 16 or 32 ends on a step of every "
                                            "group\n")


def test_a_resume_reads_the_metrics_log_once(tmp_path, monkeypatch, capsys):
    # build_configs worked out the step the resume goes on from (resume_point), and
    # _already_complete worked it out again: the whole metrics log read and parsed twice
    # (~0.5 s each for a 200k-line log) before anything started.
    from jobs import pretrain
    from orchestrator import runs

    run_dir = tmp_path / "run"
    for step in (5, 10):
        checkpoint = save_checkpoint(run_dir / f"checkpoint_{step:08d}", {"step": step}).parent
        runs.append_metrics(run_dir, {"step": step}, str(checkpoint))
    config = {**TrainConfig().to_dict(), "max_steps": 10}
    (run_dir / "config.json").write_text(json.dumps({"train": config}))
    reads = []
    read_metrics = runs.read_metrics
    monkeypatch.setattr(runs, "read_metrics", lambda d: reads.append(d) or read_metrics(d))
    assert pretrain.run(pretrain.parse_args(["--resume", "--run-dir", str(run_dir)])) is None
    assert "already at step 10" in capsys.readouterr().out
    assert reads == [run_dir]
