"""Per-request steering in a batched engine, without the engine: the slot tables of the
registered steerings (``registry``), the per-row tables a step reads and the ops that apply
them (no vLLM import here; ``lineas_fast.serve.vllm_plugin`` connects them to vLLM; what a
request may ask is checked by ``requests``).

Slots. Every registered steering gets two slots, its map T and its inverse T⁻¹ (a negative
strength), after slot 0, the identity: for S = 1 + 2·N slots each steered module holds

    u (S, d) float32 = ω − 1 (or 1/ω − 1),   b (S, d) float32 = b (or −b/ω),

with zero rows where a steering does not cover the module. Rows of the engine's batch choose a
slot and a strength:

    row_slot (R + 1,) int64,   row_lam (R + 1,) float32,

R the engine's largest batch; the extra last row is the identity (slot 0, λ 0) that tokens
belonging to no request (padding) point at. Per token t of a step with row r(t):

    y_t = z_t + λ_r(t) · (u[slot_r(t)] ⊙ z_t + b[slot_r(t)])

computed in float32 as ``kernels/affine_steer_ref.py`` computes one map at one strength, so a
request's tokens are those of ``steering.apply(model, strength)`` (λ = 0: y = z exactly). All
shapes are fixed when the model loads; a step only rewrites ``row_slot``/``row_lam`` in place
(when the batch changes) and the op reads them, so compiled graphs see static shapes.

DSAS gates. On a module where some registered steering is gated, ``slot_steer_gated`` also
holds each slot's gate (w (S, d), c (S,), kind (S,): ``gate_tables``) and scales λ per token by
the gate computed on the module's output, as ``kernels/gated_steer_ref.py`` does; ungated slots
have kind 0 (g = 1). Modules no steering gates keep the ungated op.
"""

from __future__ import annotations

from typing import Callable

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


# --- the op ---------------------------------------------------------------------------------
#: Set by the engine integration: token_rows(num_tokens, device) -> (T,) int64 row of each
#: token of the current forward (``rows`` = the identity row for padding / no request).
_token_rows: Callable[[int, torch.device, int], Tensor] | None = None


def rows_of_tokens(query_start_loc: Tensor, num_tokens: int, identity: int) -> Tensor:
    """(T,) int64 row of each of a step's ``num_tokens`` tokens from the engine's
    ``query_start_loc`` (R' + 1,) (request r's tokens are [qsl[r], qsl[r + 1])), on qsl's
    device; tokens at or past qsl[-1] (padding) get ``identity``. No host sync and no
    data-dependent shape, so it can be captured in a CUDA graph."""
    qsl = query_start_loc.to(torch.int64)
    t = torch.arange(num_tokens, device=qsl.device)
    rows = torch.searchsorted(qsl[1:].contiguous(), t, right=True)
    return torch.where(t < qsl[-1], rows, torch.full_like(rows, identity))


def set_token_rows(fn: Callable[[int, torch.device, int], Tensor] | None) -> None:
    global _token_rows
    _token_rows = fn


#: the per-token (slot, strength) of the step being run, shared by every steered module's op:
#: keyed on the token-row tensor (the engine integration returns the same tensor for every
#: module of a step) and the row tables' version (bumped by each in-place rewrite)
_per_token: dict = {}


def per_token(num_tokens: int, device, row_slot: Tensor, row_lam: Tensor) -> tuple[Tensor, Tensor] | None:
    """(slot (T,) int64, λ (T, 1) float32) of each token of the step: its row's slot and
    strength, computed once per step (``_per_token``); None on the CPU when no token of the
    step is steered (every λ is 0: the ops then copy z and compute nothing). On a GPU the
    tables are always applied: knowing that no token is steered would need a host sync, which
    a captured graph cannot have."""
    rows = _token_rows(num_tokens, device, row_slot.shape[0] - 1)
    key = (row_slot._version, row_lam._version)
    hit = _per_token
    if hit.get("rows") is rows and hit.get("row_slot") is row_slot and hit.get("key") == key:
        return hit["result"]
    slot = row_slot.index_select(0, rows)
    lam = row_lam.index_select(0, rows).unsqueeze(1)
    idle = lam.device.type == "cpu" and not bool(lam.any())
    result = None if idle else (slot, lam)
    _per_token.update(rows=rows, row_slot=row_slot, key=key, result=result)
    return result


# The ops are defined with torch.library's low-level API (a schema, one composite kernel for
# every device, a fake kernel for tracing) rather than the ``custom_op`` decorator, whose
# Python wrapper costs several times the op's own work per call at a decode step's T = 1
# (bench/slot_op.py); vLLM calls them once per steered norm per step.
_lib = torch.library.Library("lineas_fast", "FRAGMENT")
_lib.define("slot_steer(Tensor z, Tensor u, Tensor b, Tensor row_slot, Tensor row_lam) -> Tensor")
_lib.define(
    "slot_steer_gated(Tensor z, Tensor u, Tensor b, Tensor gw, Tensor gc, Tensor gk, Tensor row_slot, "
    "Tensor row_lam) -> Tensor"
)


def slot_steer(z: Tensor, u: Tensor, b: Tensor, row_slot: Tensor, row_lam: Tensor) -> Tensor:
    """y (T, d) from z (T, d): each token's row's slot and strength (see the module
    docstring); u, b (S, d) float32; row_slot (R + 1,) int64; row_lam (R + 1,) float32."""
    steered = None if _token_rows is None else per_token(z.shape[0], z.device, row_slot, row_lam)
    if steered is None:
        return z.clone()
    slot, lam = steered
    zf = z.to(_acc(z))
    return _steer_rows(zf, lam.to(zf.dtype), u, b, slot).to(z.dtype)


def _acc(z: Tensor) -> torch.dtype:
    """The dtype the ops compute in: float64 for float64 activations, float32 otherwise."""
    return torch.float64 if z.dtype == torch.float64 else torch.float32


def _steer_rows(zf: Tensor, lam: Tensor, u: Tensor, b: Tensor, slot: Tensor) -> Tensor:
    """zf + λ ⊙ (u[slot] ⊙ zf + b[slot]) in zf's dtype: zf (T, d), λ (T, 1), u, b (S, d)
    (the tensor casts are no-ops for float32)."""
    return zf + lam * (u.index_select(0, slot).to(zf.dtype) * zf + b.index_select(0, slot).to(zf.dtype))


def slot_steer_gated(
    z: Tensor, u: Tensor, b: Tensor, gw: Tensor, gc: Tensor, gk: Tensor, row_slot: Tensor, row_lam: Tensor
) -> Tensor:
    """``slot_steer`` with each slot's DSAS gate (``gate_tables``): per token t of row r,

        g_t = σ(w[s]·z_t + c[s]) (kind 1), clamp(w[s]·z_t + c[s], 0, 1) (kind 2), 1 (kind 0)
        y_t = z_t + (λ_r g_t)(u[s] ⊙ z_t + b[s]),   s = slot_r,

    in float32 as ``kernels/gated_steer_ref.py`` computes one gated map at one strength.
    z (T, d); u, b, gw (S, d) float32; gc (S,) float32; gk (S,) int64; row tables as
    ``slot_steer``'s."""
    steered = None if _token_rows is None else per_token(z.shape[0], z.device, row_slot, row_lam)
    if steered is None:
        return z.clone()
    slot, lam = steered
    zf = z.to(_acc(z))
    logit = (zf * gw.index_select(0, slot).to(zf.dtype)).sum(-1) + gc.index_select(0, slot).to(zf.dtype)
    kind = gk.index_select(0, slot)
    gate = torch.ones_like(logit)
    for name in GATES:
        gate = torch.where(kind == GATE_KINDS[name], gate_fn(logit, name), gate)
    lam = lam.squeeze(1).to(zf.dtype) * gate
    return _steer_rows(zf, lam.unsqueeze(1), u, b, slot).to(z.dtype)


def _fake(z: Tensor, *tables: Tensor) -> Tensor:
    return torch.empty_like(z)


_lib.impl("slot_steer", slot_steer, "CompositeExplicitAutograd")
_lib.impl("slot_steer_gated", slot_steer_gated, "CompositeExplicitAutograd")
torch.library.register_fake("lineas_fast::slot_steer", _fake, lib=_lib)
torch.library.register_fake("lineas_fast::slot_steer_gated", _fake, lib=_lib)
