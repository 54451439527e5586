"""The restructured loss kernel run by Triton's interpreter (TRITON_INTERPRET=1): the 16-bit
gradient under a loss scale, layers of different d and strides read in place, no gradient work
without grad, the cached layer table, and the custom op's opcheck on the kernel path."""

import pytest
import torch
from kernel_checks import check_layers_grad_rule, check_loss_scale_grad, layered_inputs

import lineas_fast as lf
from lineas_fast.kernels import wasserstein

TRITON = "triton"


@pytest.fixture
def launch_flags(monkeypatch):
    """The constexpr flags of every loss-kernel launch while the test runs."""
    from triton.runtime.interpreter import InterpretedFunction

    seen = []
    run = InterpretedFunction.run

    def recording_run(self, *args, **kwargs):
        if self.fn.__name__ == "_wasserstein_fwd_kernel" and not kwargs.get("warmup", False):
            seen.append({k: kwargs[k] for k in ("NEED_GRAD", "UNIT_COLS", "N_PAD", "BLOCK_D")})
        return run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    return seen


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_gradient_under_loss_scale(dtype, launch_flags):
    """Gradient ×65536 of a float16 input whose unscaled gradient underflows float16: the
    kernel's float32 gradient is scaled before the one rounding to float16 (a gradient stored
    in float16 by the forward lost 506 of 2048 entries to 0, relative error 0.18)."""
    rel = check_loss_scale_grad(dtype, backend=TRITON)
    assert rel <= 2 * torch.finfo(dtype).eps
    assert launch_flags == [
        {
            "NEED_GRAD": True,
            "UNIT_COLS": True,
            "N_PAD": 32,
            "BLOCK_D": wasserstein.launch_config(32)["BLOCK_D"],
        }
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["reference", "sum"])
def test_layers_of_different_d_and_strides(dtype, reduction, launch_flags):
    """Four layers (d = 5, 33, 1, 17; contiguous, transposed, a column slice, every other row)
    in one launch, each read in place: every layer's loss and gradient vs float64."""
    check_layers_grad_rule(dtype, TRITON, reduction)
    assert len(launch_flags) == 1 and launch_flags[0]["UNIT_COLS"] is False


def test_unit_stride_slices_of_one_buffer(launch_flags):
    """Layers that are column slices of one wide activation buffer (row stride ≠ d)."""
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(9, 40, generator=gen, requires_grad=True)
    xs = [base[:, :7], base[:, 7:30], base[:, 30:]]
    ys = [torch.randn(12, x.shape[1], generator=gen) for x in xs]
    loss, per_layer = lf.sliced_wasserstein(xs, ys, "sum", return_per_layer=True, backend=TRITON)
    ref_loss, ref_layers = lf.sliced_wasserstein(
        [x.detach() for x in xs], ys, "sum", return_per_layer=True, backend="torch"
    )
    (g,) = torch.autograd.grad(loss, base)
    xt = base.detach().requires_grad_()
    (gt,) = torch.autograd.grad(
        lf.sliced_wasserstein([xt[:, :7], xt[:, 7:30], xt[:, 30:]], ys, "sum", backend="torch"), xt
    )
    torch.testing.assert_close(per_layer, ref_layers, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, gt, rtol=1e-5, atol=1e-7)
    assert launch_flags[0]["UNIT_COLS"] is True and launch_flags[0]["NEED_GRAD"] is True


def test_no_gradient_work_without_grad(launch_flags):
    """Under no_grad or with no layer requiring grad the kernel is specialised with
    NEED_GRAD=False (it computes and stores no gradient) and the result is the same."""
    leaves, xs, ys = layered_inputs(16, torch.float32)
    with torch.no_grad():
        a = lf.sliced_wasserstein(xs, ys, backend=TRITON)
    b = lf.sliced_wasserstein([x.detach() for x in xs], ys, backend=TRITON)
    c = lf.sliced_wasserstein(xs, ys, backend=TRITON)
    assert [f["NEED_GRAD"] for f in launch_flags] == [False, False, True]
    assert a.item() == b.item() == c.item()


def test_layer_table_cached_by_address():
    """The layer table is built once for the same layers (same addresses and strides) and
    rebuilt when a layer moves."""
    xs = [torch.randn(8, 5), torch.randn(8, 3)]
    t1, unit = wasserstein.layer_table(xs, 8)
    t2, _ = wasserstein.layer_table(xs, 8)
    assert t1 is t2 and unit
    rows = t1.tolist()
    assert [r[3:] for r in rows] == [[5, 0, 0], [3, 5, 40]]
    assert rows[1][0] * 4 == xs[1].data_ptr() - xs[0].data_ptr() and rows[0][:3] == [0, 5, 1]
    t3, _ = wasserstein.layer_table([xs[0], xs[1].clone()], 8)
    assert t3 is not t1


def test_opcheck_kernel_path():
    gen = torch.Generator().manual_seed(0)
    dims, n = (3, 5), 6
    xs = [torch.randn(n, d, generator=gen).requires_grad_() for d in dims]
    packed = lf.pack_profiles([lf.TargetProfile(torch.randn(9, d, generator=gen), n) for d in dims])
    w, scale = wasserstein.layer_weights(dims, n, "reference", torch.device("cpu"))
    for need_grad in (True, False):
        torch.library.opcheck(
            torch.ops.lineas_fast.wasserstein_loss.default,
            (xs, packed.mean, packed.var_sum, w, scale, True, need_grad),
        )


def test_retained_graph_second_backward_recomputes(kernel_launches):
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(10, 3, generator=gen, requires_grad=True), torch.randn(7, 3, generator=gen)
    loss = lf.sliced_wasserstein(x, y, backend=TRITON)
    (g1,) = torch.autograd.grad(2 * loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(g1, 2 * g2)
    assert kernel_launches["_wasserstein_fwd_kernel"] == 2


def test_profile_fields():
    """PackedTargetProfile keeps each layer's Σ v̄ (float64-summed), what the host adds."""
    ys = [torch.randn(11, 4), torch.randn(11, 2)]
    packed = lf.pack_profiles([lf.TargetProfile(y, 5) for y in ys])
    assert packed.var_sum.shape == (2,) and packed.var_sum.dtype == torch.float32
    torch.testing.assert_close(
        packed.var_sum,
        torch.stack([packed.var[:, :4].double().sum(), packed.var[:, 4:].double().sum()]).float(),
    )
