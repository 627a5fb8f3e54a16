"""The report: original vs pruned vs INT8, measured the same way, as a table and a dict."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from orchestrator.compression import measure, prune
from orchestrator.compression.artifacts import load_tensors
from orchestrator.compression.config import CompressConfig
from orchestrator.compression.export import (ONNX_FILE, TORCH_FILE, export_fp32_onnx,
                                             load_int8_model, load_onnx_model, ort_session)

COLUMNS = ("model", "runtime", "size_bytes", "latency_ms", "perplexity", "sparsity")


def _row(model: str, runtime: str, size: int, latency: float, ppl: float | None,
         sparsity: float) -> dict[str, Any]:
    return {"model": model, "runtime": runtime, "size_bytes": size,
            "latency_ms": round(latency, 3), "perplexity": None if ppl is None else round(ppl, 4),
            "sparsity": round(sparsity, 4)}


class _OnnxFp32:
    """The original model in ONNX Runtime fp32: isolates what int8 buys from what the runtime
    buys (the issue's 5.8x is int8 vs fp32 inside ONNX Runtime)."""

    def __init__(self, path: Path, threads: int) -> None:
        self.session = ort_session(path, threads)

    def __call__(self, idx: torch.Tensor):
        return torch.from_numpy(self.session.run(["logits"], {"idx": idx.numpy()})[0]), None


def build_report(*, teacher: torch.nn.Module, pruned: torch.nn.Module, out: Path,
                 original_file: Path, pruned_file: Path, int8_dir: Path,
                 config: CompressConfig, eval_seq_len: int, held_out: torch.Tensor,
                 log, fp32_onnx: Path | None = None) -> dict[str, Any]:
    """Measure every model the same way. `fp32_onnx`: the original already exported to ONNX
    (the pipeline's up-front export check), reused for the ONNX Runtime fp32 baseline."""
    teacher, pruned = teacher.cpu().eval(), pruned.cpu().eval()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    exported_here = fp32_onnx is None
    fp32_onnx, baseline_size = fp32_onnx or out / ".original.fp32.onnx", 0
    try:
        onnx_int8 = load_onnx_model(int8_dir, config.threads)
        torch_int8 = load_int8_model(int8_dir)
        int8_state = load_tensors(int8_dir / TORCH_FILE)
        int8_sparsity = prune.sparsity(int8_state["int8"])
        models = {"original": teacher, "pruned": pruned, "int8": onnx_int8,
                  "int8-torch": torch_int8}
        if config.onnx_baseline:
            if exported_here:
                log("report: exporting the original to ONNX (fp32 baseline for the latency)")
                export_fp32_onnx(teacher, fp32_onnx, "original model")
            baseline_size = measure.size_bytes(fp32_onnx)
            models["original-onnx"] = _OnnxFp32(fp32_onnx, config.threads)

        seq = min(config.latency_seq, teacher.config.block_size)
        idx = torch.randint(0, teacher.config.vocab_size, (config.latency_batch, seq),
                            generator=torch.Generator().manual_seed(config.seed))
        log(f"report: latency, batch {config.latency_batch} x {seq} tokens, {config.threads} "
            f"thread(s), median of {config.latency_repeats}")
        latency = measure.latencies_ms(models, idx, config.latency_repeats)

        inputs, targets = measure.held_out_windows(held_out, eval_seq_len, config.eval_tokens)
        log(f"report: held-out perplexity on {inputs.numel():,} tokens never trained on")
        ppl = {name: measure.perplexity(models[name], inputs, targets, config.eval_batch_size)
               for name in ("original", "pruned", "int8", "int8-torch")}
    finally:
        torch.set_num_threads(threads_before)
        if exported_here:
            fp32_onnx.unlink(missing_ok=True)
    original_sparsity = prune.sparsity(prune.prunable_weights(teacher))
    pruned_sparsity = prune.sparsity(prune.prunable_weights(pruned))
    rows = [
        _row("original", "torch fp32", measure.size_bytes(original_file), latency["original"],
             ppl["original"], original_sparsity),
        _row("pruned", "torch fp32", measure.size_bytes(pruned_file), latency["pruned"],
             ppl["pruned"], pruned_sparsity),
        _row("int8", "onnxruntime int8", measure.size_bytes(int8_dir / ONNX_FILE),
             latency["int8"], ppl["int8"], int8_sparsity),
        _row("int8-torch", "torch, int8 weights", measure.size_bytes(int8_dir / TORCH_FILE),
             latency["int8-torch"], ppl["int8-torch"], int8_sparsity),
    ]
    original, int8 = rows[0], rows[2]
    summary = {
        "size_ratio": round(original["size_bytes"] / int8["size_bytes"], 3),
        "latency_ratio": round(original["latency_ms"] / int8["latency_ms"], 3),
        "ppl_original": original["perplexity"],
        "ppl_int8": int8["perplexity"],
        "ppl_increase_pct": round(100 * (ppl["int8"] / ppl["original"] - 1), 3),
        "sparsity": int8_sparsity,
    }
    if "original-onnx" in latency:
        rows.append(_row("original-onnx", "onnxruntime fp32", baseline_size,
                         latency["original-onnx"], None, original_sparsity))
        summary["latency_ratio_vs_onnx_fp32"] = round(
            latency["original-onnx"] / int8["latency_ms"], 3)
    return {"rows": rows, "summary": summary,
            "latency_setup": {"batch": config.latency_batch, "seq_len": seq,
                              "threads": config.threads, "repeats": config.latency_repeats,
                              "statistic": "median", "cpu": measure.cpu_description()},
            "perplexity_setup": {"tokens": inputs.numel(), "seq_len": eval_seq_len,
                                 "text": "held-out tail of the corpus (never trained on)"}}


def format_table(report: dict[str, Any]) -> str:
    header = (f"{'MODEL':<14} {'RUNTIME':<20} {'SIZE (bytes)':>14} {'SIZE MB':>8} "
              f"{'LATENCY ms':>11} {'PERPLEXITY':>11} {'SPARSITY':>9}")
    lines = [header]
    for r in report["rows"]:
        ppl = "-" if r["perplexity"] is None else f"{r['perplexity']:.4f}"
        lines.append(f"{r['model']:<14} {r['runtime']:<20} {r['size_bytes']:>14,} "
                     f"{r['size_bytes'] / 1e6:>8.2f} {r['latency_ms']:>11.2f} {ppl:>11} "
                     f"{r['sparsity']:>9.1%}")
    s = report["summary"]
    setup = report["latency_setup"]
    lines.append(
        f"size {s['size_ratio']:.2f}x smaller, latency {s['latency_ratio']:.2f}x faster "
        f"(batch {setup['batch']} x {setup['seq_len']} tokens, {setup['threads']} threads"
        + (f"; {s['latency_ratio_vs_onnx_fp32']:.2f}x vs the original in ONNX Runtime fp32"
           if "latency_ratio_vs_onnx_fp32" in s else "")
        + f"), perplexity {s['ppl_original']:.4f} -> {s['ppl_int8']:.4f} "
        f"({s['ppl_increase_pct']:+.2f}%), sparsity {s['sparsity']:.1%}")
    return "\n".join(lines)
