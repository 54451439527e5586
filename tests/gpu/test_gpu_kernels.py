"""GPU lane: the compiled Triton kernels on CUDA at paper-like shapes, against the same
references as the CPU lanes (collected only where CUDA is available)."""

import pytest
import torch
from kernel_checks import check_affine, check_loss_and_grad
from lane import DEVICE as CUDA  # "cpu" in a rehearsal (TRITON_INTERPRET=1)


@pytest.mark.parametrize(
    "n,m,dims", [(32, 32, [1536, 2304]), (31, 100, [7, 1023]), (1024, 1000, [64]), (2, 3, [1])]
)
@pytest.mark.parametrize("reduction", ["reference", "sum"])
def test_loss_kernel(n, m, dims, reduction):
    check_loss_and_grad(n, m, dims, reduction, backend="triton", device=CUDA)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loss_kernel_low_precision(dtype):
    check_loss_and_grad(32, 40, [256, 33], "reference", backend="triton", dtype=dtype, device=CUDA)


@pytest.mark.parametrize(
    "shape,cd", [((1, 1, 1023), -1), ((3, 7, 256), -1), ((4, 512, 3584), -1), ((2, 320, 16, 16), 1)]
)
@pytest.mark.parametrize("strength_kind", ["float", "tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_affine_kernel(shape, cd, strength_kind, dtype):
    check_affine(shape, cd, strength_kind, False, backend="triton", dtype=dtype, device=CUDA)
    check_affine(shape, cd, strength_kind, True, backend="triton", dtype=dtype, device=CUDA)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gemma", [False, True])
def test_rms_norm_shift_kernel(dtype, gemma):
    """Against the float64 formula written in the tests (not the library's reference)."""
    from kernel_checks import check_rms_norm_shift

    check_rms_norm_shift((64, 3584), gemma, dtype, device=CUDA)
