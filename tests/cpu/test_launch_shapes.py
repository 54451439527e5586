"""The GPU lane's inputs (tests/launch_shapes.py) make the host wrappers pick every
configuration of the registry, on an A100 (108 SMs) and on an H100/H200 (132 SMs): checked here
from the wrappers' own launch_config functions, without a GPU. The GPU lane then checks on the
device that each input launched what is predicted here."""

import launch_shapes as ls
import pytest

from lineas_fast.kernels import registry

DTYPES = tuple(ls.DTYPES)


@pytest.mark.parametrize("sms", [108, 132])
def test_gpu_lane_inputs_cover_every_registry_configuration(sms):
    covered = set()
    for n, _, _ in ls.loss_cases():
        for dt in DTYPES:
            covered |= ls.loss_keys(n, dt)
    for dt in DTYPES:  # test_every_configuration_loss: no_grad and strided
        covered |= ls.loss_keys(32, dt, need_grad=False)
        covered |= ls.loss_keys(24, dt, unit_cols=False)
    for (shape, cd), dt, (token, dparam, dlam) in zip_cases(sms):
        covered |= ls.affine_keys(shape, cd, dt, token, dparam, dlam, sms)
    for d in ls.gated_dims():
        for dt in DTYPES:
            for relu in (False, True):
                for need_param in (False, True):
                    covered |= ls.gated_keys(d, dt, relu, need_param)
    for d in ls.rms_dims():
        for dt in DTYPES:
            for gemma in (False, True):
                covered |= ls.rms_keys(d, dt, gemma)
    expected = ls.registry_keys()
    assert len(expected) == len(registry.all_configs())  # keys tell configurations apart
    missing = expected - covered
    assert not missing, sorted(missing)[:5]


def zip_cases(sms):
    for case in ls.affine_cases(sms):
        for dt in DTYPES:
            for flags in ls.AFFINE_FLAGS:
                yield case, dt, flags


def test_widest_inputs_reach_the_paper_limits():
    assert max(d for _, _, dims in ls.loss_cases() for d in dims) == 8192
    assert max(n for n, _, _ in ls.loss_cases()) > 1024  # the two-warp sort
    assert max(d for (shape, cd) in ls.affine_cases(132) for d in [shape[cd]]) == 8192
    assert max(ls.gated_dims()) == 8192


def test_launch_key_reads_a_jit_launch():
    """``launch_key`` on the arguments a wrapper passes (a recorded call, not launched)."""
    import torch

    from lineas_fast.kernels import gated_steer

    fn = gated_steer._gated_steer_fwd_kernel
    z = torch.zeros(4, 8, dtype=torch.bfloat16)
    got = ls.launch_key(fn, (z, z, z), dict(RELU=True, BLOCK_T=8, BLOCK_D=256, num_warps=4))
    assert got == ls.key("_gated_steer_fwd_kernel", "bf16", {"RELU": True, "BLOCK_T": 8, "BLOCK_D": 256}, 4)
    assert got in ls.registry_keys("_gated_steer_fwd_kernel")
