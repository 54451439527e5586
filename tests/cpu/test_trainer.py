import re

import numpy as np
import pytest
import torch
from kernel_checks import expected_loss, pooled_unpadded, profile_mean
from tiny_models import FAMILIES, NORMS, SOURCE, TARGET, tiny_model, tiny_tokenizer

import lineas_fast as lf


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def check_first_step_loss(model, tok, rec, names):
    """Step 0 runs the identity maps on the whole source set (batch_size = len(SOURCE)), so its
    loss is the reference-reduction W2 between the untouched model's pooled source and target
    activations: here from per-sentence unpadded forwards and the numpy OT oracle. The
    tolerance covers float32 activations computed in padded batches vs one sentence at a time."""
    src = pooled_unpadded(model, tok, SOURCE, names)
    tgt = pooled_unpadded(model, tok, TARGET, names)
    exact, per_layer = expected_loss([src[n] for n in names], [tgt[n] for n in names], "reference")
    assert rec.step == 0
    assert rec.loss == pytest.approx(exact, rel=1e-4)
    np.testing.assert_allclose(rec.per_layer, per_layer, rtol=1e-4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_loss_falls_on_every_family(family, tok):
    model = tiny_model(family)
    names = [n for n, _ in model.named_modules() if re.fullmatch(NORMS[family], n)]
    # a known mix of flags that training must leave exactly as it found them
    params = list(model.parameters())
    for i, p in enumerate(params):
        p.requires_grad_(i % 3 != 1)
    model.train()
    model.get_submodule(names[1]).eval()
    flags = [p.requires_grad for p in params]
    modes = [m.training for m in model.modules()]
    assert len(set(flags)) == 2 and len(set(modes)) == 2
    hist = []
    st = lf.train(
        model,
        tok,
        SOURCE,
        TARGET,
        modules=NORMS[family],
        steps=12,
        batch_size=len(SOURCE),
        optimizer="adam",
        lr=0.05,
        progress=False,
        callback=hist.append,
    )
    assert [p.requires_grad for p in params] == flags
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in params)  # weights were frozen
    assert [r.step for r in hist] == list(range(12))
    assert hist[-1].loss < 0.7 * hist[0].loss
    assert len(hist[0].per_layer) == 3 and st.support() > 0
    # in eval mode (gpt2 has dropout): the oracle reads the model in eval mode too
    check_first_step_loss(model, tok, hist[0], names)


def test_model_weights_get_no_gradient_and_forward_stops_early(tok):
    model = tiny_model("llama")
    calls = []
    model.lm_head.register_forward_hook(lambda *a: calls.append("lm_head"))
    last = model.model.layers[2].mlp
    last.register_forward_hook(lambda *a: calls.append("last_mlp"))
    lf.train(
        model,
        tok,
        SOURCE,
        TARGET,
        modules=r"model\.layers\.[01]\.post_attention_layernorm",
        steps=2,
        progress=False,
    )
    assert calls == []  # nothing after layer 1's norm ran
    assert all(p.grad is None for p in model.parameters())


def test_huge_sparsity_gives_identity(tok):
    model = tiny_model("llama")
    st = lf.train(model, tok, SOURCE, TARGET, modules=NORMS["llama"], steps=3, sparsity=1e6, progress=False)
    assert st.support() == 0
    enc = tok(["hello"], return_tensors="pt")
    with torch.no_grad():
        plain = model(**enc).logits
        with st.apply(model):
            assert torch.equal(model(**enc).logits, plain)


def test_deterministic_and_resume_equals_uninterrupted(tmp_path, tok):
    kw = dict(
        modules=NORMS["llama"], steps=6, batch_size=4, optimizer="adam", lr=0.05, progress=False, seed=3
    )
    full = lf.train(tiny_model("llama"), tok, SOURCE, TARGET, **kw)
    again = lf.train(tiny_model("llama"), tok, SOURCE, TARGET, **kw)
    ck = str(tmp_path / "ck.pt")

    class Killed(Exception):
        pass

    def kill(rec):
        if rec.step == 3:
            raise Killed

    with pytest.raises(Killed):
        lf.train(
            tiny_model("llama"),
            tok,
            SOURCE,
            TARGET,
            checkpoint_every=2,
            checkpoint_path=ck,
            callback=kill,
            **kw,
        )
    resumed = lf.train(
        tiny_model("llama"), tok, SOURCE, TARGET, resume_from=ck, checkpoint_every=2, checkpoint_path=ck, **kw
    )
    for n in full.modules:
        assert torch.equal(full[n][0], again[n][0])
        assert torch.equal(full[n][0], resumed[n][0]) and torch.equal(full[n][1], resumed[n][1])
    assert [r["loss"] for r in resumed.metadata["history"]] == [r["loss"] for r in full.metadata["history"]]
    with pytest.raises(ValueError, match="other settings"):
        lf.train(tiny_model("llama"), tok, SOURCE, TARGET, resume_from=ck, **{**kw, "lr": 0.01})


def test_diverging_loss_stops_with_clear_error(tmp_path, tok):
    ck = str(tmp_path / "ck.pt")
    with pytest.raises(lf.TrainingDivergedError, match="at step"):
        lf.train(
            tiny_model("llama"),
            tok,
            SOURCE,
            TARGET,
            modules=NORMS["llama"],
            steps=50,
            lr=1e30,
            progress=False,
            checkpoint_every=1,
            checkpoint_path=ck,
        )
    state = torch.load(ck, weights_only=True)  # last good checkpoint kept
    assert all(torch.isfinite(om).all() for om, _ in state["maps"].values())


def test_bad_arguments(tok):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="matches no module.*nearby names"):
        lf.train(model, tok, SOURCE, TARGET, modules=r".*post_attn_norm", steps=1)
    with pytest.raises(ValueError, match="optimizer"):
        lf.train(model, tok, SOURCE, TARGET, modules=NORMS["llama"], optimizer="lbfgs")
    with pytest.raises(ValueError, match="empty list"):
        lf.train(model, tok, [], TARGET, modules=NORMS["llama"], steps=1)
    with pytest.raises(ValueError, match="checkpoint_path"):
        lf.train(model, tok, SOURCE, TARGET, modules=NORMS["llama"], checkpoint_every=1)


def test_loss_modules_differ_from_map_modules(tok):
    model = tiny_model("llama")
    hist = []
    st = lf.train(
        model,
        tok,
        SOURCE,
        TARGET,
        modules=r"model\.layers\.0\.post_attention_layernorm",
        loss_modules=r"model\.layers\.[12]\.input_layernorm",
        steps=8,
        optimizer="adam",
        lr=0.05,
        progress=False,
        callback=hist.append,
        batch_size=len(SOURCE),
    )
    assert st.modules == ["model.layers.0.post_attention_layernorm"]
    assert len(hist[0].per_layer) == 2 and hist[-1].loss < hist[0].loss
    check_first_step_loss(model, tok, hist[0], [f"model.layers.{i}.input_layernorm" for i in (1, 2)])


def test_linear_act_map_is_float64_ols():
    torch.manual_seed(0)
    x, y = torch.randn(40, 5), 2.0 * torch.randn(40, 5) + 1.0
    om, b = lf.linear_act_map(x, y)
    xs, ys = np.sort(x.double().numpy(), 0), np.sort(y.double().numpy(), 0)
    for j in range(5):
        slope, icpt = np.polyfit(xs[:, j], ys[:, j], 1)
        assert om[j].item() == pytest.approx(slope, rel=1e-5)
        assert b[j].item() == pytest.approx(icpt, rel=1e-5, abs=1e-6)
    y9 = 2.0 * torch.randn(57, 5) - 1.0  # m ≠ n: the regressand is ḡ
    om, b = lf.linear_act_map(x, y9)
    g = profile_mean(y9.double().numpy(), 40)
    for j in range(5):
        slope, icpt = np.polyfit(xs[:, j], g[:, j], 1)
        assert om[j].item() == pytest.approx(slope, rel=1e-5)
        assert b[j].item() == pytest.approx(icpt, rel=1e-5, abs=1e-6)
    const = torch.zeros(4, 1)
    om, b = lf.linear_act_map(const, torch.ones(4, 1))
    assert om.item() == 1.0 and b.item() == 1.0
    with pytest.raises(ValueError, match="at least 2 source"):
        lf.linear_act_map(torch.randn(1, 3), torch.randn(4, 3))


def test_fit_linear_act_and_init(tok):
    model = tiny_model("llama")
    st = lf.fit_linear_act(model, tok, SOURCE, TARGET, modules=NORMS["llama"])
    names = [f"model.layers.{i}.post_attention_layernorm" for i in range(3)]
    assert st.modules == names
    # independently: module after module, earlier maps applied by plain hooks; the regressand
    # is the target profile ḡ (m = 9 targets, n = 8 sources), an OLS line per coordinate
    tgt = pooled_unpadded(model, tok, TARGET, names)
    fitted = {}
    for n in names:
        x = np.sort(pooled_unpadded(model, tok, SOURCE, [n], maps=fitted)[n].numpy(), 0)
        g = profile_mean(tgt[n].numpy(), len(SOURCE))
        lines = np.array([np.polyfit(x[:, j], g[:, j], 1) for j in range(x.shape[1])])
        om, b = st[n]
        np.testing.assert_allclose(om.numpy(), lines[:, 0], rtol=1e-3, atol=1e-4, err_msg=n)
        np.testing.assert_allclose(b.numpy(), lines[:, 1], rtol=1e-3, atol=1e-4, err_msg=n)
        fitted[n] = (torch.from_numpy(lines[:, 0]), torch.from_numpy(lines[:, 1]))
    hist = []
    lf.train(
        model,
        tok,
        SOURCE,
        TARGET,
        modules=NORMS["llama"],
        steps=1,
        init="linear_act",
        progress=False,
        callback=hist.append,
        batch_size=len(SOURCE),
    )
    hist0 = []
    lf.train(
        model,
        tok,
        SOURCE,
        TARGET,
        modules=NORMS["llama"],
        steps=1,
        progress=False,
        callback=hist0.append,
        batch_size=len(SOURCE),
    )
    assert hist[0].loss < hist0[0].loss  # Linear-AcT start is closer
