"""Which model is served: checkpoint, run and INT8 directories; clear errors otherwise."""
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from orchestrator.config import TrainConfig
from orchestrator.serving.generation import GenerationRequest, SamplingParams, generate
from orchestrator.serving.loading import (INT8_FILE, LATEST_PIN, CheckpointPin,
                                          default_checkpoint, load_for_serving, load_model,
                                          model_directories, pin_checkpoint, pin_once,
                                          record_refused, record_served,
                                          save_untrained_checkpoint)
from orchestrator.training.checkpoint import (CheckpointError, load_checkpoint,
                                              save_checkpoint)
from tests.support import one_thread, resave_without


@pytest.fixture(autouse=True)
def torch_on_one_thread():
    with one_thread():
        yield


def test_a_trained_checkpoint_loads_and_generates(tmp_path):
    from orchestrator.training.loop import train
    from orchestrator.training.session import LocalSession

    config = TrainConfig(model_size="tiny", batch_size=2, seq_len=32, max_steps=2,
                         warmup_steps=1, checkpoint_every=2, log_every=2, eval_batches=1)
    train(config, LocalSession(tmp_path / "run", device=torch.device("cpu")))
    loaded = load_model(tmp_path / "run")  # the run directory: its newest checkpoint
    assert loaded.path == str(tmp_path / "run" / "checkpoint_00000002")
    assert (loaded.format, loaded.step, loaded.block_size) == ("checkpoint", 2, 32)
    assert loaded.version == f"run/checkpoint_00000002@{loaded.sha256[:8]}"
    assert not loaded.model.training
    out = generate(loaded.model, [GenerationRequest(tuple(b"Hi"), SamplingParams(5, 0.0))], 32)
    assert len(out[0][1]) == 5


def test_a_run_directory_serves_its_newest_usable_checkpoint(tmp_path):
    old = save_untrained_checkpoint(tmp_path / "run" / "checkpoint_00000010", seed=1, step=10)
    new = save_untrained_checkpoint(tmp_path / "run" / "checkpoint_00000020", seed=2, step=20)
    assert load_model(tmp_path / "run").path == str(new)
    (new / "state.pt").write_bytes(b"garbage")  # newest corrupt: the one before, with a warning
    loaded = load_model(tmp_path / "run")
    assert loaded.path == str(old) and loaded.step == 10
    assert "corrupt" in loaded.warnings[0]


def test_weights_with_non_finite_logits_are_never_served(tmp_path):
    # A diverged run's newest checkpoint (whole files, NaN weights): a run directory serves
    # the one before; named explicitly it is refused, so a hot reload keeps the old model.
    old = save_untrained_checkpoint(tmp_path / "run" / "checkpoint_00000010", seed=1, step=10)
    new = tmp_path / "run" / "checkpoint_00000020"
    state = load_checkpoint(old)
    state["model"] = {k: torch.full_like(v, float("nan")) if k.endswith("lm_head.weight")
                      else v for k, v in state["model"].items()}
    save_checkpoint(new, state)
    assert load_model(new).path == str(new)  # loading alone does not look at the numbers
    loaded = load_for_serving(tmp_path / "run")
    assert loaded.path == str(old) and "non-finite weights" in loaded.warnings[0]
    with pytest.raises(CheckpointError, match="non-finite weights"):
        load_for_serving(new)


def test_a_non_finite_weight_the_one_token_probe_does_not_read_is_never_served(tmp_path):
    # NaN in position 10's embedding only: a forward pass of one token at position 0 gave
    # finite logits, so the checkpoint was served (hot reloaded over a good model), and every
    # request reaching position 10 decoded NaN logits: token 0 over and over, greedy.
    old = save_untrained_checkpoint(tmp_path / "run" / "checkpoint_00000010", seed=1, step=10)
    new = tmp_path / "run" / "checkpoint_00000020"
    state = load_checkpoint(old)
    state["model"]["pos_emb.weight"][10] = float("nan")
    save_checkpoint(new, state)
    with pytest.raises(CheckpointError,
                       match=r"non-finite weights \(64 of \d+ values of pos_emb\.weight"):
        load_for_serving(new)
    loaded = load_for_serving(tmp_path / "run")
    assert loaded.path == str(old) and "pos_emb.weight" in loaded.warnings[0]


def test_a_finite_models_weight_scan_makes_no_mask_the_size_of_a_weight(monkeypatch):
    # The scan at every load (a hot reload included) made a bool mask per weight,
    # torch.isfinite(weight).all(): 1-4 s per 85M fp32 parameters on the 2-core CPU, about
    # as long as the rest of the load. One sum per weight settles a finite one (0.1-0.25 s).
    from orchestrator.serving.loading import non_finite_weights
    from orchestrator.training.model import GPT, GPTConfig

    model = GPT(GPTConfig.from_train_config(TrainConfig(model_size="tiny", seq_len=32)))
    sizes, isfinite = [], torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: sizes.append(t.numel()) or isfinite(t))
    assert non_finite_weights(model, "v") is None
    assert sizes and max(sizes) == 1, sorted(set(sizes))


def test_the_weight_scan_tells_an_overflowing_sum_from_a_non_finite_weight():
    # (the sum settles a finite weight only where it is finite itself: finite values summing
    # past float32's range, and +inf beside -inf summing to NaN, are looked at one by one)
    from orchestrator.serving.loading import non_finite_weights

    model = torch.nn.Linear(4, 4)
    with torch.no_grad():
        model.weight.fill_(3e38)
        model.bias.fill_(-3e38)
    assert non_finite_weights(model, "v") is None
    with torch.no_grad():
        model.weight[0, :2] = torch.tensor([float("inf"), float("-inf")])
    assert non_finite_weights(model, "v") == (
        "model v has non-finite weights (2 of 16 values of weight are NaN or infinite)")


def test_a_deployment_pins_the_newest_whole_checkpoint_of_a_run(tmp_path):
    old = save_untrained_checkpoint(tmp_path / "run" / "checkpoint_00000010", seed=1, step=10)
    new = save_untrained_checkpoint(tmp_path / "run" / "checkpoint_00000020", seed=2, step=20)
    assert pin_checkpoint(tmp_path / "run") == new
    # Training is still writing the newest (its checksum not there yet): the one before.
    (new / "state.pt.sha256").unlink()
    assert pin_checkpoint(tmp_path / "run") == old
    assert pin_checkpoint(old) == old  # a checkpoint named is itself
    (old / "state.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        pin_checkpoint(old)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # (Pins' checkpoint directories are made there)


class Pins(dict):
    """loading.PinStore in a dict, and a resolver that counts its calls and returns what
    `newest` says at the time (a run that training writes on), made in the current
    directory (pinned directories that are gone are pinned again)."""

    def __init__(self):
        super().__init__()
        self.newest, self.resolved = "ckpt-1", 0

    def put(self, key, value):
        self[key] = value

    def put_if_absent(self, key, value):
        return self.setdefault(key, value)

    def resolve(self, requested):
        self.resolved += 1
        directory = Path(f"{requested}/{self.newest}")
        directory.mkdir(parents=True, exist_ok=True)
        return directory

    def pin(self, requested, serving=None, record=True):
        pin = pin_once(self, requested, serving, self.resolve)
        if record:  # (after its model loaded)
            record_served(self, pin)
        return pin


def test_a_deployments_replicas_resolve_a_run_once_until_the_next_reload(in_tmp):
    pins = Pins()
    first = pins.pin("run")
    pins.newest = "ckpt-2"
    # Replicas starting later (autoscaling, a replacement): the same, never resolved again.
    assert pins.pin("run") == pins.pin("run") == first == CheckpointPin("run", "run/ckpt-1", 1)
    assert pins.resolved == 1
    # A reload elsewhere and back: resolved afresh, once for every replica reloading, also
    # those whose reload comes after training wrote another checkpoint.
    other = pins.pin("other", serving=first)
    pins.newest = "ckpt-3"
    back = pins.pin("run", serving=other)
    pins.newest = "ckpt-4"
    assert pins.pin("run", serving=pins.pin("other", serving=first)) == back
    assert back.directory == "run/ckpt-3" and back.generation == 3


def test_a_replica_starting_while_a_reload_rolls_out_takes_the_reloads_pin(in_tmp):
    pins = Pins()
    old = pins.pin("run")
    pins.newest = "ckpt-2"
    reloading = pins.pin("other", serving=old, record=False)  # still loading its model
    pins.newest = "ckpt-3"
    # Serve hands a replica starting now the new config; the current pin is still the old.
    assert pins.pin("other") == reloading
    assert pins.resolved == 2


def test_a_refused_reload_never_becomes_what_replicas_starting_later_serve(in_tmp):
    pins = Pins()
    good = pins.pin("run")
    pins.pin("broken", serving=good, record=False)  # its model did not load: not recorded
    assert pins.pin("run") == good  # a replica starting now falls back to it: still pinned
    # A pin recorded late (a slow replica of an older reload) does not replace a newer one.
    newer = pins.pin("other", serving=good)
    record_served(pins, good)
    assert pins.pin("other") == newer


def test_an_explicit_checkpoint_must_itself_load(tmp_path):
    path = save_untrained_checkpoint(tmp_path / "ckpt")
    (path / "state.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(path)


@pytest.mark.parametrize("make, words", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "holds no model"),
    (lambda p: (p / "file.pt").write_text("x") and p / "file.pt", "is a file"),
])
def test_paths_that_hold_no_model_are_named(tmp_path, make, words):
    path = make(tmp_path)
    with pytest.raises(CheckpointError, match=words) as e:
        model_directories(path)
    assert str(path) in str(e.value)


def test_versions_differ_for_different_weights_at_one_path(tmp_path):
    first = load_model(save_untrained_checkpoint(tmp_path / "c", seed=1)).version
    second = load_model(save_untrained_checkpoint(tmp_path / "c", seed=2)).version
    assert first != second and first.split("@")[0] == second.split("@")[0]


def test_default_checkpoint_is_the_newest_pretrain_run(tmp_path):
    import os

    with pytest.raises(CheckpointError, match="none given"):
        default_checkpoint(tmp_path)
    save_untrained_checkpoint(tmp_path / "pretrain-1" / "checkpoint_00000001")
    assert default_checkpoint(tmp_path) == (tmp_path / "pretrain-1").resolve()
    # A newer job-file run under the same root (the README's example: a user loop's own
    # checkpoint format) was taken, and `serve run` refused to start.
    (tmp_path / "regression" / "checkpoint_00000001").mkdir(parents=True)
    (tmp_path / "regression" / "checkpoint_00000001" / "state.pt").write_bytes(b"mine")
    os.utime(tmp_path / "pretrain-1", (0, 0))
    assert default_checkpoint(tmp_path) == (tmp_path / "pretrain-1").resolve()


def test_int8_exports_load_through_the_compression_loader(tmp_path):
    export = pytest.importorskip("orchestrator.compression.export")
    from orchestrator.compression.artifacts import save_tensors
    from orchestrator.compression.prune import prunable_names
    from orchestrator.training.model import GPT, GPTConfig

    assert INT8_FILE == export.TORCH_FILE  # detection must find what the exporter writes
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32)).eval()
    (tmp_path / "int8").mkdir()
    save_tensors(tmp_path / "int8" / INT8_FILE,
                 export.int8_state(model, prunable_names(model)))
    (tmp_path / "int8" / "config.json").write_text('{"tokenizer_sha256": ""}')  # as written
    loaded = load_model(tmp_path / "int8")
    assert loaded.format == "int8" and loaded.block_size == 32
    assert load_model(tmp_path).path == loaded.path  # the compress output dir holding int8/
    out = generate(loaded.model, [GenerationRequest(tuple(b"Hi"), SamplingParams(6, 0.0))], 32)
    reference = generate(model, [GenerationRequest(tuple(b"Hi"), SamplingParams(6, 0.0))], 32)
    assert len(out[0][1]) == 6
    # int8 weights: close to the fp32 model, so greedy agrees on at least the first token.
    assert out[0][1][0] == reference[0][1][0]


def test_an_int8_export_whose_config_lacks_n_layer_is_refused_naming_it(tmp_path):
    # Filled with the default 4 layers, a 2-layer export was "not an int8 model this code
    # can load", with torch's list of missing weights and no field named.
    export = pytest.importorskip("orchestrator.compression.export")
    from orchestrator.compression.artifacts import save_tensors
    from orchestrator.compression.prune import prunable_names
    from orchestrator.training.model import GPT, GPTConfig

    model = GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32)).eval()
    state = export.int8_state(model, prunable_names(model))
    del state["config"]["n_layer"]
    save_tensors(tmp_path / INT8_FILE, state)
    (tmp_path / "config.json").write_text('{"tokenizer_sha256": ""}')
    with pytest.raises(CheckpointError, match=f"{tmp_path / INT8_FILE} .*its model config "
                                              "lacks 'n_layer', which every config"):
        load_model(tmp_path)


def test_an_int8_export_copied_without_its_config_is_refused_not_served_with_bytes(tmp_path):
    """weights.int8.pt alone (its config.json, which records the tokenizer, not copied): a
    320-token BPE model was served with the 257 bytes, every reply garbage."""
    export = pytest.importorskip("orchestrator.compression.export")
    from orchestrator.compression.artifacts import save_tensors
    from orchestrator.compression.prune import prunable_names
    from orchestrator.training.model import GPT, GPTConfig

    model = GPT(GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=32, vocab_size=320))
    save_tensors(tmp_path / INT8_FILE, export.int8_state(model.eval(), prunable_names(model)))
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'config.json'} cannot be read .*"
                                              "records the export's tokenizer"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text('{"tokenizer_sha256": ""}')  # an older export's
    assert load_model(tmp_path).model.config.vocab_size == 320


def test_a_missing_tokenizer_names_the_checkpoint_once(tmp_path):
    from types import SimpleNamespace

    from orchestrator.serving.loading import _run_tokenizer
    from orchestrator.training.checkpoint import CheckpointError

    directory = tmp_path / "run" / "checkpoint_00000001"
    directory.mkdir(parents=True)
    model = SimpleNamespace(config=SimpleNamespace(vocab_size=320))
    with pytest.raises(CheckpointError) as e:
        _run_tokenizer(directory, "ab" * 32, model)
    assert str(e.value).count(str(directory)) == 1, str(e.value)
    assert "no tokenizer.json is beside it" in str(e.value)


def test_a_hugging_face_export_is_named_as_such_not_as_no_model(tmp_path):
    # "holds no model: expected state.pt (checkpoint) or ..." said nothing of what it was.
    from orchestrator.hf_export import export_checkpoint

    save_untrained_checkpoint(tmp_path / "run" / "checkpoint_00000001")
    export_checkpoint(tmp_path / "run", tmp_path / "hf")
    with pytest.raises(CheckpointError, match="is a Hugging Face model .*the training "
                                              "checkpoint it came from"):
        load_model(tmp_path / "hf")


def test_a_hugging_face_model_saved_in_shards_is_named_as_such_too(tmp_path):
    # save_pretrained shards a big model (model.safetensors.index.json + its shards): it was
    # "holds no model: expected state.pt ...", as if nothing of it were known.
    transformers = pytest.importorskip("transformers")
    from orchestrator.hf_export import export_checkpoint

    save_untrained_checkpoint(tmp_path / "run" / "checkpoint_00000001")
    export_checkpoint(tmp_path / "run", tmp_path / "hf")
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").save_pretrained(
        tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    with pytest.raises(CheckpointError, match="is a Hugging Face model .*the training "
                                              "checkpoint it came from"):
        load_model(tmp_path / "sharded")


def test_a_pinned_checkpoint_deleted_by_trainings_rotation_is_pinned_again(tmp_path, caplog):
    # keep_checkpoints 3: training deleted the pinned checkpoint as it wrote newer ones, and
    # every replica starting later failed: "checkpoint ... does not exist".
    run = tmp_path / "pretrain-x"
    for step in (100, 200, 300):
        save_untrained_checkpoint(run / f"checkpoint_{step:06d}", step=step)
    pins = Pins()
    first = pin_once(pins, str(run), None)
    record_served(pins, first)
    for step in (400, 500, 600):
        save_untrained_checkpoint(run / f"checkpoint_{step:06d}", step=step)
    for step in (100, 200, 300):
        shutil.rmtree(run / f"checkpoint_{step:06d}")
    later = pin_once(pins, str(run), None)
    assert later == CheckpointPin(str(run), str(run / "checkpoint_000600"), 2)
    assert load_for_serving(later.directory).step == 600
    assert pin_once(pins, str(run), None) == later  # and the next replica joins it
    assert f"checkpoint {run / 'checkpoint_000300'}, pinned for {str(run)!r}, was deleted" \
        in caplog.text and f"{run / 'checkpoint_000600'} is pinned instead" in caplog.text


def test_a_refused_pin_is_resolved_afresh_at_the_next_try(in_tmp):
    # A reload to a run dir whose newest checkpoint diverged was refused everywhere; its
    # retry, after training wrote a good one, and replicas starting with it took the same
    # refused pin again.
    pins = Pins()
    first = pins.pin("run")
    other = pins.pin("other", serving=first)
    pins.newest = "ckpt-2-diverged"
    bad = pins.pin("run", serving=other, record=False)
    record_refused(pins, bad)
    pins.newest = "ckpt-3-good"
    retry = pins.pin("run", serving=other, record=False)
    assert retry == CheckpointPin("run", "run/ckpt-3-good", bad.generation + 1)
    assert pin_once(pins, "run", None, pins.resolve) == retry  # a replica starting: joins it
    # One replica refusing a pin another serves (out of memory there) leaves it pinned.
    record_refused(pins, retry)
    record_served(pins, retry)
    pins.newest = "ckpt-4"
    assert pins.pin("run", serving=other) == retry


def test_a_pin_made_meanwhile_is_joined_without_resolving_the_checkpoint_again(in_tmp):
    # Two replicas pinning at once (two checkpoints) can leave LATEST_PIN one generation
    # behind (the lower write lands last): the next replica read the older figure, resolved
    # the checkpoint (reading and checksumming it) and only then found the pin there.
    pins = Pins()
    first = pins.pin("run")
    made = pins.pin("other", serving=first, record=False)  # generation 2, not served yet
    pins[LATEST_PIN] = first.generation  # the lagging write
    resolved = pins.resolved
    assert pin_once(pins, "other", first, pins.resolve) == made
    assert pins.resolved == resolved


def cut_short_sharded_save(directory: Path) -> Path:
    """What a --strategy fsdp save leaves when it stops before rank 0 writes meta.pt (last):
    torch.distributed.checkpoint's index and a shard, no model file."""
    directory.mkdir(parents=True)
    (directory / ".metadata").write_bytes(b"index")
    (directory / "__0_0.distcp").write_bytes(b"shard")
    return directory


CUT_SHORT = "has no meta.pt (written last, by rank 0): incomplete"


def _served(path: Path, out: Path) -> list[str]:
    return load_model(path).warnings


def _compression_teacher(path: Path, out: Path) -> list[str]:
    from orchestrator.compression.source import load_teacher

    said: list[str] = []
    load_teacher(path, said.append)
    return said


def _exported(path: Path, out: Path) -> list[str]:
    from orchestrator.hf_export import export_checkpoint

    return export_checkpoint(path, out)[1]["skipped"]


READERS = pytest.mark.parametrize("read", [_served, _compression_teacher, _exported],
                                  ids=["serving", "compression", "export"])


@READERS
def test_a_cut_short_sharded_checkpoint_named_is_refused_as_cut_short(tmp_path, read):
    # Serving and export said "holds no model: expected state.pt ... or meta.pt ...",
    # compression "neither a checkpoint directory (no state.pt) nor a run directory": none
    # said the save was cut short, nor which file it never wrote.
    checkpoint = cut_short_sharded_save(tmp_path / "checkpoint_00000002")
    with pytest.raises(CheckpointError) as e:
        read(checkpoint, tmp_path / "out")
    assert f"sharded checkpoint {checkpoint} {CUT_SHORT}" in str(e.value)


@READERS
def test_a_run_names_the_newer_cut_short_checkpoint_it_falls_back_past(tmp_path, read):
    # Serving passed over it without a word (model_directories left it out), compression
    # said "checkpoint file missing: .../state.pt", a file an FSDP save never writes.
    save_untrained_checkpoint(tmp_path / "run" / "checkpoint_00000001", step=1)
    sharded = cut_short_sharded_save(tmp_path / "run" / "checkpoint_00000002")
    said = read(tmp_path / "run", tmp_path / "out")
    assert any(f"sharded checkpoint {sharded} {CUT_SHORT}" in line for line in said), said


@READERS
def test_a_run_whose_every_checkpoint_was_cut_short_says_so(tmp_path, read):
    # Serving and export said the run dir "holds no model", as for a directory of anything.
    sharded = cut_short_sharded_save(tmp_path / "run" / "checkpoint_00000002")
    with pytest.raises(CheckpointError) as e:
        read(tmp_path / "run", tmp_path / "out")
    assert f"no usable checkpoint in run directory {tmp_path / 'run'}" in str(e.value)
    assert f"sharded checkpoint {sharded} {CUT_SHORT}" in str(e.value)


@READERS
def test_a_run_names_the_corrupt_newest_checkpoint_it_falls_back_past(tmp_path, read):
    save_untrained_checkpoint(tmp_path / "run" / "checkpoint_00000001", step=1)
    newest = save_untrained_checkpoint(tmp_path / "run" / "checkpoint_00000002", step=2)
    (newest / "state.pt").write_bytes(b"garbage")
    said = read(tmp_path / "run", tmp_path / "out")
    assert any(f"checkpoint {newest / 'state.pt'} is corrupt: sha256" in line
               for line in said), said


def test_pinning_a_run_warns_of_each_newer_checkpoint_it_passes_over(tmp_path, caplog):
    # A deployment serves the directory pinned, so load_model's warnings never saw the newer
    # checkpoints of the run: a corrupt or cut-short newest one was passed over silently.
    old = save_untrained_checkpoint(tmp_path / "run" / "checkpoint_00000001", step=1)
    corrupt = save_untrained_checkpoint(tmp_path / "run" / "checkpoint_00000002", step=2)
    (corrupt / "state.pt").write_bytes(b"garbage")
    sharded = cut_short_sharded_save(tmp_path / "run" / "checkpoint_00000003")
    with caplog.at_level("WARNING", logger="orchestrator.serving.loading"):
        assert pin_checkpoint(tmp_path / "run") == old
    assert f"sharded checkpoint {sharded} {CUT_SHORT}" in caplog.text, caplog.text
    assert f"checkpoint {corrupt / 'state.pt'} is corrupt" in caplog.text, caplog.text


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_pinning_a_run_passes_over_a_sharded_checkpoint_with_a_corrupt_shard(tmp_path):
    # Only meta.pt's checksum was verified: the run was pinned to a checkpoint whose shard
    # is corrupt, which every replica then refused, though an older one was whole.
    from orchestrator.training.checkpoint import save_sharded

    old = save_untrained_checkpoint(tmp_path / "run" / "checkpoint_00000001", step=1)
    state = load_checkpoint(old)
    newest = tmp_path / "run" / "checkpoint_00000002"
    save_sharded(newest, {"model": state["model"], "pending": {},
                          "optimizer": {"state": {}, "param_groups": []}},
                 {"config": state["config"], "step": 2}, rank=0)
    assert pin_checkpoint(tmp_path / "run") == newest
    shard = next(newest.glob("__*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-1] + b"x")
    assert pin_checkpoint(tmp_path / "run") == old


@pytest.mark.parametrize("read", [_served, _compression_teacher], ids=["serving", "compression"])
def test_a_compress_stage_folder_is_named_with_what_to_pass_instead(tmp_path, read):
    # Both said "holds no model: expected state.pt ..." (compression: "neither a checkpoint
    # directory ... nor a run directory"), not that it is a compression stage, nor what to
    # pass. (jobs/export.py exports a stage folder: test_hf_export.py.)
    import json

    out = tmp_path / "compressed"
    (out / "pruned").mkdir(parents=True)
    (out / "pruned" / "weights.pt").write_bytes(b"tensors")
    (out / "pruned" / "stage.json").write_text("{}")
    teacher = "/runs/pretrain-x/checkpoint_00000010"
    (out / "compress_config.json").write_text(json.dumps({"compress": {},
                                                          "source": {"checkpoint": teacher}}))
    with pytest.raises(CheckpointError) as e:
        read(out / "pruned", tmp_path / "out")
    said = str(e.value)
    assert f"{out / 'pruned'} is a jobs/compress.py stage folder" in said, said
    assert teacher in said and "holds no model" not in said
    if read is _served:
        assert f"serve the compress output {out}" in said


def _garble_tensor_bytes(state_file: Path) -> None:
    """Overwrite every tensor's bytes inside a torch.save zip with garbage, in place: the
    pickle of names, config and shapes stays readable; the checksum no longer matches."""
    import os
    import zipfile

    with zipfile.ZipFile(state_file) as archive:
        records = [i for i in archive.infolist() if "/data/" in i.filename]
    with open(state_file, "r+b") as f:
        for record in records:
            f.seek(record.header_offset + 26)  # the local header's name and extra lengths
            skip = 30 + int.from_bytes(f.read(2), "little") + int.from_bytes(f.read(2), "little")
            f.seek(record.header_offset + skip)
            f.write(os.urandom(record.compress_size))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_models_config_is_read_without_its_weights(tmp_path):
    # scripts/bench_serve.py loaded a whole model (weights read, GPT built) only to learn its
    # context: there was no reader of a checkpoint's config alone.
    from orchestrator.serving.loading import model_config
    from orchestrator.training.checkpoint import save_sharded

    full = save_untrained_checkpoint(tmp_path / "run" / "checkpoint_00000001", "tiny", 48)
    expected = load_model(full).model.config
    assert model_config(full) == expected and expected.block_size == 48
    assert model_config(tmp_path / "run") == expected  # a run directory: its newest
    _garble_tensor_bytes(full / "state.pt")
    with pytest.raises(CheckpointError, match="is corrupt"):
        load_model(full)  # the weights are garbage: the full load refuses them
    assert model_config(full) == expected  # never read: the config still is
    (full / "state.pt").write_bytes(b"garbage")  # not even its config: named as corrupt
    with pytest.raises(CheckpointError, match=f"checkpoint {full / 'state.pt'} is corrupt"):
        model_config(full)

    state = load_checkpoint(save_untrained_checkpoint(tmp_path / "whole", "tiny", 40))
    sharded = tmp_path / "sharded"
    save_sharded(sharded, {"model": state["model"], "pending": {},
                           "optimizer": {"state": {}, "param_groups": []}},
                 {"config": state["config"], "step": 2}, rank=0)
    expected = load_model(sharded).model.config
    for shard in sharded.glob("__*.distcp"):
        shard.write_bytes(b"garbage")
    assert model_config(sharded) == expected and expected.block_size == 40


def test_an_int8_exports_config_is_read_without_its_weights(tmp_path):
    export = pytest.importorskip("orchestrator.compression.export")
    from orchestrator.compression.artifacts import save_tensors
    from orchestrator.compression.prune import prunable_names
    from orchestrator.serving.loading import model_config
    from orchestrator.training.model import GPT, GPTConfig

    model = GPT(GPTConfig(block_size=24, n_layer=2, n_head=2, n_embd=32,
                          mlp_hidden=(64, 96))).eval()  # pruned widths recorded too
    state = export.int8_state(model, prunable_names(model))
    (tmp_path / "int8").mkdir()
    save_tensors(tmp_path / "int8" / INT8_FILE, state)
    (tmp_path / "int8" / "config.json").write_text(json.dumps(
        {"gpt_config": state["config"], "tokenizer_sha256": ""}))  # as save_int8 writes it
    expected = load_model(tmp_path).model.config
    (tmp_path / "int8" / INT8_FILE).write_bytes(b"garbage")
    assert model_config(tmp_path) == expected == model.config
    (tmp_path / "int8" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=f"file missing: {tmp_path / 'int8' / 'config.json'}"):
        model_config(tmp_path)


def test_a_models_config_is_refused_where_its_weights_do_not_fit_it(tmp_path):
    # A state.pt whose config lacks seq_len was read as the default 128-token context though
    # its weights hold 48 positions: model_config said 128, load_model refused the
    # checkpoint; a weight named that the model lacks passed too. (Now the missing field is
    # refused by name, the same by both.)
    from orchestrator.serving.loading import model_config
    from orchestrator.training.checkpoint import save_checkpoint

    state = load_checkpoint(save_untrained_checkpoint(tmp_path / "whole", "tiny", 48))
    shutil.copytree(tmp_path / "whole", tmp_path / "old")
    resave_without(tmp_path / "old", "seq_len")
    save_checkpoint(tmp_path / "extra", {**state, "model": {**state["model"],
                                                            "x": torch.zeros(2)}})
    for name, said in (("old", "its training config lacks 'seq_len'"),
                       ("extra", "1 unexpected (first x)")):
        with pytest.raises(CheckpointError) as full:
            load_model(tmp_path / name)
        with pytest.raises(CheckpointError) as config_only:
            model_config(tmp_path / name)
        assert str(config_only.value) == str(full.value) and said in str(full.value)


def _zip_of_text(state: Path) -> bytes:
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("notes/a.txt", "hello")
    return buffer.getvalue()


def _with_version(state: Path, version: bytes | None) -> bytes:
    """The state file's zip rebuilt with its 'version' record left out (None, as a zip built
    by hand) or holding `version`: torch's own cause was its internal check,
    'Expected hasRecord("version") to be true', or '[enforce fail at inline_container.cc:215].'"""
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(state) as source, zipfile.ZipFile(buffer, "w") as archive:
        for name in source.namelist():
            if name != "archive/version":
                archive.writestr(name, source.read(name))
            elif version is not None:
                archive.writestr(name, version)
    return buffer.getvalue()


def _legacy_cut_short(state: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(torch.load(state, weights_only=True), buffer,
               _use_new_zipfile_serialization=False)
    return buffer.getvalue()[:-100]


@READERS
@pytest.mark.parametrize("content, problem", [
    (b"", "the file is empty (0 bytes)"),
    (b"hello, not torch\n", "not a file torch.save writes (no zip archive)"),
    (None, "cut short: a zip archive (torch.save's) without its end"),
    (_zip_of_text, "a zip archive, but not one torch.save writes (no data.pkl)"),
    (lambda state: _with_version(state, None),
     "a zip archive holding a data.pkl, but not one torch.save writes (no 'version' record "
     "in its folder archive/)"),
    (lambda state: _with_version(state, b"abc\n"),
     "a zip archive holding a data.pkl, but its 'version' record archive/version is no "
     "number: 'abc'"),
    (lambda state: _with_version(state, b"99\n"),
     "RuntimeError: Attempted to read a PyTorch file with version 99, but the maximum "
     "supported version for reading is 10."),
    (_legacy_cut_short, "torch's legacy (pre-1.6) format, which it could not read (load it "
                        "and save it again with a current torch): RuntimeError: unexpected "
                        "EOF, expected 100 more bytes.")],
    ids=["empty", "text", "cut-short", "zip-of-text", "no-version", "bad-version",
         "newer-version", "legacy-cut-short"])
def test_a_state_file_torch_cannot_read_is_named_with_what_is_wrong(tmp_path, read, content,
                                                                    problem):
    # Its checksum matching (the file replaced and the sidecar written for it, or a copy that
    # checksummed what it had), torch's own message was the cause: nothing for an empty file
    # ("cannot be loaded safely: "), "101" (a KeyError: the first byte) for a text file, and
    # serving's memory-mapped read said it was saved without _use_new_zipfile_serialization.
    import hashlib

    checkpoint = save_untrained_checkpoint(tmp_path / "checkpoint_00000001")
    state = checkpoint / "state.pt"
    if content is None:
        content = state.read_bytes()[:state.stat().st_size // 2]
    elif callable(content):
        content = content(state)
    state.write_bytes(content)
    (checkpoint / "state.pt.sha256").write_text(hashlib.sha256(content).hexdigest())
    with pytest.raises(CheckpointError) as e:
        read(checkpoint, tmp_path / "out")
    assert str(e.value) == f"checkpoint {state} cannot be loaded safely: {problem}"


def test_a_legacy_format_checkpoint_is_read_as_torch_reads_it(tmp_path):
    # torch.save(..., _use_new_zipfile_serialization=False) (torch's pre-1.6 format) loads
    # with weights_only=True, but not memory-mapped: model_config (scripts/bench_serve.py's
    # context) refused what load_model serves, "not a file torch.save writes (no zip archive)".
    import hashlib

    from orchestrator.serving.loading import model_config

    checkpoint = save_untrained_checkpoint(tmp_path / "checkpoint_00000001")
    state = checkpoint / "state.pt"
    torch.save(load_checkpoint(checkpoint), state, _use_new_zipfile_serialization=False)
    (checkpoint / "state.pt.sha256").write_text(hashlib.sha256(state.read_bytes()).hexdigest())
    assert model_config(checkpoint) == load_model(checkpoint).model.config


def test_a_refused_pickle_is_named_in_one_line_without_torchs_advice(tmp_path):
    # torch's message ran on for paragraphs, advising a load with weights_only=False (which
    # would run the pickle's code), before its link.
    import os

    from orchestrator.training.checkpoint import load_tensors, save_tensors

    class Code:
        def __reduce__(self):
            return (os.getcwd, ())

    path = save_tensors(tmp_path / "state.pt", {"model": Code()})
    with pytest.raises(CheckpointError) as e:
        load_tensors(path)
    assert str(e.value) == (f"checkpoint {path} cannot be loaded safely: UnpicklingError: "
                            "Weights only load failed. Trying to load unsupported GLOBAL "
                            "posix.getcwd whose module posix is blocked.")


class NotAllowed:  # (a class of the user's: no global torch's weights-only load allows)
    pass


@pytest.mark.parametrize("held", ["numpy array", "class of its own"])
def test_a_refused_global_is_named_not_only_that_the_load_failed(tmp_path, held):
    # The global torch refuses (a numpy array's, a class of one's own) is said on the line of
    # its advice ("\n\tWeightsUnpickler error: Unsupported global: ..."), not in a paragraph
    # of its own: the message was cut to "UnpicklingError: Weights only load failed."
    import numpy as np

    from orchestrator.training.checkpoint import load_tensors, save_tensors

    if held == "numpy array":
        value, refused = np.zeros(3), np.zeros(3).__reduce__()[0]
    else:
        value, refused = NotAllowed(), NotAllowed
    path = save_tensors(tmp_path / "state.pt", {"model": value})
    with pytest.raises(CheckpointError) as e:
        load_tensors(path)
    assert str(e.value) == (f"checkpoint {path} cannot be loaded safely: UnpicklingError: "
                            "Weights only load failed. Unsupported global: GLOBAL "
                            f"{refused.__module__}.{refused.__qualname__} was not an allowed "
                            "global by default.")


@pytest.mark.parametrize("field", ["model_size", "dropout"])
def test_a_checkpoint_whose_config_lacks_a_field_is_refused_naming_it(tmp_path, field):
    # A 'tiny' checkpoint whose config lacked model_size was read as the default 'small' GPT:
    # "the weights do not fit a 'small' GPT", the field never named; one lacking dropout
    # (no shape) was served with the default, silently.
    from orchestrator.serving.loading import model_config

    checkpoint = resave_without(save_untrained_checkpoint(tmp_path / "c", "tiny"), field)
    said = (f"{checkpoint / 'state.pt'}: its training config lacks '{field}', which every "
            "config this project saves records: the file is damaged or not this project's")
    for read in (load_for_serving, model_config):
        with pytest.raises(CheckpointError) as e:
            read(checkpoint)
        assert str(e.value) == said


def test_a_checkpoint_saved_before_the_later_config_fields_still_serves(tmp_path):
    # Fields added after the first version (vocab_size, strategy, ...) keep their defaults,
    # which behave as the versions before them did: only the first version's are required.
    from orchestrator.config import ALWAYS_SAVED_TRAIN_FIELDS

    checkpoint = save_untrained_checkpoint(tmp_path / "c", "tiny")
    state = load_checkpoint(checkpoint)
    for name in set(state["config"]) - set(ALWAYS_SAVED_TRAIN_FIELDS):
        resave_without(checkpoint, name)
    assert load_for_serving(checkpoint).model.config.vocab_size == 256
