"""In-memory fused steered norms: for maps that cannot fold into a standard checkpoint (a shift
after Gemma's residual post-norms, a per-head q/k norm, or the final norm), swap the norm for
one that applies the affine map inside the normalization (scale folded into its weight, shift in
the kernel's epilogue): no extra launch, no extra pass over the activations.

What each RMSNorm computes (offset 1 + w or not, casting, ε attribute) comes from the family
table (``lineas_fast.fold.families``). The Triton kernel is imported only on its branch, so this
module imports where Triton is not installed.
"""

from __future__ import annotations

import torch
from torch import nn

from lineas_fast.checks import number
from lineas_fast.fold.families import NormSpec, norm_spec
from lineas_fast.fold.fusion import (
    OFFLOADED,
    FusionError,
    _fold,
    _fold_values,
    _Plan,
    coefficients,
    fold_record,
    refuse_attached,
    refuse_gates,
    spec_of,
)
from lineas_fast.kernels._backend import use_triton
from lineas_fast.kernels.ops import rms_norm_shift_op
from lineas_fast.kernels.rms_norm_shift_ref import MAX_D as RMS_MAX_D
from lineas_fast.kernels.rms_norm_shift_ref import rms_norm_shift_ref
from lineas_fast.numerics import check_effective, module_dtype
from lineas_fast.placement import offloaded
from lineas_fast.records import mark_folded, refuse_steered, unmark_unfolded
from lineas_fast.steering import Steering
from lineas_fast.targets import as_target


class SteeredRMSNorm(nn.Module):
    """RMSNorm whose output is a⊙norm(x) + c, computed in one fused pass.

    ``spec`` (from the family table; default: looked up for ``norm`` in ``model_type``) says
    how the replaced norm computes: ``offset`` ((1 + w)⊙x̂ rather than w⊙x̂), ``casting``
    ("input": x̂ cast to the input dtype before the weight product, as Llama; "float32": the
    product in float32, as Gemma) and the attribute holding ε. The scale s = a⊙w (or a⊙(1 + w))
    is held in ``weight`` (float32) in the form the kernel's casting mode takes: s itself for
    "input", s − 1 for "float32" (whose kernel path multiplies by 1 + weight). ``shift`` is c.
    ``original`` keeps the replaced module for ``unfuse_in_memory``.
    """

    def __init__(
        self,
        norm: nn.Module,
        a: torch.Tensor,
        c: torch.Tensor,
        backend=None,
        spec: NormSpec | None = None,
        model_type: str = "",
    ):
        super().__init__()
        if spec is None:
            spec, why = norm_spec(norm, model_type)
            if spec is None:
                raise FusionError({type(norm).__name__: why})
        if spec.kind not in ("rms", "rms_offset"):
            raise ValueError(f"SteeredRMSNorm replaces RMSNorms, got a {spec.kind} spec")
        self.spec, self.offset, self.casting = spec, spec.offset, spec.casting
        eps = getattr(norm, spec.eps)  # torch.nn.RMSNorm: None = dtype's eps
        self.eps = None if eps is None else float(eps)
        w = norm.weight.detach().double()
        a, c = a.to(w.device), c.to(w.device)
        scale = a * (1 + w) if spec.offset else a * w
        self.float32_product = spec.casting == "float32"
        self.weight = nn.Parameter(
            (scale - 1 if self.float32_product else scale).float(), requires_grad=False
        )
        self.register_buffer("shift", c.float())
        self.original = [norm]  # a list: not registered as a submodule
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        if torch.is_grad_enabled() and x.requires_grad:  # the op has no backward: autograd
            return rms_norm_shift_ref(x, self.weight, self.shift, eps, self.float32_product)
        kernel = (
            x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and x.shape[-1] <= RMS_MAX_D
            and use_triton(x.device, self.backend)
        )
        return rms_norm_shift_op(x, self.weight, self.shift, eps, self.float32_product, kernel)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, offset={self.offset}, casting={self.casting!r}"


def fuse_in_memory(
    model,
    steering: Steering,
    strength: float = 1.0,
    inverse: bool = False,
    backend: str | None = None,
    strict: bool = True,
    compose: bool = False,
):
    """Apply each map inside its norm: LayerNorm/GroupNorm with bias get folded weights (the
    same module type); RMSNorms (torch.nn.RMSNorm, or a family's of the table) become
    ``SteeredRMSNorm``. ``model``: a model, a diffusers pipeline or a ``Target``. In place;
    returns what was passed (the model or the pipeline). Refused like ``fuse``: strengths whose
    effective coefficients overflow the model's dtype, and (unless ``compose=True``) a model
    that already carries a fold; the fold is recorded the same way."""
    target = as_target(model)
    refuse_steered(target.root, compose, "fuse this steering in memory")
    strength = number(strength, "strength")
    if not isinstance(steering, Steering):
        raise TypeError(f"steering must be a lineas_fast.Steering, got {type(steering).__name__}")
    steering.validate(target, strict=strict)
    refuse_attached(target)
    steering = target.resolve(steering)
    refuse_gates([steering])
    named = target.named
    problems, swaps = {}, []
    for name in steering.modules:
        spec, why, _, _ = spec_of(name, named)
        if spec is None:
            problems[name] = why
            continue
        if offloaded(named[name]):
            problems[name] = OFFLOADED
            continue
        if spec.kind == "layernorm" and getattr(named[name], "bias", None) is None:
            problems[name] = "LayerNorm/GroupNorm without bias: use attach() for this module"
            continue
        swaps.append((name, named[name], spec))
    if problems:
        raise FusionError(problems)
    if strength == 0:
        return target.original
    coefs = {}
    for name, mod, spec in swaps:  # every map checked before any module changes
        coefs[name] = coefficients(*steering[name], strength, inverse)
        check_effective(name, *coefs[name], module_dtype(mod, module_dtype(target.root)), strength)
        if spec.kind == "layernorm":
            _fold_values(_Plan(name, mod, *coefs[name], spec))
    with torch.no_grad():
        for name, mod, spec in swaps:
            a, c = coefs[name]
            if spec.kind == "layernorm":
                _fold(_Plan(name, mod, a, c, spec))
            else:
                parent_name, _, local = name.rpartition(".")
                parent = named[parent_name] if parent_name else target.root
                setattr(parent, local, SteeredRMSNorm(mod, a, c, backend, spec))
    mark_folded(target.root, [name for name, _, _ in swaps], fold_record([steering], strength, inverse))
    return target.original


def unfuse_in_memory(model):
    """Put back the RMSNorms that ``fuse_in_memory`` replaced (folded LayerNorm weights stay).
    ``model``: a model, a diffusers pipeline or a ``Target``."""
    target = as_target(model)
    root = target.root
    for name, mod in list(root.named_modules()):
        if isinstance(mod, SteeredRMSNorm):
            parent_name, _, local = name.rpartition(".")
            parent = root.get_submodule(parent_name) if parent_name else root
            setattr(parent, local, mod.original[0])
    unmark_unfolded(root)
    return target.original
