"""The LM loss (orchestrator/training/loss.py): F.cross_entropy's value and gradient in fp32,
padded columns out of it, no fp32 copy of the logits kept for the backward."""
import pytest
import torch
import torch.nn.functional as F

from orchestrator.training import loss as loss_module
from orchestrator.training.loss import token_cross_entropy


def reference(logits: torch.Tensor, targets: torch.Tensor, vocab: int) -> torch.Tensor:
    return F.cross_entropy(logits[..., :vocab].float().reshape(-1, vocab), targets.reshape(-1))


def value_and_grad(function, logits, targets, vocab):
    leaf = logits.detach().clone().requires_grad_()
    value = function(leaf, targets, vocab)
    value.backward()
    return value.detach(), leaf.grad


@pytest.mark.parametrize("vocab", [70, 61])  # all columns, and 9 columns of padding
def test_value_and_gradient_are_cross_entropys_and_the_padding_takes_no_part(vocab):
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 70) * 4
    targets = torch.randint(0, vocab, (3, 5))
    ours, ours_grad = value_and_grad(token_cross_entropy, logits, targets, vocab)
    theirs, theirs_grad = value_and_grad(reference, logits, targets, vocab)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    assert torch.allclose(ours_grad, theirs_grad, atol=1e-8)
    assert torch.count_nonzero(ours_grad[..., vocab:]) == 0


def test_eager_slices_of_rows_give_the_one_slice_result(monkeypatch):
    torch.manual_seed(1)
    logits, targets = torch.randn(37, 50) * 3, torch.randint(0, 45, (37,))
    whole, whole_grad = value_and_grad(token_cross_entropy, logits, targets, 45)
    monkeypatch.setattr(loss_module, "EAGER_SLICE_BYTES", 4 * 50 * 4)  # 4 rows a slice
    assert len(loss_module._row_slices(logits)) == 10
    sliced, sliced_grad = value_and_grad(token_cross_entropy, logits, targets, 45)
    assert sliced.item() == pytest.approx(whole.item(), rel=1e-6)
    assert torch.allclose(sliced_grad, whole_grad, atol=1e-8)


def test_bf16_logits_give_an_fp32_loss_and_a_bf16_gradient_of_fp32_arithmetic():
    torch.manual_seed(2)
    logits = (torch.randn(4, 8, 64) * 4).bfloat16()
    targets = torch.randint(0, 64, (4, 8))
    ours, ours_grad = value_and_grad(token_cross_entropy, logits, targets, 64)
    exact, exact_grad = value_and_grad(reference, logits.float(), targets, 64)
    assert ours.dtype == torch.float32 and ours_grad.dtype == torch.bfloat16
    # Rounded to bf16 (8 bits of mantissa) the loss would be off by up to ~0.4%.
    assert ours.item() == pytest.approx(exact.item(), rel=1e-5)
    assert torch.equal(ours_grad, exact_grad.bfloat16())


def test_the_backward_keeps_the_logits_and_no_fp32_copy_of_them():
    """F.cross_entropy(logits.float()) keeps its fp32 log-softmax: a second copy at twice the
    bf16 logits' size, what this loss exists to avoid."""
    logits = torch.randn(16, 128).bfloat16().requires_grad_()
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        token_cross_entropy(logits, torch.randint(0, 128, (16,)))
    full_size = [t for t in saved if t.numel() == logits.numel()]
    assert full_size and all(t.dtype == torch.bfloat16 for t in full_size)
    assert sum(t.numel() * t.element_size() for t in saved) < 1.5 * (
        logits.numel() * logits.element_size())


def test_a_bad_vocabulary_or_target_shape_is_refused_naming_it():
    logits = torch.randn(2, 3, 10)
    with pytest.raises(ValueError, match=r"vocab must be in \[1, 10\].*got 11"):
        token_cross_entropy(logits, torch.zeros(2, 3, dtype=torch.long), 11)
    with pytest.raises(ValueError, match=r"targets' shape \(2, 4\) does not match"):
        token_cross_entropy(logits, torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize("dtype, vocab", [(torch.float32, 64), (torch.bfloat16, 57)])
def test_the_fused_and_the_eager_gradient_formulas_agree(dtype, vocab):
    """Compiled, the backward is one elementwise expression from the saved log-sum-exp;
    eager, aten's softmax a slice at a time: the same gradient either way."""
    torch.manual_seed(3)
    logits = (torch.randn(24, 64) * 4).to(dtype)
    targets = torch.randint(0, vocab, (24,))
    lse = loss_module._logsumexp(logits[:, :vocab])
    scale = torch.tensor(0.25)
    fused = loss_module._fused_gradient(logits, targets, lse, scale, vocab)
    eager = loss_module._eager_gradient(logits[:, :vocab], targets, scale)
    assert fused.dtype == dtype and torch.count_nonzero(fused[:, vocab:]) == 0
    tolerance = 1e-7 if dtype == torch.float32 else 1e-2
    assert torch.allclose(fused[:, :vocab].float(), eager, atol=tolerance)


def test_compiled_the_loss_gives_cross_entropys_value_and_bf16_gradient_with_padding():
    """Through torch.compile (the GPU's default): bf16 logits, 7 columns of padding."""
    torch._dynamo.reset()
    torch.manual_seed(4)
    logits = (torch.randn(32, 64) * 4).bfloat16()
    targets = torch.randint(0, 57, (32,))
    compiled = torch.compile(token_cross_entropy, fullgraph=True)
    ours, ours_grad = value_and_grad(compiled, logits, targets, 57)
    exact, exact_grad = value_and_grad(reference, logits.float(), targets, 57)
    assert ours.item() == pytest.approx(exact.item(), rel=1e-5)
    assert ours_grad.dtype == torch.bfloat16 and torch.count_nonzero(ours_grad[:, 57:]) == 0
    assert torch.allclose(ours_grad[:, :57].float(), exact_grad[:, :57], atol=1e-3)
