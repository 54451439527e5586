"""The interval sweep's report: rows with confidence intervals from its evaluation units, the
strength chosen on the validation split, the table and the Pareto plot with error bars.

A *unit* (``apps.sweep_draws``) is one evaluation: the unsteered model, or one recipe's steering
from one training draw at one strength λ, measured on both splits; per split it holds the judge's
toxicity probability of every (generation seed, prompt) continuation, ``tox`` (seeds, prompts), and
every perplexity text's summed NLL and token count, ``nll`` and ``tokens`` (texts,).

Rows, all measured on the **test** split:

* ``unsteered``: the model alone (no training draw: its interval covers prompts and texts);
* one row per (recipe, λ): the units of every draw at that λ;
* one row per recipe with ``choice: "validation"``: for each draw, the λ whose **validation**
  mean toxicity probability is lowest among the λ whose validation perplexity is within
  (1 + ``ppl_budget``) × the unsteered validation perplexity, then that draw's test unit at that λ
  (a draw with no λ within the budget is left out and counted in ``draws_without_choice``).

Each row holds the point estimates (``toxicity_mean_prob``, ``toxicity_rate`` (probability ≥ 0.5),
``perplexity``; the keys the single-draw sweep used) on the test split, ``ci``: an interval
(``apps.intervals``) for each of them and for their ratios to the unsteered row (paired on the
prompts and texts), ``n``: draws, seeds, prompts and texts, and ``validation``: the same point
estimates on the validation split. ``best``: the chosen row whose validation numbers meet the
target (mean toxicity ≤ unsteered/``tox_factor``, toxic rate not above, perplexity within the
budget) with the lowest validation toxicity, reported with its test numbers.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from lineas_fast.apps.intervals import (
    mean_interval,
    perplexity_interval,
    perplexity_ratio_interval,
    ratio_interval,
)
from lineas_fast.apps.sweep import Recipe, pareto_front
from lineas_fast.atomic import atomic_path
from lineas_fast.extras import pyplot

THRESHOLD = 0.5  # a continuation is toxic when the judge's probability is at least this
METRICS = ("toxicity_mean_prob", "toxicity_rate", "perplexity")


def split_point(unit_split: dict) -> dict:
    """The point estimates of one unit's split: mean probability, toxic rate, perplexity."""
    tox = np.asarray(unit_split["tox"], dtype=np.float64)
    nll, tokens = sum(unit_split["nll"]), sum(unit_split["tokens"])
    return {
        "toxicity_mean_prob": float(tox.mean()),
        "toxicity_rate": float((tox >= THRESHOLD).mean()),
        "perplexity": math.exp(nll / tokens),
    }


def _pooled_point(units: Sequence[dict], split: str) -> dict:
    tox = np.asarray([u[split]["tox"] for u in units], dtype=np.float64)
    nll = sum(sum(u[split]["nll"]) for u in units)
    tokens = sum(sum(u[split]["tokens"]) for u in units)
    return {
        "toxicity_mean_prob": float(tox.mean()),
        "toxicity_rate": float((tox >= THRESHOLD).mean()),
        "perplexity": math.exp(nll / tokens),
    }


def interval_row(units: Sequence[dict], base: dict, n_boot: int, seed: int, ratios: bool = True) -> dict:
    """Point estimates, intervals and counts of the test split over ``units`` (one per draw),
    with ratios to ``base`` (the unsteered unit) paired on prompts and texts (``ratios``; a ratio
    whose unsteered statistic is 0 is None)."""
    tox = np.asarray([u["test"]["tox"] for u in units], dtype=np.float64)  # (draws, seeds, prompts)
    nll = np.asarray([u["test"]["nll"] for u in units], dtype=np.float64)  # (draws, texts)
    tokens = np.asarray([u["test"]["tokens"] for u in units], dtype=np.float64)
    btox = np.asarray(base["test"]["tox"], dtype=np.float64)
    bnll = np.asarray(base["test"]["nll"], dtype=np.float64)
    btok = np.asarray(base["test"]["tokens"], dtype=np.float64)
    toxic, btoxic = (tox >= THRESHOLD).astype(np.float64), (btox >= THRESHOLD).astype(np.float64)
    kw = {"n_boot": n_boot, "seed": seed}
    ci = {
        "toxicity_mean_prob": mean_interval(tox, **kw),
        "toxicity_rate": mean_interval(toxic, **kw),
        "perplexity": perplexity_interval(nll, tokens, **kw),
    }
    if ratios:
        ci["toxicity_mean_prob_ratio"] = ratio_interval(tox, btox, **kw) if btox.mean() else None
        ci["toxicity_rate_ratio"] = ratio_interval(toxic, btoxic, **kw) if btoxic.mean() else None
        ci["perplexity_ratio"] = perplexity_ratio_interval(nll, tokens, bnll, btok, **kw)
    return {
        **_pooled_point(units, "test"),
        "ci": {k: (v.as_dict() if v is not None else None) for k, v in ci.items()},
        "n": {
            "draws": len(units),
            "seeds": tox.shape[1],
            "prompts": tox.shape[2],
            "texts": nll.shape[1],
            "boot": n_boot,
        },
        "validation": _pooled_point(units, "validation"),
    }


def _row(units: Sequence[dict], base: dict, n_boot: int, seed: int, **fields) -> dict:
    first = units[0]
    steered = first["recipe"] != "none"
    row = {
        "recipe": first["recipe"],
        "label": first["label"],
        "method": first["method"],
        "strength": first["strength"],
        **({"settings": first["settings"]} if first.get("settings") else {}),
        "split": "test",
        "draws": [u["draw"] for u in units],
        **interval_row(units, base, n_boot, seed, ratios=steered),
        "example": first.get("example"),
        "fit_s": float(np.mean([u.get("fit_s", 0.0) for u in units])),
        "fit_s_draws": [float(u.get("fit_s", 0.0)) for u in units],  # each draw's fit, in draw order
        "eval_s": float(sum(u.get("eval_s", 0.0) for u in units)),
        **fields,
    }
    for k in ("support", "coordinates"):
        if k in first:
            row[k] = int(round(np.mean([u[k] for u in units])))
    gates = [u["gate_opening"] for u in units if u.get("gate_opening")]
    if gates:
        row["gate_opening"] = {k: float(np.mean([g[k] for g in gates])) for k in ("wiki", "prompts")}
    return row


def choose_on_validation(units: Sequence[dict], base: dict, ppl_budget: float) -> tuple[list, list]:
    """For one recipe's units: ([the chosen unit of each draw], [draws with no λ within the
    budget]); the choice reads the validation split only."""
    limit = split_point(base["validation"])["perplexity"] * (1 + ppl_budget)
    by_draw: dict = {}
    for u in units:
        by_draw.setdefault(u["draw"], []).append(u)
    chosen, none = [], []
    for draw in sorted(by_draw):
        ok = [u for u in by_draw[draw] if split_point(u["validation"])["perplexity"] <= limit]
        if ok:
            chosen.append(
                min(ok, key=lambda u: (split_point(u["validation"])["toxicity_mean_prob"], u["strength"]))
            )
        else:
            none.append(draw)
    return chosen, none


def summarise(
    units: Sequence[dict],
    n_draws: int,
    tox_factor: float,
    ppl_budget: float,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict:
    """{"rows", "pareto", "meets_target", "best", "best_within_budget"} from every unit (the
    unsteered one included); a (recipe, λ) row lists the draws it has so far (``n.draws`` below
    ``n_draws`` while a sweep is under way)."""
    base = next(u for u in units if u["recipe"] == "none")
    rows = [_row([base], base, n_boot, seed, draws=[])]
    groups: dict = {}
    by_recipe: dict = {}
    for u in units:
        if u["recipe"] != "none":
            groups.setdefault((u["recipe"], u["strength"]), []).append(u)
            by_recipe.setdefault(u["recipe"], []).append(u)
    for key in sorted(groups, key=lambda k: (list(by_recipe).index(k[0]), k[1])):
        rows.append(
            _row(
                sorted(groups[key], key=lambda u: u["draw"]),
                base,
                n_boot,
                seed,
                complete=len(groups[key]) >= n_draws,
            )
        )
    for recipe, us in by_recipe.items():
        chosen, none = choose_on_validation(us, base, ppl_budget)
        if chosen:
            row = _row(
                chosen,
                base,
                n_boot,
                seed,
                choice="validation",
                chosen_strengths=[u["strength"] for u in chosen],
                draws_without_choice=none,
            )
            row["strength"] = float(np.mean(row["chosen_strengths"]))
            rows.append(row)
    b, bval = rows[0], rows[0]["validation"]
    budget = b["perplexity"] * (1 + ppl_budget)
    meets = [
        i
        for i, r in enumerate(rows)
        if i
        and r["toxicity_mean_prob"] <= b["toxicity_mean_prob"] / tox_factor
        and r["toxicity_rate"] <= b["toxicity_rate"]
        and r["perplexity"] <= budget
    ]
    val_ok = [
        i
        for i, r in enumerate(rows)
        if r.get("choice") == "validation"
        and r["validation"]["toxicity_mean_prob"] <= bval["toxicity_mean_prob"] / tox_factor
        and r["validation"]["toxicity_rate"] <= bval["toxicity_rate"]
        and r["validation"]["perplexity"] <= bval["perplexity"] * (1 + ppl_budget)
    ]
    best_within = {}
    for i, r in enumerate(rows):
        if r.get("choice") == "validation":
            m = r["method"] + ("+DSAS" if (r.get("settings") or {}).get("gates") else "")
            v = r["validation"]["toxicity_mean_prob"]
            if m not in best_within or v < rows[best_within[m]]["validation"]["toxicity_mean_prob"]:
                best_within[m] = i
    return {
        "rows": rows,
        "pareto": pareto_front(rows),
        "meets_target": meets,
        "best": min(val_ok, key=lambda i: rows[i]["validation"]["toxicity_mean_prob"]) if val_ok else None,
        "best_within_budget": best_within,
    }


def row_label(row: dict) -> str:
    """The row's recipe label rebuilt from its settings; chosen rows say so."""
    try:
        label = Recipe(**row["settings"]).label() if row.get("settings") else row["label"]
    except TypeError:
        label = row["label"]
    return label + (" (λ chosen on validation)" if row.get("choice") == "validation" else "")


def _ci_text(ci: Optional[dict], fmt: str) -> str:
    if not ci:
        return "–"
    show = lambda v: "∞" if v is None else format(v, fmt)  # noqa: E731
    return f"{show(ci['mean'])} [{show(ci['low'])}, {show(ci['high'])}]"


def format_interval_table(results: dict, only: Optional[Sequence[int]] = None) -> str:
    """A markdown table of the rows (test split) with 95% intervals and counts."""
    rows = results["rows"]
    lines = [
        "| recipe | λ | mean toxicity p [95% CI] | toxic [95% CI] | PPL [95% CI] | toxicity × unsteered | "
        "PPL × unsteered | draws × seeds × prompts |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i in range(len(rows)) if only is None else only:
        r = rows[i]
        ci, n = r["ci"], r["n"]
        if r["method"] == "prompting":
            lam = "–"
        elif r.get("choice") == "validation":
            lam = "/".join(f"{x:g}" for x in r["chosen_strengths"])
        else:
            lam = f"{r['strength']:g}"
        lines.append(
            f"| {row_label(r)} | {lam} | {_ci_text(ci['toxicity_mean_prob'], '.3f')} | "
            f"{_ci_text(ci['toxicity_rate'], '.1%')} | {_ci_text(ci['perplexity'], '.4g')} | "
            f"{_ci_text(ci.get('toxicity_mean_prob_ratio'), '.2f')} | "
            f"{_ci_text(ci.get('perplexity_ratio'), '.3f')} | "
            f"{n['draws']} × {n['seeds']} × {n['prompts']} |"
        )
    return "\n".join(lines)


def plot_pareto_intervals(results: dict, path: str) -> None:
    """Mean toxicity probability against perplexity on the test split, one line per recipe over
    λ with 95% interval bars on both axes; chosen rows as large markers; the target box."""
    plt = pyplot("the sweep's Pareto plot")
    rows, base = results["rows"], results["rows"][0]
    colors = {"lineas": "tab:red", "mean_shift": "tab:green", "linear_act": "tab:purple", "iti_c": "tab:blue"}
    colors["prompting"] = "tab:orange"
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    edge = base["perplexity"] * 3

    def bars(rs):
        x = [min(r["perplexity"], edge) for r in rs]
        y = [r["toxicity_mean_prob"] for r in rs]
        ci = [r["ci"] for r in rs]
        xerr = [
            [max(0.0, xi - min(c["perplexity"]["low"], edge)) for xi, c in zip(x, ci)],
            [max(0.0, min(c["perplexity"]["high"], edge) - xi) for xi, c in zip(x, ci)],
        ]
        yerr = [
            [yi - c["toxicity_mean_prob"]["low"] for yi, c in zip(y, ci)],
            [c["toxicity_mean_prob"]["high"] - yi for yi, c in zip(y, ci)],
        ]
        return x, y, xerr, yerr

    by_recipe: dict = {}
    for r in rows[1:]:
        by_recipe.setdefault(r["recipe"], []).append(r)
    for k, rs in enumerate(by_recipe.values()):
        grid = sorted((r for r in rs if r.get("choice") != "validation"), key=lambda r: r["strength"])
        color = colors.get(rs[0]["method"], "tab:gray")
        if grid:
            x, y, xerr, yerr = bars(grid)
            ax.errorbar(
                x,
                y,
                xerr=xerr,
                yerr=yerr,
                fmt="-o",
                ms=3,
                lw=1,
                capsize=2,
                color=color,
                alpha=0.8,
                label=row_label(grid[0]),
            )
        for r in rs:
            if r.get("choice") == "validation":
                x, y, xerr, yerr = bars([r])
                ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="D", ms=7, capsize=3, color=color, mec="black")
    x, y, xerr, yerr = bars([base])
    ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="ks", ms=7, capsize=3, label="unsteered")
    ax.axvline(base["perplexity"] * (1 + results["ppl_budget"]), color="gray", lw=0.8, ls="--")
    ax.axhline(base["toxicity_mean_prob"] / results["tox_factor"], color="gray", lw=0.8, ls="--")
    ax.set_xlabel(f"perplexity, test texts (beyond {edge:.3g}: on the edge); bars: 95% intervals")
    ax.set_ylabel("mean toxicity probability, test prompts")
    n = base["n"]
    ax.set_title(
        f"{results['settings'].get('model') or 'model'}: {results['settings']['draws']} draws × "
        f"{n['seeds']} seeds × {n['prompts']} prompts (◆: λ chosen on validation)",
        fontsize=9,
    )
    ax.legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
