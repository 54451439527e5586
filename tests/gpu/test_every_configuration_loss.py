"""Every launch configuration of the loss kernel (tests/launch_shapes.py), in every dtype, on the
device: the loss, each layer's loss and the gradient against the float64 OT of kernel_checks;
the no-grad and strided-column variants; flash-attention's 2x rule in bf16/fp16. The last test
checks that the module launched every configuration of the registry."""

import launch_shapes as ls
import numpy as np
import pytest
import torch
from kernel_checks import check_layers_grad_rule, check_loss_and_grad, check_low_precision_rule, expected_loss
from lane import DEVICE, LAUNCHED

import lineas_fast as lf

DTYPES = ls.DTYPES


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize(
    "n,m,dims",
    [pytest.param(n, m, dims, id=f"n{n}-m{m}-d{'+'.join(map(str, dims))}") for n, m, dims in ls.loss_cases()],
)
def test_loss_and_gradient(n, m, dims, dt, launches):
    check_loss_and_grad(n, m, dims, "reference", backend="triton", dtype=DTYPES[dt], device=DEVICE)
    assert ls.loss_keys(n, dt) <= launches


@pytest.mark.parametrize("dt", DTYPES)
def test_no_grad_and_strided_columns(dt, launches):
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(32, d, generator=gen).to(DTYPES[dt]) for d in (3584, 5)]
    ys = [torch.randn(40, d, generator=gen) for d in (3584, 5)]
    with torch.no_grad():
        loss = lf.sliced_wasserstein(
            [x.to(DEVICE) for x in xs], [y.to(DEVICE) for y in ys], "reference", backend="triton"
        )
    exact, _ = expected_loss([x.float() for x in xs], ys, "reference")
    np.testing.assert_allclose(loss.item(), exact, rtol=1e-5 if dt == "fp32" else 1e-4)
    check_layers_grad_rule(DTYPES[dt], "triton", "reference", n=24, device=DEVICE)
    assert ls.loss_keys(32, dt, need_grad=False) | ls.loss_keys(24, dt, unit_cols=False) <= launches


@pytest.mark.parametrize("dt", ["bf16", "fp16"])
def test_low_precision_rule(dt):
    check_low_precision_rule(DTYPES[dt], "triton", n=32, d=256, device=DEVICE)


def test_every_configuration_launched():  # last: the module's launches, all tests
    missing = ls.registry_keys("_wasserstein_fwd_kernel") - LAUNCHED[__name__]
    assert not missing, sorted(missing)[:5]
