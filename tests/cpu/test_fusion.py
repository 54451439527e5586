"""Folding steering into weights: fused == hooked, checkpoints load without lineas_fast."""

import os
import re
import subprocess
import sys

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

import lineas_fast as lf
from lineas_fast.cli import main
from lineas_fast.fold.fusion import to_llama
from lineas_fast.modules import coordinate_dim

FOLDABLE = {
    "llama": r"model\.layers\.\d+\.(input|post_attention)_layernorm",
    "qwen2": r"model\.layers\.\d+\.(input|post_attention)_layernorm",
    "mistral": r"model\.layers\.\d+\.(input|post_attention)_layernorm",
    "gemma2": r"model\.layers\.\d+\.input_layernorm",
    "gemma3": r"model\.layers\.\d+\.input_layernorm",
    "gemma": r"model\.layers\.\d+\.input_layernorm",
    "qwen3": r"model\.layers\.\d+\.input_layernorm",  # attention_bias flag
    "phi3": r"model\.layers\.\d+\.(input|post_attention)_layernorm",  # as the equivalent Llama
    "gpt2": r"transformer\.(h\.\d+\.ln_\d|ln_f)",
}
REL_BOUND = 1e-5  # fp32: max |fused − hooked| ≤ 1e-5 × max |logit|


def steering_for(model, pattern, seed=0, scale=0.3, shift=True):
    g = torch.Generator().manual_seed(seed)
    mods = [(n, m) for n, m in model.named_modules() if re.fullmatch(pattern, n)]
    assert mods, pattern
    maps = {}
    for n, m in mods:
        d = coordinate_dim(m) or model.config.hidden_size  # e.g. an MLP's output
        om, b = 1 + scale * torch.randn(d, generator=g), scale * torch.randn(d, generator=g)
        maps[n] = (om, b if shift else torch.zeros_like(b))
    return lf.Steering(maps, {"model": lf.model_fingerprint(model)})


def batch():
    return tiny_tokenizer()(["hello there you", "ab"], return_tensors="pt", padding=True)


def logits(model, enc):
    with torch.no_grad():
        return model(**enc).logits


def assert_close_logits(a, b):
    assert (a - b).abs().max().item() <= REL_BOUND * a.abs().max().item()


@pytest.mark.parametrize("family", list(FOLDABLE))
@pytest.mark.parametrize("strength", [1.0, 0.6, -0.8])
def test_fused_equals_hooked(family, strength):
    model = tiny_model(family)
    st = steering_for(model, FOLDABLE[family])
    enc = batch()
    plain = logits(model, enc)
    with st.apply(model, strength=strength):
        hooked = logits(model, enc)
        hooked_gen = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert (hooked - plain).abs().max() > 100 * REL_BOUND * plain.abs().max()  # steering acts
    fused = lf.fuse(model, st, strength=strength)
    assert_close_logits(hooked, logits(fused, enc))
    assert torch.equal(hooked_gen, fused.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=0))


def test_several_steerings_compose_in_order():
    model = tiny_model("llama")
    s1 = steering_for(model, FOLDABLE["llama"], seed=1)
    s2 = steering_for(model, r"model\.layers\.[01]\.post_attention_layernorm", seed=2)
    enc = batch()
    h1, h2 = s1.attach(model), s2.attach(model, compose=True)
    hooked = logits(model, enc)
    h1.remove(), h2.remove()
    fused = lf.fuse(model, [s1, s2])
    assert_close_logits(hooked, logits(fused, enc))


def test_strength_zero_leaves_weights_bit_identical():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = model.config.to_dict()
    out = lf.fuse(model, steering_for(model, FOLDABLE["llama"]), strength=0.0)
    assert out is model and model.config.to_dict() == cfg
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_non_foldable_raise_naming_each_module_and_leave_model_untouched():
    model = tiny_model("gemma2")
    st = steering_for(
        model,
        r"model\.layers\.0\.(input|post_attention|pre_feedforward|"
        r"post_feedforward)_layernorm|model\.norm|model\.layers\.1\.mlp",
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lf.FusionError) as err:
        lf.fuse(model, st)
    problems = err.value.problems
    assert set(problems) == {
        "model.layers.0.post_attention_layernorm",
        "model.layers.0.pre_feedforward_layernorm",
        "model.layers.0.post_feedforward_layernorm",
        "model.norm",
        "model.layers.1.mlp",
    }
    assert "residual stream" in problems["model.layers.0.post_attention_layernorm"]
    assert "no bias parameters" in problems["model.layers.0.pre_feedforward_layernorm"]
    assert "not a normalization" in problems["model.layers.1.mlp"]
    assert "fuse_in_memory" in str(err.value)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_scale_only_maps_fold_even_after_residual_norms():
    model = tiny_model("gemma2")
    st = steering_for(model, r"model\.layers\.\d+\.post_attention_layernorm")
    st = lf.Steering({n: (om, torch.zeros_like(b)) for n, (om, b) in ((n, st[n]) for n in st.modules)})
    enc = batch()
    with st.apply(model):
        hooked = logits(model, enc)
    assert_close_logits(hooked, logits(lf.fuse(model, st), enc))


def test_fuse_in_memory_handles_what_cannot_fold():
    model = tiny_model("gemma2")
    st = steering_for(
        model,
        r"model\.layers\.\d+\.(post_attention|pre_feedforward)_layernorm"
        r"|model\.norm",
    )
    enc = batch()
    plain = logits(model, enc)
    with st.apply(model, strength=0.7):
        hooked = logits(model, enc)
    lf.fuse_in_memory(model, st, strength=0.7)
    assert isinstance(model.model.norm, lf.SteeredRMSNorm)
    assert_close_logits(hooked, logits(model, enc))
    lf.unfuse_in_memory(model)
    assert torch.equal(logits(model, enc), plain)


def test_fuse_in_memory_layernorm_gpt2():
    model = tiny_model("gpt2")
    st = steering_for(model, FOLDABLE["gpt2"])
    enc = batch()
    with st.apply(model):
        hooked = logits(model, enc)
    lf.fuse_in_memory(model, st)
    assert_close_logits(hooked, logits(model, enc))


def test_groupnorm_in_a_tiny_unet():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        norm_num_groups=8,
        attention_head_dim=8,
    ).eval()
    pattern = r".*(norm\d?|norm_out)"
    names = [
        n
        for n, m in unet.named_modules()
        if re.fullmatch(pattern, n) and isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))
    ]
    g = torch.Generator().manual_seed(0)
    dims = {n: lf.steering.coordinate_dim(unet.get_submodule(n)) for n in names}
    st = lf.Steering(
        {
            n: (1 + 0.2 * torch.randn(d, generator=g), 0.2 * torch.randn(d, generator=g))
            for n, d in dims.items()
        }
    )
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 10]), torch.randn(2, 3, 16)
    with torch.no_grad():
        with st.apply(unet, strength=0.9):
            hooked = unet(x, t, ctx).sample
        lf.fuse(unet, st, strength=0.9)
        fused = unet(x, t, ctx).sample
    assert len(names) > 10
    assert (hooked - fused).abs().max() <= REL_BOUND * hooked.abs().max()


# families whose shifts need biases their own class cannot load: saved as the equivalent Llama
EXPECTED_CLASS = {"qwen2": "LlamaForCausalLM", "mistral": "LlamaForCausalLM", "phi3": "LlamaForCausalLM"}

RELOAD = r"""
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.tensor([[5, 9, 20, 33, 7]])
with torch.no_grad():
    torch.save({"logits": m(input_ids=ids).logits, "cls": type(m).__name__,
                "lineas_imported": any(k.startswith("lineas_fast") for k in sys.modules)},
               sys.argv[2])
"""


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma2", "gemma", "qwen3", "phi3", "gpt2"])
def test_cli_fuse_checkpoint_loads_without_lineas_fast(tmp_path, family):
    model = tiny_model(family)
    model_dir, out = tmp_path / "model", tmp_path / "fused"
    model.save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    st = steering_for(model, FOLDABLE[family])
    st.save(str(tmp_path / "s.safetensors"))
    assert (
        main(
            [
                "fuse",
                "--model",
                str(model_dir),
                "--steering",
                str(tmp_path / "s.safetensors"),
                "--strength",
                "0.9",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "strength 0.9" in (out / "README.md").read_text()
    res = subprocess.run(
        [sys.executable, "-c", RELOAD, str(out), str(tmp_path / "r.pt")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert res.returncode == 0, res.stderr
    got = torch.load(tmp_path / "r.pt")
    assert got["lineas_imported"] is False
    assert got["cls"] == EXPECTED_CLASS.get(family, type(model).__name__)
    ids = torch.tensor([[5, 9, 20, 33, 7]])
    with st.apply(model, strength=0.9):
        hooked = logits(model, {"input_ids": ids})
    assert_close_logits(hooked, got["logits"])
    assert (
        main(
            [
                "fuse",
                "--model",
                str(model_dir),
                "--steering",
                str(tmp_path / "s.safetensors"),
                "--out",
                str(out),
            ]
        )
        == 2
    )  # refuses a non-empty folder


def test_cli_fuse_reports_unfoldable(tmp_path, capsys):
    model = tiny_model("gemma2")
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    steering_for(model, r"model\.norm").save(str(tmp_path / "s.safetensors"))
    assert (
        main(
            [
                "fuse",
                "--model",
                str(tmp_path / "m"),
                "--steering",
                str(tmp_path / "s.safetensors"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "model.norm" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_folded_model_runs_the_unsteered_graph(family):
    """Same number of ATen operator calls per forward as the unsteered model (biased Linear
    layers are one op like unbiased ones): the steering costs nothing at inference."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    def ops(model):
        with torch.no_grad(), Count() as c:
            model(input_ids=torch.tensor([[5, 9, 20, 33]]))
        return c.n

    model = tiny_model(family)
    st = steering_for(model, FOLDABLE[family])
    with st.apply(model):
        hooked = ops(model)
    # Qwen2 with MLP shifts is saved as the equivalent Llama class: compare like with like
    plain = ops(to_llama(model) if family == "qwen2" else model)
    assert hooked > ops(model)
    assert ops(lf.fuse(model, st)) == plain


def unet_norm_steering(pipe, seed=0):
    """Maps on every GroupNorm/LayerNorm of a pipeline's UNet, named as the pipeline names them."""
    g = torch.Generator().manual_seed(seed)
    maps = {
        f"unet.{n}": (
            1 + 0.2 * torch.randn(coordinate_dim(m), generator=g),
            0.2 * torch.randn(coordinate_dim(m), generator=g),
        )
        for n, m in pipe.unet.named_modules()
        if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))
    }
    return lf.Steering(maps)


def pipe_latents(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    return pipe("a cat", num_inference_steps=2, generator=g, output_type="latent").images


@pytest.mark.parametrize("entry", ["fuse_in_memory", "fuse"])
def test_pipeline_fusion_equals_hooked(entry):
    """``fuse``/``fuse_in_memory`` take the pipeline itself (through ``as_target``): the UNet's
    GroupNorm/LayerNorm (with bias) fold in place and the pipeline comes back."""
    pytest.importorskip("diffusers")
    from tiny_pipeline import tiny_pipeline

    pipe = tiny_pipeline()
    st = unet_norm_steering(pipe)
    assert len(st) > 10
    plain = pipe_latents(pipe)
    with st.apply(pipe, strength=0.8):
        hooked = pipe_latents(pipe)
    assert (hooked - plain).abs().max() > 1e-3
    out = getattr(lf, entry)(pipe, st, strength=0.8)
    assert out is pipe
    fused = pipe_latents(pipe)
    assert (hooked - fused).abs().max() <= REL_BOUND * hooked.abs().max()


def test_pipeline_steering_fuses_into_the_component_alone():
    """A pipeline's ``unet.…`` steering given ``pipeline.unet`` loses the prefix (Target.resolve)."""
    pytest.importorskip("diffusers")
    from tiny_pipeline import tiny_pipeline

    pipe = tiny_pipeline()
    st = unet_norm_steering(pipe, seed=1)
    with st.apply(pipe, strength=-0.6):
        hooked = pipe_latents(pipe)
    assert lf.fuse_in_memory(pipe.unet, st, strength=-0.6) is pipe.unet
    assert (hooked - pipe_latents(pipe)).abs().max() <= REL_BOUND * hooked.abs().max()


def test_fusion_goes_through_the_target_seam():
    """No private pipeline handling is left in fusion.py: a Target is accepted as it is."""
    import inspect

    from lineas_fast.fold import fusion

    src = inspect.getsource(fusion)
    assert "_for_component" not in src and "from .diffusion" not in src
    model = tiny_model("llama")
    st = steering_for(model, FOLDABLE["llama"])
    enc = batch()
    with st.apply(model):
        hooked = logits(model, enc)
    assert lf.fuse(lf.as_target(model), st) is model
    assert_close_logits(hooked, logits(model, enc))
