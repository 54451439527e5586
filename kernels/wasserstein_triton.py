"""Fused Wasserstein loss kernel: sort every coordinate of the packed source, compare with the
target profile, and emit the loss and its gradient in one launch for all layers.

Inputs (``wasserstein_columns_triton``; the dispatcher is ``kernels.wasserstein``):
    x  (n, D)  float32 / bfloat16 / float16, any strides: the source, layers packed on dim 1
    g  (n, D)  float32 contiguous: target profile mean per rank (kernels.wasserstein_ref)
    v  (n, D)  float32 contiguous: target profile variance per rank
    w  (D,)    float32: per-column weight (the reduction)
Output: col_loss (D,) float32, col_loss[j] = w[j] Σ_i ((sort x)[i,j] − g[i,j])² + v[i,j].
The gradient 2·w[j]·(x[k,j] − g[rank(k),j]) is written during the forward (training always
backpropagates); the backward only scales it by the incoming per-column gradient.

Sorting carries the original row with each value: a float32 is mapped to an order-preserving
int32 and packed with its row index into one int64 key, so one ``tl.sort`` gives both the
sorted values and the permutation. Padding rows get the largest key and sort last.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .wasserstein import MAX_N, launch_config

__all__ = ["MAX_N", "launch_config", "wasserstein_columns_triton", "WassersteinColumns"]


@triton.jit
def _wasserstein_fwd_kernel(x_ptr, stride_xn, stride_xd, g_ptr, v_ptr, w_ptr, loss_ptr, grad_ptr,
                            n, D, N_PAD: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    cols = pid * BLOCK_D + tl.arange(0, BLOCK_D)                     # (BLOCK_D,)
    rows = tl.arange(0, N_PAD)                                       # (N_PAD,)
    cmask = cols < D
    mask = cmask[:, None] & (rows[None, :] < n)                      # (BLOCK_D, N_PAD)
    x_off = rows[None, :].to(tl.int64) * stride_xn + cols[:, None].to(tl.int64) * stride_xd
    x = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
    x = tl.where(x == 0.0, 0.0, x)                                   # -0.0 ties with +0.0
    bits = x.to(tl.int32, bitcast=True)
    okey = bits ^ ((bits >> 31) & 0x7FFFFFFF)                        # order-preserving int32
    key = (okey.to(tl.int64) << 32) | rows[None, :].to(tl.int64)
    key = tl.where(mask, key, 0x7FFFFFFFFFFFFFFF)
    key = tl.sort(key, dim=1)
    skey = (key >> 32).to(tl.int32)
    xs = (skey ^ ((skey >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
    src_row = key.to(tl.int32)                                       # low 32 bits: original row
    p_off = rows[None, :].to(tl.int64) * D + cols[:, None]
    g = tl.load(g_ptr + p_off, mask=mask, other=0.0)
    v = tl.load(v_ptr + p_off, mask=mask, other=0.0)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0)
    diff = xs - g
    err = tl.where(mask, diff * diff + v, 0.0)
    tl.store(loss_ptr + cols, tl.sum(err, axis=1) * w, mask=cmask)
    grad = (2.0 * w[:, None]) * diff
    g_out = src_row.to(tl.int64) * D + cols[:, None]
    tl.store(grad_ptr + g_out, grad.to(grad_ptr.dtype.element_ty), mask=mask)


def wasserstein_columns_triton(x: torch.Tensor, g: torch.Tensor, v: torch.Tensor,
                               w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel. Returns (col_loss (D,) float32, grad (n, D) in x.dtype)."""
    n, D = x.shape
    cfg = launch_config(n)
    loss = torch.empty(D, device=x.device, dtype=torch.float32)
    grad = torch.empty((n, D), device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(D, cfg["BLOCK_D"]),)
    _wasserstein_fwd_kernel[grid](x, x.stride(0), x.stride(1), g, v, w, loss, grad, n, D,
                                  N_PAD=cfg["N_PAD"], BLOCK_D=cfg["BLOCK_D"],
                                  num_warps=cfg["num_warps"])
    return loss, grad


class WassersteinColumns(torch.autograd.Function):
    """col_loss = F(x) with the gradient computed in the forward kernel."""

    @staticmethod
    def forward(ctx, x, g, v, w):
        loss, grad = wasserstein_columns_triton(x, g, v, w)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss[None, :]).to(grad.dtype), None, None, None
