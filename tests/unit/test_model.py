import math

import pytest
import torch

from orchestrator.training.model import GPT, GPTConfig

TINY = GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32)


def test_forward_backward_shapes_and_initial_loss():
    torch.manual_seed(0)
    model = GPT(TINY)
    idx = torch.randint(0, 256, (3, 16))
    logits, loss = model(idx, torch.randint(0, 256, (3, 16)))
    assert logits.shape == (3, 16, 256)
    # An untrained model is close to uniform over 256 bytes.
    assert abs(loss.item() - math.log(256)) < 0.3
    loss.backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())


def test_attention_is_causal():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    idx = torch.randint(0, 256, (1, 16))
    changed = idx.clone()
    changed[0, -1] = (idx[0, -1] + 1) % 256
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    # Changing the last token must not change any earlier position's prediction.
    assert torch.allclose(a[0, :-1], b[0, :-1], atol=1e-6)


def test_too_long_sequence_is_refused():
    with pytest.raises(ValueError, match="block_size 16"):
        GPT(TINY)(torch.zeros(1, 17, dtype=torch.long))


def test_head_is_tied_to_embedding():
    model = GPT(TINY)
    assert model.lm_head.weight is model.tok_emb.weight
