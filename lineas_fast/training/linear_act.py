"""Closed-form per-module maps, fitted module after module: Linear-AcT (SPEC §4) and the
mean-shift baseline (ω = 1, b = mean(target) − mean(source))."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import torch

from lineas_fast.steering import Steering
from lineas_fast.targets import as_target
from lineas_fast.training.distributed import agreed, describe, settings_digest
from lineas_fast.training.distributed import setup as setup_ranks
from lineas_fast.wasserstein import TargetProfile


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
        raise ValueError(
            f"x and y must be 2-D (samples, coordinates), got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x has {x.shape[1]} coordinates but y has {y.shape[1]}")
    if x.shape[0] < 2 or y.shape[0] < 1:
        raise ValueError(
            f"Linear-AcT needs at least 2 source samples and 1 target sample, got "
            f"{x.shape[0]} and {y.shape[0]}"
        )
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


def fit_linear_act(
    model,
    tokenizer,
    source: Sequence[str],
    target: Sequence[str],
    modules: str = ".*post.*layernorm",
    max_length: int = 128,
    autocast_dtype: torch.dtype | None = None,
    timestep: int | None = None,
    seed: int = 0,
    distributed: bool | None = None,
) -> Steering:
    """Fit Linear-AcT maps module after module (in execution order), each on source
    activations with the earlier modules' maps active, against the untouched model's target.
    ``model`` may be a diffusers pipeline (``tokenizer`` None) or a ``Target`` (see ``lf.train``).
    Under torchrun (``distributed`` as for ``lf.train``) each rank reads its share of the
    sentences and the pooled activations are gathered: every rank fits the same maps."""
    return fit_per_module(
        model,
        tokenizer,
        source,
        target,
        modules,
        linear_act_map,
        "linear_act",
        max_length=max_length,
        autocast_dtype=autocast_dtype,
        timestep=timestep,
        seed=seed,
        ranks=setup_ranks(distributed),
    )


def mean_shift_map(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The additive steering vector: ω = 1, b = mean(y) − mean(x) per coordinate (float32).
    x (n, d) source samples, y (m, d) target samples."""
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(
            f"x and y must be 2-D with the same coordinates, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    bias = y.detach().double().mean(0) - x.detach().double().mean(0)
    return torch.ones_like(bias).float(), bias.float()


def fit_mean_shift(
    model,
    tokenizer,
    source: Sequence[str],
    target: Sequence[str],
    modules: str = ".*post.*layernorm",
    max_length: int = 128,
    autocast_dtype: torch.dtype | None = None,
    timestep: int | None = None,
    seed: int = 0,
    sequential: bool = True,
    distributed: bool | None = None,
) -> Steering:
    """The mean-shift baseline (the additive steering vectors of repeng or steering-vectors):
    ω = 1, b = mean(target) − mean(source) of the pooled activations, per module. With
    ``sequential`` (default) each module's shift is measured with the earlier modules' shifts
    active, as Linear-AcT does, so stacked layers do not add up the same shift; with
    ``sequential=False`` every shift is measured on the untouched model. ``distributed``: as
    for ``fit_linear_act``."""
    return fit_per_module(
        model,
        tokenizer,
        source,
        target,
        modules,
        mean_shift_map,
        "mean_shift",
        max_length=max_length,
        autocast_dtype=autocast_dtype,
        timestep=timestep,
        seed=seed,
        sequential=bool(sequential),
        ranks=setup_ranks(distributed),
    )


def fit_per_module(
    model,
    tokenizer,
    source,
    target,
    modules,
    map_fn,
    method: str,
    *,
    max_length: int = 128,
    autocast_dtype=None,
    timestep=None,
    seed: int = 0,
    sequential: bool = True,
    ranks=None,
) -> Steering:
    """Fit ``map_fn(source (n, d), target (m, d)) -> (ω, b)`` at each module in execution
    order; with ``sequential`` the maps fitted so far are active while the next module's
    source activations are read. With ``ranks`` (``lineas_fast.training.distributed``) each rank
    reads its share of the sentences and the rows are gathered, so every rank fits the same maps."""
    with agreed(ranks) as agreement:
        steered = as_target(
            model,
            tokenizer,
            max_length=max_length,
            autocast_dtype=autocast_dtype,
            timestep=timestep,
            seed=seed,
        )
        names = steered.match(modules, "modules")
        steered.require(names)
        src, tgt = steered.encode(source, "source"), steered.encode(target, "target")
        if ranks is not None:
            noun = "prompt" if steered.kind == "pipeline" else "sentence"
            ranks.check_counts(
                ("source", steered.count(src), f"source {noun}"),
                ("target", steered.count(tgt), f"target {noun}"),
            )
        # the model is compared on its own (model_identity), not by its name or path
        agreement.model = steered.root
        agreement.digest = settings_digest(names, source, target, method, sequential)

    def read(encoded, names):
        if ranks is None:
            return steered.pooled(encoded, names, stop=True)
        return ranks.read(steered, encoded, names)

    with steered.frozen(), torch.no_grad():
        target_acts = read(tgt, names)
        source_acts = None if sequential else read(src, names)
        maps: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name in steered.execution_order(src, names):
            if sequential:
                with Steering(maps).attach(steered, strict=False) if maps else nullcontext():
                    x = read(src, [name])[name]
            else:
                x = source_acts[name]
            omega, bias = map_fn(x, target_acts[name])
            dev = steered.module_device(name)
            maps[name] = (omega.to(dev), bias.to(dev))
    hyper = {
        "modules": modules,
        "max_length": getattr(steered, "max_length", None),
        "n_source": steered.count(src),
        "n_target": steered.count(tgt),
    }
    if method == "mean_shift":
        hyper["sequential"] = sequential
    meta = {"model": steered.fingerprint(), "method": method, "hyperparameters": hyper, **describe(ranks)}
    return Steering({n: maps[n] for n in names}, meta)
