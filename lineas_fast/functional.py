"""Public steering map: ``affine_steer`` (SPEC §3)."""
from __future__ import annotations

from typing import Union

import torch

from .kernels._backend import check_same_device, use_triton
from .kernels.affine_steer import AffineSteerFn
from .kernels.affine_steer_ref import affine_steer_ref

Strength = Union[float, int, torch.Tensor]


def map_coefficients(omega: torch.Tensor, bias: torch.Tensor, inverse: bool = False):
    """(u, b') with steer(z) = z + λ(u⊙z + b'): u = ω − 1, b' = b for T; u = 1/ω − 1,
    b' = −b/ω for T⁻¹. Float32 (float64 for float64 parameters), differentiable in ω and b."""
    acc = torch.float64 if omega.dtype == torch.float64 else torch.float32
    omega, bias = omega.to(acc), bias.to(acc)
    if inverse:
        if bool((omega == 0).any()):
            zeros = torch.nonzero(omega == 0).flatten()[:8].tolist()
            raise ValueError(f"inverse map needs omega != 0 everywhere; omega is 0 at coordinates "
                             f"{zeros}")
        return 1.0 / omega - 1.0, -bias / omega
    return omega - 1.0, bias


def token_strength(strength: torch.Tensor, z_shape: torch.Size, channel_dim: int) -> torch.Tensor:
    """Shape a strength tensor like z with size 1 at ``channel_dim``.

    Accepted: a 0-d tensor; a tensor of z's rank with size 1 at the channel axis; or a tensor
    over z's leading token axes (left-aligned, e.g. (B,) or (B, T) for z (B, T, d); (B,) or
    (B, H, W) for z (B, C, H, W)), each axis of size 1 or equal to z's.
    """
    tok_shape = list(z_shape[:channel_dim]) + list(z_shape[channel_dim + 1:])
    s = strength
    if s.ndim == len(z_shape):
        if s.shape[channel_dim] != 1:
            raise ValueError(f"strength of shape {tuple(s.shape)} must have size 1 at channel_dim "
                             f"{channel_dim} for z of shape {tuple(z_shape)}")
        s = s.squeeze(channel_dim)
    elif s.ndim > len(tok_shape):
        raise ValueError(f"strength of shape {tuple(s.shape)} has too many axes for z of shape "
                         f"{tuple(z_shape)} (token axes {tuple(tok_shape)})")
    for i, k in enumerate(s.shape):
        if k not in (1, tok_shape[i]):
            raise ValueError(f"strength of shape {tuple(strength.shape)} does not broadcast over "
                             f"z's token axes {tuple(tok_shape)} (axis {i}: {k} vs {tok_shape[i]})")
    s = s.reshape(tuple(s.shape) + (1,) * (len(tok_shape) - s.ndim)).expand(tok_shape)
    return s.unsqueeze(channel_dim)


def affine_steer(z: torch.Tensor, omega: torch.Tensor, bias: torch.Tensor,
                 strength: Strength = 1.0, inverse: bool = False, channel_dim: int = -1,
                 *, backend: str | None = None) -> torch.Tensor:
    """Apply T(z) = ω⊙z + b with strength λ: z + λ(T(z) − z), or with T⁻¹ when ``inverse``.

    Args:
        z: activations (..., d) (``channel_dim=-1``) or channel-first maps such as (B, C, H, W)
            (``channel_dim=1``); float32, bfloat16 or float16.
        omega, bias: (d,) map parameters, kept in float32 whatever z's dtype.
        strength: a float, or a tensor of per-token strengths (see ``token_strength``);
            a tensor strength gets its gradient.
        inverse: apply T⁻¹(z) = (z − b)/ω (ω must have no zeros).
    Returns:
        y of z's shape and dtype. Gradients flow to z, omega, bias and a tensor strength.
    """
    if not isinstance(z, torch.Tensor) or not z.is_floating_point():
        raise TypeError(f"z must be a floating-point tensor, got "
                        f"{getattr(z, 'dtype', type(z).__name__)}")
    if z.ndim == 0:
        raise ValueError("z must have at least one axis (the coordinates)")
    cd = channel_dim % z.ndim if -z.ndim <= channel_dim < z.ndim else None
    if cd is None:
        raise ValueError(f"channel_dim {channel_dim} out of range for z of shape {tuple(z.shape)}")
    d = z.shape[cd]
    for name, p in (("omega", omega), ("bias", bias)):
        if not isinstance(p, torch.Tensor) or p.shape != (d,):
            raise ValueError(f"{name} must have shape ({d},) to match z's axis {channel_dim} of "
                             f"z.shape {tuple(z.shape)}, got "
                             f"{tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__}")
    tensors = dict(z=z, omega=omega, bias=bias)
    if isinstance(strength, torch.Tensor):
        tensors["strength"] = strength
    device = check_same_device(**tensors)
    u, b = map_coefficients(omega, bias, inverse)
    lam = token_strength(strength, z.shape, cd) if isinstance(strength, torch.Tensor) else float(strength)
    if use_triton(device, backend) and z.dtype in (torch.float32, torch.bfloat16, torch.float16):
        if isinstance(lam, torch.Tensor):
            lam_flat = lam.squeeze(cd).to(torch.float32).contiguous().reshape(-1)
            return AffineSteerFn.apply(z, u.float().contiguous(), b.float().contiguous(), lam_flat, 0.0, cd)
        return AffineSteerFn.apply(z, u.float().contiguous(), b.float().contiguous(), None, lam, cd)
    return affine_steer_ref(z, u, b, lam, cd)
