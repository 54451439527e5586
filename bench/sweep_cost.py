"""What `lineas-fast sweep`'s full protocol (issue #31) would cost on this machine kind: an
ESTIMATE, not a measurement, scaled from the per-row times of the measured single-draw sweeps.

    python bench/sweep_cost.py          # prints the estimate; reads bench/results/quality-*.json

Each row of a single-draw sweep file records ``eval_s`` (greedy 20-token continuations of its
``n_prompts`` prompts, judged, and perplexity on its ``n_wiki`` texts) and ``fit_s`` (its recipe's
fit). The protocol's unit (one recipe, one draw, one strength) generates ``gen_seeds`` ×
(validation + test prompts) continuations of ``max_new_tokens`` tokens and scores (validation +
test) texts, so its time is taken as

    median eval_s × gen_seeds × prompts / n_prompts × max_new_tokens / 20

(generation dominates a row's time and is taken as linear in prompts and tokens; the perplexity
texts, which grow less than that, ride along: an estimate on the high side). Fits: the median
``fit_s`` of the file's LinEAS rows at n = 384 and 100 steps per LinEAS recipe and draw, and the
median ``fit_s`` of its closed-form rows (mean-shift, Linear-AcT; ITI-C, not in those files, is
taken as costing the same: one read of the activations and a small regression per module) per
closed-form recipe and draw.
Units: 2 (the unsteered model and the prompting baseline) + recipes × draws × strengths.
``PLAN`` is the goal run of issue #31 item 4 on one model. The measured rows ran on a shared 2-core
machine, so the times carry its load; the estimate inherits it.
"""

from __future__ import annotations

import json
import os
import statistics
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# the goal run on one model: LinEAS (2 recipes), mean-shift and Linear-AcT at the norms and at
# o_proj, ITI-C at o_proj (5 closed-form recipes); 4 strengths each; the sweep's default draws,
# seeds and splits
PLAN = {
    "lineas_recipes": 2,
    "closed_form_recipes": 5,
    "strengths": 4,
    "draws": 3,
    "gen_seeds": 2,
    "prompts": 100 + 200,
    "texts": 50 + 100,
    "max_new_tokens": 32,
}


def estimate(sweep: dict, plan: dict = PLAN) -> dict:
    """Hours of ``plan`` from a single-draw sweep result (module docstring)."""
    rows, settings = sweep["rows"], sweep["settings"]
    eval_s = statistics.median(r["eval_s"] for r in rows)
    lineas = [
        r["fit_s"]
        for r in rows
        if r["method"] == "lineas"
        and r["settings"]["n_train"] == 384
        and r["settings"]["steps"] == 100
        and not r["settings"].get("gates")
    ]
    closed = [r["fit_s"] for r in rows if r["method"] in ("mean_shift", "linear_act")]
    unit_s = (
        eval_s
        * plan["gen_seeds"]
        * plan["prompts"]
        / settings["n_prompts"]
        * plan["max_new_tokens"]
        / settings["max_new_tokens"]
    )
    # the unsteered model and the prompting baseline: one unit each
    units = 2 + (plan["lineas_recipes"] + plan["closed_form_recipes"]) * plan["draws"] * plan["strengths"]
    fit_s = plan["draws"] * (
        plan["lineas_recipes"] * statistics.median(lineas)
        + plan["closed_form_recipes"] * statistics.median(closed)
    )
    return {
        "row_eval_s": eval_s,
        "unit_s": unit_s,
        "units": units,
        "lineas_fit_s": statistics.median(lineas),
        "closed_form_fit_s": statistics.median(closed),
        "hours": (units * unit_s + fit_s) / 3600,
    }


def table(read) -> str:
    """The estimate per model as a markdown table; ``read(name)`` returns a result file's dict."""
    lines = [
        "| model | one row then: eval (median) | one unit now (estimate) | units | LinEAS fit (median) | "
        "closed-form fit (median) | whole plan (estimate) |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, model in (("smollm2", "SmolLM2-135M-Instruct"), ("gemma3", "Gemma-3-270M")):
        e = estimate(read(f"quality-{key}.json"))
        lines.append(
            f"| {model} | {e['row_eval_s']:.0f} s | {e['unit_s'] / 60:.1f} min | {e['units']} | "
            f"{e['lineas_fit_s'] / 60:.1f} min | {e['closed_form_fit_s'] / 60:.1f} min | "
            f"{e['hours']:.1f} h |"
        )
    return "\n".join(lines)


def main() -> int:
    def read(name):
        with open(os.path.join(RESULTS, name)) as f:
            return json.load(f)

    print(f"plan: {PLAN}\n")
    print(table(read))
    return 0


if __name__ == "__main__":
    sys.exit(main())
