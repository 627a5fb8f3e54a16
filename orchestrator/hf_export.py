"""Our GPT <-> Hugging Face GPT-2 (`GPT2LMHeadModel`), both ways.

The model is GPT-2-shaped (learned positions, pre-norm blocks, fused qkv, 4x MLP, final
LayerNorm, head tied to the token embedding), so the export is a renaming plus a transpose:
GPT-2 stores its linear layers as Conv1D, weight (in, out), where torch's Linear is (out, in).
Two things differ and are mapped, not assumed:
  - activation: ours is the exact (erf) GELU; GPT-2's default `gelu_new` is the tanh
    approximation. The export writes `activation_function: "gelu"` (transformers' exact GELU);
  - end-of-text: the run's tokenizer's, written as bos/eos in config.json and
    generation_config.json, and by its own name in the tokenizer files.
Refused, with the reason: a structurally pruned model (layers of different widths: GPT-2 has
one width), and a learnable attention span that does not cover the whole context (GPT-2 has
no span; a span that covers it is an exact no-op and is dropped).

The other way, for `--init-from`, is orchestrator.hf_import's `load_hf_weights`: a
GPT-2-shaped Hugging Face model directory (config.json + model.safetensors) becomes the
starting weights of a run; this module checks such a directory before the run starts (a
config.json whose attention ours cannot compute, ATTENTION_SETTINGS, is refused).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.config import MODEL_PRESETS
from orchestrator.file_lock import created_locked, flock_held, process_alive
from orchestrator.hf_files import CONFIG_FILE, SAFETENSORS_FILE, ExportError
from orchestrator.hf_import import (BLOCK_NAMES, FLOAT_DTYPES, NOT_FLOAT, TOP_NAMES, check_tied,
                                    hf_name, weight_files)
from orchestrator.tokenizer import (TOKENIZER_FILE, Tokenizer, TokenizerError,
                                    tokenizer_for_model, tokenizer_of_run)
from orchestrator.validation import expand_home, is_number

if TYPE_CHECKING:  # annotations only: torch is imported where tensors are made
    import torch

# Every file an export writes: in an --out without config.json, not ours to overwrite.
EXPORT_FILES = (SAFETENSORS_FILE, "generation_config.json", TOKENIZER_FILE,
                "tokenizer_config.json", "special_tokens_map.json", CONFIG_FILE)
# In --out while an export replaces its files (written before the earlier config.json is
# removed, removed after the new one is in place): a --out without config.json holding it is
# an unfinished export of ours, which the next export may replace.
UNFINISHED_MARKER = ".unfinished-export"  # (not STAGING_PREFIX's: not a staging dir)
# In every config.json the export writes: an --out holding a GPT-2 model without it (one
# downloaded elsewhere) is not ours to replace.
EXPORTED_BY = "hetero-orchestrator jobs/export.py"
# Also in that config.json: the sha256 of the model.safetensors written beside it. transformers
# keeps unknown config keys, so a model fine-tuned from an export and saved back (or elsewhere)
# still says exported_by; its weights no longer match this, and it is not ours to replace.
WEIGHTS_SHA256_KEY = "exported_weights_sha256"
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, what our blocks use
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
# GPT-2 settings that change what attention computes, with the value our model's math has
# (transformers' default) and what ours does: a model with another value is refused on
# import, since its weights would load and its logits differ. (reorder_and_upcast_attn is
# not here: it computes the same scores in fp32, in another order.)
ATTENTION_SETTINGS = {
    "scale_attn_weights": (True, "ours divides the attention scores by sqrt(head_dim)"),
    "scale_attn_by_inverse_layer_idx": (False, "ours does not divide the attention scores by "
                                               "the layer index + 1"),
}


def check_exportable(model, source: str | None = None) -> None:
    """ExportError saying why `model` (read from `source`, named when given) cannot be
    written as a GPT-2 (export_refusal)."""
    refusal = export_refusal(model)
    if refusal:
        raise ExportError(f"{source + ': ' if source else ''}cannot export as GPT-2: {refusal}")


def export_refusal(model) -> str | None:
    """Why `model` cannot be written as a GPT-2, or None when it can."""
    config = model.config
    pruning = pruning_refusal(config)
    if pruning:
        return pruning
    if config.attention_span:
        # m(x) = 1 for every distance x <= z: a span of at least block_size - 1 in every head
        # is exactly standard causal attention.
        shortest = min(float(s.spans().detach().min()) for s in model.spans())
        if shortest < config.block_size - 1:
            return (f"the model was trained with the learnable attention span and its "
                    f"shortest span ({shortest:.1f} tokens) does not cover the context "
                    f"({config.block_size} tokens); GPT-2 has no span, so its attention "
                    "would differ")
    return None


def pruning_refusal(config) -> str | None:
    """Why a structurally pruned model of this GPTConfig has no GPT-2 form (pruned heads, MLP
    widths that differ between layers), or None."""
    heads = getattr(config, "n_heads_per_layer", None)
    if heads is not None and any(h != config.n_head for h in heads):
        return (f"the model is structurally pruned: its attention heads are "
                f"(n_heads_per_layer={heads} of n_head {config.n_head}); GPT2LMHeadModel's "
                "attention has n_head heads, n_embd wide together, in every layer")
    widths = set(getattr(config, "mlp_hidden", None) or ())
    if len(widths) > 1:
        return (f"the model is structurally pruned: its MLP widths differ between layers "
                f"(mlp_hidden={config.mlp_hidden}); GPT2LMHeadModel has one MLP width "
                "(n_inner) for every layer")
    return None


def hf_state_dict(model) -> dict[str, "torch.Tensor"]:
    """Our weights under GPT-2's names and layouts (contiguous copies; no tied duplicate:
    transformers ties lm_head to wte on load)."""
    state = model.state_dict()
    out = {hf: state[ours] for ours, hf in TOP_NAMES.items()}
    for i in range(config_layers(model)):
        for ours, (hf, transpose) in BLOCK_NAMES.items():
            tensor = state[f"blocks.{i}.{ours}"]
            out[f"transformer.h.{i}.{hf}"] = tensor.t() if transpose else tensor
    return {name: t.detach().float().contiguous().clone() for name, t in out.items()}


def config_layers(model) -> int:
    return len(model.blocks)


def hf_config(model, tokenizer: Tokenizer | None, weights_sha256: str) -> dict[str, Any]:
    """The model's config.json; `weights_sha256`: that of the model.safetensors beside it."""
    c = model.config
    eos = tokenizer.eos_id if tokenizer is not None else None
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": c.vocab_size, "n_positions": c.block_size, "n_ctx": c.block_size,
        "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head,
        # null: 4 x n_embd; an MLP pruned to one width in every layer: that width
        # (export_refusal refuses unequal ones).
        "n_inner": mlp_width if (mlp_width := c.layer_mlp_hidden(0)) != 4 * c.n_embd else None,
        # Ours is the exact GELU; GPT-2's default ("gelu_new") is the tanh approximation.
        "activation_function": "gelu",
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "layer_norm_epsilon": LAYER_NORM_EPS, "initializer_range": 0.02,
        "scale_attn_weights": True, "use_cache": True, "tie_word_embeddings": True,
        "bos_token_id": eos, "eos_token_id": eos, "torch_dtype": "float32",
        "exported_by": EXPORTED_BY, WEIGHTS_SHA256_KEY: weights_sha256,
    }


def output_refusal(out: Path) -> str | None:
    """Why `out` must not receive an export: it cannot be a directory (a file, or a path
    under one), or it holds a training run or checkpoint, whose config.json and
    tokenizer.json the export would overwrite (a resume reads them), or it is in a run's
    checkpoint_* folder (checkpoint retention deletes it whole), or a compression's
    output (serving reads its int8/ model's tokenizer.json from there when int8/ has none)
    or one of its stage folders (then read as a Hugging Face model)
    or an INT8 export itself, or a model not exported here. An earlier export there is replaced."""
    from orchestrator.compression.artifacts import file_in_the_way
    from orchestrator.runs import COMPRESS_CONFIG_FILE
    from orchestrator.serving.loading import INT8_FILE, format_of
    from orchestrator.training.checkpoint import SHARDED_META_FILE, STATE_FILE

    blocker = file_in_the_way(out)
    if blocker is not None:
        return ("it is a file, not a directory" if blocker == out else
                f"{blocker} is a file, so no directory can be made under it")
    if out.is_dir() and (any(out.glob("checkpoint_*")) or any(
            (out / f).exists() for f in (STATE_FILE, SHARDED_META_FILE))):
        return "it holds a training run or checkpoint, which the export would overwrite"
    inside = _runs_checkpoint_around(out)
    if inside is not None:
        run = inside.parent
        return (f"it is {'' if inside == out.resolve() else 'in '}{inside}, a checkpoint "
                f"folder of the run {run}, which the run's checkpoint retention deletes whole "
                f"(and a resume takes for a checkpoint); give a path beside the run, e.g. "
                f"{run.parent / (run.name + '-hf')}")
    stage = _compress_stage_around(out)
    if stage is not None:
        compressed, itself = stage.parent, stage == out.resolve()
        why = ("serving and jobs/export.py would then take it for a Hugging Face model, and "
               if itself else "")
        return (f"it is {'' if itself else 'in '}{stage}, a jobs/compress.py stage folder: "
                f"{why}a compress rerun that finds the stage unusable moves it away whole; "
                f"give a path beside the compress output, e.g. "
                f"{compressed.parent / f'{compressed.name}-{stage.name}-hf'}")
    if not out.is_dir():
        return None
    # Serving reads the tokenizer of an int8/ without one from beside it (tokenizer_of_run).
    if (out / COMPRESS_CONFIG_FILE).exists():
        return (f"it holds a jobs/compress.py --out ({COMPRESS_CONFIG_FILE}), whose int8/ "
                f"export would be served with the {TOKENIZER_FILE} written beside it")
    if format_of(out) is not None:  # (a training checkpoint's was refused above)
        return (f"it is an INT8 export ({INT8_FILE}), whose config.json and any "
                f"{TOKENIZER_FILE} the export would overwrite")
    inside = format_of(out / "int8")  # what model_directories takes for a compress output
    if inside is not None:
        what = (f"an INT8 export (int8/{INT8_FILE})" if inside.marker == INT8_FILE
                else f"a model in int8/ ({inside.marker})")
        return f"it holds {what}, which would be served with the {TOKENIZER_FILE} written beside it"
    try:
        config = json.loads((out / CONFIG_FILE).read_text())
    except FileNotFoundError:
        return _unowned_files_refusal(out)
    except OSError as e:
        return f"its config.json cannot be read ({e}), so whose files are there is unknown"
    except ValueError as e:
        return f"it has a config.json that is not a Hugging Face model's (not JSON: {e})"
    if not isinstance(config, dict) or config.get("model_type") != "gpt2":
        return "it has a config.json that is not a GPT-2 model's (a run's own?)"
    if config.get("exported_by") != EXPORTED_BY:
        return ("it holds a Hugging Face model that jobs/export.py did not write (its "
                "config.json has no exported_by), which the export would overwrite")
    return _changed_weights_refusal(out, config.get(WEIGHTS_SHA256_KEY))


def _runs_checkpoint_around(out: Path) -> Path | None:
    """The checkpoint_* folder of a run directory (one with a metrics log or a checkpoint)
    that `out` is or is inside, else None: training's retention (session.py, Ray Train's)
    deletes such a folder whole, an export in it with it."""
    from orchestrator.runs import CHECKPOINT_PREFIX, METRICS_LOG, checkpoint_dirs
    from orchestrator.training.checkpoint import SHARDED_META_FILE, STATE_FILE

    def is_run(directory: Path) -> bool:
        return (directory / METRICS_LOG).exists() or any(
            (c / f).exists() for c in checkpoint_dirs(directory)
            for f in (STATE_FILE, SHARDED_META_FILE))

    try:
        resolved = out.resolve()
        return next((folder for folder in (resolved, *resolved.parents)
                     if folder.name.startswith(CHECKPOINT_PREFIX) and is_run(folder.parent)),
                    None)
    except OSError:  # (no permission to look: check_output's other checks say so)
        return None


def _compress_stage_around(out: Path) -> Path | None:
    """The jobs/compress.py stage folder (pruned/, qat/, ...) that `out` is or is inside,
    else None."""
    from orchestrator.runs import compress_stage

    try:
        resolved = out.resolve()
        return next((folder for folder in (resolved, *resolved.parents)
                     if compress_stage(folder) is not None), None)
    except OSError:  # (no permission to look: check_output's other checks say so)
        return None


def export_dir(out_dir: str | os.PathLike) -> Path:
    """The directory `--out` / `out_dir` names: a `~` the shell left alone (`--out=~/x`, a
    job spec, a library call) is the home directory, not a folder named "~"; a `~user` of
    no user is an ExportError naming --out."""
    return expand_home(out_dir, "--out", ExportError)


def _changed_weights_refusal(out: Path, recorded: Any) -> str | None:
    """Why the model in `out`, whose config.json says we exported it, is no longer ours to
    replace: its weights are not the ones that export wrote (fine-tuned and saved back, or
    re-saved in shards), or it predates the recorded checksum. None when they are."""
    if not isinstance(recorded, str) or not recorded:
        return (f"its config.json records no {WEIGHTS_SHA256_KEY} (an export from before "
                "2026-12-06), so whether its weights changed since cannot be told; remove it "
                "first if it may be replaced")
    from orchestrator.training.checkpoint import sha256_file

    weights = out / SAFETENSORS_FILE
    try:
        digest = sha256_file(weights)
    except FileNotFoundError:
        return (f"it holds a model whose {SAFETENSORS_FILE} is gone (saved again in shards, "
                "or removed), which the export would overwrite")
    except OSError as e:
        return f"its {SAFETENSORS_FILE} cannot be read ({e}), so whose weights are there is unknown"
    if digest != recorded:
        return (f"its {SAFETENSORS_FILE} is not the one jobs/export.py wrote (sha256 "
                f"{digest[:12]}..., recorded {recorded[:12]}...): a model changed since, "
                "fine-tuned and saved back?, which the export would overwrite")
    return None


def _unowned_files_refusal(out: Path) -> str | None:
    """Why files named as the export's, in an `out` without config.json, are not ours to
    replace (a user's tokenizer_config.json), or None when there are none or an unfinished
    export of ours left them."""
    if (out / UNFINISHED_MARKER).exists():
        return None
    taken = [name for name in EXPORT_FILES if (out / name).exists()]
    if not taken:
        return None
    return (f"it has no config.json, yet holds {', '.join(taken)}, which the export would "
            "overwrite (not an earlier export's: those have a config.json)")


def has_export(out: Path) -> bool:
    """Whether `out` holds a whole export (past check_output, a config.json is ours)."""
    try:
        return (out / CONFIG_FILE).is_file()
    except OSError:  # no permission to look: check_output says so
        return False


def check_output(out: Path) -> None:
    """ExportError naming --out when `out` must not receive an export (output_refusal)."""
    refusal = output_refusal(out)
    if refusal:
        raise ExportError(f"--out {out}: {refusal}; give another directory")


def export_gpt2(model, tokenizer: Tokenizer, out_dir: str | os.PathLike) -> list[Path]:
    """Write `model` and `tokenizer` as a Hugging Face GPT-2 directory (model.safetensors,
    config.json, generation_config.json, tokenizer.json, tokenizer_config.json,
    special_tokens_map.json). Files are written in a staging directory, then renamed. The
    tokenizer shipped is tokenizer_for_model's (an old 256-id byte model's bytes without
    end-of-text); one of another vocabulary than the model's is an ExportError."""
    check_exportable(model)
    try:
        tokenizer = tokenizer_for_model(tokenizer, model.config.vocab_size)
    except TokenizerError as e:
        raise ExportError(str(e)) from None
    out = export_dir(out_dir)
    check_output(out)
    return _write_export(model, tokenizer, out)


def _write_export(model, tokenizer: Tokenizer, out: Path) -> list[Path]:
    """export_gpt2 once `out` is checked (check_output: it hashes an earlier export's
    weights, which export_checkpoint has done already, before reading the checkpoint)."""
    out.mkdir(parents=True, exist_ok=True)
    # Every file is written in a staging directory first: a full disk or an interrupt while
    # writing leaves the earlier export whole (it used to leave a new model beside the old
    # tokenizer, a pair transformers loads without a word). Only renames happen in `out`.
    _remove_stale_staging(out)
    staging = out / f"{STAGING_PREFIX}{_staging_owner()}"
    staging.mkdir()
    try:
        # The marker's flock held while exporting: another export's sweep leaves this one
        # alone even where our pid means nothing to it (a container sharing this host's name)
        with created_locked(staging / STAGING_MARKER):
            names = _write_hf_files(model, tokenizer, staging)
            _move_into_place(staging, names, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [out / name for name in names]


def _move_into_place(staging: Path, names: list[str], out: Path) -> None:
    """Rename the files written in `staging` into `out`, replacing an earlier export, so that
    no moment leaves a loadable mix of the two (an interrupt between two renames left the new
    weights beside the old config and tokenizer): the old config.json goes first and the new
    one comes last, and the marker says meanwhile that the files are ours."""
    (out / UNFINISHED_MARKER).write_text("an export into this directory did not finish: "
                                         "run jobs/export.py again\n")
    (out / CONFIG_FILE).unlink(missing_ok=True)
    for name in sorted(names, key=lambda n: n == CONFIG_FILE):  # config.json last
        os.replace(staging / name, out / name)
    (out / UNFINISHED_MARKER).unlink(missing_ok=True)  # (a concurrent export's may be gone)


STAGING_PREFIX = ".export-"  # + the exporting host and process: "<host>-<pid>"
# Inside every staging directory: only a directory holding it is ever removed as a dead
# export's (a user's own `.export-settings` in --out is not ours).
STAGING_MARKER = ".export-staging"
# Another machine's staging directory (--out on shared storage) is only removed once this
# old: whether its process still runs cannot be asked from here.
FOREIGN_STAGING_AGE_S = 24 * 3600.0


def _staging_owner() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _remove_stale_staging(out: Path) -> None:
    """Staging directories of exports that died (kill -9) hold a whole model each: removed,
    unless their process may still be writing (an export into the same --out at the same
    time: on this host while it holds its marker's flock, or where there is no flock while
    its pid runs; on another host until a day has passed)."""
    host = socket.gethostname()
    for staging in out.glob(f"{STAGING_PREFIX}*"):
        owner_host, _, pid = staging.name[len(STAGING_PREFIX):].rpartition("-")
        if not (owner_host and pid.isdigit() and (staging / STAGING_MARKER).is_file()):
            continue  # not a staging directory of ours
        if owner_host == host:
            if _export_running(staging / STAGING_MARKER, int(pid)):
                continue
        else:
            try:
                if time.time() - staging.stat().st_mtime < FOREIGN_STAGING_AGE_S:
                    continue
            except OSError:
                continue
        shutil.rmtree(staging, ignore_errors=True)


def _export_running(marker: Path, pid: int) -> bool:
    """Whether the export on this host that made staging `marker` still writes: its flock
    held; where the filesystem has none, its pid alive (ours is not: a staging directory of
    this process is left from an earlier export that failed)."""
    try:
        with open(marker, "rb") as f:
            held = flock_held(f)
    except OSError:
        return True  # (cannot be asked: left alone)
    return held if held is not None else pid != os.getpid() and process_alive(pid)


def _write_hf_files(model, tokenizer: Tokenizer, directory: Path) -> list[str]:
    """The Hugging Face files of `model` and `tokenizer`, written in `directory`."""
    from safetensors.torch import save_file

    from orchestrator.training.checkpoint import sha256_file

    eos = tokenizer.eos_id
    text = lambda obj: json.dumps(obj, indent=2) + "\n"  # noqa: E731
    weights = directory / SAFETENSORS_FILE
    save_file(hf_state_dict(model), str(weights), metadata={"format": "pt"})
    # safetensors creates the file 0600: a serving process of another user could not read
    # the weights it can read the config beside. The mode every other file gets:
    os.chmod(weights, 0o666 & ~_umask())
    # The token's own spelling: transformers adds a name missing from the vocabulary as a new
    # token, past the embedding, whose id then disagrees with config.json's eos_token_id.
    token = tokenizer.eos_token
    special = {"eos_token": token, "bos_token": token} if eos is not None else {}
    # transformers matches a special token's spelling in a text as the token; ours may read it
    # as text (the byte tokenizer: bytes never spell end-of-text), as training and serving
    # encoded it: then transformers must too, or a text holding it gets a document boundary.
    as_text = {"split_special_tokens": True} if eos is not None and \
        tokenizer.encode(token) != [eos] else {}
    files = {
        CONFIG_FILE: text(hf_config(model, tokenizer, sha256_file(weights))),
        # max_length: the context, which generation must not outrun (the text-generation
        # pipeline's default of 256 new tokens indexed past a 128-position model's table)
        "generation_config.json": text({"bos_token_id": eos, "eos_token_id": eos,
                                        "max_length": model.config.block_size}),
        TOKENIZER_FILE: exported_tokenizer_json(tokenizer),
        "tokenizer_config.json": text({"tokenizer_class": "PreTrainedTokenizerFast",
                                       "model_max_length": model.config.block_size,
                                       "clean_up_tokenization_spaces": False, **special,
                                       **as_text}),
        "special_tokens_map.json": text(special),
    }
    for name, content in files.items():
        (directory / name).write_text(content, encoding="utf-8")
    return [SAFETENSORS_FILE, *files]


def exported_tokenizer_json(tokenizer: Tokenizer) -> str:
    """The tokenizer.json to ship: the run's, without what training never applied (its
    post-processor's added tokens, its truncation and padding: HFTokenizer). Kept, transformers
    applies them: a Llama-style template put a BOS before every prompt the model never saw
    one before, so its outputs differed from training's and from our serving's."""
    text = tokenizer.to_json()
    data = json.loads(text)
    kept = {"post_processor": _offsets_only(data.get("post_processor")),
            "truncation": None, "padding": None}
    if all(data.get(key) == value for key, value in kept.items()):
        return text  # as it is: the byte tokenizer's file stays byte-for-byte ours
    return json.dumps({**data, **kept}, ensure_ascii=False)


def _offsets_only(processor: dict | None) -> dict | None:
    """The parts of a tokenizer.json post-processor that add no tokens (ByteLevel's: offsets
    only), or None."""
    if not processor:
        return None
    if processor.get("type") == "ByteLevel":
        return processor
    if processor.get("type") == "Sequence":
        kept = [p for p in map(_offsets_only, processor.get("processors") or ()) if p]
        return {**processor, "processors": kept} if kept else None
    return None


def _umask() -> int:
    """The process's umask (reading it means setting it: set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def export_checkpoint(path: str | os.PathLike, out_dir: str | os.PathLike
                      ) -> tuple[list[Path], dict[str, Any]]:
    """Export the model `path` names with its tokenizer: a training checkpoint (a checkpoint
    directory, or a run directory: its newest usable checkpoint) with the run's, or a
    jobs/compress.py stage folder (pruned/, qat/, ...: export_stage) with the teacher's.
    Returns (files, what was exported: "skipped" holds why each newer checkpoint of a run was
    not; "stage" the compress stage, None for a checkpoint). ExportError / CheckpointError /
    TokenizerError say why not."""
    from orchestrator.runs import compress_stage
    from orchestrator.serving.loading import model_directories
    from orchestrator.training.checkpoint import CheckpointError, first_that_loads

    out = export_dir(out_dir)
    check_output(out)  # before the checkpoint is read: that can take a while
    given = expand_home(path, "checkpoint", CheckpointError).resolve()
    if given.is_dir() and compress_stage(given) is not None:
        directory, (model, tokenizer, stage) = given, export_stage(given)
        info: dict[str, Any] = {"step": None, "skipped": []}
    else:
        candidates, is_run = model_directories(path)
        (directory, state, model, train_config), skipped = first_that_loads(
            candidates, is_run, path, _load_exportable)
        check_exportable(model, str(directory))
        stage, info = None, {"step": state.get("step"), "skipped": skipped}
    try:
        if stage is None:
            tokenizer = tokenizer_of_run(directory, train_config.tokenizer_sha256)
        tokenizer = tokenizer_for_model(tokenizer, model.config.vocab_size)
    except (TokenizerError, OSError) as e:
        # (some of its messages name the checkpoint already)
        raise ExportError(str(e) if str(directory) in str(e) else f"{directory}: {e}") from None
    files = _write_export(model, tokenizer, out)  # (--out checked above)
    return files, {"checkpoint": str(directory), "stage": stage, **info,
                   "vocab_size": model.config.vocab_size, "tokenizer": tokenizer.name,
                   "params": sum(p.numel() for p in model.parameters())}


# Appended to the refusal of a compress stage whose pruning left no GPT-2 form.
ONE_WIDTH_PRUNING = ("; jobs/compress.py --prune-structure channels --prune-scope per_layer "
                     "prunes every layer's MLP to one width, which exports")


def export_stage(directory: Path) -> tuple[Any, Tokenizer, str]:
    """(fp32 model, the teacher's tokenizer, stage name) of a jobs/compress.py stage folder
    that has GPT-2's form (compression.pipeline.exportable_stage: qat/ as int8/ holds its
    weights). ExportError naming the folder when it has none (pruned heads, MLP widths that
    differ), with the pruning that would; CheckpointError when it cannot be read or its
    logits are not finite."""
    from orchestrator.compression.pipeline import exportable_stage

    model, tokenizer, stage = exportable_stage(directory)
    try:
        check_exportable(model, str(directory))
    except ExportError as e:  # (the hint only where the pruning is what GPT-2 cannot hold)
        hint = ONE_WIDTH_PRUNING if pruning_refusal(model.config) else ""
        raise ExportError(f"{e}{hint}") from None
    _refuse_diverged(model, directory)
    return model, tokenizer, stage


def _load_exportable(directory: Path):
    """(directory, state, model, train_config) of one training checkpoint, as
    newest_usable_checkpoint reads it, or CheckpointError when it cannot be read (no
    permission: the checkpoint's problem, not --out's) or its logits are not finite (a
    diverged run: transformers would give NaN too). Serving's forward probe decides, so a run
    directory falls back to the checkpoint serving would load."""
    from orchestrator.training.checkpoint import CheckpointError, newest_usable_checkpoint

    try:
        found = newest_usable_checkpoint([directory], False, directory,
                                         check=_training_checkpoint_only)
    except OSError as e:
        raise CheckpointError(f"checkpoint {directory} cannot be read: {e}") from None
    _refuse_diverged(found[2], directory)
    return found


def _refuse_diverged(model, directory: Path) -> None:
    """CheckpointError where `model`'s weights or logits are not finite (serving's load probe
    decides): transformers would give NaN too."""
    from orchestrator.serving.loading import loaded_model_problem
    from orchestrator.training.checkpoint import CheckpointError

    problem = loaded_model_problem(model, str(directory), "cpu")
    if problem:
        raise CheckpointError(f"{problem} (its weights diverged): it is not exported")


def _training_checkpoint_only(directory: Path) -> None:
    """ExportError for a model directory that is not a training checkpoint: an INT8 export,
    whose ONNX file already is its portable form; named with the float stages of the compress
    output it is in, which export, or the training checkpoint it was compressed from."""
    from orchestrator.compression.export import ONNX_FILE
    from orchestrator.runs import COMPRESS_CONFIG_FILE, compress_stage, compressed_from
    from orchestrator.serving.loading import model_format

    fmt = model_format(directory)  # (CheckpointError for one cut short: a run falls back)
    if fmt.name == "checkpoint":
        return
    out = directory.parent
    names = [name for name in ("qat", "pruned", "distilled")
             if compress_stage(out / name) is not None]
    # pruned/ and qat/ have the INT8 model's shape (int8/ is qat/ exported, qat/ fine-tunes
    # pruned/): suggested after compress's default pruning, each was refused in turn for it.
    pruning = _recorded_pruning_refusal(fmt, directory)
    unexportable = [name for name in names if name != "distilled"] if pruning else []
    stages = [str(out / name) for name in names if name not in unexportable]
    instead = ""
    if stages:
        qat = " (qat/: its weights as int8/ holds them)" if str(out / "qat") in stages else ""
        instead = (f"; for a float Hugging Face model export a stage of the compress output "
                   f"{out}: {' or '.join(stages)}{qat}, or the training checkpoint it was "
                   f"compressed from, {compressed_from(out)}")
    elif (out / COMPRESS_CONFIG_FILE).is_file():
        instead = (f"; export the training checkpoint {out} was compressed from, "
                   f"{compressed_from(out)}")
    if unexportable:
        instead += f" (not {' or '.join(name + '/' for name in unexportable)}: {pruning})"
    raise ExportError(f"{directory} is an INT8 model, which GPT-2 cannot hold: its "
                      f"{directory / ONNX_FILE} already is its portable form (ONNX Runtime: "
                      "orchestrator.compression.export.load_onnx_model, or an "
                      f"onnxruntime.InferenceSession){instead}")


def _recorded_pruning_refusal(fmt, directory: Path) -> str | None:
    """pruning_refusal of the shape the INT8 export `directory` records (its config.json, no
    weights read); None where it has GPT-2's form or its config cannot be read (the stages
    are then suggested, and an export of one says what it lacks)."""
    from orchestrator.training.checkpoint import CheckpointError

    try:
        return pruning_refusal(fmt.config(directory))
    except CheckpointError:
        return None


# --- import (--init-from) ---------------------------------------------------------------


def read_hf_config(directory: str | os.PathLike) -> dict[str, Any]:
    """config.json of a GPT-2-shaped Hugging Face model directory; ExportError naming the
    file or field otherwise."""
    directory = expand_home(directory, "--init-from", ExportError)
    path = directory / "config.json"
    if not directory.is_dir():
        if directory.exists():  # (its config.json or weights named: the folder was meant)
            raise ExportError(f"--init-from {directory} is a file; give the directory that "
                              f"holds it ({directory.parent})")
        raise ExportError(f"--init-from {directory}: no such directory")
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"--init-from {directory}: no config.json (a Hugging Face model "
                          "directory, as written by save_pretrained or jobs/export.py)") from None
    except (OSError, ValueError) as e:
        raise ExportError(f"--init-from: cannot read {path}: {e}") from None
    if not isinstance(config, dict):
        raise ExportError(f"--init-from: {path} is not a JSON object of settings")
    if config.get("model_type") != "gpt2":
        raise ExportError(f"--init-from: {path} has model_type {config.get('model_type')!r}; "
                          "only GPT-2-shaped models (model_type 'gpt2') can be imported")
    _check_config_types(config, path)
    for key, (ours, why) in ATTENTION_SETTINGS.items():
        if config.get(key, ours) != ours:
            raise ExportError(f"--init-from: {path}: {key} is {json.dumps(config[key])}; our "
                              f"model cannot compute that ({why})")
    if config.get("tie_word_embeddings", True) is not True:
        raise ExportError(f"--init-from: {path}: tie_word_embeddings is "
                          f"{json.dumps(config['tie_word_embeddings'])}; our model's output "
                          "layer is its token embedding, so an untied lm_head cannot be kept")
    activation = config.get("activation_function", "gelu_new")
    if activation not in ("gelu", *TANH_GELUS):  # the tanh ones: close, warned about
        raise ExportError(f"--init-from: {path}: activation_function {json.dumps(activation)}"
                          "; ours is the GELU (gelu, or the tanh GELU's close variants "
                          f"{', '.join(TANH_GELUS)})")
    weight_files(directory)  # present, or the error says what is there instead
    return config


# The config.json fields read here, with the type each must have (None: may be absent).
# "?": may be absent; "?null": may also be null (GPT-2's own configs write "n_inner": null;
# transformers fails on a null epsilon or context later, in a traceback).
_CONFIG_TYPES = {"n_layer": "count", "n_head": "count", "n_embd": "count",
                 "vocab_size": "count", "n_positions": "count?", "n_inner": "count?null",
                 "layer_norm_epsilon": "number?", "activation_function": "text?"}


def _check_config_types(config: dict[str, Any], path: Path) -> None:
    """ExportError naming the first field of the wrong type (a string "1e-5", a list ...)."""
    for key, kind in _CONFIG_TYPES.items():
        value = config.get(key)
        if key not in config and "?" in kind or value is None and kind.endswith("?null"):
            continue
        base = kind.partition("?")[0]
        ok = {"count": isinstance(value, int) and not isinstance(value, bool) and value >= 1,
              # (finite, within float's range: an integer past it raised OverflowError
              # in init_warnings, and NaN, which json reads, compared as no difference)
              "number": is_number(value),
              "text": isinstance(value, str)}[base]
        if not ok:
            what = {"count": "an integer >= 1", "number": "a finite number",
                    "text": "a string"}[base]
            if key not in config:  # (not "got null": the file holds no null to look for)
                raise ExportError(f"--init-from: {path}: {key} is missing (it must be {what})")
            shown = json.dumps(value)  # (an integer of 400 digits: its first ones)
            shown = shown if len(shown) <= 60 else f"{shown[:40]}... ({len(shown)} characters)"
            raise ExportError(f"--init-from: {path}: {key} must be {what}, got {shown}")


def expected_hf_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The tensors a GPT-2 of this config.json must hold, with their shapes (Conv1D layout)."""
    e, vocab = config["n_embd"], config["vocab_size"]
    shapes = {"transformer.wte.weight": (vocab, e),
              "transformer.wpe.weight": (config.get("n_positions") or 1024, e),
              "transformer.ln_f.weight": (e,), "transformer.ln_f.bias": (e,)}
    per_block = {"ln_1.weight": (e,), "ln_1.bias": (e,), "ln_2.weight": (e,), "ln_2.bias": (e,),
                 "attn.c_attn.weight": (e, 3 * e), "attn.c_attn.bias": (3 * e,),
                 "attn.c_proj.weight": (e, e), "attn.c_proj.bias": (e,),
                 "mlp.c_fc.weight": (e, inner := config.get("n_inner") or 4 * e),
                 "mlp.c_fc.bias": (inner,), "mlp.c_proj.weight": (inner, e),
                 "mlp.c_proj.bias": (e,)}
    for i in range(config["n_layer"]):
        shapes.update({f"transformer.h.{i}.{name}": shape for name, shape in per_block.items()})
    return shapes


def check_hf_weights(directory: str | os.PathLike, config: dict[str, Any]) -> None:
    """Before any worker starts: every tensor `config` needs is in the weight files with its
    shape, the files are whole (safetensors' headers cover them), and an lm_head stored
    beside the embedding equals it. Reads headers, and the two head tensors when both are
    there. ExportError naming the file and tensor otherwise."""
    from safetensors import SafetensorError, safe_open

    where: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for path in weight_files(expand_home(directory, "--init-from", ExportError)):
        try:
            with safe_open(str(path), "pt") as f:
                for key in f.keys():
                    piece = f.get_slice(key)
                    where[hf_name(key)] = (path, tuple(piece.get_shape()), piece.get_dtype())
        except (SafetensorError, OSError) as e:
            raise ExportError(f"--init-from: {path} is not a whole safetensors file: {e}") \
                from None
    for name, shape in expected_hf_shapes(config).items():
        if name not in where:
            raise ExportError(f"--init-from {directory}: no tensor {name!r} in the weights "
                              f"(config.json asks for {config['n_layer']} layers)")
        if where[name][1] != shape:
            raise ExportError(f"--init-from: {where[name][0]}: {name} has shape "
                              f"{where[name][1]}, config.json needs {shape}")
        if where[name][2] not in FLOAT_DTYPES:
            raise ExportError(f"--init-from: {where[name][0]}: {name} is {where[name][2]}, "
                              f"{NOT_FLOAT}")
    if "lm_head.weight" in where:
        check_tied(_read_tensor(where["lm_head.weight"][0], "lm_head.weight"),
                    _read_tensor(where["transformer.wte.weight"][0], "transformer.wte.weight"),
                    where["lm_head.weight"][0])


def _read_tensor(path: Path, name: str) -> "torch.Tensor":
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        key = next(k for k in f.keys() if hf_name(k) == name)
        return f.get_tensor(key)


def model_size_of(config: dict[str, Any], where: str) -> str:
    """The preset whose shape a GPT-2 config has (GPT-2 small is 'large': 12 x 768)."""
    shape = {"n_layer": config.get("n_layer"), "n_head": config.get("n_head"),
             "n_embd": config.get("n_embd")}
    for name, preset in MODEL_PRESETS.items():
        if preset == shape:
            return name
    presets = ", ".join(f"{n} {p['n_layer']}x{p['n_head']}x{p['n_embd']}"
                        for n, p in MODEL_PRESETS.items())
    raise ExportError(f"--init-from {where}: shape n_layer x n_head x n_embd = "
                      f"{shape['n_layer']}x{shape['n_head']}x{shape['n_embd']} is none of the "
                      f"model presets ({presets})")


def mlp_hidden_of(config: dict[str, Any]) -> int | None:
    """TrainConfig.mlp_hidden of a GPT-2 config: its n_inner (an MLP pruned to one width in
    every layer exports as one), None where that is GPT-2's own 4 x n_embd."""
    inner = config.get("n_inner")
    return None if inner in (None, 4 * config["n_embd"]) else inner


def check_init_context(directory: str | os.PathLike, seq_len: int) -> None:
    """The imported model's position table must cover --seq-len (it is cut to shorter ones);
    checked before any worker starts. ExportError naming both otherwise."""
    positions = read_hf_config(directory).get("n_positions")
    if isinstance(positions, int) and seq_len > positions:
        raise ExportError(f"--init-from {directory}: the model has {positions} positions "
                          f"(n_positions) and --seq-len {seq_len} needs {seq_len}; pass "
                          f"--seq-len {positions} or less")


def init_warnings(config: dict[str, Any]) -> list[str]:
    """What differs between the imported model and ours, though close enough to fine-tune."""
    warnings = []
    if config.get("activation_function", "gelu_new") in TANH_GELUS:
        warnings.append(f"the model uses the tanh GELU ({config.get('activation_function', 'gelu_new')}), "
                        "ours the exact one: outputs differ slightly before fine-tuning")
    if abs(config.get("layer_norm_epsilon", 1e-5) - LAYER_NORM_EPS) > 1e-12:
        warnings.append(f"layer_norm_epsilon {config['layer_norm_epsilon']} is not ours "
                        f"({LAYER_NORM_EPS})")
    return warnings


