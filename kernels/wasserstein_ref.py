"""Plain-PyTorch reference of the packed Wasserstein loss, and the target profile.

Notation (SPEC §2): source X (n, D) packed over layers, target profile (ḡ, v̄) (n, D) where
ḡ[i, j] is the mean of the target quantile function over source cell i and
v̄[i, j] = q̄[i, j] − ḡ[i, j]² ≥ 0 its variance over that cell (0 when n = m).

    Σ_i ((sort(X)[i, j] − ḡ[i, j])² + v̄[i, j]) = n · W2²_j

exactly, for any n and m; v̄ only adds a constant per layer (``var_sum``), never read per step.
"""

from __future__ import annotations

import torch


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
    """The PyTorch reference of the loss kernel, the same math (``kernels.wasserstein``):
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
