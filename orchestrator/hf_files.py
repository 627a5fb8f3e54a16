"""The file names of a Hugging Face model directory (transformers' conventions), for the
modules that write one (hf_export) and those that must recognise one (runs: a folder a
training run must not write into; serving and compression: a checkpoint they refuse, named
as what it is). On their own so that neither imports the other."""
from pathlib import Path

SAFETENSORS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"  # a sharded model: tensor name -> shard file
CONFIG_FILE = "config.json"


class ExportError(ValueError):
    """A model that cannot be exported or imported as GPT-2; the message says why."""


def holds_hf_model(directory: Path) -> bool:
    """Whether `directory` holds a Hugging Face model: its config.json and its weights, whole
    (model.safetensors) or in shards (the index save_pretrained writes for a big model)."""
    return (directory / CONFIG_FILE).is_file() and any(
        (directory / name).is_file() for name in (SAFETENSORS_FILE, INDEX_FILE))
