"""Host side of the packed Wasserstein loss kernel: launch sizes, the cached per-layer tables and
the launcher that turns the kernel's partial sums into the loss. Importing this module does not
import Triton: ``wasserstein_loss_triton`` imports the kernel module on its first call.

Inputs of ``wasserstein_loss_triton`` (the same as ``wasserstein_ref.wasserstein_loss_ref``):
    xs        L tensors (n, d_l), one dtype (float32 / bfloat16 / float16), any strides
    mean      (n, D) float32 contiguous: ḡ of the packed target profile, D = Σ d_l
    var_sum   (L,) float32: Σ over ranks and coordinates of the layer's v̄
    weight    (L,) float32: w_l, the per-layer reduction weight (``layer_weights``)
    total_scale  the total is total_scale · Σ_l per_layer[l]
    need_grad whether to compute the gradient
Outputs: loss () float32, per_layer (L,) float32 = w_l (Σ_ij (sort x − ḡ)² + var_sum_l), and
grad (n·Σd_l,) float32: layer l's ∂loss/∂x_l, (n, d_l) contiguous at offset n·Σ_{k<l} d_k (empty
when not need_grad). Nothing here reads a device tensor back to the host.
"""

from __future__ import annotations

import collections
import functools

import torch

from ._backend import next_pow2

MAX_N = 2048  # largest source set one program sorts; above it the PyTorch path runs
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TABLE_COLS = 6  # x offset, row stride, column stride, d, profile column, grad offset
_TABLE_CACHE_SIZE = 32


def launch_config(n: int) -> dict:
    """Block sizes for n source samples (n ≤ MAX_N): one warp per program and about 32 keys
    per thread, so each column's sort stays within one warp (in registers, or across lanes by
    shuffles: no barrier); at the paper's n = 32, 32 columns of 32 ranks, one column per lane.
    n > 1024 needs two warps (one warp would spill)."""
    n_pad = max(16, next_pow2(n))
    if n_pad <= 1024:
        return {"N_PAD": n_pad, "BLOCK_D": min(64, 1024 // n_pad), "num_warps": 1}
    return {"N_PAD": n_pad, "BLOCK_D": 1, "num_warps": 2 * n_pad // 2048}


@functools.lru_cache(maxsize=64)
def layer_weights(dims: tuple, n: int, reduction: str, device: torch.device) -> tuple:
    """(weight (L,) float32 on device, total_scale): per_layer[l] = w_l · Σ_ij err_l is each
    layer's loss in the scale of a single-layer call; the total is total_scale · Σ_l per_layer.
    reference: w_l = 1/d_l (n·mean_j W2²_j), total = the mean over layers; sum: w_l = 1/n,
    total = the sum. Built once per (dims, n, reduction, device)."""
    if reduction == "reference":
        w, scale = [1.0 / d for d in dims], 1.0 / len(dims)
    else:
        w, scale = [1.0 / n] * len(dims), 1.0
    return torch.tensor(w, dtype=torch.float32).to(device), scale


_tables: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()


def layer_table(xs: list, n: int) -> tuple[torch.Tensor, bool]:
    """The (L, TABLE_COLS) int64 device table of the kernel, and whether every layer has unit
    column stride. x offsets are in elements from xs[0]'s first element. Cached by the layers'
    addresses, strides and dims (a training loop's activations come back at the same addresses,
    so a steady loop builds no table); a new entry is copied from pinned memory without a
    synchronisation."""
    x0 = xs[0].data_ptr()
    item = xs[0].element_size()
    key = (xs[0].device, xs[0].dtype, n) + tuple(
        (x.data_ptr(), x.stride(0), x.stride(1), x.shape[1]) for x in xs
    )
    entry = _tables.get(key)
    if entry is None:
        rows, col, goff = [], 0, 0
        for x in xs:
            d = x.shape[1]
            rows.append([(x.data_ptr() - x0) // item, x.stride(0), x.stride(1), d, col, goff])
            col, goff = col + d, goff + n * d
        pin = xs[0].device.type == "cuda"
        host = torch.tensor(rows, dtype=torch.int64, pin_memory=pin)
        # the pinned source stays cached with its copy: a captured CUDA graph replays the copy
        entry = (host, host.to(xs[0].device, non_blocking=pin))
        _tables[key] = entry
        if len(_tables) > _TABLE_CACHE_SIZE:
            _tables.popitem(last=False)
    else:
        _tables.move_to_end(key)
    table = entry[1]
    unit = all(x.stride(1) == 1 or x.shape[1] == 1 for x in xs)
    return table, unit


def kernel_runs(xs: list) -> bool:
    """Whether the kernel can take these layers (else the PyTorch reference runs)."""
    return (
        xs[0].shape[0] <= MAX_N and xs[0].dtype in KERNEL_DTYPES and all(x.dtype == xs[0].dtype for x in xs)
    )


def _addressable(xs: list) -> list:
    """Layers whose byte distance from xs[0] is not a whole number of elements are copied
    (never happens for tensors torch allocated in the same dtype)."""
    x0, item = xs[0].data_ptr(), xs[0].element_size()
    return [x if (x.data_ptr() - x0) % item == 0 else x.clone() for x in xs]


def wasserstein_loss_triton(
    xs: list,
    mean: torch.Tensor,
    var_sum: torch.Tensor,
    weight: torch.Tensor,
    total_scale: float,
    need_grad: bool,
):
    """The loss through the kernel: returns (loss, per_layer, grad); see the module docstring."""
    from .wasserstein_triton import wasserstein_partials_triton

    xs = _addressable(list(xs))
    n = xs[0].shape[0]
    table, unit = layer_table(xs, n)
    total = n * sum(x.shape[1] for x in xs)
    grad = torch.empty(total, device=mean.device, dtype=torch.float32) if need_grad else mean.new_empty(0)
    part = wasserstein_partials_triton(
        xs[0],
        table,
        mean,
        weight,
        n,
        max(x.shape[1] for x in xs),
        unit,
        2.0 * total_scale,
        grad if need_grad else None,
    )
    per_layer = part.sum(1).add_(var_sum).mul_(weight)
    return per_layer.sum() * total_scale, per_layer, grad
