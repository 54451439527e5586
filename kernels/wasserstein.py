"""The packed Wasserstein loss kernel and its host launcher (the cached per-layer tables, and
the launcher that turns the kernel's partial sums into the loss). This module imports Triton; the
launch facts the library reads without Triton (``MAX_N``, ``launch_config``, ``layer_weights``,
``kernel_runs``) live in ``wasserstein_ref.py`` and are re-exported here.

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

The kernel: one launch sorts every coordinate of every layer, compares it
with the target profile and emits per-block loss partials and (when asked) the gradient.

Program (b, l) of the 2-D grid (cdiv(max d_l, BLOCK_D), L) takes columns [b·BLOCK_D, (b+1)·BLOCK_D)
of layer l and reads the layer's tensor in place: no concatenation pass. Arguments:
    x_ptr     the first layer's tensor: its dtype (float32 / bfloat16 / float16) types the loads,
              every layer is addressed as x_ptr + offset (all layers share the dtype)
    tab_ptr   (L, 6) int64 layer table (``layer_table``): x element offset from
              x_ptr, row stride, column stride, d_l, first column of the layer in the packed
              profile, element offset of the layer's gradient in grad_ptr
    g_ptr     (n, D) float32 contiguous: ḡ, the packed target profile mean per rank
    w_ptr     (L,) float32: per-layer weight (1/d_l or 1/n, the reduction)
    part_ptr  (L, NB) float32 out: Σ over the program's columns and ranks of (sort x − ḡ)²
    grad_ptr  (n·Σd_l,) float32 out (NEED_GRAD): layer l's gradient, (n, d_l) contiguous at
              grad_off_l, equal to gscale·w_l·(x − ḡ[rank]) (gscale = 2·total scale)
v̄ (the target's variance per cell) only adds a per-layer constant, added on the host; the
gradient is float32 for every input dtype so a loss scale never meets a low-precision rounding.

Sorting carries the original row with each value: the value is mapped to an order-preserving
integer and packed with its row into one key (int64 for float32 input; int32 for 16-bit input,
half the sort's registers and shuffles), so one ``tl.sort`` gives both the sorted values and the
permutation. Padding rows get the largest key and sort last. −0.0 is read as +0.0 (ties).
"""

from __future__ import annotations

import collections

import torch
import triton
import triton.language as tl

from .wasserstein_ref import (  # noqa: F401  (re-exported: the kernel's launch facts)
    KERNEL_DTYPES,
    MAX_N,
    TABLE_COLS,
    kernel_runs,
    launch_config,
    layer_weights,
)

_TABLE_CACHE_SIZE = 32


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


@triton.jit
def _sort_with_rows(x, rows, mask, WIDE: tl.constexpr):
    """Sort each row of the (BLOCK_D, N_PAD) tile x along dim 1; returns (sorted values as
    float32, original row index of each sorted value)."""
    if WIDE:  # float32 input: int64 keys
        xf = tl.where(x == 0.0, 0.0, x.to(tl.float32))
        bits = xf.to(tl.int32, bitcast=True)
        okey = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # order-preserving int32
        key = (okey.to(tl.int64) << 32) | rows[None, :].to(tl.int64)
        key = tl.where(mask, key, 0x7FFFFFFFFFFFFFFF)
        key = tl.sort(key, dim=1)
        skey = (key >> 32).to(tl.int32)
        xs = (skey ^ ((skey >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
        src = (key & 0xFFFFFFFF).to(tl.int32)
    else:  # 16-bit input: int32 keys
        x16 = tl.where(x == 0.0, 0.0, x).to(x.dtype)
        bits = x16.to(tl.int16, bitcast=True).to(tl.int32)  # sign-extended
        okey = bits ^ ((bits >> 15) & 0x7FFF)  # order-preserving
        key = (okey << 16) | rows[None, :]
        key = tl.where(mask, key, 0x7FFFFFFF)
        key = tl.sort(key, dim=1)
        skey = key >> 16
        sbits = (skey ^ ((skey >> 15) & 0x7FFF)).to(tl.int16)
        xs = sbits.to(x.dtype, bitcast=True).to(tl.float32)
        src = key & 0xFFFF
    return xs, src


@triton.jit
def _wasserstein_fwd_kernel(
    x_ptr,
    tab_ptr,
    g_ptr,
    w_ptr,
    part_ptr,
    grad_ptr,
    gscale,
    n,
    D,
    NB,
    N_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UNIT_COLS: tl.constexpr,
    NEED_GRAD: tl.constexpr,
):
    blk = tl.program_id(0)
    layer = tl.program_id(1)
    t = tab_ptr + layer * 6
    x_off = tl.load(t)
    stride_n = tl.load(t + 1)
    d = tl.load(t + 3)
    col0 = tl.load(t + 4)
    cols = blk * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    rows = tl.arange(0, N_PAD)  # (N_PAD,)
    cmask = cols < d
    mask = cmask[:, None] & (rows[None, :] < n)  # (BLOCK_D, N_PAD)
    if UNIT_COLS:  # every layer has stride 1
        col_off = cols[:, None]
    else:
        col_off = cols[:, None].to(tl.int64) * tl.load(t + 2)
    x = tl.load(x_ptr + x_off + rows[None, :].to(tl.int64) * stride_n + col_off, mask=mask, other=0.0)
    xs, src = _sort_with_rows(x, rows, mask, x_ptr.dtype.element_ty == tl.float32)
    g = tl.load(g_ptr + rows[None, :].to(tl.int64) * D + (col0 + cols[:, None]), mask=mask, other=0.0)
    diff = tl.where(mask, xs - g, 0.0)
    tl.store(part_ptr + layer * NB + blk, tl.sum(tl.sum(diff * diff, axis=1), axis=0))
    if NEED_GRAD:
        grad_off = tl.load(t + 5)
        w = tl.load(w_ptr + layer)
        grad = (gscale * w) * diff
        tl.store(grad_ptr + grad_off + src * d + cols[:, None], grad, mask=mask)


def wasserstein_partials_triton(
    x0: torch.Tensor,
    table: torch.Tensor,
    g: torch.Tensor,
    w: torch.Tensor,
    n: int,
    max_d: int,
    unit_cols: bool,
    gscale: float,
    grad: torch.Tensor | None,
) -> torch.Tensor:
    """Launch the kernel over L = table.shape[0] layers; returns the (L, NB) float32 partial
    sums. ``grad`` (n·Σd_l,) float32 is filled when given (None: no gradient work)."""
    assert table.shape[1] == TABLE_COLS, table.shape
    L = table.shape[0]
    cfg = launch_config(n)
    nb = triton.cdiv(max_d, cfg["BLOCK_D"])
    part = torch.empty((L, nb), device=x0.device, dtype=torch.float32)
    need_grad = grad is not None
    _wasserstein_fwd_kernel[(nb, L)](
        x0,
        table,
        g,
        w,
        part,
        grad if need_grad else part,
        float(gscale),
        n,
        g.shape[1],
        nb,
        N_PAD=cfg["N_PAD"],
        BLOCK_D=cfg["BLOCK_D"],
        UNIT_COLS=unit_cols,
        NEED_GRAD=need_grad,
        num_warps=cfg["num_warps"],
    )
    return part
