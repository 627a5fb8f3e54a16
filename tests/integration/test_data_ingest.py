"""The tokenizing pass on Ray Data and jobs/pretrain.py on the user's own files, on the shared
local cluster."""
import json
import os

import numpy as np
import pytest

from jobs import pretrain
from orchestrator.training.corpus import TEXT_HEAD_BYTES
from orchestrator.training.data_plan import plan_data, tokenize_in_process
from orchestrator.training.shards import MANIFEST_FILE, open_shards
from ray_layer.data_ingest import tokenize_with_ray_data
from tests.support import run_summary as read_summary

TINY = ["--model-size", "tiny", "--batch-size", "4", "--seq-len", "32", "--log-every", "2",
        "--num-workers", "1", "--ingest-workers", "2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i in range(4):
        (root / f"book{i}.txt").write_text("\n\n".join(
            f"Book {i}, paragraph {j}: the naïve café opens at dawn, closes at {j} pm."
            for j in range(60)))
    with open(root / "notes.jsonl", "w") as f:
        for j in range(100):
            f.write(json.dumps({"text": f"note {j}: ünïcode and more text"}) + "\n")
    return root


def test_ray_data_with_two_workers_writes_the_shards_one_process_writes(cluster, corpus,
                                                                        tmp_path):
    plan = plan_data([str(corpus)], cache_root=str(tmp_path / "ray"), train_tokenizer=300,
                     say=lambda _: None)
    lines = []
    manifest = tokenize_with_ray_data(plan, 2, shard_tokens=1000, say=lines.append)
    alone = plan_data([str(corpus)], cache_root=str(tmp_path / "alone"), train_tokenizer=300,
                      say=lambda _: None)
    expected = tokenize_in_process(alone, shard_tokens=1000, say=lambda _: None)
    assert manifest["key"] == expected["key"] and manifest["splits"] == expected["splits"]
    ours, theirs = open_shards(plan.cache_uri)[0], open_shards(alone.cache_uri)[0]
    assert np.array_equal(ours.window(0, len(ours)), theirs.window(0, len(theirs)))
    assert lines[-1].startswith("tokenized 5/5 files: ") and "MB/s" in lines[-1]


def test_a_bad_jsonl_line_stops_the_pass_naming_file_and_line(cluster, tmp_path, capsys):
    # Past the 64 KiB the driver checks before Ray starts (corpus.check_jsonl_head, unit-
    # tested): the tokenizing pass finds it.
    (tmp_path / "data").mkdir()
    good = '{"text": "a fine document of about sixty bytes, no more"}\n'
    lines = 2 * TEXT_HEAD_BYTES // len(good)
    (tmp_path / "data" / "a.jsonl").write_text(good * lines + '{"txt": "typo"}\n')
    code = pretrain.main([*TINY, "--data", str(tmp_path / "data"),
                          "--run-dir", str(tmp_path / "runs" / "r")])
    assert code == 2
    assert f"{tmp_path}/data/a.jsonl:{lines + 1}: no 'text' field (--text-field)" in \
        capsys.readouterr().err
    assert not (tmp_path / "runs" / "r").exists()
    caches = list((tmp_path / "runs" / "data-cache").iterdir())
    assert caches and not any((c / MANIFEST_FILE).exists() for c in caches)


def test_pretrain_on_own_files_then_a_second_run_tokenizes_nothing(cluster, corpus, tmp_path,
                                                                   capsys):
    args = [*TINY, "--data", str(corpus), "--train-tokenizer", "300", "--max-steps", "2"]
    assert pretrain.main([*args, "--run-dir", str(tmp_path / "runs" / "first")]) == 0
    first = capsys.readouterr().out
    assert "tokenized 5/5 files" in first
    summary = read_summary(tmp_path / "runs" / "first")
    assert summary["steps"] == 2 and summary["held_out_loss"] is not None
    config = json.loads((tmp_path / "runs" / "first" / "config.json").read_text())["train"]
    assert config["vocab_size"] == 300 and os.path.isfile(
        os.path.join(config["data_cache"], MANIFEST_FILE))
    assert (tmp_path / "runs" / "first" / "tokenizer.json").is_file()

    assert pretrain.main([*args, "--run-dir", str(tmp_path / "runs" / "second")]) == 0
    second = capsys.readouterr().out
    assert "token shards cached at" in second and "tokenized" not in second
    again = json.loads((tmp_path / "runs" / "second" / "config.json").read_text())["train"]
    assert again["data_key"] == config["data_key"]

    code = pretrain.main([*args, "--seq-len", "4096",
                          "--run-dir", str(tmp_path / "runs" / "long")])
    assert code == 2 and "--seq-len 4096: the corpus's" in capsys.readouterr().err
