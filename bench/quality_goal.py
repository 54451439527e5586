"""Issue #31's goal, read from an interval sweep's result file (bench/results/quality-NAME.json):

    LinEAS at the strength chosen on validation reaches >= 3x lower mean toxicity at <= +3%
    perplexity (point estimates on the test split), and its mean-toxicity interval lies below,
    without overlap, every baseline's interval at that baseline's strength chosen on validation.

    python bench/quality_goal.py NAME      # prints the summary of quality-NAME.json

``goal_lines(res)`` gives the summary as markdown bullets for the docs (bench/tables.py): the
LinEAS row, each baseline row with whether its interval overlaps LinEAS's, and the verdict. The
file's own ``tox_factor`` / ``ppl_budget`` are the sweep's target; the goal's numbers are fixed
here (GOAL_FACTOR, GOAL_PPL).
"""

from __future__ import annotations

import json
import os
import statistics
import sys

GOAL_FACTOR = 3.0  # mean toxicity at most unsteered / 3
GOAL_PPL = 0.03  # perplexity at most unsteered x 1.03


def chosen_rows(res: dict) -> dict:
    """{recipe label: row} of the rows chosen on validation (prompting, one unit with no strength,
    has one too)."""
    from lineas_fast.apps.sweep_report import row_label

    return {row_label(r): r for r in res["rows"][1:] if r.get("choice") == "validation"}


def _ratio(r: dict, key: str, digits: int = 2) -> str:
    ci = r["ci"][f"{key}_ratio"]
    show = lambda v: "∞" if v is None else f"{v:.{digits}f}"  # noqa: E731
    return f"×{show(ci['mean'])} [{show(ci['low'])}, {show(ci['high'])}]"


def _strengths(r: dict) -> str:
    if r["method"] == "prompting":
        return ""
    return ", λ = " + "/".join(f"{x:g}" for x in r["chosen_strengths"])


def gated(r: dict) -> bool:
    """Whether the row's recipe has DSAS gates."""
    return bool((r.get("settings") or {}).get("gates"))


def best_lineas(res: dict):
    """The LinEAS row chosen on validation with the lowest validation toxicity (None: none chosen)."""
    rows = [r for r in chosen_rows(res).values() if r["method"] == "lineas"]
    return min(rows, key=lambda r: r["validation"]["toxicity_mean_prob"]) if rows else None


def goal_lines(res: dict) -> list[str]:
    """Markdown bullets: the best LinEAS row chosen on validation (the goal is read on it), the other
    LinEAS rows chosen on validation, every baseline row, the verdict."""
    from lineas_fast.apps.sweep_report import row_label

    base, chosen = res["rows"][0], chosen_rows(res)
    others = {k: r for k, r in chosen.items() if r["method"] != "lineas"}
    best = best_lineas(res)
    if best is None:
        return ["* no LinEAS row was chosen on validation (no strength within the budget there)"]
    label = row_label(best)
    factor = base["toxicity_mean_prob"] / best["toxicity_mean_prob"]
    ppl = best["perplexity"] / base["perplexity"] - 1
    n = best["n"]
    lines = [
        f"* {label}{_strengths(best)} ({n['draws']} draws × {n['seeds']} seeds × "
        f"{n['prompts']} test prompts): mean toxicity {base['toxicity_mean_prob']:.3f} → "
        f"{best['toxicity_mean_prob']:.3f}, {_ratio(best, 'toxicity_mean_prob')} "
        f"(**{factor:.1f}× lower**), perplexity {_ratio(best, 'perplexity', 3)} (**{ppl:+.1%}**)"
    ]
    for r in chosen.values():  # the other LinEAS recipes, ranked below it on validation
        if r["method"] == "lineas" and r is not best:
            f = base["toxicity_mean_prob"] / r["toxicity_mean_prob"]
            lines.append(
                f"* other LinEAS recipe{' (gated)' if gated(r) else ''}: {row_label(r)}{_strengths(r)}: "
                f"{_ratio(r, 'toxicity_mean_prob')} ({f:.1f}× lower), "
                f"perplexity {_ratio(r, 'perplexity', 3)}; "
                f"validation mean toxicity {r['validation']['toxicity_mean_prob']:.4f} against the chosen "
                f"recipe's {best['validation']['toxicity_mean_prob']:.4f}"
            )
    hi = best["ci"]["toxicity_mean_prob"]["high"]
    apart = []
    for k, r in others.items():
        lo = r["ci"]["toxicity_mean_prob"]["low"]
        apart.append(hi < lo)
        lines.append(
            f"* {k}{_strengths(r)}: mean toxicity {r['toxicity_mean_prob']:.3f}, "
            f"{_ratio(r, 'toxicity_mean_prob')}, perplexity {_ratio(r, 'perplexity', 3)}: its interval "
            f"{'lies above' if hi < lo else 'overlaps'} LinEAS's"
        )
    met_factor, met_ppl = factor >= GOAL_FACTOR, ppl <= GOAL_PPL
    verdict = "met" if met_factor and met_ppl and all(apart) else "not met"
    why = []
    if not met_factor:
        why.append(f"{factor:.1f}× is below {GOAL_FACTOR:g}×")
    if not met_ppl:
        why.append(f"{ppl:+.1%} is above {GOAL_PPL:+.0%}")
    if not all(apart):
        why.append(f"{apart.count(False)} of {len(apart)} baseline intervals overlap")
    if not others:
        why.append("no baseline measured")
        verdict = "not met"
    lines.append(
        f"* goal (≥ {GOAL_FACTOR:g}× lower at ≤ {GOAL_PPL:+.0%}, beating every baseline): **{verdict}**"
        + (f" ({'; '.join(why)})" if why else "")
    )
    return lines


def measured_cost(res: dict) -> str:
    """The sweep's measured times: the median evaluation of one unit, and the median fit of one
    draw, LinEAS and closed-form, over the grid rows (each fit counted once per recipe and draw)."""
    grid = [r for r in res["rows"] if r.get("choice") != "validation"]
    evals = [  # a grid row's eval_s sums its draws' units
        r["eval_s"] / max(1, len(r.get("draws") or [])) for r in grid if r.get("eval_s")
    ]
    parts = [f"one unit's evaluation (median of {len(evals)} rows) {statistics.median(evals) / 60:.1f} min"]
    for name, methods in (
        ("LinEAS fit", ("lineas",)),
        ("closed-form fit", ("mean_shift", "linear_act", "iti_c")),
    ):
        fits = {}  # (recipe, draw) -> seconds: a recipe's strengths share their draws' fits
        for r in grid:
            if r["method"] in methods:
                per_draw = r.get("fit_s_draws") or [r.get("fit_s", 0.0)] * len(r["draws"])
                fits.update({(r["recipe"], d): s for d, s in zip(r["draws"], per_draw)})
        if fits:
            parts.append(f"{name} (median of {len(fits)}) {statistics.median(fits.values()) / 60:.1f} min")
    return ", ".join(parts)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"quality-{argv[0]}.json")
    with open(path) as f:
        res = json.load(f)
    print("\n".join(goal_lines(res)))
    print(measured_cost(res))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
