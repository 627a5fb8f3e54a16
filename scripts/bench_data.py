"""Data-path benchmark: every figure measured in this one run, on this machine.

- tokenize_mb_per_s_single / _ray_1 / _ray_2: the tokenizing pass (read, tokenize with a
  byte-level BPE from `tokenizers`, write shards) over the same files: in one process (the
  baseline a user would write: the same per-file code, no Ray), and on Ray Data with 1 and 2
  tokenizer workers (actor start-up included: it is part of the pass). Rounds alternate,
  after an untimed warm-up pass of each side (the process's first Ray Data pass pays
  one-time costs).
  TOKENIZERS_PARALLELISM is "false" on both sides (set here, and passed to Ray's workers), so
  each side tokenizes on one thread per worker. ray_1_vs_single, ray_2_vs_single: the ratios
  (each the median of the rounds' own, its [min, max] under KEY_spread).
- train_tokens_per_s_mmap / _memory: tokens/s of the training loop (`train`, LocalSession) on
  the memory-mapped shards and on the same tokens loaded in memory (same batches: batches are
  a function of seed, rank, step), after an untimed run of each (the process's first
  train() is its slowest); mmap_vs_memory_train: the median of the ratios of neighbouring
  runs (target >= 0.95), its spread beside it. batch_us_mmap / _memory: microseconds per
  `get_batch` call on each, alternating rounds after an untimed one: the data path's own
  cost, free of the training noise.
- time_to_first_step_s_uncached / _cached: jobs/pretrain.py on the same files, the first run
  (tokenizing pass included) and a second run (shards from the cache), each from the call to
  its first training step, after a warm-up run so both see a started control plane.

The last line printed is one JSON object with these figures.
Usage: python -m scripts.bench_data [--quick]
"""
from __future__ import annotations

import os

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # before tokenizers is imported: both sides

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from orchestrator.config import TrainConfig  # noqa: E402
from orchestrator.tokenizer import save_tokenizer, train_bpe  # noqa: E402
from orchestrator.training import loop  # noqa: E402
from orchestrator.training.data import get_batch, load_corpus  # noqa: E402
from orchestrator.training.data_plan import plan_data, tokenize_in_process  # noqa: E402
from orchestrator.training.session import LocalSession  # noqa: E402
from orchestrator.training.shards import open_shards  # noqa: E402
from scripts.rounds import WARM_UP, median_ratio, rounds_after_warm_up  # noqa: E402

CPU = torch.device("cpu")
QUIET = lambda _line: None  # noqa: E731


def make_corpus(directory: Path, files: int, mb_per_file: float) -> None:
    """Real English (the bundled help topics) in shuffled paragraph orders, as .txt files."""
    paragraphs = [p for p in load_corpus().decode().split("\n\n") if p.strip()]
    rng = random.Random(0)
    directory.mkdir(parents=True)
    for i in range(files):
        out, size = [], 0
        while size < mb_per_file * 1e6:
            p = rng.choice(paragraphs)
            out.append(p)
            size += len(p.encode()) + 2
        (directory / f"part{i:02d}.txt").write_text("\n\n".join(out))


def tokenizing(corpus: Path, tokenizer_file: Path, work: Path, rounds: int) -> dict:
    from ray_layer.data_ingest import tokenize_with_ray_data

    megabytes = sum(p.stat().st_size for p in corpus.iterdir()) / 1e6
    rates: dict[str, list[float]] = {"single": [], "ray_1": [], "ray_2": []}
    # An untimed warm-up pass of each side first: the process's first Ray Data pass pays
    # one-time costs (4.9 s, then 1.8-2.2 s a pass with 1 worker on --quick's corpus), which
    # fell on round 0's ray_1 alone.
    for r, side in rounds_after_warm_up(list(rates), rounds):
        plan = plan_data([str(corpus)], tokenizer=str(tokenizer_file),
                         cache_root=str(work / f"{side}-{r}"))
        started = time.perf_counter()
        if side == "single":
            manifest = tokenize_in_process(plan, say=QUIET)
        else:
            manifest = tokenize_with_ray_data(plan, int(side[-1]), say=QUIET)
        rate = megabytes / (time.perf_counter() - started)
        if r != WARM_UP:
            rates[side].append(rate)
        print(f"{r if r == WARM_UP else f'round {r}'}: {side:6} {rate:6.2f} MB/s "
              f"({manifest['train_tokens'] + manifest['held_out_tokens']:,} tokens)")
    median = {side: statistics.median(v) for side, v in rates.items()}

    return {"corpus_mb": round(megabytes, 1),
            "tokenize_mb_per_s_single": round(median["single"], 2),
            "tokenize_mb_per_s_ray_1": round(median["ray_1"], 2),
            "tokenize_mb_per_s_ray_2": round(median["ray_2"], 2),
            **ratio_figures("ray_1_vs_single", rates["ray_1"], rates["single"]),
            **ratio_figures("ray_2_vs_single", rates["ray_2"], rates["single"])}


def ratio_figures(key: str, tops: list[float], bottoms: list[float]) -> dict:
    """`key`: the median of the rounds' own ratios top / bottom; `key`_spread: their [min,
    max] (a median alone hid how far the rounds disagreed)."""
    paired = median_ratio(tops, bottoms)
    return {key: round(paired["ratio"], 3),
            f"{key}_spread": [round(r, 3) for r in paired["spread"]]}



def training(corpus: Path, tokenizer_file: Path, work: Path, rounds: int, steps: int) -> dict:
    plan = plan_data([str(corpus)], tokenizer=str(tokenizer_file), cache_root=str(work))
    tokenize_in_process(plan, say=QUIET)
    train_stream, held_stream, _ = open_shards(plan.cache_uri)
    in_memory = tuple(torch.from_numpy(s.window(0, len(s))) for s in (train_stream, held_stream))
    config = TrainConfig(model_size="small", batch_size=8, seq_len=128, max_steps=steps,
                         log_every=steps, checkpoint_every=steps, eval_batches=1,
                         data_cache=plan.cache_uri, data_key=plan.key,
                         vocab_size=plan.tokenizer.vocab_size,
                         tokenizer_sha256=plan.tokenizer.sha256)
    shards_source = loop.training_data
    rates: dict[str, list[float]] = {"mmap": [], "memory": []}
    # Each side first in turn: the machine is shared and its load drifts; the ratio is taken
    # within each round's pair of runs. An untimed run of each first: the process's first
    # train() was its slowest, and always round 0's mmap run.
    for r, side in rounds_after_warm_up(["mmap", "memory"], rounds):
        # The same loop; only where the tokens live differs.
        loop.training_data = (shards_source if side == "mmap"
                              else lambda _config: in_memory)
        try:
            metrics = loop.train(config, LocalSession(work / f"{side}-{r}", device=CPU))
        finally:
            loop.training_data = shards_source
        if r != WARM_UP:
            rates[side].append(metrics["run_tokens_per_s"])
        print(f"{r if r == WARM_UP else f'round {r}'}: train on {side:6} "
              f"{metrics['run_tokens_per_s']:8,.0f} tokens/s")
    mmap, memory = (statistics.median(rates[s]) for s in ("mmap", "memory"))
    return {"train_tokens_per_s_mmap": round(mmap), "train_tokens_per_s_memory": round(memory),
            **ratio_figures("mmap_vs_memory_train", rates["mmap"], rates["memory"]),
            "train_rounds": rounds,
            **batch_cost(config, train_stream, in_memory[0])}


def batch_cost(config: TrainConfig, stream, tensor: torch.Tensor, calls: int = 300,
               rounds: int = 5) -> dict:
    """What the data path itself costs per step: `get_batch` on the shards and on the tensor,
    alternating rounds of `calls` batches (a training step is ~1000x longer on this CPU),
    after an untimed round of each, as the training runs."""
    times: dict[str, list[float]] = {"mmap": [], "memory": []}
    for r, side in rounds_after_warm_up(["mmap", "memory"], rounds):
        tokens = stream if side == "mmap" else tensor
        seed = rounds if r == WARM_UP else r  # (its own windows, as each round has)
        started = time.perf_counter()
        for step in range(calls):
            get_batch(tokens, config.batch_size, config.seq_len, seed=seed, rank=0, step=step)
        if r != WARM_UP:
            times[side].append((time.perf_counter() - started) / calls * 1e6)
    return {"batch_us_mmap": round(statistics.median(times["mmap"]), 1),
            "batch_us_memory": round(statistics.median(times["memory"]), 1)}


def time_to_first_step(corpus: Path, tokenizer_file: Path, work: Path) -> dict:
    from jobs import pretrain

    base = ["--model-size", "tiny", "--batch-size", "8", "--seq-len", "64", "--max-steps", "2",
            "--log-every", "1", "--num-workers", "1", "--ingest-workers", "2"]

    def first_step_after(name: str, *extra: str) -> float:
        run_dir = work / "runs" / name
        started = time.time()
        if pretrain.main([*base, *extra, "--run-dir", str(run_dir)]) != 0:
            raise SystemExit(f"jobs/pretrain.py failed ({name})")
        return json.loads((run_dir / "summary.json").read_text())["first_step_at"] - started

    first_step_after("warm-up")  # starts the control plane for both measured runs
    data = ["--data", str(corpus), "--tokenizer", str(tokenizer_file)]
    uncached = first_step_after("uncached", *data)
    cached = first_step_after("cached", *data)
    return {"time_to_first_step_s_uncached": round(uncached, 1),
            "time_to_first_step_s_cached": round(cached, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small corpus, fewer rounds")
    args = parser.parse_args()
    files, mb, rounds, steps = (4, 0.5, 2, 6) if args.quick else (6, 1.5, 3, 8)
    import ray

    # A Ray of our own (address="local": never another process's cluster on this machine),
    # used by the Ray Data passes and by jobs/pretrain.py's runs.
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
             log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        work = Path(tmp)
        make_corpus(work / "corpus", files, mb)
        tokenizer = train_bpe((p.read_text() for p in sorted((work / "corpus").iterdir())),
                              4096)
        tokenizer_file = save_tokenizer(tokenizer, work / "tokenizer")
        figures = {"cpus": os.cpu_count(), "tokenizer_vocab": tokenizer.vocab_size,
                   "tokenizers_parallelism": os.environ["TOKENIZERS_PARALLELISM"]}
        figures.update(tokenizing(work / "corpus", tokenizer_file, work / "tok", rounds))
        figures.update(training(work / "corpus", tokenizer_file, work / "train", 2 * rounds,
                                steps))
        figures.update(time_to_first_step(work / "corpus", tokenizer_file, work / "ttfs"))
    ray.shutdown()
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
