"""``Steering``: one affine map (ω, b) per module, saved as safetensors, applied by hooks."""

from __future__ import annotations

import contextlib
import json
import os
import re
from typing import Mapping, Union

import torch
from torch import nn

from lineas_fast.atomic import atomic_path
from lineas_fast.checks import finite_tensors, number
from lineas_fast.hooks import SteeredForward, check_free, make_steer
from lineas_fast.modules import coordinate_dim
from lineas_fast.targets import as_target

FORMAT = "lineas_fast.steering"
StrengthSpec = Union[float, Mapping[str, float]]


def model_fingerprint(model) -> dict:
    """What identifies a model's (or a pipeline's) architecture and size, not its weights: its
    config's model_type and a hash of every parameter's name and shape."""
    return as_target(model).fingerprint()


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
        return Steering(out, {**other.metadata, **self.metadata}, {**other.gates, **self.gates})

    # --- files -------------------------------------------------------------------------------
    def save(self, path: str, **metadata) -> None:
        """Write safetensors (tensors ``<module>.omega`` / ``<module>.bias``, float32) with JSON
        metadata, atomically: ``path`` holds the old complete file until the new one is complete
        and renamed over it (``io.atomic_path``; an error, Ctrl-C or SIGTERM leaves no temporary).
        Maps that became non-finite since construction (NaN/Inf) are refused before writing."""
        from safetensors.torch import save_file

        from lineas_fast._version import __version__

        if os.path.isdir(path):
            raise IsADirectoryError(f"cannot save steering to {path!r}: it is a folder")
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
        meta = {**self.metadata, **metadata}
        header = {
            "format": FORMAT,
            "library_version": __version__,
            "modules": json.dumps(self.modules),
            "dims": json.dumps(self.dims()),
            "metadata": json.dumps(meta, default=str),
            "gates": json.dumps({n: g["kind"] for n, g in self.gates.items()}),
        }
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=header)

    @classmethod
    def load(cls, path: str, device=None) -> "Steering":
        """Read a file written by ``save`` (safetensors: no unpickling)."""
        from safetensors import SafetensorError, safe_open

        if not os.path.isfile(path):
            raise FileNotFoundError(f"steering file {path!r} does not exist")
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                header = f.metadata() or {}
                if header.get("format") != FORMAT:
                    raise ValueError(
                        f"{path!r} is not a lineas_fast steering file (format {header.get('format')!r})"
                    )
                modules = json.loads(header["modules"])
                gate_kinds = json.loads(header.get("gates", "{}"))
                meta = json.loads(header.get("metadata", "{}"))
                if not (
                    isinstance(modules, list)
                    and all(isinstance(n, str) for n in modules)
                    and isinstance(gate_kinds, dict)
                    and isinstance(meta, dict)
                    and isinstance(meta.get("model", {}), dict)
                ):
                    raise ValueError(
                        "malformed header: 'modules' must be a list of names, "
                        "'gates' and 'metadata' (and its 'model') JSON objects"
                    )
                maps = {}
                for n in modules:
                    om, b = f.get_tensor(f"{n}.omega"), f.get_tensor(f"{n}.bias")
                    maps[n] = (om.to(device) if device else om, b.to(device) if device else b)
                gates = {}
                for n, kind in gate_kinds.items():
                    w, c = f.get_tensor(f"{n}.gate_w"), f.get_tensor(f"{n}.gate_c")
                    gates[n] = {
                        "w": w.to(device) if device else w,
                        "c": c.to(device) if device else c,
                        "kind": kind,
                    }
            return cls(maps, meta, gates)
        except (SafetensorError, json.JSONDecodeError, KeyError, ValueError, TypeError) as e:
            raise ValueError(f"cannot read steering file {path!r}: {e}") from None

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
        if strict and want and own is self:
            have = target.fingerprint()
            if (want.get("model_type"), want.get("shapes_sha256")) != (
                have["model_type"],
                have["shapes_sha256"],
            ):
                raise ValueError(
                    f"steering was trained on model {want} but this model is {have}; "
                    f"pass strict=False to apply it anyway"
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
        """Per-module strength from a float or {name or regex: float} (others get 1.0)."""
        if isinstance(strength, Mapping):
            out = {n: 1.0 for n in self._maps}
            for key, val in strength.items():
                hits = [n for n in self._maps if n == key or re.fullmatch(key, n)]
                if not hits:
                    raise ValueError(
                        f"strength key {key!r} matches no steered module (steered: {self.modules[:5]}...)"
                    )
                for n in hits:
                    out[n] = number(val, f"strength[{key!r}]")
            return out
        if isinstance(strength, torch.Tensor):
            raise TypeError(
                "a per-token strength tensor is set per call with affine_steer; "
                "attach/apply take a float or a per-module dict"
            )
        value = number(strength, "strength")
        return {n: value for n in self._maps}

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
        modules = self.validate(target, strict)
        own = target.resolve(self)
        strengths = own.strengths(strength)
        live = {n: mod for n, mod in modules.items() if strengths[n] != 0.0}
        check_free(live, compose)
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
        """Bar chart of the support (coordinates switched on) per module, as a PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

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
