"""INT8 quantization-aware training in plain torch.

Weights: symmetric int8 per output channel (scale = max|w_row| / qmax, zero point 0), with
qmax = 63 by default ("7-bit" values in int8 storage; see WEIGHT_QMAX for why).
Activations: asymmetric uint8 per tensor, computed from each tensor's own min/max at run time
(dynamic quantization). That is exactly ONNX's `DynamicQuantizeLinear`, which the exported
graph runs in ONNX Runtime before every int8 `MatMulInteger`; so the fake-quantized model here
is the numerical twin of the deployed int8 model, not an approximation of it.

Why plain torch rather than torchao's QATConfig or torch.ao.quantization: torch.ao is
deprecated; torchao is another dependency whose QAT numerics (int8 dynamic activations are
symmetric per token there) would not match the runtime we export to by measurement (ONNX
Runtime). Twenty lines of rounding with a straight-through estimator run unchanged on CPU and
GPU in any torch version.

The straight-through estimator: forward uses the quantized value, backward treats rounding
as the identity (`x + (q(x) - x).detach()`). Scales are detached: they follow the weights and
activations rather than being learned.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# Symmetric weights in [-qmax, qmax] (so -w quantizes to exactly -q). Default 63, not 127:
# on x86 CPUs without VNNI (this project's AVX2 machines) ONNX Runtime's u8 x s8 kernel adds
# pairs of products in int16 (vpmaddubsw), which saturates once 2 * 255 * |w| > 32767. Measured
# on a 256x128 layer with 127-range weights: 45 of 8192 int32 accumulators wrong, by up to
# 5406; with 63-range weights: none. VNNI CPUs (and ARM) accumulate in int32 and can use 127
# (CompressConfig.weight_bits = 8).
WEIGHT_QMAX = 63
ACT_QMIN, ACT_QMAX = 0, 255  # uint8, as DynamicQuantizeLinear produces


def qmax_for_bits(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def weight_scales(weight: torch.Tensor, qmax: int = WEIGHT_QMAX) -> torch.Tensor:
    """Per-output-channel scale of a (out, in) weight. An all-zero row (fully pruned) gets
    scale 1 so its int8 values are exactly 0 rather than 0/0; so does a row whose scale
    underflows to 0 (max|w| under qmax x the dtype's smallest subnormal: ~9e-44 in fp32,
    ~4e-6 in fp16), which would divide by 0 (inf, NaN) and is below int8's resolution."""
    scales = weight.detach().abs().amax(dim=1) / qmax
    return torch.where(scales > 0, scales, torch.ones_like(scales))


def quantize_weight(weight: torch.Tensor, qmax: int = WEIGHT_QMAX
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, float32 per-row scales) with weight ~= int8 * scale[:, None]."""
    scales = weight_scales(weight, qmax).float()
    q = torch.clamp(torch.round(weight.detach().float() / scales[:, None]), -qmax, qmax)
    return q.to(torch.int8), scales


def fake_quant_weight(weight: torch.Tensor, qmax: int = WEIGHT_QMAX) -> torch.Tensor:
    scales = weight_scales(weight, qmax)[:, None]
    q = torch.clamp(torch.round(weight / scales), -qmax, qmax) * scales
    return weight + (q - weight).detach()


def activation_qparams(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of ONNX DynamicQuantizeLinear: the range is widened to include 0
    (so 0 is exact: padding and ReLU-like zeros stay zero), zero point rounded half to even."""
    x = x.detach()
    rmin = torch.clamp(x.min(), max=0.0)
    rmax = torch.clamp(x.max(), min=0.0)
    scale = (rmax - rmin) / (ACT_QMAX - ACT_QMIN)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero_point = torch.clamp(torch.round(ACT_QMIN - rmin / scale), ACT_QMIN, ACT_QMAX)
    return scale, zero_point


def fake_quant_activation(x: torch.Tensor) -> torch.Tensor:
    scale, zero_point = activation_qparams(x)
    q = torch.clamp(torch.round(x / scale) + zero_point, ACT_QMIN, ACT_QMAX)
    return x + ((q - zero_point) * scale - x).detach()


class FakeQuantLinear(nn.Module):
    """A Linear whose forward sees int8-rounded weights and uint8-rounded inputs.

    It holds the original Linear's Parameter objects, so the optimizer, pruning masks and the
    state dict keys (`...weight`, `...bias`) are unchanged by preparing for QAT."""

    def __init__(self, linear: nn.Linear, qmax: int = WEIGHT_QMAX) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.qmax = qmax
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(fake_quant_activation(x), fake_quant_weight(self.weight, self.qmax),
                        self.bias)


class Int8Linear(nn.Module):
    """A Linear stored as int8 weights plus per-channel scales (the torch runtime of the
    exported artifact). Activations are quantized exactly as in QAT and ONNX Runtime; the
    matmul itself runs in float on dequantized weights, because torch 2.13 has no maintained
    fast int8 CPU kernel (fbgemm's dynamic Linear measured 1.15-1.2x; it is deprecated). The
    int8 speed-up comes from the ONNX Runtime artifact; this module keeps memory at int8 and
    works on any device."""

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        if weight_int8.dtype != torch.int8:
            raise TypeError(f"Int8Linear needs int8 weights, got {weight_int8.dtype}")
        self.out_features, self.in_features = weight_int8.shape
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("weight_scale", scales.float())
        self.register_buffer("bias", None if bias is None else bias.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Scale the (tokens, out) result rather than the (out, in) weight: one multiply per
        # output instead of per weight, and the int8 -> float cast is the only weight-sized op.
        y = F.linear(fake_quant_activation(x), self.weight_int8.to(x.dtype))
        y = y * self.weight_scale.to(x.dtype)
        return y if self.bias is None else y + self.bias


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def prepare_qat(model: nn.Module, names: list[str], qmax: int = WEIGHT_QMAX) -> nn.Module:
    """Swap the named Linears for FakeQuantLinears, in place (idempotent)."""
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, nn.Linear):
            _set_submodule(model, name, FakeQuantLinear(module, qmax))
        elif not isinstance(module, FakeQuantLinear):
            raise TypeError(f"{name} is a {type(module).__name__}, not a Linear to quantize")
    return model


def to_int8(model: nn.Module, names: list[str], qmax: int = WEIGHT_QMAX) -> nn.Module:
    """Swap the named (FakeQuant)Linears for Int8Linears holding their quantized weights."""
    for name in names:
        module = model.get_submodule(name)
        q, scales = quantize_weight(module.weight, qmax)
        bias = None if module.bias is None else module.bias.detach().clone()
        _set_submodule(model, name, Int8Linear(q, scales, bias))
    return model
