"""Argument checks shared by the public entry points: each error names the argument, the value
and what is expected, and is raised before any compute is spent."""

from __future__ import annotations

import math
import numbers

import torch


class ArgumentError(ValueError):
    """A bad argument value; ``argument`` names the library argument it is about (e.g.
    ``"loss_modules"``), so a caller such as the command line can name its own flag for it."""

    def __init__(self, message: str, argument: str | None = None):
        super().__init__(message)
        self.argument = argument


class ArgumentTypeError(TypeError):
    """An argument of the wrong type; ``argument`` names the library argument (as
    ``ArgumentError``)."""

    def __init__(self, message: str, argument: str | None = None):
        super().__init__(message)
        self.argument = argument


def number(
    value, name: str, *, low: float | None = None, high: float | None = None, low_open: bool = False
) -> float:
    """``value`` as a finite float in [low, high] (or (low, high] with ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}", name)
    v = float(value)
    if not math.isfinite(v):
        raise ArgumentError(f"{name} must be finite, got {value!r}", name)
    if low is not None and (v <= low if low_open else v < low):
        raise ArgumentError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}", name)
    if high is not None and v > high:
        raise ArgumentError(f"{name} must be <= {high}, got {value!r}", name)
    return v


def integer(value, name: str, *, low: int | None = None) -> int:
    """``value`` as an int >= low (bools and floats are refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}", name)
    if low is not None and int(value) < low:
        raise ArgumentError(f"{name} must be >= {low}, got {value!r}", name)
    return int(value)


def choice(value, name: str, options) -> str:
    if value not in options:
        raise ArgumentError(f"{name} must be one of {tuple(options)}, got {value!r}", name)
    return value


def finite_tensors(what: str, **tensors) -> None:
    """Every tensor finite (one host sync per call: for set-up, never per step)."""

    bad = [k for k, t in tensors.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"{what}: {', '.join(bad)} not finite (NaN or Inf)")
