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
