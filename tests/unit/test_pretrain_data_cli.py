"""Bad data, tokenizer and --init-from input to jobs/pretrain.py: one clear line naming the
file or flag, exit 2, before Ray starts (the unit tier's conftest makes ray.init raise), and no
run directory left behind. In-process: a subprocess per case would cost seconds each."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.config import TrainConfig
from orchestrator.training import data_plan
from orchestrator.training.corpus import DataError, expand_sources
from orchestrator.tokenizer import ByteTokenizer, save_tokenizer, train_bpe
from jobs import pretrain


@pytest.fixture(autouse=True)
def runs_root(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCHESTRATOR_RUNS_DIR", str(tmp_path / "runs"))


def run_pretrain(*args, capsys):
    code = pretrain.main(list(args))
    return code, capsys.readouterr().err


def refused(tmp_path, capsys, *args):
    run_dir = tmp_path / "runs" / "new"
    code, err = run_pretrain(*args, "--run-dir", str(run_dir), capsys=capsys)
    assert code == 2, err
    assert "Traceback" not in err
    assert not (run_dir / "config.json").exists()
    return err


def test_a_missing_data_path_is_named(tmp_path, capsys):
    assert f"--data {tmp_path}/nope: no such file or directory" in refused(
        tmp_path, capsys, "--data", str(tmp_path / "nope"))


def test_an_empty_file_and_a_corrupt_parquet_file_are_named(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    assert f"file {tmp_path}/empty.txt is empty" in refused(
        tmp_path, capsys, "--data", str(tmp_path / "empty.txt"))
    (tmp_path / "bad.parquet").write_bytes(b"PAR1" + b"\0" * 64)
    assert f"{tmp_path}/bad.parquet: not a readable parquet file" in refused(
        tmp_path, capsys, "--data", str(tmp_path / "bad.parquet"))


def test_a_parquet_file_without_the_text_field_names_the_flag(tmp_path, capsys):
    pq.write_table(pa.table({"content": ["a" * 100]}), tmp_path / "a.parquet")
    assert "no column 'body' (--text-field)" in refused(
        tmp_path, capsys, "--data", str(tmp_path / "a.parquet"), "--text-field", "body")


def test_a_jsonl_file_without_the_text_field_is_named_before_ray_starts(tmp_path, capsys):
    # It was named by a tokenizing task after Ray had started; with --skip-bad-lines a wrong
    # --text-field skipped every line and the run stopped later for want of data.
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"content": f"document {i}", "id": i}) + "\n"
                            for i in range(50)))
    err = refused(tmp_path, capsys, "--data", str(path))
    assert f"{path}:1: no 'text' field (--text-field); its fields: 'content', 'id'" in err, err
    err = refused(tmp_path, capsys, "--data", str(path), "--skip-bad-lines")
    assert f"{path}: none of its first 50 lines has the field, so --skip-bad-lines would " \
        "skip them all (line 1: no 'text' field" in err, err
    # Some bad lines among good ones are what --skip-bad-lines is for: not refused here.
    from orchestrator.training.corpus import SourceFile, check_jsonl_head

    path.write_text('{"text": "fine"}\n[1, 2]\n{"text": "fine too"}\n')
    source = SourceFile(str(path), "jsonl", path.stat().st_size, path.stat().st_mtime_ns)
    check_jsonl_head(source, "text", skip_bad_lines=True)
    # ... even a head of them (null texts sorted first), as long as the field is there.
    nulls = tmp_path / "nulls.jsonl"
    nulls.write_text('{"text": null}\n' * 5 + '{"text": "later"}\n')
    check_jsonl_head(SourceFile(str(nulls), "jsonl", nulls.stat().st_size,
                                nulls.stat().st_mtime_ns), "text", skip_bad_lines=True)
    with pytest.raises(DataError, match=f"{path}:2: a JSON list, not an object"):
        check_jsonl_head(source, "text", skip_bad_lines=False)


def test_a_tokenizer_file_that_does_not_parse_is_named(tmp_path, capsys):
    (tmp_path / "tok.json").write_text("{not json")
    assert f"--tokenizer: {tmp_path}/tok.json is not a Hugging Face tokenizers file: not " \
        "valid JSON" in refused(tmp_path, capsys, "--tokenizer", str(tmp_path / "tok.json"))
    # Valid JSON of another shape read like a syntax error ("expected `,` or `}`")
    (tmp_path / "tok.json").write_text('{"hello": "world"}')
    assert "valid JSON, but not a tokenizer: it has no 'model'" in refused(
        tmp_path, capsys, "--tokenizer", str(tmp_path / "tok.json"))
    from orchestrator.tokenizer import TokenizerError, load_tokenizer_file

    (tmp_path / "tok.json").write_text("[" * 100_000 + "]" * 100_000)  # a RecursionError
    with pytest.raises(TokenizerError, match="not valid JSON"):
        load_tokenizer_file(tmp_path / "tok.json")


def test_a_tokenizer_vocabulary_too_small_is_refused(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("some text\n\n" * 50)
    assert "--train-tokenizer must be a vocabulary size in [257, 1048576], got 12" in refused(
        tmp_path, capsys, "--data", str(tmp_path / "a.txt"), "--train-tokenizer", "12")


def test_resuming_with_another_tokenizer_is_refused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoint_2026-01-01_00-00-00.000000").mkdir(parents=True)
    train = {**TrainConfig().to_dict(), "vocab_size": 257,
             "tokenizer_sha256": ByteTokenizer().sha256}
    (run_dir / "config.json").write_text(json.dumps({"train": train}))
    save_tokenizer(ByteTokenizer(), run_dir)
    bpe = train_bpe([f"words {i} and more words" for i in range(100)], 300)
    save_tokenizer(bpe, tmp_path / "bpe")
    code, err = run_pretrain("--resume", "--run-dir", str(run_dir), "--tokenizer",
                             str(tmp_path / "bpe"), capsys=capsys)
    assert code == 2
    assert "it was trained with another tokenizer" in err
    assert (run_dir / "tokenizer.json").read_text() == ByteTokenizer().to_json()  # untouched


def test_init_from_a_directory_without_a_model_is_named(tmp_path, capsys):
    assert f"--init-from {tmp_path}: no config.json" in refused(
        tmp_path, capsys, "--init-from", str(tmp_path))


def test_init_from_a_model_shorter_than_the_sequence_length_is_refused_before_training(
        tmp_path, capsys):
    from orchestrator.hf_export import export_gpt2
    from orchestrator.training.model import GPT, GPTConfig

    config = TrainConfig(model_size="tiny", seq_len=64)
    export_gpt2(GPT(GPTConfig.from_train_config(config, vocab_size=257)), ByteTokenizer(),
                tmp_path / "hf")
    assert (f"--init-from {tmp_path / 'hf'}: the model has 64 positions (n_positions) and "
            "--seq-len 128 needs 128; pass --seq-len 64 or less") in refused(
        tmp_path, capsys, "--init-from", str(tmp_path / "hf"), "--seq-len", "128")


def test_resuming_on_other_data_is_refused(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("some paragraph of text\n\n" * 40)
    run_dir = tmp_path / "run"
    (run_dir / "checkpoint_2026-01-01_00-00-00.000000").mkdir(parents=True)
    train = {**TrainConfig().to_dict(), "vocab_size": 257, "data_key": "0" * 64,
             "tokenizer_sha256": ByteTokenizer().sha256}
    (run_dir / "config.json").write_text(json.dumps({"train": train}))
    code, err = run_pretrain("--resume", "--run-dir", str(run_dir), "--data",
                             str(tmp_path / "data"), capsys=capsys)
    assert code == 2 and "it was trained on other data (the --data files" in err
    # a file merely copied or touched counts as other data: the way on is said
    assert "resume without --data to go on with the shards it was trained on" in err


def test_resuming_a_run_tokenized_under_an_earlier_cache_key_says_so(tmp_path, capsys):
    """The same files, tokenized before the cache key's version 3 (the held-out split's
    rules changed): the refusal blamed the files, their sizes or modification times."""
    from orchestrator.training.corpus import cache_key, expand_sources

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("some paragraph of text\n\n" * 40)
    run_dir = tmp_path / "run"
    (run_dir / "checkpoint_2026-01-01_00-00-00.000000").mkdir(parents=True)
    sources = expand_sources([str(tmp_path / "data")])
    train = {**TrainConfig().to_dict(), "vocab_size": 257,
             "data_key": cache_key(sources, "text", False, ByteTokenizer().sha256, version=2),
             "tokenizer_sha256": ByteTokenizer().sha256}
    (run_dir / "config.json").write_text(json.dumps({"train": train}))
    code, err = run_pretrain("--resume", "--run-dir", str(run_dir), "--data",
                             str(tmp_path / "data"), capsys=capsys)
    assert code == 2 and "modification times" not in err, err
    assert "tokenized from these files under an earlier rule (cache key version 2, now 4" in err
    assert "resume without --data" in err


def test_resuming_with_its_data_a_run_keyed_before_content_fingerprints_says_so(tmp_path):
    """Cache key version 4 adds each local file's content fingerprint and nothing else: a run
    recorded with a version 3 key, resumed with its --data, is told its key is an earlier
    one and to resume without --data (its own shards, the same), not that its files or the
    held-out split changed."""
    from orchestrator.training.corpus import cache_key
    from orchestrator.training.data_plan import plan_data, resume_data_conflicts

    (tmp_path / "a.txt").write_text("some paragraph of text\n\n" * 40)
    plan = plan_data([str(tmp_path / "a.txt")], cache_root=str(tmp_path / "cache"))
    saved = {"data_key": cache_key(plan.sources, "text", False, plan.tokenizer.sha256,
                                   version=3),
             "tokenizer_sha256": plan.tokenizer.sha256}
    assert saved["data_key"] != plan.key
    fields = {"data_key": plan.key, "tokenizer_sha256": plan.tokenizer.sha256}
    [problem] = resume_data_conflicts(saved, fields, plan)
    assert "under an earlier cache key (version 3, now 4: local files' content fingerprints" \
        in problem and "resume without --data" in problem and "other data" not in problem
    saved["data_key"] = cache_key(plan.sources, "text", False, plan.tokenizer.sha256,
                                  version=2)  # (another split: refused, as before)
    assert "cache key version 2, now 4" in resume_data_conflicts(saved, fields, plan)[0]


def tokenized_run(tmp_path, cache: str):
    """A run trained on --data: its tokenized shards in tmp_path / cache, its tokenizer in
    tmp_path / run, and its recorded train config. (plan, saved)"""
    from orchestrator.training.data_plan import plan_data, tokenize_in_process

    (tmp_path / "a.txt").write_text("some paragraph of text\n\n" * 40)
    plan = plan_data([str(tmp_path / "a.txt")], cache_root=str(tmp_path / cache))
    tokenize_in_process(plan, say=lambda _: None)
    saved = {**TrainConfig().to_dict(), "data_cache": plan.cache_uri, "data_key": plan.key,
             "vocab_size": plan.tokenizer.vocab_size, "tokenizer_sha256": plan.tokenizer.sha256}
    save_tokenizer(plan.tokenizer, tmp_path / "run")
    return plan, saved


def resume_flags(tmp_path, saved, cache_root: str, **more):
    """configure_data's arguments for `--resume` with no --data."""
    return dict(data=[], text_field="text", skip_bad_lines=False, tokenizer="bytes",
                train_tokenizer=None, cache_root=str(tmp_path / cache_root), retokenize=False,
                init_from=None, saved=saved, run_dir=tmp_path / "run", **more)


def test_resuming_without_data_flags_goes_on_with_the_runs_own_shards(tmp_path):
    from orchestrator.training.data_plan import configure_data

    plan, saved = tokenized_run(tmp_path, "cache")
    flags = resume_flags(tmp_path, saved, "elsewhere")
    setup = configure_data(**flags)
    assert setup.plan is None and setup.tokenizer.sha256 == plan.tokenizer.sha256
    assert {k: setup.fields[k] for k in ("data_cache", "data_key")} == \
        {"data_cache": plan.cache_uri, "data_key": plan.key}
    # A run started --init-from a model (its size taken from it) resumes as that size.
    from_model = {**saved, "init_from": "/models/gpt2", "model_size": "large"}
    assert configure_data(**{**flags, "saved": from_model}).fields["model_size"] == "large"
    # The shards gone: the flags to pass again are named.
    with pytest.raises(DataError, match="pass its --data .* again to tokenize them"):
        configure_data(**{**flags, "saved": {**saved, "data_cache": str(tmp_path / "gone")}})


def test_resuming_finds_moved_shards_through_data_cache_and_refuses_retokenize(tmp_path):
    from orchestrator.training.data_plan import configure_data

    plan, saved = tokenized_run(tmp_path, "old")
    (tmp_path / "old").rename(tmp_path / "new")  # the cache moved to other storage
    flags = resume_flags(tmp_path, saved, "new", data_flags=("--data-cache",))
    moved = configure_data(**flags).fields["data_cache"]
    assert moved == str(tmp_path / "new" / plan.key[:24])
    ignored = configure_data(**{**flags, "data_flags": ("--data-cache", "--text-field")})
    assert ignored.notes == ["--text-field ignored: the run goes on with the shards it was "
                             "tokenized into"]
    with pytest.raises(DataError, match="--retokenize: tokenizing again needs the files"):
        configure_data(**{**flags, "retokenize": True,
                          "data_flags": ("--data-cache", "--retokenize")})


def test_data_flags_without_data_are_said_to_be_ignored(tmp_path, capsys):
    code, err = run_pretrain("--dry-run", "--retokenize", "--text-field", "body",
                             "--run-dir", str(tmp_path / "run"), capsys=capsys)
    assert "--retokenize, --text-field ignored: they apply to --data files" in err


def test_ingest_workers_without_data_are_said_to_be_ignored(tmp_path, capsys):
    # docs/data.md: without --data the data-only flags are said to be ignored; the tokenizer
    # workers' count was dropped silently (no tokenizing pass runs on the bundled corpus).
    args = pretrain.parse_args(["--ingest-workers", "8", "--retokenize"])
    pretrain.resolve_data(args, tmp_path / "run")
    assert "--retokenize, --ingest-workers ignored: they apply to --data files" in \
        capsys.readouterr().err
    # A tokenizer of its own on the bundled corpus: tokenized in this process, not Ray Data
    # (prepare_shards), so the workers' count, and a field of records, are no more used.
    args = pretrain.parse_args(["--train-tokenizer", "300", "--ingest-workers", "8",
                                "--text-field", "body", "--retokenize"])
    pretrain.resolve_data(args, tmp_path / "run")
    assert "--text-field, --ingest-workers ignored: the bundled corpus is tokenized in this " \
        "process" in capsys.readouterr().err
    (tmp_path / "a.txt").write_text("some text\n\n" * 400)
    args = pretrain.parse_args(["--data", str(tmp_path / "a.txt"), "--ingest-workers", "8"])
    pretrain.resolve_data(args, tmp_path / "run")  # files to tokenize on Ray Data: it applies
    assert "ignored" not in capsys.readouterr().err


def test_a_tokenizer_without_an_end_of_text_token_is_warned_about(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "some": 1, "text": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "a.txt").write_text("some text\n\n" * 400)
    _, err = run_pretrain("--dry-run", "--data", str(tmp_path / "a.txt"), "--tokenizer",
                          str(tmp_path / "tokenizer.json"), "--run-dir", str(tmp_path / "run"),
                          capsys=capsys)
    assert "has no end-of-text token" in err and "joined with no separator" in err


def test_a_data_cache_or_run_dir_that_cannot_be_written_is_named_before_ray(tmp_path, capsys):
    # Tokenizing started Ray and ended in a FileNotFoundError/PermissionError traceback.
    data = tmp_path / "d.txt"
    data.write_text("some text to train on. " * 50)
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    err = refused(tmp_path, capsys, "--data", str(data), "--data-cache", str(a_file / "cache"))
    assert f"--data-cache {a_file / 'cache'}: cannot write there" in err
    code, err = run_pretrain("--data", str(data), "--run-dir", str(a_file / "run"),
                             capsys=capsys)
    assert code == 2 and f"cannot write to run dir {a_file / 'run'}" in err, err
    code, err = run_pretrain("--run-dir", str(a_file), capsys=capsys)
    assert code == 2 and "is a file, not a directory" in err, err


def test_a_data_cache_that_cannot_take_the_bundled_corpus_is_named(tmp_path, capsys):
    """--tokenizer without --data writes the bundled corpus into the cache as a .txt file
    first: a cache that could not be written ended the job in a NotADirectoryError traceback."""
    save_tokenizer(train_bpe(["some text to train on"] * 20, 300), tmp_path / "tok")
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    err = refused(tmp_path, capsys, "--tokenizer", str(tmp_path / "tok"),
                  "--data-cache", str(a_file / "cache"))
    assert f"the data cache {a_file / 'cache'} (--data-cache): cannot write pydoc_topics.txt" \
        in err, err
    # the trained tokenizer's copy there too (a cache on object storage is not checked first)
    (tmp_path / "d.txt").write_text("some text to train on.\n\n" * 50)
    with pytest.raises(DataError, match=f"^the data cache {a_file / 'cache'} \\(--data-cache\\): "
                       "cannot write tokenizers/bpe-300-"):
        data_plan.trained_tokenizer(expand_sources([str(tmp_path / "d.txt")]), "text",
                                    False, 300, str(a_file / "cache"), say=lambda _: None)


@pytest.mark.parametrize("flag", ["--run-dir", "--tokenizer", "--init-from", "--data-cache"])
def test_an_empty_path_flag_is_refused_not_read_as_unset_or_as_here(flag, tmp_path, capsys,
                                                                    monkeypatch):
    # --run-dir "" trained into the current directory; the others trained without them.
    monkeypatch.chdir(tmp_path)
    code, err = run_pretrain(flag, "", capsys=capsys)
    assert code == 2 and f"{flag} is empty" in err, err
    assert not (tmp_path / "config.json").exists()


def test_a_seed_torch_cannot_take_is_refused_before_any_worker_starts(capsys):
    # It passed, and every worker failed at torch.manual_seed: three restarts, then exit 4.
    code, err = run_pretrain("--seed", str(2 ** 64), capsys=capsys)
    assert code == 2 and "seed (--seed) must be an integer in [-2**63, 2**64)" in err, err


def test_a_read_only_cache_that_holds_the_shards_is_used_one_without_them_named(
        tmp_path, monkeypatch):
    # A cache tokenized once and mounted read-only is read, never written: refusing it for
    # want of write access broke runs that worked.
    from orchestrator.training import data_plan

    plan, _ = tokenized_run(tmp_path, "cache")
    monkeypatch.setattr(data_plan, "writable_dir_problem",
                        lambda path: "Read-only file system")
    flags = dict(text_field="text", skip_bad_lines=False, tokenizer="bytes",
                 train_tokenizer=None, cache_root=str(tmp_path / "cache"), retokenize=False,
                 init_from=None, saved=None, data_flags=("--data-cache",))
    setup = data_plan.configure_data(data=[str(tmp_path / "a.txt")], **flags)
    assert setup.plan.cached
    (tmp_path / "b.txt").write_text("another paragraph, not tokenized yet\n\n" * 40)
    with pytest.raises(DataError, match="--data-cache .*: cannot write there: Read-only"):
        data_plan.configure_data(data=[str(tmp_path / "b.txt")], **flags)


def test_a_read_only_cache_holding_a_trained_tokenizer_and_its_shards_is_used(
        tmp_path, monkeypatch):
    """With --train-tokenizer, a read-only cache was refused before the cached BPE was even
    looked up, though it held the BPE and the shards and nothing was to be written; a BPE
    not in it yet is still refused before it is trained (minutes over a large corpus)."""
    from orchestrator.training import data_plan

    (tmp_path / "a.txt").write_text("".join(f"paragraph {i} of some text\n\n"
                                            for i in range(200)))
    flags = dict(data=[str(tmp_path / "a.txt")], text_field="text", skip_bad_lines=False,
                 tokenizer="bytes", cache_root=str(tmp_path / "cache"), retokenize=False,
                 init_from=None, saved=None, data_flags=("--data-cache",),
                 say=lambda _: None)
    setup = data_plan.configure_data(train_tokenizer=300, **flags)
    data_plan.tokenize_in_process(setup.plan, say=lambda _: None)
    monkeypatch.setattr(data_plan, "writable_dir_problem",
                        lambda path: "Read-only file system")
    monkeypatch.setattr(data_plan, "train_bpe", lambda *a: pytest.fail("trained"))
    assert data_plan.configure_data(train_tokenizer=300, **flags).plan.cached
    with pytest.raises(DataError, match="--data-cache .*: cannot write there: Read-only"):
        data_plan.configure_data(train_tokenizer=310, **flags)


def test_a_text_file_that_is_not_utf8_is_named_before_ray_starts(tmp_path, capsys):
    # It was named by a tokenizing task, ~9 s after Ray had started.
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 au lait\n\n".encode("latin-1") * 10)
    err = refused(tmp_path, capsys, "--data", str(latin1))
    assert f"{latin1}:1: not UTF-8 text near byte 3" in err, err
    # A multi-byte character cut at the 64 KiB mark is not an error.
    from orchestrator.training.corpus import TEXT_HEAD_BYTES, SourceFile, check_text_head

    cut = tmp_path / "cut.txt"
    cut.write_bytes(b"a" * (TEXT_HEAD_BYTES - 1) + "\u00e9".encode() + b"b")
    check_text_head(SourceFile(str(cut), "txt", cut.stat().st_size, cut.stat().st_mtime_ns))


def exported_tiny(folder, seed: int):
    """A Hugging Face GPT-2 folder of the tiny preset, bytes, weights from `seed`."""
    import torch

    from orchestrator.hf_export import export_gpt2
    from orchestrator.training.model import GPT, GPTConfig

    torch.manual_seed(seed)
    export_gpt2(GPT(GPTConfig.from_train_config(TrainConfig(model_size="tiny", seq_len=32),
                                                vocab_size=257)), ByteTokenizer(), folder)
    return str(folder)


def started_run(run_dir, *flags):
    """A run's config.json as pretrain writes it for `flags` (its shards, if any, tokenized),
    and a checkpoint folder."""
    args = pretrain.parse_args(["--run-dir", str(run_dir), "--seq-len", "32", *flags])
    setup = pretrain.resolve_data(args, run_dir)
    if setup.plan is not None:
        data_plan.tokenize_in_process(setup.plan, say=lambda _: None)
    train_config, spec = pretrain.build_configs(args, run_dir, setup.fields)
    pretrain._write_resolved_config(run_dir, train_config, spec, setup.tokenizer)
    (run_dir / "checkpoint_00000002").mkdir()
    return (run_dir / "config.json").read_text()


def test_resume_with_another_init_from_is_refused_naming_both_flags(tmp_path):
    # `--resume --init-from OTHER` was accepted: the run went on from its checkpoint (OTHER's
    # weights never loaded) while config.json recorded OTHER as the run's origin. A run
    # started without --init-from got "it was trained on other data" instead.
    from orchestrator.config import ConfigError

    first, other = exported_tiny(tmp_path / "hf1", 5), exported_tiny(tmp_path / "hf2", 6)
    run_dir = tmp_path / "run"
    config = started_run(run_dir, "--init-from", first)
    resume = ["--resume", "--run-dir", str(run_dir)]
    with pytest.raises(ConfigError) as e:
        pretrain.resolve_data(pretrain.parse_args([*resume, "--init-from", other]), run_dir)
    assert str(e.value).startswith(f"--init-from {other} with --resume: the run {run_dir} "
                                   f"started from --init-from {first} and continues from its "
                                   "checkpoint")
    assert "Leave --init-from out to continue the run" in str(e.value)
    assert (run_dir / "config.json").read_text() == config  # nothing saved was touched
    # The run's own model again (its first command with --resume added), or none: accepted.
    for flags in (["--init-from", first], []):
        setup = pretrain.resolve_data(pretrain.parse_args([*resume, *flags]), run_dir)
        assert setup.fields["init_from"] == first
    plain = tmp_path / "plain"
    started_run(plain)
    with pytest.raises(ConfigError, match=f"the run {plain} started without --init-from and "
                                          "continues from its checkpoint"):
        pretrain.resolve_data(pretrain.parse_args(["--resume", "--run-dir", str(plain),
                                                   "--init-from", first]), plain)


def test_a_resume_keeps_the_model_the_run_started_from_in_its_config(tmp_path):
    # `--resume --data X --tokenizer RUN/tokenizer.json` of a run started --init-from M (no
    # --init-from given again) recorded init_from "" and span_init 0.0 in config.json and its
    # checkpoints: the run's origin lost, and a later `--resume --init-from M` refused as a
    # run "started without --init-from".
    first = exported_tiny(tmp_path / "hf1", 5)
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(f"paragraph {i}: a short line of text." for i in range(200)))
    run_dir = tmp_path / "run"
    started_run(run_dir, "--init-from", first, "--data", str(text))
    for flags in (["--data", str(text), "--tokenizer", str(run_dir / "tokenizer.json")],
                  ["--init-from", first, "--data", str(text)]):
        args = pretrain.parse_args(["--resume", "--run-dir", str(run_dir), *flags])
        setup = pretrain.resolve_data(args, run_dir)
        config, _ = pretrain.build_configs(args, run_dir, setup.fields)
        assert (config.init_from, config.span_init, config.model_size) == (first, 1.0, "tiny")


def test_a_resume_needs_no_longer_the_model_the_run_started_from(tmp_path):
    # Its checkpoint holds the weights; the model's folder, moved or deleted since (the run
    # directory on shared storage, the model on a laptop), refused the resume: "--init-from
    # DIR: no config.json".
    import shutil

    first = exported_tiny(tmp_path / "hf1", 5)
    run_dir = tmp_path / "run"
    started_run(run_dir, "--init-from", first)
    shutil.rmtree(first)
    args = pretrain.parse_args(["--resume", "--run-dir", str(run_dir)])
    setup = pretrain.resolve_data(args, run_dir)
    config, _ = pretrain.build_configs(args, run_dir, setup.fields)
    assert config.init_from == first


def test_a_dry_run_does_not_train_the_tokenizer(tmp_path, capsys, monkeypatch):
    """`--dry-run --train-tokenizer N` trained the BPE over the whole corpus (minutes on a
    large one) and wrote it into the cache, for a memory estimate and a placement. Now it
    checks the files, estimates with N tokens and says so; a BPE already in the cache is
    used as a run would."""
    (tmp_path / "a.txt").write_text("".join(f"paragraph {i} of some text here.\n\n"
                                            for i in range(400)))
    cache = tmp_path / "cache"
    planned = []
    monkeypatch.setattr(pretrain, "dry_run", lambda config, spec, address: planned.append(
        config))
    flags = ["--dry-run", "--data", str(tmp_path / "a.txt"), "--train-tokenizer", "300",
             "--data-cache", str(cache), "--run-dir", str(tmp_path / "runs" / "new")]
    code, err = run_pretrain(*flags, capsys=capsys)
    assert code == 0, err
    assert planned[-1].vocab_size == 300
    assert "--dry-run: the --train-tokenizer BPE is not trained" in err
    assert not (cache / "tokenizers").exists() and not (tmp_path / "runs" / "new").exists()
    # the files are still checked
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe\x00")
    code, err = run_pretrain(*flags[:2], str(tmp_path / "b.txt"), *flags[3:], capsys=capsys)
    assert code == 2 and "b.txt:1: not UTF-8 text" in err
    # a BPE the cache holds (a run trained it) is the one estimated with
    data_plan.plan_data([str(tmp_path / "a.txt")], train_tokenizer=300, cache_root=str(cache),
                        say=lambda _: None)
    code, err = run_pretrain(*flags, capsys=capsys)
    trained = data_plan.plan_data([str(tmp_path / "a.txt")], train_tokenizer=300,
                                  cache_root=str(cache)).tokenizer
    assert code == 0 and "not trained" not in err
    assert planned[-1].vocab_size == trained.vocab_size
    assert planned[-1].tokenizer_sha256 == trained.sha256
    # a model with more token ids than a BPE of that size can have is refused, as a run
    # refuses it once the BPE is trained
    import torch

    from orchestrator.hf_export import export_gpt2
    from orchestrator.training.model import GPT, GPTConfig

    bpe = train_bpe([f"word{i} other{i * 7} text{i % 13}" for i in range(3000)], 400)
    torch.manual_seed(0)
    export_gpt2(GPT(GPTConfig.from_train_config(TrainConfig(model_size="tiny", seq_len=32),
                                                vocab_size=bpe.vocab_size)), bpe,
                tmp_path / "hf")
    err = refused(tmp_path, capsys, *flags[:3], "--train-tokenizer", "300",
                  "--data-cache", str(tmp_path / "cache2"), "--seq-len", "32",
                  "--init-from", str(tmp_path / "hf"))
    assert f"--init-from {tmp_path / 'hf'}: the model has {bpe.vocab_size} token ids but the " \
        "tokenizer (--train-tokenizer) at most 300; use the model's own tokenizer" in err
    assert not (tmp_path / "cache2" / "tokenizers").exists()
def test_init_from_a_home_of_no_user_is_one_line_also_with_resume(tmp_path, capsys):
    # `--init-from ~bob/model` with no user bob: Path.expanduser raised RuntimeError.
    assert "--init-from '~nosuchuser-hf55/m': ~nosuchuser-hf55 is the home directory of no " \
           "user" in refused(tmp_path, capsys, "--init-from", "~nosuchuser-hf55/m")
    from orchestrator.config import ConfigError

    with pytest.raises(ConfigError, match="--init-from '~nosuchuser-hf55/m'"):
        pretrain._refuse_other_init_from("~nosuchuser-hf55/m", {"init_from": ""},
                                         tmp_path / "run")


def test_a_tokenizer_under_a_home_of_no_user_is_one_line(tmp_path, capsys):
    assert "--tokenizer '~nosuchuser-hf55/t.json': ~nosuchuser-hf55 is the home directory " \
           "of no user" in refused(tmp_path, capsys, "--tokenizer", "~nosuchuser-hf55/t.json")


def test_a_data_cache_in_a_home_of_no_user_is_refused_not_made_in_the_working_dir(
        tmp_path, monkeypatch):
    # `--data-cache ~bob/cache` with no user bob (the shell leaves it as written):
    # os.path.expanduser leaves it so too, and the tokens were cached in a folder named
    # "~bob" under the working directory, where every other flag now refuses such a path.
    monkeypatch.chdir(tmp_path)
    corpus = tmp_path / "d.txt"
    corpus.write_text("some text to train on\n\nand another paragraph\n")
    with pytest.raises(DataError, match="--data-cache.*~nosuchuser-hf55"):
        data_plan.plan_data([str(corpus)], cache_root="~nosuchuser-hf55/cache")
    assert not (tmp_path / "~nosuchuser-hf55").exists()


def test_a_dry_run_on_cached_shards_too_short_for_the_sequence_is_refused(tmp_path, capsys,
                                                                          monkeypatch):
    """The shards already in the cache (an earlier run on the same files): a run refuses a
    --seq-len longer than a split holds (check_trainable) before any worker starts, while
    `--dry-run` said `would place` and exited 0."""
    planned = []
    monkeypatch.setattr(pretrain, "dry_run", lambda config, spec, address: planned.append(
        config))
    (tmp_path / "a.txt").write_text("".join(f"paragraph {i} of some text here.\n\n"
                                            for i in range(100)))
    plan = data_plan.plan_data([str(tmp_path / "a.txt")], cache_root=str(tmp_path / "cache"))
    data_plan.tokenize_in_process(plan, say=lambda _: None)  # ~3,300 tokens
    flags = ["--dry-run", "--data", str(tmp_path / "a.txt"),
             "--data-cache", str(tmp_path / "cache")]
    err = refused(tmp_path, capsys, *flags, "--seq-len", "4096")
    assert "--seq-len 4096: the corpus's training split has" in err and plan.cache_uri in err
    assert planned == []
    code, err = run_pretrain(*flags, "--seq-len", "16", "--run-dir",
                             str(tmp_path / "runs" / "ok"), capsys=capsys)
    assert code == 0 and len(planned) == 1, err


def test_record_flags_on_txt_files_are_said_to_be_ignored_and_keep_the_cache_key(
        tmp_path, capsys, monkeypatch):
    """--text-field and --skip-bad-lines read .jsonl records and parquet rows; on .txt files
    alone they change nothing, yet were silent and entered the cache key: the same files
    were tokenized (and a --train-tokenizer BPE trained) again, and a --resume --data without
    them was refused as "other data"."""
    from orchestrator.training.data_plan import plan_data

    (tmp_path / "a.txt").write_text("".join(f"paragraph {i} of some text here.\n\n"
                                            for i in range(100)))
    (tmp_path / "b.jsonl").write_text('{"text": "a record", "body": "its body"}\n')
    txt, cache = [str(tmp_path / "a.txt")], str(tmp_path / "cache")
    assert plan_data(txt, text_field="body", skip_bad_lines=True, cache_root=cache).key == \
        plan_data(txt, cache_root=cache).key
    both = [*txt, str(tmp_path / "b.jsonl")]  # (a record file: they apply, and key)
    assert plan_data(both, text_field="body", cache_root=cache).key != \
        plan_data(both, cache_root=cache).key
    monkeypatch.setattr(pretrain, "dry_run", lambda config, spec, address: None)
    code, err = run_pretrain("--dry-run", "--data", txt[0], "--text-field", "body",
                             "--skip-bad-lines", "--data-cache", cache,
                             "--run-dir", str(tmp_path / "run"), capsys=capsys)
    assert code == 0, err
    assert "warning: --text-field, --skip-bad-lines ignored: they apply to .jsonl and " \
        ".parquet files, and the --data files are .txt" in err
    code, err = run_pretrain("--dry-run", "--data", txt[0], "--text-field", "body",
                             "--data-cache", cache, "--run-dir", str(tmp_path / "run"),
                             capsys=capsys)
    assert "warning: --text-field ignored: it applies to .jsonl and .parquet" in err, err
    code, err = run_pretrain("--dry-run", "--data", both[1], "--text-field", "body",
                             "--data-cache", cache, "--run-dir", str(tmp_path / "run"),
                             capsys=capsys)
    assert code == 0 and "ignored" not in err, err


@pytest.mark.parametrize("flag", ["--data", "--data-cache"])
def test_a_data_or_cache_path_that_is_not_utf8_is_named_not_a_traceback(flag, tmp_path,
                                                                         capsys):
    # A Latin-1 path on the command line (argv keeps it as surrogate escapes): pyarrow takes
    # UTF-8 paths only, and its UnicodeEncodeError ended the job as a traceback, exit 1.
    import os

    (tmp_path / "a.txt").write_text("some paragraph of text\n\n" * 40)
    raw = os.fsencode(tmp_path) + b"/caf\xe9"
    flags = {"--data": str(tmp_path / "a.txt"), "--data-cache": str(tmp_path / "cache"),
             flag: os.fsdecode(raw)}
    err = refused(tmp_path, capsys, "--dry-run", *[x for f, v in flags.items() for x in (f, v)])
    assert f"error: {flag}: the name of {os.fsdecode(tmp_path)}/caf\\xe9 is not UTF-8 (byte " \
        "0xe9): rename it to UTF-8 (convmv -f latin1 -t utf8 --notest)\n" in err, err
