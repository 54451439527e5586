"""The packed Wasserstein loss as a PyTorch custom op, ``torch.ops.lineas_fast.wasserstein_loss``,
with a fake (meta) implementation and autograd, so ``torch.compile`` sees one opaque op.

    wasserstein_loss(xs, mean, var_sum, weight, total_scale, use_kernel, need_grad)
        -> (loss (), per_layer (L,), grad (n·Σd_l,))

xs: L tensors (n, d_l); mean (n, Σd_l) float32; var_sum, weight (L,) float32 (see
``kernels.wasserstein``). ``use_kernel`` runs the Triton kernel (imported on first use, so the
package imports without Triton), else the PyTorch reference (``kernels.wasserstein_ref``): the
same math. The gradient is computed in the forward, in float32 (float64 for float64 input)
whatever x's dtype, and only when ``need_grad``; ``grad`` and ``per_layer`` are outputs that
carry no gradient. The backward scales the saved gradient by the incoming one in place (for
16-bit x: one pass writing x's dtype) and returns per-layer views of it, so no pass rounds
the gradient before a loss scale is applied. A second backward through the same graph
(``retain_graph=True``) recomputes the gradient instead of reusing the scaled buffer. A traced
backward (torch.compile) scales out of place: it may not mutate a forward output.
"""

from __future__ import annotations

import torch

from .kernels.wasserstein_ref import wasserstein_loss_ref

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
        from .kernels.wasserstein import wasserstein_loss_triton

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
