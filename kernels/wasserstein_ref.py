"""Plain-PyTorch reference of the packed Wasserstein loss, and the target profile.

Notation (SPEC §2): source X (n, D) packed over layers, target profile (ḡ, v̄) (n, D) where
ḡ[i, j] is the mean of the target quantile function over source cell i and
v̄[i, j] = q̄[i, j] − ḡ[i, j]² ≥ 0 its variance over that cell (0 when n = m).

    col_loss[j] = w[j] · Σ_i ((sort(X)[i, j] − ḡ[i, j])² + v̄[i, j])

which equals w[j] · n · W2²_j exactly, for any n and m.
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
    ys = torch.sort(y.detach().to(torch.float64), dim=0).values                      # (m, d)
    zero = ys.new_zeros(1, d)
    edges = torch.arange(n + 1, device=y.device, dtype=torch.int64) * m              # source cell edges
    k, r = edges // n, edges % n                                                     # target cell, offset

    def cumulative(values: torch.Tensor) -> torch.Tensor:
        # ∫ over [0, p) of the step function, in units of 1/(n·m) per unit of p times n
        cums = torch.cat([zero, torch.cumsum(values, 0)]) * n                        # (m + 1, d)
        vpad = torch.cat([values, zero])
        return cums[k] + r.to(torch.float64)[:, None] * vpad[k]                      # (n + 1, d)

    cg, cq = cumulative(ys), cumulative(ys * ys)
    g = (cg[1:] - cg[:-1]) / m
    q = (cq[1:] - cq[:-1]) / m
    v = (q - g * g).clamp_min(0.0)
    return g.to(torch.float32), v.to(torch.float32)


def wasserstein_columns_ref(x: torch.Tensor, g: torch.Tensor, v: torch.Tensor,
                            w: torch.Tensor) -> torch.Tensor:
    """Per-column weighted loss (D,) float32 for x (n, D); differentiable in x by autograd.

    x may be any float dtype (computed in float32, or float64 when x is float64).
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xs = torch.sort(x.to(acc), dim=0, stable=True).values
    diff = xs - g.to(acc)
    return ((diff * diff + v.to(acc)).sum(0) * w.to(acc)).to(acc)


def wasserstein_columns_naive(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The published-code form for n = m, computed in x's own dtype (no upcast): the
    baseline whose error a kernel's low-precision error is compared against."""
    xs = torch.sort(x, dim=0).values
    ys = torch.sort(y.to(x.dtype), dim=0).values
    return ((xs - ys) ** 2).sum(0) * w.to(x.dtype)
