"""Installing steering maps on modules so they compose with every other hook.

A map is installed by wrapping the module's ``forward`` (an instance attribute), not by a
forward hook: the steered output is then what the next layer AND every forward hook on that
module see, whatever order those hooks were registered in (a capture hook registered before
``attach`` observes the steered output). A module carries at most one map unless the caller
composes explicitly (``attach(..., compose=True)``: the new map acts on the output of the ones
already there); anything else is refused, so no map is applied twice by accident.

Everything a call can compute once is computed at attach time: the map's coefficients
u = ω − 1 and b (or 1/ω − 1 and −b/ω for the inverse, with the ω ≠ 0 check), float32 copies on
the module's device, the gate's parameters and the kernel choice. A call then launches the
fused kernel with no host synchronisation. While training (ω, b require grad) the coefficients
are recomputed per call from the leaves so autograd reaches them; that is a few (d,) ops.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from lineas_fast import placement
from lineas_fast.functional import apply_affine, apply_gated, map_coefficients
from lineas_fast.kernels._backend import use_triton
from lineas_fast.modules import channel_dim_of
from lineas_fast.records import AlreadySteeredError  # noqa: F401  (re-exported)

MARK = "_lineas_fast_steered"  # module attribute: the installed maps, innermost first


class SteeredForward:
    """One map installed on one module: the module's ``forward`` becomes this object.

    ``apply(module, h) -> h'`` transforms the module's (first) output. ``remove()`` restores
    the previous forward when nothing wrapped this one since, and otherwise turns this wrapper
    into a pass-through (so removing never breaks another library's wrapper, e.g. accelerate's).

    ``copy.deepcopy`` of a steered model gives a copy steered by its own modules (the wrapped
    forward is a bound method, rebound to the copy; the map's coefficients are shared, read
    only). Pickling (``torch.save(model)``) is refused with a message: a live map is a
    function of this process, not part of the model; remove it or fold it (``fuse``) first.
    """

    def __init__(self, name: str, module: nn.Module, apply: Callable):
        self.name, self.module, self.apply, self.active = name, module, apply, True
        self.previous = module.__dict__.get("forward")  # an instance attribute, or None
        self.inner = module.forward
        module.forward = self
        module.__dict__.setdefault(MARK, []).append(self)

    @property
    def steered_by(self) -> "SteeredForward":
        return self

    def __call__(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        if not self.active:
            return out
        return _with_first(out, self.apply(self.module, _first(out)))

    def __deepcopy__(self, memo):
        new = SteeredForward.__new__(SteeredForward)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = value if key == "apply" else copy.deepcopy(value, memo)
        return new

    def __reduce_ex__(self, protocol):
        raise TypeError(
            f"module {self.name!r} carries an attached steering map, which cannot be pickled "
            f"(torch.save of the model, multiprocessing): remove the handle first "
            f"(handle.remove()), save the Steering itself (steering.save), or fold it into the "
            f"weights (lf.fuse) and save that model"
        )

    def remove(self) -> None:
        if not self.active:
            return
        self.active = False
        mod = self.module
        # unwind every inactive wrapper on top (an inner one removed earlier is a pass-through
        # until the ones wrapping it are gone)
        top = getattr(mod.__dict__.get("forward"), "steered_by", None)
        while top is not None and not top.active:
            if top.previous is None:
                del mod.__dict__["forward"]
            else:
                mod.__dict__["forward"] = top.previous
            top = getattr(mod.__dict__.get("forward"), "steered_by", None)
        stack = mod.__dict__.get(MARK, [])
        if self in stack:
            stack.remove(self)
        if not stack:
            mod.__dict__.pop(MARK, None)


def installed(module: nn.Module) -> list:
    """The steering maps currently attached to ``module`` (innermost first)."""
    return [s for s in module.__dict__.get(MARK, []) if s.active]


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _with_first(out, y):
    if isinstance(out, tuple):
        return (y,) + tuple(out[1:])
    if isinstance(out, list):
        return [y] + list(out[1:])
    return y


def _device_of(module: nn.Module, fallback: torch.device) -> torch.device:
    return placement.device_of(module) or fallback


def make_steer(
    name: str,
    module: nn.Module,
    omega: torch.Tensor,
    bias: torch.Tensor,
    strength: float,
    backend: str | None = None,
    gate: dict | None = None,
    record: list | None = None,
) -> Callable:
    """The per-call function of one map at one strength (negative: the inverse map), with
    everything that does not depend on the activations computed now."""
    inverse, lam = strength < 0, abs(float(strength))
    training = (
        omega.requires_grad
        or bias.requires_grad
        or (gate is not None and (gate["w"].requires_grad or gate["c"].requires_grad))
    )
    if inverse and bool((omega == 0).any()):  # the one host sync, at attach time
        zeros = torch.nonzero(omega == 0).flatten()[:8].tolist()
        raise ValueError(
            f"module {name!r}: the inverse map needs omega != 0, omega is 0 at coordinates {zeros}"
        )
    d = omega.shape[0]
    home = _device_of(module, omega.device)
    cache: dict = {}

    def coefficients(device):
        """(u, b, gate_w, gate_c) float32 on ``device``; cached unless training."""
        if not training and device in cache:
            return cache[device]
        if training:
            u, b = _coefficients_unchecked(omega, bias, inverse)
        else:
            u, b = map_coefficients(omega.detach(), bias.detach(), inverse)
        u, b = u.to(device, torch.float32).contiguous(), b.to(device, torch.float32).contiguous()
        g = (
            (gate["w"].to(device, torch.float32).contiguous(), gate["c"].to(device, torch.float32).reshape(1))
            if gate is not None
            else (None, None)
        )
        out = (u, b) + g
        if not training:
            cache[device] = out
        return out

    if not training:
        coefficients(home)
    triton_for: dict = {}

    def steer(mod: nn.Module, h: torch.Tensor) -> torch.Tensor:
        u, b, w, c = coefficients(h.device)
        if h.device not in triton_for:
            triton_for[h.device] = use_triton(h.device, backend)
        be = "triton" if triton_for[h.device] else "torch"
        cd = channel_dim_of(mod, h, d, name)
        if w is not None:
            y, s = apply_gated(h, u, b, w, c, lam, gate["kind"] == "relu", channel_dim=cd, backend=be)
            if record is not None:
                record.append(s.detach())
            return y
        if record is not None:
            cdp = cd % h.ndim
            record.append(torch.full(h.shape[:cdp] + h.shape[cdp + 1 :], lam, device=h.device))
        return apply_affine(h, u, b, lam, cd, backend=be)

    return steer


def _coefficients_unchecked(omega, bias, inverse):
    """``map_coefficients`` without the ω ≠ 0 check (done once at attach), differentiable."""
    om, b = omega.float(), bias.float()
    if inverse:
        return 1.0 / om - 1.0, -b / om
    return om - 1.0, b


def check_free(modules: dict[str, nn.Module], compose: bool) -> None:
    """Refuse to attach where a map is already attached, unless composing explicitly."""
    if compose:
        return
    taken = [n for n, m in modules.items() if installed(m)]
    if taken:
        raise AlreadySteeredError(
            f"modules {taken[:5]} already carry an attached steering map; remove that handle "
            f"first, attach one composed map (a.compose(b)), or pass compose=True to apply this "
            f"one on top of it"
        )
