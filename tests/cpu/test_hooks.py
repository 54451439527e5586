"""Steering maps compose with other hooks, refuse double application, and do their work at
attach time (no host sync per call)."""

import re

import pytest
import torch
from tiny_models import NORMS, tiny_model, tiny_tokenizer
from torch.utils._python_dispatch import TorchDispatchMode

import lineas_fast as lf

NAME = "model.layers.1.post_attention_layernorm"


def steering_for(model, pattern, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = model.config.hidden_size
    names = [n for n, _ in model.named_modules() if re.fullmatch(pattern, n)]
    return lf.Steering(
        {n: (1 + 0.3 * torch.randn(d, generator=g), 0.5 * torch.randn(d, generator=g)) for n in names},
        {"model": lf.model_fingerprint(model)},
    )


def closed_form(z, om, b, lam):
    """z + λ(ω⊙z + b − z) in float64."""
    return z.double() + lam * ((om.double() - 1) * z.double() + b.double())


@pytest.fixture()
def model():
    return tiny_model("llama")


def enc():
    return tiny_tokenizer()(["hello there", "a b"], return_tensors="pt", padding=True)


def test_every_forward_hook_sees_the_steered_output_whatever_its_order(model):
    st = steering_for(model, NORMS["llama"])
    mod = model.get_submodule(NAME)
    seen = {}
    plain_out = {}
    before = mod.register_forward_hook(lambda m, a, o: seen.__setitem__("before", o.detach().clone()))
    raw = mod.register_forward_pre_hook(lambda m, a: plain_out.__setitem__("x", a[0].detach().clone()))
    with st.apply(model, strength=0.7):
        after = mod.register_forward_hook(lambda m, a, o: seen.__setitem__("after", o.detach().clone()))
        first = mod.register_forward_hook(
            lambda m, a, o: seen.__setitem__("prepended", o.detach().clone()), prepend=True
        )
        with torch.no_grad():
            model(**enc())
    for h in (before, raw, after, first):
        h.remove()
    with torch.no_grad():
        unsteered = mod(plain_out["x"])
    om, b = st[NAME]
    expected = closed_form(unsteered, om, b, 0.7)
    for key in ("before", "after", "prepended"):
        assert (seen[key].double() - expected).abs().max() < 1e-5, key


def test_next_layer_sees_the_steered_output(model):
    st = steering_for(model, NORMS["llama"])
    e = enc()
    with st.apply(model, strength=0.5), torch.no_grad():
        hooked = model(**e).logits
    # the same map written as plain forward hooks returning the closed form
    hs = [
        model.get_submodule(n).register_forward_hook(
            lambda m, a, o, om=st[n][0], b=st[n][1]: closed_form(o, om, b, 0.5).float()
        )
        for n in st.modules
    ]
    with torch.no_grad():
        by_hand = model(**e).logits
    for h in hs:
        h.remove()
    assert (hooked - by_hand).abs().max() < 1e-5
    with torch.no_grad():
        assert (hooked - model(**e).logits).abs().max() > 1e-3


def test_second_attach_is_refused_unless_composed(model):
    a = steering_for(model, NORMS["llama"], seed=1)
    b = steering_for(model, NORMS["llama"], seed=2)
    e = enc()
    ha = a.attach(model)
    with pytest.raises(lf.AlreadySteeredError, match="already carry an attached steering"):
        b.attach(model)
    with torch.no_grad():
        only_a = model(**e).logits  # the refused attach left nothing behind
    hb = b.attach(model, compose=True)  # b acts on a's output
    with torch.no_grad():
        stacked = model(**e).logits
    hb.remove()
    ha.remove()
    with b.compose(a).apply(model), torch.no_grad():
        composed = model(**e).logits
    with a.apply(model), torch.no_grad():
        again_a = model(**e).logits
    assert torch.equal(only_a, again_a)
    assert (stacked - composed).abs().max() < 1e-5
    assert (stacked - only_a).abs().max() > 1e-3


def test_remove_restores_the_module_exactly_in_any_order(model):
    a = steering_for(model, NORMS["llama"], seed=1)
    b = steering_for(model, NORMS["llama"], seed=2)
    e = enc()
    with torch.no_grad():
        plain = model(**e).logits
    mod = model.get_submodule(NAME)
    ha = a.attach(model)
    hb = b.attach(model, compose=True)
    ha.remove()  # the inner one first
    with torch.no_grad():
        only_b = model(**e).logits
    hb.remove()
    assert "forward" not in mod.__dict__
    with torch.no_grad():
        assert torch.equal(model(**e).logits, plain)
    with b.apply(model), torch.no_grad():
        assert torch.equal(model(**e).logits, only_b)


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("strength", [0.7, -0.7])
def test_a_steered_call_syncs_nothing_and_casts_no_parameter(strength):
    """.item()/bool() on a tensor dispatch aten._local_scalar_dense (a host sync on CUDA); a
    per-call cast of ω or b dispatches aten._to_copy. Neither may happen in a steered forward
    beyond what the plain forward does, also for the inverse map (its ω ≠ 0 check) and for a
    bf16 model whose maps are float32."""
    model = tiny_model("llama").to(torch.bfloat16)
    st = steering_for(model, NORMS["llama"])
    ids = torch.tensor([[5, 9, 20, 33]])

    def count():
        with torch.no_grad(), CountOps() as c:
            model(input_ids=ids)
        return (
            c.ops.count("_local_scalar_dense"),
            c.ops.count("_to_copy"),
            c.ops.count("affine_steer"),
            len(c.ops),
        )

    plain = count()
    with st.apply(model, strength=strength):
        steered = count()
    assert steered[0] == plain[0]
    assert steered[1] == plain[1]  # no cast outside the map's op
    # each map call is exactly one custom op (lineas_fast::affine_steer), nothing around it
    assert steered[2] == len(st) and steered[3] - plain[3] == len(st)


def test_inverse_with_zero_omega_fails_at_attach(model):
    st = steering_for(model, NORMS["llama"])
    om, b = st[NAME]
    om = om.clone()
    om[3] = 0.0
    bad = lf.Steering({NAME: (om, b)})
    with pytest.raises(ValueError, match=r"omega is 0 at coordinates \[3\]"):
        bad.attach(model, strength=-1.0, strict=False)
    assert "forward" not in model.get_submodule(NAME).__dict__
