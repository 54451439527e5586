"""Fused DSAS gated steering: the gate's dot product and the map in one pass over z.

Forward (``gated_steer_fwd``): each program holds BLOCK_T whole tokens (BLOCK_D ≥ d, so
d ≤ MAX_D), reads them once, computes logit = w·z + c per token and the gate g (sigmoid or
ReLU-clipped), and writes y = z + λ g (u⊙z + b) and the per-token strength s = λ g (float32).

Backward (``gated_steer_bwd``): a bounded grid (about one wave, ``backward_programs``); each
program walks the row tiles pid, pid + programs, … re-reading z and the incoming gradient G once:
    logit, r = w·z + c, Σ_j G_j (u_j z_j + b_j)      per token, one two-operand reduction
    ∂z  = G ⊙ (1 + s u) + λ g'(logit) r w
and accumulates in registers, reduced over tokens once at the end into one float32 partial
row (3D + 1) per program that the host sums (every row written: nothing zero-filled):
    ∂u = Σ_t s G ⊙ z,  ∂b = Σ_t s G,  ∂w = Σ_t λ g' r z,  ∂c = Σ_t λ g' r.
Activations float32/bfloat16/float16; u, b, w, c float32; λ a float. The host functions are
pure (no autograd, no host synchronisation); their autograd is registered with the custom op in ``ops.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import next_pow2
from .affine_steer import DEFAULT_SMS, sm_count

MAX_D = 8192


@triton.jit
def _gate(logit, RELU: tl.constexpr):
    if RELU:
        g = tl.minimum(tl.maximum(logit, 0.0), 1.0)
        dg = tl.where((logit > 0.0) & (logit < 1.0), 1.0, 0.0)
    else:
        g = 1.0 / (1.0 + tl.exp(-logit))
        dg = g * (1.0 - g)
    return g, dg


@triton.jit
def _add2(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _add3(a0, a1, a2, b0, b1, b2):
    return a0 + b0, a1 + b1, a2 + b2


@triton.jit
def _rows(k, T, D, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Row tile k: token indices (int64), column indices, masks and element offsets."""
    t = (k * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    j = tl.arange(0, BLOCK_D)
    tmask, dmask = t < T, j < D
    return t, j, tmask, dmask, tmask[:, None] & dmask[None, :], t[:, None] * D + j[None, :]


@triton.jit
def _param(ptr, j, mask, BLOCK_T: tl.constexpr):
    """A (D,) float32 parameter for the (BLOCK_T, BLOCK_D) tile, loaded at every element (the
    same vectors per row, from L1) so it arrives in the tile's register layout: a (BLOCK_D,)
    load would be moved there through shared memory, with barriers."""
    return tl.load(ptr + (j[None, :] + tl.zeros([BLOCK_T, 1], dtype=tl.int32)), mask=mask, other=0.0)


@triton.jit
def _gated_steer_fwd_kernel(
    z_ptr,
    y_ptr,
    s_ptr,
    u_ptr,
    b_ptr,
    w_ptr,
    c_ptr,
    lam,
    T,
    D,
    RELU: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t, j, tmask, dmask, mask, off = _rows(tl.program_id(0), T, D, BLOCK_T, BLOCK_D)
    z = tl.load(z_ptr + off, mask=mask, other=0.0).to(tl.float32)
    w = _param(w_ptr, j, mask, BLOCK_T)
    g, _ = _gate(tl.sum(z * w, axis=1) + tl.load(c_ptr), RELU)
    s = lam * g
    u = _param(u_ptr, j, mask, BLOCK_T)
    b = _param(b_ptr, j, mask, BLOCK_T)
    y = z + s[:, None] * (u * z + b)
    tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + t, s, mask=tmask)


@triton.jit
def _gated_steer_bwd_kernel(
    z_ptr,
    g_ptr,
    dz_ptr,
    u_ptr,
    b_ptr,
    w_ptr,
    c_ptr,
    lam,
    part_ptr,
    T,
    D,
    n_tiles,
    RELU: tl.constexpr,
    NEED_DPARAM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    j = tl.arange(0, BLOCK_D)
    dmask = j < D
    c = tl.load(c_ptr)
    acc_u = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)  # Σ s G z
    acc_b = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)  # Σ s G
    acc_w = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)  # Σ λ g' r z
    acc_c = tl.zeros([BLOCK_T], dtype=tl.float32)  # Σ λ g' r
    for k in range(pid, n_tiles, n_prog):
        _, _, tmask, _, mask, off = _rows(k, T, D, BLOCK_T, BLOCK_D)
        z = tl.load(z_ptr + off, mask=mask, other=0.0).to(tl.float32)
        G = tl.load(g_ptr + off, mask=mask, other=0.0).to(tl.float32)
        # the parameters are re-read per tile (L1 hits), not held in registers across the loop
        u = _param(u_ptr, j, mask, BLOCK_T)
        b = _param(b_ptr, j, mask, BLOCK_T)
        w = _param(w_ptr, j, mask, BLOCK_T)
        # the gate's logit and r = Σ_j G (u z + b) in one two-operand reduction
        zw, r = tl.reduce((z * w, G * (u * z + b)), 1, _add2)
        g, dg = _gate(zw + c, RELU)
        s = tl.where(tmask, lam * g, 0.0)
        ldgr = tl.where(tmask, lam * dg * r, 0.0)
        tl.store(
            dz_ptr + off,
            (G + (s[:, None] * u) * G + ldgr[:, None] * w).to(dz_ptr.dtype.element_ty),
            mask=mask,
        )
        if NEED_DPARAM:
            sG = s[:, None] * G
            acc_u += sG * z
            acc_b += sG
            acc_w += ldgr[:, None] * z
            acc_c += ldgr
    if NEED_DPARAM:
        du, db, dw = tl.reduce((acc_u, acc_b, acc_w), 0, _add3)
        base = part_ptr + pid.to(tl.int64) * (3 * D + 1)
        tl.store(base + j, du, mask=dmask)
        tl.store(base + D + j, db, mask=dmask)
        tl.store(base + 2 * D + j, dw, mask=dmask)
        tl.store(base + 3 * D, tl.sum(acc_c, axis=0))


def launch_config(D: int) -> dict:
    """Whole rows per program (the gate needs the full dot product): 2048-element tiles, one row
    of up to 8192 per program above. Warps per row from the compile lane: 16 at 4096 (fewer
    instructions per element than 32, no spill); 8 at 8192, where 16 or 32 warps spill in the
    backward (its accumulators, z, G and the parameters need ~250 registers per thread)."""
    block_d = max(256, next_pow2(D))
    block_t = max(1, min(8, 2048 // block_d))
    warps = {256: 4, 512: 8, 1024: 8, 2048: 8, 4096: 16, 8192: 8}[block_d]
    return {"BLOCK_T": block_t, "BLOCK_D": block_d, "num_warps": warps}


def backward_programs(T: int, cfg: dict, sms: int = DEFAULT_SMS) -> int:
    """Programs of the backward: 16 warps per SM (at most as many as there are row tiles).
    Each writes one (3D + 1) float32 partial row: programs × 12·D bytes, about 4·programs/T
    of what the kernel reads and writes in bf16 (6 % at T = 8192 on 132 SMs)."""
    return max(1, min(triton.cdiv(T, cfg["BLOCK_T"]), sms * max(1, 16 // cfg["num_warps"])))


def _check(z2d, u, b, w, c):
    if z2d.ndim != 2 or not z2d.is_contiguous():
        raise ValueError(f"z2d must be a contiguous (T, D) tensor, got shape {tuple(z2d.shape)}")
    D = z2d.shape[1]
    if D > MAX_D:
        raise ValueError(f"the gated kernel holds whole rows: D must be <= {MAX_D}, got {D}")
    for name, p in (("u", u), ("b", b), ("w", w)):
        if p.shape != (D,):
            raise ValueError(f"{name} must have shape ({D},), got {tuple(p.shape)}")
    if c.numel() != 1:
        raise ValueError(f"c must hold one value, got shape {tuple(c.shape)}")


def gated_steer_fwd(
    z2d: torch.Tensor,
    u: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    c: torch.Tensor,
    lam: float,
    relu: bool,
):
    """(y (T, D) in z2d's dtype, s (T,) float32 = λ·gate(w·z + c)) for z2d (T, D) contiguous;
    u, b, w (D,) and c (1,) float32 contiguous."""
    _check(z2d, u, b, w, c)
    T, D = z2d.shape
    cfg = launch_config(D)
    y = torch.empty_like(z2d)
    s = torch.empty(T, device=z2d.device, dtype=torch.float32)
    if T:
        _gated_steer_fwd_kernel[(triton.cdiv(T, cfg["BLOCK_T"]),)](
            z2d,
            y,
            s,
            u,
            b,
            w,
            c,
            float(lam),
            T,
            D,
            RELU=bool(relu),
            BLOCK_T=cfg["BLOCK_T"],
            BLOCK_D=cfg["BLOCK_D"],
            num_warps=cfg["num_warps"],
        )
    return y, s


def gated_steer_bwd(
    z2d: torch.Tensor,
    gy: torch.Tensor,
    u: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    c: torch.Tensor,
    lam: float,
    relu: bool,
    need_param: bool,
):
    """(∂z (T, D), ∂u, ∂b, ∂w (D,), ∂c (1,)) for the incoming gradient gy (T, D) of y; the last
    four are None unless ``need_param``. Arguments as for ``gated_steer_fwd``."""
    _check(z2d, u, b, w, c)
    if gy.shape != z2d.shape:
        raise ValueError(f"gy must have z2d's shape {tuple(z2d.shape)}, got {tuple(gy.shape)}")
    T, D = z2d.shape
    gy = gy.contiguous()
    cfg = launch_config(D)
    programs = backward_programs(T, cfg, sm_count(z2d.device))
    dz = torch.empty_like(z2d)
    part = torch.empty((programs, 3 * D + 1) if need_param else (1,), device=z2d.device, dtype=torch.float32)
    if T:
        _gated_steer_bwd_kernel[(programs,)](
            z2d,
            gy,
            dz,
            u,
            b,
            w,
            c,
            float(lam),
            part,
            T,
            D,
            triton.cdiv(T, cfg["BLOCK_T"]),
            RELU=bool(relu),
            NEED_DPARAM=bool(need_param),
            BLOCK_T=cfg["BLOCK_T"],
            BLOCK_D=cfg["BLOCK_D"],
            num_warps=cfg["num_warps"],
        )
    if not need_param:
        return dz, None, None, None, None
    if not T:
        part = torch.zeros((1, 3 * D + 1), device=z2d.device, dtype=torch.float32)
    # four separate sums: the results must not alias (custom-op outputs)
    return (
        dz,
        part[:, :D].sum(0),
        part[:, D : 2 * D].sum(0),
        part[:, 2 * D : 3 * D].sum(0),
        part[:, 3 * D :].sum(0),
    )
