"""The prompting baseline (the LinEAS paper's instruction before each prompt): perplexity with
the instruction as unscored context, checked against a direct unbatched evaluation; one unit in
the interval sweep, its continuations those of the instructed prompts; refused where it has no
meaning (the single-draw sweep, gates)."""

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from lineas_fast.apps.decoding import decode
from lineas_fast.apps.eval import text_nll
from lineas_fast.apps.sweep import INSTRUCTION, Recipe, SweepData, fit_recipe, run_sweep
from lineas_fast.cli import build_parser
from lineas_fast.cli.sweep import recipes_from_args

TEXTS = ["a short one", "a rather longer text about rivers and hills", "mid length"]


def test_perplexity_after_a_prefix_scores_the_same_tokens_given_the_prefix():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    prefix = INSTRUCTION + "\n"
    nll, count = text_nll(model, tok, TEXTS, batch_size=3, prefix=prefix)
    plain_nll, plain_count = text_nll(model, tok, TEXTS)
    assert count == plain_count  # the same tokens scored
    pre = tok(prefix)["input_ids"]
    for t, n in zip(TEXTS, nll):  # one text at a time, no padding
        ids = tok(t)["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([pre + ids])).logits[0].double(), -1)
        direct = -sum(lp[len(pre) + j - 1, ids[j]].item() for j in range(1, len(ids)))
        assert n == pytest.approx(direct, rel=1e-5)
    assert nll != plain_nll  # the context changes the likelihood


def test_prompting_is_one_unit_of_the_interval_sweep(tmp_path):
    import sys

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from test_sweep_draws import PROTOCOL, Judge, data

    from lineas_fast.apps.sweep_draws import run_draw_sweep

    model, tok, judge = tiny_model("llama"), tiny_tokenizer(), Judge()
    recipe = Recipe("prompting")
    res = run_draw_sweep(
        model,
        tok,
        data(),
        judge,
        [recipe],
        [0.5, 2.0],
        str(tmp_path),
        PROTOCOL,
        progress=False,
        log=lambda s: None,
    )
    assert judge.calls == 2 * 2 * 2  # two units (unsteered, prompting) × seeds × splits
    row = next(r for r in res["rows"] if r["method"] == "prompting" and "choice" not in r)
    assert row["n"]["draws"] == 1 and row["label"] == f"prompting '{INSTRUCTION}'"
    assert recipe.settings() == {"method": "prompting", "instruction": INSTRUCTION}
    import json

    unit = json.loads((tmp_path / "evals" / recipe.key() / "d0-l1.0.json").read_text())
    d = data()
    for s in (0, 1):  # the judged continuations are those of the instructed prompts
        outs = decode(model, tok, [INSTRUCTION + "\n" + p for p in d.test_prompts], PROTOCOL.decoding, seed=s)
        assert unit["test"]["tox"][s] == Judge()(outs)
    assert unit["example"]["prompt"] == d.test_prompts[0]
    nll, tokens = text_nll(model, tok, d.test_wiki, prefix=INSTRUCTION + "\n")
    assert unit["test"]["nll"] == pytest.approx(nll) and unit["test"]["tokens"] == tokens
    from lineas_fast.apps.sweep_report import format_interval_table

    assert "| – |" in format_interval_table(res)


def test_prompting_is_refused_where_it_means_nothing():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    sweep_data = SweepData(["a b c"] * 4, ["d e f"] * 4, ["x"], ["y z"], [])
    with pytest.raises(ValueError, match="no steering to fit"):
        fit_recipe(model, tok, Recipe("prompting"), sweep_data)
    with pytest.raises(ValueError, match="single-draw sweep does not run method='prompting'"):
        run_sweep(model, tok, sweep_data, lambda t: [0.0] * len(t), [Recipe("prompting")], [1.0], "unused")
    with pytest.raises(ValueError, match="no maps to gate"):
        Recipe("prompting", gates="token").check()
    args = build_parser().parse_args(["sweep", "--methods", "prompting", "lineas"])
    assert [r.method for r in recipes_from_args(args)] == ["prompting", "lineas"]
