"""The examples' make_data.py scripts: they write what they say, and refuse counts they cannot
write with an error naming the flag (not a ZeroDivisionError or numpy's "need at least one
array")."""
from __future__ import annotations

import csv
import runpy
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _main(example: str):
    return runpy.run_path(str(EXAMPLES / example / "make_data.py"))["main"]


def test_the_image_data_holds_as_many_training_images_as_it_says(tmp_path, capsys):
    _main("image_cnn")(["--out", str(tmp_path), "--train", "10", "--shards", "3",
                        "--test", "4"])
    sizes = [len(np.load(p)["labels"]) for p in sorted(tmp_path.glob("train-*.npz"))]
    assert sizes == [4, 3, 3]  # 10 in all, as asked and as printed
    assert "10 training images in 3 shards" in capsys.readouterr().out
    assert len(np.load(tmp_path / "test.npz")["labels"]) == 4


def test_the_regression_data_holds_as_many_rows_as_it_says(tmp_path, capsys):
    _main("regression")(["--out", str(tmp_path), "--rows", "10", "--files", "4"])
    rows = []
    for path in sorted(tmp_path.glob("*.csv")):
        with open(path, newline="") as f:
            rows.append(len(list(csv.reader(f))) - 1)  # less the header
    assert rows == [3, 3, 2, 2]
    assert "10 rows" in capsys.readouterr().out


def test_the_default_regression_data_is_the_committed_one(tmp_path):
    _main("regression")(["--out", str(tmp_path)])
    for path in sorted((EXAMPLES / "regression" / "data").glob("*.csv")):
        assert (tmp_path / path.name).read_text() == path.read_text(), path.name


@pytest.mark.parametrize("example, argv, flag", [
    ("image_cnn", ["--shards", "0"], "--shards"),
    ("image_cnn", ["--train", "2", "--shards", "4"], "--shards"),
    ("image_cnn", ["--test", "0"], "--test"),
    ("regression", ["--files", "0"], "--files"),
    ("regression", ["--rows", "3", "--files", "4"], "--files"),
])
def test_counts_that_cannot_be_written_are_refused_naming_the_flag(example, argv, flag, tmp_path,
                                                                   capsys):
    with pytest.raises(SystemExit) as exit_:
        _main(example)(["--out", str(tmp_path / "out"), *argv])
    assert exit_.value.code == 2
    assert flag in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize("example, first, second, stale", [
    ("regression", ["--rows", "40", "--files", "4"], ["--rows", "20", "--files", "2"],
     "part-002.csv"),
    ("image_cnn", ["--train", "8", "--shards", "4", "--test", "2"],
     ["--train", "8", "--shards", "2", "--test", "2"], "train-002.npz"),
])
def test_fewer_files_into_a_folder_of_more_are_refused_as_they_would_be_trained_on(
        example, first, second, stale, tmp_path, capsys):
    # The loop reads every file of the folder: 2 files written over 4 left 2 of the old data
    # beside them, trained on as one set, and "wrote 2 files (20 rows)" was printed.
    out = tmp_path / "out"
    _main(example)(["--out", str(out), *first])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        _main(example)(["--out", str(out), *second])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert stale in err and "--out" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing written
    _main(example)(["--out", str(out), *first])  # as many again: replaced, as before


@pytest.mark.parametrize("example, flag, value, why", [
    ("image_cnn", "--train", "1_0", "write 10"),  # int() read it as 10
    ("image_cnn", "--shards", " 2", "space around it"),
    ("regression", "--rows", "\u0661\u0666", "is not a digit 0-9"),  # int() read it as 16
    ("regression", "--seed", "0x1", "is not a whole number"),
])
def test_lax_numbers_are_refused_naming_the_flag(example, flag, value, why, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        _main(example)(["--out", str(tmp_path / "out"), flag, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: {value!r}" in err and why in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("example", ["image_cnn", "regression"])
def test_a_negative_seed_is_refused_naming_the_flag(example, tmp_path, capsys):
    # image_cnn's numpy default_rng raised "expected non-negative integer" (a traceback) after
    # the folder was made; regression's random.Random(-1) wrote --seed 1's data.
    with pytest.raises(SystemExit) as exit_:
        _main(example)(["--out", str(tmp_path / "out"), "--seed", "-1"])
    assert exit_.value.code == 2
    assert "--seed must be >= 0, got -1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
