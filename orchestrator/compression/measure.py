"""What the report measures: size on disk, CPU latency, held-out perplexity, sparsity."""
from __future__ import annotations

import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from orchestrator.compression.artifacts import onnx_files
from orchestrator.rounds import rotated

Forward = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def size_bytes(path: Path) -> int:
    """Bytes on disk of a file or a directory; of an ONNX file, with its weights file."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    files = onnx_files(path) if path.suffix == ".onnx" else [path]
    return sum(p.stat().st_size for p in files)


def held_out_windows(tokens: torch.Tensor, seq_len: int, max_tokens: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping (input, target) windows over the start of the held-out text: every
    scored token is predicted once, from up to seq_len - 1 tokens of context."""
    count = min(max_tokens, len(tokens) - 1) // seq_len
    if count < 1:
        raise ValueError(f"held-out text of {len(tokens)} tokens is shorter than one window "
                         f"of {seq_len}")
    span = tokens[:count * seq_len + 1]
    return span[:-1].view(count, seq_len), span[1:].view(count, seq_len)


@torch.no_grad()
def perplexity(model: Forward, inputs: torch.Tensor, targets: torch.Tensor,
               batch_size: int) -> float:
    """exp(mean cross-entropy per token), the model run on CPU as it would be deployed."""
    total, count = 0.0, 0
    for i in range(0, len(inputs), batch_size):
        x, y = inputs[i:i + batch_size], targets[i:i + batch_size]
        logits, _ = model(x)
        total += F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1),
                                 reduction="sum").item()
        count += y.numel()
    try:
        return math.exp(total / count)
    except OverflowError:  # a diverged model's mean loss past ~709: inf (written as null, as
        return math.inf    # any non-finite figure), not a traceback after every stage


@torch.no_grad()
def latencies_ms(models: dict[str, Forward], idx: torch.Tensor, repeats: int,
                 warmup: int = 3) -> dict[str, float]:
    """Median wall time of one forward per model (see timed_ms)."""
    return timed_ms({name: (lambda f=forward: f(idx)) for name, forward in models.items()},
                    repeats, warmup)


@torch.no_grad()
def timed_ms(calls: dict[str, Callable[[], object]], repeats: int, warmup: int = 3
             ) -> dict[str, float]:
    """Median wall time of each call. The calls take turns within each round, so a burst of
    load from another process on the machine hits all of them alike instead of skewing
    whichever happened to be running; and each goes first in turn, or a drift within every
    round would fall on the same calls (the original model always first, its ONNX baseline
    always last)."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for repeat in range(repeats):
        for name in rotated(list(calls), repeat):
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(values) for name, values in times.items()}


@torch.no_grad()
def torch_decode_step(model: torch.nn.Module, batch: int, context: int, seed: int
                      ) -> Callable[[], object]:
    """One single-token decode step of a torch GPT after `context - 1` cached positions, as
    serving runs it; every call decodes the same position (the cache is put back after it)."""
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (batch, context), generator=generator)
    cache = model.new_cache()
    model(prompt[:, :-1], cache=cache)
    saved = [(layer.keys, layer.values) for layer in cache.layers]
    length, token = cache.length, prompt[:, -1:]

    def step():
        for layer, (keys, values) in zip(cache.layers, saved):
            layer.keys, layer.values = keys, values
        cache.length = length
        return model(token, cache=cache)

    return step


def cached_positions(model: torch.nn.Module, context: int) -> int:
    """The positions a decode step after `context - 1` finds in the model's own KV cache: all
    of them, or, with learnt attention spans, only the last window (LayerCache.keep). One
    length for every layer, as an ONNX decode graph takes: the widest layer's window; exact,
    since the keys past a layer's window weigh nothing."""
    spans = model.spans() if hasattr(model, "spans") else []
    if not spans:
        return context - 1
    return min(context - 1, max(span.window() for span in spans))


def onnx_decode_step(session, past_shapes: list[tuple[int, ...]], vocab_size: int,
                     context: int, seed: int) -> Callable[[], object]:
    """The same decode step on an ONNX decode graph (export.export_decode_onnx): random past
    keys and values (the time of a step does not depend on their values)."""
    import numpy as np

    rng = np.random.default_rng(seed % 2 ** 64)  # numpy takes no negative seed; torch does
    feeds = {"idx": rng.integers(0, vocab_size, (past_shapes[0][0], 1)).astype(np.int64),
             "position": np.array([context - 1], dtype=np.int64)}
    feeds.update({f"past_{i}": rng.standard_normal(shape).astype(np.float32)
                  for i, shape in enumerate(past_shapes)})
    return lambda: session.run(["logits"], feeds)


def cpu_description() -> dict[str, object]:
    """The CPU the latencies were taken on, with the flags int8 kernels depend on."""
    flags: set[str] = set()
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("", platform.machine()):
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {"name": name, "cores": os.cpu_count(),
            # Other processes competing for the cores make every latency noisier (the
            # interleaving in latencies_ms keeps the comparison fair, not the absolute times).
            "load_average_1min": round(os.getloadavg()[0], 2),
            "avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
            "avx512_vnni": "avx512_vnni" in flags, "avx_vnni": "avx_vnni" in flags,
            "amx_int8": "amx_int8" in flags, "isa": int8_isa(flags)}


def int8_isa(flags: set[str]) -> str:
    """The widest int8 dot-product instruction set the CPU offers (what ONNX Runtime's MLAS
    picks its u8s8 kernels by): AMX > AVX-512 VNNI > AVX-VNNI > AVX2 (no VNNI) > other."""
    for flag, name in (("amx_int8", "AMX-INT8"), ("avx512_vnni", "AVX-512 VNNI"),
                       ("avx_vnni", "AVX-VNNI"), ("avx2", "AVX2 (no VNNI)")):
        if flag in flags:
            return name
    return "no AVX2"
