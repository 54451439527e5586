"""GPU lane: the compiled Triton kernels on CUDA at paper-like shapes, against the same
references as the CPU lanes (collected only where CUDA is available)."""
import pytest
import torch

from kernel_checks import check_affine, check_loss_and_grad

CUDA = "cuda"


@pytest.mark.parametrize("n,m,dims", [(32, 32, [1536, 2304]), (31, 100, [7, 1023]),
                                      (1024, 1000, [64]), (2, 3, [1])])
@pytest.mark.parametrize("reduction", ["reference", "sum"])
def test_loss_kernel(n, m, dims, reduction):
    check_loss_and_grad(n, m, dims, reduction, backend="triton", device=CUDA)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loss_kernel_low_precision(dtype):
    check_loss_and_grad(32, 40, [256, 33], "reference", backend="triton", dtype=dtype, device=CUDA)


@pytest.mark.parametrize("shape,cd", [((1, 1, 1023), -1), ((3, 7, 256), -1), ((4, 512, 3584), -1),
                                      ((2, 320, 16, 16), 1)])
@pytest.mark.parametrize("strength_kind", ["float", "tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_affine_kernel(shape, cd, strength_kind, dtype):
    check_affine(shape, cd, strength_kind, False, backend="triton", dtype=dtype, device=CUDA)
    check_affine(shape, cd, strength_kind, True, backend="triton", dtype=dtype, device=CUDA)


def test_rms_norm_shift_kernel_matches_reference():
    from lineas_fast.kernels.rms_norm_shift import rms_norm_shift_triton
    from lineas_fast.kernels.rms_norm_shift_ref import rms_norm_shift_ref
    for dtype in (torch.float32, torch.bfloat16):
        for gemma in (False, True):
            x = torch.randn(64, 3584, device=CUDA).to(dtype)
            w, c = torch.randn(3584, device=CUDA), torch.randn(3584, device=CUDA)
            got = rms_norm_shift_triton(x, w, c, 1e-6, gemma).double()
            ref = rms_norm_shift_ref(x, w, c, 1e-6, gemma).double()
            exact = rms_norm_shift_ref(x.double(), w.double(), c.double(), 1e-6, gemma)
            assert (got - exact).abs().max() <= 2 * (ref - exact).abs().max() + 1e-5
