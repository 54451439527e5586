"""Finding modules by regex and reading their outputs' coordinate axis."""

from __future__ import annotations

import difflib
import re

import torch
from torch import nn

from lineas_fast.checks import ArgumentError


def match_modules(model: nn.Module, pattern: str, what: str = "modules") -> list[str]:
    """Names of ``model.named_modules()`` that ``re.fullmatch`` ``pattern``, in model order.
    Raises ValueError listing nearby names when nothing matches."""
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ArgumentError(f"{what} pattern {pattern!r} is not a valid regex: {e}", what) from None
    names = [n for n, _ in model.named_modules() if n]
    hits = [n for n in names if rx.fullmatch(n)]
    if not hits:
        raise ArgumentError(
            f"{what} pattern {pattern!r} matches no module of "
            f"{type(model).__name__}; nearby names: {nearby_names(names, pattern)}",
            what,
        )
    return hits


def nearby_names(names: list[str], query: str, k: int = 8) -> list[str]:
    close = difflib.get_close_matches(query, names, n=k, cutoff=0.3)
    norms = [n for n in names if "norm" in n.lower()][:k]
    return close or norms or names[:k]


def coordinate_dim(module: nn.Module) -> int | None:
    """The number of coordinates a module's output has, when its parameters tell."""
    if isinstance(module, (nn.GroupNorm,)):
        return module.num_channels
    if isinstance(module, nn.LayerNorm):
        return int(torch.Size(module.normalized_shape).numel())
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and w.ndim == 1:
        return w.shape[0]
    if isinstance(module, nn.Linear):
        return module.out_features
    return None


_CHANNEL_FIRST_TYPES = (nn.GroupNorm, nn.BatchNorm2d, nn.Conv2d, nn.InstanceNorm2d)


def channel_dim_of(module: nn.Module, out: torch.Tensor, d: int, name: str) -> int:
    """Which axis of ``out`` holds the d coordinates: last for token streams (B, T, d),
    1 for image maps (B, C, H, W)."""
    if (
        out.ndim >= 3
        and out.shape[1] == d
        and (isinstance(module, _CHANNEL_FIRST_TYPES) or out.shape[-1] != d)
    ):
        return 1
    if out.shape[-1] == d:
        return -1
    raise ValueError(
        f"module {name!r} outputs shape {tuple(out.shape)}, which has no axis of "
        f"size {d} (the steering map's dimension)"
    )
