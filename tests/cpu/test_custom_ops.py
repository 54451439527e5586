"""The custom ops of kernels/ops.py on their PyTorch path: torch.library.opcheck (schema, fake
tensors, autograd registration, AOT dispatch) and gradients checked against autograd through
the plain references (affine_steer_ref, gated_steer_ref) in float64."""

import pytest
import torch

from lineas_fast.kernels.affine_steer_ref import affine_steer_ref
from lineas_fast.kernels.gated_steer_ref import gated_steer_ref
from lineas_fast.kernels.ops import affine_steer_op, gated_steer_op, rms_norm_shift_op
from lineas_fast.kernels.rms_norm_shift_ref import rms_norm_shift_ref

G = torch.Generator().manual_seed(0)


def rand(*shape, dtype=torch.float64, grad=True):
    return torch.randn(*shape, generator=G, dtype=dtype).requires_grad_(grad)


AFFINE = [((2, 5, 6), -1, False), ((2, 6, 3, 4), 1, False), ((2, 5, 6), -1, True), ((2, 6, 3, 4), 1, True)]


@pytest.mark.parametrize("shape,cd,token", AFFINE)
def test_affine_op_passes_opcheck_and_matches_autograd_of_the_reference(shape, cd, token):
    z = rand(*shape)
    d, cdn = shape[cd], cd % len(shape)
    u, b = rand(d), rand(d)
    tok_shape = list(shape)
    tok_shape[cdn] = 1
    lam = rand(*tok_shape) if token else None
    flat = lam.reshape(-1) if token else None
    torch.library.opcheck(affine_steer_op, (z, u, b, flat, 0.7, cdn, False))
    y = affine_steer_op(z, u, b, flat, 0.7, cdn, False)
    ref = affine_steer_ref(z, u, b, lam if token else 0.7, cdn)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    g = torch.randn(shape, generator=G, dtype=torch.float64)
    leaves = [z, u, b] + ([lam] if token else [])
    ours = torch.autograd.grad(y, leaves, g)
    theirs = torch.autograd.grad(ref, leaves, g)
    for name, a, e in zip(["z", "u", "b", "lam"], ours, theirs):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("relu", [False, True])
def test_gated_op_passes_opcheck_and_matches_autograd_of_the_reference(relu):
    z, u, b, w = rand(7, 6), rand(6), rand(6), rand(6)
    c = rand(1)
    if relu:  # logits inside (0, 1) and outside, away from the kinks
        w = (w.detach() * 0.2).requires_grad_()
    torch.library.opcheck(gated_steer_op, (z, u, b, w, c, 0.8, relu, False))
    y, s = gated_steer_op(z, u, b, w, c, 0.8, relu, False)
    ref, s_ref = gated_steer_ref(z, u, b, w, c.reshape(()), 0.8, "relu" if relu else "sigmoid")
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(s, s_ref)
    g = torch.randn(7, 6, generator=G, dtype=torch.float64)
    for name, a, e in zip(
        "zubwc", torch.autograd.grad(y, [z, u, b, w, c], g), torch.autograd.grad(ref, [z, u, b, w, c], g)
    ):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=name)


def test_gated_op_without_parameter_gradients():
    z, u, b, w, c = (
        rand(4, 5),
        rand(5, grad=False),
        rand(5, grad=False),
        rand(5, grad=False),
        rand(1, grad=False),
    )
    y, _ = gated_steer_op(z, u, b, w, c, 0.5, False, False)
    ref, _ = gated_steer_ref(z, u, b, w, c.reshape(()), 0.5, "sigmoid")
    g = torch.randn(4, 5, generator=G, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad(y, z, g)[0], torch.autograd.grad(ref, z, g)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_affine_keeps_the_activation_dtype(dtype):
    z = torch.randn(3, 4, 8, generator=G).to(dtype).requires_grad_()
    u, b = rand(8, dtype=torch.float32), rand(8, dtype=torch.float32)
    y = affine_steer_op(z, u, b, None, 0.5, 2, False)
    assert y.dtype == dtype
    dz, du = torch.autograd.grad(y.float().sum(), [z, u])
    assert dz.dtype == dtype and du.dtype == torch.float32


def test_rms_norm_shift_op():
    x, w, c = rand(3, 8, grad=False), rand(8, grad=False), rand(8, grad=False)
    torch.library.opcheck(
        rms_norm_shift_op,
        (x.float(), w.float(), c.float(), 1e-6, False, False),
        test_utils=("test_schema", "test_faketensor"),
    )
    for gemma in (False, True):
        torch.testing.assert_close(
            rms_norm_shift_op(x, w, c, 1e-6, gemma, False),
            rms_norm_shift_ref(x, w, c, 1e-6, gemma),
            rtol=0,
            atol=0,
        )
