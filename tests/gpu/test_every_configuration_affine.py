"""Every launch configuration of the affine map's kernels (tests/launch_shapes.py: each tile,
channel-last up to d = 8192 and channel-first, for this GPU's multiprocessor count), in every
dtype and with every backward flag combination: the output and each gradient that is asked
for (z; ω and b; a per-token strength) against autograd through the float64 closed form. The
last test checks that the module launched every configuration of the registry."""

import launch_shapes as ls
import pytest
import torch
from kernel_checks import check_affine
from lane import DEVICE, LAUNCHED

from lineas_fast.kernels.affine_steer import sm_count

DTYPES = ls.DTYPES
SMS = sm_count(torch.device(DEVICE))


@pytest.mark.parametrize("token,need_param,need_lam", ls.AFFINE_FLAGS)
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize(
    "shape,cd",
    [
        pytest.param(shape, cd, id="x".join(map(str, shape)) + ("-channel-first" if cd == 1 else ""))
        for shape, cd in ls.affine_cases(SMS)
    ],
)
def test_map_and_gradients(shape, cd, dt, token, need_param, need_lam, launches):
    inverse = need_param and not token  # the inverse map on one flag combination
    check_affine(
        shape,
        cd,
        "tensor" if token else "float",
        inverse,
        backend="triton",
        dtype=DTYPES[dt],
        device=DEVICE,
        need_param=need_param,
        need_strength=need_lam,
    )
    assert ls.affine_keys(shape, cd, dt, token, need_param, need_lam, SMS) <= launches


def test_every_configuration_launched():  # last: the module's launches, all tests
    missing = (
        ls.registry_keys("_affine_steer_fwd_kernel") | ls.registry_keys("_affine_steer_bwd_kernel")
    ) - LAUNCHED[__name__]
    assert not missing, sorted(missing)[:5]
