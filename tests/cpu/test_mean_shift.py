"""The mean-shift baseline: ω = 1 and b = mean(target) − mean(source) of the pooled activations,
checked by what it must achieve: with the fitted steering attached, the steered source's mean
at every module equals the target's (sequential fit), measured with a hook of the test's own."""

import pytest
import torch
from tiny_models import NORMS, SOURCE, TARGET, tiny_model, tiny_tokenizer

import lineas_fast as lf


def pooled_means(model, tok, texts, names):
    """Mean over sentences of the mean over each sentence's tokens, read by forward hooks."""
    acc = {n: [] for n in names}
    handles = [
        dict(model.named_modules())[n].register_forward_hook(
            lambda _m, _a, out, n=n: acc[n].append(out[0] if isinstance(out, tuple) else out)
        )
        for n in names
    ]
    try:
        with torch.no_grad():
            for t in texts:  # one sentence at a time: no padding
                model(**tok([t], return_tensors="pt"))
    finally:
        for h in handles:
            h.remove()
    return {n: torch.stack([h[0].double().mean(0) for h in acc[n]]).mean(0) for n in names}


@pytest.fixture(scope="module")
def setup():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    names = [n for n, _ in model.named_modules() if n.endswith("post_attention_layernorm")]
    return model, tok, names


def test_sequential_mean_shift_moves_every_module_mean_onto_the_target(setup):
    model, tok, names = setup
    st = lf.fit_mean_shift(model, tok, SOURCE, TARGET, NORMS["llama"])
    assert st.metadata["method"] == "mean_shift" and st.modules == names
    for n in names:
        assert torch.equal(st[n][0], torch.ones_like(st[n][0]))
    target = pooled_means(model, tok, TARGET, names)
    before = pooled_means(model, tok, SOURCE, names)
    with st.apply(model):
        after = pooled_means(model, tok, SOURCE, names)
    for n in names:
        assert (before[n] - target[n]).abs().max() > 1e-2  # there was a gap
        torch.testing.assert_close(after[n], target[n], rtol=0, atol=1e-5)


def test_independent_vectors_are_measured_on_the_untouched_model(setup):
    model, tok, names = setup
    st = lf.fit_mean_shift(model, tok, SOURCE, TARGET, NORMS["llama"], sequential=False)
    target, source = pooled_means(model, tok, TARGET, names), pooled_means(model, tok, SOURCE, names)
    for n in names:
        torch.testing.assert_close(st[n][1].double(), target[n] - source[n], rtol=0, atol=1e-5)
    seq = lf.fit_mean_shift(model, tok, SOURCE, TARGET, NORMS["llama"])
    assert torch.equal(seq[names[0]][1], st[names[0]][1])  # the first one agrees
    assert not torch.allclose(seq[names[-1]][1], st[names[-1]][1])  # later ones do not


def test_mean_shift_refuses_bad_input(setup):
    model, tok, _ = setup
    with pytest.raises(ValueError, match="matches no module"):
        lf.fit_mean_shift(model, tok, SOURCE, TARGET, modules="nothing")
    with pytest.raises(ValueError, match="same coordinates"):
        from lineas_fast.training.linear_act import mean_shift_map

        mean_shift_map(torch.zeros(3, 4), torch.zeros(3, 5))
