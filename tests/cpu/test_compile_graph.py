"""A steered model under torch.compile(fullgraph=True): no graph break, each map one custom op
in the graph, and the compiled logits equal the eager hooked ones (affine, inverse, gated,
in-memory fused norms)."""

import pytest
import torch
from tiny_models import NORMS, SOURCE, TARGET, tiny_model, tiny_tokenizer

import lineas_fast as lf

OPS = {
    "affine": torch.ops.lineas_fast.affine_steer.default,
    "gated": torch.ops.lineas_fast.gated_steer.default,
    "fused": torch.ops.lineas_fast.rms_norm_shift.default,
}


@pytest.fixture(scope="module")
def trained():
    tok = tiny_tokenizer()
    model = tiny_model("llama").eval()
    st = lf.train(
        model,
        tok,
        SOURCE,
        TARGET,
        NORMS["llama"],
        steps=3,
        batch_size=4,
        optimizer="adam",
        lr=0.05,
        progress=False,
    )
    gates = {
        n: (torch.randn(om.shape[0], generator=torch.Generator().manual_seed(i)) * 0.3, torch.tensor([0.1]))
        for i, (n, (om, _)) in enumerate((m, st[m]) for m in st.modules)
    }
    gated = lf.Steering(
        {n: st[n] for n in st.modules},
        st.metadata,
        {n: {"w": w, "c": c, "kind": "sigmoid"} for n, (w, c) in gates.items()},
    )
    ids = tok(["you are a rotten fool", "hi"], return_tensors="pt", padding=True)
    return model, st, gated, ids


class GraphRecorder:
    """A torch.compile backend that keeps every FX graph it is given and runs it eagerly."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def count(self, op) -> int:
        return sum(node.target is op for gm in self.graphs for node in gm.graph.nodes)


@pytest.mark.parametrize("kind,strength", [("affine", 0.8), ("affine", -0.6), ("gated", 1.0)])
def test_one_graph_with_one_op_per_map(trained, kind, strength):
    model, st, gated, ids = trained
    steering = gated if kind == "gated" else st
    torch._dynamo.reset()
    rec = GraphRecorder()
    with steering.apply(model, strength), torch.no_grad():
        eager = model(**ids).logits
        compiled = torch.compile(model, fullgraph=True, backend=rec)(**ids).logits
    assert len(rec.graphs) == 1  # fullgraph: a break would have raised
    assert rec.count(OPS[kind]) == len(steering)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    with torch.no_grad():  # the maps are gone after the block
        assert not torch.equal(model(**ids).logits, eager)


def test_fused_norms_are_one_op_each(trained):
    model, st, _, ids = trained
    fused = lf.fuse_in_memory(tiny_model("llama").eval(), st, strength=0.8)
    with st.apply(model, 0.8), torch.no_grad():
        hooked = model(**ids).logits
    torch._dynamo.reset()
    rec = GraphRecorder()
    with torch.no_grad():
        out = torch.compile(fused, fullgraph=True, backend=rec)(**ids).logits
    assert len(rec.graphs) == 1 and rec.count(OPS["fused"]) == len(st)
    torch.testing.assert_close(out, hooked, rtol=1e-5, atol=1e-5)


def test_inductor_compiles_a_steered_model_to_the_eager_logits(trained):
    """The default backend (inductor: generated C++ on the CPU) with fullgraph=True."""
    model, st, _, ids = trained
    torch._dynamo.reset()
    with st.apply(model, 0.8), torch.no_grad():
        eager = model(**ids).logits
        compiled = torch.compile(model, fullgraph=True)(**ids).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
