"""Fused DSAS gated steering: the gate's dot product and the map in one pass over z.

Each program holds BLOCK_T whole tokens (BLOCK_D ≥ d, so d ≤ MAX_D), computes
logit = w·z + c per token, the gate g (sigmoid or ReLU-clipped), and writes
y = z + λ g (u⊙z + b) and the per-token strength s = λ g (float32; kept for inspection and
for the backward). The backward re-reads z and the incoming gradient G once:
    r   = Σ_j G_j (u_j z_j + b_j)                 per token
    ∂z  = G ⊙ (1 + s u) + λ g'(logit) r w
    ∂u  = Σ_t s G ⊙ z,  ∂b = Σ_t s G,  ∂w = Σ_t λ g' r z,  ∂c = Σ_t λ g' r   (float32 partials)
Activations float32/bfloat16/float16; u, b, w, c float32; λ a float.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import next_pow2

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
def _row_tile(z_ptr, u_ptr, b_ptr, w_ptr, c_ptr, pid, T, D, BLOCK_T: tl.constexpr,
              BLOCK_D: tl.constexpr):
    """This program's whole-row tile: token indices, masks, offsets, z (float32), the map and
    gate parameters, and the gate logit per token."""
    t = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    j = tl.arange(0, BLOCK_D)
    tmask, dmask = t < T, j < D
    mask = tmask[:, None] & dmask[None, :]
    off = t[:, None] * D + j[None, :]
    z = tl.load(z_ptr + off, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + j, mask=dmask, other=0.0)[None, :]
    b = tl.load(b_ptr + j, mask=dmask, other=0.0)[None, :]
    w = tl.load(w_ptr + j, mask=dmask, other=0.0)[None, :]
    logit = tl.sum(z * w, axis=1) + tl.load(c_ptr)
    return t, j, tmask, dmask, mask, off, z, u, b, w, logit


@triton.jit
def _gated_steer_fwd_kernel(z_ptr, y_ptr, s_ptr, u_ptr, b_ptr, w_ptr, c_ptr, lam, T, D,
                            RELU: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    t, j, tmask, dmask, mask, off, z, u, b, w, logit = _row_tile(
        z_ptr, u_ptr, b_ptr, w_ptr, c_ptr, tl.program_id(0), T, D, BLOCK_T, BLOCK_D)
    g, _ = _gate(logit, RELU)
    s = lam * g
    y = z + s[:, None] * (u * z + b)
    tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + t, s, mask=tmask)


@triton.jit
def _gated_steer_bwd_kernel(z_ptr, g_ptr, dz_ptr, u_ptr, b_ptr, w_ptr, c_ptr, lam, part_ptr, T, D,
                            RELU: tl.constexpr, NEED_DPARAM: tl.constexpr,
                            BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    t, j, tmask, dmask, mask, off, z, u, b, w, logit = _row_tile(
        z_ptr, u_ptr, b_ptr, w_ptr, c_ptr, pid, T, D, BLOCK_T, BLOCK_D)
    G = tl.load(g_ptr + off, mask=mask, other=0.0).to(tl.float32)
    g, dg = _gate(logit, RELU)
    s = tl.where(tmask, lam * g, 0.0)
    ldg = tl.where(tmask, lam * dg, 0.0)
    r = tl.sum(G * (u * z + b), axis=1)
    dz = G * (1.0 + s[:, None] * u) + (ldg * r)[:, None] * w
    tl.store(dz_ptr + off, dz.to(dz_ptr.dtype.element_ty), mask=mask)
    if NEED_DPARAM:
        base = part_ptr + pid.to(tl.int64) * (3 * D + 1)
        sg = s[:, None] * G
        tl.store(base + j, tl.sum(sg * z, axis=0), mask=dmask)                   # ∂u
        tl.store(base + D + j, tl.sum(sg, axis=0), mask=dmask)                   # ∂b
        tl.store(base + 2 * D + j, tl.sum((ldg * r)[:, None] * z, axis=0), mask=dmask)   # ∂w
        tl.store(base + 3 * D, tl.sum(ldg * r, axis=0))                           # ∂c


def launch_config(D: int) -> dict:
    """Whole rows per program (the gate needs the full dot product): 2048-element tiles, one row
    of up to 8192 with more warps; sized so the backward holds z, G and the parameters in
    registers without spilling (checked by the compile lane)."""
    block_d = max(256, next_pow2(D))
    block_t = max(1, min(8, 2048 // block_d))
    warps = {256: 4, 512: 8, 1024: 8, 2048: 8, 4096: 32, 8192: 32}[block_d]
    return {"BLOCK_T": block_t, "BLOCK_D": block_d, "num_warps": warps}


class GatedSteerFn(torch.autograd.Function):
    """(y, s) = gated steer of z (T, D) contiguous; s is the per-token strength λ·g."""

    @staticmethod
    def forward(ctx, z, u, b, w, c, lam, relu):
        T, D = z.shape
        cfg = launch_config(D)
        y = torch.empty_like(z)
        s = torch.empty(T, device=z.device, dtype=torch.float32)
        grid = (triton.cdiv(T, cfg["BLOCK_T"]),)
        if T:
            _gated_steer_fwd_kernel[grid](z, y, s, u, b, w, c, float(lam), T, D, RELU=relu,
                                          BLOCK_T=cfg["BLOCK_T"], BLOCK_D=cfg["BLOCK_D"],
                                          num_warps=cfg["num_warps"])
        ctx.save_for_backward(z, u, b, w, c)
        ctx.lam, ctx.relu, ctx.cfg, ctx.programs = float(lam), relu, cfg, grid[0]
        ctx.mark_non_differentiable(s)
        return y, s

    @staticmethod
    def backward(ctx, gy, _gs):
        z, u, b, w, c = ctx.saved_tensors
        T, D = z.shape
        cfg = ctx.cfg
        need = any(ctx.needs_input_grad[1:5])
        dz = torch.empty_like(z)
        part = torch.zeros((ctx.programs, 3 * D + 1) if need else (1,), device=z.device,
                           dtype=torch.float32)
        if T:
            _gated_steer_bwd_kernel[(ctx.programs,)](
                z, gy.contiguous(), dz, u, b, w, c, ctx.lam, part, T, D, RELU=ctx.relu,
                NEED_DPARAM=need, BLOCK_T=cfg["BLOCK_T"], BLOCK_D=cfg["BLOCK_D"],
                num_warps=cfg["num_warps"])
        if not need:
            return dz, None, None, None, None, None, None
        tot = part.sum(0)
        return (dz, tot[:D], tot[D:2 * D], tot[2 * D:3 * D], tot[3 * D].reshape(c.shape),
                None, None)
