"""Reading a Hugging Face GPT-2 model's weights into ours (`jobs/pretrain.py --init-from`),
and the name mapping both directions use. Apart from hf_export (which writes exports and
reads compress stages) so that the training loop, which imports a model's weights, does not
depend on compression through it."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.hf_files import INDEX_FILE, SAFETENSORS_FILE, ExportError
from orchestrator.validation import expand_home

if TYPE_CHECKING:
    import torch

# Ours -> GPT-2's name, per block; True = a Linear weight, stored transposed (Conv1D).
BLOCK_NAMES = {
    "ln1.weight": ("ln_1.weight", False), "ln1.bias": ("ln_1.bias", False),
    "attn.qkv.weight": ("attn.c_attn.weight", True), "attn.qkv.bias": ("attn.c_attn.bias", False),
    "attn.proj.weight": ("attn.c_proj.weight", True),
    "attn.proj.bias": ("attn.c_proj.bias", False),
    "ln2.weight": ("ln_2.weight", False), "ln2.bias": ("ln_2.bias", False),
    "mlp.fc.weight": ("mlp.c_fc.weight", True), "mlp.fc.bias": ("mlp.c_fc.bias", False),
    "mlp.proj.weight": ("mlp.c_proj.weight", True), "mlp.proj.bias": ("mlp.c_proj.bias", False),
}
TOP_NAMES = {"tok_emb.weight": "transformer.wte.weight", "pos_emb.weight": "transformer.wpe.weight",
              "ln_f.weight": "transformer.ln_f.weight", "ln_f.bias": "transformer.ln_f.bias"}


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a Hugging Face model: model.safetensors, or the shards its
    model.safetensors.index.json names (save_pretrained shards big models)."""
    single, index = directory / SAFETENSORS_FILE, directory / INDEX_FILE
    if single.is_file():
        return [single]
    if not index.is_file():
        found = ", ".join(sorted(p.name for p in directory.iterdir())[:10])
        raise ExportError(f"--init-from {directory}: no {SAFETENSORS_FILE} nor {INDEX_FILE} "
                          f"(weights are read from safetensors only, never from a pickle); "
                          f"found: {found}")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
        if not shards or not all(isinstance(f, str) and "/" not in f for f in shards):
            raise ValueError("weight_map must map tensor names to file names beside it")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ExportError(f"--init-from: cannot read {index}: {e}") from None
    missing = [f for f in shards if not (directory / f).is_file()]
    if missing:
        raise ExportError(f"--init-from: {index} names {missing[0]}, which is not in "
                          f"{directory} ({len(missing)} of {len(shards)} shard(s) missing)")
    return [directory / f for f in shards]


# The dtypes a weight may have: safetensors' name -> torch's (torch.<name>; torch is imported
# only where tensors are). Another (a quantized model's I8 or U8 codes, F8 with scales beside
# it) loaded cast to float: codes taken for weights, a model of noise.
FLOAT_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
NOT_FLOAT = (f"not floating point ({', '.join(list(FLOAT_DTYPES)[:-1])} or "
             f"{list(FLOAT_DTYPES)[-1]}): a quantized model? import the model it was "
             "quantized from")


def hf_name(key: str) -> str:
    """A tensor's name with the `transformer.` prefix Hub checkpoints of GPT2Model omit."""
    return key if key.startswith(("transformer.", "lm_head")) else f"transformer.{key}"


def check_tied(lm_head: "torch.Tensor", wte: "torch.Tensor", path: Path) -> None:
    import torch

    if lm_head.shape != wte.shape or not torch.equal(lm_head, wte):
        raise ExportError(f"--init-from: {path}: lm_head.weight differs from the token "
                          "embedding (transformer.wte.weight); our model's output layer is "
                          "its token embedding, so an untied lm_head cannot be kept")


def load_hf_weights(model, directory: str | os.PathLike) -> None:
    """Copy a GPT-2 model's weights (model.safetensors, or its shards) into our `model` (same
    shape; the position table is cut to the model's context). ExportError naming the tensor
    otherwise."""
    from safetensors.torch import load_file

    files = weight_files(expand_home(directory, "--init-from", ExportError))
    path = files[0] if len(files) == 1 else files[0].parent / INDEX_FILE
    hf = {hf_name(k): v for f in files for k, v in load_file(str(f)).items()}
    state = model.state_dict()
    loaded = {}
    for ours, name in TOP_NAMES.items():
        loaded[ours] = _take(hf, name, path)
    loaded["pos_emb.weight"] = loaded["pos_emb.weight"][:state["pos_emb.weight"].shape[0]]
    for i in range(len(model.blocks)):
        for ours, (name, transpose) in BLOCK_NAMES.items():
            tensor = _take(hf, f"transformer.h.{i}.{name}", path)
            loaded[f"blocks.{i}.{ours}"] = tensor.t() if transpose else tensor
    if "lm_head.weight" in hf:
        check_tied(hf["lm_head.weight"], loaded["tok_emb.weight"], path)
    loaded["lm_head.weight"] = loaded["tok_emb.weight"]
    for name, tensor in loaded.items():
        if tuple(tensor.shape) != tuple(state[name].shape):
            raise ExportError(f"--init-from {path}: {name} has shape {tuple(tensor.shape)}, "
                              f"the model needs {tuple(state[name].shape)}")
    extra = {k: v for k, v in state.items() if k not in loaded}  # e.g. span parameters
    model.load_state_dict({**extra, **{k: v.to(state[k].dtype) for k, v in loaded.items()}})


def _take(hf: dict[str, torch.Tensor], name: str, path: Path) -> torch.Tensor:
    if name not in hf:
        raise ExportError(f"--init-from {path}: no tensor {name!r} (not a GPT-2 checkpoint?)")
    dtype = str(hf[name].dtype).removeprefix("torch.")
    if dtype not in FLOAT_DTYPES.values():
        raise ExportError(f"--init-from {path}: {name} is {dtype}, {NOT_FLOAT}")
    return hf[name]
