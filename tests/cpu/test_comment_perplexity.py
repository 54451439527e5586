"""bench/comment_perplexity.py: the conversational-text cost of each row an interval sweep chose on
validation, on a tiny model: each draw's saved steering at its chosen strength, perplexity on the
comments checked against a float64 oracle (one text at a time, no padding), and the ratio to the
unsteered model; rows not chosen on validation are left out."""

import json
import os
import sys

import numpy as np
import torch
from tiny_models import SOURCE, TARGET, tiny_model, tiny_tokenizer

import lineas_fast as lf
from lineas_fast.apps.decoding import Decoding
from lineas_fast.apps.sweep import Recipe
from lineas_fast.apps.sweep_draws import DrawData, Protocol, run_draw_sweep

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
from comment_perplexity import comment_rows  # noqa: E402

COMMENTS = ["thanks for the link", "see you at noon", "the game was fun", "nice photo of the lake"]


def oracle_nll(model, tok, texts):
    """Σ NLL and token count over ``texts``, each read alone in float64."""
    total, count = 0.0, 0
    model64 = model.double()
    for t in texts:
        ids = tok(t, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(model64(input_ids=ids).logits[0, :-1].double(), -1)
        total -= float(lp.gather(-1, ids[0, 1:, None]).sum())
        count += ids.shape[1] - 1
    model.float()
    return total, count


def test_each_chosen_row_is_measured_at_each_draws_strength(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    data = DrawData(
        SOURCE,
        TARGET,
        ["you are a", "what a"],
        ["nobody likes", "shut up"],
        ["the cat sat on the mat"],
        ["water boils when heated"],
    )
    recipe = Recipe("mean_shift", r"model\.norm", n_train=4)
    protocol = Protocol(draws=2, gen_seeds=1, decoding=Decoding(max_new_tokens=2), n_boot=100)
    judge = lambda texts: [0.5] * len(texts)  # noqa: E731
    run_draw_sweep(
        model,
        tok,
        data,
        judge,
        [recipe],
        [20.0, 40.0],
        str(tmp_path),
        protocol,
        ppl_budget=1000.0,
        progress=False,
    )
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    chosen = [r for r in sweep["rows"] if r.get("choice") == "validation"]
    assert len(chosen) == 1 and len(sweep["rows"]) > 2
    out = comment_rows(sweep, str(tmp_path), model, tok, COMMENTS)
    assert len(out["rows"]) == 1
    row = out["rows"][0]
    assert row["chosen_strengths"] == chosen[0]["chosen_strengths"] and row["gates"] is False
    base_nll, base_count = oracle_nll(model, tok, COMMENTS)
    nll, count = 0.0, 0
    for draw, lam in zip(chosen[0]["draws"], chosen[0]["chosen_strengths"]):
        st = lf.Steering.load(str(tmp_path / "steerings" / f"{recipe.key()}-d{draw}.safetensors"))
        with st.apply(model, strength=lam):
            n, c = oracle_nll(model, tok, COMMENTS)
        nll, count = nll + n, count + c
    assert abs(nll / count - base_nll / base_count) > 1e-3  # the steering changes the comments' NLL
    assert np.isclose(out["unsteered"]["perplexity"]["mean"], np.exp(base_nll / base_count), rtol=1e-4)
    assert np.isclose(row["comment_perplexity"]["mean"], np.exp(nll / count), rtol=1e-4)
    ratio = row["comment_perplexity_ratio"]
    assert np.isclose(ratio["mean"], np.exp(nll / count - base_nll / base_count), rtol=1e-4)
    assert ratio["low"] <= ratio["mean"] <= ratio["high"] and ratio["n_draws"] == 2
    assert row["wikipedia_perplexity_ratio"] == chosen[0]["ci"]["perplexity_ratio"]
