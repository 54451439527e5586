"""Plain-PyTorch reference of the steering map with strength.

    y = z + λ ⊙ (u ⊙ z + b),     u = ω − 1 (or 1/ω − 1 and b = −b/ω for the inverse map)

Shapes: z (..., D, ...) with the coordinate axis at ``channel_dim``; u, b (D,) float32;
λ a Python float or a float tensor already shaped like z with size 1 at ``channel_dim``.
Computed in float32 (float64 for float64 z) and returned in z's dtype; autograd gives
every gradient (z, u, b and a tensor λ).
"""

from __future__ import annotations

import torch


def affine_steer_ref(
    z: torch.Tensor, u: torch.Tensor, b: torch.Tensor, strength: float | torch.Tensor, channel_dim: int
) -> torch.Tensor:
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    shape = [1] * z.ndim
    shape[channel_dim] = z.shape[channel_dim]
    zf = z.to(acc)
    lam = strength.to(acc) if isinstance(strength, torch.Tensor) else strength
    y = zf + lam * (u.to(acc).view(shape) * zf + b.to(acc).view(shape))
    return y.to(z.dtype)
