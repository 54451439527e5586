"""PyTorch reference of DSAS gated steering (SPEC §5).

    logit_t = w · z_t + c,  g_t = σ(logit_t) ("sigmoid") or clamp(logit_t, 0, 1) ("relu")
    y_t = z_t + λ g_t (u ⊙ z_t + b)                       (u = ω − 1, or the inverse map's)

z (..., d) channel-last, any float dtype; u, b, w (d,), c () float32; λ a float. Computed in
float32 (float64 for float64 z). Returns (y in z's dtype, per-token strength λ·g (...,) float32).
Autograd gives every gradient (z, u, b, w, c).
"""

from __future__ import annotations

import torch

GATES = ("sigmoid", "relu")


def gate_fn(logit: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "sigmoid":
        return torch.sigmoid(logit)
    if kind == "relu":
        return logit.clamp(0.0, 1.0)
    raise ValueError(f"gate must be one of {GATES}, got {kind!r}")


def gated_steer_ref(z, u, b, w, c, strength: float, kind: str):
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    zf = z.to(acc)
    logit = zf @ w.to(acc) + c.to(acc)
    lam = strength * gate_fn(logit, kind)
    y = zf + lam.unsqueeze(-1) * (u.to(acc) * zf + b.to(acc))
    return y.to(z.dtype), lam.float()
