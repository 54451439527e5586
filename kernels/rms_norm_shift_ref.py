"""PyTorch reference of RMSNorm with a steering shift in its epilogue.

    y = scale ⊙ x̂ + c,   x̂ = x / sqrt(mean(x²) + eps)
with scale = w (Llama-style: x̂ cast to x's dtype before the product, as transformers does)
or 1 + w (Gemma-style, product in float32). x (..., d) any float dtype; w, c (d,).
Returns x's dtype. Differentiable by autograd.
"""

from __future__ import annotations

import torch

# The kernel's limit (``rms_norm_shift.py``, which re-exports it), kept here so a dispatcher can
# read it without importing Triton: above it the PyTorch path runs (wider rows spill registers).
MAX_D = 16384


def rms_norm_shift_ref(
    x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor, eps: float, gemma: bool
) -> torch.Tensor:
    xf = x.float()
    xhat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        y = xhat * (1.0 + weight.float())
    else:
        y = weight.float() * xhat.to(x.dtype).float()
    return (y + shift.float()).to(x.dtype)
