"""Per-request steering in a batched engine, without the engine: the slot tables of the
registered steerings (``registry``), the per-row and per-token tables a step reads and the map
that applies them (no vLLM import here; ``lineas_fast.serve.vllm_plugin`` connects them to
vLLM; what a request may ask is checked by ``requests``).

Slots. Every registered steering gets two slots, its map T and its inverse T⁻¹ (a negative
strength), after slot 0, the identity: for S = 1 + 2·N slots each steered module holds

    u (S, d) float32 = ω − 1 (or 1/ω − 1),   b (S, d) float32 = b (or −b/ω),

with zero rows where a steering does not cover the module. Rows of the engine's batch choose a
slot and a strength:

    row_slot (R + 1,) int64,   row_lam (R + 1,) float32,

R the engine's largest batch; the extra last row is the identity (slot 0, λ 0) that tokens
belonging to no request (padding) point at. Once per forward, each token t takes its row
r(t)'s slot and strength (``TokenTables.fill``), and every steered module then computes

    y_t = z_t + λ_r(t) · (u[slot_r(t)] ⊙ z_t + b[slot_r(t)])

in float32 as ``kernels/affine_steer_ref.py`` computes one map at one strength, so a request's
tokens are those of ``steering.apply(model, strength)`` (λ = 0: y = z exactly). All shapes are
fixed when the model loads; a step only rewrites the tables in place, so compiled and captured
graphs see static addresses.

DSAS gates. On a module where some registered steering is gated, ``steer_tokens_gated`` also
reads each slot's gate (w (S, d), c (S,), kind (S,): ``gate_tables``) and scales λ per token by
the gate computed on the module's output, as ``kernels/gated_steer_ref.py`` does; ungated slots
have kind 0 (g = 1). Modules no steering gates keep the ungated map.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lineas_fast.kernels.gated_steer_ref import GATES, gate_fn
from lineas_fast.serve.registry import map_rows, num_slots, registered, slot_of


# --- tables -----------------------------------------------------------------------------------
def module_tables(module: str, d: int) -> tuple[Tensor, Tensor]:
    """(u, b) (S, d) float32 on the CPU for one steered module: slot 0 identity, then each
    registered steering's map and inverse (zero rows where it does not cover ``module``)."""
    steerings = registered()
    u = torch.zeros(num_slots(), d, dtype=torch.float32)
    b = torch.zeros(num_slots(), d, dtype=torch.float32)
    for k, steering in enumerate(steerings.values()):
        if module not in steering:
            continue
        u[1 + 2 * k], b[1 + 2 * k] = map_rows(*steering[module], inverse=False)
        ui, bi = map_rows(*steering[module], inverse=True)
        if bool((torch.isfinite(ui) & torch.isfinite(bi)).all()):  # else requests for it are refused
            u[2 + 2 * k], b[2 + 2 * k] = ui, bi
    return u, b


#: gate kind codes of ``gate_tables``: 0 no gate (g = 1), then the library's DSAS gates in
#: ``GATES`` order (kernels/gated_steer_ref.py: sigmoid, relu)
GATE_KINDS = {"none": 0, **{kind: k + 1 for k, kind in enumerate(GATES)}}


def gated_modules() -> set[str]:
    """Modules on which some registered steering has a DSAS gate."""
    return {m for s in registered().values() for m in s.gates}


def gate_tables(module: str, d: int) -> tuple[Tensor, Tensor, Tensor]:
    """(w (S, d), c (S,), kind (S,) int64) float32 on the CPU for one steered module: each
    registered steering's DSAS gate in its map's and its inverse's slots (the inverse is gated
    as ``steering.apply(model, strength < 0)`` gates it: the same gate on the same input);
    kind 0 (no gate: g = 1) elsewhere."""
    w = torch.zeros(num_slots(), d, dtype=torch.float32)
    c = torch.zeros(num_slots(), dtype=torch.float32)
    kind = torch.zeros(num_slots(), dtype=torch.int64)
    for k, steering in enumerate(registered().values()):
        gate = steering.gates.get(module)
        if gate is None or module not in steering:
            continue
        for slot in (1 + 2 * k, 2 + 2 * k):
            w[slot] = gate["w"].detach().float().cpu()
            c[slot] = gate["c"].detach().float().cpu().reshape(())
            kind[slot] = GATE_KINDS[gate["kind"]]
    return w, c, kind


class RowTables:
    """Per-row slot and strength of the engine's persistent batch (``rows`` rows + the
    identity row at index ``rows``), rewritten in place when the batch changes."""

    def __init__(self, rows: int, device):
        self.rows = rows
        self.slot = torch.zeros(rows + 1, dtype=torch.int64, device=device)
        self.lam = torch.zeros(rows + 1, dtype=torch.float32, device=device)
        self.host: dict[int, tuple[int, float]] = {}

    def set(self, row: int, choice: tuple[str, float] | None) -> None:
        if choice is None:
            self.host.pop(row, None)
        else:
            self.host[row] = (slot_of(choice[0], choice[1]), abs(choice[1]))

    def move(self, a: int, b: int, swap: bool) -> None:
        va, vb = self.host.pop(a, None), self.host.pop(b, None)
        if va is not None:
            self.host[b] = va
        if swap and vb is not None:
            self.host[a] = vb

    def flush(self) -> None:
        """Write the host state into the device tables (one copy each)."""
        slot = torch.zeros(self.rows + 1, dtype=torch.int64)
        lam = torch.zeros(self.rows + 1, dtype=torch.float32)
        for row, (s, lm) in self.host.items():
            slot[row], lam[row] = s, lm
        self.slot.copy_(slot, non_blocking=False)
        self.lam.copy_(lam, non_blocking=False)


# --- the per-token tables and the map ---------------------------------------------------------
def rows_of_tokens(query_start_loc: Tensor, num_tokens: int, identity: int) -> Tensor:
    """(T,) int64 row of each of a step's ``num_tokens`` tokens from the engine's
    ``query_start_loc`` (R' + 1,) (request r's tokens are [qsl[r], qsl[r + 1])), on qsl's
    device; tokens at or past qsl[-1] (padding) get ``identity``. No host sync and no
    data-dependent shape, so it can be captured in a CUDA graph."""
    qsl = query_start_loc.to(torch.int64)
    t = torch.arange(num_tokens, device=qsl.device)
    rows = torch.searchsorted(qsl[1:].contiguous(), t, right=True)
    return torch.where(t < qsl[-1], rows, torch.full_like(rows, identity))


class TokenTables:
    """Each token's slot and strength for the forward being run, looked up once per forward
    (``fill``) and read by every steered module:

        slot (M,) int64,   lam (M, 1) float32,      M = the most tokens a forward has

    (only the first T entries, T the forward's token count, are read). Fixed addresses, so a
    compiled or captured graph reads the values of the forward being run. ``idle`` is True
    when, on the CPU, no token of the forward is steered (eager modules then skip the map)."""

    def __init__(self, max_tokens: int, device):
        self.max_tokens = max_tokens
        self.slot = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.lam = torch.zeros(max_tokens, 1, dtype=torch.float32, device=device)
        self.idle = False

    def fill(self, rows: Tensor, row_tables: RowTables) -> None:
        """Entries ``0 .. T - 1`` from each token's row ``rows`` (T,) int64 (``rows_of_tokens``)
        and the row tables, in place; no host sync on a GPU."""
        n = rows.shape[0]
        if n > self.max_tokens:
            raise RuntimeError(
                f"lineas_fast: a forward of {n} tokens, but the per-token tables hold {self.max_tokens} "
                "(sized when the model loaded: the engine's most tokens per forward)"
            )
        torch.index_select(row_tables.slot, 0, rows, out=self.slot[:n])
        torch.index_select(row_tables.lam, 0, rows, out=self.lam[:n, 0])
        self.idle = self.lam.device.type == "cpu" and not bool(self.lam[:n].any())


# The map is plain tensor code, not an opaque op: under vLLM's compiled mode Inductor fuses it
# into the norm it follows (the row lookup was hoisted into ``TokenTables.fill``, once per
# forward), so a steered norm costs no extra call (bench/slot_op.py).
def steer_tokens(z: Tensor, u: Tensor, b: Tensor, slot: Tensor, lam: Tensor) -> Tensor:
    """y (T, d) = z + λ ⊙ (u[slot] ⊙ z + b[slot]) per token, in float32 (float64 for float64
    z) as ``kernels/affine_steer_ref.py`` computes one map at one strength (λ = 0: y = z
    exactly). z (T, d); u, b (S, d) float32; slot (T,) int64; lam (T, 1) float32."""
    zf = z.to(_acc(z))
    return _steer_rows(zf, lam.to(zf.dtype), u, b, slot).to(z.dtype)


def _acc(z: Tensor) -> torch.dtype:
    """The dtype the map is computed in: float64 for float64 activations, float32 otherwise."""
    return torch.float64 if z.dtype == torch.float64 else torch.float32


def _steer_rows(zf: Tensor, lam: Tensor, u: Tensor, b: Tensor, slot: Tensor) -> Tensor:
    """zf + λ ⊙ (u[slot] ⊙ zf + b[slot]) in zf's dtype: zf (T, d), λ (T, 1), u, b (S, d)
    (the tensor casts are no-ops for float32)."""
    return zf + lam * (u.index_select(0, slot).to(zf.dtype) * zf + b.index_select(0, slot).to(zf.dtype))


def steer_tokens_gated(
    z: Tensor, u: Tensor, b: Tensor, gw: Tensor, gc: Tensor, gk: Tensor, slot: Tensor, lam: Tensor
) -> Tensor:
    """``steer_tokens`` with each slot's DSAS gate (``gate_tables``): per token t of slot s,

        g_t = σ(w[s]·z_t + c[s]) (kind 1), clamp(w[s]·z_t + c[s], 0, 1) (kind 2), 1 (kind 0)
        y_t = z_t + (λ_t g_t)(u[s] ⊙ z_t + b[s]),

    in float32 as ``kernels/gated_steer_ref.py`` computes one gated map at one strength.
    z (T, d); u, b, gw (S, d) float32; gc (S,) float32; gk (S,) int64; slot, lam as
    ``steer_tokens``'s."""
    zf = z.to(_acc(z))
    logit = (zf * gw.index_select(0, slot).to(zf.dtype)).sum(-1) + gc.index_select(0, slot).to(zf.dtype)
    kind = gk.index_select(0, slot)
    gate = torch.ones_like(logit)
    for name in GATES:
        gate = torch.where(kind == GATE_KINDS[name], gate_fn(logit, name), gate)
    lam = lam.squeeze(1).to(zf.dtype) * gate
    return _steer_rows(zf, lam.unsqueeze(1), u, b, slot).to(z.dtype)
