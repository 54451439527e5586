"""DSAS gated steering on channel-first maps (UNet features (B, C, H, W), ``channel_dim=1``):
the gate is computed per pixel on its C-vector. Against a float64 closed form written with the
channel axis where it is (no axis moved), outputs, strengths and every gradient."""

import pytest
import torch

import lineas_fast as lf
from lineas_fast.functional import apply_gated, map_coefficients


def closed_form(z, om, b, w, c, lam, gate, inverse, cd):
    """y and the per-pixel strength λ·g, the channel axis left at ``cd``."""
    shape = [1] * z.ndim
    shape[cd] = -1
    om, b, w = om.view(shape), b.view(shape), w.view(shape)
    logit = (z * w).sum(cd, keepdim=True) + c.reshape(())
    g = torch.sigmoid(logit) if gate == "sigmoid" else logit.clamp(0.0, 1.0)
    t = (z - b) / om if inverse else om * z + b
    strength = lam * g
    return z + strength * (t - z), strength.squeeze(cd)


CASES = [((2, 6, 3, 4), 1), ((1, 5, 1, 1), 1), ((2, 6, 3, 4), -3), ((3, 7, 5), 1), ((2, 3, 4, 5, 2), 2)]


@pytest.mark.parametrize("shape,cd", CASES)
@pytest.mark.parametrize("gate", ["sigmoid", "relu"])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("backend", [None, "torch"])
def test_channel_first_outputs_strengths_and_gradients(shape, cd, gate, inverse, backend):
    gen = torch.Generator().manual_seed(len(shape) * 10 + cd)
    d = shape[cd]
    z = torch.randn(*shape, generator=gen).requires_grad_()
    om = (torch.rand(d, generator=gen) + 0.5).requires_grad_()
    b = torch.randn(d, generator=gen).requires_grad_()
    w = (torch.randn(d, generator=gen) * 1.5 / d**0.5).requires_grad_()  # relu: both regions
    c = torch.tensor([0.4], requires_grad=True)
    y, s = lf.gated_steer(
        z, om, b, w, c, 0.8, gate, inverse, return_strengths=True, channel_dim=cd, backend=backend
    )
    tok_shape = tuple(k for i, k in enumerate(shape) if i != cd % len(shape))
    assert y.shape == z.shape and y.dtype == z.dtype and y.is_contiguous()
    assert s.shape == tok_shape and s.dtype == torch.float32
    gy = torch.randn(*shape, generator=gen)
    grads = torch.autograd.grad(y, [z, om, b, w, c], gy)

    leaves = [t.detach().double().requires_grad_() for t in (z, om, b, w, c)]
    ref, ref_s = closed_form(*leaves, 0.8, gate, inverse, cd % len(shape))
    ref_grads = torch.autograd.grad(ref, leaves, gy.double())
    scale = max(1.0, ref.abs().max().item())
    assert (y.detach().double() - ref).abs().max().item() <= 1e-5 * scale
    assert (s.double() - ref_s).abs().max().item() <= 1e-6
    if gate == "relu" and ref_s.numel() >= 12:  # the data reach the clamped and the linear part
        assert (ref_s == 0).any() or (ref_s == 0.8).any()
        assert ((ref_s > 0) & (ref_s < 0.8)).any()
    for name, a, r in zip(["z", "omega", "bias", "gate_w", "gate_c"], grads, ref_grads):
        assert a.shape == r.shape, name
        assert (a.double() - r).abs().max().item() <= 1e-4 * max(1.0, r.abs().max().item()), name


def test_channel_first_equals_channel_last_on_the_moved_tensor():
    """Same pixels, same gate: the channel-first call is the channel-last call on z moved."""
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(2, 8, 5, 3, generator=gen)
    om, b = torch.rand(8, generator=gen) + 0.5, torch.randn(8, generator=gen)
    w, c = torch.randn(8, generator=gen), torch.tensor(-0.2)
    y_cf, s_cf = lf.gated_steer(z, om, b, w, c, 0.6, return_strengths=True, channel_dim=1)
    y_cl, s_cl = lf.gated_steer(z.permute(0, 2, 3, 1), om, b, w, c, 0.6, return_strengths=True)
    assert torch.allclose(y_cf, y_cl.permute(0, 3, 1, 2), atol=1e-6)
    assert torch.allclose(s_cf, s_cl, atol=1e-7)
    assert not torch.allclose(y_cf, z, atol=1e-3)  # the map did something


def test_gradcheck_float64_channel_first():
    gen = torch.Generator().manual_seed(1)
    args = [
        torch.randn(2, 4, 3, 2, dtype=torch.float64, generator=gen).requires_grad_(),
        (torch.rand(4, dtype=torch.float64, generator=gen) + 0.5).requires_grad_(),
        torch.randn(4, dtype=torch.float64, generator=gen).requires_grad_(),
        torch.randn(4, dtype=torch.float64, generator=gen).requires_grad_(),
        torch.randn(1, dtype=torch.float64, generator=gen).requires_grad_(),
    ]
    assert torch.autograd.gradcheck(
        lambda *a: lf.gated_steer(*a, strength=0.7, channel_dim=1, backend="torch"), args
    )


def test_apply_gated_channel_first_no_host_sync():
    """The hooks' entry point runs on meta tensors (no .item(), no bool(tensor), no checks)."""
    u, b, w = (torch.empty(6, device="meta") for _ in range(3))
    c = torch.empty(1, device="meta")
    z = torch.empty(2, 6, 4, 4, device="meta")
    y, s = apply_gated(z, u, b, w, c, 0.5, True, channel_dim=1, backend="torch")
    assert y.shape == z.shape and s.shape == (2, 4, 4) and y.device.type == "meta"


def test_apply_gated_matches_gated_steer_with_precomputed_coefficients():
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(3, 6, 2, 2, generator=gen)
    om, b = torch.rand(6, generator=gen) + 0.5, torch.randn(6, generator=gen)
    w, c = torch.randn(6, generator=gen), torch.tensor([0.1])
    u, bb = map_coefficients(om, b, inverse=True)
    y, s = apply_gated(z, u, bb, w, c, 0.9, False, channel_dim=1)
    ref, ref_s = closed_form(
        z.double(), om.double(), b.double(), w.double(), c.double(), 0.9, "sigmoid", True, 1
    )
    assert torch.allclose(y.double(), ref, atol=1e-5) and torch.allclose(s.double(), ref_s, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(channel_dim=4), ValueError, "out of range"),
        (dict(channel_dim=2), ValueError, r"gate_w must have shape \(3,\)|omega must have shape \(3,\)"),
    ],
)
def test_bad_channel_dim(kwargs, exc, match):
    z = torch.randn(2, 6, 3, 3)
    with pytest.raises(exc, match=match):
        lf.gated_steer(z, torch.ones(6), torch.zeros(6), torch.zeros(6), torch.zeros(1), **kwargs)
