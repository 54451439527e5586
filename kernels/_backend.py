"""Choosing between the Triton kernels and their plain-PyTorch references.

Rule (``backend="auto"``, the default):
  * CUDA tensors run the Triton kernel;
  * CPU tensors run the PyTorch reference, unless ``TRITON_INTERPRET=1`` is set in the
    environment before Triton is imported, in which case they run the Triton kernel
    through Triton's interpreter (slow: for tests at tiny shapes).

``backend="torch"`` or ``"triton"`` forces a path; ``LINEAS_FAST_BACKEND`` sets the default.

Triton is optional (it is installed only on Linux): without it "auto" always runs the PyTorch
references and ``"triton"`` raises. The modules that define Triton kernels
(``affine_steer``, ``gated_steer``, ``rms_norm_shift``, ``wasserstein``) import it at
the top, so the library imports them only on the Triton branch, after ``use_triton``.
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "torch", "triton")


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when ``import triton`` succeeds (checked once per process)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    """Return the one device all given tensors live on, or raise naming the odd ones."""
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{k} on {v}" for k, v in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
    return next(iter(devices.values()))


def use_triton(device: torch.device, backend: str | None = None) -> bool:
    """Decide whether the Triton kernel runs for tensors on ``device``: False for "torch", and
    for "auto" where Triton is not installed; "triton" raises where it cannot run."""
    backend = backend or os.environ.get("LINEAS_FAST_BACKEND", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "triton" and not triton_available():
        raise RuntimeError(
            "backend='triton' needs Triton, which is not installed (pip install "
            "triton, Linux only); use backend='torch' or 'auto' for the PyTorch path"
        )
    on_triton_device = device.type == "cuda" or (device.type == "cpu" and interpreting())
    if backend == "triton" and not on_triton_device:
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before import for CPU "
            f"tensors; got tensors on {device}"
        )
    return on_triton_device and triton_available()


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
