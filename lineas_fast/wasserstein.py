"""Public loss: ``sliced_wasserstein`` and ``TargetProfile`` (SPEC §2).

The loss is per coordinate the exact squared 1-D Wasserstein distance between the source
samples and the target samples, summed or averaged over coordinates and layers.
"""

from __future__ import annotations

import functools
from typing import Sequence, Union

import torch

from lineas_fast.kernels._backend import check_same_device, use_triton
from lineas_fast.kernels.ops import wasserstein_loss
from lineas_fast.kernels.wasserstein_ref import kernel_runs, layer_weights, target_profile

REDUCTIONS = ("reference", "sum")


def _check_2d(t: torch.Tensor, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != 2:
        raise ValueError(f"{what} must be 2-D (samples, coordinates), got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{what} is an empty set (0 samples), shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got {t.dtype}")


class TargetProfile:
    """The fixed target of one layer, sorted once into its per-rank profile for n source samples.

    Args:
        y: (m, d) target samples (any float dtype; gradients never flow to it).
        n: number of source samples each loss call will compare against it.
    Attributes:
        mean (n, d) float32: ḡ, mean of the target quantile function over each source cell.
        var (n, d) float32: q̄ − ḡ², its variance over the cell (0 when n = m).
        var_sum () float32: Σ of var (summed in float64), the constant v̄ adds to the loss.
    """

    def __init__(self, y: torch.Tensor, n: int):
        _check_2d(y, "target y")
        if int(n) < 1:
            raise ValueError(f"n (source samples) must be >= 1, got {n}")
        self.n, self.m, self.d = int(n), y.shape[0], y.shape[1]
        self.mean, self.var = target_profile(y, self.n)
        self.var_sum = self.var.double().sum().float()

    @property
    def mean_square(self) -> torch.Tensor:
        """q̄ (n, d): mean of the squared target quantile function over each source cell."""
        return self.var + self.mean * self.mean

    def to(self, device) -> "TargetProfile":
        out = object.__new__(TargetProfile)
        out.__dict__.update(self.__dict__)
        out.mean, out.var = self.mean.to(device), self.var.to(device)
        out.var_sum = self.var_sum.to(device)
        return out

    def __repr__(self) -> str:
        return f"TargetProfile(n={self.n}, m={self.m}, d={self.d})"


class PackedTargetProfile:
    """Several layers' profiles concatenated along coordinates, built once for training so
    each step's loss reads one (n, D) buffer. Created by ``pack_profiles``.

    Attributes: n; dims (L ints); mean, var (n, Σd) float32; var_sum (L,) float32, each
    layer's Σ v̄ (the loss kernel never reads var)."""

    def __init__(self, profiles: Sequence[TargetProfile]):
        ns = {p.n for p in profiles}
        if len(ns) != 1:
            raise ValueError(f"profiles to pack must share n, got n in {sorted(ns)}")
        self.profiles = list(profiles)
        self.n = ns.pop()
        self.dims = [p.d for p in profiles]
        self.mean = torch.cat([p.mean for p in profiles], 1).contiguous()
        self.var = torch.cat([p.var for p in profiles], 1).contiguous()
        self.var_sum = torch.stack(
            [getattr(p, "var_sum", p.var.double().sum().float()).to(self.mean.device) for p in profiles]
        )


def pack_profiles(profiles: Sequence[TargetProfile]) -> PackedTargetProfile:
    return PackedTargetProfile(profiles)


Target = Union[torch.Tensor, TargetProfile]


def sliced_wasserstein(
    x: Union[torch.Tensor, Sequence[torch.Tensor]],
    y: Union[Target, Sequence[Target], PackedTargetProfile],
    reduction: str = "reference",
    *,
    return_per_layer: bool = False,
    backend: str | None = None,
):
    """Exact per-coordinate squared 1-D Wasserstein loss between source and target sets.

    Args:
        x: (n, d) source tensor, or a list of them (one per layer, each its own d, same n).
            float32, bfloat16 or float16 (float64 runs the PyTorch path); any strides.
        y: matching (m, d) target tensors (m may differ from n; exact, not subsampled), or
            ``TargetProfile(y, n)`` objects, or one ``PackedTargetProfile`` for the whole list.
            Targets are constants: a target that requires grad is an error.
        reduction: "reference" (mean over layers of the mean over coordinates of n·W2², the
            published code's scale) or "sum" (Σ over layers and coordinates of W2²).
        return_per_layer: also return a (L,) float32 tensor of each layer's loss (detached), in
            the same scale as a single-layer call with that reduction. Neither output is read
            back to the host: the call never synchronises with the device.
        backend: "auto" (CUDA → Triton kernel, CPU → PyTorch), "torch" or "triton".
    Returns:
        A float32 scalar (and the per-layer tensor). Gradients flow to x only. NaN or Inf in x
        or y gives a non-finite loss (never silently dropped).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    single = isinstance(x, torch.Tensor)
    xs = [x] if single else list(x)
    if not xs:
        raise ValueError("x is an empty list of layers")
    for i, xi in enumerate(xs):
        _check_2d(xi, f"x[{i}]" if not single else "x")
    n = xs[0].shape[0]
    if any(xi.shape[0] != n for xi in xs):
        raise ValueError(
            f"all layers must have the same number of source samples, got {[xi.shape[0] for xi in xs]}"
        )
    packed = _as_packed(y, xs, single)
    device = check_same_device(**{f"x[{i}]": xi for i, xi in enumerate(xs)}, target=packed.mean)
    if len({xi.dtype for xi in xs}) > 1:  # one dtype per call (the kernel's loads)
        common = functools.reduce(torch.promote_types, [xi.dtype for xi in xs])
        xs = [xi.to(common) for xi in xs]
    weight, total_scale = layer_weights(tuple(packed.dims), n, reduction, device)
    use_kernel = use_triton(device, backend) and kernel_runs(xs)
    need_grad = torch.is_grad_enabled() and any(xi.requires_grad for xi in xs)
    loss, per_layer, _ = wasserstein_loss(
        xs, packed.mean, packed.var_sum, weight, total_scale, use_kernel, need_grad
    )
    if not return_per_layer:
        return loss
    return loss, per_layer.detach()


def _as_packed(y, xs, single) -> PackedTargetProfile:
    if isinstance(y, PackedTargetProfile):
        packed = y
    else:
        ys = [y] if single or isinstance(y, (torch.Tensor, TargetProfile)) else list(y)
        if len(ys) != len(xs):
            raise ValueError(f"got {len(xs)} source layers but {len(ys)} targets")
        profiles = []
        for i, (xi, yi) in enumerate(zip(xs, ys)):
            if isinstance(yi, torch.Tensor):
                if yi.requires_grad:
                    raise ValueError(
                        f"target y[{i}] requires grad; targets are constants "
                        f"(gradients flow to x only): pass y.detach()"
                    )
                _check_2d(yi, f"y[{i}]")
                yi = TargetProfile(yi, xi.shape[0])
            elif not isinstance(yi, TargetProfile):
                raise TypeError(f"y[{i}] must be a tensor or TargetProfile, got {type(yi).__name__}")
            profiles.append(yi)
        packed = PackedTargetProfile(profiles)
    n = xs[0].shape[0]
    if packed.n != n:
        raise ValueError(f"target profile was built for n={packed.n} source samples, x has n={n}")
    dims = [xi.shape[1] for xi in xs]
    if packed.dims != dims:
        raise ValueError(f"coordinate dims differ between x {dims} and y {packed.dims}")
    return packed
