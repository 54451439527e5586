"""Steering is applied once: every path that would steer a model twice is refused unless the
caller composes explicitly, copies of a steered model are steered by their own modules, and a
composed steering keeps every model fingerprint. Each path with a real tiny transformers model."""

import copy
import io

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

import lineas_fast as lf
from lineas_fast.records import CONFIG_KEY, fold_records

NORMS = r"model\.layers\.\d+\.(input|post_attention)_layernorm"
SCALE_ONLY = r"model\.layers\.\d+\.input_layernorm"


def steering(model, pattern=NORMS, seed=0, shift=True):
    g = torch.Generator().manual_seed(seed)
    maps = {}
    for n, _ in model.named_modules():
        if __import__("re").fullmatch(pattern, n):
            d = model.config.hidden_size
            b = 0.3 * torch.randn(d, generator=g)
            maps[n] = (1 + 0.3 * torch.randn(d, generator=g), b if shift else torch.zeros_like(b))
    return lf.Steering(maps, {"model": lf.model_fingerprint(model), "name": f"s{seed}"})


def logits(model):
    enc = tiny_tokenizer()(["hello there you", "ab"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(model, before):
    after = model.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_attach_after_fuse_is_refused_and_composes_when_asked():
    model = tiny_model("llama")
    s1, s2 = steering(model, seed=1), steering(model, seed=2)
    fused = lf.fuse(model, s1)
    with pytest.raises(lf.AlreadySteeredError, match="already carries folded steering"):
        s2.attach(fused)
    before = logits(fused)
    with s2.apply(fused, compose=True, strict=False):  # the fold gave the readers biases
        on_top = logits(fused)
    assert not torch.allclose(before, on_top)  # the new map acts on the folded model's norms


def test_attach_after_folding_a_scale_only_map_is_refused():
    model = tiny_model("llama")
    fused = lf.fuse(model, steering(model, SCALE_ONLY, shift=False))
    with pytest.raises(lf.AlreadySteeredError):
        steering(model, SCALE_ONLY, seed=3).attach(fused)


def test_fuse_twice_is_refused_without_touching_the_weights_and_composes_when_asked():
    model = tiny_model("llama")
    s1, s2 = steering(model, seed=1), steering(model, seed=2)
    fused = lf.fuse(model, s1)
    before = weights(fused)
    with pytest.raises(lf.AlreadySteeredError, match="compose=True"):
        lf.fuse(fused, s2)
    assert unchanged(fused, before)
    twice = lf.fuse(fused, s2, compose=True, strict=False)
    assert len(getattr(twice.config, CONFIG_KEY)) == 2  # both folds recorded, oldest first
    assert not torch.allclose(logits(twice), logits(lf.fuse(tiny_model("llama"), s1)))


def test_fuse_in_memory_is_recorded_and_refuses_a_second_steering():
    model = tiny_model("llama")
    lf.fuse_in_memory(model, steering(model, seed=1))
    assert fold_records(model)
    with pytest.raises(lf.AlreadySteeredError):
        steering(model, seed=2).attach(model)
    with pytest.raises(lf.AlreadySteeredError):
        lf.fuse(model, steering(model, seed=2))
    with pytest.raises(lf.AlreadySteeredError):
        lf.fuse_in_memory(model, steering(model, seed=2))
    lf.unfuse_in_memory(model)
    assert fold_records(model) == []
    steering(model, seed=2).attach(model).remove()  # unsteered again: allowed


def test_the_fold_record_survives_save_and_load(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    lf.fuse(model, steering(model, seed=1), strength=0.5).save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    record = getattr(loaded.config, CONFIG_KEY)
    assert record[0]["strength"] == 0.5 and record[0]["steerings"] == ["s1"]
    with pytest.raises(lf.AlreadySteeredError, match="config of"):
        steering(model, seed=2).attach(loaded)
    with pytest.raises(lf.AlreadySteeredError):
        lf.fuse(loaded, steering(model, seed=2))


def test_deepcopy_of_an_attached_model_is_steered_by_its_own_modules():
    model = tiny_model("llama")
    st = steering(model, seed=1)
    plain = logits(model)
    handle = st.attach(model)
    steered = logits(model)
    twin = copy.deepcopy(model)
    assert torch.equal(logits(twin), steered)
    # the copy runs its own modules: changing its weights changes its output, not the original's
    with torch.no_grad():
        twin.model.layers[0].mlp.down_proj.weight.mul_(2.0)
    assert not torch.equal(logits(twin), steered)
    assert torch.equal(logits(model), steered)
    handle.remove()
    assert torch.equal(logits(model), plain)
    with torch.no_grad():
        twin.model.layers[0].mlp.down_proj.weight.div_(2.0)
    assert torch.equal(logits(twin), steered)  # still steered: the handle was the original's


def test_pickling_an_attached_model_is_refused_with_a_clear_error():
    model = tiny_model("llama")
    with steering(model).apply(model):
        with pytest.raises(TypeError, match="attached steering map.*remove the handle"):
            torch.save(model, io.BytesIO())
    torch.save(model, io.BytesIO())  # after removal it pickles


def test_compose_keeps_every_fingerprint():
    a, b = tiny_model("llama"), tiny_model("qwen2")
    sa = lf.Steering({"model.norm": (torch.ones(32), torch.zeros(32))}, {"model": lf.model_fingerprint(a)})
    sb = lf.Steering({"model.norm": (torch.ones(32), torch.zeros(32))}, {"model": lf.model_fingerprint(b)})
    both = sa.compose(sb)
    prints = both.metadata["models"]
    assert lf.model_fingerprint(a) in prints and lf.model_fingerprint(b) in prints
    with pytest.raises(ValueError, match="trained on model"):
        both.validate(a)  # one of the two fingerprints does not match
    assert "models" not in sa.compose(sa).metadata  # one model: nothing more to keep


@pytest.mark.parametrize(
    "module,match",
    [("model.layers", "ModuleList.*never runs"), ("", "root module")],
)
def test_a_map_on_a_module_that_never_runs_is_refused_at_attach(module, match):
    model = tiny_model("llama")
    st = lf.Steering({module: (torch.ones(32), torch.zeros(32))})
    with pytest.raises(ValueError, match=match):
        st.attach(model)
    assert not any("_lineas_fast_steered" in m.__dict__ for m in model.modules())


def test_sentences_that_tokenize_to_zero_tokens_are_named_before_any_forward():
    from tokenizers import normalizers

    tok = tiny_tokenizer()
    tok.backend_tokenizer.normalizer = normalizers.Replace("~", "")  # a tokenizer that drops "~"
    model = tiny_model("llama")
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=r"zero tokens.*\[1\] = '~~~'") as err:
        lf.train(
            model, tok, ["hello", "~~~", "ok"], ["abc", "def"], NORMS, steps=2, batch_size=2, progress=False
        )
    assert getattr(err.value, "argument", None) and calls == []
