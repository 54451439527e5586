"""Public steering maps: ``affine_steer`` (SPEC §3) and ``gated_steer`` (SPEC §5).

Each validates its inputs, computes the map's coefficients (``map_coefficients``) and calls the
low-level entry point, ``apply_affine`` / ``apply_gated``: no checks and no host
synchronisation, for callers (the steering hooks) that prepared the coefficients once. The
Triton kernel modules are imported on the first call that runs them, so this module imports
where Triton is not installed.
"""

from __future__ import annotations

import functools
from typing import Union

import torch

from lineas_fast.checks import number
from lineas_fast.kernels._backend import check_same_device, use_triton
from lineas_fast.kernels.gated_steer_ref import GATES
from lineas_fast.kernels.ops import affine_steer_op, gated_steer_op

Strength = Union[float, int, torch.Tensor]
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=None)
def _gated_max_d() -> int:
    from lineas_fast.kernels.gated_steer import MAX_D  # imports Triton: only on the kernel path

    return MAX_D


def check_param_shapes(d: int, where: str, **params) -> None:
    """Each named parameter must be a (d,) tensor; the error names it and ``where`` d comes from."""
    for name, p in params.items():
        if not isinstance(p, torch.Tensor) or p.shape != (d,):
            raise ValueError(
                f"{name} must have shape ({d},) to match {where}, got "
                f"{tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__}"
            )


def map_coefficients(omega: torch.Tensor, bias: torch.Tensor, inverse: bool = False):
    """(u, b') with steer(z) = z + λ(u⊙z + b'): u = ω − 1, b' = b for T; u = 1/ω − 1,
    b' = −b/ω for T⁻¹. Float32 (float64 for float64 parameters), differentiable in ω and b."""
    acc = torch.float64 if omega.dtype == torch.float64 else torch.float32
    omega, bias = omega.to(acc), bias.to(acc)
    if inverse:
        if bool((omega == 0).any()):
            zeros = torch.nonzero(omega == 0).flatten()[:8].tolist()
            raise ValueError(f"inverse map needs omega != 0 everywhere; omega is 0 at coordinates {zeros}")
        return 1.0 / omega - 1.0, -bias / omega
    return omega - 1.0, bias


def token_strength(strength: torch.Tensor, z_shape: torch.Size, channel_dim: int) -> torch.Tensor:
    """Shape a strength tensor like z with size 1 at ``channel_dim``.

    Accepted: a 0-d tensor; a tensor of z's rank with size 1 at the channel axis; or a tensor
    over z's leading token axes (left-aligned, e.g. (B,) or (B, T) for z (B, T, d); (B,) or
    (B, H, W) for z (B, C, H, W)), each axis of size 1 or equal to z's.
    """
    tok_shape = list(z_shape[:channel_dim]) + list(z_shape[channel_dim + 1 :])
    s = strength
    if s.ndim == len(z_shape):
        if s.shape[channel_dim] != 1:
            raise ValueError(
                f"strength of shape {tuple(s.shape)} must have size 1 at channel_dim "
                f"{channel_dim} for z of shape {tuple(z_shape)}"
            )
        s = s.squeeze(channel_dim)
    elif s.ndim > len(tok_shape):
        raise ValueError(
            f"strength of shape {tuple(s.shape)} has too many axes for z of shape "
            f"{tuple(z_shape)} (token axes {tuple(tok_shape)})"
        )
    for i, k in enumerate(s.shape):
        if k not in (1, tok_shape[i]):
            raise ValueError(
                f"strength of shape {tuple(strength.shape)} does not broadcast over "
                f"z's token axes {tuple(tok_shape)} (axis {i}: {k} vs {tok_shape[i]})"
            )
    s = s.reshape(tuple(s.shape) + (1,) * (len(tok_shape) - s.ndim)).expand(tok_shape)
    return s.unsqueeze(channel_dim)


def apply_affine(
    z: torch.Tensor,
    u: torch.Tensor,
    b: torch.Tensor,
    lam: Union[float, torch.Tensor],
    channel_dim: int,
    backend: str | None = None,
) -> torch.Tensor:
    """y = z + λ(u⊙z + b) with no validation and no host synchronisation (the hooks' per-call path).

    Args:
        z: activations of any shape, the coordinates at ``channel_dim``.
        u, b: (d,) float32 coefficients on z's device (``map_coefficients``: u = ω − 1 and b, or
            u = 1/ω − 1 and −b/ω for the inverse map); contiguous for the kernel.
        lam: a Python float, or a float32 strength tensor already shaped by ``token_strength``.
        backend: as for ``affine_steer``.
    Runs the custom op ``lineas_fast::affine_steer`` (kernels/ops.py): the Triton kernel or
    the PyTorch formula, as ``affine_steer`` does.
    """
    cd = channel_dim % z.ndim
    kernel = use_triton(z.device, backend) and z.dtype in KERNEL_DTYPES
    if kernel:
        u, b = u.float().contiguous(), b.float().contiguous()
    if isinstance(lam, torch.Tensor):
        lam_flat = lam.squeeze(cd).reshape(-1)
        if kernel:
            lam_flat = lam_flat.to(torch.float32).contiguous()
        return affine_steer_op(z, u, b, lam_flat, 0.0, cd, kernel)
    return affine_steer_op(z, u, b, None, float(lam), cd, kernel)


def _channel_axis(z: torch.Tensor, channel_dim: int) -> int:
    if not -z.ndim <= channel_dim < z.ndim:
        raise ValueError(f"channel_dim {channel_dim} out of range for z of shape {tuple(z.shape)}")
    return channel_dim % z.ndim


def affine_steer(
    z: torch.Tensor,
    omega: torch.Tensor,
    bias: torch.Tensor,
    strength: Strength = 1.0,
    inverse: bool = False,
    channel_dim: int = -1,
    *,
    backend: str | None = None,
) -> torch.Tensor:
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
        raise TypeError(f"z must be a floating-point tensor, got {getattr(z, 'dtype', type(z).__name__)}")
    if z.ndim == 0:
        raise ValueError("z must have at least one axis (the coordinates)")
    cd = _channel_axis(z, channel_dim)
    d = z.shape[cd]
    check_param_shapes(d, f"z's axis {channel_dim} of z.shape {tuple(z.shape)}", omega=omega, bias=bias)
    tensors = dict(z=z, omega=omega, bias=bias)
    if isinstance(strength, torch.Tensor):
        tensors["strength"] = strength
    check_same_device(**tensors)
    u, b = map_coefficients(omega, bias, inverse)
    lam = (
        token_strength(strength, z.shape, cd)
        if isinstance(strength, torch.Tensor)
        else number(strength, "strength")
    )
    return apply_affine(z, u, b, lam, cd, backend)


def apply_gated(
    z: torch.Tensor,
    u: torch.Tensor,
    b: torch.Tensor,
    gate_w: torch.Tensor,
    gate_c: torch.Tensor,
    lam: float,
    relu: bool,
    channel_dim: int = -1,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated steering with no validation and no host synchronisation (the hooks' per-call path).

    Args:
        z: activations of any shape, the coordinates at ``channel_dim``.
        u, b: (d,) float32 map coefficients on z's device (see ``map_coefficients``).
        gate_w: (d,) float32; gate_c: a one-element float32 tensor; both on z's device.
        lam: the float strength λ; relu: the gate is clamp(w·z + c, 0, 1) (else the sigmoid).
    Returns:
        (y of z's shape and dtype, per-token strengths λ·g float32 of z's shape without the
        channel axis). A channel axis other than the last is moved last for the computation and
        back (the output is contiguous when z is).
    """
    cd = channel_dim % z.ndim
    if cd != z.ndim - 1:
        y, s = apply_gated(z.movedim(cd, -1), u, b, gate_w, gate_c, lam, relu, -1, backend)
        y = y.movedim(-1, cd)
        return (y.contiguous() if z.is_contiguous() else y), s
    d = z.shape[-1]
    kernel = use_triton(z.device, backend) and z.dtype in KERNEL_DTYPES and d <= _gated_max_d()
    if kernel:
        u, b, gate_w = u.float().contiguous(), b.float().contiguous(), gate_w.float().contiguous()
        gate_c = gate_c.float()
    y, s = gated_steer_op(
        z.reshape(-1, d).contiguous(), u, b, gate_w, gate_c.reshape(1), float(lam), bool(relu), kernel
    )
    return y.view(z.shape), s.view(z.shape[:-1])


def gated_steer(
    z: torch.Tensor,
    omega: torch.Tensor,
    bias: torch.Tensor,
    gate_w: torch.Tensor,
    gate_c: torch.Tensor,
    strength: float = 1.0,
    gate: str = "sigmoid",
    inverse: bool = False,
    return_strengths: bool = False,
    channel_dim: int = -1,
    *,
    backend: str | None = None,
):
    """DSAS (SPEC §5): steer each token with strength λ·g(z_t), g = σ(w·z_t + c) ("sigmoid") or
    clamp(w·z_t + c, 0, 1) ("relu"), the gate computed on the activation entering the map.

    Args:
        z: activations (..., d) (``channel_dim=-1``) or channel-first maps such as UNet features
            (B, C, H, W) (``channel_dim=1``: a token is one pixel, its gate computed on its
            C-vector); float32/bfloat16/float16.
        omega, bias, gate_w: (d,) float32; gate_c: a 0-d or (1,) float32 tensor.
        strength: the float λ. inverse: use T⁻¹ (ω must have no zeros).
        return_strengths: also return the per-token strengths λ·g, float32, of z's shape without
            the channel axis (z.shape[:-1] for channel-last; (B, H, W) for (B, C, H, W)).
    On CUDA (d ≤ 8192) one fused kernel computes gate and map in a single pass over z; a
    channel-first z is moved channel-last for it (one copy in, one out).
    Gradients flow to z, omega, bias, gate_w and gate_c.
    """
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    if not isinstance(z, torch.Tensor) or not z.is_floating_point() or z.ndim < 1:
        raise TypeError("z must be a floating-point tensor (..., d)")
    cd = _channel_axis(z, channel_dim)
    d = z.shape[cd]
    check_param_shapes(
        d, f"z's axis {channel_dim} of z.shape {tuple(z.shape)}", omega=omega, bias=bias, gate_w=gate_w
    )
    if not isinstance(gate_c, torch.Tensor) or gate_c.numel() != 1:
        raise ValueError("gate_c must be a tensor holding one value")
    if isinstance(strength, torch.Tensor):
        raise TypeError("gated_steer takes a float strength; the gate makes it per token")
    check_same_device(z=z, omega=omega, bias=bias, gate_w=gate_w, gate_c=gate_c)
    u, b = map_coefficients(omega, bias, inverse)
    lam = number(strength, "strength")
    y, s = apply_gated(z, u, b, gate_w, gate_c, lam, gate == "relu", cd, backend)
    return (y, s) if return_strengths else y
