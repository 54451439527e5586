"""Per-request steering in a batched engine, without the engine: the steering registry, the
per-request arguments, the slot tables and the ops that apply them (no vLLM import here;
``lineas_fast.serve.vllm_plugin`` connects them to vLLM).

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

import atexit
import contextlib
import hashlib
import math
import os
import tempfile
from typing import Callable, Mapping

import torch
from torch import Tensor
from torch.library import custom_op

from lineas_fast.kernels.gated_steer_ref import GATES, gate_fn
from lineas_fast.steering import Steering

ENV = "LINEAS_FAST_STEERINGS"
REQUEST_KEY = "lineas_fast"
FLAT_PREFIX = "lineas_fast_"


class SteeringRequestError(ValueError):
    """A request's ``extra_args["lineas_fast"]`` that cannot be served (the engine refuses
    that request only; vLLM turns a ValueError from validation into HTTP 400)."""


# --- registry -------------------------------------------------------------------------------
_registry: dict[str, Steering] = {}
_env_seen: str | None = None


def parse_env(value: str) -> list[tuple[str, str]]:
    """``"name=path,name=path"`` -> [(name, path)]; a malformed entry or a repeated name is a
    ValueError naming it."""
    pairs, seen = [], set()
    for entry in (e.strip() for e in value.split(",")):
        if not entry:
            continue
        name, sep, path = entry.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ValueError(f"{ENV}: entry {entry!r} is not name=path (value {value!r})")
        if name in seen:
            raise ValueError(f"{ENV}: steering name {name!r} given twice (value {value!r})")
        seen.add(name)
        pairs.append((name, path))
    return pairs


def registered() -> dict[str, Steering]:
    """{name: steering} in registration order: the entries of ``$LINEAS_FAST_STEERINGS``
    (loaded once per process, and again when the variable changes)."""
    global _env_seen
    value = os.environ.get(ENV, "")
    if value != _env_seen:
        loaded = {}
        for name, path in parse_env(value):
            try:
                loaded[name] = Steering.load(path)
            except (OSError, ValueError) as e:
                raise ValueError(f"{ENV}: steering {name!r} from {path!r}: {e}") from None
        _registry.clear()
        _registry.update(loaded)
        _env_seen = value
    return _registry


def register_steering(name: str, steering: Steering | str) -> None:
    """Register a steering for per-request use under ``name`` (a ``Steering`` or a file
    path); call before the engine starts (``vllm.LLM(...)``). It is added to
    ``$LINEAS_FAST_STEERINGS``, which vLLM's engine and worker processes inherit; a
    ``Steering`` object is saved to a temporary file first."""
    if not isinstance(name, str) or not name or any(c in name for c in ",= "):
        raise ValueError(f"steering name must be a non-empty string without ',', '=' or spaces, got {name!r}")
    if isinstance(steering, Steering):
        fd, path = tempfile.mkstemp(prefix=f"lineas_fast-{name}-", suffix=".safetensors")
        os.close(fd)
        try:
            steering.save(path)
        except BaseException:
            os.unlink(path)
            raise
        if not _saved:
            atexit.register(_remove_saved)
        _saved[path] = os.getpid()
    elif isinstance(steering, (str, os.PathLike)):
        path = os.path.abspath(os.fspath(steering))  # engine processes may start elsewhere
        if "," in path:
            raise ValueError(f"steering file path {path!r} holds ',', which separates {ENV} entries")
        Steering.load(path)  # refuse an unreadable file now, not in the engine
    else:
        raise TypeError(f"steering must be a lf.Steering or a file path, got {type(steering).__name__}")
    before = parse_env(os.environ.get(ENV, ""))
    pairs = [p for p in before if p[0] != name] + [(name, path)]
    os.environ[ENV] = ",".join(f"{n}={p}" for n, p in pairs)
    registered()
    _remove_saved([p for n, p in before if n == name and p != path])


#: temporary files register_steering saved Steering objects to: {path: pid of the process that
#: saved it}; removed when replaced, by clear_steerings, and when that process exits (engine
#: processes read them when the model loads, inside the ``LLM(...)`` call)
_saved: dict[str, int] = {}


def _remove_saved(paths=None) -> None:
    for path in list(_saved) if paths is None else paths:
        if _saved.get(path) == os.getpid():  # a forked child leaves its parent's files alone
            del _saved[path]
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def clear_steerings() -> None:
    """Forget every registered steering (unsets ``$LINEAS_FAST_STEERINGS``; removes the
    temporary files of registered ``Steering`` objects)."""
    os.environ.pop(ENV, None)
    registered()
    _remove_saved()


def slot_of(name: str, strength: float) -> int:
    """The slot a (steering, strength) request uses: 1 + 2k for the k-th steering, + 1 for a
    negative strength (the inverse map)."""
    k = list(registered()).index(name)
    return 1 + 2 * k + (1 if strength < 0 else 0)


def registry_digest() -> str:
    """A hash of the registered steerings (names, order, every map's values): what a compiled
    graph that holds their slot tables depends on."""
    h = hashlib.sha256()
    for name, steering in registered().items():
        h.update(name.encode() + b"\0")
        for m in steering.modules:
            om, b = steering[m]
            h.update(m.encode() + b"\0")
            gate = steering.gates.get(m)
            tensors = (om, b) if gate is None else (om, b, gate["w"], gate["c"])
            if gate is not None:
                h.update(gate["kind"].encode() + b"\0")
            for t in tensors:
                h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def num_slots() -> int:
    return 1 + 2 * len(registered())


# --- requests ---------------------------------------------------------------------------------
def request_steering(extra_args) -> tuple[str, float] | None:
    """(steering name, strength) a request asks for in ``extra_args["lineas_fast"]``
    (``{"steering": NAME, "strength": S}``, strength default 1.0) or in the flat keys
    ``extra_args["lineas_fast_steering"]`` / ``["lineas_fast_strength"]`` (the form the
    OpenAI server's ``vllm_xargs`` can carry: its values may not be objects), or None when it
    asks for none (no key, or strength 0). SteeringRequestError names what is wrong."""
    if extra_args is None:
        return None
    flat = {k[len(FLAT_PREFIX) :]: v for k, v in extra_args.items() if k.startswith(FLAT_PREFIX)}
    if REQUEST_KEY in extra_args and flat:
        raise SteeringRequestError(
            f'extra_args has both "{REQUEST_KEY}" and {sorted(FLAT_PREFIX + k for k in flat)}: give one form'
        )
    if REQUEST_KEY not in extra_args and not flat:
        return None
    spec = extra_args[REQUEST_KEY] if REQUEST_KEY in extra_args else flat
    if not isinstance(spec, Mapping):
        raise SteeringRequestError(
            f'extra_args["{REQUEST_KEY}"] must be an object {{"steering": NAME, "strength": S}}, '
            f"got {type(spec).__name__} {spec!r:.80}"
        )
    unknown = sorted(set(spec) - {"steering", "strength"})
    if unknown:
        raise SteeringRequestError(
            f'extra_args["{REQUEST_KEY}"]: unknown keys {unknown} (allowed: "steering", "strength")'
        )
    name = spec.get("steering")
    steerings = registered()
    if not isinstance(name, str):
        raise SteeringRequestError(
            f'extra_args["{REQUEST_KEY}"]["steering"] must be a steering name (a string), got {name!r:.80}'
        )
    if name not in steerings:
        have = sorted(steerings) or "none: set $LINEAS_FAST_STEERINGS"
        raise SteeringRequestError(f"unknown steering {name!r}; registered: {have}")
    strength = spec.get("strength", 1.0)
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise SteeringRequestError(
            f'extra_args["{REQUEST_KEY}"]["strength"] must be a finite number, got {strength!r:.80}'
        )
    strength = float(strength)
    if strength < 0 and any(
        bool((om == 0).any()) for om, _ in (steerings[name][m] for m in steerings[name].modules)
    ):
        raise SteeringRequestError(
            f"steering {name!r}: a negative strength applies the inverse map, which needs omega != 0 "
            f"everywhere; this steering has omega == 0 somewhere"
        )
    return (name, strength) if strength != 0.0 else None


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
        om, bias = (t.detach().float().cpu() for t in steering[module])
        u[1 + 2 * k], b[1 + 2 * k] = om - 1.0, bias
        if not bool((om == 0).any()):
            u[2 + 2 * k], b[2 + 2 * k] = 1.0 / om - 1.0, -bias / om
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


def per_token(num_tokens: int, device, row_slot: Tensor, row_lam: Tensor) -> tuple[Tensor, Tensor]:
    """(slot (T,) int64, λ (T, 1) float32) of each token of the step: its row's slot and
    strength, computed once per step (``_per_token``)."""
    rows = _token_rows(num_tokens, device, row_slot.shape[0] - 1)
    key = (row_slot._version, row_lam._version)
    hit = _per_token
    if hit.get("rows") is rows and hit.get("row_slot") is row_slot and hit.get("key") == key:
        return hit["slot"], hit["lam"]
    slot = row_slot.index_select(0, rows)
    lam = row_lam.index_select(0, rows).unsqueeze(1)
    _per_token.update(rows=rows, row_slot=row_slot, key=key, slot=slot, lam=lam)
    return slot, lam


@custom_op("lineas_fast::slot_steer", mutates_args=())
def slot_steer(z: Tensor, u: Tensor, b: Tensor, row_slot: Tensor, row_lam: Tensor) -> Tensor:
    """y (T, d) from z (T, d): each token's row's slot and strength (see the module
    docstring); u, b (S, d) float32; row_slot (R + 1,) int64; row_lam (R + 1,) float32."""
    if _token_rows is None:
        return z.clone()
    slot, lam = per_token(z.shape[0], z.device, row_slot, row_lam)
    zf = z.to(_acc(z))
    return _steer_rows(zf, lam.to(zf.dtype), u, b, slot).to(z.dtype)


def _acc(z: Tensor) -> torch.dtype:
    """The dtype the ops compute in: float64 for float64 activations, float32 otherwise."""
    return torch.float64 if z.dtype == torch.float64 else torch.float32


def _steer_rows(zf: Tensor, lam: Tensor, u: Tensor, b: Tensor, slot: Tensor) -> Tensor:
    """zf + λ ⊙ (u[slot] ⊙ zf + b[slot]) in zf's dtype: zf (T, d), λ (T, 1), u, b (S, d)
    (the tensor casts are no-ops for float32)."""
    return zf + lam * (u.index_select(0, slot).to(zf.dtype) * zf + b.index_select(0, slot).to(zf.dtype))


@slot_steer.register_fake
def _(z, u, b, row_slot, row_lam):
    return torch.empty_like(z)


@custom_op("lineas_fast::slot_steer_gated", mutates_args=())
def slot_steer_gated(
    z: Tensor, u: Tensor, b: Tensor, gw: Tensor, gc: Tensor, gk: Tensor, row_slot: Tensor, row_lam: Tensor
) -> Tensor:
    """``slot_steer`` with each slot's DSAS gate (``gate_tables``): per token t of row r,

        g_t = σ(w[s]·z_t + c[s]) (kind 1), clamp(w[s]·z_t + c[s], 0, 1) (kind 2), 1 (kind 0)
        y_t = z_t + (λ_r g_t)(u[s] ⊙ z_t + b[s]),   s = slot_r,

    in float32 as ``kernels/gated_steer_ref.py`` computes one gated map at one strength.
    z (T, d); u, b, gw (S, d) float32; gc (S,) float32; gk (S,) int64; row tables as
    ``slot_steer``'s."""
    if _token_rows is None:
        return z.clone()
    slot, lam = per_token(z.shape[0], z.device, row_slot, row_lam)
    zf = z.to(_acc(z))
    logit = (zf * gw.index_select(0, slot).to(zf.dtype)).sum(-1) + gc.index_select(0, slot).to(zf.dtype)
    kind = gk.index_select(0, slot)
    gate = torch.ones_like(logit)
    for name in GATES:
        gate = torch.where(kind == GATE_KINDS[name], gate_fn(logit, name), gate)
    lam = lam.squeeze(1).to(zf.dtype) * gate
    return _steer_rows(zf, lam.unsqueeze(1), u, b, slot).to(z.dtype)


@slot_steer_gated.register_fake
def _(z, u, b, gw, gc, gk, row_slot, row_lam):
    return torch.empty_like(z)
