"""DSAS: per-token gated strength (SPEC §5)."""
import pytest
import torch

import lineas_fast as lf
from kernel_checks import check_gated, expected_loss, pooled_unpadded
from tiny_models import NORMS, SOURCE, TARGET, tiny_model, tiny_tokenizer

CONTROL = ["the sun rises in the east", "a table has four legs", "water boils when heated",
           "birds fly south in winter", "the library opens at nine", "trains run on rails",
           "maps show roads and rivers", "bread is baked in ovens"]


@pytest.mark.parametrize("shape", [(1, 1), (3, 7, 16), (2, 1023)])
@pytest.mark.parametrize("gate", ["sigmoid", "relu"])
@pytest.mark.parametrize("inverse", [False, True])
def test_gated_reference_outputs_and_gradients(shape, gate, inverse):
    check_gated(shape, gate, inverse, backend="torch")


def test_gated_gradcheck_float64():
    torch.manual_seed(0)
    args = [torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True),
            (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_(),
            torch.randn(4, dtype=torch.float64, requires_grad=True),
            torch.randn(4, dtype=torch.float64, requires_grad=True),
            torch.randn(1, dtype=torch.float64, requires_grad=True)]
    assert torch.autograd.gradcheck(lambda *a: lf.gated_steer(*a, strength=0.7, backend="torch"),
                                    args)


def test_saturated_gate_equals_plain_steering():
    torch.manual_seed(0)
    z, om, b = torch.randn(2, 5, 16), torch.rand(16) + 0.5, torch.randn(16)
    plain = z.double() + 0.6 * ((om.double() - 1) * z.double() + b.double())   # SPEC §3, λ = 0.6
    for gate, c in (("sigmoid", 60.0), ("relu", 2.0)):
        y, s = lf.gated_steer(z, om, b, torch.zeros(16), torch.tensor([c]), 0.6, gate,
                              return_strengths=True)
        torch.testing.assert_close(y.double(), plain, rtol=1e-6, atol=1e-6)
        assert torch.allclose(s, torch.full((2, 5), 0.6))


def test_fitted_gate_separates_source_from_control_tokens():
    torch.manual_seed(0)
    d = 24
    shift = torch.zeros(d)
    shift[:3] = 3.0
    src, ctrl = torch.randn(60, d) + shift, torch.randn(60, d)
    fit = lf.fit_gate(src, ctrl, k=5)
    assert fit["val_accuracy"] >= 0.9 and fit["train_accuracy"] >= 0.9
    om, b = torch.rand(d) + 0.5, torch.randn(d)
    tokens_src, tokens_ctrl = torch.randn(1, 50, d) + shift, torch.randn(1, 50, d)
    _, s_src = lf.gated_steer(tokens_src, om, b, fit["w"], fit["c"], 1.0, return_strengths=True)
    _, s_ctrl = lf.gated_steer(tokens_ctrl, om, b, fit["w"], fit["c"], 1.0, return_strengths=True)
    assert s_src.mean() > 0.8 and s_ctrl.mean() < 0.2


@pytest.fixture(scope="module")
def trained():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    st = lf.train(model, tok, SOURCE, TARGET, modules=NORMS["llama"], steps=3, progress=False)
    return model, tok, st


def gate_of(logit, kind):
    return torch.sigmoid(logit) if kind == "sigmoid" else logit.clamp(0.0, 1.0)


@pytest.mark.parametrize("kind", ["sigmoid", "relu"])
def test_fitted_gates_on_model_classify_and_steer_per_token(trained, kind):
    """On the tiny model: each fitted gate (w, c) separates the untouched model's pooled source
    sentences from the control ones (pooled here independently), its reported accuracies are
    consistent with that, and while attached at strength λ every token t of every module gets
    strength λ·g(w·z_t + c) and output z_t + λ·g·((ω − 1)z_t + b), where z_t is the module's
    own output recomputed from its captured input."""
    model, tok, st = trained
    gated = lf.fit_gates(model, tok, SOURCE, CONTROL, st, threshold=0.0, gate=kind)
    assert set(gated.gates) == set(st.modules) and gated.modules == st.modules
    src = pooled_unpadded(model, tok, SOURCE, gated.modules)
    ctrl = pooled_unpadded(model, tok, CONTROL, gated.modules)
    for n in gated.modules:
        g = gated.gates[n]
        assert g["kind"] == kind
        assert torch.equal(gated[n][0], st[n][0]) and torch.equal(gated[n][1], st[n][1])
        w, c = g["w"].double(), g["c"].double()
        edge = 0.0 if kind == "sigmoid" else 0.5          # where g = 1/2: the decision boundary
        right = int(((src[n] @ w + c) > edge).sum() + ((ctrl[n] @ w + c) <= edge).sum())
        overall = right / (len(SOURCE) + len(CONTROL))
        assert overall >= 0.75, (n, overall)
        r = gated.metadata["gates"][n]
        lo, hi = sorted([r["train_accuracy"], r["val_accuracy"]])
        assert lo - 1e-9 <= overall <= hi + 1e-9, (n, overall, r)  # a mix of the two splits

    lam = 0.6
    inputs, outputs = {}, {}
    named = dict(model.named_modules())
    hooks = []
    for n in gated.modules:
        hooks.append(named[n].register_forward_pre_hook(
            lambda _m, args, n=n: inputs.__setitem__(n, args[0].detach())))
        hooks.append(named[n].register_forward_hook(
            lambda _m, _a, out, n=n: outputs.__setitem__(n, out.detach())))
    strengths = {}
    try:
        for texts, key in ((SOURCE, "source"), (CONTROL, "control")):
            enc = tok(texts, return_tensors="pt", padding=True)
            real = enc["attention_mask"].bool()
            with torch.no_grad(), gated.apply(model, strength=lam, record_strengths=True) as hd:
                model(**enc)
            for n in gated.modules:
                rec, = hd.strengths[n]
                mod = named[n]
                with torch.no_grad():
                    z = type(mod).forward(mod, inputs[n]).double()     # the map's input
                w, c = gated.gates[n]["w"].double(), gated.gates[n]["c"].double()
                expect = lam * gate_of(z @ w + c, kind)
                assert rec.shape == real.shape
                torch.testing.assert_close(rec.double(), expect, rtol=1e-5, atol=1e-6)
                om, b = (t.double() for t in gated[n])
                steered = z + expect.unsqueeze(-1) * ((om - 1) * z + b)
                torch.testing.assert_close(outputs[n].double(), steered, rtol=1e-5, atol=1e-5)
                strengths[key, n] = rec[real].mean().item()
    finally:
        for h in hooks:
            h.remove()
    for n in gated.modules:            # the gate opens wider on source tokens than on control
        assert strengths["source", n] > strengths["control", n], (n, strengths)


def test_gated_steering_save_load_and_kv_cache(tmp_path, trained):
    model, tok, st = trained
    gated = lf.fit_gates(model, tok, SOURCE, CONTROL, st, threshold=0.0)
    report = gated.metadata["gates"]
    path = str(tmp_path / "gated.safetensors")
    gated.save(path)
    back = lf.Steering.load(path)
    assert back.modules == gated.modules and set(back.gates) == set(gated.gates)
    for n in gated.modules:
        assert torch.equal(back[n][0], gated[n][0].float())
        assert torch.equal(back[n][1], gated[n][1].float())
        assert torch.equal(back.gates[n]["w"], gated.gates[n]["w"].float())
        assert torch.equal(back.gates[n]["c"].reshape(1), gated.gates[n]["c"].float().reshape(1))
        assert back.gates[n]["kind"] == "sigmoid"
    assert back.metadata["gates"] == report
    enc = tok(["you are a fool"], return_tensors="pt")
    with torch.no_grad():
        plain = model(**enc).logits
        with gated.apply(model):
            in_memory = model(**enc).logits
        with back.apply(model):
            loaded = model(**enc).logits
        with back.apply(model, use_gates=False):
            ungated = model(**enc).logits
    assert torch.equal(loaded, in_memory)
    assert not torch.allclose(loaded, plain) and not torch.allclose(loaded, ungated)
    with back.apply(model, record_strengths=True) as handle:
        a = model.generate(**enc, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        b = model.generate(**enc, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(a, b)
    T = enc["input_ids"].shape[1]
    for n in gated.modules:
        rec = handle.strengths[n]
        assert len(rec) == 12                     # 6 forwards with the cache, then 6 without
        assert rec[0].shape == (1, T) and all(r.shape == (1, 1) for r in rec[1:6])
        assert rec[11].shape == (1, T + 5)
        # with the cache each new token's gate sees the same activation as without it
        torch.testing.assert_close(torch.cat(rec[:6], 1), rec[11], rtol=1e-5, atol=1e-6)


def test_low_accuracy_modules_ungated_or_disabled():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    st = lf.train(model, tok, SOURCE, TARGET, modules=NORMS["llama"], steps=2, progress=False)
    ungated = lf.fit_gates(model, tok, SOURCE, CONTROL, st, threshold=1.01)
    assert not ungated.gates and ungated.modules == st.modules
    with pytest.raises(ValueError, match="removed every map"):
        lf.fit_gates(model, tok, SOURCE, CONTROL, st, threshold=1.01, on_low="disable")


def test_fuse_refuses_gated_modules():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    st = lf.train(model, tok, SOURCE, TARGET, modules=NORMS["llama"], steps=2, progress=False)
    gated = lf.fit_gates(model, tok, SOURCE, CONTROL, st, threshold=0.0)
    for fn in (lf.fuse, lf.fuse_in_memory):
        with pytest.raises(lf.FusionError, match="per-token DSAS gate") as err:
            fn(model, gated)
        assert set(err.value.problems) == set(gated.gates)


@pytest.mark.parametrize("kind", ["sigmoid", "relu"])
def test_end_to_end_gates(kind):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    hist = []
    st = lf.train(model, tok, SOURCE, TARGET, modules=NORMS["llama"], steps=12, optimizer="adam",
                  lr=0.05, batch_size=len(SOURCE), progress=False, gate="e2e", gate_kind=kind,
                  control=CONTROL, control_weight=5.0, callback=hist.append)
    assert set(st.gates) == set(st.modules) and st.gates[st.modules[0]]["kind"] == kind
    assert hist[-1].loss < hist[0].loss
    # step 0: identity maps, so the control term is 0 and the loss is the plain W2 between the
    # untouched model's pooled source and target (independent oracle)
    names = st.modules
    src, tgt = (pooled_unpadded(model, tok, t, names) for t in (SOURCE, TARGET))
    exact, _ = expected_loss([src[n] for n in names], [tgt[n] for n in names], "reference")
    assert hist[0].control_loss == pytest.approx(0.0, abs=1e-8)
    assert hist[0].loss == pytest.approx(exact, rel=1e-4)
    assert all(r.control_loss > 0 for r in hist[1:])
    assert any(g["w"].abs().sum() > 0 for g in st.gates.values())      # gates were trained
    with pytest.raises(ValueError, match="needs control"):
        lf.train(model, tok, SOURCE, TARGET, modules=NORMS["llama"], steps=1, gate="e2e")
