"""In-memory fused steered norms: for maps that cannot fold into a standard checkpoint (a shift
after Gemma's residual post-norms or the final norm), swap the norm for one that applies the
affine map inside the normalization (scale folded into its weight, shift in the kernel's
epilogue): no extra launch, no extra pass over the activations."""
from __future__ import annotations

import torch
from torch import nn

from .fusion import FusionError, _fold, _norm_kind, _Plan, coefficients
from .kernels._backend import use_triton
from .kernels.rms_norm_shift import MAX_D, rms_norm_shift_triton
from .kernels.rms_norm_shift_ref import rms_norm_shift_ref
from .steering import Steering


class SteeredRMSNorm(nn.Module):
    """RMSNorm whose output is a⊙norm(x) + c, computed in one fused pass.

    Holds ``weight`` (d,) with a folded in (Llama: a⊙w; Gemma: a⊙(1+w) − 1) and ``shift`` c (d,),
    both float32. ``original`` keeps the replaced module for ``unfuse_in_memory``.
    """

    def __init__(self, norm: nn.Module, a: torch.Tensor, c: torch.Tensor, backend=None):
        super().__init__()
        self.gemma = _norm_kind(norm) == "gemma_rms"
        self.eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
        w = norm.weight.detach().double()
        a, c = a.to(w.device), c.to(w.device)
        folded = a * (1 + w) - 1 if self.gemma else a * w
        self.weight = nn.Parameter(folded.float(), requires_grad=False)
        self.register_buffer("shift", c.float())
        self.original = [norm]                         # a list: not registered as a submodule
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and x.requires_grad
        if (not needs_grad and x.shape[-1] <= MAX_D and use_triton(x.device, self.backend)
                and x.dtype in (torch.float32, torch.bfloat16, torch.float16)):
            return rms_norm_shift_triton(x, self.weight, self.shift, self.eps, self.gemma)
        return rms_norm_shift_ref(x, self.weight, self.shift, self.eps, self.gemma)


def fuse_in_memory(model: nn.Module, steering: Steering, strength: float = 1.0,
                   inverse: bool = False, backend: str | None = None) -> nn.Module:
    """Apply each map inside its norm: LayerNorm/GroupNorm with bias get folded weights (the
    same module type); RMSNorms become ``SteeredRMSNorm``. In place; returns the model."""
    from .fusion import refuse_gates
    refuse_gates([steering])
    named = dict(model.named_modules())
    steering.validate(model, strict=False)
    problems, swaps = {}, []
    for name in steering.modules:
        mod = named[name]
        kind = _norm_kind(mod)
        if kind is None:
            problems[name] = f"{type(mod).__name__} is not a normalization with an affine weight"
            continue
        if kind == "affine_norm" and getattr(mod, "bias", None) is None:
            problems[name] = "LayerNorm/GroupNorm without bias: use attach() for this module"
            continue
        swaps.append((name, mod, kind))
    if problems:
        raise FusionError(problems)
    if strength == 0:
        return model
    with torch.no_grad():
        for name, mod, kind in swaps:
            a, c = coefficients(*steering[name], strength, inverse)
            if kind == "affine_norm":
                _fold(_Plan(name, mod, a, c, kind))
            else:
                parent_name, _, local = name.rpartition(".")
                parent = named[parent_name] if parent_name else model
                setattr(parent, local, SteeredRMSNorm(mod, a, c, backend))
    return model


def unfuse_in_memory(model: nn.Module) -> nn.Module:
    """Put back the RMSNorms that ``fuse_in_memory`` replaced (folded LayerNorm weights stay)."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, SteeredRMSNorm):
            parent_name, _, local = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, local, mod.original[0])
    return model
