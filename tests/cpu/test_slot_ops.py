"""The per-request map without vLLM (lineas_fast/serve/slots.py): the per-token tables are
filled once per forward from the batch's rows (padding -> the identity row), the map equals
the library's one-map references per token (kernels/affine_steer_ref.py, gated_steer_ref.py),
λ = 0 leaves z exactly, and under ``torch.compile`` the map and its table lookup fuse into the
norm's own kernel (Inductor emits no extra kernel) and read tables rewritten in place."""

import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from lineas_fast.kernels.affine_steer_ref import affine_steer_ref
from lineas_fast.kernels.gated_steer_ref import gated_steer_ref
from lineas_fast.serve import slots

T, D, S = 7, 16, 4


def row_tables(row_slot, row_lam):
    """RowTables of len(row_slot) - 1 rows (the last is the identity row) holding the given values."""
    rows = slots.RowTables(len(row_slot) - 1, "cpu")
    rows.slot.copy_(torch.tensor(row_slot))
    rows.lam.copy_(torch.tensor(row_lam, dtype=torch.float32))
    return rows


@pytest.fixture
def maps():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(T, D, generator=g)
    u, b = torch.randn(S, D, generator=g), torch.randn(S, D, generator=g)
    u[0], b[0] = 0.0, 0.0
    return z, u, b


def test_token_tables_take_each_tokens_row_and_padding_takes_the_identity_row():
    rows = row_tables([2, 0, 3, 0], [0.7, 0.0, 1.3, 0.0])  # 3 rows + the identity row
    qsl = torch.tensor([0, 2, 3, 6], dtype=torch.int32)  # requests of 2, 1, 3 tokens, then padding
    token_rows = slots.rows_of_tokens(qsl, 8, identity=3)
    assert token_rows.tolist() == [0, 0, 1, 2, 2, 2, 3, 3]
    tokens = slots.TokenTables(10, "cpu")
    tokens.slot.fill_(9)  # stale values of an earlier, longer forward
    tokens.fill(token_rows, rows)
    assert tokens.slot[:8].tolist() == [2, 2, 0, 3, 3, 3, 0, 0]
    assert tokens.lam[:8, 0].tolist() == pytest.approx([0.7, 0.7, 0.0, 1.3, 1.3, 1.3, 0.0, 0.0])
    assert not tokens.idle
    tokens.fill(slots.rows_of_tokens(torch.tensor([0, 1]), 2, identity=3)[1:], rows)  # padding only
    assert tokens.idle and tokens.slot[:1].tolist() == [0]


def test_a_forward_longer_than_the_tables_is_refused_naming_both_counts():
    tokens = slots.TokenTables(4, "cpu")
    with pytest.raises(RuntimeError, match=r"forward of 5 tokens.*hold 4"):
        tokens.fill(torch.zeros(5, dtype=torch.int64), row_tables([0, 0], [0.0, 0.0]))


@pytest.mark.parametrize(
    "slot, lam",
    [
        ([2, 2, 0, 1, 1, 3, 0], [0.7, 0.7, 0.0, 1.3, 1.3, -0.0, 0.0]),  # mixed, padding last
        ([1, 2, 1, 3, 2, 1, 3], [0.5, 2.0, 1.0, 1.0, 0.25, 3.0, 1.5]),  # every token steered
        ([1, 2, 0, 3, 0, 1, 0], [0.0] * 7),  # none steered
    ],
)
def test_the_map_equals_the_one_map_reference_per_token(maps, slot, lam):
    z, u, b = maps
    slot, lam = torch.tensor(slot), torch.tensor(lam).unsqueeze(1)
    y = slots.steer_tokens(z, u, b, slot, lam)
    for t in range(T):
        s = int(slot[t])
        assert torch.equal(y[t : t + 1], affine_steer_ref(z[t : t + 1], u[s], b[s], float(lam[t]), 1)), t
    if not bool(lam.any()):
        assert torch.equal(y, z)


def test_the_gated_map_equals_the_gated_reference_per_token(maps):
    """Each token gets its slot's map, gate kind (none, sigmoid, relu) and strength."""
    z, u, b = maps
    g = torch.Generator().manual_seed(6)
    gw, gc = torch.randn(S, D, generator=g), torch.randn(S, generator=g)
    gk = torch.tensor([0, 1, 2, 0])  # identity, sigmoid, relu, ungated
    slot = torch.tensor([1, 1, 2, 2, 3, 0, 2])
    lam = torch.tensor([0.7, 0.7, 1.3, 1.3, 0.5, 0.0, 0.0]).unsqueeze(1)
    y = slots.steer_tokens_gated(z, u, b, gw, gc, gk, slot, lam)
    kinds = {1: "sigmoid", 2: "relu"}
    for t in range(T):
        s, lm = int(slot[t]), float(lam[t])
        if int(gk[s]) == 0:
            want = affine_steer_ref(z[t : t + 1], u[s], b[s], lm, 1)
        else:
            want = gated_steer_ref(z[t : t + 1], u[s], b[s], gw[s], gc[s], lm, kinds[int(gk[s])])[0]
        torch.testing.assert_close(y[t : t + 1], want, rtol=1e-6, atol=1e-6, msg=f"token {t}")
    assert torch.equal(y[5:], z[5:])  # λ = 0 rows: exactly z


def _norm(w):
    def norm(x, r):
        x = x + r
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w, x

    return norm


@pytest.mark.parametrize("gated", [False, True])
def test_compiled_the_map_fuses_into_the_norms_kernel_and_reads_rewritten_tables(maps, gated):
    """A fused add-RMSNorm followed by the map, compiled with Inductor: one generated kernel,
    as many as the norm alone; after the tables are rewritten in place (a new batch), the same
    compiled code steers by the new values (no recompile, nothing baked in)."""
    z, u, b = maps
    g = torch.Generator().manual_seed(7)
    w, residual = torch.randn(D, generator=g), torch.randn(T, D, generator=g)
    gw, gc, gk = torch.randn(S, D, generator=g), torch.randn(S, generator=g), torch.tensor([0, 1, 2, 1])
    norm = _norm(w)
    tokens = slots.TokenTables(12, "cpu")

    def steered(x, r):
        y, r = norm(x, r)
        n = y.shape[0]
        slot, lam = tokens.slot[:n], tokens.lam[:n]
        if gated:
            return slots.steer_tokens_gated(y, u, b, gw, gc, gk, slot, lam), r
        return slots.steer_tokens(y, u, b, slot, lam), r

    def kernels(f):
        torch._dynamo.reset()
        compiled = torch.compile(f, dynamic=True, fullgraph=True)
        out, code = run_and_get_code(compiled, z, residual)
        return compiled, out, len(set(re.findall(r"\bcpp_fused_\w+", "\n".join(code))))

    _, _, plain_kernels = kernels(norm)
    tokens.fill(slots.rows_of_tokens(torch.tensor([0, 3, 6]), T, 2), row_tables([1, 3, 0], [0.8, 1.5, 0.0]))
    compiled, out, steered_kernels = kernels(steered)
    assert steered_kernels == plain_kernels == 1
    torch.testing.assert_close(out[0], steered(z, residual)[0], rtol=1e-5, atol=1e-5)
    tokens.fill(slots.rows_of_tokens(torch.tensor([0, 1, 7]), T, 2), row_tables([2, 1, 0], [-0.0, 2.0, 0.0]))
    again = compiled(z, residual)[0]
    want = steered(z, residual)[0]
    torch.testing.assert_close(again, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(again, out[0], rtol=1e-3, atol=1e-3)  # the new tables were read
