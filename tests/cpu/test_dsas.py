"""DSAS: per-token gated strength (SPEC §5)."""
import pytest
import torch

import lineas_fast as lf
from kernel_checks import check_gated
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
    plain = lf.affine_steer(z, om, b, 0.6)
    for gate, c in (("sigmoid", 60.0), ("relu", 2.0)):
        y, s = lf.gated_steer(z, om, b, torch.zeros(16), torch.tensor([c]), 0.6, gate,
                              return_strengths=True)
        assert torch.allclose(y, plain, atol=1e-6) and torch.allclose(s, torch.full((2, 5), 0.6))


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


def test_fit_gates_on_model_save_load_and_kv_cache(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    st = lf.train(model, tok, SOURCE, TARGET, modules=NORMS["llama"], steps=3, progress=False)
    gated = lf.fit_gates(model, tok, SOURCE, CONTROL, st, k=3, threshold=0.0)
    assert set(gated.gates) == set(st.modules)
    report = gated.metadata["gates"]
    assert all(0 <= r["val_accuracy"] <= 1 and r["status"] == "gated" for r in report.values())
    path = str(tmp_path / "gated.safetensors")
    gated.save(path)
    back = lf.Steering.load(path)
    for n in gated.modules:
        assert torch.equal(back.gates[n]["w"], gated.gates[n]["w"].float())
        assert back.gates[n]["kind"] == "sigmoid"
    assert back.metadata["gates"] == report
    enc = tok(["you are a fool"], return_tensors="pt")
    with back.apply(model, record_strengths=True) as handle:
        a = model.generate(**enc, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        b = model.generate(**enc, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(a, b)
    rec = handle.strengths[gated.modules[0]]
    assert rec[0].shape == enc["input_ids"].shape and ((rec[0] >= 0) & (rec[0] <= 1)).all()


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
    assert any(r.control_loss > 0 for r in hist)
    assert any(g["w"].abs().sum() > 0 for g in st.gates.values())      # gates were trained
    with pytest.raises(ValueError, match="needs control"):
        lf.train(model, tok, SOURCE, TARGET, modules=NORMS["llama"], steps=1, gate="e2e")
