"""GPU checks in one plain process (no Ray, no NCCL), for a lent GPU machine.

Runs the project's own training loop (`orchestrator.training.loop.train` through a
`LocalSession`) and prints one JSON line at the end:
  - the NVML probe's view of the GPUs and the `auto` precision chosen;
  - a bf16 matmul's rate measured here (8192^3, CUDA events): the achievable peak;
  - bf16 MFU of GPT-2 small's shape (`large`) and of `gpt2-medium` (then `gpt2-large` if time
    is left) at seq 1024 with GPT-2's 50,257-token vocabulary, without and with
    `torch.compile`, against the datasheet dense bf16 peak (the table in
    orchestrator/training/efficiency.py) and against the measured peak; `large` also with
    the bundled corpus's 256 byte values (the figure measured before) and with the vocabulary
    padded to 50,304 (a multiple of 64);
  - an fp16 run with dynamic loss scaling (its final scale and that its loss fell);
  - peak memory of each run (`peak_memory_gb`, in GiB).

    PYTHONPATH=. python -m scripts.gpu_check [--steps 20] [--budget-s 380] [--out FILE]
        [--runs large:128:compiled:vocab=50257 gpt2-medium:64:compiled ...]

Four run flags explain a figure or try an alternative rather than measure the product as it
is (such rows say `"variant": true` and stay out of `compile_speedup`): `cudnn` puts cuDNN's
attention first in SDPA's backend order (on the H200 SDPA already picks it, so no default
run sets it); `foreach` steps AdamW with PyTorch's foreach kernels instead of the fused one
training uses on a GPU (the A/B of that choice); `autotune` lets inductor benchmark its
choices while compiling (max_autotune and coordinate_descent_tuning, what
mode="max-autotune-no-cudagraphs" sets; not measured yet, so its cost is an allowance);
`profile` records the run's CUDA kernels from its first report on (past the compile) and adds
each kind's share of that GPU time (matrix products, attention, the loss, inductor's fused
kernels, the optimizer, copies), the top kernels and each kind's largest to its row. A
profiled run's rates carry the profiler's overhead (under 1% on `large` on the H200); the
default runs profile one `large` run beside the plain one.

A lent machine's time is short: runs go in order of importance, one that would not finish
inside `--budget-s` is skipped (and says so), a failed run records its error and the next one
goes on, and `--out` is rewritten after every run so a killed check still leaves its figures.
The lent machine has its own torch and no package registry: this imports only torch and the
project's pure modules.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import re
import signal
import sys
import tempfile
import time
import traceback
from unittest import mock

# The budget counts from here, before torch and the project are imported: the shell's
# `timeout` counts from the process's start, and a run that outlived the budget by the
# imports' seconds was killed before the final line.
PROCESS_STARTED = time.monotonic()

import torch  # noqa: E402

from orchestrator.config import MODEL_PRESETS, TrainConfig
from orchestrator.probes import probe_nvml
from orchestrator.runs import out_file
from orchestrator.training.efficiency import gpu_peak_flops
from orchestrator.training.loop import train
from orchestrator.training.precision import resolve_precision
from orchestrator.training.session import LocalSession
from orchestrator.validation import strict_float, strict_int

SEQ_LEN = 1024
BYTE_VOCAB = 256  # the bundled corpus's vocabulary
GPT2_VOCAB = 50257  # GPT-2's tokenizer: what a GPT-2-shaped model has in practice
COST_STEPS = 20  # the steps a Run's cost_s was measured at (the default --steps)


@dataclasses.dataclass(frozen=True)
class Run:
    preset: str
    batch: int  # sequences per step at SEQ_LEN
    precision: str = "bf16"
    compile: bool = False
    # The model's vocabulary. Throughput depends on its size, not on the token ids, so the
    # bundled byte corpus stands in for tokenized text (ids < 256 of a larger vocabulary).
    vocab: int = BYTE_VOCAB
    cudnn: bool = False  # cuDNN attention first in SDPA's backend order
    profile: bool = False  # record the CUDA kernels: the row gets where the GPU time went
    foreach: bool = False  # AdamW's foreach step (PyTorch's CUDA default), not the fused one
    # Inductor tunes its kernels (what mode="max-autotune-no-cudagraphs" sets: matmul
    # templates benchmarked against cuBLAS, block sizes of its own kernels searched).
    autotune: bool = False
    # Its wall time at COST_STEPS steps on the lent H200 (2026-12-04, measured or, where not
    # run, scaled from a smaller batch; rounded up), scaled up for more steps: a run that
    # cannot finish inside the budget is skipped.
    cost_s: float = 60.0

    @property
    def name(self) -> str:
        return (f"{self.precision}-{self.preset}{'-compiled' if self.compile else ''}"
                f"{'' if self.vocab == BYTE_VOCAB else f'-vocab{self.vocab}'}"
                f"{'-cudnn' if self.cudnn else ''}{'-foreach' if self.foreach else ''}"
                f"{'-autotune' if self.autotune else ''}{'-profiled' if self.profile else ''}")

    @property
    def variant(self) -> bool:
        """A run that explains or tries something (not the product's defaults): kept out of
        the compile speedups."""
        return self.cudnn or self.profile or self.foreach or self.autotune


# In order of importance: what issue 19 asks first (GPT-2 small's shape, its vocabulary
# included, with and without compile; fp16 with loss scaling; a larger preset with and
# without), then where GPT-2 small's GPU time goes, the largest preset, and the byte and
# padded vocabularies measured before. Batches fill a third to two thirds of an H200's 140 GiB
# (143,771 MiB; peaks with GPT-2's vocabulary at ff3fa63: large 128 -> 55 GiB compiled, 68 GiB
# eager; gpt2-medium 64 -> 65 GiB compiled; gpt2-large 32 -> 83 GiB eager at 54fb133); out of
# memory halves them. (cuDNN's attention is what SDPA already picks on an H200: a `cudnn` run
# is no longer a default one.)
RUNS = (
    Run("large", 128, compile=True, vocab=GPT2_VOCAB, cost_s=75.0),
    Run("large", 128, vocab=GPT2_VOCAB, cost_s=30.0),
    Run("large", 16, precision="fp16", cost_s=10.0),
    Run("gpt2-medium", 64, compile=True, vocab=GPT2_VOCAB, cost_s=115.0),
    Run("gpt2-medium", 64, vocab=GPT2_VOCAB, cost_s=40.0),
    Run("large", 128, compile=True, vocab=GPT2_VOCAB, profile=True, cost_s=75.0),
    Run("gpt2-large", 32, compile=True, vocab=GPT2_VOCAB, cost_s=160.0),
    Run("gpt2-large", 32, vocab=GPT2_VOCAB, cost_s=55.0),
    Run("large", 128, compile=True, cost_s=55.0),
    Run("large", 128, compile=True, vocab=50304, cost_s=75.0),
)


def measure_matmul_tflops(size: int = 8192, warmup_s: float = 1.0, windows: int = 5,
                          repeats: int = 50) -> float:
    """bf16 matmul rate on random data, timed with CUDA events: the peak this GPU reaches,
    the best of `windows` windows of `repeats` products after `warmup_s` of them (10 products
    right after the process started, ~14 ms while the clocks ramped, read 774-815 TFLOP/s
    across calls, and every row's MFU against it moved with that)."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    started = time.perf_counter()
    while time.perf_counter() - started < warmup_s:
        a @ b
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(windows):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            a @ b
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1000 / repeats)
    return 2 * size ** 3 / best / 1e12


# Kinds of CUDA kernels by name, the first match wins: attention before matrix products (its
# kernels' names can carry "cutlass"); the loss before inductor's fused kernels (which name
# the ops they fuse), and those before copies (autocast's casts make most of their names
# carry "_to_copy").
KERNEL_KINDS = (
    ("attention", re.compile(r"flash|fmha|sdpa|attention", re.I)),
    ("matmul", re.compile(r"gemm|xmma|cutlass|nvjet|cublas|triton_tem_", re.I)),
    ("loss", re.compile(r"softmax|nll_loss|cross_entropy|logsumexp", re.I)),
    ("optimizer", re.compile(r"multi_tensor|foreach|adam", re.I)),
    ("fused (inductor)", re.compile(r"^triton_", re.I)),
    ("copies", re.compile(r"memcpy|memset|copy", re.I)),
)


def kernel_kind(name: str) -> str:
    return next((kind for kind, pattern in KERNEL_KINDS if pattern.search(name)), "other")


def kernel_breakdown(device_us: dict[str, float], top: int = 8, per_kind: int = 3) -> dict:
    """Where the GPU time went: each kind's share of the kernels' total time, the `top`
    kernels' names (cut to 100 characters) with their shares, and each kind's `per_kind`
    largest (what "other" and inductor's fused kernels are, which the top list may not show)."""
    total = sum(device_us.values())
    if total <= 0:
        return {"profile_error": "the profiler recorded no CUDA kernel time"}
    shares: dict[str, float] = {}
    by_kind: dict[str, list[tuple[str, float]]] = {}
    for name, us in device_us.items():
        kind = kernel_kind(name)
        shares[kind] = shares.get(kind, 0.0) + us / total
        by_kind.setdefault(kind, []).append((name, us))

    def largest(kernels, count: int) -> list:
        ranked = sorted(kernels, key=lambda item: -item[1])[:count]
        return [[name[:100], round(us / total, 4)] for name, us in ranked]

    return {"device_time_s": round(total / 1e6, 3),
            "device_time_shares": {k: round(v, 4) for k, v in
                                   sorted(shares.items(), key=lambda item: -item[1])},
            "top_kernels": largest(device_us.items(), top),
            "top_kernels_by_kind": {kind: largest(kernels, per_kind)
                                    for kind, kernels in sorted(by_kind.items())}}


def kernel_times(profiler: torch.profiler.profile) -> dict[str, float]:
    """Microseconds of GPU time per kernel name recorded by a CUDA-only profiler (the CUDA
    runtime's host-side calls it also records have none and are left out)."""
    return {event.key: event.self_device_time_total for event in profiler.key_averages()
            if event.self_device_time_total > 0}


def attention_backends(run: Run):
    """cuDNN's attention first in SDPA's backend order for a `cudnn` run (the others after it,
    for shapes cuDNN does not take); the default order otherwise."""
    if not run.cudnn:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                        SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH], set_priority=True)


@contextlib.contextmanager
def run_options(run: Run):
    """What a run's flags change, for the run only: SDPA's backend order, the optimizer's
    step, inductor's tuning."""
    import torch._inductor.config as inductor

    from orchestrator.training import optim

    with contextlib.ExitStack() as stack:
        stack.enter_context(attention_backends(run))
        if run.foreach:
            stack.enter_context(mock.patch.object(optim, "uses_fused_adamw",
                                                  lambda params: False))
        if run.autotune:
            stack.enter_context(inductor.patch(max_autotune=True,
                                               coordinate_descent_tuning=True))
        yield


class ProfilingSession(LocalSession):
    """A LocalSession that starts `profiler` at the run's first report, so that it records
    steady-state steps: the steps before include compiling (and inductor's benchmarking).
    What follows the last step (one held-out batch, the final checkpoint's copies) is in."""

    def __init__(self, run_dir: str, profiler: torch.profiler.profile | None,
                 device: torch.device = torch.device("cuda")) -> None:
        super().__init__(run_dir, device=device)
        self.profiler, self.profiling = profiler, False

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        super().report(metrics, checkpoint_dir)
        if self.profiler is not None and not self.profiling:
            self.profiler.start()
            self.profiling = True

    def stop_profiling(self) -> None:
        if self.profiling:
            self.profiler.stop()
            self.profiling = False


def fresh_process_state() -> None:
    """What one run leaves behind, gone before the next: torch.compile's caches (it remembers
    the last batch size per function, and a second model at another batch would compile with
    the batch dimension symbolic, unlike a training process's one model) and freed memory."""
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()


def last_half(steps: int) -> int:
    """The report interval whose last report times the last half of `steps` (an odd count
    with steps // 2 reported at k, 2k and 2k + 1: the figures kept were one step's)."""
    return steps - steps // 2


def train_once(run: Run, steps: int, batch: int) -> dict:
    """One training run in this process: its last report's figures and its wall time."""
    fresh_process_state()
    config = TrainConfig(model_size=run.preset, precision=run.precision, seq_len=SEQ_LEN,
                         batch_size=batch, max_steps=steps, log_every=last_half(steps),
                         checkpoint_every=10 * steps, warmup_steps=1, compile=run.compile,
                         vocab_size=run.vocab, eval_batches=1)
    profiler = (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
                if run.profile else None)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as run_dir, run_options(run):
        torch.cuda.reset_peak_memory_stats()
        session = ProfilingSession(run_dir, profiler)
        try:
            metrics = train(config, session)
        finally:
            session.stop_profiling()
    profiled = kernel_breakdown(kernel_times(profiler)) if profiler is not None else {}
    return {**profiled, "mfu": metrics.get("mfu"), "tokens_per_s": metrics.get("tokens_per_s"),
            "first_loss": metrics.get("first_loss"), "loss": metrics.get("loss"),
            "loss_scale": metrics.get("loss_scale"), "precision": metrics.get("precision"),
            # In GiB, whatever the key says: the recorded runs' key (benchmarks.md) is kept.
            "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1024 ** 3, 2),
            "wall_s": round(time.perf_counter() - started, 1)}


def run_cost(run: Run, steps: int) -> float:
    """A run's expected seconds at `steps` steps (its cost_s was measured at COST_STEPS)."""
    return run.cost_s * max(1.0, steps / COST_STEPS)


def measure(run: Run, steps: int, datasheet: float | None, measured_peak: float,
            deadline: float = float("inf")) -> dict:
    """A run's row: its figures, or its error; out of memory retries once at half the batch
    if the run's cost still fits before `deadline` (time.monotonic())."""
    row: dict = {"run": run.name, "preset": run.preset, "precision": run.precision,
                 "compile": run.compile, "vocab": run.vocab, "cudnn": run.cudnn,
                 "profiled": run.profile, "foreach": run.foreach, "autotune": run.autotune,
                 "variant": run.variant, "batch": run.batch}
    for batch in (run.batch, run.batch // 2):
        if batch < 1:
            break
        if batch != run.batch and time.monotonic() + run_cost(run, steps) > deadline:
            row["error"] += "; no time left to retry at half the batch"
            break
        row["batch"] = batch
        try:
            row.update(train_once(run, steps, batch))
            row.pop("error", None)
            break
        except torch.cuda.OutOfMemoryError as error:
            # (The next run's fresh_process_state frees what the traceback held.)
            row["error"] = f"out of memory at batch {batch}: {str(error)[:300]}"
        except Exception as error:  # noqa: BLE001 - the check reports it and goes on
            row["error"] = f"{type(error).__name__}: {str(error)[:500]}"
            traceback.print_exc()  # (into gpu_check.log: no second call to find where)
            break
    if row.get("mfu") is not None and datasheet:
        # The loop's MFU is against the datasheet peak; the same work over the measured
        # matmul peak says how close to the achievable it is.
        row["mfu_vs_measured_peak"] = round(row["mfu"] * datasheet / measured_peak, 4)
    return row


RUN_SPEC = "PRESET:BATCH[:compiled][:fp16][:cudnn][:foreach][:autotune][:profile][:vocab=N]"
FLAGS = ("compiled", "fp16", "cudnn", "foreach", "autotune", "profile")
# Added to an `autotune` run's cost: not measured (no tuned run has been made), an allowance
# for inductor benchmarking its choices while it compiles.
AUTOTUNE_EXTRA_S = 240.0


def parse_run(spec: str) -> Run:
    """RUN_SPEC (e.g. large:128:compiled:vocab=50257; the
    vocabulary is the byte corpus's 256 unless given). Its cost is the default run's of the
    same preset, compile, precision and vocabulary (else of the nearest vocabulary: start-up,
    compile and checkpoint dominate 20 steps on an H200), else Run's."""
    preset, _, rest = spec.partition(":")
    batch, *flags = rest.split(":")
    vocabs = [f.partition("=")[2] for f in flags if f.startswith("vocab=")]
    unknown = sorted(f for f in flags if f not in FLAGS and not f.startswith("vocab="))
    problem = (f"unknown preset {preset!r} (one of {', '.join(MODEL_PRESETS)})"
               if preset not in MODEL_PRESETS else
               "the batch must be a whole number >= 1" if not batch.isdigit() or int(batch) < 1
               else f"unknown flags {unknown}" if unknown
               else "vocab= must be given once, as a whole number >= 2"
               if len(vocabs) > 1 or (vocabs and not (vocabs[0].isdigit() and int(vocabs[0]) >= 2))
               else "autotune tunes what inductor compiles: add compiled"
               if "autotune" in flags and "compiled" not in flags
               else None)
    if problem:
        raise argparse.ArgumentTypeError(f"--runs: bad run {spec!r}: {problem} ({RUN_SPEC})")
    run = Run(preset, int(batch), "fp16" if "fp16" in flags else "bf16", "compiled" in flags,
              int(vocabs[0]) if vocabs else BYTE_VOCAB, cudnn="cudnn" in flags,
              profile="profile" in flags, foreach="foreach" in flags,
              autotune="autotune" in flags)
    known = sorted((abs(r.vocab - run.vocab), r.cost_s) for r in RUNS
                   if (r.preset, r.compile, r.precision) == (preset, run.compile, run.precision))
    cost = known[0][1] if known else run.cost_s
    return dataclasses.replace(run, cost_s=cost + (AUTOTUNE_EXTRA_S if run.autotune else 0.0))


def compile_speedups(rows: list[dict]) -> dict:
    """tokens/s compiled over not, per preset, precision, vocabulary and batch where both
    ran (variant runs left out: cuDNN attention first, the profiler on, ...)."""
    rates = {(r["preset"], r["precision"], r["vocab"], r["batch"], r["compile"]):
             r.get("tokens_per_s") for r in rows if not r["variant"]}
    return {f"{preset}-{precision}-vocab{vocab}-{batch}":
            round(rate / rates[(preset, precision, vocab, batch, False)], 3)
            for (preset, precision, vocab, batch, compiled), rate in rates.items()
            if compiled and rate and rates.get((preset, precision, vocab, batch, False))}


def save(summary: dict, out: str | None) -> None:
    """Written whole or not at all: a check killed mid-write keeps the previous file."""
    if out:
        partial = f"{out}.partial"
        with open(partial, "w") as handle:
            json.dump(summary, handle, indent=1)
        os.replace(partial, out)


class Terminated(BaseException):
    """SIGTERM (the shell's `timeout`): the check stops, still printing what it measured
    (no Exception: the runs' own `except Exception` must not take it for a failed run)."""


def _terminated(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None, started: float | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=strict_int, default=COST_STEPS,
                        help="steps per run; MFU is the last half's (compile is in the first)")
    parser.add_argument("--budget-s", type=strict_float, default=380.0,
                        help="skip runs that would not finish inside this many seconds")
    parser.add_argument("--out", help="a JSON file rewritten after every run")
    parser.add_argument("--runs", nargs="+", type=parse_run, default=list(RUNS),
                        help=f"runs instead of the default ones, as {RUN_SPEC}")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be >= 2 (MFU is measured over the last half)")
    if not args.budget_s > 0:  # (NaN passed, and turned every budget test off)
        parser.error(f"--budget-s must be a number > 0, got {args.budget_s}")
    if args.out:  # (the first save came after the matmul peak: a traceback, no JSON line)
        out, problem = out_file(args.out, "--out")
        args.out = str(out)
        if problem:
            parser.error(f"--out {args.out}: {problem}")
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device"}))
        return 1
    deadline = (time.monotonic() if started is None else started) + args.budget_s
    summary: dict = {"runs": [], "skipped": []}
    previous = signal.signal(signal.SIGTERM, _terminated)  # (from here on, nothing is lost)
    try:
        name = torch.cuda.get_device_name()
        datasheet = gpu_peak_flops(name, "bf16")
        summary.update({"device": name, "torch": torch.__version__,
                        "capability": ".".join(map(str, torch.cuda.get_device_capability())),
                        "nvml": nvml_rows(),
                        "auto_precision": resolve_precision("auto", torch.device("cuda")),
                        "datasheet_bf16_tflops": datasheet / 1e12 if datasheet else None})
        measured_tflops = measure_matmul_tflops()
        summary["measured_matmul_bf16_tflops"] = round(measured_tflops, 1)
        save(summary, args.out)
        run_all(args, summary, deadline, datasheet, measured_tflops)
    except Terminated:
        summary["terminated"] = ("SIGTERM (the shell's timeout) during "
                                 f"{summary.pop('running', 'the set-up')}: later runs not made")
    finally:
        signal.signal(signal.SIGTERM, previous)
    save(summary, args.out)
    print(json.dumps(summary))
    return 0


def nvml_rows() -> list[dict]:
    """The NVML probe's GPUs; an error is recorded, not fatal: the runs are what counts."""
    try:
        return [dataclasses.asdict(g) for g in probe_nvml()]
    except Exception as error:  # noqa: BLE001
        return [{"error": f"{type(error).__name__}: {error}"}]


def run_all(args, summary: dict, deadline: float, datasheet: float | None,
            measured_tflops: float) -> None:
    for run in args.runs:
        if time.monotonic() + run_cost(run, args.steps) > deadline:
            summary["skipped"].append(run.name)
            continue
        summary["running"] = run.name  # (named if the shell's timeout cuts it)
        row = measure(run, args.steps, datasheet, measured_tflops * 1e12, deadline)
        del summary["running"]
        summary["runs"].append(row)
        summary["compile_speedup"] = compile_speedups(summary["runs"])
        print(json.dumps(row), file=sys.stderr, flush=True)
        save(summary, args.out)


if __name__ == "__main__":
    sys.exit(main(started=PROCESS_STARTED))
