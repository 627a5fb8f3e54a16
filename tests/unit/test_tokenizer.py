"""orchestrator/tokenizer.py: the byte tokenizer as a tokenizer.json, Hugging Face tokenizer
files, BPE training, and the tokenizer a run recorded."""
import json

import pytest

from orchestrator.tokenizer import (ByteTokenizer, HFTokenizer, LegacyByteTokenizer,
                                    TokenizerError, load_tokenizer, load_tokenizer_file,
                                    save_tokenizer, tokenizer_for_model, tokenizer_of_run,
                                    train_bpe)

TEXT = "naïve café — 日本語 ok\n\n  indented"


def test_byte_tokenizer_json_encodes_exactly_as_bytes(tmp_path):
    save_tokenizer(ByteTokenizer(), tmp_path)
    as_file = load_tokenizer_file(tmp_path)
    assert as_file.vocab_size == 257 and as_file.eos_id == 256
    assert as_file.encode(TEXT) == ByteTokenizer().encode(TEXT) == list(TEXT.encode())
    assert as_file.decode(as_file.encode(TEXT)) == TEXT
    # Loading our own file by path gives back the byte tokenizer itself.
    assert isinstance(load_tokenizer(str(tmp_path / "tokenizer.json")), ByteTokenizer)


def test_legacy_byte_tokenizer_has_no_end_of_text():
    legacy = LegacyByteTokenizer()
    spec = json.loads(legacy.to_json())
    assert legacy.vocab_size == 256 and legacy.eos_id is None and not spec["added_tokens"]
    assert legacy.sha256 != ByteTokenizer().sha256
    assert isinstance(tokenizer_for_model(ByteTokenizer(), 256), LegacyByteTokenizer)
    assert tokenizer_for_model(ByteTokenizer(), 257).eos_id == 256


def test_trained_bpe_compresses_and_round_trips_bytewise():
    corpus = [f"the quick brown fox {i} jumps over the naïve café dog" for i in range(200)]
    bpe = train_bpe(corpus, 400)
    ids = bpe.encode(TEXT + " the quick brown fox")
    assert isinstance(bpe, HFTokenizer) and 257 < bpe.vocab_size <= 400
    assert bpe.eos_id is not None
    assert len(bpe.encode("the quick brown fox")) < len(b"the quick brown fox")
    # A streaming decoder joins token bytes: the bytes must be the text's UTF-8 exactly, even
    # where a token ends inside a multi-byte character.
    assert b"".join(bpe.token_bytes(i) for i in ids) == (TEXT + " the quick brown fox").encode()
    assert bpe.token_bytes(bpe.eos_id) == b""


def test_a_training_document_spelling_end_of_text_is_not_cut_there():
    # With BPE, "<|endoftext|>" written in a document became a document break (the byte
    # tokenizer kept it as text): scraped text about tokenizers got false boundaries.
    bpe = train_bpe([f"the quick brown fox {i} jumps" for i in range(200)], 400)
    ids = bpe.encode_arrays(["a <|endoftext|> b"])[0].tolist()
    assert bpe.eos_id not in ids and bpe.decode(ids) == "a <|endoftext|> b"


def test_a_model_folder_with_another_form_of_tokenizer_says_it_is_not_read(tmp_path):
    """GPT-2's own folder has vocab.json and merges.txt, no tokenizer.json: the refusal said
    only that tokenizer.json does not exist."""
    (tmp_path / "vocab.json").write_text("{}")
    (tmp_path / "merges.txt").write_text("")
    with pytest.raises(TokenizerError, match=rf"^--tokenizer: tokenizer file "
                       rf"{tmp_path / 'tokenizer.json'} does not exist; the folder holds "
                       r"vocab.json, merges.txt, which are not read: .*save_pretrained"):
        load_tokenizer(str(tmp_path))


def test_a_tokenizer_file_that_does_not_parse_is_named(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": {"type": "nothing"}}')
    with pytest.raises(TokenizerError, match=f"--tokenizer: {bad} is not a Hugging Face"):
        load_tokenizer(str(bad))
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing.json"))
    with pytest.raises(TokenizerError, match=r"\[257, 1048576\]"):
        train_bpe(["x"], 100)


def test_tokenizer_of_run_reads_the_recorded_file_and_checks_it(tmp_path):
    checkpoint = tmp_path / "checkpoint_1"
    checkpoint.mkdir()
    assert isinstance(tokenizer_of_run(checkpoint), ByteTokenizer)  # an old run: bytes
    bpe = train_bpe([f"word{i} " * 3 for i in range(100)], 300)
    save_tokenizer(bpe, tmp_path)
    found = tokenizer_of_run(checkpoint, bpe.sha256)
    assert found.sha256 == bpe.sha256 and found.encode("word7") == bpe.encode("word7")
    with pytest.raises(TokenizerError, match="not the tokenizer this model was trained with"):
        tokenizer_of_run(checkpoint, ByteTokenizer().sha256)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match="but no tokenizer.json is beside it"):
        tokenizer_of_run(checkpoint, bpe.sha256)


def _saved(tok, path):
    tok.save(str(path))
    return load_tokenizer_file(path)


def test_a_tokenizer_files_truncation_padding_and_added_tokens_are_not_applied(tmp_path):
    from tokenizers import Tokenizer, processors

    bpe = train_bpe([f"word{i} " * 30 for i in range(50)], 300)
    plain = bpe.encode("word1 " * 40)
    tok = Tokenizer.from_str(bpe.to_json())
    tok.enable_truncation(max_length=8)
    tok.enable_padding(length=200, pad_id=5, pad_token="!")
    eot = tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", eot)])
    loaded = _saved(tok, tmp_path / "tokenizer.json")
    assert loaded.encode("word1 " * 40) == plain  # 80+ tokens, none cut, added or padded
    assert [a.tolist() for a in loaded.encode_arrays(["word1 " * 40])] == [plain]
    # The file itself is what the run records and checks on resume.
    assert json.loads(loaded.to_json()) == json.loads((tmp_path / "tokenizer.json").read_text())


def test_a_vocabulary_with_holes_sizes_the_model_by_its_largest_id(tmp_path):
    from tokenizers import Tokenizer, models

    vocab = {"<unk>": 0, "a": 1, **{f"w{i}": i for i in range(2, 40000)}, "b": 70000}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    loaded = _saved(tok, tmp_path / "tokenizer.json")
    assert loaded.vocab_size == 70001
    assert loaded.encode_arrays(["b"])[0].tolist() == [70000]  # not wrapped by uint16


def test_sentencepiece_and_byte_fallback_tokens_stream_with_their_spaces_and_bytes(tmp_path):
    from tokenizers import Tokenizer, decoders, models

    from orchestrator.serving.text import TextStream

    vocab = {"<unk>": 0, "▁Hello": 1, "▁caf": 2, "lo": 3,
             **{f"<0x{b:02X}>": 4 + b for b in range(256)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    loaded = _saved(tok, tmp_path / "tokenizer.json")
    ids = [1, 2, 4 + 0xC3, 4 + 0xA9, 3]  # "▁Hello" "▁caf" <0xC3> <0xA9> "lo"
    stream = TextStream((), loaded.token_bytes)
    text = "".join(stream.feed(i) for i in ids) + stream.finish()
    # The text continues a prompt, so its first word keeps its space (decode alone strips it).
    assert text == " " + tok.decode(ids) == " Hello cafélo"


def test_end_of_text_by_llama3s_name(tmp_path):
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "<|end_of_text|>": 2,
                                      "<|stop|>": 3}, unk_token="<unk>"))
    assert _saved(tok, tmp_path / "tokenizer.json").eos_id == 2
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "<|stop|>": 3}, unk_token="<unk>"))
    assert _saved(tok, tmp_path / "tokenizer.json").eos_id is None


def test_a_run_tokenizer_file_that_cannot_be_read_is_named(tmp_path, monkeypatch):
    checkpoint = tmp_path / "checkpoint_1"
    checkpoint.mkdir()
    bad = tmp_path / "tokenizer.json"
    bad.write_bytes(b"\xff\xfe garbage")  # not UTF-8
    with pytest.raises(TokenizerError, match=f"cannot read tokenizer file {bad}: not UTF-8"):
        tokenizer_of_run(checkpoint, "")
    with pytest.raises(TokenizerError, match=f"{bad} is not the tokenizer this model was"):
        tokenizer_of_run(checkpoint, ByteTokenizer().sha256)  # (its bytes are hashed)

    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(type(bad), "read_bytes", unreadable)
    with pytest.raises(TokenizerError, match=f"cannot read tokenizer file {bad}.*denied"):
        tokenizer_of_run(checkpoint, "")


def test_the_end_of_text_token_has_no_text_even_as_a_plain_vocabulary_entry(tmp_path):
    # "</s>" in the vocabulary but not an added special token: its text reached the client's
    # stream before the row ended.
    from tokenizers import Tokenizer, models, pre_tokenizers

    from orchestrator.serving.generation import GenerationRequest, Row, SamplingParams

    vocab = {"<unk>": 0, "</s>": 1, "a": 2, "b": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    words = _saved(tok, tmp_path / "tokenizer.json")
    assert words.eos_id == 1 and words.token_bytes(1) == b""
    assert words.decode([2, 1, 3]) == words.decode([2, 3])
    row = Row(GenerationRequest((2,), SamplingParams(max_tokens=5, temperature=0)), words)
    chunks = [row.accept(t) for t in (3, 1)]
    assert "".join(c.text for c in chunks) == " b"
    assert chunks[-1].finish_reason == "stop"


@pytest.mark.parametrize("encode", ["encode", "encode_as_text"])
def test_encoding_a_long_text_lets_other_threads_run(encode):
    # tokenizers' Tokenizer.encode holds the GIL throughout: the serving ingress, which
    # encodes a large prompt in a worker thread, still had its event loop stand still for
    # the ~0.3 s a 1 MiB prompt took. encode_batch releases it.
    import threading
    import time

    bpe = train_bpe([f"the quick brown fox {i} jumps over the lazy dog" for i in range(300)],
                    400)
    text = "the quick brown fox jumps over the lazy dog 12345 " * 10_000
    ticks, done = [], threading.Event()

    def ticker():
        while not done.is_set():
            time.sleep(0.002)
            ticks.append(time.monotonic())

    thread = threading.Thread(target=ticker)
    thread.start()
    time.sleep(0.02)
    started = time.monotonic()
    ids = getattr(bpe, encode)(text)
    ended = time.monotonic()
    done.set()
    thread.join()
    assert ids == bpe._tok.encode(text, add_special_tokens=False).ids
    took = ended - started
    assert took > 0.05, f"the text took {took:.3f} s: too short to tell"
    # Counted, not timed: a thread ticking every 2 ms ticks about took/2 ms times while the
    # GIL is free, and at most once or twice (at the edges) while encode holds it, however
    # loaded the machine is.
    during = sum(started < t < ended for t in ticks)
    assert during >= 5, f"another thread ticked {during} times in the {took:.3f} s encode"


def test_a_tokenizer_write_that_fails_leaves_the_old_file_and_no_temp_file(tmp_path):
    # A full disk (here a file-size limit: EFBIG) while tokenizer.json was written: its
    # `tokenizer.json.tmp` stayed in the run directory, beside the run's files; the write is
    # now checkpoint.write_atomically's (config.json's: a temp file of its own, fsync, rename).
    import subprocess
    import sys

    save_tokenizer(ByteTokenizer(), tmp_path)
    before = (tmp_path / "tokenizer.json").read_bytes()
    code = ("import resource, signal, sys\n"
            "from orchestrator.tokenizer import save_tokenizer, train_bpe\n"
            "bpe = train_bpe(['some text to train on, and more of it'] * 50, 300)\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))\n"
            "try:\n"
            "    save_tokenizer(bpe, sys.argv[1])\n"
            "except Exception as e:\n"
            "    print(type(e).__name__, e)\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert "File too large" in done.stdout, (done.stdout, done.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json"]
    assert (tmp_path / "tokenizer.json").read_bytes() == before


def test_a_tokenizer_of_special_tokens_alone_is_refused_naming_the_file(tmp_path):
    # Only <|endoftext|>: it loaded, and encoded every text to [] (nothing to train on).
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.BPE(vocab={}, merges=[]))
    tok.add_special_tokens(["<|endoftext|>"])
    path = tmp_path / "tokenizer.json"
    with pytest.raises(TokenizerError, match=f"--tokenizer: tokenizer file {path} holds no "
                       r"token but its special ones \('<\|endoftext\|>'\)"):
        _saved(tok, path)
    words = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1}, unk_token="<unk>"))
    _saved(words, path)  # (an unknown token is a token of text)


@pytest.mark.parametrize("stray", [4_000_000_000, 10_000_000, 70_000])
def test_a_stray_id_far_past_the_vocabulary_is_refused_naming_it(tmp_path, stray):
    # One id of 4e9 among 257 made the model's vocabulary 4,000,000,001, and the run was then
    # refused for memory naming --model-size and --batch-size, not the tokenizer.
    from tokenizers import Tokenizer, models

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, 300)}, "far": 300}
    path = tmp_path / "tokenizer.json"
    Tokenizer(models.WordLevel(vocab, unk_token="<unk>")).save(str(path))
    spec = json.loads(path.read_text())
    spec["model"]["vocab"]["far"] = stray  # (by hand: tokenizers' save of it takes 40 s)
    path.write_text(json.dumps(spec))
    with pytest.raises(TokenizerError, match=f"--tokenizer: tokenizer file {path}: token 'far' "
                       f"has id {stray:,}, past twice its 301 tokens"):
        load_tokenizer_file(path)
    vocab["far"] = 65535  # (ids below 65,536 are never refused: a small embedding)
    assert _saved(Tokenizer(models.WordLevel(vocab, unk_token="<unk>")), path).vocab_size \
        == 65536


def test_a_runs_own_tokenizer_with_a_stray_id_is_refused_naming_the_file(tmp_path):
    # The tokenizer.json beside a run's checkpoints skipped the --tokenizer check: hand-edited
    # to one id of 4e9, tokenizer_of_run took half a minute and more, then sized the model
    # at 4,000,000,001 ids.
    from tokenizers import Tokenizer, models

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, 300)}, "far": 300}
    path = tmp_path / "tokenizer.json"
    Tokenizer(models.WordLevel(vocab, unk_token="<unk>")).save(str(path))
    spec = json.loads(path.read_text())
    spec["model"]["vocab"]["far"] = 4_000_000_000
    path.write_text(json.dumps(spec))
    (tmp_path / "checkpoint_1").mkdir()
    with pytest.raises(TokenizerError, match=f"^{path}: token 'far' has id 4,000,000,000, "
                       "past 16,777,216 ids"):
        tokenizer_of_run(tmp_path / "checkpoint_1")


@pytest.mark.parametrize("saved", ["bpe", "sparse", "sparser", "legacy-bytes"])
def test_tokenizers_the_project_saves_for_a_run_still_load_as_the_runs_own(tmp_path, saved):
    # The check tokenizer_of_run now runs must pass what training saves: a trained BPE, a
    # --tokenizer with gaps in its ids below SPARSE_IDS_FROM (or past it, from before that
    # check), the old 256-byte tokenizer.
    from tokenizers import Tokenizer, models

    from orchestrator.tokenizer import SPARSE_IDS_FROM

    if saved == "bpe":
        tok = train_bpe([f"word{i} " * 3 for i in range(100)], 300)
    elif saved in ("sparse", "sparser"):
        # ("sparser": ids a --tokenizer now refuses, which a run trained before that check
        # may hold: it still resumes and serves)
        vocab = {"<unk>": 0, "a": 1,
                 "b": SPARSE_IDS_FROM - 1 if saved == "sparse" else 70_000}
        given = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        if saved == "sparse":
            tok = _saved(given, tmp_path / "given.json")
        else:
            given.save(str(tmp_path / "given.json"))
            tok = HFTokenizer(given, str(tmp_path / "given.json"))
    else:
        tok = LegacyByteTokenizer()
    save_tokenizer(tok, tmp_path)
    found = tokenizer_of_run(tmp_path, tok.sha256)
    assert found.vocab_size == tok.vocab_size and found.encode("ab") == tok.encode("ab")


def test_a_bpe_that_would_drop_unknown_characters_silently_is_refused(tmp_path):
    # A BPE with no unknown token and no byte fallback drops a character outside its
    # vocabulary without a trace: trained on "hello world", "hello zebra é world" encoded as
    # 'helloerworld', and a run trained on what was left.
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    def char_bpe(**model):
        tok = Tokenizer(models.BPE(**model))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.train_from_iterator(["hello world"] * 5, trainers.BpeTrainer(
            vocab_size=30, special_tokens=["<|endoftext|>", "<unk>"], show_progress=False))
        return tok

    path = tmp_path / "tokenizer.json"
    with pytest.raises(TokenizerError, match=f"--tokenizer: tokenizer file {path}: its BPE "
                       r"has no unknown token \(model.unk_token\) and no byte fallback "
                       r"\(model.byte_fallback\): .*dropped"):
        _saved(char_bpe(), path)
    with_unk = _saved(char_bpe(unk_token="<unk>"), path)  # (what is lost is seen: <unk>)
    assert with_unk.decode(with_unk.encode("hello zebra")).count("e") == 2
    # A byte-level BPE with all 256 byte tokens loses nothing; one lacking some bytes does.
    whole = train_bpe(["hello world"], 300)
    _saved(Tokenizer.from_str(whole.to_json()), path)
    lacking = Tokenizer(models.BPE())
    lacking.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    lacking.train_from_iterator(["hello world"], trainers.BpeTrainer(
        vocab_size=30, special_tokens=["<|endoftext|>"], show_progress=False))
    with pytest.raises(TokenizerError, match=r"its byte-level vocabulary lacks 24[0-9] of "
                       r"the 256 byte tokens \(byte 0x00 and others\)"):
        _saved(lacking, path)
