"""GPU lane: a steered decode step captured in a CUDA graph and replayed gives the eager hooked
logits; a steered model compiles with fullgraph=True and mode="reduce-overhead" (CUDA graphs);
and a training step after the first does not synchronise with the device."""

import pytest
import torch
from sync_guard import SyncGuard, adam_step_counters
from tiny_models import NORMS, SOURCE, TARGET, tiny_model, tiny_tokenizer

import lineas_fast as lf

CUDA = "cuda"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only (rehearsal)")


@pytest.fixture(scope="module")
def steered():
    tok = tiny_tokenizer()
    model = tiny_model("llama").to(CUDA).eval()
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
    return model, st


@pytest.mark.parametrize("strength", [0.8, -0.6])
def test_a_steered_decode_step_replays_from_a_cuda_graph(steered, strength):
    model, st = steered
    x = torch.randn(2, 1, model.config.hidden_size, device=CUDA)
    layer = model.model.layers[1]  # one decoder layer, its norm steered
    with st.apply(model, strength), torch.no_grad():
        eager = layer.post_attention_layernorm(x)
        static_in = x.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm up (kernel compile) off the graph
            layer.post_attention_layernorm(static_in)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = layer.post_attention_layernorm(static_in)
        static_in.copy_(x)
        graph.replay()
        torch.testing.assert_close(static_out, eager, rtol=0, atol=0)


def test_a_steered_model_compiles_with_cuda_graphs(steered):
    model, st = steered
    ids = torch.tensor([[5, 9, 20, 33, 7]], device=CUDA)
    with st.apply(model, 0.8), torch.no_grad():
        eager = model(input_ids=ids).logits
        compiled = torch.compile(model, fullgraph=True, mode="reduce-overhead")
        for _ in range(3):  # record, then replay
            out = compiled(input_ids=ids).logits
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)


def test_training_steps_after_the_first_do_not_sync():
    tok = tiny_tokenizer()
    with lf.Trainer(
        tiny_model("llama").to(CUDA),
        tok,
        SOURCE,
        TARGET,
        NORMS["llama"],
        steps=6,
        batch_size=4,
        optimizer="adam",
        lr=0.05,
        progress=False,
        read_every=100,
    ) as run:
        run.step()
        for _ in range(3):
            with SyncGuard(host_tensors=adam_step_counters(run.opt)):
                run.step()
        assert len(run.read_records()) == 4
