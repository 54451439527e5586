"""GPU lane: the per-request steering ops (lineas_fast/serve/slots.py, used by the vLLM plugin)
captured in a CUDA graph the way vLLM captures a decode step: the token -> row mapping computed
inside the graph from a ``query_start_loc`` tensor, the row tables rewritten in place between
replays (requests joining, leaving, changing strength). Each replay equals the per-token
reference computed eagerly, so the ops do no host sync, keep static shapes and read their
tables at replay time, not at capture time. (vLLM itself is not on the GPU machine: the engine's
own capture is not tested here.)"""

import pytest
import torch

from lineas_fast.kernels.affine_steer_ref import affine_steer_ref
from lineas_fast.kernels.gated_steer_ref import gated_steer_ref
from lineas_fast.serve import slots

CUDA = "cuda"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only (rehearsal)")

D, S, ROWS, TOKENS = 64, 5, 4, 8  # 8 token slots: 4 decode tokens + padding


def reference(z, u, b, gw, gc, gk, row_slot, row_lam, rows):
    out = []
    for t in range(z.shape[0]):
        s, lam = int(row_slot[rows[t]]), float(row_lam[rows[t]])
        if gk is None or int(gk[s]) == 0:
            out.append(affine_steer_ref(z[t : t + 1], u[s], b[s], lam, 1))
        else:
            kind = {1: "sigmoid", 2: "relu"}[int(gk[s])]
            out.append(gated_steer_ref(z[t : t + 1], u[s], b[s], gw[s], gc[s], lam, kind)[0])
    return torch.cat(out)


@pytest.mark.parametrize("gated", [False, True])
def test_slot_ops_replay_from_a_cuda_graph_as_the_tables_change(gated):
    g = torch.Generator().manual_seed(0)
    u, b = (0.3 * torch.randn(S, D, generator=g)).to(CUDA), (0.3 * torch.randn(S, D, generator=g)).to(CUDA)
    u[0], b[0] = 0.0, 0.0
    gw = (torch.randn(S, D, generator=g) / D**0.5).to(CUDA)
    gc = torch.randn(S, generator=g).to(CUDA)
    gk = torch.tensor([0, 1, 2, 0, 1], device=CUDA)
    tables = slots.RowTables(ROWS, CUDA)
    qsl = torch.zeros(ROWS + 1, dtype=torch.int64, device=CUDA)  # static, rewritten in place
    z_in = torch.zeros(TOKENS, D, device=CUDA)
    slots.set_token_rows(lambda n, device, identity: slots.rows_of_tokens(qsl, n, identity))

    def step():
        if gated:
            return torch.ops.lineas_fast.slot_steer_gated(z_in, u, b, gw, gc, gk, tables.slot, tables.lam)
        return torch.ops.lineas_fast.slot_steer(z_in, u, b, tables.slot, tables.lam)

    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            step()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        # three steps of a changing batch: (row slot, strength) per row, tokens per request
        for rows_now, lengths in (
            ({0: (1, 0.8), 1: (2, 1.5), 2: (4, 0.5)}, [1, 1, 1]),  # three decode tokens
            ({0: (3, 2.0), 1: (2, 0.25)}, [1, 3]),  # one left, one prefilling 3 tokens
            ({0: (1, 1.0), 1: (0, 0.0), 2: (4, 1.2), 3: (2, 0.7)}, [2, 1, 1, 2]),  # one unsteered
        ):
            tables.host = {}
            for row, (slot, lam) in rows_now.items():
                tables.host[row] = (slot, lam)
            tables.flush()
            starts = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int64)
            qsl.fill_(int(starts[-1]))
            qsl[: len(starts)].copy_(starts.to(CUDA))
            z = torch.randn(TOKENS, D, generator=g).to(CUDA)
            z_in.copy_(z)
            graph.replay()
            torch.cuda.synchronize()
            rows = slots.rows_of_tokens(qsl, TOKENS, ROWS)
            want = reference(z, u, b, gw if gated else None, gc, gk if gated else None, tables.slot,
                             tables.lam, rows)  # fmt: skip
            torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
            pad = int(starts[-1])
            assert torch.equal(out[pad:], z[pad:])  # padding tokens untouched
    finally:
        slots.set_token_rows(None)
