"""The family table (lineas_fast.fold.families) against the installed transformers, and the families
added through it (Qwen3, Phi-3, Gemma): what folds, what is refused and why, in-memory fusion."""

import os
import re
import subprocess
import sys

import pytest
import torch
from tiny_models import FAMILIES as TINY
from tiny_models import tiny_model, tiny_tokenizer
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import lineas_fast as lf
from lineas_fast.fold import families
from lineas_fast.fold.families import ALWAYS, FAMILIES, norm_spec
from lineas_fast.fold.fusion import to_llama
from lineas_fast.kernels.rms_norm_shift_ref import rms_norm_shift_ref

REL_BOUND = 1e-5
RMS_FAMILIES = ["llama", "qwen2", "mistral", "gemma", "gemma2", "gemma3", "qwen3", "phi3"]


def build(family, seed=0, **overrides):
    """A tiny model of ``family`` with config overrides (tiny_models.tiny_model's recipe)."""
    spec = {**TINY[family], **overrides}
    model_type = spec.pop("model_type")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(model_type, **spec), attn_implementation="eager"
    )
    return model.eval()


def randomize_norms(model, seed=0):
    """Norm weights away from their init (ones / zeros), so offset and casting matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if norm_spec(mod, families.model_type_of(model))[0] is not None and mod.weight is not None:
                mod.weight.add_(0.5 * torch.randn(mod.weight.shape, generator=g))
    return model


def steering(model, pattern, seed=0, scale=0.3, shift=True):
    g = torch.Generator().manual_seed(seed)
    maps = {}
    for n, m in model.named_modules():
        if re.fullmatch(pattern, n):
            d = m.weight.shape[0]
            b = scale * torch.randn(d, generator=g)
            maps[n] = (1 + scale * torch.randn(d, generator=g), b if shift else 0 * b)
    assert maps, pattern
    return lf.Steering(maps)


def enc():
    return tiny_tokenizer()(["hello there you", "ab"], return_tensors="pt", padding=True)


def logits(model, batch=None):
    with torch.no_grad():
        return model(**(batch or enc())).logits


def close(a, b):
    return (a - b).abs().max().item() <= REL_BOUND * a.abs().max().item()


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, model.config.to_dict()


def unchanged(model, snap):
    state, cfg = snap
    now = model.state_dict()
    return (
        state.keys() == now.keys()
        and all(torch.equal(state[k], now[k]) for k in state)
        and model.config.to_dict() == cfg
    )


def generate(model, batch):
    return model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=0)


# --- the table against the installed transformers ----------------------------------------------


@pytest.mark.parametrize("family", RMS_FAMILIES)
def test_table_norm_formula_matches_the_family_forward(family):
    """Offset, casting and ε attribute from the table reproduce every RMSNorm of the family
    bit for bit in bfloat16 (ε made large so a wrong attribute shows); the other casting mode
    does not."""
    model = randomize_norms(build(family, rms_norm_eps=0.25)).to(torch.bfloat16)
    mtype = families.model_type_of(model)
    fam = FAMILIES[mtype]
    norms = [(n, m) for n, m in model.named_modules() if norm_spec(m, mtype)[0] is not None]
    assert len(norms) >= 2 * TINY[family]["num_hidden_layers"] + 1
    g = torch.Generator().manual_seed(1)
    for name, mod in norms:
        spec = norm_spec(mod, mtype)[0]
        assert (spec.kind, spec.casting, spec.eps) == (fam.norm, fam.casting, fam.eps)
        assert getattr(mod, spec.eps) == 0.25
        x = (0.3 * torch.randn(3, 5, mod.weight.shape[0], generator=g)).to(torch.bfloat16)
        with torch.no_grad():
            want = mod(x)
            d = mod.weight.shape[0]
            got = lf.SteeredRMSNorm(
                mod, torch.ones(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64), spec=spec
            )(x)
            assert got.dtype == want.dtype and torch.equal(got, want), name
            # the other casting mode (with the weight in its form) differs somewhere
            s = (1 + mod.weight.double()) if spec.offset else mod.weight.double()
            other = rms_norm_shift_ref(
                x,
                (s if spec.casting == "float32" else s - 1).float(),
                torch.zeros(d),
                0.25,
                spec.casting != "float32",
            )
            assert not torch.equal(other, want), name


@pytest.mark.parametrize("family", RMS_FAMILIES)
def test_table_readers_are_the_linears_reading_each_norm(family):
    """Each norm's readers in the table are exactly the Linears whose input is that norm's
    output (recorded in a forward pass)."""
    model = build(family)
    mtype = families.model_type_of(model)
    fam = FAMILIES[mtype]
    outs, ins = {}, {}

    def record(store, name, which):
        def hook(mod, args, out):
            store.setdefault(name, (args[0] if which == "in" else out).detach().clone())

        return hook

    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            hooks.append(mod.register_forward_hook(record(ins, name, "in")))
        elif name.rpartition(".")[2] in fam.readers and ".layers.0." in name:
            hooks.append(mod.register_forward_hook(record(outs, name, "out")))
    logits(model)
    for h in hooks:
        h.remove()
    assert set(n.rpartition(".")[2] for n in outs) == set(fam.readers)
    for norm, out in outs.items():
        parent, _, local = norm.rpartition(".")
        group, names = fam.readers[local]
        readers = {n for n, x in ins.items() if x.shape == out.shape and torch.equal(x, out)}
        assert readers == {f"{parent}.{group}.{r}" for r in names}, norm


@pytest.mark.parametrize("family", RMS_FAMILIES)
def test_table_bias_flags_govern_exactly_their_linears(family):
    mtype = TINY[family]["model_type"]
    fam = FAMILIES[mtype]
    groups = {g for g, _ in fam.readers.values()} | set(fam.bias)

    def biased(model):
        return {
            n.split(".", 3)[3]
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and ".layers.0." in n and m.bias is not None
        }

    base = biased(build(family))
    always = {f"{g}.{r}" for g, (flag, rs) in fam.bias.items() if flag == ALWAYS for r in rs}
    assert base == always
    for group in groups:
        flag, governed = fam.bias.get(group, (None, ()))
        if flag in (None, ALWAYS):
            continue
        assert biased(build(family, **{flag: True})) - base == {f"{group}.{r}" for r in governed}


def test_unknown_family_rmsnorm_is_refused_by_name():
    """An RMSNorm-like module of a model type not in the table: FusionError naming the module
    and saying the family is not in the table (nothing guessed from the class name)."""
    model = tiny_model("llama")
    model.config.model_type = "mystery"
    snap = snapshot(model)
    st = steering(model, r"model\.layers\.0\.(input|post_attention)_layernorm", shift=False)
    for entry in (lf.fuse, lf.fuse_in_memory):
        with pytest.raises(lf.FusionError) as err:
            entry(model, st)
        assert set(err.value.problems) == set(st.modules)
        why = err.value.problems["model.layers.0.input_layernorm"]
        assert "'mystery'" in why and "not in lineas_fast.fold.families.FAMILIES" in why
    assert unchanged(model, snap)


def test_torch_rmsnorm_is_known_by_type_in_any_model():
    """torch.nn.RMSNorm (x̂ cast first, ε in ``eps``) folds and fuses in memory even where the
    model type is unknown."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.RMSNorm(16, eps=0.1), nn.Linear(16, 4))
    with torch.no_grad():
        net[1].weight.add_(torch.randn(16))
    x = torch.randn(5, 16 // 2)
    st = lf.Steering({"1": (1 + 0.3 * torch.randn(16), torch.zeros(16))})
    with st.apply(net):
        hooked = net(x).detach()
    lf.fuse(net, st)
    assert close(hooked, net(x).detach())
    st2 = lf.Steering({"1": (1 + 0.3 * torch.randn(16), 0.3 * torch.randn(16))})
    with st2.apply(net, compose=True):  # on top of the first fold, asked for explicitly
        hooked = net(x).detach()
    lf.fuse_in_memory(net, st2, compose=True)
    assert isinstance(net[1], lf.SteeredRMSNorm) and net[1].eps == 0.1
    assert close(hooked, net(x).detach())


# --- fuse_in_memory follows the table ------------------------------------------------------------


@pytest.mark.parametrize("family", RMS_FAMILIES)
def test_fuse_in_memory_every_rms_norm(family):
    """Every RMSNorm of the family (per-layer, per-head q/k, final) steered with shifts:
    fuse_in_memory equals the hooks; unfuse restores the model bit for bit."""
    model = randomize_norms(build(family, rms_norm_eps=0.05))
    mtype = families.model_type_of(model)
    names = [n for n, m in model.named_modules() if norm_spec(m, mtype)[0] is not None]
    st = steering(model, "|".join(re.escape(n) for n in names))
    plain = logits(model)
    with st.apply(model, strength=0.7):
        hooked = logits(model)
    assert not close(plain, hooked)
    snap = snapshot(model)
    lf.fuse_in_memory(model, st, strength=0.7)
    swapped = [m for m in model.modules() if isinstance(m, lf.SteeredRMSNorm)]
    assert len(swapped) == len(names)
    assert all(
        m.offset == (FAMILIES[mtype].norm == "rms_offset")
        and m.eps == 0.05
        and m.casting == FAMILIES[mtype].casting
        for m in swapped
    )
    assert close(hooked, logits(model))
    lf.unfuse_in_memory(model)
    assert unchanged(model, snap) and torch.equal(logits(model), plain)


def test_steered_rms_norm_needs_the_table():
    model = tiny_model("qwen3")
    norm = model.model.layers[0].input_layernorm
    with pytest.raises(lf.FusionError, match="not in lineas_fast.fold.families.FAMILIES"):
        lf.SteeredRMSNorm(norm, torch.ones(32), torch.zeros(32))
    st = lf.SteeredRMSNorm(norm, torch.ones(32), torch.zeros(32), model_type="qwen3")
    assert not st.offset and st.casting == "input"


def test_import_without_triton(tmp_path):
    """With Triton unimportable, lineas_fast imports and a SteeredRMSNorm runs (PyTorch path);
    the Triton kernel module is never imported."""
    code = r"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("no triton here")
sys.meta_path.insert(0, Block())
import torch, lineas_fast as lf
from transformers import LlamaConfig, LlamaForCausalLM
m = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                 num_hidden_layers=1, num_attention_heads=2)).eval()
st = lf.Steering({"model.norm": (torch.ones(16) * 1.1, torch.ones(16) * 0.1)})
lf.fuse_in_memory(m, st, backend="auto")
with torch.no_grad():
    m(input_ids=torch.tensor([[1, 2, 3]]))
assert isinstance(m.model.norm, lf.SteeredRMSNorm)
assert not any(k.startswith("triton") or k.endswith("kernels.rms_norm_shift") for k in sys.modules)
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LINEAS_FAST_BACKEND")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


# --- Qwen3 ---------------------------------------------------------------------------------------


def test_qwen3_input_norm_shift_uses_the_attention_bias_flag():
    model = tiny_model("qwen3")
    st = steering(model, r"model\.layers\.\d+\.input_layernorm")
    with st.apply(model):
        hooked = logits(model)
    fused = lf.fuse(model, st)
    assert fused is model and model.config.attention_bias is True
    attn = model.model.layers[0].self_attn
    assert all(getattr(attn, p).bias is not None for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert torch.equal(attn.o_proj.bias, torch.zeros_like(attn.o_proj.bias))
    assert not torch.equal(attn.q_proj.bias, torch.zeros_like(attn.q_proj.bias))
    assert all(m.bias is None for m in model.model.layers[0].mlp.modules() if isinstance(m, nn.Linear))
    assert close(hooked, logits(model))


def test_qwen3_scale_only_maps_fold_into_every_norm():
    """A scale-only map folds into any norm's weight, the per-head q/k norms (before RoPE) and
    the final norm included."""
    model = tiny_model("qwen3")
    st = steering(
        model,
        r"model\.layers\.\d+\.(post_attention_layernorm|self_attn\.[qk]_norm)"
        r"|model\.norm",
        shift=False,
    )
    b = enc()
    plain = logits(model, b)
    with st.apply(model, strength=0.9):
        hooked = logits(model, b)
        hooked_gen = generate(model, b)
    assert not close(plain, hooked)
    assert lf.fuse(model, st, strength=0.9) is model
    assert close(hooked, logits(model, b)) and torch.equal(hooked_gen, generate(model, b))


def test_qwen3_shifts_that_cannot_fold_are_refused_by_name_and_reason():
    model = tiny_model("qwen3")
    st = steering(
        model,
        r"model\.layers\.0\.(input_layernorm|post_attention_layernorm|"
        r"self_attn\.[qk]_norm)|model\.norm",
    )
    snap = snapshot(model)
    with pytest.raises(lf.FusionError) as err:
        lf.fuse(model, st)
    p = err.value.problems
    assert set(p) == {
        "model.layers.0.post_attention_layernorm",
        "model.layers.0.self_attn.q_norm",
        "model.layers.0.self_attn.k_norm",
        "model.norm",
    }
    assert (
        "rotary" in p["model.layers.0.self_attn.q_norm"] and "rotary" in p["model.layers.0.self_attn.k_norm"]
    )
    why = p["model.layers.0.post_attention_layernorm"]
    assert "mlp" in why and "no bias parameters" in why and "no exactly equivalent class" in why
    assert "LM head" in p["model.norm"]
    assert unchanged(model, snap)
    # what cannot fold runs fused in memory
    with st.apply(model):
        hooked = logits(model)
    lf.fuse_in_memory(model, st)
    assert close(hooked, logits(model))


# --- Phi-3 ---------------------------------------------------------------------------------------


def test_phi3_equivalent_llama_is_exact_and_splits_in_chunk_order():
    model = tiny_model("phi3")
    llama = to_llama(model)
    assert type(llama).__name__ == "LlamaForCausalLM"
    b = enc()
    assert close(logits(model, b), logits(llama, b))
    assert torch.equal(generate(model, b), generate(llama, b))
    layer, new = model.model.layers[1], llama.model.layers[1]
    q, k, v = (new.self_attn.q_proj.weight, new.self_attn.k_proj.weight, new.self_attn.v_proj.weight)
    assert (q.shape[0], k.shape[0]) == (32, 16)
    assert torch.equal(torch.cat([q, k, v]), layer.self_attn.qkv_proj.weight)
    assert torch.equal(new.mlp.gate_proj.weight, layer.mlp.gate_up_proj.weight[:48])
    assert torch.equal(new.mlp.up_proj.weight, layer.mlp.gate_up_proj.weight[48:])


def test_phi3_shifts_fold_as_llama_scales_fold_in_place():
    model = tiny_model("phi3")
    pattern = r"model\.layers\.\d+\.(input|post_attention)_layernorm|model\.norm"
    scale_only = steering(model, pattern, shift=False)
    with scale_only.apply(model):
        hooked = logits(model)
    assert lf.fuse(model, scale_only) is model  # stays Phi-3: no bias needed
    assert close(hooked, logits(model))
    shifts = steering(model, r"model\.layers\.\d+\.(input|post_attention)_layernorm", seed=3)
    with shifts.apply(model, compose=True):  # on top of the scale-only fold, asked for explicitly
        hooked = logits(model)
    fused = lf.fuse(model, shifts, compose=True)
    assert type(fused).__name__ == "LlamaForCausalLM"
    assert fused.config.attention_bias and fused.config.mlp_bias
    assert close(hooked, logits(fused))


PHI3_REFUSED = {
    "sliding_window": (dict(sliding_window=4), "sliding_window=4"),
    "partial_rotary": (dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
    "resid_pdrop": (dict(resid_pdrop=0.1), "resid_pdrop=0.1"),
}


@pytest.mark.parametrize("case", list(PHI3_REFUSED))
def test_phi3_without_an_exact_llama_refuses_shifts(case):
    overrides, reason = PHI3_REFUSED[case]
    model = build("phi3", **overrides)
    st = steering(model, r"model\.layers\.\d+\.(input|post_attention)_layernorm")
    snap = snapshot(model)
    with pytest.raises(lf.FusionError) as err:
        lf.fuse(model, st)
    assert set(err.value.problems) == set(st.modules)
    why = err.value.problems["model.layers.0.input_layernorm"]
    assert "qkv_proj" in why and reason in why and "llama" in why
    assert "gate_up_proj" in err.value.problems["model.layers.0.post_attention_layernorm"]
    assert unchanged(model, snap)


def test_phi3_longrope_is_refused():
    model = build(
        "phi3",
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0] * 4,
            "long_factor": [2.0] * 4,
            "partial_rotary_factor": 1.0,
        },
        original_max_position_embeddings=64,
    )
    st = steering(model, r"model\.layers\.0\.input_layernorm")
    with pytest.raises(lf.FusionError, match="longrope"):
        lf.fuse(model, st)


@pytest.mark.parametrize("case", ["sliding_window", "partial_rotary"])
def test_phi3_preconditions_are_real(case, monkeypatch):
    """Without the precondition check the Llama stand-in computes something else: the refusal
    is not over-cautious."""
    model = build("phi3", **PHI3_REFUSED[case][0])
    fam = FAMILIES["phi3"]
    monkeypatch.setitem(
        FAMILIES, "phi3", families.Family(**{**fam.__dict__, "equivalent": ("llama", lambda cfg: None)})
    )
    llama = to_llama(model)
    ids = {"input_ids": torch.tensor([[5, 9, 20, 33, 7, 11, 40, 41, 42, 8]])}
    assert not close(logits(model, ids), logits(llama, ids))


# --- Gemma (1) -----------------------------------------------------------------------------------


def test_gemma_mlp_shift_is_refused_attention_shift_folds():
    model = tiny_model("gemma")
    st = steering(model, r"model\.layers\.0\.post_attention_layernorm")
    snap = snapshot(model)
    with pytest.raises(lf.FusionError, match="no bias parameters"):
        lf.fuse(model, st)
    assert unchanged(model, snap)
    ok = steering(model, r"model\.layers\.\d+\.input_layernorm", seed=2)
    with ok.apply(model):
        hooked = logits(model)
    assert lf.fuse(model, ok).config.attention_bias
    assert close(hooked, logits(model))
