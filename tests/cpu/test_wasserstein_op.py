"""The loss as a PyTorch custom op (torch path on CPU): opcheck, no host synchronisation, the
gradient under a loss scale, no gradient work without grad, layers of different d and strides,
a second backward through a retained graph."""

import pytest
import torch
from kernel_checks import (
    check_layers_grad_rule,
    check_loss_scale_grad,
    expected_grad,
    expected_loss,
    layered_inputs,
)
from torch.utils._python_dispatch import TorchDispatchMode

import lineas_fast as lf
from lineas_fast.kernels.wasserstein_ref import layer_weights, wasserstein_loss_ref


def op_args(n=6, dims=(3, 5), dtype=torch.float32, reduction="reference", need_grad=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, d, generator=gen).to(dtype).requires_grad_() for d in dims]
    packed = lf.pack_profiles([lf.TargetProfile(torch.randn(n + 3, d, generator=gen), n) for d in dims])
    w, scale = layer_weights(tuple(dims), n, reduction, torch.device("cpu"))
    return (xs, packed.mean, packed.var_sum, w, scale, False, need_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("need_grad", [True, False])
def test_opcheck(dtype, need_grad):
    torch.library.opcheck(
        torch.ops.lineas_fast.wasserstein_loss.default, op_args(dtype=dtype, need_grad=need_grad)
    )


class NoSync(TorchDispatchMode):
    """Fails on a device→host read (``.item()``, ``bool()``, ``int()`` of a tensor) and
    counts the aten ops dispatched."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError("device->host synchronisation")
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("reduction", ["reference", "sum"])
def test_no_host_sync_and_cached_weights(reduction):
    """The public call, forward and backward, and the reference's own ops read nothing back
    to the host; the weights are built once per (dims, n, reduction, device)."""
    args = op_args(reduction=reduction)
    xs = args[0]
    packed = lf.pack_profiles([lf.TargetProfile(torch.randn(9, x.shape[1]), 6) for x in xs])
    lf.sliced_wasserstein(xs, packed, reduction, return_per_layer=True)
    hits = layer_weights.cache_info().hits
    with NoSync() as mode:
        loss, per_layer = lf.sliced_wasserstein(xs, packed, reduction, return_per_layer=True)
        loss.backward()
    assert layer_weights.cache_info().hits == hits + 1
    assert "lineas_fast.wasserstein_loss.default" in mode.ops
    assert per_layer.shape == (2,) and per_layer.dtype == torch.float32
    with NoSync() as inner:  # what the op runs inside
        wasserstein_loss_ref(*[a for i, a in enumerate(args) if i != 5])
    assert not any("item" in op or "nonzero" in op for op in inner.ops)


def test_per_layer_is_single_layer_scale_and_total():
    torch.manual_seed(0)
    xs = [torch.randn(8, d) for d in (3, 11, 1)]
    ys = [torch.randn(10, d) for d in (3, 11, 1)]
    for reduction in ("reference", "sum"):
        loss, per_layer = lf.sliced_wasserstein(xs, ys, reduction, return_per_layer=True)
        singles = torch.stack([lf.sliced_wasserstein(x, y, reduction) for x, y in zip(xs, ys)])
        torch.testing.assert_close(per_layer, singles)
        total = per_layer.mean() if reduction == "reference" else per_layer.sum()
        torch.testing.assert_close(loss, total)
        _, exact = expected_loss(xs, ys, reduction)
        torch.testing.assert_close(per_layer.double(), torch.from_numpy(exact), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_gradient_under_loss_scale(dtype):
    check_loss_scale_grad(dtype, backend="torch")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["reference", "sum"])
def test_layers_of_different_d_and_strides(dtype, reduction):
    check_layers_grad_rule(dtype, "torch", reduction)


def test_no_gradient_work_without_grad():
    """Under no_grad, and when no layer requires grad, the op is asked for no gradient and
    returns an empty one; with one layer requiring grad only that layer gets one."""
    args = op_args()
    xs = args[0]
    calls = []
    real = torch.ops.lineas_fast.wasserstein_loss

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, a=(), kw=None):
            out = func(*a, **(kw or {}))
            if func is real.default:
                calls.append((a[6], out[2].numel()))
            return out

    y = [lf.TargetProfile(torch.randn(9, x.shape[1]), 6) for x in xs]
    with Spy():
        with torch.no_grad():
            lf.sliced_wasserstein(xs, y)
        lf.sliced_wasserstein([x.detach() for x in xs], y)
        loss = lf.sliced_wasserstein([xs[0].detach(), xs[1]], y)
    assert calls == [(False, 0), (False, 0), (True, 6 * 8)]
    g0, g1 = torch.autograd.grad(loss, [xs[0], xs[1]], allow_unused=True)
    assert g0 is None and g1.shape == xs[1].shape


def test_second_backward_with_retained_graph():
    """The first backward scales the saved gradient in place; a second backward through the
    retained graph recomputes it rather than scaling it twice."""
    torch.manual_seed(0)
    x, y = torch.randn(7, 4, requires_grad=True), torch.randn(9, 4)
    loss = lf.sliced_wasserstein(x, y, "sum")
    (g1,) = torch.autograd.grad(loss * 3.0, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss * 5.0, x)
    ref = expected_grad(x, y, "sum", 1)
    torch.testing.assert_close(g1.double(), 3 * ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g2.double(), 5 * ref, rtol=1e-5, atol=1e-6)


def test_mixed_dtypes_promote():
    leaves, xs, ys = layered_inputs(10, torch.float32)
    xs = [xs[0].to(torch.bfloat16), xs[1]]
    loss = lf.sliced_wasserstein(xs, ys[:2], "sum")
    g0, g1 = torch.autograd.grad(loss, [leaves[0], leaves[1]])
    assert g0.dtype == torch.float32 and g1.shape == leaves[1].shape
