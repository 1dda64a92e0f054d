"""Weight-only int8 quantization for decoding: a quarter of fp32's bytes per weight (half of bf16's).

Generating one token at batch 1 multiplies one vector by every weight matrix of the model, so a decode
step is bound by reading the weights from memory, not by arithmetic. Storing each matrix as int8 with one
scale per output row,

    W ≈ s ⊙ Q,   Q = round(W / s) ∈ [-127, 127],   s_i = max_j |W_ij| / 127,

reads 1 byte a weight instead of 2 or 4; activations stay in bf16 or fp32 and `x Wᵀ` becomes
`(x Qᵀ) ⊙ s`, which PyTorch's CPU kernel `_weight_int8pack_mm` computes without expanding Q. The error of
each weight is at most s_i / 2 (a 0.4% relative error for a row's largest weight); the test and
BENCHMARKS.md report how often greedy decoding still picks the same tokens. For inference only.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from chatforge.errors import ChatforgeError
from chatforge.model.transformer import Transformer


class Int8Linear(nn.Module):
    """A Linear layer with int8 weights and one scale per output row (the module docstring)."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        super().__init__()
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        self.register_buffer("weight_int8", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(dtype))
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(self.scale.dtype)
        if flat.device.type == "cpu":
            y = torch._weight_int8pack_mm(flat, self.weight_int8, self.scale)
        else:  # other devices: dequantize (correct, not faster)
            y = F.linear(flat, self.weight_int8.to(flat.dtype)) * self.scale
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def quantize_int8(model: Transformer, dtype: torch.dtype = torch.bfloat16) -> Transformer:
    """A copy of `model` for inference: every Linear of the blocks and the output layer in int8 (a tied
    output layer gets its own int8 copy; the embedding lookup stays in `dtype`), the rest in `dtype`. An MoE
    router stays in `dtype`: it is small, and rounding it would change which experts a token goes to."""
    quantized = copy.deepcopy(model).to(dtype).eval()
    for module in list(quantized.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and name != "router":
                setattr(module, name, Int8Linear(child, dtype))
    return quantized


DTYPES = ("fp32", "bf16", "int8")


def for_inference(model: Transformer, dtype: str = "fp32") -> Transformer:
    """The model as `--dtype` asks: fp32 (exact), bf16 (half the bytes a decode step reads) or int8
    (weight-only int8 with bf16 activations: a quarter of fp32's bytes)."""
    if dtype not in DTYPES:
        raise ChatforgeError(f"--dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    if dtype == "int8":
        return quantize_int8(model)
    return model.to(torch.bfloat16 if dtype == "bf16" else torch.float32).eval()
