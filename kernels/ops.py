"""The steering kernels as PyTorch custom ops (``torch.library.custom_op``), one op per map call.

A custom op is opaque to ``torch.compile`` (a steered model compiles with ``fullgraph=True``:
no graph break), is captured by CUDA graphs like any aten op, and shows up as one op in a
dispatch trace. Each op takes ``use_kernel``: True launches the Triton kernel (CUDA tensors, or
CPU tensors under ``TRITON_INTERPRET=1``), False runs the plain-PyTorch formula on any device;
the caller decides once (``_backend.use_triton``). Triton is imported on the first kernel call,
so these ops register (and their PyTorch path runs) where Triton is not installed.

    lineas_fast::affine_steer(z, u, b, lam?, lam_scalar, channel_dim, use_kernel) -> y
        y = z + λ(u⊙z + b); z any shape with the d coordinates at ``channel_dim``; u, b (d,);
        lam None (then the float ``lam_scalar``) or a float32 (P·S,) per-token strength, the
        tokens being z's positions without the channel axis, in order.
    lineas_fast::gated_steer(z, u, b, w, c, lam, relu, use_kernel) -> (y, s)
        z (T, d) contiguous; w (d,), c (1,); s (T,) float32 = λ·gate(w·z + c).
    lineas_fast::rms_norm_shift(x, weight, shift, eps, gemma, use_kernel) -> y
        RMSNorm with the steering shift (inference: no autograd formula).
    lineas_fast::wasserstein_loss(xs, mean, var_sum, weight, total_scale, use_kernel, need_grad)
        -> (loss, per_layer, grad): the packed loss of every layer (below, "The loss op").

Gradients (``register_autograd``) come from the ``*_backward`` ops: the kernels' fused
backward, or the same closed-form formulas in PyTorch (float32 accumulation; float64 for
float64 inputs). A gradient not needed is returned as an empty tensor by the op and as None
to autograd.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.library import custom_op

from .affine_steer_ref import affine_steer_ref
from .gated_steer_ref import gate_fn, gated_steer_ref
from .rms_norm_shift_ref import rms_norm_shift_ref
from .wasserstein_ref import wasserstein_loss_ref


def _none(like: Tensor) -> Tensor:
    """A fresh empty float32 tensor: the op's "no gradient" output (outputs may not alias)."""
    return like.new_empty(0, dtype=torch.float32)


def _acc(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _coord_shape(z: Tensor, cd: int) -> list[int]:
    shape = [1] * z.ndim
    shape[cd] = z.shape[cd]
    return shape


def _token_shape(z: Tensor, cd: int) -> list[int]:
    shape = list(z.shape)
    shape[cd] = 1
    return shape


# --- affine map -----------------------------------------------------------------------------
@custom_op("lineas_fast::affine_steer", mutates_args=())
def affine_steer_op(
    z: Tensor,
    u: Tensor,
    b: Tensor,
    lam: Optional[Tensor],
    lam_scalar: float,
    channel_dim: int,
    use_kernel: bool,
) -> Tensor:
    if use_kernel:
        from .affine_steer import affine_steer_fwd

        return affine_steer_fwd(z, u, b, lam, lam_scalar, channel_dim)
    lam_v = lam.view(_token_shape(z, channel_dim)) if lam is not None else lam_scalar
    return affine_steer_ref(z, u, b, lam_v, channel_dim)


@affine_steer_op.register_fake
def _(z, u, b, lam, lam_scalar, channel_dim, use_kernel):
    return torch.empty_like(z)


@custom_op("lineas_fast::affine_steer_backward", mutates_args=())
def affine_steer_backward_op(
    z: Tensor,
    g: Tensor,
    u: Tensor,
    b: Tensor,
    lam: Optional[Tensor],
    lam_scalar: float,
    channel_dim: int,
    use_kernel: bool,
    need_param: bool,
    need_lam: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(∂z, ∂u, ∂b, ∂λ); ∂u/∂b empty unless ``need_param``, ∂λ empty unless ``need_lam``."""
    if use_kernel:
        from .affine_steer import affine_steer_bwd

        dz, du, db, dlam = affine_steer_bwd(z, g, u, b, lam, lam_scalar, channel_dim, need_param, need_lam)
    else:
        acc = _acc(z)
        zf, gf = z.to(acc), g.to(acc)
        shape = _coord_shape(z, channel_dim)
        uv, bv = u.to(acc).view(shape), b.to(acc).view(shape)
        lam_v = lam.to(acc).view(_token_shape(z, channel_dim)) if lam is not None else lam_scalar
        dz = (gf * (1 + lam_v * uv)).to(z.dtype)
        axes = [i for i in range(z.ndim) if i != channel_dim]
        du = db = dlam = None
        if need_param:
            lg = lam_v * gf
            du, db = (lg * zf).sum(axes), lg.sum(axes)
        if need_lam:
            dlam = (gf * (uv * zf + bv)).sum(channel_dim).reshape(-1)
    return (
        dz,
        du.to(u.dtype) if du is not None else _none(z),
        db.to(b.dtype) if db is not None else _none(z),
        dlam.to(lam.dtype) if dlam is not None else _none(z),
    )


@affine_steer_backward_op.register_fake
def _(z, g, u, b, lam, lam_scalar, channel_dim, use_kernel, need_param, need_lam):
    return (
        torch.empty_like(z),
        torch.empty_like(u) if need_param else _none(z),
        torch.empty_like(b) if need_param else _none(z),
        torch.empty_like(lam) if need_lam else _none(z),
    )


def _affine_setup(ctx, inputs, output):
    z, u, b, lam, lam_scalar, channel_dim, use_kernel = inputs
    ctx.save_for_backward(z, u, b, lam)
    ctx.lam_scalar, ctx.channel_dim, ctx.use_kernel = lam_scalar, channel_dim, use_kernel


def _affine_backward(ctx, gy):
    z, u, b, lam = ctx.saved_tensors
    need_param = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    need_lam = lam is not None and ctx.needs_input_grad[3]
    dz, du, db, dlam = affine_steer_backward_op(
        z, gy.contiguous(), u, b, lam, ctx.lam_scalar, ctx.channel_dim, ctx.use_kernel, need_param, need_lam
    )
    return (
        dz,
        du if need_param else None,
        db if need_param else None,
        dlam if need_lam else None,
        None,
        None,
        None,
    )


affine_steer_op.register_autograd(_affine_backward, setup_context=_affine_setup)


# --- gated map (DSAS) -----------------------------------------------------------------------
def _gate(logit: Tensor, relu: bool) -> tuple[Tensor, Tensor]:
    """(g, g') of the gate at ``logit`` (g from the reference's ``gate_fn``)."""
    g = gate_fn(logit, "relu" if relu else "sigmoid")
    dg = ((logit > 0) & (logit < 1)).to(logit.dtype) if relu else g * (1 - g)
    return g, dg


@custom_op("lineas_fast::gated_steer", mutates_args=())
def gated_steer_op(
    z: Tensor, u: Tensor, b: Tensor, w: Tensor, c: Tensor, lam: float, relu: bool, use_kernel: bool
) -> tuple[Tensor, Tensor]:
    if use_kernel:
        from .gated_steer import gated_steer_fwd

        return gated_steer_fwd(z, u, b, w, c, lam, relu)
    return gated_steer_ref(z, u, b, w, c.reshape(()), lam, "relu" if relu else "sigmoid")


@gated_steer_op.register_fake
def _(z, u, b, w, c, lam, relu, use_kernel):
    return torch.empty_like(z), z.new_empty(z.shape[:-1], dtype=torch.float32)


@custom_op("lineas_fast::gated_steer_backward", mutates_args=())
def gated_steer_backward_op(
    z: Tensor,
    gy: Tensor,
    u: Tensor,
    b: Tensor,
    w: Tensor,
    c: Tensor,
    lam: float,
    relu: bool,
    use_kernel: bool,
    need_param: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(∂z, ∂u, ∂b, ∂w, ∂c); the last four empty unless ``need_param``."""
    if use_kernel:
        from .gated_steer import gated_steer_bwd

        dz, du, db, dw, dc = gated_steer_bwd(z, gy, u, b, w, c, lam, relu, need_param)
        if not need_param:
            return dz, _none(z), _none(z), _none(z), _none(z)
        return dz, du, db, dw, dc
    acc = _acc(z)
    zf, G = z.to(acc), gy.to(acc)
    uf, bf, wf = u.to(acc), b.to(acc), w.to(acc)
    g, dg = _gate(zf @ wf + c.to(acc), relu)
    s, ldg = lam * g, lam * dg
    r = (G * (uf * zf + bf)).sum(-1)
    dz = G * (1 + s.unsqueeze(-1) * uf) + (ldg * r).unsqueeze(-1) * wf
    if not need_param:
        return dz.to(z.dtype), _none(z), _none(z), _none(z), _none(z)
    sG = s.unsqueeze(-1) * G
    lr = (ldg * r).unsqueeze(-1)
    return (
        dz.to(z.dtype),
        (sG * zf).sum(0).to(u.dtype),
        sG.sum(0).to(b.dtype),
        (lr * zf).sum(0).to(w.dtype),
        (ldg * r).sum().reshape(c.shape).to(c.dtype),
    )


@gated_steer_backward_op.register_fake
def _(z, gy, u, b, w, c, lam, relu, use_kernel, need_param):
    if not need_param:
        return torch.empty_like(z), _none(z), _none(z), _none(z), _none(z)
    return (
        torch.empty_like(z),
        torch.empty_like(u),
        torch.empty_like(b),
        torch.empty_like(w),
        torch.empty_like(c),
    )


def _gated_setup(ctx, inputs, output):
    z, u, b, w, c, lam, relu, use_kernel = inputs
    ctx.save_for_backward(z, u, b, w, c)
    ctx.lam, ctx.relu, ctx.use_kernel = lam, relu, use_kernel


def _gated_backward(ctx, gy, _gs):
    z, u, b, w, c = ctx.saved_tensors
    need = any(ctx.needs_input_grad[1:5])
    dz, du, db, dw, dc = gated_steer_backward_op(
        z, gy.contiguous(), u, b, w, c, ctx.lam, ctx.relu, ctx.use_kernel, need
    )
    if not need:
        return dz, None, None, None, None, None, None, None
    return dz, du, db, dw, dc, None, None, None


gated_steer_op.register_autograd(_gated_backward, setup_context=_gated_setup)


# --- RMSNorm with the steering shift (inference) --------------------------------------------
@custom_op("lineas_fast::rms_norm_shift", mutates_args=())
def rms_norm_shift_op(
    x: Tensor, weight: Tensor, shift: Tensor, eps: float, gemma: bool, use_kernel: bool
) -> Tensor:
    if use_kernel:
        from .rms_norm_shift import rms_norm_shift_triton

        return rms_norm_shift_triton(x, weight, shift, eps, gemma)
    return rms_norm_shift_ref(x, weight, shift, eps, gemma)


@rms_norm_shift_op.register_fake
def _(x, weight, shift, eps, gemma, use_kernel):
    return torch.empty_like(x)


# The loss op ---------------------------------------------------------------------------------
"""The packed Wasserstein loss as a PyTorch custom op, ``torch.ops.lineas_fast.wasserstein_loss``,
with a fake (meta) implementation and autograd, so ``torch.compile`` sees one opaque op.

    wasserstein_loss(xs, mean, var_sum, weight, total_scale, use_kernel, need_grad)
        -> (loss (), per_layer (L,), grad (n·Σd_l,))

xs: L tensors (n, d_l); mean (n, Σd_l) float32; var_sum, weight (L,) float32 (see
``wasserstein.py``). ``use_kernel`` runs the Triton kernel (imported on first use, so the
package imports without Triton), else the PyTorch reference (``wasserstein_ref.py``): the
same math. The gradient is computed in the forward, in float32 (float64 for float64 input)
whatever x's dtype, and only when ``need_grad``; ``grad`` and ``per_layer`` are outputs that
carry no gradient. The backward scales the saved gradient by the incoming one in place (for
16-bit x: one pass writing x's dtype) and returns per-layer views of it, so no pass rounds
the gradient before a loss scale is applied. A second backward through the same graph
(``retain_graph=True``) recomputes the gradient instead of reusing the scaled buffer. A traced
backward (torch.compile) scales out of place: it may not mutate a forward output.
"""
OP_NAME = "lineas_fast::wasserstein_loss"


def _acc_dtype(xs) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


@torch.library.custom_op(OP_NAME, mutates_args=())
def wasserstein_loss(
    xs: list[torch.Tensor],
    mean: torch.Tensor,
    var_sum: torch.Tensor,
    weight: torch.Tensor,
    total_scale: float,
    use_kernel: bool,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_kernel:
        from .wasserstein import wasserstein_loss_triton

        return wasserstein_loss_triton(xs, mean, var_sum, weight, total_scale, need_grad)
    return wasserstein_loss_ref(xs, mean, var_sum, weight, total_scale, need_grad)


@wasserstein_loss.register_fake
def _(xs, mean, var_sum, weight, total_scale, use_kernel, need_grad):
    acc = _acc_dtype(xs)
    total = xs[0].shape[0] * sum(x.shape[1] for x in xs) if need_grad else 0
    return (
        mean.new_empty((), dtype=acc),
        mean.new_empty((len(xs),), dtype=acc),
        mean.new_empty((total,), dtype=acc),
    )


def _setup_context(ctx, inputs, output):
    xs, mean, var_sum, weight, total_scale, use_kernel, need_grad = inputs
    _, per_layer, grad = output
    ctx.mark_non_differentiable(per_layer, grad)
    ctx.set_materialize_grads(False)
    ctx.grad = grad if need_grad else None
    ctx.shapes = [(x.shape, x.dtype) for x in xs]
    ctx.save_for_backward(*xs, mean, var_sum, weight)  # only for a second backward
    ctx.args = (total_scale, use_kernel)
    ctx.scaled = False


def _backward(ctx, grad_loss, _grad_per_layer, _grad_grad):
    n_layers = len(ctx.shapes)
    needs = ctx.needs_input_grad[0]
    if grad_loss is None or ctx.grad is None or not any(needs):
        return [None] * n_layers, None, None, None, None, None, None
    grad = ctx.grad
    # In place only in eager mode: a traced backward (torch.compile, AOTAutograd) may not
    # mutate a forward output, and there the product fuses with what consumes it anyway.
    eager = type(grad) is torch.Tensor and not torch.compiler.is_compiling()
    if eager and ctx.scaled:  # retain_graph: the saved buffer was scaled already
        saved = ctx.saved_tensors
        with torch.no_grad():
            grad = torch.ops.lineas_fast.wasserstein_loss(
                list(saved[:n_layers]), *saved[n_layers:], *ctx.args, True
            )[2]
    dtype = ctx.shapes[0][1]
    if not eager:
        grad = grad * grad_loss
    elif all(dt == grad.dtype for _, dt in ctx.shapes):
        grad = grad.mul_(grad_loss)  # in place
        ctx.scaled = True
    elif all(dt == dtype for _, dt in ctx.shapes):  # one pass to x's dtype
        grad = torch.mul(grad, grad_loss, out=torch.empty_like(grad, dtype=dtype))
    else:
        grad = grad * grad_loss
    sizes = [shape[0] * shape[1] for shape, _ in ctx.shapes]
    grads = [
        g.view(shape).to(dt) if need else None
        for g, (shape, dt), need in zip(grad.split(sizes), ctx.shapes, needs)
    ]
    return grads, None, None, None, None, None, None


wasserstein_loss.register_autograd(_backward, setup_context=_setup_context)
