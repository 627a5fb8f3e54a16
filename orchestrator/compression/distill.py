"""Knowledge distillation loss (Hinton et al., 2015).

    loss = alpha * CE(student, targets) + (1 - alpha) * T^2 * KL(p_teacher^T || p_student^T)

where p^T = softmax(logits / T). Softening with T > 1 exposes the teacher's ranking of wrong
tokens (the "dark knowledge"); the T^2 factor keeps the KL gradient's size independent of T,
so alpha means the same thing at any temperature.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

# The smallest temperature the fp32 loss computes: T^2 a normal fp32 number (below, the T^2
# factor underflows, to 0 under ~2.6e-23: the KL term silently drops out), and logits / T
# finite for any logit under 3.7e19 (under ~1e-38, logits of a few units overflow to inf:
# every loss NaN). About 1.08e-19.
MIN_TEMPERATURE = math.sqrt(torch.finfo(torch.float32).tiny)


class DistillLoss(NamedTuple):
    """The distillation loss of one batch: the total that is optimised and its two parts
    (cross-entropy and the temperature-scaled KL term), kept apart for logging."""

    total: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor  # already multiplied by T^2; 0 without a teacher


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                      targets: torch.Tensor, alpha: float, temperature: float) -> DistillLoss:
    """Mean per token. `teacher_logits=None` (no teacher) gives plain cross-entropy."""
    vocab = student_logits.size(-1)
    student = student_logits.float().reshape(-1, vocab)  # fp32 log-softmax, as in the model
    ce = F.cross_entropy(student, targets.reshape(-1))
    if teacher_logits is None:
        return DistillLoss(ce, ce, torch.zeros_like(ce))
    teacher = teacher_logits.detach().float().reshape(-1, vocab)
    # batchmean over (tokens, vocab) rows = mean KL per token, the quantity the math defines.
    kd = F.kl_div(F.log_softmax(student / temperature, dim=-1),
                  F.log_softmax(teacher / temperature, dim=-1),
                  reduction="batchmean", log_target=True) * temperature ** 2
    return DistillLoss(alpha * ce + (1 - alpha) * kd, ce, kd)
