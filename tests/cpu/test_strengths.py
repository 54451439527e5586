"""Per-module strengths from a dict: an exact module name wins over every regex, whatever the
order; two regexes giving one module different strengths are refused naming both keys and the
module (``lineas_fast/strengths.py``)."""

import re

import pytest
import torch
from tiny_models import NORMS, tiny_model, tiny_tokenizer

import lineas_fast as lf
from lineas_fast.checks import ArgumentError, ArgumentTypeError
from lineas_fast.strengths import resolve_strengths

L0, L1, L10, A1 = "model.layers.0.mlp", "model.layers.1.mlp", "model.layers.10.mlp", "model.layers.1.attn"
L1_ = "model.layers.1_mlp"  # the name L1 read as a regex also matches this one
MODULES = [L0, L1, L10, A1, L1_]


def every(value=1.0, **given):
    out = dict.fromkeys(MODULES, value)
    out.update({{"L0": L0, "L1": L1, "L10": L10, "A1": A1, "L1_": L1_}[k]: v for k, v in given.items()})
    return out


RESOLVED = [
    ("one number", 0.5, every(0.5)),
    ("empty dict", {}, every()),
    ("exact then regex", {L0: 0.5, ".*": 2.0}, every(2.0, L0=0.5)),
    ("regex then exact", {".*": 2.0, L0: 0.5}, every(2.0, L0=0.5)),
    ("exact beats its own escaped regex", {re.escape(L0): 2.0, L0: 0.5}, every(L0=0.5)),
    ("an exact name is not a regex", {L1: 0.5}, every(L1=0.5)),
    ("agreeing regexes", {r".*\.mlp": 0.5, r".*layers\.1\..*": 0.5}, every(L0=0.5, L1=0.5, L10=0.5, A1=0.5)),
    (
        "an exact key settles overlapping regexes",
        {r".*\.mlp": 0.5, r".*layers\.1\..*": 2.0, L1: 3.0},
        every(L0=0.5, L1=3.0, L10=0.5, A1=2.0),
    ),
    ("negative and zero", {L0: -1.0, r".*layers\.1\d\..*": 0.0}, every(L0=-1.0, L10=0.0)),
]


@pytest.mark.parametrize("spec,expected", [c[1:] for c in RESOLVED], ids=[c[0] for c in RESOLVED])
def test_resolved_strengths(spec, expected):
    assert resolve_strengths(MODULES, spec) == expected


REFUSED = [
    (
        "two regexes disagree",
        {r".*\.mlp": 0.5, r".*layers\.1\..*": 2.0},
        ArgumentError,
        [repr(r".*\.mlp") + " (0.5) and " + repr(r".*layers\.1\..*") + " (2) both match", f"module {L1!r}"],
    ),
    (
        "disagreeing regexes in the other order",
        {r".*layers\.1\..*": 2.0, r".*\.mlp": 0.5},
        ArgumentError,
        [repr(r".*layers\.1\..*") + " (2) and " + repr(r".*\.mlp") + " (0.5) both match", f"module {L1!r}"],
    ),
    ("a key that reaches nothing", {"nothing": 1.0}, ArgumentError, ["'nothing' matches no steered module"]),
    (
        "a broken regex",
        {"(": 1.0},
        ArgumentError,
        ["'(' is neither a steered module's name nor a valid regex"],
    ),
    ("a key that is not a string", {1: 1.0}, ArgumentTypeError, ["strength keys must be module names"]),
    ("a NaN value", {".*": float("nan")}, ArgumentError, ["strength['.*'] must be finite"]),
    ("an infinite overridden value", {L0: 1.0, ".*": float("inf")}, ArgumentError, ["must be finite"]),
    ("a tensor", torch.ones(3), ArgumentTypeError, ["per-token strength tensor"]),
    ("a string", "1", ArgumentTypeError, ["strength must be a real number"]),
]


@pytest.mark.parametrize("spec,error,fragments", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_refused_strengths(spec, error, fragments):
    with pytest.raises(error) as e:
        resolve_strengths(MODULES, spec)
    assert all(f in str(e.value) for f in fragments), str(e.value)
    assert e.value.argument.startswith("strength")


# --- through attach, on a real model -------------------------------------------------------------
@pytest.fixture(scope="module")
def steered():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    names = [n for n, _ in model.named_modules() if re.fullmatch(NORMS["llama"], n)]
    gen = torch.Generator().manual_seed(0)
    d = model.config.hidden_size
    st = lf.Steering(
        {n: (1 + 0.3 * torch.randn(d, generator=gen), 0.5 * torch.randn(d, generator=gen)) for n in names}
    )
    return model, tok, st


def logits(model, tok):
    enc = tok(["hello there", "a b"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits


def test_attach_gives_the_exact_name_its_strength_over_a_later_regex(steered):
    model, tok, st = steered
    first = st.modules[0]
    with st.apply(model, strength={first: 0.5, ".*": 2.0}):
        mixed = logits(model, tok)
    with st.apply(model, strength={n: 0.5 if n == first else 2.0 for n in st.modules}):
        by_name = logits(model, tok)
    with st.apply(model, strength=2.0):
        all_two = logits(model, tok)
    assert torch.equal(mixed, by_name) and not torch.allclose(mixed, all_two, atol=1e-4)


def test_attach_refuses_disagreeing_regexes_before_steering_anything(steered):
    model, tok, st = steered
    plain = logits(model, tok)
    with pytest.raises(
        ArgumentError, match=r"both match module 'model\.layers\.1\.post_attention_layernorm'"
    ):
        st.attach(model, strength={r".*layers\.1\..*": 0.5, r".*post_attention.*": 2.0})
    assert torch.equal(logits(model, tok), plain)
    with st.apply(model, strength=1.0):  # nothing was left attached
        pass
