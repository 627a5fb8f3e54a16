"""Which model to serve: resolve a path to a model directory, detect its format, load it.

A path may name
  - a training checkpoint directory (`state.pt` + sha256, from jobs/pretrain.py),
  - an INT8 export directory (`weights.int8.pt` + sha256, from jobs/compress.py; loaded with
    orchestrator.compression.export.load_int8_model, the project's GPT with Int8Linear
    layers, so the KV cache works unchanged), or
  - a run directory: its newest `checkpoint_*` that loads (an unusable newer one is skipped
    with a warning, as training's resume does), or a jobs/compress.py output directory: its
    `int8/` export.
Formats are detected by the files present, never by the name of the directory. A new format
is one more `ModelFormat` entry: a marker file, a loader returning (model, sha256, step,
tokenizer) and a reader of the model's GPTConfig that does not read its weights
(`model_config`). The tokenizer is the run's own (its recorded tokenizer.json; bytes for runs from
before one was recorded).

The version shown to clients is `<run>/<checkpoint>@<sha256 prefix>`: readable, and distinct
for two different files at one path.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from orchestrator.config import TrainConfig
from orchestrator.hf_files import holds_hf_model
from orchestrator.tokenizer import (BYTE_VOCAB, ByteTokenizer, Tokenizer, TokenizerError,
                                    tokenizer_of_run)
from orchestrator.runs import (DEFAULT_RUNS_ROOT, checkpoint_dirs, compress_stage_problem,
                              latest_run_with_checkpoints)
from orchestrator.validation import expand_home
from orchestrator.training.checkpoint import (SHARDED_META_FILE, STATE_FILE, CheckpointError,
                                              checkpoint_header, checkpoint_model_config,
                                              cut_short_problem,
                                              first_that_loads, holds_checkpoint_files,
                                              is_sharded_checkpoint, load_checkpoint,
                                              model_from_state, recorded_sha256,
                                              verify_checksum)

# Kept equal to orchestrator.compression.export.TORCH_FILE (a unit test checks it): detection
# must not import the compression package, which only the INT8 loader needs.
INT8_FILE = "weights.int8.pt"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelFormat:
    """A model format serving can load: its name, the file that identifies it in a directory,
    and the function that loads it."""

    name: str
    marker: str  # the file whose presence identifies the format
    # -> (model, sha256, step, tokenizer)
    load: Callable[[Path, torch.device], tuple[torch.nn.Module, str, int | None, Tokenizer]]
    # -> the loaded model's GPTConfig, read without its weights
    config: Callable[[Path], Any]


def _load_training_checkpoint(directory: Path, device: torch.device
                              ) -> tuple[torch.nn.Module, str, int | None, Tokenizer]:
    state = load_checkpoint(directory)  # verifies the checksum; tensors only
    model, train_config = model_from_state(state, directory)
    return model.to(device), recorded_sha256(directory), state.get("step"), _run_tokenizer(
        directory, train_config.tokenizer_sha256, model)


def _load_int8_export(directory: Path, device: torch.device
                      ) -> tuple[torch.nn.Module, str, int | None, Tokenizer]:
    from orchestrator.compression.export import load_int8_model, recorded_tokenizer_sha256

    model = load_int8_model(directory, device=device)  # verifies the checksum
    sha256 = (directory / (INT8_FILE + ".sha256")).read_text().strip()
    try:
        recorded = recorded_tokenizer_sha256(directory)
    except TokenizerError as e:  # (copied without it: served with bytes, replies garbage)
        raise CheckpointError(f"checkpoint {directory}: {e}") from None
    return model.eval(), sha256, None, _run_tokenizer(directory, recorded, model)


def _run_tokenizer(directory: Path, expected_sha256: str, model: torch.nn.Module) -> Tokenizer:
    """The tokenizer the run recorded (its tokenizer.json beside the checkpoint, checked
    against the checkpoint's sha256); bytes for runs from before tokenizers were recorded.
    CheckpointError when it is missing, altered or does not fit the model."""
    try:
        tokenizer = tokenizer_of_run(directory, expected_sha256)
        vocab = model.config.vocab_size
        if tokenizer.vocab_size > vocab and not (isinstance(tokenizer, ByteTokenizer)
                                                 and vocab == BYTE_VOCAB):
            raise TokenizerError(f"the tokenizer ({tokenizer.name}) has "
                                 f"{tokenizer.vocab_size} tokens, the model {vocab}")
    except TokenizerError as e:  # (a message that names the checkpoint already: once)
        raise CheckpointError(str(e) if str(directory) in str(e)
                              else f"checkpoint {directory}: {e}") from None
    return tokenizer


def _int8_export_config(directory: Path):
    from orchestrator.compression.export import int8_model_config

    return int8_model_config(directory)


FORMATS = (ModelFormat("checkpoint", STATE_FILE, _load_training_checkpoint,
                       checkpoint_model_config),
           ModelFormat("checkpoint", SHARDED_META_FILE, _load_training_checkpoint,
                       checkpoint_model_config),
           ModelFormat("int8", INT8_FILE, _load_int8_export, _int8_export_config))


def format_of(directory: Path) -> ModelFormat | None:
    return next((f for f in FORMATS if (directory / f.marker).is_file()), None)


def model_format(directory: Path) -> ModelFormat:
    """The format of the model in `directory`, a checkpoint named or one of a run's, or
    CheckpointError saying why it holds none: its save was cut short, naming the file it
    never wrote (training's cut_short_problem: a resume, serving, export and compression say
    the same)."""
    fmt = format_of(directory)
    if fmt is None:
        raise CheckpointError(cut_short_problem(directory)
                              or f"checkpoint {directory} holds no model file")
    return fmt


def default_checkpoint(root: Path = DEFAULT_RUNS_ROOT) -> Path:
    """The newest jobs/pretrain.py run (`pretrain-*`) with checkpoints under the runs root
    (what is served when neither the app's args nor the user_config names a checkpoint): a
    job file's run there (a user loop's checkpoints, in a format of its own) was taken and
    refused."""
    run = latest_run_with_checkpoints(root, "pretrain")
    if run is None:
        raise CheckpointError(f"checkpoint: none given and no pretrain-* run with checkpoints under "
                              f"{root.expanduser()} (a run given its own --run-dir name does "
                              "not count); train one with jobs/pretrain.py, or name the run, "
                              "checkpoint or export dir as `checkpoint` in the app's args "
                              "(checkpoint=<dir> after `serve run ...:app`) or in the model "
                              "deployment's user_config")
    return run


# What a caller of model_directories says to do instead of a jobs/compress.py stage folder
# (runs.compress_stage_problem's advice).
SERVE_INSTEAD_OF_STAGE = ("serve the compress output {out} (its int8/ model) or the training "
                          "checkpoint it was compressed from, {source}")


def model_directories(path: str | Path) -> tuple[list[Path], bool]:
    """(directories to try, newest first; whether `path` was a run directory). Every
    checkpoint_* of a run is tried, also one whose save was cut short: model_format names
    what it lacks as the run falls back past it (left out, it was passed over unsaid)."""
    p = expand_home(path, "checkpoint", CheckpointError).resolve()
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    if not p.is_dir():
        raise CheckpointError(f"checkpoint {p} is a file; give the directory that holds it")
    if format_of(p) is not None or holds_checkpoint_files(p):  # (cut short: said on load)
        return [p], False
    inside = checkpoint_dirs(p)
    if inside:
        return inside, True
    if format_of(p / "int8") is not None:  # a jobs/compress.py output directory
        return [p / "int8"], False
    if holds_hf_model(p):
        raise CheckpointError(f"checkpoint {p} is a Hugging Face model (jobs/export.py writes "
                              "those): serve, compress or export the training checkpoint it "
                              "came from, or load it with transformers")
    stage = compress_stage_problem(p, "checkpoint", SERVE_INSTEAD_OF_STAGE)
    if stage:
        raise CheckpointError(stage)
    markers = " or ".join(f"{f.marker} ({f.name})" for f in FORMATS)
    raise CheckpointError(f"checkpoint {p} holds no model: expected {markers}, a run "
                          "directory with checkpoint_* directories inside, or a compress "
                          "output directory with int8/ inside")


def pin_checkpoint(path: str | Path) -> Path:
    """The model directory `path` names, fixed now: a run directory resolves to its newest
    checkpoint whose files are whole (checksums verified; an incomplete or corrupt newer one
    is passed over, as loading does), so that every replica of a deployment serves that one,
    however many checkpoints training writes after. CheckpointError naming the path."""
    candidates, is_run = model_directories(path)
    pinned, skipped = first_that_loads(candidates, is_run, path, _whole)
    for problem in skipped:  # (a deployment loads the directory pinned: said here or never)
        log.warning("run %s: skipped an unusable newer checkpoint: %s", path, problem)
    return pinned


def _whole(directory: Path) -> Path:
    """`directory`, once its files are checked against their recorded checksums, or
    CheckpointError naming the one that is not: a sharded checkpoint's shards and index too
    (their digests are in its meta.pt), so a run falls back past a corrupt shard rather than
    pinning a checkpoint every replica then refuses. Tensors are not loaded."""
    fmt = model_format(directory)
    if is_sharded_checkpoint(directory):
        checkpoint_header(directory)  # meta.pt (small), then every shard's digest
    else:
        verify_checksum(directory / fmt.marker)
    return directory


def resolve_checkpoint(requested: str, run: str = "") -> Path:
    """pin_checkpoint of what a config named, "" being the newest pretrain-* run. `run`: the
    run dir `requested` was pinned from (an app's args naming a run): once training's
    keep_checkpoints rotation has deleted `requested`, that run resolves anew, its newest
    whole checkpoint then, as a run dir named in the user_config does."""
    if run and requested and not Path(requested).exists():
        return pin_checkpoint(run)
    return pin_checkpoint(requested or default_checkpoint())


class PinStore(Protocol):
    """Where a deployment's replicas share their checkpoint pins (ray_layer/serve_model.py: the
    GCS key-value store; a dict in tests): JSON-ready values under string keys."""

    def get(self, key: str) -> Any: ...

    def put(self, key: str, value: Any) -> None: ...

    def put_if_absent(self, key: str, value: Any) -> Any:
        """Store `value` unless `key` holds one already; return what `key` holds now."""


@dataclass(frozen=True)
class CheckpointPin:
    """The model directory a deployment's replicas serve for a checkpoint named in its config.
    `generation` counts the explicit reloads the pin was made for: 1 for the first config a
    deployment applies, one more at each reload to another checkpoint."""

    requested: str  # as the config named it ("" = the newest pretrain-* run)
    directory: str
    generation: int


CURRENT_PIN = "current"  # the pin replicas starting now serve (record_served)
LATEST_PIN = "latest"  # the newest generation pinned (its replicas may still be loading it)


def pin_once(store: PinStore, requested: str, serving: CheckpointPin | None,
             resolve: Callable[[str], Path] = resolve_checkpoint) -> CheckpointPin:
    """The directory every replica of a deployment loads for `requested` until the next
    explicit reload: resolved (a run dir to its newest whole checkpoint) by the first replica
    that asks, read back by the others, also those that start later. Resolved per replica,
    a run dir named in a user_config gave replicas added by autoscaling the newer checkpoints
    training wrote meanwhile.

    `serving`: the pin of the model this replica serves now (None at start-up). Each reload
    to another checkpoint is a generation. A replica takes the newest pin of `requested`
    made after the one it serves (the deployment's current one, at start-up): another
    replica's pin of the reload it is applying, which it joins, also when it starts while
    the reload rolls out or applies it late. With none, `requested` is pinned for the next
    generation, resolved once for all (`put_if_absent`): a reload back to a run dir served
    earlier resolves it afresh. A replica starting where `requested` is already what the
    deployment serves serves that.

    A pinned directory deleted since (training's keep_checkpoints rotation removes a run's
    older checkpoints while it trains on) is pinned again, as the next generation: every
    replica starting later failed on it ("does not exist")."""
    current = _pin_of(store.get(CURRENT_PIN))
    since = serving.generation if serving else current.generation if current else 0
    newest = max(since, current.generation if current else 0, _generation(store.get(LATEST_PIN)))
    pinned = _pinned(store, requested, serving, current, since, newest)
    if pinned is not None and Path(pinned.directory).is_dir():
        return pinned
    generation = newest + 1
    key = _pin_key(generation, requested)
    # Looked up before resolving (reading, and checksumming, the checkpoint: seconds on a big
    # one): a replica that pinned this generation meanwhile, whose LATEST_PIN write lags or
    # was overwritten by a racing lower one, is joined at no cost. Replicas asking at the
    # same moment each resolve; the first put wins and the others take its directory.
    directory = store.get(key) or store.put_if_absent(key, str(resolve(requested)))
    if _generation(store.get(LATEST_PIN)) < generation:  # (a race only narrows a search)
        store.put(LATEST_PIN, generation)
    if pinned is not None:
        log.warning("checkpoint %s, pinned for %r, was deleted (training's keep_checkpoints "
                    "rotation, or by hand): %s is pinned instead, for the replicas starting "
                    "from now", pinned.directory, requested, directory)
    return CheckpointPin(requested, directory, generation)


def superseding_pin(store: PinStore, serving: CheckpointPin) -> CheckpointPin | None:
    """The deployment's current pin where it replaced the one this replica serves: made by a
    later reload for the same checkpoint named, to another directory. A replica that refused
    a reload kept its config's checkpoint, so reverting the config was no change to it while
    the others pinned the run's newest checkpoint afresh: replicas served two checkpoints."""
    current = _pin_of(store.get(CURRENT_PIN))
    if (current is not None and current.requested == serving.requested
            and current.generation > serving.generation
            and current.directory != serving.directory):
        return current
    return None


def _pinned(store: PinStore, requested: str, serving: CheckpointPin | None,
            current: CheckpointPin | None, since: int, newest: int) -> CheckpointPin | None:
    """The pin of `requested` pin_once takes, if one was made: the newest made after
    `since` that no replica refused (or one served), else the deployment's current one at
    start-up. A refused pin was taken again by every retry of its reload, and by replicas
    starting with it, even after training wrote a good checkpoint: it is resolved afresh."""
    for generation in range(newest, since, -1):
        key = _pin_key(generation, requested)
        directory = store.get(key)
        if directory and not (store.get(REFUSED + key) and not store.get(SERVED + key)):
            return CheckpointPin(requested, directory, generation)
    if serving is None and current is not None and current.requested == requested:
        return current
    return None


def _pin_key(generation: int, requested: str) -> str:
    return f"{generation}/{hashlib.sha256(requested.encode()).hexdigest()[:16]}"


def _generation(saved: Any) -> int:
    return saved if isinstance(saved, int) and not isinstance(saved, bool) else 0


REFUSED, SERVED = "refused/", "served/"  # before a pin's key: a replica refused, served it


def record_refused(store: PinStore, pin: CheckpointPin) -> None:
    """A pin's checkpoint did not load here for a fault of its own (CheckpointError: corrupt,
    diverged, gone), as it will not on any replica: unless a replica serves it, the next
    pin_once of its checkpoint resolves it afresh. Never for one replica's own failure (out
    of memory): the others may still be loading the pin, and a replica starting meanwhile
    would pin a newer checkpoint than theirs."""
    store.put(REFUSED + _pin_key(pin.generation, pin.requested), True)


def record_served(store: PinStore, pin: CheckpointPin) -> None:
    """Once a pin's model has loaded (never before: a refused reload must not become what
    replicas starting later serve): replicas starting from now serve it. A pin of an older
    generation, recorded late, does not overwrite a newer one."""
    store.put(SERVED + _pin_key(pin.generation, pin.requested), True)
    current = _pin_of(store.get(CURRENT_PIN))
    if current is None or current.generation <= pin.generation:
        store.put(CURRENT_PIN, dataclasses.asdict(pin))


def _pin_of(saved: Any) -> CheckpointPin | None:
    try:
        return CheckpointPin(str(saved["requested"]), str(saved["directory"]),
                             int(saved["generation"]))
    except (TypeError, KeyError, ValueError):  # nothing saved, or not a pin: none
        return None


@dataclass
class LoadedModel:
    """A model loaded for serving, with what /v1/models and /health report about it (version,
    files, checksum, step, size, load time, warnings)."""

    model: torch.nn.Module
    block_size: int
    version: str
    path: str  # the directory loaded
    requested: str  # the path asked for (a run directory resolves to one of its checkpoints)
    format: str
    sha256: str
    step: int | None
    params: int
    loaded_at: float
    load_seconds: float
    warnings: list[str] = field(default_factory=list)
    # How the model's token ids map to text; the run's own tokenizer where it recorded one.
    tokenizer: Tokenizer = field(default_factory=ByteTokenizer)

    def info(self) -> dict[str, Any]:
        """JSON-ready description for GET /v1/models and the logs."""
        return {"version": self.version, "checkpoint": self.path, "requested": self.requested,
                "format": self.format, "sha256": self.sha256, "step": self.step,
                "params": self.params, "context_length": self.block_size,
                "loaded_at": self.loaded_at, "load_seconds": round(self.load_seconds, 3),
                "warnings": list(self.warnings)}


def version_of(directory: Path, sha256: str) -> str:
    return f"{directory.parent.name}/{directory.name}@{sha256[:8]}"


def load_model(path: str | Path, device: torch.device | str = "cpu", *,
               probe: bool = False) -> LoadedModel:
    """Load the model `path` names, or raise CheckpointError saying why not. `probe`: also
    run one forward pass and refuse weights whose logits are not finite (a diverged run):
    a run directory falls back to its previous checkpoint, a named checkpoint is refused."""
    started = time.perf_counter()
    device = torch.device(device)
    candidates, is_run = model_directories(path)

    def load(directory: Path):
        fmt = model_format(directory)
        model, sha256, step, tokenizer = fmt.load(directory, device)
        if probe:
            problem = loaded_model_problem(model, version_of(directory, sha256), device)
            if problem:
                raise CheckpointError(problem)
        return directory, fmt, model, sha256, step, tokenizer

    (directory, fmt, model, sha256, step, tokenizer), skipped = first_that_loads(
        candidates, is_run, path, load)
    return LoadedModel(
        model=model, block_size=int(model.config.block_size),
        version=version_of(directory, sha256), path=str(directory), requested=str(path),
        format=fmt.name, sha256=sha256, step=step,
        params=parameter_count(model), loaded_at=time.time(),
        load_seconds=time.perf_counter() - started,
        warnings=[f"skipped an unusable newer checkpoint: {p}" for p in skipped],
        tokenizer=tokenizer)


def model_config(path: str | Path):
    """The GPTConfig (context `block_size`, shape, vocabulary) of the model load_model(`path`)
    would load, read without loading its weights: a training checkpoint's pickle of config
    and tensor shapes (state.pt memory-mapped, its tensors never read) or a sharded one's
    meta.pt and index, an int8 export's config.json. A run directory gives its newest
    checkpoint that reads so (checksums are not verified here: no file is hashed; the load
    that follows verifies them). CheckpointError, as load_model's, when `path` holds no
    model."""
    candidates, is_run = model_directories(path)
    config, _ = first_that_loads(candidates, is_run, path,
                                 lambda directory: model_format(directory).config(directory))
    return config


def parameter_count(model: torch.nn.Module) -> int:
    """The model's weights: its parameters, and an int8 export's quantized matrices and their
    biases, which are buffers (counting parameters alone left them out)."""
    return sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for name, b in model.named_buffers()
        if name.endswith((".weight_int8", ".bias")))


def load_for_serving(path: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """load_model with its forward-pass probe: weights that give non-finite logits never take
    traffic, and the allocations are warmed up before the model does (the replica's copy and
    the engine process's load the same way)."""
    return load_model(path, device, probe=True)


def forward_problem(loaded: LoadedModel, device: torch.device | str = "cpu") -> str | None:
    """A one-token forward pass (the health checks' probe): None when its logits are finite,
    else what is wrong."""
    return _forward_problem(loaded.model, loaded.version, device)


def non_finite_weights(model: torch.nn.Module, version: str) -> str | None:
    """What is wrong when a floating-point weight (parameter or buffer: an int8 export's
    scales) is NaN or infinite, else None. The one-token probe reads position 0 only: NaN in
    a later position's embedding gave finite logits there, and the model was served, decoding
    NaN logits (token 0 over and over) once a request reached that position."""
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        if tensor.is_floating_point() and not _all_finite(tensor.detach()):
            bad = int((~torch.isfinite(tensor.detach())).sum())
            return (f"model {version} has non-finite weights ({bad} of {tensor.numel()} "
                    f"values of {name} are NaN or infinite)")
    return None


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value of `tensor` is finite. Its sum first: NaN or inf anywhere makes
    the sum non-finite, so a finite sum settles it without a bool mask the size of the
    tensor (the mask per weight, run at every load, took 1-4 s per 85M fp32 parameters on a
    2-core CPU, the sums 0.1-0.25 s); a sum that is not finite (finite values summing past
    float32's range, or a NaN or inf) is settled value by value."""
    return bool(torch.isfinite(tensor.sum(dtype=torch.float32))) \
        or bool(torch.isfinite(tensor).all())


def loaded_model_problem(model: torch.nn.Module, version: str,
                         device: torch.device | str) -> str | None:
    """What makes a model just loaded unfit to serve, export or compress, else None: a
    non-finite weight, then non-finite one-token logits. (A replica's health check runs the
    one-token probe only, `forward_problem`: the weights scan, one sum per weight, costs
    0.1-0.25 s per 85M fp32 parameters on a 2-core CPU, once per load.)"""
    return non_finite_weights(model, version) or _forward_problem(model, version, device)


def _forward_problem(model, version: str, device: torch.device | str) -> str | None:
    with torch.inference_mode():
        logits, _ = model(torch.zeros((1, 1), dtype=torch.long, device=device))
    if not bool(torch.isfinite(logits).all()):
        return f"model {version} produced non-finite logits"
    return None


def save_untrained_checkpoint(directory: str | Path, model_size: str = "tiny",
                              seq_len: int = 64, seed: int = 0, step: int = 0) -> Path:
    """A freshly initialised GPT written in the training checkpoint format (weights, config,
    step): a servable model in milliseconds, for tests and benchmarks. Real runs come from
    jobs/pretrain.py; both load through the same `load_model`."""
    from orchestrator.training.checkpoint import save_checkpoint
    from orchestrator.training.model import GPT, GPTConfig

    config = TrainConfig(model_size=model_size, seq_len=seq_len)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = GPT(GPTConfig.from_train_config(config))
    finally:
        torch.random.set_rng_state(generator_state)
    save_checkpoint(directory, {"model": model.state_dict(), "config": config.to_dict(),
                                "step": step})
    return Path(directory)
