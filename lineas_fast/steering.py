"""``Steering``: one affine map (ω, b) per module, saved as safetensors, applied by hooks."""

from __future__ import annotations

import contextlib
import json
import numbers
import os
from typing import Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lineas_fast._version import __version__
from lineas_fast.atomic import atomic_path
from lineas_fast.checks import ArgumentError, finite_tensors
from lineas_fast.extras import pyplot
from lineas_fast.hooks import SteeredForward, check_free, make_steer
from lineas_fast.modules import coordinate_dim
from lineas_fast.numerics import check_effective, effective_coefficients, module_dtype
from lineas_fast.records import refuse_steered
from lineas_fast.strengths import StrengthSpec, resolve_strengths
from lineas_fast.targets import as_target
from lineas_fast.untrusted import json_loads, object_depth, one_line, safetensors_header

FORMAT = "lineas_fast.steering"


def _fingerprints(metadata: dict) -> list[dict]:
    """Every model fingerprint a steering's metadata records (a composed one keeps each)."""
    listed = metadata.get("models")
    out = [m for m in listed if isinstance(m, dict)] if isinstance(listed, list) else []
    first = metadata.get("model")
    if isinstance(first, dict) and first and first not in out:
        out.insert(0, first)
    return out


def refuse_silent_modules(names, named: dict) -> None:
    """A map on a module that never runs its own forward (the root, a ModuleList/ModuleDict
    container) would do nothing: refuse it by name."""
    for n in names:
        mod = named[n]
        if n == "":
            raise ValueError(
                "a map on the root module '' is not supported: its output is the model's output "
                "(logits, a ModelOutput), not activations; name a submodule"
            )
        if type(mod).forward is nn.Module.forward:
            raise ValueError(
                f"module {n!r} is a {type(mod).__name__}, a container whose forward never runs: "
                f"a map on it would do nothing; name the modules inside it (e.g. {n + '.0'!r})"
            )


def model_fingerprint(model) -> dict:
    """What identifies a model's (or a pipeline's) architecture and size, not its weights: its
    config's model_type and a hash of every parameter's name and shape."""
    return as_target(model).fingerprint()


MAX_MAP_DIM = 1 << 24  # coordinates of one map: far above any model's width
_FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def check_metadata(meta: Mapping, where: str) -> dict:
    """Steering metadata as ``load`` accepts it, before anything is written: a dict with string
    keys whose values are JSON (str, bool, None, finite-or-not numbers, lists, dicts; numbers of
    other types become int/float, paths strings), nested at most 64 deep, with ``model`` the
    model fingerprint object (``model_fingerprint(model)``) or None. Returns a plain copy;
    TypeError/ValueError naming ``where`` and the key otherwise."""

    def plain(value, key: str):
        if value is None or isinstance(value, (str, bool)):
            return value
        if isinstance(value, numbers.Integral):
            return int(value)
        if isinstance(value, numbers.Real):
            return float(value)
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if isinstance(value, Mapping):
            bad = [k for k in value if not isinstance(k, str)]
            if bad:
                raise TypeError(f"{where}: metadata {key} has a non-string key {bad[0]!r}")
            return {k: plain(v, f"{key}[{k!r}]") for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v, f"{key}[{i}]") for i, v in enumerate(value)]
        raise TypeError(
            f"{where}: metadata {key} is {type(value).__name__}, not a JSON value "
            f"(str, number, bool, None, list or dict)"
        )

    if not isinstance(meta, Mapping):
        raise TypeError(f"{where}: metadata must be a dict, got {type(meta).__name__}")
    depth = object_depth(meta)
    if depth > 64:
        raise ValueError(f"{where}: metadata nested more than 64 deep")
    out = plain(meta, "")
    model = out.get("model")
    if model is not None and not isinstance(model, dict):
        raise ValueError(
            f"{where}: metadata 'model' must be the model fingerprint object (a dict, as "
            f"lf.model_fingerprint(model) gives) or None, got {type(model).__name__} {model!r:.80}"
        )
    return out


def _header_fields(header) -> tuple[list, dict, dict]:
    """(modules, {gated module: kind}, metadata) of a checked safetensors header."""
    h = header.metadata
    if h.get("format") != FORMAT:
        raise ValueError(f"not a lineas_fast steering file (format {h.get('format')!r:.80})")
    if "modules" not in h:
        raise ValueError("header has no 'modules' entry")
    modules = json_loads(h["modules"], "header 'modules'")
    gate_kinds = json_loads(h.get("gates", "{}"), "header 'gates'")
    meta = json_loads(h.get("metadata", "{}"), "header 'metadata'")
    dims = json_loads(h.get("dims", "null"), "header 'dims'")
    if not (isinstance(modules, list) and modules and all(isinstance(n, str) for n in modules)):
        raise ValueError("malformed header: 'modules' must be a non-empty list of module names")
    if len(set(modules)) != len(modules):
        raise ValueError("malformed header: 'modules' names a module twice")
    if not (isinstance(gate_kinds, dict) and all(isinstance(k, str) for k in gate_kinds.values())):
        raise ValueError("malformed header: 'gates' must be an object {module: kind}")
    if not isinstance(meta, dict):
        raise ValueError(f"malformed header: 'metadata' must be a JSON object, got {type(meta).__name__}")
    if meta.get("model") is not None and not isinstance(meta["model"], dict):
        raise ValueError(
            f"malformed header: metadata 'model' must be the model fingerprint object, got "
            f"{type(meta['model']).__name__}"
        )
    if dims is not None and not isinstance(dims, dict):
        raise ValueError("malformed header: 'dims' must be an object {module: d}")
    for n in modules:
        entry = header.tensors.get(f"{n}.omega")
        if dims is not None and entry is not None and dims.get(n) != (entry.shape or [None])[0]:
            raise ValueError(
                f"tensor {n + '.omega'!r} has shape {entry.shape} but the header's 'dims' records "
                f"{dims.get(n)!r:.40} for {n!r}"
            )
    return modules, gate_kinds, meta


def _checked_entries(header, modules: list, gate_kinds: dict) -> dict:
    """{tensor name: safetensors dtype} of every tensor to read, each checked (present, a
    float dtype, shape (d,) with d ≤ MAX_MAP_DIM, ω/b/gate w of one shape, gate c one value)
    before any is read."""
    wanted = {}

    def entry(name: str):
        e = header.tensors.get(name)
        if e is None:
            raise ValueError(f"tensor {name!r} is missing")
        if e.dtype not in _FLOAT_DTYPES:
            raise ValueError(
                f"tensor {name!r} is stored as {e.dtype}: steering maps must be float32, "
                f"float16 or bfloat16 (float64 is cast to float32); float8, integer and bool "
                f"maps are refused"
            )
        wanted[name] = e.dtype
        return e

    for n in modules:
        om, b = entry(f"{n}.omega"), entry(f"{n}.bias")
        if len(om.shape) != 1 or om.shape != b.shape:
            raise ValueError(
                f"map for {n!r}: omega {om.shape} and bias {b.shape} must both be (d,) with the same d"
            )
        if not 1 <= om.shape[0] <= MAX_MAP_DIM:
            raise ValueError(
                f"map for {n!r}: tensor {n + '.omega'!r} declares {om.shape[0]} coordinates "
                f"(allowed: 1 to {MAX_MAP_DIM})"
            )
    for n in gate_kinds:
        if n not in modules:
            raise ValueError(f"gate for {n!r}, which has no map")
        w, c = entry(f"{n}.gate_w"), entry(f"{n}.gate_c")
        d = header.tensors[f"{n}.omega"].shape
        if w.shape != d or c.numel != 1:
            raise ValueError(f"gate for {n!r}: w must be {d} and c one value, got {w.shape} and {c.shape}")
    return wanted


def _as_map_tensor(t: torch.Tensor, name: str, dtype: str) -> torch.Tensor:
    """A read map tensor as kept: float64 cast to float32, refused when a value does not fit."""
    if dtype != "F64":
        return t
    finite = t[torch.isfinite(t)]
    big = float(finite.abs().max()) if finite.numel() else 0.0
    if big > torch.finfo(torch.float32).max:
        raise ValueError(
            f"tensor {name!r} is float64 with a value of magnitude {big:.3g}, beyond float32's "
            f"range ({torch.finfo(torch.float32).max:.3g}): refused rather than cast to Inf"
        )
    return t.float()


class Steering:
    """Per-module affine maps T(z) = ω⊙z + b (SPEC §3, §7).

    Args:
        maps: {module name: (omega (d,), bias (d,))} float tensors (kept as given, so training
            can pass its leaf parameters).
        metadata: free-form JSON-able information saved with the maps (model fingerprint,
            hyperparameters, ...).
    """

    def __init__(
        self,
        maps: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        metadata: dict | None = None,
        gates: Mapping[str, dict] | None = None,
    ):
        if not maps:
            raise ValueError("a Steering needs at least one module map")
        self._maps: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, pair in maps.items():
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"map for {name!r} must be a pair (omega, bias)")
            omega, bias = pair
            if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in pair):
                raise TypeError(f"map for {name!r}: omega and bias must be floating-point tensors")
            if omega.ndim != 1 or omega.shape != bias.shape:
                raise ValueError(
                    f"map for {name!r}: omega {tuple(omega.shape)} and bias "
                    f"{tuple(bias.shape)} must both be (d,)"
                )
            finite_tensors(f"map for {name!r}", omega=omega.detach(), bias=bias.detach())
            self._maps[name] = (omega, bias)
        self.metadata = dict(metadata or {})
        self.gates: dict[str, dict] = {}
        for name, gate in (gates or {}).items():
            if name not in self._maps:
                raise ValueError(f"gate for {name!r}, which has no map")
            w, c, kind = gate["w"], gate["c"], gate.get("kind", "sigmoid")
            if w.shape != self._maps[name][0].shape or c.numel() != 1:
                raise ValueError(
                    f"gate for {name!r}: w must be ({self._maps[name][0].shape[0]},) "
                    f"and c one value, got {tuple(w.shape)} and {tuple(c.shape)}"
                )
            if kind not in ("sigmoid", "relu"):
                raise ValueError(f"gate kind for {name!r} must be 'sigmoid' or 'relu', got {kind!r}")
            finite_tensors(f"gate for {name!r}", w=w.detach(), c=c.detach())
            self.gates[name] = {"w": w, "c": c.reshape(1), "kind": kind}

    # --- inspection -------------------------------------------------------------------------
    @property
    def modules(self) -> list[str]:
        return list(self._maps)

    def __getitem__(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self._maps[name]

    def __contains__(self, name: str) -> bool:
        return name in self._maps

    def __len__(self) -> int:
        return len(self._maps)

    def dims(self) -> dict[str, int]:
        return {n: om.shape[0] for n, (om, _) in self._maps.items()}

    def support(self, per_module: bool = False):
        """Coordinates whose map is not the identity (ω ≠ 1 or b ≠ 0): a total, or per module."""
        counts = {n: int(((om != 1) | (b != 0)).sum()) for n, (om, b) in self._maps.items()}
        return counts if per_module else sum(counts.values())

    def __repr__(self) -> str:
        gated = f", {len(self.gates)} gated" if self.gates else ""
        return f"Steering({len(self)} modules, support {self.support()}/{sum(self.dims().values())}{gated})"

    def _map_gates(self, fn) -> dict:
        return {n: {"w": fn(g["w"]), "c": fn(g["c"]), "kind": g["kind"]} for n, g in self.gates.items()}

    # --- algebra ------------------------------------------------------------------------------
    def detach(self) -> "Steering":
        return Steering(
            {n: (om.detach().clone(), b.detach().clone()) for n, (om, b) in self._maps.items()},
            self.metadata,
            self._map_gates(lambda t: t.detach().clone()),
        )

    def to(self, device=None, dtype=None) -> "Steering":
        return Steering(
            {
                n: (om.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype))
                for n, (om, b) in self._maps.items()
            },
            self.metadata,
            self._map_gates(lambda t: t.to(device=device, dtype=dtype)),
        )

    def inverse(self) -> "Steering":
        """T⁻¹(z) = (z − b)/ω as an affine map: ω' = 1/ω, b' = −b/ω."""
        out = {}
        for n, (om, b) in self._maps.items():
            if bool((om == 0).any()):
                raise ValueError(f"module {n!r}: omega has zeros, the map has no inverse")
            out[n] = (1.0 / om, -b / om)
        return Steering(out, {**self.metadata, "inverse_of": self.metadata.get("name", "")}, self.gates)

    def compose(self, other: "Steering") -> "Steering":
        """self ∘ other: ``other`` applied first, then ``self`` (SPEC §3:
        (T₂∘T₁)(z) = ω₂ω₁⊙z + ω₂b₁ + b₂). A module in only one of them keeps its map."""
        out = dict(other._maps)
        both_gated = [n for n in self._maps if n in other._maps and (n in self.gates or n in other.gates)]
        if both_gated:
            raise ValueError(
                f"cannot compose gated maps at the same module: {both_gated[:5]} "
                f"(a gated map composed with another is not one gated affine map)"
            )
        for n, (om2, b2) in self._maps.items():
            if n in out:
                om1, b1 = out[n]
                if om1.shape != om2.shape:
                    raise ValueError(
                        f"module {n!r}: cannot compose maps of dims {om1.shape[0]} and {om2.shape[0]}"
                    )
                out[n] = (om2 * om1, om2 * b1 + b2)
            else:
                out[n] = (om2, b2)
        meta = {**other.metadata, **self.metadata}
        models = _fingerprints(other.metadata)
        models += [m for m in _fingerprints(self.metadata) if m not in models]
        if len(models) > 1:
            meta["models"] = models  # every fingerprint is kept; validate checks each
        return Steering(out, meta, {**other.gates, **self.gates})

    # --- files -------------------------------------------------------------------------------
    def save(self, path: str, **metadata) -> None:
        """Write safetensors (tensors ``<module>.omega`` / ``<module>.bias``, float32) with JSON
        metadata, atomically: ``path`` holds the old complete file until the new one is complete
        and renamed over it (``io.atomic_path``; an error, Ctrl-C or SIGTERM leaves no temporary).
        Maps that became non-finite since construction (NaN/Inf) are refused before writing.

        The metadata (``self.metadata`` updated with ``metadata``) is checked before anything is
        written (``check_metadata``: JSON values only, string keys, depth ≤ 64; ``model`` the
        fingerprint object or None), and the temporary file is read back with ``load`` before it
        replaces ``path``: a file ``load`` would refuse never replaces an existing one."""

        path = os.fspath(path)
        if os.path.isdir(path):
            raise IsADirectoryError(f"cannot save steering to {path!r}: it is a folder")
        meta = check_metadata({**self.metadata, **metadata}, f"cannot save steering to {path!r}")
        tensors = {}
        for n, (om, b) in self._maps.items():
            tensors[f"{n}.omega"] = om.detach().float().cpu().contiguous()
            tensors[f"{n}.bias"] = b.detach().float().cpu().contiguous()
        for n, g in self.gates.items():
            tensors[f"{n}.gate_w"] = g["w"].detach().float().cpu().contiguous()
            tensors[f"{n}.gate_c"] = g["c"].detach().float().cpu().reshape(1).contiguous()
        bad = [k for k, t in tensors.items() if not bool(torch.isfinite(t).all())]
        if bad:
            raise ValueError(f"cannot save steering to {path!r}: {bad[:5]} not finite (NaN or Inf)")
        header = {
            "format": FORMAT,
            "library_version": __version__,
            "modules": json.dumps(self.modules),
            "dims": json.dumps(self.dims()),
            "metadata": json.dumps(meta, allow_nan=True),
            "gates": json.dumps({n: g["kind"] for n, g in self.gates.items()}),
        }
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=header)
            try:
                Steering.load(tmp)  # round trip: what load refuses never replaces `path`
            except ValueError as e:
                raise ValueError(
                    f"cannot save steering to {path!r}: the written file does not read back "
                    f"({str(e).replace(tmp, '<temporary>')}); {path!r} left as it was"
                ) from None

    @classmethod
    def load(cls, path: str, device=None) -> "Steering":
        """Read a file written by ``save`` (safetensors: no unpickling), as untrusted input.

        Before any tensor is read, the header is read and checked by hand
        (``untrusted.safetensors_header``: size, JSON depth ≤ 64, every tensor's dtype, shape
        and offsets against the file's size and each other), then every map: ``ω`` and ``b``
        float32, float16 or bfloat16 of one shape (d,) with 1 ≤ d ≤ ``MAX_MAP_DIM``, equal to the
        recorded ``dims``; a gate's ``w`` (d,) and ``c`` one value. float64 maps are cast to
        float32, and refused when a value does not fit float32; float8, integer and bool
        tensors are refused. Memory used by a refusal is bounded by the header, never by the
        declared shapes. Any problem: ValueError naming the file (and the tensor or key)."""

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"steering file {path!r} does not exist")
        try:
            header = safetensors_header(path, what=f"cannot read steering file {path!r}")
            modules, gate_kinds, meta = _header_fields(header)
            wanted = _checked_entries(header, modules, gate_kinds)
            with safe_open(path, framework="pt", device="cpu") as f:
                loaded = {k: _as_map_tensor(f.get_tensor(k), k, dtype) for k, dtype in wanted.items()}
            if device:
                loaded = {k: t.to(device) for k, t in loaded.items()}
            maps = {n: (loaded[f"{n}.omega"], loaded[f"{n}.bias"]) for n in modules}
            gates = {
                n: {"w": loaded[f"{n}.gate_w"], "c": loaded[f"{n}.gate_c"], "kind": kind}
                for n, kind in gate_kinds.items()
            }
            return cls(maps, meta, gates)
        except (SafetensorError, KeyError, ValueError, TypeError) as e:
            msg = one_line(e)
            if path in msg:
                raise ValueError(msg) from None
            raise ValueError(f"cannot read steering file {path!r}: {msg}") from None

    # --- use on a model ------------------------------------------------------------------------
    def validate(self, model, strict: bool = True) -> dict[str, nn.Module]:
        """Check every map's module exists with the map's dimension (and, if ``strict`` and
        the file recorded one, the same model fingerprint). ``model`` is a model, a diffusers
        pipeline (names prefixed by component, ``unet.…``) or a ``Target``; a pipeline's
        steering also validates against the component alone (``pipeline.unet``), where the
        fingerprint cannot be compared. Returns {name in the model: module}."""
        target = as_target(model)
        own = target.resolve(self)
        named = target.named
        target.require(own.modules, "steering maps modules")
        refuse_silent_modules(own.modules, named)
        for n, (om, _) in own._maps.items():
            d = coordinate_dim(named[n])
            if d is not None and d != om.shape[0]:
                raise ValueError(
                    f"module {n!r} has {d} coordinates but its map has "
                    f"{om.shape[0]}: this steering was trained on another model"
                )
        want = self.metadata.get("model")
        if want is not None and not isinstance(want, dict):
            raise ValueError(
                f"steering metadata 'model' must be a fingerprint object, got {type(want).__name__} {want!r}"
            )
        if strict and own is self:
            have = target.fingerprint()
            for fp in _fingerprints(self.metadata):  # a composed steering checks each
                if (fp.get("model_type"), fp.get("shapes_sha256")) != (
                    have["model_type"],
                    have["shapes_sha256"],
                ):
                    raise ArgumentError(
                        f"steering was trained on model {fp} but this model is {have}; "
                        f"pass strict=False to apply it anyway",
                        "strict",
                    )
        return {n: named[n] for n in own._maps}

    def strip_prefix(self, prefix: str) -> "Steering":
        """The same maps with ``prefix`` removed from every module name (e.g. "unet." to apply a
        pipeline's steering to ``pipeline.unet`` alone)."""
        if not all(n.startswith(prefix) for n in self._maps):
            raise ValueError(f"not every module name starts with {prefix!r}")
        cut = len(prefix)
        return Steering(
            {n[cut:]: m for n, m in self._maps.items()},
            self.metadata,
            {n[cut:]: g for n, g in self.gates.items()},
        )

    def strengths(self, strength: StrengthSpec) -> dict[str, float]:
        """Per-module strength from a float or {name or regex: float} (others get 1.0): an exact
        module name wins over regexes; two regexes giving one module different strengths are
        refused (``lineas_fast.strengths``)."""
        return resolve_strengths(self.modules, strength)

    def attach(
        self,
        model,
        strength: StrengthSpec = 1.0,
        strict: bool = True,
        backend: str | None = None,
        use_gates: bool = True,
        record_strengths: bool = False,
        compose: bool = False,
    ) -> "SteeringHandle":
        """Apply each map to its module's output with the fused kernel (the gated kernel for
        modules with a DSAS gate, unless ``use_gates=False``); a negative strength applies the
        inverse map with |strength|. ``model``: a model, a diffusers pipeline or a ``Target``.

        The map wraps the module's forward, so every forward hook on the module, registered
        before or after, sees the steered output. A module that already carries an attached map
        is refused unless ``compose=True`` (this map then acts on the other's output). The
        coefficients, casts and checks are done here, once; a call does no host sync.

        Returns a handle with ``.remove()``; with ``record_strengths=True`` its
        ``.strengths[module]`` collects the per-token strengths λ·g of every call (float32, the
        output's shape without the coordinate axis)."""
        target = as_target(model)
        refuse_steered(target.root, compose, "attach this steering")
        modules = self.validate(target, strict)
        own = target.resolve(self)
        strengths = own.strengths(strength)
        live = {n: mod for n, mod in modules.items() if strengths[n] != 0.0}
        check_free(live, compose)
        for n, mod in live.items():  # once, here: what the map does to the model's numbers
            om, b = own._maps[n]
            a, c = effective_coefficients(om, b, strengths[n])
            check_effective(n, a, c, module_dtype(mod, module_dtype(target.root)), strengths[n])
        steers = {}
        handle = SteeringHandle([])
        for n, mod in live.items():
            om, b = own._maps[n]
            gate = own.gates.get(n) if use_gates else None
            rec = handle.strengths.setdefault(n, []) if record_strengths else None
            steers[n] = make_steer(n, mod, om, b, strengths[n], backend, gate, rec)
        handle.installed = [SteeredForward(n, live[n], fn) for n, fn in steers.items()]
        return handle

    @contextlib.contextmanager
    def apply(
        self,
        model,
        strength: StrengthSpec = 1.0,
        strict: bool = True,
        backend: str | None = None,
        use_gates: bool = True,
        record_strengths: bool = False,
        compose: bool = False,
    ):
        """Context manager: ``with steering.apply(model, strength=0.5) as handle: ...``
        (the handle holds recorded strengths when asked)."""
        handle = self.attach(model, strength, strict, backend, use_gates, record_strengths, compose)
        try:
            yield handle
        finally:
            handle.remove()

    def plot_support(self, path: str) -> None:
        """Bar chart of the support (coordinates switched on) per module, as a PNG (needs
        matplotlib: ``MissingExtraError`` naming it otherwise)."""
        plt = pyplot("Steering.plot_support")

        counts, dims = self.support(per_module=True), self.dims()
        fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(counts)), 3.5))
        ax.bar(range(len(counts)), [counts[n] / dims[n] for n in counts])
        ax.set_xticks(range(len(counts)))
        ax.set_xticklabels(list(counts), rotation=90, fontsize=6)
        ax.set_ylabel("support (fraction of coordinates)")
        ax.set_ylim(0, 1)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
        plt.close(fig)


class SteeringHandle:
    """The maps installed by ``Steering.attach``; ``remove()`` takes them all off."""

    def __init__(self, installed):
        self.installed = installed
        self.strengths: dict[str, list] = {}

    def remove(self) -> None:
        for s in reversed(self.installed):
            s.remove()
        self.installed = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
