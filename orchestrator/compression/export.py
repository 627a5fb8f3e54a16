"""INT8 export: one compressed model, two artifacts that load without unpickling code.

    <dir>/model.int8.onnx   ONNX graph for ONNX Runtime: every block Linear is
                            DynamicQuantizeLinear(x) -> MatMulInteger(x_u8, W_s8) -> Cast ->
                            Mul(x_scale * w_scale), with int8 weights and per-channel scales
                            stored in the file (ONNX Runtime fuses the pattern into its int8
                            DynamicQuantizeMatMul kernel). Embeddings, LayerNorms and the LM head
                            stay fp32. Protobuf, not pickle.
    <dir>/weights.int8.pt   the same int8 weights and scales plus the fp32 rest, as tensors
                            (torch.load(weights_only=True), sha256 sidecar), for the torch
                            runtime: `load_int8_model` rebuilds the project's GPT with Int8Linear
                            layers, so anything the GPT class gains (KV cache, ...) still works.
    <dir>/config.json       the GPT shape, the quantization scheme, checksums, and which loader
                            to call.

Why ONNX Runtime is the fast path (measured on this project's 2-core AVX2 CPU, no VNNI):
PyTorch's dynamic int8 Linear (fbgemm) was only 1.15-1.2x faster than fp32, while ONNX
Runtime's dynamic int8 MatMul was 5.8x faster than its fp32 at batch 1 (2.2x at 16 rows).

The int8 graph is built from torch.onnx's fp32 export of the dequantized twin, whose Linear
weights are exactly int8 * scale: each MatMul whose weight equals a quantized Linear's
(bit for bit) gets that Linear's own int8 values and scales, so ONNX Runtime computes with
the very integers QAT trained for, not a re-quantization of them.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import logging
import re
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from orchestrator.compression.artifacts import (CheckpointError, cpu_state_dict, load_tensors,
                                                remove_onnx, save_tensors, sha256_file,
                                                write_json)
from orchestrator.compression.qat import WEIGHT_QMAX, Int8Linear, quantize_weight
from orchestrator.cpython_quirks import retry_spurious_ast_error
from orchestrator.job_exit import without_colour
from orchestrator.tokenizer import TokenizerError
from orchestrator.training.loss import token_cross_entropy
from orchestrator.training.model import GPT, GPTConfig

ONNX_FILE = "model.int8.onnx"
TORCH_FILE = "weights.int8.pt"
CONFIG_FILE = "config.json"
FORMAT = "orchestrator-int8/1"


class ExportError(RuntimeError):
    """The model could not be exported; the message says which part."""


def dequantized_twin(model: nn.Module, names: list[str], qmax: int = WEIGHT_QMAX) -> GPT:
    """A plain fp32 GPT whose quantized Linears hold exactly int8 * scale (fake quantization
    of the weights baked in; activation quantization is left to the runtime)."""
    twin = GPT(model.config)
    twin.load_state_dict(model.state_dict())  # FakeQuantLinear keeps Linear's state keys
    with torch.no_grad():
        for name in names:
            q, scales = quantize_weight(model.get_submodule(name).weight, qmax)
            twin.get_submodule(name).weight.copy_(q.float() * scales[:, None])
    return twin.eval()


class _LogitsOnly(nn.Module):
    """Export wrapper: the graph's only output is the logits (the loss is None at inference)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)[0]


@contextlib.contextmanager
def _quiet_exporter():
    """torch.onnx's dynamo exporter prints progress to stdout and logs warnings about
    optional packages (torchvision); keep the pipeline's own progress lines readable."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _onnx_program(module: nn.Module, args: tuple, **options):
    """torch.onnx.export (dynamo), quiet, tried once more after CPython's spurious AST
    error (orchestrator/cpython_quirks.py)."""
    def export():
        with _quiet_exporter():
            return torch.onnx.export(module, args, None, dynamo=True, verbose=False, **options)

    return retry_spurious_ast_error(export)


def _save(program, path: Path) -> None:
    """Write an exported program to `path` without the nodes' stack traces (torch still puts
    the weights in `<path>.data` past 1.5 GiB: artifacts.onnx_files)."""
    _drop_stack_traces(program.model)
    program.save(str(path), external_data=False)


# The node metadata in which torch.onnx records the Python stack trace that made each node.
STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"


def _drop_stack_traces(model) -> None:
    """Remove every node's stack trace (an onnx_ir Model's, before it is saved): about 1 KB a
    node, with this machine's absolute paths, in a file handed to others. Metadata only:
    ONNX Runtime never reads it, and the other provenance entries stay."""
    for graph in [*model.graphs(), *model.functions.values()]:
        for node in graph.all_nodes():
            node.metadata_props.pop(STACK_TRACE_KEY, None)


def export_fp32_onnx(model: nn.Module, path: Path, what: str = "model") -> Path:
    """torch.onnx (dynamo exporter) with dynamic batch and sequence length up to the model's
    context, weights inside the one file up to torch's 1.5 GiB, in `<path>.data` beyond
    (artifacts.onnx_files)."""
    model = copy.deepcopy(model).cpu().eval()
    block = model.config.block_size
    batch_dim = torch.export.Dim("batch", min=1, max=65536)
    time_dim = torch.export.Dim("time", min=1, max=block)
    example = torch.zeros(2, min(8, block), dtype=torch.long)
    try:
        program = _onnx_program(
            _LogitsOnly(model), (example,), input_names=["idx"], output_names=["logits"],
            dynamic_shapes=({0: batch_dim, 1: time_dim},))
        _save(program, path)
    except Exception as e:
        # torch.export's messages run to pages; the first line says what failed.
        first = without_colour(str(e)).strip().splitlines()[0] if str(e).strip() else ""
        raise ExportError(f"torch.onnx.export of the {what} failed: {type(e).__name__}: "
                          f"{first[:300]}") from e
    return path


class _DecodeStep(nn.Module):
    """Export wrapper for one decode step with a KV cache: (idx (B, 1), position (1,), past
    keys and values of every layer, (B, heads_i, L, head_dim) each) -> (logits, the presents:
    past with the new position appended). The GPT's own cache path, so the graph decodes
    exactly as serving's torch model does."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor, position: torch.Tensor, past: list[torch.Tensor]):
        cache = self.model.new_cache()
        for i, layer in enumerate(cache.layers):
            layer.keys, layer.values = past[2 * i], past[2 * i + 1]
        logits, _ = self.model(idx, cache=cache, positions=position)
        return (logits, *[t for layer in cache.layers for t in (layer.keys, layer.values)])


def past_shapes(model: nn.Module, batch: int, length: int) -> list[tuple[int, ...]]:
    """Shapes of the decode graph's past inputs: keys and values of each layer, which has its
    own head count once heads were pruned."""
    head_dim = model.config.n_embd // model.config.n_head
    return [(batch, block.attn.n_head, length, head_dim)
            for block in model.blocks for _ in ("keys", "values")]


def export_decode_onnx(model: nn.Module, path: Path, what: str = "model") -> Path:
    """The single-token decode step (see _DecodeStep) in ONNX, batch and past length dynamic:
    inputs idx, position, past_0..past_{2L-1}; outputs logits, present_0..."""
    model = copy.deepcopy(model).cpu().eval()
    block = model.config.block_size
    past = [torch.zeros(shape) for shape in past_shapes(model, 2, min(4, block - 1))]
    batch_dim = torch.export.Dim("batch", min=1, max=65536)
    past_dim = torch.export.Dim("past", min=1, max=max(block - 1, 2))
    try:
        program = _onnx_program(
            _DecodeStep(model), (torch.zeros(2, 1, dtype=torch.long),
                                 torch.tensor([past[0].shape[2]]), past),
            input_names=["idx", "position"] + [f"past_{i}" for i in range(len(past))],
            output_names=["logits"] + [f"present_{i}" for i in range(len(past))],
            dynamic_shapes=({0: batch_dim}, None, [{0: batch_dim, 2: past_dim}] * len(past)))
        _save(program, path)
    except Exception as e:
        first = without_colour(str(e)).strip().splitlines()[0] if str(e).strip() else ""
        raise ExportError(f"torch.onnx.export of the {what}'s decode step failed: "
                          f"{type(e).__name__}: {first[:300]}") from e
    return path


def twin_from_int8_state(state: dict[str, Any]) -> GPT:
    """The dequantized twin (int8 * scale weights) of an int8 export's tensors."""
    model = GPT(GPTConfig.from_saved(state["config"]))
    full = dict(state["fp32"])
    for name, q in state["int8"].items():
        full[f"{name}.weight"] = q.float() * state["scales"][name][:, None]
    model.load_state_dict(full, strict=True)
    return model.eval()


def int8_decode_onnx(directory: Path, out_path: Path) -> Path:
    """The int8 export's decode step in ONNX Runtime int8 (the same rewrite as the forward
    graph, on the same integers), written to `out_path`: for measuring decode latency."""
    state = load_tensors(Path(directory) / TORCH_FILE)
    twin = twin_from_int8_state(state)
    fp32_path = out_path.with_name(out_path.name + ".fp32.onnx")
    export_decode_onnx(twin, fp32_path, "int8 model")
    quantize_onnx_linears(fp32_path, out_path,
                          {n: (q, state["scales"][n]) for n, q in state["int8"].items()})
    remove_onnx(fp32_path)
    return out_path


@torch.no_grad()
def calibrate_activations(model: nn.Module, names: list[str], batches: list[torch.Tensor]
                          ) -> dict[str, tuple[float, int]]:
    """Static activation quantization's constants: name -> (scale, uint8 zero point) of each
    quantized Linear's input, from its min/max over the calibration batches, with 0 exactly
    representable (as DynamicQuantizeLinear does per call)."""
    low: dict[str, float] = {}
    high: dict[str, float] = {}

    def record(name):
        def hook(module, inputs, output):
            x = inputs[0]
            low[name] = min(low.get(name, 0.0), float(x.min()))
            high[name] = max(high.get(name, 0.0), float(x.max()))
        return hook

    handles = [model.get_submodule(n).register_forward_hook(record(n)) for n in names]
    try:
        for idx in batches:
            model(idx)
    finally:
        for handle in handles:
            handle.remove()
    constants = {}
    for name in names:
        scale = (high[name] - low[name]) / 255 or 1.0
        constants[name] = (scale, int(min(max(round(-low[name] / scale), 0), 255)))
    return constants


def static_int8_onnx(directory: Path, out_dir: Path, batches: list[torch.Tensor]
                     ) -> tuple[Path, Path]:
    """The int8 export's integers with *static* activation scales (calibrated on `batches`):
    (forward graph, decode graph) under `out_dir`, for comparing static against dynamic
    quantization in ONNX Runtime. Not an artifact: QAT trained the dynamic scheme."""
    state = load_tensors(Path(directory) / TORCH_FILE)
    twin = twin_from_int8_state(state)
    linears = {n: (q, state["scales"][n]) for n, q in state["int8"].items()}
    constants = calibrate_activations(twin, list(linears), batches)
    paths = []
    for kind, exporter in (("forward", export_fp32_onnx), ("decode", export_decode_onnx)):
        fp32_path = out_dir / f"static.{kind}.fp32.onnx"
        exporter(twin, fp32_path, "int8 model (static)")
        paths.append(out_dir / f"static.{kind}.onnx")
        quantize_onnx_linears(fp32_path, paths[-1], linears, static=constants)
        remove_onnx(fp32_path)
    return paths[0], paths[1]


def quantize_onnx_linears(fp32_path: Path, int8_path: Path,
                          linears: dict[str, tuple[torch.Tensor, torch.Tensor]],
                          static: dict[str, tuple[float, int]] | None = None) -> dict[str, int]:
    """Rewrite each MatMul whose weight is a quantized Linear's into the int8 pattern.

    `linears`: name -> (int8 weight (out, in), scales (out,)). `static`: name -> (activation
    scale, zero point) calibrated beforehand: the input is quantized with these constants
    (QuantizeLinear) instead of its own run-time range (DynamicQuantizeLinear). Returns
    name -> number of MatMuls rewritten; every name must be found at least once."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(fp32_path))
    graph = model.graph
    # torch's Linear computes x @ W.T: the exported MatMul's constant is W.T, (in, out).
    expected = {name: (q.float() * s[:, None]).t().contiguous().numpy()
                for name, (q, s) in linears.items()}
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for name, array in expected.items():
        by_shape.setdefault(array.shape, []).append(name)
    # initializer -> every Linear whose weight it equals bit for bit, in module order. Linears
    # with equal weights (whole matrices pruned to zero) share int8 values, and torch.onnx
    # stores them as one initializer read by several MatMuls.
    init_to_linears: dict[str, list[str]] = {}
    for init in graph.initializer:
        candidates = by_shape.get(tuple(init.dims))
        if init.data_type != TensorProto.FLOAT or not candidates:
            continue
        array = numpy_helper.to_array(init)
        matches = [n for n in candidates if np.array_equal(array, expected[n])]
        if matches:
            init_to_linears[init.name] = matches

    added: set[str] = set()
    rewritten = {name: 0 for name in linears}
    nodes = []
    for node in graph.node:
        equal = init_to_linears.get(node.input[1]) if node.op_type == "MatMul" else None
        if equal is None:
            nodes.append(node)
            continue
        # The graph runs the Linears in module order: each MatMul takes the first of the
        # equal ones not yet rewritten (its own static activation constants, its own name).
        name = next((n for n in equal if rewritten[n] == 0), equal[0])
        q, scales = linears[name]
        w_q, w_scale, w_zp = f"{name}.weight_int8", f"{name}.weight_scale", f"{name}.weight_zp"
        if name not in added:
            graph.initializer.extend([
                numpy_helper.from_array(q.t().contiguous().numpy(), w_q),
                numpy_helper.from_array(scales.float().numpy(), w_scale),
                numpy_helper.from_array(np.zeros(q.shape[0], dtype=np.int8), w_zp)])
            added.add(name)
        x, out = node.input[0], node.output[0]
        tag = f"{name}/{rewritten[name]}"
        if static is None:
            quant = helper.make_node("DynamicQuantizeLinear", [x], [
                f"{tag}/x_q", f"{tag}/x_scale", f"{tag}/x_zp"], name=f"{tag}/quant")
        else:
            scale, zero_point = static[name]
            graph.initializer.extend([
                numpy_helper.from_array(np.array(scale, dtype=np.float32), f"{tag}/x_scale"),
                numpy_helper.from_array(np.array(zero_point, dtype=np.uint8), f"{tag}/x_zp")])
            quant = helper.make_node("QuantizeLinear", [x, f"{tag}/x_scale", f"{tag}/x_zp"],
                                     [f"{tag}/x_q"], name=f"{tag}/quant")
        nodes += [
            quant,
            helper.make_node("MatMulInteger", [f"{tag}/x_q", w_q, f"{tag}/x_zp", w_zp],
                             [f"{tag}/acc"], name=f"{tag}/matmul_int8"),
            helper.make_node("Cast", [f"{tag}/acc"], [f"{tag}/acc_f"], to=TensorProto.FLOAT,
                             name=f"{tag}/cast"),
            helper.make_node("Mul", [f"{tag}/x_scale", w_scale], [f"{tag}/scale"],
                             name=f"{tag}/scale"),
            helper.make_node("Mul", [f"{tag}/acc_f", f"{tag}/scale"], [out],
                             name=f"{tag}/dequant"),
        ]
        rewritten[name] += 1
    missing = [name for name, count in rewritten.items() if count == 0]
    if missing:
        raise ExportError("the exported graph has no MatMul with the weight of "
                          f"{', '.join(missing)}; cannot quantize it (has the model's Linear "
                          "changed shape or become fused?)")
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for node in graph.node for i in node.input}
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    onnx.checker.check_model(model)
    onnx.save(model, str(int8_path))
    return rewritten


def int8_state(model: nn.Module, names: list[str], qmax: int = WEIGHT_QMAX) -> dict[str, Any]:
    """Tensors-only description of the int8 model: int8 weights + scales of the quantized
    Linears, fp32 for every other state entry, the GPT shape as plain numbers."""
    state = cpu_state_dict(model)  # the tied embedding / LM head stays one tensor
    int8, scales = {}, {}
    for name in names:
        q, s = quantize_weight(state.pop(f"{name}.weight"), qmax)
        int8[name], scales[name] = q, s
    return {"format": FORMAT, "config": dataclasses.asdict(model.config), "weight_qmax": qmax,
            "int8": int8, "scales": scales, "fp32": state}


def save_int8(directory: Path, model: nn.Module, names: list[str],
              qmax: int = WEIGHT_QMAX, tokenizer_sha256: str = "") -> dict[str, Any]:
    """Write both artifacts and config.json into `directory` (which the caller stages).
    `tokenizer_sha256`: the model's tokenizer (its tokenizer.json, which the caller writes
    beside them unless it is bytes), recorded so that serving refuses the export without it."""
    directory = Path(directory)
    state = int8_state(model, names, qmax)
    save_tensors(directory / TORCH_FILE, state)
    twin = dequantized_twin(model, names, qmax)
    fp32_path = directory / ".twin.fp32.onnx"
    export_fp32_onnx(twin, fp32_path, "dequantized twin")
    rewritten = quantize_onnx_linears(
        fp32_path, directory / ONNX_FILE,
        {name: (state["int8"][name], state["scales"][name]) for name in names})
    remove_onnx(fp32_path)
    info = {
        "format": FORMAT,
        "gpt_config": state["config"],
        "quantized_linears": names,
        "matmuls_rewritten": sum(rewritten.values()),
        "weights": f"int8 in [-{qmax}, {qmax}], symmetric, per output channel "
                   f"(scale = max|w_row| / {qmax})",
        "weight_qmax": qmax,
        "activations": "uint8, asymmetric, per tensor, dynamic (ONNX DynamicQuantizeLinear)",
        "fp32": "embeddings (tied LM head), position embedding, LayerNorms, biases",
        "files": {ONNX_FILE: sha256_file(directory / ONNX_FILE),
                  TORCH_FILE: sha256_file(directory / TORCH_FILE)},
        "load": {"onnxruntime": "orchestrator.compression.export.load_onnx_model(dir)",
                 "torch": "orchestrator.compression.export.load_int8_model(dir)"},
        "tokenizer_sha256": tokenizer_sha256,
    }
    write_json(directory / CONFIG_FILE, info)
    return info


def recorded_tokenizer_sha256(directory: str | Path) -> str:
    """The tokenizer an int8 export records in its config.json; "" for an export from before
    it did. TokenizerError when config.json is missing or unreadable: weights.int8.pt copied
    without it was served with the bytes whatever its vocabulary."""
    path = Path(directory) / CONFIG_FILE
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path} cannot be read ({e}); it records the export's "
                             f"tokenizer: copy it (and any tokenizer.json) beside "
                             f"{TORCH_FILE}") from None
    value = info.get("tokenizer_sha256") if isinstance(info, dict) else None
    return value if isinstance(value, str) else ""


def int8_model_config(directory: str | Path) -> GPTConfig:
    """The GPT shape an int8 export records in its config.json (the same as its
    weights.int8.pt's), read without the weights; CheckpointError naming the file otherwise."""
    path = Path(directory) / CONFIG_FILE
    try:
        return GPTConfig.from_saved(json.loads(path.read_text())["gpt_config"])
    except FileNotFoundError:
        raise CheckpointError(f"file missing: {path}") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is not an int8 export description: {e}") from e


def load_int8_model(directory: str | Path, device: str | torch.device = "cpu") -> GPT:
    """The project's GPT with Int8Linear layers (int8 weights in memory), from
    weights.int8.pt; checksum verified, nothing unpickled but tensors. forward(idx) ->
    (logits, None), as the fp32 GPT."""
    path = Path(directory) / TORCH_FILE
    state = load_tensors(path)
    try:
        if state.get("format") != FORMAT:
            raise ValueError(f"format {state.get('format')!r} is not {FORMAT!r}")
        model = GPT(GPTConfig.from_saved(state["config"]))
        full = dict(state["fp32"])
        for name, q in state["int8"].items():
            bias = full.pop(f"{name}.bias", None)
            layer = Int8Linear(q, state["scales"][name], bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
            full.update({f"{name}.weight_int8": q, f"{name}.weight_scale": layer.weight_scale})
            if bias is not None:
                full[f"{name}.bias"] = layer.bias
        model.load_state_dict(full, strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise CheckpointError(f"{path} is not an int8 model this code can load: {e}") from e
    return model.to(device).eval()


class OnnxInt8Model:
    """ONNX Runtime session with the GPT's calling convention: model(idx) -> (logits, loss)."""

    def __init__(self, path: Path, threads: int, config: GPTConfig | None = None) -> None:
        self.path = Path(path)
        self.session = ort_session(self.path, threads)
        self.config = config

    def __call__(self, idx: torch.Tensor, targets: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = torch.from_numpy(
            self.session.run(["logits"], {"idx": idx.cpu().long().numpy()})[0])
        return logits, (None if targets is None else token_cross_entropy(logits, targets.cpu()))

    forward = __call__

    def eval(self) -> "OnnxInt8Model":  # same surface as an nn.Module where callers use it
        return self


def ort_session(path: Path, threads: int):
    """A CPU session with a fixed thread count. Idle spinning is off: spinning ORT threads
    would steal the cores from whatever runs next (measured: a torch forward interleaved with
    a spinning session ran ~1.5x slower), which would bias any latency comparison."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Every graph optimisation (constant folding, the int8 MatMul fusions, layout rewrites):
    # the int8 pattern is only fast once fused into ONNX Runtime's int8 kernels.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def load_onnx_model(directory: str | Path, threads: int = 2) -> OnnxInt8Model:
    """The fast CPU runtime of an int8 export directory, checksum verified."""
    directory = Path(directory)
    config_path, onnx_path = directory / CONFIG_FILE, directory / ONNX_FILE
    for path in (config_path, onnx_path):
        if not path.is_file():
            raise CheckpointError(f"file missing: {path}")
    config = int8_model_config(directory)
    try:
        expected = json.loads(config_path.read_text())["files"][ONNX_FILE]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{config_path} is not an int8 export description: {e}") from e
    if not (isinstance(expected, str) and re.fullmatch("[0-9a-f]{64}", expected)):
        # (a hand-edited number was a TypeError from the comparison below, naming nothing)
        raise CheckpointError(f"{config_path}: files.{ONNX_FILE} must be the sha256 of "
                              f"{ONNX_FILE} (64 hex digits), got {expected!r}")
    actual = sha256_file(onnx_path)
    if actual != expected:
        raise CheckpointError(f"{onnx_path} is corrupt: sha256 {actual[:12]}... does not match "
                              f"the recorded {expected[:12]}...")
    return OnnxInt8Model(onnx_path, threads, config)
