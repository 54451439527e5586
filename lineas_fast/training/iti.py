"""The ITI-C baseline (inference-time intervention along a linear classifier's normal, as the
LinEAS paper runs it): per module, ω = 1 and b = σ·θ, where θ is the unit normal of an
L2-regularised logistic regression separating the pooled source activations (label 0) from the
target ones (label 1), oriented toward the target, and σ the standard deviation of all those
activations projected on θ. The strength λ is the intervention's α (z ↦ z + λσθ), searched by the
sweep on its validation split. Every module's direction is read from the untouched model."""

from __future__ import annotations

from typing import Sequence

import torch

from lineas_fast.checks import number
from lineas_fast.steering import Steering
from lineas_fast.training.distributed import setup as setup_ranks
from lineas_fast.training.gates import logistic_regression
from lineas_fast.training.linear_act import fit_per_module


def iti_c_map(x: torch.Tensor, y: torch.Tensor, l2: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ω = 1, b = σθ) float32 (d,) from source samples x (n, d) and target samples y (m, d).

    The regression runs on the coordinates standardised over x and y together (L2 weight ``l2``
    on those), and its weights are mapped back to the activations' own coordinates before θ is
    normalised. A coordinate constant over both sets gets weight 0."""
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(
            f"x and y must be 2-D with the same coordinates, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape[0] < 1 or y.shape[0] < 1:
        raise ValueError(f"ITI-C needs source and target samples, got {x.shape[0]} and {y.shape[0]}")
    z = torch.cat([x.detach().double(), y.detach().double()])
    labels = torch.cat([torch.zeros(x.shape[0]), torch.ones(y.shape[0])]).double()
    mu, sd = z.mean(0), z.std(0, unbiased=False)
    live = sd > 1e-12
    beta, _ = logistic_regression((z - mu)[:, live] / sd[live], labels, l2)
    w = torch.zeros(z.shape[1], dtype=torch.float64)
    w[live] = beta / sd[live]
    norm = w.norm()
    if norm == 0:
        return torch.ones(z.shape[1]), torch.zeros(z.shape[1])
    theta = w / norm  # the target's side: the regression labels the target 1
    sigma = (z @ theta).std(unbiased=False)
    return torch.ones(z.shape[1]), (sigma * theta).float()


def fit_iti_c(
    model,
    tokenizer,
    source: Sequence[str],
    target: Sequence[str],
    modules: str = ".*o_proj",
    l2: float = 1.0,
    max_length: int = 128,
    autocast_dtype: torch.dtype | None = None,
    timestep: int | None = None,
    seed: int = 0,
    distributed: bool | None = None,
) -> Steering:
    """ITI-C maps (module docstring) at each module matching ``modules`` (default the attention
    outputs, where the paper runs it), every direction read from the untouched model.
    ``distributed``: as for ``fit_linear_act``."""
    l2 = number(l2, "l2", low=0, low_open=True)
    steering = fit_per_module(
        model,
        tokenizer,
        source,
        target,
        modules,
        lambda x, y: iti_c_map(x, y, l2),
        "iti_c",
        max_length=max_length,
        autocast_dtype=autocast_dtype,
        timestep=timestep,
        seed=seed,
        sequential=False,
        ranks=setup_ranks(distributed),
    )
    steering.metadata["hyperparameters"]["l2"] = l2
    return steering
