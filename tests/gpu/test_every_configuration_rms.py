"""Every launch configuration of the RMSNorm-with-shift inference kernel (one per row width up
to its MAX_D), in every dtype, Llama and Gemma variants, against the float64 formula of
kernel_checks by flash-attention's rule. The last test checks that the module launched every
configuration."""

import launch_shapes as ls
import pytest
from kernel_checks import check_rms_norm_shift
from lane import DEVICE, LAUNCHED, REHEARSAL

DTYPES = ls.DTYPES


@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("d", ls.rms_dims())
def test_rms_norm_shift(d, dt, gemma, launches):
    check_rms_norm_shift((5, d), gemma, DTYPES[dt], device=DEVICE, interpreted=REHEARSAL)
    assert ls.rms_keys(d, dt, gemma) <= launches


def test_every_configuration_launched():  # last: the module's launches, all tests
    missing = ls.registry_keys("_rms_norm_shift_fwd_kernel") - LAUNCHED[__name__]
    assert not missing, sorted(missing)[:5]
