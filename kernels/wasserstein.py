"""Dispatch of the packed Wasserstein loss: the fused Triton kernel (``wasserstein_triton``) or
the PyTorch reference (``wasserstein_ref``). Importing this module does not import Triton: the
kernel module is imported on the first call that runs it, so the PyTorch path serves where
Triton is not installed.

Inputs of ``wasserstein_columns``:
    x  (n, D)  the source, layers packed on dim 1 (any strides)
    g, v (n, D) float32: the target profile's mean and variance per rank
    w  (D,)    float32: per-column weight (the reduction)
Output: col_loss (D,) float32, col_loss[j] = w[j] Σ_i ((sort x)[i,j] − g[i,j])² + v[i,j].
"""
from __future__ import annotations

import torch

from ._backend import next_pow2
from .wasserstein_ref import wasserstein_columns_ref

MAX_N = 2048          # largest source set one program sorts; above it the PyTorch path runs
_TILE = 4096          # elements per program (N_PAD × BLOCK_D)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def launch_config(n: int) -> dict:
    """Block sizes the host wrapper picks for n source samples (n ≤ MAX_N)."""
    n_pad = max(16, next_pow2(n))
    block_d = max(1, min(64, _TILE // n_pad))
    return {"N_PAD": n_pad, "BLOCK_D": block_d, "num_warps": 4 if n_pad * block_d <= 2048 else 8}


def wasserstein_columns(x: torch.Tensor, g: torch.Tensor, v: torch.Tensor, w: torch.Tensor,
                        use_kernel: bool) -> torch.Tensor:
    """Per-column loss (D,) float32 for packed x (n, D): the kernel when ``use_kernel`` and
    n ≤ MAX_N and the dtype is one it reads, else the PyTorch reference."""
    if use_kernel and x.shape[0] <= MAX_N and x.dtype in KERNEL_DTYPES:
        from .wasserstein_triton import WassersteinColumns
        return WassersteinColumns.apply(x, g.contiguous(), v.contiguous(), w.contiguous())
    return wasserstein_columns_ref(x, g, v, w)

