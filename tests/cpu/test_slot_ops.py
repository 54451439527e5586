"""The per-request slot ops without vLLM (lineas_fast/serve/slots.py): defined with
torch.library's schema API, they equal the library's one-map reference per token, copy z exactly
when no token of the step is steered (the CPU's idle path), return a new tensor, and trace into
one opaque node of a ``torch.compile(fullgraph=True)`` graph through their fake kernel."""

import pytest
import torch

from lineas_fast.kernels.affine_steer_ref import affine_steer_ref
from lineas_fast.serve import slots

T, D, S = 7, 16, 3


@pytest.fixture
def tables():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(T, D, generator=g)
    u, b = torch.randn(S, D, generator=g), torch.randn(S, D, generator=g)
    u[0], b[0] = 0.0, 0.0
    rows = torch.tensor([0, 0, 1, 2, 2, 2, 3])  # 3 rows + the identity row (padding)
    slots.set_token_rows(lambda n, device, identity: rows)
    yield z, u, b, rows
    slots.set_token_rows(None)


@pytest.mark.parametrize(
    "row_slot, row_lam",
    [
        ([2, 0, 1, 0], [0.7, 0.0, 1.3, 0.0]),  # mixed
        ([1, 2, 1, 0], [0.5, 2.0, 1.0, 0.0]),  # every row steered
        ([1, 2, 0, 0], [0.0, 0.0, 0.0, 0.0]),  # none steered: the idle path
    ],
)
def test_slot_steer_equals_the_reference_per_token(tables, row_slot, row_lam):
    z, u, b, rows = tables
    row_slot, row_lam = torch.tensor(row_slot), torch.tensor(row_lam)
    y = torch.ops.lineas_fast.slot_steer(z, u, b, row_slot, row_lam)
    assert y is not z and y.data_ptr() != z.data_ptr()
    for t in range(T):
        s, lam = int(row_slot[rows[t]]), float(row_lam[rows[t]])
        assert torch.equal(y[t : t + 1], affine_steer_ref(z[t : t + 1], u[s], b[s], lam, 1)), t
    if not bool(row_lam.any()):
        assert torch.equal(y, z)


def test_the_idle_path_follows_the_tables_rewritten_in_place(tables):
    z, u, b, _ = tables
    row_slot, row_lam = torch.tensor([1, 2, 1, 0]), torch.zeros(4)
    assert torch.equal(torch.ops.lineas_fast.slot_steer(z, u, b, row_slot, row_lam), z)
    row_lam[1] = 1.5  # a request joins: the next step must steer its tokens
    y = torch.ops.lineas_fast.slot_steer(z, u, b, row_slot, row_lam)
    assert torch.equal(y[2], affine_steer_ref(z[2:3], u[2], b[2], 1.5, 1)[0]) and torch.equal(y[0], z[0])


def test_ops_compile_whole_as_opaque_nodes(tables):
    z, u, b, _ = tables
    row_slot, row_lam = torch.tensor([2, 0, 1, 0]), torch.tensor([0.7, 0.0, 1.3, 0.0])
    gw, gc, gk = torch.randn(S, D), torch.randn(S), torch.tensor([0, 1, 2])

    def f(z):
        y = torch.ops.lineas_fast.slot_steer(z * 2, u, b, row_slot, row_lam)
        return torch.ops.lineas_fast.slot_steer_gated(y, u, b, gw, gc, gk, row_slot, row_lam) + 1

    torch._dynamo.reset()
    assert torch.allclose(torch.compile(f, fullgraph=True)(z), f(z), rtol=1e-6, atol=1e-6)
