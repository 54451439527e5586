"""The Triton kernels themselves, run by Triton's CPU interpreter at tiny shapes
(TRITON_INTERPRET=1; the interpreter is slow)."""

import pytest
import torch
from kernel_checks import (
    check_affine,
    check_loss_and_grad,
    check_low_precision_rule,
    check_rms_norm_shift,
    expected_grad,
    expected_loss,
)

import lineas_fast as lf
from lineas_fast.kernels import wasserstein

TRITON = "triton"


@pytest.mark.parametrize(
    "n,m,dims",
    [(1, 1, [1]), (1, 4, [3]), (2, 2, [7]), (3, 5, [7, 1]), (31, 33, [5]), (33, 31, [2, 3]), (100, 37, [2])],
)
@pytest.mark.parametrize("reduction", ["reference", "sum"])
def test_wasserstein_kernel(n, m, dims, reduction):
    check_loss_and_grad(n, m, dims, reduction, backend=TRITON)


def test_wasserstein_kernel_wide_d():
    check_loss_and_grad(3, 4, [1023], "reference", backend=TRITON)


def test_wasserstein_kernel_ties():
    check_loss_and_grad(17, 9, [4], "sum", backend=TRITON, ties=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_wasserstein_kernel_low_precision(dtype):
    check_loss_and_grad(9, 12, [3, 2], "reference", backend=TRITON, dtype=dtype)
    check_low_precision_rule(dtype, backend=TRITON, n=16, d=32)


def test_wasserstein_kernel_non_contiguous_and_nan():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(5, 9, generator=gen, requires_grad=True)
    x, y = base.t(), torch.randn(6, 5, generator=gen)  # x (9, 5), strides (1, 9)
    loss = lf.sliced_wasserstein(x, y, backend=TRITON)
    (g,) = torch.autograd.grad(loss, base)
    exact, _ = expected_loss([x.detach()], [y], "reference")
    assert loss.item() == pytest.approx(exact, rel=1e-5)
    torch.testing.assert_close(g.double(), expected_grad(x, y, "reference", 1).t(), rtol=1e-5, atol=1e-6)
    x = torch.randn(4, 2, generator=gen)
    x[1, 0] = float("nan")
    assert torch.isnan(lf.sliced_wasserstein(x, torch.randn(4, 2), backend=TRITON))


@pytest.mark.parametrize("n", [wasserstein.MAX_N, wasserstein.MAX_N + 1])
def test_wasserstein_kernel_limit(n, kernel_launches):
    """At MAX_N the kernel runs, above it the PyTorch path; both exact vs the float64 oracle."""
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, 2, generator=gen, requires_grad=True)
    y = torch.randn(50, 2, generator=gen) + 0.5
    loss = lf.sliced_wasserstein(x, y, "sum", backend=TRITON)
    (g,) = torch.autograd.grad(loss, x)
    assert kernel_launches["_wasserstein_fwd_kernel"] == (1 if n <= wasserstein.MAX_N else 0)
    exact, _ = expected_loss([x.detach()], [y], "sum")
    assert loss.item() == pytest.approx(exact, rel=1e-5)
    ref = expected_grad(x, y, "sum", 1)
    assert (g.double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


@pytest.mark.parametrize(
    "shape,cd", [((1, 1, 1023), -1), ((3, 7, 33), -1), ((2, 3, 3, 5), 1), ((1, 70, 2, 40), 1)]
)
@pytest.mark.parametrize("strength_kind", ["float", "tensor"])
@pytest.mark.parametrize("inverse", [False, True])
def test_affine_kernel(shape, cd, strength_kind, inverse):
    check_affine(shape, cd, strength_kind, inverse, backend=TRITON)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_affine_kernel_low_precision(dtype):
    check_affine((2, 5, 40), -1, "tensor", False, backend=TRITON, dtype=dtype)


def test_affine_kernel_frozen_params_and_strength_zero():
    z = torch.randn(2, 3, 8, requires_grad=True)
    om, b = torch.rand(8) + 0.5, torch.randn(8)
    y = lf.affine_steer(z, om, b, 0.5, backend=TRITON)
    (gz,) = torch.autograd.grad(y.sum(), z)
    assert torch.allclose(gz, (1 + 0.5 * (om - 1)).expand_as(z))
    assert torch.equal(lf.affine_steer(z, om, b, 0.0, backend=TRITON), z)


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 33), (1, 1023)])
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_shift_kernel(shape, gemma, dtype):
    check_rms_norm_shift(shape, gemma, dtype, interpreted=True)


def test_steered_rms_norm_module_uses_kernel_without_grad(kernel_launches):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(16)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(16) + 0.5)
    a, c = torch.rand(16, dtype=torch.float64) + 0.5, torch.randn(16, dtype=torch.float64)
    mod = lf.SteeredRMSNorm(norm, a, c, backend=TRITON, model_type="llama")
    x = torch.randn(3, 4, 16)
    expected = a.float() * norm(x) + c.float()
    with torch.no_grad():
        assert torch.allclose(mod(x), expected, atol=1e-5)
    assert kernel_launches["_rms_norm_shift_fwd_kernel"] == 1  # the fused kernel ran
    xg = x.clone().requires_grad_()
    y = mod(xg)
    assert kernel_launches["_rms_norm_shift_fwd_kernel"] == 1  # PyTorch carries the gradient
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, xg, g)
    x64 = x.double().requires_grad_()
    w64 = norm.weight.detach().double()
    y64 = a * w64 * (x64 * torch.rsqrt((x64**2).mean(-1, keepdim=True) + norm.variance_epsilon)) + c
    (gx64,) = torch.autograd.grad(y64, x64, g.double())
    torch.testing.assert_close(gx.double(), gx64, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 1), (2, 3, 5), (4, 33), (1, 300)])
@pytest.mark.parametrize("gate", ["sigmoid", "relu"])
@pytest.mark.parametrize("inverse", [False, True])
def test_gated_kernel(shape, gate, inverse):
    from kernel_checks import check_gated

    check_gated(shape, gate, inverse, backend=TRITON)


def test_gated_kernel_low_precision():
    from kernel_checks import check_gated

    check_gated((3, 40), "sigmoid", False, backend=TRITON, dtype=torch.bfloat16)
