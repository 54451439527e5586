"""Every launch configuration of the DSAS gated kernels (one per row width up to d = 8192), in
every dtype, sigmoid and ReLU gates, with and without parameter gradients: the output, the
per-token strength and the gradients of z, ω, b, w and c against autograd through the float64
closed form. The last test checks that the module launched every configuration."""

import launch_shapes as ls
import pytest
from kernel_checks import check_gated
from lane import DEVICE, LAUNCHED

DTYPES = ls.DTYPES


@pytest.mark.parametrize("need_param", [True, False])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("d", ls.gated_dims())
def test_gated_map_and_gradients(d, dt, relu, need_param, launches):
    check_gated(
        (2, 19, d),
        "relu" if relu else "sigmoid",
        inverse=not need_param,
        backend="triton",
        dtype=DTYPES[dt],
        device=DEVICE,
        need_param=need_param,
    )
    assert ls.gated_keys(d, dt, relu, need_param) <= launches


def test_every_configuration_launched():  # last: the module's launches, all tests
    missing = (
        ls.registry_keys("_gated_steer_fwd_kernel") | ls.registry_keys("_gated_steer_bwd_kernel")
    ) - LAUNCHED[__name__]
    assert not missing, sorted(missing)[:5]
