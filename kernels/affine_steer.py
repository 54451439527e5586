"""Fused steering map: y = z + λ ⊙ (u ⊙ z + b) and its backward in one pass each.

The host wrapper views z as (P, D, S) with the coordinates D in the middle:
channel-last activations (B, T, D) are (B·T, D, 1); channel-first maps (B, C, H, W) are
(B, C, H·W). A token is one (p, s) pair; a per-token strength holds P·S values.

Forward reads z once and writes y. Backward reads z and the incoming gradient once and writes
    ∂z = g ⊙ (1 + λ u)
    ∂u = Σ_tokens λ g ⊙ z,  ∂b = Σ_tokens λ g     (float32 partial sums per program, summed on host)
    ∂λ = Σ_coords g ⊙ (u ⊙ z + b)                 (only for a per-token strength that needs it)
Activations may be float32, bfloat16 or float16; u, b and λ are float32; math is float32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _token_tile(pid, P, D, S, n_sblk, CHANNEL_FIRST: tl.constexpr, BLOCK_T: tl.constexpr):
    """Offsets of this program's tokens: (element offset of coordinate 0, token index, mask,
    stride between coordinates)."""
    ar = tl.arange(0, BLOCK_T)
    if CHANNEL_FIRST:
        p = pid // n_sblk
        s = (pid % n_sblk) * BLOCK_T + ar
        tmask = s < S
        tok_off = p.to(tl.int64) * D * S + s
        tok_idx = p.to(tl.int64) * S + s
        d_stride = S
    else:
        t = pid.to(tl.int64) * BLOCK_T + ar
        tmask = t < P
        tok_off = t * D
        tok_idx = t
        d_stride = 1
    return tok_off, tok_idx, tmask, d_stride


@triton.jit
def _affine_steer_fwd_kernel(z_ptr, y_ptr, u_ptr, b_ptr, lam_ptr, lam_scalar, P, D, S, n_sblk,
                             CHANNEL_FIRST: tl.constexpr, TOKEN_STRENGTH: tl.constexpr,
                             BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    tok_off, tok_idx, tmask, d_stride = _token_tile(pid, P, D, S, n_sblk, CHANNEL_FIRST, BLOCK_T)
    if TOKEN_STRENGTH:
        lam = tl.load(lam_ptr + tok_idx, mask=tmask, other=0.0).to(tl.float32)[:, None]
    else:
        lam = lam_scalar
    for d0 in range(0, D, BLOCK_D):
        j = d0 + tl.arange(0, BLOCK_D)
        dmask = j < D
        mask = tmask[:, None] & dmask[None, :]
        off = tok_off[:, None] + j[None, :].to(tl.int64) * d_stride
        z = tl.load(z_ptr + off, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + j, mask=dmask, other=0.0)[None, :]
        b = tl.load(b_ptr + j, mask=dmask, other=0.0)[None, :]
        y = z + lam * (u * z + b)
        tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _affine_steer_bwd_kernel(z_ptr, g_ptr, dz_ptr, u_ptr, b_ptr, lam_ptr, lam_scalar,
                             du_part_ptr, db_part_ptr, dlam_ptr, P, D, S, n_sblk,
                             CHANNEL_FIRST: tl.constexpr, TOKEN_STRENGTH: tl.constexpr,
                             NEED_DPARAM: tl.constexpr, NEED_DSTRENGTH: tl.constexpr,
                             BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    tok_off, tok_idx, tmask, d_stride = _token_tile(pid, P, D, S, n_sblk, CHANNEL_FIRST, BLOCK_T)
    if TOKEN_STRENGTH:
        lam = tl.load(lam_ptr + tok_idx, mask=tmask, other=0.0).to(tl.float32)[:, None]
    else:
        lam = lam_scalar
    dlam = tl.zeros([BLOCK_T], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        j = d0 + tl.arange(0, BLOCK_D)
        dmask = j < D
        mask = tmask[:, None] & dmask[None, :]
        off = tok_off[:, None] + j[None, :].to(tl.int64) * d_stride
        z = tl.load(z_ptr + off, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + off, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + j, mask=dmask, other=0.0)[None, :]
        b = tl.load(b_ptr + j, mask=dmask, other=0.0)[None, :]
        tl.store(dz_ptr + off, (g * (1.0 + lam * u)).to(dz_ptr.dtype.element_ty), mask=mask)
        if NEED_DPARAM:
            lg = lam * g
            part = pid.to(tl.int64) * D + j
            tl.store(du_part_ptr + part, tl.sum(lg * z, axis=0), mask=dmask)
            tl.store(db_part_ptr + part, tl.sum(lg, axis=0), mask=dmask)
        if NEED_DSTRENGTH:
            dlam += tl.sum(g * (u * z + b), axis=1)
    if NEED_DSTRENGTH:
        tl.store(dlam_ptr + tok_idx, dlam, mask=tmask)


def launch_config(channel_first: bool) -> dict:
    """Fixed 4096-element tiles (the kernel is bandwidth-bound; the loop over D and the masks
    cover any shape): coordinates contiguous for channel-last, positions for channel-first."""
    if channel_first:
        return {"BLOCK_T": 64, "BLOCK_D": 64, "num_warps": 8}
    return {"BLOCK_T": 16, "BLOCK_D": 256, "num_warps": 8}


class _View:
    """z seen as (P, D, S) contiguous, with the grid that covers its tokens."""

    def __init__(self, z: torch.Tensor, channel_dim: int):
        self.shape = z.shape
        self.D = z.shape[channel_dim]
        self.P = int(torch.Size(z.shape[:channel_dim]).numel())
        self.S = int(torch.Size(z.shape[channel_dim + 1:]).numel())
        self.channel_first = self.S > 1
        self.cfg = launch_config(self.channel_first)
        bt = self.cfg["BLOCK_T"]
        if self.channel_first:
            self.n_sblk = triton.cdiv(self.S, bt)
            self.programs = self.P * self.n_sblk
        else:
            self.P, self.S, self.n_sblk = self.P * self.S, 1, 1
            self.programs = triton.cdiv(self.P, bt)

    def args(self):
        return self.P, self.D, self.S, self.n_sblk

    def meta(self):
        return dict(CHANNEL_FIRST=self.channel_first, BLOCK_T=self.cfg["BLOCK_T"],
                    BLOCK_D=self.cfg["BLOCK_D"], num_warps=self.cfg["num_warps"])


class AffineSteerFn(torch.autograd.Function):
    """y = z + λ(u⊙z + b). ``lam`` is a float32 tensor of P·S per-token values or None
    (then ``lam_scalar`` is used)."""

    @staticmethod
    def forward(ctx, z, u, b, lam, lam_scalar, channel_dim):
        z = z.contiguous()
        view = _View(z, channel_dim)
        y = torch.empty_like(z)
        lam_arg = lam if lam is not None else u
        if view.programs > 0 and view.D > 0:
            _affine_steer_fwd_kernel[(view.programs,)](
                z, y, u, b, lam_arg, float(lam_scalar), *view.args(),
                TOKEN_STRENGTH=lam is not None, **view.meta())
        ctx.save_for_backward(z, u, b, lam)
        ctx.view, ctx.lam_scalar = view, float(lam_scalar)
        return y

    @staticmethod
    def backward(ctx, g):
        z, u, b, lam = ctx.saved_tensors
        view = ctx.view
        g = g.contiguous()
        need_param = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        need_lam = lam is not None and ctx.needs_input_grad[3]
        dz = torch.empty_like(z)
        part_shape = (view.programs, view.D) if need_param else (1,)
        du_part = torch.empty(part_shape, device=z.device, dtype=torch.float32)
        db_part = torch.empty(part_shape, device=z.device, dtype=torch.float32)
        dlam = torch.empty(view.P * view.S if need_lam else 1, device=z.device, dtype=torch.float32)
        lam_arg = lam if lam is not None else u
        if view.programs > 0 and view.D > 0:
            _affine_steer_bwd_kernel[(view.programs,)](
                z, g, dz, u, b, lam_arg, ctx.lam_scalar, du_part, db_part, dlam, *view.args(),
                TOKEN_STRENGTH=lam is not None, NEED_DPARAM=need_param, NEED_DSTRENGTH=need_lam,
                **view.meta())
        du = du_part.sum(0) if need_param else None
        db = db_part.sum(0) if need_param else None
        return dz, du, db, (dlam if need_lam else None), None, None
