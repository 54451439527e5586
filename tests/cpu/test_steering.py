import pytest
import torch
from tiny_models import NORMS, tiny_model, tiny_tokenizer

import lineas_fast as lf


def random_steering(model, pattern, seed=0):
    gen = torch.Generator().manual_seed(seed)
    names = [n for n, _ in model.named_modules() if __import__("re").fullmatch(pattern, n)]
    d = model.config.hidden_size
    return lf.Steering(
        {n: (1 + 0.3 * torch.randn(d, generator=gen), 0.5 * torch.randn(d, generator=gen)) for n in names},
        {"model": lf.model_fingerprint(model)},
    )


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama"), tiny_tokenizer()


def logits(model, tok, texts=("hello there", "a b")):
    enc = tok(list(texts), return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits


def test_hooks_equal_affine_steer_by_hand(llama):
    model, tok = llama
    st = random_steering(model, NORMS["llama"])
    with st.apply(model, strength=0.7):
        hooked = logits(model, tok)
    hands = []
    for n in st.modules:
        om, b = st[n]
        mod = dict(model.named_modules())[n]
        hands.append(
            mod.register_forward_hook(lambda m, a, out, om=om, b=b: out + 0.7 * ((om - 1) * out + b))
        )
    by_hand = logits(model, tok)
    for h in hands:
        h.remove()
    assert torch.allclose(hooked, by_hand, atol=1e-5)
    assert not torch.allclose(hooked, logits(model, tok), atol=1e-3)


def test_strength_zero_and_removed_hooks_are_exactly_unsteered(llama):
    model, tok = llama
    st = random_steering(model, NORMS["llama"])
    plain = logits(model, tok)
    with st.apply(model, strength=0.0):
        assert torch.equal(logits(model, tok), plain)
    handle = st.attach(model, strength=1.0)
    handle.remove()
    assert torch.equal(logits(model, tok), plain)


def test_negative_strength_is_inverse_and_per_module_dict(llama):
    model, tok = llama
    st = random_steering(model, NORMS["llama"])
    with st.apply(model, strength=-0.5):
        neg = logits(model, tok)
    with st.inverse().apply(model, strength=0.5):
        inv = logits(model, tok)
    assert torch.allclose(neg, inv, atol=1e-4)
    first = st.modules[0]
    with st.apply(model, strength={first: 1.0, r".*layers\.[12]\..*": 0.0}):
        only_first = logits(model, tok)
    with lf.Steering({first: st[first]}).apply(model, strict=False):
        assert torch.allclose(only_first, logits(model, tok), atol=1e-6)
    with pytest.raises(ValueError, match="matches no steered module"):
        st.attach(model, strength={"nothing": 1.0})


def test_kv_cache_generation_equals_no_cache(llama):
    model, tok = llama
    st = random_steering(model, NORMS["llama"])
    enc = tok(["you are"], return_tensors="pt")
    with st.apply(model, strength=1.0):
        a = model.generate(**enc, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
        b = model.generate(**enc, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(a, b)


def test_batched_left_padded_generation_equals_single(llama):
    model, _ = llama
    tok = tiny_tokenizer(padding_side="left")
    st = random_steering(model, NORMS["llama"])
    prompts = ["you are a", "hi"]
    with st.apply(model, strength=1.0):
        batch = model.generate(
            **tok(prompts, return_tensors="pt", padding=True),
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
        )
        for i, p in enumerate(prompts):
            single = model.generate(
                **tok([p], return_tensors="pt"), max_new_tokens=6, do_sample=False, pad_token_id=0
            )
            assert torch.equal(batch[i, -6:], single[0, -6:])


def test_save_load_roundtrip_exact(tmp_path, llama):
    model, _ = llama
    st = random_steering(model, NORMS["llama"])
    path = tmp_path / "s.safetensors"
    st.save(str(path), note="hello")
    back = lf.Steering.load(str(path))
    assert back.modules == st.modules
    for n in st.modules:
        assert torch.equal(back[n][0], st[n][0]) and torch.equal(back[n][1], st[n][1])
    assert back.metadata["note"] == "hello" and back.metadata["model"] == st.metadata["model"]
    assert not list(tmp_path.glob(".tmp-*"))  # atomic write left no temp file


def test_load_errors(tmp_path, llama):
    model, _ = llama
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lf.Steering.load(str(tmp_path / "missing.safetensors"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read steering file"):
        lf.Steering.load(str(junk))
    st = random_steering(model, NORMS["llama"])
    wrong_dim = lf.Steering({st.modules[0]: (torch.ones(7), torch.zeros(7))})
    with pytest.raises(ValueError, match="has 32 coordinates but its map has 7"):
        wrong_dim.attach(model)
    missing = lf.Steering({"model.layers.9.post_attention_layernorm": st[st.modules[0]]})
    with pytest.raises(ValueError, match="missing from"):
        missing.attach(model)
    other = tiny_model("gpt2")
    gpt_st = random_steering(other, NORMS["gpt2"])
    path = tmp_path / "gpt2.safetensors"
    gpt_st.save(str(path))
    renamed = lf.Steering(
        {n: p for n, p in zip(st.modules, (gpt_st[m] for m in gpt_st.modules))},
        lf.Steering.load(str(path)).metadata,
    )
    with pytest.raises(ValueError, match="trained on model"):
        renamed.attach(model)


def test_algebra():
    a = lf.Steering({"m": (torch.tensor([2.0, 0.5]), torch.tensor([1.0, -1.0]))})
    b = lf.Steering(
        {"m": (torch.tensor([3.0, 1.0]), torch.tensor([0.0, 2.0])), "k": (torch.ones(2), torch.zeros(2))}
    )
    z = torch.randn(5, 2)

    def run(s, name="m"):
        om, bb = s[name]
        return om * z + bb

    ab = a.compose(b)  # b first, then a
    assert torch.allclose(run(ab), a["m"][0] * run(b) + a["m"][1])
    assert "k" in ab
    ii = a.inverse().inverse()
    assert torch.allclose(ii["m"][0], a["m"][0]) and torch.allclose(ii["m"][1], a["m"][1])
    assert torch.allclose(run(a.compose(a.inverse())), z, atol=1e-6)
    assert a.support() == 2 and b.support(per_module=True) == {"m": 2, "k": 0}
    with pytest.raises(ValueError, match="no inverse"):
        lf.Steering({"m": (torch.tensor([0.0]), torch.tensor([1.0]))}).inverse()


def test_support_plot(tmp_path):
    pytest.importorskip("matplotlib")
    st = lf.Steering({f"l{i}": (torch.ones(4) + (torch.arange(4) < i), torch.zeros(4)) for i in range(4)})
    st.plot_support(str(tmp_path / "support.png"))
    assert (tmp_path / "support.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_saved_files_get_normal_permissions(tmp_path):
    import os

    st = lf.Steering({"m": (torch.ones(2), torch.zeros(2))})
    st.save(str(tmp_path / "s.safetensors"))
    mask = os.umask(0)
    os.umask(mask)
    assert (os.stat(tmp_path / "s.safetensors").st_mode & 0o777) == (0o666 & ~mask)
