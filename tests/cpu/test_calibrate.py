"""lf.calibrate_strength: the largest strength within a perplexity budget, checked against an
independent float64 evaluation (own hooks, own per-text log-likelihood, no padding) at the
returned λ and at the evaluated over-budget λ just above it; the search's documented behaviour
on curves that are not monotone; argument errors naming argument and value."""

import math
import re

import pytest
import torch
from tiny_models import SOURCE, TARGET, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

import lineas_fast as lf
from lineas_fast.apps.calibrate import calibrate_strength, search_strength, strength_limit
from lineas_fast.apps.eval import perplexity
from lineas_fast.checks import ArgumentError, ArgumentTypeError
from lineas_fast.cli import main
from lineas_fast.numerics import coefficient_bound

TEXTS = TARGET  # held out: the steering below is not fitted on anything
MODULE = "model.norm"  # the final norm feeds the head: perplexity moves visibly with λ


def steering(seed=0):
    g = torch.Generator().manual_seed(seed)
    return lf.Steering({MODULE: (1 + 0.5 * torch.randn(32, generator=g), 0.5 * torch.randn(32, generator=g))})


def oracle_perplexity(model, tok, st, lam, texts=TEXTS) -> float:
    """exp(mean NLL per predicted token) in float64, one text at a time, with the map applied by
    a plain forward hook: z + λ(ωz + b − z)."""
    m64 = tiny_model("llama").double()
    m64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    om, b = (t.double() for t in st[MODULE])
    hook = dict(m64.named_modules())[MODULE].register_forward_hook(
        lambda mod, i, z: z + lam * (om * z + b - z)
    )
    nll, count = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = tok(t, return_tensors="pt")["input_ids"]
            lp = torch.log_softmax(m64(ids).logits[0, :-1], -1)
            nll -= lp.gather(-1, ids[0, 1:, None]).sum().item()
            count += ids.shape[1] - 1
    hook.remove()
    return math.exp(nll / count)


@pytest.mark.parametrize("budget", [0.03, 0.2])
def test_returned_strength_is_within_budget_and_the_next_evaluated_is_not(budget):
    model, tok, st = tiny_model("llama"), tiny_tokenizer(), steering()
    rec = calibrate_strength(st, model, tok, TEXTS, budget, return_record=True)
    assert rec.strength == calibrate_strength(st, model, tok, TEXTS, budget)
    base = oracle_perplexity(model, tok, st, 0.0)
    assert rec.base_perplexity == pytest.approx(base, rel=1e-5)
    limit = base * (1 + budget)
    over = rec.over_budget_strength
    assert rec.strength > 0 and over is not None
    assert over - rec.strength <= 0.05 * over  # the default rtol
    at, above = oracle_perplexity(model, tok, st, rec.strength), oracle_perplexity(model, tok, st, over)
    assert at <= limit < above
    assert rec.perplexity == pytest.approx(at, rel=1e-5)
    # a handful of evaluations; every one is in the record, the answer the largest within budget
    assert len(rec.evaluations) <= 12
    within = [lam for lam, p in rec.evaluations if p <= rec.limit]
    assert rec.strength == max(within)
    assert over == min(lam for lam, p in rec.evaluations if p > rec.limit)
    # nothing stays attached
    assert perplexity(model, tok, TEXTS) == rec.base_perplexity
    meta = rec.metadata()
    assert meta["strength"] == rec.strength and len(meta["evaluations"]) == len(rec.evaluations)


def test_a_larger_budget_gives_a_larger_strength():
    model, tok, st = tiny_model("llama"), tiny_tokenizer(), steering(1)
    small = calibrate_strength(st, model, tok, TEXTS, 0.01)
    large = calibrate_strength(st, model, tok, TEXTS, 0.5)
    assert 0 < small < large


def test_max_strength_within_budget_is_returned_after_one_evaluation():
    model, tok, st = tiny_model("llama"), tiny_tokenizer(), steering()
    rec = calibrate_strength(st, model, tok, TEXTS, 0.5, max_strength=0.25, return_record=True)
    assert rec.strength == 0.25 and rec.over_budget_strength is None and len(rec.evaluations) == 1


def curve(points):
    """A perplexity curve as a function (piecewise constant between the given λ), recording calls."""
    calls = []

    def f(lam):
        calls.append(lam)
        return next(p for top, p in points if lam <= top)

    return f, calls


def test_search_on_a_curve_that_is_not_monotone():
    # within the budget (≤ 10) up to 3, over on (3, 5], within again on (5, 6], over after
    f, calls = curve([(3.0, 9.0), (5.0, 11.0), (6.0, 9.5), (math.inf, 12.0)])
    lam, over, ev = search_strength(f, 10.0, rtol=0.01)
    # doubling: 1, 2 within, 4 over; bisection between 2 and 4 closes on 3
    assert calls[:3] == [1.0, 2.0, 4.0]
    assert 3.0 - 0.04 <= lam <= 3.0 < over <= 3.0 + 0.04
    assert lam == max(x for x, p in ev if p <= 10) and over == min(x for x, p in ev if p > 10)
    # the (5, 6] stretch within the budget again was never on the path: documented
    assert not any(5 < x <= 6 for x in calls)
    # a spike below the answer that the path skips is not seen either
    g, _ = curve([(0.5, 9.0), (0.6, 50.0), (3.0, 9.0), (math.inf, 12.0)])
    assert search_strength(g, 10.0, rtol=0.01)[0] > 2.9
    # a non-finite perplexity counts as over the budget
    h, _ = curve([(1.5, 9.0), (math.inf, math.nan)])
    lam, over, _ = search_strength(h, 10.0, rtol=0.01)
    assert 1.48 <= lam <= 1.5 < over


def test_search_stops_at_the_ceiling_and_within_max_evaluations():
    f, calls = curve([(math.inf, 1.0)])  # never over the budget
    lam, over, ev = search_strength(f, 10.0, ceiling=5.0)
    assert (lam, over, calls) == (5.0, None, [1.0, 2.0, 4.0, 5.0])
    f, calls = curve([(math.inf, 1.0)])
    lam, over, _ = search_strength(f, 10.0, max_evaluations=3)
    assert (lam, over, len(calls)) == (4.0, None, 3)
    f, calls = curve([(1e-9, 1.0), (math.inf, 20.0)])  # almost nothing is within
    lam, over, _ = search_strength(f, 10.0, max_evaluations=12)
    assert len(calls) == 12 and 0 <= lam < over <= 2**-10


def test_strength_limit_is_the_numeric_bound():
    st = lf.Steering({"m": (torch.tensor([1.0, 3.0]), torch.tensor([0.0, -4.0]))})
    bound = coefficient_bound(torch.float16)
    assert strength_limit(st, torch.float16) == pytest.approx(min((bound - 1) / 2, bound / 4))
    ident = lf.Steering({"m": (torch.ones(2), torch.zeros(2))})
    assert strength_limit(ident, torch.float32) == math.inf


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        ({"texts": []}, ArgumentError, "texts is empty"),
        ({"texts": "one string"}, ArgumentTypeError, "texts must be a list of strings, got str"),
        ({"texts": ["fine", "  "]}, ArgumentError, r"texts\[1\]"),
        ({"max_ppl_increase": 0}, ArgumentError, "max_ppl_increase must be > 0, got 0"),
        ({"max_ppl_increase": -0.1}, ArgumentError, "max_ppl_increase must be > 0, got -0.1"),
        ({"max_ppl_increase": float("nan")}, ArgumentError, "max_ppl_increase must be finite, got nan"),
        ({"max_ppl_increase": float("inf")}, ArgumentError, "max_ppl_increase must be finite"),
        ({"max_ppl_increase": "3%"}, ArgumentTypeError, "max_ppl_increase must be a real number"),
        ({"max_strength": 0.0}, ArgumentError, "max_strength must be > 0, got 0.0"),
        ({"max_strength": 1e30}, ArgumentError, "max_strength=1e.30 is beyond"),
        ({"rtol": 0}, ArgumentError, "rtol must be > 0"),
        ({"max_evaluations": 0}, ArgumentError, "max_evaluations must be >= 1"),
        ({"steering": {"a": 1}}, ArgumentTypeError, "steering must be a lineas_fast.Steering, got dict"),
    ],
)
def test_argument_errors_name_argument_and_value(kwargs, exc, words):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    args = {"steering": steering(), "texts": TEXTS, **kwargs}
    with pytest.raises(exc, match=words) as e:
        calibrate_strength(args.pop("steering"), model, tok, args.pop("texts"), **args)
    assert e.value.argument == next(iter(kwargs))


def test_exported():
    assert lf.calibrate_strength is calibrate_strength
    assert "calibrate_strength" in lf.__all__


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    tiny_model("llama").save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return str(d)


def train_args(model_dir, tmp_path, *extra):
    (tmp_path / "src.txt").write_text("\n".join(SOURCE) + "\n")
    (tmp_path / "tgt.txt").write_text("\n".join(TARGET[:8]) + "\n")
    return [
        "train",
        "--model",
        model_dir,
        "--source",
        str(tmp_path / "src.txt"),
        "--target",
        str(tmp_path / "tgt.txt"),
        "--modules",
        r"model\.norm",
        "--steps",
        "5",
        "--lr",
        "0.05",
        "--out",
        str(tmp_path / "s.safetensors"),
        *extra,
    ]


def test_cli_train_records_the_calibrated_strength(model_dir, tmp_path, capsys):
    held_out = ["the river runs past the old mill", "a quiet morning in the hills", "bread and tea"]
    (tmp_path / "held.txt").write_text("\n".join(held_out) + "\n")
    argv = train_args(model_dir, tmp_path, "--ppl-budget", "0.05", "--ppl-texts", str(tmp_path / "held.txt"))
    assert main(argv) == 0
    assert "calibrated strength" in capsys.readouterr().out
    st = lf.Steering.load(str(tmp_path / "s.safetensors"))
    meta = st.metadata
    assert meta["ppl_budget"] == 0.05
    record = meta["strength_calibration"]
    assert record["texts_file"] == str(tmp_path / "held.txt") and record["n_texts"] == 3
    # the same search on the saved maps and the folder's model gives the recorded strength
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    again = calibrate_strength(st, model, tok, held_out, 0.05, return_record=True)
    assert meta["calibrated_strength"] == again.strength == record["strength"]
    assert record["evaluations"] == [list(e) for e in again.evaluations]


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--ppl-budget", "0.03"], "--ppl-budget 0.03 needs --ppl-texts FILE"),
        (["--ppl-texts", "HELD"], "needs --ppl-budget F"),
        (["--ppl-budget", "0", "--ppl-texts", "HELD"], "--ppl-budget"),
        (["--ppl-budget", "nan", "--ppl-texts", "HELD"], "--ppl-budget"),
        (["--ppl-budget", "0.03", "--ppl-texts", "SHARED"], "1 of its 2 texts are also in --source"),
        (["--ppl-budget", "0.03", "--ppl-texts", "NOPE"], "--ppl-texts file .* does not exist"),
        (["--ppl-budget", "0.03", "--ppl-texts", "OUT"], "--out .*--ppl-texts"),
    ],
)
def test_cli_budget_errors_exit_2_before_training(model_dir, tmp_path, capsys, extra, words):
    (tmp_path / "held.txt").write_text("bread and tea\n")
    (tmp_path / "shared.txt").write_text(f"bread and tea\n{SOURCE[0]}\n")
    (tmp_path / "s.safetensors").write_text("bread and tea\n")
    files = {"HELD": "held.txt", "SHARED": "shared.txt", "NOPE": "nope.txt", "OUT": "s.safetensors"}
    extra = [str(tmp_path / files[x]) if x in files else x for x in extra]
    assert main(train_args(model_dir, tmp_path, *extra)) == 2
    assert re.search(words, capsys.readouterr().err)
    assert (tmp_path / "s.safetensors").read_text() == "bread and tea\n"  # nothing written
