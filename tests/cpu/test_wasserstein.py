import math

import numpy as np
import pytest
import torch
from kernel_checks import (
    check_loss_and_grad,
    check_low_precision_rule,
    expected_grad,
    expected_loss,
    ot_w2_squared,
    ot_w2_squared_torch,
)

import lineas_fast as lf


def test_hand_computed_unequal_sizes():
    """x = {0, 1}, y = {0, 1, 2}: on [0,1/3) 0 vs 0, [1/3,1/2) 0 vs 1, [1/2,2/3) 1 vs 1,
    [2/3,1) 1 vs 2, so W2² = 1/6 + 1/3 = 1/2; ∂/∂x = (2/n)(x − ḡ) with ḡ = (1/3, 5/3)."""
    x = torch.tensor([[0.0], [1.0]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[2.0], [0.0], [1.0]], dtype=torch.float64)
    loss = lf.sliced_wasserstein(x, y, "sum")
    (g,) = torch.autograd.grad(loss, x)
    # the profile is stored in float32 (SPEC: the loss is float32): one float32 rounding
    assert loss.item() == pytest.approx(0.5, abs=1e-6)
    assert g.flatten().tolist() == pytest.approx([-1 / 3, -2 / 3], abs=1e-6)
    assert ot_w2_squared(x.detach().numpy(), y.numpy())[0] == pytest.approx(0.5, abs=1e-12)
    g_oracle = expected_grad(x, y, "sum", 1)
    assert g_oracle.flatten().tolist() == pytest.approx([-1 / 3, -2 / 3], abs=1e-12)
    # reference reduction: n · W2² (one layer, one coordinate), its gradient scaled alike
    assert lf.sliced_wasserstein(x, y).item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("n,m", [(1, 4), (4, 1), (3, 7), (12, 8), (9, 9)])
def test_oracles_agree(n, m):
    """The two test oracles (numpy, torch) agree, and the torch one's autograd gradient is the
    finite-difference gradient (at untied points)."""
    gen = torch.Generator().manual_seed(n * 100 + m)
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(m, 3, generator=gen, dtype=torch.float64)
    np.testing.assert_allclose(
        ot_w2_squared_torch(x, y).numpy(), ot_w2_squared(x.numpy(), y.numpy()), rtol=1e-12, atol=1e-14
    )
    assert torch.autograd.gradcheck(lambda t: ot_w2_squared_torch(t, y), (x.requires_grad_(),))


def test_profile_matches_cell_means():
    """TargetProfile's ḡ (mean of the target quantile function over each source cell) and its
    variance there, against a per-cell accumulation over a fine exact grid of [0, 1]."""
    gen = torch.Generator().manual_seed(5)
    n, m = 6, 10
    y = torch.randn(m, 3, generator=gen, dtype=torch.float64)
    prof = lf.TargetProfile(y, n)
    ys = np.sort(y.numpy(), 0)
    g, q = np.zeros((n, 3)), np.zeros((n, 3))
    steps = n * m * 4  # every cell edge lies on this grid
    for s in range(steps):
        t = (s + 0.5) / steps
        i, k = int(t * n), int(t * m)
        g[i] += ys[k] / steps * n
        q[i] += ys[k] ** 2 / steps * n
    np.testing.assert_allclose(prof.mean.numpy(), g, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(prof.var.numpy(), q - g * g, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 3, 31, 33, 100])
@pytest.mark.parametrize("d", [1, 7, 1023])
@pytest.mark.parametrize("reduction", ["reference", "sum"])
def test_loss_and_grad_odd_shapes_equal_sizes(n, d, reduction):
    check_loss_and_grad(n, n, [d], reduction, backend="torch")


@pytest.mark.parametrize("n,m", [(1, 5), (5, 1), (3, 7), (31, 100), (100, 33), (33, 31)])
@pytest.mark.parametrize("reduction", ["reference", "sum"])
def test_loss_and_grad_unequal_sizes_several_layers(n, m, reduction):
    check_loss_and_grad(n, m, [7, 1, 33], reduction, backend="torch")


def test_ties_and_repeated_values():
    check_loss_and_grad(33, 20, [5, 3], "reference", backend="torch", ties=True)
    x = torch.ones(8, 3, requires_grad=True)
    loss = lf.sliced_wasserstein(x, torch.ones(5, 3))
    loss.backward()
    assert loss.item() == 0.0 and x.grad.abs().max().item() == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    check_loss_and_grad(31, 40, [7, 5], "sum", backend="torch", dtype=dtype)
    check_low_precision_rule(dtype, backend="torch")
    check_low_precision_rule(dtype, backend="torch", n=100, d=7)


def test_reference_reduction_is_published_form():
    torch.manual_seed(0)
    xs = [torch.randn(32, d) for d in (4, 9)]
    ys = [torch.randn(32, d) for d in (4, 9)]
    published = sum(((x.sort(0).values - y.sort(0).values) ** 2).sum(0).mean() for x, y in zip(xs, ys)) / 2
    assert torch.allclose(lf.sliced_wasserstein(xs, ys), published, rtol=1e-6)
    w2 = sum(((x.sort(0).values - y.sort(0).values) ** 2).mean(0).sum() for x, y in zip(xs, ys))
    assert torch.allclose(lf.sliced_wasserstein(xs, ys, "sum"), w2, rtol=1e-6)


def test_gradcheck_float64():
    torch.manual_seed(0)
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(9, 3, dtype=torch.float64)
    prof = lf.TargetProfile(y, 6)
    assert torch.autograd.gradcheck(lambda t: lf.sliced_wasserstein(t, prof, "sum"), (x,))


def test_permutation_invariance_and_identity():
    torch.manual_seed(0)
    x, y = torch.randn(20, 5), torch.randn(13, 5)
    perm = torch.randperm(20)
    assert lf.sliced_wasserstein(x, y).item() == pytest.approx(
        lf.sliced_wasserstein(x[perm], y).item(), rel=1e-6
    )
    assert lf.sliced_wasserstein(x, x).item() == pytest.approx(0.0, abs=1e-6)


def test_profile_reused_and_exact():
    torch.manual_seed(0)
    x, y = torch.randn(10, 4), torch.randn(23, 4)
    prof = lf.TargetProfile(y, 10)
    assert torch.allclose(prof.mean_square.sum(0) / 10, (y.double() ** 2).mean(0).float(), rtol=1e-5)
    np.testing.assert_allclose(
        lf.sliced_wasserstein(x, prof, "sum").item(),
        ot_w2_squared(x.double().numpy(), y.double().numpy()).sum(),
        rtol=1e-5,
    )
    packed = lf.pack_profiles([prof, lf.TargetProfile(y[:, :2], 10)])
    exact, _ = expected_loss([x, x[:, :2]], [y, y[:, :2]], "reference")
    for target in (packed, [y, y[:, :2]], [prof, lf.TargetProfile(y[:, :2], 10)]):
        assert lf.sliced_wasserstein([x, x[:, :2]], target).item() == pytest.approx(exact, rel=1e-5)


def test_non_contiguous_input():
    torch.manual_seed(0)
    base = torch.randn(7, 12, requires_grad=True)
    x = base.t()  # (12, 7), strides (1, 12)
    y = torch.randn(9, 7)
    loss = lf.sliced_wasserstein(x, y)
    (g,) = torch.autograd.grad(loss, base)
    exact, _ = expected_loss([x.detach()], [y], "reference")
    assert loss.item() == pytest.approx(exact, rel=1e-5)
    assert g.shape == base.shape
    torch.testing.assert_close(g.double(), expected_grad(x, y, "reference", 1).t(), rtol=1e-5, atol=1e-6)


def test_nan_propagates():
    """Documented behaviour: NaN or Inf in x or y makes the loss non-finite."""
    x, y = torch.randn(5, 3), torch.randn(5, 3)
    x[2, 1] = float("nan")
    assert math.isnan(lf.sliced_wasserstein(x, y).item())
    y[0, 0] = float("inf")
    assert not math.isfinite(lf.sliced_wasserstein(torch.randn(5, 3), y).item())


@pytest.mark.parametrize(
    "x,y,match",
    [
        (torch.randn(4, 3), torch.randn(4, 5), "coordinate dims differ"),
        (torch.randn(4, 3, 2), torch.randn(4, 3), "must be 2-D"),
        (torch.randn(0, 3), torch.randn(4, 3), "empty set"),
        (torch.randn(4, 3), torch.randn(0, 3), "empty set"),
        (torch.randn(4, 3), torch.randn(4, 3, requires_grad=True), "requires grad"),
        ([torch.randn(4, 3), torch.randn(5, 3)], [torch.randn(4, 3)] * 2, "same number of source"),
        ([torch.randn(4, 3)], [torch.randn(4, 3)] * 2, "1 source layers but 2 targets"),
        (torch.randn(4, 3), lf.TargetProfile(torch.randn(6, 3), 5), "built for n=5"),
        (torch.randn(4, 3, dtype=torch.float64).long(), torch.randn(4, 3), "floating-point"),
    ],
)
def test_bad_input(x, y, match):
    with pytest.raises((ValueError, TypeError), match=match):
        lf.sliced_wasserstein(x, y)


def test_bad_reduction_and_mixed_devices():
    with pytest.raises(ValueError, match="reduction"):
        lf.sliced_wasserstein(torch.randn(3, 2), torch.randn(3, 2), reduction="mean")
    with pytest.raises(ValueError, match="one device"):
        lf.sliced_wasserstein(torch.randn(3, 2), torch.randn(3, 2, device="meta"))


def test_triton_backend_on_cpu_without_interpreter_is_an_error():
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        lf.sliced_wasserstein(torch.randn(3, 2), torch.randn(3, 2), backend="triton")
