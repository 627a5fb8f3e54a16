"""The file names of a Hugging Face model directory (transformers' conventions), for the
modules that write one (hf_export) and those that must recognise one (runs: a folder a
training run must not write into; serving and compression: a checkpoint they refuse, named
as what it is). On their own so that neither imports the other."""
from pathlib import Path

SAFETENSORS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"  # a sharded model: tensor name -> shard file
CONFIG_FILE = "config.json"
# Weights pickled, as transformers saved them before safetensors (whole, or its shard index):
# never read here (hf_import reads safetensors only), only recognised.
PICKLED_FILE, PICKLED_INDEX_FILE = "pytorch_model.bin", "pytorch_model.bin.index.json"


class ExportError(ValueError):
    """A model that cannot be exported or imported as GPT-2; the message says why."""


def holds_hf_model(directory: Path) -> bool:
    """Whether `directory` holds a Hugging Face model: its config.json and its weights, whole
    (model.safetensors) or in shards (the index save_pretrained writes for a big model), or
    pickled (PICKLED_FILE, PICKLED_INDEX_FILE)."""
    return (directory / CONFIG_FILE).is_file() and any(
        (directory / name).is_file() for name in (SAFETENSORS_FILE, INDEX_FILE, PICKLED_FILE,
                                                 PICKLED_INDEX_FILE))
