import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from orchestrator.training.loss import token_cross_entropy
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


def test_the_loss_of_bf16_logits_is_computed_in_fp32():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 70) * 4
    targets = torch.randint(0, 70, (2, 5))
    low = token_cross_entropy(logits.bfloat16(), targets)
    assert low.dtype == torch.float32
    # Rounded to bf16 (8 bits of mantissa), the loss would be off by up to ~0.4%.
    exact = F.cross_entropy(logits.bfloat16().float().view(-1, 70), targets.view(-1))
    assert low.item() == exact.item()


def test_a_vocabulary_off_the_alignment_trains_on_a_padded_head_with_the_same_results():
    """GPT-2's 50,257 rows are padded to a multiple of 64 for the head's product in training:
    the logits, loss and gradients must be the unpadded head's."""
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(TINY, vocab_size=300))
    idx, targets = torch.randint(0, 300, (3, 16)), torch.randint(0, 300, (3, 16))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 16, 300) and not logits.is_contiguous()  # the padded product
    loss.backward()
    padded_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    unpadded, _ = model(idx)  # decoding's path: the head as it is
    reference = F.cross_entropy(unpadded.float().view(-1, 300), targets.view(-1))
    reference.backward()
    assert torch.equal(logits, unpadded)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    for padded, p in zip(padded_grads, model.parameters()):
        assert torch.allclose(padded, p.grad, atol=1e-7)


def test_training_can_leave_the_logits_out_and_gets_the_same_loss_and_gradients():
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(TINY, vocab_size=300))
    idx, targets = torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16))
    logits, loss = model(idx, targets)
    loss.backward()
    with_logits = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    none, loss_only = model(idx, targets, return_logits=False)
    loss_only.backward()
    assert logits is not None and none is None
    assert loss_only.item() == pytest.approx(loss.item(), rel=1e-7)
    assert all(torch.equal(a, p.grad) for a, p in zip(with_logits, model.parameters()))
