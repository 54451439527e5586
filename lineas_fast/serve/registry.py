"""The steerings one engine serves per request: registered by name from
``$LINEAS_FAST_STEERINGS`` ("name=path,name=path"; vLLM's engine and worker processes inherit it)
or ``register_steering`` before the engine starts, with what a request may ask of each.

Slots. The k-th registered steering (k = 0, 1, …) has slot 1 + 2k (its map T) and 2 + 2k (its
inverse T⁻¹, asked for by a negative strength); slot 0 is the identity.

Strength limits. A request's strength λ acts on a steered activation as z ↦ a⊙z + c with
a = 1 + λu, c = λb (u = ω − 1, b; for the inverse u = 1/ω − 1, b = −b/ω), in the float32 slot
tables (``slots.module_tables``). ``limits(name)`` holds, per direction, the largest |λ| for
which every |a| and |c| of every module stays within ``numerics.coefficient_bound(dtype)`` — the
bound ``attach`` applies to a model of that dtype — and no larger than ``MAX_STRENGTH``. The
dtype is ``$LINEAS_FAST_REQUEST_DTYPE`` (default float32, whose bound bfloat16 shares): the
process that validates a request (vLLM's front end) does not know the served dtype, so a float16
model needs the variable set to float16, and the engine refuses to start without it
(``check_served_dtype``). An inverse whose float32 table is not finite (ω = 0, or |1/ω| beyond
float32) has limit 0: a negative strength is refused.

Once an engine started in this process (``mark_engine_started``, when vLLM loads the plugin's
logits processor), ``register_steering`` is refused: the engine's processes fixed their
registry when they started, so a name registered later would be accepted here and unknown there.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import tempfile
from dataclasses import dataclass

import torch

from lineas_fast.numerics import coefficient_bound
from lineas_fast.steering import Steering

ENV = "LINEAS_FAST_STEERINGS"
#: per-request strengths are checked against the coefficient bound of the activation dtype
#: named by this variable (float16, bfloat16 or float32; default float32)
DTYPE_ENV = "LINEAS_FAST_REQUEST_DTYPE"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
#: the largest |strength| a request may ask for whatever the map (an identity map has no
#: coefficient bound; its strength still has to be a finite float32 in the row tables)
MAX_STRENGTH = 1e6


class RegistrationError(ValueError):
    """A steering that cannot be registered (bad name, file, values, or an engine already
    started in this process)."""


_registry: dict[str, Steering] = {}
_limits: dict[str, "Limits"] = {}
_digests: dict[str, str] = {}
_env_seen: tuple | None = None
_engine_started: bool = False


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
    (loaded once per process, and again when the variable changes). A steering whose slot
    tables would not be finite float32 is refused naming it and the module."""
    global _env_seen
    value = os.environ.get(ENV, "")
    if (value, os.environ.get(DTYPE_ENV)) != _env_seen:
        loaded, limits = {}, {}
        for name, path in parse_env(value):
            try:
                loaded[name] = Steering.load(path)
                limits[name] = Limits.of(loaded[name])
            except (OSError, ValueError) as e:
                raise ValueError(f"{ENV}: steering {name!r} from {path!r}: {e}") from None
        _registry.clear()
        _registry.update(loaded)
        _limits.clear()
        _limits.update(limits)
        _digests.clear()
        _env_seen = (value, os.environ.get(DTYPE_ENV))
    return _registry


def register_steering(name: str, steering: Steering | str) -> None:
    """Register a steering for per-request use under ``name`` (a ``Steering`` or a file
    path); call before the engine starts (``vllm.LLM(...)``): refused afterwards in the same
    process. It is added to ``$LINEAS_FAST_STEERINGS``, which vLLM's engine and worker
    processes inherit; a ``Steering`` object is saved to a temporary file first."""
    if _engine_started:
        raise RegistrationError(
            f"register_steering({name!r:.80}): a vLLM engine with per-request steering was already "
            f"started in this process, and its workers fixed their steerings ({sorted(registered())}) "
            "when it started; "
            "register every steering before vllm.LLM(...) / the server starts (after shutting that engine "
            "down, clear_steerings() allows registering for a new one)"
        )
    if not isinstance(name, str) or not name or any(c in name for c in ",= ") or len(name) > 256:
        raise RegistrationError(
            f"steering name must be a non-empty string of at most 256 characters without ',', '=' or "
            f"spaces, got {name!r:.80}"
        )
    if isinstance(steering, Steering):
        Limits.of(steering)  # refuse a steering the engine could not hold, before saving it
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
            raise RegistrationError(f"steering file path {path!r} holds ',', which separates {ENV} entries")
        Limits.of(Steering.load(path))  # refuse an unreadable or unservable file now, not in the engine
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
    temporary files of registered ``Steering`` objects). Call it after the engine that served
    them is shut down: it also allows registering steerings for a new engine."""
    global _engine_started
    os.environ.pop(ENV, None)
    registered()
    _remove_saved()
    _engine_started = False


def mark_engine_started() -> None:
    """Called when vLLM loads the plugin's logits processor in this process (an engine is
    being built) and when it validates a request: from now on ``register_steering`` is
    refused (also when no steering was registered: the engine's workers then serve none)."""
    global _engine_started
    _engine_started = True


def engine_started() -> bool:
    return _engine_started


def slot_of(name: str, strength: float) -> int:
    """The slot a (steering, strength) request uses: 1 + 2k for the k-th steering, + 1 for a
    negative strength (the inverse map). ValueError for a name that is not registered."""
    names = list(registered())
    if name not in names:
        raise ValueError(f"steering {name!r:.80} is not registered in this process")
    return 1 + 2 * names.index(name) + (1 if strength < 0 else 0)


def num_slots() -> int:
    return 1 + 2 * len(registered())


def steering_digest(steering: Steering) -> str:
    """A hash of one steering's values (modules, maps, gates): 16 hex digits."""
    h = hashlib.sha256()
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


def digest(name: str) -> str:
    """``steering_digest`` of the registered steering ``name`` (computed once per registration;
    KeyError when not registered)."""
    registered()
    if name not in _digests:
        _digests[name] = steering_digest(_registry[name])
    return _digests[name]


def registry_digest() -> str:
    """A hash of the registered steerings (names, order, every map's values): what a compiled
    graph that holds their slot tables depends on."""
    h = hashlib.sha256()
    for name in registered():
        h.update(name.encode() + b"\0" + digest(name).encode())
    return h.hexdigest()[:16]


# --- what a request may ask -------------------------------------------------------------------
def map_rows(omega: torch.Tensor, bias: torch.Tensor, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, b) (d,) float32 of one module's slot row, as ``slots.module_tables`` writes it:
    u = ω − 1, b (the map) or u = 1/ω − 1, b = −b/ω (the inverse; inf where ω = 0)."""
    om, b = omega.detach().float().cpu(), bias.detach().float().cpu()
    if not inverse:
        return om - 1.0, b
    with torch.no_grad():
        return 1.0 / om - 1.0, -b / om


@dataclass(frozen=True)
class Limit:
    """The largest |strength| of one direction of a steering, and why: the module and
    coordinate that bind it (None when ``MAX_STRENGTH`` binds), or ``unusable`` saying why
    this direction cannot be served at all (limit 0)."""

    strength: float
    module: str | None = None
    coordinate: int | None = None
    unusable: str | None = None


@dataclass(frozen=True)
class Limits:
    forward: Limit
    inverse: Limit

    @staticmethod
    def of(steering: Steering) -> "Limits":
        """Both directions' limits (module docstring). The map's own float32 rows must be
        finite (RegistrationError naming the module otherwise)."""
        fwd = _limit(steering, inverse=False)
        if fwd.unusable is not None:
            raise RegistrationError(f"the map cannot be served per request: {fwd.unusable}")
        return Limits(fwd, _limit(steering, inverse=True))


def request_dtype() -> torch.dtype:
    """The activation dtype whose coefficient bound limits per-request strengths
    (``$LINEAS_FAST_REQUEST_DTYPE``)."""
    name = os.environ.get(DTYPE_ENV, "float32")
    if name not in DTYPES:
        raise ValueError(f"{DTYPE_ENV}={name!r:.80}: expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def check_served_dtype(dtype: torch.dtype) -> None:
    """Refuse (ValueError naming the variable) serving activations of ``dtype`` while requests
    are checked against a looser bound than that dtype's."""
    if coefficient_bound(dtype) < coefficient_bound(request_dtype()):
        name = str(dtype).replace("torch.", "")
        raise ValueError(
            f"lineas_fast per-request steering: the served model runs in {name}, but requests are checked "
            f"against the bound of {str(request_dtype())[6:]} activations: set {DTYPE_ENV}={name} "
            "(in the environment of the process that starts the engine)"
        )


def _limit(steering: Steering, inverse: bool) -> Limit:
    bound = coefficient_bound(request_dtype())
    best = Limit(MAX_STRENGTH)
    for m in steering.modules:
        u, b = (t.double() for t in map_rows(*steering[m], inverse))
        bad = ~(torch.isfinite(u) & torch.isfinite(b))
        if bool(bad.any()):
            i = int(torch.nonzero(bad).flatten()[0])
            what = "the inverse map (1/ω)" if inverse else "the map"
            omega = float(steering[m][0][i])
            why = f"{what} is not a finite float32 at module {m!r} coordinate {i} (ω = {omega:.4g})"
            return Limit(0.0, m, i, why)
        # |1 + λu| <= bound and |λb| <= bound for λ >= 0, per coordinate
        cap = torch.full_like(u, float("inf"))
        cap = torch.where(u > 0, (bound - 1.0) / u, cap)
        cap = torch.where(u < 0, (bound + 1.0) / -u, cap)
        cap = torch.minimum(cap, torch.where(b != 0, bound / b.abs(), torch.full_like(b, float("inf"))))
        i = int(torch.argmin(cap))
        if float(cap[i]) < best.strength:
            best = Limit(float(cap[i]), m, i)
    return best


def limits(name: str) -> Limits:
    """The strength limits of the registered steering ``name`` (KeyError when not registered)."""
    registered()
    return _limits[name]
