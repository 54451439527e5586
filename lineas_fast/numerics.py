"""What a map does to the numbers, checked once before it is applied: finite is not enough.

A map at strength λ acts as z ↦ a⊙z + c with the effective coefficients

    a = 1 − λ + λω   (= 1 + λu),      c = λb            (T⁻¹: ω → 1/ω, b → −b/ω)

computed here in float64, so an extreme but finite strength or map (λ = 1e30, ω = 3e38, a float64
map of 1e300) is caught before it reaches the model. The bound on |a| and |c| is

    coefficient_bound(dtype) = min(max(dtype), sqrt(max(float32))) / HEADROOM,   HEADROOM = 256

* ``max(dtype)``: the steered activation is stored in the model's dtype (float16: 65504);
* ``sqrt(max(float32)) ≈ 1.8e19``: the next normalization squares the activation in float32;
* ``HEADROOM = 2⁸``: room for the activation's own magnitude (an activation up to 255 in
  magnitude stays finite under a coefficient at the bound).

So float16 models accept coefficients up to 255.9, bfloat16/float32 models up to ≈ 7.2e16.
Folded tensors are checked separately (``check_written``): every value finite and within the
destination dtype's range, before anything is written.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lineas_fast.checks import ArgumentError

HEADROOM = 256.0
_SQRT_F32_MAX = math.sqrt(torch.finfo(torch.float32).max)


class NumericRangeError(ArgumentError):
    """Applying a map would overflow the model's dtype (``argument``: the culprit argument)."""

    def __init__(self, message: str, argument: str = "strength"):
        super().__init__(message, argument)


def coefficient_bound(dtype: torch.dtype) -> float:
    """The largest |a| or |c| accepted for activations of ``dtype`` (see the module doc)."""
    top = torch.finfo(dtype).max if dtype.is_floating_point else torch.finfo(torch.float32).max
    return min(top, _SQRT_F32_MAX) / HEADROOM


def module_dtype(module: nn.Module, default: torch.dtype = torch.float32) -> torch.dtype:
    """The floating dtype of the module's first floating parameter or buffer, else ``default``."""
    for t in list(module.parameters(recurse=True)) + list(module.buffers(recurse=True)):
        if t.is_floating_point():
            return t.dtype
    return default


def effective_coefficients(omega, bias, strength: float, inverse: bool = False):
    """(a, c) float64 on the CPU with steer(z) = a⊙z + c; a negative strength means the
    inverse map. omega, bias (d,). The inverse needs ω ≠ 0 everywhere (ValueError)."""
    if strength < 0:
        inverse, strength = (not inverse), -strength
    om, b = omega.detach().double().cpu(), bias.detach().double().cpu()
    if inverse:
        if bool((om == 0).any()):
            zeros = torch.nonzero(om == 0).flatten()[:8].tolist()
            raise ValueError(f"inverse map needs omega != 0 everywhere; omega is 0 at coordinates {zeros}")
        om, b = 1.0 / om, -b / om
    return 1.0 + strength * (om - 1.0), strength * b


def check_effective(
    module: str, a: torch.Tensor, c: torch.Tensor, dtype: torch.dtype, strength: float
) -> None:
    """Refuse a map whose effective coefficients (float64) overflow activations of ``dtype``."""
    bound = coefficient_bound(dtype)
    for what, t in (("scale 1 - λ + λω", a), ("shift λb", c)):
        bad = ~torch.isfinite(t) | (t.abs() > bound)
        if bool(bad.any()):
            i = int(torch.nonzero(bad).flatten()[0])
            raise NumericRangeError(
                f"module {module!r}: at strength {strength:g} the map's {what} is {float(t[i]):.4g} at "
                f"coordinate {i}, beyond {bound:.4g} (the bound for {str(dtype).replace('torch.', '')} "
                f"activations: max(dtype, sqrt(float32 max)) / {HEADROOM:g}); applying it would "
                f"overflow. Use a smaller strength, or check the map"
            )


def check_written(name: str, values: torch.Tensor, dtype: torch.dtype) -> None:
    """Refuse to write ``values`` (float64) as ``dtype`` when any is non-finite or out of range."""
    top = torch.finfo(dtype).max if dtype.is_floating_point else float("inf")
    bad = ~torch.isfinite(values) | (values.abs() > top)
    if bool(bad.any()):
        i = int(torch.nonzero(bad.flatten()).flatten()[0])
        raise NumericRangeError(
            f"folding would write {float(values.flatten()[i]):.4g} into {name!r} "
            f"({str(dtype).replace('torch.', '')}, largest finite {top:.4g}): nothing was written. "
            f"Use a smaller strength, or check the map"
        )
