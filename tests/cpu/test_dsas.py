"""DSAS: per-token gated strength (SPEC §5)."""

import pytest
import torch
from kernel_checks import check_gated, expected_loss, pooled_unpadded
from tiny_models import NORMS, SOURCE, TARGET, tiny_model, tiny_tokenizer

import lineas_fast as lf

CONTROL = [
    "the sun rises in the east",
    "a table has four legs",
    "water boils when heated",
    "birds fly south in winter",
    "the library opens at nine",
    "trains run on rails",
    "maps show roads and rivers",
    "bread is baked in ovens",
]


@pytest.mark.parametrize("shape", [(1, 1), (3, 7, 16), (2, 1023)])
@pytest.mark.parametrize("gate", ["sigmoid", "relu"])
@pytest.mark.parametrize("inverse", [False, True])
def test_gated_reference_outputs_and_gradients(shape, gate, inverse):
    check_gated(shape, gate, inverse, backend="torch")


def test_gated_gradcheck_float64():
    torch.manual_seed(0)
    args = [
        torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True),
        (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_(),
        torch.randn(4, dtype=torch.float64, requires_grad=True),
        torch.randn(4, dtype=torch.float64, requires_grad=True),
        torch.randn(1, dtype=torch.float64, requires_grad=True),
    ]
    assert torch.autograd.gradcheck(lambda *a: lf.gated_steer(*a, strength=0.7, backend="torch"), args)


def test_saturated_gate_equals_plain_steering():
    torch.manual_seed(0)
    z, om, b = torch.randn(2, 5, 16), torch.rand(16) + 0.5, torch.randn(16)
    plain = z.double() + 0.6 * ((om.double() - 1) * z.double() + b.double())  # SPEC §3, λ = 0.6
    for gate, c in (("sigmoid", 60.0), ("relu", 2.0)):
        y, s = lf.gated_steer(z, om, b, torch.zeros(16), torch.tensor([c]), 0.6, gate, return_strengths=True)
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
        edge = 0.0 if kind == "sigmoid" else 0.5  # where g = 1/2: the decision boundary
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
        hooks.append(
            named[n].register_forward_pre_hook(lambda _m, args, n=n: inputs.__setitem__(n, args[0].detach()))
        )
        hooks.append(
            named[n].register_forward_hook(lambda _m, _a, out, n=n: outputs.__setitem__(n, out.detach()))
        )
    strengths = {}
    try:
        for texts, key in ((SOURCE, "source"), (CONTROL, "control")):
            enc = tok(texts, return_tensors="pt", padding=True)
            real = enc["attention_mask"].bool()
            with torch.no_grad(), gated.apply(model, strength=lam, record_strengths=True) as hd:
                model(**enc)
            for n in gated.modules:
                (rec,) = hd.strengths[n]
                mod = named[n]
                with torch.no_grad():
                    z = type(mod).forward(mod, inputs[n]).double()  # the map's input
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
    for n in gated.modules:  # the gate opens wider on source tokens than on control
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
        assert len(rec) == 12  # 6 forwards with the cache, then 6 without
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
    st = lf.train(
        model,
        tok,
        SOURCE,
        TARGET,
        modules=NORMS["llama"],
        steps=12,
        optimizer="adam",
        lr=0.05,
        batch_size=len(SOURCE),
        progress=False,
        gate="e2e",
        gate_kind=kind,
        control=CONTROL,
        control_weight=5.0,
        callback=hist.append,
    )
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
    assert any(g["w"].abs().sum() > 0 for g in st.gates.values())  # gates were trained
    with pytest.raises(ValueError, match="needs control"):
        lf.train(model, tok, SOURCE, TARGET, modules=NORMS["llama"], steps=1, gate="e2e")


# --- token-level gates (issue #13 item 2) -------------------------------------------------------
from lineas_fast.training.gates import calibrate_bias, fit_token_gate  # noqa: E402
from lineas_fast.training.token_acts import token_activations, token_positions  # noqa: E402

SHOUT = [
    "HELLOTHERE",
    "GOAWAYNOW",
    "WHATANIDEA",
    "STOPITNOW",
    "NOBODYCARES",
    "YOUAREWRONG",
    "LOUDANDCLEAR",
    "NEVERAGAIN",
]
SHOUT_HELD = ["BIGMISTAKE", "LEAVEMEALONE", "THATISENOUGH", "QUIETPLEASE"]
CONTROL_HELD = ["rivers flow to the sea", "clocks tell the time", "snow falls in winter", "cats sleep a lot"]


def unpadded_tokens(model, texts, names, tok, gated=None, strength=1.0):
    """Independent oracle: every sentence run alone (no padding, no batching), each module's
    output z (T, d) float64 per sentence; with ``gated`` (a Steering), plain forward hooks
    apply z + λ·g(z)·((ω − 1)z + b) (SPEC §3, §5) and the per-token strengths λ·g are returned
    instead of the activations (ungated modules: λ)."""
    named = dict(model.named_modules())
    rows = {n: [] for n in names}

    def hook_for(n):
        def hook(_mod, _args, out):
            z = out.double()
            if gated is None:
                rows[n].append(z[0])
                return None
            om, b = (t.double() for t in gated[n])
            if n in gated.gates:
                g = gated.gates[n]
                s = strength * gate_of(z @ g["w"].double() + g["c"].double(), g["kind"])
            else:
                s = torch.full(z.shape[:-1], float(strength), dtype=torch.float64)
            rows[n].append(s[0])
            return (z + s.unsqueeze(-1) * ((om - 1) * z + b)).to(out.dtype)

        return hook

    hooks = [named[n].register_forward_hook(hook_for(n)) for n in names]
    try:
        with torch.no_grad():
            for t in texts:
                model(**tok([t], return_tensors="pt"))
    finally:
        for h in hooks:
            h.remove()
    return rows


def shouting_model():
    """The tiny llama with one direction u added to the embeddings of upper-case letters: every
    token of a SHOUT sentence carries u, no token of a lower-case one does."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    u = torch.zeros(32)
    u[:4] = 0.15
    ids = tok.convert_tokens_to_ids([chr(c) for c in range(ord("A"), ord("Z") + 1)])
    with torch.no_grad():
        model.get_input_embeddings().weight[ids] += u
    return model, tok


def random_maps(model, scale=0.3, seed=1):
    names = [n for n, _ in model.named_modules() if __import__("re").fullmatch(NORMS["llama"], n)]
    g = torch.Generator().manual_seed(seed)
    return lf.Steering(
        {n: (1 + scale * torch.randn(32, generator=g), scale * torch.randn(32, generator=g)) for n in names}
    )


def test_token_positions_subsample_is_seeded_and_in_range():
    lengths = [3, 0, 5, 2]
    every = token_positions(lengths, None)
    assert every.tolist() == [[0, 0], [0, 1], [0, 2], [2, 0], [2, 1], [2, 2], [2, 3], [2, 4], [3, 0], [3, 1]]
    a, b = token_positions(lengths, 4, seed=3), token_positions(lengths, 4, seed=3)
    assert torch.equal(a, b) and len(a) == 4 and len({tuple(p) for p in a.tolist()}) == 4
    assert all(p in every.tolist() for p in a.tolist()) and a.tolist() == sorted(a.tolist())
    assert torch.equal(token_positions(lengths, 100), every)


def test_token_activations_match_sentences_run_alone():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    names = [f"model.layers.{i}.post_attention_layernorm" for i in (0, 2)]
    texts = SOURCE[:3] + ["hi"] + CONTROL[:2]
    target = lf.as_target(model, tok)
    enc = target.encode(texts)
    got = token_activations(target, enc, names)
    ref = unpadded_tokens(model, texts, names, tok)
    for n in names:
        torch.testing.assert_close(got[n].double(), torch.cat(ref[n]), rtol=1e-5, atol=1e-5)
    pos = torch.tensor([[3, 1], [0, 0], [5, 4]])  # any order, any sentences
    some = token_activations(target, enc, names, pos, max_tokens=8)
    for n in names:
        expect = torch.stack([ref[n][s][t] for s, t in pos.tolist()])
        torch.testing.assert_close(some[n].double(), expect, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="positions"):
        token_activations(target, enc, names, torch.tensor([[3, 2]]))  # "hi" has 2 tokens


def test_fit_token_gate_is_class_balanced():
    torch.manual_seed(0)
    d = 16
    shift = torch.zeros(d)
    shift[0] = 2.5
    src, ctrl = torch.randn(60, d) + shift, torch.randn(600, d)  # 1 : 10 imbalance
    src_val, ctrl_val = torch.arange(60) >= 45, torch.arange(600) >= 450
    fit = fit_token_gate(src, ctrl, src_val, ctrl_val, k=4)
    logit = lambda x: x.double() @ fit["w"] + fit["c"]
    # balanced: each class mostly on its own side (an unweighted fit would call most source 0)
    assert (logit(src) > 0).double().mean() > 0.8 and (logit(ctrl) < 0).double().mean() > 0.8
    right_s = (logit(src[src_val]) > 0).double().mean()
    right_c = (logit(ctrl[ctrl_val]) <= 0).double().mean()
    assert fit["val_accuracy"] == pytest.approx(float(0.5 * (right_s + right_c)))
    with pytest.raises(ValueError, match="src_val"):
        fit_token_gate(src, ctrl, src_val[:5], ctrl_val)


@pytest.mark.parametrize("kind", ["sigmoid", "relu"])
def test_calibrate_bias_caps_the_mean_opening(kind):
    torch.manual_seed(0)
    logits = torch.randn(500) * 2 + 1.0
    for q in (0.05, 0.3):
        delta = calibrate_bias(logits, kind, q)
        mean = gate_of(logits.double() + delta, kind).mean().item()
        assert delta < 0 and q - 1e-6 <= mean <= q
    assert calibrate_bias(logits - 20, kind, 0.1) == 0.0  # already shut: unchanged


@pytest.mark.parametrize("kind", ["sigmoid", "relu"])
def test_token_gates_open_on_source_tokens_and_stay_shut_on_control(kind):
    model, tok = shouting_model()
    st = random_maps(model)
    gated = lf.fit_gates(model, tok, SHOUT, CONTROL, st, level="token", threshold=0.0, gate=kind)
    assert set(gated.gates) == set(st.modules) and gated.metadata["gate_fit"]["level"] == "token"
    for n in st.modules:
        r = gated.metadata["gates"][n]
        assert r["level"] == "token" and r["val_accuracy"] > 0.9, (n, r)
        assert r["source_opening"] > 0.8 > 0.2 > r["control_opening"], (n, r)
    loud = lf.gate_openings(model, tok, gated, SHOUT_HELD)
    calm = lf.gate_openings(model, tok, gated, CONTROL_HELD)
    assert set(loud) == set(st.modules) | {"mean"}
    assert loud["mean"] == pytest.approx(sum(loud[n] for n in st.modules) / len(st.modules))
    assert loud["mean"] > 0.8 and calm["mean"] < 0.2, (loud, calm)
    # per token inside one sentence: the gate opens on the upper-case letters only
    mixed = "the cat said GOAWAY to me"
    with gated.apply(model, record_strengths=True) as h, torch.no_grad():
        model(**tok([mixed], return_tensors="pt"))
    upper = torch.tensor([c.isupper() for c in mixed])
    for n in st.modules:
        s = h.strengths[n][0][0]
        assert s[upper].min() > s[~upper].max() - 0.5 and s[upper].mean() > s[~upper].mean() + 0.5


def test_gate_openings_match_an_independent_oracle():
    """gate_openings = the mean over real tokens of λ·g(z_t), z_t the module's output in the
    steered model, computed here sentence by sentence with plain hooks (upstream maps change
    downstream gates' inputs)."""
    model, tok = shouting_model()
    st = random_maps(model)
    gated = lf.fit_gates(model, tok, SHOUT, CONTROL, st, level="token", threshold=0.0)
    last = st.modules[-1]
    partly = lf.Steering(
        {n: st[n] for n in st.modules}, gates={n: g for n, g in gated.gates.items() if n != last}
    )
    texts = SHOUT_HELD + CONTROL_HELD + ["a"]
    for steering, lam in ((gated, 1.0), (partly, 0.7)):
        got = lf.gate_openings(model, tok, steering, texts, strength=lam)
        ref = unpadded_tokens(model, texts, st.modules, tok, gated=steering, strength=lam)
        for n in st.modules:
            assert got[n] == pytest.approx(torch.cat(ref[n]).mean().item(), rel=1e-5, abs=1e-7)
    assert lf.gate_openings(model, tok, partly, texts, strength=0.7)[last] == pytest.approx(0.7)
    off = lf.gate_openings(model, tok, gated, texts, strength={st.modules[0]: 0.0})
    assert off[st.modules[0]] == 0.0 and off[st.modules[1]] > 0


@pytest.mark.parametrize("kind", ["sigmoid", "relu"])
@pytest.mark.parametrize("level", ["token", "sentence"])
def test_control_opening_calibration_holds(kind, level):
    model, tok = tiny_model("llama"), tiny_tokenizer()  # a plain random model: gates
    st = random_maps(model, scale=0.0)  # separate little, openings ~ 1/2
    identity = st
    q = 0.1
    gated = lf.fit_gates(
        model, tok, SOURCE, CONTROL, identity, level=level, threshold=0.0, gate=kind, control_opening=q
    )
    fit = lf.fit_gates(model, tok, SOURCE, CONTROL, identity, level=level, threshold=0.0, gate=kind)
    for n in st.modules:
        r = gated.metadata["gates"][n]
        assert r["control_opening"] <= q + 1e-9 and r["bias_shift"] <= 0
        if r["bias_shift"] < 0:  # lowered just enough, not more
            assert r["control_opening"] >= q - 1e-4
        # only the bias moved, by the reported shift
        assert torch.equal(gated.gates[n]["w"], fit.gates[n]["w"])
        assert gated.gates[n]["c"].item() == pytest.approx(
            fit.gates[n]["c"].item() + r["bias_shift"], abs=1e-5
        )
    # identity maps: in use the gates read the untouched activations, so the mean opening on the
    # (fully read) control set is what was calibrated
    op = lf.gate_openings(model, tok, gated, CONTROL)
    assert all(op[n] <= q + 1e-4 for n in st.modules), op
    loose = lf.gate_openings(model, tok, fit, CONTROL)
    assert loose["mean"] > op["mean"]


def test_control_opening_holds_in_use_with_real_maps(trained):
    model, tok, st = trained
    q = 0.1
    gated = lf.fit_gates(model, tok, SOURCE, CONTROL, st, level="token", threshold=0.0, control_opening=q)
    op = lf.gate_openings(model, tok, gated, CONTROL)
    assert op["mean"] <= q + 0.02, op


def test_token_level_argument_errors(trained):
    model, tok, st = trained
    with pytest.raises(ValueError, match="level"):
        lf.fit_gates(model, tok, SOURCE, CONTROL, st, level="tokens")
    with pytest.raises(ValueError, match="max_tokens"):
        lf.fit_gates(model, tok, SOURCE, CONTROL, st, level="token", max_tokens=1)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="control_opening"):
            lf.fit_gates(model, tok, SOURCE, CONTROL, st, control_opening=bad)
    with pytest.raises(TypeError, match="control_opening"):
        lf.fit_gates(model, tok, SOURCE, CONTROL, st, control_opening="low")
    with pytest.raises(ValueError, match="tokenizer"):
        lf.fit_gates(model, None, SOURCE, CONTROL, st, level="token")
    with pytest.raises(ValueError, match="control_opening"):
        lf.fit_gates(model, None, SOURCE, CONTROL, st, control_opening=0.1)
    with pytest.raises(ValueError, match="at least 2 source"):
        lf.fit_gates(model, tok, SOURCE[:1], CONTROL, st, level="token")
    with pytest.raises(TypeError, match="steering"):
        lf.gate_openings(model, tok, {"a": 1}, CONTROL)
    with pytest.raises(ValueError, match="gate_openings.*tokenizer"):
        lf.gate_openings(model, None, st, CONTROL)
    with pytest.raises(ValueError, match="texts"):
        lf.gate_openings(model, tok, st, [])
    with pytest.raises(ValueError, match="strength"):
        lf.gate_openings(model, tok, st, CONTROL, strength=float("nan"))


def test_level_defaults_for_k_and_threshold():
    model, tok = shouting_model()
    st = random_maps(model)
    tokens = lf.fit_gates(model, tok, SHOUT, CONTROL, st, level="token")
    sentences = lf.fit_gates(model, tok, SHOUT, CONTROL, st)
    assert tokens.metadata["gate_fit"]["k"] == 64 and tokens.metadata["gate_fit"]["threshold"] == 0.6
    assert sentences.metadata["gate_fit"]["k"] == 5
    assert sentences.metadata["gate_fit"]["threshold"] == 0.75
    assert set(tokens.gates) == set(st.modules)  # separable: every module gated
    assert "bias_shift" not in sentences.metadata["gates"][st.modules[0]]
