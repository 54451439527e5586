"""bench/quality_goal.py: issue #31's verdict from an interval sweep's rows: met only when the best
LinEAS row chosen on validation is >= 3x lower at <= +3% perplexity and its toxicity interval lies
below every baseline's; each failed condition is named."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
from quality_goal import best_lineas, goal_lines, measured_cost  # noqa: E402


def ci(mean, low, high):
    return {"mean": mean, "low": low, "high": high}


def row(method, tox, lo, hi, ppl, val_tox, strengths=(1.0, 1.0, 1.0), settings=None):
    return {
        "method": method,
        "recipe": method,
        "label": method,
        "settings": settings,
        "choice": "validation",
        "chosen_strengths": list(strengths),
        "toxicity_mean_prob": tox,
        "perplexity": ppl,
        "validation": {"toxicity_mean_prob": val_tox},
        "n": {"draws": 3, "seeds": 2, "prompts": 200},
        "draws": [0, 1, 2],
        "fit_s": 60.0,
        "eval_s": 720.0,
        "ci": {
            "toxicity_mean_prob": ci(tox, lo, hi),
            "toxicity_mean_prob_ratio": ci(tox / 0.1, lo / 0.1, hi / 0.1),
            "perplexity_ratio": ci(ppl / 10, ppl / 10 - 0.01, ppl / 10 + 0.01),
        },
    }


def results(lineas_tox, lineas_hi, lineas_ppl, baseline_lo):
    base = {"method": "none", "toxicity_mean_prob": 0.1, "perplexity": 10.0, "eval_s": 240.0, "draws": []}
    return {
        "rows": [
            base,
            row("lineas", 0.05, 0.04, 0.06, 10.2, 0.05),  # a worse LinEAS row on validation
            row("lineas", lineas_tox, lineas_tox - 0.005, lineas_hi, lineas_ppl, 0.03),
            row(
                "iti_c",
                0.07,
                baseline_lo,
                0.08,
                10.1,
                0.07,
                settings={"method": "iti_c", "modules": ".*o_proj"},
            ),
        ]
    }


def test_met_only_when_every_condition_holds():
    res = results(0.03, 0.035, 10.25, 0.05)
    assert best_lineas(res) is res["rows"][2]  # the lowest validation toxicity
    lines = goal_lines(res)
    assert "**3.3× lower**" in lines[0] and "(**+2.5%**)" in lines[0] and "λ = 1/1/1" in lines[0]
    assert "lies above LinEAS's" in lines[1] and lines[-1].endswith("**met**")


def test_each_failed_condition_is_named():
    assert "2.5× is below 3×" in goal_lines(results(0.04, 0.045, 10.2, 0.05))[-1]
    assert "+4.0% is above +3%" in goal_lines(results(0.03, 0.035, 10.4, 0.05))[-1]
    overlapping = goal_lines(results(0.03, 0.055, 10.2, 0.05))
    assert "overlaps LinEAS's" in overlapping[1] and "1 of 1 baseline intervals overlap" in overlapping[-1]
    alone = results(0.03, 0.035, 10.2, 0.05)
    alone["rows"].pop()
    assert goal_lines(alone)[-1].endswith("(no baseline measured)") and "**not met**" in goal_lines(alone)[-1]
    none = {"rows": alone["rows"][:1]}
    assert goal_lines(none) == [
        "* no LinEAS row was chosen on validation (no strength within the budget there)"
    ]


def test_measured_cost_is_per_unit():
    res = results(0.03, 0.035, 10.25, 0.05)
    res["rows"][1]["choice"] = None  # a grid row: eval_s sums its three draws' units
    res["rows"][1]["fit_s_draws"] = [30.0, 60.0, 120.0]
    expected = "one unit's evaluation (median of 2 rows) 4.0 min, LinEAS fit (median of 3) 1.0 min"
    assert measured_cost(res) == expected
    res["rows"][3]["choice"] = None  # a closed-form grid row without per-draw times: its mean per draw
    assert measured_cost(res).endswith(
        "LinEAS fit (median of 3) 1.0 min, closed-form fit (median of 3) 1.0 min"
    )


def test_the_other_lineas_recipes_are_listed_and_the_goal_read_on_the_chosen_one():
    res = results(0.03, 0.035, 10.25, 0.05)
    res["rows"][2]["settings"] = {"method": "lineas", "gates": "token", "gate_control": "wikipedia"}
    assert best_lineas(res) is res["rows"][2]
    lines = goal_lines(res)
    assert lines[1].startswith(
        "* other LinEAS recipe: lineas (λ chosen on validation), λ = 1/1/1: ×0.50 [0.40, 0.60] (2.0× lower)"
    )
    assert lines[1].endswith("validation mean toxicity 0.0500 against the chosen recipe's 0.0300")
    assert lines[-1].endswith("**met**")
    # a recipe better on test but ranked second on validation does not decide the goal
    res["rows"][1].update(toxicity_mean_prob=0.02)
    res["rows"][2].update(toxicity_mean_prob=0.04)
    lines = goal_lines(res)
    assert "(**2.5× lower**)" in lines[0] and "(5.0× lower)" in lines[1] and "**not met**" in lines[-1]
