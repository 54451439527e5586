"""GPU lane: the per-request steering map (lineas_fast/serve/slots.py, used by the vLLM plugin)
captured in a CUDA graph the way vLLM captures a decode step: the token -> row mapping and the
per-token tables filled inside the graph from a ``query_start_loc`` tensor (``TokenTables.fill``,
as the plugin's per-forward lookup does), the row tables rewritten in place between replays
(requests joining, leaving, changing strength), the map eager or compiled by Inductor (as vLLM's
compiled mode fuses it into the norm). Each replay equals the per-token reference computed
eagerly, so the lookup and the map do no host sync, keep static shapes and read their tables at
replay time, not at capture time. (vLLM itself is not on the GPU machine: the engine's own
capture is not tested here.)"""

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


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("gated", [False, True])
def test_slot_map_replays_from_a_cuda_graph_as_the_tables_change(gated, compiled):
    g = torch.Generator().manual_seed(0)
    u, b = (0.3 * torch.randn(S, D, generator=g)).to(CUDA), (0.3 * torch.randn(S, D, generator=g)).to(CUDA)
    u[0], b[0] = 0.0, 0.0
    gw = (torch.randn(S, D, generator=g) / D**0.5).to(CUDA)
    gc = torch.randn(S, generator=g).to(CUDA)
    gk = torch.tensor([0, 1, 2, 0, 1], device=CUDA)
    tables = slots.RowTables(ROWS, CUDA)
    qsl = torch.zeros(ROWS + 1, dtype=torch.int64, device=CUDA)  # static, rewritten in place
    z_in = torch.zeros(TOKENS, D, device=CUDA)
    tokens = slots.TokenTables(2 * TOKENS, CUDA)

    def steer(z):
        slot, lam = tokens.slot[: z.shape[0]], tokens.lam[: z.shape[0]]
        if gated:
            return slots.steer_tokens_gated(z, u, b, gw, gc, gk, slot, lam)
        return slots.steer_tokens(z, u, b, slot, lam)

    steer_fn = torch.compile(steer, fullgraph=True) if compiled else steer

    def step():
        tokens.fill(slots.rows_of_tokens(qsl, TOKENS, ROWS), tables)
        return steer_fn(z_in)

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
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        pad = int(starts[-1])
        assert torch.equal(out[pad:], z[pad:])  # padding tokens untouched
