"""Models dispatched by accelerate with offloaded modules: a ``device_map`` with "disk" entries
here (on a GPU machine, "cpu" entries behave the same way): the offloaded modules' weights sit
on the meta device between forwards and accelerate's AlignDevicesHook loads them onto its
execution device for each forward. Training, Linear-AcT and attached maps give what they give
on the plain model; folding, which writes weights, refuses those modules by name. Real
accelerate, no mocks."""

import pytest
import torch
from accelerate import dispatch_model
from accelerate.hooks import AlignDevicesHook, add_hook_to_module
from tiny_models import NORMS, SOURCE, TARGET, tiny_model, tiny_tokenizer

import lineas_fast as lf

PATTERN = NORMS["llama"]
NORM = "model.layers.{}.post_attention_layernorm"


def dispatched(tmp_path, disk=("model.layers.1", "model.layers.2")):
    """The tiny Llama with the blocks in ``disk`` offloaded to tmp_path (everything else on
    the CPU, which is also the execution device)."""
    blocks = [
        "model.embed_tokens",
        "model.layers.0",
        "model.layers.1",
        "model.layers.2",
        "model.norm",
        "model.rotary_emb",
        "lm_head",
    ]
    device_map = {b: "disk" if b in disk else "cpu" for b in blocks}
    return dispatch_model(tiny_model("llama"), device_map, offload_dir=str(tmp_path))


def meta(model, name):
    return model.get_submodule(name).weight.device.type == "meta"


@pytest.mark.parametrize(
    "disk", [("model.layers.1", "model.layers.2"), ("model.embed_tokens", "model.layers.0")]
)
def test_training_an_offloaded_model_gives_the_plain_run(tmp_path, disk):
    """Second case: the embedding itself is offloaded, so the inputs' device comes from its
    hook, not from its (meta) weight."""
    kw = dict(modules=PATTERN, steps=3, batch_size=4, optimizer="adam", lr=0.05, seed=1, progress=False)
    plain_hist, hist = [], []
    plain = lf.train(tiny_model("llama"), tiny_tokenizer(), SOURCE, TARGET, callback=plain_hist.append, **kw)
    model = dispatched(tmp_path, disk)
    st = lf.train(model, tiny_tokenizer(), SOURCE, TARGET, callback=hist.append, **kw)
    assert [r.loss for r in hist] == pytest.approx([r.loss for r in plain_hist], rel=1e-6)
    for name in plain.modules:
        for got, want in zip(st[name], plain[name]):
            assert got.device.type == "cpu"
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert meta(model, "model.layers.1.post_attention_layernorm") == ("model.layers.1" in disk)
    assert meta(model, "model.embed_tokens") == ("model.embed_tokens" in disk)


def test_linear_act_and_attached_maps_on_an_offloaded_model(tmp_path):
    tok = tiny_tokenizer()
    model = dispatched(tmp_path)
    plain_model = tiny_model("llama")
    st = lf.fit_linear_act(model, tok, SOURCE, TARGET, PATTERN)
    plain = lf.fit_linear_act(plain_model, tok, SOURCE, TARGET, PATTERN)
    for name in plain.modules:
        for got, want in zip(st[name], plain[name]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    ids = tok(["the map acts here"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        with plain.apply(plain_model, 0.7):
            want = plain_model(input_ids=ids).logits
        unsteered = model(input_ids=ids).logits
        with st.apply(model, 0.7):
            got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - unsteered).abs().max() > 1e-3  # the offloaded layers' maps acted


def test_folding_refuses_offloaded_modules_by_name(tmp_path):
    model = dispatched(tmp_path, disk=("model.layers.1",))
    st = lf.fit_linear_act(model, tiny_tokenizer(), SOURCE, TARGET, PATTERN)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.device.type != "meta"}
    for fold in (lf.fuse, lf.fuse_in_memory):
        with pytest.raises(lf.FusionError, match="offloaded by accelerate") as err:
            fold(model, st, 0.8)
        assert list(err.value.problems) == [NORM.format(1)], fold.__name__
    for n, p in model.named_parameters():  # nothing was written
        if n in before:
            assert torch.equal(p, before[n]), n
    assert isinstance(model.get_submodule(NORM.format(0)), type(model.get_submodule(NORM.format(2))))


def test_folding_refuses_offloaded_readers(tmp_path):
    """Layer 0's norm is on the CPU, but the attention projections that would take its shift
    into their biases are offloaded: refused too (Llama's q/k/v have no bias to write into
    unless the model is converted, which needs the weights)."""
    model = tiny_model("llama")
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0.input_layernorm": "cpu",
        "model.layers.0.self_attn": "disk",
        "model.layers.0.mlp": "cpu",
        "model.layers.0.post_attention_layernorm": "cpu",
        "model.layers.1": "cpu",
        "model.layers.2": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    model = dispatch_model(model, device_map, offload_dir=str(tmp_path))
    st = lf.Steering({"model.layers.0.input_layernorm": (torch.full((32,), 1.1), torch.full((32,), 0.2))})
    with pytest.raises(lf.FusionError, match="the Linear layers that read it: its weights are offloaded"):
        lf.fuse(model, st, strict=False)


def test_a_module_offloaded_to_a_gpu_runs_there():
    """What ``device_map`` entries "cpu" do when the main device is a GPU: accelerate's hook
    with a CUDA execution device (given as the index 0, as dispatch_model passes it) moves the
    module's weights to meta at once; the map's device is the hook's execution device, read
    without a GPU."""
    model = tiny_model("llama")
    for name in ("model.embed_tokens", NORM.format(1)):
        mod = model.get_submodule(name)
        state = {k: v.detach().clone() for k, v in mod.state_dict().items()}
        add_hook_to_module(mod, AlignDevicesHook(execution_device=0, offload=True, weights_map=state))
    target = lf.as_target(model, tiny_tokenizer())
    assert meta(model, NORM.format(1)) and meta(model, "model.embed_tokens")
    assert target.module_device(NORM.format(1)) == torch.device("cuda", 0)
    assert target.module_device(NORM.format(0)) == torch.device("cpu")
    assert target.device == torch.device("cuda", 0)


def test_device_map_bench_script_tiny(tmp_path):
    """bench/device_map.py, which the GPU session runs on a Qwen2.5-1.5B-shaped model split
    between the GPU and CPU memory, end to end on the tiny Llama with disk offload."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.join(os.path.dirname(__file__), "..", "..")
    out = tmp_path / "device-map.json"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(root, "bench", "device_map.py"),
            "--tiny",
            "--steps",
            "3",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    (run,) = data["runs"]
    assert data["problems"] == [] and data["commit"]
    assert run["offloaded_parameters"] > 0 and len(run["loss_split"]) == 4
    assert set(run["map_devices"].values()) == {"cpu"}
    assert run["max_loss_relative_diff"] <= 1e-4
