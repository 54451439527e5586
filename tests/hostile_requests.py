"""Hostile per-request steering arguments, shared by the cpu lane (``requests.parse_request``
alone) and the serving lane (the same values through vLLM offline and the OpenAI-compatible
server, each refused alone, then requests still served token for token).

The registered steerings these tables assume (``registered_for_hostile``):
  "all"     a map of moderate coefficients (ω ≈ 1 ± 0.3, b ≈ ±0.5): strengths up to the cap
            (registry.MAX_STRENGTH = 1e6) accepted at the default request dtype (float32);
  "fragile" one module whose ω has a coordinate 1e-40 (its inverse overflows float32: negative
            strengths refused) and whose bias has a coordinate 1e12 (|strength| <= 7.2e16 / 1e12).

Each case: (id, vllm_xargs or extra_args, a fragment the refusal contains).
``SERVER_CASES`` are JSON values in the flat form (what ``extra_body["vllm_xargs"]`` carries);
``OFFLINE_CASES`` add Python objects that only ``SamplingParams(extra_args=...)`` can carry.
"""

import decimal

import torch

FRAGILE_MODULE = "model.layers.1.input_layernorm"
#: how vLLM itself refuses some values before the plugin sees them: integers outside 64 bits
#: (SamplingParams), values its schema for vllm_xargs does not allow (pydantic, on the server)
VLLM_OWN = ("extra_args integers must be between", "Input should be", "vllm_xargs")
FINITE = "finite number"
NOT_OURS = "is not a lineas_fast key"
BEYOND = "is beyond what steering"


def fragile_map(d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ω, b) (d,): ω = 1 but 1e-40 at coordinate 0, b = 0 but 1e12 at coordinate 1."""
    omega, bias = torch.ones(d), torch.zeros(d)
    omega[0], bias[1] = 1e-40, 1e12
    return omega, bias


def _flat(steering, strength="__absent__"):
    x = {"lineas_fast_steering": steering}
    if strength != "__absent__":
        x["lineas_fast_strength"] = strength
    return x


SERVER_CASES = [
    # strengths that overflow, or are not finite numbers
    ("strength-1e308", _flat("all", 1e308), BEYOND),
    ("strength--1e308", _flat("all", -1e308), BEYOND),
    ("strength-1e30", _flat("all", 1e30), BEYOND),
    ("strength--1e30", _flat("all", -1e30), BEYOND),
    ("strength-2**63", _flat("all", 2**63), BEYOND),
    ("strength--2**63", _flat("all", -(2**63)), BEYOND),
    ("strength-2**64", _flat("all", 2**64), BEYOND),
    ("strength-1e7", _flat("all", 1e7), BEYOND),
    ("strength-1e6+1", _flat("all", 1e6 + 1), BEYOND),
    ("strength-2e6", _flat("all", 2e6), BEYOND),
    ("strength--2e6", _flat("all", -2_000_000), BEYOND),
    ("strength-nan", _flat("all", float("nan")), FINITE),
    ("strength-inf", _flat("all", float("inf")), FINITE),
    ("strength--inf", _flat("all", float("-inf")), FINITE),
    ("strength-str", _flat("all", "1"), FINITE),
    ("strength-str-float", _flat("all", "0.5"), FINITE),
    ("strength-str-nan", _flat("all", "nan"), FINITE),
    ("strength-str-empty", _flat("all", ""), FINITE),
    ("strength-list", _flat("all", [1.0]), FINITE),
    ("strength-list-empty", _flat("all", []), FINITE),
    ("strength-list-two", _flat("all", [1, 2]), FINITE),
    # the fragile steering: an inverse that overflows float32, a bias that binds the strength
    ("fragile-inverse", _flat("fragile", -1.0), "cannot serve"),
    ("fragile-inverse-small", _flat("fragile", -1e-3), "cannot serve"),
    ("fragile-inverse-int", _flat("fragile", -1), "cannot serve"),
    ("fragile-over-bias", _flat("fragile", 1e5), BEYOND),
    ("fragile-over-bias-int", _flat("fragile", 100_000), BEYOND),
    # steering names
    ("name-unknown", _flat("nope"), "unknown steering 'nope'"),
    ("name-empty", _flat(""), "must be the name of a registered steering"),
    ("name-space", _flat(" "), "unknown steering"),
    ("name-case", _flat("ALL"), "unknown steering 'ALL'"),
    ("name-trailing-space", _flat("all "), "unknown steering"),
    ("name-leading-space", _flat(" all"), "unknown steering"),
    ("name-nul", _flat("all\x00"), "unknown steering"),
    ("name-comma", _flat("all,first"), "unknown steering"),
    ("name-path", _flat("../../etc/passwd"), "unknown steering"),
    ("name-rtl", _flat("\u202eall"), "unknown steering"),
    ("name-emoji", _flat("\U0001f600"), "unknown steering"),
    ("name-300", _flat("x" * 300), "must be the name of a registered steering"),
    ("name-256", _flat("y" * 256), "unknown steering"),
    ("name-1M", _flat("z" * 1_000_000), "must be the name of a registered steering"),
    ("name-int", _flat(123), "must be the name of a registered steering"),
    ("name-float", _flat(1.5), "must be the name of a registered steering"),
    ("name-list", _flat(["all"]), "must be the name of a registered steering"),
    ("name-list-empty", _flat([]), "must be the name of a registered steering"),
    ("name-missing", {"lineas_fast_strength": 1.0}, "must be the name of a registered steering"),
    # near misses of the keys: refused naming ours, never served unsteered
    ("key-capitalised", {"Lineas_Fast_steering": "all"}, NOT_OURS),
    ("key-upper", {"LINEAS_FAST_STEERING": "all"}, NOT_OURS),
    ("key-dashes", {"lineas-fast-steering": "all"}, NOT_OURS),
    ("key-dots", {"lineas.fast.steering": "all"}, NOT_OURS),
    ("key-no-separator", {"lineasfast_steering": "all"}, NOT_OURS),
    ("key-field-capital", {"lineas_fast_Steering": "all"}, NOT_OURS),
    ("key-trailing-space", {"lineas_fast_steering ": "all"}, NOT_OURS),
    ("key-typo-strength", {"lineas_fast_steering": "all", "lineas_fast_strenght": 1.0}, NOT_OURS),
    ("key-bare-prefix", {"lineas_fast_": "all"}, NOT_OURS),
    ("key-unknown-field", {"lineas_fast_steering": "all", "lineas_fast_layer": 3}, NOT_OURS),
    ("key-nested-dashes", {"lineas-fast": "all"}, NOT_OURS),
    ("key-nested-capital", {"Lineas_Fast": "all"}, NOT_OURS),
    # the nested key with a value that is not an object (the server's schema allows no object)
    ("nested-string", {"lineas_fast": "all"}, "must be an object"),
    ("nested-list", {"lineas_fast": ["all", 1.0]}, "must be an object"),
    ("nested-number", {"lineas_fast": 1}, "must be an object"),
    ("both-forms", {"lineas_fast": "all", "lineas_fast_steering": "all"}, "give one form"),
]

OFFLINE_CASES = SERVER_CASES + [
    ("extra-args-list", ["lineas_fast", "all"], "extra_args must be an object"),
    ("extra-args-string", "lineas_fast", "extra_args must be an object"),
    ("nested-unknown-key", {"lineas_fast": {"steering": "all", "strenght": 1.0}}, "unknown key 'strenght'"),
    ("nested-no-name", {"lineas_fast": {"strength": 1.0}}, "must be the name of a registered steering"),
    ("nested-nan", {"lineas_fast": {"steering": "all", "strength": float("nan")}}, FINITE),
    ("nested-overflow", {"lineas_fast": {"steering": "all", "strength": 1e30}}, BEYOND),
    ("strength-bool", _flat("all", True), FINITE),
    ("strength-decimal", _flat("all", decimal.Decimal("1")), FINITE),
    ("strength-complex", _flat("all", 1j), FINITE),
    ("strength-int-10**400", _flat("all", 10**400), FINITE),
    ("strength-int-10**5000", _flat("all", 10**5000), FINITE),
    ("strength-none", _flat("all", None), FINITE),
    ("name-bytes", _flat(b"all"), "must be the name of a registered steering"),
    ("name-deep-list", _flat([[[[[[[[["all"]]]]]]]]]), "must be the name of a registered steering"),
    ("name-bad-repr", _flat(type("Evil", (), {"__repr__": lambda self: 1 / 0})()), "got Evil"),
]
