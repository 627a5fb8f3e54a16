"""The language model's loss: mean token cross-entropy, computed in fp32 from logits of any
dtype, that keeps only the logits themselves (and one fp32 log-sum-exp per token) for the
backward pass.

Why not `F.cross_entropy(logits.float(), ...)`: autograd then saves the fp32 log-softmax, a
second full copy of the logits at twice their bf16 size (26 GB for GPT-2's vocabulary at
131,072 tokens a step), and every pass over it is memory traffic. Here the forward reads the
logits once for the log-sum-exp, the backward once more for softmax - one-hot, both in fp32
arithmetic: compiled, the backward is one inductor kernel (the one the H200's profile shows),
and compiled GPT-2-small training on an H200 ran 1.066x as many tokens/s as with
`F.cross_entropy` (docs/benchmarks.md); eager, the fp32 temporaries are made a slice of rows
at a time. It is differentiable once (no double backward).

Targets must be ids below `vocab` (no `ignore_index`): one in the padding's columns would
read a zero logit, and checking would cost the GPU a host sync every step.

The logits may be wider than the vocabulary (the LM head padded to aligned rows,
model.VOCAB_ALIGNMENT): the columns past `vocab` take no part and get zero gradient.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

# Bytes of one eager slice of rows in fp32; each slice makes two or three temporaries of
# about that size (the fp32 copy, logsumexp's or softmax's own). Compiled: one slice, fused.
EAGER_SLICE_BYTES = 1 << 28


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                        vocab: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of `targets` (any shape) under `logits` (that shape + a last
    dimension of at least `vocab` columns, default all of them), in fp32 whatever the
    logits' dtype: a low-precision log-softmax over the vocabulary loses accuracy the
    optimizer then chases."""
    width = logits.size(-1)
    vocab = width if vocab is None else vocab
    if not 1 <= vocab <= width:
        raise ValueError(f"vocab must be in [1, {width}] (the logits' last dimension), "
                         f"got {vocab}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets' shape {tuple(targets.shape)} does not match the logits' "
                         f"{tuple(logits.shape)} without their last dimension")
    return _TokenCrossEntropy.apply(logits.reshape(-1, width), targets.reshape(-1), vocab)


class _TokenCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, vocab: int) -> torch.Tensor:
        lse = torch.cat([_logsumexp(logits[rows, :vocab]) for rows in _row_slices(logits)])
        picked = logits.gather(1, targets[:, None]).squeeze(1).float()
        ctx.save_for_backward(logits, targets, lse)
        ctx.vocab = vocab
        return (lse - picked).mean()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        scale = grad / logits.size(0)  # d mean / d each token's loss
        # True while torch.compile traces this backward (then it runs as compiled code);
        # process-wide, so an eager backward on another thread meanwhile would take the
        # fused form too: the same values, with full-size fp32 temporaries.
        if torch.compiler.is_compiling():
            return _fused_gradient(logits, targets, lse, scale, ctx.vocab), None, None
        if logits.dtype == torch.float32 and ctx.vocab == logits.size(1):
            # The gradient is then the only fp32 tensor made: no slices, no copy into place.
            return _eager_gradient(logits, targets, scale), None, None
        grad_logits = torch.empty_like(logits)
        grad_logits[:, ctx.vocab:] = 0
        for rows in _row_slices(logits):
            grad_logits[rows, :ctx.vocab] = _eager_gradient(logits[rows, :ctx.vocab],
                                                            targets[rows], scale)
        return grad_logits, None, None


def _logsumexp(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits.float(), dim=1)


def _fused_gradient(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                    scale: torch.Tensor, vocab: int) -> torch.Tensor:
    """The loss's gradient, in the logits' dtype, as one expression of elementwise ops that
    inductor makes one kernel of (reading the logits once, writing the gradient once):
    (exp(logit - lse) - one-hot) * scale on the first `vocab` columns, zero on the padding's.
    Eager, each op would be a pass of its own over fp32 temporaries (~5x the time of
    _eager_gradient on this project's CPU)."""
    columns = torch.arange(logits.size(1), device=logits.device)
    probs = torch.exp(logits.float() - lse[:, None])
    grad = (probs - (columns == targets[:, None]).float()) * scale
    return torch.where(columns < vocab, grad, 0.0).to(logits.dtype)


def _eager_gradient(logits: torch.Tensor, targets: torch.Tensor,
                    scale: torch.Tensor) -> torch.Tensor:
    """(softmax - one-hot) * scale in fp32 for these rows, in place on aten's fused softmax
    (faster eager than the expression above, and than F.cross_entropy's own backward)."""
    probs = torch.softmax(logits, dim=1, dtype=torch.float32)
    probs[torch.arange(targets.size(0), device=targets.device), targets] -= 1.0
    return probs.mul_(scale)


def _row_slices(logits: torch.Tensor) -> list[slice]:
    """One slice of all rows when compiling (inductor fuses the fp32 arithmetic into its
    kernels and makes no temporaries), else slices whose fp32 temporaries stay within
    EAGER_SLICE_BYTES."""
    rows = logits.size(0)
    if torch.compiler.is_compiling():
        return [slice(0, rows)]
    step = max(1, EAGER_SLICE_BYTES // (4 * max(1, logits.size(1))))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)] or [
        slice(0, 0)]
