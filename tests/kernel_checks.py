"""Checks shared by the CPU lane (PyTorch path) and the TRITON_INTERPRET=1 lane (Triton path):
every output and every gradient of each op against an independent float64 computation."""
from __future__ import annotations

import numpy as np
import torch

import lineas_fast as lf


def ot_w2_squared(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Independent exact 1-D W2² per column: merge both sets of quantile breakpoints, on each
    piece both quantile functions are constant."""
    n, m = x.shape[0], y.shape[0]
    xs, ys = np.sort(x, 0), np.sort(y, 0)
    cuts = np.unique(np.concatenate([np.arange(n + 1) / n, np.arange(m + 1) / m]))
    mid, width = (cuts[:-1] + cuts[1:]) / 2, np.diff(cuts)
    ix = np.minimum((mid * n).astype(int), n - 1)
    iy = np.minimum((mid * m).astype(int), m - 1)
    return ((xs[ix] - ys[iy]) ** 2 * width[:, None]).sum(0)


def expected_loss(xs, ys, reduction):
    per_layer = []
    for x, y in zip(xs, ys):
        w2 = ot_w2_squared(x.double().numpy(), y.double().numpy())
        per_layer.append(x.shape[0] * w2.mean() if reduction == "reference" else w2.sum())
    per_layer = np.array(per_layer)
    return (per_layer.mean() if reduction == "reference" else per_layer.sum()), per_layer


def expected_grad(x, y, reduction, n_layers):
    """(2/n)(x − ḡ_rank) times the reduction's weight, from a float64 profile."""
    n, d = x.shape
    prof = lf.TargetProfile(y.double(), n)
    xd = x.detach().double()
    order = torch.sort(xd, dim=0, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(0, order, torch.arange(n)[:, None].expand(n, d).contiguous())
    g = torch.gather(prof.mean.double(), 0, ranks)
    scale = 2.0 / (n_layers * d) if reduction == "reference" else 2.0 / n
    return scale * (xd - g)


def check_loss_and_grad(n, m, dims, reduction, backend, dtype=torch.float32, seed=0, ties=False,
                        device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, d, generator=gen) for d in dims]
    ys = [torch.randn(m, d, generator=gen) * 1.5 + 0.3 for d in dims]
    if ties:
        xs = [torch.round(x * 2) / 2 for x in xs]
        ys = [torch.round(y * 2) / 2 for y in ys]
    xs = [x.to(device, dtype).requires_grad_() for x in xs]
    loss, per_layer = lf.sliced_wasserstein(xs, [y.to(device) for y in ys], reduction,
                                            return_per_layer=True, backend=backend)
    grads = [g.cpu() for g in torch.autograd.grad(loss, xs)]
    xs, loss, per_layer = [x.detach().cpu() for x in xs], loss.cpu(), per_layer.cpu()
    exact, exact_layers = expected_loss([x.detach().float() for x in xs], ys, reduction)
    tol = 1e-5 if dtype == torch.float32 else 1e-4   # inputs rounded to dtype, math in fp32
    assert loss.dtype == torch.float32
    assert abs(loss.item() - exact) <= tol * max(1.0, abs(exact)), (loss.item(), exact)
    np.testing.assert_allclose(per_layer.numpy(), exact_layers, rtol=tol, atol=tol)
    gtol = 1e-5 if dtype == torch.float32 else 2e-2  # gradient stored in the input dtype
    for x, y, g in zip(xs, ys, grads):
        assert g.dtype == dtype and g.shape == x.shape
        ref = expected_grad(x.float(), y, reduction, len(dims))
        err = (g.double() - ref).abs().max().item()
        assert err <= gtol * max(1e-3, ref.abs().max().item()), err


def check_low_precision_rule(dtype, backend, n=32, d=64):
    """flash-attention's rule, per column and for the gradient: the error vs the fp32
    reference is at most 2× PyTorch's own error computing the same in ``dtype`` (plus one
    rounding of the result to ``dtype`` for the gradient, which is stored in that dtype)."""
    from lineas_fast.kernels._backend import use_triton
    from lineas_fast.kernels.wasserstein import wasserstein_columns
    from lineas_fast.kernels.wasserstein_ref import wasserstein_columns_naive
    gen = torch.Generator().manual_seed(1)
    x32, y32 = torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen)
    prof = lf.TargetProfile(y32, n)
    w = torch.full((d,), 1.0 / d)

    def cols_and_grad(fn, x):
        x = x.detach().requires_grad_()
        cols = fn(x)
        grad, = torch.autograd.grad(cols.sum(), x)
        return cols.double(), grad.double()

    exact, _ = cols_and_grad(lambda x: wasserstein_columns(x, prof.mean, prof.var, w, False), x32)
    # The gradient is discontinuous where rounding creates ties, so its fp32 reference is
    # taken at the rounded input (same tie order), not at the original.
    _, exact_g = cols_and_grad(lambda x: wasserstein_columns(x, prof.mean, prof.var, w, False),
                               x32.to(dtype).float())
    ours, ours_g = cols_and_grad(lambda x: wasserstein_columns(
        x, prof.mean, prof.var, w, use_triton(x.device, backend)), x32.to(dtype))
    own, own_g = cols_and_grad(lambda x: wasserstein_columns_naive(x, y32, w), x32.to(dtype))
    assert (ours - exact).abs().max() <= 2 * (own - exact).abs().max()
    one_rounding = torch.finfo(dtype).eps * exact_g.abs().max()
    assert (ours_g - exact_g).abs().max() <= 2 * (own_g - exact_g).abs().max() + one_rounding


def closed_form_steer(z, omega, bias, lam, inverse, channel_dim):
    """a⊙z + c in float64 (SPEC §3), lam shaped like z with size 1 at channel_dim."""
    shape = [1] * z.ndim
    shape[channel_dim] = -1
    om, b = omega.double().view(shape), bias.double().view(shape)
    t = (z.double() - b) / om if inverse else om * z.double() + b
    return z.double() + lam * (t - z.double())


def check_affine(shape, channel_dim, strength_kind, inverse, backend, dtype=torch.float32, seed=0,
                 device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    cd = channel_dim % len(shape)
    d = shape[cd]
    z = torch.randn(*shape, generator=gen).to(device, dtype).requires_grad_()
    omega = (torch.rand(d, generator=gen) + 0.5).to(device).requires_grad_()
    bias = torch.randn(d, generator=gen).to(device).requires_grad_()
    tok_shape = [s for i, s in enumerate(shape) if i != cd]
    if strength_kind == "float":
        strength, lam = 0.7, torch.tensor(0.7, dtype=torch.float64)
    else:
        strength = torch.rand(*tok_shape, generator=gen).to(device).requires_grad_()
        lam = strength.detach().cpu().double().unsqueeze(cd)
    y = lf.affine_steer(z, omega, bias, strength, inverse=inverse, channel_dim=channel_dim,
                        backend=backend)
    assert y.shape == z.shape and y.dtype == dtype
    ref = closed_form_steer(z.detach().cpu(), omega.detach().cpu(), bias.detach().cpu(), lam,
                            inverse, cd)
    otol = 1e-5 if dtype == torch.float32 else 1e-2
    assert (y.detach().cpu().double() - ref).abs().max().item() <= otol * max(1.0, ref.abs().max().item())
    # every gradient against autograd through the float64 closed form
    g = torch.randn(*shape, generator=gen)
    inputs = [z, omega, bias] + ([strength] if strength_kind == "tensor" else [])
    grads = [t.cpu() for t in torch.autograd.grad(y, inputs, g.to(device, dtype))]
    z64 = z.detach().cpu().double().requires_grad_()
    om64 = omega.detach().cpu().double().requires_grad_()
    b64 = bias.detach().cpu().double().requires_grad_()
    extra = []
    if strength_kind == "tensor":
        s64 = strength.detach().cpu().double().requires_grad_()
        lam64, extra = s64.unsqueeze(cd), [s64]
    else:
        lam64 = lam
    ref64 = closed_form_steer(z64, om64, b64, lam64, inverse, cd)
    ref_grads = torch.autograd.grad(ref64, [z64, om64, b64] + extra, g.to(dtype).double())
    gtol = 1e-4 if dtype == torch.float32 else 3e-2
    for name, a, b in zip(["z", "omega", "bias", "strength"], grads, ref_grads):
        assert a.shape == b.shape, name
        scale = max(1.0, b.abs().max().item())
        assert (a.double() - b).abs().max().item() <= gtol * scale, name


def check_gated(shape, gate, inverse, backend, dtype=torch.float32, seed=0, device="cpu"):
    """Gated steering against autograd through a float64 closed form: y and the per-token
    strength, and the gradients of z, ω, b, w and c."""
    from lineas_fast.kernels.gated_steer_ref import gate_fn
    gen = torch.Generator().manual_seed(seed)
    d = shape[-1]
    mk = lambda t: t.to(device).requires_grad_()
    z = (torch.randn(*shape, generator=gen)).to(device, dtype).requires_grad_()
    om = mk(torch.rand(d, generator=gen) + 0.5)
    b = mk(torch.randn(d, generator=gen))
    w = mk(torch.randn(d, generator=gen) / d ** 0.5)
    c = mk(torch.tensor([0.2]))
    y, s = lf.gated_steer(z, om, b, w, c, 0.8, gate, inverse, return_strengths=True,
                          backend=backend)
    g = torch.randn(*shape, generator=gen).to(device, dtype)
    grads = [t.cpu().double() for t in torch.autograd.grad(y, [z, om, b, w, c], g)]
    leaves = [t.detach().cpu().double().requires_grad_() for t in (z, om, b, w, c)]
    z64, om64, b64, w64, c64 = leaves
    lam = 0.8 * gate_fn(z64 @ w64 + c64, gate)
    t = (z64 - b64) / om64 if inverse else om64 * z64 + b64
    ref = z64 + lam.unsqueeze(-1) * (t - z64)
    ref_grads = torch.autograd.grad(ref, leaves, g.cpu().double())
    otol, gtol = (1e-5, 1e-4) if dtype == torch.float32 else (1e-2, 5e-2)
    scale = max(1.0, ref.abs().max().item())
    assert (y.detach().cpu().double() - ref).abs().max().item() <= otol * scale
    assert (s.cpu().double() - lam.detach()).abs().max().item() <= otol
    for name, a, r in zip(["z", "omega", "bias", "gate_w", "gate_c"], grads, ref_grads):
        assert (a - r).abs().max().item() <= gtol * max(1.0, r.abs().max().item()), name
