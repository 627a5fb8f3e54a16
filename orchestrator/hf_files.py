"""The file names of a Hugging Face model directory (transformers' conventions), for the
modules that write one (hf_export) and those that must recognise one (runs: a folder a
training run must not write into). On their own so that neither imports the other."""
SAFETENSORS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"  # a sharded model: tensor name -> shard file
