"""The target seam: one capture loop for models and pipelines, pipelines everywhere models go."""

import pathlib

import pytest
import torch
from tiny_models import NORMS, SOURCE, TARGET, tiny_model, tiny_tokenizer
from torch import nn

import lineas_fast as lf

PACKAGE = pathlib.Path(lf.__file__).parent
CONTROL = [
    "the sun rises in the east",
    "a table has four legs",
    "water boils when heated",
    "birds fly south in winter",
    "the library opens at nine",
    "trains run on rails",
]


def test_language_model_capture_pools_real_tokens_in_row_order():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    target = lf.as_target(model, tok)
    texts = ["a bc", "hello there friend", "xy", "one two three four"]
    names = ["model.layers.0.post_attention_layernorm", "model.layers.2.input_layernorm"]
    idx = [2, 0, 3, 1]
    with torch.no_grad():
        got = target.pooled(target.encode(texts), names, idx)
    # independently: one sentence at a time (no padding), mean over its tokens
    for r, i in enumerate(idx):
        seen = {}
        hs = [
            model.get_submodule(n).register_forward_hook(
                lambda m, a, o, n=n: seen.__setitem__(n, o[0].double().mean(0))
            )
            for n in names
        ]
        with torch.no_grad():
            model(**tok([texts[i]], return_tensors="pt"))
        for h in hs:
            h.remove()
        for n in names:
            assert (got[n][r].double() - seen[n]).abs().max() < 1e-5, (n, i)


def one_at_a_time(model, tok, texts, names):
    """{name: (len(texts), d) float64}: each sentence run alone (no padding, no packing), mean
    of the module output over its tokens."""
    out = {n: [] for n in names}
    for text in texts:
        seen = {}
        hs = [
            model.get_submodule(n).register_forward_hook(
                lambda m, a, o, n=n: seen.__setitem__(n, o[0].double().mean(0))
            )
            for n in names
        ]
        with torch.no_grad():
            model(**tok([text], return_tensors="pt"))
        for h in hs:
            h.remove()
        for n in names:
            out[n].append(seen[n])
    return {n: torch.stack(v) for n, v in out.items()}


class Forwards:
    """A model's forward calls: the token slots (padding included) and the attention mask's
    number of axes (4: a packed batch's block mask; 2: a padded bucket's) of each."""

    def __init__(self, model):
        self.tokens, self.mask_axes = [], []
        self.handle = model.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, _module, _args, kw):
        self.tokens.append(kw["input_ids"].numel())
        self.mask_axes.append(kw["attention_mask"].ndim)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_language_model_batches_are_packed_into_one_forward(impl):
    """Sentences packed end to end (first-fit decreasing in rows as long as the longest): one
    forward for the batch, padding only at the rows' ends, and each sentence's pooled row equal
    to the sentence read alone."""
    from lineas_fast.pooling import pack_rows

    model, tok = tiny_model("llama"), tiny_tokenizer()
    model.config._attn_implementation = impl
    target = lf.as_target(model, tok)
    names = target.match(NORMS["llama"])
    enc = target.encode(SOURCE)
    idx = [5, 2, 7, 0, 3]
    lengths = [len(enc[i]) for i in idx]
    with torch.no_grad():
        target.pooled(enc, names, [0])  # the first read decides on packing
        assert target.packing is True
        count = Forwards(model)
        got = target.pooled(enc, names, idx)
        count.handle.remove()
    rows = pack_rows(lengths)
    assert count.tokens == [len(rows) * max(lengths)]
    expected = one_at_a_time(model, tok, [SOURCE[i] for i in idx], names)
    for n in names:
        assert (got[n].double() - expected[n]).abs().max() < 1e-5, n


def test_packed_and_bucketed_reads_give_the_same_gradients():
    """Backward through the packed forward (block mask, pooling matmul): the weight gradients
    of one loss over the pooled rows equal those of the length-bucketed, masked forward."""
    from lineas_fast.targets import LanguageModelTarget

    model, tok = tiny_model("llama").double(), tiny_tokenizer()  # float64 model
    names = lf.as_target(model, tok).match(NORMS["llama"])
    grads = []
    for packing in (True, False):
        target = LanguageModelTarget(model, tok, packing=packing)
        enc = target.encode(SOURCE)
        model.zero_grad(set_to_none=True)
        acts = target.pooled(enc, names, [6, 1, 4, 0, 3])
        sum((a * torch.arange(a.shape[1])).square().sum() for a in acts.values()).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for k in grads[0]:
        # pooled rows are float32 by contract: agreement to float32 rounding, per tensor
        assert (grads[0][k] - grads[1][k]).abs().max() <= 1e-5 * grads[1][k].abs().max(), k
        assert torch.isfinite(grads[0][k]).all()


class IgnoresMasks(nn.Module):
    """A causal LM that takes position_ids and attention_mask but drops both (plain causal
    attention over the whole row, positions 0..T-1): right-padded buckets read it correctly,
    packed rows do not."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        return self.inner(input_ids=input_ids, use_cache=False)


def test_packing_is_refused_where_the_model_does_not_read_packed_rows():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    wrapped = IgnoresMasks(model)
    target = lf.as_target(wrapped, tok)
    names = [f"inner.{n}" for n in lf.as_target(model, tok).match(NORMS["llama"])]
    enc = target.encode(SOURCE)
    with torch.no_grad():
        got = target.pooled(enc, names, [3, 0, 6])
    assert target.packing is False
    expected = one_at_a_time(model, tok, [SOURCE[i] for i in (3, 0, 6)], [n[len("inner.") :] for n in names])
    for n in names:
        assert (got[n].double() - expected[n[len("inner.") :]]).abs().max() < 1e-5, n


def test_no_packing_past_a_sliding_window():
    """Sentences longer than the config's sliding window are read in buckets (a full block mask
    would let them see past the window); shorter ones are packed."""
    model, tok = tiny_model("mistral"), tiny_tokenizer()
    model.config.sliding_window = 12
    target = lf.as_target(model, tok)
    names = target.match(NORMS["mistral"])
    short = ["ab cd", "xyz", "hello", "a b"]  # at most 12 tokens each
    enc_long, enc_short = target.encode(SOURCE), target.encode(short)
    assert max(map(len, enc_long)) > 12 >= max(map(len, enc_short))
    with torch.no_grad():
        count = Forwards(model)
        got_short = target.pooled(enc_short, names)
        got_long = target.pooled(enc_long, names, [0, 1, 2])
        count.handle.remove()
    assert target.packing is True
    # the probe: two sentences apart (one padded bucket), then packed; the short sentences in
    # one packed forward; the long ones in padded buckets
    assert count.mask_axes[:3] == [2, 4, 4] and set(count.mask_axes[3:]) == {2}
    for texts, got in ((short, got_short), (SOURCE[:3], got_long)):
        expected = one_at_a_time(model, tok, texts, names)
        for n in names:
            assert (got[n].double() - expected[n]).abs().max() < 1e-5, n


def test_capture_stops_after_the_last_module_and_names_modules_that_did_not_run():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    model.model.unused = nn.LayerNorm(32)  # registered, never called
    target = lf.as_target(model, tok)
    calls = []
    model.lm_head.register_forward_hook(lambda *a: calls.append("lm_head"))
    enc = target.encode(["hello"])
    with torch.no_grad():
        target.pooled(enc, ["model.layers.0.post_attention_layernorm"])
    assert calls == []
    with pytest.raises(ValueError, match=r"modules \['model.unused'\] did not run"):
        target.pooled(enc, ["model.unused"])
    with pytest.raises(ValueError, match="missing from"):
        target.pooled(enc, ["model.nothing"])
    with pytest.raises(ValueError, match="tokenizer is needed"):
        lf.as_target(model).encode(["hello"])


def test_training_restores_every_flag_through_the_target():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    model.train()
    model.model.layers[1].eval()
    flags = {n: i % 3 == 0 for i, (n, _) in enumerate(model.named_parameters())}
    for n, p in model.named_parameters():
        p.requires_grad_(flags[n])
    lf.train(model, tok, SOURCE, TARGET, modules=NORMS["llama"], steps=1, progress=False)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.training and not model.model.layers[1].training and model.model.layers[0].training


def test_a_target_built_once_serves_every_entry_point():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    target = lf.as_target(model, tok, max_length=16)
    st = lf.train(target, None, SOURCE, TARGET, modules=NORMS["llama"], steps=2, progress=False)
    la = lf.fit_linear_act(target, None, SOURCE, TARGET, modules=NORMS["llama"])
    gated = lf.fit_gates(target, None, SOURCE, CONTROL, st, k=2, threshold=0.0)
    assert st.metadata["model"] == la.metadata["model"] == lf.model_fingerprint(model)
    assert set(gated.gates) == set(st.modules)
    ids = tok(["you are"], return_tensors="pt")
    with torch.no_grad():
        with st.apply(target):
            hooked = model(**ids).logits
        with st.apply(model):
            assert torch.equal(model(**ids).logits, hooked)


# --- diffusers pipelines: every entry point a model has --------------------------------------
diffusers = pytest.importorskip("diffusers")
from tiny_pipeline import SOURCE_PROMPTS, TARGET_PROMPTS, tiny_pipeline  # noqa: E402

UNET_NORMS = r"unet\.(down|up)_blocks\.\d+\.resnets\.\d+\.norm\d"
PIPE_CONTROL = ["a red apple", "a wooden chair", "a blue car", "a small dog", "a tall tree"]


def latents(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    return pipe("a cat", num_inference_steps=2, generator=g, output_type="latent").images


def test_pipeline_capture_pools_each_image_over_space():
    pipe = tiny_pipeline()
    target = lf.as_target(pipe)
    name = "unet.down_blocks.0.resnets.0.norm1"
    raw = []
    h = (
        pipe.unet.down_blocks[0]
        .resnets[0]
        .norm1.register_forward_hook(lambda m, a, o: raw.append(o.detach().double()))
    )
    enc = target.encode(SOURCE_PROMPTS)
    with torch.no_grad():
        got = target.pooled(enc, [name], idx=[3, 1, 4], stop=False)[name]
    h.remove()
    out = torch.cat(raw)  # (3, C, H, W) in the order of idx
    assert out.ndim == 4 and got.shape == out.shape[:2]
    for r in range(3):
        for ch in range(out.shape[1]):
            assert abs(got[r, ch].item() - out[r, ch].sum().item() / out[r, ch].numel()) < 1e-5


def test_gates_fit_and_steer_a_pipeline():
    pipe = tiny_pipeline()
    st = lf.train(
        pipe,
        None,
        SOURCE_PROMPTS,
        TARGET_PROMPTS,
        modules=UNET_NORMS,
        steps=3,
        optimizer="adam",
        lr=0.05,
        batch_size=len(SOURCE_PROMPTS),
        progress=False,
    )
    gated = lf.fit_gates(pipe, None, SOURCE_PROMPTS, PIPE_CONTROL, st, k=2, threshold=0.0)
    assert set(gated.gates) == set(st.modules)
    plain = latents(pipe)
    with gated.apply(pipe, strength=0.0):
        assert torch.equal(latents(pipe), plain)
    with gated.apply(pipe, record_strengths=True) as handle:
        steered = latents(pipe)
    assert not torch.allclose(steered, plain, atol=1e-5)
    name = gated.modules[0]
    rec = handle.strengths[name][0]
    assert rec.ndim == 3  # one strength per pixel (B, H, W)
    # the recorded per-pixel strength is σ(w·z + c) on the map's input, recomputed here
    w, c = gated.gates[name]["w"], gated.gates[name]["c"]
    seen = []
    hook = (
        lf.as_target(pipe)
        .named[name]
        .register_forward_hook(lambda m, a, o: seen.append(o.detach()), prepend=True)
    )
    with torch.no_grad():
        latents(pipe)  # unsteered: the map's input
    hook.remove()
    z = seen[0]
    expected = torch.sigmoid(torch.einsum("bchw,c->bhw", z.double(), w.double()) + c.double())
    assert (rec.double() - expected).abs().max() < 1e-5


def test_pipeline_steering_validates_on_its_component_alone():
    pipe = tiny_pipeline()
    st = lf.train(pipe, None, SOURCE_PROMPTS, TARGET_PROMPTS, modules=UNET_NORMS, steps=1, progress=False)
    modules = st.validate(pipe.unet)  # "unet." prefix dropped, fingerprint skipped
    assert set(modules) == {n[len("unet.") :] for n in st.modules}
    with st.apply(pipe):
        via_pipeline = latents(pipe)
    with st.apply(pipe.unet):
        via_unet = latents(pipe)
    assert torch.equal(via_pipeline, via_unet)


def test_pipeline_training_steps_see_the_whole_batch():
    """Regression: the batch size was capped by the number of keys of the encoded prompts
    (3 for SD), so each step compared 3 images instead of batch_size."""
    pipe = tiny_pipeline()
    sizes = []
    h = pipe.unet.register_forward_pre_hook(
        lambda m, a, kw: sizes.append(kw["sample"].shape[0]), with_kwargs=True
    )
    lf.train(
        pipe, None, SOURCE_PROMPTS, TARGET_PROMPTS, modules=UNET_NORMS, steps=2, batch_size=4, progress=False
    )
    h.remove()
    # each step: the target batch, then the source batch, both of 4 images on shared noise
    assert sizes == [4, 4, 4, 4]
