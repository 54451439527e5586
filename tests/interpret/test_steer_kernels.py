"""The intervention kernels' host functions (``affine_steer_fwd/bwd``, ``gated_steer_fwd/bwd``)
run by Triton's interpreter at tiny shapes, against float64 autograd through the closed forms
written here: every output and gradient, every tile the launch configuration can pick (the SM
count is patched to steer it), backward stripes that loop over several tiles (multi-program
partials), token counts that are no multiple of the tile, and the need_param / need_lam
paths. Low precision by flash-attention's rule: error vs float64 ≤ 2× PyTorch's own error
computing the same in that dtype (plus one float32 rounding)."""

import pytest
import torch

from lineas_fast.kernels import affine_steer as A
from lineas_fast.kernels import gated_steer as G

F32_TOL = 2e-5


@pytest.fixture
def sms(monkeypatch):
    """Set the SM count the launch configuration sees (the interpreter reports none)."""

    def set_(n):
        monkeypatch.setattr(A, "sm_count", lambda _device: n)
        monkeypatch.setattr(G, "sm_count", lambda _device: n)

    return set_


def _affine_inputs(shape, cd, dtype, token, seed=0):
    gen = torch.Generator().manual_seed(seed)
    d = shape[cd]
    z = torch.randn(*shape, generator=gen).to(dtype)
    u = torch.rand(d, generator=gen) - 0.5
    b = torch.randn(d, generator=gen)
    n_tok = z.numel() // d
    lam = torch.rand(n_tok, generator=gen) if token else None
    g = torch.randn(*shape, generator=gen).to(dtype)
    return z, u, b, lam, g


def _affine_exact(z, u, b, lam, lam_scalar, cd, g):
    """(y, ∂z, ∂u, ∂b, ∂λ) in float64 by autograd through z + λ(u z + b)."""
    shape = [1] * z.ndim
    shape[cd] = -1
    tok = list(z.shape)
    tok[cd] = 1
    z64 = z.double().requires_grad_()
    u64, b64 = u.double().requires_grad_(), b.double().requires_grad_()
    leaves = [z64, u64, b64]
    if lam is not None:
        l64 = lam.double().requires_grad_()
        leaves.append(l64)
        lam_v = l64.view(tok)
    else:
        lam_v = lam_scalar
    y = z64 + lam_v * (u64.view(shape) * z64 + b64.view(shape))
    grads = torch.autograd.grad(y, leaves, g.double())
    return (y.detach(),) + tuple(grads) + ((None,) if lam is None else ())


def _affine_torch_lowp(z, u, b, lam, lam_scalar, cd, g):
    """The same outputs computed by PyTorch in z's dtype (the rule's yardstick)."""
    dt = z.dtype
    shape = [1] * z.ndim
    shape[cd] = -1
    tok = list(z.shape)
    tok[cd] = 1
    uv, bv = u.to(dt).view(shape), b.to(dt).view(shape)
    lam_v = lam.to(dt).view(tok) if lam is not None else lam_scalar
    y = z + lam_v * (uv * z + bv)
    dz = g * (1 + lam_v * uv)
    axes = [i for i in range(z.ndim) if i != cd]
    lg = lam_v * g
    du, db = (lg * z).sum(axes), lg.sum(axes)
    dlam = (g * (uv * z + bv)).sum(cd).reshape(-1) if lam is not None else None
    return y, dz, du, db, dlam


def _check(name, got, exact, own=None):
    assert got.shape == exact.shape, (name, got.shape, exact.shape)
    err = (got.double() - exact).abs().max().item()
    scale = max(1.0, exact.abs().max().item())
    if own is None:
        assert err <= F32_TOL * scale, (name, err)
    else:
        own_err = (own.double() - exact).abs().max().item()
        slack = torch.finfo(torch.float32).eps * scale
        assert err <= 2 * own_err + slack, (name, err, own_err)


def _run_affine(shape, cd, dtype, token, need_param, need_lam, lam_scalar=0.7):
    z, u, b, lam, g = _affine_inputs(shape, cd, dtype, token)
    y = A.affine_steer_fwd(z, u, b, lam, lam_scalar, cd)
    dz, du, db, dlam = A.affine_steer_bwd(z, g, u, b, lam, lam_scalar, cd, need_param, need_lam)
    exact = _affine_exact(z, u, b, lam, lam_scalar, cd, g)
    own = _affine_torch_lowp(z, u, b, lam, lam_scalar, cd, g) if dtype != torch.float32 else [None] * 5
    assert y.dtype == dtype and dz.dtype == dtype and y.shape == z.shape
    _check("y", y, exact[0], own[0])
    _check("dz", dz, exact[1], own[1])
    if need_param:
        assert du.dtype == torch.float32 and db.dtype == torch.float32
        _check("du", du, exact[2], own[2])
        _check("db", db, exact[3], own[3])
    else:
        assert du is None and db is None
    if need_lam:
        assert dlam.shape == lam.shape
        _check("dlam", dlam, exact[4], own[4])
    else:
        assert dlam is None


# channel-last (41 tokens, d = 300: neither a multiple of the tile): sms picks each forward
# tile in turn (16×256, 4×256, 1×256), and at sms = 1 the backward has 8 stripes over 21 tiles
@pytest.mark.parametrize("n_sms", [1, 5, 132])
@pytest.mark.parametrize(
    "token,need_param,need_lam",
    [(False, True, False), (True, True, True), (True, False, True), (False, False, False)],
)
def test_affine_channel_last(sms, n_sms, token, need_param, need_lam):
    sms(n_sms)
    cfg = A.launch_config(41, 300, 1, n_sms)
    assert (cfg["BLOCK_T"], cfg["BLOCK_D"], cfg["num_warps"]) == A.CHANNEL_LAST_TILES[
        {1: 0, 5: 1, 132: 2}[n_sms]
    ]
    _run_affine((41, 300), 1, torch.float32, token, need_param, need_lam)


def test_affine_backward_stripes_loop_over_several_tiles(sms):
    """Multi-program partials: more than one stripe, and stripes holding several tiles."""
    sms(1)
    cfg = A.backward_config(41, 300, 1, 1)
    assert 1 < cfg["stripes"] < cfg["n_tiles"]
    _run_affine((1, 41, 300), 2, torch.float32, True, True, True)


# channel-first (2, 70, 5, 7): S = 35 positions, d = 70; each forward tile (64×64, 64×16, 8×32)
@pytest.mark.parametrize("n_sms", [1, 4, 132])
@pytest.mark.parametrize(
    "token,need_param,need_lam", [(False, True, False), (True, True, True), (True, False, False)]
)
def test_affine_channel_first(sms, n_sms, token, need_param, need_lam):
    sms(n_sms)
    cfg = A.launch_config(2, 70, 35, n_sms)
    assert (cfg["BLOCK_T"], cfg["BLOCK_D"], cfg["num_warps"]) == A.CHANNEL_FIRST_TILES[
        {1: 0, 4: 1, 132: 2}[n_sms]
    ]
    assert cfg["n_tiles"] * cfg["n_dblk"] >= min(2 * n_sms, 36)  # enough programs
    _run_affine((2, 70, 5, 7), 1, torch.float32, token, need_param, need_lam)


def test_affine_channel_first_grid_grows_with_the_gpu():
    """A small map (2, 1280, 8, 8) on 132 SMs gets ≥ 264 programs (one 64×64 tile per program
    would give 40)."""
    cfg = A.launch_config(2, 1280, 64, 132)
    assert cfg["n_tiles"] * cfg["n_dblk"] >= 2 * 132
    assert A.launch_config(2, 1280, 4096, 132)["BLOCK_D"] == 64  # big maps keep big tiles


def test_affine_dz_alone_does_not_read_z():
    """need_param = need_lam = False: ∂z = g (1 + λu) is computed without loading z (NaN z)."""
    z, u, b, lam, g = _affine_inputs((9, 40), 1, torch.float32, True)
    dz, du, db, dlam = A.affine_steer_bwd(
        torch.full_like(z, float("nan")), g, u, b, lam, 0.0, 1, False, False
    )
    assert du is None and db is None and dlam is None
    torch.testing.assert_close(dz, g * (1 + lam[:, None] * u), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,cd", [((3, 11, 70), 2), ((2, 24, 3, 5), 1)])
def test_affine_low_precision_rule(sms, dtype, shape, cd):
    sms(1)
    _run_affine(shape, cd, dtype, True, True, True)


def test_affine_empty():
    z = torch.empty(0, 8)
    y = A.affine_steer_fwd(z, torch.zeros(8), torch.zeros(8), None, 0.5, 1)
    dz, du, db, dlam = A.affine_steer_bwd(
        z, z, torch.zeros(8), torch.zeros(8), torch.empty(0), 0.5, 1, True, True
    )
    assert y.shape == (0, 8) and dz.shape == (0, 8)
    assert torch.equal(du, torch.zeros(8)) and dlam.shape == (0,)


def test_affine_rejects_a_strength_of_the_wrong_size():
    with pytest.raises(ValueError, match="one strength per token"):
        A.affine_steer_fwd(torch.zeros(3, 4), torch.zeros(4), torch.zeros(4), torch.zeros(2), 0.0, 1)


# --- gated --------------------------------------------------------------------------------
def _gated_inputs(T, D, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(T, D, generator=gen).to(dtype)
    u = torch.rand(D, generator=gen) - 0.5
    b = torch.randn(D, generator=gen)
    w = torch.randn(D, generator=gen) * 1.5 / D**0.5  # relu: both clamped and linear
    c = torch.tensor([0.3])
    gy = torch.randn(T, D, generator=gen).to(dtype)
    return z, u, b, w, c, gy


def _gated_exact(z, u, b, w, c, lam, relu, gy):
    leaves = [t.double().requires_grad_() for t in (z, u, b, w, c)]
    z64, u64, b64, w64, c64 = leaves
    logit = z64 @ w64 + c64
    gate = logit.clamp(0.0, 1.0) if relu else torch.sigmoid(logit)
    s = lam * gate
    y = z64 + s[:, None] * (u64 * z64 + b64)
    grads = torch.autograd.grad(y, leaves, gy.double())
    return (y.detach(), s.detach()) + grads


def _gated_torch_lowp(z, u, b, w, c, lam, relu, gy):
    dt = z.dtype
    uf, bf, wf = u.to(dt), b.to(dt), w.to(dt)
    logit = z @ wf + c.to(dt)
    if relu:
        gate, dg = logit.clamp(0.0, 1.0), ((logit > 0) & (logit < 1)).to(dt)
    else:
        gate = torch.sigmoid(logit)
        dg = gate * (1 - gate)
    s, ldg = lam * gate, lam * dg
    y = z + s[:, None] * (uf * z + bf)
    r = (gy * (uf * z + bf)).sum(-1)
    dz = gy * (1 + s[:, None] * uf) + (ldg * r)[:, None] * wf
    sG, lr = s[:, None] * gy, (ldg * r)[:, None]
    return (y, s, dz, (sG * z).sum(0), sG.sum(0), (lr * z).sum(0), (ldg * r).sum().reshape(1))


def _run_gated(T, D, dtype, relu, need_param, lam=0.8):
    z, u, b, w, c, gy = _gated_inputs(T, D, dtype)
    y, s = G.gated_steer_fwd(z, u, b, w, c, lam, relu)
    dz, du, db, dw, dc = G.gated_steer_bwd(z, gy, u, b, w, c, lam, relu, need_param)
    exact = _gated_exact(z, u, b, w, c, lam, relu, gy)
    own = _gated_torch_lowp(z, u, b, w, c, lam, relu, gy) if dtype != torch.float32 else [None] * 7
    assert y.dtype == dtype and s.dtype == torch.float32 and dz.dtype == dtype
    _check("y", y, exact[0], own[0])
    _check("s", s, exact[1], own[1])
    _check("dz", dz, exact[2], own[2])
    if not need_param:
        assert du is None and db is None and dw is None and dc is None
        return
    assert dc.shape == (1,)
    for name, got, ex, ow in zip(["du", "db", "dw", "dc"], (du, db, dw, dc), exact[3:], own[3:]):
        assert got.dtype == torch.float32
        _check(name, got, ex, ow)


# T = 37 rows (no multiple of the 8-row tile); at sms = 1 the 4 programs loop over 5 tiles;
# D = 300 takes the 4-row, 512-wide tile
@pytest.mark.parametrize("n_sms", [1, 132])
@pytest.mark.parametrize("T,D", [(37, 40), (9, 300)])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("need_param", [True, False])
def test_gated(sms, n_sms, T, D, relu, need_param):
    sms(n_sms)
    programs = G.backward_programs(T, G.launch_config(D), n_sms)
    if n_sms == 1:
        assert programs < -(-T // G.launch_config(D)["BLOCK_T"])  # a program loops over tiles
    _run_gated(T, D, torch.float32, relu, need_param)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gated_low_precision_rule(sms, dtype):
    sms(1)
    _run_gated(21, 48, dtype, False, True)


def test_gated_empty_and_bad_shapes():
    z = torch.empty(0, 8)
    p = torch.zeros(8)
    y, s = G.gated_steer_fwd(z, p, p, p, torch.zeros(1), 0.5, False)
    dz, du, db, dw, dc = G.gated_steer_bwd(z, z, p, p, p, torch.zeros(1), 0.5, False, True)
    assert y.shape == (0, 8) and s.shape == (0,) and torch.equal(du, p) and dc.shape == (1,)
    with pytest.raises(ValueError, match="w must have shape"):
        G.gated_steer_fwd(torch.zeros(2, 8), p, p, torch.zeros(7), torch.zeros(1), 0.5, False)
    with pytest.raises(ValueError, match="D must be <= 8192"):
        G.gated_steer_fwd(torch.zeros(1, 8200), *[torch.zeros(8200)] * 3, torch.zeros(1), 0.5, False)
