"""A kernel the interpreter runs but the real compiler rejects (non-power-of-two arange)."""
import triton
import triton.language as tl

from lineas_fast.kernels.registry import KernelConfig, _signature


@triton.jit
def broken_arange_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs) * 2)


def broken_configs():
    sig = _signature(broken_arange_kernel, {"x_ptr": "*fp32", "y_ptr": "*fp32"})
    return [KernelConfig("broken_arange", broken_arange_kernel, sig, {"BLOCK": 3}, 4),
            KernelConfig("fine_arange", broken_arange_kernel, sig, {"BLOCK": 4}, 4)]
