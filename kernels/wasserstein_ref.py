"""Plain-PyTorch reference of the packed Wasserstein loss, and the target profile.

Notation (SPEC §2): source X (n, D) packed over layers, target profile (ḡ, v̄) (n, D) where
ḡ[i, j] is the mean of the target quantile function over source cell i and
v̄[i, j] = q̄[i, j] − ḡ[i, j]² ≥ 0 its variance over that cell (0 when n = m).

    Σ_i ((sort(X)[i, j] − ḡ[i, j])² + v̄[i, j]) = n · W2²_j

exactly, for any n and m; v̄ only adds a constant per layer (``var_sum``), never read per step.
"""

from __future__ import annotations

import functools

import torch

from ._backend import next_pow2

# Launch facts of the loss kernel (kernels/wasserstein.py), readable without Triton: the library
# decides from them which path runs.
MAX_N = 2048  # largest source set one program sorts; above it the PyTorch path runs
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TABLE_COLS = 6  # x offset, row stride, column stride, d, profile column, grad offset


def launch_config(n: int) -> dict:
    """Block sizes for n source samples (n ≤ MAX_N): one warp per program and about 32 keys
    per thread, so each column's sort stays within one warp (in registers, or across lanes by
    shuffles: no barrier); at the paper's n = 32, 32 columns of 32 ranks, one column per lane.
    n > 1024 needs two warps (one warp would spill)."""
    n_pad = max(16, next_pow2(n))
    if n_pad <= 1024:
        return {"N_PAD": n_pad, "BLOCK_D": min(64, 1024 // n_pad), "num_warps": 1}
    return {"N_PAD": n_pad, "BLOCK_D": 1, "num_warps": 2 * n_pad // 2048}


@functools.lru_cache(maxsize=64)
def layer_weights(dims: tuple, n: int, reduction: str, device: torch.device) -> tuple:
    """(weight (L,) float32 on device, total_scale): per_layer[l] = w_l · Σ_ij err_l is each
    layer's loss in the scale of a single-layer call; the total is total_scale · Σ_l per_layer.
    reference: w_l = 1/d_l (n·mean_j W2²_j), total = the mean over layers; sum: w_l = 1/n,
    total = the sum. Built once per (dims, n, reduction, device)."""
    if reduction == "reference":
        w, scale = [1.0 / d for d in dims], 1.0 / len(dims)
    else:
        w, scale = [1.0 / n] * len(dims), 1.0
    return torch.tensor(w, dtype=torch.float32).to(device), scale


def kernel_runs(xs: list) -> bool:
    """Whether the kernel can take these layers (else the PyTorch reference runs)."""
    return (
        xs[0].shape[0] <= MAX_N and xs[0].dtype in KERNEL_DTYPES and all(x.dtype == xs[0].dtype for x in xs)
    )


def target_profile(y: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-rank target profile of ``y`` (m, d) for ``n`` source samples.

    Returns (g, v): two (n, d) float32 tensors on y's device, computed in float64.
    Source cell i is [i/n, (i+1)/n); target cell k is [k/m, (k+1)/m). With integer
    coordinates p ∈ [0, n·m] (source cell i = [i·m, (i+1)·m), target cell k = [k·n, (k+1)·n)),
    the cumulative integral of the target quantile function is exact at every cell edge.
    """
    m, d = y.shape
    ys = torch.sort(y.detach().to(torch.float64), dim=0).values  # (m, d)
    zero = ys.new_zeros(1, d)
    edges = torch.arange(n + 1, device=y.device, dtype=torch.int64) * m  # source cell edges
    k, r = edges // n, edges % n  # target cell, offset

    def cumulative(values: torch.Tensor) -> torch.Tensor:
        # ∫ over [0, p) of the step function, in units of 1/(n·m) per unit of p times n
        cums = torch.cat([zero, torch.cumsum(values, 0)]) * n  # (m + 1, d)
        vpad = torch.cat([values, zero])
        return cums[k] + r.to(torch.float64)[:, None] * vpad[k]  # (n + 1, d)

    cg, cq = cumulative(ys), cumulative(ys * ys)
    g = (cg[1:] - cg[:-1]) / m
    q = (cq[1:] - cq[:-1]) / m
    v = (q - g * g).clamp_min(0.0)
    return g.to(torch.float32), v.to(torch.float32)


def wasserstein_loss_ref(
    xs: list,
    mean: torch.Tensor,
    var_sum: torch.Tensor,
    weight: torch.Tensor,
    total_scale: float,
    need_grad: bool,
):
    """The PyTorch reference of the loss kernel, the same math (``kernels/wasserstein.py``):
    one stable ``torch.sort`` per layer, in float32 (float64 when a layer is float64).

    Args: xs L tensors (n, d_l) any strides; mean (n, Σd_l) ḡ packed; var_sum (L,) Σ of each
    layer's v̄; weight (L,) w_l; the total is total_scale · Σ_l per_layer[l].
    Returns (loss (), per_layer (L,), grad (n·Σd_l,)): per_layer[l] = w_l (Σ_ij (sort x_l −
    ḡ_l)² + var_sum_l); grad holds ∂loss/∂x_l = 2·total_scale·w_l·(x_l − ḡ_l[rank]) per layer,
    (n, d_l) contiguous one after another (empty when not need_grad). Not differentiable by
    autograd: the gradient is this explicit output.
    """
    acc = torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32
    n = xs[0].shape[0]
    dims = [x.shape[1] for x in xs]
    grad = mean.new_empty(n * sum(dims) if need_grad else 0, dtype=acc)
    gw = (weight.to(acc) * (2.0 * total_scale)) if need_grad else None
    parts, col = [], 0
    for i, (x, d) in enumerate(zip(xs, dims)):
        values, rows = torch.sort(x.detach().to(acc), dim=0, stable=True)
        diff = values - mean[:, col : col + d].to(acc)
        parts.append((diff * diff).sum())
        if need_grad:
            grad[n * col : n * (col + d)].view(n, d).scatter_(0, rows, diff * gw[i])
        col += d
    per_layer = torch.stack(parts).add_(var_sum.to(acc)).mul_(weight.to(acc))
    return per_layer.sum() * total_scale, per_layer, grad


def wasserstein_columns_naive(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The published-code form for n = m, computed in x's own dtype (no upcast): the
    baseline whose error a kernel's low-precision error is compared against."""
    xs = torch.sort(x, dim=0).values
    ys = torch.sort(y.to(x.dtype), dim=0).values
    return ((xs - ys) ** 2).sum(0) * w.to(x.dtype)
