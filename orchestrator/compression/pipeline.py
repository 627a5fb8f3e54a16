"""The compression pipeline: stages, their resumable outputs under --out, the report.

    <out>/compress_config.json  the config and the teacher's identity; a rerun with settings
                                that would change finished stages is refused
    <out>/original/             the teacher's fp32 weights (the size baseline)
    <out>/distilled/            only with a smaller student: a fresh student distilled from
                                the teacher
    <out>/pruned/               stage 1: gradual pruning (whole heads and MLP channels, then
                                shrunk, by default; or magnitude), distillation fine-tune
    <out>/qat/                  stage 2: INT8 quantization-aware distillation fine-tune
    <out>/int8/                 stage 3: the INT8 export (export.py)
    <out>/report.json           original vs pruned vs INT8
    <out>/.compress.lock        held by the run using --out (out_held)

A stage's directory appears only when the stage is complete (built under a hidden name and
renamed), so a rerun skips exactly the finished stages. Inside a fine-tune, progress is
checkpointed to <out>/.<stage>.partial.step<N>.pt (each under a new name, the previous one
deleted once it is complete) and a rerun continues from the newest that verifies; a rerun
deletes those of a stage already published (remove_leftovers; not where --out cannot be
locked).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from orchestrator.compression import export, measure, prune, qat, structured
from orchestrator.compression.artifacts import (CheckpointError, cpu_state_dict,
                                                file_in_the_way, load_tensors, save_tensors,
                                                staged_dir, write_json)
from orchestrator.compression.config import (CompressConfig, fine_tune_settings,
                                              restart_changes, resume_conflicts)
from orchestrator.compression.finetune import (Plan, PruneSchedule, finetune, progress_files,
                                                remove_progress)
from orchestrator.compression.report import (SCRATCH_PREFIX, build_report,
                                             format_table, latency_seq_len)
from orchestrator.compression.source import teacher_data, teacher_tokenizer
from orchestrator.config import MODEL_PRESETS, ConfigError
from orchestrator.runs import (COMPRESS_CONFIG_FILE, COMPRESS_STAGE_FILE, COMPRESS_WEIGHTS_FILE,
                              FolderClaim, folder_claimed, writable_dir_problem)
from orchestrator.tokenizer import (TOKENIZER_FILE, ByteTokenizer, Tokenizer, TokenizerError,
                                    save_tokenizer, tokenizer_of_run)
from orchestrator.training.checkpoint import _weights_mismatch, recorded_sha256
from orchestrator.training.data import get_batch
from orchestrator.training.loop import say
from orchestrator.training.memory import parameters_label
from orchestrator.training.model import GPT, GPTConfig
from orchestrator.validation import expand_home

CONFIG_FILE = COMPRESS_CONFIG_FILE
REPORT_FILE = "report.json"
WEIGHTS_FILE = COMPRESS_WEIGHTS_FILE
MASKS_FILE = "masks.pt"
STAGE_FILE = COMPRESS_STAGE_FILE
OUT_LOCK = ".compress.lock"  # held (file_lock) by the run using --out, for the run's life
# Data stream per fine-tune (get_batch's `rank`): each stage draws its own batches, none of
# them the pretraining workers' (ranks 0..N).
STREAMS = {"distill": 101, "prune": 102, "qat": 103, "calibrate": 104}
# Each fine-tune's output directory under --out.
STAGE_DIRS = {"distill": "distilled", "prune": "pruned", "qat": "qat"}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device (--device) is 'cuda' but no CUDA device is available")
    return torch.device(name)


def fine_tune_seq_len(config: CompressConfig, block_size: int) -> int:
    seq_len = config.seq_len or block_size
    if seq_len > block_size:
        raise ConfigError(f"seq_len (--seq-len) must be <= the teacher's context length "
                          f"{block_size}, got {seq_len}")
    return seq_len


def prepare_out(out: Path, config: CompressConfig, source: dict[str, Any],
                block_size: int | None = None, log: Callable[[str], None] = say,
                guarded: bool = True) -> bool:
    """Create --out for a new run, or check that it holds this same run to resume and clear
    what an earlier run killed on its way left behind (remove_leftovers). Called while this
    run holds --out (out_held); `guarded` False, where the filesystem refused its lock:
    another run may be using --out now, and nothing of it is removed as left over.

    Checked before anything is written: a refused run leaves --out as it was. A rerun that
    changes fine-tune settings a fine-tune not finished may take restarts it (restart_stages),
    before the new settings are recorded: a stop between the two finds the change again.
    Returns whether it did (the caller's put-back must then keep the new settings). Unguarded,
    a restart that would delete progress is refused (restart_stages)."""
    saved = check_out(out, config, source, block_size)
    out.mkdir(parents=True, exist_ok=True)
    restarted = saved is not None and restart_stages(out, config, saved, block_size, log,
                                                     guarded)
    write_json(out / CONFIG_FILE, {"compress": config.to_dict(), "source": source})
    if guarded:
        remove_leftovers(out, log)
    return restarted


def remove_leftovers(out: Path, log: Callable[[str], None]) -> None:
    """Delete what no stage will use again, left by a run killed on its way (a crash, SIGKILL):
    the progress checkpoints of a stage already published (the crash fell between publishing
    and deleting them: a model's size, for good) and the report's temporary folders. Only
    while this run holds --out: another run's would be in use."""
    for stage, dirname in STAGE_DIRS.items():
        removed = remove_progress(partial_path(out, stage)) if (out / dirname).is_dir() else []
        if removed:
            log(f"{dirname}: already done; removed its leftover progress files "
                f"{', '.join(removed)}")
    for scratch in out.glob(SCRATCH_PREFIX + "*"):
        shutil.rmtree(scratch, ignore_errors=True)
        log(f"report: removed the temporary folder {scratch.name} of an earlier attempt")


def fine_tune_stages(config: CompressConfig) -> list[str]:
    """The fine-tunes a run of `config` makes, in order."""
    return ["distill", "prune", "qat"] if config.student_size else ["prune", "qat"]


def restart_stages(out: Path, config: CompressConfig, saved: dict[str, Any],
                   block_size: int | None, log: Callable[[str], None],
                   guarded: bool = True) -> bool:
    """Where this rerun changes fine-tune settings (config.RESTART_CHANGES; check_out let it
    through: a fine-tune is unfinished), said in one line: the finished fine-tunes are kept as
    made with the `saved` values, which their stage.json records (added there where a stage
    predates the record), and the unfinished ones run from step 0 with the new values: their
    progress checkpoints, made with the old ones, are deleted. Returns whether it changed
    any. Not `guarded` (--out could not be locked: another run may be using them), a restart
    that would delete progress is refused (ConfigError naming the files, deleted by hand),
    before anything is written."""
    changes = restart_changes(saved, config, block_size)
    if not changes:
        return False
    if not guarded:
        files = sorted(path.name for stage in fine_tune_stages(config)
                       if not (out / STAGE_DIRS[stage]).is_dir()
                       for path in progress_files(partial_path(out, stage)))
        if files:
            raise ConfigError(
                f"--out {out} cannot be locked, so another run may be using it: its progress "
                f"made with the old fine-tune settings ({'; '.join(changes)}) is not deleted "
                f"here; delete {', '.join(files)} once no run uses --out and rerun, or pass "
                "the original values")
    kept, restarted, removed = [], [], []
    for stage in fine_tune_stages(config):
        directory = out / STAGE_DIRS[stage]
        if directory.is_dir():
            _record_settings(directory, fine_tune_settings(saved))
            kept.append(f"{directory.name}/")
        else:
            restarted.append(stage)
            removed += [name for name in remove_progress(partial_path(out, stage))
                        if not name.endswith(".sha256")]
    log(f"fine-tune settings changed ({'; '.join(changes)}): "
        + (f"{', '.join(kept)} kept as made with the old value(s) (recorded in stage.json); "
           if kept else "")
        + f"{' and '.join(restarted)} "
        f"start{'s' if len(restarted) == 1 else ''} over from step 0 with the new"
        + (f" (deleted the progress made with the old: {', '.join(removed)})"
           if removed else ""))
    return True


def _record_settings(directory: Path, settings: dict[str, Any]) -> None:
    """Add the fine-tune `settings` a finished stage was made with to its stage.json, where
    it lacks them (made by a version that did not record them). One that cannot be read is
    left to _load_stage (which sets the stage aside and redoes it)."""
    try:
        metrics = json.loads((directory / STAGE_FILE).read_text())
    except (OSError, ValueError):
        return
    if isinstance(metrics, dict) and "settings" not in metrics:
        write_json(directory / STAGE_FILE, {**metrics, "settings": settings})


def partial_path(out: Path, stage: str) -> Path:
    """The name a fine-tune's progress checkpoints are derived from (finetune)."""
    return out / f".{stage}.partial.pt"


def check_out(out: Path, config: CompressConfig, source: dict[str, Any],
              block_size: int | None = None) -> dict[str, Any] | None:
    """Refuse an --out that is a file, holds something else, or holds a run of another
    teacher or with settings that would change its finished stages (`block_size`: the
    teacher's context, what seq_len left out means); fine-tune settings may change while a
    fine-tune is unfinished (restart_stages). Writes nothing; returns the saved settings (None
    for a new --out)."""
    saved_path = out / CONFIG_FILE
    check_out_path(out)
    if saved_path.is_file():
        try:
            saved = json.loads(saved_path.read_text())
            saved_config, saved_source = saved["compress"], saved["source"]
            for key, value in (("compress", saved_config), ("source", saved_source)):
                if not isinstance(value, dict):  # (read as all defaults; or AttributeError)
                    raise ValueError(f"its {key} is a JSON {type(value).__name__}, not an "
                                     "object")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"cannot read {saved_path}: {e}") from None
        if saved_source.get("sha256") != source.get("sha256"):
            raise ConfigError(_another_teacher(out, saved_source, source))
        open_fine_tunes = not fine_tunes_finished(out)
        conflicts = resume_conflicts(saved_config, config, block_size, open_fine_tunes)
        if conflicts:
            finished = ("" if open_fine_tunes
                        or conflicts != restart_changes(saved_config, config, block_size)
                        else f" (its fine-tunes are all finished, {STAGE_DIRS['qat']}/ last: "
                        "these would change none of them)")
            raise ConfigError(f"--out {out} was made with other settings: "
                              f"{'; '.join(conflicts)}{finished}. Pass the original values or "
                              "use a new --out")
        return saved_config
    if out.is_dir() and any(p.name != OUT_LOCK for p in out.iterdir()):
        raise ConfigError(f"--out {out} is not empty and holds no compression run (no "
                          f"{CONFIG_FILE}); choose a new or empty directory")
    return None


def fine_tunes_finished(out: Path) -> bool:
    """Whether the fine-tunes of the run in `out` are all finished (qat/, the last, is
    there): their settings may no longer change on a rerun (check_out)."""
    return (out / STAGE_DIRS["qat"]).is_dir()


def _another_teacher(out: Path, saved: dict[str, Any], source: dict[str, Any]) -> str:
    """Why --out is refused for this teacher. When its own teacher is an earlier checkpoint
    of the same run, still there unchanged (--checkpoint RUN takes the newest, and the
    pretrain run has saved another since), the refusal says how to resume it."""
    recorded, chosen = saved.get("checkpoint"), source.get("checkpoint")
    if recorded and chosen and Path(recorded).parent == Path(chosen).parent:
        try:
            unchanged = recorded_sha256(recorded) == saved.get("sha256")
        except OSError:  # pruned from the run since (keep=N)
            unchanged = False
        if unchanged:
            return (f"--out {out} holds a compression of {recorded}, another checkpoint of "
                    f"the same run: to resume it, pass --checkpoint {recorded}; to compress "
                    f"{Path(chosen).name} instead, use a new --out")
    return f"--out {out} holds a compression of another teacher ({recorded}); use a new --out"


@contextlib.contextmanager
def out_held(out: Path, log: Callable[[str], None]) -> Iterator[FolderClaim]:
    """This process's claim on --out while its run runs: a second run on the same --out
    meanwhile is refused (ConfigError naming the holder) before it writes anything; both
    wrote the same progress checkpoints and temporary folders. Yields whether it is held: on
    a filesystem without flock the run goes on unguarded (said; `unguarded` set), and
    prepare_out must then remove nothing as left over. A run that fails with nothing in --out but the lock and
    compress_config.json put --out back as it was (runs.FolderClaim, as a pretrain run's
    run_dir_held does): a directory it made removed, the files it added to one that was
    there removed, those it replaced written back; one that finished a stage or saved
    progress keeps all it wrote, for a rerun to resume. A rerun that restarted fine-tunes
    with new settings (prepare_out) snapshots again: its progress deleted, a failure must not
    put the old settings back (its own progress may reuse the deleted files' names)."""
    with folder_claimed(out, OUT_LOCK,
                        busy=lambda holder: ConfigError(
                            f"--out {out} is in use by another compression run ({holder}); "
                            "wait for it to end, or use another --out"),
                        cannot=lambda why: ConfigError(f"cannot lock --out {out}: {why}")
                        ) as claim:
        if claim.unguarded:
            log(f"warning: cannot lock --out {out} ({claim.unguarded}): a second run on it "
                "meanwhile would not be refused, and what earlier runs left there (progress "
                "files of finished stages, .report-* folders) is kept, as is what this run "
                "writes if it fails: it could be such a run's")
        claim.snapshot({CONFIG_FILE})
        try:
            yield claim
        except BaseException:
            claim.refused = True
            raise


def check_out_path(out: Path) -> None:
    """Refuse an --out that cannot be a directory (an existing file, or a path under one) or
    cannot be written (/sys, a read-only mount: found after the teacher's ONNX export)."""
    blocker = file_in_the_way(out)
    if blocker == out:
        raise ConfigError(f"--out {out} exists and is not a directory")
    if blocker is not None:
        raise ConfigError(f"--out {out} cannot be created: {blocker} is a file, not a "
                          "directory")
    problem = writable_dir_problem(out)
    if problem:
        raise ConfigError(f"--out {out} cannot be written: {problem}")


def _save_stage(directory: Path, model: torch.nn.Module, masks: dict | None,
                metrics: dict[str, Any]) -> None:
    with staged_dir(directory) as tmp:
        save_tensors(tmp / WEIGHTS_FILE,
                     {"config": dataclasses.asdict(model.config),
                      "model": cpu_state_dict(model)})
        if masks is not None:
            save_tensors(tmp / MASKS_FILE, {"masks": masks})
        write_json(tmp / STAGE_FILE, metrics)


def _load_stage(directory: Path, log: Callable[[str], None]
                ) -> tuple[GPT, dict | None, dict[str, Any]] | None:
    """A finished stage (model, masks, metrics), or None when it is absent or unusable (then
    it is removed, with a warning, and recomputed)."""
    if not directory.is_dir():
        return None
    try:
        model = load_stage_model(directory)
        masks = None
        if (directory / MASKS_FILE).exists():
            masks = load_tensors(directory / MASKS_FILE)["masks"]
        metrics = json.loads((directory / STAGE_FILE).read_text())
    except (CheckpointError, KeyError, TypeError, ValueError, RuntimeError, OSError) as e:
        _set_aside(directory, f"{directory} is unusable ({e})", "redoing that stage", log)
        return None
    log(f"{directory.name}: already done, reusing {directory}")
    return model.eval(), masks, metrics


def load_stage_model(directory: Path) -> GPT:
    """The model a finished stage folder holds (its weights.pt, checksum verified, in its own
    shape), in eval mode. CheckpointError, in one line, naming the file that does not verify
    or whose weights do not make the model its config describes."""
    path = directory / WEIGHTS_FILE
    weights = load_tensors(path)
    try:
        config = GPTConfig.from_saved(weights["config"])
        model = GPT(config)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: its config does not describe a GPT: "
                              f"{type(e).__name__}: {e}") from None
    try:
        model.load_state_dict(weights["model"])
    except (KeyError, TypeError, RuntimeError) as e:  # torch's: a line per weight
        raise CheckpointError(f"{path}: the weights do not fit its config: "
                              f"{_weights_mismatch(weights.get('model'), config, e)}") from None
    return model.eval()


def exportable_stage(directory: Path) -> tuple[GPT, Tokenizer, str]:
    """(fp32 model, the teacher's tokenizer, stage) of a finished stage folder of a compress
    --out (original/, distilled/, pruned/, qat/), for jobs/export.py: qat/'s weights as int8/
    holds them (int8 x scale at the run's --weight-bits: what QAT trained; the activations
    stay float), the other stages' as saved. The tokenizer is the one compress_config.json
    records, read from the teacher's run or int8/. CheckpointError naming the file otherwise
    (whether the model has GPT-2's form is the exporter's to say)."""
    out = directory.parent
    stage = _json_field(directory / STAGE_FILE, "stage")
    settings = _json_field(out / CONFIG_FILE, "compress")
    source = _json_field(out / CONFIG_FILE, "source")
    try:
        model = load_stage_model(directory)
        if stage == "qat":
            bits = CompressConfig.from_dict(settings).weight_bits
            model = export.dequantized_twin(model, prune.prunable_names(model),
                                            qat.qmax_for_bits(bits))
    except ConfigError as e:
        raise CheckpointError(f"{out / CONFIG_FILE}: {e}") from None
    return model, stage_tokenizer(out, source), stage


def _json_field(path: Path, key: str) -> Any:
    """`key` of the JSON object in `path` (a dict, or stage.json's "stage" string);
    CheckpointError naming the file and key otherwise."""
    try:
        value = json.loads(path.read_text())[key]
        if not isinstance(value, dict if key != "stage" else str):
            raise TypeError(f"{key} is a JSON {type(value).__name__}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read {path} ({type(e).__name__}: {e}): a compress "
                              f"stage folder is read with its {STAGE_FILE} and the "
                              f"{CONFIG_FILE} of the --out it is in") from None
    return value


def stage_tokenizer(out: Path, source: dict[str, Any]) -> Tokenizer:
    """The teacher's tokenizer for a compress --out's stages: from the teacher's run
    (teacher_tokenizer), else the copy its int8/ carries (the teacher run moved or gone),
    each checked against the sha256 `source` records. CheckpointError when neither has it."""
    try:
        return teacher_tokenizer(source)
    except CheckpointError:
        carried = out / "int8"
        if not (carried / TOKENIZER_FILE).is_file():
            raise
        try:
            return tokenizer_of_run(carried, (source.get("train") or {}).get(
                "tokenizer_sha256") or "")
        except TokenizerError:
            raise CheckpointError(f"the teacher's tokenizer: neither the teacher's run "
                                  f"({source.get('checkpoint')}) nor {carried} holds the "
                                  "one it was trained with") from None


def _set_aside(directory: Path, problem: str, then: str, log: Callable[[str], None]) -> None:
    """A finished stage that cannot be used now, moved to `<name>.unusable` beside it rather
    than deleted: a read that failed for a passing reason (an I/O error, memory, a library
    missing in this environment) cost the stage for good. One copy is kept (the latest): a
    cause that persists would otherwise add a copy per rerun. OSError when it cannot be moved
    (the redone stage could not be written there either)."""
    target = directory.with_name(f"{directory.name}.unusable")
    if target.exists():
        shutil.rmtree(target)
    directory.rename(target)
    log(f"warning: {problem}; kept as {target}, {then}")


def _export_done(directory: Path, log: Callable[[str], None], tokenizer: Tokenizer) -> bool:
    if not directory.is_dir():
        return False
    if not _carries_tokenizer(directory, tokenizer):
        _set_aside(directory, f"{directory} does not carry the teacher's tokenizer "
                   f"({tokenizer.name})", "exporting again", log)
        return False
    try:
        export.load_onnx_model(directory, threads=1)
        load_tensors(directory / export.TORCH_FILE)
    except (CheckpointError, OSError) as e:
        _set_aside(directory, f"{directory} is unusable ({e})", "exporting again", log)
        return False
    except Exception as e:  # onnxruntime's own error types
        _set_aside(directory, f"{directory}: ONNX Runtime cannot load it ({e})",
                   "exporting again", log)
        return False
    log(f"{directory.name}: already done, reusing {directory}")
    return True


def _carries_tokenizer(directory: Path, tokenizer: Tokenizer) -> bool:
    """Whether serving reads an int8 export with `tokenizer`: the one it records, found as
    the loader finds it (serving/loading.py)."""
    try:
        return tokenizer_of_run(directory, export.recorded_tokenizer_sha256(directory)
                                ).sha256 == tokenizer.sha256
    except TokenizerError:
        return False


def _plan(stage: str, steps: int, config: CompressConfig, seq_len: int) -> Plan:
    return Plan(stage=stage, steps=steps, stream=STREAMS[stage], lr=config.lr,
                warmup_steps=min(config.warmup_steps, max(steps - 1, 0)),
                weight_decay=config.weight_decay, grad_clip=config.grad_clip,
                batch_size=config.batch_size, seq_len=seq_len, seed=config.seed,
                alpha=config.alpha, temperature=config.temperature,
                log_every=config.log_every, checkpoint_every=config.checkpoint_every)


@dataclasses.dataclass
class Run:
    """What every stage needs: where outputs go, the settings, the frozen teacher, the data."""

    out: Path
    config: CompressConfig
    teacher: GPT
    train_tokens: torch.Tensor
    device: torch.device
    seq_len: int
    log: Callable[[str], None] = say
    # The teacher's: the int8 export carries it (bytes: a teacher without a run).
    tokenizer: Tokenizer = dataclasses.field(default_factory=ByteTokenizer)

    def plan(self, stage: str, steps: int) -> Plan:
        return _plan(stage, steps, self.config, self.seq_len)


def _run_stage(run: Run, stage: str, student: GPT, plan: Plan, *,
               masks: dict | None = None, schedule: PruneSchedule | None = None,
               finish: Callable[[GPT, dict], tuple[GPT, dict | None]] | None = None
               ) -> tuple[GPT, dict | None, dict[str, Any]]:
    """One fine-tune stage: train (resuming from its partial checkpoint), `finish` the model
    (structured pruning shrinks it), then publish the stage's directory and drop the partial
    checkpoint. Returns (model, masks, metrics)."""
    partial = partial_path(run.out, stage)
    dense_config = student.config  # before a structured finish shrinks it
    run.log(f"{stage}: fine-tuning {plan.steps} steps (batch {plan.batch_size} x "
            f"{plan.seq_len}, alpha {plan.alpha}, temperature {plan.temperature})")
    masks, metrics = finetune(student, run.teacher, run.train_tokens, plan, run.device,
                              masks=masks, schedule=schedule, partial=partial, log=run.log)
    if finish is not None:
        student, masks = finish(student, masks)
    if schedule is not None:  # pruning: "sparsity" as the report means it, one figure
        metrics["sparsity"] = structured.block_sparsity(student, dense_config)
    metrics["settings"] = fine_tune_settings(run.config)  # (a rerun may change them: restart)
    _save_stage(run.out / STAGE_DIRS[stage], student, masks if masks else None,
                {"stage": stage, **metrics})
    remove_progress(partial)
    return student, masks, metrics


def stage_original(run: Run, source: dict[str, Any]) -> None:
    """The teacher's fp32 weights, written the way the pruned model is: the size baseline."""
    if _load_stage(run.out / "original", run.log) is None:
        _save_stage(run.out / "original", run.teacher, None,
                    {"stage": "original", "source": source})


def shape_to_compress(teacher: GPT, config: CompressConfig) -> GPTConfig:
    """The shape of the model to compress: the teacher's, or a --student-size preset with the
    teacher's vocabulary and context."""
    shape = MODEL_PRESETS[config.student_size] if config.student_size else {}
    if shape:  # a fresh preset student has uniform widths whatever the teacher's
        shape = {**shape, "mlp_hidden": None, "n_heads_per_layer": None}
    return dataclasses.replace(teacher.config, dropout=0.0, **shape)


def stage_student(run: Run) -> tuple[GPT, dict[str, Any] | None]:
    """The model to compress: a copy of the teacher, or, with a smaller --student-size, a
    fresh model of that preset distilled from the teacher (it has nothing to prune yet)."""
    config = run.config
    student_config = shape_to_compress(run.teacher, config)
    if not config.student_size:
        student = GPT(student_config)
        student.load_state_dict(run.teacher.state_dict())
        return student.to(run.device), None
    done = _load_stage(run.out / STAGE_DIRS["distill"], run.log)
    if done:
        student, _, metrics = done
        return student.to(run.device), metrics
    torch.manual_seed(config.seed)
    student = GPT(student_config).to(run.device)
    run.log(f"distill: {config.student_size} student "
            f"({parameters_label(student.num_params(non_embedding=False))}) from a teacher of "
            f"{parameters_label(run.teacher.num_params(non_embedding=False))}")
    student, _, metrics = _run_stage(run, "distill", student,
                                     run.plan("distill", config.distill_steps))
    return student, metrics


def stage_prune(run: Run, student: GPT) -> tuple[GPT, dict | None, dict[str, Any]]:
    """Stage 1: gradual pruning while distilling. Structured: whole heads and MLP channels are
    masked as the amount ramps up, then the matrices are shrunk (no masks remain). Returns
    (model, masks, metrics)."""
    done = _load_stage(run.out / STAGE_DIRS["prune"], run.log)
    if done:
        model, masks, metrics = done
        return model.to(run.device), masks, metrics
    config = run.config
    schedule = PruneSchedule(final=config.prune_sparsity, scope=config.prune_scope,
                             ramp_steps=max(1, round(config.prune_steps
                                                     * config.prune_ramp_fraction)),
                             every=config.prune_every, structure=config.prune_structure,
                             importance=config.prune_importance)
    finish: Callable[[GPT, dict], tuple[GPT, dict | None]] | None = None
    if config.prune_structure == "unstructured":
        run.log(f"prune: {len(prune.prunable_names(student))} Linear layers, "
                f"{config.prune_scope} magnitude pruning to {config.prune_sparsity:.0%} by step "
                f"{schedule.ramp_steps}")
    else:
        units = " and ".join(structured.KIND_NAMES[k][0] + "s"
                             for k in structured.KINDS[config.prune_structure])
        run.log(f"prune: whole {units} ({config.prune_importance} importance, "
                f"{config.prune_scope}) to {config.prune_sparsity:.0%} of the block "
                f"parameters by step {schedule.ramp_steps}, then shrink")

        def shrink(model: GPT, masks: dict) -> tuple[GPT, None]:
            small = structured.shrink(model, masks)
            run.log(f"prune: shrunk to heads {small.config.n_heads_per_layer or 'uniform'}, "
                    f"MLP widths {small.config.mlp_hidden or 'uniform'}; "
                    f"{structured.block_params(small.config):,} of "
                    f"{structured.block_params(model.config):,} block parameters left")
            return small.eval(), None
        finish = shrink
    return _run_stage(run, "prune", student, run.plan("prune", config.prune_steps),
                      schedule=schedule, finish=finish)


def stage_qat(run: Run, student: GPT, masks: dict | None) -> tuple[GPT, dict[str, Any]]:
    """Stage 2: INT8 quantization-aware training while distilling, masks (unstructured
    pruning's) fixed."""
    done = _load_stage(run.out / STAGE_DIRS["qat"], run.log)
    if done:
        model, _, metrics = done
        return model.to(run.device), metrics
    qmax = qat.qmax_for_bits(run.config.weight_bits)
    qat.prepare_qat(student, prune.prunable_names(student), qmax)
    run.log(f"qat: fake-quantized int8 weights (per channel, [-{qmax}, {qmax}]) and uint8 "
            "activations (per tensor, dynamic)")
    student, _, metrics = _run_stage(run, "qat", student,
                                     run.plan("qat", run.config.qat_steps), masks=masks)
    return student, metrics


def stage_export(run: Run, student: GPT) -> Path:
    """Stage 3: the int8 artifacts (export.py)."""
    int8_dir = run.out / "int8"
    if not _export_done(int8_dir, run.log, run.tokenizer):
        run.log(f"export: int8 ONNX + torch artifacts -> {int8_dir}")
        names = prune.prunable_names(student)
        with staged_dir(int8_dir) as tmp:
            export.save_int8(tmp, student.cpu().eval(), names,
                             qat.qmax_for_bits(run.config.weight_bits), run.tokenizer.sha256)
            if not isinstance(run.tokenizer, ByteTokenizer):  # bytes: no file, as for runs
                save_tokenizer(run.tokenizer, tmp)
    return int8_dir


def calibration_batches(run: Run, count: int = 4) -> list[torch.Tensor]:
    """Training batches (their own stream) that calibrate static activation scales."""
    return [get_batch(run.train_tokens, run.config.batch_size, run.seq_len,
                      seed=run.config.seed, rank=STREAMS["calibrate"], step=step)[0].cpu()
            for step in range(count)]


def check_settings(teacher_config: GPTConfig, config: CompressConfig) -> None:
    """Refuse (ConfigError naming the flag) what the teacher's shape alone rules out: asked by
    run_pipeline before anything is read or written, and by the benchmark before it trains its
    teacher (it found these after its first pipeline, minutes later)."""
    fine_tune_seq_len(config, teacher_config.block_size)
    with torch.device("meta"):  # counted, not allocated (a gpt2-xl preset is GBs)
        teacher = GPT(teacher_config)
        if config.student_size:
            student = GPT(shape_to_compress(teacher, config))
    if config.student_size:
        student_params = student.num_params(non_embedding=False)
        teacher_params = teacher.num_params(non_embedding=False)
        if student_params >= teacher_params:
            raise ConfigError(f"student_size (--student-size) must be a smaller model than the "
                              f"teacher ({parameters_label(teacher_params)}), got "
                              f"{config.student_size!r} ({parameters_label(student_params)})")
    # An amount that would take every head or channel of a layer is refused now, naming the
    # layer, not after the distillation stage.
    structured.check_amount(shape_to_compress(teacher, config), config.prune_sparsity,
                            config.prune_structure, config.prune_scope)
    # The report's settings too: a rerun that only changes them rewrites compress_config.json
    # (prepare_out), which must not then disagree with the report it failed to write.
    latency_seq_len(config, teacher_config.block_size)


def run_pipeline(teacher: GPT, source: dict[str, Any], config: CompressConfig, out: Path,
                 log: Callable[[str], None] = say) -> dict[str, Any]:
    """Every stage not yet finished under `out`, then the report (also written to
    report.json). `source` identifies the teacher (a rerun must use the same one)."""
    out = expand_home(out, "--out", ConfigError).resolve()
    device = resolve_device(config.device)
    seq_len = fine_tune_seq_len(config, teacher.config.block_size)
    check_settings(teacher.config, config)
    check_out(out, config, source, teacher.config.block_size)
    # (after check_out: a folder of something else gets no lock file)
    with out_held(out, log) as claim:
        # The teacher's data, read and checked now: a run that cannot be scored fails in
        # seconds, before anything is written to --out, not after its fine-tunes.
        try:
            data = teacher_data(source, config.eval_tokens)
            tokenizer = teacher_tokenizer(source)
        except CheckpointError as e:
            raise ConfigError(str(e)) from None
        check_eval_window(config, data[1], seq_len)
        with tempfile.TemporaryDirectory(prefix="compress-") as scratch:
            fp32_onnx = None
            if not (out / "int8" / export.ONNX_FILE).is_file():
                # Fail in seconds, before anything is written to --out, rather than after the
                # fine-tunes: the int8 runtime needs the model to go through torch.onnx.export.
                log("export check: exporting the teacher to ONNX")
                fp32_onnx = export.export_fp32_onnx(
                    teacher, Path(scratch) / "original.fp32.onnx",
                    "teacher (export check, before fine-tuning)")
            if prepare_out(out, config, source, teacher.config.block_size, log,
                           claim.unguarded is None):
                claim.snapshot({CONFIG_FILE})  # the put-back keeps the new settings
            return _run_stages(teacher, source, config, out, device, seq_len, fp32_onnx, data,
                               tokenizer, log)


def check_eval_window(config: CompressConfig, held_out: torch.Tensor, seq_len: int) -> None:
    """The perplexity needs one window of seq_len tokens (and its next) of held-out text:
    the report's own windows (measure.held_out_windows), asked for now."""
    try:
        measure.held_out_windows(held_out, seq_len, config.eval_tokens)
    except ValueError:
        # The flag when it alone is too small: the held-out tokens of a run trained on
        # --data arrive cut to eval_tokens + 1, so their count says nothing then.
        what = (f"eval_tokens (--eval-tokens) {config.eval_tokens}"
                if config.eval_tokens < seq_len
                else f"the teacher's held-out text ({len(held_out)} tokens)")
        raise ConfigError(f"{what} is shorter than one evaluation window of seq_len "
                          f"(--seq-len, else the teacher's context) {seq_len} tokens: raise "
                          "it or lower --seq-len") from None


def _run_stages(teacher: GPT, source: dict[str, Any], config: CompressConfig, out: Path,
                device: torch.device, seq_len: int, fp32_onnx: Path | None,
                data: tuple[Any, torch.Tensor], tokenizer: Tokenizer,
                log: Callable[[str], None]) -> dict[str, Any]:
    train_tokens, held_out = data
    run = Run(out, config, teacher.to(device).eval().requires_grad_(False), train_tokens,
              device, seq_len, log, tokenizer)
    stages: dict[str, Any] = {}

    stage_original(run, source)
    student, stages["distill"] = stage_student(run)
    distilled = None
    if config.student_size:  # its own report row, as distilled (pruning changes it in place)
        distilled = (GPT(student.config), out / STAGE_DIRS["distill"] / WEIGHTS_FILE)
        distilled[0].load_state_dict(student.state_dict())
    student, masks, stages["prune"] = stage_prune(run, student)
    pruned = GPT(student.config)
    pruned.load_state_dict(student.state_dict())
    student, stages["qat"] = stage_qat(run, student, masks)
    int8_dir = stage_export(run, student)

    log("report: measuring original, pruned and int8")
    report = build_report(teacher=run.teacher, pruned=pruned, out=out,
                          original_file=out / "original" / WEIGHTS_FILE,
                          pruned_file=out / STAGE_DIRS["prune"] / WEIGHTS_FILE, int8_dir=int8_dir,
                          config=config, eval_seq_len=seq_len, held_out=held_out, log=log,
                          fp32_onnx=fp32_onnx, dense_config=shape_to_compress(teacher, config),
                          student=distilled,
                          calibration=calibration_batches(run) if config.int8_static else None)
    report.update({"stages": {k: v for k, v in stages.items() if v is not None},
                   "source": source, "config": config.to_dict(),
                   "artifacts": {"int8_dir": str(int8_dir),
                                 "onnx": str(int8_dir / export.ONNX_FILE),
                                 "torch": str(int8_dir / export.TORCH_FILE)}})
    write_json(out / REPORT_FILE, report)
    log(format_table(report))
    return report
