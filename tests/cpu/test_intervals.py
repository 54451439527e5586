"""The sweep's uncertainty helpers: the hierarchical bootstrap against a direct loop written here
(same seed, float64), its behaviour on synthetic normal data (contains the estimate, shrinks with
n, close to the normal-theory width), paired ratios; the validation/test split; sampled decoding
reproducible per seed on a tiny model."""

import math

import numpy as np
import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from lineas_fast.apps.decoding import Decoding, decode
from lineas_fast.apps.eval import continuations
from lineas_fast.apps.intervals import (
    Interval,
    mean_interval,
    perplexity_interval,
    perplexity_ratio_interval,
    ratio_interval,
)
from lineas_fast.apps.splits import split_prompts
from lineas_fast.checks import ArgumentError


def loop_bootstrap(stat, arrays, n_boot, seed, level=0.95):
    """Replicates of ``stat`` over (draws, units) arrays resampled by a plain loop: the draw
    indices (n_boot, D) then the unit indices (n_boot, D, U) from default_rng(seed)."""
    D, U = arrays[0].shape
    rng = np.random.default_rng(seed)
    dd = rng.integers(0, D, size=(n_boot, D))
    uu = rng.integers(0, U, size=(n_boot, D, U))
    reps = []
    for b in range(n_boot):
        picked = []
        for a in arrays:
            rows = [[a[dd[b, i], uu[b, i, j]] for j in range(U)] for i in range(D)]
            picked.append(np.array(rows, dtype=np.float64))
        reps.append(stat(*picked))
    lo, hi = np.percentile(reps, [50 * (1 - level), 50 * (1 + level)])
    return lo, hi


def test_mean_interval_matches_a_direct_loop():
    values = np.random.default_rng(1).normal(0.3, 0.2, size=(3, 25))
    r = mean_interval(values, n_boot=300, seed=7)
    lo, hi = loop_bootstrap(lambda a: a.mean(), [values], 300, 7)
    assert (r.low, r.high) == pytest.approx((lo, hi), rel=1e-12)
    assert r.mean == pytest.approx(values.mean(), rel=1e-12)
    assert (r.n_draws, r.n_units, r.n_boot, r.seed, r.level) == (3, 25, 300, 7, 0.95)
    assert "draws resampled, then units" in r.method
    # (draws, seeds, units): a prompt's value is its mean over the seeds
    seeds = np.stack([values - 0.1, values + 0.1], axis=1)
    assert mean_interval(seeds, n_boot=300, seed=7).as_dict() == pytest.approx(r.as_dict())


def test_on_normal_data_the_interval_holds_the_mean_shrinks_and_has_the_normal_width():
    rng = np.random.default_rng(0)
    widths = []
    for n in (50, 200, 800):
        x = rng.normal(2.0, 1.0, size=(1, n))
        r = mean_interval(x, seed=3)
        assert r.low < x.mean() < r.high
        widths.append(r.high - r.low)
        # one draw: the interval is the prompt-level one, ≈ ±1.96 s/√n
        assert r.high - r.low == pytest.approx(2 * 1.96 * x.std() / math.sqrt(n), rel=0.15)
    assert widths[0] > widths[1] > widths[2]
    # draws that disagree widen the interval: the draw is a level of the resampling
    same = rng.normal(0, 1, size=(4, 100))
    apart = same + np.array([[-1.0], [0.0], [1.0], [2.0]])
    w_same = mean_interval(same).high - mean_interval(same).low
    w_apart = mean_interval(apart).high - mean_interval(apart).low
    assert w_apart > 3 * w_same


def test_paired_ratio_matches_a_direct_loop_and_pairing_narrows_it():
    rng = np.random.default_rng(2)
    base = rng.uniform(0.05, 0.5, size=40)  # per-prompt unsteered values, prompts differ a lot
    steered = 0.5 * base[None, :] + rng.normal(0, 0.01, size=(2, 40))
    r = ratio_interval(steered, base, n_boot=300, seed=5)
    tiled = np.broadcast_to(base, steered.shape)
    lo, hi = loop_bootstrap(lambda a, b: a.mean() / b.mean(), [steered, tiled], 300, 5)
    assert (r.low, r.high) == pytest.approx((lo, hi), rel=1e-12)
    assert r.mean == pytest.approx(steered.mean() / base.mean())
    assert r.low < 0.5 < r.high and r.high - r.low < 0.05  # paired: prompt variation cancels
    # (seeds, units) for the base is averaged over its seeds
    two = np.stack([base - 0.01, base + 0.01])
    assert ratio_interval(steered, two, n_boot=300, seed=5).mean == pytest.approx(r.mean)
    # an unsteered statistic of 0 in a replicate: unbounded, reported as None
    zero = np.zeros(40)
    zero[0] = 1.0
    d = ratio_interval(np.ones((1, 40)), zero, n_boot=200).as_dict()
    assert d["high"] is None and d["mean"] == 40.0


def test_perplexity_intervals_pool_tokens_and_match_a_direct_loop():
    rng = np.random.default_rng(3)
    tokens = rng.integers(5, 40, size=(2, 12)).astype(float)
    nll = tokens * rng.uniform(2.0, 3.0, size=(2, 12))
    r = perplexity_interval(nll, tokens, n_boot=200, seed=1)
    assert r.mean == pytest.approx(math.exp(nll.sum() / tokens.sum()))
    lo, hi = loop_bootstrap(lambda n, t: math.exp(n.sum() / t.sum()), [nll, tokens], 200, 1)
    assert (r.low, r.high) == pytest.approx((lo, hi), rel=1e-12)
    base_nll, base_tokens = tokens[0] * 2.0, tokens[0]
    q = perplexity_ratio_interval(nll, np.stack([tokens[0]] * 2), base_nll, base_tokens, n_boot=200, seed=1)
    lo, hi = loop_bootstrap(
        lambda n, t, bn, bt: math.exp(n.sum() / t.sum() - bn.sum() / bt.sum()),
        [nll, np.stack([tokens[0]] * 2), np.stack([base_nll] * 2), np.stack([base_tokens] * 2)],
        200,
        1,
    )
    assert (q.low, q.high) == pytest.approx((lo, hi), rel=1e-12)
    assert q.low <= q.mean <= q.high


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda: mean_interval([]), "values must be"),
        (lambda: mean_interval([[1.0, float("nan")]]), "not finite"),
        (lambda: mean_interval([[1.0]], level=1.0), "level must be < 1"),
        (lambda: mean_interval([[1.0]], n_boot=10), "n_boot must be >= 100"),
        (lambda: ratio_interval([[1.0, 2.0]], [1.0]), "base must be .* 2 units"),
        (lambda: ratio_interval([[1.0, 2.0]], [0.0, 0.0]), "base has mean 0"),
        (lambda: perplexity_interval([[1.0]], [[0.0]]), "token count > 0"),
    ],
)
def test_bad_inputs_are_named(call, words):
    with pytest.raises(ArgumentError, match=words):
        call()


def test_interval_as_dict_round_trips():
    r = mean_interval([[0.1, 0.2, 0.3]], n_boot=100)
    assert Interval(**r.as_dict()) == r


PROMPTS = [f"prompt number {i}" for i in range(30)]


def test_split_is_disjoint_deterministic_and_held_out():
    training = ["prompt number 3 and more words", "prompt number 7"]
    val, test = split_prompts(PROMPTS + PROMPTS[:5], 8, 10, seed=4, held_out_from=training)
    assert (len(val), len(test)) == (8, 10) and not set(val) & set(test)
    assert len(set(val)) == 8 and len(set(test)) == 10
    assert not {"prompt number 3", "prompt number 7"} & set(val + test)
    assert split_prompts(PROMPTS, 8, 10, seed=4, held_out_from=training) == (val, test)
    assert split_prompts(PROMPTS, 8, 10, seed=5, held_out_from=training) != (val, test)
    with pytest.raises(ArgumentError, match="n_validation=20 \\+ n_test=10 prompts asked, but 28"):
        split_prompts(PROMPTS, 20, 10, held_out_from=training)


def test_sampled_decoding_is_reproducible_per_seed_and_differs_across_seeds():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    prompts = ["you are a", "what a", "the sun"]
    paper = Decoding(max_new_tokens=6)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = decode(model, tok, prompts, paper, seed=1)
    assert torch.equal(torch.rand(1), before)  # the caller's RNG is untouched
    assert decode(model, tok, prompts, paper, seed=1) == a
    b = decode(model, tok, prompts, paper, seed=2)
    assert b != a and all(len(tok(t)["input_ids"]) > 0 for t in a + b)
    # greedy: the seed changes nothing, and it is the library's greedy continuations
    g = Decoding.greedy(6)
    assert decode(model, tok, prompts, g, seed=1) == decode(model, tok, prompts, g, seed=2)
    assert decode(model, tok, prompts, g) == continuations(model, tok, prompts, 6)
    assert Decoding().settings() == {
        "mode": "sampled",
        "max_new_tokens": 32,
        "temperature": 1.0,
        "top_p": 0.3,
        "repetition_penalty": 1.2,
    }
    with pytest.raises(ArgumentError, match="top_p must be <= 1"):
        decode(model, tok, prompts, Decoding(top_p=1.5))


def test_text_nll_is_per_text_and_pools_to_the_perplexity():
    from lineas_fast.apps.eval import perplexity, text_nll

    model, tok = tiny_model("llama"), tiny_tokenizer()
    texts = ["a short one", "a rather longer text about rivers and hills", "mid length text"]
    nll, count = text_nll(model, tok, texts, batch_size=3)  # padded batch
    alone = [text_nll(model, tok, [t], batch_size=1) for t in texts]  # no padding
    assert count == [c[0] for _, c in alone] == [len(tok(t)["input_ids"]) - 1 for t in texts]
    assert nll == pytest.approx([n[0] for n, _ in alone], rel=1e-5)
    assert perplexity(model, tok, texts) == pytest.approx(math.exp(sum(nll) / sum(count)), rel=1e-12)
