"""The Triton kernels themselves, run by Triton's CPU interpreter at tiny shapes
(TRITON_INTERPRET=1; the interpreter is slow)."""
import pytest
import torch

import lineas_fast as lf
from kernel_checks import check_affine, check_loss_and_grad, check_low_precision_rule
from lineas_fast.kernels import wasserstein

TRITON = "triton"


@pytest.mark.parametrize("n,m,dims", [(1, 1, [1]), (1, 4, [3]), (2, 2, [7]), (3, 5, [7, 1]),
                                      (31, 33, [5]), (33, 31, [2, 3]), (100, 37, [2])])
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
    base = torch.randn(5, 9, requires_grad=True)
    y = torch.randn(6, 5)
    k = lf.sliced_wasserstein(base.t(), y, backend=TRITON)
    r = lf.sliced_wasserstein(base.t(), y, backend="torch")
    gk, = torch.autograd.grad(k, base)
    gr, = torch.autograd.grad(r, base)
    assert torch.allclose(k, r, rtol=1e-6) and torch.allclose(gk, gr, atol=1e-6)
    x = torch.randn(4, 2)
    x[1, 0] = float("nan")
    assert torch.isnan(lf.sliced_wasserstein(x, torch.randn(4, 2), backend=TRITON))


def test_wasserstein_above_kernel_limit_falls_back():
    x = torch.randn(wasserstein.MAX_N + 1, 1, requires_grad=True)
    y = torch.randn(50, 1)
    loss = lf.sliced_wasserstein(x, y, backend=TRITON)
    assert torch.allclose(loss, lf.sliced_wasserstein(x, y, backend="torch"))


@pytest.mark.parametrize("shape,cd", [((1, 1, 1023), -1), ((3, 7, 33), -1), ((2, 3, 3, 5), 1),
                                      ((1, 70, 2, 40), 1)])
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
    gz, = torch.autograd.grad(y.sum(), z)
    assert torch.allclose(gz, (1 + 0.5 * (om - 1)).expand_as(z))
    assert torch.equal(lf.affine_steer(z, om, b, 0.0, backend=TRITON), z)


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 33), (1, 1023)])
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_shift_kernel(shape, gemma, dtype):
    from lineas_fast.kernels.rms_norm_shift import rms_norm_shift_triton
    from lineas_fast.kernels.rms_norm_shift_ref import rms_norm_shift_ref
    gen = torch.Generator().manual_seed(0)
    d = shape[-1]
    x = (torch.randn(*shape, generator=gen) * 3).to(dtype)
    w, c = torch.randn(d, generator=gen), torch.randn(d, generator=gen)
    got = rms_norm_shift_triton(x, w, c, 1e-6, gemma)
    ref = rms_norm_shift_ref(x, w, c, 1e-6, gemma)
    exact = rms_norm_shift_ref(x.double(), w.double(), c.double(), 1e-6, gemma)
    assert got.dtype == dtype and got.shape == x.shape
    # flash-attention's rule against the float64 computation on the same input. Triton's
    # interpreter truncates float32 -> bfloat16 where the compiled kernel rounds to nearest
    # (cvt.rn.bf16.f32 in its PTX), so allow that one extra ulp here.
    ulp = torch.finfo(dtype).eps * exact.abs() if dtype != torch.float32 else 0
    assert ((got.double() - exact).abs() - ulp).max() <= 2 * (ref.double() - exact).abs().max() + 1e-5


def test_steered_rms_norm_module_uses_kernel_without_grad():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    norm = LlamaRMSNorm(16)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(16) + 0.5)
    a, c = torch.rand(16, dtype=torch.float64) + 0.5, torch.randn(16, dtype=torch.float64)
    mod = lf.SteeredRMSNorm(norm, a, c, backend=TRITON)
    x = torch.randn(3, 4, 16)
    expected = a.float() * norm(x) + c.float()
    with torch.no_grad():
        assert torch.allclose(mod(x), expected, atol=1e-5)
    xg = x.clone().requires_grad_()
    mod(xg).sum().backward()                    # the PyTorch path carries the gradient
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


@pytest.mark.parametrize("shape", [(1, 1), (2, 3, 5), (4, 33), (1, 300)])
@pytest.mark.parametrize("gate", ["sigmoid", "relu"])
@pytest.mark.parametrize("inverse", [False, True])
def test_gated_kernel(shape, gate, inverse):
    from kernel_checks import check_gated
    check_gated(shape, gate, inverse, backend=TRITON)


def test_gated_kernel_low_precision():
    from kernel_checks import check_gated
    check_gated((3, 40), "sigmoid", False, backend=TRITON, dtype=torch.bfloat16)
