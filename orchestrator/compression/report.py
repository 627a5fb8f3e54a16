"""The report: original vs pruned vs INT8 (and a distilled smaller student), measured the same
way at every latency shape (batch 1 and a serving-like batch, whole windows and single-token
decode steps with a KV cache), as a table and a dict."""
from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from orchestrator.compression import measure, structured
from orchestrator.compression.config import CompressConfig
from orchestrator.compression.export import (ONNX_FILE, TORCH_FILE, export_decode_onnx,
                                             export_fp32_onnx, int8_decode_onnx,
                                             load_int8_model, load_onnx_model, ort_session,
                                             OnnxInt8Model, static_int8_onnx)
from orchestrator.config import ConfigError

COLUMNS = ("model", "runtime", "size_bytes", "latency_ms", "perplexity", "sparsity")
SCRATCH_PREFIX = ".report-"  # the report's temporary folder in --out, one per attempt
# A model whose perplexity is more than this many times the original's is named in a warning
# line under the table (the run still succeeds: the loss stayed finite).
PPL_WARN_RATIO = 10


def _row(model: str, runtime: str, size: int, latency: dict[str, float], ppl: float | None,
         sparsity: float, primary: str) -> dict[str, Any]:
    return {"model": model, "runtime": runtime, "size_bytes": size,
            "latency_ms": round(latency[primary], 3),
            "latency_ms_by_shape": {k: round(v, 3) for k, v in latency.items()},
            "perplexity": None if ppl is None else round(ppl, 4),
            "sparsity": round(sparsity, 4)}


def latency_seq_len(config: CompressConfig, block_size: int) -> int:
    """The tokens of every latency shape: --latency-seq, capped by the model's context. The
    decode step needs one cached position at least; the pipeline asks before any stage runs,
    not after them all."""
    seq = min(config.latency_seq, block_size)
    if seq < 2:
        raise ConfigError(f"latency_seq (--latency-seq) {config.latency_seq}, capped by the "
                          f"model's context length {block_size}, is {seq}: the decode latency "
                          "needs 2 tokens at least (one cached)")
    return seq


def shapes(config: CompressConfig, block_size: int) -> dict[str, tuple[str, int, int]]:
    """The latency shapes: name -> (kind, batch, tokens). `prefill` runs batch x tokens at
    once; `decode` is one new token per row after tokens - 1 cached positions."""
    seq = latency_seq_len(config, block_size)
    out = {f"{config.latency_batch}x{seq}": ("prefill", config.latency_batch, seq)}
    if config.latency_batched > 1:
        out[f"{config.latency_batched}x{seq}"] = ("prefill", config.latency_batched, seq)
    out[f"decode{config.latency_batch}@{seq}"] = ("decode", config.latency_batch, seq)
    if config.latency_batched > 1:
        out[f"decode{config.latency_batched}@{seq}"] = ("decode", config.latency_batched, seq)
    return out


def _measure_latency(torch_models: dict[str, torch.nn.Module],
                     onnx: dict[str, tuple[Path, Path]], config: CompressConfig,
                     block_size: int, vocab: int, log, onnx_twins: dict[str, torch.nn.Module]
                     ) -> dict[str, dict[str, float]]:
    """name -> shape -> median ms. `onnx`: name -> (forward graph, decode graph); torch models
    decode with their own KV cache. `onnx_twins`: name -> the torch model an ONNX graph was
    made from: its decode graph is fed the cache that model keeps (learnt spans keep only
    their window: measure.cached_positions), not more."""
    sessions = {name: (ort_session(fwd, config.threads), ort_session(dec, config.threads))
                for name, (fwd, dec) in onnx.items()}
    result: dict[str, dict[str, float]] = {name: {} for name in [*torch_models, *onnx]}
    for shape, (kind, batch, seq) in shapes(config, block_size).items():
        if kind == "prefill":
            idx = torch.randint(0, vocab, (batch, seq),
                                generator=torch.Generator().manual_seed(config.seed))
            calls = {name: (lambda m=m: m(idx)) for name, m in torch_models.items()}
            calls.update({name: (lambda s=s[0]: s.run(["logits"], {"idx": idx.numpy()}))
                          for name, s in sessions.items()})
        else:
            calls = {name: measure.torch_decode_step(m, batch, seq, config.seed)
                     for name, m in torch_models.items()}
            calls.update({name: measure.onnx_decode_step(
                sessions[name][1], _decode_past_shapes(
                    onnx[name][1], batch, measure.cached_positions(onnx_twins[name], seq)),
                vocab, seq, config.seed) for name in sessions})
        log(f"report: latency {shape} ({kind}, batch {batch}, {seq} tokens), "
            f"{config.threads} thread(s), median of {config.latency_repeats}, models in turn")
        for name, ms in measure.timed_ms(calls, config.latency_repeats).items():
            result[name][shape] = ms
    return result


def _decode_past_shapes(decode_graph: Path, batch: int, length: int) -> list[tuple[int, ...]]:
    """The past inputs' shapes of a decode graph, its dynamic batch and length filled in."""
    import onnx

    shapes_ = []
    for value in onnx.load(str(decode_graph), load_external_data=False).graph.input:
        if value.name.startswith("past_"):
            dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
            shapes_.append((batch, dims[1], length, dims[3]))
    return shapes_


def build_report(*, teacher: torch.nn.Module, pruned: torch.nn.Module, out: Path,
                 original_file: Path, pruned_file: Path, int8_dir: Path,
                 config: CompressConfig, eval_seq_len: int, held_out: torch.Tensor,
                 log, fp32_onnx: Path | None = None, dense_config=None,
                 student: tuple[torch.nn.Module, Path] | None = None,
                 calibration: list[torch.Tensor] | None = None) -> dict[str, Any]:
    """Measure every model the same way. `fp32_onnx`: the original already exported to ONNX
    (the pipeline's up-front export check), reused for the ONNX Runtime fp32 baseline.
    `dense_config`: the shape pruning started from (sparsity is measured against it).
    `student`: the distilled smaller student (model, weights file) before pruning, its own
    row. `calibration`: training batches; given, the int8 integers are also timed with static
    activation scales calibrated on them (row int8-static), to compare the two schemes."""
    teacher, pruned = teacher.cpu().eval(), pruned.cpu().eval()
    dense_config = dense_config or teacher.config
    threads_before = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    scratch = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=out))
    fp32_onnx, baseline_size = fp32_onnx or scratch / "original.fp32.onnx", 0
    try:
        torch_int8 = load_int8_model(int8_dir)
        torch_models = {"original": teacher, "pruned": pruned, "int8-torch": torch_int8}
        if student is not None:
            torch_models["distilled"] = student[0].cpu().eval()
        log("report: exporting the int8 model's decode step to ONNX")
        onnx = {"int8": (int8_dir / ONNX_FILE,
                         int8_decode_onnx(int8_dir, scratch / "int8.decode.onnx"))}
        if calibration:
            log("report: int8 with static activation scales (calibrated on training batches)")
            onnx["int8-static"] = static_int8_onnx(int8_dir, scratch, calibration)
            static_size = measure.size_bytes(onnx["int8-static"][0])
        if config.onnx_baseline:
            if not fp32_onnx.is_file():
                log("report: exporting the original to ONNX (fp32 baseline for the latency)")
                export_fp32_onnx(teacher, fp32_onnx, "original model")
            baseline_size = measure.size_bytes(fp32_onnx)
            log("report: exporting the original's decode step to ONNX (fp32 baseline)")
            onnx["original-onnx"] = (fp32_onnx, export_decode_onnx(
                teacher, scratch / "original.decode.onnx", "original model"))
        latency = _measure_latency(torch_models, onnx, config, teacher.config.block_size,
                                   teacher.config.vocab_size, log,
                                   {"int8": torch_int8, "int8-static": torch_int8,
                                    "original-onnx": teacher})
        primary = next(iter(shapes(config, teacher.config.block_size)))

        inputs, targets = measure.held_out_windows(held_out, eval_seq_len, config.eval_tokens)
        log(f"report: held-out perplexity on {inputs.numel():,} tokens never trained on")
        evaluated = {"original": teacher, "pruned": pruned,
                     "int8": load_onnx_model(int8_dir, config.threads), "int8-torch": torch_int8,
                     **({"distilled": torch_models["distilled"]} if student else {}),
                     **({"int8-static": OnnxInt8Model(onnx["int8-static"][0], config.threads)}
                        if calibration else {})}
        ppl = {name: measure.perplexity(m, inputs, targets, config.eval_batch_size)
               for name, m in evaluated.items()}
    finally:
        torch.set_num_threads(threads_before)
        shutil.rmtree(scratch, ignore_errors=True)
    # What pruning removed (cut out, or zeroed by unstructured masks); weights that int8
    # rounding happens to turn into 0 are not counted as pruned.
    int8_sparsity = structured.block_sparsity(pruned, dense_config)
    rows = [
        _row("original", "torch fp32", measure.size_bytes(original_file), latency["original"],
             ppl["original"], 0.0, primary),
        _row("pruned", "torch fp32", measure.size_bytes(pruned_file), latency["pruned"],
             ppl["pruned"], structured.block_sparsity(pruned, dense_config), primary),
        _row("int8", "onnxruntime int8", measure.size_bytes(int8_dir / ONNX_FILE),
             latency["int8"], ppl["int8"], int8_sparsity, primary),
        _row("int8-torch", "torch, int8 weights", measure.size_bytes(int8_dir / TORCH_FILE),
             latency["int8-torch"], ppl["int8-torch"], int8_sparsity, primary),
    ]
    if student is not None:
        rows.append(_row("distilled", "torch fp32",
                         measure.size_bytes(student[1]), latency["distilled"],
                         ppl["distilled"], 0.0, primary))
    if calibration:
        rows.append(_row("int8-static", "onnxruntime int8 static", static_size,
                         latency["int8-static"], ppl["int8-static"], int8_sparsity, primary))
    original, int8 = rows[0], rows[2]
    summary = {
        "size_ratio": round(original["size_bytes"] / int8["size_bytes"], 3),
        "latency_ratio": round(original["latency_ms"] / int8["latency_ms"], 3),
        "ppl_original": original["perplexity"],
        "ppl_int8": int8["perplexity"],
        "ppl_increase_pct": round(100 * (ppl["int8"] / ppl["original"] - 1), 3),
        "sparsity": round(int8_sparsity, 4),
    }
    if "original-onnx" in latency:
        rows.append(_row("original-onnx", "onnxruntime fp32", baseline_size,
                         latency["original-onnx"], None, 0.0, primary))
        by_shape = {shape: round(latency["original-onnx"][shape] / latency["int8"][shape], 3)
                    for shape in latency["int8"]}
        summary["latency_ratio_vs_onnx_fp32"] = by_shape[primary]
        summary["latency_ratio_vs_onnx_fp32_by_shape"] = by_shape
    if "int8-static" in latency:
        # Which activation scheme ONNX Runtime runs faster at each shape (the artifact and QAT
        # use dynamic; a shape where static wins is named here).
        summary["faster_int8_scheme_by_shape"] = {
            shape: "static" if latency["int8-static"][shape] < latency["int8"][shape]
            else "dynamic" for shape in latency["int8"]}
    return {"rows": rows, "summary": summary,
            "latency_setup": {"shapes": {k: list(v) for k, v in
                                         shapes(config, teacher.config.block_size).items()},
                              "primary": primary, "batch": config.latency_batch,
                              "seq_len": latency_seq_len(config, teacher.config.block_size),
                              "threads": config.threads, "repeats": config.latency_repeats,
                              "statistic": "median", "cpu": measure.cpu_description()},
            "perplexity_setup": {"tokens": inputs.numel(), "seq_len": eval_seq_len,
                                 "text": "held-out tail of the corpus (never trained on)"}}


def format_number(value: float, decimals: int = 4, sign: bool = False) -> str:
    """A perplexity (or its change in %) for the table and the summary: `decimals`
    decimals, or 4 significant digits in scientific notation from 1e6 on (3.5e31 printed as a 37-character
    .4f number and shifted the table's columns)."""
    plus = "+" if sign else ""
    if math.isfinite(value) and abs(value) >= 1e6:
        return f"{value:{plus}.4g}"
    return f"{value:{plus}.{decimals}f}"


def format_table(report: dict[str, Any]) -> str:
    shape_names = list(report["latency_setup"]["shapes"])
    # (as wide as the longest name: "original-onnx" and "onnxruntime int8 static" overran
    # fixed widths and shifted their rows)
    model_w = max([len("MODEL"), *(len(r["model"]) for r in report["rows"])])
    runtime_w = max([len("RUNTIME"), *(len(r["runtime"]) for r in report["rows"])])
    header = (f"{'MODEL':<{model_w}} {'RUNTIME':<{runtime_w}} {'SIZE MB':>8} "
              + " ".join(f"{'ms ' + name:>14}" for name in shape_names)
              + f" {'PERPLEXITY':>11} {'SPARSITY':>9}")
    lines = [header]
    for r in report["rows"]:
        ppl = "-" if r["perplexity"] is None else format_number(r["perplexity"])
        lines.append(f"{r['model']:<{model_w}} {r['runtime']:<{runtime_w}} "
                     f"{r['size_bytes'] / 1e6:>8.2f} "
                     + " ".join(f"{r['latency_ms_by_shape'][name]:>14.2f}"
                                for name in shape_names)
                     + f" {ppl:>11} {r['sparsity']:>9.1%}")
    s = report["summary"]
    setup = report["latency_setup"]
    vs_onnx = s.get("latency_ratio_vs_onnx_fp32_by_shape")
    lines.append(
        f"size {s['size_ratio']:.2f}x smaller, {s['latency_ratio']:.2f}x faster than torch fp32 "
        f"at {setup['primary']} ({setup['threads']} threads, CPU int8 ISA "
        f"{setup['cpu']['isa']})"
        + (("; vs the original in ONNX Runtime fp32: "
            + ", ".join(f"{k} {v:.2f}x" for k, v in vs_onnx.items())) if vs_onnx else "")
        + f"; perplexity {format_number(s['ppl_original'])} -> {format_number(s['ppl_int8'])} "
        f"({format_number(s['ppl_increase_pct'], 2, sign=True)}%), "
        f"sparsity {s['sparsity']:.1%} of the block parameters")
    warning = perplexity_warning(report["rows"])
    return "\n".join(lines + ([warning] if warning else []))


def perplexity_warning(rows: list[dict[str, Any]]) -> str | None:
    """One line naming the models whose perplexity is over PPL_WARN_RATIO times the
    original's (a fine-tune that went wrong with its loss still finite: --lr 0.99
    --grad-clip 0 ended at 1.1e28), or None."""
    original = next((r["perplexity"] for r in rows if r["model"] == "original"), None)
    if not original:
        return None
    far = [f"{r['model']} {r['perplexity']:.3g}" for r in rows
           if r["perplexity"] is not None and r["perplexity"] > PPL_WARN_RATIO * original]
    if not far:
        return None
    return (f"warning: perplexity over {PPL_WARN_RATIO}x the original's ({original:.3g}): "
            f"{', '.join(far)}; likely a fine-tune gone wrong (look at --lr, --grad-clip, "
            "--warmup-steps, --weight-decay, --temperature): check before using the model")
