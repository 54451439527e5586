"""Fused RMSNorm with the steering shift applied in the epilogue (inference).

One program normalizes one row: it reads x once, writes y once, so a steered norm costs what
the plain norm costs. x (rows, d) float32/bfloat16/float16 contiguous; w, c (d,) float32.
Training through it uses the PyTorch reference (``rms_norm_shift_ref``), which autograd
differentiates; the kernel runs when no gradient is needed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import next_pow2
from .rms_norm_shift_ref import MAX_D as MAX_D  # re-exported: above it the PyTorch path runs


@triton.jit
def _rms_norm_shift_fwd_kernel(
    x_ptr, w_ptr, c_ptr, y_ptr, d, eps, GEMMA: tl.constexpr, BLOCK_D: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < d
    x_in = tl.load(x_ptr + row * d + cols, mask=mask, other=0.0)
    x = x_in.to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    c = tl.load(c_ptr + cols, mask=mask, other=0.0)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / d + eps)
    xhat = x * inv
    if GEMMA:
        y = xhat * (1.0 + w)
    else:
        y = w * xhat.to(x_in.dtype).to(tl.float32)
    tl.store(y_ptr + row * d + cols, (y + c).to(y_ptr.dtype.element_ty), mask=mask)


def launch_config(d: int) -> dict:
    block = max(16, next_pow2(d))
    return {"BLOCK_D": block, "num_warps": 4 if block <= 2048 else 8 if block <= 8192 else 16}


def rms_norm_shift_triton(
    x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor, eps: float, gemma: bool
) -> torch.Tensor:
    d = x.shape[-1]
    x2 = x.reshape(-1, d).contiguous()
    y = torch.empty_like(x2)
    cfg = launch_config(d)
    if x2.shape[0] > 0:
        _rms_norm_shift_fwd_kernel[(x2.shape[0],)](
            x2,
            weight,
            shift,
            y,
            d,
            float(eps),
            GEMMA=gemma,
            BLOCK_D=cfg["BLOCK_D"],
            num_warps=cfg["num_warps"],
        )
    return y.view(x.shape)
