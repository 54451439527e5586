"""The ITI-C baseline: the direction is a logistic regression's normal (checked against
scikit-learn's, an independent solver, when it is installed, and against a known direction on
synthetic data), b = σθ with σ the spread along θ; fitted at the attention outputs of a tiny
model, where the other baselines now run too, and taken by the sweep as a recipe."""

import math

import pytest
import torch
from tiny_models import SOURCE, TARGET, tiny_model, tiny_tokenizer

import lineas_fast as lf
from lineas_fast.apps.sweep import Recipe, SweepData, fit_recipe
from lineas_fast.checks import ArgumentError
from lineas_fast.training.iti import fit_iti_c, iti_c_map

O_PROJ = r"model\.layers\.\d+\.self_attn\.o_proj"


def two_clouds(n=1000, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    e = torch.zeros(d)
    e[3], e[7] = 0.6, 0.8  # the separating direction
    scale = torch.linspace(0.5, 3.0, d)  # coordinates on different scales
    x = torch.randn(n, d, generator=g) * scale - 1.5 * e
    y = torch.randn(n, d, generator=g) * scale + 1.5 * e
    best = e / scale**2  # the normal that separates two Gaussians of one covariance: Σ⁻¹(μ_y − μ_x)
    return x, y, best / best.norm()


def test_direction_is_the_classifier_normal_toward_the_target_and_b_is_sigma_theta():
    x, y, e = two_clouds()
    omega, b = iti_c_map(x, y)
    assert torch.equal(omega, torch.ones(12))
    theta = (b / b.norm()).double()
    assert theta @ e.double() > 0.95  # finds the separating normal, on the target's side
    z = torch.cat([x, y]).double()
    assert b.norm().item() == pytest.approx((z @ theta).std(unbiased=False).item(), rel=1e-5)
    # a coordinate constant over both sets gets no weight
    x2, y2 = x.clone(), y.clone()
    x2[:, 0], y2[:, 0] = 5.0, 5.0
    assert iti_c_map(x2, y2)[1][0] == 0


def test_direction_matches_scikit_learn():
    linear_model = pytest.importorskip("sklearn.linear_model")
    x, y, _ = two_clouds(n=60, d=8, seed=1)
    z = torch.cat([x, y]).double()
    mu, sd = z.mean(0), z.std(0, unbiased=False)
    labels = [0] * 60 + [1] * 60
    # ours: Σ log-loss + (l2/2)‖β‖² on standardised coordinates; scikit-learn: C Σ log-loss + ½‖w‖²
    clf = linear_model.LogisticRegression(C=1 / 2.0, tol=1e-12, max_iter=10000)
    clf.fit(((z - mu) / sd).numpy(), labels)
    w = torch.tensor(clf.coef_[0]) / sd
    theta = w / w.norm()
    _, b = iti_c_map(x, y, l2=2.0)
    assert (b.double() / b.norm()).tolist() == pytest.approx(theta.tolist(), abs=1e-5)


def test_fit_at_the_attention_outputs_of_a_tiny_model():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    st = fit_iti_c(model, tok, SOURCE, TARGET, modules=O_PROJ)
    assert len(st.modules) == 3 and all(n.endswith("self_attn.o_proj") for n in st.modules)
    assert st.metadata["method"] == "iti_c" and st.metadata["hyperparameters"]["l2"] == 1.0
    for n in st.modules:
        om, b = st[n]
        assert torch.equal(om, torch.ones_like(om)) and b.norm() > 0
    enc = tok(["you are a fool"], return_tensors="pt")
    plain = model(**enc).logits
    with st.apply(model, strength=2.0):
        steered = model(**enc).logits
    assert not torch.allclose(plain, steered) and torch.equal(model(**enc).logits, plain)
    # the other baselines run at the attention outputs as well
    for fit in (lf.fit_mean_shift, lf.fit_linear_act):
        other = fit(model, tok, SOURCE, TARGET, modules=O_PROJ)
        assert other.modules == st.modules
    with pytest.raises(ArgumentError, match="l2 must be > 0"):
        fit_iti_c(model, tok, SOURCE, TARGET, modules=O_PROJ, l2=0.0)


def test_the_sweep_takes_it_as_a_recipe():
    assert lf.fit_iti_c is fit_iti_c and "fit_iti_c" in lf.__all__
    model, tok = tiny_model("llama"), tiny_tokenizer()
    recipe = Recipe("iti_c", O_PROJ, n_train=6)
    recipe.check()
    assert recipe.label() == "ITI-C self_attn.o_proj n=6"
    st = fit_recipe(model, tok, recipe, SweepData(SOURCE, TARGET, [], [], []))
    direct = fit_iti_c(model, tok, SOURCE[:6], TARGET[:6], modules=O_PROJ)
    for n in st.modules:
        assert torch.allclose(st[n][1], direct[n][1]) and math.isfinite(float(st[n][1].norm()))
