"""Per-module strengths from what a caller gives ``attach`` / ``apply``: one number for every
module, or a dict ``{module name or regex: number}`` (modules no key reaches get 1.0).

Which key sets a module's strength, whatever the dict's order:

1. a key that is a steered module's exact name sets that module (and no other);
2. else the regex keys that match the module's name (``re.fullmatch``) set it: when two of them
   give it different strengths, that is refused (``ArgumentError`` naming both keys, both
   values and the module); when they agree, that strength.

So ``{"model.layers.3.mlp": 0.5, ".*": 2.0}`` steers ``model.layers.3.mlp`` at 0.5 and the others
at 2.0, and ``{".*layers\\.3\\..*": 0.5, ".*mlp": 2.0}`` is refused for ``model.layers.3.mlp``.
Every key must reach at least one steered module; every value must be a finite number.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence, Union

import torch

from lineas_fast.checks import ArgumentError, ArgumentTypeError, number

StrengthSpec = Union[float, Mapping[str, float]]


def _pattern(key) -> re.Pattern:
    if not isinstance(key, str):
        raise ArgumentTypeError(
            f"strength keys must be module names or regexes (str), got {type(key).__name__} {key!r}",
            "strength",
        )
    try:
        return re.compile(key)
    except re.error as e:
        raise ArgumentError(
            f"strength key {key!r} is neither a steered module's name nor a valid regex ({e})", "strength"
        ) from None


def resolve_strengths(modules: Sequence[str], strength: StrengthSpec) -> dict[str, float]:
    """{module: strength} for the steered ``modules`` from a number or a dict (module doc)."""
    if isinstance(strength, torch.Tensor):
        raise ArgumentTypeError(
            "a per-token strength tensor is set per call with affine_steer; "
            "attach/apply take a float or a per-module dict",
            "strength",
        )
    if not isinstance(strength, Mapping):
        value = number(strength, "strength")
        return {n: value for n in modules}
    names = set(modules)
    values = {key: number(val, f"strength[{key!r}]") for key, val in strength.items()}
    exact = {key: v for key, v in values.items() if key in names}
    regexes = {key: (_pattern(key), v) for key, v in values.items() if key not in names}
    out, reached = {}, set(exact)
    for n in modules:
        hits = [(key, v) for key, (pattern, v) in regexes.items() if pattern.fullmatch(n)]
        reached.update(key for key, _ in hits)
        if n in exact:
            out[n] = exact[n]
            continue
        for key, v in hits[1:]:
            if v != hits[0][1]:
                raise ArgumentError(
                    f"strength keys {hits[0][0]!r} ({hits[0][1]:g}) and {key!r} ({v:g}) both match "
                    f"module {n!r} with different strengths; give that module its own key "
                    f"({n!r}: value: an exact name wins over regexes) or make the regexes disjoint",
                    "strength",
                )
        out[n] = hits[0][1] if hits else 1.0
    unreached = [key for key in values if key not in reached]
    if unreached:
        raise ArgumentError(
            f"strength key {unreached[0]!r} matches no steered module (steered: {list(modules)[:5]}...)",
            "strength",
        )
    return out
