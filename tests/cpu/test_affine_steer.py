import pytest
import torch
from kernel_checks import check_affine

import lineas_fast as lf

SHAPES = [((1, 1, 1023), -1), ((3, 7, 256), -1), ((5, 3), -1), ((2, 4, 3, 5), 1), ((1, 3, 1, 1), 1)]


@pytest.mark.parametrize("shape,cd", SHAPES)
@pytest.mark.parametrize("strength_kind", ["float", "tensor"])
@pytest.mark.parametrize("inverse", [False, True])
def test_outputs_and_every_gradient(shape, cd, strength_kind, inverse):
    check_affine(shape, cd, strength_kind, inverse, backend="torch")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_activations_fp32_params(dtype):
    check_affine((3, 7, 64), -1, "tensor", False, backend="torch", dtype=dtype)
    torch.manual_seed(0)
    z32, om, b = torch.randn(4, 9, 32), torch.rand(32) + 0.5, torch.randn(32)
    exact = z32.double() * (1 - 0.8 + 0.8 * om.double()) + 0.8 * b.double()
    ours = lf.affine_steer(z32.to(dtype), om, b, 0.8, backend="torch").double()
    torch_own = (z32.to(dtype) + 0.8 * ((om.to(dtype) - 1) * z32.to(dtype) + b.to(dtype))).double()
    assert (ours - exact).abs().max() <= 2 * (torch_own - exact).abs().max()


def test_gradcheck_float64():
    torch.manual_seed(0)
    z = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    om = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    s = torch.rand(2, 3, dtype=torch.float64, requires_grad=True)
    for inv in (False, True):
        assert torch.autograd.gradcheck(
            lambda *a: lf.affine_steer(*a, inverse=inv, backend="torch"), (z, om, b, s)
        )


def test_strength_zero_is_bit_identical_and_inverse_undoes_map():
    torch.manual_seed(0)
    z = torch.randn(3, 5, 16).bfloat16()
    om, b = torch.rand(16) + 0.5, torch.randn(16)
    assert torch.equal(lf.affine_steer(z, om, b, 0.0), z)
    z32 = z.float()
    back = lf.affine_steer(lf.affine_steer(z32, om, b), om, b, inverse=True)
    assert torch.allclose(back, z32, atol=1e-5)


def test_per_sentence_strength_left_aligned():
    z = torch.randn(2, 3, 4)
    om, b = torch.full((4,), 2.0), torch.zeros(4)
    y = lf.affine_steer(z, om, b, torch.tensor([0.0, 1.0]))
    assert torch.equal(y[0], z[0]) and torch.allclose(y[1], 2 * z[1])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(omega=torch.ones(3)), r"omega must have shape \(4,\)"),
        (dict(bias=torch.zeros(4, 1)), r"bias must have shape \(4,\)"),
        (dict(strength=torch.ones(2, 5)), "does not broadcast"),
        (dict(strength=torch.ones(2, 3, 4)), "size 1 at channel_dim"),
        (dict(strength=torch.ones(2, 3, 1, 1)), "too many axes"),
        (dict(channel_dim=3), "out of range"),
        (dict(omega=torch.tensor([1.0, 0.0, 2.0, 1.0]), inverse=True), r"omega is 0 at coordinates \[1\]"),
        (dict(bias=torch.zeros(4, device="meta")), "one device"),
    ],
)
def test_bad_input(kwargs, match):
    args = dict(z=torch.randn(2, 3, 4), omega=torch.ones(4), bias=torch.zeros(4))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        lf.affine_steer(**args)


def test_integer_activations_rejected():
    with pytest.raises(TypeError, match="floating-point"):
        lf.affine_steer(torch.ones(2, 4, dtype=torch.long), torch.ones(4), torch.zeros(4))


@pytest.mark.parametrize("shape,cd", [((3, 5, 8), -1), ((2, 8, 3, 4), -3), ((2, 8, 3, 4), 1)])
@pytest.mark.parametrize("inverse", [False, True])
def test_apply_affine_with_precomputed_coefficients(shape, cd, inverse):
    """The hooks' entry point: coefficients from ``map_coefficients`` once, then a plain call
    (channel_dim may be negative) matches the float64 closed form, float and per-token λ."""
    from kernel_checks import closed_form_steer

    from lineas_fast.functional import apply_affine, map_coefficients, token_strength

    gen = torch.Generator().manual_seed(2)
    cdp = cd % len(shape)
    d = shape[cdp]
    z = torch.randn(*shape, generator=gen)
    om, b = torch.rand(d, generator=gen) + 0.5, torch.randn(d, generator=gen)
    u, bb = map_coefficients(om, b, inverse)
    y = apply_affine(z, u, bb, 0.6, cd)
    ref = closed_form_steer(z, om, b, torch.tensor(0.6, dtype=torch.float64), inverse, cdp)
    assert y.shape == z.shape and torch.allclose(y.double(), ref, atol=1e-5)
    s = torch.rand(shape[0], generator=gen)
    lam = token_strength(s, z.shape, cdp)
    y = apply_affine(z, u, bb, lam, cd)
    ref = closed_form_steer(z, om, b, lam.double(), inverse, cdp)
    assert torch.allclose(y.double(), ref, atol=1e-5)


def test_apply_affine_no_host_sync():
    """No .item(), no bool(tensor), no checks: it runs on meta tensors, which have no values."""
    from lineas_fast.functional import apply_affine

    u, b = torch.empty(8, device="meta"), torch.empty(8, device="meta")
    z = torch.empty(2, 8, 3, 3, device="meta")
    assert apply_affine(z, u, b, 0.5, 1, backend="torch").shape == z.shape
    lam = torch.empty(2, 1, 3, 3, device="meta")
    assert apply_affine(z, u, b, lam, -3).device.type == "meta"
