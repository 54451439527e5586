"""Kernels the compile lane must fail: one the interpreter runs but the real compiler rejects
(non-power-of-two arange), and one that builds but exceeds its budget."""

import triton
import triton.language as tl

from lineas_fast.kernels.registry import KernelConfig, _signature


@triton.jit
def broken_arange_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs) * 2)


def broken_configs():
    sig = _signature(broken_arange_kernel, {"x_ptr": "*fp32", "y_ptr": "*fp32"})
    return [
        KernelConfig("broken_arange", broken_arange_kernel, sig, {"BLOCK": 3}, 4),
        KernelConfig("fine_arange", broken_arange_kernel, sig, {"BLOCK": 4}, 4),
    ]


@triton.jit
def cross_warp_sum_kernel(x_ptr, y_ptr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """A map that sums each column over BLOCK_T rows spread across warps: shared memory and
    barriers, which the affine forward's budget ("affine-fwd": no barrier) does not allow."""
    offs = tl.arange(0, BLOCK_T)[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
    x = tl.load(x_ptr + offs)
    tl.store(y_ptr + offs, x + tl.sum(x, axis=0)[None, :])


def over_budget_configs():
    """The kernel above registered under the affine forward's name (so its budget applies)."""
    sig = _signature(cross_warp_sum_kernel, {"x_ptr": "*fp32", "y_ptr": "*fp32"})
    return [KernelConfig("affine_steer_fwd", cross_warp_sum_kernel, sig, {"BLOCK_T": 16, "BLOCK_D": 256}, 8)]
