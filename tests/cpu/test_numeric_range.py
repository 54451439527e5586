"""Numbers are checked for what they do: a finite strength or map whose effective coefficients
(1 − λ + λω, λb) would overflow the model's dtype is refused at attach / fuse / fuse_in_memory,
before anything changes; a fold that would write an out-of-range tensor writes nothing."""

import pytest
import torch
from tiny_models import tiny_model

import lineas_fast as lf
from lineas_fast.numerics import HEADROOM, NumericRangeError, coefficient_bound, effective_coefficients

MOD = "model.layers.0.post_attention_layernorm"


def one_map(omega=1.5, bias=0.1, dtype=torch.float32):
    return lf.Steering({MOD: (torch.full((32,), omega, dtype=dtype), torch.full((32,), bias, dtype=dtype))})


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(model, before):
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_the_bound_is_the_stated_formula():
    f32 = torch.finfo(torch.float32).max
    assert coefficient_bound(torch.float16) == pytest.approx(65504 / HEADROOM)
    assert coefficient_bound(torch.bfloat16) == pytest.approx(f32**0.5 / HEADROOM)
    assert coefficient_bound(torch.float32) == pytest.approx(f32**0.5 / HEADROOM)


def test_effective_coefficients_of_the_inverse_map():
    om, b = torch.tensor([2.0, 0.5]), torch.tensor([1.0, -1.0])
    a, c = effective_coefficients(om, b, -0.5)
    torch.testing.assert_close(a, 1 + 0.5 * (1 / om.double() - 1))
    torch.testing.assert_close(c, 0.5 * (-b.double() / om.double()))


@pytest.mark.parametrize(
    "case,steering,strength",
    [
        ("strength 1e30", one_map(), 1e30),
        ("negative strength -1e30", one_map(), -1e30),
        ("stored omega 3e38", one_map(omega=3e38), 1.0),
        ("float64 map of 1e300", one_map(omega=1e300, dtype=torch.float64), 1.0),
        ("bias 1e20", one_map(bias=1e20), 1.0),
        ("inverse of a tiny omega", one_map(omega=1e-30), -1.0),
    ],
)
@pytest.mark.parametrize("entry", ["attach", "fuse", "fuse_in_memory"])
def test_extreme_but_finite_numbers_are_refused_before_anything_changes(case, steering, strength, entry):
    model = tiny_model("llama")
    before = state(model)
    call = {
        "attach": lambda: steering.attach(model, strength=strength),
        "fuse": lambda: lf.fuse(model, steering, strength=strength),
        "fuse_in_memory": lambda: lf.fuse_in_memory(model, steering, strength=strength),
    }[entry]
    with pytest.raises(NumericRangeError, match=MOD.replace(".", r"\.")) as err:
        call()
    assert err.value.argument == "strength"
    assert same(model, before)
    assert not any("_lineas_fast_steered" in m.__dict__ for m in model.modules())
    assert type(model.model.layers[0].post_attention_layernorm).__name__ == "LlamaRMSNorm"


def test_a_map_finite_in_float32_is_refused_on_a_float16_model_only():
    st = one_map(omega=1e4)  # 1e4 × an activation of 10 overflows float16's 65504
    model16 = tiny_model("llama").half()
    with pytest.raises(NumericRangeError, match="float16"):
        st.attach(model16)
    st.attach(tiny_model("llama")).remove()  # fine in float32


def test_a_fold_that_would_write_out_of_range_writes_nothing():
    model = tiny_model("llama").half()
    # the shift folds into the readers' biases: W @ (λb) with W scaled up leaves float16's range
    with torch.no_grad():
        for p in (model.model.layers[0].mlp.gate_proj, model.model.layers[0].mlp.up_proj):
            p.weight.fill_(100.0)
    before = state(model)
    with pytest.raises(NumericRangeError, match=r"mlp\.(gate|up)_proj\.bias.*nothing was written"):
        lf.fuse(model, one_map(omega=1.0, bias=100.0))
    assert same(model, before)
    assert not getattr(model.config, "lineas_fast_fold", None)
