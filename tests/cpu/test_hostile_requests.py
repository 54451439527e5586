"""Per-request steering arguments as an attacker sends them (lineas_fast/serve/requests.py, no
vLLM needed): every hostile value of tests/hostile_requests.py is refused with a short message
naming the problem; legitimate values of every numeric type are accepted; the strength limits
agree with ``attach``'s own numeric check (numerics.check_effective, float64) at the request dtype;
registration is refused once an engine started in this process. The same tables go through
vLLM in tests/serving/test_vllm_plugin.py."""

import fractions
import os
import sys

import numpy as np
import pytest
import torch

import lineas_fast as lf
from lineas_fast.numerics import NumericRangeError, check_effective, effective_coefficients
from lineas_fast.serve import registry, requests

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hostile_requests import FRAGILE_MODULE, OFFLINE_CASES, SERVER_CASES, fragile_map  # noqa: E402

D = 16
MODULES = ["model.layers.0.input_layernorm", FRAGILE_MODULE, "model.norm"]


def moderate(seed: int) -> lf.Steering:
    g = torch.Generator().manual_seed(seed)
    return lf.Steering(
        {m: (1 + 0.3 * torch.randn(D, generator=g), 0.5 * torch.randn(D, generator=g)) for m in MODULES}
    )


@pytest.fixture
def steerings(monkeypatch):
    monkeypatch.delenv(registry.ENV, raising=False)
    registry.clear_steerings()
    made = {"all": moderate(0), "fragile": lf.Steering({FRAGILE_MODULE: fragile_map(D)})}
    for name, s in made.items():
        registry.register_steering(name, s)
    yield made
    registry.clear_steerings()


def test_there_are_at_least_sixty_hostile_server_values():
    assert len(SERVER_CASES) >= 60 and len({c[0] for c in OFFLINE_CASES}) == len(OFFLINE_CASES)


@pytest.mark.parametrize("case", OFFLINE_CASES, ids=[c[0] for c in OFFLINE_CASES])
def test_hostile_value_is_refused_with_a_short_message(steerings, case):
    _, extra, fragment = case
    with pytest.raises(requests.SteeringRequestError) as e:
        requests.parse_request(extra)
    message = str(e.value)
    assert fragment in message
    assert len(message) < 700, len(message)  # what a request carries is echoed truncated


@pytest.mark.parametrize(
    "extra, want",
    [
        ({"lineas_fast": {"steering": "all", "strength": 0.5}}, ("all", 0.5)),
        ({"lineas_fast": {"steering": "all"}}, ("all", 1.0)),
        ({"lineas_fast_steering": "all", "lineas_fast_strength": -2}, ("all", -2.0)),
        ({"lineas_fast_steering": "all", "lineas_fast_strength": np.int64(3)}, ("all", 3.0)),
        ({"lineas_fast_steering": "all", "lineas_fast_strength": np.float32(0.25)}, ("all", 0.25)),
        ({"lineas_fast_steering": "all", "lineas_fast_strength": fractions.Fraction(1, 2)}, ("all", 0.5)),
        ({"lineas_fast_steering": "fragile", "lineas_fast_strength": 12.0}, ("fragile", 12.0)),
        ({"lineas_fast_steering": "all", "lineas_fast_strength": 0}, None),
        ({"lineas_fast_steering": "all", "lineas_fast_strength": -0.0}, None),
        ({"lineas_fast_steering": "all", "lineas_fast_strength": 1e-320}, ("all", 1e-320)),
        ({"other_plugin": {"x": 1}, "lineas": 1, "fast": 2}, None),  # not ours: left alone
        ({}, None),
        (None, None),
    ],
)
def test_legitimate_values_are_accepted(steerings, extra, want):
    assert requests.parse_request(extra) == want


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("name", ["all", "fragile"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_strength_limit_is_attachs_check(steerings, monkeypatch, dtype, name, sign):
    """Just under the limit every module passes ``check_effective`` at the request dtype
    (float64 arithmetic, the check ``attach`` applies to a model of that dtype); just over it
    some module fails it, or the cap binds, and the request is refused. An inverse that does
    not exist in float32 has no limit at all."""
    monkeypatch.setenv(registry.DTYPE_ENV, dtype)
    steering = steerings[name]
    direction = registry.limits(name).inverse if sign < 0 else registry.limits(name).forward
    if direction.unusable is not None:
        assert name == "fragile" and sign < 0 and "not a finite float32" in direction.unusable
        with pytest.raises(requests.SteeringRequestError, match="cannot serve"):
            requests.parse_request({"lineas_fast_steering": name, "lineas_fast_strength": -1e-6})
        return
    limit = direction.strength
    assert 0 < limit <= registry.MAX_STRENGTH
    under, over = sign * limit * (1 - 1e-6), sign * limit * (1 + 1e-6)

    def passes(strength):
        try:
            for m in steering.modules:
                a, c = effective_coefficients(*steering[m], strength)
                check_effective(m, a, c, getattr(torch, dtype), strength)
        except NumericRangeError:
            return False
        return True

    assert passes(under)
    if direction.module is None:  # the cap binds, not the dtype's bound
        assert limit == registry.MAX_STRENGTH and dtype == "float32" and name == "all"
    else:
        assert not passes(over)
    assert requests.parse_request({"lineas_fast_steering": name, "lineas_fast_strength": under}) == (
        name,
        under,
    )
    with pytest.raises(requests.SteeringRequestError, match="is beyond what steering"):
        requests.parse_request({"lineas_fast_steering": name, "lineas_fast_strength": over})


def test_a_float16_model_needs_the_float16_request_bound(monkeypatch):
    monkeypatch.delenv(registry.DTYPE_ENV, raising=False)
    registry.check_served_dtype(torch.float32)
    registry.check_served_dtype(torch.bfloat16)
    with pytest.raises(ValueError, match="set LINEAS_FAST_REQUEST_DTYPE=float16"):
        registry.check_served_dtype(torch.float16)
    monkeypatch.setenv(registry.DTYPE_ENV, "float16")
    registry.check_served_dtype(torch.float16)
    monkeypatch.setenv(registry.DTYPE_ENV, "fp8")
    with pytest.raises(ValueError, match="LINEAS_FAST_REQUEST_DTYPE='fp8'"):
        registry.request_dtype()


def test_identity_map_is_capped_at_max_strength(monkeypatch):
    monkeypatch.delenv(registry.ENV, raising=False)
    try:
        registry.register_steering("id", lf.Steering({"model.norm": (torch.ones(4), torch.zeros(4))}))
        assert registry.limits("id").forward.strength == registry.MAX_STRENGTH
        assert requests.parse_request({"lineas_fast_steering": "id", "lineas_fast_strength": 1e6}) == (
            "id",
            1e6,
        )
        with pytest.raises(requests.SteeringRequestError, match="largest strength any request"):
            requests.parse_request({"lineas_fast_steering": "id", "lineas_fast_strength": 1e6 * 1.5})
    finally:
        registry.clear_steerings()


def test_a_map_the_tables_cannot_hold_is_refused_at_registration(monkeypatch):
    monkeypatch.delenv(registry.ENV, raising=False)
    huge = lf.Steering({"model.norm": (torch.full((4,), 1e300, dtype=torch.float64), torch.zeros(4))})
    try:
        with pytest.raises(registry.RegistrationError, match="'model.norm' coordinate 0"):
            registry.register_steering("huge", huge)
        assert registry.ENV not in os.environ
    finally:
        registry.clear_steerings()


def test_registration_after_an_engine_started_is_refused(steerings):
    registry.mark_engine_started()
    with pytest.raises(registry.RegistrationError, match="already started in this process"):
        registry.register_steering("late", moderate(1))
    assert list(registry.registered()) == ["all", "fragile"]
    registry.clear_steerings()  # after the engine is shut down
    registry.register_steering("late", moderate(1))
    assert list(registry.registered()) == ["late"]


def test_unknown_steering_error_lists_at_most_ten_names(monkeypatch):
    monkeypatch.delenv(registry.ENV, raising=False)
    try:
        for k in range(13):
            registry.register_steering(f"s{k}", moderate(k))
        with pytest.raises(requests.SteeringRequestError, match=r"'s9' and 3 more$"):
            requests.parse_request({"lineas_fast_steering": "s99"})
    finally:
        registry.clear_steerings()
