"""The custom ops of kernels/ops.py on their PyTorch path: torch.library.opcheck (schema, fake
tensors, autograd registration, AOT dispatch); outputs and the ops' closed-form gradients
against float64 oracles written here (the op's PyTorch branch *is* the library's reference, so
comparing with ``*_ref`` would compare a function with itself)."""

import pytest
import torch

from lineas_fast.kernels.ops import affine_steer_op, gated_steer_op, rms_norm_shift_op

G = torch.Generator().manual_seed(0)


def rand(*shape, dtype=torch.float64, grad=True):
    return torch.randn(*shape, generator=G, dtype=dtype).requires_grad_(grad)


def affine_oracle(z, u, b, lam, channel_dim):
    """y = z + λ(u⊙z + b) with the coordinates moved last, elementwise in float64."""
    zl = z.double().movedim(channel_dim, -1)
    lam_l = lam.double().movedim(channel_dim, -1) if isinstance(lam, torch.Tensor) else lam
    return (zl + lam_l * (zl * u.double() + b.double())).movedim(-1, channel_dim)


def gated_oracle(z, u, b, w, c, lam, relu):
    """y_t = z_t + λ·g(w·z_t + c)(u⊙z_t + b), the dot product as an explicit sum."""
    zd = z.double()
    logit = (zd * w.double()).sum(-1) + c.double().reshape(())
    gate = (
        torch.where(logit < 0, 0.0, torch.where(logit > 1, 1.0, logit))
        if relu
        else 1 / (1 + torch.exp(-logit))
    )
    s = lam * gate
    return zd + s.unsqueeze(-1) * (zd * u.double() + b.double()), s


def rms_oracle(x, w, c, eps, gemma):
    """RMSNorm with shift from its formula in float64 (Llama: x̂ rounded to x's dtype first)."""
    xd = x.double()
    xhat = xd / torch.sqrt((xd * xd).mean(-1, keepdim=True) + eps)
    if gemma:
        return xhat * (1 + w.double()) + c.double()
    return w.double() * xhat.to(x.dtype).double() + c.double()


AFFINE = [((2, 5, 6), -1, False), ((2, 6, 3, 4), 1, False), ((2, 5, 6), -1, True), ((2, 6, 3, 4), 1, True)]


@pytest.mark.parametrize("shape,cd,token", AFFINE)
def test_affine_op_passes_opcheck_and_matches_a_float64_oracle(shape, cd, token):
    z = rand(*shape)
    d, cdn = shape[cd], cd % len(shape)
    u, b = rand(d), rand(d)
    tok_shape = list(shape)
    tok_shape[cdn] = 1
    lam = rand(*tok_shape) if token else None
    flat = lam.reshape(-1) if token else None
    torch.library.opcheck(affine_steer_op, (z, u, b, flat, 0.7, cdn, False))
    y = affine_steer_op(z, u, b, flat, 0.7, cdn, False)
    ref = affine_oracle(z, u, b, lam if token else 0.7, cdn)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    g = torch.randn(shape, generator=G, dtype=torch.float64)
    leaves = [z, u, b] + ([lam] if token else [])
    ours = torch.autograd.grad(y, leaves, g)
    theirs = torch.autograd.grad(ref, leaves, g)
    for name, a, e in zip(["z", "u", "b", "lam"], ours, theirs):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("relu", [False, True])
def test_gated_op_passes_opcheck_and_matches_a_float64_oracle(relu):
    z, u, b, w = rand(7, 6), rand(6), rand(6), rand(6)
    c = rand(1)
    if relu:  # logits inside (0, 1) and outside, away from the kinks
        w = (w.detach() * 0.2).requires_grad_()
    torch.library.opcheck(gated_steer_op, (z, u, b, w, c, 0.8, relu, False))
    y, s = gated_steer_op(z, u, b, w, c, 0.8, relu, False)
    ref, s_ref = gated_oracle(z, u, b, w, c, 0.8, relu)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(s.double(), s_ref, rtol=1e-6, atol=1e-7)
    g = torch.randn(7, 6, generator=G, dtype=torch.float64)
    for name, a, e in zip(
        "zubwc", torch.autograd.grad(y, [z, u, b, w, c], g), torch.autograd.grad(ref, [z, u, b, w, c], g)
    ):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=name)


def test_gated_op_without_parameter_gradients():
    z, u, b, w, c = (
        rand(4, 5),
        rand(5, grad=False),
        rand(5, grad=False),
        rand(5, grad=False),
        rand(1, grad=False),
    )
    y, _ = gated_steer_op(z, u, b, w, c, 0.5, False, False)
    ref, _ = gated_oracle(z, u, b, w, c, 0.5, False)
    g = torch.randn(4, 5, generator=G, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad(y, z, g)[0], torch.autograd.grad(ref, z, g)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_affine_keeps_the_activation_dtype(dtype):
    z = torch.randn(3, 4, 8, generator=G).to(dtype).requires_grad_()
    u, b = rand(8, dtype=torch.float32), rand(8, dtype=torch.float32)
    y = affine_steer_op(z, u, b, None, 0.5, 2, False)
    assert y.dtype == dtype
    dz, du = torch.autograd.grad(y.float().sum(), [z, u])
    assert dz.dtype == dtype and du.dtype == torch.float32


def test_rms_norm_shift_op():
    x, w, c = rand(3, 8, grad=False), rand(8, grad=False), rand(8, grad=False)
    torch.library.opcheck(
        rms_norm_shift_op,
        (x.float(), w.float(), c.float(), 1e-6, False, False),
        test_utils=("test_schema", "test_faketensor"),
    )
    for dtype in (torch.float32, torch.bfloat16):
        xs, ws, cs = x.to(dtype), w.float(), c.float()
        for gemma in (False, True):
            got = rms_norm_shift_op(xs, ws, cs, 1e-6, gemma, False)
            assert got.dtype == dtype
            want = rms_oracle(xs, ws, cs, 1e-6, gemma)
            # the op computes in float32 and rounds once to x's dtype
            tol = 1e-5 if dtype == torch.float32 else 2**-7
            torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())
