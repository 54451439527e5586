"""Linear-AcT (SPEC §4): the closed-form per-coordinate map, and fitting it module after module."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import torch
from torch import nn

from .modules import match_modules
from .steering import Steering, model_fingerprint
from .wasserstein import TargetProfile


def linear_act_map(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OLS of the sorted target on the sorted source, per coordinate, in float64.

    Args:
        x: (n, d) source samples, y: (m, d) target samples. For m = n the regressand is sort(y);
            for m ≠ n it is the target profile ḡ (the target quantile function averaged over
            each source cell), which equals sort(y) when m = n.
    Returns:
        (omega, bias) float32 (d,): ω_j = Σ(x − x̄)(y − ȳ) / Σ(x − x̄)², b_j = ȳ − ω_j x̄.
        A coordinate where the source is constant gets ω = 1 and the mean shift b = ȳ − x̄.
    """
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(f"x and y must be 2-D (samples, coordinates), got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x has {x.shape[1]} coordinates but y has {y.shape[1]}")
    if x.shape[0] < 2 or y.shape[0] < 1:
        raise ValueError(f"Linear-AcT needs at least 2 source samples and 1 target sample, got "
                         f"{x.shape[0]} and {y.shape[0]}")
    xs = torch.sort(x.detach().double(), dim=0).values
    if y.shape[0] == x.shape[0]:
        ys = torch.sort(y.detach().double(), dim=0).values
    else:
        ys = TargetProfile(y.detach(), x.shape[0]).mean.double()
    xc, yc = xs - xs.mean(0), ys - ys.mean(0)
    var = (xc * xc).sum(0)
    constant = var <= 1e-300
    omega = torch.where(constant, torch.ones_like(var), (xc * yc).sum(0) / var.clamp_min(1e-300))
    bias = ys.mean(0) - omega * xs.mean(0)
    return omega.float(), bias.float()


def fit_linear_act(model: nn.Module, tokenizer, source: Sequence[str], target: Sequence[str],
                   modules: str = ".*post.*layernorm", max_length: int = 128,
                   autocast_dtype: torch.dtype | None = None, timestep: int | None = None,
                   seed: int = 0) -> Steering:
    """Fit Linear-AcT maps module after module (in execution order), each on source
    activations with the earlier modules' maps active, against the untouched model's target.
    ``model`` may be a diffusers pipeline (``tokenizer`` None; see ``lf.train``)."""
    from .trainer import make_reader
    reader, model = make_reader(model, tokenizer, max_length, autocast_dtype, timestep, seed)
    names = match_modules(model, modules, "modules")
    src, tgt = reader.encode(source, "source"), reader.encode(target, "target")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            target_acts = reader.pooled(tgt, names, stop=True)
            maps: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
            for name in _execution_order(reader, src, names):
                with Steering(maps).attach(model, strict=False) if maps else nullcontext():
                    x = reader.pooled(src, [name], stop=True)[name]
                omega, bias = linear_act_map(x, target_acts[name])
                dev = next(model.parameters()).device
                maps[name] = (omega.to(dev), bias.to(dev))
    finally:
        model.train(was_training)
    meta = {"model": model_fingerprint(model), "method": "linear_act",
            "hyperparameters": {"modules": modules, "max_length": max_length,
                                "n_source": len(src), "n_target": len(tgt)}}
    return Steering({n: maps[n] for n in names}, meta)


def _execution_order(reader, encoded, names) -> list[str]:
    """Module names in the order the forward pass runs them (one short pass)."""
    order = []
    hooks = [reader.modules[n].register_forward_hook(
        lambda _m, _a, _o, n=n: order.append(n) if n not in order else None) for n in names]
    try:
        reader.pooled(encoded, names, idx=[0], stop=True)
    finally:
        for h in hooks:
            h.remove()
    return order
