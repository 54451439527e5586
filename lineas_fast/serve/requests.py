"""What one request asks for: its ``extra_args`` (vLLM ``SamplingParams.extra_args``; on the
OpenAI-compatible server ``extra_body["vllm_xargs"]``) read as untrusted input.

Two forms, one per request:

    extra_args = {"lineas_fast": {"steering": NAME, "strength": S}}                 # nested
    extra_args = {"lineas_fast_steering": NAME, "lineas_fast_strength": S}          # flat

(the server's ``vllm_xargs`` values may not be objects, so it carries the flat form). S
defaults to 1.0; 0 means no steering; a negative S applies the inverse map. Every check runs
here, in the process that validates the request (vLLM's front end: a ``ValueError`` there is
the request's HTTP 400), and again in the worker, so nothing a request carries reaches the
engine unchecked:

* ``extra_args`` an object; no key that is a near miss of ours (``Lineas_Fast``,
  ``lineas-fast-strength``, ``lineas_fast_strenght``: refused naming the expected keys, never
  served unsteered in silence); not both forms;
* the steering a registered name (a string of at most ``MAX_NAME`` characters);
* the strength a real number (int, float, numpy scalars; not bool, not a string) that is a
  finite float, with |S| within the steering's limit for that direction
  (``registry.limits``: the coefficient bound ``attach`` applies to float16 activations, and
  ``registry.MAX_STRENGTH``) and, when negative, an inverse that exists.

Error messages quote at most ``SHOW_CHARS`` characters of any value they echo.
"""

from __future__ import annotations

import math
import numbers
import reprlib
from collections.abc import Mapping

from lineas_fast.numerics import coefficient_bound
from lineas_fast.serve import registry

REQUEST_KEY = "lineas_fast"
FLAT_PREFIX = "lineas_fast_"
FIELDS = ("steering", "strength")
FLAT_KEYS = tuple(FLAT_PREFIX + f for f in FIELDS)
MAX_NAME = 256
SHOW_CHARS = 80
#: registered names listed in an "unknown steering" error
SHOW_NAMES = 10


class SteeringRequestError(ValueError):
    """A request's steering arguments that cannot be served (the engine refuses that request
    only; vLLM turns a ValueError from validation into HTTP 400)."""


_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = _repr.maxlong = SHOW_CHARS
_repr.maxlevel, _repr.maxlist, _repr.maxdict, _repr.maxtuple = 2, 4, 4, 4


def show(value) -> str:
    """A short, safe repr of an untrusted value (at most about ``SHOW_CHARS`` characters;
    never raises)."""
    try:
        text = _repr.repr(value)
    except Exception:  # noqa: BLE001 -- a hostile __repr__, an int past str()'s digit limit
        text = f"<{type(value).__name__}>"
    return text if len(text) <= SHOW_CHARS + 3 else text[:SHOW_CHARS] + "..."


def _squash(key: str) -> str:
    return "".join(c for c in key.lower() if c.isalnum())


_OURS = {_squash(k): k for k in (REQUEST_KEY, *FLAT_KEYS)}


def _near_misses(extra_args: Mapping) -> list:
    """Keys that look like ours but are not exactly ours: another spelling of a key, or an
    unknown field under our prefix."""
    misses = []
    for key in extra_args:
        if not isinstance(key, str) or key == REQUEST_KEY or key in FLAT_KEYS:
            continue
        if _squash(key) in _OURS or _squash(key).startswith(_squash(REQUEST_KEY)):
            misses.append(key)
    return misses


def parse_request(extra_args) -> tuple[str, float] | None:
    """(steering name, strength) a request asks for, or None when it asks for none (no key of
    ours, or strength 0). SteeringRequestError names what is wrong (module docstring)."""
    if extra_args is None:
        return None
    if not isinstance(extra_args, Mapping):
        raise SteeringRequestError(
            f"extra_args must be an object (a dict of str to values), got {type(extra_args).__name__} "
            f"{show(extra_args)}"
        )
    misses = _near_misses(extra_args)
    if misses:
        raise SteeringRequestError(
            f"extra_args key {show(misses[0])} is not a lineas_fast key: per-request steering reads "
            f'"{REQUEST_KEY}" (an object {{"steering": NAME, "strength": S}}) or the flat keys '
            f'"{FLAT_KEYS[0]}" and "{FLAT_KEYS[1]}"'
        )
    flat = [k for k in FLAT_KEYS if k in extra_args]
    if REQUEST_KEY in extra_args and flat:
        raise SteeringRequestError(f'extra_args has both "{REQUEST_KEY}" and {flat}: give one form')
    if REQUEST_KEY in extra_args:
        spec = extra_args[REQUEST_KEY]
        if not isinstance(spec, Mapping):
            raise SteeringRequestError(
                f'extra_args["{REQUEST_KEY}"] must be an object {{"steering": NAME, "strength": S}}, '
                f"got {type(spec).__name__} {show(spec)}"
            )
        unknown = [k for k in spec if k not in FIELDS]
        if unknown:
            raise SteeringRequestError(
                f'extra_args["{REQUEST_KEY}"]: unknown key {show(unknown[0])} '
                '(allowed: "steering", "strength")'
            )

        def field(f):
            return f'extra_args["{REQUEST_KEY}"]["{f}"]'

    elif flat:
        spec = {f: extra_args[FLAT_PREFIX + f] for f in FIELDS if FLAT_PREFIX + f in extra_args}

        def field(f):
            return f'extra_args["{FLAT_PREFIX}{f}"] (vllm_xargs on the server)'

    else:
        return None
    name = _steering_name(spec.get("steering"), field("steering"))
    strength = _strength(spec.get("strength", 1.0), field("strength"))
    if strength == 0.0:
        return None
    _check_limit(name, strength, field("strength"))
    return name, strength


def _steering_name(name, what: str) -> str:
    if not isinstance(name, str) or not name or len(name) > MAX_NAME:
        raise SteeringRequestError(
            f"{what} must be the name of a registered steering (a string of 1 to {MAX_NAME} characters), "
            f"got {type(name).__name__} {show(name)}"
        )
    steerings = registry.registered()
    if name not in steerings:
        names = list(steerings)
        have = (
            "none: set $LINEAS_FAST_STEERINGS"
            if not names
            else ", ".join(show(n) for n in names[:SHOW_NAMES])
            + (f" and {len(names) - SHOW_NAMES} more" if len(names) > SHOW_NAMES else "")
        )
        raise SteeringRequestError(f"unknown steering {show(name)}; registered: {have}")
    return name


def _strength(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        got = f"{type(value).__name__} {show(value)}"
        raise SteeringRequestError(f"{what} must be a finite number, got {got}")
    try:
        s = float(value)
    except (OverflowError, ValueError, TypeError):
        s = math.inf
    if not math.isfinite(s):
        raise SteeringRequestError(f"{what} must be a finite number, got {show(value)}")
    return s


def _check_limit(name: str, strength: float, what: str) -> None:
    lim = registry.limits(name)
    direction = lim.inverse if strength < 0 else lim.forward
    if direction.unusable is not None:
        raise SteeringRequestError(
            f"steering {show(name)}: a negative strength applies the inverse map, which this steering "
            f"cannot serve: {direction.unusable}"
        )
    if abs(strength) > direction.strength:
        sign = "-" if strength < 0 else ""
        if direction.module is None:
            why = f"the largest strength any request may ask for is {registry.MAX_STRENGTH:g}"
        else:
            dtype = registry.request_dtype()
            why = (
                f"at module {direction.module!r} coordinate {direction.coordinate} the map's coefficients "
                f"would pass {coefficient_bound(dtype):.4g}, the bound for {str(dtype)[6:]} activations "
                f"(${registry.DTYPE_ENV})"
            )
        raise SteeringRequestError(
            f"{what} {strength:g} is beyond what steering {show(name)} accepts "
            f"(|strength| <= {direction.strength:.4g} for {sign or '+'} strengths): {why}"
        )
