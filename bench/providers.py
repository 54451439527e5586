"""The implementations the benchmarks compare, at the same shapes.

Loss (L layers, n samples, d coordinates each):
  * ``lineas_fast``: ``lf.sliced_wasserstein`` on packed profiles (one launch on CUDA).
  * ``torch_eager``: the published code's form, a per-layer ``torch.sort`` of source and target.
  * ``torch_compile``: ``torch.compile`` of the eager form.
Intervention on (tokens, d) activations:
  * ``lineas_fast``: ``lf.affine_steer``; ``torch_eager``: z + λ((ω−1)z + b) in PyTorch;
    ``torch_compile``: its compiled form.
"""

from __future__ import annotations

import torch

import lineas_fast as lf


def loss_inputs(n, d, layers, device, dtype=torch.float32, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    xs = [torch.randn(n, d, generator=gen).to(device, dtype).requires_grad_() for _ in range(layers)]
    ys = [torch.randn(n, d, generator=gen).to(device, dtype) for _ in range(layers)]
    return xs, ys


def eager_loss(xs, ys_sorted):
    total = 0
    for x, ys in zip(xs, ys_sorted):
        total = total + ((x.sort(0).values - ys) ** 2).sum(0).mean()
    return total / len(xs)


def loss_fn(provider, xs, ys):
    """A closure computing the loss the provider's way (targets prepared once, outside)."""
    if provider == "lineas_fast":
        packed = lf.pack_profiles([lf.TargetProfile(y, xs[0].shape[0]) for y in ys])
        return lambda: lf.sliced_wasserstein(xs, packed)
    ys_sorted = [y.sort(0).values for y in ys]
    if provider == "torch_eager":
        return lambda: eager_loss(xs, ys_sorted)
    if provider == "torch_compile":
        compiled = torch.compile(eager_loss)
        return lambda: compiled(xs, ys_sorted)
    raise ValueError(provider)


def eager_steer(z, om, b, lam):
    return z + lam * ((om - 1) * z + b)


def steer_fn(provider, z, om, b, lam=0.5):
    if provider == "lineas_fast":
        return lambda: lf.affine_steer(z, om, b, lam)
    if provider == "torch_eager":
        return lambda: eager_steer(z, om, b, lam)
    if provider == "torch_compile":
        compiled = torch.compile(eager_steer)
        return lambda: compiled(z, om, b, lam)
    raise ValueError(provider)
