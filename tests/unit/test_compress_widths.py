"""Per-layer widths (GPTConfig.mlp_hidden / n_heads_per_layer): the shapes structured pruning
leaves, rebuilt by every loader. Tiny models, CPU, seconds."""
import dataclasses

import pytest
import torch

from orchestrator.config import TrainConfig
from orchestrator.training.checkpoint import (CheckpointError, load_checkpoint,
                                              model_from_state, save_checkpoint)
from orchestrator.training.model import GPT, GPTConfig, widths_from_state_dict

TINY = GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32)
NARROW = dataclasses.replace(TINY, mlp_hidden=(40, 9), n_heads_per_layer=(1, 2))


def seeded(config, seed=0):
    torch.manual_seed(seed)
    return GPT(config).eval()


def test_uniform_widths_spelled_out_build_the_default_model_bit_for_bit():
    default = seeded(TINY)
    explicit = seeded(dataclasses.replace(TINY, mlp_hidden=(128, 128), n_heads_per_layer=(2, 2)))
    for (name, a), (_, b) in zip(default.state_dict().items(), explicit.state_dict().items()):
        assert torch.equal(a, b), name


def test_layers_take_their_own_widths():
    model = seeded(NARROW)
    assert model.blocks[0].mlp.fc.weight.shape == (40, 32)
    assert model.blocks[1].mlp.proj.weight.shape == (32, 9)
    assert (model.blocks[0].attn.n_head, model.blocks[0].attn.head_dim) == (1, 16)
    assert model.blocks[0].attn.qkv.weight.shape == (3 * 16, 32)  # one head of width 16
    assert model.blocks[0].attn.proj.weight.shape == (32, 16)
    assert model.blocks[1].attn.qkv.weight.shape == (3 * 32, 32)
    logits, loss = model(torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16)))
    assert logits.shape == (2, 16, 256) and torch.isfinite(loss)


def test_a_narrow_layer_decodes_with_the_kv_cache_as_it_runs_whole():
    model = seeded(NARROW)
    idx = torch.randint(0, 256, (2, 12))
    whole, _ = model(idx)
    cache, steps = model.new_cache(), []
    with torch.no_grad():
        first, _ = model(idx[:, :5], cache=cache)
        steps.append(first)
        for t in range(5, 12):
            step, _ = model(idx[:, t:t + 1], cache=cache)
            steps.append(step)
    assert torch.allclose(torch.cat(steps, dim=1), whole, atol=1e-5)


@pytest.mark.parametrize("field,value", [("mlp_hidden", (10,)), ("mlp_hidden", (10, 0)),
                                         ("n_heads_per_layer", (1, 3)),
                                         ("n_heads_per_layer", (1, 1.5))])
def test_bad_widths_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(TINY, **{field: value})


def test_widths_survive_a_json_round_trip_as_tuples():
    config = GPTConfig(**{**dataclasses.asdict(NARROW), "mlp_hidden": [40, 9],
                          "n_heads_per_layer": [1, 2]})
    assert config == NARROW


def test_widths_are_read_off_a_state_dict():
    assert widths_from_state_dict(seeded(NARROW).state_dict(), TINY) == {
        "mlp_hidden": (40, 9), "n_heads_per_layer": (1, 2)}
    assert widths_from_state_dict(seeded(TINY).state_dict(), TINY) == {
        "mlp_hidden": None, "n_heads_per_layer": None}


def test_a_training_checkpoint_of_a_pruned_model_loads_with_its_widths(tmp_path):
    train = TrainConfig(model_size="tiny", seq_len=16)
    shape = GPTConfig.from_train_config(train)
    pruned = seeded(dataclasses.replace(shape, mlp_hidden=(100, 17), n_heads_per_layer=(2, 1)))
    save_checkpoint(tmp_path, {"model": pruned.state_dict(), "config": train.to_dict()})
    model, _ = model_from_state(load_checkpoint(tmp_path), tmp_path)
    assert model.config.mlp_hidden == (100, 17) and model.config.n_heads_per_layer == (2, 1)
    idx = torch.randint(0, 256, (1, 8))
    assert torch.equal(model(idx)[0], pruned(idx)[0])
    # Weights that no per-layer width explains are still refused, naming the file.
    state = pruned.state_dict()
    state["blocks.0.attn.qkv.weight"] = torch.zeros(50, 64)
    save_checkpoint(tmp_path / "bad", {"model": state, "config": train.to_dict()})
    with pytest.raises(CheckpointError, match="state.pt"):
        model_from_state(load_checkpoint(tmp_path / "bad"), tmp_path / "bad")


def test_the_int8_loaders_rebuild_a_narrow_model(tmp_path):
    from orchestrator.compression import export
    from orchestrator.compression.prune import prunable_names

    model = seeded(dataclasses.replace(NARROW, block_size=8))
    names = prunable_names(model)
    export.save_int8(tmp_path, model, names)
    idx = torch.randint(0, 256, (2, 8))
    twin = export.dequantized_twin(model, names)
    torch_int8 = export.load_int8_model(tmp_path)
    onnx_int8 = export.load_onnx_model(tmp_path, threads=1)
    assert torch_int8.config.mlp_hidden == (40, 9) == onnx_int8.config.mlp_hidden
    reference = twin(idx)[0]
    # Activation quantization is the only difference from the dequantized twin.
    assert (torch_int8(idx)[0] - reference).abs().max() < 0.05
    assert (onnx_int8(idx)[0] - reference).abs().max() < 0.05
