"""Fused steering map y = z + λ ⊙ (u ⊙ z + b) and its backward, each one pass over z.

The host functions view z as (P, D, S), coordinates D in the middle: channel-last activations
(B, T, D) are (B·T, D, 1); channel-first maps (B, C, H, W) are (B, C, H·W). A token is one
(p, s) pair; a per-token strength holds P·S values. Work is cut into tiles of BLOCK_T tokens ×
BLOCK_D coordinates (tokens of one p only, for channel-first); ``launch_config`` picks the tile
from the shape so that even small maps give enough programs to fill the GPU.

Forward (``affine_steer_fwd``): one program per tile, reads z once, writes y once; no
reduction, so no barrier.

Backward (``affine_steer_bwd``): a (token stripes × column blocks) grid; program (i, c) walks
the tiles i, i + n_stripes, … of column block c, writes
    ∂z = g ⊙ (1 + λ u)
and accumulates λ g ⊙ z and λ g in registers, reducing them over tokens once at the end into
float32 partials (n_stripes, D) that the host sums: ∂u = Σ_tokens λ g ⊙ z, ∂b = Σ_tokens λ g.
A per-token strength's gradient ∂λ = Σ_coords g ⊙ (u ⊙ z + b) is written per column block
(n_dblk, P·S) and summed on the host. Every partial is written, so nothing is zero-filled.

Activations float32 / bfloat16 / float16; u, b and λ float32; math float32. The host functions
are pure (no autograd, no host synchronisation); their autograd is registered with the custom op in
``ops.py``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

DEFAULT_SMS = 132  # H100 SXM; the real count is read from a CUDA device
MIN_PROGRAMS_PER_SM = 2  # launch_config shrinks the tile until the grid has this many


@triton.jit
def _tile(k, P, D, S, n_sblk, CHANNEL_FIRST: tl.constexpr, BLOCK_T: tl.constexpr):
    """Token tile k: (element offset of each token's coordinate 0 (int64), token index, mask,
    stride between coordinates)."""
    ar = tl.arange(0, BLOCK_T)
    if CHANNEL_FIRST:
        p = k // n_sblk
        s = (k - p * n_sblk) * BLOCK_T + ar
        p64 = (p + ar * 0).to(tl.int64)  # a tensor also where k is a Python int (interpreter)
        return p64 * D * S + s, p64 * S + s, s < S, S
    t = (k * BLOCK_T + ar).to(tl.int64)
    return t * D, t, t < P, 1


@triton.jit
def _add2(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _coef(ptr, j, dmask, mask, CHANNEL_FIRST: tl.constexpr, BLOCK_T: tl.constexpr):
    """Per-coordinate float32 coefficients for the (BLOCK_T, BLOCK_D) tile. Channel-last: loaded
    at every element (the same 16-byte vectors per row, from L1) so the values arrive in the
    tile's own register layout: a (BLOCK_D,) load would be moved there through shared memory,
    with barriers. Channel-first: one (BLOCK_D,) load, broadcast over the positions."""
    if CHANNEL_FIRST:
        c = tl.load(ptr + j, mask=dmask, other=0.0)[None, :]
    else:
        c = tl.load(ptr + (j[None, :] + tl.zeros([BLOCK_T, 1], dtype=tl.int32)), mask=mask, other=0.0)
    return c


@triton.jit
def _affine_steer_fwd_kernel(
    z_ptr,
    y_ptr,
    u_ptr,
    b_ptr,
    lam_ptr,
    lam_scalar,
    P,
    D,
    S,
    n_sblk,
    CHANNEL_FIRST: tl.constexpr,
    TOKEN_STRENGTH: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tok_off, tok_idx, tmask, d_stride = _tile(tl.program_id(0), P, D, S, n_sblk, CHANNEL_FIRST, BLOCK_T)
    j = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = j < D
    mask = tmask[:, None] & dmask[None, :]
    off = tok_off[:, None] + j[None, :].to(tl.int64) * d_stride
    z = tl.load(z_ptr + off, mask=mask, other=0.0).to(tl.float32)
    u = _coef(u_ptr, j, dmask, mask, CHANNEL_FIRST, BLOCK_T)
    b = _coef(b_ptr, j, dmask, mask, CHANNEL_FIRST, BLOCK_T)
    if TOKEN_STRENGTH:
        lam = tl.load(lam_ptr + tok_idx, mask=tmask, other=0.0)[:, None]
    else:
        lam = lam_scalar
    y = z + lam * (u * z + b)
    tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _affine_steer_bwd_kernel(
    z_ptr,
    g_ptr,
    dz_ptr,
    u_ptr,
    b_ptr,
    lam_ptr,
    lam_scalar,
    du_part_ptr,
    db_part_ptr,
    dlam_part_ptr,
    P,
    D,
    S,
    n_sblk,
    n_tiles,
    CHANNEL_FIRST: tl.constexpr,
    TOKEN_STRENGTH: tl.constexpr,
    NEED_DPARAM: tl.constexpr,
    NEED_DSTRENGTH: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    stripe = tl.program_id(0)
    n_stripes = tl.num_programs(0)
    dblk = tl.program_id(1)
    j = dblk * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = j < D
    u = _coef(u_ptr, j, dmask, dmask[None, :], CHANNEL_FIRST, BLOCK_T)
    b = _coef(b_ptr, j, dmask, dmask[None, :], CHANNEL_FIRST, BLOCK_T)
    acc_u = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)  # Σ λ g z  (g z for a scalar λ)
    acc_b = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)  # Σ λ g    (g)
    for k in range(stripe, n_tiles, n_stripes):
        tok_off, tok_idx, tmask, d_stride = _tile(k, P, D, S, n_sblk, CHANNEL_FIRST, BLOCK_T)
        mask = tmask[:, None] & dmask[None, :]
        off = tok_off[:, None] + j[None, :].to(tl.int64) * d_stride
        g = tl.load(g_ptr + off, mask=mask, other=0.0).to(tl.float32)
        if NEED_DPARAM or NEED_DSTRENGTH:  # ∂z alone does not read z
            z = tl.load(z_ptr + off, mask=mask, other=0.0).to(tl.float32)
        if TOKEN_STRENGTH:
            lam = tl.load(lam_ptr + tok_idx, mask=tmask, other=0.0)[:, None]
        else:
            lam = lam_scalar
        tl.store(dz_ptr + off, (g + (lam * u) * g).to(dz_ptr.dtype.element_ty), mask=mask)
        if NEED_DPARAM:
            if TOKEN_STRENGTH:
                lg = lam * g
            else:
                lg = g
            acc_u += lg * z
            acc_b += lg
        if NEED_DSTRENGTH:
            dlam = tl.sum(g * (u * z + b), axis=1)
            tl.store(dlam_part_ptr + dblk.to(tl.int64) * P * S + tok_idx, dlam, mask=tmask)
    if NEED_DPARAM:
        du, db = tl.reduce((acc_u, acc_b), 0, _add2)
        if not TOKEN_STRENGTH:
            du = du * lam_scalar
            db = db * lam_scalar
        part = stripe.to(tl.int64) * D + j
        tl.store(du_part_ptr + part, du, mask=dmask)
        tl.store(db_part_ptr + part, db, mask=dmask)


# Forward tiles (BLOCK_T, BLOCK_D, num_warps), largest first. Channel-last tiles keep 256
# contiguous coordinates (16-byte vectors for every dtype); channel-first tiles keep 64
# contiguous positions. No reduction: any of them compiles without a barrier.
CHANNEL_LAST_TILES = ((16, 256, 8), (4, 256, 4), (1, 256, 2))
CHANNEL_FIRST_TILES = ((64, 64, 8), (64, 16, 4), (32, 8, 2))
# Backward tile, channel-last: one warp spans the 256 coordinates and holds both tokens in each
# thread, so the final reduction over tokens stays in registers (no barrier, no shared memory).
CHANNEL_LAST_BWD_TILE = (2, 256, 1)
RESIDENT_WARPS_PER_SM = 16  # backward: stripes × column blocks ≈ this many warps per SM


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (cached; no synchronisation), DEFAULT_SMS off CUDA."""
    if device.type != "cuda":
        return DEFAULT_SMS
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _grid(P: int, D: int, S: int, tile) -> dict:
    bt, bd, warps = tile
    n_sblk = triton.cdiv(S, bt)
    return {
        "BLOCK_T": bt,
        "BLOCK_D": bd,
        "num_warps": warps,
        "CHANNEL_FIRST": S > 1,
        "n_tiles": P * n_sblk if S > 1 else triton.cdiv(P, bt),
        "n_dblk": triton.cdiv(D, bd),
        "n_sblk": n_sblk,
    }


def launch_config(P: int, D: int, S: int, sms: int = DEFAULT_SMS) -> dict:
    """Forward tile for z seen as (P, D, S) (S = 1: channel-last): the largest candidate whose
    grid (one program per tile) has at least MIN_PROGRAMS_PER_SM · sms programs, else the
    smallest. Returns BLOCK_T, BLOCK_D, num_warps, CHANNEL_FIRST, n_tiles (token tiles),
    n_dblk (coordinate blocks) and n_sblk (position blocks per p, channel-first)."""
    for tile in CHANNEL_FIRST_TILES if S > 1 else CHANNEL_LAST_TILES:
        cfg = _grid(P, D, S, tile)
        if cfg["n_tiles"] * cfg["n_dblk"] >= MIN_PROGRAMS_PER_SM * sms:
            break
    return cfg


def backward_config(P: int, D: int, S: int, sms: int = DEFAULT_SMS) -> dict:
    """Backward tile and grid: ``launch_config``'s fields plus ``stripes``, the token stripes
    per coordinate block, so that stripes × n_dblk programs give about RESIDENT_WARPS_PER_SM
    warps per SM (never more stripes than tiles). The parameter partials are stripes × D
    float32 each."""
    cfg = launch_config(P, D, S, sms) if S > 1 else _grid(P, D, S, CHANNEL_LAST_BWD_TILE)
    programs = sms * max(1, RESIDENT_WARPS_PER_SM // cfg["num_warps"])
    cfg["stripes"] = max(1, min(cfg["n_tiles"], triton.cdiv(programs, cfg["n_dblk"])))
    return cfg


def _view(z: torch.Tensor, channel_dim: int):
    """(z contiguous, P, D, S) with z seen as (P, D, S); channel-last is (tokens, D, 1)."""
    cd = channel_dim % z.ndim
    z = z.contiguous()
    D = z.shape[cd]
    P = int(torch.Size(z.shape[:cd]).numel())
    S = int(torch.Size(z.shape[cd + 1 :]).numel())
    if S == 1 or D == 1:
        P, S = P * S, 1  # one coordinate per token: the channel-last layout is the same
    return z, P, D, S


def _meta(cfg: dict) -> dict:
    return dict(
        CHANNEL_FIRST=cfg["CHANNEL_FIRST"],
        BLOCK_T=cfg["BLOCK_T"],
        BLOCK_D=cfg["BLOCK_D"],
        num_warps=cfg["num_warps"],
    )


def _check_strength(lam, P, S, z):
    if lam is not None and lam.numel() != P * S:
        raise ValueError(
            f"lam must hold one strength per token ({P * S} for z of shape "
            f"{tuple(z.shape)}), got shape {tuple(lam.shape)}"
        )


def affine_steer_fwd(
    z: torch.Tensor, u: torch.Tensor, b: torch.Tensor, lam, lam_scalar: float, channel_dim: int
) -> torch.Tensor:
    """y = z + λ(u⊙z + b) in z's dtype and shape (contiguous).

    z: any shape, coordinates at ``channel_dim``; u, b: (d,) float32 contiguous; lam: None (then
    the float ``lam_scalar``) or a float32 tensor of P·S per-token strengths (z's positions
    without the channel axis, in order).
    """
    z, P, D, S = _view(z, channel_dim)
    _check_strength(lam, P, S, z)
    y = torch.empty_like(z)
    if z.numel() == 0:
        return y
    cfg = launch_config(P, D, S, sm_count(z.device))
    _affine_steer_fwd_kernel[(cfg["n_tiles"], cfg["n_dblk"])](
        z,
        y,
        u,
        b,
        lam if lam is not None else u,
        float(lam_scalar),
        P,
        D,
        S,
        cfg["n_sblk"],
        TOKEN_STRENGTH=lam is not None,
        **_meta(cfg),
    )
    return y


def affine_steer_bwd(
    z: torch.Tensor,
    g: torch.Tensor,
    u: torch.Tensor,
    b: torch.Tensor,
    lam,
    lam_scalar: float,
    channel_dim: int,
    need_param: bool,
    need_lam: bool,
):
    """(∂z like z, ∂u (d,) or None, ∂b (d,) or None, ∂λ flat like ``lam`` or None) for the
    incoming gradient g (z's shape). ∂u, ∂b when ``need_param``; ∂λ when ``need_lam`` (needs a
    tensor ``lam``). Arguments as for ``affine_steer_fwd``."""
    if need_lam and lam is None:
        raise ValueError("need_lam=True needs a per-token strength tensor lam, got None")
    if g.shape != z.shape:
        raise ValueError(f"g must have z's shape {tuple(z.shape)}, got {tuple(g.shape)}")
    z, P, D, S = _view(z, channel_dim)
    g = g.contiguous()
    _check_strength(lam, P, S, z)
    dz = torch.empty_like(z)
    f32 = dict(device=z.device, dtype=torch.float32)
    if z.numel() == 0:
        return (
            dz,
            torch.zeros(D, **f32) if need_param else None,
            torch.zeros(D, **f32) if need_param else None,
            torch.zeros(P * S, **f32) if need_lam else None,
        )
    cfg = backward_config(P, D, S, sm_count(z.device))
    stripes = cfg["stripes"]
    du_part = torch.empty((stripes, D) if need_param else (1,), **f32)
    db_part = torch.empty((stripes, D) if need_param else (1,), **f32)
    dlam_part = torch.empty((cfg["n_dblk"], P * S) if need_lam else (1,), **f32)
    _affine_steer_bwd_kernel[(stripes, cfg["n_dblk"])](
        z,
        g,
        dz,
        u,
        b,
        lam if lam is not None else u,
        float(lam_scalar),
        du_part,
        db_part,
        dlam_part,
        P,
        D,
        S,
        cfg["n_sblk"],
        cfg["n_tiles"],
        TOKEN_STRENGTH=lam is not None,
        NEED_DPARAM=need_param,
        NEED_DSTRENGTH=need_lam,
        **_meta(cfg),
    )
    du = du_part.sum(0) if need_param else None
    db = db_part.sum(0) if need_param else None
    dlam = None
    if need_lam:
        dlam = (dlam_part[0] if cfg["n_dblk"] == 1 else dlam_part.sum(0)).view(lam.shape)
    return dz, du, db, dlam
