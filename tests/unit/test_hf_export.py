"""Export to Hugging Face GPT-2 (orchestrator/hf_export.py, jobs/export.py) and import back
(--init-from): transformers must compute what our model computes."""
import dataclasses
import json

import pytest
import torch

from orchestrator.config import TrainConfig
from orchestrator.hf_export import (ExportError, export_checkpoint, export_gpt2, model_size_of,
                                    read_hf_config)
from orchestrator.hf_import import load_hf_weights
from orchestrator.serving.loading import load_model, save_untrained_checkpoint
from orchestrator.tokenizer import ByteTokenizer, save_tokenizer, train_bpe
from orchestrator.training.checkpoint import CheckpointError, save_checkpoint
from orchestrator.training.model import GPT, GPTConfig
from tests.support import resave_without

transformers = pytest.importorskip("transformers")


def sharp_model(vocab_size=257, **options) -> GPT:
    """A tiny GPT whose MLP inputs are large enough that the exact and the tanh GELU differ
    far beyond 1e-4 (at init they are too small to tell apart), and whose greedy
    continuations vary."""
    torch.manual_seed(0)
    config = GPTConfig.from_train_config(TrainConfig(model_size="tiny", seq_len=32, **options),
                                         vocab_size=vocab_size)
    model = GPT(config)
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.fc.weight.mul_(40)
            block.mlp.proj.weight.mul_(10)
        model.tok_emb.weight.mul_(10)
    return model.eval()


def hf_model(directory, **overrides):
    config = transformers.AutoConfig.from_pretrained(directory, **overrides)
    return transformers.AutoModelForCausalLM.from_pretrained(directory, config=config).eval()


def greedy(model, ids, steps):
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    model = sharp_model()
    export_gpt2(model, ByteTokenizer(), directory)
    return model, directory


def test_transformers_logits_equal_ours_and_the_activation_is_the_exact_gelu(exported):
    ours, directory = exported
    ids = torch.tensor([list("naïve café, the end".encode())])
    with torch.no_grad():
        expected = ours(ids)[0]
        theirs = hf_model(directory)(ids).logits
        tanh_gelu = hf_model(directory, activation_function="gelu_new")(ids).logits
    assert json.loads((directory / "config.json").read_text())["activation_function"] == "gelu"
    assert torch.allclose(theirs, expected, atol=1e-4, rtol=0)
    # GPT-2's default activation would fail the same comparison.
    assert not torch.allclose(tanh_gelu, expected, atol=1e-4, rtol=0)


def test_greedy_generation_matches_and_the_tokenizer_loads(exported):
    ours, directory = exported
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    prompt = "héllo wörld"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    assert ids[0].tolist() == list(prompt.encode())
    expected = greedy(ours, ids, 12)
    theirs = hf_model(directory).generate(ids, max_new_tokens=12, do_sample=False,
                                           eos_token_id=None, pad_token_id=0)
    assert theirs.tolist() == expected.tolist()
    assert len(set(expected[0, ids.shape[1]:].tolist())) > 1  # a continuation, not one token


def test_the_readmes_pipeline_call_works_with_its_defaults(exported):
    # README: pipeline('text-generation', model=DIR)('Once upon a time'). Its default of 256
    # new tokens ran past the model's 32 positions: IndexError in the position table.
    ours, directory = exported
    generate = transformers.pipeline("text-generation", model=str(directory))
    text = generate("Once upon a time", do_sample=False)[0]["generated_text"]
    assert text.startswith("Once upon a time") and len(text) > len("Once upon a time")


def test_a_bpe_run_exports_its_own_tokenizer(tmp_path):
    bpe = train_bpe([f"the café number {i} opens at dawn" for i in range(300)], 320)
    model = sharp_model(vocab_size=bpe.vocab_size)
    export_gpt2(model, bpe, tmp_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "the café number 12 opens"
    assert tokenizer(text).input_ids == bpe.encode(text)
    assert tokenizer.eos_token_id == bpe.eos_id
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == \
        bpe.eos_id


def test_an_end_of_text_token_of_another_name_is_exported_by_its_own_name(tmp_path):
    # The tokenizer files named <|endoftext|> whatever the end-of-text token was: transformers
    # then added it as a new token, outside the embedding, and eos ids disagreed.
    from tokenizers import Tokenizer, models, pre_tokenizers

    from orchestrator.tokenizer import HFTokenizer

    vocab = {"<unk>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate("abcdefgh")}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["</s>"])
    words = HFTokenizer(tok, "words")
    export_gpt2(sharp_model(vocab_size=words.vocab_size), words, tmp_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer.eos_token == "</s>" and tokenizer.eos_token_id == words.eos_id == 1
    assert len(tokenizer) == words.vocab_size  # nothing added past the embedding
    assert json.loads((tmp_path / "config.json").read_text())["eos_token_id"] == 1


def test_a_span_that_does_not_cover_the_context_is_refused_one_that_does_is_exact(tmp_path):
    short = sharp_model(attention_span=True, span_init=0.2)
    with pytest.raises(ExportError, match="learnable attention span.*does not cover"):
        export_gpt2(short, ByteTokenizer(), tmp_path / "short")
    assert not (tmp_path / "short" / "model.safetensors").exists()
    full = sharp_model(attention_span=True, span_init=1.0)
    export_gpt2(full, ByteTokenizer(), tmp_path / "full")
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(hf_model(tmp_path / "full")(ids).logits, full(ids)[0], atol=1e-4,
                              rtol=0)


def test_a_structurally_pruned_model_is_refused(tmp_path):
    config = dataclasses.replace(sharp_model().config, mlp_hidden=(64, 128))
    with pytest.raises(ExportError, match="MLP widths differ between layers "
                                          "\\(mlp_hidden=\\(64, 128\\)\\)"):
        export_gpt2(GPT(config), ByteTokenizer(), tmp_path)
    config = dataclasses.replace(sharp_model().config, n_heads_per_layer=(1, 1))
    with pytest.raises(ExportError, match="attention heads are \\(n_heads_per_layer=\\(1, 1\\)"):
        export_gpt2(GPT(config), ByteTokenizer(), tmp_path)


def test_an_mlp_pruned_to_one_width_in_every_layer_exports_as_n_inner(tmp_path):
    # GPT-2's n_inner is one MLP width for every layer: mlp_hidden=(128, 128) was refused as
    # "layers of different widths". transformers must compute the same logits.
    model = sharp_model()
    config = dataclasses.replace(model.config, mlp_hidden=(128, 128))
    assert 128 != 4 * config.n_embd
    torch.manual_seed(1)
    pruned = GPT(config).eval()
    with torch.no_grad():
        for block in pruned.blocks:
            block.mlp.fc.weight.mul_(40)
        pruned.tok_emb.weight.mul_(10)
    export_gpt2(pruned, ByteTokenizer(), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["n_inner"] == 128
    ids = torch.tensor([list(b"pruned, one width")])
    with torch.no_grad():
        assert torch.allclose(hf_model(tmp_path)(ids).logits, pruned(ids)[0], atol=1e-4, rtol=0)


def test_import_gives_back_the_same_model(exported):
    ours, directory = exported
    config = read_hf_config(directory)
    assert model_size_of(config, str(directory)) == "tiny"
    fresh = GPT(ours.config).eval()
    load_hf_weights(fresh, directory)
    ids = torch.randint(0, 257, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(fresh(ids)[0], ours(ids)[0])


def test_an_old_byte_checkpoint_exports_and_serves_with_bytes(tmp_path):
    """A run from before tokenizers were recorded: vocabulary 256, no tokenizer.json."""
    run = tmp_path / "old-run"
    save_untrained_checkpoint(run / "checkpoint_00000010", step=10)
    loaded = load_model(run)
    assert isinstance(loaded.tokenizer, ByteTokenizer) and loaded.model.config.vocab_size == 256
    files, info = export_checkpoint(run, tmp_path / "hf")
    assert info["vocab_size"] == 256 and info["step"] == 10
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["vocab_size"] == 256 and config["eos_token_id"] is None
    ids = torch.tensor([list(b"old bytes")])
    with torch.no_grad():
        assert torch.allclose(hf_model(tmp_path / "hf")(ids).logits, loaded.model(ids)[0],
                              atol=1e-4, rtol=0)


def test_a_checkpoint_whose_config_lacks_model_size_is_refused_naming_it(tmp_path):
    # Read as the default 'small' GPT: "the weights do not fit a 'small' GPT", no field named.
    checkpoint = resave_without(save_untrained_checkpoint(tmp_path / "c"), "model_size")
    with pytest.raises(CheckpointError, match=r"state\.pt: its training config lacks "
                                              r"'model_size'"):
        export_checkpoint(checkpoint, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_a_run_with_a_recorded_tokenizer_serves_and_exports_with_it(tmp_path):
    bpe = train_bpe([f"alpha beta gamma {i}" for i in range(300)], 300)
    config = TrainConfig(model_size="tiny", seq_len=32, vocab_size=bpe.vocab_size,
                         tokenizer_sha256=bpe.sha256)
    model = GPT(GPTConfig.from_train_config(config, vocab_size=bpe.vocab_size))
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoint_00000001", {"model": model.state_dict(),
                                                 "config": config.to_dict(), "step": 1})
    save_tokenizer(bpe, run)
    assert load_model(run).tokenizer.encode("alpha beta") == bpe.encode("alpha beta")
    export_checkpoint(run, tmp_path / "hf")
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")("alpha").input_ids == \
        bpe.encode("alpha")
    save_tokenizer(ByteTokenizer(), run)  # replaced by another tokenizer: refused, not guessed
    with pytest.raises(Exception, match="not the tokenizer this model was trained with"):
        load_model(run)


def test_export_cli_bad_input_is_one_clear_line(tmp_path, capsys):
    from jobs import export

    code = export.main(["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and f"checkpoint {tmp_path / 'nope'} does not exist" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()
    save_untrained_checkpoint(tmp_path / "run" / "checkpoint_00000003", step=3)
    assert export.main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "o")]) == 0
    assert "exported " in capsys.readouterr().out
    assert (tmp_path / "o" / "model.safetensors").is_file()
    # Exporting again replaces the export; into the run itself (or a checkpoint), refused:
    # its config.json and tokenizer.json are what a resume reads.
    assert export.main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "o")]) == 0
    (tmp_path / "run" / "config.json").write_text('{"train": {}}')
    for out in (tmp_path / "run", tmp_path / "run" / "checkpoint_00000003"):
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        code = export.main(["--checkpoint", str(tmp_path / "run"), "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and f"--out {out}: it holds a training run or checkpoint" in err
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_init_from_refuses_what_it_cannot_import(tmp_path, exported):
    _, directory = exported
    with pytest.raises(ExportError, match="no config.json"):
        read_hf_config(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ExportError, match="model_type 'llama'"):
        read_hf_config(bad)
    config = {**read_hf_config(directory), "n_layer": 3}
    with pytest.raises(ExportError, match="3x2x64 is none of the model presets"):
        model_size_of(config, "x")


@pytest.mark.parametrize("key,value", [("scale_attn_weights", False),
                                       ("scale_attn_by_inverse_layer_idx", True)])
def test_init_from_refuses_attention_ours_cannot_compute(tmp_path, exported, key, value):
    """These load without a complaint and change the logits: refused, naming the key."""
    _, directory = exported
    (tmp_path / "model.safetensors").write_bytes((directory / "model.safetensors").read_bytes())
    config = json.loads((directory / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(ExportError, match=f"config.json: {key} is {json.dumps(value)}; our "
                                          "model cannot compute that"):
        read_hf_config(tmp_path)
    # The value our attention has, and reorder_and_upcast_attn (the same scores in fp32,
    # computed in another order), are accepted.
    (tmp_path / "config.json").write_text(json.dumps(
        {**config, key: not value, "reorder_and_upcast_attn": True}))
    read_hf_config(tmp_path)


def test_init_from_refuses_an_activation_other_than_the_gelu(tmp_path, exported):
    _, directory = exported
    (tmp_path / "model.safetensors").write_bytes((directory / "model.safetensors").read_bytes())
    config = json.loads((directory / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    with pytest.raises(ExportError, match='activation_function "relu"; ours is the GELU'):
        read_hf_config(tmp_path)
    for accepted in ("gelu", "gelu_new"):
        (tmp_path / "config.json").write_text(
            json.dumps({**config, "activation_function": accepted}))
        read_hf_config(tmp_path)


def test_export_to_an_out_that_cannot_be_a_directory_is_refused(tmp_path, capsys):
    from jobs import export

    save_untrained_checkpoint(tmp_path / "run" / "checkpoint_00000003", step=3)
    (tmp_path / "file").write_text("mine")
    for out, why in ((tmp_path / "file", "it is a file, not a directory"),
                     (tmp_path / "file" / "hf", f"{tmp_path / 'file'} is a file")):
        code = export.main(["--checkpoint", str(tmp_path / "run"), "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and f"--out {out}: {why}" in err and "Traceback" not in err, err
    assert (tmp_path / "file").read_text() == "mine"


def test_a_compress_out_is_refused_its_int8_export_would_read_the_tokenizer(tmp_path, capsys):
    """An export into a jobs/compress.py --out put its tokenizer.json beside int8/, where
    serving looks for the int8 model's (a run directory's rule): a bytes model's compressed
    export was then refused as trained with another tokenizer."""
    from jobs import export

    save_untrained_checkpoint(tmp_path / "run" / "checkpoint_00000003", step=3)
    out = tmp_path / "compressed"
    (out / "int8").mkdir(parents=True)
    (out / "compress_config.json").write_text("{}")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code = export.main(["--checkpoint", str(tmp_path / "run"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and f"--out {out}: it holds a jobs/compress.py --out " \
                         "(compress_config.json)" in err, err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in out.iterdir()) == ["compress_config.json", "int8"]
    # Its int8/ copied to a folder of its own, or a checkpoint copied in as int8/: serving
    # takes either folder for a compress output all the same (model_directories), so the
    # same tokenizer rule holds there.
    from orchestrator.serving.loading import INT8_FILE
    from orchestrator.training.checkpoint import STATE_FILE

    for name, model_file, said in (("deploy", INT8_FILE, f"an INT8 export (int8/{INT8_FILE})"),
                                   ("copied", STATE_FILE, f"a model in int8/ ({STATE_FILE})")):
        folder = tmp_path / name
        (folder / "int8").mkdir(parents=True)
        (folder / "int8" / model_file).write_bytes(b"model")
        code = export.main(["--checkpoint", str(tmp_path / "run"), "--out", str(folder)])
        err = capsys.readouterr().err
        assert code == 2 and f"--out {folder}: it holds {said}" in err, err
        assert sorted(p.name for p in folder.iterdir()) == ["int8"]


def copy_export(source, target, **config_changes):
    target.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.is_file():
            (target / f.name).write_bytes(f.read_bytes())
    if config_changes:
        config = json.loads((source / "config.json").read_text())
        (target / "config.json").write_text(json.dumps({**config, **config_changes}))
    return target


def test_an_untied_lm_head_is_refused_not_replaced_by_the_embedding(tmp_path, exported):
    """load_hf_weights set lm_head to the embedding whatever the file held: logits 15 apart
    from the model the user chose, with no word."""
    from safetensors.torch import load_file, save_file

    from orchestrator.hf_export import check_hf_weights

    _, directory = exported
    untied = copy_export(directory, tmp_path / "untied", tie_word_embeddings=False)
    with pytest.raises(ExportError, match="tie_word_embeddings is false; our model's output "
                                          "layer is its token embedding"):
        read_hf_config(untied)
    # A head stored beside the embedding: kept when it equals it, refused when it does not.
    stored = copy_export(directory, tmp_path / "stored")
    weights = load_file(str(stored / "model.safetensors"))
    wte = weights["transformer.wte.weight"]
    for head, refused in ((wte.clone(), False), (wte + 0.5, True)):
        save_file({**weights, "lm_head.weight": head}, str(stored / "model.safetensors"))
        config = read_hf_config(stored)
        model = GPT(exported[0].config)
        if refused:
            for check in (lambda: check_hf_weights(stored, config),
                          lambda: load_hf_weights(model, stored)):
                with pytest.raises(ExportError, match="lm_head.weight differs from the token "
                                                      "embedding"):
                    check()
        else:
            check_hf_weights(stored, config)
            load_hf_weights(model, stored)


def test_broken_weights_and_config_fields_are_named_before_any_worker(tmp_path, exported):
    from orchestrator.hf_export import check_hf_weights

    _, directory = exported
    cut = copy_export(directory, tmp_path / "cut")
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(ExportError, match=f"{cut / 'model.safetensors'} is not a whole "
                                          "safetensors file"):
        check_hf_weights(cut, read_hf_config(cut))
    short = copy_export(directory, tmp_path / "short", n_positions=64)  # wpe has 32 rows
    with pytest.raises(ExportError, match=r"transformer.wpe.weight has shape \(32, 64\), "
                                          r"config.json needs \(64, 64\)"):
        check_hf_weights(short, read_hf_config(short))
    for name, value, said in (("layer_norm_epsilon", "1e-5", 'layer_norm_epsilon must be a '
                               'finite number, got "1e-5"'),
                              # (null passed and then failed in init_warnings: a traceback)
                              ("layer_norm_epsilon", None, "layer_norm_epsilon must be a "
                               "finite number, got null"),
                              ("n_head", "2", 'n_head must be an integer >= 1, got "2"')):
        bad = copy_export(directory, tmp_path / name, **{name: value})
        with pytest.raises(ExportError, match=said):
            read_hf_config(bad)
    (bad / "config.json").write_text("[1, 2]")
    with pytest.raises(ExportError, match="is not a JSON object of settings"):
        read_hf_config(bad)


def test_a_config_field_left_out_is_named_as_missing_not_as_null(tmp_path, exported):
    # A config.json without n_layer said "n_layer must be an integer >= 1, got null": the user
    # looked for a null the file does not hold.
    _, directory = exported
    config = json.loads((directory / "config.json").read_text())
    for name in ("n_layer", "vocab_size"):
        bad = copy_export(directory, tmp_path / name)
        (bad / "config.json").write_text(json.dumps({k: v for k, v in config.items()
                                                     if k != name}))
        with pytest.raises(ExportError) as caught:
            read_hf_config(bad)
        assert str(caught.value) == (f"--init-from: {bad / 'config.json'}: {name} is missing "
                                     "(it must be an integer >= 1)")


def test_pretrain_init_from_a_cut_weights_file_is_one_line_before_ray(tmp_path, exported):
    """It failed inside every training worker after Ray started (55 s, exit 4, restarts)."""
    import subprocess
    import sys
    from pathlib import Path

    _, directory = exported
    cut = copy_export(directory, tmp_path / "cut")
    (cut / "model.safetensors").write_bytes((cut / "model.safetensors").read_bytes()[:1000])
    pretrain = Path(__file__).resolve().parents[2] / "jobs" / "pretrain.py"
    result = subprocess.run(
        [sys.executable, str(pretrain), "--init-from", str(cut), "--seq-len", "32",
         "--max-steps", "1", "--run-dir", str(tmp_path / "run")], capture_output=True,
        text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                                     # this checkout's package, not the one installed
                                     "PYTHONPATH": str(pretrain.parents[1])})
    assert result.returncode == 2, result.stderr
    assert f"{cut / 'model.safetensors'} is not a whole safetensors file" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_a_sharded_model_imports_as_its_single_file_does(tmp_path, exported):
    ours, directory = exported
    model = hf_model(directory)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    config = read_hf_config(tmp_path / "sharded")
    from orchestrator.hf_export import check_hf_weights

    check_hf_weights(tmp_path / "sharded", config)
    fresh = GPT(ours.config).eval()
    load_hf_weights(fresh, tmp_path / "sharded")
    ids = torch.randint(0, 257, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(fresh(ids)[0], ours(ids)[0])


def test_init_from_starts_learnable_spans_covering_the_context_and_says_padding(tmp_path,
                                                                                exported):
    from orchestrator.training.data_plan import configure_data

    _, directory = exported
    setup = configure_data(data=[], text_field="text", skip_bad_lines=False, tokenizer="bytes",
                           train_tokenizer=None, cache_root=str(tmp_path / "cache"),
                           retokenize=False, init_from=str(directory), saved=None,
                           say=lambda _: None)
    assert setup.fields["span_init"] == 1.0 and setup.fields["model_size"] == "tiny"
    from safetensors.torch import load_file, save_file

    padded = copy_export(directory, tmp_path / "padded", vocab_size=320)
    weights = load_file(str(padded / "model.safetensors"))
    wte = weights["transformer.wte.weight"]
    weights["transformer.wte.weight"] = torch.cat([wte, torch.zeros(320 - len(wte),
                                                                    wte.shape[1])])
    save_file(weights, str(padded / "model.safetensors"))
    with pytest.raises(Exception, match="the model has 320 token ids and its own "
                                        "tokenizer.json 257; ours needs them equal"):
        configure_data(data=[], text_field="text", skip_bad_lines=False, tokenizer="bytes",
                       train_tokenizer=None, cache_root=str(tmp_path / "cache"),
                       retokenize=False, init_from=str(padded), saved=None,
                       say=lambda _: None)


def test_export_never_overwrites_a_model_it_did_not_write_and_a_full_disk_keeps_the_old(
        tmp_path, exported, monkeypatch, capsys):
    from jobs import export
    from orchestrator import hf_export

    ours, directory = exported
    foreign = tmp_path / "downloaded"
    hf_model(directory).save_pretrained(foreign)
    config = json.loads((foreign / "config.json").read_text())  # as from the Hub: not ours
    (foreign / "config.json").write_text(json.dumps(
        {k: v for k, v in config.items() if k != "exported_by"}))
    before = {p.name: p.read_bytes() for p in foreign.iterdir()}
    save_untrained_checkpoint(tmp_path / "run" / "checkpoint_00000003", step=3)
    code = export.main(["--checkpoint", str(tmp_path / "run"), "--out", str(foreign)])
    assert code == 2 and "jobs/export.py did not write" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in foreign.iterdir()} == before
    # An earlier export, then a disk that fills while the tokenizer is written: the earlier
    # model and tokenizer stay together, and the error is one line naming --out.
    out = tmp_path / "out"
    assert export.main(["--checkpoint", str(tmp_path / "run"), "--out", str(out)]) == 0
    kept = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf_export, "_write_hf_files", lambda model, tok, d: (
        (d / "model.safetensors").write_bytes(b"new"), full_disk()))
    code = export.main(["--checkpoint", str(tmp_path / "run"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and f"--out {out}" in err and "No space left on device" in err, err
    assert "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == kept


def test_the_staging_of_an_export_killed_outright_is_removed_by_the_next(tmp_path):
    from jobs import export
    from orchestrator.hf_export import STAGING_MARKER

    import fcntl
    import os
    import socket

    save_untrained_checkpoint(tmp_path / "run" / "checkpoint_00000003", step=3)
    out = tmp_path / "out"
    host = socket.gethostname()
    dead = out / f".export-{host}-999999999"  # no such process here
    # An export that runs holds its marker's flock: left alone, even where its pid is not
    # one of this host's (a container sharing the host's name: it was removed mid-export).
    alive = out / f".export-{host}-999999997"
    # A killed export whose pid now runs another process (no flock held): removed (it was
    # kept for as long as that process ran).
    reused = out / f".export-{host}-{os.getppid()}"
    elsewhere = out / ".export-other-host-12"  # another machine's, fresh: left alone
    old = out / ".export-gone-host-13"  # another machine's, two days old: removed
    # A user's own directories of such names, without the staging marker, old or not: kept.
    users = [out / ".export-settings", out / f".export-{host}-999999998"]
    for staging in (dead, alive, reused, elsewhere, old, *users):
        staging.mkdir(parents=True)
        (staging / "model.safetensors").write_bytes(b"\0" * 1000)
        if staging not in users:
            (staging / STAGING_MARKER).touch()
    for directory in (old, *users):
        os.utime(directory, (0, os.path.getmtime(directory) - 2 * 86400))
    with open(alive / STAGING_MARKER) as running:
        fcntl.flock(running, fcntl.LOCK_EX)
        assert export.main(["--checkpoint", str(tmp_path / "run"), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob(".export-*")) == sorted(
        [alive.name, elsewhere.name, *(p.name for p in users)])


def save_run_checkpoint(directory, step=1, seed=0, diverged=False, **config):
    """A tiny training checkpoint (`diverged`: a NaN weight, as a run that blew up writes)."""
    train_config = TrainConfig(model_size="tiny", seq_len=32, **config)
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_train_config(train_config, vocab_size=train_config.vocab_size))
    if diverged:
        with torch.no_grad():
            model.ln_f.weight[0] = float("nan")
    save_checkpoint(directory, {"model": model.state_dict(), "config": train_config.to_dict(),
                                "step": step})
    return directory


def test_the_weights_are_as_readable_as_the_files_beside_them(tmp_path):
    """safetensors creates model.safetensors 0600: a serving process of another user on
    shared storage could read the config and tokenizer, not the weights."""
    import os

    from orchestrator.hf_export import EXPORT_FILES

    mask = os.umask(0o022)
    try:
        files = export_gpt2(sharp_model(), ByteTokenizer(), tmp_path / "hf")
    finally:
        os.umask(mask)
    assert sorted(f.name for f in files) == sorted(EXPORT_FILES)
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == \
        {f.name: "0o644" for f in files}


def test_a_run_says_which_newer_checkpoint_it_skipped_and_why(tmp_path, capsys):
    from jobs import export

    run = tmp_path / "run"
    save_run_checkpoint(run / "checkpoint_00000001", step=1)
    newest = save_run_checkpoint(run / "checkpoint_00000002", step=2)
    data = bytearray((newest / "state.pt").read_bytes())
    data[-100] ^= 0xFF
    (newest / "state.pt").write_bytes(bytes(data))
    assert export.main(["--checkpoint", str(run), "--out", str(tmp_path / "o")]) == 0
    captured = capsys.readouterr()
    assert f"warning: skipped an unusable newer checkpoint: checkpoint {newest / 'state.pt'} " \
           "is corrupt" in captured.err, captured.err
    assert f"exported {run / 'checkpoint_00000001'} (step 1" in captured.out


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_sharded_fsdp_checkpoint_exports_with_the_same_logits(tmp_path):
    # An FSDP run's checkpoint (meta.pt + torch.distributed.checkpoint's shards) is read whole
    # for the export: transformers must compute what the model in it computes.
    from orchestrator.training.checkpoint import save_sharded

    train_config = TrainConfig(model_size="tiny", seq_len=32)
    model = sharp_model(vocab_size=train_config.vocab_size)
    save_sharded(tmp_path / "checkpoint", {"model": model.state_dict(), "pending": {},
                                           "optimizer": {"state": {}, "param_groups": []}},
                 {"config": train_config.to_dict(), "step": 7}, rank=0)
    _, info = export_checkpoint(tmp_path / "checkpoint", tmp_path / "out")
    assert info["step"] == 7
    ids = torch.tensor([list(b"sharded, then whole")])
    with torch.no_grad():
        assert torch.allclose(hf_model(tmp_path / "out")(ids).logits, model(ids)[0],
                              atol=1e-4, rtol=0)


def test_a_run_names_a_newer_checkpoint_whose_save_was_cut_short(tmp_path, capsys):
    # A sharded checkpoint without rank 0's meta.pt (written last) and a directory left
    # empty were passed over without a word: the older checkpoint was exported silently.
    from jobs import export

    run = tmp_path / "run"
    save_run_checkpoint(run / "checkpoint_00000001", step=1)
    sharded = run / "checkpoint_00000002"
    sharded.mkdir()
    (sharded / ".metadata").write_bytes(b"index")
    (sharded / "__0_0.distcp").write_bytes(b"shard")
    empty = run / "checkpoint_00000003"
    empty.mkdir()
    assert export.main(["--checkpoint", str(run), "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert (f"warning: skipped an unusable newer checkpoint: sharded checkpoint {sharded} has "
            "no meta.pt (written last, by rank 0): incomplete") in err, err
    assert ("warning: skipped an unusable newer checkpoint: checkpoint file missing: "
            f"{empty / 'state.pt'}") in err, err


def test_a_diverged_checkpoint_is_not_exported_a_run_falls_back_past_it(tmp_path, capsys):
    """Its export succeeded, and transformers gave NaN logits: serving's forward probe
    decides here too."""
    from jobs import export

    run = tmp_path / "run"
    save_run_checkpoint(run / "checkpoint_00000001", step=1)
    diverged = save_run_checkpoint(run / "checkpoint_00000002", step=2, diverged=True)
    assert export.main(["--checkpoint", str(run), "--out", str(tmp_path / "o")]) == 0
    captured = capsys.readouterr()
    assert f"skipped an unusable newer checkpoint: model {diverged} has non-finite " \
           "weights" in captured.err, captured.err
    assert f"exported {run / 'checkpoint_00000001'} (step 1" in captured.out
    ids = torch.tensor([list(b"finite")])
    with torch.no_grad():
        assert torch.isfinite(hf_model(tmp_path / "o")(ids).logits).all()
    code = export.main(["--checkpoint", str(diverged), "--out", str(tmp_path / "o2")])
    err = capsys.readouterr().err
    assert code == 2 and f"model {diverged} has non-finite weights" in err, err
    assert not (tmp_path / "o2").exists()


def test_an_unreadable_checkpoint_is_blamed_on_the_checkpoint_not_on_out(tmp_path, capsys,
                                                                       monkeypatch):
    """chmod 000 state.pt was reported as '--out ...: the export failed: Permission denied:
    .../state.pt; an earlier export there is left as it was' (with no earlier export)."""
    from jobs import export
    from orchestrator.training import checkpoint

    directory = save_run_checkpoint(tmp_path / "run" / "checkpoint_00000005", step=5)
    real = checkpoint.sha256_file

    def no_permission(path):
        if path.name == "state.pt":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(checkpoint, "sha256_file", no_permission)  # (as root, chmod is moot)
    code = export.main(["--checkpoint", str(directory), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and f"error: checkpoint file {directory / 'state.pt'} cannot be read: " \
                         "Permission denied" in err, err
    assert "--out" not in err and "earlier export" not in err


def test_a_failed_export_mentions_an_earlier_export_only_when_there_was_one(
        tmp_path, capsys, monkeypatch):
    from jobs import export
    from orchestrator import hf_export

    save_untrained_checkpoint(tmp_path / "run" / "checkpoint_00000003", step=3)

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf_export, "_write_hf_files", full_disk)
    code = export.main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "new")])
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err and "earlier export" not in err, err


def test_export_files_in_an_out_without_its_config_are_not_overwritten(tmp_path, capsys):
    """A user's tokenizer_config.json was replaced without a word."""
    from jobs import export

    save_untrained_checkpoint(tmp_path / "run" / "checkpoint_00000003", step=3)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "tokenizer_config.json").write_text('{"mine": true}')
    (out / "tokenizer.json").write_text("{}")
    code = export.main(["--checkpoint", str(tmp_path / "run"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and f"--out {out}: it has no config.json, yet holds tokenizer.json, " \
                         "tokenizer_config.json" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert (out / "tokenizer_config.json").read_text() == '{"mine": true}'
    # A config.json that cannot be read is said to be so, not taken for another model's.
    unreadable = tmp_path / "unreadable"
    (unreadable / "config.json").mkdir(parents=True)
    code = export.main(["--checkpoint", str(tmp_path / "run"), "--out", str(unreadable)])
    err = capsys.readouterr().err
    assert code == 2 and "its config.json cannot be read ([Errno 21] Is a directory" in err, err
    assert "not a Hugging Face model's" not in err


def test_an_interrupt_while_renaming_never_leaves_a_loadable_mix(tmp_path, capsys,
                                                                  monkeypatch):
    """Ctrl-C after model.safetensors was renamed left the new weights beside the old config
    and tokenizer, which transformers loads, and said 'nothing is half-written'."""
    import os

    from jobs import export

    old_run = tmp_path / "old"
    save_run_checkpoint(old_run / "checkpoint_00000001", seed=1)
    new_run = tmp_path / "new"
    save_run_checkpoint(new_run / "checkpoint_00000001", seed=2, vocab_size=257,
                        tokenizer_sha256=ByteTokenizer().sha256)  # another tokenizer too
    exports = {}
    for name, run in (("old", old_run), ("new", new_run)):
        assert export.main(["--checkpoint", str(run), "--out", str(tmp_path / f"{name}-hf")]) \
            == 0
        exports[name] = {p.name: p.read_bytes() for p in (tmp_path / f"{name}-hf").iterdir()}
    real_replace = os.replace
    for interrupt_at in range(1, len(exports["new"]) + 1):
        out = tmp_path / f"out{interrupt_at}"
        assert export.main(["--checkpoint", str(old_run), "--out", str(out)]) == 0
        calls = []

        def replace(src, dst):
            calls.append(dst)
            if len(calls) == interrupt_at:
                raise KeyboardInterrupt
            return real_replace(src, dst)

        monkeypatch.setattr(os, "replace", replace)
        code = export.main(["--checkpoint", str(new_run), "--out", str(out)])
        monkeypatch.setattr(os, "replace", real_replace)
        err = capsys.readouterr().err
        assert code == 130 and "nothing is half-written" not in err, err
        left = {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")}
        if "config.json" in left:  # loadable: then wholly the old export
            assert left == exports["old"], (interrupt_at, sorted(left))
        # Running it again finishes the export (the files are known to be ours).
        assert export.main(["--checkpoint", str(new_run), "--out", str(out)]) == 0
        assert {p.name: p.read_bytes() for p in out.iterdir()} == exports["new"]


def test_refusals_name_the_checkpoint_once(tmp_path, capsys):
    from jobs import export
    from orchestrator.serving.loading import INT8_FILE

    def error_of(directory):
        code = export.main(["--checkpoint", str(directory), "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2 and not (tmp_path / "o").exists(), err
        return err

    # A BPE run whose tokenizer.json was deleted.
    no_tokenizer = save_run_checkpoint(tmp_path / "bpe" / "checkpoint_00000001",
                                       vocab_size=300, tokenizer_sha256="ab" * 32)
    err = error_of(no_tokenizer)
    assert err.count(str(no_tokenizer)) == 1 and "no tokenizer.json is beside it" in err, err
    # A pruned model, a span short of the context: which checkpoint is refused.
    pruned = tmp_path / "pruned" / "checkpoint_00000001"
    config = TrainConfig(model_size="tiny", seq_len=32)
    model = GPT(dataclasses.replace(GPTConfig.from_train_config(config), mlp_hidden=(64, 128)))
    save_checkpoint(pruned, {"model": model.state_dict(), "config": config.to_dict(), "step": 1})
    assert f"error: {pruned}: cannot export as GPT-2: the model is structurally pruned" in \
        error_of(pruned)
    span = save_run_checkpoint(tmp_path / "span" / "checkpoint_00000001", attention_span=True,
                               span_init=0.2)
    assert f"error: {span}: cannot export as GPT-2: the model was trained with the learnable " \
           "attention span" in error_of(span)
    int8 = tmp_path / "int8"
    int8.mkdir()
    (int8 / INT8_FILE).write_bytes(b"")
    assert f"{int8} is an INT8 model, which GPT-2 cannot hold: its {int8 / 'model.int8.onnx'}" \
        in error_of(int8)
    # A compress output's int8/ (the output named, or its int8/): the teacher to export.
    compressed = tmp_path / "compressed"
    (compressed / "int8").mkdir(parents=True)
    (compressed / "int8" / INT8_FILE).write_bytes(b"")
    (compressed / "compress_config.json").write_text(json.dumps(
        {"compress": {}, "source": {"checkpoint": str(pruned)}}))
    for given in (compressed, compressed / "int8"):
        assert f"export the training checkpoint {compressed} was compressed from, {pruned}" \
            in error_of(given)


def test_the_unfinished_export_marker_is_not_taken_for_a_staging_directory():
    from orchestrator.hf_export import STAGING_PREFIX, UNFINISHED_MARKER

    assert not UNFINISHED_MARKER.startswith(STAGING_PREFIX)


def test_a_model_fine_tuned_from_an_export_and_saved_back_is_not_overwritten(
        tmp_path, capsys):
    """transformers keeps unknown config keys: a model loaded from an export, fine-tuned and
    saved back (or elsewhere) still says exported_by. Its weights are not the export's."""
    from jobs import export

    save_untrained_checkpoint(tmp_path / "run" / "checkpoint_00000003", step=3)
    out = tmp_path / "out"
    assert export.main(["--checkpoint", str(tmp_path / "run"), "--out", str(out)]) == 0
    tuned = hf_model(out)
    with torch.no_grad():
        tuned.transformer.wte.weight.add_(1.0)
    for target in (out, tmp_path / "elsewhere"):
        tuned.save_pretrained(target)
        assert json.loads((target / "config.json").read_text())["exported_by"]
        before = {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()}
        code = export.main(["--checkpoint", str(tmp_path / "run"), "--out", str(target)])
        err = capsys.readouterr().err
        assert code == 2 and "model.safetensors is not the one jobs/export.py wrote" in err, err
        assert {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()} == before
    # An export left as written is replaced, as before.
    fresh = tmp_path / "fresh"
    assert export.main(["--checkpoint", str(tmp_path / "run"), "--out", str(fresh)]) == 0
    assert export.main(["--checkpoint", str(tmp_path / "run"), "--out", str(fresh)]) == 0


def test_the_shipped_tokenizer_adds_no_token_training_never_saw(tmp_path):
    """A Llama-style tokenizer.json puts <s> before every text through its post-processor;
    training (and our serving) encode without it, so transformers must too."""
    from tokenizers import Tokenizer as RawTokenizer, models, pre_tokenizers, processors

    from orchestrator.tokenizer import tokenizer_from_json

    words = ["<s>", "<|endoftext|>", "the", "cat", "sat", "[UNK]"]
    raw = RawTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", 0)])
    raw.enable_truncation(2)
    ours = tokenizer_from_json(raw.to_str(), "wordlevel")
    export_gpt2(sharp_model(vocab_size=len(words)), ours, tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert theirs("the cat sat").input_ids == ours.encode("the cat sat") == [2, 3, 4]


def test_out_is_expanded_and_an_empty_flag_is_refused(tmp_path, monkeypatch, capsys):
    from jobs import export

    save_untrained_checkpoint(tmp_path / "run" / "checkpoint_00000003", step=3)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert export.main(["--checkpoint", str(tmp_path / "run"), "--out=~/model"]) == 0
    assert (tmp_path / "home" / "model" / "config.json").is_file()
    assert not (tmp_path / "~").exists()
    for argv in (["--checkpoint", str(tmp_path / "run"), "--out", ""],
                 ["--checkpoint", " ", "--out", str(tmp_path / "x")]):
        with pytest.raises(SystemExit) as exit_:
            export.main(argv)
        flag = "--out" if argv[-1] == "" else "--checkpoint"
        assert exit_.value.code == 2 and f"{flag} is empty" in capsys.readouterr().err
    assert not (tmp_path / "config.json").exists()


def test_an_out_inside_a_runs_checkpoint_is_refused_naming_it(tmp_path, capsys):
    """An export into a run's checkpoint folder was deleted with it by training's checkpoint
    retention (and one named checkpoint_* beside them would be taken for one)."""
    from jobs import export

    run = tmp_path / "run"
    checkpoint = save_untrained_checkpoint(run / "checkpoint_00000003", step=3)
    for out, folder in ((checkpoint / "hf", checkpoint), (checkpoint / "a" / "b", checkpoint),
                        (run / "checkpoint_hf", run / "checkpoint_hf")):
        code = export.main(["--checkpoint", str(run), "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and f"--out {out}: " in err and str(folder) in err, err
        assert "checkpoint retention" in err and str(tmp_path / "run-hf") in err, err
        assert not out.exists() and not (checkpoint / "a").exists()
    with pytest.raises(ExportError, match="checkpoint retention"):  # the library's call too
        export_checkpoint(run, checkpoint / "hf")
    # A folder of another name, or checkpoint_* outside any run, is fine.
    for out in (tmp_path / "run-hf", tmp_path / "checkpoint_exports" / "m"):
        assert export.main(["--checkpoint", str(run), "--out", str(out)]) == 0
        assert (out / "config.json").is_file()


def test_export_checkpoint_expands_a_tilde_in_out_as_the_cli_does(tmp_path, monkeypatch):
    save_untrained_checkpoint(tmp_path / "run" / "checkpoint_00000003", step=3)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    files, _ = export_checkpoint(tmp_path / "run", "~/model")
    assert (tmp_path / "home" / "model" / "config.json").is_file()
    assert all(f.parent == tmp_path / "home" / "model" for f in files)
    assert not (tmp_path / "~").exists()


def test_a_home_of_no_user_is_one_line_naming_the_flag(tmp_path, capsys):
    # `--out ~bob/model` with no user bob (the shell leaves it as written): Path.expanduser
    # raised RuntimeError, a traceback from --out, --checkpoint and --init-from alike.
    from jobs import export

    save_untrained_checkpoint(tmp_path / "run" / "checkpoint_00000001", step=1)
    for argv, flag in ((["--checkpoint", str(tmp_path / "run"), "--out", "~nosuchuser-hf55/m"],
                        "--out"),
                       (["--checkpoint", "~nosuchuser-hf55/run", "--out", str(tmp_path / "o")],
                        "checkpoint")):
        with pytest.raises(SystemExit) as exit_:
            code = export.main(argv)
            raise SystemExit(code)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and flag in err and "~nosuchuser-hf55" in err, err
        assert "Traceback" not in err
    for read in (read_hf_config, lambda d: load_hf_weights(sharp_model(), d)):
        with pytest.raises(ExportError, match="--init-from.*~nosuchuser-hf55"):
            read("~nosuchuser-hf55/model")


@pytest.mark.parametrize("value,written", [(10 ** 400, "1" + "0" * 400), (float("nan"), "NaN"),
                                           (float("inf"), "Infinity")],
                         ids=["past-float", "nan", "inf"])
def test_a_layer_norm_epsilon_no_float_holds_is_named_not_a_traceback(tmp_path, exported,
                                                                     value, written):
    # An integer past float's range: OverflowError in init_warnings, a traceback; NaN (which
    # Python's json reads) passed without the warning a different epsilon gets.
    from orchestrator.hf_export import init_warnings

    _, directory = exported
    bad = copy_export(directory, tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "layer_norm_epsilon": value}))
    with pytest.raises(ExportError, match=f"layer_norm_epsilon must be a finite number, got "
                                          f"{written[:20]}"):
        init_warnings(read_hf_config(bad))


def test_weights_of_an_integer_dtype_are_refused_naming_the_tensor(tmp_path, exported):
    # A quantized model's int8 weights with GPT-2's shapes passed every check and loaded
    # cast to float: integer codes as weights, a model of noise, said nowhere.
    from safetensors.torch import load_file, save_file

    from orchestrator.hf_export import check_hf_weights

    _, directory = exported
    quantized = copy_export(directory, tmp_path / "int8")
    tensors = load_file(str(quantized / "model.safetensors"))
    name = "transformer.h.0.attn.c_attn.weight"
    tensors[name] = tensors[name].clamp(-1, 1).mul(127).to(torch.int8)
    save_file(tensors, str(quantized / "model.safetensors"))
    with pytest.raises(ExportError, match=f"{quantized / 'model.safetensors'}: {name} is I8, "
                                          "not floating point"):
        check_hf_weights(quantized, read_hf_config(quantized))
    with pytest.raises(ExportError, match=f"{name} is int8, not floating point"):
        load_hf_weights(sharp_model(), quantized)


def test_the_byte_tokenizers_end_of_text_spelling_in_text_stays_bytes(tmp_path):
    """Our byte tokenizer reads "<|endoftext|>" in a text as its 13 bytes (bytes never spell
    end-of-text; training and serving encode so); transformers matched the spelling as the
    special token 256, so the exported tokenizer gave the model a document boundary where
    training saw text. A tokenizer that matches it (BPE) keeps matching it."""
    from orchestrator.tokenizer import EOT_TOKEN

    text = f"hi{EOT_TOKEN}there"
    byte = ByteTokenizer()
    export_gpt2(sharp_model(), byte, tmp_path / "bytes")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "bytes", local_files_only=True)
    assert theirs(text).input_ids == byte.encode(text) == list(text.encode())
    assert theirs.eos_token_id == byte.eos_id == 256
    assert theirs.decode(theirs(text).input_ids) == text
    bpe = train_bpe([f"the café number {i} opens at dawn" for i in range(300)], 320)
    export_gpt2(sharp_model(vocab_size=bpe.vocab_size), bpe, tmp_path / "bpe")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "bpe", local_files_only=True)
    assert theirs(text).input_ids == bpe.encode(text)
    assert bpe.eos_id in bpe.encode(text)


def test_an_int8_export_folder_itself_is_refused_as_one(tmp_path, capsys):
    """--out at a compress output's int8/ (config.json of its own, no model_type) was refused
    as "a config.json that is not a GPT-2 model's (a run's own?)"; one without its config.json
    got the Hugging Face files written beside weights.int8.pt."""
    from jobs import export
    from orchestrator.serving.loading import INT8_FILE

    save_untrained_checkpoint(tmp_path / "run" / "checkpoint_00000003", step=3)
    for name, files in (("whole", {INT8_FILE: b"model", "config.json": b'{"scheme": "int8"}'}),
                        ("bare", {INT8_FILE: b"model"})):
        folder = tmp_path / name / "int8"
        folder.mkdir(parents=True)
        for file, data in files.items():
            (folder / file).write_bytes(data)
        code = export.main(["--checkpoint", str(tmp_path / "run"), "--out", str(folder)])
        err = capsys.readouterr().err
        assert code == 2 and f"--out {folder}: it is an INT8 export ({INT8_FILE})" in err, err
        assert sorted(p.name for p in folder.iterdir()) == sorted(files)


def test_an_export_is_never_swept_before_it_holds_its_markers_flock(tmp_path, monkeypatch):
    # Another export's sweep (another process: its shared flock probe) between this export's
    # creating its marker and locking it: the marker, unlocked, read as a dead export's, and
    # its staging directory was removed under it (with flock, the pid is not asked).
    from jobs import export
    from orchestrator import file_lock, hf_export

    from tests.support import sweep_when_first_locked

    save_untrained_checkpoint(tmp_path / "run" / "checkpoint_00000003", step=3)
    out = tmp_path / "out"
    # the other export's sweep, at that moment (file_lock.created_locked takes the flock)
    swept = sweep_when_first_locked(monkeypatch, file_lock,
                                    lambda: hf_export._remove_stale_staging(out))
    assert export.main(["--checkpoint", str(tmp_path / "run"), "--out", str(out)]) == 0
    assert swept and (out / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """A jobs/compress.py --out made in process (no Ray) from a tiny BPE teacher run: its
    original/, pruned/ (MLP channels, per layer: one width in every layer) and qat/ stages, a
    few steps each, and the compress_config.json that records the teacher."""
    from orchestrator.compression.config import CompressConfig
    from orchestrator.compression.pipeline import (Run, prepare_out, stage_original, stage_prune,
                                                   stage_qat)
    from orchestrator.compression.source import load_teacher
    from orchestrator.training.data import load_corpus, split_corpus

    root = tmp_path_factory.mktemp("compress")
    bpe = train_bpe([f"the café number {i} opens at dawn" for i in range(300)], 320)
    run = root / "run"
    save_run_checkpoint(run / "checkpoint_00000002", step=2, vocab_size=bpe.vocab_size,
                        tokenizer_sha256=bpe.sha256)
    save_tokenizer(bpe, run)
    teacher, source = load_teacher(run, lambda _: None)
    config = CompressConfig(prune_structure="channels", prune_scope="per_layer", prune_steps=3,
                            prune_every=1, qat_steps=2, batch_size=2, seq_len=32, device="cpu",
                            log_every=100)
    out = root / "compressed"
    prepare_out(out, config, source, 32, lambda _: None)
    stages = Run(out, config, teacher.eval().requires_grad_(False),
                 split_corpus(load_corpus())[0], torch.device("cpu"), 32, lambda _: None, bpe)
    stage_original(stages, source)
    student = GPT(teacher.config)
    student.load_state_dict(teacher.state_dict())
    pruned, masks, _ = stage_prune(stages, student)
    assert len(set(pruned.config.mlp_hidden)) == 1 and pruned.config.n_heads_per_layer is None
    stage_qat(stages, pruned, masks)
    return out, bpe


def test_a_compress_stage_with_a_gpt2_form_exports_with_the_same_logits(compressed, tmp_path,
                                                                         capsys):
    """docs/compression.md: an MLP pruned to one width has GPT-2's form; jobs/export.py refused
    every compress stage folder ("nothing in a compress output ... has a GPT-2 form")."""
    from jobs import export
    from orchestrator.compression import prune
    from orchestrator.compression.export import dequantized_twin
    from orchestrator.compression.qat import qmax_for_bits

    out, bpe = compressed
    ids = torch.tensor([bpe.encode("the café number 7 opens")])
    for stage in ("original", "pruned", "qat"):
        hf = tmp_path / stage
        code = export.main(["--checkpoint", str(out / stage), "--out", str(hf)])
        said = capsys.readouterr()
        assert code == 0, said.err
        assert f"exported the compress stage {out / stage}" in said.out, said.out
        ours = stage_model(out / stage)
        if stage == "qat":  # its weights as int8/ holds them: int8 x scale, in fp32
            twin = dequantized_twin(ours, prune.prunable_names(ours), qmax_for_bits(7))
            assert not torch.equal(twin.blocks[0].mlp.fc.weight, ours.blocks[0].mlp.fc.weight)
            ours = twin
        theirs = transformers.GPT2LMHeadModel.from_pretrained(hf).eval()
        with torch.no_grad():
            assert torch.allclose(theirs(ids).logits, ours(ids)[0], atol=1e-4, rtol=0), stage
        config = json.loads((hf / "config.json").read_text())
        assert config["n_inner"] == (None if stage == "original" else
                                     ours.config.mlp_hidden[0])
        # The teacher's tokenizer travels with it (compress_config.json records it).
        assert transformers.AutoTokenizer.from_pretrained(hf)("café").input_ids == \
            bpe.encode("café")


def test_a_compress_stage_without_a_gpt2_form_is_refused_in_one_line(compressed, tmp_path,
                                                                     capsys):
    import shutil

    from jobs import export
    from orchestrator.compression.pipeline import _save_stage
    from orchestrator.serving.loading import INT8_FILE

    source, _ = compressed
    out = tmp_path / "compressed"
    shutil.copytree(source, out)
    shutil.rmtree(out / "pruned")
    base = stage_model(source / "pruned").config

    def error_of(directory):
        code = export.main(["--checkpoint", str(directory), "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2 and not (tmp_path / "o").exists(), err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        return err

    for change, said in ((dict(mlp_hidden=(64, 128)), "its MLP widths differ between layers"),
                         (dict(n_heads_per_layer=(1, 2)), "its attention heads are")):
        _save_stage(out / "pruned", GPT(dataclasses.replace(base, **change)), None,
                    {"stage": "prune"})
        err = error_of(out / "pruned")
        assert f"error: {out / 'pruned'}: cannot export as GPT-2: the model is structurally " \
               f"pruned: {said}" in err, err
        assert "--prune-structure channels --prune-scope per_layer" in err, err
    # int8/ (named, or the compress output it is in): the ONNX file it already is.
    (out / "int8").mkdir()
    (out / "int8" / INT8_FILE).write_bytes(b"")
    for given in (out, out / "int8"):
        err = error_of(given)
        assert f"{out / 'int8'} is an INT8 model" in err and \
            f"{out / 'int8' / 'model.int8.onnx'}" in err and f"{out / 'qat'}" in err, err


def test_an_int8_export_refused_names_only_the_stages_that_export(compressed, tmp_path,
                                                                   capsys):
    """A user walk: compress's default pruning (heads and channels, global) left MLP widths
    that differ, and exporting its int8/ suggested pruned/ and qat/, which are refused in
    turn. They have int8/'s shape (its config.json records it): suggested only when it has
    GPT-2's form."""
    import shutil

    from jobs import export
    from orchestrator.compression.export import CONFIG_FILE
    from orchestrator.compression.pipeline import _save_stage
    from orchestrator.serving.loading import INT8_FILE

    source, _ = compressed
    out = tmp_path / "compressed"
    shutil.copytree(source, out)
    shutil.rmtree(out / "qat")
    one_width = stage_model(source / "pruned").config
    (out / "int8").mkdir()
    (out / "int8" / INT8_FILE).write_bytes(b"")

    def error_with_int8_shaped(config):
        (out / "int8" / CONFIG_FILE).write_text(
            json.dumps({"gpt_config": dataclasses.asdict(config)}))
        _save_stage(out / "pruned", GPT(config), None, {"stage": "prune"})
        code = export.main(["--checkpoint", str(out / "int8"), "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        return err

    teacher = json.loads((out / "compress_config.json").read_text())["source"]["checkpoint"]
    err = error_with_int8_shaped(dataclasses.replace(one_width, mlp_hidden=(64, 128)))
    assert str(out / "pruned") not in err, err
    assert f"export the training checkpoint {out} was compressed from, {teacher}" in err, err
    assert "its MLP widths differ between layers" in err, err
    err = error_with_int8_shaped(one_width)
    assert f"export a stage of the compress output {out}: {out / 'pruned'}, or the " \
           f"training checkpoint it was compressed from, {teacher}" in err, err


def stage_model(directory):
    """The model a compress stage folder holds, as the pipeline reads it back."""
    from orchestrator.compression.pipeline import _load_stage

    return _load_stage(directory, lambda _: None)[0]


def test_a_compress_stage_takes_the_teachers_tokenizer_from_int8_once_the_run_is_gone(
        compressed, tmp_path, capsys):
    import shutil

    from jobs import export

    source, bpe = compressed
    out = tmp_path / "compressed"
    shutil.copytree(source, out)
    saved = json.loads((out / "compress_config.json").read_text())
    saved["source"]["checkpoint"] = str(tmp_path / "moved" / "checkpoint_00000002")
    (out / "compress_config.json").write_text(json.dumps(saved))
    code = export.main(["--checkpoint", str(out / "pruned"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "the teacher's tokenizer" in err and "Traceback" not in err, err
    save_tokenizer(bpe, out / "int8")  # what a finished compress run's int8/ carries
    assert export.main(["--checkpoint", str(out / "pruned"), "--out", str(tmp_path / "o")]) == 0
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "o")("café").input_ids == \
        bpe.encode("café")


def test_an_out_in_a_compress_stage_folder_is_refused_naming_it(compressed, tmp_path, capsys):
    """--out at a stage folder wrote the Hugging Face files beside its weights.pt: the folder
    then read as a Hugging Face model to serving and export, and a compress rerun that finds
    the stage unusable moves it away whole, the export with it."""
    import shutil

    from jobs import export

    out = tmp_path / "compressed"
    shutil.copytree(compressed[0], out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for target, said in ((out / "pruned", "it is"), (out / "pruned" / "hf", "it is in")):
        code = export.main(["--checkpoint", str(out / "original"), "--out", str(target)])
        err = capsys.readouterr().err
        assert code == 2 and f"--out {target}: {said} {out / 'pruned'}, a jobs/compress.py " \
                             "stage folder" in err, err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_pruned_stage_refused_for_its_span_is_not_told_to_prune_per_layer(compressed,
                                                                            tmp_path, capsys):
    # A pruned/ stage of one MLP width (GPT-2's form) whose learnable span does not cover the
    # context: the refusal is the span's, and its hint ("--prune-scope per_layer prunes every
    # layer's MLP to one width, which exports") sent the user to redo a pruning that already
    # had that form. The hint stays for a pruning GPT-2 cannot hold.
    import shutil

    from jobs import export
    from orchestrator.compression.pipeline import _save_stage

    source, _ = compressed
    out = tmp_path / "compressed"
    shutil.copytree(source, out)
    shutil.rmtree(out / "pruned")
    base = stage_model(source / "pruned").config
    assert len(set(base.mlp_hidden)) == 1
    for change, said, hinted in (
            (dict(attention_span=True, span_init=0.2), "learnable attention span", False),
            (dict(mlp_hidden=(64, 128)), "its MLP widths differ between layers", True)):
        shutil.rmtree(out / "pruned", ignore_errors=True)
        _save_stage(out / "pruned", GPT(dataclasses.replace(base, **change)), None,
                    {"stage": "prune"})
        code = export.main(["--checkpoint", str(out / "pruned"), "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2 and said in err, err
        assert ("--prune-scope per_layer" in err) == hinted, err


def test_export_gpt2_ships_the_tokenizer_the_model_reads_or_refuses_it(tmp_path):
    # export_gpt2 wrote whatever tokenizer it was given: a 256-row (pre-tokenizer) byte model
    # with the 257-token ByteTokenizer said eos_token_id 256, past its embedding (transformers
    # warned; an eos appended to a fine-tuning text raised IndexError), and a BPE of fewer ids
    # than the model's rows generated ids the tokenizer has no text for. export_checkpoint
    # already shipped tokenizer_for_model's choice; the library call does the same now.
    export_gpt2(sharp_model(vocab_size=256), ByteTokenizer(), tmp_path / "bytes")
    config = json.loads((tmp_path / "bytes" / "config.json").read_text())
    assert config["vocab_size"] == 256 and config["eos_token_id"] is None
    assert len(transformers.AutoTokenizer.from_pretrained(tmp_path / "bytes")) == 256
    bpe = train_bpe([f"the café number {i} opens at dawn" for i in range(300)], 320)
    with pytest.raises(ExportError, match=f"has {bpe.vocab_size} tokens but the model 400"):
        export_gpt2(sharp_model(vocab_size=400), bpe, tmp_path / "bpe")
    assert not (tmp_path / "bpe").exists()


def test_init_from_a_file_of_the_model_says_to_give_its_folder(exported):
    # `--init-from DIR/config.json` (or DIR/model.safetensors) was refused as
    # "--init-from DIR/config.json: no such directory", a path that plainly exists.
    _, directory = exported
    for name in ("config.json", "model.safetensors"):
        with pytest.raises(ExportError, match=f"--init-from {directory / name} is a file; "
                                              f"give the directory that holds it \\({directory}\\)"):
            read_hf_config(directory / name)
    with pytest.raises(ExportError, match="no such directory"):
        read_hf_config(directory / "nope")


@pytest.mark.parametrize("weights", ["pytorch_model.bin", "pytorch_model.bin.index.json"])
def test_a_hugging_face_model_of_pickled_weights_is_named_as_one(tmp_path, capsys, weights):
    # A model saved before safetensors (pytorch_model.bin, or its shard index) given as
    # --checkpoint was "holds no model: expected state.pt (checkpoint) or ...", where one in
    # model.safetensors is named a Hugging Face model, with what to export instead.
    from jobs import export

    model = tmp_path / "downloaded"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (model / weights).write_bytes(b"{}")
    code = export.main(["--checkpoint", str(model), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and f"checkpoint {model} is a Hugging Face model" in err, err
    assert "the training checkpoint it came from" in err and "Traceback" not in err, err


@pytest.mark.parametrize("step", ["x", -1, True, 2.5])
def test_a_checkpoint_whose_step_is_no_step_is_refused_naming_the_field(tmp_path, step):
    # Its step was passed on as it was: the export recorded 'step': 'x'.
    from orchestrator.training.checkpoint import CheckpointError, checkpoint_header

    config = TrainConfig(model_size="tiny", seq_len=32)
    model = GPT(GPTConfig.from_train_config(config, vocab_size=config.vocab_size))
    directory = tmp_path / "run" / "checkpoint_00000001"
    save_checkpoint(directory, {"model": model.state_dict(), "config": config.to_dict(),
                                "step": step})
    said = (f"{directory / 'state.pt'}: its 'step' must be an integer >= 0, got {step!r}: "
            "not a training checkpoint")
    for read in (lambda: export_checkpoint(directory, tmp_path / "hf"),
                 lambda: checkpoint_header(directory),  # (a resume's)
                 lambda: load_model(directory)):
        with pytest.raises(CheckpointError) as caught:
            read()
        assert str(caught.value) == said
