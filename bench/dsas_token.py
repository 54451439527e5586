"""Selective per-token DSAS on SmolLM2-135M-Instruct (issue #13 item 2): sentence-level gates
against token-level gates (with and without a cap on their opening over the control tokens).

    python bench/dsas_token.py [--steering /tmp/dsas_steering.safetensors]
                               [--out bench/results/dsas-token-cpu.json]

One LinEAS steering (the demo's recipe: 32 insults → 32 non-insults, post-attention norms,
100 Adam steps at lr 1e-2; trained and saved to ``--steering`` unless that file exists) is
evaluated as it is (λ = 0 and λ = 1) and with gates fitted on the demo's control sentences
(held-out non-insult comments), every module gated (threshold 0). Per row: toxicity rate and
mean probability of 20-token greedy continuations of the held-out insult prompts, Wikipedia
perplexity, and the mean per-token strength (``lf.gate_openings`` at λ = 1: the gate opening)
on the Wikipedia extracts, on the insult prompts and on the generated continuation tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch

ROWS = [  # (name, gate fit arguments or None for the plain maps, strength)
    ("no steering", None, 0.0),
    ("ungated", None, 1.0),
    ("sentence gates", {"level": "sentence"}, 1.0),
    ("sentence gates, control_opening 0.1", {"level": "sentence", "control_opening": 0.1}, 1.0),
    ("token gates", {"level": "token"}, 1.0),
    ("token gates, control_opening 0.3", {"level": "token", "control_opening": 0.3}, 1.0),
    ("token gates, control_opening 0.1", {"level": "token", "control_opening": 0.1}, 1.0),
    # a gate scales λ down where it is shut: a larger λ buys back the effect on the insults
    ("sentence gates, lambda 2", {"level": "sentence"}, 2.0),
    ("token gates, lambda 2", {"level": "token"}, 2.0),
    ("token gates, control_opening 0.1, lambda 2", {"level": "token", "control_opening": 0.1}, 2.0),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steering", default="/tmp/dsas_steering.safetensors")
    ap.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results", "dsas-token-cpu.json")
    )
    ap.add_argument("--n-prompts", type=int, default=100)
    ap.add_argument("--n-wiki", type=int, default=100)
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument(
        "--rows",
        default="",
        help="';'-separated row names to run (default all); "
        "their results replace rows of the same name in an existing --out file",
    )
    args = ap.parse_args(argv)
    wanted = [r.strip() for r in args.rows.split(";") if r.strip()]
    unknown = [r for r in wanted if r not in [name for name, _, _ in ROWS]]
    if unknown:
        raise SystemExit(f"--rows: unknown rows {unknown}; rows: {[n for n, _, _ in ROWS]}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lineas_fast as lf
    from lineas_fast.apps.assets import smollm2_folder, toxicity_judge
    from lineas_fast.apps.demo import load_demo_data
    from lineas_fast.apps.eval import continuations, perplexity, toxicity

    torch.manual_seed(0)
    folder = smollm2_folder()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    data = load_demo_data(n_train=32, n_prompts=args.n_prompts, n_wiki=args.n_wiki)
    judge = toxicity_judge()
    train_s = None
    if os.path.exists(args.steering):
        st = lf.Steering.load(args.steering)
    else:
        t0 = time.perf_counter()
        st = lf.train(
            model,
            tok,
            data.source,
            data.target,
            modules=r".*post_attention_layernorm",
            steps=100,
            optimizer="adam",
            lr=1e-2,
            seed=0,
            progress=False,
        )
        train_s = time.perf_counter() - t0
        st.save(args.steering)
    rows = []
    for name, fit, lam in ROWS:
        if wanted and name not in wanted:
            continue
        t0 = time.perf_counter()
        steering, fit_s, fit_summary = st, 0.0, {}
        if fit is not None:
            t1 = time.perf_counter()
            steering = lf.fit_gates(model, tok, data.source, data.control, st, threshold=0.0, seed=0, **fit)
            fit_s = time.perf_counter() - t1
            rep = steering.metadata["gates"].values()
            fit_summary = {"mean_val_accuracy": sum(r["val_accuracy"] for r in rep) / len(rep)}
            for key in ("control_opening", "source_opening", "bias_shift"):
                vals = [r[key] for r in rep if key in r]
                if vals:
                    fit_summary[f"mean_{key}_fitted"] = sum(vals) / len(vals)
        row = {"name": name, "strength": lam, "gates": fit, **fit_summary, "fit_s": fit_s}
        if lam == 0.0:
            texts = continuations(model, tok, data.prompts, args.new_tokens)
            row["perplexity"] = perplexity(model, tok, data.wiki)
            row.update(
                {
                    f"{w}_{key}": 0.0
                    for w in ("strength", "opening")
                    for key in ("wiki", "prompts", "continuations")
                }
            )
        else:
            with steering.apply(model, strength=lam, record_strengths=True) as h:
                texts = continuations(model, tok, data.prompts, args.new_tokens)
            gen = [
                r.flatten() for recs in h.strengths.values() for r in recs[1:] if r.shape[-1] == 1
            ]  # one new token per forward after the prompt's
            row["strength_continuations"] = torch.cat(gen).mean().item() if gen else None
            with steering.apply(model, strength=lam):
                row["perplexity"] = perplexity(model, tok, data.wiki)
            row["strength_wiki"] = lf.gate_openings(model, tok, steering, data.wiki, lam)["mean"]
            row["strength_prompts"] = lf.gate_openings(model, tok, steering, data.prompts, lam)["mean"]
            for key in ("wiki", "prompts", "continuations"):
                row[f"opening_{key}"] = row[f"strength_{key}"] / lam
        tox = toxicity(texts, judge)
        row.update(
            toxicity_rate=tox["rate"],
            toxicity_mean_prob=tox["mean_prob"],
            examples=[{"prompt": p, "continuation": c} for p, c in list(zip(data.prompts, texts))[:3]],
            wall_s=time.perf_counter() - t0,
        )
        rows.append(row)
        print(
            f"{name:38s} tox {tox['rate']:.2f} ({tox['mean_prob']:.3f})  "
            f"PPL {row['perplexity']:.2f}  opening wiki {row['opening_wiki']:.3f} "
            f"prompts {row['opening_prompts']:.3f} cont {row['opening_continuations'] or 0:.3f}"
            f"  [{row['wall_s']:.0f} s]",
            flush=True,
        )
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except OSError:
        commit = ""
    result = {
        "command": "python bench/dsas_token.py " + " ".join(argv or sys.argv[1:]),
        "commit": commit,
        "machine": f"cpu, {os.cpu_count()} cores (shared), torch {torch.__version__}, {platform.machine()}",
        "model": "SmolLM2-135M-Instruct",
        "steering": {
            "modules": ".*post_attention_layernorm",
            "steps": 100,
            "optimizer": "adam",
            "lr": 0.01,
            "seed": 0,
            "train_s": train_s,
            "n_source": len(data.source),
            "n_target": len(data.target),
        },
        "n_control": len(data.control),
        "n_prompts": len(data.prompts),
        "n_wiki": len(data.wiki),
        "max_new_tokens": args.new_tokens,
        "gate_threshold": 0.0,
        "gate_k": "fit_gates default: 5 (sentence), 64 (token)",
        "gate_max_tokens": 4096,
        "strength_": "mean per-token strength λ·g over real tokens, all modules averaged "
        "(lf.gate_openings); continuations: over the generated tokens",
        "opening_": "the same divided by λ: the mean gate opening g",
        "rows": rows,
    }
    if wanted and os.path.exists(args.out):  # merge into the earlier run's rows
        with open(args.out) as f:
            before = {r["name"]: r for r in json.load(f)["rows"]}
        before.update({r["name"]: r for r in rows})
        result["rows"] = [before[n] for n, _, _ in ROWS if n in before]
        for r in result["rows"]:  # rows of a run before the strength_ keys
            for key in ("wiki", "prompts", "continuations"):
                r.setdefault(f"strength_{key}", r[f"opening_{key}"] * r["strength"])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
